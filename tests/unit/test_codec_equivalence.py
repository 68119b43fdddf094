"""The compiled codec and its pure-Python twin behave identically.

The pure-Python modules in ``podterm.protocol`` are the oracle.  Hypothesis
builds byte streams: well-formed ones (random messages, fragmented at random,
with control frames between the fragments, payload lengths around the
125/126/65535/65536 boundaries, valid and broken UTF-8, close frames with
legal and illegal codes), streams with a few bytes flipped, inserted or cut,
and plain garbage.  Each stream is cut at random points and fed, chunk by
chunk, to a reader of each implementation.  After every chunk both must have
returned the same messages, or raised the same ``ProtocolViolation`` (class,
close code, message, and the ``partial`` list of messages completed before
it), and must report the same ``buffered``.  Feeding continues after a
violation: both readers must stay dead the same way.

Issue 2 asks for at least 10,000 examples per run of the stream test, each
of which runs both codecs; the writer, masking and UTF-8 functions get
their own, smaller properties.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests.helpers.native import native_or_skip

from podterm.errors import ProtocolViolation
from podterm.protocol import codec
from podterm.protocol.frame import encode_close_payload, is_valid_close_code

NATIVE = native_or_skip(codec.load, "native codec")
PYTHON = codec.load("python")

STREAM_EXAMPLES = 10_000  # the Done-when of issue 2

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

# Lengths where the header format, the word loop or a limit changes.
BOUNDARY_LENGTHS = [0, 1, 7, 8, 9, 15, 16, 17, 124, 125, 126, 127, 128, 255, 256,
                    65535, 65536, 65537]
LIMITS = [125, 126, 200, 1000, 65535, 65536, 70000, None]  # None: the default
CLOSE_CODES = [0, 999, 1000, 1001, 1003, 1004, 1005, 1006, 1007, 1011, 1014, 1015, 1016,
               2999, 3000, 4000, 4999, 5000, 65535]


# -- building streams ------------------------------------------------------------


def build_frame(opcode: int, payload: bytes, *, fin: bool, rsv: int, key: bytes | None,
                len_bytes: int | None, msb: bool) -> bytes:
    """Serialize one frame by hand (the code under test is not trusted to build input)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    mbit = 0x80 if key is not None else 0
    if len_bytes is None:
        len_bytes = 0 if n < 126 else 2 if n < 0x10000 else 8
    if msb:
        len_bytes = 8
    if len_bytes == 0 and n < 126:
        head = bytes((b0, mbit | n))
    elif len_bytes in (0, 2) and n < 0x10000:
        head = bytes((b0, mbit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mbit | 127)) + struct.pack("!Q", n | ((1 << 63) if msb else 0))
    if key is None:
        return head + payload
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload[:64]))
    if n > 64:  # big payloads: mask the rest with one big-integer XOR
        rest = payload[64:]
        stream = (key * (len(rest) // 4 + 1))[: len(rest)]
        masked += (int.from_bytes(rest, "little") ^ int.from_bytes(stream, "little")).to_bytes(
            len(rest), "little")
    return head + key + masked


# Strategies are built once, here: building them inside composites on every
# draw costs more than running both codecs.
_TEXT = st.text(max_size=16).map(str.encode)
_BAD_UTF8 = st.sampled_from([b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1", b"\xe0\x80", b"\xed\xa0\x80",
                             b"\xf4\x90", b"\xf5", b"\xff", b"\xe2\x82", b"\xf0\x9f\x98"])
_SEED = st.integers(0, 2**32 - 1)
_BOUNDARY = st.sampled_from(BOUNDARY_LENGTHS)
_MB_TAIL = st.sampled_from([b"", "é".encode(), "€".encode(), "🙂".encode()])


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    """Text with one thing wrong: a stray byte, a cut character, a surrogate, an overlong."""
    text = draw(_TEXT)
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(_BAD_UTF8) + text[at:]


_INVALID_UTF8 = invalid_utf8()
_SMALL_BINARY = st.binary(max_size=24)


@st.composite
def payloads(draw: st.DrawFn, valid_text: bool = False) -> bytes:
    """Any payload, or (``valid_text``) one that is valid UTF-8."""
    kind = draw(st.integers(0, 9))
    if kind <= 2 and not valid_text:
        return draw(_SMALL_BINARY)
    if kind <= 5:
        return draw(_TEXT)
    if kind == 6 and not valid_text:
        return draw(_INVALID_UTF8)
    n = draw(_BOUNDARY)
    if kind == 7 or valid_text:  # ASCII text of a boundary length, maybe ending in a multi-byte character
        tail = draw(_MB_TAIL)
        return (b"t" * n)[: max(0, n - len(tail))] + tail
    return random.Random(draw(_SEED)).randbytes(n)


_PAYLOAD = payloads()
_TEXT_PAYLOAD = payloads(valid_text=True)
_CLOSE_CODE = st.sampled_from(CLOSE_CODES)
_ANY_CODE = st.integers(0, 0xFFFF)
_ONE_BYTE = st.binary(min_size=1, max_size=1)
_REASON = st.text(max_size=20).map(str.encode)
_VALID_CODE = st.sampled_from([c for c in CLOSE_CODES if is_valid_close_code(c)])


@st.composite
def close_payloads(draw: st.DrawFn, valid: bool = False) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return b""
    if valid:
        return encode_close_payload(draw(_VALID_CODE), draw(st.text(max_size=40)))
    if kind == 1:
        return draw(_ONE_BYTE)
    code = draw(_CLOSE_CODE if kind <= 3 else _ANY_CODE)
    reason = draw(_INVALID_UTF8 if kind == 3 else _REASON)
    return (struct.pack("!H", code) + reason)[:125]


_CLOSE_PAYLOAD = close_payloads()
_VALID_CLOSE_PAYLOAD = close_payloads(valid=True)
_CONTROL_OPCODE = st.sampled_from([OP_PING, OP_PONG, OP_CLOSE])
_NEAR_CONTROL_LIMIT = st.sampled_from([125, 126, 127])
_PING_PAYLOAD = st.binary(max_size=16)


@st.composite
def control_frame(draw: st.DrawFn, clean: bool = False) -> tuple[int, bytes, bool]:
    opcode = draw(_CONTROL_OPCODE)
    if opcode == OP_CLOSE:
        payload = draw(_VALID_CLOSE_PAYLOAD if clean else _CLOSE_PAYLOAD)
    elif draw(st.integers(0, 19)) == 0:
        payload = b"x" * (125 if clean else draw(_NEAR_CONTROL_LIMIT))  # at the control limit
    else:
        payload = draw(_PING_PAYLOAD)
    fin = clean or draw(st.integers(0, 29)) != 0  # rarely a fragmented control frame
    return opcode, payload, fin


_CONTROLS = {False: control_frame(), True: control_frame(clean=True)}
_DATA_OPCODE = st.sampled_from([OP_TEXT, OP_BINARY])


@st.composite
def message(draw: st.DrawFn, clean: bool = False) -> list[tuple[int, bytes, bool]]:
    """One data message split into 1-4 fragments, control frames maybe between them."""
    opcode = draw(_DATA_OPCODE)
    body = draw(_TEXT_PAYLOAD if clean and opcode == OP_TEXT else _PAYLOAD)
    pieces = draw(st.integers(1, 4))
    cuts = sorted(draw(st.integers(0, len(body))) for _ in range(pieces - 1))
    bounds = [0, *cuts, len(body)]
    frames: list[tuple[int, bytes, bool]] = []
    for i in range(pieces):
        last = i == pieces - 1
        frames.append((opcode if i == 0 else OP_CONT, body[bounds[i]:bounds[i + 1]], last))
        if not last and draw(st.integers(0, 3)) == 0:
            frames.append(draw(_CONTROLS[clean]))
    return frames


@st.composite
def any_frame(draw: st.DrawFn) -> list[tuple[int, bytes, bool]]:
    """A frame with any opcode (including reserved ones) and any FIN."""
    return [(draw(st.integers(0, 15)), draw(_PAYLOAD), draw(st.booleans()))]


_STREAM_ITEMS = {
    # clean: well-formed messages and control frames only
    True: st.lists(st.one_of(message(clean=True), message(clean=True),
                             _CONTROLS[True].map(lambda f: [f])), min_size=1, max_size=5),
    # dirty: also payloads and frames that break a rule, now and then
    False: st.lists(st.one_of(message(), message(), message(), _CONTROLS[False].map(lambda f: [f]),
                              any_frame()), min_size=1, max_size=5),
}
_RSV = st.sampled_from([0x10, 0x20, 0x40])
_WIDE_LENGTH = st.sampled_from([2, 8])
_KEY = st.integers(0, 2**32 - 1).map(lambda k: k.to_bytes(4, "big"))


@st.composite
def frame_stream(draw: st.DrawFn, is_server: bool, clean: bool) -> bytes:
    """Frames, each encoded with its own key and length format (clean: no header defects)."""
    out = []
    for frames in draw(_STREAM_ITEMS[clean]):
        for opcode, payload, fin in frames:
            odd = draw(st.integers(0, 39))  # a small chance of each header oddity
            if clean and odd not in (2, 3):
                odd = 5  # a non-minimal length encoding is legal here
            rsv = draw(_RSV) if odd == 0 else 0
            masked = is_server if odd != 1 else not is_server
            key = draw(_KEY) if masked else None
            len_bytes = draw(_WIDE_LENGTH) if odd in (2, 3) else None
            out.append(build_frame(opcode, payload, fin=fin, rsv=rsv, key=key,
                                   len_bytes=len_bytes, msb=odd == 4))
    return b"".join(out)


_STREAMS = {(server, clean): frame_stream(server, clean)
            for server in (True, False) for clean in (True, False)}
_INSERT = st.binary(min_size=1, max_size=4)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted or removed."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(buf)))
        how = draw(st.integers(0, 2))
        if how == 0 and at < len(buf):
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif how == 1:
            buf[at:at] = draw(_INSERT)
        else:
            del buf[at:at + draw(st.integers(1, 4))]
    return bytes(buf)


_LIMIT = st.sampled_from(LIMITS + [None] * 5)  # mostly the defaults
_GARBAGE = st.binary(max_size=200)
_GARBAGE_TAIL = st.binary(min_size=1, max_size=40)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, Any], list[Any]]:
    """(reader arguments, chunks to feed)."""
    is_server = draw(st.booleans())
    kwargs: dict[str, Any] = {"is_server": is_server}
    for name in ("max_frame_bytes", "max_message_bytes"):
        limit = draw(_LIMIT)
        if limit is not None:
            kwargs[name] = limit
    kind = draw(st.integers(0, 19))
    if kind <= 6:
        data = draw(_STREAMS[is_server, True])
        label = "well-formed"
    elif kind <= 11:
        data = draw(_STREAMS[is_server, False])
        label = "with defects"
    elif kind <= 15:
        data = draw(mutated(draw(_STREAMS[is_server, draw(st.booleans())])))
        label = "mutated"
    elif kind <= 17:
        data = draw(_GARBAGE)
        label = "garbage"
    else:
        data = draw(_STREAMS[is_server, True]) + draw(_GARBAGE_TAIL)
        label = "well-formed + garbage"
    split = draw(st.integers(0, 4))
    if split == 0:
        cuts: list[int] = []
    elif split == 1 and len(data) <= 400:
        cuts = list(range(1, len(data)))  # a byte at a time
    else:
        cuts = sorted(draw(st.integers(0, len(data))) for _ in range(draw(st.integers(1, 16))))
    bounds = [0, *cuts, len(data)]
    chunks: list[Any] = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    wrap = draw(st.integers(0, 5))  # feed bytes mostly; sometimes other bytes-likes
    if wrap == 1:
        chunks = [bytearray(c) for c in chunks]
    elif wrap == 2:
        chunks = [memoryview(b"\x00" + c)[1:] for c in chunks]  # views at odd addresses
    chunks.append(b"")  # and one empty feed at the end
    event("input: " + label)
    return kwargs, chunks


