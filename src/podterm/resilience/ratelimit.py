"""Token buckets for connects, session creates and authentication failures.

Pure: time is an argument (seconds on any monotonic clock), nothing here
reads a clock or starts a task.

* :class:`TokenBucket` -- ``burst`` tokens, refilled at ``per_s`` a second.
* :class:`KeyedBuckets` -- one bucket per key (a source address, a user),
  at most ``max_keys`` of them: the least recently used is evicted first.  A
  bucket that has refilled to full is *idle* and carries no information
  (a fresh one is the same), so evicting it loses nothing; evicting a bucket
  that is still draining would hand its key a fresh burst, which is counted
  (``evicted_active``) so an operator sees when ``max_keys`` is too small.
* :class:`RateLimiter` -- the gateway's limits, per source address and per
  user, with one call per decision point (see its docstring).

Source addresses are keyed as they are given, except IPv6, which is keyed
by its /64 network: one host gets a whole /64 (RFC 6177), so per-address
limits on IPv6 would limit nothing.  IPv4-mapped IPv6 is keyed as IPv4.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from podterm.errors import ConfigError, RateLimitedError

__all__ = [
    "BucketStatistics",
    "KeyedBuckets",
    "LimitKind",
    "Rate",
    "RateLimitExceeded",
    "RateLimiter",
    "RateLimiterStatistics",
    "RateLimits",
    "TokenBucket",
    "Verdict",
    "source_key",
]


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_s`` tokens a second, at most ``burst`` saved up.

    Raises:
        ValueError: ``per_s`` not > 0 and finite, or ``burst`` < 1.
    """

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_s) and self.per_s > 0):
            raise ValueError(f"rate per_s must be > 0, got {self.per_s}")
        if self.burst < 1:
            raise ValueError(f"rate burst must be >= 1, got {self.burst}")

    @classmethod
    def parse(cls, text: str, *, key: str = "rate") -> Rate:
        """``N/s``, ``N/m`` or ``N/h``, optionally ``:BURST`` (default: N, at least 1).

        Examples: ``"20/s:40"``, ``"10/m"``.

        Raises:
            ConfigError: naming ``key`` and the value.
        """
        allowed = f"{key}: invalid value {text!r}: expected N/s, N/m or N/h, optionally " \
                  ":BURST, e.g. 10/m:20"
        amount, sep, rest = text.strip().partition("/")
        unit, _, burst_text = rest.partition(":")
        seconds = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip())
        try:
            n = float(amount)
            burst = int(burst_text) if burst_text else max(1, math.ceil(n))
            if not sep or seconds is None:
                raise ValueError
            return cls(per_s=n / seconds, burst=burst)
        except ValueError:
            raise ConfigError(allowed) from None

    def __str__(self) -> str:
        return f"{self.per_s:g}/s:{self.burst}"


class TokenBucket:
    """One bucket; starts full.

    Args:
        rate: refill and capacity.
        now: the time it is created at.
    """

    __slots__ = ("rate", "tokens", "updated")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate.burst)
        self.updated = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.2f}/{self.rate.burst} at {self.rate.per_s:g}/s>"

    def _refill(self, now: float) -> None:
        # A clock that went backwards (or a stale `now`) adds nothing.
        if now > self.updated:
            self.tokens = min(float(self.rate.burst),
                              self.tokens + (now - self.updated) * self.rate.per_s)
            self.updated = now

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are there (0.0: now); takes nothing."""
        self._refill(now)
        missing = cost - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate.per_s

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if there: 0.0 when taken, else seconds to wait."""
        wait = self.retry_after(now, cost)
        if wait == 0.0:
            self.tokens -= cost
        return wait

    def is_idle(self, now: float) -> bool:
        """Refilled to full: the same as a fresh bucket."""
        self._refill(now)
        return self.tokens >= self.rate.burst


@dataclass(frozen=True, slots=True)
class BucketStatistics:
    """A snapshot of one :class:`KeyedBuckets`.

    Attributes:
        name: what it limits, e.g. ``"connect/source"``.
        rate: its rate as text (``"20/s:40"``).
        keys: buckets held now.
        max_keys: the bound.
        allowed: takes that succeeded.
        limited: takes refused.
        evicted_idle: full buckets dropped to make room (harmless).
        evicted_active: draining buckets dropped to make room (their keys
            got a fresh burst): raise ``max_keys`` if this grows.
    """

    name: str
    rate: str
    keys: int
    max_keys: int
    allowed: int
    limited: int
    evicted_idle: int
    evicted_active: int


