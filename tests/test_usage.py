"""Usage records in SQLite: one per upstream attempt, tokens normalised the same whatever the formats, nothing
lost on SIGTERM, llm-mux's own database opened as is, a newer schema never written."""
import os
import signal
import sqlite3

import anthropic
import openai
import pytest

import llm_mux
from fakes import Reply, openai_completion
from harness import openai_provider_config

ANTHROPIC_ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": 8, "output_tokens": 5, "cache_read_input_tokens": 3,
                              "cache_creation_input_tokens": 0}}


def rows(path):
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage_records ORDER BY id")]


def stop(gw):
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(20) == 0


def test_sigterm_loses_no_record(gateway, upstream, tmp_path):
    up = upstream()
    gw = gateway(openai_provider_config(up.url))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    for _ in range(25):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    stop(gw)  # straight after the last answer: the queue is drained before exit
    got = rows(tmp_path / "usage.db")  # the default place: usage.db beside the auth dir
    assert len(got) == 25 and all(r["outcome"] == "ok" and not r["failed"] for r in got)
    r = got[0]
    assert (r["provider"], r["model"], r["model_requested"], r["client_format"]) == ("fake", "gpt-test", "gpt-test",
                                                                                      "openai")
    assert r["auth_id"].startswith("fake:apikey:") and "sk-up-1" not in str(r)
    assert r["latency_ms"] > 0 and r["ttft_ms"] is not None


def test_tokens_mean_the_same_whatever_the_formats(gateway, upstream, tmp_path):
    # OpenAI's prompt_tokens includes cached tokens; Anthropic's input_tokens leaves cache reads out
    oa = upstream(lambda r: Reply(body=openai_completion(usage={
        "prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16, "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 2}})))
    an = upstream(lambda r: Reply(body=ANTHROPIC_ANSWER))
    gw = gateway(openai_provider_config(oa.url) + "  - type: anthropic\n    base-url: %s\n    api-key: sk-ant\n"
                 "    models: [claude-x]\n" % an.url)
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.create(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    stop(gw)
    a, b = rows(tmp_path / "usage.db")
    for r in (a, b):
        assert (r["uncached_input_tokens"], r["cache_read_input_tokens"], r["input_tokens"]) == (8, 3, 11)
        assert r["output_tokens"] == 5
    assert (a["client_format"], b["client_format"]) == ("openai", "anthropic")


def test_one_record_per_attempt_across_a_failover(gateway, upstream, tmp_path):
    up = upstream(lambda r: Reply(status=500, body={"error": {"message": "boom"}})
                  if r.headers["authorization"] != "Bearer k3" else Reply(body=openai_completion()))
    gw = gateway(openai_provider_config(up.url, keys=("k1", "k2", "k3")) + "request-retry: 2\n")
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    stop(gw)
    got = rows(tmp_path / "usage.db")
    assert [r["outcome"] for r in got] == ["failed", "failed", "ok"]
    assert [r["status"] for r in got] == [500, 500, 200] and len({r["auth_id"] for r in got}) == 3
    assert got[0]["error_class"] == "transient"
    assert got[0]["request_id"].startswith("req_") and len({r["request_id"] for r in got}) == 1  # one request


LLM_MUX_SCHEMA = """CREATE TABLE usage_records (id INTEGER PRIMARY KEY AUTOINCREMENT, provider TEXT NOT NULL,
model TEXT NOT NULL, api_key TEXT NOT NULL DEFAULT '', auth_id TEXT NOT NULL DEFAULT '',
auth_index INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '', requested_at TIMESTAMP NOT NULL,
failed BOOLEAN NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
reasoning_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
total_tokens INTEGER NOT NULL DEFAULT 0, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"""


def test_a_database_in_llm_mux_schema_opens_and_its_rows_count(gateway, upstream, tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(LLM_MUX_SCHEMA)
        db.execute("INSERT INTO usage_records (provider, model, requested_at, total_tokens) "
                   "VALUES ('claude', 'claude-x', '2026-11-01 10:00:00', 42)")
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "usage: {dsn: 'sqlite://%s'}\n" % path)
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    stop(gw)
    got = rows(path)
    assert len(got) == 2 and got[0]["total_tokens"] == 42 and got[1]["provider"] == "fake"


def test_a_newer_schema_is_never_written(tmp_path):
    path = str(tmp_path / "new.db")
    store = llm_mux.UsageStore(path)
    store.db.execute("UPDATE llm_mux_schema SET version = 99")
    store.db.commit()
    store.close()
    again = llm_mux.UsageStore(path)
    assert again.writable is False
    again.close()


def test_usage_can_be_turned_off(gateway, upstream, tmp_path):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "usage: {enabled: false}\n")
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    stop(gw)
    assert not os.path.exists(tmp_path / "usage.db")