def run(impl: Any, kwargs: dict[str, Any], chunks: list[Any]) -> list[tuple[Any, ...]]:
    """Feed every chunk; log what each feed returned or raised, and what is buffered."""
    reader = impl.FrameReader(**kwargs)
    log: list[tuple[Any, ...]] = []
    for chunk in chunks:
        try:
            log.append(("ok", reader.feed(chunk), reader.buffered))
        except ProtocolViolation as exc:
            log.append(("violation", type(exc), type(exc.close_code), exc.close_code, exc.message,
                        exc.partial, reader.buffered))
    return log


# -- the properties ------------------------------------------------------------


@pytest.mark.timeout(1200)  # 10,000 examples: ~90 s alone, several times that on a busy box
@settings(max_examples=STREAM_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_readers_agree_on_random_streams_split_at_random(
        scenario: tuple[dict[str, Any], list[Any]]) -> None:
    kwargs, chunks = scenario
    expected = run(PYTHON, kwargs, chunks)
    assert run(NATIVE, kwargs, chunks) == expected
    # Shown by ``pytest --hypothesis-show-statistics``: what the inputs exercised.
    violations = [entry[4] for entry in expected if entry[0] == "violation"]
    event("outcome: " + (violations[0] if violations else "no violation"))
    event("messages: " + str(min(8, sum(len(e[1]) if e[0] == "ok" else len(e[5]) for e in expected))))


def outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """What a call returned, or the class and text of what it raised."""
    try:
        return "ok", fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc) if isinstance(exc, ValueError) else None


