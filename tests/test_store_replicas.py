"""Several gateway processes on one PostgreSQL behave as one gateway: credentials (sealed at rest) seeded from a
replica's auth-dir and seen everywhere within a second, cooldowns shared, exactly one refresh of a rotating
token across replicas (also when the refreshing replica is killed mid-refresh), client-key limits that hold
across replicas, and `llm-mux import auth-dir`."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import anthropic
import openai
import psycopg
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

import llm_mux
from fakes import FakeUpstream, Reply, openai_completion
from harness import ROOT, Gateway, openai_provider_config, wait_until

MODEL = "claude-sonnet-4-5-20250929"
KEY = "4f1e0c9a8b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f"


def pg(url, sql, *args):
    with psycopg.connect(url.replace("?sslmode=disable", ""), autocommit=True) as c:
        return c.execute(sql, args).fetchall()


# -- encryption at rest -------------------------------------------------------------------------------------------
def test_sealed_box_matches_an_independent_hmac_ctr_and_detects_tampering():
    box = llm_mux.SealedBox(KEY)
    plain = json.dumps({"access_token": "at-secret", "refresh_token": "rt-secret" * 20}).encode()
    sealed = box.seal(plain)
    assert sealed.startswith("v1.") and b"secret" not in sealed.encode() and box.open(sealed) == plain
    assert box.seal(plain) != sealed  # a fresh nonce every time
    raw = llm_mux.b64url_decode(sealed[3:])
    nonce, body, tag = raw[:16], raw[16:-32], raw[-32:]

    def ref_hmac(key, data):  # the `cryptography` package's HMAC as the reference
        h = crypto_hmac.HMAC(key, hashes.SHA256())
        h.update(data)
        return h.finalize()
    stream = b"".join(ref_hmac(box.enc, nonce + i.to_bytes(8, "big")) for i in range(len(body) // 32 + 1))
    assert bytes(a ^ b for a, b in zip(body, stream)) == plain
    assert ref_hmac(box.mac, nonce + body) == tag
    flipped = bytearray(raw)
    flipped[20] ^= 1
    with pytest.raises(ValueError):
        box.open("v1." + llm_mux.base64.urlsafe_b64encode(bytes(flipped)).decode().rstrip("="))
    with pytest.raises(ValueError):
        llm_mux.SealedBox("another key").open(sealed)


# -- replicas -----------------------------------------------------------------------------------------------------
class FakeClaude:
    """api.anthropic.com and its token endpoint. Refresh tokens work once (a second use is `refresh_token_reused`,
    as the real endpoint answers); `hold` parks the next refresh until the test releases it, and `abandon` makes
    a parked refresh end without rotating anything (its caller was killed before the endpoint handled it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.live_refresh = {"rt-0"}
        self.valid = {"at-0"}
        self.refreshes = []  # (refresh token used, outcome)
        self.hold = None  # a threading.Event the next refresh waits for
        self.held = threading.Event()
        self.abandon = False
        self.up = FakeUpstream(self.handle).start()

    def handle(self, r):
        if r.path == "/v1/oauth/token":
            rt = r.json["refresh_token"]
            hold = self.hold
            if hold is not None:
                self.hold = None
                self.held.set()
                hold.wait(60)
                if self.abandon:
                    self.refreshes.append((rt, "abandoned"))
                    return Reply(status=503, body={"error": "gone"})
            with self.lock:
                if rt not in self.live_refresh:
                    self.refreshes.append((rt, "reused"))
                    return Reply(status=400, body={"error": "invalid_grant", "error_description":
                                                   "refresh_token_reused"})
                self.live_refresh.discard(rt)
                n = len([x for x in self.refreshes if x[1] == "ok"]) + 1
                self.refreshes.append((rt, "ok"))
                self.live_refresh.add("rt-%d" % n)
                self.valid.add("at-%d" % n)
            return Reply(body={"access_token": "at-%d" % n, "refresh_token": "rt-%d" % n, "expires_in": 28800,
                               "token_type": "Bearer", "account": {"email_address": "me@example.com"}})
        if r.path.startswith("/v1/messages"):
            token = r.headers.get("authorization", "")[7:]
            if token not in self.valid:
                return Reply(status=401, body={"type": "error", "error": {"type": "authentication_error",
                                                                          "message": "invalid token"}})
            return Reply(body={"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
                               "content": [{"type": "text", "text": "via " + token}], "stop_reason": "end_turn",
                               "usage": {"input_tokens": 3, "output_tokens": 2}})
        return Reply(status=404, body={"error": "no " + r.path})

    def config(self):
        return ('upstream-overrides:\n  "https://api.anthropic.com": "%s"\n  "https://platform.claude.com": "%s"\n'
                % (self.up.url, self.up.url))

    def ok_refreshes(self):
        return [x for x in self.refreshes if x[1] == "ok"]


def claude_file(expires_in, access="at-0", refresh="rt-0"):
    return {"type": "claude", "email": "me@example.com", "access_token": access, "refresh_token": refresh,
            "expired": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expires_in))}


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    os.chmod(path, 0o600)


