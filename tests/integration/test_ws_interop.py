"""Our WebSocket against real third-party peers, over loopback TCP.

* our server role (an echo server built from ``server_handshake`` +
  ``WebSocketStream``) against trio-websocket's and websockets' clients;
* our client role (``connect``) against trio-websocket's server;
* malformed input from a raw TCP client, asserting the exact close code or
  HTTP status on the wire.

Every test runs under ``trio.fail_after``; the websockets client runs in a
thread with its own timeouts on every call, so nothing can hang.
"""

from __future__ import annotations

import functools
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
import trio
import trio_websocket
import websockets.exceptions
import websockets.sync.client

from podterm.errors import HandshakeError
from podterm.net.wsconn import ConnectionClosed, connect, server_handshake
from podterm.protocol.frame import (
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    encode_frame,
    parse_close_payload,
)
from podterm.protocol.handshake import build_request
from podterm.protocol.websocket import WsLimits
from podterm.resilience.heartbeat import Heartbeat

TIMEOUT = 10
HOST = "127.0.0.1"
MASK = b"\x37\xfa\x21\x3d"
#: The echo server's limits: big enough for the 200 KB echo, small enough to
#: test 1009 without sending a megabyte.
LIMITS = WsLimits(max_frame_bytes=256 * 1024, max_message_bytes=512 * 1024)

Record = tuple[str, int, str]


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            with trio.fail_after(TIMEOUT):
                await fn(*args, **kwargs)
        trio.run(main)
    return wrapper


# ------------------------------------------------------------------ our echo server


class EchoServer:
    """Echoes text and binary; the text ``close:<code>:<reason>`` makes it close.

    Every connection's end is reported on ``results`` as
    ``("client-closed" | "server-closed", code, reason)``.
    """

    def __init__(self) -> None:
        self.port = 0
        self.subprotocols: list[str | None] = []
        self.offered: list[tuple[str, ...]] = []
        self._send, self.results = trio.open_memory_channel[Record](16)

    @staticmethod
    def select(offered: list[str]) -> str | None:
        return "podterm.v1" if "podterm.v1" in offered else None

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            with trio.fail_after(5):
                ws, upgrade = await server_handshake(stream, select_subprotocol=self.select,
                                                     limits=LIMITS)
        except HandshakeError:
            return
        self.offered.append(upgrade.subprotocols)
        self.subprotocols.append(ws.subprotocol)
        try:
            while True:
                for opcode, payload in await ws.receive_batch():
                    if opcode == OP_TEXT:
                        text = payload.decode("utf-8")
                        if text.startswith("close:"):
                            _, code, reason = text.split(":", 2)
                            await ws.aclose(int(code), reason)
                            await self._send.send(("server-closed", int(code), reason))
                            return
                        await ws.send_text(text)
                    else:
                        await ws.send_binary(payload)
        except ConnectionClosed as exc:
            await self._send.send(("client-closed", exc.code, exc.reason))
        finally:
            await ws.aclose()


async def start_echo_server(nursery: trio.Nursery) -> EchoServer:
    server = EchoServer()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0, host=HOST))
    server.port = listeners[0].socket.getsockname()[1]
    return server


def echo_server_test(fn: Callable[[EchoServer], Awaitable[None]]) -> Callable[[], None]:
    """Run ``fn(server)`` with an echo server on 127.0.0.1; stop the server after."""
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server = await start_echo_server(nursery)
            await fn(server)
            nursery.cancel_scope.cancel()
    return _named(trio_test(run), fn)


def _named(test: Callable[[], None], fn: Callable[..., Any]) -> Callable[[], None]:
    # Not functools.wraps: pytest would read fn's parameters as fixtures.
    test.__name__, test.__qualname__, test.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    del test.__wrapped__  # type: ignore[attr-defined]
    return test


# ------------------------------------------------ our server ← trio-websocket client


