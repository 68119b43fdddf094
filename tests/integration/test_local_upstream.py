"""LocalUpstream against real PTYs, pipes and processes (Linux)."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from podterm.errors import UpstreamError
from podterm.upstream import local
from podterm.upstream.base import (
    ExitStatus,
    OutputChannel,
    StreamSpec,
    Upstream,
    UpstreamStream,
)
from podterm.upstream.local import LocalStream, LocalUpstream

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")

TIMEOUT = 10  # seconds: generous for a loaded CI box; every wait below is bounded by it


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test under trio.run (no pytest-trio here); fixtures still work."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sh(script: str, *, tty: bool = True, **kw: object) -> StreamSpec:
    return StreamSpec(command=("sh", "-c", script), tty=tty, **kw)  # type: ignore[arg-type]


async def read_until(stream: LocalStream, needle: bytes) -> bytes:
    """Output (any channel) up to and including ``needle``."""
    buf = b""
    with trio.fail_after(TIMEOUT):
        while needle not in buf:
            channel, data = await stream.receive_some()
            assert channel != OutputChannel.EOF, f"EOF before {needle!r}; got {buf!r}"
            buf += data
    return buf


async def read_all(stream: LocalStream) -> dict[int, bytes]:
    """Every output byte by channel, up to EOF."""
    out: dict[int, bytes] = {OutputChannel.STDOUT: b"", OutputChannel.STDERR: b""}
    with trio.fail_after(TIMEOUT):
        while True:
            channel, data = await stream.receive_some()
            if channel == OutputChannel.EOF:
                assert data == b""
                return out
            assert data
            out[channel] += data


async def wait_exit(stream: LocalStream) -> ExitStatus:
    with trio.fail_after(TIMEOUT):
        return await stream.wait_exit()


async def aclose(stream: LocalStream) -> None:
    with trio.fail_after(TIMEOUT):
        await stream.aclose()


# -- TTY -----------------------------------------------------------------------


@trio_test
async def test_tty_echo_through_cat() -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("cat",), tty=True))
    try:
        await stream.send_stdin(b"hello\n")
        # The terminal echoes the typed line, then cat writes it back; ONLCR makes \r\n.
        assert await read_until(stream, b"hello\r\nhello\r\n") == b"hello\r\nhello\r\n"
        await stream.close_stdin()  # VEOF: cat sees end of input and exits
        assert (await read_all(stream))[OutputChannel.STDOUT] == b""
        assert await wait_exit(stream) == ExitStatus(code=0, signal=None)
    finally:
        await aclose(stream)


@trio_test
async def test_tty_printf_output_then_eof() -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("printf", "a\\tb\\n%s\\n", "c")))
    try:
        assert await read_all(stream) == {OutputChannel.STDOUT: b"a\tb\r\nc\r\n", OutputChannel.STDERR: b""}
        assert (await wait_exit(stream)).exit_code == 0
        # EOF is sticky.
        assert await stream.receive_some() == (OutputChannel.EOF, b"")
        # Nobody is left on the terminal: input is refused, not silently dropped.
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_stdin(b"ls\n")
        await stream.close_stdin()
    finally:
        await aclose(stream)


@trio_test
async def test_tty_close_stdin_mid_line_still_ends_input() -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("cat",), tty=True))
    try:
        await stream.send_stdin(b"abc")  # no newline: one VEOF would only submit the line
        await stream.close_stdin()
        out = await read_all(stream)
        assert out[OutputChannel.STDOUT].endswith(b"abc")
        assert await wait_exit(stream) == ExitStatus(code=0, signal=None)
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_stdin(b"more")
    finally:
        await aclose(stream)


@trio_test
async def test_tty_child_has_the_pty_as_controlling_terminal() -> None:
    # Opening /dev/tty fails (ENXIO) without a controlling terminal.
    stream = await LocalUpstream().open(sh("exec </dev/tty && echo ctty-ok"))
    try:
        assert (await read_all(stream))[OutputChannel.STDOUT] == b"ctty-ok\r\n"
    finally:
        await aclose(stream)


@pytest.mark.parametrize("tty", [True, False])
@trio_test
async def test_child_leads_its_own_session_and_process_group(tty: bool) -> None:
    stream = await LocalUpstream().open(sh("echo $$ $(ps -o sid= -p $$) $(ps -o pgid= -p $$)", tty=tty))
    try:
        out = (await read_all(stream))[OutputChannel.STDOUT].split()
        assert out == [str(stream.pid).encode()] * 3
    finally:
        await aclose(stream)


@trio_test
async def test_child_does_not_inherit_ignored_sigpipe() -> None:
    # Python ignores SIGPIPE; a child that inherited that would see EPIPE and
    # complain instead of dying quietly when its reader goes away.
    stream = await LocalUpstream().open(sh("yes | head -n 1", tty=False))
    try:
        assert await read_all(stream) == {OutputChannel.STDOUT: b"y\n", OutputChannel.STDERR: b""}
    finally:
        await aclose(stream)


@trio_test
async def test_tty_initial_size_and_resize_visible_to_stty() -> None:
    stream = await LocalUpstream().open(sh("stty size; read x; stty size", cols=100, rows=30))
    try:
        assert await read_until(stream, b"\r\n") == b"30 100\r\n"
        stream.resize(132, 43)
        assert stream.size == (132, 43)
        await stream.send_stdin(b"\n")
        assert await read_until(stream, b"43 132\r\n") == b"\r\n43 132\r\n"
    finally:
        await aclose(stream)


@trio_test
async def test_tty_resize_delivers_sigwinch_to_the_foreground_job() -> None:
    stream = await LocalUpstream().open(sh("trap 'echo WINCH; stty size' WINCH; echo ready; read x"))
    try:
        await read_until(stream, b"ready\r\n")
        stream.resize(90, 20)
        assert await read_until(stream, b"20 90\r\n") == b"WINCH\r\n20 90\r\n"
    finally:
        await aclose(stream)


@trio_test
async def test_tty_interactive_login_shell_when_no_command(tmp_path: Path) -> None:
    env = {"PATH": os.defpath, "HOME": str(tmp_path), "SHELL": "/bin/sh"}
    stream = await LocalUpstream(base_env=env).open(StreamSpec(command=None, tty=True))
    try:
        await stream.send_stdin(b"echo $((6*7)); pwd; exit 5\n")
        out = (await read_all(stream))[OutputChannel.STDOUT]
        assert b"42\r\n" in out  # the echoed command line shows "$((6*7))", not 42
        assert f"\r\n{tmp_path}\r\n".encode() in out  # a login shell starts in $HOME
        assert (await wait_exit(stream)).exit_code == 5
    finally:
        await aclose(stream)


@trio_test
async def test_tty_term_defaults_to_xterm_256color_and_spec_env_wins() -> None:
    upstream = LocalUpstream(base_env={"PATH": os.defpath, "TERM": "dumb"})
    stream = await upstream.open(sh('echo "$TERM"'))
    try:
        assert (await read_all(stream))[OutputChannel.STDOUT] == b"xterm-256color\r\n"
    finally:
        await aclose(stream)
    stream = await upstream.open(sh('echo "$TERM"', env={"TERM": "vt100"}))
    try:
        assert (await read_all(stream))[OutputChannel.STDOUT] == b"vt100\r\n"
    finally:
        await aclose(stream)


# -- exit status ---------------------------------------------------------------


@pytest.mark.parametrize("tty", [True, False])
@trio_test
async def test_exit_code_is_reported(tty: bool) -> None:
    stream = await LocalUpstream().open(sh("exit 3", tty=tty))
    try:
        status = await wait_exit(stream)
        assert status == ExitStatus(code=3, signal=None)
        assert (status.exit_code, status.reason) == (3, "exit status 3")
    finally:
        await aclose(stream)
    assert await stream.wait_exit() == status  # still known after aclose


@pytest.mark.parametrize("tty", [True, False])
@trio_test
async def test_killed_by_sigterm_reports_signal_and_143(tty: bool) -> None:
    stream = await LocalUpstream().open(sh("kill -TERM $$", tty=tty))
    try:
        status = await wait_exit(stream)
        assert status == ExitStatus(code=None, signal=signal.SIGTERM)
        assert (status.exit_code, status.reason) == (143, "killed by SIGTERM")
    finally:
        await aclose(stream)


@trio_test
async def test_many_tasks_may_wait_for_exit() -> None:
    stream = await LocalUpstream().open(sh("read x; exit 7", tty=False))
    results: list[ExitStatus] = []

    async def waiter() -> None:
        results.append(await stream.wait_exit())

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                await stream.send_stdin(b"\n")
        assert results == [ExitStatus(code=7, signal=None)] * 3
    finally:
        await aclose(stream)


# -- pipes ---------------------------------------------------------------------


@pytest.mark.parametrize("epoll", [True, False], ids=["epoll", "nursery-wait"])
@trio_test
async def test_pipes_separate_stdout_and_stderr(epoll: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_HAVE_EPOLL", epoll)
    script = "echo out1; echo err1 >&2; read x; echo out2; echo err2 >&2; exit 4"
    stream = await LocalUpstream().open(sh(script, tty=False))
    try:
        assert await read_until(stream, b"err1\n")  # both channels are waited on at once
        await stream.send_stdin(b"go\n")
        rest = await read_all(stream)
        stats = stream.statistics()
        assert (stats.bytes_stdout, stats.bytes_stderr, stats.bytes_stdin) == (10, 10, 3)
        assert rest[OutputChannel.STDOUT].endswith(b"out2\n")
        assert rest[OutputChannel.STDERR].endswith(b"err2\n")
        assert (await wait_exit(stream)).exit_code == 4
    finally:
        await aclose(stream)


@trio_test
async def test_pipes_channels_are_exact() -> None:
    stream = await LocalUpstream().open(sh("printf o1; printf e1 >&2; printf o2; printf e2 >&2", tty=False))
    try:
        assert await read_all(stream) == {OutputChannel.STDOUT: b"o1o2", OutputChannel.STDERR: b"e1e2"}
    finally:
        await aclose(stream)


@trio_test
async def test_close_stdin_gives_eof_to_cat_in_pipe_mode() -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("cat",), tty=False))
    try:
        await stream.send_stdin(b"abc")
        await stream.send_stdin(memoryview(b"xdefx")[1:4])
        await stream.close_stdin()
        await stream.close_stdin()  # idempotent
        assert await read_all(stream) == {OutputChannel.STDOUT: b"abcdef", OutputChannel.STDERR: b""}
        assert await wait_exit(stream) == ExitStatus(code=0, signal=None)
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_stdin(b"x")
    finally:
        await aclose(stream)


@trio_test
async def test_writing_to_a_process_that_stopped_reading_is_broken() -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("true",), tty=False))
    try:
        await wait_exit(stream)
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_stdin(b"nobody reads this\n")
    finally:
        await aclose(stream)


@trio_test
async def test_stdin_is_bounded_writes_wait_for_the_reader() -> None:
    # 4 MiB into `cat` in pipe mode: far more than a pipe buffer holds, so the
    # writer must wait for cat, which waits for us to read its output.
    payload = bytes(range(256)) * (4 * 4096)
    stream = await LocalUpstream().open(StreamSpec(command=("cat",), tty=False))
    received = bytearray()

    async def writer() -> None:
        await stream.send_stdin(payload)
        await stream.close_stdin()

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                while True:
                    channel, data = await stream.receive_some()
                    if channel == OutputChannel.EOF:
                        break
                    received += data
        assert bytes(received) == payload
        assert stream.statistics().bytes_stdin == len(payload)
    finally:
        await aclose(stream)


@trio_test
async def test_eof_can_come_before_exit() -> None:
    stream = await LocalUpstream().open(sh("echo bye; exec >&- 2>&-; read x; exit 2", tty=False))
    try:
        assert await read_all(stream) == {OutputChannel.STDOUT: b"bye\n", OutputChannel.STDERR: b""}
        await stream.send_stdin(b"\n")  # still running after EOF, still reading input
        assert (await wait_exit(stream)).exit_code == 2
    finally:
        await aclose(stream)


@trio_test
async def test_exit_can_come_before_eof_and_aclose_ends_the_wait() -> None:
    # The leader exits; a background child keeps the pipes open, so no EOF yet.
    stream = await LocalUpstream().open(sh("sleep 1000 & echo started", tty=False))
    outcome: list[BaseException] = []

    async def reader() -> None:
        try:
            while True:
                await stream.receive_some()
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            assert await stream.wait_exit() == ExitStatus(code=0, signal=None)
            await trio.testing.wait_all_tasks_blocked()
            assert not outcome  # the reader is still waiting for output
            await stream.aclose()  # kills the group (sleep too) and wakes the reader
    assert isinstance(outcome[0], trio.ClosedResourceError)


# -- aclose --------------------------------------------------------------------


@pytest.mark.parametrize("tty", [True, False])
@trio_test
async def test_aclose_kills_the_process_group_including_a_grandchild(tty: bool) -> None:
    stream = await LocalUpstream().open(sh("sleep 1000 & echo $!; wait", tty=tty))
    grandchild = int((await read_until(stream, b"\n")).strip())
    pidfd = os.pidfd_open(grandchild)  # readable once that process has exited
    try:
        await aclose(stream)
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    status = await stream.wait_exit()
    assert status.signal == signal.SIGHUP  # the first signal of the sequence ended it
    assert stream.statistics().closed


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "waitid-thread"])
@trio_test
async def test_exit_waiter_survives_aclose_reaping_under_it(
    pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "_HAVE_PIDFD", pidfd)
    stream = await LocalUpstream().open(sh("read x", tty=False))
    results: list[ExitStatus] = []

    async def waiter() -> None:
        results.append(await stream.wait_exit())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            os.kill(stream.pid, signal.SIGKILL)
            # Block right here until it is a zombie, so the waiter has not run yet
            # when aclose() reaps the leader and closes what the waiter waits on.
            os.waitid(os.P_PID, stream.pid, os.WEXITED | os.WNOWAIT)
            await stream.aclose()
    assert results == [ExitStatus(code=None, signal=signal.SIGKILL)]


@trio_test
async def test_aclose_escalates_to_sigkill_after_the_grace() -> None:
    # An exec'd program inherits ignored signals: this sleep ignores HUP and TERM.
    upstream = LocalUpstream(kill_grace_s=0.2)
    stream = await upstream.open(sh("trap '' HUP TERM; echo ready; exec sleep 1000", tty=False))
    await read_until(stream, b"ready\n")
    await aclose(stream)
    assert await stream.wait_exit() == ExitStatus(code=None, signal=signal.SIGKILL)


@trio_test
async def test_aclose_wakes_a_blocked_receiver_and_is_idempotent() -> None:
    # Ignoring HUP and TERM, with no grace: the fds close while the program still
    # holds the terminal, so the reader is woken by the close, not by EOF.
    upstream = LocalUpstream(kill_grace_s=0)
    stream = await upstream.open(sh("trap '' HUP TERM; echo ready; exec sleep 1000"))
    await read_until(stream, b"ready\r\n")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def receiver() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some()

            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
    await aclose(stream)
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        stream.resize(80, 24)


@trio_test
async def test_cancelled_aclose_still_kills_and_releases() -> None:
    before = open_fds()
    upstream = LocalUpstream(kill_grace_s=30.0)
    stream = await upstream.open(sh("trap '' HUP TERM; echo ready; exec sleep 1000", tty=False))
    await read_until(stream, b"ready\n")
    with trio.move_on_after(0.1):  # cancels aclose during the 30 s grace
        await stream.aclose()
    assert await wait_exit(stream) == ExitStatus(code=None, signal=signal.SIGKILL)
    assert open_fds() == before
    assert upstream.statistics().streams_open == 0


@trio_test
async def test_open_in_a_cancelled_scope_starts_nothing() -> None:
    upstream = LocalUpstream()
    before = open_fds()
    with trio.CancelScope() as scope:
        scope.cancel()
        await upstream.open(StreamSpec(command=("sleep", "1000")))
        raise AssertionError("open() did not raise Cancelled")
    assert open_fds() == before
    assert upstream.statistics().streams_opened == 0


@trio_test
async def test_open_never_loses_a_started_stream_to_cancellation() -> None:
    # Once the process runs, open() returns it (the caller owns it) rather than
    # raising Cancelled with nobody left to stop it.
    upstream = LocalUpstream()
    with trio.CancelScope() as scope:
        streams: list[LocalStream] = []
        spec = StreamSpec(command=("sleep", "1000"), tty=False)
        streams.append(await upstream.open(spec))
        scope.cancel()
        streams.append(await upstream.open(spec))  # raises before spawning
    assert len(streams) == 1 and upstream.statistics().streams_open == 1
    await aclose(streams[0])


# -- bulk output ---------------------------------------------------------------


EXPECTED_SEQ = b"".join(b"%d\n" % i for i in range(1, 200001))


@pytest.mark.parametrize("tty", [True, False])
@trio_test
async def test_large_output_arrives_complete_and_in_order_in_batches(tty: bool) -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("seq", "1", "200000"), tty=tty))
    reads = 0
    chunks: list[bytes] = []
    try:
        with trio.fail_after(TIMEOUT):
            while True:
                channel, data = await stream.receive_some(65536)
                if channel == OutputChannel.EOF:
                    break
                assert channel == OutputChannel.STDOUT and 0 < len(data) <= 65536
                chunks.append(data)
                reads += 1
        out = b"".join(chunks)
        assert (out.replace(b"\r\n", b"\n") if tty else out) == EXPECTED_SEQ
        # One read per readiness returns all that is there (a PTY hands over what its
        # line discipline has processed so far: hundreds of bytes here, never one).
        assert len(out) / reads > 100
        assert (await wait_exit(stream)).exit_code == 0
    finally:
        await aclose(stream)


@trio_test
async def test_a_pipe_that_comes_back_full_is_grown_and_read_in_bulk(tmp_path: Path) -> None:
    import fcntl

    data = bytes(range(256)) * 1024  # 256 KiB
    path = tmp_path / "bulk.bin"
    path.write_bytes(data)
    # stderr says when stdout holds what was written: 64 KiB (a full default
    # pipe), then, once we say go, 200,000 bytes in one go.
    script = (f"head -c 65536 {path}; echo a >&2; read x; "
              f"head -c 200000 {path}; echo b >&2")
    stream = await LocalUpstream().open(sh(script, tty=False))
    out_fd, err_fd = stream._stdout_fd, stream._stderr_fd
    assert out_fd is not None and err_fd is not None
    try:
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(err_fd)
            channel, first = await stream.receive_some(1 << 20)
            assert (channel, len(first)) == (OutputChannel.STDOUT, 65536)  # came back full
            assert fcntl.fcntl(out_fd, fcntl.F_GETPIPE_SZ) == local.BULK_PIPE_BYTES
            assert await stream.receive_some(1 << 20) == (OutputChannel.STDERR, b"a\n")
            await stream.send_stdin(b"go\n")
            await trio.lowlevel.wait_readable(err_fd)
            channel, second = await stream.receive_some(1 << 20)
            assert (channel, len(second)) == (OutputChannel.STDOUT, 200000)  # one read
            assert second == data[:200000] and first == data[:65536]
            rest = await read_all(stream)
        assert rest == {OutputChannel.STDOUT: b"", OutputChannel.STDERR: b"b\n"}
    finally:
        await aclose(stream)


@trio_test
async def test_a_pipe_read_never_exceeds_what_the_session_asked() -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("seq", "1", "100000"), tty=False))
    chunks: list[bytes] = []
    try:
        with trio.fail_after(TIMEOUT):
            while True:
                channel, chunk = await stream.receive_some(1000)
                if channel == OutputChannel.EOF:
                    break
                assert 0 < len(chunk) <= 1000
                chunks.append(chunk)
        assert b"".join(chunks) == b"".join(b"%d\n" % i for i in range(1, 100001))
    finally:
        await aclose(stream)


# -- environment, cwd, context -------------------------------------------------


@trio_test
async def test_spec_env_and_cwd_apply_and_gateway_secrets_do_not_leak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODTERM_ADMIN_TOKEN", "secret")
    monkeypatch.setenv("PODTERM_TEST_VISIBLE", "no")
    upstream = LocalUpstream()  # inherits this process's environment, minus PODTERM_*
    script = 'echo "$FOO"; pwd; echo "${PODTERM_ADMIN_TOKEN-unset}"'
    stream = await upstream.open(sh(script, tty=False, env={"FOO": "bar"}, cwd=str(tmp_path)))
    try:
        out = (await read_all(stream))[OutputChannel.STDOUT]
        assert out == f"bar\n{tmp_path}\nunset\n".encode()
    finally:
        await aclose(stream)


@trio_test
async def test_capture_context_follows_the_shell_cwd(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    spec = StreamSpec(command=("sh",), tty=True, cwd=str(tmp_path), env={"A": "1"})
    stream = await LocalUpstream().open(spec)
    try:
        assert stream.capture_context().cwd == str(tmp_path)
        # The terminal echoes the typed line; quotes keep the echo from matching.
        await stream.send_stdin(b"cd sub && echo MOV''ED\n")
        await read_until(stream, b"MOVED\r\n")
        context = stream.capture_context()
        assert context.cwd == str(tmp_path / "sub")
        assert dict(context.env) == {"A": "1", "TERM": "xterm-256color"}
        await stream.send_stdin(b"exit\n")
        await wait_exit(stream)
    finally:
        await aclose(stream)
    assert stream.capture_context().cwd == str(tmp_path / "sub")  # the last known one


@pytest.mark.parametrize(
    "spec",
    [
        StreamSpec(command=("/nonexistent/podterm-no-such-command",), tty=True),
        StreamSpec(command=("podterm-no-such-command-either",), tty=False),
        StreamSpec(command=("true",), tty=True, cwd="/nonexistent/podterm-dir"),
    ],
    ids=["tty-command", "pipes-command", "cwd"],
)
@trio_test
async def test_spawn_failure_raises_upstream_error_and_leaks_nothing(spec: StreamSpec) -> None:
    upstream = LocalUpstream()
    before = open_fds()
    with pytest.raises(UpstreamError, match="could not start"):
        await upstream.open(spec)
    assert open_fds() == before
    assert upstream.statistics() == local.LocalUpstreamStatistics(0, 0, 1)


# -- contract, concurrency, leaks ----------------------------------------------


@trio_test
async def test_stream_and_upstream_satisfy_the_protocols() -> None:
    upstream = LocalUpstream()
    assert isinstance(upstream, Upstream)
    stream = await upstream.open(StreamSpec(command=("true",)))
    try:
        assert isinstance(stream, UpstreamStream)
        assert stream.pid > 0
        assert repr(stream).startswith(f"<LocalStream pid={stream.pid} tty ")
    finally:
        await aclose(stream)


@trio_test
async def test_concurrent_receivers_are_refused() -> None:
    stream = await LocalUpstream().open(StreamSpec(command=("sleep", "1000"), tty=False))
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await stream.receive_some()
                nursery.cancel_scope.cancel()
    finally:
        await aclose(stream)


@trio_test
async def test_exit_status_without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels before 5.3 (and some sandboxes): a thread waits in waitid instead.
    monkeypatch.setattr(local, "_HAVE_PIDFD", False)
    upstream = LocalUpstream()
    stream = await upstream.open(sh("exit 9", tty=False))
    try:
        assert (await wait_exit(stream)).exit_code == 9
    finally:
        await aclose(stream)
    stream = await upstream.open(sh("sleep 1000 & echo $!; wait", tty=True))
    grandchild = int((await read_until(stream, b"\n")).strip())
    pidfd = os.pidfd_open(grandchild)
    try:
        await aclose(stream)
        with trio.fail_after(TIMEOUT):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


@trio_test
async def test_no_fd_leak_over_50_cycles() -> None:
    upstream = LocalUpstream()

    async def cycle(i: int) -> None:
        tty = i % 2 == 0
        stream = await upstream.open(sh(f"echo cycle{i}; read x", tty=tty))
        try:
            await read_until(stream, b"cycle%d" % i)
            if i % 3 == 0:
                await stream.send_stdin(b"\n")
                await read_all(stream)
                await wait_exit(stream)
        finally:
            await aclose(stream)

    await cycle(-1)  # warm-up: trio's thread cache and lazily opened fds
    before = open_fds()
    for i in range(50):
        await cycle(i)
    assert open_fds() == before
    assert upstream.statistics().streams_open == 0
    assert upstream.statistics().streams_opened == 51
    assert local._unreaped == []


@trio_test
async def test_200_concurrent_pty_sessions_open_and_close_cleanly() -> None:
    upstream = LocalUpstream()
    before = open_fds()
    streams: list[LocalStream] = []

    async def session(i: int) -> None:
        stream = await upstream.open(StreamSpec(command=("cat",), tty=True, cols=80 + i % 50))
        streams.append(stream)
        await stream.send_stdin(b"ping-%d\n" % i)
        await read_until(stream, b"ping-%d\r\nping-%d\r\n" % (i, i))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(session, i)
        assert upstream.statistics().streams_open == 200
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(stream.aclose)
    assert all(s.statistics().exit_status is not None for s in streams)
    assert upstream.statistics().streams_open == 0
    assert open_fds() == before
