"""Relay benchmark: podterm against a raw trio TCP relay and a trio-websocket relay, same run.

Two workloads (issue 9, "relay"), each run through three servers that do the
same byte movement between a client and a local process:

* **bulk** — one session whose process is ``cat`` of a large file (pipes,
  not a PTY, unless ``--bulk-tty``); the client reads as fast as it can
  (podterm: ACKing every read, as docs/protocol.md §6 allows).  MB/s of
  payload from connect to the last byte.
* **small** — ``--sessions`` sessions (default 100) each running
  ``sh -c 'stty raw -echo && printf R && exec cat'`` in a PTY; each client
  sends a keystroke-sized STDIN (``--frame-bytes``, default 1) and waits for
  its echo, again and again.  msg/s = completed round trips per second over
  all sessions (one message each way per round trip); RTT percentiles too.

Contenders:

==============  ============================================================
podterm         the gateway (``python -m podterm serve``), local upstream, REST
                create + podterm.v1 attach; 1 worker
raw-relay       trio TCP server, per connection the same command; one task per
                direction, ``receive_some(64 KiB)`` → ``send_all``
tws-relay       trio-websocket ``serve_websocket`` (library defaults), the same
raw-echo        (small only, context) trio TCP echo, no process
tws-echo        (small only, context) trio-websocket echo, no process
==============  ============================================================

Every server is its own process; the clients run in this process and use the
same lean WebSocket client (podterm's native codec) against podterm and
trio-websocket, so the servers are what differs.  Rounds are interleaved
(``--repeats``, median reported) and each round records the server process's
CPU time, so rates are also given per server CPU-second: on a shared 2-core
machine that figure is the steadier one.

``--variants`` adds podterm gateways beside the plain one: ``rec`` (recording
and audit log on), ``tls``, ``win`` (a 1 MiB flow-control window instead of
256 KiB: what the window costs when the ACK round trip is slow).

``--baseline-src DIR`` adds ``podterm-base``: the plain gateway run from
another source tree (``PYTHONPATH=DIR``, e.g. a worktree of the commit
before a change), measured in the same interleaved rounds, so a change is
judged within one run rather than across runs of a noisy machine.

``--profile`` then runs podterm once more per workload under
``py-spy record`` (pip install py-spy) and prints where the gateway's CPU
time goes (self time by function, inclusive time by function).

Usage::

    .venv/bin/python bench/relay/run.py                   # 200 MB bulk, 100 sessions x 10 s, 3 rounds
    .venv/bin/python bench/relay/run.py --profile
    .venv/bin/python bench/relay/run.py --only small --baseline-src /tmp/old/src   # A/B
    .venv/bin/python bench/relay/run.py --tiny            # seconds: the CI smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

C.ensure_src_on_path()

SMALL_CMD = ["sh", "-c", "stty raw -echo && printf R && exec cat"]
HERE = Path(__file__).resolve().parent

#: Issue 9, "Done when": (workload, baseline, minimum podterm/baseline).
TARGETS = [("small", "raw-relay", 0.9), ("small", "tws-relay", 3.0),
           ("bulk", "raw-relay", 0.7), ("bulk", "tws-relay", 5.0)]


# ----------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    pid: int
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc is None:
            return
        kids = C.descendants_of(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in kids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


@dataclass
class Podterm:
    """One podterm gateway contender: plain, with recording + audit, or with TLS."""

    name: str
    gw: C.GatewayProcess
    ssl_context: Any = None
    rec_dir: Path | None = None
    http: C.HttpConn | None = None

    async def open_http(self) -> C.HttpConn:
        if self.http is None:
            self.http = await C.HttpConn.open("127.0.0.1", self.gw.port, self.gw.token,
                                              ssl_context=self.ssl_context)
        return self.http

    def clear_recordings(self) -> None:
        """Bulk recordings are as large as the file: remove them between rounds."""
        if self.rec_dir is not None:
            for f in self.rec_dir.iterdir():
                f.unlink(missing_ok=True)


def start_baselines(workdir: Path, specs: list[tuple[str, str, list[str], bool]]
                    ) -> dict[str, Server]:
    """Start baseline servers in parallel: ``(name, kind, cmd, tty)`` each."""
    procs = []
    for name, kind, cmd, tty in specs:
        port_file = workdir / f"{name}.port"
        args = [sys.executable, str(HERE / "baselines.py"), kind, "--port-file", str(port_file),
                "--cmd", json.dumps(cmd)] + (["--tty"] if tty else [])
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(args, env=C.child_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, cwd=str(C.ROOT))
        log.close()
        procs.append((name, proc, port_file))
    servers = {}
    for name, proc, port_file in procs:
        port = C.wait_port_file(port_file, proc)
        servers[name] = Server(name, proc.pid, port, proc)
    return servers


# ---------------------------------------------------------------- measuring


@dataclass
class Sample:
    """One contender's one round."""

    seconds: float
    units: float  # bytes (bulk) or round trips (small)
    server_cpu_s: float
    client_cpu_s: float
    rtts: list[float] = field(default_factory=list)
    process_cpu_s: float = float("nan")  # the relayed processes (cat), small frames only

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds else float("nan")

    @property
    def rate_per_cpu(self) -> float:
        return self.units / self.server_cpu_s if self.server_cpu_s else float("nan")


