"""Golden tests per codec for the translation pitfalls of formats.md §6: request JSON -> IR -> target JSON, and
upstream stream -> client stream."""
import json

import llm_mux as M


def oa(messages, **kw):
    return M.OpenAIChat.parse_request(dict({"model": "m", "messages": messages}, **kw))


# -- §6.1 roles, system prompts, turn order -----------------------------------------------------------------------
def test_openai_to_anthropic_turn_repair():
    req = oa([
        {"role": "system", "content": "A"}, {"role": "developer", "content": "B"},
        {"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": ""},
                                                                         {"type": "text", "text": "again"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function", "function": {"name": "w", "arguments": "{\"c\":1}"}},
            {"id": "call_2", "type": "function", "function": {"name": "t", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        {"role": "user", "content": "thanks"}], max_tokens=50, stop="END", parallel_tool_calls=False,
        tool_choice="required", tools=[{"type": "function", "function": {"name": "w"}},
                                       {"type": "function", "function": {"name": "t"}}])
    body = M.Anthropic.build_request(req, "claude-x")
    assert body["system"] == [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]
    uses = msgs[1]["content"]
    assert uses == [{"type": "tool_use", "id": "functions_get_weather_0", "name": "w", "input": {"c": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "t", "input": {}}]
    # results follow their calls' order, first in the user turn, then the user's text
    assert [b.get("tool_use_id") for b in msgs[2]["content"]] == ["functions_get_weather_0", "call_2", None]
    assert msgs[2]["content"][2] == {"type": "text", "text": "thanks"}
    assert body["stop_sequences"] == ["END"] and body["max_tokens"] == 50
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["tools"][0] == {"name": "w", "input_schema": {"type": "object", "properties": {}}}


def test_dangling_tool_calls_get_a_cancelled_result_and_orphans_become_text():
    req = oa([{"role": "user", "content": "go"},
              {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                    "function": {"name": "run", "arguments": "{}"}}]},
              {"role": "user", "content": "stop, do something else"},
              {"role": "tool", "tool_call_id": "ghost", "content": "late"}])
    body = M.Anthropic.build_request(req, "claude-x")
    res = body["messages"][2]["content"]
    assert res[0]["type"] == "tool_result" and res[0]["tool_use_id"] == "c1" and res[0]["is_error"] is True
    assert res[1] == {"type": "text", "text": "stop, do something else"}
    assert "ghost" in json.dumps(body["messages"][2:]) and "late" in json.dumps(body["messages"][2:])
    g = M.Gemini.build_request(req, "gemini-2.5-pro")
    fr = g["contents"][2]["parts"][0]["functionResponse"]
    assert fr["name"] == "run" and "cancelled" in json.dumps(fr["response"])


def test_openai_to_gemini_contents():
    req = oa([{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
              {"role": "assistant", "tool_calls": [
                  {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                  {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
              {"role": "tool", "tool_call_id": "call_b", "content": "{\"ok\":true}"},
              {"role": "tool", "tool_call_id": "call_a", "content": "plain"},
              {"role": "assistant", "content": "prefill"}],
             stop=["X"], temperature=0.3, max_tokens=9,
             response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {
                 "type": "object", "properties": {"a": {"type": ["string", "null"]}}, "additionalProperties": False}}})
    g = M.Gemini.build_request(req, "gemini-2.5-pro")
    assert g["systemInstruction"] == {"parts": [{"text": "S"}]}
    roles = [c["role"] for c in g["contents"]]
    assert roles == ["user", "model", "user"]  # the trailing model turn (prefill) is dropped for Gemini
    calls = g["contents"][1]["parts"]
    assert calls[0] == {"functionCall": {"name": "f", "args": {"x": 1}},
                        "thoughtSignature": M.GEMINI_SKIP_SIGNATURE}
    assert calls[1] == {"functionCall": {"name": "g", "args": {}}}  # only the first call of a turn is signed
    responses = g["contents"][2]["parts"]
    assert responses == [{"functionResponse": {"name": "f", "response": {"output": "plain"}}},
                         {"functionResponse": {"name": "g", "response": {"ok": True}}}]
    gc = g["generationConfig"]
    assert gc["stopSequences"] == ["X"] and gc["temperature"] == 0.3 and gc["maxOutputTokens"] == 9
    assert gc["responseMimeType"] == "application/json"
    assert gc["responseSchema"] == {"type": "object", "properties": {"a": {"type": "string", "nullable": True}}}


def test_gemini_schema_cleaning():
    schema = {"$schema": "x", "type": "object", "$defs": {"P": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "exclusiveMaximum": 9}}}},
        "properties": {"p": {"$ref": "#/$defs/P"}, "mode": {"const": "fast"}, "tags": {"type": "array"},
                       "choice": {"anyOf": [{"type": "null"}, {"type": "string", "format": "email"}]},
                       "x-extra": {"type": "string"}},
        "required": ["p", "missing"], "additionalProperties": False}
    out = M.clean_schema_for_gemini(schema)
    assert out["type"] == "object" and "$schema" not in out and "additionalProperties" not in out
    assert out["properties"]["p"] == {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "description": "(exclusiveMaximum: 9)"}}}
    assert out["properties"]["mode"] == {"enum": ["fast"], "type": "string"}
    assert out["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert out["properties"]["choice"]["type"] == "string" and "email" in out["properties"]["choice"]["description"]
    assert out["required"] == ["p"]


def test_gemini_ids_are_matched_fifo_and_names_recovered():
    body = {"contents": [
        {"role": "user", "parts": [{"text": "q"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"i": 1}}},
                                    {"functionCall": {"name": "f", "args": {"i": 2}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"output": "one"}}},
                                   {"functionResponse": {"name": "f", "response": {"error": "bad"}}}]}]}
    req = M.Gemini.parse_request(body, "m")
    calls = [p for p in req.messages[1].parts]
    results = req.messages[2].parts
    assert [r.id for r in results] == [c.id for c in calls]
    assert results[0].text() == "one" and not results[0].is_error
    assert results[1].text() == "bad" and results[1].is_error
    out = M.OpenAIChat.build_request(req, "gpt")
    assert out["messages"][2]["tool_call_id"] == out["messages"][1]["tool_calls"][0]["id"]
    assert out["messages"][3]["content"] == "Error: bad"
    an = M.Anthropic.build_request(req, "claude")
    assert an["messages"][2]["content"][1]["is_error"] is True


