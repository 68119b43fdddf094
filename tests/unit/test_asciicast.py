"""asciicast v2 encoding and strict parsing (pure; no files but asciinema's reader check)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podterm.recording.asciicast import (
    CastEncoder,
    CastFormatError,
    Event,
    Header,
    encode_event,
    parse,
    parse_header,
)

HEADER = Header(width=80, height=24, timestamp=1700000000,
                env={"SHELL": "/bin/bash", "TERM": "xterm-256color"}, title="alice@prod/web-0")


def asciinema_reader() -> Any:
    """asciinema's own v2 reader (``pip install asciinema``); under CI it must be there."""
    try:
        from asciinema.asciicast import v2
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the asciinema package is missing (pip install asciinema): the "
                        "format check against the reference reader cannot run", pytrace=False)
        pytest.skip("asciinema is not installed: pip install asciinema")
    return v2


def test_header_line_has_the_v2_fields() -> None:
    line = HEADER.to_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert obj == {"version": 2, "width": 80, "height": 24, "timestamp": 1700000000,
                   "title": "alice@prod/web-0",
                   "env": {"SHELL": "/bin/bash", "TERM": "xterm-256color"}}
    assert list(obj)[:3] == ["version", "width", "height"]


def test_absent_optional_header_fields_are_left_out() -> None:
    assert json.loads(Header(width=10, height=5).to_json_line()) == \
        {"version": 2, "width": 10, "height": 5}


def test_event_lines() -> None:
    assert encode_event(1.5, "o", "hi\r\n") == b'[1.5,"o","hi\\r\\n"]\n'
    assert encode_event(0.1234567, "r", "100x30") == b'[0.123457,"r","100x30"]\n'
    assert encode_event(2, "i", "é") == '[2,"i","é"]\n'.encode()


@pytest.mark.parametrize("t, code, data", [
    (-1.0, "o", "x"), (float("nan"), "o", "x"), (1.0, "x", "x"), (1.0, "r", "80by24"),
    (1.0, "r", "0x24"),
])
def test_bad_events_cannot_be_encoded(t: float, code: str, data: str) -> None:
    with pytest.raises(ValueError):
        encode_event(t, code, data)


def test_a_utf8_character_split_across_chunks_is_carried_to_the_next_line() -> None:
    enc = CastEncoder(HEADER)
    snowman = "☃".encode()  # 3 bytes
    assert enc.output(0.1, b"a" + snowman[:1]) == b'[0.1,"o","a"]\n'
    assert enc.output(0.2, snowman[1:2]) == b""  # still incomplete: no line at all
    assert enc.output(0.3, snowman[2:] + b"b") == '[0.3,"o","☃b"]\n'.encode()


def test_invalid_bytes_become_replacement_characters() -> None:
    enc = CastEncoder(HEADER)
    line = enc.output(0.0, b"ok\xff\xfe!")
    assert json.loads(line) == [0.0, "o", "ok\ufffd\ufffd!"]


def test_finish_flushes_an_incomplete_tail_as_a_replacement_character() -> None:
    enc = CastEncoder(HEADER)
    assert enc.output(1.0, b"x\xe2\x98") == b'[1.0,"o","x"]\n'
    assert json.loads(enc.finish(2.0)) == [2.0, "o", "\ufffd"]
    assert enc.finish(3.0) == b""


def test_input_and_output_carry_separately() -> None:
    enc = CastEncoder(HEADER)
    e_acute = "é".encode()
    assert enc.output(0.0, e_acute[:1]) == b""
    assert enc.input(0.1, b"ls") == b'[0.1,"i","ls"]\n'  # does not disturb output's carry
    assert json.loads(enc.output(0.2, e_acute[1:])) == [0.2, "o", "é"]


def test_times_never_go_backwards() -> None:
    enc = CastEncoder(HEADER)
    enc.output(5.0, b"a")
    assert json.loads(enc.output(4.999, b"b"))[0] == 5.0  # float noise is absorbed
    assert json.loads(enc.resize(6.0, 100, 30)) == [6.0, "r", "100x30"]


@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=20))
def test_any_split_of_any_bytes_gives_valid_lines_and_the_one_shot_decoding(
        data: bytes, cuts: list[int]) -> None:
    enc = CastEncoder(HEADER)
    points = sorted({c for c in cuts if c <= len(data)} | {0, len(data)})
    out = b""
    for i, (a, b) in enumerate(itertools.pairwise(points)):
        out += enc.output(i * 0.01, data[a:b])
    out += enc.finish(1.0)
    text = out.decode("utf-8")  # the file is valid UTF-8 ...
    _, events = parse(HEADER.to_json_line().decode() + text)  # ... and valid asciicast
    assert "".join(e.data for e in events) == data.decode("utf-8", "replace")
    assert all(e.code == "o" and e.data for e in events)


