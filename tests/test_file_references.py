"""Uploaded-file references with the official SDKs: passed through natively where the upstream reads the same
file store, a clear 400 in the client's own format where it cannot (never dropped silently); inline documents
keep working."""
import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as gerrors
from google.genai import types as gtypes

from test_formats_e2e import env  # noqa: F401  (module-scoped gateway fixture)
from test_roundtrip_e2e import sent_to


def openai_client(gw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0)


def chat_with_file(gw, model):
    return openai_client(gw).chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "SCENARIO:text summarise"}, {"type": "file", "file": {"file_id": "file-abc123"}}]}])


def test_openai_file_ids_pass_through_to_openai_upstreams(env):
    gw, up = env
    chat_with_file(gw, "up-openai")
    parts = sent_to(up, "up-openai")["messages"][-1]["content"]
    assert {"type": "file", "file": {"filename": "file", "file_id": "file-abc123"}} in parts
    chat_with_file(gw, "up-codex")
    content = sent_to(up, "up-codex")["input"][-1]["content"]
    assert {"type": "input_file", "file_id": "file-abc123"} in content


def test_an_openai_file_id_for_another_family_is_a_400_naming_it(env):
    gw, up = env
    with pytest.raises(openai.BadRequestError) as e:
        chat_with_file(gw, "up-anthropic")
    assert "file-abc123" in e.value.message and "inline" in e.value.message


def test_responses_input_file_ids_on_the_native_route(env):
    gw, up = env
    openai_client(gw).responses.create(model="up-codex", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "SCENARIO:text x"}, {"type": "input_file", "file_id": "file-r1"}]}])
    assert {"type": "input_file", "file_id": "file-r1"} in sent_to(up, "up-codex")["input"][-1]["content"]


def anthropic_with_file(gw, model):
    c = anthropic.Anthropic(base_url=gw.url, api_key="k", max_retries=0)
    return c.messages.create(model=model, max_tokens=50, extra_headers={"anthropic-beta": "files-api-2025-04-14"},
                             messages=[{"role": "user", "content": [
                                 {"type": "document", "source": {"type": "file", "file_id": "file_011A"}},
                                 {"type": "text", "text": "SCENARIO:text summarise"}]}])


def test_anthropic_file_documents_on_the_native_route_with_the_beta_header(env):
    gw, up = env
    anthropic_with_file(gw, "up-anthropic")
    req = [q for q in up.requests if "/v1/messages" in q.path][-1]
    assert {"type": "document", "source": {"type": "file", "file_id": "file_011A"}} in req.json["messages"][0]["content"]
    assert "files-api-2025-04-14" in req.headers.get("anthropic-beta", "")


def test_an_anthropic_file_for_gemini_is_a_400_in_anthropic_shape(env):
    gw, _ = env
    with pytest.raises(anthropic.BadRequestError) as e:
        anthropic_with_file(gw, "up-gemini")
    assert e.value.body["error"]["type"] == "invalid_request_error" and "file_011A" in e.value.body["error"]["message"]


def gemini_with_file(gw, model, uri):
    c = genai.Client(api_key="k", http_options=gtypes.HttpOptions(base_url=gw.url, api_version="v1beta"))
    return c.models.generate_content(model=model, contents=[gtypes.Content(role="user", parts=[
        gtypes.Part(file_data=gtypes.FileData(file_uri=uri, mime_type="application/pdf")),
        gtypes.Part(text="SCENARIO:text summarise")])])


def test_gemini_file_data_passes_through_without_a_download(env):
    gw, up = env
    uri = "https://generativelanguage.googleapis.com/v1beta/files/abc-123"
    assert gemini_with_file(gw, "up-gemini", uri).text == "Hello from gemini"
    parts = sent_to(up, "up-gemini")["contents"][0]["parts"]
    assert parts[0] == {"fileData": {"mimeType": "application/pdf", "fileUri": uri}}
    assert not [q for q in up.requests if "files/abc-123" in q.path]  # never fetched


def test_gemini_file_data_for_another_family_is_a_400_in_gemini_shape(env):
    gw, _ = env
    with pytest.raises(gerrors.ClientError) as e:
        gemini_with_file(gw, "up-openai", "https://generativelanguage.googleapis.com/v1beta/files/abc-123")
    assert e.value.code == 400 and "files/abc-123" in e.value.message
