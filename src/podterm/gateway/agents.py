"""The agent endpoint: where sidecar agents dial in (docs/agent.md, docs/protocol.md §8).

``GET /api/v1/agents/connect`` with ``Upgrade: websocket`` and
``Sec-WebSocket-Protocol: podterm.tunnel.v1``.

An agent authenticates like a user (bearer token, or a client certificate
over TLS: CN = user, O = groups; the router does it) and its identity must be
in the group ``podterm:agents``.  It registers its pod identity with headers
of the upgrade request:

==========================  ========================================  ========
header                      value                                     required
==========================  ========================================  ========
``X-Podterm-Namespace``     the pod's namespace (DNS-1123 label)      yes
``X-Podterm-Pod``           the pod's name (DNS-1123 subdomain)       yes
``X-Podterm-Agent-Id``      random per agent process                  yes
``X-Podterm-Containers``    comma-separated container names           no
``X-Podterm-Agent-Version`` the agent's podterm version               no
``X-Podterm-Capacity``      most streams it accepts                   no
==========================  ========================================  ========

Refusals are HTTP answers before the upgrade: 401 (no or bad credentials),
403 (not in ``podterm:agents``), 400 (missing or malformed registration, or
the subprotocol not offered), 426 (not an upgrade), 503 (draining).  After the
upgrade the connection belongs to :meth:`podterm.upstream.agent.AgentUpstream.serve_tunnel`.

Agents in a shared session store: :class:`AgentCoordinator`
-----------------------------------------------------------
With SQLite or Redis as the store, every gateway is a peer that may hold any
agent, and the store says which one does (docs/ha.md, "Agents"):

* **Leases.**  When an agent's tunnel is accepted, its lease names this
  gateway's peer address as holder, for ``lease_ttl_s`` (3 heartbeat
  intervals); it is renewed every third of that while the tunnel lives and
  released when the connection ends (a drain, the agent leaving, a dead
  link).  Peers forward a create for the pod to the lease's holder.
* **Adoption.**  An agent whose gateway died reconnects (through the load
  balancer) to any peer and announces streams that peer never opened.  Each
  stream's label names its session; the peer reads the session's record,
  takes it over by compare-and-set (holder = itself), and re-creates the
  session on the stream: output from what the client had acknowledged
  (``writer_acked``, or the agent's ring start if that is later: the client
  then gets a ``gap``), input from what the agent received.  The client's
  resume then works here, or through any peer that forwards here.  A stream
  the store does not know, or whose session ended, is closed on the agent.
* **Hand-over.**  A gateway that finds its agent held by another peer (a
  renewal refused and the lease naming someone else, or a session record
  taken over under its mirror) drops its state for that agent: its sessions
  end ``moved`` and their clients reconnect; the agent hears nothing.
* **Awaiting their agent.**  A gateway restarted at the same peer address
  finds records that name it as holder, for sessions whose shells live in
  agents that have not come back yet.  Until one does (and the session is
  adopted here or elsewhere), or ``grace_s`` passes, a lookup of such a
  session answers ``503 unavailable`` (retry), not ``404``: the client's
  resume keeps trying instead of giving up.

The store being down never ends a session: renewals wait for it, and an
agent whose announced streams need it is asked to retry (close 1013).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from podterm.errors import (
    BadRequestError,
    ForbiddenError,
    HandshakeError,
    PodtermError,
    Unavailable,
)
from podterm.gateway.http import Upgraded, error_code
from podterm.gateway.router import Call, Route
from podterm.metrics import GatewayCounters, MetricFamily, counter
from podterm.net.wsconn import accept_on
from podterm.protocol.handshake import extract_bearer_subprotocol, parse_upgrade
from podterm.session.mirror import UNAVAILABLE_MESSAGE
from podterm.session.registry import SessionRegistry
from podterm.session.session import Session, SessionState
from podterm.store.base import (
    AgentLease,
    EventKind,
    PodIdentity,
    SessionRecord,
    SessionStore,
    StoreError,
    StoreUnavailable,
)
from podterm.upstream.agent import (
    AGENTS_GROUP,
    AGENTS_PATH,
    HEADER_AGENT_ID,
    HEADER_AGENT_VERSION,
    HEADER_CAPACITY,
    HEADER_CONTAINERS,
    HEADER_NAMESPACE,
    HEADER_POD,
    SUBPROTOCOL,
    TUNNEL_LIMITS,
    AgentInfo,
    AgentUpstream,
    AnnouncedStream,
    ConnectVerdict,
    StreamClaim,
    TunnelStream,
)
from podterm.upstream.base import StreamSpec

__all__ = ["AgentCoordinator", "AgentCoordinatorStatistics", "AgentEndpoint"]

log = logging.getLogger(__name__)

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_AGENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION = re.compile(r"[ -~]{0,64}")
#: A sane bound on what one agent may claim (its RESUME must fit in 1 MiB: ~10,000 streams).
MAX_CAPACITY = 100_000


def _header(headers: dict[str, str], name: str) -> str:
    return headers.get(name.lower(), "").strip()


def parse_registration(headers: dict[str, str], *, user: str, peer: str) -> AgentInfo:
    """The :class:`AgentInfo` an upgrade request registers.

    Raises:
        BadRequestError: a required header is missing, or a value is malformed
            (the message names the header).
    """
    namespace = _header(headers, HEADER_NAMESPACE)
    pod = _header(headers, HEADER_POD)
    agent_id = _header(headers, HEADER_AGENT_ID)
    if not _LABEL.fullmatch(namespace):
        raise BadRequestError(f"{HEADER_NAMESPACE}: expected the pod's namespace "
                              f"(a DNS-1123 label), got {namespace!r}", http_status=400)
    if not _SUBDOMAIN.fullmatch(pod):
        raise BadRequestError(f"{HEADER_POD}: expected the pod's name (DNS-1123), "
                              f"got {pod!r}", http_status=400)
    if not _AGENT_ID.fullmatch(agent_id):
        raise BadRequestError(f"{HEADER_AGENT_ID}: expected 1..64 characters "
                              "[A-Za-z0-9._-]", http_status=400)
    containers = tuple(c.strip() for c in _header(headers, HEADER_CONTAINERS).split(",")
                       if c.strip())
    for name in containers:
        if not _LABEL.fullmatch(name):
            raise BadRequestError(f"{HEADER_CONTAINERS}: bad container name {name!r}",
                                  http_status=400)
    version = _header(headers, HEADER_AGENT_VERSION)
    if not _VERSION.fullmatch(version):
        raise BadRequestError(f"{HEADER_AGENT_VERSION}: at most 64 printable characters",
                              http_status=400)
    raw_capacity = _header(headers, HEADER_CAPACITY) or "0"
    if not raw_capacity.isdigit() or int(raw_capacity) > MAX_CAPACITY:
        raise BadRequestError(f"{HEADER_CAPACITY}: expected an integer in 0..{MAX_CAPACITY}",
                              http_status=400)
    return AgentInfo(pod=PodIdentity(namespace, pod), agent_id=agent_id, containers=containers,
                     version=version, capacity=int(raw_capacity), user=user, peer=peer)


class AgentEndpoint:
    """The route handler for :data:`~podterm.upstream.agent.AGENTS_PATH`.

    Args:
        upstream: the agent upstream that runs the tunnels.
        counters: where refused upgrades are counted.
        draining: returns True once the gateway drains (then agents get 503).
    """

    __slots__ = ("upstream", "counters", "draining")

    def __init__(self, upstream: AgentUpstream, counters: GatewayCounters, *,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.upstream = upstream
        self.counters = counters
        self.draining = draining

    def __repr__(self) -> str:
        return f"<AgentEndpoint {self.upstream!r}>"

    def routes(self) -> list[Route]:
        # authorize=False: the interim "admins only" rule is replaced here by
        # the agents' own rule (group podterm:agents).
        return [Route.make("GET", re.escape(AGENTS_PATH), self, websocket=True,
                           authorize=False)]

    async def __call__(self, call: Call) -> Upgraded:
        request = call.request
        identity = request.identity
        assert identity is not None  # the router authenticated
        if not request.is_upgrade:
            raise HandshakeError(f"this endpoint needs a WebSocket upgrade (subprotocol "
                                 f"{SUBPROTOCOL})", 426, headers=[("Upgrade", "websocket")])
        if AGENTS_GROUP not in identity.groups:
            raise ForbiddenError(f"user {identity.user!r} may not register an agent: its "
                                 f"identity must be in the group {AGENTS_GROUP}")
        info = parse_registration(request.headers, user=identity.user, peer=request.peer)
        upgrade = parse_upgrade(request.h11_request)
        _, offered = extract_bearer_subprotocol(upgrade.subprotocols)
        if SUBPROTOCOL not in offered:
            raise HandshakeError(f"offer the WebSocket subprotocol {SUBPROTOCOL!r}", 400)
        if self.draining() or self.upstream.draining is not None:
            raise Unavailable("the gateway is draining; reconnect through the load balancer")
        try:
            ws = await accept_on(call.stream, call.conn, upgrade, SUBPROTOCOL,
                                 limits=TUNNEL_LIMITS,
                                 close_timeout_s=self.upstream.options.close_timeout_s)
        except HandshakeError as exc:
            GatewayCounters.bump(self.counters.handshake_failures, error_code(exc.http_status))
            return Upgraded(None)
        log.debug("agent.connect.started %s agent=%s user=%s peer=%s", info.pod, info.agent_id,
                  info.user, info.peer)
        return Upgraded(functools.partial(self.upstream.serve_tunnel, ws, info))


_T = TypeVar("_T")

#: Compare-and-set attempts to take over one session before the agent is asked to retry.
_CLAIM_ATTEMPTS = 3
#: Store calls in flight at once while an agent connects (one per stream it
#: announces): Redis pipelines them on one connection, so an echo agent with
#: 4,096 streams is checked in ~256 round trips, within the claim bound.
_CONCURRENCY = 16


async def _for_each(items: Sequence[_T], work: Callable[[_T], Awaitable[None]]) -> None:
    """``await work(item)`` for every item, :data:`_CONCURRENCY` at a time.

    Raises:
        PodtermError: the first a worker raised (the others are cancelled).
    """
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await work(item)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(_CONCURRENCY, len(items))):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        ours, rest = group.split(PodtermError)
        if rest is not None or ours is None:
            raise
        first: BaseException = ours
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


@dataclasses.dataclass(frozen=True, slots=True)
class AgentCoordinatorStatistics:
    """A snapshot of the coordinator (``/metrics``)."""

    leases_registered: int
    leases_renewed: int
    leases_released: int
    lease_failures: int  # store calls for leases that failed (retried at the next tick)
    sessions_adopted: int
    adoptions_refused: int  # announced streams closed: unknown or ended sessions
    adoptions_failed: int  # claimed, but no session could be made (the stream was let go)
    hand_overs: int  # agents found held by another peer: our state dropped


def spec_of(record: SessionRecord) -> StreamSpec:
    """The :class:`StreamSpec` a session record describes (what its agent stream runs)."""
    return StreamSpec(command=record.command, tty=record.tty, cols=record.cols,
                      rows=record.rows, env=dict(record.env), cwd=record.cwd,
                      namespace=record.namespace, pod=record.pod, container=record.container)


class AgentCoordinator:
    """Agents in a shared session store: leases, adoption, hand-over (module docstring).

    Args:
        upstream: the agent upstream; :meth:`run` installs this object as its hooks.
        store: the shared session store (SQLite or Redis), started.
        registry: where adopted sessions are made.
        holder: this gateway's peer address (``host:port``), read at each use:
            the same string the store mirror writes as a session's holder.
        lease_ttl_s: how long a lease lives unrenewed; renewed every third.
        grace_s: how long sessions of a previous run of this peer wait for
            their agent (the session grace period).

    Run it with ``await nursery.start(coordinator.run)`` after the registry
    and before the listeners accept.
    """

    def __init__(self, upstream: AgentUpstream, store: SessionStore, registry: SessionRegistry,
                 *, holder: Callable[[], str], lease_ttl_s: float,
                 grace_s: float = 600.0) -> None:
        if not lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be positive, got {lease_ttl_s!r}")
        self.upstream = upstream
        self.store = store
        self.registry = registry
        self.holder = holder
        self.lease_ttl_s = lease_ttl_s
        self.grace_s = grace_s
        # Sessions of our previous run awaiting their agent: id -> until (trio time).
        self._awaiting: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._poke = trio.Event()
        # Agents a store event says to check now (None: every one).
        self._poked: set[PodIdentity] | None = set()
        self._registered = 0
        self._renewed = 0
        self._released = 0
        self._lease_failures = 0
        self._adopted = 0
        self._refused = 0
        self._failed = 0
        self._hand_overs = 0

    def __repr__(self) -> str:
        return (f"<AgentCoordinator {self.store.backend} holder={self.holder()!r} "
                f"adopted={self._adopted}>")

    def statistics(self) -> AgentCoordinatorStatistics:
        return AgentCoordinatorStatistics(
            self._registered, self._renewed, self._released, self._lease_failures,
            self._adopted, self._refused, self._failed, self._hand_overs)

    def metric_families(self) -> list[MetricFamily]:
        st = self.statistics()
        return [
            counter("podterm_agent_leases_registered_total",
                    "Agent leases this gateway took (tunnel accepted, or re-taken).",
                    st.leases_registered),
            counter("podterm_agent_leases_renewed_total", "Agent lease renewals.",
                    st.leases_renewed),
            counter("podterm_agent_leases_released_total",
                    "Agent leases released when their connection ended.", st.leases_released),
            counter("podterm_agent_lease_failures_total",
                    "Lease calls the store failed (retried at the next renewal).",
                    st.lease_failures),
            counter("podterm_agent_sessions_adopted_total",
                    "Sessions of a dead gateway adopted here.", st.sessions_adopted),
            counter("podterm_agent_adoptions_refused_total",
                    "Announced streams of unknown or ended sessions (closed on the agent).",
                    st.adoptions_refused),
            counter("podterm_agent_adoptions_failed_total",
                    "Streams claimed but not made into a session.", st.adoptions_failed),
            counter("podterm_agent_hand_overs_total",
                    "Agents found held by another gateway (our state for them dropped).",
                    st.hand_overs),
        ]

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Renew leases and watch for agents moving, until cancelled; be the upstream's hooks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.upstream.hooks = self
            try:
                if self.store.backend != "sqlite":
                    # SQLite's subscription polls a table: the renewal tick is enough there.
                    nursery.start_soon(self._watch_events)
                # Before the listeners accept: a resuming client must never get a 404.
                with trio.move_on_after(self.lease_ttl_s):
                    await self._find_awaiting()
                task_status.started()
                await self._lease_loop()
            finally:
                if self.upstream.hooks is self:
                    self.upstream.hooks = None
                self._nursery = None

    async def _lease_loop(self) -> None:
        """Every third of the TTL, every agent we hold; at once, the ones an event names."""
        last_round = trio.current_time()
        while True:
            next_tick = last_round + self.lease_ttl_s / 3  # the TTL may be changed live
            with trio.move_on_at(next_tick):
                await self._poke.wait()
            poked, self._poked = self._poked, set()
            self._poke = trio.Event()
            states = self.upstream.tunnel_states()
            now = trio.current_time()
            if now < next_tick and poked is not None:
                # Woken early by the store: only the agents it named (events
                # never postpone the renewals).
                states = [(info, up) for info, up in states if info.pod in poked]
            else:
                last_round = now
                try:
                    await self._recheck_awaiting()
                except StoreError as exc:
                    log.info("agent.awaiting.check.failed: %s", exc)

            async def check(state: tuple[AgentInfo, bool]) -> None:
                info, link_up = state
                try:
                    await self._check(info, link_up)
                except StoreError as exc:
                    self._lease_failures += 1
                    log.info("agent.lease.failed %s: %s; retrying in %.1fs", info.pod, exc,
                             self.lease_ttl_s / 3)

            await _for_each(states, check)

    async def _check(self, info: AgentInfo, link_up: bool) -> None:
        """Renew the lease of a connected agent; hand over one held elsewhere now."""
        holder = self.holder()
        lease = AgentLease(info.agent_id, info.pod, holder)
        if link_up:
            if await self.store.renew_agent(lease, self.lease_ttl_s) is not None:
                self._renewed += 1
                return
            current = await self.store.lookup_agent(info.pod)
            if current is None or current.holder == holder:
                # Expired (the store was down, or lost its data), or another
                # process of the agent: we hold its tunnel, so the lease is ours.
                await self.store.register_agent(lease, self.lease_ttl_s)
                self._registered += 1
                return
        else:
            current = await self.store.lookup_agent(info.pod)
            if current is None or current.holder == holder:
                return  # away, and nobody else has it (yet): its streams wait here
        self._hand_over(info.pod, f"its agent is held by {current.holder} now")

    async def _find_awaiting(self) -> None:
        """Our previous run's agent sessions (same peer address): 503 until adopted."""
        holder = self.holder()
        try:
            records = await self.store.list_sessions()
        except StoreError as exc:
            log.warning("agent.awaiting.scan.failed: %s (lookups of sessions of this "
                        "peer's previous run answer 404 until their agent returns)", exc)
            return
        until = trio.current_time() + self.grace_s
        for record in records:
            if (record.holder == holder and record.upstream_kind == "agent"
                    and record.state != SessionState.CLOSED.value
                    and not self.registry.is_live(record.id)):
                self._awaiting[record.id] = until
                self.registry.expect(record.id)
        if self._awaiting:
            log.info("agent.awaiting %d sessions of this peer's previous run wait for their "
                     "agents", len(self._awaiting))

    async def _recheck_awaiting(self) -> None:
        """Stop answering 503 for awaited sessions adopted (here or elsewhere), ended, or old."""
        holder = self.holder()
        now = trio.current_time()
        for session_id, until in list(self._awaiting.items()):
            if self.registry.is_live(session_id):
                del self._awaiting[session_id]  # adopted here
                continue
            record = None if now >= until else await self.store.get_session(session_id)
            if (record is None or record.holder != holder
                    or record.state == SessionState.CLOSED.value):
                del self._awaiting[session_id]
                self.registry.unexpect(session_id)
            else:
                self.registry.expect(session_id)  # an unclaimed adoption may have cleared it

    def _hand_over(self, pod: PodIdentity, reason: str) -> None:
        if self.upstream.knows(pod):
            self.upstream.moved_away(pod, reason)
            self._hand_overs += 1

    async def _watch_events(self) -> None:
        """Check at once when a peer takes an agent we hold, or the store lost its data."""
        try:
            async with self.store.subscribe() as events:
                async for event in events:
                    if event.kind is EventKind.AGENT_MOVED:
                        if event.data.get("holder") == self.holder():
                            continue
                        try:
                            pod = PodIdentity.parse(event.subject)
                        except ValueError:
                            continue
                        if self._poked is not None and self.upstream.knows(pod):
                            self._poked.add(pod)
                            self._poke.set()
                    elif event.kind is EventKind.RESYNC:
                        self._poked = None  # leases may be gone: re-take them all now
                        self._poke.set()
        except StoreError as exc:
            # Without events the renewal tick still finds every move.
            log.warning("agent.lease.subscribe.failed: %s", exc)

    def session_moved(self, session: Session, holder: str) -> None:
        """The store mirror found ``session``'s record taken over by ``holder``."""
        spec = session.spec
        if session.upstream_kind != "agent" or not spec.namespace or not spec.pod:
            log.error("agent.session.moved %s: a %s session's record names %s as holder; "
                      "it keeps running here", session.id, session.upstream_kind, holder)
            return
        self._hand_over(PodIdentity(spec.namespace, spec.pod),
                        f"session {session.id} is held by {holder} now")

    # -------------------------------------------------------------- TunnelHooks

    async def connected(self, info: AgentInfo,
                        streams: Sequence[AnnouncedStream]) -> ConnectVerdict:
        """Take the agent's lease; claim the streams a dead peer left (module docstring).

        Raises:
            Unavailable: streams need the store and it is down (the agent retries).
        """
        holder = self.holder()
        lease = AgentLease(info.agent_id, info.pod, holder)
        previous: AgentLease | None = None
        store_ok = True
        try:
            previous = await self.store.lookup_agent(info.pod)
            await self.store.register_agent(lease, self.lease_ttl_s)
            self._registered += 1
        except StoreError as exc:
            store_ok = False
            self._lease_failures += 1
            log.warning("agent.lease.failed %s: %s; the tunnel is served, the lease is "
                        "taken at the next renewal", info.pod, exc)
        known = [a for a in streams if a.known]
        orphans = [a for a in streams if not a.known]
        if (known and store_ok
                and (previous is None or (previous.holder, previous.agent_id)
                     != (holder, info.agent_id))):
            # It may have been elsewhere since (the lease was not ours any more):
            # is what we hold of it still ours?
            try:
                stale = await self._stale(known, holder)
            except StoreError:
                stale = None  # cannot tell: our own state is the best we have
            if stale is not None:
                return ConnectVerdict(stale=stale)
        if not orphans:
            return ConnectVerdict()
        if not store_ok:
            raise Unavailable(f"{UNAVAILABLE_MESSAGE}: this agent's shells belong to "
                              "sessions of another gateway")
        claims: dict[int, StreamClaim] = {}
        closes: dict[int, str] = {}

        async def claim(a: AnnouncedStream) -> None:
            result = await self._claim(info, a, holder)
            if isinstance(result, str):
                self._refused += 1
                closes[a.stream_id] = result
            else:
                claims[a.stream_id] = result

        try:
            await _for_each(orphans, claim)
        except BaseException:
            for taken in claims.values():
                self.unclaimed(info, taken)
            raise
        return ConnectVerdict(claims=claims, closes=closes)

    async def _stale(self, known: Sequence[AnnouncedStream], holder: str) -> str | None:
        """Why our state of these streams is stale (a peer holds their sessions now), or None."""
        found: list[str] = []

        async def check(a: AnnouncedStream) -> None:
            if a.session is None or found:
                return
            record = await self.store.get_session(a.session)
            if record is not None and record.holder and record.holder != holder:
                found.append(f"session {a.session} is held by {record.holder} now")

        await _for_each(known, check)
        return found[0] if found else None

    async def _claim(self, info: AgentInfo, a: AnnouncedStream,
                     holder: str) -> StreamClaim | str:
        """Take over ``a``'s session by CAS; a reason string when it must be closed instead.

        Raises:
            Unavailable: the store is down, or the record kept changing.
        """
        session_id = a.session
        if session_id is None:
            return "the stream has no session label (an older gateway opened it)"
        try:
            for _ in range(_CLAIM_ATTEMPTS):
                record = await self.store.get_session(session_id)
                if record is None:
                    return f"session {session_id} is unknown to the session store"
                if record.state == SessionState.CLOSED.value:
                    return f"session {session_id} has ended"
                if record.upstream_kind != "agent" or record.target != info.pod:
                    return f"session {session_id} does not run in pod {info.pod}"
                if self.registry.is_live(session_id):
                    # Handed over a moment ago and still ending here: come back.
                    raise Unavailable(f"session {session_id} is still ending on this "
                                      "gateway; retry")
                claimed = dataclasses.replace(record, holder=holder)
                self.registry.expect(session_id)
                if await self.store.cas_session(session_id, record.version, claimed):
                    return StreamClaim(
                        stream_id=a.stream_id, out_from=self._resume_offset(record, a),
                        in_offset=a.in_acked, catch_up_to=a.out_offset,
                        spec=spec_of(record),
                        record=dataclasses.replace(claimed, version=record.version + 1),
                        previous_holder=record.holder)
                self.registry.unexpect(session_id)
        except StoreUnavailable as exc:
            self.registry.unexpect(session_id)
            raise Unavailable(f"{UNAVAILABLE_MESSAGE} ({exc})") from exc
        except StoreError as exc:
            self.registry.unexpect(session_id)
            raise Unavailable(f"session {session_id}: {exc}") from exc
        raise Unavailable(f"session {session_id}: its record kept changing; retry")

    def _resume_offset(self, record: SessionRecord, a: AnnouncedStream) -> int:
        """Where the adopted session's output starts.

        What the client had acknowledged (``writer_acked``: persisted at most
        a second late, so never ahead of what the client holds), or the
        agent's oldest byte if that is later (the client gets a ``gap``), and
        never more than one session ring before the agent's end (the session
        takes all of that in at once).
        """
        ring = self.registry.limits.ring_bytes
        start = max(record.writer_acked, a.out_start, a.out_offset - ring)
        return min(start, a.out_offset)

    def adopt(self, info: AgentInfo, claim: StreamClaim, stream: TunnelStream) -> None:
        """Make the claimed stream's session, in the background (never blocks)."""
        nursery = self._nursery
        if nursery is None:
            self.unclaimed(info, claim)
            self.upstream.let_go(stream, "this gateway is stopping")
            return
        nursery.start_soon(self._adopt, claim, stream)

    async def _adopt(self, claim: StreamClaim, stream: TunnelStream) -> None:
        try:
            await self.registry.adopt(claim.record, claim.spec, stream,
                                      out_offset=claim.out_from, in_offset=claim.in_offset,
                                      catch_up_to=claim.catch_up_to,
                                      previous_holder=claim.previous_holder)
        except Exception as exc:
            # Draining (or a bug): leave the shell to the agent; the gateway its
            # next connection reaches adopts it.
            self._failed += 1
            message = exc.message if isinstance(exc, PodtermError) else repr(exc)
            log.warning("agent.session.adopt.failed %s: %s", claim.record.id, message,
                        exc_info=not isinstance(exc, PodtermError))
            self.registry.unexpect(claim.record.id)
            self.upstream.let_go(stream, f"not adopted: {message}")
            return
        self._adopted += 1

    def unclaimed(self, info: AgentInfo, claim: StreamClaim) -> None:
        """A claim that will not be adopted: lookups of its id answer 404/410 again."""
        self.registry.unexpect(claim.record.id)

    async def disconnected(self, info: AgentInfo) -> None:
        """Release the lease (only if it is still this agent's with us)."""
        try:
            if await self.store.release_agent(AgentLease(info.agent_id, info.pod,
                                                         self.holder())):
                self._released += 1
        except StoreError as exc:
            self._lease_failures += 1
            log.info("agent.lease.release.failed %s: %s (it expires by itself)", info.pod, exc)
