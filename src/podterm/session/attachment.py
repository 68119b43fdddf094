"""One client's view of a session: its mode, its offsets, what it still has to be told.

An :class:`Attachment` is pure state plus a wake-up.  The relay that moves its
bytes (``podterm.gateway.attach``) owns the socket; the session owns the
attachment's place in the session (writer or viewer).  Both sides talk through
these fields, and every change that gives the relay's sender something to do
ends with :meth:`Attachment.wake`.

Offsets (docs/protocol.md §4, "Offsets"):

* ``sent`` — the output offset of the next byte this link will send;
* ``acked`` — the highest output offset the client ACKed on this link (starts
  at the offset it attached with: it has seen everything before it);
* ``in_cursor`` — the input offset of the next STDIN byte the client sends on
  this link (starts at the session's accepted input offset, the ``in_acked``
  of ``hello``: the client re-sends from there);
* ``in_ack_sent`` — the last input ACK sent on this link.

Nothing here blocks; nothing here does I/O.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from podterm.protocol.events import Drain, ErrorMsg, Gap, Hello

if TYPE_CHECKING:
    from podterm.session.session import Session

log = logging.getLogger(__name__)

__all__ = ["INPUT_ACK_DELAY_S", "AckTimer", "Attachment", "DeadlineTimer", "Mode", "Notice",
           "Relay", "Timed", "ack_timer", "deadline_timer"]

#: How long an input ACK may wait for output to leave with (see
#: :meth:`Attachment.input_written`); below §6's 100 ms, and long enough for
#: an echo to come back through a busy gateway (one pass of a loaded event
#: loop over many sessions takes several milliseconds).
INPUT_ACK_DELAY_S = 0.04

#: How late :class:`AckTimer` may be past :data:`INPUT_ACK_DELAY_S`: it wakes
#: at most once per this much, for every link's due ACKs at once (so at most
#: 45 ms in all, still below §6's 100 ms).
ACK_TIMER_SLACK_S = 0.005


class AckTimer:
    """The deferred input ACKs of every link in the process: one task, one FIFO.

    A keystroke written upstream makes an input ACK due; it waits up to
    :data:`INPUT_ACK_DELAY_S` for the echo to leave with it (one write, not
    two).  Moving the parked sender's cancel-scope deadline to say so, and
    back when the echo took the ACK along, cost two updates of trio's
    deadline heap per keystroke (about 6% of a small-frame round trip).
    Instead every link queues itself here once per deferral (a flag keeps it
    to one entry per link: the queue is bounded by the links).  All delays
    are the same, so the queue is in due order: appending and popping are
    O(1), and one task sleeps until the oldest entry is due (coalescing
    everything due within :data:`ACK_TIMER_SLACK_S`), then wakes the senders
    whose ACK is still unsent (:meth:`Attachment.ack_overdue_now`).

    One per trio run (:func:`ack_timer`), a system task: it never raises and
    ends with the run.
    """

    __slots__ = ("_queue", "_lot")

    def __init__(self) -> None:
        self._queue: deque[tuple[float, Attachment]] = deque()
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._queue)

    def schedule(self, att: Attachment) -> None:
        """Wake ``att``'s sender in :data:`INPUT_ACK_DELAY_S` unless its ACK went by then."""
        if att.ack_queued:
            return
        att.ack_queued = True
        self._queue.append((trio.current_time() + INPUT_ACK_DELAY_S, att))
        if len(self._queue) == 1:
            self._lot.unpark_all()

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                await self._lot.park()
                continue
            due = queue[0][0]
            if due > trio.current_time():
                await trio.sleep_until(due + ACK_TIMER_SLACK_S)
            now = trio.current_time()
            while queue and queue[0][0] <= now:
                _, att = queue.popleft()
                att.ack_queued = False
                att.ack_overdue_now()


class _Timer(Protocol):
    async def run(self) -> None: ...


_T = TypeVar("_T", bound=_Timer)


