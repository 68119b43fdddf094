"""RFC 6455 frame reader and writer (pure-Python twin of ``native/frame.pyx``).

This is the reference implementation: ``native/frame.pyx`` must produce the
same events, the same errors (class, close code and message) and the same
bytes for every input, however it is split.  ``tests/unit/test_codec_equivalence.py``
holds the two to that with hypothesis.

Reader contract
---------------
``FrameReader(is_server=..., max_frame_bytes=..., max_message_bytes=...)``;
``reader.feed(data)`` takes any bytes-like chunk and returns a list of complete
*messages* as ``(opcode, payload)`` tuples, in order:

* ``(OP_TEXT, bytes)`` — a whole text message, reassembled from its fragments,
  already validated as UTF-8 (not decoded: the consumer decides);
* ``(OP_BINARY, bytes)`` — a whole binary message;
* ``(OP_PING, bytes)``, ``(OP_PONG, bytes)`` — control frames, delivered as they
  arrive, even between the fragments of a data message;
* ``(OP_CLOSE, bytes)`` — the raw close payload, already validated (empty, or a
  legal code plus a UTF-8 reason); decode it with :func:`parse_close_payload`.

Payloads are unmasked.  On the first violation ``feed`` raises
:class:`~podterm.errors.ProtocolViolation` with the close code the connection
must be closed with; its ``partial`` attribute holds the messages completed
earlier in the same call.  After that the reader is dead: every later ``feed``
raises an equal violation (with an empty ``partial``).

Checks, in the order they are made (the order is part of the contract):

1. RSV1-3 set (no extension is ever negotiated)            → 1002 ``reserved bits set``
2. opcode 3-7 or 11-15                                      → 1002 ``unknown opcode 0xN``
3. control frame with FIN clear                             → 1002 ``fragmented control frame``
4. continuation with no message in progress                 → 1002 ``unexpected continuation frame``
5. new data frame while a message is in progress            → 1002 ``expected continuation frame``
6. server role: unmasked frame                              → 1002 ``unmasked client frame``
   client role: masked frame                                → 1002 ``masked server frame``
7. control frame payload over 125 bytes                     → 1002 ``control frame too long``
8. 64-bit length with the most significant bit set          → 1002 ``frame length too large``
9. frame payload over ``max_frame_bytes``                   → 1009 ``frame too big``
10. message total over ``max_message_bytes``                → 1009 ``message too big``
11. close frame with a 1-byte payload                       → 1002 ``close frame with 1-byte payload``
12. text payload not UTF-8, checked as bytes arrive, so the
    first bad byte fails even inside a frame not yet complete → 1007 ``invalid UTF-8 in text message``
13. close code not allowed on the wire                      → 1002 ``invalid close code``
14. close reason not UTF-8                                  → 1007 ``invalid UTF-8 in close reason``

Checks 1-11 are made as soon as the header bytes they need are present.
A text message whose last fragment ends mid-character fails check 12 then.

Writer
------
:func:`encode_frame` serializes one frame; :func:`encode_message` writes a
single-frame message whose payload is ``prefix + payload`` without building
the concatenation first (the channel byte of ``channel.k8s.io``, the type byte
of ``podterm.v1``, the type and stream id of the agent tunnel).  Both mask when
given a 4-byte ``mask_key`` (client role) and never otherwise (server role).
"""

from __future__ import annotations

import struct

from podterm.errors import CloseCode, ProtocolViolation
from podterm.protocol._types import Buffer
from podterm.protocol.mask import mask as _mask
from podterm.protocol.utf8 import Utf8Validator, validate_utf8

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

#: Default limits.  1 MiB: the k8s spec's suggested bound (kubectl sends at most
#: 32 KiB + 1 per message); podterm.v1 messages are far smaller.
DEFAULT_MAX_FRAME_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

MAX_CONTROL_PAYLOAD = 125  # RFC 6455 §5.5

_KNOWN_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})

