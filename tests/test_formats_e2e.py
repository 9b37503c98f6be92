"""Every client format x every upstream codec, end to end: the official SDKs (openai chat/completions/Responses,
anthropic, google-genai, ollama, langchain-openai) talk to a real llm_mux process whose upstreams are one fake
server speaking OpenAI chat, Anthropic, Gemini, Vertex and Responses. Asserts what the client gets and what the
upstream was sent."""
import base64
import json

import anthropic
import ollama
import openai
import pytest
from google import genai
from google.genai import types as gtypes

import upstreams
from harness import Gateway
from fakes import FakeUpstream

UPS = upstreams.UPSTREAMS
CLIENTS = ["openai", "completions", "responses", "anthropic", "gemini", "ollama", "langchain"]
EXPECTED_TEXT = {"up-openai": "Hello from openai", "up-anthropic": "Hello from anthropic",
                 "up-gemini": "Hello from gemini", "up-vertex": "Hello from gemini", "up-codex": "Hello from codex"}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 24).decode()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    up = FakeUpstream(upstreams.handler).start()
    gw = Gateway(tmp_path_factory.mktemp("gw"), upstreams.CONFIG.format(url=up.url))
    yield gw, up
    gw.stop()
    up.stop()


class Result:
    def __init__(self, text="", calls=(), thinking="", usage_in=None, usage_out=None, raw=None):
        self.text, self.calls, self.thinking = text, list(calls), thinking
        self.usage_in, self.usage_out, self.raw = usage_in, usage_out, raw


# -- client adapters: (gateway, model, prompt, stream, tools?, image?) -> Result ------------------------------------
def call_openai(gw, model, prompt, stream, tools=False, image=False):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20)
    content = [{"type": "text", "text": prompt}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}})
    kw = dict(model=model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}])
    if tools:
        kw["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    if stream:
        with c.chat.completions.stream(**kw, stream_options={"include_usage": True}) as s:
            thinking = "".join(getattr(e.chunk.choices[0].delta, "reasoning_content", None) or ""
                               for e in s if e.type == "chunk" and e.chunk.choices)
            r = s.get_final_completion()
    else:
        r = c.chat.completions.create(**kw)
        thinking = (r.choices[0].message.model_extra or {}).get("reasoning_content") or ""
    m = r.choices[0].message
    calls = [(t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls or []]
    return Result(m.content or "", calls, thinking, r.usage.prompt_tokens if r.usage else None,
                  r.usage.completion_tokens if r.usage else None, r)


def call_completions(gw, model, prompt, stream, tools=False, image=False):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20)
    if stream:
        text, usage = "", None
        for chunk in c.completions.create(model=model, prompt=prompt, stream=True, max_tokens=50,
                                          stream_options={"include_usage": True}):
            text += "".join(ch.text for ch in chunk.choices)
            usage = chunk.usage or usage
        return Result(text, usage_in=usage.prompt_tokens if usage else None,
                      usage_out=usage.completion_tokens if usage else None)
    r = c.completions.create(model=model, prompt=prompt, max_tokens=50)
    return Result(r.choices[0].text, usage_in=r.usage.prompt_tokens, usage_out=r.usage.completion_tokens, raw=r)


def call_responses(gw, model, prompt, stream, tools=False, image=False):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20)
    content = [{"type": "input_text", "text": prompt}]
    if image:
        content.append({"type": "input_image", "image_url": "data:image/png;base64," + PNG})
    kw = dict(model=model, instructions="Be brief.", input=[{"role": "user", "content": content}])
    if tools:
        kw["tools"] = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    if stream:
        with c.responses.stream(**kw) as s:
            r = s.get_final_response()
    else:
        r = c.responses.create(**kw)
    calls = [(o.name, json.loads(o.arguments)) for o in r.output if o.type == "function_call"]
    thinking = "".join(sm.text for o in r.output if o.type == "reasoning" for sm in o.summary)
    return Result(r.output_text, calls, thinking, r.usage.input_tokens if r.usage else None,
                  r.usage.output_tokens if r.usage else None, r)


