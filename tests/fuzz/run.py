"""``python -m tests.fuzz.run --seconds N [--seed S] [--workers K]``: fuzz the gateway by hand.

The same harness as CI's bounded run (``tests/fuzz/test_gateway_fuzz.py``),
for as long as you like.  Prints a summary; exit status 0 when nothing was
found, 1 otherwise (each finding names the seed and the case to replay with
``--seed``).  Run from the repository root with the venv's Python.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import trio

from tests.fuzz.harness import fuzz_gateway


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run",
                                     description="Fuzz a live in-process podterm gateway.")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the case generators (default: random, printed)")
    parser.add_argument("--workers", type=int, default=6,
                        help="concurrent connections (default 6)")
    parser.add_argument("--keep", metavar="DIR", type=Path, default=None,
                        help="keep the audit log and recordings in DIR")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.workers < 1:
        parser.error("--seconds must be > 0 and --workers >= 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"fuzzing for {args.seconds:g}s with seed {seed} and {args.workers} workers",
          flush=True)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    report = trio.run(lambda: fuzz_gateway(args.seconds, seed=seed, workers=args.workers,
                                           work_dir=args.keep))
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
