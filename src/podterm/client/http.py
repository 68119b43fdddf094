"""A tiny REST client for the gateway's ``/api/v1`` (docs/protocol.md §2), on h11 over trio.

One request per connection (``Connection: close``): the CLI makes one or two
calls per run, so a pool would only add state.  TLS comes from ``--ca FILE``
(verify against that CA) or ``--insecure-skip-tls-verify``; otherwise the
system trust store.

Every failure becomes a :class:`~podterm.errors.PodtermError` subclass whose
message is one line a person can act on:

* the server answered an error: the class follows the HTTP status (401 →
  :class:`~podterm.errors.AuthError`, 404 → :class:`~podterm.errors.NotFoundError`,
  ...), the message is the server's ``error.message``;
* the server could not be reached, TLS failed or the answer was not HTTP:
  :class:`ServerUnreachable`.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import h11
import trio

from podterm import errors

__all__ = ["ApiClient", "ServerAddress", "ServerUnreachable", "make_ssl_context", "os_error_reason",
           "parse_server"]

# Bodies are small JSON documents (a session list of a few thousand items at
# most); 16 MiB bounds a broken or hostile server.
_MAX_BODY = 16 * 1024 * 1024
# h11's default cap on an incomplete event (headers) is 16 KiB; keep it.
_RECEIVE_CHUNK = 65536


class ServerUnreachable(errors.PodtermError):
    """The gateway could not be reached or did not answer HTTP (exit status 1)."""

    http_status = 503
    outcome = "error"
    reason_name = "ServiceUnavailable"


# HTTP status → the error class a caller can catch (errors.py's tree).
_STATUS_ERRORS: dict[int, type[errors.PodtermError]] = {
    400: errors.BadRequestError,
    401: errors.AuthError,
    403: errors.ForbiddenError,
    404: errors.NotFoundError,
    409: errors.ConflictError,
    410: errors.GoneError,
    429: errors.RateLimitedError,
}

# What to tell the person, per status, after the server's own message.
_HINTS: dict[int, str] = {
    401: " (check --token / PODTERM_TOKEN)",
    403: " (your identity may not do this)",
}


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where the gateway is: parsed from ``--server``."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    base_path: str  # "" or a prefix such as "/podterm" (no trailing slash)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def http_url(self, path: str) -> str:
        return f"{self.scheme}://{self.authority}{self.base_path}{path}"

    def ws_url(self, path: str) -> str:
        """The WebSocket URL of ``path`` (``ws://`` or ``wss://``)."""
        return f"{'wss' if self.tls else 'ws'}://{self.authority}{self.base_path}{path}"


def parse_server(url: str) -> ServerAddress:
    """Parse ``--server``: ``http(s)://host[:port][/prefix]``; a bare ``host:port`` means http.

    Raises:
        ConfigError: not a usable URL.
    """
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("ws", "wss"):
        scheme = "http" if scheme == "ws" else "https"
    if scheme not in ("http", "https"):
        raise errors.ConfigError(f"--server {url!r}: scheme must be http or https")
    if not parts.hostname:
        raise errors.ConfigError(f"--server {url!r}: no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise errors.ConfigError(f"--server {url!r}: bad port") from exc
    return ServerAddress(scheme, parts.hostname, port, parts.path.rstrip("/"))


def make_ssl_context(ca_file: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A client TLS context: the system store, or ``ca_file``, or no verification at all.

    Raises:
        ConfigError: ``ca_file`` cannot be read as PEM certificates.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(f"--ca {ca_file!r}: {exc}") from exc
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_stream(address: ServerAddress, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    """Open TCP (and TLS when ``https``) to the gateway.

    The caller bounds the time (``trio.fail_after``).

    Raises:
        ServerUnreachable: connection refused, DNS failure, TLS failure.
    """
    try:
        tcp = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise ServerUnreachable(
            f"cannot connect to {address.authority}: {os_error_reason(exc)}") from exc
    if not address.tls:
        return tcp
    ctx = ssl_context or make_ssl_context()
    stream = trio.SSLStream(tcp, ctx, server_hostname=address.host, https_compatible=True)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__
        detail = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or cause
        raise ServerUnreachable(
            f"TLS handshake with {address.authority} failed: {detail} "
            "(use --ca FILE, or --insecure-skip-tls-verify for testing)") from exc
    return stream


def os_error_reason(exc: OSError) -> str:
    """The errno text behind a connect failure ("Connection refused"), not trio's summary.

    ``trio.open_tcp_stream`` raises ``OSError("all attempts to connect to ...
    failed")`` from a group of the per-address errors; the first errno text
    among them is what a person needs.
    """
    if exc.strerror:
        return exc.strerror
    pending: list[BaseException] = [exc.__cause__] if exc.__cause__ is not None else []
    while pending:
        cause = pending.pop(0)
        if isinstance(cause, BaseExceptionGroup):
            pending.extend(cause.exceptions)
        elif isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
            return os.strerror(cause.errno)
    return str(exc)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class ApiClient:
    """The gateway's REST API, one request per connection.

    Args:
        server: ``--server`` URL.
        token: the bearer token (``--token``); ``None`` sends no Authorization.
        ssl_context: for ``https`` servers (:func:`make_ssl_context`).
        timeout_s: bound on each whole request (connect, send, answer).
    """

    def __init__(self, server: str | ServerAddress, token: str | None, *,
                 ssl_context: ssl.SSLContext | None = None, timeout_s: float = 30.0) -> None:
        self.address = server if isinstance(server, ServerAddress) else parse_server(server)
        self.token = token
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"<ApiClient {self.address.http_url('')}>"

    def auth_headers(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.token}")] if self.token else []

    # ---- the endpoints ---------------------------------------------------------------------

    async def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/v1/sessions``: the new session, with ``resume_token`` and ``attach_url``."""
        return self._object(await self.request("POST", "/api/v1/sessions", body), "session")

    async def list_sessions(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        """``GET /api/v1/sessions`` (``?all=1`` with ``all_users``): the session objects."""
        path = "/api/v1/sessions" + ("?all=1" if all_users else "")
        answer = self._object(await self.request("GET", path), "session list")
        items = answer.get("items")
        if not isinstance(items, list):
            raise ServerUnreachable(f"{self.address.authority}: session list without items")
        return items

    async def get_session(self, session_id: str) -> dict[str, Any]:
        """``GET /api/v1/sessions/{id}``."""
        return self._object(await self.request("GET", _session_path(session_id)), "session")

    async def kill_session(self, session_id: str) -> dict[str, Any]:
        """``DELETE /api/v1/sessions/{id}``: the session, now ``closed``."""
        return self._object(await self.request("DELETE", _session_path(session_id)), "session")

    def attach_url(self, session_id: str, *, offset: int = 0, mode: str = "rw",
                   resume_token: str | None = None) -> str:
        """The ``ws(s)://`` URL to attach to ``session_id`` from ``offset`` (§3)."""
        query: dict[str, str | int] = {"offset": offset, "mode": mode}
        if resume_token:
            query["resume_token"] = resume_token
        return self.address.ws_url(f"{_session_path(session_id)}/attach?{urlencode(query)}")

    # ---- the transport ---------------------------------------------------------------------

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the decoded JSON of a 2xx answer.

        Raises:
            PodtermError: the error class for the HTTP status, or ServerUnreachable.
        """
        response = await self.send(method, path, body)
        if 200 <= response.status < 300:
            try:
                return response.json()
            except ValueError as exc:
                raise ServerUnreachable(
                    f"{method} {path}: the server's answer is not JSON") from exc
        raise _error_for(method, path, response)

    async def send(self, method: str, path: str, body: Any = None) -> Response:
        """Send one request and return the raw response, whatever its status."""
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", self.address.authority), ("User-Agent", "podterm-cli"),
                   ("Accept", "application/json"), ("Connection", "close"),
                   *self.auth_headers()]
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        elif method in ("POST", "PUT", "PATCH", "DELETE"):
            headers.append(("Content-Length", "0"))
        target = self.address.base_path + path
        try:
            with trio.fail_after(self.timeout_s):
                stream = await open_stream(self.address, self.ssl_context)
                try:
                    return await _exchange(stream, method, target, headers, payload)
                finally:
                    await trio.aclose_forcefully(stream)
        except trio.TooSlowError as exc:
            raise ServerUnreachable(f"{method} {self.address.http_url(path)}: no answer within "
                                    f"{self.timeout_s:g}s") from exc
        except (trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise ServerUnreachable(f"{method} {self.address.http_url(path)}: "
                                    f"connection failed ({exc or type(exc).__name__})") from exc

    @staticmethod
    def _object(value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ServerUnreachable(f"the server's {what} is not a JSON object")
        return value


def _session_path(session_id: str) -> str:
    return f"/api/v1/sessions/{quote(session_id, safe='')}"


async def _exchange(stream: trio.abc.Stream, method: str, target: str,
                    headers: list[tuple[str, str]], payload: bytes) -> Response:
    conn = h11.Connection(h11.CLIENT)
    out = conn.send(h11.Request(method=method, target=target, headers=headers))
    if payload:
        out += conn.send(h11.Data(data=payload))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
    status = 0
    response_headers: list[tuple[bytes, bytes]] = []
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_RECEIVE_CHUNK)))
        elif isinstance(event, h11.Response):
            status = event.status_code
            response_headers = list(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_BODY:
                raise h11.RemoteProtocolError(f"response body over {_MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return Response(status, response_headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed before the response ended")
        # h11.InformationalResponse (100 Continue) and others: keep reading


def _error_for(method: str, path: str, response: Response) -> errors.PodtermError:
    code = ""
    message = ""
    try:
        document = response.json()
        if isinstance(document, dict) and isinstance(document.get("error"), dict):
            code = str(document["error"].get("code", ""))
            message = str(document["error"].get("message", ""))
    except ValueError:
        pass
    if not message:
        # Not our JSON error (a load balancer's page?): its first line, shortened.
        lines = response.body.decode("utf-8", "replace").strip().splitlines()
        message = lines[0][:200] if lines else ""
    text = f"{method} {path}: {response.status} {code or 'error'}"
    if message:
        text += f": {message}"
    text += _HINTS.get(response.status, "")
    cls = _STATUS_ERRORS.get(response.status)
    if cls is None:
        if response.status in (502, 503, 504):
            return ServerUnreachable(text)
        return errors.PodtermError(text, http_status=response.status)
    return cls(text)
