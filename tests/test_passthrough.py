"""Same-format pass-through: a stream whose client and upstream speak one format (OpenAI chat, Anthropic, Gemini
SSE, Responses) reaches the client frame by frame as the upstream sent it — only the model field names the model
the client asked for — while the Call still observes usage, the finish and errors, and an error is still answered
in the client's format (an HTTP status before any content, the format's error frame after)."""
import http.client
import json
import re
import socket
import time

import pytest

import llm_mux
import upstreams
from fakes import FakeUpstream, Reply
from harness import GatewayThread, Observed, wait_until

PROMPT = "hello SCENARIO:%s"
FAMILIES = {
    # family: (path, asked model, request body, the upstream's own reply for a scenario, is a frame content?)
    "openai": ("/v1/chat/completions", "up-openai",
               lambda sc: {"model": "up-openai", "stream": True, "messages": [{"role": "user", "content": PROMPT % sc}]},
               lambda sc: upstreams.OPENAI(sc, True), lambda ev: '"content": "Hello ' in ev),
    "anthropic": ("/v1/messages", "up-anthropic",
                  lambda sc: {"model": "up-anthropic", "max_tokens": 50, "stream": True,
                              "messages": [{"role": "user", "content": PROMPT % sc}]},
                  lambda sc: upstreams.ANTHROPIC(sc, True), lambda ev: ev[0] == "content_block_delta"),
    "gemini": ("/v1beta/models/up-gemini:streamGenerateContent?alt=sse", "up-gemini",
               lambda sc: {"contents": [{"role": "user", "parts": [{"text": PROMPT % sc}]}]},
               lambda sc: upstreams.GEMINI(sc, True), lambda ev: '"Hell"' in ev),
    "responses": ("/v1/responses", "up-codex",
                  lambda sc: {"model": "up-codex", "stream": True, "input": PROMPT % sc},
                  lambda sc: upstreams.CODEX(sc), lambda ev: ev[0] == "response.output_text.delta"),
}


@pytest.fixture
def env():
    made = []

    def _env(handler=upstreams.handler):
        up = FakeUpstream(handler).start()
        gw = GatewayThread(upstreams.CONFIG.format(url=up.url), fake_clock=False)
        made.append((gw, up))
        return gw, up, Observed(gw.gateway)
    yield _env
    for gw, up in made:
        gw.stop()
        up.stop()


