"""Smoke run of ``bench/locustfile.py``: a few locust users against a real gateway.

locust is in the ``bench`` extra, not ``test``: without it this test is
skipped (and says so in the ``-ra`` summary).  With it, three users create,
attach and type for a few seconds, and every request must succeed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402


def test_locustfile_headless(tmp_path: Path) -> None:
    pytest.importorskip("locust", reason="locust is in the bench extra")
    locust = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    gw = C.start_gateway(workdir=tmp_path)
    try:
        env = C.child_env({"PODTERM_TOKEN": gw.token,
                           "PODTERM_LOCUST_COMMAND": json.dumps(["cat"])})
        proc = subprocess.run(
            [locust, "-f", str(HERE / "locustfile.py"), "--host", gw.url, "--headless",
             "-u", "3", "-r", "3", "-t", "4s", "--stop-timeout", "5", "--json",
             "--loglevel", "WARNING"],
            capture_output=True, text=True, timeout=90, env=env, cwd=str(tmp_path))
    finally:
        gw.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = {s["name"]: s for s in json.loads(proc.stdout)}
    assert stats["keystroke echo"]["num_requests"] > 0
    assert all(s["num_failures"] == 0 for s in stats.values()), stats
