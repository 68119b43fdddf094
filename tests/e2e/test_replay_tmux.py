"""``podterm replay`` in a real terminal (tmux) shows the same screen as the output itself.

A known terminal output (colours, 256-colour and reverse video, UTF-8 split
across chunks, a clear screen that must wipe what came before, cursor
positioning, a line erased and rewritten) is fed to a real
:class:`~podterm.recording.recorder.Recorder` through a real
:class:`~podterm.recording.writer.RecordingWriter`, in small chunks with a
long idle pause in the middle.  Then two tmux sessions of the same size run,
side by side on one tmux server:

* ``replay``: ``podterm replay FILE --speed 100 --idle-limit 1``;
* ``direct``: ``cat`` of the raw output bytes.

The test polls ``capture-pane -e`` (text *and* colours) and the cursor
position of both until they agree, under a deadline (never a fixed sleep).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from podterm.recording import RecordingWriter, parse

pytestmark = pytest.mark.e2e

TMUX = "/usr/bin/tmux"
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # every wait is bounded by this
POLL_S = 0.02

OUTPUT = (
    b"junk the clear screen must wipe\r\n" * 3
    + b"\x1b[2J\x1b[H"
    + b"\x1b[1;31mbold red\x1b[0m and \x1b[32mgreen\x1b[0m\r\n"
    + b"\x1b[38;5;208m256-colour orange\x1b[0m \x1b[44mblue background\x1b[0m\r\n"
    + "UTF-8: h\u00e9llo w\u00f6rld \u2603 \u65e5\u672c\u8a9e \u2713\r\n".encode()
    + b"overwrite me\r\x1b[Kreplaced line\r\n"
    + b"\x1b[10;20Hpositioned at row 10, column 20"
    + b"\x1b[14;1H\x1b[7mreverse\x1b[0m final-marker"
)


def podterm_command() -> list[str]:
    """The venv's console script, or ``python -m podterm`` without one."""
    script = Path(sys.executable).with_name("podterm")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "podterm"]


class Tmux:
    """One tmux server on a private socket."""

    def __init__(self, socket_name: str) -> None:
        self.socket_name = socket_name

    async def run(self, *args: str) -> str:
        result = await trio.run_process([TMUX, "-L", self.socket_name, *args],
                                        capture_stdout=True, capture_stderr=True)
        return bytes(result.stdout).decode(errors="replace")

    async def screen(self, target: str) -> str:
        """The pane's text with its colours and attributes as escape sequences."""
        return await self.run("capture-pane", "-p", "-e", "-t", target)

    async def cursor(self, target: str) -> str:
        return (await self.run("display-message", "-p", "-t", target,
                               "#{cursor_x},#{cursor_y}")).strip()


@asynccontextmanager
async def tmux_server(tmp_path: Path) -> AsyncIterator[Tmux]:
    if not os.access(TMUX, os.X_OK):
        pytest.fail(f"{TMUX} is missing: apt-get install tmux", pytrace=False)
    tmux = Tmux(f"podterm-replay-{secrets.token_hex(4)}")
    try:
        yield tmux
    finally:
        with trio.move_on_after(10, shield=True):
            await tmux.run("kill-server")


async def record(path_dir: Path) -> Path:
    """Record OUTPUT through the real recorder and writer; returns the .cast file."""
    now = [0.0]
    writer = RecordingWriter(path_dir, clock=lambda: now[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        recorder = await writer.open_recorder("s-replay", 80, 24,
                                              env={"SHELL": "/bin/sh", "TERM": "screen"})
        for i in range(0, len(OUTPUT), 5):  # 5-byte chunks split the UTF-8 characters
            now[0] += 0.05
            if i == 100:
                now[0] += 120  # a long idle pause: --idle-limit makes it 1 s
            await recorder.output(OUTPUT[i:i + 5])
        await recorder.aclose()
        await writer.wait_flushed()
        nursery.cancel_scope.cancel()
    return writer.path_for("s-replay")


async def wait_for_file(path: Path) -> str:
    with trio.move_on_after(WAIT_S):
        while not path.exists() or not path.read_text().strip():
            await trio.sleep(POLL_S)
        return path.read_text().strip()
    pytest.fail(f"{path.name} did not appear within {WAIT_S} s", pytrace=False)


@pytest.mark.trio
async def test_replay_in_tmux_shows_the_same_screen_as_the_output_itself(
        tmp_path: Path) -> None:
    if shutil.which(TMUX) is None:
        pytest.fail("tmux is missing: apt-get install tmux", pytrace=False)
    cast = await record(tmp_path)
    _, events = parse(cast.read_bytes())
    assert "".join(e.data for e in events).encode() == OUTPUT  # nothing lost or mangled
    raw = tmp_path / "raw.bin"
    raw.write_bytes(OUTPUT)
    # No status line from the very start: the panes are 80x24 before anything runs.
    conf = tmp_path / "tmux.conf"
    conf.write_text("set -g status off\n")
    env = ["env", "-i", f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
           f"HOME={tmp_path}", f"PYTHONPATH={ROOT / 'src'}"]
    replay = " ".join(shlex.quote(a) for a in [*podterm_command(), "replay", str(cast),
                                               "--speed", "100", "--idle-limit", "1"])
    commands = {
        "replay": f"{replay}; echo $? > rc-replay; exec sleep 600",
        "direct": f"cat {shlex.quote(str(raw))}; echo $? > rc-direct; exec sleep 600",
    }
    with trio.fail_after(90):
        async with tmux_server(tmp_path) as tmux:
            for name, command in commands.items():
                await tmux.run("-f", str(conf), "new-session", "-d", "-s", name, "-x", "80",
                               "-y", "24", "-c", str(tmp_path), *env, "sh", "-c", command)
            assert await wait_for_file(tmp_path / "rc-direct") == "0"
            assert await wait_for_file(tmp_path / "rc-replay") == "0"
            want = got = ""
            with trio.move_on_after(WAIT_S):
                while True:
                    want, got = await tmux.screen("direct"), await tmux.screen("replay")
                    if "final-marker" in want and want == got and \
                            await tmux.cursor("direct") == await tmux.cursor("replay"):
                        break
                    await trio.sleep(POLL_S)
            assert "final-marker" in want, f"the direct output never showed:\n{want}"
            assert got == want, f"replayed screen differs.\nDIRECT:\n{want}\nREPLAY:\n{got}"
            assert await tmux.cursor("replay") == await tmux.cursor("direct")
            # The screen really is the interesting one: cleared, coloured, positioned.
            assert "junk" not in got
            # capture-pane -e renders attributes its own way; these are its spellings.
            assert "\x1b[1m\x1b[31mbold red" in got and "\x1b[32mgreen" in got
            assert "\x1b[38;5;208m256-colour orange" in got and "\x1b[44mblue" in got
            assert "\x1b[7mreverse" in got
            assert "h\u00e9llo w\u00f6rld \u2603" in got and "replaced line" in got
            assert "overwrite me" not in got
            lines = got.split("\n")
            assert lines[9].startswith(" " * 19 + "positioned at row 10")
