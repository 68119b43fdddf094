"""The session output ring, addressed by absolute byte offsets.

A session numbers its output bytes from 0 when it is created and never resets
the count (spec/podterm-protocol.md, "Offsets").  The ring keeps the *newest*
``capacity_bytes`` of that stream so a client that reconnects with offset N
gets exactly bytes N.. replayed, or, when N has already left the ring, a
:class:`Gap` that says precisely how much was lost.

Memory: output is stored in chunks aligned to absolute offsets (chunk *k*
holds offsets ``[k*chunk_bytes, (k+1)*chunk_bytes)``).  A chunk exists only
once output reaches it, and the newest one grows with the output instead of
being allocated whole: a session that printed a 100-byte prompt holds about
100 bytes of storage, not a chunk, let alone its capacity, and a ring that
never printed holds none (issue 9: 40,000 mostly idle sessions, 12 KiB each).
A chunk is released, not recycled, once every byte in it has been trimmed, so
no ring holds more than ``capacity_bytes + chunk_bytes`` of storage.

Copies: :meth:`OutputRing.append` copies each byte once, straight into its
chunk (``bytearray += view``).  :meth:`OutputRing.views_from` hands out
read-only memoryviews of the chunks, no copy; the bytes under a view never
change, because held bytes are never written again and a released chunk is
never reused (when a view pins the newest chunk, the next append that must
grow it moves on to a copy of it and leaves the viewed one alone).
:meth:`OutputRing.read_from` returns ``bytes`` (one copy), as it always has.

Pure data structure: no I/O, no clock, no locks (trio tasks do not preempt).
"""

