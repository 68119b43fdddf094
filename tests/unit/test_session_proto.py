"""podterm.v1 codec (docs/protocol.md §4): exact bytes, every rejection with its close code, round trips."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
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
    Stdout,
)
from podterm.protocol.frame import FrameReader, encode_message
from podterm.protocol.session_proto import (
    MAX_CONTROL_BYTES,
    MAX_DATA_BYTES,
    ClientCodec,
    MsgType,
    ServerCodec,
    encode,
    encode_ack,
    encode_exit,
    encode_resize,
    encode_stdin,
    encode_stdout,
)

BIN, TEXT = 2, 1

HELLO = Hello(session="s-3f9c2a7b1e4d", resume_token="tok", state="running", mode="rw",
              out_offset=1234, ring_start=0, in_acked=56, cols=80, rows=24, window=262144,
              heartbeat_s=15.0, notices=("context restored",))


def joined(msg: tuple[bytes, object]) -> bytes:
    prefix, payload = msg
    return prefix + bytes(payload)  # type: ignore[call-overload]


def control(obj: object) -> bytes:
    return b"\x06" + json.dumps(obj).encode()


def hello_obj(**changes: object) -> dict[str, object]:
    obj: dict[str, object] = {
        "type": "hello", "session": "s-1", "resume_token": "t", "state": "running",
        "mode": "rw", "out_offset": 10, "ring_start": 0, "in_acked": 0,
        "size": {"cols": 80, "rows": 24}, "window": 262144, "heartbeat_s": 15, "notices": []}
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not ...}


def client() -> ClientCodec:
    """A client codec that has seen its hello."""
    c = ClientCodec()
    c.receive_message(BIN, control(hello_obj()))
    return c


def code_of(codec: ServerCodec | ClientCodec, payload: bytes, opcode: int = BIN) -> int:
    with pytest.raises(ProtocolViolation) as info:
        codec.receive_message(opcode, payload)
    return int(info.value.close_code)


# --- exact bytes -------------------------------------------------------------------------


def test_encoders_return_prefix_and_payload() -> None:
    data = b"hello"
    prefix, payload = encode_stdout(data)
    assert prefix == b"\x01" and payload is data  # not copied
    assert joined(encode_stdin(b"ls\r")) == b"\x00ls\r"
    assert joined(ServerCodec.stderr(b"e")) == b"\x02e"
    assert joined(encode_resize(80, 24)) == b"\x04\x00\x50\x00\x18"
    assert joined(encode_ack(4096)) == b"\x05" + (4096).to_bytes(8, "big")
    assert joined(encode_exit(3, None, "exited")) == b'\x03{"code":3,"signal":null,"reason":"exited"}'
    assert joined(ClientCodec.detach()) == b'\x06{"type":"detach"}'
    assert joined(ServerCodec.gap(100, 400)) == b'\x06{"type":"gap","from":100,"to":400,"lost":300}'
    assert joined(ServerCodec.drain("shutdown")) == b'\x06{"type":"drain","reason":"shutdown"}'
    assert joined(ServerCodec.error("bad_offset", "no")) == \
        b'\x06{"type":"error","code":"bad_offset","message":"no"}'


def test_hello_json_matches_spec_shape() -> None:
    body = joined(ServerCodec.hello(HELLO))[1:]
    assert body == (
        b'{"type":"hello","session":"s-3f9c2a7b1e4d","resume_token":"tok","state":"running",'
        b'"mode":"rw","out_offset":1234,"ring_start":0,"in_acked":56,"size":{"cols":80,"rows":24},'
        b'"window":262144,"heartbeat_s":15,"notices":["context restored"]}')


def test_wire_round_trip_through_frames() -> None:
    """Client encodes with a mask, the server's FrameReader and codec decode it."""
    reader = FrameReader(is_server=True)
    server = ServerCodec()
    wire = b"".join(encode_message(*msg, mask_key=b"\x01\x02\x03\x04")
                    for msg in (encode_stdin(b"ls\r"), encode_resize(100, 40), encode_ack(7),
                                ClientCodec.detach()))
    events = [e for op, p in reader.feed(wire) for e in server.receive_message(op, p)]
    assert events == [Stdin(b"ls\r"), Resize(100, 40), Ack(7), Detach()]


# --- server codec: rejections --------------------------------------------------------------


