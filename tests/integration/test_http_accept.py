"""``serve_listeners`` takes bursts of connects without a checkpoint each, and loses none.

Loopback TCP: a burst larger than one accept batch is served whole, every
stream is closed when its handler returns, and stopping the listeners leaves
no descriptor behind (the duplicate descriptor the batches accept on included).
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from podterm.gateway import http

pytestmark = pytest.mark.trio

WAIT_S = 20


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_burst_of_connects_is_served_whole_and_cleaned_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    burst = http._ACCEPT_BATCH * 3 + 1
    baseline = _open_fds()
    served: list[bytes] = []
    all_served = trio.Event()
    batched: list[trio.SocketStream] = []
    accept_nowait = http._accept_nowait

    def counting(twin: socket.socket) -> trio.SocketStream | None:
        stream = accept_nowait(twin)
        if stream is not None:
            batched.append(stream)
        return stream

    monkeypatch.setattr(http, "_accept_nowait", counting)

    async def handler(stream: trio.abc.Stream) -> None:
        served.append(await stream.receive_some(16))
        if len(served) == burst:
            all_served.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=burst)
            port = listeners[0].socket.getsockname()[1]
            await nursery.start(lambda task_status: http.serve_listeners(
                handler, listeners, handler_nursery=nursery, task_status=task_status))
            clients: list[trio.SocketStream] = []
            try:
                # Blocking connects without a checkpoint between them: the
                # accept queue holds the whole burst when the server looks.
                for i in range(burst):
                    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
                    raw.sendall(b"%d" % i)
                    clients.append(trio.SocketStream(trio.socket.from_stdlib_socket(raw)))
                await all_served.wait()
                for client in clients:  # every handler returned: the gateway side closed
                    assert await client.receive_some(16) == b""
            finally:
                for client in clients:
                    await client.aclose()
            nursery.cancel_scope.cancel()
    assert sorted(served) == sorted(b"%d" % i for i in range(burst))
    # Every batch takes up to _ACCEPT_BATCH - 1 after one awaited accept.
    assert len(batched) >= burst - (burst + http._ACCEPT_BATCH - 1) // http._ACCEPT_BATCH
    assert _open_fds() == baseline
