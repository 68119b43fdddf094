"""Where audit events go: the :class:`AuditSink` interface and its implementations.

* :class:`JsonLinesFileSink` — JSON lines in a file, through a
  :class:`~podterm.batcher.Batcher`: fsync policy, size-based rotation.
* :class:`HttpSink` — POSTs batches of JSON lines to a collector, with bounded
  retries per attempt and the batcher's back-off between attempts.
* :class:`FanOutSink` — the same event to every child sink.
* :class:`MemorySink` — a bounded list, for tests and ``podterm doctor``.

Every sink is started with ``await nursery.start(sink.run)`` and shares one
contract (the :class:`AuditSink` Protocol):

* ``check_accepting()`` before admitting new work (a session): raises
  :class:`~podterm.batcher.BufferFull` (503) under the ``fail-closed`` policy
  when the writer is behind or failing;
* ``await emit(event)``: the event is buffered when this returns; waits for
  room when the buffer is full (backpressure, both policies);
* ``emit_nowait(event)``: buffered now, or :class:`BufferFull`, never blocks.

Events are serialized (and so fully checked) on the caller's side; the
writer thread only joins bytes and writes them.
"""

from __future__ import annotations

import enum
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from podterm.audit.events import AuditEvent
from podterm.batcher import (
    DEFAULT_CAPACITY,
    DEFAULT_CLOSE_TIMEOUT_S,
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_MAX_BATCH,
    Batcher,
    BatcherStatistics,
    BufferFull,
    FullPolicy,
)

__all__ = [
    "AuditSink",
    "FanOutSink",
    "FsyncPolicy",
    "HttpSink",
    "JsonLinesFileSink",
    "MemorySink",
    "SinkStatistics",
    "open_audit_sink",
]

log = logging.getLogger(__name__)

#: 100 MiB per file: ~200,000 events at ~500 B; a day of a busy gateway, and
#: small enough for `less` and for log shippers that re-read a rotated file.
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
#: Rotated files kept beside the live one (audit.log.1 ... audit.log.10).
DEFAULT_KEEP = 10
#: With fsync=interval: at most this much written-but-unsynced time (1 s, as
#: PostgreSQL's wal_writer_delay-style group commit and journald's SyncIntervalSec
#: are in the same order).
DEFAULT_FSYNC_INTERVAL_S = 1.0


class FsyncPolicy(enum.Enum):
    """When the file sink calls fsync (what survives a power loss, docs/audit.md)."""

    ALWAYS = "always"  # after every batch, before the next one starts
    INTERVAL = "interval"  # at most every fsync_interval_s, when something was written
    NEVER = "never"  # leave it to the kernel (still fsynced at rotation and close)


@dataclass(frozen=True, slots=True)
class SinkStatistics:
    """A frozen snapshot of one sink.

    Attributes:
        name: the sink's name (metric label).
        kind: ``"file"``, ``"http"``, ``"fanout"``, ``"memory"``.
        batcher: its batcher's snapshot (None for fan-out and memory).
        bytes_written: bytes written or posted successfully.
        rotations: file rotations.
        fsyncs: fsync calls.
        repaired_lines: partial last lines found at open and terminated.
        children: fan-out children's snapshots.
    """

    name: str
    kind: str
    batcher: BatcherStatistics | None = None
    bytes_written: int = 0
    rotations: int = 0
    fsyncs: int = 0
    repaired_lines: int = 0
    children: tuple[SinkStatistics, ...] = ()