def test_reject_text_message() -> None:
    assert code_of(ServerCodec(), b"\x00hi", TEXT) == CloseCode.UNSUPPORTED_DATA
    assert code_of(client(), b"\x01hi", TEXT) == CloseCode.UNSUPPORTED_DATA


def test_reject_empty_message() -> None:
    assert code_of(ServerCodec(), b"") == CloseCode.PROTOCOL_ERROR
    assert code_of(client(), b"") == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("kind", [0x07, 0x10, 0xFF])
def test_reject_unknown_type(kind: int) -> None:
    assert code_of(ServerCodec(), bytes((kind,)) + b"x") == CloseCode.UNSUPPORTED_DATA
    assert code_of(client(), bytes((kind,)) + b"x") == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize("kind", [MsgType.STDOUT, MsgType.STDERR, MsgType.EXIT])
def test_reject_server_types_from_client(kind: int) -> None:
    assert code_of(ServerCodec(), bytes((kind,)) + b"{}") == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize("kind", [MsgType.STDIN, MsgType.RESIZE])
def test_reject_client_types_from_server(kind: int) -> None:
    assert code_of(client(), bytes((kind,)) + b"\x00\x01\x00\x01") == CloseCode.UNSUPPORTED_DATA


def test_reject_viewer_input() -> None:
    viewer = ServerCodec(read_only=True)
    assert code_of(viewer, b"\x00ls\r") == CloseCode.POLICY_VIOLATION
    assert code_of(viewer, joined(encode_resize(80, 24))) == CloseCode.POLICY_VIOLATION
    # A viewer may still acknowledge output and detach.
    assert viewer.receive_message(BIN, joined(encode_ack(10))) == [Ack(10)]
    assert viewer.receive_message(BIN, joined(ClientCodec.detach())) == [Detach()]


def test_data_size_limit() -> None:
    server = ServerCodec()
    assert server.receive_message(BIN, b"\x00" + b"a" * MAX_DATA_BYTES) == [
        Stdin(b"a" * MAX_DATA_BYTES)]
    assert code_of(server, b"\x00" + b"a" * (MAX_DATA_BYTES + 1)) == CloseCode.MESSAGE_TOO_BIG
    assert code_of(client(), b"\x01" + b"a" * (MAX_DATA_BYTES + 1)) == CloseCode.MESSAGE_TOO_BIG


def test_control_size_limit() -> None:
    big = {"type": "detach", "pad": "x" * MAX_CONTROL_BYTES}
    assert code_of(ServerCodec(), control(big)) == CloseCode.MESSAGE_TOO_BIG
    assert code_of(client(), b"\x03" + b" " * (MAX_CONTROL_BYTES + 1)) == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("body", [b"", b"\x00\x50\x00", b"\x00\x50\x00\x18\x00"])
def test_reject_resize_wrong_length(body: bytes) -> None:
    assert code_of(ServerCodec(), b"\x04" + body) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("body", [b"", b"\x00" * 7, b"\x00" * 9])
def test_reject_ack_wrong_length(body: bytes) -> None:
    assert code_of(ServerCodec(), b"\x05" + body) == CloseCode.PROTOCOL_ERROR
    assert code_of(client(), b"\x05" + body) == CloseCode.PROTOCOL_ERROR


def test_reject_resize_above_10000() -> None:
    assert code_of(ServerCodec(), b"\x04" + struct.pack(">HH", 10001, 24)) == 1002
    assert code_of(ServerCodec(), b"\x04" + struct.pack(">HH", 80, 65535)) == 1002


def test_resize_zero_is_ignored() -> None:
    server = ServerCodec()
    assert server.receive_message(BIN, b"\x04" + struct.pack(">HH", 0, 24)) == []
    assert server.receive_message(BIN, b"\x04" + struct.pack(">HH", 10000, 10000)) == [
        Resize(10000, 10000)]
    assert server.statistics().ignored == 1


def test_empty_data_is_ignored() -> None:
    assert ServerCodec().receive_message(BIN, b"\x00") == []
    assert client().receive_message(BIN, b"\x01") == []


@pytest.mark.parametrize("body", [
    b"not json", b"\xff\xfe", b"[1,2]", b'"detach"', b"{}", b'{"type":5}', b'{"type":null}',
    b'{"type":"detach","x":NaN}', b"[" * 5000 + b"]" * 5000, b'{"type":"x","n":' + b"9" * 5000 + b"}",
])
def test_reject_control_not_a_typed_json_object(body: bytes) -> None:
    assert code_of(ServerCodec(), b"\x06" + body) == CloseCode.INVALID_PAYLOAD


