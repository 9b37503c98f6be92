"""Client keys as objects: model allow-lists, requests and tokens per minute, a budget per period, expiry and
disabling — checked before any upstream call, answered in the client's own format; the model lists show only what
a key may use; spend survives a restart (rebuilt from the usage store)."""
import hashlib
import signal
import time

import anthropic
import openai
import pytest

import llm_mux
from fakes import FakeUpstream, Reply, openai_completion
from harness import GatewayThread, openai_provider, openai_provider_config


def gateway_with(keys_yaml, models=("gpt-a", "gpt-b", "other")):
    up = FakeUpstream(lambda r: Reply(body=openai_completion())).start()
    gw = GatewayThread("api-keys:\n%sproviders:\n%s" % (keys_yaml, openai_provider(up.url, ["k-up"], models=models)))
    return gw, up


def client(gw, key):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def ask(gw, key, model="gpt-a"):
    return client(gw, key).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])


@pytest.fixture
def made():
    started = []
    yield started
    for gw, up in started:
        gw.stop()
        up.stop()


def test_a_model_allow_list_in_every_format_and_in_the_model_lists(made):
    made.append(gateway_with('  - {key: sk-team, name: team, models: ["gpt-*"]}\n  - sk-free\n'))
    gw, up = made[-1]
    assert ask(gw, "sk-team").choices[0].message.content == "Hello!"
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask(gw, "sk-team", "other")
    assert "team may not use model 'other'" in e.value.message
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=gw.url, api_key="sk-team", max_retries=0).messages.create(
            model="other", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert sorted(m.id for m in client(gw, "sk-team").models.list()) == ["gpt-a", "gpt-b"]
    assert sorted(m.id for m in client(gw, "sk-free").models.list()) == ["gpt-a", "gpt-b", "other"]
    assert len([r for r in up.requests if r.path.endswith("/chat/completions")]) == 1  # refusals cost no call


def test_requests_per_minute_with_retry_after(made):
    made.append(gateway_with("  - {key: sk-r, rpm: 2}\n"))
    gw, up = made[-1]
    ask(gw, "sk-r")
    ask(gw, "sk-r")
    with pytest.raises(openai.RateLimitError) as e:
        ask(gw, "sk-r")
    assert "2 requests per minute" in e.value.message and int(e.value.response.headers["retry-after"]) == 60
    gw.clock.t += 61  # a minute later on the gateway's clock
    ask(gw, "sk-r")


def test_tokens_per_minute(made):
    made.append(gateway_with("  - {key: sk-t, tpm: 30}\n"))  # each answer uses 18 tokens
    gw, _ = made[-1]
    ask(gw, "sk-t")
    ask(gw, "sk-t")  # 18 < 30: still let through
    with pytest.raises(openai.RateLimitError) as e:
        ask(gw, "sk-t")
    assert "30 tokens per minute" in e.value.message


def test_a_budget_per_period(made):
    up = FakeUpstream(lambda r: Reply(body=openai_completion())).start()
    gw = GatewayThread("api-keys:\n  - {key: sk-b, max-budget: 0.00002, budget-duration: 1d}\npricing:\n"
                       "  gpt-a: {input: 1, output: 1}\nproviders:\n" + openai_provider(up.url, ["k"], ("gpt-a",)))
    made.append((gw, up))
    ask(gw, "sk-b")  # 18 tokens at 1 USD per million: 0.000018
    ask(gw, "sk-b")
    with pytest.raises(openai.RateLimitError) as e:
        ask(gw, "sk-b")
    assert "budget of 2e-05 USD per 1d" in e.value.message
    gw.clock.t += 86401
    ask(gw, "sk-b")


def test_expired_disabled_and_hashed_keys(made):
    digest = hashlib.sha256(b"sk-secret-hashed").hexdigest()
    made.append(gateway_with("  - {key: sk-old, expires: 2020-01-01}\n  - {key: sk-off, disabled: true}\n"
                             "  - {key: 'sha256:%s', name: hashed}\n" % digest))
    gw, _ = made[-1]
    for key, why in (("sk-old", "expired"), ("sk-off", "disabled")):
        with pytest.raises(openai.AuthenticationError) as e:
            ask(gw, key)
        assert why in e.value.message
    assert ask(gw, "sk-secret-hashed").choices[0].message.content == "Hello!"


@pytest.mark.parametrize("entry, says", [('  - ""\n', "an empty key would let anyone in"),
                                         ("  - {key: k, rpm: -1}\n", "rpm must be a non-negative number"),
                                         ("  - {key: k, budget-duration: soon}\n", "budget-duration must be"),
                                         ("  - {key: k, rmp: 5}\n", "unknown field(s) rmp"),
                                         ("  - {name: nokey}\n", "key is required")])
def test_bad_key_entries_are_config_errors_with_the_line(entry, says):
    with pytest.raises(llm_mux.ConfigError) as e:
        llm_mux.Config.from_text("api-keys:\n" + entry, "t.yaml", environ={})
    assert "t.yaml:2:" in str(e.value) and says in str(e.value)


def test_spend_survives_a_restart(gateway, upstream, tmp_path):
    up = upstream()
    cfg = openai_provider_config(up.url) + "pricing:\n  gpt-test: {input: 1, output: 1}\napi-keys:\n" \
        "  - {key: sk-b, max-budget: 0.00001}\n"  # one answer (18 tokens) goes over it
    gw = gateway(cfg)
    openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-b", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(20)
    again = gateway(cfg)
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=again.url + "/v1", api_key="sk-b", max_retries=0).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}])


