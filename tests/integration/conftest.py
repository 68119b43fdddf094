"""Fixtures for gateway integration tests: a real gateway on 127.0.0.1:0.

``gateway`` starts :func:`podterm.gateway.server.serve` in the test's nursery
(``await nursery.start(...)``, no sleeps) with a temporary config and yields a
:class:`GatewayUnderTest`: its ``url``, ``admin_token``, the running
:class:`~podterm.gateway.server.Gateway` (``gw``), a tiny REST client
(:meth:`~GatewayUnderTest.rest`) and a podterm.v1 client driven directly over
``podterm.net.wsconn`` and ``ClientCodec`` (:meth:`~GatewayUnderTest.attach`).

``make_gateway(**overrides)`` starts one with other settings: ``sessions=``,
``limits=``, ``token_file=``, ``session_limits=`` (a SessionLimits, e.g. a
short heartbeat), ``options=`` (a dict of further GatewayOptions fields).
Unless told otherwise, every gateway writes its audit log and its session
recordings into the test's temporary directory (recording is on by default in
``podterm serve``; here it never touches the real home directory).  Every gateway is shut down at the end of its test and the
test fails if its sessions did not all end.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from tests.helpers.http import HttpAnswer, request

from podterm.config import (
    AuditConfig,
    ListenConfig,
    RecordingConfig,
    ServeConfig,
    SessionsConfig,
)
from podterm.gateway.server import Gateway, GatewayOptions, serve
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, connect
from podterm.protocol.events import Ack, Exit, Gap, Hello, Stderr, Stdout
from podterm.protocol.handshake import bearer_subprotocol
from podterm.protocol.session_proto import SUBPROTOCOL, ClientCodec, encode_ack
from podterm.session.session import SessionLimits

#: Every wait in these tests is bounded by this (seconds, real time).
WAIT_S = 10.0


class ProtoClient:
    """A podterm.v1 client for tests: every event kept, output accumulated by offset.

    Attributes:
        hello: the ``hello`` received (after :meth:`wait_hello`).
        output: every output byte received on this connection, in order.
        base: the output offset of ``output[0]`` (the hello's ``out_offset``).
        events: every decoded event, in order.
        exit: the EXIT, once received.
        close_code: the close code once the connection ended.
    """

    def __init__(self, ws: WebSocketStream, *, auto_ack: bool = True) -> None:
        self.ws = ws
        self.auto_ack = auto_ack
        self.acked = 0
        self.codec = ClientCodec()
        self.hello: Hello | None = None
        self.output = bytearray()
        self.base = 0
        self.events: list[Any] = []
        self.exit: Exit | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.gaps: list[Gap] = []
        #: ``(offset, data)`` of every output message, for checks across gaps.
        self.segments: list[tuple[int, bytes]] = []
        self.in_acks: list[int] = []

    @property
    def offset(self) -> int:
        """The next output offset expected."""
        return self.base + len(self.output)

    async def pump(self) -> bool:
        """Read one batch and record it; False once the connection has ended."""
        if self.close_code is not None:
            return False
        try:
            batch = await self.ws.receive_batch()
        except ConnectionClosed as exc:
            self.close_code, self.close_reason = exc.code, exc.reason
            await self.ws.aclose()  # the socket, after the close handshake
            return False
        for opcode, payload in batch:
            for event in self.codec.receive_message(opcode, payload):
                self.events.append(event)
                if isinstance(event, Hello):
                    self.hello = event
                    self.base = self.acked = event.out_offset
                    self.output.clear()
                elif isinstance(event, Stdout | Stderr):
                    self.segments.append((self.offset, event.data))
                    self.output += event.data
                elif isinstance(event, Gap):
                    self.gaps.append(event)
                    self.base = event.to_offset - len(self.output)
                elif isinstance(event, Exit):
                    self.exit = event
                elif isinstance(event, Ack):
                    self.in_acks.append(event.offset)
        if self.auto_ack and self.offset > self.acked and self.hello is not None:
            # ACK what arrived, as a real client does (it is also the credit).
            self.acked = self.offset
            try:
                await self.send_ack(self.acked)
            except ConnectionClosed:
                pass
        return True

    async def wait_for(self, predicate: Callable[[ProtoClient], bool]) -> None:
        """Read until ``predicate(self)`` holds (bounded by the caller)."""
        while not predicate(self):
            if not await self.pump():
                if not predicate(self):
                    raise AssertionError(f"connection closed ({self.close_code} "
                                         f"{self.close_reason!r}) before the condition held; "
                                         f"output={bytes(self.output)[-200:]!r}")
                return

    async def wait_hello(self) -> Hello:
        await self.wait_for(lambda c: c.hello is not None or c.close_code is not None)
        assert self.hello is not None, f"no hello; closed {self.close_code} {self.events}"
        return self.hello

    async def wait_output(self, needle: bytes) -> None:
        await self.wait_for(lambda c: needle in c.output)

    async def wait_closed(self) -> int:
        await self.wait_for(lambda c: c.close_code is not None)
        assert self.close_code is not None
        return self.close_code

    async def send(self, prefix_payload: tuple[bytes, Any]) -> None:
        prefix, payload = prefix_payload
        await self.ws.send_binary(payload, prefix)

    async def send_stdin(self, data: bytes) -> None:
        await self.send(self.codec.stdin(data))

    async def send_ack(self, offset: int | None = None) -> None:
        await self.send(encode_ack(self.offset if offset is None else offset))

    async def send_resize(self, cols: int, rows: int) -> None:
        await self.send(self.codec.resize(cols, rows))

    async def send_detach(self) -> None:
        await self.send(self.codec.detach())

    async def cut(self) -> None:
        """Drop the TCP connection without a close handshake (a network cut)."""
        await trio.aclose_forcefully(self.ws.stream)

    async def aclose(self) -> None:
        await self.ws.aclose()


class GatewayUnderTest:
    """A running gateway and clients for it."""

    def __init__(self, gw: Gateway | None, *, port: int = 0,
                 admin_token: str | None = None) -> None:
        self._gw = gw
        self.port = gw.port if gw is not None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = gw.admin_token if gw is not None else admin_token
        self.finished = trio.Event()

    @property
    def gw(self) -> Gateway:
        """The in-process gateway (not available for a gateway in another process)."""
        assert self._gw is not None
        return self._gw

    @property
    def registry(self) -> Any:
        return self.gw.registry

    async def rest(self, method: str, path: str, body: Any = None, *,
                   token: str | None = "admin", headers: list[tuple[str, str]] | None = None,
                   raw_body: bytes | None = None) -> HttpAnswer:
        """One HTTP/1.1 request on a fresh connection; ``token="admin"`` means the admin token."""
        if token == "admin":
            token = self.admin_token
        return await request(self.port, method, path, token=token, body=body,
                             raw_body=raw_body, headers=headers or ())

    async def create(self, command: list[str] | None = None, **fields: Any) -> dict[str, Any]:
        """POST a session; assert 201; return its JSON."""
        body = {"command": command, **fields}
        answer = await self.rest("POST", "/api/v1/sessions", body)
        assert answer.status == 201, answer.body
        return answer.json  # type: ignore[no-any-return]

    async def connect_ws(self, session_id: str, *, offset: int = 0, mode: str = "rw",
                         resume_token: str | None = None, token: str | None = "admin",
                         carrier: bool = False) -> WebSocketStream:
        if token == "admin":
            token = self.admin_token
        query = f"offset={offset}&mode={mode}"
        if resume_token:
            query += f"&resume_token={resume_token}"
        url = f"ws://127.0.0.1:{self.port}/api/v1/sessions/{session_id}/attach?{query}"
        protocols = [SUBPROTOCOL]
        headers: list[tuple[str, str]] = []
        if token is not None:
            if carrier:
                protocols.append(bearer_subprotocol(token))
            else:
                headers.append(("Authorization", f"Bearer {token}"))
        ws, chosen = await connect(url, subprotocols=protocols, headers=headers)
        assert chosen == SUBPROTOCOL
        return ws

    async def attach(self, session_id: str, *, auto_ack: bool = True,
                     **kwargs: Any) -> ProtoClient:
        """Attach and return the client (hello not yet read)."""
        return ProtoClient(await self.connect_ws(session_id, **kwargs), auto_ack=auto_ack)


GatewayFactory = Callable[..., Awaitable[GatewayUnderTest]]


@pytest.fixture
async def make_gateway(nursery: trio.Nursery,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayFactory]:
    """Start gateways on 127.0.0.1:0; each is drained and checked at the end of the test."""
    started: list[GatewayUnderTest] = []

    async def factory(*, sessions: SessionsConfig | None = None,
                      session_limits: SessionLimits | None = None,
                      options: dict[str, Any] | None = None,
                      **config_fields: Any) -> GatewayUnderTest:
        if "audit" not in config_fields or "recording" not in config_fields:
            where = tmp_path_factory.mktemp("gateway")
            config_fields.setdefault("audit", AuditConfig(log_file=str(where / "audit.log")))
            config_fields.setdefault("recording", RecordingConfig(dir=str(where / "rec")))
        config = ServeConfig(listen=ListenConfig(host="127.0.0.1", port=0),
                             sessions=sessions or SessionsConfig(drain_timeout_s=5.0),
                             **config_fields)
        gateway_options = GatewayOptions(session_limits=session_limits,
                                         lag_probe_interval_s=0.5, **(options or {}))
        holder: list[GatewayUnderTest] = []

        async def run(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve(config, options=gateway_options, task_status=task_status)
            finally:
                if holder:
                    holder[0].finished.set()

        gw = await nursery.start(functools.partial(run))
        handle = GatewayUnderTest(gw)
        holder.append(handle)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        if not handle.finished.is_set():
            handle.gw.shutdown("test over")
            with trio.fail_after(WAIT_S):
                await handle.finished.wait()
        assert len(handle.gw.registry) == 0, f"sessions left: {handle.gw.registry.sessions()}"


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> GatewayUnderTest:
    """A gateway with the default settings (local upstream, generated admin token)."""
    return await make_gateway()
