"""The gateway's session store: records mirrored from the registry; a Redis outage.

SQLite: records appear on create (token hash, holder), follow the session
(offsets, cwd, resume-token rotation, detached, closed), and a restarted
gateway marks its previous run's sessions closed.

Redis, a real ``redis-server`` (tests/helpers/redis_server.py) without
persistence: sessions are mirrored; Redis stopped mid-session: the running
session keeps echoing while new sessions get 503 "session store unavailable;
retry" and /readyz says 503; Redis back (empty): new sessions are accepted
again and the running session's record is put back.

The store is read by a second store object on the same file / server, as
another peer would.  Offsets are written about once a second, so waits for
them poll the store (bounded by ``WAIT_S``).
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from tests.helpers.redis_server import RedisServer, redis_server_available

from conftest import GatewayUnderTest
from podterm.config import ListenConfig, ServeConfig, SessionsConfig, StoreConfig
from podterm.errors import ConfigError
from podterm.gateway.server import Gateway, GatewayOptions, main, serve
from podterm.store import SessionRecord, SessionStore, hash_resume_token, open_store, running

#: Every wait is bounded by this (seconds, real time).
WAIT_S = 10.0
#: How often a wait for the store re-reads it: offsets are written ~1/s, so
#: this only bounds how late the test notices.
POLL_S = 0.05

T = TypeVar("T")
Starter = Callable[..., Awaitable[GatewayUnderTest]]


@pytest.fixture
async def start(nursery: trio.Nursery) -> AsyncIterator[Starter]:
    """Start gateways on a store URL (and a port); each is drained at the end of the test."""
    started: list[GatewayUnderTest] = []

    async def factory(url: str, *, port: int = 0) -> GatewayUnderTest:
        config = ServeConfig(listen=ListenConfig(host="127.0.0.1", port=port),
                             sessions=SessionsConfig(drain_timeout_s=2.0),
                             store=StoreConfig(url=url))
        holder: list[GatewayUnderTest] = []

        async def run(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve(config, options=GatewayOptions(lag_probe_interval_s=0),
                            task_status=task_status)
            finally:
                if holder:
                    holder[0].finished.set()

        handle = GatewayUnderTest(await nursery.start(functools.partial(run)))
        holder.append(handle)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        await stop(handle)


async def stop(handle: GatewayUnderTest) -> None:
    if not handle.finished.is_set():
        handle.gw.shutdown("test over")
        with trio.fail_after(WAIT_S):
            await handle.finished.wait()
    assert len(handle.gw.registry) == 0


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Re-read until ``check()`` returns something; fail after WAIT_S naming ``what``."""
    last: T | None = None
    with trio.move_on_after(WAIT_S):
        while True:
            last = await check()
            if last:
                return last
            await trio.sleep(POLL_S)  # the store is polled: it has no change feed for tests
    raise AssertionError(f"timed out waiting for {what}")


async def record_where(store: SessionStore, session_id: str,
                       predicate: Callable[[SessionRecord], bool], what: str) -> SessionRecord:
    async def check() -> SessionRecord | None:
        record = await store.get_session(session_id)
        return record if record is not None and predicate(record) else None
    return await eventually(check, what)


def holder_of(gateway: GatewayUnderTest) -> str:
    return f"127.0.0.1:{gateway.port}"


# ---------------------------------------------------------------- SQLite


