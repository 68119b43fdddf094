"""The README's first quick-start command: ``scripts/serve.sh`` with no arguments.

It must set up (idempotently; the test suite's own setup already ran, so this
is the cheap path) and bring up the embedded default — local PTY upstream,
in-memory store, 127.0.0.1:7780, a generated admin token — and print the web
terminal URL with the token in its fragment.  The test then uses that token
for real: the page is served, the API accepts it, a session runs a command,
and SIGTERM ends the gateway with status 0.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"web terminal: (http://127\.0\.0\.1:7780)/#token=([A-Za-z0-9_\-]{20,})")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the gateway's listener does: TIME_WAIT leftovers do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _read_until(proc: subprocess.Popen[bytes], pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
    """Read the child's stdout (raw fd: no buffering that select() cannot see) until ``pattern``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        seen += chunk
        m = pattern.search(seen.decode("utf-8", "replace"))
        if m:
            return m
    raise AssertionError("serve.sh never printed the web terminal URL; output:\n"
                         + seen.decode("utf-8", "replace"))


def _request(url: str, token: str, method: str = "GET", body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_serve_script_brings_up_the_embedded_default() -> None:
    if not _port_free(7780):
        pytest.fail("127.0.0.1:7780 (the embedded default port) is in use; stop whatever holds it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTERM_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        m = _read_until(proc, URL_LINE, time.monotonic() + 120)
        base, token = m.group(1), m.group(2)

        status, page = _request(base + "/", token)
        assert status == 200 and b"xterm" in page

        assert _request(base + "/api/v1/sessions", "wrong-token")[0] == 401

        # The CLI as the banner tells a user to run it.
        cli_env = dict(env, PODTERM_SERVER=base, PODTERM_TOKEN=token)
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "podterm"), "exec", "local", "--",
                               "sh", "-c", "echo quick-$((2+3)); exit 5"],
                              env=cli_env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
        assert "quick-5" in done.stdout, done.stderr
        assert done.returncode == 5, done.stderr

        status, body = _request(base + "/api/v1/sessions", token, "POST", {"tty": True})
        assert status == 201, body
        assert json.loads(body)["upstream"] == "local"  # the embedded default upstream

        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
