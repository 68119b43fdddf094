"""``podterm bench capacity|relay|handshake [ARGS...]``: run a benchmark from the source tree.

The benchmarks live in ``bench/`` beside ``src/`` (``bench/<kind>/run.py``),
not in the installed package: they start gateways, baseline servers and load
generators as subprocesses and need the repository's ``bench/common.py``.
This entry point finds that directory and runs the script with this Python,
passing ``ARGS`` through unchanged (``podterm bench relay --help`` shows the
benchmark's own options).  The script prints its progress on stderr as it
goes, then its table on stdout, and writes JSON under ``bench/results/``.

Where it looks, in order: ``$PWD/bench`` (running from a checkout), then the
``bench/`` next to the ``src/`` this package was imported from (an editable
install).  A wheel install has neither; the command then says so and exits 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from podterm.config import BenchOptions

__all__ = ["KINDS", "find_script", "main"]

#: What ``podterm bench`` can run; each is ``bench/<kind>/run.py``.
KINDS = ("capacity", "relay", "handshake")


def find_script(kind: str, cwd: Path | None = None) -> Path | None:
    """The ``bench/<kind>/run.py`` to run, or None when no source tree is at hand."""
    here = Path(__file__).resolve()
    candidates = [(cwd or Path.cwd()) / "bench"]
    # src/podterm/bench.py -> the checkout's root is two levels above src/.
    if here.parent.parent.name == "src":
        candidates.append(here.parents[2] / "bench")
    for bench_dir in candidates:
        script = bench_dir / kind / "run.py"
        if script.is_file() and (bench_dir / "common.py").is_file():
            return script
    return None


def main(options: BenchOptions) -> int:
    """Run ``bench/<kind>/run.py ARGS`` and return its exit status.

    Returns 2 for an unknown kind, 1 when the benchmarks are not available
    (not a source checkout), else the benchmark's own status.
    """
    if options.kind not in KINDS:
        print(f"podterm bench: unknown benchmark {options.kind!r} "
              f"(choose from {', '.join(KINDS)})", file=sys.stderr)
        return 2
    script = find_script(options.kind)
    if script is None:
        print(f"podterm bench: bench/{options.kind}/run.py not found; the benchmarks ship with "
              "the source tree, not the package: run this from a podterm checkout",
              file=sys.stderr)
        return 1
    root = script.parents[2]
    env = dict(os.environ)
    src = root / "src"
    if src.is_dir():
        # The benchmark starts `python -m podterm serve`: the same tree as its scripts.
        env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
    shown = script.relative_to(root) if script.is_relative_to(root) else script
    print(f"podterm bench: running {shown} {' '.join(options.args)}".rstrip(),
          file=sys.stderr, flush=True)
    try:
        return subprocess.call([sys.executable, str(script), *options.args], cwd=str(root),
                               env=env)
    except KeyboardInterrupt:
        return 130
