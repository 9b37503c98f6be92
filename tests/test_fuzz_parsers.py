"""Fuzz targets for more parsers of outside bytes — the YAML reader (config files, management PUTs), chunked
request bodies, chunked upstream bodies, SSE and the AWS event stream (upstream bytes): a seeded mutator over valid inputs; each parser
returns or raises its own error type, never another exception. LLM_MUX_FUZZ_CASES raises the count."""
import asyncio
import os
import random
import re
import struct
import zlib

import llm_mux
from harness import mutate_bytes

CASES = int(os.environ.get("LLM_MUX_FUZZ_CASES", "20000"))


YAML_SEEDS = [b"port: 8317\nproviders:\n  - type: openai\n    base-url: http://x/v1\n    api-keys: [a, 'b']\n",
              b"routing:\n  aliases: {a: b, \"c\": d}\n  fallbacks:\n    m: [x, y]\nnotes: |\n  line\n  two\n",
              b"api-keys:\n  - {key: k, rpm: 5, models: ['gpt-*']}\n# comment\nusage: {enabled: true}\n"]
YAML_EXTRA = [b"[", b"]", b"{", b"}", b":", b"- ", b"\n  ", b"'", b'"', b"\t", b"#", b"|", b">", b"&a", b"*a", b"? ",
              b"\\", b"---", b"!!", b"%"]


def test_yaml_reader_raises_only_config_errors():
    rng = random.Random(1001)
    for _ in range(CASES):
        text = mutate_bytes(rng, rng.choice(YAML_SEEDS), YAML_EXTRA).decode("utf-8", "replace")
        try:
            llm_mux.yaml_load(text, "f.yaml")
        except llm_mux.ConfigError:
            pass


CHUNKED = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"


def test_chunked_bodies_raise_only_http_errors():
    rng = random.Random(1002)

    async def one(data):
        ch = llm_mux.Channel()
        ch.buf += data
        ch.eof = True
        try:
            await llm_mux.read_chunked(ch, 1 << 16, lambda: None)
        except (llm_mux.HttpError, llm_mux.ChannelClosed):
            pass

    async def run():
        ch = llm_mux.Channel()
        ch.buf += CHUNKED
        assert await llm_mux.read_chunked(ch, 1 << 16, lambda: None) == b"hello world"
        for _ in range(CASES):
            await one(mutate_bytes(rng, CHUNKED, [b"\r\n", b"\n", b";", b"ffffffffffffffffff", b"-1", b"0x5", b" "]))
    asyncio.run(run())


def _chunked(data, rng=None):
    """What a ChunkedDecoder makes of an upstream body `data` given whole (or, with `rng`, in pieces of 1-8
    bytes): (data bytes, done) or "error"."""
    decoder, buf, out, i = llm_mux.ChunkedDecoder(), bytearray(), [], 0
    try:
        while i < len(data) and not decoder.done:
            step = len(data) if rng is None else rng.randint(1, 8)
            buf += data[i:i + step]
            i += step
            out.append(decoder.take(buf))
    except llm_mux.UpstreamError:
        return "error"
    return b"".join(out), decoder.done


def test_chunked_upstream_bodies_raise_only_upstream_errors_however_they_are_cut():
    """The client's chunked decoder (upstream bytes): whatever arrives it returns data or raises UpstreamError, and
    the same bytes give the same result whether they come in one read or in many."""
    rng = random.Random(1005)
    assert _chunked(CHUNKED) == (b"hello world", True)
    for _ in range(CASES):
        data = mutate_bytes(rng, CHUNKED, [b"\r\n", b"\n", b";", b"ffffffffffffffffff", b"-1", b"0x5", b" ",
                                           b"0\r\n\r\n", b"\r\n\r\n"])
        assert _chunked(data) == _chunked(data, rng), data


def test_chunked_upstream_bodies_decode_as_h11_decodes_them():
    """Valid chunked bodies (leading zeros, extensions, trailers, sizes from 1 byte to 70 KB) decode to what h11,
    the reference, decodes."""
    import h11
    rng = random.Random(1006)
    for _ in range(200):
        pieces = [bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 15, 16, 255, 4096])))
                  for _ in range(rng.randint(0, 6))] + [b"z" * rng.choice([1, 70000])]
        body = b"".join(b"%s%x%s\r\n%s\r\n" % (b"0" * rng.randint(0, 3), len(p),
                                                 rng.choice([b"", b";a=1", b";name=\"q\""]), p) for p in pieces)
        body += b"0\r\n" + rng.choice([b"", b"X-Trailer: yes\r\n", b"A: 1\r\nB: 2\r\n"]) + b"\r\n"
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        expected, ended = [], False
        while not ended:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                expected.append(bytes(event.data))
            ended = isinstance(event, h11.EndOfMessage)
        assert _chunked(body) == (b"".join(expected), True)
        assert _chunked(body, rng) == (b"".join(expected), True)


SSE = (b"event: message_start\ndata: {\"a\": 1}\n\n: ping\r\ndata: x\ndata: y\r\n\r\nid: 3\nretry: 10\n"
       b"data:no-space\n\n")


def test_sse_raises_only_upstream_errors():
    rng = random.Random(1003)
    for _ in range(CASES):
        p = llm_mux.SSEParser()
        data = mutate_bytes(rng, SSE, [b"\n", b"\r", b"\r\n\r\n", b":", b"data: ", b"\xff\xfe", b"event:"])
        try:
            for i in range(0, len(data), rng.randint(1, 16)):
                p.feed(data[i:i + 16])
            p.finish()
        except llm_mux.UpstreamError:
            pass