def _client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------- bulk


async def bulk_raw(port: int, nbytes: int) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = 0
    try:
        while got < nbytes:
            data = await stream.receive_some(262144)
            if not data:
                break
            got += len(data)
    finally:
        await trio.aclose_forcefully(stream)
    return got


async def bulk_tws(port: int, nbytes: int) -> int:
    ws = await C.ws_connect("127.0.0.1", port, "/bulk")
    got = 0
    try:
        while got < nbytes:
            for _op, payload in await ws.receive_batch():
                got += len(payload)
    finally:
        await trio.aclose_forcefully(ws.stream)
    return got


async def bulk_podterm(pt: Podterm, session: dict[str, Any], nbytes: int) -> int:
    link = await C.PtLink.attach("127.0.0.1", pt.gw.port, pt.gw.token, session,
                                 ssl_context=pt.ssl_context)
    try:
        while link.out < nbytes and not link.exited:
            await link.receive_output()
            # One ACK per read: the window never runs dry while we keep reading.
            frame = link.ack_frame(0.0, force=True)
            if frame and not link.exited:
                await link.send(frame)
        while not link.exited:
            await link.receive_output()
    except Exception as exc:
        raise RuntimeError(f"podterm bulk failed after {link.out} bytes "
                           f"({link.ws.closed}): {exc!r}") from exc
    finally:
        await link.aclose()
    return link.out


async def measure_bulk(name: str, server_pid: int, nbytes: int,
                       run: Callable[[], Awaitable[int]]) -> Sample:
    cpu0, ccpu0, t0 = C.cpu_seconds(server_pid), _client_cpu(), time.perf_counter()
    got = await run()
    t1 = time.perf_counter()
    if got < nbytes:
        raise RuntimeError(f"{name}: bulk ended after {got} of {nbytes} bytes")
    return Sample(t1 - t0, nbytes, C.cpu_seconds(server_pid) - cpu0, _client_cpu() - ccpu0)


# -------------------------------------------------------------------- small


class RawConn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    @classmethod
    async def open(cls, port: int, expect_ready: bool) -> RawConn:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = cls(stream)
        if expect_ready:
            await conn.read_exactly(1)  # the "R" printed once stty has run
        return conn

    async def read_exactly(self, n: int) -> None:
        got = 0
        while got < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise RuntimeError("raw: connection closed")
            got += len(data)

    async def roundtrip(self, msg: bytes) -> None:
        await self.stream.send_all(msg)
        await self.read_exactly(len(msg))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class WsConn:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, port: int, expect_ready: bool, seed: int) -> WsConn:
        conn = cls(await C.ws_connect("127.0.0.1", port, "/small", seed=seed))
        if expect_ready:
            await conn.read_exactly(1)
        return conn

    async def read_exactly(self, n: int) -> None:
        got = 0
        while got < n:
            for _op, payload in await self.ws.receive_batch():
                got += len(payload)

    async def roundtrip(self, msg: bytes) -> None:
        await self.ws.send_binary(msg)
        await self.read_exactly(len(msg))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.ws.stream)


