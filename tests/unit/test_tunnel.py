"""Agent tunnel framing (TunnelCodec) and per-stream bookkeeping (TunnelMux)."""

from __future__ import annotations

import json
import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
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
from podterm.protocol.frame import FrameReader, encode_message
from podterm.protocol.offsets import InputDedup, InputLog, ReplayRange
from podterm.protocol.tunnel import (
    MAX_OPEN_BYTES,
    MAX_RESUME_BYTES,
    ResumeAction,
    ResumePlan,
    TunnelCodec,
    TunnelMux,
    TunnelRole,
    TunnelType,
)

BIN, TEXT = 2, 1
GW, AG = TunnelRole.GATEWAY, TunnelRole.AGENT
W = 64 * 1024
RESUME_FROM_AGENT = Resume(streams=(), next_id=1)
RESUME_FROM_GATEWAY = Resume(streams=())


def joined(msg: tuple[bytes, object]) -> bytes:
    prefix, payload = msg
    return prefix + bytes(payload)  # type: ignore[call-overload]


def msg(kind: int, sid: int, body: bytes = b"") -> bytes:
    return struct.pack(">BI", kind, sid) + body


def resumed(role: TunnelRole) -> TunnelCodec:
    """A codec for ``role`` that has received the peer's RESUME."""
    codec = TunnelCodec(role)
    peer = TunnelCodec(AG if role is GW else GW)
    first = RESUME_FROM_AGENT if role is GW else RESUME_FROM_GATEWAY
    codec.receive_message(BIN, joined(peer.encode(0, first)))
    return codec


def code_of(codec: TunnelCodec, payload: bytes, opcode: int = BIN) -> int:
    with pytest.raises(ProtocolViolation) as info:
        codec.receive_message(opcode, payload)
    return int(info.value.close_code)


# --- exact bytes ---------------------------------------------------------------------------


def test_header_is_type_then_u32_stream_id() -> None:
    agent = TunnelCodec(AG)
    prefix, payload = agent.stdout(7, b"hi")
    assert prefix == b"\x01\x00\x00\x00\x07" and payload == b"hi"
    assert joined(agent.ack(0x01020304, 9)) == b"\x05\x01\x02\x03\x04" + (9).to_bytes(8, "big")
    gw = TunnelCodec(GW)
    assert joined(gw.encode(3, Resize(80, 24))) == b"\x04\x00\x00\x00\x03\x00\x50\x00\x18"
    assert joined(gw.close(3, "killed")) == b'\x08\x00\x00\x00\x03{"reason":"killed"}'


def test_open_and_resume_json() -> None:
    gw = TunnelCodec(GW)
    body = joined(gw.encode(1, Open(("sh", "-c", "ls"), True, 80, 24, (("TERM", "xterm"),),
                                    "/home", 65536)))[5:]
    assert body == (b'{"command":["sh","-c","ls"],"tty":true,"size":{"cols":80,"rows":24},'
                    b'"env":{"TERM":"xterm"},"cwd":"/home","window":65536}')
    agent = TunnelCodec(AG)
    resume = Resume((ResumeEntry(7, 262144, 0, 81920, 56),), next_id=9)
    assert joined(agent.encode(0, resume)) == (
        b'\x09\x00\x00\x00\x00{"streams":[{"id":7,"window":262144,"out_start":0,'
        b'"out_offset":81920,"in_acked":56}],"next_id":9}')
    assert joined(gw.encode(0, Resume((ResumeEntry(7, 262144, 40, 60, 81000),))))[5:] == (
        b'{"streams":[{"id":7,"window":262144,"out_start":40,"out_offset":60,"in_acked":81000}]}')


def test_through_websocket_frames() -> None:
    reader = FrameReader(is_server=True)  # the gateway accepts the agent's connection
    agent, gw = TunnelCodec(AG), TunnelCodec(GW)
    wire = b"".join(encode_message(*m, mask_key=b"abcd") for m in (
        agent.encode(0, RESUME_FROM_AGENT), agent.stdout(1, b"out"), agent.encode(1, Exit(0, None, "exited"))))
    events = [e for op, p in reader.feed(wire) for e in gw.receive_message(op, p)]
    assert events == [(0, RESUME_FROM_AGENT), (1, Stdout(b"out")), (1, Exit(0, None, "exited"))]


