"""A bounded ring buffer of records drained in batches by one writer task, off the event loop.

Audit events and session recordings both go through a :class:`Batcher`:
producers put records into a bounded buffer (never a blocking call on the
event loop), and one writer task takes everything available, up to
``max_batch``, and hands that batch to a *blocking* write function run by
``trio.to_thread.run_sync`` under a per-purpose ``trio.CapacityLimiter(1)``.
File writes, fsync and HTTP posts therefore never run on the event loop, and
one purpose never runs two writes at once (the file stays in order).

Buffer and weights
------------------
The buffer is bounded by *weight*: every record weighs 1 unless the caller
passes a ``weight`` function (recordings weigh their bytes, so the bound is
memory, not a count).  A record stays in the buffer until the batch that
holds it has been written: the in-flight batch is part of the buffered
weight.  That is what makes the crash bound exact:

    lost at a process crash  <=  buffered records  <=  capacity

(at most ``max_batch`` of them in the write in flight, which may leave one
partial line behind, the rest still waiting).  ``docs/audit.md`` states it
and ``tests/integration/test_audit_log.py`` kills a writer to check it.

A record heavier than the whole capacity is admitted only into an empty
buffer, so it waits its turn instead of never fitting.

Full policy
-----------
Nothing is ever dropped silently (STYLE.md §7).  When the buffer is full:

* :meth:`Batcher.submit_nowait` raises :class:`BufferFull` (counted as
  ``refused``); the caller decides (refuse the request, close the session);
* :meth:`Batcher.submit` waits for room (counted as ``blocked_waits``):
  backpressure, under either policy.

The policy decides *admission of new work*, through :meth:`is_accepting` /
:meth:`check_accepting`, which the gateway asks before creating a session:

* ``block``: always accepting; a lagging writer slows everyone down;
* ``fail-closed``: not accepting while the buffer is at or above the
  high-water mark, or while the last write failed; new sessions are refused
  with 503 and a reason instead of running unaudited.  The room between the
  high-water mark and the capacity is headroom for the events of sessions
  already running (detach, end), so those rarely have to wait.

Write failures
--------------
A write function that raises leaves its batch in the buffer: the batch is
retried after a back-off (``retry_initial_s`` doubling to ``retry_max_s``),
``write_failures`` counts every failed attempt, and the batcher reports
``failing`` until a write succeeds.  A write function must therefore be
idempotent for a batch it failed (the JSON-lines file sink truncates back to
where the batch began).

Shutdown
--------
:meth:`Batcher.run` is started with ``await nursery.start(batcher.run)``.
When it is cancelled, or after :meth:`Batcher.aclose`, it writes what is
buffered under ``move_on_after(close_timeout_s, shield=True)``: a shield
always has a bound.  Records it could not write by then are counted as
``lost`` and logged at ERROR with their number: loud, never silent.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from podterm.errors import CloseCode, PodtermError

__all__ = [
    "Batcher",
    "BatcherStatistics",
    "BufferFull",
    "FullPolicy",
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_FLUSH_INTERVAL_S",
    "DEFAULT_CLOSE_TIMEOUT_S",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: 16,384 records: config.AuditConfig.buffer_records' default (a mass reconnect of a
#: full worker, 9,000 sessions x auth + attach, fits with the writer a second behind).
DEFAULT_CAPACITY = 16384
#: 1,024 records per write: ~500 KiB of audit JSON, one write() and one fsync; large
#: enough that fsync=always keeps up with thousands of events per second, small
#: enough that one batch (the part of the loss bound that can be half-written) stays small.
DEFAULT_MAX_BATCH = 1024
#: 0 s: write as soon as anything is buffered.  Batches still form by themselves
#: under load (group commit): everything that arrives while a write is in flight
#: goes into the next one.  A positive interval trades latency for fewer writes.
DEFAULT_FLUSH_INTERVAL_S = 0.0
#: 5 s: the part of the drain budget (sessions.drain_timeout_s leaves 5 s of the
#: kubelet's 30 s) reserved for flushing audit and recordings before SIGKILL.
DEFAULT_CLOSE_TIMEOUT_S = 5.0
#: Retry back-off after a failed write: 0.1 s doubling to 5 s.  A full disk or a
#: down HTTP collector is not fixed in milliseconds; retrying faster only spins.
DEFAULT_RETRY_INITIAL_S = 0.1
DEFAULT_RETRY_MAX_S = 5.0


class FullPolicy(enum.Enum):
    """What a full buffer means for new work (config ``audit.full-policy``)."""

    #: Backpressure: producers wait for room; new sessions are admitted and wait too.
    BLOCK = "block"
    #: Refuse new sessions while the buffer is above its high-water mark or failing.
    FAIL_CLOSED = "fail-closed"


class BufferFull(PodtermError):
    """A batcher cannot take this record now, or refuses new work (503 / close 1013).

    Raised by :meth:`Batcher.submit_nowait` when the buffer is full and by
    :meth:`Batcher.check_accepting` under ``fail-closed``.  The message says
    which buffer, how full, and why, so a 503 body tells the operator what to fix.
    """

    close_code = CloseCode.TRY_AGAIN_LATER
    http_status = 503
    outcome = "rejected"
    reason_name = "ServiceUnavailable"


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A frozen snapshot of one batcher (``/metrics`` renders these).

    Attributes:
        name: the purpose (``"audit"``, ``"recording"``, ...); metric label.
        policy: ``"block"`` or ``"fail-closed"``.
        capacity: the buffer bound, in weight units.
        high_water: above this ``fail-closed`` refuses new work.
        buffered_records: records not yet written (the in-flight batch included).
        buffered_weight: their weight.
        in_flight: records in the write running now (0 when idle).
        submitted: records ever accepted.
        written: records written by a successful batch.
        batches: successful writes.
        blocked_waits: ``submit`` calls that had to wait for room.
        waiting_producers: ``submit`` calls waiting now.
        refused: ``submit_nowait`` calls and ``check_accepting`` checks refused.
        write_failures: failed write attempts (each retried).
        lost: records still buffered when the final flush ran out of time or
            kept failing (logged at ERROR); 0 unless shutdown went wrong.
        failing: the last write attempt failed.
        accepting: what :meth:`Batcher.is_accepting` says now.
        closed: the writer has stopped.
        last_error: the last write error's text, or None.
    """

    name: str
    policy: str
    capacity: int
    high_water: int
    buffered_records: int
    buffered_weight: int
    in_flight: int
    submitted: int
    written: int
    batches: int
    blocked_waits: int
    waiting_producers: int
    refused: int
    write_failures: int
    lost: int
    failing: bool
    accepting: bool
    closed: bool
    last_error: str | None


