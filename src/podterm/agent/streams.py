"""Agent-side streams: the output ring and input offsets that outlive a tunnel connection.

Every stream the gateway OPENs becomes an :class:`AgentStream`.  It lives as
long as the gateway wants it (until the gateway's CLOSE), across any number of
tunnel connections, and holds what a resume needs (docs/protocol.md §8):

* **output**: an :class:`~podterm.session.ring.OutputRing` numbered by absolute
  output offset (STDOUT and STDERR together), plus where the channel switches
  (no-tty streams).  ``ring.start .. ring.end`` is RESUME's ``out_start ..
  out_offset``; ``sent`` is the next offset to send on this connection,
  ``acked`` the gateway's latest ACK.
* **input**: STDIN bytes received and not yet written to the process (at most
  one window: the gateway's credit bounds them).  What was received is the
  mux's ``received`` (RESUME's ``in_acked``); what was written is reported to
  the mux with ``consumed`` and becomes the input ACK.
* **exit**: the process's :class:`~podterm.protocol.events.Exit`, sent after
  its last output byte and again after every resume, until the gateway CLOSEs.

Producing output (the ring's flow control)
------------------------------------------
While the tunnel is up, output is produced into the ring only while
``ring.end - acked < ring capacity``, so no byte the gateway has not
acknowledged is ever trimmed while it could still be sent (the tunnel has no
mid-connection gap).  A producer with more bytes than room keeps them (at most
one read) and waits for ACKs: the process then blocks on its terminal, as a
local shell does.  While the tunnel is **down** the ring takes everything and
trims its oldest bytes: the shell keeps running, and if more than the ring's
capacity was produced, the next RESUME reports the lost bytes as a ``gap``.

Retention: ACKs are credit, never a release.  The ring keeps the newest
``ring_bytes`` (``--retain-bytes``) of output whether or not a gateway
acknowledged them, because a gateway that dies may have acknowledged bytes
its clients never received.  The gateway that adopts the stream asks for
output from what the client is known to hold (RESUME ``in_acked``), which
may be below the dead gateway's ACK; ``acked`` is reset to it, so credit and
the ring's trimming count from there.  The stream's ``session`` label (from
its OPEN) goes into every RESUME entry: it is how that gateway finds the
session.

Kinds of stream: :class:`ProcessStream` runs a process through the local
upstream (a PTY or pipes) with three tasks; :class:`podterm.agent.echo.EchoStream`
echoes its input with no task at all; :class:`FailedStream` carries the error of a
process that could not start (its message as output, then EXIT 127).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from podterm.errors import UpstreamError
from podterm.protocol.events import Exit, Gap, ResumeEntry
from podterm.protocol.offsets import ReplayRange
from podterm.session.ring import OutputRing, channel_runs
from podterm.upstream.base import ExitStatus, OutputChannel, StreamSpec, UpstreamStream
from podterm.upstream.local import LocalUpstream

__all__ = [
    "AgentStream",
    "AgentStreamStatistics",
    "FailedStream",
    "ProcessStream",
    "SEND_CHUNK_BYTES",
    "StreamHost",
]

log = logging.getLogger(__name__)

_STDOUT = int(OutputChannel.STDOUT)
_STDERR = int(OutputChannel.STDERR)
_EOF = int(OutputChannel.EOF)

#: Most bytes in one STDOUT/STDERR message: the size the gateway uses towards
#: its clients (docs/protocol.md §4: "the server sends at most 32 KiB").
SEND_CHUNK_BYTES = 32 * 1024
#: Channel switch points kept for a no-tty stream, as the session keeps them:
#: past this many inside the ring later stderr bytes are labelled stdout
#: (offsets and content stay exact, only the label is lost).
MAX_CHANNEL_MARKS = 4096
_UNBOUNDED = 1 << 62
#: Exit status of a command that could not be started: what a POSIX shell
#: returns for "command not found" (and what kubectl users see from kubelet).
START_FAILED_CODE = 127


class StreamHost:
    """What a stream needs from its agent: the link state, wake-ups and ACK accounting.

    The agent (:class:`podterm.agent.main.Agent`) implements it; tests may
    pass a stand-in.
    """

    link_up: bool = False

    def stream_ready(self, stream: AgentStream) -> None:
        """``stream`` has something to send (output, EXIT, a gap)."""
        raise NotImplementedError

    def input_consumed(self, stream: AgentStream, n: int) -> None:
        """``n`` input bytes of ``stream`` reached the process (or were discarded)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class AgentStreamStatistics:
    """A snapshot of one stream (for tests and ``statistics()``)."""

    stream_id: int
    kind: str
    out_start: int
    out_offset: int
    sent: int
    acked: int
    input_buffered: int
    exited: bool
    pid: int | None


