"""GC profiles (``--gc-profile``) and the GC pause measurements behind ``/metrics``.

CPython's cyclic collector stops the process while it runs, for a time that
grows with the number of objects it examines.  A gateway that holds
thousands of sessions keeps a few hundred tracked objects per session, so a
*full* collection (generation 2) walks millions of them: docs/benchmarks.md
measured 0.28 s at 1,000 sessions and 2.6 s at 10,000, and those pauses were
the keystroke p99.  Young collections (generations 0 and 1) only walk the
objects allocated since the previous one and stay short.

Profiles (:data:`PROFILES`; applied once the gateway listens and its start-up
allocations are done, by :meth:`GcController.run`):

``default``
    CPython's own settings, untouched (thresholds (700, 10, 10)).  Pauses are
    measured all the same.
``throughput``
    ``gc.collect()`` then ``gc.freeze()`` after start-up (modules, classes and
    configuration move to the permanent generation, which no collection walks
    again), and a gen-0 threshold of 50,000: far fewer collections, each
    longer; full collections stay automatic.
``low-latency``
    ``gc.freeze()`` after start-up as well; only generation 0 is collected
    automatically (thresholds (2,000, never, never)): a young collection
    walks the young objects still alive, about 2,000.  What survives it
    waits in generation 1, which no automatic collection walks.
    :class:`OldGenerationCollector`, a trio task, does the rest:

    * *young steps*: every ``check_interval_s`` (0.1 s) it runs
      ``gc.collect(1)`` and ``gc.freeze()``: a walk over what was allocated
      since the previous look and is still alive (under 1 ms while 1,000
      sessions type), and what survives is frozen, never walked again.  A
      step whose estimate (the young objects times the seconds per object
      the previous steps took) is over ``max_step_s`` (1 ms: a burst of new
      sessions) only freezes: ``gc.freeze()`` moves lists, no pause;
    * *deep* sweeps: frozen objects are never examined, so cyclic garbage
      among them (a session's objects that form a cycle when it ends) is not
      reclaimed by those steps.  Once the heap has grown by ``deep_growth``
      since the previous sweep (25%: CPython's own rule for full collections,
      so the amortized cost is the same; the heap is counted in pymalloc
      blocks, ``sys.getallocatedblocks()``, because ``gc.get_freeze_count()``
      walks the whole frozen list) and the process has been *quiet* for
      ``deep_idle_s`` (idle-ish, and the gateway's traffic counters have not
      moved: nobody is typing or reading), it runs ``gc.unfreeze()``,
      ``gc.collect()``, ``gc.freeze()``: a pause that walks the whole heap,
      moved to a moment when nobody waits for it.  Under traffic that never
      stops it is deferred at most ``deep_max_defer_s`` once the heap has
      doubled (memory before latency: a gateway killed for its memory drops
      every session).

    Why not CPython's generation 1: a young collection's time is the walk
    over the young objects alive, and under load much of that is the
    suspended state of whatever waits, re-made at each wait (coroutines,
    cancel scopes, epoll waiters).  With thresholds (10,000, 2), and a
    receiver task per typing link, a gateway relaying 10,000 keystrokes a
    second paused up to 4 ms per generation-0 collection and 20 ms per
    generation-1 one (docs/benchmarks.md).  (Keystrokes are now applied by
    the idle watcher's call, no task per typing link: gateway/attach.py.)

Pauses: :class:`GcPauseRecorder` times every collection with
``gc.callbacks`` (``time.perf_counter_ns`` at ``start`` and ``stop``) into a
fixed-bucket histogram per generation, exported as
``podterm_gc_pause_seconds`` (and ``podterm_gc_pause_max_seconds``,
``podterm_gc_profile_info``), and the collecting thread's CPU time in each
(``time.thread_time_ns``) into ``podterm_gc_pause_cpu_seconds`` and
``podterm_gc_pause_cpu_max_seconds``: on a loaded machine a pause can last
longer than the collector worked, while the OS runs other processes.  Collections in any thread count, explicit
ones included: a pause is a pause.
"""

from __future__ import annotations

import bisect
import gc
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import trio

from podterm.metrics import MetricFamily, histogram, labelled

