"""The resumable client against a model gateway over memory streams (no sockets, virtual time).

``FakeGateway`` is a small model of docs/protocol.md's server side: a session
with an output stream produced under the writer's ACK window, a ring, input
accepted by offset, a resume token rotated on every attach, takeover with the
current token, and EXIT then close 1000.  The connector gives each link a
byte budget drawn from a seeded RNG and cuts the link when it runs out, in
either direction, so cuts land mid-handshake, mid-frame and mid-replay.

The pure helpers (close-code policy, exit status, the terminal's line
tracker, server URL parsing) are tested at the end.
"""

from __future__ import annotations

import os
import random
import signal
import termios
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
import trio.testing

from podterm import errors
from podterm.client.http import make_ssl_context, parse_server
from podterm.client.resume import (
    Action,
    LinkStatus,
    OutputChunk,
    ResumableSession,
    SessionFailed,
    classify_close,
    classify_http,
    exit_status,
)
from podterm.client.terminal import EscapeScanner, LineTracker, Terminal, TerminalSignal
from podterm.errors import HandshakeError
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, client_handshake, server_handshake
from podterm.protocol.events import Ack, Detach, Gap, Hello, Resize, Stdin
from podterm.protocol.session_proto import SUBPROTOCOL, ServerCodec
from podterm.resilience.backoff import Backoff

# ------------------------------------------------------------------------------ the model


class CuttingStream(trio.abc.Stream):
    """Wraps a stream; after ``budget`` bytes (received + sent) it cuts the link."""

    def __init__(self, inner: trio.abc.Stream, budget: int | None) -> None:
        self.inner = inner
        self.budget = budget
        self.cut_done = False

    async def _cut(self) -> None:
        self.cut_done = True
        await trio.aclose_forcefully(self.inner)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.cut_done:
            raise trio.BrokenResourceError("cut")
        data = bytes(await self.inner.receive_some(max_bytes))
        if self.budget is not None and data:
            if len(data) >= self.budget:
                data = data[:self.budget]
                await self._cut()
                if not data:
                    raise trio.BrokenResourceError("cut")
            else:
                self.budget -= len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.cut_done:
            raise trio.BrokenResourceError("cut")
        if self.budget is not None and len(data) >= self.budget:
            head = bytes(data[:self.budget])
            if head:
                await self.inner.send_all(head)
            await self._cut()
            raise trio.BrokenResourceError("cut")
        if self.budget is not None:
            self.budget -= len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.cut_done = True
        await self.inner.aclose()


@dataclass
class FakeLink:
    ws: WebSocketStream
    mode: str
    sent: int
    acked: int
    in_cursor: int
    closing: tuple[int, str] | None = None
    exit_sent: bool = False


