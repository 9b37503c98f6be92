#!/usr/bin/env python3
"""Benchmark llm-mux against the same load sent straight to the upstream.

Starts three processes: a fake OpenAI-compatible upstream (a minimal asyncio protocol server, so it is not the
bottleneck), the gateway (`llm_mux.py serve`), and `wrk` as the load generator. Prints requests/s and latency
p50/p99 at concurrency 1 and 50, for non-streaming requests and for 64-chunk streams, gateway beside direct,
plus the gateway's RSS when idle and its growth over 100,000 requests in mixed formats (--mixed), and throughput with
usage records on against off.

Targets (one gateway process, 2 cores): >= 3,000 non-streaming req/s at c=50; <= 0.5 ms added p50 at c=1;
>= 300 64-chunk streams/s; idle RSS <= 40 MB; RSS growth <= 10 % over 100,000 requests.
"""
import argparse
import asyncio
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}).encode()


def _stream_body(chunks=64):
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench-model"}
    events = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    for i in range(chunks - 2):
        events.append(dict(base, choices=[{"index": 0, "delta": {"content": "tok%d " % i}, "finish_reason": None}]))
    events.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       usage={"prompt_tokens": 12, "completion_tokens": 62, "total_tokens": 74}))
    out = b""
    for e in events:
        frame = b"data: " + json.dumps(e).encode() + b"\n\n"
        out += b"%x\r\n%s\r\n" % (len(frame), frame)
    frame = b"data: [DONE]\n\n"
    out += b"%x\r\n%s\r\n0\r\n\r\n" % (len(frame), frame)
    return out


def _anthropic_bodies(chunks=64):
    msg = json.dumps({"id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-claude",
                      "content": [{"type": "text", "text": "Hello from the bench upstream."}],
                      "stop_reason": "end_turn", "stop_sequence": None,
                      "usage": {"input_tokens": 12, "output_tokens": 7}}).encode()
    frames = [("message_start", {"type": "message_start", "message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-claude", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}})]
    for i in range(chunks - 4):
        frames.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": "tok%d " % i}}))
    frames += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": 60}}),
               ("message_stop", {"type": "message_stop"})]
    body = b""
    for name, obj in frames:
        frame = ("event: %s\ndata: %s\n\n" % (name, json.dumps(obj))).encode()
        body += b"%x\r\n%s\r\n" % (len(frame), frame)
    body += b"0\r\n\r\n"
    return msg, body


STREAM = _stream_body()
ANTHROPIC_JSON, ANTHROPIC_STREAM = _anthropic_bodies()
RESP_JSON = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(COMPLETION)
             + COMPLETION)
RESP_STREAM = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + STREAM
RESP_A_JSON = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % len(ANTHROPIC_JSON) + ANTHROPIC_JSON)
RESP_A_STREAM = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + ANTHROPIC_STREAM)


SLOW_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def slow_chunk(i):
    """One event of a slow stream; its text carries the upstream's monotonic clock, so the client can tell how long
    the gateway held it (CLOCK_MONOTONIC is one clock for every process on the machine)."""
    frame = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench-slow","choices":[' \
            b'{"index":0,"delta":{"content":"T%.6f "},"finish_reason":null}]}\n\n' % time.monotonic()
    return b"%x\r\n%s\r\n" % (len(frame), frame)


SLOW_END = (lambda f: b"%x\r\n%s\r\n0\r\n\r\n" % (len(f), f))(
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"bench-slow","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":30,"total_tokens":31}}'
    b'\n\ndata: [DONE]\n\n')


class UpstreamProtocol(asyncio.Protocol):
    """Answers every complete request at once; `"stream":true` in the body selects the 64-chunk stream, and the
    model `bench-slow` a stream of events 100 ms apart (10 chunks/s): as many as the request's `max_tokens`, else
    SLOW_CHUNKS."""
    SLOW_CHUNKS = 30

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def _slow(self, i, total):
        if self.t.is_closing():
            return
        if i == total:
            self.t.write(SLOW_END)
            return
        self.t.write((SLOW_HEAD if i == 0 else b"") + slow_chunk(i))
        asyncio.get_running_loop().call_later(0.1, self._slow, i + 1, total)

    def data_received(self, data):
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = self.buf[:i].lower()
            m = re.search(rb"content-length: *(\d+)", head)
            n = int(m.group(1)) if m else 0
            if len(self.buf) < i + 4 + n:
                return
            body = self.buf[i + 4:i + 4 + n]
            self.buf = self.buf[i + 4 + n:]
            stream = b'"stream":true' in body or b'"stream": true' in body
            if b'"bench-slow"' in body:
                m = re.search(rb'"max_tokens": *(\d+)', body)
                self._slow(0, int(m.group(1)) if m else self.SLOW_CHUNKS)
            elif b"/v1/messages" in head:
                self.t.write(RESP_A_STREAM if stream else RESP_A_JSON)
            else:
                self.t.write(RESP_STREAM if stream else RESP_JSON)


