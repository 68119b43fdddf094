"""Browser origins and per-user / per-address caps, against a real gateway.

* Origin (CSWSH, RFC 6455 §10.2): a WebSocket upgrade from a foreign page is
  refused with 403 before authentication, for podterm.v1 attach and for the
  kubectl exec endpoint, and audited as ``protocol.reject`` naming the
  origin; no Origin, the gateway's own origin and a listed origin (or glob)
  pass.
* ``max-sessions-per-user``: the user over it gets 429 and a
  ``session.create`` event with outcome ``rejected``; another user is not
  affected.
* ``max-connections-per-ip``: the address over it gets 429 with
  ``Retry-After`` before any of its request is read, and a ``protocol.reject``
  event; another address is not affected.

Client addresses other than 127.0.0.1 are other loopback addresses (bound
with ``local_address``), so the gateway sees distinct clients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
import trio
import trio.testing
from tests.helpers.http import exchange

from podterm.audit import AuditEvent, MemorySink
from podterm.config import AuthConfig, LimitsConfig, SecurityConfig
from podterm.errors import HandshakeError
from podterm.net.wsconn import connect
from podterm.protocol.session_proto import SUBPROTOCOL

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789"
UPGRADE_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                   ("Sec-WebSocket-Version", "13"),
                   ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                   ("Sec-WebSocket-Protocol", "v5.channel.k8s.io")]


async def http_from(source: str, port: int, method: str, path: str, *,
                    token: str | None = None, body: Any = None,
                    headers: list[tuple[str, str]] | None = None
                    ) -> tuple[int, dict[str, str], bytes]:
    """One request from loopback address ``source``: status, lower-case headers, body."""
    hdrs = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *(headers or [])]
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    data = json.dumps(body).encode() if body is not None else None
    if data:
        hdrs.append(("Content-Type", "application/json"))
    async with await trio.open_tcp_stream("127.0.0.1", port, local_address=source) as stream:
        answer = await exchange(stream, method, path, headers=hdrs, body=data)
    return answer.status, answer.headers, answer.body


def rejects(memory: MemorySink) -> list[AuditEvent]:
    return [e for e in memory.events if e.type == "protocol.reject"]


# ------------------------------------------------------------------ Origin

async def _attach_with_origin(gw: GatewayUnderTest, session_id: str,
                              origin: str | None) -> None:
    headers = [("Authorization", f"Bearer {gw.admin_token}")]
    if origin is not None:
        headers.append(("Origin", origin))
    ws, chosen = await connect(
        f"ws://127.0.0.1:{gw.port}/api/v1/sessions/{session_id}/attach?mode=ro",
        subprotocols=[SUBPROTOCOL], headers=headers)
    assert chosen == SUBPROTOCOL
    await ws.aclose()


async def test_cross_origin_upgrades_are_refused_and_audited(
        make_gateway: GatewayFactory) -> None:
    memory = MemorySink()
    gw = await make_gateway(options={"audit_sink": memory}, security=SecurityConfig(
        allowed_origins=("https://console.example.com", "https://*.corp.example")))
    with trio.fail_after(WAIT_S):
        created = await gw.create(["cat"])
        own = f"http://127.0.0.1:{gw.port}"
        # Accepted: no Origin (kubectl, the CLI), our own, a listed one, a glob.
        for origin in (None, own, "https://console.example.com", "https://team.corp.example"):
            await _attach_with_origin(gw, created["id"], origin)
        assert rejects(memory) == []
        # Refused: a foreign page, before its credentials are even looked at.
        with pytest.raises(HandshakeError) as info:
            await _attach_with_origin(gw, created["id"], "https://evil.example")
        assert info.value.http_status == 403
        assert "'https://evil.example'" in info.value.message
        # The kubectl exec endpoint too, answered as a Kubernetes Status.
        path = f"/api/v1/namespaces/default/pods/local/exec?{urlencode({'command': 'id'})}"
        answer = await gw.rest("GET", path, headers=[*UPGRADE_HEADERS,
                                                     ("Origin", "http://127.0.0.1:1")])
        assert answer.status == 403
        assert (answer.json["kind"], answer.json["code"]) == ("Status", 403)
        # A plain REST request is not a WebSocket: CORS, not Origin, governs it.
        listed = await gw.rest("GET", "/api/v1/sessions", headers=[("Origin", "https://x.test")])
        assert listed.status == 200
        await gw.rest("DELETE", f"/api/v1/sessions/{created['id']}")
    refused = rejects(memory)
    assert [(e.details["http_status"], e.details["origin"], e.details["path"]) for e in refused] \
        == [(403, "https://evil.example", f"/api/v1/sessions/{created['id']}/attach"),
            (403, "http://127.0.0.1:1", "/api/v1/namespaces/default/pods/local/exec")]
    assert all(e.outcome == "rejected" and e.source_addr for e in refused)
    # Refused before authentication: no auth event carries their request ids.
    ids = {e.request_id for e in refused}
    assert not [e for e in memory.events if e.type.startswith("auth") and e.request_id in ids]
    assert gw.gw.counters.handshake_failures.get("forbidden") == 2


# ------------------------------------------------------------------ caps

async def test_the_per_user_session_cap_refuses_only_that_user(make_gateway: GatewayFactory,
                                                               tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ALICE},alice,u-a,"podterm:admins"\n{BOB},bob,u-b,"podterm:admins"\n')
    memory = MemorySink()
    gw = await make_gateway(auth=AuthConfig(token_file=str(tokens)),
                            limits=LimitsConfig(max_sessions_per_user=2),
                            options={"audit_sink": memory})
    with trio.fail_after(WAIT_S):
        for _ in range(2):
            assert (await gw.rest("POST", "/api/v1/sessions", {"command": ["cat"]},
                                  token=ALICE)).status == 201
        over = await gw.rest("POST", "/api/v1/sessions", {"command": ["cat"]}, token=ALICE)
        assert over.status == 429, over.body
        assert over.json["error"]["code"] == "rate_limited"
        assert "2 sessions" in over.json["error"]["message"]
        # Bob is not affected.
        assert (await gw.rest("POST", "/api/v1/sessions", {"command": ["cat"]},
                              token=BOB)).status == 201
        for session in list(gw.registry.sessions()):
            await gw.rest("DELETE", f"/api/v1/sessions/{session.id}", token=ALICE)
    creates = [e for e in memory.events if e.type == "session.create"]
    assert [(e.actor_user, e.outcome) for e in creates] == [
        ("alice", "success"), ("alice", "success"), ("alice", "rejected"), ("bob", "success")]
    assert creates[2].details["http_status"] == 429


async def test_the_per_address_connection_cap_answers_429(make_gateway: GatewayFactory) -> None:
    memory = MemorySink()
    gw = await make_gateway(limits=LimitsConfig(max_connections_per_ip=2),
                            options={"audit_sink": memory})
    held: list[trio.SocketStream] = []
    try:
        with trio.fail_after(WAIT_S):
            for _ in range(2):  # two idle connections: 127.0.0.5's whole budget
                held.append(await trio.open_tcp_stream("127.0.0.1", gw.port,
                                                       local_address="127.0.0.5"))
            while gw.gw.clients.held("127.0.0.5") < 2:
                await trio.testing.wait_all_tasks_blocked()
            status, headers, body = await http_from("127.0.0.5", gw.port, "GET", "/healthz")
            assert status == 429
            assert headers["retry-after"] == "1"
            error = json.loads(body)["error"]
            assert error["code"] == "rate_limited"
            assert "too many connections from 127.0.0.5" in error["message"]
            # Another address is served while 127.0.0.5 is at its cap.
            assert (await http_from("127.0.0.6", gw.port, "GET", "/healthz"))[0] == 200
            # The event follows the closed socket (a full audit buffer must
            # never hold the descriptor the cap protects).
            while not rejects(memory):
                await trio.testing.wait_all_tasks_blocked()
    finally:
        for stream in held:
            await stream.aclose()
    (event,) = rejects(memory)
    assert event.source_addr is not None and event.source_addr.startswith("127.0.0.5")
    assert (event.details["http_status"], event.outcome) == (429, "rejected")
    assert gw.gw.clients.statistics().refused_per_ip == 1
