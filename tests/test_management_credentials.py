"""Credentials and logins through the management API: health (expiry, refresh, cooldowns with reasons, quota
windows the upstream reported, an on-demand probe), enable / disable / clear / refresh / delete / upload /
download, Vertex import, and the login flows of `llm-mux login` driven from the API (device code, browser with
the callback or a pasted redirect URL, cancel, unknown provider)."""
import asyncio
import json
import os
import time
import urllib.parse
import uuid

import anthropic
import pytest

import llm_mux
from fakes import FakeUpstream, Reply, free_port
from harness import overrides_config, play_browser, wait_until
from test_copilot_qwen_cline import Fake as FakeDeviceProviders
from test_management_api import KEY, call

MODEL = "claude-sonnet-4-5-20250929"
MGMT = "remote-management: {secret-key: %s}\n" % KEY


class FakeAnthropic:
    """api.anthropic.com (messages with the unified rate-limit headers, the OAuth usage endpoint) and the token
    endpoint of platform.claude.com."""

    def __init__(self):
        self.limited = False
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        if r.path.startswith("/v1/messages"):
            if self.limited:
                return Reply(status=429, body={"type": "error", "error": {"type": "rate_limit_error",
                                                                          "message": "5-hour limit reached"}},
                             headers={"anthropic-ratelimit-unified-5h-status": "rejected",
                                      "anthropic-ratelimit-unified-5h-reset": str(int(time.time()) + 3600)})
            return Reply(body={"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                               "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                               "usage": {"input_tokens": 3, "output_tokens": 2}},
                         headers={"anthropic-ratelimit-unified-5h-utilization": "0.42",
                                  "anthropic-ratelimit-unified-5h-reset": str(int(time.time()) + 7200),
                                  "anthropic-ratelimit-unified-5h-status": "allowed",
                                  "anthropic-ratelimit-unified-7d-utilization": "0.1",
                                  "anthropic-ratelimit-unified-7d-reset": str(int(time.time()) + 86400 * 3)})
        if r.path == "/api/oauth/usage":
            return Reply(body={"five_hour": {"utilization": 55.0, "resets_at": "2030-01-01T00:00:00Z"},
                               "seven_day": {"utilization": 12.5, "resets_at": "2030-01-05T00:00:00Z"}})
        if r.path == "/v1/oauth/token":
            body = r.json
            if body.get("grant_type") == "authorization_code":
                if body["code"] != "good-code":
                    return Reply(status=400, body={"error": "invalid_grant", "error_description": "bad code"})
                return Reply(body={"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 28800,
                                   "account": {"email_address": "new@example.com", "uuid": "u1"}})
            return Reply(body={"access_token": "at-refreshed", "refresh_token": "rt-2", "expires_in": 28800,
                               "account": {"email_address": "me@example.com"}})
        return Reply(status=404, body={"error": r.path})

    def config(self, auth):
        return overrides_config(self.up.url, ["https://api.anthropic.com", "https://platform.claude.com"], auth)


@pytest.fixture
def fake():
    f = FakeAnthropic()
    yield f
    f.up.stop()


def write_claude(auth, name="claude-me@example.com.json"):
    os.makedirs(auth, exist_ok=True)
    path = os.path.join(auth, name)
    with open(path, "w") as f:
        json.dump({"type": "claude", "email": "me@example.com", "access_token": "at-good", "refresh_token": "rt-1",
                   "expired": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 8 * 3600))}, f)
    os.chmod(path, 0o600)
    return path


def ask(gw):
    return anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=20).messages.create(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}])


def entry(gw, name="claude-me@example.com.json"):
    files = call(gw, "GET", "/auth-files")[1]["files"]
    return [f for f in files if f["name"] == name][0]


