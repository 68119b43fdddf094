"""A session's recorder: its output, input and resizes into the recording batcher.

A :class:`Recorder` belongs to one session.  The session's output pump calls
``recorder.output_nowait(data)`` for every chunk it reads from the upstream
(``await recorder.output(data)`` when that finds no room), its input path
``await recorder.input(data)``, and ``recorder.resize(c, r)`` on every size
change; ``await recorder.aclose()`` when it ends.  The
recorder stamps each event with its clock and hands it to the recording
:class:`~podterm.batcher.Batcher`: no encoding and no I/O here (the writer
thread turns records into asciicast lines, :mod:`podterm.recording.writer`).

Backpressure: ``output`` and ``input`` wait while the recording buffer is
full, so a writer that falls behind slows the session's pump (the process
blocks on its terminal) rather than losing output.  ``resize`` cannot wait
(sessions resize from synchronous code); when the buffer is full the newest
size is held and submitted, with its original time, before the next event:
intermediate sizes inside one stall are coalesced (counted), never reordered.

Fail closed: when the writer cannot write this session's file, the recorder
turns *failed*: the next ``output``/``input`` raises :class:`RecordingFailed`
(close 1011), :meth:`Recorder.wait_failed` returns, and callbacks registered
with :meth:`Recorder.on_failure` run, so the session can be closed instead of
going on unrecorded (as Teleport's ``disconnectPartyOnErr``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import trio

from podterm.batcher import Batcher, BufferFull
from podterm.errors import CloseCode, PodtermError
from podterm.recording.asciicast import Header

__all__ = ["CastRecord", "Recorder", "RecorderStatistics", "RecordingFailed"]

log = logging.getLogger(__name__)

#: Bound on waiting for room for the closing record in :meth:`Recorder.aclose`.
CLOSE_TIMEOUT_S = 5.0


class RecordingFailed(PodtermError):
    """The session's recording cannot be written; the session must end (close 1011)."""

    close_code = CloseCode.INTERNAL_ERROR
    http_status = 500
    outcome = "error"
    reason_name = "InternalError"


class CastRecord(NamedTuple):
    """One entry of the recording buffer (what the writer thread receives).

    ``kind`` is ``"h"`` (header: start the file), ``"o"``, ``"i"``, ``"r"``
    (data ``b"COLSxROWS"``), ``"m"`` (a marker: data is its UTF-8 label) or
    ``"c"`` (close the file); ``t`` is seconds since the recording started.
    ``session_id`` names the file: the session's id, or ``<id>.partN`` for
    the continuation of a session adopted by another gateway.
    """

    session_id: str
    kind: str
    t: float
    data: bytes
    header: Header | None = None


#: Per-record bookkeeping counted against the buffer besides the data itself
#: (the tuple, the float, the bytes object header): ~100 bytes on CPython.
RECORD_OVERHEAD_BYTES = 100


def record_weight(record: CastRecord) -> int:
    """A record's weight in the recording batcher: its bytes plus overhead."""
    return len(record.data) + RECORD_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class RecorderStatistics:
    """A frozen snapshot of one recorder."""

    session_id: str
    path: str | None
    bytes_out: int
    bytes_in: int
    events: int
    resizes_coalesced: int
    failed: bool
    closed: bool


