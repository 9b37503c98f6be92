"""What agents act on, with the official SDKs: a context overflow arrives as the marker each client acts on (and
cools nothing); an upstream that rejects a credential gives an authentication error naming it (not its secret),
for that request and the next ones, instead of a half-hour rate limit; a stream that fails half-way does not lock
the model."""
import json

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as gerrors
from google.genai import types as gtypes

import llm_mux
import upstreams
from fakes import FakeUpstream, Reply, openai_completion
from harness import GatewayThread, openai_provider
from test_formats_e2e import EXPECTED_TEXT, env  # noqa: F401  (module-scoped gateway fixture)


def ask(gw, client, model, prompt, stream):
    """One request in `client`'s format; returns the text (streams are read to the end)."""
    if client == "openai":
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}])
        if not stream:
            return c.chat.completions.create(**kw).choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                       if ch.choices)
    if client == "responses":
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
        if not stream:
            return c.responses.create(model=model, input=prompt).output_text
        with c.responses.stream(model=model, input=prompt) as s:
            return s.get_final_response().output_text
    if client == "anthropic":
        c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
        kw = dict(model=model, max_tokens=100, messages=[{"role": "user", "content": prompt}])
        if not stream:
            return c.messages.create(**kw).content[0].text
        with c.messages.stream(**kw) as s:
            return s.get_final_text()
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    if not stream:
        return c.models.generate_content(model=model, contents=prompt).text
    return "".join(ch.text or "" for ch in c.models.generate_content_stream(model=model, contents=prompt))


def overflow_marker(client, exc):
    """Whether `exc` is what `client`'s agents recognise as a context overflow."""
    if client in ("openai", "responses"):
        return isinstance(exc, openai.BadRequestError) and exc.code == "context_length_exceeded"
    if client == "anthropic":
        err = exc.body["error"] if isinstance(exc, anthropic.BadRequestError) else {}
        return err.get("type") == "invalid_request_error" and err.get("message", "").startswith("prompt is too long")
    return isinstance(exc, gerrors.ClientError) and exc.code == 400 and exc.status == "INVALID_ARGUMENT" and \
        "exceeds the maximum number of tokens" in exc.message


# (scenario, stream): an HTTP 400 for a plain request and for a stream; a stream whose first event is the
# overflow; and a Responses upstream (always streamed) failing that way under a non-streaming client
OVERFLOWS = [(m, sc, st) for m in upstreams.UPSTREAMS for sc, st in (("overflow", False), ("overflow", True),
                                                                     ("overflowstream", True))]
OVERFLOWS.append(("up-codex", "overflowstream", False))


@pytest.mark.parametrize("model, scenario, stream", OVERFLOWS)
@pytest.mark.parametrize("client", ["openai", "responses", "anthropic", "gemini"])
def test_context_overflow_arrives_as_the_marker_clients_act_on(env, client, model, scenario, stream):
    gw, up = env
    with pytest.raises(Exception) as e:
        ask(gw, client, model, "SCENARIO:%s a very long prompt" % scenario, stream)
    assert overflow_marker(client, e.value), repr(e.value)
    # the request was at fault, not the credential: the next one is served at once
    assert ask(gw, client, model, "SCENARIO:text hi", False) == EXPECTED_TEXT[model]


@pytest.mark.parametrize("model", upstreams.UPSTREAMS)
@pytest.mark.parametrize("client", ["openai", "anthropic"])
def test_a_failure_in_the_middle_of_a_stream_does_not_lock_the_model(env, client, model):
    gw, up = env
    with pytest.raises(Exception):
        ask(gw, client, model, "SCENARIO:midstreamerr overloaded half-way", True)
    before = len(up.requests)
    assert ask(gw, client, model, "SCENARIO:text hi", True) == EXPECTED_TEXT[model]
    assert len(up.requests) == before + 1  # the upstream was asked again, no cooldown answered for it


# -- credentials the upstream rejects --------------------------------------------------------------------------------

SECRET = "sk-upstream-secret-0123456789"


@pytest.fixture
def rejecting():
    up = FakeUpstream(lambda r: Reply(status=401, body={"error": {
        "message": "Incorrect API key provided: %s. Check it." % SECRET, "type": "invalid_request_error",
        "code": "invalid_api_key"}})).start()
    gw = GatewayThread("request-retry: 0\nproviders:\n" + openai_provider(up.url, [SECRET]), fake_clock=False)
    yield gw, up
    gw.stop()
    up.stop()


def test_an_upstream_auth_failure_is_an_auth_error_naming_the_credential(rejecting):
    gw, up = rejecting
    with pytest.raises(openai.AuthenticationError) as first:
        gw.chat()
    message = first.value.body["message"]
    assert "rejected credential" in message and gw.cred(SECRET).label in message
    assert SECRET not in json.dumps(first.value.body)
    assert first.value.body["type"] == "authentication_error"
    asked = len(up.requests)
    # later clients get the same kind of answer (not a rate limit), without the upstream being asked again
    with pytest.raises(openai.AuthenticationError) as later:
        gw.chat()
    assert "no usable credential" in later.value.body["message"] and SECRET not in json.dumps(later.value.body)
    with pytest.raises(anthropic.AuthenticationError) as other_format:
        anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0).messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert other_format.value.body["error"]["type"] == "authentication_error"
    assert len(up.requests) == asked
    assert gw.cred(SECRET).disabled.startswith("rejected:")


def test_a_config_change_puts_a_rejected_key_back_in_rotation(rejecting):
    gw, up = rejecting
    with pytest.raises(openai.AuthenticationError):
        gw.chat()
    up.handler = lambda r: Reply(body=openai_completion("works again"))
    cfg = llm_mux.Config.from_text("request-retry: 0\nproviders:\n" + openai_provider(up.url, [SECRET]) +
                                   "max-retry-interval: 5\n", "t.yaml", environ={})
    gw.loop.call_soon_threadsafe(gw.gateway.apply_config, cfg)
    gw.run(llm_mux.asyncio.sleep(0))
    assert gw.chat().choices[0].message.content == "works again"


def test_a_403_is_a_short_permission_cooldown_not_a_lockout():
    up = FakeUpstream(lambda r: Reply(status=403, body={"error": {"message": "region not allowed"}})).start()
    gw = GatewayThread("request-retry: 0\nmax-retry-interval: 0\nproviders:\n" + openai_provider(up.url, ["k1"]))
    try:
        with pytest.raises(openai.PermissionDeniedError):
            gw.chat()
        assert gw.cred("k1").disabled is None
        assert gw.cred("k1").cooling_until("m") - gw.clock.now() == pytest.approx(60)
    finally:
        gw.stop()
        up.stop()


def test_env_shows_a_rejected_key_until_the_config_changes(gateway, upstream):
    import subprocess
    import sys
    from harness import ROOT, openai_provider_config, wait_until
    up = upstream(lambda r: Reply(status=401, body={"error": {"message": "bad key %s" % SECRET}}))
    gw = gateway(openai_provider_config(up.url, keys=(SECRET,)) + "request-retry: 0\n")
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])

    def env_output():
        return subprocess.run([sys.executable, ROOT + "/llm_mux.py", "env", "--config", gw.config_path],
                              capture_output=True, text=True, env=gw.env, timeout=30).stdout
    out = env_output()
    assert "Rejected:" in out and "out of rotation" in out and SECRET not in out
    with open(gw.config_path, "a") as f:
        f.write("max-retry-interval: 7\n")
    wait_until(lambda: "Rejected:" not in env_output(), what="the config change to put the key back")
