"""The registry's sessions, mirrored into the session store (best effort once running).

The registry is the in-process truth (``GET /api/v1/sessions`` serves from
it); the store is what other peers, and this gateway after a restart, can
see.  :class:`StoreMirror` keeps the store in step with it:

* **Create.**  The record is written *before* the session starts: state
  ``running``, ``resume_token_hash`` = SHA-256 of the token, ``holder`` =
  this gateway.  If the store cannot take it (:class:`StoreUnavailable`) the
  upstream process is closed again and the create is refused: ``503
  unavailable`` (WebSocket close 1013) "session store unavailable; retry".  A
  session no peer could find is never started.  That is the only place the
  store can fail a user: issue 5, "new sessions are refused with a clear
  error only while Redis is down".
* **Running sessions never fail on the store.**  A change marks the session
  *dirty* (one flag per session, so memory is bounded by the number of
  sessions, never by the number of changes) and one flusher task writes:

  - offsets (``update_offsets``) at most once per ``flush_interval_s`` (1 s)
    per session: resume metadata, not data, so a second of lag costs nothing;
  - the whole record (``put_session``) at once when the state (running,
    detached, exited) or the resume token (rotated by every ``rw`` attach)
    changed: a resume through another peer needs the current token hash;
  - the context (``save_context``) when the cwd the upstream reports
    (``capture_context``: ``/proc`` for local shells, OSC 7 for kube) changed.

  A write the store refuses with :class:`StoreUnavailable` leaves the session
  dirty; the failure is counted and logged once per outage, and the flusher
  waits for the store to come back, then writes what changed meanwhile.
* **Closed.**  The record is rewritten with state ``closed``, a tombstone
  (peers answer ``410 gone``); it is deleted once ``max_tombstones`` newer
  tombstones of this gateway exist.
* **Ownership.**  After the first write, whole-record writes are
  compare-and-set on the version this mirror last wrote.  A record another
  gateway took over (an agent session adopted there after its agent moved)
  fails the CAS; the record then names that gateway as ``holder``, and the
  mirror stops writing the session and calls :attr:`StoreMirror.on_moved`
  (the gateway hands the agent's streams over).  A session that ends
  ``moved`` leaves no tombstone: its record is the new holder's.
* **Adopted.**  :meth:`StoreMirror.adopt` mirrors a session this gateway took
  over (its record was claimed by CAS already) from the claimed version on.
* **Data lost.**  Redis that comes back without its data delivers RESYNC
  ``data_lost``: every live session is re-put.  An ``update_offsets`` that
  finds no record re-puts the session too, so a missed event heals as well.
* **A previous run** (:meth:`StoreMirror.close_stale`, SQLite): records this
  gateway holds that are not closed were written by an earlier run of it.
  Their local shells and kube exec streams died with that process, so they
  are marked ``closed``.  Agent sessions are left as they are: their shells
  live in the agent, which adopts them back here (or to another gateway)
  when it reconnects.

The memory store is not mirrored into: nothing outside this process can
read it, and the registry already is that process's truth.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import NoReturn

import trio

from podterm.errors import Unavailable
from podterm.metrics import MetricFamily, counter, gauge, labelled
from podterm.session.session import MOVED, Session, SessionState
from podterm.store.base import (
    EventKind,
    SessionRecord,
    SessionStore,
    StoreError,
    StoreUnavailable,
)

__all__ = ["MirrorStatistics", "StoreMirror", "UNAVAILABLE_MESSAGE", "store_metric_families"]

log = logging.getLogger(__name__)

#: What a refused create says (HTTP 503 body, WebSocket close 1013 reason, kubectl Status).
UNAVAILABLE_MESSAGE = "session store unavailable; retry"

#: Tombstones (closed records) of this gateway kept in the store: the same bound
#: as the registry's in-memory tombstones (``registry.MAX_TOMBSTONES``).
MAX_TOMBSTONES = 10_000

#: Writes in flight at once during a flush.  16: Redis pipelines concurrent
#: calls on its one connection, so 16 in flight hide the round trip (10,000
#: dirty sessions flush in ~10,000/16 round trips) while one flush still
#: holds a bounded number of tasks; SQLite serialises them on its one thread.
FLUSH_CONCURRENCY = 16

#: Compare-and-set attempts on one write before giving up until the next change:
#: a version bumped by ourselves or a peer of the same holder is re-read and retried.
_CAS_ATTEMPTS = 3


class _Moved(Exception):
    """The record names another holder: the session is that gateway's now."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@dataclass(frozen=True, slots=True)
