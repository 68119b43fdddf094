"""HTTP/1.1 on one connection, with h11: requests in, responses out, errors mapped once.

:func:`serve_http` drives an ``h11.Connection`` over a trio stream for as long
as the client keeps the connection alive, and hands each request to a
*handler* (the router).  The handler returns a :class:`Response`, or accepts
a WebSocket upgrade and returns :class:`Upgraded` with the coroutine that runs
the WebSocket.  :func:`serve_http` then returns that to its caller, which runs
it *after* the HTTP state (h11 connection, request, headers) is released: an
attached session must not pay for the HTTP request that attached it.

Bounds (every one is a :class:`HttpLimits` field):

* the request head is at most ``max_header_bytes`` (h11 answers 431 beyond);
* a body is at most ``max_body_bytes`` (413); REST bodies are tiny;
* slowloris: the first byte of a request must come within ``header_timeout_s``
  on a new connection (``keepalive_timeout_s`` on a kept-alive one), and the
  whole head within ``header_timeout_s`` of its first byte; the body within
  ``body_timeout_s``.  A client whose head started and did not finish in
  time gets ``408`` and is disconnected (and reported to
  ``on_protocol_error``); an idle one is disconnected without a word;
* a kept-alive connection serves at most ``max_requests`` requests.

Error handling: this module is the one boundary where errors become HTTP
answers.  A :class:`~podterm.errors.PodtermError` from a handler becomes its
``http_status`` with a JSON body ``{"error": {"code", "message"}}``
(docs/protocol.md §2); an h11 protocol error becomes its status hint; any
other exception is a bug: it is logged with its traceback and answered
``500 internal`` with no detail.  A stack trace never reaches the client.
"""

from __future__ import annotations

import errno
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from podterm.auth.identity import Identity
from podterm.errors import PodtermError
from podterm.metrics import GatewayCounters
from podterm.net.clientaddr import ClientAddress, ClientAddressPolicy, Via, resolve_request

__all__ = [
    "ERROR_CODES",
    "HttpLimits",
    "Request",
    "Response",
    "Upgraded",
    "aclose_unless_closed",
    "error_code",
    "error_response",
    "json_response",
    "new_request_id",
    "raw_response",
    "send_and_close",
    "serve_http",
    "serve_listeners",
]

log = logging.getLogger(__name__)

#: docs/protocol.md §2: the ``code`` of an error body, by HTTP status.
ERROR_CODES: Final[dict[int, str]] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "bad_request",
    408: "bad_request",
    409: "conflict",
    410: "gone",
    411: "bad_request",
    413: "bad_request",
    415: "bad_request",
    426: "bad_request",
    429: "rate_limited",
    431: "bad_request",
    502: "unavailable",
    503: "unavailable",
}

#: Bytes asked of the socket per read while speaking HTTP: a request head
#: fits in one read almost always (browsers send 0.5-2 KiB).
_RECV_BYTES = 16384


