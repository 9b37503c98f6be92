"""What a newcomer types works, and what goes wrong says how to fix it: base URLs with or without the version
segment; a wrong base URL is reported as the configuration error it is (naming the URL), without cooling."""
import anthropic
import openai
import pytest

from fakes import FakeUpstream, Reply
from harness import GatewayThread

ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
          "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
          "usage": {"input_tokens": 1, "output_tokens": 1}}


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
def test_an_anthropic_base_url_works_with_or_without_v1(suffix):
    up = FakeUpstream(lambda r: Reply(body=ANSWER) if r.path == "/v1/messages" else
                      Reply(status=404, body={"type": "error", "error": {"type": "not_found_error",
                                                                         "message": "Not Found"}})).start()
    gw = GatewayThread("providers:\n  - type: anthropic\n    base-url: %s%s\n    api-key: sk-ant\n" % (up.url, suffix))
    try:
        c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
        r = c.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=5,
                              messages=[{"role": "user", "content": "x"}])
        assert r.content[0].text == "hi" and up.requests[-1].path == "/v1/messages"
    finally:
        gw.stop()
        up.stop()


def test_a_wrong_base_url_is_a_configuration_error_not_a_cooldown(caplog):
    up = FakeUpstream(lambda r: Reply("raw", status=404, body="404 page not found",
                                      headers={"Content-Type": "text/plain"})).start()
    gw = GatewayThread("request-retry: 0\nproviders:\n  - type: openai\n    name: local\n    base-url: %s/wrong\n"
                       "    api-key: k\n    models: [m1]\n" % up.url)
    try:
        for _ in range(2):  # the second request reaches the upstream too: nothing was cooled
            with pytest.raises(openai.APIStatusError) as e:
                gw.chat(model="m1")
            assert e.value.status_code == 502
            assert "/wrong/chat/completions" in e.value.message and "base-url" in e.value.message
        assert len(up.requests) == 2
        assert gw.cred("k").cooling_until("m1") <= gw.clock.now()
    finally:
        gw.stop()
        up.stop()


def test_a_first_run_says_what_to_do_next(gateway, tmp_path):
    gw = gateway("")
    from harness import wait_until
    out = wait_until(lambda: "point tools at" in gw.output() and gw.output(), what="the start-up lines")
    assert "no models to serve yet" in out and "login <provider>" in out and "claude" in out
    assert "point tools at: OpenAI-compatible http://127.0.0.1:%d/v1" % gw.port in out
    assert "not supported yet" not in out  # every accepted setting now does what it says


def test_logging_to_file_writes_a_private_rotated_log(gateway, upstream, tmp_path):
    import os
    from harness import openai_provider_config
    up = upstream()
    gw = gateway(openai_provider_config(up.url), env={"LLM_MUX_LOGGING_TO_FILE": "true"})
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    path = tmp_path / "logs" / "llm-mux.log"  # `logs/` beside the auth dir
    from harness import wait_until
    wait_until(lambda: path.exists() and "POST /v1/chat/completions" in path.read_text(), what="the log file")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_debug_logs_one_line_per_upstream_call_without_secrets(gateway, upstream):
    from harness import openai_provider_config
    up = upstream()
    gw = gateway(openai_provider_config(up.url, keys=("sk-upstream-secret-42",)), args=("--debug",))
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}])
    from harness import wait_until
    line = wait_until(lambda: [ln for ln in gw.output().splitlines() if "upstream call POST" in ln],
                      what="the debug line")[0]
    assert "%s/v1/chat/completions -> 200 in" % up.url in line and "(ok)" in line
    assert "sk-upstream-secret-42" not in gw.output()


def test_an_ollama_client_without_a_key_gets_a_hint_in_the_log(gateway):
    import urllib.error
    import urllib.request
    gw = gateway("api-keys: [sk-gw]\n")
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(gw.url + "/api/tags", timeout=10)
        assert e.value.code == 401
    assert gw.output().count("an Ollama client called /api/tags without an API key") == 1  # once, not per request


HAIKU = dict(ANSWER, model="claude-haiku-4-5-20251001")


@pytest.mark.parametrize("served, expected", [(["claude-sonnet-4-5-20250929", "claude-haiku-4-5"], "claude-haiku-4-5"),
                                              (["claude-sonnet-4-5-20250929"], "claude-sonnet-4-5-20250929")])
