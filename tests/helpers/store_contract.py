"""The contract every session store backend meets, written once, run per backend.

As uvloop writes each TCP test once and runs it against two loops, a backend's
test module subclasses :class:`StoreContract` and provides one fixture,
``env``, yielding a :class:`ContractEnv`: a *running* store built with the
env's :class:`FakeClock`, and ``raw_dump()``, everything the backend holds
(memory dicts, the SQLite file and its WAL, Redis values and AOF) as bytes.

Each test states one rule of ``podterm.store.base`` and is named for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio

from podterm.store import (
    AgentLease,
    EventKind,
    PodIdentity,
    SessionRecord,
    SessionStore,
    StoreEvent,
    StoreUnavailable,
    hash_resume_token,
)

#: Every wait for a notification is bounded by this (seconds, real time).
EVENT_WAIT_S = 5.0

T0 = 1_700_000_000.0


class FakeClock:
    """Wall-clock seconds under test control: ``clock()`` reads, ``advance(s)`` moves."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ContractEnv:
    store: SessionStore
    clock: FakeClock
    raw_dump: Callable[[], Awaitable[bytes]]


def make_record(session_id: str = "s-0001", owner: str = "alice", **changes: object
                ) -> SessionRecord:
    """A fully populated record (every field off its default), with ``changes`` applied."""
    record = SessionRecord(
        id=session_id, owner=owner, upstream_kind="agent", namespace="team-a", pod="web-7f9c",
        container="app", command=("bash", "-l"), tty=True, cols=132, rows=43, state="running",
        created_at=T0 - 60.0, updated_at=0.0, resume_token_hash=hash_resume_token("tok-initial"),
        out_offset=4096, in_offset=17, writer_acked=2048, cwd="/srv/app",
        env={"LANG": "C.UTF-8", "PS1": "$ "}, holder="10.0.0.7:7780/w1")
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


LEASE = AgentLease("agent-1", PodIdentity("team-a", "web-7f9c"), "10.0.0.7:7780/w1")


async def next_event(events: trio.MemoryReceiveChannel[StoreEvent]) -> StoreEvent:
    with trio.fail_after(EVENT_WAIT_S):
        return await events.receive()


async def next_event_of(events: trio.MemoryReceiveChannel[StoreEvent],
                        kind: EventKind) -> StoreEvent:
    """The next event of ``kind`` (others, e.g. a RESYNC, are skipped)."""
    with trio.fail_after(EVENT_WAIT_S):
        while True:
            event = await events.receive()
            if event.kind is kind:
                return event