__all__ = [
    "DEFAULT_PAUSE_BUCKETS_S",
    "NEVER",
    "PROFILES",
    "CollectorStatistics",
    "GcController",
    "GcPauseRecorder",
    "GcPauseStatistics",
    "GcProfile",
    "IdlePolicy",
    "OldGenerationCollector",
    "apply_profile",
    "pause_recorder",
]

log = logging.getLogger(__name__)

#: A threshold no count reaches: automatic collections of that generation are off.
#: (``gc.set_threshold`` takes C ints; 2**30 gen-1 collections is years.)
NEVER = 1 << 30

#: Bucket upper bounds, 100 µs to 1 s: a young collection should land in the
#: first buckets, a full one over a big heap in the last.
DEFAULT_PAUSE_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

_GENERATIONS = 3


@dataclass(frozen=True, slots=True)
class GcProfile:
    """What one ``--gc-profile`` sets.

    Attributes:
        name: the profile's name (``config.GC_PROFILES``).
        thresholds: ``gc.set_threshold`` arguments, or None to leave CPython's.
        freeze_at_start: ``gc.collect()`` then ``gc.freeze()`` once started.
        collect_old_when_idle: run :class:`OldGenerationCollector` (automatic
            full collections are off in ``thresholds``).
    """

    name: str
    thresholds: tuple[int, int, int] | None
    freeze_at_start: bool
    collect_old_when_idle: bool


#: The profiles by name.  ``low-latency``: generation 0 alone is collected
#: automatically, at 2,000 (a walk of ~2,000 young objects, under 1 ms);
#: generations 1 and 2 are left to :class:`OldGenerationCollector`.
#: ``throughput``: 50,000 / 50 / 100 makes collections ~70x rarer than the
#: default at the price of longer young pauses.
PROFILES: Mapping[str, GcProfile] = MappingProxyType({
    "default": GcProfile("default", None, freeze_at_start=False, collect_old_when_idle=False),
    "throughput": GcProfile("throughput", (50_000, 50, 100), freeze_at_start=True,
                            collect_old_when_idle=False),
    "low-latency": GcProfile("low-latency", (2_000, NEVER, NEVER), freeze_at_start=True,
                             collect_old_when_idle=True),
})


# ------------------------------------------------------------------- pauses


@dataclass(frozen=True, slots=True)
class GcPauseStatistics:
    """A snapshot of the pause histogram.

    Attributes:
        bounds_s: bucket upper bounds, seconds (``+Inf`` is implied).
        buckets: per generation, *cumulative* counts per bound, then the total
            (the ``+Inf`` bucket), so ``len(bounds_s) + 1`` values.
        sum_s: per generation, total seconds paused.
        count: per generation, collections measured.
        max_s: per generation, the longest pause.
        cpu_buckets, cpu_sum_s, cpu_max_s: the same for the CPU time the
            collecting thread spent in the collection (``time.thread_time``).
            A pause longer in wall time than in CPU time is the operating
            system running something else meanwhile (a loaded machine), not
            the collector's work.
    """

    bounds_s: tuple[float, ...]
    buckets: tuple[tuple[int, ...], ...]
    sum_s: tuple[float, ...]
    count: tuple[int, ...]
    max_s: tuple[float, ...]
    cpu_buckets: tuple[tuple[int, ...], ...]
    cpu_sum_s: tuple[float, ...]
    cpu_max_s: tuple[float, ...]

    @property
    def worst_s(self) -> float:
        """The longest pause of any generation."""
        return max(self.max_s)


