"""asciicast v2: encode and parse, no I/O (https://docs.asciinema.org/manual/asciicast/v2/).

A file is newline-delimited JSON.  The first line is the header object::

    {"version": 2, "width": 80, "height": 24, "timestamp": 1700000000,
     "env": {"SHELL": "/bin/sh", "TERM": "xterm-256color"}, "title": "..."}

(``version``, ``width`` and ``height`` required; ``timestamp``,
``duration``, ``idle_time_limit``, ``command``, ``title``, ``env`` and
``theme`` optional).  Every further line is an event array::

    [time, code, data]

``time`` is seconds since the start (a float, non-decreasing), ``code`` is
``"o"`` (output), ``"i"`` (input), ``"r"`` (resize, data ``"COLSxROWS"``) or
``"m"`` (marker), and ``data`` is a string.

Bytes and text
--------------
A terminal program writes bytes; the format stores text.  Output arrives in
chunks that may split a UTF-8 sequence, so :class:`CastEncoder` decodes each
direction with an *incremental* decoder: an incomplete sequence at the end of
a chunk is carried into the next one, so every line is valid JSON text and
no character is broken in two.  Invalid bytes become U+FFFD (as the asciinema
recorder does).  Lines are written with ``ensure_ascii=False``: a valid line
is valid UTF-8, and a replay needs no unescaping of ordinary text.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeGuard

__all__ = [
    "EVENT_CODES",
    "CastEncoder",
    "CastFormatError",
    "Event",
    "Header",
    "encode_event",
    "iter_events",
    "parse",
    "parse_event",
    "parse_header",
]

#: asciicast v2 event codes: output, input, resize, marker.
EVENT_CODES = ("o", "i", "r", "m")

_RESIZE = re.compile(r"[1-9]\d{0,4}x[1-9]\d{0,4}")
# Optional header keys and the JSON types the spec gives them.
_OPTIONAL: Mapping[str, tuple[type, ...]] = MappingProxyType({
    "timestamp": (int,), "duration": (int, float), "idle_time_limit": (int, float),
    "command": (str,), "title": (str,), "env": (dict,), "theme": (dict,),
})


class CastFormatError(ValueError):
    """A file that is not valid asciicast v2; ``line`` is 1-based (0 = the whole file)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass(frozen=True, slots=True)
