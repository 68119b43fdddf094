"""Recordings in parts: the continuation of an adopted session, and replaying the parts.

A session adopted by another gateway is recorded on in ``<id>.partN.cast``
(recording/writer.py ``open_continuation``): a header, a marker naming the
output offset it continues at, then the output.  ``podterm replay`` plays
``<id>.cast`` and its parts in order, each byte once (recording/replay.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from podterm.recording.asciicast import parse_event, parse_header
from podterm.recording.replay import play_parts
from podterm.recording.writer import RecordingWriter, recording_parts, split_part

pytestmark = pytest.mark.trio

SID = "s-0123456789ab"


async def record(directory: Path, *, continuation_at: int | None, output: list[bytes]) -> Path:
    """One recording (or continuation part) of SID holding ``output``; its path."""
    writer = RecordingWriter(directory, flush_interval_s=0, clock=lambda: 100.0)  # times 0
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        if continuation_at is None:
            recorder = await writer.open_recorder(SID, 80, 24)
        else:
            recorder = await writer.open_continuation(SID, 80, 24, resumed_at=continuation_at,
                                                      note="adopted from 10.0.0.1:7780")
        for chunk in output:
            await recorder.output(chunk)
        await recorder.aclose()
        await writer.wait_flushed()
        nursery.cancel_scope.cancel()
    assert recorder.path is not None
    return recorder.path


async def replayed(first: Path) -> bytes:
    played: list[bytes] = []

    async def collect(data: bytes) -> None:
        played.append(data)

    await play_parts(first, speed=1000.0, idle_limit_s=0.001, write=collect)
    return b"".join(played)


async def test_a_continuation_is_the_next_free_part_with_a_marker_first(tmp_path: Path) -> None:
    first = await record(tmp_path, continuation_at=None, output=[b"abc", b"def"])
    second = await record(tmp_path, continuation_at=4, output=[b"efgh"])
    third = await record(tmp_path, continuation_at=8, output=[b"ij"])
    assert (second.name, third.name) == (f"{SID}.part2.cast", f"{SID}.part3.cast")
    lines = second.read_bytes().splitlines()
    header = parse_header(lines[0])
    assert (header.width, header.height) == (80, 24)
    marker = parse_event(lines[1], 2, 0.0)
    assert (marker.time, marker.code, marker.data) == (
        0.0, "m", "podterm: continued at output offset 4 (adopted from 10.0.0.1:7780)")
    assert [parse_event(line, 3, 0.0).data for line in lines[2:]] == ["efgh"]
    assert recording_parts(first) == [first, second, third]
    assert recording_parts(second) == [second]  # a part alone plays alone
    # Part 1 recorded up to 6, part 2 resumed at 4: the overlap plays once.
    assert await replayed(first) == b"abcdefghij"


async def test_parts_are_ordered_by_number_not_by_name(tmp_path: Path) -> None:
    first = tmp_path / f"{SID}.cast"
    for name in (f"{SID}.part10.cast", f"{SID}.part2.cast", f"{SID}.part9.cast",
                 "s-0123456789ac.part2.cast", f"{SID}.part2.cast.tmp"):
        (tmp_path / name).write_bytes(b"")
    first.write_bytes(b"")
    assert [p.name for p in recording_parts(first)] == [
        f"{SID}.cast", f"{SID}.part2.cast", f"{SID}.part9.cast", f"{SID}.part10.cast"]
    assert split_part(f"{SID}.part12") == (SID, 12)
    assert split_part(SID) == (SID, 1)


async def test_a_part_that_resumes_past_the_end_plays_all_of_itself(tmp_path: Path) -> None:
    # The agent's ring had lost bytes 3..5 (a gap): nothing to skip, nothing invented.
    first = await record(tmp_path, continuation_at=None, output=[b"abc"])
    await record(tmp_path, continuation_at=6, output=[b"ghi"])
    assert await replayed(first) == b"abcghi"
