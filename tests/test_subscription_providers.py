"""Every client format on every subscription provider, through credential files in auth-dir and one fake that
plays each provider's API: one table, one gateway. Kiro answers in the AWS binary event stream; Cloud Code wraps
every answer in {"response": ...}; the Vertex service account mints its token at a fake token endpoint."""
import json
import os
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import upstreams
from harness import Gateway, overrides_config
from fakes import FakeUpstream, Reply
from test_formats_e2e import CALL
from test_kiro import frame

LATER = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30 * 3600))


def vertex_account(url):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "vertex", "project_id": "p3", "email": "bot@p3", "location": "us-central1",
            "service_account": {"type": "service_account", "project_id": "p3", "client_email": "bot@p3",
                                "private_key": pem}}


# alias: (route, credential file, its content (a callable is given the fake's URL), expected text, path)
PROVIDERS = {
    "m-claude": ("claude://claude-sonnet-4-5-20250929", "claude-a@x.json",
                 {"type": "claude", "email": "a@x", "access_token": "at", "refresh_token": "rt", "expired": LATER},
                 "Hello from anthropic", "/v1/messages"),
    "m-codex": ("codex://gpt-5.1-codex", "codex-a@x.json",
                {"type": "codex", "email": "a@x", "access_token": "at", "refresh_token": "rt", "account_id": "acc",
                 "expired": LATER}, "Hello from codex", "/backend-api/codex/responses"),
    "m-gcli": ("gemini-cli://gemini-2.5-pro", "gemini-a@x-p1.json",
               {"type": "gemini", "email": "a@x", "project_id": "p1", "access_token": "ya29.a",
                "token": {"access_token": "ya29.a", "refresh_token": "rt", "expiry": LATER}},
               "Hello from gemini", "/v1internal:"),
    "m-ag": ("antigravity://gemini-3-flash", "antigravity-a_x.json",
             {"type": "antigravity", "email": "a@x", "project_id": "p2", "access_token": "ya29.b",
              "refresh_token": "rt", "expired": LATER}, "Hello from gemini", "/v1internal:"),
    "m-vertex": ("vertex://gemini-2.5-pro", "vertex-p3.json", vertex_account, "Hello from gemini",
                 "/publishers/google/models/"),
    "m-copilot": ("github-copilot://gpt-4.1", "github-copilot-o.json",
                  {"type": "github-copilot", "access_token": "gho", "username": "o"}, "Hello from openai",
                  "/copilot/chat/completions"),
    "m-qwen": ("qwen://qwen3-coder-plus", "qwen-q.json",
               lambda url: {"type": "qwen", "access_token": "q", "refresh_token": "r", "expired": LATER,
                            "resource_url": url + "/qwen"}, "Hello from openai", "/qwen/v1/chat/completions"),
    "m-iflow": ("iflow://glm-4.6", "iflow-i.json",
                {"type": "iflow", "api_key": "sk-i", "refresh_token": "r", "expired": LATER}, "Hello from openai",
                "/v1/chat/completions"),
    "m-cline": ("cline://minimax/minimax-m2", "cline-c.json",
                {"type": "cline", "access_token": "c", "refresh_token": "r", "expired": LATER}, "Hello from openai",
                "/api/v1/chat/completions"),
    "m-kiro": ("kiro://claude-sonnet-4-5", "kiro-1.json",
               {"type": "kiro", "access_token": "k", "refresh_token": "r", "expires_at": LATER}, "Hello from kiro",
               "/generateAssistantResponse"),
}
HOSTS = ("https://api.anthropic.com", "https://chatgpt.com", "https://cloudcode-pa.googleapis.com",
         "https://daily-cloudcode-pa.googleapis.com", "https://us-central1-aiplatform.googleapis.com",
         "https://oauth2.googleapis.com", "https://api.github.com", "https://apis.iflow.cn", "https://api.cline.bot",
         "https://codewhisperer.us-east-1.amazonaws.com")


