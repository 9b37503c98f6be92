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
