"""A circuit breaker: stop hammering a peer that keeps failing, probe it now and then.

States and moves (time is an argument; nothing here reads a clock)::

    state      event                                    next state
    ---------  ---------------------------------------  ----------------------------
    CLOSED     allow()                                  CLOSED     (True)
    CLOSED     record_success()                         CLOSED     (failure count := 0)
    CLOSED     record_failure(), count < threshold      CLOSED
    CLOSED     record_failure(), count == threshold     OPEN       (opened_at := now)
    OPEN       allow(), now < opened_at + cooldown      OPEN       (False)
    OPEN       allow(), now >= opened_at + cooldown     HALF_OPEN  (True: the trial)
    OPEN       record_success() / record_failure()      OPEN       (a late result of a call
                                                                    made before opening: ignored)
    HALF_OPEN  allow(), trial outstanding               HALF_OPEN  (False)
    HALF_OPEN  allow(), trial older than the cooldown   HALF_OPEN  (True: a new trial; the old
                                                                    one never reported back)
    HALF_OPEN  record_success()                         CLOSED
    HALF_OPEN  record_failure()                         OPEN       (opened_at := now)

Used by the agent's dialer with :class:`~podterm.resilience.backoff.Backoff`:
backoff spaces the retries, the breaker stops them while the gateway is down.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BreakerState", "BreakerStatistics", "CircuitBreaker"]


class BreakerState(enum.Enum):
    """Where a breaker is; the values are the labels ``/metrics`` shows."""

    CLOSED = "closed"  # calls flow; failures are counted
    OPEN = "open"  # calls are refused until the cooldown has passed
    HALF_OPEN = "half_open"  # one trial call decides


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of one :class:`CircuitBreaker`."""

    state: BreakerState
    consecutive_failures: int
    successes: int
    failures: int
    rejected: int
    times_opened: int
    opened_at: float | None
    retry_at: float | None


class CircuitBreaker:
    """Closed, open, half-open; see the module docstring for the table.

    Args:
        failure_threshold: consecutive failures that open the breaker.  5: one
            or two failures are normal on a flaky network; five in a row are not.
        cooldown_s: how long an open breaker refuses calls before one trial.
            Also how long a trial may stay unanswered before another is allowed.

    Raises:
        ValueError: ``failure_threshold`` < 1 or ``cooldown_s`` < 0.
    """

    __slots__ = (
        "_consecutive", "_cooldown", "_failures", "_opened_at", "_rejected", "_state",
        "_successes", "_threshold", "_times_opened", "_trial_at",
    )

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self._threshold = failure_threshold
        self._cooldown = cooldown_s
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_at: float | None = None  # HALF_OPEN: when the outstanding trial was allowed
        self._successes = 0
        self._failures = 0
        self._rejected = 0
        self._times_opened = 0

    def __repr__(self) -> str:
        return (f"<CircuitBreaker {self._state.value} failures={self._consecutive}/{self._threshold}"
                f" opened={self._times_opened}>")

    @property
    def state(self) -> BreakerState:
        """The current state.  OPEN turns HALF_OPEN only in ``allow(now)``."""
        return self._state

    @property
    def retry_at(self) -> float | None:
        """When OPEN: the time from which ``allow`` grants a trial; else ``None``."""
        if self._state is BreakerState.OPEN and self._opened_at is not None:
            return self._opened_at + self._cooldown
        return None

    def allow(self, now: float) -> bool:
        """May a call be made now?  ``True`` from OPEN/HALF_OPEN is the one trial.

        Every ``True`` must be followed by ``record_success`` or ``record_failure``.
        """
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            assert self._opened_at is not None
            if now >= self._opened_at + self._cooldown:
                self._state = BreakerState.HALF_OPEN
                self._trial_at = now
                return True
        else:  # HALF_OPEN
            assert self._trial_at is not None
            if now >= self._trial_at + self._cooldown:
                # The trial never reported (its caller was cancelled): without
                # this the breaker would stay shut forever.
                self._trial_at = now
                return True
        self._rejected += 1
        return False

    def record_success(self, now: float) -> None:
        """A call succeeded: reset the count; a successful trial closes the breaker."""
        if self._state is BreakerState.OPEN:
            return
        self._successes += 1
        self._consecutive = 0
        self._state = BreakerState.CLOSED
        self._opened_at = self._trial_at = None

    def record_failure(self, now: float) -> None:
        """A call failed: count it; the threshold-th in a row or a failed trial opens the breaker."""
        if self._state is BreakerState.OPEN:
            return
        self._failures += 1
        self._consecutive += 1
        if self._state is BreakerState.HALF_OPEN or self._consecutive >= self._threshold:
            self._state = BreakerState.OPEN
            self._opened_at = now
            self._trial_at = None
            self._times_opened += 1

    def statistics(self) -> BreakerStatistics:
        """A frozen snapshot of state and counters."""
        return BreakerStatistics(
            state=self._state,
            consecutive_failures=self._consecutive,
            successes=self._successes,
            failures=self._failures,
            rejected=self._rejected,
            times_opened=self._times_opened,
            opened_at=self._opened_at,
            retry_at=self.retry_at,
        )
