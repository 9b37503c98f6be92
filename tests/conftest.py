import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest



def pytest_configure(config):
    # The Anthropic SDK warns about model ids it knows to be retiring; the tests use such ids on purpose.
    config.addinivalue_line("filterwarnings", r"ignore:The model .* is deprecated")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fakes import FakeUpstream, free_port  # noqa: E402


class Gateway:
    """A real `llm_mux` process on 127.0.0.1 with a config written by the test."""

    def __init__(self, tmp_path, config, env=None, args=(), scheme="http", wait=True):
        self.port = free_port()
        self.dir = tmp_path
        self.config_path = os.path.join(str(tmp_path), "config.yaml")
        text = textwrap.dedent(config).replace("{port}", str(self.port))
        if "port:" not in text:
            text = "port: %d\n" % self.port + text
        if "auth-dir:" not in text:
            text += "\nauth-dir: %s\n" % os.path.join(str(tmp_path), "auth")
        with open(self.config_path, "w") as f:
            f.write(text)
        self.env = dict(os.environ)
        self.env["XDG_CONFIG_HOME"] = os.path.join(str(tmp_path), "xdg")
        self.env.pop("LLM_MUX_CONFIG", None)
        self.env.update(env or {})
        self.log_path = os.path.join(str(tmp_path), "gateway.log")
        self.log = open(self.log_path, "wb")
        self.scheme = scheme
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "llm_mux.py"), "serve", "--config",
                                      self.config_path] + list(args), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env)
        if wait:
            self.wait_ready()

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def wait_ready(self, timeout=15):
        deadline = time.time() + timeout
        import socket
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("gateway exited with %s:\n%s" % (self.proc.returncode, self.output()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not start:\n" + self.output())

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def gateway(tmp_path):
    started = []

    def start(config, **kw):
        g = Gateway(tmp_path, config, **kw)
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


@pytest.fixture
def upstream():
    started = []

    def start(handler=None, **kw):
        u = FakeUpstream(handler, **kw).start()
        started.append(u)
        return u

    yield start
    for u in started:
        u.stop()


def openai_provider_config(upstream_url, keys=("sk-up-1",), models=(("gpt-test", ""),), name="fake", extra=""):
    lines = ["providers:", "  - type: openai", "    name: %s" % name, "    base-url: %s/v1" % upstream_url,
             "    api-keys:"]
    for k in keys:
        lines.append("      - key: %s" % k)
    lines.append("    models:")
    for n, a in models:
        lines.append("      - name: %s" % n)
        if a:
            lines.append("        alias: %s" % a)
    if extra:
        lines.append(textwrap.indent(textwrap.dedent(extra).strip("\n"), "    "))
    return "\n".join(lines) + "\n"


def read_login_url(proc, marker):
    """Read a login subprocess's output until the authorization URL (containing `marker`) appears."""
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        if marker in line:
            return line.strip()


def play_browser(port, path, state, code="the-code", timeout=10):
    """What the browser does after the user approves: GET the local callback with a code and the state."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s?code=%s&state=%s" % (port, path, code, state),
                                        timeout=5) as r:
                return r.read()
        except urllib.error.HTTPError:
            raise
        except OSError:
            assert time.time() < deadline, "the login's callback listener never came up"
            time.sleep(0.05)
