#!/usr/bin/env bash
# Idempotent project setup: venv, Python deps, the Cython codec, web assets.
# Usage: scripts/setup.sh [--test]     (--test also installs what the test suite needs)
# Re-running is cheap: each step is skipped when its inputs did not change.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.state
mkdir -p "$STATE"
WANT_TEST=0
[[ "${1:-}" == "--test" ]] && WANT_TEST=1

log() { printf '[setup] %s\n' "$*" >&2; }
stamp_ok() { [[ -f "$STATE/$1" && "$(cat "$STATE/$1")" == "$2" ]]; }
stamp_set() { printf '%s' "$2" > "$STATE/$1"; }

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
VPY=$ROOT/.venv/bin/python

# 1. Python dependencies (re-run when pyproject/setup.py change).
extras=""
# The tests smoke-run every benchmark, the locust file among them: the bench extra too.
[[ $WANT_TEST == 1 ]] && extras="[test,bench]"
deps_key="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)$extras"
if ! stamp_ok deps "$deps_key"; then
    log "installing build tools and podterm$extras (editable; pip's log: .state/pip.log)"
    {
        "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel 'Cython>=3.0' &&
        PODTERM_NATIVE=require "$VPY" -m pip install -q --disable-pip-version-check \
            --no-build-isolation -e ".$extras"
    } >"$STATE/pip.log" 2>&1 || { grep -v '^WARNING: Location' "$STATE/pip.log" >&2; exit 1; }
    stamp_set deps "$deps_key"
fi

# 2. The native codec: rebuild in place whenever a .pyx/.pxd changed.
native_key="$(cat native/*.pyx native/*.pxd 2>/dev/null | sha256sum | cut -c1-16)"
if ! stamp_ok native "$native_key" || ! "$VPY" -c 'import podterm._native.frame' 2>/dev/null; then
    if ls native/*.pyx >/dev/null 2>&1; then
        log "building the Cython codec"
        PODTERM_NATIVE=require "$VPY" setup.py -q build_ext --inplace >/dev/null
    fi
    stamp_set native "$native_key"
fi

# 3. Web terminal assets (xterm.js from npm; not committed).
if [[ -x scripts/build_web.sh ]]; then
    bash scripts/build_web.sh
fi

# 4. What only the tests need: system packages, a browser.
if [[ $WANT_TEST == 1 ]]; then
    need=()
    command -v tmux >/dev/null || need+=(tmux)
    command -v redis-server >/dev/null || need+=(redis-server)
    if (( ${#need[@]} )); then
        log "apt-get install ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    if [[ -x scripts/install_browser.sh ]]; then
        bash scripts/install_browser.sh
    fi
fi
log "ready"