def _run_timer(var: trio.lowlevel.RunVar[_T], make: Callable[[], _T], name: str) -> _T:
    """This trio run's timer held in ``var``, made and started (a system task) on first use."""
    try:
        return var.get()
    except LookupError:
        timer = make()
        var.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name=name)
        return timer


_ACK_TIMER: trio.lowlevel.RunVar[AckTimer] = trio.lowlevel.RunVar("podterm_ack_timer")


def ack_timer() -> AckTimer:
    """This trio run's :class:`AckTimer`, started on first use."""
    return _run_timer(_ACK_TIMER, AckTimer, "podterm.ack_timer")


class Timed(Protocol):
    """What :class:`DeadlineTimer` wakes: an attachment's sender, a session's supervisor."""

    #: When the timer calls :meth:`timer_due` next (None: not queued).
    timer_at: float | None

    def timer_due(self) -> None:
        """The deadline came (called from the timer's task; must not block or raise)."""


class DeadlineTimer:
    """Calls each waiting object back at its deadline: one task, one heap for the process.

    A parked sender waited under a cancel scope whose deadline was the next
    PING, and a session's supervisor under one whose deadline was its next
    timer (detach grace, idle timeout, maximum age): a ``CancelScope`` and its
    ``CancelStatus`` per idle link and per session (about 0.6 KiB each) and
    an update of trio's deadline heap every time a sender parked (per
    keystroke).  Instead each queues its deadline here (:meth:`schedule`, a
    no-op while an entry at or before that time is queued) and parks with no
    deadline, or leaves its task altogether.  When an entry is due the timer
    calls the object's :meth:`Timed.timer_due`, which wakes it: the sender
    sends the PING or declares the peer dead, the supervisor checks its
    timers, exactly as when their scopes expired.

    Entries superseded by an earlier one, or cancelled (:meth:`cancel`: the
    object ended), are skipped when they come up; a later deadline is found
    when the queued one passes and nothing expired.  Skipped entries still in
    the heap are bounded: once they are more than half of it, the heap is
    rebuilt without them (so an ended session is not held for hours until its
    idle timeout comes up).  One per trio run
    (:func:`deadline_timer`), a system task: it never raises and ends with the
    run.
    """

    __slots__ = ("_heap", "_lot", "_seq", "_stale")

    #: Skipped entries tolerated before the heap is rebuilt (and half of it).
    COMPACT_ABOVE = 64

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._seq = itertools.count()
        self._stale = 0  # entries in the heap that will be skipped

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, obj: Timed, due: float) -> None:
        """Call ``obj.timer_due()`` at ``due`` (unless an entry at or before it is queued)."""
        queued = obj.timer_at
        if queued is not None:
            if queued <= due:
                return
            self._superseded()
        obj.timer_at = due
        heap = self._heap
        heapq.heappush(heap, (due, next(self._seq), obj))
        if heap[0][2] is obj:
            self._lot.unpark_all()  # the earliest entry moved: the timer re-reads it

    def cancel(self, obj: Timed) -> None:
        """Forget ``obj``'s queued deadline (it ended): it is not called, nor held for long."""
        if obj.timer_at is not None:
            obj.timer_at = None
            self._superseded()

    def _superseded(self) -> None:
        self._stale += 1
        heap = self._heap
        if self._stale > self.COMPACT_ABOVE and self._stale * 2 > len(heap):
            heap[:] = [entry for entry in heap if entry[2].timer_at == entry[0]]
            heapq.heapify(heap)
            self._stale = 0

    async def run(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                await self._lot.park()
                continue
            due = heap[0][0]
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await self._lot.park()
                continue
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                due, _, obj = heapq.heappop(heap)
                if obj.timer_at != due:  # superseded by an earlier entry, or cancelled
                    self._stale = max(0, self._stale - 1)
                    continue
                obj.timer_at = None
                try:
                    obj.timer_due()
                except Exception:  # noqa: BLE001 - one object's bug ends no other's timer
                    log.exception("deadline_timer.callback_failed %r", obj)


_DEADLINE_TIMER: trio.lowlevel.RunVar[DeadlineTimer] = trio.lowlevel.RunVar(
    "podterm_deadline_timer")


def deadline_timer() -> DeadlineTimer:
    """This trio run's :class:`DeadlineTimer`, started on first use."""
    return _run_timer(_DEADLINE_TIMER, DeadlineTimer, "podterm.deadline_timer")


#: What the sender still has to send, in order, before any output: ``hello``,
#: ``gap``, ``drain`` and ``error`` control messages.
Notice = Hello | Gap | Drain | ErrorMsg


class Relay(Protocol):
    """A relay whose sender leaves its task while parked (``podterm.gateway.attach``).

    Held by the attachment itself (:attr:`Attachment.relay`), not as three
    bound methods: an idle session keeps fewer objects for the GC to walk.
    """

    def flush_output(self) -> bool:
        """Send new output from the caller's task; False: the sender must run."""

    def ping_nowait(self) -> bool:
        """Send the heartbeat's PING from the timer's task; False: the sender must run."""

    def start_sender(self) -> None:
        """Start the sender's task (it parked: returned with nothing to send)."""


class Mode(enum.Enum):
    """docs/protocol.md §3: ``rw`` is the single writer, ``ro`` a viewer."""

    RW = "rw"
    RO = "ro"


class Attachment:
    """One client connection attached to a session.

    Attributes:
        session: the session attached to.
        mode: writer or viewer.
        sent, acked, in_cursor, in_ack_sent: see the module docstring.
        replay_end: the output offset that was the live end at attach time;
            bytes sent below it are replayed (for the ``replayed_bytes`` metric).
        notices: control messages queued for the sender.
        close: ``(code, reason)`` once the link is to be closed: the sender
            flushes notices (and EXIT when due), then closes with it.
        gone: True once the client is gone (connection lost): nothing more
            can be sent.
        exit_sent: True once EXIT went out on this link.
    """

    __slots__ = ("session", "mode", "sent", "acked", "in_cursor", "in_ack_sent", "replay_end",
                 "notices", "close", "gone", "exit_sent", "resumed", "parked", "relay",
                 "ack_queued", "ack_base", "ack_overdue", "timer_at", "_lot")

    def __init__(self, session: Session, mode: Mode, offset: int, in_offset: int,
                 live_end: int) -> None:
        self.session = session
        self.mode = mode
        self.sent = offset
        self.acked = offset
        self.in_cursor = in_offset
        self.in_ack_sent = in_offset
        self.replay_end = live_end
        self.notices: list[Notice] = []
        self.close: tuple[int, str] | None = None
        self.gone = False
        self.exit_sent = False
        self.resumed = False
        #: True while the relay's sender is parked (waiting to be woken).
        self.parked = False
        #: The relay whose sender leaves its task while parked: it sends new
        #: output (:meth:`output_ready`) and PINGs (:meth:`timer_due`) from
        #: the caller's task, and :meth:`wake` starts its sender again.  None
        #: for a relay whose sender stays and parks in :meth:`wait_woken`.
        self.relay: Relay | None = None
        #: In the :class:`AckTimer`'s queue now.
        self.ack_queued = False
        #: :attr:`in_ack_sent` when the deferral in the queue began.
        self.ack_base = in_offset
        #: The deferred input ACK waited its :data:`INPUT_ACK_DELAY_S`: send it alone.
        self.ack_overdue = False
        #: When the :class:`DeadlineTimer` wakes the sender next (None: not queued).
        self.timer_at: float | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None  # wait_woken's, made on first use

    def __repr__(self) -> str:
        state = "gone" if self.gone else ("closing" if self.close else "open")
        return (f"<Attachment {self.session.id} {self.mode.value} {state} sent={self.sent} "
                f"acked={self.acked} in={self.in_cursor}>")

    @property
    def is_writer(self) -> bool:
        """True for the ``rw`` attachment (whether or not it is still the session's writer)."""
        return self.mode is Mode.RW

    def wake(self) -> None:
        """Wake the sender: there may be output, credit, a notice or a close.

        A :attr:`relay`'s sender has no task while it is :attr:`parked` (it
        returned with nothing to send): waking starts one, once.  Otherwise
        the sender parked in :meth:`wait_woken` is unparked.
        """
        relay = self.relay
        if relay is not None:
            if self.parked:
                self.parked = False
                relay.start_sender()
            return
        lot = self._lot
        if lot is not None:
            lot.unpark_all()

    def output_ready(self) -> None:
        """New output is in the ring: send it now, or wake the sender.

        While the sender is parked, the :attr:`relay` may send the output from
        the caller's task (no task switch); it returns False when it could
        not, and the sender is woken as for any change.
        """
        relay = self.relay
        if relay is None or not self.parked or not relay.flush_output():
            self.wake()

    def input_written(self, unacked: int) -> None:
        """Input was written upstream: an input ACK is due, ``unacked`` bytes' worth.

        The ACK need not leave alone: a parked sender is only told to wake
        within :data:`INPUT_ACK_DELAY_S`, so that the output the input causes
        (a keystroke's echo) usually goes in the same write.  A quarter of the
        window unacknowledged wakes it at once (docs/protocol.md §6: an ACK at
        least every half window and every 100 ms).  A sender that is not parked
        sees the ACK due on its next turn.
        """
        if unacked >= self.session.limits.window_bytes // 4:
            self.wake()
            return
        if self.parked:
            self.defer_ack()

    def defer_ack(self) -> None:
        """Queue the due input ACK in the :class:`AckTimer` (once per deferral)."""
        if not self.ack_queued:
            self.ack_base = self.in_ack_sent
            ack_timer().schedule(self)

    def ack_overdue_now(self) -> None:
        """:class:`AckTimer`: the deferral is over; wake the sender if the ACK is still unsent.

        When an ACK left meanwhile (with an echo), what it did not cover was
        written after it left, less than :data:`INPUT_ACK_DELAY_S` ago: the
        deferral starts again instead (a typist's next echo takes it along),
        so no input waits more than twice the delay plus the timer's slack
        for its ACK (85 ms, within docs/protocol.md §6's 100 ms).  Under
        steady typing that is no lone ACK, and no sender task, per 40 ms.
        """
        session = self.session
        if (not self.gone and self is session.writer
                and session.in_written > self.in_ack_sent):
            if self.in_ack_sent > self.ack_base and self.parked:
                self.defer_ack()
                return
            self.ack_overdue = True
            self.wake()

    def timer_due(self) -> None:
        """:class:`DeadlineTimer`: the link's heartbeat deadline came.

        While the sender is parked, the :attr:`relay` may send the PING from
        the timer's task (no sender task per heartbeat); it returns False
        when it could not, and the sender is woken instead.
        """
        relay = self.relay
        if relay is None or not self.parked or not relay.ping_nowait():
            self.wake()

    async def wait_woken(self) -> None:
        """Park the sender until :meth:`wake` (the caller bounds it with a deadline)."""
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()

    def notify(self, notice: Notice) -> None:
        """Queue a control message for the sender and wake it."""
        self.notices.append(notice)
        self.wake()

    def request_close(self, code: int, reason: str, error: ErrorMsg | None = None) -> None:
        """Ask the sender to close the link with ``code`` (first request wins).

        ``error``, when given, is sent as an ``error`` control message first.
        """
        if self.close is None:
            if error is not None:
                self.notices.append(error)
            self.close = (code, reason)
        self.wake()

    def mark_gone(self) -> None:
        """The connection is lost: the sender stops at once.

        A :attr:`relay`'s parked sender (no task) is not started only to find
        that out; the relay ends the link itself.
        """
        self.gone = True
        if self.relay is None or not self.parked:
            self.wake()
