"""The log's stderr handler (lines of one event-loop turn leave in one write) and the usage writer's queue."""
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


def test_lines_of_one_loop_turn_leave_in_one_write():
    logger, handler, stream = make_logger()

    async def main():
        for i in range(3):
            logger.info("line %d", i)
        assert stream.writes == []  # still in this turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(stream.writes) == 1
        logger.info("next turn")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    asyncio.run(main())
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 2)[2] for line in lines] == ["line 0", "line 1", "line 2", "next turn"]
    assert len(stream.writes) == 2


def test_without_a_running_loop_or_off_its_thread_a_line_is_written_at_once():
    logger, handler, stream = make_logger()
    logger.info("no loop")
    assert stream.getvalue().endswith("no loop\n")

    async def main():
        logger.info("on the loop")
        done = threading.Event()
        threading.Thread(target=lambda: (logger.info("from a thread"), done.set())).start()
        done.wait(10)
        # the thread has no loop: its line was written at once, with the loop's pending line before it
        assert "from a thread" in stream.getvalue()
        assert stream.getvalue().index("on the loop") < stream.getvalue().index("from a thread")
    asyncio.run(main())


def test_a_full_turn_is_written_without_waiting_and_shutdown_flushes_the_rest():
    logger, handler, stream = make_logger()

    async def main():
        for i in range(300):
            logger.info("n%d", i)
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
