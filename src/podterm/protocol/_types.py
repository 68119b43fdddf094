"""Type aliases shared by the protocol modules (Python 3.11 has no collections.abc.Buffer)."""

from __future__ import annotations

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview
