"""Shared fixtures.

Async tests use pytest-trio: mark them ``@pytest.mark.trio`` (or take a
``nursery`` fixture).  Fixtures here are named for scenarios.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def fd_count() -> int:
    """Open file descriptors of this process now (for leak assertions)."""
    return len(os.listdir("/proc/self/fd"))
