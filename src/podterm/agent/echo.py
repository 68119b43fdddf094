"""Echo streams: ``podterm agent --echo``, a load-test stand-in for thousands of shells.

An :class:`EchoStream` answers every STDIN byte with the same byte as STDOUT,
in process: no PTY, no child process, no task.  Everything else is the real
path (issue 9): the bytes travel client → gateway session (ring, offsets,
ACKs) → agent tunnel (per-stream credit) → agent and back, and the echo obeys
the same flow control as a shell.  Input is consumed (and so acknowledged to
the gateway) only once its echo is in the stream's output ring; while the
ring has no room (the gateway has not acknowledged earlier output) the input
waits, so a client that stops reading eventually stops being able to type —
exactly as with a shell whose terminal is full.

The command and terminal size of the OPEN are ignored; the stream never exits
by itself.  The gateway's CLOSE (``DELETE`` of the session) ends it.
"""

from __future__ import annotations

from podterm.agent.streams import AgentStream, StreamHost
from podterm.upstream.base import OutputChannel

__all__ = ["EchoStream"]

_STDOUT = int(OutputChannel.STDOUT)


class EchoStream(AgentStream):
    """A stream whose output is its input (see the module docstring).

    Costs one ring chunk (4 KiB) once it has echoed something, and nothing per
    message beyond the bytes themselves.
    """

    kind = "echo"
    __slots__ = ()

    def __init__(self, stream_id: int, window: int, tty: bool, host: StreamHost, *,
                 ring_bytes: int, chunk_bytes: int) -> None:
        super().__init__(stream_id, window, tty, host, ring_bytes=ring_bytes,
                         chunk_bytes=chunk_bytes)

    def _input_arrived(self) -> None:
        self._echo()

    def wake_producer(self) -> None:
        # An ACK, a resume or a link change may have made room for waiting input.
        super().wake_producer()
        if self._input and not self.closed:
            self._echo()

    def _echo(self) -> None:
        """Move buffered input into the output ring, as far as the ring has room."""
        queue = self._input
        while queue and not self.closed:
            room = self.room()
            if room <= 0:
                return  # on_ack() → wake_producer() continues
            piece = queue[0]
            if len(piece) > room:
                take, queue[0] = piece[:room], piece[room:]
            else:
                take = queue.popleft()
            self._input_bytes -= len(take)
            self.produce(_STDOUT, take)
            self.host.input_consumed(self, len(take))
