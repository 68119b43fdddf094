"""Token buckets, keyed buckets with bounded memory, and the gateway's RateLimiter.

Pure: every test passes the time in.
"""

from __future__ import annotations

import pytest

from podterm.errors import CloseCode, ConfigError, RateLimitedError
from podterm.resilience.ratelimit import (
    KeyedBuckets,
    LimitKind,
    Rate,
    RateLimiter,
    RateLimitExceeded,
    RateLimits,
    TokenBucket,
    Verdict,
    source_key,
)


def test_bucket_starts_full_spends_burst_then_refills_at_rate() -> None:
    bucket = TokenBucket(Rate(per_s=2.0, burst=3), now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token every 0.5 s
    assert bucket.take(100.25) == pytest.approx(0.25)  # refused takes spend nothing
    assert bucket.take(100.5) == 0.0
    assert bucket.take(100.5) == pytest.approx(0.5)


def test_bucket_never_exceeds_burst_and_ignores_time_going_back() -> None:
    bucket = TokenBucket(Rate(1.0, 2), now=0.0)
    assert bucket.is_idle(1000.0)
    assert bucket.take(1000.0) == 0.0 and bucket.take(1000.0) == 0.0
    assert bucket.take(1000.0) == pytest.approx(1.0)
    assert bucket.take(500.0) == pytest.approx(1.0)  # a clock step backwards adds nothing
    assert not bucket.is_idle(1000.5)
    assert bucket.is_idle(1002.0)


def test_bucket_cost() -> None:
    bucket = TokenBucket(Rate(1.0, 5), now=0.0)
    assert bucket.take(0.0, cost=4) == 0.0
    assert bucket.retry_after(0.0, cost=3) == pytest.approx(2.0)


@pytest.mark.parametrize(("text", "per_s", "burst"), [
    ("10/s", 10.0, 10), ("20/s:40", 20.0, 40), ("10/m", 10 / 60, 10), ("1/h:5", 1 / 3600, 5),
    ("0.5/s", 0.5, 1),
])
def test_rate_parse(text: str, per_s: float, burst: int) -> None:
    rate = Rate.parse(text)
    assert rate.per_s == pytest.approx(per_s) and rate.burst == burst


@pytest.mark.parametrize("text", ["10", "10/d", "x/s", "10/s:x", "0/s", "-1/s", "10/s:0"])
def test_rate_parse_errors_name_key_and_value(text: str) -> None:
    with pytest.raises(ConfigError, match=rf"limits\.connect: invalid value '{text}'"):
        Rate.parse(text, key="limits.connect")


def test_keyed_buckets_are_independent_per_key() -> None:
    kb = KeyedBuckets("t", Rate(1.0, 1))
    assert kb.take("a", 0.0) == 0.0
    assert kb.take("a", 0.0) > 0
    assert kb.take("b", 0.0) == 0.0
    s = kb.statistics()
    assert (s.keys, s.allowed, s.limited) == (2, 2, 1)


def test_keyed_buckets_memory_is_bounded_lru_idle_first_counts_active() -> None:
    kb = KeyedBuckets("t", Rate(1.0, 2), max_keys=3)
    for key in ("a", "b", "c"):
        kb.take(key, 0.0)  # each has 1 of 2 tokens left: draining
    kb.take("a", 0.1)  # "a" is now the most recently used
    kb.take("d", 0.2)  # evicts "b", the least recently used, still draining
    assert len(kb) == 3
    assert kb.retry_after("b", 0.2) == 0.0  # forgotten: no bucket, no debt
    s = kb.statistics()
    assert (s.evicted_idle, s.evicted_active) == (0, 1)
    kb.take("e", 10.0)  # at t=10 every bucket has refilled: the evicted one was idle
    assert kb.statistics().evicted_idle == 1
    assert len(kb) == 3


def test_keyed_buckets_prune_drops_only_idle() -> None:
    kb = KeyedBuckets("t", Rate(1.0, 1), max_keys=100)
    kb.take("old", 0.0)
    kb.take("new", 5.0)
    assert kb.prune(5.5) == 1
    assert kb.statistics().keys == 1
    assert kb.retry_after("new", 5.5) > 0


def test_a_flood_of_distinct_keys_stays_within_max_keys() -> None:
    kb = KeyedBuckets("t", Rate(1.0, 1), max_keys=1000)
    for i in range(20_000):
        kb.take(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", i * 0.001)
    assert len(kb) == 1000
    s = kb.statistics()
    assert s.evicted_idle + s.evicted_active == 19_000


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("[2001:db8::1]:443", "2001:db8::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("/run/podterm.sock", "/run/podterm.sock"),
])
def test_source_key(address: str, key: str) -> None:
    assert source_key(address) == key


def test_ipv6_addresses_in_one_slash_64_share_a_bucket() -> None:
    limiter = RateLimiter(RateLimits(connect_per_source=Rate(1.0, 1)))
    assert limiter.check_connect("2001:db8::1", 0.0).allowed
    v = limiter.check_connect("2001:db8::2", 0.0)
    assert not v.allowed and v.limit is LimitKind.CONNECT_SOURCE
    assert limiter.check_connect("2001:db8:0:1::1", 0.0).allowed


def test_connect_limit_per_source_and_per_user() -> None:
    limiter = RateLimiter(RateLimits(connect_per_source=Rate(1.0, 2),
                                     connect_per_user=Rate(1.0, 1)))
    assert limiter.check_connect("10.0.0.1", 0.0).allowed
    assert limiter.check_connect("10.0.0.1", 0.0).allowed
    v = limiter.check_connect("10.0.0.1", 0.0)
    assert v == Verdict(False, pytest.approx(1.0), LimitKind.CONNECT_SOURCE)  # type: ignore[arg-type]
    assert limiter.check_connect("10.0.0.2", 0.0).allowed
    assert limiter.check_user_connect("alice", 0.0).allowed
    assert limiter.check_user_connect("alice", 0.0).limit is LimitKind.CONNECT_USER
    assert limiter.check_user_connect("bob", 0.0).allowed


def test_session_create_needs_both_and_spends_neither_when_refused() -> None:
    limiter = RateLimiter(RateLimits(session_create_per_source=Rate(1.0, 3),
                                     session_create_per_user=Rate(1.0, 1)))
    assert limiter.check_session_create("10.0.0.1", "alice", 0.0).allowed
    refused = limiter.check_session_create("10.0.0.1", "alice", 0.0)
    assert refused.limit is LimitKind.SESSION_USER
    # the per-source bucket was not spent by the refusal: two more for other users
    assert limiter.check_session_create("10.0.0.1", "bob", 0.0).allowed
    assert limiter.check_session_create("10.0.0.1", "carol", 0.0).allowed
    assert limiter.check_session_create("10.0.0.1", "dave", 0.0).limit is \
        LimitKind.SESSION_SOURCE


def test_auth_failures_block_the_source_until_refilled() -> None:
    limiter = RateLimiter(RateLimits(auth_failures_per_source=Rate(10 / 60, 3)))
    src = "198.51.100.9"
    for _ in range(3):
        assert limiter.check_auth(src, 0.0).allowed
        assert limiter.record_auth_failure(src, 0.0).allowed
    blocked = limiter.check_auth(src, 0.0)
    assert not blocked.allowed and blocked.limit is LimitKind.AUTH_FAILURE_SOURCE
    assert blocked.retry_after_s == pytest.approx(6.0)
    assert limiter.check_auth("198.51.100.10", 0.0).allowed  # other sources unaffected
    # successes are not counted: check_auth takes nothing
    assert not limiter.check_auth(src, 5.9).allowed
    assert limiter.check_auth(src, 6.0).allowed


def test_verdict_raises_429_with_retry_after() -> None:
    Verdict(True).check()
    with pytest.raises(RateLimitExceeded) as info:
        Verdict(False, 2.2, LimitKind.AUTH_FAILURE_SOURCE).check()
    exc = info.value
    assert isinstance(exc, RateLimitedError)
    assert (exc.http_status, exc.close_code) == (429, CloseCode.RATE_LIMITED)
    assert exc.message == "too many failed logins from your address; retry in 3s"
    assert exc.retry_after_header == "3"
    assert RateLimitExceeded(LimitKind.CONNECT_SOURCE, 0.01).retry_after_header == "1"


def test_disabled_limits_and_unknown_sources_always_allow() -> None:
    limiter = RateLimiter(RateLimits(connect_per_source=None, connect_per_user=None,
                                     session_create_per_source=None,
                                     session_create_per_user=None,
                                     auth_failures_per_source=None))
    for _ in range(1000):
        assert limiter.check_connect("10.0.0.1", 0.0).allowed
        assert limiter.record_auth_failure("10.0.0.1", 0.0).allowed
    assert limiter.statistics().limits == ()
    assert RateLimiter().check_connect(None, 0.0).allowed


def test_statistics_and_prune() -> None:
    limiter = RateLimiter(RateLimits(connect_per_source=Rate(1.0, 1)))
    limiter.check_connect("10.0.0.1", 0.0)
    limiter.check_connect("10.0.0.1", 0.0)
    stats = {s.name: s for s in limiter.statistics().limits}
    assert set(stats) == {"connect/source", "connect/user", "session-create/source",
                          "session-create/user", "auth-failure/source"}
    c = stats["connect/source"]
    assert (c.rate, c.keys, c.allowed, c.limited, c.max_keys) == ("1/s:1", 1, 1, 1, 65536)
    assert limiter.prune(10.0) == 1
