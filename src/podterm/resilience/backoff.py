"""Exponential backoff with full jitter, as a pure iterator.

"Full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015):
attempt *n* (from 0) waits ``uniform(0, min(cap, base * 2**n))``.  Spreading
every delay over the whole window is what stops thousands of agents or clients,
cut off by the same outage, from reconnecting in synchronized waves.

Pure: the caller sleeps (``await trio.sleep(next(backoff))``) and supplies the
randomness, so tests are deterministic and no clock is read here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

__all__ = ["Backoff"]


class Backoff(Iterator[float]):
    """Delays in seconds for successive retries; never exhausted.

    Args:
        base_s: the window of the first retry (attempt 0 waits up to this).
            0.5 s: a dropped connection to a live gateway is usually back at once.
        cap_s: the largest window.  30 s: an outage costs at most ~30 s of
            extra reconnect delay once it ends.
        rng: returns floats in ``[0, 1]``; inject a seeded one in tests.

    Raises:
        ValueError: ``base_s`` <= 0 or ``cap_s`` < ``base_s``.

    Example::

        backoff = Backoff(rng=random.random)
        for delay in backoff:
            try:
                return await connect()
            except OSError:
                await trio.sleep(delay)
    """

    __slots__ = ("_attempt", "_base", "_cap", "_max_exponent", "_rng")

    def __init__(
        self, base_s: float = 0.5, cap_s: float = 30.0, *, rng: Callable[[], float] = random.random
    ) -> None:
        if not base_s > 0:
            raise ValueError(f"base_s must be > 0, got {base_s}")
        if not cap_s >= base_s:
            raise ValueError(f"cap_s must be >= base_s ({base_s}), got {cap_s}")
        self._base = base_s
        self._cap = cap_s
        self._rng = rng
        self._attempt = 0
        # The first exponent whose window reaches the cap; beyond it 2**n only
        # risks float overflow, so it is not computed.
        self._max_exponent = max(0, math.ceil(math.log2(cap_s / base_s)))

    def __repr__(self) -> str:
        return f"<Backoff attempt={self._attempt} window={self.window_s:.3f}s cap={self._cap}s>"

    @property
    def attempt(self) -> int:
        """How many delays have been handed out since creation or the last ``reset``."""
        return self._attempt

    @property
    def window_s(self) -> float:
        """The upper bound of the next delay: ``min(cap, base * 2**attempt)``."""
        exponent = min(self._attempt, self._max_exponent)
        return min(self._cap, self._base * 2.0**exponent)

    def __iter__(self) -> Backoff:
        return self

    def __next__(self) -> float:
        """The next delay, uniform in ``[0, window_s]``.

        Raises:
            ValueError: ``rng`` returned a value outside ``[0, 1]``.
        """
        fraction = self._rng()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"rng must return a float in [0, 1], got {fraction!r}")
        delay = fraction * self.window_s
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """Start over from ``base_s`` (call after a success)."""
        self._attempt = 0
