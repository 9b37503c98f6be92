"""The Codex CLI (npm @openai/codex, installed by the test setup) against the gateway: with `supports_websockets`
on its provider it speaks the Responses API over a WebSocket, and gets its answer that way — from an upstream that
only speaks Chat Completions."""
import os
import shutil
import subprocess

import pytest

from fakes import Reply, openai_stream_events
from harness import openai_provider_config


@pytest.mark.skipif(shutil.which("codex") is None, reason="the Codex CLI is not installed (npm i -g @openai/codex)")
@pytest.mark.parametrize("websockets", [True, False])
def test_codex_exec_through_the_gateway(gateway, upstream, tmp_path, websockets):
    up = upstream(lambda r: Reply("sse", events=openai_stream_events(pieces=("Hi", " from", " the gateway"))))
    gw = gateway(openai_provider_config(up.url, models=(("gpt-5.2-codex", ""),)) + "api-keys: [sk-gw]\n")
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "gpt-5.2-codex"\nmodel_provider = "mux"\n[model_providers.mux]\nname = "llm-mux"\n'
        'base_url = "%s/v1"\nenv_key = "LLM_MUX_KEY"\nwire_api = "responses"\nsupports_websockets = %s\n'
        % (gw.url, "true" if websockets else "false"))
    env = dict(os.environ, CODEX_HOME=str(home), LLM_MUX_KEY="sk-gw")
    r = subprocess.run(["codex", "exec", "--skip-git-repo-check", "say hi"], capture_output=True, text=True,
                       env=env, timeout=180, cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Hi from the gateway" in r.stdout
    log = gw.output()
    if websockets:
        assert "GET /v1/responses 101" in log and "POST /v1/responses" not in log
    else:
        assert "POST /v1/responses 200" in log and "GET /v1/responses" not in log
    sent = [q for q in up.requests if q.path.endswith("/chat/completions")]
    assert sent and sent[-1].json["messages"][-1]["content"] and "say hi" in str(sent[-1].json["messages"])