class GcPauseRecorder:
    """Times every collection (``gc.callbacks``) into a fixed-bucket histogram.

    Memory is bounded: one counter per bucket and generation, whatever runs.
    The callback does two clock reads, a bisection and a few integer adds
    (about a microsecond); it runs inside the collection, in whichever thread
    triggered it, under the GIL.  Collections never nest, so one "started"
    slot is enough.

    Args:
        buckets_s: increasing bucket upper bounds in seconds.
        clock_ns: nanosecond clock (``time.perf_counter_ns``; tests pass a fake).
    """

    __slots__ = ("_bounds_s", "_bounds_ns", "_counts", "_sum_ns", "_max_ns", "_started_ns",
                 "_clock_ns", "_users", "_cpu_clock_ns", "_started_cpu_ns", "_cpu_counts",
                 "_cpu_sum_ns", "_cpu_max_ns")

    def __init__(self, buckets_s: Sequence[float] = DEFAULT_PAUSE_BUCKETS_S, *,
                 clock_ns: Callable[[], int] = time.perf_counter_ns,
                 cpu_clock_ns: Callable[[], int] = time.thread_time_ns) -> None:
        bounds = tuple(float(b) for b in buckets_s)
        if not bounds or any(b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"buckets_s={buckets_s!r}: positive and strictly increasing")
        self._bounds_s = bounds
        self._bounds_ns = [round(b * 1e9) for b in bounds]
        self._counts = [[0] * (len(bounds) + 1) for _ in range(_GENERATIONS)]
        self._sum_ns = [0] * _GENERATIONS
        self._max_ns = [0] * _GENERATIONS
        self._started_ns: int | None = None
        self._clock_ns = clock_ns
        self._users = 0
        self._cpu_clock_ns = cpu_clock_ns
        self._started_cpu_ns = 0
        self._cpu_counts = [[0] * (len(bounds) + 1) for _ in range(_GENERATIONS)]
        self._cpu_sum_ns = [0] * _GENERATIONS
        self._cpu_max_ns = [0] * _GENERATIONS

    def __repr__(self) -> str:
        counts = "/".join(str(sum(c)) for c in self._counts)
        return (f"<GcPauseRecorder collections={counts} "
                f"max={max(self._max_ns) / 1e6:.2f}ms installed={self.is_installed}>")

    # gc.callbacks protocol: callback(phase, info)
    def callback(self, phase: str, info: Mapping[str, Any]) -> None:
        """The ``gc.callbacks`` hook: ``start`` stamps, ``stop`` records."""
        if phase == "start":
            self._started_cpu_ns = self._cpu_clock_ns()
            self._started_ns = self._clock_ns()
            return
        started = self._started_ns
        if started is None:
            return  # installed while a collection ran: its start was not seen
        wall = self._clock_ns() - started
        cpu = self._cpu_clock_ns() - self._started_cpu_ns
        self._started_ns = None
        self.observe(info["generation"], wall, cpu)

    def observe(self, generation: int, duration_ns: int, cpu_ns: int | None = None) -> None:
        """Count one pause of ``duration_ns`` (wall) and ``cpu_ns`` (CPU) in ``generation``.

        ``cpu_ns`` None: only the wall time is known; it counts as CPU time too.
        """
        # Prometheus buckets are "less than or equal": the first bound >= duration.
        bounds = self._bounds_ns
        self._counts[generation][bisect.bisect_left(bounds, duration_ns)] += 1
        self._sum_ns[generation] += duration_ns
        if duration_ns > self._max_ns[generation]:
            self._max_ns[generation] = duration_ns
        if cpu_ns is None:
            cpu_ns = duration_ns
        self._cpu_counts[generation][bisect.bisect_left(bounds, cpu_ns)] += 1
        self._cpu_sum_ns[generation] += cpu_ns
        if cpu_ns > self._cpu_max_ns[generation]:
            self._cpu_max_ns[generation] = cpu_ns

    @property
    def is_installed(self) -> bool:
        return self.callback in gc.callbacks

    def install(self) -> None:
        """Add the hook to ``gc.callbacks`` (counted: :meth:`uninstall` as often)."""
        self._users += 1
        if not self.is_installed:
            gc.callbacks.append(self.callback)

    def uninstall(self) -> None:
        """Undo one :meth:`install`; the hook goes when the last user leaves."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self.is_installed:
            gc.callbacks.remove(self.callback)
            self._started_ns = None

    def statistics(self) -> GcPauseStatistics:
        """A frozen snapshot (cumulative buckets, as Prometheus wants them)."""
        return GcPauseStatistics(
            bounds_s=self._bounds_s, buckets=_cumulative(self._counts),
            sum_s=tuple(ns / 1e9 for ns in self._sum_ns),
            count=tuple(sum(c) for c in self._counts),
            max_s=tuple(ns / 1e9 for ns in self._max_ns),
            cpu_buckets=_cumulative(self._cpu_counts),
            cpu_sum_s=tuple(ns / 1e9 for ns in self._cpu_sum_ns),
            cpu_max_s=tuple(ns / 1e9 for ns in self._cpu_max_ns))


def _cumulative(per_generation: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    """Per-bucket counts to Prometheus's cumulative ones, per generation."""
    out = []
    for counts in per_generation:
        running, cumulative = 0, []
        for n in counts:
            running += n
            cumulative.append(running)
        out.append(tuple(cumulative))
    return tuple(out)


