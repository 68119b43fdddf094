"""The resumable podterm.v1 client: one session, any number of connections.

:class:`ResumableSession` attaches to a session (docs/protocol.md §3) and
keeps it attached: on any connection loss it reconnects with exponential
backoff and full jitter, resumes at the first output byte it has not
delivered, re-sends every input byte the gateway has not accepted, and goes
on.  What the caller sees is one ordered stream of output, delivered exactly
once, then the session's exit.

Task tree (every task has a parent)::

    run()                                   returns SessionEnd / raises
    ├── _deliver        output, gaps and status, in order, to the callbacks
    └── _connect_loop   one link at a time; backoff between them
        └── _run_link   per connection
            ├── _reader     receive_batch → ClientCodec → hand to _deliver, input ACKs
            ├── _writer     STDIN from the InputLog within credit, ACK, RESIZE, detach
            └── heartbeat   PING; two missed PONGs abort the link (wsconn.heartbeat)

Exactly once, output: the reader hands each chunk to ``_deliver`` through a
memory channel and advances ``out_offset`` right after the hand-over.  A
trio memory-channel send either completes or is cancelled without effect,
and nothing between it and the offset update can be interrupted, so a link
dying at any point never delivers a byte twice or skips one: the next attach
asks for ``offset=out_offset``.  The ACKs sent carry ``out_offset``.

Exactly once, input: :meth:`ResumableSession.send_stdin` appends to an
:class:`~podterm.protocol.offsets.InputLog` (1 MiB; it blocks beyond, as
docs/protocol.md §5.3 asks).  After each ``hello`` the log releases what the
gateway accepted (``in_acked``) and the writer re-sends the rest from there;
the gateway drops nothing and applies nothing twice because it knows every
byte's offset.  The end of input is a position in that log too:
:meth:`ResumableSession.close_stdin_nowait` records it, and the writer sends
``stdin_eof`` right after the last byte, on every link, until a ``hello``
says ``stdin_closed`` (the gateway ignores a repeat).

The writer slot: a ``rw`` attach presents the latest resume token, so a
resumed connection takes over from a half-open old one (4409 for the old).
If a link dies between the gateway rotating the token and the ``hello``
reaching us, our token is stale; until the gateway notices the old link is
gone the attach is refused with 4409.  A resuming client therefore retries
4409 with backoff for ``takeover_grace_s`` before giving up.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

import trio

from podterm import errors
from podterm.client.http import os_error_reason
from podterm.errors import CloseCode
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, connect, heartbeat
from podterm.protocol.events import (
    Ack,
    Detach,
    Drain,
    ErrorMsg,
    Exit,
    Gap,
    Hello,
    Stderr,
    StdinEof,
    Stdout,
)
from podterm.protocol.offsets import DEFAULT_WINDOW, AckScheduler, AckWindow, InputLog
from podterm.protocol.session_proto import (
    SUBPROTOCOL,
    ClientCodec,
    encode_ack,
    encode_control,
    encode_resize,
    encode_stdin,
)
from podterm.protocol.websocket import ConnectionState as WsState
from podterm.protocol.websocket import WebSocketConnection
from podterm.resilience.backoff import Backoff

__all__ = [
    "Action",
    "LinkStatus",
    "OutputChunk",
    "ResumableSession",
    "SessionEnd",
    "SessionFailed",
    "SessionStatistics",
    "classify_close",
    "classify_http",
    "exit_status",
]

log = logging.getLogger(__name__)

#: STDIN bytes per message.  The gateway accepts 64 KiB (§4); 32 KiB is what
#: it sends itself and keeps one message well below a read's worth.
STDIN_CHUNK = 32 * 1024
#: Output chunks queued between the reader and the callbacks.  Bounded: a
#: slow terminal stops the reader, which stops ACKs, which stops the gateway.
_DELIVERY_QUEUE = 16


class Action(enum.Enum):
    """What to do after a link ends without EXIT."""

    RECONNECT = "reconnect"  # with backoff
    RECONNECT_NOW = "reconnect-now"  # drain: the gateway asked us to come back at once
    CONFLICT = "conflict"  # 4409: retry only while resuming, within takeover_grace_s
    FATAL = "fatal"  # retrying cannot help


# docs/protocol.md §7, "what to do".
_FATAL_CLOSE = frozenset({
    CloseCode.PROTOCOL_ERROR, CloseCode.UNSUPPORTED_DATA, CloseCode.INVALID_PAYLOAD,
    CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG, CloseCode.MANDATORY_EXTENSION,
    CloseCode.UNAUTHENTICATED, CloseCode.FORBIDDEN, CloseCode.NO_SUCH_SESSION,
    CloseCode.SESSION_ENDED,
})


def classify_close(code: int) -> Action:
    """The action for a close code received before EXIT (docs/protocol.md §7)."""
    if code == CloseCode.GOING_AWAY:
        return Action.RECONNECT_NOW
    if code == CloseCode.WRITER_EXISTS:
        return Action.CONFLICT
    if code in _FATAL_CLOSE:
        return Action.FATAL
    if 4000 <= code < 5000 and code != CloseCode.RATE_LIMITED:
        return Action.FATAL  # an application code we do not know: do not hammer
    return Action.RECONNECT  # 1000 without EXIT, 1006, 1011-1014, 4429, ...


def classify_http(status: int) -> Action:
    """The action for an HTTP answer that refused the upgrade (docs/protocol.md §3)."""
    if status == 409:
        return Action.CONFLICT
    if status in (429, 408) or status >= 500:
        return Action.RECONNECT
    return Action.FATAL  # 400, 401, 403, 404, 410, ...


_CLOSE_ERRORS: dict[int, type[errors.PodtermError]] = {
    CloseCode.UNAUTHENTICATED: errors.AuthError,
    CloseCode.FORBIDDEN: errors.ForbiddenError,
    CloseCode.NO_SUCH_SESSION: errors.NotFoundError,
    CloseCode.WRITER_EXISTS: errors.ConflictError,
    CloseCode.SESSION_ENDED: errors.GoneError,
    CloseCode.RATE_LIMITED: errors.RateLimitedError,
    CloseCode.POLICY_VIOLATION: errors.BadRequestError,
}
_HTTP_ERRORS: dict[int, type[errors.PodtermError]] = {
    400: errors.BadRequestError, 401: errors.AuthError, 403: errors.ForbiddenError,
    404: errors.NotFoundError, 409: errors.ConflictError, 410: errors.GoneError,
    429: errors.RateLimitedError,
}


class SessionFailed(errors.PodtermError):
    """The session cannot be (re)attached; ``cause`` is the error by kind (AuthError, ...).

    The message is one line for a person: what happened and what to do.
    """

    def __init__(self, message: str, cause: errors.PodtermError | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        if cause is not None:
            self.close_code = cause.close_code
            self.http_status = cause.http_status


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Session output: ``data`` starts at output offset ``offset`` (STDOUT and STDERR share it)."""

    offset: int
    data: bytes
    stderr: bool = False

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """A change in the connection, for the status line.

    ``state``: ``"connected"`` (first attach), ``"reconnecting"`` (the link is
    down; ``attempt`` counts from 1, ``delay_s`` is the wait before it,
    ``reason`` says why the previous one failed), ``"reconnected"``.
    """

    state: Literal["connected", "reconnecting", "reconnected"]
    attempt: int = 0
    delay_s: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        """One line for a person."""
        if self.state == "reconnecting":
            when = f" in {self.delay_s:.1f}s" if self.delay_s >= 0.05 else ""
            why = f" ({self.reason})" if self.reason else ""
            return f"podterm: connection lost; reconnecting… attempt {self.attempt}{when}{why}"
        if self.state == "reconnected":
            return "podterm: reconnected"
        return "podterm: connected"


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """How the session ended for this client.

    ``reason`` is the EXIT reason (``"exited"``, ``"killed"``, ...), or
    ``"detached"`` when we left it running.
    """

    code: int | None
    signal: int | None
    reason: str

    @property
    def exit_status(self) -> int:
        return exit_status(self.code, self.signal, self.reason)


def exit_status(code: int | None, signal: int | None, reason: str = "") -> int:
    """The local exit status for a remote exit: its code, 128+N for signal N, 1 if unknown.

    A detach (we left the session running) is 0.
    """
    if code is not None:
        return code & 0xFF if code >= 0 else 1
    if signal is not None:
        return 128 + signal
    return 0 if reason == "detached" else 1


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    out_offset: int  # output bytes delivered (the next offset expected)
    in_offset: int  # input bytes given to send_stdin
    in_acked: int  # input bytes the gateway has accepted or written
    connects: int  # links that got a hello
    attempts: int  # connection attempts, successful or not
    gaps: int
    lost_bytes: int  # output lost to gaps
    resent_input_bytes: int  # input sent more than once (re-sent after a reconnect)


class Connector(Protocol):
    """Opens a WebSocket to ``url`` (tests substitute memory streams)."""

    def __call__(self, url: str, *, subprotocols: tuple[str, ...],
                 headers: list[tuple[str, str]],
                 ssl_context: ssl.SSLContext | None) -> Awaitable[tuple[WebSocketStream,
                                                                        str | None]]: ...


async def _default_connect(url: str, *, subprotocols: tuple[str, ...],
                           headers: list[tuple[str, str]],
                           ssl_context: ssl.SSLContext | None
                           ) -> tuple[WebSocketStream, str | None]:
    return await connect(url, subprotocols=subprotocols, headers=headers,
                         ssl_context=ssl_context)


