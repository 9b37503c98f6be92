"""Everything about a provider lives on its class: defining a class registers it, and config entries, credential
files, model lists, routing, logins and importers find it with no other edit."""
import json
import os

import llm_mux
from fakes import FakeUpstream, Reply, openai_completion
from harness import GatewayThread


class EchoProvider(llm_mux.Provider):
    """A provider made up by this test: OpenAI-compatible on the wire, with a marker header and its own models."""

    config_type = "echo-test"
    provider_id = "echo"
    display_name = "Echo"
    needs_base_url = True
    codec = llm_mux.OpenAIChat
    default_models = ("echo-1", "echo-2")

    def build(self, req, cred, model):
        body = llm_mux.json_bytes(self.codec.build_request(req, model))
        headers = [("Content-Type", "application/json"), ("Authorization", "Bearer " + cred.api_key),
                   ("X-Echo", "yes")]
        return "POST", self.base_url(cred) + "/chat/completions", headers, body


class EchoFileProvider(EchoProvider):
    """The same upstream reached with credential files of `type: echo-file`."""

    config_type = None
    file_type = "echo-file"
    display_name = "Echo Files"
    default_base_url = "http://unused.invalid"

    def base_url(self, cred):
        return cred.meta["base_url"]

    def build(self, req, cred, model):
        method, url, headers, body = EchoProvider.build(self, req, cred, model)
        return method, url, headers + [("X-Account", cred.meta["email"])], body


def test_a_provider_defined_in_a_test_is_registered():
    assert llm_mux.PROVIDERS.entries["echo-test"] is EchoProvider
    assert llm_mux.PROVIDERS.files["echo-file"] is EchoFileProvider
    assert "echo-test" not in [c.config_type for c in llm_mux.PROVIDERS.files.values() if c is EchoFileProvider]


def test_it_is_routed_and_served_from_a_config_entry():
    up = FakeUpstream(lambda r: Reply(body=openai_completion("echoed"))).start()
    gw = GatewayThread("show-provider-prefixes: true\nproviders:\n  - type: echo-test\n    base-url: %s/v1\n"
                       "    api-key: sk-echo\n" % up.url)
    try:
        ids = [m.id for m in gw.client().models.list().data]
        assert ids == ["[Echo] echo-1", "[Echo] echo-2"]
        answer = gw.chat(model="echo-2")
        assert answer.choices[0].message.content == "echoed"
        sent = up.requests[-1]
        assert sent.headers["x-echo"] == "yes" and sent.json["model"] == "echo-2"
        assert sent.headers["authorization"] == "Bearer sk-echo"
        assert gw.gateway.registry.providers[0].id == "echo"
    finally:
        gw.stop()
        up.stop()


def test_it_is_served_from_a_credential_file(tmp_path):
    up = FakeUpstream(lambda r: Reply(body=openai_completion("from file"))).start()
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "echo-a.json").write_text(json.dumps({"type": "echo-file", "email": "a@example.com",
                                                  "base_url": up.url + "/v1"}))
    os.chmod(auth / "echo-a.json", 0o600)
    gw = GatewayThread("auth-dir: %s\n" % auth)
    try:
        assert gw.chat(model="echo-1").choices[0].message.content == "from file"
        assert up.requests[-1].headers["x-account"] == "a@example.com"
        (provider,) = gw.gateway.registry.providers
        assert type(provider) is EchoFileProvider and provider.id == "echo-file"
    finally:
        gw.stop()
        up.stop()


def test_unknown_types_name_the_registered_ones():
    import pytest
    with pytest.raises(llm_mux.ConfigError) as e:
        llm_mux.Config.from_text("providers:\n  - type: nope\n    api-key: k\n", environ={})
    assert "'nope' is not one of" in str(e.value) and "echo-test" in str(e.value) and "anthropic" in str(e.value)


def test_every_subscription_provider_brings_its_login_and_refresh_lead():
    logins = llm_mux.PROVIDERS.logins()
    assert set(logins) >= {"claude", "codex", "gemini", "antigravity", "copilot", "qwen", "iflow", "kiro", "cline"}
    for name, cls in logins.items():
        assert cls.refresh_lead, name
        assert cls.login is not None or cls.official_tool, name  # Kiro logs in by importing the Kiro IDE's tokens
        if cls.login is not None:
            assert cls.login.provider_class is cls
    tools = [c.official_tool for c in llm_mux.PROVIDERS.importers()]
    assert tools[:4] == ["Claude Code", "Codex CLI", "Gemini CLI", "Kiro IDE"]
