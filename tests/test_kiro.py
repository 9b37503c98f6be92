"""Kiro: the AWS binary event stream decoded by hand (checked with frames from an independent encoder, corrupted and
split ones included), requests shaped as conversationState, both refresh readings, and the Kiro IDE token import."""
import binascii
import json
import os
import struct
import subprocess
import sys
import time

import anthropic
import openai
import pytest

import llm_mux
from harness import ROOT
from fakes import FakeUpstream, Reply

LLM_MUX = os.path.join(ROOT, "llm_mux.py")


def header(name, value):
    n = name.encode()
    if isinstance(value, str):
        v = value.encode()
        return bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v
    if isinstance(value, bool):
        return bytes([len(n)]) + n + (b"\x00" if value else b"\x01")
    return bytes([len(n)]) + n + b"\x04" + struct.pack(">i", value)


def frame(payload, event="assistantResponseEvent", message_type="event", extra=()):
    """An AWS event-stream message, written from the format description (not from llm_mux's code)."""
    hdrs = header(":message-type", message_type) + header(":event-type", event) + \
        header(":content-type", "application/json") + b"".join(header(k, v) for k, v in extra)
    body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
    total = 12 + len(hdrs) + len(body) + 4
    prelude = struct.pack(">II", total, len(hdrs))
    prelude += struct.pack(">I", binascii.crc32(prelude) & 0xFFFFFFFF)
    msg = prelude + hdrs + body
    return msg + struct.pack(">I", binascii.crc32(msg) & 0xFFFFFFFF)


STREAM = (frame({"content": "Hel"}) + frame({"content": "lo"}, extra=[("flag", True), ("n", 7)]) +
          frame({"toolUseId": "tu-1", "name": "get_weather", "input": "{\"city\":"}, "toolUseEvent") +
          frame({"toolUseId": "tu-1", "name": "get_weather", "input": "\"Paris\"}"}, "toolUseEvent") +
          frame({"toolUseId": "tu-1", "name": "get_weather", "stop": True}, "toolUseEvent") +
          frame({"inputTokens": 12, "outputTokens": 6}, "meteringEvent"))


def test_decoder_reads_independently_encoded_frames_whole_and_split():
    whole = llm_mux.AwsEventStream().feed(STREAM)
    p = llm_mux.AwsEventStream()
    split = []
    for i in range(len(STREAM)):
        split += p.feed(STREAM[i:i + 1])
    assert split == whole and p.finish() == []
    assert [e for e, _ in whole] == ["assistantResponseEvent"] * 2 + ["toolUseEvent"] * 3 + ["meteringEvent"]
    assert json.loads(whole[1][1]) == {"content": "lo"}


@pytest.mark.parametrize("where", [9, 30, -2])
def test_corrupt_frames_are_errors_never_skipped(where):
    bad = bytearray(frame({"content": "x"}))
    bad[where] ^= 0xFF
    with pytest.raises(llm_mux.UpstreamError) as e:
        llm_mux.AwsEventStream().feed(bytes(bad))
    assert "CRC" in e.value.message or "lengths" in e.value.message


def test_truncated_stream_and_exception_frames():
    p = llm_mux.AwsEventStream()
    p.feed(frame({"content": "x"})[:-3])
    with pytest.raises(llm_mux.UpstreamError):
        p.finish()
    out = llm_mux.AwsEventStream().feed(frame(b"{}", "x", "exception", [(":exception-type", "ThrottlingException")]))
    assert out[0][0] == "error" and "ThrottlingException" in out[0][1]


class FakeKiro:
    def __init__(self, corrupt=False):
        self.requests, self.refreshes = [], []
        self.corrupt = corrupt
        self.json_refused = False
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        if r.path == "/generateAssistantResponse":
            self.requests.append(r)
            body = STREAM
            if self.corrupt:
                body = frame({"content": "Hel"}) + b"\x00\x00\x00\x20" + b"\x00" * 28
            return Reply("raw", body=body, headers={"Content-Type": "application/vnd.amazon.eventstream"})
        if r.path == "/refreshToken":
            self.refreshes.append(("social", r.json))
            return Reply(body={"accessToken": "kiro-new", "refreshToken": "rt-new", "expiresIn": 3600,
                               "profileArn": "arn:aws:codewhisperer:us-east-1:1:profile/P"})
        if r.path == "/token":
            if r.headers.get("content-type", "").startswith("application/json"):
                self.refreshes.append(("json", r.json))
                if self.json_refused:
                    return Reply(status=400, body={"error": "invalid_request"})
            else:
                self.refreshes.append(("form", r.body.decode()))
            return Reply(body={"access_token": "kiro-iam", "refresh_token": "rt-iam", "expires_in": 3600})
        return Reply(status=404, body={"error": r.path})

    def config(self, auth):
        return ('auth-dir: %s\nupstream-overrides:\n  "https://codewhisperer.us-east-1.amazonaws.com": "%s"\n'
                '  "https://prod.us-east-1.auth.desktop.kiro.dev": "%s"\n  "https://oidc.us-east-1.amazonaws.com": "%s"\n'
                % (auth, self.up.url, self.up.url, self.up.url))