OutputCallback: TypeAlias = Callable[[OutputChunk], Awaitable[None]]
StatusCallback: TypeAlias = Callable[[LinkStatus], Awaitable[None]]
GapCallback: TypeAlias = Callable[[Gap], Awaitable[None]]
HelloCallback: TypeAlias = Callable[[Hello], Awaitable[None]]
_Delivery: TypeAlias = OutputChunk | Gap | LinkStatus | Hello


class _LinkEnded(Exception):
    """Internal: the link is over; ``action`` says what next, ``reason`` why."""

    def __init__(self, action: Action, reason: str, code: int | None = None, *,
                 explained: bool = False) -> None:
        super().__init__(reason)
        self.action = action
        self.reason = reason
        self.code = code
        self.explained = explained  # the reason is the gateway's own error message


@dataclass(slots=True)
class _Link:
    """Per-connection state."""

    ws: WebSocketStream
    codec: ClientCodec = field(default_factory=ClientCodec)
    hello: Hello | None = None
    window: AckWindow | None = None  # input credit
    acks: AckScheduler | None = None  # output ACK timing
    ack_due: int | None = None  # an output ACK the reader found due
    sent_size: tuple[int, int] | None = None
    expect_gap: tuple[int, int] | None = None  # (from, to) announced by hello
    error: ErrorMsg | None = None
    detach_sent: bool = False
    eof_sent: bool = False  # stdin_eof sent on this link
    exit: Exit | None = None
    hb_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class ResumableSession:
    """A podterm.v1 client that stays attached to one session.

    Args:
        attach_url: builds the ``ws(s)://`` attach URL from
            ``(offset, mode, resume_token)`` — normally
            ``ApiClient.attach_url`` with the session id bound.
        headers: sent with every upgrade (``Authorization: Bearer ...``).
        mode: ``"rw"`` (the writer) or ``"ro"`` (a viewer).
        resume_token: the token from ``POST /api/v1/sessions`` (``rw``).
        on_output: awaited with every output chunk, in order, exactly once.
            While it runs, no more output is read (back-pressure).
        on_status: awaited on ``connected``/``reconnecting``/``reconnected``.
        on_gap: awaited when output was lost (``Gap.lost`` bytes).
        on_hello: awaited with every ``hello`` (for its ``notices``).
        ssl_context: for ``wss://``.
        backoff: reconnect delays; default full jitter, first retry within
            0.5 s, cap 30 s.
        rng: randomness for the default backoff (a seeded one in tests).
        input_limit: unacknowledged input kept (1 MiB, §5.3).
        connect_timeout_s: bound on TCP + TLS + upgrade + ``hello``.
        heartbeat_s: client PING interval; ``None`` follows the server's
            ``hello.heartbeat_s``.  Two missed PONGs abort the link.
        takeover_grace_s: how long a resuming writer retries 4409.
        connector: opens the WebSocket (tests pass memory streams).

    The session does nothing until :meth:`run`.
    """

    def __init__(self, attach_url: Callable[[int, str, str | None], str], *,
                 headers: list[tuple[str, str]] | None = None,
                 mode: Literal["rw", "ro"] = "rw",
                 resume_token: str | None = None,
                 on_output: OutputCallback,
                 on_status: StatusCallback | None = None,
                 on_gap: GapCallback | None = None,
                 on_hello: HelloCallback | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 backoff: Backoff | None = None,
                 rng: Callable[[], float] = random.random,
                 input_limit: int = 1 << 20,
                 connect_timeout_s: float = 15.0,
                 heartbeat_s: float | None = None,
                 takeover_grace_s: float = 60.0,
                 connector: Connector | None = None) -> None:
        if mode not in ("rw", "ro"):
            raise ValueError(f"mode must be 'rw' or 'ro', got {mode!r}")
        self._attach_url = attach_url
        self._headers = list(headers or [])
        self.mode = mode
        self.resume_token = resume_token
        self._on_output = on_output
        self._on_status = on_status
        self._on_gap = on_gap
        self._on_hello = on_hello
        self._ssl_context = ssl_context
        self._backoff = backoff or Backoff(0.5, 30.0, rng=rng)
        self._connect_timeout_s = connect_timeout_s
        self._heartbeat_s = heartbeat_s
        self._takeover_grace_s = takeover_grace_s
        self._connector: Connector = connector or _default_connect

        self.out_offset = 0  # next output byte expected; everything before was delivered
        self._log = InputLog(0, limit=input_limit)
        self._log_space = trio.lowlevel.ParkingLot()  # send_stdin waits here when the log is full
        self._eof_at: int | None = None  # input offset of our stdin's end (close_stdin_nowait)
        self._eof_applied = False  # a hello said stdin_closed: stdin_eof is not sent again
        self._size: tuple[int, int] | None = None
        self._wake = trio.Event()  # the writer's wake-up; replaced each round
        self._link: _Link | None = None
        self._ended = False
        self._detach_requested = False
        self._ever_attached = False
        self._connects = 0
        self._attempts = 0
        self._gaps = 0
        self._lost = 0
        self._resent = 0
        self._sent_high = 0  # highest input offset ever sent, for the re-sent count
        self._deliver_send, self._deliver_recv = trio.open_memory_channel[_Delivery](
            _DELIVERY_QUEUE)

    def __repr__(self) -> str:
        state = "attached" if self._link and self._link.hello else (
            "ended" if self._ended else "detached")
        return (f"<ResumableSession {self.mode} {state} out={self.out_offset} "
                f"in={self._log.end} in_acked={self._log.acked}>")

    # ---- the caller's side -------------------------------------------------------------------

    @property
    def in_offset(self) -> int:
        """Input bytes accepted by :meth:`send_stdin` so far."""
        return self._log.end

    @property
    def is_attached(self) -> bool:
        return self._link is not None and self._link.hello is not None

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            out_offset=self.out_offset, in_offset=self._log.end, in_acked=self._log.acked,
            connects=self._connects, attempts=self._attempts, gaps=self._gaps,
            lost_bytes=self._lost, resent_input_bytes=self._resent)

    async def send_stdin(self, data: bytes) -> None:
        """Queue ``data`` for the session's stdin; it is delivered exactly once.

        Returns once all of ``data`` is in the input log (connected or not);
        waits while the log is full (1 MiB unacknowledged).  After the session
        ended the data is dropped.

        Raises:
            LocalProtocolError: a read-only session, or stdin was closed
                (:meth:`close_stdin_nowait`).
        """
        if self.mode != "rw":
            raise errors.LocalProtocolError("a read-only viewer cannot send input")
        if self._eof_at is not None:
            raise errors.LocalProtocolError("stdin was closed; no more input can be sent")
        view = memoryview(data)
        while view and not self._ended:
            space = self._log.space
            if space <= 0:
                await self._log_space.park()
                continue
            piece = view[:space]
            self._log.append(piece)
            view = view[len(piece):]
            self._wake.set()
        await trio.lowlevel.checkpoint()

    def resize_nowait(self, cols: int, rows: int) -> None:
        """Set the terminal size; sent now if attached, else right after the next ``hello``."""
        if cols <= 0 or rows <= 0:
            return
        self._size = (min(cols, 10000), min(rows, 10000))
        self._wake.set()

    def close_stdin_nowait(self) -> None:
        """End the session's stdin after everything given to :meth:`send_stdin` so far.

        The end is recorded at the current input offset (``in_offset``); the
        writer sends ``stdin_eof`` right after the last input byte, and again
        after every reconnect until a ``hello`` says ``stdin_closed``, so the
        gateway applies it exactly once (docs/protocol.md §4).  Idempotent.

        Raises:
            LocalProtocolError: a read-only session.
        """
        if self.mode != "rw":
            raise errors.LocalProtocolError("a read-only viewer has no stdin to close")
        if self._eof_at is None:
            self._eof_at = self._log.end
            self._wake.set()

    @property
    def stdin_closed(self) -> bool:
        """True once :meth:`close_stdin_nowait` was called."""
        return self._eof_at is not None

    def detach_nowait(self) -> None:
        """Leave the session running: send ``detach``; :meth:`run` returns ``reason="detached"``."""
        self._detach_requested = True
        self._wake.set()

    # ---- the task tree -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> SessionEnd:
        """Attach, stay attached, and return how the session ended.

        Every output chunk has been passed to ``on_output`` when this returns.

        Raises:
            SessionFailed: attaching is impossible (unauthenticated, no such
                session, session ended while we were away, protocol error...).
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver)
                task_status.started()
                try:
                    end = await self._connect_loop()
                finally:
                    self._ended = True
                    self._log_space.unpark_all()
                    # _deliver hands on what is queued, then ends.
                    await self._deliver_send.aclose()
        except BaseExceptionGroup as group:
            # One failure (SessionFailed, or a callback's own error) is what the
            # caller wants to catch; more than one stays a group.
            leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
        return end

    async def _deliver(self) -> None:
        async with self._deliver_recv:
            async for item in self._deliver_recv:
                if isinstance(item, OutputChunk):
                    await self._on_output(item)
                elif isinstance(item, Gap):
                    if self._on_gap is not None:
                        await self._on_gap(item)
                elif isinstance(item, LinkStatus):
                    if self._on_status is not None:
                        await self._on_status(item)
                elif self._on_hello is not None:
                    await self._on_hello(item)


    async def _connect_loop(self) -> SessionEnd:
        backoff = self._backoff
        attempt = 0  # failed attempts since the last link that got a hello
        conflict_since: float | None = None
        while True:
            self._attempts += 1
            link: _Link | None = None
            try:
                ws = await self._open()
                link = _Link(ws)
                return await self._run_link(link)
            except _LinkEnded as exc:
                ended = exc
            finally:
                self._link = None
            if link is not None and link.hello is not None:
                backoff.reset()
                attempt = 0
                conflict_since = None
            action = ended.action
            if action is Action.CONFLICT:
                now = trio.current_time()
                if conflict_since is None:
                    conflict_since = now
                # Retry only a writer that was attached before (its old link is
                # probably half-open, see the module docstring), for a bounded time.
                if not self._ever_attached or now - conflict_since > self._takeover_grace_s:
                    raise self._failure(ended)
            elif action is Action.FATAL:
                raise self._failure(ended)
            attempt += 1
            delay = 0.0 if action is Action.RECONNECT_NOW else next(backoff)
            log.info("session.reconnect attempt=%d delay=%.3f reason=%s", attempt, delay,
                     ended.reason)
            await self._deliver_send.send(LinkStatus("reconnecting", attempt, delay, ended.reason))
            await trio.sleep(delay)

    def _failure(self, ended: _LinkEnded) -> SessionFailed:
        cause = ended.__cause__
        error_cls: type[errors.PodtermError] = errors.PodtermError
        if isinstance(cause, errors.HandshakeError):
            error_cls = _HTTP_ERRORS.get(cause.http_status, errors.PodtermError)
        elif ended.code is not None:
            default = (errors.ProtocolViolation if 1002 <= ended.code <= 1010
                       else errors.PodtermError)
            error_cls = _CLOSE_ERRORS.get(ended.code, default)
        reason = ended.reason
        if self._ever_attached and error_cls in (errors.GoneError, errors.NotFoundError):
            reason = f"the session ended while we were disconnected ({reason})"
        elif error_cls is errors.ConflictError and self._ever_attached:
            reason += "; another client took over the session"
        elif not ended.explained:
            # A bare close code or HTTP status: say what to do.
            if error_cls is errors.ConflictError:
                reason += "; it has another writer (use 'podterm join ID' to watch read-only)"
            elif error_cls is errors.AuthError:
                reason += " (check --token / PODTERM_TOKEN)"
        return SessionFailed(reason, error_cls(reason))

    async def _open(self) -> WebSocketStream:
        """Connect and upgrade, bounded by ``connect_timeout_s``."""
        url = self._attach_url(self.out_offset, self.mode, self.resume_token)
        try:
            with trio.fail_after(self._connect_timeout_s):
                ws, chosen = await self._connector(url, subprotocols=(SUBPROTOCOL,),
                                                   headers=self._headers,
                                                   ssl_context=self._ssl_context)
        except trio.TooSlowError as exc:
            raise _LinkEnded(Action.RECONNECT, "connect timed out") from exc
        except errors.HandshakeError as exc:
            raise _LinkEnded(classify_http(exc.http_status), _http_refusal(exc)) from exc
        except OSError as exc:
            raise _LinkEnded(Action.RECONNECT, os_error_reason(exc)) from exc
        except ValueError as exc:
            raise _LinkEnded(Action.FATAL, str(exc)) from exc
        if chosen != SUBPROTOCOL:
            await ws.abort(CloseCode.PROTOCOL_ERROR, "podterm.v1 not selected")
            raise _LinkEnded(Action.FATAL, f"the server chose subprotocol {chosen!r}, "
                             f"not {SUBPROTOCOL}")
        return ws

    async def _run_link(self, link: _Link) -> SessionEnd:
        """Drive one connection until EXIT or detach (returned) or its end (``_LinkEnded``)."""
        self._link = link
        ws = link.ws
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, link, nursery)
                    nursery.start_soon(self._writer, link)
            except BaseExceptionGroup as group:
                raise _pick(group) from None
        except ConnectionClosed as closed:
            if link.detach_sent and closed.code == CloseCode.NORMAL:
                return SessionEnd(None, None, "detached")
            raise self._classify(link, closed.code, closed.reason) from closed
        except errors.ProtocolViolation as exc:
            await ws.abort(exc.close_code, exc.message[:100])
            raise _LinkEnded(Action.FATAL, f"protocol error from the server: {exc.message}",
                             exc.close_code) from exc
        except trio.TooSlowError as exc:
            raise _LinkEnded(Action.RECONNECT, "no hello from the server in time") from exc
        finally:
            # Bounded and shielded: wsconn's aclose waits at most close_timeout_s.
            # After EXIT this answers the gateway's CLOSE, which lets it end the session.
            await ws.aclose()
        assert link.exit is not None
        ex = link.exit
        return SessionEnd(ex.code, ex.signal, ex.reason)

    def _classify(self, link: _Link, code: int, reason: str) -> _LinkEnded:
        text = reason or f"closed with code {code}"
        if link.error is not None:
            return _LinkEnded(classify_close(code), link.error.message, code, explained=True)
        if code == CloseCode.ABNORMAL:
            text = "connection lost"
        return _LinkEnded(classify_close(code), text, code)

    # ---- per link ----------------------------------------------------------------------------

    async def _reader(self, link: _Link, nursery: trio.Nursery) -> None:
        ws = link.ws
        with trio.fail_after(self._connect_timeout_s):
            while link.hello is None:
                if await self._handle_batch(link, await ws.receive_batch(), nursery):
                    return
        while not await self._handle_batch(link, await ws.receive_batch(), nursery):
            pass

    async def _handle_batch(self, link: _Link, batch: list[tuple[int, bytes]],
                            nursery: trio.Nursery) -> bool:
        """Process one read's messages; True once EXIT arrived (the link is done)."""
        codec = link.codec
        for opcode, payload in batch:
            for event in codec.receive_message(opcode, payload):
                if isinstance(event, Stdout | Stderr):
                    if link.expect_gap is not None:
                        raise errors.ProtocolViolation(
                            "output before the gap the hello announced", CloseCode.PROTOCOL_ERROR)
                    data = event.data
                    chunk = OutputChunk(self.out_offset, data, isinstance(event, Stderr))
                    # Hand-over, then the offset: nothing between the two can be
                    # cancelled (module docstring, "Exactly once").
                    await self._deliver_send.send(chunk)
                    self.out_offset += len(data)
                    assert link.acks is not None
                    due = link.acks.update(self.out_offset, trio.current_time())
                    if due is not None:
                        link.ack_due = due
                        self._wake.set()
                elif isinstance(event, Ack):
                    self._on_input_ack(link, event.offset)
                elif isinstance(event, Hello):
                    await self._on_link_hello(link, event, nursery)
                elif isinstance(event, Gap):
                    await self._on_gap_event(link, event)
                elif isinstance(event, Exit):
                    link.exit = event
                    # Stop the writer between messages (never mid-frame) and the
                    # heartbeat; _run_link's aclose() then answers the CLOSE.
                    link.hb_scope.cancel()
                    self._wake.set()
                    return True
                elif isinstance(event, Drain):
                    raise _LinkEnded(Action.RECONNECT_NOW, f"gateway draining: {event.reason}",
                                     CloseCode.GOING_AWAY)
                elif isinstance(event, ErrorMsg):
                    link.error = event  # the close that follows says what to do
        return False

    async def _on_link_hello(self, link: _Link, hello: Hello, nursery: trio.Nursery) -> None:
        if hello.out_offset < self.out_offset:
            raise errors.ProtocolViolation(
                f"hello out_offset {hello.out_offset} is before our offset {self.out_offset}",
                CloseCode.PROTOCOL_ERROR)
        if hello.out_offset > self.out_offset:
            link.expect_gap = (self.out_offset, hello.out_offset)
        if hello.mode != self.mode:
            raise errors.ProtocolViolation(f"hello mode {hello.mode!r}, asked {self.mode!r}",
                                           CloseCode.PROTOCOL_ERROR)
        if hello.resume_token is not None:
            self.resume_token = hello.resume_token
        link.acks = AckScheduler(hello.window, start=hello.out_offset)
        if self.mode == "rw":
            if not self._ever_attached:
                # A client new to this session (``podterm attach``): its input
                # starts where the session's does, with whatever was typed already.
                typed = self._log.read(self._log.acked)
                if self._eof_at is not None:  # same position, in the session's numbering
                    self._eof_at += hello.in_acked - self._log.acked
                self._log = InputLog(hello.in_acked, limit=self._log.limit)
                self._log.append(typed)
            # Release what the gateway accepted; the writer re-sends the rest.
            self._log.replay_from(hello.in_acked)
            self._resent += max(0, self._sent_high - hello.in_acked)
            link.window = AckWindow(hello.window, start=hello.in_acked)
            if hello.stdin_closed:
                self._eof_applied = True  # the gateway has our EOF: never send it again
            self._log_space.unpark_all()
            link.sent_size = (hello.cols, hello.rows)
        link.hello = hello
        first = not self._ever_attached
        self._ever_attached = True
        self._connects += 1
        interval = self._heartbeat_s if self._heartbeat_s is not None else hello.heartbeat_s
        nursery.start_soon(self._heartbeat, link, interval)
        await self._deliver_send.send(hello)
        await self._deliver_send.send(LinkStatus("connected" if first else "reconnected"))
        self._wake.set()

    @staticmethod
    async def _heartbeat(link: _Link, interval_s: float) -> None:
        with link.hb_scope:
            await heartbeat(link.ws, interval_s)

    async def _on_gap_event(self, link: _Link, gap: Gap) -> None:
        if gap.from_offset != self.out_offset:
            raise errors.ProtocolViolation(
                f"gap from {gap.from_offset}, but we are at {self.out_offset}",
                CloseCode.PROTOCOL_ERROR)
        if link.expect_gap is not None and link.expect_gap[1] != gap.to_offset:
            raise errors.ProtocolViolation(
                f"gap to {gap.to_offset}, but hello said {link.expect_gap[1]}",
                CloseCode.PROTOCOL_ERROR)
        link.expect_gap = None
        self._gaps += 1
        self._lost += gap.lost
        await self._deliver_send.send(gap)
        self.out_offset = gap.to_offset
        window = link.acks.window if link.acks is not None else DEFAULT_WINDOW
        link.acks = AckScheduler(window, start=gap.to_offset)

    def _on_input_ack(self, link: _Link, offset: int) -> None:
        window = link.window
        if window is None:
            raise errors.ProtocolViolation("input ACK on a read-only link",
                                           CloseCode.PROTOCOL_ERROR)
        # The gateway ACKs input it has *written*, which may trail the in_acked
        # (accepted) of hello: an ACK at or below what we know changes nothing.
        if offset <= window.acked:
            return
        window.on_ack(offset)  # ProtocolViolation beyond what was sent
        if offset > self._log.acked:
            self._log.ack(offset)
            self._log_space.unpark_all()
        self._wake.set()

    async def _writer(self, link: _Link) -> None:
        """Send input within credit, ACKs, RESIZE and detach; one ``send_raw`` per round."""
        ws = link.ws
        conn = ws.conn
        while link.exit is None:
            wake = self._wake = trio.Event()
            if link.hello is None or conn.state is not WsState.OPEN:
                await wake.wait()  # the reader ends the link if it is closing
                continue
            out: list[bytes] = []
            window = link.window
            if window is not None:
                credit = window.credit()
                end = self._log.end
                while credit > 0 and window.sent < end:
                    piece = self._log.read(window.sent, min(credit, STDIN_CHUNK))
                    out.append(_frame(conn, encode_stdin(piece)))
                    window.on_send(len(piece))
                    credit -= len(piece)
                self._sent_high = max(self._sent_high, window.sent)
                eof_at = self._eof_at
                if (eof_at is not None and window.sent >= eof_at and not link.eof_sent
                        and not self._eof_applied):
                    # After the last input byte, in the same write: the gateway
                    # applies it once it has accepted everything before it.
                    out.append(_frame(conn, encode_control(StdinEof(eof_at))))
                    link.eof_sent = True
                if self._size is not None and self._size != link.sent_size:
                    link.sent_size = self._size
                    out.append(_frame(conn, encode_resize(*self._size)))
            acks = link.acks
            due, link.ack_due = link.ack_due, None
            if acks is not None:
                polled = acks.poll(trio.current_time())
                if polled is not None:
                    due = polled
            if due is not None:
                out.append(_frame(conn, encode_ack(due)))
            if self._detach_requested and not link.detach_sent:
                out.append(_frame(conn, encode_control(Detach())))
                link.detach_sent = True
            if out:
                await ws.send_raw(b"".join(out))
                continue
            deadline = acks.deadline() if acks is not None else None
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await wake.wait()


