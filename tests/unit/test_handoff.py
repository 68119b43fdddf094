"""Connection hand-off between workers (``podterm.gateway.handoff``), on real sockets.

A TCP connection is handed over a Unix socket with ``SCM_RIGHTS``: the
receiver serves the client on it after the forwarder closed its copy;
nothing is delivered when no worker listens; malformed hand-offs are
refused and every descriptor they carried is closed.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from podterm.gateway.handoff import (
    MAX_PAYLOAD_BYTES,
    HandoffRefused,
    handoff_path,
    send_connection,
    serve_handoffs,
)

pytestmark = pytest.mark.trio

WAIT_S = 10.0


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def tcp_pair() -> tuple[trio.SocketStream, trio.socket.SocketType, trio.SocketListener]:
    """A client stream and the server's accepted socket (as the forwarder has it)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listener.accept()
    assert isinstance(accepted, trio.SocketStream)
    return client, accepted.socket, listener


async def test_a_handed_off_connection_is_served_by_the_receiver(tmp_path: Path) -> None:
    path = handoff_path(str(tmp_path), 1)
    got: list[tuple[bytes, bytes, tuple[str, str]]] = []
    served = trio.Event()

    async def handler(stream: trio.SocketStream, payload: bytes,
                      client: tuple[str, str]) -> None:
        data = await stream.receive_some(100)
        got.append((payload, data, client))
        await stream.send_all(b"served by the receiver: " + data)
        await stream.aclose()
        served.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_handoffs(
                path, handler, handler_nursery=nursery, task_status=task_status))
            assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
            client, sock, listener = await tcp_pair()
            assert await send_connection(path, sock, b"GET / HTTP/1.1\r\n\r\n",
                                         client=("192.0.2.7", "proxy"))
            sock.close()  # the forwarder's copy: the connection lives on
            await listener.aclose()
            await client.send_all(b"hello")
            answer = b""
            while True:
                chunk = await client.receive_some(100)
                if not chunk:
                    break
                answer += chunk
            await served.wait()
            assert answer == b"served by the receiver: hello"
            assert got == [(b"GET / HTTP/1.1\r\n\r\n", b"hello", ("192.0.2.7", "proxy"))]
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert not os.path.exists(path)  # removed when the listener stops


async def test_nothing_is_delivered_without_a_listener(tmp_path: Path) -> None:
    client, sock, listener = await tcp_pair()
    try:
        with pytest.raises(HandoffRefused):
            await send_connection(str(tmp_path / "handoff-7.sock"), sock, b"head",
                                  client=("127.0.0.1", "socket"))
        with pytest.raises(HandoffRefused):
            await send_connection(str(tmp_path / "x.sock"), sock, b"x" * (MAX_PAYLOAD_BYTES + 1),
                                  client=("127.0.0.1", "socket"))
        with pytest.raises(HandoffRefused):
            await send_connection(str(tmp_path / "x.sock"), sock, b"head",
                                  client=("127.0.0.1" * 20, "socket"))
        # Still ours and still connected.
        await sock.send(b"still here")
        assert await client.receive_some(100) == b"still here"
    finally:
        sock.close()
        await client.aclose()
        await listener.aclose()


async def raw_handoff(path: str, message: bytes, fds: list[int]) -> bytes:
    """Send one hand-off message by hand; what the receiver answered (b"" = refused)."""
    unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await unix.connect(path)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        await unix.sendmsg([message], ancillary)
        return bytes(await unix.recv(1))
    finally:
        unix.close()


@pytest.mark.parametrize("case", ["no_descriptor", "two_descriptors", "bad_magic", "too_long",
                                  "not_a_socket", "short", "no_client", "client_too_long"])
async def test_malformed_handoffs_are_refused_and_their_descriptors_closed(
        tmp_path: Path, case: str) -> None:
    path = handoff_path(str(tmp_path), 0)
    handled: list[bytes] = []
    took_one = trio.Event()

    async def handler(stream: trio.SocketStream, payload: bytes,
                      client: tuple[str, str]) -> None:
        handled.append(payload)
        await stream.aclose()
        took_one.set()

    good = struct.pack("!4sIH", b"PTH1", 4, 16) + b"127.0.0.1 socket" + b"head"
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_handoffs(
                path, handler, handler_nursery=nursery, task_status=task_status))
            client, sock, listener = await tcp_pair()
            other_client, other_sock, other_listener = await tcp_pair()
            pipe_r, pipe_w = os.pipe()
            before = open_fds()
            message, fds = {
                "no_descriptor": (good, []),
                "two_descriptors": (good, [sock.fileno(), other_sock.fileno()]),
                "bad_magic": (b"HTTP" + good[4:], [sock.fileno()]),
                "too_long": (struct.pack("!4sIH", b"PTH1", MAX_PAYLOAD_BYTES + 1, 0),
                             [sock.fileno()]),
                "no_client": (struct.pack("!4sIH", b"PTH1", 4, 0) + b"head", [sock.fileno()]),
                "client_too_long": (struct.pack("!4sIH", b"PTH1", 4, 1000) + b"x" * 1004,
                                    [sock.fileno()]),
                "not_a_socket": (good, [pipe_r]),
                "short": (good[:-2], [sock.fileno()]),
            }[case]
            if case == "short":
                # The forwarder hangs up before the end of its payload.
                unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await unix.connect(path)
                await unix.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                array.array("i", fds).tobytes())])
                unix.shutdown(socket.SHUT_WR)
                answer = bytes(await unix.recv(1))
                unix.close()
            else:
                answer = await raw_handoff(path, message, fds)
            assert answer == b""  # refused: no ACK
            assert handled == []
            # Every descriptor the receiver got was closed again (its copies).
            assert open_fds() <= before
            # The refused connections are untouched on our side.
            await sock.send(b"ok")
            assert await client.receive_some(10) == b"ok"
            # And the receiver still takes a good hand-off afterwards.
            assert await send_connection(path, other_sock, b"head",
                                         client=("127.0.0.1", "socket"))
            await took_one.wait()
            assert handled == [b"head"]
            for s in (sock, other_sock):
                s.close()
            os.close(pipe_r)
            os.close(pipe_w)
            for stream in (client, other_client):
                await stream.aclose()
            for lst in (listener, other_listener):
                await lst.aclose()
            nursery.cancel_scope.cancel()
