"""Capacity smoke (issue 3, "Done when"): 1,000 concurrent sessions on the local upstream.

Every session runs ``cat`` in a real PTY and is attached over its own
WebSocket at the same time as all the others; each echoes one line, then
ends with Ctrl-D (EXIT 0, close 1000).  Afterwards no session, task or file
descriptor is left behind.  At the peak the process holds about 4,000
descriptors (client socket, gateway socket, PTY master, pidfd per session),
well inside the 20,000 cap.  The full-size numbers belong to bench/capacity.
"""

from __future__ import annotations

import os
import resource
import time
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from podterm.config import LimitsConfig

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = [pytest.mark.trio, pytest.mark.slow]

SESSIONS = 1000
#: Concurrent creations: each forks a process; more at once only queues in the kernel.
CREATE_CONCURRENCY = 64
DEADLINE_S = 50.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Barrier:
    """All ``n`` parties arrive before any continues (a one-shot trio barrier)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.event = trio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == self.n:
            self.event.set()
        await self.event.wait()


async def _one_session(gateway: GatewayUnderTest, index: int, limiter: trio.CapacityLimiter,
                       created_all: _Barrier, attached: _Barrier, echoed: _Barrier,
                       results: list[int]) -> None:
    async with limiter:
        created = await gateway.create(["cat"], size={"cols": 80, "rows": 24})
    # Spawning costs O(open descriptors) (exec closes every inherited one), so
    # start every process before the sockets multiply.
    await created_all.wait()
    client = await gateway.attach(created["id"])
    await client.wait_hello()
    await attached.wait()  # every session is attached at the same time
    line = f"line {index}\n".encode()
    await client.send_stdin(line)
    await client.wait_output(line.replace(b"\n", b"\r\n") * 2)  # tty echo + cat's copy
    await echoed.wait()
    await client.send_stdin(b"\x04")  # Ctrl-D at the start of a line: cat sees EOF
    assert await client.wait_closed() == 1000
    assert client.exit is not None and client.exit.code == 0
    results.append(index)


async def test_thousand_concurrent_sessions(make_gateway: GatewayFactory) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 8 * SESSIONS:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {8 * SESSIONS}")
    try:
        gateway = await make_gateway(limits=LimitsConfig(
            max_sessions=SESSIONS + 10, max_sessions_per_user=0, max_connections_per_ip=0))
        await gateway.gw.audit.wait_flushed()  # the audit log is open (for good) by now
        baseline = _open_fds()
        limiter = trio.CapacityLimiter(CREATE_CONCURRENCY)
        created_all, attached, echoed = (_Barrier(SESSIONS), _Barrier(SESSIONS),
                                         _Barrier(SESSIONS))
        results: list[int] = []
        started = time.monotonic()
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                for i in range(SESSIONS):
                    nursery.start_soon(_one_session, gateway, i, limiter, created_all, attached,
                                       echoed, results)
                await attached.event.wait()
                peak = gateway.registry.statistics()
                peak_fds = _open_fds()
            elapsed = time.monotonic() - started
            assert sorted(results) == list(range(SESSIONS))
            assert peak.sessions["running"] == SESSIONS and peak.writers == SESSIONS
            # Every session received its EXIT and ended; the registry is empty.
            for session in gateway.registry.sessions():
                await session.wait_closed()
            assert len(gateway.registry) == 0
            # Every recording is finished (its file closed) once the writer caught up.
            await gateway.gw.recordings.wait_flushed()
            await gateway.gw.audit.wait_flushed()
            await trio.testing.wait_all_tasks_blocked()
        counters = gateway.gw.counters.snapshot()
        assert counters.sessions_created == SESSIONS
        assert counters.sessions_ended == {"exited": SESSIONS}
        assert counters.heartbeat_failures == 0
        assert _open_fds() == baseline, "file descriptors leaked"
        print(f"\n{SESSIONS} sessions attached at once in {elapsed:.1f}s; "
              f"peak fds {peak_fds} (baseline {baseline})")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
