"""The YAML-subset reader (differential against PyYAML with YAML 1.2 core types) and configuration loading."""
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

import llm_mux
from llm_mux import Config, ConfigError, YamlError, yaml_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference", "gateway.md")


class Core12Loader(yaml.SafeLoader):
    """PyYAML resolving plain scalars by the YAML 1.2 core schema (PyYAML itself implements 1.1)."""


Core12Loader.yaml_implicit_resolvers = {}
Core12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
Core12Loader.add_implicit_resolver("tag:yaml.org,2002:int",
                                   re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
Core12Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"),
                                   ["~", "n", "N", ""])


def _core_int(loader, node):
    v = loader.construct_scalar(node)
    if v.startswith("0o"):
        return int(v[2:], 8)
    if v.startswith("0x"):
        return int(v[2:], 16)
    return int(v, 10)


Core12Loader.add_constructor("tag:yaml.org,2002:int", _core_int)


def same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


CORPUS = [
    "a: 1\nb: two\nc: 3.5\nd: true\ne: ~\nf: null\ng:\n",
    "port: 8317\nhost: \"::1\"\nname: 'it''s'\nurl: http://x:1/y#frag\nempty: ''\n",
    "list:\n  - 1\n  - two\n  - [a, b]\n  - {k: v}\n",
    "compact:\n- a\n- b\nnext: 1\n",
    "providers:\n  - type: openai\n    name: x\n    api-keys:\n      - key: k1\n      - key: k2\n        proxy-url: socks5://u:p@h:1\n    models:\n      - name: a\n        alias: b\n",
    "nested:\n  deeper:\n    deepest: value   # comment\n  other: [1, 2, 3]\n",
    "# leading comment\n\nkey: value # trailing\n# another\nk2: 'v # not a comment'\n",
    "flow: {a: 1, b: [x, y], c: {d: e}, 'q': \"r\"}\n",
    "multi: [\n  one,\n  two,\n  three,\n]\n",
    "json: {\"a\":1, \"b\":[true,false,null]}\n",
    "lit: |\n  line one\n  line two\n\n  after blank\nnext: x\n",
    "keep: |+\n  text\n\n\nnext: x\n",
    "strip: |-\n  text\n\n",
    "fold: >\n  folded\n  text here\n\n  new para\n    indented\n  back\n",
    "foldstrip: >-\n  a\n  b\n",
    "indent: |2\n    two extra\n  base\n",
    "esc: \"tab\\tnl\\nuni\\u00e9 \\x41 q\\\" bs\\\\\"\n",
    "types: [0o17, 0x1F, -12, +7, 1e3, -.5, .inf, -.Inf, .nan, yes, no, on, off, 2001-12-14, 017]\n",
    "plain: this is a long value\n  continued here\nk: v\n",
    "key with spaces: value\n'quoted key': 1\n\"dq key\": 2\n",
    "colon: a:b\nurl: https://h/x:y\ntime: 12:30\n",
    "---\na: 1\n",
    "seq_of_seq:\n- - a\n  - b\n- - c\n",
    "seq_maps:\n  - a: 1\n    b: 2\n  -\n    c: 3\n",
    "empty_flow: []\nempty_map: {}\n",
    "routing:\n  provider-priority: {claude: 1, antigravity: 2}\n  aliases: {\"claude-sonnet-4.5\": \"claude-sonnet-4-5\"}\n  fallbacks: {\"claude-opus-4-5\": [\"claude-sonnet-4-5\", \"gpt-4o\"]}\n",
    "upstream-overrides:\n  \"https://api.anthropic.com\": \"http://127.0.0.1:9001\"\n",
    "unicode: héllo wörld ✓\n",
    "trailing: value   \n",
    "neg: -1\nq: '-'\n",
    llm_mux.DEFAULT_CONFIG_TEXT,
]


def reference_examples():
    """Every fenced example in gateway.md that PyYAML reads as a mapping (the brief's compatibility corpus)."""
    if not os.path.exists(REFERENCE):
        return []
    text = open(REFERENCE, encoding="utf-8").read()
    out = []
    for block in re.findall(r"```(?:yaml)?\n(.*?)```", text, re.S):
        try:
            data = yaml.load(block, Loader=Core12Loader)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict):
            out.append(block)
    # Inline examples from the key tables, e.g. `routing.provider-priority` shapes.
    for m in re.findall(r"`([a-z][a-z-]*: \{[^`]*\})`", text):
        out.append(m + "\n")
    return out


