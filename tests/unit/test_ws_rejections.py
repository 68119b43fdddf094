"""Every frame the connection must reject, and the exact CLOSE it queues for it.

One rule per case (RFC 6455 section in the id).  Each case asserts three
things: the ConnectionFailed event (code and reason), the exact bytes of the
CLOSE frame queued for the wire, and that the connection is dead afterwards.
"""

from __future__ import annotations

import struct

import pytest

from podterm.errors import CloseCode
from podterm.protocol.frame import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameReader,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
)
from podterm.protocol.mask import mask
from podterm.protocol.websocket import (
    DEFAULT_LIMITS,
    ConnectionFailed,
    ConnectionState,
    Role,
    WebSocketConnection,
    WsLimits,
)

KEY = b"\x11\x22\x33\x44"
P, U, B = CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_PAYLOAD, CloseCode.MESSAGE_TOO_BIG  # 1002, 1007, 1009
SMALL = WsLimits(max_frame_bytes=200, max_message_bytes=300)


def c(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked (client) frame."""
    return encode_frame(opcode, payload, fin=fin, mask_key=KEY)


def raw(b0: int, length: int, payload: bytes = b"", *, masked: bool = True) -> bytes:
    """A hand-built frame header (+ payload), for what encode_frame refuses to write."""
    mbit = 0x80 if masked else 0
    if length < 126:
        head = bytes((b0, mbit | length))
    elif length < 0x10000:
        head = struct.pack("!BBH", b0, mbit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, length)
    return head + (KEY + mask(payload, KEY) if masked else payload)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


# (id, role, wire bytes, expected code, expected reason)
CASES = [
    ("5.2-rsv1", Role.SERVER, raw(0xC2, 1, b"x"), P, "reserved bits set"),
    ("5.2-rsv2", Role.SERVER, raw(0xA2, 1, b"x"), P, "reserved bits set"),
    ("5.2-rsv3", Role.SERVER, raw(0x92, 1, b"x"), P, "reserved bits set"),
    ("5.2-opcode-3", Role.SERVER, raw(0x83, 0), P, "unknown opcode 0x3"),
    ("5.2-opcode-B", Role.SERVER, raw(0x8B, 0), P, "unknown opcode 0xb"),
    ("5.4-fragmented-ping", Role.SERVER, raw(0x09, 0), P, "fragmented control frame"),
    ("5.4-fragmented-close", Role.SERVER, raw(0x08, 0), P, "fragmented control frame"),
    ("5.4-continuation-first", Role.SERVER, c(OP_CONT, b"x"), P,
     "unexpected continuation frame"),
    ("5.4-new-message-mid-fragment", Role.SERVER,
     c(OP_TEXT, b"a", fin=False) + c(OP_BINARY, b"b"), P, "expected continuation frame"),
    ("5.1-unmasked-client-frame", Role.SERVER, raw(0x82, 1, b"x", masked=False), P,
     "unmasked client frame"),
    ("5.1-masked-server-frame", Role.CLIENT, raw(0x82, 1, b"x"), P, "masked server frame"),
    ("5.5-ping-126-bytes", Role.SERVER, raw(0x89, 126, bytes(126)), P,
     "control frame too long"),
    ("5.5-close-126-bytes", Role.SERVER, raw(0x88, 126, bytes(126)), P,
     "control frame too long"),
    ("5.2-length-msb-set", Role.SERVER,
     bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 63) + KEY, P, "frame length too large"),
    ("5.7-close-1-byte", Role.SERVER, c(OP_CLOSE, b"\x03"), P, "close frame with 1-byte payload"),
    ("7.4-close-code-999", Role.SERVER, c(OP_CLOSE, close_payload(999)), P, "invalid close code"),
    ("7.4-close-code-1004", Role.SERVER, c(OP_CLOSE, close_payload(1004)), P,
     "invalid close code"),
    ("7.4-close-code-1005", Role.SERVER, c(OP_CLOSE, close_payload(1005)), P,
     "invalid close code"),
    ("7.4-close-code-1006", Role.SERVER, c(OP_CLOSE, close_payload(1006)), P,
     "invalid close code"),
    ("7.4-close-code-1015", Role.SERVER, c(OP_CLOSE, close_payload(1015)), P,
     "invalid close code"),
    ("7.4-close-code-2999", Role.SERVER, c(OP_CLOSE, close_payload(2999)), P,
     "invalid close code"),
    ("7.4-close-code-5000", Role.SERVER, c(OP_CLOSE, close_payload(5000)), P,
     "invalid close code"),
    ("8.1-text-invalid-utf8", Role.SERVER, c(OP_TEXT, b"ok\xff"), U,
     "invalid UTF-8 in text message"),
    ("8.1-text-surrogate", Role.SERVER, c(OP_TEXT, b"\xed\xa0\x80"), U,
     "invalid UTF-8 in text message"),
    ("8.1-text-overlong", Role.SERVER, c(OP_TEXT, b"\xc0\xaf"), U,
     "invalid UTF-8 in text message"),
    ("8.1-text-invalid-across-fragments", Role.SERVER,
     c(OP_TEXT, b"\xe2\x82", fin=False) + c(OP_CONT, b"A"), U, "invalid UTF-8 in text message"),
    ("8.1-text-ends-mid-character", Role.SERVER,
     c(OP_TEXT, b"\xe2\x82", fin=False) + c(OP_CONT, b""), U, "invalid UTF-8 in text message"),
    ("8.1-text-server-frame-invalid", Role.CLIENT, encode_frame(OP_TEXT, b"\xfe"), U,
     "invalid UTF-8 in text message"),
    ("7.1.6-close-reason-invalid-utf8", Role.SERVER, c(OP_CLOSE, close_payload(1000, b"\xff")),
     U, "invalid UTF-8 in close reason"),
]


def _connection(role: Role, limits: WsLimits = DEFAULT_LIMITS) -> WebSocketConnection:
    if role is Role.CLIENT:
        return WebSocketConnection(role, limits=limits, mask_key_source=lambda: KEY)
    return WebSocketConnection(role, limits=limits)


def _expected_close(role: Role, code: int, reason: str) -> bytes:
    return encode_frame(OP_CLOSE, encode_close_payload(code, reason),
                        mask_key=KEY if role is Role.CLIENT else None)


def _assert_failed(conn: WebSocketConnection, events: list, code: int, reason: str) -> None:  # type: ignore[type-arg]
    assert events[-1] == ConnectionFailed(code, reason)
    wire = conn.data_to_send()
    assert wire == _expected_close(conn.role, code, reason)
    # And the peer reads exactly that code from it.
    [(opcode, payload)] = FrameReader(is_server=conn.role is Role.CLIENT).feed(wire)
    assert opcode == OP_CLOSE and parse_close_payload(payload) == (code, reason)
    assert conn.state is ConnectionState.CLOSED
    assert conn.receive_data(c(OP_BINARY, b"more")) == []
    assert conn.data_to_send() == b""  # one CLOSE, never two


@pytest.mark.parametrize(("role", "wire", "code", "reason"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_rejected_frame_is_closed_with_its_code(role: Role, wire: bytes, code: int,
                                                reason: str) -> None:
    conn = _connection(role)
    _assert_failed(conn, conn.receive_data(wire), code, reason)


@pytest.mark.parametrize(("role", "wire", "code", "reason"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_rejected_frame_fed_byte_by_byte(role: Role, wire: bytes, code: int, reason: str) -> None:
    conn = _connection(role)
    events = []
    for i in range(len(wire)):
        events += conn.receive_data(wire[i:i + 1])
        if events:
            break
    _assert_failed(conn, events, code, reason)


def test_frame_over_max_frame_bytes_is_1009() -> None:
    conn = _connection(Role.SERVER, SMALL)
    assert conn.receive_data(c(OP_BINARY, bytes(200))) == [(OP_BINARY, bytes(200))]
    # Rejected from the header alone: the 201 payload bytes never need to arrive.
    header_only = c(OP_BINARY, bytes(201))[:8]
    _assert_failed(conn, conn.receive_data(header_only), B, "frame too big")


def test_message_over_max_message_bytes_is_1009() -> None:
    conn = _connection(Role.SERVER, SMALL)
    wire = c(OP_BINARY, bytes(150), fin=False) + c(OP_CONT, bytes(150), fin=False)
    assert conn.receive_data(wire) == []
    _assert_failed(conn, conn.receive_data(c(OP_CONT, b"x")), B, "message too big")


def test_default_limit_is_one_mib() -> None:
    conn = _connection(Role.SERVER)
    header = bytes((0x82, 0xFF)) + struct.pack("!Q", (1 << 20) + 1) + KEY
    _assert_failed(conn, conn.receive_data(header), B, "frame too big")


def test_invalid_utf8_fails_before_the_frame_is_complete() -> None:
    conn = _connection(Role.SERVER)
    wire = c(OP_TEXT, b"abc\xff" + bytes(1000))
    # Header (2 + 2 + 4 bytes) and the first four payload bytes only.
    _assert_failed(conn, conn.receive_data(wire[:12]), U, "invalid UTF-8 in text message")


def test_messages_before_the_violation_are_delivered_first() -> None:
    conn = _connection(Role.SERVER)
    wire = c(OP_BINARY, b"one") + c(OP_PING, b"p") + c(OP_TEXT, b"two") + raw(0xC2, 0)
    events = conn.receive_data(wire)
    assert events[:3] == [(OP_BINARY, b"one"), (OP_PING, b"p"), (OP_TEXT, b"two")]
    wire_out = conn.data_to_send()
    # The PONG for the ping goes out before the failing CLOSE.
    frames = FrameReader(is_server=False).feed(wire_out)
    assert frames == [(0xA, b"p"), (OP_CLOSE, encode_close_payload(P, "reserved bits set"))]
    assert events[3] == ConnectionFailed(P, "reserved bits set")


def test_violation_after_our_close_queues_no_second_close() -> None:
    conn = _connection(Role.SERVER)
    conn.send_close(1000)
    events = conn.receive_data(raw(0x82, 1, b"x", masked=False))
    assert events == [ConnectionFailed(P, "unmasked client frame")]
    assert conn.data_to_send() == b""
    assert conn.state is ConnectionState.CLOSED


def test_violation_after_peer_close_in_same_read_is_ignored() -> None:
    conn = _connection(Role.SERVER)
    events = conn.receive_data(c(OP_CLOSE, close_payload(1000)) + raw(0xC2, 0))
    assert [type(e).__name__ for e in events] == ["CloseReceived"]
    assert conn.data_to_send() == encode_frame(OP_CLOSE, encode_close_payload(1000))
