"""The interface every upstream implements: open a stream, pump bytes, resize, close.

An *upstream* is where a shell actually runs (a local PTY, a kube-apiserver exec,
an agent tunnel).  The session layer only ever sees the two Protocols below, so a
session neither knows nor cares which kind it holds.

Stream contract (what the session/gateway integrator relies on)
----------------------------------------------------------------

Output.  ``receive_some(max_bytes)`` returns ``(OutputChannel.STDOUT, data)`` or
``(OutputChannel.STDERR, data)`` with ``1 <= len(data) <= max_bytes``: everything
that is available right now, in one read, never a byte at a time.  Once every
output channel is closed *and drained* it returns ``(OutputChannel.EOF, b"")``,
and keeps returning that on every later call.  Output the process wrote before
it exited is never lost: it is delivered before EOF.  A TTY stream has one
output channel (STDOUT); stderr shares the terminal.

Exit.  ``wait_exit()`` returns the :class:`ExitStatus` of the process the stream
started (the "leader").  It may be awaited by any number of tasks, before or
after ``aclose()``; once known the status never changes.

EOF and exit are independent events, in either order:

- exit before EOF: a background child still holds the terminal or the pipes
  (``sh -c 'sleep 99 &'`` in pipe mode), or output is still buffered;
- EOF before exit: the process closed stdout/stderr but keeps running.

So a session pumps output until EOF and, when ``wait_exit`` returns first, keeps
pumping for a bounded drain period, then calls ``aclose()`` (which kills what is
left, so EOF follows) and only then reports EXIT after the last output byte.

Input.  ``send_stdin(data)`` returns once every byte was handed to the process;
it waits while the process does not read (that is the back-pressure), and never
buffers without bound.  ``close_stdin()`` signals end of input (pipe: close it;
TTY: the terminal's EOF character, as a person pressing Ctrl-D).  After it,
``send_stdin`` raises :class:`trio.ClosedResourceError`.  Writing to a process
that has closed its input raises :class:`trio.BrokenResourceError` (with a TTY:
once output has reached EOF, as nobody is left on the terminal).  If
``send_stdin`` is cancelled, a prefix of the data may have been written.

Concurrency.  At most one task at a time in ``receive_some`` and at most one in
``send_stdin``/``close_stdin`` (a second raises :class:`trio.BusyResourceError`);
``resize``, ``capture_context`` and ``wait_exit`` from anywhere.  ``aclose()``
is idempotent; it wakes blocked readers and writers with
:class:`trio.ClosedResourceError`.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Protocol, runtime_checkable

__all__ = [
    "Context",
    "ExitStatus",
    "OutputChannel",
    "StreamSpec",
    "Upstream",
    "UpstreamStream",
]

_MAX_DIMENSION = 0xFFFF  # podterm.v1 RESIZE carries cols and rows as 16-bit big-endian


class OutputChannel(IntEnum):
    """The channel of an output chunk; numbered as podterm.v1 and channel.k8s.io number them."""

    EOF = 0  # not a wire channel: "every output channel is closed and drained"
    STDOUT = 1  # podterm.v1 0x01 STDOUT; k8s channel 1
    STDERR = 2  # podterm.v1 0x02 STDERR (no-tty sessions); k8s channel 2


def _check_dimension(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_DIMENSION:
        raise ValueError(f"{name} must be an integer in 0..{_MAX_DIMENSION}, got {value!r}")


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What to run and how.

    Attributes:
        command: argv to run, or ``None`` for an interactive login shell (the
            upstream's ``$SHELL``, else ``/bin/sh``).
        tty: allocate a terminal (one output channel) or use pipes (stdout and
            stderr apart).
        cols, rows: initial terminal size (0..65535; ignored without a tty).
        env: variables set on top of the upstream's base environment.  Copied
            into a read-only mapping.
        cwd: working directory, or ``None`` for the upstream's default.
        namespace, pod, container: the target; informational for ``local``.
    """

    command: tuple[str, ...] | None = None
    tty: bool = True
    cols: int = 80
    rows: int = 24
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None

    def __post_init__(self) -> None:
        if self.command is not None:
            command = tuple(self.command)
            if not command or not all(isinstance(a, str) for a in command):
                raise ValueError(f"command must be a non-empty sequence of str, got {self.command!r}")
            object.__setattr__(self, "command", command)
        _check_dimension("cols", self.cols)
        _check_dimension("rows", self.rows)
        env = dict(self.env)
        for key, value in env.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key:
                raise ValueError(f"bad environment entry {key!r}={value!r}")
        # A read-only copy: a spec is a value; the caller's dict may change later.
        object.__setattr__(self, "env", MappingProxyType(env))


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the leader process ended: exactly one of ``code`` and ``signal`` is set."""

    code: int | None
    signal: int | None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.signal is None):
            raise ValueError("exactly one of code and signal must be set")

    @property
    def exit_code(self) -> int:
        """The shell convention: the exit code, or 128 + the signal number."""
        if self.code is not None:
            return self.code
        assert self.signal is not None
        return 128 + self.signal

    @property
    def reason(self) -> str:
        """A short human phrase: ``"exit status 3"``, ``"killed by SIGTERM"``."""
        if self.code is not None:
            return f"exit status {self.code}"
        assert self.signal is not None
        try:
            name = _signal.Signals(self.signal).name
        except ValueError:
            name = f"signal {self.signal}"
        return f"killed by {name}"


@dataclass(frozen=True, slots=True)
class Context:
    """What a restarted shell needs to feel like the old one.

    Attributes:
        cwd: the shell's working directory, if known.
        env: the variables the stream was started with on top of the upstream's
            base environment (exports made later inside the shell are invisible
            from outside and not included).
    """

    cwd: str | None
    env: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class UpstreamStream(Protocol):
    """One running process behind an upstream.  See the module docstring for the contract."""

    @property
    def pid(self) -> int | None:
        """The leader's process id where the upstream knows it (``None`` otherwise)."""
        ...

    async def receive_some(self, max_bytes: int = 65536) -> tuple[int, bytes]:
        """The next output: ``(channel, data)``; ``(OutputChannel.EOF, b"")`` once all is read."""
        ...

    async def send_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Hand every byte of ``data`` to the process, waiting while it does not read."""
        ...

    async def close_stdin(self) -> None:
        """Signal end of input (pipe: close; tty: the EOF character)."""
        ...

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size; the foreground job gets SIGWINCH.  No-op without a tty."""
        ...

    async def wait_exit(self) -> ExitStatus:
        """Wait until the leader process has exited; return how."""
        ...

    def capture_context(self) -> Context:
        """The shell's current working directory and start-up environment."""
        ...

    async def aclose(self) -> None:
        """Terminate everything the stream started and release its resources."""
        ...


@runtime_checkable
class Upstream(Protocol):
    """A place where shells run."""

    async def open(self, spec: StreamSpec) -> UpstreamStream:
        """Start ``spec`` and return its stream.

        Raises:
            podterm.errors.UpstreamError: the process or connection could not be started.
        """
        ...
