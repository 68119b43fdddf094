"""Recordings on disk: the writer, recorders, fail-closed on write errors, and replay timing.

Files written by :class:`RecordingWriter` are checked twice: by our strict
asciicast v2 validator (header fields and types, non-decreasing times, event
codes, string data) and by the asciinema package's own reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from podterm.batcher import BufferFull
from podterm.cli import main as cli_main
from podterm.recording import (
    CastFormatError,
    Event,
    Recorder,
    RecordingFailed,
    RecordingWriter,
    parse,
)
from podterm.recording.replay import play


class FakeClock:
    """A clock the test moves by hand (recorders take any ``() -> float``)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def asciinema_events(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    """Read a recording with asciinema's reader (required under CI)."""
    try:
        from asciinema.asciicast import v2
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the asciinema package is missing (pip install asciinema)",
                        pytrace=False)
        pytest.skip("asciinema is not installed: pip install asciinema")
    with path.open(encoding="utf-8") as f:
        first = f.readline()
        with v2.open_from_file(first, f) as cast:
            return cast.v2_header, list(cast.events())


def check_file(path: Path) -> tuple[Any, list[Event]]:
    """Strict validation plus asciinema's reader; both must agree."""
    header, events = parse(path.read_bytes())
    assert all(isinstance(e.data, str) for e in events)
    times = [e.time for e in events]
    assert times == sorted(times)
    a_header, a_events = asciinema_events(path)
    assert a_header["width"] == header.width and a_header["height"] == header.height
    assert [[e.time, e.code, e.data] for e in events] == a_events
    return header, events


async def run_writer(nursery: trio.Nursery, writer: RecordingWriter) -> None:
    await nursery.start(writer.run)


