"""The management API of gateway.md §5 against a real gateway process: settings that persist and take effect at
once, write-back that keeps every untouched line, the hashed key, lists (api-keys, providers, exclusions), logs
and request logs, credential health and actions, quota windows, logins driven from the API, and bad input on
every endpoint (400 with a message, nothing half-applied, secrets never echoed)."""
import difflib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest

import llm_mux
from fakes import FakeUpstream, Reply, free_port, openai_completion
from harness import openai_provider_config, play_browser, wait_until

KEY = "mgmt-key-for-tests-0123"


def call(gw, method, path, body=None, key=KEY, raw=None, headers=None):
    h = {"X-Management-Key": key} if key else {}
    h.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None and "Content-Type" not in h:
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(gw.url + "/v1/management" + path, method=method, headers=h, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, text, ctype = e.code, e.read(), e.headers.get("content-type", "")
    if "json" in ctype:
        out = json.loads(text)
        return status, out.get("data", out) if isinstance(out, dict) and "meta" in out else out
    return status, text.decode()


def changed_lines(before, after):
    """The lines a write changed: (removed, added)."""
    removed, added = [], []
    for line in difflib.ndiff(before.splitlines(), after.splitlines()):
        if line.startswith("- "):
            removed.append(line[2:])
        elif line.startswith("+ "):
            added.append(line[2:])
    return removed, added


COMMENTED = """\
# My gateway. Hand-written; please keep my comments.
port: {port}

api-keys:
  - sk-client-alpha-0001   # laptop
  - 'sk-client-beta-0002'  # CI

# retries
request-retry: 3          # a trailing comment
debug: false

remote-management:
  allow-remote: false     # loopback only
  secret-key: "%s"
""" % KEY


@pytest.fixture
def up(upstream):
    return upstream(lambda r: Reply(body=openai_completion("ok")))


@pytest.fixture
def gw(gateway, up):
    return gateway(COMMENTED + openai_provider_config(up.url, keys=("sk-upstream-secret-9999",)))


def config_text(gw):
    with open(gw.config_path) as f:
        return f.read()


def test_the_plain_key_is_hashed_on_first_start_and_still_works(gw):
    text = config_text(gw)
    assert KEY not in text and "secret-key: \"scrypt$" in text
    assert "  allow-remote: false     # loopback only" in text  # the rest of the file as it was
    assert call(gw, "GET", "/debug") == (200, {"debug": False})
    status, body = call(gw, "GET", "/debug", key=None, headers={"Authorization": "Bearer " + KEY})
    assert status == 200
    status, body = call(gw, "GET", "/debug", key="wrong")
    assert status == 401 and body["error"] == "invalid management key" and body["code"] == "UNAUTHORIZED"


def test_a_setting_persists_keeping_every_other_line_and_applies_at_once(gw):
    before = config_text(gw)
    assert call(gw, "PUT", "/request-retry", {"value": 5}) == (200, {"request-retry": 5})
    after = config_text(gw)
    assert changed_lines(before, after) == (["request-retry: 3          # a trailing comment"],
                                            ["request-retry: 5          # a trailing comment"])
    assert call(gw, "GET", "/request-retry") == (200, {"request-retry": 5})
    assert call(gw, "GET", "/config")[1]["request-retry"] == 5  # the running config, not only the file
    assert call(gw, "PUT", "/quota-exceeded/switch-project", {"value": False}) == (200, {"switch-project": False})
    removed, added = changed_lines(after, config_text(gw))
    assert removed == [] and added == ["quota-exceeded:", "  switch-project: false"]
    assert call(gw, "PUT", "/proxy-url", {"value": "socks5://user:pw@127.0.0.1:1080"})[0] == 200
    assert "proxy-url set to \"socks5://user:xxxxx@127.0.0.1:1080\"" in gw.output() and "pw@" not in gw.output()
    assert call(gw, "DELETE", "/proxy-url") == (200, {"proxy-url": ""})


def test_bad_setting_bodies_are_400_and_change_nothing(gw):
    before = config_text(gw)
    for path, raw in [("/debug", b'{"value": "yes"}'), ("/debug", b"{not json"), ("/request-retry", b'{"value": true}'),
                      ("/request-retry", b'{"value": -1}'), ("/request-retry", b'{"value": 1000}'),
                      ("/proxy-url", b'{"value": "ftp://x"}'), ("/ws-auth", b""), ("/debug", b"[]")]:
        status, body = call(gw, "PUT", path, raw=raw)
        assert status == 400 and body["code"] == "INVALID_REQUEST" and body["error"], (path, raw, body)
    assert config_text(gw) == before


def test_config_yaml_shows_secrets_masked_and_a_put_keeps_them(gw):
    status, text = call(gw, "GET", "/config.yaml")
    assert status == 200
    assert "sk-client-alpha-0001" not in text and "sk-upstream-secret-9999" not in text
    assert "  - sk-c...0001   # laptop" in text and "'sk-c...0002'  # CI" in text  # quoting and comments kept
    edited = text.replace("debug: false", "debug: true")
    status, body = call(gw, "PUT", "/config.yaml", raw=edited.encode(), headers={"Content-Type": "application/yaml"})
    assert status == 200 and body == {"ok": True, "changed": ["debug"]}
    saved = config_text(gw)
    assert "sk-client-alpha-0001" in saved and "sk-upstream-secret-9999" in saved  # the masks became the secrets
    assert call(gw, "GET", "/debug") == (200, {"debug": True})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client-alpha-0001", max_retries=0)
    assert c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])


