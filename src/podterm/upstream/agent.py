"""The agent upstream: shells in pods, reached through their sidecar agents' tunnels.

Gateway side of docs/protocol.md §8.  A sidecar agent (``podterm agent``)
dials the gateway's agent endpoint (:mod:`podterm.gateway.agents`), which
authenticates it and hands the WebSocket to :meth:`AgentUpstream.serve_tunnel`.
:class:`AgentUpstream` keeps one :class:`_Tunnel` per pod identity
(namespace, pod): the tunnel's :class:`~podterm.protocol.tunnel.TunnelMux`
and its streams live as long as the agent does, across any number of tunnel
connections.  A session on upstream ``agent`` calls
:meth:`AgentUpstream.open`, which opens a stream over the tunnel of the agent
registered for ``spec.namespace/spec.pod`` and returns a :class:`TunnelStream`,
an :class:`~podterm.upstream.base.UpstreamStream` like any other.

Surviving a reconnect
---------------------
When the agent's link drops, its streams *pause*: ``receive_some`` waits,
``send_stdin`` fills the stream's bounded input log and then waits, ``resize``
is remembered.  The session keeps its shell.  When the agent reconnects (to
this gateway), the RESUME exchange resumes every stream exactly: the agent
resends output from what we hold (``in_acked``), we resend input from what it
holds; a stream the agent no longer has ends its session (``upstream_failed``);
a stream it has and we do not want is CLOSEd (the agent kills it).  If the
agent stays away longer than ``lost_timeout_s``, its streams end the same way.

Data path per connection: one reader task (decode, account, hand output to
the stream: never blocks, as per-stream credit bounds what each stream may
hold) and one writer task (OPEN, RESIZE, STDIN within each stream's credit,
ACKs, CLOSE and PINGs, in one write per batch).  Streams that have something
to send are kept in a "dirty" set, so a keystroke costs O(1), not O(streams).

Heartbeats: the writer PINGs every ``heartbeat_interval_s``; two missed
PONGs, or a write stuck that long, mark the link dead (the agent does the same
from its side).

Another gateway's streams: adoption
-----------------------------------
Every stream is labelled with its session id (OPEN ``session``, from
:func:`for_session` around :meth:`AgentUpstream.open`), and the agent lists
the label in every RESUME.  When an agent whose gateway died reconnects here,
its RESUME names streams this process never opened.  With :class:`TunnelHooks`
set (the gateway's :class:`~podterm.gateway.agents.AgentCoordinator`, which
holds the session store), each of them is *claimed* before we answer: a claim
says from which output offset to resume (what the client is known to hold)
and what the session ran; the stream then resumes like any other, with our
input log starting at the agent's input offset, and the hooks re-create its
session.  A stream nobody claims is CLOSEd with the reason the hooks give.
The hooks also hold the agent's lease in the store (who has the tunnel) and
call :meth:`AgentUpstream.moved_away` when the agent is found at another
gateway: then our state for it is stale, and its sessions end here without a
word to the agent (``hand_over``: their clients reconnect and resume there).
"""

from __future__ import annotations

import logging
import math
import signal as _signal
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import trio

from podterm.errors import (
    CloseCode,
    LocalProtocolError,
    PodtermError,
    ProtocolViolation,
    Unavailable,
    UpstreamError,
)
from podterm.metrics import MetricFamily, counter, gauge
from podterm.net.wsconn import ConnectionClosed, WebSocketStream
from podterm.protocol.events import (
    Ack,
    Close,
    Drain,
    ErrorMsg,
    Event,
    Exit,
    Gap,
    Open,
    Resize,
    Resume,
    ResumeEntry,
    Stderr,
    Stdin,
    Stdout,
)
from podterm.protocol.offsets import DEFAULT_ACK_INTERVAL_S, DEFAULT_WINDOW, InputLog
from podterm.protocol.session_proto import MAX_TERMINAL_SIZE
from podterm.protocol.tunnel import (
    HEADER_SIZE,
    MAX_RESUME_BYTES,
    SUBPROTOCOL,
    ResumeAction,
    TunnelCodec,
    TunnelMux,
    TunnelRole,
)
from podterm.protocol.websocket import ConnectionState as WsState
from podterm.protocol.websocket import WsLimits
from podterm.resilience.heartbeat import Heartbeat
from podterm.store.base import PodIdentity, SessionRecord
from podterm.upstream.base import Context, ExitStatus, OutputChannel, StreamSpec

__all__ = [
    "AGENTS_GROUP",
    "AGENTS_PATH",
    "AgentInfo",
    "AgentUpstream",
    "AgentUpstreamOptions",
    "AgentUpstreamStatistics",
    "AnnouncedStream",
    "ConnectVerdict",
    "StreamClaim",
    "TunnelHooks",
    "for_session",
    "HEADER_AGENT_ID",
    "HEADER_AGENT_VERSION",
    "HEADER_CAPACITY",
    "HEADER_CONTAINERS",
    "HEADER_NAMESPACE",
    "HEADER_POD",
    "SUBPROTOCOL",
    "TUNNEL_LIMITS",
    "TunnelStream",
]

log = logging.getLogger(__name__)

#: The agent endpoint (docs/agent.md); subprotocol ``podterm.tunnel.v1``.
AGENTS_PATH = "/api/v1/agents/connect"
#: An agent's identity must be in this group (token CSV group or certificate O).
AGENTS_GROUP = "podterm:agents"
# Registration headers of the upgrade request (the tunnel's CONTROL has no
# "register" message: docs/agent.md "Registration").
HEADER_NAMESPACE = "X-Podterm-Namespace"
HEADER_POD = "X-Podterm-Pod"
HEADER_CONTAINERS = "X-Podterm-Containers"
HEADER_AGENT_ID = "X-Podterm-Agent-Id"
HEADER_AGENT_VERSION = "X-Podterm-Agent-Version"
HEADER_CAPACITY = "X-Podterm-Capacity"

#: A RESUME may be 1 MiB (docs/protocol.md §8) plus the 5-byte header; every
#: other tunnel message is far smaller.
TUNNEL_LIMITS = WsLimits(max_frame_bytes=HEADER_SIZE + MAX_RESUME_BYTES,
                         max_message_bytes=HEADER_SIZE + MAX_RESUME_BYTES)

#: Validates OPENs before they are queued (encoding an OPEN keeps no state).
_CHECK_CODEC = TunnelCodec(TunnelRole.GATEWAY)

_STDOUT = int(OutputChannel.STDOUT)
_STDERR = int(OutputChannel.STDERR)
_EOF = int(OutputChannel.EOF)
#: What a stream that was closed before its EXIT arrived reports: the agent
#: hangs the process up (SIGHUP first), like a terminal that went away.
_HUNG_UP = ExitStatus(code=None, signal=int(_signal.SIGHUP))
#: STDIN bytes per message (the quantum of a fair round): 32 KiB, as podterm.v1.
_STDIN_QUANTUM = 32 * 1024
#: Bytes put in one write at most: one default window; bounds how long one
#: busy tunnel holds the loop.
_MAX_BATCH_BYTES = 256 * 1024

#: The session id the streams opened in this context belong to (:func:`for_session`).
_SESSION_ID: ContextVar[str | None] = ContextVar("podterm_agent_session", default=None)


@contextmanager
def for_session(session_id: str) -> Iterator[None]:
    """Label the streams :meth:`AgentUpstream.open` opens in this block with ``session_id``.

    The registry wraps its upstream open in it; the label travels in the
    stream's OPEN, and the agent reports it in every RESUME, which is how a
    gateway that did not open the stream finds its session (adoption).
    """
    token = _SESSION_ID.set(session_id)
    try:
        yield
    finally:
        _SESSION_ID.reset(token)


