"""CI's bounded fuzz run: hostile HTTP, WebSocket frames and podterm.v1/k8s messages
against a live in-process gateway for a fixed budget (see :mod:`tests.fuzz.harness`).

The budget is ``PODTERM_FUZZ_SECONDS`` (default 15 s of fuzzing; the whole
test, start and shutdown included, stays well under a minute) and the seed
``PODTERM_FUZZ_SEED`` (default: random, printed, so a failure can be
replayed with ``python -m tests.fuzz.run --seed SEED``).
"""

from __future__ import annotations

import os
import random

import pytest

from tests.fuzz.harness import fuzz_gateway

pytestmark = pytest.mark.trio

FUZZ_S = float(os.environ.get("PODTERM_FUZZ_SECONDS") or 15.0)


async def test_the_gateway_survives_a_bounded_fuzz_run() -> None:
    seed = int(os.environ.get("PODTERM_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    report = await fuzz_gateway(FUZZ_S, seed=seed, workers=6)
    print(report.summary())
    assert report.ok, report.summary()
    # It did fuzz: every surface was reached, and the witness echoed all along.
    assert report.cases["http"] and report.cases["podterm"] and report.cases["k8s"]
    assert report.witness_rounds >= FUZZ_S  # about four rounds a second
    assert any(k.startswith("podterm 10") for k in report.outcomes), report.outcomes