def replicas(tmp_path, n, config, wait=True):
    out = []
    for i in range(n):
        d = tmp_path / ("r%d" % i)
        d.mkdir(exist_ok=True)
        out.append(Gateway(d, config + "auth-dir: %s\n" % (d / "auth"), wait=False))
    if wait:
        for g in out:
            g.wait_ready(30)
    return out


def store_config(url, extra="", poll="1s"):
    return "store:\n  postgres-url: %s\n  encryption-key: %s\n  poll-interval: %s\n%s" % (url, KEY, poll, extra)


def models(gw):
    return [m.id for m in openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).models.list()]


def status(gw):
    files = gw.get_json("/v1/management/auth-files", headers={"Authorization": "Bearer mk"})["data"]["files"]
    return files[0]["status"]


def ask(gw):
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0, timeout=60)
    return c.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}]).content[0].text


def stop_all(gws):
    for g in gws:
        g.stop()


def test_credentials_are_seeded_sealed_and_seen_by_every_replica(tmp_path, pgdb):
    claude = FakeClaude()
    write_json(str(tmp_path / "r0" / "auth" / "claude-me.json"), claude_file(8 * 3600))
    # polling every 10 minutes: what reaches the other replica during the test came by LISTEN/NOTIFY
    gws = replicas(tmp_path, 2, claude.config() + "remote-management: {secret-key: mk}\n" +
                   store_config(pgdb, poll="600s"))
    try:
        # r0 seeded the empty store from its auth-dir; r1 (empty auth-dir) has the credential from the store
        wait_until(lambda: MODEL in models(gws[1]), what="the seeded credential on the other replica")
        assert ask(gws[1]) == "via at-0"
        rows = pg(pgdb, "SELECT name, content FROM llm_mux_credentials")
        assert [r[0] for r in rows] == ["claude-me.json"]
        assert rows[0][1].startswith("v1.") and "at-0" not in rows[0][1] and "rt-0" not in rows[0][1]
        mirrored = tmp_path / "r1" / "auth" / "claude-me.json"
        assert json.load(open(str(mirrored)))["refresh_token"] == "rt-0" and oct(os.stat(str(mirrored)).st_mode
                                                                                     & 0o777) == "0o600"
        # disabled from one replica's management API: disabled on the other
        req = urllib.request.Request(gws[0].url + "/v1/management/auth-files/status", method="PATCH",
                                     data=json.dumps({"name": "claude-me.json", "disabled": True}).encode(),
                                     headers={"Authorization": "Bearer mk", "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        wait_until(lambda: status(gws[1]) == "disabled", what="the credential disabled on the other replica")
        req.data = json.dumps({"name": "claude-me.json", "disabled": False}).encode()
        urllib.request.urlopen(req, timeout=10).read()
        wait_until(lambda: status(gws[1]) != "disabled", what="the credential enabled again on the other replica")
        assert ask(gws[1]) == "via at-0"
        # a credential added on one replica reaches the other; a deleted one leaves it
        key_file = tmp_path / "r1" / "auth" / "openai-extra.json"
        up = FakeUpstream(lambda r: Reply(body=openai_completion())).start()
        write_json(str(key_file), {"type": "claude", "email": "two@example.com", "access_token": "at-0",
                                   "refresh_token": "rt-x", "expired": "2099-01-01T00:00:00Z"})
        wait_until(lambda: (tmp_path / "r0" / "auth" / "openai-extra.json").exists(), what="the added file on r0")
        os.unlink(str(tmp_path / "r0" / "auth" / "claude-me.json"))
        wait_until(lambda: not mirrored.exists(), what="the deletion to reach r1")
        assert pg(pgdb, "SELECT deleted FROM llm_mux_credentials WHERE name = 'claude-me.json'") == [(True,)]
        up.stop()
    finally:
        stop_all(gws)
        claude.up.stop()


def test_a_cooldown_seen_by_one_replica_is_seen_by_the_others(tmp_path, pgdb):
    up = FakeUpstream(lambda r: Reply(status=429, headers={"Retry-After": "120"},
                                      body={"error": {"message": "slow down", "type": "rate_limit"}})).start()
    gws = replicas(tmp_path, 2, openai_provider_config(up.url) + "request-retry: 0\n" +
                   store_config(pgdb, poll="600s"))  # no polling during the test: LISTEN/NOTIFY carries it
    try:
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=gws[0].url + "/v1", api_key="k", max_retries=0).chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "x"}])
        def cooling_on_r1():
            text = urllib.request.urlopen(gws[1].url + "/metrics", timeout=10).read().decode()
            line = [x for x in text.splitlines() if x.startswith("llm_mux_credential_usable{")]
            return line and line[0].endswith(" 0")
        wait_until(cooling_on_r1, what="the cooldown on the other replica")
        assert len(up.requests) == 1
        with pytest.raises(openai.RateLimitError):  # r1 does not try the cooling credential
            openai.OpenAI(base_url=gws[1].url + "/v1", api_key="k", max_retries=0).chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "x"}])
        assert len(up.requests) == 1
    finally:
        stop_all(gws)
        up.stop()