_RECORDER: GcPauseRecorder | None = None


def pause_recorder() -> GcPauseRecorder:
    """The process's pause recorder (``gc.callbacks`` are per process, so is it)."""
    global _RECORDER
    if _RECORDER is None:
        _RECORDER = GcPauseRecorder()
    return _RECORDER


# ----------------------------------------------------------------- profiles


def apply_profile(profile: GcProfile) -> None:
    """Set ``profile``'s thresholds and freeze what start-up allocated.

    The collection before the freeze keeps start-up garbage out of the
    permanent generation (it would never be reclaimed).
    """
    if profile.freeze_at_start:
        gc.collect()
        gc.freeze()
    if profile.thresholds is not None:
        gc.set_threshold(*profile.thresholds)


@dataclass(frozen=True, slots=True)
class IdlePolicy:
    """When :class:`OldGenerationCollector` collects (``low-latency``).

    Words: *idle-ish* means the process used at most ``idle_cpu_share`` of a
    CPU since the previous look and no other task is runnable; *quiet* means
    idle-ish and no traffic (the ``activity`` count stood still).

    Attributes:
        check_interval_s: how often it looks (a sleep; 10 wake-ups a second
            are nothing next to a gateway's heartbeats).  Each look collects
            and freezes what the young generations hold (a *young step*), so
            this bounds how much a young step walks: what was allocated
            since the previous look and is still alive.
        idle_cpu_share: see above.
        max_step_s: a young step collects only if its estimated pause is at
            most this (the young objects times the seconds per object the
            previous steps took); above it, the step only freezes them.
        deep_growth: a deep sweep is due once the heap (pymalloc blocks) has
            grown by this share since the previous one ...
        deep_min_blocks: ... and by at least this many blocks (a small heap
            is not worth a sweep).
        deep_idle_s: quiet for this long before a deep sweep.
        deep_max_defer_s: once the heap has *doubled*, a deep sweep waits
            for a quiet moment at most this long.
        heap_check_interval_s: the heap is counted at most this often (it
            costs ~20 µs per million blocks).
    """

    check_interval_s: float = 0.1
    idle_cpu_share: float = 0.25
    max_step_s: float = 0.001
    deep_growth: float = 0.25
    deep_min_blocks: int = 200_000
    deep_idle_s: float = 2.0
    deep_max_defer_s: float = 600.0
    heap_check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.check_interval_s <= 0 or not 0 <= self.idle_cpu_share <= 1:
            raise ValueError(f"{self}: check_interval_s > 0 and 0 <= idle_cpu_share <= 1")
        if self.max_step_s <= 0 or self.deep_growth <= 0 or self.deep_idle_s < 0:
            raise ValueError(f"{self}: max_step_s > 0, deep_growth > 0, deep_idle_s >= 0")


@dataclass(frozen=True, slots=True)
class CollectorStatistics:
    """A snapshot of :class:`OldGenerationCollector`.

    Attributes:
        young_steps: young steps run (``collect(1)`` + ``freeze()``, or a
            freeze alone).
        frozen_steps: the part of them that only froze (their estimate was
            over ``max_step_s``): no collection, no pause.
        deep_sweeps: ``unfreeze()`` + ``collect()`` + ``freeze()`` sweeps run.
        forced_deep_sweeps: the part of them run after ``deep_max_defer_s``.
        collected: objects the collector's own collections freed.
        heap_blocks: pymalloc blocks at the latest count.
        heap_blocks_at_sweep: ... and after the latest deep sweep (or start).
        seconds_per_object: the current estimate of a young step's pause
            per young object.
        last_step_s, last_deep_s: the pauses of the latest young step that
            collected, and of the latest deep sweep.
    """

    young_steps: int
    frozen_steps: int
    deep_sweeps: int
    forced_deep_sweeps: int
    collected: int
    heap_blocks: int
    heap_blocks_at_sweep: int
    seconds_per_object: float
    last_step_s: float
    last_deep_s: float


