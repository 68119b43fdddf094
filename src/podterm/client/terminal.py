"""The local terminal side of ``podterm exec/attach/join``.

:class:`Terminal` owns the process's stdin, stdout and stderr while a
session runs:

* raw mode (when stdin is a tty and the session has one): set on entry,
  restored on every exit path — normal return, exception, cancellation, and
  SIGTERM/SIGHUP/SIGINT/SIGQUIT (the signal becomes a cancellation of the
  session, so the same ``finally`` runs); only SIGKILL escapes it;
* stdin is read without a thread: the descriptor is made non-blocking and
  :func:`trio.lowlevel.wait_readable` waits for it; the blocking flag is put
  back on exit (it belongs to the open file description, which the shell
  that started us shares);
* stdout/stderr writes go through :meth:`write_output`, which copes with
  ``EAGAIN`` (stdin, stdout and stderr are often one file description, so
  making stdin non-blocking makes them non-blocking too);
* SIGWINCH becomes ``on_resize(cols, rows)`` via
  :func:`trio.open_signal_receiver`;
* the reconnect status line: :meth:`show_status` / :meth:`clear_status`.

The status line is drawn over the cursor's line on stderr and, when cleared,
that line is redrawn from the output seen since the last newline (the
shell's prompt and whatever the user typed): a shell at its prompt looks
exactly as before the disconnect.  When the output since the last newline
moved the cursor off its line (a full-screen program), the line is only
erased: the next screen update repaints it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import termios
import tty
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import trio

__all__ = ["EscapeScanner", "LineTracker", "Terminal", "TerminalSignal", "terminal_size"]

# Signals that end the session politely (the terminal is restored first).
_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
_READ_CHUNK = 32768  # the gateway accepts 64 KiB per STDIN message; stay well inside


class TerminalSignal(Exception):
    """A terminating signal arrived; ``signum`` says which (exit status 128+signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def terminal_size(fd: int) -> tuple[int, int] | None:
    """``(cols, rows)`` of the terminal on ``fd``, or ``None`` when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if size.columns <= 0 or size.lines <= 0:
        return None
    return size.columns, size.lines


# CSI sequences that stay on the current line: SGR (m), erase in line (K),
# cursor left/right (C, D, G), delete/insert/erase chars (P, @, X).
_LINE_LOCAL_CSI = re.compile(rb"\x1b\[[0-9;?]*[mKCDGP@X]")
_ANY_ESCAPE = re.compile(rb"\x1b")


class LineTracker:
    """The output written since the last newline, so a line can be redrawn.

    Bounded: beyond ``limit`` bytes, or once an escape sequence that leaves
    the line is seen, the line is marked unsafe to redraw until the next
    newline.
    """

    __slots__ = ("_line", "_safe", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._line = bytearray()
        self._safe = True

    def feed(self, data: bytes) -> None:
        cut = data.rfind(b"\n")
        if cut >= 0:
            self._line.clear()
            self._safe = True
            data = data[cut + 1:]
        if not self._safe:
            return
        self._line += data
        if len(self._line) > self.limit:
            self._unsafe()
        elif b"\x1b" in data and not self._only_line_local(bytes(self._line)):
            self._unsafe()

    @staticmethod
    def _only_line_local(line: bytes) -> bool:
        stripped = _LINE_LOCAL_CSI.sub(b"", line)
        return _ANY_ESCAPE.search(stripped) is None

    def _unsafe(self) -> None:
        self._safe = False
        self._line.clear()

    def redraw(self) -> bytes | None:
        """Bytes that rewrite the current line from column 0, or ``None`` if unsafe."""
        return bytes(self._line) if self._safe else None


class EscapeScanner:
    """ssh-style escapes in typed input: ``~.`` after a newline detaches, ``~~`` types ``~``.

    Only at the start of a line (the first byte, or after CR/LF), as in ssh(1):
    a ``~`` anywhere else is typed as is.  A lone ``~`` at the start of a line
    is held back until the next byte says what it is.  Everything else passes
    through unchanged, in order.
    """

    __slots__ = ("_at_line_start", "_pending_tilde")

    ESCAPE = 0x7E  # "~"

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_tilde = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Return ``(bytes to send, detach requested)``; after a detach the rest is dropped."""
        if not self._pending_tilde and b"~" not in data:
            if data:
                self._at_line_start = data[-1] in (0x0D, 0x0A)
            return data, False
        out = bytearray()
        for byte in data:
            if self._pending_tilde:
                self._pending_tilde = False
                if byte == 0x2E:  # "."
                    return bytes(out), True
                if byte == self.ESCAPE:
                    out.append(self.ESCAPE)
                    self._at_line_start = False
                    continue
                out.append(self.ESCAPE)
            elif byte == self.ESCAPE and self._at_line_start:
                self._pending_tilde = True
                continue
            out.append(byte)
            self._at_line_start = byte in (0x0D, 0x0A)
        return bytes(out), False


class Terminal:
    """The process's terminal for one session; use as a context manager.

    Args:
        raw: put stdin in raw mode (only if it is a tty).
        read_stdin: the session forwards stdin (``-i``); otherwise stdin is not touched.
        stdin_fd, stdout_fd, stderr_fd: descriptors (tests pass a pty's).
    """

    def __init__(self, *, raw: bool, read_stdin: bool, stdin_fd: int = 0, stdout_fd: int = 1,
                 stderr_fd: int = 2) -> None:
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.read_stdin = read_stdin
        self.raw = raw and read_stdin and os.isatty(stdin_fd)
        self.stderr_is_tty = os.isatty(stderr_fd)
        # Redraw the line only when stdout and stderr are the same terminal.
        self._same_screen = self.stderr_is_tty and os.isatty(stdout_fd) and _same_file(
            stdout_fd, stderr_fd)
        self._saved_mode: list[Any] | None = None
        self._saved_blocking: dict[int, bool] = {}
        self._status_shown = False
        self.lines = LineTracker()

    def __repr__(self) -> str:
        return f"<Terminal raw={self.raw} stdin={self.read_stdin} status={self._status_shown}>"

    # ---- mode ---------------------------------------------------------------------------------

    def __enter__(self) -> Terminal:
        if self.raw:
            self._saved_mode = termios.tcgetattr(self.stdin_fd)
            # tty.setraw: no echo, no line editing, no signals from ^C/^Z/^\ (they go
            # to the remote terminal as bytes), no output post-processing.
            tty.setraw(self.stdin_fd, termios.TCSANOW)
        fds = {self.stdout_fd, self.stderr_fd}
        if self.read_stdin:
            fds.add(self.stdin_fd)
        for fd in fds:
            try:
                self._saved_blocking[fd] = os.get_blocking(fd)
            except OSError:
                continue
        if self.read_stdin:
            os.set_blocking(self.stdin_fd, False)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent; safe in any state)."""
        if self._status_shown:
            self._write_nowait(self.stderr_fd, b"\r\x1b[2K")
            self._status_shown = False
        for fd, blocking in self._saved_blocking.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass
        self._saved_blocking = {}
        if self._saved_mode is not None:
            try:
                # TCSAFLUSH would throw away typed-ahead input meant for the shell.
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved_mode)
            except termios.error:
                pass
            self._saved_mode = None

    # ---- input --------------------------------------------------------------------------------

    async def read_stdin_some(self) -> bytes:
        """The next bytes typed (or piped); ``b""`` at end of input."""
        while True:
            try:
                return os.read(self.stdin_fd, _READ_CHUNK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.stdin_fd)
            except OSError as exc:
                if exc.errno == errno.EIO:  # the terminal went away (hangup)
                    return b""
                raise

    # ---- output -------------------------------------------------------------------------------

    async def write_output(self, data: bytes, *, stderr: bool = False) -> None:
        """Write session output to stdout (or stderr), waiting while the terminal is full."""
        fd = self.stderr_fd if stderr else self.stdout_fd
        if self._status_shown:
            await self.clear_status()
        if not stderr or self._same_screen:
            self.lines.feed(data)
        await _write_all(fd, data)

    async def show_status(self, text: str) -> None:
        """Show (or replace) the one-line status on stderr."""
        if self.stderr_is_tty:
            # One screen line, never wrapped: clear_status erases only the cursor's line.
            size = terminal_size(self.stderr_fd)
            if size is not None and len(text) >= size[0]:
                text = text[:max(1, size[0] - 2)] + "…"
            line = f"\r\x1b[2K\x1b[7m{text}\x1b[0m".encode()
            await _write_all(self.stderr_fd, line)
            self._status_shown = True
        else:
            await _write_all(self.stderr_fd, (text + "\n").encode())

    async def clear_status(self) -> None:
        """Remove the status line and redraw the line it covered."""
        if not self._status_shown:
            return
        self._status_shown = False
        redraw = self.lines.redraw() if self._same_screen else None
        await _write_all(self.stderr_fd, b"\r\x1b[2K" + (redraw or b""))

    async def print_message(self, text: str) -> None:
        """A final one-line message on stderr (on its own line in raw mode)."""
        if self._status_shown:
            await _write_all(self.stderr_fd, b"\r\x1b[2K")
            self._status_shown = False
        prefix = "\r\n" if self.raw and self.lines.redraw() != b"" else ""
        end = "\r\n" if self.raw else "\n"
        await _write_all(self.stderr_fd, f"{prefix}{text}{end}".encode())

    # ---- signals ------------------------------------------------------------------------------

    async def watch_resize(self, on_resize: Callable[[int, int], Awaitable[None]], *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Call ``on_resize(cols, rows)`` on every SIGWINCH (runs until cancelled)."""
        with trio.open_signal_receiver(signal.SIGWINCH) as batches:
            task_status.started()
            async for _ in batches:  # a burst of SIGWINCH may arrive as one
                size = terminal_size(self.stdin_fd) or terminal_size(self.stdout_fd)
                if size is not None:
                    await on_resize(*size)

    @staticmethod
    async def watch_exit_signals(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                 ) -> None:
        """Raise :class:`TerminalSignal` on SIGTERM/SIGHUP/SIGINT/SIGQUIT.

        Run it in the session's nursery: the exception cancels the session and
        the ``with Terminal(...)`` block restores the terminal on its way out.
        """
        with trio.open_signal_receiver(*_EXIT_SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                raise TerminalSignal(signum)

    def size(self) -> tuple[int, int] | None:
        """The local terminal's ``(cols, rows)``, or ``None``."""
        return terminal_size(self.stdin_fd) or terminal_size(self.stdout_fd)

    # ---- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _write_nowait(fd: int, data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError:
            pass


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[n:]
    # Give other tasks a turn even when the terminal never pushes back.
    await trio.lowlevel.checkpoint()


def _same_file(a: int, b: int) -> bool:
    try:
        return os.path.samestat(os.fstat(a), os.fstat(b))
    except OSError:
        return False


def stdin_is_tty() -> bool:
    return sys.stdin is not None and os.isatty(0)
