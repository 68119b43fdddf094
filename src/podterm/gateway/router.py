"""Method + path → handler, with authentication in front of every handler.

A :class:`Router` is a list of :class:`Route`\\ s, tried in order.  For each
request it:

1. finds the routes whose path pattern matches (none: ``404 not_found``) and
   among them the one for the method (none: ``405`` with ``Allow``);
2. unless the route is ``public``, authenticates the bearer token — the
   ``Authorization`` header, or on a WebSocket upgrade the
   ``bearer.podterm.<b64url>`` subprotocol carrier (docs/protocol.md §1) —
   or, without a token over TLS, a verified client certificate (CN = user,
   O = groups); then applies the interim authorization rule
   (``podterm:admins`` only).  Failures
   are 401/403 answered *before* any handler runs, so before any upgrade;
3. calls the handler with the request (``request.identity`` set), the path
   parameters, and the connection (stream and h11 state, for upgrades).

Refused WebSocket upgrades are counted in ``handshake_failures`` by reason
(the §2 error code), wherever in the chain they were refused.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import h11
import trio

from podterm.auth.authn import TokenAuthenticator, authorize, bearer_from_headers
from podterm.auth.identity import Identity
from podterm.errors import PodtermError
from podterm.gateway.http import Request, Response, Upgraded, error_code, error_response
from podterm.metrics import GatewayCounters
from podterm.net.tls import peer_identity
from podterm.protocol.handshake import extract_bearer_subprotocol

__all__ = ["Call", "Route", "Router", "RouteHandler"]


@dataclass(frozen=True, slots=True)
class Call:
    """What a route handler gets.

    Attributes:
        request: the request; ``identity`` is set unless the route is public.
        params: the named groups of the route's path pattern.
        stream: the connection, for handlers that upgrade it.
        conn: its h11 state, for the same.
    """

    request: Request
    params: dict[str, str]
    stream: trio.abc.Stream
    conn: h11.Connection


RouteHandler = Callable[[Call], Awaitable[Response | Upgraded]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint.

    Attributes:
        methods: the methods it answers (``HEAD`` is implied by ``GET``).
        pattern: a full-match regular expression over the decoded path, with
            named groups for parameters.
        handler: the coroutine function to call.
        public: True skips authentication (health checks, metrics, the page).
        websocket: True for upgrade endpoints (refusals count as handshake failures).
    """

    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: RouteHandler
    public: bool = False
    websocket: bool = False

    @classmethod
    def make(cls, methods: str | Sequence[str], pattern: str, handler: RouteHandler, *,
             public: bool = False, websocket: bool = False) -> Route:
        """Build a route; ``pattern`` is compiled and anchored."""
        names = {methods} if isinstance(methods, str) else set(methods)
        if "GET" in names:
            names.add("HEAD")
        return cls(frozenset(names), re.compile(pattern), handler, public, websocket)


class Router:
    """Dispatches requests to routes; see the module docstring.

    Args:
        routes: tried in order; the first whose pattern and method match wins.
        authenticator: maps bearer tokens to identities.
        counters: where handshake failures are counted.
    """

    __slots__ = ("routes", "authenticator", "counters")

    def __init__(self, routes: Sequence[Route], *, authenticator: TokenAuthenticator,
                 counters: GatewayCounters) -> None:
        self.routes = tuple(routes)
        self.authenticator = authenticator
        self.counters = counters

    def __repr__(self) -> str:
        return f"<Router routes={len(self.routes)}>"

    def _authenticate(self, request: Request, stream: trio.abc.Stream) -> None:
        token = bearer_from_headers(request.headers)
        if token is None and request.is_upgrade:
            offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "")
                       .split(",") if p.strip()]
            token, _ = extract_bearer_subprotocol(offered)
        identity: Identity | None = None
        if token is None and isinstance(stream, trio.SSLStream):
            # No bearer token: a verified client certificate (--client-ca) names
            # the user (CN) and groups (O), as kube-apiserver's x509 authenticator.
            found = peer_identity(stream)
            if found is not None:
                identity = Identity(user=found[0], uid=found[0], groups=found[1],
                                    method="x509")
        if identity is None:
            identity = self.authenticator.authenticate(token)
        authorize(identity)
        request.identity = identity

    async def __call__(self, request: Request, stream: trio.abc.Stream,
                       conn: h11.Connection) -> Response | Upgraded:
        """Route one request (the :func:`podterm.gateway.http.serve_http` handler)."""
        allowed: set[str] = set()
        for route in self.routes:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            if request.method not in route.methods:
                allowed |= route.methods
                continue
            try:
                if not route.public:
                    self._authenticate(request, stream)
                return await route.handler(Call(request, match.groupdict(), stream, conn))
            except PodtermError as exc:
                if route.websocket and request.is_upgrade and conn.our_state is h11.SEND_RESPONSE:
                    GatewayCounters.bump(self.counters.handshake_failures,
                                         error_code(exc.http_status))
                raise
        if allowed:
            allow = ", ".join(sorted(allowed))
            return error_response(405, f"{request.method} is not allowed on {request.path}; "
                                  f"use {allow}", headers=(("Allow", allow),))
        if request.is_upgrade:
            GatewayCounters.bump(self.counters.handshake_failures, "not_found")
        return error_response(404, f"no such endpoint {request.path!r}")
