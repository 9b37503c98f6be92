"""Gemini CLI accounts (Cloud Code Assist): the v1internal envelope, unwrapped answers and streams, Google's refresh
grant, and several projects per account rotated on quota (quota-exceeded.switch-project)."""
import json
import os
import time
import urllib.parse

import openai
import pytest
from google import genai
from google.genai import types as gtypes

from fakes import FakeUpstream, Reply


class FakeCloudCode:
    def __init__(self):
        self.refreshes = []
        self.exhausted = set()
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        if r.path == "/token":
            self.refreshes.append(dict(urllib.parse.parse_qsl(r.body.decode())))
            return Reply(body={"access_token": "ya29.new", "expires_in": 3599, "token_type": "Bearer"})
        if not r.headers.get("authorization", "").startswith("Bearer ya29."):
            return Reply(status=401, body={"error": {"code": 401, "message": "bad token", "status": "UNAUTHENTICATED"}})
        body = r.json
        if body.get("project") in self.exhausted:
            return Reply(status=429, body={"error": {"code": 429, "message": "Resource has been exhausted",
                                                     "status": "RESOURCE_EXHAUSTED"}})
        inner = {"candidates": [{"content": {"role": "model", "parts": [{"text": "from " + body["project"]}]},
                                 "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 2,
                                                                              "candidatesTokenCount": 2}}
        if r.path.endswith(":streamGenerateContent?alt=sse"):
            first = {"candidates": [{"content": {"role": "model", "parts": [{"text": "from "}]}}]}
            last = dict(inner)
            last["candidates"] = [{"content": {"role": "model", "parts": [{"text": body["project"]}]},
                                   "finishReason": "STOP"}]
            return Reply("sse", events=[json.dumps({"response": first, "traceId": "t"}),
                                        json.dumps({"response": last, "traceId": "t"})])
        return Reply(body={"response": inner, "traceId": "t"})

    def config(self, auth):
        return ('auth-dir: %s\nupstream-overrides:\n  "https://cloudcode-pa.googleapis.com": "%s"\n'
                '  "https://oauth2.googleapis.com": "%s"\n' % (auth, self.up.url, self.up.url))


@pytest.fixture
def cc():
    f = FakeCloudCode()
    yield f
    f.up.stop()


def write_gemini(auth, projects="proj-a", access="ya29.old", expires_in=3600):
    os.makedirs(auth, exist_ok=True)
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expires_in))
    meta = {"type": "gemini", "email": "g@example.com", "project_id": projects, "auto": False, "checked": True,
            "token": {"access_token": access, "token_type": "Bearer", "refresh_token": "1//rt", "expiry": expiry,
                      "token_uri": "https://oauth2.googleapis.com/token",
                      "client_id": "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
                      "client_secret": "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", "scopes": []}}
    path = os.path.join(auth, "g@example.com-%s.json" % projects.replace(",", "_"))
    with open(path, "w") as f:
        json.dump(meta, f)
    return path


def chat(gw, model="gemini-2.5-pro", text="hi"):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}])


def test_requests_use_the_v1internal_envelope(gateway, cc, tmp_path):
    auth = str(tmp_path / "auth")
    write_gemini(auth, access="ya29.ok")
    gw = gateway(cc.config(auth))
    assert chat(gw).choices[0].message.content == "from proj-a"
    q = cc.up.requests[-1]
    assert q.path == "/v1internal:generateContent"
    assert q.headers["authorization"] == "Bearer ya29.ok" and q.headers["user-agent"] == "google-api-nodejs-client/9.15.1"
    assert q.headers["client-metadata"] == "ideType=IDE_UNSPECIFIED,platform=PLATFORM_UNSPECIFIED,pluginType=GEMINI"
    assert q.json["model"] == "gemini-2.5-pro" and q.json["project"] == "proj-a"
    assert q.json["request"]["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    text = "".join(ch.text or "" for ch in c.models.generate_content_stream(model="gemini-2.5-pro", contents="hi"))
    assert text == "from proj-a"
    assert cc.up.requests[-1].path == "/v1internal:streamGenerateContent?alt=sse"


def test_expired_token_uses_googles_refresh_grant(gateway, cc, tmp_path):
    auth = str(tmp_path / "auth")
    path = write_gemini(auth, access="expired", expires_in=-30)
    gw = gateway(cc.config(auth))
    assert chat(gw).choices[0].message.content == "from proj-a"
    assert cc.refreshes == [{"grant_type": "refresh_token", "refresh_token": "1//rt",
                             "client_id": "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
                             "client_secret": "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"}]
    saved = json.load(open(path))
    assert saved["token"]["access_token"] == "ya29.new" and saved["access_token"] == "ya29.new"
    assert saved["token"]["refresh_token"] == "1//rt"


def test_several_projects_rotate_on_quota(gateway, cc, tmp_path):
    auth = str(tmp_path / "auth")
    write_gemini(auth, projects="proj-a,proj-b", access="ya29.ok")
    gw = gateway(cc.config(auth))
    served = {chat(gw, text="c%d" % i).choices[0].message.content for i in range(6)}
    assert served == {"from proj-a", "from proj-b"}  # two virtual credentials share the load
    cc.exhausted.add("proj-a")
    for i in range(4):
        assert chat(gw, text="d%d" % i).choices[0].message.content == "from proj-b"  # switch-project


def test_without_switch_project_the_account_cools_as_a_whole(gateway, cc, tmp_path):
    auth = str(tmp_path / "auth")
    write_gemini(auth, projects="proj-a,proj-b", access="ya29.ok")
    cc.exhausted.add("proj-a")
    gw = gateway(cc.config(auth) + "quota-exceeded: {switch-project: false}\nrequest-retry: 3\nmax-retry-interval: 0\n")
    outcomes = []
    for i in range(4):
        try:
            outcomes.append(chat(gw, text="e%d" % i).choices[0].message.content)
        except openai.RateLimitError:
            outcomes.append(429)
            break
    assert outcomes[-1] == 429  # once proj-a hits its quota, proj-b is not used as an escape
    after = [q.json.get("project") for q in cc.up.requests][[q.json.get("project") for q in cc.up.requests].index("proj-a"):]
    assert after == ["proj-a"]


def test_with_switch_project_the_other_project_serves_at_once(gateway, cc, tmp_path):
    auth = str(tmp_path / "auth")
    write_gemini(auth, projects="proj-a,proj-b", access="ya29.ok")
    cc.exhausted.add("proj-a")
    gw = gateway(cc.config(auth) + "request-retry: 3\nmax-retry-interval: 0\n")
    assert all(chat(gw, text="f%d" % i).choices[0].message.content == "from proj-b" for i in range(4))
