"""A session: one upstream process and everything that lets it outlive its clients.

A :class:`Session` owns its upstream stream, an :class:`~podterm.session.ring.OutputRing`
of output numbered by absolute offset, the output offset its writer has
ACKed (kept across detaches), the input offset it has accepted and the one it
has written, its attachments (one ``rw`` writer, any number of ``ro``
viewers) and its timers (grace, idle, max age).  It runs in the registry's
nursery, not in a connection's: a client leaving never ends it.

States and legal moves
----------------------

==========  ==================================================  ===========================
state       means                                               moves to
==========  ==================================================  ===========================
pending     created, its task not yet started                   running, closed
running     process alive; a writer is attached (or none has    detached, exited, closed
            attached yet: a fresh session is not "detached")
detached    process alive; its writer left; grace runs          running, exited, closed
exited      process gone, all its output in the ring; EXIT      closed
            goes to every link after the last byte
closed      upstream closed, attachments told (EXIT + close)    —
==========  ==================================================  ===========================

``running → closed`` and ``detached → closed`` happen on DELETE (``killed``),
grace expiry with no writer (``grace``), the idle timeout (``idle``), the max
age (``max_age``) and gateway shutdown (``shutdown``).  ``exited → closed``
happens once the writer has received EXIT (it answered our CLOSE after it),
or on grace expiry, DELETE or shutdown.

Flow control (exactly-once output)
----------------------------------
The output pump reads the upstream only while ``ring.end - writer_acked <
window``, writer attached or not, and the window is smaller than the ring.
So no byte leaves the ring before the writer has ACKed it: while nobody
reads, the process blocks on its terminal instead of losing output.  Viewers
never hold the pump back; one that falls a full ring behind gets ``gap``.

Input (exactly-once input)
--------------------------
STDIN from the writer is *accepted* into a bounded session buffer
(``in_offset`` counts accepted bytes; ``hello.in_acked`` reports it) and
*written* to the upstream by the session's input pump (``in_written``, which
the server's input ACKs carry).  Each link knows the offset of every byte it
receives (``in_cursor``, starting at ``in_acked``), so a byte re-sent after a
reconnect is recognised and dropped: nothing is typed twice.  Because the
buffer belongs to the session, a takeover or disconnect can never leave an
input byte half-written.

An upstream that confirms input (:class:`ConfirmsInput`: the agent tunnel,
whose agent ACKs what it wrote to the shell) moves ``in_written`` only as far
as it confirmed, and ``hello.in_acked`` says the same: a client then keeps
every byte this gateway merely passed on, so if the gateway dies, the one
that adopts the session gets those bytes re-sent, and drops exactly the ones
the shell already had (its input offset is the agent's).

Adopted sessions
----------------
A session whose gateway died can be re-created by another one
(:meth:`Session.resume_at`, before it runs): same id, owner and spec, its
output ring starting at the offset its client is known to hold, its input
offset the upstream's, and its resume token known only by its hash.  It
starts *detached*; until its output reaches what the upstream had produced
when it was adopted (``catch_up_to``) it reads the upstream without waiting
for ACKs (the ring holds all of it) and an attach beyond what it has is
"unavailable, retry" rather than ``bad_offset``.

An upstream that fails with close code 1001 (:class:`UpstreamError`) has
*moved*: another gateway serves the shell now.  The session then ends
``moved``: its clients get ``drain`` and close 1001 (reconnect: they reach
the new gateway), and the store record is left alone (it is the new
gateway's).

Tasks: the session runs three — the supervisor (process exit and the timers),
the output pump and the input pump — in the registry's nursery, each only
while it has something to do.  The pumps start when output or input waits for
them (an upstream that pushes its output, the agent's, needs no output pump
while it is idle).  The supervisor leaves its task while its upstream can call
it back (``park_supervisor``, the agent's streams): then the process's
:class:`~podterm.session.attachment.DeadlineTimer` holds its next timer, and
the upstream's change (exit, loss), a kill or that timer starts it again.  An
idle attached agent session costs no task of its own.  A pump's error ends the
session as a supervisor's would (the supervisor raises it); the session's end
cancels its pumps and waits for them before it closes the upstream.

Lost upstreams: the shell is restored
-------------------------------------
An upstream stream whose ``wait_exit`` raises :class:`~podterm.errors.UpstreamError`
did not exit: its connection was lost (the kube upstream's apiserver link
dropped past its retries).  For a tty session on an upstream kind listed in
``SessionLimits.restore_upstreams`` (default: ``kube``; empty = off) and with
a ``reopen`` callable, the session does not end:

1. it reads the old stream's output to its end (flow control and timers as
   for an exit), closes the stream, and records its context (the cwd the
   shell last reported with OSC 7, or ``/proc/<pid>/cwd`` for local streams,
   and the env it was started with: :meth:`UpstreamStream.capture_context`);
2. it writes a line saying so to the output, and waits -- under the grace,
   idle and max-age timers -- for the writer's next input or a new ``rw``
   attach (whose ``hello.notices`` says the shell will be restarted);
3. it opens a new stream on the same upstream and target, in that
   directory with that environment (:func:`~podterm.session.context.restore_spec`),
   writes ``[podterm] shell restarted in DIR after the connection to the pod
   was lost``, and goes on: the input that triggered it goes to the new
   shell, offsets continue, clients notice nothing else.  The next ``rw``
   ``hello`` carries the same sentence in ``notices``.

If the new stream cannot be opened, a line says why, the input is dropped,
and the next input tries again.  Non-tty sessions (a command's output would
be incomplete and re-running it could repeat its effects) and other upstream
kinds end ``upstream_failed`` as before.
"""

from __future__ import annotations

import enum
import functools
import hmac
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import trio

from podterm.errors import (
    BadRequestError,
    CloseCode,
    ConflictError,
    GoneError,
    PodtermError,
    Unavailable,
    UpstreamError,
)
from podterm.metrics import GatewayCounters
from podterm.protocol.events import Drain, Hello
from podterm.protocol.events import Gap as GapNotice
from podterm.recording.recorder import Recorder, RecordingFailed
from podterm.session.attachment import Attachment, Mode, deadline_timer
from podterm.session.context import restore_spec
from podterm.session.ring import DEFAULT_CHUNK_BYTES, OutputRing, channel_runs
from podterm.store.base import hash_resume_token, token_matches
from podterm.upstream.base import Context, ExitStatus, OutputChannel, StreamSpec, UpstreamStream

__all__ = [
    "BadOffset",
    "ConfirmsInput",
    "MayOutlive",
    "Session",
    "SessionLimits",
    "SessionState",
    "SessionStatistics",
    "new_resume_token",
]

log = logging.getLogger(__name__)

_STDOUT = int(OutputChannel.STDOUT)
_STDERR = int(OutputChannel.STDERR)
_EOF = int(OutputChannel.EOF)

#: Restore notices kept for the next ``hello`` (older ones are dropped).
MAX_NOTICES = 4

#: Opens a new stream on the session's upstream (bound to its owner): shell restore.
Reopen = Callable[[StreamSpec], Awaitable[UpstreamStream]]

#: Why a session ends when its upstream moved to another gateway.
MOVED = "moved"


@runtime_checkable
class ConfirmsInput(Protocol):
    """An upstream stream that tells how much input really reached the process.

    ``input_confirmed`` is in the stream's own input offsets (the bytes given
    to ``send_stdin``, counted from where the stream started); the callback
    set with :meth:`on_input_confirmed` runs whenever it moves.
    """

    @property
    def input_confirmed(self) -> int: ...

    def on_input_confirmed(self, callback: Callable[[], None]) -> None: ...


@runtime_checkable
class MayOutlive(Protocol):
    """An upstream stream whose process may outlive its close (an agent stream closed
    while the agent was away: the process runs on in the agent)."""

    @property
    def left_running(self) -> bool: ...


