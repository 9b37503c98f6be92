"""The command line and the zipapp."""
import hashlib
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from harness import ROOT
from fakes import free_port

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


def run(*args, env=None, timeout=30):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, LLM_MUX] + list(args), capture_output=True, text=True, env=e,
                          timeout=timeout)


def test_version():
    import llm_mux
    out = run("version")
    assert out.returncode == 0 and out.stdout.startswith("llm-mux %s" % llm_mux.__version__)
    assert run("--version").stdout.strip() == "llm-mux %s" % llm_mux.__version__


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["version", "--help"], ["env", "--help"]])
def test_help_everywhere(args):
    out = run(*args)
    assert out.returncode == 0 and "usage: llm-mux" in out.stdout


def test_unknown_command_is_one_line_and_nonzero():
    out = run("frobnicate")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "frobnicate" in out.stderr


def test_env_reports_paths_providers_and_listen_url(tmp_path):
    cfg = tmp_path / "c.yaml"
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "claude-a@b.json").write_text("{}")
    cfg.write_text("port: 9123\nauth-dir: %s\nproviders:\n  - type: openai\n    name: local\n"
                   "    base-url: http://127.0.0.1:1/v1\n    models: [m1, m2]\n" % auth)
    out = run("env", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert str(cfg) in out.stdout and str(auth) in out.stdout
    assert "http://127.0.0.1:9123" in out.stdout
    assert "local (type openai, 1 key(s), 2 model(s))" in out.stdout
    assert "claude-a@b.json" in out.stdout
    assert "Python:" in out.stdout


def test_env_uses_xdg_default_without_creating_it(tmp_path):
    out = run("env", env={"XDG_CONFIG_HOME": str(tmp_path), "LLM_MUX_CONFIG": ""})
    assert out.returncode == 0
    assert str(tmp_path / "llm-mux" / "config.yaml") in out.stdout and "not created yet" in out.stdout
    assert not (tmp_path / "llm-mux" / "config.yaml").exists()


def test_serve_reports_a_busy_port_in_one_line(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: %d\nauth-dir: %s\n" % (port, tmp_path / "auth"))
    try:
        out = run("serve", "--config", str(cfg))
    finally:
        s.close()
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and "cannot listen" in out.stderr


def test_serve_flags_override_config(tmp_path):
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 1\nauth-dir: %s\n" % (tmp_path / "auth"))
    p = subprocess.Popen([sys.executable, LLM_MUX, "serve", "--config", str(cfg), "--port", str(port),
                          "--host", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_http("http://127.0.0.1:%d/" % port, p)
    finally:
        p.terminate()
        out = p.communicate(timeout=20)[0]
    assert "listening on http://127.0.0.1:%d" % port in out


def _wait_http(url, proc, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("exited: %s" % proc.communicate()[0])
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.read()
        except OSError:
            time.sleep(0.05)
    raise AssertionError("no answer from %s" % url)


def test_zipapp_is_reproducible_and_runs(tmp_path):
    build = os.path.join(ROOT, "tools", "build_zipapp.py")
    a, b = tmp_path / "a.pyz", tmp_path / "b.pyz"
    for out in (a, b):
        r = subprocess.run([sys.executable, build, "-o", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest()
    import llm_mux
    out = subprocess.run([sys.executable, str(a), "version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("llm-mux %s" % llm_mux.__version__)
    import zipfile
    with zipfile.ZipFile(str(a)) as z:
        assert z.read("VERSION").decode().strip() == llm_mux.__version__
        assert z.comment.decode() == "llm-mux %s" % llm_mux.__version__
    # and it serves
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: %d\nauth-dir: %s\n" % (port, tmp_path / "auth"))
    p = subprocess.Popen([sys.executable, str(a), "serve", "--config", str(cfg)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        assert b"Ollama is running" in _wait_http("http://127.0.0.1:%d/" % port, p)
    finally:
        p.terminate()
        p.communicate(timeout=20)


def test_systemd_unit_is_hardened():
    text = open(os.path.join(ROOT, "llm-mux.service")).read()
    for line in ("NoNewPrivileges=true", "ProtectSystem=strict", "ReadWritePaths=/etc/llm-mux",
                 "Restart=on-failure", "ExecStart=", "[Install]"):
        assert line in text


def provider_config(tmp_path, port=None):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(("port: %d\n" % port if port else "") + "auth-dir: %s\nproviders:\n  - type: openai\n"
                   "    name: local\n    base-url: http://127.0.0.1:1/v1\n    models: [m1]\n" % (tmp_path / "auth"))
    return str(cfg)


@pytest.mark.parametrize("order", ["before", "after"])
def test_global_options_work_before_or_after_the_command(tmp_path, order):
    cfg = provider_config(tmp_path)
    out = run(*(["--config", cfg, "env"] if order == "before" else ["env", "--config", cfg]))
    assert out.returncode == 0 and "Providers:   1" in out.stdout and cfg in out.stdout


@pytest.mark.parametrize("args", [["--config", "{cfg}", "serve"], ["serve", "--config", "{cfg}"],
                                  ["--config", "{cfg}", "--port", "{port}"], ["--port", "{port}", "--config", "{cfg}"]])
def test_serve_takes_global_options_anywhere(tmp_path, args):
    port = free_port()
    cfg = provider_config(tmp_path, port=free_port())  # the config's own port is overridden where --port is given
    listen = port if "--port" in args else int(open(cfg).read().split()[1])
    argv = [a.format(cfg=cfg, port=port) for a in args]
    proc = subprocess.Popen([sys.executable, LLM_MUX] + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        body = _wait_http("http://127.0.0.1:%d/v1/models" % listen, proc)
        assert b'"m1"' in body  # the config given on the command line was used
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_unreachable_device_login_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('auth-dir: %s\nupstream-overrides:\n  "https://github.com": "http://127.0.0.1:%d"\n'
                   % (tmp_path / "auth", free_port()))
    out = run("login", "copilot", "--config", str(cfg), timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "unreachable" in out.stderr


def test_an_old_python_is_told_what_it_needs(tmp_path):
    """The zipapp's entry point is plain ASCII with old syntax, so Python 3.6-3.8 run it far enough to say what
    they lack (no old interpreter is installed here: the version is set to one before the entry point runs)."""
    import zipfile
    out_path = tmp_path / "llm_mux.pyz"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_zipapp.py"), "-o", str(out_path)],
                   check=True, capture_output=True)
    main = zipfile.ZipFile(out_path).read("__main__.py")
    main.decode("ascii")  # no non-ASCII byte for an old parser to trip on
    code = "import sys; sys.version_info = (3, 7, 17); sys.path.insert(0, %r); exec(%r)" % (str(out_path), main)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "needs Python 3.9 or newer; this is Python 3.7" in out.stderr


def test_import_with_nothing_found_says_where_it_looked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\n" % (tmp_path / "auth"))
    out = run("import", "--config", str(cfg), env={"HOME": str(tmp_path), "CLAUDE_CONFIG_DIR": "", "CODEX_HOME": ""})
    assert out.returncode == 1
    assert str(tmp_path / ".claude" / ".credentials.json") in out.stdout
    assert str(tmp_path / ".codex" / "auth.json") in out.stdout


@pytest.mark.parametrize("provider, own, foreign", [("claude", "--no-browser", "--alias"),
                                                    ("qwen", "--alias", "--cookie"),
                                                    ("iflow", "--cookie", "--device"),
                                                    ("cline", None, "--timeout")])
def test_login_help_is_per_provider_and_refuses_other_providers_flags(provider, own, foreign):
    out = run("login", provider, "--help")
    assert out.returncode == 0 and "llm-mux login %s" % provider in out.stdout
    if own:
        assert own in out.stdout
    assert foreign not in out.stdout
    refused = run("login", provider, foreign, "x")
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr
