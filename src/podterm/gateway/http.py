"""HTTP/1.1 on one connection: requests in, responses out, errors mapped once.

:func:`serve_http` reads each request head with our own bounded parser
(:mod:`podterm.protocol.http_head`), writes responses as bytes, and builds an
``h11.Connection`` only for a request with a body (h11 reads bodies) or for a
handler that asks for one (:attr:`Exchange.h11_connection`): a WebSocket upgrade, the
gateway's busiest request, never pays for h11.  It serves for as long as the
client keeps the connection alive, and hands each request to a *handler*
(the router).  The handler returns a :class:`Response`, or accepts
a WebSocket upgrade and returns :class:`Upgraded` with the coroutine that runs
the WebSocket.  :func:`serve_http` then returns that to its caller, which runs
it *after* the HTTP state (request, headers, any h11 connection) is released: an
attached session must not pay for the HTTP request that attached it.

Bounds (every one is a :class:`HttpLimits` field):

* the request head is at most ``max_header_bytes`` (431 beyond);
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
(docs/protocol.md §2); an h11 protocol error (in a body) becomes its status hint; any
other exception is a bug: it is logged with its traceback and answered
``500 internal`` with no detail.  A stack trace never reaches the client.
A malformed head is answered with the parser's status (400, 431, 501, 505;
``http_head``'s table) and the connection closed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from podterm.auth.identity import Identity
from podterm.errors import LocalProtocolError, PodtermError
from podterm.metrics import GatewayCounters
from podterm.net.clientaddr import ClientAddress, ClientAddressPolicy, Via, resolve_request
from podterm.protocol.http_head import HeadError, RequestHead, parse_request_head

__all__ = [
    "ERROR_CODES",
    "Exchange",
    "HttpLimits",
    "LivesOn",
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
    "when_ended",
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
    505: "bad_request",
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
        head: the parsed head (``h11.Request``'s attributes, for the upgrade
            helpers; :attr:`h11_request` is the same object).
        peer: ``str(client)``, for logs (``host:port``, or a bare address
            when a forwarding header gave no port).
        is_upgrade: True for ``Connection: upgrade`` with an ``Upgrade`` header.
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
    head: RequestHead
    peer: str
    is_upgrade: bool
    client: ClientAddress
    identity: Identity | None = None
    request_id: str = ""

    @property
    def h11_request(self) -> RequestHead:
        """The parsed head; it has ``h11.Request``'s attributes (method, target,
        http_version, headers), so :func:`~podterm.protocol.handshake.parse_upgrade`
        and header forwarding read it as they read h11's event."""
        return self.head

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


