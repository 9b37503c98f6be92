"""GitHub Copilot, Qwen and Cline accounts: logins as subprocesses (device codes and a pasted refresh token played by
the test), secondary and refreshed tokens, requests shaped per provider, quota errors."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.parse

import openai
import pytest

from harness import ROOT, wait_until, overrides_config
from fakes import FakeUpstream, Reply, openai_completion

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


class Fake:
    def __init__(self, endpoint_style="endpoints"):
        self.calls = []
        self.polls = 0
        self.exchanges = 0
        self.endpoint_style = endpoint_style
        self.qwen_quota = False
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        self.calls.append(r)
        p = r.path
        form = dict(urllib.parse.parse_qsl(r.body.decode())) if r.body and b"=" in r.body and b"{" not in r.body[:1] else {}
        if p == "/login/device/code":
            return Reply(body={"device_code": "gh-dev", "user_code": "WXYZ-1234", "verification_uri":
                               "https://github.com/login/device", "expires_in": 900, "interval": 1})
        if p == "/login/oauth/access_token":
            self.polls += 1
            if self.polls < 2:
                return Reply(body={"error": "authorization_pending"})
            return Reply(body={"access_token": "gho_user", "token_type": "bearer", "scope": "user:email"})
        if p == "/user":
            return Reply(body={"login": "octocat"})
        if p == "/copilot_internal/v2/token":
            assert r.headers["authorization"] == "token gho_user"
            self.exchanges += 1
            body = {"token": "tid=copilot-%d" % self.exchanges, "expires_at": int(time.time()) + 1500}
            if self.endpoint_style == "endpoints":
                body["endpoints"] = {"api": self.up.url + "/copilot-api"}
            else:
                body["endpoint"] = self.up.url + "/copilot-top"
            return Reply(body=body)
        if p.endswith("/chat/completions"):
            auth = r.headers.get("authorization", "")
            if self.qwen_quota and p.startswith("/qwen-res"):
                return Reply(status=403, body={"error": {"code": "insufficient_quota", "message": "free allocated quota exceeded"}})
            return Reply(body=openai_completion("%s via %s" % (p.split("/")[1], auth)))
        if p == "/api/v1/oauth2/device/code":
            return Reply(body={"device_code": "q-dev", "user_code": "QWEN-42", "verification_uri_complete":
                               "https://chat.qwen.ai/authorize?user_code=QWEN-42", "expires_in": 300, "interval": 1})
        if p == "/api/v1/oauth2/token":
            if form.get("grant_type") == "refresh_token":
                return Reply(body={"access_token": "q-at-2", "refresh_token": "q-rt-2", "expires_in": 7200,
                                   "resource_url": self.up.url.split("://")[1] + "/qwen-res2"})
            self.polls += 1
            if self.polls < 2:
                return Reply(status=400, body={"error": "authorization_pending"})
            self.qwen_form = form
            return Reply(body={"access_token": "q-at", "refresh_token": "q-rt", "expires_in": 6 * 3600,
                               "resource_url": "http://" + self.up.url.split("://")[1] + "/qwen-res"})
        if p == "/api/v1/auth/refresh":
            body = r.json
            if body["refreshToken"] == "bad":
                return Reply(body={"success": False, "error": "invalid refresh token"})
            return Reply(body={"success": True, "data": {"accessToken": "cl-at", "refreshToken": "cl-rt2",
                                                         "expiresAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
                                                             time.time() + 600)),
                                                         "userInfo": {"email": "dev@cline.test"}}})
        return Reply(status=404, body={"error": p})

    def config(self, auth):
        # a scheme-less resource_url gets https:// prepended: route that origin back to this plain-HTTP fake too
        hosts = ("https://github.com", "https://api.github.com", "https://chat.qwen.ai", "https://api.cline.bot",
                 self.up.url.replace("http://", "https://"))
        return overrides_config(self.up.url, hosts, auth)


@pytest.fixture
def fake():
    f = Fake()
    yield f
    f.up.stop()


def login(tmp_path, fake, provider, *args, stdin=None):
    auth = tmp_path / "auth"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(fake.config(auth))
    out = subprocess.run([sys.executable, LLM_MUX, "login", provider, "--config", str(cfg)] + list(args),
                         input=stdin, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, BROWSER="true"))
    assert out.returncode == 0, out.stderr
    return auth, out.stdout


def chat(gw, model):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}]).choices[0].message.content


def test_copilot_device_login_and_serving(tmp_path, fake, gateway):
    auth, out = login(tmp_path, fake, "copilot")
    assert "https://github.com/login/device" in out and "WXYZ-1234" in out and "left" in out
    saved = json.loads((auth / "github-copilot-octocat.json").read_text())
    assert saved["type"] == "github-copilot" and saved["access_token"] == "gho_user" and saved["username"] == "octocat"
    assert fake.exchanges == 1  # entitlement checked once at login
    gw = gateway(fake.config(auth))
    assert chat(gw, "gpt-4.1") == "copilot-api via Bearer tid=copilot-2"
    q = [c for c in fake.calls if c.path == "/copilot-api/chat/completions"][-1]
    h = q.headers
    assert h["copilot-integration-id"] == "vscode-chat" and h["editor-version"] == "vscode/1.104.1"
    assert h["openai-intent"] == "conversation-panel" and h["user-agent"] == "GithubCopilot/1.0" and h["x-request-id"]
    assert q.json["stream"] is False
    chat(gw, "gpt-4.1")
    assert fake.exchanges == 2  # the Copilot token is reused until 5 min before it expires


def test_copilot_top_level_endpoint_reading(tmp_path, gateway):
    fake = Fake(endpoint_style="top")
    try:
        auth = tmp_path / "auth"
        auth.mkdir()
        (auth / "github-copilot-o.json").write_text(json.dumps({"type": "github-copilot", "access_token": "gho_user",
                                                                "username": "o"}))
        gw = gateway(fake.config(auth))
        assert chat(gw, "gpt-4o").startswith("copilot-top via Bearer tid=copilot-")
    finally:
        fake.up.stop()


def test_qwen_device_login_with_pkce_resource_url_and_refresh(tmp_path, fake, gateway):
    auth, out = login(tmp_path, fake, "qwen", "--alias", "me")
    assert "QWEN-42" in out
    form = fake.qwen_form
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code" and form["device_code"] == "q-dev"
    device = [c for c in fake.calls if c.path == "/api/v1/oauth2/device/code"][0]
    dform = dict(urllib.parse.parse_qsl(device.body.decode()))
    challenge = base64.urlsafe_b64encode(hashlib.sha256(form["code_verifier"].encode()).digest()).rstrip(b"=")
    assert dform["code_challenge"] == challenge.decode() and dform["code_challenge_method"] == "S256"
    path = auth / "qwen-me.json"
    gw = gateway(fake.config(auth))
    assert chat(gw, "qwen3-coder-plus") == "qwen-res via Bearer q-at"
    h = [c for c in fake.calls if c.path.endswith("/chat/completions")][-1].headers
    assert h["x-dashscope-authtype"] == "qwen-oauth" and h["user-agent"].startswith("QwenCode/")
    # expire it: the refresh rotates the token and the resource_url
    meta = json.loads(path.read_text())
    meta["expired"] = "2020-01-01T00:00:00Z"
    seen = gw.output().count("auth dir changed")
    path.write_text(json.dumps(meta))
    wait_until(lambda: gw.output().count("auth dir changed") > seen, what="the edited file to be read")
    assert chat(gw, "qwen3-coder-plus") == "qwen-res2 via Bearer q-at-2"
    assert json.loads(path.read_text())["resource_url"].endswith("/qwen-res2")


def test_qwen_free_quota_is_a_rate_limit(tmp_path, fake, gateway):
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "qwen-x.json").write_text(json.dumps({"type": "qwen", "access_token": "q", "refresh_token": "r",
                                                  "resource_url": fake.up.url + "/qwen-res",
                                                  "expired": "2099-01-01T00:00:00Z"}))
    fake.qwen_quota = True
    gw = gateway(fake.config(auth) + "max-retry-interval: 0\n")
    with pytest.raises(openai.RateLimitError):
        chat(gw, "qwen3-coder-plus")


def test_cline_refresh_token_login_and_workos_bearer(tmp_path, fake, gateway):
    auth, out = login(tmp_path, fake, "cline", stdin="my-refresh-token\n")
    assert "Export Auth Token" in out and "dev@cline.test" in out
    saved = json.loads((auth / "cline-dev@cline.test.json").read_text())
    assert saved["access_token"] == "cl-at" and saved["refresh_token"] == "cl-rt2"
    assert [c.json for c in fake.calls if c.path == "/api/v1/auth/refresh"][0] == {
        "refreshToken": "my-refresh-token", "grantType": "refresh_token"}
    gw = gateway(fake.config(auth))
    assert chat(gw, "minimax/minimax-m2") == "api via Bearer workos:cl-at"
    bad = subprocess.run([sys.executable, LLM_MUX, "login", "cline", "--config", str(tmp_path / "c.yaml")],
                         input="bad\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "refused" in bad.stderr


def test_cline_token_is_refreshed_before_it_expires(tmp_path, fake, gateway):
    auth = tmp_path / "auth"
    auth.mkdir()
    path = auth / "cline-x.json"
    path.write_text(json.dumps({"type": "cline", "access_token": "old", "refresh_token": "rt-old",
                                "expired": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))}))
    gw = gateway(fake.config(auth))  # 60 s left: inside Cline's 2-minute lead
    # a token still good for a minute serves while its refresh runs; the refreshed one follows at once
    assert chat(gw, "minimax/minimax-m2") in ("api via Bearer workos:old", "api via Bearer workos:cl-at")
    wait_until(lambda: chat(gw, "minimax/minimax-m2") == "api via Bearer workos:cl-at", what="the refreshed token")
    assert [c.json for c in fake.calls if c.path == "/api/v1/auth/refresh"][0]["refreshToken"] == "rt-old"
    saved = json.loads(path.read_text())
    assert saved["access_token"] == "cl-at" and saved["refresh_token"] == "cl-rt2" and saved["email"] == "dev@cline.test"