def test_a_bad_config_put_is_400_or_422_with_the_line_and_changes_nothing(gw):
    before = config_text(gw)
    status, body = call(gw, "PUT", "/config.yaml", raw=b"port: 1\ndebug: [unclosed\n")
    assert status == 400 and ":2:" in body["error"]
    status, body = call(gw, "PUT", "/config.yaml", raw=b"port: 1\nrequest-retry: many\n")
    assert status == 422 and body["code"] == "INVALID_CONFIG" and ":2:" in body["error"]
    status, body = call(gw, "PUT", "/config.yaml", raw=b"port: 1\nproviders:\n  - type: nosuch\n")
    assert status == 422 and "nosuch" in body["error"]
    assert config_text(gw) == before and call(gw, "GET", "/debug")[1] == {"debug": False}


def test_client_keys_with_limits_from_the_api(gw):
    status, body = call(gw, "POST", "/api-keys", {"name": "team", "rpm": 2, "models": ["gpt-*"]})
    assert status == 200 and body["key"].startswith("sk-mux-")
    secret = body["key"]
    assert secret not in config_text(gw) and "name: team" in config_text(gw)  # stored as its sha256 only
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    for _ in range(2):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    keys = call(gw, "GET", "/api-keys")[1]
    team = [k for k in keys["keys"] if k["name"] == "team"][0]
    assert team["rpm"] == 2 and team["usage"]["requests_last_minute"] == 2 and team["key"] == "(hashed)"
    assert all("sk-client-alpha-0001" != k for k in keys["api-keys"])  # masked
    assert call(gw, "DELETE", "/api-keys?name=team") == (200, {"status": "ok"})
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    for bad in ([{"key": "k", "colour": "red"}], {"items": []}, "x", [""], [{"name": "no key"}]):
        assert call(gw, "PUT", "/api-keys", bad)[0] == 400
    assert call(gw, "PATCH", "/api-keys", {"index": 9, "value": "k"})[0] == 400
    assert call(gw, "DELETE", "/api-keys?value=not-a-key")[0] == 404
    assert call(gw, "PATCH", "/api-keys", {"old": "sk-client-alpha-0001", "new": "sk-client-gamma-0003"}) == \
        (200, {"status": "ok"})
    assert "  - sk-client-gamma-0003   # laptop" in config_text(gw)


