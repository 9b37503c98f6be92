"""Google-account logins (Gemini CLI and Antigravity) as subprocesses with the browser played by the test, project
discovery and onboarding, Antigravity's request envelope and refresh, and import of Gemini CLI's oauth_creds.json."""
import base64
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import openai
import pytest

from harness import ROOT, play_browser, read_login_url, overrides_config
from fakes import FakeUpstream, Reply, free_port

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


class FakeGoogle:
    def __init__(self, assigned_project="cc-proj-1", needs_onboarding=False):
        self.calls = []
        self.assigned, self.needs_onboarding = assigned_project, needs_onboarding
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        self.calls.append((r.path, r.body))
        if r.path == "/token":
            form = dict(urllib.parse.parse_qsl(r.body.decode()))
            if form["grant_type"] == "refresh_token":
                return Reply(body={"access_token": "ya29.refreshed", "expires_in": 3600, "token_type": "Bearer"})
            return Reply(body={"access_token": "ya29.login", "refresh_token": "1//login", "expires_in": 3600,
                               "token_type": "Bearer"})
        if r.path.startswith("/oauth2/v1/userinfo"):
            return Reply(body={"email": "g@example.com", "verified_email": True})
        if r.path.startswith("/v1/projects/") and "/services/cloudaicompanion.googleapis.com" in r.path:
            if r.path.endswith(":enable"):
                self.enabled = getattr(self, "enabled", []) + [r.path.split("/")[3]]
                return Reply(body={"done": True})
            return Reply(body={"state": "ENABLED" if r.path.split("/")[3] == "p-one" else "DISABLED"})
        if r.path == "/v1/projects":
            return Reply(body={"projects": [{"projectId": "p-one"}, {"projectId": "p-two"}]})
        if r.path == "/v1internal:loadCodeAssist":
            body = r.json
            if body.get("cloudaicompanionProject") or self.needs_onboarding:
                return Reply(body={"allowedTiers": [{"id": "free-tier", "isDefault": True}]})
            return Reply(body={"cloudaicompanionProject": self.assigned, "currentTier": {"id": "standard-tier"}})
        if r.path == "/v1internal:onboardUser":
            body = r.json
            return Reply(body={"done": True, "response": {"cloudaicompanionProject": {
                "id": body.get("cloudaicompanionProject") or self.assigned}}})
        if r.path.startswith("/v1internal:"):
            env = r.json
            return Reply(body={"response": {"candidates": [{"content": {"role": "model", "parts": [
                {"text": "ag:%s:%s" % (env["project"], env["model"])}]}, "finishReason": "STOP"}]}})
        return Reply(status=404, body={"error": {"message": r.path}})

    def config(self, auth):
        hosts = ("https://oauth2.googleapis.com", "https://www.googleapis.com", "https://cloudcode-pa.googleapis.com",
                 "https://daily-cloudcode-pa.googleapis.com", "https://cloudresourcemanager.googleapis.com",
                 "https://serviceusage.googleapis.com")
        return overrides_config(self.up.url, hosts, auth)


def login(tmp_path, google, name, path, *args):
    auth = tmp_path / "auth"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(google.config(auth))
    port = free_port()
    proc = subprocess.Popen([sys.executable, LLM_MUX, "login", name, "--config", str(cfg), "--callback-port",
                             str(port)] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, BROWSER="true", PYTHONUNBUFFERED="1"))
    url = read_login_url(proc, "https://accounts.google.com/")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    play_browser(port, path, q["state"], code="gcode")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return q, auth, out


def test_gemini_login_with_all_projects(tmp_path):
    g = FakeGoogle()
    try:
        q, auth, out = login(tmp_path, g, "gemini", "/oauth2callback", "--project", "ALL")
        assert q["redirect_uri"] == "http://localhost:8085/oauth2callback" and q["access_type"] == "offline"
        assert q["prompt"] == "consent" and "code_challenge" not in q
        assert q["client_id"].startswith("681255809395-")
        saved = json.loads((auth / "gemini-g@example.com-all.json").read_text())
        assert saved["type"] == "gemini" and saved["project_id"] == "p-one,p-two"
        assert saved["token"]["refresh_token"] == "1//login" and saved["token"]["access_token"] == "ya29.login"
        assert "Logged in as g@example.com" in out
        onboarded = [json.loads(b)["cloudaicompanionProject"] for p, b in g.calls if p == "/v1internal:onboardUser"]
        assert onboarded == ["p-one", "p-two"]
        assert g.enabled == ["p-two"]  # the API was enabled where it was not (p-one already had it)
    finally:
        g.up.stop()