@echo_server_test
async def test_trio_websocket_client_echo_ping_and_close(server: EchoServer) -> None:
    url = f"ws://{HOST}:{server.port}/api/v1/sessions/x/attach"
    async with trio_websocket.open_websocket_url(url, subprotocols=["podterm.v1", "x"]) as ws:
        assert ws.subprotocol == "podterm.v1"
        await ws.send_message("héllo wörld")
        assert await ws.get_message() == "héllo wörld"
        await ws.send_message(b"\x00\x01\xff")
        assert await ws.get_message() == b"\x00\x01\xff"
        big = bytes(range(256)) * 800  # 200 KiB: 64-bit length both ways
        await ws.send_message(big)
        assert await ws.get_message() == big
        await ws.ping(b"are you there")  # returns when the matching PONG arrives
        await ws.aclose(4000, "client done")
    assert await server.results.receive() == ("client-closed", 4000, "client done")
    assert server.offered == [("podterm.v1", "x")]


@pytest.mark.parametrize(("code", "reason"), [(1008, "policy violated"),
                                              (4409, "session already has a writer")])
def test_trio_websocket_client_sees_server_close(code: int, reason: str) -> None:
    @echo_server_test
    async def run(server: EchoServer) -> None:
        url = f"ws://{HOST}:{server.port}/"
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(f"close:{code}:{reason}")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await ws.get_message()
            assert (info.value.reason.code, info.value.reason.reason) == (code, reason)
        # trio-websocket 0.12's client never closes its socket when the server
        # closed first (its aclose() returns early once a close reason is
        # set), so the socket would leak into a ResourceWarning.  Not ours.
        await ws._stream.aclose()
        assert await server.results.receive() == ("server-closed", code, reason)
        assert server.subprotocols == [None]
    run()


# ----------------------------------------------------- our server ← websockets client


def _websockets_session(port: int) -> dict[str, Any]:
    """Runs in a thread: a full session with the websockets sync client."""
    out: dict[str, Any] = {}
    with websockets.sync.client.connect(f"ws://{HOST}:{port}/ws", subprotocols=["podterm.v1"],
                                        open_timeout=5, close_timeout=5) as ws:
        out["subprotocol"] = ws.subprotocol
        # websockets offers permessage-deflate by default; we must decline it.
        out["extensions"] = ws.response.headers.get("Sec-WebSocket-Extensions")
        ws.send("héllo")
        out["text"] = ws.recv(timeout=5)
        ws.send(b"\x00bin")
        out["binary"] = ws.recv(timeout=5)
        ws.send(["frag", "mented ", "tëxt"])  # an iterable is sent as fragments
        out["fragmented_text"] = ws.recv(timeout=5)
        ws.send([b"a" * 70000, b"b", b"c" * 10])
        out["fragmented_binary"] = ws.recv(timeout=5)
        out["pong"] = ws.ping(b"ping!").wait(5)
        ws.close(4000, "websockets done")
    return out


@echo_server_test
async def test_websockets_client_echo_fragments_ping_and_close(server: EchoServer) -> None:
    out = await trio.to_thread.run_sync(_websockets_session, server.port)
    assert out == {
        "subprotocol": "podterm.v1",
        "extensions": None,
        "text": "héllo",
        "binary": b"\x00bin",
        "fragmented_text": "fragmented tëxt",
        "fragmented_binary": b"a" * 70000 + b"b" + b"c" * 10,
        "pong": True,
    }
    assert await server.results.receive() == ("client-closed", 4000, "websockets done")


def _websockets_server_close(port: int, code: int, reason: str) -> tuple[int, str]:
    with websockets.sync.client.connect(f"ws://{HOST}:{port}/", open_timeout=5,
                                        close_timeout=5) as ws:
        ws.send(f"close:{code}:{reason}")
        try:
            ws.recv(timeout=5)
        except websockets.exceptions.ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("the server did not close")


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1008, "policy violated"),
                                              (4409, "writer exists")])
def test_websockets_client_sees_server_close(code: int, reason: str) -> None:
    @echo_server_test
    async def run(server: EchoServer) -> None:
        got = await trio.to_thread.run_sync(_websockets_server_close, server.port, code, reason)
        assert got == (code, reason)
        assert await server.results.receive() == ("server-closed", code, reason)
    run()


def _websockets_client_close_1000(port: int) -> None:
    with websockets.sync.client.connect(f"ws://{HOST}:{port}/", open_timeout=5,
                                        close_timeout=5) as ws:
        ws.send("x")
        ws.recv(timeout=5)
    # Leaving the block closes with 1000.


