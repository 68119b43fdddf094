"""The session registry: owns every session's task, finds sessions, reaps them.

Sessions run in the registry's nursery (:meth:`SessionRegistry.run`), so a
session outlives the connection that created or attached it; the gateway's
root nursery starts the registry with ``await nursery.start(registry.run)``.

The registry keeps a bounded memory of ended sessions (*tombstones*) so that
a client resuming a session that ended is told ``410 gone`` (the session is
over) rather than ``404 not found`` (it never existed).

Drain: :meth:`SessionRegistry.drain` refuses new sessions from then on
(``503 unavailable``) and tells every attached client to reconnect elsewhere;
the sessions themselves keep running until the gateway's root is cancelled.

Adoption: :meth:`SessionRegistry.adopt` re-creates a session another gateway
ran (its agent came here after that gateway died).  From :meth:`expect` until
the adopted session has caught up with its upstream, a lookup of its id is
``503 unavailable`` (retry), never ``404``.  A session that ends ``moved``
(another gateway holds it now) leaves no tombstone: its id is found there.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import trio

from podterm.auth.identity import Identity
from podterm.errors import (
    GoneError,
    NotFoundError,
    PodtermError,
    RateLimitedError,
    Unavailable,
    UpstreamError,
)
from podterm.metrics import GatewayCounters
from podterm.session.mirror import StoreMirror
from podterm.session.session import MOVED, Session, SessionLimits, SessionObserver, SessionState
from podterm.store.base import SessionRecord
from podterm.upstream.agent import for_session
from podterm.upstream.base import StreamSpec, Upstream, UpstreamStream
from podterm.upstream.kube import acting_as

__all__ = ["RegistryHooks", "RegistryStatistics", "SessionRegistry", "Unavailable"]

log = logging.getLogger(__name__)

#: Ended session ids remembered for 410 answers.  10,000 ids cost ~1 MiB; an
#: id older than that is answered 404, which a client treats the same way.
MAX_TOMBSTONES = 10_000


class RegistryHooks(SessionObserver, Protocol):
    """What the registry tells the gateway's auditor (audit events and recordings).

    The registry calls :meth:`check_accepting` before anything else in
    :meth:`SessionRegistry.create`, :meth:`starting` once the Session exists
    (before it runs or is registered), :meth:`abandoned` when a session that
    was started that way is not registered after all, :meth:`started` just
    before it runs, and :meth:`refused` when a create fails with a
    :class:`~podterm.errors.PodtermError`.  Each session gets the hooks as its
    :class:`~podterm.session.session.SessionObserver`.
    """

    def check_accepting(self) -> None:
        """Raise (``BufferFull``, 503) when new sessions must be refused."""

    async def starting(self, session: Session, owner: Identity) -> None:
        """Prepare the session (open its recorder); raising refuses it."""

    async def abandoned(self, session: Session) -> None:
        """Undo :meth:`starting` for a session that will never run."""

    def started(self, session: Session) -> None:
        """The session is registered and about to run."""

    async def refused(self, owner: Identity, spec: StreamSpec, upstream: str,
                      exc: PodtermError) -> None:
        """A create failed (capacity, rate limit, audit writer, upstream)."""

    async def adopting(self, session: Session, record: SessionRecord, *, previous_holder: str,
                       out_offset: int, in_offset: int, agent_out_offset: int) -> None:
        """An adopted session exists and has not run (its recording's next part,
        ``session.adopt``); raising gives the adoption up."""


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    """A frozen snapshot of the registry.

    Attributes:
        sessions: live sessions by state (every state present, zeros included).
        writers: attached writers.
        viewers: attached viewers.
        ring_bytes_allocated: output ring memory over all sessions.
        input_buffered_bytes: accepted input not yet written, over all sessions.
        draining: True once drain started.
    """

    sessions: Mapping[str, int]
    writers: int
    viewers: int
    ring_bytes_allocated: int
    input_buffered_bytes: int
    draining: bool


class SessionRegistry:
    """Creates, finds, kills and reaps sessions.

    Args:
        upstreams: enabled upstreams by kind (``"local"``, ...).
        default_upstream: the kind used when a request names none.
        limits: limits every session gets.
        counters: gateway-wide counters.
        max_sessions: live sessions allowed (503 beyond).
        max_sessions_per_user: live sessions per owner (429 beyond); 0 = no bound.
        open_timeout_s: bound on starting an upstream stream.
        mirror: mirrors sessions into the session store (``session.mirror``):
            a create is refused (503) while the store cannot take its record,
            running sessions are mirrored best effort.  None: no store.
        hooks: the auditor (:class:`RegistryHooks`): admission, recording and
            audit events.  None: no audit, no recording.
    """

    __slots__ = ("upstreams", "default_upstream", "limits", "counters", "max_sessions",
                 "max_sessions_per_user", "open_timeout_s", "_sessions", "_tombstones",
                 "_nursery", "_draining", "_per_user", "_pending", "mirror", "hooks",
                 "_adopting", "catch_up_timeout_s")

    def __init__(self, upstreams: Mapping[str, Upstream], *, default_upstream: str = "local",
                 limits: SessionLimits | None = None, counters: GatewayCounters,
                 max_sessions: int = 9000, max_sessions_per_user: int = 0,
                 open_timeout_s: float = 30.0, mirror: StoreMirror | None = None,
                 hooks: RegistryHooks | None = None) -> None:
        if default_upstream not in upstreams:
            raise ValueError(f"default upstream {default_upstream!r} is not enabled")
        self.upstreams = dict(upstreams)
        self.default_upstream = default_upstream
        self.limits = limits or SessionLimits()
        self.counters = counters
        self.max_sessions = max_sessions
        self.max_sessions_per_user = max_sessions_per_user
        self.open_timeout_s = open_timeout_s
        self._sessions: dict[str, Session] = {}
        self._tombstones: OrderedDict[str, str] = OrderedDict()  # id -> end reason
        self._nursery: trio.Nursery | None = None
        self._draining = False
        self._per_user: dict[str, int] = {}
        self._pending = 0  # creations between the checks and the registration
        self.mirror = mirror
        self.hooks = hooks
        # Ids being adopted (claimed in the store, not yet caught up): 503 on lookup.
        self._adopting: set[str] = set()
        #: Bound on an adopted session's catch-up before it is attachable anyway.
        self.catch_up_timeout_s = 10.0

    def __repr__(self) -> str:
        return (f"<SessionRegistry sessions={len(self._sessions)} "
                f"{'draining' if self._draining else 'serving'}>")

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called."""
        return self._draining

    async def run(self, *, task_status: trio.TaskStatus[SessionRegistry]
                  = trio.TASK_STATUS_IGNORED) -> None:
        """Own the sessions' nursery until cancelled (then every session closes)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.mirror is not None:
                await nursery.start(self.mirror.run)  # the store flusher: one task
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                # A session whose supervisor is parked has no task to cancel:
                # start each in this (cancelled) nursery, to end "shutdown".
                for session in list(self._sessions.values()):
                    session.wake_supervisor()

    # ---------------------------------------------------------------- lookup

    def get(self, session_id: str) -> Session:
        """The live session ``session_id``.

        Raises:
            NotFoundError: no such session (404).
            GoneError: it existed and has ended (410).
        """
        if session_id in self._adopting:
            raise Unavailable(f"session {session_id} is being taken over by this gateway; "
                              "retry in a moment")
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        reason = self._tombstones.get(session_id)
        if reason is not None:
            raise GoneError(f"session {session_id} has ended ({reason})")
        raise NotFoundError(f"no session {session_id!r}")

    def get_for(self, session_id: str, identity: Identity) -> Session:
        """Like :meth:`get`, but someone else's session is 404 unless ``identity`` is an admin."""
        session = self.get(session_id)
        if session.owner != identity.user and not identity.is_admin:
            raise NotFoundError(f"no session {session_id!r}")
        return session

    def is_live(self, session_id: str) -> bool:
        """Whether a session ``session_id`` runs here (adopted ones included)."""
        return session_id in self._sessions

    def sessions(self, owner: str | None = None) -> list[Session]:
        """Live sessions, oldest first; only ``owner``'s when given."""
        items = list(self._sessions.values())
        if owner is not None:
            items = [s for s in items if s.owner == owner]
        return items

    # ------------------------------------------------------------- lifecycle

    def _new_id(self) -> str:
        while True:
            session_id = "s-" + secrets.token_hex(6)
            if session_id not in self._sessions and session_id not in self._tombstones:
                return session_id

    async def create(self, owner: Identity, spec: StreamSpec,
                     upstream: str | None = None) -> Session:
        """Start a process and its session.

        With :attr:`hooks`, the auditor is asked first (a ``fail-closed``
        audit or recording writer that is behind refuses with 503), opens the
        session's recorder before it runs, and hears of every refusal.

        Raises:
            BufferFull: the audit or recording writer refuses new sessions (503).
            Unavailable: draining, the registry is not running, or
                ``max_sessions`` are live (503).
            RateLimitedError: the owner has ``max_sessions_per_user`` (429).
            NotFoundError: ``upstream`` is not enabled... reported as 400 by the API.
            UpstreamError: the upstream could not start the process (502).
        """
        hooks = self.hooks
        if hooks is None:
            return await self._create(owner, spec, upstream)
        try:
            hooks.check_accepting()
            return await self._create(owner, spec, upstream)
        except PodtermError as exc:
            await hooks.refused(owner, spec, upstream or self.default_upstream, exc)
            raise

    async def _create(self, owner: Identity, spec: StreamSpec,
                      upstream: str | None) -> Session:
        if self._draining or self._nursery is None:
            raise Unavailable("the gateway is draining; retry through the load balancer")
        kind = upstream or self.default_upstream
        backend = self.upstreams.get(kind)
        if backend is None:
            raise UpstreamError(f"upstream {kind!r} is not enabled on this gateway "
                                f"(enabled: {', '.join(sorted(self.upstreams))})")
        if len(self._sessions) + self._pending >= self.max_sessions:
            raise Unavailable(f"this gateway holds its maximum of {self.max_sessions} sessions")
        user = owner.user
        if (self.max_sessions_per_user
                and self._per_user.get(user, 0) >= self.max_sessions_per_user):
            raise RateLimitedError(f"user {user!r} has {self.max_sessions_per_user} sessions "
                                   "already; end one first")
        if self.mirror is not None:
            self.mirror.check_available()  # before starting anything: 503 while the store is down
        self._pending += 1
        self._per_user[user] = self._per_user.get(user, 0) + 1
        registered = False
        hooked: Session | None = None  # hooks.starting() ran for it
        # The id first: an agent stream is labelled with it (adoption finds it by it).
        session_id = self._new_id()
        try:
            stream = await self._open(backend, kind, owner, spec, session_id)
            nursery = self._nursery
            if nursery is None or self._draining:
                with trio.CancelScope(shield=True), trio.move_on_after(self.limits.kill_timeout_s):
                    await stream.aclose()
                raise Unavailable("the gateway is draining; retry through the load balancer")

            # A lost shell's restart (Session "Lost upstreams"): same upstream,
            # same owner.  (A partial, not a closure: fewer objects per session.)
            reopen = functools.partial(self._open, backend, kind, owner, session_id=session_id)
            session = Session(session_id, owner=user, spec=spec, upstream_kind=kind,
                              stream=stream, limits=self.limits, counters=self.counters,
                              reopen=reopen, observer=self.hooks)
            if self.hooks is not None:
                try:
                    await self.hooks.starting(session, owner)  # its recorder, before it runs
                except BaseException:
                    with trio.CancelScope(shield=True), \
                            trio.move_on_after(self.limits.kill_timeout_s):
                        await stream.aclose()
                    raise
                hooked = session
            if self.mirror is not None:
                try:
                    # Its record first: a session no peer could find is not started.
                    await self.mirror.register(session)
                except BaseException:
                    with trio.CancelScope(shield=True), \
                            trio.move_on_after(self.limits.kill_timeout_s):
                        await stream.aclose()
                    raise
            session.on_closed(self._reap)
            self._sessions[session.id] = session
            self._pending -= 1  # counted in _sessions from now on
            registered = True
            self.counters.sessions_created += 1
            if self.hooks is not None:
                self.hooks.started(session)
            await nursery.start(session.run)
            log.info("session.create.complete %s owner=%s upstream=%s", session.id, user, kind)
            return session
        finally:
            if not registered:
                self._pending -= 1
                self._release_user(user)
                if hooked is not None and self.hooks is not None:
                    await self.hooks.abandoned(hooked)

    async def _open(self, backend: Upstream, kind: str, owner: Identity,
                    spec: StreamSpec, session_id: str) -> UpstreamStream:
        """``backend.open(spec)`` on behalf of ``owner`` (for impersonation), bounded."""
        with acting_as(owner), for_session(session_id), \
                trio.move_on_after(self.open_timeout_s) as scope:
            stream = await backend.open(spec)
        if scope.cancelled_caught:
            raise UpstreamError(f"upstream {kind!r} did not start the process within "
                                f"{self.open_timeout_s:g} s")
        return stream

    def _release_user(self, user: str) -> None:
        left = self._per_user.get(user, 0) - 1
        if left > 0:
            self._per_user[user] = left
        else:
            self._per_user.pop(user, None)

    # -------------------------------------------------------------- adoption

    def expect(self, session_id: str) -> None:
        """``session_id`` is about to be adopted here: lookups answer 503 (retry) meanwhile.

        Ends with :meth:`adopt` (once caught up) or :meth:`unexpect`.
        """
        self._adopting.add(session_id)

    def unexpect(self, session_id: str) -> None:
        """The adoption of ``session_id`` will not happen (or is over)."""
        self._adopting.discard(session_id)

    async def adopt(self, record: SessionRecord, spec: StreamSpec, stream: UpstreamStream, *,
                    out_offset: int, in_offset: int, catch_up_to: int,
                    previous_holder: str = "") -> Session:
        """Re-create a session another gateway ran, on ``stream`` (its upstream, taken over).

        ``record`` is the session's record as claimed (holder: this gateway;
        ``record.version`` the version written).  The session keeps its id,
        owner, spec and resume token (by hash); its output resumes at
        ``out_offset`` and its input at ``in_offset`` (see
        :meth:`Session.resume_at`).  It runs at once; it becomes attachable
        once it caught up (bounded by :attr:`catch_up_timeout_s`).  Not
        refused for capacity: refusing would kill a running shell.  The hooks
        hear of it first (:meth:`RegistryHooks.adopting`: the next part of
        its recording, ``session.adopt`` naming ``previous_holder``).

        Raises:
            Unavailable: draining, or the registry is not running (the caller
                closes ``stream``).
            Exception: what the hooks raised (the recording could not start).
        """
        nursery = self._nursery
        if nursery is None or self._draining:
            self._adopting.discard(record.id)
            raise Unavailable("the gateway is draining; the agent will reconnect elsewhere")
        if record.id in self._sessions:
            self._adopting.discard(record.id)
            raise Unavailable(f"session {record.id} is still ending here")
        session = Session(record.id, owner=record.owner, spec=spec, upstream_kind="agent",
                          stream=stream, limits=self.limits, counters=self.counters,
                          observer=self.hooks)
        session.resume_at(out_offset=out_offset, in_offset=in_offset,
                          token_hash=record.resume_token_hash, catch_up_to=catch_up_to)
        self._adopting.add(record.id)
        if self.hooks is not None:
            try:
                await self.hooks.adopting(session, record, previous_holder=previous_holder,
                                          out_offset=out_offset, in_offset=in_offset,
                                          agent_out_offset=catch_up_to)
            except BaseException:
                self._adopting.discard(record.id)
                raise
            if self._nursery is None or self._draining or record.id in self._sessions:
                self._adopting.discard(record.id)
                await self.hooks.abandoned(session)  # its recording part ends empty
                raise Unavailable("the gateway is draining; the agent will reconnect elsewhere")
            nursery = self._nursery
        if len(self._sessions) >= self.max_sessions:
            log.warning("session.adopt %s: over max_sessions (%d); taken anyway, a running "
                        "shell is never refused", record.id, self.max_sessions)
        session.on_closed(self._reap)
        self._sessions[session.id] = session
        self._per_user[record.owner] = self._per_user.get(record.owner, 0) + 1
        self.counters.sessions_created += 1
        if self.mirror is not None:
            self.mirror.adopt(session, record.version, created_at=record.created_at)
        try:
            await nursery.start(session.run)
            with trio.move_on_after(self.catch_up_timeout_s) as scope:
                await session.wait_caught_up()
            if scope.cancelled_caught:
                log.warning("session.adopt %s: not caught up within %g s; attachable anyway",
                            session.id, self.catch_up_timeout_s)
        finally:
            self._adopting.discard(record.id)
        log.info("session.adopt.complete %s owner=%s out=%d in=%d", session.id, record.owner,
                 out_offset, in_offset)
        return session

    def _reap(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        self._release_user(session.owner)
        if self.mirror is not None:
            self.mirror.closed(session)  # the store's tombstone, written by the flusher
        if session.end_reason == MOVED:
            # Another gateway holds it now: no tombstone, so its id is looked up there.
            log.info("session.end.moved %s", session.id)
            return
        self._tombstones[session.id] = session.end_reason or "closed"
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        log.info("session.end.complete %s reason=%s", session.id, session.end_reason)

    async def kill(self, session: Session, reason: str = "killed") -> None:
        """End ``session`` and wait (bounded by the session's kill timeout) until it has."""
        session.kill(reason)
        with trio.move_on_after(self.limits.kill_timeout_s + 1.0):
            await session.wait_closed()

    def drain(self, reason: str = "gateway shutting down") -> None:
        """Refuse new sessions and tell every attached client to resume elsewhere."""
        self._draining = True
        for session in list(self._sessions.values()):
            session.drain(reason)

    def attached_links(self) -> int:
        """Attachments still open (drain waits for this to reach 0)."""
        return sum(len(s.links()) for s in self._sessions.values())

    def statistics(self) -> RegistryStatistics:
        """A frozen snapshot: sessions by state, attachments, memory."""
        by_state = {state.value: 0 for state in SessionState}
        writers = viewers = ring = buffered = 0
        for session in self._sessions.values():
            by_state[session.state.value] += 1
            writers += session.writer is not None
            viewers += len(session.viewers)
            ring += session.ring.nbytes_allocated
            buffered += session.statistics().input_buffered
        return RegistryStatistics(sessions=MappingProxyType(by_state), writers=writers,
                                  viewers=viewers, ring_bytes_allocated=ring,
                                  input_buffered_bytes=buffered, draining=self._draining)
