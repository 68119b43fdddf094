"""``podterm agent`` as a real process, against a real ``podterm serve``, driven by ``podterm exec``.

Three processes, as in a pod: the gateway (``python -m podterm serve`` with a
static token file holding an admin token and an agent token in group
``podterm:agents``), the sidecar (``python -m podterm agent --token-file ...
--ready-file ...``), and the CLI (``python -m podterm exec --upstream agent
team-a/web-1 -- ...``).  Readiness is told by each server's ``--ready-file``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.procs import stop, wait_ready

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 30.0
ADMIN_TOKEN = "e2e-admin-token-0123456789"
AGENT_TOKEN = "e2e-agent-token-0123456789"
NS, POD = "team-a", "web-1"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODTERM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    env["SHELL"] = "/bin/sh"
    env.pop("ENV", None)
    env.update(extra)
    return env


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def _started(args: list[str], log: Path, env: dict[str, str]) -> Iterator[Process]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "podterm", *args], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    process = Process(proc, log)
    try:
        yield process
    finally:
        stop(proc, 15)


@dataclass(frozen=True)
class Deployment:
    url: str
    gateway: Process
    agent: Process
    agent_ready: dict[str, Any]


@contextmanager
def _deployment(tmp_path: Path, *agent_args: str) -> Iterator[Deployment]:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f"{ADMIN_TOKEN},admin,admin-uid,podterm:admins\n"
                      f"{AGENT_TOKEN},agent-web-1,agent-uid,podterm:agents\n")
    agent_token = tmp_path / "agent.token"
    agent_token.write_text(AGENT_TOKEN + "\n")
    gw_ready = tmp_path / "gateway-ready.json"
    agent_ready = tmp_path / "agent-ready.json"
    with _started(["serve", "--listen", "127.0.0.1:0", "--token-file", str(tokens),
                   "--ready-file", str(gw_ready), "--log-format", "text"],
                  tmp_path / "gateway.log", _env()) as gateway:
        url = wait_ready(gateway.proc, gw_ready, gateway.log, READY_TIMEOUT_S)["url"].rstrip("/")
        # The Downward API's variables name the pod, as in a real sidecar.
        with _started(["agent", "--gateway", url, "--token-file", str(agent_token),
                       "--ready-file", str(agent_ready), *agent_args],
                      tmp_path / "agent.log",
                      _env(POD_NAMESPACE=NS, POD_NAME=POD)) as agent:
            info = wait_ready(agent.proc, agent_ready, agent.log, READY_TIMEOUT_S,
                              what="podterm agent")
            yield Deployment(url, gateway, agent, info)
            # A clean stop: SIGTERM ends the agent with status 0.
            assert stop(agent.proc, 15) == 0, agent.text()


def _podterm_exec(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "podterm", "exec", "--upstream", "agent", f"{NS}/{POD}", *args],
        cwd=ROOT, env=_env(PODTERM_SERVER=url, PODTERM_TOKEN=ADMIN_TOKEN),
        stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT_S)


def test_exec_through_the_agent_prints_hi(tmp_path: Path) -> None:
    with _deployment(tmp_path) as dep:
        assert dep.agent_ready == {"gateway": dep.url, "pid": dep.agent.proc.pid}
        done = _podterm_exec(dep.url, "--", "echo", "hi")
        assert done.stdout == b"hi\n", (done.stderr, dep.agent.text(), dep.gateway.text())
        assert done.returncode == 0
        # The remote command's own status comes back, and it ran inside the agent's pod.
        done = _podterm_exec(dep.url, "--", "sh", "-c", 'echo "$POD_NAME"; exit 7')
        assert done.stdout == b"web-1\n" and done.returncode == 7, done.stderr
        assert "agent.register.complete team-a/web-1" in dep.agent.text()


def test_exec_for_a_pod_without_agent_fails_clearly(tmp_path: Path) -> None:
    with _deployment(tmp_path) as dep:
        done = subprocess.run(
            [sys.executable, "-m", "podterm", "exec", "--upstream", "agent", f"{NS}/other-pod",
             "--", "true"],
            cwd=ROOT, env=_env(PODTERM_SERVER=dep.url, PODTERM_TOKEN=ADMIN_TOKEN),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT_S)
        assert done.returncode == 1
        assert b"no agent is registered for pod team-a/other-pod" in done.stderr


def test_agent_cli_rejects_bad_flags(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "podterm", "agent", "--gateway", "http://127.0.0.1:1",
         "--namespace", NS, "--pod", POD],
        cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, capture_output=True,
        timeout=RUN_TIMEOUT_S)
    assert done.returncode == 2
    assert b"exactly one identity" in done.stderr
    missing_ca = tmp_path / "missing-ca.crt"
    done = subprocess.run(
        [sys.executable, "-m", "podterm", "agent", "--gateway", "https://127.0.0.1:1",
         "--namespace", NS, "--pod", POD, "--ca", str(missing_ca), "--token-file",
         str(missing_ca)],
        cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, capture_output=True,
        timeout=RUN_TIMEOUT_S)
    assert done.returncode == 2, done.stderr
    assert b"--ca" in done.stderr
    token = tmp_path / "agent.token"
    token.write_text(AGENT_TOKEN + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "podterm", "agent", "--gateway", "http://127.0.0.1:1",
         "--namespace", NS, "--pod", POD, "--token-file", str(token), "--retain-bytes", "1KiB"],
        cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, capture_output=True,
        timeout=RUN_TIMEOUT_S)
    assert done.returncode == 2, done.stderr
    assert b"--retain-bytes" in done.stderr and b"from 64KiB" in done.stderr
