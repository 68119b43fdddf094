"""The sidecar agent and the agent upstream, end to end over loopback (issue 5 items 1, 3).

A real gateway (``serve`` in the test's nursery) and a real :class:`Agent` in
the same trio run; the agent's shells are real PTY and pipe processes.  The
agent's link goes through a proxy where a test needs to cut it or stall it.

The last section runs two gateways sharing a real Redis: an agent that moves
from one to the other takes its sessions along (the new gateway adopts them,
the old one hands them over), and the adoption rules are checked one by one
against a memory store.  A gateway killed outright (``kill -9``) is the
subprocess test ``tests/e2e/test_ha_failover.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from tests.helpers.cutproxy import open_cut_proxy
from tests.helpers.proxylb import open_proxy_lb
from tests.helpers.redis_server import RedisServer, redis_server_available, running_redis
from tests.helpers.tasks import tasks_of

from podterm.agent.main import Agent, AgentOptions, options_from_config
from podterm.config import AgentConfig, AuthConfig, ServeConfig, StoreConfig, TLSConfig
from podterm.errors import HandshakeError, NotFoundError, Unavailable
from podterm.gateway.agents import AgentCoordinator
from podterm.metrics import GatewayCounters
from podterm.net.certs import generate_dev_pki
from podterm.net.tls import client_context
from podterm.net.wsconn import connect
from podterm.protocol.events import Drain, Open, Resume, ResumeEntry
from podterm.protocol.tunnel import TunnelCodec, TunnelRole
from podterm.session.registry import SessionRegistry
from podterm.session.session import SessionLimits
from podterm.store.base import AgentLease, PodIdentity, SessionRecord, hash_resume_token
from podterm.store.memory import MemoryStore
from podterm.upstream.agent import (
    AGENTS_PATH,
    SUBPROTOCOL,
    AgentInfo,
    AgentUpstream,
    AnnouncedStream,
    ConnectVerdict,
)
from podterm.upstream.base import OutputChannel, StreamSpec

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0
NS, POD = "team-a", "web-1"
TARGET = PodIdentity(NS, POD)
#: Short timers, so an outage of "several heartbeat intervals" takes a second.
HEARTBEAT_S = 0.2
FAST = AgentOptions(heartbeat_interval_s=HEARTBEAT_S, backoff_base_s=0.05, backoff_cap_s=0.2,
                    breaker_threshold=50, breaker_cooldown_s=0.2, connect_timeout_s=5.0,
                    exit_drain_s=0.5, kill_grace_s=0.5)
ADMIN_TOKEN = "admin-token-0123456789"
AGENT_TOKEN = "agent-token-0123456789"
BOB_TOKEN = "bob-token-0123456789"


@dataclass(frozen=True, slots=True)
class Tokens:
    csv: Path  # the gateway's token file
    agent: Path  # the agent's --token-file


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    csv = tmp_path / "tokens.csv"
    csv.write_text(f"{AGENT_TOKEN},agent,agent-uid,podterm:agents\n"
                   f'{BOB_TOKEN},bob,bob-uid,"developers,podterm:users"\n')
    agent = tmp_path / "agent.token"
    agent.write_text(AGENT_TOKEN + "\n")
    return Tokens(csv, agent)


def fast_agent_links(gateway: GatewayUnderTest) -> GatewayUnderTest:
    """Short heartbeats on the gateway's agent links only (clients keep the default:
    the test's clients answer PINGs only while they read)."""
    upstream = agents_of(gateway)
    upstream.options = dataclasses.replace(upstream.options, heartbeat_interval_s=HEARTBEAT_S)
    return gateway


@pytest.fixture
async def gateway(make_gateway: GatewayFactory, tokens: Tokens) -> GatewayUnderTest:
    """A gateway with a token file (admin, agent, bob) and short agent heartbeats."""
    return fast_agent_links(await make_gateway(
        auth=AuthConfig(token_file=str(tokens.csv), admin_token=ADMIN_TOKEN),
        session_limits=SessionLimits(exit_drain_s=0.5)))


def agents_of(gateway: GatewayUnderTest) -> AgentUpstream:
    upstream = gateway.gw.agents
    assert isinstance(upstream, AgentUpstream)
    return upstream


@asynccontextmanager
async def running_agent(url: str, *, options: AgentOptions = FAST, namespace: str = NS,
                        pod: str = POD, **config: Any) -> AsyncIterator[Agent]:
    """An :class:`Agent` for ``url`` in its own nursery; cancelled (shells killed) on exit."""
    agent = Agent(AgentConfig(gateway=url, namespace=namespace, pod=pod, **config), options)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        try:
            yield agent
        finally:
            nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool], *, every_s: float = 0.01) -> None:
    """Poll a condition that no event announces (the caller bounds the wait)."""
    while not predicate():
        await trio.sleep(every_s)


async def create(gateway: GatewayUnderTest, command: list[str] | None, **fields: Any
                 ) -> dict[str, Any]:
    return await gateway.create(command, upstream="agent", namespace=NS, pod=POD, **fields)


async def delete(gateway: GatewayUnderTest, session_id: str) -> None:
    answer = await gateway.rest("DELETE", f"/api/v1/sessions/{session_id}")
    assert answer.status in (200, 410), answer.body


async def shell_pid(client: Any, tag: str) -> int:
    """Ask the shell for its PID; the marker is built by the shell so the echo cannot match."""
    await client.send_stdin(f"echo {tag}-$((40+2))-$$\r".encode())
    pattern = re.compile(rb"%s-42-(\d+)" % tag.encode())
    await client.wait_for(lambda c: pattern.search(bytes(c.output)) is not None)
    match = pattern.search(bytes(client.output))
    assert match is not None
    return int(match.group(1))


# --- sessions on the agent upstream -------------------------------------------------------


async def test_command_runs_through_the_agent(gateway: GatewayUnderTest, tokens: Tokens) -> None:
    async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
        with trio.fail_after(WAIT_S):
            await agent.wait_registered()
            info = await agents_of(gateway).wait_connected(TARGET)
            assert (info.user, info.agent_id, info.capacity) == ("agent", agent.agent_id,
                                                                 FAST.max_streams)
            created = await create(gateway, ["echo", "hi"], tty=False)
            assert created["upstream"] == "agent"
            client = await gateway.attach(created["id"])
            assert await client.wait_closed() == 1000
            assert bytes(client.output) == b"hi\n"
            assert client.exit is not None and client.exit.code == 0
            # The agent forgets the stream once the gateway has closed it.
            await wait_until(lambda: not agent.streams)


