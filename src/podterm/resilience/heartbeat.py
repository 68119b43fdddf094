"""Heartbeat schedule and liveness for one link (pure: time is an argument).

spec/podterm-protocol.md, "Heartbeats": a WebSocket PING every 15 s by default
on every link; two missed PONGs mark the link dead.  The interval must sit
below common load-balancer idle timeouts (60 s on many cloud LBs), which is
what the pings are for as much as liveness.

The schedule, with interval ``T`` and ``max_missed = 2``::

    t = 0      created
    t = T      PING 1
    t = 2T     PING 1 unanswered → missed = 1; PING 2
    t = 3T     PING 2 unanswered → missed = 2 → dead

Any PONG that answers an outstanding PING (the newest or an older one: a late
PONG still proves the peer is alive) resets ``missed`` to 0.  PONGs that answer
nothing of ours (unsolicited, RFC 6455 §5.5.3) change nothing.

The trio driver is :func:`podterm.net.wsconn.heartbeat`; this class only says
*when* and *what*, so it is tested without a clock.
"""

from __future__ import annotations

__all__ = ["DEFAULT_INTERVAL_S", "DEFAULT_MAX_MISSED", "Heartbeat"]

#: spec/podterm-protocol.md: "ping every 15 s by default"; below the 60 s idle
#: timeout of common cloud load balancers, with room for one lost ping.
DEFAULT_INTERVAL_S = 15.0
#: spec: "two missed pongs mark the link dead".
DEFAULT_MAX_MISSED = 2


class Heartbeat:
    """PING schedule and PONG bookkeeping.

    Args:
        interval_s: seconds between PINGs.
        max_missed: consecutive unanswered PINGs that mean the link is dead.
        now: the current time (any monotonic clock; the driver uses trio's).

    Usage::

        payload = hb.poll(now)       # at or after hb.deadline
        if hb.is_dead: close the link (1011)
        elif payload is not None: send PING(payload)
        ...
        hb.on_pong(payload, now)     # for every PONG received
    """

    __slots__ = ("interval_s", "max_missed", "deadline", "missed", "rtt_s",
                 "_seq", "_acked", "_sent_at", "_dead")

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, *,
                 max_missed: int = DEFAULT_MAX_MISSED, now: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s}: must be > 0")
        if max_missed < 1:
            raise ValueError(f"max_missed={max_missed}: must be >= 1")
        self.interval_s = interval_s
        self.max_missed = max_missed
        #: when :meth:`poll` must next be called.
        self.deadline = now + interval_s
        #: consecutive PINGs that went unanswered.
        self.missed = 0
        #: round-trip time measured by the last answered PING, or None.
        self.rtt_s: float | None = None
        self._seq = 0  # number of the last PING sent
        self._acked = 0  # highest PING number answered
        self._sent_at = now
        self._dead = False

    def __repr__(self) -> str:
        state = "dead" if self._dead else "alive"
        return (f"<Heartbeat {state} seq={self._seq} acked={self._acked} missed={self.missed} "
                f"deadline={self.deadline:.3f}>")

    @property
    def is_dead(self) -> bool:
        """True once ``max_missed`` PINGs in a row went unanswered."""
        return self._dead

    def poll(self, now: float) -> bytes | None:
        """Advance to ``now``; return a PING payload to send, or None.

        Returns None before :attr:`deadline` and once the link is dead.  Each
        PING carries its sequence number (8 bytes, big-endian), which the peer
        echoes in its PONG (RFC 6455 §5.5.3).
        """
        if self._dead or now < self.deadline:
            return None
        if self._acked < self._seq:
            self.missed += 1
            if self.missed >= self.max_missed:
                self._dead = True
                return None
        self._seq += 1
        self._sent_at = now
        self.deadline = now + self.interval_s
        return self._seq.to_bytes(8, "big")

    def on_pong(self, payload: bytes, now: float) -> bool:
        """Record a received PONG; return True if it answered one of our PINGs."""
        if len(payload) != 8:
            return False
        seq = int.from_bytes(payload, "big")
        if not self._acked < seq <= self._seq:
            return False
        if seq == self._seq:
            self.rtt_s = now - self._sent_at
        self._acked = seq
        self.missed = 0
        return True
