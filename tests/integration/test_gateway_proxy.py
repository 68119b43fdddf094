"""The real client address behind load balancers: PROXY protocol and trusted X-Forwarded-For.

A gateway with ``--proxy-protocol`` sits behind the test balancer
(``tests/helpers/proxylb.py``) sending PROXY v1 or v2; clients bind to other
loopback addresses (127.0.0.2, 127.0.0.3) so the balancer's socket peer
(127.0.0.1) and the real client differ.  What the gateway believes is read
from ``/metrics`` and from ``Request.client`` (recorded by wrapping the
gateway's router, the seam audit uses too).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from tests.helpers.http import exchange
from tests.helpers.proxylb import ProxyLB, open_proxy_lb

from conftest import GatewayUnderTest, ProtoClient
from podterm.config import LimitsConfig, ListenConfig, ServeConfig, SessionsConfig, TLSConfig
from podterm.gateway.server import Gateway, GatewayOptions, serve
from podterm.net.certs import generate_dev_pki
from podterm.net.clientaddr import ClientAddress, Via
from podterm.net.tls import client_context
from podterm.net.wsconn import client_handshake
from podterm.protocol.session_proto import SUBPROTOCOL

pytestmark = pytest.mark.trio

#: Every wait is bounded by this (seconds, real time).
WAIT_S = 10.0
#: "Quickly": a client that speaks HTTP to a PROXY listener is answered well within
#: the 10 s handshake timeout, because the parser fails on the first byte.
FAIL_FAST_S = 2.0

Starter = Callable[..., Awaitable[GatewayUnderTest]]


@pytest.fixture
async def start(nursery: trio.Nursery) -> AsyncIterator[Starter]:
    """Start gateways with a given listener config; each is drained at the end of the test."""
    started: list[GatewayUnderTest] = []

    async def factory(*, proxy_protocol: bool = True, trusted: tuple[str, ...] = (),
                      **config_fields: Any) -> GatewayUnderTest:
        config = ServeConfig(
            listen=ListenConfig(host="127.0.0.1", port=0, proxy_protocol=proxy_protocol,
                                trusted_proxies=trusted),
            sessions=SessionsConfig(drain_timeout_s=2.0), **config_fields)
        holder: list[GatewayUnderTest] = []

        async def run(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve(config, options=GatewayOptions(lag_probe_interval_s=0),
                            task_status=task_status)
            finally:
                if holder:
                    holder[0].finished.set()

        handle = GatewayUnderTest(await nursery.start(functools.partial(run)))
        holder.append(handle)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        if not handle.finished.is_set():
            handle.gw.shutdown("test over")
            with trio.fail_after(WAIT_S):
                await handle.finished.wait()
        assert len(handle.gw.registry) == 0


def record_clients(gateway: GatewayUnderTest) -> list[tuple[str, ClientAddress]]:
    """Wrap the gateway's router: every request's ``(path, request.client)`` from now on."""
    seen: list[tuple[str, ClientAddress]] = []
    router = gateway.gw.router

    async def recording(request: Any, stream: Any, conn: Any) -> Any:
        seen.append((request.path, request.client))
        return await router(request, stream, conn)

    gateway.gw.router = recording  # type: ignore[assignment]
    return seen


async def open_via(port: int, source: str) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from the loopback address ``source``."""
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def http(stream: trio.abc.Stream, method: str, path: str, *, token: str | None = None,
               body: Any = None, headers: list[tuple[str, str]] | None = None
               ) -> tuple[int, bytes]:
    """One HTTP/1.1 request on ``stream`` (closed afterwards); ``(status, body)``."""
    hdrs = [("Host", "gateway"), ("Connection", "close"), *(headers or [])]
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        hdrs.append(("Content-Type", "application/json"))
    async with stream:
        answer = await exchange(stream, method, path, headers=hdrs, body=data)
    return answer.status, answer.body


async def metrics_via(lb: ProxyLB, source: str) -> str:
    status, body = await http(await open_via(lb.port, source), "GET", "/metrics")
    assert status == 200
    return body.decode()


