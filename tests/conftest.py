"""Fixtures; the helpers they build on live in harness.py."""
import os

# Every request body in the suite has its unchanged members written with the client's bytes (however small) and
# each such body checked against a full encode (llm_mux.JsonSource); gateway subprocesses inherit this.
os.environ.setdefault("LLM_MUX_CHECK_JSON_REUSE", "1")

import pytest  # noqa: E402

from harness import FakeUpstream, Gateway
from pgkit import fresh_database, need_shared


def pytest_configure(config):
    # The Anthropic SDK warns about model ids it knows to be retiring; the tests use such ids on purpose.
    config.addinivalue_line("filterwarnings", r"ignore:The model .* is deprecated")


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


@pytest.fixture
def pgdb():
    """A fresh database on the machine's PostgreSQL for one test, dropped after it."""
    need_shared()
    url, drop = fresh_database()
    yield url
    drop()
