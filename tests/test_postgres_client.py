"""The hand-rolled PostgreSQL client against real servers: the machine's PostgreSQL on 127.0.0.1:5432 and a
private cluster (password authentication, TLS, restarts). psycopg is the reference for values."""
import asyncio
import datetime
import decimal

import psycopg
import pytest

import llm_mux
from harness import wait_until
from pgkit import SHARED_URL, PrivateCluster, need_shared


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = PrivateCluster(tmp_path_factory.mktemp("pgc"))
    yield c
    c.close()


# -- URLs ---------------------------------------------------------------------------------------------------------
def test_urls_and_pg_environment_defaults():
    s = llm_mux.pg_settings("postgres://al%40ice:p%3Ass@db.example:6543/usage?sslmode=require&connect_timeout=3"
                            "&application_name=gw&statement_timeout=500", env={})
    assert (s["user"], s["password"], s["host"], s["port"], s["database"]) == ("al@ice", "p:ss", "db.example", 6543,
                                                                               "usage")
    assert (s["sslmode"], s["connect_timeout"], s["application_name"], s["statement_timeout"]) == ("require", 3,
                                                                                                   "gw", 500)
    env = {"PGHOST": "/var/run/postgresql", "PGPORT": "5433", "PGUSER": "bob", "PGPASSWORD": "pw",
           "PGDATABASE": "stats", "PGSSLMODE": "disable"}
    s = llm_mux.pg_settings("postgresql://", env=env)
    assert (s["host"], s["port"], s["user"], s["password"], s["database"], s["sslmode"]) == (
        "/var/run/postgresql", 5433, "bob", "pw", "stats", "disable")
    s = llm_mux.pg_settings("postgresql:///db?host=/tmp/sock&user=u", env={})
    assert (s["host"], s["user"], s["database"]) == ("/tmp/sock", "u", "db")
    s = llm_mux.pg_settings("postgresql://[::1]:5434/x", env={"PGUSER": "carol"})
    assert (s["host"], s["port"], s["user"]) == ("::1", 5434, "carol")
    for bad in ("mysql://x/y", "postgres://h/db?sslmode=sometimes", "postgres://h:port/db"):
        with pytest.raises(ValueError):
            llm_mux.pg_settings(bad, env={})


# -- values, against psycopg --------------------------------------------------------------------------------------
QUERIES = [
    ("SELECT 1::int2, 2147483647::int4, 9223372036854775807::int8, 42::oid", ()),
    ("SELECT 1.5::float4, 0.1::float8, 'Infinity'::float8, '-Infinity'::float8, 123.4500::numeric", ()),
    ("SELECT true, false, NULL::bool, NULL::text", ()),
    ("SELECT 'héllo wörld ☃'::text, 'x'::varchar(3), 'ab'::char(4), 'nm'::name", ()),
    ("SELECT '{\"a\": [1, 2, {\"b\": null}]}'::json, '{\"k\": \"v\", \"n\": 1.5}'::jsonb", ()),
    ("SELECT '\\x00ff10'::bytea, ''::bytea", ()),
    ("SELECT '2026-12-04 13:39:30.12+00'::timestamptz, '2026-01-02 03:04:05'::timestamp, '2026-02-28'::date", ()),
    ("SELECT '2026-06-01 10:00:00.000001+05:30'::timestamptz, '1999-12-31 23:59:59.5-08'::timestamptz", ()),
    ("SELECT ARRAY[1,2,NULL]::int4[], ARRAY['a b', 'c\"d', 'e\\f', NULL, '']::text[], ARRAY[]::int8[]", ()),
    ("SELECT ARRAY[true,false]::bool[], ARRAY[1.5, 2]::float8[]", ()),
    ("SELECT $1::int8 + 1, $2::text || '!', $3::bool, $4::float8 * 2, $5::numeric", (41, "hi", True, 1.25,
                                                                                     decimal.Decimal("3.14"))),
    ("SELECT $1::bytea, $2::jsonb, $3::timestamptz", (b"\x00\x01\xfe", {"a": [1, "two"]},
                                                       datetime.datetime(2026, 3, 4, 5, 6, 7, 890000,
                                                                         tzinfo=datetime.timezone.utc))),
    ("SELECT $1::text, $2::text, $3::int4", ("'; DROP TABLE pg_class; --", None, -7)),
    ("SELECT $1::date, $2::int4[], $3::text[]", (datetime.date(2024, 2, 29), [1, None, 3], ["x", "y,z", 'q"'])),
    ("SELECT generate_series(1, 5) AS n, 'row' || generate_series(1, 5)", ()),
    ("SELECT * FROM (VALUES (1, 'a'), (2, NULL)) AS t(id, name) WHERE id > $1", (0,)),
]