# --- rejections ----------------------------------------------------------------------------


def test_reject_text_message() -> None:
    assert code_of(resumed(GW), msg(1, 1, b"x"), TEXT) == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize("payload", [b"", b"\x01", b"\x01\x00\x00\x00"])
def test_reject_short_header(payload: bytes) -> None:
    assert code_of(resumed(GW), payload) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("kind", [0x0A, 0x7F, 0xFF])
def test_reject_unknown_type(kind: int) -> None:
    assert code_of(resumed(AG), msg(kind, 1, b"x")) == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize(("role", "kind"), [
    (GW, TunnelType.STDIN), (GW, TunnelType.RESIZE), (GW, TunnelType.OPEN),
    (AG, TunnelType.STDOUT), (AG, TunnelType.STDERR), (AG, TunnelType.EXIT),
])
def test_reject_wrong_direction(role: TunnelRole, kind: int) -> None:
    assert code_of(resumed(role), msg(kind, 1, b"{}")) == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize("kind", [TunnelType.STDOUT, TunnelType.ACK, TunnelType.CLOSE,
                                  TunnelType.EXIT])
def test_reject_stream_message_on_stream_zero(kind: int) -> None:
    assert code_of(resumed(GW), msg(kind, 0, b'{"reason":"x"}')) == CloseCode.PROTOCOL_ERROR


def test_reject_resume_on_a_stream_and_twice() -> None:
    body = b'{"streams":[],"next_id":1}'
    assert code_of(TunnelCodec(GW), msg(TunnelType.RESUME, 4, body)) == 1002
    codec = TunnelCodec(GW)
    codec.receive_message(BIN, msg(TunnelType.RESUME, 0, body))
    assert codec.resumed
    assert code_of(codec, msg(TunnelType.RESUME, 0, body)) == 1002


def test_only_link_control_before_resume() -> None:
    assert code_of(TunnelCodec(GW), msg(TunnelType.STDOUT, 1, b"x")) == 1002
    err = b'{"type":"error","code":"x","message":"y"}'
    assert code_of(TunnelCodec(GW), msg(TunnelType.CONTROL, 1, err)) == 1002
    assert TunnelCodec(GW).receive_message(BIN, msg(TunnelType.CONTROL, 0, err)) == [
        (0, ErrorMsg("x", "y"))]
    assert TunnelCodec(AG).receive_message(
        BIN, msg(TunnelType.CONTROL, 0, b'{"type":"drain","reason":"bye"}')) == [(0, Drain("bye"))]


def test_size_limits() -> None:
    assert resumed(GW).receive_message(BIN, msg(1, 1, b"a" * 65536)) == [(1, Stdout(b"a" * 65536))]
    assert code_of(resumed(GW), msg(1, 1, b"a" * 65537)) == CloseCode.MESSAGE_TOO_BIG
    assert code_of(resumed(GW), msg(TunnelType.CONTROL, 1, b" " * 16385)) == 1009
    assert code_of(resumed(AG), msg(TunnelType.OPEN, 1, b" " * (MAX_OPEN_BYTES + 1))) == 1009
    assert code_of(TunnelCodec(GW), msg(TunnelType.RESUME, 0, b" " * (MAX_RESUME_BYTES + 1))) == 1009


def test_fixed_layouts() -> None:
    assert code_of(resumed(GW), msg(TunnelType.ACK, 1, b"\x00" * 7)) == 1002
    assert code_of(resumed(AG), msg(TunnelType.RESIZE, 1, b"\x00" * 5)) == 1002
    assert resumed(AG).receive_message(BIN, msg(TunnelType.RESIZE, 1, b"\x00\x00\x00\x05")) == []


