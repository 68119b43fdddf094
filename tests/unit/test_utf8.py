"""Fail-fast incremental UTF-8 validation, against both codecs.

"Fail fast" (RFC 6455 §8.1, Unicode 15 §3.9 table 3-7): ``feed`` returns False
at the first byte after which no valid text could follow, not at the end of
the sequence.  CPython's own decoder is the oracle for *whether* a complete
string is valid; the tests here pin down *where* it fails.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from podterm.protocol import codec


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    try:
        return codec.load(request.param)
    except ImportError as exc:
        if os.environ.get("PODTERM_NATIVE") == "require" or os.environ.get("CI"):
            raise
        pytest.skip(f"native codec not built: {exc}")


def fails_at(impl: SimpleNamespace, data: bytes) -> int | None:
    """Index of the byte whose feed returned False, feeding one byte at a time."""
    v = impl.Utf8Validator()
    for i in range(len(data)):
        if not v.feed(data[i:i + 1]):
            return i
    return None


@pytest.mark.parametrize("text", ["", "plain ascii", "é", "€", "🙂", "\U0010ffff", "\ud7ff",
                                  "\ue000", "mixed ✓ text 😀 with ascii" * 10])
def test_accepts_valid_text(impl: SimpleNamespace, text: str) -> None:
    data = text.encode()
    assert impl.validate_utf8(data)
    assert fails_at(impl, data) is None


@pytest.mark.parametrize(("data", "index"), [
    (b"\x80", 0),  # stray continuation byte
    (b"ab\xbf", 2),
    (b"\xc0\x80", 0),  # C0, C1: overlong 2-byte leads can never be valid
    (b"\xc1\xbf", 0),
    (b"\xe0\x80\x80", 1),  # overlong 3-byte: E0 must be followed by A0..BF
    (b"\xe0\x9f\xbf", 1),
    (b"\xed\xa0\x80", 1),  # surrogate U+D800: ED must be followed by 80..9F
    (b"\xed\xbf\xbf", 1),
    (b"\xf0\x80\x80\x80", 1),  # overlong 4-byte: F0 must be followed by 90..BF
    (b"\xf0\x8f\xbf\xbf", 1),
    (b"\xf4\x90\x80\x80", 1),  # above U+10FFFF: F4 must be followed by 80..8F
    (b"\xf5\x80\x80\x80", 0),  # F5..FF never appear
    (b"\xff", 0),
    (b"\xc3\x28", 1),  # lead byte followed by a non-continuation
    (b"\xe2\x82\x28", 2),
    (b"\xf0\x9f\x98\x28", 3),
    (b"ok\xe2\x82\xac\xe2\x28", 6),
])
def test_fails_at_the_first_impossible_byte(impl: SimpleNamespace, data: bytes, index: int) -> None:
    assert fails_at(impl, data) == index
    assert not impl.validate_utf8(data)


def test_incomplete_sequence_is_valid_so_far_but_not_complete(impl: SimpleNamespace) -> None:
    v = impl.Utf8Validator()
    assert v.feed(b"ok\xf0\x9f\x98")
    assert not v.is_complete()
    assert not impl.validate_utf8(b"ok\xf0\x9f\x98")


def test_character_split_across_feeds(impl: SimpleNamespace) -> None:
    data = "a€b🙂c".encode()
    for cut in range(len(data) + 1):
        v = impl.Utf8Validator()
        assert v.feed(data[:cut]) and v.feed(data[cut:])
        assert v.is_complete()


def test_failure_is_sticky(impl: SimpleNamespace) -> None:
    v = impl.Utf8Validator()
    assert not v.feed(b"\xff")
    assert not v.feed(b"fine")
    assert not v.is_complete()


def test_reset_forgets_failure_and_pending_sequence(impl: SimpleNamespace) -> None:
    v = impl.Utf8Validator()
    v.feed(b"\xff")
    v.reset()
    assert v.feed(b"ok") and v.is_complete()
    v.feed(b"\xe2")
    v.reset()
    assert v.is_complete()


def test_feed_accepts_any_bytes_like(impl: SimpleNamespace) -> None:
    data = "ünï".encode()
    for chunk in (bytearray(data), memoryview(data), memoryview(b"\xff" + data)[1:]):
        assert impl.validate_utf8(chunk)
        assert impl.Utf8Validator().feed(chunk)


def test_refuses_non_bytes(impl: SimpleNamespace) -> None:
    with pytest.raises(TypeError):
        impl.validate_utf8(5)


def test_long_ascii_run_then_error(impl: SimpleNamespace) -> None:
    # The native DFA skips ASCII eight bytes at a time; the error must still be found.
    for pad in range(0, 20):
        assert not impl.validate_utf8(b"a" * pad + b"\xff" + b"b" * 20)
        assert impl.validate_utf8(b"a" * pad + "é".encode() + b"b" * 20)


def test_agrees_with_the_python_decoder_on_every_two_byte_string(impl: SimpleNamespace) -> None:
    # Exhaustive over 65536 inputs: every lead/continuation pair.
    for a in range(256):
        for b in range(256):
            data = bytes((a, b))
            try:
                data.decode("utf-8")
                expected = True
            except UnicodeDecodeError:
                expected = False
            assert impl.validate_utf8(data) is expected, data


def test_agrees_with_the_python_decoder_on_three_and_four_byte_sequences(impl: SimpleNamespace) -> None:
    seconds = [0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0]
    for lead in range(0xE0, 0x100):
        for second in seconds:
            for third in (0x7F, 0x80, 0xBF, 0xC0):
                for tail in (b"", b"\x80", b"\xbf", b"\x7f"):
                    data = bytes((lead, second, third)) + tail
                    try:
                        data.decode("utf-8")
                        expected = True
                    except UnicodeDecodeError:
                        expected = False
                    assert impl.validate_utf8(data) is expected, data
