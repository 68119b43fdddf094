"""``IdleSockets``: one task calls back the owner of each quiet socket when it is readable."""

from __future__ import annotations

import select
import socket

import pytest
import trio
import trio.testing

from podterm.net.idle import IdleSockets

pytestmark = pytest.mark.trio


async def test_the_first_byte_calls_back_once_and_only_the_socket_that_got_it() -> None:
    idle = IdleSockets()
    pairs = [socket.socketpair() for _ in range(3)]
    called: list[int] = []
    got = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(idle.run)
            for i, (ours, _) in enumerate(pairs):
                assert idle.watch(ours.fileno(), lambda i=i: (called.append(i), got.set()))
            assert len(idle) == 3
            assert not idle.watch(pairs[0][0].fileno(), lambda: None)  # watched already
            pairs[1][1].send(b"x")
            with trio.fail_after(5):
                await got.wait()
            assert called == [1] and len(idle) == 2
            # One-shot: more bytes call nobody until it is watched again.
            pairs[1][1].send(b"y")
            await trio.testing.wait_all_tasks_blocked()
            assert called == [1]
            got = trio.Event()
            assert idle.watch(pairs[1][0].fileno(), lambda: (called.append(11), got.set()))
            with trio.fail_after(5):
                await got.wait()  # readable already: at once
            assert called == [1, 11]
            # Forgotten: no call, even for an EOF.
            idle.forget(pairs[2][0].fileno())
            pairs[2][1].close()
            await trio.testing.wait_all_tasks_blocked()
            assert called == [1, 11] and len(idle) == 1
            nursery.cancel_scope.cancel()
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


async def test_a_hang_up_calls_back_and_so_does_the_watchers_end() -> None:
    idle = IdleSockets()
    (a, b), (c, d) = socket.socketpair(), socket.socketpair()
    called: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(idle.run)
            assert idle.watch(a.fileno(), lambda: called.append("hung up"))
            assert idle.watch(c.fileno(), lambda: called.append("ended"))
            b.close()  # the peer's FIN
            await trio.testing.wait_all_tasks_blocked()
            assert called == ["hung up"]
            nursery.cancel_scope.cancel()
        # Cancelled: whoever was still watched is called back, so that it can
        # end its connection; nothing can be watched any more.
        assert called == ["hung up", "ended"]
        assert not idle.watch(a.fileno(), lambda: None)
    finally:
        for s in (a, c, d):
            s.close()


async def test_what_cannot_be_watched_is_refused() -> None:
    idle = IdleSockets()
    assert not idle.watch(-1, lambda: None)
    with open("/dev/null", "rb") as regular:  # epoll refuses regular files
        assert not idle.watch(regular.fileno(), lambda: None)
    assert len(idle) == 0


class _CountingEpoll:
    """``select.epoll`` with its registration calls counted (the watcher's own set)."""

    def __init__(self, inner: select.epoll) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def register(self, fd: int, events: int) -> None:
        self.calls.append("register")
        self.inner.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.calls.append("modify")
        self.inner.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self.calls.append("unregister")
        self.inner.unregister(fd)


async def test_a_socket_read_empty_and_watched_again_from_its_callback_misses_nothing() -> None:
    """The typing pattern: each callback reads what came, watches again (no
    system call), and every later byte still calls back: none is lost."""
    idle = IdleSockets()
    counting = _CountingEpoll(idle._epoll)
    idle._epoll = counting  # type: ignore[assignment]
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    got = bytearray()
    arrived = trio.Event()

    def came() -> None:
        nonlocal arrived
        try:
            data = ours.recv(65536)  # a short read: the socket is empty now
        except BlockingIOError:
            return  # (the watcher's end calls everyone back)
        got.extend(data)
        assert idle.watch(ours.fileno(), came, drained=True)
        arrived.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(idle.run)
            assert idle.watch(ours.fileno(), came)
            for i in range(50):
                arrived = trio.Event()
                theirs.send(bytes([i]))
                with trio.fail_after(5):
                    await arrived.wait()
            assert bytes(got) == bytes(range(50))
            assert counting.calls == ["register"]  # once; never re-armed after
            # Bytes that come while the callback runs (after its read) call again.
            arrived = trio.Event()
            theirs.send(b"a")
            with trio.fail_after(5):
                await arrived.wait()
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()


async def test_a_socket_watched_again_with_bytes_left_calls_back_at_once() -> None:
    """Read only in part (not drained), or watched again from elsewhere: re-armed,
    and what is already there calls back without any new byte."""
    idle = IdleSockets()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    got = bytearray()
    done = trio.Event()

    def came() -> None:
        got.extend(ours.recv(1))  # one byte of several: more is waiting
        if len(got) < 5:
            assert idle.watch(ours.fileno(), came, drained=False)
        else:
            done.set()  # not watched again: it leaves the set

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(idle.run)
            assert idle.watch(ours.fileno(), came)
            theirs.send(b"abcdefg")  # one edge for all seven bytes
            with trio.fail_after(5):
                await done.wait()
            assert bytes(got) == b"abcde" and len(idle) == 0
            # Left the set: the two bytes still there call nobody until it is
            # watched again, from outside a callback: then at once.
            await trio.testing.wait_all_tasks_blocked()
            again = trio.Event()
            assert idle.watch(ours.fileno(), again.set, drained=True)
            with trio.fail_after(5):
                await again.wait()
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        theirs.close()
