"""One fake upstream that speaks every API-key provider's wire format (the path tells which), built from
../shared/reference. The scenario is picked by the last `SCENARIO:<name>` marker in the request body:
text, tools, thinking, image, error429, midfail, overflow, overflowstream, autherr, midstreamerr. Every request
is recorded for assertions."""
import json
import re

from fakes import Reply

USAGE = {"input": 10, "output": 5, "cached": 2, "reasoning": 0}
SIG = {"anthropic": "sig-anthropic-EqQBx/+=", "gemini": "c2lnLWdlbWluaS0x", "codex": "enc-opaque-1/+="}


def detect(path):
    if path.endswith("/chat/completions"):
        return "openai"
    if "/v1/messages" in path:
        return "anthropic"
    if "/v1/publishers/google/models/" in path:
        return "vertex"
    if ":" in path.rsplit("/", 1)[-1]:
        return "gemini"
    if path.endswith("/responses"):
        return "codex"
    return "unknown"


def scenario(body):
    found = re.findall(rb"SCENARIO:(\w+)", body)
    return found[-1].decode() if found else "text"


OVERFLOW = {  # each family's own words for a prompt that does not fit
    "openai": (400, {"error": {"message": "This model's maximum context length is 8192 tokens. However, your "
                               "messages resulted in 9001 tokens.", "type": "invalid_request_error",
                               "param": "messages", "code": "context_length_exceeded"}}),
    "anthropic": (400, {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "prompt is too long: 210000 tokens > 200000 maximum"}}),
    "gemini": (400, {"error": {"code": 400, "message": "The input token count (1234567) exceeds the maximum number "
                               "of tokens allowed (1048576).", "status": "INVALID_ARGUMENT"}}),
    "codex": (400, {"error": {"message": "Your input exceeds the context window of this model. Please adjust your "
                              "input and try again.", "type": "invalid_request_error", "param": "input",
                              "code": "context_length_exceeded"}}),
}
OVERFLOW["vertex"] = OVERFLOW["gemini"]
AUTH = {
    "openai": (401, {"error": {"message": "Incorrect API key provided: k-openai. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.", "type": "invalid_request_error",
                               "code": "invalid_api_key"}}),
    "anthropic": (401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    "gemini": (400, {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                               "status": "INVALID_ARGUMENT"}}),
    "codex": (401, {"error": {"message": "Incorrect API key provided: k-codex.", "type": "invalid_request_error",
                              "code": "invalid_api_key"}}),
}
AUTH["gemini"] = (401, {"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                                  "status": "UNAUTHENTICATED"}})
AUTH["vertex"] = AUTH["gemini"]


def stream_error(fmt, overflow):
    """A stream that starts, then fails with the family's own error event: overloaded, or a context overflow."""
    if fmt == "openai":
        err = OVERFLOW["openai"][1]["error"] if overflow else {"message": "The server is overloaded", "type":
                                                               "server_error", "code": "server_error"}
        head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "" if overflow else "Hel"},
                             "finish_reason": None}]}
        return [json.dumps(head), json.dumps({"error": err})]
    if fmt == "anthropic":
        start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                      "model": "m", "content": [], "usage": {"input_tokens": 1}}}
        err = OVERFLOW["anthropic"][1] if overflow else {"type": "error", "error": {"type": "overloaded_error",
                                                                                   "message": "Overloaded"}}
        events = [("message_start", json.dumps(start))]
        if not overflow:
            events += [("content_block_start", json.dumps({"type": "content_block_start", "index": 0,
                                                           "content_block": {"type": "text", "text": ""}})),
                       ("content_block_delta", json.dumps({"type": "content_block_delta", "index": 0,
                                                           "delta": {"type": "text_delta", "text": "Hel"}}))]
        return events + [("error", json.dumps(err))]
    if fmt in ("gemini", "vertex"):
        err = OVERFLOW["gemini"][1] if overflow else {"error": {"code": 503, "message": "The model is overloaded.",
                                                                "status": "UNAVAILABLE"}}
        first = [] if overflow else [json.dumps({"candidates": [{"content": {"role": "model",
                                                                             "parts": [{"text": "Hel"}]}}]})]
        return first + [json.dumps(err)]
    resp = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m",
            "output": []}
    code, message = ("context_length_exceeded", OVERFLOW["codex"][1]["error"]["message"]) if overflow else \
        ("server_error", "The server had an error while processing your request")
    failed = dict(resp, status="failed", error={"code": code, "message": message})
    return [("response.created", json.dumps({"type": "response.created", "response": resp})),
            ("response.failed", json.dumps({"type": "response.failed", "response": failed}))]