def test_unknown_control_types_are_ignored() -> None:
    server = ServerCodec()
    assert server.receive_message(BIN, control({"type": "future", "x": [1]})) == []
    assert client().receive_message(BIN, control({"type": "future"})) == []
    assert server.statistics().ignored == 1


@pytest.mark.parametrize("kind", ["hello", "gap", "drain"])
def test_reject_server_controls_from_client(kind: str) -> None:
    assert code_of(ServerCodec(), control({"type": kind})) in (1003, 1007)
    # A schema-valid one is still a wrong-direction message.
    valid = {"hello": hello_obj(), "gap": {"type": "gap", "from": 0, "to": 1, "lost": 1},
             "drain": {"type": "drain", "reason": "x"}}[kind]
    assert code_of(ServerCodec(), control(valid)) == CloseCode.UNSUPPORTED_DATA


def test_reject_detach_from_server() -> None:
    assert code_of(client(), control({"type": "detach"})) == CloseCode.UNSUPPORTED_DATA


def test_error_control_accepted_both_ways() -> None:
    msg = control({"type": "error", "code": "x", "message": "y"})
    assert ServerCodec().receive_message(BIN, msg) == [ErrorMsg("x", "y")]
    assert ClientCodec().receive_message(BIN, msg) == [ErrorMsg("x", "y")]


# --- client codec: schemas and ordering ----------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"session": 5}, {"session": ...}, {"state": "zombie"}, {"mode": "admin"},
    {"resume_token": 7}, {"out_offset": -1}, {"out_offset": 1 << 64}, {"out_offset": True},
    {"ring_start": 11}, {"in_acked": "0"}, {"size": [80, 24]}, {"size": {"cols": 0, "rows": 24}},
    {"size": {"cols": 80, "rows": 10001}}, {"window": 0}, {"heartbeat_s": 0},
    {"heartbeat_s": "15"}, {"notices": ["ok", 3]}, {"notices": "x"},
])
def test_reject_bad_hello(changes: dict[str, object]) -> None:
    assert code_of(ClientCodec(), control(hello_obj(**changes))) == CloseCode.INVALID_PAYLOAD


def test_hello_viewer_may_have_no_token_and_notices_default() -> None:
    events = ClientCodec().receive_message(BIN, control(hello_obj(resume_token=None, mode="ro",
                                                                  notices=...)))
    assert len(events) == 1 and isinstance(events[0], Hello)
    assert events[0].resume_token is None and events[0].notices == ()


@pytest.mark.parametrize("gap", [
    {"from": 5, "to": 4, "lost": -1}, {"from": 0, "to": 10, "lost": 9}, {"from": 0, "to": 10},
    {"from": "0", "to": 10, "lost": 10},
])
def test_reject_bad_gap(gap: dict[str, object]) -> None:
    assert code_of(client(), control({"type": "gap", **gap})) == CloseCode.INVALID_PAYLOAD


@pytest.mark.parametrize("body", [
    b'{"code":0,"signal":null}', b'{"code":"0","signal":null,"reason":"x"}',
    b'{"code":0,"signal":0,"reason":"x"}', b'{"signal":null,"reason":"x"}', b"[]", b"nope",
])
def test_reject_bad_exit(body: bytes) -> None:
    assert code_of(client(), b"\x03" + body) == CloseCode.INVALID_PAYLOAD


def test_exit_decodes() -> None:
    assert client().receive_message(BIN, b'\x03{"code":null,"signal":9,"reason":"killed"}') == [
        Exit(None, 9, "killed")]


def test_client_requires_hello_first() -> None:
    assert code_of(ClientCodec(), b"\x01data") == CloseCode.PROTOCOL_ERROR
    assert code_of(ClientCodec(), joined(encode_ack(0))) == CloseCode.PROTOCOL_ERROR
    assert code_of(ClientCodec(), control({"type": "gap", "from": 0, "to": 1, "lost": 1})) == 1002
    # error and drain may precede hello (a refused attach).
    c = ClientCodec()
    assert c.receive_message(BIN, control({"type": "drain", "reason": "r"})) == [Drain("r")]
    assert c.receive_message(BIN, control(hello_obj()))[0].session == "s-1"  # type: ignore[union-attr]
    assert code_of(c, control(hello_obj())) == CloseCode.PROTOCOL_ERROR  # a second hello
    assert ClientCodec(expect_hello=False).receive_message(BIN, b"\x01x") == [Stdout(b"x")]