def post(gw, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    return resp.status, data


def frames(text):
    """(event or None, data) for every SSE frame of a body."""
    out = []
    for block in re.split(r"\r?\n\r?\n", text):
        event = None
        data = []
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append((event, "\n".join(data)))
    return out


def upstream_frames(events):
    return [ev if isinstance(ev, tuple) else (None, ev) for ev in events if not isinstance(ev, (int, float))]


def as_asked(frame, model):
    """The upstream's frame with its model field naming the asked model, as the relay writes it."""
    event, data = frame
    return event, re.sub(r'"(model|modelVersion)": "[^"]*"', lambda m: '"%s": "%s"' % (m.group(1), model), data,
                         count=1)


def finished(gw, seen):
    call = wait_until(lambda: seen.calls and seen.calls[0], what="the call to finish")
    assert sum(c.in_flight for p in gw.gateway.registry.providers for c in p.credentials) == 0
    return call


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scenario", ["text", "tools", "thinking"])
def test_same_format_streams_reach_the_client_as_the_upstream_sent_them(env, family, scenario):
    gw, _, seen = env()
    path, model, body, reply, _ = FAMILIES[family]
    status, text = post(gw, path, body(scenario))
    assert status == 200
    expected = [as_asked(f, model) for f in upstream_frames(reply(scenario).events)]
    if family == "openai":  # usage the client did not ask for (the gateway always asks the upstream)
        expected = [f for f in expected if '"choices": [], "usage"' not in f[1]]
    # byte-for-byte: the upstream's own spacing (json.dumps's ", " and ": "), ids and event names
    assert frames(text) == expected
    call = finished(gw, seen)
    thoughts = 3 if family == "gemini" and scenario == "thinking" else 0  # Gemini counts thoughts apart
    assert (call.outcome, call.usage.input_tokens, call.usage.output_tokens) == ("ok", 10, 5 + thoughts)
    if family != "anthropic":  # Anthropic reports no reasoning count
        assert call.usage.reasoning_tokens == (3 if scenario == "thinking" else 0)


def test_openai_usage_chunk_relayed_when_the_client_asks_for_it(env):
    gw, _, seen = env()
    body = FAMILIES["openai"][2]("text")
    body["stream_options"] = {"include_usage": True}
    status, text = post(gw, "/v1/chat/completions", body)
    got = frames(text)
    assert status == 200 and got == [as_asked(f, "up-openai") for f in upstream_frames(upstreams.OPENAI(
        "text", True).events)]
    assert json.loads(got[-2][1])["usage"]["prompt_tokens"] == 10
    assert finished(gw, seen).usage.output_tokens == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_relayed_frames_are_not_decoded(env, monkeypatch, family):
    """Frames are decoded until the first content, then only where usage, finish or errors may be: a stream of
    60 content frames costs the same handful of decodes as one of 2."""
    path, model, body, reply, is_content = FAMILIES[family]
    decoder = {"openai": llm_mux.OpenAIChat, "anthropic": llm_mux.Anthropic, "gemini": llm_mux.Gemini,
               "responses": llm_mux.Responses}[family].StreamDecoder
    decoded = []
    feed = decoder.feed
    monkeypatch.setattr(decoder, "feed", lambda self, event, data: decoded.append(data) or feed(self, event, data))

    def long_stream(rec):
        events = reply("text").events
        at = next(i for i, ev in enumerate(events) if is_content(ev))
        return Reply("sse", events=events[:at] + [events[at]] * 60 + events[at + 1:])
    gw, _, seen = env(long_stream)
    status, text = post(gw, path, body("text"))
    assert status == 200 and len(frames(text)) > 60
    assert len(decoded) <= 7, decoded
    assert finished(gw, seen).usage.output_tokens == 5


@pytest.mark.parametrize("family", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("scenario", ["midstreamerr", "midfail"])
def test_an_error_after_content_ends_the_relayed_stream_with_the_formats_error_frame(env, family, scenario):
    gw, _, seen = env()
    path, model, body, reply, _ = FAMILIES[family]
    status, text = post(gw, path, body(scenario))
    assert status == 200
    got = frames(text)
    assert any("Hel" in data for _, data in got[:-1])  # the content before the failure was relayed
    event, data = got[-1]
    err = json.loads(data)
    if family == "anthropic":
        assert event == "error" and err["type"] == "error" and err["error"]["message"]
    else:  # OpenAI's and Gemini's error objects, as the gateway writes them
        assert set(err["error"]) >= ({"message", "type", "param", "code"} if family == "openai"
                                     else {"code", "message", "status"})
    call = finished(gw, seen)
    assert call.outcome == "failed" and call.status == 200 and call.failure.status >= 500


def test_a_responses_stream_failing_mid_way_ends_with_response_failed(env):
    gw, _, seen = env()
    status, text = post(gw, "/v1/responses", FAMILIES["responses"][2]("midfail"))
    got = frames(text)
    assert status == 200 and got[-2][0] == "response.output_text.delta"
    assert got[-1][0] == "response.failed" and json.loads(got[-1][1])["response"]["error"]["message"]
    assert finished(gw, seen).outcome == "failed"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_error_before_any_content_is_an_http_error_in_the_clients_format(env, family):
    gw, _, seen = env()
    path, model, body, reply, _ = FAMILIES[family]
    status, text = post(gw, path, body("overflowstream"))
    assert status == 400
    err = json.loads(text)
    message = err["error"]["message"]
    assert message.lower().startswith("prompt is too long") if family == "anthropic" else \
        err["error"]["code"] in ("context_length_exceeded", 400)
    call = finished(gw, seen)
    assert call.outcome == "failed" and call.failure.status == 400


@pytest.mark.parametrize("family", FAMILIES)
def test_a_client_leaving_mid_stream_finishes_the_call(env, family):
    path, model, body, reply, is_content = FAMILIES[family]

    def stalling(rec):
        events = reply("text").events
        at = next(i for i, ev in enumerate(events) if is_content(ev))
        return Reply("sse", events=events[:at + 1] + [30] + events[at + 1:])
    gw, up, seen = env(stalling)
    raw = json.dumps(body("text")).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (path.encode(), len(raw), raw))
        got = b""
        while b"Hel" not in got:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    call = finished(gw, seen)
    assert call.outcome in ("client_gone", "cancelled") and call.status == 200


def test_other_pairs_and_framings_are_translated_not_relayed(env):
    gw, _, seen = env()
    # an Anthropic client on an OpenAI upstream: the gateway's own Anthropic events
    status, text = post(gw, "/v1/messages", dict(FAMILIES["anthropic"][2]("text"), model="up-openai"))
    got = frames(text)
    assert status == 200 and got[0][0] == "message_start" and '"model":"up-openai"' in got[0][1]
    assert "".join(json.loads(d)["delta"].get("text", "") for e, d in got if e == "content_block_delta") == \
        "Hello from openai"
    # a Gemini client reading the JSON-array framing gets an array, not the upstream's SSE
    status, text = post(gw, "/v1beta/models/up-gemini:streamGenerateContent", FAMILIES["gemini"][2]("text"))
    chunks = json.loads(text)
    assert status == 200 and "".join(p.get("text", "") for c in chunks for p in c["candidates"][0]["content"]
                                     ["parts"]) == "Hello from gemini"
    assert [c.outcome for c in seen.calls] == ["ok", "ok"]


def test_only_the_frames_own_model_field_is_renamed():
    req = llm_mux.ChatRequest("asked", [llm_mux.Message("user", [llm_mux.Text("x")])])
    relay = llm_mux.FrameRelay(llm_mux.OpenAIChat, req, llm_mux.OpenAIChat.StreamDecoder(req))
    text = json.dumps('say {"model": "up"} and "model":"up"')  # the field's text inside content is escaped
    frames = ['{"model": "up", "choices": [{"index": 0, "delta": {"content": %s}, "finish_reason": null}]}' % text,
              '{"model": "up", "choices": [{"index": 0, "delta": {"content": %s}, "finish_reason": null}]}' % text,
              '{"id": 1, "model":"up-2", "choices": [{"index": 0, "delta": {"content": %s}}]}' % text,  # spelt anew
              '{"model":"up-2", "choices": [{"index": 0, "delta": {"content": %s}}]}' % text]
    names, events = [], []
    for event, data in relay.split("".join("data: %s\n\n" % f for f in frames).encode()):
        names.append(event)
        events += relay.feed(event, data)
    # the first frame is decoded (the lead), the second relayed, the third decoded (the field spelt anew, which
    # the fourth is relayed with)
    assert names == [None, llm_mux.RELAYED, None, llm_mux.RELAYED]
    out = b"".join(ev.data for ev in events if ev.kind == "raw").decode()
    chunks = [json.loads(line[6:]) for line in out.split("\n\n") if line]
    assert len(chunks) == 4
    for chunk in chunks:
        assert chunk["model"] == "asked" and chunk["choices"][0]["delta"]["content"] == json.loads(text)


def test_gemini_usage_from_the_last_frame_that_carried_it():
    """Gemini repeats cumulative usageMetadata in many chunks: the relay decodes only the last one it relayed."""
    req = llm_mux.ChatRequest("asked", [llm_mux.Message("user", [llm_mux.Text("x")])])
    relay = llm_mux.FrameRelay(llm_mux.Gemini, req, llm_mux.Gemini.StreamDecoder(req))

    def chunk(text, out):
        return json.dumps({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}],
                           "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": out}})
    events = []
    for i in range(1, 6):
        events += relay.feed(None, chunk("t%d" % i, i))
    events += relay.close()  # no finishReason chunk: the stream simply ended
    usage = [ev.usage for ev in events if ev.kind == "usage"]
    assert [(u.input_tokens, u.output_tokens) for u in usage] == [(4, 5)]
    assert sum(ev.kind == "raw" for ev in events) == 5 and events[-1].kind == "finish"