@echo_server_test
async def test_websockets_client_normal_close(server: EchoServer) -> None:
    await trio.to_thread.run_sync(_websockets_client_close_1000, server.port)
    assert await server.results.receive() == ("client-closed", 1000, "")


# ------------------------------------------------ our client → trio-websocket server


class TrioWebsocketEcho:
    def __init__(self) -> None:
        self.offered: list[tuple[str, ...]] = []
        self._send, self.results = trio.open_memory_channel[Record](16)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.offered.append(tuple(request.proposed_subprotocols))
        chosen = "podterm.v1" if "podterm.v1" in request.proposed_subprotocols else None
        ws = await request.accept(subprotocol=chosen)
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str) and message.startswith("close:"):
                    _, code, reason = message.split(":", 2)
                    await ws.aclose(int(code), reason)
                    await self._send.send(("server-closed", int(code), reason))
                    return
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            await self._send.send(("client-closed", exc.reason.code, exc.reason.reason or ""))


def our_client_test(fn: Callable[[TrioWebsocketEcho, int], Awaitable[None]]) -> Callable[[], None]:
    async def run() -> None:
        echo = TrioWebsocketEcho()
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, echo.handle, HOST, 0,
                                         None)
            await fn(echo, server.port)
            nursery.cancel_scope.cancel()
    return _named(trio_test(run), fn)


@our_client_test
async def test_our_client_against_trio_websocket_server(echo: TrioWebsocketEcho,
                                                        port: int) -> None:
    ws, chosen = await connect(f"ws://{HOST}:{port}/path?q=1", subprotocols=["podterm.v1", "b"])
    assert chosen == ws.subprotocol == "podterm.v1"
    await ws.send_text("héllo")
    assert await ws.receive_batch() == [(OP_TEXT, "héllo".encode())]
    await ws.send_binary(b"data", prefix=b"\x01")
    assert await ws.receive_batch() == [(OP_BINARY, b"\x01data")]
    big = bytes(range(256)) * 800
    await ws.send_binary(big)
    got: list[tuple[int, bytes]] = []
    while not got:
        got = await ws.receive_batch()
    assert got == [(OP_BINARY, big)]
    # PING: the PONG reaches the heartbeat before the echo that follows it.
    hb = ws.heartbeat = Heartbeat(15.0, now=trio.current_time())
    payload = hb.poll(hb.deadline)
    assert payload is not None
    await ws.ping(payload)
    await ws.send_text("after ping")
    assert await ws.receive_batch() == [(OP_TEXT, b"after ping")]
    assert hb.missed == 0 and hb.rtt_s is not None
    await ws.aclose(4000, "our client done")
    assert await echo.results.receive() == ("client-closed", 4000, "our client done")
    assert echo.offered == [("podterm.v1", "b")]


@pytest.mark.parametrize(("code", "reason"), [(1008, "policy"), (4409, "writer exists")])
def test_our_client_sees_trio_websocket_server_close(code: int, reason: str) -> None:
    @our_client_test
    async def run(echo: TrioWebsocketEcho, port: int) -> None:
        ws, chosen = await connect(f"ws://{HOST}:{port}/")
        assert chosen is None
        await ws.send_text(f"close:{code}:{reason}")
        with pytest.raises(ConnectionClosed) as info:
            await ws.receive_batch()
        assert (info.value.code, info.value.reason) == (code, reason)
        await ws.aclose()
        assert await echo.results.receive() == ("server-closed", code, reason)
    run()


