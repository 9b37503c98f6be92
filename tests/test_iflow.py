"""iFlow: the OAuth login with its user-info exchange (subprocess, browser played by the test), the cookie login,
signed requests, and refresh on both paths."""
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import openai
import pytest

from harness import ROOT, play_browser, read_login_url, wait_until, overrides_config
from fakes import FakeUpstream, Reply, free_port, openai_completion

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


class FakeIFlow:
    def __init__(self):
        self.calls = []
        self.n = 0
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        self.calls.append(r)
        if r.path == "/oauth/token":
            assert r.headers["authorization"].startswith("Basic ")
            self.n += 1
            return Reply(body={"access_token": "if-at-%d" % self.n, "refresh_token": "if-rt-%d" % self.n,
                               "expires_in": 7 * 86400, "token_type": "bearer", "scope": "all"})
        if r.path.startswith("/api/oauth/getUserInfo"):
            tok = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(r.path).query))["accessToken"]
            return Reply(body={"success": True, "data": {"apiKey": "sk-if-" + tok, "email": "i@flow.cn"}})
        if r.path == "/api/openapi/apikey":
            assert "BXAuth=" in r.headers["cookie"]
            return Reply(body={"success": True, "data": {"name": "cookie-user", "apiKey": "sk-cookie-%s" % r.method,
                                                         "expireTime": "2030-01-01 00:00"}})
        if r.path == "/v1/chat/completions":
            key = r.headers["authorization"][7:]
            sig = hmac.new(key.encode(), ("iFlow-Cli:%s:%s" % (r.headers["session-id"], r.headers["x-iflow-timestamp"]))
                           .encode(), hashlib.sha256).hexdigest()
            assert sig == r.headers["x-iflow-signature"] and r.headers["user-agent"] == "iFlow-Cli"
            return Reply(body=openai_completion("served with " + key))
        return Reply(status=404, body={"error": r.path})

    def config(self, auth):
        hosts = ("https://iflow.cn", "https://platform.iflow.cn", "https://apis.iflow.cn")
        return overrides_config(self.up.url, hosts, auth)


@pytest.fixture
def ifl():
    f = FakeIFlow()
    yield f
    f.up.stop()


def chat(gw, model="glm-4.6", **kw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **kw).choices[0].message.content


def test_oauth_login_then_signed_requests_and_refresh(tmp_path, ifl, gateway):
    auth = tmp_path / "auth"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ifl.config(auth))
    port = free_port()
    proc = subprocess.Popen([sys.executable, LLM_MUX, "login", "iflow", "--config", str(cfg), "--callback-port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, BROWSER="true", PYTHONUNBUFFERED="1"))
    url = read_login_url(proc, "https://iflow.cn/oauth?")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["redirect"] == "http://localhost:11451/oauth2callback" and q["client_id"] == "10009311001"
    play_browser(port, "/oauth2callback", q["state"], code="c1")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    path = auth / "iflow-i@flow.cn.json"
    saved = json.loads(path.read_text())
    assert saved["api_key"] == "sk-if-if-at-1" and saved["refresh_token"] == "if-rt-1"
    gw = gateway(ifl.config(auth))
    assert chat(gw, reasoning_effort="high") == "served with sk-if-if-at-1"
    body = [c for c in ifl.calls if c.path == "/v1/chat/completions"][-1].json
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "clear_thinking": False}
    saved["expired"] = "2020-01-01T00:00:00Z"
    seen = gw.output().count("auth dir changed")
    path.write_text(json.dumps(saved))
    wait_until(lambda: gw.output().count("auth dir changed") > seen, what="the edited file to be read")
    assert chat(gw) == "served with sk-if-if-at-2"  # refreshed, then user info again for the new key


def test_cookie_login_and_cookie_renewal(tmp_path, ifl, gateway):
    auth = tmp_path / "auth"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ifl.config(auth))
    out = subprocess.run([sys.executable, LLM_MUX, "login", "iflow", "--config", str(cfg), "--cookie",
                          "BXAuth=abc;  other=1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    path = auth / "iflow-cookie-user.json"
    saved = json.loads(path.read_text())
    assert saved["api_key"] == "sk-cookie-GET" and saved["cookie"] == "BXAuth=abc; other=1;"
    saved["expired"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 30 * 3600))  # within 48 h
    path.write_text(json.dumps(saved))
    gw = gateway(ifl.config(auth))
    # the start-up sweep renews a cookie key due within 48 h; until it has, the old key (still valid) serves
    wait_until(lambda: json.loads(path.read_text())["api_key"] == "sk-cookie-POST", what="the cookie renewal")
    assert chat(gw) == "served with sk-cookie-POST"
    bad = subprocess.run([sys.executable, LLM_MUX, "login", "iflow", "--config", str(cfg), "--cookie", "nope=1"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "BXAuth" in bad.stderr
