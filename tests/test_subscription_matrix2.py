"""Every client format on every part-2 provider (GitHub Copilot, Qwen, iFlow, Cline, Kiro), through credential files
and one fake that plays each provider's API (Kiro answering in the AWS binary event stream)."""
import json
import os
import time

import pytest

import upstreams
from conftest import Gateway
from fakes import FakeUpstream, Reply
from test_formats_e2e import CALL
from test_kiro import frame

EXPECTED = {"m-copilot": "Hello from openai", "m-qwen": "Hello from openai", "m-iflow": "Hello from openai",
            "m-cline": "Hello from openai", "m-kiro": "Hello from kiro"}


def kiro_reply(sc):
    if sc == "tools":
        body = (frame({"toolUseId": "tu-1", "name": "get_weather", "input": "{\"city\":"}, "toolUseEvent") +
                frame({"toolUseId": "tu-1", "name": "get_weather", "input": "\"Paris\"}", "stop": True}, "toolUseEvent"))
    else:
        body = frame({"content": "Hello "}) + frame({"content": "from kiro"})
    body += frame({"inputTokens": 10, "outputTokens": 5}, "meteringEvent")
    return Reply("raw", body=body, headers={"Content-Type": "application/vnd.amazon.eventstream"})


def make_handler(url):
    def handler(r):
        sc = upstreams.scenario(r.body)
        p = r.path
        if p == "/copilot_internal/v2/token":
            return Reply(body={"token": "tid=1", "expires_at": int(time.time()) + 1500,
                               "endpoints": {"api": url + "/copilot"}})
        if p == "/generateAssistantResponse":
            return kiro_reply(sc)
        if p.endswith("/chat/completions"):
            return upstreams.OPENAI(sc, bool(r.json.get("stream")))
        return Reply(status=404, body={"error": {"message": p}})
    return handler


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    up = FakeUpstream(lambda r: Reply(status=503)).start()
    up.handler = make_handler(up.url)
    base = tmp_path_factory.mktemp("subs2")
    auth = base / "auth"
    auth.mkdir()
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30 * 3600))
    files = {
        "github-copilot-o.json": {"type": "github-copilot", "access_token": "gho", "username": "o"},
        "qwen-q.json": {"type": "qwen", "access_token": "q", "refresh_token": "r", "expired": later,
                        "resource_url": up.url + "/qwen"},
        "iflow-i.json": {"type": "iflow", "api_key": "sk-i", "refresh_token": "r", "expired": later},
        "cline-c.json": {"type": "cline", "access_token": "c", "refresh_token": "r", "expired": later},
        "kiro-1.json": {"type": "kiro", "access_token": "k", "refresh_token": "r", "expires_at": later},
    }
    for name, meta in files.items():
        (auth / name).write_text(json.dumps(meta))
        os.chmod(auth / name, 0o600)
    hosts = ("https://api.github.com", "https://apis.iflow.cn", "https://api.cline.bot",
             "https://codewhisperer.us-east-1.amazonaws.com")
    cfg = ("auth-dir: %s\nrequest-retry: 0\nupstream-overrides:\n%s" % (auth, "".join(
        '  "%s": "%s"\n' % (h, up.url) for h in hosts)) +
        "routing:\n  aliases:\n    m-copilot: github-copilot://gpt-4.1\n    m-qwen: qwen://qwen3-coder-plus\n"
        "    m-iflow: iflow://glm-4.6\n    m-cline: cline://minimax/minimax-m2\n    m-kiro: kiro://claude-sonnet-4-5\n")
    gw = Gateway(base, cfg)
    yield gw, up
    gw.stop()
    up.stop()


PATHS = {"m-copilot": "/copilot/chat/completions", "m-qwen": "/qwen/v1/chat/completions",
         "m-iflow": "/v1/chat/completions", "m-cline": "/api/v1/chat/completions", "m-kiro": "/generateAssistantResponse"}


@pytest.mark.parametrize("model", sorted(EXPECTED))
@pytest.mark.parametrize("client", ["openai", "completions", "responses", "anthropic", "gemini", "ollama",
                                    "langchain"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_text_on_every_part2_provider(env, client, model, stream):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:text hello", stream)
    assert r.text == EXPECTED[model]
    assert up.requests[-1].path == PATHS[model]


@pytest.mark.parametrize("model", sorted(EXPECTED))
@pytest.mark.parametrize("client", ["openai", "responses", "anthropic", "gemini", "ollama"])
def test_tools_on_every_part2_provider(env, client, model):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:tools weather?", True, tools=True)
    assert r.calls == [("get_weather", {"city": "Paris"})]
