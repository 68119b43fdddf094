"""Heartbeat: the pure schedule (time passed in)."""

from __future__ import annotations

import pytest

from podterm.resilience.heartbeat import Heartbeat


def seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


def test_nothing_before_the_first_interval() -> None:
    hb = Heartbeat(15.0, now=100.0)
    assert hb.deadline == 115.0
    assert hb.poll(114.9) is None
    assert hb.poll(115.0) == seq(1)
    assert hb.deadline == 130.0


def test_answered_pings_keep_the_link_alive_and_measure_rtt() -> None:
    hb = Heartbeat(10.0, now=0.0)
    for i in range(1, 50):
        assert hb.poll(10.0 * i) == seq(i)
        assert hb.on_pong(seq(i), 10.0 * i + 0.25) is True
        assert hb.missed == 0
    assert hb.rtt_s == pytest.approx(0.25)
    assert not hb.is_dead


def test_two_missed_pongs_mean_dead() -> None:
    hb = Heartbeat(15.0, now=0.0)
    assert hb.poll(15.0) == seq(1)
    assert hb.poll(30.0) == seq(2)  # ping 1 unanswered
    assert hb.missed == 1 and not hb.is_dead
    assert hb.poll(45.0) is None  # ping 2 unanswered too
    assert hb.is_dead
    assert hb.poll(1000.0) is None


def test_one_missed_pong_then_answer_resets() -> None:
    hb = Heartbeat(15.0, now=0.0)
    hb.poll(15.0)
    hb.poll(30.0)
    assert hb.missed == 1
    assert hb.on_pong(seq(2), 31.0)
    assert hb.missed == 0
    assert hb.poll(45.0) == seq(3)
    assert not hb.is_dead


def test_a_late_pong_for_an_older_ping_still_proves_liveness() -> None:
    hb = Heartbeat(15.0, now=0.0)
    hb.poll(15.0)
    hb.poll(30.0)
    assert hb.on_pong(seq(1), 31.0) is True
    assert hb.missed == 0
    assert hb.rtt_s is None  # only the newest ping's answer measures a round trip


@pytest.mark.parametrize("payload", [b"", b"x", seq(0), seq(3), b"\x00" * 9])
def test_pongs_that_answer_nothing_of_ours_are_ignored(payload: bytes) -> None:
    hb = Heartbeat(15.0, now=0.0)
    hb.poll(15.0)
    hb.poll(30.0)
    assert hb.on_pong(payload, 31.0) is False  # seq(3) was never sent
    assert hb.missed == 1


def test_duplicate_pong_counts_once() -> None:
    hb = Heartbeat(15.0, now=0.0)
    hb.poll(15.0)
    assert hb.on_pong(seq(1), 16.0)
    assert not hb.on_pong(seq(1), 17.0)


def test_max_missed_is_configurable() -> None:
    hb = Heartbeat(1.0, max_missed=1, now=0.0)
    hb.poll(1.0)
    assert hb.poll(2.0) is None and hb.is_dead


def test_late_poll_schedules_from_now() -> None:
    hb = Heartbeat(15.0, now=0.0)
    assert hb.poll(40.0) == seq(1)  # the driver was late; no burst of pings
    assert hb.deadline == 55.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Heartbeat(0, now=0.0)
    with pytest.raises(ValueError):
        Heartbeat(1.0, max_missed=0, now=0.0)


def test_repr() -> None:
    assert repr(Heartbeat(15.0, now=0.0)) == (
        "<Heartbeat alive seq=0 acked=0 missed=0 deadline=15.000>")
