"""The session output ring, addressed by absolute byte offsets.

A session numbers its output bytes from 0 when it is created and never resets
the count (spec/podterm-protocol.md, "Offsets").  The ring keeps the *newest*
``capacity_bytes`` of that stream so a client that reconnects with offset N
gets exactly bytes N.. replayed, or, when N has already left the ring, a
:class:`Gap` that says precisely how much was lost.

Memory: output is stored in fixed-size chunks aligned to absolute offsets
(chunk *k* holds offsets ``[k*chunk_bytes, (k+1)*chunk_bytes)``).  A chunk is
allocated only when output reaches it, and freed (or reused for new output)
once every byte in it has been trimmed.  So an idle session that printed a
prompt costs one chunk, not its capacity, and no ring ever holds more than
``capacity_bytes + chunk_bytes`` (issue 9: 40,000 mostly idle sessions).

Pure data structure: no I/O, no clock, no locks (trio tasks do not preempt).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ..protocol._types import Buffer

__all__ = ["Gap", "OutputRing", "RingStatistics", "channel_runs"]

# 1 MiB: the per-session default in ARCHITECTURE.md ("Sessions").  Enough to
# replay a few full screens of a busy build log after a laptop sleeps.
DEFAULT_CAPACITY_BYTES = 1 << 20
# 4 KiB: one page; a shell prompt plus a few commands' output fits in one chunk,
# which keeps an idle session well inside issue 9's 12 KiB-per-session budget.
DEFAULT_CHUNK_BYTES = 4096


def channel_runs(marks: Iterable[tuple[int, int]] | None, start: int, end: int,
                 default: int = 1) -> list[tuple[int, int, int]]:
    """Split ring offsets ``[start, end)`` into ``(from, to, channel)`` runs.

    ``marks`` are ``(offset, channel)`` pairs in offset order, each saying that
    output from ``offset`` on came from ``channel`` (STDOUT 1 / STDERR 2, as the
    process wrote them); ``None`` or empty means everything is ``default``.
    """
    if not marks:
        return [(start, end, default)]
    runs: list[tuple[int, int, int]] = []
    channel = default
    pos = start
    for offset, ch in marks:
        if offset <= start:
            channel = ch
            continue
        if offset >= end:
            break
        if ch != channel:
            runs.append((pos, offset, channel))
            pos = offset
            channel = ch
    runs.append((pos, end, channel))
    return runs


@dataclass(frozen=True, slots=True)
class Gap:
    """A read asked for bytes that have already left the ring.

    Attributes:
        requested: the offset that was asked for.
        resume_at: the oldest offset still held; the stream continues here.
        lost: ``resume_at - requested``, the number of bytes that cannot be replayed.
    """

    requested: int
    resume_at: int
    lost: int


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """A snapshot of one :class:`OutputRing`."""

    start: int
    end: int
    held_bytes: int
    trimmed_bytes: int
    capacity_bytes: int
    chunk_bytes: int
    chunks: int
    nbytes_allocated: int


class OutputRing:
    """The newest ``capacity_bytes`` of a byte stream, addressed by absolute offset.

    Args:
        capacity_bytes: how many of the newest bytes are kept; a positive
            multiple of ``chunk_bytes``.
        chunk_bytes: the unit of allocation.

    Raises:
        ValueError: a size is not positive, or the capacity is not a whole
            number of chunks (that is what bounds memory at capacity + one chunk).
    """

    __slots__ = ("_capacity", "_chunk", "_chunks", "_end", "_first_chunk", "_start")

    def __init__(
        self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        if chunk_bytes <= 0 or capacity_bytes <= 0:
            raise ValueError(
                f"capacity_bytes and chunk_bytes must be positive, got {capacity_bytes} and {chunk_bytes}"
            )
        if capacity_bytes % chunk_bytes:
            raise ValueError(
                f"capacity_bytes ({capacity_bytes}) must be a multiple of chunk_bytes ({chunk_bytes})"
            )
        self._capacity = capacity_bytes
        self._chunk = chunk_bytes
        self._chunks: deque[bytearray] = deque()
        # Index of _chunks[0], i.e. it holds offsets from _first_chunk * _chunk on.
        self._first_chunk = 0
        self._start = 0
        self._end = 0

    def __repr__(self) -> str:
        return (f"<OutputRing start={self._start} end={self._end} held={self._end - self._start}"
                f" allocated={self.nbytes_allocated}/{self._capacity}>")

    def __len__(self) -> int:
        """The number of bytes held: ``end - start``."""
        return self._end - self._start

    @property
    def start(self) -> int:
        """The oldest offset still held."""
        return self._start

    @property
    def end(self) -> int:
        """The offset the next appended byte will get (= total bytes ever appended)."""
        return self._end

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def chunk_bytes(self) -> int:
        return self._chunk

    @property
    def nbytes_allocated(self) -> int:
        """Bytes of chunk storage currently allocated (for metrics)."""
        return len(self._chunks) * self._chunk

    def append(self, data: Buffer) -> int:
        """Add ``data`` at the end, trimming the oldest bytes beyond capacity.

        ``data`` is copied; the caller may reuse its buffer at once.  Data longer
        than the capacity keeps only its last ``capacity_bytes``.

        Returns:
            The new end offset.
        """
        view = memoryview(data).cast("B")
        size = len(view)
        if size == 0:
            return self._end
        chunk = self._chunk
        new_end = self._end + size
        if size >= self._capacity:
            # Nothing held now survives: drop it all, and skip the prefix of
            # ``data`` that would be trimmed the moment it was written.
            skip = size - self._capacity
            view = view[skip:]
            reuse = list(self._chunks)
            self._chunks.clear()
            self._start = self._end = self._end + skip
            self._first_chunk = self._end // chunk
        else:
            # Trim first, so freed chunks can take the new bytes and the peak
            # allocation stays within capacity + one chunk.
            reuse = self._trim_to(max(self._start, new_end - self._capacity))
        if not self._chunks:
            self._first_chunk = self._end // chunk
        pos = 0
        size = len(view)
        while pos < size:
            offset_in_chunk = self._end % chunk
            if self._end // chunk == self._first_chunk + len(self._chunks):
                # ``end`` is in a chunk we do not have yet: the last one is full,
                # or there is none (first output, or after a huge append).
                self._chunks.append(reuse.pop() if reuse else bytearray(chunk))
            take = min(chunk - offset_in_chunk, size - pos)
            self._chunks[-1][offset_in_chunk : offset_in_chunk + take] = view[pos : pos + take]
            pos += take
            self._end += take
        self._start = max(self._start, self._end - self._capacity)
        return self._end

    def _trim_to(self, new_start: int) -> list[bytearray]:
        """Advance start to ``new_start``; return the chunks that no longer hold anything."""
        self._start = new_start
        freed: list[bytearray] = []
        # A chunk is free once all its offsets are below start; the chunk holding
        # ``end`` itself stays (the next byte goes there) unless start == end on a
        # chunk boundary, where the write loop will ask for a new one anyway.
        while self._chunks and (self._first_chunk + 1) * self._chunk <= new_start:
            freed.append(self._chunks.popleft())
            self._first_chunk += 1
        return freed

    def read_from(self, offset: int, max_bytes: int = 65536) -> bytes | Gap:
        """Up to ``max_bytes`` held bytes starting at ``offset``, or a :class:`Gap`.

        Returns:
            ``bytes`` (empty when ``offset == end``) for ``start <= offset <= end``;
            a :class:`Gap` when ``offset < start``: resume from ``gap.resume_at``.

        Raises:
            ValueError: ``offset > end`` (the client claims output that never
                existed) or a negative ``offset`` or ``max_bytes``.
        """
        if offset < 0 or max_bytes < 0:
            raise ValueError(f"offset and max_bytes must be >= 0, got {offset} and {max_bytes}")
        if offset > self._end:
            raise ValueError(f"offset {offset} is beyond the end of the stream ({self._end})")
        if offset < self._start:
            return Gap(requested=offset, resume_at=self._start, lost=self._start - offset)
        stop = min(self._end, offset + max_bytes)
        if stop == offset:
            return b""
        chunk = self._chunk
        index = offset // chunk - self._first_chunk
        within = offset % chunk
        first = self._chunks[index]
        if within + (stop - offset) <= chunk:
            return bytes(first[within : within + (stop - offset)])
        pieces = [memoryview(first)[within:]]
        remaining = stop - offset - (chunk - within)
        while remaining > 0:
            index += 1
            take = min(chunk, remaining)
            pieces.append(memoryview(self._chunks[index])[:take])
            remaining -= take
        return b"".join(pieces)

    def statistics(self) -> RingStatistics:
        """A frozen snapshot of offsets and memory."""
        return RingStatistics(
            start=self._start,
            end=self._end,
            held_bytes=self._end - self._start,
            trimmed_bytes=self._start,
            capacity_bytes=self._capacity,
            chunk_bytes=self._chunk,
            chunks=len(self._chunks),
            nbytes_allocated=self.nbytes_allocated,
        )