def _moved_error(reason: str) -> UpstreamError:
    """The error a handed-over stream raises: close 1001, "reconnect and resume elsewhere".

    A session whose upstream fails with close code 1001 ends ``moved``: its
    clients are told to reconnect (they reach the session's new gateway) and
    its record in the store is left to the gateway that holds it now.
    """
    return UpstreamError(reason, close_code=CloseCode.GOING_AWAY)


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What an agent registered: its pod identity and what it reports about itself.

    Attributes:
        pod: the pod it runs in (the registry key).
        agent_id: random per agent process: a new id means the agent restarted.
        containers: container names it reports (its shells run in its own).
        version: the agent's podterm version.
        capacity: most streams it accepts (0: not said).
        user: the identity it authenticated as.
        peer: its address.
    """

    pod: PodIdentity
    agent_id: str
    containers: tuple[str, ...] = ()
    version: str = ""
    capacity: int = 0
    user: str = ""
    peer: str = ""


@dataclass(frozen=True, slots=True)
class AgentUpstreamOptions:
    """Bounds and timers of the agent upstream.

    Attributes:
        window: per-stream credit window offered in OPEN (docs/protocol.md §6: 256 KiB).
        heartbeat_interval_s, heartbeat_max_missed: PING period; missed PONGs
            that mean a dead link (15 s and 2, as every podterm link).
        resume_timeout_s: bound on an agent's first message (its RESUME).
        reconnect_wait_s: how long :meth:`AgentUpstream.open` waits for a
            registered agent that is reconnecting.
        lost_timeout_s: an agent away this long loses its streams (their
            sessions end).  10 min: the default session grace.
        close_timeout_s: bound on a tunnel's close handshake.
        ack_interval_s: the ACK timer bound (docs/protocol.md §6: 100 ms).
        claim_timeout_s: bound on the hooks' answer to a connection (lease and
            claims in the session store); beyond it the agent is asked to retry.
    """

    window: int = DEFAULT_WINDOW
    heartbeat_interval_s: float = 15.0
    heartbeat_max_missed: int = 2
    resume_timeout_s: float = 10.0
    reconnect_wait_s: float = 10.0
    lost_timeout_s: float = 600.0
    close_timeout_s: float = 5.0
    ack_interval_s: float = DEFAULT_ACK_INTERVAL_S
    claim_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class AnnouncedStream:
    """A stream in an agent's RESUME, as the hooks see it.

    Attributes:
        stream_id, window, out_start, out_offset, in_acked: the agent's entry.
        session: its label (the session id its OPEN carried), if any.
        known: this process holds it (a reconnect to the same gateway).
    """

    stream_id: int
    window: int
    out_start: int
    out_offset: int
    in_acked: int
    session: str | None
    known: bool


@dataclass(frozen=True, slots=True)
class StreamClaim:
    """The hooks take over a stream this process did not open.

    Attributes:
        stream_id: the agent's stream.
        out_from: the output offset to resume from, in
            ``[out_start, out_offset]`` of the agent's entry.
        in_offset: the agent's input offset (its entry's ``in_acked``).
        catch_up_to: the output the agent had produced (its ``out_offset``).
        spec: what the stream runs (target, command, tty, size).
        record: the session's record as claimed (holder = us, its new version).
        previous_holder: the holder the record named before the claim ("" if none).
    """

    stream_id: int
    out_from: int
    in_offset: int
    catch_up_to: int
    spec: StreamSpec
    record: SessionRecord
    previous_holder: str = ""


@dataclass(frozen=True, slots=True)
class ConnectVerdict:
    """The hooks' answer to a new connection.

    Attributes:
        claims: streams to adopt, by id.
        closes: streams to CLOSE, by id, with the reason the agent logs.
        stale: set when our state for this agent is stale (another gateway
            has held it since): it is dropped and the connection refused, so
            the agent reconnects and every stream is claimed afresh.
    """

    claims: Mapping[int, StreamClaim] = field(default_factory=dict)
    closes: Mapping[int, str] = field(default_factory=dict)
    stale: str | None = None


class TunnelHooks(Protocol):
    """What the agent upstream asks of the gateway about agents and the session store.

    Implemented by :class:`podterm.gateway.agents.AgentCoordinator`.
    """

    async def connected(self, info: AgentInfo,
                        streams: Sequence[AnnouncedStream]) -> ConnectVerdict:
        """An agent's RESUME was read: take its lease, and claim or refuse its streams.

        Raises:
            Unavailable: it cannot decide now (the store is down and streams
                need it); the agent is asked to retry.
        """
        ...

    def adopt(self, info: AgentInfo, claim: StreamClaim, stream: TunnelStream) -> None:
        """Our RESUME went out: give the claimed ``stream`` its session (never blocks)."""
        ...

    def unclaimed(self, info: AgentInfo, claim: StreamClaim) -> None:
        """A claim was not adopted (the connection failed before our RESUME went out)."""
        ...

    async def disconnected(self, info: AgentInfo) -> None:
        """The agent's connection ended and no newer one replaced it: release the lease."""
        ...


@dataclass(frozen=True, slots=True)
class AgentUpstreamStatistics:
    """A snapshot of the agent upstream (for ``/metrics`` and tests)."""

    agents_connected: int
    agents_known: int
    streams: int
    connections: int  # tunnel connections accepted (RESUME exchanged)
    takeovers: int  # connections that replaced a live one of the same pod
    streams_resumed: int
    streams_lost: int  # streams whose agent forgot them or stayed away too long
    gap_bytes: int  # output bytes agents reported lost (their ring overflowed)
    heartbeat_failures: int
    agents: tuple[AgentInfo, ...] = field(default_factory=tuple)
    streams_adopted: int = 0  # streams another gateway opened, taken over here
    streams_refused: int = 0  # announced streams nobody claimed (CLOSEd)
    streams_moved: int = 0  # streams handed over to the gateway that has their agent now
    connections_refused: int = 0  # connections asked to retry (store down, stale state)


class _Counters:
    __slots__ = ("connections", "takeovers", "streams_resumed", "streams_lost", "gap_bytes",
                 "heartbeat_failures", "streams_adopted", "streams_refused", "streams_moved",
                 "connections_refused")

    def __init__(self) -> None:
        self.connections = 0
        self.takeovers = 0
        self.streams_resumed = 0
        self.streams_lost = 0
        self.gap_bytes = 0
        self.heartbeat_failures = 0
        self.streams_adopted = 0
        self.streams_refused = 0
        self.streams_moved = 0
        self.connections_refused = 0


def _exit_status(event: Exit) -> ExitStatus:
    if event.code is not None:
        return ExitStatus(code=event.code, signal=None)
    if event.signal is not None:
        return ExitStatus(code=None, signal=event.signal)
    return ExitStatus(code=255, signal=None)  # the agent could not tell


def _clamp_size(value: int) -> int:
    return min(max(value, 1), MAX_TERMINAL_SIZE)


