"""``DeadlineTimer``: one heap for every parked sender's heartbeat deadline (virtual time)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from podterm.session.attachment import DeadlineTimer

pytestmark = pytest.mark.trio


class FakeAttachment(SimpleNamespace):
    def __init__(self) -> None:
        super().__init__(timer_at=None, fired=[])

    def timer_due(self) -> None:
        self.fired.append(trio.current_time())


async def test_each_link_is_woken_at_its_own_deadline(autojump_clock: trio.abc.Clock) -> None:
    timer = DeadlineTimer()
    links = [FakeAttachment() for _ in range(3)]
    links_any: list[Any] = links
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        timer.schedule(links_any[0], t0 + 30)
        timer.schedule(links_any[1], t0 + 10)  # earlier than what the timer sleeps for
        timer.schedule(links_any[2], t0 + 20)
        timer.schedule(links_any[2], t0 + 25)  # later than its queued entry: no-op
        assert len(timer) == 3
        await trio.sleep(31)
        assert [link.fired for link in links] == [[t0 + 30], [t0 + 10], [t0 + 20]]
        assert all(link.timer_at is None for link in links)
        assert len(timer) == 0
        nursery.cancel_scope.cancel()


async def test_an_earlier_deadline_supersedes_the_queued_one(
        autojump_clock: trio.abc.Clock) -> None:
    timer = DeadlineTimer()
    link: Any = FakeAttachment()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        timer.schedule(link, t0 + 30)
        await trio.sleep(5)
        timer.schedule(link, t0 + 12)  # the deadline moved earlier
        assert link.timer_at == t0 + 12
        await trio.sleep(40)
        assert link.fired == [t0 + 12]  # once: the superseded entry is skipped
        assert len(timer) == 0
        # Queued again after it fired.
        timer.schedule(link, trio.current_time() + 1)
        await trio.sleep(2)
        assert len(link.fired) == 2
        nursery.cancel_scope.cancel()


async def test_an_idle_link_parks_without_a_cancel_scope_and_still_gets_pinged(
        autojump_clock: trio.abc.Clock) -> None:
    """The real Attachment: a sender parked with no deadline is woken for its PING."""
    from podterm.session.attachment import Attachment, Mode

    class _Session(SimpleNamespace):
        pass

    att = Attachment(_Session(), Mode.RW, 0, 0, 0)  # type: ignore[arg-type]
    timer = DeadlineTimer()
    woke: list[float] = []

    async def sender() -> None:
        timer.schedule(att, trio.current_time() + 20)
        att.parked = True
        try:
            await att.wait_woken()
        finally:
            att.parked = False
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        assert att.parked
        await trio.sleep(21)
        assert woke == [t0 + 20]
        nursery.cancel_scope.cancel()