def serve_upstream(port):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(UpstreamProtocol, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("port %d did not open" % port)


def rss_mb(pid, field="VmRSS"):
    """A process's resident memory in MB (VmHWM: its peak so far)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.body = '%s'
"""


def wrk(url, body, conns, seconds, tmp):
    script = os.path.join(tmp, "post-%d.lua" % abs(hash(body)))
    with open(script, "w") as f:
        f.write(LUA % body.replace("\\", "\\\\").replace("'", "\\'"))  # a Lua string: escape \ and '
    out = subprocess.run(["wrk", "-t", "1" if conns == 1 else "2", "-c", str(conns), "-d", "%ds" % seconds,
                          "--latency", "-s", script, url], capture_output=True, text=True)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock_err = re.search(r"Socket errors: (.*)", text)

    def pct(p):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, text, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000.0 if unit == "us" else (v * 1000.0 if unit == "s" else v)
    return {"rps": rps, "p50": pct(50), "p99": pct(99), "total": total,
            "errors": int(errors.group(1)) if errors else 0, "socket_errors": sock_err.group(1) if sock_err else ""}


NGINX_CONF = """
worker_processes 1;
daemon off;
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/nginx-error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path %(tmp)s/nginx-body;
    proxy_temp_path %(tmp)s/nginx-proxy;
    client_max_body_size 64m;
    client_body_buffer_size 2m;
    upstream fake { server 127.0.0.1:%(up)d; keepalive 256; }
    server {
        listen 127.0.0.1:%(port)d backlog=4096;
        location / {
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
"""


def start_nginx(up_port, tmp):
    """nginx as a plain one-hop reverse proxy in front of the same fake upstream, one worker process like the
    gateway: the floor every gateway figure is printed against. (None, None) when nginx is not installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None and os.geteuid() == 0 and shutil.which("apt-get"):  # from the distribution's packages
        print("installing nginx-light for the one-hop floor ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], env=dict(os.environ,
                       DEBIAN_FRONTEND="noninteractive"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        print("nginx is not installed (apt-get install nginx-light): no one-hop floor in this run", file=sys.stderr)
        return None, None
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF % {"tmp": tmp, "up": up_port, "port": port})
    proc = subprocess.Popen([binary, "-c", conf, "-p", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def process_tree(pid):
    """`pid` and its descendants (a gateway with --workers is a supervisor and its worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, task)) as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid):
    """User + system CPU seconds a process and its live descendants have used (from /proc/<pid>/stat)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def claude_code_request(size=200 * 1024, model="bench-model"):
    """An Anthropic request shaped like Claude Code's: a long system prompt, a dozen tools with JSON schemas and a
    history of turns in which each user turn carries the previous tool call's result (a bare string) and a new
    instruction, about `size` bytes in all."""
    tools = [{"name": "tool_%d" % i, "description": "Does thing %d. " % i * 20, "input_schema": {
        "type": "object", "properties": {"path": {"type": "string", "description": "a file path"},
                                         "limit": {"type": "integer"}, "flags": {"type": "array",
                                                                                 "items": {"type": "string"}}},
        "required": ["path"]}} for i in range(12)]
    messages, i = [], 0
    body = {"model": model, "max_tokens": 4096, "system": [{"type": "text", "text": "You are a coding agent. "
                                                            * 200}], "tools": tools, "messages": messages}

    def result(i):
        return {"type": "tool_result", "tool_use_id": "toolu_%04d" % i, "content": "def f%d():\n    return %d\n"
                % (i, i) * 40}
    while len(json.dumps(body)) < size:
        messages.append({"role": "user", "content": ([result(i - 1)] if i else []) + [
            {"type": "text", "text": "Please look at file %d. " % i * 10}]})
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": "Reading it."},
            {"type": "tool_use", "id": "toolu_%04d" % i, "name": "tool_%d" % (i % 12), "input": {"path": "/src/f%d.py"
                                                                                              % i}}]})
        i += 1
    messages.append({"role": "user", "content": [result(i - 1), {"type": "text", "text": "Now summarise."}]})
    return json.dumps(body)


def openai_request(size=1 << 20):
    return json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "x" * size}]})


class StreamClient(asyncio.Protocol):
    """One slow stream read by the benchmark: notes each chunk's receipt time and delay (now minus the upstream's
    stamp)."""

    def __init__(self, request, delays, done):
        self.request, self.delays, self.done = request, delays, done
        self.tail = b""

    def connection_made(self, transport):
        transport.write(self.request)

    def data_received(self, data):
        now = time.monotonic()
        data = self.tail + data
        for m in re.finditer(rb"T(\d+\.\d+) ", data):
            self.delays.append((now, now - float(m.group(1))))
        self.tail = data[-40:]
        if b"[DONE]" in data or data.endswith(b"0\r\n\r\n"):
            if not self.done.done():
                self.done.set_result(True)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(False)


async def run_slow_streams(port, n, ramp=2.0, chunks=30):
    """n concurrent streams of `chunks` chunks at 10 chunks/s through the gateway, opened over `ramp` seconds."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"model": "bench-slow", "stream": True, "max_tokens": chunks,
                       "messages": [{"role": "user", "content": "x"}]})
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer bench\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
    delays, waits, transports, ends = [], [], [], []
    for i in range(n):
        done = loop.create_future()
        done.add_done_callback(lambda _: ends.append(time.monotonic()))
        waits.append(done)
        try:
            t, _ = await loop.create_connection(lambda: StreamClient(request, delays, done), "127.0.0.1", port)
            transports.append(t)
        except OSError:
            done.set_result(False)
        if i % 50 == 49:
            await asyncio.sleep(ramp * 50 / n)
    all_open = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*waits), 120 + chunks / 10.0)
    for t in transports:
        t.close()
    # Streams open together at the end of the ramp, and when the first one ended.
    return sum(1 for r in results if r), delays, all_open, n - sum(1 for t in ends if t <= all_open), min(ends)