class Recorder:
    """Records one session into the recording batcher.

    Args:
        session_id: the session's id (the file is ``<id>.cast``).
        cols, rows: the terminal size at the start (the header's width/height).
        clock: seconds, monotonic (default ``trio.current_time``; tests pass
            a fake).  Event times are ``clock() -`` its value at construction.
        batcher: the recording writer's batcher (see
            :meth:`~podterm.recording.writer.RecordingWriter.open_recorder`,
            which builds recorders and writes their header).
        record_input: also record input (off by default: it holds passwords
            typed at prompts that never echoed).
        path: where the file goes (for statistics and messages).
    """

    __slots__ = ("session_id", "cols", "rows", "record_input", "path", "_clock", "_t0",
                 "_batcher", "_failure", "_failed_event", "_callbacks", "_closed",
                 "_pending_resize", "bytes_out", "bytes_in", "events", "resizes_coalesced")

    def __init__(self, session_id: str, cols: int, rows: int,
                 clock: Callable[[], float] = trio.current_time, *,
                 batcher: Batcher[CastRecord], record_input: bool = False,
                 path: Path | None = None) -> None:
        self.session_id = session_id
        self.cols = cols
        self.rows = rows
        self.record_input = record_input
        self.path = path
        self._clock = clock
        self._t0 = clock()
        self._batcher = batcher
        self._failure: RecordingFailed | None = None
        self._failed_event = trio.Event()
        self._callbacks: list[Callable[[Recorder, RecordingFailed], None]] = []
        self._closed = False
        self._pending_resize: CastRecord | None = None
        self.bytes_out = 0
        self.bytes_in = 0
        self.events = 0
        self.resizes_coalesced = 0

    def __repr__(self) -> str:
        state = "failed" if self._failure else "closed" if self._closed else "recording"
        return (f"<Recorder {self.session_id} {state} out={self.bytes_out} "
                f"in={self.bytes_in} events={self.events}>")

    def _now(self) -> float:
        return max(0.0, self._clock() - self._t0)

    def header(self, *, timestamp: int | None, env: dict[str, str] | None = None,
               title: str | None = None, command: str | None = None) -> CastRecord:
        """The record that starts the file (submitted by the writer's ``open_recorder``)."""
        header = Header(width=self.cols, height=self.rows, timestamp=timestamp,
                        env=MappingProxyType(dict(env or {})), title=title,
                        command=command)
        return CastRecord(self.session_id, "h", 0.0, b"", header)

    # ------------------------------------------------------------- failure

    @property
    def failure(self) -> RecordingFailed | None:
        """Why the recording failed, or None."""
        return self._failure

    @property
    def is_failed(self) -> bool:
        return self._failure is not None

    def on_failure(self, callback: Callable[[Recorder, RecordingFailed], None]) -> None:
        """Call ``callback(recorder, error)`` on the event loop when the recording fails.

        Registered after the failure, it runs at once.
        """
        if self._failure is not None:
            callback(self, self._failure)
        else:
            self._callbacks.append(callback)

    async def wait_failed(self) -> RecordingFailed:
        """Wait until the recording fails; returns the error (callers bound the wait)."""
        await self._failed_event.wait()
        assert self._failure is not None
        return self._failure

    def fail(self, exc: BaseException) -> None:
        """Mark the recording failed (the writer calls this); idempotent."""
        if self._failure is not None:
            return
        where = f" to {self.path}" if self.path else ""
        self._failure = RecordingFailed(
            f"session {self.session_id}: the recording cannot be written{where}: {exc}; "
            "the session is closed rather than left unrecorded")
        self._failure.__cause__ = exc
        self._failed_event.set()
        for callback in self._callbacks:
            try:
                callback(self, self._failure)
            except Exception:  # one bad callback must not hide the failure from others
                log.exception("recording.failure callback for %s failed", self.session_id)
        self._callbacks.clear()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise trio.ClosedResourceError(f"the recorder of {self.session_id} is closed")

    # -------------------------------------------------------------- events

    async def _submit(self, record: CastRecord) -> None:
        pending = self._pending_resize
        if pending is not None:
            await self._batcher.submit(pending)
            self._pending_resize = None
            self.events += 1
        await self._batcher.submit(record)
        self.events += 1

    async def output(self, data: bytes) -> None:
        """Record output bytes (waits while the recording buffer is full).

        Raises:
            RecordingFailed: the recording failed; end the session.
            trio.ClosedResourceError: after :meth:`aclose`, or the writer stopped.
        """
        self._check()
        if not data:
            await trio.lowlevel.checkpoint()
            return
        self.bytes_out += len(data)
        await self._submit(CastRecord(self.session_id, "o", self._now(), bytes(data)))

    def output_nowait(self, data: bytes) -> bool:
        """Record output bytes if the recording buffer has room now; never blocks.

        The output pump's fast path: ``if not recorder.output_nowait(data):
        await recorder.output(data)``.  It saves the pump a trip through the
        scheduler per chunk (its upstream read has just been one), which at
        bulk rates is a measurable share of the relay (docs/benchmarks.md,
        "Recording cost").

        Returns:
            True when the chunk is recorded (or empty); False when nothing was
            recorded because the buffer has no room, other producers are
            waiting for room, or a held resize must go first: then ``await
            output(data)``, which waits its turn.

        Raises:
            RecordingFailed, trio.ClosedResourceError: as :meth:`output`.
        """
        self._check()
        if not data:
            return True
        batcher = self._batcher
        if self._pending_resize is not None or not batcher.has_room(
                len(data) + RECORD_OVERHEAD_BYTES):
            return False
        batcher.submit_nowait(CastRecord(self.session_id, "o", self._now(), bytes(data)))
        self.bytes_out += len(data)
        self.events += 1
        return True

    async def input(self, data: bytes) -> None:
        """Record input bytes when ``record_input`` is on; otherwise only count them.

        Raises:
            RecordingFailed, trio.ClosedResourceError: as :meth:`output`.
        """
        self._check()
        self.bytes_in += len(data)
        if not self.record_input or not data:
            await trio.lowlevel.checkpoint()
            return
        await self._submit(CastRecord(self.session_id, "i", self._now(), bytes(data)))

    async def marker(self, label: str) -> None:
        """Record an asciicast marker (``"m"``) event, e.g. where a continuation resumes.

        Raises:
            RecordingFailed, trio.ClosedResourceError: as :meth:`output`.
        """
        self._check()
        await self._submit(CastRecord(self.session_id, "m", self._now(),
                                      label.encode("utf-8")))

    def resize(self, cols: int, rows: int) -> None:
        """Record a size change; never blocks (see the module docstring)."""
        if self._failure is not None or self._closed or (cols, rows) == (self.cols, self.rows):
            return
        if cols < 1 or rows < 1:
            raise ValueError(f"resize {cols}x{rows}: both must be at least 1")
        self.cols, self.rows = cols, rows
        record = CastRecord(self.session_id, "r", self._now(), f"{cols}x{rows}".encode())
        if self._pending_resize is None:
            try:
                self._batcher.submit_nowait(record)
                self.events += 1
                return
            except BufferFull:
                pass
            except trio.ClosedResourceError:
                return
        else:
            self.resizes_coalesced += 1
        self._pending_resize = record

    async def aclose(self) -> None:
        """End the recording: the writer flushes carried bytes and closes the file.

        Never raises for a failed or stopped writer (the session is ending
        anyway).  Waits for room at most :data:`CLOSE_TIMEOUT_S`, shielded, so
        it works in a session's cleanup under cancellation.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        # Sent for a failed recording too: it tells the writer to forget the file.
        close = CastRecord(self.session_id, "c", self._now(), b"")
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
            try:
                await self._submit(close)
            except trio.ClosedResourceError:
                pass  # the writer already stopped; it closed every file itself
        if scope.cancelled_caught:
            log.error("recording.close.failed %s: no room in the recording buffer within "
                      "%s s; the writer closes the file at shutdown", self.session_id,
                      CLOSE_TIMEOUT_S)

    @property
    def is_closed(self) -> bool:
        return self._closed

    def statistics(self) -> RecorderStatistics:
        return RecorderStatistics(
            session_id=self.session_id, path=str(self.path) if self.path else None,
            bytes_out=self.bytes_out, bytes_in=self.bytes_in, events=self.events,
            resizes_coalesced=self.resizes_coalesced, failed=self._failure is not None,
            closed=self._closed)
