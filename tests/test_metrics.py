"""/metrics in the Prometheus text format, read with prometheus_client's own parser: attempts by provider, model,
format, outcome and client-key name; durations and time to first byte; tokens by kind; errors by class;
credential health; the process. Free on loopback, a client key from elsewhere; no secret in any label."""
import urllib.request

import pytest

import openai
from prometheus_client.parser import text_string_to_metric_families

from fakes import Reply, openai_completion
from harness import GatewayThread, openai_provider
from fakes import FakeUpstream


def scrape(gw):
    text = urllib.request.urlopen(gw.url + "/metrics", timeout=10).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def sample(families, name, **labels):
    for fam in families.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_metrics_count_what_the_calls_did():
    state = {"fail": False}
    up = FakeUpstream(lambda r: Reply(status=503, body={"error": {"message": "busy"}}) if state["fail"] else
                      Reply(body=openai_completion())).start()
    gw = GatewayThread("api-keys: [sk-client-secret-1, sk-client-secret-2]\nrequest-retry: 0\n"
                       "max-retry-interval: 0\nproviders:\n" + openai_provider(up.url, ["sk-upstream-secret"]),
                       fake_clock=False)
    try:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client-secret-2", max_retries=0)
        for _ in range(3):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        state["fail"] = True
        try:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        except openai.APIStatusError:
            pass
        families, text = scrape(gw)
        assert sample(families, "llm_mux_requests_total", provider="p", model="m", format="openai", outcome="ok",
                      key="key-2") == 3
        assert sample(families, "llm_mux_requests_total", outcome="failed") == 1
        assert sample(families, "llm_mux_upstream_errors_total", provider="p", **{"class": "transient"}) == 1
        assert sample(families, "llm_mux_request_duration_seconds_count", provider="p", model="m") == 4
        assert sample(families, "llm_mux_time_to_first_byte_seconds_count", provider="p", model="m") == 4
        assert sample(families, "llm_mux_tokens_total", provider="p", model="m", kind="output") == 21
        assert sample(families, "llm_mux_tokens_total", kind="cache_read") == 9
        assert sample(families, "llm_mux_credential_usable", provider="p") == 0  # cooling after the 503
        assert sample(families, "llm_mux_credential_cooling_seconds", provider="p") > 0
        assert sample(families, "llm_mux_in_flight_requests", provider="p") == 0
        assert sample(families, "llm_mux_process_resident_memory_bytes") > 0
        assert sample(families, "llm_mux_process_open_fds") > 0
        assert "secret" not in text
    finally:
        gw.stop()
        up.stop()


def test_metrics_are_served_without_a_key_on_loopback_only():
    gw = GatewayThread("api-keys: [sk-client]\n", fake_clock=False)
    try:
        families, _ = scrape(gw)  # 127.0.0.1: no key needed
        assert "llm_mux_requests" in families
    finally:
        gw.stop()


def test_remote_scrapers_need_the_management_key():
    import llm_mux
    gw = GatewayThread("api-keys: [sk-client]\nremote-management: {secret-key: mk-123}\n", fake_clock=False)
    try:
        app = llm_mux.App(gw.gateway)

        def remote(headers):
            req = llm_mux.Request("GET", "/metrics", (1, 1), llm_mux.Headers(headers), "192.0.2.7")
            return gw.run(app(req))
        assert remote([]).status == 401
        assert remote([("authorization", "Bearer sk-client")]).status == 401  # a client key is not enough
        ok = remote([("x-management-key", "mk-123")])
        assert ok.status == 200 and b"llm_mux_requests_total" in ok.body
    finally:
        gw.stop()


@pytest.mark.parametrize("mode, local, remote", [("always", 401, 401), ("none", 200, 200), ("loopback", 200, 401)])
def test_who_may_scrape_is_configurable(mode, local, remote):
    import llm_mux
    gw = GatewayThread("remote-management: {secret-key: mk-123}\nmetrics-auth: %s\n" % mode, fake_clock=False)
    try:
        app = llm_mux.App(gw.gateway)

        def status(peer):
            return gw.run(app(llm_mux.Request("GET", "/metrics", (1, 1), llm_mux.Headers(), peer))).status
        assert (status("127.0.0.1"), status("192.0.2.7")) == (local, remote)
    finally:
        gw.stop()
