#!/usr/bin/env python3
"""The least a Python one-hop proxy can do: a floor for what any pure-Python gateway can reach on this machine.

`python3 tools/floor_proxy.py LISTEN_PORT UPSTREAM_PORT` forwards HTTP/1.1 keep-alive requests (Content-Length
bodies) to 127.0.0.1:UPSTREAM_PORT over pooled connections and relays the answers (Content-Length or chunked) as
they arrive, with asyncio Protocols, no header parsing beyond framing, no JSON, no logging, no accounting. It
does nothing a gateway must do (authentication, routing, translation, usage, limits, error handling), so it is
not a gateway; tools/bench.py runs it beside nginx to show where the ceiling of one CPython process lies.
Standard library only; uvloop is used when it is installed, as llm_mux does."""
import asyncio
import re
import sys

try:
    import uvloop
except ImportError:
    uvloop = None

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)
CHUNKED = re.compile(rb"\r\ntransfer-encoding: *chunked", re.I)


class Upstream(asyncio.Protocol):
    """One pooled connection to the upstream, relaying one answer at a time to the client that asked."""

    def __init__(self, pool):
        self.pool, self.client, self.transport = pool, None, None
        self.buf = bytearray()
        self.head_done = False
        self.left = 0  # body bytes still to come (Content-Length), or the chunk bytes still to skip
        self.chunked = False

    def connection_made(self, transport):
        self.transport = transport

    def start(self, client, request):
        self.client, self.head_done, self.buf = client, False, bytearray()
        self.transport.write(request)

    def data_received(self, data):
        self.client.transport.write(data)
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end + 2])
            del buf[:end + 4]
            self.head_done = True
            self.chunked = CHUNKED.search(head) is not None
            m = CONTENT_LENGTH.search(head)
            self.left = 0 if self.chunked else int(m.group(1)) if m else 0
        if self.chunked:
            self._chunks()
        else:
            self.left -= len(buf)
            del buf[:]
            if self.left <= 0:
                self._done()

    def _chunks(self):
        buf = self.buf
        pos = 0
        while True:
            if self.left:
                take = min(self.left, len(buf) - pos)
                pos += take
                self.left -= take
                if self.left:
                    break
            line = buf.find(b"\r\n", pos)
            if line < 0:
                break
            size = int(bytes(buf[pos:line]).split(b";")[0] or b"0", 16)
            if size == 0:
                if len(buf) >= line + 4:  # the last chunk and the empty trailer line
                    del buf[:]
                    self._done()
                    return
                break
            pos = line + 2
            self.left = size + 2  # the data and its CRLF
        del buf[:pos]

    def _done(self):
        client, self.client = self.client, None
        self.pool.append(self)
        client.answered()

    def connection_lost(self, exc):
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    """One client connection: requests in order, each sent over a pooled upstream connection."""

    def __init__(self, upstream_port, pool):
        self.upstream_port, self.pool = upstream_port, pool
        self.buf = bytearray()
        self.busy = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        self._next()

    def _next(self):
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = CONTENT_LENGTH.search(self.buf, 0, end + 2)
        total = end + 4 + (int(m.group(1)) if m else 0)
        if len(self.buf) < total:
            return
        request = bytes(self.buf[:total])
        del self.buf[:total]
        self.busy = True
        if self.pool:
            self.pool.pop().start(self, request)
        else:
            asyncio.ensure_future(self._connect(request))

    async def _connect(self, request):
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self.pool), "127.0.0.1", self.upstream_port)
        up.start(self, request)

    def answered(self):
        self.busy = False
        self._next()


async def main(listen_port, upstream_port):
    pool = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port, pool), "127.0.0.1", listen_port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if uvloop is not None:
        uvloop.install()
    try:
        asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
    except KeyboardInterrupt:
        pass
