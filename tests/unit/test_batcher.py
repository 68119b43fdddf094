"""The batcher: bounded buffer, batch writer off the loop, block vs fail-closed, no silent loss.

A "gated" writer blocks its worker thread on a trio.Event (through
``trio.from_thread.run``), which is how a stuck disk looks to the batcher:
the write is in flight, the buffer fills up behind it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
import trio
import trio.testing

from podterm.batcher import Batcher, BufferFull, FullPolicy


class Sink:
    """A write function that records batches and can be gated or made to fail."""

    def __init__(self, *, fail_times: int = 0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.gate: trio.Event | None = None
        self.fail_times = fail_times
        self.attempts = 0

    def write(self, batch: list[int]) -> None:
        self.threads.add(threading.get_ident())
        self.attempts += 1
        if self.gate is not None:
            trio.from_thread.run(self.gate.wait)
        if self.fail_times:
            self.fail_times -= 1
            raise OSError(28, "No space left on device")
        self.batches.append(list(batch))

    @property
    def records(self) -> list[int]:
        return [r for b in self.batches for r in b]


@pytest.mark.trio
async def test_records_are_written_in_order_in_batches_of_at_most_max_batch() -> None:
    sink = Sink()
    batcher = Batcher(sink.write, name="t", capacity=100, max_batch=4)
    for i in range(10):  # buffered before the writer starts: one burst
        batcher.submit_nowait(i)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await batcher.wait_flushed()
        nursery.cancel_scope.cancel()
    assert sink.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    stats = batcher.statistics()
    assert (stats.submitted, stats.written, stats.batches) == (10, 10, 3)
    assert stats.buffered_records == 0 and stats.closed


@pytest.mark.trio
async def test_writes_run_in_a_worker_thread_not_the_event_loop() -> None:
    sink = Sink()
    batcher = Batcher(sink.write, name="t")
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await batcher.submit(1)
        await batcher.wait_flushed()
        nursery.cancel_scope.cancel()
    assert sink.threads and threading.get_ident() not in sink.threads


@pytest.mark.trio
async def test_everything_buffered_during_a_write_goes_into_the_next_batch() -> None:
    sink = Sink()
    sink.gate = trio.Event()
    batcher = Batcher(sink.write, name="t", capacity=100, max_batch=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        batcher.submit_nowait(0)
        await trio.testing.wait_all_tasks_blocked()  # the write of [0] is in flight
        assert batcher.statistics().in_flight == 1
        for i in range(1, 6):
            batcher.submit_nowait(i)
        sink.gate.set()
        await batcher.wait_flushed()
        nursery.cancel_scope.cancel()
    assert sink.batches == [[0], [1, 2, 3, 4, 5]]  # group commit: one write for the rest


@pytest.mark.trio
async def test_block_policy_makes_producers_wait_and_keeps_accepting() -> None:
    sink = Sink()
    sink.gate = trio.Event()
    batcher = Batcher(sink.write, name="audit", capacity=4, max_batch=2,
                      policy=FullPolicy.BLOCK)
    done: list[int] = []

    async def producer() -> None:
        await batcher.submit(99)
        done.append(99)

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for i in range(4):
            await batcher.submit(i)  # [0, 1] in flight (still counted), [2, 3] waiting
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        stats = batcher.statistics()
        assert not done
        assert (stats.buffered_records, stats.waiting_producers, stats.blocked_waits) == (4, 1, 1)
        with pytest.raises(BufferFull) as info:
            batcher.submit_nowait(100)
        assert info.value.http_status == 503
        assert batcher.is_accepting()  # block: new work is admitted, and will wait too
        batcher.check_accepting()
        sink.gate.set()
        await batcher.wait_flushed()
        assert done == [99]
        nursery.cancel_scope.cancel()
    assert sink.records == [0, 1, 2, 3, 99]
    assert batcher.statistics().refused == 1


@pytest.mark.trio
async def test_fail_closed_refuses_new_work_above_the_high_water_mark_until_it_drains() -> None:
    sink = Sink()
    sink.gate = trio.Event()
    batcher = Batcher(sink.write, name="audit", capacity=8, high_water=4, max_batch=8,
                      policy="fail-closed")
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for i in range(3):
            batcher.submit_nowait(i)
        await trio.testing.wait_all_tasks_blocked()  # the writer is stuck on the gate
        assert batcher.is_accepting()
        batcher.submit_nowait(3)  # 4 buffered = the high-water mark
        assert not batcher.is_accepting()
        with pytest.raises(BufferFull) as info:
            batcher.check_accepting()
        assert info.value.http_status == 503 and info.value.close_code == 1013
        assert "refusing new sessions" in info.value.message
        assert "4/8" in info.value.message
        # Sessions already running still get their events in: headroom to capacity.
        for i in range(4, 8):
            batcher.submit_nowait(i)
        stats = batcher.statistics()
        assert (stats.refused, stats.accepting) == (1, False)
        sink.gate.set()
        await batcher.wait_flushed()
        assert batcher.is_accepting()
        nursery.cancel_scope.cancel()
    assert sink.records == list(range(8))


@pytest.mark.trio
async def test_a_failed_write_is_retried_counted_and_refuses_new_work_while_failing() -> None:
    sink = Sink(fail_times=2)
    sink.gate = trio.Event()
    batcher = Batcher(sink.write, name="audit", capacity=10, policy="fail-closed",
                      retry_initial_s=0.001, retry_max_s=0.002)
    seen_failing: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        batcher.submit_nowait(1)
        batcher.submit_nowait(2)
        sink.gate.set()
        while batcher.statistics().write_failures == 0:
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0)
        seen_failing.append(batcher.statistics().failing)
        seen_failing.append(batcher.is_accepting())
        await batcher.wait_flushed()
        nursery.cancel_scope.cancel()
    assert seen_failing == [True, False]  # failing: fail-closed refuses new work
    stats = batcher.statistics()
    assert stats.write_failures == 2 and not stats.failing
    assert stats.last_error is not None and "No space left" in stats.last_error
    assert sink.records == [1, 2]  # retried as one batch; nothing lost, nothing twice
    assert sink.attempts == 3


@pytest.mark.trio
async def test_cancellation_flushes_what_is_buffered() -> None:
    sink = Sink()
    # A long coalescing interval: without the final flush nothing would be written.
    batcher = Batcher(sink.write, name="t", capacity=100, max_batch=50, flush_interval_s=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for i in range(5):
            await batcher.submit(i)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.records == []
        nursery.cancel_scope.cancel()
    assert sink.records == [0, 1, 2, 3, 4]
    stats = batcher.statistics()
    assert stats.closed and stats.lost == 0 and not stats.accepting
    with pytest.raises(trio.ClosedResourceError):
        batcher.submit_nowait(5)
    with pytest.raises(trio.ClosedResourceError):
        await batcher.submit(5)


@pytest.mark.trio
async def test_final_flush_is_bounded_and_unwritten_records_are_counted_as_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink(fail_times=10**9)  # the disk never recovers
    batcher = Batcher(sink.write, name="audit", capacity=100, close_timeout_s=0.05,
                      retry_initial_s=0.001, retry_max_s=0.01)
    with caplog.at_level(logging.ERROR, logger="podterm.batcher"):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(batcher.run)
                for i in range(3):
                    batcher.submit_nowait(i)
                while batcher.statistics().write_failures == 0:
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
    stats = batcher.statistics()
    assert stats.lost == 3 and stats.closed
    assert any("3 records not written at shutdown" in r.getMessage() for r in caplog.records)
    with pytest.raises(trio.ClosedResourceError):
        await batcher.wait_flushed()


@pytest.mark.trio
async def test_flush_interval_coalesces_and_a_full_batch_does_not_wait(
        autojump_clock: trio.testing.MockClock) -> None:
    sink = Sink()
    written_at: list[float] = []
    batcher = Batcher(sink.write, name="t", capacity=100, max_batch=3, flush_interval_s=1.0,
                      after_write=lambda: written_at.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        t0 = trio.current_time()
        await batcher.submit(0)
        await trio.sleep(0.5)
        await batcher.submit(1)
        await batcher.wait_flushed()
        assert sink.batches == [[0, 1]]
        assert written_at[0] - t0 >= 1.0  # the interval ran out
        t1 = trio.current_time()
        for i in range(2, 5):
            await batcher.submit(i)  # reaches max_batch at once
        await batcher.wait_flushed()
        assert written_at[1] - t1 < 1.0
        nursery.cancel_scope.cancel()
    assert sink.batches == [[0, 1], [2, 3, 4]]


@pytest.mark.trio
async def test_weights_bound_the_buffer_and_an_oversized_record_waits_for_an_empty_buffer(
        ) -> None:
    written: list[list[bytes]] = []
    gate = trio.Event()

    def write(batch: list[bytes]) -> None:
        trio.from_thread.run(gate.wait)
        written.append(batch)

    batcher: Batcher[bytes] = Batcher(write, name="rec", capacity=10, max_batch=10, weight=len)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        batcher.submit_nowait(b"aaaa")
        await trio.testing.wait_all_tasks_blocked()
        batcher.submit_nowait(b"bbbbbb")  # 4 + 6 = 10: full
        with pytest.raises(BufferFull):
            batcher.submit_nowait(b"c")
        big = b"x" * 25  # heavier than the capacity: admitted only into an empty buffer
        nursery.start_soon(batcher.submit, big)
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.statistics().waiting_producers == 1
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        await batcher.wait_flushed()
        nursery.cancel_scope.cancel()
    assert written == [[b"aaaa"], [b"bbbbbb"], [big]]
    assert batcher.statistics().buffered_weight == 0


@pytest.mark.trio
async def test_many_blocked_producers_lose_nothing_and_keep_their_own_order() -> None:
    sink = Sink()
    batcher = Batcher(sink.write, name="t", capacity=4, max_batch=2)

    async def producer(p: int) -> None:
        for i in range(50):
            await batcher.submit(p * 1000 + i)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as producers:
                for p in range(5):
                    producers.start_soon(producer, p)
            await batcher.wait_flushed()
            nursery.cancel_scope.cancel()
    records = sink.records
    assert len(records) == 250
    for p in range(5):
        assert [r for r in records if r // 1000 == p] == [p * 1000 + i for i in range(50)]
    assert batcher.statistics().blocked_waits > 0
    assert max(len(b) for b in sink.batches) <= 2


@pytest.mark.trio
async def test_a_cancelled_waiting_producer_buffers_nothing_and_does_not_stall_the_others(
        ) -> None:
    sink = Sink()
    sink.gate = trio.Event()
    batcher = Batcher(sink.write, name="t", capacity=2, max_batch=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        batcher.submit_nowait(0)
        batcher.submit_nowait(1)
        cancelled = trio.CancelScope()

        async def doomed() -> None:
            with cancelled:
                await batcher.submit(-1)

        nursery.start_soon(doomed)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(batcher.submit, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.statistics().waiting_producers == 2
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.statistics().waiting_producers == 1
        sink.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        await batcher.wait_flushed()
        nursery.cancel_scope.cancel()
    assert sink.records == [0, 1, 2]


@pytest.mark.trio
async def test_aclose_flushes_stops_the_writer_and_refuses_more() -> None:
    sink = Sink()
    batcher = Batcher(sink.write, name="t", flush_interval_s=3600, max_batch=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await batcher.submit(1)
        await batcher.submit(2)
        await batcher.aclose()
        assert batcher.is_closed
        assert sink.records == [1, 2]
        with pytest.raises(trio.ClosedResourceError):
            await batcher.submit(3)
        assert not batcher.is_accepting()
        with pytest.raises(BufferFull, match="shut down"):
            batcher.check_accepting()
        await batcher.aclose()  # idempotent


@pytest.mark.trio
async def test_statistics_is_a_frozen_snapshot() -> None:
    batcher = Batcher(Sink().write, name="audit", capacity=8, policy="fail-closed")
    batcher.submit_nowait(1)
    stats = batcher.statistics()
    assert (stats.name, stats.policy, stats.capacity, stats.high_water) == \
        ("audit", "fail-closed", 8, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.submitted = 5  # type: ignore[misc]
    batcher.submit_nowait(2)
    assert stats.submitted == 1 and batcher.statistics().submitted == 2
    assert "audit" in repr(batcher) and "2/8" in repr(batcher)
    await batcher.aclose()
    assert batcher.statistics().lost == 2  # never ran: counted, not silently gone


def test_bad_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        Batcher(Sink().write, name="t", capacity=0)
    with pytest.raises(ValueError):
        Batcher(Sink().write, name="t", capacity=4, high_water=5)
    with pytest.raises(ValueError):
        Batcher(Sink().write, name="t", policy="drop")
