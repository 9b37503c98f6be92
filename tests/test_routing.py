"""Routing with scripted upstreams and a controllable clock: cooldown classes and exact durations, retry hints,
attempt counts, waiting, fallbacks, circuit breaker, session affinity, spreading load, and no lost requests."""
import asyncio
import time

import openai
import pytest

import llm_mux
from fakes import FakeUpstream, Reply, openai_completion, openai_stream_events
from harness import GatewayThread, openai_provider


provider = openai_provider


@pytest.fixture
def make():
    made = []

    def _make(handler, keys=("k1",), cfg="", **kw):
        up = FakeUpstream(handler).start()
        base = "".join(line for line in ("request-retry: 0\n", "max-retry-interval: 0\n")
                       if line.split(":")[0] not in cfg)
        gw = GatewayThread(base + cfg + "providers:\n" + provider(up.url, keys), **kw)
        made.append((gw, up))
        return gw, up
    yield _make
    for gw, up in made:
        gw.stop()
        up.stop()


def by_key(replies):
    """A handler answering per upstream API key from a dict key -> Reply (or callable)."""
    def handler(r):
        key = r.headers.get("authorization", "")[7:]
        reply = replies.get(key, Reply(body=openai_completion("ok-" + key)))
        return reply(r) if callable(reply) else reply
    return handler


def cooling_for(gw, key, model="m"):
    c = gw.cred(key)
    return c.cooling_until(model) - gw.clock.now()