def test_openai_usage_riding_on_a_content_chunk_is_taken_off_for_a_client_that_did_not_ask():
    req = llm_mux.ChatRequest("m", [llm_mux.Message("user", [llm_mux.Text("x")])])
    data = json.dumps({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    edited = json.loads(llm_mux.OpenAIChat.relay_edit(req, None, data))
    assert "usage" not in edited and edited["choices"][0]["finish_reason"] == "stop"
    req.include_usage = True
    assert llm_mux.OpenAIChat.relay_edit(req, None, data) == data


def test_a_read_of_many_frames_leaves_in_one_piece_each_renamed():
    """The relay judges a whole upstream read at once: a run of plain frames is one relayed piece, every frame's
    model field names the asked model (an alias), and a frame that spells the field anew splits the run and is
    decoded."""
    req = llm_mux.ChatRequest("alias", [llm_mux.Message("user", [llm_mux.Text("x")])])
    relay = llm_mux.FrameRelay(llm_mux.OpenAIChat, req, llm_mux.OpenAIChat.StreamDecoder(req))
    text = json.dumps('quoting "model":"up" in content')

    def chunk(model, i):
        return 'data: {"id":"c","model":"%s","choices":[{"index":0,"delta":{"content":%s},' \
               '"finish_reason":null}]}\n\n' % (model, json.dumps("%d %s" % (i, text)))
    body = "".join(chunk("up", i) for i in range(20)) + chunk("up-v2", 20) + \
        "".join(chunk("up-v2", i) for i in range(21, 30))
    names, events = [], []
    for event, data in relay.split(body.encode()):
        names.append(event)
        events += relay.feed(event, data)
    assert names == [None, llm_mux.RELAYED, None, llm_mux.RELAYED]
    out = b"".join(ev.data for ev in events if ev.kind == "raw").decode()
    chunks = [json.loads(block[6:]) for block in out.split("\n\n") if block]
    assert [c["model"] for c in chunks] == ["alias"] * 30
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["%d %s" % (i, text) for i in range(30)]


def test_gemini_usage_from_the_last_frame_of_a_relayed_run():
    req = llm_mux.ChatRequest("asked", [llm_mux.Message("user", [llm_mux.Text("x")])])
    relay = llm_mux.FrameRelay(llm_mux.Gemini, req, llm_mux.Gemini.StreamDecoder(req))

    def frame(text, out):
        usage = {"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": out}} if out else {}
        return "data: %s\r\n\r\n" % json.dumps(dict({"candidates": [{"content": {"role": "model", "parts": [
            {"text": text}]}}]}, **usage))
    body = "".join(frame("t%d" % i, i if i % 3 else 0) for i in range(1, 13))  # the last tally: 11; CRLF frames
    events = []
    for event, data in relay.split(body.encode()):
        events += relay.feed(event, data)
    events += relay.close()
    usage = [ev.usage for ev in events if ev.kind == "usage"]
    assert [(u.input_tokens, u.output_tokens) for u in usage[-1:]] == [(4, 11)]
    relayed = b"".join(ev.data for ev in events if ev.kind == "raw").decode()
    assert relayed.count("\r\n\r\n") == 11 and '"t12"' in relayed  # the first (the lead) is framed anew


def test_frame_ends_found_by_find_agree_with_the_pattern():
    rng = __import__("random").Random(7)
    for _ in range(3000):
        buf = bytes(rng.choice(b"ab\n\n\r:") for _ in range(rng.randrange(0, 40)))
        assert llm_mux.sse_frame_ends(buf) == [m.end() for m in llm_mux._SSE_FRAME_END.finditer(buf)], buf


def _raw_stream_upstream(frames):
    """A one-connection upstream that writes `frames` (bytes, one chunk each) as fast as the gateway takes them,
    counting what it managed to send."""
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    sent = [0]

    def serve():
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            n = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < n:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for frame in frames:
                chunk = b"%x\r\n%s\r\n" % (len(frame), frame)
                conn.sendall(chunk)
                sent[0] += len(chunk)
            conn.sendall(b"0\r\n\r\n")
        srv.close()
    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], sent


