"""Fuzz targets for the PostgreSQL client's parsers of outside bytes: the server's startup and authentication
messages (SCRAM included) and query results, and connection URLs. A seeded mutator (bit flips, byte changes,
insertions, deletions, truncation, splices of valid messages) runs a bounded number of cases; whatever the server
sends, the client raises PgError (or PgConnectionError) or succeeds — never another exception, never a hang.
`LLM_MUX_FUZZ_CASES` raises the count for a longer local run."""
import asyncio
import base64
import os
import random
import struct

import llm_mux
from harness import channel_with

CASES = int(os.environ.get("LLM_MUX_FUZZ_CASES", "20000"))


def msg(kind, payload=b""):
    return kind + struct.pack("!I", len(payload) + 4) + payload


def cstr(text):
    return text.encode() + b"\x00"


def ready(status=b"I"):
    return msg(b"Z", status)


def startup_ok():
    return (msg(b"R", struct.pack("!I", 0)) + msg(b"S", cstr("server_version") + cstr("15.0")) +
            msg(b"K", struct.pack("!II", 42, 7)) + ready())


def scram_startup():
    nonce = "srv" + "x" * 20
    return (msg(b"R", struct.pack("!I", 10) + cstr("SCRAM-SHA-256") + b"\x00") +
            msg(b"R", struct.pack("!I", 11) + ("r=%s,s=%s,i=4096" % (nonce, base64.b64encode(b"salt").decode()))
                .encode()) + msg(b"R", struct.pack("!I", 12) + b"v=AAAA") + startup_ok())


def row_description(cols):
    out = struct.pack("!H", len(cols))
    for name, oid in cols:
        out += cstr(name) + struct.pack("!IHIhih", 0, 0, oid, -1, -1, 0)
    return msg(b"T", out)


def data_row(values):
    out = struct.pack("!H", len(values))
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!I", len(v)) + v
    return msg(b"D", out)


def query_reply():
    cols = [("i", 23), ("b", 16), ("f", 701), ("n", 1700), ("t", 25), ("j", 3802), ("by", 17), ("ts", 1184),
            ("d", 1082), ("a", 1007), ("ta", 1009)]
    row = [b"42", b"t", b"1.5", b"3.25", b"hello", b'{"a": [1, 2]}', b"\\x00ff", b"2026-12-04 13:39:30.12+00",
           b"2026-02-28", b"{1,2,NULL}", b'{"a b","c\\"d",NULL}']
    return (msg(b"1") + msg(b"2") + row_description(cols) + data_row(row) + data_row([None] * len(cols)) +
            msg(b"C", cstr("SELECT 2")) + msg(b"A", struct.pack("!I", 9) + cstr("ch") + cstr("payload")) + ready())


def error_reply():
    return msg(b"E", b"SERROR\x00C23505\x00Mduplicate key\x00Ddetail\x00\x00") + ready()


SEEDS = [("startup", startup_ok()), ("startup", scram_startup()), ("query", query_reply()),
         ("query", error_reply())]


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.choice([0, 0xff, 0x7f, 0x80, ord("E"), ord("Z"), rng.randrange(256)])
        elif op == 2:
            i = rng.randrange(len(data) + 1)
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and data:
            i = rng.randrange(len(data))
            del data[i:i + rng.randint(1, 8)]
        elif op == 4:
            del data[rng.randrange(len(data) + 1):]
        else:  # splice in a piece of another valid exchange
            other = rng.choice(SEEDS)[1]
            i, j = sorted(rng.randrange(len(other) + 1) for _ in range(2))
            k = rng.randrange(len(data) + 1)
            data[k:k] = other[i:j]
    return bytes(data)


def feed(conn, data):
    conn.ch = channel_with(data)  # the server says nothing more: a short reply ends in ChannelClosed, not a wait


async def one(kind, data, notes):
    settings = llm_mux.pg_settings("postgresql://u:pw@127.0.0.1/db", env={})
    conn = llm_mux.PgConnection(settings)
    conn.on_notify = lambda *a: notes.append(a)
    feed(conn, data)
    try:
        if kind == "startup":
            await asyncio.wait_for(conn._guarded(conn._startup(None)), 5)
        else:
            await conn.execute("SELECT $1", 1, timeout=5)
    except llm_mux.PgError:
        pass


def test_mutated_server_bytes_raise_only_pg_errors():
    rng = random.Random(20261204)
    notes = []

    async def run():
        # the seeds themselves parse (the fuzzer starts from valid exchanges)
        conn = llm_mux.PgConnection(llm_mux.pg_settings("postgresql://u@h/db", env={}))
        feed(conn, query_reply())
        result = await conn.execute("SELECT 1")
        assert result.rows[0][0] == 42 and result.rows[0][9] == [1, 2, None] and result.tag == "SELECT 2"
        for _ in range(CASES):
            kind, seed = rng.choice(SEEDS)
            await one(kind, mutate(rng, seed), notes)
    asyncio.run(run())


def test_random_urls_raise_only_value_errors():
    rng = random.Random(7)
    alphabet = "postgresql://:@/?&=%[]._-0123456789abcXYZ \x00\u00e9"
    for _ in range(CASES):
        url = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if rng.random() < 0.5:
            url = "postgresql://" + url
        try:
            s = llm_mux.pg_settings(url, env={})
        except ValueError:
            continue
        assert isinstance(s["port"], int) and s["sslmode"] in llm_mux.PG_SSLMODES


def test_a_server_that_skips_the_scram_proof_is_refused():
    nonce_holder = {}
    real_init = llm_mux.PgScram.__init__

    def fixed_nonce(self, password):
        real_init(self, password)
        nonce_holder["n"] = self.nonce
    llm_mux.PgScram.__init__ = fixed_nonce
    try:
        async def run():
            conn = llm_mux.PgConnection(llm_mux.pg_settings("postgresql://u:pw@127.0.0.1/db", env={}))
            feed(conn, b"")
            first = msg(b"R", struct.pack("!I", 10) + cstr("SCRAM-SHA-256") + b"\x00")
            conn.ch.buf += first
            conn.ch.eof = False
            task = asyncio.ensure_future(conn._guarded(conn._startup(None)))
            while "n" not in nonce_holder:  # the client has answered the SASL offer
                await asyncio.sleep(0)
            server_first = "r=%sSRV,s=%s,i=4096" % (nonce_holder["n"], base64.b64encode(b"salt").decode())
            conn.ch.data_received(msg(b"R", struct.pack("!I", 11) + server_first.encode()) + startup_ok())
            try:
                await asyncio.wait_for(task, 5)
            except llm_mux.PgConnectionError as e:
                return e
            return None
        err = asyncio.run(run())
        assert err is not None and err.sqlstate == "28000" and "without proving" in err.message
    finally:
        llm_mux.PgScram.__init__ = real_init
