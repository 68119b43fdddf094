"""The relay's synchronous fast paths: WebSocketStream.send_nowait/send_batch, LocalStream.send_stdin_nowait."""

from __future__ import annotations

import itertools
import socket

import trio

from podterm.errors import LocalProtocolError
from podterm.net.wsconn import WebSocketStream
from podterm.protocol.websocket import Role, WebSocketConnection
from podterm.upstream.base import OutputChannel, StreamSpec
from podterm.upstream.local import LocalUpstream

TIMEOUT = 10


def _pair(sndbuf: int | None = None) -> tuple[WebSocketStream, WebSocketStream]:
    a, b = trio.socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    keys = itertools.cycle([b"\x01\x02\x03\x04"])
    server = WebSocketStream(trio.SocketStream(a), WebSocketConnection(Role.SERVER))
    client = WebSocketStream(trio.SocketStream(b), WebSocketConnection(
        Role.CLIENT, mask_key_source=lambda: next(keys)))
    return server, client


async def _read_payloads(ws: WebSocketStream, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        got += [bytes(payload) for _op, payload in await ws.receive_batch()]
    return got


def test_send_nowait_keeps_the_unwritten_rest_first_in_line() -> None:
    async def main() -> None:
        server, client = _pair(sndbuf=4096)
        big = bytes(range(256)) * 240  # 61,440 bytes: more than the socket takes at once
        first = server.conn.send_binary(big, b"\x01")
        second = server.conn.send_binary(b"after", b"\x01")
        assert server.can_send_nowait()
        assert server.send_nowait(first) is False  # partly written
        assert server.has_pending_out and not server.can_send_nowait()
        try:
            server.send_nowait(second)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("send_nowait accepted data behind a pending rest")
        async with trio.open_nursery() as nursery:
            results: list[list[bytes]] = []

            async def read() -> None:
                results.append(await _read_payloads(client, 2))

            nursery.start_soon(read)
            assert await server.send_batch(second, stall_s=5) is True
        assert not server.has_pending_out
        assert results[0] == [b"\x01" + big, b"\x01after"]  # whole frames, in order
        await server.abort()
        await client.abort()

    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await main()

    trio.run(bounded)


def test_send_batch_reports_a_peer_that_stopped_reading() -> None:
    async def main() -> None:
        server, client = _pair(sndbuf=4096)
        data = server.conn.send_binary(b"x" * 60000, b"\x01")
        sent = 0
        while True:  # fill both socket buffers: the peer never reads
            if not await server.send_batch(data, stall_s=0.2):
                break
            sent += 1
            assert sent < 1000
        assert not server.can_send_nowait()  # broken: no more frames on this stream
        await server.abort()
        await client.abort()

    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await main()

    trio.run(bounded)


def test_send_stdin_nowait_writes_now_and_declines_once_closed() -> None:
    async def main() -> None:
        upstream = LocalUpstream()
        stream = await upstream.open(StreamSpec(command=("cat",), tty=False))
        try:
            assert stream.send_stdin_nowait(b"hello\n") == 6
            out = b""
            while out != b"hello\n":
                channel, data = await stream.receive_some()
                assert channel == OutputChannel.STDOUT
                out += data
            assert stream.statistics().bytes_stdin == 6
            await stream.close_stdin()
            assert stream.send_stdin_nowait(b"late") == 0
            assert stream.statistics().bytes_stdin == 6
        finally:
            await stream.aclose()

    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await main()

    trio.run(bounded)