@dataclass
class FakeGateway:
    """One session, as docs/protocol.md describes the server side."""

    output: bytes
    window: int = 64 * 1024
    exit_code: int | None = 7
    exit_signal: int | None = None
    expected_input: int = 0  # EXIT only once this much input was accepted
    ring_start: int = 0
    token: str = "token-0"
    produced_all: bool = False  # all output exists already (ignore the window)
    writer: FakeLink | None = None
    writer_acked: int = 0
    in_data: bytearray = field(default_factory=bytearray)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    attaches: list[tuple[int, str, str | None]] = field(default_factory=list)
    hellos: int = 0
    conflicts: int = 0
    exit_delivered: bool = False
    drain_next: bool = False
    close_code_next: int | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def produced(self) -> int:
        if self.produced_all:
            return len(self.output)
        return min(len(self.output), self.writer_acked + self.window)

    def done(self) -> bool:
        return self.produced == len(self.output) and len(self.in_data) >= self.expected_input

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            ws, request = await server_handshake(
                stream, select_subprotocol=lambda offered: SUBPROTOCOL
                if SUBPROTOCOL in offered else None)
        except (HandshakeError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        try:
            try:
                await self._attached(ws, request.target)
            except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the link was cut: the session lives on
        finally:
            await trio.aclose_forcefully(ws.stream)

    async def _attached(self, ws: WebSocketStream, target: str) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
        offset = int(query.get("offset", "0"))
        mode = query.get("mode", "rw")
        token = query.get("resume_token")
        self.attaches.append((offset, mode, token))
        codec = ServerCodec(read_only=mode == "ro")
        if self.close_code_next is not None:
            code, self.close_code_next = self.close_code_next, None
            await ws.send_raw(ws.conn.send_binary(*_swap(codec.error("not_found", "no session"))))
            await ws.aclose(code, "refused")
            return
        if mode == "rw" and self.writer is not None:
            if token != self.token:
                self.conflicts += 1
                await ws.aclose(4409, "session already has a writer")
                return
            old = self.writer
            old.closing = (4409, "taken over by a resumed connection")
            await old.ws.abort(4409, "taken over")
        link = FakeLink(ws, mode, max(offset, self.ring_start), max(offset, self.ring_start),
                        len(self.in_data))
        if mode == "rw":
            self.writer = link
            self.token = f"token-{len(self.attaches)}"
            self.writer_acked = max(self.writer_acked, offset)
        hello = Hello(session="s-1", resume_token=self.token if mode == "rw" else None,
                      state="running", mode=mode, out_offset=link.sent,
                      ring_start=self.ring_start, in_acked=len(self.in_data), cols=80, rows=24,
                      window=self.window, heartbeat_s=15.0)
        out = ws.conn.send_binary(*_swap(codec.hello(hello)))
        if offset < self.ring_start:
            out += ws.conn.send_binary(*_swap(codec.gap(offset, self.ring_start)))
        self.hellos += 1
        await ws.send_raw(out)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, link, codec, nursery)
                await self._send(link, codec)
                nursery.cancel_scope.cancel()
        finally:
            if link.exit_sent and ws.conn.close_received is not None:
                self.exit_delivered = True  # the client answered the CLOSE after EXIT
            if self.writer is link:
                self.writer = None
            self.notify()

    async def _read(self, link: FakeLink, codec: ServerCodec, nursery: trio.Nursery) -> None:
        while True:
            batch = await link.ws.receive_batch()
            for opcode, payload in batch:
                for event in codec.receive_message(opcode, payload):
                    if isinstance(event, Stdin):
                        start = link.in_cursor
                        link.in_cursor += len(event.data)
                        skip = len(self.in_data) - start
                        assert skip >= 0, "input arrived past the accepted offset"
                        if link is self.writer and skip < len(event.data):
                            self.in_data += event.data[skip:]
                    elif isinstance(event, Ack):
                        assert event.offset <= link.sent, "ACK beyond what was sent"
                        link.acked = max(link.acked, event.offset)
                        if link is self.writer:
                            self.writer_acked = max(self.writer_acked, event.offset)
                    elif isinstance(event, Resize):
                        self.sizes.append((event.cols, event.rows))
                    elif isinstance(event, Detach):
                        link.closing = (1000, "detached")
            self.notify()

    async def _send(self, link: FakeLink, codec: ServerCodec) -> None:
        ws = link.ws
        in_acked_sent = -1
        while True:
            changed = self._changed
            if link.closing is not None:
                await ws.aclose(*link.closing)
                return
            if self.drain_next:
                self.drain_next = False
                await ws.send_raw(ws.conn.send_binary(*_swap(codec.drain("test drain"))))
                await ws.aclose(1001, "draining")
                return
            out = bytearray()
            limit = min(self.produced, link.acked + self.window)
            while link.sent < limit:
                n = min(limit - link.sent, 32 * 1024)
                piece = self.output[link.sent:link.sent + n]
                out += ws.conn.send_binary(*_swap(codec.stdout(piece)))
                link.sent += n
            if link.mode == "rw" and len(self.in_data) != in_acked_sent:
                in_acked_sent = len(self.in_data)
                out += ws.conn.send_binary(*_swap(codec.ack(in_acked_sent)))
            if link.sent == len(self.output) and self.done() and link is self.writer:
                out += ws.conn.send_binary(*_swap(codec.exit(self.exit_code, self.exit_signal,
                                                            "exited")))
                link.exit_sent = True
                await ws.send_raw(bytes(out))
                await ws.aclose(1000, "exited")
                return
            if out:
                await ws.send_raw(bytes(out))
                continue
            await changed.wait()