def call_anthropic(gw, model, prompt, stream, tools=False, image=False):
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=20)
    content = [{"type": "text", "text": prompt}]
    if image:
        content.append({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}})
    kw = dict(model=model, max_tokens=200, system="Be brief.", messages=[{"role": "user", "content": content}])
    if tools:
        kw["tools"] = [{"name": "get_weather", "input_schema": WEATHER}]
    if stream:
        with c.messages.stream(**kw) as s:
            r = s.get_final_message()
    else:
        r = c.messages.create(**kw)
    text = "".join(b.text for b in r.content if b.type == "text")
    calls = [(b.name, b.input) for b in r.content if b.type == "tool_use"]
    thinking = "".join(b.thinking for b in r.content if b.type == "thinking")
    u = r.usage
    return Result(text, calls, thinking, u.input_tokens + (u.cache_read_input_tokens or 0) +
                  (u.cache_creation_input_tokens or 0), u.output_tokens, r)


def call_gemini(gw, model, prompt, stream, tools=False, image=False):
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta",
                                                                  timeout=20000))
    parts = [gtypes.Part(text=prompt)]
    if image:
        parts.append(gtypes.Part(inline_data=gtypes.Blob(mime_type="image/png", data=base64.b64decode(PNG))))
    cfg = gtypes.GenerateContentConfig(system_instruction="Be brief.")
    if tools:
        cfg.tools = [gtypes.Tool(function_declarations=[gtypes.FunctionDeclaration(
            name="get_weather", parameters=gtypes.Schema(type="OBJECT", properties={
                "city": gtypes.Schema(type="STRING")}, required=["city"]))])]
        cfg.automatic_function_calling = gtypes.AutomaticFunctionCallingConfig(disable=True)
    contents = [gtypes.Content(role="user", parts=parts)]
    text, thinking, calls, usage = "", "", [], None
    responses = c.models.generate_content_stream(model=model, contents=contents, config=cfg) if stream else \
        [c.models.generate_content(model=model, contents=contents, config=cfg)]
    last = None
    for r in responses:
        last = r
        for p in (r.candidates[0].content.parts or []) if r.candidates and r.candidates[0].content else []:
            if p.thought:
                thinking += p.text or ""
            elif p.text:
                text += p.text
            if p.function_call:
                calls.append((p.function_call.name, dict(p.function_call.args)))
        usage = r.usage_metadata or usage
    return Result(text, calls, thinking, usage.prompt_token_count if usage else None,
                  (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0) if usage else None, last)


def call_ollama(gw, model, prompt, stream, tools=False, image=False):
    c = ollama.Client(host=gw.url, timeout=20)
    msg = {"role": "user", "content": prompt}
    if image:
        msg["images"] = [PNG]
    kw = dict(model=model, messages=[{"role": "system", "content": "Be brief."}, msg], stream=stream)
    if tools:
        kw["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    if stream:
        text, thinking, calls, final = "", "", [], None
        for chunk in c.chat(**kw):
            text += chunk.message.content or ""
            thinking += chunk.message.thinking or ""
            calls += [(t.function.name, dict(t.function.arguments)) for t in chunk.message.tool_calls or []]
            final = chunk
        return Result(text, calls, thinking, final.prompt_eval_count, final.eval_count, final)
    r = c.chat(**kw)
    calls = [(t.function.name, dict(t.function.arguments)) for t in r.message.tool_calls or []]
    return Result(r.message.content, calls, r.message.thinking or "", r.prompt_eval_count, r.eval_count, r)


def call_langchain(gw, model, prompt, stream, tools=False, image=False):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=gw.url + "/v1", api_key="k", model=model, max_retries=0, timeout=20,
                     stream_usage=True)
    if tools:
        llm = llm.bind_tools([{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}])
    if stream:
        acc = None
        for chunk in llm.stream(prompt):
            acc = chunk if acc is None else acc + chunk
        msg = acc
    else:
        msg = llm.invoke(prompt)
    um = msg.usage_metadata or {}
    calls = [(t["name"], t["args"]) for t in msg.tool_calls or []]
    # langchain-openai switches to the Responses API for some model names; content is then a list of blocks
    text = msg.content if isinstance(msg.content, str) else "".join(
        b.get("text", "") for b in msg.content if isinstance(b, dict) and b.get("type") == "text")
    return Result(text, calls, "", um.get("input_tokens"),
                  um.get("output_tokens"), msg)