# --- encoders refuse what decoders reject --------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda: encode_stdin(b""), lambda: encode_stdout(b"x" * (MAX_DATA_BYTES + 1)),
    lambda: encode_resize(0, 24), lambda: encode_resize(80, 10001), lambda: encode_ack(-1),
    lambda: encode_ack(1 << 64), lambda: encode_exit(0, None, "x" * MAX_CONTROL_BYTES),
    lambda: ServerCodec().send(Stdin(b"x")), lambda: ServerCodec().send(Detach()),
    lambda: ClientCodec().send(Stdout(b"x")), lambda: ClientCodec().send(HELLO),
    lambda: ServerCodec.gap(10, 5), lambda: encode_exit(0, 0, "x"),
    lambda: ServerCodec.hello(Hello("s", "t", "zombie", "rw", 0, 0, 0, 80, 24, 1, 1.0)),
    lambda: ServerCodec.hello(Hello("s", "t", "running", "rw", 5, 6, 0, 80, 24, 1, 1.0)),
    lambda: ServerCodec.hello(Hello("s", "t", "running", "rw", 0, 0, 0, 80, 24, 0, 1.0)),
])
def test_encoders_refuse_invalid(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError):
        call()


# --- properties ----------------------------------------------------------------------------

offsets = st.integers(0, (1 << 64) - 1)
data = st.binary(min_size=1, max_size=MAX_DATA_BYTES).filter(bool)
small = st.text(max_size=30)
client_events = st.one_of(
    st.binary(min_size=1, max_size=2000).map(Stdin),
    st.builds(Resize, st.integers(1, 10000), st.integers(1, 10000)),
    offsets.map(Ack),
    st.just(Detach()),
    st.builds(ErrorMsg, small, small),
)
server_events = st.one_of(
    st.binary(min_size=1, max_size=2000).map(Stdout),
    st.binary(min_size=1, max_size=2000).map(Stderr),
    st.builds(Exit, st.none() | st.integers(-(1 << 63), (1 << 63) - 1),
              st.none() | st.integers(1, 255), small),
    offsets.map(Ack),
    st.builds(lambda a, b: Gap(min(a, b), max(a, b)), offsets, offsets),
    st.builds(Drain, small),
    st.builds(ErrorMsg, small, small),
)
hellos = st.builds(
    lambda rs, extra, **kw: Hello(ring_start=rs, out_offset=rs + extra, **kw),
    st.integers(0, 1 << 40), st.integers(0, 1 << 40),
    session=small, resume_token=st.none() | small, state=st.sampled_from(["running", "exited"]),
    mode=st.sampled_from(["rw", "ro"]), in_acked=offsets, cols=st.integers(1, 10000),
    rows=st.integers(1, 10000), window=st.integers(1, 1 << 30),
    heartbeat_s=st.floats(0.001, 1e6) | st.integers(1, 1000).map(float),
    notices=st.lists(small, max_size=3).map(tuple))


@settings(max_examples=300, deadline=None)
@given(st.lists(client_events, max_size=20))
def test_client_to_server_round_trip(events: list[Event]) -> None:
    server = ServerCodec()
    got = [e for ev in events for e in server.receive_message(BIN, joined(ClientCodec().send(ev)))]
    assert got == events


@settings(max_examples=300, deadline=None)
@given(hellos, st.lists(server_events, max_size=20))
def test_server_to_client_round_trip(hello: Hello, events: list[Event]) -> None:
    c = ClientCodec()
    got = c.receive_message(BIN, joined(ServerCodec().send(hello)))
    for ev in events:
        got += c.receive_message(BIN, joined(encode(ev)))
    assert got == [hello, *events]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([TEXT, BIN]),
                          st.one_of(st.binary(max_size=40),
                                    st.builds(lambda t, b: bytes((t,)) + b, st.integers(0, 7),
                                              st.binary(max_size=12)),
                                    st.builds(lambda o: control(o), st.dictionaries(
                                        st.sampled_from(["type", "from", "to", "lost", "code",
                                                         "message", "reason", "size"]),
                                        st.one_of(st.integers(), small, st.none()),
                                        max_size=5)))),
                max_size=20),
       st.booleans())
