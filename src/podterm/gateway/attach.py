"""podterm.v1 attach, resume and read-only join (docs/protocol.md §3-§7).

``GET /api/v1/sessions/{id}/attach?offset=N&mode=rw|ro&resume_token=T``.

Before the upgrade (HTTP answers): 400 bad parameters or a bad upgrade, 401/403
(the router), 404 unknown session, 410 ended session, 503 draining.  After the
upgrade, failures are an ``error`` CONTROL followed by a close: 4409 writer
conflict, 1008 ``bad_offset``, 4410 session ended.

The relay
---------
Each attached link has at most one task per direction, and no task, channel
or lock per message (ARCHITECTURE.md "Data plane rules").  Each runs only
while something is due, and an idle link has neither:

* the receiver is the connection's own task at first; when its socket is
  drained it hands the descriptor to the server's
  :class:`~podterm.net.idle.IdleSockets` and ends (the connection's task
  returns the link, a :class:`~podterm.gateway.http.LivesOn`), and the next
  byte or the peer's FIN starts a receiver task again.  TLS and PROXY-wrapped
  streams keep theirs (their buffers hide bytes from the socket);
* the sender is started by the first wake-up after it returned
  (``Attachment.wake`` calls :meth:`_Link.start_sender`).

The link is closed once (:meth:`_Link._finish`): by the receiver when it
stops, or by the sender when it ends the link with no receiver task left.

* the **receiver** reads a batch (every message of one socket read), decodes
  each with :class:`~podterm.protocol.session_proto.ServerCodec` and applies
  it to the session: STDIN into the session's input buffer (waiting while it
  is full: back-pressure on the socket), ``stdin_eof`` as the input's end
  (:meth:`~podterm.session.session.Session.close_input_at`), ACK as credit,
  RESIZE, ``detach``;
* the **sender**, started when the session, the receiver or a timer wakes
  the link, sends *everything* due in one write: queued notices (``hello``, ``gap``,
  ``drain``, ``error``), the input ACK, output up to the link's credit (STDOUT
  and STDERR in messages of at most 32 KiB), EXIT after the last byte, and the
  heartbeat PING when one is due, and ends when nothing more is (the
  process's ``DeadlineTimer`` wakes the link for its next PING).  Two
  unanswered PINGs, or a write that cannot complete in that time, mark the
  link dead.

Hot path (issue 9): a keystroke is written to the upstream by the receiver
itself when nothing is queued before it (``LocalStream.send_stdin_nowait``);
its input ACK waits up to ``INPUT_ACK_DELAY_S`` for output to ride with (the
process's one ``AckTimer`` wakes the sender if none came; no deadline moves
per keystroke); and
output that arrives while the sender is parked is sent by the output pump's
own task (:meth:`_Link.flush_output`: one non-blocking write of the ACK and
the output; the sender is started only for what that write could not take,
or when anything else is due).  So an echo costs two task steps, as in a raw
relay.  Output messages of 1 KiB and more are laid out as frame headers and
read-only views of the ring's segments (a bulk read is one segment, as the
upstream returned it), and a batch goes to the socket in one ``writev``: no
copy between the upstream's read and the socket's.

When the link ends for any reason the attachment is removed from the session
(the session detaches; it does not end).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from podterm.audit.events import Target
from podterm.errors import (
    BadRequestError,
    CloseCode,
    HandshakeError,
    PodtermError,
    ProtocolViolation,
)
from podterm.gateway.http import LivesOn, Upgraded, error_code
from podterm.gateway.router import Call
from podterm.metrics import GatewayCounters
from podterm.net.idle import IdleSockets
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, accept_on
from podterm.protocol._types import Buffer
from podterm.protocol.events import Ack, Detach, ErrorMsg, Event, Gap, Resize, Stdin, StdinEof
from podterm.protocol.handshake import extract_bearer_subprotocol, parse_upgrade
from podterm.protocol.session_proto import (
    SERVER_CHUNK_BYTES,
    SUBPROTOCOL,
    MsgType,
    ServerCodec,
    control_body,
    encode_ack,
    encode_exit,
)
from podterm.protocol.websocket import ConnectionState, Message, Role, WsLimits
from podterm.resilience.heartbeat import Heartbeat
from podterm.session.attachment import Attachment, Mode, deadline_timer
from podterm.session.registry import SessionRegistry, Unavailable
from podterm.session.session import Session

if TYPE_CHECKING:
    from podterm.gateway.auditor import Auditor

__all__ = ["AttachHandler", "relay"]

log = logging.getLogger(__name__)

_STDOUT_PREFIX = bytes((MsgType.STDOUT,))
_STDERR_PREFIX = bytes((MsgType.STDERR,))
_CONTROL_PREFIX = bytes((MsgType.CONTROL,))
_STDOUT_CH = 1

#: Most output bytes put in one write: the window's worth at most; bounding
#: it keeps one busy link from holding the loop for long (p99 first).
MAX_BATCH_BYTES = 256 * 1024
#: Output messages this size and larger are sent from views of the ring
#: (no copy); smaller ones are copied out (cheaper than the views for an echo).
_COPY_BELOW = 1024
_HEAD_SHORT = struct.Struct(">BB")
_HEAD_MEDIUM = struct.Struct(">BBH")
_FIN_BINARY = 0x82


def _frame_head(length: int) -> bytes:
    """The header of one unmasked final binary frame of ``length`` payload bytes (< 64 KiB)."""
    if length < 126:
        return _HEAD_SHORT.pack(_FIN_BINARY, length)
    return _HEAD_MEDIUM.pack(_FIN_BINARY, 126, length)

_MAX_TOKEN_CHARS = 256
_OFFSET_RE = re.compile(r"[0-9]{1,20}")


def _parse_params(query: dict[str, str]) -> tuple[int, Mode, str | None]:
    raw_offset = query.get("offset", "0")
    if not _OFFSET_RE.fullmatch(raw_offset) or int(raw_offset) >= 1 << 64:
        raise BadRequestError(f"offset: expected a non-negative integer, got {raw_offset!r}")
    raw_mode = query.get("mode", "rw")
    try:
        mode = Mode(raw_mode)
    except ValueError:
        raise BadRequestError(f"mode: expected 'rw' or 'ro', got {raw_mode!r}") from None
    token = query.get("resume_token") or None
    if token is not None and len(token) > _MAX_TOKEN_CHARS:
        raise BadRequestError("resume_token: too long")
    return int(raw_offset), mode, token


class AttachHandler:
    """The route handler for ``/api/v1/sessions/{id}/attach``.

    Args:
        registry: where sessions are found.
        counters: attaches, resumes, bytes, heartbeat failures.
        ws_limits: frame and message bounds for the WebSocket.
        origin_ok: browser Origin check (None: every origin; bearer tokens,
            not cookies, authenticate, so a foreign page cannot ride on them).
        auditor: audits refused attaches and protocol violations (None: not audited).
    """

    __slots__ = ("registry", "counters", "ws_limits", "origin_ok", "auditor", "idle")

    def __init__(self, registry: SessionRegistry, counters: GatewayCounters, *,
                 ws_limits: WsLimits | None = None,
                 origin_ok: Callable[[str | None], bool] | None = None,
                 auditor: Auditor | None = None) -> None:
        self.registry = registry
        self.counters = counters
        self.ws_limits = ws_limits or WsLimits()
        self.origin_ok = origin_ok
        self.auditor = auditor
        #: The server's watcher of quiet sockets (set while it serves): idle
        #: links then keep no receiver task.  None: every link keeps one.
        self.idle: IdleSockets | None = None

    def __repr__(self) -> str:
        return f"<AttachHandler {self.registry!r}>"

    async def __call__(self, call: Call) -> Upgraded:
        request = call.request
        assert request.identity is not None  # the router authenticated
        if not request.is_upgrade:
            raise HandshakeError("this endpoint needs a WebSocket upgrade "
                                 f"(subprotocol {SUBPROTOCOL})", 426,
                                 headers=[("Upgrade", "websocket")])
        offset, mode, token = _parse_params(request.query)
        upgrade = parse_upgrade(request.head, origin_ok=self.origin_ok)
        _, offered = extract_bearer_subprotocol(upgrade.subprotocols)
        if SUBPROTOCOL not in offered:
            raise HandshakeError(f"offer the WebSocket subprotocol {SUBPROTOCOL!r}", 400)
        auditor = self.auditor
        try:
            if self.registry.draining:
                raise Unavailable("the gateway is draining; reconnect through the load "
                                  "balancer")
            session = self.registry.get_for(call.params["id"], request.identity)
        except PodtermError as exc:
            if auditor is not None:
                auditor.attach_refused(call.params["id"], mode, offset,
                                       resuming=token is not None, exc=exc)
            raise
        headers = [("X-Request-Id", request.request_id)] if request.request_id else []
        # The 101 as bytes, without h11, unless h11 read this request (a body).
        h11conn, trailing = call.exchange.take_over()
        try:
            ws = await accept_on(call.stream, h11conn, upgrade, SUBPROTOCOL,
                                 extra_headers=headers, limits=self.ws_limits,
                                 close_timeout_s=session.limits.close_timeout_s,
                                 trailing=trailing)
        except HandshakeError as exc:
            # accept_on answered and closed the stream itself.
            GatewayCounters.bump(self.counters.handshake_failures, error_code(exc.http_status))
            if auditor is not None:
                await auditor.protocol_rejected(request, exc.message,
                                                http_status=exc.http_status,
                                                protocol=SUBPROTOCOL)
            return Upgraded(None)
        # The relay runs once the HTTP layer has let go of the request.
        return Upgraded(functools.partial(relay, ws, session, mode=mode, offset=offset,
                                          resume_token=token, counters=self.counters,
                                          auditor=auditor, idle=self.idle))


async def _refuse(ws: WebSocketStream, exc: PodtermError, code: str) -> None:
    """Post-upgrade refusal: an ``error`` CONTROL, then close with the error's code."""
    try:
        body = control_body(ErrorMsg(code, exc.message))
        with trio.move_on_after(ws.close_timeout_s):
            await ws.send_binary(body, _CONTROL_PREFIX)
    except ConnectionClosed:
        pass
    await ws.aclose(int(exc.close_code), exc.message[:100])