class PtConn:
    def __init__(self, link: C.PtLink) -> None:
        self.link = link

    @classmethod
    async def open(cls, pt: Podterm, session: dict[str, Any], seed: int) -> PtConn:
        link = await C.PtLink.attach("127.0.0.1", pt.gw.port, pt.gw.token, session, seed=seed,
                                     ssl_context=pt.ssl_context)
        conn = cls(link)
        while link.out < 1:  # the "R": stty has run
            await link.receive_output()
        return conn

    async def roundtrip(self, msg: bytes) -> None:
        link = self.link
        want = link.out + len(msg)
        # A due output ACK rides in the same write as the keystroke.
        await link.send(link.ack_frame(time.monotonic()) + link.stdin_frame(msg))
        while link.out < want:
            await link.receive_output()

    async def aclose(self) -> None:
        await self.link.aclose()


async def _gather(factories: list[Callable[[], Awaitable[Any]]], limit: int = 16) -> list[Any]:
    out: list[Any] = [None] * len(factories)
    sem = trio.Semaphore(limit)

    async def one(i: int) -> None:
        async with sem:
            out[i] = await factories[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(factories)):
            nursery.start_soon(one, i)
    return out


async def measure_small(conns: list[Any], server_pid: int, msg: bytes, warmup_s: float,
                        duration_s: float, on_record: Callable[[], None] | None = None,
                        on_stop: Callable[[], None] | None = None) -> Sample:
    """Run every connection's ping-pong loop; count what completes inside the window."""
    counts = [0] * len(conns)
    rtts: list[float] = []
    recording = False
    stop = False
    perf = time.perf_counter

    async def loop(i: int, conn: Any) -> None:
        while not stop:
            t = perf()
            await conn.roundtrip(msg)
            if recording:
                counts[i] += 1
                rtts.append(perf() - t)

    async with trio.open_nursery() as nursery:
        for i, conn in enumerate(conns):
            nursery.start_soon(loop, i, conn)
        await trio.sleep(warmup_s)
        if on_record is not None:
            on_record()  # e.g. start the profiler: set-up is not what we want to see
        recording = True
        cpu0, ccpu0, t0 = C.cpu_seconds(server_pid), _client_cpu(), perf()
        pcpu0 = C.descendants_cpu_seconds(server_pid)
        await trio.sleep(duration_s)
        recording = False
        t1, cpu1, ccpu1 = perf(), C.cpu_seconds(server_pid), _client_cpu()
        pcpu1 = C.descendants_cpu_seconds(server_pid)
        if on_stop is not None:
            on_stop()
        stop = True
        # Every loop finishes its round trip in flight; bounded, then cancelled.
        with trio.move_on_after(5):
            while nursery.child_tasks:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return Sample(t1 - t0, sum(counts), cpu1 - cpu0, ccpu1 - ccpu0, rtts, pcpu1 - pcpu0)


# --------------------------------------------------------------------- run


@dataclass
class Config:
    bulk_bytes: int
    bulk_tty: bool
    sessions: int
    frame_bytes: int
    warmup_s: float
    duration_s: float
    repeats: int
    workloads: tuple[str, ...]
    profile: bool
    variants: tuple[str, ...] = ("rec", "tls")
    cprofile_path: str | None = None  # set when the gateway runs with the cProfile hook


def make_bulk_file(path: Path, nbytes: int) -> None:
    """Printable ASCII without newlines: a PTY (``--bulk-tty``) passes it unchanged."""
    rng = random.Random(9)
    block = bytes(rng.randrange(33, 127) for _ in range(1 << 16)) * 16  # 1 MiB
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            piece = block[:left]
            f.write(piece)
            left -= len(piece)


