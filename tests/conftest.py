"""Shared fixtures.

Async tests use pytest-trio: mark them ``@pytest.mark.trio`` (or take a
``nursery`` fixture).  Fixtures here are named for scenarios.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep default recordings out of the real home directory.

    ``podterm serve`` records every session by default into
    ``$XDG_STATE_HOME/podterm/recordings`` (docs/cli.md, "Recordings"); the
    gateways tests start as subprocesses inherit this temporary one.
    Session-scoped, so it is in place before any module-scoped gateway starts.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))
        yield


@pytest.fixture
def fd_count() -> int:
    """Open file descriptors of this process now (for leak assertions)."""
    return len(os.listdir("/proc/self/fd"))


def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run even if a test leaked a non-daemon thread that never returns.

    The interpreter would wait for such a thread forever at exit (a third-party
    client's reader thread stuck on a socket, say) and CI would end with no
    verdict.  Print every thread's stack, then leave with pytest's own status.
    """
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not stuck:
        return
    names = ", ".join(t.name for t in stuck)
    sys.stderr.write(f"\ntests left non-daemon threads running: {names}\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(int(getattr(config, "_podterm_exitstatus", 1)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._podterm_exitstatus = exitstatus  # type: ignore[attr-defined]
