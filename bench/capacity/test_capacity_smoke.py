"""CI smoke run of the capacity benchmark at its tiny size (8 PTY sessions, 2 load generators).

Checks the whole path the real run takes: sessions opened from two
127.0.0.x source addresses, memory read from /proc, keystrokes typed and
echoed, every session echoing at the end, JSON written.  No plot is asked
for unless matplotlib is installed (it is in the ``bench`` extra, not ``test``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"


def test_capacity_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    plot = tmp_path / "latency.png"
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(out),
                           "--plot", str(plot)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    steps = doc["steps"]
    assert [s["sessions"] for s in steps] == [4, 8]
    for step in steps:
        assert step["failed"] == 0
        assert step["keys"] > 0 and step["echoed"] == step["keys"]
        assert step["latency"]["p50"] > 0
        assert step["gateway_rss"] > 0 and math.isfinite(step["gateway_rss_per_session"])
        assert step["shells"]["processes"] == step["sessions"]
    assert doc["echo_all"] == {**doc["echo_all"], "echoed": 8, "total": 8}
    # The gateway's own GC pause metrics (/metrics), default profile.
    assert doc["gc_final"]["profile"] == "default"
    assert set(doc["gc_final"]["generations"]) == {"0", "1", "2"}
    assert all(s["gc_typing"] is not None for s in steps)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert doc["plot"] is None
    else:
        assert plot.stat().st_size > 0


def test_capacity_benchmark_compares_gc_profiles(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--steps", "8", "--out", str(out),
                           "--gc-profile", "default,low-latency"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert list(doc["comparison"]) == ["default", "low-latency"]
    for name, summary in doc["comparison"].items():
        assert doc["profiles"][name]["gc_final"]["profile"] == name
        assert summary["sessions"] == 8 and summary["keys"] > 0
        assert summary["latency"]["p99"] > 0
        assert math.isfinite(summary["gateway_rss_per_session"])
        assert summary["gc_max_s"] >= 0
    assert "GC profiles compared at 8 sessions" in doc["report"]


def test_capacity_benchmark_with_workers_over_the_echo_agent(tmp_path: Path) -> None:
    """``--workers 2 --upstream agent``: one echo agent per worker, sessions on both,
    attaches handed to the holding worker (one descriptor per session there)."""
    out = tmp_path / "capacity.json"
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--steps", "8", "--workers", "2",
                           "--upstream", "agent", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    step = doc["steps"][-1]
    assert step["workers"] == 2 and step["failed"] == 0
    assert step["keys"] > 0 and step["echoed"] == step["keys"]
    # Sessions sit with their pod's agent: one agent per worker, the same count each.
    assert step["worker_sessions"] == {"0": 4.0, "1": 4.0}
    assert len(step["worker_fds"]) == 2
    assert doc["echo_all"] == {**doc["echo_all"], "echoed": 8, "total": 8}
    assert "2 workers at 8 sessions" in doc["report"]
