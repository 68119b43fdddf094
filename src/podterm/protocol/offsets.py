"""Offset arithmetic for exactly-once delivery (docs/protocol.md §4 "Offsets", §5, §6).

Every byte of a session's input and output has an absolute offset that never
resets.  Four small, pure objects keep the books; the client, the gateway, the
agent and the tunnel all use them, so the rules live in one place:

* :class:`InputLog` — sender side of a resumable stream (the client's input,
  the gateway's stdin to an agent): bytes not yet acknowledged, by offset,
  bounded; resent from the peer's acknowledged offset after a reconnect.
* :class:`InputDedup` — receiver side: the stream restarts at (or before) the
  accepted offset after a resume; only bytes never accepted come out, so a
  retransmission can never type a command twice.
* :class:`AckWindow` — sender credit: at most ``window`` unacknowledged bytes
  in flight; an ACK that goes backwards or past what was sent is a protocol
  violation (1002).
* :class:`AckScheduler` — receiver side: when an ACK is due (every half window
  of received bytes, or 100 ms after the last ACK while unacknowledged data
  exists).  Time is an argument (``now``, in seconds on any monotonic clock).

Offsets are Python ints; the wire carries them as u64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation
from podterm.protocol._types import Buffer

#: docs/protocol.md §6: default flow-control window.
DEFAULT_WINDOW: Final = 256 * 1024
#: docs/protocol.md §5.3: unacknowledged input a client keeps (it blocks beyond).
DEFAULT_INPUT_LOG_BYTES: Final = 1 << 20
#: docs/protocol.md §6: "at least every 100 ms while data flows".
DEFAULT_ACK_INTERVAL_S: Final = 0.1

# Compact the log's buffer once this much dead space sits at its head; below it
# the memmove is not worth doing on every ACK.
_COMPACT_BYTES: Final = 64 * 1024


def _check_offset(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")


class InputLog:
    """Unacknowledged bytes of an outgoing stream, addressed by absolute offset.

    Holds ``[acked, end)``.  ``append`` adds at ``end``; ``ack`` releases up to an
    offset; ``replay_from`` gives what to resend after a reconnect.

    Args:
        start: offset of the first byte this log will hold (0 for a new session).
        limit: most bytes held (docs/protocol.md §5.3: 1 MiB); ``append`` beyond
            it is refused, so the caller stops reading its source while ``space``
            is 0.
    """

    __slots__ = ("_buf", "_head", "_acked", "limit")

    def __init__(self, start: int = 0, *, limit: int = DEFAULT_INPUT_LOG_BYTES) -> None:
        _check_offset(start, "start")
        if limit <= 0:
            raise ValueError("limit must be positive")
        self._buf = bytearray()
        self._head = 0  # index in _buf of the byte at offset _acked
        self._acked = start
        self.limit = limit

    def __repr__(self) -> str:
        return f"<InputLog acked={self._acked} end={self.end} pending={self.pending}>"

    @property
    def acked(self) -> int:
        """Offset of the oldest byte held: everything before it was acknowledged."""
        return self._acked

    @property
    def end(self) -> int:
        """Offset the next appended byte will get."""
        return self._acked + len(self._buf) - self._head

    @property
    def pending(self) -> int:
        """Bytes held (sent or not, not yet acknowledged)."""
        return len(self._buf) - self._head

    @property
    def space(self) -> int:
        """Bytes ``append`` accepts now."""
        return self.limit - self.pending

    def append(self, data: Buffer) -> int:
        """Add ``data`` at the end; return the offset of its first byte.

        Raises:
            LocalProtocolError: ``data`` does not fit in ``space`` (check first).
        """
        n = len(data)
        if n > self.space:
            raise LocalProtocolError(f"input log full: {n} bytes, {self.space} free")
        offset = self.end
        self._buf += data
        return offset

    def ack(self, offset: int) -> int:
        """Release everything before ``offset``; return how many bytes were released.

        Raises:
            ProtocolViolation: 1002 if ``offset`` is before ``acked`` (an ACK went
                backwards) or after ``end`` (the peer acknowledged bytes never sent).
        """
        if offset < self._acked:
            raise ProtocolViolation(f"ACK {offset} went backwards (acked {self._acked})",
                                    CloseCode.PROTOCOL_ERROR)
        if offset > self.end:
            raise ProtocolViolation(f"ACK {offset} beyond sent input (end {self.end})",
                                    CloseCode.PROTOCOL_ERROR)
        released = offset - self._acked
        self._head += released
        self._acked = offset
        if self._head == len(self._buf):
            self._buf.clear()
            self._head = 0
        elif self._head >= _COMPACT_BYTES and self._head * 2 >= len(self._buf):
            del self._buf[:self._head]
            self._head = 0
        return released

    def read(self, offset: int, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` held bytes starting at ``offset`` (``acked <= offset <= end``).

        Raises:
            LocalProtocolError: ``offset`` outside ``[acked, end]``.
        """
        if not self._acked <= offset <= self.end:
            raise LocalProtocolError(f"offset {offset} outside [{self._acked}, {self.end}]")
        start = self._head + offset - self._acked
        stop = len(self._buf) if max_bytes is None else min(len(self._buf), start + max_bytes)
        return bytes(self._buf[start:stop])

    def replay_from(self, acked: int) -> bytes:
        """After ``hello`` (or a tunnel RESUME): release before ``acked``, return ``[acked, end)``.

        ``acked`` is the peer's acknowledged input offset (``in_acked``).

        Raises:
            ProtocolViolation: 1002 if ``acked`` is outside ``[self.acked, end]``:
                below it the peer forgot input it had acknowledged; above it the
                peer claims input that was never sent.
        """
        if not self._acked <= acked <= self.end:
            raise ProtocolViolation(
                f"peer acknowledged input offset {acked} outside [{self._acked}, {self.end}]",
                CloseCode.PROTOCOL_ERROR)
        self.ack(acked)
        return self.read(acked)