class MirrorStatistics:
    """A frozen snapshot of the mirror.

    Attributes:
        tracked: live sessions mirrored.
        pending: sessions with changes not yet written.
        writes: store writes that succeeded (puts, offsets, contexts, deletes).
        failures: writes refused because the store was unavailable (retried).
        errors: writes that failed otherwise (logged, retried on the next change).
        refused_creates: creates refused because the store was unavailable.
        resyncs: full re-puts after the store lost its data.
        stale_closed: records of a previous run marked closed at start.
        moved: sessions found taken over by another gateway (no longer written).
    """

    tracked: int
    pending: int
    writes: int
    failures: int
    errors: int
    refused_creates: int
    resyncs: int
    stale_closed: int
    moved: int = 0


class _Entry:
    """What was last written for one session, and whether it changed since."""

    __slots__ = ("session", "created_at", "state", "token", "offsets", "cwd", "dirty", "full",
                 "closing", "version")

    def __init__(self, session: Session, created_at: float, version: int = 0) -> None:
        self.session = session
        self.created_at = created_at
        self.version = version  # the record version we wrote last (0: none yet)
        self.state = ""  # last state written ("" = none yet)
        self.token = ""  # the resume token whose hash was last written
        self.offsets = (-1, -1, -1)
        self.cwd: str | None = None
        self.dirty = False  # queued for an offsets/context write
        self.full = False  # queued for a whole-record write
        self.closing = False  # the session ended: write the tombstone, then forget