def error_code(status: int) -> str:
    """The docs/protocol.md §2 error ``code`` for an HTTP status."""
    return ERROR_CODES.get(status, "internal" if status >= 500 else "bad_request")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-connection bounds.

    Attributes:
        max_header_bytes: request line plus headers; 16 KiB is h11's default
            and between nginx's 8 KiB buffers and Node's 16 KiB.
        max_body_bytes: REST bodies are small (a command of at most 64 KiB plus
            env, docs/protocol.md §2); 256 KiB leaves room and no more.
        header_timeout_s: a new connection's first byte, and any request's
            whole head once started, must arrive within this (slowloris).
            nginx's ``client_header_timeout`` is 60 s; 10 s is plenty for a
            head on any working network.
        body_timeout_s: the body must arrive within this.
        keepalive_timeout_s: an idle kept-alive connection is closed after
            this; 75 s is nginx's ``keepalive_timeout`` and outlasts the 60 s
            idle timeout of common cloud load balancers, which then close first.
        max_requests: requests served on one connection (nginx's
            ``keepalive_requests`` default is 1000).
    """

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 256 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_requests: int = 1000


@dataclass(slots=True)
class Request:
    """One HTTP request, head and (bounded) body.

    Attributes:
        method: upper-case method, e.g. ``"GET"``.
        target: the raw request target (path and query).
        path: the percent-decoded path.
        query: query parameters; for a repeated name the first value wins.
        headers: lower-case names to values; repeated headers joined by ``", "``.
        body: the whole body (empty for GET and for upgrades).
        h11_request: the request as h11 parsed it (for the upgrade helpers).
        peer: ``str(client)``, for logs (``host:port``, or a bare address
            when a forwarding header gave no port).
        is_upgrade: True when h11 saw ``Connection: upgrade`` + ``Upgrade``.
        client: the client as the gateway believes it
            (:mod:`podterm.net.clientaddr`): the socket peer, the PROXY
            header's source, or a trusted proxy's forwarding header, with
            ``via`` saying which.  Logs, audit ``source_addr`` and per-address
            limits use it (limits key on ``client.ip``, never ``ip:port``).
        identity: set by the router once the request is authenticated.
        request_id: the gateway's id for this request (``r-`` + 16 hex digits),
            sent back in ``X-Request-Id`` and carried by its audit events.
    """

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    h11_request: h11.Request
    peer: str
    is_upgrade: bool
    client: ClientAddress
    identity: Identity | None = None
    request_id: str = ""

    def json(self) -> Any:
        """The body parsed as JSON (an empty body is ``{}``).

        Raises:
            PodtermError: 400 when the body is not JSON or not UTF-8, 415 when
                the content type is set and is not JSON.
        """
        ctype = self.headers.get("content-type", "application/json").split(";")[0].strip()
        if ctype.lower() not in ("application/json", ""):
            raise PodtermError(f"expected Content-Type: application/json, got {ctype!r}",
                               http_status=415)
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PodtermError(f"request body is not valid JSON: {exc}", http_status=400) from exc


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer.

    Attributes:
        status: the status code.
        body: the whole body.
        content_type: its media type.
        headers: extra headers.
    """

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())


class Upgraded:
    """A handler took the connection over (a WebSocket upgrade).

    Attributes:
        run: what serves the connection from now on (it owns the stream and
            closes it); None when the upgrade was answered and closed already.
    """

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], Awaitable[None]] | None) -> None:
        self.run = run

    def __repr__(self) -> str:
        return f"<Upgraded {'running' if self.run else 'refused'}>"


Handler = Callable[[Request, trio.abc.Stream, h11.Connection], Awaitable["Response | Upgraded"]]


