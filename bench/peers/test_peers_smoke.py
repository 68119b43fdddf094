"""CI smoke run of the peer-hop benchmark at its tiny size, so that it cannot rot.

Two gateways, one session on A, attached directly and through B: every
round trip came back and the whole bulk output arrived both ways.  Speed is
not judged here: that is the benchmark's job (docs/ha.md, "What a hop costs").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"


def test_peer_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for name in ("direct", "via-peer"):
        assert doc[name]["rtt"]["n"] == doc["config"]["keystrokes"] * doc["config"]["rounds"]
        assert doc[name]["small_rate"] > 0 and doc[name]["bulk_bytes_per_s"] > 0
    assert doc["ratios"]["small_rate"] > 0 and doc["ratios"]["bulk"] > 0
