"""Usage records in PostgreSQL: the same table as SQLite, the same report, nothing lost on SIGTERM, a local spool
while the database is down that drains when it returns, and a bounded spool."""
import signal
import sqlite3

import openai
import psycopg

import llm_mux
from harness import openai_provider_config, wait_until
from pgkit import PrivateCluster


def pg_rows(url, sql="SELECT * FROM usage_records ORDER BY id"):
    with psycopg.connect(url.replace("?sslmode=disable", "")) as c:
        cur = c.execute(sql)
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def chat(gw, n, key="k"):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    for _ in range(n):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])


def stop(gw):
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0


def test_records_go_to_postgres_with_the_sqlite_schema(gateway, upstream, tmp_path, pgdb):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "usage:\n  postgres-url: %s\n" % pgdb)
    chat(gw, 12)
    stop(gw)  # SIGTERM straight after the last answer: every record is written
    got = pg_rows(pgdb)
    assert len(got) == 12 and all(r["outcome"] == "ok" and r["failed"] is False for r in got)
    assert got[0]["provider"] == "fake" and got[0]["model"] == "gpt-test" and got[0]["latency_ms"] > 0
    assert len({r["record_id"] for r in got}) == 12
    assert not (tmp_path / "usage.db").exists()  # not written to SQLite as well
    # the same columns as the SQLite store
    store = llm_mux.UsageStore(str(tmp_path / "ref.db"))
    sqlite_columns = {r[1] for r in store.db.execute("PRAGMA table_info(usage_records)")}
    store.close()
    assert set(got[0]) == sqlite_columns
    # and the management report reads it
    gw2 = gateway(openai_provider_config(up.url) + "usage:\n  dsn: %s\n" % pgdb + "remote-management:\n"
                  "  secret-key: mk\n")
    report = gw2.get_json("/v1/management/usage", headers={"Authorization": "Bearer mk"})["data"]
    assert report["summary"]["total_requests"] == 12 and report["by_provider"]["fake"]["success"] == 12


def test_the_report_is_the_same_from_sqlite_and_postgres(tmp_path, pgdb):
    records = []
    for i in range(40):
        records.append({"provider": "p%d" % (i % 3), "model": "m%d" % (i % 2), "api_key": "key%d" % (i % 4),
                        "auth_id": "a%d" % (i % 5), "source": "s", "requested_at": "2026-11-%02d %02d:10:00" % (
                            1 + i % 9, i % 24), "failed": i % 7 == 0, "input_tokens": i * 3, "output_tokens": i,
                        "reasoning_tokens": i % 2, "total_tokens": i * 4, "record_id": "r%d" % i,
                        "cost_usd": 0.001 * i if i % 2 else None, "subscription_value_usd": 0.5 if i % 5 == 0 else 0,
                        "latency_ms": 12.5, "outcome": "failed" if i % 7 == 0 else "ok"})
    lite = llm_mux.UsageStore(str(tmp_path / "u.db"))
    lite.write(records)
    lite.close()
    pg = llm_mux.PgUsageStore(pgdb)
    pg.write(records)
    pg.write(records[:10])  # written twice (a drained spool after a crash): stored once
    assert pg.count() == 40
    pg.close()
    import calendar
    args = (calendar.timegm((2026, 11, 1, 0, 0, 0)) - 86400, calendar.timegm((2026, 12, 1, 0, 0, 0)))  # UTC
    for filters in ({}, {"provider": "p1"}, {"key": "key2", "model": "m0"}):
        a = llm_mux.usage_report(("sqlite", str(tmp_path / "u.db")), *args, filters)
        b = llm_mux.usage_report(("postgres", pgdb), *args, filters)
        assert a == b and a["summary"]["total_requests"] > 0