def test_responses_items_become_parallel_calls():
    req = M.Responses.parse_request({"model": "m", "instructions": "I", "input": [
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{\"z\":2}"},
        {"type": "function_call_output", "call_id": "c1", "output": "A"},
        {"type": "function_call_output", "call_id": "c2", "output": "B"}]})
    out = M.OpenAIChat.build_request(req, "gpt")
    assert out["messages"][0] == {"role": "system", "content": "I"}
    assert [t["id"] for t in out["messages"][2]["tool_calls"]] == ["c1", "c2"]
    assert [(m["tool_call_id"], m["content"]) for m in out["messages"][3:]] == [("c1", "A"), ("c2", "B")]


def test_anthropic_request_to_openai():
    req = M.Anthropic.parse_request({"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "S"}],
                                     "tool_choice": {"type": "any"}, "tools": [{"name": "t", "input_schema": {}}],
                                     "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": "AAA="}}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "r"}]}, {"type": "text", "text": "more"}]}]})
    out = M.OpenAIChat.build_request(req, "gpt")
    m = out["messages"]
    assert m[1]["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA="}},
                               {"type": "text", "text": "q"}]
    assert m[2]["tool_calls"][0]["function"] == {"name": "t", "arguments": "{\"a\":1}"}
    assert m[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "r"}
    assert m[4] == {"role": "user", "content": "more"}
    assert out["tool_choice"] == "required"


def test_mid_conversation_system_messages():
    req = M.Anthropic.parse_request({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "remember X"},
        {"role": "user", "content": "b"}]})
    g = M.Gemini.build_request(req, "gemini-2.5-pro")
    assert [c["role"] for c in g["contents"]] == ["user"] and len(g["contents"][0]["parts"]) == 3
    o = M.OpenAIChat.build_request(req, "gpt")
    assert [x["role"] for x in o["messages"]] == ["user", "system", "user"]


