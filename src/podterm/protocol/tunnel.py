"""Agent tunnel: many podterm streams over one WebSocket (docs/protocol.md §8).

The gateway ↔ agent link (subprotocol ``podterm.tunnel.v1``) multiplexes every
shell the agent hosts for that gateway.  It reuses the podterm.v1 message
types and layouts, adds a stream id to each message, and adds three messages
of its own: OPEN, CLOSE and RESUME.  Sans-IO: bytes in, events out.

Framing
-------
Every message is one **binary** WebSocket message (a text message is an
error, 1003)::

     0        1                      5
    +--------+----------------------+------------------------------+
    |  type  |  stream id, u32 BE   |  payload (layout by type)    |
    +--------+----------------------+------------------------------+

    type  name     sender   stream   payload
    0x00  STDIN    gateway  ≥ 1      raw bytes, 1..65536 (podterm.v1 STDIN)
    0x01  STDOUT   agent    ≥ 1      raw bytes, 1..65536
    0x02  STDERR   agent    ≥ 1      raw bytes, 1..65536
    0x03  EXIT     agent    ≥ 1      JSON {"code": int|null, "signal": int|null, "reason": str}, ≤ 16 KiB
    0x04  RESIZE   gateway  ≥ 1      cols u16 BE, rows u16 BE (exactly 4 bytes; 1..10000, 0 ignored)
    0x05  ACK      both     ≥ 1      u64 BE offset (exactly 8 bytes)
    0x06  CONTROL  both     ≥ 0      JSON object with a string "type", ≤ 16 KiB
    0x07  OPEN     gateway  ≥ 1      JSON, ≤ 256 KiB (below)
    0x08  CLOSE    both     ≥ 1      JSON {"reason": str}, ≤ 16 KiB
    0x09  RESUME   both     = 0      JSON, ≤ 1 MiB (below)

Stream id 0 is the link itself: only RESUME and CONTROL use it.  Every other
message names a stream ≥ 1; a per-stream type on stream 0 or RESUME on a
stream ≥ 1 is an error (1002).  A message shorter than 5 bytes is 1002, a
type above 0x09 or a type the receiver never accepts (an agent's STDIN) 1003,
an oversized payload 1009, a bad fixed layout 1002, bad JSON or a schema
mismatch 1007 — the podterm.v1 rules, applied to the bytes after the header.

Offsets and credit
------------------
Each stream has two byte streams with their own offsets from 0, exactly as
podterm.v1: *output* (STDOUT and STDERR payloads together, agent → gateway)
and *input* (STDIN payloads, gateway → agent).  An ACK on a stream carries the
offset of the peer's stream the sender has **consumed** (the gateway: put in
the session's ring; the agent: written to the PTY).  ACK is credit: a sender
keeps at most the stream's ``window`` bytes sent and not acknowledged, and
stops reading that stream's source beyond it.  Credit is per stream, so a
shell whose reader is slow stops only itself: the receiver never holds more
than one window per stream and can always read the link.  Sending past the
window is an error (1002), as is an ACK that goes backwards or beyond what was
sent.  Receivers ACK at least every half window and every 100 ms while
unacknowledged data exists.

OPEN (gateway → agent)
----------------------
::

    {"command": ["sh", "-c", "..."] | null,   null: the user's login shell
     "tty": true,
     "size": {"cols": 80, "rows": 24},        1..10000 each
     "env": {"NAME": "value", ...},           optional; ≤ 128 names [A-Za-z_][A-Za-z0-9_]*
     "cwd": "/abs/path" | null,               optional
     "window": 262144,                        optional credit window, 1..2^31-1 (default 256 KiB)
     "session": "s-3f9a0c1d2e4b"}             optional label, 1..128 of [A-Za-z0-9._-]

The stream id is the header's.  ``session`` is the gateway's session id: the
agent keeps it with the stream and lists it in its RESUME, which is how a
gateway that never opened the stream (the one that did died) finds the
session it belongs to in the session store and adopts it.  The gateway chooses ids: strictly increasing,
starting at the agent's ``next_id`` (see RESUME), so an id is never reused
while the agent process lives.  An OPEN whose id is below ``next_id`` is an
error (1002).  No string may contain NUL.

CLOSE (both)
------------
``{"reason": str}``.  After sending CLOSE a side sends nothing more on that
stream.  The receiver of a CLOSE answers with its own CLOSE unless it already
sent one; the stream is forgotten once both were seen.  Messages that arrive
for a stream one has closed (they were in flight) are dropped; a message after
the peer's own CLOSE is an error (1002).  The agent sends EXIT after the last
output of an exited process and keeps the stream (and its output) until the
gateway CLOSEs it, so output survives a reconnect even after the exit.  The
gateway's CLOSE on a running stream kills the process.

RESUME (both, stream 0)
-----------------------
The first message each side sends on a new tunnel connection.  The agent
sends first; the gateway answers after reading it::

    agent   → {"streams": [{"id": 7, "window": 262144, "out_start": 0, "out_offset": 81920,
                            "in_acked": 56, "session": "s-3f9a0c1d2e4b"}, ...],
               "next_id": 9}
    gateway → {"streams": [{"id": 7, "window": 262144, "out_start": 40, "out_offset": 60,
                            "in_acked": 81000}, ...]}

Each entry describes one stream from the sender's side: ``out_start`` ..
``out_offset`` is the part of its outgoing stream it can still send (the
agent: its output ring; the gateway: its unacknowledged input), ``in_acked``
how much of the peer's stream it holds.  Ids are unique and
``out_start ≤ out_offset``; an agent's ids are below its ``next_id``.  An
agent's entry carries the ``session`` label of the stream's OPEN, if it had
one (the gateway's entries carry none).

The agent's ring keeps the newest output of each stream whether or not it
was acknowledged (ACKs are credit, not a release), so a gateway may ask for
output from *before* what an earlier gateway acknowledged: a new gateway
resumes from what its client is known to hold.

Before RESUME arrives only CONTROL on stream 0 may (``error``, ``drain``);
anything else, or a second RESUME, is an error (1002).  Then, per stream:

* listed by both: each side resends its outgoing stream from the peer's
  ``in_acked``.  If that is below its ``out_start`` the bytes in between are
  gone: it first sends CONTROL ``{"type":"gap","from":in_acked,"to":out_start,
  "lost":N}`` on the stream (agent only: the gateway's input log never drops
  unacknowledged bytes) and resends from ``out_start``.  A peer ``in_acked``
  above one's ``out_offset`` is an error (1002).  Credit restarts at the
  resend point: a full window.  An exited stream re-sends EXIT after its output.
  The receiver drops nothing: every resent byte has the offset it expects
  (the gateway's input dedup trims any overlap).
* listed by the agent only: the gateway either *adopts* it (its ``session``
  label names a live session in the session store: the gateway that ran it
  is gone) and lists it in its answer like any other, its own ``out_start`` =
  ``out_offset`` = the agent's ``in_acked`` and its ``in_acked`` the output
  offset it wants from; or it does not want it and sends CLOSE for it right
  after its RESUME.  The gateway's answer may list only ids the agent listed
  (1002 otherwise) and must echo their ``window``.
* known to the gateway but not listed by the agent: the agent lost it
  (restarted); the gateway ends that session (and may restart its context).

CONTROL on the tunnel
---------------------
``error`` ``{"code","message"}``: on stream 0 from either side, followed by
the WebSocket close; on a stream, the agent reports a per-stream failure (e.g.
the command could not start), followed by EXIT or CLOSE.  ``drain``
``{"reason"}``: gateway → agent on stream 0: this gateway is shutting down,
reconnect (elsewhere) now.  ``gap``: see RESUME.  Other types are ignored.

:class:`TunnelCodec` is the framing above; :class:`TunnelMux` the per-stream
credit, close and resume bookkeeping.  Neither does I/O.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Final, TypeAlias

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
from podterm.protocol._types import Buffer
from podterm.protocol.events import (
    Ack,
    Close,
    Drain,
    ErrorMsg,
    Event,
    Exit,
    Gap,
    Open,
    Resize,
    Resume,
    ResumeEntry,
    Stderr,
    Stdin,
    Stdout,
)
from podterm.protocol.offsets import (
    DEFAULT_ACK_INTERVAL_S,
    DEFAULT_WINDOW,
    AckScheduler,
    AckWindow,
    ReplayRange,
    replay_range,
)
from podterm.protocol.session_proto import (
    MAX_CONTROL_BYTES,
    MAX_DATA_BYTES,
    MAX_OFFSET,
    MAX_TERMINAL_SIZE,
    control_body,
    encode_exit,
    load_json_object,
    parse_ack,
    parse_control,
    parse_exit,
    parse_resize,
    slice_data,
)

SUBPROTOCOL: Final = "podterm.tunnel.v1"

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2

HEADER: Final = struct.Struct(">BI")  # type byte, u32 BE stream id
HEADER_SIZE: Final = HEADER.size  # 5

MAX_STREAM_ID: Final = (1 << 32) - 1
MAX_OPEN_BYTES: Final = 256 * 1024  # command ≤ 64 KiB + env (docs/protocol.md §2 validation)
MAX_RESUME_BYTES: Final = 1 << 20  # ~10,000 streams; the WebSocket message limit
MAX_WINDOW: Final = (1 << 31) - 1
MAX_ENV: Final = 128
MAX_ARGV: Final = 256
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: A stream's session label (OPEN, RESUME): a gateway session id, ``s-`` + hex today.
_SESSION_LABEL: Final = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")


class TunnelType(IntEnum):
    """Tunnel message type byte (podterm.v1 types plus OPEN, CLOSE, RESUME)."""

    STDIN = 0x00  # gateway → agent
    STDOUT = 0x01  # agent → gateway
    STDERR = 0x02  # agent → gateway
    EXIT = 0x03  # agent → gateway
    RESIZE = 0x04  # gateway → agent
    ACK = 0x05  # both
    CONTROL = 0x06  # both; stream 0 = the link
    OPEN = 0x07  # gateway → agent
    CLOSE = 0x08  # both
    RESUME = 0x09  # both, stream 0, first message of a connection


class TunnelRole(Enum):
    GATEWAY = "gateway"
    AGENT = "agent"


#: What each role sends (the peer receives exactly these).
_SENDS: Final = {
    TunnelRole.GATEWAY: frozenset({TunnelType.STDIN, TunnelType.RESIZE, TunnelType.ACK,
                                   TunnelType.CONTROL, TunnelType.OPEN, TunnelType.CLOSE,
                                   TunnelType.RESUME}),
    TunnelRole.AGENT: frozenset({TunnelType.STDOUT, TunnelType.STDERR, TunnelType.EXIT,
                                 TunnelType.ACK, TunnelType.CONTROL, TunnelType.CLOSE,
                                 TunnelType.RESUME}),
}
#: CONTROL types each role sends; all other known podterm.v1 types are ignored on a tunnel.
_CONTROL_SENDS: Final = {
    TunnelRole.GATEWAY: frozenset({"error", "drain"}),
    TunnelRole.AGENT: frozenset({"error", "gap"}),
}
_TUNNEL_CONTROLS: Final = frozenset({"error", "drain", "gap"})

_JSON_LIMITS: Final = {
    TunnelType.EXIT: MAX_CONTROL_BYTES,
    TunnelType.CONTROL: MAX_CONTROL_BYTES,
    TunnelType.CLOSE: MAX_CONTROL_BYTES,
    TunnelType.OPEN: MAX_OPEN_BYTES,
    TunnelType.RESUME: MAX_RESUME_BYTES,
}

OutMessage: TypeAlias = tuple[bytes, Buffer]
"""``(prefix, payload)`` for ``encode_message(prefix, payload)``; prefix is the 5-byte header."""

StreamEvent: TypeAlias = tuple[int, Event]
"""``(stream_id, event)``; stream 0 is the link."""


def _peer(role: TunnelRole) -> TunnelRole:
    return TunnelRole.AGENT if role is TunnelRole.GATEWAY else TunnelRole.GATEWAY


def _bad(message: str, code: int = CloseCode.PROTOCOL_ERROR) -> ProtocolViolation:
    return ProtocolViolation(message, code)


def _schema(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, CloseCode.INVALID_PAYLOAD)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


# --- JSON bodies ---------------------------------------------------------------------------


def _int_field(obj: Mapping[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _schema(f"{what}: {key!r} must be an integer in {lo}..{hi}")
    return value


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise _schema(f"{what} contains NUL")
    return value


def _parse_open(obj: Mapping[str, Any]) -> Open:
    command = obj.get("command", _MISSING)
    if command is _MISSING:
        raise _schema("OPEN: 'command' is required (null for a login shell)")
    argv: tuple[str, ...] | None
    if command is None:
        argv = None
    else:
        if (not isinstance(command, list) or not 1 <= len(command) <= MAX_ARGV
                or not all(isinstance(a, str) for a in command)):
            raise _schema(f"OPEN: 'command' must be null or 1..{MAX_ARGV} strings")
        argv = tuple(_no_nul(a, "OPEN command") for a in command)
    tty = obj.get("tty")
    if not isinstance(tty, bool):
        raise _schema("OPEN: 'tty' must be a boolean")
    size = obj.get("size")
    if not isinstance(size, dict):
        raise _schema("OPEN: 'size' must be an object")
    cols = _int_field(size, "cols", "OPEN.size", 1, MAX_TERMINAL_SIZE)
    rows = _int_field(size, "rows", "OPEN.size", 1, MAX_TERMINAL_SIZE)
    env_obj = obj.get("env", {})
    if env_obj is None:
        env_obj = {}
    if not isinstance(env_obj, dict) or len(env_obj) > MAX_ENV:
        raise _schema(f"OPEN: 'env' must be an object of at most {MAX_ENV} entries")
    env: list[tuple[str, str]] = []
    for name, value in env_obj.items():
        if not _ENV_NAME.match(name) or not isinstance(value, str):
            raise _schema(f"OPEN: bad env entry {name!r}")
        env.append((name, _no_nul(value, "OPEN env value")))
    cwd = obj.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
        raise _schema("OPEN: 'cwd' must be an absolute path or null")
    if cwd is not None:
        _no_nul(cwd, "OPEN cwd")
    window = obj.get("window", DEFAULT_WINDOW)
    if not _is_int(window) or not 1 <= window <= MAX_WINDOW:
        raise _schema(f"OPEN: 'window' must be an integer in 1..{MAX_WINDOW}")
    return Open(command=argv, tty=tty, cols=cols, rows=rows, env=tuple(env), cwd=cwd,
                window=window, session=_session_label(obj, "OPEN"))


def _session_label(obj: Mapping[str, Any], what: str) -> str | None:
    label = obj.get("session")
    if label is None:
        return None
    if not isinstance(label, str) or not _SESSION_LABEL.match(label):
        raise _schema(f"{what}: 'session' must be 1..128 characters [A-Za-z0-9._-]")
    return label


def _open_body(event: Open) -> bytes:
    obj: dict[str, Any] = {
        "command": None if event.command is None else list(event.command),
        "tty": event.tty,
        "size": {"cols": event.cols, "rows": event.rows},
        "env": dict(event.env),
        "cwd": event.cwd,
        "window": event.window,
    }
    if event.session is not None:
        obj["session"] = event.session
    if len({name for name, _ in event.env}) != len(event.env):
        raise LocalProtocolError("invalid OPEN: duplicate env names")
    body = _json(obj)
    try:
        # Encode only what we would accept: one schema for both directions.
        _parse_open(json.loads(body))
    except ProtocolViolation as exc:
        raise LocalProtocolError(f"invalid OPEN: {exc.message}") from None
    return body


def _parse_resume(obj: Mapping[str, Any], from_agent: bool) -> Resume:
    streams = obj.get("streams")
    if not isinstance(streams, list):
        raise _schema("RESUME: 'streams' must be a list")
    next_id: int | None = None
    if from_agent:
        next_id = _int_field(obj, "next_id", "RESUME", 1, MAX_STREAM_ID)
    elif obj.get("next_id") is not None:
        raise _schema("RESUME: 'next_id' is sent by the agent only")
    entries: list[ResumeEntry] = []
    seen: set[int] = set()
    for item in streams:
        if not isinstance(item, dict):
            raise _schema("RESUME: a stream entry is not an object")
        sid = _int_field(item, "id", "RESUME stream", 1, MAX_STREAM_ID)
        if sid in seen:
            raise _schema(f"RESUME: stream {sid} listed twice")
        if next_id is not None and sid >= next_id:
            raise _schema(f"RESUME: stream {sid} not below next_id {next_id}")
        seen.add(sid)
        out_start = _int_field(item, "out_start", "RESUME stream", 0, MAX_OFFSET)
        out_offset = _int_field(item, "out_offset", "RESUME stream", 0, MAX_OFFSET)
        if out_start > out_offset:
            raise _schema(f"RESUME: stream {sid} out_start after out_offset")
        entries.append(ResumeEntry(
            stream_id=sid,
            window=_int_field(item, "window", "RESUME stream", 1, MAX_WINDOW),
            out_start=out_start,
            out_offset=out_offset,
            in_acked=_int_field(item, "in_acked", "RESUME stream", 0, MAX_OFFSET),
            # Only an agent's entries are labelled; a gateway's label is ignored.
            session=_session_label(item, "RESUME stream") if from_agent else None,
        ))
    return Resume(streams=tuple(entries), next_id=next_id)


def _resume_body(event: Resume, from_agent: bool) -> bytes:
    streams: list[dict[str, Any]] = []
    for e in event.streams:
        item: dict[str, Any] = {"id": e.stream_id, "window": e.window,
                                "out_start": e.out_start, "out_offset": e.out_offset,
                                "in_acked": e.in_acked}
        if from_agent and e.session is not None:
            item["session"] = e.session
        streams.append(item)
    obj: dict[str, Any] = {"streams": streams}
    if from_agent:
        obj["next_id"] = event.next_id
    body = _json(obj)
    try:
        _parse_resume(json.loads(body), from_agent)
    except ProtocolViolation as exc:
        raise LocalProtocolError(f"invalid RESUME: {exc.message}") from None
    return body


_MISSING: Final = object()


# --- the codec -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelCodecStatistics:
    messages: int
    ignored: int  # empty data, zero resize, unknown control types


class TunnelCodec:
    """Encode and decode tunnel messages for one side of one tunnel connection.

    Args:
        role: which side we are; we decode what the *other* role sends.

    ``receive_message`` returns ``[(stream_id, event)]`` (empty for an ignored
    message).  Events: :class:`Stdin`, :class:`Stdout`, :class:`Stderr`,
    :class:`Exit`, :class:`Resize`, :class:`Ack`, :class:`Open`, :class:`Close`,
    :class:`Resume` (stream 0), :class:`ErrorMsg`, :class:`Drain` (stream 0),
    :class:`Gap`.
    """

    __slots__ = ("role", "_accepts", "_controls", "_resumed", "_messages", "_ignored")

    def __init__(self, role: TunnelRole) -> None:
        self.role = role
        self._accepts = _SENDS[_peer(role)]
        self._controls = _CONTROL_SENDS[_peer(role)]
        self._resumed = False
        self._messages = 0
        self._ignored = 0

    def __repr__(self) -> str:
        return (f"<TunnelCodec {self.role.value} resumed={self._resumed}"
                f" messages={self._messages}>")

    @property
    def resumed(self) -> bool:
        """True once the peer's RESUME has been received."""
        return self._resumed

    def statistics(self) -> TunnelCodecStatistics:
        return TunnelCodecStatistics(self._messages, self._ignored)

    def receive_message(self, opcode: int, payload: Buffer) -> list[StreamEvent]:
        """Decode one whole tunnel message (see the module docstring for the rules).

        Raises:
            ProtocolViolation: with the close code of the rule broken.
            LocalProtocolError: ``opcode`` is not a data opcode (a caller bug).
        """
        if opcode == OP_TEXT:
            raise _bad("tunnel messages are binary; got a text message",
                       CloseCode.UNSUPPORTED_DATA)
        if opcode != OP_BINARY:
            raise LocalProtocolError(f"opcode {opcode} is not a data message")
        n = len(payload)
        if n < HEADER_SIZE:
            raise _bad(f"tunnel message of {n} bytes is shorter than its 5-byte header")
        kind, sid = HEADER.unpack_from(payload, 0)
        if kind > TunnelType.RESUME:
            raise _bad(f"unknown tunnel message type 0x{kind:02x}", CloseCode.UNSUPPORTED_DATA)
        if kind not in self._accepts:
            raise _bad(f"{TunnelType(kind).name} is not sent by the {_peer(self.role).value}",
                       CloseCode.UNSUPPORTED_DATA)
        if kind == TunnelType.RESUME:
            if sid != 0:
                raise _bad(f"RESUME on stream {sid}; it belongs to stream 0")
            if self._resumed:
                raise _bad("second RESUME on one connection")
        elif kind != TunnelType.CONTROL and sid == 0:
            raise _bad(f"{TunnelType(kind).name} on stream 0")
        if not self._resumed and kind != TunnelType.RESUME and not (
                kind == TunnelType.CONTROL and sid == 0):
            raise _bad(f"{TunnelType(kind).name} before RESUME")
        body = n - HEADER_SIZE
        if kind <= TunnelType.STDERR:
            if body > MAX_DATA_BYTES:
                raise _bad(f"{TunnelType(kind).name} payload of {body} bytes over {MAX_DATA_BYTES}",
                           CloseCode.MESSAGE_TOO_BIG)
        else:
            limit = _JSON_LIMITS.get(TunnelType(kind))
            if limit is not None and body > limit:
                raise _bad(f"{TunnelType(kind).name} payload of {body} bytes over {limit}",
                           CloseCode.MESSAGE_TOO_BIG)
        self._messages += 1
        event = self._decode(kind, sid, payload)
        if event is None:
            self._ignored += 1
            return []
        if isinstance(event, Resume):
            self._resumed = True
        return [(sid, event)]

    def _decode(self, kind: int, sid: int, payload: Buffer) -> Event | None:
        if kind <= TunnelType.STDERR:
            if len(payload) == HEADER_SIZE:
                return None  # carries no offset: ignored, as in podterm.v1
            data = slice_data(payload, HEADER_SIZE)
            return (Stdin(data) if kind == TunnelType.STDIN
                    else Stdout(data) if kind == TunnelType.STDOUT else Stderr(data))
        if kind == TunnelType.ACK:
            return parse_ack(payload, HEADER_SIZE)
        if kind == TunnelType.RESIZE:
            return parse_resize(payload, HEADER_SIZE)
        if kind == TunnelType.EXIT:
            return parse_exit(payload, HEADER_SIZE)
        if kind == TunnelType.CONTROL:
            event = parse_control(payload, HEADER_SIZE, self._controls, _TUNNEL_CONTROLS)
            if isinstance(event, Drain) and sid != 0:
                raise _bad("drain belongs to stream 0")
            if isinstance(event, Gap) and sid == 0:
                raise _bad("gap on stream 0")
            return event
        obj = load_json_object(payload, HEADER_SIZE, TunnelType(kind).name)
        if kind == TunnelType.OPEN:
            return _parse_open(obj)
        if kind == TunnelType.CLOSE:
            reason = obj.get("reason")
            if not isinstance(reason, str):
                raise _schema("CLOSE: 'reason' must be a string")
            return Close(reason)
        return _parse_resume(obj, from_agent=self.role is TunnelRole.GATEWAY)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, stream_id: int, event: Event) -> OutMessage:
        """Encode ``event`` on ``stream_id`` as this role sends it.

        Raises:
            LocalProtocolError: this role never sends the event, the stream id is
                wrong for it, or the payload breaks a limit the peer enforces.
        """
        kind = _event_type(event)
        if kind not in _SENDS[self.role]:
            raise LocalProtocolError(f"the {self.role.value} does not send {type(event).__name__}")
        if not 0 <= stream_id <= MAX_STREAM_ID:
            raise LocalProtocolError(f"stream id {stream_id} is not a u32")
        if kind == TunnelType.RESUME:
            if stream_id != 0:
                raise LocalProtocolError("RESUME goes on stream 0")
        elif kind != TunnelType.CONTROL and stream_id == 0:
            raise LocalProtocolError(f"{kind.name} needs a stream id ≥ 1")
        prefix = HEADER.pack(kind, stream_id)
        body: Buffer
        if isinstance(event, Stdin | Stdout | Stderr):
            if not 0 < len(event.data) <= MAX_DATA_BYTES:
                raise LocalProtocolError(f"data of {len(event.data)} bytes (1..{MAX_DATA_BYTES})")
            body = event.data
        elif isinstance(event, Ack):
            if not 0 <= event.offset <= MAX_OFFSET:
                raise LocalProtocolError(f"offset {event.offset} is not a u64")
            body = struct.pack(">Q", event.offset)
        elif isinstance(event, Resize):
            if not (1 <= event.cols <= MAX_TERMINAL_SIZE and 1 <= event.rows <= MAX_TERMINAL_SIZE):
                raise LocalProtocolError(f"size {event.cols}x{event.rows} outside 1..10000")
            body = struct.pack(">HH", event.cols, event.rows)
        elif isinstance(event, Exit):
            body = encode_exit(event.code, event.signal, event.reason)[1]
        elif isinstance(event, Open):
            body = _open_body(event)
        elif isinstance(event, Close):
            body = _json({"reason": event.reason})
        elif isinstance(event, Resume):
            body = _resume_body(event, from_agent=self.role is TunnelRole.AGENT)
        else:
            name = _control_name(event)
            if name not in _CONTROL_SENDS[self.role]:
                raise LocalProtocolError(f"the {self.role.value} does not send {name!r}")
            if (name == "drain") != (stream_id == 0) and name != "error":
                raise LocalProtocolError(f"{name!r} on the wrong stream ({stream_id})")
            body = control_body(event)
        limit = _JSON_LIMITS.get(kind)
        if limit is not None and len(body) > limit:
            raise LocalProtocolError(f"{kind.name} of {len(body)} bytes over {limit}")
        return prefix, body

    # Convenience encoders.
    def stdin(self, stream_id: int, data: Buffer) -> OutMessage:
        return self.encode(stream_id, Stdin(bytes(data) if not isinstance(data, bytes) else data))

    def stdout(self, stream_id: int, data: bytes) -> OutMessage:
        return self.encode(stream_id, Stdout(data))

    def stderr(self, stream_id: int, data: bytes) -> OutMessage:
        return self.encode(stream_id, Stderr(data))

    def ack(self, stream_id: int, offset: int) -> OutMessage:
        return self.encode(stream_id, Ack(offset))

    def close(self, stream_id: int, reason: str) -> OutMessage:
        return self.encode(stream_id, Close(reason))


