"""podterm.v1 attach, resume, join and the session lifecycle, end to end over loopback.

Each test drives the protocol directly (``podterm.net.wsconn`` + ``ClientCodec``)
against a real gateway whose sessions run real processes on the local upstream.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from tests.helpers.tasks import tasks_in

from podterm.protocol.events import ErrorMsg, Gap, Hello, Stderr, Stdout
from podterm.protocol.offsets import InputLog
from podterm.session.session import SessionLimits, SessionState

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0


def _seq(n: int) -> bytes:
    return subprocess.run(["seq", "1", str(n)], check=True, capture_output=True).stdout


async def _finish(gateway: GatewayUnderTest, session_id: str) -> None:
    answer = await gateway.rest("DELETE", f"/api/v1/sessions/{session_id}")
    assert answer.status in (200, 410)


async def test_hello_fields(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], size={"cols": 100, "rows": 30})
        client = await gateway.attach(created["id"])
        hello = await client.wait_hello()
        assert hello == Hello(
            session=created["id"], resume_token=hello.resume_token, state="running", mode="rw",
            out_offset=0, ring_start=0, in_acked=0, cols=100, rows=30, window=256 * 1024,
            heartbeat_s=15.0, notices=())
        # Rotated on attach: the token from POST no longer works.
        assert hello.resume_token and hello.resume_token != created["resume_token"]
        assert client.events[0] == hello  # hello comes first
        await client.send_stdin(b"hi\n")
        await client.wait_output(b"hi\r\nhi\r\n")  # the tty's echo, then cat's copy
        await client.wait_for(lambda c: 3 in c.in_acks)  # input ACKed once written
        got = await gateway.rest("GET", f"/api/v1/sessions/{created['id']}")
        assert got.json["in_offset"] == 3 and got.json["writers"] == 1
        await client.aclose()
        await _finish(gateway, created["id"])


async def test_resume_replays_exactly_the_missing_bytes(gateway: GatewayUnderTest) -> None:
    # 1.3 MB of output: more than the window and the ring; cut three times.
    expected = _seq(200_000)
    with trio.fail_after(WAIT_S * 3):
        created = await gateway.create(["seq", "1", "200000"], tty=False)
        received = bytearray()
        token = created["resume_token"]
        offset = 0
        for cut_after in (50_000, 400_000, 900_000, None):
            client = await gateway.attach(created["id"], offset=offset, resume_token=token)
            hello = await client.wait_hello()
            assert hello.out_offset == offset  # replay starts where we left off
            assert client.gaps == []
            token = hello.resume_token
            if cut_after is None:
                code = await client.wait_closed()
                assert code == 1000
                assert client.exit is not None and client.exit.code == 0
            else:
                await client.wait_for(lambda c, n=cut_after: c.offset >= n)
                await client.cut()
            received += client.output
            offset = client.offset
        assert bytes(received) == expected
        replayed = gateway.gw.counters.snapshot().replayed_bytes
        assert replayed >= 0
        session = None
        try:
            session = gateway.registry.get(created["id"])
        except Exception:
            pass
        if session is not None:
            await session.wait_closed()
        assert len(gateway.registry) == 0  # EXIT was delivered: the session ended


async def test_input_is_applied_exactly_once_across_a_cut(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        log = InputLog()
        client = await gateway.attach(created["id"], resume_token=created["resume_token"])
        await client.wait_hello()
        for piece in (b"one\n", b"two\n"):
            log.append(piece)
            await client.send_stdin(piece)
        await client.wait_for(lambda c: c.in_acks and c.in_acks[-1] >= 4)
        log.ack(client.in_acks[-1])
        piece = b"three\n"
        log.append(piece)
        await client.send_stdin(piece)
        await client.cut()  # maybe before, maybe after the gateway took "three\n"
        output = bytes(client.output)
        client = await gateway.attach(created["id"], offset=client.offset,
                                      resume_token=client.hello.resume_token)
        hello = await client.wait_hello()
        # Re-send everything the gateway has not accepted, then new input.
        resend = log.replay_from(hello.in_acked)
        if resend:
            await client.send_stdin(resend)
        log.append(b"four\n")
        await client.send_stdin(b"four\n")
        await client.wait_output(b"four\n")
        output += bytes(client.output)
        assert output == b"one\ntwo\nthree\nfour\n"
        await client.aclose()
        await _finish(gateway, created["id"])


async def test_gap_when_offset_left_the_ring(make_gateway: GatewayFactory) -> None:
    limits = SessionLimits(ring_bytes=8192, ring_chunk_bytes=4096, window_bytes=4096)
    gateway = await make_gateway(session_limits=limits)
    expected = _seq(5000)  # 23,893 bytes: far more than the ring
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "seq 1 5000; exec cat"], tty=False)
        client = await gateway.attach(created["id"])
        hello = await client.wait_hello()
        await client.wait_for(lambda c: c.offset >= len(expected))
        assert bytes(client.output) == expected
        await client.cut()
        again = await gateway.attach(created["id"], offset=0, resume_token=hello.resume_token)
        hello2 = await again.wait_hello()
        assert hello2.ring_start > 0 and hello2.out_offset == hello2.ring_start
        await again.wait_for(lambda c: c.offset >= len(expected))
        gaps = [e for e in again.events if isinstance(e, Gap)]
        assert gaps == [Gap(0, hello2.ring_start)]
        assert again.events.index(gaps[0]) == 1  # right after hello
        assert bytes(again.output) == expected[hello2.ring_start:]
        await again.aclose()
        await _finish(gateway, created["id"])
    assert gateway.gw.counters.snapshot().gaps == 1


async def test_offset_beyond_output_is_refused(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"], offset=999)
        assert await client.wait_closed() == 1008
        errors = [e for e in client.events if isinstance(e, ErrorMsg)]
        assert errors and errors[0].code == "bad_offset"
        await _finish(gateway, created["id"])


async def test_writer_takeover_needs_the_resume_token(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        first = await gateway.attach(created["id"])
        hello1 = await first.wait_hello()
        # Without the token (or with the stale one from POST): refused, 4409.
        for token in (None, created["resume_token"]):
            intruder = await gateway.attach(created["id"], resume_token=token)
            assert await intruder.wait_closed() == 4409
            assert any(isinstance(e, ErrorMsg) and e.code == "conflict" for e in intruder.events)
        # With the current token: the new connection takes over.
        second = await gateway.attach(created["id"], resume_token=hello1.resume_token)
        hello2 = await second.wait_hello()
        assert hello2.mode == "rw" and hello2.resume_token != hello1.resume_token
        assert await first.wait_closed() == 4409
        await second.send_stdin(b"still here\n")
        await second.wait_output(b"still here\r\nstill here\r\n")
        assert gateway.gw.counters.snapshot().takeovers == 1
        await second.aclose()
        await _finish(gateway, created["id"])


async def test_viewer_sees_output_and_may_not_type(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        writer = await gateway.attach(created["id"])
        await writer.wait_hello()
        viewer = await gateway.attach(created["id"], mode="ro")
        hello = await viewer.wait_hello()
        assert hello.mode == "ro" and hello.resume_token is None
        await writer.send_stdin(b"shared\n")
        await viewer.wait_output(b"shared\r\nshared\r\n")
        await viewer.send_stdin(b"rm -rf /\n")
        assert await viewer.wait_closed() == 1008
        # The writer and the session are unaffected.
        await writer.send_stdin(b"after\n")
        await writer.wait_output(b"after\r\nafter\r\n")
        assert b"rm -rf" not in bytes(writer.output)
        await writer.aclose()
        await _finish(gateway, created["id"])


async def test_no_tty_session_keeps_stdout_and_stderr_apart(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "echo out; echo err >&2"], tty=False)
        client = await gateway.attach(created["id"])
        assert await client.wait_closed() == 1000
        out = b"".join(e.data for e in client.events if isinstance(e, Stdout))
        err = b"".join(e.data for e in client.events if isinstance(e, Stderr))
        assert (out, err) == (b"out\n", b"err\n")


async def test_process_exit_sends_exit_then_1000(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "echo done; exit 3"])
        client = await gateway.attach(created["id"])
        assert await client.wait_closed() == 1000
        assert b"done" in client.output
        assert client.exit is not None
        assert (client.exit.code, client.exit.signal, client.exit.reason) == (3, None, "exited")
        session = gateway.registry.get(created["id"]) if len(gateway.registry) else None
        if session is not None:
            await session.wait_closed()
        answer = await gateway.rest("GET", f"/api/v1/sessions/{created['id']}")
        assert answer.status == 410  # delivered, then reaped


async def test_exited_session_stays_attachable_for_the_tail(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "echo tail-end; exit 7"])
        session = gateway.registry.get(created["id"])
        # Nobody is attached: the process exits, the session waits in "exited".
        await session.wait_exited()
        assert session.state is SessionState.EXITED
        got = await gateway.rest("GET", f"/api/v1/sessions/{created['id']}")
        assert got.json["state"] == "exited"
        assert got.json["exit"] == {"code": 7, "signal": None, "reason": "exited"}
        client = await gateway.attach(created["id"], resume_token=created["resume_token"])
        hello = await client.wait_hello()
        assert hello.state == "exited"
        assert await client.wait_closed() == 1000
        assert b"tail-end" in client.output and client.exit.code == 7
        await session.wait_closed()


async def test_delete_sends_exit_then_4410(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        answer = await gateway.rest("DELETE", f"/api/v1/sessions/{created['id']}")
        assert answer.status == 200 and answer.json["state"] == "closed"
        assert await client.wait_closed() == 4410
        assert client.exit is not None and client.exit.reason == "killed"


async def test_detach_leaves_the_session_running(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await client.send_detach()
        assert await client.wait_closed() == 1000
        session = gateway.registry.get(created["id"])
        assert await session.wait_state(SessionState.DETACHED) is SessionState.DETACHED
        got = await gateway.rest("GET", f"/api/v1/sessions/{created['id']}")
        assert got.json["state"] == "detached" and got.json["writers"] == 0
        await _finish(gateway, created["id"])


async def test_resize_reaches_the_terminal(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh"], size={"cols": 80, "rows": 24})
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await client.send_resize(132, 43)
        await client.send_stdin(b"stty size\n")
        await client.wait_output(b"43 132")
        await client.aclose()
        await _finish(gateway, created["id"])


async def test_dead_heartbeat_detaches_the_session(make_gateway: GatewayFactory) -> None:
    limits = SessionLimits(heartbeat_interval_s=0.2)
    gateway = await make_gateway(session_limits=limits)
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        # Stop answering: read raw bytes (PINGs) without ever sending a PONG.
        raw = b""
        while chunk := await client.ws.stream.receive_some(4096):
            raw += chunk
        await client.ws.stream.aclose()
        assert raw.count(b"\x89\x08") >= 2  # at least two unanswered PINGs came
        session = gateway.registry.get(created["id"])
        # detached, not ended
        assert await session.wait_state(SessionState.DETACHED) is SessionState.DETACHED
        assert gateway.gw.counters.snapshot().heartbeat_failures == 1
        await _finish(gateway, created["id"])


async def test_grace_expiry_ends_the_session(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(session_limits=SessionLimits(grace_s=0.3))
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        session = gateway.registry.get(created["id"])
        await client.cut()
        await session.wait_closed()
        assert session.end_reason == "grace"
        assert (await gateway.rest("GET", f"/api/v1/sessions/{created['id']}")).status == 410
        assert gateway.gw.counters.snapshot().sessions_ended["grace"] == 1


async def test_idle_timeout_ends_an_attached_session(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(session_limits=SessionLimits(idle_timeout_s=0.3))
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        assert await client.wait_closed() == 4410
        assert client.exit is not None and client.exit.reason == "idle"


async def test_output_waits_for_the_writer_even_after_exit(make_gateway: GatewayFactory) -> None:
    # Window 4 KiB: with nobody attached the gateway reads one window, then
    # stops reading; the rest waits in the pipe, even after the process exits.
    limits = SessionLimits(ring_bytes=8192, ring_chunk_bytes=4096, window_bytes=4096,
                           exit_drain_s=0.1)
    gateway = await make_gateway(session_limits=limits)
    expected = _seq(5000)  # 23,893 bytes: fits the pipe, not the window
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["seq", "1", "5000"], tty=False)
        session = gateway.registry.get(created["id"])
        await session.stream.wait_exit()
        # Longer than the exit drain: held-back output must not be dropped.
        # (A timer that must NOT fire; nothing here waits for a race.)
        await trio.sleep(limits.exit_drain_s * 5)
        assert session.out_offset == 4096
        assert session.state is SessionState.RUNNING  # exited, but output is pending
        client = await gateway.attach(created["id"], resume_token=created["resume_token"])
        assert await client.wait_closed() == 1000
        assert bytes(client.output) == expected
        assert client.exit is not None and client.exit.code == 0
        await session.wait_closed()


async def test_lagging_viewer_gets_a_gap(make_gateway: GatewayFactory) -> None:
    limits = SessionLimits(ring_bytes=8192, ring_chunk_bytes=4096, window_bytes=4096)
    gateway = await make_gateway(session_limits=limits)
    expected = _seq(5000)
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "seq 1 5000; exec cat"], tty=False)
        viewer = await gateway.attach(created["id"], mode="ro", auto_ack=False)
        await viewer.wait_hello()
        await viewer.wait_for(lambda c: c.offset >= 4096)  # one window, then it stalls
        writer = await gateway.attach(created["id"], resume_token=created["resume_token"])
        await writer.wait_for(lambda c: c.offset >= len(expected))
        assert bytes(writer.output) == expected  # the viewer never held the writer back
        ring_start = gateway.registry.get(created["id"]).ring.start
        viewer.auto_ack = True
        await viewer.send_ack(viewer.offset)
        await viewer.wait_for(lambda c: c.offset >= len(expected))
        # It fell a full ring behind (once or more): each gap says from where
        # to where, the first from the byte it stalled at, the last to the
        # ring start it resumed from; every byte it did get is the right one.
        assert viewer.gaps and viewer.gaps[0].from_offset == 4096
        assert viewer.gaps[-1].to_offset == ring_start
        for offset, data in viewer.segments:
            assert expected[offset:offset + len(data)] == data
        lost = sum(g.lost for g in viewer.gaps)
        assert len(viewer.output) + lost == len(expected)
        assert bytes(viewer.output).endswith(expected[ring_start:])
        await viewer.aclose()
        await writer.aclose()
        await _finish(gateway, created["id"])


async def test_max_age_ends_even_a_busy_session(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(session_limits=SessionLimits(max_age_s=0.3))
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "while :; do echo tick; sleep 0.05; done"])
        client = await gateway.attach(created["id"])
        await client.wait_output(b"tick")
        assert await client.wait_closed() == 4410
        assert client.exit is not None and client.exit.reason == "max_age"
        assert gateway.gw.counters.snapshot().sessions_ended == {"max_age": 1}


async def test_input_with_no_output_is_acked_alone_after_the_deferral(
        gateway: GatewayUnderTest) -> None:
    """No echo ever rides with it: the ACK goes alone once the process's AckTimer fires."""
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "cat > /dev/null"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        for n, chunk in enumerate((b"one\n", b"two\n", b"three\n"), start=1):
            sent = sum(len(c) for c in (b"one\n", b"two\n", b"three\n")[:n])
            await client.send_stdin(chunk)
            await client.wait_for(lambda c, sent=sent: sent in c.in_acks)
        assert client.output == b""  # nothing came back to carry them
        await client.aclose()
        await _finish(gateway, created["id"])


