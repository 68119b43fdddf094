"""OutputRing: absolute offsets, newest bytes kept, Gap below start, memory in segments."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from podterm.session.ring import MAX_SEGMENT_BYTES, Gap, OutputRing, RingStatistics


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
    # The last 8 bytes, kept as one segment (a ring's segments never exceed its capacity).
    assert stats == RingStatistics(start=2, end=10, held_bytes=8, trimmed_bytes=2, capacity_bytes=8,
                                   chunk_bytes=4, chunks=1, nbytes_allocated=8)
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
    def memory_stays_bounded(self) -> None:
        ring = self.ring
        # A ring's largest segment is its capacity here (capacities are tiny).
        largest = max(self.chunk, self.capacity)
        held = len(self.tail)
        assert ring.allocated_bytes <= ring.nbytes_allocated <= ring.allocated_bytes + self.chunk
        if held == 0:
            assert ring.nbytes_allocated == 0
        else:
            # Only the oldest segment may still hold bytes below start.
            assert held <= ring.allocated_bytes < held + largest
            # The growing bytearray counts whole for the metrics.
            assert ring.nbytes_allocated < self.capacity + largest + self.chunk
        assert ring.statistics().chunks <= 2 * (held // self.chunk + 1) + 1


RingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRingAgainstModel = RingMachine.TestCase


# --------------------------------------------------------------------------
# Memory and copies: storage grows with the output; reads can be views.
# --------------------------------------------------------------------------


def test_idle_ring_holds_no_storage() -> None:
    ring = OutputRing(capacity_bytes=1 << 20, chunk_bytes=4096)
    assert ring.allocated_bytes == 0
    assert ring.read_from(0) == b"" and ring.views_from(0) == []
    assert ring.allocated_bytes == 0


def test_a_prompt_costs_its_bytes_not_a_chunk() -> None:
    ring = OutputRing(capacity_bytes=1 << 20, chunk_bytes=4096)
    ring.append(b"$ " * 50)
    assert ring.allocated_bytes == 100
    ring.append(b"x")
    assert ring.allocated_bytes == 101


def test_thousand_idle_rings_with_a_prompt_cost_under_400_bytes_each() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rings = [OutputRing() for _ in range(1000)]
        for ring in rings:
            ring.append(b"user@pod:~$ " * 8)  # a 96-byte prompt
        per_ring = (tracemalloc.get_traced_memory()[0] - before) / len(rings)
    finally:
        tracemalloc.stop()
    assert per_ring < 400, per_ring


def test_storage_stays_within_held_plus_one_segment_and_dropped_segments_go() -> None:
    ring = OutputRing(capacity_bytes=64 * 1024, chunk_bytes=4096)
    for i in range(3000):
        ring.append(bytes([i % 256]) * (1 + (i * 7919) % 9000))
        # Only the oldest segment (at most 9000 bytes here) holds bytes below start.
        assert len(ring) <= ring.allocated_bytes < len(ring) + 9000
        # Small output is gathered: a segment under a chunk is always followed
        # by one of a chunk or more, so segments stay few.
        assert ring.statistics().chunks <= 2 * (64 * 1024 // 4096 + 1) + 1


def test_a_bulk_read_is_kept_as_it_came_no_copy() -> None:
    ring = OutputRing(capacity_bytes=1 << 20, chunk_bytes=4096)
    read = bytes(range(256)) * 256  # 64 KiB: one pipe read
    ring.append(b"$ ")
    ring.append(read)
    views = ring.views_from(2, 32768)
    assert isinstance(views, list) and len(views) == 1
    assert views[0].obj is read and views[0].readonly
    assert ring.read_from(2, len(read)) is read
    assert ring.views_from(0, 10) == [memoryview(b"$ "), memoryview(read[:8])]
    assert ring.allocated_bytes == 2 + len(read)


def test_huge_appends_are_copied_into_bounded_segments() -> None:
    ring = OutputRing(capacity_bytes=1 << 20, chunk_bytes=4096)
    data = bytes(range(256)) * 1024 * 3  # 768 KiB in one append
    ring.append(data)
    assert ring.statistics().chunks == len(data) // MAX_SEGMENT_BYTES
    views = ring.views_from(0, len(data))
    assert isinstance(views, list)
    assert all(v.obj is not data and len(v) == MAX_SEGMENT_BYTES for v in views)
    assert b"".join(views) == data
    # Trimming drops whole segments: one byte past capacity frees the first one.
    ring.append(b"y" * (1 << 18))
    ring.append(b"z")
    assert ring.start == len(data) + (1 << 18) + 1 - (1 << 20)
    assert len(ring) <= ring.allocated_bytes < len(ring) + MAX_SEGMENT_BYTES


def test_large_mutable_buffers_are_copied() -> None:
    ring = OutputRing(capacity_bytes=1 << 20, chunk_bytes=4096)
    buf = bytearray(b"a" * 10000)
    ring.append(buf)
    ring.append(memoryview(buf)[:5000])
    buf[:] = b"b" * 10000
    assert ring.read_from(0, 1 << 20) == b"a" * 15000


def test_small_output_after_a_bulk_read_starts_a_new_gathering_segment() -> None:
    ring = OutputRing(capacity_bytes=1 << 16, chunk_bytes=4096)
    ring.append(b"p" * 100)
    ring.append(b"B" * 8192)
    for _ in range(100):
        ring.append(b"e")
    assert ring.statistics().chunks == 3
    assert ring.nbytes_allocated == 100 + 8192 + 4096
    assert ring.allocated_bytes == 100 + 8192 + 100
    assert ring.read_from(0, 1 << 16) == b"p" * 100 + b"B" * 8192 + b"e" * 100


def test_views_share_the_chunks_and_copy_nothing() -> None:
    ring = OutputRing(capacity_bytes=16, chunk_bytes=4)
    ring.append(b"abcdefghij")
    views = ring.views_from(2, 100)
    assert isinstance(views, list)
    # 10 bytes at once (more than a chunk): one segment, the appended object itself.
    assert [bytes(v) for v in views] == [b"cdefghij"]
    assert all(v.readonly and isinstance(v.obj, bytes) for v in views)
    assert b"".join(views) == ring.read_from(2, 100)
    assert ring.views_from(3, 3) == [memoryview(b"def")]
    assert ring.views_from(10) == []
    ring.append(b"k")
    ring.append(b"lm")  # small output: gathered in bytearrays of at most a chunk
    ring.append(b"nop")
    views = ring.views_from(8, 100)
    assert isinstance(views, list)
    assert [bytes(v) for v in views] == [b"ij", b"klmn", b"op"]
    assert all(v.readonly for v in views) and isinstance(views[1].obj, bytearray)


def test_views_below_start_are_a_gap_and_beyond_end_an_error() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"x" * 20)
    assert ring.views_from(5) == Gap(requested=5, resume_at=12, lost=7)
    with pytest.raises(ValueError, match="beyond the end"):
        ring.views_from(21)
    with pytest.raises(ValueError):
        ring.views_from(12, -1)


def test_views_keep_their_bytes_while_the_ring_moves_on() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.append(b"ab")
    views = ring.views_from(0)  # the newest chunk, which grows on the next append
    assert isinstance(views, list)
    ring.append(b"cdefgh")  # grows past the viewed chunk (it is pinned: copied)
    ring.append(b"0123456789" * 3)  # trims everything the views saw
    assert [bytes(v) for v in views] == [b"ab"]
    assert ring.read_from(ring.start) == (b"0123456789" * 3)[-8:]


def test_append_copies_a_mutable_buffer_once() -> None:
    ring = OutputRing(capacity_bytes=16, chunk_bytes=4)
    source = bytearray(b"abcdefghij")
    ring.append(memoryview(source))
    source[:] = b"z" * 10
    assert ring.read_from(0) == b"abcdefghij"
    assert ring.allocated_bytes == 10


class LeanRingMachine(RingMachine):
    """The model test again, plus views (held across appends) and the storage bound."""

    def __init__(self) -> None:
        super().__init__()
        self.held_views: list[tuple[bytes, list[memoryview]]] = []

    @rule(data=st.data())
    def view_held(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(self.model_start, self.total))
        max_bytes = data.draw(st.integers(0, self.capacity + 3))
        views = self.ring.views_from(offset, max_bytes)
        assert isinstance(views, list)
        i = offset - self.model_start
        expected = self.tail[i : i + max_bytes]
        assert b"".join(views) == expected
        if len(self.held_views) < 8:
            self.held_views.append((expected, views))

    @invariant()
    def held_views_never_change(self) -> None:
        for expected, views in self.held_views:
            assert b"".join(views) == expected

    @invariant()
    def storage_grows_only_with_output(self) -> None:
        allocated = self.ring.allocated_bytes
        if self.total == 0:
            assert allocated == 0
        assert allocated < len(self.tail) + max(self.chunk, self.capacity)
        assert allocated <= self.ring.nbytes_allocated


LeanRingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
TestLeanRingAgainstModel = LeanRingMachine.TestCase


def test_an_empty_ring_can_start_at_any_offset() -> None:
    ring = OutputRing(capacity_bytes=8, chunk_bytes=4)
    ring.start_at(10)
    assert (ring.start, ring.end, ring.allocated_bytes) == (10, 10, 0)
    assert ring.read_from(10) == b"" and ring.read_from(3) == Gap(3, 10, 7)
    ring.append(b"abcdef")
    assert ring.read_from(10) == b"abcdef"
    views = ring.views_from(11, 4)
    assert isinstance(views, list) and b"".join(views) == b"bcde"
    assert ring.allocated_bytes <= len(ring) + 4
    with pytest.raises(ValueError, match="nothing was appended"):
        ring.start_at(0)
    with pytest.raises(ValueError):
        OutputRing().start_at(-1)
