"""Abuse while others work: three kinds of offender against one gateway at once.

Three legitimate podterm.v1 sessions (``cat``, from 127.0.0.1) echo input
steadily while, for :data:`ATTACK_S` seconds, three offenders run
concurrently, each from its own loopback address:

* **slowloris** (127.0.0.3): HTTP request heads sent a byte at a time, never
  finished.  Each must be cut at the handshake timeout with ``408``, and
  leave a ``protocol.reject`` event (``http_status`` 408);
* **invalid frames** (127.0.0.4): connections that upgrade (a read-only join)
  and then send an unmasked frame, reserved bits, a frame whose length is
  over the limit, or a text frame that is not UTF-8.  Each must be closed
  with its precise code, 1002, 1002, 1009 and 1007, and leave a
  ``protocol.reject`` event with that ``close_code``;
* **failed logins** (127.0.0.2): wrong bearer tokens.  The first ten get
  401, then the per-source failure budget is spent and the answer is 429
  with ``Retry-After``; every one leaves an ``auth.failure`` event.

Throughout, every legitimate round trip (input in, the same bytes out) must
complete within :data:`ROUND_TRIP_BOUND_S` -- a liveness bound, not a
performance claim -- and each session's output must equal its input byte
for byte; ``/healthz`` must answer 200 every time it is asked; and nothing
is audited against the legitimate address.
"""

from __future__ import annotations

import functools
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11
import pytest
import trio

from conftest import ProtoClient
from podterm.audit import AuditEvent, MemorySink
from podterm.config import LimitsConfig
from podterm.errors import CloseCode
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, client_handshake
from podterm.protocol.mask import mask
from podterm.protocol.session_proto import SUBPROTOCOL

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

#: How long the offenders run, all at once.
ATTACK_S = 4.0
#: The gateway's handshake timeout in this test (the default is 10 s).
HANDSHAKE_TIMEOUT_S = 1.0
#: Liveness bound on one legitimate echo round trip, and on any single answer.
ROUND_TRIP_BOUND_S = 5.0
#: Bound on the whole exercise, setup and checks included.
WAIT_S = 40.0
LEGIT = 3
SLOWLORIS_PARALLEL = 3
#: Connections per invalid-frame kind, at most (each kind runs its own loop).
FRAMES_PER_KIND = 8
FAILED_LOGINS = 14
#: RateLimits.auth_failures_per_source: ten failures are free.
AUTH_BUDGET = 10

LEGIT_ADDR, LOGIN_ADDR, SLOW_ADDR, FRAME_ADDR = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"
KEY = b"\x5a\x17\xc3\x08"


def _frame(b0: int, payload: bytes = b"", *, masked: bool = True,
           length: int | None = None) -> bytes:
    """A client frame built by hand, for what no well-behaved encoder writes."""
    n = len(payload) if length is None else length
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    return head + (KEY + mask(payload, KEY) if masked else payload)


#: (name, wire bytes after the upgrade, the close code the gateway must send)
BAD_FRAMES = [
    ("unmasked", _frame(0x82, b"\x00x", masked=False), CloseCode.PROTOCOL_ERROR),
    ("reserved-bits", _frame(0xC2, b"\x00x"), CloseCode.PROTOCOL_ERROR),
    # A 2**40-byte frame: refused from its header, before any payload is sent.
    ("oversized", _frame(0x82, length=1 << 40), CloseCode.MESSAGE_TOO_BIG),
    ("invalid-utf8", _frame(0x81, b"ok \xff\xfe not utf-8"), CloseCode.INVALID_PAYLOAD),
]


@dataclass
class Record:
    """What every participant saw; checked once everyone has stopped."""

    round_trips: list[list[float]] = field(default_factory=lambda: [[] for _ in range(LEGIT)])
    during_attack: list[int] = field(default_factory=lambda: [0] * LEGIT)
    slowloris: list[tuple[bytes, float]] = field(default_factory=list)
    frames: list[tuple[str, int, int]] = field(default_factory=list)  # name, want, got
    logins: list[tuple[int, str | None]] = field(default_factory=list)  # status, Retry-After
    health: list[int] = field(default_factory=list)