async def run_all(cfg: Config, pts: dict[str, Podterm], servers: dict[str, Server],
                  bulk_path: Path, workdir: Path) -> dict[str, Any]:
    results: dict[str, dict[str, list[Sample]]] = {"bulk": {}, "small": {}}
    for pt in pts.values():
        await pt.open_http()
    gw = pts["podterm"].gw
    msg = b"x" * cfg.frame_bytes
    profiles: dict[str, Any] = {}
    cprofiles: dict[str, Any] = {}
    try:
        for rnd in range(cfg.repeats):
            if "bulk" in cfg.workloads:
                order = [*pts, "raw-relay", "tws-relay"]
                random.Random(rnd).shuffle(order)
                for name in order:
                    C.progress(f"round {rnd + 1}/{cfg.repeats}: bulk {name}")
                    sample = await _bulk_once(name, cfg, pts, servers, bulk_path)
                    results["bulk"].setdefault(name, []).append(sample)
                    C.progress(f"  {sample.rate / 1e6:,.0f} MB/s, server CPU "
                               f"{sample.server_cpu_s / sample.seconds:.0%}")
            if "small" in cfg.workloads:
                order = [*pts, "raw-relay", "tws-relay", "raw-echo", "tws-echo"]
                random.Random(100 + rnd).shuffle(order)
                for name in order:
                    C.progress(f"round {rnd + 1}/{cfg.repeats}: small {name} "
                               f"({cfg.sessions} sessions)")
                    sample = await _small_once(name, cfg, pts, servers, msg)
                    results["small"].setdefault(name, []).append(sample)
                    C.progress(f"  {sample.rate:,.0f} msg/s, server CPU "
                               f"{sample.server_cpu_s / sample.seconds:.0%}")
        if cfg.profile:
            for workload in cfg.workloads:
                C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                out = C.RESULTS_DIR / f"relay-profile-{workload}.txt"  # py-spy's raw stacks
                C.progress(f"profiling podterm under {workload} (py-spy)")
                if workload == "bulk":
                    # Long enough for py-spy to see a few seconds of relaying.
                    spy = C.start_pyspy(gw.pid, out, 6)
                    t_end = time.monotonic() + 6
                    while time.monotonic() < t_end:
                        await _bulk_once("podterm", cfg, pts, servers, bulk_path)
                else:
                    spies: list[subprocess.Popen[bytes] | None] = []

                    def start(spies: list[Any] = spies, out: Path = out) -> None:
                        spies.append(C.start_pyspy(gw.pid, out, cfg.duration_s))

                    await _small_once("podterm", cfg, pts, servers, msg, on_record=start)
                    spy = spies[0] if spies else None
                if spy is not None:
                    spy.wait(60)
                    profiles[workload] = C.summarize_profile(out)
                if cfg.cprofile_path:
                    cprofiles[workload] = await _cprofile_round(workload, cfg, pts, servers,
                                                                bulk_path, msg)
    finally:
        for pt in pts.values():
            if pt.http is not None:
                await pt.http.aclose()
    return {"samples": results, "profiles": profiles, "cprofiles": cprofiles}


async def _cprofile_round(workload: str, cfg: Config, pts: dict[str, Podterm],
                          servers: dict[str, Server], bulk_path: Path,
                          msg: bytes) -> dict[str, Any]:
    """One more podterm round under cProfile (CPU time, exact call counts; about 2x slower).

    Calls are given per unit of work: per round trip (small) or per MB (bulk).
    """
    assert cfg.cprofile_path is not None
    path = Path(cfg.cprofile_path)
    path.unlink(missing_ok=True)
    C.progress(f"profiling podterm under {workload} (cProfile, CPU time)")
    gw = pts["podterm"].gw
    if workload == "bulk":
        C.cprofile_toggle(gw.pid)
        sample = await _bulk_once("podterm", cfg, pts, servers, bulk_path)
        C.cprofile_toggle(gw.pid)
        units = sample.units / 1e6
    else:
        sample = await _small_once("podterm", cfg, pts, servers, msg,
                                   on_record=lambda: C.cprofile_toggle(gw.pid),
                                   on_stop=lambda: C.cprofile_toggle(gw.pid))
        units = sample.units
    with trio.move_on_after(20):
        while not path.exists():
            await trio.sleep(0.05)
    if not path.exists():
        return {}
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kept = C.RESULTS_DIR / f"relay-cprofile-{workload}.pstats"  # for pstats' callers view
    shutil.copyfile(path, kept)
    return C.cprofile_summary(kept, units)