class KeyedBuckets:
    """A :class:`TokenBucket` per key, bounded by LRU eviction.

    Args:
        name: for statistics and error messages.
        rate: every bucket's rate.
        max_keys: buckets kept at most.
    """

    __slots__ = ("name", "rate", "max_keys", "_buckets", "_allowed", "_limited",
                 "_evicted_idle", "_evicted_active")

    def __init__(self, name: str, rate: Rate, *, max_keys: int = 65536) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.name = name
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._allowed = self._limited = self._evicted_idle = self._evicted_active = 0

    def __repr__(self) -> str:
        return f"<KeyedBuckets {self.name} {self.rate} keys={len(self._buckets)}>"

    def __len__(self) -> int:
        return len(self._buckets)

    def _get(self, key: str, now: float, *, create: bool) -> TokenBucket | None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        if not create:
            return None
        while len(self._buckets) >= self.max_keys:
            _, old = self._buckets.popitem(last=False)
            if old.is_idle(now):
                self._evicted_idle += 1
            else:
                self._evicted_active += 1
        bucket = self._buckets[key] = TokenBucket(self.rate, now)
        return bucket

    def retry_after(self, key: str, now: float, cost: float = 1.0) -> float:
        """Seconds until ``key`` could take ``cost`` (0.0: now); takes nothing, creates nothing."""
        bucket = self._get(key, now, create=False)
        return 0.0 if bucket is None else bucket.retry_after(now, cost)

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Take from ``key``'s bucket: 0.0 when allowed, else seconds to wait."""
        bucket = self._get(key, now, create=True)
        assert bucket is not None
        wait = bucket.take(now, cost)
        if wait == 0.0:
            self._allowed += 1
        else:
            self._limited += 1
        return wait

    def count_limited(self) -> None:
        """Count a refusal decided from :meth:`retry_after` (a check that takes nothing)."""
        self._limited += 1

    def prune(self, now: float) -> int:
        """Drop every idle bucket (e.g. once a minute); how many were dropped."""
        idle = [k for k, b in self._buckets.items() if b.is_idle(now)]
        for k in idle:
            del self._buckets[k]
        return len(idle)

    def statistics(self) -> BucketStatistics:
        """A frozen snapshot."""
        return BucketStatistics(name=self.name, rate=str(self.rate), keys=len(self._buckets),
                                max_keys=self.max_keys, allowed=self._allowed,
                                limited=self._limited, evicted_idle=self._evicted_idle,
                                evicted_active=self._evicted_active)


