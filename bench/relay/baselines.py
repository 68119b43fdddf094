"""The relay benchmark's baselines: minimal trio servers doing podterm's byte movement.

Run as a subprocess by ``bench/relay/run.py`` (one process per server, like
the gateway, so each gets the same scheduler and the same CPU share)::

    python bench/relay/baselines.py raw-relay --port-file F --cmd '["cat", "/tmp/x"]'
    python bench/relay/baselines.py tws-relay --port-file F --cmd '["sh", "-c", "..."]' --tty
    python bench/relay/baselines.py raw-echo  --port-file F
    python bench/relay/baselines.py tws-echo  --port-file F

``raw-relay``
    trio TCP server; per connection it starts ``--cmd`` (in a PTY with
    ``--tty``, else on pipes) and relays bytes both ways with one task per
    direction: ``receive_some(64 KiB)`` then ``send_all``.  This is the floor
    for any trio relay: no framing, no flow control, no offsets.
``tws-relay``
    the same with trio-websocket (``serve_websocket``, library defaults): each
    process read becomes one binary message, each message received is written
    to the process.
``raw-echo`` / ``tws-echo``
    the same servers with an in-process echo instead of a process: the
    numbers issue 9's table quotes (47k and 15.5k msg/s), for context.

Nothing here imports podterm.  The process is killed when its connection ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_port_file  # noqa: E402

READ_SIZE = 65536
_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Proc:
    """A started command with a readable and a writable trio stream."""

    def __init__(self, process: trio.Process, out: trio.abc.ReceiveStream,
                 inp: trio.abc.SendStream, close: Callable[[], Awaitable[None]]) -> None:
        self.process = process
        self.out = out
        self.inp = inp
        self._close = close

    async def aclose(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass
        await self._close()
        with trio.move_on_after(5):
            await self.process.wait()


async def start_command(cmd: list[str], tty: bool) -> _Proc:
    """Start ``cmd`` in a new session, in a PTY (``tty``) or on pipes."""
    if tty:
        master, slave = os.openpty()
        try:
            process = await trio.lowlevel.open_process(
                cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        finally:
            os.close(slave)
        stream = trio.lowlevel.FdStream(master)
        return _Proc(process, stream, stream, stream.aclose)
    process = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None and process.stdin is not None
    out, inp = process.stdout, process.stdin

    async def close() -> None:
        await trio.aclose_forcefully(out)
        await trio.aclose_forcefully(inp)

    return _Proc(process, out, inp, close)


# --------------------------------------------------------------- raw TCP


async def raw_relay(stream: trio.SocketStream, cmd: list[str], tty: bool) -> None:
    proc = await start_command(cmd, tty)
    try:
        async with trio.open_nursery() as nursery:

            async def upstream() -> None:  # socket → process
                try:
                    while data := await stream.receive_some(READ_SIZE):
                        await proc.inp.send_all(data)
                except _ERRORS:
                    pass
                nursery.cancel_scope.cancel()

            async def downstream() -> None:  # process → socket
                try:
                    while data := await proc.out.receive_some(READ_SIZE):
                        await stream.send_all(data)
                except _ERRORS:
                    pass
                try:
                    await stream.send_eof()
                except _ERRORS:
                    pass

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)
    finally:
        with trio.CancelScope(shield=True):
            await proc.aclose()
            await trio.aclose_forcefully(stream)


async def raw_echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(READ_SIZE):
            await stream.send_all(data)
    except _ERRORS:
        pass
    finally:
        await trio.aclose_forcefully(stream)


# --------------------------------------------------------- trio-websocket


async def tws_relay(request: object, cmd: list[str], tty: bool) -> None:
    from trio_websocket import ConnectionClosed

    try:
        ws = await request.accept(  # type: ignore[attr-defined]
            subprotocol=_first_subprotocol(request))
    except (ConnectionClosed, *_ERRORS):
        return  # trio-websocket ends the whole server on a handler's exception
    proc = await start_command(cmd, tty)
    try:
        async with trio.open_nursery() as nursery:

            async def upstream() -> None:
                try:
                    while True:
                        message = await ws.get_message()
                        await proc.inp.send_all(message if isinstance(message, bytes)
                                                else message.encode())
                except (ConnectionClosed, *_ERRORS):
                    pass
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                try:
                    while data := await proc.out.receive_some(READ_SIZE):
                        await ws.send_message(data)
                except (ConnectionClosed, *_ERRORS):
                    pass

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)
    finally:
        with trio.CancelScope(shield=True):
            await proc.aclose()


async def tws_echo(request: object) -> None:
    from trio_websocket import ConnectionClosed

    try:
        ws = await request.accept(  # type: ignore[attr-defined]
            subprotocol=_first_subprotocol(request))
        while True:
            await ws.send_message(await ws.get_message())
    except (ConnectionClosed, *_ERRORS):
        pass


def _first_subprotocol(request: object) -> str | None:
    offered = list(getattr(request, "proposed_subprotocols", ()) or ())
    return offered[0] if offered else None


# ------------------------------------------------------------------- main


async def serve(kind: str, port_file: str, cmd: list[str], tty: bool) -> None:
    if kind.startswith("raw"):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        write_port_file(port_file, listeners[0].socket.getsockname()[1])
        if kind == "raw-relay":
            async def handler(stream: trio.SocketStream) -> None:
                await raw_relay(stream, cmd, tty)
        else:
            handler = raw_echo
        await trio.serve_listeners(handler, listeners)
    else:
        from trio_websocket import serve_websocket

        if kind == "tws-relay":
            async def ws_handler(request: object) -> None:
                await tws_relay(request, cmd, tty)
        else:
            ws_handler = tws_echo
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, ws_handler, "127.0.0.1", 0, None)
            write_port_file(port_file, server.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("kind", choices=["raw-relay", "tws-relay", "raw-echo", "tws-echo"])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--cmd", default="[]", help="JSON argv of the relayed process")
    parser.add_argument("--tty", action="store_true", help="run the process in a PTY")
    ns = parser.parse_args(argv)
    cmd = json.loads(ns.cmd)
    if ns.kind.endswith("relay") and not cmd:
        parser.error("--cmd is required for a relay")
    # SIGTERM from the benchmark ends the process quietly (its children are
    # killed per connection; the benchmark kills the server's group at the end).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        trio.run(serve, ns.kind, ns.port_file, cmd, ns.tty)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
