"""After adoption: recording, audit, recovery answers and kubectl through a peer (issue 5).

Two gateways share a SQLite store (and, where it matters, a recordings
directory and a peer secret); a real :class:`Agent` runs the shells:

* an agent session adopted by gateway B keeps being recorded, in
  ``<id>.part2.cast`` (header, a marker naming the output offset it continues
  at, the output from there on), and ``podterm replay`` plays both parts as
  the one transcript the client saw;
* B audits the takeover (``session.adopt``: previous holder, new holder,
  offsets) and the session's later attach, detach and end (exit code, bytes);
* a record that names this gateway but is not live here (a restart at the same
  address before the agent came back) is ``503`` "being recovered; retry", for
  the REST GET and the attach alike, until the grace period has passed;
* ``kubectl exec`` through B to a pod whose agent is connected to A runs on A
  (forwarded over the peer link): ``echo hi`` prints hi, exit codes pass.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from tests.helpers.kubectl import Kubectl, kubectl_binary
from tests.helpers.proxylb import open_proxy_lb

from podterm.agent.main import Agent, AgentOptions
from podterm.audit import MemorySink
from podterm.audit.events import REGISTRY
from podterm.config import (
    AgentConfig,
    AuthConfig,
    ClusterConfig,
    RecordingConfig,
    StoreConfig,
    TLSConfig,
)
from podterm.errors import HandshakeError
from podterm.net.certs import generate_dev_pki
from podterm.recording.asciicast import parse_event, parse_header
from podterm.recording.replay import play_parts
from podterm.recording.writer import recording_parts
from podterm.session.session import SessionLimits
from podterm.store import PodIdentity, SessionRecord, open_store, running
from podterm.upstream.agent import AgentUpstream

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 20.0
NS, POD = "team-a", "web-1"
TARGET = PodIdentity(NS, POD)
HEARTBEAT_S = 0.2
FAST = AgentOptions(heartbeat_interval_s=HEARTBEAT_S, backoff_base_s=0.05, backoff_cap_s=0.2,
                    breaker_threshold=50, breaker_cooldown_s=0.2, connect_timeout_s=5.0,
                    exit_drain_s=0.5, kill_grace_s=0.5)
ADMIN_TOKEN = "adoption-admin-token-0123456789"
AGENT_TOKEN = "adoption-agent-token-0123456789"
SECRET = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
FIRST_INPUT = b"for i in 1 2 3 4 5; do echo pre-$i; done\r"
SECOND_INPUT = b"echo post-$((40+2))\r"
THIRD_INPUT = b"exit 3\r"


@dataclass
class Peer:
    gateway: GatewayUnderTest
    audit: MemorySink

    @property
    def agents(self) -> AgentUpstream:
        upstream = self.gateway.gw.agents
        assert isinstance(upstream, AgentUpstream)
        return upstream


@dataclass
class Setup:
    a: Peer
    b: Peer
    recordings: Path
    agent_token: Path
    store_url: str
    ca_file: Path | None = None  # set when the gateways serve TLS

    def agent_url(self, peer: Peer | int) -> str:
        port = peer if isinstance(peer, int) else peer.gateway.port
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{port}"


async def start_pair(make_gateway: GatewayFactory, tmp_path: Path, *,
                     tls: bool = False) -> Setup:
    """Gateways A and B: one SQLite store, one peer secret, one recordings directory."""
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f"{AGENT_TOKEN},agent,agent-uid,podterm:agents\n")
    agent_token = tmp_path / "agent.token"
    agent_token.write_text(AGENT_TOKEN + "\n")
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET + "\n")
    recordings = tmp_path / "rec"
    url = f"sqlite:///{tmp_path / 'store.db'}"
    pki = generate_dev_pki(tmp_path / "pki") if tls else None
    extra: dict[str, Any] = {}
    if pki is not None:
        extra["tls"] = TLSConfig(cert_file=str(pki.server_cert), key_file=str(pki.server_key))
    peers = []
    for _ in range(2):
        audit = MemorySink()
        gateway = await make_gateway(
            auth=AuthConfig(token_file=str(tokens), admin_token=ADMIN_TOKEN),
            store=StoreConfig(url=url), cluster=ClusterConfig(peer_secret_file=str(secret)),
            recording=RecordingConfig(dir=str(recordings)),
            session_limits=SessionLimits(exit_drain_s=0.5), options={"audit_sink": audit},
            **extra)
        upstream = gateway.gw.agents
        upstream.options = dataclasses.replace(upstream.options,
                                               heartbeat_interval_s=HEARTBEAT_S)
        coordinator = gateway.gw.agent_coordinator
        assert coordinator is not None
        coordinator.lease_ttl_s = 3.0  # renewed (and moves noticed) every second
        peers.append(Peer(gateway, audit))
    return Setup(peers[0], peers[1], recordings, agent_token, url,
                 pki.ca_cert if pki is not None else None)


@pytest.fixture
async def setup(make_gateway: GatewayFactory, tmp_path: Path) -> Setup:
    return await start_pair(make_gateway, tmp_path)


@asynccontextmanager
async def running_agent(url: str, token_file: Path,
                        ca_file: Path | None = None) -> AsyncIterator[Agent]:
    agent = Agent(AgentConfig(gateway=url, namespace=NS, pod=POD, token_file=str(token_file),
                              ca_file=str(ca_file) if ca_file else None), FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        try:
            yield agent
        finally:
            nursery.cancel_scope.cancel()


async def wait_until(predicate: Any, *, every_s: float = 0.01) -> None:
    """Poll a condition no event announces (the caller bounds the wait)."""
    while not predicate():
        await trio.sleep(every_s)


def cast_events(path: Path) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    lines = path.read_bytes().splitlines()
    header = parse_header(lines[0])
    events, last = [], 0.0
    for n, line in enumerate(lines[1:], start=2):
        event = parse_event(line, n, last)
        last = event.time
        events.append((event.code, event.data))
    return {"width": header.width, "height": header.height, "title": header.title}, events


def output_of(events: list[tuple[str, str]]) -> bytes:
    return "".join(data for code, data in events if code == "o").encode()


# ---------------------------------------------------------------- recording and audit


async def test_adopted_session_is_recorded_in_a_second_part_and_audited_there(
        setup: Setup) -> None:
    a, b = setup.a, setup.b
    async with open_proxy_lb([("127.0.0.1", a.gateway.port)]) as lb:
        async with running_agent(setup.agent_url(lb.port), setup.agent_token) as agent:
            with trio.fail_after(WAIT_S * 2):
                await agent.wait_registered()
                created = await a.gateway.create(None, tty=True, upstream="agent",
                                                 namespace=NS, pod=POD)
                sid = created["id"]
                client = await a.gateway.attach(sid)
                await client.wait_hello()
                await client.send_stdin(FIRST_INPUT)
                await client.wait_output(b"pre-5\r\n")
                # A's writer ACK reaches the store (the adoption's resume point;
                # the mirror writes it at most about a second late).
                store = a.gateway.gw.store
                acked = client.offset  # more output (a prompt) may still follow it
                while (record := await store.get_session(sid)) is None \
                        or record.writer_acked < acked:
                    await trio.sleep(0.05)
                lb.set_backends([("127.0.0.1", b.gateway.port)])
                lb.cut_all()
                adopt = (await b.audit.wait_for("session.adopt"))[0]
                assert await client.wait_closed() == 1001  # A handed it over
                await wait_until(lambda: b.gateway.registry.is_live(sid))
                assert client.hello is not None
                again = await b.gateway.attach(sid, offset=client.offset,
                                               resume_token=client.hello.resume_token)
                hello = await again.wait_hello()
                assert hello.out_offset == client.offset and again.gaps == []
                await again.send_stdin(SECOND_INPUT)
                await again.wait_output(b"post-42")
                await again.send_detach()
                await again.wait_closed()
                await b.audit.wait_for("session.detach")
                assert again.hello is not None
                third = await b.gateway.attach(sid, offset=again.offset,
                                               resume_token=again.hello.resume_token)
                await third.wait_hello()
                await third.send_stdin(THIRD_INPUT)
                assert await third.wait_closed() == 1000
                end = (await b.audit.wait_for("session.end"))[0]
                await b.gateway.gw.recordings.wait_flushed()
    # The takeover, by B, naming A.
    assert REGISTRY["session.adopt"].code == "PT2006"
    assert adopt.target.session == sid and adopt.target.pod == POD
    assert adopt.actor_user == "admin"  # the owner: no request behind an adoption
    assert adopt.details["previous_holder"] == a.gateway.gw.peer_address
    assert adopt.details["holder"] == b.gateway.gw.peer_address
    # B resumes output where the store says A's client had ACKed: at least what
    # the test waited for, never beyond what the client had (it ACKs only that).
    assert acked <= adopt.details["out_offset"] <= client.offset
    assert adopt.details["in_offset"] == len(FIRST_INPUT)  # what the shell had received
    assert adopt.details["upstream"] == "agent"
    part2 = setup.recordings / f"{sid}.part2.cast"
    assert adopt.details["recording"] == str(part2)
    assert not a.audit.of_type("session.adopt")
    assert not b.audit.of_type("session.create")  # created once, by A
    # Its later events are B's: the resume, the detach, the end with code and bytes.
    resumes = [e for e in b.audit.of_type("session.resume") if e.target.session == sid]
    assert [(e.outcome, e.details["offset"]) for e in resumes] == [
        ("success", client.offset), ("success", again.offset)]
    detaches = [e for e in b.audit.of_type("session.detach") if e.target.session == sid]
    assert [(e.actor_user, e.details["mode"]) for e in detaches] == [("admin", "rw")]
    transcript = bytes(client.output) + bytes(again.output) + bytes(third.output)
    assert end.target.session == sid and end.details["exit_code"] == 3
    assert end.details["reason"] == "exited"
    assert end.details["bytes_out"] == len(transcript)
    # Input the agent confirmed, counted from 0 (the adoption started at in_offset):
    # the shell may exit before the agent's ACK of "exit 3" is sent.
    assert len(FIRST_INPUT + SECOND_INPUT) <= end.details["bytes_in"] \
        <= len(FIRST_INPUT + SECOND_INPUT + THIRD_INPUT)
    assert end.details["recording"] == str(part2)
    # The recording: part 1 by A, part 2 by B from the adoption offset on.
    first = setup.recordings / f"{sid}.cast"
    assert recording_parts(first) == [first, part2]
    _, events1 = cast_events(first)
    header2, events2 = cast_events(part2)
    assert header2["width"] == 80 and header2["title"] == f"admin@{NS}/{POD}"
    offset = adopt.details["out_offset"]
    assert events2[0] == ("m", f"podterm: continued at output offset {offset} "
                               f"(adopted from {a.gateway.gw.peer_address})")
    recorded1, recorded2 = output_of(events1), output_of(events2)
    assert transcript.startswith(recorded1) and len(recorded1) >= offset
    assert recorded2 == transcript[offset:]
    assert b"post-42" in recorded2 and b"pre-5" in recorded1
    # podterm replay plays both parts as one transcript, every byte once.
    played: list[bytes] = []

    async def collect(data: bytes) -> None:
        played.append(data)

    headers = await play_parts(first, speed=1000.0, idle_limit_s=0.01, write=collect)
    assert len(headers) == 2
    assert b"".join(played) == transcript


# ------------------------------------------------------------------ recovery answers


async def put_record(store_url: str, record: SessionRecord) -> None:
    async with running(open_store(store_url)) as store:
        await store.put_session(record)


async def test_a_self_held_agent_record_not_live_is_503_being_recovered(setup: Setup) -> None:
    gw = setup.a.gateway
    address = gw.gw.peer_address
    await put_record(setup.store_url, SessionRecord(
        id="s-0123456789ab", owner="admin", upstream_kind="agent", namespace=NS, pod=POD,
        state="detached", holder=address))
    await put_record(setup.store_url, SessionRecord(
        id="s-0123456789ac", owner="admin", upstream_kind="local", state="running",
        holder=address))
    with trio.fail_after(WAIT_S):
        answer = await gw.rest("GET", "/api/v1/sessions/s-0123456789ab")
        assert answer.status == 503, answer.body
        assert answer.json["error"] == {
            "code": "unavailable", "message": "session s-0123456789ab is being recovered; retry"}
        with pytest.raises(HandshakeError) as refused:
            await gw.connect_ws("s-0123456789ab")
        assert refused.value.http_status == 503
        assert "being recovered; retry" in refused.value.message
        # The same as a session the coordinator awaits (registry.expect), REST and attach.
        gw.registry.expect("s-0123456789ad")
        try:
            answer = await gw.rest("GET", "/api/v1/sessions/s-0123456789ad")
            assert (answer.status, answer.json["error"]["code"]) == (503, "unavailable")
            with pytest.raises(HandshakeError) as refused:
                await gw.connect_ws("s-0123456789ad")
            assert refused.value.http_status == 503
        finally:
            gw.registry.unexpect("s-0123456789ad")
        # A local session died with the process: nothing to recover.
        assert (await gw.rest("GET", "/api/v1/sessions/s-0123456789ac")).status == 404
        # Once the grace period has passed, the record is over: 404.
        gw.gw.peers.recovery_grace_s = 0.0
        assert (await gw.rest("GET", "/api/v1/sessions/s-0123456789ab")).status == 404


# ------------------------------------------------------------------- kubectl via B


async def test_kubectl_exec_through_a_non_holder_runs_on_the_agents_gateway(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    # TLS: kubectl sends no bearer token over plain HTTP.
    setup = await start_pair(make_gateway, tmp_path, tls=True)
    a, b = setup.a, setup.b
    assert setup.ca_file is not None
    binary = kubectl_binary("1.32")
    kc = Kubectl(tmp_path / "kubectl", server_url=setup.agent_url(b),
                 ca_pem=setup.ca_file.read_bytes(), token=ADMIN_TOKEN, namespace=NS,
                 binary=binary)
    async with running_agent(setup.agent_url(a), setup.agent_token, setup.ca_file) as agent:
        with trio.fail_after(WAIT_S * 2):
            await agent.wait_registered()
            await wait_until(lambda: a.agents.is_connected(TARGET))
            lease = await a.gateway.gw.store.lookup_agent(TARGET)
            assert lease is not None and lease.holder == a.gateway.gw.peer_address
            hi = await trio.to_thread.run_sync(lambda: kc.run("exec", POD, "--", "echo", "hi"))
            assert (hi.returncode, hi.stdout) == (0, b"hi\n"), str(hi)
            code = await trio.to_thread.run_sync(
                lambda: kc.run("exec", POD, "--", "sh", "-c", "echo out; exit 7"))
            assert (code.returncode, code.stdout) == (7, b"out\n"), str(code)
            pod = await trio.to_thread.run_sync(lambda: kc.run("get", "pod", POD, "-o", "json"))
            assert pod.returncode == 0, str(pod)
            assert json.loads(pod.stdout)["metadata"]["annotations"][
                "podterm.dev/upstream"] == "agent"
    # A ran them on its agent (as sessions of the agent upstream); B forwarded.
    creates = a.audit.of_type("session.create")
    assert [(e.details["upstream"], e.details["command"]) for e in creates] == [
        ("agent", ["echo", "hi"]), ("agent", ["sh", "-c", "echo out; exit 7"])]
    ends = sorted(e.details["exit_code"] for e in a.audit.of_type("session.end"))
    assert ends == [0, 7]
    assert not b.audit.of_type("session.create")
    forwards = [e for e in b.audit.of_type("peer.forward")
                if re.fullmatch(rf"/api/v1/namespaces/{NS}/pods/{POD}(/exec)?", e.details["path"])]
    assert {e.details["path"].rsplit("/", 1)[-1] for e in forwards} == {"exec", POD}
    assert all(e.outcome == "success" and e.details["holder"] == a.gateway.gw.peer_address
               for e in forwards)
