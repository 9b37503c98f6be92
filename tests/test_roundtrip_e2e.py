"""Second turns: tool results and opaque reasoning tokens (Anthropic signatures, Gemini thoughtSignatures,
Responses encrypted_content) travel back through the gateway, and reach the upstream in its own format,
byte-exact where the token belongs to that upstream's family (formats.md §6.2, §6.3)."""
import json

import anthropic
import ollama
import openai
import pytest
from google import genai
from google.genai import types as gtypes

import upstreams
from test_formats_e2e import WEATHER, env, upstream_of  # noqa: F401  (module-scoped gateway fixture)

UPS = upstreams.UPSTREAMS


def sent_to(up, model):
    return [q for q in up.requests if upstreams.detect(q.path) == upstream_of(model)][-1].json


def tool_result_reached_upstream(body, kind, call_name="get_weather", result="21C"):
    """The tool call and its result are paired correctly in the upstream's own format."""
    if kind == "openai":
        msgs = body["messages"]
        call = next(m for m in msgs if m.get("tool_calls"))["tool_calls"][0]
        res = next(m for m in msgs if m["role"] == "tool")
        return call["function"]["name"] == call_name and res["tool_call_id"] == call["id"] and res["content"] == result
    if kind == "anthropic":
        msgs = body["messages"]
        ai = next(i for i, m in enumerate(msgs) if m["role"] == "assistant" and
                  any(b["type"] == "tool_use" for b in m["content"]))
        use = next(b for b in msgs[ai]["content"] if b["type"] == "tool_use")
        res = msgs[ai + 1]["content"][0]
        # a result the client wrote as a bare string goes on as one; from other formats, as text blocks
        text = res["content"] if isinstance(res["content"], str) else res["content"][0]["text"]
        return use["name"] == call_name and use["input"] == {"city": "Paris"} and res["type"] == "tool_result" and \
            res["tool_use_id"] == use["id"] and text == result
    if kind in ("gemini", "vertex"):
        cs = body["contents"]
        mi = next(i for i, c in enumerate(cs) if c["role"] == "model" and any("functionCall" in p for p in c["parts"]))
        fc = next(p for p in cs[mi]["parts"] if "functionCall" in p)
        fr = cs[mi + 1]["parts"][0]["functionResponse"]
        return fc["functionCall"]["name"] == call_name and fc["functionCall"]["args"] == {"city": "Paris"} and \
            fr["name"] == call_name and fr["response"] == {"output": result} and "thoughtSignature" in fc
    items = body["input"]
    call = next(i for i in items if i["type"] == "function_call")
    out = next(i for i in items if i["type"] == "function_call_output")
    return call["name"] == call_name and out["call_id"] == call["call_id"] and out["output"] == result


@pytest.mark.parametrize("model", UPS)
@pytest.mark.parametrize("client", ["openai", "anthropic", "responses", "gemini", "ollama"])
def test_tool_round_trip(env, client, model):
    gw, up = env
    q = "SCENARIO:tools weather in Paris?"
    follow = "SCENARIO:text thanks"
    if client == "openai":
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
        r1 = c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], tools=tools)
        call = r1.choices[0].message.tool_calls[0]
        r2 = c.chat.completions.create(model=model, tools=tools, messages=[
            {"role": "user", "content": q}, r1.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "21C"}, {"role": "user", "content": follow}])
        text = r2.choices[0].message.content
    elif client == "anthropic":
        c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
        tools = [{"name": "get_weather", "input_schema": WEATHER}]
        r1 = c.messages.create(model=model, max_tokens=100, tools=tools, messages=[{"role": "user", "content": q}])
        use = next(b for b in r1.content if b.type == "tool_use")
        r2 = c.messages.create(model=model, max_tokens=100, tools=tools, messages=[
            {"role": "user", "content": q}, {"role": "assistant", "content": [b.model_dump() for b in r1.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21C"},
                                         {"type": "text", "text": follow}]}])
        text = "".join(b.text for b in r2.content if b.type == "text")
    elif client == "responses":
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
        r1 = c.responses.create(model=model, input=q, tools=tools)
        items = [o.model_dump(exclude_none=True) for o in r1.output]
        call = next(o for o in r1.output if o.type == "function_call")
        r2 = c.responses.create(model=model, tools=tools, input=[{"role": "user", "content": q}] + items + [
            {"type": "function_call_output", "call_id": call.call_id, "output": "21C"},
            {"role": "user", "content": follow}])
        text = r2.output_text
    elif client == "gemini":
        c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
        cfg = gtypes.GenerateContentConfig(tools=[gtypes.Tool(function_declarations=[gtypes.FunctionDeclaration(
            name="get_weather", parameters=gtypes.Schema(type="OBJECT", properties={
                "city": gtypes.Schema(type="STRING")}))])],
            automatic_function_calling=gtypes.AutomaticFunctionCallingConfig(disable=True))
        user = gtypes.Content(role="user", parts=[gtypes.Part(text=q)])
        r1 = c.models.generate_content(model=model, contents=[user], config=cfg)
        fc = r1.function_calls[0]
        r2 = c.models.generate_content(model=model, config=cfg, contents=[
            user, r1.candidates[0].content,
            gtypes.Content(role="user", parts=[gtypes.Part(function_response=gtypes.FunctionResponse(
                name=fc.name, id=fc.id, response={"output": "21C"}))]),
            gtypes.Content(role="user", parts=[gtypes.Part(text=follow)])])
        text = r2.text
    else:
        c = ollama.Client(host=gw.url)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
        r1 = c.chat(model=model, messages=[{"role": "user", "content": q}], tools=tools, stream=False)
        tc = r1.message.tool_calls[0]
        r2 = c.chat(model=model, tools=tools, stream=False, messages=[
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {
                "name": tc.function.name, "arguments": dict(tc.function.arguments)}}]},
            {"role": "tool", "tool_name": "get_weather", "content": "21C"}, {"role": "user", "content": follow}])
        text = r2.message.content
    assert text == {"up-openai": "Hello from openai", "up-anthropic": "Hello from anthropic",
                    "up-gemini": "Hello from gemini", "up-vertex": "Hello from gemini",
                    "up-codex": "Hello from codex"}[model]
    body = sent_to(up, model)
    assert tool_result_reached_upstream(body, upstream_of(model)), json.dumps(body)[:2000]