@functools.lru_cache(maxsize=4096)  # parsed once per address, not per connection
def source_key(address: str) -> str:
    """The rate-limit key of a client address: IPv4 as is, IPv6 as its /64."""
    host = address
    if address.startswith("[") and "]" in address:  # "[::1]:443"
        host = address[1:address.index("]")]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return address  # a Unix socket path, a name: key as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LimitKind(enum.StrEnum):
    """What was limited; the value names it in messages and metrics."""

    CONNECT_SOURCE = "connect/source"
    CONNECT_USER = "connect/user"
    SESSION_SOURCE = "session-create/source"
    SESSION_USER = "session-create/user"
    AUTH_FAILURE_SOURCE = "auth-failure/source"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The limits; ``None`` turns one off.

    Defaults, and why:

    * connects per source 20/s, burst 100: a browser tab or a kubectl call
      opens one or two connections; 100 at once covers a NAT of users
      reconnecting together after a gateway restart.
    * connects per user 10/s, burst 50: one person's reconnecting tabs and
      scripts, a little slower than a whole NAT.
    * session creates per source 5/s, burst 30; per user 2/s, burst 20:
      starting shells is the expensive operation (a PTY or an apiserver exec).
    * authentication failures per source 10/min, burst 10: ten typos are
      free, then one guess per 6 s -- a password-spraying client gets ~14,000
      guesses a day instead of millions (fail2ban's default bans after 5).
    """

    connect_per_source: Rate | None = Rate(20.0, 100)
    connect_per_user: Rate | None = Rate(10.0, 50)
    session_create_per_source: Rate | None = Rate(5.0, 30)
    session_create_per_user: Rate | None = Rate(2.0, 20)
    auth_failures_per_source: Rate | None = Rate(10 / 60, 10)
    #: Keys per limit: 65,536 buckets ~ 10 MB across the five limits.
    max_keys: int = 65536


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of one check.

    Attributes:
        allowed: go ahead.
        retry_after_s: when refused, seconds until it would be allowed.
        limit: which limit refused, or ``None``.
    """

    allowed: bool
    retry_after_s: float = 0.0
    limit: LimitKind | None = None

    def check(self) -> None:
        """Raise :class:`RateLimitExceeded` when refused."""
        if not self.allowed:
            assert self.limit is not None
            raise RateLimitExceeded(self.limit, self.retry_after_s)


_OK = Verdict(True)


class RateLimitExceeded(RateLimitedError):
    """A limit refused the request (429 / close 4429); ``retry_after_s`` for ``Retry-After``."""

    def __init__(self, limit: LimitKind, retry_after_s: float) -> None:
        what = {
            LimitKind.CONNECT_SOURCE: "too many connections from your address",
            LimitKind.CONNECT_USER: "too many connections for your user",
            LimitKind.SESSION_SOURCE: "too many new sessions from your address",
            LimitKind.SESSION_USER: "too many new sessions for your user",
            LimitKind.AUTH_FAILURE_SOURCE: "too many failed logins from your address",
        }[limit]
        super().__init__(f"{what}; retry in {math.ceil(retry_after_s)}s")
        self.limit = limit
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """The ``Retry-After`` value: whole seconds, at least 1 (RFC 9110 §10.2.3)."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    """One :class:`BucketStatistics` per enabled limit."""

    limits: tuple[BucketStatistics, ...]


class RateLimiter:
    """The gateway's limits, one call per decision point.

    Where each call goes (the gateway passes ``now = trio.current_time()``):

    * accept, before the handshake: ``check_connect(source, now)`` -- refuse
      with close 4429 / HTTP 429;
    * before authenticating: ``check_auth(source, now)`` -- a source that
      used up its failure budget gets 429 without its credentials being
      checked (no oracle for guessing);
    * after a failed authentication: ``record_auth_failure(source, now)``;
    * after a successful authentication: ``check_user_connect(user, now)``;
    * before creating a session: ``check_session_create(source, user, now)``.

    Args:
        limits: the :class:`RateLimits`.
    """

    __slots__ = ("limits", "_buckets")

    def __init__(self, limits: RateLimits | None = None) -> None:
        self.limits = limits or RateLimits()
        lim = self.limits
        self._buckets: dict[LimitKind, KeyedBuckets] = {}
        for kind, rate in ((LimitKind.CONNECT_SOURCE, lim.connect_per_source),
                           (LimitKind.CONNECT_USER, lim.connect_per_user),
                           (LimitKind.SESSION_SOURCE, lim.session_create_per_source),
                           (LimitKind.SESSION_USER, lim.session_create_per_user),
                           (LimitKind.AUTH_FAILURE_SOURCE, lim.auth_failures_per_source)):
            if rate is not None:
                self._buckets[kind] = KeyedBuckets(kind.value, rate, max_keys=lim.max_keys)

    def __repr__(self) -> str:
        return f"<RateLimiter {', '.join(f'{k.value}={b.rate}' for k, b in self._buckets.items())}>"

    def _take(self, kind: LimitKind, key: str | None, now: float) -> Verdict:
        buckets = self._buckets.get(kind)
        if buckets is None or key is None:
            return _OK
        wait = buckets.take(key, now)
        return _OK if wait == 0.0 else Verdict(False, wait, kind)

    def check_connect(self, source: str | None, now: float) -> Verdict:
        """A new connection from ``source`` (takes a token when allowed)."""
        return self._take(LimitKind.CONNECT_SOURCE, _key(source), now)

    def check_user_connect(self, user: str, now: float) -> Verdict:
        """A new authenticated connection by ``user``."""
        return self._take(LimitKind.CONNECT_USER, user, now)

    def check_session_create(self, source: str | None, user: str, now: float) -> Verdict:
        """A new session by ``user`` from ``source``: both limits must allow; takes from
        both only then, so a refusal by one does not spend the other."""
        checks = [(LimitKind.SESSION_SOURCE, _key(source)), (LimitKind.SESSION_USER, user)]
        worst: Verdict = _OK
        for kind, key in checks:
            buckets = self._buckets.get(kind)
            if buckets is None or key is None:
                continue
            wait = buckets.retry_after(key, now)
            if wait > worst.retry_after_s:
                worst = Verdict(False, wait, kind)
        if not worst.allowed:
            assert worst.limit is not None
            self._buckets[worst.limit].count_limited()
            return worst
        for kind, key in checks:
            self._take(kind, key, now)
        return _OK

    def check_auth(self, source: str | None, now: float) -> Verdict:
        """May ``source`` try to authenticate?  Takes nothing (failures do)."""
        buckets = self._buckets.get(LimitKind.AUTH_FAILURE_SOURCE)
        key = _key(source)
        if buckets is None or key is None:
            return _OK
        wait = buckets.retry_after(key, now)
        if wait == 0.0:
            return _OK
        buckets.count_limited()
        return Verdict(False, wait, LimitKind.AUTH_FAILURE_SOURCE)

    def record_auth_failure(self, source: str | None, now: float) -> Verdict:
        """Count a failed authentication; the verdict says whether budget was left."""
        buckets = self._buckets.get(LimitKind.AUTH_FAILURE_SOURCE)
        key = _key(source)
        if buckets is None or key is None:
            return _OK
        wait = buckets.take(key, now)
        return _OK if wait == 0.0 else Verdict(False, wait, LimitKind.AUTH_FAILURE_SOURCE)

    def prune(self, now: float) -> int:
        """Drop idle buckets everywhere (call every minute or so); how many."""
        return sum(b.prune(now) for b in self._buckets.values())

    def statistics(self) -> RateLimiterStatistics:
        """A frozen snapshot."""
        return RateLimiterStatistics(tuple(b.statistics() for b in self._buckets.values()))


def _key(source: str | None) -> str | None:
    return None if source is None else source_key(source)
