"""The outbound HTTP client: pooling, TLS (SNI, CA file), decoding, timeouts, upstream-overrides, and every proxy
type against real proxy servers (tinyproxy, dante, microsocks, stunnel)."""
import asyncio
import json

import pytest

import llm_mux
from fakes import FakeUpstream, Reply
from certs import make_certs
import proxies


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def plain():
    u = FakeUpstream(lambda r: Reply(body={"path": r.path, "peer": r.peer[1]})).start()
    yield u
    u.stop()


@pytest.fixture
def secure(certs):
    ca, cert, key = certs
    u = FakeUpstream(lambda r: Reply(body={"path": r.path, "tls": True}), certfile=cert, keyfile=key).start()
    yield u
    u.stop()


def make_client(text="", environ=None):
    cfg = llm_mux.Config.from_text(text, "t.yaml", environ=environ or {})
    return llm_mux.HttpClient(lambda: cfg)


def run(coro):
    return asyncio.run(coro)


async def get_json(client, url, **kw):
    resp = await client.request("GET", url, **kw)
    data = await resp.json()
    return resp.status, data


def test_pooled_keep_alive_connection_is_reused(plain):
    async def go():
        c = make_client()
        _, a = await get_json(c, plain.url + "/one")
        _, b = await get_json(c, plain.url + "/two")
        c.close_idle()
        return a, b
    a, b = run(go())
    assert a["path"] == "/one" and b["path"] == "/two"
    assert a["peer"] == b["peer"]  # same client port: one TCP connection


def test_tls_with_ca_file_and_sni(secure, certs):
    ca = certs[0]

    async def go():
        c = make_client("ca-file: %s\n" % ca)
        status, data = await get_json(c, "https://localhost:%d/x" % secure.port)
        c.close_idle()
        return status, data
    status, data = run(go())
    assert status == 200 and data == {"path": "/x", "tls": True}


def test_tls_without_trusting_the_ca_fails_cleanly(secure):
    async def go():
        c = make_client()
        await c.request("GET", "https://localhost:%d/x" % secure.port)
    with pytest.raises(llm_mux.UpstreamError) as e:
        run(go())
    assert e.value.kind == "tls"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
@pytest.mark.parametrize("chunked", [True, False])
def test_compressed_bodies_are_decoded(encoding, chunked):
    payload = {"text": "x" * 5000, "n": 1}
    u = FakeUpstream(lambda r: Reply(body=payload, encoding=encoding, chunked=chunked)).start()
    try:
        async def go():
            c = make_client()
            resp = await c.request("GET", u.url + "/")
            return await resp.json()
        assert run(go()) == payload
        assert u.requests[0].headers["accept-encoding"] == "gzip, deflate"
    finally:
        u.stop()


def test_streaming_reads_arrive_incrementally_and_silence_times_out():
    events = ['{"a":1}', 2.5, '{"b":2}']
    u = FakeUpstream(lambda r: Reply("sse", events=events)).start()
    try:
        async def go():
            c = make_client("stream-timeout: 1\n")
            resp = await c.request("GET", u.url + "/s")
            got = []
            with pytest.raises(llm_mux.UpstreamError) as e:
                async for chunk in resp.iter_bytes():
                    got.append(chunk)
            return got, e.value
        got, err = run(go())
        assert b"".join(got) == b'data: {"a":1}\n\n'
        assert err.kind == "timeout"
    finally:
        u.stop()


def test_response_header_timeout():
    u = FakeUpstream(lambda r: Reply("hang")).start()
    try:
        async def go():
            c = make_client("stream-timeout: 1\n")
            await c.request("GET", u.url + "/")
        with pytest.raises(llm_mux.UpstreamError) as e:
            run(go())
        assert e.value.kind == "timeout"
    finally:
        u.server.server_close()


def test_connection_refused_is_a_connect_error():
    from fakes import free_port
    port = free_port()

    async def go():
        await make_client().request("GET", "http://127.0.0.1:%d/" % port)
    with pytest.raises(llm_mux.UpstreamError) as e:
        run(go())
    assert e.value.kind == "connect"


def test_max_response_size_is_enforced():
    u = FakeUpstream(lambda r: Reply(body={"x": "y" * 5000})).start()
    try:
        async def go():
            c = make_client("max-response-size: 1000\n")
            resp = await c.request("GET", u.url + "/")
            await resp.read()
        with pytest.raises(llm_mux.UpstreamError) as e:
            run(go())
        assert e.value.kind == "too-large"
    finally:
        u.stop()


def test_upstream_overrides_apply_to_every_request(plain):
    async def go():
        c = make_client('upstream-overrides:\n  "https://api.example.com": "%s"\n' % plain.url)
        return await get_json(c, "https://api.example.com/v1/models?x=1")
    status, data = run(go())
    assert data["path"] == "/v1/models?x=1"


