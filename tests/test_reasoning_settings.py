"""Reasoning settings with the official SDKs: a reasoning effort never enlarges the output limit the client set
(the thinking budget fits under it, since both count reasoning); a Gemini client's own thinking settings reach a
Gemini upstream untouched, and map to a budget for other families."""
import anthropic
import openai
from google import genai
from google.genai import types as gtypes

from test_formats_e2e import env  # noqa: F401  (module-scoped gateway fixture)
from test_roundtrip_e2e import sent_to


def test_openai_reasoning_effort_fits_under_the_clients_max_tokens(env):
    gw, up = env
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    c.chat.completions.create(model="up-anthropic", max_tokens=20000, reasoning_effort="high",
                              messages=[{"role": "user", "content": "SCENARIO:text think"}])
    body = sent_to(up, "up-anthropic")
    assert body["max_tokens"] == 20000
    assert 1024 <= body["thinking"]["budget_tokens"] < 20000


def test_responses_effort_fits_under_max_output_tokens(env):
    gw, up = env
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    c.responses.create(model="up-anthropic", input="SCENARIO:text think", max_output_tokens=20000,
                       reasoning={"effort": "high"})
    body = sent_to(up, "up-anthropic")
    assert body["max_tokens"] == 20000 and body["thinking"]["budget_tokens"] < 20000


def test_a_limit_too_small_to_think_turns_thinking_off_rather_than_growing(env):
    gw, up = env
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
        model="up-anthropic", max_tokens=800, reasoning_effort="low",
        messages=[{"role": "user", "content": "SCENARIO:text think"}])
    body = sent_to(up, "up-anthropic")
    assert body["max_tokens"] == 800 and "thinking" not in body
    c.messages.create(model="up-anthropic", max_tokens=3000, thinking={"type": "enabled", "budget_tokens": 2048},
                      messages=[{"role": "user", "content": "SCENARIO:text think"}])
    assert sent_to(up, "up-anthropic")["thinking"] == {"type": "enabled", "budget_tokens": 2048}


def gemini_ask(gw, model, level):
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    c.models.generate_content(model=model, contents="SCENARIO:text think", config=gtypes.GenerateContentConfig(
        thinking_config=gtypes.ThinkingConfig(thinking_level=level, include_thoughts=True)))


def test_gemini_thinking_level_passes_through_untouched_on_gemini_routes(env):
    gw, up = env
    gemini_ask(gw, "up-gemini", "LOW")
    tcfg = sent_to(up, "up-gemini")["generationConfig"]["thinkingConfig"]
    # exactly what the SDK sent (it writes protobuf JSON in snake_case, which Gemini accepts): no budget added
    assert tcfg == {"thinking_level": "LOW", "include_thoughts": True}


def test_gemini_thinking_level_maps_to_a_budget_elsewhere(env):
    gw, up = env
    gemini_ask(gw, "up-anthropic", "LOW")
    assert sent_to(up, "up-anthropic")["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    gemini_ask(gw, "up-codex", "HIGH")
    assert sent_to(up, "up-codex")["reasoning"]["effort"] == "high"