class SessionObserver(Protocol):
    """Hears a session's lifecycle (the gateway's auditor: ``session.*`` audit events).

    Every method is called synchronously from the session (or the relay that
    calls it) and must not block; it is never called on the data path.
    """

    def attached(self, session: Session, att: Attachment, *, resumed: bool,
                 gap: int) -> None: ...

    def attach_refused(self, session_id: str, mode: Mode, offset: int, *, resuming: bool,
                       exc: PodtermError, session: Session | None = None) -> None: ...

    def detached(self, session: Session, att: Attachment) -> None: ...

    def ended(self, session: Session) -> None: ...

#: Channel switch points kept for no-tty sessions (stdout/stderr interleaved).
#: Past this many inside the ring, later stderr bytes are labelled stdout:
#: their offsets and content stay exact, only the label is lost.  4,096 marks
#: cost ~300 KiB at worst; a real program switches far less often per MiB.
MAX_CHANNEL_MARKS = 4096


class SessionState(enum.Enum):
    """docs/protocol.md §2 ``state``; the table is in the module docstring."""

    PENDING = "pending"
    RUNNING = "running"
    DETACHED = "detached"
    EXITED = "exited"
    CLOSED = "closed"


class BadOffset(BadRequestError):
    """docs/protocol.md §5.1: an attach ``offset`` beyond the output produced (close 1008)."""

    error_code = "bad_offset"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-session bounds and timers.

    Attributes:
        ring_bytes: output kept for replay (1 MiB, ARCHITECTURE.md).
        ring_chunk_bytes: the ring's unit of allocation; an idle session holds one.
        window_bytes: unacknowledged output allowed in flight (256 KiB,
            docs/protocol.md §6); must be below ``ring_bytes``.
        read_bytes: most bytes asked of the upstream per read (256 KiB: a
            PTY rarely returns more than 4 KiB, a pipe its capacity, which
            the local upstream grows to 256 KiB for bulk output).
        input_buffer_bytes: accepted input not yet written to the upstream;
            beyond it the writer's link stops being read.  It must hold at
            least one ``window_bytes``: the client may have a whole window of
            input in flight (docs/protocol.md §6), and if the buffer filled
            first the link would stop being read while ACKs and PINGs queue
            behind that input, which deadlocks a session that is both fed
            and printing (``exec -i ... cat < big-file``).  0 = one window.
        grace_s: how long a session without a writer lives (10 min).
        idle_timeout_s: end after this long without input or output; 0 = off.
        max_age_s: end any session this old; 0 = off.
        exit_drain_s: after the process exits, how long output is still read
            (a background job may hold the terminal) before the rest is killed.
        heartbeat_interval_s: server PING interval on attached links (15 s).
        heartbeat_max_missed: unanswered PINGs that mean a dead link (2).
        close_timeout_s: bound on a link's close handshake.
        kill_timeout_s: bound on closing the upstream (it SIGKILLs after its
            own grace; this only stops a wedged close from holding shutdown).
        restore_upstreams: upstream kinds whose lost tty shells are restarted
            in their last directory (see "Lost upstreams"); empty = off.
    """

    ring_bytes: int = 1 << 20
    ring_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    window_bytes: int = 256 * 1024
    read_bytes: int = 262144
    input_buffer_bytes: int = 0
    grace_s: float = 600.0
    idle_timeout_s: float = 0.0
    max_age_s: float = 0.0
    exit_drain_s: float = 2.0
    heartbeat_interval_s: float = 15.0
    heartbeat_max_missed: int = 2
    close_timeout_s: float = 5.0
    kill_timeout_s: float = 10.0
    restore_upstreams: frozenset[str] = frozenset({"kube"})

    def __post_init__(self) -> None:
        if self.window_bytes <= 0 or self.window_bytes >= self.ring_bytes + 1:
            raise ValueError(f"window_bytes={self.window_bytes}: must be in 1..ring_bytes "
                             f"({self.ring_bytes}), or output could leave the ring unacknowledged")
        if self.ring_bytes % self.ring_chunk_bytes:
            raise ValueError(f"ring_bytes={self.ring_bytes} must be a multiple of "
                             f"ring_chunk_bytes={self.ring_chunk_bytes}")
        if self.input_buffer_bytes == 0:
            object.__setattr__(self, "input_buffer_bytes", self.window_bytes)
        if self.read_bytes <= 0 or self.input_buffer_bytes < self.window_bytes:
            raise ValueError(f"read_bytes must be positive and input_buffer_bytes="
                             f"{self.input_buffer_bytes} at least window_bytes={self.window_bytes}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_max_missed < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and heartbeat_max_missed >= 1")


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A frozen snapshot of one session (for ``/metrics`` and the REST API)."""

    id: str
    state: SessionState
    writers: int
    viewers: int
    out_offset: int
    ring_start: int
    writer_acked: int
    in_offset: int
    in_written: int
    input_buffered: int
    ring_allocated: int


def new_resume_token() -> str:
    """A fresh resume token: 18 random bytes, url-safe (not a credential, but unguessable)."""
    return secrets.token_urlsafe(18)


def wall_iso(epoch: float) -> str:
    """Wall-clock seconds as the API's UTC timestamp, ``2026-11-25T19:07:32.123Z``."""
    t = time.gmtime(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(epoch % 1 * 1000):03d}Z"


