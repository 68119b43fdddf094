"""``podterm replay FILE [--speed X] [--idle-limit S]``: play a recording in this terminal.

The output events of an asciicast v2 file are written to standard output at
their recorded times, divided by ``speed``; a pause longer than the idle
limit (``--idle-limit``, else the file's ``idle_time_limit``) is shortened to
it before the speed applies, as ``asciinema play -i`` does.  Input and marker
events only take their place in the timeline; resize events are not applied
(a terminal cannot be resized by the program in it; play a recording in a
terminal at least as large as its header says).

Timing: every event has a deadline ``start + playback_time`` and the player
sleeps until it with ``trio.sleep_until``, so slow writes never accumulate
drift; events already due are written together, in one write.

A session adopted by another gateway (its gateway died; docs/ha.md) is
recorded in parts: ``<id>.cast``, then ``<id>.part2.cast``, ``<id>.part3.cast``
... (:func:`~podterm.recording.writer.recording_parts`).  Given ``<id>.cast``,
``podterm replay`` plays it and then every part found next to it, in order,
each from its own start.  A part begins with a marker naming the output
offset it continues at (``podterm: continued at output offset N``); output
the previous part already showed beyond N (the dead gateway recorded what it
had read, the adopting one resumes at what the client had acknowledged) is
skipped, so every byte plays once.  Given a part, it plays that part alone.

The file is read in 1 MiB chunks and parsed line by line, so an hours-long
recording plays in constant memory.  A last line cut short by a crash is
skipped; any other malformed line stops playback with its line number.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable

import trio

from podterm.config import ReplayOptions
from podterm.recording.asciicast import CastFormatError, Event, Header, parse_event, parse_header
from podterm.recording.writer import recording_parts

__all__ = ["main", "play", "play_parts"]

_CHUNK = 1024 * 1024


async def _lines(path: str | os.PathLike[str]) -> AsyncGenerator[bytes, None]:
    """The file's lines (each with its ``\\n``, the last maybe without)."""
    async with await trio.open_file(path, "rb") as f:
        rest = b""
        while True:
            chunk = await f.read(_CHUNK)
            if not chunk:
                break
            data = rest + chunk
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                yield data[start:end + 1]
                start = end + 1
            rest = data[start:]
        if rest:
            yield rest


async def play(path: str | os.PathLike[str], *, speed: float = 1.0,
               idle_limit_s: float | None = None,
               write: Callable[[bytes], Awaitable[None]], skip_output_bytes: int = 0) -> Header:
    """Play a recording: ``await write(bytes)`` each due run of output at its time.

    Args:
        path: the ``.cast`` file.
        speed: playback speed factor (2 = twice as fast); above 0.
        idle_limit_s: cap on any pause, in recorded seconds; None = the file's
            ``idle_time_limit``, or no cap.
        write: writes output to the terminal (tests pass a collector).
        skip_output_bytes: leave out the first this many bytes of output
            (UTF-8), already shown by the previous part.

    Returns:
        The file's header.

    Raises:
        CastFormatError: the file is not asciicast v2 (the message has the line).
        OSError: the file cannot be read.
    """
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed {speed!r} must be a number above 0")
    lines = _lines(path)
    try:
        first = await anext(lines, None)
        if first is None:
            raise CastFormatError("empty file: no header")
        header = parse_header(first)
        idle = idle_limit_s if idle_limit_s is not None else header.idle_time_limit
        start = trio.current_time()
        playback = 0.0  # seconds of playback so far
        previous = 0.0  # recorded time of the previous event
        due: list[bytes] = []  # output whose deadline has passed, not yet written
        skip = skip_output_bytes

        async def handle(event: Event) -> None:
            nonlocal playback, previous, skip
            gap = event.time - previous
            previous = event.time
            if idle is not None:
                gap = min(gap, idle)
            playback += gap / speed
            if event.code != "o":
                return  # input and markers only take their place in the timeline
            deadline = start + playback
            if deadline > trio.current_time():
                if due:
                    await write(b"".join(due))
                    due.clear()
                await trio.sleep_until(deadline)
            data = event.data.encode("utf-8")
            if skip:
                data, skip = data[skip:], max(0, skip - len(data))
            if data:
                due.append(data)

        # A line is parsed once the next one has arrived: only the very last
        # line may be the partial write of a crash.
        held: bytes | None = None
        lineno = 1
        async for line in lines:
            if held is not None:
                await handle(parse_event(held, lineno, previous))
            held = line
            lineno += 1
        if held is not None and held.strip():
            try:
                event = parse_event(held, lineno, previous)
            except CastFormatError:
                if held.endswith(b"\n"):
                    raise
            else:
                await handle(event)
        if due:
            await write(b"".join(due))
        return header
    finally:
        await lines.aclose()


async def play_parts(path: str | os.PathLike[str], *, speed: float = 1.0,
                     idle_limit_s: float | None = None,
                     write: Callable[[bytes], Awaitable[None]]) -> list[Header]:
    """:func:`play` ``path`` and then each continuation part next to it, in order.

    Returns:
        The header of every file played, in order.

    Raises:
        CastFormatError, OSError: as :func:`play`, for any of the files (the
            message names the file when it is not the first).
    """
    headers = []
    end = 0  # the output offset the parts played so far reach

    async def counted(data: bytes) -> None:
        nonlocal end
        end += len(data)
        await write(data)

    for index, part in enumerate(recording_parts(path)):
        try:
            skip = 0
            if index:
                start = await _continued_at(part)
                if start is not None:
                    skip = max(0, end - start)
                    end = max(end, start)  # a gap: the missing bytes were never recorded
            headers.append(await play(part, speed=speed, idle_limit_s=idle_limit_s,
                                      write=counted, skip_output_bytes=skip))
        except CastFormatError as exc:
            if index == 0:
                raise
            raise CastFormatError(f"{part}: {exc}") from exc
    return headers


_CONTINUED = re.compile(r"podterm: continued at output offset (\d+)")


async def _continued_at(path: str | os.PathLike[str]) -> int | None:
    """The output offset a continuation part starts at (its first event, a marker)."""
    lines = _lines(path)
    try:
        header = await anext(lines, None)
        first = await anext(lines, None)
    finally:
        await lines.aclose()
    if header is None or first is None:
        return None
    event = parse_event(first, 2, 0.0)
    match = _CONTINUED.match(event.data) if event.code == "m" else None
    return int(match.group(1)) if match else None


def _write_stdout(data: bytes) -> None:
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


async def _to_stdout(data: bytes) -> None:
    # A terminal write can block (flow control, a slow ssh link): keep it off the loop.
    await trio.to_thread.run_sync(_write_stdout, data)


def main(options: ReplayOptions) -> int:
    """``podterm replay``: play ``options.file``; 0 when played, 1 for a bad file.

    The CLI has checked speed and idle limit; a missing file is an ``OSError``
    that the CLI reports.
    """
    try:
        trio.run(lambda: play_parts(options.file, speed=options.speed,
                                    idle_limit_s=options.idle_limit_s, write=_to_stdout))
    except CastFormatError as exc:
        print(f"podterm replay: {options.file}: {exc}", file=sys.stderr)
        return 1
    return 0
