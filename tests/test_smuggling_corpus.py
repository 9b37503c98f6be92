"""Request smuggling differential: a public corpus (the HTTP Garden's payloads) and a grid of framing variants
(Content-Length / Transfer-Encoding names and values, chunk sizes, line endings, request lines, obs-fold), each
followed by a second request, fed to llm_mux's HTTP server and to h11 (the reference). For every payload both
must accept it and frame the same requests (method, target, body), or both must refuse it — except the cases
listed in STRICTER, where llm_mux refuses what h11 lets through, each with its reason."""
import asyncio
import itertools
import os
import re
import urllib.parse

import h11
import pytest

import llm_mux
from harness import NullTransport

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT = b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"


def garden_payloads():
    with open(os.path.join(HERE, "corpus", "http_garden_trophies.txt"), encoding="latin-1") as f:
        lines = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    return [line.encode("latin-1").decode("unicode_escape").encode("latin-1") for line in lines]


def grid_payloads():
    out = []
    head = b"POST /first HTTP/1.1\r\nHost: a\r\n"
    names = [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Content-Length ", b" Content-Length",
             b"\tContent-Length", b"Content_Length", b"Content-Length\x00", b"Content-Length\x0b", b"Content-Lengt"]
    values = [b"5", b" 5", b"5 ", b"\t5\t", b"05", b"+5", b"-5", b"5,5", b"5, 5", b"5,6", b"0x5", b"5\x00",
              b"\xa05", b"5\xa0", b"\x855", b"5_", b"", b" ", b"99999999999999999999999", b"\xd9\xa5", b"5.0",
              b"5 5", b'"5"']
    for name, value in itertools.product(names, values):
        out.append(head + name + b": " + value + b"\r\n\r\nhello" + NEXT)
    te_values = [b"chunked", b" chunked", b"chunked ", b"\tchunked", b"Chunked", b"CHUNKED", b"chunked, chunked",
                 b"gzip, chunked", b"chunked, gzip", b"identity, chunked", b",chunked", b"chunked,", b"\xa0chunked",
                 b"chunked\x85", b"x-chunked", b"chunk", b"chunked;q=1", b'"chunked"', b"chunked\x00", b"",
                 b"identity", b"gzip"]
    body = b"5\r\nhello\r\n0\r\n\r\n"
    for name, value in itertools.product([b"Transfer-Encoding", b"transfer-encoding", b"Transfer-Encoding ",
                                          b"Transfer_Encoding"], te_values):
        out.append(head + name + b": " + value + b"\r\n\r\n" + body + NEXT)
        out.append(head + name + b": " + value + b"\r\nContent-Length: 3\r\n\r\n" + body + NEXT)
    sizes = [b"5", b"05", b"0x5", b"5 ", b"5\t", b"5;ext", b'5;ext="v"', b"5 ;x", b"5; x=y", b"+5", b"-5", b"5_",
             b"00000000000000000005", b"fffffffffffffffffffff5", b"5\x00", b"\xb5", b" 5", b"5\r", b"5;\x00",
             b"5;a=\x7f", b"5" + b";x" * 40]
    for size in sizes:
        out.append(head + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n" + NEXT)
    for trailer in [b"X: y\r\n", b"X y\r\n", b" X: y\r\n", b"Content-Length: 5\r\n", b"X:\x00\r\n"]:
        out.append(head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n" + trailer + b"\r\n" + NEXT)
    for ending in [b"\n", b"\r", b"\r\r\n", b"\n\r"]:
        out.append(b"GET /first HTTP/1.1" + ending + b"Host: a" + ending + ending + NEXT)
        out.append(head + b"Content-Length: 5" + ending + ending + b"hello" + NEXT)
        out.append(head + b"Transfer-Encoding: chunked\r\n\r\n5" + ending + b"hello\r\n0\r\n\r\n" + NEXT)
    lines = [b"GET /first HTTP/1.1", b"GET /first HTTP/1.0", b"GET /first HTTP/1.2", b"GET /first HTTP/2.0",
             b"GET /first http/1.1", b"GET /first HTTP/01.1", b"GET /first HTTP/1.1 ", b"GET  /first HTTP/1.1",
             b"GET /first  HTTP/1.1", b" GET /first HTTP/1.1", b"GET\t/first HTTP/1.1", b"GET /fi rst HTTP/1.1",
             b"GET /first", b"GET", b"get /first HTTP/1.1", b"G\x00T /first HTTP/1.1", b"GET /fi\x00rst HTTP/1.1",
             b"GET /fi\x7frst HTTP/1.1", b"GET /fi\xffrst HTTP/1.1", b"GET http://a/first HTTP/1.1",
             b"GET * HTTP/1.1", b"OPTIONS * HTTP/1.1", b"GET /first HTTP/1.1\x00", b"GE(T /first HTTP/1.1"]
    for line in lines:
        out.append(line + b"\r\nHost: a\r\n\r\n" + NEXT)
    fields = [b"X: a\r\n b", b"X: a\r\n\tb", b"X:a", b"X :a", b"X\t: a", b": a", b"X", b"X: a\x00b", b"X: a\rb",
              b"X: a\x7fb", b"X: a\xffb", b"X: \x01", b"X(: a", b"X\xff: a", b"X: " + b"a" * 5000,
              b"Host: b", b"Host:", b"Content-Length: 5\r\nContent-Length: 5", b"Content-Length: 5\r\nContent-Length: 6",
              b"Content-Length: 5\r\nTransfer-Encoding: chunked"]
    for field in fields:
        out.append(b"GET /first HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n\r\n" + NEXT)
    for first in [b"GET /first HTTP/1.1\r\n\r\n", b"GET /first HTTP/1.0\r\n\r\n",
                  b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                  b"GET /first HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
                  b"\r\nGET /first HTTP/1.1\r\nHost: a\r\n\r\n", b"\r\n\r\nGET /first HTTP/1.1\r\nHost: a\r\n\r\n"]:
        out.append(first + NEXT)
    return out


# Where llm_mux refuses what h11 lets through, on purpose; each refused payload must match one of these.
STRICTER = [
    (rb"(?<!\r)\n", "a bare LF line ending: RFC 9112 §2.2 lets a server accept it; llm_mux refuses it (400), so no "
                     "proxy in front can read the head differently"),
    (rb"\A(?:[^\r]|\r(?!\n\r\n))*?\r\n[ \t]",
     "obsolete line folding (a field line that starts with SP or HTAB): RFC 9112 §5.2 allows refusing it"),
    (rb"(?is)(?=.*\r\ntransfer-encoding[ \t]*:)(?=.*\r\ncontent-length[ \t]*:)",
     "both Transfer-Encoding and Content-Length: RFC 9112 §6.3 says it 'ought to be handled as an error'"),
    (rb"\r\n[^\r\n:]+:[^\r\n]*[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]",
     "a control character in a field value: not a field-vchar (RFC 9110 §5.5)"),
    (rb"\r\n\r\n[0-9A-Fa-f]+(?:[ \t]|;[^\n]*\r[^\n])",
     "whitespace after a chunk size, or a CR inside a chunk extension: outside RFC 9112 §7.1's grammar"),
    (rb"\A[A-Z]+ \S+ HTTP/(?!1\.)\d", "an HTTP version other than 1.x: answered 505"),
]
STRICTER = [(re.compile(pattern), why) for pattern, why in STRICTER]
# HTTP/1.0 with Connection: keep-alive: llm_mux keeps the connection (RFC 9112 §9.3), h11 closes it, so llm_mux
# may frame more requests after the ones both agree on.
KEEP_ALIVE_10 = re.compile(rb"(?i)\A[A-Z]+ \S+ HTTP/1\.0\r\n(?:[^\r]*\r\n)*?connection:[ \t]*keep-alive")


class Recorder(NullTransport):
    def __init__(self):
        self.out = []

    def write(self, data):
        self.out.append(bytes(data))

    def get_extra_info(self, name, default=None):
        return default

    def can_write_eof(self):
        return False


LIMITS = llm_mux.ServerLimits(llm_mux.Config.from_text("", "t.yaml", environ={}))


def ours(data):
    """(requests framed, refused) by llm_mux's server: the bytes, then the end of the stream."""
    seen = []

    async def app(req):
        seen.append((req.method.encode(), req.target.encode("latin-1"), bytes(req.body)))
        return llm_mux.Response(200, b"ok", content_type="text/plain")

    async def run():
        server = llm_mux.HttpServer(app, lambda: LIMITS, access_log=False)
        ch = llm_mux.Channel()
        ch.transport = Recorder()
        ch.buf += data
        ch.eof = True
        await asyncio.wait_for(server._serve(ch), 10)
        return b"".join(ch.transport.out)

    written = asyncio.run(run())
    statuses = [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", written)]
    return seen, any(s >= 400 for s in statuses)


def theirs(data):
    """(requests framed, refused) by h11."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    seen, current = [], None
    try:
        while True:
            event = conn.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                return seen, False
            if isinstance(event, h11.Request):
                current = [event.method, event.target, b""]
            elif isinstance(event, h11.Data):
                current[2] += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                seen.append(tuple(current))
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "2")]))
                conn.send(h11.Data(data=b"ok"))
                conn.send(h11.EndOfMessage())
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return seen, False
                conn.start_next_cycle()
    except h11.RemoteProtocolError:
        return seen, True


def normalized(framed):
    """h11's requests as llm_mux's app sees them: an absolute-form target is reduced to its path (RFC 9112 §3.2.2)
    and OPTIONS is left out (the server answers it itself, for CORS preflights)."""
    out = []
    for method, target, body in framed:
        if method == b"OPTIONS":
            continue
        if target.startswith((b"http://", b"https://")):
            parts = urllib.parse.urlsplit(target)
            target = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
        out.append((method, target, body))
    return out


PAYLOADS = [("garden-%d" % i, p) for i, p in enumerate(garden_payloads())] + \
           [("grid-%d" % i, p) for i, p in enumerate(grid_payloads())]


def test_the_corpus_is_all_there():
    assert len(garden_payloads()) >= 70 and len(grid_payloads()) >= 400


@pytest.mark.parametrize("name, data", PAYLOADS, ids=[n for n, _ in PAYLOADS])
def test_llm_mux_and_h11_agree(name, data):
    (got, refused), (want, h11_refused) = ours(data), theirs(data)
    want = normalized(want)
    if (got, refused) == (want, h11_refused):
        return
    assert got[:len(want)] == want[:len(got)], "llm_mux frames requests differently from h11: %r\nours %r\nh11  %r" % (
        data, (got, refused), (want, h11_refused))
    if refused and not h11_refused or refused and len(got) < len(want):
        reason = next((why for pattern, why in STRICTER if pattern.search(data)), None)
        assert reason, "llm_mux refuses what h11 accepts: %r\nours %r\nh11  %r" % (data, got, want)
    elif not refused and not h11_refused and len(got) > len(want):
        assert KEEP_ALIVE_10.search(data), "llm_mux frames more requests than h11: %r\nours %r\nh11  %r" % (
            data, got, want)
    else:
        raise AssertionError("h11 refuses what llm_mux accepts: %r\nours %r\nh11  %r" % (data, (got, refused),
                                                                                         (want, h11_refused)))
