"""Peers: a request for a session another gateway process holds is served through it.

Every gateway process — a replica, or a worker of ``podterm serve --workers
N`` — is a *peer* with a **peer address** ``host:port`` (:attr:`Peers.address`):
where the other peers reach this process.  It is the string the store keeps
as ``SessionRecord.holder`` and ``AgentLease.holder`` (docs/ha.md, Peers).

Forwarding rule (:meth:`Peers.route`, called by the router once the caller is
authenticated and before it is authorized):

* ``GET``/``DELETE /api/v1/sessions/{id}`` and the attach upgrade
  ``/api/v1/sessions/{id}/attach``: a session this process does not know is
  looked up in the store; when its record names another holder (and is not
  closed) the request goes there;
* ``POST /api/v1/sessions`` for the agent upstream: when the store's live
  lease for the target pod names another holder, the create goes there;
* kubectl's ``/api/v1/namespaces/{ns}/pods/{pod}`` and its ``exec`` and
  ``attach``: when the pod's agent is not connected here and the store's
  live lease for it names another holder, the request goes there (the
  holder runs it on the agent upstream, gateway/kubeapi.py).

A session record that names *this* peer as holder but is not live here (the
process restarted at the same address, and the session's agent has not come
back yet) is answered ``503 unavailable`` "being recovered; retry" for an
agent session, until it is adopted (here or by another peer) or the session
grace period (:attr:`Peers.recovery_grace_s`) has passed since the record
was last written or this process started, whichever is later; the
coordinator's awaited sessions (``SessionRegistry.expect``) answer the same.

Anything else is served locally.  Other code calls :meth:`Peers.forward`
itself for its own cases.

The peer link (:meth:`Peers.forward`): the forwarder has authenticated the
user already (a failure never reaches the holder).  It dials the holder (TLS
when this gateway serves TLS, see :func:`peer_client_context`) and replays the
request head without the user's credentials (``Authorization`` and a
``bearer.podterm.*`` subprotocol are dropped) plus the ``X-Podterm-Peer-*``
headers: user, groups, the original client address, the time, the hop count
and ``X-Podterm-Peer-Auth`` = HMAC-SHA256 with the shared secret over the
method, the target and those values (:func:`peer_signature`).  The holder
believes the forwarded identity only when the HMAC verifies
(``hmac.compare_digest``) and the time is within :data:`MAX_SKEW_S`; anything
else is 401 with an ``auth.failure`` event (method ``peer``).  RBAC runs at
the holder with the forwarded identity, and its audit events carry the
original client's address.  A plain request is answered through this process
(``Connection: close`` to the holder); a WebSocket upgrade answered 101 is
spliced: two tasks copy bytes both ways through a bounded buffer, and both
sockets close when either side closes (close codes pass through: they are
only bytes here).  A request a peer forwarded is never forwarded again
(:data:`MAX_HOPS`): the store changed under it, and the client's retry will
find the new holder.

Errors (docs/protocol.md §2 bodies, answered before any upgrade): a holder
that cannot be reached is ``503 unavailable`` "session held by HOLDER,
unreachable; retry" (the client's resume loop retries); no
``--peer-secret-file`` is 503 naming the holder; a loop is 503; a holder that
refuses the peer credentials is 502.  Every forward is a ``peer.forward``
audit event with the holder and its outcome.

Workers (:class:`WorkerRole`): ``/metrics`` of any worker shows every
worker's series, labelled ``worker="i"``; the others' come over the peer link
(``GET /api/v1/peer/metrics``, signed like a forward, bounded by
:data:`METRICS_TIMEOUT_S`), and a worker that does not answer shows as
``podterm_worker_up{worker="i"} 0``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final
from urllib.parse import quote, unquote

import h11
import trio

from podterm.audit.events import Target
from podterm.auth.chain import AuthFailure, FailureReason
from podterm.auth.identity import Identity
from podterm.config import TLSConfig
from podterm.errors import (
    ConfigError,
    GoneError,
    NotFoundError,
    PodtermError,
    Unavailable,
    UpstreamError,
)
from podterm.gateway.api import validate_create
from podterm.gateway.handoff import HandoffRefused, handoff_path, send_connection
from podterm.gateway.http import Request, Response, Upgraded
from podterm.gateway.router import Call, Route
from podterm.metrics import MetricFamily, counter, gauge, labelled, render
from podterm.net.clientaddr import ClientAddress, PrefixedStream, Via
from podterm.net.h11client import AnswerClosed, AnswerTooLarge, read_body, read_head
from podterm.net.hostport import join_host_port, split_host_port
from podterm.protocol.handshake import extract_bearer_subprotocol
from podterm.session.registry import SessionRegistry
from podterm.store.base import PodIdentity, SessionStore, StoreError

if TYPE_CHECKING:
    from podterm.gateway.auditor import Auditor

__all__ = [
    "MAX_HOPS",
    "MAX_SKEW_S",
    "PEER_METHOD",
    "Peers",
    "WorkerRole",
    "load_peer_secret",
    "merge_families",
    "parse_peer_address",
    "peer_client_context",
    "peer_signature",
    "relabel",
]

log = logging.getLogger(__name__)

#: The ``Identity.method`` (and audit ``details.method``) of a forwarded identity.
PEER_METHOD: Final = "peer"
#: The user a peer signs its own requests as (a worker fetching another's metrics).
PEER_SYSTEM_USER: Final = "system:podterm:peer"
#: A forwarded request's time may differ from the holder's clock by this much
#: (seconds): wide enough for NTP-synchronized machines, narrow enough that a
#: captured request cannot be replayed for long.
MAX_SKEW_S: Final = 30.0
#: A request is forwarded at most once: the holder never forwards it again.
MAX_HOPS: Final = 1
#: The shortest shared secret accepted (bytes, after stripping whitespace).
MIN_SECRET_BYTES: Final = 16

_PREFIX: Final = "x-podterm-peer-"
H_USER: Final = "X-Podterm-Peer-User"
H_GROUPS: Final = "X-Podterm-Peer-Groups"
H_CLIENT: Final = "X-Podterm-Peer-Client-Addr"
H_TIME: Final = "X-Podterm-Peer-Time"
H_HOPS: Final = "X-Podterm-Peer-Hops"
H_AUTH: Final = "X-Podterm-Peer-Auth"

#: Bound on dialing a peer (TCP connect and TLS handshake), seconds.
CONNECT_TIMEOUT_S: Final = 3.0
#: Bound on a peer's answer head once the request is sent.  A create may start
#: a process on an agent before answering; 30 s is the agent's own open bound.
RESPONSE_TIMEOUT_S: Final = 30.0
#: Bound on fetching another worker's metrics: a scrape must not hang on one.
METRICS_TIMEOUT_S: Final = 2.0
#: Largest answer body relayed for a plain request (REST answers are small).
MAX_RESPONSE_BYTES: Final = 1024 * 1024
#: Largest peer answer head; as the gateway's own request-head bound.
MAX_HEAD_BYTES: Final = 64 * 1024
#: Bytes copied per read and direction on a spliced link: the bounded buffer.
SPLICE_BYTES: Final = 64 * 1024

#: Request headers never replayed: the user's credentials (the identity
#: travels signed instead), ours (a client cannot forge them through us), and
#: hop-by-hop framing this process re-does.
_DROP_REQUEST = frozenset({"authorization", "proxy-authorization", "content-length",
                           "transfer-encoding", "te", "trailer", "keep-alive",
                           "proxy-connection"})
#: Answer headers this process writes itself (serve_http) or that are hop-by-hop.
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                            "content-type", "server", "date", "x-request-id", "upgrade", "te",
                            "trailer"})


# ----------------------------------------------------------------- secrets


def load_peer_secret(path: str) -> bytes:
    """Read the shared secret (``--peer-secret-file``), surrounding whitespace stripped.

    Raises:
        ConfigError: the file cannot be read, or holds fewer than
            :data:`MIN_SECRET_BYTES` bytes.
    """
    try:
        with open(path, "rb") as fh:
            secret = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"--peer-secret-file: cannot read {path}: {exc.strerror or exc}"
                          ) from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"--peer-secret-file: {path} holds {len(secret)} bytes; a peer secret "
                          f"needs at least {MIN_SECRET_BYTES} (e.g. openssl rand -hex 32)")
    return secret


def peer_signature(secret: bytes, method: str, target: str, user: str, groups: str,
                   client: str, at: str, hops: str) -> str:
    """HMAC-SHA256 (hex) of one forwarded request's signed parts.

    The values are the header values as sent (user and groups percent-encoded),
    one per line after a version tag, so no value can be shifted into another.
    """
    message = "\n".join(("podterm-peer-v1", method, target, user, groups, client, at, hops))
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()


def parse_peer_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` into ``(host, port)``, the port 1-65535.

    Raises:
        ValueError: not a peer address.
    """
    try:
        host, port = split_host_port(address)
    except ValueError:
        raise ValueError(f"not a peer address (HOST:PORT, IPv6 in brackets): {address!r}") \
            from None
    if not 0 < port < 65536:
        raise ValueError(f"not a peer address (HOST:PORT): {address!r}")
    return host, port