# -- §6.8 / §6.9 finish reasons and usage ----------------------------------------------------------------------------
def test_finish_reasons_and_usage_across_formats():
    resp = M.Anthropic.parse_response({"id": "msg_1", "content": [{"type": "text", "text": "cut"}],
                                       "stop_reason": "max_tokens", "usage": {
                                           "input_tokens": 6, "cache_read_input_tokens": 3,
                                           "cache_creation_input_tokens": 1, "output_tokens": 4}})
    req = M.ChatRequest("m")
    o = M.OpenAIChat.build_response(resp, req)
    assert o["choices"][0]["finish_reason"] == "length"
    assert o["usage"]["prompt_tokens"] == 10 and o["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    assert M.Gemini.build_response(resp, req)["candidates"][0]["finishReason"] == "MAX_TOKENS"
    r = M.Responses.build_response(resp, req)
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert M.Ollama.build_response(resp, req)["done_reason"] == "length"
    a = M.Anthropic.build_response(resp, req)
    assert a["stop_reason"] == "max_tokens" and a["usage"]["input_tokens"] == 6
    g = M.Gemini.parse_response({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}],
                                 "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 2,
                                                   "thoughtsTokenCount": 5, "cachedContentTokenCount": 1}})
    u = M.OpenAIChat.build_response(g, req)["usage"]
    assert u["completion_tokens"] == 7 and u["completion_tokens_details"]["reasoning_tokens"] == 5
    # an upstream that claims tool_calls without any call ends as a normal stop
    fake = M.OpenAIChat.parse_response({"choices": [{"message": {"content": "x"}, "finish_reason": "tool_calls"}]})
    assert M.Anthropic.build_response(fake, req)["stop_reason"] == "end_turn"


# -- §6.10 streams ------------------------------------------------------------------------------------------------
def run_stream(decoder, frames, encoder):
    out = b""
    for ev_name, data in frames:
        for ev in decoder.feed(ev_name, data):
            out += encoder.encode(ev)
    for ev in decoder.close():
        out += encoder.encode(ev)
    return out + encoder.close()


def sse_events(raw):
    out = []
    for frame in raw.decode().split("\n\n"):
        if not frame.strip():
            continue
        name = None
        data = None
        for line in frame.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((name, json.loads(data) if data and data != "[DONE]" else data))
    return out


def openai_frames(*deltas, finish="stop"):
    base = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    frames = [(None, json.dumps(dict(base, choices=[{"index": 0, "delta": d, "finish_reason": None}])))
              for d in deltas]
    frames.append((None, json.dumps(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))))
    return frames + [(None, "[DONE]")]