def test_providers_replace_patch_delete(gw, upstream):
    other = upstream(lambda r: Reply(body=openai_completion("from other")))
    status, body = call(gw, "GET", "/providers")
    assert body["providers"][0]["api-keys"][0]["key"] == "sk-u...9999"
    new = body["providers"] + [{"type": "openai", "name": "other", "base-url": other.url + "/v1", "api-key": "sk-o",
                                "models": [{"name": "other-model"}]}]
    assert call(gw, "PUT", "/providers", new) == (200, {"status": "ok"})
    assert "sk-upstream-secret-9999" in config_text(gw)  # the masked key sent back stayed the real one
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client-alpha-0001", max_retries=0)
    r = c.chat.completions.create(model="other-model", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "from other"
    status, body = call(gw, "PUT", "/providers", [{"type": "nosuch"}])
    assert status == 400 and "unknown provider type 'nosuch'" in body["error"]
    status, body = call(gw, "PUT", "/providers", [{"type": "openai", "name": "x"}])
    assert status == 400 and "base-url" in body["error"]  # validated as a whole config, with the reason
    assert call(gw, "DELETE", "/providers?index=x")[0] == 400
    assert call(gw, "DELETE", "/providers?index=1") == (200, {"status": "ok"})
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other-model", messages=[{"role": "user", "content": "x"}])


def test_oauth_excluded_models(gw):
    assert call(gw, "PUT", "/oauth-excluded-models", {"claude": ["*-haiku*", " "]}) == (200, {"status": "ok"})
    assert call(gw, "GET", "/oauth-excluded-models")[1] == {"oauth-excluded-models": {"claude": ["*-haiku*"]}}
    assert call(gw, "PATCH", "/oauth-excluded-models", {"provider": "codex", "models": ["gpt-5"]})[0] == 200
    assert call(gw, "PATCH", "/oauth-excluded-models", {"provider": "nosuch", "models": ["x"]})[0] == 400
    assert call(gw, "PATCH", "/oauth-excluded-models", {"provider": "gemini", "models": []})[0] == 404
    assert call(gw, "DELETE", "/oauth-excluded-models?provider=claude") == (200, {"status": "ok"})
    assert call(gw, "GET", "/oauth-excluded-models")[1] == {"oauth-excluded-models": {"codex": ["gpt-5"]}}
    assert call(gw, "DELETE", "/oauth-excluded-models")[0] == 400


def test_logs_from_memory_and_from_the_file(gw):
    status, body = call(gw, "GET", "/logs?limit=500")
    assert status == 200 and body["source"] == "memory" and any("listening on" in l for l in body["lines"])
    assert len(call(gw, "GET", "/logs?limit=2")[1]["lines"]) == 2
    assert call(gw, "GET", "/logs?limit=0")[0] == 400
    assert call(gw, "PUT", "/logging-to-file", {"value": True})[0] == 200
    log_file = os.path.join(str(gw.dir), "logs", "llm-mux.log")
    wait_until(lambda: os.path.exists(log_file), what="the log file")
    call(gw, "GET", "/debug")
    body = call(gw, "GET", "/logs")[1]
    assert body["source"] == "file" and any("GET /v1/management/debug" in l for l in body["lines"])
    assert call(gw, "DELETE", "/logs")[1]["success"] is True
    assert os.path.getsize(log_file) < 200


def test_request_log_writes_every_request_and_serves_the_failed_ones(gw):
    assert call(gw, "PUT", "/request-log", {"value": True}) == (200, {"request-log": True})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client-alpha-0001", max_retries=0)
    c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello there"}])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    files = call(gw, "GET", "/request-error-logs")[1]["files"]
    assert len(files) == 1 and files[0]["name"].startswith("error-")
    status, text = call(gw, "GET", "/request-error-logs/" + files[0]["name"])
    assert status == 200 and "POST /v1/chat/completions" in text and "no-such-model" in text and "-- response 404" in text
    assert "sk-client-alpha-0001" not in text and "sk-c...0001" in text  # the client's key masked
    all_logs = os.listdir(os.path.join(str(gw.dir), "logs", "requests"))
    assert len([n for n in all_logs if n.startswith("request-")]) == 1
    assert call(gw, "GET", "/request-error-logs/..%2Fconfig.yaml")[0] == 400
    assert call(gw, "GET", "/request-error-logs/nope.log")[0] == 404


def test_every_endpoint_answers_malformed_json_with_a_400(gw):
    before = config_text(gw)
    for method, path in [("PUT", "/api-keys"), ("PATCH", "/api-keys"), ("POST", "/api-keys"), ("PUT", "/providers"),
                         ("PATCH", "/providers"), ("PUT", "/oauth-excluded-models"),
                         ("PATCH", "/oauth-excluded-models"), ("POST", "/oauth/start"), ("POST", "/oauth/callback"),
                         ("PATCH", "/auth-files/status"), ("POST", "/vertex/import"), ("PUT", "/debug"),
                         ("PUT", "/usage-statistics-enabled")]:
        status, body = call(gw, method, path, raw=b'{"oops": ')
        assert status == 400 and isinstance(body["error"], str) and body["code"] == "INVALID_REQUEST", (path, body)
    assert call(gw, "GET", "/nope")[0] == 404
    assert config_text(gw) == before
    assert "sk-upstream-secret-9999" not in gw.output() and "sk-client-alpha-0001" not in gw.output()
