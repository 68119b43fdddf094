"""How the agent reaches its gateway: URL, TLS, credentials, registration, and the retry loop.

The agent dials out and never listens.  :class:`Dialer` makes one connection
attempt: it resolves the gateway's name again every time (a load balancer or
a DNS change may send the agent to any replica), opens TCP (and TLS for
``https://`` gateways: the server verified against ``--ca``, mutual TLS with
``--cert``/``--key``), and upgrades to WebSocket with subprotocol
``podterm.tunnel.v1``, sending:

* ``Authorization: Bearer <token>`` when ``--token-file`` is given.  The file
  is re-read whenever it changed since the last attempt (a projected
  service-account token is rotated by the kubelet, by swapping a symlink);
* the registration headers (``X-Podterm-Namespace``, ``X-Podterm-Pod``,
  ``X-Podterm-Agent-Id``, ``X-Podterm-Containers``, ``X-Podterm-Agent-Version``,
  ``X-Podterm-Capacity``; see :mod:`podterm.gateway.agents`).

:meth:`Dialer.run` is the reconnect loop: exponential backoff with full
jitter between attempts (first retry within ``backoff_base_s``, capped at
``backoff_cap_s``), behind a circuit breaker that stops attempts for
``breaker_cooldown_s`` after ``breaker_threshold`` failures in a row, then
lets one trial through.  A connection that registered resets both; a gateway
that says ``drain`` is left at once and the next attempt starts without delay
(the load balancer sends it to another replica).
"""

from __future__ import annotations

import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import trio

from podterm.errors import ConfigError, HandshakeError
from podterm.net.tls import client_context
from podterm.net.wsconn import WebSocketStream, connect
from podterm.resilience.backoff import Backoff
from podterm.resilience.breaker import BreakerState, CircuitBreaker
from podterm.upstream.agent import (
    AGENTS_PATH,
    HEADER_AGENT_ID,
    HEADER_AGENT_VERSION,
    HEADER_CAPACITY,
    HEADER_CONTAINERS,
    HEADER_NAMESPACE,
    HEADER_POD,
    SUBPROTOCOL,
    TUNNEL_LIMITS,
)

__all__ = [
    "ConnectionOutcome",
    "Dialer",
    "DialerStatistics",
    "Registration",
    "TokenFile",
    "tunnel_url",
]

log = logging.getLogger(__name__)

#: A token file larger than this is not a token (a projected SA token is ~1 KiB).
_MAX_TOKEN_FILE_BYTES = 64 * 1024


def tunnel_url(gateway: str) -> str:
    """The agent endpoint's WebSocket URL for a gateway URL (``https://`` → ``wss://``).

    A path in the gateway URL is kept as a prefix (a gateway behind an
    ingress at ``/podterm``).

    Raises:
        ConfigError: not an ``http://`` or ``https://`` URL with a host.
    """
    parts = urlsplit(gateway)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--gateway: expected an http:// or https:// URL, got {gateway!r}")
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + AGENTS_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class TokenFile:
    """A bearer token file, re-read when it changes.

    The file is checked (``stat``) at every :meth:`read`; its content is read
    again only if its inode, size or modification time changed.  Whitespace
    around the token is stripped.
    """

    __slots__ = ("path", "_stamp", "_token", "reloads")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self.reloads = 0

    def __repr__(self) -> str:
        return f"<TokenFile {str(self.path)!r} reloads={self.reloads}>"

    def read(self) -> str:
        """The current token.

        Raises:
            ConfigError: the file cannot be read, is too large, or holds no token.
        """
        try:
            st = self.path.stat()  # follows the kubelet's ..data symlink swap
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                if st.st_size > _MAX_TOKEN_FILE_BYTES:
                    raise ConfigError(f"--token-file {str(self.path)!r}: larger than "
                                      f"{_MAX_TOKEN_FILE_BYTES} bytes; not a token")
                token = self.path.read_text(encoding="utf-8").strip()
                if not token or any(c.isspace() for c in token):
                    raise ConfigError(f"--token-file {str(self.path)!r}: expected one token "
                                      "without whitespace")
                if self._stamp is not None:
                    log.info("agent.token.reloaded %s", self.path)
                self._stamp, self._token = stamp, token
                self.reloads += 1
        except OSError as exc:
            raise ConfigError(f"--token-file {str(self.path)!r}: {exc.strerror or exc}") from exc
        return self._token


@dataclass(frozen=True, slots=True)
class Registration:
    """The pod identity and facts an agent registers (sent as upgrade headers)."""

    namespace: str
    pod: str
    agent_id: str
    containers: tuple[str, ...] = ()
    version: str = ""
    capacity: int = 0

    def headers(self) -> list[tuple[str, str]]:
        out = [(HEADER_NAMESPACE, self.namespace), (HEADER_POD, self.pod),
               (HEADER_AGENT_ID, self.agent_id)]
        if self.containers:
            out.append((HEADER_CONTAINERS, ",".join(self.containers)))
        if self.version:
            out.append((HEADER_AGENT_VERSION, self.version))
        if self.capacity:
            out.append((HEADER_CAPACITY, str(self.capacity)))
        return out