def aws_frame(event, payload):
    name = b":event-type"
    headers = bytes([len(name)]) + name + bytes([7]) + struct.pack("!H", len(event)) + event
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(headers))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + headers + payload
    return message + struct.pack("!I", zlib.crc32(message))


def test_aws_event_stream_raises_only_upstream_errors():
    rng = random.Random(1004)
    seed = aws_frame(b"assistantResponseEvent", b'{"content": "hi"}') + aws_frame(b"meteringEvent", b"{}")
    assert llm_mux.AwsEventStream().feed(seed)[0] == ("assistantResponseEvent", '{"content": "hi"}')
    for _ in range(CASES):
        data = mutate_bytes(rng, seed, [b"\x00\x00\x00\x10", b"\x07", b"\xff\xff"])
        try:
            s = llm_mux.AwsEventStream()
            s.feed(data)
            s.finish()
        except llm_mux.UpstreamError:
            pass
    # mutations that keep both CRCs valid reach the header parser
    for _ in range(CASES):
        event = mutate_bytes(rng, b"assistantResponseEvent", [b"\x00", b"\xff"])
        frame = bytearray(aws_frame(event, b"{}"))
        hlen = struct.unpack("!I", frame[4:8])[0]
        cut = rng.randrange(1, hlen + 1)
        headers = bytes(frame[12:12 + hlen])[:cut]
        total = 12 + len(headers) + 2 + 4
        prelude = struct.pack("!II", total, len(headers))
        message = prelude + struct.pack("!I", zlib.crc32(prelude)) + headers + b"{}"
        try:
            llm_mux.AwsEventStream().feed(message + struct.pack("!I", zlib.crc32(message)))
        except llm_mux.UpstreamError:
            pass


def test_block_scalar_edge_cases_found_by_the_fuzzer_agree_with_pyyaml():
    import yaml
    cases = ["note: |\n\n  two\n", "note: >\n\n\n  a\n  b\n\n  c\n", "n: |+\n\n  x\n\n", "n: |+\n  x\n\n",
             "n: |+\n  x\n\n\nm: 1\n", "n: |+\n  x\n  \n", "n: >+\n  x\n\n", "n: |\n  x\n\n\n", "n: |-\n  x\n\n",
             "n: |+\n  x", "n: |\n  x", "a: |\n  x\nb: 2\n"]
    for text in cases:
        assert llm_mux.yaml_load(text)[0] == yaml.safe_load(text), text


HEAD_LINES = [b"Host: a", b"X-A:  spaced out\t ", b"x-a: 2", b"Empty:", b"Accept: */*", b"Tab:\tv\tw",
              b"Latin: caf\xe9", b"Content-Type: application/json", b"Authorization: Bearer sk-x"]
HEAD_EXTRA = [b"\r\n", b" ", b"\t", b":", b"\x00", b"\r", b"\n", b"\x7f", b"\x01", b"(", b"@", b"\xff", b"\xa0", b"\x85", b"X"]


def test_request_heads_parse_as_h11_parses_them():
    """The request head parser (its header section checked in one pass, then split) accepts exactly the heads h11,
    the reference, accepts with the same fields — except obs-fold, bare LF line ends and control bytes in a value (RFC 9110 §5.5),
    which h11 takes and we refuse."""
    import h11
    rng = random.Random(1008)
    accepted = refused = 0
    for _ in range(CASES // 4):
        lines = [rng.choice(HEAD_LINES) for _ in range(rng.randint(1, 6))]
        section = b"\r\n".join(lines)
        if rng.random() < 0.7:
            section = mutate_bytes(rng, section, HEAD_EXTRA)
        raw = b"GET / HTTP/1.1\r\n" + section + b"\r\n\r\n"
        head = raw[:raw.find(b"\r\n\r\n")]  # as the server cuts it
        section = head[16:]
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(raw)
        try:
            event = conn.next_event()
            expected = [(k.decode().lower(), v.decode("latin-1")) for k, v in event.headers] \
                if isinstance(event, h11.Request) else None
        except h11.RemoteProtocolError:
            expected = None
        try:
            got = llm_mux.parse_request_head(head, ("127.0.0.1", 1)).headers.items
        except llm_mux.HttpError as e:
            got = None
            assert e.status in (400, 431) and e.message, head
        folded = any(line[:1] in (b" ", b"\t") for line in section.split(b"\r\n")[1:])
        bare_lf = b"\n" in section.replace(b"\r\n", b"")
        control = re.search(rb"[\x01-\x08\x0e-\x1f\x7f]", section)
        if (folded or bare_lf or control) and expected is not None:
            assert got is None, head  # stricter than h11 on purpose: obs-fold, bare LF, control bytes
            continue
        assert got == expected, head
        accepted += got is not None
        refused += got is None
    assert accepted > CASES // 40 and refused > CASES // 40  # both sides of the line were exercised


def test_a_refused_header_section_names_its_first_fault():
    faults = {b"Host: a\r\n\r\nX: 1": "empty header line", b"Host: a\r\n folded": "obsolete line folding",
              b"Host: a\r\nNo colon": "malformed header line", b"Host: a\r\n: v": "malformed header line",
              b"Host: a\r\nBad Name: v": "invalid header name", b"Host: a\r\nX: a\x00b": "invalid character",
              b"Host: a\r\nX: a\rb": "invalid character", b"Host: a\r\nX: a\nb": "invalid character"}
    for section, fault in faults.items():
        try:
            llm_mux.parse_request_head(b"GET / HTTP/1.1\r\n" + section, ("127.0.0.1", 1))
        except llm_mux.HttpError as e:
            assert e.status == 400 and fault in e.message, (section, e.message)
        else:
            raise AssertionError("accepted %r" % section)