def test_postgres_down_spools_locally_and_drains_when_it_returns(gateway, upstream, tmp_path):
    cluster = PrivateCluster(tmp_path)
    try:
        url = cluster.url(sslmode="disable")
        spool = tmp_path / "spool.db"
        up = upstream()
        gw = gateway(openai_provider_config(up.url) + "usage:\n  postgres-url: %s\n  spool-path: %s\n"
                     % (url, spool))
        chat(gw, 3)
        wait_until(lambda: len(pg_rows(url)) == 3, what="records in PostgreSQL", ignore=(psycopg.Error,))
        cluster.stop()
        chat(gw, 7)  # requests are served while the database is down (each would raise otherwise)
        wait_until(lambda: spool.exists() and sqlite3.connect(str(spool)).execute(
            "SELECT count(*) FROM usage_records").fetchone()[0] == 7, what="records in the spool")
        metrics = gw.get_text("/metrics")
        assert "llm_mux_usage_records_lost_total 0" in metrics
        cluster.start()
        wait_until(lambda: len(pg_rows(url)) == 10, timeout=60, what="the spool drained into PostgreSQL")
        assert sqlite3.connect(str(spool)).execute("SELECT count(*) FROM usage_records").fetchone()[0] == 0
        chat(gw, 2)
        stop(gw)
        got = pg_rows(url)
        assert len(got) == 12 and len({r["record_id"] for r in got}) == 12
    finally:
        cluster.close()


def test_the_spool_is_bounded(tmp_path):
    closed = "postgresql://postgres@127.0.0.1:1/x?sslmode=disable&connect_timeout=1"
    store = llm_mux.SpoolingStore(llm_mux.PgUsageStore(closed), llm_mux.UsageStore(str(tmp_path / "s.db")), 5)
    writer = llm_mux.UsageWriter(store, flush_interval=0.05)
    for i in range(8):
        writer.record({"provider": "p", "model": "m", "record_id": "r%d" % i, "requested_at": "2026-12-01 00:00:00"})
    wait_until(lambda: store.spooled + store.dropped == 8, what="records spooled or dropped")
    writer.close()
    assert (store.spooled, store.dropped, writer.lost) == (5, 3, 3)
    assert sqlite3.connect(str(tmp_path / "s.db")).execute("SELECT count(*) FROM usage_records").fetchone()[0] == 5


def test_a_database_written_by_llm_mux_itself_is_used_as_is(pgdb):
    # the original's PostgreSQL table (gateway.md §7.2): TIMESTAMPTZ times, created_at, none of our columns
    with psycopg.connect(pgdb.replace("?sslmode=disable", ""), autocommit=True) as c:
        c.execute("CREATE TABLE usage_records (id BIGSERIAL PRIMARY KEY, provider TEXT NOT NULL, model TEXT NOT NULL, "
                  "api_key TEXT NOT NULL DEFAULT '', auth_id TEXT NOT NULL DEFAULT '', auth_index INTEGER DEFAULT 0, "
                  "source TEXT NOT NULL DEFAULT '', requested_at TIMESTAMPTZ NOT NULL, failed BOOLEAN DEFAULT FALSE, "
                  "input_tokens BIGINT NOT NULL DEFAULT 0, output_tokens BIGINT NOT NULL DEFAULT 0, "
                  "reasoning_tokens BIGINT NOT NULL DEFAULT 0, cached_tokens BIGINT NOT NULL DEFAULT 0, "
                  "total_tokens BIGINT NOT NULL DEFAULT 0, created_at TIMESTAMPTZ DEFAULT NOW())")
        c.execute("INSERT INTO usage_records (provider, model, requested_at, total_tokens) VALUES "
                  "('claude', 'claude-x', '2026-11-20 10:00:00+00', 7)")
    store = llm_mux.PgUsageStore(pgdb)
    store.write([{"provider": "p", "model": "m", "record_id": "r1", "requested_at": "2026-11-21 11:00:00",
                  "total_tokens": 5}])
    assert store.count() == 2
    store.close()
    import calendar
    report = llm_mux.usage_report(("postgres", pgdb), calendar.timegm((2026, 11, 15, 0, 0, 0)),
                                  calendar.timegm((2026, 12, 1, 0, 0, 0)), {})
    assert report["summary"]["total_requests"] == 2 and report["summary"]["tokens"]["total"] == 12
    assert {d["day"] for d in report["timeline"]["by_day"]} == {"2026-11-20", "2026-11-21"}


def test_spend_is_rebuilt_per_key_and_second_from_postgres(pgdb):
    """The same records give the same buckets from PostgreSQL (timestamps with their zone) as from SQLite."""
    from test_client_keys import rebuild_from
    now, spent, requests = rebuild_from(llm_mux.PgUsageStore(pgdb), ("postgres", pgdb))
    assert spent == {"a": [[now - 90, 7, 1.0], [now - 5, 31, 0.875]], "b": [[now - 3600, 3, 2.0]]}
    assert requests == {"a": [[now - 5, 3]]}
