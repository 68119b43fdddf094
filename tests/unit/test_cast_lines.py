"""CastLines (the recording writer's encoder) writes exactly what CastEncoder writes, faster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podterm.recording import castesc
from podterm.recording import writer as writer_module
from podterm.recording.asciicast import CastEncoder, Header, parse
from podterm.recording.recorder import CastRecord
from podterm.recording.writer import CastLines, escape_json_utf8

#: The implementation the writer uses (native when built).
LineBuffer = castesc.load(castesc.IMPL).line_buffer

HEADER = Header(width=80, height=24)


def _lines(enc: CastLines, kind: str, t: float, data: bytes) -> bytes:
    out = LineBuffer()
    (enc.output if kind == "o" else enc.input)(t, data, out)
    return out.getvalue()


def _reference(enc: CastEncoder, kind: str, t: float, data: bytes) -> bytes:
    return (enc.output if kind == "o" else enc.input)(t, data)


@pytest.mark.parametrize("text", [
    "", "plain", 'say "hi" \\ back', "\r\n", "\x1b[01;34mdir\x1b[0m\r\n", "\t\b\f\x00\x1f\x7f",
    "héllo wörld ✓ 日本語 🎉", "\u2028\u2029", "\\u0041",
])
def test_escape_matches_json_dumps(text: str) -> None:
    assert escape_json_utf8(text.encode()) == json.dumps(text, ensure_ascii=False).encode()[1:-1]


@pytest.mark.parametrize("data", [
    # Long chunks: the density is judged on a 4 KiB sample first.
    b"\x1b[0m\r\n" * 2000,                        # dense throughout
    b"\x1b[0m" * 1000 + b"x" * 20000,             # dense sample, sparse rest
    b"x" * 8000 + b"\r\n\x1b\x07\t\b\f" * 3000,   # sparse sample, dense rest
    b"a\r\nb\x1b\tc\x07d\x00" + b"y" * 10000,     # sparse, more than 4 kinds
    "ünïcode\r\n".encode() * 2000,
])
def test_escape_of_long_chunks_matches_json_dumps(data: bytes) -> None:
    text = data.decode()
    assert escape_json_utf8(data) == json.dumps(text, ensure_ascii=False).encode()[1:-1]


@pytest.mark.parametrize("data", [b"\xff", b"ok\xc3", "✓".encode()[:2], b"\xed\xa0\x80"])
def test_escape_refuses_what_is_not_complete_utf8(data: bytes) -> None:
    assert escape_json_utf8(data) is None


_pieces = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"\r\n", b"\x1b[0m", b'"', b"\\", "✓".encode(), "日本".encode(), b"\xc3",
                     b"\xa9", b"\xf0\x9f", b"\x8e\x89", b"\x00\x7f"]),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from("oi"), st.lists(_pieces, max_size=6),
                                 st.floats(0, 1e4, allow_nan=False)), max_size=25))
def test_lines_are_byte_for_byte_castencoders(
        events: list[tuple[str, list[bytes], float]]) -> None:
    fast, reference = CastLines(HEADER), CastEncoder(HEADER)
    for kind, pieces, t in events:
        data = b"".join(pieces)
        assert _lines(fast, kind, t, data) == _reference(reference, kind, t, data)
        assert fast.last_time == reference.last_time
    assert fast.finish(9e4) == reference.finish(9e4)
    assert fast.header_line() == reference.header_line()


def test_a_split_character_is_carried_to_the_next_chunk() -> None:
    enc = CastLines(HEADER)
    check = "✓".encode()
    assert _lines(enc, "o", 0.5, b"ok " + check[:1]) == b'[0.5,"o","ok "]\n'
    assert _lines(enc, "o", 0.6, check[1:] + b"!") == '[0.6,"o","✓!"]\n'.encode()
    assert _lines(enc, "o", 0.7, b"\xe2") == b""  # only began a character
    assert enc.finish(1.0) == '[1.0,"o","\ufffd"]\n'.encode()


def test_a_recording_of_fast_lines_parses() -> None:
    enc = CastLines(HEADER)
    out = LineBuffer()
    out.raw(enc.header_line())
    enc.output(0.1, b'\x1b[1m"bold"\x1b[0m\r\n', out)
    enc.input(0.2, b"ls\r", out)
    out.raw(enc.resize(0.3, 100, 30))
    enc.output(0.25, "naïve\n".encode(), out)  # a time that goes back is raised to the last one
    header, events = parse(out.getvalue())
    assert header.width == 80
    assert [(e.time, e.code, e.data) for e in events] == [
        (0.1, "o", '\x1b[1m"bold"\x1b[0m\r\n'), (0.2, "i", "ls\r"), (0.3, "r", "100x30"),
        (0.3, "o", "naïve\n")]


@pytest.mark.parametrize("t", [float("nan"), float("inf")])
def test_bad_times_are_refused(t: float) -> None:
    with pytest.raises(ValueError, match="finite number"):
        CastLines(HEADER).output(t, b"x", LineBuffer())
    with pytest.raises(ValueError, match="finite number"):
        CastEncoder(HEADER).output(t, b"x")


def test_a_time_before_the_last_is_raised_to_it() -> None:
    enc = CastLines(HEADER)
    assert _lines(enc, "o", 2.0, b"a") == b'[2.0,"o","a"]\n'
    assert _lines(enc, "i", -1.0, b"b") == b'[2.0,"i","b"]\n'


def test_writev_all_writes_every_part_in_order_through_short_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[bytes]) -> int:
        # Like a write cut short by a signal or a quota: at most 7 bytes, and
        # never more buffers than IOV_MAX.
        assert len(buffers) <= castesc.IOV_MAX
        calls.append(len(buffers))
        return real_writev(fd, [b"".join(bytes(b) for b in buffers)[:7]])

    monkeypatch.setattr(castesc.os, "writev", short_writev)
    parts = [b"%d," % i for i in range(castesc.IOV_MAX + 50)] + [b"", b"end"]
    expected = b"".join(parts)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        assert castesc.writev_all(fd, parts) == len(expected)
    finally:
        os.close(fd)
    assert parts == []  # handed over
    assert (tmp_path / "out").read_bytes() == expected
    assert max(calls) == castesc.IOV_MAX and len(calls) == -(-len(expected) // 7)


def test_a_batch_is_judged_in_one_call_and_written_as_castencoder_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    scan_many = writer_module._scan_many

    def counting(chunks: list[bytes]) -> list[int]:
        seen.append(len(chunks))
        return scan_many(chunks)

    monkeypatch.setattr(writer_module, "_scan_many", counting)
    files = writer_module._Files(tmp_path, max_open=4, fsync_on_close=False, mode=0o600)
    chunks = [b'say "hi"\r\n', "✓".encode()[:1], "✓".encode()[1:] + b"\\", b"\xff!",
              b"x" * 5000 + b"\x1b[0m"]
    batch = [CastRecord("s", "h", 0.0, b"", HEADER)]
    batch += [CastRecord("s", "o" if i % 2 else "i", 0.1 * i, c) for i, c in enumerate(chunks)]
    batch += [CastRecord("s", "r", 1.0, b"100x30"), CastRecord("s", "c", 1.5, b"")]
    files.write(batch)
    assert seen == [len(batch)]
    reference = CastEncoder(HEADER)
    expected = reference.header_line()
    for i, c in enumerate(chunks):
        expected += (reference.output if i % 2 else reference.input)(0.1 * i, c)
    expected += reference.resize(1.0, 100, 30) + reference.finish(1.5)
    assert (tmp_path / "s.cast").read_bytes() == expected
    assert files.bytes_written == len(expected) and files.finished == ["s"]
