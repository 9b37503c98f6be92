"""Hot reload of the config file: edits take effect without a restart, in-flight streams finish
undisturbed, a broken edit keeps the running config, and LLM_MUX_* overrides survive reloads."""
import threading

import openai
import pytest

from harness import openai_provider_config, wait_until
from fakes import Reply, openai_completion, openai_stream_events


def wait_for(fn):
    return wait_until(fn, what="the edit to take effect", ignore=(Exception,))


def test_config_edits_apply_while_a_stream_is_in_flight(gateway, upstream, tmp_path):
    paced = []
    for e in openai_stream_events(tuple("abcdefghij"), usage=False):
        paced += [e, 0.2]
    up = upstream(lambda r: Reply("sse", events=paced) if r.json.get("stream") else
                  Reply(body=openai_completion("v-" + r.json["model"])))
    text = openai_provider_config(up.url, models=[("m1", "")])
    gw = gateway(text, env={"LLM_MUX_REQUEST_RETRY": "0"})
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20)
    got = []
    started = threading.Event()

    def consume():
        for chunk in c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}], stream=True):
            started.set()
            got.extend(ch.delta.content or "" for ch in chunk.choices)
    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(10)
    # Add a model and an alias while the stream runs.
    with open(gw.config_path, "a") as f:
        f.write("routing:\n  aliases: {fast: m2}\n")
    new = open(gw.config_path).read().replace("      - name: m1\n", "      - name: m1\n      - name: m2\n")
    with open(gw.config_path, "w") as f:
        f.write(new)
    wait_for(lambda: c.chat.completions.create(model="fast", messages=[
        {"role": "user", "content": "x"}]).choices[0].message.content == "v-m2")
    t.join(20)
    assert "".join(got) == "abcdefghij"  # the in-flight stream was not disturbed
    assert "config reloaded" in gw.output()


def test_a_broken_edit_keeps_the_running_config(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    with open(gw.config_path, "a") as f:
        f.write("request-retry: [unclosed\n")
    wait_for(lambda: "config reload failed" in gw.output())
    assert "config.yaml:" in gw.output() and "unterminated" in gw.output()
    assert c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert gw.proc.poll() is None


def test_api_keys_and_env_overrides_across_reloads(gateway, upstream):
    up = upstream()
    gw = gateway(openai_provider_config(up.url) + "api-keys: [old-key]\n", env={"LLM_MUX_REQUEST_RETRY": "0"})
    c_new = openai.OpenAI(base_url=gw.url + "/v1", api_key="new-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c_new.models.list()
    text = open(gw.config_path).read().replace("api-keys: [old-key]", "api-keys: [new-key]\nrequest-retry: 5")
    with open(gw.config_path, "w") as f:
        f.write(text)
    wait_for(lambda: c_new.models.list() is not None)
    assert "config reloaded" in gw.output()
    # the env override still wins over the file's request-retry: 5 (one upstream call, no retries)
    up.handler = lambda r: Reply(status=500, body={"error": {"message": "x"}})
    with pytest.raises(openai.InternalServerError):
        c_new.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert len(up.requests) == 1
