"""Request framing values parsed as RFC 9110/9112 say, compared with h11: only SP and HTAB are optional
whitespace around Content-Length and Transfer-Encoding values (no Unicode spaces such as \\xa0 or \\x85), a
Content-Length is ASCII digits, and a bare LF line ending is a 400 at once (not a 408 after the header timeout)."""
import socket

import h11
import pytest

from harness import openai_provider_config

PAYLOADS = {
    "te-nbsp": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xa0chunked\r\n\r\n0\r\n\r\n",
    "te-nel": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\x85\r\n\r\n0\r\n\r\n",
    "cl-nbsp": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xa05\r\n\r\nhello",
    "cl-superscript": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\nhi",
    "cl-plus": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "bare-lf-head": b"GET /v1/models HTTP/1.1\nHost: x\n\n",
    "bare-lf-in-headers": b"GET /v1/models HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "bare-lf-chunk": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
}


def h11_rejects(data):
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        while True:
            event = conn.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.EndOfMessage):
                return False
    except h11.RemoteProtocolError:
        return True


def send(gw, data):
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(data)
    out = b""
    while b"\r\n" not in out:
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    s.close()
    return out


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_framing_values_are_strict(gateway, upstream, name):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "server: {header-timeout: 30}\n")
    got = send(gw, PAYLOADS[name])
    assert got.startswith(b"HTTP/1.1 400"), got[:200]  # a 408 would mean it waited for a CRLF that never came
    if not name.startswith("bare-lf"):
        assert h11_rejects(PAYLOADS[name])  # the reference refuses them too
    assert up.requests == []
