"""A capacity load generator: one process holding many podterm.v1 sessions.

Started by ``bench/capacity/run.py``, several at once, each from its own
127.0.0.x source address (ephemeral ports allow ~28,000 connections per
source/destination pair) and each well under this machine's 20,000 fds per
process.  It is driven over stdin/stdout, one JSON object per line::

    → {"cmd": "open", "count": 500}
    ← {"opened": 500, "failed": 0, "seconds": 3.1, "total": 500, "errors": []}
    → {"cmd": "type", "fraction": 0.1, "seconds": 10, "keys_per_s": 10}
    ← {"keys": 9980, "echoed": 9980, "skipped": 3, "rtts": [...seconds...]}
    → {"cmd": "echo_all", "timeout": 30}
    ← {"echoed": 500, "total": 500, "rtts": [...]}
    → {"cmd": "close"}
    ← {"closed": 500}

Each session is created over REST (one keep-alive connection per load
generator), attached (``rw``, podterm.v1) and then has **one reader task**
while it is idle: it answers the gateway's heartbeat PINGs (a session nobody
reads would be declared dead after two missed PONGs), ACKs output
(docs/protocol.md §6) and timestamps echoes.  For ``type``, the typing
sessions' readers are paused and one thread serves all of them with a plain
``epoll`` loop (:class:`TypingLoop`): it sends one keystroke per session every
``1 / keys_per_s`` seconds, alternating ``a`` and DEL so that the shell's line
never grows (the echo of DEL is ``\\b \\b``), and only when the previous
keystroke's echo has arrived (otherwise the tick is counted as skipped: the
system is not keeping up).  Round trip = keystroke sent → first output byte
after it.  (A trio task per typist cost ~130 µs of CPU per keystroke, as much
as the gateway it measures, on the same two cores; the thread ~45, most of it
the kernel's loopback TCP.)

``--upstream`` says what the sessions run on.  ``local`` (PTY shells on the
gateway's host) is what exists today; an agent upstream (``podterm agent
--echo``) plugs in through :func:`session_body` once it exists.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import select
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

C.ensure_src_on_path()

KEYS = (b"a", b"\x7f")  # a key, then DEL (erase): the line never grows


def session_body(upstream: str, shell: str | None, pod: str | None = None) -> dict[str, Any]:
    """The ``POST /api/v1/sessions`` body for one benchmark session.

    ``local``: an interactive login shell (``command: null``) in a PTY; the
    shell is chosen through ``SHELL`` in its environment.  ``agent``: the
    same, naming the agent upstream and the pod (``namespace/pod``) of one of
    the echo agents (which ignores the command and echoes).
    """
    body: dict[str, Any] = {"command": None, "tty": True, "size": {"cols": 80, "rows": 24}}
    if shell and upstream == "local":
        body["env"] = {"SHELL": shell}
    if upstream != "local":
        body["upstream"] = upstream
    if pod:
        body["namespace"], body["pod"] = pod.split("/", 1)
    return body


class Sess:
    """One attached session and its reader's state."""

    __slots__ = ("link", "sent_at", "echo", "ready", "key_index", "closed", "scope",
                 "reader_done", "unsent")

    def __init__(self, link: C.PtLink) -> None:
        self.link = link
        self.sent_at = 0.0  # when the keystroke in flight was sent; 0 = none
        self.echo = trio.Event()  # set by the reader when output follows a keystroke
        self.ready = trio.Event()  # the shell printed something (its prompt)
        self.key_index = 0
        self.closed = False
        self.scope: trio.CancelScope | None = None  # the reader's, while it runs
        self.reader_done = trio.Event()
        self.unsent = b""  # the typing thread's bytes the socket did not take yet


