"""One HTTP/1.1 exchange with h11, for tests that talk to a gateway by hand.

:func:`exchange` sends one request on any open trio stream (plain TCP, TLS, or a
connection through a balancer or PROXY-protocol hop) and reads the answer;
:func:`request` opens a fresh loopback connection for it.  An upgrade answer
(101) ends the exchange at its head: no body follows one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h11
import trio


@dataclass(frozen=True)
class HttpAnswer:
    """A REST answer: status, lower-cased headers, raw body, and the body as JSON."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


async def exchange(stream: trio.abc.Stream, method: str, path: str, *,
                   headers: Iterable[tuple[str, str]], body: bytes | None = None) -> HttpAnswer:
    """Send one request on ``stream`` and read its answer (the caller bounds the wait)."""
    hdrs = list(headers)
    if body:
        hdrs.append(("Content-Length", str(len(body))))
    conn = h11.Connection(h11.CLIENT)
    out = conn.send(h11.Request(method=method, target=path, headers=hdrs))
    if body:
        out += conn.send(h11.Data(data=body))
    await stream.send_all(out + conn.send(h11.EndOfMessage()))
    status, answer_headers, chunks = 0, {}, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response | h11.InformationalResponse):
            status = event.status_code
            answer_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            if status == 101:
                break  # an upgrade: no body follows, and h11 pauses here
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        else:  # EndOfMessage, ConnectionClosed
            break
    return HttpAnswer(status, answer_headers, b"".join(chunks))


async def request(port: int, method: str, path: str, *, token: str | None = None,
                  body: Any = None, raw_body: bytes | None = None, host: str = "127.0.0.1",
                  headers: Iterable[tuple[str, str]] = ()) -> HttpAnswer:
    """One request on a fresh connection to ``host:port``; ``body`` is sent as JSON."""
    hdrs = [("Host", f"{host}:{port}"), ("Connection", "close")]
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    data = raw_body
    if data is None and body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        hdrs.append(("Content-Type", "application/json"))
    hdrs += headers
    async with await trio.open_tcp_stream(host, port) as stream:
        return await exchange(stream, method, path, headers=hdrs, body=data)
