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
