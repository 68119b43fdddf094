"""A tiny TCP load balancer for tests: round robin, optional PROXY header, cuttable.

It listens on 127.0.0.1 and hands each accepted connection to the next backend
in turn, forwarding bytes both ways unchanged.  With ``send_proxy="v1"`` or
``"v2"`` it first writes a PROXY protocol header carrying the real client's
address (``getpeername()`` of the accepted socket) and the address the client
connected to (``getsockname()``), exactly as HAProxy's ``send-proxy`` and
``send-proxy-v2`` server options do (proxy-protocol.txt §2.1, §2.2)::

    async with open_proxy_lb([("127.0.0.1", p1), ("127.0.0.1", p2)], send_proxy="v2") as lb:
        stream = await trio.open_tcp_stream("127.0.0.1", lb.port, local_address="127.0.0.2")
        ...
        lb.cut_all()              # every live connection closed now (FIN, or RST with rst=True)
        lb.set_backends([...])    # a restarted gateway came back on another port
        lb.statistics()           # accepted, live, per_backend, connect_failures, ...

EOF is passed on as a half-close, so a client may ``send_eof()`` and still
read the answer; a reset or broken socket on either side ends the link.

A backend that refuses the connection is skipped for the next one (each
backend tried at most once per connection, like HAProxy's ``redispatch``);
when all refuse, the client is closed.  Everything is bounded: at most
``max_connections`` live links (more are closed at once and counted as
``refused``), a connect deadline, a fixed read size.

As a process (for tests that drive gateways as subprocesses), it prints one
JSON line ``{"port": N}`` when listening, then answers one JSON line per stdin
command: ``cut``, ``cut rst``, ``stats``, ``backends HOST:PORT,HOST:PORT``::

    python -m tests.helpers.proxylb --backend 127.0.0.1:7781 --backend 127.0.0.1:7782 \\
        --send-proxy v2
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import trio

from podterm.protocol.proxy_header import Command, encode_v1, encode_v2

__all__ = ["ProxyLB", "ProxyLBStatistics", "SendProxy", "open_proxy_lb"]

_CHUNK = 65536
Backend = tuple[str, int]


class SendProxy(StrEnum):
    """Which PROXY header the balancer prepends (HAProxy's ``send-proxy[-v2]``)."""

    NONE = "none"
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True, slots=True)
class ProxyLBStatistics:
    """A snapshot of what the balancer has done so far."""

    accepted: int  # connections taken from the listener
    live: int  # links open now
    per_backend: tuple[int, ...]  # links established to each backend (index = backends order)
    connect_failures: int  # backend connects that failed (then the next backend was tried)
    unrouted: int  # clients closed because no backend accepted
    refused: int  # clients closed at once because max_connections links were live
    cuts: int  # cut_all() calls that closed >= 1 link
    connections_cut: int
    bytes_up: int  # client -> backend, PROXY headers excluded
    bytes_down: int  # backend -> client


class _Link:
    def __init__(self, number: int, backend: int) -> None:
        self.number = number
        self.backend = backend
        self.cancel_scope = trio.CancelScope()
        self.rst = False

    def __repr__(self) -> str:
        return f"<_Link #{self.number} -> backend {self.backend}>"


