"""Connection hand-off between the workers of one machine (``SCM_RIGHTS``).

``podterm serve --workers N`` spreads new connections over its workers with
``SO_REUSEPORT``; the kernel does not know which worker holds the session a
WebSocket upgrade names.  A worker that accepted an upgrade for a session
(or an agent pod) held by a sibling worker could splice the two sockets
(:mod:`podterm.gateway.peers`), but then the session costs three descriptors
(the client's and both ends of the peer link) and a copy of every byte in a
process that has nothing to do with it.  Instead it **hands the client's
socket over**: the descriptor itself goes to the holder over a Unix socket,
with the request head to serve, and the forwarder closes its copy.  The
holder then owns the connection as if it had accepted it: one descriptor,
no copy, no extra hop on the data path.

Wire format, one hand-off per Unix connection (the holder listens on
``handoff-<index>.sock`` in the supervisor's private ``0700`` directory, so
only processes of the same user reach it)::

    forwarder → holder:  b"PTH1" + u32 payload length + u16 client length
                         (big-endian) + client + payload, the client socket
                         as the one SCM_RIGHTS descriptor of the first message
    holder → forwarder:  b"\\x01" once it owns the descriptor

``client`` is the client's address as the forwarder resolved it (PROXY header
included), ``IP VIA`` in ASCII: the holder counts the connection against that
address's ``--max-connections-per-ip`` share from then on (the forwarder
releases its count when it lets go).  ``payload`` is what the holder serves
before reading the socket: the request
head the forwarder signed for it (``X-Podterm-Peer-*``, the same credentials
a TCP peer forward carries, :meth:`Peers.forward`), then any bytes the client
sent after its head.  A message without exactly one stream-socket
descriptor, longer than :data:`MAX_PAYLOAD_BYTES`, or not complete within
:data:`HANDOFF_TIMEOUT_S` is refused; every descriptor received is closed
unless it is taken.

Failure semantics (the forwarder's view): if the Unix connection or the
``sendmsg`` fails, the holder never got the descriptor and the forwarder
serves the request another way (the TCP splice).  Once the descriptor was
sent, the forwarder never touches the connection again, ACK or not: the
holder serves it or closes it, so no connection is ever served twice.

Only plain TCP connections are handed off: a TLS session's state lives in the
forwarder's process (TLS connections are spliced).
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Final

import trio

__all__ = [
    "HANDOFF_TIMEOUT_S",
    "MAX_PAYLOAD_BYTES",
    "HandoffRefused",
    "handoff_path",
    "send_connection",
    "serve_handoffs",
]

log = logging.getLogger(__name__)

MAGIC: Final = b"PTH1"
_HEADER: Final = struct.Struct("!4sIH")
#: An IPv6 address, a space and the longest ``via`` name fit in far less.
MAX_CLIENT_BYTES: Final = 128
#: The signed request head (the gateway's head limit is 16 KiB) plus the
#: client's bytes after it, which a WebSocket client does not send before
#: the 101 (RFC 6455 §4.1): 64 KiB is ample and still a bound.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
#: A hand-off is a local Unix round trip; a sibling that takes longer is stuck.
HANDOFF_TIMEOUT_S: Final = 5.0
_ACK: Final = b"\x01"


class HandoffRefused(Exception):
    """The descriptor was not delivered: the caller still owns the connection."""


def handoff_path(directory: str, index: int) -> str:
    """Where worker ``index`` listens for hand-offs (in the supervisor's private directory)."""
    return os.path.join(directory, f"handoff-{index}.sock")


async def send_connection(path: str, sock: trio.socket.SocketType, payload: bytes, *,
                          client: tuple[str, str]) -> bool:
    """Hand ``sock`` (a connected TCP socket) to the worker listening at ``path``.

    ``client`` is ``(ip, via)``: whose connection it is (see the module docstring).

    The caller bounds the wait (this takes :data:`HANDOFF_TIMEOUT_S` at most
    for the ACK on its own).

    Returns:
        True when the holder acknowledged; False when the descriptor was sent
        but no ACK came (the holder serves or closes it).  Either way the
        caller must close its own copy and never use the connection again.

    Raises:
        HandoffRefused: nothing was delivered (no listener, a refused or
            failed send, a payload over :data:`MAX_PAYLOAD_BYTES`); the
            caller still owns the connection.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise HandoffRefused(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
    who = " ".join(client).encode("ascii", "replace")
    if len(who) > MAX_CLIENT_BYTES or len(client) != 2 or " " in client[0]:
        raise HandoffRefused(f"client {client!r} cannot be sent")
    unix = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        message = _HEADER.pack(MAGIC, len(payload), len(who)) + who + payload
        try:
            with trio.fail_after(HANDOFF_TIMEOUT_S):
                await unix.connect(path)
                fds = array.array("i", [sock.fileno()])
                sent = await unix.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       fds.tobytes())])
        except (OSError, trio.TooSlowError) as exc:
            raise HandoffRefused(f"{path}: {exc}") from None
        # From here the holder has the descriptor: never fall back.
        try:
            with trio.move_on_after(HANDOFF_TIMEOUT_S):
                rest = memoryview(message)[sent:]
                while rest:
                    rest = rest[await unix.send(rest):]
                return await unix.recv(1) == _ACK
        except OSError as exc:
            log.warning("worker.handoff.no_ack %s: %s", path, exc)
        return False
    finally:
        unix.close()


Handler = Callable[[trio.SocketStream, bytes, tuple[str, str]], Awaitable[None]]


async def serve_handoffs(path: str, handler: Handler, *, handler_nursery: trio.Nursery,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    """Listen at ``path`` and start ``handler(stream, payload, (ip, via))`` for every
    connection handed over.

    The socket file is created ``0600`` (the directory is the supervisor's
    private one) and removed when this returns.  Each hand-off is read under
    :data:`HANDOFF_TIMEOUT_S`; the handler runs in ``handler_nursery`` (the
    gateway's connections nursery), so a handed-off connection drains like
    any other.
    """
    try:
        os.unlink(path)  # a previous run's (this worker index restarted)
    except FileNotFoundError:
        pass
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            await listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(128)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_receive_one, conn, handler, handler_nursery)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


async def _receive_one(conn: trio.socket.SocketType, handler: Handler,
                       handler_nursery: trio.Nursery) -> None:
    fd = -1
    try:
        with trio.move_on_after(HANDOFF_TIMEOUT_S):
            fd, who, payload = await _read_message(conn)
            stream = _stream_for(fd)
            fd = -1  # the stream owns it now
            try:
                await conn.send(_ACK)
            except OSError:
                pass  # the forwarder gave up waiting: the connection is ours anyway
            handler_nursery.start_soon(handler, stream, payload, who)
    except _BadHandoff as exc:
        log.warning("worker.handoff.refused: %s", exc)
    finally:
        if fd >= 0:
            os.close(fd)
        conn.close()


class _BadHandoff(Exception):
    pass


async def _read_message(conn: trio.socket.SocketType) -> tuple[int, tuple[str, str], bytes]:
    """The descriptor, the client and the payload of one hand-off message."""
    want = _HEADER.size + MAX_CLIENT_BYTES + MAX_PAYLOAD_BYTES
    fd_space = socket.CMSG_SPACE(4 * 4)  # room to see (and close) a few extra descriptors
    data, ancdata, flags, _ = await conn.recvmsg(want, fd_space)
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(cdata[:len(cdata) - len(cdata) % received.itemsize])
            fds.extend(received)
    try:
        if flags & socket.MSG_CTRUNC:
            raise _BadHandoff("control data truncated (too many descriptors)")
        if len(fds) != 1:
            raise _BadHandoff(f"{len(fds)} descriptors in a hand-off (one expected)")
        buf = bytearray(data)
        while len(buf) < _HEADER.size:
            more = await conn.recv(want - len(buf))
            if not more:
                raise _BadHandoff("the forwarder closed before the header")
            buf += more
        magic, length, who_length = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise _BadHandoff(f"bad magic {bytes(magic)!r}")
        if length > MAX_PAYLOAD_BYTES:
            raise _BadHandoff(f"payload of {length} bytes is over {MAX_PAYLOAD_BYTES}")
        if who_length > MAX_CLIENT_BYTES:
            raise _BadHandoff(f"client of {who_length} bytes is over {MAX_CLIENT_BYTES}")
        start = _HEADER.size + who_length
        end = start + length
        while len(buf) < end:
            more = await conn.recv(end - len(buf))
            if not more:
                raise _BadHandoff("the forwarder closed before the end of the payload")
            buf += more
        if len(buf) > end:
            raise _BadHandoff("bytes after the payload")
        ip, _, via = bytes(buf[_HEADER.size:start]).decode("ascii", "replace").partition(" ")
        if not ip or not via:
            raise _BadHandoff("no client address")
        mode = os.fstat(fds[0]).st_mode
        if not stat.S_ISSOCK(mode):
            raise _BadHandoff("the descriptor is not a socket")
    except BaseException:
        for extra in fds:
            os.close(extra)
        raise
    return fds[0], (ip, via), bytes(buf[start:end])


def _stream_for(fd: int) -> trio.SocketStream:
    """A trio stream owning ``fd`` (closed here if it is not a TCP stream socket)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise _BadHandoff(f"unusable descriptor: {exc}") from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.close()
        raise _BadHandoff("the descriptor is not a TCP stream socket")
    try:
        sock.getpeername()
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOTCONN:
            raise _BadHandoff("the client is gone already") from None
        raise _BadHandoff(f"unusable socket: {exc}") from None
    sock.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
