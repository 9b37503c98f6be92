"""The management key (gateway.md §4.2, §5.1): stored hashed with a stdlib KDF and checked in constant time;
`llm-mux init [--force]` and a first run print a key once; loopback-only unless allow-remote; five failures from
one remote address ban it for 30 minutes (on the gateway's clock); the dashboard page needs no key."""
import os
import re
import subprocess
import sys
import urllib.request

import pytest

import llm_mux
from fakes import free_port
from harness import ROOT, GatewayThread

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


def test_hash_and_verify():
    h = llm_mux.hash_secret("s3cret")
    assert h.startswith("scrypt$16384$8$1$") and "s3cret" not in h
    assert llm_mux.verify_secret(h, "s3cret") and not llm_mux.verify_secret(h, "s3cret ")
    assert llm_mux.hash_secret("s3cret") != h  # salted
    assert llm_mux.verify_secret("plain", "plain") and not llm_mux.verify_secret("plain", "other")
    for broken in ("scrypt$x$8$1$aa$bb", "scrypt$16384$8$1$!!$bb", "pbkdf2-sha256$5$aa$bb", "scrypt$1$2"):
        assert llm_mux.verify_secret(broken, "anything") is False
    import hashlib
    import base64
    salt = b"0123456789abcdef"
    pb = "pbkdf2-sha256$1000$%s$%s" % (llm_mux.b64url(salt), llm_mux.b64url(hashlib.pbkdf2_hmac("sha256", b"k", salt, 1000)))
    assert llm_mux.verify_secret(pb, "k") and not llm_mux.verify_secret(pb, "j")


def run(*args, env=None):
    return subprocess.run([sys.executable, LLM_MUX] + list(args), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def test_init_creates_config_and_prints_the_key_once(tmp_path):
    cfg = tmp_path / "c" / "config.yaml"
    out = run("init", "--config", str(cfg), env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert out.returncode == 0 and "Created: %s" % cfg in out.stdout and cfg.exists()  # --config names where
    out = run("init", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert out.returncode == 0, out.stderr
    path = tmp_path / "xdg" / "llm-mux" / "config.yaml"
    assert "Created: %s" % path in out.stdout and "Generated management key:" in out.stdout
    key = re.search(r"^  ([0-9a-f]{32})$", out.stdout, re.M).group(1)
    stored = llm_mux.Config.load(str(path), environ={}).data["remote-management"]["secret-key"]
    assert llm_mux.verify_secret(stored, key) and key not in path.read_text()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600" and (tmp_path / "xdg" / "llm-mux" / "auth").is_dir()
    again = run("init", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert "Management key: set (stored hashed" in again.stdout and "--force" in again.stdout
    forced = run("init", "--force", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    new = re.search(r"^  ([0-9a-f]{32})$", forced.stdout, re.M).group(1)
    assert "Regenerated management key:" in forced.stdout and new != key
    stored = llm_mux.Config.load(str(path), environ={}).data["remote-management"]["secret-key"]
    assert llm_mux.verify_secret(stored, new) and not llm_mux.verify_secret(stored, key)
    assert "# The management API" in path.read_text()  # the default file's comments survived


def test_a_first_run_prints_the_dashboard_url_and_a_working_key(tmp_path):
    port = free_port()
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    env.pop("LLM_MUX_CONFIG", None)
    proc = subprocess.Popen([sys.executable, LLM_MUX, "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        text = "".join(lines)
        m = re.search(r"Dashboard: (http://127\.0\.0\.1:%d/dashboard)  management key: ([0-9a-f]{32})" % port, text)
        assert m, text
        page = urllib.request.urlopen(m.group(1), timeout=10).read()
        assert b"<title>llm-mux dashboard</title>" in page
        assert not re.search(rb'(src|href)\s*=\s*"(https?:)?//', page)  # nothing fetched from elsewhere
        req = urllib.request.Request("http://127.0.0.1:%d/v1/management/overview" % port,
                                     headers={"X-Management-Key": m.group(2)})
        assert urllib.request.urlopen(req, timeout=10).status == 200
    finally:
        proc.terminate()
        proc.wait(20)


class Req:
    def __init__(self, peer, key=None):
        self.peer = peer
        self.headers = llm_mux.Headers([("x-management-key", key)] if key else [])


def test_remote_callers_need_allow_remote_and_are_banned_after_five_failures():
    key = "k" * 32
    g = GatewayThread("remote-management: {allow-remote: true, secret-key: %s}\n" % llm_mux.hash_secret(key))
    try:
        m = llm_mux.Management(g.gateway)
        m.check(Req("10.0.0.9", key))  # allowed from afar with the key
        for _ in range(5):
            with pytest.raises(llm_mux.ManagementError) as e:
                m.check(Req("10.0.0.9", "wrong"))
            assert e.value.status == 401
        with pytest.raises(llm_mux.ManagementError) as e:
            m.check(Req("10.0.0.9", key))  # banned, even with the right key
        assert e.value.status == 403 and "banned" in e.value.message and "1800s" in e.value.message
        m.check(Req("10.0.0.10", key))  # another address is not
        for _ in range(7):  # loopback callers are never banned
            with pytest.raises(llm_mux.ManagementError):
                m.check(Req("127.0.0.1", "wrong"))
        m.check(Req("127.0.0.1", key))
        g.gateway.clock.t += 1801
        m.check(Req("10.0.0.9", key))  # the ban ran out
    finally:
        g.stop()
    g = GatewayThread("remote-management: {secret-key: %s}\n" % llm_mux.hash_secret(key))
    try:
        with pytest.raises(llm_mux.ManagementError) as e:
            llm_mux.Management(g.gateway).check(Req("10.0.0.9", key))
        assert e.value.status == 403 and e.value.message == "remote management disabled"
    finally:
        g.stop()