@pytest.mark.parametrize("text", CORPUS + reference_examples())
def test_yaml_subset_matches_pyyaml_core_schema(text):
    expected = yaml.load(text, Loader=Core12Loader)
    got, _ = yaml_load(text)
    assert same(got, expected), (got, expected)


def test_reference_corpus_is_not_empty():
    if not os.path.exists(REFERENCE):
        pytest.skip("../shared not beside the checkout")
    assert len(reference_examples()) >= 2


@pytest.mark.parametrize("text, line, col, words", [
    ("a: &anchor 1\n", 1, 4, "anchors"),
    ("a: 1\nb: *anchor\n", 2, 4, "aliases"),
    ("a: !!str 1\n", 1, 4, "tags"),
    ("a:\n\tb: 1\n", 2, 1, "tabs"),
    ("a: 1\na: 2\n", 2, 1, "duplicate"),
    ("a: 1\n---\nb: 2\n", 2, 1, "several documents"),
    ("a: 'unterminated\n", 1, 4, "unterminated"),
    ("a: [1, 2\n", 1, 4, "unterminated"),
    ("a:\n  b: 1\n c: 2\n", 3, 2, "indentation"),
    ("? complex\n: value\n", 1, 1, "complex"),
    ("a: b: c\n", 1, 5, "mapping value"),
    ("a: \"bad \\q escape\"\n", 1, 9, "escape"),
    ("dash: -\n", 1, 7, "followed by a value"),
])
def test_yaml_outside_the_subset_is_an_error_with_position(text, line, col, words):
    with pytest.raises(YamlError) as e:
        yaml_load(text, "cfg.yaml")
    assert (e.value.line, e.value.col) == (line, col), str(e.value)
    assert words in str(e.value)
    assert str(e.value).startswith("cfg.yaml:%d:%d:" % (line, col))


def test_positions_point_at_keys():
    _, pos = yaml_load("a:\n  b: 1\nlist:\n  - x: 1\n")
    assert pos[("a", "b")] == (2, 3)
    assert pos[("list", 0, "x")] == (4, 5)


def test_defaults_without_a_file():
    cfg = Config.defaults(environ={})
    assert cfg.port == 8317 and cfg.host == "127.0.0.1"
    assert cfg.disable_auth is False and cfg.api_keys == []
    assert cfg.max_request_size == 52428800 and cfg.request_retry == 3 and cfg.stream_timeout == 600
    assert cfg.providers == []


def test_wrong_type_is_an_error_naming_key_line_and_type():
    with pytest.raises(ConfigError) as e:
        Config.from_text("port: 8317\nrequest-retry: lots\n", "c.yaml", environ={})
    msg = str(e.value)
    assert "c.yaml:2:" in msg and "request-retry" in msg and "an integer" in msg
    with pytest.raises(ConfigError) as e:
        Config.from_text("tls:\n  enable: 'yes'\n", "c.yaml", environ={})
    assert "c.yaml:2:" in str(e.value) and "tls.enable" in str(e.value) and "true or false" in str(e.value)
    with pytest.raises(ConfigError) as e:
        Config.from_text("providers:\n  - type: openai\n    models: nope\n", "c.yaml", environ={})
    assert "providers[0].models" in str(e.value) and "c.yaml:3:" in str(e.value)


def test_unknown_key_is_a_warning_with_its_line():
    cfg = Config.from_text("port: 1\nmystery: 2\ntls:\n  enabel: true\n", "c.yaml", environ={})
    assert any("c.yaml:2:1" in w and "mystery" in w for w in cfg.warnings)
    assert any("c.yaml:4:3" in w and "tls.enabel" in w for w in cfg.warnings)


def test_env_overrides_win_over_the_file():
    env = {"LLM_MUX_PORT": "9999", "LLM_MUX_API_KEYS": " a, b ,,", "LLM_MUX_DEBUG": "yes",
           "LLM_MUX_STREAM_TIMEOUT": "notanumber", "LLM_MUX_PROXY_URL": "socks5://p:1", "LLM_MUX_HOST": "::1"}
    cfg = Config.from_text("port: 1\napi-keys: [z]\n", "c.yaml", environ=env)
    assert cfg.port == 9999 and cfg.api_keys == ["a", "b"] and cfg.debug is True
    assert cfg.stream_timeout == 600  # unparsable ints are ignored
    assert cfg.proxy_url == "socks5://p:1" and cfg.host == "::1"


