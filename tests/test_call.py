"""The Call owns one upstream attempt: whatever way the attempt ends, `finish` runs exactly once with the right
outcome, the in-flight count returns to zero, and the observers (where usage and metrics hang) hear of it."""
import asyncio
import json
import socket

import pytest

import llm_mux
from fakes import FakeUpstream, Reply, free_port, openai_completion, openai_stream_events
from harness import GatewayThread, Observed, openai_provider, wait_until


@pytest.fixture
def setup():
    made = []

    def _setup(reply, cfg="request-retry: 0\nmax-retry-interval: 0\n", url=None):
        up = None
        if url is None:
            up = FakeUpstream(reply if callable(reply) else (lambda r: reply)).start()
            url = up.url
        gw = GatewayThread(cfg + "providers:\n" + openai_provider(url, ["k1"]), fake_clock=False)
        made.append((gw, up))
        return gw, up, Observed(gw.gateway)
    yield _setup
    for gw, up in made:
        gw.stop()
        if up is not None:
            up.stop()


def request(stream=False):
    return llm_mux.OpenAIChat.parse_request({"model": "m", "stream": stream,
                                             "messages": [{"role": "user", "content": "hi"}]})


async def collect(gateway, stream):
    call = await gateway.call(request(stream))
    if not stream:
        return await call.answer()
    return [ev async for ev in call.events()]


def settled(gw, seen):
    assert gw.cred("k1").in_flight == 0
    return seen.one()


def test_success_non_stream(setup):
    gw, _, seen = setup(Reply(body=openai_completion("fine")))
    answer = gw.run(collect(gw.gateway, False))
    assert answer.parts[0].text == "fine"
    call = settled(gw, seen)
    assert (call.outcome, call.status, call.kind, call.failure) == ("ok", 200, "chat", None)
    assert call.usage.output_tokens == 7 and call.first_byte >= call.started and call.ended >= call.first_byte


def test_success_stream_keeps_usage(setup):
    gw, _, seen = setup(Reply("sse", events=openai_stream_events()))
    events = gw.run(collect(gw.gateway, True))
    assert events[-1].kind in ("finish", "usage")
    call = settled(gw, seen)
    assert call.outcome == "ok" and call.usage.input_tokens == 5


@pytest.mark.parametrize("status, category", [(400, "user_error"), (404, "not_found"), (429, "quota"),
                                              (500, "transient"), (503, "transient")])
def test_upstream_error_statuses(setup, status, category):
    gw, _, seen = setup(Reply(status=status, body={"error": {"message": "model m: nope %d" % status}}))
    with pytest.raises(llm_mux.GatewayError) as e:
        gw.run(collect(gw.gateway, False))
    assert e.value.status == status
    call = settled(gw, seen)
    assert (call.outcome, call.status, call.failure.status, call.failure.category) == \
        ("failed", status, status, category)


def test_connect_failure(setup):
    gw, _, seen = setup(None, url="http://127.0.0.1:%d" % free_port())
    with pytest.raises(llm_mux.GatewayError) as e:
        gw.run(collect(gw.gateway, False))
    assert e.value.status == 502
    call = settled(gw, seen)
    assert call.outcome == "failed" and call.status is None and call.failure.type == "upstream"


def test_timeout(setup):
    gw, _, seen = setup(Reply("hang"), cfg="request-retry: 0\nmax-retry-interval: 0\nstream-timeout: 1\n")
    with pytest.raises(llm_mux.GatewayError) as e:
        gw.run(collect(gw.gateway, False))
    assert e.value.status == 504
    call = settled(gw, seen)
    assert call.outcome == "failed" and call.failure.type == "timeout"


def test_upstream_dies_mid_stream(setup):
    gw, _, seen = setup(Reply("drop", events=openai_stream_events(done=False, finish=None, usage=False)))
    events = gw.run(collect(gw.gateway, True))
    assert events[-1].kind == "error" and events[-1].status == 502
    call = settled(gw, seen)
    assert call.outcome == "failed" and call.status == 200 and call.failure.status == 502


def test_error_event_mid_stream(setup):
    events = openai_stream_events(done=False, finish=None, usage=False)[:2]
    events.append(json.dumps({"error": {"message": "overloaded", "type": "server_error", "code": 503}}))
    gw, _, seen = setup(Reply("sse", events=events))
    got = gw.run(collect(gw.gateway, True))
    assert got[-1].kind == "error"
    call = settled(gw, seen)
    assert call.outcome == "failed" and call.failure.message == got[-1].message


def test_cancellation_while_waiting_for_the_upstream(setup):
    gw, up, seen = setup(Reply("hang"))
    task = asyncio.run_coroutine_threadsafe(collect(gw.gateway, False), gw.loop)
    wait_until(lambda: up.requests, what="the upstream to receive the request")
    task.cancel()
    call = wait_until(lambda: seen.calls and seen.calls[0], what="the call to finish")
    assert call.outcome == "cancelled" and call.status is None
    settled(gw, seen)


