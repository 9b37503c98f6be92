"""The AI Studio relay (`/v1/ws`, gateway.md §8): a page connected with the `websockets` library plays the browser:
it lists its models, answers generateContent whole and streamGenerateContent in chunks (JSON frames and llm-mux's
binary frames); any client format is served through it; when it leaves, its models go and pending calls fail;
ws-auth decides who may connect."""
import asyncio
import json
import struct
import threading

import openai
import pytest
import websockets

import llm_mux
from harness import GatewayThread, wait_until

ANSWER = {"candidates": [{"content": {"role": "model", "parts": [{"text": "from the page"}]},
                          "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 3, "totalTokenCount": 6}}


class Page:
    """A fake browser page on the relay, in its own thread and event loop."""

    def __init__(self, url, headers=None, binary=False, hold=False):
        self.url, self.headers, self.binary, self.hold = url, headers or {}, binary, hold
        self.seen = []
        self.ready = threading.Event()
        self.stop = None
        self.error = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self.main()), daemon=True)
        self.thread.start()

    async def main(self):
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        try:
            async with websockets.connect(self.url, additional_headers=self.headers) as ws:
                self.ready.set()
                reader = asyncio.ensure_future(self.serve(ws))
                await self.stop.wait()
                reader.cancel()
        except Exception as e:  # the test looks at it
            self.error = e
            self.ready.set()

    async def serve(self, ws):
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("type") != "http_request":
                continue
            p, rid = msg["payload"], msg["id"]
            self.seen.append(p)
            if p["method"] == "GET" and p["url"].endswith("/v1beta/models"):
                await ws.send(json.dumps({"id": rid, "type": "http_response", "payload": {
                    "status": 200, "body": json.dumps({"models": [{"name": "models/gemini-relay-1"}]})}}))
            elif self.hold:
                continue  # never answers: the caller waits until the page leaves
            elif ":streamGenerateContent" in p["url"]:
                chunks = ["data: " + json.dumps({"candidates": [{"content": {"role": "model", "parts": [
                    {"text": t}]}}]}) + "\r\n\r\n" for t in ("from ", "the ")]
                chunks.append("data: " + json.dumps(dict(ANSWER, candidates=[{"content": {"role": "model", "parts": [
                    {"text": "page"}]}, "finishReason": "STOP"}])) + "\r\n\r\n")
                if self.binary:
                    def frame(kind, data=b""):
                        return bytes([kind]) + struct.pack("!H", len(rid)) + rid.encode() + data
                    await ws.send(frame(3))
                    for c in chunks:
                        await ws.send(frame(1, c.encode()))
                    await ws.send(frame(2))
                else:
                    await ws.send(json.dumps({"id": rid, "type": "stream_start", "payload": {"status": 200}}))
                    for c in chunks:
                        await ws.send(json.dumps({"id": rid, "type": "stream_chunk", "payload": {"data": c}}))
                    await ws.send(json.dumps({"id": rid, "type": "stream_end"}))
            else:
                await ws.send(json.dumps({"id": rid, "type": "http_response", "payload": {
                    "status": 200, "headers": {"Content-Type": ["application/json"]}, "body": json.dumps(ANSWER)}}))

    def leave(self):
        self.loop.call_soon_threadsafe(self.stop.set)  # the page's own loop closes its socket
        self.thread.join(10)


def ws_url(gw):
    return gw.url.replace("http://", "ws://") + "/v1/ws"


def models(gw, key="sk-gw"):
    return [m.id for m in openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0).models.list()]


@pytest.mark.parametrize("binary", [False, True])
def test_a_page_serves_every_client_format_and_leaving_takes_its_models(gateway, binary):
    gw = gateway("api-keys: [sk-gw]\n")
    page = Page(ws_url(gw), binary=binary)
    assert page.ready.wait(10) and page.error is None
    wait_until(lambda: "gemini-relay-1" in models(gw), what="the page's models")
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-gw", max_retries=0)
    r = c.chat.completions.create(model="gemini-relay-1", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "from the page"
    sent = page.seen[-1]
    assert sent["method"] == "POST" and sent["url"].endswith("/v1beta/models/gemini-relay-1:generateContent")
    assert json.loads(sent["body"])["contents"][0]["parts"][0]["text"] == "hi"
    assert "x-goog-api-key" not in {k.lower() for k in sent["headers"]}  # the page signs in its own way
    chunks = list(c.chat.completions.create(model="gemini-relay-1", messages=[{"role": "user", "content": "hi"}],
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "from the page"
    assert page.seen[-1]["url"].endswith(":streamGenerateContent?alt=sse")
    page.leave()
    wait_until(lambda: "gemini-relay-1" not in models(gw), what="the page's models to go")


def test_a_page_that_leaves_fails_what_it_was_asked(gateway):
    gw = gateway("api-keys: [sk-gw]\nrequest-retry: 0\n")
    page = Page(ws_url(gw), hold=True)
    assert page.ready.wait(10)
    wait_until(lambda: "gemini-relay-1" in models(gw), what="the page's models")
    out = {}

    def ask():
        try:
            openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-gw", max_retries=0, timeout=30).chat.completions.create(
                model="gemini-relay-1", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            out["status"] = e.status_code
    t = threading.Thread(target=ask)
    t.start()
    wait_until(lambda: len(page.seen) == 2, what="the request at the page")
    page.leave()
    t.join(30)
    assert out["status"] >= 500


def test_ws_auth():
    with_auth = GatewayThread("api-keys: [sk-gw]\nws-auth: true\n", fake_clock=False)
    without = GatewayThread("api-keys: [sk-gw]\nws-auth: false\n", fake_clock=False)
    try:
        def status(gw, peer, key=None):
            headers = [("host", "x"), ("upgrade", "websocket"), ("connection", "Upgrade"),
                       ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
            if key:
                headers.append(("authorization", "Bearer " + key))
            req = llm_mux.Request("GET", "/v1/ws", (1, 1), llm_mux.Headers(headers), peer)
            return gw.run(gw.server.app(req)).status
        assert status(with_auth, "127.0.0.1") == 401
        assert status(with_auth, "192.0.2.7", "sk-gw") == 101
        assert status(without, "127.0.0.1") == 101
        assert status(without, "192.0.2.7", "sk-gw") == 403  # off: this machine only
    finally:
        with_auth.stop()
        without.stop()
