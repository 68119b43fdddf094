"""In-process session store: the default for one gateway process (``memory://``).

Dictionaries in this process; nothing survives it and no other process sees
it (``podterm serve --workers N`` needs ``sqlite://`` or ``redis://``).  Every
operation is atomic: none awaits between reading and writing (the checkpoint
comes first).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager

import trio

from .base import (
    DEFAULT_SUBSCRIBER_BUFFER,
    AgentLease,
    Clock,
    EventKind,
    Fanout,
    PodIdentity,
    SessionRecord,
    StoreEvent,
    StoreStatistics,
    StoreUnavailable,
    check_offsets,
    check_ttl,
    hash_resume_token,
    token_matches,
)

__all__ = ["MemoryStore"]

#: How often ``run`` drops expired leases (lookups ignore them regardless).
EXPIRE_INTERVAL_S = 30.0


class MemoryStore:
    """A :class:`~podterm.store.base.SessionStore` in this process's memory.

    Args:
        clock: wall-clock seconds (``time.time``); inject a fake for TTL tests.
    """

    backend = "memory"

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._sessions: dict[str, SessionRecord] = {}
        self._agents: dict[PodIdentity, AgentLease] = {}
        self._fanout = Fanout()
        self._closed = False
        self._operations = 0
        self._published = 0

    def __repr__(self) -> str:
        return f"<MemoryStore sessions={len(self._sessions)} agents={len(self._agents)}>"

    # -- lifecycle ----------------------------------------------------------------

    @property
    def is_available(self) -> bool:
        return not self._closed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            task_status.started()
            while True:
                await trio.sleep(EXPIRE_INTERVAL_S)
                await self.expire()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        self._fanout.close()
        await trio.lowlevel.checkpoint()

    async def wait_available(self) -> None:
        await self._enter()

    async def health(self) -> bool:
        await trio.lowlevel.checkpoint()
        return not self._closed

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            backend=self.backend, available=not self._closed, operations=self._operations,
            subscribers=len(self._fanout), events_published=self._published,
            events_delivered=self._fanout.delivered, events_dropped=self._fanout.dropped)

    async def _enter(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StoreUnavailable("memory store is closed")
        self._operations += 1

    # -- sessions -----------------------------------------------------------------

    async def put_session(self, record: SessionRecord) -> SessionRecord:
        await self._enter()
        old = self._sessions.get(record.id)
        stored = dataclasses.replace(record, version=(old.version if old else 0) + 1,
                                     updated_at=self._clock())
        self._sessions[record.id] = stored
        return stored

    async def get_session(self, session_id: str) -> SessionRecord | None:
        await self._enter()
        return self._sessions.get(session_id)

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        await self._enter()
        records = [r for r in self._sessions.values() if owner is None or r.owner == owner]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def delete_session(self, session_id: str) -> bool:
        await self._enter()
        return self._sessions.pop(session_id, None) is not None

    async def cas_session(self, session_id: str, expected_version: int,
                          update: SessionRecord) -> bool:
        if update.id != session_id:
            raise ValueError(f"update.id {update.id!r} != session_id {session_id!r}")
        await self._enter()
        old = self._sessions.get(session_id)
        if old is None or old.version != expected_version:
            return False
        self._sessions[session_id] = dataclasses.replace(
            update, version=expected_version + 1, updated_at=self._clock())
        return True

    async def update_offsets(self, session_id: str, *, out_offset: int | None = None,
                             in_offset: int | None = None,
                             writer_acked: int | None = None) -> bool:
        check_offsets(out_offset=out_offset, in_offset=in_offset, writer_acked=writer_acked)
        await self._enter()
        old = self._sessions.get(session_id)
        if old is None:
            return False
        self._sessions[session_id] = dataclasses.replace(
            old,
            out_offset=max(old.out_offset, out_offset or 0),
            in_offset=max(old.in_offset, in_offset or 0),
            writer_acked=max(old.writer_acked, writer_acked or 0),
            updated_at=self._clock())
        return True

    async def save_context(self, session_id: str, cwd: str | None,
                           env: Mapping[str, str]) -> bool:
        await self._enter()
        old = self._sessions.get(session_id)
        if old is None:
            return False
        self._sessions[session_id] = dataclasses.replace(old, cwd=cwd, env=env,
                                                         updated_at=self._clock())
        return True

    async def verify_resume_token(self, session_id: str, token: str) -> bool:
        await self._enter()
        record = self._sessions.get(session_id)
        return record is not None and token_matches(record.resume_token_hash, token)

    async def rotate_resume_token(self, session_id: str, new_token: str, *,
                                  old_token: str | None = None) -> bool:
        new_hash = hash_resume_token(new_token)
        await self._enter()
        old = self._sessions.get(session_id)
        if old is None:
            return False
        if old_token is not None and not token_matches(old.resume_token_hash, old_token):
            return False
        self._sessions[session_id] = dataclasses.replace(
            old, resume_token_hash=new_hash, version=old.version + 1, updated_at=self._clock())
        return True

    # -- agents -------------------------------------------------------------------

    def _live(self, pod: PodIdentity) -> AgentLease | None:
        lease = self._agents.get(pod)
        if lease is not None and lease.expires_at <= self._clock():
            return None
        return lease

    async def register_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease:
        check_ttl(ttl_s)
        await self._enter()
        previous = self._live(lease.pod)
        stored = dataclasses.replace(lease, expires_at=self._clock() + ttl_s)
        self._agents[lease.pod] = stored
        if previous is None or previous.holder != stored.holder:
            self._published += 1
            self._fanout.deliver(StoreEvent(
                EventKind.AGENT_MOVED, str(stored.pod),
                {"holder": stored.holder, "agent_id": stored.agent_id}, origin=stored.holder))
        return stored

    async def renew_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease | None:
        check_ttl(ttl_s)
        await self._enter()
        current = self._live(lease.pod)
        if current is None or (current.agent_id, current.holder) != (lease.agent_id, lease.holder):
            return None
        stored = dataclasses.replace(current, expires_at=self._clock() + ttl_s)
        self._agents[lease.pod] = stored
        return stored

    async def release_agent(self, lease: AgentLease) -> bool:
        await self._enter()
        current = self._agents.get(lease.pod)
        if current is None or (current.agent_id, current.holder) != (lease.agent_id, lease.holder):
            return False
        del self._agents[lease.pod]
        return True

    async def lookup_agent(self, pod: PodIdentity) -> AgentLease | None:
        await self._enter()
        return self._live(pod)

    async def list_agents(self) -> list[AgentLease]:
        await self._enter()
        now = self._clock()
        return sorted((a for a in self._agents.values() if a.expires_at > now),
                      key=lambda a: str(a.pod))

    async def expire(self) -> int:
        await self._enter()
        now = self._clock()
        dead = [pod for pod, lease in self._agents.items() if lease.expires_at <= now]
        for pod in dead:
            del self._agents[pod]
        return len(dead)

    # -- notifications --------------------------------------------------------------

    async def publish(self, event: StoreEvent) -> None:
        if event.kind is EventKind.RESYNC:
            raise ValueError("RESYNC is local to a store and cannot be published")
        await self._enter()
        self._published += 1
        self._fanout.deliver(event)

    def subscribe(self, max_buffer: int = DEFAULT_SUBSCRIBER_BUFFER
                  ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[StoreEvent]]:
        return self._fanout.subscribe(max_buffer)
