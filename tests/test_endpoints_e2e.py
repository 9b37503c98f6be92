"""Client-facing endpoints beyond chat: model lists shaped for each caller, count_tokens (forwarded or estimated),
Ollama's housekeeping endpoints and naming, Gemini's JSON-array stream and /v1 paths, thinking suffixes."""
import json
import urllib.request

import anthropic
import ollama
import openai
import pytest
from google import genai
from google.genai import types as gtypes

import upstreams
from test_formats_e2e import env, upstream_of  # noqa: F401


def http(gw, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(gw.url + path, data=data, method=method,
                                 headers=dict({"Content-Type": "application/json"}, **(headers or {})))
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_models_list_is_shaped_for_each_caller(env):
    gw, _ = env
    ids = sorted(m.id for m in openai.OpenAI(base_url=gw.url + "/v1", api_key="k").models.list())
    assert ids == sorted(upstreams.UPSTREAMS)
    page = anthropic.Anthropic(base_url=gw.url, api_key="k").models.list()
    assert sorted(m.id for m in page.data) == sorted(upstreams.UPSTREAMS)
    assert all(m.type == "model" and m.created_at for m in page.data)
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    names = sorted(m.name for m in c.models.list())
    assert names == sorted("models/" + m for m in upstreams.UPSTREAMS)
    m = c.models.get(model="up-gemini")
    assert m.name == "models/up-gemini" and "generateContent" in m.supported_actions
    # google-genai 3.x defaults to /v1, where GET /v1/models is shared with OpenAI and Anthropic
    c1 = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1"))
    assert sorted(m.name for m in c1.models.list()) == names
    status, _, body = http(gw, "GET", "/v1/models/up-openai", headers={"anthropic-version": "2023-06-01"})
    assert status == 200 and json.loads(body)["type"] == "model"


def test_gemini_sdk_on_v1_paths(env):
    gw, _ = env
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1"))
    assert c.models.generate_content(model="up-anthropic", contents="SCENARIO:text hi").text == "Hello from anthropic"
    text = "".join(ch.text or "" for ch in c.models.generate_content_stream(model="up-openai",
                                                                           contents="SCENARIO:text hi"))
    assert text == "Hello from openai"


def test_gemini_stream_without_alt_is_one_json_array(env):
    gw, _ = env
    status, headers, body = http(gw, "POST", "/v1beta/models/up-openai:streamGenerateContent",
                                 {"contents": [{"role": "user", "parts": [{"text": "SCENARIO:text hi"}]}]})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    chunks = json.loads(body)
    assert isinstance(chunks, list) and len(chunks) >= 2
    text = "".join(p.get("text", "") for c in chunks for p in c["candidates"][0]["content"]["parts"])
    assert text == "Hello from openai"
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP" and chunks[-1]["usageMetadata"]["promptTokenCount"] == 10
    # and with alt=sse: data lines only, no event: or comment lines (python-genai and js-genai parse nothing else)
    status, headers, body = http(gw, "POST", "/v1beta/models/up-anthropic:streamGenerateContent?alt=sse",
                                 {"contents": [{"role": "user", "parts": [{"text": "SCENARIO:text hi"}]}]})
    lines = [line for line in body.decode().split("\r\n") if line]
    assert lines and all(line.startswith("data: {") for line in lines)


def test_gemini_snake_case_request_fields(env):
    gw, up = env
    body = {"contents": [{"role": "user", "parts": [{"text": "SCENARIO:text hi"},
                                                    {"inline_data": {"mime_type": "image/png", "data": "iVBORw0KGgo="}}]}],
            "system_instruction": {"parts": [{"text": "Sys"}]},
            "generation_config": {"max_output_tokens": 77, "stop_sequences": ["END"], "top_k": 3}}
    status, _, out = http(gw, "POST", "/v1beta/models/up-openai:generateContent", body)
    assert status == 200, out
    sent = [q for q in up.requests if upstreams.detect(q.path) == "openai"][-1].json
    assert sent["max_tokens"] == 77 and sent["stop"] == ["END"]
    assert sent["messages"][0] == {"role": "system", "content": "Sys"}
    assert sent["messages"][1]["content"][1]["image_url"]["url"] == "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize("model, expected", [("up-anthropic", 37), ("up-gemini", 42), ("up-vertex", 42)])
def test_count_tokens_is_forwarded_where_the_upstream_counts(env, model, expected):
    gw, up = env
    n = anthropic.Anthropic(base_url=gw.url, api_key="k").messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "hello there"}])
    assert n.input_tokens == expected
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    assert c.models.count_tokens(model=model, contents="hello there").total_tokens == expected


@pytest.mark.parametrize("model", ["up-openai", "up-codex"])
def test_count_tokens_is_estimated_and_logged_otherwise(env, model):
    gw, _ = env
    text = "x" * 400
    n = anthropic.Anthropic(base_url=gw.url, api_key="k").messages.count_tokens(
        model=model, messages=[{"role": "user", "content": text}])
    assert n.input_tokens == 100 + 4  # 4 chars per token, plus 4 per message: the documented heuristic
    assert "estimated 104 tokens" in gw.output()