async def test_interactive_shell_and_resize(gateway: GatewayUnderTest, tokens: Tokens) -> None:
    async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
        with trio.fail_after(WAIT_S):
            await agent.wait_registered()
            created = await create(gateway, None, tty=True, size={"cols": 90, "rows": 30})
            client = await gateway.attach(created["id"])
            await client.wait_hello()
            pid = await shell_pid(client, "first")
            [stream] = agent.stream_statistics()
            assert stream.pid == pid  # the login shell is the stream's own process
            await client.send_stdin(b"stty size\r")
            await client.wait_output(b"30 90")
            await client.send_resize(120, 40)
            await client.send_stdin(b"stty size\r")
            await client.wait_output(b"40 120")
            await client.send_stdin(b"exit 3\r")
            assert await client.wait_closed() == 1000
            assert client.exit is not None and client.exit.code == 3


async def test_command_that_cannot_start(gateway: GatewayUnderTest, tokens: Tokens) -> None:
    async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
        with trio.fail_after(WAIT_S):
            await agent.wait_registered()
            created = await create(gateway, ["no-such-command-xyz"], tty=False)
            client = await gateway.attach(created["id"])
            assert await client.wait_closed() == 1000
            assert b"no-such-command-xyz" in client.output
            assert client.exit is not None and client.exit.code == 127


