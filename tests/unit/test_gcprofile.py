"""GC profiles: what each sets, the pause histogram, the idle old-generation collector."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from podterm.config import GC_PROFILES
from podterm.gcprofile import (
    DEFAULT_PAUSE_BUCKETS_S,
    NEVER,
    PROFILES,
    GcController,
    GcPauseRecorder,
    IdlePolicy,
    OldGenerationCollector,
)
from podterm.metrics import histogram, render


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Whatever a test does to the process's GC, the next test gets it back."""
    thresholds = gc.get_threshold()
    callbacks = list(gc.callbacks)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.callbacks[:] = callbacks


class _Cycle:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def _promote() -> list[list[int]]:
    """Make a gen-1 collection promote objects into the old generation; keep them alive."""
    keep: list[list[int]] = [[] for _ in range(50)]
    gc.collect(1)
    assert gc.get_count()[2] >= 1
    return keep


# ------------------------------------------------------------------ profiles


def test_profiles_are_the_configs_choices() -> None:
    assert tuple(PROFILES) == GC_PROFILES


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="one of default, throughput, low-latency"):
        GcController("fast")


@pytest.mark.trio
@pytest.mark.parametrize("name", GC_PROFILES)
async def test_each_profile_sets_what_it_says_and_restores_on_exit(
        name: str, gc_state: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    recorder = GcPauseRecorder()
    controller = GcController(name, recorder=recorder)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.run)
            profile = PROFILES[name]
            expected = profile.thresholds or before
            assert gc.get_threshold() == expected
            if profile.freeze_at_start:
                assert gc.get_freeze_count() > 0
            else:
                assert gc.get_freeze_count() == 0
            assert recorder.is_installed
            assert (controller.collector is not None) == (name == "low-latency")
            nursery.cancel_scope.cancel()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    assert not recorder.is_installed


def test_low_latency_turns_automatic_full_collections_off() -> None:
    t0, t1, t2 = PROFILES["low-latency"].thresholds or (0, 0, 0)
    assert t2 == NEVER
    # Young collections stay bounded: a gen-1 one walks at most the survivors
    # of t1 + 1 gen-0 collections of ~t0 objects each (a burst of new sessions).
    assert t0 * (t1 + 1) <= 30_000 and t1 <= 2
    assert PROFILES["throughput"].thresholds == (50_000, 50, 100)
    assert PROFILES["default"].thresholds is None


# ------------------------------------------------------------------- pauses


def test_histogram_buckets_are_less_than_or_equal() -> None:
    rec = GcPauseRecorder((0.001, 0.01))
    rec.observe(0, 1_000_000)      # exactly 1 ms: the 1 ms bucket
    rec.observe(0, 1_000_001)      # just over: the 10 ms bucket
    rec.observe(1, 500)            # 0.5 µs
    rec.observe(2, 2_000_000_000)  # 2 s: +Inf only
    st = rec.statistics()
    assert st.bounds_s == (0.001, 0.01)
    assert st.buckets == ((1, 2, 2), (1, 1, 1), (0, 0, 1))
    assert st.count == (2, 1, 1)
    assert st.sum_s[0] == pytest.approx(0.002000001)
    assert st.max_s == (0.001000001, 5e-07, 2.0)
    assert st.worst_s == 2.0


def test_callback_times_start_to_stop() -> None:
    now = [0]
    rec = GcPauseRecorder(clock_ns=lambda: now[0])
    rec.callback("stop", {"generation": 2})  # its start was not seen: ignored
    assert rec.statistics().count == (0, 0, 0)
    rec.callback("start", {"generation": 1})
    now[0] += 3_000_000
    rec.callback("stop", {"generation": 1})
    st = rec.statistics()
    assert st.count == (0, 1, 0)
    assert st.max_s[1] == 0.003
    assert st.buckets[1][DEFAULT_PAUSE_BUCKETS_S.index(0.005)] == 1
    assert st.buckets[1][DEFAULT_PAUSE_BUCKETS_S.index(0.002)] == 0