class LoadGen:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.host, port = ns.url.split("//", 1)[1].rsplit(":", 1)
        self.port = int(port)
        self.sessions: list[Sess] = []
        self.nursery: trio.Nursery | None = None
        self.http: C.HttpConn | None = None
        self.rtts: list[float] | None = None  # collecting while not None
        self.reader_errors = 0

    # ---------------------------------------------------------------- readers

    async def reader(self, sess: Sess) -> None:
        """Read one session until it ends, or until :meth:`pause_readers` cancels it."""
        link = sess.link
        perf = time.perf_counter
        sess.reader_done = trio.Event()
        ended = True
        try:
            with trio.CancelScope() as sess.scope:
                ended = False
                while True:
                    got = await link.receive_output()
                    if got:
                        if sess.sent_at:
                            rtt = perf() - sess.sent_at
                            sess.sent_at = 0.0
                            if self.rtts is not None:
                                self.rtts.append(rtt)
                            sess.echo.set()
                        sess.ready.set()
                        frame = link.ack_frame(time.monotonic())
                        if frame:
                            with trio.CancelScope(shield=True):  # never half a frame
                                await link.send(frame)
                    if link.exited:
                        ended = True
                        break
            # Cancelled (paused): the socket goes to the typing thread, alive.
        except Exception:
            ended = True
            if not sess.closed:
                self.reader_errors += 1
        finally:
            sess.scope = None
            if ended:
                sess.closed = True
                sess.ready.set()
                sess.echo.set()
            sess.reader_done.set()

    async def pause_readers(self, sessions: list[Sess]) -> None:
        """Stop these sessions' reader tasks (the sockets stay open)."""
        for sess in sessions:
            if sess.scope is not None:
                sess.scope.cancel()
        for sess in sessions:
            await sess.reader_done.wait()

    async def keystroke(self, sess: Sess) -> None:
        """Send one key (with any ACK due in the same write)."""
        link = sess.link
        key = KEYS[sess.key_index & 1]
        sess.key_index += 1
        sess.echo = trio.Event()
        frame = link.ack_frame(time.monotonic()) + link.stdin_frame(key)
        sess.sent_at = time.perf_counter()
        await link.send(frame)

    # ------------------------------------------------------------- commands

    async def open(self, count: int) -> dict[str, Any]:
        assert self.http is not None and self.nursery is not None
        pods = self.ns.pods.split(",") if self.ns.pods else [None]
        opened = failed = 0
        errors: list[str] = []
        sem = trio.Semaphore(self.ns.concurrency)
        t0 = time.perf_counter()
        # One REST connection cannot carry concurrent requests: creation is
        # serialized on it; attaches (the expensive part) run concurrently.
        http_lock = trio.Lock()

        async def one(i: int) -> None:
            nonlocal opened, failed
            async with sem:
                try:
                    with trio.fail_after(self.ns.timeout):
                        body = session_body(self.ns.upstream, self.ns.shell, pods[i % len(pods)])
                        async with http_lock:
                            info = await self.http.create_session(body)  # type: ignore[union-attr]
                        link = await C.PtLink.attach(self.host, self.port, self.ns.token, info,
                                                     local_address=self.ns.source,
                                                     seed=self.ns.seed * 1_000_003 + i)
                        sess = Sess(link)
                        self.nursery.start_soon(self.reader, sess)  # type: ignore[union-attr]
                        if self.ns.upstream != "local":
                            # An echo stream prints nothing by itself: one key proves the path.
                            await self.keystroke(sess)
                        # The shell's first prompt (or the probe's echo): it is up.
                        await sess.ready.wait()
                        self.sessions.append(sess)
                        opened += 1
                except Exception as exc:
                    failed += 1
                    if len(errors) < 5:
                        errors.append(repr(exc)[:300])

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, len(self.sessions) + i)
        return {"opened": opened, "failed": failed, "seconds": time.perf_counter() - t0,
                "total": len(self.sessions), "errors": errors}

    async def type(self, fraction: float, seconds: float, keys_per_s: float) -> dict[str, Any]:
        """Keep ``fraction`` of the sessions typing for ``seconds``; their round trips.

        The typing sessions are served by one plain ``epoll`` loop in a thread
        of their own (:class:`TypingLoop`), not by a trio task each: at
        10,000 keys/s the trio version cost ~130 µs of CPU per keystroke, as
        much as the gateway, and on a 2-core machine that CPU is the
        gateway's.  The other sessions keep their trio readers (heartbeats).
        """
        live = [s for s in self.sessions if not s.closed]
        rng = random.Random(self.ns.seed)
        typing = rng.sample(live, max(1, round(len(live) * fraction))) if live and fraction else []
        await self.pause_readers(typing)
        loop = TypingLoop([s for s in typing if not s.closed], rng)
        try:
            result = await trio.to_thread.run_sync(loop.run, seconds, 1.0 / keys_per_s)
        finally:
            assert self.nursery is not None
            for sess in typing:
                if not sess.closed:
                    self.nursery.start_soon(self.reader, sess)
        result["reader_errors"] = self.reader_errors
        return result

    async def echo_all(self, timeout: float) -> dict[str, Any]:
        """Every session sends one keystroke; count the echoes that come back in time."""
        self.rtts = []
        live = [s for s in self.sessions if not s.closed]
        sem = trio.Semaphore(self.ns.concurrency * 4)

        async def one(sess: Sess) -> None:
            async with sem:
                await self.keystroke(sess)
                await sess.echo.wait()

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for sess in live:
                    nursery.start_soon(one, sess)
        rtts, self.rtts = self.rtts, None
        return {"echoed": len(rtts), "total": len(self.sessions), "rtts": rtts}

    async def close(self) -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            for sess in self.sessions:
                sess.closed = True
                nursery.start_soon(sess.link.aclose)
        return {"closed": len(self.sessions)}

    # ----------------------------------------------------------------- main

    async def main(self) -> None:
        C.raise_nofile()
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffer = b""
        self.http = await C.HttpConn.open(self.host, self.port, self.ns.token,
                                          local_address=self.ns.source)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            _reply({"ready": True, "pid": os.getpid()})
            while True:
                while b"\n" not in buffer:
                    data = await stdin.receive_some(65536)
                    if not data:
                        nursery.cancel_scope.cancel()
                        return
                    buffer += data
                line, buffer = buffer.split(b"\n", 1)
                msg = json.loads(line)
                cmd = msg["cmd"]
                if cmd == "open":
                    _reply(await self.open(int(msg["count"])))
                elif cmd == "type":
                    _reply(await self.type(float(msg["fraction"]), float(msg["seconds"]),
                                           float(msg.get("keys_per_s", 10))))
                elif cmd == "echo_all":
                    _reply(await self.echo_all(float(msg.get("timeout", 30))))
                elif cmd == "close":
                    _reply(await self.close())
                    nursery.cancel_scope.cancel()
                    await self.http.aclose()
                    return
                else:
                    _reply({"error": f"unknown command {cmd!r}"})


