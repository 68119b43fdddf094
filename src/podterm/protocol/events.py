"""Events shared by the message codecs above the WebSocket layer.

The Kubernetes channel codec (:mod:`podterm.protocol.k8s_channel`), the
podterm.v1 codec (:mod:`podterm.protocol.session_proto`) and the agent tunnel
(:mod:`podterm.protocol.tunnel`) all decode whole WebSocket messages into these
events and encode them back.  One vocabulary means the session layer handles a
keystroke the same way whether it came from kubectl, the podterm CLI, a browser
or an agent.

Every event is a frozen, slotted dataclass: cheap to build on the hot path,
safe to hand to several consumers, comparable in tests.

Data events (``Stdin``, ``Stdout``, ``Stderr``, ``StatusChunk``) hold ``bytes``
sliced once from the received message; the slice is owned by the event, so it
stays valid after the next message arrives.

::

    Stdin(data)              client keystrokes / piped input
    Stdout(data), Stderr(data)
    StdinClose()             k8s v5 ``FF 00``: the client's stdin hit EOF
    StdinEof(offset)         podterm.v1 ``stdin_eof``: the client's stdin ended at input offset N
    StatusChunk(data)        k8s channel 3 bytes (client role), concatenated until close
    Resize(cols, rows)
    Ack(offset)              podterm.v1 / tunnel: bytes of the peer's stream received
    Exit(code, signal, reason)
    Hello(...), Gap(from_offset, to_offset), Drain(reason), ErrorMsg(code, message), Detach()
    Open(...), Close(reason), Resume(streams)      agent tunnel only
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True)
class Stdin:
    """Bytes for the process's standard input."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stdout:
    """Bytes the process wrote to standard output (or its terminal)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    """Bytes the process wrote to standard error (no-tty sessions only)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StdinClose:
    """The client's stdin reached EOF (k8s ``v5.channel.k8s.io`` ``FF 00``)."""


@dataclass(frozen=True, slots=True)
class StdinEof:
    """podterm.v1 ``stdin_eof``: the client's stdin ended after input offset ``offset``.

    ``offset`` is the client's total input at EOF; the server closes the
    process's stdin once it has accepted every input byte before it
    (docs/protocol.md §4).  Repeating it is harmless (resume re-sends it).
    """

    offset: int


@dataclass(frozen=True, slots=True)
class StatusChunk:
    """Raw bytes received on k8s channel 3 (error/status), client role.

    The status is only meaningful once the connection ends: channel 3 is
    concatenated until close (k8s spec §5.2).  ``K8sClientChannel`` keeps the
    concatenation; this event lets the caller log or surface it early.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class Resize:
    """New terminal size in character cells."""

    cols: int
    rows: int


@dataclass(frozen=True, slots=True)
class Ack:
    """The sender has received the peer's stream up to (not including) ``offset``."""

    offset: int


@dataclass(frozen=True, slots=True)
class Exit:
    """The process ended.

    ``code`` is the exit status (None when killed by a signal or unknown),
    ``signal`` the terminating signal number (None if it exited), ``reason`` a
    short machine word such as ``"exited"``, ``"killed"``, ``"upstream_lost"``.
    """

    code: int | None
    signal: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Hello:
    """podterm.v1 ``hello``: the first message after every attach (docs/protocol.md §4)."""

    session: str
    resume_token: str | None
    state: str  # "running" | "exited"
    mode: str  # "rw" | "ro"
    out_offset: int
    ring_start: int
    in_acked: int
    cols: int
    rows: int
    window: int
    heartbeat_s: float
    notices: tuple[str, ...] = ()
    #: The session's stdin is closed (a ``stdin_eof`` was applied): a resuming
    #: client does not send ``stdin_eof`` again.
    stdin_closed: bool = False


@dataclass(frozen=True, slots=True)
class Gap:
    """Output from ``from_offset`` to ``to_offset`` is lost; the stream continues at ``to_offset``."""

    from_offset: int
    to_offset: int

    @property
    def lost(self) -> int:
        return self.to_offset - self.from_offset


@dataclass(frozen=True, slots=True)
class Drain:
    """The gateway is shutting down: reconnect now and resume."""

    reason: str


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    """A machine-readable error ``code`` and a human ``message``; a close follows."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Detach:
    """The client leaves the session running; the server closes with 1000."""


@dataclass(frozen=True, slots=True)
class Open:
    """Agent tunnel: start a process for a new stream (gateway → agent).

    ``command`` None means an interactive login shell.  ``env`` is a tuple of
    ``(name, value)`` pairs in the order given, so the event stays hashable.
    ``window`` is the credit window both sides use on this stream.
    ``session`` is the gateway's session id for the stream (a label the agent
    keeps and reports in its RESUME, so another gateway can adopt the stream).
    """

    command: tuple[str, ...] | None
    tty: bool
    cols: int
    rows: int
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    window: int = 256 * 1024
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """Agent tunnel: this side is finished with the stream."""

    reason: str


@dataclass(frozen=True, slots=True)
class ResumeEntry:
    """One stream's offsets in an agent-tunnel ``RESUME`` (see :mod:`podterm.protocol.tunnel`).

    ``window`` is the stream's credit window (from its OPEN);
    ``out_start``..``out_offset`` is the part of the sender's outgoing stream it
    can still (re)send; ``in_acked`` is how much of the peer's stream it holds.
    ``session`` (agent → gateway only) is the label the stream's OPEN carried.
    """

    stream_id: int
    window: int
    out_start: int
    out_offset: int
    in_acked: int
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """Agent tunnel: every live stream's offsets, exchanged once per connection.

    ``next_id`` (agent → gateway only) is the lowest stream id the gateway may
    OPEN next; None in the gateway's answer.
    """

    streams: tuple[ResumeEntry, ...]
    next_id: int | None = None


Event: TypeAlias = (
    Stdin | Stdout | Stderr | StdinClose | StdinEof | StatusChunk | Resize | Ack | Exit | Hello
    | Gap | Drain | ErrorMsg | Detach | Open | Close | Resume
)

__all__ = [
    "Ack", "Close", "Detach", "Drain", "ErrorMsg", "Event", "Exit", "Gap", "Hello", "Open",
    "Resize", "Resume", "ResumeEntry", "StatusChunk", "Stderr", "Stdin", "StdinClose", "StdinEof",
    "Stdout",
]
