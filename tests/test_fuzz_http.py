"""Fuzz target for the HTTP request-head parser and body framing (the first bytes a stranger controls): a seeded
mutator over valid and smuggling-style heads. Whatever arrives, parse_request_head and body_framing return or
raise HttpError — never another exception. LLM_MUX_FUZZ_CASES raises the count."""
import os
import random

import llm_mux
from harness import mutate_bytes

CASES = int(os.environ.get("LLM_MUX_FUZZ_CASES", "50000"))

SEEDS = [
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nContent-Type: application/json\r\n",
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n",
    b"GET http://x/v1/models?key=a%20b HTTP/1.0\r\nConnection: keep-alive\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\nTransfer-Encoding: gzip, chunked\r\n",
]
INTERESTING = [b"\r\n", b"\n", b":", b" ", b"\t", b"\x00", b"\xa0", b"\x85", b"\xff", b",", b"chunked",
               b"Content-Length: ", b"Transfer-Encoding: ", b"Host: y\r\n", b"HTTP/1.1", b"%00", b"\xb2"]


def test_mutated_heads_raise_only_http_errors():
    rng = random.Random(9112)
    parsed = 0
    for _ in range(CASES):
        head = mutate_bytes(rng, rng.choice(SEEDS), INTERESTING, SEEDS, max_ops=5).rstrip(b"\r\n")
        try:
            req = llm_mux.parse_request_head(head, "127.0.0.1")
            kind, length = llm_mux.body_framing(req)
            assert kind in ("length", "chunked") and (length is None or length >= 0)
            parsed += 1
        except llm_mux.HttpError as e:
            assert 400 <= e.status < 600
    assert parsed > CASES // 20  # the mutator still produces valid heads, so parsing is exercised