async def relay(ws: WebSocketStream, session: Session, *, mode: Mode, offset: int,
                resume_token: str | None, counters: GatewayCounters,
                auditor: Auditor | None = None, idle: IdleSockets | None = None
                ) -> LivesOn | None:
    """Attach ``ws`` to ``session`` and relay until the link ends, or until it is idle.

    With ``auditor``, a protocol violation that closes the link is a
    ``protocol.reject`` (the attach and detach events come from the session).
    With ``idle``, the receiver leaves its task while the socket is quiet
    (see "The relay"): this returns the link (a :class:`LivesOn`) then, and
    the link goes on without the caller's task.

    Resource handling: ``ws`` is closed by the time the link has ended; the
    attachment is removed from the session whatever happens.
    """
    try:
        att = session.attach(mode, offset, resume_token)
    except PodtermError as exc:
        code = getattr(exc, "error_code", None) or error_code(exc.http_status)
        GatewayCounters.bump(counters.handshake_failures, code)
        await _refuse(ws, exc, code)
        return None
    GatewayCounters.bump(counters.attaches, mode.value)
    if att.resumed:
        counters.resumes += 1
    # The link's tasks run in the nursery that runs this one: the server's,
    # for every connection.  No nursery per link (~1.3 KiB of an idle session).
    home = trio.lowlevel.current_task().parent_nursery
    assert home is not None
    link = _Link(ws, att, counters, auditor, home=home, idle=idle)
    att.relay = link
    att.parked = True
    # The hello (and the 101 before it, the replay after it) from this task
    # when the socket takes it at once; else the sender task sends it.
    if link.flush_output():
        link.heartbeat_due()
    else:
        att.wake()
    if await link.run_receiver():
        return link  # idle: the watcher starts a receiver when the client writes
    return None


