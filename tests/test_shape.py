"""Guards on the shape of the program: standard library only, Python 3.9+, table of contents in step."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "llm_mux.py")


def _imports(tree):
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and "ImportError" in ast.dump(h.type) for h in node.handlers):
            for sub in node.body:
                for n in ast.walk(sub):
                    if hasattr(n, "lineno"):
                        guarded.add(n.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno in guarded
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0], node.lineno in guarded


def test_imports_only_the_standard_library():
    tree = ast.parse(open(SOURCE, encoding="utf-8").read())
    bad = [(m, g) for m, g in _imports(tree)
           if m not in sys.stdlib_module_names and not (m == "uvloop" and g)]
    assert bad == [], "llm_mux.py imports outside the standard library: %r" % bad


def test_needs_no_python_newer_than_3_9():
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.path.exists(vermin):
        vermin = shutil.which("vermin")
    assert vermin, "vermin is missing (requirements-dev.txt)"
    out = subprocess.run([vermin, "--no-tips", "--violations", "--target=3.9-", "--eval-annotations",
                          "--backport", "typing", SOURCE], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_runs_under_python_3_9_when_available():
    candidates = [p for p in ("/root/.pyenv/versions/3.9.18/bin/python3.9", shutil.which("python3.9")) if p]
    usable = [p for p in candidates if os.path.exists(p) and
              subprocess.run([p, "-V"], capture_output=True).returncode == 0]
    if not usable:
        pytest.skip("no Python 3.9 interpreter on this machine")
    py39 = usable[0]
    out = subprocess.run([py39, SOURCE, "version"], capture_output=True, text=True)
    assert out.returncode == 0 and "llm-mux" in out.stdout, out.stderr


def test_table_of_contents_matches_banners():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "..", "shared", "tools", "check_shape.py")],
                         cwd=ROOT, capture_output=True, text=True)
    if "No such file" in out.stderr or not os.path.exists(os.path.join(ROOT, "..", "shared")):
        pytest.skip("../shared is not beside the checkout")
    assert out.returncode == 0, out.stdout + out.stderr


def test_serves_under_python_3_9_when_available(tmp_path):
    """vermin checks the source; this runs it: a gateway under 3.9 answers chat, streaming and Anthropic calls."""
    import json
    import signal
    import socket
    import time
    import urllib.request
    candidates = [p for p in ("/root/.pyenv/versions/3.9.18/bin/python3.9", shutil.which("python3.9")) if p]
    usable = [p for p in candidates if os.path.exists(p) and subprocess.run([p, "-V"], capture_output=True).returncode == 0]
    if not usable:
        pytest.skip("no Python 3.9 interpreter on this machine")
    from fakes import FakeUpstream, Reply, free_port, openai_completion, openai_stream_events
    up = FakeUpstream(lambda r: Reply("sse", events=openai_stream_events(("a", "b"))) if r.json.get("stream")
                      else Reply(body=openai_completion("py39 ok"))).start()
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: %d\nauth-dir: %s\nproviders:\n  - type: openai\n    name: f\n    base-url: %s/v1\n"
                   "    models: [m]\n" % (port, tmp_path / "auth", up.url))
    proc = subprocess.Popen([usable[0], SOURCE, "serve", "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.05)

        def post(path, body):
            req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.read().decode()
        chat = json.loads(post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}))
        assert chat["choices"][0]["message"]["content"] == "py39 ok"
        stream = post("/v1/chat/completions", {"model": "m", "stream": True,
                                               "messages": [{"role": "user", "content": "x"}]})
        chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "ab"
        assert stream.rstrip().endswith("data: [DONE]")
        msg = json.loads(post("/v1/messages", {"model": "m", "max_tokens": 5,
                                               "messages": [{"role": "user", "content": "x"}]}))
        assert msg["content"][0]["text"] == "py39 ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        up.stop()
    assert proc.returncode == 0
