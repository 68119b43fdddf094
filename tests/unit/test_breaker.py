"""CircuitBreaker: each row of the transition table in breaker.py, time passed in."""

from __future__ import annotations

import pytest

from podterm.resilience.breaker import BreakerState, BreakerStatistics, CircuitBreaker


def open_breaker(now: float = 0.0, threshold: int = 3, cooldown: float = 10.0) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown)
    for _ in range(threshold):
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert breaker.state is BreakerState.OPEN
    return breaker


def test_starts_closed_and_allows() -> None:
    breaker = CircuitBreaker()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow(0.0)


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10.0)
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(3.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_at == 13.0


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10.0)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    breaker.record_success(0.0)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    assert breaker.state is BreakerState.CLOSED


def test_open_refuses_until_cooldown() -> None:
    breaker = open_breaker(now=100.0, cooldown=10.0)
    assert not breaker.allow(100.0)
    assert not breaker.allow(109.999)
    assert breaker.state is BreakerState.OPEN


def test_cooldown_elapsed_allows_exactly_one_trial() -> None:
    breaker = open_breaker(now=100.0, cooldown=10.0)
    assert breaker.allow(110.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(110.0)
    assert not breaker.allow(115.0)


def test_successful_trial_closes() -> None:
    breaker = open_breaker(now=0.0, cooldown=10.0)
    assert breaker.allow(10.0)
    breaker.record_success(10.5)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.retry_at is None
    assert breaker.allow(10.5) and breaker.allow(10.5)


def test_failed_trial_reopens_with_a_fresh_cooldown() -> None:
    breaker = open_breaker(now=0.0, cooldown=10.0)
    assert breaker.allow(10.0)
    breaker.record_failure(12.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_at == 22.0
    assert not breaker.allow(21.0)
    assert breaker.allow(22.0)


def test_trial_that_never_reports_does_not_wedge_the_breaker() -> None:
    breaker = open_breaker(now=0.0, cooldown=10.0)
    assert breaker.allow(10.0)  # the trial's caller is cancelled and never reports
    assert not breaker.allow(19.0)
    assert breaker.allow(20.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_late_results_while_open_are_ignored() -> None:
    breaker = open_breaker(now=0.0, cooldown=10.0)
    breaker.record_success(1.0)  # a call started before the breaker opened
    assert breaker.state is BreakerState.OPEN
    breaker.record_failure(5.0)
    assert breaker.retry_at == 10.0  # the cooldown is not extended


def test_threshold_one_opens_on_first_failure() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=0.0)
    breaker.record_failure(0.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow(0.0)  # zero cooldown: the trial comes at once


def test_statistics_counts_everything() -> None:
    breaker = open_breaker(now=0.0, threshold=2, cooldown=5.0)
    assert not breaker.allow(1.0)
    assert not breaker.allow(2.0)
    assert breaker.allow(5.0)
    breaker.record_success(5.0)
    assert breaker.statistics() == BreakerStatistics(
        state=BreakerState.CLOSED, consecutive_failures=0, successes=1, failures=2, rejected=2,
        times_opened=1, opened_at=None, retry_at=None,
    )


def test_statistics_while_open() -> None:
    stats = open_breaker(now=3.0, threshold=2, cooldown=5.0).statistics()
    assert (stats.state, stats.opened_at, stats.retry_at, stats.consecutive_failures) == (
        BreakerState.OPEN, 3.0, 8.0, 2)


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, -1.0)])
def test_reject_bad_settings(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown)


def test_repr_shows_state() -> None:
    assert repr(open_breaker(threshold=2)) == "<CircuitBreaker open failures=2/2 opened=1>"
