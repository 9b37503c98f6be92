"""WebSocket (RFC 6455) in the HTTP server, against the `websockets` library as the client and against raw frames
a well-behaved library would never send; and the Responses API over a WebSocket with the OpenAI SDK's own
`client.responses.connect()`."""
import asyncio
import base64
import json
import os
import socket
import struct

import openai
import pytest
import websockets

from fakes import Reply, openai_stream_events
from harness import openai_provider_config


def ws_url(gw, path="/v1/responses"):
    return gw.url.replace("http://", "ws://") + path


def sse_upstream(upstream):
    return upstream(lambda r: Reply("sse", events=openai_stream_events(pieces=("Hi", " there"))))


def test_responses_over_a_websocket_with_the_openai_sdk(gateway, upstream):
    up = sse_upstream(upstream)
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\n")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-gw")
    with client.responses.connect() as conn:
        conn.response.create(model="gpt-test", input="hello")
        kinds, text, first = [], "", None
        for event in conn:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                first = event.response
                break
        assert text == "Hi there" and first.output[0].content[0].text == "Hi there"
        assert kinds[0] == "response.created" and "response.in_progress" in kinds
        # the next turn sends only its new input: the socket remembers the conversation
        conn.response.create(model="gpt-test", previous_response_id=first.id,
                             input=[{"role": "user", "content": "and again"}])
        for event in conn:
            assert event.type != "error", event
            if event.type == "response.completed":
                break
        sent = [m["content"] for m in up.requests[-1].json["messages"]]
        assert sent == ["hello", "Hi there", "and again"]
        # errors come back as error events on the same socket, which stays open
        conn.response.create(model="no-such-model", input="x")
        for event in conn:
            assert event.type == "error"
            assert "no-such-model" in event.error.message
            break
        conn.response.create(model="gpt-test", previous_response_id="resp_unknown", input="x")
        for event in conn:
            assert event.type == "error" and event.error.code == "previous_response_not_found"
            break
        conn.response.create(model="gpt-test", input="still here")
        for event in conn:
            assert event.type != "error", event
            if event.type == "response.completed":
                break
    assert len([r for r in up.requests if r.path.endswith("/chat/completions")]) == 3