def test_a_client_that_stops_reading_holds_the_upstream_back_then_gets_every_event(gateway):
    """Back-pressure on the stream path: while the client reads nothing the gateway stops reading the upstream (it
    holds a bounded amount, not the 60 MB stream), and once the client reads again every event comes, in order."""
    n, pad = 6000, "x" * 10000
    frames = [b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-test","choices":[{"index":0,'
              b'"delta":{"content":"%05d%s"},"finish_reason":null}]}\n\n' % (i, pad.encode()) for i in range(n)]
    frames.append(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-test","choices":[{'
                  b'"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":'
                  b'6000,"total_tokens":6001}}\n\ndata: [DONE]\n\n')
    total = sum(len(b"%x\r\n%s\r\n" % (len(f), f)) for f in frames)  # as the upstream sends them
    port, sent = _raw_stream_upstream(frames)
    gw = gateway("providers:\n  - type: openai\n    base-url: http://127.0.0.1:%d/v1\n    api-key: k\n"
                 "    models: [gpt-test]\n" % port)
    body = json.dumps({"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    client.connect(("127.0.0.1", gw.port))
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    seen = []  # (sent, when) while the client reads nothing

    def stalled():
        now = time.monotonic()
        if not seen or seen[-1][0] != sent[0]:
            seen.append((sent[0], now))
        return sent[0] > 0 and now - seen[-1][1] >= 1.0
    wait_until(stalled, timeout=60, what="the upstream to be held back")
    assert sent[0] < total * 2 // 3, "the gateway took %d of %d bytes from the upstream for a client that reads " \
                                      "nothing" % (sent[0], total)
    client.settimeout(30)
    got = bytearray()
    while not got.endswith(b"0\r\n\r\n"):
        data = client.recv(1 << 20)
        assert data, "the gateway closed the stream early"
        got += data
    client.close()
    numbers = [int(m) for m in re.findall(rb'"content": ?"(\d{5})x', bytes(got))]
    assert numbers == list(range(n))
    assert b"[DONE]" in got and sent[0] == total


def test_a_stream_that_keeps_coming_is_not_cut_by_stream_timeout_but_one_that_goes_silent_is(gateway, upstream):
    """stream-timeout bounds the silence between chunks, not the stream: chunks every 0.3 s for 4.8 s with a 2 s
    stream-timeout all arrive (a margin of 1.7 s for a loaded machine); three chunks and then 5 s of silence end in
    a timeout error after those three."""
    from fakes import openai_stream_events
    from harness import openai_provider_config
    import openai
    steady = []
    for ev in openai_stream_events(pieces=["p%d " % i for i in range(14)]):
        steady += [ev, 0.3]

    def reply(r):
        if "silent" in r.body.decode():
            return Reply("sse", events=openai_stream_events(pieces=["a", "b", "c"], finish=None, usage=False,
                                                            done=False)[:4] + [5.0, "[DONE]"])
        return Reply("sse", events=steady)
    up = upstream(reply)
    gw = gateway(openai_provider_config(up.url) + "stream-timeout: 2\nrequest-retry: 0\n")
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=60)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "steady"}], stream=True) if ch.choices)
    assert text == "".join("p%d " % i for i in range(14))
    got = []
    with pytest.raises(openai.APIError) as e:
        for ch in c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "silent"}],
                                            stream=True):
            got.append(ch.choices[0].delta.content if ch.choices else None)
    assert [g for g in got if g] == ["a", "b", "c"]
    assert "sent nothing for 2s" in str(e.value)
