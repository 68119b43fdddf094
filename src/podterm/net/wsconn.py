"""The trio driver for :mod:`podterm.protocol.websocket`: the only code here that touches a stream.

Shape of the data plane (STYLE.md §5): one ``receive_some`` → one
``FrameReader.feed`` → every complete message of that read handed back in one
list; one write per batch the caller encoded.  No task, channel, lock or event
per message.  A batch may be a list of buffers (frame headers and payload
views, :meth:`WebSocketStream.send_batch`): on a TCP socket it goes out with
``writev`` (scatter-gather, at most :data:`IOV_BATCH` buffers per call), so
payloads are never joined into one copy first; other streams (TLS) get one
joined ``send_all``.

Concurrency contract
--------------------
* **Reading** belongs to one task (the relay's reader) calling
  :meth:`WebSocketStream.receive_batch`.  :meth:`~WebSocketStream.aclose` also
  reads while it waits for the peer's CLOSE; the two take turns through a
  read slot, so an ``aclose`` from another task never races the reader.
* **Writing** may come from several tasks: the relay writer (data), the reader
  (PONG answers, the CLOSE echo), the heartbeat (PING) and ``aclose``.  They
  share a write slot: a flag plus a ParkingLot created on first contention, so
  an uncontended send costs no extra checkpoint (a ``trio.Lock`` would add a
  schedule point per message).  The reader never blocks on the slot for a
  PONG: if a send is in progress it leaves the PONG queued in the connection
  and the writer flushes it right after its own bytes.  Blocking the reader
  behind a writer stuck on a slow peer could deadlock a peer that stops
  reading while it writes.
* A send cancelled part-way may leave half a frame on the wire; after that no
  frame can be sent, so the stream is marked broken: later sends raise
  :class:`ConnectionClosed` (1006) and ``aclose`` just closes the stream.

Error handling
--------------
trio's ``BrokenResourceError``/``ClosedResourceError`` are translated once,
here, into :class:`ConnectionClosed`.  A handshake that fails raises
:class:`~podterm.errors.HandshakeError` after the HTTP answer was sent and the
stream closed.  ``trio.Cancelled`` is never swallowed.
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias
from urllib.parse import urlsplit

import h11
import trio

from podterm.errors import CloseCode, HandshakeError, LocalProtocolError
from podterm.protocol._types import Buffer
from podterm.protocol.frame import OP_CLOSE, OP_PONG
from podterm.protocol.handshake import (
    HeaderLike,
    UpgradeRequest,
    accept_bytes,
    accept_response,
    build_request,
    check_response,
    parse_upgrade,
    reject_response,
)
from podterm.protocol.websocket import (
    DEFAULT_LIMITS,
    ConnectionFailed,
    ConnectionState,
    Message,
    Role,
    WebSocketConnection,
    WsLimits,
)
from podterm.protocol.websocket import Event as WsEvent
from podterm.resilience.heartbeat import DEFAULT_INTERVAL_S, DEFAULT_MAX_MISSED, Heartbeat

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_HANDSHAKE_READ_LIMIT",
    "DEFAULT_READ_SIZE",
    "IOV_BATCH",
    "Batch",
    "ConnectionClosed",
    "UrandomMaskKeys",
    "WebSocketStream",
    "accept_on",
    "client_handshake",
    "connect",
    "heartbeat",
    "reject_on",
    "server_handshake",
]

#: Bytes asked of one ``receive_some``: 64 KiB is the largest a loopback or
#: LAN read returns in one go in practice (trio's own default is the same),
#: and bulk output arrives in reads this size.  The buffer lives only for the
#: read: trio shrinks it to what arrived.
DEFAULT_READ_SIZE = 65536
#: How long ``aclose`` waits for the peer's CLOSE (and, as a client, for the
#: server to drop TCP).  RFC 6455 gives no number; websockets and
#: trio-websocket wait 10 s and 60 s; 5 s keeps a drain short.
DEFAULT_CLOSE_TIMEOUT_S = 5.0
#: Upper bound on a buffered handshake request or response head: h11's own
#: default (16 KiB), enough for a kubeconfig bearer token or a JWT.
DEFAULT_HANDSHAKE_READ_LIMIT = 16 * 1024

_OPEN = ConnectionState.OPEN
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
_CLOSED = ConnectionState.CLOSED
_ABNORMAL = int(CloseCode.ABNORMAL)

_StreamErrors = (trio.BrokenResourceError, trio.ClosedResourceError)

#: Buffers per ``writev`` call: far below Linux's IOV_MAX (1024), and one
#: 256 KiB batch of 32 KiB messages is 16-24 buffers, so one call in practice.
IOV_BATCH = 64

#: What :meth:`WebSocketStream.send_batch` takes: encoded frames as one
#: buffer, or as a list of byte buffers (``bytes``, ``bytearray``, 1-D
#: memoryviews of format ``B``) that are the frames when concatenated.
Batch: TypeAlias = Buffer | list[Buffer]


def _rest(parts: list[Buffer], written: int) -> list[Buffer]:
    """The buffers of ``parts`` after its first ``written`` bytes (views, no copy)."""
    for i, part in enumerate(parts):
        size = len(part)
        if written < size:
            rest: list[Buffer] = [memoryview(part)[written:] if written else part]
            rest.extend(parts[i + 1 :])
            return rest
        written -= size
    return []


def _batch_parts(data: Batch) -> list[Buffer]:
    if type(data) is list:
        return data
    return [data] if data else []  # type: ignore[list-item]


class ConnectionClosed(Exception):
    """The WebSocket connection is over.

    Attributes:
        code: the peer's close code; the code we failed the connection with
            (1002, 1007, 1009) after a protocol violation; our own code when
            we closed first; or 1006 when the stream ended without a CLOSE.
        reason: the matching reason text.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"WebSocket closed with code {self.code}" + (f": {self.reason}" if self.reason else "")


