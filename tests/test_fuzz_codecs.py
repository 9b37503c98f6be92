"""Fuzz target for every codec's client-request parser: valid bodies of each format with values swapped for
wrong types (null, numbers, strings, lists, objects, deep nesting) at random paths. A parser returns a request or
raises a GatewayError (a 400 in the client's format) — never another exception, which would be a 500 — and a
request it returns can be built for every upstream format (a wrong type let into the IR used to crash there)."""
import copy
import os
import random

import llm_mux

CASES = int(os.environ.get("LLM_MUX_FUZZ_CASES", "20000"))

IMG = "data:image/png;base64,iVBORw0KGgo="
SEEDS = {
    "openai": {"model": "m", "stream": True, "temperature": 0.2, "max_tokens": 10, "stop": ["x"],
               "messages": [{"role": "system", "content": "s"},
                            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                         {"type": "image_url", "image_url": {"url": IMG}}]},
                            {"role": "assistant", "content": None, "tool_calls": [
                                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                            {"role": "tool", "tool_call_id": "c1", "content": "r"}],
               "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
               "tool_choice": "auto", "response_format": {"type": "json_object"}, "reasoning_effort": "low"},
    "responses": {"model": "m", "instructions": "s", "stream": True, "max_output_tokens": 10,
                  "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                         {"type": "input_image", "image_url": IMG}]},
                            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                            {"type": "function_call_output", "call_id": "c1", "output": "r"}],
                  "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                  "reasoning": {"effort": "low"}, "text": {"format": {"type": "text"}}},
    "anthropic": {"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "s"}], "stream": True,
                  "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {
                      "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]},
                      {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}],
                  "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "auto"},
                  "thinking": {"type": "enabled", "budget_tokens": 1024}},
    "gemini": {"contents": [{"role": "user", "parts": [{"text": "hi"}, {"inlineData": {
                   "mimeType": "image/png", "data": "iVBO"}}]},
                            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                            {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}],
               "systemInstruction": {"parts": [{"text": "s"}]},
               "tools": [{"functionDeclarations": [{"name": "f", "parameters": {"type": "object"}}]}],
               "generationConfig": {"maxOutputTokens": 10, "thinkingConfig": {"thinkingBudget": 100}}},
    "ollama": {"model": "m", "stream": False, "options": {"temperature": 0.1, "num_predict": 5},
               "messages": [{"role": "user", "content": "hi", "images": ["iVBO"]},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"function": {"name": "f", "arguments": {}}}]},
                            {"role": "tool", "content": "r"}],
               "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
}
WEIRD = [None, 0, -1, 1.5, True, "", "x", [], [None], {}, {"a": None}, [[[[[]]]]], "\ud800"[:0], 10 ** 30]


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def mutate(rng, body):
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        options = [p for p in paths(body) if p]
        if not options:
            return body
        path = rng.choice(options)
        holder = body
        for step in path[:-1]:
            holder = holder[step]
        if rng.random() < 0.15 and isinstance(holder, dict):
            holder.pop(path[-1], None)
        else:
            holder[path[-1]] = copy.deepcopy(rng.choice(WEIRD))
    return body


def parse(fmt, body):
    if fmt == "openai":
        return llm_mux.OpenAIChat.parse_request(body)
    if fmt == "responses":
        return llm_mux.Responses.parse_request(body)
    if fmt == "anthropic":
        return llm_mux.Anthropic.parse_request(body)
    if fmt == "gemini":
        return llm_mux.Gemini.parse_request(body, "m")
    return llm_mux.Ollama.parse_request(body)


def test_every_codec_parser_raises_only_gateway_errors():
    rng = random.Random(400)
    for fmt, seed in SEEDS.items():
        assert parse(fmt, copy.deepcopy(seed)) is not None, fmt  # the seeds are valid
    for _ in range(CASES):
        fmt = rng.choice(sorted(SEEDS))
        body = mutate(rng, SEEDS[fmt])
        try:
            req = parse(fmt, body)
            for codec in (llm_mux.OpenAIChat, llm_mux.Anthropic, llm_mux.Gemini, llm_mux.Responses):
                codec.build_request(req, "m")
        except llm_mux.GatewayError as e:
            assert 400 <= e.status < 500, (fmt, body, e.message)
            # every refusal says which field (not "a field has the wrong type", nor a Python error's words)
            assert "wrong type or shape" not in e.message and "object has no attribute" not in e.message, \
                (fmt, body, e.message)
    for fmt in SEEDS:  # not even an object
        for body in ([], "x", None, 3):
            try:
                parse(fmt, body)
            except llm_mux.GatewayError as e:
                assert e.status == 400