async def test_no_agent_for_the_pod_is_502(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        answer = await gateway.rest("POST", "/api/v1/sessions", {
            "command": ["true"], "upstream": "agent", "namespace": NS, "pod": "nobody-here"})
        assert answer.status == 502
        assert "no agent is registered for pod team-a/nobody-here" in answer.json["error"][
            "message"]


async def test_delete_kills_the_shell_in_the_agent(gateway: GatewayUnderTest,
                                                   tokens: Tokens) -> None:
    async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
        with trio.fail_after(WAIT_S):
            await agent.wait_registered()
            created = await create(gateway, ["sleep", "1000"], tty=False)
            await wait_until(lambda: any(s.pid for s in agent.stream_statistics()))
            [stream] = agent.stream_statistics()
            assert stream.pid is not None
            await delete(gateway, created["id"])
            await wait_until(lambda: not agent.streams)
            # Killed and reaped: no such process any more.
            await wait_until(lambda: not Path(f"/proc/{stream.pid}").exists())


# --- flow control: one tunnel, per-stream credit ------------------------------------------


async def test_a_flooding_shell_never_stalls_another(gateway: GatewayUnderTest,
                                                     tokens: Tokens) -> None:
    """Stream A floods (``yes``) and nobody reads it; stream B still echoes at once."""
    async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
        with trio.fail_after(WAIT_S * 2):
            await agent.wait_registered()
            flood = await create(gateway, ["yes", "flood"], tty=False)  # no client: never read
            echo = await create(gateway, ["cat"], tty=False)
            flood_sid, echo_sid = 1, 2
            # A runs out of credit on the tunnel: the gateway holds one window of it.
            await wait_until(lambda: flood_sid in agent.mux and agent.mux.credit(flood_sid) == 0)
            client = await gateway.attach(echo["id"])
            await client.wait_hello()
            worst = 0.0
            for i in range(30):
                line = f"keystroke-{i}\n".encode()
                start = trio.current_time()
                await client.send_stdin(line)
                await client.wait_for(lambda c, line=line: bytes(c.output).endswith(line))
                worst = max(worst, trio.current_time() - start)
                # A is still blocked, and its backlog stays bounded by its window.
                assert agent.mux.credit(flood_sid) == 0
            assert worst < 1.0, f"a keystroke took {worst:.3f}s behind the flood"
            # B's output is all consumed and acknowledged (the 100 ms ACK timer).
            await wait_until(lambda: agent.mux.stream_statistics(echo_sid).acked
                             == agent.mux.stream_statistics(echo_sid).sent)
            gw_mux = agents_of(gateway)._tunnels[TARGET].mux
            assert gw_mux.stream_statistics(flood_sid).buffered <= FAST.ring_bytes
            assert gw_mux.stream_statistics(flood_sid).buffered <= 256 * 1024
            await client.aclose()
            await delete(gateway, flood["id"])
            await delete(gateway, echo["id"])


# --- outages: the link cut, stalled, the agent replaced -----------------------------------


async def test_cut_link_resumes_every_byte_and_keeps_the_shell(gateway: GatewayUnderTest,
                                                               tokens: Tokens) -> None:
    async with open_cut_proxy("127.0.0.1", gateway.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        async with running_agent(url, token_file=str(tokens.agent)) as agent:
            with trio.fail_after(WAIT_S * 2):
                await agent.wait_registered()
                created = await create(gateway, None, tty=True)
                client = await gateway.attach(created["id"])
                await client.wait_hello()
                pid = await shell_pid(client, "before")
                await client.send_stdin(
                    b"i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo line-$i; sleep 0.01; "
                    b"done; echo finished-$((1+1))\r")
                await client.wait_output(b"line-20\r\n")
                [stream] = agent.streams.values()
                # The outage: every connection is cut and new ones are refused.
                proxy.block()
                cut_at = trio.current_time()
                await agent.wait_disconnected()
                await agents_of(gateway).wait_disconnected(TARGET)
                produced_at_cut = stream.ring.end
                failures = agent.statistics().dialer.failures
                # Longer than several heartbeat intervals, with reconnects failing and
                # the shell writing on into the agent's ring meanwhile.
                await trio.sleep_until(cut_at + 6 * HEARTBEAT_S)
                await wait_until(lambda: agent.statistics().dialer.failures >= failures + 3)
                await wait_until(lambda: stream.ring.end > produced_at_cut + 500)
                assert not agent.link_up
                proxy.unblock()
                await agent.wait_registered(2)
                await client.wait_output(b"finished-2")
                # Byte-exact: the client's transcript is the PTY's output as the agent read it.
                assert stream.ring.start == 0
                assert bytes(client.output) == stream.ring.read_from(0, 1 << 20)
                lines = re.findall(rb"line-(\d+)\r\n", bytes(client.output))
                assert [int(n) for n in lines] == list(range(1, 301))
                assert await shell_pid(client, "after") == pid  # the same shell
                assert agents_of(gateway).statistics().streams_resumed >= 1
                await client.aclose()
                await delete(gateway, created["id"])


async def test_input_is_acknowledged_only_once_the_agent_has_it(gateway: GatewayUnderTest,
                                                                tokens: Tokens) -> None:
    """The client may forget input only when the agent wrote it to the process: input
    the gateway holds while the agent is away stays unacknowledged (a gateway dying
    then costs nothing: the client re-sends it to whichever gateway adopts the shell)."""
    async with open_cut_proxy("127.0.0.1", gateway.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        async with running_agent(url, token_file=str(tokens.agent)) as agent:
            with trio.fail_after(WAIT_S * 2):
                await agent.wait_registered()
                created = await create(gateway, ["cat"], tty=False)
                client = await gateway.attach(created["id"])
                await client.wait_hello()
                await client.send_stdin(b"first\n")
                await client.wait_output(b"first\n")
                await client.wait_for(lambda c: 6 in c.in_acks)
                session = gateway.registry.get(created["id"])
                proxy.block()
                await agent.wait_disconnected()
                await agents_of(gateway).wait_disconnected(TARGET)
                await client.send_stdin(b"second\n")
                # The session took the bytes and passed them to the agent stream...
                await wait_until(lambda: session.in_offset == 13
                                 and session.statistics().input_buffered == 0)
                # ...but what input ACKs carry stays where the agent confirmed it.
                assert session.in_written == 6
                proxy.unblock()
                await client.wait_output(b"first\nsecond\n")
                await client.wait_for(lambda c: 13 in c.in_acks)
                assert set(client.in_acks) == {6, 13}
                await client.aclose()
                await delete(gateway, created["id"])


async def test_ring_overflow_while_away_is_reported_as_a_gap(gateway: GatewayUnderTest,
                                                             tokens: Tokens) -> None:
    """More output than the agent's ring while the link is down: the loss is counted
    exactly, said on screen, and everything after it arrives."""
    small = dataclasses.replace(FAST, ring_bytes=64 * 1024)
    async with open_cut_proxy("127.0.0.1", gateway.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        async with running_agent(url, options=small, token_file=str(tokens.agent)) as agent:
            with trio.fail_after(WAIT_S * 2):
                await agent.wait_registered()
                created = await create(gateway, None, tty=True)
                client = await gateway.attach(created["id"])
                await client.wait_hello()
                await client.send_stdin(b"sleep 0.3; seq 1 30000; echo end-$((1+1))\r")
                await client.wait_output(b"seq 1 30000")  # the terminal's echo of the line
                [stream] = agent.streams.values()
                proxy.block()
                await agent.wait_disconnected()
                # seq's ~170 KB overflow the 64 KiB ring while nobody can take them.
                await wait_until(lambda: b"end-2" in stream.ring.read_from(
                    max(stream.ring.start, stream.ring.end - 64), 64))
                # The gateway holds at least what it acknowledged, at most what was
                # sent (an ACK may have been in flight at the cut).
                held_low, held_high = stream.acked, stream.sent
                assert stream.ring.start > held_high
                proxy.unblock()
                await agent.wait_registered(2)
                await client.wait_output(b"end-2")
                lost = agents_of(gateway).statistics().gap_bytes
                assert stream.ring.start - held_high <= lost <= stream.ring.start - held_low
                notice = (f"[podterm: {lost} bytes of output were lost while the pod's "
                          "agent was disconnected]").encode()
                assert notice in client.output
                # After the notice: exactly what the ring still held, to the last byte
                # (once the gateway consumed all of it and the client has it all).
                await wait_until(lambda: stream.acked == stream.ring.end)
                session = gateway.registry.get(created["id"])
                await client.wait_for(lambda c: c.offset == session.out_offset)
                after = bytes(client.output).split(notice + b"\r\n", 1)[1]
                assert after == stream.ring.read_from(stream.ring.start, 1 << 20)
                await client.aclose()
                await delete(gateway, created["id"])


async def test_session_deleted_while_the_agent_is_away_is_killed_on_its_return(
        gateway: GatewayUnderTest, tokens: Tokens) -> None:
    async with open_cut_proxy("127.0.0.1", gateway.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        async with running_agent(url, token_file=str(tokens.agent)) as agent:
            with trio.fail_after(WAIT_S):
                await agent.wait_registered()
                kept = await create(gateway, ["sleep", "1000"], tty=False)
                doomed = await create(gateway, ["sleep", "1001"], tty=False)
                await wait_until(lambda: all(s.pid for s in agent.stream_statistics())
                                 and len(agent.streams) == 2)
                proxy.block()
                await agents_of(gateway).wait_disconnected(TARGET)
                await delete(gateway, doomed["id"])  # nobody to tell: the agent is away
                assert len(agent.streams) == 2
                proxy.unblock()
                await agent.wait_registered(2)
                # The gateway's RESUME leaves the deleted stream out and CLOSEs it.
                await wait_until(lambda: len(agent.streams) == 1)
                [left] = agent.stream_statistics()
                assert left.stream_id == 1
                got = await gateway.rest("GET", f"/api/v1/sessions/{kept['id']}")
                assert got.json["state"] == "running"
                await delete(gateway, kept["id"])


class StallProxy:
    """A TCP forwarder whose live connections can be frozen (a half-open link).

    ``stall()`` stops forwarding on every live connection without closing
    it: no FIN, no RST, nothing, as when a NAT or a peer silently vanishes.
    New connections are forwarded normally.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._stalled: list[trio.Event] = []
        self.accepted = 0

    def stall(self) -> None:
        for event in self._stalled:
            event.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        target = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        self.accepted += 1
        stalled = trio.Event()
        self._stalled.append(stalled)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while not stalled.is_set():
                    data = await src.receive_some(65536)
                    if not data or stalled.is_set():
                        break
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if stalled.is_set():
                await trio.sleep_forever()  # hold both sockets open, forward nothing

        async with client, target:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, target)
                nursery.start_soon(pump, target, client)


async def test_half_open_link_is_found_by_heartbeats_both_ways(gateway: GatewayUnderTest,
                                                              tokens: Tokens) -> None:
    proxy = StallProxy(gateway.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        url = f"http://127.0.0.1:{proxy.port}"
        # The agent pings less often than the gateway, so each side's verdict is
        # its own: the gateway's comes first, the agent's later.
        slower = dataclasses.replace(FAST, heartbeat_interval_s=3 * HEARTBEAT_S)
        async with running_agent(url, options=slower, token_file=str(tokens.agent)) as agent:
            with trio.fail_after(WAIT_S * 2):
                await agent.wait_registered()
                created = await create(gateway, None, tty=True)
                client = await gateway.attach(created["id"])
                await client.wait_hello()
                pid = await shell_pid(client, "before")
                proxy.stall()
                # Nobody closes anything: only missed PONGs can tell.
                await wait_until(lambda: agents_of(gateway).statistics().heartbeat_failures == 1)
                assert agent.link_up  # the agent has not noticed yet
                # The agent's own heartbeat fails next; it reconnects (a fresh
                # connection is forwarded) and resumes.
                await agent.wait_registered(2)
                assert "heartbeat lost" in (agent.statistics().dialer.last_error or "")
                assert await shell_pid(client, "after") == pid
                assert proxy.accepted >= 2
                await client.aclose()
                await delete(gateway, created["id"])
        nursery.cancel_scope.cancel()


async def test_restarted_agent_ends_the_sessions_it_lost(gateway: GatewayUnderTest,
                                                         tokens: Tokens) -> None:
    with trio.fail_after(WAIT_S * 2):
        async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
            await agent.wait_registered()
            created = await create(gateway, None, tty=True)
            client = await gateway.attach(created["id"])
            await client.wait_hello()
            await shell_pid(client, "old")
        # The agent process is gone with its shells; a new one registers the pod.
        async with running_agent(gateway.url, token_file=str(tokens.agent)) as new_agent:
            await new_agent.wait_registered()
            assert await client.wait_closed() == 4410
            assert client.exit is not None and client.exit.reason == "upstream_failed"
            assert agents_of(gateway).statistics().streams_lost == 1


async def test_gateway_drain_moves_the_agent_and_keeps_its_shells(
        make_gateway: GatewayFactory, tokens: Tokens) -> None:
    auth = AuthConfig(token_file=str(tokens.csv), admin_token=ADMIN_TOKEN)
    first = await make_gateway(auth=auth)
    async with running_agent(first.url, token_file=str(tokens.agent)) as agent:
        with trio.fail_after(WAIT_S):
            await agent.wait_registered()
            await first.create(["sleep", "1000"], tty=False, upstream="agent", namespace=NS,
                               pod=POD)
            await wait_until(lambda: any(s.pid for s in agent.stream_statistics()))
            [before] = agent.stream_statistics()
            first.gw.shutdown("rolling update")
            await first.finished.wait()
            # Told to drain, the agent left at once; its shell lives on.
            await agent.wait_disconnected()
            await wait_until(lambda: agent.statistics().dialer.drains == 1)
            [after] = agent.stream_statistics()
            assert after.pid == before.pid and Path(f"/proc/{after.pid}").exists()


# --- authentication and registration -------------------------------------------------------


async def _upgrade(gateway: GatewayUnderTest, token: str | None,
                   headers: list[tuple[str, str]] | None = None) -> None:
    hdrs = list(headers if headers is not None else [
        ("X-Podterm-Namespace", NS), ("X-Podterm-Pod", POD), ("X-Podterm-Agent-Id", "a1")])
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    ws, _ = await connect(f"ws://127.0.0.1:{gateway.port}{AGENTS_PATH}",
                          subprotocols=[SUBPROTOCOL], headers=hdrs)
    await ws.aclose()


@pytest.mark.parametrize(("token", "status"), [
    (None, 401), ("wrong-token", 401), (BOB_TOKEN, 403), (ADMIN_TOKEN, 403)])
async def test_only_the_agents_group_may_register(gateway: GatewayUnderTest, token: str | None,
                                                  status: int) -> None:
    with trio.fail_after(WAIT_S):
        with pytest.raises(HandshakeError) as info:
            await _upgrade(gateway, token)
        assert info.value.http_status == status
        assert agents_of(gateway).agents() == []


@pytest.mark.parametrize("headers", [
    [("X-Podterm-Pod", POD), ("X-Podterm-Agent-Id", "a1")],
    [("X-Podterm-Namespace", "Bad_NS"), ("X-Podterm-Pod", POD), ("X-Podterm-Agent-Id", "a1")],
    [("X-Podterm-Namespace", NS), ("X-Podterm-Pod", POD)],
])
async def test_registration_needs_the_pod_identity(gateway: GatewayUnderTest,
                                                   headers: list[tuple[str, str]]) -> None:
    with trio.fail_after(WAIT_S):
        with pytest.raises(HandshakeError) as info:
            await _upgrade(gateway, AGENT_TOKEN, headers)
        assert info.value.http_status == 400


async def test_refused_agent_keeps_trying_and_rereads_its_token_file(
        gateway: GatewayUnderTest, tokens: Tokens, tmp_path: Path) -> None:
    token_file = tmp_path / "rotated.token"
    token_file.write_text(BOB_TOKEN)  # not in podterm:agents: refused
    ready = tmp_path / "agent-ready.json"
    async with running_agent(gateway.url, token_file=str(token_file),
                             ready_file=str(ready)) as agent:
        with trio.fail_after(WAIT_S):
            await wait_until(lambda: agent.statistics().dialer.failures >= 2)
            assert "403" in (agent.statistics().dialer.last_error or "")
            assert not ready.exists()
            # The kubelet rotates a projected token by swapping the file.
            rotated = tmp_path / "rotated.token.new"
            rotated.write_text(AGENT_TOKEN + "\n")
            os.replace(rotated, token_file)
            await agent.wait_registered()
            assert json.loads(ready.read_text()) == {"gateway": gateway.url, "pid": os.getpid()}


async def test_mutual_tls_agent(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    pki = generate_dev_pki(tmp_path / "pki")  # users: admin (podterm:admins), agent (podterm:agents)
    client = {c.user: c for c in pki.clients}
    gateway = fast_agent_links(await make_gateway(
        tls=TLSConfig(cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                      client_ca_file=str(pki.ca_cert))))
    url = f"https://127.0.0.1:{gateway.port}"
    with trio.fail_after(WAIT_S):
        # The admin's certificate is not an agent's.
        with pytest.raises(HandshakeError) as info:
            ctx = client_context(pki.ca_cert, client["admin"].cert, client["admin"].key)
            ws, _ = await connect(f"wss://127.0.0.1:{gateway.port}{AGENTS_PATH}",
                                  subprotocols=[SUBPROTOCOL], ssl_context=ctx,
                                  headers=[("X-Podterm-Namespace", NS), ("X-Podterm-Pod", POD),
                                           ("X-Podterm-Agent-Id", "a1")])
        assert info.value.http_status == 403
    async with running_agent(url, ca_file=str(pki.ca_cert), cert_file=str(client["agent"].cert),
                             key_file=str(client["agent"].key)) as agent:
        with trio.fail_after(WAIT_S):
            await agent.wait_registered()
            info_ = await agents_of(gateway).wait_connected(TARGET)
            assert info_.user == "agent"
            stream = await agents_of(gateway).open(StreamSpec(("echo", "over", "mtls"), tty=False,
                                                              namespace=NS, pod=POD))
            output = bytearray()
            while True:
                channel, data = await stream.receive_some()
                if channel == OutputChannel.EOF:
                    break
                output += data
            assert bytes(output) == b"over mtls\n"
            assert (await stream.wait_exit()).code == 0
            await stream.aclose()


# --- echo mode ----------------------------------------------------------------------------


@asynccontextmanager
async def echo_session(gateway: GatewayUnderTest, tokens: Tokens, *,
                       options: AgentOptions = FAST) -> AsyncIterator[tuple[Agent, str, Any]]:
    """An echo agent, a tty session on it and an attached client past its hello.

    Yields ``(agent, session id, client)``; the client is closed and the
    session deleted on the way out.
    """
    async with running_agent(gateway.url, token_file=str(tokens.agent), echo=True,
                             options=options) as agent:
        await agent.wait_registered()
        created = await create(gateway, None, tty=True)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        yield agent, created["id"], client
        await client.aclose()
        await delete(gateway, created["id"])


async def type_within_window(client: Any, payload: bytes, *, sent_before: int,
                             chunk: int = 16384) -> None:
    """Send ``payload`` as a client must (docs/protocol.md §6): at most one window
    of input beyond the server's input ACK, so our ACKs never queue behind
    input the gateway cannot take yet."""
    window = (await client.wait_hello()).window
    for i in range(0, len(payload), chunk):
        await wait_until(lambda i=i: sent_before + i + chunk
                         - max(client.in_acks, default=0) <= window)
        await client.send_stdin(payload[i:i + chunk])


async def test_echo_mode_echoes_through_the_full_path(gateway: GatewayUnderTest,
                                                      tokens: Tokens) -> None:
    with trio.fail_after(WAIT_S * 2):
        async with echo_session(gateway, tokens) as (agent, session_id, client):
            await client.send_stdin(b"k")
            await client.wait_output(b"k")
            # 2 MiB, several windows of both directions' credit: exact and in order.
            payload = bytes(range(256)) * 8192
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(type_within_window, client, payload,
                                                     sent_before=1))
                await client.wait_for(lambda c: len(c.output) >= 1 + len(payload))
            assert bytes(client.output) == b"k" + payload
            [stream] = agent.stream_statistics()
            assert stream.kind == "echo" and stream.pid is None
            assert stream.out_offset == 1 + len(payload)
            got = await gateway.rest("GET", f"/api/v1/sessions/{session_id}")
            assert got.json["in_offset"] == 1 + len(payload)
            assert got.json["out_offset"] == 1 + len(payload)
        await wait_until(lambda: not agent.streams)


async def test_the_agent_acks_input_with_its_echo_not_on_its_timer(gateway: GatewayUnderTest,
                                                                   tokens: Tokens) -> None:
    # An ACK timer far longer than the test: every input ACK the client gets
    # in time rode with the echo of the key it acknowledges.
    slow_acks = dataclasses.replace(FAST, ack_interval_s=60.0)
    with trio.fail_after(WAIT_S * 2):
        async with echo_session(gateway, tokens, options=slow_acks) as (_agent, _sid, client):
            for i, key in enumerate(b"abcdef", start=1):
                await client.send_stdin(bytes([key]))
                await client.wait_for(lambda c, i=i: len(c.output) >= i
                                      and max(c.in_acks, default=0) >= i)
            assert bytes(client.output) == b"abcdef"


async def test_an_idle_agent_session_runs_no_task_of_its_own(gateway: GatewayUnderTest,
                                                            tokens: Tokens) -> None:
    with trio.fail_after(WAIT_S * 2):
        async with echo_session(gateway, tokens) as (agent, session_id, client):
            session = gateway.registry.get(session_id)
            typed = b""
            for round_ in range(3):
                # Idle: no task runs for the session: its output pump left (the
                # agent stream pushes output to the ring itself) and so did its
                # supervisor (the stream and the process's timer call it back).
                await wait_until(lambda: not tasks_of(session))
                key = b"k%d" % round_
                typed += key
                await client.send_stdin(key)
                await client.wait_for(lambda c, t=typed: bytes(c.output) == t)
            # Output beyond the window's credit: the stream calls the pump
            # back (refused pushes), and every byte arrives once, in order.
            window = (await client.wait_hello()).window
            payload = bytes(range(256)) * (2 * window // 256)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(type_within_window, client, payload,
                                                     sent_before=len(typed), chunk=8192))
                await client.wait_for(lambda c: len(c.output) >= len(typed) + len(payload))
            assert bytes(client.output) == typed + payload
            await wait_until(lambda: not tasks_of(session))
        await wait_until(lambda: not agent.streams)
        assert session.end_reason is not None


async def test_a_parked_supervisor_hears_the_exit_a_kill_and_its_timers(
        make_gateway: GatewayFactory, tokens: Tokens) -> None:
    """Each thing that ends a session reaches a supervisor that has left its task."""
    gateway = fast_agent_links(await make_gateway(
        auth=AuthConfig(token_file=str(tokens.csv), admin_token=ADMIN_TOKEN),
        session_limits=SessionLimits(exit_drain_s=0.5, grace_s=0.4, idle_timeout_s=1.5)))
    with trio.fail_after(WAIT_S * 2):
        async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
            await agent.wait_registered()

            async def parked_session() -> tuple[Any, Any]:
                created = await create(gateway, None, tty=True)
                client = await gateway.attach(created["id"])
                await shell_pid(client, "p")  # the shell runs and answered
                session = gateway.registry.get(created["id"])
                await wait_until(lambda: not tasks_of(session))
                return session, client

            # 1. The process exits: EXIT (code 0), then 1000.
            session, client = await parked_session()
            await client.send_stdin(b"exit\r")
            assert await client.wait_closed() == 1000
            assert client.exit is not None and client.exit.code == 0
            await session.wait_closed()
            assert session.end_reason == "exited"
            # 2. A kill (DELETE): EXIT "killed", then 4410.
            session, client = await parked_session()
            await delete(gateway, session.id)
            assert await client.wait_closed() == 4410
            assert client.exit is not None and client.exit.reason == "killed"
            # 3. The writer leaves: the earlier deadline (grace) moves the
            #    parked supervisor's timer, and the grace ends the session.
            session, client = await parked_session()
            await client.aclose()
            left = trio.current_time()
            await session.wait_closed()
            assert session.end_reason == "grace"
            assert 0.4 <= trio.current_time() - left < 1.4  # not the idle timeout's 1.5 s
            # 4. The idle timeout, attached and silent.
            session, client = await parked_session()
            assert await client.wait_closed() == 4410
            assert session.end_reason == "idle"
            assert client.exit is not None and client.exit.reason == "idle"


async def test_a_parked_supervisor_ends_its_session_when_the_agent_stays_away(
        make_gateway: GatewayFactory, tokens: Tokens) -> None:
    gateway = fast_agent_links(await make_gateway(
        auth=AuthConfig(token_file=str(tokens.csv), admin_token=ADMIN_TOKEN),
        session_limits=SessionLimits(exit_drain_s=0.5)))
    upstream = agents_of(gateway)
    upstream.options = dataclasses.replace(upstream.options, lost_timeout_s=0.5)
    with trio.fail_after(WAIT_S * 2):
        async with running_agent(gateway.url, token_file=str(tokens.agent)) as agent:
            await agent.wait_registered()
            created = await create(gateway, None, tty=True)
            client = await gateway.attach(created["id"])
            await shell_pid(client, "away")
            session = gateway.registry.get(created["id"])
            await wait_until(lambda: not tasks_of(session))
        # The agent is gone and none comes back: past lost_timeout_s the
        # session ends, though no task of it was waiting.
        gone = trio.current_time()
        assert await client.wait_closed() == 4410
        assert client.exit is not None and client.exit.reason == "upstream_failed"
        assert trio.current_time() - gone >= 0.5


async def test_echo_agent_resumes_across_a_cut(gateway: GatewayUnderTest,
                                               tokens: Tokens) -> None:
    async with open_cut_proxy("127.0.0.1", gateway.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        async with running_agent(url, token_file=str(tokens.agent), echo=True) as agent:
            with trio.fail_after(WAIT_S * 2):
                await agent.wait_registered()
                created = await create(gateway, None, tty=False)
                client = await gateway.attach(created["id"])
                await client.wait_hello()
                sent = bytearray()
                for round_ in range(5):
                    chunk = f"round-{round_}:".encode() * 5000
                    await client.send_stdin(chunk)
                    sent += chunk
                    # Cut mid-stream, while the echo is in flight.
                    proxy.cut_all()
                    await client.wait_for(lambda c, n=len(sent): len(c.output) >= n)  # noqa: B008
                assert bytes(client.output) == bytes(sent)
                assert agent.statistics().registrations >= 2
                await client.aclose()
                await delete(gateway, created["id"])


async def test_server_config_has_an_agent_upstream() -> None:
    """``--upstream agent`` is a kind the gateway always serves."""
    from podterm.gateway.server import Gateway, GatewayOptions

    gw = Gateway(ServeConfig(), GatewayOptions())
    assert "agent" in gw.registry.upstreams
    assert gw.registry.upstreams["agent"] is gw.agents


async def test_tunnel_url_and_token_file(tmp_path: Path) -> None:
    from podterm.agent.dialer import TokenFile, tunnel_url
    from podterm.errors import ConfigError

    assert tunnel_url("https://gw.example") == "wss://gw.example/api/v1/agents/connect"
    assert tunnel_url("http://127.0.0.1:7780/") == "ws://127.0.0.1:7780/api/v1/agents/connect"
    assert tunnel_url("https://lb.example/podterm") == (
        "wss://lb.example/podterm/api/v1/agents/connect")
    with pytest.raises(ConfigError):
        tunnel_url("ftp://gw.example")
    path = tmp_path / "token"
    path.write_text("  first-token\n")
    token = TokenFile(path)
    assert token.read() == "first-token"
    assert token.read() == "first-token"
    assert token.reloads == 1  # unchanged file: not read again
    replacement = tmp_path / "token.new"
    replacement.write_text("second-token")
    os.replace(replacement, path)
    assert token.read() == "second-token" and token.reloads == 2
    path.write_text("two tokens\n")
    with pytest.raises(ConfigError):
        token.read()


# --- agents across gateways: labels, leases, adoption, hand-over ------------------------


async def test_session_label_travels_in_open_and_in_the_agents_resume() -> None:
    """The label a gateway puts in OPEN is what the agent lists in its RESUME; the
    gateway's own RESUME carries none, and a malformed label is refused (1007)."""
    gateway, agent = TunnelCodec(TunnelRole.GATEWAY), TunnelCodec(TunnelRole.AGENT)

    def over(codec: TunnelCodec, message: tuple[bytes, Any]) -> list[tuple[int, Any]]:
        prefix, payload = message
        return codec.receive_message(2, prefix + bytes(payload))

    entry = ResumeEntry(7, 4096, 10, 90, 5, session="s-0123456789ab")
    [(_, theirs)] = over(gateway, agent.encode(0, Resume((entry,), next_id=8)))
    assert theirs.streams == (entry,)
    [(_, ours)] = over(agent, gateway.encode(0, Resume((dataclasses.replace(entry, session=None),))))
    assert ours.streams[0].session is None
    [(sid, opened)] = over(agent, gateway.encode(8, Open(None, True, 80, 24,
                                                         session="s-0123456789ab")))
    assert sid == 8 and opened.session == "s-0123456789ab"
    [(_, plain)] = over(agent, gateway.encode(9, Open(("true",), False, 80, 24)))
    assert plain.session is None
    from podterm.errors import LocalProtocolError, ProtocolViolation
    with pytest.raises(LocalProtocolError):
        gateway.encode(10, Open(None, True, 80, 24, session="no spaces allowed"))
    bad = b'{"command":null,"tty":true,"size":{"cols":80,"rows":24},"session":"a b"}'
    with pytest.raises(ProtocolViolation) as caught:
        agent.receive_message(2, bytes([0x07, 0, 0, 0, 11]) + bad)
    assert caught.value.close_code == 1007


async def test_retain_bytes_sets_the_agents_ring() -> None:
    config = AgentConfig(gateway="http://gw", namespace=NS, pod=POD, retain_bytes=100_000)
    assert options_from_config(config).ring_bytes == 102_400  # whole 4 KiB chunks


async def test_agent_ring_is_retention_not_a_send_buffer() -> None:
    """A gateway that adopts a stream may ask for output its dead predecessor had
    acknowledged: the ring still has it, and credit counts from there, so nothing
    after it is trimmed before this gateway holds it."""
    from podterm.agent.streams import AgentStream, StreamHost
    from podterm.protocol.offsets import replay_range

    class Host(StreamHost):
        link_up = True

        def stream_ready(self, stream: AgentStream) -> None:
            pass

        def input_consumed(self, stream: AgentStream, n: int) -> None:
            pass

    stream = AgentStream(1, 4096, True, Host(), ring_bytes=8192, chunk_bytes=4096)
    stream.resumed = True
    stream.produce(1, b"x" * 6000)
    stream.take_output(6000)
    stream.on_ack(6000)  # the first gateway had it all
    assert stream.room() == 8192  # ... so, to it, the ring was free again
    stream.on_resume(replay_range(1000, stream.ring.start, stream.ring.end))
    assert (stream.sent, stream.acked) == (1000, 1000)
    assert stream.room() == 8192 - 5000  # the new gateway holds only up to 1000
    assert [len(d) for _, d in stream.take_output(5000)] == [5000]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own (it may be restarted)."""
    if not redis_server_available():
        message = "redis-server not installed (scripts/setup.sh --test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with running_redis(tmp_path / "redis", persistence="none") as server:
        yield server


async def shared_gateway(make_gateway: GatewayFactory, tokens: Tokens,
                         redis: RedisServer) -> GatewayUnderTest:
    """A gateway on the shared Redis store, with short agent heartbeats and 3 s leases."""
    gateway = fast_agent_links(await make_gateway(
        auth=AuthConfig(token_file=str(tokens.csv), admin_token=ADMIN_TOKEN),
        store=StoreConfig(url=redis.url), session_limits=SessionLimits(exit_drain_s=0.5)))
    coordinator = gateway.gw.agent_coordinator
    assert coordinator is not None
    # Renewed every second: a busy test loop never lets it lapse; a move is
    # noticed at once anyway (the store publishes it).
    coordinator.lease_ttl_s = 3.0
    return gateway


async def test_agent_that_moves_takes_its_sessions_to_the_new_gateway(
        make_gateway: GatewayFactory, tokens: Tokens, redis: RedisServer) -> None:
    """The load balancer sends the agent to another gateway: that one adopts the
    session (same id, same shell), the first hands it over (its client is told to
    reconnect), and the client resumes there with every line exactly once."""
    first = await shared_gateway(make_gateway, tokens, redis)
    second = await shared_gateway(make_gateway, tokens, redis)
    async with open_proxy_lb([("127.0.0.1", first.port)]) as lb:
        url = f"http://127.0.0.1:{lb.port}"
        async with running_agent(url, token_file=str(tokens.agent)) as agent:
            with trio.fail_after(WAIT_S * 3):
                await agent.wait_registered()
                lease = await first.gw.store.lookup_agent(TARGET)
                assert lease is not None and lease.holder == first.gw.peer_address
                created = await create(first, None, tty=True)
                sid = created["id"]
                client = await first.attach(sid)
                await client.wait_hello()
                pid = await shell_pid(client, "before")
                await client.send_stdin(
                    b"i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo line-$i; sleep 0.005; "
                    b"done; echo finished-$((1+1))\r")
                await client.wait_output(b"line-40\r\n")
                lb.set_backends([("127.0.0.1", second.port)])
                lb.cut_all()
                await agents_of(second).wait_connected(TARGET)
                # The first gateway hears of it (the lease moved) and lets go.
                assert await client.wait_closed() == 1001
                assert any(isinstance(e, Drain) for e in client.events)
                await wait_until(lambda: second.registry.is_live(sid))
                with pytest.raises(NotFoundError):
                    first.registry.get(sid)  # no tombstone: the session lives on elsewhere
                assert client.hello is not None
                again = await second.attach(sid, offset=client.offset,
                                            resume_token=client.hello.resume_token)
                hello = await again.wait_hello()
                assert hello.out_offset == client.offset and again.gaps == []
                await again.wait_output(b"finished-2")
                transcript = bytes(client.output) + bytes(again.output)
                lines = re.findall(rb"line-(\d+)\r\n", transcript)
                assert [int(n) for n in lines] == list(range(1, 401))
                assert await shell_pid(again, "after") == pid  # the same shell
                record = await second.gw.store.get_session(sid)
                assert record is not None and record.holder == second.gw.peer_address
                lease = await second.gw.store.lookup_agent(TARGET)
                assert lease is not None and lease.holder == second.gw.peer_address
                assert agents_of(second).statistics().streams_adopted == 1
                assert agents_of(first).statistics().streams_moved == 1
                metrics = (await second.rest("GET", "/metrics")).body.decode()
                assert "\npodterm_agent_streams_adopted_total 1\n" in metrics
                assert "\npodterm_agent_sessions_adopted_total 1\n" in metrics
                metrics = (await first.rest("GET", "/metrics")).body.decode()
                assert "\npodterm_agent_hand_overs_total 1\n" in metrics
                assert len(agent.streams) == 1  # nobody closed the shell on the agent
                await again.aclose()
                await delete(second, sid)
                await wait_until(lambda: not agent.streams)


async def test_rolling_update_hands_agent_sessions_to_a_peer(
        make_gateway: GatewayFactory, tokens: Tokens, redis: RedisServer) -> None:
    """A draining gateway sends its agent to a peer, which adopts the session; the
    drained gateway's shutdown leaves the record alone (no tombstone), so nothing
    kills the shell, and the client resumes at the peer."""
    first = await shared_gateway(make_gateway, tokens, redis)
    second = await shared_gateway(make_gateway, tokens, redis)
    async with open_proxy_lb([("127.0.0.1", first.port)]) as lb:
        url = f"http://127.0.0.1:{lb.port}"
        async with running_agent(url, token_file=str(tokens.agent)) as agent:
            with trio.fail_after(WAIT_S * 3):
                await agent.wait_registered()
                created = await create(first, None, tty=True)
                sid = created["id"]
                client = await first.attach(sid)
                await client.wait_hello()
                pid = await shell_pid(client, "before")
                first.gw.shutdown("rolling update")
                assert await client.wait_closed() == 1001
                await first.finished.wait()
                # Only now may the agent reach the peer: the first gateway's end
                # (its sessions' too) is written before anyone adopts them.
                lb.set_backends([("127.0.0.1", second.port)])
                await agents_of(second).wait_connected(TARGET)
                await wait_until(lambda: second.registry.is_live(sid))
                assert client.hello is not None
                again = await second.attach(sid, offset=client.offset,
                                            resume_token=client.hello.resume_token)
                await again.wait_hello()
                assert await shell_pid(again, "after") == pid
                record = await second.gw.store.get_session(sid)
                assert record is not None and record.state != "closed"
                assert record.holder == second.gw.peer_address
                await again.aclose()
                await delete(second, sid)
                await wait_until(lambda: not agent.streams)


# The adoption rules, one by one, against a memory store (no sockets).

HOLDER, DEAD = "10.0.0.2:7780", "10.0.0.1:7780"
INFO = AgentInfo(pod=TARGET, agent_id="agent-1")


def _record(session_id: str, **fields: Any) -> SessionRecord:
    values: dict[str, Any] = dict(owner="alice", upstream_kind="agent", namespace=NS, pod=POD,
                                  tty=True, cols=100, rows=30, state="detached", holder=DEAD,
                                  resume_token_hash=hash_resume_token("tok"),
                                  writer_acked=1000, out_offset=1200, in_offset=7)
    values.update(fields)
    return SessionRecord(id=session_id, **values)


def _announced(stream_id: int, session: str | None, *, known: bool = False,
               out_start: int = 0, out_offset: int = 1500, in_acked: int = 9
               ) -> AnnouncedStream:
    return AnnouncedStream(stream_id, 4096, out_start, out_offset, in_acked, session, known)


@pytest.fixture
async def coordinator(nursery: trio.Nursery) -> AgentCoordinator:
    store = MemoryStore()
    await nursery.start(store.run)
    registry = SessionRegistry({"agent": AgentUpstream()}, default_upstream="agent",
                               counters=GatewayCounters(),
                               limits=SessionLimits(ring_bytes=64 * 1024, window_bytes=16384))
    return AgentCoordinator(registry.upstreams["agent"], store,  # type: ignore[arg-type]
                            registry, holder=lambda: HOLDER, lease_ttl_s=30.0)


async def test_adoption_claims_live_sessions_and_closes_the_rest(
        coordinator: AgentCoordinator) -> None:
    store = coordinator.store
    for record in (_record("s-live"), _record("s-late", writer_acked=10),
                   _record("s-ended", state="closed"), _record("s-other", pod="web-2"),
                   _record("s-local", upstream_kind="local")):
        await store.put_session(record)
    verdict = await coordinator.connected(INFO, [
        _announced(1, "s-live"),
        _announced(2, "s-late", out_start=300),  # the agent's ring lost bytes 10..300
        _announced(3, "s-ended"), _announced(4, "s-other"), _announced(5, "s-local"),
        _announced(6, "s-unknown"), _announced(7, None)])
    assert verdict.stale is None
    assert sorted(verdict.claims) == [1, 2]
    live = verdict.claims[1]
    # From what the client had acknowledged; input from what the agent received.
    assert (live.out_from, live.in_offset, live.catch_up_to) == (1000, 9, 1500)
    assert (live.spec.cols, live.spec.rows, live.spec.tty) == (100, 30, True)
    assert verdict.claims[2].out_from == 300  # the agent's oldest byte: the client gets a gap
    assert set(verdict.closes) == {3, 4, 5, 6, 7}
    assert "ended" in verdict.closes[3] and "unknown" in verdict.closes[6]
    stored = await store.get_session("s-live")
    assert stored is not None and stored.holder == HOLDER
    assert stored.version == live.record.version  # claimed by compare-and-set
    lease = await store.lookup_agent(TARGET)
    assert lease is not None and lease.holder == HOLDER
    # Until it is adopted (or given up), the session is "retry", never "not found".
    with pytest.raises(Unavailable):
        coordinator.registry.get("s-live")
    coordinator.unclaimed(INFO, live)
    with pytest.raises(NotFoundError):
        coordinator.registry.get("s-live")


async def test_adoption_resumes_no_more_than_one_session_ring_back(
        coordinator: AgentCoordinator) -> None:
    await coordinator.store.put_session(_record("s-far", writer_acked=0))
    verdict = await coordinator.connected(INFO, [_announced(1, "s-far", out_offset=200_000)])
    assert verdict.claims[1].out_from == 200_000 - 64 * 1024


async def test_state_known_here_but_held_elsewhere_is_stale(
        coordinator: AgentCoordinator) -> None:
    await coordinator.store.put_session(_record("s-mine", holder=HOLDER))
    assert (await coordinator.connected(INFO, [_announced(1, "s-mine", known=True)])).stale \
        is None
    # The agent was at another peer meanwhile (its lease said so), which took it over.
    await coordinator.store.put_session(_record("s-mine", holder=DEAD))
    await coordinator.store.register_agent(AgentLease(INFO.agent_id, TARGET, DEAD), 30.0)
    verdict = await coordinator.connected(INFO, [_announced(1, "s-mine", known=True)])
    assert verdict.stale is not None and DEAD in verdict.stale


async def test_store_down_refuses_only_agents_that_need_it(
        coordinator: AgentCoordinator) -> None:
    await coordinator.store.aclose()
    # Streams we hold: the tunnel is served; the lease waits for the store.
    assert await coordinator.connected(INFO, [_announced(1, "s-x", known=True)]) \
        == ConnectVerdict()
    with pytest.raises(Unavailable, match="session store unavailable"):
        await coordinator.connected(INFO, [_announced(1, "s-x")])
    assert coordinator.statistics().lease_failures == 2


async def test_lease_is_retaken_renewed_and_released(coordinator: AgentCoordinator) -> None:
    store = coordinator.store
    await coordinator._check(INFO, True)  # none (expired, or the store lost it): taken
    lease = await store.lookup_agent(TARGET)
    assert lease is not None and (lease.holder, lease.agent_id) == (HOLDER, INFO.agent_id)
    await coordinator._check(INFO, True)
    await coordinator._check(INFO, False)  # the agent is away: the lease is only looked at
    stats = coordinator.statistics()
    assert (stats.leases_registered, stats.leases_renewed, stats.hand_overs) == (1, 1, 0)
    # Another agent process of the pod, at another peer: not ours to release.
    await store.register_agent(AgentLease("agent-2", TARGET, DEAD), 30.0)
    await coordinator.disconnected(INFO)
    assert (await store.lookup_agent(TARGET)) is not None
    await store.register_agent(AgentLease(INFO.agent_id, TARGET, HOLDER), 30.0)
    await coordinator.disconnected(INFO)
    assert (await store.lookup_agent(TARGET)) is None
    assert coordinator.statistics().leases_released == 1
