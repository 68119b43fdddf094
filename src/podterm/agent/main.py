"""``podterm agent``: the sidecar that runs shells in its pod for the gateway.

The task tree::

    Agent.run                               streams nursery (lives as long as the agent)
    ├── ProcessStream.run × N               one per shell: output pump, input pump, supervisor
    └── Dialer.run                          reconnect loop (backoff + circuit breaker)
        └── Agent.serve_connection          one tunnel connection at a time
            ├── _receive_loop               decode, account, apply (never blocks)
            └── _send_loop                  output within credit, EXIT, ACKs, CLOSE, PINGs

Shells belong to the streams nursery, not to a connection: a connection that
ends pauses them (their output goes on into their rings), and the next
connection resumes every one exactly (docs/protocol.md §8, "RESUME").  Echo
streams (``--echo``) have no task at all.

Per connection: the agent sends RESUME first (every stream it holds: ring
start and end, input received), reads the gateway's RESUME, then resends each
listed stream's output from what the gateway holds (a ``gap`` first if its
ring overflowed meanwhile), and EXIT again for exited streams.  Streams the
gateway did not list get a CLOSE from it (the agent kills them then).

Heartbeats both ways: the writer PINGs every ``heartbeat_interval_s``; two
missed PONGs, or a write stuck that long, mean the link is dead (the gateway
does the same).  ``--ready-file`` is written once, when the first RESUME
exchange completes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from podterm import __version__
from podterm.agent.dialer import ConnectionOutcome, Dialer, DialerStatistics, Registration
from podterm.agent.echo import EchoStream
from podterm.agent.streams import (
    AgentStream,
    AgentStreamStatistics,
    FailedStream,
    ProcessStream,
    StreamHost,
)
from podterm.config import AgentConfig
from podterm.errors import CloseCode, ConfigError, LocalProtocolError, ProtocolViolation
from podterm.net.wsconn import ConnectionClosed, WebSocketStream
from podterm.protocol.events import (
    Ack,
    Close,
    Drain,
    ErrorMsg,
    Event,
    Open,
    Resize,
    Resume,
    Stderr,
    Stdin,
    Stdout,
)
from podterm.protocol.offsets import DEFAULT_ACK_INTERVAL_S
from podterm.protocol.tunnel import ResumeAction, TunnelCodec, TunnelMux, TunnelRole
from podterm.protocol.websocket import ConnectionState as WsState
from podterm.resilience.heartbeat import Heartbeat
from podterm.upstream.base import OutputChannel, StreamSpec
from podterm.upstream.local import LocalUpstream

__all__ = ["Agent", "AgentOptions", "AgentStatistics", "main", "options_from_config",
           "run_agent"]

log = logging.getLogger(__name__)

_STDOUT = int(OutputChannel.STDOUT)
#: Output bytes per STDOUT message at most, and the share of one stream per
#: fair round: 32 KiB, what the gateway sends its clients.
_QUANTUM = 32 * 1024
#: Output bytes put in one write at most (one default window): bounds how long
#: one busy tunnel holds the loop.
_MAX_BATCH_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """The agent's bounds and timers (the flags are in :class:`~podterm.config.AgentConfig`).

    Attributes:
        ring_bytes: output kept per stream (``--retain-bytes``; 1 MiB, as the
            gateway's session ring) whatever the gateway acknowledged: while
            the gateway is away, and for a gateway that adopts the stream after
            its first one died; ``ring_chunk_bytes`` its unit.
        max_streams: streams this agent accepts (reported as its capacity).
            4,096: a RESUME must fit in 1 MiB (about 10,000 streams).
        heartbeat_interval_s, heartbeat_max_missed: PING period and the
            unanswered PINGs that mean a dead link (15 s and 2, every link's).
        connect_timeout_s: bound on TCP + TLS + upgrade.
        resume_timeout_s: bound on the gateway's RESUME answer.
        backoff_base_s, backoff_cap_s: retry delay windows (0.5 s, 30 s:
            spec/cli.md's client reconnect policy).
        breaker_threshold, breaker_cooldown_s: failures in a row that stop
            attempts, and for how long (5, 30 s).
        exit_drain_s: how long a shell's output is still read after it exits
            (a background job may hold the terminal).
        kill_grace_s: SIGHUP/SIGTERM to SIGKILL when a shell is closed.
        ack_interval_s: the ACK timer bound (docs/protocol.md §6: 100 ms).
    """

    ring_bytes: int = 1 << 20
    ring_chunk_bytes: int = 4096
    max_streams: int = 4096
    heartbeat_interval_s: float = 15.0
    heartbeat_max_missed: int = 2
    connect_timeout_s: float = 10.0
    resume_timeout_s: float = 10.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    exit_drain_s: float = 2.0
    kill_grace_s: float = 2.0
    ack_interval_s: float = DEFAULT_ACK_INTERVAL_S

    def __post_init__(self) -> None:
        if self.ring_bytes <= 0 or self.ring_bytes % self.ring_chunk_bytes:
            raise ValueError(f"ring_bytes={self.ring_bytes} must be a positive multiple of "
                             f"ring_chunk_bytes={self.ring_chunk_bytes}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_max_missed < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and heartbeat_max_missed >= 1")


@dataclass(frozen=True, slots=True)
class AgentStatistics:
    """A snapshot of the agent."""

    connected: bool
    registrations: int  # RESUME exchanges completed
    streams: int
    dialer: DialerStatistics


def _write_ready_file(path: str, payload: dict[str, object]) -> None:
    """Write ``payload`` as JSON atomically (temp file + rename): readers never see half."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".ready-", dir=str(target.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Agent(StreamHost):
    """The sidecar: its streams, its tunnel bookkeeping, and its connection to the gateway.

    Args:
        config: the flags (gateway, identity, credentials, shell, echo, ready file).
        options: bounds and timers.
        base_env: the environment shells start from (None: this process's,
            minus ``PODTERM_*``); ``SHELL`` is ``config.shell`` for login shells.
        rng: randomness for the reconnect jitter.

    Raises:
        ConfigError: unusable TLS files or gateway URL.

    Run it with ``await nursery.start(agent.run)``; :meth:`wait_registered`
    tells when the gateway has taken it.
    """

    def __init__(self, config: AgentConfig, options: AgentOptions | None = None, *,
                 base_env: Mapping[str, str] | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        self.config = config
        self.options = options = options or AgentOptions()
        self.agent_id = secrets.token_hex(8)
        self.registration = Registration(
            namespace=config.namespace, pod=config.pod, agent_id=self.agent_id,
            containers=(config.container,) if config.container else (),
            version=__version__, capacity=options.max_streams)
        self.dialer = Dialer(
            config.gateway, self.registration, ca_file=config.ca_file,
            cert_file=config.cert_file, key_file=config.key_file,
            token_file=config.token_file, backoff_base_s=options.backoff_base_s,
            backoff_cap_s=options.backoff_cap_s, breaker_threshold=options.breaker_threshold,
            breaker_cooldown_s=options.breaker_cooldown_s, rng=rng)
        self.upstream = LocalUpstream(base_env=base_env, default_shell=config.shell,
                                      kill_grace_s=options.kill_grace_s)
        self.mux = TunnelMux(TunnelRole.AGENT, ack_interval_s=options.ack_interval_s)
        self.streams: dict[int, AgentStream] = {}
        self.link_up = False
        self._nursery: trio.Nursery | None = None
        self._dirty: dict[int, None] = {}  # streams with something to send (ordered set)
        self._acks: dict[int, int] = {}
        self._ack_timer: set[int] = set()
        self._ack_timer_at: float | None = None
        self._closes: dict[int, str] = {}  # CLOSE replies due
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._changed = trio.lowlevel.ParkingLot()
        self._registrations = 0
        self._drain: str | None = None

    def __repr__(self) -> str:
        return (f"<Agent {self.config.namespace}/{self.config.pod} "
                f"{'connected' if self.link_up else 'disconnected'} streams={len(self.streams)}>")

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(self.link_up, self._registrations, len(self.streams),
                               self.dialer.statistics())

    def stream_statistics(self) -> list[AgentStreamStatistics]:
        return [s.statistics() for s in self.streams.values()]

    async def wait_registered(self, count: int = 1) -> None:
        """Wait until ``count`` RESUME exchanges have completed and the link is up
        (the caller bounds the wait)."""
        await trio.lowlevel.checkpoint()
        while not (self.link_up and self._registrations >= count):
            await self._changed.park()

    async def wait_disconnected(self) -> None:
        """Wait until the tunnel is down (the caller bounds the wait)."""
        await trio.lowlevel.checkpoint()
        while self.link_up:
            await self._changed.park()

    # ---------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Dial the gateway forever, keeping every shell across connections.

        Cancellation stops the agent: every shell is killed on the way out.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            log.info("agent.start.complete %s/%s agent=%s gateway=%s%s", self.config.namespace,
                     self.config.pod, self.agent_id, self.config.gateway,
                     " (echo mode)" if self.config.echo else "")
            task_status.started(self)
            try:
                await self.dialer.run(self.serve_connection,
                                      connect_timeout_s=self.options.connect_timeout_s)
            finally:
                for stream in self.streams.values():
                    stream.close()
                self._nursery = None

    # -------------------------------------------------------- StreamHost

    def stream_ready(self, stream: AgentStream) -> None:
        sid = stream.stream_id
        if self.streams.get(sid) is stream and sid not in self._dirty:
            self._dirty[sid] = None
            self._writer_lot.unpark_all()

    def input_consumed(self, stream: AgentStream, n: int) -> None:
        sid = stream.stream_id
        if sid not in self.mux or self.streams.get(sid) is not stream:
            return
        now = trio.current_time()
        offset = self.mux.consumed(sid, n, now)
        if not self.link_up:
            return  # the next RESUME says what we hold
        if offset is not None:
            self._acks[sid] = offset
            self._ack_timer.discard(sid)
            self._writer_lot.unpark_all()
        elif sid not in self._ack_timer:
            self._ack_timer.add(sid)
            if self._ack_timer_at is None:
                self._ack_timer_at = now + self.options.ack_interval_s
                self._writer_lot.unpark_all()

    # ------------------------------------------------------------ connection

    async def serve_connection(self, ws: WebSocketStream) -> ConnectionOutcome:
        """Run one tunnel connection: RESUME exchange, then relay until it ends.

        Owns ``ws`` (closed on return).  Returns how it ended for the dialer.
        """
        codec = TunnelCodec(TunnelRole.AGENT)
        registered = False
        reason = "connection closed"
        self._drain = None
        try:
            resume = self._make_resume()
            prefix, payload = codec.encode(0, resume)
            await ws.send_binary(payload, prefix)
            with trio.fail_after(self.options.resume_timeout_s):
                theirs, early = await self._read_resume(ws, codec)
            if theirs is None:
                reason = f"gateway draining: {self._drain}"
                await ws.aclose(CloseCode.GOING_AWAY, "")
                return ConnectionOutcome(False, drained=True, reason=reason)
            self._start(theirs)
            registered = True
            self._registered()
            for sid, event in early:
                self._dispatch(sid, event, ws)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, ws, codec, nursery.cancel_scope)
                await self._send_loop(ws, codec)
                nursery.cancel_scope.cancel()
            if self._drain is not None:
                reason = f"gateway draining: {self._drain}"
            else:
                closed = ws.closed
                reason = str(closed) if closed is not None else "connection ended"
        except trio.TooSlowError:
            reason = "the gateway did not answer RESUME in time"
            await ws.abort(CloseCode.POLICY_VIOLATION, "RESUME expected")
        except ProtocolViolation as exc:
            reason = f"protocol error: {exc.message}"
            log.warning("agent.tunnel.failed: %s", exc.message)
            await ws.abort(int(exc.close_code), exc.message[:100])
        except ConnectionClosed as exc:
            reason = str(exc)
        except Exception as exc:
            # A bug ends this connection, never the agent and its shells (STYLE.md §3):
            # the next connection resumes every stream.
            reason = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("agent.tunnel.failed: internal error; reconnecting")
        finally:
            self._disconnected()
            with trio.CancelScope(shield=True):
                await ws.abort(CloseCode.GOING_AWAY, "")
        return ConnectionOutcome(registered, drained=self._drain is not None, reason=reason)

    def _make_resume(self) -> Resume:
        mux = self.mux
        mux.disconnected()
        for sid in [sid for sid in self.streams if sid not in mux]:
            self.streams.pop(sid).close()  # half-closed when the link dropped
        entries = [stream.resume_entry(mux.stream_statistics(sid).received)
                   for sid, stream in self.streams.items()]
        return mux.make_resume(entries)

    async def _read_resume(self, ws: WebSocketStream, codec: TunnelCodec
                           ) -> tuple[Resume | None, list[tuple[int, Event]]]:
        """Read until the gateway's RESUME (None if it says ``drain`` first)."""
        while True:
            batch = await ws.receive_batch()
            events: list[tuple[int, Event]] = []
            for opcode, payload in batch:
                events.extend(codec.receive_message(opcode, payload))
            for i, (_, event) in enumerate(events):
                if isinstance(event, Resume):
                    return event, events[i + 1:]
                if isinstance(event, Drain):
                    self._drain = event.reason
                    return None, []
                if isinstance(event, ErrorMsg):
                    log.warning("agent.tunnel.error from the gateway: %s %s", event.code,
                                event.message)

    def _start(self, theirs: Resume) -> None:
        """Apply the gateway's RESUME: resend per plan, then the link is up."""
        try:
            plans = self.mux.apply_resume(theirs)
        except LocalProtocolError as exc:
            raise ProtocolViolation(f"RESUME does not match: {exc.message}") from exc
        self._dirty.clear()
        self._acks.clear()
        self._ack_timer.clear()
        self._ack_timer_at = None
        self._closes.clear()
        self.link_up = True
        for plan in plans:
            stream = self.streams.get(plan.stream_id)
            if stream is None:
                continue
            if plan.action is ResumeAction.RESUME:
                assert plan.replay is not None
                if plan.replay.gap_from is not None:
                    log.warning("agent.stream.gap %d: %d output bytes left the ring while "
                                "the gateway was away", plan.stream_id, plan.replay.lost)
                stream.on_resume(plan.replay)
            # UNLISTED: the gateway CLOSEs it next; send nothing.
        for stream in self.streams.values():
            stream.wake_producer()  # room is bounded again while the link is up

    def _registered(self) -> None:
        self._registrations += 1
        log.info("agent.register.complete %s/%s streams=%d", self.config.namespace,
                 self.config.pod, len(self.streams))
        if self._registrations == 1 and self.config.ready_file:
            _write_ready_file(self.config.ready_file,
                              {"gateway": self.config.gateway, "pid": os.getpid()})
        self._changed.unpark_all()

    def _disconnected(self) -> None:
        was_up = self.link_up
        self.link_up = False
        self.mux.disconnected()
        for sid in [sid for sid in self.streams if sid not in self.mux]:
            self.streams.pop(sid).close()
        for stream in self.streams.values():
            stream.on_disconnect()
        self._dirty.clear()
        self._acks.clear()
        self._ack_timer.clear()
        self._ack_timer_at = None
        self._closes.clear()
        if was_up:
            log.info("agent.tunnel.lost: %d shells keep running", len(self.streams))
        self._changed.unpark_all()

    # --------------------------------------------------------------- receiving

    async def _receive_loop(self, ws: WebSocketStream, codec: TunnelCodec,
                            scope: trio.CancelScope) -> None:
        decode = codec.receive_message
        try:
            while True:
                batch = await ws.receive_batch()
                for opcode, payload in batch:
                    for sid, event in decode(opcode, payload):
                        self._dispatch(sid, event, ws)
                if self._drain is not None:
                    return  # the writer closes the connection (1001)
        except ProtocolViolation as exc:
            log.warning("agent.tunnel.failed: %s", exc.message)
            with trio.CancelScope(shield=True):
                await ws.abort(int(exc.close_code), exc.message[:100])
        except ConnectionClosed:
            pass
        scope.cancel()

    def _dispatch(self, sid: int, event: Event, ws: WebSocketStream) -> None:
        """Apply one message from the gateway.  Never blocks.

        Raises:
            ProtocolViolation: the gateway broke §8.
        """
        if sid == 0:
            if isinstance(event, Drain):
                log.info("agent.tunnel.drain: %s", event.reason)
                self._drain = event.reason
                self._writer_lot.unpark_all()
            elif isinstance(event, ErrorMsg):
                log.warning("agent.tunnel.error from the gateway: %s %s", event.code,
                            event.message)
            return
        mux = self.mux
        if not mux.received(sid, event):
            return  # in flight when we closed the stream
        kind = type(event)
        if kind is Open:
            self._open(sid, event)  # type: ignore[arg-type]
            return
        stream = self.streams.get(sid)
        if stream is None:
            if kind is Stdin:
                mux.consumed(sid, len(event.data), trio.current_time())  # type: ignore[union-attr]
            return
        if kind is Stdin:
            stream.feed_input(event.data)  # type: ignore[union-attr]
        elif kind is Ack:
            stream.on_ack(event.offset)  # type: ignore[union-attr]
            if stream.pending_output() or stream.exit_due():
                self.stream_ready(stream)
        elif kind is Resize:
            stream.resize(event.cols, event.rows)  # type: ignore[union-attr]
        elif kind is Close:
            # The gateway is done with it: kill what runs, answer, forget.
            del self.streams[sid]
            self._dirty.pop(sid, None)
            stream.close()
            self._closes[sid] = "closed"
            self._writer_lot.unpark_all()
        elif kind is ErrorMsg:
            log.info("agent.stream.error %d from the gateway: %s %s", sid,
                     event.code, event.message)  # type: ignore[union-attr]

    def _open(self, sid: int, event: Open) -> None:
        options = self.options
        ring = {"ring_bytes": options.ring_bytes, "chunk_bytes": options.ring_chunk_bytes}
        stream: AgentStream
        if self._nursery is None:
            stream = FailedStream(sid, event.window, event.tty, self,
                                  "the agent is shutting down", **ring)
        elif len(self.streams) >= options.max_streams:
            stream = FailedStream(sid, event.window, event.tty, self,
                                  f"this agent runs its maximum of {options.max_streams} "
                                  "shells", **ring)
        elif self.config.echo:
            stream = EchoStream(sid, event.window, event.tty, self, **ring)
        else:
            env = dict(event.env)
            if event.command is None:
                env.setdefault("SHELL", self.config.shell)  # the login shell LocalUpstream runs
            spec = StreamSpec(command=event.command, tty=event.tty, cols=event.cols,
                              rows=event.rows, env=env, cwd=event.cwd,
                              namespace=self.config.namespace, pod=self.config.pod,
                              container=self.config.container)
            process = ProcessStream(sid, event.window, self, self.upstream, spec,
                                    exit_drain_s=options.exit_drain_s,
                                    kill_timeout_s=options.kill_grace_s + 8.0, **ring)
            stream = process
            self._nursery.start_soon(process.run)
        stream.session = event.session  # reported in every RESUME (adoption by another gateway)
        self.streams[sid] = stream
        stream.resumed = True  # opened on this connection: credit is live
        if stream.pending_output() or stream.exit is not None:
            self.stream_ready(stream)  # a failed start has its message and EXIT ready
        log.debug("agent.stream.open %d %s", sid, stream.kind)

    # ----------------------------------------------------------------- sending

    async def _send_loop(self, ws: WebSocketStream, codec: TunnelCodec) -> None:
        options = self.options
        hb = Heartbeat(options.heartbeat_interval_s, max_missed=options.heartbeat_max_missed,
                       now=trio.current_time())
        ws.heartbeat = hb
        stall_s = options.heartbeat_interval_s * options.heartbeat_max_missed
        while True:
            if ws.conn.state is not WsState.OPEN:
                # The link is closing (the gateway's CLOSE, or its end, was read
                # while we waited): nothing more may be sent; the reader ends it.
                return
            if self._drain is not None:
                await ws.aclose(CloseCode.GOING_AWAY, "reconnecting elsewhere (drain)")
                return
            parts: list[bytes] = []
            self._collect(ws, codec, parts)
            now = trio.current_time()
            if now >= hb.deadline:
                ping = hb.poll(now)
                if hb.is_dead:
                    log.info("agent.tunnel.dead: no pong to %d pings", hb.max_missed)
                    await ws.abort(CloseCode.INTERNAL_ERROR, "heartbeat lost")
                    return
                if ping is not None:
                    parts.append(ws.conn.send_ping(ping))
            if parts:
                with trio.move_on_after(stall_s) as stalled:
                    try:
                        await ws.send_raw(parts[0] if len(parts) == 1 else b"".join(parts))
                    except ConnectionClosed:
                        return
                if stalled.cancelled_caught:
                    log.info("agent.tunnel.dead: the gateway stopped reading")
                    await ws.abort(CloseCode.INTERNAL_ERROR, "peer stopped reading")
                    return
                continue
            deadline = hb.deadline
            if self._ack_timer_at is not None:
                deadline = min(deadline, self._ack_timer_at)
            with trio.move_on_at(deadline):
                await self._writer_lot.park()

    def _collect(self, ws: WebSocketStream, codec: TunnelCodec, parts: list[bytes]) -> None:
        """Append every message due now to ``parts`` (encoded WebSocket frames)."""
        mux = self.mux
        send_binary = ws.conn.send_binary

        def put(sid: int, event: Event) -> None:
            prefix, payload = codec.encode(sid, event)
            parts.append(send_binary(payload, prefix))

        if self._closes:
            for sid, reason in self._closes.items():
                if sid in mux and not mux.stream_statistics(sid).local_closed:
                    close = Close(reason)
                    put(sid, close)
                    mux.sent(sid, close)
            self._closes.clear()
        if self._dirty:
            pending: dict[int, int] = {}
            for sid in list(self._dirty):
                stream = self.streams.get(sid)
                if stream is None or not stream.resumed:
                    del self._dirty[sid]
                    continue
                if stream.gap is not None:
                    put(sid, stream.gap)
                    stream.gap = None
                n = stream.pending_output()
                if n:
                    pending[sid] = n
            size = 0
            while pending and size < _MAX_BATCH_BYTES:
                plan = mux.plan_sends(pending, quantum=_QUANTUM)
                if not plan:
                    break
                for sid, n in plan:
                    stream = self.streams[sid]
                    # An input ACK due on this stream, or held for the timer,
                    # leaves now and *ahead of* the output (a keystroke's
                    # echo): the gateway learns the input is written before
                    # it relays the echo, and tells its client both in one write.
                    ack = self._acks.pop(sid, None)
                    if sid in self._ack_timer:
                        self._ack_timer.discard(sid)
                        flushed = mux.ack_now(sid, trio.current_time())
                        if flushed is not None:
                            ack = flushed
                    if ack is not None:
                        put(sid, Ack(ack))
                    for channel, data in stream.take_output(n):
                        event: Stdout | Stderr = Stdout(data) if channel == _STDOUT \
                            else Stderr(data)
                        put(sid, event)
                        mux.sent(sid, event)
                    size += n
                    pending[sid] -= n
                    if not pending[sid]:
                        del pending[sid]
            for sid in list(self._dirty):
                stream = self.streams[sid]
                if stream.exit_due():
                    assert stream.exit is not None
                    put(sid, stream.exit)
                    stream.exit_sent = True
                # Still dirty only with output *and* credit; an ACK re-marks it.
                if sid not in pending or mux.credit(sid) == 0:
                    del self._dirty[sid]
        now = trio.current_time()
        if self._ack_timer_at is not None and now >= self._ack_timer_at:
            self._acks.update(mux.poll_acks_of(self._ack_timer, now))
            self._ack_timer_at = now + self.options.ack_interval_s if self._ack_timer else None
        if self._acks:
            for sid, offset in self._acks.items():
                if sid in mux:
                    put(sid, Ack(offset))
            self._acks.clear()


def options_from_config(config: AgentConfig) -> AgentOptions:
    """The :class:`AgentOptions` the flags ask for (``--retain-bytes``, in whole ring chunks)."""
    chunk = AgentOptions().ring_chunk_bytes
    return AgentOptions(ring_bytes=-(-config.retain_bytes // chunk) * chunk)


async def run_agent(config: AgentConfig, options: AgentOptions | None = None, *,
                    base_env: Mapping[str, str] | None = None,
                    handle_signals: bool = True) -> None:
    """Run the agent until SIGTERM/SIGINT (or cancellation); every shell is killed on exit.

    ``options`` default to :func:`options_from_config`.
    """
    agent = Agent(config, options or options_from_config(config), base_env=base_env)
    async with trio.open_nursery() as nursery:
        if handle_signals:
            async def watch() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("agent.signal %s: stopping", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
        await nursery.start(agent.run)
    log.info("agent.stop.complete")


def main(config: AgentConfig) -> int:
    """``podterm agent``: run until SIGTERM/SIGINT; 0 on a clean exit, 2 for bad files."""
    # The shells' environment: ours, minus our own settings (PODTERM_*).
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PODTERM_")}
    try:
        trio.run(functools.partial(run_agent, config, base_env=base_env))
    except ConfigError as exc:
        print(f"podterm agent: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