async def attach_via(stream: trio.abc.Stream, gateway: GatewayUnderTest,
                     session_id: str) -> ProtoClient:
    ws, chosen = await client_handshake(
        stream, "gateway", f"/api/v1/sessions/{session_id}/attach?offset=0&mode=rw",
        [SUBPROTOCOL], [("Authorization", f"Bearer {gateway.admin_token}")])
    assert chosen == SUBPROTOCOL
    return ProtoClient(ws)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_gives_the_real_client(start: Starter, version: str) -> None:
    gateway = await start(proxy_protocol=True)
    seen = record_clients(gateway)
    async with open_proxy_lb([("127.0.0.1", gateway.port)], send_proxy=version) as lb:
        with trio.fail_after(WAIT_S):
            # REST through the balancer.
            status, body = await http(await open_via(lb.port, "127.0.0.2"), "POST",
                                      "/api/v1/sessions", token=gateway.admin_token,
                                      body={"command": ["cat"]})
            assert status == 201, body
            session_id = json.loads(body)["id"]
            # Attach through the balancer, and keep it open while /metrics is read.
            client = await attach_via(await open_via(lb.port, "127.0.0.2"), gateway, session_id)
            await client.wait_hello()
            await client.send_stdin(b"through the balancer\n")
            await client.wait_output(b"through the balancer")
            await trio.testing.wait_all_tasks_blocked()  # the POST's connection is released
            text = await metrics_via(lb, "127.0.0.2")
            # Two live connections of 127.0.0.2: the attach and this scrape.
            assert 'podterm_client_connections{client_ip="127.0.0.2"} 2' in text
            assert 'client_ip="127.0.0.1"' not in text  # the balancer is not a client
            assert 'podterm_client_connections_total{via="proxy-protocol"} 3' in text
            await client.aclose()
            # The balancer's own health check (v2 LOCAL / v1 UNKNOWN) keeps its address.
            check = await lb.open_health_check(0)
            status, _ = await http(check, "GET", "/healthz")
            assert status == 200
    by_path = [(path, client) for path, client in seen]
    assert [c for p, c in by_path if p == "/api/v1/sessions"][0].ip == "127.0.0.2"
    attach = [c for p, c in by_path if p.endswith("/attach")][0]
    assert attach.ip == "127.0.0.2" and attach.via is Via.PROXY_PROTOCOL
    assert attach.port is not None and attach.port != lb.port
    health = [c for p, c in by_path if p == "/healthz"][0]
    assert health.ip == "127.0.0.1" and health.via is Via.SOCKET
    requests = gateway.gw.clients.statistics().requests_by_via
    assert requests == {"proxy-protocol": 3, "socket": 1}


async def test_spoofed_forwarded_for_is_ignored_trusted_hop_is_honoured(
        start: Starter) -> None:
    # The balancer (127.0.0.1) may send PROXY headers; 127.0.0.2 is an L7 proxy
    # behind it whose X-Forwarded-For is believed; 127.0.0.3 is a client.
    gateway = await start(proxy_protocol=True, trusted=("127.0.0.1/32", "127.0.0.2/32"))
    seen = record_clients(gateway)
    spoof = [("X-Forwarded-For", "203.0.113.9")]
    async with open_proxy_lb([("127.0.0.1", gateway.port)], send_proxy="v2") as lb:
        with trio.fail_after(WAIT_S):
            status, _ = await http(await open_via(lb.port, "127.0.0.3"), "GET", "/healthz",
                                   headers=spoof)
            assert status == 200
            status, _ = await http(await open_via(lb.port, "127.0.0.2"), "GET", "/readyz",
                                   headers=spoof)
            assert status == 200
    assert seen[0] == ("/healthz", ClientAddress("127.0.0.3", seen[0][1].port,
                                                 Via.PROXY_PROTOCOL))
    assert seen[1] == ("/readyz", ClientAddress("203.0.113.9", None, Via.X_FORWARDED_FOR))


async def test_forwarded_for_from_a_trusted_balancer(start: Starter) -> None:
    # No PROXY protocol: the balancer's hop is the socket peer 127.0.0.1, trusted;
    # a direct client at 127.0.0.2 is not, so its header is a spoof.
    gateway = await start(proxy_protocol=False, trusted=("127.0.0.1/32",))
    seen = record_clients(gateway)
    forwarded = [("X-Forwarded-For", "198.51.100.7, 127.0.0.1")]
    async with open_proxy_lb([("127.0.0.1", gateway.port)], send_proxy="none") as lb:
        with trio.fail_after(WAIT_S):
            status, _ = await http(await open_via(lb.port, "127.0.0.1"), "GET", "/healthz",
                                   headers=forwarded)
            assert status == 200
            status, _ = await http(await open_via(gateway.port, "127.0.0.2"), "GET",
                                   "/healthz", headers=forwarded)
            assert status == 200
    assert seen[0][1] == ClientAddress("198.51.100.7", None, Via.X_FORWARDED_FOR)
    assert seen[1][1].ip == "127.0.0.2" and seen[1][1].via is Via.SOCKET


