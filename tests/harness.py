"""Shared test helpers: real gateway processes and in-process gateways (on a controllable clock), config
snippets for fake upstreams, the browser's part of a login, and one bounded wait-until loop."""
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llm_mux  # noqa: E402
from fakes import FakeUpstream, free_port  # noqa: E402,F401


class FakeClock(llm_mux.Clock):
    """Monotonic and wall time that only move when a test (or a sleep) moves them."""

    def __init__(self, t=1000.0, wall=None):
        self.t = t
        self.wall_offset = (time.time() if wall is None else wall) - t
        self.sleeps = []

    def now(self):
        return self.t

    def wall(self):
        return self.t + self.wall_offset

    async def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


class GatewayThread:
    """llm_mux's Gateway, App and HttpServer on a background loop, on a fake clock unless told otherwise."""

    def __init__(self, config_text, fake_clock=True):
        self.cfg = llm_mux.Config.from_text(config_text, "t.yaml", environ={})
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def start():
            gateway = llm_mux.Gateway(self.cfg, clock=FakeClock() if fake_clock else None)
            server = llm_mux.HttpServer(llm_mux.App(gateway), lambda: gateway.limits, access_log=False,
                                        error_page=llm_mux.http_error_page)
            srv = await server.listen("127.0.0.1", 0)
            return gateway, server, srv.sockets[0].getsockname()[1]
        self.gateway, self.server, self.port = self.run(start())
        self.clock = self.gateway.clock

    def run(self, coro, timeout=30):
        """Run a coroutine on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0, timeout=20)

    def chat(self, model="m", text="hi", **kw):
        return self.client().chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)

    def cred(self, key):
        for p in self.gateway.registry.providers:
            for c in p.credentials:
                if c.api_key == key:
                    return c
        raise KeyError(key)

    def stop(self):
        self.run(self.server.shutdown(1), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class Observed:
    """Records every finished Call; counts how often each one was reported."""

    def __init__(self, gateway):
        self.calls = []
        gateway.router.observers.append(self.calls.append)

    def one(self):
        assert len(self.calls) == 1, [(c.outcome, c.status) for c in self.calls]
        assert len(set(map(id, self.calls))) == len(self.calls)
        return self.calls[0]


def openai_provider(url, keys, models=("m",), name="p", extra=""):
    """A `providers:` entry of type openai pointing at a fake upstream."""
    lines = ["  - type: openai", "    name: %s" % name, "    base-url: %s/v1" % url, "    api-keys:"]
    lines += ["      - key: %s" % k for k in keys]
    lines += ["    models:"] + ["      - name: %s" % m for m in models]
    return "\n".join(lines) + "\n" + extra


class NullTransport:
    """A transport that swallows writes, for feeding a parser fixed bytes through an llm_mux.Channel."""

    def write(self, data):
        pass

    def is_closing(self):
        return False

    def close(self):
        pass

    abort = pause_reading = resume_reading = close


def channel_with(data):
    """An llm_mux.Channel holding `data` and then the end of the stream (a short read ends, never waits)."""
    ch = llm_mux.Channel()
    ch.transport = NullTransport()
    ch.buf += data
    ch.eof = True
    return ch


def wait_until(predicate, timeout=15.0, what="the condition", ignore=()):
    """Poll `predicate` until it returns something true, and return that. Exceptions of the types in `ignore`
    count as not yet. Fails (never passes) at the deadline, a guard against hangs, not a speed requirement."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


class Gateway:
    """A real `llm_mux` process on 127.0.0.1 with a config written by the test."""

    def __init__(self, tmp_path, config, env=None, args=(), scheme="http", wait=True):
        self.port = free_port()
        self.dir = tmp_path
        self.config_path = os.path.join(str(tmp_path), "config.yaml")
        text = textwrap.dedent(config).replace("{port}", str(self.port))
        if "port:" not in text:
            text = "port: %d\n" % self.port + text
        if "auth-dir:" not in text:
            text += "\nauth-dir: %s\n" % os.path.join(str(tmp_path), "auth")
        with open(self.config_path, "w") as f:
            f.write(text)
        self.env = dict(os.environ)
        self.env["XDG_CONFIG_HOME"] = os.path.join(str(tmp_path), "xdg")
        self.env.pop("LLM_MUX_CONFIG", None)
        self.env.update(env or {})
        self.log_path = os.path.join(str(tmp_path), "gateway.log")
        self.log = open(self.log_path, "wb")
        self.scheme = scheme
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config",
                                      self.config_path] + list(args), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env)
        if wait:
            self.wait_ready()

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def wait_ready(self, timeout=15):
        deadline = time.time() + timeout
        import socket
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("gateway exited with %s:\n%s" % (self.proc.returncode, self.output()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not start:\n" + self.output())

    def get_text(self, path, headers=None):
        req = urllib.request.Request(self.url + path, headers=headers or {})
        return urllib.request.urlopen(req, timeout=30).read().decode()

    def get_json(self, path, headers=None):
        import json
        return json.loads(self.get_text(path, headers))

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def openai_provider_config(upstream_url, keys=("sk-up-1",), models=(("gpt-test", ""),), name="fake", extra=""):
    lines = ["providers:", "  - type: openai", "    name: %s" % name, "    base-url: %s/v1" % upstream_url,
             "    api-keys:"]
    for k in keys:
        lines.append("      - key: %s" % k)
    lines.append("    models:")
    for n, a in models:
        lines.append("      - name: %s" % n)
        if a:
            lines.append("        alias: %s" % a)
    if extra:
        lines.append(textwrap.indent(textwrap.dedent(extra).strip("\n"), "    "))
    return "\n".join(lines) + "\n"


def read_login_url(proc, marker):
    """Read a login subprocess's output until the authorization URL (containing `marker`) appears."""
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if marker in line:
            return line.strip()


def play_browser(port, path, state, code="the-code", timeout=10):
    """What the browser does after the user approves: GET the local callback with a code and the state."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s?code=%s&state=%s" % (port, path, code, state),
                                        timeout=5) as r:
                return r.read()
        except urllib.error.HTTPError:
            raise
        except OSError:
            assert time.time() < deadline, "the login's callback listener never came up"
            time.sleep(0.05)


def overrides_config(url, hosts, auth=None, extra=""):
    """Config lines sending each of `hosts` to the fake upstream at `url` (and the auth dir, when given)."""
    text = ("auth-dir: %s\n" % auth if auth else "") + "upstream-overrides:\n"
    return text + "".join('  "%s": "%s"\n' % (h, url) for h in hosts) + extra


def mutate_bytes(rng, data, inserts, others=(), max_ops=4):
    """A fuzzer's mutation of `data`: 1..max_ops of byte flips, insertions of `inserts`, deletions, a slice of one
    of `others` spliced in (or, without others, a cut tail), a byte repeated."""
    data = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.randrange(5)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.choice(inserts)
        elif op == 2 and data:
            i = rng.randrange(len(data))
            del data[i:i + rng.randint(1, 8)]
        elif op == 3 and others:
            other = rng.choice(others)
            i, j = sorted(rng.randrange(len(other) + 1) for _ in range(2))
            k = rng.randrange(len(data) + 1)
            data[k:k] = other[i:j]
        elif op == 3 and data:
            del data[rng.randrange(len(data)):]
        elif data:
            i = rng.randrange(len(data))
            data[i:i + 1] = data[i:i + 1] * rng.randint(2, 50)
    return bytes(data)