class TypingLoop:
    """Typing sessions served by one ``epoll`` loop, in a thread, without trio.

    Each typist sends one keystroke every ``period`` (phases spread over one
    period), alternating ``a`` and DEL, and only when the previous one's echo
    has come back (else the tick is ``skipped``).  An ACK (§6) rides with
    each keystroke; a PING is answered at once.  Round trip = keystroke
    written → first output byte after it read, both by this thread.  The
    sockets are the sessions' own (non-blocking); their trio readers are
    paused while this runs and take the sockets back afterwards.
    """

    def __init__(self, sessions: list[Sess], rng: random.Random) -> None:
        self.sessions = sessions
        self.rng = rng
        self.rtts: list[float] = []
        self.keys = self.skipped = self.errors = 0

    def run(self, seconds: float, period: float) -> dict[str, Any]:
        perf = time.perf_counter
        ep = select.epoll()
        by_fd: dict[int, Sess] = {}
        try:
            start = perf()
            deadline = start + seconds
            heap: list[tuple[float, int]] = []
            for i, sess in enumerate(self.sessions):
                fd = sess.link.ws.socket_fd()
                by_fd[fd] = sess
                ep.register(fd, select.EPOLLIN)
                heap.append((start + self.rng.random() * period, i))
            heapq.heapify(heap)
            while heap:
                now = perf()
                while heap and heap[0][0] <= now:
                    due, i = heapq.heappop(heap)
                    if due >= deadline:
                        continue
                    sess = self.sessions[i]
                    if sess.closed:
                        continue
                    if sess.sent_at:
                        self.skipped += 1
                    else:
                        self.keys += 1
                        self._keystroke(sess, ep)
                    heapq.heappush(heap, (due + period, i))
                timeout = max(0.0, heap[0][0] - perf()) if heap else 0.0
                self._poll(ep, by_fd, timeout)
            # Echoes still in flight get a bounded moment to land.
            until = perf() + 2.0
            while any(s.sent_at and not s.closed for s in self.sessions) and perf() < until:
                self._poll(ep, by_fd, min(0.05, max(0.0, until - perf())))
        finally:
            ep.close()
        for sess in self.sessions:
            sess.sent_at = 0.0
        return {"typists": len(self.sessions), "keys": self.keys, "echoed": len(self.rtts),
                "skipped": self.skipped, "rtts": self.rtts, "thread_errors": self.errors}

    def _keystroke(self, sess: Sess, ep: select.epoll) -> None:
        link = sess.link
        key = KEYS[sess.key_index & 1]
        sess.key_index += 1
        frame = link.ack_frame(time.monotonic(), force=True) + link.stdin_frame(key)
        sess.sent_at = time.perf_counter()
        self._write(sess, ep, frame)

    def _write(self, sess: Sess, ep: select.epoll, data: bytes) -> None:
        fd = sess.link.ws.socket_fd()
        data = sess.unsent + data
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._lost(sess, ep)
            return
        rest = data[n:]
        if rest and not sess.unsent:
            ep.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        elif sess.unsent and not rest:
            ep.modify(fd, select.EPOLLIN)
        sess.unsent = rest

    def _lost(self, sess: Sess, ep: select.epoll) -> None:
        if not sess.closed:
            self.errors += 1
            sess.closed = True
            try:
                ep.unregister(sess.link.ws.socket_fd())
            except (OSError, ValueError):
                pass

    def _poll(self, ep: select.epoll, by_fd: dict[int, Sess], timeout: float) -> None:
        for fd, mask in ep.poll(timeout):
            sess = by_fd[fd]
            if sess.closed:
                continue
            if mask & select.EPOLLOUT:
                self._write(sess, ep, b"")
            if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    self._lost(sess, ep)
                continue
            self._received(sess, ep, data)

    def _received(self, sess: Sess, ep: select.epoll, data: bytes) -> None:
        link = sess.link
        conn = link.ws.conn
        got = 0
        for event in conn.receive_data(data):
            if type(event) is not tuple:  # the peer closed, or the stream ended
                self._lost(sess, ep)
                return
            payload = event[1]
            if event[0] > 2 or not payload:
                continue  # PING (answered below) or PONG
            kind = payload[0]
            if kind == C.T_STDOUT or kind == C.T_STDERR:
                got += len(payload) - 1
            elif kind == C.T_EXIT:
                link.exited = True
        if got:
            if sess.sent_at:
                self.rtts.append(time.perf_counter() - sess.sent_at)
                sess.sent_at = 0.0
            link.out += got
        out = conn.data_to_send() if conn.has_data_to_send else b""
        if got and link.out - link.acked >= link.ACK_EVERY_BYTES:
            out += link.ack_frame(time.monotonic(), force=True)
        if out:
            self._write(sess, ep, out)
        if link.exited:
            self._lost(sess, ep)


def _reply(obj: dict[str, Any]) -> None:
    data = (json.dumps(obj) + "\n").encode()
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--url", required=True, help="gateway http://host:port")
    p.add_argument("--token", required=True)
    p.add_argument("--source", default=None, help="local address to connect from (127.0.0.x)")
    p.add_argument("--upstream", default="local", help="session upstream (local | agent)")
    p.add_argument("--shell", default=None, help="SHELL for the login shell (local upstream)")
    p.add_argument("--pods", default="", help="agent upstream: namespace/pod,... to spread over")
    p.add_argument("--concurrency", type=int, default=16, help="sessions opened at once")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on one open (s)")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    trio.run(LoadGen(ns).main)
    return 0


if __name__ == "__main__":
    sys.exit(main())