class AgentStream:
    """One stream's resumable state; see the module docstring.

    Args:
        stream_id: the tunnel stream id (chosen by the gateway).
        window: the stream's credit window (from its OPEN).
        tty: whether output is one terminal channel (no channel marks kept).
        host: the agent.
        ring_bytes, chunk_bytes: the output ring's size and unit of allocation.
    """

    kind = "stream"

    __slots__ = ("stream_id", "window", "tty", "host", "ring", "_marks", "acked", "sent",
                 "resumed", "gap", "exit", "exit_sent", "closed", "_input", "_input_bytes",
                 "_room_lot", "session", "__weakref__")

    def __init__(self, stream_id: int, window: int, tty: bool, host: StreamHost, *,
                 ring_bytes: int, chunk_bytes: int) -> None:
        self.stream_id = stream_id
        self.window = window
        self.tty = tty
        self.host = host
        self.ring = OutputRing(ring_bytes, chunk_bytes)
        self._marks: deque[tuple[int, int]] | None = None  # (offset, channel); None: all stdout
        #: The gateway's latest output ACK (it consumed everything before).
        self.acked = 0
        #: Next output offset to send on the current connection.
        self.sent = 0
        #: Credit is live on the current connection (its RESUME listed us).
        self.resumed = False
        #: A ``gap`` CONTROL to send before any output (set by a resume).
        self.gap: Gap | None = None
        #: The process's EXIT, once it has ended and every output byte is in the ring.
        self.exit: Exit | None = None
        self.exit_sent = False
        self.closed = False
        self._input: deque[bytes] = deque()
        self._input_bytes = 0
        self._room_lot = trio.lowlevel.ParkingLot()
        #: The gateway's session id from the OPEN; reported in every RESUME so a
        #: gateway that did not open the stream can adopt it.
        self.session: str | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("exited" if self.exit else "running")
        return (f"<{type(self).__name__} {self.stream_id} {state} out={self.ring.start}.."
                f"{self.ring.end} sent={self.sent} acked={self.acked}>")

    @property
    def pid(self) -> int | None:
        return None

    def statistics(self) -> AgentStreamStatistics:
        return AgentStreamStatistics(self.stream_id, self.kind, self.ring.start, self.ring.end,
                                     self.sent, self.acked, self._input_bytes,
                                     self.exit is not None, self.pid)

    # -------------------------------------------------------------- output

    def room(self) -> int:
        """Output bytes the ring may take now (see "Producing output")."""
        if not self.host.link_up:
            return _UNBOUNDED  # keep the shell running; the ring trims its oldest bytes
        return self.ring.capacity_bytes - (self.ring.end - self.acked)

    async def wait_room(self) -> None:
        """Wait until :meth:`room` is positive (an ACK or a link change).

        Raises:
            trio.ClosedResourceError: the stream was closed meanwhile.
        """
        await trio.lowlevel.checkpoint()
        while self.room() <= 0:
            if self.closed:
                raise trio.ClosedResourceError("stream was closed")
            await self._room_lot.park()

    def wake_producer(self) -> None:
        """Room may have changed: re-check (ACK, link up or down, close)."""
        self._room_lot.unpark_all()

    def produce(self, channel: int, data: bytes) -> None:
        """Append output (the caller checked :meth:`room`, or the link is down)."""
        ring = self.ring
        if channel == _STDERR or self._marks is not None:
            marks = self._marks
            if marks is None:
                marks = self._marks = deque()
            last = marks[-1][1] if marks else _STDOUT
            if channel != last:
                while len(marks) > 1 and marks[1][0] <= ring.start:
                    marks.popleft()
                if len(marks) < MAX_CHANNEL_MARKS:
                    marks.append((ring.end, channel))
        ring.append(data)
        self.host.stream_ready(self)

    def pending_output(self) -> int:
        """Bytes produced and not yet sent on this connection (0 unless resumed)."""
        return self.ring.end - self.sent if self.resumed and not self.closed else 0

    def take_output(self, n: int) -> list[tuple[int, bytes]]:
        """The next ``n`` output bytes from ``sent`` as ``(channel, data)`` pieces; advance ``sent``.

        Pieces never mix channels and hold at most :data:`SEND_CHUNK_BYTES`.
        """
        start = self.sent
        stop = min(self.ring.end, start + n)
        pieces: list[tuple[int, bytes]] = []
        for run_start, run_end, channel in channel_runs(self._marks, start, stop, _STDOUT):
            pos = run_start
            while pos < run_end:
                chunk = self.ring.read_from(pos, min(SEND_CHUNK_BYTES, run_end - pos))
                if not isinstance(chunk, bytes) or not chunk:
                    # Producing is held back while the link is up, so a byte
                    # after ``acked`` never leaves the ring: this is a bug.
                    raise UpstreamError(f"stream {self.stream_id}: output {pos} left the ring "
                                        "before it was sent")
                pieces.append((channel, chunk))
                pos += len(chunk)
        self.sent = stop
        return pieces

    def on_ack(self, offset: int) -> None:
        """The gateway consumed output up to ``offset`` (the mux validated it)."""
        if offset > self.acked:
            self.acked = offset
            self.wake_producer()

    def exit_due(self) -> bool:
        """EXIT goes out once, after the last output byte, on every connection."""
        return (self.exit is not None and not self.exit_sent and self.resumed
                and not self.closed and self.sent >= self.ring.end and self.gap is None)

    def finish(self, status: ExitStatus, reason: str = "exited") -> None:
        """The process ended and its output is all in the ring: EXIT is due."""
        if self.exit is None:
            self.exit = Exit(status.code, status.signal, reason)
            self.host.stream_ready(self)

    # -------------------------------------------------------------- resume

    def resume_entry(self, received: int) -> ResumeEntry:
        """This stream's line of the agent's RESUME; ``received`` is the mux's input offset."""
        return ResumeEntry(self.stream_id, self.window, self.ring.start, self.ring.end, received,
                           self.session)

    def on_resume(self, replay: ReplayRange) -> None:
        """The RESUME exchange listed this stream: resend from ``replay.start`` (gap first)."""
        self.sent = replay.start
        # The gateway holds output up to ``replay.start`` and no further: that is
        # where credit counts from now, even below an earlier gateway's ACK (a
        # new gateway resumes from what its client is known to hold).  So
        # nothing from here on leaves the ring before this gateway has it.
        self.acked = replay.start
        self.gap = Gap(replay.gap_from, replay.start) if replay.gap_from is not None else None
        self.exit_sent = False
        self.resumed = True
        self.wake_producer()
        self.host.stream_ready(self)

    def on_disconnect(self) -> None:
        """The connection ended: nothing is sent until the next RESUME."""
        self.resumed = False
        self.gap = None
        self.wake_producer()  # the ring takes everything now

    # --------------------------------------------------------------- input

    @property
    def input_buffered(self) -> int:
        return self._input_bytes

    def feed_input(self, data: bytes) -> None:
        """STDIN from the gateway (already counted as received by the mux)."""
        self._input.append(data)
        self._input_bytes += len(data)
        self._input_arrived()

    def _input_arrived(self) -> None:
        """Hook: a process stream wakes its input pump; an echo stream echoes."""

    def _discard_input(self) -> None:
        """The process no longer reads: count every buffered byte as consumed."""
        n = self._input_bytes
        self._input.clear()
        self._input_bytes = 0
        if n:
            self.host.input_consumed(self, n)

    def resize(self, cols: int, rows: int) -> None:
        """The gateway's RESIZE (no-op unless a terminal backs the stream)."""

    # ---------------------------------------------------------------- life

    def close(self) -> None:
        """The gateway CLOSEd the stream: stop (kill the process, if any), keep nothing."""
        self.closed = True
        self._input.clear()
        self._input_bytes = 0
        self.wake_producer()


