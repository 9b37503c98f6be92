"""Codex through a ChatGPT account: requests shaped as the Codex CLI sends them, refresh, the browser and
device-code logins (subprocesses, with the user played by the test), and import of Codex CLI's auth.json."""
import base64
import json
import os
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import anthropic
import openai
import pytest

import upstreams
from harness import ROOT, play_browser, read_login_url
from fakes import FakeUpstream, Reply, free_port

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


def id_token(email="dev@example.com", account="acc-42", plan="plus"):
    enc = lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).rstrip(b"=").decode()
    return "%s.%s.sig" % (enc({"alg": "none"}), enc({"email": email, "https://api.openai.com/auth": {
        "chatgpt_account_id": account, "chatgpt_plan_type": plan}}))


class FakeOpenAIAuth:
    def __init__(self):
        self.token_calls, self.polls = [], 0
        self.valid = {"at-good"}
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        if r.path == "/oauth/token":
            form = dict(urllib.parse.parse_qsl(r.body.decode()))
            self.token_calls.append(form)
            n = len(self.token_calls)
            self.valid.add("at-%d" % n)
            return Reply(body={"access_token": "at-%d" % n, "refresh_token": "rt-%d" % n, "id_token": id_token(),
                               "expires_in": 864000, "token_type": "Bearer"})
        if r.path == "/api/accounts/deviceauth/usercode":
            return Reply(body={"device_auth_id": "dev-1", "user_code": "ABCD-1234", "interval": "1"})
        if r.path == "/api/accounts/deviceauth/token":
            self.polls += 1
            if self.polls < 3:
                return Reply(status=403, body={"error": "authorization_pending"})
            return Reply(body={"authorization_code": "dev-code", "code_verifier": "dev-verifier",
                               "code_challenge": "x"})
        if r.path == "/backend-api/codex/responses":
            if r.headers.get("authorization", "")[7:] not in self.valid:
                return Reply(status=401, body={"error": {"message": "token expired", "type": "invalid_request_error"}})
            return upstreams.CODEX("text")
        return Reply(status=404, body={"error": r.path})

    def config(self, auth):
        return ('auth-dir: %s\nupstream-overrides:\n  "https://auth.openai.com": "%s"\n  "https://chatgpt.com": "%s"\n'
                % (auth, self.up.url, self.up.url))


@pytest.fixture
def oa():
    f = FakeOpenAIAuth()
    yield f
    f.up.stop()


def write_codex(auth, access="at-good", expires_in=86400 * 9):
    os.makedirs(auth, exist_ok=True)
    path = os.path.join(auth, "codex-dev@example.com.json")
    with open(path, "w") as f:
        json.dump({"type": "codex", "email": "dev@example.com", "access_token": access, "refresh_token": "rt-0",
                   "id_token": id_token(), "account_id": "acc-42",
                   "expired": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expires_in))}, f)
    return path


