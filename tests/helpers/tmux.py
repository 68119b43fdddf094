"""A real terminal for synchronous tests: one tmux server, one session, one pane.

kubectl's ``exec -it`` needs a terminal (raw mode, ``SIGWINCH``), and only a
terminal emulator shows what the user would see.  :func:`tmux_session`
starts a private tmux server (its own ``-L`` socket, no config file, status
line off) running ``/bin/sh`` with a minimal environment and the prompt
``local$ ``; the test types with :meth:`Tmux.send` and reads the screen with
:meth:`Tmux.wait_for`, which polls ``capture-pane`` under a deadline (the
screen of another process has no event to wait on).  The server is killed on
the way out, whatever happened.

Example::

    with tmux_session(tmp_path) as tmux:
        tmux.wait_for(r"^local\\$")
        tmux.send("kubectl exec -it mypod -- sh")
        tmux.wait_for(r"^[$#] $")
        tmux.run("resize-window", "-t", tmux.session, "-x", "120", "-y", "40")

(The trio tests of ``podterm exec`` have an async twin in
``tests/e2e/test_cli_tmux.py``.)
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TMUX = "/usr/bin/tmux"
#: Default bound on one :meth:`Tmux.wait_for`.
SCREEN_WAIT_S = 15.0
#: Bound on one tmux command (they return at once unless the server is wedged).
COMMAND_TIMEOUT_S = 10.0


class Tmux:
    """One tmux server on a private socket, one session, one pane (synchronous)."""

    def __init__(self, prefix: str = "podterm") -> None:
        self.socket_name = f"{prefix}-{secrets.token_hex(4)}"
        self.session = "k"

    def run(self, *args: str) -> str:
        """Run one tmux command against this server; its stdout."""
        result = subprocess.run([TMUX, "-L", self.socket_name, *args], capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT_S,
                                check=False)
        return result.stdout.decode(errors="replace")

    def send(self, text: str) -> None:
        """Type ``text`` literally, then Enter."""
        self.run("send-keys", "-t", self.session, "-l", text)
        self.run("send-keys", "-t", self.session, "Enter")

    def screen(self) -> str:
        """The pane as text, wrapped lines joined."""
        return self.run("capture-pane", "-p", "-J", "-t", self.session)

    def resize(self, width: int, height: int) -> None:
        """Resize the window (and so the pane): the program in it gets SIGWINCH."""
        self.run("resize-window", "-t", self.session, "-x", str(width), "-y", str(height))

    def wait_for(self, pattern: str, timeout: float = SCREEN_WAIT_S) -> str:
        """Poll the screen until ``pattern`` (a regex, multi-line) shows, under a deadline."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if regex.search(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern!r} not shown within {timeout} s; the screen:\n{screen}",
                            pytrace=False)
            time.sleep(0.02)


@contextmanager
def tmux_session(cwd: Path, *, width: int = 100, height: int = 30,
                 prefix: str = "podterm") -> Iterator[Tmux]:
    """A :class:`Tmux` running ``/bin/sh`` in ``cwd`` (also its ``HOME``), ``width`` x ``height``.

    A missing tmux fails the test (never a skip).
    """
    if not os.access(TMUX, os.X_OK):
        pytest.fail(f"{TMUX} is missing: apt-get install tmux", pytrace=False)
    t = Tmux(prefix)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
           "TERM": "screen", "PS1": "local$ ", "LANG": "C.UTF-8"}
    try:
        t.run("-f", "/dev/null", "new-session", "-d", "-s", t.session, "-x", str(width),
              "-y", str(height), "-c", str(cwd), "env", "-i",
              *[f"{k}={v}" for k, v in sorted(env.items())], "/bin/sh")
        t.run("set-option", "-t", t.session, "status", "off")  # the pane is the whole window
        yield t
    finally:
        t.run("kill-server")
