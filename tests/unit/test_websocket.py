"""WebSocketConnection: events, automatic replies, close handshake, state rules (sans-IO)."""

from __future__ import annotations

import pytest

from podterm.errors import CloseCode, LocalProtocolError
from podterm.protocol.frame import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    encode_close_payload,
    encode_frame,
)
from podterm.protocol.websocket import (
    CloseReceived,
    ConnectionFailed,
    ConnectionState,
    Role,
    WebSocketConnection,
    WsLimits,
)

KEY = b"\x01\x02\x03\x04"


def server() -> WebSocketConnection:
    return WebSocketConnection(Role.SERVER)


def client() -> WebSocketConnection:
    return WebSocketConnection(Role.CLIENT, mask_key_source=lambda: KEY)


def from_client(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A frame as a client sends it (masked)."""
    return encode_frame(opcode, payload, fin=fin, mask_key=KEY)


def from_server(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, fin=fin)


def decode(wire: bytes, *, sent_by: Role) -> list[tuple[int, bytes]]:
    """Parse what one side wrote, as its peer would."""
    return FrameReader(is_server=sent_by is Role.CLIENT).feed(wire)


# ------------------------------------------------------------------- receiving


def test_data_messages_are_the_readers_raw_tuples() -> None:
    conn = server()
    wire = from_client(OP_TEXT, "héllo".encode()) + from_client(OP_BINARY, b"\x00\xff")
    events = conn.receive_data(wire)
    assert events == [(OP_TEXT, "héllo".encode()), (OP_BINARY, b"\x00\xff")]
    assert all(type(e) is tuple for e in events)
    assert conn.saw_control is False
    assert conn.data_to_send() == b""


def test_every_split_gives_the_same_events() -> None:
    wire = (from_client(OP_TEXT, b"ab", fin=False) + from_client(OP_PING, b"p")
            + from_client(OP_CONT, b"c") + from_client(OP_BINARY, bytes(300)))
    whole = server().receive_data(wire)
    conn = server()
    bytewise = [e for i in range(len(wire)) for e in conn.receive_data(wire[i:i + 1])]
    assert bytewise == whole == [(OP_PING, b"p"), (OP_TEXT, b"abc"), (OP_BINARY, bytes(300))]


def test_ping_is_answered_with_same_payload_and_reported() -> None:
    conn = server()
    events = conn.receive_data(from_client(OP_PING, b"are you there"))
    assert events == [(OP_PING, b"are you there")]
    assert conn.saw_control is True
    assert decode(conn.data_to_send(), sent_by=Role.SERVER) == [(OP_PONG, b"are you there")]
    assert conn.data_to_send() == b""


def test_client_pong_answer_is_masked() -> None:
    conn = client()
    conn.receive_data(from_server(OP_PING, b"x"))
    wire = conn.data_to_send()
    assert wire == encode_frame(OP_PONG, b"x", mask_key=KEY)
    assert wire[1] & 0x80


def test_pong_is_reported_and_needs_no_reply() -> None:
    conn = server()
    assert conn.receive_data(from_client(OP_PONG, b"7")) == [(OP_PONG, b"7")]
    assert conn.saw_control is True
    assert not conn.has_data_to_send


def test_control_frames_between_fragments_arrive_first() -> None:
    conn = server()
    wire = (from_client(OP_BINARY, b"he", fin=False) + from_client(OP_PING, b"1")
            + from_client(OP_CONT, b"ll", fin=False) + from_client(OP_PONG, b"2")
            + from_client(OP_CONT, b"o"))
    assert conn.receive_data(wire) == [(OP_PING, b"1"), (OP_PONG, b"2"), (OP_BINARY, b"hello")]
    assert decode(conn.data_to_send(), sent_by=Role.SERVER) == [(OP_PONG, b"1")]


def test_fragmented_text_is_reassembled() -> None:
    conn = server()
    raw = "€uro".encode()
    wire = from_client(OP_TEXT, raw[:2], fin=False) + from_client(OP_CONT, raw[2:])
    assert conn.receive_data(wire) == [(OP_TEXT, raw)]


def test_saw_control_resets_on_a_data_only_read() -> None:
    conn = server()
    conn.receive_data(from_client(OP_PING))
    assert conn.saw_control
    conn.receive_data(from_client(OP_BINARY, b"x"))
    assert not conn.saw_control


# ------------------------------------------------------------- close handshake


def test_peer_close_is_reported_and_echoed() -> None:
    conn = server()
    events = conn.receive_data(from_client(OP_CLOSE, encode_close_payload(4000, "done")))
    assert events == [CloseReceived(4000, "done")]
    assert conn.close_received == (4000, "done")
    assert conn.state is ConnectionState.REMOTE_CLOSING
    echo = conn.data_to_send()
    assert decode(echo, sent_by=Role.SERVER) == [(OP_CLOSE, encode_close_payload(4000))]
    assert conn.state is ConnectionState.CLOSED


def test_close_without_status_is_1005_and_echoed_empty() -> None:
    conn = server()
    assert conn.receive_data(from_client(OP_CLOSE)) == [CloseReceived(CloseCode.NO_STATUS, "")]
    assert decode(conn.data_to_send(), sent_by=Role.SERVER) == [(OP_CLOSE, b"")]


def test_local_close_then_peer_close() -> None:
    conn = server()
    wire = conn.send_close(1001, "going away")
    assert decode(wire, sent_by=Role.SERVER) == [(OP_CLOSE, encode_close_payload(1001, "going away"))]
    assert conn.state is ConnectionState.LOCAL_CLOSING
    assert conn.close_sent == (1001, "going away")
    # The peer may still send data before it sees our CLOSE.
    assert conn.receive_data(from_client(OP_BINARY, b"late")) == [(OP_BINARY, b"late")]
    events = conn.receive_data(from_client(OP_CLOSE, encode_close_payload(1001)))
    assert events == [CloseReceived(1001, "")]
    assert conn.state is ConnectionState.CLOSED
    assert conn.data_to_send() == b""  # no second CLOSE


def test_ping_in_local_closing_is_still_answered() -> None:
    conn = server()
    conn.send_close()
    assert conn.receive_data(from_client(OP_PING, b"q")) == [(OP_PING, b"q")]
    assert decode(conn.data_to_send(), sent_by=Role.SERVER) == [(OP_PONG, b"q")]


def test_client_server_pair_close_both_ways() -> None:
    for initiator in (Role.CLIENT, Role.SERVER):
        c, s = client(), server()
        a, b = (c, s) if initiator is Role.CLIENT else (s, c)
        assert b.receive_data(a.send_close(4409, "writer exists")) == [
            CloseReceived(4409, "writer exists")]
        assert a.receive_data(b.data_to_send()) == [CloseReceived(4409, "")]
        assert a.state is b.state is ConnectionState.CLOSED


def test_everything_after_peer_close_is_ignored() -> None:
    conn = server()
    wire = (from_client(OP_BINARY, b"before") + from_client(OP_CLOSE, encode_close_payload(1000))
            + from_client(OP_BINARY, b"after") + from_client(OP_PING))
    assert conn.receive_data(wire) == [(OP_BINARY, b"before"), CloseReceived(1000, "")]
    assert conn.receive_data(from_client(OP_BINARY, b"later")) == []
    assert conn.receive_data(b"\xff\xff garbage") == []  # not even a violation
    assert decode(conn.data_to_send(), sent_by=Role.SERVER) == [
        (OP_CLOSE, encode_close_payload(1000))]


def test_close_reason_is_cut_to_fit_a_control_frame() -> None:
    conn = server()
    wire = conn.send_close(1000, "é" * 100)  # 200 bytes of UTF-8
    [(opcode, payload)] = decode(wire, sent_by=Role.SERVER)
    assert opcode == OP_CLOSE and len(payload) <= 125
    assert payload[2:].decode() == "é" * 61
    assert conn.close_sent == (1000, "é" * 61)


def test_send_close_without_code() -> None:
    conn = client()
    assert decode(conn.send_close(None), sent_by=Role.CLIENT) == [(OP_CLOSE, b"")]
    with pytest.raises(LocalProtocolError):
        client().send_close(None, "reason without a code")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_send_close_rejects_codes_not_allowed_on_the_wire(code: int) -> None:
    conn = server()
    with pytest.raises(LocalProtocolError):
        conn.send_close(code)
    assert conn.state is ConnectionState.OPEN


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4000, 4999])
def test_send_close_accepts_legal_codes(code: int) -> None:
    assert decode(server().send_close(code), sent_by=Role.SERVER) == [
        (OP_CLOSE, encode_close_payload(code))]


# ------------------------------------------------------------------ EOF


def test_eof_while_open_is_abnormal_1006() -> None:
    conn = server()
    events = conn.receive_data(b"")
    assert events == [ConnectionFailed(CloseCode.ABNORMAL, "connection closed without a close frame")]
    assert conn.state is ConnectionState.CLOSED
    assert conn.data_to_send() == b""  # nobody to send a CLOSE to


def test_eof_mid_frame_is_1006() -> None:
    conn = server()
    assert conn.receive_data(from_client(OP_BINARY, b"abcdef")[:5]) == []
    assert conn.receive_data(b"") == [
        ConnectionFailed(CloseCode.ABNORMAL, "connection closed without a close frame")]


def test_eof_after_close_exchange_is_normal() -> None:
    conn = server()
    conn.receive_data(from_client(OP_CLOSE, encode_close_payload(1000)))
    conn.data_to_send()
    assert conn.receive_data(b"") == []
    assert conn.state is ConnectionState.CLOSED


# ------------------------------------------------------------------ sending


def test_server_never_masks_client_always_masks() -> None:
    assert server().send_binary(b"abc") == b"\x82\x03abc"
    wire = client().send_binary(b"abc")
    assert wire[:2] == b"\x82\x83" and wire[2:6] == KEY
    assert decode(wire, sent_by=Role.CLIENT) == [(OP_BINARY, b"abc")]


def test_each_client_frame_takes_a_fresh_mask_key() -> None:
    supplied = iter([b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"])
    conn = WebSocketConnection(Role.CLIENT, mask_key_source=lambda: next(supplied))
    assert conn.send_binary(b"a")[2:6] == b"\x00\x00\x00\x01"
    assert conn.send_text("b")[2:6] == b"\x00\x00\x00\x02"


def test_send_binary_with_prefix_is_one_message() -> None:
    assert decode(server().send_binary(b"payload", prefix=b"\x01"), sent_by=Role.SERVER) == [
        (OP_BINARY, b"\x01payload")]


def test_send_text_encodes_utf8() -> None:
    assert decode(client().send_text("ünï"), sent_by=Role.CLIENT) == [(OP_TEXT, "ünï".encode())]


def test_ping_and_unsolicited_pong() -> None:
    conn = client()
    assert decode(conn.send_ping(b"hb"), sent_by=Role.CLIENT) == [(OP_PING, b"hb")]
    assert decode(conn.send_pong(b"1"), sent_by=Role.CLIENT) == [(OP_PONG, b"1")]
    with pytest.raises(LocalProtocolError):
        conn.send_ping(bytes(126))


def test_no_data_after_our_close() -> None:
    conn = server()
    conn.send_close()
    for send in (lambda: conn.send_binary(b"x"), lambda: conn.send_text("x"), conn.send_close):
        with pytest.raises(LocalProtocolError):
            send()
    conn.send_ping(b"still allowed")


def test_nothing_but_the_echo_after_peer_close() -> None:
    conn = server()
    conn.receive_data(from_client(OP_CLOSE))
    for send in (lambda: conn.send_binary(b"x"), lambda: conn.send_ping(b""), conn.send_close):
        with pytest.raises(LocalProtocolError):
            send()


def test_no_sends_after_failure() -> None:
    conn = server()
    conn.receive_data(b"\x82\x01x")  # unmasked
    with pytest.raises(LocalProtocolError):
        conn.send_binary(b"x")


# ------------------------------------------------------------------ construction


def test_client_needs_a_mask_key_source_and_server_refuses_one() -> None:
    with pytest.raises(ValueError):
        WebSocketConnection(Role.CLIENT)
    with pytest.raises(ValueError):
        WebSocketConnection(Role.SERVER, mask_key_source=lambda: KEY)


def test_limits_default_to_one_mib_and_reject_less_than_a_control_frame() -> None:
    assert WsLimits() == WsLimits(1 << 20, 1 << 20)
    with pytest.raises(ValueError):
        WsLimits(max_frame_bytes=124)
    with pytest.raises(ValueError):
        WsLimits(max_message_bytes=100)


def test_repr_shows_role_and_state() -> None:
    conn = server()
    conn.send_close()
    assert repr(conn) == "<WebSocketConnection server LOCAL_CLOSING queued=0>"