def write_kiro(auth, **kw):
    os.makedirs(auth, exist_ok=True)
    meta = {"type": "kiro", "access_token": "kiro-at", "refresh_token": "rt", "region": "us-east-1",
            "auth_method": "social", "profile_arn": "arn:aws:codewhisperer:us-east-1:1:profile/P",
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))}
    meta.update(kw)
    path = os.path.join(auth, "kiro-1.json")
    with open(path, "w") as f:
        json.dump(meta, f)
    return path


def test_kiro_requests_and_event_stream_answers(gateway, tmp_path):
    k = FakeKiro()
    try:
        auth = str(tmp_path / "auth")
        write_kiro(auth)
        gw = gateway(k.config(auth))
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        r = c.chat.completions.create(model="claude-sonnet-4-5", messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "weather?"}],
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
        m = r.choices[0].message
        assert m.content == "Hello" and m.tool_calls[0].function.name == "get_weather"
        assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
        assert r.choices[0].finish_reason == "tool_calls" and r.usage.prompt_tokens == 12
        q = k.requests[-1]
        assert q.headers["authorization"] == "Bearer kiro-at" and q.headers["x-amzn-kiro-agent-mode"] == "vibe"
        cs = q.json["conversationState"]
        assert q.json["profileArn"].endswith("profile/P") and cs["chatTriggerType"] == "MANUAL"
        cur = cs["currentMessage"]["userInputMessage"]
        assert cur["content"] == "weather?" and cur["modelId"] == "CLAUDE_SONNET_4_5_20250929_V1_0"
        assert cur["userInputMessageContext"]["tools"][0]["toolSpecification"]["name"] == "get_weather"
        hist = cs["history"]
        assert hist[0]["userInputMessage"]["content"] == "Be brief.\n\nhi"
        assert hist[1]["assistantResponseMessage"]["content"] == "hello"
        with anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.stream(
                model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "x"}]) as s:
            final = s.get_final_message()
        assert [b.type for b in final.content] == ["text", "tool_use"] and final.stop_reason == "tool_use"
    finally:
        k.up.stop()


def test_a_corrupt_frame_ends_the_stream_with_an_error(gateway, tmp_path):
    k = FakeKiro(corrupt=True)
    try:
        auth = str(tmp_path / "auth")
        write_kiro(auth)
        gw = gateway(k.config(auth))
        with pytest.raises(anthropic.APIStatusError) as e:
            with anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.stream(
                    model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "x"}]) as s:
                for _ in s:
                    pass
        assert "event stream" in str(e.value) or "CRC" in str(e.value)
    finally:
        k.up.stop()


@pytest.mark.parametrize("method, json_refused, expected", [
    ("social", False, [("social", {"refreshToken": "rt"})]),
    ("iam", False, [("json", {"grantType": "refresh_token", "refreshToken": "rt", "clientId": "cid",
                              "clientSecret": "cs"})]),
    ("iam", True, None),
])
def test_kiro_refresh_both_readings(gateway, tmp_path, method, json_refused, expected):
    k = FakeKiro()
    k.json_refused = json_refused
    try:
        auth = str(tmp_path / "auth")
        path = write_kiro(auth, auth_method=method, client_id="cid", client_secret="cs", expires_at="2020-01-01T00:00:00Z")
        gw = gateway(k.config(auth))
        openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}])
        if expected:
            assert k.refreshes == expected
        else:  # the documented JSON body was refused: llm-mux's form body is tried next
            assert [kind for kind, _ in k.refreshes] == ["json", "form"]
            assert "grant_type=refresh_token" in k.refreshes[1][1]
        saved = json.load(open(path))
        assert saved["access_token"] in ("kiro-new", "kiro-iam")
        assert k.requests[-1].headers["authorization"] == "Bearer " + saved["access_token"]
    finally:
        k.up.stop()


def test_login_kiro_imports_the_kiro_ide_token(tmp_path):
    home = tmp_path / "home"
    cache = home / ".aws" / "sso" / "cache"
    cache.mkdir(parents=True)
    (cache / "kiro-auth-token.json").write_text(json.dumps({
        "accessToken": "aoa-1", "refreshToken": "aor-1", "expiresAt": "2030-01-01T00:00:00Z", "authMethod": "social",
        "provider": "Github", "profileArn": "arn:aws:codewhisperer:us-east-1:1:profile/X"}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\n" % (tmp_path / "auth"))
    run = lambda: subprocess.run([sys.executable, LLM_MUX, "login", "kiro", "--config", str(cfg)], capture_output=True,
                                 text=True, env=dict(os.environ, HOME=str(home)))
    out = run()
    assert out.returncode == 0, out.stderr
    files = list((tmp_path / "auth").glob("kiro-*.json"))
    saved = json.loads(files[0].read_text())
    assert saved["refresh_token"] == "aor-1" and saved["profile_arn"].endswith("/X") and saved["auth_method"] == "social"
    again = run()  # the same refresh token is not imported twice
    assert again.returncode == 1 and "skipped Kiro IDE" in again.stdout
