"""Redis session store: many replicas share it (``redis://HOST[:PORT][/DB]``, ``rediss://`` for TLS).

The client is our own: RESP2 (:mod:`podterm.store._resp`) over a trio stream.
There is no maintained trio-native Redis client, and running redis-py in
threads costs a thread hop per call (measured on loopback, 2 vCPUs: PING
round trip p50 130 us with redis-py 8.1 in ``trio.to_thread`` vs 68 us here;
6,000 vs 39,000 calls/s from 64 concurrent tasks) and makes every call
uncancellable while its thread waits on a dead server.  One connection
carries every command of this process, pipelined: callers queue commands, one
writer task sends them coalesced, one reader task hands replies back in order.

Keys (all under ``prefix``, default ``podterm:``)
-------------------------------------------------

=============================  ======  ==============================================
key                            type    holds
=============================  ======  ==============================================
``{p}s:{id}``                  hash    one :class:`SessionRecord` (fields as below)
``{p}sessions``                set     every session id
``{p}owner:{owner}``           set     ids owned by ``owner``
``{p}agent:{ns}/{pod}``        hash    the pod's lease (agent_id, holder, expires_at), PEXPIRE'd
``{p}agents``                  zset    ``ns/pod`` scored by ``expires_at`` (list, expire)
``{p}epoch``                   string  random; changes only if Redis lost its data
``{p}events``                  pubsub  :class:`StoreEvent` as JSON
=============================  ======  ==============================================

Session hash fields: strings raw, ints in decimal, floats as ``repr``, ``tty``
0/1, ``command`` and ``env`` as JSON, an absent optional field is ``None``.
Writes that read first (put, CAS, offsets, token rotation, leases) are Lua
scripts, so each is atomic; scripts run by EVALSHA and fall back to EVAL on
``NOSCRIPT`` (a restarted Redis has an empty script cache).  Scripts touch
keys they compute, so this is for a single Redis (with Sentinel or a managed
failover in front), not Redis Cluster.

Leases expire twice: Redis deletes the key after ``ttl_s`` (``PEXPIRE``), and
every read treats a lease whose ``expires_at`` has passed by the store's clock
as gone.  With NTP-synced hosts the two agree within the clock skew; the
clock check is also what lets tests expire a lease with a fake clock.

When Redis goes away
--------------------
The reader sees the connection close (or a call sees no reply within
``op_timeout_s``): every call in flight and every later call raises
:class:`~podterm.store.base.StoreUnavailable` at once, without waiting for
Redis, while a background task reconnects with exponential backoff and full
jitter (``backoff_base_s`` .. ``backoff_cap_s``).  Once connected again (and
past Redis' ``LOADING`` phase) calls succeed, and subscribers get
:attr:`~podterm.store.base.EventKind.RESYNC` twice: ``reason="resubscribed"``
from the pub/sub connection (events published meanwhile are lost), and from
the command connection ``reason="reconnected"`` if the data survived
(AOF/RDB) or ``reason="data_lost"`` if ``{p}epoch`` changed, which means the
gateway must re-put the sessions it runs and re-register its agents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from podterm.resilience.backoff import Backoff

from ._resp import NEED_DATA, Arg, Reply, RespError, RespParser, RespProtocolError, encode_command
from .base import (
    DEFAULT_SUBSCRIBER_BUFFER,
    AgentLease,
    Clock,
    EventKind,
    Fanout,
    PodIdentity,
    SessionRecord,
    StoreError,
    StoreEvent,
    StoreStatistics,
    StoreUnavailable,
    check_offsets,
    check_ttl,
    hash_resume_token,
    token_matches,
)

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

#: Error replies that mean "not now" rather than "never": Redis is loading its
#: data after a restart, a script is running too long, a failover is under way.
_TRANSIENT_ERRORS = frozenset({"LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN",
                               "CLUSTERDOWN", "NOREPLICAS"})

#: Ids fetched per SSCAN step and records per pipelined HGETALL batch.  500
#: keeps each reply a few hundred KiB at most.
_BATCH = 500

#: How often a token rotation retries when another write bumped the version
#: between its read and its write (each retry re-reads and re-verifies).
_ROTATE_RETRIES = 8


def _describe(exc: BaseException) -> str:
    """``exc`` as text, with its cause when it says more (trio wraps TLS errors)."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause):
        text += f" ({type(cause).__name__}: {cause})"
    return text


class _ConnectionLost(Exception):
    """Internal: the connection died with this call in flight."""


class _Batch:
    """Replies awaited by one caller: ``expected`` of them, in order."""

    __slots__ = ("error", "event", "expected", "replies")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.replies: list[Reply] = []
        self.error: str | None = None
        self.event = trio.Event()


#: Most command bytes queued for the writer task.  Beyond it calls fail with
#: StoreUnavailable instead of queueing more (a Redis that stopped reading
#: must not grow our memory); 4 MiB is thousands of calls at our sizes.
_MAX_OUTBOX_BYTES = 4 << 20


