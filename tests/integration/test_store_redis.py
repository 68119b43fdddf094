"""The Redis store against a real redis-server (tests/helpers/redis_server.py) on 127.0.0.1.

The store contract; leases that Redis itself expires (PEXPIRE); pub/sub between
two replicas; pipelining and cancellation; and the outage tests: Redis killed
mid-use (calls fail fast with StoreUnavailable), restarted on the same port
(the store reconnects by itself), with AOF persistence (data survives) and
without (RESYNC data_lost: the gateway re-puts).  Also a hung Redis (SIGSTOP),
a store started while Redis is down, AUTH, TLS, and a flushed script cache.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trustme
from tests.helpers.redis_server import RedisServer, RedisTLS, redis_server_available
from tests.helpers.store_contract import (
    LEASE,
    ContractEnv,
    FakeClock,
    StoreContract,
    make_record,
    next_event_of,
)

from podterm.store import (
    AgentLease,
    EventKind,
    PodIdentity,
    RedisStore,
    StoreError,
    StoreEvent,
    StoreUnavailable,
    open_store,
    running,
)

#: Bound on every wait for the store to notice something (seconds, real time).
WAIT_S = 10.0
#: "Fail fast": a call while Redis is down must raise within this.
FAIL_FAST_S = 0.5


@pytest.fixture(scope="module", autouse=True)
def _need_redis_server() -> None:
    if not redis_server_available():
        message = "redis-server not installed (scripts/setup.sh --test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run these, never skip them silently
        pytest.skip(message)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One AOF-persistent server for the tests that do not stop it (each uses its own prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistence="aof")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


def make_store(server: RedisServer, prefix: str, **kwargs: object) -> RedisStore:
    """A store with test-sized timeouts: outages are noticed and recovered within a second."""
    options: dict[str, object] = dict(prefix=prefix, connect_timeout_s=1.0, op_timeout_s=1.0,
                                      backoff_base_s=0.02, backoff_cap_s=0.2, keepalive_s=0.5)
    options.update(kwargs)
    assert server.port is not None
    return RedisStore(server.host, server.port, password=server.password, **options)  # type: ignore[arg-type]


class TestRedisStore(StoreContract):
    @pytest.fixture
    async def env(self, nursery: trio.Nursery, redis_server: RedisServer, prefix: str
                  ) -> AsyncIterator[ContractEnv]:
        clock = FakeClock()
        store = make_store(redis_server, prefix, clock=clock)
        await nursery.start(store.run)
        assert store.is_available

        async def raw_dump() -> bytes:
            # Every value under our prefix, and the whole append-only file: the
            # plaintext token must not even have been sent to Redis.
            return await trio.to_thread.run_sync(redis_server.dump_values, prefix + "*")

        yield ContractEnv(store, clock, raw_dump)


# -- Redis specifics ------------------------------------------------------------------------


@pytest.mark.trio
async def test_keys_live_under_the_prefix(redis_server: RedisServer, prefix: str) -> None:
    async with running(make_store(redis_server, prefix)) as store:
        await store.put_session(make_record())
        await store.register_agent(LEASE, ttl_s=30)
    keys = sorted(await trio.to_thread.run_sync(redis_server.keys, prefix + "*"))
    assert keys == sorted(f"{prefix}{k}".encode() for k in (
        "s:s-0001", "sessions", "owner:alice", "agent:team-a/web-7f9c", "agents", "epoch"))
    assert await redis_server.acommand("HGET", f"{prefix}s:s-0001", "owner") == b"alice"


@pytest.mark.trio
async def test_lease_really_expires_in_redis(redis_server: RedisServer, prefix: str) -> None:
    # The real clock: Redis' PEXPIRE, not a fake clock, ends this lease.
    async with running(make_store(redis_server, prefix)) as store:
        lease = await store.register_agent(LEASE, ttl_s=0.2)
        assert await store.lookup_agent(LEASE.pod) == lease
        assert 0 < int(await redis_server.acommand("PTTL", f"{prefix}agent:team-a/web-7f9c")) <= 200  # type: ignore[arg-type]
        with trio.fail_after(WAIT_S):
            while await redis_server.acommand("EXISTS", f"{prefix}agent:team-a/web-7f9c") != 0:
                await trio.sleep(0.02)  # polling a condition, bounded by the deadline
        assert await store.lookup_agent(LEASE.pod) is None
        assert await store.renew_agent(LEASE, ttl_s=1) is None
        assert await store.expire() == 1  # the zset entry is reclaimed too
        assert await redis_server.acommand("ZCARD", f"{prefix}agents") == 0


@pytest.mark.trio
async def test_renew_resets_the_redis_ttl(redis_server: RedisServer, prefix: str) -> None:
    async with running(make_store(redis_server, prefix)) as store:
        await store.register_agent(LEASE, ttl_s=1)
        assert await store.renew_agent(LEASE, ttl_s=60) is not None
        ttl = await redis_server.acommand("PTTL", f"{prefix}agent:team-a/web-7f9c")
        assert isinstance(ttl, int) and 50_000 < ttl <= 60_000


@pytest.mark.trio
async def test_pubsub_between_two_replicas(redis_server: RedisServer, prefix: str) -> None:
    async with running(make_store(redis_server, prefix)) as a, \
            running(make_store(redis_server, prefix)) as b:
        async with a.subscribe() as events:
            await b.register_agent(dataclasses.replace(LEASE, holder="replica-b"), ttl_s=30)
            moved = await next_event_of(events, EventKind.AGENT_MOVED)
            assert (moved.subject, moved.data["holder"], moved.origin) == (
                "team-a/web-7f9c", "replica-b", "replica-b")
            await b.publish(StoreEvent(EventKind.DRAIN, "replica-b", origin="replica-b"))
            drain = await next_event_of(events, EventKind.DRAIN)
            assert drain == StoreEvent(EventKind.DRAIN, "replica-b", origin="replica-b")
        assert a.statistics().events_delivered >= 2 and b.statistics().events_published == 2


@pytest.mark.trio
async def test_other_prefixes_do_not_hear_our_events(redis_server: RedisServer,
                                                     prefix: str) -> None:
    async with running(make_store(redis_server, prefix)) as ours, \
            running(make_store(redis_server, prefix + "other:")) as theirs:
        async with theirs.subscribe() as their_events, ours.subscribe() as our_events:
            await ours.publish(StoreEvent(EventKind.DRAIN, "ours"))
            assert (await next_event_of(our_events, EventKind.DRAIN)).subject == "ours"
            await theirs.publish(StoreEvent(EventKind.DRAIN, "theirs"))
            assert (await next_event_of(their_events, EventKind.DRAIN)).subject == "theirs"


@pytest.mark.trio
async def test_concurrent_calls_are_pipelined_and_get_their_own_replies(
        redis_server: RedisServer, prefix: str) -> None:
    async with running(make_store(redis_server, prefix)) as store:
        async def roundtrip(i: int) -> None:
            await store.put_session(make_record(f"s-{i:04d}", owner=f"user-{i % 7}"))
            got = await store.get_session(f"s-{i:04d}")
            assert got is not None and got.owner == f"user-{i % 7}"

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(roundtrip, i)
        assert len(await store.list_sessions()) == 300  # SSCAN + pipelined HGETALL batches
        assert len(await store.list_sessions(owner="user-3")) == len(range(3, 300, 7))


@pytest.mark.trio
async def test_cancelled_calls_leave_the_connection_in_step(redis_server: RedisServer,
                                                            prefix: str) -> None:
    async with running(make_store(redis_server, prefix)) as store:
        for i in range(20):
            await store.put_session(make_record(f"s-{i}", owner=f"o{i}"))
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.get_session, f"s-{i}")
            await trio.lowlevel.checkpoint()  # let them send...
            nursery.cancel_scope.cancel()  # ...and abandon their replies
        for i in range(20):
            got = await store.get_session(f"s-{i}")
            assert got is not None and got.owner == f"o{i}"
        assert store.statistics().reconnects == 0


@pytest.mark.trio
async def test_foreign_data_under_the_prefix_is_a_store_error(redis_server: RedisServer,
                                                              prefix: str) -> None:
    await redis_server.acommand("HSET", f"{prefix}s:s-bad", "junk", "1")
    await redis_server.acommand("SET", f"{prefix}s:s-str", "x")
    async with running(make_store(redis_server, prefix)) as store:
        with pytest.raises(StoreError, match="malformed session"):
            await store.get_session("s-bad")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.get_session("s-str")
        assert store.is_available  # a bad record is not an outage


@pytest.mark.trio
async def test_flushed_script_cache_is_refilled(redis_server: RedisServer, prefix: str) -> None:
    async with running(make_store(redis_server, prefix)) as store:
        await store.put_session(make_record())
        assert await redis_server.acommand("SCRIPT", "FLUSH") == "OK"
        assert (await store.put_session(make_record())).version == 2  # NOSCRIPT -> EVAL


# -- outages ------------------------------------------------------------------------------


async def _assert_fails_fast(store: RedisStore) -> None:
    start = trio.current_time()
    with pytest.raises(StoreUnavailable):
        await store.get_session("s-0001")
    assert trio.current_time() - start < FAIL_FAST_S


async def _wait_down(store: RedisStore) -> None:
    with trio.fail_after(WAIT_S):
        while store.is_available:
            await trio.sleep(0.01)  # polling a condition, bounded by the deadline


async def _next_resync(events: trio.MemoryReceiveChannel[StoreEvent]) -> set[str]:
    """Reasons of the two RESYNCs a Redis comeback produces (commands + pub/sub)."""
    reasons: set[str] = set()
    while len(reasons) < 2:
        reasons.add((await next_event_of(events, EventKind.RESYNC)).data["reason"])
    return reasons


@pytest.mark.trio
async def test_redis_killed_and_restarted_with_aof(tmp_path: Path, prefix: str) -> None:
    server = RedisServer(tmp_path, persistence="aof")
    await server.astart()
    try:
        async with running(make_store(server, prefix)) as store, store.subscribe() as events:
            stored = await store.put_session(make_record())
            lease = await store.register_agent(dataclasses.replace(LEASE), ttl_s=60)

            await server.astop(kill=True)  # a crash, mid-use
            # In flight or not, every call now fails quickly and clearly...
            for _ in range(5):
                await _assert_fails_fast(store)
            await _wait_down(store)
            assert await store.health() is False
            with pytest.raises(StoreUnavailable, match="unavailable, reconnecting"):
                await store.put_session(make_record("s-new"))
            stats = store.statistics()
            assert not stats.available and stats.failures >= 6 and stats.last_error

            await server.astart()  # same port, same directory: the AOF is replayed
            with trio.fail_after(WAIT_S):
                await store.wait_available()
                assert await _next_resync(events) == {"reconnected", "resubscribed"}
            # ...and the store came back by itself, with the data.
            assert await store.get_session(stored.id) == stored
            assert await store.lookup_agent(LEASE.pod) == lease
            assert (await store.put_session(make_record("s-new"))).version == 1
            await store.publish(StoreEvent(EventKind.DRAIN, "after-restart"))
            assert (await next_event_of(events, EventKind.DRAIN)).subject == "after-restart"
            assert store.statistics().reconnects == 1
    finally:
        await server.astop()


@pytest.mark.trio
async def test_redis_restarted_without_persistence_reports_data_lost(tmp_path: Path,
                                                                    prefix: str) -> None:
    server = RedisServer(tmp_path, persistence="none")
    await server.astart()
    try:
        async with running(make_store(server, prefix)) as store, store.subscribe() as events:
            stored = await store.put_session(make_record())
            await server.astop()
            await _assert_fails_fast(store)
            await server.astart()
            with trio.fail_after(WAIT_S):
                assert await _next_resync(events) == {"data_lost", "resubscribed"}
            # What the gateway must do on data_lost: re-put what it runs.
            assert await store.get_session(stored.id) is None
            again = await store.put_session(stored)
            assert again.version == 1 and await store.get_session(stored.id) == again
    finally:
        await server.astop()


@pytest.mark.trio
async def test_hung_redis_times_out_then_recovers(tmp_path: Path, prefix: str) -> None:
    server = RedisServer(tmp_path, persistence="none")
    await server.astart()
    try:
        async with running(make_store(server, prefix, op_timeout_s=0.3,
                                      connect_timeout_s=0.3)) as store:
            await store.put_session(make_record())
            server.pause()
            start = trio.current_time()
            with pytest.raises(StoreUnavailable, match="did not answer within 0.3 s"):
                await store.get_session("s-0001")
            assert trio.current_time() - start < 0.3 + FAIL_FAST_S
            await _assert_fails_fast(store)  # connection dropped: now it fails at once
            server.resume()
            with trio.fail_after(WAIT_S):
                await store.wait_available()
            assert await store.get_session("s-0001") is not None
    finally:
        server.resume()
        await server.astop()


@pytest.mark.trio
async def test_store_starts_while_redis_is_down(tmp_path: Path, prefix: str) -> None:
    server = RedisServer(tmp_path, persistence="none")
    await server.astart()
    await server.astop()  # keeps its port: nothing listens there now
    try:
        store = make_store(server, prefix)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT_S):
                await nursery.start(store.run)  # starts anyway
            assert not store.is_available
            await _assert_fails_fast(store)
            assert "connect to" in (store.statistics().last_error or "")
            await server.astart()
            with trio.fail_after(WAIT_S):
                await store.wait_available()
            assert (await store.put_session(make_record())).version == 1
            await store.aclose()
    finally:
        await server.astop()


# -- AUTH and TLS ---------------------------------------------------------------------------


@pytest.mark.trio
async def test_password_from_the_url(tmp_path: Path, prefix: str) -> None:
    server = RedisServer(tmp_path, persistence="none", password="s3cret pass")
    await server.astart()
    try:
        url = f"redis://:s3cret%20pass@127.0.0.1:{server.port}/2?prefix={prefix}"
        async with running(open_store(url)) as store, store.subscribe() as events:
            await store.put_session(make_record())
            assert await server.acommand("SELECT", 2) == "OK"  # (its own connection)
            await store.publish(StoreEvent(EventKind.DRAIN, "auth"))
            assert (await next_event_of(events, EventKind.DRAIN)).subject == "auth"
        wrong = RedisStore("127.0.0.1", server.port or 0, password="wrong", prefix=prefix,
                           connect_timeout_s=1.0)
        async with running(wrong):
            assert not wrong.is_available
            assert "AUTH failed" in (wrong.statistics().last_error or "")
            with pytest.raises(StoreUnavailable, match="AUTH failed"):
                await wrong.get_session("s-0001")
    finally:
        await server.astop()


@pytest.fixture
def redis_tls(tmp_path: Path) -> RedisTLS:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return RedisTLS(str(paths["cert"]), str(paths["key"]), str(paths["ca"]), context)


@pytest.mark.trio
async def test_rediss_over_tls(tmp_path: Path, prefix: str, redis_tls: RedisTLS) -> None:
    server = RedisServer(tmp_path / "data", persistence="none", tls=redis_tls)
    await server.astart()
    try:
        url = f"rediss://127.0.0.1:{server.port}/0?prefix={prefix}&ca_file={redis_tls.ca_file}"
        async with running(open_store(url)) as store, store.subscribe() as events:
            assert store.is_available
            stored = await store.put_session(make_record())
            assert await store.get_session(stored.id) == stored
            await store.register_agent(AgentLease("a", PodIdentity("ns", "p"), "h"), ttl_s=5)
            assert (await next_event_of(events, EventKind.AGENT_MOVED)).subject == "ns/p"
        # Without trusting the CA, the store does not connect (and says why).
        untrusting = open_store(f"rediss://127.0.0.1:{server.port}/0?prefix={prefix}")
        async with running(untrusting):
            assert not untrusting.is_available
            assert "CERTIFICATE_VERIFY_FAILED" in (untrusting.statistics().last_error or "")
    finally:
        await server.astop()


def test_round_trip_is_sub_millisecond(redis_server: RedisServer, prefix: str) -> None:
    """The measurement behind the client choice (docs: store/redis.py): PING round trip."""
    async def measure() -> float:
        async with running(make_store(redis_server, prefix)) as store:
            n = 500
            start = time.perf_counter()
            for _ in range(n):
                await store.health()
            return (time.perf_counter() - start) / n

    per_call = trio.run(measure)
    print(f"redis PING round trip: {per_call * 1e6:.0f} us")
    assert per_call < 0.005  # loopback; measured ~80 us