@pytest.mark.parametrize("status, body, headers, seconds", [
    (402, {"error": {"message": "payment required"}}, {}, 1800),
    (403, {"error": {"message": "forbidden"}}, {}, 60),
    (404, {"error": {"message": "no such model"}}, {}, 12 * 3600),
    (500, {"error": {"message": "boom"}}, {}, 60),
    (503, {"error": {"message": "unavailable"}}, {}, 60),
    (429, {"error": {"message": "slow down"}}, {}, 1),
    (429, {"error": {"message": "slow down"}}, {"Retry-After": "120"}, 120),
    (429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3725s"}]}}, {}, 3725),
    (429, {"error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                               "metadata": {"quotaResetDelay": "5h0m0s"}}]}}, {}, 18000),
    (429, {"error": {"type": "usage_limit_reached", "message": "limit", "resets_in_seconds": 7200}}, {}, 7200),
    (429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "You have exhausted your capacity on "
                     "this model. Your quota will reset after 1h2m3s.", "details": [
                         {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "QUOTA_EXHAUSTED"}]}}, {},
     3723),
])
def test_cooldown_classes_and_exact_durations(make, status, body, headers, seconds):
    gw, up = make(by_key({"k1": Reply(status=status, body=body, headers=headers)}))
    with pytest.raises(openai.APIStatusError) as e:
        gw.chat()
    assert e.value.status_code == status
    assert cooling_for(gw, "k1") == pytest.approx(seconds, abs=1)


def test_a_rejected_key_is_taken_out_of_rotation_not_cooled(make):
    gw, up = make(by_key({"k1": Reply(status=401, body={"error": {"message": "bad key"}})}))
    with pytest.raises(openai.AuthenticationError):
        gw.chat()
    assert gw.cred("k1").disabled.startswith("rejected:") and cooling_for(gw, "k1") <= 0


def test_hintless_429s_back_off_exponentially_and_success_resets(make):
    state = {"fail": True}
    gw, up = make(by_key({"k1": lambda r: Reply(status=429, body={"error": {"message": "rl"}}) if state["fail"]
                          else Reply(body=openai_completion("fine"))}))
    for expected in (1, 2, 4, 8):
        with pytest.raises(openai.RateLimitError):
            gw.chat()
        assert cooling_for(gw, "k1") == pytest.approx(expected)
        gw.clock.t += expected  # let the cooldown pass
    state["fail"] = False
    assert gw.chat().choices[0].message.content == "fine"
    assert gw.cred("k1").states["m"].level == 0 and cooling_for(gw, "k1") <= 0


def test_credential_scoped_quota_cools_every_model(make):
    reset = str(int(time.time()) + 5 * 3600)
    up = FakeUpstream(lambda r: Reply(status=429, body={"type": "error", "error": {"type": "rate_limit_error",
                                                                                     "message": "5h window"}},
                                      headers={"anthropic-ratelimit-unified-5h-status": "rejected",
                                               "anthropic-ratelimit-unified-5h-reset": reset})).start()
    gw = GatewayThread("request-retry: 0\nproviders:\n" + provider(up.url, ["k1"], models=("a", "b")))
    try:
        with pytest.raises(openai.RateLimitError):
            gw.chat("a")
        for model in ("a", "b"):
            assert cooling_for(gw, "k1", model) == pytest.approx(5 * 3600, abs=3)
        with pytest.raises(openai.RateLimitError) as e:
            gw.chat("b")
        assert len(up.requests) == 1  # model b was not even tried
        assert int(e.value.response.headers["retry-after"]) == pytest.approx(5 * 3600, abs=3)
    finally:
        gw.stop()
        up.stop()


def test_revoked_token_disables_the_credential(make, caplog):
    gw, up = make(by_key({"k1": Reply(status=400, body={"error": "invalid_grant",
                                                         "error_description": "Token has been expired or revoked."})}),
                  keys=("k1", "k2"), cfg="request-retry: 1\n")
    assert gw.chat().choices[0].message.content == "ok-k2"  # failed over to the next credential
    assert gw.cred("k1").disabled.startswith("revoked")
    assert "credential p key k1 disabled" in caplog.text
    for _ in range(3):
        gw.chat()
    assert [q.headers["authorization"] for q in up.requests].count("Bearer k1") == 1  # never picked again


def test_request_errors_are_not_retried_or_cooled(make):
    gw, up = make(by_key({"k1": Reply(status=400, body={"error": {"message": "bad param"}})}), keys=("k1", "k2"),
                  cfg="request-retry: 3\n")
    with pytest.raises(openai.BadRequestError):
        gw.chat()
    assert len(up.requests) == 1 and cooling_for(gw, "k1") <= 0


@pytest.mark.parametrize("retry, expected_calls", [(0, 1), (1, 2), (2, 3), (5, 3)])
def test_request_retry_bounds_the_attempts(make, retry, expected_calls):
    gw, up = make(lambda r: Reply(status=500, body={"error": {"message": "down"}}), keys=("k1", "k2", "k3"),
                  cfg="request-retry: %d\n" % retry)
    with pytest.raises(openai.InternalServerError):
        gw.chat()
    assert len(up.requests) == expected_calls  # each credential once per request; then the error
    sleeps = [s for s in gw.clock.sleeps if s > 0]
    assert len(gw.clock.sleeps) == expected_calls - 1 and all(s <= 2.0 for s in sleeps)  # jittered backoff


def test_a_credential_recovering_within_max_retry_interval_is_waited_for(make):
    calls = []

    def handler(r):
        calls.append(gw.clock.now())
        if len(calls) == 1:
            return Reply(status=429, body={"error": {"message": "wait a bit"}}, headers={"Retry-After": "3"})
        return Reply(body=openai_completion("after waiting"))
    gw, up = make(handler, cfg="request-retry: 1\nmax-retry-interval: 5\n")
    assert gw.chat().choices[0].message.content == "after waiting"
    assert calls[1] - calls[0] >= 3 and 3 in gw.clock.sleeps


def test_no_wait_beyond_max_retry_interval_and_429_carries_earliest_recovery(make):
    gw, up = make(lambda r: Reply(status=429, body={"error": {"message": "later"}}, headers={"Retry-After": "40"}),
                  keys=("k1", "k2"), cfg="request-retry: 3\nmax-retry-interval: 10\n")
    with pytest.raises(openai.RateLimitError) as e:
        gw.chat()
    assert len(up.requests) == 2 and not [s for s in gw.clock.sleeps if s >= 10]
    gw.clock.t += 15
    with pytest.raises(openai.RateLimitError) as e:
        gw.chat()
    assert len(up.requests) == 2  # both still cooling: nothing sent
    assert e.value.response.headers["retry-after"] == "25"
    assert "cooling down" in str(e.value) and "later" in str(e.value)


def test_fallback_models_after_the_requested_one_fails(make):
    up = FakeUpstream(lambda r: Reply(status=503, body={"error": {"message": "a down"}}) if r.json["model"] == "a"
                      else Reply(body=openai_completion("from b"))).start()
    gw = GatewayThread("request-retry: 1\nrouting:\n  fallbacks: {a: [nope, b]}\nproviders:\n" +
                       provider(up.url, ["k1"], models=("a", "b")))
    try:
        r = gw.chat("a")
        assert r.choices[0].message.content == "from b" and r.model == "a"
        assert [q.json["model"] for q in up.requests] == ["a", "b"]
    finally:
        gw.stop()
        up.stop()


def test_disable_cooling_keeps_429_credentials_usable(make):
    gw, up = make(by_key({"k1": Reply(status=429, body={"error": {"message": "rl"}}, headers={"Retry-After": "60"})}),
                  cfg="disable-cooling: true\n")
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):
            gw.chat()
    assert len(up.requests) == 3 and cooling_for(gw, "k1") <= 0


