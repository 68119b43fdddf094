"""TunnelStream wakes each waiter only for what concerns it.

A task woken for nothing costs a task switch; on the agent path that was
paid per keystroke: the supervisor's ``wait_exit`` woke for every delivery
and ACK (an empty ParkingLot is falsy, so ``lot or self._lot`` parked it on
the output lot), and the output pump woke for every input ACK.
"""

from __future__ import annotations

import trio
import trio.testing

from podterm.errors import UpstreamError
from podterm.protocol.events import Exit, Gap
from podterm.store.base import PodIdentity
from podterm.upstream.agent import AgentInfo, AgentUpstream, TunnelStream, _Tunnel
from podterm.upstream.base import StreamSpec

_STDOUT = 1


class _StepCounter(trio.abc.Instrument):
    """Counts the steps (wake-ups) of the tasks it is told to watch."""

    def __init__(self) -> None:
        self.watched: dict[trio.lowlevel.Task, str] = {}
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        name = self.watched.get(task)
        if name is not None:
            self.steps[name] = self.steps.get(name, 0) + 1


def _stream(window: int = 4096) -> TunnelStream:
    upstream = AgentUpstream()
    tunnel = _Tunnel(upstream, AgentInfo(pod=PodIdentity("ns", "pod"), agent_id="a1"))
    return TunnelStream(1, StreamSpec(command=None, tty=True), window, tunnel)


def _run(main: object) -> None:
    async def bounded() -> None:
        with trio.fail_after(10):
            await main()  # type: ignore[operator]
    trio.run(bounded)


def test_wait_exit_sleeps_through_output_and_acks_and_wakes_on_exit() -> None:
    counter = _StepCounter()

    async def main() -> None:
        stream = _stream()
        trio.lowlevel.add_instrument(counter)
        exited: list[object] = []

        async def waiter() -> None:
            counter.watched[trio.lowlevel.current_task()] = "wait_exit"
            try:
                exited.append(await stream.wait_exit())
            except UpstreamError as exc:  # moved: the session ends here
                exited.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            before = counter.steps.get("wait_exit", 0)
            for i in range(50):
                stream.deliver(_STDOUT, b"x")
                assert stream.send_stdin_nowait(b"k") == 1
                stream.on_ack(i + 1)
                await trio.testing.wait_all_tasks_blocked()
            assert counter.steps.get("wait_exit", 0) == before  # 150 events, no wake-up
            assert not exited
            stream.hand_over("moved to another gateway")
            await trio.testing.wait_all_tasks_blocked()
        assert counter.steps["wait_exit"] > before  # woken by what ends the stream
        assert len(exited) == 1 and isinstance(exited[0], UpstreamError)
        trio.lowlevel.remove_instrument(counter)

    _run(main)


def test_the_output_reader_sleeps_through_input_acks() -> None:
    counter = _StepCounter()

    async def main() -> None:
        stream = _stream()
        trio.lowlevel.add_instrument(counter)
        got: list[tuple[int, bytes]] = []

        async def reader() -> None:
            counter.watched[trio.lowlevel.current_task()] = "reader"
            got.append(await stream.receive_some(100))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            before = counter.steps.get("reader", 0)
            for i in range(20):
                assert stream.send_stdin_nowait(b"k") == 1
                stream.on_ack(i + 1)
                await trio.testing.wait_all_tasks_blocked()
            assert counter.steps.get("reader", 0) == before
            stream.deliver(_STDOUT, b"echo")
        assert got == [(_STDOUT, b"echo")]
        trio.lowlevel.remove_instrument(counter)

    _run(main)


def test_a_sender_waiting_for_room_wakes_on_the_ack_that_makes_it() -> None:
    async def main() -> None:
        stream = _stream(window=4)
        assert stream.send_stdin_nowait(b"abcd") == 4  # the log is full
        sent = trio.Event()

        async def sender() -> None:
            await stream.send_stdin(b"ef")
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            stream.deliver(_STDOUT, b"output wakes no sender")
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            stream.on_ack(2)  # room for two bytes
            await sent.wait()
        assert stream.log.end == 6

    _run(main)