def errors(fmt, sc, stream):
    """The error scenarios every family shares: overflow and auth failures as HTTP errors; a context overflow or
    an overload reported inside a stream."""
    if sc in ("overflowstream", "midstreamerr") and (stream or fmt == "codex"):
        return Reply("sse", events=stream_error(fmt, sc == "overflowstream"))
    table = {"overflow": OVERFLOW, "autherr": AUTH}.get(sc)
    if table is None or fmt not in table:
        return None
    status, body = table[fmt]
    return Reply(status=status, body=body)


def handler(rec):
    fmt = detect(rec.path)
    sc = scenario(rec.body)
    body = json.loads(rec.body) if rec.body else {}
    failing = errors(fmt, sc, bool(body.get("stream")) or ":streamGenerateContent" in rec.path)
    if failing is not None:
        return failing
    if fmt in ("gemini", "vertex"):
        if rec.path.endswith(":countTokens"):
            return Reply(body={"totalTokens": 42})
        stream = ":streamGenerateContent" in rec.path
        return GEMINI(sc, stream)
    if fmt == "anthropic":
        if rec.path.endswith("/count_tokens"):
            return Reply(body={"input_tokens": 37})
        return ANTHROPIC(sc, bool(body.get("stream")))
    if fmt == "openai":
        return OPENAI(sc, bool(body.get("stream")))
    if fmt == "codex":
        return CODEX(sc)
    return Reply(status=404, body={"error": {"message": "unknown path " + rec.path}})


