"""Tool and response schemas keep their meaning per target, with the official SDKs: a nullable union reaches
Gemini as `nullable: true`; a Gemini response schema reaches Anthropic in the subset Anthropic takes (its own keys
dropped, every object closed)."""
import openai
from google import genai
from google.genai import types as gtypes

from test_formats_e2e import env  # noqa: F401  (module-scoped gateway fixture)
from test_roundtrip_e2e import sent_to

PARAMS = {"type": "object", "properties": {
    "limit": {"anyOf": [{"type": "number"}, {"type": "null"}], "description": "how many"},
    "tags": {"type": ["array", "null"], "items": {"type": "string"}}}, "required": ["limit"]}


def test_nullable_unions_reach_gemini_as_nullable(env):
    gw, up = env
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    c.chat.completions.create(model="up-gemini", messages=[{"role": "user", "content": "SCENARIO:text x"}],
                              tools=[{"type": "function", "function": {"name": "search", "parameters": PARAMS}}])
    params = sent_to(up, "up-gemini")["tools"][0]["functionDeclarations"][0]["parameters"]
    assert params["properties"]["limit"] == {"type": "number", "nullable": True, "description": "how many"}
    assert params["properties"]["tags"] == {"type": "array", "nullable": True, "items": {"type": "string"}}


def test_a_gemini_response_schema_reaches_anthropic_in_its_subset(env):
    gw, up = env
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    schema = {"type": "OBJECT", "title": "Answer", "property_ordering": ["name", "age"], "properties": {
        "name": {"type": "STRING"}, "age": {"type": "INTEGER", "nullable": True},
        "pet": {"type": "OBJECT", "properties": {"kind": {"type": "STRING"}}}}}
    c.models.generate_content(model="up-anthropic", contents="SCENARIO:text x", config=gtypes.GenerateContentConfig(
        response_mime_type="application/json", response_schema=schema))
    sent = sent_to(up, "up-anthropic")["output_config"]["format"]["schema"]
    assert "title" not in sent and "property_ordering" not in sent and "propertyOrdering" not in sent
    assert sent["additionalProperties"] is False and sent["properties"]["pet"]["additionalProperties"] is False
    assert sent["properties"]["age"]["type"] == ["integer", "null"]
    assert sent["properties"]["name"] == {"type": "string"}


def test_the_same_schema_rules_serve_tools(env):
    gw, up = env
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)
    tool = {"type": "object", "propertyOrdering": ["a"], "properties": {"a": {"type": "string", "nullable": True}}}
    c.chat.completions.create(model="up-anthropic", messages=[{"role": "user", "content": "SCENARIO:text x"}],
                              tools=[{"type": "function", "function": {"name": "f", "parameters": tool}}])
    sent = sent_to(up, "up-anthropic")["tools"][0]["input_schema"]
    assert sent == {"type": "object", "properties": {"a": {"type": ["string", "null"]}}}
