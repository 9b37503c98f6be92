"""`llm-mux login claude` run as a subprocess, with the browser played by the test and the token endpoint faked
through upstream-overrides; `llm-mux import` of Claude Code's own credential file."""
import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from harness import ROOT
from fakes import FakeUpstream, Reply, free_port

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


@pytest.fixture
def token_server():
    seen = []

    def handler(r):
        seen.append(r.json)
        return Reply(body={"access_token": "sk-ant-oat01-new", "refresh_token": "sk-ant-ort01-new", "expires_in": 28800,
                           "token_type": "Bearer", "account": {"uuid": "acc-1", "email_address": "me@example.com"},
                           "organization": {"uuid": "org-1", "name": "Me"}})
    up = FakeUpstream(handler).start()
    up.seen = seen
    yield up
    up.stop()


def start_login(tmp_path, token_server, *extra):
    auth = tmp_path / "auth"
    cfg = tmp_path / "c.yaml"
    cfg.write_text('auth-dir: %s\nupstream-overrides:\n  "https://platform.claude.com": "%s"\n' % (auth, token_server.url))
    port = free_port()
    env = dict(os.environ, BROWSER="true", PYTHONUNBUFFERED="1")
    # Ctrl-C in a terminal: the login starts with SIGINT's default disposition even when the suite itself runs
    # with SIGINT ignored (started in the background by a non-interactive shell, or under nohup), which a child
    # would otherwise inherit and then never see the test's SIGINT.
    proc = subprocess.Popen([sys.executable, LLM_MUX, "login", "claude", "--config", str(cfg), "--callback-port",
                             str(port)] + list(extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    url = None
    deadline = time.time() + 15
    while url is None and time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "https://claude.ai/oauth/authorize?" in line:
            url = line.strip()
    assert url, "".join(lines)
    proc.stdout.readline()
    return proc, url, port, auth


def wait_port(port, timeout=60):
    """Until the login's callback server answers (a 404 for an unknown path): a process that compiles this file
    from source on a loaded machine can take many seconds to get there."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen("http://127.0.0.1:%d/nothing" % port, timeout=1)
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the login's callback server on port %d never answered" % port)


def finished(proc, timeout=60):
    """(stdout, stderr) once the process has ended; its output in the failure if it does not end in time."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("login still running after %d s\nstdout: %s\nstderr: %s" % (timeout, out, err))


def test_browser_login_writes_the_credential_file(tmp_path, token_server):
    proc, url, port, auth = start_login(tmp_path, token_server)
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["client_id"] == "9d1c250a-e61b-44d9-88ed-5944d1962f5e" and q["code"] == "true"
    assert q["redirect_uri"] == "http://localhost:54545/callback" and q["code_challenge_method"] == "S256"
    assert q["scope"] == "org:create_api_key user:profile user:inference" and q["response_type"] == "code"
    wait_port(port)
    # a callback with the wrong state is refused and the login keeps waiting
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen("http://127.0.0.1:%d/callback?code=x&state=wrong" % port, timeout=5)
    assert e.value.code == 400
    with urllib.request.urlopen("http://127.0.0.1:%d/callback?code=the-code&state=%s" % (port, q["state"]),
                                timeout=5) as r:
        assert b"login complete" in r.read()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Logged in as me@example.com" in out
    body = token_server.seen[0]
    assert body["grant_type"] == "authorization_code" and body["code"] == "the-code"
    assert body["state"] == q["state"] and body["redirect_uri"] == "http://localhost:54545/callback"
    challenge = base64.urlsafe_b64encode(hashlib.sha256(body["code_verifier"].encode()).digest()).rstrip(b"=")
    assert challenge.decode() == q["code_challenge"] and len(body["code_verifier"]) == 128
    path = auth / "claude-me@example.com.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert saved["type"] == "claude" and saved["access_token"] == "sk-ant-oat01-new"
    assert saved["refresh_token"] == "sk-ant-ort01-new" and saved["email"] == "me@example.com" and saved["expired"]


def test_no_browser_login_accepts_the_pasted_redirect_url(tmp_path, token_server):
    proc, url, port, auth = start_login(tmp_path, token_server, "--no-browser")
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["state"]
    out, err = proc.communicate("http://localhost:54545/callback?code=pasted-code&state=%s\n" % state, timeout=20)
    assert proc.returncode == 0, err
    assert token_server.seen[0]["code"] == "pasted-code"
    assert (auth / "claude-me@example.com.json").exists()


def test_manual_code_hash_state_format(tmp_path, token_server):
    proc, url, port, auth = start_login(tmp_path, token_server, "--no-browser")
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["state"]
    out, err = proc.communicate("abc123#%s\n" % state, timeout=20)
    assert proc.returncode == 0, err
    assert token_server.seen[0]["code"] == "abc123" and token_server.seen[0]["state"] == state


def test_timeout_and_ctrl_c_leave_nothing_behind(tmp_path, token_server):
    proc, url, port, auth = start_login(tmp_path, token_server, "--timeout", "1")
    out, err = finished(proc)
    assert proc.returncode == 1 and "no answer from the browser within 1 s" in err
    proc, url, port, auth = start_login(tmp_path, token_server)
    wait_port(port)
    proc.send_signal(signal.SIGINT)
    out, err = finished(proc)
    assert proc.returncode == 130 and "nothing was written" in err
    assert not auth.exists() or not any(auth.iterdir())
    assert token_server.seen == []


def test_import_finds_claude_code_credentials(tmp_path):
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    expires = int((time.time() + 3600) * 1000)
    (home / ".claude" / ".credentials.json").write_text(json.dumps({"claudeAiOauth": {
        "accessToken": "sk-ant-oat01-x", "refreshToken": "sk-ant-ort01-y", "expiresAt": expires,
        "scopes": ["user:inference"], "subscriptionType": "max"}}))
    (home / ".claude.json").write_text(json.dumps({"oauthAccount": {"emailAddress": "cc@example.com"}}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\n" % (tmp_path / "auth"))
    env = dict(os.environ, HOME=str(home))
    env.pop("CLAUDE_CONFIG_DIR", None)
    out = subprocess.run([sys.executable, LLM_MUX, "import", "--config", str(cfg)], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    target = tmp_path / "auth" / "claude-cc@example.com.json"
    assert "imported Claude Code credentials from %s" % (home / ".claude" / ".credentials.json") in out.stdout
    saved = json.loads(target.read_text())
    assert saved["access_token"] == "sk-ant-oat01-x" and saved["refresh_token"] == "sk-ant-ort01-y"
    assert abs(__import__("llm_mux").parse_instant(saved["expired"]) - expires / 1000) < 2
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, LLM_MUX, "import", "--config", str(cfg)], capture_output=True, text=True,
                         env=dict(env, HOME=str(empty)))
    assert out.returncode == 1 and "skipped Claude Code: not found" in out.stdout
