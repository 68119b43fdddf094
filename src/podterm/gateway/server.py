"""``podterm serve``: the gateway's task tree, start-up and drain.

The task tree (STYLE.md §2; every task has a parent)::

    serve(config)                          root nursery
    ├── SessionStore.run                   --store: connections, lease expiry
    ├── SessionRegistry.run                sessions' nursery: every Session.run
    │   ├── StoreMirror.run                one flusher: sessions → store (SQLite/Redis)
    │   └── Session.run × N                supervisor + output pump + input pump
    ├── LoopLagProbe.run                   event-loop lag for /metrics
    ├── _watch_signals                     SIGTERM/SIGINT → drain (main thread only)
    ├── _accept_loop                       serve_listeners (http.py); cancelled first on drain
    └── connection nursery                 one task per connection: HTTP, or an
        ├── [PROXY header →] serve_http → router → ...
        │                                  attachment's receiver (+ its sender),
        │                                  each only while something is due
        └── IdleSockets.run                the quiet links' sockets (no task each)

``await nursery.start(serve, config)`` returns a :class:`Gateway` once the
listeners are bound (its ``url``, ``port``, ``admin_token`` and ``registry``),
which is how tests run it.  :func:`main` is the CLI entry point.

Drain (:meth:`Gateway.shutdown`, or SIGTERM/SIGINT): ``/readyz`` turns 503 and
new sessions and attaches are refused (503 ``unavailable``) while the
listeners stay open (so probes see the 503); every attached client gets
CONTROL ``drain`` then close 1001 (kubectl exec/attach links, which cannot
resume elsewhere, keep running and end with a Failure Status at the
deadline, ``gateway.kubeapi``); once no link is left, or
``drain_timeout_s`` has passed, the listeners close and the root is cancelled
(the sessions end, their upstreams are killed) and ``main`` returns 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from podterm.audit.events import AuditEvent
from podterm.audit.sinks import AuditSink, open_audit_sink
from podterm.auth.authn import TokenAuthenticator, generate_admin_token
from podterm.auth.chain import (
    Authenticator,
    AuthenticatorChain,
    StaticTokenAuthenticator,
    X509Authenticator,
)
from podterm.auth.providers import configured_auth
from podterm.auth.rbac import Authorizer, ExternalAuthorizer, PolicyHolder, Target
from podterm.config import ServeConfig
from podterm.errors import ConfigError, PodtermError
from podterm.gateway.admin import AdminApi, metric_families
from podterm.gateway.agents import AgentCoordinator, AgentEndpoint
from podterm.gateway.api import SESSION_ID, SessionsApi
from podterm.gateway.attach import AttachHandler
from podterm.gateway.auditor import Auditor, RequestContext
from podterm.gateway.clients import ClientConnections, receive_proxy_header
from podterm.gateway.handoff import handoff_path, serve_handoffs
from podterm.gateway.http import (
    Exchange,
    HttpLimits,
    LivesOn,
    Request,
    Response,
    Upgraded,
    aclose_unless_closed,
    error_response,
    raw_response,
    send_and_close,
    serve_http,
    serve_listeners,
    when_ended,
)
from podterm.gateway.kubeapi import ApiserverBackend, KubeApi, LocalBackend
from podterm.gateway.peers import (
    Peers,
    WorkerRole,
    format_peer_address,
    load_peer_secret,
    parse_peer_address,
    peer_client_context,
)
from podterm.gateway.router import Call, Route, RouteHandler, Router
from podterm.gateway.static import StaticFiles
from podterm.gateway.workers import open_listeners, serve_exit_status
from podterm.gcprofile import GcController
from podterm.metrics import CONTENT_TYPE, GatewayCounters, LoopLagProbe, MetricFamily
from podterm.net.clientaddr import ClientAddressPolicy, PrefixedStream, resolve_connection
from podterm.net.hostport import join_host_port
from podterm.net.idle import IdleSockets
from podterm.net.tls import CertReloader, server_context
from podterm.protocol.handshake import OriginPolicy
from podterm.protocol.proxy_header import ProxyResult
from podterm.protocol.websocket import WsLimits
from podterm.recording.writer import RecordingWriter
from podterm.resilience.ratelimit import RateLimiter, RateLimits
from podterm.session.mirror import StoreMirror, store_metric_families
from podterm.session.registry import SessionRegistry
from podterm.session.ring import DEFAULT_CHUNK_BYTES
from podterm.session.session import SessionLimits
from podterm.store import StoreError, open_store, redact_url
from podterm.upstream.agent import AgentUpstream, AgentUpstreamOptions
from podterm.upstream.base import Upstream
from podterm.upstream.kube import KubeUpstream, KubeUpstreamOptions
from podterm.upstream.local import LocalUpstream

__all__ = ["Gateway", "GatewayOptions", "main", "serve", "session_limits"]

log = logging.getLogger(__name__)

#: A create body with a 64 KiB command (escaped JSON can double it) and env fits.
_MIN_BODY_BYTES = 192 * 1024
#: Client addresses whose end-of-connection callback is kept for reuse.
_ENDED_CBS_MAX = 4096


#: Until the config has keys for them, only the failed-login budget per source
#: is on by default (resilience.ratelimit's defaults); the connect and
#: session-create limits are off (GatewayOptions.rate_limits turns them on).
DEFAULT_RATE_LIMITS = RateLimits(connect_per_source=None, connect_per_user=None,
                                 session_create_per_source=None,
                                 session_create_per_user=None)


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """What :func:`serve` needs beyond the config (tests and embedding).

    Attributes:
        handle_signals: install SIGTERM/SIGINT handlers (only possible in the
            main thread; tests leave it off and call :meth:`Gateway.shutdown`).
        print_banner: print the web terminal URL to stdout once.
        web_dir: the page's directory (None: the packaged ``gateway/web``).
        upstreams: upstreams to use instead of the ones built from the config.
        session_limits: overrides of the session limits (e.g. a short
            heartbeat for tests) instead of the ones built from the config.
        lag_probe_interval_s: event-loop lag probe period; 0 = no probe.
        audit_sink: the audit sink instead of the one built from ``config.audit``
            (e.g. a fan-out with a ``MemorySink`` for tests).
        recording_writer: the recording writer instead of the one built from
            ``config.recording`` (e.g. one with few open files, for tests).
        rate_limits: the rate limiter's limits (default: failed logins per
            source only, until the config has keys for the others).
        authenticators: further members of the authentication chain after
            static tokens and client certificates, e.g. an ``OidcAuthenticator``
            (placed before the ones ``--oidc-issuer`` and ``--tokenreview`` add:
            those come from the config, ``podterm.auth.providers``).
        external_authorizer: the SubjectAccessReview client a policy with
            ``delegate: subjectaccessreview`` asks (``podterm.auth.sar``).
        worker: this process is a worker of ``podterm serve --workers N``
            (``podterm.gateway.workers``): SO_REUSEPORT on the public
            listener, its own peer listener, every worker's series in /metrics.
    """

    handle_signals: bool = False
    print_banner: bool = False
    web_dir: Path | None = None
    upstreams: dict[str, Upstream] | None = None
    session_limits: SessionLimits | None = None
    lag_probe_interval_s: float = 0.5
    audit_sink: AuditSink | None = None
    recording_writer: RecordingWriter | None = None
    rate_limits: RateLimits = dataclasses.field(default_factory=lambda: DEFAULT_RATE_LIMITS)
    authenticators: tuple[Authenticator, ...] = ()
    external_authorizer: ExternalAuthorizer | None = None
    worker: WorkerRole | None = None



_SESSION_PATH = re.compile(r"/api/v1/sessions/(?P<id>[^/]+)(?P<sub>/attach)?/?")
_KUBE_POD_PATH = re.compile(
    r"/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)(?:/(?P<sub>[a-z]+))?/?")


def _create_target(request: Request) -> Target:
    """The exec target of a ``POST /api/v1/sessions`` body (api.validate_create's defaults).

    A body the handler will refuse (400) gives unknown parts, which match no
    selector: the decision fails closed.
    """
    try:
        body = request.json()
    except PodtermError:
        body = None
    if not isinstance(body, dict):
        return Target()

    def text(key: str, default: str | None) -> str | None:
        value = body.get(key)
        if value is None or value == "":
            return default
        return value if isinstance(value, str) else None

    command = body.get("command")
    argv = None
    if command is not None:
        if not (isinstance(command, list) and command
                and all(isinstance(c, str) for c in command)):
            return Target()  # the handler answers 400; never judge it as a shell
        argv = tuple(command)
    return Target(namespace=text("namespace", "default"), pod=text("pod", "local"),
                  container=text("container", None), command=argv)


def session_limits(config: ServeConfig) -> SessionLimits:
    """Map ``config.sessions`` (and ``upstream.restore``) to :class:`SessionLimits`.

    The ring is rounded up to whole 4 KiB chunks (the ring's unit of allocation).
    ``upstream.restore`` off empties ``restore_upstreams``; on keeps its default.
    """
    s = config.sessions
    chunk = DEFAULT_CHUNK_BYTES
    ring = -(-s.ring_bytes // chunk) * chunk
    limits = SessionLimits(ring_bytes=ring, ring_chunk_bytes=chunk,
                           window_bytes=min(s.window_bytes, ring), grace_s=s.grace_s,
                           idle_timeout_s=s.idle_timeout_s, max_age_s=s.max_age_s,
                           heartbeat_interval_s=s.heartbeat_interval_s)
    if not config.upstream.restore:
        limits = dataclasses.replace(limits, restore_upstreams=frozenset())
    return limits


def _ssl_context(config: ServeConfig) -> ssl.SSLContext | None:
    tls = config.tls
    if not tls.enabled or tls.cert_file is None or tls.key_file is None:
        return None
    return server_context(tls.cert_file, tls.key_file, tls.client_ca_file)


def _write_ready_file(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (temp file + rename): readers never see half."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".ready-", dir=str(target.parent or Path(".")))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.write("\n")
        os.chmod(tmp, 0o600)  # may hold the admin token
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Gateway:
    """A running gateway: what :func:`serve` hands back once it listens.

    Attributes:
        config: the configuration it runs with.
        host, port: the bound address (the real port when 0 was asked).
        url: ``http(s)://host:port``.
        admin_token: the admin token (generated or configured), or None.
        registry: the session registry.
        counters: the gateway's counters.
    """

    def __init__(self, config: ServeConfig, options: GatewayOptions) -> None:
        self.config = config
        self.options = options
        self.counters = GatewayCounters()
        self.limits = options.session_limits or session_limits(config)
        auth = config.auth
        if auth.token_file:
            self.authenticator = TokenAuthenticator.from_file(auth.token_file)
        else:
            self.authenticator = TokenAuthenticator()
        self.admin_token_generated = False
        self.admin_token: str | None = auth.admin_token
        if self.admin_token is None and not auth.token_file:
            # The embedded default: one generated admin token, printed once.
            self.admin_token = generate_admin_token()
            self.admin_token_generated = True
        if self.admin_token is not None:
            self.authenticator.add_admin_token(self.admin_token)
        upstreams = options.upstreams
        if upstreams is None:
            upstreams = {"local": LocalUpstream(default_shell=config.upstream.shell)}
            if config.upstream.kind == "kube":
                # --upstream kube: --kubeconfig (and --context), else the pod's
                # service account.  ConfigError when they cannot be loaded.
                upstreams["kube"] = KubeUpstream.from_config(
                    config.upstream.kubeconfig, config.upstream.context,
                    KubeUpstreamOptions(impersonate=config.upstream.impersonate))
        # Sidecar agents register at /api/v1/agents/connect; sessions reach
        # them as upstream "agent" (one given in options.upstreams is used).
        agent_upstream = upstreams.get("agent")
        if not isinstance(agent_upstream, AgentUpstream):
            agent_upstream = AgentUpstream(AgentUpstreamOptions(
                heartbeat_interval_s=self.limits.heartbeat_interval_s,
                heartbeat_max_missed=self.limits.heartbeat_max_missed,
                lost_timeout_s=self.limits.grace_s))
            upstreams = {**upstreams, "agent": agent_upstream}
        self.agents = agent_upstream
        default = config.upstream.kind
        if default not in upstreams:
            log.warning("gateway.upstream.unavailable: upstream %r is not wired into this "
                        "gateway yet; sessions that name none use 'local'", default)
            default = "local"
        # Who the client is: socket peer, PROXY header (--proxy-protocol), or a
        # trusted proxy's X-Forwarded-For (--trusted-proxies); net.clientaddr.
        self.client_policy = ClientAddressPolicy.from_listen(config.listen)
        self.clients = ClientConnections(config.limits.max_connections_per_ip)
        # The session store (ConfigError for a bad URL).  memory:// is not
        # mirrored into: nothing outside this process could read it.  SQLite
        # and Redis get every session's record (session.mirror); while they
        # are down, new sessions are refused and /readyz says 503.
        self.store = open_store(config.store.url)
        self.mirror = StoreMirror(self.store) if self.store.backend != "memory" else None
        # Audit events and recordings (docs/audit.md): their writers run outside
        # the root nursery (run()), so they outlive every session.
        self.audit = options.audit_sink or open_audit_sink(
            config.audit.log_file, full_policy=config.audit.full_policy,
            buffer_records=config.audit.buffer_records)
        self.recordings = options.recording_writer or RecordingWriter.from_config(
            config.recording.dir, record_input=config.recording.record_input,
            full_policy=config.audit.full_policy)
        self.auditor = Auditor(self.audit, self.recordings, shell=config.upstream.shell)
        self.registry = SessionRegistry(
            upstreams, default_upstream=default, limits=self.limits, counters=self.counters,
            max_sessions=config.limits.max_sessions,
            max_sessions_per_user=config.limits.max_sessions_per_user, mirror=self.mirror,
            hooks=self.auditor)
        # --gc-profile, applied once listening (see _serve); pauses in /metrics.
        # Traffic (bytes relayed, requests) tells its collector when nobody waits.
        c = self.counters
        self.gc = GcController(config.workers.gc_profile,
                               activity=lambda: c.bytes_in + c.bytes_out + c.http_requests)
        self.lag = (LoopLagProbe(options.lag_probe_interval_s)
                    if options.lag_probe_interval_s > 0 else None)
        self.static = StaticFiles(options.web_dir) if options.web_dir else StaticFiles()
        ws_limits = WsLimits(max_frame_bytes=config.limits.max_frame_bytes,
                             max_message_bytes=config.limits.max_message_bytes)
        self.attach = AttachHandler(self.registry, self.counters, ws_limits=ws_limits,
                                    auditor=self.auditor)
        # kubectl's API (version, discovery, pods, exec/attach), for the default
        # upstream: the kube upstream's apiserver answers the reads, else the
        # local upstream's pods are synthesized (kubeapi.LocalBackend).
        kube = upstreams.get("kube")
        kube_backend = (ApiserverBackend(kube) if default == "kube" and isinstance(
            kube, KubeUpstream) else LocalBackend())
        self.kubeapi = KubeApi(self.registry, self.counters, backend=kube_backend,
                               ws_limits=ws_limits,
                               open_timeout_s=config.limits.handshake_timeout_s,
                               agents=self.agents)
        self.admin = AdminApi(self.registry, self.counters, self.lag, lambda: self.draining,
                              unready=self._unready)
        self.agent_endpoint = AgentEndpoint(self.agents, self.counters,
                                            draining=lambda: self.draining)
        # With a shared store, agents are leased there (holder: our peer
        # address) and a dead peer's agent sessions are adopted here
        # (gateway.agents.AgentCoordinator; docs/ha.md "Agents").
        self.agent_coordinator: AgentCoordinator | None = None
        if self.mirror is not None:
            self.agent_coordinator = AgentCoordinator(
                self.agents, self.store, self.registry, holder=lambda: self.peers.address,
                lease_ttl_s=3 * self.limits.heartbeat_interval_s,
                grace_s=self.limits.grace_s)
            self.mirror.on_moved = self.agent_coordinator.session_moved
        # Authentication chain, RBAC policy (reloaded on change; --policy) and
        # rate limits (docs/rbac.md).  A policy file that cannot be read stops
        # the start (ConfigError); without one only podterm:admins may act.
        # --oidc-issuer, --tokenreview, --subjectaccessreview (ConfigError when
        # their files or the apiserver credentials cannot be loaded).
        self.configured_auth = configured_auth(auth, kubeconfig=config.upstream.kubeconfig,
                                               context=config.upstream.context)
        self.chain = AuthenticatorChain([StaticTokenAuthenticator(self.authenticator),
                                         X509Authenticator(), *options.authenticators,
                                         *self.configured_auth.leading,
                                         *self.configured_auth.trailing])
        self.policy = PolicyHolder(auth.policy_file, on_event=self._policy_event)
        self.authorizer = Authorizer(self.policy, external=options.external_authorizer
                                     or self.configured_auth.subjectaccessreview)
        self.limiter = RateLimiter(options.rate_limits)
        # Peers (docs/ha.md): a request for a session another gateway process
        # holds is forwarded to it.  A worker's secret comes from its supervisor.
        cluster = config.cluster
        role = options.worker
        secret = role.secret if role is not None else (
            load_peer_secret(cluster.peer_secret_file) if cluster.peer_secret_file else None)
        self.peers = Peers(self.registry, self.store, secret=secret,
                           tls=peer_client_context(config.tls), auditor=self.auditor,
                           draining=lambda: self.draining, worker=role,
                           recovery_grace_s=self.limits.grace_s)
        self.peers.agent_here = self.agents.is_connected
        self.peers.local_families = self._metric_families
        self.router = Router(self._routes(), authenticator=self.authenticator,
                             counters=self.counters, auditor=self.auditor, chain=self.chain,
                             authorizer=self.authorizer, limiter=self.limiter,
                             resolve_target=self._verb_target,
                             origins=OriginPolicy(config.security.allowed_origins),
                             peers=self.peers)
        limits = config.limits
        self.http_limits = HttpLimits(
            max_header_bytes=min(limits.max_request_bytes, 64 * 1024),
            # docs/protocol.md §2 allows a 64 KiB command plus env and JSON
            # quoting, which a 64 KiB body cannot carry: never below 192 KiB.
            max_body_bytes=max(limits.max_request_bytes, _MIN_BODY_BYTES),
            header_timeout_s=limits.handshake_timeout_s)
        self.ssl_context = _ssl_context(config)
        self.host = config.listen.host
        self.port = config.listen.port
        self.url = ""
        self.draining = False
        self._connections = 0
        self._links = 0
        self._links_lot = trio.lowlevel.ParkingLot()
        # End-of-connection callbacks shared by the links that outlive their
        # task (every idle link holds them): one bound method, and one partial
        # per client address (an LRU, as clientaddr's parsed addresses).
        self._link_ended_cb = self._link_ended
        self._connection_ended_cb = functools.lru_cache(maxsize=_ENDED_CBS_MAX)(
            self._connection_ended_partial)
        self._shutdown = trio.Event()
        self._shutdown_reason = "gateway shutting down"

    @property
    def peer_address(self) -> str:
        """Where the other peers reach this process (``host:port``; the store's holder)."""
        return self.peers.address

    def __repr__(self) -> str:
        return (f"<Gateway {self.url or 'unbound'} sessions={len(self.registry)} "
                f"links={self._links}{' draining' if self.draining else ''}>")

    def _policy_event(self, event: AuditEvent) -> None:
        """``policy.reload`` into the audit log; never lets a reload fail."""
        try:
            self.auditor._submit_nowait(event)
        except Exception:  # the audit path reports its own failures
            log.exception("audit.policy_reload.failed")

    def _verb_target(self, request: Request) -> tuple[str, Target]:
        """The RBAC verb and target of an authenticated request (docs/rbac.md, Verbs)."""
        identity = request.identity
        path, method = request.path.rstrip("/"), request.method
        if path == "/api/v1/sessions":
            if method != "POST":
                return "list-sessions", Target(session_owner=identity.user if identity else None)
            return "exec", _create_target(request)
        match = _SESSION_PATH.fullmatch(request.path)
        if match is not None:
            session_id, sub = match.group("id"), match.group("sub")
            try:
                session = self.registry.get(session_id)
            except PodtermError:
                # Unknown or ended: no owner, so no owner: self rule matches;
                # an allowed caller then gets the handler's 404/410.
                session = None
            target = Target(session=session_id)
            if session is not None:
                spec = session.spec
                target = Target(namespace=spec.namespace or None, pod=spec.pod or None,
                                container=spec.container or None,
                                session_owner=session.owner, session=session_id)
            if sub:
                return ("join" if request.query.get("mode") == "ro" else "attach"), target
            if method == "DELETE":
                own = session is not None and identity is not None and \
                    session.owner == identity.user
                # Killing your own session needs what starting it did.
                return ("exec" if own else "admin"), target
            return "list-sessions", target
        match = _KUBE_POD_PATH.fullmatch(request.path)
        if match is not None:
            sub = match.group("sub")
            verb = "attach" if sub == "attach" else "exec"
            query = urllib.parse.parse_qs(request.target.partition("?")[2])
            command = tuple(query.get("command", ())) if sub == "exec" else None
            return verb, Target(namespace=match.group("ns"), pod=match.group("pod"),
                                container=query.get("container", [""])[0] or None,
                                command=command or None)
        return "admin", Target()

    # ---------------------------------------------------------------- routes

    def _routes(self) -> list[Route]:
        return [
            # Before the admin routes: /metrics with the upstreams' families too.
            Route.make("GET", r"/metrics", self._metrics, public=True),
            *self.peers.routes(),
            *self.admin.routes(),
            Route.make("GET", rf"/api/v1/sessions/{SESSION_ID}/attach", self._attach,
                       websocket=True),
            *SessionsApi(self.registry, auditor=self.auditor,
                         store=None if self.store.backend == "memory" else self.store).routes(),
            *self.agent_endpoint.routes(),
            # Before the static catch-all, which would take /version, /api and /apis.
            *[dataclasses.replace(r, handler=self._counted(r.handler)) if r.websocket else r
              for r in self.kubeapi.routes()],
            Route.make("GET", r"/(?!api/).*", self._static, public=True),
        ]

    def _counted(self, handler: RouteHandler) -> RouteHandler:
        """Wrap an upgrading handler so its link counts for the drain (see :meth:`_link`)."""

        async def counted(call: Call) -> Response | Upgraded:
            answer = await handler(call)
            return self._link(answer) if isinstance(answer, Upgraded) else answer

        return counted

    async def _attach(self, call: Call) -> Upgraded:
        return self._link(await self.attach(call))

    def _link(self, upgraded: Upgraded) -> Upgraded:
        """Count the upgraded connection as a link while it runs (drain waits for links)."""
        run = upgraded.run
        if run is None:
            return upgraded

        async def counted() -> LivesOn | None:
            self._links += 1
            lives_on: LivesOn | None = None
            try:
                lives_on = await run()
                return lives_on
            finally:
                # (The link may outlive this task.  One bound method for all.)
                when_ended(lives_on, self._link_ended_cb)

        return Upgraded(counted)

    def _link_ended(self) -> None:
        self._links -= 1
        if self._links == 0:
            self._links_lot.unpark_all()

    async def _metrics(self, call: Call) -> Response:
        """``/metrics``: this process's families (with workers, every worker's: peers.py)."""
        text = await self.peers.metrics_text()
        return Response(200, text.encode("utf-8"), CONTENT_TYPE,
                        (("Cache-Control", "no-store"),))

    def _lend_watcher(self, idle: IdleSockets | None) -> None:
        for upstream in self.registry.upstreams.values():
            if isinstance(upstream, LocalUpstream):
                upstream.watcher = idle

    def _metric_families(self) -> list[MetricFamily]:
        """The admin families plus the kube upstream's breaker and dials, store, peers."""
        families = metric_families(self.registry, self.counters, self.lag,
                                   draining=self.draining)
        for upstream in self.registry.upstreams.values():
            if isinstance(upstream, KubeUpstream):
                families += upstream.metric_families()
        families += store_metric_families(self.store, self.mirror)
        families += self.clients.metric_families()
        families += self.auditor.metric_families()
        families += self.gc.metric_families()
        families += self.peers.metric_families()
        families += self.agents.metric_families()
        if self.agent_coordinator is not None:
            families += self.agent_coordinator.metric_families()
        return families

    async def _static(self, call: Call) -> Response:
        return self.static.serve(call.request)

    # ----------------------------------------------------------- connections

    def _unready(self) -> str | None:
        """/readyz: why new sessions cannot be taken now (the store is down), or None."""
        if self.mirror is not None and not self.store.is_available:
            return "session store unavailable: not taking new sessions"
        # fail-closed: an audit or recording writer that is behind refuses sessions.
        return self.auditor.not_ready_reason()

    async def _dispatch(self, request: Request, stream: trio.abc.Stream,
                        conn: Exchange) -> Response | Upgraded:
        """The router, counting where each request's client address came from."""
        self.clients.count_request(request.client.via.value)
        return await self.router(request, stream, conn)

    async def _handle(self, stream: trio.abc.Stream, *, peer_link: bool = False
                      ) -> LivesOn | None:
        """Serve one connection; ``peer_link``: accepted on the worker's peer listener
        (no PROXY header there, and no per-address cap: every peer link of a
        machine's workers comes from one address).

        Returns a :class:`LivesOn` when an attached link goes on without this
        task (it closes the stream, and releases the connection's counts, at
        its end); None once the connection is over.
        """
        sock = getattr(stream, "socket", None) or getattr(
            getattr(stream, "transport_stream", None), "socket", None)
        peer_addr: tuple[Any, ...] = ("?", 0)
        if sock is not None:
            try:
                peer_addr = tuple(sock.getpeername())
            except OSError:
                pass
        policy = self.client_policy
        proxy: ProxyResult | None = None
        if policy.proxy_protocol and not peer_link:
            # The header comes before any HTTP or TLS byte, so TLS is layered
            # on here rather than by the listener.
            assert isinstance(stream, trio.abc.HalfCloseableStream)
            try:
                received = await receive_proxy_header(
                    stream, timeout_s=self.config.limits.handshake_timeout_s,
                    answer_http=self.ssl_context is None, clients=self.clients,
                    peer=f"{peer_addr[0]}:{peer_addr[1]}")
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
                raise
            if received is None:
                return None  # refused (400 on plain HTTP), counted and closed
            proxy, stream = received
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True,
                                        https_compatible=True)
        client = resolve_connection(peer_addr, proxy, policy=policy)
        if not peer_link and not self.clients.acquire(client.ip, client.via.value):
            # One client address holds its share of the descriptor budget:
            # refuse this connection before reading any HTTP.  Keyed on the
            # client, not the socket peer: behind a balancer that is the balancer.
            await self._refuse_over_cap(stream, str(client), client.ip)
            return None
        self._connections += 1
        lives_on: LivesOn | None = None
        try:
            upgraded = await serve_http(stream, self._dispatch, limits=self.http_limits,
                                        counters=self.counters,
                                        keep_alive=lambda: not self.draining, client=client,
                                        client_policy=policy,
                                        on_protocol_error=functools.partial(
                                            self._http_rejected, str(client)),
                                        on_tls_error=functools.partial(
                                            self._tls_rejected, str(client)))
            if upgraded is not None and upgraded.run is not None:
                try:
                    lives_on = await upgraded.run()
                finally:
                    if lives_on is None:
                        await aclose_unless_closed(stream)  # shielded
        except Exception:
            # A bug ends only its own connection (STYLE.md §3), never the gateway.
            log.exception("gateway.connection.failed", extra={"peer": str(client),
                                                              "via": client.via.value})
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        finally:
            when_ended(lives_on, self._connection_ended_cb(None if peer_link else client.ip))
        return lives_on

    def _connection_ended_partial(self, ip: str | None) -> Callable[[], None]:
        """``_connection_ended(ip)`` as a callback (shared per address through
        :attr:`_connection_ended_cb`: fewer objects per idle link)."""
        return functools.partial(self._connection_ended, ip)

    def _connection_ended(self, ip: str | None) -> None:
        self._connections -= 1
        if ip is not None:
            self.clients.release(ip)

    async def _handle_handoff(self, stream: trio.SocketStream, head: bytes,
                              client: tuple[str, str]) -> None:
        """Serve a connection a sibling worker handed over, starting with ``head``.

        ``head`` is the request the sibling signed for this worker (the same
        peer credentials a TCP forward carries) and the client's bytes after
        it; the socket is the client's own.  It counts against ``client``'s
        per-address share here from now on (the sibling released it).
        """
        ip, via = client
        if not self.clients.acquire(ip, via):
            await self._refuse_over_cap(stream, ip, ip)
            return
        lives_on: LivesOn | None = None
        try:
            lives_on = await self._handle(PrefixedStream(stream, head), peer_link=True)
        finally:
            when_ended(lives_on, functools.partial(self.clients.release, ip))

    async def _refuse_over_cap(self, stream: trio.abc.Stream, source: str, ip: str) -> None:
        """``429`` (``Retry-After: 1``) and a ``protocol.reject`` event for a connection
        whose client address holds ``max-connections-per-ip`` already.

        Other addresses are not affected; the answer goes out before any of
        the request is read, and the socket is closed within a second --
        before the event is emitted, so a full audit buffer (``block``)
        never keeps the descriptor this cap exists to protect.
        """
        cap = self.clients.max_per_ip
        reason = (f"too many connections from {ip}: it holds {cap} already "
                  "(max-connections-per-ip); close one and retry")
        GatewayCounters.bump(self.counters.http_errors, "rate_limited")
        await send_and_close(stream, raw_response(error_response(
            429, reason, headers=(("Retry-After", "1"),))))
        await self.auditor.emit("protocol.reject", outcome="rejected",
                                context=RequestContext(source_addr=source), reason=reason,
                                http_status=429, protocol="http/1.1")

    def _tls_rejected(self, source: str, error: ssl.SSLError) -> None:
        """A TLS handshake that failed on a TLS error: ``auth.failure`` (method ``x509``)
        when the client's certificate did not verify, else ``protocol.reject``."""
        detail = getattr(error, "verify_message", None) or getattr(error, "reason", None)
        text = str(detail or error)
        context = RequestContext(source_addr=source)
        if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE" in str(
                getattr(error, "reason", "") or "").upper():
            GatewayCounters.bump(self.counters.http_errors, "tls_client_certificate")
            self.auditor.emit_nowait(
                "auth.failure", outcome="rejected", context=context, method="x509",
                reason=f"client certificate refused in the TLS handshake: {text}",
                failure="bad_certificate")
            return
        GatewayCounters.bump(self.counters.http_errors, "tls_handshake")
        self.auditor.protocol_rejected_nowait(f"TLS handshake failed: {text}", protocol="tls",
                                              context=context)

    def _http_rejected(self, source: str, status: int, reason: str) -> None:
        """``protocol.reject`` for a request that broke HTTP (answered ``status``)."""
        self.auditor.protocol_rejected_nowait(reason, http_status=status, protocol="http/1.1",
                                              context=RequestContext(source_addr=source))

    # ----------------------------------------------------------------- drain

    def shutdown(self, reason: str = "gateway shutting down") -> None:
        """Start the drain (idempotent); :func:`serve` returns when it is done."""
        self._shutdown_reason = reason
        self._shutdown.set()

    async def _wait_links_gone(self) -> None:
        while self._links > 0:
            await self._links_lot.park()

    async def _drain(self) -> None:
        reason = self._shutdown_reason
        log.info("gateway.drain.started: %s (%d sessions, %d links)", reason,
                 len(self.registry), self._links)
        # Keep accepting while draining: /readyz must be reachable to say 503
        # (that is how Kubernetes and load balancers stop sending clients),
        # and refused requests tell clients where they stand.  New sessions and
        # attaches are refused with 503; the listeners close at the end.
        self.draining = True
        self.registry.drain(reason)
        self.peers.close_links()  # their clients resume through the balancer at once
        # Never blocks: a stuck audit disk must not hold the drain up (the
        # event waits in order for room instead).
        self.auditor.emit_nowait("admin.action", action="drain", reason=reason)
        with trio.move_on_after(self.config.sessions.drain_timeout_s) as scope:
            await self._wait_links_gone()
        if scope.cancelled_caught:
            log.warning("gateway.drain.timeout: %d links still open after %gs", self._links,
                        self.config.sessions.drain_timeout_s)
        # Last, so exec links that cannot resume keep their shells to the end:
        # agents reconnect elsewhere and keep every shell (the sessions' close
        # on shutdown then cannot reach them to kill them).
        with trio.move_on_after(self.agents.options.close_timeout_s):
            await self.agents.drain(reason)
        log.info("gateway.drain.complete")

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("gateway.signal %s: draining", signal.Signals(signum).name)
                self.shutdown(f"gateway received {signal.Signals(signum).name}")

    # ------------------------------------------------------------------- run

    async def _close_stale(self, mirror: StoreMirror) -> None:
        """SQLite: this gateway's sessions from a previous run died with it; mark them closed."""
        try:
            closed = await mirror.close_stale()
        except StoreError as exc:
            log.warning("gateway.store.stale.failed: %s (records of a previous run stay as "
                        "they were)", exc)
            return
        if closed:
            log.info("gateway.store.stale: %d sessions of a previous run marked closed", closed)

    def _banner(self) -> None:
        lines = [f"podterm gateway listening on {self.url}"]
        if self.admin_token is not None and self.admin_token_generated:
            lines.append(f"  web terminal: {self.url}/#token={self.admin_token}")
            lines.append(f"  CLI: export PODTERM_SERVER={self.url} PODTERM_TOKEN={self.admin_token}")
        else:
            lines.append(f"  web terminal: {self.url}/")
        # stdout, once, never the log: the log redacts tokens, this must show it.
        print("\n".join(lines), file=sys.stdout, flush=True)

    async def run(self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Bind, serve, drain on :meth:`shutdown`, return when drained.

        The audit sink and the recording writer run in a nursery *outside*
        the root one: sessions end (and write their last records) before
        ``gateway.stop`` is written and both writers flush and close.

        Raises:
            ConfigError: the recordings directory or the audit log cannot be
                written, or the store cannot be used.
            OSError: the listener cannot be bound.
        """
        await self.auditor.preflight()
        try:
            async with trio.open_nursery() as outer:
                await outer.start(self.auditor.run)
                reason, failed = "cancelled", False
                try:
                    await self._serve(task_status=task_status)
                    reason = self._shutdown_reason
                except Exception as exc:
                    reason, failed = f"failed: {type(exc).__name__}: {exc}", True
                    raise
                finally:
                    await self.auditor.aclose(reason, failed=failed)  # shielded, bounded
        except BaseExceptionGroup as group:
            # The outer nursery only wraps: re-raise the one error bare, so
            # callers see OSError / ConfigError as before (main maps them).
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _serve(self, *, task_status: trio.TaskStatus[Gateway]) -> None:
        """The root nursery: store, registry, listeners; returns when drained."""
        worker = self.options.worker
        listeners: list[Any] = list(await open_listeners(
            self.config.listen.host, self.config.listen.port, reuse_port=worker is not None))
        context = self.ssl_context
        tls_listener = context is not None and not self.client_policy.proxy_protocol
        if tls_listener:
            # With --proxy-protocol, _handle reads the header first, then TLS.
            assert context is not None
            listeners = [trio.SSLListener(lst, context, https_compatible=True)
                         for lst in listeners]
        first = listeners[0]
        sock = first.transport_listener.socket if tls_listener else first.socket
        host, port = sock.getsockname()[:2]
        self.port = port
        self.host = host
        self.url = f"{'https' if self.ssl_context else 'http'}://{join_host_port(host, port)}"
        # A worker listens for its peers on its own port (127.0.0.1, or the
        # --advertise host): the holder address of its sessions (docs/ha.md).
        advertise = self.config.cluster.advertise
        peer_listeners: list[Any] = []
        if worker is not None:
            peer_host = parse_peer_address(advertise)[0] if advertise else "127.0.0.1"
            try:
                peer_listeners = list(await trio.open_tcp_listeners(0, host=peer_host))
            except BaseException:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                raise
            peer_port = peer_listeners[0].socket.getsockname()[1]
            if context is not None:
                peer_listeners = [trio.SSLListener(lst, context, https_compatible=True)
                                  for lst in peer_listeners]
            self.peers.set_address(format_peer_address(peer_host, peer_port))
        else:
            self.peers.set_address(advertise or join_host_port(host, port))
        listeners += peer_listeners
        try:
            async with trio.open_nursery() as root:
                # The store before the registry: the first create writes to it.
                await root.start(self.store.run)
                if self.mirror is not None:
                    self.mirror.holder = self.peers.address
                    if self.store.backend == "sqlite":
                        await self._close_stale(self.mirror)
                await root.start(self.registry.run)
                if self.agent_coordinator is not None:
                    await root.start(self.agent_coordinator.run)
                # --policy: reloaded when the file changes (policy.reload events).
                await root.start(self.policy.run)
                tls = self.config.tls
                if self.ssl_context is not None and tls.cert_file and tls.key_file:
                    # New handshakes pick up a renewed certificate; open ones keep theirs.
                    await root.start(CertReloader(self.ssl_context, tls.cert_file,
                                                  tls.key_file).run)
                if self.lag is not None:
                    await root.start(self.lag.run)
                if self.options.handle_signals and threading.current_thread() is \
                        threading.main_thread():
                    root.start_soon(self._watch_signals)
                async with trio.open_nursery() as connections:
                    # Quiet attached links keep no receiver task: this one task
                    # watches their sockets (net/idle.py).  Cancelled with the
                    # connections, it hands every link it holds back to them.
                    idle = IdleSockets()
                    await connections.start(idle.run)
                    self.attach.idle = idle
                    self._lend_watcher(idle)  # and the local upstream's quiet terminals
                    accept_scope = trio.CancelScope()

                    async def accept() -> None:
                        with accept_scope:
                            public = listeners[:len(listeners) - len(peer_listeners)]
                            async with trio.open_nursery() as acceptors:
                                if worker is not None:
                                    # Sibling workers hand this one the sockets of
                                    # clients whose sessions it holds (handoff.py).
                                    await acceptors.start(functools.partial(
                                        serve_handoffs, handoff_path(
                                            os.path.dirname(worker.peers_file), worker.index),
                                        self._handle_handoff, handler_nursery=connections))
                                if peer_listeners:
                                    acceptors.start_soon(functools.partial(
                                        serve_listeners,
                                        functools.partial(self._handle, peer_link=True),
                                        peer_listeners, handler_nursery=connections))
                                await serve_listeners(self._handle, public,
                                                      handler_nursery=connections)

                    connections.start_soon(accept)
                    # Start-up allocations are done: freeze them, tune the GC.
                    await root.start(self.gc.run)
                    if self.config.ready_file:
                        payload: dict[str, Any] = {"url": self.url, "pid": os.getpid(),
                                                   "workers": 1}
                        if self.admin_token_generated:
                            payload["token"] = self.admin_token
                        _write_ready_file(self.config.ready_file, payload)
                    if self.options.print_banner:
                        self._banner()
                    log.info("gateway.start.complete %s", self.url)
                    self.auditor.gateway_started(self.url)
                    task_status.started(self)
                    await self._shutdown.wait()
                    await self._drain()
                    accept_scope.cancel()
                    self.attach.idle = None
                    self._lend_watcher(None)
                    connections.cancel_scope.cancel()
                root.cancel_scope.cancel()
        except* StoreError as group:
            # Only faults retrying cannot fix escape a store's run (a SQLite
            # file from a newer podterm): a configuration problem, exit 2.
            raise ConfigError(f"session store {redact_url(self.config.store.url)}: "
                              f"{group.exceptions[0]}") from None
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)
            with trio.CancelScope(shield=True):
                await self.configured_auth.aclose()  # the apiserver client's idle sockets
            log.info("gateway.stop.complete")


async def serve(config: ServeConfig, *, options: GatewayOptions | None = None,
                task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the gateway until :meth:`Gateway.shutdown` (or a signal) and the drain end.

    ``await nursery.start(serve, config)`` returns the running :class:`Gateway`.

    Raises:
        ConfigError: the token file or TLS files cannot be used.
        OSError: the listener cannot be bound.
    """
    gateway = Gateway(config, options or GatewayOptions())
    await gateway.run(task_status=task_status)


def main(config: ServeConfig) -> int:
    """``podterm serve``: run until SIGTERM/SIGINT and the drain; 0 on a clean exit.

    ``--workers N`` above 1 runs the supervisor instead (``podterm.gateway.workers``).
    """
    if config.workers.count > 1:
        from podterm.gateway import workers

        return workers.main(config)
    return serve_exit_status(config, lambda: trio.run(_main, config))


async def _main(config: ServeConfig) -> None:
    await serve(config, options=GatewayOptions(handle_signals=True, print_banner=True))

