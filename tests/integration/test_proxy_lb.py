"""The test load balancer (tests/helpers/proxylb.py), and a server behind it that reads PROXY.

Part 1 tests the balancer itself on loopback: round robin, skipping a dead
backend, bounds, ``cut_all``, and the PROXY headers it sends, compared byte
for byte with headers written out by hand from proxy-protocol.txt §2.1/§2.2.

Part 2 puts a small trio HTTP server behind it that does what the gateway's
accept path should do (podterm.net.clientaddr): read the PROXY header under a
deadline before h11 sees a byte, resolve the client, answer with what it
believes.  Clients connect from 127.0.0.2 so the real client address differs
from the balancer's 127.0.0.1.  Every wait is bounded by ``WAIT_S``.
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trustme
from tests.helpers.proxylb import open_proxy_lb

from podterm.errors import ProtocolViolation
from podterm.net.clientaddr import (
    ClientAddressPolicy,
    TrustedProxies,
    receive_proxy_header,
    resolve_connection,
    resolve_request,
)
from podterm.protocol.proxy_header import ProxyResult

WAIT_S = 10.0
CLIENT_IP = "127.0.0.2"
SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.trio


async def connect_from_client(port: int) -> trio.SocketStream:
    """A client connection to 127.0.0.1:port from 127.0.0.2."""
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=CLIENT_IP)


async def read_all(stream: trio.abc.ReceiveStream, limit: int = 1 << 20) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
        assert len(data) <= limit
    return data


# ---------------------------------------------------------------- test backends


@dataclass
class Backend:
    """A backend that says which one it is, then records what it receives until EOF."""

    index: int
    port: int = 0
    received: list[bytes] = field(default_factory=list)
    got: trio.Event = field(default_factory=trio.Event)
    echo: bool = False

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                if self.echo:
                    while chunk := await stream.receive_some(65536):
                        await stream.send_all(chunk)
                    self.received.append(b"")
                else:
                    await stream.send_all(f"backend {self.index}\n".encode())
                    self.received.append(await read_all(stream))
            except trio.BrokenResourceError:
                self.received.append(b"<broken>")
            self.got.set()
            self.got = trio.Event()


@pytest.fixture
async def backends(nursery: trio.Nursery) -> list[Backend]:
    made = [Backend(i) for i in range(3)]
    for backend in made:
        await nursery.start(backend.serve)
    return made


async def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port: int = listener.socket.getsockname()[1]
    await listener.aclose()
    return port


async def send_and_close(port: int, payload: bytes) -> tuple[int, bytes]:
    """Connect from 127.0.0.2, send ``payload``, half-close; return our port and the reply."""
    stream = await connect_from_client(port)
    client_port: int = stream.socket.getsockname()[1]
    await stream.send_all(payload)
    await stream.send_eof()
    reply = await read_all(stream)
    await stream.aclose()
    return client_port, reply


# ------------------------------------------------------------------ the balancer


async def test_round_robin_over_three_backends(backends: list[Backend]) -> None:
    async with open_proxy_lb([("127.0.0.1", b.port) for b in backends]) as lb:
        with trio.fail_after(WAIT_S):
            replies = [(await send_and_close(lb.port, b"x"))[1] for _ in range(6)]
            await lb.wait_for(lambda s: s.live == 0)
    assert replies == [f"backend {i % 3}\n".encode() for i in range(6)]
    stats = lb.statistics()
    assert stats.per_backend == (2, 2, 2)
    assert stats.accepted == 6 and stats.connect_failures == 0


async def test_without_send_proxy_bytes_pass_unchanged(backends: list[Backend]) -> None:
    async with open_proxy_lb([("127.0.0.1", backends[0].port)]) as lb:
        with trio.fail_after(WAIT_S):
            got = backends[0].got
            await send_and_close(lb.port, b"GET / HTTP/1.1\r\n\r\n")
            await got.wait()
    assert backends[0].received == [b"GET / HTTP/1.1\r\n\r\n"]


async def test_send_proxy_v1_header_is_byte_exact(backends: list[Backend]) -> None:
    async with open_proxy_lb([("127.0.0.1", backends[0].port)], send_proxy="v1") as lb:
        with trio.fail_after(WAIT_S):
            got = backends[0].got
            client_port, _ = await send_and_close(lb.port, b"hello")
            await got.wait()
    # §2.1: "PROXY TCP4 <src> <dst> <srcport> <dstport>\r\n", src = the client.
    expected = f"PROXY TCP4 127.0.0.2 127.0.0.1 {client_port} {lb.port}\r\n".encode("ascii")
    assert backends[0].received == [expected + b"hello"]


@pytest.mark.parametrize("tlvs", [(), ((0x02, b"podterm.test"),)])
async def test_send_proxy_v2_header_is_byte_exact(backends: list[Backend],
                                                  tlvs: tuple[tuple[int, bytes], ...]) -> None:
    async with open_proxy_lb([("127.0.0.1", backends[0].port)], send_proxy="v2",
                             tlvs=tlvs) as lb:
        with trio.fail_after(WAIT_S):
            got = backends[0].got
            client_port, _ = await send_and_close(lb.port, b"hello")
            await got.wait()
    # §2.2: signature, 0x21 (v2, PROXY), 0x11 (INET, STREAM), length, then
    # src addr, dst addr, src port, dst port, all network order; then TLVs.
    tlv_bytes = b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in tlvs)
    body = (bytes([127, 0, 0, 2]) + bytes([127, 0, 0, 1]) + struct.pack("!HH", client_port, lb.port)
            + tlv_bytes)
    expected = SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body
    assert backends[0].received == [expected + b"hello"]


async def test_a_dead_backend_is_skipped_for_the_next(backends: list[Backend]) -> None:
    dead = await dead_port()
    async with open_proxy_lb([("127.0.0.1", dead), ("127.0.0.1", backends[1].port)]) as lb:
        with trio.fail_after(WAIT_S):
            _, reply = await send_and_close(lb.port, b"x")
    assert reply == b"backend 1\n"
    stats = lb.statistics()
    assert stats.connect_failures == 1 and stats.per_backend == (0, 1)


async def test_no_live_backend_closes_the_client() -> None:
    async with open_proxy_lb([("127.0.0.1", await dead_port())]) as lb:
        with trio.fail_after(WAIT_S):
            stream = await connect_from_client(lb.port)
            try:
                assert await stream.receive_some(10) == b""
            except trio.BrokenResourceError:
                pass  # the reset may arrive first
            await stream.aclose()
            stats = await lb.wait_for(lambda s: s.unrouted == 1)
    assert stats.live == 0


async def test_set_backends_routes_new_connections(backends: list[Backend]) -> None:
    async with open_proxy_lb([("127.0.0.1", backends[0].port)]) as lb:
        lb.set_backends([("127.0.0.1", backends[2].port)])
        with trio.fail_after(WAIT_S):
            _, reply = await send_and_close(lb.port, b"x")
    assert reply == b"backend 2\n"


@pytest.fixture
async def echo(nursery: trio.Nursery) -> Backend:
    backend = Backend(9, echo=True)
    await nursery.start(backend.serve)
    return backend


@pytest.mark.parametrize("rst", [False, True])
async def test_cut_all_closes_every_live_link(echo: Backend, rst: bool) -> None:
    async with open_proxy_lb([("127.0.0.1", echo.port)]) as lb:
        with trio.fail_after(WAIT_S):
            clients = [await connect_from_client(lb.port) for _ in range(2)]
            for client in clients:
                await client.send_all(b"ping")
                assert await client.receive_some(10) == b"ping"
            await lb.wait_for(lambda s: s.live == 2)
            assert lb.cut_all(rst=rst) == 2
            for client in clients:
                if rst:
                    with pytest.raises(trio.BrokenResourceError):
                        await client.receive_some(10)
                else:
                    assert await client.receive_some(10) == b""
                await client.aclose()
            stats = await lb.wait_for(lambda s: s.live == 0)
            while len(echo.received) < 2:
                await echo.got.wait()
    assert stats.cuts == 1 and stats.connections_cut == 2
    assert lb.cut_all() == 0


async def test_connections_over_the_bound_are_refused(echo: Backend) -> None:
    async with open_proxy_lb([("127.0.0.1", echo.port)], max_connections=1) as lb:
        with trio.fail_after(WAIT_S):
            first = await connect_from_client(lb.port)
            await first.send_all(b"a")
            assert await first.receive_some(10) == b"a"
            try:
                second = await connect_from_client(lb.port)
            except OSError:
                pass  # the reset can beat trio's post-connect SO_ERROR check
            else:
                with pytest.raises(trio.BrokenResourceError):
                    await second.receive_some(10)
                await second.aclose()
            stats = await lb.wait_for(lambda s: s.refused == 1)
            assert stats.live == 1
            await first.send_all(b"b")
            assert await first.receive_some(10) == b"b"  # the live link is untouched
            await first.aclose()


async def test_process_mode(backends: list[Backend]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(lambda task_status: trio.run_process(
            [sys.executable, "-m", "tests.helpers.proxylb", "--backend",
             f"127.0.0.1:{backends[1].port}", "--send-proxy", "v1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(ROOT), env=env,
            check=False, task_status=task_status))
        assert proc.stdin is not None and proc.stdout is not None
        lines = _Lines(proc.stdout)
        with trio.fail_after(WAIT_S):
            port = json.loads(await lines.next())["port"]
            got = backends[1].got
            client_port, reply = await send_and_close(port, b"hi")
            await got.wait()
            assert reply == b"backend 1\n"
            assert backends[1].received[-1].startswith(
                f"PROXY TCP4 127.0.0.2 127.0.0.1 {client_port} {port}\r\n".encode())
            await proc.stdin.send_all(b"stats\n")
            stats = json.loads(await lines.next())
            assert stats["accepted"] == 1 and stats["per_backend"] == [1]
            await proc.stdin.aclose()  # EOF on stdin: the balancer exits
            assert await proc.wait() == 0


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(4096)
            assert chunk, "process exited early"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


# ------------------------------------------------- a server that reads PROXY headers


@dataclass
class WhoAmI:
    """An HTTP server that answers with the client address it believes.

    The accept path the gateway should have: PROXY header first, under a
    deadline, before TLS and h11; then the per-request forwarding header.
    """

    policy: ClientAddressPolicy
    header_deadline_s: float = WAIT_S
    ssl_context: ssl.SSLContext | None = None
    port: int = 0
    violations: list[str] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        app: trio.abc.Stream = stream
        proxy: ProxyResult | None = None
        try:
            if self.policy.proxy_protocol:
                with trio.fail_after(self.header_deadline_s):
                    proxy, app = await receive_proxy_header(stream)
        except ProtocolViolation as exc:
            self.violations.append(exc.message)
            if self.ssl_context is None:
                # Plain listener: tell a human with curl what went wrong.
                body = f"{exc.message}\n".encode()
                with trio.move_on_after(1):
                    await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                                          b"Content-Length: " + str(len(body)).encode() +
                                          b"\r\n\r\n" + body)
            await trio.aclose_forcefully(stream)
            return
        except (trio.TooSlowError, trio.BrokenResourceError):
            await trio.aclose_forcefully(stream)
            return
        connection = resolve_connection(peer, proxy, policy=self.policy)
        if self.ssl_context is not None:
            app = trio.SSLStream(app, self.ssl_context, server_side=True)
        async with app:
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await app.receive_some(65536)))
                    continue
                assert isinstance(event, h11.Request)
                break
            client = resolve_request(connection, event.headers, policy=self.policy)
            body = json.dumps({
                "client": str(client), "ip": client.ip, "port": client.port,
                "via": str(client.via),
                "proxy": None if proxy is None else {
                    "version": proxy.version, "command": proxy.command.name,
                    "family": str(proxy.family)},
            }).encode()
            await app.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/json"), ("content-length", str(len(body))),
                ("connection", "close")])))
            await app.send_all(conn.send(h11.Data(data=body)))
            await app.send_all(conn.send(h11.EndOfMessage()))


async def http_get(stream: trio.abc.Stream, headers: str = "") -> tuple[int, bytes]:
    """One request on ``stream``; the whole answer; the stream closed."""
    async with stream:
        await stream.send_all(f"GET / HTTP/1.1\r\nHost: test\r\n{headers}"
                              "Connection: close\r\n\r\n".encode())
        raw = await read_all(stream)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def policy(trusted: list[str], *, proxy_protocol: bool = True) -> ClientAddressPolicy:
    return ClientAddressPolicy(proxy_protocol=proxy_protocol, trusted=TrustedProxies(trusted))


async def start_whoami(nursery: trio.Nursery, **options: Any) -> WhoAmI:
    server = WhoAmI(**options)
    await nursery.start(server.serve)
    return server


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_server_behind_the_balancer_sees_the_real_client(nursery: trio.Nursery,
                                                               version: str) -> None:
    # Only the balancer (127.0.0.1) is trusted: the client's own XFF is a spoof.
    server = await start_whoami(nursery, policy=policy(["127.0.0.1/32"]))
    async with open_proxy_lb([("127.0.0.1", server.port)], send_proxy=version) as lb:
        with trio.fail_after(WAIT_S):
            stream = await connect_from_client(lb.port)
            client_port = stream.socket.getsockname()[1]
            status, body = await http_get(stream, "X-Forwarded-For: 6.6.6.6\r\n")
    assert status == 200
    answer = json.loads(body)
    assert answer["client"] == f"127.0.0.2:{client_port}"
    assert answer["via"] == "proxy-protocol"
    assert answer["proxy"] == {"version": int(version[1]), "command": "PROXY", "family": "TCP4"}
    assert server.violations == []


async def test_forwarded_header_from_a_trusted_hop_behind_the_balancer(
        nursery: trio.Nursery) -> None:
    # 127.0.0.2 plays an L7 ingress that wrote X-Forwarded-For; it is trusted.
    server = await start_whoami(nursery, policy=policy(["127.0.0.1/32", "127.0.0.2/32"]))
    async with open_proxy_lb([("127.0.0.1", server.port)], send_proxy="v2") as lb:
        with trio.fail_after(WAIT_S):
            stream = await connect_from_client(lb.port)
            status, body = await http_get(stream, "X-Forwarded-For: 203.0.113.7\r\n")
    assert status == 200
    assert json.loads(body)["client"] == "203.0.113.7"
    assert json.loads(body)["via"] == "x-forwarded-for"


async def test_proxy_header_from_an_untrusted_balancer_is_not_believed(
        nursery: trio.Nursery) -> None:
    server = await start_whoami(nursery, policy=policy(["10.0.0.0/8"]))
    async with open_proxy_lb([("127.0.0.1", server.port)], send_proxy="v1") as lb:
        with trio.fail_after(WAIT_S):
            status, body = await http_get(await connect_from_client(lb.port))
    assert status == 200
    answer = json.loads(body)
    assert answer["ip"] == "127.0.0.1" and answer["via"] == "socket"


async def test_http_straight_to_a_proxy_listener_is_refused_at_once(
        nursery: trio.Nursery) -> None:
    # The server would wait a minute for a header; the refusal must not.
    server = await start_whoami(nursery, policy=policy([]), header_deadline_s=60)
    with trio.fail_after(5):
        status, body = await http_get(await connect_from_client(server.port))
    assert status == 400
    assert b"not a PROXY protocol header" in body
    assert len(server.violations) == 1


async def test_balancer_health_check_is_answered_as_the_balancer(nursery: trio.Nursery,
                                                                backends: list[Backend]
                                                                ) -> None:
    server = await start_whoami(nursery, policy=policy(["127.0.0.1/32"]))
    for version, command in (("v2", "LOCAL"), ("v1", "PROXY")):
        async with open_proxy_lb([("127.0.0.1", server.port)], send_proxy=version) as lb:
            with trio.fail_after(WAIT_S):
                status, body = await http_get(await lb.open_health_check(0))
        answer = json.loads(body)
        assert status == 200
        assert (answer["ip"], answer["via"], answer["proxy"]["command"]) == \
            ("127.0.0.1", "socket", command)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_after_the_proxy_header(nursery: trio.Nursery, ca: trustme.CA) -> None:
    # The header precedes the ClientHello: the server must hand the bytes it
    # read past the header to TLS (PrefixedStream under SSLStream).
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = await start_whoami(nursery, policy=policy(["127.0.0.1/32"]),
                                ssl_context=server_ctx)
    async with open_proxy_lb([("127.0.0.1", server.port)], send_proxy="v2") as lb:
        with trio.fail_after(WAIT_S):
            tcp = await connect_from_client(lb.port)
            client_port = tcp.socket.getsockname()[1]
            tls = trio.SSLStream(tcp, client_ctx, server_hostname="localhost")
            status, body = await http_get(tls)
    assert status == 200
    assert json.loads(body)["client"] == f"127.0.0.2:{client_port}"