class StoreContract:
    """Subclass as ``TestXStore`` and provide the ``env`` fixture."""

    # -- records ---------------------------------------------------------------------

    @pytest.mark.trio
    async def test_get_missing_session_is_none(self, env: ContractEnv) -> None:
        assert await env.store.get_session("s-nope") is None

    @pytest.mark.trio
    async def test_put_then_get_roundtrips_every_field(self, env: ContractEnv) -> None:
        record = make_record()
        stored = await env.store.put_session(record)
        assert stored == dataclasses.replace(record, version=1, updated_at=env.clock.now)
        assert await env.store.get_session(record.id) == stored

    @pytest.mark.trio
    async def test_put_roundtrips_none_fields(self, env: ContractEnv) -> None:
        record = SessionRecord(id="s-local", owner="bob", created_at=T0)
        stored = await env.store.put_session(record)
        got = await env.store.get_session("s-local")
        assert got == stored
        assert got is not None and (got.namespace, got.pod, got.command, got.cwd) == (None,) * 4
        assert dict(got.env) == {} and got.resume_token_hash == ""

    @pytest.mark.trio
    async def test_put_bumps_version_and_sets_updated_at(self, env: ContractEnv) -> None:
        first = await env.store.put_session(make_record())
        env.clock.advance(5)
        second = await env.store.put_session(dataclasses.replace(first, state="detached",
                                                                 version=99))
        assert (first.version, second.version) == (1, 2)
        assert second.updated_at == env.clock.now
        assert await env.store.get_session(first.id) == second

    @pytest.mark.trio
    async def test_delete_session(self, env: ContractEnv) -> None:
        await env.store.put_session(make_record())
        assert await env.store.delete_session("s-0001") is True
        assert await env.store.get_session("s-0001") is None
        assert await env.store.list_sessions() == []
        assert await env.store.list_sessions(owner="alice") == []
        assert await env.store.delete_session("s-0001") is False

    @pytest.mark.trio
    async def test_list_sessions_oldest_first_and_by_owner(self, env: ContractEnv) -> None:
        a = await env.store.put_session(make_record("s-a", "alice", created_at=T0 + 2))
        b = await env.store.put_session(make_record("s-b", "bob", created_at=T0 + 1))
        c = await env.store.put_session(make_record("s-c", "alice", created_at=T0 + 3))
        assert await env.store.list_sessions() == [b, a, c]
        assert await env.store.list_sessions(owner="alice") == [a, c]
        assert await env.store.list_sessions(owner="bob") == [b]
        assert await env.store.list_sessions(owner="carol") == []

    @pytest.mark.trio
    async def test_owner_change_moves_record_between_owner_lists(self, env: ContractEnv) -> None:
        record = await env.store.put_session(make_record("s-a", "alice"))
        moved = await env.store.put_session(dataclasses.replace(record, owner="bob"))
        assert await env.store.list_sessions(owner="alice") == []
        assert await env.store.list_sessions(owner="bob") == [moved]

    # -- compare-and-set ----------------------------------------------------------------

    @pytest.mark.trio
    async def test_cas_with_current_version_writes_and_bumps(self, env: ContractEnv) -> None:
        stored = await env.store.put_session(make_record())
        env.clock.advance(1)
        update = dataclasses.replace(stored, holder="10.0.0.8:7780/w0", state="detached")
        assert await env.store.cas_session(stored.id, stored.version, update) is True
        got = await env.store.get_session(stored.id)
        assert got == dataclasses.replace(update, version=stored.version + 1,
                                          updated_at=env.clock.now)

    @pytest.mark.trio
    async def test_cas_with_stale_version_fails_and_changes_nothing(self, env: ContractEnv
                                                                    ) -> None:
        stored = await env.store.put_session(make_record())
        newer = await env.store.put_session(dataclasses.replace(stored, state="detached"))
        stale = dataclasses.replace(stored, holder="elsewhere")
        assert await env.store.cas_session(stored.id, stored.version, stale) is False
        assert await env.store.get_session(stored.id) == newer

    @pytest.mark.trio
    async def test_cas_race_has_exactly_one_winner(self, env: ContractEnv) -> None:
        stored = await env.store.put_session(make_record())
        results: dict[str, bool] = {}

        async def take_over(holder: str) -> None:
            update = dataclasses.replace(stored, holder=holder)
            results[holder] = await env.store.cas_session(stored.id, stored.version, update)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(take_over, f"replica-{i}")
        winners = [h for h, won in results.items() if won]
        assert len(winners) == 1
        got = await env.store.get_session(stored.id)
        assert got is not None and got.holder == winners[0] and got.version == 2

    @pytest.mark.trio
    async def test_cas_on_missing_session_fails(self, env: ContractEnv) -> None:
        assert await env.store.cas_session("s-0001", 0, make_record()) is False
        assert await env.store.cas_session("s-0001", 1, make_record()) is False
        assert await env.store.get_session("s-0001") is None

    @pytest.mark.trio
    async def test_cas_rejects_update_for_another_id(self, env: ContractEnv) -> None:
        with pytest.raises(ValueError, match="update.id"):
            await env.store.cas_session("s-other", 1, make_record())

    # -- offsets and context ----------------------------------------------------------------

    @pytest.mark.trio
    async def test_offsets_only_move_forward_and_keep_the_version(self, env: ContractEnv
                                                                  ) -> None:
        stored = await env.store.put_session(make_record(out_offset=100, in_offset=10,
                                                         writer_acked=50))
        env.clock.advance(2)
        assert await env.store.update_offsets(stored.id, out_offset=300, writer_acked=40) is True
        got = await env.store.get_session(stored.id)
        assert got is not None
        # writer_acked 40 < 50: a late write from a stale peer is ignored.
        assert (got.out_offset, got.in_offset, got.writer_acked) == (300, 10, 50)
        assert got.version == stored.version and got.updated_at == env.clock.now
        # ... so a CAS with the version read before the offset write still wins.
        update = dataclasses.replace(got, holder="new")
        assert await env.store.cas_session(stored.id, stored.version, update) is True

    @pytest.mark.trio
    async def test_offsets_on_missing_session_return_false(self, env: ContractEnv) -> None:
        assert await env.store.update_offsets("s-nope", out_offset=1) is False
        assert await env.store.get_session("s-nope") is None

    @pytest.mark.trio
    async def test_offsets_reject_negative_values(self, env: ContractEnv) -> None:
        with pytest.raises(ValueError):
            await env.store.update_offsets("s-0001", out_offset=-1)

    @pytest.mark.trio
    async def test_save_context_replaces_cwd_and_env_without_version_bump(
            self, env: ContractEnv) -> None:
        stored = await env.store.put_session(make_record())
        assert await env.store.save_context(stored.id, "/tmp/work", {"A": "1"}) is True
        got = await env.store.get_session(stored.id)
        assert got is not None and (got.cwd, dict(got.env)) == ("/tmp/work", {"A": "1"})
        assert got.version == stored.version
        assert await env.store.save_context(stored.id, None, {}) is True
        got = await env.store.get_session(stored.id)
        assert got is not None and (got.cwd, dict(got.env)) == (None, {})
        assert await env.store.save_context("s-nope", "/", {}) is False

    # -- resume tokens --------------------------------------------------------------------

    @pytest.mark.trio
    async def test_verify_resume_token(self, env: ContractEnv) -> None:
        await env.store.put_session(make_record())
        assert await env.store.verify_resume_token("s-0001", "tok-initial") is True
        assert await env.store.verify_resume_token("s-0001", "tok-initia") is False
        assert await env.store.verify_resume_token("s-0001", "") is False
        assert await env.store.verify_resume_token("s-nope", "tok-initial") is False

    @pytest.mark.trio
    async def test_session_without_token_accepts_none(self, env: ContractEnv) -> None:
        await env.store.put_session(make_record(resume_token_hash=""))
        assert await env.store.verify_resume_token("s-0001", "") is False
        assert await env.store.verify_resume_token("s-0001", "anything") is False

    @pytest.mark.trio
    async def test_rotate_replaces_token_and_bumps_version(self, env: ContractEnv) -> None:
        stored = await env.store.put_session(make_record())
        assert await env.store.rotate_resume_token("s-0001", "tok-2") is True
        assert await env.store.verify_resume_token("s-0001", "tok-initial") is False
        assert await env.store.verify_resume_token("s-0001", "tok-2") is True
        got = await env.store.get_session("s-0001")
        assert got is not None and got.version == stored.version + 1
        assert got.resume_token_hash == hash_resume_token("tok-2")

    @pytest.mark.trio
    async def test_rotate_with_old_token_checks_it(self, env: ContractEnv) -> None:
        await env.store.put_session(make_record())
        assert await env.store.rotate_resume_token("s-0001", "tok-x", old_token="wrong") is False
        assert await env.store.verify_resume_token("s-0001", "tok-initial") is True
        assert await env.store.rotate_resume_token("s-0001", "tok-2",
                                                   old_token="tok-initial") is True
        assert await env.store.verify_resume_token("s-0001", "tok-2") is True
        assert await env.store.rotate_resume_token("s-nope", "tok-3") is False

    @pytest.mark.trio
    async def test_two_resumes_with_one_token_get_one_new_token(self, env: ContractEnv) -> None:
        await env.store.put_session(make_record())
        won: list[str] = []

        async def resume(new: str) -> None:
            if await env.store.rotate_resume_token("s-0001", new, old_token="tok-initial"):
                won.append(new)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(resume, f"tok-new-{i}")
        assert len(won) == 1
        assert await env.store.verify_resume_token("s-0001", won[0]) is True

    @pytest.mark.trio
    async def test_plaintext_tokens_are_never_stored(self, env: ContractEnv) -> None:
        secret1, secret2 = "Pl41nT3xt-First-Token", "Pl41nT3xt-Second-Token"
        await env.store.put_session(make_record(resume_token_hash=hash_resume_token(secret1)))
        assert await env.store.verify_resume_token("s-0001", secret1)
        assert await env.store.rotate_resume_token("s-0001", secret2, old_token=secret1)
        assert await env.store.verify_resume_token("s-0001", secret2)
        raw = await env.raw_dump()
        assert hash_resume_token(secret2).encode() in raw  # the dump does see stored data
        assert secret1.encode() not in raw
        assert secret2.encode() not in raw

    # -- agent leases -------------------------------------------------------------------

    @pytest.mark.trio
    async def test_register_then_lookup(self, env: ContractEnv) -> None:
        lease = await env.store.register_agent(LEASE, ttl_s=30)
        assert lease == dataclasses.replace(LEASE, expires_at=env.clock.now + 30)
        assert await env.store.lookup_agent(LEASE.pod) == lease
        assert await env.store.lookup_agent(PodIdentity("team-a", "other")) is None
        assert await env.store.list_agents() == [lease]

    @pytest.mark.trio
    async def test_lease_expires_by_the_clock(self, env: ContractEnv) -> None:
        await env.store.register_agent(LEASE, ttl_s=30)
        env.clock.advance(29.5)
        assert await env.store.lookup_agent(LEASE.pod) is not None
        env.clock.advance(0.5)  # expires_at == now: expired
        assert await env.store.lookup_agent(LEASE.pod) is None
        assert await env.store.list_agents() == []
        assert await env.store.renew_agent(LEASE, ttl_s=30) is None
        assert await env.store.expire() == 1
        assert await env.store.expire() == 0

    @pytest.mark.trio
    async def test_renew_extends_a_live_lease(self, env: ContractEnv) -> None:
        await env.store.register_agent(LEASE, ttl_s=10)
        env.clock.advance(8)
        renewed = await env.store.renew_agent(LEASE, ttl_s=10)
        assert renewed is not None and renewed.expires_at == env.clock.now + 10
        env.clock.advance(8)  # 16 s after registering, 8 after renewing
        assert await env.store.lookup_agent(LEASE.pod) == renewed
        assert await env.store.expire() == 0

    @pytest.mark.trio
    async def test_agent_move_fences_the_old_holder(self, env: ContractEnv) -> None:
        await env.store.register_agent(LEASE, ttl_s=30)
        moved = dataclasses.replace(LEASE, holder="10.0.0.9:7780/w3")
        await env.store.register_agent(moved, ttl_s=30)
        found = await env.store.lookup_agent(LEASE.pod)
        assert found is not None and found.holder == moved.holder
        # The old holder can neither renew nor release the moved lease.
        assert await env.store.renew_agent(LEASE, ttl_s=30) is None
        assert await env.store.release_agent(LEASE) is False
        assert await env.store.release_agent(moved) is True
        assert await env.store.lookup_agent(LEASE.pod) is None

    @pytest.mark.trio
    async def test_lease_ttl_must_be_positive(self, env: ContractEnv) -> None:
        for bad in (0, -1, float("inf"), float("nan")):
            with pytest.raises(ValueError):
                await env.store.register_agent(LEASE, ttl_s=bad)

    # -- notifications ------------------------------------------------------------------

    @pytest.mark.trio
    async def test_published_event_reaches_subscriber(self, env: ContractEnv) -> None:
        async with env.store.subscribe() as events:
            drain = StoreEvent(EventKind.DRAIN, "10.0.0.7:7780/w1", {"deadline_s": "25"},
                               origin="10.0.0.7:7780/w1")
            await env.store.publish(drain)
            assert await next_event_of(events, EventKind.DRAIN) == drain

    @pytest.mark.trio
    async def test_agent_move_is_announced_once(self, env: ContractEnv) -> None:
        async with env.store.subscribe() as events:
            await env.store.register_agent(LEASE, ttl_s=30)
            first = await next_event_of(events, EventKind.AGENT_MOVED)
            assert (first.subject, dict(first.data)) == (
                "team-a/web-7f9c", {"holder": LEASE.holder, "agent_id": "agent-1"})
            # Same holder again (a reconnect to the same peer): no announcement.
            await env.store.register_agent(LEASE, ttl_s=30)
            marker = StoreEvent(EventKind.DRAIN, "marker")
            await env.store.publish(marker)
            assert await next_event_of(events, EventKind.DRAIN) == marker
            # A new holder: announced.
            await env.store.register_agent(dataclasses.replace(LEASE, holder="h2"), ttl_s=30)
            moved = await next_event_of(events, EventKind.AGENT_MOVED)
            assert moved.data["holder"] == "h2"
        assert events.statistics().open_receive_channels == 0

    @pytest.mark.trio
    async def test_resync_cannot_be_published(self, env: ContractEnv) -> None:
        with pytest.raises(ValueError):
            await env.store.publish(StoreEvent(EventKind.RESYNC))

    # -- lifecycle ------------------------------------------------------------------------

    @pytest.mark.trio
    async def test_health_and_statistics(self, env: ContractEnv) -> None:
        assert env.store.is_available
        assert await env.store.health() is True
        await env.store.put_session(make_record())
        stats = env.store.statistics()
        assert stats.backend == env.store.backend
        assert stats.available and stats.operations >= 1
        with trio.fail_after(1):
            await env.store.wait_available()

    @pytest.mark.trio
    async def test_closed_store_is_unavailable(self, env: ContractEnv) -> None:
        await env.store.aclose()
        assert not env.store.is_available
        assert await env.store.health() is False
        with pytest.raises(StoreUnavailable):
            await env.store.get_session("s-0001")
        with pytest.raises(StoreUnavailable):
            await env.store.register_agent(LEASE, ttl_s=30)
        await env.store.aclose()  # idempotent