# Error messages are part of the native/Python contract: keep them identical.
E_RSV = "reserved bits set"
E_OPCODE = "unknown opcode 0x{:x}"
E_FRAG_CONTROL = "fragmented control frame"
E_UNEXPECTED_CONT = "unexpected continuation frame"
E_EXPECTED_CONT = "expected continuation frame"
E_UNMASKED = "unmasked client frame"
E_MASKED = "masked server frame"
E_CONTROL_LONG = "control frame too long"
E_LEN_MSB = "frame length too large"
E_FRAME_BIG = "frame too big"
E_MESSAGE_BIG = "message too big"
E_CLOSE_1 = "close frame with 1-byte payload"
E_TEXT_UTF8 = "invalid UTF-8 in text message"
E_CLOSE_CODE = "invalid close code"
E_CLOSE_UTF8 = "invalid UTF-8 in close reason"


def is_valid_close_code(code: int) -> bool:
    """RFC 6455 §7.4: codes an endpoint may put on the wire.

    1000-1003 and 1007-1014 are defined (1012-1014 by the IANA registry);
    1004-1006 and 1015 are reserved and must never be sent; 3000-4999 are for
    libraries and applications.
    """
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)


def parse_close_payload(payload: Buffer) -> tuple[int, str]:
    """Decode a close payload the reader already validated.

    Returns ``(code, reason)``; an empty payload gives ``(1005, "")``
    (RFC 6455 §7.1.5: "no status code was actually present").
    """
    if len(payload) < 2:
        return CloseCode.NO_STATUS, ""
    code = (payload[0] << 8) | payload[1]
    return code, bytes(payload[2:]).decode("utf-8")


def encode_close_payload(code: int, reason: str = "") -> bytes:
    """Encode a close payload; the reason is cut at a character boundary to fit 123 bytes."""
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8")
    if len(raw) > MAX_CONTROL_PAYLOAD - 2:
        raw = raw[: MAX_CONTROL_PAYLOAD - 2]
        while raw and not validate_utf8(raw):
            raw = raw[:-1]
    return struct.pack("!H", code) + raw


def _header(opcode: int, fin: bool, length: int, masked: bool) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    if length < 126:
        return bytes((b0, mbit | length))
    if length < 0x10000:
        return struct.pack("!BBH", b0, mbit | 126, length)
    return struct.pack("!BBQ", b0, mbit | 127, length)


