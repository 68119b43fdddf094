"""Sockets that nobody reads while they are quiet: one task watches them all.

A trio task parked in ``wait_readable`` costs about 4.5 KiB: the task, the
coroutine frames from the connection handler down to trio's epoll wait, and
the cancel scope its owner keeps to stop it.  An attached session is idle
most of its life, so the relay lets its receiver task *end* when the socket
has nothing more to read (:meth:`IdleSockets.watch`), and this watcher calls
it back when the next byte (or the peer's FIN) arrives: the relay then starts
a receiver task again.  An idle link costs no task at all.

The watcher keeps an epoll set of its own, which trio watches like any other
descriptor (one task, one descriptor for the process, however many sockets).
Each socket calls back once, then stays silent until it is watched again.
Registrations are edge-triggered and stay in the set while the socket is
watched: an owner that read its socket empty in the callback and watches it
again from there (a keystroke applied, an echo read from a terminal) costs
no system call; the socket's next bytes are a new edge.  Any other watch
re-arms the registration (``EPOLL_CTL_MOD``, which reports bytes already
there), and a socket that is not watched again after its callback leaves
the set (its owner's task reads it now).  The gateway lends the same watcher to its local
upstream for quiet terminals (a PTY master: ``LocalStream.park_reader``), so
an idle shell's session runs no output pump either.  Only plain sockets can be watched: a TLS stream
may hold decrypted bytes the socket no longer shows, so its reader stays.

Lifetime: :meth:`run` in the nursery of the connections it serves.  When it is
cancelled (the gateway stops), every socket still watched is called back at
once, from the nursery that is being cancelled: each owner then starts its
reader task, which meets the cancellation and closes the link as any other
task of that nursery does.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable

import trio

__all__ = ["IdleSockets"]

log = logging.getLogger(__name__)

_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
#: Ready sockets taken per wake-up (more wait for the next round).
_MAX_EVENTS = 1024


class IdleSockets:
    """Call back the owner of each watched socket when it becomes readable (or hangs up)."""

    __slots__ = ("_epoll", "_callbacks", "_closed", "_registered", "_calling")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._closed = False
        # In the epoll set: the watched sockets, and the one being called back.
        self._registered: set[int] = set()
        self._calling = -1  # the descriptor whose callback runs now

    def __len__(self) -> int:
        """Sockets watched now."""
        return len(self._callbacks)

    def __repr__(self) -> str:
        return f"<IdleSockets watching {len(self._callbacks)}>"

    def watch(self, fd: int, callback: Callable[[], None], *, drained: bool = False) -> bool:
        """Call ``callback()`` once when ``fd`` is readable; False (not watched) if it cannot be.

        ``callback`` runs in the watcher's task: it must not block or raise.
        The owner must :meth:`forget` the descriptor before closing it.
        ``drained``: the caller read ``fd`` until the kernel had nothing more
        (a read shorter than asked, or EAGAIN).  Said from ``fd``'s own
        callback, the registration is kept as it is (no system call): bytes
        that come later are a new edge.  Anywhere else it is re-armed.
        """
        if self._closed or fd < 0 or fd in self._callbacks:
            return False
        if not (drained and fd == self._calling and fd in self._registered):
            # Re-armed (its own callback's, not drained) or added; either
            # reports bytes already there as the first edge.  The other call
            # if the kernel's set disagrees (closed since, or kept in it by a
            # duplicate of the descriptor).
            epoll = self._epoll
            first, other = ((epoll.modify, epoll.register) if fd in self._registered
                            else (epoll.register, epoll.modify))
            try:
                try:
                    first(fd, _EVENTS)
                except (FileNotFoundError, FileExistsError):
                    other(fd, _EVENTS)
            except OSError as exc:  # closed meanwhile, or not pollable
                self._registered.discard(fd)
                log.debug("idle.watch %d: %s", fd, exc)
                return False
            self._registered.add(fd)
        self._callbacks[fd] = callback
        return True

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (its owner reads it again, or closes it): no callback."""
        self._callbacks.pop(fd, None)
        self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        if fd in self._registered:
            self._registered.discard(fd)
            if not self._closed:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # closed already: the kernel dropped it from the set

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Watch until cancelled; then call every owner back (see the module docstring)."""
        epoll = self._epoll
        callbacks = self._callbacks
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, _MAX_EVENTS):
                    callback = callbacks.pop(fd, None)  # (once: until watched again)
                    if callback is None:
                        continue  # forgotten meanwhile (by an earlier callback)
                    self._calling = fd
                    try:
                        _call(callback)
                    finally:
                        self._calling = -1
                    if fd not in callbacks:
                        # Not watched again: out of the set, so that bytes
                        # its owner's task reads now call nobody here.
                        self._unregister(fd)
        finally:
            self._closed = True
            waiting = list(callbacks.values())
            callbacks.clear()
            epoll.close()
            for callback in waiting:
                _call(callback)


def _call(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # noqa: BLE001 - one owner's bug must not stop the others' callbacks
        log.exception("idle.callback_failed %r", callback)

