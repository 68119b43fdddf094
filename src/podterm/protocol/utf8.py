"""Incremental, fail-fast UTF-8 validation (pure-Python twin of ``native/utf8.pyx``).

"Fail fast" means: an error is reported at the first byte after which the
bytes seen so far can no longer be the start of valid UTF-8 (Unicode 15 §3.9
table 3-7: no overlongs, no surrogates, nothing above U+10FFFF).  CPython's
own incremental decoder accepts ``ED A0`` as a prefix and only fails on the
third byte, so this module runs its own DFA and uses ``bytes.decode`` only as a
fast path for input that is valid as a whole.
"""

from __future__ import annotations

from podterm.protocol._types import Buffer

# Allowed ranges for the 2nd byte after each lead byte; the 3rd and 4th are 80..BF.
_SECOND: dict[int, tuple[int, int]] = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F),
                                       0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _lead(b: int) -> int:
    """Number of continuation bytes a lead byte announces, or -1 if it cannot lead."""
    if b < 0x80:
        return 0
    if 0xC2 <= b <= 0xDF:
        return 1
    if 0xE0 <= b <= 0xEF:
        return 2
    if 0xF0 <= b <= 0xF4:
        return 3
    return -1


class Utf8Validator:
    """Validates a byte stream given in pieces.

    ``feed`` returns False at the first invalid byte (and from then on);
    ``is_complete`` tells whether the stream so far ends on a character
    boundary (a text message must, when its last fragment arrives).
    """

    __slots__ = ("_need", "_lead_byte", "_seen", "_failed")

    def __init__(self) -> None:
        self._need = 0  # continuation bytes still expected
        self._lead_byte = 0  # lead byte of the sequence in progress
        self._seen = 0  # continuation bytes seen of the sequence in progress
        self._failed = False

    def reset(self) -> None:
        self._need = 0
        self._lead_byte = 0
        self._seen = 0
        self._failed = False

    def feed(self, data: Buffer) -> bool:
        """Feed more bytes; return False if the stream is now known to be invalid."""
        if self._failed:
            return False
        # Bytes-like objects only: bytes(5) would silently validate five zero bytes.
        raw = data if type(data) is bytes else memoryview(data).tobytes()
        if self._need == 0:
            try:
                raw.decode("utf-8")
                return True
            except UnicodeDecodeError:
                pass  # invalid, or valid but ends mid-character: run the DFA
        need, lead, seen = self._need, self._lead_byte, self._seen
        for b in raw:
            if need == 0:
                n = _lead(b)
                if n < 0:
                    self._failed = True
                    return False
                if n:
                    need, lead, seen = n, b, 0
                continue
            lo, hi = (0x80, 0xBF)
            if seen == 0 and lead in _SECOND:
                lo, hi = _SECOND[lead]
            if not lo <= b <= hi:
                self._failed = True
                return False
            seen += 1
            need -= 1
        self._need, self._lead_byte, self._seen = need, lead, seen
        return True

    def is_complete(self) -> bool:
        """True if no error so far and the stream ends on a character boundary."""
        return not self._failed and self._need == 0


def validate_utf8(data: Buffer) -> bool:
    """True if ``data`` is, as a whole, valid UTF-8."""
    v = Utf8Validator()
    return v.feed(data) and v.is_complete()
