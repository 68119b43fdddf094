"""Peers: two gateways on one SQLite store; a session on A served through B (docs/ha.md).

Gateway A holds a local-upstream session; a client that reaches gateway B is
served through A over the signed peer link: byte-exact echo, resize and the
exit code pass through, REST reads and kills too, and A (the holder)
authorizes with the forwarded identity and audits the original client's
address.  The holder refuses a forged or stale peer signature with 401, a
request that would be forwarded a second time is refused (one hop), and a
holder that cannot be reached is answered 503 "unreachable; retry", which
the client's resume loop retries.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from podterm.audit import FanOutSink, JsonLinesFileSink, MemorySink
from podterm.audit.events import AuditEvent
from podterm.config import AuthConfig, ClusterConfig, StoreConfig, TLSConfig
from podterm.errors import CloseCode, HandshakeError
from podterm.gateway.peers import peer_signature
from podterm.net.certs import generate_dev_pki
from podterm.net.tls import client_context
from podterm.net.wsconn import connect
from podterm.protocol.session_proto import SUBPROTOCOL
from podterm.store import AgentLease, PodIdentity, SessionRecord, open_store, running

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 15.0
TOKEN = "peer-test-admin-token-0123456789"
SECRET = "3f1c0a9e8b7d6c5f4e3d2c1b0a998877"


class Trail:
    """A gateway's audit events, in memory (to wait on) and in its file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = JsonLinesFileSink(path)
        self.memory = MemorySink()
        self.sink = FanOutSink([self.file, self.memory])

    def of(self, type_: str, **details: Any) -> list[AuditEvent]:
        return [e for e in self.memory.of_type(type_)
                if all(e.details.get(k) == v for k, v in details.items())]


class Pair:
    """Gateways A and B on one store and one peer secret, each with its audit trail."""

    def __init__(self, a: GatewayUnderTest, b: GatewayUnderTest, trail_a: Trail,
                 trail_b: Trail, store_url: str) -> None:
        self.a, self.b = a, b
        self.trail_a, self.trail_b = trail_a, trail_b
        self.store_url = store_url


@pytest.fixture
async def pair(make_gateway: GatewayFactory, tmp_path: Path) -> Pair:
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET + "\n")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    gateways = []
    trails = []
    for name in ("a", "b"):
        trail = Trail(tmp_path / f"audit-{name}.log")
        trails.append(trail)
        gateways.append(await make_gateway(
            store=StoreConfig(url=url), auth=AuthConfig(admin_token=TOKEN),
            cluster=ClusterConfig(peer_secret_file=str(secret)),
            options={"audit_sink": trail.sink}))
    return Pair(gateways[0], gateways[1], trails[0], trails[1], url)


def signed_headers(method: str, target: str, *, secret: str = SECRET,
                   user: str = "admin", groups: str = "podterm%3Aadmins",
                   client: str = "203.0.113.9:41000; via=socket",
                   at: float | None = None) -> list[tuple[str, str]]:
    """The X-Podterm-Peer-* headers a forwarding peer would send."""
    when = f"{time.time() if at is None else at:.3f}"
    auth = peer_signature(secret.encode(), method, target, user, groups, client, when, "1")
    return [("X-Podterm-Peer-User", user), ("X-Podterm-Peer-Groups", groups),
            ("X-Podterm-Peer-Client-Addr", client), ("X-Podterm-Peer-Time", when),
            ("X-Podterm-Peer-Hops", "1"), ("X-Podterm-Peer-Auth", auth)]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def put_record(store_url: str, session_id: str, holder: str) -> None:
    async with running(open_store(store_url)) as store:
        await store.put_session(SessionRecord(id=session_id, owner="admin", holder=holder,
                                              state="running"))


