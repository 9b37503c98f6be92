"""Fuzz target for every upstream decoder (OpenAI chat, Anthropic, Gemini and its Code Assist envelope, Responses,
Kiro; streams and whole answers): valid upstream frames with values swapped for wrong types at random paths, fed
through the decoder as a call feeds it, and the events that come out through every client format's encoder.

What must hold: a decoder raises nothing but the protocol errors a call turns into a 502 / an error event (the
exception kinds in GUARDED, as Call._guard catches them); every event it emits is one the five encoders can
write (an encoder never raises); a whole answer parses or raises the same kinds."""
import copy
import json
import os
import random

import llm_mux
from test_fuzz_codecs import mutate

CASES = int(os.environ.get("LLM_MUX_FUZZ_CASES", "20000")) // 4
GUARDED = (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError,
           llm_mux.UpstreamError, llm_mux.GatewayError)

STREAMS = {
    "openai": [("", {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                   "content": "Hel"}}]}),
               ("", {"id": "c1", "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}),
               ("", {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
                   {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}),
               ("", {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
                   {"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]}),
               ("", {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                         "prompt_tokens_details": {"cached_tokens": 1}}})],
    "anthropic": [("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {
                      "input_tokens": 3, "output_tokens": 1}}}),
                  ("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "thinking", "thinking": ""}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "signature_delta", "signature": "sig"}}),
                  ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                  ("content_block_start", {"type": "content_block_start", "index": 1,
                                           "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                           "delta": {"type": "input_json_delta", "partial_json": "{\"a\":1}"}}),
                  ("content_block_stop", {"type": "content_block_stop", "index": 1}),
                  ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                     "usage": {"output_tokens": 9}}),
                  ("message_stop", {"type": "message_stop"})],
    "gemini": [("", {"responseId": "r1", "modelVersion": "m", "candidates": [{"index": 0, "content": {
                   "role": "model", "parts": [{"text": "hmm", "thought": True, "thoughtSignature": "c2ln"}]}}]}),
               ("", {"candidates": [{"content": {"parts": [{"text": "Hi"}, {"functionCall": {
                   "name": "f", "args": {"a": 1}}}]}, "finishReason": "STOP"}],
                     "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "thoughtsTokenCount": 1}})],
    "responses": [("response.created", {"type": "response.created", "response": {"id": "resp_1", "model": "m"}}),
                  ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                                                  "item": {"type": "reasoning", "id": "rs_1"}}),
                  ("response.reasoning_summary_text.delta", {"type": "response.reasoning_summary_text.delta",
                                                             "item_id": "rs_1", "delta": "hmm"}),
                  ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": {
                      "type": "reasoning", "id": "rs_1", "encrypted_content": "enc", "summary": [
                          {"type": "summary_text", "text": "hmm"}]}}),
                  ("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 1,
                                                  "delta": "Hi"}),
                  ("response.output_item.added", {"type": "response.output_item.added", "output_index": 2, "item": {
                      "type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": ""}}),
                  ("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                              "output_index": 2, "delta": "{}"}),
                  ("response.completed", {"type": "response.completed", "response": {
                      "id": "resp_1", "status": "completed", "usage": {"input_tokens": 3, "output_tokens": 4,
                                                                       "output_tokens_details": {"reasoning_tokens": 1}}}})],
    "kiro": [("assistantResponseEvent", {"content": "Hel"}), ("assistantResponseEvent", {"content": "lo"}),
             ("toolUseEvent", {"toolUseId": "tu-1", "name": "f", "input": "{\"a\":"}),
             ("toolUseEvent", {"toolUseId": "tu-1", "name": "f", "input": "1}"}),
             ("toolUseEvent", {"toolUseId": "tu-1", "name": "f", "stop": True}),
             ("meteringEvent", {"unit": "credit", "usage": 0.1})],
}
STREAMS["gemini-envelope"] = [(e, {"response": d}) for e, d in STREAMS["gemini"]]