def test_ollama_housekeeping_and_latest_names(env):
    gw, _ = env
    c = ollama.Client(host=gw.url)
    names = sorted(m.model for m in c.list().models)
    assert names == sorted(m + ":latest" for m in upstreams.UPSTREAMS)
    shown = c.show("up-openai:latest")
    assert shown.modelinfo is not None and "tools" in shown.capabilities
    assert c.ps().models == []
    status, _, body = http(gw, "GET", "/api/version")
    assert status == 200 and json.loads(body)["version"].count(".") == 2
    status, _, body = http(gw, "HEAD", "/")
    assert status == 200
    status, _, body = http(gw, "GET", "/ollama/api/tags")
    assert status == 200 and len(json.loads(body)["models"]) == len(upstreams.UPSTREAMS)
    r = c.chat(model="up-gemini:latest", messages=[{"role": "user", "content": "SCENARIO:text hi"}], stream=False)
    assert r.message.content == "Hello from gemini" and r.done_reason == "stop" and r.total_duration > 0


def test_ollama_generate_streams_by_default_and_loads(env):
    gw, up = env
    c = ollama.Client(host=gw.url)
    r = c.generate(model="up-anthropic", prompt="SCENARIO:text hi", system="Sys", stream=False)
    assert r.response == "Hello from anthropic" and r.done
    sent = [q for q in up.requests if upstreams.detect(q.path) == "anthropic"][-1].json
    assert sent["system"][0]["text"] == "Sys"
    text = "".join(ch.response for ch in c.generate(model="up-anthropic", prompt="SCENARIO:text hi", stream=True))
    assert text == "Hello from anthropic"
    # no "stream" field at all: Ollama streams NDJSON
    status, headers, body = http(gw, "POST", "/api/generate", {"model": "up-openai", "prompt": "SCENARIO:text hi"})
    lines = [json.loads(x) for x in body.decode().splitlines()]
    assert headers["Content-Type"] == "application/x-ndjson" and lines[-1]["done"] is True and len(lines) > 2
    status, _, body = http(gw, "POST", "/api/generate", {"model": "up-openai", "prompt": "", "keep_alive": 0})
    assert json.loads(body)["done_reason"] == "unload"


@pytest.mark.parametrize("model, check", [
    ("up-openai", lambda b: b["reasoning_effort"] == "high"),
    ("up-anthropic", lambda b: b["thinking"] == {"type": "enabled", "budget_tokens": 24576} and
     b["max_tokens"] > 24576),
    ("up-gemini", lambda b: b["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 24576,
                                                                       "includeThoughts": True}),
    ("up-codex", lambda b: b["reasoning"]["effort"] == "high" and b["include"] == ["reasoning.encrypted_content"]),
])
def test_thinking_chosen_by_model_suffix(env, model, check):
    gw, up = env
    r = openai.OpenAI(base_url=gw.url + "/v1", api_key="k").chat.completions.create(
        model=model + "(high)", messages=[{"role": "user", "content": "SCENARIO:text hi"}])
    assert r.model == model + "(high)"
    body = [q for q in up.requests if upstreams.detect(q.path) == upstream_of(model)][-1].json
    assert check(body), body


def test_thinking_budget_suffix_and_request_fields(env):
    gw, up = env
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k").chat.completions.create(
        model="up-anthropic(16384)", messages=[{"role": "user", "content": "SCENARIO:text hi"}])
    body = [q for q in up.requests if upstreams.detect(q.path) == "anthropic"][-1].json
    assert body["thinking"]["budget_tokens"] == 16384
    anthropic.Anthropic(base_url=gw.url, api_key="k").messages.create(
        model="up-openai", max_tokens=9000, thinking={"type": "enabled", "budget_tokens": 2000},
        messages=[{"role": "user", "content": "SCENARIO:text hi"}])
    body = [q for q in up.requests if upstreams.detect(q.path) == "openai"][-1].json
    assert body["reasoning_effort"] == "medium"


def test_responses_body_on_chat_completions_is_accepted(env):
    gw, up = env
    status, _, body = http(gw, "POST", "/v1/chat/completions", {"model": "up-openai", "input": "SCENARIO:text hi",
                                                                "instructions": "Sys"})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello from openai"


def test_stateless_responses_refuse_previous_response_id(env):
    gw, _ = env
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(base_url=gw.url + "/v1", api_key="k").responses.create(
            model="up-openai", input="hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(e.value)


def test_image_urls_are_downloaded_and_inlined_for_gemini(env):
    gw, up = env
    from fakes import FakeUpstream, Reply
    png = b"\x89PNG\r\n\x1a\n" + b"\x01" * 16
    img = FakeUpstream(lambda r: Reply("raw", body=png, headers={"Content-Type": "image/png"}, chunked=False)).start()
    try:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        r = c.chat.completions.create(model="up-gemini", messages=[{"role": "user", "content": [
            {"type": "text", "text": "SCENARIO:image what"},
            {"type": "image_url", "image_url": {"url": img.url + "/cat.png"}}]}])
        assert r.choices[0].message.content == "saw image"
        body = [q for q in up.requests if upstreams.detect(q.path) == "gemini"][-1].json
        import base64
        assert {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}} in \
            body["contents"][0]["parts"]
        # other upstreams get the URL as it is
        c.chat.completions.create(model="up-openai", messages=[{"role": "user", "content": [
            {"type": "text", "text": "SCENARIO:image x"}, {"type": "image_url", "image_url": {"url": img.url + "/c"}}]}])
        body = [q for q in up.requests if upstreams.detect(q.path) == "openai"][-1].json
        assert body["messages"][0]["content"][1]["image_url"]["url"] == img.url + "/c"
        assert len(img.requests) == 1
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="up-gemini", messages=[{"role": "user", "content": [
                {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x"}}]}])
    finally:
        img.stop()