def open_body(**changes: object) -> bytes:
    obj: dict[str, object] = {"command": None, "tty": True, "size": {"cols": 80, "rows": 24}}
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("changes", [
    {"command": []}, {"command": "sh"}, {"command": ["sh", 3]}, {"command": ["a\x00b"]},
    {"tty": 1}, {"size": {"cols": 0, "rows": 24}}, {"size": None}, {"env": {"1BAD": "x"}},
    {"env": {"OK": 5}}, {"env": {"OK": "a\x00"}}, {"env": {f"V{i}": "" for i in range(129)}},
    {"cwd": "relative"}, {"cwd": 5}, {"window": 0}, {"window": 1 << 31},
])
def test_reject_bad_open(changes: dict[str, object]) -> None:
    assert code_of(resumed(AG), msg(TunnelType.OPEN, 1, open_body(**changes))) == 1007


def test_open_defaults() -> None:
    [(sid, ev)] = resumed(AG).receive_message(BIN, msg(TunnelType.OPEN, 3, open_body()))
    assert sid == 3 and ev == Open(None, True, 80, 24, (), None, 256 * 1024)


def test_reject_missing_command() -> None:
    body = json.dumps({"tty": True, "size": {"cols": 80, "rows": 24}}).encode()
    assert code_of(resumed(AG), msg(TunnelType.OPEN, 1, body)) == 1007


@pytest.mark.parametrize(("role", "body"), [
    (GW, b'{"streams":[]}'),  # the agent must send next_id
    (AG, b'{"streams":[],"next_id":3}'),  # the gateway must not
    (GW, b'{"streams":[{"id":1,"window":1,"out_start":0,"out_offset":0,"in_acked":0},'
         b'{"id":1,"window":1,"out_start":0,"out_offset":0,"in_acked":0}],"next_id":5}'),
    (GW, b'{"streams":[{"id":5,"window":1,"out_start":0,"out_offset":0,"in_acked":0}],"next_id":5}'),
    (AG, b'{"streams":[{"id":1,"window":1,"out_start":3,"out_offset":2,"in_acked":0}]}'),
    (AG, b'{"streams":[{"id":0,"window":1,"out_start":0,"out_offset":0,"in_acked":0}]}'),
    (AG, b'{"streams":[{"id":1,"window":1,"out_start":0,"out_offset":0}]}'),
    (AG, b'{"streams":{}}'),
    (AG, b"[]"),
])
def test_reject_bad_resume(role: TunnelRole, body: bytes) -> None:
    assert code_of(TunnelCodec(role), msg(TunnelType.RESUME, 0, body)) == 1007


def test_control_stream_rules() -> None:
    drain = b'{"type":"drain","reason":"x"}'
    gap = b'{"type":"gap","from":0,"to":5,"lost":5}'
    assert code_of(resumed(AG), msg(TunnelType.CONTROL, 5, drain)) == 1002
    assert code_of(resumed(GW), msg(TunnelType.CONTROL, 0, gap)) == 1002
    assert code_of(resumed(AG), msg(TunnelType.CONTROL, 5, gap)) == 1003  # gateways never send gap
    assert code_of(resumed(GW), msg(TunnelType.CONTROL, 0, drain)) == 1003  # nor agents drain
    assert resumed(GW).receive_message(BIN, msg(TunnelType.CONTROL, 5, gap)) == [(5, Gap(0, 5))]
    # podterm.v1 controls with no meaning on a tunnel are ignored, like unknown ones.
    assert resumed(AG).receive_message(BIN, msg(TunnelType.CONTROL, 1, b'{"type":"detach"}')) == []
    assert resumed(AG).receive_message(BIN, msg(TunnelType.CONTROL, 1, b'{"type":"new"}')) == []
    assert code_of(resumed(AG), msg(TunnelType.CONTROL, 1, b'{"no":"type"}')) == 1007


