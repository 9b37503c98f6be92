"""The Channel's read deadline: one timer (the alarm) serves every read of a connection — a stream's reads each
move the deadline on, and the alarm is set again only when it rings — and it still times out exactly the read
under way once that read's deadline has come. Timers fire in deadline order, so these tests depend on ordering,
not on how fast the machine is. Also: the collector tuned for many live streams."""
import asyncio

import pytest

import llm_mux


class Transport:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))

    def is_closing(self):
        return False

    def close(self):
        pass


def channel():
    ch = llm_mux.Channel()
    ch.connection_made(Transport())
    return ch


async def read_answered(ch, deadline, data, wait=0.0):
    """A read with `deadline` that `data` answers after `wait` seconds (0: at once); asserts it was still
    waiting then."""
    read = asyncio.ensure_future(ch.fill(deadline))
    await asyncio.sleep(wait)
    assert not read.done()
    ch.data_received(data)
    await read


def test_one_alarm_serves_many_reads():
    async def run():
        loop = asyncio.get_running_loop()
        ch = channel()
        alarms, first = [], loop.time() + 60
        for i in range(20):
            await read_answered(ch, first + i, b"x")  # each read moves the deadline on
            alarms.append(ch._alarm)
        assert len(set(map(id, alarms))) == 1  # made once, not once per read
        assert alarms[0].when() == first  # it rings at the first deadline, then is set again for the newest
        ch.connection_lost(None)
        assert ch._alarm is None and alarms[0].cancelled()  # a closed connection holds no timer
    asyncio.run(run())


def test_the_alarm_times_out_the_read_under_way():
    async def run():
        loop = asyncio.get_running_loop()
        ch = channel()
        with pytest.raises(asyncio.TimeoutError):
            await ch.fill(loop.time() + 0.01)
        # An alarm set for an earlier read rings while a later read (with a later deadline) waits: that read goes
        # on waiting (0.05 s is past the first deadline: timers fire in order), and the alarm is set again.
        await read_answered(ch, loop.time() + 0.01, b"a")
        await read_answered(ch, loop.time() + 3600, b"b", wait=0.05)
        assert ch._alarm is not None and ch._alarm.when() > loop.time() + 3000
        # A read without a deadline is never timed out by an alarm left from an earlier one.
        await read_answered(ch, loop.time() + 0.01, b"c")
        await read_answered(ch, None, b"d", wait=0.05)
        # A read with an earlier deadline than the alarm's sets it earlier.
        await read_answered(ch, loop.time() + 3600, b"e")
        with pytest.raises(asyncio.TimeoutError):
            await ch.fill(loop.time() + 0.01)
    asyncio.run(run())


def test_the_collector_is_tuned_for_many_live_streams():
    """Serving freezes what startup made and collects the young generation every 50,000 objects (the reason is in
    tune_collector's docstring; the numbers are in the README's benchmark)."""
    import gc
    old = gc.get_threshold()
    try:
        llm_mux.tune_collector()
        assert gc.get_threshold() == llm_mux.GC_THRESHOLDS == (50000, 20, 10)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)


def test_a_closed_connection_is_freed_without_the_collector():
    """A served connection's Channel (and its buffer) goes when the connection does, by reference counting: the
    server no longer hangs a closure over the channel on the channel itself (a cycle that only the collector,
    which serving runs rarely, would free)."""
    import gc
    import http.client
    import upstreams
    from harness import GatewayThread, wait_until

    def channels():
        return sum(1 for o in gc.get_objects() if isinstance(o, llm_mux.Channel))

    gw = GatewayThread(upstreams.CONFIG.format(url="http://127.0.0.1:9"), fake_clock=False)
    try:
        gc.collect()
        gc.disable()
        before = channels()
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            conn.request("GET", "/health", headers={"Connection": "close"})
            assert conn.getresponse().read()
            conn.close()
        wait_until(lambda: channels() <= before + 1, what="the 20 closed connections' channels freed")
    finally:
        gc.enable()
        gw.stop()


def test_a_read_woken_late_leaves_the_next_readers_wait_alone():
    """A stream that ends in the read callback hands its upstream connection to the pool at once; the next request
    may start waiting on it before the ended stream's task runs. That task's wake must not take the new wait's
    place (it did: the new request never heard its answer)."""
    async def main():
        ch = channel()
        first = asyncio.ensure_future(ch.fill(None))
        await asyncio.sleep(0)  # the first read waits
        second = asyncio.ensure_future(ch.fill(None))  # runs before the first read's wake, as under load
        ch.data_received(b"end of the first answer")
        await first
        assert not second.done()
        ch.buf.clear()
        ch.data_received(b"the second answer")
        await asyncio.wait_for(second, 10)  # a guard against a hang, not a time limit
    asyncio.run(main())
