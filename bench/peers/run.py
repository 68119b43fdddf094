"""What a peer hop costs: a session attached to the gateway that runs it, and the same
session attached through another gateway that forwards to it (issue 5, "Routing
between peers ... your choice, measured").

Two ``podterm serve`` processes, A and B, share a SQLite store and a peer
secret.  One session runs on A.  In the same run, alternating rounds:

* **small**: sequential keystroke round trips (one byte typed, its echo read)
  on a raw-mode ``cat``, direct to A and through B; p50/p99 latency and rate;
* **bulk**: ``head -c N /dev/zero`` read to the end, direct and through B; MB/s.

Ratios are "through B / direct" (1.0 = the hop is free).  B only splices bytes
after the handshake, so the small-frame cost is one more loopback hop and
one more trio task switch per direction.  Loopback only.

Usage::

    .venv/bin/python bench/peers/run.py [--rounds 3] [--keystrokes 2000]
                                        [--bulk-mb 50] [--tiny] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402

C.ensure_src_on_path()

ECHO_CMD = ["sh", "-c", "stty raw -echo && printf R && exec cat"]


async def _small(gw: C.GatewayProcess, session: dict[str, Any], n: int) -> list[float]:
    link = await C.PtLink.attach("127.0.0.1", gw.port, gw.token, session)
    try:
        while link.out < 1:  # the "R": stty has run
            await link.receive_output()
        rtts = []
        for _ in range(n):
            want = link.out + 1
            t0 = time.perf_counter()
            await link.send(link.ack_frame(time.monotonic()) + link.stdin_frame(b"k"))
            while link.out < want:
                await link.receive_output()
            rtts.append(time.perf_counter() - t0)
        return rtts
    finally:
        await link.aclose()


async def _bulk(gw: C.GatewayProcess, session: dict[str, Any], nbytes: int) -> float:
    link = await C.PtLink.attach("127.0.0.1", gw.port, gw.token, session)
    t0 = time.perf_counter()
    try:
        while not link.exited:
            await link.receive_output()
            frame = link.ack_frame(0.0, force=True)
            if frame and not link.exited:
                await link.send(frame)
    finally:
        await link.aclose()
    if link.out != nbytes:
        raise RuntimeError(f"bulk: {link.out} of {nbytes} bytes")
    return time.perf_counter() - t0


async def measure(a: C.GatewayProcess, b: C.GatewayProcess, *, rounds: int, keystrokes: int,
                  bulk_bytes: int) -> dict[str, Any]:
    http = await C.HttpConn.open("127.0.0.1", a.port, a.token)
    results: dict[str, Any] = {"small": {"direct": [], "via-peer": []},
                               "bulk": {"direct": [], "via-peer": []}}
    try:
        for _ in range(rounds):
            for name, gw in (("direct", a), ("via-peer", b)):
                echo = await http.create_session({"command": ECHO_CMD, "tty": True})
                rtts = await _small(gw, echo, keystrokes)
                await http.request("DELETE", f"/api/v1/sessions/{echo['id']}")
                results["small"][name].extend(rtts)
                bulk = await http.create_session(
                    {"command": ["head", "-c", str(bulk_bytes), "/dev/zero"], "tty": False})
                results["bulk"][name].append(bulk_bytes / await _bulk(gw, bulk, bulk_bytes))
    finally:
        await http.aclose()
    out: dict[str, Any] = {}
    for name in ("direct", "via-peer"):
        rtts = sorted(results["small"][name])
        out[name] = {"rtt": C.percentiles(rtts), "small_rate": len(rtts) / sum(rtts),
                     "bulk_bytes_per_s": C.median(results["bulk"][name])}
    out["ratios"] = {
        "small_rate": C.ratio(out["via-peer"]["small_rate"], out["direct"]["small_rate"]),
        "bulk": C.ratio(out["via-peer"]["bulk_bytes_per_s"], out["direct"]["bulk_bytes_per_s"]),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keystrokes", type=int, default=2000)
    parser.add_argument("--bulk-mb", type=float, default=50.0)
    parser.add_argument("--tiny", action="store_true", help="CI smoke sizes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.keystrokes, args.bulk_mb = 1, 50, 1.0
    bulk_bytes = int(args.bulk_mb * 1024 * 1024)
    work = Path(tempfile.mkdtemp(prefix="podterm-bench-peers-"))
    (work / "peer-secret").write_text(secrets.token_hex(32) + "\n")
    token = "bench-" + secrets.token_hex(16)
    common = ["--store", f"sqlite:///{work / 'store.db'}", "--peer-secret-file",
              str(work / "peer-secret")]
    env = {"PODTERM_ADMIN_TOKEN": token}
    a = C.start_gateway(args=common, env=env, workdir=work / "a")
    try:
        b = C.start_gateway(args=common, env=env, workdir=work / "b")
        try:
            result = trio.run(lambda: measure(a, b, rounds=args.rounds,
                                              keystrokes=args.keystrokes,
                                              bulk_bytes=bulk_bytes))
        finally:
            b.stop()
    finally:
        a.stop()
    doc = {"config": {"rounds": args.rounds, "keystrokes": args.keystrokes,
                      "bulk_bytes": bulk_bytes}, "machine": C.machine_info(), **result}
    rows = []
    for name in ("direct", "via-peer"):
        r = result[name]
        rows.append([name, C.fmt_ms(r["rtt"]["p50"]), C.fmt_ms(r["rtt"]["p99"]),
                     C.fmt_num(r["small_rate"]), C.fmt_bytes(r["bulk_bytes_per_s"]) + "/s"])
    print(C.table(["attach", "keystroke p50", "p99", "round trips/s", "bulk"], rows))
    print(f"through a peer / direct: small {C.fmt_ratio(result['ratios']['small_rate'])}, "
          f"bulk {C.fmt_ratio(result['ratios']['bulk'])}")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
