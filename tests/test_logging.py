"""The log's stderr handler (access lines of one event-loop turn leave in one write) and the usage writer's queue."""
import asyncio
import io
import logging
import threading

import llm_mux


class CountingStream(io.StringIO):
    def __init__(self):
        io.StringIO.__init__(self)
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return io.StringIO.write(self, text)


def make_logger():
    stream = CountingStream()
    handler = llm_mux.LoopStreamHandler(stream)
    handler.setFormatter(llm_mux.LOG_FORMAT)
    logger = logging.Logger("test-loop-stream")
    logger.addHandler(handler)
    return logger, handler, stream


def test_access_lines_of_one_loop_turn_leave_in_one_write():
    logger, handler, stream = make_logger()

    async def main():
        for i in range(3):
            logger.info("access %d", i, extra=llm_mux.AFTER_TURN)
        assert stream.writes == []  # still in this turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(stream.writes) == 1
        logger.info("next turn", extra=llm_mux.AFTER_TURN)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    asyncio.run(main())
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 2)[2] for line in lines] == ["access 0", "access 1", "access 2", "next turn"]
    assert len(stream.writes) == 2


def test_any_other_line_is_written_at_once_after_the_waiting_ones():
    logger, handler, stream = make_logger()
    logger.info("no loop", extra=llm_mux.AFTER_TURN)
    assert stream.getvalue().endswith("no loop\n")

    async def main():
        logger.info("access", extra=llm_mux.AFTER_TURN)
        logger.info("setting changed")  # what a handler logs is out before its response
        assert [line.split("] ", 2)[2] for line in stream.getvalue().splitlines()[-2:]] == ["access", "setting changed"]
        logger.info("access 2", extra=llm_mux.AFTER_TURN)
        done = threading.Event()
        threading.Thread(target=lambda: (logger.info("from a thread", extra=llm_mux.AFTER_TURN), done.set())).start()
        done.wait(10)
        # the thread has no loop: its line was written at once, with the loop's waiting line before it
        assert stream.getvalue().index("access 2") < stream.getvalue().index("from a thread")
    asyncio.run(main())


def test_a_full_turn_is_written_without_waiting_and_shutdown_flushes_the_rest():
    logger, handler, stream = make_logger()

    async def main():
        for i in range(300):
            logger.info("n%d", i, extra=llm_mux.AFTER_TURN)
        assert len(stream.writes) == 1 and stream.getvalue().count("\n") == 256
        handler.flush()  # what logging.shutdown() does at exit
        assert stream.getvalue().count("\n") == 300
    asyncio.run(main())


def test_the_time_stamp_follows_each_second():
    stamps = []
    for created in (1700000000.2, 1700000000.9, 1700000001.1):
        record = logging.LogRecord("x", logging.INFO, "", 0, "m", (), None)
        record.created = created
        stamps.append(llm_mux.LOG_FORMAT.format(record).split("]")[0])
    assert stamps[0] == stamps[1] != stamps[2]


def test_a_full_usage_queue_drops_and_counts_records():
    class Store:
        writable = True
        path = "mem"
        written = []

        def write(self, records):
            self.written.extend(records)

        def close(self):
            pass
    store = Store()
    writer = llm_mux.UsageWriter(store, flush_interval=3600, queue_size=5)
    for i in range(8):
        writer.record({"n": i})
    assert writer.dropped == 3 and writer.lost == 3
    writer.close()  # drains what was queued
    assert [r["n"] for r in store.written] == [0, 1, 2, 3, 4]


def test_a_line_masks_secrets_escapes_controls_and_keeps_a_masked_traceback():
    secret = "sk-live-0123456789abcdef"
    saved = llm_mux.SECRET_MASK.secrets
    llm_mux.SECRET_MASK.update(saved | {secret})
    try:
        logger, handler, stream = make_logger()
        logger.warning("model %r from %s", "evil\nmodel", "key " + secret)
        try:
            raise ValueError("upstream said: bad key " + secret)
        except ValueError:
            logger.exception("call failed\tfor %s", secret)
    finally:
        llm_mux.SECRET_MASK.update(saved)
    text = stream.getvalue()
    assert secret not in text
    lines = text.splitlines()
    assert lines[0].endswith("[WARNING] model 'evil\\nmodel' from key sk-l...cdef")  # one line: the LF escaped
    assert lines[1].endswith("[ERROR] call failed for sk-l...cdef")  # a tab is a space
    assert lines[2] == "Traceback (most recent call last):"  # the traceback keeps its lines
    assert lines[-1] == "ValueError: upstream said: bad key sk-l...cdef"