from __future__ import annotations

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
        chunk_bytes: the unit of accounting and the largest piece of storage.

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
        # Every chunk but the last is full (chunk_bytes long); the last holds
        # offsets up to ``end`` and grows as output arrives.  A plain list: an
        # idle ring's empty list is 56 bytes (a deque is 760), and dropping the
        # front is one ``del`` per trim over at most capacity/chunk + 1 items.
        self._chunks: list[bytearray] = []
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
        """Chunks in use times ``chunk_bytes``: the ring's memory in whole chunks (metrics).

        An upper bound of :attr:`allocated_bytes`: the newest chunk counts whole
        here although only its filled part exists.
        """
        return len(self._chunks) * self._chunk

    @property
    def allocated_bytes(self) -> int:
        """Bytes of chunk storage that exist now (the payload of the chunks' bytearrays).

        0 until output arrives; never more than the bytes held plus one chunk
        (the oldest chunk may still hold trimmed bytes before ``start``).
        """
        chunks = self._chunks
        if not chunks:
            return 0
        return (len(chunks) - 1) * self._chunk + len(chunks[-1])

    def start_at(self, offset: int) -> None:
        """Number an empty ring's first byte ``offset`` (a stream resumed elsewhere).

        ``start`` and ``end`` become ``offset``; a read below it is a :class:`Gap`.

        Raises:
            ValueError: something was appended already, or ``offset`` is negative.
        """
        if self._end != self._start or self._chunks or self._end:
            raise ValueError("start_at() is for a ring nothing was appended to")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._start = self._end = offset

    def append(self, data: Buffer) -> int:
        """Add ``data`` at the end, trimming the oldest bytes beyond capacity.

        ``data`` is copied; the caller may reuse its buffer at once.  Data longer
        than the capacity keeps only its last ``capacity_bytes``.

        Returns:
            The new end offset.
        """
        chunks = self._chunks
        end = self._end
        if type(data) is bytes and chunks:
            # The common case, a read that fits in the newest chunk (echoes,
            # prompts, most PTY reads): no view, no slicing.
            size = len(data)
            tail = chunks[-1]
            if 0 < size <= self._chunk - len(tail):
                new_start = end + size - self._capacity
                if new_start > self._start:
                    self._trim_to(new_start)
                try:
                    tail += data
                except BufferError:  # a view pins it: see below
                    chunks[-1] = bytearray(tail) + data
                self._end = end + size
                return self._end
        view = memoryview(data).cast("B")
        size = len(view)
        if size == 0:
            return self._end
        chunk = self._chunk
        if size >= self._capacity:
            # Nothing held now survives: drop it all, and skip the prefix of
            # ``data`` that would be trimmed the moment it was written.
            skip = size - self._capacity
            view = view[skip:]
            size = self._capacity
            end += skip
            self._chunks = []
            self._start = end
        else:
            # Trim first, so the released chunks are gone before new ones exist
            # and the peak stays within capacity + one chunk.
            new_start = end + size - self._capacity
            if new_start > self._start:
                self._trim_to(new_start)
        chunks = self._chunks
        if not chunks:
            # First output, or after a huge append: the chunk holding ``end``
            # starts here.  Offsets before ``end`` in it are never read
            # (they are below ``start``); they are zero padding.
            self._first_chunk = end // chunk
            pad = end % chunk
            chunks.append(bytearray(pad))
        pos = 0
        tail = chunks[-1]
        room = chunk - len(tail)
        if room:
            take = room if room < size else size
            try:
                tail += view[:take]
            except BufferError:
                # A reader still holds a view of the newest chunk, so it cannot
                # be resized: continue in a copy; the viewed one stays as it is.
                tail = chunks[-1] = bytearray(tail)
                tail += view[:take]
            pos = take
        while pos < size:
            take = min(chunk, size - pos)
            chunks.append(bytearray(view[pos : pos + take]))
            pos += take
        self._end = end + size
        return self._end

    def _trim_to(self, new_start: int) -> None:
        """Advance start to ``new_start``; release the chunks that no longer hold anything."""
        self._start = new_start
        # A chunk is free once all its offsets are below start; ``new_start``
        # is below ``end`` here, so the chunk holding ``end - 1`` always stays.
        drop = new_start // self._chunk - self._first_chunk
        if drop > 0:
            del self._chunks[:drop]
            self._first_chunk += drop

    def _check_read(self, offset: int, max_bytes: int) -> Gap | None:
        if offset < 0 or max_bytes < 0:
            raise ValueError(f"offset and max_bytes must be >= 0, got {offset} and {max_bytes}")
        if offset > self._end:
            raise ValueError(f"offset {offset} is beyond the end of the stream ({self._end})")
        if offset < self._start:
            return Gap(requested=offset, resume_at=self._start, lost=self._start - offset)
        return None

    def views_from(self, offset: int, max_bytes: int = 65536) -> list[memoryview] | Gap:
        """Up to ``max_bytes`` held bytes from ``offset`` as read-only views, no copy.

        One view per chunk the range touches, in order (an empty list when
        ``offset == end``).  The bytes under a view never change (see the
        module docstring), so a view may be kept after later appends; it keeps
        its chunk's memory alive while it exists.

        Returns:
            The views for ``start <= offset <= end``; a :class:`Gap` when
            ``offset < start``: resume from ``gap.resume_at``.

        Raises:
            ValueError: ``offset > end``, or a negative ``offset`` or ``max_bytes``.
        """
        gap = self._check_read(offset, max_bytes)
        if gap is not None:
            return gap
        stop = min(self._end, offset + max_bytes)
        views: list[memoryview] = []
        chunk = self._chunk
        index = offset // chunk - self._first_chunk
        within = offset % chunk
        remaining = stop - offset
        while remaining > 0:
            take = min(chunk - within, remaining)
            views.append(memoryview(self._chunks[index]).toreadonly()[within : within + take])
            remaining -= take
            index += 1
            within = 0
        return views

    def read_from(self, offset: int, max_bytes: int = 65536) -> bytes | Gap:
        """Up to ``max_bytes`` held bytes starting at ``offset``, or a :class:`Gap`.

        Returns:
            ``bytes`` (empty when ``offset == end``) for ``start <= offset <= end``;
            a :class:`Gap` when ``offset < start``: resume from ``gap.resume_at``.

        Raises:
            ValueError: ``offset > end`` (the client claims output that never
                existed) or a negative ``offset`` or ``max_bytes``.
        """
        gap = self._check_read(offset, max_bytes)
        if gap is not None:
            return gap
        stop = min(self._end, offset + max_bytes)
        if stop == offset:
            return b""
        chunk = self._chunk
        within = offset % chunk
        if within + (stop - offset) <= chunk:
            # Within one chunk (every keystroke echo): one copy, no view.
            first = self._chunks[offset // chunk - self._first_chunk]
            return bytes(first[within : within + (stop - offset)])
        views = self.views_from(offset, max_bytes)
        assert isinstance(views, list)
        return b"".join(views)

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
