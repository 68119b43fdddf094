#!/usr/bin/env bash
# Build the web terminal's vendored front-end files.
#
# xterm.js and its fit addon come from the npm registry (web/package.json,
# pinned by web/package-lock.json) and are never committed: this script runs
# `npm ci` in web/ when node_modules is missing or older than the lock file,
# then copies the browser builds the page loads into
# src/podterm/gateway/web/vendor/ (git-ignored, shipped as package data).
# Idempotent: a second run with nothing changed installs and copies nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEB="$ROOT/web"
NM="$WEB/node_modules"
VENDOR="$ROOT/src/podterm/gateway/web/vendor"
STAMP="$NM/.podterm-lock.sha256"

if ! command -v npm >/dev/null 2>&1; then
    echo "build_web: npm is not installed (needed for xterm.js from the npm registry)" >&2
    exit 1
fi

lock_sum="$(sha256sum "$WEB/package-lock.json" "$WEB/package.json" | sha256sum | cut -d' ' -f1)"
if [ ! -d "$NM" ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$lock_sum" ]; then
    echo "build_web: npm ci in web/"
    # --ignore-scripts: these packages need no install scripts, and none of
    # their dependencies gets to run code on the build machine.
    (cd "$WEB" && npm ci --ignore-scripts --no-audit --no-fund)
    echo "$lock_sum" > "$STAMP"
fi

# source (relative to node_modules) -> name in vendor/. The page loads them
# by these relative names: vendor/xterm.js, vendor/xterm.css, vendor/addon-fit.js.
FILES=(
    "@xterm/xterm/lib/xterm.js:xterm.js"
    "@xterm/xterm/css/xterm.css:xterm.css"
    "@xterm/xterm/LICENSE:LICENSE.xterm"
    "@xterm/addon-fit/lib/addon-fit.js:addon-fit.js"
    "@xterm/addon-fit/LICENSE:LICENSE.addon-fit"
)

mkdir -p "$VENDOR"
copied=0
for entry in "${FILES[@]}"; do
    src="$NM/${entry%%:*}"
    dst="$VENDOR/${entry##*:}"
    if [ ! -f "$src" ]; then
        echo "build_web: $src is missing after npm ci" >&2
        exit 1
    fi
    if ! cmp -s "$src" "$dst"; then
        cp "$src" "$dst"
        copied=$((copied + 1))
    fi
done
echo "build_web: vendor/ up to date ($copied file(s) copied) in ${VENDOR#"$ROOT"/}"
