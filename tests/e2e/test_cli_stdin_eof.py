"""``podterm exec -i`` without a terminal: the end of local stdin ends the remote stdin.

A real gateway (``python -m podterm serve --listen 127.0.0.1:0 --ready-file F``)
runs as a subprocess with its local upstream; the CLI runs as another, with
``PODTERM_SERVER``/``PODTERM_TOKEN`` from the ready file and ``HOME`` in a
temporary directory.  Before ``stdin_eof`` (docs/protocol.md §4) these
commands never finished: the CLI stopped reading its stdin and the remote
``cat`` waited forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import stop, wait_ready

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 20.0


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTERM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      os.environ.get("PYTHONPATH")]))
    env["HOME"] = str(home)
    env["SHELL"] = "/bin/sh"
    return env


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A ``podterm serve`` subprocess; yields the CLI's environment for it."""
    where = tmp_path_factory.mktemp("stdin-eof")
    ready = where / "ready.json"
    log = where / "gateway.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podterm", "serve", "--listen", "127.0.0.1:0",
             "--ready-file", str(ready), "--log-format", "text"],
            cwd=ROOT, env=_env(where), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        info = wait_ready(proc, ready, log, READY_TIMEOUT_S)
        env = _env(where)
        env["PODTERM_SERVER"] = info["url"]
        env["PODTERM_TOKEN"] = info["token"]
        yield env
    finally:
        stop(proc, 15)


def _podterm(env: dict[str, str], *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "podterm", *args], env=env, cwd=ROOT,
                          capture_output=True, timeout=RUN_TIMEOUT_S, check=False,
                          **kwargs)  # type: ignore[call-overload]


def test_piped_input_reaches_cat_and_ends_it(cli_env: dict[str, str]) -> None:
    # printf 'a\nb\n' | podterm exec -i local -- cat
    done = _podterm(cli_env, "exec", "-i", "local", "--", "cat", input=b"a\nb\n")
    assert (done.returncode, done.stdout) == (0, b"a\nb\n"), done.stderr
    assert done.stderr == b""


def test_redirected_file_then_the_commands_own_status(cli_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    # podterm exec -i local -- sh -c 'cat; exit 4' < file
    data = b"".join(b"%d\n" % i for i in range(20000))  # ~110 KB: more than one window's half
    path = tmp_path / "input"
    path.write_bytes(data)
    with path.open("rb") as stdin:
        done = _podterm(cli_env, "exec", "-i", "local", "--", "sh", "-c", "cat; exit 4",
                        stdin=stdin)
    assert done.returncode == 4, done.stderr
    assert done.stdout == data
    assert b"exit code 4" in done.stderr


def test_empty_stdin_is_an_immediate_eof(cli_env: dict[str, str]) -> None:
    done = _podterm(cli_env, "exec", "-i", "local", "--", "wc", "-c", stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout.strip()) == (0, b"0"), done.stderr


def test_input_and_output_far_beyond_one_window_do_not_deadlock(cli_env: dict[str, str],
                                                                tmp_path: Path) -> None:
    # podterm exec -i local -- cat < 4MB-file: input and output both many windows long.
    # This stalled at ~420 KB while the session's input buffer (64 KiB) was smaller
    # than the input window (256 KiB) the client may fill: the gateway stopped
    # reading the link, so the client's output ACKs queued behind input.
    data = b"".join(b"line %07d of a long input\n" % i for i in range(150_000))
    path = tmp_path / "big"
    path.write_bytes(data)
    with path.open("rb") as stdin:
        done = _podterm(cli_env, "exec", "-i", "local", "--", "cat", stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data
