"""``AckTimer``: one FIFO for every link's deferred input ACK (virtual time)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from podterm.session.attachment import ACK_TIMER_SLACK_S, INPUT_ACK_DELAY_S, AckTimer

pytestmark = pytest.mark.trio


class FakeAttachment(SimpleNamespace):
    def __init__(self) -> None:
        super().__init__(ack_queued=False, fired=[])

    def ack_overdue_now(self) -> None:
        self.fired.append(trio.current_time())


async def test_each_link_is_woken_once_after_the_delay_in_order(
        autojump_clock: trio.abc.Clock) -> None:
    timer = AckTimer()
    links: list[Any] = [FakeAttachment() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        start = trio.current_time()
        timer.schedule(links[0])
        timer.schedule(links[0])  # a second keystroke in the same deferral: one entry
        assert len(timer) == 1 and links[0].ack_queued
        await trio.sleep(0.01)
        timer.schedule(links[1])
        timer.schedule(links[2])
        await trio.sleep(INPUT_ACK_DELAY_S + 2 * ACK_TIMER_SLACK_S + 0.02)
        assert len(timer) == 0
        for link, offset in zip(links, (0.0, 0.01, 0.01), strict=True):
            (at,) = link.fired
            assert INPUT_ACK_DELAY_S <= at - start - offset <= INPUT_ACK_DELAY_S \
                + ACK_TIMER_SLACK_S + 1e-9
            assert not link.ack_queued
        # Queued again after firing: a new deferral.
        timer.schedule(links[0])
        await trio.sleep(INPUT_ACK_DELAY_S + 2 * ACK_TIMER_SLACK_S)
        assert len(links[0].fired) == 2
        nursery.cancel_scope.cancel()


def _writer_link() -> tuple[Any, Any, list[float]]:
    """A real Attachment, parked, as its session's writer; its sender's starts noted."""
    from podterm.session.attachment import Attachment, Mode

    session = SimpleNamespace(in_written=0, writer=None,
                              limits=SimpleNamespace(window_bytes=256 * 1024))
    att = Attachment(session, Mode.RW, 0, 0, 0)  # type: ignore[arg-type]
    session.writer = att
    started: list[float] = []

    class Relay:
        def flush_output(self) -> bool:
            return False

        def ping_nowait(self) -> bool:
            return False

        def start_sender(self) -> None:
            started.append(trio.current_time())

    att.relay = Relay()
    att.parked = True
    return session, att, started


async def test_an_ack_with_no_echo_to_ride_wakes_the_sender_after_the_delay(
        autojump_clock: trio.abc.Clock) -> None:
    session, att, started = _writer_link()
    start = trio.current_time()
    session.in_written = 1
    att.input_written(1)
    await trio.sleep(INPUT_ACK_DELAY_S + 2 * ACK_TIMER_SLACK_S)
    assert len(started) == 1 and att.ack_overdue
    assert started[0] - start <= INPUT_ACK_DELAY_S + ACK_TIMER_SLACK_S + 1e-9


async def test_steady_typing_whose_echoes_take_the_acks_starts_no_sender(
        autojump_clock: trio.abc.Clock) -> None:
    """Each echo takes the ACK along; the timer finds the last key's unsent: deferred again."""
    session, att, started = _writer_link()
    step = INPUT_ACK_DELAY_S / 4
    for i in range(40):  # ten deferrals' worth of keys, each echoed (ACK sent) step later
        session.in_written += 1
        att.input_written(session.in_written - att.in_ack_sent)
        await trio.sleep(step)
        # (every other echo came before the next key was written upstream)
        att.in_ack_sent = session.in_written - 1 if i % 2 else session.in_written
    assert started == []
    assert att.ack_queued  # still deferred, not dropped
    # Typing stops with one key's ACK unsent: it leaves within §6's 100 ms.
    session.in_written += 1
    last_key = trio.current_time()
    att.input_written(session.in_written - att.in_ack_sent)
    await trio.sleep(0.2)
    assert len(started) == 1 and att.ack_overdue
    assert started[0] - last_key <= 2 * (INPUT_ACK_DELAY_S + ACK_TIMER_SLACK_S) + 1e-9 < 0.1