mask_keys = st.one_of(st.none(), st.binary(min_size=4, max_size=4), st.binary(max_size=6))
big_payloads = st.builds(lambda n, seed: random.Random(seed).randbytes(n),
                         st.sampled_from(BOUNDARY_LENGTHS), st.integers(0, 2**32))


@settings(max_examples=2000, deadline=None)
@given(opcode=st.integers(-2, 17), payload=st.one_of(st.binary(max_size=140), big_payloads),
       fin=st.booleans(), mask_key=mask_keys)
def test_encode_frame_agrees(opcode: int, payload: bytes, fin: bool, mask_key: bytes | None) -> None:
    assert (outcome(NATIVE.encode_frame, opcode, payload, fin=fin, mask_key=mask_key)
            == outcome(PYTHON.encode_frame, opcode, payload, fin=fin, mask_key=mask_key))


@settings(max_examples=2000, deadline=None)
@given(prefix=st.binary(max_size=9), payload=st.one_of(st.binary(max_size=140), big_payloads),
       opcode=st.integers(-1, 11), mask_key=mask_keys)
def test_encode_message_agrees(prefix: bytes, payload: bytes, opcode: int,
                               mask_key: bytes | None) -> None:
    assert (outcome(NATIVE.encode_message, prefix, payload, opcode=opcode, mask_key=mask_key)
            == outcome(PYTHON.encode_message, prefix, payload, opcode=opcode, mask_key=mask_key))