def flow_requests(gws, stop, results):
    def loop(g):
        while not stop.is_set():
            try:
                results.append((g.port, ask(g)))
            except Exception as e:  # any failure is counted, and fails the test
                results.append((g.port, e))
            time.sleep(0.05)
    threads = [threading.Thread(target=loop, args=(g,), daemon=True) for g in gws]
    for t in threads:
        t.start()
    return threads


def test_three_replicas_refresh_a_rotating_token_exactly_once(tmp_path, pgdb):
    claude = FakeClaude()
    # due 10 s after the start (refresh lead 60 s), while requests flow through all three replicas
    write_json(str(tmp_path / "r0" / "auth" / "claude-me.json"), claude_file(70))
    gws = replicas(tmp_path, 3, claude.config() + "refresh-lead: {claude: 60s}\n" + store_config(pgdb))
    try:
        wait_until(lambda: all(MODEL in models(g) for g in gws), what="the credential on every replica")
        stop, results = threading.Event(), []
        threads = flow_requests(gws, stop, results)
        wait_until(lambda: claude.ok_refreshes(), timeout=30, what="the refresh")
        assert len({r[0] for r in results if r[1] == "via at-0"}) == 3  # all three served before it came due
        wait_until(lambda: {r[1] for r in results[-30:]} == {"via at-1"} and
                   {r[0] for r in results if r[1] == "via at-1"} == {g.port for g in gws}, timeout=30,
                   what="every replica serving with the new token")
        stop.set()
        for t in threads:
            t.join(60)
        failures = [r for r in results if not isinstance(r[1], str)]
        assert failures == []
        assert claude.refreshes == [("rt-0", "ok")]  # exactly one refresh call, and no reused token
        stored = llm_mux.SealedBox(KEY).open(pg(pgdb, "SELECT content FROM llm_mux_credentials")[0][0])
        assert json.loads(stored)["refresh_token"] == "rt-1"
        for g in gws:
            assert json.load(open(os.path.join(str(g.dir), "auth", "claude-me.json")))["refresh_token"] == "rt-1"
    finally:
        stop_all(gws)
        claude.up.stop()


