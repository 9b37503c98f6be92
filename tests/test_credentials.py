"""Credential files in auth-dir and token refresh, with a Claude OAuth credential: a fake Anthropic API and a fake
OAuth token endpoint reached through upstream-overrides. Hot add/remove, refresh single flight (in one process and
across two processes sharing the auth dir), refresh on 401, rotated tokens written atomically before use."""
import asyncio
import json
import os
import stat
import threading
import time

import anthropic
import openai
import pytest

from harness import Gateway, wait_until
from fakes import FakeUpstream, Reply

MODEL = "claude-sonnet-4-5-20250929"


class FakeClaude:
    """api.anthropic.com and platform.claude.com in one server: tokens at-N are valid; `revoked` and `fail` script
    the token endpoint."""

    def __init__(self, delay=0.3):
        self.refreshes = []
        self.valid = {"at-good"}
        self.revoked = False
        self.fail = False
        self.delay = delay
        self.lock = threading.Lock()
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        if r.path == "/v1/oauth/token":
            body = r.json
            with self.lock:
                self.refreshes.append(body)
                n = len(self.refreshes)
            time.sleep(self.delay)  # widen the window in which concurrent refreshes would overlap
            if self.revoked:
                return Reply(status=400, body={"error": "invalid_grant", "error_description": "Refresh token revoked"})
            if self.fail:
                return Reply(status=500, body={"error": "server_error"})
            self.valid.add("at-%d" % n)
            return Reply(body={"access_token": "at-%d" % n, "refresh_token": "rt-%d" % n, "expires_in": 28800,
                               "token_type": "Bearer", "account": {"email_address": "me@example.com"}})
        if r.path.startswith("/v1/messages"):
            token = r.headers.get("authorization", "")[7:]
            if token not in self.valid:
                return Reply(status=401, body={"type": "error", "error": {"type": "authentication_error",
                                                                          "message": "OAuth token has expired"}})
            return Reply(body={"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                               "content": [{"type": "text", "text": "hi via " + token}], "stop_reason": "end_turn",
                               "usage": {"input_tokens": 3, "output_tokens": 2}})
        return Reply(status=404, body={"error": "no " + r.path})

    def config(self):
        return ('upstream-overrides:\n  "https://api.anthropic.com": "%s"\n  "https://platform.claude.com": "%s"\n'
                % (self.up.url, self.up.url))


@pytest.fixture
def claude():
    f = FakeClaude()
    yield f
    f.up.stop()


def write_cred(auth_dir, name="claude-me@example.com.json", access="at-good", refresh="rt-0", expires_in=3600 * 8):
    os.makedirs(auth_dir, exist_ok=True)
    path = os.path.join(auth_dir, name)
    with open(path, "w") as f:
        json.dump({"type": "claude", "email": "me@example.com", "access_token": access, "refresh_token": refresh,
                   "expired": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expires_in)),
                   "last_refresh": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
    os.chmod(path, 0o600)
    return path


def ask(gw, text="hello", system=None):
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=20)
    kw = {"system": system} if system else {}
    return c.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": text}], **kw)