@settings(max_examples=2000, deadline=None)
@given(data=st.one_of(st.binary(max_size=100), big_payloads),
       key=st.binary(min_size=3, max_size=5), offset=st.integers(-5, 2**70))
def test_mask_agrees(data: bytes, key: bytes, offset: int) -> None:
    assert outcome(NATIVE.mask, data, key, offset) == outcome(PYTHON.mask, data, key, offset)


utf8_inputs = st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode), invalid_utf8())


@settings(max_examples=3000, deadline=None)
@given(data=utf8_inputs)
def test_validate_utf8_agrees(data: bytes) -> None:
    assert NATIVE.validate_utf8(data) is PYTHON.validate_utf8(data)


@settings(max_examples=2000, deadline=None)
@given(pieces=st.lists(utf8_inputs, max_size=6), resets=st.lists(st.booleans(), max_size=6))
def test_utf8_validators_agree_piece_by_piece(pieces: list[bytes], resets: list[bool]) -> None:
    native, python = NATIVE.Utf8Validator(), PYTHON.Utf8Validator()
    for i, piece in enumerate(pieces):
        if i < len(resets) and resets[i]:
            native.reset()
            python.reset()
        assert native.feed(piece) is python.feed(piece)
        assert native.is_complete() is python.is_complete()


# -- the compiled codec is really the one under test in CI -----------------------


def test_native_codec_is_active_in_ci() -> None:
    """With PODTERM_NATIVE=require (CI), the codec in use must be the compiled one."""
    if os.environ.get("PODTERM_NATIVE") != "require":
        pytest.skip("PODTERM_NATIVE is not 'require': the pure-Python fallback is allowed here")
    assert codec.IMPL == "native", codec.REASON


@pytest.mark.parametrize("name", ["frame", "mask", "utf8"])
def test_native_modules_are_compiled_extensions(name: str) -> None:
    module = importlib.import_module(f"podterm._native.{name}")
    assert module.__file__ is not None
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module.__file__