def _swap(message: tuple[bytes, object]) -> tuple[object, bytes]:
    prefix, payload = message
    return payload, prefix


@dataclass
class Harness:
    """Connects clients to a FakeGateway over cuttable memory streams."""

    gateway: FakeGateway
    nursery: trio.Nursery
    rng: random.Random
    max_budget: int
    cuts_wanted: int
    links: list[CuttingStream] = field(default_factory=list)

    @property
    def cuts(self) -> int:
        return sum(1 for s in self.links if s.cut_done and s.budget is not None)

    async def connect(self, url: str, *, subprotocols: tuple[str, ...],
                      headers: list[tuple[str, str]], ssl_context: object
                      ) -> tuple[WebSocketStream, str | None]:
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.gateway.handle, server_end)
        budget = self.rng.randint(1, self.max_budget) if self.cuts < self.cuts_wanted else None
        stream = CuttingStream(client_end, budget)
        self.links.append(stream)
        parts = urlsplit(url)
        try:
            return await client_handshake(stream, "gateway", f"{parts.path}?{parts.query}",
                                          subprotocols, headers)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise


def attach_url(offset: int, mode: str, token: str | None) -> str:
    return (f"ws://gateway/api/v1/sessions/s-1/attach?offset={offset}&mode={mode}"
            + (f"&resume_token={token}" if token else ""))


def numbered_lines(n: int) -> bytes:
    return b"".join(b"%d\n" % i for i in range(1, n + 1))


# ------------------------------------------------------------------------------ resume


@pytest.mark.trio
async def test_output_exactly_once_across_mid_frame_cuts(autojump_clock: trio.abc.Clock) -> None:
    seed = 20261125
    print(f"seed={seed}")
    rng = random.Random(seed)
    output = numbered_lines(60_000)  # ~350 KB
    gateway = FakeGateway(output)
    received = bytearray()
    statuses: list[str] = []

    async def on_output(chunk: OutputChunk) -> None:
        assert chunk.offset == len(received), "a chunk out of order"
        received.extend(chunk.data)

    async def on_status(status: LinkStatus) -> None:
        statuses.append(status.state)

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, rng, max_budget=30_000, cuts_wanted=25)
        session = ResumableSession(attach_url, resume_token="token-0", on_output=on_output,
                                   on_status=on_status, rng=rng.random,
                                   connector=harness.connect)
        with trio.fail_after(600):
            end = await session.run()
    assert harness.cuts >= 20
    assert bytes(received) == output
    assert end.exit_status == 7
    assert session.statistics().gaps == 0
    assert statuses[0] == "connected"
    assert statuses.count("reconnected") >= 1
    assert gateway.exit_delivered


@pytest.mark.trio
async def test_input_exactly_once_across_cuts(autojump_clock: trio.abc.Clock) -> None:
    seed = 4242
    print(f"seed={seed}")
    rng = random.Random(seed)
    typed = numbered_lines(30_000)  # ~170 KB
    gateway = FakeGateway(b"ready\n", expected_input=len(typed), exit_code=0)

    async def on_output(chunk: OutputChunk) -> None:
        pass

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, rng, max_budget=20_000, cuts_wanted=25)
        session = ResumableSession(attach_url, resume_token="token-0", on_output=on_output,
                                   rng=rng.random, connector=harness.connect)

        async def type_it() -> None:
            view = memoryview(typed)
            while view:
                n = rng.randint(1, 5000)
                await session.send_stdin(bytes(view[:n]))
                view = view[n:]
                await trio.sleep(0.001)

        nursery.start_soon(type_it)
        with trio.fail_after(600):
            end = await session.run()
    assert harness.cuts >= 20
    assert bytes(gateway.in_data) == typed
    assert end.exit_status == 0
    assert session.statistics().resent_input_bytes > 0  # the cuts did force re-sends


