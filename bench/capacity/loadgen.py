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
for its whole life: it answers the gateway's heartbeat PINGs (a session
nobody reads would be declared dead after two missed PONGs), ACKs output
(docs/protocol.md §6) and timestamps echoes.  A typing session additionally
has a typer task that sends one keystroke every ``1 / keys_per_s`` seconds,
alternating ``a`` and DEL so that the shell's line never grows (the echo of
DEL is ``\\b \\b``), and only when the previous keystroke's echo has arrived
(otherwise the tick is counted as skipped: the system is not keeping up).
Round trip = keystroke sent → first output byte after it.

``--upstream`` says what the sessions run on.  ``local`` (PTY shells on the
gateway's host) is what exists today; an agent upstream (``podterm agent
--echo``) plugs in through :func:`session_body` once it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

    __slots__ = ("link", "sent_at", "echo", "ready", "key_index", "closed")

    def __init__(self, link: C.PtLink) -> None:
        self.link = link
        self.sent_at = 0.0  # when the keystroke in flight was sent; 0 = none
        self.echo = trio.Event()  # set by the reader when output follows a keystroke
        self.ready = trio.Event()  # the shell printed something (its prompt)
        self.key_index = 0
        self.closed = False


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
        link = sess.link
        perf = time.perf_counter
        try:
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
                        await link.send(frame)
                if link.exited:
                    break
        except Exception:
            if not sess.closed:
                self.reader_errors += 1
        finally:
            sess.closed = True
            sess.ready.set()
            sess.echo.set()

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
        live = [s for s in self.sessions if not s.closed]
        rng = random.Random(self.ns.seed)
        typing = rng.sample(live, max(1, round(len(live) * fraction))) if live and fraction else []
        period = 1.0 / keys_per_s
        self.rtts = []
        keys = skipped = 0
        deadline = trio.current_time() + seconds

        async def typer(sess: Sess) -> None:
            nonlocal keys, skipped
            # Spread the typists over one period, so keystrokes do not all land at once.
            next_t = trio.current_time() + rng.random() * period
            while True:
                await trio.sleep_until(next_t)
                if next_t >= deadline or sess.closed:
                    return
                if sess.sent_at:
                    skipped += 1  # the previous echo has not come back yet
                else:
                    keys += 1
                    await self.keystroke(sess)
                next_t += period

        async with trio.open_nursery() as nursery:
            for sess in typing:
                nursery.start_soon(typer, sess)
        # Echoes still in flight get a bounded moment to land.
        with trio.move_on_after(2.0):
            for sess in typing:
                if sess.sent_at:
                    await sess.echo.wait()
        rtts, self.rtts = self.rtts, None
        return {"typists": len(typing), "keys": keys, "echoed": len(rtts), "skipped": skipped,
                "rtts": rtts, "reader_errors": self.reader_errors}

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