def _event_type(event: Event) -> TunnelType:
    if isinstance(event, Stdin):
        return TunnelType.STDIN
    if isinstance(event, Stdout):
        return TunnelType.STDOUT
    if isinstance(event, Stderr):
        return TunnelType.STDERR
    if isinstance(event, Exit):
        return TunnelType.EXIT
    if isinstance(event, Resize):
        return TunnelType.RESIZE
    if isinstance(event, Ack):
        return TunnelType.ACK
    if isinstance(event, Open):
        return TunnelType.OPEN
    if isinstance(event, Close):
        return TunnelType.CLOSE
    if isinstance(event, Resume):
        return TunnelType.RESUME
    if isinstance(event, ErrorMsg | Drain | Gap):
        return TunnelType.CONTROL
    raise LocalProtocolError(f"{type(event).__name__} has no tunnel encoding")


def _control_name(event: Event) -> str:
    if isinstance(event, ErrorMsg):
        return "error"
    if isinstance(event, Drain):
        return "drain"
    return "gap"


# --- the multiplexer bookkeeping ------------------------------------------------------------


class ResumeAction(Enum):
    RESUME = "resume"  # listed by both: resend per ``replay``
    CLOSE = "close"  # gateway: the agent listed it, we do not want it: send CLOSE now
    UNLISTED = "unlisted"  # agent: the gateway did not list it: a CLOSE is coming; send nothing


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """What to do with one stream after the RESUME exchange.

    For RESUME: send CONTROL ``gap`` first if ``replay.gap_from`` is set, then
    resend ``[replay.start, replay.end)`` of the outgoing stream (credit
    permitting), then carry on.
    """

    stream_id: int
    action: ResumeAction
    replay: ReplayRange | None = None


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    stream_id: int
    window: int
    sent: int  # outgoing offset
    acked: int  # the peer's latest ACK
    credit: int
    received: int  # incoming offset
    buffered: int  # received, not yet consumed
    ack_sent: int  # the latest ACK we sent (or the resume point)
    local_closed: bool
    remote_closed: bool