class ProxyLB:
    """Round-robin TCP balancer over ``backends``.

    Run it with ``await nursery.start(lb.serve)`` (or :func:`open_proxy_lb`).
    Control methods are synchronous and must be called from the balancer's
    trio thread.

    Args:
        backends: ``(host, port)`` pairs, tried in order, round robin.
        send_proxy: PROXY header to prepend to every backend connection.
        tlvs: extra v2 TLVs ``(type, value)`` to send (``send_proxy="v2"``).
        max_connections: live links at most; more are closed on accept.
        connect_timeout_s: bound on each backend connect.
    """

    def __init__(self, backends: Sequence[Backend], *, send_proxy: SendProxy | str = "none",
                 tlvs: Iterable[tuple[int, bytes]] = (), listen_host: str = "127.0.0.1",
                 listen_port: int = 0, max_connections: int = 256,
                 connect_timeout_s: float = 5.0) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.backends: list[Backend] = list(backends)
        self.send_proxy = SendProxy(send_proxy)
        self.tlvs = tuple(tlvs)
        if self.tlvs and self.send_proxy is not SendProxy.V2:
            raise ValueError("TLVs exist only in PROXY v2")
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.port = 0
        self._next = 0
        self._links: set[_Link] = set()
        self._accepted = 0
        self._per_backend = [0] * len(self.backends)
        self._connect_failures = 0
        self._unrouted = 0
        self._refused = 0
        self._cuts = 0
        self._connections_cut = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return (f"<ProxyLB 127.0.0.1:{self.port} -> {len(self.backends)} backends "
                f"send_proxy={self.send_proxy} live={len(self._links)}>")

    # ---- control -----------------------------------------------------------------------------

    def cut_all(self, *, rst: bool = False) -> int:
        """Close every live link now, both sides; return how many.

        The client gets a FIN, or a reset with ``rst`` (``SO_LINGER`` 0, which
        also drops unsent data); the backend always gets a plain close.
        """
        n = 0
        for link in list(self._links):
            if not link.cancel_scope.cancel_called:
                link.rst = rst
                link.cancel_scope.cancel()
                n += 1
        if n:
            self._cuts += 1
            self._connections_cut += n
        self._notify()
        return n

    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Replace the backend list (live links stay where they are)."""
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        self.backends = list(backends)
        self._per_backend = (self._per_backend + [0] * len(self.backends))[:len(self.backends)]
        self._next %= len(self.backends)
        self._notify()

    def statistics(self) -> ProxyLBStatistics:
        """A snapshot of the counters."""
        return ProxyLBStatistics(
            accepted=self._accepted, live=len(self._links), per_backend=tuple(self._per_backend),
            connect_failures=self._connect_failures, unrouted=self._unrouted,
            refused=self._refused, cuts=self._cuts, connections_cut=self._connections_cut,
            bytes_up=self._bytes_up, bytes_down=self._bytes_down)

    async def wait_for(self, predicate: Callable[[ProxyLBStatistics], bool]) -> ProxyLBStatistics:
        """Wait until ``predicate(self.statistics())``; the caller bounds it (``fail_after``)."""
        while True:
            stats = self.statistics()
            if predicate(stats):
                return stats
            await self._changed.wait()

    def header_for(self, client: Backend, frontend: Backend) -> bytes:
        """The PROXY header this balancer sends for a client (b"" without ``send_proxy``)."""
        if self.send_proxy is SendProxy.V1:
            return encode_v1(client, frontend)
        if self.send_proxy is SendProxy.V2:
            return encode_v2(client, frontend, tlvs=self.tlvs)
        return b""

    async def open_health_check(self, index: int) -> trio.SocketStream:
        """Connect to backend ``index`` as the balancer itself, as HAProxy's checks do.

        Sends a v2 LOCAL header (``send_proxy="v2"``, §2.2 "Such connections
        exist when the proxy sends health-checks") or ``PROXY UNKNOWN`` (v1);
        the caller speaks on and closes the returned stream.
        """
        host, port = self.backends[index]
        with trio.fail_after(self.connect_timeout_s):
            stream = await trio.open_tcp_stream(host, port)
        if self.send_proxy is SendProxy.V2:
            await stream.send_all(encode_v2(None, None, command=Command.LOCAL))
        elif self.send_proxy is SendProxy.V1:
            await stream.send_all(encode_v1(None, None))
        return stream

    # ---- serving -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and balance until cancelled; ``task_status.started(port)`` once bound."""
        listeners = await trio.open_tcp_listeners(self.listen_port, host=self.listen_host)
        listener = listeners[0]
        for extra in listeners[1:]:
            await extra.aclose()
        self.port = listener.socket.getsockname()[1]
        async with listener, trio.open_nursery() as nursery:
            task_status.started(self.port)
            while True:
                client = await listener.accept()
                self._accepted += 1
                if len(self._links) >= self.max_connections:
                    self._refused += 1
                    await _close(client, rst=True)
                    self._notify()
                    continue
                nursery.start_soon(self._handle, client)

    async def _connect(self) -> tuple[int, trio.SocketStream] | None:
        """The next backend that accepts, round robin; each tried at most once."""
        for _ in range(len(self.backends)):
            index = self._next
            self._next = (self._next + 1) % len(self.backends)
            host, port = self.backends[index]
            try:
                with trio.fail_after(self.connect_timeout_s):
                    return index, await trio.open_tcp_stream(host, port)
            except (OSError, trio.TooSlowError):
                self._connect_failures += 1
        return None

    async def _handle(self, client: trio.SocketStream) -> None:
        link = _Link(self._accepted, -1)
        self._links.add(link)  # counted from accept, so the bound holds while connecting
        target: trio.SocketStream | None = None
        try:
            with link.cancel_scope:
                routed = await self._connect()
                if routed is None:
                    self._unrouted += 1
                    link.rst = True
                    return
                link.backend, target = routed
                self._per_backend[link.backend] += 1
                self._notify()
                for stream in (client, target):
                    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
                peer = client.socket.getpeername()[:2]
                local = client.socket.getsockname()[:2]
                header = self.header_for((peer[0], peer[1]), (local[0], local[1]))
                if header:
                    # One write, before any client byte (§2: "the sender must always
                    # ensure that the header is sent at once").
                    await target.send_all(header)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link, client, target, True)
                    nursery.start_soon(self._pump, link, target, client, False)
        finally:
            self._links.discard(link)
            await _close(client, rst=link.rst)
            if target is not None:
                await _close(target, rst=False)
            self._notify()

    async def _pump(self, link: _Link, src: trio.SocketStream, dst: trio.SocketStream,
                    up: bool) -> None:
        """Copy one direction; pass EOF on as a half-close, as HAProxy does.

        The link ends when both directions have seen EOF, or at once when
        either side breaks (a reset, a closed socket).
        """
        try:
            while True:
                data = await src.receive_some(_CHUNK)
                if not data:
                    await dst.send_eof()
                    return
                await dst.send_all(data)
                if up:
                    self._bytes_up += len(data)
                else:
                    self._bytes_down += len(data)
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            link.cancel_scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