#: The first estimate of a young step's pause per young object: ~0.3 µs
#: (a gateway's objects on a loaded 2-core box; lists of ints take 0.02).
_FIRST_S_PER_OBJECT = 3e-7


class OldGenerationCollector:
    """Keeps the GC's walks short from a trio task (``low-latency``).

    See the module docstring and :class:`IdlePolicy`.  Automatic collections
    are generation 0 only (the profile's thresholds); what survives them
    waits in generation 1, which no automatic collection walks.  Every
    ``check_interval_s`` a *young step* collects generations 0 and 1 and
    freezes what is left: a walk over what was allocated since the previous
    look and is still alive.  A step whose estimate is over ``max_step_s``
    (a burst of new sessions) freezes without collecting: ``gc.freeze()``
    moves lists, no pause.  Frozen objects are never walked again, so
    cyclic garbage among them (a session's objects that form a cycle when it
    ends) waits for a *deep sweep* at a quiet moment.  The clocks are
    arguments so tests can drive it.

    Args:
        policy: when to collect.
        activity: a number that moves whenever the process serves someone
            (the gateway: bytes relayed, requests answered).  None: only the
            CPU share says what is quiet.
        cpu_clock: the process's CPU seconds (``time.process_time``, all threads).
        clock: a monotonic wall clock (``time.monotonic``).
        heap_size: ``sys.getallocatedblocks``.
    """

    __slots__ = ("policy", "_activity", "_cpu_clock", "_clock", "_heap_size",
                 "_young_steps", "_frozen_steps", "_young_base", "_deep_sweeps",
                 "_forced_deep", "_collected", "_heap_base", "_heap", "_heap_at",
                 "_s_per_object", "_last_step_s", "_last_deep_s", "_quiet_since",
                 "_doubled_at")

    def __init__(self, policy: IdlePolicy | None = None, *,
                 activity: Callable[[], int] | None = None,
                 cpu_clock: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic,
                 heap_size: Callable[[], int] = sys.getallocatedblocks) -> None:
        self.policy = policy or IdlePolicy()
        self._activity = activity
        self._cpu_clock = cpu_clock
        self._clock = clock
        self._heap_size = heap_size
        self._young_steps = 0
        self._frozen_steps = 0
        self._young_base = gc.get_count()[1]
        self._deep_sweeps = 0
        self._forced_deep = 0
        self._collected = 0
        self._heap_base = self._heap = heap_size()
        self._heap_at: float | None = None
        self._s_per_object = _FIRST_S_PER_OBJECT
        self._last_step_s = 0.0
        self._last_deep_s = 0.0
        self._quiet_since: float | None = None
        self._doubled_at: float | None = None

    def __repr__(self) -> str:
        return (f"<OldGenerationCollector young={self._young_steps} "
                f"deep={self._deep_sweeps} heap={self._heap}/{self._heap_base}>")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Look every ``check_interval_s`` and collect when due; never returns."""
        self._heap_base = self._heap = self._heap_size()
        self._young_base = gc.get_count()[1]
        task_status.started()
        activity = self._activity
        seen = activity() if activity is not None else 0
        cpu0, wall0 = self._cpu_clock(), self._clock()
        while True:
            await trio.sleep(self.policy.check_interval_s)
            cpu1, wall1 = self._cpu_clock(), self._clock()
            busy = (cpu1 - cpu0) / max(wall1 - wall0, 1e-9)
            idle = (busy <= self.policy.idle_cpu_share
                    and trio.lowlevel.current_statistics().tasks_runnable == 0)
            active = False
            if activity is not None:
                now_seen = activity()
                active, seen = now_seen != seen, now_seen
            self.step(idle=idle, now=wall1, active=active)
            # What the collection itself cost is not load: measure from after it.
            cpu0, wall0 = self._cpu_clock(), self._clock()

    def young_objects(self) -> int:
        """An estimate of the objects a young step would walk.

        Generation 0's count, plus a full generation 0 (the threshold) for
        each automatic collection since the latest step: their survivors
        wait in generation 1.  (The count is allocations minus deallocations,
        so it can fall behind what the list holds; the measured seconds per
        object absorb that.)
        """
        count0, count1, _ = gc.get_count()
        collections = count1 - self._young_base
        if collections < 0:  # generation 1 was collected since (by someone else)
            collections = count1
        return count0 + collections * gc.get_threshold()[0]

    def step(self, *, idle: bool, now: float, active: bool = False) -> str | None:
        """One look: run what is due.  Returns ``"deep"``, ``"young"``, ``"frozen"`` or None.

        Args:
            idle: the process was idle-ish since the previous look.
            now: the wall clock, seconds.
            active: it served someone since the previous look (traffic).
        """
        policy = self.policy
        if not idle or active:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        quiet_for = now - self._quiet_since if self._quiet_since is not None else -1.0
        if self._heap_at is None or now - self._heap_at >= policy.heap_check_interval_s:
            self._heap, self._heap_at = self._heap_size(), now
        grown = self._heap - self._heap_base
        if grown >= max(policy.deep_min_blocks, self._heap_base):
            if self._doubled_at is None:
                self._doubled_at = now
        else:
            self._doubled_at = None
        if grown >= max(policy.deep_min_blocks, policy.deep_growth * self._heap_base):
            overdue = (self._doubled_at is not None
                       and now - self._doubled_at >= policy.deep_max_defer_s)
            if quiet_for >= policy.deep_idle_s or overdue:
                self._deep(forced=quiet_for < policy.deep_idle_s)
                return "deep"
        return self._young_step()

    def _young_step(self) -> str | None:
        """Collect the young generations and freeze what is left, or only freeze.

        Nothing young (no allocation since the latest step): nothing to do.
        """
        objects = self.young_objects()
        if objects <= 0:
            return None
        self._young_steps += 1
        if objects * self._s_per_object > self.policy.max_step_s:
            # Too many to walk within max_step_s (a burst of new sessions):
            # freeze them as they are, garbage included (the deep sweep's).
            gc.freeze()
            self._young_base = gc.get_count()[1]
            self._frozen_steps += 1
            return "frozen"
        started = time.perf_counter()
        self._collected += gc.collect(1)
        gc.freeze()
        took = time.perf_counter() - started
        self._young_base = gc.get_count()[1]
        self._last_step_s = took
        # The next estimate: halfway to what this step cost per object.
        self._s_per_object = max((self._s_per_object + took / objects) / 2, 1e-9)
        return "young"

    def _deep(self, *, forced: bool) -> None:
        started = time.perf_counter()
        gc.unfreeze()
        self._collected += gc.collect()
        gc.freeze()
        self._young_base = gc.get_count()[1]
        self._last_deep_s = time.perf_counter() - started
        self._heap_base = self._heap = self._heap_size()
        self._doubled_at = None
        self._deep_sweeps += 1
        if forced:
            self._forced_deep += 1
        log.info("gc.deep_sweep.complete: %.1f ms, %d blocks in the heap%s",
                 self._last_deep_s * 1e3, self._heap_base, " (forced)" if forced else "")

    def statistics(self) -> CollectorStatistics:
        return CollectorStatistics(
            young_steps=self._young_steps, frozen_steps=self._frozen_steps,
            deep_sweeps=self._deep_sweeps, forced_deep_sweeps=self._forced_deep,
            collected=self._collected, heap_blocks=self._heap,
            heap_blocks_at_sweep=self._heap_base, seconds_per_object=self._s_per_object,
            last_step_s=self._last_step_s, last_deep_s=self._last_deep_s)


class GcController:
    """Applies a GC profile for as long as :meth:`run` runs, and measures pauses.

    ``await nursery.start(controller.run)`` once the gateway listens (start-up
    allocations done): the profile is applied, the pause hook installed, and
    for ``low-latency`` the :class:`OldGenerationCollector` runs.  When
    ``run`` ends (cancelled at shutdown) the thresholds are restored, frozen
    objects unfrozen and the hook removed, so a process that runs gateways
    one after another (tests) gets CPython's state back.  One profile per
    process: gateways that overlap in one process share the GC.

    Args:
        profile: a :class:`GcProfile` or its name.
        policy: the idle collector's policy (``low-latency``).
        activity: see :class:`OldGenerationCollector`.
        recorder: the pause recorder (default: the process's).

    Raises:
        ValueError: an unknown profile name.
    """

    __slots__ = ("profile", "recorder", "collector", "_saved_thresholds")

    def __init__(self, profile: GcProfile | str = "default", *, policy: IdlePolicy | None = None,
                 activity: Callable[[], int] | None = None,
                 recorder: GcPauseRecorder | None = None) -> None:
        if isinstance(profile, str):
            try:
                profile = PROFILES[profile]
            except KeyError:
                raise ValueError(f"gc profile {profile!r}: one of "
                                 f"{', '.join(PROFILES)}") from None
        self.profile = profile
        self.recorder = recorder or pause_recorder()
        self.collector = (OldGenerationCollector(policy, activity=activity)
                          if profile.collect_old_when_idle else None)
        self._saved_thresholds: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"<GcController {self.profile.name} {self.recorder!r}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Apply the profile, then hold it (and run the idle collector) until cancelled."""
        self._saved_thresholds = gc.get_threshold()
        try:
            apply_profile(self.profile)
            # After the start-up collection: what is measured is pauses while serving.
            self.recorder.install()
            log.info("gc.profile %s: thresholds %s, %d objects frozen", self.profile.name,
                     gc.get_threshold(), gc.get_freeze_count())
            if self.collector is not None:
                await self.collector.run(task_status=task_status)
            else:
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.restore()

    def restore(self) -> None:
        """Undo :meth:`run`'s changes (idempotent)."""
        if self._saved_thresholds is not None:
            gc.set_threshold(*self._saved_thresholds)
            self._saved_thresholds = None
            if self.profile.freeze_at_start:
                gc.unfreeze()
            self.recorder.uninstall()

    def metric_families(self) -> list[MetricFamily]:
        """``podterm_gc_*``: the pause histogram, worst pauses, profile, idle collections.

        Nothing here walks the heap (``gc.get_freeze_count()`` would).
        """
        st = self.recorder.statistics()
        gens = [str(g) for g in range(_GENERATIONS)]

        def pauses(name: str, what: str, buckets: tuple[tuple[int, ...], ...],
                   sums: tuple[float, ...], worst: tuple[float, ...],
                   worst_help: str) -> list[MetricFamily]:
            """A histogram per generation and its worst value since start."""
            return [histogram(name, what, "generation", st.bounds_s,
                              {g: (buckets[i], sums[i]) for i, g in enumerate(gens)}),
                    labelled(name.replace("_seconds", "_max_seconds"), "gauge", worst_help,
                             "generation", dict(zip(gens, worst, strict=True)))]

        fams = [
            *pauses("podterm_gc_pause_seconds",
                    "Garbage-collection pauses (gc.callbacks), by generation.",
                    st.buckets, st.sum_s, st.max_s,
                    "The longest garbage-collection pause since start, by generation."),
            *pauses("podterm_gc_pause_cpu_seconds",
                    "CPU time of the collecting thread in each garbage-collection pause, "
                    "by generation (less than the pause: the OS ran something else).",
                    st.cpu_buckets, st.cpu_sum_s, st.cpu_max_s,
                    "The most CPU time one garbage-collection pause took since start."),
            labelled("podterm_gc_profile_info", "gauge", "The GC profile in force (value 1).",
                     "profile", {self.profile.name: 1}),
        ]
        if self.collector is not None:
            cs = self.collector.statistics()
            fams.append(labelled(
                "podterm_gc_collector_steps_total", "counter",
                "Steps of the low-latency collector, by kind: young (collect the young generations, freeze the rest), young_frozen (freeze only), deep (unfreeze, full collection, freeze).", "kind",
                {"young": cs.young_steps, "young_frozen": cs.frozen_steps,
                 "deep": cs.deep_sweeps, "deep_forced": cs.forced_deep_sweeps}))
        return fams