def test_garbage_gives_events_or_violations_only(messages: list[tuple[int, bytes]],
                                                 read_only: bool) -> None:
    for codec in (ServerCodec(read_only=read_only), ClientCodec(expect_hello=read_only)):
        for opcode, payload in messages:
            try:
                events = codec.receive_message(opcode, payload)
            except ProtocolViolation as exc:
                assert exc.close_code in (1002, 1003, 1007, 1008, 1009)
                break
            assert len(events) <= 1


# --- stdin_eof (client → server CONTROL) and hello.stdin_closed -----------------------------


def test_stdin_eof_exact_bytes_and_round_trip() -> None:
    from podterm.protocol.events import StdinEof

    assert joined(ClientCodec.stdin_eof(12)) == b'\x06{"type":"stdin_eof","offset":12}'
    assert joined(ClientCodec().send(StdinEof(0))) == b'\x06{"type":"stdin_eof","offset":0}'
    top = (1 << 64) - 1
    assert ServerCodec().receive_message(BIN, joined(ClientCodec.stdin_eof(top))) == [
        StdinEof(top)]


@pytest.mark.parametrize("obj", [
    {"type": "stdin_eof"}, {"type": "stdin_eof", "offset": -1},
    {"type": "stdin_eof", "offset": 1 << 64}, {"type": "stdin_eof", "offset": "3"},
    {"type": "stdin_eof", "offset": True}, {"type": "stdin_eof", "offset": 1.5},
    {"type": "stdin_eof", "offset": None},
])
def test_stdin_eof_schema_rejected(obj: dict[str, object]) -> None:
    assert code_of(ServerCodec(), control(obj)) == CloseCode.INVALID_PAYLOAD


def test_stdin_eof_from_a_viewer_is_a_policy_violation() -> None:
    assert code_of(ServerCodec(read_only=True), control({"type": "stdin_eof", "offset": 0})) \
        == CloseCode.POLICY_VIOLATION
    # Schema first (rule 9), then the viewer policy.
    assert code_of(ServerCodec(read_only=True), control({"type": "stdin_eof"})) \
        == CloseCode.INVALID_PAYLOAD


def test_stdin_eof_is_client_to_server_only() -> None:
    from podterm.protocol.events import StdinEof

    assert code_of(client(), control({"type": "stdin_eof", "offset": 1})) \
        == CloseCode.UNSUPPORTED_DATA
    with pytest.raises(LocalProtocolError):
        ServerCodec().send(StdinEof(1))
    with pytest.raises(LocalProtocolError):
        ClientCodec.stdin_eof(-1)


def test_hello_stdin_closed_only_on_the_wire_when_true() -> None:
    import dataclasses

    closed = dataclasses.replace(HELLO, stdin_closed=True)
    body = joined(ServerCodec.hello(closed))[1:]
    assert body.endswith(b'"notices":["context restored"],"stdin_closed":true}')
    assert b"stdin_closed" not in joined(ServerCodec.hello(HELLO))
    assert ClientCodec().receive_message(BIN, b"\x06" + body) == [closed]
    # Absent (an older server) reads as false.
    got = ClientCodec().receive_message(BIN, control(hello_obj()))[0]
    assert isinstance(got, Hello) and got.stdin_closed is False
    got = ClientCodec().receive_message(BIN, control(hello_obj(stdin_closed=False)))[0]
    assert isinstance(got, Hello) and got.stdin_closed is False


@pytest.mark.parametrize("value", [1, "true", None, [True]])
def test_hello_stdin_closed_must_be_a_boolean(value: object) -> None:
    assert code_of(ClientCodec(), control(hello_obj(stdin_closed=value))) \
        == CloseCode.INVALID_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(client_events, offsets.map(lambda o: _stdin_eof(o))), max_size=20))
def test_client_to_server_round_trip_with_stdin_eof(events: list[Event]) -> None:
    server = ServerCodec()
    got = [e for ev in events for e in server.receive_message(BIN, joined(ClientCodec().send(ev)))]
    assert got == events


def _stdin_eof(offset: int) -> Event:
    from podterm.protocol.events import StdinEof

    return StdinEof(offset)