@runtime_checkable
class AuditSink(Protocol):
    """The interface every audit sink meets (see the module docstring)."""

    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Write until cancelled or closed; flush (bounded) on the way out."""

    def is_accepting(self) -> bool:
        """May new work start (``fail-closed`` says no while behind or failing)?"""

    def check_accepting(self) -> None:
        """Raise :class:`BufferFull` (503) unless :meth:`is_accepting`."""

    def has_room(self) -> bool:
        """Would :meth:`emit_nowait` succeed now?"""

    def emit_nowait(self, event: AuditEvent) -> None:
        """Buffer the event now or raise :class:`BufferFull`; never blocks."""

    async def emit(self, event: AuditEvent) -> None:
        """Buffer the event, waiting for room while the buffer is full."""

    async def wait_flushed(self) -> None:
        """Wait until every event emitted before the call is written."""

    async def aclose(self) -> None:
        """Stop taking events, flush (bounded), stop."""

    def statistics(self) -> SinkStatistics:
        """A frozen snapshot."""


# ---------------------------------------------------------------------------
# The JSON-lines file
# ---------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _JsonLinesFile:
    """The file side of :class:`JsonLinesFileSink`; runs only in the writer thread.

    Every method is called under the sink's ``CapacityLimiter(1)``, so never
    two at once; no lock needed.
    """

    def __init__(self, path: Path, *, fsync: FsyncPolicy, max_bytes: int, keep: int,
                 mode: int) -> None:
        self.path = path
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.keep = keep
        self.mode = mode
        self.fd: int | None = None
        self.size = 0
        self.dirty = False
        self.bytes_written = 0
        self.rotations = 0
        self.fsyncs = 0
        self.repaired = 0

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, self.mode)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A crash cut the last line short.  Terminate it, so it stays one
                # bad line instead of corrupting the first line we append.
                log.warning("audit.file.repair %s: the last line was incomplete (a crash "
                            "during a write); terminated it", self.path)
                _write_all(fd, b"\n")
                size += 1
                self.repaired += 1
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        return fd

    def _sync(self, fd: int) -> None:
        os.fsync(fd)
        self.fsyncs += 1
        self.dirty = False

    def _rotate(self, fd: int) -> None:
        self._sync(fd)
        os.close(fd)
        self.fd = None
        base = str(self.path)
        oldest = Path(f"{base}.{self.keep}")
        if oldest.exists():
            oldest.unlink()
        for i in range(self.keep - 1, 0, -1):
            src = Path(f"{base}.{i}")
            if src.exists():
                src.rename(f"{base}.{i + 1}")
        self.path.rename(f"{base}.1")
        # The renames must survive a power loss too, or audit.log.1 may vanish.
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.rotations += 1

    def write(self, batch: list[bytes]) -> None:
        """Append the batch; on an error leave the file as it was and raise."""
        fd = self.fd if self.fd is not None else self._open()
        data = b"".join(batch)
        if self.max_bytes and self.size and self.size + len(data) > self.max_bytes:
            self._rotate(fd)
            fd = self._open()
        start = self.size
        try:
            _write_all(fd, data)
        except OSError:
            # Undo a partial append so the retried batch is not written twice.
            try:
                os.ftruncate(fd, start)
            except OSError:
                self.size = os.fstat(fd).st_size
            raise
        self.size = start + len(data)
        self.bytes_written += len(data)
        self.dirty = True
        if self.fsync is FsyncPolicy.ALWAYS:
            self._sync(fd)

    def sync(self) -> None:
        """fsync if anything was written since the last one (fsync=interval)."""
        if self.fd is not None and self.dirty:
            self._sync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if self.dirty:
                    self._sync(fd)
            finally:
                os.close(fd)


class _BatchedSink:
    """What the file and HTTP sinks share: a batcher of serialized lines."""

    name: str
    _batcher: Batcher[bytes]

    def is_accepting(self) -> bool:
        return self._batcher.is_accepting()

    def check_accepting(self) -> None:
        self._batcher.check_accepting()

    def has_room(self) -> bool:
        return self._batcher.has_room()

    def emit_nowait(self, event: AuditEvent) -> None:
        self._batcher.submit_nowait(event.to_json_line())

    async def emit(self, event: AuditEvent) -> None:
        await self._batcher.submit(event.to_json_line())

    async def wait_flushed(self) -> None:
        await self._batcher.wait_flushed()

    async def aclose(self) -> None:
        await self._batcher.aclose()


class JsonLinesFileSink(_BatchedSink):
    """Audit events as JSON lines in ``path``, rotated by size.

    Args:
        path: the live file (created 0600 if missing; appended to otherwise).
        fsync: :class:`FsyncPolicy` or its string.
        fsync_interval_s: with ``interval``, the most time between fsyncs.
        max_bytes: rotate before a batch would grow the file past this
            (0 = never rotate).  A single batch larger than it still goes
            into one file: files end on batch boundaries.
        keep: rotated files kept (``path.1`` newest ... ``path.keep`` oldest).
        capacity, policy, high_water, max_batch, flush_interval_s,
        close_timeout_s: the :class:`~podterm.batcher.Batcher`'s.
        name: for logs and metrics.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 fsync: FsyncPolicy | str = FsyncPolicy.ALWAYS,
                 fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
                 max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP,
                 capacity: int = DEFAULT_CAPACITY, policy: FullPolicy | str = FullPolicy.BLOCK,
                 high_water: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S, name: str = "audit",
                 after_write: Callable[[], None] | None = None) -> None:
        if max_bytes < 0 or keep < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0 and keep={keep} >= 1")
        if fsync_interval_s <= 0:
            raise ValueError(f"fsync_interval_s={fsync_interval_s} must be positive")
        self.name = name
        self.path = Path(path)
        self.fsync = FsyncPolicy(fsync)
        self.fsync_interval_s = fsync_interval_s
        self.close_timeout_s = close_timeout_s
        self._file = _JsonLinesFile(self.path, fsync=self.fsync, max_bytes=max_bytes,
                                    keep=keep, mode=0o600)
        self._batcher = Batcher(self._file.write, name=name, capacity=capacity, policy=policy,
                                high_water=high_water, max_batch=max_batch,
                                flush_interval_s=flush_interval_s,
                                close_timeout_s=close_timeout_s, after_write=after_write)

    def __repr__(self) -> str:
        return f"<JsonLinesFileSink {self.path} fsync={self.fsync.value} {self._batcher!r}>"

    @property
    def batcher(self) -> Batcher[bytes]:
        """The underlying batcher (statistics, tests)."""
        return self._batcher

    async def _fsync_loop(self) -> None:
        limiter = self._batcher.limiter
        while True:
            await trio.sleep(self.fsync_interval_s)
            try:
                # Same limiter as the writes: the fd is never used by two threads.
                await trio.to_thread.run_sync(self._file.sync, limiter=limiter)
            except OSError as exc:
                log.error("%s.fsync.failed %s: %s", self.name, self.path, exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Write until cancelled or :meth:`aclose`; then flush, fsync and close the file.

        Resource handling: the file is closed (after an fsync if anything is
        unsynced) under ``move_on_after(close_timeout_s, shield=True)``.
        """
        try:
            async with trio.open_nursery() as nursery:
                if self.fsync is FsyncPolicy.INTERVAL:
                    nursery.start_soon(self._fsync_loop)
                try:
                    await self._batcher.run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(self.close_timeout_s, shield=True):
                try:
                    await trio.to_thread.run_sync(self._file.close,
                                                  limiter=self._batcher.limiter)
                except OSError as exc:
                    log.error("%s.close.failed %s: %s", self.name, self.path, exc)

    def statistics(self) -> SinkStatistics:
        f = self._file
        return SinkStatistics(name=self.name, kind="file", batcher=self._batcher.statistics(),
                              bytes_written=f.bytes_written, rotations=f.rotations,
                              fsyncs=f.fsyncs, repaired_lines=f.repaired)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class HttpSink(_BatchedSink):
    """POST each batch of JSON lines (``application/x-ndjson``) to ``url``.

    Each batch is tried ``attempts`` times in the writer thread (0.2 s, 0.4 s,
    ... apart); if all fail, the batcher keeps the batch and retries it after
    its back-off, so a down collector means backpressure or refusal by the
    full policy, never lost events.  Any 2xx answer is success.

    Args:
        url: ``http://`` or ``https://`` collector endpoint.
        headers: extra request headers (e.g. an Authorization header; never logged).
        timeout_s: per request.
        attempts: tries per batch before the batcher's back-off.
        ca_file: CA bundle for https (default: the system's).
        capacity, policy, high_water, max_batch, flush_interval_s,
        close_timeout_s: the batcher's.
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 timeout_s: float = 5.0, attempts: int = 3, ca_file: str | None = None,
                 capacity: int = DEFAULT_CAPACITY, policy: FullPolicy | str = FullPolicy.BLOCK,
                 high_water: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 flush_interval_s: float = 0.2,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
                 name: str = "audit-http") -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"audit HTTP sink url {url!r}: expected http:// or https://")
        if attempts < 1 or timeout_s <= 0:
            raise ValueError("attempts must be >= 1 and timeout_s > 0")
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        self._headers = {"Content-Type": "application/x-ndjson", **(headers or {})}
        self._context = ssl.create_default_context(cafile=ca_file) \
            if url.startswith("https://") else None
        self.bytes_posted = 0
        self.posts = 0
        self._batcher = Batcher(self._post, name=name, capacity=capacity, policy=policy,
                                high_water=high_water, max_batch=max_batch,
                                flush_interval_s=flush_interval_s,
                                close_timeout_s=close_timeout_s)

    def __repr__(self) -> str:
        return f"<HttpSink {self.url} {self._batcher!r}>"

    def _post(self, batch: list[bytes]) -> None:
        body = b"".join(batch)
        error: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(0.2 * 2 ** (attempt - 1))  # a worker thread: sleeping is fine
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers=self._headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s,
                                            context=self._context) as response:
                    response.read()
                self.posts += 1
                self.bytes_posted += len(body)
                return
            except urllib.error.HTTPError as exc:  # a non-2xx answer
                exc.close()
                error = OSError(f"POST {self.url}: HTTP {exc.code} {exc.reason}")
            except (OSError, ValueError) as exc:  # refused, reset, timeout, TLS
                error = OSError(f"POST {self.url}: {exc}")
        assert error is not None
        raise error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Post until cancelled or :meth:`aclose`; then flush (bounded)."""
        await self._batcher.run(task_status=task_status)

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(name=self.name, kind="http", batcher=self._batcher.statistics(),
                              bytes_written=self.bytes_posted)


# ---------------------------------------------------------------------------
# Fan-out and memory
# ---------------------------------------------------------------------------


class FanOutSink:
    """Every event to every child, in order.  No children = audit off.

    ``emit_nowait`` is all-or-nothing: it checks every child has room before
    buffering into any.  ``emit`` waits on each child in turn.
    """

    def __init__(self, sinks: Iterable[AuditSink], *, name: str = "audit-fanout") -> None:
        self.name = name
        self.sinks: tuple[AuditSink, ...] = tuple(sinks)

    def __repr__(self) -> str:
        return f"<FanOutSink {', '.join(s.name for s in self.sinks) or 'no sinks'}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run every child; return when all have stopped."""
        async with trio.open_nursery() as nursery:
            for sink in self.sinks:
                await nursery.start(sink.run)
            task_status.started()

    def is_accepting(self) -> bool:
        return all(s.is_accepting() for s in self.sinks)

    def check_accepting(self) -> None:
        for sink in self.sinks:
            sink.check_accepting()

    def has_room(self) -> bool:
        return all(s.has_room() for s in self.sinks)

    def emit_nowait(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            if not sink.has_room():
                sink.emit_nowait(event)  # raises BufferFull with that sink's reason
        for sink in self.sinks:
            sink.emit_nowait(event)

    async def emit(self, event: AuditEvent) -> None:
        for sink in self.sinks:
            await sink.emit(event)
        if not self.sinks:
            await trio.lowlevel.checkpoint()

    async def wait_flushed(self) -> None:
        for sink in self.sinks:
            await sink.wait_flushed()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        for sink in self.sinks:
            await sink.aclose()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(name=self.name, kind="fanout",
                              children=tuple(s.statistics() for s in self.sinks))


class MemorySink:
    """Keeps events in a list (bounded); for tests and diagnostics.

    Args:
        max_events: beyond this, ``emit_nowait`` raises :class:`BufferFull`
            and ``emit`` waits until :meth:`clear`.
    """

    def __init__(self, *, max_events: int = 100_000, name: str = "audit-memory") -> None:
        self.name = name
        self.max_events = max_events
        self.events: list[AuditEvent] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemorySink {len(self.events)} events>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Nothing to write; returns when cancelled or closed."""
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._closed = True

    def is_accepting(self) -> bool:
        return not self._closed

    def check_accepting(self) -> None:
        if self._closed:
            raise BufferFull(f"the {self.name} sink is closed")

    def has_room(self) -> bool:
        return not self._closed and len(self.events) < self.max_events

    def emit_nowait(self, event: AuditEvent) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"the {self.name} sink is closed")
        if len(self.events) >= self.max_events:
            raise BufferFull(f"the {self.name} sink holds its maximum of "
                             f"{self.max_events} events")
        self.events.append(event)
        self._lot.unpark_all()

    async def emit(self, event: AuditEvent) -> None:
        while not self._closed and len(self.events) >= self.max_events:
            await self._room.park()
        self.emit_nowait(event)
        await trio.lowlevel.checkpoint()

    def clear(self) -> None:
        """Forget the events (and let waiting emitters in)."""
        self.events.clear()
        self._room.unpark_all()

    def of_type(self, type_: str) -> list[AuditEvent]:
        """The events of one type, in order."""
        return [e for e in self.events if e.type == type_]

    async def wait_for(self, type_: str, count: int = 1) -> list[AuditEvent]:
        """Wait until ``count`` events of ``type_`` arrived; returns them (callers bound it)."""
        while len(found := self.of_type(type_)) < count:
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        return found

    async def wait_flushed(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._closed = True
        self._room.unpark_all()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(name=self.name, kind="memory")


def open_audit_sink(log_file: str | None, *, full_policy: str = "block",
                    buffer_records: int = DEFAULT_CAPACITY,
                    fsync: FsyncPolicy | str = FsyncPolicy.ALWAYS,
                    max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP,
                    http_url: str | None = None,
                    http_headers: Mapping[str, str] | None = None) -> AuditSink:
    """The gateway's sink from its config (``config.AuditConfig`` plus optional extras).

    ``open_audit_sink(cfg.log_file, full_policy=cfg.full_policy,
    buffer_records=cfg.buffer_records)``: a file sink, plus an HTTP sink when
    ``http_url`` is given, behind a fan-out; no file and no URL = a fan-out of
    nothing (events are still checked, then discarded: audit is off).
    """
    sinks: list[AuditSink] = []
    if log_file is not None:
        sinks.append(JsonLinesFileSink(log_file, fsync=fsync, max_bytes=max_bytes, keep=keep,
                                       capacity=buffer_records, policy=full_policy))
    if http_url is not None:
        sinks.append(HttpSink(http_url, headers=http_headers, capacity=buffer_records,
                              policy=full_policy))
    if len(sinks) == 1:
        return sinks[0]
    return FanOutSink(sinks)
