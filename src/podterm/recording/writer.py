"""Session recordings on disk: one asciicast v2 file per session, written off the event loop.

One :class:`RecordingWriter` serves every session of a gateway process.  Its
:class:`~podterm.batcher.Batcher` (bounded in *bytes*: a record weighs its
data) collects the :class:`~podterm.recording.recorder.CastRecord` entries
of all recorders; each batch goes to a worker thread that encodes them into
asciicast lines (:class:`CastLines`) and appends each session's lines to
``<dir>/<session id>.cast`` with one ``write`` loop per file per batch.

Encoding cost: whatever the worker thread does while holding the GIL, the
event loop (the relay) waits for, so the bytes are handled without it.
:class:`CastLines` writes the same bytes as
:class:`~podterm.recording.asciicast.CastEncoder` (``json.dumps(ensure_ascii=
False)``), but a chunk that is complete, valid UTF-8 is escaped bytes to bytes
with no ``str`` decode and no JSON encoder: per batch, ``scan_many`` judges
every chunk at once (valid UTF-8? how many bytes do its escapes add?), each
file's lines collect in a ``LineBuffer`` (line openings, chunks to escape,
line ends; references, no copies), and ``LineBuffer.write_to`` escapes them
into a reused scratch buffer and writes it, one ``write`` loop per file per
batch.  The compiled ``podterm._native.castesc`` does both with the GIL
released (twice per batch, whatever the number of chunks); its pure-Python
twin :mod:`podterm.recording.castesc` is the fallback and the oracle.  Only
a chunk that splits a character or holds invalid bytes goes through the
incremental decoder (carrying the split sequence over) and ``json.dumps``.
docs/benchmarks.md ("Recording cost") has the measurements.

Descriptors: a gateway may hold 9,000 sessions in a 20,000-descriptor process
(config.LimitsConfig), so the writer keeps at most ``max_open_files`` files
open (least recently written closed first; reopened for append when needed).

Failure: an error writing one session's file (disk full, directory gone,
quota) fails *that* recording: its recorder is told (on the event loop,
after the batch), the session closes itself (fail closed), and the file's
later records are discarded and counted (``discarded_records``), because the
session they belong to is being closed for exactly that reason.  Other
sessions' files are unaffected.  A failure is never silent: it is logged,
counted, and reported to the session, which writes a ``recording.failure``
audit event.

Parts: a session another gateway adopted (its gateway died, docs/ha.md) is
recorded on in ``<dir>/<id>.partN.cast`` (N >= 2, the lowest free here; see
:meth:`RecordingWriter.open_continuation`), which starts with a marker naming
the output offset it continues at.  :func:`recording_parts` lists a
recording's parts in order, for ``podterm replay``.

Files are created ``0600`` with ``O_EXCL``: a recording is never appended to
another session's file, and holds what was typed at the terminal.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from podterm.batcher import (
    DEFAULT_CLOSE_TIMEOUT_S,
    Batcher,
    BatcherStatistics,
    FullPolicy,
)
from podterm.protocol._types import Buffer
from podterm.recording import castesc
from podterm.recording.asciicast import Header, encode_event
from podterm.recording.castesc import LineBuffer
from podterm.recording.recorder import CastRecord, Recorder, record_weight

__all__ = ["CastLines", "RecordingWriter", "RecordingWriterStatistics", "cast_path",
           "escape_json_utf8", "part_key", "recording_parts", "split_part"]

log = logging.getLogger(__name__)

#: 16 MiB of pending recording data per process: ~1.6 s of a full-speed `cat`
#: from 100 sessions at 100 KiB/s each; beyond it recorders wait (backpressure).
DEFAULT_CAPACITY_BYTES = 16 * 1024 * 1024
#: 4 MiB per batch: one write per file per batch, and one thread hop (~40 us of
#: the event loop's time here) per 4 MiB of bulk output rather than per 1 MiB;
#: a quarter of the capacity, so producers keep room while a batch is written.
DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024
#: 0.1 s: terminal output arrives in small chunks (a PTY read is often < 100 B);
#: coalescing for a tenth of a second turns thousands of tiny writes into a few,
#: at no cost to a recording's content or timing (each event keeps its time).
DEFAULT_FLUSH_INTERVAL_S = 0.1
#: Open recording files at once; see "Descriptors" above.
DEFAULT_MAX_OPEN_FILES = 256

# Session ids become file names: no '/', no leading '.', nothing to escape
# (cli._SESSION_ID's rule).
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def cast_path(directory: str | os.PathLike[str], session_id: str) -> Path:
    """``<directory>/<session_id>.cast``.

    Raises:
        ValueError: the session id could escape the directory.
    """
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"session id {session_id!r} cannot name a recording file")
    return Path(directory) / f"{session_id}.cast"


#: ``<id>.part<N>.cast``: part N (N >= 2) of a session's recording, written by
#: the gateway that adopted the session (docs/ha.md, "Recordings of adopted sessions").
_PART = re.compile(r"(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,127}?)\.part(?P<n>[1-9][0-9]{0,5})")


def part_key(session_id: str, part: int) -> str:
    """The recording key (file stem) of part ``part`` of ``session_id``'s recording.

    Part 1 is the session's own ``<id>.cast``; a continuation is ``<id>.partN``.
    """
    if part < 1:
        raise ValueError(f"recording part {part} must be at least 1")
    return session_id if part == 1 else f"{session_id}.part{part}"


def split_part(stem: str) -> tuple[str, int]:
    """``("<id>", N)`` for a recording file stem (``<id>`` is part 1)."""
    match = _PART.fullmatch(stem)
    if match is None:
        return stem, 1
    return match.group("id"), int(match.group("n"))


def recording_parts(first: str | os.PathLike[str]) -> list[Path]:
    """``first`` (``<dir>/<id>.cast``) and the continuation parts next to it, in order.

    The parts are the ``<id>.partN.cast`` files of the same directory, by N;
    a part file given as ``first`` is returned alone (play from there on by
    naming the parts yourself).
    """
    path = Path(first)
    stem = path.name[:-len(".cast")] if path.name.endswith(".cast") else None
    if stem is None or split_part(stem)[1] != 1:
        return [path]
    found: list[tuple[int, Path]] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return [path]
    for entry in entries:
        name = entry.name
        if not name.endswith(".cast"):
            continue
        sid, n = split_part(name[:-len(".cast")])
        if sid == stem and n > 1:
            found.append((n, entry))
    return [path, *(p for _, p in sorted(found))]


@dataclass(frozen=True, slots=True)
class RecordingWriterStatistics:
    """A frozen snapshot of the recording writer.

    Attributes:
        batcher: the batcher's snapshot (weights are bytes).
        recorders: recorders whose file is not finished yet.
        files_open: descriptors held now.
        files_created: recording files created.
        files_finished: recordings closed cleanly.
        failures: recordings failed (each closed its session).
        discarded_records: records of failed recordings, not written on purpose.
        bytes_written: bytes appended to recording files.
    """

    batcher: BatcherStatistics
    recorders: int
    files_open: int
    files_created: int
    files_finished: int
    failures: int
    discarded_records: int
    bytes_written: int


# --------------------------------------------------------------- encoding

#: The compiled escaper (JSON escaping and the file write with the GIL
#: released), unless it is not built: castesc.IMPL says which, and why.
_ESCAPER = castesc.load(castesc.IMPL)
#: ``data`` as the inside of a JSON string, or None if it is not complete UTF-8.
escape_json_utf8: Callable[[Buffer], bytes | None] = _ESCAPER.escape_json_utf8
_scan_many = _ESCAPER.scan_many
_LineBuffer = _ESCAPER.line_buffer


class CastLines:
    """One recording's asciicast lines: :class:`~podterm.recording.asciicast.CastEncoder`'s
    bytes, without decoding and JSON-encoding every chunk.

    Not thread-safe; one per recording.  Times are made non-decreasing and
    rounded to microseconds as ``CastEncoder`` does.  ``output`` and ``input``
    append a line's parts to ``out`` (a :class:`~podterm.recording.castesc.LineBuffer`:
    ``out.getvalue()`` is the line) and append nothing for a chunk that only
    began a character.

    Args:
        header: the recording's header.
    """

    __slots__ = ("header", "_out", "_in", "_out_carry", "_in_carry", "_last")

    def __init__(self, header: Header) -> None:
        self.header = header
        self._out = codecs.getincrementaldecoder("utf-8")("replace")
        self._in = codecs.getincrementaldecoder("utf-8")("replace")
        # True while the decoder holds the start of a split character.
        self._out_carry = False
        self._in_carry = False
        self._last = 0.0

    def header_line(self) -> bytes:
        return self.header.to_json_line()

    @property
    def last_time(self) -> float:
        """The time of the last event encoded (0 before any)."""
        return self._last

    def _at(self, t: float) -> float:
        t = max(t, self._last)  # (an earlier time is raised to the last one, NaN stays NaN)
        if not 0.0 <= t < math.inf:
            raise ValueError(f"event time {t!r} must be a finite number >= 0")
        self._last = t
        return round(t, 6)  # microseconds, as asciicast.encode_event writes them

    def output(self, t: float, data: bytes, out: LineBuffer, extra: int | None = None) -> None:
        """Append an ``"o"`` line for ``data`` to ``out`` (or nothing, see the class).

        ``extra`` is ``scan_many([data])[0]`` when the caller has it already
        (the writer judges a whole batch at once).
        """
        self._out_carry = self._line("o", self._out, self._out_carry, t, data, out, extra)

    def input(self, t: float, data: bytes, out: LineBuffer, extra: int | None = None) -> None:
        """Append an ``"i"`` line for ``data`` to ``out`` (or nothing, see the class).

        ``extra``: as :meth:`output`'s.
        """
        self._in_carry = self._line("i", self._in, self._in_carry, t, data, out, extra)

    def _line(self, kind: str, decoder: codecs.IncrementalDecoder, carry: bool, t: float,
              data: bytes, out: LineBuffer, extra: int | None) -> bool:
        """One ``kind`` line; returns whether ``decoder`` now holds a split character."""
        if not data:
            return carry
        if not carry:
            if extra is None:
                extra = _scan_many((data,))[0]
            if extra >= 0:
                out.raw(b'[%a,"%s","' % (self._at(t), kind.encode()))
                out.escaped(data, extra)
                out.raw(b'"]\n')
                return False
        text = decoder.decode(data)
        carry = bool(decoder.getstate()[0])
        if text:
            out.raw(encode_event(self._at(t), kind, text))
        return carry

    def marker(self, t: float, label: str) -> bytes:
        """An ``"m"`` (marker) line."""
        return encode_event(self._at(t), "m", label)

    def resize(self, t: float, cols: int, rows: int) -> bytes:
        """An ``"r"`` line."""
        if cols < 1 or rows < 1:
            raise ValueError(f"resize {cols}x{rows}: both must be at least 1")
        return encode_event(self._at(t), "r", f"{cols}x{rows}")

    def finish(self, t: float) -> bytes:
        """Lines for bytes still carried (an incomplete character at the end: U+FFFD)."""
        lines = b""
        text = self._out.decode(b"", final=True)
        if text:
            lines += encode_event(self._at(t), "o", text)
        text = self._in.decode(b"", final=True)
        if text:
            lines += encode_event(self._at(t), "i", text)
        self._out_carry = self._in_carry = False
        return lines


# ------------------------------------------------------------------ files


class _CastFile:
    __slots__ = ("session_id", "path", "encoder", "fd", "created", "pending", "closing",
                 "failed")

    def __init__(self, session_id: str, path: Path, encoder: CastLines) -> None:
        self.session_id = session_id
        self.path = path
        self.encoder = encoder
        self.fd: int | None = None
        self.created = False
        self.pending: LineBuffer = _LineBuffer()
        self.closing = False
        self.failed = False


class _Files:
    """The thread side: encoders and descriptors.  Used only under the writer's limiter."""

    def __init__(self, directory: Path, *, max_open: int, fsync_on_close: bool,
                 mode: int) -> None:
        self.directory = directory
        self.max_open = max_open
        self.fsync_on_close = fsync_on_close
        self.mode = mode
        self.files: dict[str, _CastFile] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()  # ids with an open fd
        # Handed to the event loop after each batch (by after_write):
        self.failures: list[tuple[str, BaseException]] = []
        self.finished: list[str] = []
        self.created = 0
        self.finished_total = 0
        self.failures_total = 0
        self.discarded = 0
        self.bytes_written = 0
        # What the native LineBuffer renders into before each write (reused).
        self.scratch = _ESCAPER.scratch()

    def _fd(self, f: _CastFile) -> int:
        if f.fd is not None:
            self.lru.move_to_end(f.session_id)
            return f.fd
        if f.created:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        else:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(f.path, flags, self.mode)
        if not f.created:
            f.created = True
            self.created += 1
        f.fd = fd
        self.lru[f.session_id] = None
        while len(self.lru) > self.max_open:
            oldest, _ = self.lru.popitem(last=False)
            other = self.files[oldest]
            if other.fd is not None:
                fd_old, other.fd = other.fd, None
                os.close(fd_old)
        return fd

    def _drop_fd(self, f: _CastFile) -> None:
        self.lru.pop(f.session_id, None)
        if f.fd is not None:
            fd, f.fd = f.fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _fail(self, f: _CastFile, exc: BaseException) -> None:
        f.failed = True
        f.pending.clear()
        self._drop_fd(f)
        self.failures.append((f.session_id, exc))
        self.failures_total += 1

    def write(self, batch: list[CastRecord]) -> None:
        """Encode and append a batch; per-file errors fail only that recording."""
        touched: dict[str, _CastFile] = {}
        # Every chunk of the batch judged in one call (valid UTF-8? how long
        # escaped?): natively, with the GIL released once for the whole batch.
        extras = _scan_many([rec.data if rec.kind == "o" or rec.kind == "i" else b""
                             for rec in batch])
        for rec, extra in zip(batch, extras, strict=True):
            f = self.files.get(rec.session_id)
            kind = rec.kind
            if kind == "h":
                assert rec.header is not None
                f = _CastFile(rec.session_id, cast_path(self.directory, rec.session_id),
                              CastLines(rec.header))
                self.files[rec.session_id] = f
                f.pending.raw(f.encoder.header_line())
            elif f is None:
                self.discarded += 1  # a session whose header never arrived: a bug upstream
                continue
            elif f.failed:
                if kind == "c":
                    del self.files[rec.session_id]
                    self.finished.append(rec.session_id)
                else:
                    self.discarded += 1
                continue
            elif kind == "o":
                f.encoder.output(rec.t, rec.data, f.pending, extra)
            elif kind == "i":
                f.encoder.input(rec.t, rec.data, f.pending, extra)
            elif kind == "m":
                f.pending.raw(f.encoder.marker(rec.t, rec.data.decode("utf-8", "replace")))
            elif kind == "r":
                cols, _, rows = rec.data.partition(b"x")
                f.pending.raw(f.encoder.resize(rec.t, int(cols), int(rows)))
            elif kind == "c":
                f.pending.raw(f.encoder.finish(rec.t))
                f.closing = True
            touched[rec.session_id] = f
        for f in touched.values():
            if f.failed:
                continue
            try:
                if len(f.pending):
                    # Escaped and written with the GIL released (native LineBuffer).
                    self.bytes_written += f.pending.write_to(self._fd(f), self.scratch)
                if f.closing:
                    if f.fd is not None and self.fsync_on_close:
                        os.fsync(f.fd)
                    self._drop_fd(f)
                    del self.files[f.session_id]
                    self.finished.append(f.session_id)
                    self.finished_total += 1
            except OSError as exc:
                self._fail(f, exc)

    def close_all(self) -> None:
        """At shutdown: finish every recording still open (carried bytes, fsync, close)."""
        for f in list(self.files.values()):
            try:
                if not f.failed:
                    f.pending.raw(f.encoder.finish(f.encoder.last_time))
                    if len(f.pending):
                        self.bytes_written += f.pending.write_to(self._fd(f), self.scratch)
                    if f.fd is not None and self.fsync_on_close:
                        os.fsync(f.fd)
            except OSError as exc:
                log.error("recording.close.failed %s: %s", f.path, exc)
            finally:
                self._drop_fd(f)
        self.files.clear()


