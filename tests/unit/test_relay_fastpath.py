"""The relay's synchronous fast paths: WebSocketStream.send_nowait/send_batch, LocalStream.send_stdin_nowait."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from podterm.net import wsconn
from podterm.net.wsconn import IOV_BATCH, WebSocketStream
from podterm.protocol._types import Buffer
from podterm.protocol.websocket import Role, WebSocketConnection
from podterm.upstream.base import OutputChannel, StreamSpec
from podterm.upstream.local import LocalUpstream

TIMEOUT = 10


def _run_bounded(main: Callable[[], Awaitable[None]]) -> None:
    """``trio.run(main)`` under the test's deadline."""
    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await main()

    trio.run(bounded)


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
        assert server.has_pending_out and server.can_send_nowait()
        # More may go in, but only behind the unwritten rest (whole frames, in order).
        assert server.send_nowait(second) is False
        third = server.conn.send_binary(b"last", b"\x01")
        async with trio.open_nursery() as nursery:
            results: list[list[bytes]] = []

            async def read() -> None:
                results.append(await _read_payloads(client, 3))

            nursery.start_soon(read)
            assert await server.send_batch(third, stall_s=5) is True
        assert not server.has_pending_out
        assert results[0] == [b"\x01" + big, b"\x01after", b"\x01last"]
        await server.abort()
        await client.abort()

    _run_bounded(main)


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

    _run_bounded(main)


def _frames_as_parts(conn: WebSocketConnection, payloads: list[bytes]) -> list[Buffer]:
    """Each payload as its encoded header, then views of the payload: what the relay sends."""
    parts: list[Buffer] = []
    for payload in payloads:
        frame = conn.send_binary(payload, b"\x01")
        head = len(frame) - len(payload)
        parts.append(frame[:head])
        view = memoryview(payload)
        parts += [view[: len(payload) // 3], view[len(payload) // 3 :]]
    return parts


def test_send_batch_of_buffers_is_gathered_exactly_across_partial_writes() -> None:
    async def main() -> None:
        server, client = _pair(sndbuf=4096)
        # More buffers than one writev takes, and more bytes than the socket
        # takes at once: partial writes land inside headers and views alike.
        payloads = [bytes([i]) * (1 + i * 997 % 9000) for i in range(IOV_BATCH)]
        parts = _frames_as_parts(server.conn, payloads)
        assert len(parts) > IOV_BATCH
        async with trio.open_nursery() as nursery:
            results: list[list[bytes]] = []

            async def read() -> None:
                results.append(await _read_payloads(client, len(payloads)))

            nursery.start_soon(read)
            assert await server.send_batch(parts, stall_s=5) is True
        assert results[0] == [b"\x01" + p for p in payloads]
        await server.abort()
        await client.abort()

    _run_bounded(main)


def test_send_nowait_of_buffers_keeps_the_rest_as_views_first_in_line() -> None:
    async def main() -> None:
        server, client = _pair(sndbuf=4096)
        payloads = [bytes(range(256)) * 100, b"y" * 30000, b"z" * 5]
        parts = _frames_as_parts(server.conn, payloads)
        assert server.send_nowait(parts) is False  # partly written
        assert server.has_pending_out
        async with trio.open_nursery() as nursery:
            results: list[list[bytes]] = []

            async def read() -> None:
                results.append(await _read_payloads(client, 4))

            nursery.start_soon(read)
            last = server.conn.send_binary(b"after", b"\x01")
            assert await server.send_batch([last], stall_s=5) is True
        assert not server.has_pending_out
        assert results[0] == [b"\x01" + p for p in [*payloads, b"after"]]
        await server.abort()
        await client.abort()

    _run_bounded(main)


def test_send_batch_of_buffers_on_a_non_socket_stream_is_joined() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        keys = itertools.cycle([b"\x01\x02\x03\x04"])
        server = WebSocketStream(a, WebSocketConnection(Role.SERVER))
        client = WebSocketStream(b, WebSocketConnection(
            Role.CLIENT, mask_key_source=lambda: next(keys)))
        payloads = [b"a" * 70000, b"b" * 3]
        assert not server.can_send_nowait()  # TLS and test streams: the waiting path only
        async with trio.open_nursery() as nursery:
            results: list[list[bytes]] = []

            async def read() -> None:
                results.append(await _read_payloads(client, 2))

            nursery.start_soon(read)
            parts = _frames_as_parts(server.conn, payloads)
            assert await server.send_batch(parts, stall_s=5) is True
        assert results[0] == [b"\x01" + p for p in payloads]

    _run_bounded(main)


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

    _run_bounded(main)


class _CountingRead:
    """``os.read``, counting the reads that found nothing (EAGAIN)."""

    def __init__(self) -> None:
        self.empty = 0
        self.calls = 0
        self._read = os.read  # (the patch replaces os.read itself)

    def __call__(self, fd: int, n: int) -> bytes:
        self.calls += 1
        try:
            return self._read(fd, n)
        except BlockingIOError:
            self.empty += 1
            raise


def test_after_a_short_read_the_socket_reader_waits_before_reading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _CountingRead()
    monkeypatch.setattr(os, "read", reads)  # wsconn reads with os.read

    async def main() -> None:
        server, client = _pair()
        got: list[bytes] = []

        async def reader() -> None:
            while len(got) < 20:
                got.extend(await _read_payloads(server, 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(20):  # keystroke-sized messages, each to a waiting reader
                await trio.testing.wait_all_tasks_blocked()
                await client.send_binary(b"k%d" % i)
                while len(got) < i + 1:
                    await trio.testing.wait_all_tasks_blocked()
        assert got == [b"k%d" % i for i in range(20)]
        # One speculative read on an empty socket at most (the first), none after.
        assert reads.empty <= 1
        assert reads.calls <= 21
        # A full read keeps reading first: what is left is read without a wait.
        big = b"x" * (wsconn.DEFAULT_READ_SIZE * 3)
        await client.send_binary(big)
        assert b"".join(await _read_payloads(server, 1)) == big
        await client.stream.aclose()
        await server.stream.aclose()

    _run_bounded(main)


def test_after_a_small_tty_read_the_reader_waits_before_reading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _CountingRead()
    monkeypatch.setattr(os, "read", reads)  # LocalStream reads with os.read

    async def main() -> None:
        upstream = LocalUpstream(kill_grace_s=0.2)
        stream = await upstream.open(StreamSpec(command=("sh", "-c", "stty raw -echo; "
                                                         "printf R; exec cat"), tty=True))
        try:
            out = b""
            while out != b"R":
                _channel, data = await stream.receive_some()
                out += data
            before = reads.empty
            for key in b"abcdefghij":
                assert stream.send_stdin_nowait(bytes([key])) == 1
                echo = b""
                while echo != bytes([key]):
                    _channel, data = await stream.receive_some()
                    echo += data
            assert reads.empty - before <= 1  # ten echoes, no read that found nothing
        finally:
            await stream.aclose()

    _run_bounded(main)
