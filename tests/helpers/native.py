"""Load a native module's implementation for an equivalence test, or skip the module.

The native twin is required under ``PODTERM_NATIVE=require`` and in CI (the
build must have produced it); elsewhere a missing build skips the test
module instead of failing it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

REQUIRED = os.environ.get("PODTERM_NATIVE") == "require" or bool(os.environ.get("CI"))


def native_or_skip(load: Callable[[str], T], what: str) -> T:
    """``load("native")``, or a module-level skip naming ``what`` when it is not built."""
    try:
        return load("native")
    except ImportError as exc:  # pragma: no cover - only without a compiler
        if REQUIRED:
            raise
        pytest.skip(f"{what} not built: {exc}", allow_module_level=True)