class InputDedup:
    """Receiver side of a resumable stream: pass each byte on exactly once.

    ``accepted`` is the offset of the next byte never seen (the server's
    ``in_acked``).  After a resume the peer's stream restarts at some offset
    ``at <= accepted`` (normally exactly ``accepted``; an older one when the
    peer re-sends more than needed): :meth:`restart` says where, and
    :meth:`feed` trims the overlap.

    Args:
        accepted: input accepted so far (0 for a new session).
    """

    __slots__ = ("accepted", "position")

    def __init__(self, accepted: int = 0) -> None:
        _check_offset(accepted, "accepted")
        self.accepted = accepted
        #: Offset of the next byte the peer will send on this connection.
        self.position = accepted

    def __repr__(self) -> str:
        return f"<InputDedup accepted={self.accepted} position={self.position}>"

    def restart(self, at: int | None = None) -> None:
        """The peer's stream restarts at ``at`` (default: ``accepted``).

        Raises:
            ProtocolViolation: 1002 if ``at > accepted``: bytes in between would
                never arrive.
        """
        at = self.accepted if at is None else at
        _check_offset(at, "at")
        if at > self.accepted:
            raise ProtocolViolation(
                f"input restarts at {at}, after the accepted offset {self.accepted}",
                CloseCode.PROTOCOL_ERROR)
        self.position = at

    def feed(self, data: Buffer) -> Buffer:
        """Account for ``data`` at ``position``; return the part not accepted before.

        The result is ``data`` itself, a slice of it, or ``b""``: nothing is
        copied when there is no overlap.
        """
        n = len(data)
        start = self.position
        self.position = start + n
        skip = self.accepted - start
        if skip <= 0:
            self.accepted = self.position
            return data
        if skip >= n:
            return b""
        self.accepted = self.position
        return data[skip:]


class AckWindow:
    """Sender credit: at most ``window`` bytes sent and not acknowledged (§6).

    Args:
        window: the credit window in bytes.
        start: offset of the first byte this connection sends (the replay start).
    """

    __slots__ = ("window", "sent", "acked")

    def __init__(self, window: int = DEFAULT_WINDOW, *, start: int = 0) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        _check_offset(start, "start")
        self.window = window
        self.sent = start  # offset after the last byte sent
        self.acked = start  # the peer's latest ACK

    def __repr__(self) -> str:
        return f"<AckWindow sent={self.sent} acked={self.acked} credit={self.credit()}>"

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    def credit(self) -> int:
        """Bytes that may be sent now."""
        return max(0, self.window - (self.sent - self.acked))

    def can_send(self, n: int) -> bool:
        return n <= self.credit()

    def on_send(self, n: int) -> None:
        """Record ``n`` bytes sent.

        Raises:
            LocalProtocolError: more than ``credit()`` (split the data first).
        """
        if n < 0 or n > self.credit():
            raise LocalProtocolError(f"sending {n} bytes with {self.credit()} credit")
        self.sent += n

    def on_ack(self, offset: int) -> int:
        """Apply the peer's ACK; return the bytes of credit it released.

        An ACK equal to the previous one is legal (it releases nothing).

        Raises:
            ProtocolViolation: 1002 when the ACK goes backwards or past ``sent``.
        """
        if offset < self.acked:
            raise ProtocolViolation(f"ACK {offset} went backwards (acked {self.acked})",
                                    CloseCode.PROTOCOL_ERROR)
        if offset > self.sent:
            raise ProtocolViolation(f"ACK {offset} beyond what was sent ({self.sent})",
                                    CloseCode.PROTOCOL_ERROR)
        released = offset - self.acked
        self.acked = offset
        return released

    def reset(self, offset: int) -> None:
        """Start over at ``offset`` (a new connection resending from there)."""
        _check_offset(offset, "offset")
        self.sent = self.acked = offset


