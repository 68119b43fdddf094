"""RFC 6455 connection state, both roles, over the frame codec (sans-IO).

:class:`WebSocketConnection` turns received bytes into events and API calls
into bytes.  It never touches a socket, a clock or a random source: the client
role's mask keys come from a callable the caller supplies, and the driver
(``podterm.net.wsconn``) does every read and write.

States and legal moves
----------------------
The whole state machine; a reviewer can check it against RFC 6455 §5.5.1 and
§7.  "queued" means bytes appended to what :meth:`data_to_send` returns.

==============  =======================  ===============  ===============  ==================
state           peer CLOSE received      send_close()     data_to_send()   violation / EOF
==============  =======================  ===============  ===============  ==================
OPEN            echo queued →            LOCAL_CLOSING    —                CLOSED
                REMOTE_CLOSING
LOCAL_CLOSING   → CLOSED                 error            —                CLOSED
REMOTE_CLOSING  (nothing more is read)   error            → CLOSED         stays (EOF is normal)
CLOSED          (nothing more is read)   error            —                —
==============  =======================  ===============  ===============  ==================

What may be sent in each state:

* data (``send_binary``, ``send_text``): OPEN only.  After our CLOSE "the
  endpoint MUST NOT send any more data frames" (§5.5.1); after the peer's CLOSE
  our echo is queued, so the same rule applies.
* PING / PONG: OPEN and LOCAL_CLOSING.  A PING received in LOCAL_CLOSING is
  still answered (§5.5.2: a Pong is due "unless it already received a Close").
* CLOSE: OPEN only (exactly one CLOSE per direction).

Received bytes are processed in OPEN and LOCAL_CLOSING.  Once the peer's CLOSE
has arrived (or the connection failed) every later byte is ignored: §5.5.1 says
nothing may follow a CLOSE, so whatever does is not ours to interpret.

Events
------
:meth:`WebSocketConnection.receive_data` returns a list, in wire order, of:

* ``(opcode, payload)`` tuples, exactly as the frame reader produced them:
  ``(OP_TEXT, bytes)`` (validated UTF-8, not decoded), ``(OP_BINARY, bytes)``,
  ``(OP_PING, bytes)`` (the PONG is already queued) and ``(OP_PONG, bytes)``.
  Data messages are passed through without wrapping: this is the hot path, and
  one object per message is what it must not cost;
* :class:`CloseReceived` — the peer's CLOSE (its echo is queued, or it
  answered ours);
* :class:`ConnectionFailed` — the peer broke the protocol (a CLOSE with the
  violation's code is queued) or the TCP stream ended without a CLOSE
  (code 1006, nothing queued).

Tell them apart with ``type(event) is tuple``; :attr:`saw_control` says
whether the last call returned anything but data messages, so a driver needs
no second pass over a batch of pure data.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
from podterm.protocol._types import Buffer
from podterm.protocol.codec import FrameReader, encode_frame, encode_message
from podterm.protocol.frame import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_close_payload,
    is_valid_close_code,
    parse_close_payload,
)

__all__ = [
    "DEFAULT_LIMITS",
    "CloseReceived",
    "ConnectionFailed",
    "ConnectionState",
    "Event",
    "Message",
    "Role",
    "WebSocketConnection",
    "WsLimits",
]


class Role(enum.Enum):
    """Which end of the connection we are; decides masking (RFC 6455 §5.1)."""

    CLIENT = "client"  # masks every frame it sends; rejects masked frames
    SERVER = "server"  # never masks; rejects unmasked frames


class ConnectionState(enum.Enum):
    """Close-handshake progress; see the table in the module docstring."""

    OPEN = "open"
    LOCAL_CLOSING = "local-closing"  # we sent CLOSE, the peer's has not arrived
    REMOTE_CLOSING = "remote-closing"  # the peer's CLOSE arrived, our echo is queued
    CLOSED = "closed"  # both CLOSEs exchanged, or the connection failed


@dataclass(frozen=True, slots=True)
class WsLimits:
    """Bounds on what a peer may make us buffer.

    Attributes:
        max_frame_bytes: largest frame payload accepted (close 1009 beyond).
        max_message_bytes: largest reassembled message (close 1009 beyond).

    Both default to 1 MiB: the bound the k8s exec spec suggests (kubectl sends
    at most 32 KiB + 1 byte per message; podterm.v1 messages are far smaller),
    and hypercorn's default ``websocket_max_message_size`` is the same order.
    RFC 6455 allows 2**63 - 1; no terminal needs more than this.
    """

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        # A control frame may carry 125 bytes (§5.5); a smaller limit would
        # reject legal pings and closes.
        if self.max_frame_bytes < MAX_CONTROL_PAYLOAD:
            raise ValueError(f"max_frame_bytes={self.max_frame_bytes}: must be >= 125")
        if self.max_message_bytes < MAX_CONTROL_PAYLOAD:
            raise ValueError(f"max_message_bytes={self.max_message_bytes}: must be >= 125")


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer sent CLOSE.  ``code`` is 1005 when its frame carried none (§7.1.5)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The connection ended without a clean close.

    ``code`` is the close code we queued for a protocol violation (1002, 1007,
    1009), or 1006 when the stream ended without a CLOSE (nothing is queued
    then: there is no one left to send it to).
    """

    code: int
    reason: str