def signature_reached_upstream(body, kind):
    if kind == "anthropic":
        blocks = [b for m in body["messages"] if m["role"] == "assistant" for b in m["content"]]
        return {"type": "thinking", "thinking": "Let me think.", "signature": upstreams.SIG["anthropic"]} in blocks
    if kind in ("gemini", "vertex"):
        # The signature comes back on the answer's text part (a stream may have split that text in two).
        parts = [p for c in body["contents"] if c["role"] == "model" for p in c["parts"]]
        answer = [p for p in parts if "text" in p and not p.get("thought")]
        return "".join(p["text"] for p in answer) == "Answer" and \
            answer[-1].get("thoughtSignature") == upstreams.SIG["gemini"]
    items = body["input"]
    return any(i.get("type") == "reasoning" and i.get("encrypted_content") == upstreams.SIG["codex"] and
               i.get("id") == "rs_up1" for i in items)


@pytest.mark.parametrize("model", ["up-anthropic", "up-gemini", "up-vertex", "up-codex"])
@pytest.mark.parametrize("client", ["anthropic", "responses", "gemini"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_reasoning_tokens_come_back_byte_exact(env, client, model, stream):
    gw, up = env
    q = "SCENARIO:thinking think"
    follow = "SCENARIO:text go on"
    if client == "anthropic":
        c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
        kw = dict(model=model, max_tokens=4000, messages=[{"role": "user", "content": q}])
        if stream:
            with c.messages.stream(**kw) as s:
                r1 = s.get_final_message()
        else:
            r1 = c.messages.create(**kw)
        assert any(b.type == "thinking" and b.signature for b in r1.content)
        c.messages.create(model=model, max_tokens=4000, messages=[
            {"role": "user", "content": q}, {"role": "assistant", "content": [b.model_dump() for b in r1.content]},
            {"role": "user", "content": follow}])
    elif client == "responses":
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        if stream:
            with c.responses.stream(model=model, input=q) as s:
                r1 = s.get_final_response()
        else:
            r1 = c.responses.create(model=model, input=q)
        items = [o.model_dump(exclude_none=True) for o in r1.output]
        assert any(i["type"] == "reasoning" and i.get("encrypted_content") for i in items)
        c.responses.create(model=model, input=[{"role": "user", "content": q}] + items +
                           [{"role": "user", "content": follow}])
    else:
        c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
        user = gtypes.Content(role="user", parts=[gtypes.Part(text=q)])
        if stream:
            parts = []
            for chunk in c.models.generate_content_stream(model=model, contents=[user]):
                parts.extend(chunk.candidates[0].content.parts or [])
            model_turn = gtypes.Content(role="model", parts=parts)
        else:
            model_turn = c.models.generate_content(model=model, contents=[user]).candidates[0].content
        assert any(p.thought_signature for p in model_turn.parts)
        c.models.generate_content(model=model, contents=[user, model_turn, gtypes.Content(
            role="user", parts=[gtypes.Part(text=follow)])])
    body = sent_to(up, model)
    assert signature_reached_upstream(body, upstream_of(model)), json.dumps(body)[:3000]


def test_foreign_reasoning_is_never_forwarded_to_another_family(env):
    """A Gemini signature carried through an Anthropic client must not reach Anthropic (it would be rejected)."""
    gw, up = env
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    r1 = c.messages.create(model="up-gemini", max_tokens=4000, messages=[{"role": "user", "content":
                                                                         "SCENARIO:thinking x"}])
    c.messages.create(model="up-anthropic", max_tokens=4000, messages=[
        {"role": "user", "content": "SCENARIO:thinking x"},
        {"role": "assistant", "content": [b.model_dump() for b in r1.content]},
        {"role": "user", "content": "SCENARIO:text y"}])
    body = sent_to(up, "up-anthropic")
    assert not any(b["type"] in ("thinking", "redacted_thinking") for m in body["messages"] for b in m["content"]
                   if isinstance(m["content"], list))
    assert upstreams.SIG["gemini"] not in json.dumps(body)