def test_a_sender_waiting_for_room_is_told_when_the_stream_is_lost() -> None:
    async def main() -> None:
        stream = _stream(window=1)
        assert stream.send_stdin_nowait(b"a") == 1
        errors: list[BaseException] = []

        async def sender() -> None:
            try:
                await stream.send_stdin(b"b")
            except trio.BrokenResourceError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            stream.fail("the agent restarted")
        assert len(errors) == 1

    _run(main)


def test_output_is_pushed_to_a_waiting_readers_sink_and_queued_when_refused() -> None:
    counter = _StepCounter()

    async def main() -> None:
        stream = _stream()
        trio.lowlevel.add_instrument(counter)
        pushed: list[tuple[int, bytes]] = []
        accept = [True]

        def sink(channel: int, data: bytes) -> bool:
            if accept[0]:
                pushed.append((channel, data))
            return accept[0]

        got: list[tuple[int, bytes]] = []

        async def reader() -> None:
            counter.watched[trio.lowlevel.current_task()] = "reader"
            got.append(await stream.receive_some(100))

        stream.deliver(_STDOUT, b"queued before any reader")
        stream.set_output_sink(sink)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [(_STDOUT, b"queued before any reader")]  # order: queue first
            assert pushed == []
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            before = counter.steps.get("reader", 0)
            for i in range(5):
                stream.deliver(_STDOUT, b"p%d" % i)
            assert pushed == [(_STDOUT, b"p%d" % i) for i in range(5)]
            await trio.testing.wait_all_tasks_blocked()
            assert counter.steps.get("reader", 0) == before  # nobody woken
            accept[0] = False  # no room: queued, and the reader is woken for it
            stream.deliver(_STDOUT, b"refused")
            accept[0] = True
            stream.deliver(_STDOUT, b"after")  # queued behind it: order is kept
        assert got[1] == (_STDOUT, b"refusedafter")
        assert len(pushed) == 5
        stream.set_output_sink(None)
        stream.deliver(_STDOUT, b"no sink")
        assert await stream.receive_some(100) == (_STDOUT, b"no sink")
        trio.lowlevel.remove_instrument(counter)

    _run(main)


def test_the_reader_may_leave_only_while_nothing_is_due_and_is_called_back_once() -> None:
    stream = _stream()
    calls: list[str] = []
    assert not stream.park_reader(lambda: calls.append("no sink"))  # nothing to push to
    pushed: list[bytes] = []
    accept = [True]

    def sink(channel: int, data: bytes) -> bool:
        if accept[0]:
            pushed.append(data)
        return accept[0]

    stream.set_output_sink(sink)
    assert stream.park_reader(lambda: calls.append("refused"))
    stream.deliver(_STDOUT, b"pushed while away")  # taken: no call back
    assert pushed == [b"pushed while away"] and calls == []
    accept[0] = False
    stream.deliver(_STDOUT, b"no room")  # queued: the reader is called back, once
    stream.deliver(_STDOUT, b"more")
    assert calls == ["refused"]
    assert not stream.park_reader(lambda: calls.append("queued"))  # output waits for it
    assert stream._take(100) == (_STDOUT, b"no roommore")
    assert stream.park_reader(lambda: calls.append("ended"))
    stream.on_gap(Gap(0, 5))  # the notice is queued output: called back
    assert calls == ["refused", "ended"]
    stream._take(1000)
    assert stream.park_reader(lambda: calls.append("exit"))
    stream.on_exit(Exit(code=0, signal=None, reason="exited"))
    assert calls[-1] == "exit"
    assert not stream.park_reader(lambda: calls.append("after exit"))  # EOF is due
    assert calls == ["refused", "ended", "exit"]