class _Connection:
    """One RESP connection: pipelined commands, replies matched in order.

    Callers append their encoded commands to one outbox, and their reply slot
    to a FIFO, in the same synchronous step, so replies (which Redis sends in
    command order) match slots by position.  One writer task sends the outbox,
    so every command issued while a send was in flight goes out in the next
    single ``send_all`` (writes coalesced), and a caller cancelled after
    queueing cannot leave half a command on the wire.  One reader task hands
    replies back.

    Resource handling: :meth:`reader` and :meth:`writer` must run (in the
    owner's nursery).  :meth:`kill` fails everything in flight, wakes
    :meth:`wait_dead` and calls ``on_dead`` at once; the owner then closes the
    stream.
    """

    __slots__ = ("_dead", "_on_dead", "_outbox", "_pending", "_stream", "_writer_lot", "reason")

    def __init__(self, stream: trio.abc.Stream, on_dead: Callable[[_Connection], None]) -> None:
        self._stream = stream
        self._on_dead = on_dead
        self._pending: deque[_Batch] = deque()
        self._outbox = bytearray()
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._dead = trio.Event()
        self.reason: str | None = None

    @property
    def is_dead(self) -> bool:
        return self._dead.is_set()

    @property
    def in_flight(self) -> int:
        return sum(batch.expected - len(batch.replies) for batch in self._pending)

    def kill(self, reason: str) -> None:
        """Mark dead (first reason wins) and fail every call in flight."""
        if self._dead.is_set():
            return
        self.reason = reason
        for batch in self._pending:
            batch.error = reason
            batch.event.set()
        self._pending.clear()
        self._outbox.clear()
        self._dead.set()
        self._writer_lot.unpark_all()
        self._on_dead(self)  # synchronously: the store reports "down" from this moment

    async def wait_dead(self) -> None:
        await self._dead.wait()

    async def reader(self, parser: RespParser) -> None:
        """Read replies and hand each to the oldest waiting call, until the connection dies."""
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    self.kill("redis closed the connection")
                    return
                parser.feed(data)
                while (reply := parser.next_reply()) is not NEED_DATA:
                    if not self._pending:
                        self.kill("redis sent a reply nobody asked for")
                        return
                    batch = self._pending[0]
                    batch.replies.append(reply)  # type: ignore[arg-type]
                    if len(batch.replies) == batch.expected:
                        self._pending.popleft()
                        batch.event.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.kill(f"connection lost: {_describe(exc)}")
        except RespProtocolError as exc:
            self.kill(f"protocol error: {exc}")

    async def writer(self) -> None:
        """Send whatever the outbox holds, one ``send_all`` per batch of callers."""
        try:
            while not self._dead.is_set():
                if not self._outbox:
                    await self._writer_lot.park()
                    continue
                data = bytes(self._outbox)
                self._outbox.clear()
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.kill(f"send failed: {_describe(exc)}")

    async def execute(self, payload: bytes, count: int) -> list[Reply]:
        """Queue ``count`` encoded commands (``payload``) and return their replies.

        Raises:
            _ConnectionLost: the connection died before every reply arrived, or
                the outbox is full.
        """
        if self._dead.is_set():
            raise _ConnectionLost(self.reason)
        if len(self._outbox) + len(payload) > _MAX_OUTBOX_BYTES:
            raise _ConnectionLost(f"{len(self._outbox)} bytes of commands already waiting "
                                  "to be sent")
        batch = _Batch(count)
        # Slot and bytes queued together, without a checkpoint between them.
        self._pending.append(batch)
        self._outbox += payload
        self._writer_lot.unpark()
        await batch.event.wait()
        if batch.error is not None:
            raise _ConnectionLost(batch.error)
        return batch.replies

    async def aclose(self) -> None:
        self.kill("closed")
        await trio.aclose_forcefully(self._stream)


class _Script:
    """A Lua script, run with EVALSHA and re-sent with EVAL when Redis forgot it."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()


# KEYS[1] session hash, KEYS[2] id set.  ARGV[1] id, ARGV[2] owner-set prefix,
# ARGV[3] expected version ('' = unconditional), ARGV[4] owner, ARGV[5..] fields.
_PUT = _Script("""
local cur = redis.call('HGET', KEYS[1], 'version')
if ARGV[3] ~= '' and cur ~= ARGV[3] then return 0 end
local v = 1
if cur then v = tonumber(cur) + 1 end
local old_owner = redis.call('HGET', KEYS[1], 'owner')
if old_owner and old_owner ~= ARGV[4] then redis.call('SREM', ARGV[2] .. old_owner, ARGV[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', v, unpack(ARGV, 5))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', ARGV[2] .. ARGV[4], ARGV[1])
return v
""")

# KEYS[1] session hash, KEYS[2] id set.  ARGV[1] id, ARGV[2] owner-set prefix.
_DELETE = _Script("""
redis.call('SREM', KEYS[2], ARGV[1])
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
redis.call('SREM', ARGV[2] .. owner, ARGV[1])
redis.call('DEL', KEYS[1])
return 1
""")

# KEYS[1] session hash.  ARGV[1..3] out, in, acked ('' = leave), ARGV[4] updated_at.
_OFFSETS = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local names = {'out_offset', 'in_offset', 'writer_acked'}
for i = 1, 3 do
  if ARGV[i] ~= '' then
    local cur = tonumber(redis.call('HGET', KEYS[1], names[i]) or '0')
    if tonumber(ARGV[i]) > cur then redis.call('HSET', KEYS[1], names[i], ARGV[i]) end
  end
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
return 1
""")

