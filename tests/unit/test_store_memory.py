"""The in-process store meets the store contract; URL parsing picks backends and names bad URLs."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
import trio
from tests.helpers.store_contract import ContractEnv, FakeClock, StoreContract

from podterm.errors import ConfigError
from podterm.store import (
    MemoryStore,
    RedisStore,
    SessionRecord,
    SessionStore,
    SqliteStore,
    open_store,
    redact_url,
)
from podterm.store.base import EventKind, Fanout, StoreEvent


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def env(self, nursery: trio.Nursery) -> AsyncIterator[ContractEnv]:
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        await nursery.start(store.run)

        async def raw_dump() -> bytes:
            # Every field of every record (SessionRecord's repr shows only a summary).
            values = [[getattr(r, f.name) for f in dataclasses.fields(r)]
                      for r in store._sessions.values()]
            return (repr(values) + repr(store._agents)).encode()

        yield ContractEnv(store, clock, raw_dump)


def test_backends_implement_the_protocol() -> None:
    assert isinstance(MemoryStore(), SessionStore)
    assert isinstance(SqliteStore("/tmp/x.db"), SessionStore)
    assert isinstance(RedisStore(), SessionStore)


def test_record_refuses_a_plaintext_token() -> None:
    with pytest.raises(ValueError, match="never the token"):
        SessionRecord(id="s-1", owner="a", resume_token_hash="Ikm0Cn3W1v1hKQ5Zt8vKcP4b")


def test_record_is_a_value() -> None:
    env = {"A": "1"}
    record = SessionRecord(id="s-1", owner="a", env=env)
    env["A"] = "2"
    assert dict(record.env) == {"A": "1"}
    with pytest.raises(TypeError):
        record.env["B"] = "3"  # type: ignore[index]


# -- open_store -------------------------------------------------------------------------


def test_open_store_picks_backend_by_scheme() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    sqlite = open_store("sqlite:///var/lib/podterm/store.db?busy_timeout_s=2")
    assert isinstance(sqlite, SqliteStore) and sqlite.path == "/var/lib/podterm/store.db"
    redis = open_store("redis://u:p%40ss@cache.internal:6380/3?prefix=pt:&op_timeout_s=0.5")
    assert isinstance(redis, RedisStore)
    assert (redis.host, redis.port, redis.db, redis.prefix) == ("cache.internal", 6380, 3, "pt:")
    assert redis._password == "p@ss" and redis._username == "u"
    default = open_store("redis://localhost")
    assert isinstance(default, RedisStore) and (default.port, default.db) == (6379, 0)
    tls = open_store("rediss://localhost:6390")
    assert isinstance(tls, RedisStore) and tls._ssl_context is not None
    assert "rediss://" in repr(tls) and "p@ss" not in repr(redis)


@pytest.mark.parametrize("url, fragment", [
    ("mongodb://x", "unknown scheme 'mongodb'"),
    ("no-scheme-at-all", "no scheme"),
    ("memory://host", "memory:// takes no host"),
    ("sqlite://relative.db", "absolute file path"),
    ("sqlite:///", "absolute file path"),
    ("sqlite:///x.db?cache=1", "unknown option 'cache'"),
    ("redis://", "needs a host"),
    ("redis://h:notaport", "Port could not be cast"),
    ("redis://h/abc", "database 'abc' must be a number"),
    ("redis://h/0?op_timeout_s=-1", "op_timeout_s='-1' must be a positive number"),
    ("redis://h/0?bogus=1", "unknown option 'bogus'"),
    ("redis://h/0?ca_file=/x", "unknown option 'ca_file'"),
    ("redis://h/0?prefix=", "prefix must not be empty"),
])
def test_bad_store_url_is_a_config_error_naming_it(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(url)
    message = str(info.value)
    assert "store.url" in message and fragment in message and "expected memory://" in message


def test_config_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        open_store("redis://user:hunter2@h/x")
    assert "hunter2" not in str(info.value) and "user:***@h" in str(info.value)
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


# -- fanout -----------------------------------------------------------------------------


@pytest.mark.trio
async def test_full_subscriber_loses_events_and_they_are_counted() -> None:
    fanout = Fanout()
    async with fanout.subscribe(max_buffer=2) as slow, fanout.subscribe(max_buffer=8) as fast:
        for i in range(5):
            fanout.deliver(StoreEvent(EventKind.DRAIN, str(i)))
        assert [slow.receive_nowait().subject for _ in range(2)] == ["0", "1"]
        assert [fast.receive_nowait().subject for _ in range(5)] == ["0", "1", "2", "3", "4"]
        assert (fanout.delivered, fanout.dropped) == (7, 3)
    assert len(fanout) == 0