def test_wrong_shapes_are_a_400_in_each_apis_own_shape(gateway, upstream):
    import json
    import urllib.error
    import urllib.request
    from harness import openai_provider_config
    up = upstream()
    gw = gateway(openai_provider_config(up.url))
    cases = [("/v1/messages", {"model": "gpt-test", "max_tokens": 5, "messages": [None]},
              lambda b: b["type"] == "error" and b["error"]["type"] == "invalid_request_error"),
             ("/v1beta/models/gpt-test:generateContent", {"contents": [{"parts": "not a list"}]},
              lambda b: b["error"]["status"] == "INVALID_ARGUMENT"),
             ("/api/chat", {"model": "gpt-test", "messages": [{"role": "user", "content": "x", "images": [7]}]},
              lambda b: isinstance(b["error"], str)),
             ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": [None]}]},
              lambda b: b["error"]["type"] == "invalid_request_error")]
    # fields a parser used to trip over (a Python error's words in the 400): now the 400 names the field
    named = [("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "assistant", "tool_calls": [
                 {"id": "c", "function": True}]}]}, "messages[0].tool_calls[0].function: expected an object, got a "
                                                    "boolean", lambda b: b["error"]["message"] if b["error"]["param"] == "messages[0].tool_calls[0].function" else ""),
             ("/v1/messages", {"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": [
                 {"type": "image", "source": [1]}]}]}, "messages.0.content.0.source: expected an object, got an "
                                                       "array", lambda b: b["error"]["message"]),
             ("/v1beta/models/gpt-test:generateContent", {"contents": [{"parts": [{"inline_data": "x"}]}]},
              "contents[0].parts[0].inline_data: expected an object, got a string", lambda b: b["error"]["message"]),
             ("/api/chat", {"model": "gpt-test", "messages": [{"role": ["user"], "content": "x"}]},
              "messages[0].role: expected a string, got an array", lambda b: b["error"]),
             ("/v1/responses", {"model": "gpt-test", "input": [{"type": "reasoning", "summary": 5}]},
              "input[0].summary: expected an array, got a number", lambda b: b["error"]["message"]),
             # values a parser let into the request, which only building the upstream's body tripped over (a 500)
             ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}, {
                 "role": "assistant", "tool_calls": [{"id": 5, "function": {"name": "f", "arguments": "{}"}}]}]},
              "messages[1].tool_calls[0].id: expected a string, got a number", lambda b: b["error"]["message"]),
             ("/v1/messages", {"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                               "thinking": {"type": "enabled", "budget_tokens": True}},
              "thinking.budget_tokens: expected an integer, got a boolean", lambda b: b["error"]["message"]),
             ("/v1beta/models/gpt-test:generateContent", {"contents": [{"parts": [{"text": 5}]}]},
              "contents[0].parts[0].text: expected a string, got a number", lambda b: b["error"]["message"])]
    for path, body, shape in cases + [(p, b, lambda got, says=says, where=where: says in where(got))
                                      for p, b, says, where in named]:
        req = urllib.request.Request(gw.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with __import__("pytest").raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        got = json.loads(e.value.read())
        assert e.value.code == 400 and shape(got), (path, got)
    assert "Traceback" not in gw.output() and up.requests == []


def test_upstream_events_and_answers_of_the_wrong_shape_are_error_events_not_crashes(gateway, upstream):
    import openai
    import pytest
    from fakes import Reply
    from harness import openai_provider_config
    answers = {"stream": Reply("sse", events=['{"id": "x", "choices": [null]}', "[DONE]"]),
               "json": Reply(body={"id": "x", "choices": [{"message": 7}]})}
    up = upstream(lambda r: answers["stream" if r.json.get("stream") else "json"])
    gw = gateway(openai_provider_config(up.url) + "request-retry: 0\n")
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError) as e:
        for _ in c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                           stream=True):
            pass
    assert "malformed event" in str(e.value)
    gw2 = gateway(openai_provider_config(up.url) + "request-retry: 0\n")  # the first one now cools that upstream
    c = openai.OpenAI(base_url=gw2.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502 and "malformed" in str(e.value)
    assert "Traceback" not in gw.output()