# KEYS[1] session hash.  ARGV[1] '1' if cwd is set, ARGV[2] cwd, ARGV[3] env JSON,
# ARGV[4] updated_at.
_CONTEXT = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'cwd', ARGV[2])
else
  redis.call('HDEL', KEYS[1], 'cwd')
end
redis.call('HSET', KEYS[1], 'env', ARGV[3], 'updated_at', ARGV[4])
return 1
""")

# KEYS[1] session hash.  ARGV[1] expected version ('' = any), ARGV[2] new hash,
# ARGV[3] updated_at.  1 = rotated, 0 = no session, -1 = version moved on.
_ROTATE = _Script("""
local cur = redis.call('HGET', KEYS[1], 'version')
if not cur then return 0 end
if ARGV[1] ~= '' and cur ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'token_hash', ARGV[2], 'version', tonumber(cur) + 1,
           'updated_at', ARGV[3])
return 1
""")

# KEYS[1] lease hash, KEYS[2] lease zset.  ARGV: agent_id, holder, expires_at,
# ttl ms, member, now, channel, event JSON.  Publishes when the holder changed.
_REGISTER = _Script("""
local prev = redis.call('HMGET', KEYS[1], 'holder', 'expires_at')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'agent_id', ARGV[1], 'holder', ARGV[2], 'expires_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
if (not prev[1]) or prev[1] ~= ARGV[2] or tonumber(prev[2]) <= tonumber(ARGV[6]) then
  redis.call('PUBLISH', ARGV[7], ARGV[8])
  return 1
end
return 0
""")

# KEYS[1] lease hash, KEYS[2] lease zset.  ARGV: agent_id, holder, now,
# new expires_at, ttl ms, member.
_RENEW = _Script("""
local cur = redis.call('HMGET', KEYS[1], 'agent_id', 'holder', 'expires_at')
if (not cur[1]) or cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2]
   or tonumber(cur[3]) <= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'expires_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
return 1
""")

# KEYS[1] lease hash, KEYS[2] lease zset.  ARGV: agent_id, holder, member.
_RELEASE = _Script("""
local cur = redis.call('HMGET', KEYS[1], 'agent_id', 'holder')
if (not cur[1]) or cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
""")

# KEYS[1] lease zset.  ARGV[1] now, ARGV[2] lease key prefix.  Reclaims up to
# 1,000 expired leases per call (bounded script time).
_EXPIRE = _Script("""
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local n = 0
for _, m in ipairs(members) do
  local key = ARGV[2] .. m
  local exp = redis.call('HGET', key, 'expires_at')
  if (not exp) or tonumber(exp) <= tonumber(ARGV[1]) then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], m)
    n = n + 1
  end
