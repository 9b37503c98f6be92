"""Every client format on every subscription provider (Claude, Codex, Gemini CLI, Antigravity, Vertex service
account), through credential files in auth-dir and one fake that plays each provider's API."""
import json
import os
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import upstreams
from conftest import Gateway
from fakes import FakeUpstream, Reply
from test_formats_e2e import CALL

EXPECTED = {"m-claude": "Hello from anthropic", "m-codex": "Hello from codex", "m-gcli": "Hello from gemini",
            "m-ag": "Hello from gemini", "m-vertex": "Hello from gemini"}


def wrap_cloud_code(reply):
    """Cloud Code wraps every answer and stream chunk in {"response": ...}."""
    if reply.kind == "json" and reply.status == 200:
        reply.body = {"response": reply.body, "traceId": "t"}
    elif reply.kind in ("sse", "drop"):
        reply.events = [json.dumps({"response": json.loads(e), "traceId": "t"}) if isinstance(e, str) else e
                        for e in reply.events]
    return reply


def handler(r):
    sc = upstreams.scenario(r.body)
    p = r.path
    if p == "/token":
        return Reply(body={"access_token": "ya29.sa", "expires_in": 3600})
    if p.startswith("/v1/messages"):
        return upstreams.ANTHROPIC(sc, bool(r.json.get("stream")))
    if p == "/backend-api/codex/responses":
        return upstreams.CODEX(sc)
    if p.startswith("/v1internal:"):
        return wrap_cloud_code(upstreams.GEMINI(sc, "streamGenerateContent" in p))
    if "/publishers/google/models/" in p:
        return upstreams.GEMINI(sc, "streamGenerateContent" in p)
    return Reply(status=404, body={"error": {"message": p}})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    up = FakeUpstream(handler).start()
    base = tmp_path_factory.mktemp("subs")
    auth = base / "auth"
    auth.mkdir()
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 8 * 3600))
    files = {
        "claude-a@x.json": {"type": "claude", "email": "a@x", "access_token": "at", "refresh_token": "rt",
                            "expired": later},
        "codex-a@x.json": {"type": "codex", "email": "a@x", "access_token": "at", "refresh_token": "rt",
                           "account_id": "acc", "expired": later},
        "gemini-a@x-p1.json": {"type": "gemini", "email": "a@x", "project_id": "p1", "access_token": "ya29.a",
                               "token": {"access_token": "ya29.a", "refresh_token": "rt", "expiry": later}},
        "antigravity-a_x.json": {"type": "antigravity", "email": "a@x", "project_id": "p2", "access_token": "ya29.b",
                                 "refresh_token": "rt", "expired": later},
    }
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files["vertex-p3.json"] = {"type": "vertex", "project_id": "p3", "email": "bot@p3", "location": "us-central1",
                               "service_account": {"type": "service_account", "project_id": "p3",
                                                   "client_email": "bot@p3", "private_key": key.private_bytes(
                                                       serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()).decode()}}
    for name, meta in files.items():
        (auth / name).write_text(json.dumps(meta))
        os.chmod(auth / name, 0o600)
    hosts = ("https://api.anthropic.com", "https://chatgpt.com", "https://cloudcode-pa.googleapis.com",
             "https://daily-cloudcode-pa.googleapis.com", "https://us-central1-aiplatform.googleapis.com",
             "https://oauth2.googleapis.com")
    cfg = ("auth-dir: %s\nrequest-retry: 0\nupstream-overrides:\n%s" % (auth, "".join(
        '  "%s": "%s"\n' % (h, up.url) for h in hosts)) +
        "routing:\n  aliases:\n    m-claude: claude://claude-sonnet-4-5-20250929\n    m-codex: codex://gpt-5.1-codex\n"
        "    m-gcli: gemini-cli://gemini-2.5-pro\n    m-ag: antigravity://gemini-3-flash\n"
        "    m-vertex: vertex://gemini-2.5-pro\n")
    gw = Gateway(base, cfg)
    yield gw, up
    gw.stop()
    up.stop()


def path_for(model):
    return {"m-claude": "/v1/messages", "m-codex": "/backend-api/codex/responses", "m-gcli": "/v1internal:",
            "m-ag": "/v1internal:", "m-vertex": "/publishers/google/models/"}[model]


@pytest.mark.parametrize("model", sorted(EXPECTED))
@pytest.mark.parametrize("client", ["openai", "completions", "responses", "anthropic", "gemini", "ollama",
                                    "langchain"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_text_on_every_subscription_provider(env, client, model, stream):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:text hello", stream)
    assert r.text == EXPECTED[model]
    # the Vertex credential mints its token in the background: that call may land after this request
    assert path_for(model) in [q for q in up.requests if q.path != "/token"][-1].path


@pytest.mark.parametrize("model", sorted(EXPECTED))
@pytest.mark.parametrize("client", ["openai", "responses", "anthropic", "gemini", "ollama"])
def test_tools_on_every_subscription_provider(env, client, model):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:tools weather?", True, tools=True)
    assert r.calls == [("get_weather", {"city": "Paris"})]
