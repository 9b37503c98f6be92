"""Shared test helpers: a controllable clock, an in-process gateway on a background loop, config snippets and a
bounded wait-until loop."""
import asyncio
import threading
import time

import openai

import llm_mux


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


def openai_provider(url, keys, models=("m",), name="p", extra=""):
    """A `providers:` entry of type openai pointing at a fake upstream."""
    lines = ["  - type: openai", "    name: %s" % name, "    base-url: %s/v1" % url, "    api-keys:"]
    lines += ["      - key: %s" % k for k in keys]
    lines += ["    models:"] + ["      - name: %s" % m for m in models]
    return "\n".join(lines) + "\n" + extra


def wait_until(predicate, timeout=15.0, what="the condition"):
    """Poll `predicate` until it is true; fails (never passes) when the deadline is reached."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)