def test_circuit_breaker_opens_skips_and_recovers(make):
    bad = FakeUpstream(lambda r: Reply(status=500, body={"error": {"message": "x"}})).start()
    good = FakeUpstream(lambda r: Reply(body=openai_completion("good"))).start()
    bad_keys = ["kb%d" % i for i in range(12)]
    cfg = "request-retry: 20\nproviders:\n" + provider(bad.url, bad_keys, name="bad") + \
        provider(good.url, ["kg"], name="good")
    gw = GatewayThread(cfg)
    try:
        assert gw.chat().choices[0].message.content == "good"
        assert gw.gateway.router.breaker("bad").state == "open"
        assert len(bad.requests) == 10  # 10 calls, 5+ consecutive failures: tripped; the rest were skipped
        for _ in range(3):
            gw.chat()
            gw.clock.t += 5
        assert len(bad.requests) == 10  # open: skipped
        gw.clock.t += 61  # past the breaker's 30 s and the credentials' 60 s cooldown
        gw.chat(text="a new conversation")  # (the old one is pinned to the healthy credential)
        assert len(bad.requests) == 11  # half-open: one trial call ...
        assert gw.gateway.router.breaker("bad").state == "open"  # ... which failed: open again
    finally:
        gw.stop()
        bad.stop()
        good.stop()


def test_breaker_closes_after_successful_trials():
    b = llm_mux.CircuitBreaker("t")
    for _ in range(10):
        assert b.allows(0.0)
        b.record(False, 0.0)
    assert b.state == "open" and not b.allows(29.9)
    assert [b.allows(30.0) for _ in range(4)] == [True, True, True, False]  # 3 trials in half-open
    for _ in range(3):
        b.record(True, 30.5)
    assert b.state == "closed" and b.allows(31.0)
    for _ in range(9):  # under the minimum number of calls the breaker never trips
        b.record(False, 32.0)
    assert b.state == "closed"


def test_mid_stream_deaths_count_for_the_breaker(make):
    events = openai_stream_events(("x",), finish=None, usage=False, done=False)
    gw, up = make(lambda r: Reply("drop", events=events), keys=["k%d" % i for i in range(10)])
    for _ in range(10):
        stream = gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                     stream=True)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
    assert gw.gateway.router.breaker("p").state == "open"


def test_session_affinity_and_spreading(make):
    gw, up = make(by_key({}), keys=("k1", "k2", "k3"))
    used = []
    for _ in range(6):
        used.append(gw.chat(text="conversation A").choices[0].message.content)
    assert len(set(used)) == 1  # one conversation keeps its credential (and its prompt cache)
    for i in range(30):
        gw.chat(text="conversation %d" % i)
    counts = {k: gw.cred(k).uses for k in ("k1", "k2", "k3")}
    assert sorted(counts.values()) == [12, 12, 12], counts  # new conversations go to the least recently used


def test_affinity_moves_when_the_credential_is_unhealthy(make):
    state = {"k1": True}

    def handler(r):
        key = r.headers["authorization"][7:]
        if key == "k1" and not state["k1"]:
            return Reply(status=500, body={"error": {"message": "k1 down"}})
        return Reply(body=openai_completion("ok-" + key))
    gw, up = make(handler, keys=("k1", "k2"), cfg="request-retry: 1\n")
    first = gw.chat(text="conv").choices[0].message.content
    pinned = first[3:]
    state[pinned] = False if pinned == "k1" else True
    if pinned == "k1":
        assert gw.chat(text="conv").choices[0].message.content == "ok-k2"


