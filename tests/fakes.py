"""Fake upstream servers for the tests: real HTTP on 127.0.0.1, built on the standard library's http.server (an
implementation independent of llm_mux's own), speaking each provider's wire format and recording every request."""
import gzip
import json
import socket
import ssl
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorded:
    def __init__(self, method, path, headers, body, peer=None):
        self.method, self.path, self.headers, self.body, self.peer = method, path, headers, body, peer

    @property
    def json(self):
        return json.loads(self.body)


class Reply:
    """What a fake upstream answers. kind: json | sse | raw | hang | drop."""

    def __init__(self, kind="json", status=200, body=None, headers=None, events=None, delay=0.0,
                 encoding=None, chunked=True):
        self.kind, self.status, self.body, self.headers = kind, status, body, headers or {}
        self.events, self.delay, self.encoding, self.chunked = events or [], delay, encoding, chunked


def openai_completion(text="Hello!", model="gpt-test", tool_calls=None, finish="stop", usage=None, reasoning=None):
    msg = {"role": "assistant", "content": text}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
        msg["content"] = text or None
    return {"id": "chatcmpl-upstream1", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}],
            "usage": usage or {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                               "prompt_tokens_details": {"cached_tokens": 3},
                               "completion_tokens_details": {"reasoning_tokens": 2}}}


def openai_stream_events(pieces=("Hel", "lo", "!"), model="gpt-test", finish="stop", usage=True, tool_calls=None,
                         done=True):
    base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1700000000, "model": model}

    def chunk(delta, fr=None, **extra):
        d = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": fr}])
        d.update(extra)
        return json.dumps(d)

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": p}) for p in pieces]
    for i, (cid, name, args_parts) in enumerate(tool_calls or []):
        out.append(chunk({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}))
        for a in args_parts:
            out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": a}}]}))
    if finish:
        out.append(chunk({}, finish))
    if usage:
        out.append(json.dumps(dict(base, choices=[], usage={"prompt_tokens": 5, "completion_tokens": 3,
                                                             "total_tokens": 8})))
    if done:
        out.append("[DONE]")
    return out


class FakeUpstream:
    """Answers with `handler(Recorded) -> Reply` (or a fixed Reply); keeps every request in `requests`."""

    def __init__(self, handler=None, certfile=None, keyfile=None):
        self.handler = handler or (lambda r: Reply(body=openai_completion()))
        self.requests = []
        self.open_streams = 0
        self.closed_streams = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                               self.client_address)
                outer.requests.append(rec)
                reply = outer.handler(rec)
                if not isinstance(reply, Reply):
                    reply = Reply(body=reply)
                outer._send(self, reply)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            request_queue_size = 512  # the default backlog of 5 drops connections under concurrent load

        self.server = Server(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.scheme = "http"
        if certfile:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(certfile, keyfile)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def _send(self, h, reply):
        if reply.delay:
            time.sleep(reply.delay)
        if reply.kind == "hang":
            time.sleep(3600)
            return
        if reply.kind in ("json", "raw"):
            body = reply.body
            if reply.kind == "json":
                body = json.dumps(body).encode()
            elif isinstance(body, str):
                body = body.encode()
            if reply.encoding == "gzip":
                body = gzip.compress(body)
            elif reply.encoding == "deflate":
                body = zlib.compress(body)
            elif reply.encoding == "raw-deflate":
                c = zlib.compressobj(wbits=-15)
                body = c.compress(body) + c.flush()
            h.send_response(reply.status)
            h.send_header("Content-Type", reply.headers.pop("Content-Type", "application/json"))
            if reply.encoding:
                h.send_header("Content-Encoding", "deflate" if "deflate" in reply.encoding else reply.encoding)
            for k, v in reply.headers.items():
                h.send_header(k, v)
            if reply.chunked:
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                mid = max(1, len(body) // 2)
                for part in (body[:mid], body[mid:]):
                    if part:
                        h.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                h.wfile.write(b"0\r\n\r\n")
            else:
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
            h.wfile.flush()
            return
        # SSE stream, chunked; "drop" cuts the connection after the events instead of finishing.
        h.send_response(reply.status)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        for k, v in reply.headers.items():
            h.send_header(k, v)
        h.end_headers()
        self.open_streams += 1
        try:
            for ev in reply.events:
                if isinstance(ev, (int, float)):
                    time.sleep(ev)
                    continue
                if isinstance(ev, tuple):
                    name, data = ev
                    frame = "event: %s\ndata: %s\n\n" % (name, data)
                else:
                    frame = ev if ev.startswith((":", "event:", "data:")) and ev.endswith("\n\n") \
                        else "data: %s\n\n" % ev
                data = frame.encode()
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                h.wfile.flush()
            if reply.kind == "drop":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.closed_streams.append(time.monotonic())
        finally:
            self.open_streams -= 1