def test_requests_are_shaped_like_the_codex_cli(gateway, oa, tmp_path):
    auth = str(tmp_path / "auth")
    write_codex(auth)
    gw = gateway(oa.config(auth))
    r = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-5.1-codex", temperature=0.2, max_tokens=99,
        messages=[{"role": "system", "content": "Sys"}, {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from codex"
    with anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.stream(
            model="gpt-5.1-codex", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream) == "Hello from codex"
    q = [x for x in oa.up.requests if x.path == "/backend-api/codex/responses"][0]
    h = q.headers
    assert h["authorization"] == "Bearer at-good" and h["chatgpt-account-id"] == "acc-42"
    assert h["originator"] == "codex-tui" and h["user-agent"].startswith("codex-tui/")
    assert h["accept"] == "text/event-stream" and h["session-id"] == q.json["prompt_cache_key"]
    body = q.json
    assert body["model"] == "gpt-5.1-codex" and body["instructions"] == "Sys"
    assert body["stream"] is True and body["store"] is False and body["include"] == ["reasoning.encrypted_content"]
    assert "temperature" not in body and "max_output_tokens" not in body


def test_expired_codex_token_is_refreshed_with_the_form_body(gateway, oa, tmp_path):
    auth = str(tmp_path / "auth")
    path = write_codex(auth, access="at-old", expires_in=-10)
    gw = gateway(oa.config(auth))
    r = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from codex"
    assert oa.token_calls == [{"client_id": "app_EMoamEEZ73f0CkXaXp7hrann", "grant_type": "refresh_token",
                               "refresh_token": "rt-0", "scope": "openid profile email"}]
    saved = json.load(open(path))
    assert saved["access_token"] == "at-1" and saved["refresh_token"] == "rt-1" and saved["account_id"] == "acc-42"


def run_login(tmp_path, oa, *args, stdin=None):
    auth = tmp_path / "auth"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(oa.config(auth))
    env = dict(os.environ, BROWSER="true", PYTHONUNBUFFERED="1")
    return auth, subprocess.Popen([sys.executable, LLM_MUX, "login", "codex", "--config", str(cfg)] + list(args),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)


def test_browser_login(tmp_path, oa):
    port = free_port()
    auth, proc = run_login(tmp_path, oa, "--callback-port", str(port))
    url = read_login_url(proc, "https://auth.openai.com/oauth/authorize?")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["client_id"] == "app_EMoamEEZ73f0CkXaXp7hrann" and q["redirect_uri"] == "http://localhost:1455/auth/callback"
    assert q["prompt"] == "login" and q["codex_cli_simplified_flow"] == "true"
    assert q["scope"] == "openid email profile offline_access"
    play_browser(port, "/auth/callback", q["state"], code="cx")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    form = oa.token_calls[0]
    assert form["grant_type"] == "authorization_code" and form["code"] == "cx"
    assert form["redirect_uri"] == "http://localhost:1455/auth/callback" and len(form["code_verifier"]) == 128
    saved = json.loads((auth / "codex-dev@example.com.json").read_text())
    assert saved["account_id"] == "acc-42" and saved["plan_type"] == "plus" and saved["type"] == "codex"
    assert stat.S_IMODE(os.stat(auth / "codex-dev@example.com.json").st_mode) == 0o600


def test_device_code_login(tmp_path, oa):
    auth, proc = run_login(tmp_path, oa, "--device")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "https://auth.openai.com/codex/device" in out and "ABCD-1234" in out and "left" in out
    assert oa.polls == 3
    form = oa.token_calls[0]
    assert form["code"] == "dev-code" and form["code_verifier"] == "dev-verifier"
    assert form["redirect_uri"] == "https://auth.openai.com/deviceauth/callback"
    assert json.loads((auth / "codex-dev@example.com.json").read_text())["access_token"] == "at-1"


def test_import_codex_cli_auth(tmp_path):
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    access = "h.%s.s" % base64.urlsafe_b64encode(json.dumps({"exp": 2000000000}).encode()).rstrip(b"=").decode()
    (home / ".codex" / "auth.json").write_text(json.dumps({"OPENAI_API_KEY": None, "tokens": {
        "id_token": id_token("cli@example.com"), "access_token": access, "refresh_token": "rt-cli",
        "account_id": "acc-42"}, "last_refresh": "2026-11-01T00:00:00Z"}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\n" % (tmp_path / "auth"))
    env = dict(os.environ, HOME=str(home))
    env.pop("CODEX_HOME", None)
    out = subprocess.run([sys.executable, LLM_MUX, "import", "--config", str(cfg)], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "imported Codex CLI credentials" in out.stdout and "skipped Claude Code: not found" in out.stdout
    saved = json.loads((tmp_path / "auth" / "codex-cli@example.com.json").read_text())
    assert saved["refresh_token"] == "rt-cli" and saved["account_id"] == "acc-42"
    assert saved["expired"] == "2033-05-18T03:33:20Z"
