"""A large request's unchanged members go upstream as the client's own bytes (llm_mux.JsonSource): the body is
parsed exactly as json.loads parses it (same values, same errors), only members equal to what was parsed — type for
type — are spliced, and what goes upstream is the same JSON a full encode would give. The suite runs with
LLM_MUX_CHECK_JSON_REUSE=1 (conftest), so every request of every other test goes through the splice and is checked
against a full encode; these tests also cover the production threshold."""
import http.client
import json
import os
import random

import pytest

import llm_mux
import upstreams
from fakes import FakeUpstream
from harness import GatewayThread, mutate_bytes

CASES = int(os.environ.get("LLM_MUX_FUZZ_CASES", "20000")) // 4

SEEDS = [b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \\"q\\" \\n"}], "stream": true}',
         b' \r\n{ "a" :1 ,"b":[1,2.5e3,{"c":null}] , "a" : {"x":"y"}}\t',
         b'{}', b'{ }', b'[1, 2]', b'"text"', b'12', b'{"k": "\xc3\xa9\xe2\x82\xac", "n": -0.0, "t": false}',
         b'{"deep": [[[[{"a": [1]}]]]], "s": "\\ud83d\\ude00"}']


def outcome(fn, raw):
    try:
        return "ok", fn(raw)
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


def reuse_parse(raw):
    value, source = llm_mux.JsonSource.parse(raw, llm_mux.STRICT_JSON)
    if source is not None:  # every span holds exactly its member's value
        text = source.text if isinstance(source.text, str) else source.text.decode("ascii")
        for key, (start, end) in source.spans.items():
            assert json.loads(text[start:end]) == value[key]
    return value


def loads(raw):
    return json.loads(raw, parse_constant=llm_mux._refuse_json_constant)


@pytest.mark.parametrize("raw", SEEDS + [b"\xef\xbb\xbf" + SEEDS[0], SEEDS[1].decode().encode("utf-16"),
                                         b'{"a": NaN}', b'{"a": 1} x', b'{"a" 1}', b'{"a": 1,}', b'{a: 1}', b"",
                                         b'{"a": "\xff"}', b'{"a": [' * 100000])
def test_parses_as_json_loads_does(raw):
    assert outcome(reuse_parse, raw) == outcome(loads, raw)


def test_mutated_bodies_parse_as_json_loads_does():
    """Fuzz: mutations of valid bodies give json.loads's value or json.loads's error, never another."""
    rng = random.Random(1201)
    extra = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\\u00", b" ", b"\n", b"NaN", b"1e", b"-", b"\xc3"]
    for _ in range(CASES):
        raw = mutate_bytes(rng, rng.choice(SEEDS), extra, SEEDS)
        assert outcome(reuse_parse, raw) == outcome(loads, raw), raw


def source_of(obj_text):
    raw = obj_text.encode("utf-8") if isinstance(obj_text, str) else obj_text
    value, source = llm_mux.JsonSource.parse(raw)
    return value, source


def test_equal_members_are_spliced_and_changed_ones_encoded():
    value, source = source_of('{"model" : "alias",  "messages" : [ {"role":"user",  "content":"hi \\u00e9"} ],'
                              ' "n": 1, "flags": [true, 1]}')
    body = {"model": "real", "messages": [{"role": "user", "content": "hi \u00e9"}], "n": True,
            "flags": [True, 1]}
    out = source.encode(body)
    text = out.decode("utf-8")
    assert '"messages":[ {"role":"user",  "content":"hi \\u00e9"} ]' in text  # the client's bytes, as sent
    assert '"model":"real"' in text
    assert '"n":true' in text  # 1 == True in Python, not on the wire: a changed type is encoded
    assert json.loads(out) == body


def test_non_ascii_and_bytearray_bodies():
    value, source = source_of(bytearray('{"messages": ["\u20ac \u00e9", "x"], "model": "m"}'.encode("utf-8")))
    assert isinstance(source.text, str)  # offsets of a non-ASCII body are the decoded text's
    out = source.encode({"model": "up", "messages": value["messages"]})
    assert out == '{"model":"up","messages":["\u20ac \u00e9", "x"]}'.encode("utf-8")
    value, source = source_of(bytearray(b'{"messages": ["a",  "b"], "model": "m"}'))
    assert source.encode({"model": "up", "messages": ["a", "b"]}) == b'{"model":"up","messages":["a",  "b"]}'


def test_envelope_members_are_spliced_inside_it():
    value, source = source_of('{"contents": [ {"parts": [{"text": "x"}]} ], "model": "m"}')
    inner = {"contents": [{"parts": [{"text": "x"}]}]}
    out = source.encode({"project": "p", "request": inner}, inner)
    assert out == b'{"project":"p","request":{"contents":[ {"parts": [{"text": "x"}]} ]}}'
    assert inner["contents"] == [{"parts": [{"text": "x"}]}]  # the stand-in is gone again