@dataclass(frozen=True, slots=True)
class ConnectionOutcome:
    """How one tunnel connection ended (what the retry loop needs to know).

    Attributes:
        registered: the RESUME exchange completed (the gateway took us).
        drained: the gateway asked us to reconnect elsewhere now.
        reason: a short description for the log.
    """

    registered: bool
    drained: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DialerStatistics:
    """A snapshot of the reconnect loop."""

    attempts: int
    failures: int  # attempts that did not connect, or ended before registering
    connections: int  # connections that registered
    drains: int  # connections a draining gateway ended
    breaker: BreakerState
    last_error: str | None


class Dialer:
    """One connection attempt at a time, and the loop that keeps the agent connected.

    Args:
        gateway: the gateway URL (``http://`` or ``https://``), as ``--gateway``.
        registration: what the agent registers.
        ca_file, cert_file, key_file: TLS trust and mutual TLS identity.
        token_file: a bearer token file (re-read on change).
        backoff_base_s, backoff_cap_s: the retry delay's first and largest window.
        breaker_threshold, breaker_cooldown_s: failures in a row that stop
            attempts, and for how long.
        rng: randomness for the jitter (tests pass a seeded one).

    Raises:
        ConfigError: a bad URL or unusable TLS files (checked once, here).
    """

    def __init__(self, gateway: str, registration: Registration, *,
                 ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, token_file: str | None = None,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0,
                 breaker_threshold: int = 5, breaker_cooldown_s: float = 30.0,
                 rng: Callable[[], float] = random.random) -> None:
        self.gateway = gateway
        self.url = tunnel_url(gateway)
        self.registration = registration
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.token = TokenFile(token_file) if token_file else None
        self.backoff = Backoff(backoff_base_s, backoff_cap_s, rng=rng)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s)
        self._secure = self.url.startswith("wss://")
        if self._secure:
            self._ssl_context()  # fail early on unusable files (exit status 2)
        self._attempts = 0
        self._failures = 0
        self._connections = 0
        self._drains = 0
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return (f"<Dialer {self.url} attempts={self._attempts} "
                f"breaker={self.breaker.state.value}>")

    def statistics(self) -> DialerStatistics:
        return DialerStatistics(self._attempts, self._failures, self._connections,
                                self._drains, self.breaker.state, self._last_error)

    def _ssl_context(self) -> ssl.SSLContext:
        # Built per attempt: a renewed certificate (cert-manager, a rotated
        # projected volume) is picked up by the next connection.
        return client_context(self.ca_file, self.cert_file, self.key_file)

    def _headers(self) -> list[tuple[str, str]]:
        headers = self.registration.headers()
        if self.token is not None:
            headers.append(("Authorization", f"Bearer {self.token.read()}"))
        return headers

    async def connect(self) -> WebSocketStream:
        """One attempt: TCP (+TLS), then the upgrade.  The caller bounds it.

        Raises:
            OSError: no TCP connection (refused, unreachable, TLS failure).
            HandshakeError: the gateway refused the upgrade (401, 403, 503, ...).
            ConfigError: the token or TLS files cannot be read now.
        """
        headers = self._headers()
        ws, _ = await connect(self.url, subprotocols=[SUBPROTOCOL], headers=headers,
                              ssl_context=self._ssl_context() if self._secure else None,
                              limits=TUNNEL_LIMITS)
        return ws

    async def run(self, serve: Callable[[WebSocketStream], Awaitable[ConnectionOutcome]], *,
                  connect_timeout_s: float = 10.0) -> None:
        """Keep connecting and hand each connection to ``serve``; never returns.

        ``serve`` owns the WebSocket and returns when the connection is over.
        See the module docstring for the retry policy.
        """
        backoff = self.backoff
        breaker = self.breaker
        while True:
            now = trio.current_time()
            if not breaker.allow(now):
                retry_at = breaker.retry_at
                log.info("agent.connect.paused: circuit open after %d failures; next try "
                         "in %.1fs", breaker.statistics().consecutive_failures,
                         (retry_at or now) - now)
                await trio.sleep_until(retry_at if retry_at is not None else now + 1.0)
                continue
            self._attempts += 1
            try:
                with trio.fail_after(connect_timeout_s):
                    ws = await self.connect()
            except (OSError, HandshakeError, ConfigError, trio.TooSlowError) as exc:
                self._failures += 1
                self._last_error = _describe(exc)
                breaker.record_failure(trio.current_time())
                delay = next(backoff)
                level = (logging.WARNING if isinstance(exc, HandshakeError)
                         and exc.http_status in (401, 403) else logging.INFO)
                log.log(level, "agent.connect.failed %s: %s; retrying in %.2fs", self.url,
                        self._last_error, delay)
                await trio.sleep(delay)
                continue
            outcome = await serve(ws)
            if outcome.registered:
                self._connections += 1
                breaker.record_success(trio.current_time())
                backoff.reset()
            else:
                self._failures += 1
                breaker.record_failure(trio.current_time())
            self._last_error = outcome.reason or None
            if outcome.drained:
                self._drains += 1
                log.info("agent.connect.drained: %s; reconnecting now", outcome.reason)
                continue
            delay = next(backoff)
            log.info("agent.connect.lost %s: %s; reconnecting in %.2fs", self.url,
                     outcome.reason, delay)
            await trio.sleep(delay)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, HandshakeError | ConfigError):
        return exc.message
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc)
