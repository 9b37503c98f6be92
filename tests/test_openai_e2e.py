"""End to end: the official `openai` SDK against a real llm_mux process, with a fake OpenAI-compatible upstream."""
import json

import openai
import pytest

from harness import openai_provider_config, wait_until
from fakes import Reply, openai_completion, openai_stream_events


def client_for(gw, key="unused"):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_chat_non_streaming_round_trip(gateway, upstream):
    up = upstream(lambda r: Reply(body=openai_completion("Hi there", model="gpt-test")))
    gw = gateway(openai_provider_config(up.url, models=[("gpt-test", "fast")]))
    c = client_for(gw)
    r = c.chat.completions.create(model="fast", messages=[{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hello"}],
                                  temperature=0.5, max_tokens=50)
    assert r.choices[0].message.content == "Hi there"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "fast"
    assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 7 and r.usage.total_tokens == 18
    assert r.usage.prompt_tokens_details.cached_tokens == 3
    assert r.usage.completion_tokens_details.reasoning_tokens == 2
    sent = up.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-up-1"
    body = sent.json
    assert body["model"] == "gpt-test"  # alias replaced by the upstream name
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert body["temperature"] == 0.5 and body["max_tokens"] == 50
    assert "stream" not in body


def test_chat_streaming_text_and_usage(gateway, upstream):
    up = upstream(lambda r: Reply("sse", events=openai_stream_events(("Hel", "lo", " world"))))
    gw = gateway(openai_provider_config(up.url))
    c = client_for(gw)
    stream = c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
                                       stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == "Hello world"
    assert finish == "stop"
    assert usage.prompt_tokens == 5 and usage.completion_tokens == 3
    body = up.requests[0].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert up.requests[0].headers["accept"] == "text/event-stream"


def test_streaming_helper_accumulates_tool_calls(gateway, upstream):
    events = openai_stream_events((), tool_calls=[("call_A", "get_weather", ['{"city":', '"Paris"}']),
                                                  ("call_B", "get_time", ["{}"])], finish="tool_calls")
    up = upstream(lambda r: Reply("sse", events=events))
    gw = gateway(openai_provider_config(up.url))
    c = client_for(gw)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    with c.chat.completions.stream(model="gpt-test", messages=[{"role": "user", "content": "weather?"}],
                                   tools=tools) as s:
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(t.id, t.function.name, t.function.arguments) for t in calls] == [
        ("call_A", "get_weather", '{"city":"Paris"}'), ("call_B", "get_time", "{}")]
    assert final.choices[0].finish_reason == "tool_calls"
    assert up.requests[0].json["tools"][0]["function"]["name"] == "get_weather"


def test_tool_round_trip_history_is_forwarded(gateway, upstream):
    up = upstream(lambda r: Reply(body=openai_completion("It is sunny.")))
    gw = gateway(openai_provider_config(up.url))
    c = client_for(gw)
    msgs = [{"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    r = c.chat.completions.create(model="gpt-test", messages=msgs, tool_choice="auto",
                                  tools=[{"type": "function", "function": {"name": "get_weather"}}])
    assert r.choices[0].message.content == "It is sunny."
    sent = up.requests[0].json["messages"]
    assert sent[1]["tool_calls"][0] == {"id": "call_1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}
    assert up.requests[0].json["tool_choice"] == "auto"


def test_image_parts_are_forwarded(gateway, upstream):
    up = upstream(lambda r: Reply(body=openai_completion("a cat")))
    gw = gateway(openai_provider_config(up.url))
    c = client_for(gw)
    img = "data:image/png;base64,iVBORw0KGgo="
    c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": img, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}])
    parts = up.requests[0].json["messages"][0]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": img, "detail": "low"}}
    assert parts[2] == {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}


def test_models_list_merges_providers_and_honours_exclusions(gateway, upstream):
    up = upstream()
    cfg = openai_provider_config(up.url, models=[("gpt-a", ""), ("gpt-b", "bee"), ("gpt-c-preview", "")],
                                 extra='excluded-models: ["*-preview"]')
    cfg += openai_provider_config(up.url, name="second", models=[("other-model", "")]).replace("providers:\n", "")
    gw = gateway(cfg)
    ids = sorted(m.id for m in client_for(gw).models.list())
    assert ids == ["bee", "gpt-a", "other-model"]
    m = client_for(gw).models.retrieve("bee")
    assert m.id == "bee" and m.owned_by == "fake"
    with pytest.raises(openai.NotFoundError):
        client_for(gw).models.retrieve("gpt-c-preview")


def test_unknown_model_is_404_in_openai_shape(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url))
    with pytest.raises(openai.NotFoundError) as e:
        client_for(gw).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    assert up.requests == []


def test_upstream_429_surfaces_as_rate_limit_error_with_status(gateway, upstream):
    up = upstream(lambda r: Reply(status=429, body={"error": {"message": "slow down", "type": "rate_limit_error"}},
                                  headers={"Retry-After": "7"}))
    gw = gateway(openai_provider_config(up.url) + "max-retry-interval: 0\n")  # surface it, do not wait it out
    with pytest.raises(openai.RateLimitError) as e:
        client_for(gw).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert "slow down" in str(e.value)
    assert e.value.response.headers["retry-after"] == "7"


def test_upstream_400_keeps_status_and_message(gateway, upstream):
    up = upstream(lambda r: Reply(status=400, body={"error": {"message": "bad 'temperature'", "type": "x"}}))
    gw = gateway(openai_provider_config(up.url, keys=("k1", "k2")))
    with pytest.raises(openai.BadRequestError) as e:
        client_for(gw).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert "bad 'temperature'" in str(e.value)
    assert len(up.requests) == 1  # a request error is not retried on another key


def test_failover_to_next_key_on_5xx_and_custom_headers(gateway, upstream):
    def handler(r):
        if r.headers["authorization"] == "Bearer k-bad":
            return Reply(status=503, body={"error": {"message": "down"}})
        return Reply(body=openai_completion("served by good"))
    up = upstream(handler)
    gw = gateway(openai_provider_config(up.url, keys=("k-bad", "k-good"), extra="headers: {X-Team: research}"))
    r = client_for(gw).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "served by good"
    assert [q.headers["authorization"] for q in up.requests] == ["Bearer k-bad", "Bearer k-good"]
    assert all(q.headers["x-team"] == "research" for q in up.requests)
    # The failing key is cooling down now: the next request goes straight to the good one.
    client_for(gw).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "y"}])
    assert up.requests[-1].headers["authorization"] == "Bearer k-good"
    assert len(up.requests) == 3


