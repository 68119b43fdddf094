"""``podterm serve --workers 2``: one port, two worker processes, sessions on both.

The real command as a subprocess (memory:// store, so the supervisor gives
its workers a private SQLite file).  Many short connections spread over the
two workers (SO_REUSEPORT); ``/metrics`` from either worker shows both
workers' series; a client whose session lives in the other worker attaches
through it, byte-exact; a worker killed with SIGKILL is restarted and its
dead sessions are marked closed; SIGTERM drains every worker and the
supervisor exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from tests.helpers.procs import astop

from podterm.store import SessionRecord, open_store, running

if TYPE_CHECKING:
    from conftest import GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 20.0
#: How often a wait that has no event to wait on (a restarted worker, a
#: record the replacement marks closed) looks again; bounded by WAIT_S.
POLL_S = 0.05
SRC = Path(__file__).resolve().parents[2] / "src"
#: --drain-timeout of the gateway under test (seconds).
DRAIN_S = 5
_SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric ``name`` in Prometheus text: (labels, value)."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name:
            labels = dict(re.findall(r'([a-z_]+)="([^"]*)"', match["labels"]))
            out.append((labels, float(match["value"])))
    return out


def per_worker(text: str, name: str, **where: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for labels, value in series(text, name):
        if all(labels.get(k) == v for k, v in where.items()):
            totals[labels["worker"]] += value
    return dict(totals)


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


async def metrics(gateway: GatewayUnderTest) -> str:
    answer = await gateway.rest("GET", "/metrics", token=None)
    assert answer.status == 200, answer.body
    return answer.body.decode()


@asynccontextmanager
async def supervisor(tmp_path: Path, *flags: str
                     ) -> AsyncIterator[tuple[trio.Process, GatewayUnderTest]]:
    """``podterm serve --workers 2`` until its banner; killed (with its workers) at the end."""
    from conftest import GatewayUnderTest

    ready_file = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "PODTERM_DRAIN_TIMEOUT": f"{DRAIN_S}s"}
    with (tmp_path / "stderr.log").open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "podterm", "serve", "--workers", "2", "--listen",
             "127.0.0.1:0", "--ready-file", str(ready_file), "--recordings", "off", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        with trio.fail_after(WAIT_S):
            assert proc.stdout is not None
            banner = b""
            while b"#token=" not in banner:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "podterm serve exited before its banner: " + \
                    (tmp_path / "stderr.log").read_text()[-2000:]
                banner += chunk
        assert b"(2 workers)" in banner
        line = banner.decode().split("web terminal: ", 1)[1].split()[0]
        url, token = line.split("/#token=")
        ready = json.loads(ready_file.read_text())
        assert ready == {"url": url, "pid": proc.pid, "workers": 2, "token": token}
        yield proc, GatewayUnderTest(None, port=int(url.rsplit(":", 1)[1]), admin_token=token)
        # SIGTERM drains every worker; the drain bound, plus the processes exit.
        assert await astop(proc, DRAIN_S + 5) == 0
        assert not children(proc.pid)
    finally:
        await astop(proc, 0)  # a no-op once it exited; after a failure: SIGKILL at once
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)


async def test_two_workers_share_the_port_the_sessions_and_the_metrics(tmp_path: Path) -> None:
    async with supervisor(tmp_path) as (proc, gateway):
        with trio.fail_after(WAIT_S):
            workers = children(proc.pid)
            assert len(workers) == 2

            # Short connections until both workers hold a session (SO_REUSEPORT
            # spreads them by connection); every create is its own connection.
            sessions: list[str] = []
            held: dict[str, float] = {}
            for _ in range(40):
                sessions.append((await gateway.create(["cat"], tty=False))["id"])
                held = per_worker(await metrics(gateway), "podterm_sessions")
                if held.get("0", 0) >= 1 and held.get("1", 0) >= 1:
                    break
            assert held.get("0", 0) >= 1 and held.get("1", 0) >= 1, held
            assert sum(held.values()) == len(sessions)
            up = per_worker(await metrics(gateway), "podterm_worker_up")
            assert up == {"0": 1.0, "1": 1.0}

            # Attach until one attach landed on the worker that does not hold
            # its session (forwarded); every one echoes byte-exact, resuming
            # from what the session printed so far.
            sent: dict[str, bytes] = {sid: b"" for sid in sessions}
            forwarded = 0.0
            for attempt in range(30):
                sid = sessions[attempt % len(sessions)]
                client = await gateway.attach(sid)
                await client.wait_hello()
                data = f"attempt {attempt} to {sid}\n".encode() + bytes(range(256))
                await client.send_stdin(data)
                sent[sid] += data
                await client.wait_for(lambda c, sid=sid: len(c.output) >= len(sent[sid]))
                assert bytes(client.output) == sent[sid]
                await client.send_detach()
                await client.wait_closed()
                text = await metrics(gateway)
                forwarded = sum(per_worker(text, "podterm_peer_forwards_total",
                                           outcome="success").values())
                if forwarded >= 1:
                    break
            assert forwarded >= 1
            # Every forwarded attach was handed over (the client's socket itself
            # went to the holding worker): nothing was spliced through the other.
            assert sum(per_worker(text, "podterm_peer_handoffs_total").values()) == forwarded
            assert sum(per_worker(text, "podterm_peer_spliced_bytes_total").values()) == 0

            # SIGKILL one worker: the supervisor starts another in its place,
            # whose start marks the dead one's sessions closed.
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            while True:
                now = children(proc.pid)
                if victim not in now and len(now) == 2:
                    up = per_worker(await metrics(gateway), "podterm_worker_up")
                    if up == {"0": 1.0, "1": 1.0}:
                        break
                await trio.sleep(POLL_S)
            answers: dict[str, int] = {}
            for sid in sessions:
                while True:
                    status = (await gateway.rest("GET", f"/api/v1/sessions/{sid}")).status
                    if status in (200, 404):  # not 503: no record names the dead worker
                        answers[sid] = status
                        break
                    await trio.sleep(POLL_S)
            assert sorted(set(answers.values())) == [200, 404], answers


async def test_sessions_of_workers_gone_before_the_start_are_closed(tmp_path: Path) -> None:
    """A persistent store: what workers of an earlier run held is closed, a live holder's not."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with socket.socket() as gone, socket.socket() as live:
        gone.bind(("127.0.0.1", 0))
        live.bind(("127.0.0.1", 0))
        live.listen(1)
        holders = {"s-gone00000001": f"127.0.0.1:{gone.getsockname()[1]}",
                   "s-live00000001": f"127.0.0.1:{live.getsockname()[1]}"}
        gone.close()
        async with running(open_store(url)) as store:
            for sid, holder in holders.items():
                await store.put_session(SessionRecord(id=sid, owner="admin", holder=holder,
                                                      state="running"))
        async with supervisor(tmp_path, "--store", url) as (_, gateway):
            with trio.fail_after(WAIT_S):
                assert (await gateway.rest("GET", "/api/v1/sessions/s-gone00000001")).status \
                    == 404
        async with running(open_store(url)) as store:
            states = {sid: (await store.get_session(sid)) for sid in holders}
    assert {sid: r.state for sid, r in states.items() if r} == {"s-gone00000001": "closed",
                                                                "s-live00000001": "running"}
