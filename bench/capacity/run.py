"""Capacity benchmark: many attached sessions, some typing; memory, latency, CPU per keystroke.

What it does (issue 9, "capacity"):

1. starts a gateway (``python -m podterm serve``, 1 worker) and ``--loadgens``
   load-generator processes (``bench/capacity/loadgen.py``), each connecting
   from its own 127.0.0.x source address and holding its share of sessions;
2. warms the gateway up with one session per load generator (kept open)
   and reads the gateway's RSS: the baseline that per-session RSS is
   measured from;
3. for each step of concurrent sessions (``--steps``, default doubling up to
   ``--sessions``): opens the sessions that are missing (REST create +
   podterm.v1 attach + the shell's first prompt) and records sessions opened
   per second; reads the gateway's RSS (``/proc/PID/status``), open fds and,
   for the local upstream, the shells' own memory (summed RSS and PSS of the
   gateway's children); then lets ``--typing-fraction`` of the sessions type
   ``--keys-per-s`` keystrokes per second for ``--measure`` seconds and
   records the keystroke round trip (p50/p99/p99.9) and the gateway's CPU time
   per 1,000 keystrokes (``/proc/PID/stat``);
4. at the last step, every session sends one keystroke and must see its echo;
5. prints a table, writes JSON under ``bench/results/`` and (with matplotlib)
   a PNG of keystroke latency against concurrent sessions.

GC pauses come from the gateway's ``/metrics`` (``podterm_gc_pause_seconds``,
a histogram per generation, and ``podterm_gc_pause_max_seconds``): the
collections while typing and the worst of them (to the histogram's bucket:
"<= 2 ms"), and the worst pause since start.  ``--gc-trace`` adds the older
``gc.callbacks`` hook the benchmark installs itself (exact pauses >= 1 ms,
but it writes a file from inside the collector: off by default).
The event-loop lag from ``/metrics`` (``podterm_event_loop_lag_max_seconds``)
is reported beside the latency, because it is what a GC pause or a long
callback would show up as.

``--gc-profile default,throughput,low-latency`` (or ``all``) runs the whole
benchmark once per GC profile, each with a fresh gateway started with that
``--gc-profile``, and adds a table comparing them at the last step: keystroke
round trip p50/p99/p99.9, the worst GC pause while typing and since start,
and gateway RSS per session.

``--upstream local`` runs a real login shell per session in a PTY
(``--shell``, default bash); ``--upstream agent`` is for the echo agent
(``podterm agent --echo``), once it exists: see :func:`start_upstream`.

Usage::

    .venv/bin/python bench/capacity/run.py                       # 2,000 PTY sessions
    .venv/bin/python bench/capacity/run.py --sessions 500 --steps 100,250,500
    .venv/bin/python bench/capacity/run.py --tiny                # CI smoke size
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
#: Most descriptors one process may hold on this machine (hard limit); a load
#: generator keeps a margin below it for its REST connection, stdio, epoll.
FD_BUDGET = 19_000
#: podterm.config.GC_PROFILES (the gateway runs as a subprocess; its --gc-profile).
GC_PROFILES = ("default", "throughput", "low-latency")


# ----------------------------------------------------------------- upstream


@dataclass
class Upstream:
    """What the sessions run on, and how to start and measure it.

    ``local``: the gateway's own PTY shells (its children).  ``agent``:
    ``podterm agent --echo`` processes (issue 9 item 3) that register with
    the gateway over its tunnel and echo every stream in-process; each takes
    at most ``AGENT_STREAMS`` sessions, so larger runs start several, each
    with its own pod identity.
    """

    kind: str
    gateway_args: list[str] = field(default_factory=list)
    gateway_env: dict[str, str] = field(default_factory=dict)
    pods: list[str] = field(default_factory=list)  # "namespace/pod", agent only
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agent_token_file: Path | None = None
    placement: dict[int, int] = field(default_factory=dict)  # worker -> agents

    def start(self, gw: C.GatewayProcess, workdir: Path, workers: int = 1) -> None:
        """Start the agents (after the gateway, which they dial) and wait until registered.

        With ``workers`` > 1 each agent's tunnel lands on whichever worker the
        kernel picks (SO_REUSEPORT), and its sessions live there: an agent
        that lands on a worker that has its share already is restarted (a new
        connection, hashed anew), so that every worker holds as many agents,
        and so as many sessions, as the others.  Bounded: 20 tries per agent.
        """
        quota = math.ceil(len(self.pods) / workers)
        placed: dict[int, int] = {}
        for i, pod in enumerate(self.pods):
            for attempt in range(20):
                before = per_worker(gw.url, "podterm_agents_connected") if workers > 1 else {}
                self._start_agent(gw, workdir, i, pod)
                if workers <= 1:
                    break
                after = per_worker(gw.url, "podterm_agents_connected")
                landed = [w for w in after if after[w] > before.get(w, 0)]
                if len(landed) == 1 and placed.get(landed[0], 0) < quota:
                    placed[landed[0]] = placed.get(landed[0], 0) + 1
                    break
                if attempt == 19:
                    raise RuntimeError(f"echo agent {pod}: no worker with room after 20 tries "
                                       f"(placed {placed})")
                agent = self.agents.pop()
                agent.terminate()
                agent.wait(15)
                # Its lease and tunnel are gone once the gateway saw it leave.
                deadline = time.monotonic() + 15
                while per_worker(gw.url, "podterm_agents_connected") != before:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"echo agent {pod} did not leave the gateway")
                    time.sleep(0.05)  # polling /metrics; bounded above
        self.placement = placed

    def _start_agent(self, gw: C.GatewayProcess, workdir: Path, i: int, pod: str) -> None:
        namespace, name = pod.split("/")
        ready = workdir / f"agent-{i}.ready.json"
        ready.unlink(missing_ok=True)
        log = open(workdir / f"agent-{i}.log", "wb")  # noqa: SIM115
        self.agents.append(subprocess.Popen(
            [sys.executable, "-m", "podterm", "agent", "--echo", "--gateway", gw.url,
             "--token-file", str(self.agent_token_file), "--namespace", namespace,
             "--pod", name, "--ready-file", str(ready), "--log-level", "warning"],
            env=C.child_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            cwd=str(C.ROOT)))
        log.close()
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.agents[-1].poll() is not None or time.monotonic() > deadline:
                tail = (workdir / f"agent-{i}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"echo agent {pod} did not register: {tail}")
            time.sleep(0.05)  # polling a file the agent writes once registered

    def memory(self, tree: GatewayTree) -> C.TreeMemory:
        """The upstream's own memory: the shells (local) or the agent processes."""
        if self.kind == "local":
            tree.gw.children()  # remembered for cleanup
            return C.tree_memory(tree.shell_pids())
        return C.tree_memory(a.pid for a in self.agents if a.poll() is None)

    def stop(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.terminate()
        for agent in self.agents:
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


class GatewayTree:
    """The gateway's processes: itself, or with ``--workers N`` its supervisor and workers.

    RSS, CPU, descriptors and time spent waiting for a CPU are summed over
    them; the upstream's shells (local) are the workers' children.
    """

    def __init__(self, gw: C.GatewayProcess, workers: int) -> None:
        self.gw = gw
        self.workers = workers

    def worker_pids(self) -> list[int]:
        return C.children_of(self.gw.pid) if self.workers > 1 else [self.gw.pid]

    def pids(self) -> list[int]:
        return [self.gw.pid, *self.worker_pids()] if self.workers > 1 else [self.gw.pid]

    def shell_pids(self) -> list[int]:
        return [kid for pid in self.worker_pids() for kid in C.children_of(pid)]

    def rss(self) -> int:
        return sum(C.rss_bytes(pid) for pid in self.pids())

    def cpu(self) -> float:
        return sum(C.cpu_seconds(pid) for pid in self.pids())

    def sched_wait(self) -> float:
        return sum(C.sched_wait_seconds(pid) for pid in self.pids())

    def fds(self) -> list[int]:
        """Open descriptors of each worker (one entry without workers)."""
        return [open_fds(pid) for pid in self.worker_pids()]


#: Streams one echo agent accepts (docs/agent.md: 4,096; its RESUME must fit 1 MiB).
AGENT_STREAMS = 4000


def make_upstream(kind: str, workdir: Path, sessions: int, workers: int = 1) -> Upstream:
    """Gateway flags/env for the sessions' upstream; raises SystemExit if unavailable."""
    if kind == "local":
        return Upstream("local")
    if kind != "agent":
        raise SystemExit(f"capacity: unknown upstream {kind!r}")
    if not (C.SRC / "podterm" / "agent" / "echo.py").exists():
        raise SystemExit("capacity: --upstream agent needs the echo agent "
                         "(`podterm agent --echo`, src/podterm/agent/echo.py)")
    # Agents authenticate as members of podterm:agents (docs/agent.md); the
    # benchmark itself uses the admin token.
    agent_token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    admin_token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    tokens = workdir / "tokens.csv"
    tokens.write_text(f'{agent_token},bench-agent,bench-agent,"podterm:agents"\n')
    token_file = workdir / "agent.token"
    token_file.write_text(agent_token + "\n")
    per_worker_agents = max(1, math.ceil(sessions / workers / AGENT_STREAMS))
    n_agents = per_worker_agents * workers
    return Upstream("agent", gateway_args=["--token-file", str(tokens)],
                    gateway_env={"PODTERM_ADMIN_TOKEN": admin_token},
                    pods=[f"loadtest/echo-{i}" for i in range(n_agents)],
                    agent_token_file=token_file)


# ------------------------------------------------------------- load generators


class LoadGenProc:
    """One ``loadgen.py`` subprocess, spoken to with JSON lines."""

    def __init__(self, index: int, gw: C.GatewayProcess, source: str, ns: argparse.Namespace,
                 workdir: Path, pods: list[str]) -> None:
        self.index = index
        self.source = source
        self.sessions = 0
        args = [sys.executable, str(HERE / "loadgen.py"), "--url", gw.url, f"--token={gw.token}",
                "--source", source, "--upstream", ns.upstream, "--seed", str(index + 1),
                "--concurrency", str(ns.concurrency)]
        if ns.shell:
            args += ["--shell", ns.shell]
        if pods:
            args += ["--pods", ",".join(pods)]
        self.log_path = workdir / f"loadgen-{index}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, env=C.child_env(), cwd=str(C.ROOT))
        log.close()

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"load generator {self.index} exited: {err}")
        return json.loads(line)

    def stop(self) -> None:
        """Ask it to close its sessions and exit (it may first finish a command in flight)."""
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "close"})
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def broadcast(gens: list[LoadGenProc], msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send each generator its message, then collect the answers (they run concurrently)."""
    for gen, msg in zip(gens, msgs, strict=True):
        gen.send(msg)
    return [gen.recv() for gen in gens]


# ------------------------------------------------------------------ metrics


def metrics_text(url: str) -> str:
    """``/metrics`` (public, Prometheus text); "" on failure."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:  # noqa: S310 - loopback
            return str(resp.read().decode())
    except OSError:
        return ""


def scrape_metrics(url: str) -> dict[str, float]:
    """``/metrics`` as ``{name{labels}: value}``, workers summed; {} on failure."""
    out: dict[str, float] = {}
    for line in metrics_text(url).splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        # --workers: every worker's series carries worker="i"; add them up
        # (the largest for a maximum), as one gateway.
        name = _WORKER_LABEL.sub("", name).replace("{}", "")
        if name in out:
            number = max(out[name], number) if "_max" in name else out[name] + number
        out[name] = number
    return out


_WORKER_LABEL = re.compile(r'(?<=\{)worker="\d+",?|,worker="\d+"')


def per_worker(url: str, name: str) -> dict[int, float]:
    """One metric's value per worker (``{0: value}`` for a gateway without workers)."""
    out: dict[int, float] = {}
    for line in metrics_text(url).splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            m = re.search(r'worker="(\d+)"', key)
            index = int(m.group(1)) if m else 0
            out[index] = out.get(index, 0.0) + float(value)
    return out


_GC_SAMPLE = re.compile(r'podterm_gc_pause_(cpu_)?(seconds_bucket|seconds_sum|seconds_count|'
                        r'max_seconds)\{generation="(\d)"(?:,le="([^"]+)")?\}')
_GC_PROFILE = re.compile(r'podterm_gc_profile_info\{profile="([^"]+)"\}')
_GC_OLD = re.compile(r'podterm_gc_collector_steps_total\{kind="([^"]+)"\}')


def gc_pauses(metrics: dict[str, float]) -> dict[str, Any] | None:
    """The gateway's GC pause metrics, per generation; None if it exports none.

    ``{"profile": name, "generations": {"0": {"count", "sum_s", "max_s",
    "buckets": {le: cumulative count}}, ...}, "cpu_generations": {...},
    "idle_collector": {kind: n}}``: ``cpu_generations`` are the same for the
    CPU time the collector used (``podterm_gc_pause_cpu_seconds``).
    """
    gens: dict[str, dict[str, Any]] = {}
    cpu_gens: dict[str, dict[str, Any]] = {}
    profile = None
    old: dict[str, int] = {}
    for key, value in metrics.items():
        m = _GC_SAMPLE.fullmatch(key)
        if m is not None:
            cpu, kind, gen, le = m.groups()
            g = (cpu_gens if cpu else gens).setdefault(
                gen, {"count": 0, "sum_s": 0.0, "max_s": 0.0, "buckets": {}})
            if kind == "seconds_bucket":
                g["buckets"][le] = value
            elif kind == "seconds_sum":
                g["sum_s"] = value
            elif kind == "seconds_count":
                g["count"] = int(value)
            else:
                g["max_s"] = value
            continue
        m = _GC_PROFILE.fullmatch(key)
        if m is not None:
            profile = m.group(1)
            continue
        m = _GC_OLD.fullmatch(key)
        if m is not None:
            old[m.group(1)] = int(value)
    if not gens:
        return None
    return {"profile": profile, "generations": dict(sorted(gens.items())),
            "cpu_generations": dict(sorted(cpu_gens.items())), "idle_collector": old or None}


def gc_delta(before: dict[str, Any] | None, after: dict[str, Any] | None
             ) -> dict[str, Any] | None:
    """Collections between two scrapes, and the bucket their worst pause falls in.

    ``worst_le_s`` is the smallest bucket bound that holds every pause of the
    window (``inf``: one took longer than the last bound); 0 with no pause.
    ``worst_cpu_le_s`` is the same for the CPU time the collector used.
    """
    if after is None:
        return None
    out: dict[str, Any] = {"collections": {}, "total_s": 0.0, "worst_le_s": 0.0,
                           "worst_cpu_le_s": math.nan}
    for key, worst in (("generations", "worst_le_s"), ("cpu_generations", "worst_cpu_le_s")):
        if not after.get(key):
            continue
        out[worst] = 0.0
        for gen, now in after[key].items():
            prev = (before or {}).get(key, {}).get(
                gen, {"count": 0, "sum_s": 0.0, "buckets": {}})
            count = now["count"] - prev["count"]
            if key == "generations":
                out["collections"][gen] = count
                out["total_s"] += now["sum_s"] - prev["sum_s"]
            if count <= 0:
                continue
            bounds = sorted(((math.inf if le == "+Inf" else float(le)), n)
                            for le, n in now["buckets"].items())
            for bound, n in bounds:
                if n - prev["buckets"].get(_le_key(bound), 0) >= count:
                    out[worst] = max(out[worst], bound)
                    break
    return out


def _le_key(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def fmt_le(seconds: float) -> str:
    """A bucket bound as the worst pause: "<= 2.00 ms", "> 1 s", "none"."""
    if seconds == 0:
        return "none"
    if math.isnan(seconds):
        return "n/a"
    if math.isinf(seconds):
        return "> 1 s"
    return f"<= {C.fmt_ms(seconds)}"


def read_tracemalloc(gw: C.GatewayProcess, env: dict[str, str], sessions: int
                     ) -> dict[str, Any] | None:
    """Stop the gateway's allocation trace; the live allocations by line, per session."""
    path = Path(env["BENCH_TRACEMALLOC"])
    path.unlink(missing_ok=True)
    os.kill(gw.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not path.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)  # the gateway writes the snapshot from its signal handler
    doc = json.loads(path.read_text())
    per = max(1, sessions)
    return {"sessions": sessions, "total_bytes": doc["total"],
            "bytes_per_session": doc["total"] / per,
            "top": [{"where": w, "bytes_per_session": size / per, "objects_per_session": n / per}
                    for w, size, n in doc["top"]],
            "ours": [{"where": w, "bytes_per_session": size / per, "objects_per_session": n / per}
                     for w, size, n in doc.get("ours", [])]}


def _cpu_or_nan(pid: int) -> float:
    try:
        return C.cpu_seconds(pid)
    except OSError:
        return math.nan


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# --------------------------------------------------------------------- run


def default_steps(total: int) -> list[int]:
    steps = []
    n = total
    while n >= max(10, total // 16):
        steps.append(n)
        n //= 2
    return sorted(set(steps))


def run(ns: argparse.Namespace) -> dict[str, Any]:
    steps = ([int(s) for s in ns.steps.split(",")] if ns.steps else default_steps(ns.sessions))
    steps = sorted(set(min(s, ns.sessions) for s in steps))
    per_gen_max = math.ceil(steps[-1] / ns.loadgens)
    if per_gen_max > FD_BUDGET:
        raise SystemExit(f"capacity: {per_gen_max} sessions per load generator exceeds the "
                         f"{FD_BUDGET} fd budget; use more --loadgens")
    C.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="podterm-capacity-"))
    if ns.workers > 1 and (ns.tracemalloc or ns.gc_trace or ns.profile):
        raise SystemExit("capacity: --tracemalloc, --gc-trace and --profile need one worker")
    upstream = make_upstream(ns.upstream, workdir, steps[-1], ns.workers)
    env = {"PODTERM_MAX_SESSIONS": str(steps[-1] + 100), "PODTERM_MAX_SESSIONS_PER_USER": "0",
           "PODTERM_MAX_CONNECTIONS_PER_IP": "0", **upstream.gateway_env}
    if ns.gc_trace or ns.tracemalloc:
        env.update(C.gc_trace_env(workdir, gc_trace=ns.gc_trace, tracemalloc=ns.tracemalloc))
    C.progress(f"starting the gateway and {ns.loadgens} load generators "
               f"(steps {', '.join(map(str, steps))})")
    gc_args = ["--gc-profile", ns.gc_profile] if ns.gc_profile else []
    worker_args = ["--workers", str(ns.workers)] if ns.workers > 1 else []
    if ns.store:
        worker_args += ["--store", ns.store]
    gw = C.start_gateway(args=["--drain-timeout", "3s", *gc_args, *worker_args,
                               *upstream.gateway_args], env=env, workdir=workdir)
    tree = GatewayTree(gw, ns.workers)
    gens: list[LoadGenProc] = []
    result: dict[str, Any] = {"steps": []}
    try:
        upstream.start(gw, workdir, ns.workers)
        sources = C.source_addresses(ns.loadgens)
        gens = [LoadGenProc(i, gw, src, ns, workdir, upstream.pods)
                for i, src in enumerate(sources)]
        for gen in gens:
            gen.recv()  # {"ready": true}
        # Warm-up: one session per generator, so that lazily imported code and
        # first-use allocations are in the baseline, not charged to sessions.
        broadcast(gens, [{"cmd": "open", "count": 1}] * len(gens))
        broadcast(gens, [{"cmd": "echo_all", "timeout": 10}] * len(gens))
        for gen in gens:
            gen.sessions = 1
        warm = len(gens)
        time.sleep(0.5)  # the gateway settles before RSS is read
        base_rss = tree.rss()
        base_fds = sum(tree.fds())
        result["baseline"] = {"gateway_rss": base_rss, "sessions": warm, "fds": base_fds}
        if ns.tracemalloc:
            os.kill(gw.pid, signal.SIGUSR2)  # start tracing: what sessions allocate from here
        C.progress(f"baseline: gateway RSS {C.fmt_bytes(base_rss)} with {warm} warm-up sessions")
        for target in steps:
            missing = max(0, target - sum(g.sessions for g in gens))
            shares = [missing // len(gens) + (1 if i < missing % len(gens) else 0)
                      for i in range(len(gens))]
            C.progress(f"step {target}: opening {missing} sessions")
            t0 = time.perf_counter()
            cpu0 = tree.cpu()
            answers = broadcast(gens, [{"cmd": "open", "count": k} for k in shares])
            open_s = time.perf_counter() - t0
            open_cpu = tree.cpu() - cpu0
            opened = sum(a["opened"] for a in answers)
            failed = sum(a["failed"] for a in answers)
            for gen, answer in zip(gens, answers, strict=True):
                gen.sessions = answer["total"]
                for err in answer.get("errors", []):
                    C.progress(f"  load generator {gen.index}: {err}")
            live = sum(g.sessions for g in gens)
            if ns.tracemalloc and target == steps[-1]:
                result["tracemalloc"] = read_tracemalloc(gw, env, live - warm)
            time.sleep(1.0)  # the shells finish starting before memory is read
            rss = tree.rss()
            shells = upstream.memory(tree)
            worker_fds = tree.fds()
            fds = sum(worker_fds)
            held = per_worker(gw.url, "podterm_sessions")
            C.progress(f"  {opened} opened ({failed} failed) in {open_s:.1f} s; gateway RSS "
                       f"{C.fmt_bytes(rss)}, {shells.processes} upstream processes "
                       f"({C.fmt_bytes(shells.rss)}), {fds} fds")
            # Idle cost first (heartbeats, timers, the lag probe), so that the
            # CPU per keystroke can be given net of it.
            cpu0, t0 = tree.cpu(), time.perf_counter()
            time.sleep(ns.idle_measure)  # measuring an idle gateway is waiting
            idle_cpu_rate = (tree.cpu() - cpu0) / (time.perf_counter() - t0)
            metrics0 = scrape_metrics(gw.url)
            gc0 = C.read_gc_trace(env)
            spy = None
            if ns.profile and target == steps[-1]:
                C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                profile_path = C.RESULTS_DIR / "capacity-profile.txt"
                spy = C.start_pyspy(gw.pid, profile_path, ns.measure)
            cpu0, wait0, wall0 = tree.cpu(), tree.sched_wait(), time.time()
            # The rest of the machine's CPU in the same window: the load
            # generators' and the echo agents' (all on the same cores).
            harness = [g.proc.pid for g in gens] + [a.pid for a in upstream.agents]
            harness0 = {pid: _cpu_or_nan(pid) for pid in harness}
            t0 = time.perf_counter()
            answers = broadcast(gens, [{"cmd": "type", "fraction": ns.typing_fraction,
                                        "seconds": ns.measure,
                                        "keys_per_s": ns.keys_per_s}] * len(gens))
            type_s = time.perf_counter() - t0
            type_cpu = tree.cpu() - cpu0
            gens_cpu = sum(_cpu_or_nan(g.proc.pid) - harness0[g.proc.pid] for g in gens)
            agents_cpu = sum(_cpu_or_nan(a.pid) - harness0[a.pid] for a in upstream.agents)
            sched_wait = tree.sched_wait() - wait0
            wall1 = time.time()
            metrics1 = scrape_metrics(gw.url)
            time.sleep(0.6)  # the GC trace file is rewritten at most every 0.5 s
            gc_seen = C.gc_window(gc0, C.read_gc_trace(env), wall0, wall1)
            if spy is not None:
                spy.wait(60)
                result["profile"] = C.summarize_profile(profile_path)
            rtts = [t for a in answers for t in a["rtts"]]
            keys = sum(a["keys"] for a in answers)
            lat = C.percentiles(rtts)
            step: dict[str, Any] = {
                "sessions": live,
                "opened": opened, "failed": failed, "open_seconds": open_s,
                "opened_per_s": opened / open_s if open_s else math.nan,
                "gateway_cpu_open_s": open_cpu,
                "gateway_rss": rss,
                "gateway_rss_per_session": (rss - base_rss) / max(1, live - warm),
                "gateway_fds": fds,
                "workers": ns.workers,
                "worker_fds": worker_fds,
                "worker_sessions": {str(k): v for k, v in sorted(held.items())},
                "shells": {"processes": shells.processes, "rss_sum": shells.rss,
                           "pss_sum": shells.pss},
                "typists": sum(a["typists"] for a in answers),
                "keys": keys,
                "echoed": sum(a["echoed"] for a in answers),
                "skipped": sum(a["skipped"] for a in answers),
                "type_seconds": type_s,
                "gateway_cpu_type_s": type_cpu,
                "gateway_idle_cpu_share": idle_cpu_rate,
                "gateway_sched_wait_share": sched_wait / type_s,
                # CPU shares of the typing window (1.0 = one core busy all along).
                "cpu_share_gateway": type_cpu / type_s,
                "cpu_share_load_generators": gens_cpu / type_s,
                "cpu_share_agents": agents_cpu / type_s,
                "cpu_ms_per_1000_keys": type_cpu / keys * 1e6 if keys else math.nan,
                "net_cpu_ms_per_1000_keys": (type_cpu - idle_cpu_rate * type_s) / keys * 1e6
                if keys else math.nan,
                "gc_trace": gc_seen,
                "latency": lat,
                "loop_lag_max_s": metrics1.get("podterm_event_loop_lag_max_seconds", math.nan),
                "gc": gc_pauses(metrics1),
                "gc_typing": gc_delta(gc_pauses(metrics0), gc_pauses(metrics1)),
                "reader_errors": sum(a.get("reader_errors", 0) for a in answers),
            }
            result["steps"].append(step)
            C.progress(f"  typing: {keys} keys from {step['typists']} sessions; RTT p50 "
                       f"{C.fmt_ms(lat['p50'])} p99 {C.fmt_ms(lat['p99'])} p99.9 "
                       f"{C.fmt_ms(lat['p99.9'])}; {step['cpu_ms_per_1000_keys']:.0f} ms CPU "
                       f"per 1,000 keys ({step['net_cpu_ms_per_1000_keys']:.0f} net of idle); "
                       f"gateway waited for a CPU {step['gateway_sched_wait_share']:.0%} of the "
                       f"time; CPU in cores: gateway {step['cpu_share_gateway']:.2f}, load "
                       f"generators {step['cpu_share_load_generators']:.2f}, agents "
                       f"{step['cpu_share_agents']:.2f}")
        C.progress(f"echo check: every one of {sum(g.sessions for g in gens)} sessions types "
                   "one key")
        answers = broadcast(gens, [{"cmd": "echo_all", "timeout": ns.echo_timeout}] * len(gens))
        echo_rtts = [t for a in answers for t in a["rtts"]]
        result["echo_all"] = {"echoed": sum(a["echoed"] for a in answers),
                              "total": sum(a["total"] for a in answers),
                              "latency": C.percentiles(echo_rtts)}
        C.progress(f"  {result['echo_all']['echoed']} of {result['echo_all']['total']} echoed")
        result["gc_final"] = gc_pauses(scrape_metrics(gw.url))
    finally:
        for gen in gens:
            gen.stop()
        upstream.stop()
        status = gw.stop()
        result["gateway_exit"] = status
        if ns.keep_logs:
            C.progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


# ------------------------------------------------------------------ report


def report(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    has_gc = any(s.get("gc_typing") for s in result["steps"])
    has_trace = any(s.get("gc_trace") for s in result["steps"])
    shells_label = "shells RSS (PSS)" if ns.upstream == "local" else "agents RSS (PSS)"
    headers = ["sessions", "opened/s", "gateway RSS", "RSS/session", shells_label,
               "typing", "keys", "RTT p50", "RTT p99", "RTT p99.9", "CPU ms/1k keys (net)",
               "gateway idle CPU", "waited for CPU", "cores: gateway/loadgens/agents",
               "loop lag max"]
    if has_trace:
        headers += ["GC runs 0/1/2", "GC max pause"]
    if has_gc:
        headers += ["GC runs 0/1/2 typing", "worst GC pause typing (its CPU)",
                    "GC max since start"]
    rows = []
    for s in result["steps"]:
        lat = s["latency"]
        shells = s["shells"]
        row = [f"{s['sessions']:,}", C.fmt_num(s["opened_per_s"], 0), C.fmt_bytes(s["gateway_rss"]),
               C.fmt_bytes(s["gateway_rss_per_session"]),
               f"{C.fmt_bytes(shells['rss_sum'])} ({C.fmt_bytes(shells['pss_sum'])})",
               f"{s['typists']:,}", f"{s['keys']:,}", C.fmt_ms(lat["p50"]), C.fmt_ms(lat["p99"]),
               C.fmt_ms(lat["p99.9"]),
               f"{C.fmt_num(s['cpu_ms_per_1000_keys'], 0)} "
               f"({C.fmt_num(s['net_cpu_ms_per_1000_keys'], 0)})",
               f"{s['gateway_idle_cpu_share']:.1%}", f"{s['gateway_sched_wait_share']:.0%}",
               "/".join(f"{s.get(k, math.nan):.2f}" for k in (
                   "cpu_share_gateway", "cpu_share_load_generators", "cpu_share_agents")),
               C.fmt_ms(s["loop_lag_max_s"])]
        if has_trace:
            trace = s.get("gc_trace") or {}
            runs = trace.get("collections", {})
            row += ["/".join(str(runs.get(g, 0)) for g in ("0", "1", "2")),
                    C.fmt_ms(trace.get("max_pause_s", math.nan))]
        if has_gc:
            typing = s.get("gc_typing") or {}
            runs = typing.get("collections", {})
            worst = max((g["max_s"] for g in (s.get("gc") or {}).get("generations", {})
                         .values()), default=math.nan)
            row += ["/".join(str(runs.get(g, 0)) for g in ("0", "1", "2")),
                    f"{fmt_le(typing.get('worst_le_s', math.nan))} "
                    f"({fmt_le(typing.get('worst_cpu_le_s', math.nan))})", C.fmt_ms(worst)]
        rows.append(row)
    echo = result.get("echo_all", {})
    what = (f"{ns.shell or 'default shell'} login shells in PTYs" if ns.upstream == "local"
            else "podterm agent --echo")
    text = (f"Capacity: {ns.upstream} upstream ({what}), {ns.loadgens} load generators, "
            f"{ns.typing_fraction:.0%} of sessions typing "
            f"{ns.keys_per_s:g} keys/s for {ns.measure:g} s per step\n\n"
            + C.table(headers, rows)
            + f"\n\nEcho check at {echo.get('total', 0):,} sessions: {echo.get('echoed', 0):,} "
            f"echoed (p99 {C.fmt_ms(echo.get('latency', {}).get('p99', math.nan))})")
    last = result["steps"][-1] if result["steps"] else {}
    if last.get("workers", 1) > 1:
        held = ", ".join(f"worker {k}: {int(v):,}" for k, v in last["worker_sessions"].items())
        text += (f"\n\n{last['workers']} workers at {last['sessions']:,} sessions: sessions "
                 f"held {held}; descriptors per worker "
                 f"{', '.join(f'{n:,}' for n in last['worker_fds'])}")
    final = result.get("gc_final")
    if final:
        cpu = final.get("cpu_generations") or {}
        text += (f"\nGC profile {final['profile']}: worst pause since start "
                 + ", ".join(f"gen {g} {C.fmt_ms(v['max_s'])} "
                             f"(CPU {C.fmt_ms(cpu.get(g, {}).get('max_s', math.nan))}; "
                             f"{v['count']:,} runs)"
                             for g, v in final["generations"].items())
                 + (f"; idle collector: {final['idle_collector']}"
                    if final.get("idle_collector") else ""))
    elif not has_gc:
        text += "\nGC pauses: not exported by the gateway's /metrics (omitted)."
    tm = result.get("tracemalloc")
    if tm:
        rows = [[t["where"], C.fmt_num(t["bytes_per_session"]), C.fmt_num(t["objects_per_session"], 1)]
                for t in tm["top"][:20]]
        text += (f"\n\nPython allocations live per session (tracemalloc, {tm['sessions']:,} sessions "
                 f"opened after the baseline): {C.fmt_bytes(tm['bytes_per_session'])} per session "
                 "in all\n\n" + C.table(["allocated at", "bytes/session", "blocks/session"],
                                          rows, "lrr"))
        if tm.get("ours"):
            rows = [[t["where"], C.fmt_num(t["bytes_per_session"]),
                     C.fmt_num(t["objects_per_session"], 1)] for t in tm["ours"][:25]]
            text += ("\n\nThe same, charged to the innermost podterm line that led to each "
                     "allocation\n\n" + C.table(["podterm line", "bytes/session",
                                                    "blocks/session"], rows, "lrr"))
    prof = result.get("profile")
    if prof and prof.get("samples"):
        rows = [[name, f"{share:.1%}"] for name, share in prof["self"][:15]]
        text += (f"\n\nGateway profile while typing at the last step (py-spy, "
                 f"{prof['samples']} samples): self time\n\n"
                 + C.table(["function (file)", "share"], rows, "lr"))
    print(text)
    return text


def plot_title(ns: argparse.Namespace) -> str:
    what = f"{Path(ns.shell).name} in PTYs" if ns.upstream == "local" else "podterm agent --echo"
    return (f"podterm keystroke round trip, {ns.upstream} upstream ({what}), 1 worker\n"
            f"{ns.typing_fraction:.0%} of sessions typing {ns.keys_per_s:g} keys/s")


def plot(result: dict[str, Any], path: Path, title: str) -> Path | None:
    """Keystroke latency against concurrent sessions (PNG); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        C.progress("matplotlib is not installed (pip install '.[bench]'): no plot")
        return None
    steps = result["steps"]
    x = [s["sessions"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, style in (("p50", "o-"), ("p99", "s-"), ("p99.9", "^-")):
        ax.plot(x, [s["latency"][key] * 1e3 for s in steps], style, label=key)
    ax.set_xlabel("concurrent attached sessions")
    ax.set_ylabel("keystroke round trip (ms)")
    ax.set_title(title, fontsize=10)
    ax.axhline(5.0, color="grey", linestyle="--", linewidth=1)
    ax.annotate("issue 9: p99 < 5 ms (at 10,000 sessions)", (x[0], 5.0), fontsize=8,
                color="grey", xytext=(0, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:,}" for v in x])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    C.cleanup_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sessions", type=int, default=2000, help="sessions at the last step (2000)")
    p.add_argument("--steps", help="comma-separated session counts (default: halvings)")
    p.add_argument("--loadgens", type=int, default=4, help="load-generator processes (4)")
    p.add_argument("--concurrency", type=int, default=16, help="opens at once per generator")
    p.add_argument("--typing-fraction", type=float, default=0.1, help="share typing (0.1)")
    p.add_argument("--keys-per-s", type=float, default=10.0, help="per typing session (10)")
    p.add_argument("--measure", type=float, default=10.0, help="typing seconds per step (10)")
    p.add_argument("--echo-timeout", type=float, default=60.0, help="bound on the echo check")
    p.add_argument("--upstream", default="local", choices=["local", "agent"])
    p.add_argument("--workers", type=int, default=1,
                   help="gateway worker processes (podterm serve --workers N; default 1)")
    p.add_argument("--store", default="",
                   help="the gateway's --store (default: its own; with workers, a private "
                        "SQLite file); e.g. redis://127.0.0.1:6379/0 of a server you started")
    p.add_argument("--shell", default="/bin/sh",
                   help="login shell of the local upstream (/bin/sh; /bin/bash loads its "
                   "completion scripts at start, ~0.3 s of CPU per session)")
    p.add_argument("--idle-measure", type=float, default=3.0,
                   help="seconds of idle gateway CPU measured per step (3)")
    p.add_argument("--gc-profile",
                   help="the gateway's --gc-profile; a comma-separated list (or 'all': "
                        f"{','.join(GC_PROFILES)}) runs once per profile and compares them")
    p.add_argument("--gc-trace", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the gateway's GC with the benchmark's own gc.callbacks "
                        "hook (exact pauses >= 1 ms; it writes a file from inside the "
                        "collector, so it adds to the pauses; default off: /metrics has them)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the gateway while the last step types")
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace the gateway's allocations from the baseline to the last step "
                        "(slows it and inflates RSS: a separate run for the per-session breakdown)")
    p.add_argument("--plot", help="PNG path (default bench/results/capacity-latency.png)")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CI smoke size: 8 sessions, 1 s")
    p.add_argument("--out", help="JSON path (default bench/results/capacity-<time>.json)")
    ns = p.parse_args(argv)
    if ns.tiny:
        ns.sessions, ns.steps, ns.loadgens, ns.measure = 8, "4,8", 2, 1.0
        ns.idle_measure = 0.3
        ns.typing_fraction, ns.echo_timeout = 0.5, 20.0
    if ns.loadgens < 1 or ns.loadgens > 200:
        p.error("--loadgens must be 1..200")
    profiles = parse_gc_profiles(ns.gc_profile)
    if profiles is None:
        p.error(f"--gc-profile: a comma-separated list of {', '.join(GC_PROFILES)}, or all")
    if len(profiles) > 1:
        return compare_gc_profiles(ns, profiles, argv)
    ns.gc_profile = profiles[0] if profiles else None
    result = run(ns)
    print()
    text = report(ns, result)
    plot_path = Path(ns.plot) if ns.plot else C.RESULTS_DIR / "capacity-latency.png"
    drawn = plot(result, plot_path, plot_title(ns))
    if drawn:
        C.progress(f"plot: {drawn}")
    # The raw round trips are summarized; keep the JSON small.
    command = "bench/capacity/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = C.write_result("capacity", C.clean_nan({
        "command": command.strip(), "config": vars(ns), "plot": str(drawn) if drawn else None,
        **result, "report": text}), ns.out)
    C.progress(f"wrote {path}")
    ok = result.get("echo_all", {}).get("echoed") == result.get("echo_all", {}).get("total")
    return 0 if ok else 1


def parse_gc_profiles(value: str | None) -> list[str] | None:
    """``--gc-profile``: [] when not given, the names in order, None if one is unknown."""
    if not value:
        return []
    names = list(GC_PROFILES) if value == "all" else [v.strip() for v in value.split(",")]
    if not names or any(n not in GC_PROFILES for n in names):
        return None
    return list(dict.fromkeys(names))


def profile_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The last step of one profile's run, with its GC pauses (for the comparison)."""
    last = result["steps"][-1]
    typing = last.get("gc_typing") or {}
    final = result.get("gc_final") or {}
    gens = final.get("generations", {})
    return {
        "sessions": last["sessions"], "keys": last["keys"], "latency": last["latency"],
        "gc_typing_collections": typing.get("collections"),
        "gc_typing_worst_le_s": typing.get("worst_le_s", math.nan),
        "gc_typing_worst_cpu_le_s": typing.get("worst_cpu_le_s", math.nan),
        "gc_typing_total_s": typing.get("total_s", math.nan),
        "gc_max_s": max((g["max_s"] for g in gens.values()), default=math.nan),
        "gc_runs": {k: g["count"] for k, g in gens.items()},
        "gateway_rss_per_session": last["gateway_rss_per_session"],
        "gateway_rss": last["gateway_rss"],
        "loop_lag_max_s": last["loop_lag_max_s"],
        "cpu_ms_per_1000_keys": last["cpu_ms_per_1000_keys"],
        "echo_all": result.get("echo_all"),
    }


def compare_report(ns: argparse.Namespace, summaries: dict[str, dict[str, Any]]) -> str:
    headers = ["GC profile", "sessions", "keys", "RTT p50", "RTT p99", "RTT p99.9",
               "GC runs 0/1/2 typing", "worst GC pause typing (its CPU)", "worst GC pause (run)",
               "GC runs 0/1/2 (run)", "RSS/session", "loop lag max", "CPU ms/1k keys"]
    rows = []
    for name, s in summaries.items():
        lat = s["latency"]
        typing = s["gc_typing_collections"] or {}
        runs = s["gc_runs"] or {}
        rows.append([name, f"{s['sessions']:,}", f"{s['keys']:,}", C.fmt_ms(lat["p50"]),
                     C.fmt_ms(lat["p99"]), C.fmt_ms(lat["p99.9"]),
                     "/".join(str(typing.get(g, 0)) for g in ("0", "1", "2")),
                     f"{fmt_le(s['gc_typing_worst_le_s'])} "
                     f"({fmt_le(s.get('gc_typing_worst_cpu_le_s', math.nan))})",
                     C.fmt_ms(s["gc_max_s"]),
                     "/".join(f"{runs.get(g, 0):,}" for g in ("0", "1", "2")),
                     C.fmt_bytes(s["gateway_rss_per_session"]), C.fmt_ms(s["loop_lag_max_s"]),
                     C.fmt_num(s["cpu_ms_per_1000_keys"], 0)])
    text = (f"GC profiles compared at {rows[0][1] if rows else 0} sessions ({ns.upstream} "
            f"upstream), {ns.typing_fraction:.0%} typing {ns.keys_per_s:g} keys/s for "
            f"{ns.measure:g} s; one gateway per profile, run one after another\n\n"
            + C.table(headers, rows))
    print(text)
    return text


def compare_gc_profiles(ns: argparse.Namespace, profiles: list[str],
                        argv: list[str] | None) -> int:
    """Run the benchmark once per GC profile and compare them (no plot)."""
    results: dict[str, dict[str, Any]] = {}
    for name in profiles:
        ns.gc_profile = name
        C.progress(f"=== GC profile {name} ===")
        results[name] = run(ns)
        print()
        results[name]["report"] = report(ns, results[name])
        print()
    summaries = {name: profile_summary(r) for name, r in results.items()}
    text = compare_report(ns, summaries)
    command = "bench/capacity/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ns.gc_profile = ",".join(profiles)
    path = C.write_result("capacity", C.clean_nan({
        "command": command.strip(), "config": vars(ns), "plot": None,
        "profiles": results, "comparison": summaries, "report": text}), ns.out)
    C.progress(f"wrote {path}")
    ok = all(r.get("echo_all", {}).get("echoed") == r.get("echo_all", {}).get("total")
             for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