#: The peer address text of a host and port (IPv6 in brackets).
format_peer_address = join_host_port


def _parse_client(text: str) -> ClientAddress | None:
    """``X-Podterm-Peer-Client-Addr`` (``ADDR; via=VIA``) back into a ClientAddress."""
    addr, _, via_part = text.partition("; via=")
    try:
        via = Via(via_part) if via_part else Via.SOCKET
    except ValueError:
        return None
    host, port = addr, None
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif addr.count(":") == 1:
        host, _, port = addr.partition(":")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    if port is not None and not port.isdigit():
        return None
    return ClientAddress(ip, int(port) if port else None, via)


def peer_client_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """How this gateway verifies a peer it dials; None when it does not serve TLS.

    Peers are assumed configured alike: a gateway that serves TLS dials its
    peers with TLS.  The peer's certificate must chain to a certificate in
    this gateway's own ``--tls-cert`` file (the replicas' shared certificate,
    or the intermediate that issued them: partial chains are accepted) or to
    ``--client-ca`` (a development PKI issues both from one CA).  Host names
    are not checked: peers are dialed by their advertised address, which
    certificates seldom name (pod IPs); the chain is.

    Raises:
        ConfigError: a file cannot be loaded.
    """
    if not tls.enabled or tls.cert_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    for flag, path in (("--tls-cert", tls.cert_file), ("--client-ca", tls.client_ca_file)):
        if path is None:
            continue
        try:
            ctx.load_verify_locations(cafile=os.fspath(path))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{flag}: cannot load {path} to verify peers: {exc}") from exc
    return ctx


