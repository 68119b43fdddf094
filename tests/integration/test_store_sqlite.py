"""The SQLite store: the store contract on a real file, persistence across reopen, migrations,
and two stores on one file (two workers) seeing each other's writes and notifications."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from tests.helpers.store_contract import (
    LEASE,
    ContractEnv,
    FakeClock,
    StoreContract,
    make_record,
    next_event_of,
)

from podterm.store import (
    EventKind,
    SqliteStore,
    StoreError,
    StoreEvent,
    open_store,
    running,
)
from podterm.store.sqlite import SCHEMA_VERSION

#: Poll interval for notifications in these tests (the default is 0.25 s).
POLL_S = 0.02


def _store(path: Path, clock: FakeClock | None = None) -> SqliteStore:
    return SqliteStore(str(path), clock=clock or FakeClock(), poll_interval_s=POLL_S)


class TestSqliteStore(StoreContract):
    @pytest.fixture
    async def env(self, nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[ContractEnv]:
        clock = FakeClock()
        path = tmp_path / "store.db"
        store = _store(path, clock)
        await nursery.start(store.run)

        async def raw_dump() -> bytes:
            # The database file and its WAL (recent commits live only there).
            return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("store.db*")))

        yield ContractEnv(store, clock, raw_dump)


@pytest.mark.trio
async def test_data_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    clock = FakeClock()
    async with running(_store(path, clock)) as store:
        record = await store.put_session(make_record())
        await store.update_offsets(record.id, out_offset=9000)
        await store.rotate_resume_token(record.id, "tok-after-restart")
        lease = await store.register_agent(LEASE, ttl_s=300)
    async with running(_store(path, clock)) as store:
        got = await store.get_session(record.id)
        assert got is not None
        assert got.out_offset == 9000 and got.version == record.version + 1
        assert await store.verify_resume_token(record.id, "tok-after-restart")
        assert await store.lookup_agent(LEASE.pod) == lease


@pytest.mark.trio
async def test_open_store_url_uses_wal_and_records_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "by-url.db"
    async with running(open_store(f"sqlite://{path}")) as store:
        assert store.backend == "sqlite"
        await store.put_session(make_record())
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


@pytest.mark.trio
async def test_a_file_from_a_newer_podterm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    async with trio.open_nursery() as nursery:
        with pytest.raises(StoreError, match="newer than this podterm"):
            await nursery.start(_store(path).run)


@pytest.mark.trio
async def test_two_workers_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    clock = FakeClock()
    async with running(_store(path, clock)) as one, running(_store(path, clock)) as two:
        stored = await one.put_session(make_record())
        assert await two.get_session(stored.id) == stored
        # Compare-and-set is atomic across the two connections.
        update = dataclasses.replace(stored, holder="worker-2")
        assert await two.cas_session(stored.id, stored.version, update) is True
        assert await one.cas_session(stored.id, stored.version, update) is False
        # A notification published by one worker reaches the other's subscriber.
        async with two.subscribe() as events:
            await one.register_agent(LEASE, ttl_s=30)
            moved = await next_event_of(events, EventKind.AGENT_MOVED)
            assert moved.data["holder"] == LEASE.holder
            await one.publish(StoreEvent(EventKind.DRAIN, "worker-1"))
            assert (await next_event_of(events, EventKind.DRAIN)).subject == "worker-1"


@pytest.mark.trio
async def test_subscriber_does_not_replay_old_events(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    async with running(_store(path)) as store:
        await store.publish(StoreEvent(EventKind.DRAIN, "old"))
        async with store.subscribe() as events:
            await store.publish(StoreEvent(EventKind.DRAIN, "new"))
            assert (await next_event_of(events, EventKind.DRAIN)).subject == "new"


@pytest.mark.trio
async def test_operations_before_run_fail_clearly(tmp_path: Path) -> None:
    store = _store(tmp_path / "idle.db")
    with pytest.raises(StoreError, match="not started"):
        await store.get_session("s-1")
