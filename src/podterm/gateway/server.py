"""``podterm serve``: the gateway's task tree, start-up and drain.

The task tree (STYLE.md §2; every task has a parent)::

    serve(config)                          root nursery
    ├── SessionRegistry.run                sessions' nursery: every Session.run
    │   └── Session.run × N                supervisor + output pump + input pump
    ├── LoopLagProbe.run                   event-loop lag for /metrics
    ├── _watch_signals                     SIGTERM/SIGINT → drain (main thread only)
    ├── _accept_loop                       trio.serve_listeners; cancelled first on drain
    └── connection nursery                 one task per connection: HTTP, or an
        └── serve_http → router → ...      attachment's receiver (+ its sender)

``await nursery.start(serve, config)`` returns a :class:`Gateway` once the
listeners are bound (its ``url``, ``port``, ``admin_token`` and ``registry``),
which is how tests run it.  :func:`main` is the CLI entry point.

Drain (:meth:`Gateway.shutdown`, or SIGTERM/SIGINT): ``/readyz`` turns 503 and
new sessions and attaches are refused (503 ``unavailable``) while the
listeners stay open (so probes see the 503); every attached client gets
CONTROL ``drain`` then close 1001; once no link is left, or
``drain_timeout_s`` has passed, the listeners close and the root is cancelled
(the sessions end, their upstreams are killed) and ``main`` returns 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from podterm.auth.authn import TokenAuthenticator, generate_admin_token
from podterm.config import ServeConfig
from podterm.errors import ConfigError
from podterm.gateway.admin import AdminApi
from podterm.gateway.api import SESSION_ID, SessionsApi
from podterm.gateway.attach import AttachHandler
from podterm.gateway.http import HttpLimits, Response, Upgraded, serve_http
from podterm.gateway.router import Call, Route, Router
from podterm.gateway.static import StaticFiles
from podterm.metrics import GatewayCounters, LoopLagProbe
from podterm.net.tls import CertReloader, server_context
from podterm.protocol.websocket import WsLimits
from podterm.session.registry import SessionRegistry
from podterm.session.ring import DEFAULT_CHUNK_BYTES
from podterm.session.session import SessionLimits
from podterm.upstream.base import Upstream
from podterm.upstream.local import LocalUpstream

__all__ = ["Gateway", "GatewayOptions", "main", "serve", "session_limits"]

log = logging.getLogger(__name__)

#: A create body with a 64 KiB command (escaped JSON can double it) and env fits.
_MIN_BODY_BYTES = 192 * 1024


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
    """

    handle_signals: bool = False
    print_banner: bool = False
    web_dir: Path | None = None
    upstreams: dict[str, Upstream] | None = None
    session_limits: SessionLimits | None = None
    lag_probe_interval_s: float = 0.5