def rebuild_from(store, target):
    """KeyLimits rebuilt from `store` (written through `target`'s store class) after records at known times: three
    in one second, others a minute, an hour and two days back, one of a subscription, one without a key. The spend
    buckets and the last minute's request counts, per key."""
    from harness import FakeClock
    now = int(time.time())

    def record(key, ago, tokens, usd, saved=0.0, record_id=None):
        return {"api_key": key, "requested_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - ago)),
                "total_tokens": tokens, "cost_usd": usd, "subscription_value_usd": saved, "provider": "p",
                "model": "m", "record_id": record_id or "%s-%d-%d" % (key, ago, tokens)}
    store.write([record("a", 5, 10, 0.5), record("a", 5, 20, 0.25), record("a", 5, 1, 0.0, 0.125),
                 record("a", 90, 7, 1.0), record("b", 3600, 3, 2.0), record("a", 2 * 86400, 99, 9.0),
                 record("", 5, 5, 5.0)])
    store.close()
    limits = llm_mux.KeyLimits(FakeClock(wall=now))
    limits.rebuild(target, 86400)
    spent = {k: [list(b) for b in v] for k, v in limits.spent.items()}
    requests = {k: [list(b) for b in v] for k, v in limits.requests.items()}
    return now, spent, requests


def test_spend_is_rebuilt_per_key_and_second_from_sqlite(tmp_path):
    path = str(tmp_path / "u.db")
    now, spent, requests = rebuild_from(llm_mux.UsageStore(path), ("sqlite", path))
    assert spent == {"a": [[now - 90, 7, 1.0], [now - 5, 31, 0.875]], "b": [[now - 3600, 3, 2.0]]}
    assert requests == {"a": [[now - 5, 3]]}


def test_limits_keep_a_bucket_per_second_not_an_entry_per_request():
    """5,000 requests in five seconds and a day's budget: the counters hold five buckets each (memory follows the
    seconds with traffic, not the requests), the figures stay exact, and the limits still bite and expire."""
    from harness import FakeClock
    clock = FakeClock(wall=1_700_000_000.25)
    limits = llm_mux.KeyLimits(clock)
    cfg = llm_mux.Config.from_text("api-keys:\n  - {key: sk-a, name: a, rpm: 5000, max-budget: 6, "
                                   "budget-duration: 1d}\n", "t.yaml", environ={})
    req = llm_mux.ChatRequest("m")
    req.client_key = "a"
    for i in range(5000):
        clock.t += 0.001
        limits.admit(cfg, req)
        limits.account({"api_key": "a", "total_tokens": 10, "cost_usd": 0.001}, clock.wall())
    assert len(limits.requests["a"]) <= 6 and len(limits.spent["a"]) <= 6
    key = cfg.client_keys[0]
    assert limits.snapshot(key) == {"requests_last_minute": 5000, "tokens_last_minute": 50000, "spent_usd": 5.0}
    with pytest.raises(llm_mux.GatewayError) as e:  # the 5,001st request within the minute
        limits.admit(cfg, req)
    assert e.value.status == 429 and 55 <= int(dict(e.value.headers)["Retry-After"]) <= 60
    clock.t += 61  # a minute on: the rate limit has passed, the day's spend has not
    limits.admit(cfg, req)
    assert limits.snapshot(key)["requests_last_minute"] == 1 and limits.snapshot(key)["spent_usd"] == 5.0
    limits.account({"api_key": "a", "total_tokens": 10, "cost_usd": 1.0}, clock.wall())
    with pytest.raises(llm_mux.GatewayError) as e:
        limits.admit(cfg, req)
    assert "budget of 6" in e.value.message