async def _bulk_once(name: str, cfg: Config, pts: dict[str, Podterm],
                     servers: dict[str, Server], bulk_path: Path) -> Sample:
    n = cfg.bulk_bytes
    if name in pts:
        pt = pts[name]
        assert pt.http is not None
        session = await pt.http.create_session({"command": ["cat", str(bulk_path)],
                                             "tty": cfg.bulk_tty})
        try:
            return await measure_bulk(name, pt.gw.pid, n, lambda: bulk_podterm(pt, session, n))
        finally:
            pt.clear_recordings()
    server = servers[f"bulk-{name}"]
    if name == "raw-relay":
        return await measure_bulk(name, server.pid, n, lambda: bulk_raw(server.port, n))
    return await measure_bulk(name, server.pid, n, lambda: bulk_tws(server.port, n))


async def _small_once(name: str, cfg: Config, pts: dict[str, Podterm],
                      servers: dict[str, Server], msg: bytes,
                      on_record: Callable[[], None] | None = None,
                      on_stop: Callable[[], None] | None = None) -> Sample:
    n = cfg.sessions
    sessions: list[dict[str, Any]] = []
    http: C.HttpConn | None = None
    if name in pts:
        pt = pts[name]
        http = pt.http
        assert http is not None
        for _ in range(n):
            sessions.append(await http.create_session({"command": SMALL_CMD, "tty": True}))
        conns = await _gather([lambda s=s, i=i: PtConn.open(pt, s, i)
                               for i, s in enumerate(sessions)])
        pid = pt.gw.pid
    else:
        server = servers[f"small-{name}"]
        ready = name.endswith("relay")
        if name.startswith("raw"):
            conns = await _gather([lambda: RawConn.open(server.port, ready) for _ in range(n)])
        else:
            conns = await _gather([lambda i=i: WsConn.open(server.port, ready, i)
                                   for i in range(n)])
        pid = server.pid
    try:
        return await measure_small(conns, pid, msg, cfg.warmup_s, cfg.duration_s, on_record,
                                   on_stop)
    finally:
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(conn.aclose)
        if http is not None:
            for s in sessions:
                await http.delete_session(s["id"])


# ------------------------------------------------------------------ report


