"""Offset arithmetic, checked against plain-bytes models (STYLE §9 "model-check rings and offsets")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
from podterm.protocol.offsets import (
    AckScheduler,
    AckWindow,
    InputDedup,
    InputLog,
    ReplayRange,
    replay_range,
)

# --- InputLog ------------------------------------------------------------------------------


def test_input_log_append_ack_replay() -> None:
    log = InputLog(start=100, limit=10)
    assert log.append(b"abc") == 100
    assert log.append(b"defg") == 103
    assert (log.acked, log.end, log.pending, log.space) == (100, 107, 7, 3)
    with pytest.raises(LocalProtocolError):
        log.append(b"wxyz")  # 4 > 3 free: the caller must stop reading its source
    assert log.ack(102) == 2
    assert log.replay_from(104) == b"efg"
    assert log.acked == 104
    assert log.read(105, 1) == b"f"


@pytest.mark.parametrize("offset", [99, 109])
def test_input_log_rejects_bad_acks(offset: int) -> None:
    log = InputLog(start=100)
    log.append(b"12345678")
    with pytest.raises(ProtocolViolation) as info:
        log.ack(offset)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("acked", [4, 11])
def test_input_log_replay_outside_held_range(acked: int) -> None:
    log = InputLog()
    log.append(b"0123456789")
    log.ack(5)
    with pytest.raises(ProtocolViolation) as info:
        log.replay_from(acked)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


class InputLogMachine(RuleBasedStateMachine):
    """InputLog against a model: the whole stream as bytes and the acked offset."""

    @initialize(start=st.integers(0, 1 << 40), limit=st.integers(1, 200_000))
    def setup(self, start: int, limit: int) -> None:
        self.log = InputLog(start, limit=limit)
        self.start = start
        self.stream = bytearray()  # every byte ever appended, from offset `start`
        self.acked = start
        self.limit = limit

    @property
    def end(self) -> int:
        return self.start + len(self.stream)

    @rule(data=st.binary(max_size=3000) | st.integers(60_000, 140_000).map(lambda n: b"z" * n))
    def append(self, data: bytes) -> None:
        if len(data) > self.limit - (self.end - self.acked):
            with pytest.raises(LocalProtocolError):
                self.log.append(data)
            return
        assert self.log.append(data) == self.end
        self.stream += data

    @rule(frac=st.floats(0, 1))
    def ack(self, frac: float) -> None:
        offset = self.acked + int((self.end - self.acked) * frac)
        assert self.log.ack(offset) == offset - self.acked
        self.acked = offset

    @rule(delta=st.integers(1, 1000), below=st.booleans())
    def bad_ack(self, delta: int, below: bool) -> None:
        offset = self.acked - delta if below else self.end + delta
        if offset < 0:
            return
        with pytest.raises(ProtocolViolation):
            self.log.ack(offset)

    @rule(frac=st.floats(0, 1))
    def replay(self, frac: float) -> None:
        offset = self.acked + int((self.end - self.acked) * frac)
        assert self.log.replay_from(offset) == bytes(self.stream[offset - self.start:])
        self.acked = offset

    @rule(frac=st.floats(0, 1), n=st.integers(0, 5000))
    def read(self, frac: float, n: int) -> None:
        offset = self.acked + int((self.end - self.acked) * frac)
        lo = offset - self.start
        assert self.log.read(offset, n) == bytes(self.stream[lo:lo + n])

    @invariant()
    def books_balance(self) -> None:
        assert (self.log.acked, self.log.end) == (self.acked, self.end)
        assert self.log.pending == self.end - self.acked <= self.limit
        assert self.log.read(self.acked) == bytes(self.stream[self.acked - self.start:])


TestInputLog = InputLogMachine.TestCase
TestInputLog.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# --- InputDedup ----------------------------------------------------------------------------


def test_dedup_trims_resent_overlap() -> None:
    dedup = InputDedup(accepted=0)
    assert dedup.feed(b"hello ") == b"hello "
    dedup.restart(2)  # the peer re-sends from an older offset
    assert dedup.feed(b"ll") == b""
    assert dedup.feed(b"o world") == b"world"
    assert dedup.accepted == 11


def test_dedup_passes_data_through_without_copy() -> None:
    dedup = InputDedup()
    data = b"abc"
    assert dedup.feed(data) is data


def test_dedup_rejects_a_hole() -> None:
    dedup = InputDedup(accepted=10)
    with pytest.raises(ProtocolViolation) as info:
        dedup.restart(11)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(min_size=1, max_size=500), data=st.data())
def test_dedup_delivers_each_byte_exactly_once(stream: bytes, data: st.DataObject) -> None:
    """Random connections, each restarting at or before the accepted offset, each sending
    some prefix of the rest in random chunks: the output is exactly the stream's prefix."""
    dedup = InputDedup()
    out = bytearray()
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, dedup.accepted))
        dedup.restart(at)
        stop = data.draw(st.integers(at, len(stream)))
        pos = at
        while pos < stop:
            n = data.draw(st.integers(1, stop - pos))
            out += dedup.feed(stream[pos:pos + n])
            pos += n
        assert bytes(out) == stream[:dedup.accepted]
    assert dedup.accepted == len(out)


# --- AckWindow -----------------------------------------------------------------------------