# Two shapes of N concurrent streams. "burst": opened over 2 s, 3 s each, so the gateway sets up N/2 streams a
# second while the first ones already flow (at N = 5,000 that is 2,500 new requests a second on top of 50,000
# chunks: what is measured is mostly the cost of starting requests). "held": opened over 10 s, 30 s each, so all N
# are open together for 20 s, which is what N concurrent agent streams look like.
STREAM_LOADS = {"burst": (2.0, 30), "held": (10.0, 300)}


def bench_slow_streams(counts, workers=1, floor=False, loads=("burst", "held")):
    """For each N and load: N concurrent slow streams through one gateway (`workers` processes), or with `floor`
    through tools/floor_proxy.py: completed streams, chunk delay p50/p99 (all chunks, and those received once every
    stream was open), the proxy's CPU share while they run and its peak RSS (summed over its processes)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="llm-mux-bench-streams-")
    print("Concurrent slow streams (10 chunks/s each, OpenAI client and upstream), %s per N and load:" % (
        "the pure-Python floor (tools/floor_proxy.py)" if floor else "a new gateway with --workers %d" % workers))
    for load in loads:
        ramp, chunks = STREAM_LOADS[load]
        print("  %s: opened over %.0f s, %d chunks (%.0f s) each" % (load, ramp, chunks, chunks / 10.0))
    print("  %6s | %5s | %9s | %9s | %12s %12s | %15s | %13s | %12s" % (
        "N", "load", "completed", "most open", "delay p50", "delay p99", "p99 all open", "gateway CPU", "peak RSS"))
    for n in counts:
        for load in loads:
            ramp, chunks = STREAM_LOADS[load]
            up_port, gw_port = free_port(), free_port()
            upstream = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream", str(up_port)])
            cfg = os.path.join(tmp, "config-%d-%s.yaml" % (n, load))
            with open(cfg, "w") as f:
                f.write("port: %d\nauth-dir: %s\napi-keys: [bench]\nserver: {max-connections: 20000}\nproviders:\n"
                        "  - type: openai\n    name: bench\n    base-url: http://127.0.0.1:%d/v1\n    api-key: k\n"
                        "    models:\n      - name: bench-slow\n" % (gw_port, os.path.join(tmp, "auth-%d-%s" % (n, load)),
                                                               up_port))
            command = [sys.executable, os.path.join(ROOT, "tools", "floor_proxy.py"), str(gw_port), str(up_port)] \
                if floor else [sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", cfg,
                               "--workers", str(workers)]
            gateway = subprocess.Popen(command,
                                       env=dict(os.environ, XDG_CONFIG_HOME=tmp), stdout=subprocess.DEVNULL,
                                       stderr=open(os.path.join(tmp, "gw-%d-%s.log" % (n, load)), "w"))
            try:
                wait_port(up_port)
                wait_port(gw_port)
                time.sleep(0.5 + workers)
                cpu0, t0 = cpu_seconds(gateway.pid), time.monotonic()
                completed, delays, all_open, most_open, first_end = asyncio.run(
                    run_slow_streams(gw_port, n, ramp, chunks))
                cpu = (cpu_seconds(gateway.pid) - cpu0) / (time.monotonic() - t0)
                peak = sum(rss_mb(p, "VmHWM") for p in process_tree(gateway.pid))
            finally:
                gateway.send_signal(signal.SIGTERM)
                upstream.send_signal(signal.SIGINT)
                gateway.wait(30)
                try:
                    upstream.wait(10)
                except subprocess.TimeoutExpired:  # thousands of open connections can outlast its shutdown
                    upstream.kill()
                    upstream.wait()
            # Besides the whole run: the chunks that came once every stream was open (0.3 s after the last one was
            # opened) and before the first one ended: no stream is being set up or torn down.
            steady = sorted(d for at, d in delays if all_open + 0.3 < at < first_end)
            delays = sorted(d for _, d in delays)

            def pct(values, p):
                return values[min(len(values) - 1, int(len(values) * p))] * 1000 if values else float("nan")
            print("  %6d | %5s | %4d/%-4d | %9d | %9.1f ms %9.1f ms | %12s | %10.0f %% | %9.1f MB" % (
                n, load, completed, n, most_open, pct(delays, 0.5), pct(delays, 0.99),
                "%.1f ms" % pct(steady, 0.99) if steady else "(none)", cpu * 100, peak))
    print("  (the client, the fake upstream and the gateway share the machine's cores; delay = client receipt "
          "minus the upstream's send stamp; 'all open': chunks received from 0.3 s after the last stream was "
          "opened until the first one ended, none when that never happened; 'most open': streams open together when the "
          "last one was opened%s)" % (
              "; RSS summed over the supervisor and its workers, pages they share counted in each"
              if workers > 1 else ""))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=8, help="duration of each measured run")
    p.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["workers", "streams", "instructions"],
                   help="run one part only: 'workers' (serve --workers 1 against 2), 'streams' (slow streams), "
                        "'instructions' (callgrind counts a request and a relayed chunk: the A/B measure)")
    p.add_argument("--streams", default="1000,5000", help="the N of concurrent slow streams, comma-separated")
    p.add_argument("--workers", type=int, default=1, help="worker processes for --only streams")
    p.add_argument("--stream-loads", default="burst,held", help="for --only streams: 'burst' (opened over 2 s, "
                   "3 s each), 'held' (opened over 10 s, 30 s each), or both, comma-separated")
    p.add_argument("--floor", action="store_true", help="--only streams through tools/floor_proxy.py instead")
    p.add_argument("--mixed", type=int, default=100000, help="requests in mixed formats over which RSS is watched")
    args = p.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if args.only == "instructions":
        return bench_instructions()
    if args.only == "streams":
        return bench_slow_streams([int(n) for n in args.streams.split(",")], args.workers, args.floor,
                                  args.stream_loads.split(","))
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if args.only == "workers":
        return bench_workers(args.seconds)
    tmp = tempfile.mkdtemp(prefix="llm-mux-bench-")
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream", str(up_port)])
    cfg = os.path.join(tmp, "config.yaml")
    with open(cfg, "w") as f:
        f.write("port: %d\nauth-dir: %s\napi-keys: [bench]\nproviders:\n  - type: openai\n    name: bench\n"
                "    base-url: http://127.0.0.1:%d/v1\n    api-key: up-key\n    models:\n      - name: bench-model\n"
                "  - type: anthropic\n    base-url: http://127.0.0.1:%d\n    api-key: up-key\n"
                "    models:\n      - name: bench-claude\n"
                % (gw_port, os.path.join(tmp, "auth"), up_port, up_port))
    env = dict(os.environ, XDG_CONFIG_HOME=tmp)
    gateway = subprocess.Popen([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", cfg],
                               env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "gw.log"), "w"))
    results = []
    nginx, ng_port = start_nginx(up_port, tmp)
    py_port = free_port()  # the pure-Python floor: the least a Python one-hop proxy does (tools/floor_proxy.py)
    py_floor = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "floor_proxy.py"), str(py_port),
                                 str(up_port)])
    try:
        wait_port(up_port)
        wait_port(gw_port)
        time.sleep(0.5)
        idle = rss_mb(gateway.pid)
        body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Hello"}]})
        sbody = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Hello"}],
                            "stream": True})
        gw_url = "http://127.0.0.1:%d/v1/chat/completions" % gw_port
        up_url = "http://127.0.0.1:%d/v1/chat/completions" % up_port
        wrk(gw_url, body, 50, 2, tmp)  # warm-up
        warm = rss_mb(gateway.pid)
        ng_url = "http://127.0.0.1:%d/v1/chat/completions" % ng_port if ng_port else None
        if ng_url:
            wrk(ng_url, body, 50, 2, tmp)  # warm-up
        for label, b, conns in (("non-stream", body, 1), ("non-stream", body, 50), ("64-chunk stream", sbody, 1),
                                ("64-chunk stream", sbody, 50)):
            direct = wrk(up_url, b, conns, max(3, args.seconds // 2), tmp)
            floor = wrk(ng_url, b, conns, args.seconds, tmp) if ng_url else None
            via = wrk(gw_url, b, conns, args.seconds, tmp)
            py = wrk("http://127.0.0.1:%d/v1/chat/completions" % py_port, b, conns, args.seconds, tmp)
            results.append((label, conns, direct, floor, via, py))
        # Large bodies at c=1 (p50): a Claude-Code-like Anthropic request translated to OpenAI and sent to an
        # Anthropic upstream as it is, and a 1 MB OpenAI request passed through, beside nginx carrying it.
        big = claude_code_request()
        big_same = claude_code_request(model="bench-claude")
        meg = openai_request()
        a_url = "http://127.0.0.1:%d/v1/messages" % gw_port
        up_a_url = "http://127.0.0.1:%d/v1/messages" % up_port
        bodies = [("%d KB Anthropic -> OpenAI" % (len(big) // 1024), wrk(a_url, big, 1, args.seconds, tmp),
                   wrk(up_url, big, 1, max(3, args.seconds // 2), tmp), None),
                  ("%d KB Anthropic -> Anthropic" % (len(big_same) // 1024),
                   wrk(a_url, big_same, 1, args.seconds, tmp),
                   wrk(up_a_url, big_same, 1, max(3, args.seconds // 2), tmp), None),
                  ("%d KB OpenAI -> OpenAI" % (len(meg) // 1024), wrk(gw_url, meg, 1, args.seconds, tmp),
                   wrk(up_url, meg, 1, max(3, args.seconds // 2), tmp),
                   wrk(ng_url, meg, 1, args.seconds, tmp) if ng_url else None)]
        # Translation cost: each client format on each upstream format, against the same-format pair.
        translation = []
        for label, stream in (("non-stream", False), ("64-chunk stream", True)):
            def body_for(client, model):
                if client == "openai":
                    b = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
                else:
                    b = {"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": "Hello"}]}
                if stream:
                    b["stream"] = True
                return json.dumps(b)
            runs = {}
            for client, url in (("openai", gw_url), ("anthropic", a_url)):
                for upstream_fmt, model in (("openai", "bench-model"), ("anthropic", "bench-claude")):
                    runs[(client, upstream_fmt)] = wrk(url, body_for(client, model), 50, args.seconds, tmp)
            translation.append((label, runs))
        # RSS over --mixed more requests in mixed formats (after the warm-up above).
        before = rss_mb(gateway.pid)
        done = 0
        mixed = ((gw_url, body), (a_url, body_for("anthropic", "bench-claude")), (gw_url, body_for("openai",
                                                                                               "bench-claude")))
        while done < args.mixed:
            for url, b in mixed:
                done += wrk(url, b, 50, 1, tmp)["total"]
        after = rss_mb(gateway.pid)
        # Usage records on (the default, above) against off, on a second gateway, alternated.
        off_port = free_port()
        off_cfg = os.path.join(tmp, "config-off.yaml")
        with open(off_cfg, "w") as f:
            f.write(open(cfg).read().replace("port: %d" % gw_port, "port: %d" % off_port) +
                    "usage: {enabled: false}\n")
        off_gw = subprocess.Popen([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", off_cfg],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(off_port)
            off_url = "http://127.0.0.1:%d/v1/chat/completions" % off_port
            usage_runs = {"on": [], "off": []}
            urls = {"on": gw_url, "off": off_url}
            wrk(off_url, body, 50, 2, tmp)  # warm-up
            for i in range(4):  # alternated, the order swapped each round: this machine's speed drifts
                for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    usage_runs[mode].append(wrk(urls[mode], body, 50, args.seconds, tmp)["rps"])
        finally:
            off_gw.send_signal(signal.SIGTERM)
            off_gw.wait(30)
    finally:
        gateway.send_signal(signal.SIGTERM)
        upstream.send_signal(signal.SIGINT)
        py_floor.send_signal(signal.SIGINT)
        py_floor.wait(10)
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(10)
        gateway.wait(30)
        upstream.wait(10)
    print("llm-mux benchmark (%s, Python %s, %d cores, uvloop %s)" % (
        time.strftime("%Y-%m-%d"), sys.version.split()[0], os.cpu_count(), "installed" if _has_uvloop() else "not "
        "installed"))
    print("%-16s %4s | %10s %8s | %10s %8s %8s | %10s %8s %8s | %8s %9s" % (
        "load", "conc", "direct r/s", "p50 ms", "nginx r/s", "p50 ms", "p99 ms", "gateway r/s", "p50 ms", "p99 ms",
        "vs nginx", "added p50"))
    for label, conns, d, n, g, _ in results:
        n = n or {"rps": float("nan"), "p50": float("nan"), "p99": float("nan")}
        print("%-16s %4d | %10.0f %8.3f | %10.0f %8.3f %8.3f | %10.0f %8.3f %8.3f | %7.2fx %7.3fms%s" % (
            label, conns, d["rps"], d["p50"], n["rps"], n["p50"], n["p99"], g["rps"], g["p50"], g["p99"],
            g["rps"] / n["rps"], g["p50"] - d["p50"],
            "  (errors: %d %s)" % (g["errors"], g["socket_errors"]) if g["errors"] or g["socket_errors"] else ""))
    print("  (vs nginx: the gateway's requests/s as a share of nginx's as a plain one-hop proxy; added p50: over "
          "direct)")
    print()
    print("The pure-Python floor (tools/floor_proxy.py: asyncio Protocols relaying bytes over pooled keep-alive "
          "connections, nothing else):")
    for label, conns, _, n, g, py in results:
        print("  %-16s c=%-3d %8.0f r/s, p50 %6.3f ms  = %5.2fx nginx | the gateway is %5.2fx this floor" % (
            label, conns, py["rps"], py["p50"], py["rps"] / n["rps"] if n else float("nan"), g["rps"] / py["rps"]))
    print()
    print("Large bodies at concurrency 1, p50:")
    for label, g, d, n in bodies:
        print("  %-30s gateway %7.3f ms | direct %7.3f ms | nginx %s | added over direct %7.3f ms%s" % (
            label, g["p50"], d["p50"], "%7.3f ms" % n["p50"] if n else "    n/a  ", g["p50"] - d["p50"],
            " (%.2fx nginx's time)" % (g["p50"] / n["p50"]) if n else ""))
    print()
    print("Translation at concurrency 50 (client format -> upstream format), requests/s:")
    for label, runs in translation:
        oo, aa = runs[("openai", "openai")]["rps"], runs[("anthropic", "anthropic")]["rps"]
        ao, oa = runs[("anthropic", "openai")]["rps"], runs[("openai", "anthropic")]["rps"]
        print("  %-16s openai->openai %6.0f | anthropic->anthropic %6.0f | anthropic->openai %6.0f (%3.0f %% of "
              "openai->openai) | openai->anthropic %6.0f (%3.0f %% of anthropic->anthropic)"
              % (label, oo, aa, ao, ao / oo * 100, oa, oa / aa * 100))
        bad = [k for k, v in runs.items() if v["errors"] or v["socket_errors"]]
        if bad:
            print("    errors in: %s" % bad)
    print()
    print("RSS idle: %.1f MB; after warm-up: %.1f MB; before the mixed run: %.1f MB; after %d more requests in mixed "
          "formats: %.1f MB (growth %.1f %%)" % (idle, warm, before, done, after, (after - before) / before * 100.0))
    on, off = sum(usage_runs["on"]) / 4, sum(usage_runs["off"]) / 4
    print("Usage records at c=50 (non-stream, four alternated runs each): on %.0f r/s, off %.0f r/s (on is %.0f %% "
          "of off)" % (on, off, on / off * 100))
    return 0


def _has_uvloop():
    import importlib.util
    return importlib.util.find_spec("uvloop") is not None


def bench_workers(seconds):
    """The main loads (non-streaming and 64-chunk streams, c=1 and c=50) through `serve --workers 1` and
    `--workers 2`, alternated, side by side with the fake upstream direct."""
    tmp = tempfile.mkdtemp(prefix="llm-mux-bench-workers-")
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream", str(up_port)])
    body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Hello"}]})
    sbody = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Hello"}], "stream": True})
    loads = [("non-stream", body, 1), ("non-stream", body, 50), ("64-chunk stream", sbody, 1),
             ("64-chunk stream", sbody, 50)]
    env = dict(os.environ, XDG_CONFIG_HOME=tmp)
    gateways, rows = {}, []
    try:
        wait_port(up_port)
        for n in (1, 2):
            port = free_port()
            cfg = os.path.join(tmp, "config-%d.yaml" % n)
            with open(cfg, "w") as f:
                f.write("port: %d\nauth-dir: %s\napi-keys: [bench]\nproviders:\n"
                        "  - type: openai\n    name: bench\n    base-url: http://127.0.0.1:%d/v1\n    api-key: k\n"
                        "    models:\n      - name: bench-model\n" % (port, os.path.join(tmp, "auth-%d" % n), up_port))
            gateways[n] = (port, subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", cfg, "--workers", str(n)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(port)
        time.sleep(1.0)
        url = "http://127.0.0.1:%d/v1/chat/completions"
        for n, (port, _) in gateways.items():
            wrk(url % port, body, 50, 2, tmp)  # warm-up
        for name, b, conns in loads:
            runs = {1: [], 2: []}
            for i in range(2):  # alternated, the order swapped each round: this machine's speed drifts
                for n in (1, 2) if i % 2 == 0 else (2, 1):
                    runs[n].append(wrk(url % gateways[n][0], b, conns, seconds, tmp))
            direct = wrk(url % up_port, b, conns, max(3, seconds // 2), tmp)
            rows.append((name, conns, direct, runs))
    finally:
        for _, proc in gateways.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        upstream.send_signal(signal.SIGINT)
        upstream.wait(10)
    print("llm-mux workers benchmark (%s, Python %s, %d cores; two alternated runs of each)"
          % (time.strftime("%Y-%m-%d"), sys.version.split()[0], os.cpu_count()))
    print("%-16s %4s | %10s | %12s %8s | %12s %8s | %s" % ("load", "conc", "direct r/s", "--workers 1", "p50 ms",
                                                          "--workers 2", "p50 ms", "2 / 1"))
    for name, conns, direct, runs in rows:
        one = sum(r["rps"] for r in runs[1]) / len(runs[1])
        two = sum(r["rps"] for r in runs[2]) / len(runs[2])
        p50 = {n: sum(r["p50"] for r in runs[n]) / len(runs[n]) for n in runs}
        print("%-16s %4d | %10.0f | %12.0f %8.3f | %12.0f %8.3f | %.2fx" % (
            name, conns, direct["rps"], one, p50[1], two, p50[2], two / one))
    print("  (the load generator and the fake upstream share the same cores; --only streams --workers 2 runs the "
          "slow streams through 2 workers)")
    return 0


# -- instruction counts ---------------------------------------------------------------------------------------------
# Time on a shared 2-core host moves by ±20 % between runs; the instructions a process executes for the same work do
# not (callgrind counts them: the same figure to ~1 % whatever else the machine does). `--only instructions` is the
# A/B measure of a change to a hot path: instructions a request and a relayed chunk, the gateway beside the
# pure-Python floor.

def _callgrind(argv, out, env=None):
    """`argv` (a Python program) run under callgrind; what it executes is read through `_callgrind_window`."""
    return subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out, sys.executable] + argv,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class _callgrind_window:
    """`with _callgrind_window(proc, out) as w:` ... `w.instructions`: what proc executed inside the block."""

    def __init__(self, proc, out):
        self.proc, self.out, self.instructions = proc, out, None

    def _control(self, flag):
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)

    def __enter__(self):
        self.before = set(glob.glob(self.out + ".*"))
        self._control("-z")
        return self

    def __exit__(self, *exc):
        self._control("-d")
        for path in sorted(set(glob.glob(self.out + ".*")) - self.before):
            with open(path) as f:
                m = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
            if m:
                self.instructions = int(m.group(1))
        return False


def _requests_instructions(proc, out, port, path, body, n):
    """Instructions proc executes per request, over n sequential keep-alive requests (after n // 5 to warm up)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json",
               "anthropic-version": "2023-06-01"}

    def one():
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise SystemExit("%s answered %d: %r" % (path, resp.status, data[:300]))
    for _ in range(max(5, n // 5)):
        one()
    with _callgrind_window(proc, out) as w:
        for _ in range(n):
            one()
    conn.close()
    return w.instructions / n


def _chunk_instructions(proc, out, port, streams, seconds=8.0):
    """Instructions proc executes per relayed chunk while `streams` slow streams (10 chunks/s each) are held."""
    res = {}

    async def run():
        task = asyncio.ensure_future(run_slow_streams(port, streams, ramp=0.5, chunks=int(seconds * 10) + 70))
        await asyncio.sleep(4.0)
        with _callgrind_window(proc, out) as w:
            res["t0"] = time.monotonic()
            await asyncio.sleep(seconds)
            res["t1"] = time.monotonic()
        res["ir"] = w.instructions
        return await task
    completed, delays, _, _, _ = asyncio.run(run())
    if completed != streams:
        raise SystemExit("only %d of %d slow streams completed" % (completed, streams))
    chunks = sum(1 for at, _ in delays if res["t0"] <= at <= res["t1"])
    return res["ir"] / chunks


def bench_instructions(requests=300, streams=20):
    """Instructions (callgrind) per non-streaming request, per 64-chunk stream request (relayed, and translated for
    an Anthropic client from an OpenAI upstream), per 200 KB Anthropic -> OpenAI request and per relayed chunk,
    through the gateway and through the pure-Python floor (tools/floor_proxy.py)."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    tmp = tempfile.mkdtemp(prefix="llm-mux-bench-instructions-")
    up_port, gw_port, fl_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream", str(up_port)])
    cfg = os.path.join(tmp, "config.yaml")
    with open(cfg, "w") as f:
        f.write("port: %d\nauth-dir: %s\napi-keys: [bench]\nproviders:\n  - type: openai\n    name: bench\n"
                "    base-url: http://127.0.0.1:%d/v1\n    api-key: k\n    models:\n      - name: bench-model\n"
                "      - name: bench-slow\n" % (gw_port, os.path.join(tmp, "auth"), up_port))
    gw_out, fl_out = os.path.join(tmp, "gateway.cg"), os.path.join(tmp, "floor.cg")
    # Not re-exec'd (LLM_MUX_NO_REEXEC): valgrind follows the process it started, not what that one execs.
    gateway = _callgrind([os.path.join(ROOT, "llm_mux.py"), "serve", "--config", cfg], gw_out,
                         dict(os.environ, XDG_CONFIG_HOME=tmp, LLM_MUX_NO_REEXEC="1"))
    floor = _callgrind([os.path.join(ROOT, "tools", "floor_proxy.py"), str(fl_port), str(up_port)], fl_out)
    small = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Hello"}]}).encode()
    streamed = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Hello"}],
                           "stream": True}).encode()
    translated = json.dumps({"model": "bench-model", "max_tokens": 100, "stream": True,
                             "messages": [{"role": "user", "content": "Hello"}]}).encode()
    big = claude_code_request().encode()
    rows = []
    try:
        wait_port(up_port)
        wait_port(gw_port, 180)
        wait_port(fl_port, 180)
        for label, path, body, n in (("non-stream request", "/v1/chat/completions", small, requests),
                                     ("64-chunk stream request", "/v1/chat/completions", streamed, requests),
                                     ("64-chunk stream, Anthropic -> OpenAI", "/v1/messages", translated,
                                      requests // 2),
                                     ("%d KB Anthropic -> OpenAI request" % (len(big) // 1024), "/v1/messages",
                                      big, max(10, requests // 15))):
            via = _requests_instructions(gateway, gw_out, gw_port, path, body, n)
            # the floor forwards the body as it is (to the upstream's Anthropic endpoint for the large one)
            fl = _requests_instructions(floor, fl_out, fl_port, path, body, n)
            rows.append((label, via, fl))
        rows.append(("relayed chunk, %d held streams" % streams,
                     _chunk_instructions(gateway, gw_out, gw_port, streams),
                     _chunk_instructions(floor, fl_out, fl_port, streams)))
    finally:
        for proc in (gateway, floor):
            proc.send_signal(signal.SIGTERM)
        for proc in (gateway, floor):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        upstream.send_signal(signal.SIGINT)
        upstream.wait(10)
    print("llm-mux instruction counts (%s, Python %s, uvloop %s; callgrind, the proxy process only, deterministic "
          "to ~1 %%)" % (time.strftime("%Y-%m-%d"), sys.version.split()[0],
                         "installed" if _has_uvloop() else "not installed"))
    print("%-36s | %14s | %14s | %s" % ("unit", "llm-mux", "floor", "llm-mux / floor"))
    for label, via, fl in rows:
        print("%-36s | %14s | %14s | %.1fx" % (label, "{:,.0f}".format(via), "{:,.0f}".format(fl), via / fl))
    print("  (floor: tools/floor_proxy.py, a pure-Python one-hop relay of the same bytes, which does not translate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
