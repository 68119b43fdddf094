"""Exactly-once across real disconnects: gateway subprocess, cutting proxy, ResumableSession.

A real gateway (``python -m podterm serve``) runs as a subprocess with its
local PTY/pipe upstream.  The client reaches it only through
:class:`tests.helpers.cutproxy.CutProxy`, which cuts the client's TCP
connection at least 20 times: mostly after a random number of bytes (so the
cut lands mid-handshake, mid-frame, mid-replay), sometimes after a random
delay, sometimes with a TCP reset.  Each time the client resumes.

* Output: ``seq 1 300000`` (about 2 MB); what the client delivers must be
  byte for byte what the same command prints locally.
* Input: about 300 KB of numbered lines typed into ``head -c N > FILE``; the
  file must hold exactly those bytes: none lost (``head`` would never exit)
  and none twice (the file would differ).

The seed is printed; rerun with ``PODTERM_E2E_SEED=N`` to reproduce a run.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from podterm.client.http import ApiClient
from podterm.client.resume import LinkStatus, OutputChunk, ResumableSession
from podterm.resilience.backoff import Backoff
from tests.helpers.cutproxy import CutProxy, Direction, open_cut_proxy
from tests.helpers.procs import astop, await_ready

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
MIN_CUTS = 20
CUTS = 25


@dataclass(frozen=True, slots=True)
class GatewayProcess:
    """A ``podterm serve`` subprocess: its URL, admin token and log file."""

    url: str
    token: str
    host: str
    port: int
    log: Path
    pid: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def gateway_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                      env.get("PYTHONPATH")]))
    env["SHELL"] = "/bin/sh"  # a plain POSIX shell: no rc files, a predictable prompt
    env.pop("ENV", None)
    return env


@asynccontextmanager
async def running_gateway(tmp_path: Path, *extra_args: str) -> AsyncIterator[GatewayProcess]:
    """Start ``python -m podterm serve`` on 127.0.0.1:0; SIGTERM it (bounded) at the end."""
    ready = tmp_path / "ready.json"
    log = tmp_path / "gateway.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podterm", "serve", "--listen", "127.0.0.1:0",
             "--ready-file", str(ready), "--log-format", "text", *extra_args],
            cwd=ROOT, env=gateway_env(), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        info = await await_ready(proc, ready, log, READY_TIMEOUT_S)
        url = info["url"].rstrip("/")
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        yield GatewayProcess(url, info["token"], host, int(port), log, proc.pid)
    finally:
        await astop(proc, 15)


def seeded_rng() -> tuple[random.Random, int]:
    seed = int(os.environ.get("PODTERM_E2E_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"PODTERM_E2E_SEED={seed}")
    return random.Random(seed), seed


async def cut_repeatedly(proxy: CutProxy, rng: random.Random, cuts: int, done: list[str], *,
                         max_bytes: int, directions: tuple[Direction, ...],
                         on_cut: Callable[[], None] = lambda: None) -> None:
    """Cut the client's link ``cuts`` times, each on a fresh link; log each cut in ``done``.

    Each round waits for a new connection, then either arms a byte-count cut
    (most rounds: exact mid-stream positions) or cuts after a random delay of
    at most a millisecond (a loopback link moves a lot in more); a quarter of
    the cuts are TCP resets.
    """
    seen = proxy.statistics().accepted
    while len(done) < cuts:
        stats = await proxy.wait_accepted(seen + 1)
        seen = stats.accepted
        before = proxy.statistics().connections_cut
        kind = rng.random()
        rst = rng.random() < 0.25
        if kind < 0.85:
            nbytes = rng.randint(1, max_bytes)
            direction = rng.choice(directions)
            proxy.cut_after(nbytes, direction=direction, rst=rst)
            # Fires when the bytes have flowed, or the link ended by itself; a link
            # that goes quiet first is cut by time instead (bounded wait).
            label = f"after {nbytes} B {direction.value}{' rst' if rst else ''}"
            with trio.move_on_after(2):
                await proxy.wait_for(lambda s: not s.armed or s.live == 0)
            if proxy.statistics().armed:
                proxy.disarm()
                proxy.cut_all(rst=rst)
                label = f"quiet link, cut after 2 s{' rst' if rst else ''}"
        else:
            delay = rng.uniform(0, 0.001)
            await trio.sleep(delay)
            proxy.cut_all(rst=rst)
            label = f"after {delay * 1000:.1f} ms{' rst' if rst else ''}"
        if proxy.statistics().connections_cut > before:
            done.append(label)
            on_cut()


def make_session(api_via_proxy: ApiClient, session_id: str, token: str | None,
                 rng: random.Random, on_output: object,
                 statuses: list[LinkStatus]) -> ResumableSession:
    async def on_status(status: LinkStatus) -> None:
        statuses.append(status)

    return ResumableSession(
        lambda offset, mode, tok: api_via_proxy.attach_url(session_id, offset=offset, mode=mode,
                                                           resume_token=tok),
        headers=api_via_proxy.auth_headers(), resume_token=token,
        on_output=on_output,  # type: ignore[arg-type]
        on_status=on_status,
        # Faster than the CLI's 0.5 s / 30 s so 25 cuts take seconds, same policy.
        backoff=Backoff(0.05, 0.5, rng=rng.random),
        connect_timeout_s=10)


@pytest.mark.trio
async def test_output_is_delivered_exactly_once_across_20_cuts(tmp_path: Path) -> None:
    rng, _ = seeded_rng()
    command = ["seq", "1", "300000"]
    expected = subprocess.run(command, check=True, capture_output=True, timeout=30).stdout
    async with running_gateway(tmp_path) as gw, open_cut_proxy(gw.host, gw.port) as proxy:
        api = ApiClient(gw.url, gw.token)
        created = await api.create_session({"command": command, "tty": False})
        via_proxy = ApiClient(f"http://127.0.0.1:{proxy.port}", gw.token)
        received = bytearray()

        async def on_output(chunk: OutputChunk) -> None:
            assert chunk.offset == len(received), "output out of order"
            assert not chunk.stderr
            received.extend(chunk.data)

        statuses: list[LinkStatus] = []
        session = make_session(via_proxy, created["id"], created["resume_token"], rng,
                               on_output, statuses)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                cuts: list[str] = []

                async def cutter() -> None:
                    await cut_repeatedly(proxy, rng, CUTS, cuts, max_bytes=40_000,
                                         directions=(Direction.DOWN, Direction.DOWN,
                                                     Direction.BOTH))

                nursery.start_soon(cutter)
                end = await session.run()
                nursery.cancel_scope.cancel()
        print(f"cuts ({len(cuts)}): {cuts}")
        print(f"client: {session.statistics()}")
    assert len(cuts) >= MIN_CUTS, f"only {len(cuts)} cuts landed before the session ended"
    assert session.statistics().gaps == 0
    assert len(received) == len(expected)
    assert bytes(received) == expected, "output differs from the command's own output"
    assert end.exit_status == 0 and end.reason == "exited"
    assert sum(1 for s in statuses if s.state == "reconnected") >= MIN_CUTS // 2


@pytest.mark.trio
async def test_input_is_delivered_exactly_once_across_20_cuts(tmp_path: Path) -> None:
    rng, _ = seeded_rng()
    typed = b"".join(b"line %06d of the input stream\n" % i for i in range(1, 10_001))  # 300 KB
    target = tmp_path / "typed.txt"
    command = ["sh", "-c", f"head -c {len(typed)} > '{target}'; echo done"]
    async with running_gateway(tmp_path) as gw, open_cut_proxy(gw.host, gw.port) as proxy:
        api = ApiClient(gw.url, gw.token)
        created = await api.create_session({"command": command, "tty": False})
        via_proxy = ApiClient(f"http://127.0.0.1:{proxy.port}", gw.token)
        received = bytearray()

        async def on_output(chunk: OutputChunk) -> None:
            received.extend(chunk.data)

        statuses: list[LinkStatus] = []
        session = make_session(via_proxy, created["id"], created["resume_token"], rng,
                               on_output, statuses)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                cuts: list[str] = []
                progress = trio.Event()  # set at every cut, replaced by the typist

                def on_cut() -> None:
                    progress.set()

                async def cutter() -> None:
                    await cut_repeatedly(proxy, rng, CUTS, cuts, max_bytes=6_000,
                                         directions=(Direction.UP, Direction.UP, Direction.BOTH),
                                         on_cut=on_cut)

                async def typist() -> None:
                    # Type in random pieces, never more than a share per cut so far:
                    # input is still flowing when every cut lands.
                    nonlocal progress
                    share = len(typed) // (CUTS + 5)
                    sent = 0
                    while sent < len(typed):
                        if len(cuts) < CUTS and sent >= (len(cuts) + 1) * share:
                            await progress.wait()
                            progress = trio.Event()
                            continue
                        piece = typed[sent:sent + rng.randint(1, 3000)]
                        await session.send_stdin(piece)
                        sent += len(piece)

                nursery.start_soon(cutter)
                nursery.start_soon(typist)
                end = await session.run()
                nursery.cancel_scope.cancel()
        print(f"cuts ({len(cuts)}): {cuts}")
        print(f"client: {session.statistics()}")
    assert len(cuts) >= MIN_CUTS, f"only {len(cuts)} cuts landed before the session ended"
    assert end.exit_status == 0, f"remote exit {end}; output {bytes(received)!r}"
    data = target.read_bytes()
    assert len(data) == len(typed)
    assert data == typed, "the shell received the input other than exactly once"
    assert bytes(received) == b"done\n"
    assert session.statistics().resent_input_bytes > 0, "no cut forced a re-send"