@pytest.mark.trio
async def test_gap_is_reported_with_the_lost_byte_count(autojump_clock: trio.abc.Clock) -> None:
    output = numbered_lines(1000)
    gateway = FakeGateway(output, ring_start=1000, produced_all=True)
    gaps: list[Gap] = []
    received = bytearray()

    async def on_output(chunk: OutputChunk) -> None:
        received.extend(chunk.data)

    async def on_gap(gap: Gap) -> None:
        gaps.append(gap)

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, random.Random(1), max_budget=1, cuts_wanted=0)
        session = ResumableSession(attach_url, on_output=on_output, on_gap=on_gap,
                                   connector=harness.connect)
        with trio.fail_after(60):
            await session.run()
    assert gaps == [Gap(0, 1000)]
    assert bytes(received) == output[1000:]
    assert session.statistics().lost_bytes == 1000


@pytest.mark.trio
async def test_drain_reconnects_without_backoff(autojump_clock: trio.abc.Clock) -> None:
    gateway = FakeGateway(b"x" * 100_000, drain_next=True)
    statuses: list[LinkStatus] = []
    received = bytearray()

    async def on_output(chunk: OutputChunk) -> None:
        received.extend(chunk.data)

    async def on_status(status: LinkStatus) -> None:
        statuses.append(status)

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, random.Random(1), max_budget=1, cuts_wanted=0)
        session = ResumableSession(attach_url, resume_token="token-0", on_output=on_output,
                                   on_status=on_status, connector=harness.connect)
        with trio.fail_after(60):
            await session.run()
    reconnecting = [s for s in statuses if s.state == "reconnecting"]
    assert reconnecting and reconnecting[0].delay_s == 0.0
    assert "drain" in reconnecting[0].reason
    assert bytes(received) == b"x" * 100_000


@pytest.mark.trio
async def test_session_gone_is_fatal_with_a_clear_message(autojump_clock: trio.abc.Clock) -> None:
    gateway = FakeGateway(b"", close_code_next=4404)

    async def on_output(chunk: OutputChunk) -> None:
        pass

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, random.Random(1), max_budget=1, cuts_wanted=0)
        session = ResumableSession(attach_url, on_output=on_output, connector=harness.connect)
        with pytest.raises(SessionFailed) as info:
            with trio.fail_after(60):
                await session.run()
    assert isinstance(info.value.cause, errors.NotFoundError)
    assert "no session" in str(info.value)
    assert len(gateway.attaches) == 1  # not retried


@pytest.mark.trio
async def test_writer_conflict_without_prior_attach_is_fatal(
        autojump_clock: trio.abc.Clock) -> None:
    gateway = FakeGateway(b"abc")
    gateway.writer = FakeLink(None, "rw", 0, 0, 0)  # type: ignore[arg-type]

    async def on_output(chunk: OutputChunk) -> None:
        pass

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, random.Random(1), max_budget=1, cuts_wanted=0)
        session = ResumableSession(attach_url, resume_token="wrong", on_output=on_output,
                                   connector=harness.connect)
        with pytest.raises(SessionFailed) as info:
            with trio.fail_after(60):
                await session.run()
    assert isinstance(info.value.cause, errors.ConflictError)
    assert "join" in str(info.value)


@pytest.mark.trio
async def test_resize_is_sent_and_resent_after_reconnect(autojump_clock: trio.abc.Clock) -> None:
    gateway = FakeGateway(b"y" * 10, expected_input=1)
    session: ResumableSession

    async def on_status(status: LinkStatus) -> None:
        if status.state == "connected":
            session.resize_nowait(100, 30)
            # Cut the link: the size must reach the gateway again after the resume
            # only if it changed; the first link already sent it.
            await trio.sleep(1)
            session.resize_nowait(120, 40)
            await trio.sleep(1)
            await session.send_stdin(b"q")

    async def on_output(chunk: OutputChunk) -> None:
        pass

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, random.Random(1), max_budget=1, cuts_wanted=0)
        session = ResumableSession(attach_url, resume_token="token-0", on_output=on_output,
                                   on_status=on_status, connector=harness.connect)
        with trio.fail_after(60):
            await session.run()
    assert gateway.sizes == [(100, 30), (120, 40)]