def test_existing_llm_mux_config_loads_unchanged():
    text = """
port: 8317
auth-dir: "$XDG_CONFIG_HOME/llm-mux/auth"
disable-auth: true
api-keys: []
proxy-url: ""
request-retry: 3
max-retry-interval: 30
stream-timeout: 600
quota-window: 300
quota-exceeded: {switch-project: true, switch-preview-model: true}
usage: {dsn: "", batch-size: 100, flush-interval: 5s, retention-days: 30}
remote-management: {allow-remote: false}
ws-auth: false
ampcode: {upstream-url: "", upstream-api-key: "", restrict-management-to-localhost: true, model-mappings: []}
payload: {default: [], override: []}
use-canonical-translator: true
max-request-size: 52428800
max-response-size: 104857600
oauth-excluded-models:
  gemini-cli: ["gemini-2.5-flash-lite", "*-preview"]
routing:
  provider-priority: {claude: 1, antigravity: 2}
  aliases: {"claude-sonnet-4.5": "claude-sonnet-4-5"}
  fallbacks: {"claude-opus-4-5": ["claude-sonnet-4-5", "gpt-4o"]}
providers:
  - type: openai
    name: DeepSeek
    base-url: https://api.deepseek.com/v1/
    api-keys:
      - key: sk-1
      - key: sk-2
        proxy-url: socks5://127.0.0.1:1080
    headers: {X-Custom: v}
    models:
      - name: deepseek-chat
        alias: ds
    excluded-models: ["*-reasoner"]
  - type: gemini
    api-key: AIza-x
  - type: anthropic
    enabled: false
    api-key: sk-ant
"""
    cfg = Config.from_text(text, "old.yaml", environ={"XDG_CONFIG_HOME": "/x"})
    assert cfg.warnings == []
    assert [p.type for p in cfg.providers] == ["openai", "gemini"]
    p = cfg.providers[0]
    assert p.provider_id == "deepseek" and p.base_url == "https://api.deepseek.com/v1"
    assert p.keys == [("sk-1", ""), ("sk-2", "socks5://127.0.0.1:1080")]
    assert p.models == [("deepseek-chat", "ds")] and p.headers == [("X-Custom", "v")]
    assert cfg.routing["fallbacks"] == {"claude-opus-4-5": ["claude-sonnet-4-5", "gpt-4o"]}


@pytest.mark.parametrize("entry, says", [
    ("  - type: openai\n    name: nourl\n    models: [m]\n", "c.yaml:2:3: providers[0] (nourl): base-url is required"),
    ("  - type: openai\n    base-url: http://x/v1\n", "models is required for type openai: list what"),
    ("  - type: anthropic\n", "no api-key: add api-key"),
    ("  - type: bogus\n", "type 'bogus' is not one of openai, anthropic"),
])
def test_an_incomplete_provider_entry_stops_start_up_with_the_fix(entry, says):
    with pytest.raises(ConfigError) as e:
        Config.from_text("providers:\n" + entry, "c.yaml", environ={})
    assert says in str(e.value)


def test_config_lookup_order(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "LLM_MUX_CONFIG": str(tmp_path / "env.yaml")}
    assert llm_mux.find_config_path("/cli.yaml", env) == ("/cli.yaml", False)
    assert llm_mux.find_config_path(None, env) == (str(tmp_path / "env.yaml"), False)
    del env["LLM_MUX_CONFIG"]
    assert llm_mux.find_config_path(None, env) == (str(tmp_path / "xdg" / "llm-mux" / "config.yaml"), True)


def test_first_run_writes_a_commented_default_config(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    cfg, path, created = llm_mux.load_config_for_cli(None, env)
    assert created and path == str(tmp_path / "llm-mux" / "config.yaml")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    text = open(path).read()
    assert text.startswith("#") and "providers:" in text
    assert cfg.warnings == [] and cfg.port == 8317
    _, _, created_again = llm_mux.load_config_for_cli(None, env)
    assert not created_again
    with pytest.raises(ConfigError, match="not found"):
        llm_mux.load_config_for_cli(str(tmp_path / "missing.yaml"), env)


def test_serve_with_bad_config_exits_with_one_line_reason(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("port: [1\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config", str(p)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "c.yaml:1:7" in lines[0] and "unterminated" in lines[0]
