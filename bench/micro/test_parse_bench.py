"""Micro-benchmarks: WebSocket frame parse+unmask and serialize throughput.

Issue 2, item 7.  Run through ``bench/micro/report.py`` (which writes the table
in ``docs/benchmarks.md``), or directly::

    python -m pytest bench/micro                           # measure
    python -m pytest bench/micro --benchmark-disable -q    # smoke: each case once

Parse: one buffer of about 1 MiB holding masked client frames (binary, FIN,
payload of 1 B, 16 B, 4 KiB or 64 KiB), fed in one call to a server-role
parser.  Every contender does the same work: it parses every header, unmasks
every payload and hands every payload to the caller as a new object, and each
case checks the count and the last payload before it is timed.

* ``native``: ``podterm._native.frame.FrameReader.feed`` -> ``[(opcode, bytes)]``.
* ``python``: the pure-Python twin, same call.
* ``wsproto``: ``FrameProtocol(client=False).receive_bytes`` then every frame of
  ``received_frames()`` -> ``[(opcode, bytearray)]``.  The frame layer only, which
  is wsproto's fastest path (``WSConnection`` adds an event object per message).
* ``picows``: its Cython ``WSProtocol`` after a real HTTP upgrade, driven as
  asyncio drives a BufferedProtocol: ``get_buffer()``, copy the bytes in (what
  ``recv_into`` would do), ``buffer_updated(n)``.  The listener keeps
  ``frame.get_payload_as_bytes()`` for each frame.  picows unmasks in place in
  its read buffer and calls a Python ``on_ws_frame`` per frame; it builds no
  ``(opcode, payload)`` tuple, so it does slightly less than ours.

Serialize: 512 frames per round from one payload, through ``encode_frame`` and
``encode_message`` (1-byte prefix + payload), server role (unmasked) and
client role (masked with a given key).  wsproto's ``send_data`` draws a mask
key from ``os.urandom`` per frame; the benchmark swaps in a constant key so
that, like ours (whose caller passes the key), only serialization is timed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from podterm.protocol import codec

SIZES = [1, 16, 4096, 65536]
PARSE_BYTES = 1 << 20  # about this much wire data per feed
SERIALIZE_FRAMES = 512
KEY = bytes.fromhex("37fa213d")
OP_BINARY = 0x2

NATIVE = codec.load("native")
PYTHON = codec.load("python")


def payload_of(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def parse_input(size: int) -> tuple[bytes, int, bytes]:
    """(wire bytes, frame count, payload): masked client frames filling about 1 MiB."""
    payload = payload_of(size)
    frame = NATIVE.encode_frame(OP_BINARY, payload, mask_key=KEY)
    count = max(1, PARSE_BYTES // len(frame))
    return frame * count, count, payload


def size_id(size: int) -> str:
    return f"{size // 1024}KiB" if size >= 1024 else f"{size}B"


# -- parse ---------------------------------------------------------------------


def reader_parser(impl: Any) -> Callable[[bytes], list[Any]]:
    def parse(data: bytes) -> list[Any]:
        out: list[Any] = impl.FrameReader(is_server=True).feed(data)
        return out
    return parse


def wsproto_parser() -> Callable[[bytes], list[Any]]:
    frame_protocol = pytest.importorskip("wsproto.frame_protocol")

    def parse(data: bytes) -> list[Any]:
        fp = frame_protocol.FrameProtocol(client=False, extensions=[])
        fp.receive_bytes(data)
        return [(f.opcode, f.payload) for f in fp.received_frames()]
    return parse


class _PicowsTransport:
    """Just enough of an asyncio transport for picows' WSTransport."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


