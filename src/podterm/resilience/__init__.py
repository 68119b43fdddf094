"""Staying up when peers are not: backoff and circuit breaking (pure; time and randomness are arguments)."""

from .backoff import Backoff
from .breaker import BreakerState, BreakerStatistics, CircuitBreaker

__all__ = ["Backoff", "BreakerState", "BreakerStatistics", "CircuitBreaker"]
