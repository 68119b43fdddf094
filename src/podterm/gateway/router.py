"""Method + path → handler, with authentication in front of every handler.

A :class:`Router` is a list of :class:`Route`\\ s, tried in order.  For each
request it:

1. finds the routes whose path pattern matches (none: ``404 not_found``) and
   among them the one for the method (none: ``405`` with ``Allow``);
2. unless the route is ``public``, authenticates the bearer token — the
   ``Authorization`` header, or on a WebSocket upgrade the
   ``bearer.podterm.<b64url>`` subprotocol carrier (docs/protocol.md §1) —
   or, without a token over TLS, a verified client certificate (CN = user,
   O = groups) -- through the :class:`~podterm.auth.chain.AuthenticatorChain`,
   with the rate limiter's failed-login budget per source in front (429 with
   ``Retry-After``); then asks the :class:`~podterm.auth.rbac.Authorizer`
   about the route's verb and target (``resolve_target``; docs/rbac.md)
   unless the route opts out with ``authorize=False`` (kubectl's discovery,
   which kube-apiserver grants to every authenticated user; agent
   registration, which checks its own group).  Without a policy only
   ``podterm:admins`` may act.  Failures are 401/403/429 answered *before*
   any handler runs, so before any upgrade;
3. calls the handler with the request (``request.identity`` set), the path
   parameters, and the connection (stream and :class:`~podterm.gateway.http.Exchange`,
   for upgrades).

Browser origins: before authenticating a WebSocket upgrade, its ``Origin``
is checked against the :class:`~podterm.protocol.handshake.OriginPolicy`
(no ``Origin``, the gateway's own origin, or ``--allowed-origins``); any
other origin is refused with 403 and a ``protocol.reject`` event naming it
(``details.origin``), so a foreign page can neither use a browser's ambient
credentials nor spend its address's failed-login budget.

Peers (``peers``, docs/ha.md): a request another gateway signed is
authenticated by its ``X-Podterm-Peer-*`` headers instead (a bad signature is
401, method ``peer``), and once a caller is authenticated, a request for a
session another peer holds is answered through that peer before any
authorization here: the holder authorizes it.

A route may render its own errors (``render_error``): the Kubernetes API
routes answer every failure, 401/403 included, as a Kubernetes ``Status``
(``podterm.gateway.kubeapi``) instead of the podterm error body.

Refused WebSocket upgrades are counted in ``handshake_failures`` by reason
(the §2 error code), wherever in the chain they were refused.

Audit (with an ``auditor``): every request starts its audit context (request
id, source address); every authentication and authorization decision is an
event (``auth.success``/``auth.failure``, ``authz.allow``/``authz.deny``),
written before the answer goes out; a refused upgrade that broke the
handshake is a ``protocol.reject``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import h11
import trio

from podterm.auth.authn import TokenAuthenticator, bearer_from_headers
from podterm.auth.chain import (
    AuthenticatorChain,
    AuthFailure,
    Credentials,
    FailureReason,
    StaticTokenAuthenticator,
    X509Authenticator,
)
from podterm.auth.identity import Identity
from podterm.auth.rbac import Authorizer, Decision, Target
from podterm.errors import BadRequestError, PodtermError, ProtocolViolation
from podterm.gateway.http import Exchange, Request, Response, Upgraded, error_code, error_response
from podterm.metrics import GatewayCounters
from podterm.net.tls import peer_identity
from podterm.protocol.handshake import OriginPolicy, OriginRefused, extract_bearer_subprotocol
from podterm.resilience.ratelimit import RateLimiter, RateLimitExceeded

if TYPE_CHECKING:
    from podterm.gateway.auditor import Auditor

#: What the gateway answers for the chain's generic failures; every other
#: reason (expired, bad signature, ...) keeps the authenticator's own message.
_FAILURE_WORDING = {
    FailureReason.MISSING: "missing bearer token: send 'Authorization: Bearer <token>' "
                           "or a client certificate",
    FailureReason.UNKNOWN_TOKEN: "invalid bearer token",
}

__all__ = ["Call", "ErrorRenderer", "PeerHooks", "Route", "Router", "RouteHandler"]


@dataclass(frozen=True, slots=True)
class Call:
    """What a route handler gets.

    Attributes:
        request: the request; ``identity`` is set unless the route is public.
        params: the named groups of the route's path pattern.
        stream: the connection, for handlers that upgrade it.
        exchange: the request's hold on the connection, for the same: take it
            over (:meth:`~podterm.gateway.http.Exchange.take_over`) to answer
            without h11, or use :attr:`conn`.
    """

    request: Request
    params: dict[str, str]
    stream: trio.abc.Stream
    exchange: Exchange

    @property
    def conn(self) -> h11.Connection:
        """The request's h11 state (built on first use; see ``Exchange.h11_connection``)."""
        return self.exchange.h11_connection