def test_malformed_json_and_wrong_types_are_400_naming_the_field(gateway, upstream):
    import urllib.request
    up = upstream()
    gw = gateway(openai_provider_config(up.url))

    def post(raw):
        req = urllib.request.Request(gw.url + "/v1/chat/completions", data=raw,
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        raise AssertionError("expected an error")

    status, body = post(b'{"model": "gpt-test", "messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = post(json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}],
                                    "temperature": "hot"}).encode())
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(json.dumps({"model": "gpt-test", "messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    assert up.requests == []
    assert gw.proc.poll() is None


def test_mid_stream_upstream_failure_ends_with_error_event(gateway, upstream):
    events = openai_stream_events(("partial",), finish=None, usage=False, done=False)
    up = upstream(lambda r: Reply("drop", events=events))
    gw = gateway(openai_provider_config(up.url))
    stream = client_for(gw).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                                    stream=True)
    got = ""
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            for ch in chunk.choices:
                got += ch.delta.content or ""
    assert got == "partial"
    assert "upstream" in str(e.value)


def test_client_disconnect_cancels_upstream_stream(gateway, upstream):
    # An upstream that would stream for a long time; the client reads one chunk and goes away.
    events = openai_stream_events(("a",), finish=None, usage=False, done=False) + [0.2, "data: {}\n\n"] * 100
    up = upstream(lambda r: Reply("sse", events=events))
    gw = gateway(openai_provider_config(up.url))
    c = client_for(gw)
    stream = c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}], stream=True)
    next(iter(stream))
    stream.close()
    c.close()  # the client goes away: its socket closes
    # the upstream would stream for 20 s more; its socket breaks only if the gateway hung up on it
    wait_until(lambda: up.closed_streams, what="the upstream stream to be cancelled:\n" + gw.output())