def cloud_code(reply):
    """Cloud Code wraps every answer and stream chunk in {"response": ...}."""
    if reply.kind == "json" and reply.status == 200:
        reply.body = {"response": reply.body, "traceId": "t"}
    elif reply.kind in ("sse", "drop"):
        reply.events = [json.dumps({"response": json.loads(e), "traceId": "t"}) if isinstance(e, str) else e
                        for e in reply.events]
    return reply


def kiro(sc):
    if sc == "tools":
        body = (frame({"toolUseId": "tu-1", "name": "get_weather", "input": "{\"city\":"}, "toolUseEvent") +
                frame({"toolUseId": "tu-1", "name": "get_weather", "input": "\"Paris\"}", "stop": True}, "toolUseEvent"))
    else:
        body = frame({"content": "Hello "}) + frame({"content": "from kiro"})
    body += frame({"inputTokens": 10, "outputTokens": 5}, "meteringEvent")
    return Reply("raw", body=body, headers={"Content-Type": "application/vnd.amazon.eventstream"})


def handler_for(url):
    def handler(r):
        sc, p = upstreams.scenario(r.body), r.path
        stream = "streamGenerateContent" in p
        if p == "/token":
            return Reply(body={"access_token": "ya29.sa", "expires_in": 3600})
        if p == "/copilot_internal/v2/token":
            return Reply(body={"token": "tid=1", "expires_at": int(time.time()) + 1500,
                               "endpoints": {"api": url + "/copilot"}})
        if p.startswith("/v1/messages"):
            return upstreams.ANTHROPIC(sc, bool(r.json.get("stream")))
        if p == "/backend-api/codex/responses":
            return upstreams.CODEX(sc)
        if p.startswith("/v1internal:"):
            return cloud_code(upstreams.GEMINI(sc, stream))
        if "/publishers/google/models/" in p:
            return upstreams.GEMINI(sc, stream)
        if p == "/generateAssistantResponse":
            return kiro(sc)
        if p.endswith("/chat/completions"):
            return upstreams.OPENAI(sc, bool(r.json.get("stream")))
        return Reply(status=404, body={"error": {"message": p}})
    return handler


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    up = FakeUpstream(lambda r: Reply(status=503)).start()
    up.handler = handler_for(up.url)
    base = tmp_path_factory.mktemp("subs")
    auth = base / "auth"
    auth.mkdir()
    for _, name, meta, _, _ in PROVIDERS.values():
        (auth / name).write_text(json.dumps(meta(up.url) if callable(meta) else meta))
        os.chmod(auth / name, 0o600)
    cfg = "request-retry: 0\n" + overrides_config(up.url, HOSTS, auth)
    cfg += "routing:\n  aliases:\n" + "".join("    %s: %s\n" % (m, v[0]) for m, v in PROVIDERS.items())
    gw = Gateway(base, cfg)
    yield gw, up
    gw.stop()
    up.stop()


def last_inference_path(up):
    # token endpoints (the Vertex mint, the Copilot exchange) may be called in the background at any time
    return [q.path for q in up.requests if q.path not in ("/token", "/copilot_internal/v2/token")][-1]


@pytest.mark.parametrize("model", sorted(PROVIDERS))
@pytest.mark.parametrize("client", ["openai", "completions", "responses", "anthropic", "gemini", "ollama",
                                    "langchain"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_text_on_every_subscription_provider(env, client, model, stream):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:text hello", stream)
    assert r.text == PROVIDERS[model][3]
    assert PROVIDERS[model][4] in last_inference_path(up)


@pytest.mark.parametrize("model", sorted(PROVIDERS))
@pytest.mark.parametrize("client", ["openai", "responses", "anthropic", "gemini", "ollama"])
def test_tools_on_every_subscription_provider(env, client, model):
    gw, _ = env
    r = CALL[client](gw, model, "SCENARIO:tools weather?", True, tools=True)
    assert r.calls == [("get_weather", {"city": "Paris"})]
