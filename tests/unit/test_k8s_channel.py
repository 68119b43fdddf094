"""Kubernetes channel protocol: byte-exact examples from the spec, every rejection, round trips.

Section numbers refer to shared/spec/k8s-exec-protocol.md.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
from podterm.protocol.events import Resize, StatusChunk, Stderr, Stdin, StdinClose, Stdout
from podterm.protocol.frame import FrameReader, encode_message
from podterm.protocol.k8s_channel import (
    BASE64_CHANNEL,
    CHANNEL,
    SUBPROTOCOLS,
    V4_BASE64_CHANNEL,
    V4_CHANNEL,
    V5_CHANNEL,
    K8sClientChannel,
    K8sServerChannel,
    K8sStatusError,
    exit_code_from_status,
    negotiate,
    status_exit_code_json,
    status_failure_json,
    status_internal_error_json,
    status_json,
    status_success_json,
)

BIN, TEXT = 2, 1
RAW = (V5_CHANNEL, V4_CHANNEL, CHANNEL)
B64 = (V4_BASE64_CHANNEL, BASE64_CHANNEL)

SUCCESS = b'{"metadata":{},"status":"Success"}'
EXIT3 = (b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code:'
         b' command terminated with exit code 3","reason":"NonZeroExitCode","details":{"causes":'
         b'[{"reason":"ExitCode","message":"3"}]}}')


def joined(msg: tuple[bytes, bytes | memoryview | bytearray]) -> bytes:
    prefix, payload = msg
    return prefix + bytes(payload)


def violation(call, *args) -> ProtocolViolation:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolViolation) as info:
        call(*args)
    return info.value


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- negotiation (§3.3, §3.4) -----------------------------------------------------------


@pytest.mark.parametrize(("offered", "chosen"), [
    (["v5.channel.k8s.io"], V5_CHANNEL),  # kubectl ≥ 1.30
    ("v5.channel.k8s.io,v4.channel.k8s.io".split(","), V5_CHANNEL),  # Python client ≥ 36
    (["v4.channel.k8s.io", "v5.channel.k8s.io"], V5_CHANNEL),  # server preference wins
    (["v4.channel.k8s.io"], V4_CHANNEL),  # Python client ≤ 35
    ([" base64.channel.k8s.io", "v4.base64.channel.k8s.io "], V4_BASE64_CHANNEL),
    (["base64.channel.k8s.io", "channel.k8s.io"], CHANNEL),
    (["base64.channel.k8s.io"], BASE64_CHANNEL),
    (["v3.channel.k8s.io", "v2.channel.k8s.io"], None),  # SPDY-only names
    ([], None),
])
def test_negotiate_prefers_v5_then_v4(offered: list[str], chosen: str | None) -> None:
    assert negotiate(offered) == chosen


def test_negotiate_respects_supported() -> None:
    assert negotiate([V5_CHANNEL, V4_CHANNEL], supported=[V4_CHANNEL]) == V4_CHANNEL
    assert negotiate([V5_CHANNEL], supported=[V4_CHANNEL]) is None


def test_unknown_subprotocol_refused() -> None:
    with pytest.raises(ValueError):
        K8sServerChannel("v3.channel.k8s.io")


# --- server encoding: byte-exact (§4.3, §5.1, §9, §2.3) ------------------------------------


@pytest.mark.parametrize("proto", (V5_CHANNEL, V4_CHANNEL))
def test_server_encodes_spec_table_bytes(proto: str) -> None:
    ch = K8sServerChannel(proto)
    assert ch.opcode == BIN
    assert joined(ch.ready_message()) == h("01")
    assert joined(ch.stdout(b"hi\n")) == h("01 68 69 0a")
    assert joined(ch.stderr(b"oops\n")) == h("02 6f 6f 70 73 0a")
    success = ch.status_success()
    assert success is not None and joined(success) == b"\x03" + SUCCESS
    assert len(SUCCESS) == 34


def test_server_stdout_is_not_copied() -> None:
    data = b"x" * 1000
    prefix, payload = K8sServerChannel(V5_CHANNEL).stdout(data)
    assert prefix == b"\x01" and payload is data


def test_server_wire_frames_match_spec() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert encode_message(*ch.stdout(b"hi\n")) == h("82 04 01 68 69 0a")
    big = encode_message(*ch.stdout(b"a" * 32768))
    assert big[:5] == h("82 7e 80 01 01") and len(big) == 4 + 32769


def test_ready_message_uses_lowest_requested_output_channel() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert joined(ch.ready_message(stdout=True, stderr=True)) == b"\x01"
    assert joined(ch.ready_message(stdout=False, stderr=True)) == b"\x02"
    assert joined(ch.ready_message(stdout=False, stderr=False)) == b"\x03"


def test_status_exit_code_exact_json() -> None:
    assert status_success_json() == SUCCESS
    assert status_exit_code_json(3) == EXIT3
    assert status_exit_code_json(0) == SUCCESS
    msg = K8sServerChannel(V5_CHANNEL).status_exit_code(3)
    assert msg is not None and joined(msg) == b"\x03" + EXIT3


@pytest.mark.parametrize("bad", [-1, 256, 300, True, 3.0])
def test_status_exit_code_outside_0_255_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        status_exit_code_json(bad)  # type: ignore[arg-type]


def test_status_internal_error_exact_json() -> None:
    assert status_internal_error_json("boom") == (
        b'{"metadata":{},"status":"Failure","message":"Internal error occurred: boom",'
        b'"reason":"InternalError","details":{"causes":[{"message":"boom"}]},"code":500}')


def test_status_failure_exact_json_and_go_html_escaping() -> None:
    assert status_failure_json("gateway draining", "ServiceUnavailable", 503) == (
        b'{"metadata":{},"status":"Failure","message":"gateway draining",'
        b'"reason":"ServiceUnavailable","code":503}')
    # Go's encoding/json escapes <, > and & (kubectl decodes either form).
    assert status_failure_json("a<b>&c", "X") == (
        b'{"metadata":{},"status":"Failure","message":"a\\u003cb\\u003e\\u0026c","reason":"X"}')
    assert json.loads(status_failure_json("a<b>&c \u00e9", "X"))["message"] == "a<b>&c \u00e9"


def test_status_json_pre_upgrade_exact_bytes() -> None:
    # §9 example.
    assert status_json(404, "NotFound", 'pods "missing" not found',
                       {"name": "missing", "kind": "pods"}) == (
        b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
        b'"message":"pods \\"missing\\" not found","reason":"NotFound",'
        b'"details":{"name":"missing","kind":"pods"},"code":404}')
    # §2.3 401 answer.
    assert status_json(401, "Unauthorized", "Unauthorized") == (
        b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
        b'"message":"Unauthorized","reason":"Unauthorized","code":401}')


def test_status_json_details_in_go_field_order() -> None:
    body = status_json(403, "Forbidden", "no", {"kind": "pods", "name": "mypod"})
    assert b'"details":{"name":"mypod","kind":"pods"}' in body
    with pytest.raises(ValueError):
        status_json(400, "BadRequest", "x", {"bogus": 1})


def test_server_never_emits_close_signals() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    messages = [ch.ready_message(), ch.stdout(b"a"), ch.stderr(b"b"), ch.status_success(),
                ch.status_exit_code(7), ch.status_failure("x", "InternalError", 500)]
    for msg in messages:
        assert msg is not None and msg[0][0] != 0xFF


# --- v1 and base64 variants (§4.4, §4.5) ---------------------------------------------------


def test_v1_status_is_text_and_nothing_on_success() -> None:
    ch = K8sServerChannel(CHANNEL)
    assert ch.status_success() is None
    assert ch.status_exit_code(0) is None
    msg = ch.status_exit_code(3)
    assert msg is not None
    assert joined(msg) == b"\x03command terminated with non-zero exit code: command terminated with exit code 3"
    assert joined(ch.status_failure("it broke", "InternalError", 500)) == b"\x03it broke"


def test_base64_spec_examples() -> None:
    ch = K8sServerChannel(V4_BASE64_CHANNEL)
    assert ch.opcode == TEXT
    assert ch.receive_message(TEXT, h("30 5a 6d 39 76 43 67 3d 3d")) == [Stdin(b"foo\n")]
    assert joined(ch.stdout(b"hi\n")) == b"1aGkK"
    assert joined(ch.ready_message()) == b"1"
    status = ch.status_success()
    assert status is not None and joined(status) == b"3" + base64.b64encode(SUCCESS)


def test_base64_unversioned_status_is_text() -> None:
    ch = K8sServerChannel(BASE64_CHANNEL)
    assert ch.status_success() is None
    msg = ch.status_exit_code(2)
    assert msg is not None and msg[0] == b"3"
    assert base64.b64decode(msg[1]).endswith(b"exit code 2")


def test_base64_accepts_binary_and_skips_newlines_like_go() -> None:
    ch = K8sServerChannel(BASE64_CHANNEL)
    assert ch.receive_message(BIN, b"0Zm9v\r\nCg==") == [Stdin(b"foo\n")]


@pytest.mark.parametrize("payload", [b"0Zm9vCg", b"0Zm9v!Cg==", b"0Z", b"0=Zm9vCg=="])
def test_reject_invalid_base64(payload: bytes) -> None:
    err = violation(K8sServerChannel(V4_BASE64_CHANNEL).receive_message, TEXT, payload)
    assert err.close_code == CloseCode.INVALID_PAYLOAD


def test_base64_resize_and_unknown_channel_char() -> None:
    ch = K8sServerChannel(V4_BASE64_CHANNEL)
    body = base64.b64encode(b'{"Width":80,"Height":24}\n')
    assert ch.receive_message(TEXT, b"4" + body) == [Resize(80, 24)]
    assert ch.receive_message(TEXT, b"x!!!not base64") == []  # channel 'x'-'0' = 72: ignored
    assert ch.statistics().unknown_channel == 1


# --- server decoding: what kubectl and the Python client send (§4.3, §6) -------------------


def test_decode_kubectl_stdin_bytes() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, h("00 65 63 68 6f 20 68 69 0d")) == [Stdin(b"echo hi\r")]


def test_decode_kubectl_resize_bytes() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    wire = h("04 7b 22 57 69 64 74 68 22 3a 38 30 2c 22 48 65 69 67 68 74 22 3a 32 34 7d 0a")
    assert wire == b'\x04{"Width":80,"Height":24}\n'
    assert ch.receive_message(BIN, wire) == [Resize(80, 24)]


def test_decode_python_client_text_messages() -> None:
    ch = K8sServerChannel(V4_CHANNEL)
    assert ch.receive_message(TEXT, b'\x04{"Width": 132, "Height": 43}') == [Resize(132, 43)]
    assert ch.receive_message(TEXT, b"\x00text\n") == [Stdin(b"text\n")]


def test_decode_through_the_frame_reader() -> None:
    """The masked client frames of §4.3 go through FrameReader into the channel."""
    reader = FrameReader(is_server=True)
    ch = K8sServerChannel(V5_CHANNEL)
    wire = h("82 84 54 15 dd 27 54 7d b4 2d") + h("82 82 a3 48 fd d8 5c 48")
    events = [e for op, payload in reader.feed(wire) for e in ch.receive_message(op, payload)]
    assert events == [Stdin(b"hi\n"), StdinClose()]


def test_resize_keys_case_insensitive_unknown_ignored() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b'\x04{"width":100,"HEIGHT":30,"x":{"y":[1,{"z":null}]}}') \
        == [Resize(100, 30)]
    # Go assigns keys in order: the last one matching a field wins.
    assert ch.receive_message(BIN, b'\x04{"Width":1,"width":90,"Height":20}') == [Resize(90, 20)]


def test_resize_zero_size_dropped_and_counted() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b'\x04{"Width":0,"Height":24}') == []
    assert ch.receive_message(BIN, b'\x04{"Height":24}') == []
    assert ch.receive_message(BIN, b'\x04{"Width":null,"Height":24}') == []
    assert ch.statistics().resizes_dropped == 3


def test_resize_stream_spans_messages_and_packs_several() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b'\x04{"Wid') == []
    assert ch.receive_message(BIN, b'\x04th":81,"Height":25}\n{"Width":80,') == [Resize(81, 25)]
    assert ch.receive_message(BIN, b'\x04"Height":24}\n \t{"Width":1,"Height":2}') == [
        Resize(80, 24), Resize(1, 2)]


def test_resize_string_with_braces_is_not_a_delimiter() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b'\x04{"note":"}{\\"","Width":5,"Height":6}') == [Resize(5, 6)]


@pytest.mark.parametrize("body", [
    b'{"Width":}', b'[1,2]', b'80', b'{"Width":80,"Height":24]', b'{"Width":-1,"Height":5}',
    b'{"Width":70000,"Height":5}', b'{"Width":80.0,"Height":5}', b'{"Width":"80","Height":5}',
    b'{"Width":true,"Height":5}', b'{"Width":NaN,"Height":5}', b'{"a":"\xff","Width":1}',
    b'{' + b'[' * 40 + b']' * 40 + b'}',
])
def test_reject_bad_resize_json(body: bytes) -> None:
    err = violation(K8sServerChannel(V5_CHANNEL).receive_message, BIN, b"\x04" + body)
    assert err.close_code == CloseCode.INVALID_PAYLOAD


def test_reject_resize_value_too_big() -> None:
    ch = K8sServerChannel(V5_CHANNEL, max_resize_bytes=64)
    err = violation(ch.receive_message, BIN, b'\x04{"x":"' + b"a" * 100)
    assert err.close_code == CloseCode.MESSAGE_TOO_BIG
    ch = K8sServerChannel(V5_CHANNEL, max_resize_bytes=64)
    err = violation(ch.receive_message, BIN, b'\x04{"x":"' + b"a" * 100 + b'"}')
    assert err.close_code == CloseCode.MESSAGE_TOO_BIG


def test_resize_violation_keeps_completed_sizes_in_partial() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    err = violation(ch.receive_message, BIN, b'\x04{"Width":3,"Height":4}{"Width":}')
    assert err.partial == [Resize(3, 4)]


# --- v5 CLOSE signal (§4.7, §7.1) ----------------------------------------------------------


def test_close_signal_stdin() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b"\xff\x00") == [StdinClose()]
    assert ch.stdin_closed
    assert ch.receive_message(BIN, b"\xff\x00") == []  # idempotent, as the real server
    assert ch.receive_message(BIN, b"\x00late") == []  # stdin is closed: ignored
    assert ch.statistics().ignored == 2


@pytest.mark.parametrize("payload", [b"\xff", b"\xff\x00\x00", b"\xff\x00hello"])
def test_reject_close_signal_wrong_length(payload: bytes) -> None:
    err = violation(K8sServerChannel(V5_CHANNEL).receive_message, BIN, payload)
    assert err.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("channel", [5, 6, 254, 255])
def test_reject_close_signal_for_channel_that_does_not_exist(channel: int) -> None:
    err = violation(K8sServerChannel(V5_CHANNEL).receive_message, BIN, bytes((0xFF, channel)))
    assert err.close_code == CloseCode.PROTOCOL_ERROR


def test_close_signal_for_existing_other_channel_is_accepted() -> None:
    # kube-apiserver's table has channels 0-4; closing 1-4 is legal (a no-op for
    # output channels, the end of resizes for 4).
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b"\xff\x01") == []
    assert ch.receive_message(BIN, b"\xff\x04") == []
    assert ch.receive_message(BIN, b'\x04{"Width":80,"Height":24}') == []
    assert ch.receive_message(BIN, b"\x00still open") == [Stdin(b"still open")]


@pytest.mark.parametrize("proto", (V4_CHANNEL, CHANNEL))
def test_ff_is_an_unknown_channel_before_v5(proto: str) -> None:
    ch = K8sServerChannel(proto)
    assert ch.receive_message(BIN, b"\xff\x00") == []
    assert ch.receive_message(BIN, b"\xff") == []
    assert ch.statistics().unknown_channel == 2


# --- ignored messages (§4.1, §7.5) ---------------------------------------------------------


def test_empty_and_unknown_messages_are_ignored_and_counted() -> None:
    ch = K8sServerChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b"") == []
    assert ch.receive_message(BIN, b"\x00") == []  # bare channel byte
    assert ch.receive_message(BIN, b"\x01output?") == []  # output channel from a client
    assert ch.receive_message(BIN, b"\x03status?") == []
    assert ch.receive_message(BIN, b"\x07what") == []
    assert ch.receive_message(BIN, b"\x09") == []
    stats = ch.statistics()
    assert (stats.ignored, stats.unknown_channel) == (4, 2)


def test_unrequested_streams_are_ignored() -> None:
    ch = K8sServerChannel(V5_CHANNEL, stdin=False, tty=False)
    assert ch.receive_message(BIN, b"\x00typed") == []
    assert ch.receive_message(BIN, b'\x04{"Width":80,"Height":24}') == []
    assert ch.receive_message(BIN, b"\xff\x00") == []
    assert ch.statistics().ignored == 3


def test_control_opcode_is_a_caller_bug() -> None:
    with pytest.raises(LocalProtocolError):
        K8sServerChannel(V5_CHANNEL).receive_message(0x9, b"\x00x")
    with pytest.raises(LocalProtocolError):
        K8sClientChannel(V5_CHANNEL).receive_message(0x8, b"\x01x")


# --- client role (§11, §5.2) ---------------------------------------------------------------


def test_client_encodes_kubectl_bytes() -> None:
    ch = K8sClientChannel(V5_CHANNEL)
    assert joined(ch.stdin(b"echo hi\r")) == h("00 65 63 68 6f 20 68 69 0d")
    assert joined(ch.resize(80, 24)) == b'\x04{"Width":80,"Height":24}\n'
    assert joined(ch.close_stdin()) == h("ff 00")
    assert encode_message(*ch.stdin(b"hi\n"), mask_key=h("54 15 dd 27")) == \
        h("82 84 54 15 dd 27 54 7d b4 2d")
    assert encode_message(*ch.close_stdin(), mask_key=h("a3 48 fd d8")) == \
        h("82 82 a3 48 fd d8 5c 48")


@pytest.mark.parametrize("proto", (V4_CHANNEL, V4_BASE64_CHANNEL, CHANNEL))
def test_client_has_no_stdin_close_before_v5(proto: str) -> None:
    ch = K8sClientChannel(proto)
    assert not ch.supports_stdin_close
    with pytest.raises(LocalProtocolError):
        ch.close_stdin()


@pytest.mark.parametrize(("cols", "rows"), [(0, 24), (80, 0), (65536, 1), (-1, 5)])
def test_client_resize_bounds(cols: int, rows: int) -> None:
    with pytest.raises(ValueError):
        K8sClientChannel(V5_CHANNEL).resize(cols, rows)


def test_client_decodes_a_session() -> None:
    ch = K8sClientChannel(V5_CHANNEL)
    events = []
    for msg in (b"\x01", b"\x01hi\n", b"\x02oops\n", b"\x03" + EXIT3[:40], b"\x03" + EXIT3[40:]):
        events += ch.receive_message(BIN, msg)
    assert events == [Stdout(b"hi\n"), Stderr(b"oops\n"), StatusChunk(EXIT3[:40]),
                      StatusChunk(EXIT3[40:])]
    assert ch.status_bytes == EXIT3
    assert ch.exit_code() == 3


def test_client_silence_means_success() -> None:
    assert K8sClientChannel(V5_CHANNEL).exit_code() == 0


def test_client_rejects_text_from_raw_server() -> None:
    err = violation(K8sClientChannel(V5_CHANNEL).receive_message, TEXT, b"\x01hi")
    assert err.close_code == CloseCode.UNSUPPORTED_DATA


def test_client_base64_decoding() -> None:
    ch = K8sClientChannel(V4_BASE64_CHANNEL)
    assert ch.receive_message(TEXT, b"1") == []
    assert ch.receive_message(TEXT, b"1aGkK") == [Stdout(b"hi\n")]
    assert ch.receive_message(TEXT, b"3" + base64.b64encode(SUCCESS)) == [StatusChunk(SUCCESS)]
    assert ch.exit_code() == 0
    assert joined(ch.stdin(b"foo\n")) == b"0Zm9vCg=="


def test_client_close_signal_from_server() -> None:
    ch = K8sClientChannel(V5_CHANNEL)
    assert ch.receive_message(BIN, b"\xff\x01") == []
    assert violation(ch.receive_message, BIN, b"\xff\x01\x02").close_code == 1002
    assert violation(ch.receive_message, BIN, b"\xff\x09").close_code == 1002


def test_client_ignores_input_and_unknown_channels() -> None:
    ch = K8sClientChannel(V4_CHANNEL)
    assert ch.receive_message(BIN, b"\x00x") == []
    assert ch.receive_message(BIN, b"\x04x") == []
    assert ch.receive_message(BIN, b"\x0bx") == []
    assert ch.statistics().unknown_channel == 1


def test_client_status_bounded() -> None:
    ch = K8sClientChannel(V5_CHANNEL, max_status_bytes=100)
    ch.receive_message(BIN, b"\x03" + b"x" * 60)
    assert violation(ch.receive_message, BIN, b"\x03" + b"x" * 60).close_code == 1009


def test_client_v1_errors_are_text() -> None:
    ch = K8sClientChannel(CHANNEL)
    assert ch.exit_code() == 0
    ch.receive_message(BIN, b"\x03container not found")
    with pytest.raises(K8sStatusError) as info:
        ch.exit_code()
    assert info.value.message == "error executing remote command: container not found"


# --- exit_code_from_status: client-go's errorDecoderV4 (§5.2) --------------------------------


@pytest.mark.parametrize(("status", "code"), [
    (b"", 0),
    (SUCCESS, 0),
    (EXIT3, 3),
    (status_exit_code_json(255), 255),
    (b'{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":'
     b'[{"reason":"Other","message":"9"},{"reason":"ExitCode","message":"007"}]}}', 7),
    (b'{"STATUS":"Success"}', 0),  # Go matches field names case-insensitively
    (b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success"}', 0),
])
def test_exit_code_from_status(status: bytes, code: int) -> None:
    assert exit_code_from_status(status) == code


@pytest.mark.parametrize(("status", "close_code"), [
    (b"not json", 1007),
    (b"[1]", 1007),
    (b'{"status":5}', 1007),
    (b'{"status":"Failure","code":"500"}', 1007),
    (b'{"status":"Weird"}', 1002),
    (b"null", 1002),
    (b'{"status":"Failure","reason":"NonZeroExitCode"}', 1002),
    (b'{"status":"Failure","reason":"NonZeroExitCode","details":{}}', 1002),
    (b'{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":'
     b'[{"reason":"ExitCode","message":"300"}]}}', 1002),
    (b'{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":'
     b'[{"reason":"ExitCode","message":"+3"}]}}', 1002),
    (b'{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":'
     b'[{"reason":"ExitCode","message":""}]}}', 1002),
    (b'{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":"x"}}', 1007),
])
def test_exit_code_protocol_errors(status: bytes, close_code: int) -> None:
    assert violation(exit_code_from_status, status).close_code == close_code


def test_exit_code_other_failure_is_a_status_error() -> None:
    with pytest.raises(K8sStatusError) as info:
        exit_code_from_status(status_internal_error_json("container gone"))
    err = info.value
    assert (err.message, err.reason, err.code) == (
        "Internal error occurred: container gone", "InternalError", 500)


# --- properties ----------------------------------------------------------------------------

sizes = st.tuples(st.integers(1, 0xFFFF), st.integers(1, 0xFFFF))


@settings(max_examples=200, deadline=None)
@given(proto=st.sampled_from(SUBPROTOCOLS),
       actions=st.lists(st.one_of(st.binary(min_size=1, max_size=300).map(lambda b: ("in", b)),
                                  sizes.map(lambda s: ("size", s))), max_size=20))
def test_client_to_server_round_trip(proto: str, actions: list[tuple[str, object]]) -> None:
    client, server = K8sClientChannel(proto), K8sServerChannel(proto)
    expected: list[object] = []
    got: list[object] = []
    for kind, value in actions:
        if kind == "in":
            msg = client.stdin(value)  # type: ignore[arg-type]
            expected.append(Stdin(value))  # type: ignore[arg-type]
        else:
            cols, rows = value  # type: ignore[misc]
            msg = client.resize(cols, rows)
            expected.append(Resize(cols, rows))
        got += server.receive_message(client.opcode, joined(msg))
    if client.supports_stdin_close:
        got += server.receive_message(client.opcode, joined(client.close_stdin()))
        expected.append(StdinClose())
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(proto=st.sampled_from(SUBPROTOCOLS),
       chunks=st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=300)), max_size=20),
       code=st.integers(0, 255))
def test_server_to_client_round_trip(proto: str, chunks: list[tuple[bool, bytes]],
                                     code: int) -> None:
    server, client = K8sServerChannel(proto), K8sClientChannel(proto)
    got = client.receive_message(server.opcode, joined(server.ready_message()))
    expected: list[object] = []
    for is_out, data in chunks:
        msg = server.stdout(data) if is_out else server.stderr(data)
        got += client.receive_message(server.opcode, joined(msg))
        expected.append(Stdout(data) if is_out else Stderr(data))
    assert got == expected
    status = server.status_exit_code(code)
    if status is not None:
        client.receive_message(server.opcode, joined(status))
    if server.has_json_status or code == 0:
        assert client.exit_code() == code
    else:
        with pytest.raises(K8sStatusError):
            client.exit_code()


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(sizes, max_size=10), style=st.sampled_from(["kubectl", "python", "spaced"]),
       cuts=st.lists(st.integers(0, 400), max_size=10))
def test_resize_fragmentation_is_irrelevant(sizes: list[tuple[int, int]], style: str,
                                            cuts: list[int]) -> None:
    """However the resize stream is cut into messages, the same sizes come out."""
    fmt = {"kubectl": '{"Width":%d,"Height":%d}\n', "python": '{"Width": %d, "Height": %d}',
           "spaced": ' {"height":%d ,"WIDTH" :%d}\r\n'}[style]
    pieces = [(fmt % ((r, c) if style == "spaced" else (c, r))).encode() for c, r in sizes]
    stream = b"".join(pieces)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    ch = K8sServerChannel(V5_CHANNEL)
    got = []
    for a, b in zip(points, points[1:], strict=False):
        got += ch.receive_message(BIN, b"\x04" + stream[a:b])
    assert got == [Resize(c, r) for c, r in sizes]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=st.sampled_from(SUBPROTOCOLS),
       messages=st.lists(st.tuples(st.sampled_from([TEXT, BIN]),
                                   st.one_of(st.binary(max_size=64),
                                             st.sampled_from([b"\x04{", b"\x04}", b"\x04{\"", b"\xff\x00",
                                                              b"\x04 ", b"4e30=", b"0Zm9v"]))),
                         max_size=30))
def test_garbage_gives_events_or_violations_only(proto: str,
                                                 messages: list[tuple[int, bytes]]) -> None:
    for ch in (K8sServerChannel(proto, max_resize_bytes=32), K8sClientChannel(proto)):
        for opcode, payload in messages:
            try:
                events = ch.receive_message(opcode, payload)
            except ProtocolViolation as exc:
                assert exc.close_code in (1002, 1003, 1007, 1009)
                break
            assert all(isinstance(e, Stdin | StdinClose | Resize | Stdout | Stderr | StatusChunk)
                       for e in events)
        if isinstance(ch, K8sClientChannel):
            try:
                ch.exit_code()
            except (ProtocolViolation, K8sStatusError):
                pass
