"""WebSocketStream and the handshake helpers over trio's in-memory streams (no sockets)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
import trio
import trio.testing

from podterm.errors import HandshakeError, LocalProtocolError
from podterm.net.wsconn import (
    ConnectionClosed,
    WebSocketStream,
    accept_on,
    client_handshake,
    heartbeat,
    server_handshake,
)
from podterm.protocol.frame import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
)
from podterm.protocol.handshake import build_request, parse_upgrade
from podterm.protocol.websocket import DEFAULT_LIMITS, ConnectionState, WsLimits

KEY = b"\x0a\x0b\x0c\x0d"
TIMEOUT = 5  # every test is bounded


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test under trio.run, bounded by TIMEOUT seconds."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            with trio.fail_after(TIMEOUT):
                await fn(*args, **kwargs)
        trio.run(main)
    return wrapper


def mock_clock_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run under a MockClock that jumps whenever every task is blocked (virtual time)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            with trio.fail_after(600):  # virtual seconds
                await fn(*args, **kwargs)
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return wrapper


def first_protocol(offered: list[str]) -> str | None:
    return offered[0] if offered else None


async def open_pair(*, lockstep: bool = False, limits: WsLimits = DEFAULT_LIMITS,
                    close_timeout_s: float = 5.0) -> tuple[WebSocketStream, WebSocketStream]:
    """(client, server) WebSocketStreams over an in-memory stream pair."""
    a, b = trio.testing.lockstep_stream_pair() if lockstep else trio.testing.memory_stream_pair()
    box: dict[str, WebSocketStream] = {}

    async def serve() -> None:
        box["server"], _ = await server_handshake(b, select_subprotocol=first_protocol,
                                                  limits=limits)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        box["client"], chosen = await client_handshake(a, "test", "/", ["podterm.v1"],
                                                       mask_key_source=lambda: KEY)
        assert chosen == "podterm.v1"
    box["client"].close_timeout_s = box["server"].close_timeout_s = close_timeout_s
    return box["client"], box["server"]


async def read_frames(stream: trio.abc.Stream, n: int, *, from_server: bool = True
                      ) -> list[tuple[int, bytes]]:
    """Read raw frames off the wire until n have arrived."""
    reader = FrameReader(is_server=not from_server)
    frames: list[tuple[int, bytes]] = []
    while len(frames) < n:
        data = await stream.receive_some(65536)
        assert data, f"EOF after {frames}"
        frames += reader.feed(data)
    return frames


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


def raw_request(*headers: tuple[str, str], drop: tuple[str, ...] = ()) -> bytes:
    req = build_request("test", "/", key=bytes(16))
    lower = {d.lower() for d in drop}
    hs = [(n, v) for n, v in req.headers if n.decode() not in lower] + [
        (n.encode(), v.encode()) for n, v in headers]
    h = h11.Connection(h11.CLIENT)
    out = h.send(h11.Request(method="GET", target="/", headers=hs))
    assert out is not None
    return out


# ------------------------------------------------------------------ data


@trio_test
async def test_one_read_returns_every_message_of_it() -> None:
    client, server = await open_pair()
    frames = b"".join(client.conn.send_binary(bytes([i]) * i, prefix=b"\x00") for i in range(1, 6))
    await client.send_raw(frames)
    assert await server.receive_batch() == [(OP_BINARY, b"\x00" + bytes([i]) * i)
                                            for i in range(1, 6)]


@trio_test
async def test_text_binary_both_ways() -> None:
    client, server = await open_pair()
    await client.send_text("héllo")
    assert await server.receive_batch() == [(OP_TEXT, "héllo".encode())]
    await server.send_binary(b"out", prefix=b"\x01")
    await server.send_text("ok")
    assert await client.receive_batch() == [(OP_BINARY, b"\x01out"), (OP_TEXT, b"ok")]


@trio_test
async def test_frame_pipelined_behind_the_request_is_not_lost() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(raw_request() + encode_frame(OP_BINARY, b"early", mask_key=KEY))
    ws, upgrade = await server_handshake(b, select_subprotocol=first_protocol)
    assert upgrade.target == "/"
    assert await ws.receive_batch() == [(OP_BINARY, b"early")]


@trio_test
async def test_a_read_without_a_whole_message_keeps_reading() -> None:
    client, server = await open_pair()
    frame = client.conn.send_binary(b"split")
    async with trio.open_nursery() as nursery:
        async def send_in_two() -> None:
            await client.stream.send_all(frame[:3])
            await trio.testing.wait_all_tasks_blocked()
            await client.stream.send_all(frame[3:])
        nursery.start_soon(send_in_two)
        assert await server.receive_batch() == [(OP_BINARY, b"split")]


# ------------------------------------------------------------------ control frames


@trio_test
async def test_ping_is_answered_while_reading() -> None:
    client, server = await open_pair()
    async with trio.open_nursery() as nursery:
        async def read_one() -> None:
            assert await server.receive_batch() == [(OP_BINARY, b"after")]
        nursery.start_soon(read_one)
        await client.stream.send_all(client.conn.send_ping(b"hi"))
        assert await read_frames(client.stream, 1) == [(OP_PONG, b"hi")]
        await client.send_binary(b"after")


@trio_test
async def test_client_reader_answers_server_ping() -> None:
    client, server = await open_pair()
    async with trio.open_nursery() as nursery:
        async def read_one() -> None:
            assert await client.receive_batch() == [(OP_BINARY, b"x")]
        nursery.start_soon(read_one)
        await server.ping(b"p1")
        assert await read_frames(server.stream, 1, from_server=False) == [(OP_PONG, b"p1")]
        await server.send_binary(b"x")


@trio_test
async def test_pong_queued_behind_a_busy_writer_is_flushed_by_it() -> None:
    client, server = await open_pair(lockstep=True)
    big = bytes(100_000)
    async with trio.open_nursery() as nursery:
        async def reader() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    await server.receive_batch()
        nursery.start_soon(reader)
        nursery.start_soon(server.send_binary, big)
        await trio.testing.wait_all_tasks_blocked()  # the writer is stuck in send_all
        await client.stream.send_all(client.conn.send_ping(b"?"))
        await trio.testing.wait_all_tasks_blocked()
        assert server.conn.has_data_to_send  # the reader left the PONG for the writer
        assert await read_frames(client.stream, 2) == [(OP_BINARY, big), (OP_PONG, b"?")]
        await client.stream.send_all(client.conn.send_close(1000))
        assert await read_frames(client.stream, 1) == [(OP_CLOSE, encode_close_payload(1000))]


@trio_test
async def test_concurrent_writers_never_interleave_frames() -> None:
    client, server = await open_pair(lockstep=True)
    got: list[tuple[int, bytes]] = []

    async def write(tag: int) -> None:
        for i in range(30):
            await server.send_binary(bytes([tag, i]) * 500)

    async def read_forever() -> None:
        while True:
            got.extend(await client.receive_batch())

    async with trio.open_nursery() as nursery:
        # A reader on the server too: the client's PONG must be read for the
        # client's reader to go on (a lockstep stream has no buffer at all).
        nursery.start_soon(server.receive_batch)
        nursery.start_soon(read_forever)
        async with trio.open_nursery() as writers:
            for tag in range(3):
                writers.start_soon(write, tag)
            writers.start_soon(server.ping, b"hb")
        await trio.testing.wait_all_tasks_blocked()  # the client has read everything
        nursery.cancel_scope.cancel()
    assert len(got) == 90
    assert all(op == OP_BINARY and p == p[:2] * 500 for op, p in got)
    for tag in range(3):
        assert [p[1] for _, p in got if p[0] == tag] == list(range(30))


@trio_test
async def test_a_cancelled_send_marks_the_stream_broken() -> None:
    client, server = await open_pair(lockstep=True)
    with trio.move_on_after(0.05):
        await server.send_binary(bytes(100_000))  # nobody reads: stuck, then cancelled
    with pytest.raises(ConnectionClosed) as info:
        await server.send_binary(b"next")
    assert info.value.code == 1006
    with trio.fail_after(1):
        await server.aclose()  # no CLOSE can follow half a frame: just closes


@trio_test
async def test_send_cancelled_before_it_starts_leaves_the_stream_usable() -> None:
    client, server = await open_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.send_binary(b"never")
    await server.send_binary(b"fine")
    assert await client.receive_batch() == [(OP_BINARY, b"fine")]


# ------------------------------------------------------------------ closing


@trio_test
async def test_client_close_code_reaches_server_reader() -> None:
    client, server = await open_pair()
    async with trio.open_nursery() as nursery:
        async def serve() -> None:
            with pytest.raises(ConnectionClosed) as info:
                await server.receive_batch()
            assert (info.value.code, info.value.reason) == (4000, "bye")
            assert server.conn.state is ConnectionState.CLOSED  # echo written
            await server.aclose()
        nursery.start_soon(serve)
        await client.aclose(4000, "bye")
    assert client.conn.state is ConnectionState.CLOSED
    assert client.closed is not None and client.closed.code == 4000


@trio_test
async def test_server_close_code_reaches_client_reader() -> None:
    client, server = await open_pair()
    async with trio.open_nursery() as nursery:
        async def read() -> None:
            with pytest.raises(ConnectionClosed) as info:
                await client.receive_batch()
            assert (info.value.code, info.value.reason) == (4409, "session already has a writer")
            await client.aclose()
        nursery.start_soon(read)
        await server.aclose(4409, "session already has a writer")
    assert server.conn.state is ConnectionState.CLOSED


@trio_test
async def test_aclose_while_another_task_reads() -> None:
    client, server = await open_pair()

    async def keep_reading(ws: WebSocketStream, out: list[ConnectionClosed]) -> None:
        try:
            while True:
                await ws.receive_batch()
        except ConnectionClosed as exc:
            out.append(exc)
            await ws.aclose()

    server_seen: list[ConnectionClosed] = []
    client_seen: list[ConnectionClosed] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_reading, server, server_seen)
        nursery.start_soon(keep_reading, client, client_seen)
        await trio.testing.wait_all_tasks_blocked()
        await server.aclose(4410, "session ended")
    assert [(e.code, e.reason) for e in client_seen] == [(4410, "session ended")]
    assert [e.code for e in server_seen] == [4410]


@trio_test
async def test_messages_before_close_in_one_read_come_first() -> None:
    client, server = await open_pair()
    await client.stream.send_all(client.conn.send_binary(b"last words")
                                 + client.conn.send_close(1000))
    assert await server.receive_batch() == [(OP_BINARY, b"last words")]
    with pytest.raises(ConnectionClosed) as info:
        await server.receive_batch()
    assert info.value.code == 1000
    with pytest.raises(ConnectionClosed):
        await server.receive_batch()  # and again: closed stays closed


@trio_test
async def test_send_after_close_raises_connection_closed() -> None:
    client, server = await open_pair()
    await client.stream.send_all(client.conn.send_close(1001, "gone"))
    with pytest.raises(ConnectionClosed):
        await server.receive_batch()
    for send in (server.send_binary(b"x"), server.send_text("x"), server.send_raw(b"x"),
                 server.ping(b"")):
        with pytest.raises(ConnectionClosed) as info:
            await send
        assert info.value.code == 1001


@trio_test
async def test_eof_without_close_is_1006() -> None:
    client, server = await open_pair()
    await client.stream.aclose()
    with pytest.raises(ConnectionClosed) as info:
        await server.receive_batch()
    assert info.value.code == 1006


@trio_test
async def test_aclose_in_a_cancelled_scope_still_sends_close() -> None:
    client, server = await open_pair()
    async with trio.open_nursery() as nursery:
        async def client_reader() -> None:
            with pytest.raises(ConnectionClosed) as info:
                await client.receive_batch()
            assert (info.value.code, info.value.reason) == (1001, "draining")
        nursery.start_soon(client_reader)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.aclose(1001, "draining")  # shielded inside: completes the handshake
        assert not scope.cancelled_caught or server.conn.state is ConnectionState.CLOSED
    assert server.conn.state is ConnectionState.CLOSED


@mock_clock_test
async def test_aclose_gives_up_after_close_timeout() -> None:
    client, server = await open_pair(close_timeout_s=5.0)
    start = trio.current_time()
    await server.aclose(1000)  # the client never answers
    assert trio.current_time() - start == pytest.approx(5.0)
    assert await read_frames(client.stream, 1) == [(OP_CLOSE, encode_close_payload(1000))]
    assert await read_to_eof(client.stream) == b""


@trio_test
async def test_aclose_rejects_a_reserved_code_and_still_closes() -> None:
    client, server = await open_pair()
    with pytest.raises(LocalProtocolError):
        await server.aclose(1006)
    assert await read_to_eof(client.stream) == b""


@trio_test
async def test_aclose_is_idempotent() -> None:
    client, server = await open_pair()
    async with trio.open_nursery() as nursery:
        async def client_reader() -> None:
            with pytest.raises(ConnectionClosed):
                await client.receive_batch()
        nursery.start_soon(client_reader)
        await server.aclose()
        await server.aclose(4000)
    assert server.closed is not None and server.closed.code == 1000


# ------------------------------------------------------------------ violations


@pytest.mark.parametrize(("frame", "code", "reason"), [
    (encode_frame(OP_BINARY, b"x"), 1002, "unmasked client frame"),
    (encode_frame(OP_TEXT, b"\xff", mask_key=KEY), 1007, "invalid UTF-8 in text message"),
    (encode_frame(OP_BINARY, bytes(201), mask_key=KEY), 1009, "frame too big"),
])
@trio_test
async def test_violation_sends_its_close_code_then_raises(frame: bytes, code: int,
                                                          reason: str) -> None:
    client, server = await open_pair(limits=WsLimits(max_frame_bytes=200))
    await client.stream.send_all(frame)
    with pytest.raises(ConnectionClosed) as info:
        await server.receive_batch()
    assert (info.value.code, info.value.reason) == (code, reason)
    [(opcode, payload)] = await read_frames(client.stream, 1)
    assert opcode == OP_CLOSE and parse_close_payload(payload) == (code, reason)
    async with trio.open_nursery() as nursery:
        # A failing server sends FIN and drains until the peer closes too
        # (a lingering close), so its CLOSE is not lost to a TCP reset.
        nursery.start_soon(server.aclose)
        assert await read_to_eof(client.stream) == b""
        await client.stream.aclose()


# ------------------------------------------------------------------ heartbeat


@mock_clock_test
async def test_heartbeat_keeps_an_answering_link_alive() -> None:
    client, server = await open_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.receive_batch)  # answers PINGs while it waits
        nursery.start_soon(server.receive_batch)  # feeds PONGs to the heartbeat
        hb = await nursery.start(heartbeat, server, 15.0)
        await trio.sleep(200)
        assert hb.missed == 0 and not hb.is_dead
        assert hb.rtt_s == 0.0  # virtual time: the answer is instant
        assert server.conn.state is ConnectionState.OPEN
        nursery.cancel_scope.cancel()


@mock_clock_test
async def test_heartbeat_aborts_a_silent_link_with_1011() -> None:
    client, server = await open_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        hb = await nursery.start(heartbeat, server, 15.0)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await server.receive_batch()  # the client never reads, so never answers
    assert info.value.code == 1011
    assert "no pong" in info.value.reason
    assert hb.is_dead
    assert trio.current_time() - start == pytest.approx(45.0)
    frames = await read_frames(client.stream, 3)
    assert [op for op, _ in frames] == [OP_PING, OP_PING, OP_CLOSE]
    assert parse_close_payload(frames[2][1])[0] == 1011


# ------------------------------------------------------------------ handshakes


async def _refused(request: bytes, **kwargs: Any) -> tuple[HandshakeError, bytes]:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(request)
    with pytest.raises(HandshakeError) as info:
        await server_handshake(b, select_subprotocol=kwargs.pop("select", first_protocol),
                               **kwargs)
    return info.value, await read_to_eof(a)  # EOF: the server closed the stream


@trio_test
async def test_bad_version_gets_426_with_supported_version() -> None:
    err, answer = await _refused(raw_request(("Sec-WebSocket-Version", "8"),
                                             drop=("Sec-WebSocket-Version",)))
    assert err.http_status == 426
    assert answer.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nsec-websocket-version: 13\r\n" in answer.lower()


@trio_test
async def test_missing_upgrade_gets_400() -> None:
    err, answer = await _refused(raw_request(drop=("Upgrade",)))
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"missing 'Upgrade: websocket' header\n")


@trio_test
async def test_refused_origin_gets_403() -> None:
    err, answer = await _refused(raw_request(("Origin", "https://evil.example")),
                                 origin_ok=lambda origin: origin is None)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")


@trio_test
async def test_oversized_request_head_gets_431() -> None:
    # h11 bounds an *incomplete* head: a client still sending headers past the limit.
    unfinished = raw_request(("X-Big", "a" * 5000))[:-2]
    err, answer = await _refused(unfinished, read_limit=1024)
    assert err.http_status == 431
    assert answer.startswith(b"HTTP/1.1 431 ")


@trio_test
async def test_garbage_gets_400() -> None:
    err, answer = await _refused(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


@trio_test
async def test_select_subprotocol_may_refuse() -> None:
    def none_supported(offered: list[str]) -> str | None:
        raise HandshakeError(f"none of {offered} is supported", 400)

    err, answer = await _refused(raw_request(("Sec-WebSocket-Protocol", "chat")),
                                 select=none_supported)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"none of ['chat']" in answer


@trio_test
async def test_eof_before_a_request_is_a_handshake_error() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"GET / HT")
    await a.aclose()
    with pytest.raises(HandshakeError):
        await server_handshake(b, select_subprotocol=first_protocol)


@trio_test
async def test_accept_on_after_the_router_read_the_request() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(raw_request(("Sec-WebSocket-Protocol", "v5.channel.k8s.io")))
    h = h11.Connection(h11.SERVER)
    h.receive_data(bytes(await b.receive_some(65536)))
    request = h.next_event()
    assert isinstance(request, h11.Request)
    upgrade = parse_upgrade(request)
    ws = await accept_on(b, h, upgrade, "v5.channel.k8s.io")
    assert ws.subprotocol == "v5.channel.k8s.io"
    answer = await a.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-protocol: v5.channel.k8s.io\r\n" in answer.lower()
    await a.send_all(encode_frame(OP_BINARY, b"\x00ls\n", mask_key=KEY))
    assert await ws.receive_batch() == [(OP_BINARY, b"\x00ls\n")]


@trio_test
async def test_client_handshake_refused_reports_status_and_body() -> None:
    a, b = trio.testing.memory_stream_pair()

    async def refuse() -> None:
        h = h11.Connection(h11.SERVER)
        while not isinstance(h.next_event(), h11.Request):
            h.receive_data(bytes(await b.receive_some(65536)))
        body = b'{"kind":"Status","code":403}'
        out = h.send(h11.Response(status_code=403, headers=[("Content-Length", str(len(body)))]))
        await b.send_all((out or b"") + (h.send(h11.Data(data=body)) or b""))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        with pytest.raises(HandshakeError) as info:
            await client_handshake(a, "test", "/", ["podterm.v1"])
    assert info.value.http_status == 403
    assert '"code":403' in info.value.message