CALL = {"openai": call_openai, "completions": call_completions, "responses": call_responses,
        "anthropic": call_anthropic, "gemini": call_gemini, "ollama": call_ollama, "langchain": call_langchain}
RATE_LIMIT_ERRORS = {"openai": openai.RateLimitError, "completions": openai.RateLimitError,
                     "responses": openai.RateLimitError, "anthropic": anthropic.RateLimitError,
                     "langchain": openai.RateLimitError}


def last_request(up, fmt_path):
    return [r for r in up.requests if fmt_path(r.path)][-1]


def upstream_of(model):
    return {"up-openai": "openai", "up-anthropic": "anthropic", "up-gemini": "gemini", "up-vertex": "vertex",
            "up-codex": "codex"}[model]


@pytest.mark.parametrize("model", UPS)
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_text_and_usage(env, client, model, stream):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:text say hello", stream)
    assert r.text == EXPECTED_TEXT[model]
    assert r.usage_in == 10 and r.usage_out == 5, (r.usage_in, r.usage_out)
    sent = [q for q in up.requests if upstreams.detect(q.path) == upstream_of(model)][-1]
    body = sent.json
    flat = json.dumps(body)
    assert "say hello" in flat
    if client not in ("completions", "langchain"):
        assert "Be brief." in flat  # the system prompt reached the upstream in its own field
        sys_where = {"openai": lambda b: b["messages"][0] == {"role": "system", "content": "Be brief."},
                     "anthropic": lambda b: b["system"][0]["text"] == "Be brief.",
                     "gemini": lambda b: b["systemInstruction"]["parts"][0]["text"] == "Be brief.",
                     "vertex": lambda b: b["systemInstruction"]["parts"][0]["text"] == "Be brief.",
                     "codex": lambda b: b["instructions"] == "Be brief."}[upstream_of(model)]
        assert sys_where(body), body


