"""The session output ring, addressed by absolute byte offsets.

A session numbers its output bytes from 0 when it is created and never resets
the count (spec/podterm-protocol.md, "Offsets").  The ring keeps the *newest*
``capacity_bytes`` of that stream so a client that reconnects with offset N
gets exactly bytes N.. replayed, or, when N has already left the ring, a
:class:`Gap` that says precisely how much was lost.

Storage: a list of *segments*, each a run of consecutive output bytes.
Output arrives in two shapes, and each is stored the way it is cheapest:

* **Bulk reads** (``chunk_bytes`` or more in one ``bytes`` object: a pipe or
  PTY read of a busy process) are kept as they are: the ``bytes`` the read
  returned *is* the segment, no copy (issue 9: the relay used to re-chunk
  every 64 KiB read into 4 KiB pieces, in Python).  A read larger than
  :data:`MAX_SEGMENT_BYTES` is copied into pieces of that size, so that no
  segment pins more than that much memory.
* **Small output** (echoes, prompts, most PTY reads) is copied into the
  newest segment while that is a ``bytearray`` with room, up to
  ``chunk_bytes``; a full one is followed by a new one.  So a session that
  printed a 100-byte prompt holds about 100 bytes of storage, not a chunk,
  let alone its capacity, and a ring that never printed holds none (issue 9:
  40,000 mostly idle sessions, 12 KiB each); and a million one-byte echoes
  cost 256 segments of 4 KiB, not a million objects.

Trimming drops whole segments once every byte in them is older than
``start`` and keeps an offset into the first one, so storage is the bytes
held plus what the first segment still holds below ``start``: never more
than ``capacity_bytes + max(chunk_bytes, MAX_SEGMENT_BYTES)``
(:attr:`OutputRing.allocated_bytes` counts exactly this; it is what the
metrics report).

Copies: :meth:`OutputRing.views_from` hands out read-only memoryviews of
the segments, no copy; the bytes under a view never change, because held
bytes are never written again and a dropped segment is never reused (when a
view pins the growing ``bytearray``, the next append that must grow it moves
on to a copy of it and leaves the viewed one alone).
:meth:`OutputRing.read_from` returns ``bytes`` (one copy), as it always has.

Pure data structure: no I/O, no clock, no locks (trio tasks do not preempt).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from ..protocol._types import Buffer

__all__ = ["MAX_SEGMENT_BYTES", "Gap", "OutputRing", "RingStatistics", "channel_runs"]

# 1 MiB: the per-session default in ARCHITECTURE.md ("Sessions").  Enough to
# replay a few full screens of a busy build log after a laptop sleeps.
DEFAULT_CAPACITY_BYTES = 1 << 20
# 4 KiB: one page; a shell prompt plus a few commands' output fits in one
# growing segment, which keeps an idle session well inside issue 9's
# 12 KiB-per-session budget.  Reads this size and larger are kept as they came.
DEFAULT_CHUNK_BYTES = 4096
#: The largest segment: one default upstream read (SessionLimits.read_bytes;
#: a busy pipe's read, upstream/local.py BULK_PIPE_BYTES).  Bounds what one
#: partly trimmed segment can pin below ``start``.
MAX_SEGMENT_BYTES = 262144


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
    """A snapshot of one :class:`OutputRing`.

    ``chunks`` counts the segments stored; ``nbytes_allocated`` is
    :attr:`OutputRing.nbytes_allocated`.
    """

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
        chunk_bytes: small output is gathered into segments this size;
            ``bytes`` appends this size or larger are kept whole, without a copy.

    Raises:
        ValueError: a size is not positive, or the capacity is not a whole
            number of chunks.
    """

    __slots__ = ("_capacity", "_chunk", "_max_seg", "_segs", "_starts", "_end", "_start")

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
        # Never above the capacity (a small ring keeps small pieces), never
        # below a chunk (the unit small output is gathered in).
        self._max_seg = max(chunk_bytes, min(MAX_SEGMENT_BYTES, capacity_bytes))
        # Segments in offset order: ``bytes`` (kept as appended, or a copied
        # piece) or the growing ``bytearray`` of small output, which is only
        # ever the last one.  _starts[i] is the offset of _segs[i][0].  Plain
        # lists: an idle ring's empty list is 56 bytes (a deque is 760), and
        # dropping the front is one ``del`` over a few hundred items at most.
        # The first segment replaces both with lists of one (no spare slots:
        # an idle session keeps that shape).  Segments are contiguous, so the
        # storage that exists is ``end - _starts[0]``.
        self._segs: list[bytes | bytearray] = []
        self._starts: list[int] = []
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
        """The ring's memory for metrics: :attr:`allocated_bytes`, with the growing
        ``bytearray`` counted at the ``chunk_bytes`` it may still grow to.

        An upper bound of :attr:`allocated_bytes`; 0 for a ring that never
        held output; ``chunk_bytes`` for an idle session with a prompt.
        """
        segs = self._segs
        if not segs:
            return 0
        if type(segs[-1]) is bytearray:
            return self._end - self._starts[0] - len(segs[-1]) + self._chunk
        return self._end - self._starts[0]

    @property
    def allocated_bytes(self) -> int:
        """Bytes of segment storage that exist now (the payloads of the segments).

        0 until output arrives; the bytes held plus whatever the oldest
        segment still holds below ``start`` (less than one segment).
        """
        return self._end - self._starts[0] if self._segs else 0

    def start_at(self, offset: int) -> None:
        """Number an empty ring's first byte ``offset`` (a stream resumed elsewhere).

        ``start`` and ``end`` become ``offset``; a read below it is a :class:`Gap`.

        Raises:
            ValueError: something was appended already, or ``offset`` is negative.
        """
        if self._end != self._start or self._segs or self._end:
            raise ValueError("start_at() is for a ring nothing was appended to")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._start = self._end = offset

    def append(self, data: Buffer) -> int:
        """Add ``data`` at the end, trimming the oldest bytes beyond capacity.

        A ``bytes`` object of ``chunk_bytes`` or more (up to the largest
        segment) is kept as it is; anything else is copied, so the caller may
        reuse a mutable buffer at once.  Data longer than the capacity keeps
        only its last ``capacity_bytes``.

        Returns:
            The new end offset.
        """
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        if size == 0:
            return self._end
        end = self._end
        if size >= self._capacity:
            # Nothing held now survives: drop it all, and skip the prefix of
            # ``data`` that would be trimmed the moment it was written.
            skip = size - self._capacity
            self._segs = []
            self._starts = []
            end += skip
            self._start = self._end = end
            if skip:
                data = memoryview(data).cast("B")[skip:]
                size = self._capacity
        else:
            # Trim first, so dropped segments are gone before new ones exist.
            new_start = end + size - self._capacity
            if new_start > self._start:
                self._trim_to(new_start)
        segs = self._segs
        if size >= self._chunk:
            if type(data) is bytes and size <= self._max_seg:
                # A bulk read: the segment is the read's own bytes object.
                self._push(data, end)
            else:
                view = memoryview(data).cast("B")
                step = self._max_seg
                for pos in range(0, size, step):
                    self._push(bytes(view[pos : pos + step]), end + pos)
            self._end = end + size
            return self._end
        # Small output: gather it in the growing bytearray (the last segment).
        pos = 0
        if segs:
            tail = segs[-1]
            if type(tail) is bytearray:
                room = self._chunk - len(tail)
                if room > 0:
                    take = room if room < size else size
                    piece = data if take == size else memoryview(data).cast("B")[:take]
                    try:
                        tail += piece
                    except BufferError:
                        # A reader still holds a view of it, so it cannot be
                        # resized: continue in a copy; the viewed one stays as it is.
                        tail = segs[-1] = bytearray(tail)
                        tail += piece
                    pos = take
        if pos < size:
            self._push(bytearray(data if pos == 0 else memoryview(data).cast("B")[pos:]), end + pos)
        self._end = end + size
        return self._end

    def _push(self, segment: bytes | bytearray, start: int) -> None:
        if self._segs:
            self._segs.append(segment)
            self._starts.append(start)
        else:
            self._segs = [segment]
            self._starts = [start]

    def _trim_to(self, new_start: int) -> None:
        """Advance start to ``new_start``; drop the segments that no longer hold anything."""
        self._start = new_start
        # A segment is free once all its offsets are below start, i.e. the
        # next one starts at or below it; ``new_start`` is below ``end`` here,
        # so the segment holding ``end - 1`` always stays.
        starts = self._starts
        drop = bisect_right(starts, new_start) - 1
        if drop > 0:
            del self._segs[:drop]
            del starts[:drop]

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

        One view per segment the range touches, in order (an empty list when
        ``offset == end``).  The bytes under a view never change (see the
        module docstring), so a view may be kept after later appends; it keeps
        its segment's memory alive while it exists.

        Returns:
            The views for ``start <= offset <= end``; a :class:`Gap` when
            ``offset < start``: resume from ``gap.resume_at``.

        Raises:
            ValueError: ``offset > end``, or a negative ``offset`` or ``max_bytes``.
        """
        gap = self._check_read(offset, max_bytes)
        if gap is not None:
            return gap
        remaining = min(self._end, offset + max_bytes) - offset
        views: list[memoryview] = []
        if remaining <= 0:
            return views
        segs = self._segs
        starts = self._starts
        index = bisect_right(starts, offset) - 1
        within = offset - starts[index]
        while remaining > 0:
            seg = segs[index]
            take = len(seg) - within
            if take > remaining:
                take = remaining
            view = memoryview(seg)
            if type(seg) is bytearray:
                view = view.toreadonly()
            views.append(view[within : within + take] if take != len(seg) else view)
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
        size = min(self._end, offset + max_bytes) - offset
        if size <= 0:
            return b""
        starts = self._starts
        index = bisect_right(starts, offset) - 1
        within = offset - starts[index]
        seg = self._segs[index]
        if within + size <= len(seg):
            # Within one segment (every keystroke echo): one copy, no view.
            if within == 0 and size == len(seg) and type(seg) is bytes:
                return seg
            return bytes(seg[within : within + size])
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
            chunks=len(self._segs),
            nbytes_allocated=self.nbytes_allocated,
        )
