"""Type stub for the compiled ``podterm._native.mask`` (twin: :mod:`podterm.protocol.mask`)."""

from podterm.protocol._types import Buffer

def mask(data: Buffer, key: bytes, offset: int = 0) -> bytes: ...