async def test_per_address_cap_counts_the_real_client(start: Starter) -> None:
    # Everyone arrives from the balancer's 127.0.0.1: the cap must key on the
    # PROXY header's client, or one user would lock out all the others.
    gateway = await start(proxy_protocol=True, limits=LimitsConfig(max_connections_per_ip=1))
    async with open_proxy_lb([("127.0.0.1", gateway.port)], send_proxy="v1") as lb:
        with trio.fail_after(WAIT_S):
            status, body = await http(await open_via(lb.port, "127.0.0.2"), "POST",
                                      "/api/v1/sessions", token=gateway.admin_token,
                                      body={"command": ["cat"]})
            assert status == 201, body
            await trio.testing.wait_all_tasks_blocked()  # the POST's connection is released
            assert gateway.gw.clients.held("127.0.0.2") == 0
            client = await attach_via(await open_via(lb.port, "127.0.0.2"), gateway,
                                      json.loads(body)["id"])
            await client.wait_hello()
            # 127.0.0.2 holds its one connection: another is refused with 429...
            status, _ = await http(await open_via(lb.port, "127.0.0.2"), "GET", "/healthz")
            assert status == 429
            # ...while 127.0.0.3, through the same balancer, is served.
            status, _ = await http(await open_via(lb.port, "127.0.0.3"), "GET", "/healthz")
            assert status == 200
            assert gateway.gw.clients.statistics().refused_per_ip == 1
            await client.aclose()


async def test_plain_client_on_a_proxy_listener_gets_400_quickly(start: Starter) -> None:
    gateway = await start(proxy_protocol=True)
    with trio.fail_after(FAIL_FAST_S):
        stream = await open_via(gateway.port, "127.0.0.2")
        status, body = await http(stream, "GET", "/healthz")
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and "PROXY protocol header" in error["message"]
    assert gateway.gw.clients.statistics().proxy_rejects == {"invalid": 1}
    assert gateway.gw.clients.statistics().live == {}


async def test_silent_client_on_a_proxy_listener_times_out(start: Starter) -> None:
    gateway = await start(proxy_protocol=True,
                          limits=LimitsConfig(handshake_timeout_s=0.3))
    with trio.fail_after(WAIT_S):
        stream = await open_via(gateway.port, "127.0.0.2")
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        await stream.aclose()
    assert received.startswith(b"HTTP/1.1 400 ")
    assert gateway.gw.clients.statistics().proxy_rejects == {"timeout": 1}


async def test_proxy_protocol_with_tls(start: Starter, tmp_path: Path) -> None:
    # The header comes before the ClientHello: TLS is layered on after reading it.
    pki = generate_dev_pki(tmp_path / "pki", users=("root:podterm:admins",))
    gateway = await start(proxy_protocol=True,
                          tls=TLSConfig(cert_file=str(pki.server_cert),
                                        key_file=str(pki.server_key)))
    seen = record_clients(gateway)
    async with open_proxy_lb([("127.0.0.1", gateway.port)], send_proxy="v2") as lb:
        with trio.fail_after(WAIT_S):
            tcp = await open_via(lb.port, "127.0.0.2")
            tls = trio.SSLStream(tcp, client_context(pki.ca_cert), server_hostname="localhost",
                                 https_compatible=True)
            status, _ = await http(tls, "GET", "/healthz")
            assert status == 200
            # A plain TLS client without the header is refused, without an HTTP answer.
            raw = await open_via(gateway.port, "127.0.0.2")
            bare = trio.SSLStream(raw, client_context(pki.ca_cert), server_hostname="localhost")
            with pytest.raises(trio.BrokenResourceError):
                await bare.do_handshake()
            await trio.aclose_forcefully(bare)
    assert seen == [("/healthz", ClientAddress("127.0.0.2", seen[0][1].port,
                                               Via.PROXY_PROTOCOL))]
    assert gateway.gw.clients.statistics().proxy_rejects == {"invalid": 1}