class StoreMirror:
    """Keeps a :class:`~podterm.store.base.SessionStore` in step with the registry.

    Args:
        store: a started store (the gateway runs ``store.run`` first).
        holder: who runs the sessions (this gateway's ``host:port``); may be
            set once the listener is bound, before the first session.
        flush_interval_s: offsets are written at most this often per session.
        max_tombstones: closed records of this gateway kept in the store.
        clock: wall-clock seconds for ``created_at`` (tests inject one).

    The registry calls :meth:`check_available` and :meth:`register` on
    create and :meth:`closed` on reap, and runs :meth:`run` in its nursery;
    sessions report changes through :meth:`Session.watch`.
    """

    def __init__(self, store: SessionStore, *, holder: str = "", flush_interval_s: float = 1.0,
                 max_tombstones: int = MAX_TOMBSTONES,
                 clock: Callable[[], float] = time.time) -> None:
        if not flush_interval_s > 0 or max_tombstones < 0:
            raise ValueError("flush_interval_s must be > 0 and max_tombstones >= 0")
        self.store = store
        self.holder = holder
        self.flush_interval_s = flush_interval_s
        self.max_tombstones = max_tombstones
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._dirty: dict[str, _Entry] = {}  # offsets/context due at the next tick
        self._urgent: dict[str, _Entry] = {}  # whole records due now
        self._lot = trio.lowlevel.ParkingLot()  # the flusher waits for work
        self._tombstones: deque[str] = deque()
        self._outage = False  # a write failed and none succeeded since (log once)
        self._writes = 0
        self._failures = 0
        self._errors = 0
        self._refused = 0
        self._resyncs = 0
        self._stale_closed = 0
        self._moved = 0
        #: Called with a session (and the new holder) whose record another
        #: gateway took over; the gateway hands the session's upstream over.
        self.on_moved: Callable[[Session, str], None] | None = None

    def __repr__(self) -> str:
        return (f"<StoreMirror {self.store.backend} holder={self.holder!r} "
                f"tracked={len(self._entries)} pending={len(self._dirty) + len(self._urgent)}>")

    # ------------------------------------------------------------ the registry's calls

    def check_available(self) -> None:
        """Refuse a create before anything is started while the store is down.

        Raises:
            Unavailable: 503 / close 1013, :data:`UNAVAILABLE_MESSAGE`.
        """
        if not self.store.is_available:
            self._refuse("store is down")

    def _refuse(self, why: str) -> NoReturn:
        self._refused += 1
        log.warning("session.create.refused: %s (%s %s)", UNAVAILABLE_MESSAGE,
                    self.store.backend, why)
        raise Unavailable(UNAVAILABLE_MESSAGE)

    async def register(self, session: Session) -> None:
        """Write ``session``'s first record (state ``running``) and start mirroring it.

        Called after the upstream process started and before the session
        runs; the caller closes the process when this raises.

        Raises:
            Unavailable: the store could not take the record (503 / 1013).
        """
        entry = _Entry(session, self._clock())
        try:
            await self._put(entry, SessionState.RUNNING.value)
        except StoreUnavailable as exc:
            self._failures += 1
            self._refuse(str(exc))
        except StoreError as exc:
            # Not an outage (a bug, a foreign key layout): refuse this create
            # the same way, the message says retry and the log says why.
            self._errors += 1
            self._refuse(f"{type(exc).__name__}: {exc}")
        self._entries[session.id] = entry
        session.watch(self._changed)

    def adopt(self, session: Session, version: int, *, created_at: float = 0.0) -> None:
        """Mirror a session this gateway adopted; its record (``version``) was claimed by CAS.

        The whole record is written at the next flush (state, holder, token hash).
        """
        entry = _Entry(session, created_at or self._clock(), version)
        self._entries[session.id] = entry
        session.watch(self._changed)
        self._mark(entry, full=True)

    def closed(self, session: Session) -> None:
        """The session ended (the registry's reap): write its tombstone, then forget it.

        A session that ended ``moved`` is forgotten without a write: its record
        belongs to the gateway that holds it now.  So is one this gateway's
        shutdown ended while its process runs on upstream (an agent that was
        away, drained to another peer): that peer adopts it from its record.
        """
        entry = self._entries.get(session.id)
        if entry is None:
            return
        if session.end_reason == MOVED or (session.end_reason == "shutdown"
                                           and session.left_running):
            self._drop(entry)
            return
        entry.closing = True
        self._mark(entry, full=True)

    def _drop(self, entry: _Entry) -> None:
        session_id = entry.session.id
        if self._entries.get(session_id) is entry:
            del self._entries[session_id]
        self._dirty.pop(session_id, None)
        self._urgent.pop(session_id, None)
        entry.dirty = entry.full = False

    # --------------------------------------------------------------- dirty marking

    def _changed(self, session: Session, urgent: bool) -> None:
        """The session's hook (:meth:`Session.watch`): called on every change, cheap."""
        entry = self._entries.get(session.id)
        if entry is not None:
            self._mark(entry, urgent)

    def _mark(self, entry: _Entry, full: bool) -> None:
        if full:
            if not entry.full:
                entry.full = True
                self._urgent[entry.session.id] = entry
                self._lot.unpark_all()
        elif not entry.dirty and not entry.full:
            entry.dirty = True
            self._dirty[entry.session.id] = entry
            if len(self._dirty) == 1:
                self._lot.unpark_all()

    def _mark_all(self) -> None:
        for entry in self._entries.values():
            self._mark(entry, full=True)

    # ----------------------------------------------------------------------- writes

    def _context(self, session: Session) -> tuple[str | None, Mapping[str, str]]:
        try:
            context = session.stream.capture_context()
        except Exception as exc:  # noqa: BLE001 - a broken stream must not stop the mirror
            log.debug("store.mirror.context.failed %s: %s", session.id, exc)
            return None, dict(session.spec.env)
        return context.cwd, context.env

    def _record(self, entry: _Entry, state: str, cwd: str | None,
                env: Mapping[str, str]) -> SessionRecord:
        s = entry.session
        spec = s.spec
        return SessionRecord(
            id=s.id, owner=s.owner, upstream_kind=s.upstream_kind, namespace=spec.namespace,
            pod=spec.pod, container=spec.container or None, command=spec.command,
            tty=spec.tty, cols=s.cols, rows=s.rows, state=state, created_at=entry.created_at,
            resume_token_hash=s.resume_token_hash, out_offset=s.out_offset,
            in_offset=s.in_offset, writer_acked=s.writer_acked, cwd=cwd, env=env,
            holder=self.holder)

    async def _put(self, entry: _Entry, state: str) -> None:
        s = entry.session
        cwd, env = self._context(s)
        token = s.resume_token
        offsets = (s.out_offset, s.in_offset, s.writer_acked)
        record = self._record(entry, state, cwd, env)
        if entry.version == 0:
            entry.version = (await self.store.put_session(record)).version
        else:
            await self._cas(entry, record)
        self._writes += 1
        entry.state, entry.token, entry.offsets, entry.cwd = state, token, offsets, cwd

    async def _cas(self, entry: _Entry, record: SessionRecord) -> None:
        """Write ``record`` iff the stored one is still ours (see "Ownership").

        Raises:
            _Moved: another gateway holds the session now.
            StoreError: what the store raises; or the version kept changing.
        """
        for _ in range(_CAS_ATTEMPTS):
            if await self.store.cas_session(record.id, entry.version, record):
                entry.version += 1
                return
            current = await self.store.get_session(record.id)
            if current is None:
                # Gone (the store lost its data): put it back whole.
                entry.version = (await self.store.put_session(record)).version
                return
            if current.holder and current.holder != self.holder:
                raise _Moved(current.holder)
            entry.version = current.version  # bumped under us, still ours: retry
        raise StoreError(f"session {record.id}: its record kept changing during the write")

    def _moved_away(self, entry: _Entry, holder: str) -> None:
        """The record names ``holder``: stop writing it and tell the gateway."""
        if self._entries.get(entry.session.id) is not entry:
            return  # dropped already (a write was in flight)
        self._drop(entry)
        if entry.closing:
            return  # ended here anyway; the record is the new holder's
        self._moved += 1
        log.warning("store.mirror.moved %s: the session store says %s holds it now",
                    entry.session.id, holder)
        if self.on_moved is not None:
            self.on_moved(entry.session, holder)

    @staticmethod
    def _state_of(entry: _Entry) -> str:
        if entry.closing:
            return SessionState.CLOSED.value
        state = entry.session.state
        # "pending" never reaches the store: the record says running from the start.
        return SessionState.RUNNING.value if state is SessionState.PENDING else state.value

    async def _write(self, entry: _Entry, full: bool) -> None:
        """Write what changed for ``entry`` (raises what the store raises)."""
        s = entry.session
        state = self._state_of(entry)
        if full or state != entry.state or s.resume_token != entry.token:
            await self._put(entry, state)
        else:
            offsets = (s.out_offset, s.in_offset, s.writer_acked)
            if offsets != entry.offsets:
                found = await self.store.update_offsets(
                    s.id, out_offset=offsets[0], in_offset=offsets[1], writer_acked=offsets[2])
                self._writes += 1
                if not found:  # the record is gone (data lost): put it back whole
                    await self._put(entry, state)
                    return
                entry.offsets = offsets
            cwd, env = self._context(s)
            if cwd != entry.cwd:
                found = await self.store.save_context(s.id, cwd, env)
                self._writes += 1
                if not found:
                    await self._put(entry, state)
                    return
                entry.cwd = cwd
        if entry.closing:
            await self._forget(entry)

    async def _forget(self, entry: _Entry) -> None:
        session_id = entry.session.id
        if self._entries.get(session_id) is entry:
            del self._entries[session_id]
        self._dirty.pop(session_id, None)
        self._urgent.pop(session_id, None)
        self._tombstones.append(session_id)
        while len(self._tombstones) > self.max_tombstones:
            old = self._tombstones.popleft()
            try:
                await self.store.delete_session(old)
                self._writes += 1
            except StoreError as exc:
                # It stays in the store; the SQLite start-up sweep finds it again.
                log.info("store.mirror.delete.failed %s: %s", old, exc)

    async def _flush(self, batch: list[tuple[_Entry, bool]]) -> bool:
        """Write ``batch``; False if the store was unavailable (the rest is re-queued)."""
        unavailable: list[StoreUnavailable] = []
        work = iter(batch)

        async def worker() -> None:
            for entry, full in work:
                if unavailable:
                    self._mark(entry, full)  # after the outage
                    continue
                try:
                    await self._write(entry, full)
                except _Moved as moved:
                    self._moved_away(entry, moved.holder)
                except StoreUnavailable as exc:
                    self._failures += 1
                    unavailable.append(exc)
                    self._mark(entry, full)
                except StoreError as exc:
                    # Not an outage: say so; the next change of the session retries.
                    self._errors += 1
                    log.error("store.mirror.write.failed %s: %s", entry.session.id, exc)

        if len(batch) == 1:
            await worker()
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(min(FLUSH_CONCURRENCY, len(batch))):
                    nursery.start_soon(worker)
        if unavailable:
            if not self._outage:
                self._outage = True
                log.warning("store.mirror.failed: %s; running sessions continue, their "
                            "records are written once the store is back", unavailable[0])
            return False
        if self._outage and batch:
            self._outage = False
            log.info("store.mirror.recovered: %s store is writable again", self.store.backend)
        return True

    def _take(self, with_dirty: bool) -> list[tuple[_Entry, bool]]:
        batch = [(entry, True) for entry in self._urgent.values()]
        for entry, _ in batch:
            entry.full = False
            entry.dirty = False
            self._dirty.pop(entry.session.id, None)
        self._urgent = {}
        if with_dirty:
            for entry in self._dirty.values():
                entry.dirty = False
                batch.append((entry, False))
            self._dirty = {}
        return batch

    # ------------------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The flusher and the RESYNC listener, until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.store.backend != "sqlite":
                # SQLite never loses its data under a running gateway; its
                # subscription would poll the events table for nothing.
                nursery.start_soon(self._resync_loop)
            task_status.started()
            await self._flush_loop()

    async def _flush_loop(self) -> None:
        next_tick = trio.current_time() + self.flush_interval_s
        while True:
            while not self._urgent and not self._dirty:
                await self._lot.park()
            if not self._urgent:
                with trio.move_on_at(next_tick):
                    while not self._urgent:
                        await self._lot.park()
            now = trio.current_time()
            tick = now >= next_tick
            if tick:
                next_tick = now + self.flush_interval_s
            if await self._flush(self._take(with_dirty=tick)):
                continue
            # The store is down: wait for it (Redis says when it is back), and
            # do not spin on a store that claims to be up but fails (SQLite I/O).
            claimed_up = self.store.is_available
            try:
                await self.store.wait_available()
            except StoreError:
                claimed_up = True  # closed: we are being shut down
            if claimed_up:
                await trio.sleep(self.flush_interval_s)

    async def _resync_loop(self) -> None:
        try:
            async with self.store.subscribe() as events:
                async for event in events:
                    if (event.kind is EventKind.RESYNC
                            and event.data.get("reason") == "data_lost"):
                        self._resyncs += 1
                        log.warning("store.mirror.resync: the %s store lost its data; "
                                    "re-putting %d sessions", self.store.backend,
                                    len(self._entries))
                        self._mark_all()
        except StoreError as exc:
            # Without events, update_offsets finding no record still re-puts.
            log.warning("store.mirror.subscribe.failed: %s", exc)

    async def close_stale(self) -> int:
        """Mark records of a previous run of this gateway closed; returns how many.

        Records whose ``holder`` is this gateway and whose state is not
        ``closed`` cannot be running: this process only now started.  Closed
        ones are remembered as tombstones (the oldest beyond
        ``max_tombstones`` are deleted).  Raises what the store raises.
        """
        closed = 0
        tombstones: list[tuple[float, str]] = []
        for record in await self.store.list_sessions():
            if record.holder != self.holder or not self.holder:
                continue
            if record.upstream_kind == "agent" and record.state != SessionState.CLOSED.value:
                continue  # its shell lives in the agent: adopted when the agent comes back
            if record.state != SessionState.CLOSED.value:
                await self.store.put_session(replace(record, state=SessionState.CLOSED.value))
                self._writes += 1
                closed += 1
                log.info("store.session.stale %s: held by this gateway's previous run; "
                         "marked closed", record.id)
                tombstones.append((self._clock(), record.id))
            else:
                tombstones.append((record.updated_at, record.id))
        for _, session_id in sorted(tombstones):
            self._tombstones.append(session_id)
        while len(self._tombstones) > self.max_tombstones:
            old = self._tombstones.popleft()
            await self.store.delete_session(old)
            self._writes += 1
        self._stale_closed += closed
        return closed

    # ---------------------------------------------------------------------- figures

    def statistics(self) -> MirrorStatistics:
        """A frozen snapshot of the counters."""
        return MirrorStatistics(
            tracked=len(self._entries), pending=len(self._dirty) + len(self._urgent),
            writes=self._writes, failures=self._failures, errors=self._errors,
            refused_creates=self._refused, resyncs=self._resyncs,
            stale_closed=self._stale_closed, moved=self._moved)


