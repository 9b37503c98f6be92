"""Amp CLI compatibility (gateway.md §9). The Amp CLI cannot run here (it needs ampcode.com to sign in), so these
tests send the requests its public source makes: its model calls go to `/api/provider/<vendor>/...` through each
vendor's official SDK (Anthropic, OpenAI, Google GenAI) with that base URL; its account and thread calls go to
`/api/...` and are reverse-proxied to Amp's service (a fake here)."""
import gzip
import json
import urllib.error
import urllib.request

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as gtypes

from fakes import Reply, openai_completion, openai_stream_events
from harness import openai_provider_config

CLAUDE_ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-local",
                 "content": [{"type": "text", "text": "local claude"}], "stop_reason": "end_turn",
                 "usage": {"input_tokens": 3, "output_tokens": 2}}


def amp_config(openai_url, anthropic_url, amp_url="", extra=""):
    return (openai_provider_config(openai_url, models=(("gpt-local", ""),)) +
            "  - type: anthropic\n    base-url: %s\n    api-key: sk-ant\n    models: [claude-local]\n" % anthropic_url +
            "api-keys: [sk-gw]\n"
            "ampcode:\n  upstream-url: %s\n  upstream-api-key: amp-secret-key\n  model-mappings:\n"
            "    - {from: claude-opus-4-5, to: claude-local}\n"
            "    - {from: 'gpt-5(\\.\\d+)?-codex', to: gpt-local, regex: true}\n"
            "    - {from: gemini-2.5-pro, to: gpt-local}\n%s" % (amp_url, extra))


@pytest.fixture
def setup(gateway, upstream):
    def oa_handler(r):
        if r.json and r.json.get("stream"):
            return Reply("sse", events=openai_stream_events(pieces=("local", " gpt"), model="gpt-local"))
        return Reply(body=openai_completion("local gpt", model="gpt-local"))
    oa = upstream(oa_handler)
    an = upstream(lambda r: Reply(body=CLAUDE_ANSWER))
    amp = upstream(lambda r: Reply(body={"amp": "upstream", "path": r.path, "key": r.headers.get("x-api-key")}))
    gw = gateway(amp_config(oa.url, an.url, amp.url))
    return gw, oa, an, amp


def test_local_models_and_mappings_keep_the_name_amp_asked_for(setup):
    gw, oa, an, amp = setup
    claude = anthropic.Anthropic(base_url=gw.url + "/api/provider/anthropic", api_key="sk-gw", max_retries=0)
    r = claude.messages.create(model="claude-local", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
                               extra_headers={"anthropic-beta": "context-1m-2025-08-07,fine-grained-tool-streaming-2025-05-14"})
    assert r.content[0].text == "local claude"
    assert an.requests[-1].headers.get("anthropic-beta", "") == "fine-grained-tool-streaming-2025-05-14"
    # a model only Amp's service knows, mapped to a local one: the answer still names the model asked for
    r = claude.messages.create(model="claude-opus-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert r.model == "claude-opus-4-5" and r.content[0].text == "local claude"
    assert an.requests[-1].json["model"] == "claude-local"
    gpt = openai.OpenAI(base_url=gw.url + "/api/provider/openai/v1", api_key="sk-gw", max_retries=0)
    r = gpt.chat.completions.create(model="gpt-5.1-codex", messages=[{"role": "user", "content": "hi"}])
    assert r.model == "gpt-5.1-codex" and r.choices[0].message.content == "local gpt"  # a regular-expression mapping
    chunks = list(gpt.chat.completions.create(model="gpt-5-codex", messages=[{"role": "user", "content": "hi"}],
                                              stream=True))
    assert {c.model for c in chunks} == {"gpt-5-codex"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "local gpt"
    g = genai.Client(api_key="sk-gw", http_options=gtypes.HttpOptions(base_url=gw.url + "/api/provider/google"))
    r = g.models.generate_content(model="gemini-2.5-pro", contents="hi")
    assert r.text == "local gpt" and r.model_version == "gemini-2.5-pro"
    # model lists in each vendor's shape
    assert {m.id for m in claude.models.list()} == {"claude-local", "gpt-local"}
    assert {m.id for m in gpt.models.list()} == {"claude-local", "gpt-local"}
    assert amp.requests == []  # nothing went to Amp's service


def test_unmapped_models_and_account_calls_go_to_amp(setup):
    gw, oa, an, amp = setup
    claude = anthropic.Anthropic(base_url=gw.url + "/api/provider/anthropic", api_key="sk-gw", max_retries=0)
    raw = claude.messages.with_raw_response.create(model="claude-unknown-9", max_tokens=5,
                                                   messages=[{"role": "user", "content": "x"}])
    body = json.loads(raw.http_response.text)
    assert body["amp"] == "upstream" and body["path"] == "/api/provider/anthropic/v1/messages"
    assert body["key"] == "amp-secret-key"
    req = urllib.request.Request(gw.url + "/api/user?x=1", headers={"Authorization": "Bearer users-amp-token"})
    got = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert got["path"] == "/api/user?x=1" and got["key"] == "amp-secret-key"
    assert amp.requests[-1].headers["authorization"] == "Bearer amp-secret-key"  # never the caller's own


def test_gzip_from_amp_is_unwrapped_and_a_dead_upstream_is_a_502(gateway, upstream):
    oa = upstream()
    an = upstream(lambda r: Reply(body=CLAUDE_ANSWER))
    payload = gzip.compress(json.dumps({"threads": []}).encode())
    amp = upstream(lambda r: Reply("raw", body=payload, headers={"Content-Type": "application/json"}))
    gw = gateway(amp_config(oa.url, an.url, amp.url))
    assert json.loads(urllib.request.urlopen(gw.url + "/api/threads", timeout=10).read()) == {"threads": []}
    dead = gateway(amp_config(oa.url, an.url, "http://127.0.0.1:1"))  # nothing listens there
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(dead.url + "/api/threads", timeout=30)
    assert e.value.code == 502 and json.loads(e.value.read())["error"] == "amp_upstream_proxy_error"


def test_without_an_amp_upstream_unknown_models_get_the_usual_error(gateway, upstream):
    oa = upstream()
    an = upstream(lambda r: Reply(body=CLAUDE_ANSWER))
    gw = gateway(amp_config(oa.url, an.url, ""))
    claude = anthropic.Anthropic(base_url=gw.url + "/api/provider/anthropic", api_key="sk-gw", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="mystery-model-9", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error"  # in Anthropic's shape
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url + "/api/provider/anthropic", api_key="wrong", max_retries=0) \
            .messages.create(model="claude-local", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(gw.url + "/api/user", timeout=10)
    assert e.value.code == 503


def test_bad_mappings_are_config_errors():
    import llm_mux
    for entry, message in (("{from: x}", "a model mapping is"), ("{from: '(', to: y, regex: true}", "regular "
                           "expression"), ("{from: x, to: y, weight: 2}", "unknown field")):
        with pytest.raises(llm_mux.ConfigError) as e:
            llm_mux.Config.from_text("ampcode:\n  model-mappings:\n    - %s\n" % entry, "t.yaml", environ={})
        assert message in str(e.value) and "t.yaml:3" in str(e.value)
