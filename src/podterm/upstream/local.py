"""The local upstream: shells and commands on this machine, in a PTY or on pipes.

This is the embedded default for a first run and the workhorse of tests and
benchmarks, so it is built to hold thousands of streams in one trio process:

- No fork.  Children start with ``posix_spawn`` (CLONE_VM|CLONE_VFORK: about
  0.2 ms whatever our RSS, and no Python code in the child) as leaders of their
  own session; a PTY child opens the slave by name, which makes it its
  controlling terminal.  ``subprocess`` with ``preexec_fn`` would fork, holding
  the GIL while page tables are copied (30 ms at 700 MB), stalling every
  session on the machine.  The child inherits only fds without close-on-exec
  (Python opens everything close-on-exec, PEP 446) plus its stdio.
- No thread per stream.  Every fd we read or write is non-blocking and driven
  by ``trio.lowlevel.wait_readable`` / ``wait_writable``; one ``os.read`` per
  readiness returns everything available (up to ``max_bytes``).
- Exit is observed through a pidfd (Linux >= 5.3) with ``waitid(WNOWAIT)``, so
  the leader is *not reaped* until :meth:`LocalStream.aclose`.  While it is a
  zombie its pid, which is also the process-group id, cannot be reused, so the
  final ``killpg`` can never hit an unrelated process group (``pid_max`` is
  often only 32768).  Without pidfd support a thread per waiting stream blocks
  in ``waitid`` instead (the fallback trio itself uses).
- Fds per stream: TTY 2 (PTY master, pidfd); pipes 4-5 (stdin, stdout, stderr,
  pidfd, and an epoll fd that lets one task wait for stdout *or* stderr without
  spawning a task per wait; it is closed as soon as one of them reaches EOF).
- Bulk output on pipes: a read that comes back as full as the pipe (64 KiB by
  default) means the process writes faster than we read (``cat`` of a big
  file).  That pipe is then grown once to :data:`BULK_PIPE_BYTES` and read
  that much at a time, so every trip through the session, its ring and the
  client's socket moves four times the bytes (issue 9: the bulk relay's cost
  is per read, not per byte).  Only such pipes hold the larger kernel buffer;
  when the kernel refuses (an unprivileged user past ``pipe-user-pages-soft``)
  the pipe keeps its size.  A PTY returns at most its line discipline's
  4 KiB per read whatever it is asked, so its reads stay at 64 KiB.

Linux first (PTYs, ``/proc``, pidfd, epoll); other POSIX systems fall back
where noted.  The stream contract is in :mod:`podterm.upstream.base`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import shutil
import signal
import struct
import termios
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass

import trio

from ..errors import UpstreamError
from ..net.idle import IdleSockets
from .base import Context, ExitStatus, OutputChannel, StreamSpec, _check_dimension

__all__ = [
    "LocalStream",
    "LocalStreamStatistics",
    "LocalUpstream",
    "LocalUpstreamStatistics",
]

logger = logging.getLogger(__name__)

_HAVE_PIDFD = hasattr(os, "pidfd_open")
_HAVE_EPOLL = hasattr(select, "epoll")

# How long aclose() waits for the leader to die after SIGKILL before it gives up
# and leaves the zombie to a later reap.  SIGKILL takes effect at once unless the
# process is in uninterruptible sleep (a hung NFS mount); this is a bound, not a delay.
_REAP_TIMEOUT_S = 5.0
# The environment a TTY shell gets unless the spec says otherwise: what xterm.js
# emulates, and what kubectl's users' terminals almost always are.
_DEFAULT_TERM = "xterm-256color"
# Variables never inherited from the gateway's own environment: its secrets.
_PRIVATE_ENV_PREFIX = "PODTERM_"
# waitid() blocked in threads (only without pidfd): one per waiting stream.
_FALLBACK_WAIT_THREADS = 65536
# Bytes asked of one read until a pipe proves busy: a Linux pipe's default
# capacity.  The bytes object is allocated at this size and shrunk to what
# arrived, so it is kept below glibc's 128 KiB mmap threshold for the many
# small reads (keystroke echoes).
#: A tty read smaller than this looks interactive (see ``LocalStream._tty_quiet``).
_TTY_QUIET_BYTES = 1024
_READ_BYTES = 65536
#: What a pipe that came back full is grown to (F_SETPIPE_SZ), and then read
#: at a time: one session read of this size, one ring segment, one writev.
BULK_PIPE_BYTES = 262144
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only

# Streams whose leader could not be reaped within _REAP_TIMEOUT_S; later
# aclose() calls retry, so no zombie (or its pidfd) is held forever.
_unreaped: list[_Child] = []


@dataclass(frozen=True, slots=True)
class LocalStreamStatistics:
    """A snapshot of one :class:`LocalStream`."""

    pid: int
    tty: bool
    bytes_stdout: int
    bytes_stderr: int
    bytes_stdin: int
    eof: bool
    exit_status: ExitStatus | None
    closed: bool


@dataclass(frozen=True, slots=True)
class LocalUpstreamStatistics:
    """A snapshot of one :class:`LocalUpstream`."""

    streams_opened: int
    streams_open: int
    spawn_failures: int


def _status_from_waitid(result: os.waitid_result) -> ExitStatus:
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(code=result.si_status, signal=None)
    # CLD_KILLED or CLD_DUMPED: si_status is the signal number.
    return ExitStatus(code=None, signal=result.si_status)


def _status_from_wait_status(wait_status: int) -> ExitStatus:
    code = os.waitstatus_to_exitcode(wait_status)  # negative: killed by that signal
    if code < 0:
        return ExitStatus(code=None, signal=-code)
    return ExitStatus(code=code, signal=None)


def _close_fd(fd: int) -> None:
    """Close an fd a task may be waiting on: wake that task first (trio's rule)."""
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


class _Child:
    """The leader process: exit without reaping, signals to its group, the final reap.

    Invariant: ``signal_group`` only runs while the leader is unreaped, so the
    pgid is pinned by the (possibly zombie) leader and names our group.
    """

    __slots__ = ("_limiter", "_lock", "_pidfd", "_status", "pid", "reaped")

    def __init__(self, pid: int, limiter: trio.CapacityLimiter) -> None:
        self.pid = pid
        self._status: ExitStatus | None = None
        self._lock = trio.Lock()
        self._limiter = limiter  # for the waitid thread when there is no pidfd
        self.reaped = False
        self._pidfd: int | None = None
        if _HAVE_PIDFD:
            try:
                # Nothing reaps this child but us, so the pid still names it here.
                self._pidfd = os.pidfd_open(self.pid)
            except OSError as exc:
                # ENOSYS/EPERM: an old kernel or a sandbox; use the thread fallback.
                # Anything else (EMFILE) is a real failure for the caller.
                if exc.errno not in (errno.ENOSYS, errno.EPERM):
                    raise

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    def status_nowait(self) -> ExitStatus | None:
        """The exit status if the leader has exited, without reaping it."""
        if self._status is None and not self.reaped:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if result is not None:
                self._status = _status_from_waitid(result)
        return self._status

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            await trio.lowlevel.checkpoint()
            return self._status
        # One waiter on the pidfd at a time (trio allows one reader per fd); a
        # cancelled waiter releases the lock and the next one takes over.
        async with self._lock:
            if self._status is None:
                if self._pidfd is not None:
                    # Readable once the leader is a zombie.  aclose() may reap it
                    # and close the pidfd before this task runs again: then the
                    # close wakes us and the status is already recorded.
                    with suppress(trio.ClosedResourceError):
                        await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    await trio.to_thread.run_sync(
                        _wait_exited, self.pid, abandon_on_cancel=True, limiter=self._limiter
                    )
                if self._status is None:
                    # Exited, not yet reaped: waitid returns at once.
                    result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
                    assert result is not None  # without WNOHANG it returns a result or raises
                    self._status = _status_from_waitid(result)
        return self._status

    def signal_group(self, sig: int) -> None:
        if self.reaped:
            return
        # ESRCH: every member already exited.  EPERM: only members we may not
        # signal are left (a setuid program); the others were signalled.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def reap_nowait(self) -> bool:
        """Reap the zombie leader if it has exited; True once reaped."""
        if self.reaped:
            return True
        try:
            pid, wait_status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else in this process reaped our child (a SIGCHLD handler
            # calling waitpid(-1)?).  Nothing to reap; the status may be lost.
            pid, wait_status = self.pid, -1
        if pid == 0:
            return False
        self.reaped = True
        if self._status is None:
            if wait_status < 0:
                logger.warning("local.stream.status.lost pid=%d: reaped by someone else", self.pid)
                self._status = ExitStatus(code=255, signal=None)
            else:
                self._status = _status_from_wait_status(wait_status)
        if self._pidfd is not None:
            _close_fd(self._pidfd)
            self._pidfd = None
        return True


def _wait_exited(pid: int) -> None:
    """Block (in a worker thread) until ``pid`` has exited, without reaping it."""
    # ChildProcessError: reaped meanwhile by aclose(), which recorded the status.
    with suppress(ChildProcessError):
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _current_dir() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # our own directory was removed
        return None


def _reap_leftovers() -> None:
    _unreaped[:] = [child for child in _unreaped if not child.reap_nowait()]


class LocalStream:
    """One process (and its process group) started by :class:`LocalUpstream`.

    Implements :class:`podterm.upstream.base.UpstreamStream`; the contract,
    including the EOF/exit ordering, is in that module's docstring.  Local
    specifics:

    - TTY: the child is a session leader with the PTY slave as controlling
      terminal; ``resize`` sets the size on the PTY (the kernel sends SIGWINCH
      to the foreground process group); ``close_stdin`` writes the terminal's
      VEOF character (twice if a line is partly typed, as a person would).
    - Pipes: ``receive_some`` alternates between stdout and stderr when both
      have data, so neither starves.

    Resource handling: ``aclose`` sends SIGHUP, SIGTERM and SIGCONT to the
    leader's process group (and, with a TTY, to the terminal's foreground
    group), waits up to ``kill_grace_s`` for the leader, then SIGKILLs the
    group, closes every fd and reaps the leader.  Cancelling ``aclose`` skips
    the grace, never the SIGKILL or the fd cleanup.  Processes that left the
    group (``setsid``, a job-control shell's background jobs) get the PTY
    hangup's SIGHUP but are not otherwise chased.
    """

    def __init__(
        self,
        *,
        child: _Child,
        spec: StreamSpec,
        master: int | None,
        stdin_fd: int | None,
        stdout_fd: int | None,
        stderr_fd: int | None,
        context_env: Mapping[str, str],
        launch_cwd: str | None,
        kill_grace_s: float,
        on_close: Callable[[], None] | None = None,
        watcher: Callable[[], IdleSockets | None] | None = None,
    ) -> None:
        self._child = child
        self._watcher = watcher
        self.pid: int = child.pid
        self.tty: bool = spec.tty
        self._master = master
        self._stdin_fd = stdin_fd if master is None else master
        self._stdout_fd = stdout_fd if master is None else master
        self._stderr_fd = stderr_fd
        self._epoll: select.epoll | None = None
        if self._stdout_fd is not None and self._stderr_fd is not None and _HAVE_EPOLL:
            self._epoll = select.epoll(2)
            self._epoll.register(self._stdout_fd, select.EPOLLIN)
            self._epoll.register(self._stderr_fd, select.EPOLLIN)
        self._context_env = dict(context_env)
        self._last_cwd = launch_cwd
        self._kill_grace_s = kill_grace_s
        self._on_close = on_close
        self._size = (spec.cols, spec.rows)
        self._stderr_first = False  # pipes: which channel to try first (fairness)
        self._at_line_start = True  # tty: whether the last byte typed ended a line
        self._stdin_closed = False
        self._eof = False
        # tty: the latest read was small (interactive output: a keystroke's
        # echo, a prompt), so the terminal is most likely empty now.
        self._tty_quiet = False
        self._closed = False
        self._receiving = False
        self._sending = False
        self._bytes_stdout = 0
        self._bytes_stderr = 0
        self._bytes_stdin = 0
        # Pipes: bytes asked of one read of stdout / stderr (see BULK_PIPE_BYTES);
        # growing is tried once per stream, for the first pipe that comes back full.
        self._stdout_read = _READ_BYTES
        self._stderr_read = _READ_BYTES
        self._pipe_grow_tried = False
        # tty: the session's push target for output read while its pump is
        # away (set_output_sink), who to call back then (park_reader), and a
        # read the target refused, which receive_some returns first.
        self._sink: Callable[[int, bytes], bool] | None = None
        self._reader_cb: Callable[[], None] | None = None
        self._watching: IdleSockets | None = None
        self._held: bytes | None = None

    def __repr__(self) -> str:
        status = self._child.status
        state = "closed" if self._closed else ("running" if status is None else status.reason)
        mode = "tty" if self.tty else "pipes"
        return (f"<LocalStream pid={self.pid} {mode} {state} out={self._bytes_stdout}"
                f" err={self._bytes_stderr} in={self._bytes_stdin}{' eof' if self._eof else ''}>")

    # -- output ---------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> tuple[int, bytes]:
        """Return ``(channel, data)`` with all output available now, up to ``max_bytes``.

        Returns ``(OutputChannel.EOF, b"")`` once every output channel is closed
        and drained, and again on every later call.

        Raises:
            trio.BusyResourceError: another task is already receiving.
            trio.ClosedResourceError: the stream was closed (also wakes a waiting call).
            ValueError: ``max_bytes`` < 1.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving from this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            if self._master is not None:
                result = await self._receive_tty(self._master, max_bytes)
            else:
                result = await self._receive_pipes(max_bytes)
        finally:
            self._receiving = False
        return result

    def set_output_sink(self, sink: Callable[[int, bytes], bool] | None) -> None:
        """Push output to ``sink(channel, data)`` while the reader is away (TTY).

        The session's output pump sets it before :meth:`park_reader`: output
        read from the terminal while the pump is parked is offered to
        ``sink`` first, from the watcher's task; a chunk it refuses (no room
        in the window, the recording writer behind) is held for the next
        :meth:`receive_some`, and the pump is called back.  ``sink`` must not
        block or raise.
        """
        self._sink = sink

    def park_reader(self, callback: Callable[[], None]) -> bool:
        """Let the reader leave while the terminal is quiet; ``callback()`` when it must read.

        TTY streams only, with a sink set, while the upstream has a watcher
        (:attr:`LocalUpstream.watcher`, the gateway's while it serves): the
        terminal's master is watched by it, so an idle shell's session runs
        no pump task, and a keystroke's echo goes into the session without
        waking one.  ``callback`` is called once: output the sink refused,
        the end of the output (the shell exited), a read error, or the
        stream closed.  False: the reader must stay.
        """
        master = self._master
        watcher = self._watcher() if self._watcher is not None else None
        if (watcher is None or self._sink is None or master is None or self._eof
                or self._closed or self._held is not None or self._receiving):
            return False
        if not watcher.watch(master, self._output_came):
            return False
        self._watching = watcher
        self._reader_cb = callback
        return True

    def _output_came(self) -> None:
        """The watcher's call: the quiet terminal has output (or its end)."""
        callback = self._reader_cb
        master = self._master
        if callback is None or master is None or self._closed:
            return
        try:
            data = os.read(master, _READ_BYTES)
        except BlockingIOError:
            data = None  # nothing after all: watch again
        except OSError:
            data = b""  # EIO (every slave closed: the end) or an error: the reader meets it
        watcher = self._watching
        if data is None or (data and self._offer(data)):
            drained = data is None or len(data) < _READ_BYTES
            if watcher is not None and watcher.watch(master, self._output_came,
                                                     drained=drained):
                return
        self._reader_cb = None
        self._watching = None
        callback()

    def _offer(self, data: bytes) -> bool:
        """Hand output read by the watcher to the sink; False: held for the reader."""
        self._bytes_stdout += len(data)
        self._tty_quiet = len(data) < _TTY_QUIET_BYTES
        sink = self._sink
        if sink is not None and sink(OutputChannel.STDOUT, data):
            return True
        self._held = data
        return False

    def _unpark_reader(self) -> None:
        """Closing: stop watching, and call the parked reader back (it meets the close)."""
        callback = self._reader_cb
        if callback is None:
            return
        self._reader_cb = None
        watcher, self._watching = self._watching, None
        if watcher is not None and self._master is not None:
            watcher.forget(self._master)
        callback()

    def _check_not_closed(self) -> None:
        # After every wait: aclose() may have run between our wake-up and now, and
        # the fd number we hold may already belong to some other session's PTY.
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")

    async def _receive_tty(self, master: int, max_bytes: int) -> tuple[int, bytes]:
        held = self._held
        if held is not None:  # read by the watcher's call, refused by the sink
            self._held = None
            await trio.lowlevel.cancel_shielded_checkpoint()
            return OutputChannel.STDOUT, held
        waited = False
        if self._tty_quiet and not self._eof:
            # After a small read the next one would most likely fail with
            # EAGAIN (a system call and an exception per keystroke's echo):
            # wait for output first.  A busy terminal gives reads of ~4 KiB
            # (the line discipline's buffer) and keeps reading first.
            await trio.lowlevel.wait_readable(master)
            self._check_not_closed()
            waited = True
        while not self._eof:
            try:
                data = os.read(master, max_bytes if max_bytes < _READ_BYTES else _READ_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(master)
                self._check_not_closed()
                waited = True
                continue
            except OSError as exc:
                # Linux: reading the master once every slave fd is closed fails
                # with EIO, after the buffered output has been read.  That is EOF.
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                self._eof = True
                break
            self._bytes_stdout += len(data)
            self._tty_quiet = len(data) < _TTY_QUIET_BYTES
            if not waited:
                # Yield even when data was ready, so one chatty shell cannot
                # starve every other task (trio's sockets do the same).
                await trio.lowlevel.cancel_shielded_checkpoint()
            return OutputChannel.STDOUT, data
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return OutputChannel.EOF, b""

    async def _receive_pipes(self, max_bytes: int) -> tuple[int, bytes]:
        waited = False
        while True:
            order = (
                ((OutputChannel.STDERR, self._stderr_fd), (OutputChannel.STDOUT, self._stdout_fd))
                if self._stderr_first
                else ((OutputChannel.STDOUT, self._stdout_fd), (OutputChannel.STDERR, self._stderr_fd))
            )
            for channel, fd in order:
                if fd is None:
                    continue
                size = self._stdout_read if channel == OutputChannel.STDOUT else self._stderr_read
                try:
                    data = os.read(fd, max_bytes if max_bytes < size else size)
                except BlockingIOError:
                    continue
                if not data:
                    self._close_output(channel)
                    continue
                if len(data) == _READ_BYTES and not self._pipe_grow_tried:
                    self._grow_pipe(channel, fd)
                # Next time try the other channel first: both get turns under load.
                self._stderr_first = channel == OutputChannel.STDOUT
                if channel == OutputChannel.STDOUT:
                    self._bytes_stdout += len(data)
                else:
                    self._bytes_stderr += len(data)
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return channel, data
            if self._stdout_fd is None and self._stderr_fd is None:
                self._eof = True
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return OutputChannel.EOF, b""
            await self._wait_output_readable()
            self._check_not_closed()
            waited = True

    def _grow_pipe(self, channel: OutputChannel, fd: int) -> None:
        """A read came back as full as the pipe: grow it, and read that much from now on."""
        self._pipe_grow_tried = True
        if _F_SETPIPE_SZ is None:
            return
        try:
            size = fcntl.fcntl(fd, _F_SETPIPE_SZ, BULK_PIPE_BYTES)
        except OSError as exc:  # EPERM past the user's pipe quota, EBUSY: keep the size
            logger.debug("upstream.local.pipe_grow.failed pid=%d: %s", self.pid, exc)
            return
        if channel == OutputChannel.STDOUT:
            self._stdout_read = size
        else:
            self._stderr_read = size

    async def _wait_output_readable(self) -> None:
        if self._stdout_fd is not None and self._stderr_fd is not None:
            if self._epoll is not None:
                # Level-triggered: the epoll fd is readable while either pipe is.
                await trio.lowlevel.wait_readable(self._epoll.fileno())
            else:  # no epoll here (tests force this path too)
                await _wait_any_readable(self._stdout_fd, self._stderr_fd)
        else:
            fd = self._stdout_fd if self._stdout_fd is not None else self._stderr_fd
            assert fd is not None
            await trio.lowlevel.wait_readable(fd)

    def _close_output(self, channel: OutputChannel) -> None:
        # The epoll set only ever holds both pipes; with one left we wait on it directly.
        if self._epoll is not None:
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        if channel == OutputChannel.STDOUT and self._stdout_fd is not None:
            _close_fd(self._stdout_fd)
            self._stdout_fd = None
        elif channel == OutputChannel.STDERR and self._stderr_fd is not None:
            _close_fd(self._stderr_fd)
            self._stderr_fd = None

    # -- input ----------------------------------------------------------------

    async def send_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` to the process's stdin, waiting while it does not read.

        If cancelled, a prefix of ``data`` may have been written;
        ``statistics().bytes_stdin`` counts exactly what was.

        Raises:
            trio.BusyResourceError: another task is already sending.
            trio.ClosedResourceError: stdin or the stream was closed.
            trio.BrokenResourceError: the process no longer reads its input.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending to this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed or self._stdin_closed or self._stdin_fd is None:
                raise trio.ClosedResourceError("stdin was closed")
            if self._master is not None and self._eof:
                # EOF on a PTY means no process holds the terminal any more; Linux
                # would accept and silently drop whatever we write.
                raise trio.BrokenResourceError("the terminal has no process left")
            await self._write_all(self._stdin_fd, data)
        finally:
            self._sending = False

    def send_stdin_nowait(self, data: bytes) -> int:
        """Write what the process's stdin takes now, without waiting; return the count.

        The relay's fast path (the session writes a keystroke from the link's
        own task instead of handing it to its input pump): one ``os.write``,
        no checkpoint.  0 means nothing was written, either because the input
        is full or because this stream cannot take input now (another task is
        sending, stdin or the stream is closed, the terminal is gone): the
        caller then queues ``data`` for :meth:`send_stdin`, which waits, or
        raises the error that applies.
        """
        fd = self._stdin_fd
        if (self._sending or self._closed or self._stdin_closed or fd is None or not data
                or (self._master is not None and self._eof)):
            return 0
        try:
            written = os.write(fd, data)
        except OSError:  # EAGAIN, or EPIPE/EIO: send_stdin waits, or reports it
            return 0
        if written and self.tty:
            self._at_line_start = data[written - 1] in (0x0A, 0x0D)
        self._bytes_stdin += written
        return written

    async def _write_all(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self.tty and len(view):
            self._at_line_start = view[-1] in (0x0A, 0x0D)
        waited = False
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                self._check_not_closed()
                waited = True
                continue
            except OSError as exc:
                # EPIPE: the reading end of the pipe is gone.  EIO: the PTY has no
                # slave left.  Either way the process cannot take more input.
                if exc.errno in (errno.EPIPE, errno.EIO):
                    raise trio.BrokenResourceError("the process no longer reads its input") from exc
                raise
            self._bytes_stdin += written
            view = view[written:]
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def close_stdin(self) -> None:
        """End the process's input: close the pipe, or type VEOF (Ctrl-D) on a TTY.

        On a TTY in canonical mode a partly typed line needs two VEOFs (the first
        only submits the line), so two are sent then.  Idempotent.

        Raises:
            trio.BusyResourceError: another task is sending.
            trio.BrokenResourceError: the terminal is gone (TTY only).
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending to this stream")
        if self._stdin_closed or self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._master is None:
            assert self._stdin_fd is not None
            self._stdin_closed = True
            _close_fd(self._stdin_fd)
            self._stdin_fd = None
            await trio.lowlevel.checkpoint()
            return
        if self._eof:  # nobody left on the terminal to see an EOF character
            self._stdin_closed = True
            await trio.lowlevel.checkpoint()
            return
        veof, canonical = self._terminal_eof()
        payload = veof if (self._at_line_start or not canonical) else veof * 2
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            await self._write_all(self._master, payload)
            self._stdin_closed = True
        finally:
            self._sending = False

    def _terminal_eof(self) -> tuple[bytes, bool]:
        """The slave's VEOF character and whether it is in canonical mode."""
        assert self._master is not None
        try:
            # On Linux TCGETS on a PTY master reports the slave's settings.
            attrs = termios.tcgetattr(self._master)
        except termios.error:
            return b"\x04", True
        char = attrs[6][termios.VEOF]
        veof = char if isinstance(char, bytes) else bytes([char])
        if veof == b"\x00":  # _POSIX_VDISABLE: the EOF key is switched off; use the default
            veof = b"\x04"
        return veof, bool(attrs[3] & termios.ICANON)

    # -- control --------------------------------------------------------------

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size to ``cols`` x ``rows`` (0..65535).

        The kernel sends SIGWINCH to the terminal's foreground process group
        when the size changes.  Without a TTY the size is only recorded.

        Raises:
            ValueError: a dimension is out of range.
            trio.ClosedResourceError: the stream was closed.
        """
        _check_dimension("cols", cols)
        _check_dimension("rows", rows)
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        self._size = (cols, rows)
        if self._master is not None:
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    @property
    def size(self) -> tuple[int, int]:
        """The last ``(cols, rows)`` set."""
        return self._size

    async def wait_exit(self) -> ExitStatus:
        """Wait for the leader process to exit and return how it ended.

        Any number of tasks may wait; works before and after ``aclose``.
        """
        return await self._child.wait()

    def capture_context(self) -> Context:
        """The leader's current working directory (``/proc/<pid>/cwd``) and start-up env.

        After the leader has exited, the last directory seen (or the one it
        was started in) is returned.
        """
        if not self._child.reaped:
            try:
                if not _in_cd_wrapper(self.pid):  # not there yet: keep the launch cwd
                    self._last_cwd = os.readlink(f"/proc/{self.pid}/cwd")
            except OSError:  # exited (a zombie has no cwd), or no /proc here
                pass
        return Context(cwd=self._last_cwd, env=dict(self._context_env))

    def statistics(self) -> LocalStreamStatistics:
        """A frozen snapshot of this stream's counters and state."""
        return LocalStreamStatistics(
            pid=self.pid,
            tty=self.tty,
            bytes_stdout=self._bytes_stdout,
            bytes_stderr=self._bytes_stderr,
            bytes_stdin=self._bytes_stdin,
            eof=self._eof,
            exit_status=self._child.status,
            closed=self._closed,
        )

    async def aclose(self) -> None:
        """Kill the process group, close every fd and reap the leader.  Idempotent.

        See the class docstring for the signal sequence and what cancellation skips.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._unpark_reader()
        child = self._child
        try:
            foreground = self._foreground_group()
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGCONT):
                child.signal_group(sig)
                if foreground is not None:
                    # Read from the terminal just now, while it is alive: a
                    # current group, not a stale number.
                    with suppress(ProcessLookupError, PermissionError):
                        os.killpg(foreground, sig)
            if child.status_nowait() is None:
                with trio.move_on_after(self._kill_grace_s):
                    await child.wait()
        finally:
            # Not skipped by cancellation: nothing of ours may outlive aclose.
            child.signal_group(signal.SIGKILL)
            self._release_fds()
            if child.status_nowait() is None:
                with trio.move_on_after(_REAP_TIMEOUT_S, shield=True):
                    await child.wait()
            if not child.reap_nowait():
                logger.warning("local.stream.reap.failed pid=%d: still running after SIGKILL", self.pid)
                _unreaped.append(child)
            _reap_leftovers()
            if self._on_close is not None:
                self._on_close()

    def _foreground_group(self) -> int | None:
        if self._master is None:
            return None
        try:
            group = os.tcgetpgrp(self._master)
        except OSError:
            return None
        return group if group > 0 and group != self.pid else None

    def _release_fds(self) -> None:
        if self._epoll is not None:
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        if self._master is not None:
            _close_fd(self._master)
            self._master = None
            self._stdin_fd = self._stdout_fd = None
        for name in ("_stdin_fd", "_stdout_fd", "_stderr_fd"):
            fd = getattr(self, name)
            if fd is not None:
                _close_fd(fd)
                setattr(self, name, None)


async def _wait_any_readable(*fds: int) -> None:
    """Return when any of ``fds`` is readable (fallback where there is no epoll)."""

    closed: list[trio.ClosedResourceError] = []

    async def wait_one(fd: int, scope: trio.CancelScope) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError as exc:
            closed.append(exc)  # re-raised bare below, not inside an ExceptionGroup
        scope.cancel()

    async with trio.open_nursery() as nursery:
        for fd in fds:
            nursery.start_soon(wait_one, fd, nursery.cancel_scope)
    if closed:
        raise closed[0]


# posix_spawn in Python 3.11 cannot change directory (no POSIX_SPAWN_CHDIR), so
# when a stream needs another cwd a shell does it and then execs the program:
# same pid, same session; "$0" is the directory, "$@" the command.
_SH = "/bin/sh"
_CD_THEN_EXEC = 'cd -- "$0" || exit 127; exec "$@"'
# Signals the child gets at their default disposition.  Ignored signals survive
# exec: Python ignores SIGPIPE and SIGXFSZ, and a gateway started under nohup
# ignores SIGHUP, none of which a shell should inherit.
_DEFAULT_SIGNALS = tuple(sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}))


_CD_WRAPPER_CMDLINE = f"{_SH}\0-c\0{_CD_THEN_EXEC}\0".encode()


def _in_cd_wrapper(pid: int) -> bool:
    """Whether ``pid`` is still the shell that changes directory before exec."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read(len(_CD_WRAPPER_CMDLINE)) == _CD_WRAPPER_CMDLINE


def _spawn(
    program: str,
    argv: list[str],
    env: Mapping[str, str],
    file_actions: list[tuple[int, int, str, int, int] | tuple[int, int, int]],
) -> int:
    """Start ``program`` as a session leader (its own session and process group).

    ``posix_spawn`` clones with CLONE_VM|CLONE_VFORK: no page tables are copied
    and no Python runs in the child, so it costs ~0.2 ms whatever our size.  A
    fork (what ``subprocess`` does for ``preexec_fn``) holds the GIL while it
    copies the page tables: 30 ms at 700 MB of RSS, a stall of every session.
    """
    return os.posix_spawn(
        program, argv, env, file_actions=file_actions, setsid=True,
        setsigmask=(), setsigdef=_DEFAULT_SIGNALS,
    )


def _above_stdio(fd: int) -> int:
    """``fd`` itself, or a close-on-exec copy numbered 3 or more.

    The child's ends are dup2'ed onto 0, 1 and 2 in order; one that already
    sat on 0-2 (a daemon with its stdio closed) could be overwritten first.
    """
    if fd > 2:
        return fd
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return copy


class LocalUpstream:
    """Runs streams as child processes of this process.

    Args:
        base_env: the environment every stream starts from, before the spec's
            ``env``.  ``None`` inherits this process's environment minus
            ``PODTERM_*`` variables (the gateway's secrets stay out of shells).
        default_cwd: working directory when the spec gives none.  ``None``:
            ``$HOME`` for a login shell, this process's cwd for a command.  A
            cwd other than ours is entered by ``/bin/sh`` just before it execs
            the command (same pid), as ``posix_spawn`` cannot change directory.
        kill_grace_s: how long ``aclose`` lets the leader handle SIGHUP/SIGTERM
            before SIGKILL.  2 s: enough for a shell to save its history.
        default_shell: the login shell when neither the spec's nor the base
            environment has ``SHELL``; started as ``SHELL -l``.

    Error handling: a command or directory that cannot be used raises
    :class:`podterm.errors.UpstreamError` from ``open`` (no stream, no fds left behind).
    """

    def __init__(
        self,
        *,
        base_env: Mapping[str, str] | None = None,
        default_cwd: str | None = None,
        kill_grace_s: float = 2.0,
        default_shell: str = "/bin/sh",
    ) -> None:
        if kill_grace_s < 0:
            raise ValueError(f"kill_grace_s must be >= 0, got {kill_grace_s}")
        if base_env is None:
            base_env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIX)}
        self._base_env = dict(base_env)
        self._default_cwd = default_cwd
        self._kill_grace_s = kill_grace_s
        self._default_shell = default_shell
        self._wait_limiter = trio.CapacityLimiter(_FALLBACK_WAIT_THREADS)
        self._opened = 0
        self._open = 0
        self._spawn_failures = 0
        #: Who watches quiet terminals (set by the gateway while it serves):
        #: their sessions' output pumps may leave (LocalStream.park_reader).
        #: None: every stream's pump waits in receive_some.
        self.watcher: IdleSockets | None = None

    def __repr__(self) -> str:
        return f"<LocalUpstream open={self._open} opened={self._opened}>"

    def _current_watcher(self) -> IdleSockets | None:
        return self.watcher

    def statistics(self) -> LocalUpstreamStatistics:
        """A frozen snapshot of this upstream's counters."""
        return LocalUpstreamStatistics(
            streams_opened=self._opened, streams_open=self._open, spawn_failures=self._spawn_failures
        )

    def _stream_closed(self) -> None:
        self._open -= 1

    async def open(self, spec: StreamSpec) -> LocalStream:
        """Start ``spec`` in a PTY (``spec.tty``) or on pipes and return its stream.

        The caller owns the stream and must ``aclose`` it.  Cancellation is
        honoured only before the process starts; once it runs, ``open`` returns
        it, so it can never be orphaned.

        Raises:
            UpstreamError: the command, shell or directory could not be used.
        """
        env = dict(self._base_env)
        if spec.tty:
            env["TERM"] = _DEFAULT_TERM
        env.update(spec.env)
        context_env = dict(spec.env)
        if spec.tty:
            context_env.setdefault("TERM", env["TERM"])
        cwd = spec.cwd or self._default_cwd
        if spec.command is None:
            # "-l": a login shell, understood by sh/dash, bash, zsh, ksh, fish and tcsh.
            argv = [env.get("SHELL") or self._default_shell, "-l"]
            if cwd is None and os.path.isdir(env.get("HOME", "")):
                cwd = env["HOME"]
        else:
            argv = list(spec.command)
        search_path = env.get("PATH", os.defpath)
        program = shutil.which(argv[0], path=search_path)
        if program is None:
            self._spawn_failures += 1
            raise UpstreamError(
                f"could not start {argv[0]!r}: not found or not executable (PATH={search_path!r})"
            )
        if cwd is not None:
            cwd = os.path.abspath(cwd)
            if not os.path.isdir(cwd):
                self._spawn_failures += 1
                raise UpstreamError(f"could not start {argv[0]!r}: no such directory {cwd!r}")
            if cwd != _current_dir():
                program, argv = _SH, [_SH, "-c", _CD_THEN_EXEC, cwd, program, *argv[1:]]
        await trio.lowlevel.checkpoint_if_cancelled()

        parent_fds: list[int] = []  # ours: closed on failure, kept on success
        child_fds: list[int] = []  # the child's ends: closed in the parent after the spawn
        try:
            if spec.tty:
                master, slave = os.openpty()
                parent_fds.append(master)
                child_fds.append(slave)
                # Size before exec, so the first prompt is laid out right.
                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", spec.rows, spec.cols, 0, 0))
                os.set_blocking(master, False)
                # The child is a session leader without a terminal (setsid); the
                # first terminal such a process opens without O_NOCTTY becomes its
                # controlling terminal (Linux tty_open), which job control and
                # SIGWINCH need.  So it opens the slave by name rather than
                # inheriting our fd, and no TIOCSCTTY (no code after fork) is needed.
                actions: list[tuple[int, int, str, int, int] | tuple[int, int, int]] = [
                    (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
                    (os.POSIX_SPAWN_DUP2, 0, 1),
                    (os.POSIX_SPAWN_DUP2, 0, 2),
                ]
            else:
                for child_reads in (True, False, False):  # stdin, stdout, stderr
                    read_end, write_end = os.pipe()  # both close-on-exec
                    ours, theirs = (write_end, read_end) if child_reads else (read_end, write_end)
                    parent_fds.append(ours)
                    child_fds.append(theirs)
                    # O_NONBLOCK is per open file description: the child's end stays blocking.
                    os.set_blocking(ours, False)
                for i, fd in enumerate(child_fds):
                    child_fds[i] = _above_stdio(fd)
                actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child_fds)]
            try:
                pid = _spawn(program, argv, env, actions)
            except OSError as exc:
                self._spawn_failures += 1
                raise UpstreamError(
                    f"could not start {argv[0]!r}: {exc.strerror}; check the command"
                ) from exc
            finally:
                for fd in child_fds:
                    os.close(fd)
                child_fds.clear()
            try:
                child = _Child(pid, self._wait_limiter)
                stream = LocalStream(
                    child=child,
                    spec=spec,
                    master=parent_fds[0] if spec.tty else None,
                    stdin_fd=None if spec.tty else parent_fds[0],
                    stdout_fd=None if spec.tty else parent_fds[1],
                    stderr_fd=None if spec.tty else parent_fds[2],
                    context_env=context_env,
                    launch_cwd=cwd if cwd is not None else _current_dir(),
                    kill_grace_s=self._kill_grace_s,
                    on_close=self._stream_closed,
                    watcher=self._current_watcher,
                )
            except OSError as exc:  # EMFILE for the pidfd or the epoll fd
                # Nothing would ever stop this process: stop it now.
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)  # SIGKILLed: returns at once
                self._spawn_failures += 1
                raise UpstreamError(f"could not watch the new process: {exc.strerror}") from exc
        except BaseException:
            for fd in parent_fds + child_fds:
                os.close(fd)
            raise
        self._opened += 1
        self._open += 1
        # The stream is the caller's now: yield, but do not raise Cancelled over it.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return stream