@pytest.mark.trio
async def test_sqlite_records_follow_the_session(start: Starter, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    gateway = await start(url)
    async with running(open_store(url)) as store:
        with trio.fail_after(WAIT_S * 2):
            created = await gateway.create(None, tty=True)  # the interactive shell
            session_id = created["id"]
            # Written before the session started: state, owner, holder, token hash.
            record = await store.get_session(session_id)
            assert record is not None
            assert record.state == "running" and record.owner == "admin"
            assert record.holder == holder_of(gateway)
            assert record.upstream_kind == "local"
            assert record.resume_token_hash == hash_resume_token(created["resume_token"])
            assert created["resume_token"] not in repr(await store.list_sessions())

            # An rw attach rotates the token: the store gets the new hash at once.
            client = await gateway.attach(session_id)
            hello = await client.wait_hello()
            assert hello.resume_token is not None
            await record_where(store, session_id, lambda r: r.resume_token_hash
                               == hash_resume_token(hello.resume_token or ""), "rotated hash")

            # Offsets and the cwd follow (throttled to about once a second).
            await client.send_stdin(b"cd /tmp && echo mark$((6*7))\n")
            await client.wait_output(b"mark42")
            out = client.offset
            record = await record_where(
                store, session_id, lambda r: r.out_offset >= out and r.cwd == "/tmp",
                "offsets and cwd")
            assert record.in_offset == len(b"cd /tmp && echo mark$((6*7))\n")

            # The writer leaves: detached.  DELETE: closed (a tombstone).
            await client.aclose()
            await record_where(store, session_id, lambda r: r.state == "detached", "detached")
            assert (await gateway.rest("DELETE", f"/api/v1/sessions/{session_id}")).status == 200
            await record_where(store, session_id, lambda r: r.state == "closed", "closed")
            # The list is still served from the registry (the in-process truth).
            listed = await gateway.rest("GET", "/api/v1/sessions")
            assert listed.json["items"] == []
            metrics = (await gateway.rest("GET", "/metrics", token=None)).body.decode()
            assert 'podterm_store_info{backend="sqlite"} 1' in metrics
            assert "podterm_store_available 1" in metrics
            assert "podterm_store_write_failures_total 0" in metrics


@pytest.mark.trio
async def test_sqlite_restart_marks_the_previous_run_closed(start: Starter,
                                                            tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    first = await start(url)
    port = first.port
    async with running(open_store(url)) as store:
        with trio.fail_after(WAIT_S * 2):
            created = await first.create(["cat"])
            assert (await store.get_session(created["id"])) is not None
            # What a kill -9 leaves behind: a detached session of this gateway
            # whose record was never closed.
            crashed = await store.put_session(SessionRecord(
                id="s-00000000dead", owner="admin", state="detached",
                holder=holder_of(first)))
            # Another gateway's live session in the same file must be left alone.
            other = await store.put_session(SessionRecord(
                id="s-0123456789ab", owner="bob", state="running", holder="10.9.9.9:7780"))
            # The process goes away with its session (its shell dies with it).
            await stop(first)
            second = await start(url, port=port)
            assert holder_of(second) == holder_of(first)
            # Marked closed during start-up, before the first request is served.
            for session_id in (created["id"], crashed.id):
                record = await store.get_session(session_id)
                assert record is not None and record.state == "closed", record
            untouched = await store.get_session(other.id)
            assert untouched is not None and untouched.state == "running"
            assert untouched.version == other.version
            assert second.gw.mirror is not None
            assert second.gw.mirror.statistics().stale_closed >= 1
            # The new run serves as usual and writes its own records.
            again = await second.create(["cat"])
            record = await store.get_session(again["id"])
            assert record is not None and record.state == "running"


@pytest.mark.trio
async def test_sqlite_writes_are_throttled_and_tombstones_bounded(start: Starter,
                                                                  tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    gateway = await start(url)
    mirror = gateway.gw.mirror
    assert mirror is not None
    mirror.max_tombstones = 2
    async with running(open_store(url)) as store:
        with trio.fail_after(WAIT_S * 2):
            # A session pouring output: thousands of ring appends, about one
            # offsets write a second.
            created = await gateway.create(["sh", "-c", "while :; do echo flood; done"])
            client = await gateway.attach(created["id"])
            await client.wait_hello()
            before = mirror.statistics().writes
            started = trio.current_time()
            await client.wait_for(lambda c: len(c.output) > 2_000_000)
            out = client.offset
            await record_where(store, created["id"], lambda r: r.out_offset >= out, "offsets")
            elapsed = trio.current_time() - started
            writes = mirror.statistics().writes - before
            assert writes <= elapsed / mirror.flush_interval_s + 3, (writes, elapsed)
            await client.aclose()
            ids = [created["id"]]
            for _ in range(3):
                ids.append((await gateway.create(["cat"]))["id"])
            for session_id in ids:
                assert (await gateway.rest("DELETE", f"/api/v1/sessions/{session_id}")
                        ).status == 200

            async def two_tombstones() -> list[SessionRecord] | None:
                records = await store.list_sessions()
                return records if [r.id for r in records] == ids[-2:] else None
            records = await eventually(two_tombstones, "the newest two tombstones only")
            assert {r.state for r in records} == {"closed"}


def test_bad_store_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    config = ServeConfig(listen=ListenConfig(host="127.0.0.1", port=0),
                         store=StoreConfig(url="redis://:secret@/0"))
    with pytest.raises(ConfigError):
        Gateway(config, GatewayOptions())
    assert main(config) == 2
    err = capsys.readouterr().err
    assert "store.url" in err and "secret" not in err


# ---------------------------------------------------------------- Redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_server_available():
        message = "redis-server not installed (scripts/setup.sh --test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # No persistence: a restart comes back empty, the hardest case.
    server = RedisServer(tmp_path / "redis", persistence="none")
    server.start()
    yield server
    server.stop()


def redis_url(server: RedisServer, prefix: str) -> str:
    # Test-sized timeouts: an outage is noticed and the reconnect found within a second.
    return (f"{server.url}?prefix={prefix}&connect_timeout_s=1&op_timeout_s=1"
            "&backoff_base_s=0.02&backoff_cap_s=0.2&keepalive_s=0.5")


async def readyz(gateway: GatewayUnderTest) -> int:
    return (await gateway.rest("GET", "/readyz", token=None)).status


async def metric(gateway: GatewayUnderTest, name: str) -> float:
    text = (await gateway.rest("GET", "/metrics", token=None)).body.decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.trio
async def test_redis_outage_keeps_sessions_and_refuses_new_ones(
        start: Starter, redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    url = redis_url(redis_server, prefix)
    gateway = await start(url)
    async with running(open_store(url)) as store:
        with trio.fail_after(WAIT_S * 3):
            assert await readyz(gateway) == 200
            created = await gateway.create(["cat"])
            session_id = created["id"]
            record = await store.get_session(session_id)
            assert record is not None and record.holder == holder_of(gateway)
            assert record.resume_token_hash == hash_resume_token(created["resume_token"])
            client = await gateway.attach(session_id)
            await client.wait_hello()
            await client.send_stdin(b"before\n")
            await client.wait_output(b"before\r\nbefore")  # tty echo, then cat
            out = client.offset
            await record_where(store, session_id, lambda r: r.out_offset >= out, "offsets")

            # Redis goes away mid-session.
            await redis_server.astop()

            async def not_ready() -> bool:
                return await readyz(gateway) == 503
            await eventually(not_ready, "/readyz 503 while Redis is down")
            # The running session does not notice.
            await client.send_stdin(b"during\n")
            await client.wait_output(b"during\r\nduring")
            # New sessions are refused, clearly, fast.
            with trio.fail_after(2.0):
                refused = await gateway.rest("POST", "/api/v1/sessions", {"command": ["cat"]})
            assert refused.status == 503
            assert refused.json["error"] == {"code": "unavailable",
                                             "message": "session store unavailable; retry"}
            assert len(gateway.registry) == 1
            assert await metric(gateway, "podterm_store_available") == 0
            assert await metric(gateway, "podterm_store_refused_creates_total") == 1

            # Redis is back, empty.
            await redis_server.astart()

            async def ready() -> bool:
                return await readyz(gateway) == 200
            await eventually(ready, "/readyz 200 once Redis is back")
            await store.wait_available()  # the test's own reader reconnects too
            again = await gateway.create(["cat"])
            assert (await store.get_session(again["id"])) is not None
            # The running session's record is put back whole, with what
            # happened during the outage.
            out = client.offset
            record = await record_where(store, session_id, lambda r: r.out_offset >= out,
                                        "the running session re-put")
            assert record.state == "running" and record.holder == holder_of(gateway)
            assert record.in_offset == len(b"before\nduring\n")
            await client.send_stdin(b"after\n")
            await client.wait_output(b"after\r\nafter")
            assert await metric(gateway, "podterm_store_reconnects_total") >= 1
            assert await metric(gateway, "podterm_store_resyncs_total") >= 1
            await client.aclose()


@pytest.mark.trio
async def test_redis_down_at_start(start: Starter, redis_server: RedisServer) -> None:
    # A gateway whose Redis is down still starts, says so on /readyz, refuses new
    # sessions, and serves them as soon as Redis answers.
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    url = redis_url(redis_server, prefix)
    await redis_server.astop()
    gateway = await start(url)
    with trio.fail_after(WAIT_S):
        assert await readyz(gateway) == 503
        refused = await gateway.rest("POST", "/api/v1/sessions", {"command": ["true"]})
        assert refused.status == 503
        await redis_server.astart()

        async def accepted() -> dict[str, Any] | None:
            answer = await gateway.rest("POST", "/api/v1/sessions", {"command": ["cat"]})
            return answer.json if answer.status == 201 else None  # type: ignore[no-any-return]
        created = await eventually(accepted, "a create accepted once Redis is up")
        assert created["state"] == "running"
