"""GET /v1/management/usage and usage-statistics-enabled, behind the management key of gateway.md §5.1: every
figure scoped to the period asked (`to` honoured), filters, cost, the {"data", "meta"} envelope."""
import json
import signal
import urllib.error
import urllib.request

import openai
import pytest

from fakes import Reply, openai_completion
from harness import openai_provider_config, wait_until

KEY = "mgmt-secret-key-123"


def get(gw, path, key=KEY, method="GET", body=None):
    headers = {"Authorization": "Bearer " + key} if key else {}
    req = urllib.request.Request(gw.url + "/v1/management" + path, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def gw(gateway, upstream):
    up = upstream(lambda r: Reply(body=openai_completion(usage={"prompt_tokens": 100, "completion_tokens": 10,
                                                                "total_tokens": 110})))
    g = gateway(openai_provider_config(up.url, keys=("k1", "k2")) +
                "remote-management: {secret-key: %s}\npricing:\n  gpt-test: {input: 1, output: 2}\n" % KEY)
    c = openai.OpenAI(base_url=g.url + "/v1", api_key="k", max_retries=0)
    for _ in range(3):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    wait_until(lambda: get(g, "/usage")[1]["data"]["summary"]["total_requests"] == 3, what="the rows")
    return g


def test_usage_summary_groups_and_envelope(gw):
    status, body = get(gw, "/usage")
    assert status == 200 and body["meta"]["version"] and body["meta"]["timestamp"]
    data = body["data"]
    s = data["summary"]
    assert (s["total_requests"], s["success_count"], s["failure_count"]) == (3, 3, 0)
    assert s["tokens"]["input"] == 300 and s["tokens"]["output"] == 30
    assert s["cost_usd"] == pytest.approx(3 * (100 * 1 + 10 * 2) / 1e6)
    assert data["by_provider"]["fake"]["requests"] == 3
    assert sum(a["requests"] for a in data["by_account"].values()) == 3
    assert data["by_model"]["gpt-test (fake)"]["requests"] == 3
    assert data["timeline"]["by_day"][0]["requests"] == 3


def test_every_figure_is_scoped_to_the_period_and_filters(gw):
    _, body = get(gw, "/usage?to=2001-01-01")
    assert body["data"]["summary"]["total_requests"] == 0 and body["data"]["period"]["to"] == "2001-01-01T23:59:59Z"
    _, body = get(gw, "/usage?provider=nope")
    assert body["data"]["summary"]["total_requests"] == 0
    _, body = get(gw, "/usage?days=1&model=gpt-test")
    assert body["data"]["summary"]["total_requests"] == 3
    status, body = get(gw, "/usage?from=yesterday")
    assert status == 400 and body["code"] == "INVALID_REQUEST"


def test_the_management_key_is_required(gw):
    status, body = get(gw, "/usage", key=None)
    assert status == 401 and (body["code"], body["error"]) == ("UNAUTHORIZED", "missing management key")
    status, body = get(gw, "/usage", key="wrong")
    assert status == 401 and body["error"] == "invalid management key"


def test_without_a_configured_key_every_call_is_403(gateway, upstream):
    g = gateway(openai_provider_config(upstream().url))
    status, body = get(g, "/usage")
    assert status == 403 and body["error"].startswith("management key not configured")


def test_recording_can_be_switched_off_at_once(gw):
    status, body = get(gw, "/usage-statistics-enabled", method="PUT", body={"value": False})
    assert status == 200 and body["data"] == {"usage-statistics-enabled": False}
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(20)
    import sqlite3
    assert sqlite3.connect(str(gw.dir / "usage.db")).execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == 3


def test_a_bad_toggle_body_is_a_400(gw):
    status, body = get(gw, "/usage-statistics-enabled", method="PUT", body={"value": "yes"})
    assert status == 400 and body["code"] == "INVALID_REQUEST"
    assert get(gw, "/usage-statistics-enabled")[1]["data"] == {"usage-statistics-enabled": True}
