"""GC profiles: what each sets, the pause histogram, the low-latency collector."""

from __future__ import annotations

import gc
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


def test_low_latency_collects_only_generation_0_by_itself() -> None:
    t0, t1, t2 = PROFILES["low-latency"].thresholds or (0, 0, 0)
    # No automatic collection walks what survived a young one (the collector's
    # young steps do, every look), and a gen-0 one walks about t0 objects.
    assert (t1, t2) == (NEVER, NEVER)
    assert t0 <= 2_000
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
    assert "# TYPE podterm_gc_collector_steps_total counter" in text
    assert "podterm_gc_frozen_objects" not in text  # counting them walks the heap


# ------------------------------------------------------- the low-latency collector


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
    """Start-up as the profile does it: collect, freeze; nothing young or old after."""
    gc.collect()
    gc.freeze()
    assert gc.get_count()[1:] == (0, 0)


def test_a_young_step_collects_the_young_generations_and_freezes_what_is_left(
        gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector(max_step_s=10.0)
    dead = _Cycle()
    ref = weakref.ref(dead)
    kept = _Cycle()
    gc.collect(0)  # both survive into generation 1, which no automatic collection walks
    del dead
    frozen = gc.get_freeze_count()
    assert col.young_objects() >= gc.get_threshold()[0]  # a full gen 0 per collection since
    assert col.step(idle=False, now=0.0, active=True) == "young"  # load is no matter
    assert ref() is None  # the garbage among the young is collected ...
    assert gc.get_freeze_count() > frozen and gc.get_count()[1:] == (0, 0)  # ... the rest frozen
    assert gc.is_tracked(kept)
    st = col.statistics()
    assert (st.young_steps, st.frozen_steps, st.deep_sweeps) == (1, 0, 0)
    assert st.last_step_s > 0 and st.collected >= 1
    assert st.seconds_per_object != 3e-7  # the estimate follows what the step cost


def test_a_step_over_its_budget_only_freezes(gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector(max_step_s=1e-12)  # no walk fits: a burst of new sessions
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    gc.collect(0)
    del cycle
    frozen = gc.get_freeze_count()
    assert col.step(idle=True, now=0.0) == "frozen"
    st = col.statistics()
    assert (st.young_steps, st.frozen_steps) == (1, 1)
    assert st.collected == 0 and st.last_step_s == 0  # nothing walked, no pause
    assert gc.get_freeze_count() > frozen
    assert ref() is not None  # garbage among it waits for a deep sweep
    # What it froze is no longer young: only new allocations count.
    assert col.young_objects() < gc.get_threshold()[0]


def test_young_objects_counts_what_waits_in_the_young_generations(gc_state: None) -> None:
    _fresh_old_generation()
    col = _collector()
    t0 = gc.get_threshold()[0]
    assert col.young_objects() < t0
    gc.collect(0)
    gc.collect(0)
    assert col.young_objects() >= 2 * t0
    col.step(idle=False, now=0.0)
    assert col.young_objects() < t0


def test_only_a_deep_sweep_frees_cycles_among_frozen_objects(gc_state: None) -> None:
    _fresh_old_generation()
    heap = _Heap(1_000_000)
    col = _collector(heap, max_step_s=10.0, deep_min_blocks=1, deep_idle_s=0.5)
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    assert col.step(idle=True, now=0.0) == "young"  # alive: the cycle is frozen now
    del cycle
    assert col.step(idle=True, now=1.0) == "young"
    assert ref() is not None  # frozen: young steps never look at it
    heap.blocks = 1_250_000  # a deep sweep is due once the heap grew by 25%
    assert col.step(idle=False, now=1.5) != "deep"  # due, but busy
    assert col.step(idle=True, now=2.0) != "deep"  # quiet, but not for deep_idle_s yet
    assert col.step(idle=True, now=2.6) == "deep"
    assert ref() is None
    st = col.statistics()
    assert st.deep_sweeps == 1 and st.forced_deep_sweeps == 0 and st.last_deep_s > 0
    assert st.heap_blocks_at_sweep == 1_250_000  # the next one is due at 25% over this
    assert gc.get_freeze_count() > 0


def test_a_deep_sweep_waits_while_traffic_flows(gc_state: None) -> None:
    _fresh_old_generation()
    heap = _Heap(1_000_000)
    col = _collector(heap, deep_min_blocks=1, deep_idle_s=0.5)
    heap.blocks = 1_300_000
    assert col.step(idle=True, now=0.0, active=True) != "deep"
    assert col.step(idle=True, now=1.0, active=True) != "deep"  # an idle CPU, but traffic
    assert col.step(idle=True, now=1.1) != "deep"  # quiet from here
    assert col.step(idle=True, now=1.7) == "deep"


def test_a_deep_sweep_waits_for_quiet_unless_the_heap_doubled_long_ago(
        gc_state: None) -> None:
    _fresh_old_generation()
    heap = _Heap(1_000_000)
    col = _collector(heap, deep_min_blocks=1, deep_max_defer_s=5.0)
    heap.blocks = 1_500_000  # due, not doubled: only a quiet moment runs it
    assert col.step(idle=False, now=0.0) != "deep"
    assert col.step(idle=False, now=10.0) != "deep"
    heap.blocks = 2_500_000  # doubled from here
    assert col.step(idle=False, now=10.0) != "deep"
    assert col.step(idle=False, now=14.9) != "deep"
    assert col.step(idle=False, now=15.0) == "deep"
    assert col.statistics().forced_deep_sweeps == 1


@pytest.mark.trio
async def test_the_loop_takes_a_young_step_every_look_busy_or_not(
        gc_state: None, autojump_clock: trio.testing.MockClock) -> None:
    _fresh_old_generation()
    # Always busy: the process's CPU clock runs with the (mock) wall clock.
    col = OldGenerationCollector(IdlePolicy(check_interval_s=0.1, max_step_s=10.0),
                                 cpu_clock=trio.current_time, clock=trio.current_time)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(col.run)
            dead = _Cycle()
            ref = weakref.ref(dead)
            gc.collect(0)  # into generation 1, which nothing automatic walks
            del dead
            started = trio.current_time()
            while ref() is not None:
                await trio.sleep(0.1)
            assert trio.current_time() - started <= 0.25  # the next look took it
            assert col.statistics().young_steps >= 1
            nursery.cancel_scope.cancel()


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
            while col.statistics().young_steps == 0:
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

