"""Shared pieces of the system benchmarks (relay, capacity, handshake).

Every benchmark here follows the same rules (issue 9, docs/benchmarks.md):

* everything runs on this machine, on 127.0.0.1 or other 127.0.0.x addresses,
  with bounded durations and counts;
* the machine is shared and noisy, so each benchmark measures its baselines
  **in the same run**, interleaved with podterm, and reports **ratios**;
* each prints a table and writes a JSON document under ``bench/results/``
  (git-ignored).

This module holds what they share: starting a gateway subprocess and reading
its ready file, reading a process's RSS and CPU time from ``/proc``, raising
``RLIMIT_NOFILE``, picking 127.0.0.x source addresses, percentiles, table
printing and JSON result writing.  It imports nothing from podterm, so a
baseline server started from a benchmark never loads the gateway's code.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
RESULTS_DIR = ROOT / "bench" / "results"

#: Linux reports /proc CPU times in clock ticks.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- environment


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a benchmark subprocess: ``src/`` importable, no stray PODTERM_*.

    The gateway reads ``PODTERM_*`` variables; a developer's shell may have
    some set (a token, a config file) that would change what is measured.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTERM_")}
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    if extra:
        env.update(extra)
    return env


def ensure_src_on_path() -> None:
    """Make ``import podterm`` work when a script runs from the source tree."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def raise_nofile(wanted: int | None = None) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (default: the hard limit).

    Returns the soft limit now in force.  The hard limit is never raised (a
    non-root process cannot, and this machine's is 20,000 per process).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(wanted, hard if hard != resource.RLIM_INFINITY
                                             else wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def cleanup_on_sigterm() -> None:
    """Turn SIGTERM (and SIGINT, which background jobs ignore) into KeyboardInterrupt.

    A benchmark owns subprocesses (a gateway and the shells it started, load
    generators, baseline servers); its ``finally`` blocks stop them, which a
    plain SIGTERM would skip.
    """
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def source_addresses(count: int, first: int = 2) -> list[str]:
    """``count`` loopback source addresses ``127.0.0.<first>`` onwards.

    Ephemeral ports (32768-60999 here) allow about 28,000 connections per
    source/destination pair, so load generators each take their own source
    address.  All of 127.0.0.0/8 is routed to ``lo`` on Linux: no set-up is
    needed to bind them.
    """
    if count < 0 or first < 1 or first + count > 255:
        raise ValueError(f"cannot pick {count} addresses from 127.0.0.{first}")
    return [f"127.0.0.{first + i}" for i in range(count)]


def machine_info() -> dict[str, Any]:
    """Where and when a run happened: CPU, cores, load, versions."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str] = {}
    try:
        import importlib.metadata as md

        for dist in ("trio", "trio-websocket", "h11", "wsproto", "locust", "matplotlib"):
            try:
                versions[dist] = md.version(dist)
            except md.PackageNotFoundError:
                pass
    except ImportError:  # pragma: no cover
        pass
    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT),
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"],
                               cwd=str(ROOT), capture_output=True, text=True,
                               timeout=10).stdout.strip()
        if commit and dirty:
            commit += " + uncommitted changes in src/"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "time_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "cpu": model,
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


# ------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """Numeric fields of ``/proc/PID/status`` in bytes (``kB`` fields) or as counts."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
            elif len(parts) == 1 and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS``)."""
    return proc_status(pid).get("VmRSS", 0)


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (shared pages divided among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (its threads included)."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def descendants_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s live descendants (each with its own reaped children).

    Together with the change in the ``pid``'s reaped-children time this is
    what the processes a server started (shells, ``cat``) have used.
    """
    total = 0.0
    for child in descendants_of(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


def sched_wait_seconds(pid: int) -> float:
    """Time ``pid``'s main thread spent runnable but waiting for a CPU (``/proc/PID/schedstat``).

    On a shared machine this is how much of a latency number is the
    scheduler's, not the program's: a gateway that waits 300 ms for a CPU
    cannot answer a keystroke sooner.
    """
    try:
        with open(f"/proc/{pid}/schedstat", encoding="utf-8") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc/PID/task/*/children``)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="utf-8") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def descendants_of(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out: list[int] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children_of(child))
    return out


@dataclass(frozen=True, slots=True)
class TreeMemory:
    """Memory of a set of processes: summed RSS (counts shared pages once per process) and PSS."""

    processes: int
    rss: int
    pss: int


def tree_memory(pids: Iterable[int]) -> TreeMemory:
    """Sum RSS and PSS over ``pids`` (processes that vanished are skipped)."""
    n = rss = pss = 0
    for pid in pids:
        try:
            rss += rss_bytes(pid)
        except OSError:
            continue
        pss += pss_bytes(pid)
        n += 1
    return TreeMemory(n, rss, pss)


# ------------------------------------------------------------ GC tracing

#: Installed as ``sitecustomize`` in a benchmark's gateway (``--gc-trace``): it
#: times every collection with ``gc.callbacks`` and keeps the numbers in a
#: JSON file the benchmark reads between phases.  The gateway's own GC
#: metrics (issue 9 item 4) will replace it; until then this is the evidence.
_GC_TRACE_SITECUSTOMIZE = '''\
import atexit, gc, json, os, time

_path = os.environ.get("BENCH_GC_TRACE")
if _path:
    _perf, _wall = time.perf_counter, time.time
    _state = {"start": 0.0, "last_write": 0.0}
    _gens = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}  # count, total, max
    _long = []  # (wall time, generation, seconds, collected, objects) for pauses >= 1 ms

    def _write():
        doc = {"generations": {str(g): {"count": v[0], "total_s": v[1], "max_s": v[2]}
                               for g, v in _gens.items()},
               "long": _long[-5000:], "pid": os.getpid()}
        tmp = _path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, _path)

    def _callback(phase, info):
        if phase == "start":
            _state["start"] = _perf()
            return
        took = _perf() - _state["start"]
        g = _gens[info["generation"]]
        g[0] += 1
        g[1] += took
        if took > g[2]:
            g[2] = took
        if took >= 0.001:
            # For the first full collections also how many objects they walked
            # (listing them costs about as much as the collection, after it).
            walked = 0
            if info["generation"] == 2 and _state.setdefault("counted", 0) < 3:
                _state["counted"] += 1
                walked = len(gc.get_objects())
            _long.append((_wall(), info["generation"], took, info.get("collected", 0), walked))
        now = _perf()
        if now - _state["last_write"] > 0.5:
            _state["last_write"] = now
            try:
                _write()
            except OSError:
                pass

    gc.callbacks.append(_callback)
    atexit.register(_write)

_cprofile_path = os.environ.get("BENCH_CPROFILE")
if _cprofile_path:
    import cProfile, signal

    _profiler = [None]

    def _toggle(signum, frame):
        # SIGUSR1 starts a CPU-time profile of the main thread (the trio
        # loop); the next SIGUSR1 stops it and writes pstats to the file.
        if _profiler[0] is None:
            _profiler[0] = cProfile.Profile(time.process_time)
            _profiler[0].enable()
        else:
            prof, _profiler[0] = _profiler[0], None
            prof.disable()
            prof.dump_stats(_cprofile_path + ".tmp")
            os.replace(_cprofile_path + ".tmp", _cprofile_path)

    signal.signal(signal.SIGUSR1, _toggle)

_tracemalloc_path = os.environ.get("BENCH_TRACEMALLOC")
if _tracemalloc_path:
    import signal, tracemalloc

    def _trace(signum, frame):
        # SIGUSR2 starts tracing allocations; the next one writes the live
        # allocations made since, grouped by line, and stops.
        if not tracemalloc.is_tracing():
            tracemalloc.start(6)
            return
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = snap.statistics("lineno")
        top = [(str(st.traceback[0]), st.size, st.count) for st in stats[:60]]
        total = sum(st.size for st in stats)
        # The same allocations charged to the innermost podterm line that led
        # to them (trio's cancel scopes and tasks land on the line that made them).
        ours = {}
        for st in snap.statistics("traceback"):
            where = next((str(fr) for fr in reversed(st.traceback) if "/podterm/" in fr.filename),
                         str(st.traceback[-1]))
            size, count = ours.get(where, (0, 0))
            ours[where] = (size + st.size, count + st.count)
        by_ours = sorted(((w, s, n) for w, (s, n) in ours.items()), key=lambda r: -r[1])[:60]
        with open(_tracemalloc_path + ".tmp", "w") as f:
            json.dump({"total": total, "top": top, "ours": by_ours}, f)
        os.replace(_tracemalloc_path + ".tmp", _tracemalloc_path)

    signal.signal(signal.SIGUSR2, _trace)
'''


def gc_trace_env(workdir: Path, *, gc_trace: bool = True, cprofile: bool = False,
                 tracemalloc: bool = False) -> dict[str, str]:
    """Env for :func:`start_gateway` that instruments the gateway from outside its code.

    Returns ``PYTHONPATH`` (with a ``sitecustomize`` in front) and, as asked,
    ``BENCH_GC_TRACE`` (GC pauses as JSON; read it with :func:`read_gc_trace`)
    and ``BENCH_CPROFILE`` (a pstats file written by :func:`cprofile_window`).
    """
    site = workdir / "gctrace"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_GC_TRACE_SITECUSTOMIZE)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{SRC}"}
    if gc_trace:
        env["BENCH_GC_TRACE"] = str(workdir / "gc.json")
    if cprofile:
        env["BENCH_CPROFILE"] = str(workdir / "gateway.pstats")
    if tracemalloc:
        env["BENCH_TRACEMALLOC"] = str(workdir / "tracemalloc.json")
    return env


def cprofile_toggle(pid: int) -> None:
    """Start (first call) or stop and write (second call) the gateway's cProfile."""
    os.kill(pid, signal.SIGUSR1)


def cprofile_summary(path: Path, per: float, top: int = 25) -> dict[str, Any]:
    """Top functions of a pstats file by own CPU time, with calls per ``per`` units of work.

    Raises FileNotFoundError if the profile was not written (wait for it first).
    """
    import pstats

    stats = pstats.Stats(str(path))
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in \
            stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{func} ({_short_path(file)}:{line})", "calls": ncalls,
                     "calls_per_unit": ncalls / per if per else math.nan,
                     "tottime_s": tottime, "cumtime_s": cumtime,
                     "share": tottime / total if total else math.nan})
    rows.sort(key=lambda r: -r["tottime_s"])
    return {"total_cpu_s": total, "units": per, "top": rows[:top],
            "cpu_us_per_unit": total / per * 1e6 if per else math.nan}


def _short_path(path: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1].split("/", 1)[-1] if marker == "/lib/python3" \
                else path.split(marker, 1)[1]
    return path


def read_gc_trace(env: Mapping[str, str]) -> dict[str, Any] | None:
    path = env.get("BENCH_GC_TRACE")
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def gc_window(before: dict[str, Any] | None, after: dict[str, Any] | None,
              t0: float, t1: float) -> dict[str, Any] | None:
    """GC activity between two reads: collections per generation and pauses >= 1 ms."""
    if after is None:
        return None
    out: dict[str, Any] = {"collections": {}, "total_s": 0.0}
    for gen, stats in after["generations"].items():
        prev = (before or {}).get("generations", {}).get(gen, {"count": 0, "total_s": 0.0})
        count = stats["count"] - prev["count"]
        total = stats["total_s"] - prev["total_s"]
        out["collections"][gen] = count
        out["total_s"] += total
    pauses = [p for p in after.get("long", []) if t0 <= p[0] <= t1]
    out["pauses_over_1ms"] = len(pauses)
    out["max_pause_s"] = max((p[2] for p in pauses), default=0.0)
    out["longest"] = sorted(pauses, key=lambda p: -p[2])[:5]
    return out


# ---------------------------------------------------------------- the gateway


@dataclass
class GatewayProcess:
    """A ``python -m podterm serve`` subprocess started by a benchmark.

    Attributes:
        url: ``http://127.0.0.1:PORT`` from the ready file.
        token: the generated admin token (from the ready file) or the one set.
        pid: the gateway's pid.
        log_path: where its stderr goes (the gateway logs every attach).
    """

    proc: subprocess.Popen[bytes]
    url: str
    token: str
    pid: int
    log_path: Path
    workdir: Path
    owns_workdir: bool = False  # made by start_gateway: removed by stop()
    _known_children: set[int] = field(default_factory=set)

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):]

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def children(self) -> list[int]:
        """The gateway's child processes (local-upstream shells); remembered for cleanup."""
        kids = children_of(self.pid)
        self._known_children.update(kids)
        return kids

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (the gateway drains and kills its shells), then SIGKILL if it hangs.

        Shells the gateway started run as leaders of their own sessions, so
        they do not die with it; any still alive afterwards are killed here.
        Returns the exit status, or None if it had to be killed.
        """
        self.children()
        status: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            status = self.proc.returncode
        for pid in self._known_children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return status


def start_gateway(*, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                  workdir: Path | None = None, timeout_s: float = 30.0,
                  python: str | None = None, recordings: str = "off") -> GatewayProcess:
    """Start ``python -m podterm serve --listen 127.0.0.1:0 --ready-file F`` and wait for F.

    ``env`` adds ``PODTERM_*`` settings (limits without a flag).  The ready
    file is JSON ``{url, token, pid, workers}`` written once every listener
    is bound, so nothing here sleeps on a guess.  ``recordings`` is passed as
    ``--recordings``: the gateway records every session by default (issue
    6), into the user's state directory; a benchmark says what it measures,
    so the default here is ``off`` and a recording variant names a directory.

    Raises:
        RuntimeError: the gateway exited or did not get ready within ``timeout_s``
            (the message quotes the end of its log).
    """
    owns_workdir = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="podterm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "gateway.ready.json"
    ready.unlink(missing_ok=True)  # a stale one from an earlier run would be believed
    log_path = workdir / "gateway.log"
    cmd = [python or sys.executable, "-m", "podterm", "serve", "--listen", "127.0.0.1:0",
           "--ready-file", str(ready), "--log-level", "warning", "--recordings", recordings,
           *args]
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the subprocess for its life
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=child_env(env), stdin=subprocess.DEVNULL,
                            stdout=log_file, stderr=log_file)
    log_file.close()
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"gateway did not start (exit {proc.returncode}): {tail}")
        time.sleep(0.02)  # polling a file the child writes atomically; bounded above
    info = json.loads(ready.read_text())
    token = info.get("token") or (env or {}).get("PODTERM_ADMIN_TOKEN", "")
    return GatewayProcess(proc=proc, url=info["url"], token=token, pid=int(info["pid"]),
                          log_path=log_path, workdir=workdir, owns_workdir=owns_workdir)


def wait_port_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """Wait for a baseline server to write its port into ``path``; return the port."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = path.read_text().strip()
            if text:
                return int(text)
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"baseline server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"baseline server wrote no port to {path} in {timeout_s}s")
        time.sleep(0.02)


def write_port_file(path: str, port: int) -> None:
    """Write ``port`` atomically (readers never see a partial number)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ numbers


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of already sorted values, nearest-rank.

    Nearest rank never invents a value between two samples, so p99.9 of
    1,000 samples is the largest one, not an interpolation.
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def percentiles(values: Iterable[float], ps: Sequence[float] = (50, 99, 99.9)
                ) -> dict[str, float]:
    """``{"p50": .., "p99": .., "p99.9": .., "max": .., "n": ..}`` of ``values``."""
    data = sorted(values)
    out = {f"p{p:g}": percentile(data, p) for p in ps}
    out["max"] = data[-1] if data else math.nan
    out["n"] = len(data)
    return out


def median(values: Sequence[float]) -> float:
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def fmt_ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def fmt_num(value: float, digits: int = 0) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def fmt_bytes(n: float) -> str:
    if isinstance(n, float) and math.isnan(n):
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.2f} ms"


# ------------------------------------------------------------------ profile
#
# py-spy (pip install py-spy) samples a running gateway from outside, so a
# benchmark can show where the gateway's time goes without touching its code.


def pyspy_path() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if found and os.path.exists(found) else None


def start_pyspy(pid: int, out: Path, duration_s: float) -> subprocess.Popen[bytes] | None:
    exe = pyspy_path()
    if exe is None:
        progress("py-spy not found (pip install py-spy): no profile")
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                             "--duration", str(max(1, int(round(duration_s)))), "--nonblocking",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"samples": 0}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl_counts[name] += count
        by_file[_frame_file(stack.split(";")[-1])] += count
    return {
        "samples": total,
        "self": [(name, c / total) for name, c in self_counts.most_common(top)] if total else [],
        "inclusive": [(name, c / total) for name, c in incl_counts.most_common(top * 2)]
        if total else [],
        "self_by_file": [(name, c / total) for name, c in by_file.most_common(top)]
        if total else [],
    }


def _frame_file(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "trio/_core/_run.py"
    inner = frame[frame.rfind("(") + 1:].rstrip(")")
    path = inner.rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return path


def _frame_name(frame: str) -> str:
    func = frame[:frame.rfind(" (")] if " (" in frame else frame
    return f"{func} ({_frame_file(frame)})"



# ------------------------------------------------------------------ output


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
          align: str | None = None) -> str:
    """A Markdown table (pipes), readable on a terminal and pasteable into docs.

    ``align`` has one letter per column, ``l`` or ``r``; numbers go right.
    """
    rows = [[str(c) for c in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if align[i] == "r" else cell.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def progress(message: str) -> None:
    """One progress line on stderr (tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_result(kind: str, payload: Mapping[str, Any], out: str | None = None) -> Path:
    """Write ``payload`` (plus machine info) as JSON; return the path.

    Default: ``bench/results/<kind>-<UTC time>.json`` and a copy at
    ``bench/results/<kind>-latest.json``.
    """
    doc = {"benchmark": kind, "machine": machine_info(), **payload}
    text = json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n"
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{kind}-{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / f"{kind}-latest.json").write_text(text)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def clean_nan(obj: Any) -> Any:
    """Replace NaN with None recursively (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_nan(v) for v in obj]
    return obj


# --------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 (trustme, from the test extra)."""

    cert_file: Path
    key_file: Path
    client_context: Any  # ssl.SSLContext trusting the CA


def make_tls(workdir: Path) -> TlsFiles | None:
    """Certificates for a TLS variant, or None when trustme is not installed."""
    try:
        import trustme
    except ImportError:
        return None
    import ssl

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = workdir / "tls.crt", workdir / "tls.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    # The chain PEM holds the key too; give the gateway the certificates only.
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    cert_file.write_bytes(chain)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return TlsFiles(cert_file, key_file, ctx)


# ------------------------------------------------ a lean podterm.v1 client
#
# The benchmarks' own client: it must cost as little as possible, so that the
# server, not the client, is what is measured.  It uses podterm's WebSocket
# layer (native codec) but decodes podterm.v1 by its type byte only, and it
# follows the protocol's rules: every output byte is ACKed within half a
# window and within 100 ms while data flows (docs/protocol.md §6).

#: podterm.v1 type bytes (docs/protocol.md §4).
T_STDIN, T_STDOUT, T_STDERR, T_EXIT, T_RESIZE, T_ACK, T_CONTROL = range(7)
SUBPROTOCOL = "podterm.v1"


class HttpConn:
    """A keep-alive HTTP/1.1 connection (h11) for the REST API.

    The CLI's ``ApiClient`` opens a connection per request; a load generator
    creating thousands of sessions reuses one instead, bound to its own
    source address.  When the gateway ends the connection (``Connection:
    close``, an idle timeout) the next request opens a new one; a request
    that fails on a reused connection is retried once on a fresh one.
    """

    def __init__(self, host: str, port: int, token: str,
                 local_address: str | None = None, ssl_context: Any = None) -> None:
        import h11

        self._h11 = h11
        self.host = host
        self.port = port
        self.token = token
        self.local_address = local_address
        self.ssl_context = ssl_context
        self.stream: Any = None
        self.conn: Any = None
        self.requests_on_conn = 0
        self.opened_at = 0.0

    @classmethod
    async def open(cls, host: str, port: int, token: str,
                   local_address: str | None = None, ssl_context: Any = None) -> HttpConn:
        self = cls(host, port, token, local_address, ssl_context)
        await self._reopen()
        return self

    async def _reopen(self) -> None:
        import trio

        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
        self.stream = await open_stream(self.host, self.port, local_address=self.local_address,
                                        ssl_context=self.ssl_context)
        self.conn = self._h11.Connection(self._h11.CLIENT)
        self.requests_on_conn = 0
        self.opened_at = time.monotonic()

    def _reusable(self) -> bool:
        h11 = self._h11
        conn = self.conn
        if conn is None:
            return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        return bool(conn.our_state is h11.IDLE and conn.their_state is h11.IDLE)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; return ``(status, decoded JSON or None)``."""
        import trio

        h11 = self._h11
        for attempt in (0, 1):
            if not self._reusable():
                await self._reopen()
            # Kept alive (or opened a while ago, unused): the server may have
            # closed it as idle before it read this request.
            reused = self.requests_on_conn > 0 or time.monotonic() - self.opened_at > 1.0
            try:
                self.requests_on_conn += 1
                return await self._request_once(method, path, body)
            except (ConnectionError, trio.BrokenResourceError, h11.ProtocolError):
                if attempt or not reused:
                    raise
                self.conn = None  # the server closed a kept-alive connection: a fresh one
        raise AssertionError("unreachable")

    async def _request_once(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        h11 = self._h11
        conn = self.conn
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", f"{self.host}:{self.port}"), ("Authorization", f"Bearer {self.token}"),
                   ("Content-Length", str(len(payload)))]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        out = conn.send(h11.Request(method=method, target=path, headers=headers))
        if payload:
            out += conn.send(h11.Data(data=payload))
        out += conn.send(h11.EndOfMessage())
        await self.stream.send_all(out)
        status = 0
        data = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.stream.receive_some(65536)
                conn.receive_data(bytes(chunk))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError(f"{method} {path}: connection closed")
        try:
            document = json.loads(data) if data else None
        except ValueError:
            document = None
        return status, document

    async def create_session(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/v1/sessions``; raises RuntimeError unless 201."""
        status, document = await self.request("POST", "/api/v1/sessions", dict(body))
        if status != 201 or not isinstance(document, dict):
            raise RuntimeError(f"create session: HTTP {status}: {document}")
        return document

    async def delete_session(self, session_id: str) -> int:
        status, _ = await self.request("DELETE", f"/api/v1/sessions/{session_id}")
        return status

    async def aclose(self) -> None:
        import trio

        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
            self.stream = None


def fast_mask_keys(seed: int = 0) -> Any:
    """Mask keys from a seeded PRNG: a benchmark client, not a browser, needs no urandom."""
    import random

    rng = random.Random(seed)
    return lambda: rng.randbytes(4)


async def open_stream(host: str, port: int, *, local_address: str | None = None,
                      ssl_context: Any = None) -> Any:
    """TCP from ``local_address`` (127.0.0.x), with TLS on top when ``ssl_context`` is given."""
    import trio

    tcp = await trio.open_tcp_stream(host, port, local_address=local_address)
    if ssl_context is None:
        return tcp
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


async def ws_connect(host: str, port: int, target: str, *,
                     subprotocols: Sequence[str] = (), token: str | None = None,
                     local_address: str | None = None, seed: int = 0,
                     ssl_context: Any = None) -> Any:
    """TCP (+TLS) from ``local_address``, then podterm's client handshake: a WebSocketStream."""
    import trio

    ensure_src_on_path()
    from podterm.net.wsconn import client_handshake

    stream = await open_stream(host, port, local_address=local_address, ssl_context=ssl_context)
    headers = [("Authorization", f"Bearer {token}")] if token else []
    try:
        ws, _ = await client_handshake(stream, f"{host}:{port}", target, subprotocols, headers,
                                       fast_mask_keys(seed))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return ws


class PtLink:
    """One attached podterm.v1 connection, as lean as the protocol allows.

    Attributes:
        ws: the WebSocketStream.
        out: output bytes received (the next output offset expected).
        acked: the output offset last ACKed.
        exited: an EXIT arrived.
    """

    ACK_EVERY_BYTES = 128 * 1024  # half the default 256 KiB window (§6)
    ACK_EVERY_S = 0.1  # §6: at least every 100 ms while data flows

    def __init__(self, ws: Any, session: Mapping[str, Any]) -> None:
        self.ws = ws
        self.session = dict(session)
        self.out = 0
        self.acked = 0
        self.exited = False
        self.hello: dict[str, Any] | None = None
        self.last_ack_t = 0.0

    @classmethod
    async def attach(cls, host: str, port: int, token: str, session: Mapping[str, Any], *,
                     local_address: str | None = None, mode: str = "rw",
                     seed: int = 0, ssl_context: Any = None) -> PtLink:
        """Attach (``rw`` with the session's resume token) and wait for ``hello``."""
        from urllib.parse import urlencode

        query = {"offset": 0, "mode": mode}
        if mode == "rw" and session.get("resume_token"):
            query["resume_token"] = session["resume_token"]
        target = f"/api/v1/sessions/{session['id']}/attach?{urlencode(query)}"
        ws = await ws_connect(host, port, target, subprotocols=[SUBPROTOCOL], token=token,
                              local_address=local_address, seed=seed, ssl_context=ssl_context)
        link = cls(ws, session)
        pending: list[bytes] = []
        while link.hello is None:
            for _opcode, payload in await ws.receive_batch():
                if link.hello is None and payload[0] == T_CONTROL:
                    doc = json.loads(bytes(payload[1:]))
                    if doc.get("type") == "hello":
                        link.hello = doc
                        continue
                    if doc.get("type") == "error":
                        raise RuntimeError(f"attach refused: {doc}")
                elif link.hello is not None:
                    pending.append(bytes(payload))
        link._pending = pending
        return link

    _pending: list[bytes]

    def ack_frame(self, now: float, force: bool = False) -> bytes:
        """An ACK frame if one is due (half a window or 100 ms of unACKed output), else b''."""
        unacked = self.out - self.acked
        if self.exited or self.ws.closed is not None:
            return b""  # the session ended: nothing more to credit
        if unacked and (force or unacked >= self.ACK_EVERY_BYTES
                        or now - self.last_ack_t >= self.ACK_EVERY_S):
            self.acked = self.out
            self.last_ack_t = now
            return self.ws.conn.send_binary(self.out.to_bytes(8, "big"), b"\x05")
        return b""

    def stdin_frame(self, data: bytes) -> bytes:
        return self.ws.conn.send_binary(data, b"\x00")

    async def send(self, data: bytes) -> None:
        await self.ws.send_raw(data)

    async def receive_output(self) -> int:
        """Read one batch; return the output bytes in it (STDOUT+STDERR); note EXIT."""
        got = 0
        if self._pending:
            batch = [(2, p) for p in self._pending]
            self._pending = []
        else:
            batch = await self.ws.receive_batch()
        for _opcode, payload in batch:
            kind = payload[0]
            if kind == T_STDOUT or kind == T_STDERR:
                got += len(payload) - 1
            elif kind == T_EXIT:
                self.exited = True
        self.out += got
        return got

    async def aclose(self) -> None:
        import trio

        with trio.move_on_after(2):
            try:
                await self.ws.aclose(1000, "")
            except Exception:
                pass
        await trio.aclose_forcefully(self.ws.stream)
