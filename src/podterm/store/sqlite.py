"""SQLite session store: one machine, survives restarts (``sqlite:///ABSOLUTE/PATH``).

Every call runs in a worker thread (``trio.to_thread.run_sync``) behind a
``CapacityLimiter(1)``: one connection, one statement at a time, so the event
loop never blocks on disk and no two threads share the connection at once.

Durability: WAL journal with ``synchronous=NORMAL``.  A committed write
survives a crash of the process (what a gateway restart is); the last
transactions before a *power* loss may be lost, which costs a session its
resume metadata, not data (output lives in rings, not here).

Several processes (``podterm serve --workers N``) may share the file: WAL lets
readers run beside one writer, ``busy_timeout`` makes a writer wait for
another instead of failing, and multi-statement operations run in
``BEGIN IMMEDIATE`` transactions, so compare-and-set is atomic across
processes too.  Notifications go through an ``events`` table that ``run``
polls while this process has subscribers (every ``poll_interval_s``).

Schema migrations: ``schema_version`` holds the version; ``_MIGRATIONS`` lists
the statements that take version *n-1* to *n*; opening applies the missing
ones in one transaction.  A file from a newer podterm is refused
(:class:`~podterm.store.base.StoreError`) rather than misread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio

from .base import (
    DEFAULT_SUBSCRIBER_BUFFER,
    AgentLease,
    Clock,
    EventKind,
    Fanout,
    PodIdentity,
    SessionRecord,
    StoreError,
    StoreEvent,
    StoreStatistics,
    StoreUnavailable,
    check_offsets,
    check_ttl,
    hash_resume_token,
    token_matches,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statements taking the schema from version i to i+1 (index i).  Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            upstream_kind TEXT NOT NULL,
            namespace TEXT, pod TEXT, container TEXT,
            command TEXT,                      -- JSON array, NULL = interactive shell
            tty INTEGER NOT NULL,
            cols INTEGER NOT NULL, rows INTEGER NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL,
            token_hash TEXT NOT NULL,          -- SHA-256 hex, never the token
            out_offset INTEGER NOT NULL, in_offset INTEGER NOT NULL,
            writer_acked INTEGER NOT NULL,
            cwd TEXT, env TEXT NOT NULL,       -- env: JSON object
            holder TEXT NOT NULL,
            version INTEGER NOT NULL
        )""",
        "CREATE INDEX sessions_by_owner ON sessions (owner, created_at)",
        """CREATE TABLE agents (
            namespace TEXT NOT NULL, pod TEXT NOT NULL,
            agent_id TEXT NOT NULL, holder TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (namespace, pod)
        )""",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            body TEXT NOT NULL,                -- StoreEvent.to_json_obj()
            at REAL NOT NULL
        )""",
    ),
)

#: The schema version this podterm writes.
SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = ("id", "owner", "upstream_kind", "namespace", "pod", "container", "command", "tty",
            "cols", "rows", "state", "created_at", "updated_at", "token_hash", "out_offset",
            "in_offset", "writer_acked", "cwd", "env", "holder", "version")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM sessions"
_UPSERT = (f"INSERT OR REPLACE INTO sessions ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(_COLUMNS))})")

#: Events older than this are deleted when a new one is published.  60 s: far
#: longer than any poll interval, so a live subscriber never misses one.
EVENT_RETENTION_S = 60.0
#: Most events one poll reads; the rest come on the next poll.
_POLL_BATCH = 256


def _row(record: SessionRecord) -> tuple[Any, ...]:
    return (record.id, record.owner, record.upstream_kind, record.namespace, record.pod,
            record.container, None if record.command is None else json.dumps(record.command),
            int(record.tty), record.cols, record.rows, record.state, record.created_at,
            record.updated_at, record.resume_token_hash, record.out_offset, record.in_offset,
            record.writer_acked, record.cwd, json.dumps(dict(record.env), sort_keys=True),
            record.holder, record.version)


def _record(row: tuple[Any, ...]) -> SessionRecord:
    (id_, owner, kind, namespace, pod, container, command, tty, cols, rows, state, created_at,
     updated_at, token_hash, out_offset, in_offset, writer_acked, cwd, env, holder, version) = row
    return SessionRecord(
        id=id_, owner=owner, upstream_kind=kind, namespace=namespace, pod=pod,
        container=container, command=None if command is None else tuple(json.loads(command)),
        tty=bool(tty), cols=cols, rows=rows, state=state, created_at=created_at,
        updated_at=updated_at, resume_token_hash=token_hash, out_offset=out_offset,
        in_offset=in_offset, writer_acked=writer_acked, cwd=cwd, env=json.loads(env),
        holder=holder, version=version)


class SqliteStore:
    """A :class:`~podterm.store.base.SessionStore` in an SQLite file.

    Args:
        path: the database file (created with its directory's permissions).
        clock: wall-clock seconds; inject a fake for TTL tests.
        busy_timeout_s: how long a write waits for another process's
            transaction before :class:`StoreUnavailable` (5 s: far longer than
            any of our transactions, which are a few statements).
        poll_interval_s: how often subscribers' events are polled (0.25 s:
            drain and agent-move hints may arrive a quarter second late).
        expire_interval_s: how often ``run`` deletes expired leases.
    """

    backend = "sqlite"

    def __init__(self, path: str, *, clock: Clock = time.time, busy_timeout_s: float = 5.0,
                 poll_interval_s: float = 0.25, expire_interval_s: float = 30.0) -> None:
        if not path or not math.isfinite(busy_timeout_s) or busy_timeout_s < 0:
            raise ValueError("path must be non-empty and busy_timeout_s >= 0")
        self.path = path
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._poll_interval_s = poll_interval_s
        self._expire_interval_s = expire_interval_s
        self._limiter = trio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._fanout = Fanout()
        self._last_seq = 0
        self._have_subscribers = trio.Event()
        self._available = trio.Event()
        self._operations = 0
        self._failures = 0
        self._published = 0
        self._last_error: str | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._db else "not started")
        return f"<SqliteStore {self.path} {state} ops={self._operations}>"

    # -- the thread boundary --------------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the store's thread; translate sqlite errors once, here."""
        db = self._db
        if db is None or self._closed:
            self._failures += 1
            raise StoreUnavailable(f"sqlite store {self.path} is "
                                   + ("closed" if self._closed else "not started (run it first)"))
        try:
            result = await trio.to_thread.run_sync(fn, db, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            # Locked past busy_timeout, disk full, I/O error, file gone: transient or
            # operator-fixable, so the caller may retry.
            self._failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise StoreUnavailable(f"sqlite store {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            self._failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        self._operations += 1
        return result

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False: trio's worker threads differ from call to call;
        # the CapacityLimiter(1) guarantees one at a time.  isolation_level=None:
        # we issue BEGIN IMMEDIATE ourselves where a call needs a transaction.
        db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"sqlite store {self.path}: could not enable WAL (mode {mode})")
            db.execute("PRAGMA synchronous = NORMAL")
            self._migrate(db)
            row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
            self._last_seq = int(row[0])
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"sqlite store {self.path}: schema version {version} is newer than this "
                    f"podterm supports ({SCHEMA_VERSION}); upgrade podterm or use another file")
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
                log.info("store.migrate.complete", extra={"path": self.path, "version": step + 1})
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- lifecycle --------------------------------------------------------------------

    @property
    def is_available(self) -> bool:
        return self._db is not None and not self._closed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self.path} is closed")
        try:
            try:
                self._db = await trio.to_thread.run_sync(self._connect, limiter=self._limiter)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: cannot open: {exc}") from exc
            self._available.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll_events)
                task_status.started()
                while True:
                    await trio.sleep(self._expire_interval_s)
                    try:
                        await self.expire()
                    except StoreUnavailable:
                        pass  # counted; the next round tries again
        finally:
            with trio.move_on_after(self._busy_timeout_s + 1, shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        self._fanout.close()
        db, self._db = self._db, None
        if db is not None:
            # Through the limiter: wait for a statement in flight to finish first.
            await trio.to_thread.run_sync(db.close, limiter=self._limiter)
        else:
            await trio.lowlevel.checkpoint()

    async def wait_available(self) -> None:
        await self._available.wait()

    async def health(self) -> bool:
        try:
            return await self._call(lambda db: db.execute("SELECT 1").fetchone() == (1,))
        except StoreError:
            return False

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            backend=self.backend, available=self.is_available, operations=self._operations,
            failures=self._failures, subscribers=len(self._fanout),
            events_published=self._published, events_delivered=self._fanout.delivered,
            events_dropped=self._fanout.dropped, last_error=self._last_error)

    # -- sessions -----------------------------------------------------------------

    async def put_session(self, record: SessionRecord) -> SessionRecord:
        now = self._clock()

        def put(db: sqlite3.Connection) -> SessionRecord:
            with _transaction(db):
                row = db.execute("SELECT version FROM sessions WHERE id = ?",
                                 (record.id,)).fetchone()
                stored = dataclasses.replace(record, version=(row[0] if row else 0) + 1,
                                             updated_at=now)
                db.execute(_UPSERT, _row(stored))
            return stored

        return await self._call(put)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        def get(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute(_SELECT + " WHERE id = ?", (session_id,)).fetchone()
            return None if row is None else _record(row)

        return await self._call(get)

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        def list_(db: sqlite3.Connection) -> list[SessionRecord]:
            if owner is None:
                rows = db.execute(_SELECT + " ORDER BY created_at, id").fetchall()
            else:
                rows = db.execute(_SELECT + " WHERE owner = ? ORDER BY created_at, id",
                                  (owner,)).fetchall()
            return [_record(row) for row in rows]

        return await self._call(list_)

    async def delete_session(self, session_id: str) -> bool:
        return await self._call(
            lambda db: db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0)

    async def cas_session(self, session_id: str, expected_version: int,
                          update: SessionRecord) -> bool:
        if update.id != session_id:
            raise ValueError(f"update.id {update.id!r} != session_id {session_id!r}")
        stored = dataclasses.replace(update, version=expected_version + 1, updated_at=self._clock())
        values = _row(stored)

        def cas(db: sqlite3.Connection) -> bool:
            assignments = ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
            cursor = db.execute(f"UPDATE sessions SET {assignments} WHERE id = ? AND version = ?",
                                (*values[1:], session_id, expected_version))
            return cursor.rowcount == 1

        return await self._call(cas)

    async def update_offsets(self, session_id: str, *, out_offset: int | None = None,
                             in_offset: int | None = None,
                             writer_acked: int | None = None) -> bool:
        check_offsets(out_offset=out_offset, in_offset=in_offset, writer_acked=writer_acked)
        now = self._clock()

        def update(db: sqlite3.Connection) -> bool:
            # MAX(): a late write from a stale peer never moves an offset back.
            cursor = db.execute(
                "UPDATE sessions SET out_offset = MAX(out_offset, ?), in_offset = MAX(in_offset, ?),"
                " writer_acked = MAX(writer_acked, ?), updated_at = ? WHERE id = ?",
                (out_offset or 0, in_offset or 0, writer_acked or 0, now, session_id))
            return cursor.rowcount == 1

        return await self._call(update)

    async def save_context(self, session_id: str, cwd: str | None,
                           env: Mapping[str, str]) -> bool:
        env_json = json.dumps(dict(env), sort_keys=True)
        now = self._clock()
        return await self._call(lambda db: db.execute(
            "UPDATE sessions SET cwd = ?, env = ?, updated_at = ? WHERE id = ?",
            (cwd, env_json, now, session_id)).rowcount == 1)

    async def verify_resume_token(self, session_id: str, token: str) -> bool:
        row = await self._call(lambda db: db.execute(
            "SELECT token_hash FROM sessions WHERE id = ?", (session_id,)).fetchone())
        return row is not None and token_matches(row[0], token)

    async def rotate_resume_token(self, session_id: str, new_token: str, *,
                                  old_token: str | None = None) -> bool:
        new_hash = hash_resume_token(new_token)
        now = self._clock()

        def rotate(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                row = db.execute("SELECT token_hash FROM sessions WHERE id = ?",
                                 (session_id,)).fetchone()
                if row is None or (old_token is not None and not token_matches(row[0], old_token)):
                    return False
                db.execute("UPDATE sessions SET token_hash = ?, version = version + 1, "
                           "updated_at = ? WHERE id = ?", (new_hash, now, session_id))
            return True

        return await self._call(rotate)

    # -- agents -------------------------------------------------------------------

    async def register_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease:
        check_ttl(ttl_s)
        now = self._clock()
        stored = dataclasses.replace(lease, expires_at=now + ttl_s)
        moved = StoreEvent(EventKind.AGENT_MOVED, str(lease.pod),
                           {"holder": lease.holder, "agent_id": lease.agent_id},
                           origin=lease.holder)

        def register(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                row = db.execute("SELECT holder FROM agents WHERE namespace = ? AND pod = ? "
                                 "AND expires_at > ?",
                                 (lease.pod.namespace, lease.pod.pod, now)).fetchone()
                db.execute("INSERT OR REPLACE INTO agents (namespace, pod, agent_id, holder, "
                           "expires_at) VALUES (?, ?, ?, ?, ?)",
                           (lease.pod.namespace, lease.pod.pod, lease.agent_id, lease.holder,
                            stored.expires_at))
                if row is None or row[0] != lease.holder:
                    self._insert_event(db, moved, now)
                    return True
            return False

        if await self._call(register):
            self._published += 1
        return stored

    async def renew_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease | None:
        check_ttl(ttl_s)
        now = self._clock()
        stored = dataclasses.replace(lease, expires_at=now + ttl_s)
        renewed = await self._call(lambda db: db.execute(
            "UPDATE agents SET expires_at = ? WHERE namespace = ? AND pod = ? AND agent_id = ? "
            "AND holder = ? AND expires_at > ?",
            (stored.expires_at, lease.pod.namespace, lease.pod.pod, lease.agent_id, lease.holder,
             now)).rowcount == 1)
        return stored if renewed else None

    async def release_agent(self, lease: AgentLease) -> bool:
        return await self._call(lambda db: db.execute(
            "DELETE FROM agents WHERE namespace = ? AND pod = ? AND agent_id = ? AND holder = ?",
            (lease.pod.namespace, lease.pod.pod, lease.agent_id, lease.holder)).rowcount == 1)

    async def lookup_agent(self, pod: PodIdentity) -> AgentLease | None:
        now = self._clock()
        row = await self._call(lambda db: db.execute(
            "SELECT agent_id, holder, expires_at FROM agents WHERE namespace = ? AND pod = ? "
            "AND expires_at > ?", (pod.namespace, pod.pod, now)).fetchone())
        return None if row is None else AgentLease(row[0], pod, row[1], row[2])

    async def list_agents(self) -> list[AgentLease]:
        now = self._clock()
        rows = await self._call(lambda db: db.execute(
            "SELECT namespace, pod, agent_id, holder, expires_at FROM agents "
            "WHERE expires_at > ? ORDER BY namespace, pod", (now,)).fetchall())
        return [AgentLease(r[2], PodIdentity(r[0], r[1]), r[3], r[4]) for r in rows]

    async def expire(self) -> int:
        now = self._clock()
        return await self._call(lambda db: db.execute(
            "DELETE FROM agents WHERE expires_at <= ?", (now,)).rowcount)

    # -- notifications --------------------------------------------------------------

    @staticmethod
    def _insert_event(db: sqlite3.Connection, event: StoreEvent, now: float) -> None:
        db.execute("INSERT INTO events (body, at) VALUES (?, ?)",
                   (json.dumps(event.to_json_obj(), sort_keys=True), now))
        db.execute("DELETE FROM events WHERE at < ?", (now - EVENT_RETENTION_S,))

    async def publish(self, event: StoreEvent) -> None:
        if event.kind is EventKind.RESYNC:
            raise ValueError("RESYNC is local to a store and cannot be published")
        now = self._clock()

        def publish(db: sqlite3.Connection) -> None:
            with _transaction(db):
                self._insert_event(db, event, now)

        await self._call(publish)
        self._published += 1

    def subscribe(self, max_buffer: int = DEFAULT_SUBSCRIBER_BUFFER
                  ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[StoreEvent]]:
        return self._subscribe(max_buffer)

    @asynccontextmanager
    async def _subscribe(self, max_buffer: int
                         ) -> AsyncIterator[trio.MemoryReceiveChannel[StoreEvent]]:
        if not len(self._fanout):
            # Nobody was polling: start from now, not from old history.
            row = await self._call(
                lambda db: db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone())
            self._last_seq = max(self._last_seq, int(row[0]))
        async with self._fanout.subscribe(max_buffer) as events:
            self._have_subscribers.set()
            yield events

    def _fetch_events(self, db: sqlite3.Connection) -> list[tuple[int, str]]:
        return db.execute("SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                          (self._last_seq, _POLL_BATCH)).fetchall()

    async def _poll_events(self) -> None:
        """Deliver rows of ``events`` newer than the last seen, while anyone subscribes."""
        failing = False
        while True:
            if not len(self._fanout):
                self._have_subscribers = trio.Event()
                await self._have_subscribers.wait()
            try:
                rows = await self._call(self._fetch_events)
            except StoreUnavailable:
                rows = []
                if not failing:  # once per outage: events published meanwhile may be gone
                    self._fanout.deliver(StoreEvent(EventKind.RESYNC,
                                                    data={"reason": "poll_failed"}))
                failing = True
            else:
                failing = False
            for seq, body in rows:
                self._last_seq = max(self._last_seq, seq)
                try:
                    event = StoreEvent.from_json_obj(json.loads(body))
                except (ValueError, KeyError) as exc:
                    log.warning("store.event.invalid: %s", exc)
                    continue
                self._fanout.deliver(event)
            if len(rows) < _POLL_BATCH:
                await trio.sleep(self._poll_interval_s)


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up front,
    so a read-then-write cannot interleave with another process's write."""

    __slots__ = ("_db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
