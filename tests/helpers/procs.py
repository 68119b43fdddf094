"""Start-up and shutdown of the ``podterm serve`` / ``podterm agent`` processes tests run.

Readiness: such a process writes JSON to its ``--ready-file`` once it listens
(or, for the agent, once it registered). That file is the only signal another
process gets, so the helpers poll it every :data:`POLL_S`, under a deadline,
and fail the test at once, with the exit code and the process's log, when the
process exits first.

* :func:`wait_ready` polls from a plain test or fixture (it sleeps the thread);
  :func:`await_ready` is its trio twin (it sleeps the task).

Shutdown: SIGTERM, a bounded wait of ``grace_s``, then SIGKILL and a reap;
both return the exit status (negative: the signal that ended it), so a test
can assert a clean exit. Neither leaves the process behind, nor its pipes open.

* :func:`stop` blocks the thread; :func:`astop` is its trio twin and also
  takes a :class:`trio.Process`. Its waits are shielded: it is meant for
  ``finally`` blocks, where the surrounding scope may be cancelled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio

__all__ = ["POLL_S", "astop", "await_ready", "stop", "wait_ready"]

#: How often a ready file is looked at again (and, without pidfd, a process).
POLL_S = 0.02
#: Bound on the reap after SIGKILL: the kernel ends the process, this only waits for it.
KILL_WAIT_S = 5.0

Proc = subprocess.Popen[bytes] | trio.Process


def _log_text(log: Path | None) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return log.read_text(errors="replace")


def _fail(message: str, log: Path | None) -> NoReturn:
    pytest.fail(f"{message}:\n{_log_text(log)}", pytrace=False)


def _ready_nowait(proc: Proc, ready: Path, log: Path | None, what: str) -> dict[str, Any] | None:
    """The ready file's JSON if it is there and whole; fail if ``proc`` exited before."""
    if proc.poll() is not None:
        _fail(f"{what} exited with {proc.returncode} before it was ready", log)
    try:
        info = json.loads(ready.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or half written
        return None
    return info if isinstance(info, dict) else None


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path | None,
               timeout_s: float, *, what: str = "podterm serve") -> dict[str, Any]:
    """The JSON ``proc`` writes to ``ready``; fails the test if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while (info := _ready_nowait(proc, ready, log, what)) is None:
        if time.monotonic() > deadline:
            _fail(f"{what} not ready within {timeout_s} s", log)
        time.sleep(POLL_S)
    return info


async def await_ready(proc: Proc, ready: Path, log: Path | None, timeout_s: float, *,
                      what: str = "podterm serve") -> dict[str, Any]:
    """:func:`wait_ready` for trio: the same checks, sleeping the task between polls."""
    with trio.move_on_after(timeout_s):
        while (info := _ready_nowait(proc, ready, log, what)) is None:
            await trio.sleep(POLL_S)
        return info
    _fail(f"{what} not ready within {timeout_s} s", log)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def stop(proc: subprocess.Popen[bytes], grace_s: float, *, group: bool = False) -> int:
    """SIGTERM, up to ``grace_s`` for the exit, then SIGKILL; reaped. Its exit status.

    ``group``: the SIGKILL goes to the process group too (a process started
    with ``start_new_session=True``), so children it left behind die with it.
    A process already gone is only reaped; ``grace_s=0`` kills at once.
    """
    try:
        if proc.poll() is None and grace_s > 0:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        if proc.poll() is None:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        return proc.wait(timeout=KILL_WAIT_S)
    finally:
        _close_pipes(proc)


async def _wait_exit(proc: Proc) -> None:
    """Until ``proc`` has exited, reaped (the caller bounds the wait)."""
    if isinstance(proc, trio.Process):
        await proc.wait()
        return
    if proc.poll() is not None:
        return
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable once the process exits: an event, no poll
    except OSError:  # no pidfd here (an old kernel, a seccomp filter): look every POLL_S
        while proc.poll() is None:
            await trio.sleep(POLL_S)
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    proc.wait()  # it has exited: this only reaps


async def astop(proc: Proc, grace_s: float) -> int:
    """:func:`stop` for trio, shielded from the caller's cancellation; bounded all the same."""
    try:
        if proc.poll() is None and grace_s > 0:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_s, shield=True):
                await _wait_exit(proc)
        if proc.poll() is None:
            proc.kill()
            with trio.move_on_after(KILL_WAIT_S, shield=True):
                await _wait_exit(proc)
        if proc.returncode is None:
            raise TimeoutError(f"pid {proc.pid} still running {KILL_WAIT_S} s after SIGKILL")
        return proc.returncode
    finally:
        if isinstance(proc, trio.Process):
            with trio.CancelScope(shield=True):
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()
        else:
            _close_pipes(proc)
