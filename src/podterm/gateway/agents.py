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
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

from podterm.errors import BadRequestError, ForbiddenError, HandshakeError, Unavailable
from podterm.gateway.http import Upgraded, error_code
from podterm.gateway.router import Call, Route
from podterm.metrics import GatewayCounters
from podterm.net.wsconn import accept_on
from podterm.protocol.handshake import extract_bearer_subprotocol, parse_upgrade
from podterm.store.base import PodIdentity
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
)

__all__ = ["AgentEndpoint"]

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