@pytest.mark.parametrize(("role", "sid", "event"), [
    (GW, 1, Stdout(b"x")), (AG, 1, Stdin(b"x")), (AG, 1, Open(None, True, 80, 24)),
    (GW, 0, Stdin(b"x")), (GW, 1, Resume(())), (AG, 1, Drain("x")), (GW, 1, Gap(0, 1)),
    (GW, 1, Drain("x")), (AG, 0, Gap(0, 1)), (GW, 1, Stdin(b"")), (GW, 1, Stdin(b"x" * 65537)),
    (GW, 1 << 32, Stdin(b"x")), (GW, 1, Open(("a\x00",), True, 80, 24)),
    (GW, 1, Open(None, True, 80, 24, (("A", "1"), ("A", "2")))), (GW, 1, Resize(0, 1)),
    (AG, 0, Resume((ResumeEntry(3, 1, 0, 0, 0),), next_id=2)),
])
def test_encoder_refuses_what_the_peer_rejects(role: TunnelRole, sid: int, event: Event) -> None:
    with pytest.raises(LocalProtocolError):
        TunnelCodec(role).encode(sid, event)


# --- codec properties ----------------------------------------------------------------------

sids = st.integers(1, (1 << 32) - 1)
offsets = st.integers(0, (1 << 64) - 1)
text = st.text(max_size=20).filter(lambda s: "\x00" not in s)
payloads = st.binary(min_size=1, max_size=500)
opens = st.builds(
    Open, st.none() | st.lists(text, min_size=1, max_size=4).map(tuple), st.booleans(),
    st.integers(1, 10000), st.integers(1, 10000),
    st.dictionaries(st.sampled_from(["TERM", "HOME", "_x", "LANG", "A1", "PATH"]), text,
                    max_size=4).map(lambda d: tuple(d.items())),
    st.none() | text.map(lambda s: "/" + s), st.integers(1, (1 << 31) - 1))
gateway_sends = st.one_of(
    st.tuples(sids, payloads.map(Stdin)), st.tuples(sids, offsets.map(Ack)),
    st.tuples(sids, st.builds(Resize, st.integers(1, 10000), st.integers(1, 10000))),
    st.tuples(sids, opens), st.tuples(sids, text.map(Close)),
    st.tuples(st.integers(0, 9), st.builds(ErrorMsg, text, text)),
    st.tuples(st.just(0), text.map(Drain)),
)
agent_sends = st.one_of(
    st.tuples(sids, payloads.map(Stdout)), st.tuples(sids, payloads.map(Stderr)),
    st.tuples(sids, offsets.map(Ack)), st.tuples(sids, text.map(Close)),
    st.tuples(sids, st.builds(Exit, st.none() | st.integers(0, 255), st.none() | st.integers(1, 64),
                              text)),
    st.tuples(sids, st.builds(lambda a, b: Gap(min(a, b), max(a, b)), offsets, offsets)),
    st.tuples(st.integers(0, 9), st.builds(ErrorMsg, text, text)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(gateway_sends, max_size=15))
def test_gateway_to_agent_round_trip(events: list[tuple[int, Event]]) -> None:
    gw, agent = TunnelCodec(GW), TunnelCodec(AG)
    got = agent.receive_message(BIN, joined(gw.encode(0, RESUME_FROM_GATEWAY)))
    for sid, ev in events:
        got += agent.receive_message(BIN, joined(gw.encode(sid, ev)))
    assert got == [(0, RESUME_FROM_GATEWAY), *events]


@settings(max_examples=200, deadline=None)
@given(st.lists(agent_sends, max_size=15),
       st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=4))
def test_agent_to_gateway_round_trip(events: list[tuple[int, Event]],
                                     spans: list[tuple[int, int]]) -> None:
    gw, agent = TunnelCodec(GW), TunnelCodec(AG)
    resume = Resume(tuple(ResumeEntry(i + 1, 1000, a, a + b, b) for i, (a, b) in enumerate(spans)),
                    next_id=len(spans) + 1)
    got = gw.receive_message(BIN, joined(agent.encode(0, resume)))
    for sid, ev in events:
        got += gw.receive_message(BIN, joined(agent.encode(sid, ev)))
    assert got == [(0, resume), *events]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([TEXT, BIN]), st.one_of(
    st.binary(max_size=30),
    st.builds(lambda k, s, b: struct.pack(">BI", k, s) + b, st.integers(0, 10),
              st.integers(0, 3), st.binary(max_size=16)),
    st.builds(lambda k, s, o: struct.pack(">BI", k, s) + json.dumps(o).encode(),
              st.sampled_from([6, 7, 8, 9]), st.integers(0, 3),
              st.dictionaries(st.sampled_from(["type", "streams", "next_id", "reason", "command",
                                               "tty", "size", "from", "to", "lost"]),
                              st.one_of(st.integers(-2, 5), st.none(), st.booleans(), text,
                                        st.just([]), st.just({"cols": 1, "rows": 1})),
                              max_size=6)))),
    max_size=20))