#: The limits every connection gets unless told otherwise (1 MiB each).
DEFAULT_LIMITS = WsLimits()

Message: TypeAlias = tuple[int, bytes]
Event: TypeAlias = Message | CloseReceived | ConnectionFailed

_OPEN = ConnectionState.OPEN
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
_CLOSED = ConnectionState.CLOSED

_EOF_REASON = "connection closed without a close frame"


class WebSocketConnection:
    """One WebSocket connection's protocol state, either role.

    Args:
        role: :attr:`Role.CLIENT` or :attr:`Role.SERVER`.
        limits: frame and message size bounds for what we receive.
        mask_key_source: client role only, and required there: returns 4
            unpredictable bytes per frame (RFC 6455 §5.3 wants a fresh key
            from "a strong source of entropy"; the driver passes
            ``lambda: os.urandom(4)``, tests a deterministic one).

    Raises:
        ValueError: a client without a mask key source, or a server with one.
    """

    __slots__ = (
        "role", "limits", "state", "saw_control", "close_sent", "close_received",
        "_mask_key_source", "_feed", "_out", "_reading",
    )

    def __init__(self, role: Role, *, limits: WsLimits = DEFAULT_LIMITS,
                 mask_key_source: Callable[[], bytes] | None = None) -> None:
        if role is Role.CLIENT and mask_key_source is None:
            raise ValueError("the client role needs a mask_key_source (RFC 6455 §5.3)")
        if role is Role.SERVER and mask_key_source is not None:
            raise ValueError("the server role never masks; pass no mask_key_source")
        self.role = role
        self.limits = limits
        self.state = _OPEN
        #: True when the last :meth:`receive_data` returned anything besides data messages.
        self.saw_control = False
        #: ``(code, reason)`` of the CLOSE we sent or queued, once we have.
        self.close_sent: tuple[int, str] | None = None
        #: ``(code, reason)`` of the peer's CLOSE, once it arrived.
        self.close_received: tuple[int, str] | None = None
        self._mask_key_source = mask_key_source
        reader = FrameReader(is_server=role is Role.SERVER,
                             max_frame_bytes=limits.max_frame_bytes,
                             max_message_bytes=limits.max_message_bytes)
        self._feed = reader.feed
        self._out = bytearray()  # automatic replies: PONGs, the CLOSE echo
        self._reading = True  # False once the peer's CLOSE, a violation or EOF was seen

    def __repr__(self) -> str:
        return (f"<WebSocketConnection {self.role.value} {self.state.name} "
                f"queued={len(self._out)}>")

    # ------------------------------------------------------------------ receive

    def receive_data(self, data: Buffer) -> list[Event]:
        """Feed bytes read from the stream; return the events they complete.

        ``b""`` means the stream reached EOF.  See the module docstring for the
        events.  Automatic replies (PONG, the CLOSE echo, the CLOSE that fails
        the connection) are queued for :meth:`data_to_send`.

        Never raises for anything the peer sends: a violation becomes a
        :class:`ConnectionFailed` event after the messages completed before it.
        """
        if not self._reading:
            self.saw_control = False
            return []
        if not data:
            return self._eof()
        try:
            msgs: list[Event] = self._feed(data)
        except ProtocolViolation as exc:
            return self._fail(exc)
        # Hot path: a batch of data messages goes back as the reader built it.
        for m in msgs:
            if m[0] >= OP_CLOSE:  # type: ignore[index]
                return self._control(msgs)
        self.saw_control = False
        return msgs

    def _control(self, msgs: list[Event]) -> list[Event]:
        """Slow path: a batch with control frames in it."""
        self.saw_control = True
        events: list[Event] = []
        for m in msgs:
            opcode, payload = m  # type: ignore[misc]
            if opcode < OP_CLOSE:
                events.append(m)
            elif opcode == OP_PING:
                # §5.5.2: answer with the same payload (we are OPEN or LOCAL_CLOSING).
                self._out += encode_frame(OP_PONG, payload, mask_key=self._mask_key())
                events.append(m)
            elif opcode == OP_PONG:
                events.append(m)
            else:
                events.append(self._on_close(payload))
                break  # §5.5.1: nothing after a CLOSE is ours to interpret
        return events

    def _on_close(self, payload: bytes) -> CloseReceived:
        code, reason = parse_close_payload(payload)
        self.close_received = (code, reason)
        self._reading = False
        if self.state is _OPEN:
            # §5.5.1: "it MUST send a Close frame in response ... typically
            # echoing the status code it received".  1005 means none was sent,
            # so the echo carries none either.
            echo = b"" if code == CloseCode.NO_STATUS else encode_close_payload(code)
            self._out += encode_frame(OP_CLOSE, echo, mask_key=self._mask_key())
            self.close_sent = (code, "") if echo else (CloseCode.NO_STATUS, "")
            self.state = _REMOTE_CLOSING
        else:  # LOCAL_CLOSING: this was the answer to ours
            self.state = _CLOSED
        return CloseReceived(code, reason)

    def _fail(self, exc: ProtocolViolation) -> list[Event]:
        # Messages completed before the violation are valid and delivered first.
        events = self._control(exc.partial) if exc.partial else []
        self.saw_control = True
        if not self._reading:  # a CLOSE came before the violation in this batch
            return events
        self._reading = False
        if self.state is _OPEN:
            # §7.1.7 "Fail the WebSocket Connection": send a Close frame with
            # the code that says why, then drop the TCP connection.
            self._out += encode_frame(OP_CLOSE, encode_close_payload(exc.close_code, exc.message),
                                      mask_key=self._mask_key())
            self.close_sent = (int(exc.close_code), exc.message)
        self.state = _CLOSED
        events.append(ConnectionFailed(int(exc.close_code), exc.message))
        return events

    def _eof(self) -> list[Event]:
        self.saw_control = True
        self._reading = False
        self.state = _CLOSED
        # §7.1.5: a connection closed with no Close frame has status 1006.
        return [ConnectionFailed(CloseCode.ABNORMAL, _EOF_REASON)]

    # --------------------------------------------------------------------- send

    @property
    def has_data_to_send(self) -> bool:
        """True when automatic replies are queued."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """Take the queued automatic replies (PONGs, CLOSE echo or failure CLOSE).

        Handing out the CLOSE echo completes the close handshake: REMOTE_CLOSING
        becomes CLOSED.
        """
        out = bytes(self._out)
        self._out.clear()
        if self.state is _REMOTE_CLOSING:
            self.state = _CLOSED
        return out

    def _mask_key(self) -> bytes | None:
        source = self._mask_key_source
        return None if source is None else source()

    def send_binary(self, payload: Buffer, prefix: Buffer = b"") -> bytes:
        """Return one binary message whose payload is ``prefix + payload``.

        The prefix (channel byte, podterm.v1 type byte) is written without
        building the concatenation first.

        Raises:
            LocalProtocolError: the connection is not OPEN.
        """
        if self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send data in state {self.state.name}")
        source = self._mask_key_source
        frame: bytes = encode_message(prefix, payload, opcode=OP_BINARY,
                                      mask_key=None if source is None else source())
        return frame

    def send_text(self, text: str) -> bytes:
        """Return one text message.

        Raises:
            LocalProtocolError: the connection is not OPEN.
        """
        if self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send data in state {self.state.name}")
        frame: bytes = encode_message(b"", text.encode("utf-8"), opcode=OP_TEXT,
                                      mask_key=self._mask_key())
        return frame

    def send_ping(self, payload: Buffer = b"") -> bytes:
        """Return a PING frame.

        Raises:
            LocalProtocolError: after a CLOSE was received, or a payload over 125 bytes.
        """
        return self._control_frame(OP_PING, payload)

    def send_pong(self, payload: Buffer = b"") -> bytes:
        """Return an unsolicited PONG frame (a one-way heartbeat, RFC 6455 §5.5.3).

        Raises:
            LocalProtocolError: after a CLOSE was received, or a payload over 125 bytes.
        """
        return self._control_frame(OP_PONG, payload)

    def _control_frame(self, opcode: int, payload: Buffer) -> bytes:
        if self.state is not _OPEN and self.state is not _LOCAL_CLOSING:
            raise LocalProtocolError(f"cannot send a control frame in state {self.state.name}")
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError(f"control frame payload of {len(payload)} bytes (max 125)")
        frame: bytes = encode_frame(opcode, payload, mask_key=self._mask_key())
        return frame

    def send_close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> bytes:
        """Return our CLOSE frame and enter LOCAL_CLOSING.

        Args:
            code: a code allowed on the wire (1000-1003, 1007-1014, 3000-4999),
                or None for a CLOSE without a status (then ``reason`` must be empty).
            reason: UTF-8 text; cut at a character boundary to fit the frame.

        Raises:
            LocalProtocolError: a CLOSE was already sent or received, or the code
                may not be sent (1005, 1006 and 1015 are reserved, §7.4.1).
        """
        if self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send CLOSE in state {self.state.name}")
        if code is None:
            if reason:
                raise LocalProtocolError("a close reason needs a close code")
            payload = b""
            self.close_sent = (CloseCode.NO_STATUS, "")
        else:
            if not is_valid_close_code(code):
                raise LocalProtocolError(f"close code {code} may not be sent (RFC 6455 §7.4)")
            payload = encode_close_payload(code, reason)
            self.close_sent = (int(code), payload[2:].decode("utf-8"))
        self.state = _LOCAL_CLOSING
        frame: bytes = encode_frame(OP_CLOSE, payload, mask_key=self._mask_key())
        return frame
