#!/usr/bin/env bash
# Quick start, command 2: set up everything the tests need (idempotent) and run the
# whole suite with the compiled codec required, then a smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export PODTERM_NATIVE=require
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
status=0
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@" || status=$?
if [[ $status == 0 && -d bench && $# == 0 ]]; then
    # Benchmarks are not timed tests: here each runs once, at tiny sizes, so none rots.
    .venv/bin/python -m pytest bench -q -p no:cacheprovider --benchmark-disable || status=$?
fi
exit $status