def test_the_collectors_cpu_time_is_kept_apart_from_the_pause() -> None:
    wall, cpu = [0], [0]
    rec = GcPauseRecorder(clock_ns=lambda: wall[0], cpu_clock_ns=lambda: cpu[0])
    rec.callback("start", {"generation": 0})
    wall[0] += 20_000_000  # 20 ms of pause ...
    cpu[0] += 1_500_000  # ... of which the collector ran 1.5 ms (the OS ran others)
    rec.callback("stop", {"generation": 0})
    st = rec.statistics()
    assert st.max_s[0] == 0.02 and st.cpu_max_s[0] == 0.0015
    assert st.buckets[0][DEFAULT_PAUSE_BUCKETS_S.index(0.025)] == 1
    assert st.buckets[0][DEFAULT_PAUSE_BUCKETS_S.index(0.01)] == 0
    assert st.cpu_buckets[0][DEFAULT_PAUSE_BUCKETS_S.index(0.002)] == 1
    assert st.cpu_buckets[0][DEFAULT_PAUSE_BUCKETS_S.index(0.001)] == 0
    assert st.cpu_sum_s[0] == 0.0015 and st.sum_s[0] == 0.02
    rec.observe(1, 3_000)  # no CPU time given: it counts as the wall time
    assert rec.statistics().cpu_max_s[1] == 3e-6


def test_memory_is_bounded_whatever_runs() -> None:
    rec = GcPauseRecorder()
    for i in range(10_000):
        rec.observe(i % 3, i * 1000)
    st = rec.statistics()
    assert all(len(b) == len(DEFAULT_PAUSE_BUCKETS_S) + 1 for b in st.buckets)
    assert sum(st.count) == 10_000


