#!/usr/bin/env bash
# Install the browser the end-to-end web tests drive: Debian's Chromium at
# /usr/bin/chromium. Idempotent: does nothing when it is already there.
#
# Never downloads a browser of a test tool's own (`playwright install` and the
# like fail on this network and are not what we test against); the Python
# `playwright` package comes from the project's `test` extra and drives this
# Chromium through `executable_path="/usr/bin/chromium"`.
# fonts-dejavu-core gives xterm.js a real monospace font to measure its cells with.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "install_browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) already at $CHROMIUM"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_browser: need root (or sudo) to apt-get install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package index only when apt does not know the package yet: an
# update costs time and network, and a machine with a fresh index needs none.
if ! apt-cache show chromium >/dev/null 2>&1 \
        || [ -z "$(apt-cache policy chromium 2>/dev/null | awk '/Candidate:/ {print $2}' | grep -v '(none)')" ]; then
    $SUDO apt-get update
fi
if ! $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core; then
    # A stale index can name a version the mirror no longer has: refresh once.
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

if [ ! -x "$CHROMIUM" ]; then
    echo "install_browser: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
echo "install_browser: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium) at $CHROMIUM"