async def _open_from(gw: GatewayUnderTest, source: str) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", gw.port, local_address=source)


async def _http_from(gw: GatewayUnderTest, source: str, path: str, token: str | None
                     ) -> tuple[int, dict[str, str]]:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", f"127.0.0.1:{gw.port}"), ("Connection", "close")]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    async with await _open_from(gw, source) as stream:
        await stream.send_all(conn.send(h11.Request(method="GET", target=path,
                                                    headers=headers))
                              + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                return event.status_code, {k.decode().lower(): v.decode()
                                           for k, v in event.headers}
            else:
                raise AssertionError(f"no response: {event!r}")


# ------------------------------------------------------------- participants

def _has_output(count: int, client: ProtoClient) -> bool:
    return len(client.output) >= count


async def _echo(client: ProtoClient, index: int, attacking: trio.Event, over: trio.Event,
                record: Record) -> None:
    """Round trips until the attack is over (and at least one after it)."""
    sent = bytearray()
    rounds = 0
    while True:
        finished = over.is_set()
        line = f"session {index} round {rounds} {'.' * (rounds % 37)}\n".encode()
        start = trio.current_time()
        await client.send_stdin(line)
        sent += line
        with trio.fail_after(ROUND_TRIP_BOUND_S):
            await client.wait_for(functools.partial(_has_output, len(sent)))
        record.round_trips[index].append(trio.current_time() - start)
        assert bytes(client.output) == bytes(sent), f"session {index}: output differs"
        if attacking.is_set() and not finished:
            record.during_attack[index] += 1
        rounds += 1
        if finished:
            return
        await trio.sleep(0.05)  # a typist's pace, not a busy loop


async def _slowloris(gw: GatewayUnderTest, deadline: float, record: Record) -> None:
    """One connection after another: a request head a byte at a time, never finished."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: keep-waiting\r\n" * 500
    while trio.current_time() < deadline:
        start = trio.current_time()
        answer = b""
        async with await _open_from(gw, SLOW_ADDR) as stream:
            for byte in range(len(head)):
                try:
                    await stream.send_all(head[byte:byte + 1])
                except trio.BrokenResourceError:
                    break
                with trio.move_on_after(0.05):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break  # the gateway hung up
                    answer += chunk
        record.slowloris.append((answer, trio.current_time() - start))


async def _bad_frames(gw: GatewayUnderTest, target: str, name: str, wire: bytes, want: int,
                      deadline: float, record: Record) -> None:
    """Upgrade, join read-only, then send one invalid frame; note the close code."""
    for _ in range(FRAMES_PER_KIND):
        if trio.current_time() >= deadline:
            return
        stream = await _open_from(gw, FRAME_ADDR)
        ws: WebSocketStream
        ws, _ = await client_handshake(
            stream, f"127.0.0.1:{gw.port}", f"/api/v1/sessions/{target}/attach?mode=ro",
            [SUBPROTOCOL], [("Authorization", f"Bearer {gw.admin_token}")])
        await stream.send_all(wire)  # under the codec: what no encoder would write
        got = CloseCode.ABNORMAL
        try:
            while True:
                await ws.receive_batch()
        except ConnectionClosed as exc:
            got = exc.code
        finally:
            await ws.aclose()
        record.frames.append((name, int(want), int(got)))


async def _failed_logins(gw: GatewayUnderTest, record: Record) -> None:
    for i in range(FAILED_LOGINS):
        status, headers = await _http_from(gw, LOGIN_ADDR, "/api/v1/sessions", f"guess-{i}")
        record.logins.append((status, headers.get("retry-after")))
        await trio.sleep(0.1)  # spread over the attack window


async def _health(gw: GatewayUnderTest, over: trio.Event, record: Record) -> None:
    while not over.is_set():
        with trio.fail_after(ROUND_TRIP_BOUND_S):
            status, _ = await _http_from(gw, LEGIT_ADDR, "/healthz", None)
        record.health.append(status)
        await trio.sleep(0.1)


# --------------------------------------------------------------------- test

def _rejects_from(events: list[AuditEvent], source: str) -> list[AuditEvent]:
    return [e for e in events if e.type == "protocol.reject"
            and (e.source_addr or "").startswith(source + ":")]


async def test_offenders_are_answered_precisely_while_sessions_keep_echoing(
        make_gateway: GatewayFactory) -> None:
    memory = MemorySink()
    gw = await make_gateway(limits=LimitsConfig(handshake_timeout_s=HANDSHAKE_TIMEOUT_S),
                            options={"audit_sink": memory})
    record = Record()
    attacking, over = trio.Event(), trio.Event()
    with trio.fail_after(WAIT_S):
        sessions = [await gw.create(["cat"], tty=False) for _ in range(LEGIT)]
        target = (await gw.create(["cat"], tty=False))["id"]  # what the frame flood joins
        clients = [await gw.attach(s["id"]) for s in sessions]
        for client in clients:
            await client.wait_hello()
        async with trio.open_nursery() as nursery:
            for index, client in enumerate(clients):
                nursery.start_soon(_echo, client, index, attacking, over, record)
            nursery.start_soon(_health, gw, over, record)
            async with trio.open_nursery() as attack:
                deadline = trio.current_time() + ATTACK_S
                attacking.set()
                for _ in range(SLOWLORIS_PARALLEL):
                    attack.start_soon(_slowloris, gw, deadline, record)
                for name, wire, want in BAD_FRAMES:
                    attack.start_soon(_bad_frames, gw, target, name, wire, want, deadline,
                                      record)
                attack.start_soon(_failed_logins, gw, record)
            over.set()
        for client in clients:
            await client.aclose()
        for session in [*sessions, {"id": target}]:
            await gw.rest("DELETE", f"/api/v1/sessions/{session['id']}")

    print(f"round trips during the attack {record.during_attack}, slowest "
          f"{max(max(r) for r in record.round_trips):.3f}s; slowloris {len(record.slowloris)}, "
          f"bad frames {len(record.frames)}, logins {len(record.logins)}, "
          f"health checks {len(record.health)}")
    # Legitimate sessions: echoed byte-exactly all along, every round trip in bound.
    for index in range(LEGIT):
        assert record.during_attack[index] >= 3, (index, record.during_attack)
        assert max(record.round_trips[index]) < ROUND_TRIP_BOUND_S
    assert record.health and set(record.health) == {200}

    # Slowloris: 408 once the head had been dribbling for the handshake timeout.
    assert len(record.slowloris) >= SLOWLORIS_PARALLEL
    for answer, elapsed in record.slowloris:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert HANDSHAKE_TIMEOUT_S * 0.9 <= elapsed < HANDSHAKE_TIMEOUT_S + ROUND_TRIP_BOUND_S

    # Invalid frames: each closed with its own code.
    assert {name for name, _, _ in record.frames} == {name for name, _, _ in BAD_FRAMES}
    wrong = [(name, want, got) for name, want, got in record.frames if want != got]
    assert not wrong, wrong

    # Failed logins: 401 while the budget lasts, then 429 with Retry-After.
    assert [s for s, _ in record.logins] == \
        [401] * AUTH_BUDGET + [429] * (FAILED_LOGINS - AUTH_BUDGET)
    assert all(int(after or 0) >= 1 for s, after in record.logins if s == 429)

    # The audit log has every offence, attributed to its source, and nothing
    # against the legitimate address.
    events = list(memory.events)
    slow = _rejects_from(events, SLOW_ADDR)
    assert len(slow) == len(record.slowloris)
    assert {e.details.get("http_status") for e in slow} == {408}
    frames = _rejects_from(events, FRAME_ADDR)
    assert Counter(e.details.get("close_code") for e in frames) == \
        Counter(got for _, _, got in record.frames)
    logins = [e for e in events if e.type == "auth.failure"
              and (e.source_addr or "").startswith(LOGIN_ADDR + ":")]
    assert [e.details.get("http_status") for e in logins] == [s for s, _ in record.logins]
    assert [e.outcome for e in logins] == \
        ["denied"] * AUTH_BUDGET + ["rejected"] * (FAILED_LOGINS - AUTH_BUDGET)
    legit = [e for e in events if (e.source_addr or "").startswith(LEGIT_ADDR + ":")]
    assert not [e for e in legit if e.type in ("protocol.reject", "auth.failure")]
