"""podterm.v1 message codec (docs/protocol.md §4-§5), both directions.

Every message is one **binary** WebSocket message whose first byte is its type::

    0x00 STDIN    client → server   raw bytes (1..64 KiB)
    0x01 STDOUT   server → client   raw bytes (1..64 KiB; the server sends ≤ 32 KiB)
    0x02 STDERR   server → client   raw bytes (1..64 KiB)
    0x03 EXIT     server → client   JSON {"code": int|null, "signal": int|null, "reason": str}
    0x04 RESIZE   client → server   cols u16 BE, rows u16 BE: exactly 4 bytes
    0x05 ACK      both              u64 BE offset: exactly 8 bytes
    0x06 CONTROL  both              JSON object with a string "type", ≤ 16 KiB

Decoding rules, checked in this order (each raises
:class:`~podterm.errors.ProtocolViolation` with the close code shown):

1. a text message                                       → 1003
2. an empty message (no type byte)                      → 1002
3. a type byte above 0x06                               → 1003 (unknown type)
4. a type the receiving role never accepts (a client's STDOUT, a server's STDIN) → 1003
5. a read-only viewer's STDIN or RESIZE (server role)   → 1008
   (and its CONTROL ``stdin_eof``, once that has passed check 9)
6. a data payload over 64 KiB, a CONTROL or EXIT over 16 KiB → 1009
7. RESIZE not exactly 4 bytes, ACK not exactly 8        → 1002
8. RESIZE cols or rows above 10000                      → 1002; a zero is ignored (no event)
9. CONTROL/EXIT not UTF-8, not JSON, not an object, no string ``type``,
   or a known type whose fields do not match its schema → 1007
10. a known CONTROL type the receiving role never accepts (a client's
    ``hello``, a server's ``detach``)                    → 1003
11. client role: anything but CONTROL ``hello``/``error``/``drain`` before
    ``hello``, or a second ``hello``                     → 1002

An empty STDIN/STDOUT/STDERR payload is legal and ignored (it carries no
offset).  Unknown CONTROL types are ignored (forward compatibility) once they
pass check 9.  Data events hold ``bytes`` sliced once from the payload.

Encoding: every encoder returns ``(prefix, payload)`` for
:func:`~podterm.protocol.codec.encode_message`, e.g. ``(b"\\x01", data)`` for
STDOUT, so the data is never concatenated here.  Encoders refuse what the
decoder would reject with :class:`~podterm.errors.LocalProtocolError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, TypeAlias

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
from podterm.protocol._types import Buffer
from podterm.protocol.events import (
    Ack,
    Detach,
    Drain,
    ErrorMsg,
    Event,
    Exit,
    Gap,
    Hello,
    Resize,
    Stderr,
    Stdin,
    StdinEof,
    Stdout,
)

SUBPROTOCOL: Final = "podterm.v1"

OP_TEXT: Final = 0x1  # RFC 6455 §5.2
OP_BINARY: Final = 0x2


class MsgType(IntEnum):
    """podterm.v1 message type byte (docs/protocol.md §4)."""

    STDIN = 0x00  # client → server: raw bytes
    STDOUT = 0x01  # server → client: raw bytes
    STDERR = 0x02  # server → client: raw bytes (no-tty sessions)
    EXIT = 0x03  # server → client: JSON {"code","signal","reason"}
    RESIZE = 0x04  # client → server: cols u16 BE, rows u16 BE (exactly 4 bytes)
    ACK = 0x05  # both: u64 BE offset (exactly 8 bytes)
    CONTROL = 0x06  # both: JSON object with a "type" field, ≤ 16 KiB


#: docs/protocol.md §4 "Limits".
MAX_DATA_BYTES: Final = 64 * 1024  # a STDIN/STDOUT/STDERR payload
SERVER_CHUNK_BYTES: Final = 32 * 1024  # what the server puts in one message
MAX_CONTROL_BYTES: Final = 16 * 1024  # a CONTROL (and EXIT) payload
MAX_TERMINAL_SIZE: Final = 10000  # cols and rows, 1..10000
MAX_OFFSET: Final = (1 << 64) - 1  # u64
DEFAULT_WINDOW: Final = 256 * 1024  # §6: flow-control window
DEFAULT_HEARTBEAT_S: Final = 15.0  # §6

HELLO_STATES: Final = frozenset({"running", "exited"})
MODES: Final = frozenset({"rw", "ro"})

#: Known CONTROL types by sender (docs/protocol.md §4 "Control messages").
SERVER_CONTROLS: Final = frozenset({"hello", "gap", "drain", "error"})
CLIENT_CONTROLS: Final = frozenset({"detach", "stdin_eof", "error"})  # "error": either side

_ACK = struct.Struct(">Q")
_RESIZE = struct.Struct(">HH")

OutMessage: TypeAlias = tuple[bytes, Buffer]
"""``(prefix, payload)`` for ``encode_message(prefix, payload)`` (always binary)."""

_PREFIX: Final = {t: bytes((t,)) for t in MsgType}


def _bad(message: str, code: int) -> ProtocolViolation:
    return ProtocolViolation(message, code)


def _schema(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, CloseCode.INVALID_PAYLOAD)


# --- field decoding, shared with the agent tunnel ------------------------------------------


def slice_data(payload: Buffer, start: int) -> bytes:
    """``payload[start:]`` as bytes, copied at most once (bytes slicing or one ``bytes()``)."""
    body = payload[start:]
    return body if isinstance(body, bytes) else bytes(body)


def parse_resize(payload: Buffer, start: int) -> Resize | None:
    """RESIZE body at ``payload[start:]``: exactly 4 bytes; a zero size gives None.

    Raises:
        ProtocolViolation: 1002 for a wrong length or a size above 10000.
    """
    if len(payload) - start != _RESIZE.size:
        raise _bad(f"RESIZE payload must be 4 bytes, got {len(payload) - start}",
                   CloseCode.PROTOCOL_ERROR)
    cols, rows = _RESIZE.unpack_from(payload, start)
    if cols > MAX_TERMINAL_SIZE or rows > MAX_TERMINAL_SIZE:
        raise _bad(f"RESIZE {cols}x{rows} above {MAX_TERMINAL_SIZE}", CloseCode.PROTOCOL_ERROR)
    if cols == 0 or rows == 0:
        return None  # §4: "0 is ignored"
    return Resize(cols, rows)


def parse_ack(payload: Buffer, start: int) -> Ack:
    """ACK body at ``payload[start:]``: exactly 8 bytes (1002 otherwise)."""
    if len(payload) - start != _ACK.size:
        raise _bad(f"ACK payload must be 8 bytes, got {len(payload) - start}",
                   CloseCode.PROTOCOL_ERROR)
    return Ack(_ACK.unpack_from(payload, start)[0])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json_object(payload: Buffer, start: int, what: str) -> dict[str, Any]:
    """Decode a JSON object body: UTF-8, strict JSON (no NaN), an object (1007 otherwise).

    Size limits are the caller's: check them before calling.
    """
    try:
        text = bytes(payload[start:]).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digits
        raise _schema(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _schema(f"{what} is not a JSON object")
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _schema(f"{what}: {key!r} must be a string")
    return value


def _int(obj: Mapping[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _schema(f"{what}: {key!r} must be an integer in {lo}..{hi}")
    return value


def _opt_int(obj: Mapping[str, Any], key: str, what: str, lo: int, hi: int) -> int | None:
    if key not in obj:
        raise _schema(f"{what}: {key!r} is required")
    if obj[key] is None:
        return None
    return _int(obj, key, what, lo, hi)


_INT64: Final = (-(1 << 63), (1 << 63) - 1)


def parse_exit(payload: Buffer, start: int) -> Exit:
    """EXIT body: ``{"code": int|null, "signal": int|null, "reason": str}`` (1007 otherwise)."""
    obj = load_json_object(payload, start, "EXIT")
    return Exit(code=_opt_int(obj, "code", "EXIT", *_INT64),
                signal=_opt_int(obj, "signal", "EXIT", 1, 255),
                reason=_str(obj, "reason", "EXIT"))


def _parse_hello(obj: Mapping[str, Any]) -> Hello:
    what = "hello"
    state = _str(obj, "state", what)
    if state not in HELLO_STATES:
        raise _schema(f"hello: unknown state {state!r}")
    mode = _str(obj, "mode", what)
    if mode not in MODES:
        raise _schema(f"hello: unknown mode {mode!r}")
    token = obj.get("resume_token")
    if token is not None and not isinstance(token, str):
        raise _schema("hello: 'resume_token' must be a string or null")
    size = obj.get("size")
    if not isinstance(size, dict):
        raise _schema("hello: 'size' must be an object")
    out_offset = _int(obj, "out_offset", what, 0, MAX_OFFSET)
    ring_start = _int(obj, "ring_start", what, 0, MAX_OFFSET)
    if ring_start > out_offset:
        raise _schema("hello: 'ring_start' is after 'out_offset'")
    heartbeat = obj.get("heartbeat_s")
    if not isinstance(heartbeat, int | float) or isinstance(heartbeat, bool) or not heartbeat > 0:
        raise _schema("hello: 'heartbeat_s' must be a positive number")
    notices = obj.get("notices", [])
    if not isinstance(notices, list) or not all(isinstance(n, str) for n in notices):
        raise _schema("hello: 'notices' must be a list of strings")
    stdin_closed = obj.get("stdin_closed", False)  # absent: false (older servers)
    if not isinstance(stdin_closed, bool):
        raise _schema("hello: 'stdin_closed' must be a boolean")
    return Hello(
        session=_str(obj, "session", what),
        resume_token=token,
        state=state,
        mode=mode,
        out_offset=out_offset,
        ring_start=ring_start,
        in_acked=_int(obj, "in_acked", what, 0, MAX_OFFSET),
        cols=_int(size, "cols", "hello.size", 1, MAX_TERMINAL_SIZE),
        rows=_int(size, "rows", "hello.size", 1, MAX_TERMINAL_SIZE),
        window=_int(obj, "window", what, 1, MAX_OFFSET),
        heartbeat_s=float(heartbeat),
        notices=tuple(notices),
        stdin_closed=stdin_closed,
    )


def _parse_gap(obj: Mapping[str, Any]) -> Gap:
    start = _int(obj, "from", "gap", 0, MAX_OFFSET)
    end = _int(obj, "to", "gap", 0, MAX_OFFSET)
    lost = _int(obj, "lost", "gap", 0, MAX_OFFSET)
    if end < start or lost != end - start:
        raise _schema("gap: need from <= to and lost == to - from")
    return Gap(start, end)


def _parse_drain(obj: Mapping[str, Any]) -> Drain:
    return Drain(_str(obj, "reason", "drain"))


def _parse_error(obj: Mapping[str, Any]) -> ErrorMsg:
    return ErrorMsg(_str(obj, "code", "error"), _str(obj, "message", "error"))


def _parse_detach(obj: Mapping[str, Any]) -> Detach:
    return Detach()


def _parse_stdin_eof(obj: Mapping[str, Any]) -> StdinEof:
    return StdinEof(_int(obj, "offset", "stdin_eof", 0, MAX_OFFSET))


_CONTROL_PARSERS: Final[Mapping[str, Callable[[Mapping[str, Any]], Event]]] = {
    "hello": _parse_hello,
    "gap": _parse_gap,
    "drain": _parse_drain,
    "error": _parse_error,
    "detach": _parse_detach,
    "stdin_eof": _parse_stdin_eof,
}


def parse_control(payload: Buffer, start: int, accepted: frozenset[str],
                  known: frozenset[str] = frozenset(_CONTROL_PARSERS)) -> Event | None:
    """CONTROL body at ``payload[start:]``; None for an unknown (ignored) type.

    Args:
        accepted: the types this receiver takes; a type in ``known`` but not in
            ``accepted`` is a wrong-direction message (1003).
        known: the types with a schema.

    Raises:
        ProtocolViolation: 1007 for bad JSON or a schema mismatch, 1003 for a
            wrong-direction type.  The caller checks the 16 KiB limit first.
    """
    obj = load_json_object(payload, start, "CONTROL")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _schema("CONTROL: 'type' must be a string")
    if kind not in known:
        return None
    if kind not in accepted:
        raise _bad(f"CONTROL {kind!r} not accepted here", CloseCode.UNSUPPORTED_DATA)
    return _CONTROL_PARSERS[kind](obj)


# --- encoding -------------------------------------------------------------------------------


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _check_data(data: Buffer) -> None:
    n = len(data)
    if not 0 < n <= MAX_DATA_BYTES:
        raise LocalProtocolError(f"data message of {n} bytes (1..{MAX_DATA_BYTES} allowed)")


def _check_control(body: bytes) -> bytes:
    if len(body) > MAX_CONTROL_BYTES:
        raise LocalProtocolError(f"CONTROL of {len(body)} bytes over {MAX_CONTROL_BYTES}")
    return body


def _check_offset(offset: int) -> int:
    if not _is_int(offset) or not 0 <= offset <= MAX_OFFSET:
        raise LocalProtocolError(f"offset {offset!r} is not a u64")
    return offset


def _check_size(cols: int, rows: int) -> None:
    for name, value in (("cols", cols), ("rows", rows)):
        if not _is_int(value) or not 1 <= value <= MAX_TERMINAL_SIZE:
            raise LocalProtocolError(f"{name}={value!r} outside 1..{MAX_TERMINAL_SIZE}")


_json_str = json.JSONEncoder(ensure_ascii=False).encode


def _hello_body(event: Hello) -> bytes:
    """The ``hello`` CONTROL JSON, written directly (one per attach: the handshake path).

    Byte for byte what ``_json`` makes of the same object, keys in spec
    order; every field is checked against the decoder's rules
    (:func:`_parse_hello`) first, so what is sent is what a peer accepts,
    without building a dict, dumping it and parsing it back.
    """
    _check_size(event.cols, event.rows)
    for value in (event.out_offset, event.ring_start, event.in_acked):
        _check_offset(value)
    session, token, notices = event.session, event.resume_token, event.notices
    heartbeat, window = event.heartbeat_s, event.window
    if (not isinstance(session, str) or event.state not in HELLO_STATES
            or event.mode not in MODES or not (token is None or isinstance(token, str))
            or event.ring_start > event.out_offset
            or not _is_int(window) or not 1 <= window <= MAX_OFFSET
            or not isinstance(heartbeat, int | float) or isinstance(heartbeat, bool)
            or not 0 < heartbeat < math.inf
            or not all(isinstance(n, str) for n in notices)
            or not isinstance(event.stdin_closed, bool)):
        raise LocalProtocolError(f"invalid hello: {event!r}")
    # "heartbeat_s":15 as in the spec when it is a whole number.
    beat = int(heartbeat) if heartbeat == int(heartbeat) else heartbeat
    text = (f'{{"type":"hello","session":{_json_str(session)},'
            f'"resume_token":{"null" if token is None else _json_str(token)},'
            f'"state":"{event.state}","mode":"{event.mode}","out_offset":{event.out_offset},'
            f'"ring_start":{event.ring_start},"in_acked":{event.in_acked},'
            f'"size":{{"cols":{event.cols},"rows":{event.rows}}},"window":{window},'
            f'"heartbeat_s":{beat!r},"notices":[{",".join(map(_json_str, notices))}]'
            + (',"stdin_closed":true}' if event.stdin_closed else "}"))
    return _check_control(text.encode("utf-8"))


def control_body(event: Event) -> bytes:
    """The CONTROL JSON for a control event (compact, keys in spec order)."""
    obj: dict[str, Any]
    if isinstance(event, Hello):
        return _hello_body(event)
    if isinstance(event, Gap):
        obj = {"type": "gap", "from": _check_offset(event.from_offset),
               "to": _check_offset(event.to_offset), "lost": event.lost}
    elif isinstance(event, Drain):
        obj = {"type": "drain", "reason": event.reason}
    elif isinstance(event, ErrorMsg):
        obj = {"type": "error", "code": event.code, "message": event.message}
    elif isinstance(event, Detach):
        obj = {"type": "detach"}
    elif isinstance(event, StdinEof):
        obj = {"type": "stdin_eof", "offset": _check_offset(event.offset)}
    else:
        raise LocalProtocolError(f"{type(event).__name__} is not a control message")
    body = _check_control(_json(obj))
    try:
        # Send only what a peer accepts: the decoder's schema is the one source of truth.
        parse_control(body, 0, frozenset(_CONTROL_PARSERS))
    except ProtocolViolation as exc:
        raise LocalProtocolError(f"invalid {obj['type']}: {exc.message}") from None
    return body


def encode_stdin(data: Buffer) -> OutMessage:
    _check_data(data)
    return _PREFIX[MsgType.STDIN], data


def encode_stdout(data: Buffer) -> OutMessage:
    _check_data(data)
    return _PREFIX[MsgType.STDOUT], data


def encode_stderr(data: Buffer) -> OutMessage:
    _check_data(data)
    return _PREFIX[MsgType.STDERR], data


def encode_exit(code: int | None, signal: int | None, reason: str) -> OutMessage:
    body = _check_control(_json({"code": code, "signal": signal, "reason": reason}))
    try:
        parse_exit(body, 0)
    except ProtocolViolation as exc:
        raise LocalProtocolError(f"invalid EXIT: {exc.message}") from None
    return _PREFIX[MsgType.EXIT], body


def encode_resize(cols: int, rows: int) -> OutMessage:
    _check_size(cols, rows)
    return _PREFIX[MsgType.RESIZE], _RESIZE.pack(cols, rows)


def encode_ack(offset: int) -> OutMessage:
    return _PREFIX[MsgType.ACK], _ACK.pack(_check_offset(offset))


def encode_control(event: Event) -> OutMessage:
    return _PREFIX[MsgType.CONTROL], control_body(event)


def encode(event: Event) -> OutMessage:
    """Encode any podterm.v1 event, whatever the direction (the codecs check direction)."""
    if isinstance(event, Stdout):
        return encode_stdout(event.data)
    if isinstance(event, Stdin):
        return encode_stdin(event.data)
    if isinstance(event, Stderr):
        return encode_stderr(event.data)
    if isinstance(event, Ack):
        return encode_ack(event.offset)
    if isinstance(event, Resize):
        return encode_resize(event.cols, event.rows)
    if isinstance(event, Exit):
        return encode_exit(event.code, event.signal, event.reason)
    return encode_control(event)


# --- the two codecs -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionCodecStatistics:
    messages: int  # messages decoded
    ignored: int  # empty data, zero resize, unknown control types


class _Codec:
    __slots__ = ("max_data_bytes", "max_control_bytes", "_messages", "_ignored")

    _accepts: frozenset[int] = frozenset()
    _controls: frozenset[str] = frozenset()

    def __init__(self, max_data_bytes: int, max_control_bytes: int) -> None:
        self.max_data_bytes = max_data_bytes
        self.max_control_bytes = max_control_bytes
        self._messages = 0
        self._ignored = 0

    def statistics(self) -> SessionCodecStatistics:
        return SessionCodecStatistics(self._messages, self._ignored)

    def _head(self, opcode: int, payload: Buffer) -> int:
        """Checks 1-4 and 6; returns the type byte."""
        if opcode == OP_TEXT:
            raise _bad("podterm.v1 messages are binary; got a text message",
                       CloseCode.UNSUPPORTED_DATA)
        if opcode != OP_BINARY:
            raise LocalProtocolError(f"opcode {opcode} is not a data message")
        if not len(payload):
            raise _bad("empty message has no type byte", CloseCode.PROTOCOL_ERROR)
        kind = payload[0]
        if kind > MsgType.CONTROL:
            raise _bad(f"unknown message type 0x{kind:02x}", CloseCode.UNSUPPORTED_DATA)
        if kind not in self._accepts:
            raise _bad(f"{MsgType(kind).name} not accepted by this side",
                       CloseCode.UNSUPPORTED_DATA)
        self._messages += 1
        return kind

    def _body_limit(self, kind: int, payload: Buffer) -> None:
        n = len(payload) - 1
        if kind <= MsgType.STDERR:
            if n > self.max_data_bytes:
                raise _bad(f"{MsgType(kind).name} payload of {n} bytes over {self.max_data_bytes}",
                           CloseCode.MESSAGE_TOO_BIG)
        elif kind in (MsgType.CONTROL, MsgType.EXIT) and n > self.max_control_bytes:
            raise _bad(f"{MsgType(kind).name} payload of {n} bytes over {self.max_control_bytes}",
                       CloseCode.MESSAGE_TOO_BIG)

    def _control(self, payload: Buffer) -> Event | None:
        event = parse_control(payload, 1, self._controls)
        if event is None:
            self._ignored += 1
        return event


class ServerCodec(_Codec):
    """Decodes client → server messages; encodes server → client ones.

    Args:
        read_only: the client is a viewer: its STDIN, RESIZE and ``stdin_eof``
            are a policy violation (1008, docs/protocol.md §7).
        max_data_bytes, max_control_bytes: the §4 limits (64 KiB, 16 KiB).

    ``receive_message`` yields :class:`Stdin`, :class:`Resize`, :class:`Ack`,
    :class:`Detach`, :class:`StdinEof` and :class:`ErrorMsg`.
    """

    __slots__ = ("read_only",)

    _accepts = frozenset({MsgType.STDIN, MsgType.RESIZE, MsgType.ACK, MsgType.CONTROL})
    _controls = CLIENT_CONTROLS

    def __init__(self, *, read_only: bool = False, max_data_bytes: int = MAX_DATA_BYTES,
                 max_control_bytes: int = MAX_CONTROL_BYTES) -> None:
        super().__init__(max_data_bytes, max_control_bytes)
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"<ServerCodec {'ro' if self.read_only else 'rw'} messages={self._messages}>"

    def receive_message(self, opcode: int, payload: Buffer) -> list[Event]:
        """Decode one whole client message into zero or one event (see the module docstring).

        Raises:
            ProtocolViolation: with the close code of the rule broken.
        """
        kind = self._head(opcode, payload)
        if self.read_only and kind in (MsgType.STDIN, MsgType.RESIZE):
            raise _bad(f"read-only viewer sent {MsgType(kind).name}", CloseCode.POLICY_VIOLATION)
        self._body_limit(kind, payload)
        event: Event | None
        if kind == MsgType.STDIN:
            if len(payload) == 1:
                self._ignored += 1
                return []
            return [Stdin(slice_data(payload, 1))]
        if kind == MsgType.ACK:
            return [parse_ack(payload, 1)]
        if kind == MsgType.RESIZE:
            event = parse_resize(payload, 1)
            if event is None:
                self._ignored += 1
        else:
            event = self._control(payload)
            if self.read_only and type(event) is StdinEof:
                # A viewer has no input to end: the same policy as its STDIN.
                raise _bad("read-only viewer sent stdin_eof", CloseCode.POLICY_VIOLATION)
        return [] if event is None else [event]

    # Encoders (server → client).
    stdout = staticmethod(encode_stdout)
    stderr = staticmethod(encode_stderr)
    exit = staticmethod(encode_exit)
    ack = staticmethod(encode_ack)

    @staticmethod
    def hello(event: Hello) -> OutMessage:
        return encode_control(event)

    @staticmethod
    def gap(from_offset: int, to_offset: int) -> OutMessage:
        return encode_control(Gap(from_offset, to_offset))

    @staticmethod
    def drain(reason: str) -> OutMessage:
        return encode_control(Drain(reason))

    @staticmethod
    def error(code: str, message: str) -> OutMessage:
        return encode_control(ErrorMsg(code, message))

    def send(self, event: Event) -> OutMessage:
        """Encode a server → client event.

        Raises:
            LocalProtocolError: the event is not one a server sends.
        """
        if isinstance(event, Stdin | Resize | Detach | StdinEof) or not _is_session_event(event):
            raise LocalProtocolError(f"a server does not send {type(event).__name__}")
        return encode(event)


class ClientCodec(_Codec):
    """Decodes server → client messages; encodes client → server ones.

    Args:
        expect_hello: enforce that ``hello`` comes first (rule 11).  The only
            messages allowed before it are ``error`` and ``drain`` (a refused
            attach sends ``error`` then closes) and unknown CONTROL types.

    ``receive_message`` yields :class:`Stdout`, :class:`Stderr`, :class:`Exit`,
    :class:`Ack`, :class:`Hello`, :class:`Gap`, :class:`Drain`, :class:`ErrorMsg`.
    """

    __slots__ = ("_hello_seen", "expect_hello")

    _accepts = frozenset({MsgType.STDOUT, MsgType.STDERR, MsgType.EXIT, MsgType.ACK,
                          MsgType.CONTROL})
    _controls = SERVER_CONTROLS

    def __init__(self, *, expect_hello: bool = True, max_data_bytes: int = MAX_DATA_BYTES,
                 max_control_bytes: int = MAX_CONTROL_BYTES) -> None:
        super().__init__(max_data_bytes, max_control_bytes)
        self.expect_hello = expect_hello
        self._hello_seen = False

    def __repr__(self) -> str:
        return f"<ClientCodec hello={'seen' if self._hello_seen else 'pending'} messages={self._messages}>"

    def receive_message(self, opcode: int, payload: Buffer) -> list[Event]:
        """Decode one whole server message into zero or one event (see the module docstring).

        Raises:
            ProtocolViolation: with the close code of the rule broken.
        """
        kind = self._head(opcode, payload)
        self._body_limit(kind, payload)
        event: Event | None
        if kind == MsgType.CONTROL:
            event = self._control(payload)
            if isinstance(event, Hello):
                if self._hello_seen and self.expect_hello:
                    raise _bad("second hello on one connection", CloseCode.PROTOCOL_ERROR)
                self._hello_seen = True
            elif isinstance(event, Gap):
                self._require_hello("gap")
            return [] if event is None else [event]
        self._require_hello(MsgType(kind).name)
        if kind in (MsgType.STDOUT, MsgType.STDERR):
            if len(payload) == 1:
                self._ignored += 1
                return []
            data = slice_data(payload, 1)
            return [Stdout(data) if kind == MsgType.STDOUT else Stderr(data)]
        if kind == MsgType.ACK:
            return [parse_ack(payload, 1)]
        return [parse_exit(payload, 1)]

    def _require_hello(self, what: str) -> None:
        if self.expect_hello and not self._hello_seen:
            raise _bad(f"{what} before hello", CloseCode.PROTOCOL_ERROR)

    # Encoders (client → server).
    stdin = staticmethod(encode_stdin)
    resize = staticmethod(encode_resize)
    ack = staticmethod(encode_ack)

    @staticmethod
    def detach() -> OutMessage:
        return encode_control(Detach())

    @staticmethod
    def stdin_eof(offset: int) -> OutMessage:
        """CONTROL ``stdin_eof``: the client's input ends at ``offset`` (its total input)."""
        return encode_control(StdinEof(offset))

    def send(self, event: Event) -> OutMessage:
        """Encode a client → server event.

        Raises:
            LocalProtocolError: the event is not one a client sends.
        """
        if not isinstance(event, Stdin | Resize | Ack | Detach | StdinEof | ErrorMsg):
            raise LocalProtocolError(f"a client does not send {type(event).__name__}")
        return encode(event)


def _is_session_event(event: Event) -> bool:
    return isinstance(event, Stdin | Stdout | Stderr | Exit | Resize | Ack | Hello | Gap | Drain
                      | ErrorMsg | Detach | StdinEof)


__all__ = [
    "CLIENT_CONTROLS", "DEFAULT_HEARTBEAT_S", "DEFAULT_WINDOW", "MAX_CONTROL_BYTES",
    "MAX_DATA_BYTES", "MAX_OFFSET", "MAX_TERMINAL_SIZE", "SERVER_CHUNK_BYTES", "SERVER_CONTROLS",
    "SUBPROTOCOL", "ClientCodec", "MsgType", "OutMessage", "ServerCodec",
    "SessionCodecStatistics", "control_body", "encode", "encode_ack", "encode_control",
    "encode_exit", "encode_resize", "encode_stderr", "encode_stdin", "encode_stdout",
    "load_json_object", "parse_ack", "parse_control", "parse_exit", "parse_resize", "slice_data",
]