RouteHandler = Callable[[Call], Awaitable[Response | Upgraded]]
#: The RBAC verb and target of an authenticated request (``identity`` is set).
TargetResolver = Callable[[Request], tuple[str, Target]]


class PeerHooks(Protocol):
    """What the router asks of :class:`podterm.gateway.peers.Peers` (docs/ha.md, Peers)."""

    def authenticate(self, request: Request) -> Identity | None:
        """A signed peer request's forwarded identity; None when no peer signed it."""
        ...

    async def route(self, call: Call) -> Response | Upgraded | None:
        """The answer through the peer holding what ``call`` names; None: serve it here."""
        ...
#: Turns an error raised by authentication or the handler into the route's answer.
ErrorRenderer = Callable[[PodtermError, Request], Response]


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
        authorize: False skips the authorization rule (authentication still runs).
        render_error: answers errors itself (None: they propagate to
            :func:`~podterm.gateway.http.serve_http`, which renders podterm's body).
    """

    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: RouteHandler
    public: bool = False
    websocket: bool = False
    authorize: bool = True
    render_error: ErrorRenderer | None = None

    @classmethod
    def make(cls, methods: str | Sequence[str], pattern: str, handler: RouteHandler, *,
             public: bool = False, websocket: bool = False, authorize: bool = True,
             render_error: ErrorRenderer | None = None) -> Route:
        """Build a route; ``pattern`` is compiled and anchored."""
        names = {methods} if isinstance(methods, str) else set(methods)
        if "GET" in names:
            names.add("HEAD")
        return cls(frozenset(names), re.compile(pattern), handler, public, websocket,
                   authorize, render_error)


class Router:
    """Dispatches requests to routes; see the module docstring.

    Args:
        routes: tried in order; the first whose pattern and method match wins.
        authenticator: maps bearer tokens to identities.
        counters: where handshake failures are counted.
        auditor: where authentication, authorization and handshake refusals
            are audited (None: not audited).
        origins: which browser origins may open a WebSocket (default: the
            gateway's own origin only).
    """

    __slots__ = ("routes", "authenticator", "counters", "auditor", "chain", "authorizer",
                 "limiter", "resolve_target", "origins", "peers")

    def __init__(self, routes: Sequence[Route], *, authenticator: TokenAuthenticator,
                 counters: GatewayCounters, auditor: Auditor | None = None,
                 chain: AuthenticatorChain | None = None, authorizer: Authorizer | None = None,
                 limiter: RateLimiter | None = None,
                 resolve_target: TargetResolver | None = None,
                 origins: OriginPolicy | None = None,
                 peers: PeerHooks | None = None) -> None:
        self.routes = tuple(routes)
        self.authenticator = authenticator
        self.counters = counters
        self.auditor = auditor
        # Static tokens first, then a verified client certificate (only when no
        # token was sent: an explicit token says who the caller means to be).
        self.chain = chain or AuthenticatorChain([StaticTokenAuthenticator(authenticator),
                                                  X509Authenticator()])
        # No policy: the built-in rule (only podterm:admins may act).
        self.authorizer = authorizer or Authorizer()
        self.limiter = limiter
        self.resolve_target = resolve_target
        self.origins = origins or OriginPolicy()
        self.peers = peers

    def __repr__(self) -> str:
        return f"<Router routes={len(self.routes)}>"

    async def _authenticate(self, request: Request, stream: trio.abc.Stream) -> Identity:
        """Authenticate through the chain; 429 when the source spent its failure budget."""
        limiter = self.limiter
        source = request.client.ip if getattr(request, "client", None) is not None else None
        if limiter is not None:
            # Before looking at the credentials: no oracle for a guessing client.
            limiter.check_auth(source, trio.current_time()).check()
        if self.peers is not None:
            try:
                forwarded = self.peers.authenticate(request)
            except AuthFailure:
                if limiter is not None:
                    limiter.record_auth_failure(source, trio.current_time())
                raise
            if forwarded is not None:
                # A peer signed it: that peer authenticated the user and applied
                # the per-user limits.  Audit the original client from here on.
                request.identity = forwarded
                if self.auditor is not None:
                    self.auditor.enter_request(request)
                return forwarded
        token = bearer_from_headers(request.headers)
        if token is None and request.is_upgrade:
            offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "")
                       .split(",") if p.strip()]
            token, _ = extract_bearer_subprotocol(offered)
        peer: tuple[str, tuple[str, ...]] | None = None
        if isinstance(stream, trio.SSLStream):
            # A verified client certificate (--client-ca) names the user (CN)
            # and groups (O), as kube-apiserver's x509 authenticator.
            found = peer_identity(stream)
            if found is not None:
                peer = (found[0], tuple(found[1]))
        try:
            identity = await self.chain.authenticate(Credentials(token=token, peer=peer))
        except AuthFailure as exc:
            if limiter is not None:
                limiter.record_auth_failure(source, trio.current_time())
            wording = _FAILURE_WORDING.get(exc.reason)
            if wording is not None:  # the gateway's documented answers (docs/protocol.md §1)
                raise AuthFailure(exc.reason, wording, method=exc.method) from None
            raise
        # Set before any later check: a 403 or 429 answer may name the user.
        request.identity = identity
        if limiter is not None:
            limiter.check_user_connect(identity.user, trio.current_time()).check()
        return identity

    def _verb_target(self, request: Request) -> tuple[str, Target]:
        if self.resolve_target is not None:
            return self.resolve_target(request)
        return "admin", Target()

    @staticmethod
    async def _audit_decision(auditor: Auditor, verb: str, target: Target,
                              decision: Decision) -> None:
        details: dict[str, Any] = {"verb": verb, "via": decision.via,
                                   "rule": decision.rule or "default"}
        if not decision.allowed:
            details["reason"] = decision.reason
        await auditor.emit("authz.allow" if decision.allowed else "authz.deny",
                           outcome=None if decision.allowed else "denied",
                           target=target.to_audit(), **details)

    async def __call__(self, request: Request, stream: trio.abc.Stream,
                       exchange: Exchange) -> Response | Upgraded:
        """Route one request (the :func:`podterm.gateway.http.serve_http` handler)."""
        auditor = self.auditor
        if auditor is not None and not auditor.enabled:
            auditor = None  # audit off: build no event (a configured sink always has them)
        if auditor is not None:
            auditor.enter_request(request)
        allowed: set[str] = set()
        for route in self.routes:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            if request.method not in route.methods:
                allowed |= route.methods
                continue
            try:
                if route.websocket and request.is_upgrade:
                    # RFC 6455 §10.2: before any credential is looked at.
                    self.origins.check(request.headers.get("origin"),
                                       request.headers.get("host"),
                                       tls=isinstance(stream, trio.SSLStream))
                if not route.public:
                    try:
                        identity = await self._authenticate(request, stream)
                    except PodtermError as exc:
                        if auditor is not None:
                            if request.identity is not None:  # per-user 429
                                await auditor.access_granted(request, authorized=False)
                            else:
                                await auditor.access_refused(request, exc)
                        raise
                    if auditor is not None:
                        await auditor.access_granted(request, authorized=False)
                    if self.peers is not None:
                        # Before authorization: the peer holding the session
                        # decides, with the forwarded identity (docs/ha.md).
                        answer = await self.peers.route(Call(request, match.groupdict(),
                                                             stream, exchange))
                        if answer is not None:
                            return answer
                    if route.authorize:
                        verb, target = self._verb_target(request)
                        decision = await self.authorizer.decide(identity, verb, target)
                        if auditor is not None:
                            await self._audit_decision(auditor, verb, target, decision)
                        decision.check(identity, verb, target)  # 403 / close 4403
                        if verb == "exec" and self.limiter is not None and (
                                request.is_upgrade or request.method == "POST"):
                            # A new session: REST create or a kubectl exec upgrade.
                            self.limiter.check_session_create(
                                request.client.ip, identity.user, trio.current_time()).check()
                return await route.handler(Call(request, match.groupdict(), stream, exchange))
            except PodtermError as exc:
                if isinstance(exc, RateLimitExceeded) and not getattr(exc, "headers", None):
                    # 429 with Retry-After (error_response adds an exception's headers).
                    exc.headers = [("Retry-After", exc.retry_after_header)]  # type: ignore[attr-defined]
                if route.websocket and request.is_upgrade and not exchange.responded:
                    GatewayCounters.bump(self.counters.handshake_failures,
                                         error_code(exc.http_status))
                    if auditor is not None and isinstance(exc, OriginRefused):
                        await auditor.emit("protocol.reject", outcome="rejected",
                                           reason=exc.message, http_status=exc.http_status,
                                           protocol="websocket", path=request.path,
                                           origin=exc.origin)
                    elif auditor is not None and isinstance(exc, ProtocolViolation |
                                                            BadRequestError):
                        await auditor.protocol_rejected(request, exc.message,
                                                        http_status=exc.http_status)
                if route.render_error is not None and not exchange.responded:
                    return route.render_error(exc, request)
                raise
        if allowed:
            allow = ", ".join(sorted(allowed))
            return error_response(405, f"{request.method} is not allowed on {request.path}; "
                                  f"use {allow}", headers=(("Allow", allow),))
        if request.is_upgrade:
            GatewayCounters.bump(self.counters.handshake_failures, "not_found")
        return error_response(404, f"no such endpoint {request.path!r}")