def test_a_tools_helper_model_falls_back_to_its_family(served, expected):
    up = FakeUpstream(lambda r: Reply(body=dict(ANSWER, model=r.json["model"]))).start()
    gw = GatewayThread("providers:\n  - type: anthropic\n    base-url: %s\n    api-key: sk-ant\n    models: [%s]\n"
                       % (up.url, ", ".join(served)))
    try:
        c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
        c.messages.create(model="claude-haiku-4-5-20251001", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert up.requests[-1].json["model"] == expected
    finally:
        gw.stop()
        up.stop()


def test_family_fallback_can_be_turned_off():
    up = FakeUpstream(lambda r: Reply(body=ANSWER)).start()
    gw = GatewayThread("routing: {family-fallback: false}\nproviders:\n  - type: anthropic\n    base-url: %s\n"
                       "    api-key: sk-ant\n    models: [claude-sonnet-4-5-20250929]\n" % up.url)
    try:
        with pytest.raises(anthropic.NotFoundError):
            anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.create(
                model="claude-haiku-4-5-20251001", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    finally:
        gw.stop()
        up.stop()


def test_refresh_lead_is_configurable_validated_and_reloaded(tmp_path):
    import json
    import os
    import llm_mux
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "claude-a.json").write_text(json.dumps({"type": "claude", "email": "a@x", "access_token": "at"}))
    os.chmod(auth / "claude-a.json", 0o600)
    gw = GatewayThread("auth-dir: %s\nrefresh-lead: {claude: 2h, gemini: 45m}\n" % auth)
    try:
        (claude,) = [p for p in gw.gateway.registry.providers if p.id == "claude"]
        assert claude.refresh_lead == 7200
        cfg = llm_mux.Config.from_text("auth-dir: %s\nrefresh-lead: {claude: 90s}\n" % auth, "t.yaml", environ={})
        gw.loop.call_soon_threadsafe(gw.gateway.apply_config, cfg)
        gw.run(llm_mux.asyncio.sleep(0))
        (claude,) = [p for p in gw.gateway.registry.providers if p.id == "claude"]
        assert claude.refresh_lead == 90
    finally:
        gw.stop()


@pytest.mark.parametrize("text, message", [("refresh-lead: {claude: -5}\n", "t.yaml:1:16: 'refresh-lead.claude' must be"),
                                           ("refresh-lead: {nope: 1h}\n", "names no provider"),
                                           ("refresh-lead: {codex: soon}\n", "duration such as 30m")])
def test_a_bad_refresh_lead_is_a_config_error_with_its_line(text, message):
    import llm_mux
    with pytest.raises(llm_mux.ConfigError) as e:
        llm_mux.Config.from_text(text, "t.yaml", environ={})
    assert message in str(e.value)


def test_env_shows_the_refresh_leads(tmp_path):
    import subprocess
    import sys
    from harness import ROOT
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth-dir: %s\nrefresh-lead: {claude: 2h}\n" % (tmp_path / "auth"))
    out = subprocess.run([sys.executable, ROOT + "/llm_mux.py", "env", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=30).stdout
    assert "claude 2h*" in out and "codex 5d" in out


def test_the_generated_config_has_a_working_example_of_every_provider_type():
    import llm_mux
    text = llm_mux.DEFAULT_CONFIG_TEXT
    examples = text[text.index("# providers:"):text.index("providers: []")]
    uncommented = "\n".join(line[2:] for line in examples.splitlines())
    cfg = llm_mux.Config.from_text(text.replace(examples, "").replace("providers: []", uncommented), "c.yaml",
                                   environ={})
    assert sorted(p.type for p in cfg.providers) == sorted(llm_mux.PROVIDERS.entries) or \
        set(p.type for p in cfg.providers) >= {"openai", "anthropic", "gemini", "vertex-compat", "codex"}
    assert "README" not in text  # zipapp users have no README


def test_a_cooling_answer_names_the_upstreams_status_and_message():
    up = FakeUpstream(lambda r: Reply(status=429, body={"error": {"message": "Rate limit reached for m1"}},
                                      headers={"Retry-After": "120"})).start()
    gw = GatewayThread("request-retry: 0\nmax-retry-interval: 0\nproviders:\n  - type: openai\n    name: p\n"
                       "    base-url: %s/v1\n    api-key: k\n    models: [m1]\n" % up.url)
    try:
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as e:
                gw.chat(model="m1")
        assert "cooling down; retry in 120s" in e.value.message
        assert "HTTP 429: Rate limit reached for m1" in e.value.message
    finally:
        gw.stop()
        up.stop()


def test_a_browser_at_the_root_gets_next_steps_and_ollama_still_gets_its_answer(gateway):
    import urllib.request
    gw = gateway("")
    page = urllib.request.urlopen(urllib.request.Request(gw.url + "/", headers={"Accept": "text/html"}),
                                  timeout=10).read().decode()
    assert "No models yet" in page and "login &lt;provider&gt;" in page and "%s/v1" % gw.url in page
    assert urllib.request.urlopen(gw.url + "/", timeout=10).read() == b"Ollama is running"
