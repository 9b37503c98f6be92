"""Embeddings through the gateway with the official SDKs: OpenAI's /v1/embeddings, Ollama's /api/embed and
/api/embeddings, Gemini's embedContent and batchEmbedContents, each to an OpenAI-compatible, a Gemini and a
Vertex upstream, with the tokens the upstream counted recorded on the Call."""
import json

import ollama
import openai
import pytest
from google import genai
from google.genai import types as gtypes

from fakes import FakeUpstream, Reply
from harness import GatewayThread

VEC = [0.25, -0.5, 0.125]


def fake(r):
    body = json.loads(r.body)
    if r.path.endswith("/embeddings"):
        return Reply(body={"object": "list", "model": body["model"], "usage": {"prompt_tokens": 7, "total_tokens": 7},
                           "data": [{"object": "embedding", "index": i, "embedding": [v + i for v in VEC]}
                                    for i, _ in enumerate(body["input"])]})
    if r.path.endswith(":batchEmbedContents"):
        return Reply(body={"embeddings": [{"values": [v + i for v in VEC]} for i, _ in enumerate(body["requests"])]})
    if r.path.endswith(":predict"):
        return Reply(body={"predictions": [{"embeddings": {"values": [v + i for v in VEC],
                                                            "statistics": {"token_count": 3}}}
                                           for i, _ in enumerate(body["instances"])]})
    return Reply(status=404, body={"error": {"message": r.path}})


@pytest.fixture(scope="module")
def env():
    up = FakeUpstream(fake).start()
    gw = GatewayThread("providers:\n  - type: openai\n    name: oa\n    base-url: %s/v1\n    api-key: k\n"
                       "    models: [text-embedding-3-small]\n  - type: gemini\n    base-url: %s\n    api-key: g\n"
                       "    models: [gemini-embedding-001]\n  - type: vertex-compat\n    base-url: %s\n    api-key: v\n"
                       "    models: [{name: text-embedding-005, alias: vx-embed}]\n" % (up.url, up.url, up.url),
                       fake_clock=False)
    calls = []
    gw.gateway.router.observers.append(calls.append)
    yield gw, up, calls
    gw.stop()
    up.stop()


MODELS = ["text-embedding-3-small", "gemini-embedding-001", "vx-embed"]


@pytest.mark.parametrize("model", MODELS)
def test_openai_sdk(env, model):
    gw, up, calls = env
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    r = c.embeddings.create(model=model, input=["one", "two"])  # the SDK asks for base64 and decodes it
    assert [d.embedding for d in r.data] == [VEC, [v + 1 for v in VEC]]
    one = c.embeddings.create(model=model, input="one", encoding_format="float")
    assert one.data[0].embedding == VEC
    assert calls[-1].kind == "embed" and calls[-1].outcome == "ok"


@pytest.mark.parametrize("model", MODELS)
def test_ollama_sdk(env, model):
    gw, up, calls = env
    c = ollama.Client(host=gw.url)
    assert c.embed(model=model, input=["a", "b"]).embeddings == [VEC, [v + 1 for v in VEC]]
    assert c.embeddings(model=model, prompt="a").embedding == VEC


@pytest.mark.parametrize("model", MODELS)
def test_gemini_sdk(env, model):
    gw, up, calls = env
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    r = c.models.embed_content(model=model, contents=["a", "b"], config=gtypes.EmbedContentConfig(
        output_dimensionality=3, task_type="RETRIEVAL_DOCUMENT"))
    assert [e.values for e in r.embeddings] == [VEC, [v + 1 for v in VEC]]


def test_usage_counts_the_upstreams_tokens(env):
    gw, up, calls = env
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).embeddings.create(
        model="text-embedding-3-small", input="x")
    assert calls[-1].usage.input_tokens == 7
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).embeddings.create(model="vx-embed",
                                                                                        input=["x", "y"])
    assert calls[-1].usage.input_tokens == 6


def test_a_chat_only_model_is_a_clear_400(env):
    gw, _, _ = env
    bad = GatewayThread("providers:\n  - type: anthropic\n    api-key: k\n", fake_clock=False)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            openai.OpenAI(base_url=bad.url + "/v1", api_key="k", max_retries=0).embeddings.create(
                model="claude-sonnet-4-5-20250929", input="x")
        assert "embeddings API" in e.value.message
    finally:
        bad.stop()