class AckScheduler:
    """Receiver side: decides when an ACK is due (§6).

    An ACK is due when unacknowledged bytes reach half the window, or when some
    exist and ``interval_s`` has passed since the last ACK (so the sender hears
    back at least every 100 ms while data flows, and a lone keystroke after a
    quiet spell is acknowledged at once).  The returned offset is taken as sent.

    Args:
        window: the sender's credit window.
        start: the offset acknowledged already (the resume point).
        interval_s: the timer bound.
    """

    __slots__ = ("window", "interval_s", "position", "acked", "_last_ack_at")

    def __init__(self, window: int = DEFAULT_WINDOW, *, start: int = 0,
                 interval_s: float = DEFAULT_ACK_INTERVAL_S) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        _check_offset(start, "start")
        self.window = window
        self.interval_s = interval_s
        self.position = start  # offset after the last byte received (or consumed)
        self.acked = start  # the last offset acknowledged
        self._last_ack_at = -math.inf

    def __repr__(self) -> str:
        return f"<AckScheduler position={self.position} acked={self.acked}>"

    @property
    def unacked(self) -> int:
        return max(0, self.position - self.acked)

    def _due(self, now: float) -> int | None:
        pending = self.position - self.acked
        if pending <= 0:
            return None
        # Same expression as deadline(), so poll(deadline()) is always due
        # (now - last >= interval can fail by one ulp where now >= last + interval holds).
        if pending * 2 >= self.window or now >= self._last_ack_at + self.interval_s:
            self.acked = self.position
            self._last_ack_at = now
            return self.acked
        return None

    def on_receive(self, n: int, now: float) -> int | None:
        """``n`` more bytes arrived; return the offset to ACK now, or None."""
        self.position += n
        return self._due(now)

    def update(self, position: int, now: float) -> int | None:
        """The receivable position moved to ``position`` (absolute; never backwards)."""
        if position < self.position:
            raise LocalProtocolError(f"position {position} before {self.position}")
        self.position = position
        return self._due(now)

    def poll(self, now: float) -> int | None:
        """Timer check: the offset to ACK now, or None."""
        return self._due(now)

    def flush(self, now: float) -> int | None:
        """ACK now whatever is unacknowledged (the sender has a frame going anyway); None if nothing."""
        if self.position <= self.acked:
            return None
        self.acked = self.position
        self._last_ack_at = now
        return self.acked

    def deadline(self) -> float | None:
        """When :meth:`poll` will next return an offset (None: nothing to acknowledge)."""
        if self.position <= self.acked:
            return None
        return self._last_ack_at + self.interval_s

    def rebase(self, acked: int) -> None:
        """Treat ``acked`` as acknowledged already (a resume point or a gap's end).

        ``position`` is left alone: bytes received before a reconnect and still
        held are not acknowledged again until ``position`` passes ``acked``.
        """
        _check_offset(acked, "acked")
        self.acked = acked


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """What a sender resends after a reconnect: ``gap`` lost bytes, then ``[start, end)``."""

    start: int
    end: int
    gap_from: int | None = None  # set when the peer's offset fell out of the buffer

    @property
    def lost(self) -> int:
        return 0 if self.gap_from is None else self.start - self.gap_from


def replay_range(peer_offset: int, held_start: int, held_end: int) -> ReplayRange:
    """Plan a resend: the peer has everything before ``peer_offset``; we hold ``[held_start, held_end)``.

    Returns the range to send, with ``gap_from`` set when ``peer_offset <
    held_start`` (those bytes are gone: tell the peer with ``gap``).

    Raises:
        ProtocolViolation: 1002 if ``peer_offset > held_end`` (it claims bytes
            never produced).
    """
    if held_start > held_end:
        raise ValueError("held_start after held_end")
    if peer_offset > held_end:
        raise ProtocolViolation(f"peer offset {peer_offset} beyond {held_end}",
                                CloseCode.PROTOCOL_ERROR)
    if peer_offset < held_start:
        return ReplayRange(held_start, held_end, gap_from=peer_offset)
    return ReplayRange(peer_offset, held_end)


__all__ = [
    "DEFAULT_ACK_INTERVAL_S", "DEFAULT_INPUT_LOG_BYTES", "DEFAULT_WINDOW", "AckScheduler",
    "AckWindow", "InputDedup", "InputLog", "ReplayRange", "replay_range",
]