def session_limits(config: ServeConfig) -> SessionLimits:
    """Map ``config.sessions`` to :class:`SessionLimits`.

    The ring is rounded up to whole 4 KiB chunks (the ring's unit of allocation).
    """
    s = config.sessions
    chunk = DEFAULT_CHUNK_BYTES
    ring = -(-s.ring_bytes // chunk) * chunk
    return SessionLimits(ring_bytes=ring, ring_chunk_bytes=chunk,
                         window_bytes=min(s.window_bytes, ring), grace_s=s.grace_s,
                         idle_timeout_s=s.idle_timeout_s, max_age_s=s.max_age_s,
                         heartbeat_interval_s=s.heartbeat_interval_s)


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
        default = config.upstream.kind
        if default not in upstreams:
            log.warning("gateway.upstream.unavailable: upstream %r is not wired into this "
                        "gateway yet; sessions that name none use 'local'", default)
            default = "local"
        if config.listen.proxy_protocol:
            log.warning("gateway.proxy_protocol.unsupported: --proxy-protocol is not "
                        "implemented yet; connections are read as plain HTTP")
        self.registry = SessionRegistry(
            upstreams, default_upstream=default, limits=self.limits, counters=self.counters,
            max_sessions=config.limits.max_sessions,
            max_sessions_per_user=config.limits.max_sessions_per_user)
        self.lag = (LoopLagProbe(options.lag_probe_interval_s)
                    if options.lag_probe_interval_s > 0 else None)
        self.static = StaticFiles(options.web_dir) if options.web_dir else StaticFiles()
        self.attach = AttachHandler(self.registry, self.counters, ws_limits=WsLimits(
            max_frame_bytes=config.limits.max_frame_bytes,
            max_message_bytes=config.limits.max_message_bytes))
        self.admin = AdminApi(self.registry, self.counters, self.lag, lambda: self.draining)
        self.router = Router(self._routes(), authenticator=self.authenticator,
                             counters=self.counters)
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
        self._per_ip: dict[str, int] = {}
        self._links = 0
        self._links_lot = trio.lowlevel.ParkingLot()
        self._shutdown = trio.Event()
        self._shutdown_reason = "gateway shutting down"

    def __repr__(self) -> str:
        return (f"<Gateway {self.url or 'unbound'} sessions={len(self.registry)} "
                f"links={self._links}{' draining' if self.draining else ''}>")

    # ---------------------------------------------------------------- routes

    def _routes(self) -> list[Route]:
        return [
            *self.admin.routes(),
            Route.make("GET", rf"/api/v1/sessions/{SESSION_ID}/attach", self._attach,
                       websocket=True),
            *SessionsApi(self.registry).routes(),
            Route.make("GET", r"/(?!api/).*", self._static, public=True),
        ]

    async def _attach(self, call: Call) -> Upgraded:
        upgraded = await self.attach(call)
        run = upgraded.run
        if run is None:
            return upgraded

        async def counted() -> None:
            self._links += 1
            try:
                await run()
            finally:
                self._links -= 1
                if self._links == 0:
                    self._links_lot.unpark_all()

        return Upgraded(counted)

    async def _static(self, call: Call) -> Response:
        return self.static.serve(call.request)

    # ----------------------------------------------------------- connections

    async def _handle(self, stream: trio.abc.Stream) -> None:
        peer = "?"
        sock = getattr(stream, "socket", None) or getattr(
            getattr(stream, "transport_stream", None), "socket", None)
        if sock is not None:
            try:
                host, port = sock.getpeername()[:2]
                peer = f"{host}:{port}"
            except OSError:
                pass
        ip = peer.rpartition(":")[0]
        cap = self.config.limits.max_connections_per_ip
        if cap and self._per_ip.get(ip, 0) >= cap:
            # One address holds its share of the descriptor budget: refuse
            # this connection before reading anything.
            await trio.aclose_forcefully(stream)
            return
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._connections += 1
        try:
            upgraded = await serve_http(stream, self.router, limits=self.http_limits,
                                        counters=self.counters,
                                        keep_alive=lambda: not self.draining, peer=peer)
            if upgraded is not None and upgraded.run is not None:
                try:
                    await upgraded.run()
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
        except Exception:
            # A bug ends only its own connection (STYLE.md §3), never the gateway.
            log.exception("gateway.connection.failed", extra={"peer": peer})
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        finally:
            self._connections -= 1
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

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
        with trio.move_on_after(self.config.sessions.drain_timeout_s) as scope:
            await self._wait_links_gone()
        if scope.cancelled_caught:
            log.warning("gateway.drain.timeout: %d links still open after %gs", self._links,
                        self.config.sessions.drain_timeout_s)
        log.info("gateway.drain.complete")

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("gateway.signal %s: draining", signal.Signals(signum).name)
                self.shutdown(f"gateway received {signal.Signals(signum).name}")

    # ------------------------------------------------------------------- run

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
        """Bind, serve, drain on :meth:`shutdown`, return when drained."""
        listeners: list[Any] = list(await trio.open_tcp_listeners(
            self.config.listen.port, host=self.config.listen.host))
        if self.ssl_context is not None:
            listeners = [trio.SSLListener(lst, self.ssl_context, https_compatible=True)
                         for lst in listeners]
        first = listeners[0]
        sock = first.transport_listener.socket if self.ssl_context else first.socket
        host, port = sock.getsockname()[:2]
        self.port = port
        self.host = host
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if self.ssl_context else 'http'}://{shown}:{port}"
        try:
            async with trio.open_nursery() as root:
                await root.start(self.registry.run)
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
                    accept_scope = trio.CancelScope()

                    async def accept() -> None:
                        with accept_scope:
                            await trio.serve_listeners(self._handle, listeners,
                                                       handler_nursery=connections)

                    connections.start_soon(accept)
                    if self.config.ready_file:
                        payload: dict[str, Any] = {"url": self.url, "pid": os.getpid(),
                                                   "workers": 1}
                        if self.admin_token_generated:
                            payload["token"] = self.admin_token
                        _write_ready_file(self.config.ready_file, payload)
                    if self.options.print_banner:
                        self._banner()
                    log.info("gateway.start.complete %s", self.url)
                    task_status.started(self)
                    await self._shutdown.wait()
                    await self._drain()
                    accept_scope.cancel()
                    connections.cancel_scope.cancel()
                root.cancel_scope.cancel()
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)
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
    """``podterm serve``: run until SIGTERM/SIGINT and the drain; 0 on a clean exit."""
    try:
        trio.run(_main, config)
    except ConfigError as exc:
        print(f"podterm serve: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"podterm serve: cannot listen on {config.listen.host}:{config.listen.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _main(config: ServeConfig) -> None:
    await serve(config, options=GatewayOptions(handle_signals=True, print_banner=True))