class Header:
    """The first line of a recording.

    Attributes:
        width: terminal columns at the start.
        height: terminal rows at the start.
        timestamp: start time, Unix seconds (int), or None.
        env: environment captured (asciinema records ``SHELL`` and ``TERM``).
        title: a human title, or None.
        command: the command recorded, or None for a shell.
        idle_time_limit: playback caps pauses at this many seconds, or None.
    """

    width: int
    height: int
    timestamp: int | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    title: str | None = None
    command: str | None = None
    idle_time_limit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: required keys first, absent optional keys left out."""
        obj: dict[str, Any] = {"version": 2, "width": self.width, "height": self.height}
        if self.timestamp is not None:
            obj["timestamp"] = self.timestamp
        if self.idle_time_limit is not None:
            obj["idle_time_limit"] = self.idle_time_limit
        if self.command is not None:
            obj["command"] = self.command
        if self.title is not None:
            obj["title"] = self.title
        if self.env:
            obj["env"] = dict(self.env)
        return obj

    def to_json_line(self) -> bytes:
        """The header line, ``\\n``-terminated UTF-8."""
        return _line(self.to_dict())


@dataclass(frozen=True, slots=True)
class Event:
    """One event line: seconds since the start, code, data."""

    time: float
    code: str
    data: str


def _line(obj: object) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            + "\n").encode("utf-8")


def _time(t: float) -> float:
    # Microseconds, as asciinema writes them; keeps lines short and, because
    # round() is monotonic, keeps non-decreasing times non-decreasing.
    return round(t, 6)


def encode_event(t: float, code: str, data: str) -> bytes:
    """One event line.

    Raises:
        ValueError: a negative or non-finite time, an unknown code, or a
            resize whose data is not ``COLSxROWS``.
    """
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"event time {t!r} must be a finite number >= 0")
    if code not in EVENT_CODES:
        raise ValueError(f"event code {code!r} is not one of {EVENT_CODES}")
    if code == "r" and not _RESIZE.fullmatch(data):
        raise ValueError(f"resize data {data!r} is not COLSxROWS")
    return _line([_time(t), code, data])


class CastEncoder:
    """Turns one session's bytes into asciicast lines, carrying split UTF-8 over.

    Not thread-safe; one per recording.  Times must be non-decreasing: a
    smaller time is raised to the last one (clocks are monotonic, so that
    only absorbs float noise), keeping the file valid.

    Args:
        header: the recording's header (its line is :meth:`header_line`).
    """

    __slots__ = ("header", "_out", "_in", "_last")

    def __init__(self, header: Header) -> None:
        self.header = header
        self._out = codecs.getincrementaldecoder("utf-8")("replace")
        self._in = codecs.getincrementaldecoder("utf-8")("replace")
        self._last = 0.0

    def header_line(self) -> bytes:
        return self.header.to_json_line()

    @property
    def last_time(self) -> float:
        """The time of the last event encoded (0 before any)."""
        return self._last

    def _at(self, t: float) -> float:
        t = max(t, self._last)
        self._last = t
        return t

    def output(self, t: float, data: bytes) -> bytes:
        """An ``"o"`` line for ``data``, or ``b""`` when it only began a character."""
        text = self._out.decode(data)
        return encode_event(self._at(t), "o", text) if text else b""

    def input(self, t: float, data: bytes) -> bytes:
        """An ``"i"`` line for ``data``, or ``b""`` when it only began a character."""
        text = self._in.decode(data)
        return encode_event(self._at(t), "i", text) if text else b""

    def resize(self, t: float, cols: int, rows: int) -> bytes:
        """An ``"r"`` line."""
        if cols < 1 or rows < 1:
            raise ValueError(f"resize {cols}x{rows}: both must be at least 1")
        return encode_event(self._at(t), "r", f"{cols}x{rows}")

    def marker(self, t: float, label: str = "") -> bytes:
        """An ``"m"`` line (a chapter mark; asciinema's player can jump to it)."""
        return encode_event(self._at(t), "m", label)

    def finish(self, t: float) -> bytes:
        """Lines for bytes still carried (an incomplete character at the end: U+FFFD)."""
        lines = b""
        text = self._out.decode(b"", final=True)
        if text:
            lines += encode_event(self._at(t), "o", text)
        text = self._in.decode(b"", final=True)
        if text:
            lines += encode_event(self._at(t), "i", text)
        return lines


# ---------------------------------------------------------------------------
# Parsing (strict)
# ---------------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def parse_header(line: str | bytes) -> Header:
    """Parse and check the header line.

    Raises:
        CastFormatError: not a JSON object, not version 2, width/height not
            positive integers, or an optional key of the wrong type.
    """
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise CastFormatError(f"the header is not JSON: {exc}", 1) from exc
    if not isinstance(obj, dict):
        raise CastFormatError("the header is not a JSON object", 1)
    if obj.get("version") != 2 or not _is_int(obj.get("version")):
        raise CastFormatError(f"version {obj.get('version')!r} is not 2 (only asciicast "
                              "v2 is supported)", 1)
    for key in ("width", "height"):
        value = obj.get(key)
        if not _is_int(value) or value < 1:
            raise CastFormatError(f"{key} {value!r} is not a positive integer", 1)
    for key, types in _OPTIONAL.items():
        if key in obj and obj[key] is not None:
            value = obj[key]
            ok = isinstance(value, types) and not isinstance(value, bool)
            if ok and types == (int, float):
                ok = _is_number(value) and value >= 0
            if not ok:
                raise CastFormatError(f"{key} {value!r} has the wrong type", 1)
    env = obj.get("env") or {}
    if not all(isinstance(k, str) and (isinstance(v, str) or v is None)
               for k, v in env.items()):
        raise CastFormatError("env must map names to strings", 1)
    limit = obj.get("idle_time_limit")
    return Header(width=obj["width"], height=obj["height"], timestamp=obj.get("timestamp"),
                  env=MappingProxyType({k: v for k, v in env.items() if v is not None}),
                  title=obj.get("title"), command=obj.get("command"),
                  idle_time_limit=float(limit) if limit is not None else None)


def parse_event(line: str | bytes, lineno: int, last: float) -> Event:
    """Parse and check one event line; ``last`` is the previous event's time.

    Raises:
        CastFormatError: not ``[time >= last, code, string]``, or a bad resize.
    """
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise CastFormatError(f"not JSON: {exc}", lineno) from exc
    if not isinstance(obj, list) or len(obj) != 3:
        raise CastFormatError("an event is a JSON array [time, code, data]", lineno)
    t, code, data = obj
    if not _is_number(t) or t < 0:
        raise CastFormatError(f"time {t!r} is not a number >= 0", lineno)
    if t < last:
        raise CastFormatError(f"time {t} goes back (previous {last})", lineno)
    if code not in EVENT_CODES:
        raise CastFormatError(f"code {code!r} is not one of {EVENT_CODES}", lineno)
    if not isinstance(data, str):
        raise CastFormatError(f"data {data!r} is not a string", lineno)
    if code == "r" and not _RESIZE.fullmatch(data):
        raise CastFormatError(f"resize data {data!r} is not COLSxROWS", lineno)
    return Event(float(t), code, data)


def iter_events(lines: Iterable[str | bytes], *, start_line: int = 2,
                allow_partial_tail: bool = False) -> Iterator[Event]:
    """Parse event lines one by one (for long files), checking each strictly.

    Args:
        lines: the lines after the header, each with or without its ``\\n``.
        start_line: the first line's number, for error messages.
        allow_partial_tail: accept (and skip) a last line that has no
            ``\\n`` and is not valid JSON: the write a crash cut short.

    Raises:
        CastFormatError: the first line that breaks the format.
    """
    last = 0.0
    pending: tuple[int, str | bytes] | None = None
    for lineno, line in enumerate(lines, start_line):
        if pending is not None:
            event = parse_event(pending[1], pending[0], last)
            last = event.time
            yield event
        pending = (lineno, line)
    if pending is not None:
        lineno, line = pending
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        if not text.strip("\n"):
            return  # a trailing empty line (asciinema ends a stream with one)
        ends = text.endswith("\n")
        try:
            yield parse_event(line, lineno, last)
        except CastFormatError:
            if allow_partial_tail and not ends:
                return
            raise


def parse(data: str | bytes, *, allow_partial_tail: bool = False) -> tuple[Header, list[Event]]:
    """Parse a whole recording strictly: header, then every event.

    Raises:
        CastFormatError: empty input, a bad header, or a bad event line.
    """
    text = data.decode("utf-8", "strict") if isinstance(data, bytes) else data
    # Split on "\n" only: str.splitlines() would also split at U+2028, U+0085
    # and friends, which JSON leaves unescaped inside strings.
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]  # the part after the last "\n" has none
    if not lines[-1]:
        lines.pop()
    if not lines:
        raise CastFormatError("empty file: no header")
    header = parse_header(lines[0])
    return header, list(iter_events(lines[1:], allow_partial_tail=allow_partial_tail))
