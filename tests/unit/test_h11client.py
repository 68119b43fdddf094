"""``podterm.net.h11client``: one answer reader, its limit and end-of-connection policies."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from podterm.net.h11client import AnswerTooLarge, read_body, read_head

pytestmark = pytest.mark.trio


async def answer(raw: bytes, *, close: bool = True, upgrade: bool = False
                 ) -> tuple[trio.abc.Stream, h11.Connection]:
    """A client connection that sent a GET and whose server wrote ``raw`` (then hung up)."""
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "x")]
    if upgrade:
        headers += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    conn.send(h11.Request(method="GET", target="/", headers=headers))
    conn.send(h11.EndOfMessage())
    await server.send_all(raw)
    if close:
        await server.aclose()
    return client, conn


async def test_a_100_continue_is_skipped_and_the_body_read_to_its_end() -> None:
    stream, conn = await answer(b"HTTP/1.1 100 Continue\r\n\r\n"
                                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    head = await read_head(stream, conn)
    assert isinstance(head, h11.Response) and head.status_code == 200
    assert await read_body(stream, conn, limit=5) == b"hello"


async def test_a_101_is_returned_as_the_head() -> None:
    stream, conn = await answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                b"Connection: Upgrade\r\n\r\n", close=False, upgrade=True)
    head = await read_head(stream, conn)
    assert isinstance(head, h11.InformationalResponse) and head.status_code == 101


async def test_a_body_over_the_limit_is_an_error_or_truncated() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
    stream, conn = await answer(raw)
    await read_head(stream, conn)
    with pytest.raises(AnswerTooLarge):
        await read_body(stream, conn, limit=4)
    stream, conn = await answer(raw)
    await read_head(stream, conn)
    assert await read_body(stream, conn, limit=4, truncate=True) == b"0123"


async def test_a_connection_closed_early_is_an_error_or_the_end() -> None:
    raw = b"HTTP/1.0 200 OK\r\n\r\npartial"  # HTTP/1.0, no length: the close ends it
    stream, conn = await answer(raw)
    await read_head(stream, conn)
    assert await read_body(stream, conn, limit=100) == b"partial"
    # Closed before any answer: h11 itself reports it (a protocol error, not an event).
    stream, conn = await answer(b"")
    with pytest.raises(h11.RemoteProtocolError):
        await read_head(stream, conn)
    # A length promised and not delivered: h11 reports it; eof_ends does not hide it.
    stream, conn = await answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    await read_head(stream, conn)
    with pytest.raises(h11.RemoteProtocolError):
        await read_body(stream, conn, limit=100, eof_ends=True)
