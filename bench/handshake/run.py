"""Handshake benchmark: WebSocket upgrades per second with bearer-token authentication on.

Contenders, each its own process, measured in the same run, interleaved:

==========  ================================================================
podterm     the gateway: ``GET /api/v1/sessions/{id}/attach?mode=ro`` with
            ``Authorization: Bearer``; router, token check, session lookup,
            upgrade, attach as a viewer, ``hello`` (docs/protocol.md §3)
tws         trio-websocket ``serve_websocket`` (library defaults) whose handler
            checks the same bearer header (constant-time compare), accepts
            ``podterm.v1`` and sends a hello-sized JSON message
raw-trio    the floor for any trio server: ``trio.serve_tcp``, the request
            head read until its blank line and split by hand (no HTTP
            parser), the same bearer compare, ``Sec-WebSocket-Accept``, the
            101 and the hello frame in one write, then a read until the
            client leaves; no router, no session, no audit
==========  ================================================================

One handshake = TCP connect, upgrade request, ``101``, the first WebSocket
message (the hello), then the client drops the connection (``SO_LINGER`` 0:
an RST, so no TIME_WAIT piles up on either side).  ``--clients`` concurrent
loops in this process, spread over 127.0.0.x source addresses, run for
``--duration`` seconds per round.  The client parses only what it must (the
status line, the end of the head, one frame header), so the servers are
what is measured; each round also records the server's CPU time, giving
handshakes per server CPU-second, the steadier figure on a shared machine.

``--baseline-src DIR`` adds a third contender, ``podterm-base``: the same
gateway run from another source tree (``PYTHONPATH=DIR``, e.g. a copy with a
change put back), measured interleaved with the others, so a change is
judged within one run rather than across runs of a loaded machine.

Issue 9's target: handshakes per worker at least 4x trio-websocket's.  The
raw-trio row says how far below that any trio server could get here: what
trio's accept, a task, two reads, a write and a close cost per connection.

Usage::

    .venv/bin/python bench/handshake/run.py                 # 3 rounds x 5 s
    .venv/bin/python bench/handshake/run.py --tiny          # CI smoke size
    .venv/bin/python bench/handshake/run.py --baseline-src /tmp/old/src   # A/B a change
    .venv/bin/python bench/handshake/run.py serve-tws --port-file F --token T   (internal)
    .venv/bin/python bench/handshake/run.py serve-raw --port-file F --token T   (internal)
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import hmac
import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

TARGET = 4.0  # issue 9: podterm handshakes per worker >= 4x trio-websocket's
_LINGER0 = struct.pack("ii", 1, 0)
_HELLO = json.dumps({"type": "hello", "session": "s-000000000000", "resume_token": "x" * 24,
                     "state": "running", "mode": "ro", "out_offset": 0, "ring_start": 0,
                     "in_acked": 0, "size": {"cols": 80, "rows": 24}, "window": 262144,
                     "heartbeat_s": 15, "notices": []}).encode()


# ------------------------------------------------------- trio-websocket server


async def serve_tws(port_file: str, token: str) -> None:
    from trio_websocket import ConnectionClosed, serve_websocket

    expected = f"Bearer {token}".encode()

    async def handler(request: Any) -> None:
        # trio-websocket lets a handler's exception end the whole server (its
        # nursery), and a client that resets mid-handshake makes reject() or
        # accept() raise: a connection's failure must end only that connection.
        try:
            await serve_one(request)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def serve_one(request: Any) -> None:
        auth = b""
        for name, value in request.headers:
            if name.lower() == b"authorization":
                auth = value
        if not hmac.compare_digest(auth, expected):
            await request.reject(401, body=b'{"error": {"code": "unauthenticated"}}')
            return
        ws = await request.accept(subprotocol="podterm.v1")
        await ws.send_message(b"\x06" + _HELLO)
        while True:
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        C.write_port_file(port_file, server.port)


# ------------------------------------------------------- raw trio server (floor)

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def _server_frame(payload: bytes) -> bytes:
    n = len(payload)
    head = bytes([0x82, n]) if n < 126 else bytes([0x82, 126]) + n.to_bytes(2, "big")
    return head + payload


async def serve_raw(port_file: str, token: str) -> None:
    expected = f"Bearer {token}".encode()
    hello = _server_frame(b"\x06" + _HELLO)
    refused = (b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n")

    async def handler(stream: trio.SocketStream) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data or len(buf) > 16384:
                    return
                buf += data
            key = auth = b""
            for line in buf.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"sec-websocket-key":
                    key = value.strip()
                elif name == b"authorization":
                    auth = value.strip()
            if not key or not hmac.compare_digest(auth, expected):
                await stream.send_all(refused)
                return
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                + b"\r\nSec-WebSocket-Protocol: podterm.v1\r\n\r\n" + hello)
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        C.write_port_file(port_file, listeners[0].socket.getsockname()[1])


# ------------------------------------------------------------------ client


def request_bytes(host: str, port: int, target: str, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: podterm.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()


async def handshake_once(port: int, request: bytes, source: str | None) -> int:
    """One handshake; returns the HTTP status (101 when the first message also arrived)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    try:
        await stream.send_all(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        if status != 101:
            return status
        # The first message: a 2-byte header (+2 for 126..65535 bytes), unmasked.
        while True:
            if len(rest) >= 2:
                n = rest[1] & 0x7F
                need = 2 + (2 if n == 126 else 8 if n == 127 else 0)
                if len(rest) >= need:
                    if n == 126:
                        n = int.from_bytes(rest[2:4], "big")
                    elif n == 127:
                        n = int.from_bytes(rest[2:10], "big")
                    if len(rest) >= need + n:
                        return 101
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed before the first message")
            rest += data
    finally:
        # RST instead of FIN: no TIME_WAIT, and the server sees the client leave.
        try:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        await trio.aclose_forcefully(stream)


async def measure(port: int, target: str, token: str, server_pid: int, clients: int,
                  duration_s: float, warmup_s: float, sources: list[str]) -> dict[str, Any]:
    counts = [0] * clients
    errors = [0] * clients
    recording = False
    stop = False
    latencies: list[float] = []
    perf = time.perf_counter

    async def loop(i: int) -> None:
        request = request_bytes("127.0.0.1", port, target, token)
        source = sources[i % len(sources)]
        while not stop:
            t = perf()
            try:
                status = await handshake_once(port, request, source)
            except (OSError, ConnectionError, trio.BrokenResourceError, ValueError):
                status = 0
            if recording:
                if status == 101:
                    counts[i] += 1
                    latencies.append(perf() - t)
                else:
                    errors[i] += 1

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(loop, i)
        await trio.sleep(warmup_s)
        cpu0 = C.cpu_seconds(server_pid)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = perf()
        recording = True
        await trio.sleep(duration_s)
        recording = False
        t1 = perf()
        cpu1 = C.cpu_seconds(server_pid)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        stop = True
        nursery.cancel_scope.cancel()
    seconds = t1 - t0
    n = sum(counts)
    server_cpu = cpu1 - cpu0
    client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return {"handshakes": n, "errors": sum(errors), "seconds": seconds, "rate": n / seconds,
            "server_cpu_s": server_cpu,
            "rate_per_server_cpu_s": n / server_cpu if server_cpu else float("nan"),
            "server_cpu_share": server_cpu / seconds, "client_cpu_share": client_cpu / seconds,
            "latency": C.percentiles(latencies)}


async def check_auth(port: int, target: str, token: str) -> tuple[int, int]:
    """(status with the token, status with a wrong token): 101 and 401 expected."""
    good = await handshake_once(port, request_bytes("127.0.0.1", port, target, token), None)
    bad = await handshake_once(port, request_bytes("127.0.0.1", port, target, "wrong" + token),
                               None)
    return good, bad


# --------------------------------------------------------------------- run


async def _create_session(gw: C.GatewayProcess) -> str:
    http = await C.HttpConn.open("127.0.0.1", gw.port, gw.token)
    try:
        # A process that prints nothing: the viewer's replay is empty.
        info = await http.create_session({"command": ["cat"], "tty": False})
    finally:
        await http.aclose()
    return str(info["id"])


def run(ns: argparse.Namespace) -> dict[str, Any]:
    C.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="podterm-handshake-"))
    token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    gw_env = {"PODTERM_MAX_CONNECTIONS_PER_IP": "0", "PODTERM_ADMIN_TOKEN": token}
    if ns.profile:
        gw_env.update(C.gc_trace_env(workdir, gc_trace=False, cprofile=True))
    gw = C.start_gateway(args=["--drain-timeout", "2s"], workdir=workdir, env=gw_env)
    base: C.GatewayProcess | None = None
    if ns.baseline_src:
        base = C.start_gateway(args=["--drain-timeout", "2s"], workdir=workdir / "base",
                               env={"PODTERM_MAX_CONNECTIONS_PER_IP": "0",
                                    "PODTERM_ADMIN_TOKEN": token,
                                    "PYTHONPATH": str(Path(ns.baseline_src).resolve())})
    port_file = workdir / "tws.port"
    log = open(workdir / "tws.log", "wb")  # noqa: SIM115
    tws = subprocess.Popen([sys.executable, __file__, "serve-tws", "--port-file", str(port_file),
                            f"--token={token}"], env=C.child_env(), stdin=subprocess.DEVNULL,
                           stdout=log, stderr=log, cwd=str(C.ROOT))
    log.close()
    raw_port_file = workdir / "raw.port"
    log = open(workdir / "raw.log", "wb")  # noqa: SIM115
    raw = subprocess.Popen([sys.executable, __file__, "serve-raw", "--port-file",
                            str(raw_port_file), f"--token={token}"], env=C.child_env(),
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(C.ROOT))
    log.close()
    samples: dict[str, list[dict[str, Any]]] = {"podterm": [], "tws": [], "raw-trio": []}
    if base is not None:
        samples["podterm-base"] = []
    profile: dict[str, Any] | None = None
    cprofile: dict[str, Any] | None = None
    checks: dict[str, tuple[int, int]] = {}
    try:
        tws_port = C.wait_port_file(port_file, tws)
        raw_port = C.wait_port_file(raw_port_file, raw)
        session_id = trio.run(_create_session, gw)
        targets = {
            "podterm": (gw.port, f"/api/v1/sessions/{session_id}/attach?mode=ro", gw.pid),
            "tws": (tws_port, "/attach", tws.pid),
            "raw-trio": (raw_port, "/attach", raw.pid),
        }
        if base is not None:
            base_session = trio.run(_create_session, base)
            targets["podterm-base"] = (
                base.port, f"/api/v1/sessions/{base_session}/attach?mode=ro", base.pid)
        sources = C.source_addresses(ns.sources)
        for name, (port, target, _pid) in targets.items():
            checks[name] = trio.run(check_auth, port, target, token)
            C.progress(f"{name}: with the token {checks[name][0]}, with a wrong one "
                       f"{checks[name][1]}")
        for rnd in range(ns.repeats):
            order = list(targets)
            random.Random(rnd).shuffle(order)
            for name in order:
                port, target, pid = targets[name]
                C.progress(f"round {rnd + 1}/{ns.repeats}: {name}, {ns.clients} clients")
                sample = trio.run(measure, port, target, token, pid, ns.clients, ns.duration,
                                  ns.warmup, sources)
                samples[name].append(sample)
                C.progress(f"  {sample['rate']:,.0f} handshakes/s ({sample['errors']} errors), "
                           f"server CPU {sample['server_cpu_share']:.0%}")
        if ns.profile:
            port, target, pid = targets["podterm"]
            C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            out = C.RESULTS_DIR / "handshake-profile.txt"
            C.progress("profiling podterm's handshakes (py-spy)")
            spy = C.start_pyspy(pid, out, ns.duration)
            trio.run(measure, port, target, token, pid, ns.clients, ns.duration, 0.0, sources)
            if spy is not None:
                spy.wait(60)
                profile = C.summarize_profile(out)
            C.progress("profiling podterm's handshakes (cProfile, CPU time)")
            pstats_path = Path(gw_env["BENCH_CPROFILE"])
            C.cprofile_toggle(pid)
            sample = trio.run(measure, port, target, token, pid, ns.clients, ns.duration, 0.0,
                              sources)
            C.cprofile_toggle(pid)
            deadline = time.monotonic() + 20
            while not pstats_path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # the gateway writes the file on the second signal
            if pstats_path.exists():
                kept = C.RESULTS_DIR / "handshake-cprofile.pstats"
                shutil.copyfile(pstats_path, kept)
                cprofile = C.cprofile_summary(kept, sample["handshakes"])
    finally:
        for server in (tws, raw):
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(5)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        gw.stop()
        if base is not None:
            base.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {}
    for name, runs in samples.items():
        summary[name] = {
            "rate": C.median([r["rate"] for r in runs]),
            "rate_per_server_cpu_s": C.median([r["rate_per_server_cpu_s"] for r in runs]),
            "server_cpu_share": C.median([r["server_cpu_share"] for r in runs]),
            "client_cpu_share": C.median([r["client_cpu_share"] for r in runs]),
            "latency_p50": C.median([r["latency"]["p50"] for r in runs]),
            "latency_p99": C.median([r["latency"]["p99"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "rounds": runs,
        }
    ratio = C.ratio(summary["podterm"]["rate"], summary["tws"]["rate"])
    ratio_cpu = C.ratio(summary["podterm"]["rate_per_server_cpu_s"],
                        summary["tws"]["rate_per_server_cpu_s"])
    floor = {"rate": C.ratio(summary["raw-trio"]["rate"], summary["tws"]["rate"]),
             "rate_per_server_cpu_s": C.ratio(summary["raw-trio"]["rate_per_server_cpu_s"],
                                              summary["tws"]["rate_per_server_cpu_s"]),
             "podterm_share_per_server_cpu_s": C.ratio(
                 summary["podterm"]["rate_per_server_cpu_s"],
                 summary["raw-trio"]["rate_per_server_cpu_s"])}
    to_base: dict[str, Any] | None = None
    if base is not None:
        to_base = {
            "rate": C.ratio(summary["podterm"]["rate"], summary["podterm-base"]["rate"]),
            "rate_per_server_cpu_s": C.ratio(summary["podterm"]["rate_per_server_cpu_s"],
                                             summary["podterm-base"]["rate_per_server_cpu_s"]),
            "baseline_src": str(ns.baseline_src)}
    return {"summary": summary, "auth_checks": checks, "ratio": ratio, "profile": profile,
            "ratio_to_base": to_base, "floor": floor,
            "cprofile": cprofile,
            "ratio_per_server_cpu": ratio_cpu, "target": TARGET, "met": bool(ratio >= TARGET)}


def report(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    rows = []
    contenders = [("podterm", "podterm (attach ro)"), ("tws", "trio-websocket"),
                  ("raw-trio", "raw trio (floor)")]
    if "podterm-base" in result["summary"]:
        contenders.insert(1, ("podterm-base", "podterm, baseline tree"))
    for name, label in contenders:
        s = result["summary"][name]
        rows.append([label, C.fmt_num(s["rate"]), C.fmt_ms(s["latency_p50"]),
                     C.fmt_ms(s["latency_p99"]), f"{s['server_cpu_share']:.0%}",
                     C.fmt_num(s["rate_per_server_cpu_s"]), f"{s['client_cpu_share']:.0%}",
                     str(s["errors"])])
    verdict = ("met" if result["met"]
               else f"NOT met ({result['ratio'] / TARGET:.0%} of target)")
    text = (f"Handshakes with bearer-token auth: {ns.clients} concurrent clients, "
            f"{ns.duration:g} s per round, median of {ns.repeats}\n\n"
            + C.table(["server", "handshakes/s", "p50", "p99", "server CPU",
                       "per server CPU-s", "client CPU", "errors"], rows)
            + f"\n\npodterm / trio-websocket: {C.fmt_ratio(result['ratio'])} "
            f"(per server CPU-s {C.fmt_ratio(result['ratio_per_server_cpu'])}); "
            f"target >= {TARGET:g}x: {verdict}")
    floor = result["floor"]
    text += (f"\nraw trio (floor) / trio-websocket: {C.fmt_ratio(floor['rate'])} (per server "
             f"CPU-s {C.fmt_ratio(floor['rate_per_server_cpu_s'])}); podterm reaches "
             f"{C.fmt_ratio(floor['podterm_share_per_server_cpu_s'])} of the floor per "
             "server CPU-s")
    to_base = result.get("ratio_to_base")
    if to_base:
        text += (f"\npodterm / baseline tree: {C.fmt_ratio(to_base['rate'])} "
                 f"(per server CPU-s {C.fmt_ratio(to_base['rate_per_server_cpu_s'])})")
    prof = result.get("profile")
    if prof and prof.get("samples"):
        rows = [[name, f"{share:.1%}"] for name, share in prof["self"][:15]]
        text += (f"\n\npodterm handshake profile (py-spy, {prof['samples']} samples): self time\n\n"
                 + C.table(["function (file)", "share"], rows, "lr"))
        rows = [[name, f"{share:.1%}"] for name, share in prof["inclusive"]
                if "podterm/" in name and "cli.py" not in name and "__main__" not in name][:14]
        text += ("\n\npodterm handshake profile: inclusive time of podterm's functions\n\n"
                 + C.table(["function (file)", "share"], rows, "lr"))
    cprof = result.get("cprofile")
    if cprof and cprof.get("top"):
        rows = [[r["function"], f"{r['share']:.1%}", C.fmt_num(r["calls_per_unit"], 2)]
                for r in cprof["top"][:20]]
        text += (f"\n\npodterm handshake cProfile (CPU time; {cprof['cpu_us_per_unit']:,.0f} µs "
                 "of profiled CPU per handshake, profiler overhead included): own time\n\n"
                 + C.table(["function (file:line)", "share", "calls per handshake"], rows,
                           "lrr"))
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("serve-tws", "serve-raw"):
        p = argparse.ArgumentParser(prog=f"handshake {argv[0]}")
        p.add_argument("--port-file", required=True)
        p.add_argument("--token", required=True)
        ns = p.parse_args(argv[1:])
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        trio.run(serve_tws if argv[0] == "serve-tws" else serve_raw, ns.port_file, ns.token)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent client loops (32)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per round (5)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before each round (0.5)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--sources", type=int, default=8, help="127.0.0.x source addresses (8)")
    p.add_argument("--profile", action="store_true", help="py-spy one more podterm round")
    p.add_argument("--tiny", action="store_true", help="CI smoke size: 4 clients, 0.5 s")
    p.add_argument("--out", help="JSON path (default bench/results/handshake-<time>.json)")
    p.add_argument("--baseline-src", help="also measure the gateway from this src/ directory")
    ns = p.parse_args(argv)
    if ns.tiny:
        ns.clients, ns.duration, ns.warmup, ns.repeats, ns.sources = 4, 0.5, 0.1, 1, 2
    result = run(ns)
    print()
    text = report(ns, result)
    path = C.write_result("handshake", C.clean_nan({
        "command": ("bench/handshake/run.py " + " ".join(argv)).strip(), "config": vars(ns),
        **result, "report": text}), ns.out)
    C.progress(f"wrote {path}")
    ok = all(c == (101, 401) for c in result["auth_checks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
