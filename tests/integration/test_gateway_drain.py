"""Drain: readyz 503, new sessions refused, attached clients told to move, bounded, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from tests.helpers.procs import astop

from podterm.config import SessionsConfig
from podterm.protocol.events import Drain
from podterm.session.session import SessionLimits

if TYPE_CHECKING:
    from conftest import GatewayFactory

pytestmark = pytest.mark.trio

WAIT_S = 10.0
SRC = Path(__file__).resolve().parents[2] / "src"


async def test_drain_tells_clients_to_move(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway()
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        viewer = await gateway.attach(created["id"], mode="ro")
        await viewer.wait_hello()
        gateway.gw.shutdown("test drain")
        ready = await gateway.rest("GET", "/readyz", token=None)
        assert ready.status == 503
        assert ready.json["error"]["code"] == "unavailable"
        assert (await gateway.rest("GET", "/healthz", token=None)).status == 200
        refused = await gateway.rest("POST", "/api/v1/sessions", {"command": ["cat"]})
        assert refused.status == 503 and refused.json["error"]["code"] == "unavailable"
        for link in (client, viewer):
            assert await link.wait_closed() == 1001
            assert [e for e in link.events if isinstance(e, Drain)] == [Drain("test drain")]
        await gateway.finished.wait()  # serve() returned once the links left
        assert len(gateway.registry) == 0
        metrics = gateway.gw.counters.snapshot()
        assert metrics.sessions_ended == {"shutdown": 1}


async def test_drain_is_bounded_by_the_drain_timeout(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(sessions=SessionsConfig(drain_timeout_s=0.3),
                                 session_limits=SessionLimits(close_timeout_s=0.3))
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        # The client never reads again: it cannot answer the drain.
        gateway.gw.shutdown()
        with trio.fail_after(3.0):
            await gateway.finished.wait()
        assert len(gateway.registry) == 0
        await client.cut()


async def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    """The real command: ``podterm serve`` on port 0, then SIGTERM."""
    from conftest import GatewayUnderTest  # the REST and attach helpers

    ready_file = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "PODTERM_DRAIN_TIMEOUT": "5s"}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "podterm", "serve", "--listen", "127.0.0.1:0",
         "--ready-file", str(ready_file)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        with trio.fail_after(WAIT_S * 2):
            assert proc.stdout is not None
            banner = b""
            while b"#token=" not in banner:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "podterm serve exited before printing its banner"
                banner += chunk
            line = banner.decode().split("web terminal: ", 1)[1].split()[0]
            url, token = line.split("/#token=")
            port = int(url.rsplit(":", 1)[1])
            ready = ready_file.read_text()
            assert f'"url": "{url}"' in ready and token in ready
            gateway = GatewayUnderTest(None, port=port, admin_token=token)
            created = await gateway.create(["cat"])
            client = await gateway.attach(created["id"])
            await client.wait_hello()
            proc.send_signal(signal.SIGTERM)
            assert await client.wait_closed() == 1001
            assert any(isinstance(e, Drain) for e in client.events)
            assert await proc.wait() == 0
    finally:
        await astop(proc, 0)  # exited: closes its pipe; after a failure: SIGKILL at once