def test_ack_window_credit() -> None:
    w = AckWindow(100, start=1000)
    assert w.credit() == 100 and w.can_send(100) and not w.can_send(101)
    w.on_send(60)
    assert w.credit() == 40
    with pytest.raises(LocalProtocolError):
        w.on_send(41)
    assert w.on_ack(1030) == 30
    assert w.on_ack(1030) == 0  # a repeated ACK is fine
    assert w.credit() == 70
    w.reset(5000)
    assert (w.sent, w.acked, w.credit()) == (5000, 5000, 100)


@pytest.mark.parametrize("offset", [999, 1061])
def test_ack_window_rejects_backwards_or_beyond(offset: int) -> None:
    w = AckWindow(100, start=1000)
    w.on_send(60)
    with pytest.raises(ProtocolViolation) as info:
        w.on_ack(offset)
    assert info.value.close_code == CloseCode.PROTOCOL_ERROR


class AckWindowMachine(RuleBasedStateMachine):
    @initialize(window=st.integers(1, 1 << 20), start=st.integers(0, 1 << 50))
    def setup(self, window: int, start: int) -> None:
        self.w = AckWindow(window, start=start)
        self.window, self.sent, self.acked = window, start, start

    @rule(n=st.integers(0, 1 << 21))
    def send(self, n: int) -> None:
        if n <= self.window - (self.sent - self.acked):
            self.w.on_send(n)
            self.sent += n
        else:
            with pytest.raises(LocalProtocolError):
                self.w.on_send(n)

    @rule(frac=st.floats(0, 1))
    def ack(self, frac: float) -> None:
        offset = self.acked + int((self.sent - self.acked) * frac)
        assert self.w.on_ack(offset) == offset - self.acked
        self.acked = offset

    @precondition(lambda self: self.acked > 0 or self.sent > self.acked)
    @rule(delta=st.integers(1, 100), below=st.booleans())
    def bad_ack(self, delta: int, below: bool) -> None:
        offset = max(0, self.acked - delta) if below else self.sent + delta
        if offset == self.acked:
            return
        with pytest.raises(ProtocolViolation):
            self.w.on_ack(offset)

    @invariant()
    def in_flight_within_window(self) -> None:
        assert (self.w.sent, self.w.acked) == (self.sent, self.acked)
        assert 0 <= self.w.in_flight <= self.window
        assert self.w.credit() == self.window - self.w.in_flight


TestAckWindow = AckWindowMachine.TestCase
TestAckWindow.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# --- AckScheduler --------------------------------------------------------------------------


def test_ack_scheduler_half_window_and_timer() -> None:
    s = AckScheduler(window=100, interval_s=0.1)
    assert s.on_receive(10, now=0.0) == 10  # first data after a quiet spell: ACK at once
    assert s.on_receive(10, now=0.01) is None
    assert s.deadline() == pytest.approx(0.1)
    assert s.poll(0.05) is None
    assert s.on_receive(39, now=0.02) is None  # 49 unacked < half window
    assert s.on_receive(1, now=0.03) == 60  # 50 = half window
    assert s.deadline() is None
    assert s.on_receive(5, now=0.04) is None
    assert s.poll(0.13) == 65  # 100 ms after the last ACK
    assert s.poll(10.0) is None  # nothing unacknowledged


def test_ack_scheduler_rebase_holds_back_acks_until_past_resume_point() -> None:
    s = AckScheduler(window=100, start=0)
    s.rebase(50)  # resumed: the peer resends from 50, we still hold bytes up to 50
    assert s.update(30, now=0.0) is None
    assert s.deadline() is None
    assert s.update(51, now=1.0) == 51


@settings(max_examples=300, deadline=None)
@given(window=st.integers(2, 10_000),
       steps=st.lists(st.tuples(st.integers(0, 3000), st.floats(0, 0.3)), max_size=60))
def test_ack_scheduler_properties(window: int, steps: list[tuple[int, float]]) -> None:
    """ACKs only go forward, each equals everything received, and no ACK is ever more than
    half a window or one interval late (as long as the caller polls at ``deadline()``)."""
    s = AckScheduler(window=window, interval_s=0.1)
    now, received, last_ack, last_ack_at = 0.0, 0, 0, float("-inf")
    for n, dt in steps:
        deadline = s.deadline()
        if deadline is not None and deadline <= now + dt:
            now = max(now, deadline)
            offset = s.poll(now)
            assert offset == received > last_ack
            last_ack, last_ack_at = offset, now
        now += dt
        received += n
        offset = s.on_receive(n, now)
        if offset is not None:
            assert offset == received > last_ack
            last_ack, last_ack_at = offset, now
        else:
            assert (received - last_ack) * 2 < window
            assert received == last_ack or now < last_ack_at + 0.1
        assert s.acked == last_ack and s.unacked == received - last_ack


# --- replay_range --------------------------------------------------------------------------


def test_replay_range() -> None:
    assert replay_range(50, 40, 60) == ReplayRange(50, 60)
    r = replay_range(10, 40, 60)
    assert r == ReplayRange(40, 60, gap_from=10) and r.lost == 30
    assert replay_range(60, 40, 60) == ReplayRange(60, 60)
    with pytest.raises(ProtocolViolation):
        replay_range(61, 40, 60)