class WebSocketStream:
    """A WebSocket connection driven over a trio stream.

    Args:
        stream: the stream after the HTTP upgrade; this object owns it from now on.
        conn: the protocol state machine (its role decides masking).
        read_size: bytes asked of each ``receive_some``.
        close_timeout_s: bound on the close handshake in :meth:`aclose`.
        initial: bytes that arrived together with the handshake (h11's
            trailing data); they are processed before anything is read.
        subprotocol: the negotiated subprotocol, for the caller's reference.

    Attributes:
        heartbeat: set by :func:`heartbeat`; PONGs received go to it.
    """

    __slots__ = (
        "stream", "conn", "subprotocol", "heartbeat", "close_timeout_s",
        "_read_size", "_initial", "_close_info", "_eof", "_stream_closed",
        "_writing", "_write_lot", "_send_broken", "_reading", "_read_lot", "_pending_out",
        "_drained", "_stashed",
    )

    def __init__(self, stream: trio.abc.Stream, conn: WebSocketConnection, *,
                 read_size: int = DEFAULT_READ_SIZE,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
                 initial: bytes = b"", subprotocol: str | None = None) -> None:
        # A connection read through a prefix (a sibling worker's hand-off, bytes
        # past a PROXY header: clientaddr.PrefixedStream) is its socket stream
        # once the prefix is consumed: the fast paths below apply to it too.
        inner = getattr(stream, "inner", None)
        if type(inner) is trio.SocketStream and getattr(stream, "pending", None) == 0:
            stream = inner
        self.stream = stream
        self.conn = conn
        self.subprotocol = subprotocol
        self.heartbeat: Heartbeat | None = None
        self.close_timeout_s = close_timeout_s
        self._read_size = read_size
        self._initial = initial
        self._close_info: tuple[int, str] | None = None  # set once reading is over
        self._eof = False
        self._stream_closed = False
        # The latest read took less than asked: the socket was empty then.
        self._drained = False
        # Events read by read_nowait() that a reader must handle (and whether
        # they hold control frames): receive_batch takes them first.
        self._stashed: tuple[list[WsEvent], bool] | None = None
        self._writing = False
        self._write_lot: trio.lowlevel.ParkingLot | None = None  # created on first contention
        self._send_broken = False
        # The unwritten rest of a send_nowait(): the next bytes on the wire.
        self._pending_out: list[Buffer] | None = None
        self._reading = False
        self._read_lot: trio.lowlevel.ParkingLot | None = None

    def __repr__(self) -> str:
        return (f"<WebSocketStream {self.conn.role.value} {self.conn.state.name} "
                f"subprotocol={self.subprotocol!r}>")

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection ended, once reading is over; None while it is open."""
        info = self._close_info
        return None if info is None else ConnectionClosed(*info)

    # ------------------------------------------------------------------ reading

    async def receive_batch(self, *, until_idle: bool = False) -> list[Message]:
        """Return every data message completed by the next socket read.

        One call does one ``receive_some`` (more only if a read completed no
        data message, e.g. a lone PING or half a frame).  The list holds
        ``(opcode, payload)`` tuples: ``OP_TEXT`` payloads are validated UTF-8
        bytes, not decoded.  PINGs are answered, PONGs go to the heartbeat.

        ``until_idle``: on a plain socket, return an empty list instead of
        waiting when the socket has nothing to read (:meth:`idle` is then
        True: the caller may hand the socket to an
        :class:`~podterm.net.idle.IdleSockets` and call again once it is
        readable, after :meth:`readable`).

        Raises:
            ConnectionClosed: the peer closed (its CLOSE echoed first), broke
                the protocol (our CLOSE with the code sent first), or the
                stream ended.  Messages that arrived before the CLOSE in the
                same read are returned first; the next call raises.
        """
        conn = self.conn
        while True:
            if self._close_info is not None:
                raise ConnectionClosed(*self._close_info)
            stashed = self._stashed
            if stashed is not None:  # read by read_nowait(): as if read now
                self._stashed = None
                events, saw_control = stashed
            else:
                data = await self._read_some(until_idle)
                if data is None:
                    return []  # nothing to read now (until_idle)
                events = conn.receive_data(data)
                saw_control = conn.saw_control
            if not saw_control:
                if events:
                    return events  # type: ignore[return-value]  # all data messages
                continue
            batch = await self._after_control(events)
            if batch or (until_idle and self._drained):
                return batch  # (empty: a PONG alone, and the socket is empty now)

    async def _read_some(self, until_idle: bool) -> bytes | bytearray | None:
        """The next bytes for :meth:`receive_batch` (b"" at EOF); None: none now (until_idle)."""
        if self._initial:
            data = self._initial
            self._initial = b""
            return data
        while self._reading:  # aclose() is reading the peer's CLOSE
            await self._park_reader()
            if self._close_info is not None:
                raise ConnectionClosed(*self._close_info)
        self._reading = True
        try:
            stream = self.stream
            got: bytes | bytearray | None
            if type(stream) is trio.SocketStream:
                got = await self._recv_socket(stream.socket, wait=not until_idle)
                if got is None:
                    return None
            else:
                got = await stream.receive_some(self._read_size)
        except trio.BrokenResourceError as exc:
            self.conn.receive_data(b"")
            self._close_info = (_ABNORMAL, f"connection lost: {exc.__cause__ or exc}")
            raise ConnectionClosed(*self._close_info) from exc
        except trio.ClosedResourceError as exc:
            # abort() or aclose() closed the stream under this read.
            if self._close_info is None:
                self._close_info = (_ABNORMAL, "stream closed locally")
            raise ConnectionClosed(*self._close_info) from exc
        finally:
            self._release_reader()
        if not got:
            self._eof = True
        return got

    async def _recv_socket(self, sock: trio.socket.SocketType, *, wait: bool = True
                           ) -> bytes | None:
        """``SocketStream.receive_some`` for the reader, without its per-call wrappers.

        The same checkpoints (a cancellation check first, a yield when data was
        there at once) and errors (ClosedResourceError for a closed socket,
        BrokenResourceError for any other failure); the caller holds the
        read slot.  Without ``wait``, None instead of waiting for data.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        size = self._read_size
        if self._drained and not wait:
            return None
        if self._drained:
            # The latest read emptied the socket: a read now would most likely
            # fail (EAGAIN raised and caught, a wasted system call: two per
            # keystroke's round trip).  Wait for data first.
            if sock.fileno() < 0:
                raise trio.ClosedResourceError("this socket was already closed")
            await trio.lowlevel.wait_readable(sock)
            waited = True
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("this socket was already closed")
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                if not wait:
                    self._drained = True
                    return None
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("this socket was already closed") from None
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            self._drained = len(data) < size
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    def idle(self) -> bool:
        """True when nothing is left to read but what the socket will bring.

        A plain socket whose latest read emptied it, nothing read ahead, no
        task reading, the connection open: its reader may leave (see
        ``until_idle`` in :meth:`receive_batch`).
        """
        return (self._drained and type(self.stream) is trio.SocketStream and not self._initial
                and not self._reading and self._close_info is None and not self._eof
                and self._stashed is None)

    def read_nowait(self) -> bool:
        """Read what an :meth:`idle` socket holds now, without waiting: the idle watcher's call.

        True when it needs no reader: it held only PONGs (handed to the
        heartbeat: an idle link's heartbeat costs no task), part of a frame,
        or nothing, and the socket is empty again.  False when a reader must
        run: what was read (data, a PING to answer, a CLOSE, an EOF, an error
        to meet) is kept for its next :meth:`receive_batch`, as if read then.
        """
        stream = self.stream
        if (type(stream) is not trio.SocketStream or self._reading or self._initial
                or self._close_info is not None or self._eof or self._stashed is not None):
            return False
        fd = stream.socket.fileno()
        if fd < 0:
            return False
        try:
            data = os.read(fd, self._read_size)
        except BlockingIOError:
            self._drained = True
            return True  # nothing after all
        except OSError as exc:  # (a reset): as the reader would have met it
            self.conn.receive_data(b"")
            self._close_info = (_ABNORMAL, f"connection lost: {exc}")
            return False
        self._drained = len(data) < self._read_size
        if not data:
            self._eof = True
        conn = self.conn
        events = conn.receive_data(data)
        saw_control = conn.saw_control
        hb = self.heartbeat
        if (data and self._drained and not conn.has_data_to_send and hb is not None
                and all(type(ev) is tuple and ev[0] == OP_PONG for ev in events)):
            now = trio.current_time()
            for ev in events:
                hb.on_pong(ev[1], now)  # type: ignore[index]
            return True
        self._stashed = (events, saw_control)
        return False

    def lost_nowait(self) -> bool:
        """True when all :meth:`read_nowait` met was the connection's end.

        A reset, or an EOF with no CLOSE and nothing before it: the stream is
        then as a reader would leave it (``receive_batch`` raises
        :class:`ConnectionClosed` 1006), and its owner may close it without
        a reader (:meth:`close_nowait`).  False for anything else.
        """
        stashed = self._stashed
        if stashed is None:
            return self._close_info is not None and self._close_info[0] == _ABNORMAL
        events = stashed[0]
        if not self._eof or len(events) != 1 or type(events[0]) is not ConnectionFailed:
            return False
        self._stashed = None
        self._close_info = (events[0].code, events[0].reason)
        return True

    def close_nowait(self) -> None:
        """Close a plain socket stream now, from synchronous code: for a lost connection.

        Nothing is sent (nobody is left to read it).  The same end as
        :meth:`abort` for a stream whose peer is gone, without its wait.
        """
        if self._stream_closed:
            return
        if self._close_info is None:
            self._close_info = (_ABNORMAL, "stream closed locally")
        self._stream_closed = True
        stream = self.stream
        assert type(stream) is trio.SocketStream
        stream.socket.close()  # (trio's close tells its waiters first)

    def take_stashed(self) -> list[Message] | None:
        """Take the data messages :meth:`read_nowait` kept, to apply them now.

        None (nothing taken) when nothing was kept, or when what was kept
        needs a reader: a control frame (a PING to answer, a CLOSE), an EOF
        or a violation; :meth:`receive_batch` then takes it as before.
        """
        stashed = self._stashed
        if stashed is None or stashed[1]:
            return None
        self._stashed = None
        return stashed[0]  # type: ignore[return-value]  # data messages only

    async def wait_readable(self) -> None:
        """Wait until the plain socket of an :meth:`idle` stream has bytes (or an EOF).

        Holds the read slot while it waits, as a read does.
        """
        while self._reading:  # aclose() is reading the peer's CLOSE
            await self._park_reader()
        stream = self.stream
        assert type(stream) is trio.SocketStream
        self._reading = True
        try:
            await trio.lowlevel.wait_readable(stream.socket)
        finally:
            self._release_reader()

    def socket_fd(self) -> int:
        """The plain socket's descriptor (-1 for any other stream, or once closed)."""
        stream = self.stream
        return stream.socket.fileno() if type(stream) is trio.SocketStream else -1

    def readable(self) -> None:
        """The socket has data (an idle watcher said so): the next read tries it first."""
        self._drained = False

    async def _after_control(self, events: list) -> list[Message]:  # type: ignore[type-arg]
        """Slow path of a read that held control frames, a CLOSE or a failure."""
        conn = self.conn
        batch: list[Message] = []
        info: tuple[int, str] | None = None
        hb = self.heartbeat
        for ev in events:
            if type(ev) is tuple:
                if ev[0] < OP_CLOSE:
                    batch.append(ev)
                elif ev[0] == OP_PONG and hb is not None:
                    hb.on_pong(ev[1], trio.current_time())
            else:  # CloseReceived or ConnectionFailed
                info = (ev.code, ev.reason)
        if info is not None:
            self._close_info = info
            if conn.has_data_to_send and not self._send_broken:
                # The CLOSE echo, or the CLOSE that fails the connection: send
                # it now, so the peer hears the code even if the owner never
                # calls aclose().  Bounded: the peer may not be reading.
                with trio.move_on_after(self.close_timeout_s):
                    try:
                        await self._acquire_writer()
                        try:
                            await self._send_locked(b"")
                        finally:
                            self._release_writer()
                    except ConnectionClosed:
                        pass
            if batch:
                return batch
            raise ConnectionClosed(*info)
        if conn.has_data_to_send and not self._writing and not self._send_broken:
            # PONGs.  If a send is in progress its writer flushes them instead.
            self._writing = True
            try:
                await self._send_locked(b"")
            except ConnectionClosed as exc:
                self._close_info = (exc.code, exc.reason)
                raise
            finally:
                self._release_writer()
        return batch

    async def _park_reader(self) -> None:
        if self._read_lot is None:
            self._read_lot = trio.lowlevel.ParkingLot()
        await self._read_lot.park()

    # ------------------------------------------------------------------ writing

    async def _acquire_writer(self) -> None:
        while self._writing:
            if self._write_lot is None:
                self._write_lot = trio.lowlevel.ParkingLot()
            await self._write_lot.park()
        self._writing = True

    def _release_reader(self) -> None:
        self._reading = False
        if self._read_lot:
            self._read_lot.unpark()

    def _release_writer(self) -> None:
        self._writing = False
        if self._write_lot:
            self._write_lot.unpark()

    def _send_refused(self) -> ConnectionClosed:
        if self._close_info is not None:
            return ConnectionClosed(*self._close_info)
        if self._send_broken:
            return ConnectionClosed(_ABNORMAL, "a send was interrupted mid-frame")
        sent = self.conn.close_sent
        if sent is not None:
            return ConnectionClosed(*sent)
        return ConnectionClosed(_ABNORMAL, f"connection is {self.conn.state.name}")

    async def _send_locked(self, data: Batch) -> None:
        """Write the rest of a :meth:`send_nowait`, ``data``, then any queued automatic
        replies; the caller holds the write slot."""
        if self._send_broken:
            raise self._send_refused()
        stream = self.stream
        conn = self.conn
        # Cancelled here, nothing was written and the stream stays usable.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            parts = _batch_parts(data)
            pending = self._pending_out
            if pending is not None:
                self._pending_out = None
                parts = pending + parts
            if parts:
                if type(stream) is trio.SocketStream:
                    await self._writev_all(stream.socket, parts)
                else:
                    await stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
            while conn.has_data_to_send:  # PONGs the reader queued while we wrote
                await stream.send_all(conn.data_to_send())
        except _StreamErrors as exc:
            self._send_broken = True
            raise ConnectionClosed(_ABNORMAL, f"connection lost while sending: {exc}") from exc
        except BaseException:
            # Cancelled mid-send_all: part of a frame may be on the wire, and
            # any later frame would be read as its continuation.
            self._send_broken = True
            raise

    @staticmethod
    async def _writev_all(sock: trio.socket.SocketType, parts: list[Buffer]) -> None:
        """``SocketStream.send_all`` for a list of buffers: ``writev`` until all is written.

        The same errors (ClosedResourceError for a closed or shut-down socket,
        BrokenResourceError for any other failure); the caller holds the write
        slot and has checked for cancellation.
        """
        while parts:
            fd = sock.fileno()
            if fd < 0 or sock.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("this socket was already closed")
            try:
                if len(parts) == 1:
                    written = os.write(fd, parts[0])
                else:
                    written = os.writev(fd, parts[:IOV_BATCH])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("this socket was already closed") from None
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            parts = _rest(parts, written)

    async def send_binary(self, payload: bytes | bytearray | memoryview,
                          prefix: bytes = b"") -> None:
        """Send one binary message whose payload is ``prefix + payload``.

        Raises:
            ConnectionClosed: a CLOSE was sent or received, or the stream broke.
        """
        if self._writing:
            await self._acquire_writer()
        else:
            self._writing = True
        try:
            if self.conn.state is not _OPEN:
                raise self._send_refused()
            await self._send_locked(self.conn.send_binary(payload, prefix))
        finally:
            self._release_writer()

    async def send_text(self, text: str) -> None:
        """Send one text message.

        Raises:
            ConnectionClosed: a CLOSE was sent or received, or the stream broke.
        """
        await self._acquire_writer()
        try:
            if self.conn.state is not _OPEN:
                raise self._send_refused()
            await self._send_locked(self.conn.send_text(text))
        finally:
            self._release_writer()

    async def send_raw(self, data: bytes) -> None:
        """Send frames the caller encoded, in one write.

        Lets a relay coalesce many messages:
        ``b"".join(ws.conn.send_binary(p, prefix) for p in batch)``.  Build
        them with ``ws.conn.send_*`` (or ``encode_message`` with the role's
        masking: a client must mask every frame).

        Raises:
            ConnectionClosed: a CLOSE was sent or received, or the stream broke.
        """
        if self._writing:
            await self._acquire_writer()
        else:
            self._writing = True
        try:
            if self.conn.state is not _OPEN:
                raise self._send_refused()
            await self._send_locked(data)
        finally:
            self._release_writer()

    async def send_batch(self, data: Batch, stall_s: float) -> bool:
        """Send frames the caller encoded, in one write, giving up after ``stall_s``.

        The relay's hot path.  A TCP stream that takes all of ``data`` at
        once is written directly (one ``write``, or one ``writev`` of a list
        of buffers, on its socket; no checkpoint, no timer); only a write the
        kernel cannot take whole waits, for at most ``stall_s`` seconds.
        The buffers of a list must not change until this returns.

        Returns:
            True once everything was written; False if the write did not
            complete in ``stall_s`` (the peer stopped reading): the stream is
            then broken, as after any interrupted send.

        Raises:
            ConnectionClosed: a CLOSE was sent or received, or the stream broke.
        """
        if self._writing:
            await self._acquire_writer()
        else:
            self._writing = True
        try:
            if self.conn.state is not _OPEN or self._send_broken:
                raise self._send_refused()
            parts = self._pending_first(data)
            written, total = self._write_nowait(parts)
            if written == total and not self.conn.has_data_to_send:
                self._pending_out = None
                return True
            # Kept as pending while this waits: a cancellation before the
            # next write leaves the stream whole, the rest still queued.
            self._pending_out = _rest(parts, written) if written < total else None
            with trio.move_on_after(stall_s) as stalled:
                await self._send_locked([])
            return not stalled.cancelled_caught
        finally:
            self._release_writer()

    @property
    def has_pending_out(self) -> bool:
        """True while part of a :meth:`send_nowait` waits for the next send."""
        return self._pending_out is not None

    def can_send_nowait(self) -> bool:
        """Whether :meth:`send_nowait` would take data now (nobody writing, OPEN, TCP)."""
        return (not self._writing and not self._send_broken
                and self.conn.state is _OPEN and not self.conn.has_data_to_send
                and type(self.stream) is trio.SocketStream)

    def send_nowait(self, data: Batch) -> bool:
        """Write frames the caller encoded from a synchronous context; no waiting.

        Only when :meth:`can_send_nowait` says so.  What the socket does not
        take now is kept (as views of ``data``: its buffers must not change)
        and goes out first with the next send (:meth:`send_batch`, a PONG,
        the CLOSE), so the frames on the wire stay whole and in order; the
        caller must then make sure a send follows (the relay wakes its sender).

        Returns:
            True if every byte was written, False if some wait for the next send.
        """
        if not self.can_send_nowait():
            raise LocalProtocolError("send_nowait() while the stream cannot take it")
        parts = self._pending_first(data)
        written, total = self._write_nowait(parts)
        if written == total:
            self._pending_out = None
            return True
        self._pending_out = _rest(parts, written)
        return False

    def _pending_first(self, data: Batch) -> list[Buffer]:
        """``data``'s buffers behind what waits to go first (a deferred 101, the rest
        of a partial nowait write): the frames on the wire stay whole and in order."""
        parts = _batch_parts(data)
        pending = self._pending_out
        return parts if pending is None else pending + parts

    def _write_nowait(self, parts: list[Buffer]) -> tuple[int, int]:
        """Write what a plain TCP socket takes now: ``(bytes written, bytes in parts)``.

        0 written when the socket takes nothing or the stream is not a plain
        socket.  Errors are left to the waiting path (:meth:`_send_locked`
        raises them, translated), so they are reported in one place.  The
        caller holds the write slot, so no other task writes the socket
        meanwhile.
        """
        total = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        stream = self.stream
        if type(stream) is not trio.SocketStream or not total:
            return 0, total  # TLS and test streams: the waiting path
        sock = stream.socket
        fd = sock.fileno()
        if fd < 0 or sock.did_shutdown_SHUT_WR:
            return 0, total
        # OSError: EAGAIN (full), or a broken connection the waiting path reports.
        if len(parts) == 1:
            try:
                return os.write(fd, parts[0]), total
            except OSError:
                return 0, total
        written = 0
        for i in range(0, len(parts), IOV_BATCH):
            group = parts[i : i + IOV_BATCH]
            try:
                done = os.writev(fd, group)
            except OSError:
                break
            written += done
            if done < (total if len(parts) <= IOV_BATCH else sum(map(len, group))):
                break
        return written, total

    async def ping(self, payload: bytes = b"") -> None:
        """Send a PING (at most 125 bytes).  Its PONG reaches :attr:`heartbeat`.

        Raises:
            ConnectionClosed: the peer's CLOSE arrived, or the stream broke.
        """
        await self._acquire_writer()
        try:
            try:
                frame = self.conn.send_ping(payload)
            except LocalProtocolError:
                if len(payload) > 125:
                    raise
                raise self._send_refused() from None
            await self._send_locked(frame)
        finally:
            self._release_writer()

    # ------------------------------------------------------------------ closing

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the WebSocket, then the stream.  Idempotent.

        Sends CLOSE(``code``, ``reason``) unless one was already exchanged,
        waits for the peer's CLOSE and, in the client role, for the server to
        drop TCP first (RFC 6455 §7.1.1).  All waiting is bounded by
        ``close_timeout_s`` and shielded, so this works inside a cancelled
        scope (cleanup after cancellation).

        Raises:
            LocalProtocolError: ``code`` may not be sent (1005, 1006, 1015 or
                out of range); the stream is closed anyway.
        """
        if self._stream_closed:
            return
        try:
            with trio.move_on_after(self.close_timeout_s, shield=True):
                await self._close_handshake(code, reason)
        finally:
            self._stream_closed = True
            if self._close_info is None:
                self._close_info = self.conn.close_sent or (int(code), reason)
            await self.stream.aclose()

    async def _close_handshake(self, code: int, reason: str) -> None:
        conn = self.conn
        if self._send_broken:
            return
        try:
            if conn.state is _OPEN or conn.has_data_to_send or self._pending_out is not None:
                await self._acquire_writer()
                try:
                    frame = conn.send_close(code, reason) if conn.state is _OPEN else b""
                    await self._send_locked(frame)
                finally:
                    self._release_writer()
            if self._eof:
                return
            while conn.state is _LOCAL_CLOSING and not self._eof:
                await self._read_for_close()
            if conn.role is Role.CLIENT:
                # §7.1.1: the client waits for the server to drop TCP first.
                while not self._eof:
                    await self._read_for_close()
            elif conn.close_received is None:
                # We failed the connection: the peer may still be sending.
                # Closing a socket with unread data makes the kernel send
                # RST, which can destroy our CLOSE before the peer reads it.
                # So: FIN first, then drain until its EOF (a lingering close,
                # bounded by the caller's close timeout).
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
                while not self._eof:
                    await self._read_for_close()
        except (ConnectionClosed, *_StreamErrors):
            pass

    async def _read_for_close(self) -> None:
        """One read during the close handshake; what it brings is discarded."""
        if self._reading:
            # The reader task is mid-read: let it finish, then return so the
            # caller re-checks its condition.  That read may well have been the
            # peer's CLOSE or EOF; reading again would stall until the timeout.
            while self._reading:
                await self._park_reader()
            return
        if self._eof:
            return
        self._reading = True
        try:
            data = await self.stream.receive_some(self._read_size)
        finally:
            self._release_reader()
        if not data:
            self._eof = True
        for ev in self.conn.receive_data(data):
            if type(ev) is not tuple and self._close_info is None:
                self._close_info = (ev.code, ev.reason)  # type: ignore[union-attr]

    async def abort(self, code: int = CloseCode.INTERNAL_ERROR, reason: str = "") -> None:
        """Close without waiting for the peer: for a dead or misbehaving link.

        Sends CLOSE(``code``) if the write slot is free (bounded to a second),
        then closes the stream; a task blocked in :meth:`receive_batch` gets
        :class:`ConnectionClosed` with this code and reason.
        """
        if self._stream_closed:
            return
        if self._close_info is None:
            self._close_info = (int(code), reason)
        try:
            conn = self.conn
            if conn.state is _OPEN and not self._writing and not self._send_broken:
                with trio.move_on_after(min(1.0, self.close_timeout_s), shield=True):
                    self._writing = True
                    try:
                        await self._send_locked(conn.send_close(code, reason))
                    except ConnectionClosed:
                        pass
                    finally:
                        self._release_writer()
        finally:
            self._stream_closed = True
            await trio.aclose_forcefully(self.stream)


# ------------------------------------------------------------------ heartbeat


async def heartbeat(ws: WebSocketStream, interval_s: float = DEFAULT_INTERVAL_S, *,
                    max_missed: int = DEFAULT_MAX_MISSED,
                    task_status: trio.TaskStatus[Heartbeat] = trio.TASK_STATUS_IGNORED) -> None:
    """PING ``ws`` every ``interval_s``; abort it (1011) after ``max_missed`` unanswered.

    Run it beside the task that calls ``ws.receive_batch()``: PONGs are seen
    only by a reader.  ``nursery.start(heartbeat, ws)`` returns the
    :class:`Heartbeat` (for its ``rtt_s`` and ``missed``).  Returns when the
    link is dead (after aborting it) or closed; cancel it to stop earlier.
    """
    hb = Heartbeat(interval_s, max_missed=max_missed, now=trio.current_time())
    ws.heartbeat = hb
    task_status.started(hb)
    try:
        while True:
            await trio.sleep_until(hb.deadline)
            payload = hb.poll(trio.current_time())
            if hb.is_dead:
                await ws.abort(CloseCode.INTERNAL_ERROR,
                               f"no pong to {max_missed} pings sent {interval_s:g} s apart")
                return
            if payload is not None:
                # A PING stuck behind a writer that cannot write counts as
                # unanswered: the next poll() sees it and the schedule holds.
                with trio.move_on_after(interval_s):
                    try:
                        await ws.ping(payload)
                    except ConnectionClosed:
                        return
    finally:
        if ws.heartbeat is hb:
            ws.heartbeat = None


# ------------------------------------------------------------------ handshakes


async def _next_event(stream: trio.abc.Stream, h: h11.Connection,
                      read_size: int) -> object:
    """Next h11 event, reading as needed.  Raises h11.RemoteProtocolError, trio stream errors."""
    while True:
        ev = h.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        h.receive_data(bytes(await stream.receive_some(read_size)))


async def reject_on(stream: trio.abc.Stream, h11conn: h11.Connection, err: HandshakeError, *,
                    body: bytes | None = None,
                    content_type: str = "text/plain; charset=utf-8") -> None:
    """Answer a refused upgrade with ``err.http_status`` (and its headers), then close the stream.

    Send errors are ignored: the peer may already be gone.
    """
    response, payload = reject_response(err, body=body, content_type=content_type)
    try:
        data = (h11conn.send(response) or b"") + (h11conn.send(h11.Data(data=payload)) or b"") \
            + (h11conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError:
        # h11 refuses (e.g. a response was already started); write it by hand.
        head = b"HTTP/1.1 %d %s\r\n" % (err.http_status, response.reason)
        for name, value in response.headers.raw_items():
            head += name + b": " + value + b"\r\n"
        data = head + b"\r\n" + payload
    try:
        await stream.send_all(data)
    except _StreamErrors:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def server_handshake(
    stream: trio.abc.Stream, *,
    select_subprotocol: Callable[[list[str]], str | None],
    read_limit: int = DEFAULT_HANDSHAKE_READ_LIMIT,
    origin_ok: Callable[[str | None], bool] | None = None,
    limits: WsLimits = DEFAULT_LIMITS,
    extra_headers: Iterable[HeaderLike] = (),
    read_size: int = DEFAULT_READ_SIZE,
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
) -> tuple[WebSocketStream, UpgradeRequest]:
    """Read an upgrade request with h11 and accept it (server side).

    The caller bounds the whole handshake: ``with trio.fail_after(t): ...``.

    Args:
        stream: a freshly accepted stream.
        select_subprotocol: given the offered subprotocols in order, returns
            the one to echo or None; may raise HandshakeError to refuse (for
            example 400 when nothing offered is supported).
        read_limit: bound on the buffered request head (431 beyond).
        origin_ok: Origin check, see :func:`~podterm.protocol.handshake.parse_upgrade`.
        limits: frame and message bounds for the connection.
        extra_headers: added to the 101 response.

    Returns:
        The open :class:`WebSocketStream` (it owns ``stream``) and the request.

    Raises:
        HandshakeError: the request was refused; the HTTP answer
            (400/403/426/431...) was sent and ``stream`` is closed.  A peer
            that disconnects mid-request also ends here (``stream`` closed).
        Anything else (``trio.Cancelled`` included) leaves ``stream`` to the caller.
    """
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=read_limit)
    try:
        try:
            ev = await _next_event(stream, h, read_size)
        except h11.RemoteProtocolError as exc:
            raise HandshakeError(f"malformed HTTP request: {exc}", exc.error_status_hint) from exc
        if not isinstance(ev, h11.Request):
            raise HandshakeError("connection closed before a complete request arrived", 400)
        upgrade = parse_upgrade(ev, origin_ok=origin_ok)
        subprotocol = select_subprotocol(list(upgrade.subprotocols))
    except HandshakeError as err:
        await reject_on(stream, h, err)
        raise
    except _StreamErrors as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeError("connection lost during the handshake", 400) from exc
    ws = await accept_on(stream, h, upgrade, subprotocol, extra_headers=extra_headers,
                         limits=limits, read_size=read_size, close_timeout_s=close_timeout_s)
    return ws, upgrade


async def accept_on(
    stream: trio.abc.Stream, h11conn: h11.Connection | None,
    request: h11.Request | UpgradeRequest, subprotocol: str | None, *,
    extra_headers: Iterable[HeaderLike] = (),
    limits: WsLimits = DEFAULT_LIMITS,
    read_size: int = DEFAULT_READ_SIZE,
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    trailing: bytes = b"",
) -> WebSocketStream:
    """Accept an upgrade whose request the caller already read with ``h11conn``.

    For the gateway's router: it parses the request itself, routes,
    authenticates, picks the subprotocol, then calls this.  Passing the
    ``UpgradeRequest`` from its own :func:`parse_upgrade` call avoids parsing
    twice; an ``h11.Request`` is parsed here (without an Origin check).

    ``h11conn`` None: the caller read the head itself and it announced no
    body (``podterm.gateway.http.Exchange.take_over``); ``request`` must be
    the ``UpgradeRequest`` and ``trailing`` holds the bytes that followed the
    head.  The ``101`` is then written as bytes (:func:`accept_bytes`), in one
    ``write`` when the socket takes it whole.

    Bytes the client sent after the request (a first frame, pipelined) are
    kept and processed by the first :meth:`WebSocketStream.receive_batch`.

    Raises:
        HandshakeError: the request is not a valid upgrade, or carries a
            body; answered and ``stream`` closed, as in :func:`server_handshake`.
        LocalProtocolError: ``subprotocol`` was not offered or is a bearer token.
    """
    if h11conn is None:
        if not isinstance(request, UpgradeRequest):
            raise TypeError("accept_on without an h11 connection needs the UpgradeRequest")
        data = accept_bytes(request, subprotocol, [
            (n if isinstance(n, str) else n.decode("latin-1"),
             v if isinstance(v, str) else v.decode("latin-1")) for n, v in extra_headers])
        ws = WebSocketStream(stream, WebSocketConnection(Role.SERVER, limits=limits),
                             read_size=read_size, close_timeout_s=close_timeout_s,
                             initial=trailing, subprotocol=subprotocol)
        if type(stream) is trio.SocketStream:
            # The 101 rides with the first frames the caller sends (the
            # hello): one write instead of two.  The caller must send next.
            ws._pending_out = [data]
            # The head was read to its end and nothing followed it: the
            # client waits for the 101, so the socket is taken to be empty
            # (a first read would most likely fail with EAGAIN).  Only a
            # hint: a reader then waits for data before reading, and an idle
            # watcher is told at once if bytes are there after all.
            ws._drained = not trailing
            return ws
        try:
            await stream.send_all(data)
        except _StreamErrors as exc:
            await trio.aclose_forcefully(stream)
            raise HandshakeError("connection lost during the handshake", 400) from exc
        return ws
    try:
        upgrade = request if isinstance(request, UpgradeRequest) else parse_upgrade(request)
        # h11 yields EndOfMessage for the (empty) body of the GET, then
        # PAUSED: it knows a 101 may follow.  A body has no place here.
        while True:
            try:
                ev = await _next_event(stream, h11conn, read_size)
            except h11.RemoteProtocolError as exc:
                raise HandshakeError(f"malformed HTTP request: {exc}",
                                     exc.error_status_hint) from exc
            if ev is h11.PAUSED:
                break
            if not isinstance(ev, h11.EndOfMessage):
                raise HandshakeError("a WebSocket upgrade request must not have a body", 400)
    except HandshakeError as err:
        await reject_on(stream, h11conn, err)
        raise
    except _StreamErrors as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeError("connection lost during the handshake", 400) from exc
    response = accept_response(upgrade, subprotocol, extra_headers)
    data = h11conn.send(response) or b""
    try:
        await stream.send_all(data)
    except _StreamErrors as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeError("connection lost during the handshake", 400) from exc
    trailing, _ = h11conn.trailing_data
    conn = WebSocketConnection(Role.SERVER, limits=limits)
    return WebSocketStream(stream, conn, read_size=read_size, close_timeout_s=close_timeout_s,
                           initial=trailing, subprotocol=subprotocol)


class UrandomMaskKeys:
    """Masking keys from ``os.urandom``, drawn 4 KiB (1,024 keys) at a time.

    RFC 6455 §5.3: masking keys must come from "a strong source of
    entropy"; they still do, without a ``getrandom`` system call per frame
    (two per keystroke through an agent's tunnel).  One per connection: the
    keys are never shared, and the 4 KiB exist only once it sends.
    """

    __slots__ = ("_buf", "_pos")

    DRAW = 4096

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def __call__(self) -> bytes:
        pos = self._pos
        if pos >= len(self._buf):
            self._buf = os.urandom(self.DRAW)
            pos = 0
        self._pos = pos + 4
        return self._buf[pos:pos + 4]


async def client_handshake(
    stream: trio.abc.Stream, host: str, target: str,
    subprotocols: Sequence[str] = (), extra_headers: Iterable[HeaderLike] = (),
    mask_key_source: Callable[[], bytes] | None = None, *,
    limits: WsLimits = DEFAULT_LIMITS,
    read_limit: int = DEFAULT_HANDSHAKE_READ_LIMIT,
    read_size: int = DEFAULT_READ_SIZE,
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
) -> tuple[WebSocketStream, str | None]:
    """Upgrade ``stream`` as a client; return the WebSocket and the chosen subprotocol.

    Args:
        host: the ``Host`` header value (``host`` or ``host:port``).
        target: path and query.
        subprotocols: offered, in order of preference.
        extra_headers: e.g. ``("Authorization", "Bearer ...")``.
        mask_key_source: 4 fresh bytes per frame; ``os.urandom`` by default.

    Raises:
        HandshakeError: the server refused (``http_status`` is its status and
            the message quotes the start of its body) or answered wrongly.
            ``stream`` is left open: the caller owns it until this returns.
    """
    nonce = os.urandom(16)
    h = h11.Connection(h11.CLIENT, max_incomplete_event_size=read_limit)
    request = build_request(host, target, subprotocols=subprotocols,
                            extra_headers=extra_headers, key=nonce)
    try:
        await stream.send_all((h.send(request) or b"") + (h.send(h11.EndOfMessage()) or b""))
        while True:
            ev = await _next_event(stream, h, read_size)
            if isinstance(ev, h11.InformationalResponse) and ev.status_code != 101:
                continue  # 100 Continue and friends: not the answer
            break
        if isinstance(ev, h11.Response):
            body = bytearray()
            while len(body) < 1024:
                more = await _next_event(stream, h, read_size)
                if not isinstance(more, h11.Data):
                    break
                body += more.data
            text = bytes(body[:500]).decode("utf-8", "replace").strip()
            raise HandshakeError(f"server refused the upgrade with HTTP {ev.status_code}"
                                 + (f": {text}" if text else ""), ev.status_code)
        if not isinstance(ev, h11.InformationalResponse):
            raise HandshakeError("server closed the connection during the handshake", 502)
    except h11.RemoteProtocolError as exc:
        raise HandshakeError(f"malformed HTTP response: {exc}", 502) from exc
    except _StreamErrors as exc:
        raise HandshakeError("connection lost during the handshake", 502) from exc
    chosen = check_response(ev, nonce, subprotocols)
    trailing, _ = h.trailing_data
    conn = WebSocketConnection(Role.CLIENT, limits=limits,
                               mask_key_source=mask_key_source or UrandomMaskKeys())
    ws = WebSocketStream(stream, conn, read_size=read_size, close_timeout_s=close_timeout_s,
                         initial=trailing, subprotocol=chosen)
    return ws, chosen


async def connect(
    url: str, *, subprotocols: Sequence[str] = (), headers: Iterable[HeaderLike] = (),
    ssl_context: ssl.SSLContext | None = None, limits: WsLimits = DEFAULT_LIMITS,
    mask_key_source: Callable[[], bytes] | None = None,
) -> tuple[WebSocketStream, str | None]:
    """Open TCP (``ws://``) or TLS (``wss://``) to ``url`` and upgrade.

    ``ssl_context`` defaults to :func:`ssl.create_default_context` for
    ``wss://``.  The caller bounds connect + handshake with ``fail_after``.

    Raises:
        ValueError: not a ws:// or wss:// URL.
        OSError: the TCP connection failed (from ``trio.open_tcp_stream``).
        HandshakeError: as :func:`client_handshake`; the stream is closed.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    hostname = parts.hostname
    host_header = f"[{hostname}]" if ":" in hostname else hostname
    if parts.port is not None and parts.port != (443 if secure else 80):
        host_header += f":{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream: trio.abc.Stream
    if secure:
        # https_compatible: HTTP servers commonly end TLS without close_notify.
        stream = await trio.open_ssl_over_tcp_stream(
            hostname, port, ssl_context=ssl_context or ssl.create_default_context(),
            https_compatible=True)
    else:
        stream = await trio.open_tcp_stream(hostname, port)
    try:
        return await client_handshake(stream, host_header, target, subprotocols, headers,
                                      mask_key_source, limits=limits)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
