"""Reasoning state through clients of every family, with the official SDKs (redesign issue, point 4): every
thinking block an Anthropic client sees is signed; replayed, a signature reaches its own family natively and a
minted one is never forwarded; Responses clients get encrypted_content from every upstream with reasoning state;
an Anthropic stream keeps a Responses upstream's reasoning text and never splits an answer around a signature."""
import json

import anthropic
import openai
import pytest

import llm_mux
import upstreams
from test_formats_e2e import env, upstream_of  # noqa: F401  (module-scoped gateway fixture)
from test_roundtrip_e2e import sent_to, signature_reached_upstream

THINK, FOLLOW = "SCENARIO:thinking think", "SCENARIO:text go on"
REASONING_UPSTREAMS = ["up-anthropic", "up-gemini", "up-vertex", "up-codex"]


def anthropic_turn(gw, model, stream):
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    kw = dict(model=model, max_tokens=4000, messages=[{"role": "user", "content": THINK}])
    if not stream:
        return c, c.messages.create(**kw), None
    with c.messages.stream(**kw) as s:
        events = list(s)
        return c, s.get_final_message(), events


@pytest.mark.parametrize("model", upstreams.UPSTREAMS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_thinking_block_an_anthropic_client_sees_is_signed(env, model, stream):
    gw, up = env
    c, r1, _ = anthropic_turn(gw, model, stream)
    thinking = [b for b in r1.content if b.type == "thinking"]
    assert thinking and all(b.signature for b in thinking), r1.content
    assert "".join(b.thinking for b in thinking) == "Let me think."
    assert "".join(b.text for b in r1.content if b.type == "text") == "Answer"
    c.messages.create(model=model, max_tokens=4000, messages=[
        {"role": "user", "content": THINK}, {"role": "assistant", "content": [b.model_dump() for b in r1.content]},
        {"role": "user", "content": FOLLOW}])
    body = sent_to(up, model)
    assert "llmmux:" not in json.dumps(body)  # no gateway token is ever sent upstream
    if model != "up-openai":
        assert signature_reached_upstream(body, upstream_of(model)), json.dumps(body)[:3000]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_minted_signature_is_recognised_and_never_forwarded(env, stream):
    """OpenAI chat has no signatures: the one the gateway minted is not sent to Anthropic, which would reject it."""
    gw, up = env
    c, r1, _ = anthropic_turn(gw, "up-openai", stream)
    sig = next(b.signature for b in r1.content if b.type == "thinking")
    assert llm_mux.unpack_reasoning(sig)["source"] == "openai"
    c.messages.create(model="up-anthropic", max_tokens=4000, messages=[
        {"role": "user", "content": THINK}, {"role": "assistant", "content": [b.model_dump() for b in r1.content]},
        {"role": "user", "content": FOLLOW}])
    body = sent_to(up, "up-anthropic")
    assert not any(b["type"] in ("thinking", "redacted_thinking") for m in body["messages"] if m["role"] == "assistant"
                   for b in m["content"])
    assert sig not in json.dumps(body)


@pytest.mark.parametrize("model", REASONING_UPSTREAMS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_responses_clients_asking_for_encrypted_content_get_it_from_every_family(env, model, stream):
    gw, up = env
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    kw = dict(model=model, input=THINK, include=["reasoning.encrypted_content"])
    if stream:
        with c.responses.stream(**kw) as s:
            r1 = s.get_final_response()
    else:
        r1 = c.responses.create(**kw)
    items = [o.model_dump(exclude_none=True) for o in r1.output]
    reasoning = [i for i in items if i["type"] == "reasoning"]
    assert reasoning and all(i.get("encrypted_content") for i in reasoning), items
    c.responses.create(model=model, input=[{"role": "user", "content": THINK}] + items +
                       [{"role": "user", "content": FOLLOW}])
    assert signature_reached_upstream(sent_to(up, model), upstream_of(model))


def test_anthropic_stream_from_a_responses_upstream_carries_the_reasoning_text(env):
    gw, _ = env
    _, message, events = anthropic_turn(gw, "up-codex", True)
    deltas = [e.delta.thinking for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
    assert "".join(deltas) == "Let me think."
    thinking = [b for b in message.content if b.type == "thinking"]
    assert len(thinking) == 1 and thinking[0].thinking == "Let me think." and thinking[0].signature


def test_an_answer_is_never_split_around_a_signature(env):
    """A Gemini stream puts the thoughtSignature on a later piece of the answer's text; an Anthropic stream keeps
    the text in one block and carries the signature after it."""
    gw, up = env
    _, message, events = anthropic_turn(gw, "up-gemini", True)
    kinds = [b.type for b in message.content]
    assert kinds == ["thinking", "text", "thinking"], kinds
    assert message.content[1].text == "Answer"
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text", "thinking"]
    assert all(b.signature for b in message.content if b.type == "thinking")