def test_garbage_gives_events_or_violations_only(messages: list[tuple[int, bytes]]) -> None:
    for role in (GW, AG):
        codec = TunnelCodec(role)
        for opcode, payload in messages:
            try:
                events = codec.receive_message(opcode, payload)
            except ProtocolViolation as exc:
                assert exc.close_code in (1002, 1003, 1007, 1009)
                break
            assert len(events) <= 1


# --- TunnelMux: credit, ACKs, close --------------------------------------------------------


def connected(window: int = W) -> tuple[TunnelMux, TunnelMux]:
    gw, agent = TunnelMux(GW, default_window=window), TunnelMux(AG, default_window=window)
    theirs = agent.make_resume([])
    gw.make_resume([])
    assert gw.apply_resume(theirs) == []
    assert agent.apply_resume(Resume(())) == []
    return gw, agent


def open_both(gw: TunnelMux, agent: TunnelMux, window: int | None = None) -> int:
    sid = gw.open_stream(window=window)
    agent.received(sid, Open(None, True, 80, 24, window=window or gw.default_window))
    return sid


def test_credit_is_per_stream() -> None:
    gw, agent = connected()
    a, b = open_both(gw, agent), open_both(gw, agent)
    assert (a, b) == (1, 2)
    agent.sent(a, Stdout(b"x" * W))
    assert agent.credit(a) == 0 and not agent.can_send(a, 1)
    assert agent.credit(b) == W  # a's stalled reader stops only a
    assert agent.plan_sends({a: 10_000, b: 500}) == [(b, 500)]
    with pytest.raises(LocalProtocolError):
        agent.sent(a, Stdout(b"y"))


def test_receiver_rejects_data_beyond_the_window() -> None:
    gw, agent = connected()
    sid = open_both(gw, agent)
    assert gw.received(sid, Stdout(b"x" * (W - 1)))
    assert gw.received(sid, Stdout(b"x"))
    with pytest.raises(ProtocolViolation) as info:
        gw.received(sid, Stdout(b"x"))
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