# ----------------------------------------------------------------- metrics


def relabel(families: Iterable[MetricFamily], label: str, value: str) -> list[MetricFamily]:
    """``families`` with ``label=value`` added to every sample."""
    out = []
    for fam in families:
        samples = tuple((MappingProxyType({**labels, label: value}), v)
                        for labels, v in fam.samples)
        out.append(dataclasses.replace(fam, samples=samples))
    return out


def merge_families(groups: Iterable[Sequence[MetricFamily]]) -> list[MetricFamily]:
    """One family per name, its samples from every group in order (first help and type win)."""
    merged: dict[str, MetricFamily] = {}
    for families in groups:
        for fam in families:
            have = merged.get(fam.name)
            if have is None:
                merged[fam.name] = fam
                continue
            if have.suffixes or fam.suffixes:
                suffixes = ((have.suffixes or ("",) * len(have.samples))
                            + (fam.suffixes or ("",) * len(fam.samples)))
            else:
                suffixes = ()
            merged[fam.name] = dataclasses.replace(have, samples=have.samples + fam.samples,
                                                   suffixes=suffixes)
    return list(merged.values())


def _families_json(families: Iterable[MetricFamily]) -> bytes:
    return json.dumps([{"name": f.name, "kind": f.kind, "help": f.help,
                        "samples": [[dict(labels), v] for labels, v in f.samples],
                        "suffixes": list(f.suffixes)} for f in families],
                      separators=(",", ":")).encode("utf-8")


def _families_from_json(data: bytes) -> list[MetricFamily]:
    """Inverse of :func:`_families_json`; ``ValueError`` on anything malformed."""
    raw = json.loads(data)
    if not isinstance(raw, list):
        raise ValueError("expected a list of families")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise ValueError("a family must be an object")
        name, kind, help_ = item.get("name"), item.get("kind"), item.get("help")
        samples, suffixes = item.get("samples"), item.get("suffixes", [])
        if not (isinstance(name, str) and isinstance(kind, str) and isinstance(help_, str)
                and isinstance(samples, list) and isinstance(suffixes, list)):
            raise ValueError("a family needs name, kind, help and samples")
        parsed: list[tuple[Mapping[str, str], float]] = []
        for sample in samples:
            if not (isinstance(sample, list) and len(sample) == 2
                    and isinstance(sample[0], dict)
                    and all(isinstance(k, str) and isinstance(v, str)
                            for k, v in sample[0].items())
                    and isinstance(sample[1], int | float) and not isinstance(sample[1], bool)):
                raise ValueError(f"{name}: malformed sample")
            parsed.append((MappingProxyType(dict(sample[0])), sample[1]))
        if suffixes and (len(suffixes) != len(parsed)
                         or not all(isinstance(s, str) for s in suffixes)):
            raise ValueError(f"{name}: malformed suffixes")
        out.append(MetricFamily(name, kind, help_, tuple(parsed), tuple(suffixes)))
    return out


