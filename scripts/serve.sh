#!/usr/bin/env bash
# Quick start, command 1: set up (idempotent) and run the gateway on its embedded
# defaults: local PTY upstream, in-memory store, 127.0.0.1:7780, a generated admin
# token; it prints the web terminal URL.  Extra arguments go to `podterm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/podterm serve "$@"
