"""CI smoke run of the relay benchmark at its tiny size, so that it cannot rot.

It runs ``bench/relay/run.py --tiny`` for real (three gateways: plain, with
recording + audit, with TLS when trustme is installed; four baseline servers;
a 4 MB bulk file, 4 small-frame sessions; a few seconds) and checks
that every contender moved the bytes and that the ratios against issue 9's
targets were computed.  Speed is not judged here: that is the benchmark's job.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"


def test_relay_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "relay.json"
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    results = doc["results"]
    podterms = {"podterm", "podterm+rec"} | ({"podterm+tls"} if _has_trustme() else set())
    assert set(results["bulk"]) == podterms | {"raw-relay", "tws-relay"}
    assert set(results["small"]) == podterms | {"raw-relay", "tws-relay", "raw-echo", "tws-echo"}
    for workload in ("bulk", "small"):
        for name, r in results[workload].items():
            assert r["rate"] > 0, (workload, name, r)
    assert results["small"]["podterm"]["rtt"]["n"] > 0
    # Every round of the bulk workload delivered the whole file.
    for r in results["bulk"].values():
        assert all(rnd["units"] == doc["config"]["bulk_bytes"] for rnd in r["rounds"])
    pairs = {(r["workload"], r["baseline"]) for r in doc["ratios"]}
    assert pairs == {("small", "raw-relay"), ("small", "tws-relay"),
                     ("bulk", "raw-relay"), ("bulk", "tws-relay")}
    assert all(r["ratio"] > 0 for r in doc["ratios"])
    assert "Ratios against issue 9's targets" in proc.stdout
    # Recording + audit (and TLS) are measured against the plain gateway.
    costs = {(c["workload"], c["variant"]) for c in doc["variant_costs"]}
    assert ("bulk", "podterm+rec") in costs and ("small", "podterm+rec") in costs


def _has_trustme() -> bool:
    try:
        import trustme  # noqa: F401
    except ImportError:
        return False
    return True