def _one(_: object) -> int:
    return 1


class Batcher(Generic[T]):
    """A bounded buffer of records and the one task that writes them in batches.

    Args:
        write: blocking function called in a worker thread with a list of
            records, oldest first; raises to report failure (the batch is
            retried).  Never called twice at once.
        name: the purpose, for logs, errors and metrics.
        capacity: the buffer bound in weight units (records by default).
        policy: :class:`FullPolicy` or its config string.
        high_water: ``fail-closed`` refuses new work at or above this weight;
            default three quarters of ``capacity`` (the last quarter is
            headroom for sessions already running).
        max_batch: most weight per write (at least one record is always taken).
        flush_interval_s: after the first record of a batch arrives, wait up to
            this long for ``max_batch`` to fill before writing; 0 = write at once.
        weight: a record's weight (e.g. its byte length); default 1 each.
        close_timeout_s: bound on the final flush at shutdown.
        retry_initial_s, retry_max_s: back-off between failed write attempts.
        after_write: called on the event loop after every write attempt
            (success or failure); how the recording writer dispatches per-file
            failures to their sessions.
        limiter: the thread limiter; default a fresh ``CapacityLimiter(1)``.
            Pass one to share it with other blocking calls on the same resource
            (the audit sink's fsync timer does).

    Raises:
        ValueError: a bound is not positive, or high_water exceeds capacity.
    """

    __slots__ = (
        "name", "policy", "capacity", "high_water", "max_batch", "flush_interval_s",
        "close_timeout_s", "retry_initial_s", "retry_max_s", "limiter",
        "_write", "_weight", "_after_write", "_buf", "_weight_total",
        "_data_lot", "_space_lot", "_flush_lot", "_stopped", "_want",
        "_running", "_closing", "_closed", "_failing", "_last_error", "_in_flight",
        "_submitted", "_written", "_batches", "_blocked_waits", "_waiting", "_refused",
        "_write_failures", "_lost",
    )

    def __init__(self, write: Callable[[list[T]], None], *, name: str,
                 capacity: int = DEFAULT_CAPACITY, policy: FullPolicy | str = FullPolicy.BLOCK,
                 high_water: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
                 weight: Callable[[T], int] | None = None,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
                 retry_initial_s: float = DEFAULT_RETRY_INITIAL_S,
                 retry_max_s: float = DEFAULT_RETRY_MAX_S,
                 after_write: Callable[[], None] | None = None,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        if capacity < 1 or max_batch < 1:
            raise ValueError(f"{name}: capacity={capacity} and max_batch={max_batch} "
                             "must be at least 1")
        if high_water is None:
            high_water = max(1, capacity * 3 // 4)
        if not 1 <= high_water <= capacity:
            raise ValueError(f"{name}: high_water={high_water} must be in 1..capacity "
                             f"({capacity})")
        if not (math.isfinite(flush_interval_s) and flush_interval_s >= 0):
            raise ValueError(f"{name}: flush_interval_s={flush_interval_s} must be >= 0")
        if not (close_timeout_s > 0 and 0 < retry_initial_s <= retry_max_s):
            raise ValueError(f"{name}: close_timeout_s and retry back-off must be positive")
        self.name = name
        self.policy = FullPolicy(policy)
        self.capacity = capacity
        self.high_water = high_water
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.close_timeout_s = close_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(1)
        self._write = write
        self._weight: Callable[[T], int] = weight or _one
        self._after_write = after_write
        # (record, weight) pairs, oldest first; a record leaves only once written.
        self._buf: deque[tuple[T, int]] = deque()
        self._weight_total = 0
        self._data_lot = trio.lowlevel.ParkingLot()  # the writer waits for records
        self._space_lot = trio.lowlevel.ParkingLot()  # producers wait for room
        self._flush_lot = trio.lowlevel.ParkingLot()  # wait_flushed() callers
        self._stopped = trio.Event()
        # Buffered weight that wakes the writer: 1 = "anything", max_batch while
        # a flush interval is coalescing.  Producers unpark it only on crossing,
        # so a burst does not reschedule the writer once per record.
        self._want = 1
        self._running = False
        self._closing = False
        self._closed = False
        self._failing = False
        self._last_error: str | None = None
        self._in_flight = 0
        self._submitted = 0
        self._written = 0
        self._batches = 0
        self._blocked_waits = 0
        self._waiting = 0
        self._refused = 0
        self._write_failures = 0
        self._lost = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "failing" if self._failing else "ok"
        return (f"<Batcher {self.name} {self.policy.value} {state} "
                f"buffered={self._weight_total}/{self.capacity} written={self._written} "
                f"batches={self._batches}>")

    # ------------------------------------------------------------- producers

    def _fits(self, weight: int) -> bool:
        return not self._buf or self._weight_total + weight <= self.capacity

    def _append(self, record: T, weight: int) -> None:
        self._buf.append((record, weight))
        self._weight_total += weight
        self._submitted += 1
        # Wake the writer only when the buffer crosses what it waits for.
        if self._weight_total >= self._want and self._weight_total - weight < self._want:
            self._data_lot.unpark()

    def has_room(self, weight: int = 1) -> bool:
        """True when :meth:`submit_nowait` of a record this heavy would succeed now."""
        return (not (self._closing or self._closed) and self._waiting == 0
                and self._fits(weight))

    def submit_nowait(self, record: T) -> None:
        """Buffer ``record`` now or refuse it; never blocks.

        Raises:
            BufferFull: the buffer has no room (or producers are already
                waiting for room: they go first).  Counted as ``refused``.
            trio.ClosedResourceError: the batcher is closing or closed.
        """
        if self._closing or self._closed:
            raise trio.ClosedResourceError(f"the {self.name} writer is closed")
        weight = self._weight(record)
        if self._waiting or not self._fits(weight):
            self._refused += 1
            raise BufferFull(f"the {self.name} buffer is full ({self._weight_total}/"
                             f"{self.capacity}){self._why()}")
        self._append(record, weight)

    async def submit(self, record: T) -> None:
        """Buffer ``record``, waiting for room while the buffer is full (backpressure).

        Either the record is buffered and this returns, or it raises and the
        record was not buffered: a cancelled ``submit`` never half-happened.

        Raises:
            trio.ClosedResourceError: the batcher closed (before or while waiting).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing or self._closed:
            raise trio.ClosedResourceError(f"the {self.name} writer is closed")
        weight = self._weight(record)
        if self._waiting or not self._fits(weight):
            self._blocked_waits += 1
            self._waiting += 1
            try:
                # FIFO among waiters: a newcomer queues behind them (the check
                # above), and each waiter that leaves passes the turn on.
                while True:
                    await self._space_lot.park()
                    if self._closing or self._closed:
                        raise trio.ClosedResourceError(f"the {self.name} writer is closed")
                    if self._fits(weight):
                        self._append(record, weight)
                        return
            finally:
                self._waiting -= 1
                if self._waiting and self._fits(1) and not self._closed:
                    self._space_lot.unpark()
        self._append(record, weight)
        await trio.lowlevel.cancel_shielded_checkpoint()

    # ------------------------------------------------------------- admission

    def _why(self) -> str:
        if self._failing:
            return f"; the writer is failing: {self._last_error}"
        if self._in_flight:
            return "; the writer is behind (a write is in progress)"
        return ""

    def is_accepting(self) -> bool:
        """May new work (a new session) start now?  See "Full policy" above."""
        if self._closing or self._closed:
            return False
        if self.policy is FullPolicy.BLOCK:
            return True
        return not self._failing and self._weight_total < self.high_water

    def check_accepting(self) -> None:
        """Raise :class:`BufferFull` (503, counted as ``refused``) unless :meth:`is_accepting`."""
        if self.is_accepting():
            return
        self._refused += 1
        if self._closing or self._closed:
            raise BufferFull(f"the {self.name} writer is shut down; refusing new sessions")
        raise BufferFull(
            f"the {self.name} writer cannot keep up ({self._weight_total}/{self.capacity} "
            f"buffered, high-water mark {self.high_water}){self._why()}; refusing new "
            f"sessions rather than running them without their {self.name} records "
            f"(full policy {self.policy.value})")

    # ---------------------------------------------------------------- writer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The writer task: write batches until cancelled or :meth:`aclose`, then flush.

        Resource handling: on cancellation, what is buffered is written under
        ``move_on_after(close_timeout_s, shield=True)``; afterwards the batcher
        is closed and producers still waiting get ``ClosedResourceError``.

        Raises:
            RuntimeError: run twice.
        """
        if self._running or self._closed:
            raise RuntimeError(f"the {self.name} batcher runs once")
        self._running = True
        task_status.started()
        delay = self.retry_initial_s
        try:
            while self._buf or not self._closing:
                if not self._buf:
                    self._want = 1
                    await self._data_lot.park()
                    continue
                if (self.flush_interval_s > 0 and not self._closing
                        and self._weight_total < self.max_batch):
                    # Coalesce: give the batch up to flush_interval_s to fill.
                    self._want = self.max_batch
                    with trio.move_on_after(self.flush_interval_s):
                        while self._weight_total < self.max_batch and not self._closing:
                            await self._data_lot.park()
                    self._want = 1
                if await self._write_batch():
                    delay = self.retry_initial_s
                else:
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.retry_max_s)
        finally:
            self._closing = True
            with trio.move_on_after(self.close_timeout_s, shield=True):
                while self._buf:
                    if not await self._write_batch():
                        await trio.sleep(delay)
                        delay = min(delay * 2, self.retry_max_s)
            if self._buf:
                self._lost += len(self._buf)
                log.error("%s.flush.failed: %d records not written at shutdown "
                          "(buffered %d, last error: %s)", self.name, len(self._buf),
                          self._weight_total, self._last_error)
            self._closed = True
            self._stopped.set()
            self._space_lot.unpark_all()
            self._flush_lot.unpark_all()

    async def _write_batch(self) -> bool:
        """Write the oldest records, up to ``max_batch``; True on success."""
        batch: list[T] = []
        total = 0
        for record, weight in self._buf:
            if batch and total + weight > self.max_batch:
                break
            batch.append(record)
            total += weight
        self._in_flight = len(batch)
        try:
            # abandon_on_cancel=False (the default): a write, once started, finishes
            # and is accounted for; cancellation lands at our next checkpoint.
            await trio.to_thread.run_sync(self._write, batch, limiter=self.limiter)
        except Exception as exc:  # any failure of the write function is retried
            self._write_failures += 1
            first = not self._failing
            self._failing = True
            self._last_error = f"{type(exc).__name__}: {exc}"
            if first:
                log.error("%s.write.failed: %s (%d records buffered; retrying)",
                          self.name, self._last_error, len(self._buf))
            else:
                log.debug("%s.write.failed again: %s", self.name, self._last_error)
            return False
        else:
            # Remove exactly what was written; the buffer only grew at its end meanwhile.
            for _ in range(len(batch)):
                self._buf.popleft()
            self._weight_total -= total
            self._written += len(batch)
            self._batches += 1
            if self._failing:
                log.warning("%s.write.complete again after %d failed attempts",
                            self.name, self._write_failures)
            self._failing = False
            self._space_lot.unpark()  # the first waiter; each passes the turn on
            self._flush_lot.unpark_all()
            return True
        finally:
            self._in_flight = 0
            if self._after_write is not None:
                self._after_write()

    async def wait_flushed(self) -> None:
        """Wait until every record submitted before this call has been written.

        Raises:
            trio.ClosedResourceError: the writer stopped with records unwritten.
        """
        target = self._submitted
        while self._written + self._lost < target:
            if self._closed:
                break
            await self._flush_lot.park()
        if self._written < target:
            raise trio.ClosedResourceError(
                f"the {self.name} writer stopped with {target - self._written} records "
                "unwritten")
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Stop taking records, write what is buffered (bounded), wait for the writer to stop.

        Safe to call more than once, and when :meth:`run` never started (the
        batcher is then simply closed; anything buffered counts as lost).
        """
        if not self._running:
            if not self._closed:
                self._closing = self._closed = True
                self._lost += len(self._buf)
                self._stopped.set()
                self._space_lot.unpark_all()
                self._flush_lot.unpark_all()
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        self._data_lot.unpark_all()
        self._space_lot.unpark_all()
        await self._stopped.wait()

    @property
    def is_closed(self) -> bool:
        """True once the writer has stopped."""
        return self._closed

    def statistics(self) -> BatcherStatistics:
        """A frozen snapshot of the counters and the buffer."""
        return BatcherStatistics(
            name=self.name, policy=self.policy.value, capacity=self.capacity,
            high_water=self.high_water, buffered_records=len(self._buf),
            buffered_weight=self._weight_total, in_flight=self._in_flight,
            submitted=self._submitted, written=self._written, batches=self._batches,
            blocked_waits=self._blocked_waits, waiting_producers=self._waiting,
            refused=self._refused, write_failures=self._write_failures, lost=self._lost,
            failing=self._failing, accepting=self.is_accepting(), closed=self._closed,
            last_error=self._last_error)
