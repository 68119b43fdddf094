#!/usr/bin/env bash
# Quick start, command 2: set up everything the tests need (idempotent) and run the
# whole suite with the compiled codec required, then a smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
# Nothing under test may wait on the caller's terminal or pipe.
exec </dev/null
bash scripts/setup.sh --test
export PODTERM_NATIVE=require PYTHONUNBUFFERED=1
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# Each test has its own deadline (pytest-timeout, see pyproject.toml); this one bounds
# the whole run so that CI always ends with a verdict and the stacks of what hung.
SUITE_LIMIT_S=${PODTERM_SUITE_LIMIT_S:-1800}
status=0
timeout -k 30 "$SUITE_LIMIT_S" .venv/bin/python -m pytest tests -q -p no:cacheprovider \
    --durations=15 "$@" || status=$?
if [[ $status == 0 && -d bench && $# == 0 ]]; then
    # Benchmarks are not timed tests: here each runs once, at tiny sizes, so none rots.
    timeout -k 30 600 .venv/bin/python -m pytest bench -q -p no:cacheprovider \
        --benchmark-disable || status=$?
fi
exit $status
