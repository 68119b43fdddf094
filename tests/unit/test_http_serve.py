"""``serve_http`` without h11 on the head: what the client sees is what it saw with h11.

Over a memory stream pair (no sockets): keep-alive and pipelining through the
gateway's own buffer, a body read by an h11 connection built on demand and
dropped for the next request, the statuses of malformed heads, ``HEAD``,
``Connection: close``, a handler that asks for h11 (the peers and kube
paths) and one that takes the connection over (the attach path), and
``accept_on`` writing that path's ``101`` without h11.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
import trio.testing

from podterm.errors import LocalProtocolError
from podterm.gateway.http import (
    Exchange,
    HttpLimits,
    Request,
    Response,
    Upgraded,
    serve_http,
)
from podterm.metrics import GatewayCounters
from podterm.net.wsconn import accept_on
from podterm.protocol.handshake import accept_bytes, parse_upgrade
from podterm.protocol.http_head import parse_request_head
from podterm.protocol.websocket import Role, WebSocketConnection

pytestmark = pytest.mark.trio

WAIT_S = 10

Handler = Callable[[Request, trio.abc.Stream, Exchange], Awaitable[Response | Upgraded]]


async def echo(request: Request, stream: trio.abc.Stream, exchange: Exchange) -> Response:
    return Response(200, f"{request.method} {request.path} {request.query} "
                         f"{request.body.decode()}".encode(), "text/plain")


async def exchange_bytes(data: bytes, handler: Handler = echo,
                         limits: HttpLimits | None = None,
                         errors: list[tuple[int, str]] | None = None
                         ) -> tuple[bytes, Upgraded | None, GatewayCounters]:
    """Send ``data`` (then EOF), serve the connection, return every byte answered."""
    client, server = trio.testing.memory_stream_pair()
    counters = GatewayCounters()
    result: list[Upgraded | None] = []

    async def serve() -> None:
        result.append(await serve_http(
            server, handler, limits=limits or HttpLimits(), counters=counters,
            on_protocol_error=None if errors is None else (
                lambda status, reason: errors.append((status, reason)))))

    received = bytearray()
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send_all(data)
            await client.send_eof()
            while chunk := await client.receive_some(65536):
                received += chunk
                if result and result[0] is not None:
                    break  # upgraded: the stream is the handler's, nobody closes it
    return bytes(received), result[0], counters


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``raw``, read with h11 as a client would."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    out: list[tuple[int, dict[str, str], bytes]] = []
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        event = conn.next_event()
        while isinstance(event, h11.InformationalResponse):  # 100 Continue
            event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return out
        assert isinstance(event, h11.Response)
        body = b""
        while not isinstance(part := conn.next_event(), h11.EndOfMessage):
            assert isinstance(part, h11.Data), part
            body += part.data
        out.append((event.status_code, {k.decode(): v.decode() for k, v in event.headers},
                    body))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return out
        conn.start_next_cycle()


async def test_pipelined_requests_in_one_write_are_answered_in_order() -> None:
    raw, upgraded, counters = await exchange_bytes(
        b"GET /a?x=1&x=2 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /b%20c HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    got = responses(raw)
    assert [body for _, _, body in got] == [b"GET /a {'x': '1'} ", b"GET /b c {} ",
                                           b"GET /last {} "]
    assert "connection" not in got[0][1]
    assert got[2][1]["connection"] == "close"
    assert upgraded is None and counters.http_requests == 3


async def test_body_is_read_then_the_next_request_is_served() -> None:
    raw, _, _ = await exchange_bytes(
        b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /q HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [body for _, _, body in responses(raw)] == [b"POST /p {} hello", b"POST /q {} abc",
                                                      b"GET /r {} "]


async def test_expect_100_continue_gets_100_first() -> None:
    raw, _, _ = await exchange_bytes(
        b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\n\r\nhi")
    assert raw.startswith(b"HTTP/1.1 100 ")
    assert responses(raw)[0][2] == b"POST /p {} hi"


async def test_head_answer_has_the_length_and_no_body() -> None:
    raw, _, _ = await exchange_bytes(b"HEAD /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nContent-Length: 11" in head  # "HEAD /x {} "
    assert rest == b""


async def test_http_10_is_answered_and_closed() -> None:
    raw, _, _ = await exchange_bytes(b"GET /x HTTP/1.0\r\n\r\nGET /y HTTP/1.0\r\n\r\n")
    got = responses(raw)
    assert len(got) == 1 and got[0][1]["connection"] == "close"


@pytest.mark.parametrize(("data", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x00\xa5\x01\x00", 400),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"x" * 20000, 431),
    (b"GET / HTTP/1.1\r\nHost: h\r\n", 400),  # then EOF: the head never ends
])
async def test_malformed_head_is_answered_with_its_status_and_closed(data: bytes,
                                                                     status: int) -> None:
    errors: list[tuple[int, str]] = []
    raw, _, counters = await exchange_bytes(data, errors=errors)
    got = responses(raw)
    assert [s for s, _, _ in got] == [status]
    assert got[0][1]["connection"] == "close"
    assert b'"message":"bad HTTP request: ' in got[0][2]
    assert [s for s, _ in errors] == [status]
    assert sum(counters.http_errors.values()) == 1


async def test_a_request_after_the_bad_one_is_not_served() -> None:
    raw, _, counters = await exchange_bytes(
        b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [s for s, _, _ in responses(raw)] == [400]
    assert counters.http_requests == 0


async def test_client_closing_between_requests_is_quiet() -> None:
    raw, upgraded, counters = await exchange_bytes(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [s for s, _, _ in responses(raw)] == [200]
    assert upgraded is None and not counters.http_errors


async def test_max_requests_closes_after_the_last() -> None:
    raw, _, _ = await exchange_bytes(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" * 3,
                                     limits=HttpLimits(max_requests=2))
    got = responses(raw)
    assert len(got) == 2 and got[1][1]["connection"] == "close"


_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def test_handler_asking_for_h11_gets_it_after_the_empty_body() -> None:
    seen: list[object] = []

    async def handler(request: Request, stream: trio.abc.Stream,
                      exchange: Exchange) -> Upgraded:
        conn = exchange.h11_connection
        assert conn is exchange.h11_connection  # built once
        seen.append(conn.their_state)
        seen.append(conn.trailing_data[0])
        await stream.send_all(conn.send(h11.InformationalResponse(
            status_code=101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])))
        assert exchange.responded
        return Upgraded(None)

    raw, upgraded, _ = await exchange_bytes(_UPGRADE + b"\x81\x80frame", handler)
    assert seen == [h11.MIGHT_SWITCH_PROTOCOL, b"\x81\x80frame"]
    assert raw.startswith(b"HTTP/1.1 101 ")
    assert upgraded is not None and upgraded.run is None


async def test_handler_taking_over_gets_the_bytes_after_the_head() -> None:
    taken: list[object] = []

    async def handler(request: Request, stream: trio.abc.Stream,
                      exchange: Exchange) -> Upgraded:
        assert not exchange.responded
        conn, trailing = exchange.take_over()
        taken.extend([conn, trailing, exchange.responded])
        with pytest.raises(RuntimeError):
            exchange.h11_connection  # noqa: B018 - the property raises
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")

        async def run() -> None:
            pass

        return Upgraded(run)

    raw, upgraded, _ = await exchange_bytes(_UPGRADE + b"\x81\x80frame", handler)
    assert taken == [None, b"\x81\x80frame", True]
    assert raw == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    assert upgraded is not None and upgraded.run is not None


async def test_taking_over_a_request_h11_read_hands_back_h11() -> None:
    got: list[object] = []

    async def handler(request: Request, stream: trio.abc.Stream,
                      exchange: Exchange) -> Response:
        got.extend(exchange.take_over())
        return Response(204)

    await exchange_bytes(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx", handler)
    assert isinstance(got[0], h11.Connection) and got[1] == b""


async def test_a_header_that_would_break_the_head_is_refused() -> None:
    async def handler(request: Request, stream: trio.abc.Stream,
                      exchange: Exchange) -> Response:
        return Response(200, headers=(("X-Evil", "a\r\nSet-Cookie: b"),))

    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    with trio.fail_after(WAIT_S), pytest.raises(LocalProtocolError):
        await serve_http(server, handler, limits=HttpLimits(), counters=GatewayCounters())
    assert await client.receive_some(65536) == b""  # nothing written, the stream closed


# ------------------------------------------------ accept_on without h11 (attach)

_UPGRADE_PODTERM = _UPGRADE[:-2] + b"Sec-WebSocket-Protocol: podterm.v1\r\n\r\n"


def _client_frame(payload: bytes) -> bytes:
    conn = WebSocketConnection(Role.CLIENT, mask_key_source=lambda: b"\x01\x02\x03\x04")
    return bytes(conn.send_binary(payload))


async def test_accept_on_without_h11_sends_the_101_as_bytes_and_keeps_the_trailing() -> None:
    head = parse_request_head(_UPGRADE_PODTERM, 16384)
    assert head is not None
    upgrade = parse_upgrade(head)
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(WAIT_S):
        ws = await accept_on(server, None, upgrade, "podterm.v1",
                             extra_headers=[("X-Request-Id", "r-1")],
                             trailing=_client_frame(b"early"))
        assert await client.receive_some(65536) == accept_bytes(
            upgrade, "podterm.v1", [("X-Request-Id", "r-1")])
        assert [bytes(data) for _, data in await ws.receive_batch()] == [b"early"]


async def test_accept_on_a_socket_sends_the_101_with_the_first_frames() -> None:
    """On TCP the 101 waits for the caller's first send: one write for both."""
    head = parse_request_head(_UPGRADE_PODTERM, 16384)
    assert head is not None
    upgrade = parse_upgrade(head)
    a, b = trio.socket.socketpair()
    server, client = trio.SocketStream(a), trio.SocketStream(b)
    try:
        with trio.fail_after(WAIT_S):
            ws = await accept_on(server, None, upgrade, "podterm.v1")
            assert ws.has_pending_out
            await ws.send_binary(b"hello")
            expected = accept_bytes(upgrade, "podterm.v1", []) + b"\x82\x05hello"
            received = b""
            while len(received) < len(expected):
                received += await client.receive_some(65536)
            assert received == expected
    finally:
        await server.aclose()
        await client.aclose()


async def test_accept_on_without_h11_needs_the_parsed_upgrade() -> None:
    client, server = trio.testing.memory_stream_pair()
    with pytest.raises(TypeError):
        await accept_on(server, None, h11.Request(method="GET", target="/", headers=[
            ("Host", "h")]), None)
