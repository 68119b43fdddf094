"""RESP2 codec (podterm.store._resp) and the pipelined connection, without sockets.

The parser is fed every reply whole, a byte at a time, and at every split
point (h11's rule); limits turn hostile input into RespProtocolError.  The
connection is driven over ``trio.testing.memory_stream_pair`` playing Redis.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from podterm.store._resp import (
    NEED_DATA,
    Reply,
    RespError,
    RespParser,
    RespProtocolError,
    encode_command,
)
from podterm.store.redis import _MAX_OUTBOX_BYTES, _Connection, _ConnectionLost

REPLIES: list[tuple[bytes, Reply]] = [
    (b"+OK\r\n", "OK"),
    (b"-ERR unknown command\r\n", RespError("ERR unknown command")),
    (b":0\r\n", 0),
    (b":-42\r\n", -42),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # a bulk string may contain CRLF
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n:1\r\n$1\r\nx\r\n*2\r\n+a\r\n$-1\r\n", [1, b"x", ["a", None]]),
]
STREAM = b"".join(data for data, _ in REPLIES)
EXPECTED = [reply for _, reply in REPLIES]


def drain(parser: RespParser) -> list[Reply]:
    out: list[Reply] = []
    while (reply := parser.next_reply()) is not NEED_DATA:
        out.append(reply)  # type: ignore[arg-type]
    return out


def test_whole_stream() -> None:
    parser = RespParser()
    parser.feed(STREAM)
    assert drain(parser) == EXPECTED
    assert parser.buffered == 0


def test_byte_at_a_time() -> None:
    parser = RespParser()
    got: list[Reply] = []
    for i in range(len(STREAM)):
        parser.feed(STREAM[i:i + 1])
        got += drain(parser)
    assert got == EXPECTED


@pytest.mark.parametrize("split", range(1, len(STREAM)))
def test_every_split_point(split: int) -> None:
    parser = RespParser()
    parser.feed(STREAM[:split])
    got = drain(parser)
    parser.feed(STREAM[split:])
    assert got + drain(parser) == EXPECTED


def test_error_kind_is_first_word() -> None:
    assert RespError("NOSCRIPT No matching script").kind == "NOSCRIPT"
    assert RespError("LOADING Redis is loading").kind == "LOADING"


@pytest.mark.parametrize("data, message", [
    (b"?what\r\n", "unknown RESP type"),
    (b":12a\r\n", "bad integer"),
    (b":1_000\r\n", "bad integer"),
    (b"$3\r\nabcXY", "not terminated by CRLF"),
    (b"$100\r\n", "bulk string of 100 bytes"),
    (b"*5\r\n", "array of 5 elements"),
    (b"*1\r\n*1\r\n*1\r\n:1\r\n", "nested deeper than 2"),
    (b"+" + b"x" * 40, "longer than 32 bytes"),
])
def test_limits_and_garbage_raise(data: bytes, message: str) -> None:
    parser = RespParser(max_bulk_bytes=10, max_array_len=4, max_depth=2, max_line_bytes=32)
    parser.feed(data)
    with pytest.raises(RespProtocolError, match=message):
        drain(parser)


def test_encode_command() -> None:
    assert encode_command(["SET", b"k\r\n", 12, 1.5]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n$3\r\n1.5\r\n")
    assert encode_command(["ECHO", "é"]) == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError):
        encode_command(["SET", True])
    with pytest.raises(ValueError):
        encode_command(["SET", float("nan")])
    with pytest.raises(ValueError):
        encode_command([])


# -- the pipelined connection over a memory stream --------------------------------------


class FakeRedis:
    """The server end: reads commands, answers each with a bulk string of its last argument."""

    def __init__(self, stream: trio.testing.MemoryStream) -> None:
        self.stream = stream
        self.commands: list[list[bytes]] = []
        self.answer = trio.Event()  # set: answer what has arrived

    async def serve(self) -> None:
        buffer = b""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            buffer += data
            # Commands are arrays of bulk strings: parse them with the reply parser.
            parser = RespParser()
            parser.feed(buffer)
            commands = drain(parser)
            buffer = buffer[len(buffer) - parser.buffered:]
            await self.answer.wait()
            for command in commands:
                assert isinstance(command, list)
                self.commands.append(command)  # type: ignore[arg-type]
                last = command[-1]
                assert isinstance(last, bytes)
                await self.stream.send_all(b"$%d\r\n%s\r\n" % (len(last), last))


@pytest.mark.trio
async def test_replies_match_callers_and_writes_coalesce() -> None:
    client, server = trio.testing.memory_stream_pair()
    fake = FakeRedis(server)
    dead: list[str | None] = []
    conn = _Connection(client, lambda c: dead.append(c.reason))
    results: dict[int, list[Reply]] = {}
    sends = 0
    real_send = client.send_all

    async def counting_send(data: bytes | bytearray | memoryview) -> None:
        nonlocal sends
        sends += 1
        await real_send(data)

    client.send_all = counting_send  # type: ignore[method-assign]

    async def call(i: int) -> None:
        results[i] = await conn.execute(encode_command(["ECHO", str(i)]), 1)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.reader, RespParser())
            nursery.start_soon(conn.writer)
            nursery.start_soon(fake.serve)
            async with trio.open_nursery() as callers:
                for i in range(50):
                    callers.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                fake.answer.set()
            nursery.cancel_scope.cancel()
    assert results == {i: [str(i).encode()] for i in range(50)}
    assert sends < 50  # queued while a send was in flight: sent together
    assert dead == []


@pytest.mark.trio
async def test_kill_fails_calls_in_flight_and_later_ones() -> None:
    client, server = trio.testing.memory_stream_pair()
    dead: list[str | None] = []
    conn = _Connection(client, lambda c: dead.append(c.reason))
    failures: list[str] = []

    async def call() -> None:
        with pytest.raises(_ConnectionLost) as info:
            await conn.execute(encode_command(["PING"]), 1)
        failures.append(str(info.value))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.reader, RespParser())
            nursery.start_soon(conn.writer)
            for _ in range(3):
                nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert conn.in_flight == 3
            await server.aclose()  # Redis goes away
    assert failures == ["redis closed the connection"] * 3
    assert dead == ["redis closed the connection"] and conn.is_dead
    with pytest.raises(_ConnectionLost):
        await conn.execute(encode_command(["PING"]), 1)


@pytest.mark.trio
async def test_outbox_is_bounded_when_redis_stops_reading() -> None:
    client, _server = trio.testing.lockstep_stream_pair()  # nobody reads: send_all blocks
    conn = _Connection(client, lambda c: None)
    big = encode_command(["SET", "k", b"x" * (_MAX_OUTBOX_BYTES // 3)])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.writer)
            for _ in range(3):  # the writer takes the first and blocks; two stay queued
                nursery.start_soon(conn.execute, big, 1)
                await trio.testing.wait_all_tasks_blocked()
            assert len(conn._outbox) == 2 * len(big)
            with pytest.raises(_ConnectionLost, match="already waiting to be sent"):
                await conn.execute(big, 1)
            assert not conn.is_dead  # refused, not broken: Redis may catch up
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_unsolicited_reply_kills_the_connection() -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = _Connection(client, lambda c: None)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.reader, RespParser())
            await server.send_all(b"+OK\r\n")
            await conn.wait_dead()
    assert conn.reason == "redis sent a reply nobody asked for"
