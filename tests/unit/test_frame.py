"""RFC 6455 frame reader and writer: one rule per test, run against both codecs.

Every test takes the ``impl`` fixture, so it runs once on the compiled codec
(``podterm._native``) and once on the pure-Python twin (``podterm.protocol``).
Frames are built here byte by byte (``raw``), never with the encoder under
test, and every input is fed three ways (h11's ``tr()``): whole, one byte at a
time, and followed by the first bytes of another frame.

The rejection tests mirror the numbered checks in the docstring of
``podterm/protocol/frame.py`` and assert the exact close code and message.
"""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace
from typing import Any

import pytest

from podterm.errors import CloseCode, ProtocolViolation
from podterm.protocol import codec
from podterm.protocol import frame as twin

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
KEY = bytes.fromhex("37fa213d")  # the key of RFC 6455 §5.7's examples


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    """The codec API of one implementation (see ``codec.load``)."""
    try:
        return codec.load(request.param)
    except ImportError as exc:
        if os.environ.get("PODTERM_NATIVE") == "require" or os.environ.get("CI"):
            raise
        pytest.skip(f"native codec not built: {exc}")


def xor(data: bytes, key: bytes) -> bytes:
    """Reference masking, one byte at a time (RFC 6455 §5.3)."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def raw(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
        key: bytes | None = KEY, length: int | None = None, len_bytes: int | None = None) -> bytes:
    """One frame, built by hand.

    ``key=None`` leaves it unmasked; ``length`` overrides the declared length;
    ``len_bytes`` (0, 2 or 8) forces the length encoding.
    """
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    mbit = 0x80 if key is not None else 0
    if len_bytes is None:
        len_bytes = 0 if n < 126 else 2 if n < 0x10000 else 8
    if len_bytes == 0:
        head = bytes((b0, mbit | n))
    elif len_bytes == 2:
        head = bytes((b0, mbit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack("!Q", n)
    if key is None:
        return head + payload
    return head + key + xor(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def reader(impl: SimpleNamespace, **kwargs: Any) -> Any:
    kwargs.setdefault("is_server", True)
    return impl.FrameReader(**kwargs)


# A partial header left after a complete input: it must be held, not parsed.
TRAILER = bytes((0x82, 0xFE, 0x01))


def parse(impl: SimpleNamespace, data: bytes, **kwargs: Any) -> list[tuple[int, bytes]]:
    """Messages from ``data``, asserting the three ways of feeding agree."""
    whole = reader(impl, **kwargs)
    expected: list[tuple[int, bytes]] = whole.feed(data)
    assert whole.buffered == 0

    bytewise = reader(impl, **kwargs)
    got: list[tuple[int, bytes]] = []
    for i in range(len(data)):
        got += bytewise.feed(data[i:i + 1])
    assert got == expected
    assert bytewise.buffered == 0

    trailing = reader(impl, **kwargs)
    assert trailing.feed(data + TRAILER[: 3 if kwargs.get("is_server", True) else 1]) == expected
    assert trailing.buffered == (3 if kwargs.get("is_server", True) else 1)
    return expected


def reject(impl: SimpleNamespace, data: bytes, **kwargs: Any) -> ProtocolViolation:
    """The violation ``data`` causes, asserting the three ways of feeding agree."""
    with pytest.raises(ProtocolViolation) as whole:
        reader(impl, **kwargs).feed(data)

    bytewise = reader(impl, **kwargs)
    with pytest.raises(ProtocolViolation) as split:
        for i in range(len(data)):
            bytewise.feed(data[i:i + 1])
    assert split.value == whole.value

    with pytest.raises(ProtocolViolation) as trailing:
        reader(impl, **kwargs).feed(data + b"\x82\x80" + KEY)
    assert trailing.value == whole.value
    return whole.value


def assert_violation(exc: ProtocolViolation, message: str, code: int) -> None:
    assert (exc.message, exc.close_code) == (message, code)
    assert isinstance(exc.close_code, CloseCode)


# -- valid input --------------------------------------------------------------


def test_rfc_example_single_frame_masked_text(impl: SimpleNamespace) -> None:
    data = bytes.fromhex("818537fa213d7f9f4d5158")  # RFC 6455 §5.7
    assert parse(impl, data) == [(OP_TEXT, b"Hello")]


def test_rfc_example_unmasked_text_in_client_role(impl: SimpleNamespace) -> None:
    data = bytes.fromhex("810548656c6c6f")  # RFC 6455 §5.7
    assert parse(impl, data, is_server=False) == [(OP_TEXT, b"Hello")]


def test_rfc_example_fragmented_unmasked_text(impl: SimpleNamespace) -> None:
    data = bytes.fromhex("010348656c") + bytes.fromhex("80026c6f")  # RFC 6455 §5.7
    assert parse(impl, data, is_server=False) == [(OP_TEXT, b"Hello")]


def test_rfc_example_masked_pong(impl: SimpleNamespace) -> None:
    data = bytes.fromhex("8a8537fa213d7f9f4d5158")  # RFC 6455 §5.7
    assert parse(impl, data) == [(OP_PONG, b"Hello")]


def test_binary_message(impl: SimpleNamespace) -> None:
    payload = bytes(range(256))
    assert parse(impl, raw(OP_BINARY, payload)) == [(OP_BINARY, payload)]


def test_empty_payloads(impl: SimpleNamespace) -> None:
    data = raw(OP_BINARY) + raw(OP_TEXT) + raw(OP_PING) + raw(OP_PONG) + raw(OP_CLOSE)
    assert parse(impl, data) == [(OP_BINARY, b""), (OP_TEXT, b""), (OP_PING, b""),
                                 (OP_PONG, b""), (OP_CLOSE, b"")]


def test_payload_is_unmasked_at_every_key_offset(impl: SimpleNamespace) -> None:
    # Lengths 0..40 cover the 8-byte word loop and every tail length.
    payloads = [bytes((i * 7 + j) & 0xFF for j in range(i)) for i in range(41)]
    data = b"".join(raw(OP_BINARY, p) for p in payloads)
    assert parse(impl, data) == [(OP_BINARY, p) for p in payloads]


@pytest.mark.parametrize("n", [0, 1, 125])
def test_7_bit_length(impl: SimpleNamespace, n: int) -> None:
    data = raw(OP_BINARY, b"a" * n)
    assert data[1] & 0x7F == n
    assert parse(impl, data) == [(OP_BINARY, b"a" * n)]


@pytest.mark.parametrize("n", [126, 127, 0xFFFF])
def test_16_bit_length(impl: SimpleNamespace, n: int) -> None:
    data = raw(OP_BINARY, b"b" * n)
    assert data[1] & 0x7F == 126
    assert parse(impl, data) == [(OP_BINARY, b"b" * n)]


@pytest.mark.parametrize("n", [0x10000, 0x10001])
def test_64_bit_length(impl: SimpleNamespace, n: int) -> None:
    payload = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
    data = raw(OP_BINARY, payload)
    assert data[1] & 0x7F == 127
    assert reader(impl).feed(data) == [(OP_BINARY, payload)]
    chunked = reader(impl)
    got = []
    for i in range(0, len(data), 1000):
        got += chunked.feed(data[i:i + 1000])
    assert got == [(OP_BINARY, payload)]


def test_non_minimal_length_encoding_is_accepted(impl: SimpleNamespace) -> None:
    # Not among the documented checks: a 16- or 64-bit length for a short
    # payload is tolerated (as by most servers); the payload is what counts.
    data = raw(OP_BINARY, b"hi", len_bytes=2) + raw(OP_BINARY, b"yo", len_bytes=8)
    assert parse(impl, data) == [(OP_BINARY, b"hi"), (OP_BINARY, b"yo")]


def test_fragmented_message_is_reassembled(impl: SimpleNamespace) -> None:
    data = (raw(OP_BINARY, b"ab", fin=False) + raw(OP_CONT, b"", fin=False)
            + raw(OP_CONT, b"cd", fin=False) + raw(OP_CONT, b"e"))
    assert parse(impl, data) == [(OP_BINARY, b"abcde")]


def test_control_frames_interleaved_in_fragmented_message(impl: SimpleNamespace) -> None:
    data = (raw(OP_TEXT, b"he", fin=False) + raw(OP_PING, b"p1")
            + raw(OP_CONT, b"ll", fin=False) + raw(OP_PONG, b"p2") + raw(OP_CLOSE, close_payload(1000))
            + raw(OP_CONT, b"o"))
    assert parse(impl, data) == [(OP_PING, b"p1"), (OP_PONG, b"p2"),
                                 (OP_CLOSE, close_payload(1000)), (OP_TEXT, b"hello")]


def test_character_split_across_fragments_is_valid(impl: SimpleNamespace) -> None:
    text = "€🙂".encode()
    data = raw(OP_TEXT, text[:2], fin=False) + raw(OP_CONT, text[2:5], fin=False) + raw(OP_CONT, text[5:])
    assert parse(impl, data) == [(OP_TEXT, text)]


def test_large_fragmented_message(impl: SimpleNamespace) -> None:
    part = bytes(range(256)) * 300
    data = raw(OP_BINARY, part, fin=False) + raw(OP_PING, b"!") + raw(OP_CONT, part)
    assert reader(impl).feed(data) == [(OP_PING, b"!"), (OP_BINARY, part + part)]
    chunked = reader(impl)
    got = []
    for i in range(0, len(data), 4093):
        got += chunked.feed(data[i:i + 4093])
    assert got == [(OP_PING, b"!"), (OP_BINARY, part + part)]


def test_client_role_reads_unmasked_frames(impl: SimpleNamespace) -> None:
    assert parse(impl, raw(OP_BINARY, b"x", key=None), is_server=False) == [(OP_BINARY, b"x")]


def test_close_frame_with_code_and_reason(impl: SimpleNamespace) -> None:
    payload = close_payload(4401, "no entry ✋".encode())
    assert parse(impl, raw(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                                  1013, 1014, 3000, 4000, 4999])
def test_close_frame_with_allowed_code(impl: SimpleNamespace, code: int) -> None:
    assert parse(impl, raw(OP_CLOSE, close_payload(code))) == [(OP_CLOSE, close_payload(code))]


def test_frame_of_exactly_max_frame_bytes_is_accepted(impl: SimpleNamespace) -> None:
    data = raw(OP_BINARY, b"m" * 200)
    assert reader(impl, max_frame_bytes=200).feed(data) == [(OP_BINARY, b"m" * 200)]


def test_message_of_exactly_max_message_bytes_is_accepted(impl: SimpleNamespace) -> None:
    data = raw(OP_BINARY, b"m" * 150, fin=False) + raw(OP_CONT, b"n" * 50)
    assert reader(impl, max_message_bytes=200).feed(data) == [(OP_BINARY, b"m" * 150 + b"n" * 50)]


def test_message_limit_counts_each_message_afresh(impl: SimpleNamespace) -> None:
    data = raw(OP_BINARY, b"m" * 150) + raw(OP_BINARY, b"n" * 150)
    assert reader(impl, max_message_bytes=200).feed(data) == [(OP_BINARY, b"m" * 150),
                                                              (OP_BINARY, b"n" * 150)]


def test_control_frames_do_not_count_toward_message_limit(impl: SimpleNamespace) -> None:
    data = raw(OP_BINARY, b"m" * 125, fin=False) + raw(OP_PING, b"p" * 125) + raw(OP_CONT, b"")
    assert reader(impl, max_message_bytes=125).feed(data) == [(OP_PING, b"p" * 125),
                                                              (OP_BINARY, b"m" * 125)]


def test_feed_accepts_any_bytes_like(impl: SimpleNamespace) -> None:
    data = raw(OP_BINARY, b"abc")
    for chunk in (bytearray(data), memoryview(data), memoryview(b"??" + data)[2:]):
        assert reader(impl).feed(chunk) == [(OP_BINARY, b"abc")]


def test_feed_of_nothing_returns_nothing(impl: SimpleNamespace) -> None:
    r = reader(impl)
    assert r.feed(b"") == []
    assert r.feed(raw(OP_BINARY, b"abc")[:4]) == []
    assert r.feed(b"") == []
    assert r.buffered == 4


def test_buffered_counts_partial_header_message_and_control_frame(impl: SimpleNamespace) -> None:
    r = reader(impl)
    r.feed(raw(OP_BINARY, b"12345", fin=False))
    assert r.buffered == 5  # message so far
    ping = raw(OP_PING, b"pp")
    r.feed(ping[:-1])
    assert r.buffered == 5 + 1  # plus one byte of the ping's payload
    r.feed(ping[-1:] + raw(OP_CONT, b"6")[:3])
    assert r.buffered == 5 + 3  # plus three header bytes
    assert r.feed(raw(OP_CONT, b"6")[3:]) == [(OP_BINARY, b"123456")]
    assert r.buffered == 0


def test_limits_below_125_bytes_are_refused(impl: SimpleNamespace) -> None:
    with pytest.raises(ValueError):
        impl.FrameReader(is_server=True, max_frame_bytes=124)
    with pytest.raises(ValueError):
        impl.FrameReader(is_server=True, max_message_bytes=124)


def test_reader_exposes_its_settings(impl: SimpleNamespace) -> None:
    r = impl.FrameReader(is_server=False, max_frame_bytes=1000, max_message_bytes=2000)
    assert (r.is_server, r.max_frame_bytes, r.max_message_bytes) == (False, 1000, 2000)
    d = impl.FrameReader(is_server=True)
    assert (d.max_frame_bytes, d.max_message_bytes) == (twin.DEFAULT_MAX_FRAME_BYTES,
                                                        twin.DEFAULT_MAX_MESSAGE_BYTES)


# -- rejections: one per check, in the order of frame.py's docstring ------------


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10])
def test_reject_reserved_bits(impl: SimpleNamespace, rsv: int) -> None:
    exc = reject(impl, raw(OP_BINARY, b"x", rsv=rsv))
    assert_violation(exc, "reserved bits set", CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reject_unknown_opcode(impl: SimpleNamespace, opcode: int) -> None:
    exc = reject(impl, raw(opcode, b"x"))
    assert_violation(exc, f"unknown opcode 0x{opcode:x}", CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_reject_fragmented_control_frame(impl: SimpleNamespace, opcode: int) -> None:
    exc = reject(impl, raw(opcode, b"", fin=False))
    assert_violation(exc, "fragmented control frame", CloseCode.PROTOCOL_ERROR)


def test_reject_unexpected_continuation_frame(impl: SimpleNamespace) -> None:
    exc = reject(impl, raw(OP_BINARY, b"done") + raw(OP_CONT, b"more"))
    assert_violation(exc, "unexpected continuation frame", CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_reject_new_data_frame_during_fragmented_message(impl: SimpleNamespace, opcode: int) -> None:
    exc = reject(impl, raw(OP_TEXT, b"a", fin=False) + raw(opcode, b"b"))
    assert_violation(exc, "expected continuation frame", CloseCode.PROTOCOL_ERROR)


def test_reject_unmasked_client_frame(impl: SimpleNamespace) -> None:
    exc = reject(impl, raw(OP_BINARY, b"x", key=None), is_server=True)
    assert_violation(exc, "unmasked client frame", CloseCode.PROTOCOL_ERROR)


def test_reject_masked_server_frame(impl: SimpleNamespace) -> None:
    exc = reject(impl, raw(OP_BINARY, b"x"), is_server=False)
    assert_violation(exc, "masked server frame", CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_reject_control_frame_longer_than_125_bytes(impl: SimpleNamespace, opcode: int) -> None:
    exc = reject(impl, raw(opcode, b"c" * 126))
    assert_violation(exc, "control frame too long", CloseCode.PROTOCOL_ERROR)


def test_reject_64_bit_length_with_most_significant_bit_set(impl: SimpleNamespace) -> None:
    exc = reject(impl, raw(OP_BINARY, b"", length=1 << 63, len_bytes=8))
    assert_violation(exc, "frame length too large", CloseCode.PROTOCOL_ERROR)


def test_reject_frame_over_max_frame_bytes(impl: SimpleNamespace) -> None:
    exc = reject(impl, raw(OP_BINARY, b"f" * 201), max_frame_bytes=200)
    assert_violation(exc, "frame too big", CloseCode.MESSAGE_TOO_BIG)


def test_reject_frame_over_max_frame_bytes_before_its_payload_arrives(impl: SimpleNamespace) -> None:
    header = raw(OP_BINARY, b"", length=10**9)  # declared 1 GB, nothing sent
    exc = reject(impl, header)
    assert_violation(exc, "frame too big", CloseCode.MESSAGE_TOO_BIG)


def test_reject_message_over_max_message_bytes(impl: SimpleNamespace) -> None:
    data = raw(OP_TEXT, b"m" * 150, fin=False) + raw(OP_CONT, b"n" * 51)
    exc = reject(impl, data, max_message_bytes=200)
    assert_violation(exc, "message too big", CloseCode.MESSAGE_TOO_BIG)


def test_reject_close_frame_with_1_byte_payload(impl: SimpleNamespace) -> None:
    exc = reject(impl, raw(OP_CLOSE, b"\x03"))
    assert_violation(exc, "close frame with 1-byte payload", CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("payload", [b"\xff", b"ok\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                     b"abc\x80"])
def test_reject_invalid_utf8_in_text_message(impl: SimpleNamespace, payload: bytes) -> None:
    exc = reject(impl, raw(OP_TEXT, payload))
    assert_violation(exc, "invalid UTF-8 in text message", CloseCode.INVALID_PAYLOAD)


def test_reject_invalid_utf8_before_the_frame_is_complete(impl: SimpleNamespace) -> None:
    # Fail fast: the bad byte is enough, the other 99 bytes never arrive.
    frame = raw(OP_TEXT, b"ab\xed\xa0" + b"x" * 98)
    exc = reject(impl, frame[: 6 + 4])  # header (2 + key 4) and 4 payload bytes
    assert_violation(exc, "invalid UTF-8 in text message", CloseCode.INVALID_PAYLOAD)


def test_reject_invalid_utf8_across_fragments(impl: SimpleNamespace) -> None:
    data = raw(OP_TEXT, b"ok\xe2", fin=False) + raw(OP_PING) + raw(OP_CONT, b"\x28\xa1")
    exc = reject(impl, data)
    assert_violation(exc, "invalid UTF-8 in text message", CloseCode.INVALID_PAYLOAD)


def test_reject_text_message_ending_mid_character(impl: SimpleNamespace) -> None:
    data = raw(OP_TEXT, b"ok\xe2\x82", fin=False) + raw(OP_CONT, b"")
    exc = reject(impl, data)
    assert_violation(exc, "invalid UTF-8 in text message", CloseCode.INVALID_PAYLOAD)


def test_binary_message_is_not_checked_for_utf8(impl: SimpleNamespace) -> None:
    assert parse(impl, raw(OP_BINARY, b"\xff\xfe")) == [(OP_BINARY, b"\xff\xfe")]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_reject_invalid_close_code(impl: SimpleNamespace, code: int) -> None:
    exc = reject(impl, raw(OP_CLOSE, close_payload(code, b"bye")))
    assert_violation(exc, "invalid close code", CloseCode.PROTOCOL_ERROR)


def test_reject_invalid_utf8_in_close_reason(impl: SimpleNamespace) -> None:
    exc = reject(impl, raw(OP_CLOSE, close_payload(1000, b"bye\xff")))
    assert_violation(exc, "invalid UTF-8 in close reason", CloseCode.INVALID_PAYLOAD)


# -- how violations are reported ------------------------------------------------


@pytest.mark.parametrize(("data", "kwargs", "message"), [
    # 1 before 2: reserved bits and an unknown opcode
    (raw(0x3, b"", rsv=0x40), {}, "reserved bits set"),
    # 2 before 3: an unknown control-range opcode without FIN
    (raw(0xB, b"", fin=False), {}, "unknown opcode 0xb"),
    # 3 before 6: a fragmented, unmasked ping
    (raw(OP_PING, b"", fin=False, key=None), {}, "fragmented control frame"),
    # 4 before 6: an unmasked stray continuation
    (raw(OP_CONT, b"", key=None), {}, "unexpected continuation frame"),
    # 6 before 7: an unmasked, over-long ping
    (raw(OP_PING, b"p" * 126, key=None), {}, "unmasked client frame"),
    # 7 before 9: an over-long close frame with tiny limits
    (raw(OP_CLOSE, b"c" * 126), {"max_frame_bytes": 125}, "control frame too long"),
    # 8 before 9: MSB set on a frame also over the limit
    (raw(OP_BINARY, b"", length=(1 << 63) | 500, len_bytes=8), {"max_frame_bytes": 125},
     "frame length too large"),
    # 9 before 10: a frame over both limits
    (raw(OP_BINARY, b"x" * 300), {"max_frame_bytes": 200, "max_message_bytes": 200}, "frame too big"),
    # 11 before 13: a 1-byte close payload is never read as a code
    (raw(OP_CLOSE, b"\x00"), {}, "close frame with 1-byte payload"),
    # 13 before 14: bad code and bad reason
    (raw(OP_CLOSE, close_payload(1005, b"\xff")), {}, "invalid close code"),
])
def test_first_failing_check_in_contract_order_wins(impl: SimpleNamespace, data: bytes,
                                                    kwargs: dict[str, int], message: str) -> None:
    assert reject(impl, data, **kwargs).message == message


def test_header_checks_fire_as_soon_as_their_bytes_arrive(impl: SimpleNamespace) -> None:
    with pytest.raises(ProtocolViolation, match="reserved bits set"):
        reader(impl).feed(b"\xc2")  # first byte only
    with pytest.raises(ProtocolViolation, match="unmasked client frame"):
        reader(impl).feed(b"\x82\x05")  # two bytes, no payload yet
    with pytest.raises(ProtocolViolation, match="frame length too large"):
        reader(impl).feed(b"\x82\xff\x80")  # third byte of a 64-bit length


def test_messages_before_a_violation_are_in_partial(impl: SimpleNamespace) -> None:
    data = raw(OP_BINARY, b"one") + raw(OP_PING, b"two") + raw(OP_BINARY, b"x", rsv=0x20)
    with pytest.raises(ProtocolViolation) as info:
        reader(impl).feed(data)
    assert info.value.partial == [(OP_BINARY, b"one"), (OP_PING, b"two")]


def test_partial_holds_only_messages_of_the_failing_call(impl: SimpleNamespace) -> None:
    r = reader(impl)
    assert r.feed(raw(OP_BINARY, b"one")) == [(OP_BINARY, b"one")]
    with pytest.raises(ProtocolViolation) as info:
        r.feed(raw(OP_BINARY, b"two") + raw(OP_CONT, b"three"))
    assert info.value.partial == [(OP_BINARY, b"two")]


def test_reader_stays_dead_after_a_violation(impl: SimpleNamespace) -> None:
    r = reader(impl)
    with pytest.raises(ProtocolViolation) as first:
        r.feed(raw(OP_BINARY, b"ok") + raw(OP_BINARY, b"x", key=None))
    assert first.value.partial == [(OP_BINARY, b"ok")]
    with pytest.raises(ProtocolViolation) as again:
        r.feed(raw(OP_BINARY, b"fine"))
    assert again.value == first.value
    assert again.value.partial == []


# -- writer ----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "header"), [
    (0, bytes((0x82, 0))),
    (125, bytes((0x82, 125))),
    (126, bytes((0x82, 126, 0, 126))),
    (0xFFFF, bytes((0x82, 126, 0xFF, 0xFF))),
    (0x10000, bytes((0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0))),
])
def test_encode_frame_uses_the_shortest_length_encoding(impl: SimpleNamespace, n: int,
                                                        header: bytes) -> None:
    payload = b"p" * n
    assert impl.encode_frame(OP_BINARY, payload) == header + payload


def test_encode_frame_masks_with_the_given_key(impl: SimpleNamespace) -> None:
    assert impl.encode_frame(OP_TEXT, b"Hello", mask_key=KEY) == bytes.fromhex("818537fa213d7f9f4d5158")


def test_encode_frame_without_fin(impl: SimpleNamespace) -> None:
    assert impl.encode_frame(OP_TEXT, b"Hel", fin=False) == bytes.fromhex("010348656c")


def test_encode_frame_accepts_any_bytes_like(impl: SimpleNamespace) -> None:
    for payload in (bytearray(b"abc"), memoryview(b"abc"), memoryview(b"xabc")[1:]):
        assert impl.encode_frame(OP_BINARY, payload) == b"\x82\x03abc"
        assert impl.encode_frame(OP_BINARY, payload, mask_key=KEY) == raw(OP_BINARY, b"abc")


def test_encode_frame_counts_bytes_not_items(impl: SimpleNamespace) -> None:
    from array import array
    wide = memoryview(array("I", [1, 2]))
    assert impl.encode_frame(OP_BINARY, wide) == b"\x82\x08" + wide.tobytes()


@pytest.mark.parametrize("opcode", [3, 7, 11, 15, 16, -1])
def test_encode_frame_refuses_unknown_opcode(impl: SimpleNamespace, opcode: int) -> None:
    with pytest.raises(ValueError, match="unknown opcode"):
        impl.encode_frame(opcode, b"")


def test_encode_frame_refuses_fragmented_control_frame(impl: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="control frames"):
        impl.encode_frame(OP_PING, b"", fin=False)


def test_encode_frame_refuses_control_frame_over_125_bytes(impl: SimpleNamespace) -> None:
    assert impl.encode_frame(OP_PING, b"p" * 125)[:2] == b"\x89\x7d"
    with pytest.raises(ValueError, match="control frames"):
        impl.encode_frame(OP_PING, b"p" * 126)


@pytest.mark.parametrize("key", [b"", b"abc", b"abcde"])
def test_encode_frame_refuses_mask_key_not_4_bytes(impl: SimpleNamespace, key: bytes) -> None:
    with pytest.raises(ValueError, match="mask key"):
        impl.encode_frame(OP_BINARY, b"x", mask_key=key)


@pytest.mark.parametrize("n", [0, 1, 124, 125, 126, 65535, 65536])
@pytest.mark.parametrize("key", [None, KEY])
def test_encode_message_is_one_frame_of_prefix_plus_payload(impl: SimpleNamespace, n: int,
                                                            key: bytes | None) -> None:
    prefix, payload = b"\x01", bytes(range(256)) * (n // 256) + b"q" * (n % 256)
    assert (impl.encode_message(prefix, payload, mask_key=key)
            == impl.encode_frame(OP_BINARY, prefix + payload, mask_key=key))


def test_encode_message_writes_text(impl: SimpleNamespace) -> None:
    assert impl.encode_message(b"", "é".encode(), opcode=OP_TEXT) == b"\x81\x02\xc3\xa9"


@pytest.mark.parametrize("opcode", [OP_CONT, OP_CLOSE, OP_PING, OP_PONG, 3])
def test_encode_message_refuses_non_data_opcode(impl: SimpleNamespace, opcode: int) -> None:
    with pytest.raises(ValueError, match="data messages only"):
        impl.encode_message(b"", b"x", opcode=opcode)


def test_encode_message_refuses_non_bytes_prefix(impl: SimpleNamespace) -> None:
    with pytest.raises(TypeError):
        impl.encode_message(3, b"x")


@pytest.mark.parametrize("is_server", [True, False])
def test_encoded_frames_read_back(impl: SimpleNamespace, is_server: bool) -> None:
    key = KEY if is_server else None  # a server reads what clients write: masked
    messages = [(OP_TEXT, "ünïcödé".encode()), (OP_BINARY, bytes(300)), (OP_PING, b"p"),
                (OP_BINARY, bytes(70000))]
    data = b"".join(impl.encode_frame(op, p, mask_key=key) for op, p in messages)
    assert impl.FrameReader(is_server=is_server).feed(data) == messages


# -- close payload helpers (shared by both codecs) -------------------------------


def test_parse_close_payload_of_empty_payload_is_1005() -> None:
    assert twin.parse_close_payload(b"") == (CloseCode.NO_STATUS, "")


def test_parse_close_payload_splits_code_and_reason() -> None:
    assert twin.parse_close_payload(close_payload(4403, b"nope")) == (4403, "nope")


def test_encode_close_payload_cuts_reason_at_a_character_boundary() -> None:
    payload = twin.encode_close_payload(1000, "é" * 100)  # 200 bytes of reason
    assert len(payload) == 2 + 122  # 123 would split the 62nd "é"
    assert twin.parse_close_payload(payload) == (1000, "é" * 61)


@pytest.mark.parametrize("code", [1004, 1005, 1006, 1015, 999, 5000])
def test_encode_close_payload_refuses_codes_not_for_the_wire(code: int) -> None:
    with pytest.raises(ValueError):
        twin.encode_close_payload(code)


def test_native_frame_module_has_the_twins_public_names() -> None:
    try:
        import podterm._native.frame as native
    except ImportError:
        if os.environ.get("PODTERM_NATIVE") == "require" or os.environ.get("CI"):
            raise
        pytest.skip("native codec not built")
    public = [name for name in vars(twin) if not name.startswith("_") and name.isupper() or name in (
        "FrameReader", "encode_frame", "encode_message", "is_valid_close_code",
        "parse_close_payload", "encode_close_payload")]
    for name in public:
        assert hasattr(native, name), name
        if name.isupper():
            assert getattr(native, name) == getattr(twin, name), name
