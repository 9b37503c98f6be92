"""Write-back of config.yaml (gateway.md §2.12, done better): a change rewrites only the lines whose values change;
comments, key order, quoting and blank lines of every other line stay byte for byte; the result reads back (with
our reader and with PyYAML) as exactly the data asked for; writes are atomic and serialised; the watcher does not
reload the gateway's own write."""
import copy
import difflib
import os
import random
import threading

import pytest
import yaml

import llm_mux
from harness import FakeClock

TEXT = llm_mux.DEFAULT_CONFIG_TEXT.replace("api-keys: []\n", "") + """
# client keys, one per team
api-keys:
  - sk-one          # laptop
  - 'sk-two'
  - key: "sk-three"
    name: three     # CI
    rpm: 5
quota-exceeded: {switch-project: true, switch-preview-model: false}
oauth-excluded-models:
  claude:
    - "*-haiku*"    # too small

# routing
routing:
  aliases:
    fast: gpt-4o-mini
"""


def edit(change, text=TEXT):
    want = copy.deepcopy(llm_mux.yaml_load(text)[0])
    change(want)
    out = llm_mux.yaml_edit(text, want)
    assert llm_mux.yaml_load(out)[0] == want
    assert yaml.safe_load(out) == want  # PyYAML reads the same data
    return out


def diff(a, b):
    return [l for l in difflib.ndiff(a.splitlines(), b.splitlines()) if l[:1] in "+-"]


def test_a_scalar_change_touches_one_line_keeping_quotes_and_comment():
    out = edit(lambda d: d["api-keys"].__setitem__(1, "sk-2"))
    assert diff(TEXT, out) == ["-   - 'sk-two'", "+   - 'sk-2'"]
    out = edit(lambda d: d["api-keys"][2].__setitem__("key", "sk-3"))
    assert diff(TEXT, out) == ['-   - key: "sk-three"', '+   - key: "sk-3"']
    out = edit(lambda d: d["api-keys"][2].__setitem__("name", "ci"))
    assert diff(TEXT, out) == ["-     name: three     # CI", "+     name: ci     # CI"]


def test_flow_style_stays_flow_and_insertions_go_beside_their_siblings():
    out = edit(lambda d: d["quota-exceeded"].__setitem__("switch-project", False))
    assert diff(TEXT, out) == ["- quota-exceeded: {switch-project: true, switch-preview-model: false}",
                               "+ quota-exceeded: {switch-project: false, switch-preview-model: false}"]
    out = edit(lambda d: d["routing"]["aliases"].__setitem__("smart", "claude-opus-4-5"))
    lines = out.splitlines()
    assert lines[lines.index("    fast: gpt-4o-mini") + 1] == "    smart: claude-opus-4-5"
    out = edit(lambda d: d["api-keys"][2].__setitem__("tpm", 1000))
    assert diff(TEXT, out) == ["+     tpm: 1000"]


def test_list_items_are_removed_and_appended_without_touching_the_rest():
    out = edit(lambda d: d["api-keys"].pop(0))
    assert diff(TEXT, out) == ["-   - sk-one          # laptop"]
    out = edit(lambda d: d["api-keys"].append({"key": "sha256:ab", "name": "new", "models": ["a*"]}))
    assert diff(TEXT, out) == ["+   - key: sha256:ab", "+     name: new", "+     models:", "+       - a*"]
    out = edit(lambda d: d.pop("oauth-excluded-models"))
    assert diff(TEXT, out) == ['- oauth-excluded-models:', '-   claude:', '-     - "*-haiku*"    # too small']


def test_strings_that_need_quotes_get_them():
    for value in ["a: b", "x #y", "true", "123", "", "  pad", "line\nbreak", "null", "@at", "[x]", "é ü", "'q'"]:
        edit(lambda d: d.__setitem__("proxy-url", value))
        edit(lambda d: d["api-keys"].__setitem__(0, value))


def test_random_edits_always_read_back_and_keep_untouched_lines():
    rng = random.Random(1234)
    keys = ["debug", "request-retry", "proxy-url", "new-key", "quota-window", "api-keys", "routing"]
    values = [True, False, 0, 7, "x", "sk-" + "z" * 20, [], ["a", "b"], {"k": "v"}, {"nested": {"deep": [1, 2]}}]
    for _ in range(300):
        text = TEXT
        for _ in range(rng.randint(1, 4)):
            k, v = rng.choice(keys), copy.deepcopy(rng.choice(values))
            text = edit(lambda d: d.__setitem__(k, v) if rng.random() < 0.85 or k not in d else d.pop(k), text)
        untouched = [l for l in TEXT.splitlines() if l.startswith("#")]
        assert all(l in text.splitlines() for l in untouched)


def test_config_file_validates_before_writing_and_keeps_the_mode(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(TEXT)
    os.chmod(path, 0o640)
    cf = llm_mux.ConfigFile(str(path), environ={})
    with pytest.raises(llm_mux.ConfigError) as e:
        cf.update(lambda d: d.__setitem__("port", "not a port"))
    assert "port" in str(e.value) and path.read_text() == TEXT
    cfg = cf.update(lambda d: d.__setitem__("debug", True))
    assert cfg.debug is True and oct(os.stat(path).st_mode & 0o777) == "0o640"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # the temp file was renamed, not left behind


def test_concurrent_writers_are_serialised(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(TEXT)
    cf = llm_mux.ConfigFile(str(path), environ={})
    other = llm_mux.ConfigFile(str(path), environ={})  # a second writer object: the flock serialises them too

    def add(i):
        (cf if i % 2 else other).update(lambda d: d["api-keys"].append("sk-thread-%02d" % i))
    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = llm_mux.yaml_load(path.read_text())[0]["api-keys"]
    assert sorted(k for k in keys if isinstance(k, str) and k.startswith("sk-thread-")) == \
        ["sk-thread-%02d" % i for i in range(16)]


def test_the_watcher_does_not_reload_the_gateways_own_write(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(TEXT)
    cf = llm_mux.ConfigFile(str(path), environ={})
    applied = []
    w = llm_mux.ConfigWatcher(str(path), applied.append, environ={}, clock=FakeClock(),
                              own_digest=lambda: cf.own_digest)
    cf.update(lambda d: d.__setitem__("debug", True))
    assert w.check() is False and w.check() is False and applied == []
    path.write_text(path.read_text().replace("request-retry: 3", "request-retry: 4"))  # a person's edit
    w.check()
    assert w.check() is True and applied[0].request_retry == 4
