"""--gc-profile against a real gateway: /metrics exports GC pauses; the profile is applied."""

from __future__ import annotations

import gc
import re
from typing import TYPE_CHECKING

import pytest
import trio

from podterm.config import WorkersConfig
from podterm.gcprofile import PROFILES

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


async def test_metrics_expose_the_gc_pause_histogram(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        before = (await gateway.rest("GET", "/metrics", token=None)).body.decode()
        gc.collect()  # the gateway runs in this process: this is one of its pauses
        answer = await gateway.rest("GET", "/metrics", token=None)
    assert answer.status == 200
    text = answer.body.decode()
    assert "# TYPE podterm_gc_pause_seconds histogram" in text
    assert "# TYPE podterm_gc_pause_max_seconds gauge" in text
    assert 'podterm_gc_profile_info{profile="default"} 1' in text
    count = 'podterm_gc_pause_seconds_count{generation="2"}'
    assert _sample(text, count) >= _sample(before, count) + 1
    assert _sample(text, 'podterm_gc_pause_seconds_bucket{generation="2",le="+Inf"}') == \
        _sample(text, count)
    assert _sample(text, 'podterm_gc_pause_seconds_bucket{generation="0",le="0.0001"}') >= 0
    assert _sample(text, 'podterm_gc_pause_seconds_sum{generation="2"}') > 0
    assert _sample(text, 'podterm_gc_pause_max_seconds{generation="2"}') > 0
    # The collector's CPU time in the same pauses: as many, never more than their wall time.
    assert "# TYPE podterm_gc_pause_cpu_seconds histogram" in text
    assert _sample(text, 'podterm_gc_pause_cpu_seconds_count{generation="2"}') == \
        _sample(text, count)
    assert 0 < _sample(text, 'podterm_gc_pause_cpu_seconds_sum{generation="2"}') <= \
        _sample(text, 'podterm_gc_pause_seconds_sum{generation="2"}') * 1.01
    assert _sample(text, 'podterm_gc_pause_cpu_max_seconds{generation="2"}') > 0


async def test_low_latency_profile_is_applied_while_the_gateway_runs(
        make_gateway: GatewayFactory) -> None:
    threshold = gc.get_threshold()
    gw = await make_gateway(workers=WorkersConfig(gc_profile="low-latency"))
    try:
        assert gc.get_threshold() == PROFILES["low-latency"].thresholds
        assert gc.get_freeze_count() > 0
        with trio.fail_after(WAIT_S):
            text = (await gw.rest("GET", "/metrics", token=None)).body.decode()
        assert 'podterm_gc_profile_info{profile="low-latency"} 1' in text
        assert "# TYPE podterm_gc_collector_steps_total counter" in text
        gw.gw.shutdown("test over")
        with trio.fail_after(WAIT_S):
            await gw.finished.wait()
        # Stopped: CPython's settings are back for whatever runs next in this process.
        assert gc.get_threshold() == threshold
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