@pytest.mark.trio
async def test_detach_ends_run_and_leaves_the_session(autojump_clock: trio.abc.Clock) -> None:
    gateway = FakeGateway(b"z" * 10, expected_input=10**9)  # never exits by itself
    session: ResumableSession

    async def on_output(chunk: OutputChunk) -> None:
        session.detach_nowait()

    async with trio.open_nursery() as nursery:
        harness = Harness(gateway, nursery, random.Random(1), max_budget=1, cuts_wanted=0)
        session = ResumableSession(attach_url, resume_token="token-0", on_output=on_output,
                                   connector=harness.connect)
        with trio.fail_after(60):
            end = await session.run()
    assert end.reason == "detached"
    assert end.exit_status == 0


def test_backoff_first_retry_within_half_a_second() -> None:
    backoff = Backoff(0.5, 30.0, rng=lambda: 1.0)
    assert next(backoff) <= 0.5
    for _ in range(20):
        assert next(backoff) <= 30.0


# ------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(("code", "action"), [
    (1000, Action.RECONNECT), (1001, Action.RECONNECT_NOW), (1006, Action.RECONNECT),
    (1011, Action.RECONNECT), (4429, Action.RECONNECT), (4409, Action.CONFLICT),
    (1002, Action.FATAL), (1008, Action.FATAL), (4401, Action.FATAL), (4404, Action.FATAL),
    (4410, Action.FATAL), (4999, Action.FATAL),
])
def test_close_code_policy_follows_protocol_section_7(code: int, action: Action) -> None:
    assert classify_close(code) is action


@pytest.mark.parametrize(("status", "action"), [
    (401, Action.FATAL), (403, Action.FATAL), (404, Action.FATAL), (410, Action.FATAL),
    (400, Action.FATAL), (409, Action.CONFLICT), (429, Action.RECONNECT),
    (502, Action.RECONNECT), (503, Action.RECONNECT),
])
def test_http_refusal_policy(status: int, action: Action) -> None:
    assert classify_http(status) is action


@pytest.mark.parametrize(("code", "signal", "reason", "status"), [
    (0, None, "exited", 0), (7, None, "exited", 7), (None, 9, "killed", 137),
    (None, 15, "exited", 143), (None, None, "killed", 1), (None, None, "detached", 0),
    (256 + 3, None, "exited", 3),
])
def test_exit_status_is_the_remote_one(code: int | None, signal: int | None, reason: str,
                                       status: int) -> None:
    assert exit_status(code, signal, reason) == status


def test_line_tracker_redraws_the_prompt_line() -> None:
    lines = LineTracker()
    lines.feed(b"total 0\r\n\x1b[1;32muser@host\x1b[0m:~$ ec")
    lines.feed(b"ho hi\x08\x1b[K")
    assert lines.redraw() == b"\x1b[1;32muser@host\x1b[0m:~$ echo hi\x08\x1b[K"


def test_line_tracker_refuses_lines_that_moved_the_cursor() -> None:
    lines = LineTracker()
    lines.feed(b"\x1b[2J\x1b[H vim screen")
    assert lines.redraw() is None
    lines.feed(b"\r\n$ ")
    assert lines.redraw() == b"$ "


def test_line_tracker_is_bounded() -> None:
    lines = LineTracker(limit=10)
    lines.feed(b"x" * 11)
    assert lines.redraw() is None