def test_health_shows_expiry_quota_windows_and_cooldowns(gateway, fake, tmp_path):
    auth = str(tmp_path / "auth")
    write_claude(auth)
    gw = gateway(fake.config(auth) + MGMT)
    ask(gw)
    e = entry(gw)
    assert e["provider"] == "claude" and e["status"] == "active" and e["email"] == "me@example.com"
    assert e["expires_in_seconds"] > 7 * 3600 and e["quota_probe"] is True
    assert e["quota"]["five_hour"]["used_percent"] == 42.0 and e["quota"]["seven_day"]["used_percent"] == 10.0
    assert e["recent"]["requests"] == 1 and e["recent"]["tokens"] == 5 and e["recent"]["window_seconds"] == 300
    assert "at-good" not in json.dumps(e) and "rt-1" not in json.dumps(e)  # no token in the listing
    fake.limited = True
    with pytest.raises(anthropic.RateLimitError):
        ask(gw)
    e = entry(gw)
    assert e["status"] == "cooling" and e["cooldowns"][0]["model"] == "*"
    assert 3500 < e["cooldowns"][0]["seconds_left"] <= 3700 and "5-hour limit" in e["cooldowns"][0]["reason"]
    assert call(gw, "POST", "/auth-files/reset?name=claude-me@example.com.json") == (200, {"status": "ok"})
    e = entry(gw)
    assert e["status"] == "active" and e["cooldowns"] == []
    status, body = call(gw, "GET", "/auth-files/quota?name=claude-me@example.com.json")
    assert status == 200 and body["quota"]["five_hour"]["used_percent"] == 55.0
    assert entry(gw)["quota"]["seven_day"]["resets_at"] == "2030-01-05T00:00:00Z"


def test_disable_enable_refresh_download_delete(gateway, fake, tmp_path):
    auth = str(tmp_path / "auth")
    path = write_claude(auth)
    gw = gateway(fake.config(auth) + MGMT)
    name = "claude-me@example.com.json"
    assert call(gw, "PATCH", "/auth-files/status", {"name": name, "disabled": True})[0] == 200
    assert json.load(open(path))["disabled"] is True and entry(gw)["status"] == "disabled"
    with pytest.raises(anthropic.APIStatusError):
        ask(gw)
    assert call(gw, "PATCH", "/auth-files/status", {"name": name, "disabled": False})[0] == 200
    assert "disabled" not in json.load(open(path)) and ask(gw).content[0].text == "hi"
    status, body = call(gw, "POST", "/auth-files/refresh?name=" + name)
    assert status == 200 and body["last_refresh"] and json.load(open(path))["access_token"] == "at-refreshed"
    status, raw = call(gw, "GET", "/auth-files/download?name=" + name)
    assert status == 200 and raw["refresh_token"] == "rt-2"  # the one place a token is shown
    assert call(gw, "GET", "/auth-files/download?name=../config.yaml")[0] == 400
    assert call(gw, "PATCH", "/auth-files/status", {"name": "nope.json", "disabled": True})[0] == 404
    assert call(gw, "PATCH", "/auth-files/status", {"name": name, "disabled": "yes"})[0] == 400
    assert call(gw, "DELETE", "/auth-files?name=" + name) == (200, {"status": "ok", "deleted": 1})
    assert not os.path.exists(path) and call(gw, "GET", "/auth-files")[1]["files"] == []
    assert call(gw, "DELETE", "/auth-files?name=" + name)[0] == 404