def test_gemini_login_discovers_the_accounts_project(tmp_path):
    g = FakeGoogle()
    try:
        q, auth, out = login(tmp_path, g, "gemini", "/oauth2callback")
        assert json.loads((auth / "gemini-g@example.com-cc-proj-1.json").read_text())["project_id"] == "cc-proj-1"
    finally:
        g.up.stop()


def test_antigravity_login_onboards_a_new_account_and_serves(tmp_path, gateway):
    g = FakeGoogle(assigned_project="ag-proj", needs_onboarding=True)
    try:
        q, auth, out = login(tmp_path, g, "antigravity", "/oauth-callback")
        assert q["redirect_uri"] == "http://localhost:51121/oauth-callback"
        assert "https://www.googleapis.com/auth/cclog" in q["scope"]
        path = auth / "antigravity-g_example_com.json"
        saved = json.loads(path.read_text())
        assert saved["project_id"] == "ag-proj" and saved["type"] == "antigravity" and saved["timestamp"] > 0
        # make the token expired so the first request refreshes it, then serve through the envelope
        saved["expired"] = "2020-01-01T00:00:00Z"
        path.write_text(json.dumps(saved))
        gw = gateway(g.config(auth))
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        for _ in range(2):
            r = c.chat.completions.create(model="gemini-3-flash", messages=[{"role": "user", "content": "hi"}],
                                          tools=[{"type": "function", "function": {"name": "f"}}])
            assert r.choices[0].message.content == "ag:ag-proj:gemini-3-flash"
        sent = [(p, json.loads(b)) for p, b in g.calls if p == "/v1internal:generateContent"]
        env = sent[0][1]
        assert env["userAgent"] == "antigravity" and env["requestType"] == "agent"
        assert env["requestId"].startswith("agent-") and env["request"]["sessionId"].startswith("-")
        assert "safetySettings" not in env["request"]
        assert env["request"]["toolConfig"]["functionCallingConfig"]["mode"] == "VALIDATED"
        assert json.loads(path.read_text())["access_token"] == "ya29.refreshed"
    finally:
        g.up.stop()


def test_import_gemini_cli_oauth_creds(tmp_path):
    home = tmp_path / "home"
    (home / ".gemini").mkdir(parents=True)
    idt = "h.%s.s" % base64.urlsafe_b64encode(json.dumps({"email": "cli@example.com"}).encode()).rstrip(b"=").decode()
    (home / ".gemini" / "oauth_creds.json").write_text(json.dumps({
        "access_token": "ya29.x", "refresh_token": "1//y", "scope": "openid", "token_type": "Bearer",
        "id_token": idt, "expiry_date": 1900000000000}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\n" % (tmp_path / "auth"))
    env = dict(os.environ, HOME=str(home), GOOGLE_CLOUD_PROJECT="my-proj")
    out = subprocess.run([sys.executable, LLM_MUX, "import", "--config", str(cfg)], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "imported Gemini CLI credentials" in out.stdout
    saved = json.loads((tmp_path / "auth" / "gemini-cli@example.com-my-proj.json").read_text())
    assert saved["project_id"] == "my-proj" and saved["token"]["refresh_token"] == "1//y"
    assert saved["token"]["expiry"] == "2030-03-17T17:46:40Z"


def test_antigravity_quota_groups_cool_a_whole_model_family(gateway, tmp_path):
    calls = []

    def handler(r):
        calls.append(r.json["model"])
        return Reply(status=429, body={"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message":
                                                 "quota will reset after 600s"}})
    up = FakeUpstream(handler).start()
    try:
        auth = tmp_path / "auth"
        auth.mkdir()
        (auth / "antigravity-a.json").write_text(json.dumps({
            "type": "antigravity", "email": "a@x", "project_id": "p", "access_token": "ya29", "refresh_token": "r",
            "expired": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))}))
        gw = gateway("auth-dir: %s\nrequest-retry: 0\nmax-retry-interval: 0\nupstream-overrides:\n"
                     '  "https://cloudcode-pa.googleapis.com": "%s"\n  "https://daily-cloudcode-pa.googleapis.com": "%s"\n'
                     % (auth, up.url, up.url))
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="gemini-3-flash", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="gemini-3.1-pro-low", messages=[{"role": "user", "content": "x"}])
        assert calls == ["gemini-3-flash"]  # the sibling model was not even tried
        assert 595 <= int(e.value.response.headers["retry-after"]) <= 600
    finally:
        up.stop()