class Session:
    """One upstream process and its replayable, resumable streams.

    Args:
        session_id: ``s-`` + hex; unique in the registry.
        owner: the user name of whoever created it.
        spec: what was started.
        upstream_kind: ``"local"``, ``"kube"`` or ``"agent"``.
        stream: the started upstream stream; the session closes it.
        limits: bounds and timers.
        counters: gateway-wide counters (bytes in, gaps, ...).
        reopen: opens a new stream on the same upstream for the same owner;
            without it a lost upstream ends the session (see "Lost upstreams").
        observer: told of attaches, detaches and the end (audit events).

    Recording: when :attr:`recorder` is set before the session runs, every
    output chunk is recorded *before* it enters the ring (no client sees
    output the recording lacks; a writer that is behind slows the output
    pump), input after it is written, and every resize.  A recording that
    fails ends the session (``recording_failed``).  Without a recorder the
    data path makes no call at all.

    Start it with ``await nursery.start(session.run)``; see the module
    docstring for states, flow control and tasks.
    """

    __slots__ = (
        "id", "owner", "spec", "upstream_kind", "limits", "created_at", "created_mono",
        "ring", "writer_acked", "in_offset", "_in_sent", "resume_token", "writer", "viewers",
        "exit_status", "end_reason", "cols", "rows", "last_activity", "attaches",
        "_stream", "_counters", "_marks", "_in_chunks", "_in_pending", "_stdin_dead",
        "_input_closed", "_input_eof_at",
        "_credit_lot", "_in_pumping", "_space_lot", "_status_lot", "_eof", "_delivered",
        "_throttled",
        "_closed", "_started", "_ever_attached", "_detached_since",
        "_timer_scope", "_kill_reason", "_on_closed", "_exited_by_itself", "_drain_reason",
        "restores", "_reopen", "_nursery", "_out_pumping", "_lost", "_lost_context",
        "timer_at", "_parked", "_failure", "_tasks", "_live_scope",
        "_restore_wanted", "_notices", "_watch",
        "recorder", "_observer", "_in_floor", "_confirmer", "_confirm_base", "_token_hash",
        "_catch_up_to", "_size_unsent",
    )

    def __init__(self, session_id: str, *, owner: str, spec: StreamSpec, upstream_kind: str,
                 stream: UpstreamStream, limits: SessionLimits,
                 counters: GatewayCounters, reopen: Reopen | None = None,
                 observer: SessionObserver | None = None) -> None:
        now = trio.current_time()
        self.id = session_id
        self.owner = owner
        self.spec = spec
        self.upstream_kind = upstream_kind
        self.limits = limits
        self.created_at = wall_iso(time.time())
        self.created_mono = now
        self.ring = OutputRing(limits.ring_bytes, limits.ring_chunk_bytes)
        #: Output offset the writer has ACKed; survives detaches (flow control).
        self.writer_acked = 0
        #: Input bytes accepted (buffered or written); what ``hello.in_acked`` says.
        self.in_offset = 0
        # Input bytes written to the upstream (``in_written`` unless it confirms input).
        self._in_sent = 0
        # Input handled without the upstream (discarded: nobody reads it any more).
        self._in_floor = 0
        # The upstream's input confirmation, mapped to our offsets by the base.
        self._confirmer: ConfirmsInput | None = None
        self._confirm_base = 0
        #: The hash of the resume token, when only the hash is known (adopted).
        self._token_hash: str | None = None
        # Adopted: read the upstream up to here without waiting for ACKs.
        self._catch_up_to: int | None = None
        self.resume_token = new_resume_token()
        self.writer: Attachment | None = None
        # A tuple: most sessions never have a viewer, and () is shared and
        # untracked (an empty list would be one more object per session).
        self.viewers: tuple[Attachment, ...] = ()
        self.exit_status: ExitStatus | None = None
        #: Why the session ended (``exited``, ``killed``, ``grace``, ...), once closed.
        self.end_reason: str | None = None
        # A tty spec of 0x0: the upstream was opened without a size (kubectl's
        # sessions on the kube upstream: kubectl sends its own right after the
        # upgrade).  80x24 stands in (hello, recording) until the first resize,
        # which is passed on even when it is 80x24.
        self._size_unsent = spec.tty and not (spec.cols and spec.rows)
        self.cols = spec.cols or 80
        self.rows = spec.rows or 24
        self.last_activity = now
        self.attaches = 0
        self._stream = stream
        self._counters = counters
        # (offset, channel) where the output channel changes; None until stderr appears.
        self._marks: deque[tuple[int, int]] | None = None
        self._in_chunks: deque[bytes] | None = None  # made by the first input
        self._in_pending = 0
        self._stdin_dead = False
        self._input_closed = False  # close_input(): EOF once the buffer is written
        self._input_eof_at: int | None = None  # close_input_at(): EOF once input reaches it
        # Parking lots are made by their first waiter (_lot): most sessions
        # never wait on one, and each costs ~250 bytes.
        self._credit_lot: trio.lowlevel.ParkingLot | None = None  # the output pump: credit
        # The input pump runs only while input waits for the upstream (or its
        # EOF is due): an idle session costs no task for it (_wake_input).
        self._in_pumping = False
        self._space_lot: trio.lowlevel.ParkingLot | None = None  # the writer: buffer space
        # One lot for every rare status change (EOF, EXIT delivered, exited,
        # closed): waiters re-check their condition.  Cheaper per idle session
        # than an Event per condition.
        self._status_lot: trio.lowlevel.ParkingLot | None = None
        self._eof = False
        self._throttled = False  # the output pump waits for the writer's ACKs
        self._delivered = False
        self._closed = False
        self._started = False
        self._ever_attached = False
        self._detached_since: float | None = now  # no writer yet: grace counts from creation
        self._timer_scope: trio.CancelScope | None = None
        self._kill_reason: str | None = None
        self._on_closed: list[Callable[[Session], None]] = []
        self._exited_by_itself = False  # the process exited before anything ended it
        self._drain_reason: str | None = None  # set once the gateway drains
        #: Shells restarted after their upstream was lost.
        self.restores = 0
        self._reopen = reopen
        # Where the session's tasks run (the registry's nursery) while it is live.
        self._nursery: trio.Nursery | None = None
        #: When the DeadlineTimer calls :meth:`timer_due` (the parked supervisor's timer).
        self.timer_at: float | None = None
        self._parked = False  # the supervisor left its task: wake_supervisor() starts it
        self._failure: Exception | None = None  # a pump's error, for the supervisor to raise
        self._tasks: set[trio.CancelScope] | None = None  # the pumps' (None: none runs)
        self._live_scope: trio.CancelScope | None = None  # the supervisor's, while it runs
        self._out_pumping = False
        self._lost: str | None = None  # why the upstream was lost, while restoring
        self._lost_context: Context | None = None
        self._restore_wanted = False  # input or a writer arrived while lost
        self._notices: deque[str] | None = None  # made by the first notice
        self._watch: Callable[[Session, bool], None] | None = None  # the store mirror
        #: The session's recorder (set by the registry's hooks before it runs), or None.
        self.recorder: Recorder | None = None
        self._observer = observer
        self._bind_input(stream)

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> SessionState:
        """The current state (see the table in the module docstring)."""
        if self._closed:
            return SessionState.CLOSED
        if self.exit_status is not None and self._eof:
            return SessionState.EXITED
        if not self._started:
            return SessionState.PENDING
        if self.writer is None and self._ever_attached:
            return SessionState.DETACHED
        return SessionState.RUNNING

    @property
    def is_exited(self) -> bool:
        """True once the process is gone and every output byte is in the ring."""
        return self.exit_status is not None and self._eof

    @property
    def exited_by_itself(self) -> bool:
        """True once the process ended by itself (not killed by the session's end)
        and every output byte is in the ring: the links send EXIT ``exited``."""
        return self.is_exited and self._exited_by_itself

    @property
    def exit_reason(self) -> str:
        """The EXIT ``reason``: ``exited`` when the process ended by itself,
        else why the session ended it (``killed``, ``grace``, ``idle``, ...)."""
        if self.exited_by_itself:
            return "exited"
        return self.end_reason or "killed"

    @property
    def is_closed(self) -> bool:
        """True once the session has ended for good."""
        return self._closed

    @property
    def out_offset(self) -> int:
        """Output bytes produced so far (the ring's end)."""
        return self.ring.end

    @property
    def stream(self) -> UpstreamStream:
        """The upstream stream (for statistics; the session owns it)."""
        return self._stream

    @property
    def in_written(self) -> int:
        """Input bytes handled: written to the upstream, or, for an upstream that
        confirms input, confirmed by it.  What input ACKs carry."""
        confirmer = self._confirmer
        if confirmer is None:
            return self._in_sent
        confirmed = self._confirm_base + confirmer.input_confirmed
        return max(self._in_floor, min(confirmed, self._in_sent))

    @property
    def _in_acked(self) -> int:
        """``hello.in_acked``: what a client may forget (confirmed input, or accepted)."""
        return self.in_written if self._confirmer is not None else self.in_offset

    def _bind_input(self, stream: UpstreamStream) -> None:
        """Follow ``stream``'s input confirmations (if it gives any) from our offset now."""
        if isinstance(stream, ConfirmsInput):
            self._confirmer = stream
            self._confirm_base = self._in_sent - stream.input_confirmed
            stream.on_input_confirmed(self._input_confirmed)
        else:
            self._confirmer = None

    def _input_confirmed(self) -> None:
        writer = self.writer
        if writer is not None:
            # An input ACK is due: deferred for output to ride with, as for
            # input written (not a wake-up of the sender per confirmation).
            unacked = self.in_written - writer.in_ack_sent
            if unacked > 0:
                writer.input_written(unacked)

    @property
    def left_running(self) -> bool:
        """True once ended, if its process runs on upstream (see :class:`MayOutlive`)."""
        stream = self._stream
        return self._closed and isinstance(stream, MayOutlive) and stream.left_running

    @property
    def resume_token_hash(self) -> str:
        """What the store keeps of the current resume token."""
        if self._token_hash is not None:
            return self._token_hash
        return hash_resume_token(self.resume_token)

    def __repr__(self) -> str:
        return (f"<Session {self.id} {self.state.value} writers={1 if self.writer else 0} "
                f"viewers={len(self.viewers)} out={self.ring.end} acked={self.writer_acked}>")

    def statistics(self) -> SessionStatistics:
        """A frozen snapshot of offsets and attachments."""
        return SessionStatistics(
            id=self.id, state=self.state, writers=1 if self.writer is not None else 0,
            viewers=len(self.viewers), out_offset=self.ring.end, ring_start=self.ring.start,
            writer_acked=self.writer_acked, in_offset=self.in_offset,
            in_written=self.in_written, input_buffered=self._in_pending,
            ring_allocated=self.ring.nbytes_allocated)

    def links(self) -> list[Attachment]:
        """Every attachment: the writer first, then the viewers."""
        return ([self.writer] if self.writer is not None else []) + list(self.viewers)

    def _wake_links(self) -> None:
        writer = self.writer
        if writer is not None:
            writer.wake()
        for viewer in self.viewers:
            viewer.wake()

    # ----------------------------------------------------------- output side

    def channel_runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Split output ``[start, end)`` into ``(from, to, channel)`` runs.

        Every run is STDOUT for a tty session; no-tty sessions interleave
        STDOUT and STDERR as the process wrote them.
        """
        return channel_runs(self._marks, start, end, _STDOUT)

    def _append_output(self, channel: int, data: bytes) -> None:
        ring = self.ring
        if channel == _STDERR or self._marks is not None:
            marks = self._marks
            if marks is None:
                marks = self._marks = deque()
            last = marks[-1][1] if marks else _STDOUT
            if channel != last:
                # Forget marks that left the ring (keep the one in force at its start).
                while len(marks) > 1 and marks[1][0] <= ring.start:
                    marks.popleft()
                if len(marks) < MAX_CHANNEL_MARKS:
                    marks.append((ring.end, channel))
        ring.append(data)
        self.last_activity = trio.current_time()
        if self._watch is not None:
            self._watch(self, False)
        writer = self.writer
        if writer is not None:
            writer.output_ready()
        for viewer in self.viewers:
            viewer.output_ready()

    async def _pump_output(self) -> None:
        """Read the upstream while the writer's window has room; the only reader of it."""
        stream = self._stream
        self._out_pumping = True
        ring = self.ring
        window = self.limits.window_bytes
        read_bytes = self.limits.read_bytes
        recorder = self.recorder
        set_sink: Callable[[Callable[[int, bytes], bool] | None], None] | None = getattr(
            stream, "set_output_sink", None)
        # With a sink, the pump can also leave while nothing is due: the
        # stream starts it again (_restart_pump) when it queues output or
        # changes state.  An idle session then costs no pump task.
        park_reader: Callable[[Callable[[], None]], bool] | None = (
            getattr(stream, "park_reader", None) if set_sink is not None else None)
        handed_over = False
        if set_sink is not None:
            # An upstream that can push (agent streams) hands output that fits
            # straight to the ring, from its own task, while this pump waits:
            # no wake-up of the pump per message.  The same checks as below;
            # what does not fit waits for the pump.  (A partial, not a
            # closure: 3 objects per session for the GC to walk instead of 7.)
            set_sink(functools.partial(self._take_output, stream))
        try:
            while True:
                room = window - (ring.end - self.writer_acked)
                catch_up = self._catch_up_to
                if catch_up is not None:
                    if ring.end >= catch_up:
                        self._caught_up()
                    else:
                        # Adopted: what the upstream had produced is read at once
                        # (resume_at made sure the ring holds all of it).
                        room = max(room, catch_up - ring.end)
                if room <= 0:
                    # Flow control: the writer has a full window unacknowledged
                    # (attached or not).  The process blocks on its terminal.
                    self._throttled = True
                    _unpark(self._status_lot)  # the exit drain must know
                    if self._credit_lot is None:
                        self._credit_lot = trio.lowlevel.ParkingLot()
                    await self._credit_lot.park()
                    if stream is not self._stream:
                        break  # replaced by a restored stream (defensive: never while reading)
                    continue
                if self._throttled:
                    self._throttled = False
                    _unpark(self._status_lot)
                if (park_reader is not None and self._catch_up_to is None
                        and park_reader(self._restart_pump)):
                    handed_over = True  # the stream pushes, or calls us back
                    return
                channel, data = await stream.receive_some(min(room, read_bytes))
                if channel == _EOF:
                    break
                if recorder is not None and not recorder.output_nowait(data):
                    # Recorded before it enters the ring: no client ever sees
                    # output the recording lacks (waits while the writer is behind).
                    await recorder.output(data)
                self._append_output(channel, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the upstream went away: its output is over
        except RecordingFailed:
            self.kill("recording_failed")  # fail closed: never run on unrecorded
        finally:
            if not handed_over:
                if set_sink is not None:
                    set_sink(None)
                if stream is self._stream:
                    self._eof = True
                self._out_pumping = False
                _unpark(self._status_lot)
                self._wake_links()

    def _take_output(self, stream: UpstreamStream, channel: int, data: bytes) -> bool:
        """``stream``'s push while the output pump waits in its receive_some (or left).

        False, nothing done: the pump takes ``data`` (it does not fit the
        window or one read, the session catches up, the recording is behind,
        or ``stream`` is no longer the session's).
        """
        if (stream is not self._stream or self._catch_up_to is not None
                or len(data) > self.limits.read_bytes
                or len(data) > self.limits.window_bytes - (self.ring.end - self.writer_acked)):
            return False
        try:
            recorder = self.recorder
            if recorder is not None and not recorder.output_nowait(data):
                return False  # the writer is behind: the pump waits for it
            self._append_output(channel, data)
        except Exception:  # noqa: BLE001 - never into the upstream's task
            log.exception("session.output.push_failed %s", self.id)
            return False  # the pump takes it, and meets the error itself
        return True

    def _restart_pump(self) -> None:
        """The stream's call: output or a state change came while the pump was away."""
        if self._spawn(self._pump_output):
            return
        # The session is over: nobody reads the stream any more.
        self._eof = True
        self._out_pumping = False
        _unpark(self._status_lot)

    def _caught_up(self) -> None:
        self._catch_up_to = None
        _unpark(self._status_lot)

    @property
    def catching_up(self) -> bool:
        """True while an adopted session reads what its upstream had produced."""
        return self._catch_up_to is not None and not self._eof and not self._closed

    async def wait_caught_up(self) -> None:
        """Wait until :attr:`catching_up` is False (the caller bounds the wait)."""
        await self._wait_status(lambda: not self.catching_up)

    def resume_at(self, *, out_offset: int, in_offset: int, token_hash: str,
                  catch_up_to: int) -> None:
        """Continue a session another gateway ran (adoption); call before :meth:`run`.

        Args:
            out_offset: the first output byte the upstream will send (what the
                client is known to hold, or the oldest the upstream still has):
                the ring starts there, and so does the writer's ACK.
            in_offset: the input the upstream has received: accepted and
                written from the start, so a client re-sending more is
                deduplicated exactly there.
            token_hash: the stored hash of the current resume token.
            catch_up_to: the output the upstream had produced when adopted.

        Raises:
            ValueError: the session runs already, or ``catch_up_to`` is more
                than the ring holds past ``out_offset``.
        """
        if self._started or self.ring.end or self.in_offset:
            raise ValueError("resume_at() is for a new session, before it runs")
        if catch_up_to - out_offset > self.ring.capacity_bytes or catch_up_to < out_offset:
            raise ValueError(f"cannot catch up from {out_offset} to {catch_up_to} with a ring "
                             f"of {self.ring.capacity_bytes} bytes")
        self.ring.start_at(out_offset)
        self.writer_acked = out_offset
        self.in_offset = self._in_sent = self._in_floor = in_offset
        self._bind_input(self._stream)
        self._token_hash = token_hash or None
        self._ever_attached = True  # a client had it: it starts detached, grace running
        self._detached_since = trio.current_time()
        self._catch_up_to = catch_up_to if catch_up_to > out_offset else None

    def ack_output(self, attachment: Attachment, offset: int) -> None:
        """Record an output ACK from ``attachment``'s client.

        Raises:
            BadRequestError: the ACK claims bytes that were never sent (1008).
        """
        if offset > attachment.sent:
            raise BadRequestError(f"ACK {offset} is beyond the {attachment.sent} bytes sent")
        if offset <= attachment.acked:
            return
        attachment.acked = offset
        if attachment is self.writer and offset > self.writer_acked:
            self.writer_acked = offset
            _unpark(self._credit_lot)
            if self._watch is not None:
                self._watch(self, False)
        if self.ring.end > attachment.sent:
            attachment.wake()  # more link credit for output that waits

    # ------------------------------------------------------------ input side

    async def write_input(self, attachment: Attachment, data: bytes) -> None:
        """Accept one STDIN payload the writer sent at ``attachment.in_cursor``.

        Bytes below the session's accepted offset were accepted before (a
        re-send after a reconnect) and are dropped.  Waits while the session's
        input buffer is full (the link stops being read: back-pressure).
        Returns at once, dropping the rest, if the attachment stops being the
        writer meanwhile (its successor re-sends from its own ``in_acked``).
        """
        data = self._accept_input(attachment, self._new_input(attachment, data))
        while data:
            if self._space_lot is None:
                self._space_lot = trio.lowlevel.ParkingLot()
            await self._space_lot.park()
            data = self._accept_input(attachment, data)

    def write_input_nowait(self, attachment: Attachment, data: bytes) -> bool:
        """:meth:`write_input` if it would not wait: True, done; False, nothing done.

        False only when the input buffer has no room for all of it now (the
        caller then awaits :meth:`write_input` with the same payload).
        """
        if (attachment is self.writer and not self._closed and not self._stdin_dead
                and not self._input_closed):
            new = len(data) - max(self.in_offset - attachment.in_cursor, 0)
            if new > self.limits.input_buffer_bytes - self._in_pending:
                return False
        rest = self._accept_input(attachment, self._new_input(attachment, data))
        assert not rest, "write_input_nowait: the room was checked"
        return True

    def _new_input(self, attachment: Attachment, data: bytes) -> bytes:
        """Advance the writer's cursor past ``data``; what of it was not accepted before."""
        start = attachment.in_cursor
        attachment.in_cursor = start + len(data)
        skip = self.in_offset - start
        if skip > 0:
            return data[skip:] if skip < len(data) else b""  # (a re-send after a reconnect)
        return data

    def _accept_input(self, attachment: Attachment, data: bytes) -> bytes:
        """Accept what the input buffer has room for; the rest (b"": none) waits for room."""
        limit = self.limits.input_buffer_bytes
        while data:
            if attachment is not self.writer or self._closed:
                return b""
            if self._stdin_dead or self._input_closed:
                # The process no longer reads input: acknowledge and discard,
                # so the client's buffer empties instead of growing.
                n = len(data)
                self.in_offset += n
                self._in_sent += n
                self._in_floor = self.in_offset
                attachment.wake()
                return b""
            space = limit - self._in_pending
            if space <= 0:
                return data
            piece = data if len(data) <= space else data[:space]
            eof_at = self._input_eof_at
            if eof_at is not None and len(piece) > eof_at - self.in_offset:
                piece = piece[:eof_at - self.in_offset]  # what follows is past the EOF
            data = data[len(piece):]
            chunks = self._in_chunks
            written = 0
            if not chunks and self._lost is None:
                # Nothing queued: write it from this task if the upstream takes
                # it now (a keystroke), instead of waking the input pump.
                nowait = getattr(self._stream, "send_stdin_nowait", None)
                recorder = self.recorder
                if nowait is not None and (recorder is None or not recorder.record_input):
                    written = nowait(piece)
            if written < len(piece):
                if chunks is None:
                    chunks = self._in_chunks = deque()
                chunks.append(piece[written:] if written else piece)
                self._in_pending += len(piece) - written
                self._wake_input()
            self.in_offset += len(piece)
            if written:
                self._in_sent += written
                attachment.input_written(self.in_written - attachment.in_ack_sent)
            if self._lost is not None and not self._restore_wanted:
                self._restore_wanted = True  # "on the user's next input": restore now
                _unpark(self._status_lot)
            self._counters.bytes_in += len(piece)
            if self._watch is not None:
                self._watch(self, False)
            self.last_activity = trio.current_time()
            if eof_at is not None and self.in_offset >= eof_at:
                self.close_input()  # the client's EOF offset is reached
        return b""

    def _wake_input(self) -> None:
        """Start the input pump if input (or the EOF) waits for it and none runs."""
        if (self._in_pumping or self._nursery is None or self._lost is not None
                or self._stdin_dead or not (self._in_chunks or self._input_closed)):
            return
        self._in_pumping = self._spawn(self._pump_input)

    async def _pump_input(self) -> None:
        """Write accepted input to the upstream, in order; the only writer of it.

        Started by :meth:`_wake_input` when input has to wait for the upstream
        (or its EOF is due); returns once the buffer is empty, so an idle
        session has no input task.
        """
        stream = self._stream
        try:
            await self._write_buffered_input(stream)
        finally:
            self._in_pumping = False
        if stream is not self._stream:
            self._wake_input()  # restored meanwhile: the new shell's turn

    async def _write_buffered_input(self, stream: UpstreamStream) -> None:
        recorder = self.recorder
        if recorder is not None and not recorder.record_input:
            recorder = None  # input is not recorded: no call per piece
        while True:
            if stream is not self._stream or self._lost is not None:
                return  # lost: what is buffered waits for the restored shell's pump
            chunks = self._in_chunks
            if not chunks:
                if self._input_closed:
                    # Everything accepted is written: now the process sees EOF.
                    try:
                        await stream.close_stdin()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    except UpstreamError:
                        return  # lost (the supervisor restores or ends the session)
                    self._stdin_dead = True
                    return
                self._in_chunks = None  # 760 bytes an idle session does without
                return  # nothing waits: the next input that must wait starts a pump
            piece = chunks[0]
            try:
                await stream.send_stdin(piece)
            except UpstreamError:
                # The connection was lost: the piece stays first in the buffer
                # and goes to the restored shell (or nowhere, if the session ends).
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The process closed its input or is gone: what is buffered
                # can never be written.  Count it as handled, from now on too.
                self._stdin_dead = True
                self._in_sent = self._in_floor = self.in_offset
                chunks.clear()
                self._in_pending = 0
                _unpark(self._space_lot)
                if self.writer is not None:
                    self.writer.wake()
                return
            chunks.popleft()
            self._in_pending -= len(piece)
            self._in_sent += len(piece)
            _unpark(self._space_lot)
            writer = self.writer
            if writer is not None:
                writer.input_written(self.in_written - writer.in_ack_sent)  # an ACK is due
            if recorder is not None:
                # After the write: a piece retried after a lost upstream is recorded once.
                try:
                    await recorder.input(piece)
                except RecordingFailed:
                    self.kill("recording_failed")
                    return

    def close_input(self) -> None:
        """End the process's input once every byte accepted so far is written.

        The input pump writes what is buffered, then calls the stream's
        ``close_stdin()`` (pipe: EOF; tty: the EOF character).  Input offered
        afterwards is acknowledged and discarded.  Idempotent.  (The v5
        ``FF 00`` of a kubectl client, and exec without stdin.)
        """
        self._input_closed = True
        self._wake_input()

    def close_input_at(self, offset: int) -> None:
        """podterm.v1 ``stdin_eof``: close the input once input offset ``offset`` is accepted.

        ``offset`` is the client's total input at its EOF.  At or below what
        was accepted already, :meth:`close_input` applies now; beyond it, the
        EOF waits until input reaches ``offset`` (bytes past it are discarded,
        as after any EOF).  Once an EOF is recorded, later calls (a resumed
        client re-sending it) change nothing.  ``hello.stdin_closed`` tells a
        resuming client whether it still has to send it.
        """
        if self._input_closed or self._input_eof_at is not None:
            return  # a repeat: the first EOF stands
        if offset <= self.in_offset:
            self.close_input()
        else:
            self._input_eof_at = offset

    @property
    def input_closed(self) -> bool:
        """True once the process's input is being closed (``hello.stdin_closed``)."""
        return self._input_closed

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; 0 in either keeps that dimension (docs/protocol.md §4)."""
        cols = cols or self.cols
        rows = rows or self.rows
        if (cols, rows) == (self.cols, self.rows) and not self._size_unsent:
            return
        self.cols, self.rows = cols, rows
        if self._closed or self.is_exited:
            return
        self._size_unsent = False
        if self.recorder is not None:
            self.recorder.resize(cols, rows)
        try:
            self._stream.resize(cols, rows)
        except (OSError, ValueError, trio.ClosedResourceError) as exc:
            log.debug("session.resize.failed %s: %s", self.id, exc)

    # ----------------------------------------------------------- attachments

    def attach(self, mode: Mode, offset: int, resume_token: str | None) -> Attachment:
        """Attach a client (:meth:`_attach`); the observer hears of it or of the refusal."""
        observer = self._observer
        if observer is None:
            return self._attach(mode, offset, resume_token)
        # A writer with the token, after someone was attached: resuming after a drop.
        resuming = mode is Mode.RW and resume_token is not None and self._ever_attached
        try:
            att = self._attach(mode, offset, resume_token)
        except PodtermError as exc:
            observer.attach_refused(self.id, mode, offset, resuming=resuming, exc=exc,
                                    session=self)
            raise
        observer.attached(self, att, resumed=resuming and att.resumed,
                          gap=max(0, att.sent - offset))
        return att

    def _attach(self, mode: Mode, offset: int, resume_token: str | None) -> Attachment:
        """Attach a client; it gets ``hello`` (and ``gap``) queued, then replay and live output.

        Args:
            mode: ``rw`` or ``ro``.
            offset: the first output byte the client has not seen.
            resume_token: the token from ``POST`` or the latest ``hello``;
                lets a ``rw`` attach take over from an existing writer.

        Returns:
            The attachment, with ``hello`` (and ``gap`` when ``offset`` left
            the ring) queued.  A ``rw`` attachment receives the rotated
            resume token; viewers get none.

        Raises:
            GoneError: the session has ended (4410).
            BadOffset: ``offset`` is beyond the output produced (1008).
            ConflictError: ``rw`` while a writer is attached and the token is
                not the current one (4409).
        """
        if self._closed:
            raise GoneError(f"session {self.id} has ended")
        ring = self.ring
        if (self._catch_up_to is not None and ring.end < offset <= self._catch_up_to
                and not self._eof):
            # Adopted, and the upstream's replay has not reached the client yet.
            raise Unavailable(f"session {self.id} is being taken over by this gateway; "
                              "retry in a moment")
        if offset < 0 or offset > ring.end:
            raise BadOffset(f"offset {offset} is beyond the {ring.end} bytes of output "
                            "this session has produced")
        token_ok = resume_token is not None and (hmac.compare_digest(
            resume_token.encode("utf-8", "replace"), self.resume_token.encode("ascii"))
            or (self._token_hash is not None and token_matches(self._token_hash, resume_token)))
        old = self.writer
        if mode is Mode.RW and old is not None:
            if not token_ok:
                raise ConflictError(f"session {self.id} already has a writer; attach "
                                    "read-only, or resume with the current resume token")
            old.request_close(4409, "taken over by a resumed connection")
            self._counters.takeovers += 1
        in_acked = self._in_acked
        att = Attachment(self, mode, offset, in_acked, ring.end)
        att.resumed = token_ok
        token: str | None = None
        notices = self._hello_notices(mode)
        if mode is Mode.RW:
            self.writer = att
            self._ever_attached = True
            self._detached_since = None
            self.resume_token = token = new_resume_token()
            self._token_hash = None  # the adopted token's hash is history now
            if offset > self.writer_acked:
                # The client has seen everything before ``offset``.
                self.writer_acked = offset
                _unpark(self._credit_lot)
            self._retime()
            _unpark(self._status_lot)  # wait_state(RUNNING)
            if self._watch is not None:
                self._watch(self, True)  # a new resume token, and maybe a new state
        else:
            self.viewers += (att,)
        self.attaches += 1
        start = offset
        gap: GapNotice | None = None
        if offset < ring.start:
            gap = GapNotice(offset, ring.start)
            start = ring.start
        limits = self.limits
        att.notify(Hello(
            session=self.id, resume_token=token,
            state="exited" if self.is_exited else "running", mode=mode.value,
            out_offset=start, ring_start=ring.start, in_acked=in_acked,
            cols=self.cols, rows=self.rows, window=limits.window_bytes,
            heartbeat_s=limits.heartbeat_interval_s, notices=notices,
            stdin_closed=self._input_closed))
        if gap is not None:
            att.notify(gap)
            att.sent = att.acked = start
            self._counters.gaps += 1
            self._counters.gap_bytes += gap.lost
        if self._drain_reason is not None:
            # Attached just as the gateway began to drain: move on at once too.
            att.notify(Drain(self._drain_reason))
            att.request_close(1001, "gateway draining: reconnect and resume")
        return att

    def _hello_notices(self, mode: Mode) -> tuple[str, ...]:
        """Restore notices for a ``hello``; a writer's attach also triggers a pending restore."""
        notices = list(self._notices or ())
        if mode is Mode.RW:
            self._notices = None  # the writer has been told
        if self._lost is not None:
            where = "" if self._lost_context is None else f"{_where(self._lost_context)} "
            notices.append(f"the connection to the pod was lost; a new shell starts {where}now")
            if mode is Mode.RW and not self._restore_wanted:
                self._restore_wanted = True  # "on the next attach": restore now
                _unpark(self._status_lot)
        return tuple(notices)

    def detach(self, attachment: Attachment) -> None:
        """Remove ``attachment`` (its connection ended).  The session keeps running."""
        if attachment is self.writer:
            self.writer = None
            self._detached_since = trio.current_time()
            self._retime()
            _unpark(self._space_lot)
            _unpark(self._status_lot)  # wait_state(DETACHED)
            if self._watch is not None:
                self._watch(self, True)  # detached
        else:
            self.viewers = tuple(v for v in self.viewers if v is not attachment)
        # A link that closed because the session ended (EXIT sent) did not leave it.
        if self._observer is not None and not self._closed and not attachment.exit_sent:
            self._observer.detached(self, attachment)

    def exit_delivered(self, attachment: Attachment) -> None:
        """The writer received EXIT (it answered the CLOSE that followed): the session may end."""
        if attachment.mode is Mode.RW and self.is_exited:
            self._delivered = True
            _unpark(self._status_lot)

    def drain(self, reason: str) -> None:
        """Tell every attached client to reconnect elsewhere (docs/protocol.md §4 ``drain``)."""
        self._drain_reason = reason
        for att in self.links():
            if att.close is None:
                att.notify(Drain(reason))
                att.request_close(1001, "gateway draining: reconnect and resume")

    # -------------------------------------------------------- life and death

    def kill(self, reason: str = "killed") -> None:
        """End the session now: the upstream is killed, links get EXIT then close 4410."""
        if self._closed or self._kill_reason is not None:
            return
        self._kill_reason = reason
        if self._timer_scope is not None:
            self._timer_scope.cancel()
        self.wake_supervisor()

    async def wait_exited(self) -> None:
        """Wait until the process has exited and its output is all in the ring (or the
        session ended); the caller bounds the wait."""
        await self._wait_status(lambda: self.is_exited or self._closed)

    async def wait_closed(self) -> None:
        """Wait until the session has ended (the caller bounds the wait)."""
        await self._wait_status(lambda: self._closed)

    async def wait_state(self, *states: SessionState) -> SessionState:
        """Wait until :attr:`state` is one of ``states`` (or the session ended); return it.
        The caller bounds the wait."""
        await self._wait_status(lambda: self._closed or self.state in states)
        return self.state

    async def _wait_status(self, condition: Callable[[], bool]) -> None:
        await trio.lowlevel.checkpoint()
        while not condition():
            if self._status_lot is None:
                self._status_lot = trio.lowlevel.ParkingLot()
            await self._status_lot.park()

    def _deadline(self) -> float:
        limits = self.limits
        deadline = math.inf
        if self._detached_since is not None and self.writer is None:
            deadline = self._detached_since + limits.grace_s
        if limits.idle_timeout_s > 0 and not self.is_exited:
            deadline = min(deadline, self.last_activity + limits.idle_timeout_s)
        if limits.max_age_s > 0:
            deadline = min(deadline, self.created_mono + limits.max_age_s)
        return deadline

    def _expired(self, now: float) -> str | None:
        limits = self.limits
        if limits.max_age_s > 0 and now >= self.created_mono + limits.max_age_s:
            return "max_age"
        if (self.writer is None and self._detached_since is not None
                and now >= self._detached_since + limits.grace_s):
            return "grace"
        if (limits.idle_timeout_s > 0 and not self.is_exited
                and now >= self.last_activity + limits.idle_timeout_s):
            return "idle"
        return None

    def _retime(self) -> None:
        # An earlier deadline (a writer left) must wake the supervisor now; a
        # later one is found when the old deadline passes and nothing expired.
        scope = self._timer_scope
        if scope is not None and self._kill_reason is None:
            scope.deadline = self._deadline()
        elif self._parked:
            self._schedule_timer(self._deadline())  # (a no-op unless earlier)

    def _schedule_timer(self, deadline: float) -> None:
        """The parked supervisor's next look, in the process's DeadlineTimer."""
        if deadline != math.inf:
            deadline_timer().schedule(self, deadline)

    def timer_due(self) -> None:
        """:class:`DeadlineTimer`: the parked supervisor's timer came; it checks it."""
        self.wake_supervisor()

    def wake_supervisor(self) -> None:
        """Start the supervisor again if it left its task (see "Tasks"); else nothing.

        The registry calls it for every session when it shuts down: a parked
        supervisor then starts cancelled, and ends the session ``shutdown``.
        """
        if not self._parked:
            return
        nursery = self._nursery
        if nursery is None:
            return
        self._parked = False
        try:
            nursery.start_soon(self._live)
        except RuntimeError:  # the registry's nursery closed: the gateway has stopped
            log.warning("session.wake_supervisor %s: the registry has stopped", self.id)

    def _park_supervisor(self, stream: UpstreamStream) -> bool:
        """Leave the supervisor's task if nothing can be due before a callback says so."""
        park: Callable[[Callable[[], None]], float | None] | None = getattr(
            stream, "park_supervisor", None)
        if park is None or self._kill_reason is not None or self._failure is not None:
            return False
        deadline = self._deadline()
        if deadline <= trio.current_time():
            return False
        checked_by = park(self.wake_supervisor)  # None: it exited or was lost already
        if checked_by is None:
            return False
        self._parked = True
        self._schedule_timer(min(deadline, checked_by))
        return True

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> bool:
        """Start ``fn`` (a pump) in the registry's nursery, under the session's control.

        False when the session is no longer live (nothing started).
        """
        nursery = self._nursery
        if nursery is None:
            return False
        scope = trio.CancelScope()
        tasks = self._tasks
        if tasks is None:
            tasks = self._tasks = set()
        tasks.add(scope)  # before it starts: the session's end cancels it even then
        try:
            nursery.start_soon(self._task, fn, scope)
        except RuntimeError:  # the registry's nursery closed (the gateway stopped)
            tasks.discard(scope)
            return False
        return True

    async def _task(self, fn: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        try:
            with scope:
                await fn()
        except Exception as exc:  # noqa: BLE001 - into the session, never the registry
            if self._failure is None:
                self._failure = exc
            if self._live_scope is not None:
                self._live_scope.cancel()  # the supervisor raises it
            else:
                self.wake_supervisor()
        finally:
            tasks = self._tasks
            if tasks is not None:
                tasks.discard(scope)
                if not tasks:
                    self._tasks = None
                    _unpark(self._status_lot)

    async def _wait_timed(self, waiter: Callable[[], Awaitable[object]]) -> str | None:
        """Await ``waiter()`` until it returns (None) or a timer or kill ends the session."""
        while True:
            with trio.CancelScope(deadline=self._deadline()) as scope:
                self._timer_scope = scope
                if self._kill_reason is not None:
                    scope.cancel()
                await waiter()
            self._timer_scope = None
            if not scope.cancelled_caught:
                return None
            if self._kill_reason is not None:
                return self._kill_reason
            reason = self._expired(trio.current_time())
            if reason is not None:
                return reason

    async def _supervise(self) -> str | None:
        """Until the session ends (its reason), or None: parked (see "Tasks")."""
        while True:
            stream = self._stream
            if self._park_supervisor(stream):
                return None
            status: list[ExitStatus] = []

            async def wait_exit() -> None:
                status.append(await stream.wait_exit())  # noqa: B023 - awaited in this round

            try:
                reason = await self._wait_timed(wait_exit)
            except UpstreamError as exc:
                if exc.close_code == CloseCode.GOING_AWAY or not self._can_restore():
                    raise  # moved to another gateway: nothing to restore here
                reason = await self._restore(stream, exc)
                if reason is not None:
                    return reason
                continue  # supervise the restored stream
            if reason is not None:
                return reason
            return await self._after_exit(stream, status[0])

    async def _after_exit(self, stream: UpstreamStream, exit_status: ExitStatus) -> str:
        # The process exited.  Its output may still be in flight, or held by a
        # background job that keeps the terminal open: read on for a bounded
        # time, then kill the rest.  The bound runs only while the pump reads:
        # output held back by flow control waits for the writer (under the
        # session's timers), because dropping it would break exactly-once.
        def eof() -> bool:
            return self._eof

        def eof_or_throttled() -> bool:
            return self._eof or self._throttled

        def eof_or_reading() -> bool:
            return self._eof or not self._throttled

        while not self._eof:
            if self._throttled:
                reason = await self._wait_timed(lambda: self._wait_status(eof_or_reading))
                if reason is not None:
                    return reason
                continue
            with trio.move_on_after(self.limits.exit_drain_s) as drain:
                await self._wait_status(eof_or_throttled)
            if drain.cancelled_caught:
                break
        if not self._eof:
            with trio.move_on_after(self.limits.kill_timeout_s):
                await stream.aclose()
            with trio.move_on_after(self.limits.kill_timeout_s):
                await self._wait_status(eof)
            self._eof = True
        self.exit_status = exit_status
        self._exited_by_itself = True
        if self._watch is not None:
            self._watch(self, True)  # exited
        log.debug("session.exited %s: %s", self.id, self.exit_status.reason)
        _unpark(self._status_lot)
        self._wake_links()  # EXIT goes out after the last byte
        reason = await self._wait_timed(lambda: self._wait_status(lambda: self._delivered))
        return reason if reason is not None else "exited"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The session's life: start the pumps, supervise, then close everything.

        Run it in the registry's nursery: the session's tasks run there too.
        Returns when the session has ended, the upstream closed and every link
        told, or earlier with the supervisor parked (see "Tasks"): the session
        then ends in a task of its own.  Cancellation (gateway shutdown) ends
        it too; the registry wakes parked supervisors to be cancelled.
        """
        self._started = True
        self._out_pumping = True
        task_status.started()
        self._nursery = trio.lowlevel.current_task().parent_nursery
        if not self._spawn(self._pump_output):
            self._out_pumping = False
        self._wake_input()  # input accepted before the start, or an EOF
        await self._live()

    async def _live(self) -> None:
        """Supervise until the session ends (then close it) or the supervisor parks."""
        reason = "shutdown"
        ended = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # (woken by a shutdown: end now)
            with trio.CancelScope() as scope:
                self._live_scope = scope
                if self._failure is None:
                    outcome = await self._supervise()
                    if outcome is None:
                        ended = False
                        return
                    reason = outcome
            self._live_scope = None
            if self._failure is not None:
                raise self._failure  # a pump's error (it cancelled the scope)
        except Exception as exc:
            # The upstream failed, or a bug: it ends this session, never the
            # registry (and with it every other session).
            failed = _upstream_error(exc)
            if failed is not None and failed.close_code == CloseCode.GOING_AWAY:
                reason = MOVED
                log.info("session.moved %s: %s", self.id, failed.message)
            else:
                reason = "upstream_failed" if failed else "internal_error"
                log.error("session.run.failed %s: %s", self.id, reason, exc_info=exc)
        finally:
            self._live_scope = None
            if ended:
                await self._end(reason)

    async def _end(self, reason: str) -> None:
        """Close the session: its pumps, its upstream, its recording; tell its links."""
        self._nursery = None  # nothing starts any more
        self._parked = False
        if self.timer_at is not None:
            deadline_timer().cancel(self)
        self.end_reason = reason
        with trio.CancelScope(shield=True):
            tasks = self._tasks
            if tasks:
                for scope in tasks:
                    scope.cancel()
                with trio.move_on_after(self.limits.kill_timeout_s):
                    await self._wait_status(lambda: not self._tasks)
            with trio.move_on_after(self.limits.kill_timeout_s):
                await self._stream.aclose()
            if self.exit_status is None:
                with trio.move_on_after(1.0):
                    try:
                        self.exit_status = await self._stream.wait_exit()
                    except UpstreamError:
                        pass  # lost: no status to report (must not end the registry)
            if self.recorder is not None:
                await self.recorder.aclose()  # the writer finishes the file (bounded)
        self._closed = True
        self._eof = True
        GatewayCounters.bump(self._counters.sessions_ended, reason)
        for att in self.links():
            if reason == "exited":
                att.wake()  # EXIT + 1000 where not sent yet
            elif reason == MOVED:
                # Another gateway runs it now: reconnect (and reach it there).
                if att.close is None:
                    att.notify(Drain("the session moved to another gateway"))
                    att.request_close(1001, "session moved: reconnect and resume")
            else:
                att.request_close(4410, f"session ended ({reason})")
        _unpark(self._space_lot)
        _unpark(self._status_lot)
        if self._observer is not None:
            self._observer.ended(self)
        for callback in self._on_closed:
            callback(self)

    # ---------------------------------------------------- lost upstreams

    @property
    def lost(self) -> str | None:
        """Why the upstream was lost, while the session waits to restore the shell."""
        return self._lost

    def _can_restore(self) -> bool:
        return (self._reopen is not None and self.spec.tty and not self._closed
                and self._kill_reason is None and self._nursery is not None
                and self.upstream_kind in self.limits.restore_upstreams)

    async def _notice_output(self, text: str) -> None:
        """A line of our own in the output, on its own line (the shell's is dead).

        Recorded like shell output (before it enters the ring).
        """
        data = f"\r\n[podterm] {text}\r\n".encode("utf-8", "replace")
        if self.recorder is not None:
            try:
                await self.recorder.output(data)
            except RecordingFailed:
                self.kill("recording_failed")
                return
        self._append_output(_STDOUT, data)

    def _discard_input(self) -> None:
        """Drop buffered input (as handled): no shell will ever read it."""
        if self._in_chunks:
            self._in_chunks.clear()
        self._in_pending = 0
        self._in_sent = self._in_floor = self.in_offset
        _unpark(self._space_lot)
        if self.writer is not None:
            self.writer.wake()

    async def _restore(self, old: UpstreamStream, exc: UpstreamError) -> str | None:
        """The upstream of ``old`` was lost: restart the shell (see "Lost upstreams").

        Returns None once a new stream runs, or the reason the session ends.
        """
        self._lost = exc.message or type(exc).__name__
        self._restore_wanted = False
        log.warning("session.upstream.lost %s: %s", self.id, self._lost)
        # 1. Every output byte of the old stream first (exactly once, in order).
        while self._out_pumping:
            if self._throttled:
                reason = await self._wait_timed(lambda: self._wait_status(
                    lambda: not self._out_pumping or not self._throttled))
                if reason is not None:
                    return reason
                continue
            with trio.move_on_after(self.limits.exit_drain_s) as drain:
                await self._wait_status(lambda: not self._out_pumping or self._throttled)
            if drain.cancelled_caught:
                break
        try:
            context = old.capture_context()
        except Exception as cexc:  # noqa: BLE001 - a broken stream must not end the session
            log.info("session.context.failed %s: %s", self.id, cexc)
            context = Context(cwd=None, env=dict(self.spec.env))
        with trio.move_on_after(self.limits.kill_timeout_s):
            await old.aclose()
        with trio.move_on_after(self.limits.kill_timeout_s):
            await self._wait_status(lambda: not self._out_pumping)
        if self._out_pumping:
            log.error("session.restore.failed %s: the lost stream's reader did not stop", self.id)
            return "upstream_failed"
        self._lost_context = context
        self._stdin_dead = False  # the next shell reads input again
        where = _where(context)
        await self._notice_output(f"the connection to the pod was lost; press a key to "
                                  f"start a new shell {where}")
        _unpark(self._status_lot)  # waiters on state (nothing ended)
        # 2. Wait for the writer's next input or attach (or a timer, a kill).
        if self._in_pending:
            self._restore_wanted = True  # input was waiting already
        while True:
            reason = await self._wait_timed(lambda: self._wait_status(
                lambda: self._restore_wanted))
            if reason is not None:
                return reason
            spec = restore_spec(replace(self.spec, cols=self.cols, rows=self.rows), context)
            opened: list[UpstreamStream | UpstreamError] = []
            reopen = self._reopen
            assert reopen is not None

            async def open_new() -> None:
                try:
                    opened.append(await reopen(spec))  # noqa: B023 - awaited in this round
                except UpstreamError as oexc:
                    opened.append(oexc)  # noqa: B023 - awaited in this round

            reason = await self._wait_timed(open_new)
            if reason is not None:
                return reason
            result = opened[0]
            if isinstance(result, UpstreamError):
                log.warning("session.restore.failed %s: %s", self.id, result.message)
                self._restore_wanted = False
                self._discard_input()
                await self._notice_output(f"could not start a new shell: {result.message}; "
                                          "press a key to try again")
                continue
            break
        # 3. The new shell takes over.
        note = f"shell restarted {where} after the connection to the pod was lost"
        self._stream = result
        self._bind_input(result)
        self._lost = None
        self._restore_wanted = False
        self._eof = False
        self.restores += 1
        if self._notices is None:
            self._notices = deque(maxlen=MAX_NOTICES)
        self._notices.append(note)
        await self._notice_output(note)
        log.info("session.restore.complete %s: %s", self.id, note)
        self._out_pumping = self._spawn(self._pump_output)
        self._wake_input()  # what the lost shell did not get goes to the new one
        _unpark(self._credit_lot)
        return None

    def watch(self, callback: Callable[[Session, bool], None]) -> None:
        """Call ``callback(session, urgent)`` on every change the session store mirrors.

        ``urgent`` is False for offsets (output, input, the writer's ACK: many
        a second; the store mirror throttles them) and True for a new resume
        token or state (attach, detach, exit).  The callback must not block
        or raise: it runs on the output path.  One watcher; the last one wins.
        """
        self._watch = callback

    def on_closed(self, callback: Callable[[Session], None]) -> None:
        """Call ``callback(session)`` once the session has ended (the registry's hook)."""
        self._on_closed.append(callback)


def _unpark(lot: trio.lowlevel.ParkingLot | None) -> None:
    """Wake every waiter of a lot made on first use (none yet: nobody to wake)."""
    if lot is not None:
        lot.unpark_all()


def _upstream_error(exc: Exception) -> UpstreamError | None:
    """The :class:`UpstreamError` that ended a session's run, if that is what did."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, ExceptionGroup):
        group = exc.split(UpstreamError)[0]
        while isinstance(group, ExceptionGroup):
            inner = group.exceptions[0]
            if not isinstance(inner, ExceptionGroup):
                return inner if isinstance(inner, UpstreamError) else None
            group = inner
    return None


def _where(context: Context | None) -> str:
    """``in /tmp/x`` for a known directory, else a phrase saying it is unknown."""
    if context is not None and context.cwd:
        return f"in {context.cwd}"
    return "(in its default directory: the old one was not known)"
