"""A TCP proxy for tests that can cut its connections on demand.

The proxy listens on 127.0.0.1 and forwards every accepted connection to one
target, both directions, byte for byte.  A test then breaks the link the way
a network does: :meth:`CutProxy.cut_all` cuts every live connection now, and
:meth:`CutProxy.cut_after` arms a cut that fires after a given number of
further bytes, forwarding exactly the bytes before it, so the cut lands
wherever the test wants it: mid-handshake, mid-frame, mid-replay.

A cut closes both sides.  The client side closes with a FIN (the client reads
every byte forwarded so far, then EOF) or, with ``rst=True``, with a TCP
reset (``SO_LINGER`` 0, like a NAT that forgot the flow).

Use it three ways::

    # 1. inside a trio test
    async with open_cut_proxy("127.0.0.1", gateway_port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        ...
        proxy.cut_all()
        proxy.cut_after(1000, direction=Direction.DOWN)

    # 2. from synchronous code (Playwright, plain pytest): a trio loop in a thread
    with CutProxyThread("127.0.0.1", gateway_port) as proxy:
        proxy.cut_all()            # thread-safe; returns the number cut

    # 3. as a process: prints one JSON line {"port": N} when listening, then
    #    reads commands from stdin, one per line, and answers one JSON line each:
    #    "cut", "cut rst", "cut_after N [up|down|both] [rst]", "block", "unblock", "stats"
    python -m tests.helpers.cutproxy --target 127.0.0.1:7780

:meth:`CutProxy.block` makes the target unreachable for a while (new
connections are reset at once, live ones cut) until :meth:`CutProxy.unblock`:
an outage long enough to watch a client's "reconnecting" state.

The proxy never stalls a live link (that would be a different test: a
half-open connection); it either forwards or cuts.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import trio

_CHUNK = 65536


class Direction(StrEnum):
    """Which bytes a byte-count cut counts."""

    UP = "up"  # client -> target
    DOWN = "down"  # target -> client
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class CutProxyStatistics:
    """A snapshot of what the proxy has done so far."""

    accepted: int  # connections established to the target since start
    live: int  # connections open now
    cuts: int  # cut events (cut_all calls and fired cut_after triggers) that closed >= 1 connection
    connections_cut: int  # connections closed by cuts
    bytes_up: int  # client -> target, forwarded
    bytes_down: int  # target -> client, forwarded
    armed: bool  # a cut_after is pending
    refused: int  # connections reset at once while blocked
    blocked: bool


class _Link:
    """One proxied connection: the client stream and the target stream."""

    def __init__(self, number: int, client: trio.SocketStream, target: trio.SocketStream) -> None:
        self.number = number
        self.client = client
        self.target = target
        self.cancel_scope = trio.CancelScope()
        self.cut = False
        self.rst = False

    def __repr__(self) -> str:
        return f"<_Link #{self.number} cut={self.cut}>"


class CutProxy:
    """A cuttable TCP forwarder to ``target_host:target_port``.

    Run it with ``await nursery.start(proxy.serve)`` (or :func:`open_cut_proxy`).
    All control methods are synchronous and must be called from the proxy's
    trio thread (use :class:`CutProxyThread` from other threads).
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.port = 0  # the bound port, set once serving
        self._links: set[_Link] = set()
        self._accepted = 0
        self._cuts = 0
        self._connections_cut = 0
        self._bytes = {Direction.UP: 0, Direction.DOWN: 0}
        # A pending byte-count cut: bytes left before it fires, and what it counts.
        self._armed_left: int | None = None
        self._armed_direction = Direction.BOTH
        self._armed_rst = False
        self._blocked = False
        self._refused = 0
        self._changed = trio.Event()  # set (and replaced) whenever anything above changes

    def __repr__(self) -> str:
        return (f"<CutProxy 127.0.0.1:{self.port} -> {self.target_host}:{self.target_port} "
                f"live={len(self._links)} cuts={self._cuts}>")

    # ---- control -----------------------------------------------------------------------------

    def cut_all(self, *, rst: bool = False) -> int:
        """Cut every live connection now; return how many were cut.

        Bytes already handed to the kernel reach the client unless ``rst`` is
        true (a reset discards the socket's unsent data).
        """
        n = 0
        for link in list(self._links):
            if not link.cut:
                link.cut = True
                link.rst = rst
                link.cancel_scope.cancel()
                n += 1
        if n:
            self._cuts += 1
            self._connections_cut += n
        self._notify()
        return n

    def cut_after(self, nbytes: int, *, direction: Direction | str = Direction.DOWN,
                  rst: bool = False) -> None:
        """Arm a cut of every live connection after ``nbytes`` more forwarded bytes.

        Bytes are counted over all connections in ``direction``.  Exactly
        ``nbytes`` are forwarded (the chunk that crosses the mark is split),
        then :meth:`cut_all` runs.  ``nbytes == 0`` cuts before the next byte.
        A second call replaces a pending one.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._armed_left = nbytes
        self._armed_direction = Direction(direction)
        self._armed_rst = rst
        self._notify()

    def block(self, *, cut: bool = True) -> None:
        """Make the target unreachable: new connections are reset at once.

        With ``cut`` (the default) live connections are cut too, so the client
        sees an outage rather than a single drop; :meth:`unblock` ends it.
        """
        self._blocked = True
        if cut:
            self.cut_all(rst=True)
        self._notify()

    def unblock(self) -> None:
        """Forward new connections again."""
        self._blocked = False
        self._notify()

    def disarm(self) -> None:
        """Forget a pending :meth:`cut_after`."""
        self._armed_left = None
        self._notify()

    def statistics(self) -> CutProxyStatistics:
        """Return a snapshot of the counters."""
        return CutProxyStatistics(
            accepted=self._accepted, live=len(self._links), cuts=self._cuts,
            connections_cut=self._connections_cut, bytes_up=self._bytes[Direction.UP],
            bytes_down=self._bytes[Direction.DOWN], armed=self._armed_left is not None,
            refused=self._refused, blocked=self._blocked)

    async def wait_for(self, predicate: Callable[[CutProxyStatistics], bool]) -> CutProxyStatistics:
        """Wait until ``predicate(self.statistics())`` is true; return that snapshot.

        Put a deadline around it (``trio.fail_after``): it waits forever otherwise.
        """
        while True:
            stats = self.statistics()
            if predicate(stats):
                return stats
            await self._changed.wait()

    async def wait_accepted(self, n: int) -> CutProxyStatistics:
        """Wait until at least ``n`` connections have been accepted in total."""
        return await self.wait_for(lambda s: s.accepted >= n)

    # ---- serving -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and forward until cancelled; ``task_status.started(port)`` once bound."""
        listeners = await trio.open_tcp_listeners(self.listen_port, host=self.listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, listeners, nursery)
            task_status.started(self.port)

    async def _accept_loop(self, listeners: list[trio.SocketListener],
                           nursery: trio.Nursery) -> None:
        listener = listeners[0]
        async with listener:
            while True:
                client = await listener.accept()
                nursery.start_soon(self._handle, client)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self._blocked:
            self._refused += 1
            await _close(client, rst=True)
            self._notify()
            return
        try:
            with trio.fail_after(10):
                target = await trio.open_tcp_stream(self.target_host, self.target_port)
        except (OSError, trio.TooSlowError):
            await _close(client, rst=True)
            self._notify()
            return
        for stream in (client, target):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        # Counted once the link is through, so cut_all() right after
        # wait_accepted() always finds it.
        self._accepted += 1
        link = _Link(self._accepted, client, target)
        self._links.add(link)
        self._notify()
        try:
            with link.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link, client, target, Direction.UP)
                    nursery.start_soon(self._pump, link, target, client, Direction.DOWN)
        finally:
            self._links.discard(link)
            # The client side is the one under test: it gets the FIN or the reset.
            # The target (the gateway) always sees a plain close.
            await _close(client, rst=link.rst)
            await _close(target, rst=False)
            self._notify()

    async def _pump(self, link: _Link, src: trio.SocketStream, dst: trio.SocketStream,
                    direction: Direction) -> None:
        try:
            while True:
                data = await src.receive_some(_CHUNK)
                if not data:
                    break  # EOF one way ends the link both ways: the tests need no half-close
                left = self._armed_left
                if left is not None and self._armed_direction in (direction, Direction.BOTH):
                    if len(data) >= left:
                        head = data[:left]
                        if head:
                            await dst.send_all(head)
                            self._bytes[direction] += len(head)
                        self._armed_left = None
                        self.cut_all(rst=self._armed_rst)
                        await trio.lowlevel.checkpoint()  # the cancel lands here
                        return
                    self._armed_left = left - len(data)
                await dst.send_all(data)
                self._bytes[direction] += len(data)
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        # Either side closing ends the whole link.
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
async def open_cut_proxy(target_host: str, target_port: int) -> AsyncIterator[CutProxy]:
    """Run a :class:`CutProxy` for the duration of the ``async with`` block."""
    proxy = CutProxy(target_host, target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


class CutProxyThread:
    """A :class:`CutProxy` on its own trio loop in a background thread.

    For synchronous tests.  ``with CutProxyThread(host, port) as p:`` starts it
    and ``p.port`` is bound on entry; the control methods are thread-safe
    wrappers that run on the proxy's loop and return its answer.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.proxy = CutProxy(target_host, target_port)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cutproxy", daemon=True)
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self.proxy.port

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._stop = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.proxy.serve)
                    self._ready.set()
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the caller of __enter__ / close
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> CutProxyThread:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None or not self.proxy.port:
            raise RuntimeError(f"cut proxy did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the proxy (cuts every live connection) and join its thread."""
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            stop = self._stop
            try:
                trio.from_thread.run_sync(stop.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self._token is not None
        return trio.from_thread.run_sync(lambda: fn(*args, **kwargs), trio_token=self._token)

    def cut_all(self, *, rst: bool = False) -> int:
        return int(self._call(self.proxy.cut_all, rst=rst))

    def cut_after(self, nbytes: int, *, direction: Direction | str = Direction.DOWN,
                  rst: bool = False) -> None:
        self._call(self.proxy.cut_after, nbytes, direction=direction, rst=rst)

    def block(self, *, cut: bool = True) -> None:
        self._call(self.proxy.block, cut=cut)

    def unblock(self) -> None:
        self._call(self.proxy.unblock)

    def statistics(self) -> CutProxyStatistics:
        result: CutProxyStatistics = self._call(self.proxy.statistics)
        return result


# ---- process mode ----------------------------------------------------------------------------


def _stats_json(stats: CutProxyStatistics) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in CutProxyStatistics.__slots__}


async def _command_loop(proxy: CutProxy) -> None:
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
                    answer({"cut": proxy.cut_all(rst="rst" in words[1:])})
                elif words[0] == "cut_after":
                    direction = words[2] if len(words) > 2 else "down"
                    proxy.cut_after(int(words[1]), direction=direction, rst="rst" in words[3:])
                    answer({"armed": True})
                elif words[0] == "block":
                    proxy.block()
                    answer({"blocked": True})
                elif words[0] == "unblock":
                    proxy.unblock()
                    answer({"blocked": False})
                elif words[0] == "stats":
                    answer(_stats_json(proxy.statistics()))
                else:
                    answer({"error": f"unknown command {words[0]!r}"})
            except ValueError as exc:
                answer({"error": str(exc)})


async def _main(target: str) -> None:
    host, _, port = target.rpartition(":")
    proxy = CutProxy(host or "127.0.0.1", int(port))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        sys.stdout.write(json.dumps({"port": proxy.port}) + "\n")
        sys.stdout.flush()
        await _command_loop(proxy)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.cutproxy",
                                     description="cuttable TCP proxy for tests")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    args = parser.parse_args(argv)
    trio.run(_main, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