@pytest.mark.parametrize("sql,args", QUERIES)
def test_values_match_psycopg(sql, args):
    need_shared()

    async def ours():
        conn = await llm_mux.PgConnection(llm_mux.pg_settings(SHARED_URL)).connect()
        try:
            return await conn.fetch(sql, *args)
        finally:
            conn.close()
    got = run(ours())
    import psycopg.types.json
    with psycopg.connect(SHARED_URL.replace("?sslmode=disable", ""), autocommit=True) as ref:
        ref_args = [psycopg.types.json.Jsonb(a) if isinstance(a, dict) else a for a in args]
        want = ref.execute(sql.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s").replace("$4", "%s")
                           .replace("$5", "%s"), ref_args).fetchall()
    assert got == [tuple(r) for r in want]


def test_bound_parameters_errors_transactions_and_timeouts():
    need_shared()

    async def scenario():
        pool = llm_mux.PgPool(llm_mux.pg_settings(SHARED_URL + "&statement_timeout=300"), size=2)
        name = "pgt_%d" % id(pool)
        await pool.execute("CREATE TEMP TABLE IF NOT EXISTS t (id int PRIMARY KEY, v text)")
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE %s (id int PRIMARY KEY, v text)" % name)
            try:
                hostile = "x'); DELETE FROM %s; --" % name
                await conn.execute("INSERT INTO %s VALUES ($1, $2)" % name, 1, hostile)
                assert await conn.fetchval("SELECT v FROM %s WHERE id = $1" % name, 1) == hostile
                # errors carry their SQLSTATE and leave the connection usable
                with pytest.raises(llm_mux.PgError) as e:
                    await conn.execute("INSERT INTO %s VALUES ($1, $2)" % name, 1, "dup")
                assert e.value.sqlstate == "23505" and "duplicate key" in e.value.message
                with pytest.raises(llm_mux.PgError) as e:
                    await conn.execute("SELEC 1")
                assert e.value.sqlstate == "42601"
                with pytest.raises(llm_mux.PgError) as e:
                    await conn.fetch("SELECT 1 / $1::int", 0)
                assert e.value.sqlstate == "22012"
                assert await conn.fetchval("SELECT 2") == 2
                # transactions: a failing block rolls back, a good one commits
                with pytest.raises(llm_mux.PgError):
                    async with conn.transaction():
                        await conn.execute("INSERT INTO %s VALUES ($1, $2)" % name, 2, "rolled back")
                        await conn.execute("INSERT INTO %s VALUES ($1, $2)" % name, 1, "dup")
                assert conn.status == "I"
                async with conn.transaction():
                    assert conn.status == "T"
                    await conn.execute("INSERT INTO %s VALUES ($1, $2)" % name, 3, "kept")
                rows = await conn.fetch("SELECT id FROM %s ORDER BY id" % name)
                assert rows == [(1,), (3,)]
                result = await conn.execute("UPDATE %s SET v = $1" % name, "u")
                assert result.tag == "UPDATE 2" and result.rowcount == 2
                # the server's statement_timeout (from the URL) cancels a long statement
                with pytest.raises(llm_mux.PgError) as e:
                    await conn.execute("SELECT pg_sleep(20)")
                assert e.value.sqlstate == "57014"
                assert await conn.fetchval("SELECT 3") == 3
            finally:
                await conn.execute("DROP TABLE %s" % name)
        # the client-side backstop: the statement is cancelled on the server and the connection dropped
        async with pool.connection() as conn:
            await conn.execute("SET statement_timeout = 0")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            with pytest.raises(llm_mux.PgError) as e:
                await conn.execute("SELECT pg_sleep(30)", timeout=0.3)
            assert e.value.sqlstate == "57014" and conn.closed
        for _ in range(100):
            active = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                                         pid)
            if active == 0:
                break
            await asyncio.sleep(0.1)
        assert active == 0
        pool.close()
    run(scenario())


