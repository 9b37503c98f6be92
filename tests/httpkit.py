"""Test helpers: an llm_mux HttpServer on a background event loop, and a tiny raw-socket response reader."""
import asyncio
import base64
import json
import socket
import threading
import time

import llm_mux


class ServerThread:
    def __init__(self, app, config_text="", ssl_context=None):
        self.cfg = llm_mux.Config.from_text(config_text, "test.yaml", environ={})
        self.limits = llm_mux.ServerLimits(self.cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = llm_mux.HttpServer(app, lambda: self.limits, access_log=False)
        srv = asyncio.run_coroutine_threadsafe(self.server.listen("127.0.0.1", 0, ssl_context), self.loop).result()
        self.port = srv.sockets[0].getsockname()[1]

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self):
        try:
            self.call(self.server.shutdown(1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


async def echo_app(req):
    """Answers what it received; /stream streams five SSE events 0.3 s apart."""
    if req.path == "/stream":
        async def gen():
            for i in range(5):
                yield ("data: %d %.3f\n\n" % (i, time.monotonic())).encode()
                await asyncio.sleep(0.3)
        return llm_mux.StreamResponse(gen())
    if req.path == "/ndjson":
        async def gen():
            for i in range(3):
                yield json.dumps({"i": i}).encode() + b"\n"
        return llm_mux.StreamResponse(gen(), content_type="application/x-ndjson")
    return llm_mux.json_response({
        "method": req.method, "path": req.path, "target": req.target, "query": req.query,
        "headers": [[k, v] for k, v in req.headers.items],
        "body": base64.b64encode(req.body).decode()})


def connect(port, timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s


class RawResponse:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def json(self):
        return json.loads(self.body)


class Reader:
    """Reads HTTP/1.1 responses from a socket, one at a time (keep-alive and pipelining aware)."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("closed")
        self.buf += data

    def _until(self, sep):
        while sep not in self.buf:
            self._fill()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_only=False):
        head = self._until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(x.split(": ", 1)) for x in lines[1:] if x]
        r = RawResponse(status, headers, b"")
        if head_only or status in (100, 204, 304):
            return r
        if (r.header("transfer-encoding") or "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._until(b"\r\n")[:-2].split(b";")[0], 16)
                if size == 0:
                    self._until(b"\r\n")
                    break
                body += self._exact(size)
                self._exact(2)
            r.body = body
        elif r.header("content-length") is not None:
            r.body = self._exact(int(r.header("content-length")))
        return r

    def closed(self, timeout=3):
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b"" and not self.buf
        except (ConnectionResetError, socket.timeout):
            return False
