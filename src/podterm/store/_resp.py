"""RESP2, the Redis wire protocol, sans-IO: commands to bytes, bytes to replies.

Spec: https://redis.io/docs/reference/protocol-spec/ (RESP2).  A command is an
array of bulk strings; a reply is one of

====  ==================  =====================================
byte  type                Python value here
====  ==================  =====================================
``+``  simple string       ``str``
``-``  error               :class:`RespError` (returned, not raised)
``:``  integer             ``int``
``$``  bulk string         ``bytes``, or ``None`` for ``$-1``
``*``  array               ``list``, or ``None`` for ``*-1``
====  ==================  =====================================

No I/O, no trio: :class:`RespParser` is fed whatever a read returned and hands
back complete replies in order.  Every size is bounded, so a broken or hostile
peer raises :class:`RespProtocolError` instead of growing memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, TypeAlias

__all__ = [
    "NEED_DATA",
    "Reply",
    "RespError",
    "RespParser",
    "RespProtocolError",
    "encode_command",
]


class RespProtocolError(Exception):
    """The byte stream is not RESP2, or a reply exceeds a limit: the connection is unusable."""


class RespError:
    """An error reply (``-ERR ...``).  ``kind`` is its first word (``ERR``, ``NOSCRIPT``, ...)."""

    __slots__ = ("kind", "message")

    def __init__(self, message: str) -> None:
        self.message = message
        self.kind = message.split(" ", 1)[0]

    def __repr__(self) -> str:
        return f"RespError({self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RespError) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)


Reply: TypeAlias = "str | int | bytes | None | RespError | list[Reply]"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: :meth:`RespParser.next_reply` found no complete reply in the buffer.
NEED_DATA: Final = _NeedData()

Arg: TypeAlias = bytes | str | int | float


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings.

    ``str`` is UTF-8 encoded, ``int`` and ``float`` are written in decimal
    (Redis parses them back); ``bool`` is refused (``True`` would silently
    become ``1``).
    """
    if not args:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, bool):
            raise TypeError("bool is not a Redis argument; pass 0/1 or a string")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            if not math.isfinite(arg):
                raise ValueError(f"non-finite float argument {arg!r}")
            data = repr(arg).encode("ascii")
        else:
            raise TypeError(f"unsupported Redis argument type {type(arg).__name__}")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Incomplete(Exception):
    """Internal: the buffer ends inside the reply being parsed."""


_INCOMPLETE = _Incomplete()


class RespParser:
    """Incremental RESP2 reply parser.

    Args:
        max_bulk_bytes: largest bulk string accepted (16 MiB: our values are
            session records of a few hundred bytes; a bigger one is not ours).
        max_array_len: most elements in one array (1,048,576).
        max_depth: deepest array nesting (8: ``EXEC`` of ``SCAN`` replies is 3).
        max_line_bytes: longest header line (``+``/``-``/``:`` payload), 64 KiB.

    Usage::

        parser.feed(chunk)
        while (reply := parser.next_reply()) is not NEED_DATA:
            handle(reply)

    A partial reply is re-parsed from its start when more data arrives; the
    cost is bounded because replies are bounded.
    """

    __slots__ = ("_buf", "_pos", "max_array_len", "max_bulk_bytes", "max_depth",
                 "max_line_bytes")

    def __init__(self, *, max_bulk_bytes: int = 16 << 20, max_array_len: int = 1 << 20,
                 max_depth: int = 8, max_line_bytes: int = 64 << 10) -> None:
        self.max_bulk_bytes = max_bulk_bytes
        self.max_array_len = max_array_len
        self.max_depth = max_depth
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as replies."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        if self._pos and self._pos == len(self._buf):
            # Everything so far was consumed: start a fresh buffer (cheap, common).
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_reply(self) -> Reply | _NeedData:
        """The next complete reply, or :data:`NEED_DATA`.

        Raises:
            RespProtocolError: the stream is not RESP2 or breaks a limit; the
                parser is then unusable.
        """
        if self._pos >= len(self._buf):
            return NEED_DATA
        try:
            reply, end = self._parse(self._pos, 0)
        except _Incomplete:
            if self._pos > 65536:
                # Drop consumed bytes before waiting for more, so the buffer
                # holds at most one partial reply plus one read.
                del self._buf[: self._pos]
                self._pos = 0
            return NEED_DATA
        self._pos = end
        return reply

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos, pos + self.max_line_bytes + 2)
        if end < 0:
            if len(self._buf) - pos > self.max_line_bytes + 1:
                raise RespProtocolError(f"header line longer than {self.max_line_bytes} bytes")
            raise _INCOMPLETE
        return bytes(self._buf[pos:end]), end + 2

    def _int(self, pos: int) -> tuple[int, int]:
        line, end = self._line(pos)
        try:
            # int() accepts '_' and spaces; RESP allows neither.
            if not line or not line.lstrip(b"-").isdigit():
                raise ValueError
            return int(line), end
        except ValueError:
            raise RespProtocolError(f"bad integer {line[:40]!r}") from None

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        if pos >= len(self._buf):
            raise _INCOMPLETE
        kind = self._buf[pos]
        pos += 1
        if kind == 0x2B:  # '+'
            line, end = self._line(pos)
            return line.decode("utf-8", "replace"), end
        if kind == 0x2D:  # '-'
            line, end = self._line(pos)
            return RespError(line.decode("utf-8", "replace")), end
        if kind == 0x3A:  # ':'
            return self._int(pos)
        if kind == 0x24:  # '$'
            length, pos = self._int(pos)
            if length == -1:
                return None, pos
            if not 0 <= length <= self.max_bulk_bytes:
                raise RespProtocolError(f"bulk string of {length} bytes "
                                        f"(limit {self.max_bulk_bytes})")
            end = pos + length
            if len(self._buf) < end + 2:
                raise _INCOMPLETE
            if self._buf[end:end + 2] != b"\r\n":
                raise RespProtocolError("bulk string not terminated by CRLF")
            return bytes(self._buf[pos:end]), end + 2
        if kind == 0x2A:  # '*'
            count, pos = self._int(pos)
            if count == -1:
                return None, pos
            if not 0 <= count <= self.max_array_len:
                raise RespProtocolError(f"array of {count} elements (limit {self.max_array_len})")
            if depth >= self.max_depth:
                raise RespProtocolError(f"arrays nested deeper than {self.max_depth}")
            items: list[Reply] = []
            for _ in range(count):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise RespProtocolError(f"unknown RESP type byte {bytes([kind])!r}")