class _Link(LivesOn):
    """The two directions of one attached connection (see the module docstring).

    Who ends it: the receiver task when it stops (the peer left or is
    closing, a violation, a detach) waits for the sender to finish (CLOSE,
    EXIT), then closes the link (:meth:`_finish`); when the sender ends the
    link first (a dead peer, a close it sent), it stops the receiver, and
    closes the link itself if no receiver task is left to.
    """

    __slots__ = ("ws", "att", "session", "counters", "codec", "hb", "rx_scope", "rx_done",
                 "auditor", "sender_done", "failed", "_lot", "home", "idle", "rx_fd",
                 "finished", "_on_end", "context", "backlog")

    def __init__(self, ws: WebSocketStream, att: Attachment, counters: GatewayCounters,
                 auditor: Auditor | None = None, *, home: trio.Nursery,
                 idle: IdleSockets | None = None) -> None:
        self.auditor = auditor
        self.home = home  # where the link's tasks run
        self.context = contextvars.copy_context()  # and in what context (the request's)
        self.idle = idle  # the watcher of quiet sockets, if the receiver may leave
        self.rx_fd = -1  # the socket handed to ``idle`` (no receiver task meanwhile)
        self.finished = False
        self._on_end: list[Callable[[], None]] | None = None
        # What the idle watcher's call read but left to a receiver task: the
        # events it could not apply without waiting, then the error to meet.
        self.backlog: tuple[list[Event], Exception | None] | None = None
        now = trio.current_time()
        self.ws = ws
        self.att = att
        self.session = att.session
        self.counters = counters
        self.codec = ServerCodec(read_only=att.mode is Mode.RO)
        limits = att.session.limits
        self.hb = Heartbeat(limits.heartbeat_interval_s, max_missed=limits.heartbeat_max_missed,
                            now=now)
        ws.heartbeat = self.hb  # the reader hands PONGs to it
        # The running receiver's scope (the sender stops it); None between tasks.
        self.rx_scope: trio.CancelScope | None = None
        self.rx_done = False  # the receiver stopped for good
        self.sender_done = False  # the sender has ended the link
        self.failed = False  # the sender raised (a bug: logged, the link aborted)
        # Whoever waits for one of the two flags (wait_until), made on first use.
        self._lot: trio.lowlevel.ParkingLot | None = None

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` (on :attr:`rx_done`, :attr:`sender_done`) holds."""
        await trio.lowlevel.checkpoint()
        while not condition():
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            await self._lot.park()

    def _flagged(self) -> None:
        if self._lot is not None:
            self._lot.unpark_all()

    # -------------------------------------------------------------- receiver

    def on_end(self, callback: Callable[[], None]) -> None:
        """:class:`LivesOn`: call ``callback()`` once the link has ended (its stream closed)."""
        if self.finished:
            _call_quietly(callback)
            return
        if self._on_end is None:
            self._on_end = []
        self._on_end.append(callback)

    async def run_receiver(self) -> bool:
        """A receiver task: the connection's own first, then one per burst of input.

        Returns True when it left with the socket quiet (handed to
        :attr:`idle`); otherwise the link has ended, and is closed, when it
        returns.
        """
        idle = self.idle
        if (idle is not None and self.backlog is None and self.ws.idle()
                and self._park_receiver(idle)):
            # Nothing to read yet (a new link whose request nothing followed):
            # watched at once, with no scope and no read that would fail
            # with EAGAIN; the watcher calls at once if bytes are there.
            return True
        parked = False
        try:
            parked = await self.receive_loop()
            if not parked:
                if self.att.gone and self._sender_parked():
                    # The client is gone and no sender runs: nothing can be
                    # sent, so nobody has to be woken to find that out.
                    self._ended()
                else:
                    # The receiver stopped (the peer left or is closing, a
                    # violation, a detach): the sender finishes (CLOSE, EXIT)
                    # and ends the link.
                    self.att.wake()
                    await self.wait_until(lambda: self.sender_done)
                    if self.failed:  # (logged by the sender)
                        await self._abort_internal()
        except Exception:
            log.exception("session.attach.failed %s", self.session.id)
            await self._abort_internal()
        finally:
            if not parked:
                await self._finish()
        return parked

    async def _receiver_task(self) -> None:
        await self.run_receiver()

    async def receive_loop(self) -> bool:
        """Read batches and apply them: False when the receiving is over (the sender
        is told why), True when the socket went quiet and was handed to :attr:`idle`."""
        ws = self.ws
        att = self.att
        session = self.session
        decode = self.codec.receive_message
        parked = False
        scope = self.rx_scope = trio.CancelScope()
        if self.sender_done:
            scope.cancel()  # (started by the watcher just before the link ended)
        try:
            with scope:
                parked = await self._receive(ws, att, session, decode)
        finally:
            self.rx_scope = None
            if not parked:
                self.rx_done = True
                self._flagged()
        return parked

    async def _receive(self, ws: WebSocketStream, att: Attachment, session: Session,
                       decode: Callable[[int, bytes], list[Event]]) -> bool:
        idle = self.idle
        apply_nowait = self._apply_nowait
        try:
            backlog = self.backlog
            if backlog is not None:  # left by the idle watcher's call (_input_came)
                self.backlog = None
                events, error = backlog
                for event in events:
                    if att.close is not None:
                        break
                    if not apply_nowait(event):
                        await self._apply(event)
                if error is not None:
                    raise error
            while att.close is None:
                if idle is not None and ws.idle():
                    if self._park_receiver(idle):
                        return True
                    # (the link is ending, or the watcher stopped: wait here)
                    await ws.wait_readable()
                    ws.readable()
                batch = await ws.receive_batch(until_idle=idle is not None)
                for opcode, payload in batch:
                    for event in decode(opcode, payload):
                        if not apply_nowait(event):
                            await self._apply(event)
                    if att.close is not None:
                        break
        except ProtocolViolation as exc:
            att.request_close(int(exc.close_code), exc.message[:100],
                              ErrorMsg("protocol_error", exc.message))
            self._rejected(exc)
        except BadRequestError as exc:  # an ACK beyond what was sent
            att.request_close(int(exc.close_code), exc.message[:100],
                              ErrorMsg("bad_request", exc.message))
            self._rejected(exc)
        except ConnectionClosed as exc:
            att.mark_gone()  # (a parked sender is not started: run_receiver ends the link)
            if exc.code in (1002, 1007, 1009) and ws.conn.close_received is None:  # bad frames
                self._rejected(ProtocolViolation(exc.reason or "invalid frame", exc.code))
        return False

    def _apply_nowait(self, event: Event) -> bool:
        """Apply a client message that needs no wait (STDIN with room, ACK, RESIZE).

        False, nothing done: :meth:`_apply` (a task) takes it.

        Raises:
            BadRequestError: an ACK beyond what was sent.
        """
        kind = type(event)
        att = self.att
        session = self.session
        if kind is Stdin:
            return (att is not session.writer
                    or session.write_input_nowait(att, event.data))  # type: ignore[union-attr]
        if kind is Ack:
            session.ack_output(att, event.offset)  # type: ignore[union-attr]
            return True
        if kind is Resize:
            if att is session.writer:
                session.resize(event.cols, event.rows)  # type: ignore[union-attr]
            return True
        return False

    async def _apply(self, event: Event) -> None:
        """Apply what :meth:`_apply_nowait` left: STDIN that waits for room, the rest."""
        att = self.att
        session = self.session
        kind = type(event)
        if kind is Stdin:
            if att is session.writer:
                await session.write_input(att, event.data)  # type: ignore[union-attr]
        elif kind is StdinEof:
            # After every STDIN before it on this link was accepted above;
            # the session waits for the rest if it is short.
            if att is session.writer:
                session.close_input_at(event.offset)  # type: ignore[union-attr]
        elif kind is Detach:
            att.request_close(CloseCode.NORMAL, "detached")
        elif kind is ErrorMsg:
            log.info("session.attach.client_error %s: %s %s", session.id,
                     event.code, event.message)  # type: ignore[union-attr]

    def _park_receiver(self, idle: IdleSockets) -> bool:
        """Hand the quiet socket to the watcher; True: this receiver task may end."""
        if self.sender_done or self.att.gone:
            return False
        fd = self.ws.socket_fd()
        # (Called only when the stream is idle(): its latest read emptied the socket.)
        if not idle.watch(fd, self._input_came, drained=True):
            return False
        self.rx_fd = fd
        return True

    def _input_came(self) -> None:
        """The watcher's call: the quiet socket has bytes (or an EOF); read them.

        What needs no wait is done here, in the watcher's task: a heartbeat's
        PONG, and client messages that :meth:`_apply_nowait` takes (a
        keystroke, its ACK), so a typing link runs no task of its own either.
        Anything else starts a receiver task, which takes what was read first.
        """
        self.rx_fd = -1
        ws = self.ws
        ws.readable()
        idle = self.idle
        if ws.read_nowait():
            if idle is not None and self._park_receiver(idle):
                return  # a heartbeat's PONG (or nothing): no receiver task needed
        else:
            batch = ws.take_stashed()
            if batch is not None:
                if (self._apply_read(batch) and idle is not None and ws.idle()
                        and self._park_receiver(idle)):
                    return
            elif ws.lost_nowait() and self._end_nowait():
                return  # the client left: no task was needed to end the link
        try:
            self.context.run(self.home.start_soon, self._receiver_task)
        except RuntimeError:  # the server's nursery closed (it stopped): nobody reads
            self.rx_done = True
            self.att.mark_gone()

    def _apply_read(self, batch: list[Message]) -> bool:
        """Apply data messages read by the watcher's call; False: a receiver task must run.

        What could not be applied at once, and the error that stopped it, go
        to :attr:`backlog`, in order, for the receiver task.
        """
        att = self.att
        decode = self.codec.receive_message
        events: list[Event] = []
        error: Exception | None = None
        try:
            for opcode, payload in batch:
                events += decode(opcode, payload)
        except Exception as exc:  # (the receiver meets it after what came before it)
            error = exc
        apply_nowait = self._apply_nowait
        for i, event in enumerate(events):
            if att.close is not None:
                break
            try:
                if not apply_nowait(event):
                    self.backlog = (events[i:], error)
                    return False
            except Exception as exc:
                self.backlog = ([], exc)
                return False
        if error is not None or att.close is not None:
            self.backlog = ([], error)
            return False
        return True

    def _end_nowait(self) -> bool:
        """End a link whose client is gone, from the watcher's call; False: not now.

        Only while no task runs for the link (the sender parked, no
        receiver) and nothing waits to be written: the end the receiver and
        the sender would have come to (the link lost, out of the session, the
        stream closed, the callbacks), without starting either of them.
        """
        att = self.att
        if (not self._sender_parked() or self.backlog is not None
                or self.rx_scope is not None or type(self.ws.stream) is not trio.SocketStream):
            return False
        self._ended()
        att.mark_gone()
        self.rx_done = True
        self.context.run(self._finish_nowait)
        return True

    def _sender_parked(self) -> bool:
        """No sender task runs (it parked, nothing left to write): waking it would start one."""
        att = self.att
        return att.parked and att.relay is not None and not self.ws.has_pending_out

    def _stop_receiver(self) -> None:
        """Stop receiving for good (the sender ends or closes the link)."""
        if self.rx_fd >= 0:  # quiet: no task to stop
            assert self.idle is not None
            self.idle.forget(self.rx_fd)
            self.rx_fd = -1
            self.rx_done = True
            self._flagged()
        elif self.rx_scope is not None:
            self.rx_scope.cancel()

    async def _abort_internal(self) -> None:
        with trio.CancelScope(shield=True):
            await self.ws.abort(CloseCode.INTERNAL_ERROR, "internal error; reconnect and resume")

    async def _finish(self) -> None:
        """Close the link (once): out of the session, the stream closed, the callbacks."""
        if self.finished:
            return
        ws = self.ws
        if ws.conn.state is ConnectionState.CLOSED and type(ws.stream) is trio.SocketStream:
            # Nothing more can be sent (the CLOSEs were exchanged, or the
            # client is gone): abort would only close the socket.
            self._finish_nowait()
            return
        try:
            self._leave_session()
        finally:
            # Idempotent: after a close handshake this only makes sure the
            # stream is closed; after a lost connection it closes the socket.
            with trio.CancelScope(shield=True):
                await self.ws.abort(CloseCode.GOING_AWAY, "")
            self._ended_callbacks()

    def _finish_nowait(self) -> None:
        """:meth:`_finish` for a link whose client is gone: nothing to send, no wait."""
        if self.finished:
            return
        try:
            self._leave_session()
        finally:
            self.ws.close_nowait()
            self._ended_callbacks()

    def _leave_session(self) -> None:
        self.finished = True
        att = self.att
        att.relay = None
        if att.timer_at is not None:
            deadline_timer().cancel(att)  # not held until its next PING was due
        if self.rx_fd >= 0 and self.idle is not None:
            self.idle.forget(self.rx_fd)
            self.rx_fd = -1
        self.session.detach(att)

    def _ended_callbacks(self) -> None:
        callbacks, self._on_end = self._on_end, None
        for callback in callbacks or ():
            _call_quietly(callback)

    def _rejected(self, exc: PodtermError) -> None:
        if self.auditor is not None:
            self.auditor.protocol_rejected_nowait(
                exc.message or type(exc).__name__, close_code=int(exc.close_code),
                protocol=SUBPROTOCOL, path=f"/api/v1/sessions/{self.session.id}/attach",
                target=Target(session=self.session.id))

    # ---------------------------------------------------------------- sender

    async def run_sender(self) -> None:
        """The sender task: runs :meth:`send_loop` until nothing is due or the link ended.

        Started by :meth:`Attachment.wake` (:meth:`start_sender`) when the
        attachment is parked, so an idle link has no sender task at all.
        """
        try:
            ended = await self.send_loop()
        except Exception:  # never into the server's nursery: every other link runs there
            log.exception("session.attach.sender_failed %s", self.session.id)
            self.failed = True
            ended = True
        except BaseException:
            self._ended()
            if self.rx_done:
                await self._finish()  # (shielded)
            raise
        if ended:
            self._ended()
            if self.rx_done:  # no receiver task is left to close the link
                if self.failed:
                    await self._abort_internal()
                await self._finish()

    def start_sender(self) -> None:
        """:class:`~podterm.session.attachment.Relay`: start the sender's task.

        In the server's nursery, in this request's context (its request id,
        identity and client address for the audit), whoever wakes it.
        """
        self.context.run(self.home.start_soon, self.run_sender)

    def _ended(self) -> None:
        self.att.relay = None  # never started again
        self.att.parked = False
        self.sender_done = True
        self._flagged()
        self._stop_receiver()  # (the receiver may still be reading, or be quiet)

    async def send_loop(self) -> bool:
        """Send whatever is due, one write per batch; True once the link is over.

        Returns False, with the attachment :attr:`~Attachment.parked`, when
        nothing is due: the next :meth:`Attachment.wake` starts it again.
        """
        ws = self.ws
        att = self.att
        session = self.session
        hb = self.hb
        counters = self.counters
        limits = session.limits
        # A write that cannot finish in two heartbeat intervals is a dead peer
        # with a full receive window (half-open TCP): same verdict as no PONG.
        stall_s = limits.heartbeat_interval_s * limits.heartbeat_max_missed
        send_binary = ws.conn.send_binary
        ack_urgent = limits.window_bytes // 4
        while True:
            if att.gone:
                return True
            if ws.conn.close_sent is not None:  # the receiver is sending the CLOSE (a
                if self.rx_fd >= 0:  # violation, the peer's CLOSE): nothing more to send
                    self._stop_receiver()
                await self.wait_until(lambda: self.rx_done)
                return True
                return True
            parts: list[Buffer] = []
            # 1. notices: hello, gap, drain, error.
            self._take_notices(parts)
            # 2. the input ACK (writer), placed here once it is known to go.
            ack_index = len(parts)
            ack = session.in_written if att is session.writer else 0
            # 3. output up to the link's credit, unless the link is closing
            #    (what it has not seen is replayed when it resumes).
            if att.close is None:
                self._collect_output(parts)
                # 4. EXIT after the last byte, then close 1000: when the
                #    process exited by itself (a session being ended has
                #    its status too, before it says why: EXIT then 4410).
                if (not att.exit_sent and session.exited_by_itself
                        and att.sent >= session.ring.end):
                    parts.append(self._exit_message("exited"))
                    att.close = (CloseCode.NORMAL, "session exited")
            elif att.close[0] == CloseCode.SESSION_ENDED and not att.exit_sent:
                # Killed (DELETE, a timer): EXIT, then close 4410.
                parts.append(self._exit_message(session.exit_reason))
            now = trio.current_time()
            if ack > att.in_ack_sent:
                # Bytes written to the upstream.  Alone, the ACK waits up to
                # INPUT_ACK_DELAY_S for output to ride with (a keystroke's
                # echo): one write, not two.  The process's AckTimer wakes
                # this sender (ack_overdue) if nothing took it along by then.
                if (parts or att.close is not None or att.ack_overdue
                        or ack - att.in_ack_sent >= ack_urgent):
                    att.in_ack_sent = ack
                    att.ack_overdue = False
                    prefix, body = encode_ack(ack)
                    parts.insert(ack_index, send_binary(body, prefix))
                else:
                    att.defer_ack()
            else:
                att.ack_overdue = False  # sent meanwhile (flush_output) or none due
            # 5. heartbeat.
            if now >= hb.deadline:
                ping = hb.poll(now)
                if hb.is_dead:
                    counters.heartbeat_failures += 1
                    log.info("session.link.dead %s: no pong to %d pings", session.id,
                             hb.max_missed)
                    await ws.abort(CloseCode.INTERNAL_ERROR, "heartbeat lost")
                    return True
                if ping is not None:
                    parts.append(ws.conn.send_ping(ping))
            if parts or ws.has_pending_out:
                # Headers and ring views as they are: one writev, no join
                # (joined once for TLS); the views are let go once written.
                try:
                    done = await ws.send_batch(parts, stall_s)
                except ConnectionClosed:
                    att.mark_gone()
                    return True
                if not done:
                    counters.heartbeat_failures += 1
                    log.info("session.link.dead %s: peer stopped reading", session.id)
                    await ws.abort(CloseCode.INTERNAL_ERROR, "peer stopped reading")
                    return True
                continue  # more may be due (output beyond one batch)
            if att.close is not None:
                await self._close(*att.close)
                return True
            # Nothing to send: the task ends until woken (output, a notice, a
            # deferred ACK's turn: AckTimer, the next PING's: DeadlineTimer).
            self.heartbeat_due()
            att.parked = True
            return False

    def flush_output(self) -> bool:
        """Send what is due from the caller's task while the sender is parked.

        Called synchronously by :meth:`Attachment.output_ready` (the output
        pump appended to the ring), and by :func:`relay` for a link's first
        batch: the batch the sender would send (notices such as the hello,
        the input ACK if one is due, then the output) goes out in one
        non-blocking write, without waking the sender.  Returns False when
        the sender has to run instead: a close or a PING due (nothing sent
        then), the stream cannot take a write now, what it wrote did not
        all go at once (the rest stays queued in the stream and the sender
        finishes it under its stall bound), more output is due than one
        batch holds, or the process has exited (EXIT is the sender's).
        """
        att = self.att
        ws = self.ws
        if (att.close is not None or att.gone or not ws.can_send_nowait()
                or trio.current_time() >= self.hb.deadline):
            return False
        session = self.session
        parts: list[Buffer] = []
        try:
            self._take_notices(parts)
            if att is session.writer:
                ack = session.in_written
                if ack > att.in_ack_sent:
                    att.in_ack_sent = ack
                    prefix, body = encode_ack(ack)
                    parts.append(ws.conn.send_binary(body, prefix))
            self._collect_output(parts)
            if not parts and not ws.has_pending_out:
                return True  # no credit: nothing the sender could send either
            if not ws.send_nowait(parts):
                return False
            if session.is_exited and not att.exit_sent:
                return False  # EXIT (and the close) are the sender's
            ring = session.ring
            return att.sent >= min(ring.end, att.acked + session.limits.window_bytes)
        except Exception:  # never into the session's task: the link ends instead
            self._failed_nowait("flush")
        return False  # the sender finishes the write (or the close)

    def _take_notices(self, parts: list[Buffer]) -> None:
        """Append the queued control messages (hello, gap, drain, error), in order."""
        notices = self.att.notices
        if notices:
            send_binary = self.ws.conn.send_binary
            for notice in notices:
                parts.append(send_binary(control_body(notice), _CONTROL_PREFIX))
            notices.clear()

    def ping_nowait(self) -> bool:
        """Send the heartbeat's PING from the timer's task while the sender is parked.

        Called by :meth:`Attachment.timer_due`.  Returns False, having sent
        nothing, when the sender has to run instead: anything else due (a
        notice, a close), a verdict to act on (no PONG to the latest PINGs),
        or a stream that cannot take a write now.  A PING the socket only
        took part of stays queued in the stream, and the sender is woken to
        finish it.
        """
        att = self.att
        ws = self.ws
        if att.close is not None or att.gone or att.notices or not ws.can_send_nowait():
            return False
        hb = self.hb
        ping = hb.poll(trio.current_time())
        if ping is None:
            return False  # not due after all, or dead: the sender decides
        try:
            if not ws.send_nowait([ws.conn.send_ping(ping)]):
                return False
        except Exception:  # never into the timer's task: the link ends instead
            self._failed_nowait("ping")
            return False
        self.heartbeat_due()
        return True

    def heartbeat_due(self) -> None:
        """Have the process's timer call :meth:`Attachment.timer_due` at the next PING's time."""
        deadline_timer().schedule(self.att, self.hb.deadline)

    def _failed_nowait(self, what: str) -> None:
        """A synchronous send raised (a bug): logged, and the link ends with 1011."""
        log.exception("session.attach.%s_failed %s", what, self.session.id)
        self.att.request_close(CloseCode.INTERNAL_ERROR, "internal error; reconnect and resume")

    def _exit_message(self, reason: str) -> bytes:
        status = self.session.exit_status
        self.att.exit_sent = True
        prefix, body = encode_exit(status.code if status else None,
                                   status.signal if status else None, reason)
        return self.ws.conn.send_binary(body, prefix)

    def _collect_output(self, parts: list[Buffer]) -> None:
        """Append STDOUT/STDERR messages for everything the link may be sent now.

        A message of :data:`_COPY_BELOW` bytes or more goes in as its frame
        header (with the type byte) followed by read-only views of the ring's
        segments, which the socket write gathers (``writev``): no copy.
        """
        att = self.att
        session = self.session
        ring = session.ring
        counters = self.counters
        conn = self.ws.conn
        send_binary = conn.send_binary
        # Unmasked frames (the server role) can be laid out here.
        views_ok = conn.role is Role.SERVER and conn.state is ConnectionState.OPEN
        sent = att.sent
        if sent < ring.start:
            # A viewer fell a full ring behind (a writer never can: the pump
            # waits for its ACKs).  Tell it, and continue from what is held.
            gap = Gap(sent, ring.start)
            parts.append(send_binary(control_body(gap), _CONTROL_PREFIX))
            counters.gaps += 1
            counters.gap_bytes += gap.lost
            sent = att.sent = ring.start
            att.acked = max(att.acked, sent)
        stop = min(ring.end, att.acked + session.limits.window_bytes, sent + MAX_BATCH_BYTES)
        if stop <= sent:
            return
        for start, finish, channel in session.channel_runs(sent, stop):
            prefix = _STDOUT_PREFIX if channel == _STDOUT_CH else _STDERR_PREFIX
            pos = start
            while pos < finish:
                size = min(SERVER_CHUNK_BYTES, finish - pos)
                if views_ok and size >= _COPY_BELOW:
                    views = ring.views_from(pos, size)
                    assert isinstance(views, list)
                    parts.append(_frame_head(size + 1) + prefix)
                    parts.extend(views)
                else:
                    chunk = ring.read_from(pos, size)
                    assert isinstance(chunk, bytes) and len(chunk) == size
                    parts.append(send_binary(chunk, prefix))
                pos += size
        if sent < att.replay_end:
            counters.replayed_bytes += min(stop, att.replay_end) - sent
        counters.bytes_out += stop - sent
        att.sent = stop

    async def _close(self, code: int, reason: str) -> None:
        """Close the link with ``code``; note EXIT delivery when the client answered."""
        ws = self.ws
        # The close handshake reads the peer's CLOSE itself: stop the receiver
        # first, and wait until it has stopped, so that exactly one task reads.
        self._stop_receiver()
        with trio.move_on_after(ws.close_timeout_s):
            await self.wait_until(lambda: self.rx_done)
        await ws.aclose(code, reason)
        att = self.att
        if (att.exit_sent and code == CloseCode.NORMAL
                and ws.conn.close_received is not None):
            self.session.exit_delivered(att)


def _call_quietly(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # noqa: BLE001 - a caller's bookkeeping must not break the link's end
        log.exception("session.attach.on_end_failed %r", callback)