async def test_a_session_on_a_is_attached_through_b_byte_exact(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert a.gw.peer_address == f"127.0.0.1:{a.port}"
    data = os.urandom(48 * 1024) + bytes(range(256))
    with trio.fail_after(WAIT_S):
        created = await a.create(["sh", "-c", "cat; exit 7"], tty=False)
        sid = created["id"]
        assert sid not in {s.id for s in b.registry.sessions()}
        client = await b.attach(sid)
        hello = await client.wait_hello()
        assert hello.session == sid
        for pos in range(0, len(data), 16384):
            await client.send_stdin(data[pos:pos + 16384])
        await client.wait_for(lambda c: len(c.output) >= len(data))
        assert bytes(client.output) == data
        await client.send(client.codec.stdin_eof(len(data)))
        assert await client.wait_closed() == CloseCode.NORMAL
        assert client.exit is not None and client.exit.code == 7
        await pair.trail_a.memory.wait_for("session.end")
    forward = pair.trail_b.of("peer.forward", holder=a.gw.peer_address)
    assert [(e.outcome, e.details["http_status"], e.target.session) for e in forward] == \
        [("success", 101, sid)]
    # The holder audits the original client's address, not the forwarder's.
    attach = pair.trail_a.of("session.attach")
    assert len(attach) == 1 and attach[0].source_addr == forward[0].source_addr
    assert attach[0].actor_user == "admin"
    peer_auth = pair.trail_a.of("auth.success", method="peer")
    assert [e.source_addr for e in peer_auth] == [forward[0].source_addr]


async def test_the_session_list_on_b_shows_the_sessions_a_runs(pair: Pair) -> None:
    a, b = pair.a, pair.b
    with trio.fail_after(WAIT_S):
        on_a = (await a.create(["sleep", "600"], tty=False))["id"]
        on_b = (await b.create(["sleep", "600"], tty=False))["id"]
        listed = await b.rest("GET", "/api/v1/sessions")
        assert listed.status == 200, listed.body
        by_id = {item["id"]: item for item in listed.json["items"]}
        assert set(by_id) == {on_a, on_b}
        assert by_id[on_a]["holder"] == a.gw.peer_address  # from the store
        assert "holder" not in by_id[on_b]  # B's own, from its registry
        assert by_id[on_a]["command"] == ["sleep", "600"]
        assert "incomplete" not in listed.json
        # Ended sessions leave the list: A's record turns into a tombstone.
        assert (await b.rest("DELETE", f"/api/v1/sessions/{on_a}")).status == 200
        listed = await b.rest("GET", "/api/v1/sessions")
        assert [item["id"] for item in listed.json["items"]] == [on_b]
        assert (await b.rest("DELETE", f"/api/v1/sessions/{on_b}")).status == 200


async def test_resize_and_exit_code_pass_through(pair: Pair) -> None:
    a, b = pair.a, pair.b
    with trio.fail_after(WAIT_S):
        created = await a.create(["sh", "-c", "read x; stty size; exit 3"], tty=True,
                                 size={"cols": 80, "rows": 24})
        client = await b.attach(created["id"])
        await client.wait_hello()
        await client.send_resize(123, 45)
        await client.send_stdin(b"go\n")
        await client.wait_output(b"45 123")
        assert await client.wait_closed() == CloseCode.NORMAL
        assert client.exit is not None and client.exit.code == 3


async def test_rest_reads_and_kills_through_b_and_the_holder_authorizes(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET)
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{TOKEN},admin,u0,"podterm:admins"\nalice-token-0123456789,alice,u1,\n')
    url = f"sqlite:///{tmp_path / 'store.db'}"
    trail_a = Trail(tmp_path / "audit-a.log")
    common: dict[str, Any] = {"store": StoreConfig(url=url),
                              "auth": AuthConfig(token_file=str(tokens)),
                              "cluster": ClusterConfig(peer_secret_file=str(secret))}
    a = await make_gateway(options={"audit_sink": trail_a.sink}, **common)
    b = await make_gateway(**common)
    a.admin_token = b.admin_token = TOKEN
    with trio.fail_after(WAIT_S):
        sid = (await a.create(["sleep", "600"], tty=False))["id"]
        got = await b.rest("GET", f"/api/v1/sessions/{sid}")
        assert got.status == 200, got.body
        assert got.json["id"] == sid and got.json["state"] in ("running", "detached")
        assert got.headers["cache-control"] == "no-store"
        # alice authenticates at B; A, the holder, decides: no policy, so 403.
        denied = await b.rest("GET", f"/api/v1/sessions/{sid}", token="alice-token-0123456789")
        assert denied.status == 403, denied.body
        assert "alice" in denied.json["error"]["message"]
        deny = [e for e in trail_a.memory.of_type("authz.deny") if e.actor_user == "alice"]
        assert len(deny) == 1 and deny[0].target.session == sid
        killed = await b.rest("DELETE", f"/api/v1/sessions/{sid}")
        assert killed.status == 200, killed.body
        assert killed.json["state"] == "closed"
        assert (await a.rest("GET", f"/api/v1/sessions/{sid}")).status == 410


async def test_the_holder_refuses_a_bad_or_stale_signature_with_401(pair: Pair) -> None:
    a = pair.a
    target = "/api/v1/sessions"
    with trio.fail_after(WAIT_S):
        good = await a.rest("GET", target, token=None, headers=signed_headers("GET", target))
        assert good.status == 200, good.body  # the same request, rightly signed
        forged = await a.rest("GET", target, token=None,
                              headers=signed_headers("GET", target, secret="not-the-secret-at-all"))
        stale = await a.rest("GET", target, token=None,
                             headers=signed_headers("GET", target, at=time.time() - 61))
        other = await a.rest("GET", target + "?all=1", token=None,
                             headers=signed_headers("GET", target))  # signed for another target
        unsigned = await a.rest("GET", target, token=None,
                                headers=signed_headers("GET", target)[:-1])
        for answer in (forged, stale, other, unsigned):
            assert answer.status == 401, answer.body
            assert answer.json["error"]["code"] == "unauthenticated"
        assert "does not verify" in forged.json["error"]["message"]
        assert "30 s" in stale.json["error"]["message"]
        await pair.trail_a.memory.wait_for("auth.failure")
    failures = pair.trail_a.of("auth.failure", method="peer")
    assert [e.details["reason"].split()[0] for e in failures] == ["peer"] * 4
    # A refused signature never passes for the claimed client: the socket peer is audited.
    assert all(e.source_addr and e.source_addr.startswith("127.0.0.1:") for e in failures)
    assert [e.source_addr for e in pair.trail_a.of("auth.success", method="peer")] == \
        ["203.0.113.9:41000"]


async def test_a_request_forwarded_once_is_never_forwarded_again(pair: Pair) -> None:
    a, b = pair.a, pair.b
    sid = "s-loop00000001"
    await put_record(pair.store_url, sid, holder=a.gw.peer_address)
    target = f"/api/v1/sessions/{sid}"
    with trio.fail_after(WAIT_S):
        # As if a peer had forwarded it to B while the store names A: B refuses.
        looped = await b.rest("GET", target, token=None, headers=signed_headers("GET", target))
        assert looped.status == 503, looped.body
        assert looped.json["error"]["code"] == "unavailable"
        assert "forwarded here by a peer already" in looped.json["error"]["message"]
        assert pair.trail_b.of("peer.forward", reason="forwarding loop refused")
        # From a client: B forwards to A once; A, named holder itself, answers.
        direct = await b.rest("GET", target)
        assert direct.status == 404, direct.body
    assert [e.outcome for e in pair.trail_b.of("peer.forward", holder=a.gw.peer_address)] == \
        ["rejected", "success"]


async def test_an_unreachable_holder_is_503_retry(pair: Pair) -> None:
    b = pair.b
    holder = f"127.0.0.1:{closed_port()}"
    sid = "s-gone00000001"
    await put_record(pair.store_url, sid, holder=holder)
    with trio.fail_after(WAIT_S):
        answer = await b.rest("GET", f"/api/v1/sessions/{sid}")
        assert answer.status == 503, answer.body
        assert answer.json["error"] == {
            "code": "unavailable", "message": f"session held by {holder}, unreachable; retry"}
        with pytest.raises(HandshakeError) as refused:
            await b.attach(sid)
        assert refused.value.http_status == 503
        assert "unreachable; retry" in refused.value.message
    errors = pair.trail_b.of("peer.forward", holder=holder)
    assert [(e.outcome, e.details["http_status"]) for e in errors] == [("error", 503)] * 2


async def test_without_a_peer_secret_the_answer_names_the_holder(
        pair: Pair, make_gateway: GatewayFactory) -> None:
    a = pair.a
    lone = await make_gateway(store=StoreConfig(url=pair.store_url),
                              auth=AuthConfig(admin_token=TOKEN))
    with trio.fail_after(WAIT_S):
        sid = (await a.create(["sleep", "600"], tty=False))["id"]
        answer = await lone.rest("GET", f"/api/v1/sessions/{sid}")
        assert answer.status == 503, answer.body
        message = answer.json["error"]["message"]
        assert a.gw.peer_address in message and "not configured" in message
        # Nor does it take peer requests: a signed one is 401.
        target = f"/api/v1/sessions/{sid}"
        signed = await lone.rest("GET", target, token=None,
                                 headers=signed_headers("GET", target))
        assert signed.status == 401
        await a.rest("DELETE", f"/api/v1/sessions/{sid}")


async def test_a_create_for_an_agent_pod_goes_to_the_lease_holder(pair: Pair) -> None:
    a, b = pair.a, pair.b
    pod = PodIdentity("team", "web-0")
    async with running(open_store(pair.store_url)) as store:
        await store.register_agent(AgentLease("agent-1", pod, holder=a.gw.peer_address), 60.0)
    body = {"command": ["true"], "upstream": "agent", "namespace": "team", "pod": "web-0"}
    with trio.fail_after(WAIT_S):
        direct = await a.rest("POST", "/api/v1/sessions", body)
        through = await b.rest("POST", "/api/v1/sessions", body)
    # A holds the lease (no tunnel here, so it refuses): B relays A's own answer.
    assert (through.status, through.json["error"]) == (direct.status, direct.json["error"])
    forwards = pair.trail_b.of("peer.forward", holder=a.gw.peer_address)
    assert [(e.outcome, e.details["method"], e.target.pod) for e in forwards] == \
        [("success", "POST", None)]
    assert pair.trail_a.of("session.create")  # A tried it, twice
    assert not pair.trail_b.of("session.create")


async def test_peer_metrics_need_the_signature(pair: Pair) -> None:
    a = pair.a
    target = "/api/v1/peer/metrics"
    with trio.fail_after(WAIT_S):
        refused = await a.rest("GET", target, token=None)
        assert refused.status == 401
        user = "system%3Apodterm%3Apeer"
        ok = await a.rest("GET", target, token=None,
                          headers=signed_headers("GET", target, user=user, groups=""))
        assert ok.status == 200, ok.body
    names = {family["name"] for family in json.loads(ok.body)}
    assert {"podterm_sessions", "podterm_peer_forwards_total"} <= names
    metrics = await pair.b.rest("GET", "/metrics", token=None)
    assert b'podterm_peer_forwards_total{outcome="success"}' in metrics.body


@pytest.mark.parametrize("same_pki", [True, False], ids=["shared-cert", "foreign-cert"])
async def test_the_peer_link_is_tls_when_the_gateways_serve_tls(
        make_gateway: GatewayFactory, tmp_path: Path, same_pki: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """B verifies A's certificate against its own --tls-cert chain: a stranger's is refused."""
    from conftest import ProtoClient

    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    pki_b = generate_dev_pki(tmp_path / "pki-b")
    pki_a = pki_b if same_pki else generate_dev_pki(tmp_path / "pki-a")
    gateways = []
    for pki in (pki_a, pki_b):
        gateways.append(await make_gateway(
            store=StoreConfig(url=url), auth=AuthConfig(admin_token=TOKEN),
            cluster=ClusterConfig(peer_secret_file=str(secret)),
            tls=TLSConfig(cert_file=str(pki.server_cert), key_file=str(pki.server_key))))
    a, b = gateways
    ctx_a, ctx_b = client_context(pki_a.ca_cert), client_context(pki_b.ca_cert)
    with trio.fail_after(WAIT_S):
        # Create on A over HTTPS (a WebSocket-less REST call through wss's TLS stack).
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", a.port, ssl_context=ctx_a,
                                                     https_compatible=True)
        body = json.dumps({"command": ["cat"], "tty": False}).encode()
        async with stream:
            await stream.send_all(
                b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Type: "
                b"application/json\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\n\r\n" + body)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
        sid = json.loads(answer.split(b"\r\n\r\n", 1)[1])["id"]
        attach = f"wss://127.0.0.1:{b.port}/api/v1/sessions/{sid}/attach"
        if not same_pki:
            with pytest.raises(HandshakeError) as refused:
                await connect(attach, subprotocols=[SUBPROTOCOL], ssl_context=ctx_b,
                              headers=[("Authorization", f"Bearer {TOKEN}")])
            assert refused.value.http_status == 503
            assert "certificate verify failed" in caplog.text
            return
        ws, _ = await connect(attach, subprotocols=[SUBPROTOCOL], ssl_context=ctx_b,
                              headers=[("Authorization", f"Bearer {TOKEN}")])
        client = ProtoClient(ws)
        await client.wait_hello()
        await client.send_stdin(b"over tls\n")
        await client.wait_output(b"over tls\n")
        await client.send(client.codec.stdin_eof(9))
        assert await client.wait_closed() == CloseCode.NORMAL
        assert client.exit is not None and client.exit.code == 0


# ------------------------------------------------------------- pure parts


@pytest.mark.parametrize("part", range(7))
async def test_the_signature_covers_every_signed_part(part: int) -> None:
    parts = ["GET", "/api/v1/sessions/s-1/attach?offset=0", "alice", "dev,ops",
             "203.0.113.9:41000; via=socket", "1700000000.000", "1"]
    base = peer_signature(b"k" * 32, *parts)
    changed = list(parts)
    changed[part] += "x"
    assert peer_signature(b"k" * 32, *changed) != base
    assert peer_signature(b"K" * 32, *parts) != base


async def test_client_addresses_round_trip_through_the_header() -> None:
    from podterm.gateway.peers import _parse_client
    from podterm.net.clientaddr import ClientAddress, Via

    for client in (ClientAddress("203.0.113.9", 41000, Via.PROXY_PROTOCOL),
                   ClientAddress("2001:db8::7", 443, Via.SOCKET),
                   ClientAddress("10.0.0.1", None, Via.X_FORWARDED_FOR)):
        assert _parse_client(f"{client}; via={client.via.value}") == client
    assert _parse_client("not-an-address; via=socket") is None
    assert _parse_client("10.0.0.1:80; via=carrier-pigeon") is None


async def test_worker_series_merge_into_one_family_per_name() -> None:
    from podterm.gateway.peers import merge_families, relabel
    from podterm.metrics import counter, labelled, render

    def worker(n: int) -> list[Any]:
        return [labelled("podterm_sessions", "gauge", "Live sessions by state.", "state",
                         {"running": n}),
                counter("podterm_resumes_total", "Resumes.", n * 10)]

    merged = merge_families([relabel(worker(1), "worker", "0"),
                             relabel(worker(2), "worker", "1")])
    text = render(merged)
    assert text.count("# TYPE podterm_sessions gauge") == 1
    assert 'podterm_sessions{state="running",worker="0"} 1' in text
    assert 'podterm_sessions{state="running",worker="1"} 2' in text
    assert 'podterm_resumes_total{worker="1"} 20' in text
