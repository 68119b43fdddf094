"""The session store: one interface, three backends (memory, SQLite, Redis).

What peers must share lives here (ARCHITECTURE.md, "Session store"): session
metadata (owner, target, state, size, cwd/env context, which worker or replica
holds it), resume tokens (as SHA-256 hashes, never the token), last-seen
offsets, and the agent registry with liveness TTLs.  Output bytes never go
through the store: they live in the session's ring (or the agent's).

Contract every backend meets (``tests/helpers/store_contract.py`` checks it)
--------------------------------------------------------------------------

Versions and compare-and-set.  Every stored :class:`SessionRecord` carries a
``version``.  :meth:`SessionStore.put_session` writes unconditionally and
bumps it (a new record gets 1); :meth:`SessionStore.cas_session` writes only
if the stored version is still the one the caller read, so two replicas racing
to take over a session cannot both win.  :meth:`SessionStore.rotate_resume_token`
bumps the version too.  Offsets (:meth:`SessionStore.update_offsets`) and the
shell context (:meth:`SessionStore.save_context`) do **not**: they change many
times a second, are last-writer-wins (offsets only ever move forward), and must
never make a concurrent CAS on the metadata fail.

Resume tokens.  Records carry ``resume_token_hash`` = SHA-256 hex of the token
(:func:`hash_resume_token`); a plaintext token can not even be put into a
record (the field only accepts 64 hex digits).  Verification hashes the
candidate and compares with :func:`hmac.compare_digest`.

Agent leases.  A pod identity maps to at most one live :class:`AgentLease`.
A lease is live while ``expires_at`` (by the store's clock) is in the future;
:meth:`SessionStore.renew_agent` extends it only for the same agent *and* the
same holder, so a replica that lost an agent cannot resurrect its lease.
Registering an agent under a new holder publishes :attr:`EventKind.AGENT_MOVED`.

Time.  Wall-clock seconds (epoch) from an injected ``clock`` (default
:func:`time.time`): leases are compared across machines, so they cannot use a
monotonic clock.  Tests pass a fake clock and advance it.

Notifications.  :meth:`SessionStore.publish` and :meth:`SessionStore.subscribe`
carry :class:`StoreEvent` hints between peers (drain, agent moved).  They are
hints: the records are the truth.  A subscriber that falls ``max_buffer``
events behind loses events (counted in ``events_dropped``), and after any gap
the store delivers :attr:`EventKind.RESYNC`, meaning "re-read what you cache".

Availability.  Every operation either completes or raises
:class:`StoreUnavailable` (the backend cannot be reached; retry later — the
store reconnects by itself) or :class:`StoreError` (the backend answered
something unexpected).  Nothing else escapes a store, except
:class:`trio.Cancelled` and :class:`ValueError` for arguments that break the
contract.

Lifecycle.  A store is started with ``await nursery.start(store.run)`` (it runs
its background tasks — connection management, subscribers, lease expiry — until
cancelled) and closed with :meth:`SessionStore.aclose` (idempotent; ``run``
closes on exit).  :func:`running` wraps both for tests and scripts.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import trio

from podterm.errors import CloseCode, PodtermError

__all__ = [
    "AgentLease",
    "Clock",
    "EventKind",
    "PodIdentity",
    "SessionRecord",
    "SessionStore",
    "StoreError",
    "StoreEvent",
    "StoreStatistics",
    "StoreUnavailable",
    "hash_resume_token",
    "running",
]

log = logging.getLogger(__name__)

#: Wall-clock seconds since the epoch (``time.time``); injected for tests.
Clock = Callable[[], float]

_HASH_RE = re.compile(r"[0-9a-f]{64}")

#: Most events a subscriber may have queued before newer ones are dropped
#: (and counted).  64: notifications are rare (a drain, an agent moving); a
#: subscriber that is 64 behind is stuck, and RESYNC tells it to re-read.
DEFAULT_SUBSCRIBER_BUFFER = 64


class StoreError(PodtermError):
    """The store answered something unexpected (a bug, a schema from a newer podterm, a
    foreign key in the Redis prefix).  Not retried."""

    close_code = CloseCode.INTERNAL_ERROR
    http_status = 500
    outcome = "error"
    reason_name = "InternalError"


class StoreUnavailable(StoreError):
    """The store cannot be reached right now.

    Raised quickly (no waiting for the backend to return) while the backend is
    down; the store keeps reconnecting by itself, so the same call may succeed
    later.  Callers refuse *new* work with it (HTTP 503, close 1013 "try again
    later") and treat writes for *running* sessions as best effort.
    """

    close_code = CloseCode.TRY_AGAIN_LATER
    http_status = 503
    outcome = "error"
    reason_name = "ServiceUnavailable"


def hash_resume_token(token: str) -> str:
    """SHA-256 of a resume token, as 64 lowercase hex digits (what the store keeps).

    No salt or pepper is needed: tokens are 144 random bits
    (``podterm.session.session.new_resume_token``), so the hash cannot be
    reversed by guessing.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(stored_hash: str, token: str) -> bool:
    """Whether ``token`` hashes to ``stored_hash``, compared in constant time."""
    if not stored_hash:
        return False
    return hmac.compare_digest(stored_hash.encode("ascii"), hash_resume_token(token).encode("ascii"))


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """Which pod an agent runs in: ``namespace/pod`` (what a session's target names)."""

    namespace: str
    pod: str

    def __post_init__(self) -> None:
        for name in ("namespace", "pod"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or "/" in value:
                raise ValueError(f"{name} must be a non-empty string without '/', got {value!r}")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}"

    @classmethod
    def parse(cls, text: str) -> PodIdentity:
        """``"ns/pod"`` back into a :class:`PodIdentity` (``ValueError`` if malformed)."""
        namespace, sep, pod = text.partition("/")
        if not sep:
            raise ValueError(f"pod identity must be NAMESPACE/POD, got {text!r}")
        return cls(namespace, pod)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What a peer needs to know about a session it does not run.

    Attributes:
        id: the session id (``s-`` + hex).
        owner: user name of the creator (``list_sessions(owner=...)`` filters on it).
        upstream_kind: ``"local"``, ``"kube"`` or ``"agent"``.
        namespace, pod, container: the target (``None`` for a local session).
        command: argv, or ``None`` for an interactive shell.
        tty, cols, rows: terminal mode and size.
        state: ``podterm.session.SessionState`` value (``"running"``, ``"detached"``, ...).
        created_at, updated_at: wall-clock seconds; ``updated_at`` is set by
            the store on every write.
        resume_token_hash: SHA-256 hex of the current resume token, or ``""``
            (never the token: anything but 64 hex digits is rejected).
        out_offset: output bytes produced; in_offset: input bytes accepted;
            writer_acked: output the writer has ACKed.  Last-seen values,
            maintained by :meth:`SessionStore.update_offsets`.
        cwd, env: the shell's context, for a restart (:meth:`SessionStore.save_context`).
        holder: which worker/replica runs the session (an address peers can
            forward to, e.g. ``"10.0.0.7:7780/w2"``); ``""`` = none.
        version: set by the store; compare-and-set token (0 = never stored).
    """

    id: str
    owner: str
    upstream_kind: str = "local"
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    command: tuple[str, ...] | None = None
    tty: bool = True
    cols: int = 80
    rows: int = 24
    state: str = "pending"
    created_at: float = 0.0
    updated_at: float = 0.0
    resume_token_hash: str = ""
    out_offset: int = 0
    in_offset: int = 0
    writer_acked: int = 0
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    holder: str = ""
    version: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"session id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.owner, str):
            raise ValueError(f"owner must be a string, got {self.owner!r}")
        if self.resume_token_hash and not _HASH_RE.fullmatch(self.resume_token_hash):
            # The guard that keeps plaintext tokens out of every backend.
            raise ValueError("resume_token_hash must be hash_resume_token(token) (64 hex digits), "
                             "never the token itself")
        if self.command is not None:
            object.__setattr__(self, "command", tuple(self.command))
        for name in ("out_offset", "in_offset", "writer_acked", "version", "cols", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        env = dict(self.env)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env must map str to str")
        # A read-only copy: a record is a value; the caller's dict may change later.
        object.__setattr__(self, "env", MappingProxyType(env))

    def __repr__(self) -> str:
        return (f"<SessionRecord {self.id} v{self.version} {self.state} owner={self.owner!r} "
                f"holder={self.holder!r} out={self.out_offset} in={self.in_offset}>")

    @property
    def target(self) -> PodIdentity | None:
        """The target pod, when the record names one."""
        if self.namespace and self.pod:
            return PodIdentity(self.namespace, self.pod)
        return None


@dataclass(frozen=True, slots=True)
class AgentLease:
    """A sidecar agent's registration: which peer holds its tunnel, until when.

    Attributes:
        agent_id: the agent's own id (stable for one agent process).
        pod: the pod it runs in (the lookup key).
        holder: address of the worker/replica holding the tunnel.
        expires_at: wall-clock seconds; set by the store on register/renew.
    """

    agent_id: str
    pod: PodIdentity
    holder: str
    expires_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.agent_id or not self.holder:
            raise ValueError("agent_id and holder must be non-empty")


class EventKind(enum.Enum):
    """What a :class:`StoreEvent` announces."""

    #: A holder is draining (``subject`` = the holder): its clients will resume elsewhere.
    DRAIN = "drain"
    #: An agent registered with a new holder (``subject`` = pod identity,
    #: ``data["holder"]``, ``data["agent_id"]``): forward to the new holder.
    AGENT_MOVED = "agent_moved"
    #: Local only, never published: events may have been missed; re-read what
    #: you cache.  ``data["reason"]``: ``"reconnected"`` / ``"resubscribed"``
    #: (Redis came back with its data), ``"poll_failed"`` (SQLite), or
    #: ``"data_lost"`` (Redis came back empty: re-put the sessions you run and
    #: re-register your agents).
    RESYNC = "resync"


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """A notification between peers (a hint; the records are the truth)."""

    kind: EventKind
    subject: str = ""
    data: Mapping[str, str] = field(default_factory=dict)
    #: Who published it (a holder address), so a peer can ignore its own.
    origin: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    def to_json_obj(self) -> dict[str, Any]:
        return {"k": self.kind.value, "s": self.subject, "d": dict(self.data), "o": self.origin}

    @classmethod
    def from_json_obj(cls, obj: Any) -> StoreEvent:
        """Inverse of :meth:`to_json_obj`; ``ValueError`` on anything malformed."""
        if not isinstance(obj, dict):
            raise ValueError("event must be an object")
        data = obj.get("d", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError("event data must map str to str")
        return cls(EventKind(obj["k"]), str(obj.get("s", "")), data, str(obj.get("o", "")))


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """A frozen snapshot of a store's counters (for ``/metrics`` and ``podterm doctor``).

    Attributes:
        backend: ``"memory"``, ``"sqlite"`` or ``"redis"``.
        available: the backend is reachable right now (as far as the store knows).
        operations: calls that completed.
        failures: calls that raised :class:`StoreError` (including unavailable).
        reconnects: connections re-established after a loss (Redis).
        in_flight: requests sent and not yet answered (Redis).
        subscribers: open :meth:`SessionStore.subscribe` channels.
        events_published, events_delivered, events_dropped: notification counters.
        last_error: the most recent failure, as text.
    """

    backend: str
    available: bool
    operations: int = 0
    failures: int = 0
    reconnects: int = 0
    in_flight: int = 0
    subscribers: int = 0
    events_published: int = 0
    events_delivered: int = 0
    events_dropped: int = 0
    last_error: str | None = None


@runtime_checkable
class SessionStore(Protocol):
    """The interface the gateway programs against.  See the module docstring for the contract."""

    @property
    def backend(self) -> str:
        """``"memory"``, ``"sqlite"`` or ``"redis"``."""
        ...

    @property
    def is_available(self) -> bool:
        """Whether operations are expected to succeed right now (never blocks)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the backend and run background tasks until cancelled, then close.

        ``started()`` comes after the first connection attempt, successful or
        not: a store whose backend is down at start-up still starts (it keeps
        trying; :attr:`is_available` says when it is up).  Raises
        :class:`StoreError` only for faults that retrying cannot fix (a schema
        newer than this podterm).
        """
        ...

    async def aclose(self) -> None:
        """Close connections and files; idempotent.  Later calls raise :class:`StoreUnavailable`."""
        ...

    async def wait_available(self) -> None:
        """Return once the backend is reachable (at once if it is); bound it with a cancel scope."""
        ...

    async def health(self) -> bool:
        """One round trip to the backend: ``True`` if it answered.  Never raises :class:`StoreError`."""
        ...

    def statistics(self) -> StoreStatistics:
        """A snapshot of the counters."""
        ...

    # -- sessions ---------------------------------------------------------------

    async def put_session(self, record: SessionRecord) -> SessionRecord:
        """Create or overwrite; returns what was stored (``version`` bumped, ``updated_at`` now)."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """The stored record, or ``None``."""
        ...

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        """Every record (or ``owner``'s), oldest ``created_at`` first, then by id."""
        ...

    async def delete_session(self, session_id: str) -> bool:
        """Remove; ``True`` if it existed."""
        ...

    async def cas_session(self, session_id: str, expected_version: int,
                          update: SessionRecord) -> bool:
        """Replace the record with ``update`` iff its version is still ``expected_version``.

        On success the stored version is ``expected_version + 1`` and
        ``updated_at`` is now (the ``version`` and ``updated_at`` in
        ``update`` are ignored).  ``False`` if the record changed or is gone.

        Raises:
            ValueError: ``update.id != session_id``.
        """
        ...

    async def update_offsets(self, session_id: str, *, out_offset: int | None = None,
                             in_offset: int | None = None,
                             writer_acked: int | None = None) -> bool:
        """Raise the given offsets (a smaller value than stored is ignored: a late write from a
        stale peer cannot move them back).  No version bump.  ``False`` if the record is gone."""
        ...

    async def save_context(self, session_id: str, cwd: str | None,
                           env: Mapping[str, str]) -> bool:
        """Replace the shell context (last writer wins, no version bump); ``False`` if gone."""
        ...

    async def verify_resume_token(self, session_id: str, token: str) -> bool:
        """Whether ``token`` is the session's current resume token (constant-time compare)."""
        ...

    async def rotate_resume_token(self, session_id: str, new_token: str, *,
                                  old_token: str | None = None) -> bool:
        """Store the hash of ``new_token`` (bumps the version).

        With ``old_token``, atomically: only if ``old_token`` is still the
        current one, so two clients resuming with the same token cannot both
        get a working new one.  ``False`` if it did not match or the session is gone.
        """
        ...

    # -- agents -----------------------------------------------------------------

    async def register_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease:
        """Make ``lease`` the pod's live lease for ``ttl_s`` (replacing any other); returns it with
        ``expires_at`` set.  Publishes :attr:`EventKind.AGENT_MOVED` if the holder changed."""
        ...

    async def renew_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease | None:
        """Extend the pod's lease by ``ttl_s`` from now iff it is live and has the same agent and
        holder; ``None`` otherwise (expired, or moved to another holder: stop serving it)."""
        ...

    async def release_agent(self, lease: AgentLease) -> bool:
        """Drop the pod's lease iff it has the same agent and holder (a clean disconnect)."""
        ...

    async def lookup_agent(self, pod: PodIdentity) -> AgentLease | None:
        """The pod's live lease, or ``None`` (never an expired one)."""
        ...

    async def list_agents(self) -> list[AgentLease]:
        """Every live lease, by pod identity."""
        ...

    async def expire(self) -> int:
        """Delete leases that have expired by the clock; returns how many.  Lookups ignore expired
        leases anyway: this only reclaims space (``run`` calls it periodically)."""
        ...

    # -- notifications ----------------------------------------------------------

    async def publish(self, event: StoreEvent) -> None:
        """Send ``event`` to every subscriber of every peer sharing the backend (this one too)."""
        ...

    def subscribe(self, max_buffer: int = DEFAULT_SUBSCRIBER_BUFFER
                  ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[StoreEvent]]:
        """``async with store.subscribe() as events: async for event in events: ...``"""
        ...


def check_ttl(ttl_s: float) -> None:
    """Reject TTLs that cannot be a lease (``ValueError``)."""
    if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a positive finite number of seconds, got {ttl_s!r}")


def check_offsets(**offsets: int | None) -> None:
    for name, value in offsets.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


class Fanout:
    """In-process delivery of :class:`StoreEvent` to subscribers (shared by every backend).

    Each subscriber has a bounded channel; :meth:`deliver` never blocks: a
    full subscriber loses the event, and the loss is counted and logged.
    """

    __slots__ = ("_senders", "delivered", "dropped")

    def __init__(self) -> None:
        self._senders: set[trio.MemorySendChannel[StoreEvent]] = set()
        self.delivered = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._senders)

    def deliver(self, event: StoreEvent) -> None:
        for sender in list(self._senders):
            try:
                sender.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
                log.warning("store.event.dropped: subscriber full", extra={"kind": event.kind.value})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._senders.discard(sender)
            else:
                self.delivered += 1

    @asynccontextmanager
    async def subscribe(self, max_buffer: int) -> AsyncIterator[trio.MemoryReceiveChannel[StoreEvent]]:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
        sender, receiver = trio.open_memory_channel[StoreEvent](max_buffer)
        self._senders.add(sender)
        try:
            async with receiver:
                yield receiver
        finally:
            self._senders.discard(sender)
            sender.close()

    def close(self) -> None:
        """End every subscription (their ``async for`` loops finish)."""
        for sender in self._senders:
            sender.close()
        self._senders.clear()


@asynccontextmanager
async def running(store: SessionStore) -> AsyncIterator[SessionStore]:
    """Run ``store`` in a private nursery for the duration of the block, then close it.

    For tests, scripts and ``podterm doctor``; the gateway starts the store in its
    own task tree with ``await nursery.start(store.run)``.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            nursery.cancel_scope.cancel()
    await store.aclose()
