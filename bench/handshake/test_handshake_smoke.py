"""CI smoke run of the handshake benchmark at its tiny size.

All three servers (podterm, trio-websocket, the raw trio floor) must accept
the bearer token (101 and a first message) and refuse a wrong one (401), and
each must complete handshakes in the timed rounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"


def test_handshake_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "handshake.json"
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["auth_checks"] == {"podterm": [101, 401], "tws": [101, 401],
                                  "raw-trio": [101, 401]}
    for name in ("podterm", "tws", "raw-trio"):
        summary = doc["summary"][name]
        assert summary["rate"] > 0, summary
        assert summary["errors"] == 0, summary
    assert doc["ratio"] > 0
    assert doc["floor"]["rate"] > 0 and "raw trio (floor)" in doc["report"]


def test_handshake_benchmark_tiny_with_a_baseline_tree(tmp_path: Path) -> None:
    """``--baseline-src``: a third contender from another tree (here the same one)."""
    out = tmp_path / "handshake.json"
    src = RUN.resolve().parents[2] / "src"
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(out),
                           "--baseline-src", str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["auth_checks"]["podterm-base"] == [101, 401]
    assert doc["summary"]["podterm-base"]["rate"] > 0
    assert doc["ratio_to_base"]["rate"] > 0
    assert "podterm / baseline tree" in doc["report"]
