"""The watchers on their own clock: a config edit or a credential-file drop is applied on the second poll that
sees it (the debounce), never the first, and every `interval` of the clock is one poll; nothing here waits on real
time. With the default interval of 0.25 s a change is live within half a second."""
import asyncio
import json
import os

import llm_mux
from harness import FakeClock


def config_watcher(tmp_path, applied):
    path = tmp_path / "config.yaml"
    path.write_text("request-retry: 1\n")
    return path, llm_mux.ConfigWatcher(str(path), applied.append, environ={}, clock=FakeClock())


def test_a_config_edit_is_applied_on_the_second_poll(tmp_path):
    applied = []
    path, w = config_watcher(tmp_path, applied)
    assert w.check() is False  # nothing changed
    path.write_text("request-retry: 4\n")
    assert w.check() is False and applied == []  # first sight: maybe the editor is still writing
    assert w.check() is True and applied[0].request_retry == 4
    assert w.check() is False and len(applied) == 1  # applied once


def test_a_broken_config_edit_is_not_applied(tmp_path):
    applied = []
    path, w = config_watcher(tmp_path, applied)
    path.write_text("request-retry: [unclosed\n")
    w.check()
    assert w.check() is False and applied == []


def test_a_credential_file_drop_is_applied_on_the_second_poll(tmp_path):
    auth = tmp_path / "auth"
    auth.mkdir()
    applied = []
    w = llm_mux.AuthDirWatcher(lambda: str(auth), lambda: {}, applied.append, clock=FakeClock())
    (auth / "claude-a.json").write_text(json.dumps({"type": "claude", "email": "a@x", "access_token": "at"}))
    os.chmod(auth / "claude-a.json", 0o600)
    assert w.check() is False and applied == []
    assert w.check() is True and list(applied[0]) == ["claude-a.json"]


def test_polls_follow_the_clock(tmp_path):
    applied = []
    path, w = config_watcher(tmp_path, applied)
    clock, start = w.clock, w.clock.t
    w.apply = lambda cfg: applied.append(clock.t)
    path.write_text("request-retry: 2\n")

    async def run():
        w.start()
        while not applied:
            await asyncio.sleep(0)
        w.stop()
    asyncio.run(asyncio.wait_for(run(), 10))
    assert applied == [start + 0.5]  # applied at the second poll, 2 x 0.25 s of the clock after the edit
