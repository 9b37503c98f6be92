"""Fuzz target for the WebSocket frame parser: mutated client byte streams (a seeded mutator over valid frame
sequences: fragments, pings, closes, text and binary) fed to WebSocket.receive. Whatever arrives, it returns
messages or raises WebSocketClosed — never another exception, never a hang. LLM_MUX_FUZZ_CASES raises the count."""
import asyncio
import os
import random
import struct

import llm_mux
from harness import channel_with

CASES = int(os.environ.get("LLM_MUX_FUZZ_CASES", "20000"))


def frame(opcode, payload, fin=True):
    n = len(payload)
    head = struct.pack("!B", (0x80 if fin else 0) | opcode)
    head += struct.pack("!B", 0x80 | n) if n < 126 else struct.pack("!BH", 0x80 | 126, n)
    key = bytes([7, 13, 101, 200])
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


SEEDS = [
    frame(1, '{"type": "response.create", "input": "héllo"}'.encode()),
    frame(1, b"abc", fin=False) + frame(9, b"ping") + frame(0, "déf".encode()),
    frame(2, bytes(range(256)) * 2) + frame(10, b"pong"),
    frame(8, struct.pack("!H", 1000) + b"bye"),
    frame(1, "☃".encode()[:2], fin=False) + frame(0, "☃".encode()[2:]) + frame(8, b""),
]


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.choice([0x00, 0x7E, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.choice(SEEDS)[: rng.randint(1, 12)]
        elif op == 3 and data:
            i = rng.randrange(len(data))
            del data[i:i + rng.randint(1, 6)]
        else:
            del data[rng.randrange(len(data) + 1):]
    return bytes(data)


async def one(data):
    ws = llm_mux.WebSocket(channel_with(data), max_message=1 << 16, ping_interval=0)
    got = []
    try:
        while True:
            got.append(await asyncio.wait_for(ws.receive(), 5))
    except llm_mux.WebSocketClosed:
        pass
    return got


def test_mutated_frames_only_close_the_socket():
    rng = random.Random(6455)

    async def run():
        assert await one(SEEDS[1]) == ["abcdéf"]
        assert await one(SEEDS[4]) == ["☃"]
        for _ in range(CASES):
            await one(mutate(rng, rng.choice(SEEDS)))
    asyncio.run(run())
