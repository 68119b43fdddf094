"""asciicast lines without the JSON encoder: the pure-Python twin of ``podterm._native.castesc``.

Three pieces, the same in both implementations: :func:`escape_json_utf8`
(a chunk as the inside of a JSON string, bytes to bytes; None when it is not
complete, valid UTF-8), :func:`scan_many` (judge chunks: valid? how many
bytes do the escapes add?) and :class:`LineBuffer` (one file's pending
lines, written with one call).  The compiled twin (``native/castesc.pyx``)
does the work on the bytes with the GIL released, once per batch; this
module is its oracle, and the fallback when the extension is not built.
``tests/unit/test_castesc_equivalence.py`` holds the two to the same bytes.
:data:`IMPL` / :func:`load` choose between them as
:mod:`podterm.protocol.codec` does for the WebSocket codec (the same
``PODTERM_CODEC`` and ``PODTERM_NATIVE`` switches).

How the twin is fast without a compiler: a chunk that is ASCII, or complete
valid UTF-8, is escaped bytes to bytes (``bytes.replace`` for ``\\``, ``"``
and each control character present; UTF-8 needs nothing else escaped), with
no ``str`` decode and no JSON encoder, unless it is dense in control
characters, where one ``json.dumps`` pass is cheaper; the lines are written
with ``writev`` (no join).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

from podterm.protocol._types import Buffer

__all__ = ["IMPL", "IOV_MAX", "REASON", "Escaper", "LineBuffer", "Scratch", "escape_json_utf8",
           "load", "scan_many", "writev_all"]

#: ``bytes.translate(None, _NOT_CONTROL)`` keeps only the C0 control bytes.
_NOT_CONTROL = bytes(range(0x20, 0x100))
#: How json.dumps writes each C0 control character inside a string.
_CONTROLS: tuple[tuple[bytes, bytes], ...] = tuple(
    (bytes((c,)), {0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f",
                   0x0D: b"\\r"}.get(c, b"\\u%04x" % c))
    for c in range(0x20))
#: Above one control character in 16 bytes, or more than 4 kinds of them, the
#: JSON encoder's single pass (~450 MB/s here) is cheaper than one
#: ``bytes.replace`` pass (~1.5-2 GB/s) per kind (measured on this machine:
#: a build log, 3% controls, 1,000 MB/s by replaces against 475 by json.dumps;
#: ``ls --color``, 20%, 257 against 463).
_DENSE = 16
_MAX_KINDS = 4
#: The density is judged on this much of a long chunk first.
_SAMPLE_BYTES = 4096


def escape_json_utf8(data: Buffer) -> bytes | None:
    """``data`` as the inside of a JSON string, bytes in, bytes out; None if not UTF-8.

    The same bytes ``json.dumps(data.decode(), ensure_ascii=False)`` writes
    between its quotes: ``\\`` and ``"`` escaped, C0 controls as ``\\n``,
    ``\\r``, ``\\t``, ``\\b``, ``\\f`` or ``\\u00XX``; everything else (DEL
    and every byte of a multi-byte character) as it is.

    Returns:
        None when ``data`` is not complete, valid UTF-8 (invalid bytes, or a
        character split at its end): the caller decodes it incrementally.
    """
    data = bytes(data)
    text = None
    if not data.isascii():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    # Judge a long chunk on a sample first: a dense one then costs no extra full pass.
    dense = len(data) > 2 * _SAMPLE_BYTES and \
        len(data[:_SAMPLE_BYTES].translate(None, _NOT_CONTROL)) * _DENSE > _SAMPLE_BYTES
    kinds: list[tuple[bytes, bytes]] = []
    if not dense:
        controls = data.translate(None, _NOT_CONTROL)
        dense = len(controls) * _DENSE > len(data)
        if controls and not dense:
            kinds = [pair for pair in _CONTROLS if pair[0] in controls]
            dense = len(kinds) > _MAX_KINDS
    if dense:
        # Escapes everywhere (colour codes, line ends): one pass of the JSON
        # encoder beats a bytes.replace pass per kind of character.
        if text is None:
            text = data.decode("ascii")
        return json.dumps(text, ensure_ascii=False).encode("utf-8")[1:-1]
    out = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    for raw, escaped in kinds:
        out = out.replace(raw, escaped)
    return out


#: Bytes the escape of each C0 control character adds (``\n``: 1, ``\u001b``: 5).
_CONTROL_EXTRA = {raw[0]: len(escaped) - 1 for raw, escaped in _CONTROLS}


def _scan(data: bytes) -> int:
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return -1
    extra = data.count(b"\\") + data.count(b'"')
    controls = data.translate(None, _NOT_CONTROL)
    if controls:
        extra += sum(_CONTROL_EXTRA[c] * controls.count(c) for c in set(controls))
    return extra


def scan_many(chunks: Iterable[Buffer]) -> list[int]:
    """Per chunk: the bytes its escapes add, or -1 if it is not complete, valid UTF-8.

    ``len(escape_json_utf8(c)) - len(c)`` for the valid ones.
    """
    return [_scan(bytes(chunk)) for chunk in chunks]


class Scratch:
    """Memory a :class:`LineBuffer` renders into (the native twin's; unused here)."""

    __slots__ = ()

    @property
    def capacity(self) -> int:
        return 0


class LineBuffer:
    """One recording file's pending lines: parts copied as they are (:meth:`raw`) and
    chunks to escape (:meth:`escaped`), in order, until :meth:`write_to` writes them.

    Not thread-safe; the recording writer uses one per file, from one thread.
    """

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def raw(self, data: bytes) -> None:
        """Append ``data`` as it is (a line's opening, a whole line)."""
        if data:
            self._parts.append(data)
            self._size += len(data)

    def escaped(self, data: bytes, extra: int) -> None:
        """Append ``data`` JSON-escaped; ``extra`` is what :func:`scan_many` said of it.

        Raises:
            ValueError: ``extra`` is negative, or not what ``data``'s escapes add.
        """
        if extra < 0:
            raise ValueError("castesc: only a chunk scan_many judged valid can be escaped")
        out = escape_json_utf8(data)
        if out is None or len(out) != len(data) + extra:
            raise ValueError("castesc: an escaped part was not the size scan_many said")
        self.raw(out)

    def __len__(self) -> int:
        """Bytes the buffered parts make, escaped."""
        return self._size

    def clear(self) -> None:
        """Forget every buffered part."""
        self._parts.clear()
        self._size = 0

    def getvalue(self) -> bytes:
        """The buffered bytes, escaped (the buffer keeps them)."""
        return b"".join(self._parts)

    def write_to(self, fd: int, scratch: Scratch) -> int:
        """Write every buffered part to ``fd``, in order, and empty the buffer.

        Returns:
            the bytes written (``len(self)`` before the call).

        Raises:
            OSError: a write failed (what was written before it stays written).
        """
        try:
            return writev_all(fd, self._parts)
        finally:
            self.clear()


#: Buffers per ``writev`` call (POSIX guarantees at least 16; Linux allows 1,024).
IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names
                      else 16, 1024))