# -- OpenAI chat ---------------------------------------------------------------------------------------------------
def OPENAI(sc, stream):
    if sc == "error429":
        return Reply(status=429, body={"error": {"message": "Rate limit reached (fake)", "type": "requests",
                                                 "code": "rate_limit_exceeded"}}, headers={"Retry-After": "3"})
    base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    usage = {"prompt_tokens": USAGE["input"], "completion_tokens": USAGE["output"],
             "total_tokens": USAGE["input"] + USAGE["output"], "prompt_tokens_details": {"cached_tokens": 2},
             "completion_tokens_details": {"reasoning_tokens": 3 if sc == "thinking" else 0}}
    if not stream:
        msg = {"role": "assistant", "content": "Hello from openai"}
        finish = "stop"
        if sc == "tools":
            msg = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_up1", "type": "function", "function": {"name": "get_weather",
                                                                    "arguments": '{"city":"Paris"}'}}]}
            finish = "tool_calls"
        elif sc == "thinking":
            msg = {"role": "assistant", "content": "Answer", "reasoning_content": "Let me think."}
        elif sc == "image":
            msg = {"role": "assistant", "content": "saw image"}
        return Reply(body={"id": "chatcmpl-up", "object": "chat.completion", "created": 1700000000, "model": "m",
                           "choices": [{"index": 0, "message": msg, "finish_reason": finish}], "usage": usage})

    def chunk(delta, fr=None):
        return json.dumps(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": fr}]))
    ev = [chunk({"role": "assistant", "content": ""})]
    finish = "stop"
    if sc == "tools":
        ev += [chunk({"tool_calls": [{"index": 0, "id": "call_up1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": ""}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})]
        finish = "tool_calls"
    elif sc == "thinking":
        ev += [chunk({"reasoning_content": "Let me "}), chunk({"reasoning_content": "think."}),
               chunk({"content": "Answer"})]
    else:
        ev += [chunk({"content": "Hello "}), chunk({"content": "from openai" if sc != "image" else "saw image"})]
    if sc == "midfail":
        return Reply("drop", events=ev)
    ev += [chunk({}, finish), json.dumps(dict(base, choices=[], usage=usage)), "[DONE]"]
    return Reply("sse", events=ev)


# -- Anthropic -----------------------------------------------------------------------------------------------------
def ANTHROPIC(sc, stream):
    if sc == "error429":
        return Reply(status=429, body={"type": "error", "error": {"type": "rate_limit_error",
                                                                  "message": "Rate limited (fake)"}},
                     headers={"retry-after": "3"})
    usage = {"input_tokens": 6, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 2,
             "output_tokens": USAGE["output"]}
    blocks = [{"type": "text", "text": "Hello from anthropic" if sc != "image" else "saw image"}]
    stop = "end_turn"
    if sc == "tools":
        blocks = [{"type": "tool_use", "id": "toolu_up1", "name": "get_weather", "input": {"city": "Paris"}}]
        stop = "tool_use"
    elif sc == "thinking":
        blocks = [{"type": "thinking", "thinking": "Let me think.", "signature": SIG["anthropic"]},
                  {"type": "text", "text": "Answer"}]
    if not stream:
        return Reply(body={"id": "msg_up1", "type": "message", "role": "assistant", "model": "m",
                           "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage})
    ev = [("message_start", json.dumps({"type": "message_start", "message": {
        "id": "msg_up1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": dict(usage, output_tokens=1)}})), ("ping", '{"type": "ping"}')]
    for i, b in enumerate(blocks):
        if b["type"] == "text":
            ev.append(("content_block_start", json.dumps({"type": "content_block_start", "index": i,
                                                          "content_block": {"type": "text", "text": ""}})))
            for piece in (b["text"][:5], b["text"][5:]):
                ev.append(("content_block_delta", json.dumps({"type": "content_block_delta", "index": i,
                                                              "delta": {"type": "text_delta", "text": piece}})))
        elif b["type"] == "thinking":
            ev.append(("content_block_start", json.dumps({"type": "content_block_start", "index": i, "content_block":
                                                          {"type": "thinking", "thinking": "", "signature": ""}})))
            ev.append(("content_block_delta", json.dumps({"type": "content_block_delta", "index": i, "delta":
                                                          {"type": "thinking_delta", "thinking": b["thinking"]}})))
            ev.append(("content_block_delta", json.dumps({"type": "content_block_delta", "index": i, "delta":
                                                          {"type": "signature_delta", "signature": b["signature"]}})))
        else:
            ev.append(("content_block_start", json.dumps({"type": "content_block_start", "index": i, "content_block":
                                                          {"type": "tool_use", "id": b["id"], "name": b["name"],
                                                           "input": {}}})))
            for piece in ('{"city":', ' "Paris"}'):
                ev.append(("content_block_delta", json.dumps({"type": "content_block_delta", "index": i, "delta":
                                                              {"type": "input_json_delta", "partial_json": piece}})))
        if sc == "midfail":
            return Reply("drop", events=ev)
        ev.append(("content_block_stop", json.dumps({"type": "content_block_stop", "index": i})))
    ev.append(("message_delta", json.dumps({"type": "message_delta", "delta": {"stop_reason": stop,
                                                                               "stop_sequence": None},
                                            "usage": {"output_tokens": USAGE["output"]}})))
    ev.append(("message_stop", '{"type":"message_stop"}'))
    return Reply("sse", events=ev)


# -- Gemini --------------------------------------------------------------------------------------------------------
def GEMINI(sc, stream):
    if sc == "error429":
        return Reply(status=429, body={"error": {"code": 429, "message": "Resource exhausted (fake)",
                                                 "status": "RESOURCE_EXHAUSTED", "details": [
                                                     {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                                      "retryDelay": "3s"}]}})
    um = {"promptTokenCount": USAGE["input"], "candidatesTokenCount": USAGE["output"],
          "cachedContentTokenCount": 2, "totalTokenCount": 15}
    parts = [{"text": "Hello from gemini" if sc != "image" else "saw image"}]
    if sc == "tools":
        parts = [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": SIG["gemini"]}]
    elif sc == "thinking":
        parts = [{"text": "Let me think.", "thought": True}, {"text": "Answer", "thoughtSignature": SIG["gemini"]}]
        um = dict(um, thoughtsTokenCount=3, totalTokenCount=18)

    def obj(ps, finish=None, usage=None):
        cand = {"content": {"role": "model", "parts": ps}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        o = {"candidates": [cand], "modelVersion": "gemini-x", "responseId": "resp-g1"}
        if usage:
            o["usageMetadata"] = usage
        return o
    if not stream:
        return Reply(body=obj(parts, "STOP", um))
    ev = [json.dumps(obj([p])) for p in parts[:-1]]
    last = parts[-1]
    if "text" in last and not last.get("thought") and len(last["text"]) > 4:
        ev.append(json.dumps(obj([{"text": last["text"][:4]}])))
        last = dict(last, text=last["text"][4:])
    if sc == "midfail":
        return Reply("drop", events=ev)
    ev.append(json.dumps(obj([last], "STOP", um)))
    return Reply("sse", events=ev)


# -- Codex (Responses API) -----------------------------------------------------------------------------------------
def CODEX(sc):
    if sc == "error429":
        return Reply(status=429, body={"error": {"message": "Rate limit reached (fake)", "type": "rate_limit_exceeded"}},
                     headers={"Retry-After": "3"})
    seq = [0]

    def ev(obj):
        obj["sequence_number"] = seq[0]
        seq[0] += 1
        return (obj["type"], json.dumps(obj))
    resp = {"id": "resp_up1", "object": "response", "created_at": 1700000000, "status": "in_progress",
            "model": "m", "output": [], "usage": None}
    out = [ev({"type": "response.created", "response": resp}), ev({"type": "response.in_progress", "response": resp})]
    items = []
    idx = 0
    if sc == "thinking":
        item = {"type": "reasoning", "id": "rs_up1", "summary": []}
        out.append(ev({"type": "response.output_item.added", "output_index": idx, "item": item}))
        out.append(ev({"type": "response.reasoning_summary_text.delta", "item_id": "rs_up1", "output_index": idx,
                       "summary_index": 0, "delta": "Let me think."}))
        done = {"type": "reasoning", "id": "rs_up1", "summary": [{"type": "summary_text", "text": "Let me think."}],
                "encrypted_content": SIG["codex"]}
        out.append(ev({"type": "response.output_item.done", "output_index": idx, "item": done}))
        items.append(done)
        idx += 1
    if sc == "tools":
        item = {"type": "function_call", "id": "fc_up1", "call_id": "call_up1", "name": "get_weather",
                "arguments": "", "status": "in_progress"}
        out.append(ev({"type": "response.output_item.added", "output_index": idx, "item": item}))
        for piece in ('{"city":', '"Paris"}'):
            out.append(ev({"type": "response.function_call_arguments.delta", "item_id": "fc_up1",
                           "output_index": idx, "delta": piece}))
        done = dict(item, arguments='{"city":"Paris"}', status="completed")
        out.append(ev({"type": "response.output_item.done", "output_index": idx, "item": done}))
        items.append(done)
    else:
        text = {"thinking": "Answer", "image": "saw image"}.get(sc, "Hello from codex")
        item = {"type": "message", "id": "msg_up1", "status": "in_progress", "role": "assistant", "content": []}
        out.append(ev({"type": "response.output_item.added", "output_index": idx, "item": item}))
        out.append(ev({"type": "response.content_part.added", "item_id": "msg_up1", "output_index": idx,
                       "content_index": 0, "part": {"type": "output_text", "text": ""}}))
        for piece in (text[:4], text[4:]):
            out.append(ev({"type": "response.output_text.delta", "item_id": "msg_up1", "output_index": idx,
                           "content_index": 0, "delta": piece}))
        if sc == "midfail":
            return Reply("drop", events=out)
        done = dict(item, status="completed", content=[{"type": "output_text", "text": text, "annotations": []}])
        out.append(ev({"type": "response.output_item.done", "output_index": idx, "item": done}))
        items.append(done)
    final = dict(resp, status="completed", output=items, usage={
        "input_tokens": USAGE["input"], "input_tokens_details": {"cached_tokens": 2}, "output_tokens": USAGE["output"],
        "output_tokens_details": {"reasoning_tokens": 3 if sc == "thinking" else 0}, "total_tokens": 15})
    out.append(ev({"type": "response.completed", "response": final}))
    return Reply("sse", events=out)


CONFIG = """
providers:
  - type: openai
    name: up-openai
    base-url: {url}/v1
    api-key: k-openai
    models: [{{name: m-openai, alias: up-openai}}]
  - type: anthropic
    base-url: {url}
    api-key: k-anthropic
    models: [{{name: m-anthropic, alias: up-anthropic}}]
  - type: gemini
    base-url: {url}
    api-key: k-gemini
    models: [{{name: m-gemini, alias: up-gemini}}]
  - type: vertex-compat
    base-url: {url}
    api-key: k-vertex
    models: [{{name: m-vertex, alias: up-vertex}}]
  - type: codex
    base-url: {url}/v1
    api-key: k-codex
    models: [{{name: m-codex, alias: up-codex}}]
request-retry: 0
"""
UPSTREAMS = ["up-openai", "up-anthropic", "up-gemini", "up-vertex", "up-codex"]