def test_cancellation_mid_stream(setup):
    gw, up, seen = setup(Reply("sse", events=openai_stream_events()[:2] + [30]))

    # The upstream stalls after its first events: the task is cancelled while the Call awaits more bytes.
    task = asyncio.run_coroutine_threadsafe(collect(gw.gateway, True), gw.loop)
    wait_until(lambda: up.open_streams, what="the stream to open")
    task.cancel()
    call = wait_until(lambda: seen.calls and seen.calls[0], what="the call to finish")
    assert call.outcome == "cancelled" and call.status == 200
    settled(gw, seen)


def test_client_disconnects_mid_stream(setup):
    gw, up, seen = setup(Reply("sse", events=openai_stream_events()[:2] + [30] + openai_stream_events()[2:]))
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"data:" not in got:
            got += s.recv(65536)
    call = wait_until(lambda: seen.calls and seen.calls[0], what="the call to finish")
    assert call.outcome in ("client_gone", "cancelled") and call.status == 200
    settled(gw, seen)


def test_token_count_goes_through_a_call(tmp_path):
    up = FakeUpstream(lambda r: Reply(body={"input_tokens": 42})).start()
    gw = GatewayThread("providers:\n  - type: anthropic\n    base-url: %s\n    api-key: sk-ant\n" % up.url,
                       fake_clock=False)
    try:
        seen = Observed(gw.gateway)
        ir = llm_mux.Anthropic.parse_request({"model": "claude-sonnet-4-5-20250929", "max_tokens": 10,
                                              "messages": [{"role": "user", "content": "hi"}]}, count_only=True)
        assert gw.run(gw.gateway.count_tokens(ir)) == 42
        call = seen.one()
        assert (call.kind, call.outcome, call.status) == ("count", "ok", 200)
        assert call.cred.in_flight == 0
    finally:
        gw.stop()
        up.stop()


def test_finish_runs_once():
    gw = GatewayThread("providers:\n" + openai_provider("http://127.0.0.1:9", ["k1"]))
    try:
        seen = Observed(gw.gateway)
        route = gw.gateway.registry.resolve("m")[0]
        call = llm_mux.Call(gw.gateway.router, request(), route, gw.cred("k1"))
        assert gw.cred("k1").in_flight == 1
        assert call.finish("ok") is True
        assert call.finish("failed") is False and call.finish("cancelled") is False
        assert seen.one().outcome == "ok" and gw.cred("k1").in_flight == 0
    finally:
        gw.stop()


def test_ir_problem_names_the_first_field_of_the_wrong_type_in_events_responses_and_usage():
    """ir_problem, the one type check between decoders and encoders: a list of stream events is checked item by item
    (relayed raw frames hold no fields), a usage inside an event or a response is checked too, a boolean is never an
    IR value, and the first problem is named."""
    ok = [llm_mux.TextDelta("a"), llm_mux.RawFrame(b"data: {}\n\n"), llm_mux.UsageEvent(llm_mux.Usage(3, 4)),
          llm_mux.ToolCallStart(0, "call_1", "f")]
    assert llm_mux.ir_problem(ok) is None
    assert llm_mux.ir_problem([[llm_mux.TextDelta("a")], llm_mux.TextDelta("b")]) is None
    assert llm_mux.ir_problem(ok + [llm_mux.TextDelta({"x": 1}), llm_mux.TextDelta(5)]) == "TextDelta.text is dict"
    assert llm_mux.ir_problem([llm_mux.UsageEvent(llm_mux.Usage("3", 4))]) == "Usage.input_tokens is str"
    assert llm_mux.ir_problem([llm_mux.UsageEvent(llm_mux.Usage(True, 4))]) == "Usage.input_tokens is bool"
    assert llm_mux.ir_problem([[llm_mux.TextDelta(None)]]) == "TextDelta.text is NoneType"
    assert llm_mux.ir_problem(llm_mux.ToolCallStart(0, 7, "f")) == "ToolCallStart.id is int"
    resp = llm_mux.ChatResponse(parts=[llm_mux.Text("hi")], usage=llm_mux.Usage(1, 2))
    assert llm_mux.ir_problem(resp) is None
    resp.usage = llm_mux.Usage(1, 2.5, cached_tokens=[1])
    assert llm_mux.ir_problem(resp) == "Usage.cached_tokens is list"
    resp.usage, resp.parts = None, [llm_mux.Text("hi"), llm_mux.Text(b"bytes")]
    assert llm_mux.ir_problem(resp) == "Text.text is bytes"