def test_upload_multipart_and_raw_and_broken_files(gateway, fake, tmp_path):
    auth = str(tmp_path / "auth")
    gw = gateway(fake.config(auth) + MGMT)
    good = json.dumps({"type": "claude", "email": "up@example.com", "access_token": "at-good",
                       "expired": "2099-01-01T00:00:00Z"}).encode()
    boundary = uuid.uuid4().hex
    body = b"".join(b"--%s\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%s\"\r\n"
                    b"Content-Type: application/json\r\n\r\n%s\r\n" % (boundary.encode(), n, data)
                    for n, data in ((b"claude-up.json", good), (b"bad.json", b"{not json"), (b"x.txt", b"{}")))
    body += b"--%s--\r\n" % boundary.encode()
    status, out = call(gw, "POST", "/auth-files", raw=body,
                       headers={"Content-Type": "multipart/form-data; boundary=" + boundary})
    assert status == 207 and [r["status"] for r in out["results"]] == ["ok", "error", "error"]
    assert "not valid JSON" in out["results"][1]["message"] and ".json" in out["results"][2]["message"]
    assert oct(os.stat(os.path.join(auth, "claude-up.json")).st_mode & 0o777) == "0o600"
    assert entry(gw, "claude-up.json")["email"] == "up@example.com"  # in rotation at once
    assert ask(gw).content[0].text == "hi"
    status, out = call(gw, "POST", "/auth-files?name=other.json", raw=json.dumps({"type": "nosuch"}).encode())
    assert status == 400 and "unknown credential type" in out["error"]
    assert not os.path.exists(os.path.join(auth, "other.json"))
    with open(os.path.join(auth, "broken.json"), "w") as f:
        f.write("{")
    wait_until(lambda: any(f["name"] == "broken.json" for f in call(gw, "GET", "/auth-files")[1]["files"]),
               what="the broken file to be listed")
    assert entry(gw, "broken.json")["status"] == "error" and "JSON" in entry(gw, "broken.json")["status_message"]
    assert call(gw, "POST", "/auth-files", raw=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})[0] == 400


def test_vertex_import_json_and_multipart(gateway, fake, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    sa = {"type": "service_account", "project_id": "my-proj", "client_email": "sa@my-proj.iam.gserviceaccount.com",
          "private_key": pem}
    auth = str(tmp_path / "auth")
    gw = gateway(fake.config(auth) + MGMT)
    status, body = call(gw, "POST", "/vertex/import", {"credentials": sa, "location": "europe-west4"})
    assert status == 200 and body["project_id"] == "my-proj" and body["location"] == "europe-west4"
    meta = json.load(open(os.path.join(auth, "vertex-my-proj.json")))
    assert meta["type"] == "vertex" and meta["service_account"]["client_email"] == sa["client_email"]
    status, body = call(gw, "POST", "/vertex/import", {"credentials": dict(sa, private_key="nope")})
    assert status == 400 and "private key" in body["error"]
    status, body = call(gw, "POST", "/vertex/import", {"credentials": {"type": "authorized_user"}})
    assert status == 400 and "service-account" in body["error"]
    assert "nope" not in gw.output() and pem[40:80] not in gw.output()


def test_device_login_from_the_api(gateway, tmp_path):
    dev = FakeDeviceProviders()
    try:
        auth = str(tmp_path / "auth")
        gw = gateway(dev.config(auth) + MGMT)
        status, body = call(gw, "POST", "/oauth/start", {"provider": "github-copilot"})
        assert status == 200 and body["flow_type"] == "device" and body["user_code"] == "WXYZ-1234"
        assert body["verification_url"] == "https://github.com/login/device"
        state = body["state"]
        wait_until(lambda: call(gw, "GET", "/oauth/status/" + state)[1]["status"] != "pending", timeout=20,
                   what="the device login to finish")
        done = call(gw, "GET", "/oauth/status/" + state)[1]
        assert done["status"] == "completed" and done["file"] == "github-copilot-octocat.json"
        assert entry(gw, "github-copilot-octocat.json")["provider"] == "github-copilot"
        assert call(gw, "POST", "/oauth/cancel/" + state)[0] == 404  # finished: nothing to cancel
        # Cline: the exported refresh token pasted through the API
        status, body = call(gw, "POST", "/oauth/start", {"provider": "cline"})
        assert status == 200 and body["flow_type"] == "token" and "refresh token" in body["prompt"]
        assert call(gw, "POST", "/oauth/callback", {"state": body["state"], "token": "cl-rt"})[0] == 200
        wait_until(lambda: call(gw, "GET", "/oauth/status/" + body["state"])[1]["status"] == "completed",
                   what="the Cline login")
        assert entry(gw, call(gw, "GET", "/oauth/status/" + body["state"])[1]["file"])["provider"] == "cline"
        status, body = call(gw, "POST", "/oauth/start", {"provider": "cline"})
        call(gw, "POST", "/oauth/callback", {"state": body["state"], "token": "bad"})
        wait_until(lambda: call(gw, "GET", "/oauth/status/" + body["state"])[1]["status"] == "failed",
                   what="the refused token")
        assert "invalid refresh token" in call(gw, "GET", "/oauth/status/" + body["state"])[1]["error"]
    finally:
        dev.up.stop()


def test_browser_login_by_callback_and_by_pasted_url(gateway, fake, tmp_path):
    auth = str(tmp_path / "auth")
    gw = gateway(fake.config(auth) + MGMT)
    port = free_port()
    status, body = call(gw, "POST", "/oauth/start", {"provider": "anthropic", "callback_port": port})
    assert status == 200 and body["flow_type"] == "browser" and body["provider"] == "claude"
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(body["auth_url"]).query))
    assert q["state"] == body["state"] and q["code_challenge_method"] == "S256" and "code_verifier" not in body
    assert b"login complete" in play_browser(port, "/callback", body["state"], code="good-code")
    wait_until(lambda: call(gw, "GET", "/oauth/status/" + body["state"])[1]["status"] == "completed",
               what="the login to complete")
    assert json.load(open(os.path.join(auth, "claude-new@example.com.json")))["access_token"] == "at-new"
    # the same flow with the redirect URL pasted through the API (the callback port busy or on another machine)
    status, body = call(gw, "POST", "/oauth/start", {"provider": "claude", "callback_port": port})
    redirect = "http://localhost:54545/callback?code=bad-code&state=" + body["state"]
    assert call(gw, "POST", "/oauth/callback", {"state": body["state"], "redirect_url": redirect}) == (200, {"status": "ok"})
    wait_until(lambda: call(gw, "GET", "/oauth/status/" + body["state"])[1]["status"] == "failed", what="failure")
    assert "invalid_grant" in call(gw, "GET", "/oauth/status/" + body["state"])[1]["error"]
    status, body = call(gw, "POST", "/oauth/start", {"provider": "claude", "callback_port": port})
    foreign = "http://localhost:54545/callback?code=good-code&state=someone-else"
    assert call(gw, "POST", "/oauth/callback", {"state": body["state"], "redirect_url": foreign})[0] == 400
    assert call(gw, "POST", "/oauth/cancel/" + body["state"]) == (200, {"status": "ok"})
    wait_until(lambda: call(gw, "GET", "/oauth/status/" + body["state"])[1]["status"] == "cancelled", what="cancel")
    assert call(gw, "POST", "/oauth/start", {"provider": "nosuch"})[0] == 400
    assert call(gw, "POST", "/oauth/start", {})[0] == 400
    assert call(gw, "GET", "/oauth/status/unknown")[0] == 404