def test_openai_stream_to_anthropic_events():
    req = M.ChatRequest("claude-x")
    frames = openai_frames({"reasoning_content": "hm"}, {"content": "Hi"},
                           {"tool_calls": [{"index": 0, "id": "call.1", "function": {"name": "f", "arguments": "{\"a\""}}]},
                           {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}, finish="tool_calls")
    evs = sse_events(run_stream(M.OpenAIChat.StreamDecoder(), frames, M.Anthropic.StreamEncoder(req)))
    names = [n for n, _ in evs]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    # reasoning_content has no signature upstream: the thinking block gets a minted one (never forwarded later)
    minted = evs[3][1]["delta"]
    assert minted["type"] == "signature_delta" and M.unpack_reasoning(minted["signature"])["source"] == "openai"
    starts = [d for n, d in evs if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[2]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}
    assert evs[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_empty_answer_still_closes_the_anthropic_message():
    evs = sse_events(run_stream(M.OpenAIChat.StreamDecoder(), openai_frames(), M.Anthropic.StreamEncoder(
        M.ChatRequest("m"))))
    assert [n for n, _ in evs] == ["message_start", "message_delta", "message_stop"]


def test_anthropic_stream_to_gemini_buffers_tool_arguments():
    frames = [("message_start", json.dumps({"type": "message_start", "message": {"id": "msg_1", "usage": {
        "input_tokens": 3}}})),
              ("content_block_start", json.dumps({"type": "content_block_start", "index": 0, "content_block": {
                  "type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}})),
              ("content_block_delta", json.dumps({"type": "content_block_delta", "index": 0, "delta": {
                  "type": "input_json_delta", "partial_json": "{\"q\": "}})),
              ("content_block_delta", json.dumps({"type": "content_block_delta", "index": 0, "delta": {
                  "type": "input_json_delta", "partial_json": "\"v\"}"}})),
              ("content_block_stop", json.dumps({"type": "content_block_stop", "index": 0})),
              ("message_delta", json.dumps({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                            "usage": {"output_tokens": 9}})),
              ("message_stop", json.dumps({"type": "message_stop"}))]
    raw = run_stream(M.Anthropic.StreamDecoder(), frames, M.Gemini.StreamEncoder(M.ChatRequest("g"), sse=True))
    chunks = [json.loads(line[6:]) for line in raw.decode().split("\r\n") if line.startswith("data: ")]
    calls = [p["functionCall"] for c in chunks for p in c["candidates"][0]["content"]["parts"] if "functionCall" in p]
    assert calls == [{"name": "f", "args": {"q": "v"}, "id": "toolu_1"}]
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"] == {"promptTokenCount": 3, "candidatesTokenCount": 9, "totalTokenCount": 12}


def test_responses_stream_sequence_and_indices():
    req = M.ChatRequest("m")
    frames = openai_frames({"reasoning_content": "r"}, {"content": "a"}, {"content": "b"},
                           {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]},
                           finish="tool_calls")
    evs = sse_events(run_stream(M.OpenAIChat.StreamDecoder(), frames, M.Responses.StreamEncoder(req)))
    assert evs[0][0] == "response.created" and evs[-1][0] == "response.completed"
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    added = [d for n, d in evs if n == "response.output_item.added"]
    assert [(d["output_index"], d["item"]["type"]) for d in added] == [(0, "reasoning"), (1, "message"),
                                                                      (2, "function_call")]
    final = evs[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][1]["content"][0]["text"] == "ab"


def test_upstream_stream_cut_short_is_an_error_not_a_silent_end():
    frames = openai_frames({"content": "par"})[:1]  # no finish, no [DONE]
    raw = run_stream(M.OpenAIChat.StreamDecoder(), frames, M.Anthropic.StreamEncoder(M.ChatRequest("m")))
    assert sse_events(raw)[-1][0] == "error"
    raw = run_stream(M.OpenAIChat.StreamDecoder(), frames, M.Ollama.StreamEncoder(M.ChatRequest("m")))
    assert json.loads(raw.decode().splitlines()[-1]) == {"error": "upstream stream ended before completion"}


def test_ollama_tool_calls_are_objects_and_images_sniffed():
    req = M.Ollama.parse_request({"model": "m", "messages": [
        {"role": "user", "content": "x", "images": ["/9j/4AAQSkZJRgABAQ=="]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_name": "f", "content": "done"}]})
    assert req.stream is True  # Ollama streams unless told otherwise
    assert req.messages[0].parts[1].mime == "image/jpeg"
    assert req.messages[2].parts[0].id == req.messages[1].parts[0].id
    resp = M.ChatResponse(parts=[M.ToolCall("c", "f", "{\"b\":2}")], finish="tool_calls")
    out = M.Ollama.build_response(resp, M.ChatRequest("m"))
    assert out["message"]["tool_calls"][0]["function"]["arguments"] == {"b": 2}


def test_response_format_mapping():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = oa([{"role": "user", "content": "x"}],
             response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}})
    # Anthropic's structured output takes closed objects only
    assert M.Anthropic.build_request(req, "c")["output_config"] == {"format": {"type": "json_schema", "schema": dict(
        schema, additionalProperties=False)}}
    assert M.Responses.build_request(req, "g")["text"] == {"format": {"type": "json_schema", "name": "r",
                                                                       "schema": schema, "strict": True}}
    assert M.OpenAIChat.build_request(req, "g")["response_format"]["json_schema"]["schema"] == schema
    req = oa([{"role": "user", "content": "x"}], response_format={"type": "json_object"})
    assert "JSON object" in M.Anthropic.build_request(req, "c")["system"][-1]["text"]
    assert M.Gemini.build_request(req, "g")["generationConfig"] == {"responseMimeType": "application/json"}
    ol = M.Ollama.parse_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "format": schema,
                                 "options": {"num_predict": 5, "temperature": 0.1, "top_p": 0.5, "stop": ["s"]}})
    out = M.OpenAIChat.build_request(ol, "g")
    assert out["response_format"]["json_schema"]["schema"] == schema
    assert (out["max_tokens"], out["temperature"], out["top_p"], out["stop"]) == (5, 0.1, 0.5, ["s"])