def test_cost_at_list_prices_and_pricing_overrides(gateway, upstream, tmp_path):
    up = upstream(lambda r: Reply(body=openai_completion(usage={
        "prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 200}})))
    gw = gateway(openai_provider_config(up.url) + "pricing:\n  gpt-test: {input: 2, output: 8, cache-read: 0.5}\n")
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    stop(gw)
    (r,) = rows(tmp_path / "usage.db")
    assert r["cost_usd"] == pytest.approx((800 * 2 + 500 * 8 + 200 * 0.5) / 1e6)  # an API key: money spent
    assert r["subscription_value_usd"] == 0


def test_a_subscription_records_what_it_saved_not_what_it_spent():
    from harness import GatewayThread
    gw = GatewayThread("providers:\n  - type: anthropic\n    api-key: sk\n")
    try:
        route = gw.gateway.registry.resolve("claude-sonnet-4-5-20250929")[0]
        cred = route.provider.credentials[0]
        req = llm_mux.ChatRequest("claude-sonnet-4-5-20250929")
        call = llm_mux.Call(gw.gateway.router, req, route, cred)
        call.usage = llm_mux.Usage(input_tokens=1000, output_tokens=100)
        call.finish("ok")
        api = llm_mux.usage_record(call, 0)
        cred.path = "/auth/claude-a.json"  # the same call on an OAuth account
        sub = llm_mux.usage_record(call, 0)
        expected = (1000 * 3 + 100 * 15) / 1e6  # Sonnet's list prices
        assert (api["cost_usd"], api["subscription_value_usd"]) == (pytest.approx(expected), 0.0)
        assert (sub["cost_usd"], sub["subscription_value_usd"]) == (0.0, pytest.approx(expected))
    finally:
        gw.stop()


def test_a_batch_of_records_larger_than_one_insert_is_stored_whole(tmp_path):
    """The store writes rows in multi-row INSERTs of at most 999 parameters: 250 records (several statements, the
    last one short) come back as written, a record with columns missing gets their defaults, and a record from
    usage_record carries every column."""
    from harness import GatewayThread
    gw = GatewayThread("providers:\n  - type: anthropic\n    api-key: sk\n")
    try:
        route = gw.gateway.registry.resolve("claude-sonnet-4-5-20250929")[0]
        call = llm_mux.Call(gw.gateway.router, llm_mux.ChatRequest("claude-sonnet-4-5-20250929"), route,
                            route.provider.credentials[0])
        call.usage = llm_mux.Usage(input_tokens=10, output_tokens=2)
        call.finish("ok")
        record = llm_mux.usage_record(call, 0)
    finally:
        gw.stop()
    assert set(record) == set(llm_mux.USAGE_NAMES)
    store = llm_mux.UsageStore(str(tmp_path / "u.db"))
    batch = [dict(record, record_id="r%03d" % i, input_tokens=i) for i in range(249)]
    batch.append({"provider": "p", "model": "m", "record_id": "partial"})
    store.write(batch)
    got = store.db.execute("SELECT record_id, input_tokens, cost_usd, ttft_ms, failed FROM usage_records "
                           "ORDER BY id").fetchall()
    store.close()
    assert len(got) == 250 and 999 // len(llm_mux.USAGE_NAMES) < 250
    assert [r[:2] for r in got[:249]] == [("r%03d" % i, i) for i in range(249)]
    assert got[0][2] == pytest.approx(record["cost_usd"]) and got[0][2] > 0
    assert got[249] == ("partial", 0, None, None, 0)


@pytest.mark.parametrize("text, says", [
    ("pricing:\n  no-such-model: {input: 1}\n", "t.yaml:2:3: pricing.no-such-model: no provider serves or lists"),
    ("pricing:\n  gpt-5: {input: -1}\n", "non-negative USD per million tokens"),
    ("pricing:\n  gpt-5: {inptu: 1}\n", "expected {input, output, cache-read, cache-write}"),
])
def test_bad_pricing_is_a_config_error_with_its_line(text, says):
    with pytest.raises(llm_mux.ConfigError) as e:
        llm_mux.Config.from_text(text, "t.yaml", environ={})
    assert says in str(e.value)


def test_every_model_a_provider_lists_has_a_price():
    classes = set(llm_mux.PROVIDERS.entries.values()) | set(llm_mux.PROVIDERS.files.values())
    models = {m for c in classes if c.__module__ == "llm_mux" for m in c.default_models}  # not tests' own
    assert models and [m for m in sorted(models) if llm_mux.price_of(m) is None] == []