@trio_test
async def test_our_client_reports_a_refused_upgrade() -> None:
    """A plain HTTP server's 404 becomes a HandshakeError with the status and body."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    plain_port = listeners[0].socket.getsockname()[1]

    async def answer_404() -> None:
        stream = await listeners[0].accept()
        h = h11.Connection(h11.SERVER)
        while not isinstance(h.next_event(), h11.Request):
            h.receive_data(await stream.receive_some(65536))
        await stream.send_all((h.send(h11.Response(status_code=404, headers=[
            ("Content-Length", "9")])) or b"") + (h.send(h11.Data(data=b"not found")) or b""))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_404)
        with pytest.raises(HandshakeError) as info:
            await connect(f"ws://{HOST}:{plain_port}/nope")
    assert info.value.http_status == 404
    assert "not found" in info.value.message
    await listeners[0].aclose()


@trio_test
async def test_our_client_and_server_over_tls() -> None:
    """``connect("wss://...")`` against the echo server behind trio.SSLStream."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = EchoServer()

    async def handle_tls(stream: trio.SocketStream) -> None:
        await server.handle(trio.SSLStream(stream, server_ctx, server_side=True))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle_tls, 0, host=HOST))
        port = listeners[0].socket.getsockname()[1]
        ws, chosen = await connect(f"wss://{HOST}:{port}/tls", subprotocols=["podterm.v1"],
                                   ssl_context=client_ctx)
        assert chosen == "podterm.v1"
        await ws.send_binary(b"secret", prefix=b"\x00")
        assert await ws.receive_batch() == [(OP_BINARY, b"\x00secret")]
        await ws.aclose(4000, "tls done")
        assert await server.results.receive() == ("client-closed", 4000, "tls done")
        nursery.cancel_scope.cancel()


# ------------------------------------------------------ malformed input, raw socket


async def raw_upgrade(port: int, *, version: str = "13") -> tuple[trio.SocketStream, bytes]:
    """Send a handshake by hand; return the stream and the server's answer head."""
    stream = await trio.open_tcp_stream(HOST, port)
    req = build_request(f"{HOST}:{port}", "/", key=bytes(range(16)))
    headers = [(n, version.encode() if n == b"sec-websocket-version" else v)
               for n, v in req.headers]
    h = h11.Connection(h11.CLIENT)
    await stream.send_all(h.send(h11.Request(method="GET", target="/", headers=headers)) or b"")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        head += chunk
    return stream, head


async def close_frame_then_eof(stream: trio.SocketStream) -> tuple[int, str]:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    frames = FrameReader(is_server=False).feed(data)
    assert [op for op, _ in frames] == [OP_CLOSE], frames
    return parse_close_payload(frames[0][1])


@pytest.mark.parametrize(("frame", "code", "reason"), [
    (encode_frame(OP_BINARY, b"unmasked"), 1002, "unmasked client frame"),
    (bytes((0xC2, 0x80)) + MASK, 1002, "reserved bits set"),
    (encode_frame(OP_TEXT, b"caf\xc3", mask_key=MASK), 1007, "invalid UTF-8 in text message"),
    (encode_frame(OP_TEXT, b"\xed\xa0\x80", mask_key=MASK), 1007,
     "invalid UTF-8 in text message"),
    (bytes((0x82, 0xFF)) + struct.pack("!Q", 256 * 1024 + 1) + MASK, 1009, "frame too big"),
    (encode_frame(OP_BINARY, bytes(200 * 1024), fin=False, mask_key=MASK)
     + encode_frame(0, bytes(200 * 1024), fin=False, mask_key=MASK)
     + encode_frame(0, bytes(200 * 1024), mask_key=MASK), 1009, "message too big"),
    (encode_frame(OP_CLOSE, b"\x03\xed", mask_key=MASK), 1002, "invalid close code"),
])
def test_malformed_frame_over_a_real_socket(frame: bytes, code: int, reason: str) -> None:
    @echo_server_test
    async def run(server: EchoServer) -> None:
        stream, head = await raw_upgrade(server.port)
        assert head.startswith(b"HTTP/1.1 101 ")
        try:
            await stream.send_all(frame)
        except trio.BrokenResourceError:
            pass  # the server may close before the rest of a big frame is sent
        assert await close_frame_then_eof(stream) == (code, reason)
        assert await server.results.receive() == ("client-closed", code, reason)
        await stream.aclose()
    run()


@echo_server_test
async def test_bad_version_over_a_real_socket_gets_426(server: EchoServer) -> None:
    stream, head = await raw_upgrade(server.port, version="8")
    rest = b""
    while chunk := await stream.receive_some(65536):
        rest += chunk  # then EOF: the server closed
    assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nsec-websocket-version: 13\r\n" in head.lower()
    await stream.aclose()