def test_parse_round_trip() -> None:
    enc = CastEncoder(HEADER)
    text = (enc.header_line() + enc.output(0.5, b"hello") + enc.resize(1.0, 100, 40)
            + enc.input(1.25, b"x") + enc.marker(2.0, "chapter"))
    header, events = parse(text)
    assert header == HEADER
    assert events == [Event(0.5, "o", "hello"), Event(1.0, "r", "100x40"),
                      Event(1.25, "i", "x"), Event(2.0, "m", "chapter")]


def test_line_separators_inside_data_do_not_split_lines() -> None:
    # JSON leaves U+2028, U+0085 unescaped; str.splitlines() would split there.
    enc = CastEncoder(HEADER)
    text = enc.header_line() + enc.output(0.0, "a\u2028b\x85c".encode())
    _, events = parse(text)
    assert events == [Event(0.0, "o", "a\u2028b\x85c")]


GOOD_HEADER = '{"version": 2, "width": 80, "height": 24}\n'


@pytest.mark.parametrize("text, problem", [
    ("", "empty file"),
    ("[1]\n", "header is not a JSON object"),
    ('{"version": 1, "width": 80, "height": 24}\n', "version 1 is not 2"),
    ('{"version": 2, "height": 24}\n', "width None"),
    ('{"version": 2, "width": 80, "height": 0}\n', "height 0"),
    ('{"version": 2, "width": 80.5, "height": 24}\n', "width 80.5"),
    ('{"version": 2, "width": 80, "height": 24, "timestamp": "now"}\n', "timestamp"),
    ('{"version": 2, "width": 80, "height": 24, "env": {"TERM": 1}}\n', "env"),
    (GOOD_HEADER + '{"t": 1}\n', "line 2: an event is a JSON array"),
    (GOOD_HEADER + '[1.0, "o"]\n', "line 2: an event"),
    (GOOD_HEADER + '["1.0", "o", "x"]\n', "line 2: time '1.0'"),
    (GOOD_HEADER + '[-1, "o", "x"]\n', "line 2: time -1"),
    (GOOD_HEADER + '[2.0, "o", "x"]\n[1.0, "o", "y"]\n', "line 3: time 1.0 goes back"),
    (GOOD_HEADER + '[1.0, "x", "x"]\n', "line 2: code 'x'"),
    (GOOD_HEADER + '[1.0, "o", 5]\n', "line 2: data 5"),
    (GOOD_HEADER + '[1.0, "r", "80*24"]\n', "line 2: resize data"),
    (GOOD_HEADER + 'garbage\n[1.0, "o", "x"]\n', "line 2: not JSON"),
])
def test_the_validator_is_strict(text: str, problem: str) -> None:
    with pytest.raises(CastFormatError) as info:
        parse(text)
    assert problem in str(info.value)


def test_a_partial_last_line_is_accepted_only_when_asked() -> None:
    text = GOOD_HEADER + '[1.0, "o", "x"]\n[2.0, "o", "y'
    with pytest.raises(CastFormatError, match="line 3"):
        parse(text)
    _, events = parse(text, allow_partial_tail=True)
    assert events == [Event(1.0, "o", "x")]
    with pytest.raises(CastFormatError):  # a complete bad line is never "partial"
        parse(GOOD_HEADER + '[2.0, "o", "y\n', allow_partial_tail=True)


def test_parse_header_keeps_the_optional_fields() -> None:
    header = parse_header('{"version": 2, "width": 80, "height": 24, "idle_time_limit": 2, '
                          '"command": "top", "env": {"TERM": "xterm", "SHELL": null}}')
    assert header.idle_time_limit == 2.0 and header.command == "top"
    assert dict(header.env) == {"TERM": "xterm"}


def test_encoder_output_parses_with_asciinemas_reader(tmp_path: Path) -> None:
    v2 = asciinema_reader()
    enc = CastEncoder(HEADER)
    path = tmp_path / "x.cast"
    path.write_bytes(enc.header_line() + enc.output(0.25, "héllo ☃\r\n".encode())
                     + enc.resize(0.5, 120, 40) + enc.output(1.0, b"\x1b[31mred\x1b[0m"))
    with path.open(encoding="utf-8") as f:
        first = f.readline()
        with v2.open_from_file(first, f) as cast:
            assert cast.v2_header["width"] == 80 and cast.v2_header["height"] == 24
            events = list(cast.events())
    assert events == [[0.25, "o", "héllo ☃\r\n"], [0.5, "r", "120x40"],
                      [1.0, "o", "\x1b[31mred\x1b[0m"]]