def test_production_threshold_splices_only_large_members(monkeypatch):
    monkeypatch.setattr(llm_mux.JsonSource, "REUSE_MIN", 4096)
    small, _ = source_of('{"a": [1,  2]}')
    assert _ is None  # a body below the threshold is not kept at all
    big = "y" * 5000
    raw = '{"model": "m", "messages": [ {"content": "%s"} ], "tools": [ 1,  2 ]}' % big
    value, source = source_of(raw)
    out = source.encode({"model": "u", "messages": value["messages"], "tools": value["tools"]})
    assert out == ('{"model":"u","messages":[ {"content": "%s"} ],"tools":[1,2]}' % big).encode()


def test_check_mode_catches_a_codec_that_edits_the_client_body():
    """The suite's safety net: a codec that changed the parsed body in place would make "equal to what was parsed"
    differ from "as the client sent it" — check mode (on in the suite) refuses such a splice."""
    assert llm_mux._JSON_REUSE_CHECK
    value, source = source_of('{"tools": [{"name": "t", "schema": {}}]}')
    value["tools"][0]["schema"]["added"] = True  # an in-place edit of the client's body
    with pytest.raises(AssertionError):
        source.encode({"tools": value["tools"]})


def post(gw, path, body_bytes, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("POST", path, body_bytes, dict({"Content-Type": "application/json"}, **(headers or {})))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


@pytest.fixture
def env():
    up = FakeUpstream(upstreams.handler).start()
    gw = GatewayThread(upstreams.CONFIG.format(url=up.url), fake_clock=False)
    yield gw, up
    gw.stop()
    up.stop()


def test_a_large_same_format_request_goes_upstream_as_the_client_wrote_it(env, monkeypatch):
    monkeypatch.setattr(llm_mux.JsonSource, "REUSE_MIN", 4096)
    gw, up = env
    history = ('[ {"role": "system", "content": "Be brief."},\n  {"role": "user", "content": "caf\\u00e9 %s '
               'SCENARIO:text hi"} ]' % ("z" * 300000))
    raw = ('{"model": "up-openai",\n "messages": %s, "temperature": 0.5}' % history).encode()
    status, data = post(gw, "/v1/chat/completions", raw)
    assert status == 200, data
    sent = up.requests[-1]
    assert sent.body.count(history.encode()) == 1  # spacing and escapes as the client wrote them
    assert json.loads(sent.body)["model"] == "m-openai"  # the alias resolved, as always
    assert json.loads(sent.body)["messages"] == json.loads(history)


def test_an_anthropic_bare_string_turn_and_tool_result_stay_bare(env):
    gw, up = env
    body = {"model": "up-anthropic", "max_tokens": 64, "messages": [
        {"role": "user", "content": "SCENARIO:text look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"p": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "file text"},
                                     {"type": "text", "text": "go on"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "again"}],
        "tools": [{"name": "read", "input_schema": {"type": "object"}}]}
    status, data = post(gw, "/v1/messages", json.dumps(body).encode(), {"anthropic-version": "2023-06-01"})
    assert status == 200, data
    sent = json.loads(up.requests[-1].body)
    assert sent["messages"] == body["messages"]  # string and block spellings each kept as the client chose


SCHEMA = {"type": "object", "$defs": {"P": {"type": "object", "properties": {"x": {"type": "string"}}}},
          "properties": {"a": {"$ref": "#/$defs/P"}, "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                         "c": {"type": ["integer", "null"], "const": 3, "title": "C"},
                         "d": {"allOf": [{"properties": {"y": {"type": "string"}}, "required": ["y"]},
                                         {"properties": {"z": {"type": "number"}}}], "properties": {"w": {}}}},
          "allOf": [{"properties": {"e": {"type": "boolean"}}, "required": ["e"]}], "required": ["a"],
          "additionalProperties": False}


def rich_bodies():
    from test_fuzz_codecs import SEEDS
    import copy
    bodies = copy.deepcopy(SEEDS)
    bodies["openai"]["tools"][0]["function"]["parameters"] = copy.deepcopy(SCHEMA)
    bodies["openai"]["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema":
                                                                                  copy.deepcopy(SCHEMA)}}
    bodies["anthropic"]["tools"][0]["input_schema"] = copy.deepcopy(SCHEMA)
    bodies["anthropic"]["messages"][0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    bodies["responses"]["tools"][0]["parameters"] = copy.deepcopy(SCHEMA)
    bodies["gemini"]["tools"][0]["functionDeclarations"][0]["parameters"] = copy.deepcopy(SCHEMA)
    bodies["gemini"]["toolConfig"] = {"functionCallingConfig": {"mode": "AUTO"}}
    bodies["gemini"]["safetySettings"] = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    return bodies


@pytest.mark.parametrize("fmt", ["openai", "responses", "anthropic", "gemini", "ollama"])
def test_codecs_treat_the_client_body_as_read_only(fmt):
    """JsonSource's promise rests on this: parsing a client body and building every upstream format from it
    (schemas cleaned for Gemini, closed for Anthropic's structured output, ...) leaves the parsed body as the
    client sent it, so a member equal to what was parsed is a member as the client sent it."""
    import copy
    from test_fuzz_codecs import parse
    body = rich_bodies()[fmt]
    pristine = copy.deepcopy(body)
    req = parse(fmt, body)
    for codec in (llm_mux.OpenAIChat, llm_mux.Anthropic, llm_mux.Gemini, llm_mux.Responses):
        codec.build_request(req, "m")
        assert body == pristine, codec.__name__


def test_codecs_leave_mutated_client_bodies_as_they_were():
    """The same promise over the codec fuzzer's mutations of rich bodies (values of the wrong type anywhere)."""
    import copy
    from test_fuzz_codecs import mutate, parse
    rng = random.Random(1202)
    bodies = rich_bodies()
    for _ in range(CASES // 5):
        fmt = rng.choice(sorted(bodies))
        body = mutate(rng, bodies[fmt])
        pristine = copy.deepcopy(body)
        try:
            req = parse(fmt, body)
        except llm_mux.GatewayError:
            continue
        for codec in (llm_mux.OpenAIChat, llm_mux.Anthropic, llm_mux.Gemini, llm_mux.Responses):
            codec.build_request(req, "m")
        assert body == pristine, (fmt, pristine)


def test_a_tool_call_keeps_the_object_its_arguments_came_as():
    """Anthropic's `input` and Gemini's `args` come as objects: the call keeps the object beside its text, so an
    upstream of an object-writing format gets it back unparsed — and parses anew once the text changes."""
    inp = {"path": "/src/a.py", "flags": ["x"]}
    req = llm_mux.Anthropic.parse_request({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read", "input": inp}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]})
    call = req.messages[1].parts[0]
    assert call.arguments == '{"path":"/src/a.py","flags":["x"]}' and call.args_object() is inp
    built = llm_mux.Anthropic.build_request(req, "m")["messages"][1]["content"][0]["input"]
    assert built is inp
    call.arguments = '{"path":"/src/b.py"}'  # the text changed: the kept object no longer speaks for it
    assert call.args_object() == {"path": "/src/b.py"}
    gem = llm_mux.Gemini.parse_request({"contents": [{"role": "model", "parts": [{"functionCall": {
        "name": "f", "args": inp}}]}]}, "m")
    assert gem.messages[0].parts[-1].args_object() is inp


@pytest.mark.parametrize("body", ['{"a":1}', ' \n{"a":[1,2.5,null,true]}\t', '{"a":1} x', '{"a":1}{}', "", "  ",
                                  "[", "nul", '"s"', "1", "-0", "NaN", '{"a":Infinity}', "\ufeff{}", '{"a":"\\ud800"}',
                                  b'{"a":"\xc3\xa9"}', b"\xff{", b"\xef\xbb\xbf{}", bytearray(b"[1]"),
                                  '{"a":1}'.encode("utf-16"), b'"\xed\xa0\x80"', None, 5, ["x"]])
def test_json_or_none_reads_what_json_loads_reads(body):
    """json_or_none reads with the C scanner directly; whatever the input (text, bytes in any JSON encoding,
    trailing data, a BOM, not JSON at all, not text at all) it answers what json.loads would, or None where that
    raises."""
    try:
        expected = json.loads(body)
    except (ValueError, TypeError):
        expected = None
    got = llm_mux.json_or_none(body)
    assert repr(got) == repr(expected)


def test_json_dumps_writes_what_the_configured_encoder_writes():
    """json_dumps is the C encoder built once; its text is the JSONEncoder's (compact, non-ASCII kept, floats as
    repr, NaN allowed, key order kept), and an object it cannot encode is the same TypeError."""
    samples = [{"b": 1, "a": [1.5, -0.0, 1e300, float("nan"), None, True, False]}, "é\n\u2028\"\\", [], {},
               {"nested": [{"x": "y" * 50}] * 3}, 12345678901234567890, -1.25e-7]
    for value in samples:
        assert llm_mux.json_dumps(value) == llm_mux._json_encoder.encode(value)
        assert llm_mux.json_bytes(value) == llm_mux._json_encoder.encode(value).encode("utf-8")
    with pytest.raises(TypeError):
        llm_mux.json_dumps({"a": object()})
