"""RFC 6455 §5.3 masking, against both codecs and a byte-at-a-time reference."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from podterm.protocol import codec

KEY = bytes.fromhex("37fa213d")  # RFC 6455 §5.7


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    try:
        return codec.load(request.param)
    except ImportError as exc:
        if os.environ.get("PODTERM_NATIVE") == "require" or os.environ.get("CI"):
            raise
        pytest.skip(f"native codec not built: {exc}")


def reference(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """RFC 6455 §5.3: octet i is XOR-ed with key octet (i mod 4)."""
    return bytes(b ^ key[(offset + i) % 4] for i, b in enumerate(data))


def test_mask_matches_the_rfc_example(impl: SimpleNamespace) -> None:
    assert impl.mask(b"Hello", KEY) == bytes.fromhex("7f9f4d5158")


@pytest.mark.parametrize("n", range(0, 70))
def test_mask_every_length_and_tail(impl: SimpleNamespace, n: int) -> None:
    # 0..69 covers the short path, the 8-byte word loop and every tail length.
    data = bytes((i * 31 + 7) & 0xFF for i in range(n))
    for offset in range(4):
        assert impl.mask(data, KEY, offset) == reference(data, KEY, offset)


def test_mask_is_its_own_inverse(impl: SimpleNamespace) -> None:
    data = bytes(range(256)) * 5
    assert impl.mask(impl.mask(data, KEY), KEY) == data


def test_offset_continues_the_key_across_pieces(impl: SimpleNamespace) -> None:
    data = bytes(range(200))
    for cut in (1, 2, 3, 5, 8, 13, 100):
        assert impl.mask(data[:cut], KEY) + impl.mask(data[cut:], KEY, cut) == impl.mask(data, KEY)


def test_offset_is_taken_modulo_4(impl: SimpleNamespace) -> None:
    data = b"abcdefghij"
    assert impl.mask(data, KEY, 4) == impl.mask(data, KEY, 0)
    assert impl.mask(data, KEY, 4 * 10**20 + 3) == impl.mask(data, KEY, 3)


def test_mask_of_empty_input_is_empty(impl: SimpleNamespace) -> None:
    assert impl.mask(b"", KEY) == b""


def test_mask_returns_new_bytes_from_any_bytes_like(impl: SimpleNamespace) -> None:
    data = bytes(range(100))
    for chunk in (bytearray(data), memoryview(data), memoryview(b"?" + data)[1:]):
        out = impl.mask(chunk, KEY)
        assert type(out) is bytes
        assert out == reference(data, KEY)


def test_mask_key_may_be_any_bytes_like(impl: SimpleNamespace) -> None:
    assert impl.mask(b"Hello", bytearray(KEY)) == impl.mask(b"Hello", memoryview(KEY)) == impl.mask(b"Hello", KEY)


@pytest.mark.parametrize("key", [b"", b"abc", b"abcde"])
def test_mask_refuses_key_not_4_bytes(impl: SimpleNamespace, key: bytes) -> None:
    with pytest.raises(ValueError, match="mask key must be 4 bytes"):
        impl.mask(b"data", key)


def test_mask_of_a_large_unaligned_buffer(impl: SimpleNamespace) -> None:
    big = bytes(range(256)) * 1025
    view = memoryview(big)[3:]  # not 8-byte aligned
    assert impl.mask(view, KEY, 1) == reference(bytes(view), KEY, 1)
