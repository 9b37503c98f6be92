"""A real llm_mux process: TLS serving, upstream calls through each proxy type, client authentication, the safe
binding rule, and graceful shutdown with a stream in flight. The `openai` SDK is the client."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import openai
import pytest

import llm_mux
import proxies
from certs import make_certs
from harness import ROOT, openai_provider_config
from fakes import FakeUpstream, Reply, free_port, openai_completion, openai_stream_events


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def chat(gw, key="k", **kw):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20, **kw)
    return c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])


def test_serves_over_tls(gateway, upstream, certs):
    ca, cert, key = certs
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "tls: {enable: true, cert: %s, key: %s}\n" % (cert, key),
                 scheme="https")
    import ssl
    r = chat(gw, http_client=httpx.Client(verify=ssl.create_default_context(cafile=ca)))
    assert r.choices[0].message.content == "Hello!"
    with pytest.raises(openai.APIConnectionError):
        chat(gw, http_client=httpx.Client(verify=True))  # an untrusted certificate is refused by the client


@pytest.mark.parametrize("kind", ["http", "https", "socks5", "socks5h-auth"])
def test_upstream_calls_go_through_each_proxy_type(gateway, tmp_path, certs, kind):
    ca, cert, key = certs
    up = FakeUpstream(lambda r: Reply(body=openai_completion("via proxy")), certfile=cert, keyfile=key).start()
    started = []
    try:
        if kind == "http":
            p = proxies.start_tinyproxy(tmp_path)
            started.append(p.stop)
            proxy_url = p.url
        elif kind == "https":
            tp = proxies.start_tinyproxy(tmp_path)
            started.append(tp.stop)
            port, proc = proxies.start_stunnel(tmp_path, int(tp.url.rsplit(":", 1)[1]), cert, key)
            started.append(proc.terminate)
            proxy_url = "https://localhost:%d" % port
        elif kind == "socks5":
            p = proxies.start_dante(tmp_path)
            started.append(p.stop)
            proxy_url = p.url
        else:
            p = proxies.start_microsocks("u1", "p1")
            started.append(p.stop)
            proxy_url = p.url.replace("socks5:", "socks5h:")
        base = "https://localhost:%d" % up.port
        gw = gateway(openai_provider_config(base) + "proxy-url: %s\nca-file: %s\n" % (json.dumps(proxy_url), ca))
        r = chat(gw)
        assert r.choices[0].message.content == "via proxy"
        assert up.requests[0].path == "/v1/chat/completions"
    finally:
        up.stop()
        for stop in started:
            stop()


def test_per_key_proxy_wins_over_global(gateway, tmp_path, upstream):
    up = upstream()
    rec = proxies.RecordingSocks5()
    try:
        cfg = openai_provider_config(up.url, keys=()).replace(
            "    api-keys:\n", "    api-keys:\n      - key: k1\n        proxy-url: %s\n" % rec.url)
        gw = gateway(cfg + 'proxy-url: "http://127.0.0.1:1"\n')  # the global proxy would fail
        assert chat(gw).choices[0].message.content == "Hello!"
        assert rec.seen and rec.seen[0][1] == "127.0.0.1"
    finally:
        rec.stop()


def test_api_keys_accepted_in_every_documented_place(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-good, sk-other]\n")
    assert chat(gw, key="sk-good").choices[0].message.content == "Hello!"
    with pytest.raises(openai.AuthenticationError) as e:
        chat(gw, key="sk-bad")
    assert e.value.body["message"] == "Invalid API key"

    def status(headers=None, query=""):
        req = urllib.request.Request(gw.url + "/v1/models" + query, headers=headers or {})
        try:
            return urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code
    assert status() == 401
    assert status({"x-api-key": "sk-other"}) == 200
    assert status({"x-goog-api-key": "sk-good"}) == 200
    assert status(query="?key=sk-good") == 200
    assert status({"Authorization": "Bearer sk-wrong"}) == 401
    assert status({"Authorization": "sk-good"}) == 200  # a bare key in Authorization
    assert "sk-good" not in gw.output() and "sk-other" not in gw.output()


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []
    real = llm_mux.hmac.compare_digest
    monkeypatch.setattr(llm_mux.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    cfg = llm_mux.Config.from_text("api-keys: [alpha, beta]\n", environ={})
    app = llm_mux.App(llm_mux.Gateway(cfg))
    req = llm_mux.Request("GET", "/v1/models", (1, 1), llm_mux.Headers([("x-api-key", "beta")]), "10.0.0.1")
    app.authenticate(req)
    assert calls == [(b"beta", b"alpha"), (b"beta", b"beta")]  # every key compared, none short-circuited



def test_a_key_checked_before_the_body_is_not_checked_again_unless_the_config_changed(monkeypatch):
    """check_head authenticates a request before its body is read; dispatch does not compare the keys again (each
    comparison hashes the key against every client key), but a reload meanwhile (a key revoked while the body
    arrived) has the request checked against the new keys."""
    calls = []
    real = llm_mux.hmac.compare_digest
    monkeypatch.setattr(llm_mux.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    gw = llm_mux.Gateway(llm_mux.Config.from_text("api-keys: [alpha, beta]\n", environ={}))
    app = llm_mux.App(gw)

    def request():
        return llm_mux.Request("GET", "/v1/models", (1, 1), llm_mux.Headers([("x-api-key", "beta")]), "10.0.0.1")
    req = request()
    assert asyncio.run(app.check_head(req)) is None
    assert len(calls) == 2 and req.principal
    assert asyncio.run(app.dispatch(req)).status == 200
    assert len(calls) == 2  # not compared again
    req = request()
    assert asyncio.run(app.check_head(req)) is None
    gw.cfg = llm_mux.Config.from_text("api-keys: [alpha]\n", environ={})  # beta revoked while the body arrived
    assert asyncio.run(app.dispatch(req)).status == 401

def test_without_keys_only_loopback_peers_are_served():
    cfg = llm_mux.Config.from_text("", environ={})
    app = llm_mux.App(llm_mux.Gateway(cfg))
    app.authenticate(llm_mux.Request("GET", "/v1/models", (1, 1), llm_mux.Headers(), "127.0.0.1"))
    app.authenticate(llm_mux.Request("GET", "/v1/models", (1, 1), llm_mux.Headers(), "::1"))
    with pytest.raises(llm_mux.GatewayError) as e:
        app.authenticate(llm_mux.Request("GET", "/v1/models", (1, 1), llm_mux.Headers(), "192.0.2.7"))
    assert e.value.status == 401


def _serve(tmp_path, text, *args):
    p = tmp_path / "c.yaml"
    p.write_text(text + "\nauth-dir: %s\n" % (tmp_path / "auth"))
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", str(p)]
                            + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def test_refuses_to_bind_beyond_loopback_without_keys(tmp_path):
    proc = _serve(tmp_path, "host: 0.0.0.0\nport: %d\n" % free_port())
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert len(err.strip().splitlines()) == 1
    assert "api-keys" in err and "disable-auth: true" in err


def test_binds_everywhere_when_disable_auth_is_explicit(tmp_path):
    port = free_port()
    proc = _serve(tmp_path, "host: 0.0.0.0\nport: %d\ndisable-auth: true\n" % port)
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/v1/models" % port, timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("gateway did not come up")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_ipv6_loopback_host(gateway, upstream):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + 'host: "::1"\n', wait=False)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            with urllib.request.urlopen("http://[::1]:%d/v1/models" % gw.port, timeout=2) as r:
                assert r.status == 200
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(gw.output())


def test_sigterm_lets_an_in_flight_stream_finish(gateway, upstream):
    events = openai_stream_events(tuple("abcdefghij"), usage=False)
    paced = []
    for e in events:
        paced += [e, 0.15]
    up = upstream(lambda r: Reply("sse", events=paced))
    gw = gateway(openai_provider_config(up.url))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=30)
    got = []
    started = threading.Event()

    def consume():
        stream = c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                           stream=True)
        for chunk in stream:
            started.set()
            for ch in chunk.choices:
                got.append(ch.delta.content or "")
    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(10)
    gw.proc.send_signal(signal.SIGTERM)
    refused = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not refused:  # no new connections once draining
        try:
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
            time.sleep(0.05)
        except OSError:
            refused = True
    assert refused
    assert t.is_alive()  # ... while the stream started before the signal is still running
    t.join(20)
    assert "".join(got) == "abcdefghij"  # the stream ran to its end
    gw.proc.wait(20)
    assert gw.proc.returncode == 0