async def _close(stream: trio.SocketStream, *, rst: bool) -> None:
    if rst:
        try:
            # SO_LINGER with a zero timeout: close() sends RST and drops unsent data.
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    with trio.CancelScope(shield=True):
        await stream.aclose()


@asynccontextmanager
async def open_proxy_lb(backends: Sequence[Backend], **options: Any) -> AsyncIterator[ProxyLB]:
    """Run a :class:`ProxyLB` for the duration of the ``async with`` block."""
    lb = ProxyLB(backends, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(lb.serve)
        try:
            yield lb
        finally:
            nursery.cancel_scope.cancel()


# ---- process mode ----------------------------------------------------------------------------


def _parse_backend(text: str) -> Backend:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _command_loop(lb: ProxyLB) -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buf = b""

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        data = await stdin.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            words = line.decode().split()
            if not words:
                continue
            try:
                if words[0] == "cut":
                    answer({"cut": lb.cut_all(rst="rst" in words[1:])})
                elif words[0] == "stats":
                    stats = lb.statistics()
                    answer({name: getattr(stats, name) for name in ProxyLBStatistics.__slots__})
                elif words[0] == "backends" and len(words) == 2:
                    lb.set_backends([_parse_backend(b) for b in words[1].split(",")])
                    answer({"backends": len(lb.backends)})
                else:
                    answer({"error": f"unknown command {line.decode()!r}"})
            except ValueError as exc:
                answer({"error": str(exc)})


async def _main(args: argparse.Namespace) -> None:
    lb = ProxyLB([_parse_backend(b) for b in args.backend], send_proxy=args.send_proxy,
                 listen_port=args.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lb.serve)
        sys.stdout.write(json.dumps({"port": port}) + "\n")
        sys.stdout.flush()
        await _command_loop(lb)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.proxylb",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", action="append", required=True, metavar="HOST:PORT")
    parser.add_argument("--send-proxy", choices=[m.value for m in SendProxy], default="none")
    parser.add_argument("--port", type=int, default=0)
    trio.run(_main, parser.parse_args(argv))


if __name__ == "__main__":
    main()
