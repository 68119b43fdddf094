"""Backoff: full jitter over an exponentially growing, capped window; pure and deterministic."""

from __future__ import annotations

import itertools
import random

import pytest

from podterm.resilience.backoff import Backoff


def test_window_doubles_from_base_up_to_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0, rng=lambda: 1.0)
    assert list(itertools.islice(backoff, 9)) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_delay_is_rng_fraction_of_window() -> None:
    fractions = iter([0.0, 0.25, 0.5])
    backoff = Backoff(base_s=1.0, cap_s=100.0, rng=lambda: next(fractions))
    assert [next(backoff) for _ in range(3)] == [0.0, 0.5, 2.0]


def test_delays_uniform_in_zero_to_window() -> None:
    rng = random.Random(1234)
    backoff = Backoff(base_s=0.5, cap_s=30.0, rng=rng.random)
    for attempt in range(200):
        window = min(30.0, 0.5 * 2**attempt)
        assert backoff.window_s == window
        assert 0.0 <= next(backoff) <= window


def test_full_jitter_spreads_over_the_whole_window() -> None:
    # Not "window/2 + jitter": small delays must occur too, or clients synchronize.
    rng = random.Random(7)
    delays = []
    for _ in range(2000):
        backoff = Backoff(base_s=1.0, cap_s=8.0, rng=rng.random)
        for _ in range(3):
            delay = next(backoff)
        delays.append(delay)
    assert min(delays) < 0.2 and max(delays) > 3.8  # window is 4.0 at the third attempt
    assert 1.8 < sum(delays) / len(delays) < 2.2


def test_reset_starts_over() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0, rng=lambda: 1.0)
    for _ in range(5):
        next(backoff)
    assert backoff.attempt == 5
    backoff.reset()
    assert backoff.attempt == 0
    assert next(backoff) == 0.5


def test_never_exhausted_and_no_overflow_after_many_attempts() -> None:
    backoff = Backoff(base_s=1e-3, cap_s=30.0, rng=lambda: 1.0)
    for _ in range(5000):
        delay = next(backoff)
    assert delay == 30.0


def test_same_seed_same_delays() -> None:
    a = Backoff(rng=random.Random(42).random)
    b = Backoff(rng=random.Random(42).random)
    assert list(itertools.islice(a, 20)) == list(itertools.islice(b, 20))


def test_is_an_iterator() -> None:
    backoff = Backoff(rng=lambda: 0.5)
    assert iter(backoff) is backoff


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_reject_bad_bounds(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base_s=base, cap_s=cap)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_reject_rng_outside_unit_interval(value: float) -> None:
    with pytest.raises(ValueError, match="rng"):
        next(Backoff(rng=lambda: value))


def test_base_equal_to_cap_is_constant_window() -> None:
    backoff = Backoff(base_s=2.0, cap_s=2.0, rng=lambda: 1.0)
    assert list(itertools.islice(backoff, 3)) == [2.0, 2.0, 2.0]
