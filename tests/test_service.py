"""`llm-mux service`: the systemd unit (system unit with hardening as root, user unit otherwise) and the launchd
plist point at the running file and the config in use; `--dry-run` writes nothing; `systemd-analyze verify`
accepts the units; other systems get a clear error."""
import argparse
import os
import plistlib
import shutil
import subprocess
import sys

import pytest

import llm_mux
from harness import ROOT


def run(tmp_path, *args):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    env.pop("LLM_MUX_CONFIG", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "llm_mux.py"), "service"] + list(args),
                          capture_output=True, text=True, env=env, timeout=60)


def unit_of(output):
    text = output.split(":\n", 1)[1]
    return text[:text.index("\nwould run:")]


@pytest.mark.parametrize("mode", ["--system", "--user"])
def test_dry_run_prints_the_unit_and_writes_nothing(tmp_path, mode):
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text("port: 8399\nauth-dir: %s\n" % (tmp_path / "state" / "auth"))
    r = run(tmp_path, "install", "--dry-run", mode, "--config", str(config))
    assert r.returncode == 0, r.stderr
    unit = unit_of(r.stdout)
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")][0]
    assert exec_start == "ExecStart=%s %s serve --config %s" % (os.path.realpath(sys.executable),
                                                                 os.path.join(ROOT, "llm_mux.py"), config)
    assert "Restart=on-failure" in unit and "LimitNOFILE=65536" in unit
    if mode == "--system":
        assert "ProtectSystem=strict" in unit and "NoNewPrivileges=true" in unit and "WantedBy=multi-user.target" in unit
        rw = [line for line in unit.splitlines() if line.startswith("ReadWritePaths=")][0]
        assert str(config.parent) in rw and str(tmp_path / "state" / "auth") in rw
        assert "would run: systemctl enable --now llm-mux" in r.stdout
    else:
        assert "ProtectSystem" not in unit and "WantedBy=default.target" in unit
        assert "would run: systemctl --user enable --now llm-mux" in r.stdout
    assert not (tmp_path / "xdg").exists() and not os.path.exists(str(tmp_path / "state"))
    if shutil.which("systemd-analyze"):
        path = tmp_path / "llm-mux.service"
        path.write_text(unit)
        done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (done.stdout + done.stderr).splitlines()
                    if "llm-mux.service" in line and "Failed to" not in line and "bus" not in line.lower()]
        assert done.returncode == 0 and not problems, done.stdout + done.stderr


def test_launchd_plist_and_other_systems(tmp_path):
    cfg = llm_mux.Config.defaults()
    args = argparse.Namespace(system=False, user=False)
    path, text, actions = llm_mux.service_plan(args, cfg, "/Users/me/.config/llm-mux/config.yaml", "darwin")
    assert path.endswith("Library/LaunchAgents/com.llm-mux.plist")
    plist = plistlib.loads(text.encode())
    assert plist["Label"] == "com.llm-mux" and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"][2:] == ["serve", "--config", "/Users/me/.config/llm-mux/config.yaml"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert actions["install"][-1] == ["launchctl", "load", "-w", path]
    with pytest.raises(llm_mux.CliError) as e:
        llm_mux.service_plan(args, cfg, "/x/config.yaml", "freebsd14")
    assert "systemd (Linux) or launchd (macOS)" in str(e.value)