def store_metric_families(store: SessionStore, mirror: StoreMirror | None) -> list[MetricFamily]:
    """``/metrics`` families for the store (its own counters) and the mirror."""
    st = store.statistics()
    fams = [
        labelled("podterm_store_info", "gauge", "The session store backend (value 1).",
                 "backend", {st.backend: 1}),
        gauge("podterm_store_available", "1 while the session store is reachable.",
              1 if st.available else 0),
        counter("podterm_store_operations_total", "Store calls that completed.", st.operations),
        counter("podterm_store_failures_total",
                "Store calls that failed (unavailable included).", st.failures),
        counter("podterm_store_reconnects_total",
                "Store connections re-established after a loss (Redis).", st.reconnects),
        gauge("podterm_store_in_flight", "Store requests sent and not yet answered.",
              st.in_flight),
    ]
    if mirror is not None:
        m = mirror.statistics()
        fams += [
            gauge("podterm_store_sessions_mirrored", "Live sessions mirrored into the store.",
                  m.tracked),
            gauge("podterm_store_sessions_pending",
                  "Sessions with changes not yet written to the store.", m.pending),
            counter("podterm_store_writes_total", "Session writes the store took.", m.writes),
            counter("podterm_store_write_failures_total",
                    "Session writes refused while the store was unavailable (retried).",
                    m.failures),
            counter("podterm_store_write_errors_total",
                    "Session writes that failed otherwise.", m.errors),
            counter("podterm_store_refused_creates_total",
                    "Session creates refused because the store was unavailable.",
                    m.refused_creates),
            counter("podterm_store_resyncs_total",
                    "Re-puts of every session after the store lost its data.", m.resyncs),
            counter("podterm_store_sessions_moved_total",
                    "Sessions found taken over by another gateway (no longer written here).",
                    m.moved),
        ]
    return fams