def test_stale_pooled_connection_is_retried_once():
    """A server that closes each keep-alive connection right after answering (as servers do when their idle
    timeout fires) while our next request is already on its way: the request is resent on a fresh connection."""
    import socket
    import threading
    import time
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]
    conns = []

    def serve():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            conns.append(c)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += c.recv(4096)
            body = b'{"n": %d}' % len(conns)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.1)
            c.close()
    threading.Thread(target=serve, daemon=True).start()

    async def go():
        c = make_client()
        first = await get_json(c, "http://127.0.0.1:%d/a" % port)
        second = await get_json(c, "http://127.0.0.1:%d/b" % port)
        return first, second
    try:
        first, second = run(go())
    finally:
        lsock.close()
    assert first == (200, {"n": 1}) and second == (200, {"n": 2})
    assert len(conns) == 2


# -- proxies ----------------------------------------------------------------------------------------------------

def via(proxy_url, url, ca=None):
    async def go():
        text = "proxy-url: %s\n" % json.dumps(proxy_url)
        if ca:
            text += "ca-file: %s\n" % ca
        c = make_client(text)
        try:
            return await get_json(c, url)
        finally:
            c.close_idle()
    return run(go())


def test_http_proxy_absolute_form_and_connect(tmp_path, plain, secure, certs):
    p = proxies.start_tinyproxy(tmp_path)
    try:
        assert via(p.url, plain.url + "/plain")[1]["path"] == "/plain"
        assert via(p.url, "https://localhost:%d/tls" % secure.port, certs[0])[1] == {"path": "/tls", "tls": True}
    finally:
        p.stop()


def test_http_proxy_with_basic_auth(tmp_path, plain, secure, certs):
    p = proxies.start_tinyproxy(tmp_path, "alice", "s3cret")
    try:
        assert via(p.url, plain.url + "/a")[1]["path"] == "/a"
        assert via(p.url, "https://localhost:%d/b" % secure.port, certs[0])[1]["path"] == "/b"
        bad = p.url.replace("s3cret", "wrong")
        with pytest.raises(llm_mux.UpstreamError) as e:
            via(bad, "https://localhost:%d/c" % secure.port, certs[0])
        assert e.value.kind == "proxy" and ("407" in e.value.message or "401" in e.value.message)
    finally:
        p.stop()


def test_socks5_proxy_dante(tmp_path, plain, secure, certs):
    p = proxies.start_dante(tmp_path)
    try:
        assert via(p.url, plain.url + "/s")[1]["path"] == "/s"
        assert via(p.url.replace("socks5:", "socks5h:"), "https://localhost:%d/t" % secure.port,
                   certs[0])[1]["path"] == "/t"
    finally:
        p.stop()


def test_socks5_proxy_with_username_password_microsocks(plain, secure, certs):
    p = proxies.start_microsocks("bob", "pw123")
    try:
        assert via(p.url, plain.url + "/u")[1]["path"] == "/u"
        assert via(p.url, "https://localhost:%d/v" % secure.port, certs[0])[1]["path"] == "/v"
        with pytest.raises(llm_mux.UpstreamError) as e:
            via(p.url.replace("pw123", "nope"), plain.url + "/w")
        assert e.value.kind == "proxy"
    finally:
        p.stop()


def test_https_proxy_tls_to_the_proxy_then_connect(tmp_path, plain, secure, certs):
    ca, cert, key = certs
    tp = proxies.start_tinyproxy(tmp_path)
    port, proc = proxies.start_stunnel(tmp_path, int(tp.url.rsplit(":", 1)[1]), cert, key)
    try:
        url = "https://localhost:%d" % port
        assert via(url, "https://localhost:%d/x" % secure.port, ca)[1] == {"path": "/x", "tls": True}
        assert via(url, plain.url + "/y", ca)[1]["path"] == "/y"
    finally:
        proc.terminate()
        tp.stop()


def test_socks5_resolves_locally_and_socks5h_remotely(plain):
    rec = proxies.RecordingSocks5()
    try:
        via(rec.url, "http://localhost:%d/a" % plain.port)
        via(rec.url.replace("socks5:", "socks5h:"), "http://localhost:%d/b" % plain.port)
        assert rec.seen[0][0] == 1 and rec.seen[0][1] == "127.0.0.1"
        assert rec.seen[1] == (3, "localhost")
    finally:
        rec.stop()


def test_unsupported_proxy_scheme_is_a_clear_error(plain):
    with pytest.raises(llm_mux.UpstreamError) as e:
        via("ftp://127.0.0.1:21", plain.url)
    assert "unsupported proxy scheme" in e.value.message


def test_sse_parser_handles_split_frames_comments_and_crlf():
    p = llm_mux.SSEParser()
    out = p.feed(b": ping\r\n\r\nevent: a\r\ndata: {\"x\"")
    assert out == []
    out = p.feed(b":1}\r\n\r\ndata: line1\ndata: line2\n\ndata:nospace\n\n")
    assert out == [("a", '{"x":1}'), (None, "line1\nline2"), (None, "nospace")]
    assert p.feed(b"data: tail") == []
    assert p.finish() == [(None, "tail")]