end
return n
""")


def _fields(record: SessionRecord) -> list[Arg]:
    """The record as hash field/value pairs (without ``version``: the script sets it)."""
    pairs: list[Arg] = [
        "id", record.id, "owner", record.owner, "upstream_kind", record.upstream_kind,
        "tty", int(record.tty), "cols", record.cols, "rows", record.rows, "state", record.state,
        "created_at", repr(float(record.created_at)), "updated_at", repr(float(record.updated_at)),
        "token_hash", record.resume_token_hash, "out_offset", record.out_offset,
        "in_offset", record.in_offset, "writer_acked", record.writer_acked,
        "env", json.dumps(dict(record.env), sort_keys=True), "holder", record.holder,
    ]
    for name in ("namespace", "pod", "container", "cwd"):
        value = getattr(record, name)
        if value is not None:
            pairs += [name, value]
    if record.command is not None:
        pairs += ["command", json.dumps(record.command)]
    return pairs


def _record(flat: Sequence[Reply]) -> SessionRecord:
    if len(flat) % 2:
        raise StoreError("redis: odd HGETALL reply")
    h: dict[str, str] = {}
    for i in range(0, len(flat), 2):
        key, value = flat[i], flat[i + 1]
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise StoreError("redis: HGETALL reply is not bulk strings")
        h[key.decode()] = value.decode("utf-8", "surrogateescape")
    try:
        command = h.get("command")
        return SessionRecord(
            id=h["id"], owner=h["owner"], upstream_kind=h["upstream_kind"],
            namespace=h.get("namespace"), pod=h.get("pod"), container=h.get("container"),
            command=None if command is None else tuple(json.loads(command)),
            tty=h["tty"] == "1", cols=int(h["cols"]), rows=int(h["rows"]), state=h["state"],
            created_at=float(h["created_at"]), updated_at=float(h["updated_at"]),
            resume_token_hash=h["token_hash"], out_offset=int(h["out_offset"]),
            in_offset=int(h["in_offset"]), writer_acked=int(h["writer_acked"]),
            cwd=h.get("cwd"), env=json.loads(h["env"]), holder=h["holder"],
            version=int(h["version"]))
    except (KeyError, ValueError) as exc:
        raise StoreError(f"redis: malformed session hash {h.get('id')!r}: {exc!r}") from exc


def _int(reply: Reply) -> int:
    if not isinstance(reply, int):
        raise StoreError(f"redis: expected an integer reply, got {reply!r:.80}")
    return reply


class RedisStore:
    """A :class:`~podterm.store.base.SessionStore` in Redis, shared by many replicas.

    Args:
        host, port, db: where (``SELECT db`` after connecting).
        username, password: ``AUTH`` (Redis 6 ACL user, or password only).
        ssl_context: TLS (``rediss://``); ``None`` = plain TCP.
        prefix: prepended to every key and the channel, so several podterm
            deployments (or tests) can share one Redis.
        clock: wall-clock seconds for lease expiry; inject a fake in tests.
        rng: ``[0, 1]`` floats for backoff jitter.
        connect_timeout_s: bound on connect + AUTH + SELECT + PING (2 s).
        op_timeout_s: a call without a reply this long raises
            :class:`StoreUnavailable` and the connection is dropped (2 s: a
            healthy Redis answers in well under a millisecond on a LAN; a
            stalled one must not stall session creation).
        backoff_base_s, backoff_cap_s: reconnect delays (full jitter).  A 2 s
            cap: once Redis is back, peers find it within ~2 s.
        keepalive_s: PING interval on idle connections (5 s), which also
            notices a silently dead Redis without any traffic.
        expire_interval_s: how often ``run`` reclaims expired leases.
    """

    backend = "redis"

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, *, db: int = 0,
                 username: str | None = None, password: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, prefix: str = "podterm:",
                 clock: Clock = time.time, rng: Callable[[], float] = random.random,
                 connect_timeout_s: float = 2.0, op_timeout_s: float = 2.0,
                 backoff_base_s: float = 0.1, backoff_cap_s: float = 2.0,
                 keepalive_s: float = 5.0, expire_interval_s: float = 30.0) -> None:
        for name, value in (("connect_timeout_s", connect_timeout_s),
                            ("op_timeout_s", op_timeout_s), ("keepalive_s", keepalive_s),
                            ("expire_interval_s", expire_interval_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.host = host
        self.port = port
        self.db = db
        self._username = username
        self._password = password
        self._ssl_context = ssl_context
        self.prefix = prefix
        self._clock = clock
        self._rng = rng
        self._connect_timeout_s = connect_timeout_s
        self._op_timeout_s = op_timeout_s
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._keepalive_s = keepalive_s
        self._expire_interval_s = expire_interval_s
        self._channel = f"{prefix}events"
        self._conn: _Connection | None = None
        self._up = trio.Event()
        self._closed = False
        self._closed_event = trio.Event()
        self._epoch: bytes | None = None
        self._subscribed_before = False
        self._fanout = Fanout()
        self._operations = 0
        self._failures = 0
        self._reconnects = 0
        self._published = 0
        self._last_error: str | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("up" if self.is_available else "down")
        scheme = "rediss" if self._ssl_context else "redis"
        return (f"<RedisStore {scheme}://{self.host}:{self.port}/{self.db} prefix={self.prefix!r}"
                f" {state} ops={self._operations} reconnects={self._reconnects}>")

    @property
    def _where(self) -> str:
        return f"redis at {self.host}:{self.port}"

    def _key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    # -- connection management ----------------------------------------------------------

    async def _open_stream(self) -> trio.abc.Stream:
        if self._ssl_context is None:
            return await trio.open_tcp_stream(self.host, self.port)
        stream = await trio.open_ssl_over_tcp_stream(self.host, self.port,
                                                     ssl_context=self._ssl_context)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _handshake(self, conn: _Connection) -> str | None:
        """AUTH, SELECT, the epoch check and PING, pipelined; raises on any error reply.

        Returns:
            ``None`` on the first connection; on a reconnection the RESYNC
            reason: ``"data_lost"`` if the epoch changed, else ``"reconnected"``.
        """
        commands: list[Sequence[Arg]] = []
        if self._password is not None:
            commands.append(("AUTH", self._username, self._password) if self._username
                            else ("AUTH", self._password))
        commands.append(("SELECT", self.db))
        # The epoch is written once per data set: if Redis restarts without its
        # data, SET NX writes a new one and GET shows that it changed.
        commands.append(("SET", self._key("epoch"), secrets.token_hex(8), "NX"))
        commands.append(("GET", self._key("epoch")))
        commands.append(("PING",))
        replies = await conn.execute(b"".join(encode_command(c) for c in commands),
                                     len(commands))
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, RespError):
                raise _HandshakeFailed(f"{command[0]!s} failed: {reply.message}")
        epoch = replies[-2]
        if not isinstance(epoch, bytes):
            raise _HandshakeFailed(f"unexpected epoch reply {epoch!r:.40}")
        previous, self._epoch = self._epoch, epoch
        if previous is None:
            return None
        if epoch != previous:
            log.warning("store.redis.data_lost: %s came back without its data; sessions and "
                        "agents must be re-put", self._where)
            return "data_lost"
        return "reconnected"

    async def _wait_or_closed(self, delay: float) -> None:
        with trio.move_on_after(delay):
            await self._closed_event.wait()

    async def _maintain(self, *, subscribe: bool,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one connection (the command one, or the pub/sub one) up until closed.

        ``started()`` after the first attempt, whether it connected or not.
        """
        started = False
        backoff = Backoff(self._backoff_base_s, max(self._backoff_base_s, self._backoff_cap_s),
                          rng=self._rng)
        while not self._closed:
            stream = await self._try_open()
            if stream is not None:
                conn = _Connection(stream,
                                   self._note_pubsub_down if subscribe else self._set_down)
                try:
                    async with trio.open_nursery() as nursery:
                        if await self._bring_up(conn, stream, nursery, subscribe=subscribe):
                            backoff.reset()
                            if not started:
                                started = True
                                task_status.started()
                            await conn.wait_dead()
                        nursery.cancel_scope.cancel()
                finally:
                    # Also on cancellation: no socket outlives its loop.  Detach it
                    # first, so closing it is not reported as a failure.
                    if self._conn is conn:
                        self._conn = None
                        self._up = trio.Event()
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
            if not started:
                started = True
                task_status.started()
            await self._wait_or_closed(next(backoff))

    async def _try_open(self) -> trio.abc.Stream | None:
        try:
            with trio.fail_after(self._connect_timeout_s):
                return await self._open_stream()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            self._note_error(f"connect to {self.host}:{self.port} failed: {_describe(exc)}")
            return None

    async def _bring_up(self, conn: _Connection, stream: trio.abc.Stream,
                        nursery: trio.Nursery, *, subscribe: bool) -> bool:
        """Start the connection's tasks and handshake; on success announce it and return True."""
        pubsub = _PubSub(conn, stream, self) if subscribe else None
        if pubsub is not None:
            nursery.start_soon(pubsub.reader)
        else:
            nursery.start_soon(conn.reader, RespParser())
            nursery.start_soon(conn.writer)
        resync: str | None = None
        try:
            with trio.fail_after(self._connect_timeout_s):
                if pubsub is not None:
                    await pubsub.handshake()
                else:
                    resync = await self._handshake(conn)
        except (trio.TooSlowError, _ConnectionLost, _HandshakeFailed) as exc:
            conn.kill(str(exc) or "handshake timed out")
            self._note_error(f"{self._where}: {conn.reason}")
            return False
        if pubsub is not None:
            nursery.start_soon(pubsub.keepalive)
            if self._subscribed_before:
                # Messages published while we were away are lost.
                self._fanout.deliver(StoreEvent(EventKind.RESYNC,
                                                data={"reason": "resubscribed"}))
            self._subscribed_before = True
            return True
        self._conn = conn
        self._up.set()
        nursery.start_soon(self._keepalive, conn)
        if resync is not None:
            self._reconnects += 1
            log.info("store.redis.reconnect.complete: %s (%s)", self._where, resync)
            # After _conn is set: a subscriber reacting to it can call us.
            self._fanout.deliver(StoreEvent(EventKind.RESYNC, data={"reason": resync}))
        return True

    def _set_down(self, conn: _Connection) -> None:
        """The command connection died (called from its kill(), so at once)."""
        if self._conn is conn:
            self._conn = None
            self._up = trio.Event()
            if not self._closed:
                self._note_error(f"{self._where}: {conn.reason}")
                log.warning("store.redis.connection.failed: %s: %s; reconnecting",
                            self._where, conn.reason)

    def _note_pubsub_down(self, conn: _Connection) -> None:
        if not self._closed:
            self._note_error(f"{self._where}: {conn.reason}")

    def _note_error(self, text: str) -> None:
        self._last_error = text

    async def _keepalive(self, conn: _Connection) -> None:
        while not conn.is_dead:
            await trio.sleep(self._keepalive_s)
            try:
                await self._call([("PING",)])
            except StoreError:
                pass  # _call killed the connection if it stalled; _maintain reconnects

    # -- lifecycle --------------------------------------------------------------------

    @property
    def is_available(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.is_dead and not self._closed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self._where}: store is closed")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._maintain_commands)
                await nursery.start(self._maintain_pubsub)
                nursery.start_soon(self._expire_loop)
                task_status.started()
                await self._closed_event.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(1, shield=True):
                await self.aclose()

    async def _maintain_commands(self, *, task_status: trio.TaskStatus[None]
                                 = trio.TASK_STATUS_IGNORED) -> None:
        await self._maintain(subscribe=False, task_status=task_status)

    async def _maintain_pubsub(self, *, task_status: trio.TaskStatus[None]
                               = trio.TASK_STATUS_IGNORED) -> None:
        await self._maintain(subscribe=True, task_status=task_status)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(self._expire_interval_s)
            try:
                await self.expire()
            except StoreError:
                pass  # counted in failures; the next round tries again

    async def aclose(self) -> None:
        self._closed = True
        self._closed_event.set()
        self._fanout.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()
        else:
            await trio.lowlevel.checkpoint()

    async def wait_available(self) -> None:
        while not self.is_available:
            if self._closed:
                raise StoreUnavailable(f"{self._where}: store is closed")
            # _up is replaced the moment a connection dies (_set_down), so a set
            # one here belongs to a store that has since been closed.
            await self._up.wait()

    async def health(self) -> bool:
        try:
            replies = await self._call([("PING",)])
        except StoreError:
            return False
        return replies[0] == "PONG"

    def statistics(self) -> StoreStatistics:
        conn = self._conn
        return StoreStatistics(
            backend=self.backend, available=self.is_available, operations=self._operations,
            failures=self._failures, reconnects=self._reconnects,
            in_flight=conn.in_flight if conn is not None else 0, subscribers=len(self._fanout),
            events_published=self._published, events_delivered=self._fanout.delivered,
            events_dropped=self._fanout.dropped, last_error=self._last_error)

    # -- calls --------------------------------------------------------------------------

    async def _call(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Send ``commands`` pipelined and return their replies (error replies included).

        Raises:
            StoreUnavailable: not connected (at once), the connection died, or
                no reply within ``op_timeout_s`` (then the connection is dropped).
        """
        conn = self._conn
        if conn is None or conn.is_dead:
            self._failures += 1
            state = "closed" if self._closed else "unavailable, reconnecting"
            raise StoreUnavailable(f"session store {self._where} is {state}"
                                   + (f" ({self._last_error})" if self._last_error else ""))
        payload = b"".join(encode_command(c) for c in commands)
        try:
            with trio.fail_after(self._op_timeout_s):
                replies = await conn.execute(payload, len(commands))
        except trio.TooSlowError:
            conn.kill(f"no reply within {self._op_timeout_s} s")
            self._failures += 1
            raise StoreUnavailable(f"session store {self._where} did not answer within "
                                   f"{self._op_timeout_s} s; reconnecting") from None
        except _ConnectionLost as exc:
            self._failures += 1
            raise StoreUnavailable(f"session store {self._where}: {exc}; reconnecting") from None
        self._operations += 1
        return replies

    def _check(self, reply: Reply) -> Reply:
        """Raise for an error reply (transient kinds as :class:`StoreUnavailable`)."""
        if isinstance(reply, RespError):
            self._failures += 1
            if reply.kind in _TRANSIENT_ERRORS:
                raise StoreUnavailable(f"session store {self._where}: {reply.message}")
            raise StoreError(f"session store {self._where}: {reply.message}")
        return reply

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        reply = (await self._call([("EVALSHA", script.sha, len(keys), *keys, *args)]))[0]
        if isinstance(reply, RespError) and reply.kind == "NOSCRIPT":
            # A restarted (or flushed) Redis forgot the script: send its text once.
            reply = (await self._call([("EVAL", script.text, len(keys), *keys, *args)]))[0]
        return self._check(reply)

    # -- sessions -----------------------------------------------------------------------

    def _session_key(self, session_id: str) -> str:
        return self._key("s:", session_id)

    async def _put(self, record: SessionRecord, expected: str) -> int:
        return _int(await self._eval(
            _PUT, [self._session_key(record.id), self._key("sessions")],
            [record.id, self._key("owner:"), expected, record.owner, *_fields(record)]))

    async def put_session(self, record: SessionRecord) -> SessionRecord:
        stored = dataclasses.replace(record, updated_at=self._clock())
        version = await self._put(stored, "")
        return dataclasses.replace(stored, version=version)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        reply = self._check((await self._call([("HGETALL", self._session_key(session_id))]))[0])
        if not isinstance(reply, list):
            raise StoreError(f"redis: HGETALL returned {reply!r:.80}")
        return _record(reply) if reply else None

    async def list_sessions(self, owner: str | None = None) -> list[SessionRecord]:
        index = self._key("sessions") if owner is None else self._key("owner:", owner)
        ids: list[str] = []
        cursor = b"0"
        while True:
            reply = self._check((await self._call(
                [("SSCAN", index, cursor, "COUNT", _BATCH)]))[0])
            if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], bytes)
                    and isinstance(reply[1], list)):
                raise StoreError(f"redis: SSCAN returned {reply!r:.80}")
            cursor = reply[0]
            ids.extend(m.decode() for m in reply[1] if isinstance(m, bytes))
            if cursor == b"0":
                break
        records: list[SessionRecord] = []
        for start in range(0, len(ids), _BATCH):
            chunk = sorted(set(ids[start:start + _BATCH]))
            replies = await self._call([("HGETALL", self._session_key(i)) for i in chunk])
            for reply in replies:
                reply = self._check(reply)
                if isinstance(reply, list) and reply:  # empty: deleted meanwhile
                    records.append(_record(reply))
        # SSCAN may return an id twice; keep one.
        unique = {r.id: r for r in records}
        return sorted(unique.values(), key=lambda r: (r.created_at, r.id))

    async def delete_session(self, session_id: str) -> bool:
        return _int(await self._eval(
            _DELETE, [self._session_key(session_id), self._key("sessions")],
            [session_id, self._key("owner:")])) == 1

    async def cas_session(self, session_id: str, expected_version: int,
                          update: SessionRecord) -> bool:
        if update.id != session_id:
            raise ValueError(f"update.id {update.id!r} != session_id {session_id!r}")
        stored = dataclasses.replace(update, updated_at=self._clock())
        return await self._put(stored, str(expected_version)) != 0

    async def update_offsets(self, session_id: str, *, out_offset: int | None = None,
                             in_offset: int | None = None,
                             writer_acked: int | None = None) -> bool:
        check_offsets(out_offset=out_offset, in_offset=in_offset, writer_acked=writer_acked)
        args: list[Arg] = ["" if v is None else v for v in (out_offset, in_offset, writer_acked)]
        return _int(await self._eval(_OFFSETS, [self._session_key(session_id)],
                                     [*args, repr(float(self._clock()))])) == 1

    async def save_context(self, session_id: str, cwd: str | None,
                           env: Mapping[str, str]) -> bool:
        env_json = json.dumps(dict(env), sort_keys=True)
        return _int(await self._eval(
            _CONTEXT, [self._session_key(session_id)],
            ["0" if cwd is None else "1", cwd or "", env_json, repr(float(self._clock()))])) == 1

    async def _token_state(self, session_id: str) -> tuple[str, str] | None:
        reply = self._check((await self._call(
            [("HMGET", self._session_key(session_id), "token_hash", "version")]))[0])
        if not isinstance(reply, list) or len(reply) != 2:
            raise StoreError(f"redis: HMGET returned {reply!r:.80}")
        token_hash, version = reply
        if not isinstance(token_hash, bytes) or not isinstance(version, bytes):
            return None
        return token_hash.decode("ascii", "replace"), version.decode("ascii", "replace")

    async def verify_resume_token(self, session_id: str, token: str) -> bool:
        state = await self._token_state(session_id)
        # The comparison happens here, in constant time, not in a Lua string compare.
        return state is not None and token_matches(state[0], token)

    async def rotate_resume_token(self, session_id: str, new_token: str, *,
                                  old_token: str | None = None) -> bool:
        new_hash = hash_resume_token(new_token)
        for _ in range(_ROTATE_RETRIES):
            expected = ""
            if old_token is not None:
                state = await self._token_state(session_id)
                if state is None or not token_matches(state[0], old_token):
                    return False
                expected = state[1]
            result = _int(await self._eval(_ROTATE, [self._session_key(session_id)],
                                           [expected, new_hash, repr(float(self._clock()))]))
            if result != -1:
                return result == 1
            # Another write bumped the version between our read and our write: re-verify.
        raise StoreUnavailable(f"session store {self._where}: resume token of {session_id} kept "
                               f"changing during rotation ({_ROTATE_RETRIES} attempts)")

    # -- agents -----------------------------------------------------------------------

    def _lease_keys(self, pod: PodIdentity) -> list[str]:
        return [self._key("agent:", str(pod)), self._key("agents")]

    async def register_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease:
        check_ttl(ttl_s)
        now = self._clock()
        stored = dataclasses.replace(lease, expires_at=now + ttl_s)
        moved = StoreEvent(EventKind.AGENT_MOVED, str(lease.pod),
                           {"holder": lease.holder, "agent_id": lease.agent_id},
                           origin=lease.holder)
        published = _int(await self._eval(
            _REGISTER, self._lease_keys(lease.pod),
            [lease.agent_id, lease.holder, repr(stored.expires_at), max(1, round(ttl_s * 1000)),
             str(lease.pod), repr(float(now)), self._channel,
             json.dumps(moved.to_json_obj(), sort_keys=True)]))
        self._published += published
        return stored

    async def renew_agent(self, lease: AgentLease, ttl_s: float) -> AgentLease | None:
        check_ttl(ttl_s)
        now = self._clock()
        stored = dataclasses.replace(lease, expires_at=now + ttl_s)
        renewed = _int(await self._eval(
            _RENEW, self._lease_keys(lease.pod),
            [lease.agent_id, lease.holder, repr(float(now)), repr(stored.expires_at),
             max(1, round(ttl_s * 1000)), str(lease.pod)]))
        return stored if renewed == 1 else None

    async def release_agent(self, lease: AgentLease) -> bool:
        return _int(await self._eval(_RELEASE, self._lease_keys(lease.pod),
                                     [lease.agent_id, lease.holder, str(lease.pod)])) == 1

    def _lease(self, pod: PodIdentity, reply: Reply, now: float) -> AgentLease | None:
        reply = self._check(reply)
        if not isinstance(reply, list) or len(reply) != 3:
            raise StoreError(f"redis: HMGET returned {reply!r:.80}")
        agent_id, holder, expires_at = reply
        if not (isinstance(agent_id, bytes) and isinstance(holder, bytes)
                and isinstance(expires_at, bytes)):
            return None
        expires = float(expires_at)
        if expires <= now:
            return None
        return AgentLease(agent_id.decode(), pod, holder.decode(), expires)

    async def lookup_agent(self, pod: PodIdentity) -> AgentLease | None:
        now = self._clock()
        reply = (await self._call(
            [("HMGET", self._key("agent:", str(pod)), "agent_id", "holder", "expires_at")]))[0]
        return self._lease(pod, reply, now)

    async def list_agents(self) -> list[AgentLease]:
        now = self._clock()
        reply = self._check((await self._call(
            [("ZRANGEBYSCORE", self._key("agents"), f"({now!r}", "+inf")]))[0])
        if not isinstance(reply, list):
            raise StoreError(f"redis: ZRANGEBYSCORE returned {reply!r:.80}")
        pods = [PodIdentity.parse(m.decode()) for m in reply if isinstance(m, bytes)]
        leases: list[AgentLease] = []
        for start in range(0, len(pods), _BATCH):
            chunk = pods[start:start + _BATCH]
            replies = await self._call([("HMGET", self._key("agent:", str(p)), "agent_id",
                                         "holder", "expires_at") for p in chunk])
            for pod, item in zip(chunk, replies, strict=True):
                lease = self._lease(pod, item, now)
                if lease is not None:
                    leases.append(lease)
        return sorted(leases, key=lambda a: str(a.pod))

    async def expire(self) -> int:
        return _int(await self._eval(_EXPIRE, [self._key("agents")],
                                     [repr(float(self._clock())), self._key("agent:")]))

    # -- notifications ----------------------------------------------------------------

    async def publish(self, event: StoreEvent) -> None:
        if event.kind is EventKind.RESYNC:
            raise ValueError("RESYNC is local to a store and cannot be published")
        body = json.dumps(event.to_json_obj(), sort_keys=True)
        self._check((await self._call([("PUBLISH", self._channel, body)]))[0])
        self._published += 1

    def subscribe(self, max_buffer: int = DEFAULT_SUBSCRIBER_BUFFER
                  ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[StoreEvent]]:
        return self._subscribe(max_buffer)

    @asynccontextmanager
    async def _subscribe(self, max_buffer: int
                         ) -> AsyncIterator[trio.MemoryReceiveChannel[StoreEvent]]:
        async with self._fanout.subscribe(max_buffer) as events:
            yield events

    def _deliver_message(self, body: bytes) -> None:
        try:
            event = StoreEvent.from_json_obj(json.loads(body))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("store.event.invalid: %s", exc)
            return
        self._fanout.deliver(event)


class _HandshakeFailed(Exception):
    """Internal: an error reply during AUTH/SELECT/PING/SUBSCRIBE."""


class _PubSub:
    """The subscriber side: one connection in SUBSCRIBE mode, feeding the store's fanout.

    In subscribe mode Redis pushes ``["message", channel, body]`` at any time,
    so replies are not matched to calls; only the SUBSCRIBE confirmation and
    the keepalive PONG are awaited.
    """

    __slots__ = ("_conn", "_parser", "_pong", "_store", "_stream", "_subscribed")

    def __init__(self, conn: _Connection, stream: trio.abc.Stream, store: RedisStore) -> None:
        self._conn = conn
        self._stream = stream
        self._store = store
        self._parser = RespParser()
        self._subscribed = trio.Event()
        self._pong = trio.Event()

    async def _send(self, *args: Arg) -> None:
        with trio.move_on_after(self._store._op_timeout_s, shield=True) as scope:
            try:
                await self._stream.send_all(encode_command(args))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._conn.kill(f"pubsub send failed: {_describe(exc)}")
        if scope.cancelled_caught:
            self._conn.kill("pubsub send timed out")
        if self._conn.is_dead:
            raise _ConnectionLost(self._conn.reason)

    async def handshake(self) -> None:
        store = self._store
        if store._password is not None:
            # AUTH's reply arrives before subscribe mode; the reader treats it as a
            # non-message reply and checks it.
            if store._username:
                await self._send("AUTH", store._username, store._password)
            else:
                await self._send("AUTH", store._password)
        await self._send("SUBSCRIBE", store._channel)
        await self._subscribed.wait()
        if self._conn.is_dead:
            raise _ConnectionLost(self._conn.reason)

    async def keepalive(self) -> None:
        """PING every ``keepalive_s``; no PONG within ``op_timeout_s`` = dead connection."""
        store = self._store
        while not self._conn.is_dead:
            await trio.sleep(store._keepalive_s)
            self._pong = trio.Event()
            try:
                await self._send("PING")
            except _ConnectionLost:
                return
            with trio.move_on_after(store._op_timeout_s):
                await self._pong.wait()
                continue
            self._conn.kill(f"no PONG within {store._op_timeout_s} s on the pubsub connection")

    async def reader(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    self._conn.kill("redis closed the pubsub connection")
                    break
                self._parser.feed(data)
                while (reply := self._parser.next_reply()) is not NEED_DATA:
                    self._handle(reply)  # type: ignore[arg-type]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._conn.kill(f"pubsub connection lost: {_describe(exc)}")
        except (RespProtocolError, _HandshakeFailed) as exc:
            self._conn.kill(str(exc))
        self._subscribed.set()  # wake a handshake waiting on a dead connection

    def _handle(self, reply: Reply) -> None:
        if isinstance(reply, RespError):
            what = "error" if self._subscribed.is_set() else "AUTH failed"
            raise _HandshakeFailed(f"pubsub {what}: {reply.message}")
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
            return  # +OK for AUTH
        kind = reply[0]
        if kind == b"message" and len(reply) == 3 and isinstance(reply[2], bytes):
            self._store._deliver_message(reply[2])
        elif kind == b"subscribe":
            self._subscribed.set()
        elif kind == b"pong":
            self._pong.set()