def test_acks_follow_consumption() -> None:
    gw, agent = connected()
    sid = open_both(gw, agent)
    gw.received(sid, Stdout(b"x" * 1000))
    assert gw.consumed(sid, 400, now=0.0) == 400  # first data after a quiet spell
    assert gw.consumed(sid, 600, now=0.01) is None  # wait for the timer or half a window
    assert gw.next_deadline() == pytest.approx(0.1)
    assert gw.poll_acks(0.05) == []
    assert gw.poll_acks(0.1) == [(sid, 1000)]
    gw.received(sid, Stdout(b"y" * (W // 2)))
    assert gw.consumed(sid, W // 2, now=0.11) == 1000 + W // 2  # half a window
    agent.sent(sid, Stdout(b"z" * (1000 + W // 2)))
    assert agent.received(sid, Ack(1000 + W // 2))
    assert agent.credit(sid) == W
    with pytest.raises(ProtocolViolation):
        agent.received(sid, Ack(10))  # backwards
    with pytest.raises(LocalProtocolError):
        gw.consumed(sid, 1, now=1.0)  # nothing buffered


def test_ack_now_sends_what_the_timer_holds_and_restarts_its_interval() -> None:
    gw, agent = connected()
    sid = open_both(gw, agent)
    gw.received(sid, Stdout(b"x" * 1000))
    assert gw.consumed(sid, 400, now=0.0) == 400
    assert gw.consumed(sid, 100, now=0.01) is None  # held for the timer
    assert gw.ack_now(sid, now=0.02) == 500  # a frame goes anyway: the ACK rides with it
    assert gw.ack_now(sid, now=0.03) is None  # nothing unacknowledged
    assert gw.next_deadline() is None
    assert gw.consumed(sid, 100, now=0.04) is None  # the interval counts from 0.02
    assert gw.poll_acks(0.11) == []
    assert gw.poll_acks(0.13) == [(sid, 600)]


def test_close_handshake() -> None:
    gw, agent = connected()
    sid = open_both(gw, agent)
    gw.sent(sid, Close("killed"))
    assert gw.credit(sid) == 0
    with pytest.raises(LocalProtocolError):
        gw.sent(sid, Stdin(b"x"))  # nothing after our own CLOSE
    assert gw.received(sid, Stdout(b"in flight")) is False  # dropped, not an error
    assert gw.received(sid, Ack(0)) is False
    assert agent.received(sid, Close("killed"))
    agent.sent(sid, Close("closed"))
    assert sid not in agent
    assert gw.received(sid, Close("closed"))
    assert sid not in gw
    with pytest.raises(ProtocolViolation):
        gw.received(sid, Stdout(b"late"))  # unknown stream now


def test_message_after_peer_close_is_an_error() -> None:
    gw, agent = connected()
    sid = open_both(gw, agent)
    gw.received(sid, Close("exited"))
    with pytest.raises(ProtocolViolation):
        gw.received(sid, Stdout(b"x"))


def test_open_rules() -> None:
    gw, agent = connected()
    sid = open_both(gw, agent)
    with pytest.raises(ProtocolViolation):
        agent.received(sid, Open(None, True, 80, 24))  # live id
    with pytest.raises(LocalProtocolError):
        gw.open_stream(sid)  # below next_id
    with pytest.raises(LocalProtocolError):
        agent.open_stream()  # agents never open
    with pytest.raises(ProtocolViolation):
        agent.received(99, Stdin(b"x"))  # never opened
    assert gw.open_stream(10) == 10 and gw.next_id == 11


def test_plan_sends_round_robin() -> None:
    gw, agent = connected()
    ids = [open_both(gw, agent) for _ in range(3)]
    pending = {ids[0]: 1 << 20, ids[1]: 1 << 20, ids[2]: 10}
    first = agent.plan_sends(pending, quantum=1000)
    assert first == [(ids[0], 1000), (ids[1], 1000), (ids[2], 10)]
    second = agent.plan_sends(pending, quantum=1000)
    assert [sid for sid, _ in second] == [ids[1], ids[2], ids[0]]  # rotated


def test_one_busy_stream_never_stalls_another() -> None:
    """Agent → gateway over a simulated link: stream A floods and its consumer stalls; stream B
    still delivers everything, and the gateway never buffers more than one window for A."""
    window = 16 * 1024
    gw_mux, ag_mux = connected(window)
    gw_codec, ag_codec = resumed(GW), resumed(AG)
    a, b = open_both(gw_mux, ag_mux), open_both(gw_mux, ag_mux)
    source = {a: bytes(range(256)) * 4096, b: b"keystroke echo " * 300}  # 1 MiB, 4.5 KB
    produced = {a: 0, b: 0}
    delivered: dict[int, bytearray] = {a: bytearray(), b: bytearray()}
    to_gw: deque[bytes] = deque()
    to_agent: deque[bytes] = deque()
    now = 0.0
    a_consuming = False

    def step() -> None:
        nonlocal now
        now += 0.01
        pending = {sid: len(source[sid]) - produced[sid] for sid in source}
        for sid, n in ag_mux.plan_sends(pending, quantum=4096):
            chunk = source[sid][produced[sid]:produced[sid] + n]
            ag_mux.sent(sid, Stdout(chunk))
            produced[sid] += n
            to_gw.append(joined(ag_codec.stdout(sid, chunk)))
        while to_gw:
            for sid, ev in gw_codec.receive_message(BIN, to_gw.popleft()):
                assert gw_mux.received(sid, ev) and isinstance(ev, Stdout)
                delivered[sid] += ev.data
                assert gw_mux.stream_statistics(sid).buffered <= window
        for sid in (a, b):
            buffered = gw_mux.stream_statistics(sid).buffered
            if sid == b or a_consuming:
                offset = gw_mux.consumed(sid, buffered, now)
                if offset is not None:
                    to_agent.append(joined(gw_codec.ack(sid, offset)))
        for sid, offset in gw_mux.poll_acks(now):
            to_agent.append(joined(gw_codec.ack(sid, offset)))
        while to_agent:
            for sid, ev in ag_codec.receive_message(BIN, to_agent.popleft()):
                assert ag_mux.received(sid, ev)

    for _ in range(50):
        step()
    assert bytes(delivered[b]) == source[b]
    assert ag_mux.stream_statistics(b).acked == len(source[b])
    assert len(delivered[a]) == window  # exactly one window, then a waits for credit
    assert ag_mux.credit(a) == 0
    assert gw_mux.statistics().buffered == window
    a_consuming = True
    for _ in range(400):
        step()
        if len(delivered[a]) == len(source[a]):
            break
    assert bytes(delivered[a]) == source[a]


# --- TunnelMux: resume ---------------------------------------------------------------------


def disconnect_with_traffic() -> tuple[TunnelMux, TunnelMux, int]:
    """Stream 1: the agent produced 1000 output bytes and sent 600, the gateway got 500; the
    gateway sent 3 stdin bytes, the agent got 2.  Then the link drops."""
    gw, agent = connected(4096)
    sid = open_both(gw, agent)
    agent.sent(sid, Stdout(b"o" * 600))
    gw.received(sid, Stdout(b"o" * 500))
    gw.consumed(sid, 500, now=0.0)
    gw.sent(sid, Stdin(b"abc"))
    agent.received(sid, Stdin(b"ab"))
    agent.consumed(sid, 2, now=0.0)
    gw.disconnected()
    agent.disconnected()
    assert gw.credit(sid) == 0 and agent.credit(sid) == 0  # nothing until RESUME
    return gw, agent, sid


def test_resume_resends_exactly_the_missing_bytes() -> None:
    gw, agent, sid = disconnect_with_traffic()
    ag_codec, gw_codec = TunnelCodec(AG), TunnelCodec(GW)
    mine = agent.make_resume([ResumeEntry(sid, 4096, out_start=0, out_offset=1000, in_acked=2)])
    assert mine.next_id == 2
    [(_, theirs)] = gw_codec.receive_message(BIN, joined(ag_codec.encode(0, mine)))
    assert theirs == mine
    answer = gw.make_resume([ResumeEntry(sid, 4096, out_start=0, out_offset=3, in_acked=500)])
    [(_, answer_rx)] = ag_codec.receive_message(BIN, joined(gw_codec.encode(0, answer)))
    assert isinstance(theirs, Resume) and isinstance(answer_rx, Resume)
    assert agent.apply_resume(answer_rx) == [
        ResumePlan(sid, ResumeAction.RESUME, ReplayRange(500, 1000))]
    assert gw.apply_resume(theirs) == [ResumePlan(sid, ResumeAction.RESUME, ReplayRange(2, 3))]
    assert agent.credit(sid) == 4096 and gw.credit(sid) == 4096  # a full window again
    # The resent output continues exactly at the gateway's offset.
    agent.sent(sid, Stdout(b"o" * 500))
    assert gw.received(sid, Stdout(b"o" * 500))
    assert gw.stream_statistics(sid).received == 1000


def test_resume_with_a_gap_when_the_ring_dropped_bytes() -> None:
    gw, agent, sid = disconnect_with_traffic()
    agent.make_resume([ResumeEntry(sid, 4096, out_start=700, out_offset=1000, in_acked=2)])
    theirs = Resume((ResumeEntry(sid, 4096, 700, 1000, 2),), next_id=2)
    answer = gw.make_resume([ResumeEntry(sid, 4096, 0, 3, 500)])
    [plan] = agent.apply_resume(answer)
    assert plan.replay == ReplayRange(700, 1000, gap_from=500) and plan.replay.lost == 200
    gw.apply_resume(theirs)
    with pytest.raises(ProtocolViolation):
        gw.received(sid, Gap(400, 700))  # a gap must start where the stream is
    assert gw.received(sid, Gap(500, 700))
    agent.sent(sid, Stdout(b"p" * 4096))  # a full window after the gap
    assert gw.received(sid, Stdout(b"p" * 4096))
    assert gw.consumed(sid, 4096, now=5.0) == 700 + 4096
    assert agent.received(sid, Ack(700 + 4096))


def test_resume_gateway_closes_streams_it_does_not_want() -> None:
    gw, agent, sid = disconnect_with_traffic()
    other = 2
    agent.received(other, Open(None, False, 80, 24, window=4096))
    entries = [ResumeEntry(sid, 4096, 0, 1000, 2), ResumeEntry(other, 4096, 0, 0, 0)]
    theirs = agent.make_resume(entries)
    gw_fresh = TunnelMux(GW, default_window=4096)  # another replica: knows only stream 1
    # It restored the session from the store: stdin offset 2, output offset 0.
    answer = gw_fresh.make_resume([ResumeEntry(sid, 4096, 2, 2, 0)])
    plans = gw_fresh.apply_resume(theirs)
    assert plans == [ResumePlan(sid, ResumeAction.RESUME, ReplayRange(2, 2)),
                     ResumePlan(other, ResumeAction.CLOSE)]
    assert gw_fresh.next_id == 3  # never reuses the agent's ids
    assert agent.apply_resume(answer) == [
        ResumePlan(sid, ResumeAction.RESUME, ReplayRange(0, 1000)),
        ResumePlan(other, ResumeAction.UNLISTED)]
    assert agent.credit(other) == 0
    gw_fresh.sent(other, Close("not wanted"))
    assert agent.received(other, Close("not wanted"))
    agent.sent(other, Close("closed"))
    assert gw_fresh.received(other, Close("closed"))
    assert other not in gw_fresh and other not in agent


def test_resume_validation() -> None:
    gw, agent, sid = disconnect_with_traffic()
    agent.make_resume([ResumeEntry(sid, 4096, 0, 1000, 2)])
    with pytest.raises(ProtocolViolation):  # lists a stream the agent does not have
        agent.apply_resume(Resume((ResumeEntry(sid, 4096, 0, 3, 500),
                                   ResumeEntry(5, 4096, 0, 0, 0))))
    with pytest.raises(ProtocolViolation):  # window mismatch
        agent.apply_resume(Resume((ResumeEntry(sid, 1024, 0, 3, 500),)))
    with pytest.raises(ProtocolViolation):  # claims output never produced
        agent.apply_resume(Resume((ResumeEntry(sid, 4096, 0, 3, 1001),)))
    with pytest.raises(LocalProtocolError):  # RESUME before make_resume
        TunnelMux(GW).apply_resume(Resume((), next_id=1))
    gw.make_resume([ResumeEntry(sid, 4096, 0, 3, 500), ResumeEntry(9, 4096, 0, 0, 0)])
    with pytest.raises(LocalProtocolError):  # we listed a stream the agent lost
        gw.apply_resume(Resume((ResumeEntry(sid, 4096, 0, 1000, 2),), next_id=2))


def test_resume_end_to_end_with_input_log_and_dedup() -> None:
    """The gateway keeps stdin in an InputLog, the agent dedups: after a resume the agent's
    process sees every keystroke exactly once."""
    log, dedup = InputLog(), InputDedup()
    typed = b"echo one\recho two\r"
    log.append(typed)
    seen = bytearray(dedup.feed(typed[:7]))  # 7 bytes arrived before the drop
    dedup.restart()  # new connection: the stream restarts at the accepted offset
    seen += dedup.feed(log.replay_from(dedup.accepted))
    assert bytes(seen) == typed
    dedup.restart(3)  # an over-eager resend from an older offset
    seen += dedup.feed(typed[3:])
    assert bytes(seen) == typed
