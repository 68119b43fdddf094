"""The real ``podterm exec`` in a real terminal (tmux), through a cutting proxy.

A gateway subprocess serves the session; the CLI (the venv's ``podterm``
console script) reaches it only through :class:`tests.helpers.cutproxy.CutProxy`.
tmux gives the CLI a real pty: raw mode, SIGWINCH and the status line are
the real thing.  The test types with ``send-keys`` and reads the screen with
``capture-pane``, polling under a deadline (never a fixed sleep).

One scenario, in order:

1. ``stty -g`` of tmux's shell is saved, then ``podterm exec local`` starts
   an interactive shell through the proxy;
2. a variable is set and echoed;
3. the proxy cuts the socket and refuses reconnects for a while (the CLI is
   not touched): the "reconnecting" status line appears; the proxy lets
   connections through again: the status line goes, and the variable is
   still set (same shell);
4. ``tmux resize-window`` changes ``stty size`` inside the remote shell;
5. ``exit 7``: the CLI exits 7 and tmux's shell has the same ``stty -g`` as before.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.e2e.test_resume_e2e import gateway_env, running_gateway
from tests.helpers.cutproxy import open_cut_proxy

pytestmark = pytest.mark.e2e

TMUX = "/usr/bin/tmux"
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 15.0  # every screen wait is bounded by this
POLL_S = 0.02


def podterm_command() -> list[str]:
    """The console script from the venv, or ``python -m podterm`` without one."""
    script = Path(sys.executable).with_name("podterm")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "podterm"]


class Tmux:
    """One tmux server on a private socket, one session, one pane."""

    def __init__(self, socket_name: str, session: str = "t") -> None:
        self.socket_name = socket_name
        self.session = session

    async def run(self, *args: str) -> str:
        result = await trio.run_process([TMUX, "-L", self.socket_name, *args],
                                        capture_stdout=True, capture_stderr=True)
        return bytes(result.stdout).decode(errors="replace")

    async def send(self, text: str, *, enter: bool = True) -> None:
        """Type ``text`` literally (then Enter)."""
        await self.run("send-keys", "-t", self.session, "-l", text)
        if enter:
            await self.run("send-keys", "-t", self.session, "Enter")

    async def screen(self) -> str:
        # -J joins lines the terminal wrapped, so a pattern never straddles a wrap.
        return await self.run("capture-pane", "-p", "-J", "-t", self.session)

    async def wait_for(self, pattern: str, *, absent: bool = False,
                       timeout: float = WAIT_S) -> str:
        """Poll the screen until ``pattern`` (a regex) is on it (or gone, with ``absent``)."""
        regex = re.compile(pattern, re.MULTILINE)
        screen = ""
        with trio.move_on_after(timeout):
            while True:
                screen = await self.screen()
                if (regex.search(screen) is None) == absent:
                    return screen
                await trio.sleep(POLL_S)
        what = "gone" if absent else "shown"
        pytest.fail(f"{pattern!r} not {what} within {timeout} s; the screen:\n{screen}",
                    pytrace=False)


@asynccontextmanager
async def tmux_session(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Tmux]:
    """A detached 100x30 tmux session running a plain ``sh`` (no status bar)."""
    if not os.access(TMUX, os.X_OK):
        pytest.fail(f"{TMUX} is missing: apt-get install tmux", pytrace=False)
    tmux = Tmux(f"podterm-test-{secrets.token_hex(4)}")
    shell_env = [f"{k}={v}" for k, v in sorted(env.items())]
    await tmux.run("-f", "/dev/null", "new-session", "-d", "-s", tmux.session, "-x", "100",
                   "-y", "30", "-c", str(tmp_path), "env", "-i", *shell_env, "/bin/sh")
    try:
        # No status bar, so the pane is the whole 100x30 window.
        await tmux.run("set-option", "-t", tmux.session, "status", "off")
        yield tmux
    finally:
        with trio.move_on_after(10, shield=True):
            await tmux.run("kill-server")


async def remote_stty_size(tmux: Tmux, expected: str) -> None:
    marker = secrets.token_hex(3)
    await tmux.send(f"echo size-{marker}=$(stty size)")
    await tmux.wait_for(rf"^size-{marker}={expected}\s*$")


@pytest.mark.trio
async def test_cli_in_tmux_survives_a_cut_resizes_and_exits_with_the_remote_status(
        tmp_path: Path) -> None:
    if shutil.which(TMUX) is None:
        pytest.fail("tmux is missing: apt-get install tmux", pytrace=False)
    with trio.fail_after(120):
        async with running_gateway(tmp_path) as gw, open_cut_proxy(gw.host, gw.port) as proxy:
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(tmp_path),
                "TERM": "screen",
                "PS1": "local$ ",
                "PODTERM_SERVER": f"http://127.0.0.1:{proxy.port}",
                "PODTERM_TOKEN": gw.token,
                "PYTHONPATH": gateway_env()["PYTHONPATH"],
            }
            cli = " ".join(podterm_command())
            async with tmux_session(tmp_path, env) as tmux:
                await tmux.wait_for(r"^local\$")  # capture-pane drops trailing blanks
                await tmux.send("stty -g > stty.before; echo before-saved")
                await tmux.wait_for(r"^before-saved\s*\nlocal\$")  # typing waits for the prompt
                # 1. an interactive shell through the gateway, via the proxy
                await tmux.send(f"{cli} exec local; echo cli-rc=$?; stty -g > stty.after; "
                                "echo saved")
                await proxy.wait_accepted(1)
                # The remote shell's first prompt (sh: "$ " or "# "), below the command line.
                await tmux.wait_for(r"echo saved\n[$#]")
                await tmux.send("PS1='remote> '")
                await tmux.wait_for(r"^remote>")
                # 2. state in the shell
                await tmux.send("X=survivor42; echo value=$X")
                await tmux.wait_for(r"^value=survivor42")
                await remote_stty_size(tmux, "30 100")
                # 3. the network goes away (the CLI is not touched) and comes back
                links_before = proxy.statistics().accepted
                proxy.block()
                screen = await tmux.wait_for(r"reconnecting")
                assert "connection lost" in screen
                await proxy.wait_for(lambda s: s.refused >= 1)
                proxy.unblock()
                await proxy.wait_accepted(links_before + 1)
                screen = await tmux.wait_for(r"reconnecting", absent=True)
                await tmux.send("echo after=$X")
                await tmux.wait_for(r"^after=survivor42")
                # The prompt line under the status line was redrawn.
                assert re.search(r"^remote> echo after=\$X", await tmux.screen(), re.M)
                # 4. resize
                await tmux.run("resize-window", "-t", tmux.session, "-x", "120", "-y", "40")
                await remote_stty_size(tmux, "40 120")
                # 5. the remote exit status becomes the CLI's
                await tmux.send("exit 7")
                await tmux.wait_for(r"^cli-rc=7\s*$")
                await tmux.wait_for(r"^saved\s*$")
                before = (tmp_path / "stty.before").read_text()
                after = (tmp_path / "stty.after").read_text()
                assert before == after, "the CLI left the terminal in another mode"
                final = await tmux.screen()
                print(final)
                assert "exit code 7" in final


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return children


@pytest.mark.trio
async def test_cli_restores_the_terminal_on_sigterm_and_attach_resumes_the_session(
        tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with running_gateway(tmp_path) as gw, open_cut_proxy(gw.host, gw.port) as proxy:
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(tmp_path),
                "TERM": "screen",
                "PS1": "local$ ",
                "PODTERM_SERVER": f"http://127.0.0.1:{proxy.port}",
                "PODTERM_TOKEN": gw.token,
                "PYTHONPATH": gateway_env()["PYTHONPATH"],
            }
            cli = " ".join(podterm_command())
            async with tmux_session(tmp_path, env) as tmux:
                await tmux.wait_for(r"^local\$")
                await tmux.send("stty -g > stty.before; echo before-saved")
                await tmux.wait_for(r"^before-saved\s*\nlocal\$")
                await tmux.send(f"{cli} exec local; echo cli-rc=$?; stty -g > stty.after; "
                                "echo saved")
                await tmux.wait_for(r"echo saved\n[$#]")
                await tmux.send("PS1='remote> '; Y=kept; echo y=$Y")
                await tmux.wait_for(r"^y=kept")
                # SIGTERM to the CLI (found as the child of tmux's shell): it must
                # restore the terminal, leave the session running and say how to resume.
                pane_pid = int((await tmux.run("display-message", "-p", "-t", tmux.session,
                                               "#{pane_pid}")).strip())
                (cli_pid,) = child_pids(pane_pid)
                os.kill(cli_pid, 15)
                screen = await tmux.wait_for(r"^cli-rc=143\s*$")
                await tmux.wait_for(r"^saved\s*$")
                assert (tmp_path / "stty.before").read_text() == \
                    (tmp_path / "stty.after").read_text()
                match = re.search(r"podterm attach ([a-z0-9-]+)", screen)
                assert match, f"no resume hint on the screen:\n{screen}"
                session_id = match.group(1)
                await tmux.send(f"clear; {cli} sessions")
                await tmux.wait_for(rf"^{session_id}\s+detached\s")
                # podterm attach resumes the very same shell.
                await tmux.send(f"clear; {cli} attach {session_id}; echo cli-rc=$?; "
                                "stty -g > stty.after2; echo saved2")
                await tmux.wait_for(r"^y=kept")  # replayed from the session's output ring
                await tmux.send("echo again-$Y")
                await tmux.wait_for(r"^again-kept")
                # ssh's escape: "~." at the start of a line detaches (exit status 0).
                await tmux.send("~.", enter=False)
                await tmux.wait_for(r"^cli-rc=0\s*$")
                await tmux.wait_for(r"^saved2\s*$")
                assert f"podterm attach {session_id}" in await tmux.screen()
                assert (tmp_path / "stty.before").read_text() == \
                    (tmp_path / "stty.after2").read_text()
                # ... and the shell is still there for the next attach.
                await tmux.send(f"clear; {cli} attach {session_id}; echo cli-rc=$?")
                await tmux.wait_for(r"^again-kept")
                await tmux.send("exit 3")
                await tmux.wait_for(r"^cli-rc=3\s*$")


@pytest.mark.trio
async def test_cli_kill_ends_a_running_exec(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_gateway(tmp_path) as gw:
            env = {**gateway_env(), "PODTERM_SERVER": gw.url, "PODTERM_TOKEN": gw.token}
            cli = podterm_command()
            stderr_path = tmp_path / "exec.stderr"
            async with trio.open_nursery() as nursery:
                with stderr_path.open("wb") as stderr_file:
                    proc = await nursery.start(functools.partial(
                        trio.run_process, [*cli, "exec", "local", "--", "sleep", "60"],
                        env=env, stdin=subprocess.DEVNULL, stderr=stderr_file, check=False))
                sessions: list[dict[str, object]] = []
                with trio.fail_after(15):
                    while not sessions:
                        listing = await trio.run_process([*cli, "sessions", "-o", "json"],
                                                         env=env, capture_stdout=True)
                        sessions = json.loads(listing.stdout)["items"]
                        if not sessions:
                            await trio.sleep(0.05)  # the exec has not created it yet
                (session,) = sessions
                killed = await trio.run_process([*cli, "kill", str(session["id"])], env=env,
                                                capture_stdout=True)
                assert f"session {session['id']} killed" in killed.stdout.decode()
                with trio.fail_after(15):
                    await proc.wait()
            stderr = stderr_path.read_text()
            print(f"exec exit status {proc.returncode}; stderr: {stderr!r}")
            # The remote process was killed by a signal: 128+N, and the reason on stderr.
            assert proc.returncode > 128, stderr
            assert "killed" in stderr
