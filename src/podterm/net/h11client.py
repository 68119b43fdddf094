"""Reading an HTTP/1.1 answer with h11 over a trio stream: one client helper for every caller.

The gateway speaks HTTP as a client in three places: to the apiserver
(``upstream/kube.py``), to a peer gateway (``gateway/peers.py``) and to the
TokenReview/SubjectAccessReview endpoint (``auth/tokenreview.py``).  They
differ only in policy, which is a parameter here:

* what an answer body over ``limit`` means: an error (:class:`AnswerTooLarge`)
  or the first ``limit`` bytes (``truncate=True``, for error bodies that are
  only quoted);
* whether the connection closing before the answer ends is an error
  (:class:`AnswerClosed`) or the end of the body (``eof_ends=True``).

No timeouts here: the caller bounds the exchange (``trio.fail_after``).
"""

from __future__ import annotations

import h11
import trio

__all__ = ["READ_BYTES", "AnswerClosed", "AnswerTooLarge", "next_event", "read_body",
           "read_head"]

#: Bytes asked of one read of the answer.
READ_BYTES = 65536


class AnswerClosed(Exception):
    """The server closed the connection before its answer was complete."""


class AnswerTooLarge(Exception):
    """The answer's body is longer than the caller's limit."""


async def next_event(stream: trio.abc.Stream, conn: h11.Connection) -> object:
    """The next h11 event, reading from ``stream`` as long as h11 needs data."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(READ_BYTES)))


async def read_head(stream: trio.abc.Stream,
                    conn: h11.Connection) -> h11.Response | h11.InformationalResponse:
    """The answer's head: a final response, or a ``101``; other 1xx are skipped.

    Raises:
        AnswerClosed: the connection closed before a head.
    """
    while True:
        event = await next_event(stream, conn)
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                return event
            continue
        if isinstance(event, h11.Response):
            return event
        raise AnswerClosed("the server closed the connection before answering")


async def read_body(stream: trio.abc.Stream, conn: h11.Connection, *, limit: int,
                    truncate: bool = False, eof_ends: bool = False) -> bytes:
    """The answer's body, after :func:`read_head` (or any head event).

    Args:
        limit: the most bytes kept.
        truncate: past ``limit``, return the first ``limit`` bytes (the rest
            is not read) instead of raising :class:`AnswerTooLarge`.
        eof_ends: a connection closed before the end of the body ends it
            instead of raising :class:`AnswerClosed`.
    """
    body = bytearray()
    while True:
        event = await next_event(stream, conn)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                if truncate:
                    return bytes(body[:limit])
                raise AnswerTooLarge(f"answer body over {limit} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            if eof_ends:
                return bytes(body)
            raise AnswerClosed("the server closed the connection in the middle of its answer")
