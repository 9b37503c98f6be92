"""The hand-rolled HTTP/1.1 server: framing, keep-alive, pipelining, limits, smuggling defences, timeouts,
streaming. Checked with raw sockets, against h11's parser on a shared corpus, and with curl as a client."""
import base64
import json
import shutil
import subprocess

import h11
import pytest

from httpkit import Reader, ServerThread, connect, echo_app

CONFIG = """
max-request-size: 1000
server: {header-timeout: 1, keepalive-timeout: 1.5}
cors: {enable: true, allow-origins: ["https://app.example"]}
"""


@pytest.fixture(scope="module")
def srv():
    s = ServerThread(echo_app, CONFIG)
    yield s
    s.stop()


def exchange(srv, raw, count=1):
    s = connect(srv.port)
    s.sendall(raw)
    r = Reader(s)
    out = [r.response() for _ in range(count)]
    return out, r, s


def test_keep_alive_serves_several_requests_on_one_connection(srv):
    s = connect(srv.port)
    r = Reader(s)
    for i in range(3):
        s.sendall(b"GET /x%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        resp = r.response()
        assert resp.status == 200 and resp.json["path"] == "/x%d" % i
        assert resp.header("connection") is None
    s.close()


def test_pipelined_requests_are_answered_in_order(srv):
    raw = b"".join(b"POST /p%d HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n%d" % (i, i) for i in range(5))
    resps, r, s = exchange(srv, raw, 5)
    assert [x.json["path"] for x in resps] == ["/p%d" % i for i in range(5)]
    assert [base64.b64decode(x.json["body"]) for x in resps] == [b"%d" % i for i in range(5)]



def test_close_requested_by_client_closes(srv):
    resps, r, s = exchange(srv, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert resps[0].header("connection") == "close"
    assert r.closed()
    resps, r, s = exchange(srv, b"GET / HTTP/1.0\r\n\r\n")
    assert resps[0].status == 200 and r.closed()


def test_chunked_request_body_with_extensions_and_trailers(srv):
    raw = (b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    resps, _, _ = exchange(srv, raw)
    assert base64.b64decode(resps[0].json["body"]) == b"hello world"


def test_expect_100_continue(srv):
    s = connect(srv.port)
    s.sendall(b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    r = Reader(s)
    interim = r.response(head_only=True)
    assert interim.status == 100
    s.sendall(b"body")
    final = r.response()
    assert final.status == 200 and base64.b64decode(final.json["body"]) == b"body"


def test_expect_with_too_large_body_gets_413_without_continue(srv):
    s = connect(srv.port)
    s.sendall(b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    r = Reader(s)
    resp = r.response()
    assert resp.status == 413
    assert r.closed()


def test_head_has_headers_but_no_body(srv):
    s = connect(srv.port)
    s.sendall(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    r = Reader(s)
    head = r.response(head_only=True)
    assert head.status == 200 and int(head.header("content-length")) > 0
    after = r.response()  # the next response starts right after the HEAD's headers
    assert after.json["path"] == "/after"


def test_cors_preflight_and_simple_response_when_enabled(srv):
    raw = (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example\r\n"
           b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n")
    resps, _, _ = exchange(srv, raw)
    p = resps[0]
    assert p.status == 204
    assert p.header("access-control-allow-origin") == "https://app.example"
    assert "POST" in p.header("access-control-allow-methods")
    assert p.header("access-control-allow-headers") == "authorization, content-type"
    resps, _, _ = exchange(srv, b"GET / HTTP/1.1\r\nHost: a\r\nOrigin: https://evil.example\r\n\r\n")
    assert resps[0].header("access-control-allow-origin") is None


def test_cors_headers_absent_when_disabled():
    s = ServerThread(echo_app, "")
    try:
        resps, _, _ = exchange(s, b"OPTIONS / HTTP/1.1\r\nHost: a\r\nOrigin: https://x\r\n"
                                  b"Access-Control-Request-Method: POST\r\n\r\n")
        assert resps[0].status == 204 and resps[0].header("access-control-allow-origin") is None
    finally:
        s.stop()


def test_body_over_limit_is_413_before_the_body_is_read(srv):
    s = connect(srv.port)
    s.sendall(b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n")  # no body sent at all
    r = Reader(s)  # its socket gives up long before the 60 s body timeout: waiting for the body would fail
    resp = r.response()
    assert resp.status == 413
    assert r.closed()


def test_chunked_body_over_limit_is_413(srv):
    raw = b"POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n" * 1
    raw += b"300\r\n" + b"y" * 768 + b"\r\n0\r\n\r\n"
    resps, r, _ = exchange(srv, raw)
    assert resps[0].status == 413


def test_long_request_line_is_414(srv):
    resps, r, _ = exchange(srv, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resps[0].status == 414 and r.closed()


def test_large_or_many_headers_are_431(srv):
    resps, r, _ = exchange(srv, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * (70 * 1024) + b"\r\n\r\n")
    assert resps[0].status == 431 and r.closed()
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    resps, r, _ = exchange(srv, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    assert resps[0].status == 431


def test_slow_headers_get_408_and_close(srv):
    s = connect(srv.port)
    s.sendall(b"GET / HTTP/1.1\r\nX-Slow: 1\r\n")  # and never the end of the head
    r = Reader(s)
    resp = r.response()
    assert resp.status == 408 and b"not received in time" in resp.body
    assert r.closed()


def test_idle_keep_alive_connection_is_closed_quietly(srv):
    s = connect(srv.port)
    s.settimeout(5)
    assert s.recv(100) == b""  # closed without a 408: nothing had been sent


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Cr: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Space : v\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
]


@pytest.mark.parametrize("raw", SMUGGLING)
def test_ambiguous_or_malformed_requests_are_400_and_close(srv, raw):
    s = connect(srv.port)
    s.sendall(raw)
    r = Reader(s)
    resp = r.response()  # bare-LF framing included: refused at once, not left to the header timeout (408)
    assert resp.status == 400, (raw, resp.status, resp.body)
    assert r.closed()


def test_http2_and_unknown_versions_are_refused(srv):
    resps, r, _ = exchange(srv, b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    assert resps[0].status == 505


# Requests on which llm_mux and h11 must agree: accepted with the same method/target/headers/body, or refused.
H11_CORPUS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /p?q=1&r=%20 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nValue:   spaced out   \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nEmpty:\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Space : v\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"BAD REQUEST LINE\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n: empty-name\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
]
# Where we are deliberately stricter than h11 (RFC 9112 allows or requires rejecting these).
STRICTER_THAN_H11 = {
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",  # obs-fold: h11 unfolds, we refuse
    # Content-Length with Transfer-Encoding: h11 lets chunked win; we refuse the ambiguity (smuggling).
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


def h11_parse(raw):
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    conn.receive_data(b"")
    out = {"body": b""}
    try:
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.Request):
                out["method"] = ev.method.decode()
                out["target"] = ev.target.decode()
                out["headers"] = [[k.decode().lower(), v.decode("latin-1")] for k, v in ev.headers]
            elif isinstance(ev, h11.Data):
                out["body"] += bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return out
            elif ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
                return None
    except h11.RemoteProtocolError:
        return None


def fold_cl(headers):
    """h11 folds identical repeated Content-Length fields into one and lower-cases transfer codings."""
    out, seen = [], False
    for k, v in headers:
        if k == "content-length":
            if seen:
                continue
            seen = True
        if k == "transfer-encoding":
            v = v.lower()  # h11 lower-cases transfer codings
        out.append([k, v])
    return out


@pytest.mark.parametrize("raw", H11_CORPUS)
def test_parser_agrees_with_h11(srv, raw):
    expected = h11_parse(raw)
    s = connect(srv.port)
    s.sendall(raw + (b"" if expected is not None else b""))
    try:
        resp = Reader(s).response()
    except EOFError:
        resp = None
    if expected is None:
        assert resp is not None and resp.status in (400, 408, 413), raw
        return
    assert resp.status == 200, (raw, resp.status, resp.body)
    got = resp.json
    assert got["method"] == expected["method"] and got["target"] == expected["target"]
    assert fold_cl(got["headers"]) == fold_cl(expected["headers"])
    assert base64.b64decode(got["body"]) == expected["body"]


@pytest.mark.parametrize("raw", sorted(STRICTER_THAN_H11))
def test_documented_strictness_beyond_h11(srv, raw):
    assert h11_parse(raw) is not None  # h11 accepts it ...
    s = connect(srv.port)
    s.sendall(raw)
    assert Reader(s).response().status == 400  # ... we refuse it


def test_sse_is_flushed_one_event_at_a_time(srv):
    s = connect(srv.port)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
    r = Reader(s)
    head = r.response(head_only=True)
    assert head.status == 200 and head.header("content-type") == "text/event-stream"
    assert head.header("transfer-encoding") == "chunked"
    size = int(r._until(b"\r\n")[:-2], 16)
    first = r._exact(size)
    # one event per chunk: each written as it comes, not held back for the rest of the stream
    assert first.startswith(b"data: 0 ") and first.count(b"data: ") == 1


def test_ndjson_stream(srv):
    resps, _, _ = exchange(srv, b"GET /ndjson HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resps[0].header("content-type") == "application/x-ndjson"
    assert [json.loads(line) for line in resps[0].body.splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_as_client(srv):
    url = "http://127.0.0.1:%d/curl?x=1" % srv.port
    out = subprocess.run(["curl", "-sS", "--http1.1", "-X", "POST", "-H", "Transfer-Encoding: chunked",
                          "-H", "Expect: 100-continue", "--data-binary", "@-", url], input=b"piped body",
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["path"] == "/curl" and got["query"] == {"x": "1"}
    assert base64.b64decode(got["body"]) == b"piped body"
    out = subprocess.run(["curl", "-sS", "--http1.1", "-N", "http://127.0.0.1:%d/stream" % srv.port],
                         capture_output=True, timeout=20)
    assert out.stdout.count(b"data: ") == 5
    # keep-alive: curl reuses one connection for two URLs
    out = subprocess.run(["curl", "-sS", "-v", url, url], capture_output=True, timeout=20)
    assert b"Re-using existing connection" in out.stderr or b"Reusing existing" in out.stderr