class TunnelStream:
    """One stream over an agent's tunnel, as the session sees it (an ``UpstreamStream``).

    The contract is :mod:`podterm.upstream.base`'s; agent specifics:

    - ``pid`` is None (the process is in another pod; ``echo $$`` tells).
    - ``send_stdin`` returns once the bytes are in the stream's input log
      (bounded by the credit window): they are delivered exactly once, across
      reconnects, from there.  It waits while the log is full.
    - ``close_stdin``: with a tty it types the EOF character (Ctrl-D); without
      one the tunnel has no way to say "end of input" (docs/agent.md), so
      only later writes are refused.
    - While the agent is away every call that waits keeps waiting; once the
      agent is declared lost ``receive_some`` returns EOF and ``wait_exit``
      raises :class:`UpstreamError` (the session ends ``upstream_failed``).
    - Handed over (the agent is at another gateway now): the same, with an
      :class:`UpstreamError` of close code 1001 (the session ends ``moved``)
      and nothing sent to the agent, ever again.
    - ``input_confirmed`` is the input offset the agent has acknowledged (it
      wrote the bytes to the process): the session acknowledges input to its
      client only that far, so a client keeps every byte a dying gateway held
      and re-sends it to the gateway that adopts the stream.
    """

    __slots__ = ("stream_id", "spec", "window", "_tunnel", "_inbox", "_inbox_bytes", "_lot",
                 "_exit_lot", "_space_lot", "_sink", "_reader_cb", "_exit_cb",
                 "log", "in_sent", "needs_open", "size", "size_sent", "exit", "lost", "closed",
                 "_receiving", "_sending", "_stdin_closed", "agent_error", "gap_bytes",
                 "session_id", "adopt_from", "moved", "_confirmed_cb", "left_running")

    def __init__(self, stream_id: int, spec: StreamSpec, window: int, tunnel: _Tunnel, *,
                 session_id: str | None = None, in_offset: int = 0,
                 adopt_from: int | None = None) -> None:
        self.stream_id = stream_id
        self.spec = spec
        self.window = window
        self._tunnel = tunnel
        # (channel, data, tunnel bytes); None while empty (760 bytes an idle stream saves)
        self._inbox: deque[tuple[int, bytes, int]] | None = None
        self._inbox_bytes = 0
        # Three kinds of waiter, each woken only by what concerns it (a task
        # woken for nothing costs a task switch, per keystroke here):
        # - the output pump waits on _lot, woken per delivery;
        # - send_stdin waits on _space_lot for room in the input log, woken
        #   per agent ACK (made when first needed: most streams never wait);
        # - the session's supervisor waits on _exit_lot in wait_exit.
        # What ends or moves the stream wakes all three (_changed).  Each lot
        # is made by its first waiter: an idle stream has no waiter at all
        # (its reader and its supervisor are away: park_reader, park_supervisor).
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._exit_lot: trio.lowlevel.ParkingLot | None = None
        self._space_lot: trio.lowlevel.ParkingLot | None = None
        # The reader's push target while it waits in receive_some (set_output_sink).
        self._sink: Callable[[int, bytes], bool] | None = None
        # Set while the reader is away (park_reader): what calls it back.
        self._reader_cb: Callable[[], None] | None = None
        # Set while the session's supervisor is away (park_supervisor).
        self._exit_cb: Callable[[], None] | None = None
        #: Input not yet acknowledged by the agent; never more than one window.
        #: Starts at the agent's input offset for an adopted stream.
        self.log = InputLog(in_offset, limit=window)
        #: Next input offset to send on the current connection.
        self.in_sent = in_offset
        #: The session this stream belongs to (its OPEN's label).
        self.session_id = session_id
        #: Adopted, until the first RESUME: the output offset to resume from.
        self.adopt_from = adopt_from
        # An adopted stream runs on the agent already: no OPEN.
        self.needs_open = adopt_from is None
        self.size = (_clamp_size(spec.cols), _clamp_size(spec.rows))
        self.size_sent = self.size  # OPEN carries the first size
        self.exit: ExitStatus | None = None
        self.lost: str | None = None
        self.moved = False
        self.closed = False
        self._receiving = False
        self._sending = False
        self._stdin_closed = False
        self.agent_error: str | None = None
        self.gap_bytes = 0
        self._confirmed_cb: Callable[[], None] | None = None
        #: Closed without the agent hearing of it: its process runs on there.
        self.left_running = False

    def __repr__(self) -> str:
        state = ("closed" if self.closed else "lost" if self.lost else
                 "exited" if self.exit else "running")
        return (f"<TunnelStream {self._tunnel.pod}#{self.stream_id} {state} "
                f"inbox={self._inbox_bytes} in={self.log.acked}..{self.log.end}>")

    @property
    def pid(self) -> int | None:
        return None

    @property
    def input_confirmed(self) -> int:
        """Input offset the agent has acknowledged (written to the process)."""
        return self.log.acked

    def on_input_confirmed(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever :attr:`input_confirmed` moves (the session's hook)."""
        self._confirmed_cb = callback

    # ------------------------------------------------------------ the tunnel's side

    def wake(self) -> None:
        self._changed()

    def _changed(self) -> None:
        """Wake every waiter: the stream's state changed (exit, loss, close, resume)."""
        self._call_reader()
        callback = self._exit_cb
        if callback is not None:
            self._exit_cb = None
            callback()
        for lot in (self._lot, self._exit_lot, self._space_lot):
            if lot is not None:
                lot.unpark_all()

    def set_output_sink(self, sink: Callable[[int, bytes], bool] | None) -> None:
        """Push output to ``sink(channel, data)`` while the reader waits for it.

        The session's output pump sets it: while the pump is parked in
        :meth:`receive_some` with nothing queued, :meth:`deliver` offers each
        message to ``sink`` first, from the tunnel's task, and only a
        message it refuses (False: no room, the recording writer behind) is
        queued and wakes the pump.  Order is kept: nothing is offered while
        anything is queued.  ``sink`` must not block or raise.
        """
        self._sink = sink

    def park_reader(self, callback: Callable[[], None]) -> bool:
        """Let the reader leave while nothing is due; ``callback()`` when something is.

        For the session's output pump, with a sink set (see
        :meth:`set_output_sink`): while nothing is queued and the stream has
        not ended, the pump need not wait in :meth:`receive_some` at all.
        Returns False (the reader must stay) otherwise.  ``callback`` is
        called once, from whichever task queues output or changes the
        stream's state (exit, loss, close, a resume); it must not block.
        """
        if (self._sink is None or self._inbox is not None or self.closed
                or self.exit is not None or self.lost is not None):
            return False
        self._reader_cb = callback
        return True

    def park_supervisor(self, callback: Callable[[], None]) -> float | None:
        """Let the session's supervisor leave :meth:`wait_exit`; ``callback()`` on a change.

        Returns None (it must wait in :meth:`wait_exit`) when the stream has
        exited, was lost or closed already.  Otherwise ``callback`` is called
        once, from whichever task changes the stream's state (exit, loss,
        close, a resume, the agent's link going down), and the return value is
        when the supervisor must look again even if nothing called it: the
        agent's lost deadline while its link is down (this call declares the
        agent lost once it has passed), else ``math.inf``.
        """
        tunnel = self._tunnel
        tunnel.check_expired()
        if self.closed or self.exit is not None or self.lost is not None:
            return None
        self._exit_cb = callback
        deadline = tunnel.lost_deadline()
        return math.inf if deadline is None else deadline

    def _output_queued(self) -> None:
        """Output waits in the inbox: the reader's turn (called back, or unparked)."""
        self._call_reader()
        if self._lot is not None:
            self._lot.unpark_all()

    def _call_reader(self) -> None:
        callback = self._reader_cb
        if callback is not None:
            self._reader_cb = None
            callback()

    def deliver(self, channel: int, data: bytes) -> None:
        """Output from the agent (the mux accounted for it)."""
        sink = self._sink
        if (sink is not None and self._inbox is None and not self.closed
                and (self._receiving or self._reader_cb is not None) and sink(channel, data)):
            self._tunnel.consumed(self, len(data))
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        inbox.append((channel, data, len(data)))
        self._inbox_bytes += len(data)
        self._output_queued()

    def on_ack(self, offset: int) -> None:
        """The agent wrote our input up to ``offset``: free the log."""
        if offset > self.log.acked:
            self.log.ack(offset)
            if self._space_lot is not None:
                self._space_lot.unpark_all()  # send_stdin may have room now
            if self._confirmed_cb is not None:
                self._confirmed_cb()

    def on_exit(self, event: Exit) -> None:
        if self.exit is None:
            self.exit = _exit_status(event)
        self._changed()

    def on_gap(self, gap: Gap) -> None:
        """The agent's ring overflowed while the link was down: ``gap.lost`` bytes are gone."""
        self.gap_bytes += gap.lost
        log.warning("agent.stream.gap %s#%d: %d output bytes lost while the agent was away",
                    self._tunnel.pod, self.stream_id, gap.lost)
        if self.spec.tty:
            # Say so on screen, as a resumed client hears it: a terminal shows
            # text; a pipe's bytes must stay exactly the program's.
            notice = (f"\r\n[podterm: {gap.lost} bytes of output were lost while the "
                      f"pod's agent was disconnected]\r\n").encode()
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append((_STDOUT, notice, 0))
            self._inbox_bytes += len(notice)
        self._output_queued()

    def on_resume(self, start: int) -> None:
        """The agent holds our input up to ``start``: resend from there."""
        self.adopt_from = None
        if start > self.log.acked:
            self.log.ack(start)
            if self._confirmed_cb is not None:
                self._confirmed_cb()
        self.in_sent = start
        self._changed()

    def fail(self, reason: str) -> None:
        """The agent lost this stream (or stayed away too long): the session ends."""
        if self.lost is None and not self.closed:
            self.lost = reason
        self._changed()

    def hand_over(self, reason: str) -> None:
        """The agent is at another gateway now: end here (session ``moved``), tell it nothing."""
        if self.lost is None and not self.closed:
            self.lost = reason
            self.moved = True
        self._changed()

    def pending_input(self) -> int:
        return self.log.end - self.in_sent

    def open_event(self) -> Open:
        """The OPEN that starts this stream on the agent (at its current size)."""
        spec = self.spec
        cols, rows = self.size
        return Open(spec.command, spec.tty, cols, rows, tuple(spec.env.items()), spec.cwd,
                    self.window, self.session_id)

    async def _park(self, lot: trio.lowlevel.ParkingLot | None = None) -> None:
        """Wait for a change; declare the agent lost if it stays away past its deadline."""
        if lot is None:  # (not ``lot or``: an empty ParkingLot is falsy)
            lot = self._lot
            if lot is None:
                lot = self._lot = trio.lowlevel.ParkingLot()
        deadline = self._tunnel.lost_deadline()
        if deadline is None:
            await lot.park()
            return
        with trio.move_on_at(deadline):
            await lot.park()
        self._tunnel.check_expired()

    # ------------------------------------------------------------ UpstreamStream

    async def receive_some(self, max_bytes: int = 65536) -> tuple[int, bytes]:
        """The next output; ``(EOF, b"")`` after EXIT (or once the agent is lost)."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving from this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self.closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._inbox:
                    return self._take(max_bytes)
                if self.exit is not None or self.lost is not None:
                    return _EOF, b""
                await self._park()
        finally:
            self._receiving = False

    def _take(self, max_bytes: int) -> tuple[int, bytes]:
        inbox = self._inbox
        assert inbox is not None
        channel, data, counted = inbox.popleft()
        if len(data) > max_bytes:
            rest = data[max_bytes:]
            rest_counted = max(0, counted - max_bytes) if counted else 0
            inbox.appendleft((channel, rest, rest_counted))
            counted -= rest_counted
            data = data[:max_bytes]
        else:
            # Coalesce what follows on the same channel: one read per batch.
            pieces = [data]
            size = len(data)
            while inbox and inbox[0][0] == channel and size + len(inbox[0][1]) <= max_bytes:
                _, more, more_counted = inbox.popleft()
                pieces.append(more)
                size += len(more)
                counted += more_counted
            if len(pieces) > 1:
                data = b"".join(pieces)
        self._inbox_bytes -= len(data)
        if not inbox:
            self._inbox = None
        if counted:
            self._tunnel.consumed(self, counted)
        return channel, data

    def send_stdin_nowait(self, data: bytes) -> int:
        """Put what fits of ``data`` in the input log now, without waiting; return the count.

        The relay's fast path (the session hands a keystroke to the tunnel
        from the link's own task, no input pump).  0 means nothing was taken:
        the log is full, or the stream cannot take input now (another task is
        sending, stdin or the stream is closed, the process is gone); the
        caller then queues ``data`` for :meth:`send_stdin`, which waits, or
        raises the error that applies.
        """
        if (self._sending or self.closed or self._stdin_closed or self.exit is not None
                or self.lost is not None or not data):
            return 0
        n = min(len(data), self.log.space)
        if n <= 0:
            return 0
        self.log.append(memoryview(data)[:n] if n < len(data) else data)
        self._tunnel.mark_dirty(self)
        return n

    async def send_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Put every byte of ``data`` in the input log, waiting while it is full."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending to this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data).cast("B")
            while view:
                if self.closed or self._stdin_closed:
                    raise trio.ClosedResourceError("stdin was closed")
                if self.exit is not None or self.lost is not None:
                    raise trio.BrokenResourceError("the process no longer reads its input")
                space = self.log.space
                if space <= 0:
                    if self._space_lot is None:
                        self._space_lot = trio.lowlevel.ParkingLot()
                    await self._park(self._space_lot)
                    continue
                piece = view[:space]
                self.log.append(piece)
                view = view[len(piece):]
                self._tunnel.mark_dirty(self)
        finally:
            self._sending = False

    async def close_stdin(self) -> None:
        """End of input: the EOF character on a tty; see the class docstring without one."""
        if self._stdin_closed or self.closed:
            await trio.lowlevel.checkpoint()
            return
        if self.spec.tty and self.exit is None and self.lost is None:
            await self.send_stdin(b"\x04")
        else:
            await trio.lowlevel.checkpoint()
            log.debug("agent.stream.close_stdin %s#%d: the tunnel cannot end a pipe's input",
                      self._tunnel.pod, self.stream_id)
        self._stdin_closed = True

    def resize(self, cols: int, rows: int) -> None:
        """Remember the size; the writer sends it (after a resume if the link is down)."""
        if self.closed:
            raise trio.ClosedResourceError("stream was closed")
        size = (_clamp_size(cols), _clamp_size(rows))
        if size != self.size:
            self.size = size
            self._tunnel.mark_dirty(self)

    async def wait_exit(self) -> ExitStatus:
        """How the process ended.

        Raises:
            UpstreamError: the agent lost the stream (restarted, or away past
                ``lost_timeout_s``) before the stream was closed.
        """
        await trio.lowlevel.checkpoint()
        while True:
            if self.exit is not None:
                return self.exit
            if self.closed:
                self.exit = _HUNG_UP
                return self.exit
            if self.lost is not None:
                raise _moved_error(self.lost) if self.moved else UpstreamError(self.lost)
            if self._exit_lot is None:
                self._exit_lot = trio.lowlevel.ParkingLot()
            await self._park(self._exit_lot)

    def capture_context(self) -> Context:
        """What the stream was started with (the agent's shell is in another pod)."""
        return Context(cwd=self.spec.cwd, env=dict(self.spec.env))

    async def aclose(self) -> None:
        """Close the stream: the agent kills the process (now, or at the next RESUME)."""
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        tunnel = self._tunnel
        # Closed while the agent cannot hear it: the process runs on there
        # (killed at the agent's next RESUME here; a gateway shutting down
        # leaves it to the peer that adopts it).
        self.left_running = (self.exit is None and self.lost is None and not self.needs_open
                             and (not tunnel.link_up or tunnel.moved)) or self.moved
        if self.exit is None and self.lost is None:
            self.exit = _HUNG_UP
        tunnel.stream_closed(self)
        self._changed()
        await trio.lowlevel.checkpoint()


class _Connection:
    """One tunnel connection: the WebSocket, its codec, and its two tasks' scope."""

    __slots__ = ("ws", "codec", "scope", "done", "drain_reason", "hb", "replaced")

    def __init__(self, ws: WebSocketStream, codec: TunnelCodec) -> None:
        self.ws = ws
        self.codec = codec
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.drain_reason: str | None = None
        self.hb: Heartbeat | None = None
        #: A newer connection of the same pod took over (it holds the lease now).
        self.replaced = False


class _Tunnel:
    """One pod's agent: its mux and streams, across tunnel connections."""

    __slots__ = ("upstream", "pod", "info", "mux", "streams", "conn", "link_up",
                 "disconnected_at", "dirty", "acks", "ack_timer", "ack_timer_at",
                 "closes", "_writer_lot", "expired", "close_reasons", "moved")

    def __init__(self, upstream: AgentUpstream, info: AgentInfo) -> None:
        self.upstream = upstream
        self.pod = info.pod
        self.info = info
        self.mux = TunnelMux(TunnelRole.GATEWAY, default_window=upstream.options.window,
                             ack_interval_s=upstream.options.ack_interval_s)
        self.streams: dict[int, TunnelStream] = {}
        self.conn: _Connection | None = None
        self.link_up = False
        self.disconnected_at: float | None = None
        # Streams with something to send (an ordered set: dict keys).
        self.dirty: dict[int, None] = {}
        self.acks: dict[int, int] = {}  # ACKs due now
        self.ack_timer: set[int] = set()  # streams with an ACK held back by the timer
        self.ack_timer_at: float | None = None
        self.closes: dict[int, str] = {}  # CLOSEs to send
        self._writer_lot = trio.lowlevel.ParkingLot()
        self.expired = False
        #: Why announced streams are refused at the next RESUME (the hooks' verdict).
        self.close_reasons: dict[int, str] = {}
        #: Handed over to another gateway: nothing is ever sent for it again.
        self.moved = False

    def __repr__(self) -> str:
        return (f"<_Tunnel {self.pod} {'up' if self.link_up else 'down'} "
                f"streams={len(self.streams)}>")

    # ---------------------------------------------------------------- streams' calls

    def wake_writer(self) -> None:
        self._writer_lot.unpark_all()

    def mark_dirty(self, stream: TunnelStream) -> None:
        if stream.stream_id not in self.dirty:
            self.dirty[stream.stream_id] = None
            self._writer_lot.unpark_all()

    def consumed(self, stream: TunnelStream, n: int) -> None:
        """The session took ``n`` tunnel bytes of ``stream``'s output: ACK per §6."""
        sid = stream.stream_id
        if sid not in self.mux:
            return
        offset = self.mux.consumed(sid, n, trio.current_time())
        if not self.link_up:
            return  # the next RESUME says what we hold
        if offset is not None:
            self.acks[sid] = offset
            self.ack_timer.discard(sid)
            self._writer_lot.unpark_all()
        elif sid not in self.ack_timer:
            self.ack_timer.add(sid)
            if self.ack_timer_at is None:
                self.ack_timer_at = trio.current_time() + self.upstream.options.ack_interval_s
                self._writer_lot.unpark_all()

    def stream_closed(self, stream: TunnelStream) -> None:
        """The session closed ``stream``: CLOSE it now, or leave it out of the next RESUME."""
        sid = stream.stream_id
        if self.streams.get(sid) is stream:
            del self.streams[sid]
        self.dirty.pop(sid, None)
        if self.moved:
            pass  # the agent is another gateway's now: it must not hear of this
        elif sid in self.mux and not self.mux.stream_statistics(sid).local_closed:
            if stream.needs_open:
                # Its OPEN never left: the agent does not know the id.  Close it
                # on our side only (ids are never reused, so skipping one is fine).
                self.mux.sent(sid, Close("never opened"))
            elif self.link_up:
                self.closes[sid] = "closed"
                self._writer_lot.unpark_all()
        self.upstream._forget_if_idle(self)

    def lost_deadline(self) -> float | None:
        if self.link_up or self.disconnected_at is None:
            return None
        return self.disconnected_at + self.upstream.options.lost_timeout_s

    def check_expired(self) -> None:
        deadline = self.lost_deadline()
        if deadline is not None and trio.current_time() >= deadline and not self.expired:
            self.upstream._expire(self, f"the agent of pod {self.pod} has been away for more "
                                        f"than {self.upstream.options.lost_timeout_s:g} s")

    # ------------------------------------------------------------------ connecting

    def start(self, conn: _Connection, theirs: Resume) -> list[tuple[bytes, bytes]]:
        """Apply the agent's RESUME; return our first messages (RESUME, then CLOSEs).

        Streams we hold that the agent did not list are lost (it restarted).

        Raises:
            ProtocolViolation: the agent's offsets contradict ours.
        """
        mux = self.mux
        mux.disconnected()
        listed = {e.stream_id for e in theirs.streams}
        for sid in [sid for sid in self.streams if sid not in listed]:
            stream = self.streams.pop(sid)
            stream.fail(f"the agent of pod {self.pod} no longer has this shell "
                        "(the agent or its container restarted)")
            self.upstream._counters.streams_lost += 1
        entries: list[ResumeEntry] = []
        for sid, stream in self.streams.items():
            if stream.adopt_from is not None:
                # Adopted: our input starts where the agent's does; we want its
                # output from what the client is known to hold.
                entries.append(ResumeEntry(sid, stream.window, stream.log.acked, stream.log.end,
                                           stream.adopt_from))
                continue
            if sid not in mux:
                continue
            received = mux.stream_statistics(sid).received
            entries.append(ResumeEntry(sid, stream.window, stream.log.acked, stream.log.end,
                                       received))
        for sid in [sid for sid, s in self.streams.items()
                    if sid not in mux and s.adopt_from is None]:
            # Opened while disconnected, never announced: the agent cannot have it.
            self.streams.pop(sid).fail(f"the agent of pod {self.pod} never received this shell")
        ours = mux.make_resume(entries)
        try:
            plans = mux.apply_resume(theirs)
        except LocalProtocolError as exc:
            raise ProtocolViolation(f"RESUME does not match: {exc.message}") from exc
        self.dirty.clear()
        self.acks.clear()
        self.ack_timer.clear()
        self.ack_timer_at = None
        self.closes.clear()
        codec = conn.codec
        out = [codec.encode(0, ours)]
        reasons, self.close_reasons = self.close_reasons, {}
        for plan in plans:
            wanted = self.streams.get(plan.stream_id)
            if plan.action is ResumeAction.CLOSE or wanted is None:
                close = Close(reasons.get(plan.stream_id, "not wanted"))
                out.append(codec.encode(plan.stream_id, close))
                mux.sent(plan.stream_id, close)
                self.upstream._counters.streams_refused += 1
                log.info("agent.stream.refused %s#%d: %s", self.pod, plan.stream_id,
                         close.reason)
                continue
            assert plan.replay is not None
            if plan.replay.gap_from is not None:
                # Our input log never drops unacknowledged bytes: the agent
                # claims to hold less than it acknowledged.
                raise ProtocolViolation(f"stream {plan.stream_id}: the agent forgot input it "
                                        "had acknowledged")
            stream = wanted
            stream.on_resume(plan.replay.start)
            self.upstream._counters.streams_resumed += 1
            # Input typed and sizes set while the link was down go out now.
            if stream.pending_input() or stream.size != stream.size_sent:
                self.dirty[plan.stream_id] = None
        return [(prefix, bytes(payload)) for prefix, payload in out]

    def set_link(self, up: bool) -> None:
        self.link_up = up
        if not up:
            self.disconnected_at = trio.current_time()
            self.mux.disconnected()
        for stream in self.streams.values():
            stream.wake()
        self._writer_lot.unpark_all()

    # ----------------------------------------------------------------- receiving

    def dispatch(self, sid: int, event: Event) -> None:
        """Apply one decoded message from the agent.  Never blocks.

        Raises:
            ProtocolViolation: the agent broke §8 (credit, a bad ACK, ...).
        """
        if sid == 0:
            if isinstance(event, ErrorMsg):
                log.warning("agent.tunnel.error %s: %s %s", self.pod, event.code, event.message)
            return
        mux = self.mux
        if not mux.received(sid, event):
            return  # in flight when we closed the stream
        stream = self.streams.get(sid)
        kind = type(event)
        if kind is Stdout or kind is Stderr:
            data = event.data  # type: ignore[union-attr]
            if stream is not None:
                stream.deliver(_STDOUT if kind is Stdout else _STDERR, data)
            else:
                mux.consumed(sid, len(data), trio.current_time())
        elif kind is Ack:
            if stream is not None:
                stream.on_ack(event.offset)  # type: ignore[union-attr]
                if stream.pending_input():
                    self.mark_dirty(stream)
        elif kind is Exit:
            if stream is not None:
                stream.on_exit(event)  # type: ignore[arg-type]
        elif kind is Gap:
            self.upstream._counters.gap_bytes += event.lost  # type: ignore[union-attr]
            if stream is not None:
                stream.on_gap(event)  # type: ignore[arg-type]
        elif kind is Close:
            if stream is not None:
                del self.streams[sid]
                self.dirty.pop(sid, None)
                if stream.exit is None:
                    stream.fail(f"the agent of pod {self.pod} closed the stream: "
                                f"{event.reason}")  # type: ignore[union-attr]
                    self.upstream._counters.streams_lost += 1
                stream.wake()
            if sid in mux:  # we had not closed it: answer
                self.closes[sid] = "closed"
                self._writer_lot.unpark_all()
        elif kind is ErrorMsg:
            if stream is not None:
                stream.agent_error = event.message  # type: ignore[union-attr]
            log.info("agent.stream.error %s#%d: %s %s", self.pod, sid,
                     event.code, event.message)  # type: ignore[union-attr]

    # ------------------------------------------------------------------- sending

    def collect(self, conn: _Connection, parts: list[bytes]) -> None:
        """Append every message due now to ``parts`` (encoded WebSocket frames)."""
        if self.moved:
            return  # handed over: the agent is another gateway's
        mux = self.mux
        codec = conn.codec
        send_binary = conn.ws.conn.send_binary

        def put(sid: int, event: Event) -> None:
            prefix, payload = codec.encode(sid, event)
            parts.append(send_binary(payload, prefix))

        if self.closes:
            for sid, reason in self.closes.items():
                if sid in mux and not mux.stream_statistics(sid).local_closed:
                    close = Close(reason)
                    put(sid, close)
                    mux.sent(sid, close)
            self.closes.clear()
        if self.dirty:
            pending: dict[int, int] = {}
            for sid in list(self.dirty):
                stream = self.streams.get(sid)
                if stream is None or stream.closed:
                    del self.dirty[sid]
                    continue
                if stream.needs_open:
                    stream.needs_open = False
                    put(sid, stream.open_event())
                    stream.size_sent = stream.size
                if stream.size != stream.size_sent:
                    stream.size_sent = stream.size
                    put(sid, Resize(*stream.size))
                n = stream.pending_input()
                if n:
                    pending[sid] = n
                else:
                    del self.dirty[sid]
            size = 0
            while pending and size < _MAX_BATCH_BYTES:
                plan = mux.plan_sends(pending, quantum=_STDIN_QUANTUM)
                if not plan:
                    break
                for sid, n in plan:
                    stream = self.streams[sid]
                    data = stream.log.read(stream.in_sent, n)
                    event = Stdin(data)
                    put(sid, event)
                    mux.sent(sid, event)
                    stream.in_sent += n
                    size += n
                    pending[sid] -= n
                    if not pending[sid]:
                        del pending[sid]
            for sid in list(self.dirty):
                # Still dirty only if it has input *and* credit; an ACK re-marks it.
                if sid not in pending or mux.credit(sid) == 0:
                    del self.dirty[sid]
        now = trio.current_time()
        if self.ack_timer_at is not None and now >= self.ack_timer_at:
            self.acks.update(mux.poll_acks_of(self.ack_timer, now))
            self.ack_timer_at = (now + self.upstream.options.ack_interval_s
                                 if self.ack_timer else None)
        if self.acks:
            for sid, offset in self.acks.items():
                if sid in mux:
                    put(sid, Ack(offset))
            self.acks.clear()

    def next_deadline(self) -> float:
        return self.ack_timer_at if self.ack_timer_at is not None else float("inf")

    async def wait_woken(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._writer_lot.park()


class AgentUpstream:
    """Agents' tunnels by pod identity, and the :class:`Upstream` that opens streams over them.

    Args:
        options: bounds and timers.

    See the module docstring.  The gateway registers it under upstream kind
    ``"agent"`` and routes :data:`AGENTS_PATH` to :meth:`serve_tunnel`
    (through :mod:`podterm.gateway.agents`).  :attr:`hooks` (set by the
    gateway when its session store is shared) leases agents and adopts
    streams of other gateways; without them a stream this process did not
    open is CLOSEd.
    """

    def __init__(self, options: AgentUpstreamOptions | None = None) -> None:
        self.options = options or AgentUpstreamOptions()
        self._tunnels: dict[PodIdentity, _Tunnel] = {}
        self._changed = trio.lowlevel.ParkingLot()
        self._counters = _Counters()
        self.draining: str | None = None
        self.hooks: TunnelHooks | None = None
        #: Connections of each pod between their RESUME and their start (a
        #: connection that ends meanwhile must not release the newer one's lease).
        self._arriving: dict[PodIdentity, int] = {}

    def __repr__(self) -> str:
        up = sum(1 for t in self._tunnels.values() if t.link_up)
        return f"<AgentUpstream agents={up}/{len(self._tunnels)}>"

    # ----------------------------------------------------------------- queries

    def agents(self) -> list[AgentInfo]:
        """Agents whose tunnel is up now."""
        return [t.info for t in self._tunnels.values() if t.link_up]

    def is_connected(self, pod: PodIdentity) -> bool:
        tunnel = self._tunnels.get(pod)
        return tunnel is not None and tunnel.link_up

    async def wait_connected(self, pod: PodIdentity, connections: int = 1) -> AgentInfo:
        """Wait until ``pod``'s agent is connected, after at least ``connections``
        tunnel connections in total (tests; the caller bounds the wait)."""
        await trio.lowlevel.checkpoint()
        while True:
            tunnel = self._tunnels.get(pod)
            if (tunnel is not None and tunnel.link_up
                    and self._counters.connections >= connections):
                return tunnel.info
            await self._changed.park()

    async def wait_disconnected(self, pod: PodIdentity) -> None:
        """Wait until ``pod``'s agent has no live tunnel (the caller bounds the wait)."""
        await trio.lowlevel.checkpoint()
        while self.is_connected(pod):
            await self._changed.park()

    def statistics(self) -> AgentUpstreamStatistics:
        c = self._counters
        return AgentUpstreamStatistics(
            agents_connected=sum(1 for t in self._tunnels.values() if t.link_up),
            agents_known=len(self._tunnels),
            streams=sum(len(t.streams) for t in self._tunnels.values()),
            connections=c.connections, takeovers=c.takeovers, streams_resumed=c.streams_resumed,
            streams_lost=c.streams_lost, gap_bytes=c.gap_bytes,
            heartbeat_failures=c.heartbeat_failures,
            agents=tuple(t.info for t in self._tunnels.values()),
            streams_adopted=c.streams_adopted, streams_refused=c.streams_refused,
            streams_moved=c.streams_moved, connections_refused=c.connections_refused)

    def knows(self, pod: PodIdentity) -> bool:
        """Whether this process holds state (a tunnel, up or away) for ``pod``'s agent."""
        return pod in self._tunnels

    def tunnel_states(self) -> list[tuple[AgentInfo, bool]]:
        """Every agent this process holds state for, and whether its link is up (the lease ticker)."""
        return [(t.info, t.link_up) for t in self._tunnels.values()]

    def metric_families(self) -> list[MetricFamily]:
        """``/metrics`` families of the agent tunnels."""
        st = self.statistics()
        return [
            gauge("podterm_agents_connected", "Agents whose tunnel is up on this gateway.",
                  st.agents_connected),
            gauge("podterm_agents_known", "Agents this gateway holds streams for (up or away).",
                  st.agents_known),
            gauge("podterm_agent_streams", "Streams over agent tunnels.", st.streams),
            counter("podterm_agent_connections_total",
                    "Agent tunnel connections accepted (RESUME exchanged).", st.connections),
            counter("podterm_agent_connections_refused_total",
                    "Agent connections asked to retry (store down, stale state).",
                    st.connections_refused),
            counter("podterm_agent_streams_resumed_total", "Streams resumed after a reconnect.",
                    st.streams_resumed),
            counter("podterm_agent_streams_adopted_total",
                    "Streams of another gateway adopted here.", st.streams_adopted),
            counter("podterm_agent_streams_moved_total",
                    "Streams handed over to the gateway that holds their agent now.",
                    st.streams_moved),
            counter("podterm_agent_streams_refused_total",
                    "Announced streams no session claimed (closed on the agent).",
                    st.streams_refused),
            counter("podterm_agent_streams_lost_total",
                    "Streams whose agent forgot them or stayed away too long.", st.streams_lost),
            counter("podterm_agent_gap_bytes_total",
                    "Output bytes agents reported lost (their ring overflowed).", st.gap_bytes),
            counter("podterm_agent_heartbeat_failures_total",
                    "Agent links found dead by heartbeats or stuck writes.",
                    st.heartbeat_failures),
        ]

    # ---------------------------------------------------------------- Upstream

    async def open(self, spec: StreamSpec) -> TunnelStream:
        """Open a stream on the agent of ``spec.namespace/spec.pod``.

        Waits up to ``reconnect_wait_s`` for an agent that is reconnecting.

        Raises:
            UpstreamError: no agent is registered for the pod, it did not come
                back in time, it does not report ``spec.container``, or it is
                at its stream capacity.
        """
        pod = PodIdentity(spec.namespace or "default", spec.pod or "-")
        await trio.lowlevel.checkpoint()
        tunnel = self._tunnels.get(pod)
        if tunnel is None:
            raise UpstreamError(f"no agent is registered for pod {pod}: is the podterm agent "
                                "sidecar running in it, with a gateway URL pointing here?")
        if not tunnel.link_up:
            with trio.move_on_after(self.options.reconnect_wait_s):
                while not tunnel.link_up and self._tunnels.get(pod) is tunnel:
                    await self._changed.park()
            if not tunnel.link_up or self._tunnels.get(pod) is not tunnel:
                raise UpstreamError(f"the agent of pod {pod} is not connected (it is "
                                    "reconnecting, or gone); retry shortly")
        info = tunnel.info
        if spec.container and info.containers and spec.container not in info.containers:
            raise UpstreamError(f"the agent of pod {pod} serves container(s) "
                                f"{', '.join(info.containers)}, not {spec.container!r}")
        if info.capacity and len(tunnel.streams) >= info.capacity:
            raise UpstreamError(f"the agent of pod {pod} runs its maximum of "
                                f"{info.capacity} shells")
        window = self.options.window
        sid = tunnel.mux.next_id
        stream = TunnelStream(sid, spec, window, tunnel, session_id=_SESSION_ID.get())
        try:
            _CHECK_CODEC.encode(sid, stream.open_event())  # refuse what the agent would
        except LocalProtocolError as exc:
            raise UpstreamError(f"cannot start this on an agent: {exc.message}") from exc
        tunnel.mux.open_stream(sid, window=window)
        tunnel.streams[sid] = stream
        tunnel.mark_dirty(stream)  # the writer sends OPEN
        log.debug("agent.stream.open %s#%d", pod, sid)
        return stream

    # ------------------------------------------------------------------ tunnels

    async def serve_tunnel(self, ws: WebSocketStream, info: AgentInfo) -> None:
        """Run one agent connection until it ends.  Owns ``ws`` (closed on return).

        Reads the agent's RESUME (bounded by ``resume_timeout_s``), takes
        over from a live connection of the same pod, answers with our RESUME,
        then relays until the link ends, the agent is replaced, or a drain.
        """
        codec = TunnelCodec(TunnelRole.GATEWAY)
        try:
            try:
                with trio.fail_after(self.options.resume_timeout_s):
                    theirs, early = await _read_resume(ws, codec)
            except trio.TooSlowError:
                log.info("agent.tunnel.failed %s: no RESUME within %g s", info.pod,
                         self.options.resume_timeout_s)
                await ws.aclose(CloseCode.POLICY_VIOLATION, "RESUME expected first")
                return
            except ProtocolViolation as exc:
                log.info("agent.tunnel.failed %s: %s", info.pod, exc.message)
                await ws.aclose(int(exc.close_code), exc.message[:100])
                return
            except ConnectionClosed:
                return
            if self.draining is not None:
                await _send_drain(ws, codec, self.draining)
                return
            pod = info.pod
            self._arriving[pod] = self._arriving.get(pod, 0) + 1
            verdict = ConnectVerdict()
            handed = False
            try:
                if self.hooks is not None:
                    try:
                        verdict = await self._consult(self.hooks, info, theirs)
                    except PodtermError as exc:
                        self._counters.connections_refused += 1
                        log.warning("agent.tunnel.refused %s: %s; the agent retries", pod,
                                    exc.message)
                        await _refuse(ws, codec, "unavailable", exc.message)
                        return
                    if verdict.stale is not None:
                        # Our streams of this agent are stale: another gateway has held
                        # them since.  Hand them over, and have the agent come back, so
                        # every stream is claimed afresh from the store.
                        self.moved_away(pod, verdict.stale)
                        self._counters.connections_refused += 1
                        await _refuse(ws, codec, "unavailable",
                                      "this gateway's state of the agent was stale; reconnect")
                        return
                while True:
                    tunnel = self._tunnels.get(pod)
                    if tunnel is None:
                        tunnel = self._tunnels[pod] = _Tunnel(self, info)
                    old = tunnel.conn
                    if old is None:
                        break  # no await from here to tunnel.conn = ours: no race
                    # The newest connection wins: the old one may be half-open (the
                    # agent saw it die first), or a second agent claims the pod.
                    if tunnel.info.agent_id != info.agent_id:
                        log.warning("agent.tunnel.takeover %s: agent %s replaces agent %s",
                                    pod, info.agent_id, tunnel.info.agent_id)
                    self._counters.takeovers += 1
                    old.replaced = True  # its end must not release the lease we hold now
                    old.scope.cancel()
                    with trio.move_on_after(self.options.close_timeout_s):
                        await old.done.wait()
                handed = True
            finally:
                left = self._arriving[pod] - 1
                if left:
                    self._arriving[pod] = left
                else:
                    del self._arriving[pod]
                if not handed and self.hooks is not None:
                    for claim in verdict.claims.values():
                        self.hooks.unclaimed(info, claim)
            tunnel.info = info
            tunnel.expired = False
            conn = _Connection(ws, codec)
            # No await between the count going down and tunnel.conn = conn.
            await self._run_connection(tunnel, conn, theirs, early, verdict)
        finally:
            with trio.CancelScope(shield=True):
                await ws.abort(CloseCode.GOING_AWAY, "")

    async def _consult(self, hooks: TunnelHooks, info: AgentInfo,
                       theirs: Resume) -> ConnectVerdict:
        """Ask the hooks about a new connection; keep only claims that fit the RESUME.

        Raises:
            Unavailable: the hooks cannot decide now, or did not answer in time.
        """
        tunnel = self._tunnels.get(info.pod)
        known = set(tunnel.streams) if tunnel is not None else set()
        announced = [AnnouncedStream(e.stream_id, e.window, e.out_start, e.out_offset,
                                     e.in_acked, e.session, e.stream_id in known)
                     for e in theirs.streams]
        try:
            with trio.fail_after(self.options.claim_timeout_s):
                verdict = await hooks.connected(info, announced)
        except trio.TooSlowError:
            raise Unavailable("the session store did not answer in time; retry") from None
        entries = {a.stream_id: a for a in announced}
        claims: dict[int, StreamClaim] = {}
        for sid, claim in verdict.claims.items():
            a = entries.get(sid)
            if (a is None or a.known or claim.stream_id != sid
                    or not a.out_start <= claim.out_from <= a.out_offset):
                log.error("agent.stream.claim.invalid %s#%d: %r", info.pod, sid, claim)
                hooks.unclaimed(info, claim)
                continue
            claims[sid] = claim
        return ConnectVerdict(claims=claims, closes=verdict.closes, stale=verdict.stale)

    async def _run_connection(self, tunnel: _Tunnel, conn: _Connection, theirs: Resume,
                              early: list[tuple[int, Event]],
                              verdict: ConnectVerdict | None = None) -> None:
        ws = conn.ws
        tunnel.conn = conn
        # Claimed streams join before the RESUME answer, which lists them.
        adopted: list[tuple[StreamClaim, TunnelStream]] = []
        if verdict is not None:
            entries = {e.stream_id: e for e in theirs.streams}
            for sid, claim in verdict.claims.items():
                entry = entries.get(sid)
                if entry is None or sid in tunnel.streams:
                    if self.hooks is not None:
                        self.hooks.unclaimed(tunnel.info, claim)
                    continue
                stream = TunnelStream(sid, claim.spec, entry.window, tunnel,
                                      session_id=claim.record.id, in_offset=entry.in_acked,
                                      adopt_from=claim.out_from)
                tunnel.streams[sid] = stream
                adopted.append((claim, stream))
            tunnel.close_reasons = dict(verdict.closes)
        try:
            with conn.scope:
                try:
                    first = tunnel.start(conn, theirs)
                    for sid, event in early:
                        tunnel.dispatch(sid, event)
                except ProtocolViolation as exc:
                    log.warning("agent.tunnel.failed %s: %s", tunnel.pod, exc.message)
                    await ws.aclose(int(exc.close_code), exc.message[:100])
                    return
                if ws.conn.state is not WsState.OPEN:
                    return  # the agent left before our RESUME
                send_binary = ws.conn.send_binary
                await ws.send_raw(b"".join(send_binary(p, prefix) for prefix, p in first))
                self._counters.connections += 1
                tunnel.set_link(True)
                self._changed.unpark_all()
                log.info("agent.tunnel.complete %s agent=%s user=%s streams=%d adopted=%d",
                         tunnel.pod, tunnel.info.agent_id, tunnel.info.user,
                         len(tunnel.streams), len(adopted))
                if self.hooks is not None:
                    for claim, stream in adopted:
                        if tunnel.streams.get(stream.stream_id) is stream:
                            self._counters.streams_adopted += 1
                            self.hooks.adopt(tunnel.info, claim, stream)
                adopted = []  # the hooks own them now
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_loop, tunnel, conn, nursery.cancel_scope)
                    await self._send_loop(tunnel, conn)
                    nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            for claim, stream in adopted:
                # Claimed but never adopted (the connection failed first): the next
                # connection claims it again.
                if tunnel.streams.get(stream.stream_id) is stream:
                    del tunnel.streams[stream.stream_id]
                if self.hooks is not None:
                    self.hooks.unclaimed(tunnel.info, claim)
            current = tunnel.conn is conn
            if current:
                tunnel.conn = None
                if tunnel.link_up:
                    tunnel.set_link(False)
                    log.info("agent.tunnel.lost %s: %d streams paused", tunnel.pod,
                             len(tunnel.streams))
            if (current and self.hooks is not None and not conn.replaced and not tunnel.moved
                    and not self._arriving.get(tunnel.pod) and _closed_cleanly(ws)):
                # The agent left (or was drained away): its lease is released, so
                # nobody forwards to us for it until it comes back somewhere.  A
                # link that died keeps it until it expires: the agent may well
                # come straight back, and a peer it reaches instead overwrites it.
                with trio.CancelScope(shield=True), \
                        trio.move_on_after(self.options.close_timeout_s):
                    await self.hooks.disconnected(tunnel.info)
            conn.done.set()
            self._changed.unpark_all()
            self._forget_if_idle(tunnel)

    def let_go(self, stream: TunnelStream, reason: str) -> None:
        """Stop serving ``stream`` here without a word to the agent (an adoption that
        failed): the agent keeps the process, and its next RESUME announces it again."""
        tunnel = stream._tunnel  # noqa: SLF001 - the upstream owns its streams' tunnels
        if tunnel.streams.get(stream.stream_id) is stream:
            del tunnel.streams[stream.stream_id]
            tunnel.dirty.pop(stream.stream_id, None)
        stream.hand_over(reason)

    def moved_away(self, pod: PodIdentity, reason: str) -> int:
        """The agent of ``pod`` is another gateway's now: drop our state of it.

        Its connection here (half-open, or stale) is cancelled and its streams
        are handed over: their sessions end ``moved`` here, their clients are
        told to reconnect (and reach the session's new gateway), and the agent
        hears nothing (a CLOSE would kill a shell another gateway serves).

        Returns:
            How many streams were handed over.
        """
        tunnel = self._tunnels.pop(pod, None)
        if tunnel is None:
            return 0
        tunnel.moved = True
        streams = list(tunnel.streams.values())
        log.warning("agent.tunnel.moved %s: %s; %d streams handed over", pod, reason,
                    len(streams))
        conn = tunnel.conn
        if conn is not None:
            conn.replaced = True
            conn.scope.cancel()
        tunnel.streams.clear()
        tunnel.closes.clear()
        tunnel.dirty.clear()
        tunnel.acks.clear()
        for stream in streams:
            stream.hand_over(reason)
        self._counters.streams_moved += len(streams)
        tunnel.wake_writer()
        self._changed.unpark_all()
        return len(streams)

    async def _receive_loop(self, tunnel: _Tunnel, conn: _Connection,
                            scope: trio.CancelScope) -> None:
        ws = conn.ws
        decode = conn.codec.receive_message
        dispatch = tunnel.dispatch
        try:
            while True:
                batch = await ws.receive_batch()
                for opcode, payload in batch:
                    for sid, event in decode(opcode, payload):
                        dispatch(sid, event)
        except ProtocolViolation as exc:
            log.warning("agent.tunnel.failed %s: %s", tunnel.pod, exc.message)
            with trio.CancelScope(shield=True):
                await ws.abort(int(exc.close_code), exc.message[:100])
        except ConnectionClosed:
            pass
        scope.cancel()

    async def _send_loop(self, tunnel: _Tunnel, conn: _Connection) -> None:
        ws = conn.ws
        options = self.options
        hb = Heartbeat(options.heartbeat_interval_s, max_missed=options.heartbeat_max_missed,
                       now=trio.current_time())
        conn.hb = hb
        ws.heartbeat = hb
        stall_s = options.heartbeat_interval_s * options.heartbeat_max_missed
        while True:
            if ws.conn.state is not WsState.OPEN:
                # Closing (the agent's CLOSE, or its end, was read while we
                # waited): nothing more may be sent; the reader ends the link.
                return
            parts: list[bytes] = []
            tunnel.collect(conn, parts)
            now = trio.current_time()
            if now >= hb.deadline:
                ping = hb.poll(now)
                if hb.is_dead:
                    self._counters.heartbeat_failures += 1
                    log.info("agent.tunnel.dead %s: no pong to %d pings", tunnel.pod,
                             hb.max_missed)
                    await ws.abort(CloseCode.INTERNAL_ERROR, "heartbeat lost")
                    return
                if ping is not None:
                    parts.append(ws.conn.send_ping(ping))
            if conn.drain_reason is not None:
                prefix, payload = conn.codec.encode(0, Drain(conn.drain_reason))
                parts.append(ws.conn.send_binary(payload, prefix))
            if parts:
                with trio.move_on_after(stall_s) as stalled:
                    try:
                        await ws.send_raw(parts[0] if len(parts) == 1 else b"".join(parts))
                    except ConnectionClosed:
                        return
                if stalled.cancelled_caught:
                    self._counters.heartbeat_failures += 1
                    log.info("agent.tunnel.dead %s: the agent stopped reading", tunnel.pod)
                    await ws.abort(CloseCode.INTERNAL_ERROR, "peer stopped reading")
                    return
                if conn.drain_reason is not None:
                    await ws.aclose(CloseCode.GOING_AWAY, "gateway draining: reconnect")
                    return
                continue
            await tunnel.wait_woken(min(hb.deadline, tunnel.next_deadline()))

    def _forget_if_idle(self, tunnel: _Tunnel) -> None:
        """Drop a disconnected tunnel that holds no stream (nothing to resume)."""
        if tunnel.conn is None and not tunnel.streams and self._tunnels.get(tunnel.pod) is tunnel:
            del self._tunnels[tunnel.pod]
            self._changed.unpark_all()

    def _expire(self, tunnel: _Tunnel, reason: str) -> None:
        """The agent stayed away too long: its streams end, its registration goes."""
        tunnel.expired = True
        log.warning("agent.tunnel.expired %s: %s; %d streams end", tunnel.pod, reason,
                    len(tunnel.streams))
        for stream in tunnel.streams.values():
            stream.fail(reason)
            self._counters.streams_lost += 1
        tunnel.streams.clear()
        if self._tunnels.get(tunnel.pod) is tunnel and tunnel.conn is None:
            del self._tunnels[tunnel.pod]
        self._changed.unpark_all()

    async def drain(self, reason: str = "gateway shutting down") -> None:
        """Tell every agent to reconnect elsewhere now (CONTROL ``drain``, close 1001).

        New agent connections are refused from now on.  Streams pause (their
        agents keep the shells); the caller bounds the wait.
        """
        self.draining = reason
        conns = [t.conn for t in self._tunnels.values() if t.conn is not None]
        for conn in conns:
            conn.drain_reason = reason
        for tunnel in self._tunnels.values():
            tunnel.wake_writer()
        for conn in conns:
            await conn.done.wait()


async def _read_resume(ws: WebSocketStream, codec: TunnelCodec
                       ) -> tuple[Resume, list[tuple[int, Event]]]:
    """Read until the agent's RESUME; return it and what followed it in the same read."""
    while True:
        batch = await ws.receive_batch()
        events: list[tuple[int, Event]] = []
        for opcode, payload in batch:
            events.extend(codec.receive_message(opcode, payload))
        for i, (_, event) in enumerate(events):
            if isinstance(event, Resume):
                return event, events[i + 1:]
            if isinstance(event, ErrorMsg):
                log.info("agent.tunnel.error before RESUME: %s %s", event.code, event.message)


def _closed_cleanly(ws: WebSocketStream) -> bool:
    """Whether the link ended with a close handshake meaning "going away" (not a dead link)."""
    closed = ws.closed
    return closed is not None and closed.code in (CloseCode.NORMAL, CloseCode.GOING_AWAY)


async def _refuse(ws: WebSocketStream, codec: TunnelCodec, code: str, message: str) -> None:
    """Refuse a connection after the agent's RESUME: CONTROL ``error``, then close 1013.

    1013 "try again later": the agent reconnects with backoff; its shells go on.
    """
    prefix, payload = codec.encode(0, ErrorMsg(code, message))
    try:
        await ws.send_binary(payload, prefix)
    except ConnectionClosed:
        pass
    await ws.aclose(CloseCode.TRY_AGAIN_LATER, message[:100])


async def _send_drain(ws: WebSocketStream, codec: TunnelCodec, reason: str) -> None:
    """Refuse a connection during a drain: CONTROL ``drain``, then close 1001."""
    prefix, payload = codec.encode(0, Drain(reason))
    try:
        await ws.send_binary(payload, prefix)
    except ConnectionClosed:
        pass
    await ws.aclose(CloseCode.GOING_AWAY, "gateway draining: reconnect")
