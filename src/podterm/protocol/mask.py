"""RFC 6455 §5.3 masking: XOR the payload with a 4-byte key (pure-Python twin).

The native twin (``native/mask.pyx``) works eight bytes at a time; this one
uses one big-integer XOR, which CPython runs in C over the whole buffer.
"""

from __future__ import annotations

from podterm.protocol._types import Buffer


def mask(data: Buffer, key: bytes, offset: int = 0) -> bytes:
    """Return ``data`` XOR-ed with ``key`` repeated, starting at key byte ``offset % 4``.

    Masking and unmasking are the same operation.  ``offset`` lets a caller
    unmask a frame's payload in pieces: pass how many payload bytes came before.

    Raises:
        ValueError: ``key`` is not exactly 4 bytes.
    """
    if len(key) != 4:
        raise ValueError("mask key must be 4 bytes")
    view = memoryview(data).cast("B")
    n = len(view)
    if n == 0:
        return b""
    o = offset & 3
    k = bytes(key[o:]) + bytes(key[:o])
    stream = (k * (n // 4 + 1))[:n]
    return (int.from_bytes(view, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")