@pytest.mark.parametrize("buckets", [(), (0.0, 1.0), (0.5, 0.1), (0.1, 0.1)])
def test_bad_buckets_are_refused(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        GcPauseRecorder(buckets)


def test_installed_hook_measures_real_collections(gc_state: None) -> None:
    rec = GcPauseRecorder()
    rec.install()
    rec.install()
    try:
        gc.collect()
        st = rec.statistics()
        assert st.count[2] >= 1 and st.max_s[2] > 0
        rec.uninstall()
        assert rec.is_installed  # one user left
    finally:
        rec.uninstall()
    assert not rec.is_installed
    counted = rec.statistics().count[2]
    gc.collect()
    assert rec.statistics().count[2] == counted


def test_histogram_renders_as_prometheus_text() -> None:
    rec = GcPauseRecorder((0.001, 0.01))
    rec.observe(0, 500_000)
    rec.observe(0, 5_000_000)
    st = rec.statistics()
    text = render([histogram("podterm_gc_pause_seconds", "GC pauses.", "generation",
                             st.bounds_s, {"0": (st.buckets[0], st.sum_s[0])})])
    assert text.splitlines() == [
        "# HELP podterm_gc_pause_seconds GC pauses.",
        "# TYPE podterm_gc_pause_seconds histogram",
        'podterm_gc_pause_seconds_bucket{generation="0",le="0.001"} 1',
        'podterm_gc_pause_seconds_bucket{generation="0",le="0.01"} 2',
        'podterm_gc_pause_seconds_bucket{generation="0",le="+Inf"} 2',
        'podterm_gc_pause_seconds_sum{generation="0"} 0.0055',
        'podterm_gc_pause_seconds_count{generation="0"} 2',
    ]
    with pytest.raises(ValueError, match="counts for"):
        histogram("x", "x", "generation", (0.1,), {"0": ((1,), 0.0)})


def test_metric_families_name_the_profile_and_the_worst_pause(gc_state: None) -> None:
    rec = GcPauseRecorder()
    rec.observe(2, 7_000_000)
    text = render(GcController("low-latency", recorder=rec).metric_families())
    assert 'podterm_gc_profile_info{profile="low-latency"} 1' in text
    assert 'podterm_gc_pause_max_seconds{generation="2"} 0.007' in text
    assert 'podterm_gc_pause_seconds_count{generation="2"} 1' in text
    assert "# TYPE podterm_gc_old_generation_collections_total counter" in text
    assert "podterm_gc_frozen_objects" not in text  # counting them walks the heap


# ------------------------------------------------------- old-generation collector


class _Heap:
    """A heap size (pymalloc blocks) the test sets."""

    def __init__(self, blocks: int = 1_000_000) -> None:
        self.blocks = blocks

    def __call__(self) -> int:
        return self.blocks


def _collector(heap: _Heap | None = None, **policy: Any) -> OldGenerationCollector:
    fields: dict[str, Any] = {"heap_check_interval_s": 0.0, **policy}
    return OldGenerationCollector(IdlePolicy(**fields), heap_size=heap or _Heap())


def _fresh_old_generation() -> None:
    """Start-up as the profile does it: collect, freeze; nothing pending after."""
    gc.collect()
    gc.freeze()
    assert gc.get_count()[2] == 0


def test_promoted_objects_are_collected_and_frozen_at_an_idle_moment(gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector(max_step_s=10.0)
    assert col.step(idle=True, now=0.0) is None  # nothing promoted yet
    kept = _promote()
    frozen = gc.get_freeze_count()
    assert col.step(idle=False, now=1.0) is None  # busy, and far from max_step_s
    assert col.step(idle=True, now=2.0, active=True) == "promoted"  # traffic is no matter
    assert gc.get_count()[2] == 0
    assert gc.get_freeze_count() > frozen  # what survived is frozen now
    st = col.statistics()
    assert (st.promoted_steps, st.forced_steps, st.deep_sweeps) == (1, 0, 0)
    assert st.last_step_s > 0
    # The next estimate moves halfway to what this step cost per promotion.
    assert st.seconds_per_promotion == pytest.approx(
        max((0.0035 + st.last_step_s) / 2, 1e-6))
    assert gc.is_tracked(kept)


def test_a_step_is_forced_once_its_estimate_reaches_max_step_s(gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector(max_step_s=0.006)  # the first estimate is 3.5 ms per promotion
    kept = [_promote()]
    assert col.step(idle=False, now=0.0) is None
    kept.append(_promote())
    assert col.step(idle=False, now=0.1) == "promoted"
    st = col.statistics()
    assert (st.promoted_steps, st.forced_steps) == (1, 1)
    assert len(kept) == 2


def test_a_forced_step_over_its_budget_freezes_without_collecting(gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector(max_step_s=0.006)  # the first estimate is 3.5 ms per promotion
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    kept = [_promote()]
    kept.append(_promote())  # the cycle is in the old generation now
    del cycle
    frozen = gc.get_freeze_count()
    assert col.step(idle=False, now=0.0) == "promoted"
    st = col.statistics()
    assert (st.promoted_steps, st.forced_steps, st.frozen_steps) == (1, 1, 1)
    assert st.collected == 0 and st.last_step_s == 0  # nothing walked, no pause
    assert gc.get_freeze_count() > frozen
    assert ref() is not None  # garbage among it waits for a deep sweep
    # The promotions it froze are not pending any more: nothing to do under load.
    assert col.step(idle=False, now=0.1) is None
    kept.append(_promote())
    kept.append(_promote())
    assert col.step(idle=False, now=0.2) == "promoted"  # two new ones: due again
    assert col.statistics().frozen_steps == 2
    assert len(kept) == 4


def test_an_idle_moment_collects_and_freezes_the_young_survivors(gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector(max_step_s=10.0)
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    gc.collect(0)  # the cycle survives into generation 1 ...
    assert gc.get_count()[1] >= 1 and gc.get_count()[2] == 0  # ... nothing promoted
    del cycle
    assert col.step(idle=False, now=0.0) is None  # busy: left alone
    assert col.step(idle=True, now=1.0) == "promoted"
    assert ref() is None  # collected
    assert gc.get_count()[1] == 0  # generation 1 is empty
    assert col.step(idle=True, now=2.0) is None  # and the collection is not "pending"
    assert col.statistics().promoted_steps == 1


def test_a_step_is_forced_after_max_defer_s(gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector(max_defer_s=5.0, max_step_s=10.0)
    kept = _promote()
    assert col.step(idle=False, now=0.0) is None
    assert col.step(idle=False, now=4.9) is None
    assert col.step(idle=False, now=5.0) == "promoted"
    assert col.statistics().forced_steps == 1
    assert len(kept) == 50


@pytest.mark.trio
async def test_a_promotion_that_makes_a_step_due_runs_it_without_waiting_for_a_look(
        gc_state: None) -> None:
    _fresh_old_generation()
    # Never idle, and looks far apart: only the gc.callbacks hook can start the step.
    col = OldGenerationCollector(IdlePolicy(check_interval_s=3600, max_step_s=1e-9),
                                 cpu_clock=time.monotonic)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(col.run)
            kept = _promote()  # a gen-1 collection: the hook asks the loop for the step
            while col.statistics().promoted_steps == 0:
                await trio.sleep(0)
            st = col.statistics()
            assert (st.promoted_steps, st.forced_steps) == (1, 1)
            assert gc.get_count()[2] == 0
            nursery.cancel_scope.cancel()
    assert col._on_collection not in gc.callbacks  # the hook goes with the task
    assert len(kept) == 50


def test_only_a_deep_sweep_frees_cycles_among_frozen_objects(gc_state: None) -> None:
    _fresh_old_generation()
    heap = _Heap(1_000_000)
    col = _collector(heap, max_step_s=10.0, deep_min_blocks=1, deep_idle_s=0.5)
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    kept = _promote()
    assert col.step(idle=True, now=0.0) == "promoted"  # the cycle is frozen now
    del cycle
    kept += _promote()
    assert col.step(idle=True, now=1.0) == "promoted"
    assert ref() is not None  # frozen: promoted steps never look at it
    heap.blocks = 1_250_000  # a deep sweep is due once the heap grew by 25%
    assert col.step(idle=False, now=1.5) is None  # due, but busy
    assert col.step(idle=True, now=2.0) is None  # quiet, but not for deep_idle_s yet
    assert col.step(idle=True, now=2.6) == "deep"
    assert ref() is None
    st = col.statistics()
    assert st.deep_sweeps == 1 and st.forced_deep_sweeps == 0 and st.last_deep_s > 0
    assert st.heap_blocks_at_sweep == 1_250_000  # the next one is due at 25% over this
    assert gc.get_freeze_count() > 0
    assert len(kept) == 100


def test_a_deep_sweep_waits_while_traffic_flows(gc_state: None) -> None:
    _fresh_old_generation()
    heap = _Heap(1_000_000)
    col = _collector(heap, deep_min_blocks=1, deep_idle_s=0.5)
    heap.blocks = 1_300_000
    assert col.step(idle=True, now=0.0, active=True) is None
    assert col.step(idle=True, now=1.0, active=True) is None  # an idle CPU, but traffic
    assert col.step(idle=True, now=1.1) is None  # quiet from here
    assert col.step(idle=True, now=1.7) == "deep"


def test_a_deep_sweep_waits_for_quiet_unless_the_heap_doubled_long_ago(
        gc_state: None) -> None:
    _fresh_old_generation()
    heap = _Heap(1_000_000)
    col = _collector(heap, deep_min_blocks=1, deep_max_defer_s=5.0)
    heap.blocks = 1_500_000  # due, not doubled: only a quiet moment runs it
    assert col.step(idle=False, now=0.0) is None
    assert col.step(idle=False, now=10.0) is None
    heap.blocks = 2_500_000  # doubled from here
    assert col.step(idle=False, now=10.0) is None
    assert col.step(idle=False, now=14.9) is None
    assert col.step(idle=False, now=15.0) == "deep"
    assert col.statistics().forced_deep_sweeps == 1


@pytest.mark.trio
async def test_the_loop_collects_once_the_process_is_idle(
        gc_state: None, autojump_clock: trio.testing.MockClock) -> None:
    _fresh_old_generation()
    # The process's CPU clock runs with the (mock) wall clock while busy and
    # stands still once quiet.
    busy = True
    quiet_at = 0.0

    def cpu() -> float:
        return trio.current_time() if busy else quiet_at

    col = OldGenerationCollector(IdlePolicy(check_interval_s=0.1, max_step_s=10.0),
                                 cpu_clock=cpu, clock=trio.current_time)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(col.run)
            kept = _promote()
            await trio.sleep(0.55)  # five looks, all busy: nothing runs
            assert col.statistics().promoted_steps == 0
            busy, quiet_at = False, trio.current_time()
            while col.statistics().promoted_steps == 0:
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert gc.get_count()[2] == 0
    assert trio.current_time() - quiet_at < 1.0
    assert len(kept) == 50


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        IdlePolicy(check_interval_s=0)
    with pytest.raises(ValueError):
        IdlePolicy(idle_cpu_share=2)
    with pytest.raises(ValueError):
        IdlePolicy(max_step_s=0)


@pytest.mark.trio
async def test_the_loop_sweeps_only_once_nobody_is_served(
        gc_state: None, autojump_clock: trio.testing.MockClock) -> None:
    _fresh_old_generation()
    served = 0
    # The heap grew enough for a deep sweep; the CPU is idle throughout.
    heap = _Heap(1_000_000)
    policy = IdlePolicy(check_interval_s=0.1, max_step_s=10.0, deep_min_blocks=1,
                        deep_idle_s=0.5, heap_check_interval_s=0.0)
    col = OldGenerationCollector(policy, activity=lambda: served, cpu_clock=lambda: 0.0,
                                 clock=trio.current_time, heap_size=heap)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(col.run)
            heap.blocks = 2_000_000
            kept = _promote()
            while col.statistics().promoted_steps == 0:
                served += 1
                await trio.sleep(0.05)
            for _ in range(40):  # 2 s of traffic: no deep sweep however idle the CPU
                served += 1
                await trio.sleep(0.05)
            assert col.statistics().deep_sweeps == 0
            stopped = trio.current_time()
            while col.statistics().deep_sweeps == 0:
                await trio.sleep(0.05)
            assert trio.current_time() - stopped >= 0.5
            nursery.cancel_scope.cancel()
    assert len(kept) == 50

