"""The compiled recording escaper and its pure-Python twin write the same bytes.

``podterm.recording.castesc`` (pure Python) is the oracle; the compiled
``podterm._native.castesc`` must agree with it on all three pieces:
``escape_json_utf8`` (the very same bytes, or None for the same inputs: not
complete, valid UTF-8), ``scan_many`` (what the escapes add, or -1) and
``LineBuffer`` (the same bytes rendered and written), and both must be what
``json.dumps(text, ensure_ascii=False)`` writes between its quotes.
Hypothesis builds chunks from pieces that hit every branch of the native
code: runs of plain ASCII across the 16-byte SIMD blocks, each character that
needs an escape, multi-byte characters (split, overlong, surrogates, above
U+10FFFF), stray bytes, and lengths around the size at which the GIL is
released.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import select
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.native import REQUIRED, native_or_skip

from podterm.recording import castesc

NATIVE = native_or_skip(castesc.load, "native escaper")
PYTHON = castesc.load("python")
SCRATCH_KEEP_BYTES: int = importlib.import_module("podterm._native.castesc").SCRATCH_KEEP_BYTES

EXAMPLES = 5000

# Every byte value that matters on its own, and UTF-8 that is whole, cut or wrong.
_SPECIAL = [bytes((c,)) for c in range(0x20)] + [b'"', b"\\", b"\x7f", b"/", b"'"]
_UTF8 = [s.encode() for s in ("é", "✓", "日本", "🎉", "\u2028", "\u2029", "\ufeff",
                              "\U0010ffff", "\ud7ff", "\ue000")]
_BROKEN = [b"\xc3", b"\xe2\x9c", b"\xf0\x9f\x8e", b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf",
           b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
           b"\xf5\x80\x80\x80", b"\xff", b"\xfe"]
_pieces = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(_SPECIAL + _UTF8 + _BROKEN),
    # Plain runs of every length around the 16-byte blocks.
    st.integers(0, 70).map(lambda n: b"x" * n),
    st.tuples(st.integers(0, 40), st.sampled_from(_SPECIAL + _UTF8)).map(
        lambda t: b"a" * t[0] + t[1]),
)
_chunks = st.lists(_pieces, max_size=30).map(b"".join)


def _reference(data: bytes) -> bytes | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return json.dumps(text, ensure_ascii=False).encode("utf-8")[1:-1]


def test_the_writer_uses_the_native_escaper_when_required() -> None:
    if REQUIRED:
        assert castesc.IMPL == "native", castesc.REASON


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_chunks)
def test_native_escape_is_the_twins_byte_for_byte(data: bytes) -> None:
    expected = PYTHON.escape_json_utf8(data)
    assert NATIVE.escape_json_utf8(data) == expected
    assert expected == _reference(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_chunks, repeat=st.integers(1, 200))
def test_long_chunks_escaped_without_the_gil_match(data: bytes, repeat: int) -> None:
    # Long enough (often) to pass native's NOGIL_MIN_BYTES and cross many SIMD blocks.
    data = (data or b"z") * repeat
    assert NATIVE.escape_json_utf8(data) == PYTHON.escape_json_utf8(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_chunks, max_size=12), repeat=st.integers(1, 100))
def test_scan_many_counts_what_the_escapes_add(chunks: list[bytes], repeat: int) -> None:
    chunks = [c * repeat for c in chunks]
    escaped = [PYTHON.escape_json_utf8(c) for c in chunks]
    expected = [-1 if e is None else len(e) - len(c) for c, e in zip(chunks, escaped, strict=True)]
    assert NATIVE.scan_many(chunks) == expected
    assert PYTHON.scan_many(chunks) == expected
    assert NATIVE.scan_many(iter(chunks)) == expected


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.booleans(), _chunks, st.integers(1, 300)), max_size=20))
def test_line_buffers_write_the_same_bytes(tmp_path_factory: pytest.TempPathFactory,
                                           ops: list[tuple[bool, bytes, int]]) -> None:
    native, python = NATIVE.line_buffer(), PYTHON.line_buffer()
    expected = b""
    for raw, data, repeat in ops:
        data *= repeat if not raw else 1
        extra = PYTHON.scan_many([data])[0]
        for buf in (native, python):
            if raw or extra < 0:
                buf.raw(data)
            else:
                buf.escaped(data, extra)
        if raw or extra < 0:
            expected += data
        else:
            escaped = PYTHON.escape_json_utf8(data)
            assert escaped is not None
            expected += escaped
    assert len(native) == len(python) == len(expected)
    assert native.getvalue() == python.getvalue() == expected
    path = tmp_path_factory.mktemp("lb") / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        assert native.write_to(fd, NATIVE.scratch()) == len(expected)
        assert python.write_to(fd, PYTHON.scratch()) == len(expected)
    finally:
        os.close(fd)
    assert path.read_bytes() == expected * 2
    assert len(native) == len(python) == 0  # written: emptied


@pytest.mark.parametrize("impl", [NATIVE, PYTHON], ids=["native", "python"])
def test_a_line_buffer_refuses_a_wrong_count_without_writing(tmp_path: Path,
                                                             impl: Any) -> None:
    data = b'a "quoted" line\n' * 500
    extra = impl.scan_many([data])[0]
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for wrong in (extra - 1, extra + 1, 0):
            buf = impl.line_buffer()
            buf.raw(b"[")
            with pytest.raises(ValueError, match="scan_many"):
                buf.escaped(data, wrong)
                buf.write_to(fd, impl.scratch())
        buf = impl.line_buffer()
        with pytest.raises(ValueError, match="scan_many judged valid"):
            buf.escaped(b"\xff", -1)
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


@pytest.mark.parametrize("impl", [NATIVE, PYTHON], ids=["native", "python"])
def test_a_failed_write_raises_oserror_and_empties_the_buffer(impl: Any) -> None:
    buf = impl.line_buffer()
    buf.raw(b"x" * 10)
    read_end, write_end = os.pipe()
    os.close(write_end)
    try:
        with pytest.raises(OSError) as info:
            buf.write_to(write_end, impl.scratch())  # closed descriptor: EBADF
    finally:
        os.close(read_end)
    assert info.value.errno == errno.EBADF
    assert len(buf) == 0


def test_the_scratch_buffer_is_reused_and_trimmed(tmp_path: Path) -> None:
    scratch = NATIVE.scratch()
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        buf = NATIVE.line_buffer()
        buf.raw(b"y" * 100_000)
        buf.write_to(fd, scratch)
        kept = scratch.capacity
        assert kept >= 100_000
        buf.raw(b"z" * 1000)
        buf.write_to(fd, scratch)
        assert scratch.capacity == kept  # reused, not reallocated
        buf.raw(b"w" * (SCRATCH_KEEP_BYTES + 1))
        buf.write_to(fd, scratch)
        assert scratch.capacity == 0  # an outsized batch's memory is given back
    finally:
        os.close(fd)
    assert (tmp_path / "out").stat().st_size == 101_000 + SCRATCH_KEEP_BYTES + 1


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_any_buffer_is_escaped_to_bytes(kind: type) -> None:
    for data in (b"plain", b'"q"\n' * 1000, "✓".encode() * 900, b"bad\xff"):
        expected = PYTHON.escape_json_utf8(data)
        got = NATIVE.escape_json_utf8(kind(data))
        assert got == expected
        assert got is None or type(got) is bytes
        assert NATIVE.scan_many([kind(data)]) == PYTHON.scan_many([data])


@pytest.mark.parametrize("where", [0, 1, 15, 16, 17, 2047, 2048, 5000])
@pytest.mark.parametrize("bad", _BROKEN)
def test_invalid_utf8_anywhere_is_refused_by_both(where: int, bad: bytes) -> None:
    data = b"y" * where + bad + b"tail" * (where % 3)
    if bad in (b"\xc3", b"\xe2\x9c", b"\xf0\x9f\x8e") and where % 3 == 0:
        assert data.endswith(bad)  # a character split at the end: not complete either
    assert NATIVE.escape_json_utf8(data) is None
    assert PYTHON.escape_json_utf8(data) is None
    assert NATIVE.scan_many([b"ok", data]) == [0, -1]


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 31, 32, 2047, 2048, 2049, 65536])
def test_every_control_character_at_every_block_offset(size: int) -> None:
    for c in range(0x20):
        data = b"p" * size + bytes((c,)) + b"q" * (size % 17)
        assert NATIVE.escape_json_utf8(data) == _reference(data)
    dense = bytes(range(0x20)) * (size // 32 + 1) + b'"\\' * (size // 2)
    assert NATIVE.escape_json_utf8(dense) == _reference(dense)


def test_unknown_implementation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown escape implementation"):
        castesc.load("fortran")


def test_a_line_buffer_being_written_refuses_changes_from_another_thread() -> None:
    buf, scratch = NATIVE.line_buffer(), NATIVE.scratch()
    data = b'"x"' * 200_000
    buf.escaped(data, NATIVE.scan_many([data])[0])
    expected = len(buf)
    read_end, write_end = os.pipe()
    result: list[object] = []
    writer = threading.Thread(target=lambda: result.append(buf.write_to(write_end, scratch)))
    try:
        writer.start()
        # The pipe fills (64 KiB) long before the write ends: write_to is blocked in write().
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready
        with pytest.raises(RuntimeError, match="being written"):
            buf.raw(b"more")
        other = NATIVE.line_buffer()
        other.raw(b"y")
        with pytest.raises(RuntimeError, match="Scratch is not thread-safe"):
            other.write_to(write_end, scratch)
        got = 0
        while got < expected:
            ready, _, _ = select.select([read_end], [], [], 10)
            assert ready, "the writer thread stopped writing"
            got += len(os.read(read_end, 1 << 20))
        writer.join(10)
        assert not writer.is_alive()
        assert result == [expected] and got == expected
    finally:
        os.close(read_end)  # a writer still blocked gets EPIPE and ends
        writer.join(10)
        os.close(write_end)


def test_a_line_buffer_larger_than_a_slice_is_written_whole_and_in_order(
        tmp_path: Path) -> None:
    slice_bytes: int = importlib.import_module("podterm._native.castesc").SLICE_BYTES
    parts = [b'[%d,"o","' % i for i in range(3 * slice_bytes // 1000)]
    big = b"\x1b[0m\r\n" * (slice_bytes // 3)  # escapes to more than a slice by itself
    written = {}
    for impl in (NATIVE, PYTHON):
        buf = impl.line_buffer()
        for i, part in enumerate(parts):
            buf.raw(part)
            chunk = (b"line %d \"q\" \\ end\n" % i) * 60
            buf.escaped(chunk, impl.scan_many([chunk])[0])
            if i == len(parts) // 2:
                buf.escaped(big, impl.scan_many([big])[0])
        size = len(buf)
        assert size > 3 * slice_bytes
        path = tmp_path / impl.impl
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            assert buf.write_to(fd, impl.scratch()) == size
        finally:
            os.close(fd)
        written[impl.impl] = path.read_bytes()
    assert written["native"] == written["python"]