class RecordingWriter:
    """Writes every session's recording; start it with ``await nursery.start(writer.run)``.

    Args:
        directory: where ``<session id>.cast`` files go (created 0700 if missing).
        record_input: recorders made by :meth:`open_recorder` also record input.
        capacity_bytes: the buffer bound, in bytes of pending data.
        policy: the full policy (``block`` or ``fail-closed``, as audit's).
        high_water: ``fail-closed`` refuses new sessions above this many bytes
            (default: three quarters of the capacity).
        max_batch_bytes, flush_interval_s, close_timeout_s: the batcher's.
        max_open_files: descriptors held at most.
        fsync_on_close: fsync each recording when its session ends.
        clock: the recorders' default clock.
    """

    def __init__(self, directory: str | os.PathLike[str], *, record_input: bool = False,
                 capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
                 policy: FullPolicy | str = FullPolicy.BLOCK, high_water: int | None = None,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
                 flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
                 max_open_files: int = DEFAULT_MAX_OPEN_FILES, fsync_on_close: bool = True,
                 clock: Callable[[], float] = trio.current_time) -> None:
        if max_open_files < 1:
            raise ValueError(f"max_open_files={max_open_files} must be at least 1")
        self.directory = Path(directory)
        self.record_input = record_input
        self.close_timeout_s = close_timeout_s
        self._clock = clock
        self._files = _Files(self.directory, max_open=max_open_files,
                             fsync_on_close=fsync_on_close, mode=0o600)
        self._recorders: dict[str, Recorder] = {}
        self._batcher: Batcher[CastRecord] = Batcher(
            self._files.write, name="recording", capacity=capacity_bytes, policy=policy,
            high_water=high_water, max_batch=max_batch_bytes, flush_interval_s=flush_interval_s,
            weight=record_weight, close_timeout_s=close_timeout_s,
            after_write=self._after_write)

    @classmethod
    def from_config(cls, directory: str | None, *, record_input: bool = False,
                    full_policy: str = "block") -> RecordingWriter | None:
        """``from_config(cfg.recording.dir, record_input=cfg.recording.record_input,
        full_policy=cfg.audit.full_policy)``; None when recording is off (no dir)."""
        if directory is None:
            return None
        return cls(directory, record_input=record_input, policy=full_policy)

    def __repr__(self) -> str:
        return f"<RecordingWriter {self.directory} recorders={len(self._recorders)} " \
               f"{self._batcher!r}>"

    @property
    def batcher(self) -> Batcher[CastRecord]:
        """The underlying batcher (statistics, tests)."""
        return self._batcher

    def path_for(self, session_id: str) -> Path:
        """Where a session's recording is (or will be) written."""
        return cast_path(self.directory, session_id)

    def _after_write(self) -> None:
        files = self._files
        failures, files.failures = files.failures, []
        for session_id, exc in failures:
            log.error("recording.write.failed %s: %s", session_id, exc)
            recorder = self._recorders.get(session_id)
            if recorder is not None:
                recorder.fail(exc)
        finished, files.finished = files.finished, []
        for session_id in finished:
            self._recorders.pop(session_id, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Create the directory, then write until cancelled or :meth:`aclose`.

        Resource handling: on the way out the batcher flushes (bounded), then
        every recording still open is finished and closed, shielded and bounded.

        Raises:
            OSError: the directory cannot be created (before ``started``).
        """
        await trio.to_thread.run_sync(self._make_directory)
        try:
            await self._batcher.run(task_status=task_status)
        finally:
            with trio.move_on_after(self.close_timeout_s, shield=True):
                await trio.to_thread.run_sync(self._files.close_all,
                                              limiter=self._batcher.limiter)
            for recorder in self._recorders.values():
                if not recorder.is_closed and not recorder.is_failed:
                    log.info("recording.close %s at shutdown", recorder.session_id)
            self._recorders.clear()

    def _make_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def is_accepting(self) -> bool:
        """May a new session start (``fail-closed`` says no while the writer is behind)?"""
        return self._batcher.is_accepting()

    def check_accepting(self) -> None:
        """Raise :class:`~podterm.batcher.BufferFull` (503) unless :meth:`is_accepting`."""
        self._batcher.check_accepting()

    async def open_recorder(self, session_id: str, cols: int, rows: int, *,
                            clock: Callable[[], float] | None = None,
                            timestamp: float | None = None,
                            env: Mapping[str, str] | None = None, title: str | None = None,
                            command: str | None = None,
                            record_input: bool | None = None) -> Recorder:
        """Start a session's recording: the header is buffered when this returns.

        Args:
            session_id: names the file ``<id>.cast``.
            cols, rows: the starting terminal size.
            clock: the recorder's clock (default: the writer's).
            timestamp: wall-clock start, Unix seconds (default now).
            env: ``SHELL`` and ``TERM`` as the session sees them.
            title: e.g. ``"alice@prod/web-0"``.
            command: the command, for a non-interactive session.
            record_input: override the writer's ``record_input``.

        Raises:
            ValueError: the session id cannot name a file, or it is recording already.
            trio.ClosedResourceError: the writer has stopped.
        """
        path = self.path_for(session_id)
        if session_id in self._recorders:
            raise ValueError(f"session {session_id!r} is being recorded already")
        recorder = Recorder(session_id, cols, rows, clock or self._clock,
                            batcher=self._batcher,
                            record_input=self.record_input if record_input is None
                            else record_input, path=path)
        header = recorder.header(
            timestamp=int(time.time() if timestamp is None else timestamp),
            env=dict(env) if env else None, title=title, command=command)
        self._recorders[session_id] = recorder
        try:
            await self._batcher.submit(header)
        except BaseException:
            del self._recorders[session_id]
            raise
        return recorder

    async def open_continuation(self, session_id: str, cols: int, rows: int, *,
                                resumed_at: int, note: str = "",
                                env: Mapping[str, str] | None = None, title: str | None = None,
                                command: str | None = None) -> Recorder:
        """Record a session adopted from another gateway: a new part of its recording.

        The part is ``<id>.partN.cast`` with the lowest N >= 2 that names no
        file in the directory and no recording of this writer (the first
        part, ``<id>.cast``, may be here, in a shared directory, or on the
        dead gateway's own disk).  It starts with a header and a marker event
        at time 0: ``podterm: continued at output offset OFFSET`` (and
        ``note``); its output events hold the session's output from that
        offset on.

        Raises:
            ValueError: the session id cannot name a file, or no part number is free.
            trio.ClosedResourceError: the writer has stopped.
        """
        cast_path(self.directory, session_id)  # ValueError for an id that cannot name a file
        taken = set(self._recorders)

        def free_part() -> int:
            for n in range(2, 1_000_000):
                key = part_key(session_id, n)
                if key not in taken and not cast_path(self.directory, key).exists():
                    return n
            raise ValueError(f"session {session_id!r}: no free recording part number")

        part = await trio.to_thread.run_sync(free_part)
        recorder = await self.open_recorder(part_key(session_id, part), cols, rows, env=env,
                                            title=title, command=command)
        label = f"podterm: continued at output offset {resumed_at}"
        try:
            await recorder.marker(f"{label} ({note})" if note else label)
        except BaseException:
            with trio.CancelScope(shield=True):
                await recorder.aclose()
            raise
        return recorder

    async def wait_flushed(self) -> None:
        """Wait until every record submitted so far is written."""
        await self._batcher.wait_flushed()

    async def aclose(self) -> None:
        """Stop taking records, flush and close every file (bounded)."""
        await self._batcher.aclose()

    def statistics(self) -> RecordingWriterStatistics:
        files = self._files
        return RecordingWriterStatistics(
            batcher=self._batcher.statistics(), recorders=len(self._recorders),
            files_open=len(files.lru), files_created=files.created,
            files_finished=files.finished_total, failures=files.failures_total,
            discarded_records=files.discarded, bytes_written=files.bytes_written)