@pytest.mark.parametrize("model", UPS)
@pytest.mark.parametrize("client", [c for c in CLIENTS if c != "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tool_calls(env, client, model, stream):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:tools weather in Paris?", stream, tools=True)
    assert r.calls == [("get_weather", {"city": "Paris"})], r.calls
    sent = [q for q in up.requests if upstreams.detect(q.path) == upstream_of(model)][-1].json
    flat = json.dumps(sent)
    assert "get_weather" in flat and '"city"' in flat


@pytest.mark.parametrize("model", UPS)
@pytest.mark.parametrize("client", ["openai", "responses", "anthropic", "gemini", "ollama"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_thinking_reaches_the_client(env, client, model, stream):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:thinking think first", stream)
    assert r.text == "Answer"
    expected = "Let me think."
    if model in ("up-gemini", "up-vertex", "up-openai", "up-anthropic", "up-codex"):
        assert r.thinking == expected, (r.thinking, r.text)


@pytest.mark.parametrize("model", UPS)
@pytest.mark.parametrize("client", ["openai", "responses", "anthropic", "gemini", "ollama"])
def test_images_reach_the_upstream_in_its_format(env, client, model):
    gw, up = env
    r = CALL[client](gw, model, "SCENARIO:image what is this", False, image=True)
    assert r.text == "saw image"
    body = [q for q in up.requests if upstreams.detect(q.path) == upstream_of(model)][-1].json
    kind = upstream_of(model)
    flat = json.dumps(body)
    assert PNG in flat
    if kind == "openai":
        assert '"image_url"' in flat and "data:image/png;base64," + PNG in flat
    elif kind == "anthropic":
        assert {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}} in \
            body["messages"][-1]["content"]
    elif kind in ("gemini", "vertex"):
        assert {"inlineData": {"mimeType": "image/png", "data": PNG}} in body["contents"][-1]["parts"]
    else:
        assert '"input_image"' in flat


@pytest.mark.parametrize("model", UPS)
@pytest.mark.parametrize("client", [c for c in CLIENTS if c != "gemini"])
def test_upstream_429_is_each_sdks_rate_limit_error(env, client, model):
    gw, up = env
    if client == "ollama":
        with pytest.raises(ollama.ResponseError) as e:
            CALL[client](gw, model, "SCENARIO:error429 x", False)
        assert e.value.status_code == 429
        return
    with pytest.raises(RATE_LIMIT_ERRORS[client]) as e:
        CALL[client](gw, model, "SCENARIO:error429 x", False)
    assert "(fake)" in str(e.value)


@pytest.mark.parametrize("model", UPS)
def test_gemini_client_gets_429_as_api_error(env, model):
    from google.genai import errors as gerrors
    gw, up = env
    with pytest.raises(gerrors.ClientError) as e:
        call_gemini(gw, model, "SCENARIO:error429 x", False)
    assert e.value.code == 429 and e.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("model", UPS)
@pytest.mark.parametrize("client", ["openai", "responses", "anthropic", "ollama"])
def test_failure_after_streaming_began_ends_with_an_error_event(env, client, model):
    gw, up = env
    errors = {"openai": openai.APIError, "responses": Exception, "anthropic": anthropic.APIError,
              "ollama": ollama.ResponseError}
    with pytest.raises(errors[client]):
        CALL[client](gw, model, "SCENARIO:midfail x", True)


def test_unknown_model_is_404_in_each_shape(env):
    gw, _ = env
    with pytest.raises(openai.NotFoundError):
        call_openai(gw, "nope", "x", False)
    with pytest.raises(anthropic.NotFoundError) as e:
        call_anthropic(gw, "nope", "x", False)
    assert e.value.body["error"]["type"] == "not_found_error"
    from google.genai import errors as gerrors
    with pytest.raises(gerrors.ClientError) as e:
        call_gemini(gw, "nope", "x", False)
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"
    with pytest.raises(ollama.ResponseError) as e:
        call_ollama(gw, "nope", "x", False)
    assert e.value.status_code == 404


def test_malformed_requests_are_400_in_each_shape(env):
    gw, _ = env
    import urllib.request
    for path, body, check in [
        ("/v1/messages", b'{"model": "up-openai", "max_tokens": "lots", "messages": [{"role": "user", "content": "x"}]}',
         lambda j: j["type"] == "error" and j["error"]["type"] == "invalid_request_error" and
         "max_tokens" in j["error"]["message"]),
        ("/v1beta/models/up-openai:generateContent", b"{bad", lambda j: j["error"]["status"] == "INVALID_ARGUMENT"),
        ("/api/chat", b'{"model": "up-openai", "messages": "x"}', lambda j: "messages" in j["error"]),
        ("/v1/responses", b'{"model": "up-openai", "input": 5}', lambda j: j["error"]["param"] == "input"),
    ]:
        req = urllib.request.Request(gw.url + path, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and check(json.loads(e.value.read())), path


@pytest.mark.parametrize("model", UPS)
def test_gemini_client_sees_a_mid_stream_failure(env, model):
    """Gemini has no in-band error event; the stream carries a bare error object, which the SDK raises on."""
    from google.genai import errors as gerrors
    gw, up = env
    with pytest.raises((gerrors.APIError, ValueError)):
        call_gemini(gw, model, "SCENARIO:midfail x", True)
