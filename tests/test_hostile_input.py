"""Hostile or careless input that used to escape error handling: forged log lines through a request path or a
model name, config that crashed start-up with a traceback (deep nesting, ports out of range)."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest

import llm_mux
from harness import ROOT, openai_provider_config


def test_nothing_a_client_sends_can_forge_a_log_line(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url))
    forged = "[2026-01-01 00:00:00] [ERROR] FORGED"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(gw.url + "/x%0A" + forged.replace(" ", "%20") + "%0D%0A", timeout=10)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="evil\n" + forged, messages=[{"role": "user", "content": "x"}])
    lines = gw.output().splitlines()
    assert not [line for line in lines if line.startswith("[2026-01-01")]
    assert any("\\n[2026-01-01 00:00:00] [ERROR] FORGED" in line for line in lines)


@pytest.mark.parametrize("text, says", [
    ("port: 99999999999999999999999\n", "t.yaml:1:1: port must be between 0 and 65535"),
    ("port: -1\n", "port must be between 0 and 65535"),
    ('upstream-overrides: {"https://api.openai.com": "http://127.0.0.1:99999"}\n', "not an http(s) URL"),
    ('upstream-overrides: {"ftp://x": "http://127.0.0.1:1"}\n', "'ftp://x' is not an http(s) URL"),
    ("x: " + "[" * 2000 + "]" * 2000 + "\n", "t.yaml:1:104: nested more than 100 levels deep"),
    ("a:\n" + "".join("  " * (i + 1) + "k%d:\n" % i for i in range(300)), "nested more than 100 levels deep"),
])
def test_config_that_used_to_crash_start_up_is_one_line_with_the_place(text, says):
    with pytest.raises(llm_mux.ConfigError) as e:
        llm_mux.Config.from_text(text, "t.yaml", environ={})
    assert says in str(e.value)


def test_the_command_line_says_it_in_one_line(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("port: 99999999999999999999999\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        "llm-mux: %s:1:1: port must be between 0 and 65535" % cfg]


def test_leftovers_of_a_killed_refresh_are_settled_at_start(gateway, tmp_path):
    import json
    import time
    auth = tmp_path / "auth"
    auth.mkdir()
    os.chmod(str(auth), 0o755)
    old = {"type": "claude", "email": "a@x", "access_token": "at-old", "refresh_token": "rt-old",
           "expired": "2099-01-01T00:00:00Z"}
    (auth / "claude-a.json").write_text(json.dumps(old))
    rotated = dict(old, access_token="at-new", refresh_token="rt-new")
    (auth / "claude-a.json.tmp-4242-ab12cd34").write_text(json.dumps(rotated))  # complete, newer: the only rt-new
    now = time.time_ns()
    os.utime(str(auth / "claude-a.json"), ns=(now - 10 ** 9, now - 10 ** 9))
    (auth / "claude-b.json").write_text(json.dumps(dict(old, email="b@x")))
    (auth / "claude-b.json.tmp-4243-ee11ff22").write_text('{"type": "claude", "access_tok')  # cut off
    gw = gateway("auth-dir: %s\n" % auth)
    assert json.loads((auth / "claude-a.json").read_text())["refresh_token"] == "rt-new"
    assert sorted(os.listdir(str(auth))) == ["claude-a.json", "claude-b.json"]
    assert oct(os.stat(str(auth)).st_mode & 0o777) == "0o700"
    out = gw.output()
    assert "now in place" in out and "deleted claude-b.json.tmp-4243-ee11ff22" in out and "tightened to 0700" in out
    assert "rt-new" not in out and "at-new" not in out


def test_sse_parsing_is_split_independent_and_bounded():
    import random
    data = b"".join(b"event: e%d\r\ndata: {\"i\": %d}\ndata: second line\n\n: comment\n" % (i, i) for i in range(300))
    whole = llm_mux.SSEParser().feed(data)
    rng = random.Random(1)
    p, pieces, i = llm_mux.SSEParser(), [], 0
    while i < len(data):
        n = rng.randint(1, 40)
        pieces += p.feed(data[i:i + n])
        i += n
    assert pieces == whole and len(whole) == 300 and whole[5] == ("e5", '{"i": 5}\nsecond line')
    p = llm_mux.SSEParser()
    with pytest.raises(llm_mux.UpstreamError) as e:
        for _ in range(400):  # 25 MB without a newline
            p.feed(b"x" * 65536)
    assert e.value.kind == "too-large"


def test_an_endless_upstream_stream_is_cut_at_max_response_size(gateway, upstream):
    from fakes import Reply, openai_stream_events
    up = upstream(lambda r: Reply("sse", events=openai_stream_events(pieces=["word "] * 400)))
    gw = gateway(openai_provider_config(up.url) + "max-response-size: 4000\n")
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError) as e:
        for _ in c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                           stream=True):
            pass
    assert "max-response-size" in str(e.value)
    assert c.models.list().data  # and the gateway carries on


def test_an_event_stream_frame_with_valid_crcs_and_a_cut_off_header_block_is_an_upstream_error():
    import struct
    import zlib
    headers = bytes([11]) + b":event-type" + bytes([7]) + struct.pack("!H", 200) + b"short"  # says 200, has 5
    payload = b'{"content": "x"}'
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(headers))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + headers + payload
    frame = message + struct.pack("!I", zlib.crc32(message))
    with pytest.raises(llm_mux.UpstreamError) as e:
        llm_mux.AwsEventStream().feed(frame)
    assert e.value.kind == "protocol"
    cut = bytes([11]) + b":event-type" + bytes([7])  # the value type, then nothing
    total = 12 + len(cut) + 4
    prelude = struct.pack("!II", total, len(cut))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + cut
    with pytest.raises(llm_mux.UpstreamError):
        llm_mux.AwsEventStream().feed(message + struct.pack("!I", zlib.crc32(message)))


@pytest.mark.parametrize("body, says", [
    (b'{"model": "gpt-test", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    (b'{"model": "gpt-test", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}', "NaN is not JSON"),
    (b'{"model": "gpt-test", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
])
def test_json_that_is_not_quite_json_is_a_400_in_the_clients_shape(gateway, upstream, body, says):
    up = upstream()
    gw = gateway(openai_provider_config(up.url))
    req = urllib.request.Request(gw.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    import json
    err = json.loads(e.value.read())
    assert e.value.code == 400 and says in err["error"]["message"]
    ok = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "a pair is fine: 😀"}])  # sent as \\ud83d\\ude00
    assert ok.choices[0].message.content and up.requests[-1].json["messages"][0]["content"].endswith("😀")


def test_a_client_that_writes_its_whole_body_first_sees_the_413(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "max-request-size: 1048576\n")
    body = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "' + b"x" * (8 << 20) + b'"}]}'
    req = urllib.request.Request(gw.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:  # not a BrokenPipeError or ConnectionResetError
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and b"too large" in e.value.read()
    assert up.requests == []


def raw_exchange(gw, head, body=b"", read=True):
    import socket
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=20)
    s.sendall(head + body)
    out = b""
    while read and b"\r\n\r\n" not in out:
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    return s, out


def test_without_a_key_a_body_is_never_read_and_100_continue_never_sent(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\n")
    # 40 MB announced, nothing sent: the 401 comes at once (the server never waits for the body)
    s, out = raw_exchange(gw, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 41943040\r\nExpect: 100-continue\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 401") and b"100 Continue" not in out
    assert b'"type":"error"' in out.replace(b" ", b"") or b"authentication" in out  # Anthropic's shape
    s.close()
    # with the key, 100 Continue comes first
    s, out = raw_exchange(gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-gw\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 100 Continue")
    s.close()


def test_connections_and_buffered_bodies_are_capped(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\nmax-request-size: 1048576\n"
                 "server: {max-connections: 3, max-buffered-body: 1572864}\n")
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-gw\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
    first, _ = raw_exchange(gw, head, b"x" * 1000, read=False)  # holds 1 MB of budget while it trickles
    from harness import wait_until

    def second_refused():
        s, out = raw_exchange(gw, head, b"x" * 10)
        s.close()
        return out.startswith(b"HTTP/1.1 503") and b"max-buffered-body" in out
    wait_until(second_refused, what="the second large body refused")
    idle = [raw_exchange(gw, b"", read=False)[0] for _ in range(2)]  # with `first`: 3 connections open
    wait_until(lambda: raw_exchange(gw, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[1].startswith(b"HTTP/1.1 503"),
               what="a fourth connection refused")
    for s in idle + [first]:
        s.close()
    wait_until(lambda: raw_exchange(gw, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[1].startswith(b"HTTP/1.1 200"),
               what="connections accepted again")
    assert "server.max-connections" in gw.output()


def test_running_out_of_file_descriptors_is_one_warning_not_a_flood(tmp_path):
    import resource
    import socket
    from fakes import free_port
    from harness import wait_until
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: %d\nauth-dir: %s\n" % (port, tmp_path / "auth"))
    log_path = tmp_path / "log.txt"
    with open(str(log_path), "wb") as log_file:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", str(cfg)],
                                stdout=log_file, stderr=subprocess.STDOUT,
                                env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path)),
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    socks = []
    try:
        wait_until(lambda: b"listening on" in log_path.read_bytes(), what="the gateway")
        for _ in range(120):  # far more than 64 descriptors' worth
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_until(lambda: b"out of file descriptors" in log_path.read_bytes(), what="the warning")
        for s in socks:
            s.close()
        socks = []

        def metrics():
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            s.close()
            return out.decode()
        text = wait_until(lambda: "llm_mux_fd_exhaustion_total" in metrics() and metrics(), timeout=30,
                          what="serving again", ignore=(OSError,))
        count = [line for line in text.splitlines() if line.startswith("llm_mux_fd_exhaustion_total ")][0]
        assert int(float(count.split()[1])) > 0
        log_text = log_path.read_text()
        assert log_text.count("out of file descriptors") == 1 and "Traceback" not in log_text
        assert len(log_text.splitlines()) < 40
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)


def test_a_failure_of_the_gateways_own_is_never_the_credentials():
    gw = __import__("harness").GatewayThread(
        "providers:\n  - type: openai\n    base-url: http://127.0.0.1:1/v1\n    api-key: sk-x\n    models: [m]\n")
    try:
        cred = gw.cred("sk-x")
        route = gw.gateway.registry.resolve("m")[0]
        failure = llm_mux.UpstreamFailure(503, "the gateway is out of file descriptors", "server", "local")
        gw.gateway.router.cool(cred, "m", failure, gw.clock.now(), route.provider)
        assert cred.states == {} and cred.disabled is None and cred.until_all == 0
    finally:
        gw.stop()


def test_a_stuck_or_babbling_upstream_fails_over_instead_of_holding_the_request(gateway, upstream):
    import socket
    import threading
    from fakes import Reply, openai_stream_events

    def handler(r):
        if r.headers.get("authorization") == "Bearer k-stuck":
            return Reply("hang")
        return Reply("sse", events=openai_stream_events(pieces=("ok",)))
    up = upstream(handler)
    babbler = socket.socket()
    babbler.bind(("127.0.0.1", 0))
    babbler.listen(16)

    def babble():
        while True:
            try:
                conn, _ = babbler.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"garbage that is not HTTP at all")  # and then nothing: no CRLF, no close
    threading.Thread(target=babble, daemon=True).start()
    try:
        gw = gateway("response-header-timeout: 1\nrequest-retry: 3\nproviders:\n"
                     "  - type: openai\n    name: stuck\n    base-url: %s/v1\n    api-key: k-stuck\n    models: [m]\n"
                     "  - type: openai\n    name: babble\n    base-url: http://127.0.0.1:%d/v1\n    api-key: k-b\n"
                     "    models: [m]\n"
                     "  - type: openai\n    name: good\n    base-url: %s/v1\n    api-key: k-good\n    models: [m]\n"
                     "routing: {provider-priority: {stuck: 1, babble: 2, good: 3}}\n"
                     % (up.url, babbler.getsockname()[1], up.url))
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=60)
        chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "ok"
        out = gw.output()
        assert "no response headers within 1s" in out and "not HTTP" in out
    finally:
        babbler.close()


def test_an_upstream_that_echoes_another_credentials_secret_reveals_nothing(gateway, upstream, tmp_path):
    import json
    from fakes import Reply
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "claude-a.json").write_text(json.dumps({
        "type": "claude", "email": "a@x", "access_token": "at-OTHER-SECRET-0001", "refresh_token": "rt-OTHER-0002",
        "expired": "2099-01-01T00:00:00Z"}))
    # the upstream of key A echoes key B and the Claude account's tokens (a shared proxy, a verbose error page)
    up = upstream(lambda r: Reply(status=400, body={"error": {"message": "bad request; also tried sk-KEY-B-SECRET-77 "
                                                               "and at-OTHER-SECRET-0001 / rt-OTHER-0002",
                                                               "type": "invalid_request_error"}}))
    gw = gateway("auth-dir: %s\napi-keys: [sk-CLIENT-KEY-0042]\nproviders:\n  - type: openai\n    base-url: %s/v1\n"
                 "    api-keys: [sk-KEY-A-SECRET-11]\n    models: [m]\n  - type: openai\n    name: b\n"
                 "    base-url: http://127.0.0.1:1/v1\n    api-key: sk-KEY-B-SECRET-77\n    models: [other]\n"
                 % (auth, up.url))
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-CLIENT-KEY-0042", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}])
    seen = str(e.value.body) + gw.output()
    for secret in ("sk-KEY-B-SECRET-77", "at-OTHER-SECRET-0001", "rt-OTHER-0002", "sk-CLIENT-KEY-0042"):
        assert secret not in seen, secret
    assert "sk-K...T-77" in str(e.value.body)  # masked the usual way: ends kept to tell keys apart


def test_request_timeout_bounds_a_whole_upstream_answer(gateway, upstream):
    from fakes import Reply
    slow = ['{"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"}}]}',
            0.4] * 20  # a chunk every 0.4 s: never silent long enough for stream-timeout, but 8 s in all
    up = upstream(lambda r: Reply("sse", events=slow))
    gw = gateway(openai_provider_config(up.url) + "request-timeout: 2\nrequest-retry: 0\n")
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=60)
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                               stream=True):
            got.append(chunk)
    assert "request-timeout (2s)" in str(e.value)  # cut long before the upstream's 8 s


def _status_mb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_large_bodies_are_held_once_and_their_memory_is_given_back(gateway, upstream):
    """Eight 8 MB requests at once (two of them chunked): the body is moved once into its buffer, let go once
    parsed and written upstream in slices, so the process's peak (VmHWM) grows by well under 3.2× the bodies in
    flight (it was 4.7×: the channel's buffer, two slice copies, the head+body concatenation, the transport's copy),
    and once they are done the heap is given back (it used to stay 200 MB larger)."""
    import http.client
    import threading
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "api-keys: [sk-gw]\n")
    pid = gw.proc.pid
    assert gw.get_json("/health", {"Authorization": "Bearer sk-gw"})
    base = _status_mb(pid, "VmRSS")
    size, n = 8 << 20, 8
    errors = []

    def one(i):
        text = chr(ord("a") + i) * size
        body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": text}]}).encode()
        c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
        headers = {"Authorization": "Bearer sk-gw", "Content-Type": "application/json"}
        if i < 2:
            c.request("POST", "/v1/chat/completions", (body[k:k + 300000] for k in range(0, len(body), 300000)),
                      headers, encode_chunked=True)
        else:
            c.request("POST", "/v1/chat/completions", body, headers)
        r = c.getresponse()
        if r.status != 200:
            errors.append((r.status, r.read()[:200]))
        r.read()
        c.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = sorted(r.json["messages"][0]["content"][0] for r in up.requests if r.path.endswith("/chat/completions"))
    assert got == [chr(ord("a") + i) for i in range(n)]
    assert all(len(r.json["messages"][0]["content"]) == size for r in up.requests)
    peak = _status_mb(pid, "VmHWM")
    assert peak - base < 3.2 * n * size / (1 << 20), (base, peak)
    from harness import wait_until
    wait_until(lambda: _status_mb(pid, "VmRSS") < base + 16, what="memory given back (RSS %.0f MB, base %.0f MB)"
               % (_status_mb(pid, "VmRSS"), base))


def test_errors_the_server_answers_itself_come_in_the_routes_own_shape(gateway, upstream):
    """A 413 (and any other error the HTTP layer answers before an API handler runs, a handler crash's 500
    included: the same error page) is written in the format of the API its path belongs to."""
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "max-request-size: 1024\n")
    shapes = {"/v1/messages": lambda b: b["type"] == "error" and b["error"]["type"] == "request_too_large",
              "/v1beta/models/gpt-test:generateContent": lambda b: b["error"]["code"] == 413 and
              b["error"]["status"],
              "/api/chat": lambda b: isinstance(b["error"], str) and "too large" in b["error"],
              "/v1/chat/completions": lambda b: b["error"]["type"] == "invalid_request_error"}
    for path, shape in shapes.items():
        s, out = raw_exchange(gw, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 4096\r\n\r\n" % path.encode())
        while not out.endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
        s.close()
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), (path, head)
        assert shape(json.loads(body)), (path, body)