ANSWERS = {
    "openai": {"id": "c1", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Hi", "reasoning_content": "hmm", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    "anthropic": {"id": "msg_1", "type": "message", "model": "m", "stop_reason": "end_turn", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "Hi"},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}], "usage": {"input_tokens": 3,
                                                                                    "output_tokens": 4}},
    "gemini": {"responseId": "r1", "candidates": [{"content": {"parts": [
        {"text": "hmm", "thought": True}, {"text": "Hi", "thoughtSignature": "c2ln"},
        {"functionCall": {"name": "f", "args": {}}}]}, "finishReason": "STOP"}],
               "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}},
    "responses": {"id": "resp_1", "model": "m", "status": "completed", "output": [
        {"type": "reasoning", "id": "rs_1", "encrypted_content": "enc", "summary": [{"type": "summary_text",
                                                                                     "text": "hmm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}],
                  "usage": {"input_tokens": 3, "output_tokens": 4}},
}
CODECS = {"openai": llm_mux.OpenAIChat, "anthropic": llm_mux.Anthropic, "gemini": llm_mux.Gemini,
          "responses": llm_mux.Responses}
ENCODERS = [llm_mux.OpenAIChat, llm_mux.Anthropic, llm_mux.Gemini, llm_mux.Responses, llm_mux.Ollama]


def request():
    return llm_mux.ChatRequest("m", [llm_mux.Message("user", [llm_mux.Text("x")])])


def decoder_for(family, req):
    if family == "kiro":
        return llm_mux.KiroStreamDecoder()
    if family == "gemini-envelope":
        return llm_mux.EnvelopeDecoder(llm_mux.Gemini.StreamDecoder(req))
    return CODECS[family].StreamDecoder(req)


def run_stream(family, frames):
    """Decode `frames` as a call does and write the events with every encoder. Returns whether the decoder
    refused the stream (a protocol error); any other exception fails the test."""
    req = request()
    decoder = decoder_for(family, req)
    encoders = [codec.StreamEncoder(req) for codec in ENCODERS]
    events = []
    try:
        for name, data in frames:
            events.extend(decoder.feed(name, data))
        events.extend(decoder.close())
    except GUARDED:
        return True
    if llm_mux.ir_problem(events):  # a call refuses these too (Call._guard): the encoders never see them
        return True
    for ev in events:
        for enc in encoders:
            assert isinstance(enc.encode(ev), bytes)
    for enc in encoders:
        enc.encode(llm_mux.Finish("stop"))
        enc.close()
    return False


def test_the_seeds_decode_cleanly():
    for family, frames in STREAMS.items():
        assert not run_stream(family, [(e, json.dumps(d)) for e, d in frames]), family
    for family, data in ANSWERS.items():
        assert CODECS[family].parse_response(copy.deepcopy(data)).parts, family


def test_every_upstream_decoder_raises_only_protocol_errors_and_emits_writable_events():
    rng = random.Random(16)
    refused = 0
    for _ in range(CASES):
        family = rng.choice(sorted(STREAMS))
        frames = copy.deepcopy(STREAMS[family])
        k = rng.randrange(len(frames))
        name, data = frames[k]
        frames[k] = (name, mutate(rng, data) if rng.random() < 0.9 else rng.choice([[], 7, "x"]))
        wire = [(n, json.dumps(d) if rng.random() < 0.97 else json.dumps(d)[:rng.randrange(1, 20)])
                for n, d in frames]
        refused += run_stream(family, wire)
    for _ in range(CASES // 2):
        family = rng.choice(sorted(ANSWERS))
        data = mutate(rng, ANSWERS[family])
        try:
            resp = CODECS[family].parse_response(data)
        except GUARDED:
            continue
        if llm_mux.ir_problem(resp):
            continue
        for codec in ENCODERS:
            codec.build_response(resp, request())
    assert refused < CASES  # most mutations decode (or are skipped) rather than end the stream


def test_the_same_format_relay_raises_only_protocol_errors_and_writes_bytes():
    """FrameRelay (same-format pass-through) over the same mutated streams: it raises only what Call._guard turns
    into an error event, and its encoder turns every event it emits into bytes (relayed frames, error frames)."""
    rng = random.Random(17)
    for _ in range(CASES // 2):
        family = rng.choice(sorted(CODECS))
        frames = copy.deepcopy(STREAMS[family])
        k = rng.randrange(len(frames))
        name, data = frames[k]
        frames[k] = (name, mutate(rng, data) if rng.random() < 0.9 else rng.choice([[], 7, "x"]))
        req = request()
        req.include_usage = rng.random() < 0.5
        relay = llm_mux.FrameRelay(CODECS[family], req, CODECS[family].StreamDecoder(req))
        wire = b"".join(("%sdata: %s\n\n" % ("event: %s\n" % n if n else "", json.dumps(d) if rng.random() < 0.97
                                               else json.dumps(d)[:9])).encode() for n, d in frames)
        cuts = sorted(rng.sample(range(1, len(wire)), min(3, len(wire) - 1)))
        events = []
        try:
            for a, b in zip([0] + cuts, cuts + [len(wire)]):  # the bytes as an upstream's reads may cut them
                for event, data in relay.split(wire[a:b]):
                    events.extend(relay.feed(event, data))
            for event, data in relay.split_end():
                events.extend(relay.feed(event, data))
            events.extend(relay.close())
        except GUARDED:
            continue
        if llm_mux.ir_problem(events):
            continue
        for ev in events:
            assert isinstance(relay.encoder.encode(ev), bytes)