def test_the_handshake_needs_the_key_and_a_real_upgrade(gateway, upstream):
    up = sse_upstream(upstream)
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\n")

    async def scenario():
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            async with websockets.connect(ws_url(gw)):
                pass
        assert e.value.response.status_code == 401
        async with websockets.connect(ws_url(gw), additional_headers={"Authorization": "Bearer sk-gw"}) as ws:
            await ws.send(json.dumps({"type": "response.create", "model": "gpt-test", "input": "hi"}))
            events = []
            while not events or events[-1]["type"] != "response.completed":
                events.append(json.loads(await ws.recv()))
            await ws.send("not json")
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and err["status"] == 400
            pong = await ws.ping(b"are you there")
            await asyncio.wait_for(pong, 10)
        assert ws.close_code == 1000
    asyncio.run(scenario())
    import urllib.request
    import urllib.error
    req = urllib.request.Request(gw.url + "/v1/responses", headers={"Authorization": "Bearer sk-gw"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def raw_connect(gw, path="/v1/responses", key="sk-gw", version="13"):
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    nonce = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
               "Sec-WebSocket-Version: %s\r\nAuthorization: Bearer %s\r\n\r\n" % (path, nonce, version, key)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    return s, head.decode()


def frame(opcode, payload, fin=True, mask=True, rsv=0):
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    head = struct.pack("!B", b0)
    m = 0x80 if mask else 0
    if n < 126:
        head += struct.pack("!B", m | n)
    elif n < 65536:
        head += struct.pack("!BH", m | 126, n)
    else:
        head += struct.pack("!BQ", m | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(s):
    def exactly(n):
        out = b""
        while len(out) < n:
            got = s.recv(n - len(out))
            if not got:
                raise ConnectionError("closed")
            out += got
        return out
    b0, b1 = exactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exactly(8))[0]
    assert not b1 & 0x80  # the server never masks
    return b0 & 0x0F, exactly(n)


def close_code(s):
    opcode, data = read_frame(s)
    while opcode != 8:
        opcode, data = read_frame(s)
    return struct.unpack("!H", data[:2])[0]


@pytest.mark.parametrize("frames,code", [
    ([frame(1, b'{"type": "x"}', mask=False)], 1002),             # clients must mask
    ([frame(1, b"x", rsv=0x40)], 1002),                          # reserved bit without an extension
    ([frame(3, b"x")], 1002),                                    # unknown opcode
    ([frame(9, b"x" * 126)], 1002),                              # control frame too long
    ([frame(9, b"x", fin=False)], 1002),                         # fragmented control frame
    ([frame(0, b"x")], 1002),                                    # continuation with nothing to continue
    ([frame(1, b"a", fin=False), frame(1, b"b")], 1002),         # a new message inside a fragmented one
    ([frame(1, b"\xff\xfe")], 1007),                             # text that is not UTF-8
    ([frame(1, b"\xe2\x82", fin=False), frame(0, b"\xac")], None),  # UTF-8 split across fragments: fine
    ([frame(8, struct.pack("!H", 1005))], 1002),                 # a close code that must not be sent
    ([frame(8, b"\x03")], 1002),                                 # a one-byte close body
    ([struct.pack("!BBQ", 0x82, 0xFF, 17 << 20)], 1009),          # announces more than the message limit
    ([frame(1, b"x" * (9 << 20), fin=False), struct.pack("!BBQ", 0x80, 0xFF, 9 << 20)], 1009),  # so do fragments
])
def test_protocol_violations_get_the_right_close_code(gateway, upstream, frames, code):
    up = sse_upstream(upstream)
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\n")
    s, head = raw_connect(gw)
    assert head.startswith("HTTP/1.1 101")
    for f in frames:
        s.sendall(f)
    if code is None:  # a valid message: answered (with an error event: it is not a response.create)
        opcode, data = read_frame(s)
        assert opcode == 1 and json.loads(data)["type"] == "error"
        s.sendall(frame(8, struct.pack("!H", 1000) + b"bye"))
        assert close_code(s) == 1000
    else:
        assert close_code(s) == code
    s.close()


def test_fragments_pings_and_a_clean_close_with_raw_frames(gateway, upstream):
    up = sse_upstream(upstream)
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\n")
    s, head = raw_connect(gw)
    assert "Sec-WebSocket-Accept" in head
    body = json.dumps({"type": "response.create", "model": "gpt-test", "input": "hé"}).encode()
    s.sendall(frame(1, body[:10], fin=False) + frame(9, b"mid-message ping") + frame(0, body[10:20], fin=False) +
              frame(0, body[20:]))
    opcode, data = read_frame(s)
    assert (opcode, data) == (10, b"mid-message ping")  # the pong comes at once, between fragments
    types = []
    while "response.completed" not in types:
        opcode, data = read_frame(s)
        assert opcode == 1
        types.append(json.loads(data)["type"])
    s.sendall(frame(8, struct.pack("!H", 1000)))
    assert close_code(s) == 1000
    assert s.recv(10) == b""  # and the server closes the TCP connection
    s.close()


def test_bad_handshakes(gateway, upstream):
    up = sse_upstream(upstream)
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\n")
    s, head = raw_connect(gw, version="8")
    assert head.startswith("HTTP/1.1 426")
    s.close()
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(b"GET /v1/responses HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer sk-gw\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()


def test_a_relayed_responses_stream_with_crlf_frames_over_a_websocket(gateway, upstream):
    """A Responses upstream's frames are relayed as they came (same format), CRLF line ends included; each still
    becomes one WebSocket message and the socket still remembers the completed turn."""
    import upstreams
    sse = "".join("event: %s\r\ndata: %s\r\n\r\n" % ev for ev in upstreams.CODEX("text").events)
    up = upstream(lambda r: Reply("raw", body=sse, headers={"Content-Type": "text/event-stream"}))
    gw = gateway("providers:\n  - type: codex\n    base-url: %s/v1\n    api-key: k\n    models: [gpt-test]\n"
                 % up.url)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="k")
    with client.responses.connect() as conn:
        conn.response.create(model="gpt-test", input="hello")
        text, done = "", None
        for event in conn:
            assert event.type != "error", event
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                done = event.response
                break
        assert text == "Hello from codex" and done.id == "resp_up1"
        conn.response.create(model="gpt-test", previous_response_id=done.id, input=[{"role": "user",
                                                                                       "content": "more"}])
        for event in conn:
            assert event.type != "error", event
            if event.type == "response.completed":
                break
    sent = up.requests[-1].json["input"]
    assert [item.get("role") for item in sent if item.get("type", "message") == "message"][-1] == "user"
    assert len(sent) >= 3