def test_200_concurrent_requests_with_one_failing_credential_lose_none(make):
    gw, up = make(by_key({"k2": Reply(status=500, body={"error": {"message": "k2 broken"}})}),
                  keys=("k1", "k2", "k3"), cfg="request-retry: 2\n", fake_clock=False)

    async def run():
        c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=60)
        rs = await asyncio.gather(*[c.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "req %d" % i}]) for i in range(200)])
        await c.close()
        return rs
    results = asyncio.run(run())
    assert len(results) == 200
    assert all(r.choices[0].message.content in ("ok-k1", "ok-k3") for r in results)


def test_garbage_and_hanging_upstreams_fail_over(make):
    def handler(r):
        key = r.headers["authorization"][7:]
        if key == "k1":
            return Reply("raw", body="<html>not json at all", headers={"Content-Type": "text/html"})
        if key == "k2":
            return Reply("hang")
        return Reply(body=openai_completion("ok-" + key))
    gw, up = make(handler, keys=("k1", "k2", "k3"), cfg="request-retry: 2\nstream-timeout: 1\n")
    # k1 answers 200 with garbage: the client gets a clear 502 (no silent empty answer)
    c = gw.client()
    results = []
    for i in range(3):
        try:
            results.append(c.chat.completions.create(model="m", messages=[
                {"role": "user", "content": "g%d" % i}]).choices[0].message.content)
        except openai.APIStatusError as e:
            results.append(e.status_code)
    assert 502 in results and "ok-k3" in results
    assert cooling_for(gw, "k2") == pytest.approx(60, abs=1)  # the hang timed out (504): transient, one minute


def test_provider_priority_orders_providers(make):
    a = FakeUpstream(lambda r: Reply(body=openai_completion("from a"))).start()
    b = FakeUpstream(lambda r: Reply(body=openai_completion("from b"))).start()
    gw = GatewayThread("routing:\n  provider-priority: {second: 1, first: 2}\nproviders:\n" +
                       provider(a.url, ["ka"], name="first") + provider(b.url, ["kb"], name="second"))
    try:
        answers = {gw.chat(text="c%d" % i).choices[0].message.content for i in range(6)}
        assert answers == {"from b"}  # lower number first, whatever the load
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_show_provider_prefixes_lists_and_pins_providers(make):
    a = FakeUpstream(lambda r: Reply(body=openai_completion("from a"))).start()
    b = FakeUpstream(lambda r: Reply(body=openai_completion("from b"))).start()
    gw = GatewayThread("show-provider-prefixes: true\nproviders:\n" + provider(a.url, ["ka"], name="Alpha") +
                       provider(b.url, ["kb"], name="Beta"))
    try:
        ids = sorted(m.id for m in gw.client().models.list())
        assert ids == ["[Alpha] m", "[Beta] m"]
        assert gw.chat("[Beta] m").choices[0].message.content == "from b"
        assert gw.chat("Alpha://m").choices[0].message.content == "from a"
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_switch_preview_model_falls_back_to_the_preview_variant(make):
    up = FakeUpstream(lambda r: Reply(status=429, body={"error": {"message": "quota"}}) if r.json["model"] == "gm"
                      else Reply(body=openai_completion("preview answered"))).start()
    gw = GatewayThread("providers:\n" + provider(up.url, ["k1"], models=("gm", "gm-preview-05")))
    try:
        assert gw.chat("gm").choices[0].message.content == "preview answered"
    finally:
        gw.stop()
        up.stop()
    up = FakeUpstream(up.handler).start()
    gw = GatewayThread("quota-exceeded: {switch-preview-model: false}\nproviders:\n" +
                       provider(up.url, ["k1"], models=("gm", "gm-preview-05")))
    try:
        with pytest.raises(openai.RateLimitError):
            gw.chat("gm")
    finally:
        gw.stop()
        up.stop()
