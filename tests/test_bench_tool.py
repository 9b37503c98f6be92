"""tools/bench.py's slow-stream machinery, run small through a real gateway: the fake upstream sends as many
stamped chunks as the request's max_tokens asks, and the client sees every stream end and every chunk's delay.
Functional only: no figure is asserted (speed lives in the benchmark, not in tests)."""
import asyncio
import os
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench  # noqa: E402


def test_slow_streams_through_the_gateway_are_counted_whole(gateway):
    port = bench.free_port()
    upstream = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--serve-upstream",
                                 str(port)])
    try:
        bench.wait_port(port)
        gw = gateway("api-keys: [bench]\nproviders:\n  - type: openai\n    name: bench\n"
                     "    base-url: http://127.0.0.1:%d/v1\n    api-key: k\n    models:\n      - name: bench-slow\n"
                     % port)
        completed, delays, all_open, most_open, first_end = asyncio.run(
            bench.run_slow_streams(gw.port, 20, ramp=0.2, chunks=4))
    finally:
        upstream.kill()
        upstream.wait()
    assert completed == 20 and most_open <= 20
    assert len(delays) == 20 * 4  # every stamped chunk arrived, and once
    assert all(d >= 0 for _, d in delays) and first_end > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instruction_counts_cover_only_the_window_and_repeat(tmp_path):
    """`--only instructions` machinery: a process under callgrind (here the bench's own fake upstream) is counted
    only between the window's zero and dump, per request, not with the process's start-up; the same work counts
    the same (the A/B measure's point)."""
    port = bench.free_port()
    out = str(tmp_path / "up.cg")
    proc = bench._callgrind([os.path.join(ROOT, "tools", "bench.py"), "--serve-upstream", str(port)], out)
    try:
        bench.wait_port(port, 120)
        body = b'{"model": "bench-model", "messages": []}'
        first = bench._requests_instructions(proc, out, port, "/v1/chat/completions", body, 20)
        again = bench._requests_instructions(proc, out, port, "/v1/chat/completions", body, 20)
        with bench._callgrind_window(proc, out) as idle:
            pass
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert 1000 < first < 2000000  # a request, not the interpreter's start-up (tens of millions)
    assert abs(first - again) < 0.1 * first
    assert idle.instructions < first * 5  # an empty window holds no request