# ------------------------------------------------------------------ workers


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process is worker ``index`` of ``count`` under ``podterm serve --workers``.

    Attributes:
        index: 0-based; the ``worker`` label of its metric series.
        count: how many workers the supervisor runs.
        peers_file: JSON the supervisor rewrites as workers (re)start:
            ``{"workers": {"0": "127.0.0.1:40101", ...}}``, their peer addresses.
        secret: the peer secret (generated by the supervisor unless
            ``--peer-secret-file`` names one); never in argv or the environment.
    """

    index: int
    count: int
    peers_file: str
    secret: bytes = field(repr=False)


# -------------------------------------------------------------------- peers


class Peers:
    """This process as a peer: forwarding out, peer identities in, worker metrics.

    Args:
        registry: the local sessions (a session found here is never forwarded).
        store: where other peers' sessions and agent leases are found.
        secret: the shared peer secret; None turns forwarding off.
        tls: the client context peers are dialed with (:func:`peer_client_context`).
        auditor: where ``peer.forward`` and refused peer requests are audited.
        draining: whether this gateway drains (then nothing new is forwarded).
        worker: set when this process is one of ``--workers N``.
        clock: wall-clock seconds (the signed time; tests inject one).
        recovery_grace_s: how long a session record naming this peer, not
            live here, answers 503 "being recovered" (the session grace period).

    :attr:`agent_here` says whether a pod's agent is connected to this process
    (the gateway sets it to its agent upstream's ``is_connected``).
    :attr:`address` is set once the listeners are bound (``Gateway._serve``);
    :attr:`local_families` once the gateway's metrics exist.
    """

    def __init__(self, registry: SessionRegistry, store: SessionStore, *,
                 secret: bytes | None, tls: ssl.SSLContext | None = None,
                 auditor: Auditor | None = None,
                 draining: Callable[[], bool] = lambda: False,
                 worker: WorkerRole | None = None,
                 clock: Callable[[], float] = time.time,
                 recovery_grace_s: float = 600.0) -> None:
        self.registry = registry
        self.store = store
        self.secret = secret
        self.tls = tls
        self.auditor = auditor
        self.draining = draining
        self.worker = worker
        self.clock = clock
        self.recovery_grace_s = recovery_grace_s
        self._started_at = clock()
        #: Whether a pod's agent is connected to this process (then it is served here).
        self.agent_here: Callable[[PodIdentity], bool] = lambda pod: False
        #: This process's peer address (``host:port``); "" until bound.
        self.address = ""
        #: The gateway's own metric families (for a peer's metrics fetch).
        self.local_families: Callable[[], list[MetricFamily]] = list
        self._links: set[trio.CancelScope] = set()
        self._closing = False
        self.forwards: dict[str, int] = {}
        self.peer_requests = 0
        self.auth_failures = 0
        self.bytes_spliced = 0
        self.handoffs = 0
        self._siblings: dict[str, int] = {}  # worker peer address -> index (peers.json)
        self._siblings_read_at = -math.inf

    def __repr__(self) -> str:
        return (f"<Peers {self.address or 'unbound'} "
                f"{'forwarding' if self.secret else 'no secret'} links={len(self._links)}>")

    def set_address(self, address: str) -> None:
        """Set this process's peer address once bound (the holder the store records)."""
        self.address = address
        host = parse_peer_address(address)[0]
        if self.secret is not None and self.is_shared and host in ("0.0.0.0", "::"):
            log.warning("peer.address %s: other peers cannot dial a wildcard address; set "
                        "--advertise HOST:PORT to where they reach this gateway", address)

    @property
    def is_shared(self) -> bool:
        """Whether another process can hold sessions this one is asked for (a shared store)."""
        return self.store.backend != "memory"

    # --------------------------------------------------------- holder side

    def authenticate(self, request: Request) -> Identity | None:
        """The forwarded identity of a peer's request; None for a request no peer signed.

        On success ``request.client`` becomes the original client's address,
        so logs, audit and limits see who the user is, not the forwarder.

        Raises:
            AuthFailure: method ``peer``, 401: the request carries peer headers
                but no secret is configured here, the HMAC does not verify, the
                time is more than :data:`MAX_SKEW_S` off, or a header is malformed.
        """
        headers = request.headers
        if not any(name.startswith(_PREFIX) for name in headers):
            return None
        identity, client = self._verify(request)
        if client is not None:
            request.client = client
            request.peer = str(client)
        self.peer_requests += 1
        return identity

    def _fail(self, reason: FailureReason, message: str) -> AuthFailure:
        self.auth_failures += 1
        log.warning("peer.auth.failed: %s", message)
        return AuthFailure(reason, message, method=PEER_METHOD)

    def _verify(self, request: Request) -> tuple[Identity, ClientAddress | None]:
        headers = request.headers
        if self.secret is None:
            raise self._fail(FailureReason.REJECTED, "peer request refused: peer forwarding is "
                             "not configured on this gateway (--peer-secret-file)")
        names = (H_USER, H_GROUPS, H_CLIENT, H_TIME, H_HOPS, H_AUTH)
        values = [headers.get(name.lower()) for name in names]
        if any(v is None for v in values):
            raise self._fail(FailureReason.MALFORMED, "peer request without all of its "
                             "X-Podterm-Peer-* headers")
        user, groups, client, at, hops, given = (v or "" for v in values)
        expected = peer_signature(self.secret, request.method, request.target, user, groups,
                                  client, at, hops)
        if not hmac.compare_digest(expected.encode("ascii"),
                                   given.encode("latin-1", "replace")):
            raise self._fail(FailureReason.BAD_SIGNATURE,
                             "peer request signature does not verify (do the peers share "
                             "--peer-secret-file?)")
        try:
            sent_at = float(at)
        except ValueError:
            sent_at = float("nan")
        if not abs(self.clock() - sent_at) <= MAX_SKEW_S:
            raise self._fail(FailureReason.EXPIRED, f"peer request time is more than "
                             f"{MAX_SKEW_S:g} s off this gateway's clock (are the peers' "
                             "clocks synchronized?)")
        if not hops.isdigit() or not 1 <= int(hops) <= MAX_HOPS:
            raise self._fail(FailureReason.MALFORMED, f"peer request hop count {hops!r}")
        name = unquote(user)
        if not name:
            raise self._fail(FailureReason.MALFORMED, "peer request without a user")
        group_names = tuple(unquote(g) for g in groups.split(",") if g)
        return Identity(user=name, uid="", groups=group_names, method=PEER_METHOD), \
            _parse_client(client)

    # ------------------------------------------------------ forwarder side

    async def route(self, call: Call) -> Response | Upgraded | None:
        """Forward ``call`` if another peer holds what it names; None: serve it here.

        Raises:
            Unavailable: 503 when the store cannot say where the session is,
                or as :meth:`forward`.
        """
        if not self.is_shared:
            return None
        request = call.request
        session_id = call.params.get("id")
        if session_id is not None and request.path.startswith("/api/v1/sessions/"):
            return await self._route_session(call, session_id)
        if request.method == "POST" and request.path.rstrip("/") == "/api/v1/sessions":
            return await self._route_create(call)
        namespace, pod = call.params.get("namespace"), call.params.get("pod")
        if namespace is not None and pod is not None and request.path.startswith("/api/v1/"):
            return await self._route_pod(call, namespace, pod)
        return None

    async def _route_session(self, call: Call, session_id: str) -> Response | Upgraded | None:
        try:
            self.registry.get(session_id)
            return None  # live here
        except GoneError:
            return None  # ended here: the local handler says 410
        except NotFoundError:
            pass
        try:
            record = await self.store.get_session(session_id)
        except StoreError as exc:
            log.warning("peer.lookup.failed %s: %s", session_id, exc)
            raise Unavailable("session store unavailable; retry") from exc
        if record is None or not record.holder or record.state == "closed":
            return None
        if record.holder == self.address:
            # Ours, not live, not ended here: a session of this address's
            # previous run whose agent has not come back (yet).  A 404 would end
            # the client's resume loop; the agent may still bring it back here
            # or to a peer (docs/ha.md, "Adoption").
            since = max(record.updated_at, self._started_at)
            if (record.upstream_kind == "agent"
                    and self.clock() - since < self.recovery_grace_s):
                raise Unavailable(f"session {session_id} is being recovered; retry")
            return None
        return await self.forward(call, record.holder)

    async def _route_pod(self, call: Call, namespace: str,
                         pod_name: str) -> Response | Upgraded | None:
        """kubectl's pod GET, exec and attach: to the holder of the pod's agent, if another."""
        try:
            pod = PodIdentity(namespace, pod_name)
        except ValueError:
            return None  # the local handler answers
        if self.agent_here(pod):
            return None
        try:
            lease = await self.store.lookup_agent(pod)
        except StoreError as exc:
            log.warning("peer.lookup.failed %s: %s", pod, exc)
            raise Unavailable("session store unavailable; retry") from exc
        if lease is None or lease.holder == self.address:
            return None
        return await self.forward(call, lease.holder)

    async def _route_create(self, call: Call) -> Response | Upgraded | None:
        registry = self.registry
        try:
            spec, upstream = validate_create(call.request.json(),
                                             upstreams=frozenset(registry.upstreams),
                                             default_upstream=registry.default_upstream)
        except PodtermError:
            return None  # the local handler answers the 400
        if upstream != "agent" or not spec.namespace or not spec.pod:
            return None
        try:
            lease = await self.store.lookup_agent(PodIdentity(spec.namespace, spec.pod))
        except StoreError as exc:
            log.warning("peer.lookup.failed %s/%s: %s", spec.namespace, spec.pod, exc)
            raise Unavailable("session store unavailable; retry") from exc
        if lease is None or lease.holder == self.address:
            return None
        return await self.forward(call, lease.holder)

    def _count(self, outcome: str) -> None:
        self.forwards[outcome] = self.forwards.get(outcome, 0) + 1

    async def _audit(self, request: Request, holder: str, outcome: str, *,
                     http_status: int | None = None, reason: str | None = None) -> None:
        self._count(outcome)
        if self.auditor is None:
            return
        from podterm.gateway.auditor import target_of

        await self.auditor.emit("peer.forward", outcome=outcome,
                                target=target_of(request) or Target(), holder=holder,
                                method=request.method, path=request.path,
                                http_status=http_status, reason=reason)

    async def forward(self, call: Call, holder: str) -> Response | Upgraded:
        """Serve ``call`` through the peer ``holder`` (see the module docstring).

        The caller has authenticated the user (``call.request.identity``).

        Returns:
            The holder's answer to a plain request, or the spliced link of an
            upgrade it accepted.

        Raises:
            Unavailable: 503 before any upgrade: forwarding is not configured,
                this gateway drains, the request was forwarded here already
                (loop), or the holder cannot be reached.
            UpstreamError: 502: the holder answered something that is not HTTP,
                or refused this gateway's peer credentials.
        """
        request = call.request
        identity = request.identity
        assert identity is not None  # the router authenticated
        if self.secret is None:
            await self._audit(request, holder, "rejected", http_status=503,
                              reason="peer forwarding is not configured")
            raise Unavailable(f"session held by {holder}; peer forwarding is not configured on "
                              "this gateway (set --peer-secret-file on every peer)")
        if identity.method == PEER_METHOD:
            await self._audit(request, holder, "rejected", http_status=503,
                              reason="forwarding loop refused")
            raise Unavailable(f"session held by {holder} according to the store, but this "
                              f"request was forwarded here by a peer already (at most "
                              f"{MAX_HOPS} hop); retry")
        if self.draining() or self._closing:
            await self._audit(request, holder, "rejected", http_status=503,
                              reason="draining")
            raise Unavailable("the gateway is draining; reconnect through the load balancer")
        if request.is_upgrade and self.worker is not None:
            handed = await self._hand_off(call, holder, identity)
            if handed is not None:
                return handed
        unreachable = f"session held by {holder}, unreachable; retry"
        stream: trio.abc.Stream | None = None
        body = b""
        hconn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    stream = await self._dial(holder)
                with trio.fail_after(RESPONSE_TIMEOUT_S):
                    await stream.send_all(self._request_bytes(hconn, request, identity))
                    event = await read_head(stream, hconn)
                    if isinstance(event, h11.Response):
                        body = await read_body(stream, hconn, limit=MAX_RESPONSE_BYTES)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError,
                    trio.ClosedResourceError, AnswerClosed) as exc:
                log.warning("peer.forward.failed %s %s to %s: %s", request.method, request.path,
                            holder, _describe(exc))
                await self._audit(request, holder, "error", http_status=503,
                                  reason=f"unreachable: {_describe(exc)}")
                raise Unavailable(unreachable) from None
            except (h11.ProtocolError, AnswerTooLarge) as exc:
                await self._audit(request, holder, "error", http_status=502,
                                  reason=f"bad answer: {exc}")
                raise UpstreamError(f"session held by {holder}, which answered something that "
                                    f"is not a valid HTTP answer; retry") from None
            if isinstance(event, h11.InformationalResponse):  # 101: the upgrade was accepted
                if not request.is_upgrade:
                    await self._audit(request, holder, "error", http_status=502,
                                      reason="101 to a request that asked no upgrade")
                    raise UpstreamError(f"session held by {holder}, which switched protocols "
                                        "unasked; retry")
                upgraded = await self._accept(call, stream, hconn, event)
                stream = None  # the splice owns it now
                await self._audit(request, holder, "success", http_status=101)
                return upgraded
            if event.status_code == 401:
                # The user authenticated here; a 401 there is about our peer headers.
                await self._audit(request, holder, "error", http_status=401,
                                  reason="the holder refused the peer credentials")
                raise UpstreamError(f"session held by {holder}, which refused this gateway's "
                                    "peer credentials (do all peers share --peer-secret-file "
                                    "and synchronized clocks?)")
            await self._audit(request, holder, "success", http_status=event.status_code)
            return _relayed(event, body)
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)

    async def _hand_off(self, call: Call, holder: str, identity: Identity) -> Upgraded | None:
        """Give a sibling worker the client's socket itself (:mod:`podterm.gateway.handoff`).

        Returns None, having changed nothing, when the connection cannot be
        handed off (TLS, the holder is no worker of this machine, its hand-off
        socket refuses): the caller splices instead.
        """
        assert self.worker is not None
        sock = _plain_socket(call.stream)
        if sock is None:
            return None
        index = await self._sibling_index(holder)
        if index is None or index == self.worker.index:
            return None
        request = call.request
        trailing, _ = call.conn.trailing_data
        hconn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        payload = self._request_bytes(hconn, request, identity) + bytes(trailing)
        path = handoff_path(os.path.dirname(self.worker.peers_file), index)
        try:
            acked = await send_connection(path, sock, payload,
                                          client=(request.client.ip, request.client.via.value))
        except HandoffRefused as exc:
            log.info("peer.handoff.refused %s to worker %d: %s; splicing", request.path,
                     index, exc)
            return None
        self.handoffs += 1
        await self._audit(request, holder, "success",
                          reason=f"connection handed to worker {index}"
                          + ("" if acked else " (no acknowledgement)"))
        return Upgraded(None)  # serve_http closes this process's copy of the socket

    async def _sibling_index(self, holder: str) -> int | None:
        """The index of the worker whose peer address is ``holder`` (None: not a sibling).

        ``peers.json`` is re-read when ``holder`` is unknown (a worker restarted
        on a new port), at most once a second.
        """
        assert self.worker is not None
        index = self._siblings.get(holder)
        if index is None and trio.current_time() - self._siblings_read_at >= 1.0:
            self._siblings_read_at = trio.current_time()
            self._siblings = {address: i for i, address
                              in (await self._worker_addresses(self.worker)).items()}
            index = self._siblings.get(holder)
        return index

    async def _dial(self, holder: str) -> trio.abc.Stream:
        host, port = parse_peer_address(holder)
        tcp = await trio.open_tcp_stream(host, port)
        if self.tls is None:
            return tcp
        tls = trio.SSLStream(tcp, self.tls, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return tls

    def _signed(self, method: str, target: str, user: str, groups: Sequence[str],
                client: str) -> list[tuple[str, str]]:
        """The ``X-Podterm-Peer-*`` headers of one request this process sends a peer."""
        assert self.secret is not None
        user_h = quote(user, safe="")
        groups_h = ",".join(quote(g, safe="") for g in groups)
        at = f"{self.clock():.3f}"
        hops = str(MAX_HOPS)
        auth = peer_signature(self.secret, method, target, user_h, groups_h, client, at, hops)
        return [(H_USER, user_h), (H_GROUPS, groups_h), (H_CLIENT, client), (H_TIME, at),
                (H_HOPS, hops), (H_AUTH, auth)]

    def _request_bytes(self, hconn: h11.Connection, request: Request,
                       identity: Identity) -> bytes:
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in request.h11_request.headers:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            if name in _DROP_REQUEST or name.startswith(_PREFIX):
                continue
            if name == "connection" and not request.is_upgrade:
                continue  # replaced by close: one request per peer connection
            if name == "sec-websocket-protocol":
                offered = [p.strip() for p in value.split(",") if p.strip()]
                _, others = extract_bearer_subprotocol(offered)  # the token stays here
                if others:
                    headers.append((name, ", ".join(others)))
                continue
            headers.append((name, value))
        if not request.is_upgrade:
            headers.append(("connection", "close"))
        body = request.body
        if body or request.method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", str(len(body))))
        client = f"{request.client}; via={request.client.via.value}"
        headers += self._signed(request.method, request.target, identity.user,
                                identity.groups, client)
        out = hconn.send(h11.Request(method=request.method, target=request.target,
                                     headers=headers)) or b""
        if body:
            out += hconn.send(h11.Data(data=body)) or b""
        return out + (hconn.send(h11.EndOfMessage()) or b"")

    async def _accept(self, call: Call, stream: trio.abc.Stream, hconn: h11.Connection,
                      event: h11.InformationalResponse) -> Upgraded:
        """Pass the holder's 101 to the client and return the splice."""
        try:
            data = call.conn.send(h11.InformationalResponse(
                status_code=101, headers=event.headers, reason=event.reason)) or b""
            await call.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            await trio.aclose_forcefully(stream)
            await trio.aclose_forcefully(call.stream)
            return Upgraded(None)
        to_holder, _ = call.conn.trailing_data  # the client's bytes after its request
        to_client, _ = hconn.trailing_data  # the holder's after its 101 (its hello)
        client = call.stream

        async def run() -> None:
            await self._splice(client, stream, bytes(to_holder), bytes(to_client))

        return Upgraded(run)

    async def _splice(self, client: trio.abc.Stream, holder: trio.abc.Stream,
                      to_holder: bytes, to_client: bytes) -> None:
        """Copy bytes both ways until either side closes; then close both.

        Resource handling: both streams are closed before this returns, also
        when :meth:`close_links` cancels it.
        """
        scope = trio.CancelScope()
        self._links.add(scope)
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    done = nursery.cancel_scope
                    nursery.start_soon(self._pump, client, holder, to_holder, done)
                    nursery.start_soon(self._pump, holder, client, to_client, done)
        finally:
            self._links.discard(scope)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(holder)
                await trio.aclose_forcefully(client)

    async def _pump(self, src: trio.abc.Stream, dst: trio.abc.Stream, first: bytes,
                    done: trio.CancelScope) -> None:
        """One direction: at most :data:`SPLICE_BYTES` in flight; the end of either ends both."""
        try:
            if first:
                await dst.send_all(first)
            while True:
                data = await src.receive_some(SPLICE_BYTES)
                if not data:
                    return
                await dst.send_all(data)
                self.bytes_spliced += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            done.cancel()

    def close_links(self) -> None:
        """Drain: cut every spliced link now and forward nothing more.

        The clients see their connection drop and resume through the load
        balancer (at once: their resume loop's first retry), which a link
        through a draining process could not offer them.
        """
        self._closing = True
        for scope in list(self._links):
            scope.cancel()

    # ------------------------------------------------------------- metrics

    def metric_families(self) -> list[MetricFamily]:
        """``podterm_peer_*``: forwards by outcome, spliced links, peer requests taken."""
        return [
            labelled("podterm_peer_forwards_total", "counter",
                     "Requests forwarded to the peer holding their session, by outcome.",
                     "outcome", {k: self.forwards.get(k, 0)
                                 for k in ("success", "rejected", "error")}),
            gauge("podterm_peer_links", "WebSocket links spliced through to a peer now.",
                  len(self._links)),
            counter("podterm_peer_spliced_bytes_total",
                    "Bytes copied through spliced peer links, both directions.",
                    self.bytes_spliced),
            counter("podterm_peer_handoffs_total",
                    "WebSocket connections handed to the sibling worker holding their session "
                    "(the socket itself, SCM_RIGHTS).", self.handoffs),
            counter("podterm_peer_requests_total",
                    "Requests a peer forwarded here, accepted.", self.peer_requests),
            counter("podterm_peer_auth_failures_total",
                    "Peer requests refused: bad signature, stale time or no secret.",
                    self.auth_failures),
        ]

    def routes(self) -> list[Route]:
        """``GET /api/v1/peer/metrics``: this process's series, for another worker's scrape."""
        return [Route.make("GET", r"/api/v1/peer/metrics", self._peer_metrics, public=True)]

    async def _peer_metrics(self, call: Call) -> Response:
        request = call.request
        try:
            identity, _ = self._verify(request)
        except AuthFailure as exc:
            if self.auditor is not None:
                await self.auditor.access_refused(request, exc)
            raise
        if identity.user != PEER_SYSTEM_USER:
            raise self._fail(FailureReason.REJECTED, "peer metrics are for peers only")
        return Response(200, _families_json(self._own_families()), "application/json",
                        (("Cache-Control", "no-store"),))

    def _own_families(self) -> list[MetricFamily]:
        families = self.local_families()
        if self.worker is not None:
            families = relabel(families, "worker", str(self.worker.index))
        return families

    async def metrics_text(self) -> str:
        """The ``/metrics`` text: this process's series, and with workers every worker's.

        A worker that does not answer within :data:`METRICS_TIMEOUT_S` (or is
        not running) shows as ``podterm_worker_up{worker="i"} 0``.
        """
        own = self._own_families()
        role = self.worker
        if role is None:
            return render(own)
        addresses = await self._worker_addresses(role)
        found: dict[int, list[MetricFamily]] = {}

        async def fetch(index: int, address: str) -> None:
            with trio.move_on_after(METRICS_TIMEOUT_S):
                try:
                    found[index] = await self._fetch_metrics(address)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                        h11.ProtocolError, ValueError, AnswerClosed, AnswerTooLarge) as exc:
                    log.info("peer.metrics.failed worker %d at %s: %s", index, address,
                             _describe(exc))

        async with trio.open_nursery() as nursery:
            for index in range(role.count):
                address = addresses.get(index)
                if index != role.index and address:
                    nursery.start_soon(fetch, index, address)
        up = {str(i): 1 if i == role.index or i in found else 0 for i in range(role.count)}
        groups = [own, *(found[i] for i in sorted(found))]
        families = merge_families(groups)
        families.append(labelled("podterm_worker_up", "gauge",
                                 "1 while worker i answers this scrape (0: not running or "
                                 "not answering).", "worker", up))
        return render(families)

    async def _worker_addresses(self, role: WorkerRole) -> dict[int, str]:
        def read() -> dict[int, str]:
            try:
                with open(role.peers_file, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError) as exc:
                log.info("peer.workers.unknown: %s", exc)
                return {}
            workers = data.get("workers") if isinstance(data, dict) else None
            if not isinstance(workers, dict):
                return {}
            return {int(k): v for k, v in workers.items()
                    if isinstance(k, str) and k.isdigit() and isinstance(v, str)}

        return await trio.to_thread.run_sync(read)

    async def _fetch_metrics(self, address: str) -> list[MetricFamily]:
        target = "/api/v1/peer/metrics"
        hconn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        headers = [("host", address), ("connection", "close"),
                   *self._signed("GET", target, PEER_SYSTEM_USER, (), self.address)]
        stream = await self._dial(address)
        try:
            await stream.send_all((hconn.send(h11.Request(method="GET", target=target,
                                                          headers=headers)) or b"")
                                  + (hconn.send(h11.EndOfMessage()) or b""))
            event = await read_head(stream, hconn)
            if not isinstance(event, h11.Response) or event.status_code != 200:
                raise ValueError(f"answered {getattr(event, 'status_code', '?')}")
            return _families_from_json(await read_body(stream, hconn, limit=16 * 1024 * 1024))
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


def _plain_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under ``stream`` if nothing but bytes already read sits on it."""
    if type(stream) is PrefixedStream and not stream.pending:
        stream = stream.inner
    if type(stream) is trio.SocketStream:
        return stream.socket
    return None


# ------------------------------------------------------------ HTTP client


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    return f"{text}: {cause}" if cause is not None and str(cause) else text


def _relayed(event: h11.Response, body: bytes) -> Response:
    """The holder's answer as this process's :class:`Response`."""
    content_type = "application/json"
    headers: list[tuple[str, str]] = []
    for raw_name, raw_value in event.headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "content-type":
            content_type = value
        elif name not in _DROP_RESPONSE:
            headers.append((name, value))
    return Response(event.status_code, body, content_type, tuple(headers))