def writev_all(fd: int, parts: list[bytes]) -> int:
    """Append every part in order with ``writev`` (no join: the kernel copies them, GIL
    released); returns the bytes written.  Empties ``parts``."""
    total = 0
    pending: list[Buffer] = list(parts)
    parts.clear()
    start = 0
    while start < len(pending):
        group = pending[start:start + IOV_MAX]
        written = os.writev(fd, group)
        total += written
        for part in group:  # skip what was written whole; keep the rest of a cut part
            size = len(part)
            if written < size:
                if written:
                    pending[start] = memoryview(part)[written:]
                break
            written -= size
            start += 1
    return total


class Escaper(NamedTuple):
    """One implementation's functions and classes (see :func:`load`)."""

    impl: str
    escape_json_utf8: Callable[[Buffer], bytes | None]
    scan_many: Callable[[Iterable[Buffer]], list[int]]
    line_buffer: type[LineBuffer]
    scratch: type[Scratch]


def load(impl: str) -> Escaper:
    """The functions of ``impl`` (``"native"`` or ``"python"``), for the writer and tests.

    Raises:
        ImportError: ``impl`` is ``"native"`` and the extension is not built.
        ValueError: unknown ``impl``.
    """
    if impl == "python":
        return Escaper("python", escape_json_utf8, scan_many, LineBuffer, Scratch)
    if impl == "native":
        module = importlib.import_module("podterm._native.castesc")
        return Escaper("native", module.escape_json_utf8, module.scan_many,
                       module.LineBuffer, module.Scratch)
    raise ValueError(f"unknown escape implementation {impl!r}")


def _choose() -> tuple[str, str]:
    # The same switches as podterm.protocol.codec, so one setting covers both.
    forced = os.environ.get("PODTERM_CODEC", "").lower()
    require = os.environ.get("PODTERM_NATIVE", "").lower() == "require"
    if forced == "python":
        if require:
            raise ImportError("PODTERM_CODEC=python contradicts PODTERM_NATIVE=require")
        return "python", "forced by PODTERM_CODEC=python"
    if forced not in ("", "native", "auto"):
        raise ImportError(f"PODTERM_CODEC={forced!r}: expected native, python or auto")
    try:
        load("native")
    except ImportError as exc:
        if require or forced == "native":
            raise
        return "python", f"native extension not available ({exc}); pure-Python twin in use"
    return "native", "compiled extension podterm._native.castesc imported"


#: ``"native"`` or ``"python"``: the implementation the recording writer uses, and why.
IMPL, REASON = _choose()