def summarize(samples: dict[str, dict[str, list[Sample]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workload, by_name in samples.items():
        out[workload] = {}
        for name, runs in by_name.items():
            rtts = sorted(t for s in runs for t in s.rtts)
            out[workload][name] = {
                "rate": C.median([s.rate for s in runs]),
                "rate_per_server_cpu_s": C.median([s.rate_per_cpu for s in runs]),
                "server_cpu_share": C.median([s.server_cpu_s / s.seconds for s in runs]),
                "client_cpu_share": C.median([s.client_cpu_s / s.seconds for s in runs]),
                "process_cpu_share": C.median([s.process_cpu_s / s.seconds for s in runs]),
                "rounds": [{"seconds": s.seconds, "units": s.units,
                            "server_cpu_s": s.server_cpu_s, "client_cpu_s": s.client_cpu_s}
                           for s in runs],
                "rtt": C.percentiles(rtts) if rtts else None,
            }
    return out


VARIANT_NAMES = ("podterm", "podterm-base", "podterm+rec", "podterm+tls", "podterm+win")


def variant_overheads(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """What recording + audit, and TLS, cost against the plain gateway (1 - variant/plain).

    ``podterm-base`` (``--baseline-src``) is listed the same way: a positive
    figure is what the change under test gained over the baseline tree.
    """
    rows = []
    for workload in ("bulk", "small"):
        by_name = summary.get(workload, {})
        plain = by_name.get("podterm")
        for variant in ("podterm-base", "podterm+rec", "podterm+tls", "podterm+win"):
            r = by_name.get(variant)
            if not plain or not r:
                continue
            cost = 1 - C.ratio(r["rate"], plain["rate"])
            cost_cpu = 1 - C.ratio(r["rate_per_server_cpu_s"], plain["rate_per_server_cpu_s"])
            target = "<= 10%" if workload == "bulk" and variant == "podterm+rec" else ""
            verdict = ""
            if target:
                verdict = " met" if cost <= 0.10 else " NOT met"
            rows.append({"workload": workload, "variant": variant, "cost": cost,
                         "cost_per_cpu": cost_cpu, "target": target + verdict})
    return rows


def ratios(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for workload, baseline, target in TARGETS:
        pt = summary.get(workload, {}).get("podterm")
        base = summary.get(workload, {}).get(baseline)
        if not pt or not base:
            continue
        wall = C.ratio(pt["rate"], base["rate"])
        per_cpu = C.ratio(pt["rate_per_server_cpu_s"], base["rate_per_server_cpu_s"])
        rows.append({"workload": workload, "baseline": baseline, "target": target,
                     "ratio": wall, "ratio_per_server_cpu": per_cpu,
                     "met": bool(wall >= target)})
    return rows


def print_report(cfg: Config, summary: dict[str, Any], ratio_rows: list[dict[str, Any]],
                 profiles: dict[str, Any], cprofiles: dict[str, Any] | None = None) -> str:
    parts = []
    if "bulk" in summary and summary["bulk"]:
        rows = []
        for name in (*VARIANT_NAMES, "raw-relay", "tws-relay"):
            r = summary["bulk"].get(name)
            if r:
                rows.append([name, C.fmt_num(r["rate"] / 1e6), f"{r['server_cpu_share']:.0%}",
                             C.fmt_num(r["rate_per_server_cpu_s"] / 1e6),
                             f"{r['client_cpu_share']:.0%}"])
        parts.append(f"Bulk: one session, cat of {cfg.bulk_bytes / 1e6:,.0f} MB "
                     f"({'PTY' if cfg.bulk_tty else 'pipes'}), median of {cfg.repeats}\n\n"
                     + C.table(["server", "MB/s", "server CPU", "MB per server CPU-s",
                                "client CPU"], rows))
    if "small" in summary and summary["small"]:
        rows = []
        for name in (*VARIANT_NAMES, "raw-relay", "tws-relay", "raw-echo", "tws-echo"):
            r = summary["small"].get(name)
            if r:
                rtt = r["rtt"] or {}
                rows.append([name, C.fmt_num(r["rate"]), C.fmt_ms(rtt.get("p50", float("nan"))),
                             C.fmt_ms(rtt.get("p99", float("nan"))),
                             f"{r['server_cpu_share']:.0%}",
                             C.fmt_num(r["rate_per_server_cpu_s"]),
                             f"{r['client_cpu_share']:.0%}"])
        parts.append(f"Small frames: {cfg.sessions} sessions, {cfg.frame_bytes}-byte STDIN "
                     f"echoed by cat in a PTY (echo rows: no process), {cfg.duration_s:g} s "
                     f"per round, median of {cfg.repeats}\n\n"
                     + C.table(["server", "msg/s", "RTT p50", "RTT p99", "server CPU",
                                "msg per server CPU-s", "client CPU"], rows))
    if ratio_rows:
        rows = [[r["workload"], f"podterm / {r['baseline']}", C.fmt_ratio(r["ratio"]),
                 C.fmt_ratio(r["ratio_per_server_cpu"]), f">= {r['target']:g}x",
                 "met" if r["met"] else
                 f"NOT met ({r['ratio'] / r['target']:.0%} of target)"]
                for r in ratio_rows]
        parts.append("Ratios against issue 9's targets (wall-clock rate decides)\n\n"
                     + C.table(["workload", "ratio", "rate", "per server CPU-s", "target",
                                "verdict"], rows, "llrrrl"))
    overhead = variant_overheads(summary)
    if overhead:
        rows = [[o["workload"], o["variant"], f"{o['cost']:+.0%}", f"{o['cost_per_cpu']:+.0%}",
                 o["target"]] for o in overhead]
        parts.append("Cost of recording + audit and of TLS, against the plain gateway in the same "
                     "run (share of the rate lost; issue 9: recording and audit on cost at most "
                     "10% of bulk throughput)\n\n"
                     + C.table(["workload", "variant", "rate lost", "rate lost per server CPU-s",
                                "target"], rows, "llrrl"))
    for workload, prof in profiles.items():
        if not prof.get("samples"):
            continue
        rows = [[name, f"{share:.1%}"] for name, share in prof["self"][:15]]
        parts.append(f"Gateway profile under {workload} (py-spy, {prof['samples']} samples): "
                     "self time\n\n" + C.table(["function (file)", "share"], rows, "lr"))
        rows = [[name, f"{share:.1%}"] for name, share in prof["self_by_file"][:12]]
        parts.append(f"Gateway profile under {workload}: self time by file\n\n"
                     + C.table(["file", "share"], rows, "lr"))
        rows = [[name, f"{share:.1%}"] for name, share in prof["inclusive"]
                if "podterm/" in name and "cli.py" not in name and "__main__" not in name
                and "server.py" not in name][:14]
        parts.append(f"Gateway profile under {workload}: inclusive time of podterm's functions\n\n"
                     + C.table(["function (file)", "share"], rows, "lr"))
    for workload, prof in (cprofiles or {}).items():
        if not prof.get("top"):
            continue
        unit = "MB" if workload == "bulk" else "round trip"
        rows = [[r["function"], f"{r['share']:.1%}", C.fmt_num(r["calls_per_unit"], 2)]
                for r in prof["top"][:20]]
        parts.append(f"Gateway cProfile under {workload} (CPU time; "
                     f"{prof['cpu_us_per_unit']:,.0f} µs of profiled CPU per {unit}, "
                     "profiler overhead included): own time\n\n"
                     + C.table(["function (file:line)", "share", f"calls per {unit}"], rows,
                               "lrr"))
    text = "\n\n".join(parts)
    print(text)
    return text


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--bulk-mb", type=float, default=200, help="bulk file size (MB, default 200)")
    p.add_argument("--bulk-tty", action="store_true", help="run the bulk cat in a PTY")
    p.add_argument("--sessions", type=int, default=100, help="small-frame sessions (100)")
    p.add_argument("--frame-bytes", type=int, default=1, help="STDIN bytes per keystroke (1)")
    p.add_argument("--duration", type=float, default=10.0, help="small: seconds measured (10)")
    p.add_argument("--warmup", type=float, default=1.0, help="small: seconds before (1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--only", choices=["bulk", "small"], help="run one workload")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway afterwards")
    p.add_argument("--variants", default="rec,tls",
                   help="podterm variants beside the plain gateway: rec (recording + audit "
                        "log on), tls (TLS), win (a 1 MiB flow-control window); "
                        "comma-separated, or 'none' (default rec,tls)")
    p.add_argument("--window", help="gateway flow-control window, e.g. 1MiB "
                   "(PODTERM_WINDOW_BYTES; the ring grows to match); default: the gateway's")
    p.add_argument("--baseline-src", help="also measure the plain gateway from this src/ "
                   "directory (A/B a change within one run)")
    p.add_argument("--tiny", action="store_true",
                   help="CI smoke size: 4 MB, 4 sessions, 0.5 s, 1 round")
    p.add_argument("--out", help="JSON path (default bench/results/relay-<time>.json)")
    ns = p.parse_args(argv)
    if ns.tiny:
        ns.bulk_mb, ns.sessions, ns.duration, ns.warmup, ns.repeats = 4, 4, 0.5, 0.2, 1
    workloads = (ns.only,) if ns.only else ("bulk", "small")
    cfg = Config(bulk_bytes=int(ns.bulk_mb * 1e6), bulk_tty=ns.bulk_tty, sessions=ns.sessions,
                 frame_bytes=ns.frame_bytes, warmup_s=ns.warmup, duration_s=ns.duration,
                 repeats=ns.repeats, workloads=workloads, profile=ns.profile,
                 variants=tuple(v for v in ns.variants.split(",") if v and v != "none"))
    return cfg, ns


def main(argv: list[str] | None = None) -> int:
    C.cleanup_on_sigterm()
    cfg, ns = parse_args(argv)
    C.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="podterm-relay-", dir="/dev/shm"
                                    if os.path.isdir("/dev/shm") else None))
    bulk_path = workdir / "bulk.bin"
    # Recordings go to disk, as they would in production (not to the tmpfs).
    diskdir = Path(tempfile.mkdtemp(prefix="podterm-relay-rec-"))
    pts: dict[str, Podterm] = {}
    servers: dict[str, Server] = {}
    try:
        if "bulk" in cfg.workloads:
            C.progress(f"writing a {cfg.bulk_bytes / 1e6:,.0f} MB file in {workdir}")
            make_bulk_file(bulk_path, cfg.bulk_bytes)
        specs: list[tuple[str, str, list[str], bool]] = []
        if "bulk" in cfg.workloads:
            bulk_cmd = ["cat", str(bulk_path)]
            specs += [("bulk-raw-relay", "raw-relay", bulk_cmd, cfg.bulk_tty),
                      ("bulk-tws-relay", "tws-relay", bulk_cmd, cfg.bulk_tty)]
        if "small" in cfg.workloads:
            specs += [("small-raw-relay", "raw-relay", SMALL_CMD, True),
                      ("small-tws-relay", "tws-relay", SMALL_CMD, True),
                      ("small-raw-echo", "raw-echo", [], False),
                      ("small-tws-echo", "tws-echo", [], False)]
        C.progress("starting the gateways and the baseline servers")
        gw_env = {"PODTERM_MAX_SESSIONS_PER_USER": "0", "PODTERM_MAX_CONNECTIONS_PER_IP": "0"}
        if ns.window:
            gw_env["PODTERM_WINDOW_BYTES"] = ns.window
            gw_env["PODTERM_RING_BYTES"] = ns.window
        args = ["--drain-timeout", "2s"]
        plain_env = dict(gw_env)
        if cfg.profile:
            plain_env.update(C.gc_trace_env(workdir, gc_trace=False, cprofile=True))
            cfg.cprofile_path = plain_env["BENCH_CPROFILE"]
        pts["podterm"] = Podterm("podterm", C.start_gateway(
            args=args, workdir=workdir / "podterm", env=plain_env))
        if "rec" in cfg.variants:
            rec_dir = diskdir / "recordings"
            rec_dir.mkdir()
            pts["podterm+rec"] = Podterm("podterm+rec", C.start_gateway(
                args=[*args, "--audit-log", str(diskdir / "audit.jsonl")],
                recordings=str(rec_dir), workdir=workdir / "podterm-rec", env=gw_env),
                rec_dir=rec_dir)
        if "tls" in cfg.variants:
            tls = C.make_tls(workdir)
            if tls is None:
                C.progress("trustme is not installed: no TLS variant")
            else:
                pts["podterm+tls"] = Podterm("podterm+tls", C.start_gateway(
                    args=[*args, "--tls-cert", str(tls.cert_file), "--tls-key",
                          str(tls.key_file)], workdir=workdir / "podterm-tls", env=gw_env),
                    ssl_context=tls.client_context)
        if ns.baseline_src:
            base_env = {**gw_env, "PYTHONPATH": str(Path(ns.baseline_src).resolve())}
            pts["podterm-base"] = Podterm("podterm-base", C.start_gateway(
                args=args, workdir=workdir / "podterm-base", env=base_env))
        if "win" in cfg.variants:
            # The plain gateway with a 1 MiB window (= its ring): what the
            # window costs a bulk stream when the ACK round trip is slow.
            win_env = {**gw_env, "PODTERM_WINDOW_BYTES": "1MiB", "PODTERM_RING_BYTES": "1MiB"}
            pts["podterm+win"] = Podterm("podterm+win", C.start_gateway(
                args=args, workdir=workdir / "podterm-win", env=win_env))
        servers = start_baselines(workdir, specs)
        raw = trio.run(run_all, cfg, pts, servers, bulk_path, workdir)
    finally:
        for server in servers.values():
            server.stop()
        for pt in pts.values():
            pt.gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(diskdir, ignore_errors=True)
    summary = summarize(raw["samples"])
    ratio_rows = ratios(summary)
    print()
    text = print_report(cfg, summary, ratio_rows, raw["profiles"], raw["cprofiles"])
    command = "bench/relay/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = C.write_result("relay", C.clean_nan({
        "command": command.strip(),
        "config": cfg.__dict__,
        "results": summary,
        "ratios": ratio_rows,
        "variant_costs": variant_overheads(summary),
        "profiles": raw["profiles"],
        "cprofiles": raw["cprofiles"],
        "report": text,
    }), ns.out)
    C.progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