def test_a_device_login_nobody_finishes_times_out_on_the_gateways_clock(tmp_path):
    """The poll loop sleeps on the gateway's clock: a fake clock runs the 300 s of Qwen's code in a blink."""
    from harness import GatewayThread
    pending = FakeUpstream(lambda r: Reply(body={"device_code": "q-dev", "user_code": "QWEN-42",
                                                 "verification_uri_complete": "https://chat.qwen.ai/authorize",
                                                 "expires_in": 300, "interval": 5})
                           if r.path.endswith("/device/code") else
                           Reply(status=400, body={"error": "authorization_pending"})).start()
    g = GatewayThread(overrides_config(pending.url, ["https://chat.qwen.ai"], str(tmp_path / "auth")))
    try:
        sessions = llm_mux.LoginSessions(g.gateway)
        view = g.run(sessions.start({"provider": "qwen"}))
        assert view["status"] == "pending" and view["user_code"] == "QWEN-42"
        g.run(asyncio.wait([sessions.sessions[view["state"]].task], timeout=20))
        done = sessions.status(view["state"])
        assert done["status"] == "failed" and "timed out" in done["error"]
        assert 290 <= sum(g.clock.sleeps) <= 305 and not os.path.exists(str(tmp_path / "auth"))  # nothing written
        g.clock.t += sessions.KEEP + 1
        with pytest.raises(llm_mux.ManagementError):
            sessions.status(view["state"])  # forgotten once it has been over for a while
    finally:
        g.stop()
        pending.stop()
