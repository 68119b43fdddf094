"""OutputRing: absolute offsets, newest bytes kept, Gap below start, memory in chunks."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from podterm.session.ring import Gap, OutputRing, RingStatistics


def test_empty_ring_allocates_nothing() -> None:
    ring = OutputRing()
    assert (ring.start, ring.end, len(ring), ring.nbytes_allocated) == (0, 0, 0, 0)
    assert ring.read_from(0) == b""


def test_idle_session_costs_one_chunk_not_the_capacity() -> None:
    ring = OutputRing(capacity_bytes=1 << 20, chunk_bytes=4096)
    assert ring.append(b"x" * 100) == 100
    assert ring.nbytes_allocated == 4096
    assert ring.statistics().chunks == 1


def test_append_returns_new_end_and_offsets_never_reset() -> None:
    ring = OutputRing(capacity_bytes=16, chunk_bytes=4)
    assert ring.append(b"abc") == 3
    assert ring.append(b"") == 3
    assert ring.append(b"defghijklmnopqrstuvwxyz") == 26
    assert ring.end == 26
    assert ring.start == 10


def test_keeps_the_newest_bytes_not_the_oldest() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"0123456789")
    assert ring.read_from(ring.start) == b"23456789"


def test_read_spanning_chunks_and_max_bytes() -> None:
    ring = OutputRing(capacity_bytes=16, chunk_bytes=4)
    ring.append(b"abcdefghij")
    assert ring.read_from(2, 100) == b"cdefghij"
    assert ring.read_from(3, 5) == b"defgh"
    assert ring.read_from(10) == b""
    assert ring.read_from(4, 0) == b""


def test_read_below_start_is_a_gap_with_exact_loss() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"x" * 20)
    assert ring.read_from(5) == Gap(requested=5, resume_at=12, lost=7)


def test_read_beyond_end_is_an_error() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"abc")
    with pytest.raises(ValueError, match="beyond the end"):
        ring.read_from(4)


def test_negative_arguments_are_errors() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    with pytest.raises(ValueError):
        ring.read_from(-1)
    with pytest.raises(ValueError):
        ring.read_from(0, -1)


@pytest.mark.parametrize(("capacity", "chunk"), [(0, 4), (8, 0), (10, 4), (-8, 4)])
def test_reject_bad_sizes(capacity: int, chunk: int) -> None:
    with pytest.raises(ValueError):
        OutputRing(capacity_bytes=capacity, chunk_bytes=chunk)


def test_append_larger_than_capacity_keeps_its_tail() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"ab")
    data = bytes(range(30))
    assert ring.append(data) == 32
    assert ring.start == 24
    assert ring.read_from(24) == data[-8:]
    assert ring.nbytes_allocated <= 8 + 4


def test_memory_bounded_by_capacity_plus_one_chunk_under_steady_output() -> None:
    ring = OutputRing(capacity_bytes=64 * 1024, chunk_bytes=4096)
    for i in range(2000):
        ring.append(bytes([i % 256]) * 977)  # an odd size, so chunk edges move around
        assert ring.nbytes_allocated <= 64 * 1024 + 4096
    assert len(ring) == 64 * 1024


def test_accepts_bytearray_and_memoryview_and_copies() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    buf = bytearray(b"abcd")
    ring.append(buf)
    ring.append(memoryview(b"efgh")[1:])
    buf[:] = b"zzzz"  # the ring copied; reusing the caller's buffer changes nothing
    assert ring.read_from(0) == b"abcdfgh"


def test_statistics_is_a_frozen_snapshot() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"0123456789")
    stats = ring.statistics()
    assert stats == RingStatistics(start=2, end=10, held_bytes=8, trimmed_bytes=2, capacity_bytes=8,
                                   chunk_bytes=4, chunks=3, nbytes_allocated=12)
    ring.append(b"x")
    assert stats.end == 10
    with pytest.raises(AttributeError):
        stats.end = 0  # type: ignore[misc]


def test_repr_shows_offsets() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"abc")
    assert repr(ring) == "<OutputRing start=0 end=3 held=3 allocated=4/8>"


class RingMachine(RuleBasedStateMachine):
    """The ring against a plain bytes model: the whole stream, and its newest ``capacity`` bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = OutputRing(capacity_bytes=4, chunk_bytes=4)
        self.capacity = 4
        self.chunk = 4
        self.total = 0  # bytes ever appended
        self.tail = b""  # the model: the newest min(total, capacity) bytes

    @initialize(chunk=st.integers(1, 8), chunks=st.integers(1, 6))
    def setup(self, chunk: int, chunks: int) -> None:
        self.chunk, self.capacity = chunk, chunk * chunks
        self.ring = OutputRing(capacity_bytes=self.capacity, chunk_bytes=chunk)

    @property
    def model_start(self) -> int:
        return self.total - len(self.tail)

    @rule(data=st.binary(max_size=20))
    def append_small(self, data: bytes) -> None:
        self._append(data)

    @rule(size=st.integers(0, 120), fill=st.integers(0, 255))
    def append_huge(self, size: int, fill: int) -> None:
        # Sizes up to several times the capacity, bytes that differ by position.
        data = bytes((fill + i) % 256 for i in range(size))
        self._append(data)

    def _append(self, data: bytes) -> None:
        assert self.ring.append(data) == self.total + len(data)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.capacity :] if self.total else b""

    @rule(data=st.data())
    def read_held(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(self.model_start, self.total))
        max_bytes = data.draw(st.integers(0, self.capacity + 3))
        i = offset - self.model_start
        assert self.ring.read_from(offset, max_bytes) == self.tail[i : i + max_bytes]

    @precondition(lambda self: self.model_start > 0)
    @rule(data=st.data())
    def read_lost(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.model_start - 1))
        assert self.ring.read_from(offset) == Gap(
            requested=offset, resume_at=self.model_start, lost=self.model_start - offset
        )

    @rule(beyond=st.integers(1, 10))
    def read_beyond_end(self, beyond: int) -> None:
        with pytest.raises(ValueError):
            self.ring.read_from(self.total + beyond)

    @invariant()
    def offsets_match_model(self) -> None:
        assert (self.ring.start, self.ring.end, len(self.ring)) == (
            self.model_start, self.total, len(self.tail))

    @invariant()
    def memory_grows_in_chunks_and_stays_bounded(self) -> None:
        allocated = self.ring.nbytes_allocated
        assert allocated % self.chunk == 0
        assert allocated <= self.capacity + self.chunk
        # Only chunks that hold something: the held span touches at most this many.
        held = len(self.tail)
        if held == 0:
            assert allocated <= self.chunk
        else:
            first = self.model_start // self.chunk
            last = (self.total - 1) // self.chunk
            assert allocated <= (last - first + 1) * self.chunk


RingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRingAgainstModel = RingMachine.TestCase