def test_the_refreshing_replica_killed_mid_refresh(tmp_path, pgdb):
    claude = FakeClaude()
    release = claude.hold = threading.Event()
    write_json(str(tmp_path / "r0" / "auth" / "claude-me.json"), claude_file(70))
    gws = replicas(tmp_path, 3, claude.config() + "refresh-lead: {claude: 60s}\n" +
                   store_config(pgdb, "  lock-timeout: 20s\n"))
    try:
        wait_until(lambda: all(MODEL in models(g) for g in gws), what="the credential on every replica")
        stop, results = threading.Event(), []
        threads = flow_requests(gws, stop, results)
        assert claude.held.wait(40), "no refresh started"
        assert len({r[0] for r in results}) == 3  # requests were flowing through all three
        holder = pg(pgdb, "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                          "WHERE l.locktype = 'advisory' AND l.granted")
        assert len(holder) == 1, holder
        pid = int(holder[0][0].split("/")[1])
        victim = next(g for g in gws if g.proc.pid == pid)
        survivors = [g for g in gws if g is not victim]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        killed_at = len(results)
        claude.abandon = True
        release.set()
        wait_until(lambda: claude.ok_refreshes(), timeout=40, what="another replica's refresh")
        # after the kill, requests go to the survivors only (a load balancer stops sending to a dead one)
        stop.set()
        for t in threads:
            t.join(60)
        stop2, later = threading.Event(), []
        threads = flow_requests(survivors, stop2, later)
        wait_until(lambda: len([r for r in later if r[1] == "via at-1"]) >= 6, timeout=30, what="the new token")
        stop2.set()
        for t in threads:
            t.join(60)
        survivor_ports = {g.port for g in survivors}
        failures = [r for r in results[:killed_at] + later if not isinstance(r[1], str) and r[0] in survivor_ports]
        assert failures == []
        assert claude.ok_refreshes() == [("rt-0", "ok")]
        assert [x for x in claude.refreshes if x[1] == "reused"] == []
        stored = json.loads(llm_mux.SealedBox(KEY).open(pg(pgdb, "SELECT content FROM llm_mux_credentials")[0][0]))
        assert (stored["access_token"], stored["refresh_token"]) == ("at-1", "rt-1")
    finally:
        claude.abandon = True
        release.set()
        stop_all(gws)
        claude.up.stop()


def test_rpm_holds_across_three_replicas(tmp_path, pgdb):
    up = FakeUpstream(lambda r: Reply(body=openai_completion())).start()
    gws = replicas(tmp_path, 3, openai_provider_config(up.url) + "api-keys:\n  - {key: sk-team, name: team, rpm: 5}\n"
                   + "remote-management: {secret-key: mk}\n" + store_config(pgdb))
    try:
        served = limited = 0
        for i in range(15):
            c = openai.OpenAI(base_url=gws[i % 3].url + "/v1", api_key="sk-team", max_retries=0)
            try:
                c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
                served += 1
            except openai.RateLimitError as e:
                limited += 1
                assert "5 requests per minute" in str(e)
        assert (served, limited) == (5, 10)
        assert len([r for r in up.requests if "chat" in r.path]) == 5
        # each replica's management view shows the key's use across all of them
        for g in gws:
            keys = g.get_json("/v1/management/api-keys", headers={"Authorization": "Bearer mk"})["data"]["keys"]
            assert keys[0]["usage"]["requests_last_minute"] == 5 and "sk-team" not in json.dumps(keys)
    finally:
        stop_all(gws)
        up.stop()


def test_import_auth_dir_and_a_store_that_is_down_at_start(tmp_path, pgdb):
    claude = FakeClaude()
    src = tmp_path / "exported"
    write_json(str(src / "claude-me.json"), claude_file(8 * 3600))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\n" % (tmp_path / "auth") + store_config(pgdb))
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "llm_mux.py"), "import", "auth-dir", str(src),
                           "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1 credential file(s)" in done.stdout and KEY not in done.stdout + done.stderr
    assert [r[0] for r in pg(pgdb, "SELECT name FROM llm_mux_credentials")] == ["claude-me.json"]
    (gw,) = replicas(tmp_path, 1, claude.config() + store_config(pgdb))
    try:
        wait_until(lambda: MODEL in models(gw), what="the imported credential")
        assert ask(gw) == "via at-0"
    finally:
        gw.stop()
    # PostgreSQL unreachable: the replica serves with the credentials it last mirrored
    down = "postgresql://postgres@127.0.0.1:1/x?sslmode=disable&connect_timeout=2"
    (gw,) = replicas(tmp_path, 1, claude.config() + store_config(down))
    try:
        assert ask(gw) == "via at-0"
        assert "unreachable" in gw.output() and KEY not in gw.output()
    finally:
        gw.stop()
        claude.up.stop()


def test_tokens_per_minute_and_budget_hold_across_replicas(tmp_path, pgdb):
    up = FakeUpstream(lambda r: Reply(body=openai_completion(usage={"prompt_tokens": 600, "completion_tokens": 400,
                                                                    "total_tokens": 1000}))).start()
    gws = replicas(tmp_path, 2, openai_provider_config(up.url) + "api-keys:\n"
                   "  - {key: sk-t, name: tokens, tpm: 1500}\n  - {key: sk-b, name: budget, max-budget: 0.015}\n"
                   "pricing:\n  gpt-test: {input: 10, output: 20}\n"  # 600 in + 400 out = 0.014 USD
                   "remote-management: {secret-key: mk}\n" + store_config(pgdb))

    def chat(g, key):
        openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "x"}])

    def used(g, name, field):
        keys = g.get_json("/v1/management/api-keys", headers={"Authorization": "Bearer mk"})["data"]["keys"]
        return next(k for k in keys if k["name"] == name)["usage"][field]
    try:
        for key, name, field, want in (("sk-t", "tokens", "tokens_last_minute", 2000),
                                       ("sk-b", "budget", "spent_usd", 0.028)):
            chat(gws[0], key)  # under the limit on replica 0
            chat(gws[1], key)  # still under it, counted on replica 1
            wait_until(lambda: used(gws[0], name, field) >= want, what="the spend counted in the store")
            for g in gws:  # over it now, whichever replica is asked
                with pytest.raises(openai.RateLimitError):
                    chat(g, key)
    finally:
        stop_all(gws)
        up.stop()