@pytest.mark.trio
async def test_a_recorded_session_is_valid_asciicast_v2(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = RecordingWriter(tmp_path / "rec", clock=clock, flush_interval_s=0)
    text = "héllo wörld ☃ 日本語\r\n\x1b[1;31mred\x1b[0m\r\n"
    raw = text.encode()
    async with trio.open_nursery() as nursery:
        await run_writer(nursery, writer)
        recorder = await writer.open_recorder(
            "s-0123456789ab", 100, 30, timestamp=1700000000.9,
            env={"SHELL": "/bin/sh", "TERM": "xterm-256color"}, title="alice@prod/web-0")
        for i in range(0, len(raw), 3):  # 3-byte chunks split most multibyte characters
            clock.now += 0.25
            await recorder.output(raw[i:i + 3])
        clock.now += 1
        recorder.resize(120, 40)
        await recorder.input(b"secret\r")  # record_input is off: counted, not recorded
        await recorder.aclose()
        await writer.wait_flushed()
        nursery.cancel_scope.cancel()
    path = tmp_path / "rec" / "s-0123456789ab.cast"
    assert os.stat(path).st_mode & 0o777 == 0o600
    header, events = check_file(path)
    assert (header.width, header.height, header.timestamp) == (100, 30, 1700000000)
    assert dict(header.env) == {"SHELL": "/bin/sh", "TERM": "xterm-256color"}
    assert header.title == "alice@prod/web-0"
    assert "".join(e.data for e in events if e.code == "o") == text
    chunks = -(-len(raw) // 3)
    assert [e for e in events if e.code != "o"] == [Event(0.25 * chunks + 1, "r", "120x40")]
    assert not any(e.code == "i" for e in events)
    assert events[0].time == 0.25
    stats = recorder.statistics()
    assert stats.bytes_out == len(raw) and stats.bytes_in == 7 and stats.closed
    assert writer.statistics().files_finished == 1 and writer.statistics().files_open == 0


@pytest.mark.trio
async def test_input_is_recorded_when_asked(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = RecordingWriter(tmp_path, clock=clock, record_input=True)
    async with trio.open_nursery() as nursery:
        await run_writer(nursery, writer)
        recorder = await writer.open_recorder("s-1", 80, 24)
        clock.now += 1
        await recorder.input(b"ls\r")
        clock.now += 0.5
        await recorder.output(b"a.txt\r\n")
        await recorder.aclose()
        nursery.cancel_scope.cancel()
    _, events = check_file(tmp_path / "s-1.cast")
    assert events == [Event(1.0, "i", "ls\r"), Event(1.5, "o", "a.txt\r\n")]


@pytest.mark.trio
async def test_interleaved_sessions_with_few_descriptors_get_their_own_files(
        tmp_path: Path) -> None:
    clock = FakeClock()
    writer = RecordingWriter(tmp_path, clock=clock, max_open_files=1, flush_interval_s=0)
    async with trio.open_nursery() as nursery:
        await run_writer(nursery, writer)
        recorders = [await writer.open_recorder(f"s-{i}", 80, 24) for i in range(3)]
        for step in range(5):
            for i, recorder in enumerate(recorders):
                clock.now += 0.1
                await recorder.output(f"{i}:{step} ".encode())
            await writer.wait_flushed()
            assert writer.statistics().files_open <= 1
        for recorder in recorders:
            await recorder.aclose()
        await writer.wait_flushed()
        nursery.cancel_scope.cancel()
    for i in range(3):
        _, events = check_file(tmp_path / f"s-{i}.cast")
        assert "".join(e.data for e in events) == "".join(f"{i}:{s} " for s in range(5))


@pytest.mark.trio
async def test_a_file_that_cannot_be_created_fails_that_session_only(tmp_path: Path) -> None:
    (tmp_path / "s-bad.cast").mkdir()  # the name is taken: O_EXCL creation fails
    writer = RecordingWriter(tmp_path, flush_interval_s=0)
    failures: list[RecordingFailed] = []
    async with trio.open_nursery() as nursery:
        await run_writer(nursery, writer)
        bad = await writer.open_recorder("s-bad", 80, 24)
        good = await writer.open_recorder("s-good", 80, 24)
        bad.on_failure(lambda r, exc: failures.append(exc))
        await good.output(b"fine")
        with trio.fail_after(5):
            error = await bad.wait_failed()
        assert failures == [error]
        assert error.close_code == 1011 and "s-bad" in error.message
        with pytest.raises(RecordingFailed):  # fail closed: the session must end
            await bad.output(b"more")
        await good.output(b" still")
        await bad.aclose()
        await good.aclose()
        await writer.wait_flushed()
        nursery.cancel_scope.cancel()
    _, events = check_file(tmp_path / "s-good.cast")
    assert "".join(e.data for e in events) == "fine still"
    stats = writer.statistics()
    assert stats.failures == 1 and stats.recorders == 0


@pytest.mark.trio
async def test_a_full_disk_mid_session_closes_the_session(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path, flush_interval_s=0, max_open_files=1)
    async with trio.open_nursery() as nursery:
        await run_writer(nursery, writer)
        victim = await writer.open_recorder("s-victim", 80, 24)
        await victim.output(b"before")
        await writer.wait_flushed()
        other = await writer.open_recorder("s-other", 80, 24)
        await other.output(b"x")
        await writer.wait_flushed()  # s-victim's descriptor was closed (max_open_files=1)
        path = tmp_path / "s-victim.cast"
        path.unlink()
        path.symlink_to("/dev/full")  # its next write fails with ENOSPC
        await victim.output(b"after")
        with trio.fail_after(5):
            error = await victim.wait_failed()
        assert "No space left" in str(error.__cause__)
        assert victim.is_failed
        with pytest.raises(RecordingFailed):
            await victim.output(b"more")
        await victim.aclose()
        await other.aclose()
        nursery.cancel_scope.cancel()
    check_file(tmp_path / "s-other.cast")


async def _stuck_writer(nursery: trio.Nursery, writer: RecordingWriter,
                        clock: FakeClock) -> Recorder:
    """Run ``writer``, open session ``s-1``'s recorder, then hold the writer's
    only slot (the test releases ``writer.batcher.limiter``); the clock at 1 s."""
    await run_writer(nursery, writer)
    recorder = await writer.open_recorder("s-1", 80, 24)
    await writer.wait_flushed()
    await writer.batcher.limiter.acquire()  # the writer is stuck
    clock.now += 1
    return recorder


@pytest.mark.trio
async def test_a_blocked_writer_applies_backpressure_and_coalesces_resizes(
        tmp_path: Path) -> None:
    clock = FakeClock()
    writer = RecordingWriter(tmp_path, clock=clock, capacity_bytes=400, flush_interval_s=0,
                             policy="fail-closed", high_water=300)
    done: list[str] = []
    c_submitted = trio.Event()
    async with trio.open_nursery() as nursery:
        recorder = await _stuck_writer(nursery, writer, clock)
        await recorder.output(b"a" * 150)  # 250 with overhead
        writer.check_accepting()
        clock.now += 1
        await recorder.output(b"b" * 50)  # 400: full, and above the high-water mark
        with pytest.raises(BufferFull):
            writer.check_accepting()
        clock.now += 1
        recorder.resize(100, 30)  # cannot wait: held
        clock.now += 1
        recorder.resize(120, 40)  # replaces the held one
        clock.now += 1

        async def more_output() -> None:
            await recorder.output(b"c")
            done.append("c")
            c_submitted.set()

        nursery.start_soon(more_output)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []  # backpressure: the pump waits, nothing is dropped
        writer.batcher.limiter.release()
        with trio.fail_after(5):
            await c_submitted.wait()
            await writer.wait_flushed()
        assert done == ["c"]
        assert recorder.statistics().resizes_coalesced == 1
        await recorder.aclose()
        nursery.cancel_scope.cancel()
    _, events = check_file(tmp_path / "s-1.cast")
    assert [(e.time, e.code, e.data[:1]) for e in events] == [
        (1.0, "o", "a"), (2.0, "o", "b"), (4.0, "r", "1"), (5.0, "o", "c")]
    assert events[2].data == "120x40"


@pytest.mark.trio
async def test_output_nowait_records_only_when_there_is_room(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = RecordingWriter(tmp_path, clock=clock, capacity_bytes=400, flush_interval_s=0)
    async with trio.open_nursery() as nursery:
        recorder = await _stuck_writer(nursery, writer, clock)
        assert recorder.output_nowait(b"a" * 150)  # 250 with overhead: fits
        assert recorder.output_nowait(b"")  # nothing to record
        clock.now += 1
        assert not recorder.output_nowait(b"b" * 100)  # 450 > 400: refused, not recorded
        assert recorder.statistics().bytes_out == 150
        recorder.resize(100, 30)  # fits (250 + 106): submitted at once
        recorder.resize(90, 20)   # does not fit: held
        assert not recorder.output_nowait(b"c")  # the held resize goes first: not here
        writer.batcher.limiter.release()
        with trio.fail_after(5):
            await recorder.output(b"c")  # the awaiting path submits the held resize first
            await writer.wait_flushed()
        assert recorder.output_nowait(b"d")
        await recorder.aclose()
        with pytest.raises(trio.ClosedResourceError):
            recorder.output_nowait(b"late")
        nursery.cancel_scope.cancel()
    _, events = check_file(tmp_path / "s-1.cast")
    assert [(e.time, e.code, e.data[:1]) for e in events] == [
        (1.0, "o", "a"), (2.0, "r", "1"), (2.0, "r", "9"), (2.0, "o", "c"), (2.0, "o", "d")]


@pytest.mark.trio
async def test_output_nowait_raises_once_the_recording_failed(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path, flush_interval_s=0)
    async with trio.open_nursery() as nursery:
        await run_writer(nursery, writer)
        recorder = await writer.open_recorder("s-1", 80, 24)
        recorder.fail(OSError(28, "No space left on device"))
        with pytest.raises(RecordingFailed):
            recorder.output_nowait(b"x")
        await recorder.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_shutdown_finishes_open_recordings(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path, flush_interval_s=3600)
    async with trio.open_nursery() as nursery:
        await run_writer(nursery, writer)
        recorder = await writer.open_recorder("s-1", 80, 24)
        await recorder.output("x☃".encode()[:-1])  # ends inside a character
        nursery.cancel_scope.cancel()  # the session never closed its recorder
    _, events = check_file(tmp_path / "s-1.cast")
    assert "".join(e.data for e in events) == "x\ufffd"
    with pytest.raises(trio.ClosedResourceError):
        await recorder.output(b"late")


@pytest.mark.trio
async def test_session_ids_cannot_escape_the_directory(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path)
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            await writer.open_recorder(bad, 80, 24)


# ---------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------


def write_cast(path: Path, events: list[list[Any]], **header: Any) -> None:
    lines = [json.dumps({"version": 2, "width": 80, "height": 24, **header})]
    lines += [json.dumps(e) for e in events]
    path.write_text("\n".join(lines) + "\n")


async def timed_play(path: Path, **kwargs: Any) -> list[tuple[float, bytes]]:
    start = trio.current_time()
    out: list[tuple[float, bytes]] = []

    async def write(data: bytes) -> None:
        out.append((round(trio.current_time() - start, 6), data))

    await play(path, write=write, **kwargs)
    return out


@pytest.mark.trio
async def test_replay_keeps_the_recorded_timing(tmp_path: Path,
                                                autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "a.cast"
    write_cast(path, [[0.5, "o", "a"], [1.5, "o", "b"], [1.5, "o", "c"], [2.0, "i", "x"],
                      [3.0, "o", "d"]])
    assert await timed_play(path) == [(0.5, b"a"), (1.5, b"bc"), (3.0, b"d")]


@pytest.mark.trio
async def test_replay_speed_divides_every_pause(tmp_path: Path,
                                                autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "a.cast"
    write_cast(path, [[1.0, "o", "a"], [3.0, "o", "b"]])
    assert await timed_play(path, speed=4) == [(0.25, b"a"), (0.75, b"b")]


@pytest.mark.trio
async def test_idle_limit_caps_pauses_before_speed(tmp_path: Path,
                                                   autojump_clock: trio.testing.MockClock
                                                   ) -> None:
    path = tmp_path / "a.cast"
    write_cast(path, [[0.5, "o", "a"], [300.5, "o", "b"], [301.0, "o", "c"]])
    assert await timed_play(path, idle_limit_s=2, speed=2) == \
        [(0.25, b"a"), (1.25, b"b"), (1.5, b"c")]
    # Without a flag the file's idle_time_limit applies.
    write_cast(path, [[0.5, "o", "a"], [300.5, "o", "b"]], idle_time_limit=1)
    assert await timed_play(path) == [(0.5, b"a"), (1.5, b"b")]


@pytest.mark.trio
async def test_replay_skips_a_partial_last_line_but_not_a_bad_one(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "a.cast"
    write_cast(path, [[0.5, "o", "a"]])
    with path.open("a") as f:
        f.write('[1.0, "o", "cut sh')  # a crash during the write
    assert await timed_play(path) == [(0.5, b"a")]
    write_cast(path, [[0.5, "o", "a"], [0.2, "o", "back in time"], [1.0, "o", "z"]])
    with pytest.raises(CastFormatError, match="line 3: time 0.2 goes back"):
        await timed_play(path)


def test_podterm_replay_plays_to_stdout(tmp_path: Path,
                                        capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    path = tmp_path / "a.cast"
    write_cast(path, [[0.001, "o", "héllo "], [0.002, "r", "100x30"],
                      [0.003, "o", "\x1b[32mworld\x1b[0m\r\n"]])
    assert cli_main(["replay", str(path), "--speed", "1000"]) == 0
    assert capfdbinary.readouterr().out == "héllo \x1b[32mworld\x1b[0m\r\n".encode()


def test_podterm_replay_reports_a_bad_file(tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.cast"
    path.write_text('{"version": 1, "width": 80, "height": 24}\n')
    assert cli_main(["replay", str(path)]) == 1
    err = capfd.readouterr().err
    assert "bad.cast" in err and "version 1 is not 2" in err
    assert cli_main(["replay", str(tmp_path / "missing.cast")]) == 1
    assert "missing.cast" in capfd.readouterr().err