@dataclass(frozen=True, slots=True)
class TunnelStatistics:
    streams: int
    next_id: int
    credit_blocked: int  # streams with data allowed but no credit right now
    buffered: int  # received bytes not yet consumed, all streams


class _Stream:
    __slots__ = ("stream_id", "window", "out", "ack", "received", "buffered", "local_closed",
                 "remote_closed", "resumed", "out_start", "out_offset", "label")

    def __init__(self, stream_id: int, window: int, *, received: int = 0, buffered: int = 0,
                 interval_s: float = DEFAULT_ACK_INTERVAL_S) -> None:
        self.stream_id = stream_id
        self.window = window
        self.out = AckWindow(window)
        self.received = received
        self.buffered = buffered
        self.ack = AckScheduler(window, start=received, interval_s=interval_s)
        self.ack.position = received - buffered
        self.local_closed = False
        self.remote_closed = False
        self.resumed = True
        self.out_start = 0
        self.out_offset = 0
        self.label: str | None = None  # the session label (the agent's RESUME carries it)

    def credit(self) -> int:
        if self.local_closed or not self.resumed:
            return 0
        return self.out.credit()


class TunnelMux:
    """Per-stream flow-control, close and resume bookkeeping for one side of a tunnel.

    Pure: it is told what was sent, received and consumed, and answers with
    credit, due ACKs and resume plans.  It lives as long as the side's streams
    (across tunnel reconnects); call :meth:`disconnected` when a connection ends.

    Credit is per stream (the module docstring, "Offsets and credit"), so a
    stream whose consumer stalls runs out of credit alone, and the receiver's
    memory per stream is bounded by its window: the link is never blocked.
    :meth:`plan_sends` shares the link fairly between the streams that have
    both data and credit.

    Args:
        role: our side.
        default_window: window for streams opened without one.
        ack_interval_s: the ACK timer bound (§6: 100 ms).
    """

    __slots__ = ("role", "default_window", "ack_interval_s", "_streams", "next_id",
                 "_rotation", "_resume_sent")

    def __init__(self, role: TunnelRole, *, default_window: int = DEFAULT_WINDOW,
                 ack_interval_s: float = DEFAULT_ACK_INTERVAL_S) -> None:
        self.role = role
        self.default_window = default_window
        self.ack_interval_s = ack_interval_s
        self._streams: dict[int, _Stream] = {}
        #: Lowest id a new OPEN may use (the gateway allocates from it; the agent enforces it).
        self.next_id = 1
        self._rotation = 0  # the stream id served last by plan_sends
        self._resume_sent = False

    def __repr__(self) -> str:
        return f"<TunnelMux {self.role.value} streams={len(self._streams)} next_id={self.next_id}>"

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    @property
    def stream_ids(self) -> list[int]:
        return sorted(self._streams)

    def statistics(self) -> TunnelStatistics:
        return TunnelStatistics(
            streams=len(self._streams), next_id=self.next_id,
            credit_blocked=sum(1 for s in self._streams.values()
                               if not s.local_closed and s.resumed and s.out.credit() == 0),
            buffered=sum(s.buffered for s in self._streams.values()))

    def stream_statistics(self, stream_id: int) -> StreamStatistics:
        s = self._get_local(stream_id)
        return StreamStatistics(stream_id, s.window, s.out.sent, s.out.acked, s.credit(),
                                s.received, s.buffered, s.ack.acked, s.local_closed,
                                s.remote_closed)

    def _get_local(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"no stream {stream_id}")
        return stream

    def _get_remote(self, stream_id: int, what: str) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise _bad(f"{what} for unknown stream {stream_id}")
        if stream.remote_closed:
            raise _bad(f"{what} on stream {stream_id} after the peer closed it")
        return stream

    # -- opening --------------------------------------------------------------------------

    def open_stream(self, stream_id: int | None = None, *, window: int | None = None) -> int:
        """Gateway: register a new stream before sending its OPEN; return its id.

        Raises:
            LocalProtocolError: not the gateway, or ``stream_id`` below ``next_id``.
        """
        if self.role is not TunnelRole.GATEWAY:
            raise LocalProtocolError("only the gateway opens streams")
        sid = self.next_id if stream_id is None else stream_id
        if not self.next_id <= sid <= MAX_STREAM_ID:
            raise LocalProtocolError(f"stream id {sid} below next_id {self.next_id}")
        self._add(sid, window or self.default_window)
        return sid

    def _add(self, sid: int, window: int) -> _Stream:
        stream = _Stream(sid, window, interval_s=self.ack_interval_s)
        self._streams[sid] = stream
        self.next_id = max(self.next_id, sid + 1)
        return stream

    # -- sending ------------------------------------------------------------------------

    def credit(self, stream_id: int) -> int:
        """Bytes of data that may be sent on the stream now (0 if closed or not resumed)."""
        return self._get_local(stream_id).credit()

    def can_send(self, stream_id: int, n: int) -> bool:
        return n <= self.credit(stream_id)

    def sent(self, stream_id: int, event: Event) -> None:
        """Record that ``event`` was sent on ``stream_id``.

        Raises:
            LocalProtocolError: data beyond the stream's credit, anything after
                our own CLOSE, or an unknown stream.
        """
        stream = self._get_local(stream_id)
        if stream.local_closed:
            raise LocalProtocolError(f"stream {stream_id} is closed on our side")
        if isinstance(event, Stdin | Stdout | Stderr):
            if not stream.resumed:
                raise LocalProtocolError(f"stream {stream_id} has not been resumed")
            stream.out.on_send(len(event.data))
        elif isinstance(event, Close):
            stream.local_closed = True
            if stream.remote_closed:
                self._forget(stream_id)

    def plan_sends(self, pending: Mapping[int, int], *,
                   quantum: int = 32 * 1024) -> list[tuple[int, int]]:
        """One fair round: ``[(stream_id, n)]`` to send now, given bytes waiting per stream.

        Each stream with data and credit gets up to ``quantum`` bytes, in
        round-robin order starting after the stream served first last time, so
        a stream with megabytes waiting never delays one with a keystroke.
        Nothing is recorded: call :meth:`sent` for what is actually sent.
        """
        ids = sorted(sid for sid, n in pending.items() if n > 0 and sid in self._streams)
        if not ids:
            return []
        first = next((i for i, sid in enumerate(ids) if sid > self._rotation), 0)
        order = ids[first:] + ids[:first]
        plan: list[tuple[int, int]] = []
        for sid in order:
            n = min(pending[sid], self._streams[sid].credit(), quantum)
            if n > 0:
                plan.append((sid, n))
        if plan:
            self._rotation = plan[0][0]
        return plan

    # -- receiving ----------------------------------------------------------------------

    def received(self, stream_id: int, event: Event) -> bool:
        """Account for a decoded event; return False if it must be dropped.

        Drops are messages that were in flight when we closed the stream.

        Raises:
            ProtocolViolation: 1002 for an unknown stream, a message after the
                peer's CLOSE, an OPEN below ``next_id`` or for a live stream,
                data beyond the stream's window, a bad ACK or a gap that does not
                start at the received offset.
        """
        if stream_id == 0:
            if isinstance(event, Resume):
                raise LocalProtocolError("pass RESUME to apply_resume()")
            return True
        if isinstance(event, Open):
            if self.role is not TunnelRole.AGENT:
                raise LocalProtocolError("the gateway does not receive OPEN")
            if stream_id < self.next_id or stream_id in self._streams:
                raise _bad(f"OPEN for stream {stream_id} below next_id {self.next_id} or live")
            self._add(stream_id, event.window)
            return True
        stream = self._get_remote(stream_id, type(event).__name__)
        if isinstance(event, Stdin | Stdout | Stderr):
            n = len(event.data)
            stream.received += n
            if stream.received - stream.ack.acked > stream.window:
                raise _bad(f"stream {stream_id} exceeded its credit window of {stream.window}")
            if stream.local_closed:
                return False
            stream.buffered += n
            return True
        if isinstance(event, Ack):
            if stream.local_closed:
                return False
            stream.out.on_ack(event.offset)
            return True
        if isinstance(event, Close):
            stream.remote_closed = True
            if stream.local_closed:
                self._forget(stream_id)
            return True
        if isinstance(event, Gap):
            if event.from_offset != stream.received:
                raise _bad(f"gap on stream {stream_id} from {event.from_offset}, "
                           f"expected {stream.received}")
            # The lost bytes will never arrive: the peer's credit now counts from
            # ``to``, and the ACK position jumps with the received offset.
            stream.received = event.to_offset
            stream.ack.rebase(event.to_offset)
            stream.ack.position = stream.received - stream.buffered
            return not stream.local_closed
        return not stream.local_closed

    def consumed(self, stream_id: int, n: int, now: float) -> int | None:
        """``n`` received bytes left our buffer; return the offset to ACK now, or None."""
        stream = self._get_local(stream_id)
        if not 0 <= n <= stream.buffered:
            raise LocalProtocolError(f"consumed {n} of {stream.buffered} buffered bytes")
        stream.buffered -= n
        if stream.local_closed:
            return None
        return stream.ack.update(stream.received - stream.buffered, now)

    def ack_now(self, stream_id: int, now: float) -> int | None:
        """The offset to ACK on ``stream_id`` now, timer or not (None: nothing unacknowledged).

        For a sender that writes to the stream anyway: the ACK rides in the same
        write instead of one of its own when the timer comes (§6 sets only the
        longest an ACK may wait).
        """
        stream = self._get_local(stream_id)
        if stream.local_closed:
            return None
        return stream.ack.flush(now)

    def poll_acks(self, now: float) -> list[tuple[int, int]]:
        """Timer: ``[(stream_id, offset)]`` ACKs due now."""
        due: list[tuple[int, int]] = []
        for sid, stream in self._streams.items():
            if stream.local_closed:
                continue
            offset = stream.ack.poll(now)
            if offset is not None:
                due.append((sid, offset))
        return due

    def poll_acks_of(self, waiting: set[int], now: float) -> dict[int, int]:
        """Timer for just the streams in ``waiting``: ``{stream_id: offset}`` ACKs due now.

        Unlike :meth:`poll_acks` this touches only the streams a caller has marked,
        so a timer tick costs nothing for idle streams.  Every stream that no longer
        needs the timer is removed from ``waiting``: gone, ACKed now, or with
        nothing consumed left unacknowledged.
        """
        due: dict[int, int] = {}
        for sid in list(waiting):
            if sid not in self:
                waiting.discard(sid)
                continue
            offset = self.consumed(sid, 0, now)
            if offset is not None:
                due[sid] = offset
                waiting.discard(sid)
            else:
                stats = self.stream_statistics(sid)
                if stats.ack_sent >= stats.received - stats.buffered:
                    waiting.discard(sid)  # nothing consumed is unacknowledged
        return due

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`poll_acks` has something to return (None: never)."""
        deadlines = [d for s in self._streams.values()
                     if not s.local_closed and (d := s.ack.deadline()) is not None]
        return min(deadlines) if deadlines else None

    def _forget(self, stream_id: int) -> None:
        del self._streams[stream_id]

    # -- reconnect ------------------------------------------------------------------------

    def disconnected(self) -> None:
        """The tunnel connection ended: forget half-closed streams, hold the rest for RESUME.

        A stream either side had closed is dropped (the peer does the same, so
        it never appears in a RESUME); the others lose their credit until
        :meth:`apply_resume`.
        """
        for sid in [sid for sid, s in self._streams.items() if s.local_closed or s.remote_closed]:
            self._forget(sid)
        for stream in self._streams.values():
            stream.resumed = False
        self._resume_sent = False

    def make_resume(self, entries: Iterable[ResumeEntry]) -> Resume:
        """Build our RESUME from the caller's offsets and (re)register those streams.

        Streams held but not in ``entries`` are forgotten.  A stream's received
        bytes still buffered are kept (they are not acknowledged again).  The
        agent's ``next_id`` is this mux's.

        Raises:
            LocalProtocolError: duplicate ids, ids at or above ``next_id``
                (agent), or ``out_start > out_offset``.
        """
        new: dict[int, _Stream] = {}
        for e in entries:
            if e.stream_id in new or not 1 <= e.stream_id <= MAX_STREAM_ID:
                raise LocalProtocolError(f"bad or duplicate stream {e.stream_id} in RESUME")
            if e.out_start > e.out_offset:
                raise LocalProtocolError(f"stream {e.stream_id}: out_start after out_offset")
            old = self._streams.get(e.stream_id)
            buffered = old.buffered if old is not None else 0
            if buffered > e.in_acked:
                raise LocalProtocolError(f"stream {e.stream_id}: in_acked below buffered bytes")
            stream = _Stream(e.stream_id, e.window, received=e.in_acked, buffered=buffered,
                             interval_s=self.ack_interval_s)
            stream.resumed = False
            stream.out_start = e.out_start
            stream.out_offset = e.out_offset
            stream.label = e.session if self.role is TunnelRole.AGENT else None
            new[e.stream_id] = stream
            self.next_id = max(self.next_id, e.stream_id + 1)
        self._streams = new
        self._resume_sent = True
        return Resume(streams=tuple(
            ResumeEntry(s.stream_id, s.window, s.out_start, s.out_offset, s.received, s.label)
            for s in sorted(new.values(), key=lambda s: s.stream_id)),
            next_id=self.next_id if self.role is TunnelRole.AGENT else None)

    def apply_resume(self, peer: Resume) -> list[ResumePlan]:
        """Apply the peer's RESUME (after :meth:`make_resume`); return a plan per stream.

        Raises:
            ProtocolViolation: 1002 if the gateway lists a stream the agent did
                not, a window differs, or the peer's ``in_acked`` is beyond what
                we produced.
            LocalProtocolError: called before :meth:`make_resume`, or the
                gateway listed a stream the agent did not.
        """
        if not self._resume_sent:
            raise LocalProtocolError("make_resume() first")
        plans: list[ResumePlan] = []
        listed = {e.stream_id for e in peer.streams}
        if self.role is TunnelRole.GATEWAY:
            self.next_id = max(self.next_id, peer.next_id or 1)
            extra = set(self._streams) - listed
            if extra:
                raise LocalProtocolError(f"our RESUME lists streams the agent lost: {sorted(extra)}")
        for e in peer.streams:
            stream = self._streams.get(e.stream_id)
            if stream is None:
                if self.role is TunnelRole.AGENT:
                    raise _bad(f"gateway RESUME lists stream {e.stream_id} we do not have")
                # The agent holds a stream we do not want: register it so CLOSE can be sent.
                stream = _Stream(e.stream_id, e.window, received=e.out_offset,
                                 interval_s=self.ack_interval_s)
                stream.resumed = False
                self._streams[e.stream_id] = stream
                plans.append(ResumePlan(e.stream_id, ResumeAction.CLOSE))
                continue
            if e.window != stream.window:
                raise _bad(f"stream {e.stream_id}: window {e.window} differs from {stream.window}")
            replay = replay_range(e.in_acked, stream.out_start, stream.out_offset)
            stream.out.reset(replay.start)
            stream.resumed = True
            plans.append(ResumePlan(e.stream_id, ResumeAction.RESUME, replay))
        if self.role is TunnelRole.AGENT:
            plans.extend(ResumePlan(sid, ResumeAction.UNLISTED)
                         for sid in sorted(set(self._streams) - listed))
        plans.sort(key=lambda p: p.stream_id)
        return plans


__all__ = [
    "HEADER_SIZE", "MAX_OPEN_BYTES", "MAX_RESUME_BYTES", "MAX_STREAM_ID", "SUBPROTOCOL",
    "OutMessage", "ResumeAction", "ResumePlan", "StreamEvent", "StreamStatistics",
    "TunnelCodec", "TunnelCodecStatistics", "TunnelMux", "TunnelRole", "TunnelStatistics",
    "TunnelType",
]