class FailedStream(AgentStream):
    """A stream whose command could not start: its message as output, then EXIT 127.

    The gateway's session shows the message like a shell's "command not
    found" and ends with status 127 (docs/agent.md).
    """

    kind = "failed"
    __slots__ = ()

    def __init__(self, stream_id: int, window: int, tty: bool, host: StreamHost, message: str,
                 *, ring_bytes: int, chunk_bytes: int) -> None:
        super().__init__(stream_id, window, tty, host, ring_bytes=ring_bytes,
                         chunk_bytes=chunk_bytes)
        text = f"podterm agent: {message}\r\n" if tty else f"podterm agent: {message}\n"
        self.produce(_STDOUT if tty else _STDERR, text.encode("utf-8", "replace"))
        self.finish(ExitStatus(code=START_FAILED_CODE, signal=None), "start_failed")

    def feed_input(self, data: bytes) -> None:
        # Nobody reads it: acknowledge and drop, so the gateway's log empties.
        self.host.input_consumed(self, len(data))


class ProcessStream(AgentStream):
    """A process started by the local upstream; three tasks while it runs.

    * the **output pump** reads the process and produces into the ring,
      waiting for room while the link is up (module docstring);
    * the **input pump** writes buffered STDIN to the process and reports it
      consumed (that is the input ACK: the shell has the bytes);
    * the **supervisor** waits for the exit, lets the output drain (bounded by
      ``exit_drain_s`` while the pump reads; output held back by flow control
      waits for the gateway), kills what is left, and makes EXIT due.

    Args:
        upstream: where to start the process.
        spec: what to start.
        exit_drain_s: how long output is still read after the leader exits.
        kill_timeout_s: bound on killing and reaping the process.
        read_bytes: most bytes asked of the process per read.

    Start with ``nursery.start_soon(stream.run)``.  A process that cannot
    start ends the stream as :class:`FailedStream` does (its reason as
    output, EXIT 127).
    """

    kind = "process"
    __slots__ = ("upstream", "spec", "exit_drain_s", "kill_timeout_s", "read_bytes", "_proc",
                 "_size", "_scope",
                 "_input_lot", "_eof", "_throttled", "_status_lot", "_stdin_dead")

    def __init__(self, stream_id: int, window: int, host: StreamHost, upstream: LocalUpstream,
                 spec: StreamSpec, *, ring_bytes: int, chunk_bytes: int,
                 exit_drain_s: float = 2.0, kill_timeout_s: float = 10.0,
                 read_bytes: int = 65536) -> None:
        super().__init__(stream_id, window, spec.tty, host, ring_bytes=ring_bytes,
                         chunk_bytes=chunk_bytes)
        self.upstream = upstream
        self.read_bytes = read_bytes
        self.spec = spec
        self.exit_drain_s = exit_drain_s
        self.kill_timeout_s = kill_timeout_s
        self._proc: UpstreamStream | None = None
        self._size = (spec.cols, spec.rows)  # the latest RESIZE (applied once started)
        self._scope = trio.CancelScope()
        self._input_lot = trio.lowlevel.ParkingLot()
        self._status_lot = trio.lowlevel.ParkingLot()
        self._eof = False
        self._throttled = False
        self._stdin_dead = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the process, run it to its end, then release it.  See the class docstring.

        Resource handling: the process is closed (killed, reaped) before this
        returns, whether it ended, the gateway closed the stream, or the agent
        is shutting down.
        """
        try:
            self._proc = await self.upstream.open(self.spec)
        except UpstreamError as exc:
            # Nothing started: say why on the stream, as a shell would, and exit 127.
            task_status.started()
            log.info("agent.stream.start.failed %d: %s", self.stream_id, exc.message)
            text = f"podterm agent: {exc.message}\r\n" if self.tty else \
                f"podterm agent: {exc.message}\n"
            if not self.closed:
                self.produce(_STDOUT if self.tty else _STDERR, text.encode("utf-8", "replace"))
                self.finish(ExitStatus(code=START_FAILED_CODE, signal=None), "start_failed")
            return
        task_status.started()
        try:
            if self._size != (self.spec.cols, self.spec.rows):
                self.resize(*self._size)  # a RESIZE that came before the process ran
            with self._scope:
                if self.closed:  # closed while starting
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_output)
                    nursery.start_soon(self._pump_input)
                    status = await self._supervise()
                    nursery.cancel_scope.cancel()
                self.finish(status)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.kill_timeout_s):
                await self._proc.aclose()
            self._eof = True
            # Nobody reads input any more: acknowledge and drop what comes.
            self._stdin_dead = True
            self._discard_input()
            log.debug("agent.stream.process.complete %d pid=%s", self.stream_id, self.pid)

    async def _pump_output(self) -> None:
        proc = self._proc
        assert proc is not None
        try:
            while True:
                room = self.room()
                if room <= 0:
                    self._set_throttled(True)
                    await self.wait_room()
                    continue
                self._set_throttled(False)
                channel, data = await proc.receive_some(min(room, self.read_bytes))
                if channel == _EOF:
                    break
                # The link may have come up while we read: produce only what
                # fits; keep the rest (one read at most) until ACKs make room.
                view = memoryview(data)
                while view:
                    room = self.room()
                    if room <= 0:
                        self._set_throttled(True)
                        await self.wait_room()
                        continue
                    take = view if room >= len(view) else view[:room]
                    self.produce(channel, bytes(take))
                    view = view[len(take):]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the process is gone: its output is over
        finally:
            self._eof = True
            self._status_lot.unpark_all()

    def _set_throttled(self, value: bool) -> None:
        if self._throttled != value:
            self._throttled = value
            self._status_lot.unpark_all()

    async def _wait_status(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._status_lot.park()

    async def _supervise(self) -> ExitStatus:
        proc = self._proc
        assert proc is not None
        status = await proc.wait_exit()
        # Output may still be in flight, or held by a background job that keeps
        # the terminal open: read on for a bounded time (only while reading;
        # output held back by flow control waits for the gateway), then kill.
        while not self._eof:
            if self._throttled:
                await self._wait_status(lambda: self._eof or not self._throttled)
                continue
            with trio.move_on_after(self.exit_drain_s) as drain:
                await self._wait_status(lambda: self._eof or self._throttled)
            if drain.cancelled_caught:
                break
        if not self._eof:
            with trio.move_on_after(self.kill_timeout_s):
                await proc.aclose()
            with trio.move_on_after(self.kill_timeout_s):
                await self._wait_status(lambda: self._eof)
        return status

    def _input_arrived(self) -> None:
        if self._stdin_dead:
            self._discard_input()
        else:
            self._input_lot.unpark_all()

    async def _pump_input(self) -> None:
        proc = self._proc
        assert proc is not None
        queue = self._input
        while True:
            if not queue:
                await self._input_lot.park()
                continue
            piece = queue[0]
            try:
                await proc.send_stdin(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The process closed its input or is gone: what is buffered can
                # never be written; count it as consumed, from now on too.
                self._stdin_dead = True
                self._discard_input()
                return
            queue.popleft()
            self._input_bytes -= len(piece)
            self.host.input_consumed(self, len(piece))

    def resize(self, cols: int, rows: int) -> None:
        self._size = (cols, rows)
        proc = self._proc
        if proc is None or self.exit is not None or self.closed or self._eof:
            return
        try:
            proc.resize(cols, rows)
        except (OSError, ValueError, trio.ClosedResourceError) as exc:
            log.debug("agent.stream.resize.failed %d: %s", self.stream_id, exc)

    def close(self) -> None:
        super().close()
        self._scope.cancel()  # run()'s finally kills and reaps the process