def _raw_server(payload_for, splits):
    """A one-shot TCP server on 127.0.0.1 that answers each request with payload_for() sent in pieces of the given
    sizes (cycled), flushing each, so a chunked body arrives cut at arbitrary places."""
    import itertools
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                payload, i = payload_for(), 0
                for size in itertools.cycle(splits):
                    if i >= len(payload):
                        break
                    conn.sendall(payload[i:i + size])
                    i += size
    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.parametrize("splits", [(1,), (2, 3, 5), (7, 1, 64), (4096,)])
def test_a_chunked_body_is_decoded_the_same_however_it_is_cut(splits):
    """The client decodes every complete chunk already received in one pass: chunk sizes with extensions and
    leading zeros, a trailer section, a body cut at any byte (between the CR and LF of a size line too)."""
    import random
    rng = random.Random(len(splits))
    pieces = [bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 17, 300]))) for _ in range(40)]
    body = b"".join(b"%s%x%s\r\n%s\r\n" % (b"00" if i % 3 == 0 else b"", len(p), b";ext=1" if i % 5 == 0 else b"",
                                          p) for i, p in enumerate(pieces))
    payload = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
               + body + b"0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n")
    srv = _raw_server(lambda: payload, splits)
    try:
        async def go():
            c = make_client()
            resp = await c.request("GET", "http://127.0.0.1:%d/" % srv.getsockname()[1])
            return [chunk async for chunk in resp.iter_bytes()]
        got = run(go())
        assert b"".join(got) == b"".join(pieces)
    finally:
        srv.close()


@pytest.mark.parametrize("cut", [b"5\r\nhello\r\n", b"5\r\nhel", b"5\r\nhello\r\n0\r\nX-T: 1\r\n"])
def test_a_chunked_body_cut_short_is_an_upstream_error(cut):
    """An upstream that closes before the last chunk (or its trailer section's end) has sent a broken answer: the
    client says so instead of passing on a body that looks complete."""
    payload = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + cut
    srv = _raw_server(lambda: payload, (4096,))
    try:
        async def go():
            c = make_client()
            resp = await c.request("GET", "http://127.0.0.1:%d/" % srv.getsockname()[1])
            return [chunk async for chunk in resp.iter_bytes()]
        with pytest.raises(llm_mux.UpstreamError) as e:
            run(go())
        assert "closed the connection mid-body" in e.value.message
    finally:
        srv.close()


def test_writes_made_in_one_turn_of_the_loop_leave_in_one_send():
    from harness import NullTransport

    class Recorder(NullTransport):
        def __init__(self):
            self.out = []

        def write(self, data):
            self.out.append(bytes(data))

    async def go():
        ch = llm_mux.Channel()
        ch.transport = t = Recorder()
        for piece in (b"a", b"b", b"c"):
            ch.write_soon(piece)
        assert t.out == []  # nothing sent until this turn of the loop ends
        await asyncio.sleep(0)
        assert t.out == [b"abc"]
        ch.write_soon(b"d")
        ch.write(b"e")  # an immediate write sends what was waiting first: order kept
        assert t.out == [b"abc", b"d", b"e"]
        ch.write_soon(b"f")
        ch.close()  # and so does closing
        assert t.out[-1] == b"f"
        await asyncio.sleep(0)
        assert t.out == [b"abc", b"d", b"e", b"f"]
    run(go())


@pytest.mark.parametrize("size,ok", [(b"5", True), (b"05", True), (b"00000000000000000005", True), (b"5;ext", True),
                                     (b'5;ext="v"', True), (b"0x5", False), (b"+5", False), (b"-5", False),
                                     (b"5_", False), (b"_5", False), (b" 5", False), (b"5 ", False), (b"", False),
                                     (b"\xb5", False), (b"1" * 17, False), (b"5\x00", False)])
def test_an_upstream_chunk_size_is_hex_digits_with_an_optional_extension(size, ok):
    """RFC 9112 §7.1 (1*HEXDIG, leading zeros fine, at most 64 bits): what int(x, 16) would also take ("0x5", "+5",
    "5_", " 5") is a malformed size from an upstream too, never a length read some other way."""
    payload = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"
    srv = _raw_server(lambda: payload, (4096,))
    try:
        async def go():
            c = make_client()
            resp = await c.request("GET", "http://127.0.0.1:%d/" % srv.getsockname()[1])
            return b"".join([chunk async for chunk in resp.iter_bytes()])
        if ok:
            assert run(go()) == b"hello"
        else:
            with pytest.raises(llm_mux.UpstreamError) as e:
                run(go())
            assert "malformed chunk" in e.value.message
    finally:
        srv.close()