def _http_refusal(exc: errors.HandshakeError) -> str:
    """The gateway's ``error.message`` from a refused upgrade, else wsconn's summary."""
    text = exc.message
    _, sep, body = text.partition(": ")
    if sep and body.startswith("{"):
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return text
        return f"HTTP {exc.http_status}: {message}"
    return text


def _frame(conn: WebSocketConnection, message: tuple[bytes, Any]) -> bytes:
    """One binary frame from the codec's ``(prefix, payload)``."""
    prefix, payload = message
    return conn.send_binary(payload, prefix)


_LINK_ERRORS = (_LinkEnded, ConnectionClosed, errors.ProtocolViolation, trio.TooSlowError)


def _pick(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that explains a link's end, from its nursery's group.

    Both tasks often fail together (the reader sees the close, the writer
    the broken stream); the first explanation in the group wins.  A group
    holding anything else (a bug, or cancellation from outside) is re-raised
    whole.
    """
    leaves = list(_leaves(group))
    if any(not isinstance(e, _LINK_ERRORS) and not isinstance(e, trio.Cancelled)
           for e in leaves):
        return group
    for exc in leaves:
        if isinstance(exc, _LinkEnded):
            return exc
    for exc in leaves:
        if isinstance(exc, _LINK_ERRORS):
            return exc
    return group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]