class LivesOn:
    """What an :class:`Upgraded` run returns when the connection outlives its task.

    An attached link whose socket is quiet keeps no task (``podterm.net.idle``):
    its run returns this instead of None, the stream still open and owned by
    the link.  Whoever ran it must not close the stream, and moves what it
    would have done at the connection's end (counters, a per-address share)
    to :meth:`on_end`.
    """

    __slots__ = ()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the connection has ended (at once if it has)."""
        raise NotImplementedError


def when_ended(lives_on: LivesOn | None, callback: Callable[[], None]) -> None:
    """``callback()`` now if the connection is over (``lives_on`` None), else at its end."""
    if lives_on is None:
        callback()
    else:
        lives_on.on_end(callback)


class Upgraded:
    """A handler took the connection over (a WebSocket upgrade).

    Attributes:
        run: what serves the connection from now on (it owns the stream and
            closes it); None when the upgrade was answered and closed already.
            It returns None once the connection is over, or a
            :class:`LivesOn` when the connection goes on without its task.
    """

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], Awaitable[LivesOn | None]] | None) -> None:
        self.run = run

    def __repr__(self) -> str:
        return f"<Upgraded {'running' if self.run else 'refused'}>"


class Exchange:
    """One request's hold on its connection: the head's bytes, and h11 only on demand.

    :func:`serve_http` hands one to the handler with each request.  Most
    handlers never look at it; an upgrading handler either takes the
    connection over (:meth:`take_over`: it writes the ``101`` itself) or asks
    for :attr:`h11_connection`, an ``h11.Connection`` in the state the request left it
    (head read, an empty body read to its end), built on first use from the
    bytes the head arrived in.

    Attributes:
        head: the request head.
    """

    __slots__ = ("head", "_data", "_limit", "_h11", "_taken")

    def __init__(self, head: RequestHead, data: bytes | bytearray, limit: int) -> None:
        self.head = head
        self._data = data  # the head, then what the client sent after it
        self._limit = limit
        self._h11: h11.Connection | None = None
        self._taken = False

    def __repr__(self) -> str:
        state = "taken" if self._taken else "h11" if self._h11 is not None else "head"
        return f"<Exchange {self.head!r} {state}>"

    @property
    def h11_connection(self) -> h11.Connection:
        """The request as an ``h11.Connection`` (built now if it was not yet).

        Raises:
            RuntimeError: the connection was taken over (:meth:`take_over`).
            h11.RemoteProtocolError: h11 refuses the head (it accepts every
                head the parser does; answered as a bad request).
        """
        conn = self._h11
        if conn is None:
            if self._taken:
                raise RuntimeError("the connection was taken over; it has no h11 state")
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limit)
            conn.receive_data(bytes(self._data))
            if type(conn.next_event()) is not h11.Request:  # pragma: no cover - parsed already
                raise h11.RemoteProtocolError("request head not complete")
            if not (self.head.has_body or self.head.expects_continue) and (
                    type(conn.next_event()) is not h11.EndOfMessage):  # pragma: no cover
                raise h11.RemoteProtocolError("unexpected body")
            self._h11 = conn
        return conn

    @property
    def responded(self) -> bool:
        """True once an answer to this request was started (by a handler or taken over)."""
        return self._taken or (self._h11 is not None
                               and self._h11.our_state is not h11.SEND_RESPONSE)

    def take_over(self) -> tuple[h11.Connection | None, bytes]:
        """The handler answers this request itself, without h11 (a ``101`` as bytes).

        Returns:
            ``(None, trailing)``: the bytes the client sent after its head (a
            first WebSocket frame, pipelined), which are the taker's now; or
            ``(h11_connection, b"")`` when h11 read this request (it had a
            body) and must answer it: the caller then goes through h11.
        """
        if self._h11 is not None:
            return self._h11, b""
        self._taken = True
        return None, bytes(self._data[self.head.size:])

    def rest(self) -> bytes | bytearray:
        """What the client sent after this request (the next request's start)."""
        if self._h11 is not None:
            return self._h11.trailing_data[0]
        return self._data[self.head.size:]


Handler = Callable[[Request, trio.abc.Stream, Exchange], Awaitable["Response | Upgraded"]]


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


def _parse_request(head: RequestHead, connection: ClientAddress,
                   policy: ClientAddressPolicy) -> Request:
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = head.target.decode("latin-1")
    query: dict[str, str] = {}
    if "?" in target or "#" in target:
        parts = urlsplit(target)
        raw_path = parts.path
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            query.setdefault(k, v)
    else:
        raw_path = target  # urlsplit's answer for a plain path, without its cost
        if raw_path[:2] == "//" or ":" in raw_path:
            raw_path = urlsplit(target).path
    upgrade = "upgrade" in headers and "upgrade" in headers.get("connection", "").lower()
    # Per request: a trusted L7 proxy may carry many clients on one connection.
    client = resolve_request(connection, headers, policy=policy)
    return Request(method=head.method.decode("ascii").upper(), target=target,
                   path=(unquote(raw_path) if "%" in raw_path else raw_path) or "/",
                   query=query, headers=headers, body=b"", head=head, peer=str(client),
                   is_upgrade=upgrade, client=client, request_id=new_request_id())


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


class _HeadReader:
    """Reads request heads off one connection; ``buffered`` survives a cancellation."""

    __slots__ = ("stream", "limit", "buffered", "closed", "_fd")

    def __init__(self, stream: trio.abc.Stream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.buffered: bytes | bytearray = b""
        #: The client closed its side before a whole head arrived (seen by read_nowait).
        self.closed = False
        # A plain TCP socket can be read without trio when data is waiting.
        self._fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1

    def read_nowait(self) -> RequestHead | None:
        """A head from what is buffered or what the socket holds right now, or None.

        The common case, a client that sent its request with its connect, is
        served by one ``read`` here: no cancel scope, no checkpoint, no trip
        through trio's scheduler.  None means "wait" (or, with :attr:`closed`,
        that the client hung up); :meth:`read` does the waiting.

        Raises:
            HeadError: as :meth:`read`.
        """
        buf = self.buffered
        if buf:
            head = parse_request_head(buf, self.limit)
            if head is not None or self._fd < 0:
                return head
        elif self._fd < 0:
            return None
        try:
            data = os.read(self._fd, _RECV_BYTES)
        except OSError:  # EAGAIN: nothing yet; an error: read() reports it
            return None
        if not data:
            if buf:
                raise HeadError("peer unexpectedly closed connection")
            self.closed = True
            return None
        if buf:
            buf = bytearray(buf)
            buf += data
            self.buffered = buf
        else:
            self.buffered = buf = data
        return parse_request_head(buf, self.limit)

    async def read(self, scope: trio.CancelScope,
                   head_timeout_s: float | None) -> RequestHead | None:
        """The next head, reading as needed; None when the client closed between requests.

        ``head_timeout_s`` (when set) tightens ``scope``'s deadline once the
        first byte of a request is here: the whole head must follow within it.

        Raises:
            HeadError: a malformed or oversized head, or a client that closed
                in the middle of one.
            _ClientGone: the connection broke.
        """
        buf = self.buffered
        searched = 0
        if buf:
            head = parse_request_head(buf, self.limit)
            if head is not None:
                return head
            searched = len(buf)
            if head_timeout_s is not None:
                scope.deadline = min(scope.deadline, trio.current_time() + head_timeout_s)
                head_timeout_s = None
        while True:
            try:
                data = await self.stream.receive_some(_RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGone() from exc
            if not data:
                if buf:
                    raise HeadError("peer unexpectedly closed connection")
                return None
            if head_timeout_s is not None:
                scope.deadline = min(scope.deadline, trio.current_time() + head_timeout_s)
                head_timeout_s = None
            if buf:
                if type(buf) is not bytearray:
                    buf = bytearray(buf)
                buf += data
            else:
                buf = data if type(data) is bytes else bytes(data)
            self.buffered = buf
            head = parse_request_head(buf, self.limit, searched)
            if head is not None:
                return head
            searched = len(buf)


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    """The next h11 event of a request body, reading as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(_RECV_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone() from exc
        conn.receive_data(data if isinstance(data, bytes) else bytes(data))


async def _read_body(stream: trio.abc.Stream, conn: h11.Connection, request: Request,
                     limits: HttpLimits) -> None:
    """Read the body of a request that has one (or sent ``Expect: 100-continue``), with h11."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limits.max_body_bytes:
        raise PodtermError(f"request body of {int(length)} bytes exceeds the "
                           f"{limits.max_body_bytes}-byte limit", http_status=413)
    if conn.they_are_waiting_for_100_continue:
        await _send(stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    chunks: list[bytes] = []
    total = 0
    with trio.move_on_after(limits.body_timeout_s) as scope:
        while True:
            event = await _next_event(stream, conn)
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


#: What may not appear in a header we write (RFC 9110 §5.5: no CR, LF or NUL).
_UNSAFE_HEADER = re.compile(r"[\r\n\x00]")
_PHRASES: Final[dict[int, str]] = {s.value: s.phrase for s in HTTPStatus}


def _response_bytes(request: Request | None, response: Response, close: bool) -> bytes:
    """``response`` as HTTP/1.1 bytes (what h11 wrote, with the reason phrase).

    Raises:
        LocalProtocolError: a header name or value would break the head (a bug).
    """
    status = response.status
    lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, '')}", "Server: podterm"]
    if status not in (204, 304):  # RFC 9110 §8.6: no body, no length of one
        lines.append(f"Content-Type: {response.content_type}")
        lines.append(f"Content-Length: {len(response.body)}")
    for name, value in response.headers:
        if _UNSAFE_HEADER.search(name) or _UNSAFE_HEADER.search(value) or ":" in name:
            raise LocalProtocolError(f"refusing to send header {name!r}: {value!r}")
        lines.append(f"{name}: {value}")
    if request is not None and request.request_id:
        lines.append(f"X-Request-Id: {request.request_id}")
    if close:
        lines.append("Connection: close")
    lines.append("\r\n")
    head = "\r\n".join(lines).encode("latin-1")
    if (request is None or request.method != "HEAD") and status not in (204, 304):
        return head + response.body
    return head


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
        handler: called once per request (body read) with the request, the
            stream and the request's :class:`Exchange`; returns a Response or
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
    reader = _HeadReader(stream, limits.max_header_bytes)
    connection = client or _client_of(stream)
    policy = client_policy or _SOCKET_ONLY
    served = 0
    upgraded: Upgraded | None = None
    exchange: Exchange | None = None
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
            exchange = None
            head = reader.read_nowait()
            if head is None and not reader.closed:
                wait = limits.header_timeout_s if served == 0 else limits.keepalive_timeout_s
                with trio.move_on_after(wait) as scope:
                    head = await reader.read(scope, limits.header_timeout_s)
            else:
                scope = None
            if scope is not None and scope.cancelled_caught:
                if reader.buffered:
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
            if head is None:
                return None
            served += 1
            counters.http_requests += 1
            exchange = Exchange(head, reader.buffered, limits.max_header_bytes)
            reader.buffered = b""
            request = _parse_request(head, connection, policy)
            response: Response | Upgraded
            try:
                if head.has_body or head.expects_continue:
                    # h11 reads bodies (Content-Length or chunked, 100-continue).
                    await _read_body(stream, exchange.h11_connection, request, limits)
                response = await handler(request, stream, exchange)
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
            if exchange.responded:
                return None  # the handler answered on its own (e.g. a refused upgrade)
            conn = exchange._h11
            close = (served >= limits.max_requests or not keep_alive() or request.is_upgrade
                     or not head.keep_alive or response.status in (408, 413)
                     or (conn is not None and conn.their_state is not h11.DONE))
            await _send(stream, _response_bytes(request, response, close))
            if close:
                return None
            reader.buffered = exchange.rest()
    except (HeadError, h11.RemoteProtocolError) as exc:
        # The peer broke HTTP: answer with the status it calls for, if we still may.
        if exchange is None or not exchange.responded:
            if isinstance(exc, HeadError):
                status, reason = exc.http_status, exc.message
            else:
                status, reason = exc.error_status_hint or 400, str(exc)
            GatewayCounters.bump(counters.http_errors, error_code(status))
            if on_protocol_error is not None:
                on_protocol_error(status, f"bad HTTP request: {reason}")
            try:
                await _send(stream, _response_bytes(
                    None, error_response(status, f"bad HTTP request: {reason}"), True))
            except _ClientGone:
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
    lives_on = False
    try:
        lives_on = isinstance(await handler(stream), LivesOn)
    finally:
        if not lives_on:  # (else the connection's link closes it)
            await aclose_unless_closed(stream)


#: Connections taken from the accept queue per trip through trio's scheduler.
_ACCEPT_BATCH = 16


def _twin_socket(listener: trio.abc.Listener[Any]) -> socket.socket | None:
    """A stdlib socket on a duplicate of a TCP listener's descriptor, or None.

    ``accept`` on it takes a waiting connection without a checkpoint (trio's
    ``accept`` yields to the scheduler after every connection).  The
    duplicate shares the listening socket and its non-blocking mode; closing
    it leaves the listener open.
    """
    if type(listener) is not trio.SocketListener:
        return None
    sock = listener.socket
    try:
        twin = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
    except OSError:
        return None
    twin.setblocking(False)
    return twin


def _accept_nowait(twin: socket.socket) -> trio.SocketStream | None:
    """A connection already in the accept queue, or None (none waiting, or an
    error, which the next awaited ``accept`` meets again and reports)."""
    try:
        sock, _ = twin.accept()
    except OSError:
        return None
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _serve_one_listener(listener: trio.abc.Listener[Any], handler_nursery: trio.Nursery,
                              handler: Callable[[trio.abc.Stream], Awaitable[object]]
                              ) -> NoReturn:
    async with listener:
        twin = _twin_socket(listener)
        try:
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
                    continue
                handler_nursery.start_soon(_run_handler, stream, handler)
                if twin is not None:
                    # A burst: take what else is queued before yielding.
                    for _ in range(_ACCEPT_BATCH - 1):
                        more = _accept_nowait(twin)
                        if more is None:
                            break
                        handler_nursery.start_soon(_run_handler, more, handler)
        finally:
            if twin is not None:
                twin.close()


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

    On a TCP listener, after each awaited ``accept`` up to
    ``_ACCEPT_BATCH - 1`` more connections already queued are taken without
    going through the scheduler in between (:func:`_accept_nowait`): a burst
    of connects costs one checkpoint, not one each.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one_listener, listener, handler_nursery, handler)
        task_status.started(listeners)
    raise AssertionError("_serve_one_listener never returns")  # pragma: no cover