def test_listen_notify():
    need_shared()

    async def scenario():
        got = []
        arrived = asyncio.Event()

        def handler(channel, payload, pid):
            got.append((channel, payload))
            if len(got) == 2:
                arrived.set()
        listener = llm_mux.PgListener(llm_mux.pg_settings(SHARED_URL), ["llm_mux_test_ch"], handler).start()
        await asyncio.wait_for(listener.connected.wait(), 10)
        pool = llm_mux.PgPool(SHARED_URL)
        await pool.execute("SELECT pg_notify($1, $2)", "llm_mux_test_ch", "first ☃")
        async with pool.transaction() as conn:  # delivered at commit, not before
            await conn.execute("SELECT pg_notify($1, $2)", "llm_mux_test_ch", '{"id": 2}')
        await asyncio.wait_for(arrived.wait(), 10)
        assert got == [("llm_mux_test_ch", "first ☃"), ("llm_mux_test_ch", '{"id": 2}')]
        with pytest.raises(ValueError):
            llm_mux.pg_quote_ident('x"; DROP TABLE y; --')
        await listener.close()
        pool.close()
    run(scenario())


# -- authentication and TLS, on a private cluster -----------------------------------------------------------------
@pytest.mark.parametrize("user", ["scram_user", "md5_user", "plain_user", "postgres"])
def test_password_authentication(cluster, user):
    password = None if user == "postgres" else PrivateCluster.PASSWORD

    async def scenario():
        conn = await llm_mux.PgConnection(llm_mux.pg_settings(cluster.url(user, password, sslmode="disable"))).connect()
        assert await conn.fetchval("SELECT current_user") == user
        conn.close()
        if password is not None:
            with pytest.raises(llm_mux.PgConnectionError) as e:
                await llm_mux.PgConnection(llm_mux.pg_settings(cluster.url(user, "wrong", sslmode="disable"))).connect()
            assert e.value.sqlstate == "28P01"
            with pytest.raises(llm_mux.PgConnectionError):
                await llm_mux.PgConnection(llm_mux.pg_settings(cluster.url(user, sslmode="disable"))).connect()
    run(scenario())


def test_tls_modes(cluster):
    async def connect(**params):
        conn = await llm_mux.PgConnection(llm_mux.pg_settings(
            cluster.url("tls_only", PrivateCluster.PASSWORD, **params))).connect()
        ssl_in_use = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        conn.close()
        return conn.tls, ssl_in_use

    async def scenario():
        assert await connect(sslmode="prefer") == (True, True)
        assert await connect(sslmode="require") == (True, True)
        assert await connect(sslmode="verify-full", sslrootcert=cluster.ca) == (True, True)
        assert await connect(sslmode="verify-ca", sslrootcert=cluster.ca) == (True, True)
        with pytest.raises(llm_mux.PgConnectionError) as e:  # a certificate from a CA we do not trust
            await connect(sslmode="verify-full")
        assert "TLS" in e.value.message
        with pytest.raises(llm_mux.PgConnectionError) as e:  # the role is refused without TLS (pg_hba)
            await connect(sslmode="disable")
        assert e.value.sqlstate == "28000"
    run(scenario())


def test_pool_survives_a_server_restart_under_load(cluster):
    async def scenario():
        pool = llm_mux.PgPool(cluster.url(sslmode="disable"), size=4)
        pool_errors, other_errors, done = [], [], [0]
        stop = asyncio.Event()

        async def worker():
            while not stop.is_set():
                try:
                    assert await pool.fetchval("SELECT $1::int + 1", 1) == 2
                    done[0] += 1
                except llm_mux.PgConnectionError as e:
                    pool_errors.append(e)
                    await asyncio.sleep(0.05)
                except Exception as e:  # anything else would be a bug
                    other_errors.append(e)
                await asyncio.sleep(0)
        workers = [asyncio.ensure_future(worker()) for _ in range(12)]
        while done[0] < 200:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, cluster.stop, "fast")
        await loop.run_in_executor(None, cluster.start)
        before = done[0]
        while done[0] < before + 200:  # serving again, with no restart of the pool
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
        assert other_errors == []
        assert pool_errors, "the restart was not noticed"
        assert pool.opened <= pool.size
        pool.close()
    run(scenario(), timeout=120)