@pytest.mark.parametrize(("url", "http", "ws"), [
    ("http://127.0.0.1:7780", "http://127.0.0.1:7780/api", "ws://127.0.0.1:7780/api"),
    ("127.0.0.1:7780", "http://127.0.0.1:7780/api", "ws://127.0.0.1:7780/api"),
    ("https://gw.example/pt/", "https://gw.example/pt/api", "wss://gw.example/pt/api"),
    ("https://[::1]:8443", "https://[::1]:8443/api", "wss://[::1]:8443/api"),
])
def test_server_url_parsing(url: str, http: str, ws: str) -> None:
    address = parse_server(url)
    assert address.http_url("/api") == http
    assert address.ws_url("/api") == ws


def test_server_url_rejects_other_schemes() -> None:
    with pytest.raises(errors.ConfigError):
        parse_server("ftp://x")


def test_escape_tilde_dot_at_line_start_detaches() -> None:
    scanner = EscapeScanner()
    assert scanner.feed(b"ls\r") == (b"ls\r", False)
    assert scanner.feed(b"~") == (b"", False)  # held: the next byte decides
    assert scanner.feed(b".rest") == (b"", True)


def test_escape_only_at_line_start() -> None:
    scanner = EscapeScanner()
    assert scanner.feed(b"echo ~.") == (b"echo ~.", False)


def test_escape_double_tilde_types_one() -> None:
    scanner = EscapeScanner()
    assert scanner.feed(b"~~.") == (b"~.", False)
    assert scanner.feed(b"\r~x") == (b"\r~x", False)


def test_escape_at_the_very_start_detaches() -> None:
    assert EscapeScanner().feed(b"~.") == (b"", True)


def test_ssl_context_names_a_bad_ca_file() -> None:
    with pytest.raises(errors.ConfigError, match="--ca"):
        make_ssl_context("/nonexistent/ca.pem")


# ------------------------------------------------------------------------------ terminal


@pytest.fixture
def pty_fds() -> Iterator[tuple[int, int]]:
    """A pseudo-terminal (controller, terminal side), closed afterwards."""
    controller, term_fd = os.openpty()
    try:
        yield controller, term_fd
    finally:
        os.close(controller)
        os.close(term_fd)


def test_terminal_restores_mode_and_blocking_after_an_exception(
        pty_fds: tuple[int, int]) -> None:
    _, fd = pty_fds
    before = termios.tcgetattr(fd)
    with pytest.raises(RuntimeError):
        with Terminal(raw=True, read_stdin=True, stdin_fd=fd, stdout_fd=fd, stderr_fd=fd):
            assert termios.tcgetattr(fd) != before  # raw: no echo, no ICANON
            assert not os.get_blocking(fd)
            raise RuntimeError("boom")
    assert termios.tcgetattr(fd) == before
    assert os.get_blocking(fd)


@pytest.mark.trio
async def test_terminal_turns_sigterm_into_an_exception_after_restoring(
        pty_fds: tuple[int, int]) -> None:
    _, fd = pty_fds
    before = termios.tcgetattr(fd)
    with pytest.raises(TerminalSignal) as info:
        with Terminal(raw=True, read_stdin=True, stdin_fd=fd, stdout_fd=fd, stderr_fd=fd):
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(Terminal.watch_exit_signals)
                    os.kill(os.getpid(), signal.SIGTERM)
                    await trio.sleep_forever()
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
    assert info.value.signum == signal.SIGTERM
    assert termios.tcgetattr(fd) == before


@pytest.mark.trio
async def test_terminal_reads_typed_bytes_without_a_thread(pty_fds: tuple[int, int]) -> None:
    controller, fd = pty_fds
    with Terminal(raw=True, read_stdin=True, stdin_fd=fd, stdout_fd=fd, stderr_fd=fd) as term:
        os.write(controller, b"\x03hi")  # ^C is a byte in raw mode, not a signal
        with trio.fail_after(5):
            got = b""
            while len(got) < 3:
                got += await term.read_stdin_some()
        assert got == b"\x03hi"
        await term.write_output(b"out\n")
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(controller)
        assert os.read(controller, 100) == b"out\n"  # raw: no \r added