def json_response(status: int, obj: Any, *,
                  headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A JSON response (compact, UTF-8, newline-terminated for curl users)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
    return Response(status, body, "application/json", headers)


def error_response(status: int, message: str, *, code: str | None = None,
                   headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """docs/protocol.md §2 error body: ``{"error": {"code", "message"}}``."""
    return json_response(status, {"error": {"code": code or error_code(status),
                                            "message": message}}, headers=headers)


def _response_for(exc: PodtermError) -> Response:
    status = exc.http_status if 400 <= exc.http_status <= 599 else 500
    extra: tuple[tuple[str, str], ...] = ()
    if status == 401:
        # RFC 6750 §3: a 401 names the scheme the client should use.
        extra = (("WWW-Authenticate", 'Bearer realm="podterm"'),)
    handshake_headers = getattr(exc, "headers", None)
    if isinstance(handshake_headers, list):
        extra += tuple((str(k), str(v)) for k, v in handshake_headers)
    return error_response(status, exc.message or type(exc).__name__, headers=extra)


def raw_response(response: Response) -> bytes:
    """``response`` as HTTP/1.1 bytes with ``Connection: close``, written without h11.

    For answers outside a request cycle, where h11 (rightly) refuses to
    send: before any request was read (a connection over a per-address cap)
    or when a request's head never completed (408).
    """
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {response.status} {phrase}", "Server: podterm",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}",
             *(f"{name}: {value}" for name, value in response.headers), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


#: How long :func:`send_and_close` may take, and how much it reads meanwhile.
_CLOSE_S = 1.0
_CLOSE_DRAIN_BYTES = 65536


async def send_and_close(stream: trio.abc.Stream, data: bytes, *,
                         timeout_s: float = _CLOSE_S) -> None:
    """Best effort: write ``data``, half-close, read until the peer closes, then close.

    Reading what the client still sends (bounded by ``timeout_s`` and 64 KiB)
    keeps the kernel from answering it with RST, which would discard the
    answer before the client read it.  Never raises for a peer that is gone.
    """
    with trio.move_on_after(timeout_s):
        try:
            await stream.send_all(data)
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            drained = 0
            while drained < _CLOSE_DRAIN_BYTES:
                chunk = await stream.receive_some(16384)
                if not chunk:
                    break
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


def _parse_request(event: h11.Request, connection: ClientAddress,
                   policy: ClientAddressPolicy) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    parts = urlsplit(target)
    query: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(k, v)
    upgrade = "upgrade" in headers and "upgrade" in headers.get("connection", "").lower()
    # Per request: a trusted L7 proxy may carry many clients on one connection.
    client = resolve_request(connection, headers, policy=policy)
    return Request(method=event.method.decode("ascii").upper(), target=target,
                   path=unquote(parts.path) or "/", query=query, headers=headers, body=b"",
                   h11_request=event, peer=str(client), is_upgrade=upgrade, client=client,
                   request_id=new_request_id())


def new_request_id() -> str:
    """A request id: 64 random bits, so ids from many gateways never collide."""
    return "r-" + secrets.token_hex(8)


#: No PROXY header, no trusted proxies: the socket peer is the client.
_SOCKET_ONLY = ClientAddressPolicy()


def _client_of(stream: trio.abc.Stream) -> ClientAddress:
    """The socket peer of ``stream`` (or of the stream under a TLS one)."""
    sock = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        host, port = "?", 0
    return ClientAddress(str(host), int(port) or None, Via.SOCKET)


class _ClientGone(Exception):
    """The peer closed or broke the connection; nothing more to answer."""


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _ClientGone() from exc


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection,
                      scope: trio.CancelScope, head_timeout_s: float | None) -> Any:
    """The next h11 event, reading as needed.

    ``head_timeout_s`` (when set) tightens ``scope``'s deadline once the first
    byte of a request arrives: the whole head must follow within it.
    """
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(_RECV_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone() from exc
        if data and head_timeout_s is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + head_timeout_s)
            head_timeout_s = None
        conn.receive_data(data if isinstance(data, bytes) else bytes(data))


async def _read_body(stream: trio.abc.Stream, conn: h11.Connection, request: Request,
                     limits: HttpLimits) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limits.max_body_bytes:
        raise PodtermError(f"request body of {int(length)} bytes exceeds the "
                           f"{limits.max_body_bytes}-byte limit", http_status=413)
    if conn.they_are_waiting_for_100_continue:
        await _send(stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    elif length is None and "transfer-encoding" not in request.headers:
        # No body (every GET, every upgrade): h11 ends the message without
        # reading, so no deadline, no scope and no await are needed.
        if type(conn.next_event()) is not h11.EndOfMessage:  # pragma: no cover - h11 says so
            raise PodtermError("unexpected HTTP event in a request without a body",
                               http_status=400)
        return
    chunks: list[bytes] = []
    total = 0
    never = trio.CancelScope()  # no head deadline for the body: one overall bound
    with trio.move_on_after(limits.body_timeout_s) as scope:
        while True:
            event = await _next_event(stream, conn, never, None)
            if isinstance(event, h11.Data):
                total += len(event.data)
                if total > limits.max_body_bytes:
                    raise PodtermError(f"request body exceeds the {limits.max_body_bytes}-byte "
                                       "limit", http_status=413)
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _ClientGone()
            else:  # pragma: no cover - h11 yields nothing else here
                raise PodtermError("unexpected HTTP event in body", http_status=400)
    if scope.cancelled_caught:
        raise PodtermError("request body not received in time", http_status=408)
    request.body = b"".join(chunks)


def _response_bytes(conn: h11.Connection, request: Request | None, response: Response,
                    close: bool) -> bytes:
    headers: list[tuple[str, str]] = [("Server", "podterm")]
    if response.status not in (204, 304):  # RFC 9110 §8.6: no body, no length of one
        headers += [("Content-Type", response.content_type),
                    ("Content-Length", str(len(response.body)))]
    headers.extend(response.headers)
    if request is not None and request.request_id:
        headers.append(("X-Request-Id", request.request_id))
    if close:
        headers.append(("Connection", "close"))
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    if (request is None or request.method != "HEAD") and response.status not in (204, 304):
        if response.body:
            out += conn.send(h11.Data(data=response.body))
    out += conn.send(h11.EndOfMessage())
    return out


def _reusable(conn: h11.Connection) -> bool:
    """True when both sides finished a request cleanly and may start another."""
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def serve_http(stream: trio.abc.Stream, handler: Handler, *, limits: HttpLimits,
                     counters: GatewayCounters, keep_alive: Callable[[], bool] = lambda: True,
                     client: ClientAddress | None = None,
                     client_policy: ClientAddressPolicy | None = None,
                     on_protocol_error: Callable[[int, str], None] | None = None,
                     on_tls_error: Callable[[ssl.SSLError], None] | None = None
                     ) -> Upgraded | None:
    """Serve HTTP/1.1 on ``stream`` until the client leaves or a limit ends it.

    Args:
        stream: the accepted connection; closed before this returns.
        handler: called once per request (body read); returns a Response or
            :class:`Upgraded` after accepting an upgrade.
        limits: the bounds above.
        counters: where requests and error answers are counted.
        keep_alive: asked before each response; False answers with
            ``Connection: close`` (the gateway is draining).
        client: the connection's client (socket peer or PROXY header,
            ``clientaddr.resolve_connection``); the socket peer when None.
        client_policy: whose forwarding headers refine ``client`` per
            request (``Request.client``); none are believed when None.
        on_protocol_error: called with the status and the reason when the
            peer broke HTTP (the audit's ``protocol.reject``).
        on_tls_error: called with the error when the TLS handshake of an
            :class:`trio.SSLStream` fails on a TLS error (a client certificate
            that does not verify, a protocol mismatch); a peer that merely
            hangs up is not reported.

    Returns:
        The :class:`Upgraded` a handler returned (the caller runs it; the
        stream is its), or None once the connection is closed.

    Error handling: see the module docstring.  ``trio.Cancelled`` propagates.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    connection = client or _client_of(stream)
    policy = client_policy or _SOCKET_ONLY
    served = 0
    upgraded: Upgraded | None = None
    try:
        if isinstance(stream, trio.SSLStream):
            # The handshake first, on its own, so that a refused client
            # certificate is told apart from a client that went away.
            with trio.move_on_after(limits.header_timeout_s) as handshake:
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    if isinstance(exc.__cause__, ssl.SSLError) and on_tls_error is not None:
                        on_tls_error(exc.__cause__)
                    raise _ClientGone() from exc
            if handshake.cancelled_caught:
                return None  # no handshake in time: nothing can be said, hang up
        while True:
            first = served == 0
            wait = limits.header_timeout_s if first else limits.keepalive_timeout_s
            with trio.move_on_after(wait) as scope:
                event = await _next_event(stream, conn, scope, limits.header_timeout_s)
            if scope.cancelled_caught:
                if conn.trailing_data[0]:
                    # Slowloris: a head that started and never finished.
                    # RFC 9110 §15.5.9: 408, then close.
                    reason = (f"request head not complete within {limits.header_timeout_s:g} s "
                              "of its first byte")
                    GatewayCounters.bump(counters.http_errors, error_code(408))
                    if on_protocol_error is not None:
                        on_protocol_error(408, reason)
                    await send_and_close(stream, raw_response(error_response(408, reason)))
                # An idle connection or keep-alive: nothing useful can be said
                # to a client that does not send; hang up.
                return None
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees
                return None
            served += 1
            counters.http_requests += 1
            request = _parse_request(event, connection, policy)
            response: Response | Upgraded
            try:
                # An upgrade GET has an empty body; reading to its end leaves
                # h11 in MIGHT_SWITCH_PROTOCOL, where the upgrade helpers start.
                await _read_body(stream, conn, request, limits)
                response = await handler(request, stream, conn)
            except _ClientGone:
                raise
            except PodtermError as exc:
                response = _response_for(exc)
            except h11.RemoteProtocolError:
                raise
            except Exception:
                log.exception("http.request.failed", extra={"peer": request.peer,
                                                            "via": request.client.via.value,
                                                            "method": request.method,
                                                            "path": request.path})
                response = error_response(500, "internal error; see the gateway log")
            if isinstance(response, Upgraded):
                upgraded = response
                return upgraded
            if response.status >= 400:
                GatewayCounters.bump(counters.http_errors, error_code(response.status))
            if conn.our_state is not h11.SEND_RESPONSE:
                return None  # the handler answered on its own (e.g. a refused upgrade)
            close = (served >= limits.max_requests or not keep_alive() or request.is_upgrade
                     or conn.their_state is not h11.DONE or response.status in (408, 413))
            await _send(stream, _response_bytes(conn, request, response, close))
            if not _reusable(conn):
                return None
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        # The peer broke HTTP: answer with h11's status hint if we still may.
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint or 400
            GatewayCounters.bump(counters.http_errors, error_code(status))
            if on_protocol_error is not None:
                on_protocol_error(status, f"bad HTTP request: {exc}")
            try:
                await _send(stream, _response_bytes(
                    conn, None, error_response(status, f"bad HTTP request: {exc}"), True))
            except (_ClientGone, h11.LocalProtocolError):
                pass
    except _ClientGone:
        pass
    finally:
        if upgraded is None or upgraded.run is None:
            with trio.move_on_after(1, shield=True):
                await stream.aclose()
    return None


# ------------------------------------------------------------------ accepting


def _is_closed(stream: trio.abc.Stream) -> bool:
    """True when ``stream`` is a plain socket stream whose socket is closed already."""
    return type(stream) is trio.SocketStream and stream.socket.fileno() == -1


async def aclose_unless_closed(stream: trio.abc.Stream) -> None:
    """:func:`trio.aclose_forcefully`, skipped for a socket stream already closed.

    Closing a closed :class:`trio.SocketStream` does nothing but costs a cancel
    scope, a checkpoint and a caught ``Cancelled``: on the handshake path,
    where the WebSocket has closed its stream by the time the connection's
    handlers unwind, that was two of the three closes per connection.
    Any other stream (TLS) is closed as before.  Shielded: it completes even
    in a cancelled scope (and never blocks: the close is forceful).
    """
    if not _is_closed(stream):
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


#: trio's own: errors that mean "out of descriptors or memory", not "broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: How long to wait after such an error before accepting again (trio's 0.1 s).
_ACCEPT_RETRY_S = 0.100


async def _run_handler(stream: trio.abc.Stream,
                       handler: Callable[[trio.abc.Stream], Awaitable[object]]) -> None:
    try:
        await handler(stream)
    finally:
        await aclose_unless_closed(stream)


async def _serve_one_listener(listener: trio.abc.Listener[Any], handler_nursery: trio.Nursery,
                              handler: Callable[[trio.abc.Stream], Awaitable[object]]
                              ) -> NoReturn:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept returned %s (%s); retrying in %s seconds",
                          errno.errorcode[exc.errno], exc.strerror, _ACCEPT_RETRY_S,
                          exc_info=True)
                await trio.sleep(_ACCEPT_RETRY_S)
            else:
                handler_nursery.start_soon(_run_handler, stream, handler)


async def serve_listeners(handler: Callable[[trio.abc.Stream], Awaitable[object]],
                          listeners: Sequence[trio.abc.Listener[Any]], *,
                          handler_nursery: trio.Nursery,
                          task_status: trio.TaskStatus[Sequence[trio.abc.Listener[Any]]]
                          = trio.TASK_STATUS_IGNORED) -> NoReturn:
    """:func:`trio.serve_listeners`, with the same semantics and one close less.

    Every accepted stream is handed to ``handler`` in a task of
    ``handler_nursery`` and closed when the handler returns, as trio does,
    except that a socket stream the handler closed already is not closed a
    second time (:func:`aclose_unless_closed`).  Running out of descriptors
    or memory is logged and retried after 0.1 s; any other accept error
    propagates.  Never returns; cancel it to stop accepting.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one_listener, listener, handler_nursery, handler)
        task_status.started(listeners)
    raise AssertionError("_serve_one_listener never returns")  # pragma: no cover