def encode_frame(opcode: int, payload: Buffer = b"", *, fin: bool = True,
                 mask_key: bytes | None = None) -> bytes:
    """Serialize one frame.

    Args:
        opcode: one of the ``OP_*`` constants.
        payload: the unmasked payload.
        fin: False for every fragment of a message but the last.
        mask_key: 4 bytes to mask with (client role), or None (server role).

    Raises:
        ValueError: unknown opcode, a control frame that is fragmented or longer
            than 125 bytes, or a mask key that is not 4 bytes.
    """
    if opcode not in _KNOWN_OPCODES:
        raise ValueError(f"unknown opcode {opcode}")
    # Length in bytes, not items: a memoryview of a wider format counts items.
    view = memoryview(payload)
    n = view.nbytes
    if opcode >= OP_CLOSE and (n > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames must be final and at most 125 bytes")
    if mask_key is None:
        return _header(opcode, fin, n, False) + view.tobytes()
    if len(mask_key) != 4:
        raise ValueError("mask key must be 4 bytes")
    return _header(opcode, fin, n, True) + bytes(mask_key) + _mask(view, mask_key)


def encode_message(prefix: Buffer, payload: Buffer, *, opcode: int = OP_BINARY,
                   mask_key: bytes | None = None) -> bytes:
    """Serialize a single-frame data message whose payload is ``prefix + payload``."""
    if opcode not in (OP_TEXT, OP_BINARY):
        raise ValueError("encode_message writes data messages only")
    # join takes bytes-like objects only; bytes(3) would silently give three zero bytes.
    body = b"".join((prefix, payload))
    return encode_frame(opcode, body, mask_key=mask_key)


class FrameReader:
    """Incremental RFC 6455 frame parser; see the module docstring for the contract."""

    __slots__ = (
        "is_server", "max_frame_bytes", "max_message_bytes",
        "_buf", "_in_frame", "_opcode", "_fin", "_key", "_remaining", "_done",
        "_msg_opcode", "_msg", "_msg_len", "_ctl", "_utf8", "_error",
    )

    def __init__(self, *, is_server: bool, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_frame_bytes < MAX_CONTROL_PAYLOAD or max_message_bytes < MAX_CONTROL_PAYLOAD:
            raise ValueError("limits must be at least 125 bytes")
        self.is_server = is_server
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()  # undecoded header bytes
        self._in_frame = False  # header parsed, payload pending
        self._opcode = 0
        self._fin = False
        self._key: bytes | None = None
        self._remaining = 0  # payload bytes of the current frame still to come
        self._done = 0  # payload bytes of the current frame already consumed
        self._msg_opcode = 0  # opcode of the data message in progress; 0 = none
        self._msg = bytearray()  # data message assembled so far
        self._msg_len = 0
        self._ctl = bytearray()  # control frame assembled so far
        self._utf8 = Utf8Validator()
        self._error: ProtocolViolation | None = None

    @property
    def buffered(self) -> int:
        """Bytes held: partial header plus partial message and control frame."""
        return len(self._buf) + len(self._msg) + len(self._ctl)

    def _fail(self, message: str, code: int, out: list[tuple[int, bytes]]) -> ProtocolViolation:
        self._error = ProtocolViolation(message, code)
        return ProtocolViolation(message, code, partial=out)

    def feed(self, data: Buffer) -> list[tuple[int, bytes]]:
        """Consume ``data``; return every message completed, in order.

        Raises:
            ProtocolViolation: the peer broke RFC 6455 (see the module docstring).
        """
        if self._error is not None:
            raise ProtocolViolation(self._error.message, self._error.close_code)
        out: list[tuple[int, bytes]] = []
        view = memoryview(data).cast("B")
        pos = 0
        end = len(view)
        while True:
            if not self._in_frame:
                # Collect header bytes; checks run as soon as their bytes exist.
                need = 2 - len(self._buf)
                if need > 0:
                    take = min(need, end - pos)
                    self._buf += view[pos:pos + take]
                    pos += take
                    if len(self._buf) >= 1:
                        err = self._check_b0(self._buf[0])
                        if err:
                            raise self._fail(err[0], err[1], out)
                    if len(self._buf) < 2:
                        return out
                    err = self._check_b1(self._buf[0], self._buf[1])
                    if err:
                        raise self._fail(err[0], err[1], out)
                b0, b1 = self._buf[0], self._buf[1]
                len7 = b1 & 0x7F
                masked = bool(b1 & 0x80)
                hlen = 2 + (2 if len7 == 126 else 8 if len7 == 127 else 0) + (4 if masked else 0)
                need = hlen - len(self._buf)
                if need > 0:
                    take = min(need, end - pos)
                    self._buf += view[pos:pos + take]
                    pos += take
                    if len7 == 127 and len(self._buf) >= 3 and self._buf[2] & 0x80:
                        raise self._fail(E_LEN_MSB, CloseCode.PROTOCOL_ERROR, out)
                    if len(self._buf) < hlen:
                        return out
                if len7 == 126:
                    length = (self._buf[2] << 8) | self._buf[3]
                    koff = 4
                elif len7 == 127:
                    length = int.from_bytes(self._buf[2:10], "big")
                    koff = 10
                else:
                    length = len7
                    koff = 2
                opcode = b0 & 0x0F
                err = self._check_length(opcode, length)
                if err:
                    raise self._fail(err[0], err[1], out)
                self._key = bytes(self._buf[koff:koff + 4]) if masked else None
                self._opcode = opcode
                self._fin = bool(b0 & 0x80)
                self._remaining = length
                self._done = 0
                self._in_frame = True
                self._buf.clear()
                if opcode == OP_CONT:
                    pass
                elif opcode < OP_CLOSE:
                    self._msg_opcode = opcode
                    self._utf8.reset()
            # Payload: take what is here, unmask, validate, accumulate.
            take = min(self._remaining, end - pos)
            if take:
                chunk = view[pos:pos + take]
                if self._key is not None:
                    piece = _mask(chunk, self._key, self._done)
                else:
                    piece = bytes(chunk)
                pos += take
                self._remaining -= take
                self._done += take
                if self._opcode >= OP_CLOSE:
                    self._ctl += piece
                else:
                    if self._msg_opcode == OP_TEXT and not self._utf8.feed(piece):
                        raise self._fail(E_TEXT_UTF8, CloseCode.INVALID_PAYLOAD, out)
                    self._msg += piece
            if self._remaining:
                return out
            # Frame complete.
            self._in_frame = False
            if self._opcode >= OP_CLOSE:
                payload = bytes(self._ctl)
                self._ctl.clear()
                if self._opcode == OP_CLOSE and payload:
                    code = (payload[0] << 8) | payload[1]
                    if not is_valid_close_code(code):
                        raise self._fail(E_CLOSE_CODE, CloseCode.PROTOCOL_ERROR, out)
                    if not validate_utf8(payload[2:]):
                        raise self._fail(E_CLOSE_UTF8, CloseCode.INVALID_PAYLOAD, out)
                out.append((self._opcode, payload))
            elif self._fin:
                if self._msg_opcode == OP_TEXT and not self._utf8.is_complete():
                    raise self._fail(E_TEXT_UTF8, CloseCode.INVALID_PAYLOAD, out)
                out.append((self._msg_opcode, bytes(self._msg)))
                self._msg.clear()
                self._msg_opcode = 0
                self._msg_len = 0
            if pos >= end:
                return out

    def _check_b0(self, b0: int) -> tuple[str, int] | None:
        if b0 & 0x70:
            return E_RSV, CloseCode.PROTOCOL_ERROR
        opcode = b0 & 0x0F
        if opcode not in _KNOWN_OPCODES:
            return E_OPCODE.format(opcode), CloseCode.PROTOCOL_ERROR
        if opcode >= OP_CLOSE:
            if not b0 & 0x80:
                return E_FRAG_CONTROL, CloseCode.PROTOCOL_ERROR
        elif opcode == OP_CONT:
            if not self._msg_opcode:
                return E_UNEXPECTED_CONT, CloseCode.PROTOCOL_ERROR
        elif self._msg_opcode:
            return E_EXPECTED_CONT, CloseCode.PROTOCOL_ERROR
        return None

    def _check_b1(self, b0: int, b1: int) -> tuple[str, int] | None:
        masked = b1 & 0x80
        if self.is_server and not masked:
            return E_UNMASKED, CloseCode.PROTOCOL_ERROR
        if not self.is_server and masked:
            return E_MASKED, CloseCode.PROTOCOL_ERROR
        if (b0 & 0x0F) >= OP_CLOSE and (b1 & 0x7F) > MAX_CONTROL_PAYLOAD:
            return E_CONTROL_LONG, CloseCode.PROTOCOL_ERROR
        return None

    def _check_length(self, opcode: int, length: int) -> tuple[str, int] | None:
        if length > self.max_frame_bytes:
            return E_FRAME_BIG, CloseCode.MESSAGE_TOO_BIG
        if opcode < OP_CLOSE:
            if self._msg_len + length > self.max_message_bytes:
                return E_MESSAGE_BIG, CloseCode.MESSAGE_TOO_BIG
            self._msg_len += length
        elif opcode == OP_CLOSE and length == 1:
            return E_CLOSE_1, CloseCode.PROTOCOL_ERROR
        return None