@pytest.fixture(scope="module")
def picows_parser() -> Iterator[Callable[[bytes], list[Any]]]:
    picows = pytest.importorskip("picows")
    from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stub

    class Collect(picows.WSListener):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.payloads: list[bytes] = []

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            self.payloads.append(frame.get_payload_as_bytes())

    listener = Collect()
    logger = logging.getLogger("bench.picows")
    logger.propagate = False
    logger.setLevel(logging.CRITICAL)
    # WSTransport wants a real TCP socket for setsockopt/fileno; nothing is sent on it.
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    loop = asyncio.new_event_loop()

    async def make() -> Any:  # WSProtocol.__init__ needs a running loop
        return WSProtocol(None, None, False, lambda request: listener, logger,
                          True,  # disconnect_on_exception
                          None,  # websocket_handshake_timeout
                          False, 10, 10, 1,  # no auto ping
                          False,  # no auto pong
                          1 << 30,  # max_frame_size
                          None,  # extra_headers
                          4 << 20)  # read_buffer_init_size: one get_buffer() takes 1 MiB

    try:
        proto = loop.run_until_complete(make())
        proto.connection_made(_PicowsTransport(accepted))

        def feed(data: bytes) -> None:
            view = memoryview(data)
            pos = 0
            while pos < len(data):
                buf = proto.get_buffer(-1)
                n = min(len(buf), len(data) - pos)
                buf[:n] = view[pos:pos + n]
                proto.buffer_updated(n)
                pos += n

        feed(b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert proto.transport.underlying_transport.written[0].startswith(b"HTTP/1.1 101")

        def parse(data: bytes) -> list[Any]:
            listener.payloads = []
            feed(data)
            return listener.payloads

        yield parse
    finally:
        loop.close()
        for s in (accepted, client, server):
            s.close()


@pytest.fixture(params=["native", "python", "wsproto", "picows"])
def parser(request: pytest.FixtureRequest) -> tuple[str, Callable[[bytes], list[Any]]]:
    name = request.param
    if name == "native":
        return name, reader_parser(NATIVE)
    if name == "python":
        return name, reader_parser(PYTHON)
    if name == "wsproto":
        return name, wsproto_parser()
    return name, request.getfixturevalue("picows_parser")


def last_payload(item: Any) -> bytes:
    return bytes(item[1] if isinstance(item, tuple) else item)


@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_parse(benchmark: Any, parser: tuple[str, Callable[[bytes], list[Any]]], size: int) -> None:
    name, parse = parser
    data, count, payload = parse_input(size)
    out = parse(data)  # same work for everyone: every frame, every payload
    assert len(out) == count and last_payload(out[-1]) == payload, name
    benchmark.group = f"parse {size_id(size)}"
    benchmark.extra_info.update(kind="parse", impl=name, size=size, bytes=len(data), frames=count)
    benchmark(parse, data)


# -- serialize -----------------------------------------------------------------


def our_serializer(impl: Any, call: str, masked: bool) -> Callable[[bytes], None]:
    key = KEY if masked else None
    encode_frame, encode_message = impl.encode_frame, impl.encode_message
    rounds = range(SERIALIZE_FRAMES)
    if call == "encode_frame":
        def run(payload: bytes) -> None:
            for _ in rounds:
                encode_frame(OP_BINARY, payload, mask_key=key)
    else:
        def run(payload: bytes) -> None:
            for _ in rounds:
                encode_message(b"\x01", payload, mask_key=key)
    return run


def wsproto_serializer(call: str, masked: bool, monkeypatch: pytest.MonkeyPatch) -> Callable[[bytes], None]:
    frame_protocol = pytest.importorskip("wsproto.frame_protocol")
    monkeypatch.setattr(frame_protocol.os, "urandom", lambda n: KEY[:n])
    fp = frame_protocol.FrameProtocol(client=masked, extensions=[])
    rounds = range(SERIALIZE_FRAMES)
    send_data = fp.send_data
    if call == "encode_frame":
        def run(payload: bytes) -> None:
            for _ in rounds:
                send_data(payload, True)
    else:
        def run(payload: bytes) -> None:
            for _ in rounds:
                send_data(b"\x01" + payload, True)
    return run


@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("call", ["encode_frame", "encode_message"])
@pytest.mark.parametrize("name", ["native", "python", "wsproto"])
def test_serialize(benchmark: Any, monkeypatch: pytest.MonkeyPatch, name: str, call: str,
                   role: str, size: int) -> None:
    masked = role == "client"
    payload = payload_of(size)
    if name == "wsproto":
        run = wsproto_serializer(call, masked, monkeypatch)
    else:
        run = our_serializer(NATIVE if name == "native" else PYTHON, call, masked)
        # Check the output once: it must read back as the payload.
        impl = NATIVE if name == "native" else PYTHON
        key = KEY if masked else None
        wire = (impl.encode_frame(OP_BINARY, payload, mask_key=key) if call == "encode_frame"
                else impl.encode_message(b"\x01", payload, mask_key=key))
        expected = payload if call == "encode_frame" else b"\x01" + payload
        assert NATIVE.FrameReader(is_server=masked).feed(wire) == [(OP_BINARY, expected)]
    benchmark.group = f"serialize {call} {role} {size_id(size)}"
    benchmark.extra_info.update(kind="serialize", impl=name, call=call, role=role, size=size,
                                bytes=size * SERIALIZE_FRAMES, frames=SERIALIZE_FRAMES)
    benchmark(run, payload)