def test_a_dropped_in_file_is_used_within_2s_and_a_deleted_one_is_not(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    os.makedirs(auth)
    gw = gateway(claude.config() + "auth-dir: %s\n" % auth)
    ids = lambda: [m.id for m in openai.OpenAI(base_url=gw.url + "/v1", api_key="k").models.list()]
    assert MODEL not in ids()
    write_cred(auth)
    wait_until(lambda: MODEL in ids(), what="the dropped-in file to be used")
    r = ask(gw, system="Answer in French.")
    assert r.content[0].text == "hi via at-good"
    sent = [q for q in claude.up.requests if q.path.startswith("/v1/messages")][-1]
    assert sent.path == "/v1/messages?beta=true"
    assert sent.headers["authorization"] == "Bearer at-good" and sent.headers["x-app"] == "cli"
    assert "oauth-2025-04-20" in sent.headers["anthropic-beta"]
    system = sent.json["system"]
    assert system[0]["text"].startswith("You are Claude Code") and system[1]["text"] == "Answer in French."
    os.rename(os.path.join(auth, "claude-me@example.com.json"), os.path.join(auth, "claude-other.json"))
    wait_until(lambda: "added claude-other.json" in gw.output(), what="the rename to be noticed")
    assert ask(gw).content[0].text == "hi via at-good"  # renamed: still there under its new name
    os.unlink(os.path.join(auth, "claude-other.json"))
    wait_until(lambda: MODEL not in ids(), what="the deleted file to be dropped")
    with pytest.raises(anthropic.NotFoundError):
        ask(gw)


def test_50_concurrent_requests_on_an_expired_token_cause_one_refresh(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    path = write_cred(auth, access="at-old", refresh="rt-old", expires_in=-60)
    gw = gateway(claude.config() + "auth-dir: %s\n" % auth)

    async def burst():
        c = anthropic.AsyncAnthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=30)
        rs = await asyncio.gather(*[c.messages.create(model=MODEL, max_tokens=10, messages=[
            {"role": "user", "content": "q%d" % i}]) for i in range(50)])
        await c.close()
        return rs
    results = asyncio.run(burst())
    assert len(claude.refreshes) == 1
    assert claude.refreshes[0] == {"client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
                                   "grant_type": "refresh_token", "refresh_token": "rt-old"}
    assert {r.content[0].text for r in results} == {"hi via at-1"}
    saved = json.load(open(path))
    assert saved["access_token"] == "at-1" and saved["refresh_token"] == "rt-1"  # the rotated token is kept
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [n for n in os.listdir(auth) if ".tmp-" in n]


def test_two_processes_sharing_the_auth_dir_refresh_once(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    write_cred(auth, access="at-old", refresh="rt-old", expires_in=-60)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # Start both at once so that their start-up sweeps and first requests race for the expired token.
    a = Gateway(tmp_path / "a", claude.config() + "auth-dir: %s\n" % auth, wait=False)
    b = Gateway(tmp_path / "b", claude.config() + "auth-dir: %s\n" % auth, wait=False)
    a.wait_ready()
    b.wait_ready()
    try:
        out = {}

        def hit(gw, name):
            out[name] = ask(gw).content[0].text
        threads = [threading.Thread(target=hit, args=(g, n)) for g, n in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Whichever process refreshed, the other one waited on the lock and adopted the new token, saw the
        # rewritten file, or started after it: one refresh call in all, and both serve with the new token.
        assert len(claude.refreshes) == 1, claude.refreshes
        assert out == {"a": "hi via at-1", "b": "hi via at-1"}
    finally:
        a.stop()
        b.stop()


def test_a_401_triggers_one_refresh_and_one_retry(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    write_cred(auth, access="at-stale", refresh="rt-0")  # not expired by its date, but the server rejects it
    gw = gateway(claude.config() + "auth-dir: %s\n" % auth)
    assert ask(gw).content[0].text == "hi via at-1"
    assert len(claude.refreshes) == 1
    tokens = [q.headers["authorization"] for q in claude.up.requests if q.path.startswith("/v1/messages")]
    assert tokens == ["Bearer at-stale", "Bearer at-1"]


def test_a_revoked_refresh_token_disables_the_credential(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    write_cred(auth, access="at-old", refresh="rt-dead", expires_in=-60)
    claude.revoked = True
    gw = gateway(claude.config() + "auth-dir: %s\n" % auth)
    with pytest.raises(anthropic.APIStatusError):
        ask(gw)
    assert "disabled: refresh token revoked" in gw.output()
    ask_count = len(claude.refreshes)
    with pytest.raises(anthropic.APIStatusError):
        ask(gw)
    assert len(claude.refreshes) == ask_count  # never retried


def test_a_failed_refresh_backs_off_and_is_reported(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    write_cred(auth, access="at-old", refresh="rt-0", expires_in=-60)
    claude.fail = True
    gw = gateway(claude.config() + "auth-dir: %s\n" % auth)
    for _ in range(3):
        with pytest.raises(anthropic.APIStatusError):
            ask(gw)
    assert len(claude.refreshes) == 1  # backing off: not hammered on every request
    assert "refresh failed" in gw.output() and "next try in 60s" in gw.output()


def test_background_refresh_before_expiry(gateway, claude, tmp_path, monkeypatch):
    auth = str(tmp_path / "auth")
    path = write_cred(auth, access="at-good", refresh="rt-0", expires_in=3600)  # within the 4 h lead
    gw = gateway(claude.config() + "auth-dir: %s\n" % auth)
    wait_until(lambda: claude.refreshes, what="the background refresh")
    # the new token is written before it is used: once it is in the file, the refresh is complete
    wait_until(lambda: json.load(open(path))["access_token"] == "at-1", what="the refreshed token on disk")
    assert len(claude.refreshes) == 1


def test_broken_credential_files_are_reported_not_fatal(gateway, claude, tmp_path):
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "broken.json").write_text("{not json")
    (auth / "notype.json").write_text("{}")
    write_cred(str(auth))
    gw = gateway(claude.config() + "auth-dir: %s\n" % auth)
    assert ask(gw).content[0].text == "hi via at-good"
    assert "broken.json skipped: not valid JSON" in gw.output() and "notype.json skipped: has no 'type'" in gw.output()


def test_an_auth_file_drop_takes_effect_while_a_stream_is_in_flight(gateway, claude, upstream, tmp_path):
    from harness import openai_provider_config
    from fakes import openai_stream_events
    paced = []
    for e in openai_stream_events(tuple("abcdefgh"), usage=False):
        paced += [e, 0.2]
    up = upstream(lambda r: Reply("sse", events=paced))
    auth = str(tmp_path / "auth")
    os.makedirs(auth)
    gw = gateway(openai_provider_config(up.url) + claude.config() + "auth-dir: %s\n" % auth)
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=30)
    got = []
    started = threading.Event()

    def consume():
        for chunk in c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}],
                                               stream=True):
            started.set()
            got.extend(ch.delta.content or "" for ch in chunk.choices)
    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(10)
    write_cred(auth)

    def served():
        try:
            return ask(gw).content[0].text == "hi via at-good"
        except anthropic.NotFoundError:
            return False
    wait_until(served, what="the dropped-in file to serve while the stream runs")
    t.join(20)
    assert "".join(got) == "abcdefgh"


def test_oauth_excluded_models_hide_models_of_file_credentials_and_reload(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    write_cred(auth)
    gw = gateway(claude.config() + "auth-dir: %s\noauth-excluded-models:\n  claude: [\"claude-3-*\", \"*opus-4-1*\"]\n"
                 % auth)
    ids = lambda: sorted(m.id for m in openai.OpenAI(base_url=gw.url + "/v1", api_key="k").models.list())
    listed = ids()
    assert MODEL in listed and "claude-opus-4-5-20251101" in listed
    assert not [m for m in listed if m.startswith("claude-3-") or "opus-4-1" in m]
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.create(
            model="claude-3-7-sonnet-20250219", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    text = open(gw.config_path).read().replace('[\"claude-3-*\", \"*opus-4-1*\"]', '[\"*sonnet*\"]')
    with open(gw.config_path, "w") as f:
        f.write(text)
    wait_until(lambda: MODEL not in ids(), what="the reloaded exclusions")
    assert "claude-3-7-sonnet-20250219" not in ids() and "claude-3-5-haiku-20241022" in ids()


def test_claude_5h_window_cools_the_account_until_the_reset(gateway, claude, tmp_path):
    auth = str(tmp_path / "auth")
    write_cred(auth)
    reset = int(time.time()) + 3 * 3600
    original = claude.handle

    def limited(r):
        if r.path.startswith("/v1/messages"):
            return Reply(status=429, body={"type": "error", "error": {"type": "rate_limit_error",
                                                                      "message": "This request would exceed your limit"}},
                         headers={"anthropic-ratelimit-unified-5h-status": "rejected",
                                  "anthropic-ratelimit-unified-5h-reset": str(reset)})
        return original(r)
    claude.up.handler = limited
    gw = gateway(claude.config() + "auth-dir: %s\nrequest-retry: 0\nmax-retry-interval: 0\n" % auth)
    with pytest.raises(anthropic.RateLimitError):
        ask(gw)
    n = len(claude.up.requests)
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model="claude-opus-4-5-20251101", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert len(claude.up.requests) == n  # every model of the account waits for the window to reset
    assert abs(int(e.value.response.headers["retry-after"]) - 3 * 3600) <= 5