@contextlib.asynccontextmanager
async def _reading(client: Any) -> AsyncIterator[None]:
    """A task reading ``client`` (answering PINGs, ACKing output) while the block runs."""
    async with trio.open_nursery() as nursery:
        async def read() -> None:
            while await client.pump():
                pass

        nursery.start_soon(read)
        yield
        nursery.cancel_scope.cancel()


def _link_tasks() -> int:
    """Tasks of this run working for an attached link now: its receiver or its sender."""
    return tasks_in("receive_loop") + tasks_in("send_loop")


async def test_an_idle_link_runs_no_task_and_is_still_pinged(
        make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = SessionLimits(heartbeat_interval_s=0.2)
    gateway = await make_gateway(session_limits=limits)
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        att = gateway.registry.get(created["id"]).writer
        async with _reading(client):  # a reader: it answers every PING
            typed = b""
            idle = gateway.gw.attach.idle
            assert idle is not None
            for key in (b"a", b"b", b"c"):
                # Idle: neither a sender nor a receiver task; the socket is
                # watched by the server's one IdleSockets task.
                await _wait_until(lambda: _link_tasks() == 0 and len(idle) == 1)
                typed += key
                await client.send_stdin(key)
                await _wait_until(lambda t=typed: bytes(client.output) == t)
            # Heartbeats: the process's timer starts the sender for each PING,
            # and the sender queues the next deadline; the client answers (the
            # PONG starts a receiver, which reads it and leaves), so the link
            # lives on through many intervals with no task of its own in between.
            seen: set[float] = set()
            while len(seen) < 4:
                if att.timer_at is not None:
                    seen.add(att.timer_at)
                await trio.sleep(0.05)
            await _wait_until(lambda: _link_tasks() == 0 and len(idle) == 1)
            assert gateway.gw.counters.snapshot().heartbeat_failures == 0
            assert gateway.registry.get(created["id"]).writer is att  # still attached
        await client.aclose()
        await _finish(gateway, created["id"])


def _count_starts(monkeypatch: pytest.MonkeyPatch, method: str) -> list[float]:
    """Patch ``_Link.<method>`` (a task's body, or the first receiver's call) to note
    when each call starts; what it returns is returned."""
    from podterm.gateway import attach as attach_module

    started: list[float] = []
    original = getattr(attach_module._Link, method)

    async def counted(self: Any) -> Any:
        started.append(trio.current_time())
        return await original(self)

    monkeypatch.setattr(attach_module._Link, method, counted)
    return started


async def _wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a condition no event announces (the caller bounds the wait)."""
    while not predicate():
        await trio.sleep(0.01)


async def test_a_failing_sender_aborts_its_own_link_only(gateway: GatewayUnderTest,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one link's sender (it runs in the server's nursery, beside every
    other connection) closes that link with 1011; the session and the others go on."""
    from podterm.gateway import attach as attach_module

    with trio.fail_after(WAIT_S):
        good = await gateway.create(["cat"])
        bad = await gateway.create(["cat"])
        good_client = await gateway.attach(good["id"])
        await good_client.wait_hello()
        original = attach_module._Link._collect_output

        def broken(self: Any, parts: list[Any]) -> None:
            if self.session.id == bad["id"]:
                raise RuntimeError("a bug in the sender")
            original(self, parts)

        monkeypatch.setattr(attach_module._Link, "_collect_output", broken)
        bad_client = await gateway.attach(bad["id"])
        assert await bad_client.wait_closed() == 1011
        await good_client.send_stdin(b"still here\n")
        await good_client.wait_output(b"still here\r\nstill here\r\n")
        monkeypatch.undo()
        # The session itself lives on: attach again (the writer's token).
        again = await gateway.attach(bad["id"], resume_token=bad["resume_token"])
        await again.wait_hello()
        await again.send_stdin(b"fine\n")
        await again.wait_output(b"fine\r\nfine\r\n")
        for client in (good_client, again):
            await client.aclose()
        await _finish(gateway, good["id"])
        await _finish(gateway, bad["id"])


async def test_a_client_that_leaves_without_a_word_ends_its_link_with_no_task(
        make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIN without a CLOSE, or a reset, seen by the idle watcher's call ends the
    link there: out of the session, the socket closed, the counts given back,
    without starting a receiver or a sender task for it."""
    receivers = _count_starts(monkeypatch, "_receiver_task")
    senders = _count_starts(monkeypatch, "run_sender")
    gateway = await make_gateway()
    gw = gateway.gw
    idle = gw.attach.idle
    assert idle is not None
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        session = gateway.registry.get(created["id"])
        for leave in ("fin", "reset"):
            client = await gateway.attach(created["id"])
            await client.wait_hello()
            await _wait_until(lambda: len(idle) == 1 and _link_tasks() == 0)
            before = (len(receivers), len(senders))
            if leave == "reset":  # SO_LINGER 0: the close sends RST
                client.ws.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
            await client.cut()
            await _wait_until(lambda: len(idle) == 0 and gw._links == 0
                              and gw._connections == 0 and session.writer is None)
            assert (len(receivers), len(senders)) == before, leave
        # A receiver in its task (here: no idle watcher at all) that reads the
        # end wakes no sender either: nothing can be sent to a client that left.
        gw.attach.idle = None
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await _wait_until(lambda: session.writer is not None and session.writer.parked)
        before = (len(receivers), len(senders))
        await client.cut()
        await _wait_until(lambda: gw._links == 0 and gw._connections == 0
                          and session.writer is None)
        assert (len(receivers), len(senders)) == before
        gw.attach.idle = idle
        assert not session.is_exited  # detached, not ended: it waits for a resume
        again = await gateway.attach(created["id"])  # and takes one
        await again.wait_hello()
        await again.send_stdin(b"back\n")
        await again.wait_for(lambda c: bytes(c.output).endswith(b"back\n"))
        await again.aclose()
        await _finish(gateway, created["id"])


async def test_a_quiet_link_ends_cleanly_whichever_side_ends_it(
        make_gateway: GatewayFactory) -> None:
    """A link with no task of its own (its socket watched) still ends completely:
    the client's cut, a detach, a kill and the drain each reach it, and the
    connection's counts and its address's share are given back."""
    from podterm.config import LimitsConfig

    gateway = await make_gateway(limits=LimitsConfig(max_connections_per_ip=2))
    gw = gateway.gw
    idle = gw.attach.idle
    assert idle is not None

    async def quiet_link() -> tuple[str, Any]:
        created = await gateway.create(["cat"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await _wait_until(lambda: len(idle) == 1 and _link_tasks() == 0)
        return created["id"], client

    def released() -> bool:
        return (len(idle) == 0 and gw._links == 0 and gw._connections == 0
                and gw.clients.held("127.0.0.1") == 0)

    with trio.fail_after(WAIT_S):
        # 1. The client goes away without a word (a cut: the watcher sees the EOF).
        session_id, client = await quiet_link()
        await client.cut()
        await _wait_until(released)
        assert gateway.registry.get(session_id).writer is None  # detached, not ended
        # Twice more than the address's cap of 2: every share was given back.
        for _ in range(2):
            again = await gateway.attach(session_id)
            await again.wait_hello()
            await _wait_until(lambda: len(idle) == 1)
            await again.send_detach()  # 2. a detach wakes a receiver: 1000
            assert await again.wait_closed() == 1000
            await _wait_until(released)
        # 3. A kill reaches it through the sender: EXIT, then 4410.
        again = await gateway.attach(session_id)
        await again.wait_hello()
        await _wait_until(lambda: len(idle) == 1 and _link_tasks() == 0)
        await _finish(gateway, session_id)
        assert await again.wait_closed() == 4410
        await _wait_until(released)
        # 4. The drain: drain, then 1001, and the gateway stops.
        _, client = await quiet_link()
        gw.shutdown("test drain")
        assert await client.wait_closed() == 1001
        await gateway.finished.wait()
        assert released()


async def test_a_typing_links_keystrokes_start_no_task(
        make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keystroke and the ACK of its echo are applied by the idle watcher's
    call itself: a typing link runs no receiver task; what must wait (input
    beyond the session's buffer) still starts one, and nothing is lost."""
    started = _count_starts(monkeypatch, "_receiver_task")
    gateway = await make_gateway(session_limits=SessionLimits(window_bytes=4096,
                                                              input_buffer_bytes=4096))
    idle = gateway.gw.attach.idle
    assert idle is not None
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        async with _reading(client):  # a reader: it ACKs the echoes
            await _wait_until(lambda: len(idle) == 1)  # quiet since the hello
            first = len(started)
            typed = b""
            for key in b"typing":
                typed += bytes([key])
                await client.send_stdin(bytes([key]))
                await _wait_until(lambda t=typed: bytes(client.output) == t)
            await _wait_until(lambda: len(idle) == 1 and _link_tasks() == 0)
            assert len(started) == first  # six keys, six echoes ACKed: no receiver task
            # More than the session's input buffer takes at once: the
            # watcher's call leaves it to a receiver task, which waits for room.
            bulk = bytes(range(256)) * 64  # 16 KiB
            await client.send_stdin(bulk)
            await _wait_until(lambda: bytes(client.output) == typed + bulk)
            assert len(started) > first
            await _wait_until(lambda: len(idle) == 1 and _link_tasks() == 0)  # quiet again
        await client.aclose()
        await _finish(gateway, created["id"])


async def test_a_new_link_is_watched_from_the_start_with_no_read_or_receiver(
        make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing follows the upgrade request: after the hello the connection's
    task hands the socket to the idle watcher at once (no receiver, no read
    that would fail with EAGAIN); the first keystroke is still applied."""
    receivers = _count_starts(monkeypatch, "receive_loop")
    gateway = await make_gateway()
    idle = gateway.gw.attach.idle
    assert idle is not None
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await _wait_until(lambda: len(idle) == 1)
        assert receivers == []  # watched since the hello: no receiver ever ran
        async with _reading(client):
            await client.send_stdin(b"k")
            await _wait_until(lambda: bytes(client.output) == b"k")
            assert receivers == []  # the watcher's call applied the keystroke
        await client.aclose()
        await _finish(gateway, created["id"])


async def test_the_hello_goes_out_without_a_sender_task(
        gateway: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link's first batch (the 101, the hello, the replay) is written by the
    connection's own task when the socket takes it at once; the exit of a
    process that ended before the attach is still the sender's (EXIT, 1000)."""
    senders = _count_starts(monkeypatch, "run_sender")
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "echo hi; exec cat"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await client.wait_for(lambda c: bytes(c.output) == b"hi\n")
        assert senders == []
        await client.aclose()
        await _finish(gateway, created["id"])
        done = await gateway.create(["true"], tty=False)
        await _wait_until(lambda: gateway.registry.get(done["id"]).is_exited)
        late = await gateway.attach(done["id"])
        assert await late.wait_closed() == 1000  # EXIT, then the close: the sender's
        assert senders


async def test_a_pty_sessions_echo_needs_no_output_pump_task(
        gateway: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet terminal is watched, not read by a waiting pump: the echo of a
    keystroke goes into the session from the watcher's call; output beyond
    what the session takes at once still goes through the pump, whole."""
    from podterm.session.session import Session

    pumps: list[float] = []
    original = Session._pump_output

    async def counted(self: Session) -> None:
        pumps.append(trio.current_time())
        await original(self)

    monkeypatch.setattr(Session, "_pump_output", counted)
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sh", "-c", "stty -icanon; exec cat"], tty=True)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await _wait_until(lambda: tasks_in("_pump_output") == 0)  # the terminal is quiet
        started = len(pumps)
        for key in b"pty":
            await client.send_stdin(bytes([key]))
            # The terminal's echo, then cat's copy (no line discipline: -icanon).
            await client.wait_for(lambda c, k=bytes([key]) * 2: bytes(c.output).endswith(k))
        assert bytes(client.output).endswith(b"ppttyy")
        assert len(pumps) == started  # no pump task for the echoes
        await client.aclose()
        await _finish(gateway, created["id"])
        # 400 KB at once: more than the window and the ring; the pump takes
        # over for the flow control, and leaves once the terminal is quiet.
        bulk = await gateway.create(
            ["sh", "-c", "read go; head -c 400000 /dev/zero | tr '\\000' z; read end"],
            tty=True)
        client = await gateway.attach(bulk["id"])
        await client.wait_hello()
        await _wait_until(lambda: tasks_in("_pump_output") == 0)
        started = len(pumps)
        await client.send_stdin(b"\n")
        # Unread, unacknowledged: the window fills, the session refuses the
        # rest, and a pump task waits for the client's credit.
        await _wait_until(lambda: len(pumps) > started)
        await client.wait_for(lambda c: bytes(c.output).count(b"z") >= 400_000)
        assert bytes(client.output).count(b"z") == 400_000  # whole, nothing twice
        await _wait_until(lambda: tasks_in("_pump_output") == 0)  # quiet again: it left
        await client.aclose()
        await _finish(gateway, bulk["id"])


async def test_an_idle_links_heartbeat_starts_no_task(
        make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PONG to a heartbeat PING is read by the idle watcher's call itself
    (WebSocketStream.read_nowait): no receiver task per heartbeat; input that
    comes the same way still reaches the session, once."""
    started = _count_starts(monkeypatch, "_receiver_task")
    senders = _count_starts(monkeypatch, "run_sender")
    gateway = await make_gateway(session_limits=SessionLimits(heartbeat_interval_s=0.1))
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        att = gateway.registry.get(created["id"]).writer
        assert att is not None
        async with _reading(client):  # a reader: it answers every PING
            await _wait_until(lambda: att.parked)  # the hello is out
            senders_before = len(senders)
            seen: set[float] = set()
            while len(seen) < 6:  # six heartbeats, each answered
                if att.timer_at is not None:
                    seen.add(att.timer_at)
                await trio.sleep(0.02)
            assert started == []  # no receiver task for any PONG ...
            assert len(senders) == senders_before  # ... nor a sender task for a PING
            assert gateway.gw.counters.snapshot().heartbeat_failures == 0
            await client.send_stdin(b"after\n")  # input: applied by the watcher's call too
            await _wait_until(lambda: bytes(client.output) == b"after\n")
            assert started == []
        await client.aclose()
        await _finish(gateway, created["id"])
