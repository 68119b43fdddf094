"""Shared fixtures.

Async tests use pytest-trio: mark them ``@pytest.mark.trio`` (or take a
``nursery`` fixture).  Fixtures here are named for scenarios.
"""

from __future__ import annotations

import os
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
