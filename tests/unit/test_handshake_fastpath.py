"""The cheap handshake path (issue 9): what it skips must not change what it does.

* the ``hello`` written directly is byte for byte the JSON form, and what
  it refuses to write is what a peer would refuse to read;
* the auditor builds no event while no sink takes them, and every event
  once any sink does (audit completeness);
* ``serve_listeners`` closes every accepted stream a handler leaves open,
  and does not close again one the handler closed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from podterm.audit.sinks import FanOutSink, MemorySink
from podterm.errors import LocalProtocolError
from podterm.gateway.auditor import Auditor
from podterm.gateway.http import serve_listeners
from podterm.protocol.events import Hello
from podterm.protocol.session_proto import MAX_OFFSET, control_body, parse_control

_CONTROL_TYPES = frozenset({"hello", "gap", "drain", "error", "detach", "stdin_eof"})


def _json_form(h: Hello) -> bytes:
    """The hello as the generic encoder wrote it before: a dict through json.dumps."""
    obj: dict[str, Any] = {
        "type": "hello", "session": h.session, "resume_token": h.resume_token,
        "state": h.state, "mode": h.mode, "out_offset": h.out_offset,
        "ring_start": h.ring_start, "in_acked": h.in_acked,
        "size": {"cols": h.cols, "rows": h.rows}, "window": h.window,
        "heartbeat_s": int(h.heartbeat_s) if h.heartbeat_s == int(h.heartbeat_s)
        else h.heartbeat_s, "notices": list(h.notices)}
    if h.stdin_closed:
        obj["stdin_closed"] = True
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


_text = st.text(max_size=40)
_offsets = st.integers(0, MAX_OFFSET)


@st.composite
def _hellos(draw: st.DrawFn) -> Hello:
    out = draw(_offsets)
    return Hello(session=draw(_text), resume_token=draw(st.none() | _text),
                 state=draw(st.sampled_from(["running", "exited"])),
                 mode=draw(st.sampled_from(["rw", "ro"])), out_offset=out,
                 ring_start=draw(st.integers(0, out)), in_acked=draw(_offsets),
                 cols=draw(st.integers(1, 1000)), rows=draw(st.integers(1, 1000)),
                 window=draw(st.integers(1, MAX_OFFSET)),
                 heartbeat_s=draw(st.sampled_from([15, 15.0, 0.5, 1e-3, 2.5e10])),
                 notices=tuple(draw(st.lists(_text, max_size=3))),
                 stdin_closed=draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(_hellos())
def test_hello_bytes_are_the_json_form_and_parse_back(hello: Hello) -> None:
    body = control_body(hello)
    assert body == _json_form(hello)
    parsed = parse_control(body, 0, _CONTROL_TYPES)
    assert isinstance(parsed, Hello)
    assert parsed.session == hello.session and parsed.out_offset == hello.out_offset
    assert parsed.notices == hello.notices and parsed.stdin_closed == hello.stdin_closed


_GOOD: dict[str, Any] = dict(session="s-1", resume_token=None, state="running", mode="rw",
                             out_offset=10, ring_start=0, in_acked=0, cols=80, rows=24,
                             window=65536, heartbeat_s=15)


@pytest.mark.parametrize("bad", [
    {"state": "paused"}, {"mode": "wo"}, {"heartbeat_s": 0}, {"heartbeat_s": float("nan")},
    {"heartbeat_s": float("inf")}, {"heartbeat_s": True}, {"ring_start": 11}, {"window": 0},
    {"notices": (1,)}, {"resume_token": 3}, {"session": None}, {"cols": 0},
    {"out_offset": -1}, {"stdin_closed": 1},
])
def test_hello_that_a_peer_would_refuse_is_not_written(bad: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        control_body(Hello(**{**_GOOD, **bad}))


@pytest.mark.trio
async def test_auditor_builds_nothing_without_a_sink_and_everything_with_one() -> None:
    off = Auditor(FanOutSink([FanOutSink([])]), None)
    assert not off.enabled
    await off.emit("admin.action", action="drain")  # returns at once: nothing to build
    off.emit_nowait("admin.action", action="drain")

    memory = MemorySink()
    on = Auditor(FanOutSink([FanOutSink([]), memory]), None)
    assert on.enabled
    async with trio.open_nursery() as nursery:
        await nursery.start(on.run)
        await on.emit("admin.action", action="drain")
        on.emit_nowait("admin.action", action="kill")
        assert [e.details["action"] for e in memory.of_type("admin.action")] == ["drain",
                                                                                 "kill"]
        # Swapping the sink re-decides.
        on.sink = FanOutSink([])
        assert not on.enabled
        on.sink = memory
        assert on.enabled
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_serve_listeners_closes_what_the_handler_left_open() -> None:
    closed_by_handler: list[trio.SocketStream] = []
    left_open: list[trio.SocketStream] = []
    done = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, trio.SocketStream)
        if not closed_by_handler:
            await stream.aclose()
            closed_by_handler.append(stream)
        else:
            left_open.append(stream)
            done.set()

    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_listeners(
                handler, listeners, handler_nursery=nursery, task_status=task_status))
            for _ in range(2):
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.aclose()
            await done.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert closed_by_handler[0].socket.fileno() == -1
    assert left_open[0].socket.fileno() == -1
