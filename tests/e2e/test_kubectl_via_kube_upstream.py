"""Real kubectl (and the Python client) -> podterm gateway (HTTPS, ``--upstream kube``) ->
fake kube-apiserver -> process.

Issue 4, "Done when": *the same tests pass through the kube upstream against
the fake apiserver, with the fake asserting it received exactly the stdin,
resize and close the user sent.*

One gateway subprocess per module (``python -m podterm serve --upstream kube
--kubeconfig F`` with the dev PKI and a static token file); its kubeconfig
points at a :class:`~tests.helpers.fake_apiserver.FakeApiServer` running in
this process (its own thread), with the gateway's service-account token.
kubectl talks only to the gateway, which passes its discovery and pod GET
through to the fake (``gateway.kubeapi.ApiserverBackend`` on
``KubeUpstream.get_json``) and execs there through the kube upstream; the
fake runs the command as a local process and records what it received.

Each scenario runs with the Cloud SDK dispatcher (``/usr/bin/kubectl``) and
every versioned binary from 1.30 to 1.33; a missing binary fails the test.
Every kubectl run is bounded (30 s).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.stream import stream

from podterm.net.certs import generate_dev_pki
from tests.helpers.fake_apiserver import ExecLog, FakeApiServer, FakePod, FakeUser
from tests.helpers.kubectl import SUPPORTED_MINORS, Kubectl, KubectlResult, kubectl_binary
from tests.helpers.kubectl import write_kubeconfig as write_fake_kubeconfig

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
USER_TOKEN = "alice-" + secrets.token_hex(8)
GATEWAY_SA_TOKEN = "gateway-sa-" + secrets.token_hex(8)
BINARIES = ("dispatcher", *SUPPORTED_MINORS)
V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
READY_TIMEOUT_S = 20.0
EXEC_WAIT_S = 10.0


@dataclass(frozen=True)
class Chain:
    """The running chain: the gateway's URL and CA, and the fake behind it."""

    url: str
    ca_pem: bytes
    log: Path
    fake: FakeApiServer


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                      env.get("PYTHONPATH")]))
    for name in list(env):
        if name.startswith(("PODTERM_", "KUBECTL_")) or name == "KUBECONFIG":
            del env[name]
    return env


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    workdir = tmp_path_factory.mktemp("kube-chain")
    fake = FakeApiServer(pods=[FakePod("mypod")],
                         tokens={GATEWAY_SA_TOKEN: FakeUser("system:serviceaccount:podterm:gw")},
                         close_wait_s=2.0, kill_grace_s=0.5)
    fake.start()
    kubeconfig = write_fake_kubeconfig(workdir / "upstream.kubeconfig", fake.url,
                                       ca_pem=fake.ca_pem, token=GATEWAY_SA_TOKEN)
    pki = generate_dev_pki(workdir / "pki")
    tokens = workdir / "tokens.csv"
    tokens.write_text(f'{USER_TOKEN},alice,u-alice,"podterm:admins"\n')
    ready = workdir / "ready.json"
    log = workdir / "gateway.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podterm", "serve", "--listen", "127.0.0.1:0",
             "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
             "--token-file", str(tokens), "--ready-file", str(ready), "--log-format", "text",
             "--upstream", "kube", "--kubeconfig", str(kubeconfig)],
            cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        # Another process's readiness: poll its ready file under a deadline.
        deadline = time.monotonic() + READY_TIMEOUT_S
        info = None
        while info is None:
            if proc.poll() is not None:
                pytest.fail(f"podterm serve exited with {proc.returncode}:\n"
                            f"{log.read_text(errors='replace')}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"podterm serve not ready within {READY_TIMEOUT_S} s:\n"
                            f"{log.read_text(errors='replace')}", pytrace=False)
            try:
                info = json.loads(ready.read_text())
            except (FileNotFoundError, ValueError):
                time.sleep(0.02)
        yield Chain(info["url"], pki.ca_cert.read_bytes(), log, fake)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        fake.stop()


@pytest.fixture(params=BINARIES)
def kubectl(request: pytest.FixtureRequest, chain: Chain, tmp_path: Path) -> Kubectl:
    binary = kubectl_binary(request.param)  # KubectlNotFound fails the test: never a skip
    return Kubectl(tmp_path, server_url=chain.url, ca_pem=chain.ca_pem, token=USER_TOKEN,
                   binary=binary)


def _last_exec(chain: Chain, before: int) -> ExecLog:
    """The one exec this test made (the fake numbers them in order)."""
    log = chain.fake.wait_exec(before, timeout=EXEC_WAIT_S)
    assert len(chain.fake.execs) == before + 1, chain.fake.execs[before:]
    return log


def _check(result: KubectlResult, chain: Chain) -> str:
    return f"{result}\ngateway log tail:\n{chain.log.read_text(errors='replace')[-3000:]}"


def test_echo_hi(kubectl: Kubectl, chain: Chain) -> None:
    before = len(chain.fake.execs)
    result = kubectl.run("exec", "mypod", "--", "echo", "hi")
    assert result.returncode == 0 and result.stdout == b"hi\n", _check(result, chain)
    log = _last_exec(chain, before)
    assert log.command == ("echo", "hi") and log.subprotocol == "v5.channel.k8s.io"
    assert log.user == "system:serviceaccount:podterm:gw"
    # kubectl sent no stdin: the gateway's session closes the process's input,
    # which reaches the pod as exactly one FF 00 and no data.
    assert log.stdin == b"" and log.stdin_closed and log.resizes == ()
    assert log.end == "exited" and log.exit_code == 0


def test_stdin_round_trip(kubectl: Kubectl, chain: Chain) -> None:
    before = len(chain.fake.execs)
    result = kubectl.run("exec", "-i", "mypod", "--", "cat", input=b"data\n")
    assert result.returncode == 0 and result.stdout == b"data\n", _check(result, chain)
    log = _last_exec(chain, before)
    assert log.stdin == b"data\n"  # exactly what kubectl read from its stdin
    assert log.stdin_closed  # kubectl's FF 00, relayed as the upstream's FF 00
    assert [kind for kind, _ in log.events if kind != "stdin"] == ["close_signal"]
    assert log.resizes == ()


def test_exit_code(kubectl: Kubectl, chain: Chain) -> None:
    before = len(chain.fake.execs)
    result = kubectl.run("exec", "mypod", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, _check(result, chain)
    assert b"command terminated with exit code 3" in result.stderr
    assert _last_exec(chain, before).exit_code == 3


def test_missing_pod_is_the_apiservers_not_found(kubectl: Kubectl, chain: Chain) -> None:
    # kubectl's pod GET passes through the gateway to the apiserver
    # (gateway.kubeapi's ApiserverBackend on KubeUpstream.get_json): its 404,
    # word for word, and no exec is attempted.
    before_execs, before_requests = len(chain.fake.execs), len(chain.fake.requests)
    result = kubectl.run("exec", "nope", "--", "true")
    assert result.returncode == 1, _check(result, chain)
    assert result.stderr == b'Error from server (NotFound): pods "nope" not found\n', \
        _check(result, chain)
    assert len(chain.fake.execs) == before_execs
    gets = [r for r in chain.fake.requests[before_requests:]
            if r.path == "/api/v1/namespaces/default/pods/nope"]
    assert gets and all(r.status == 404 for r in gets)


# ------------------------------------------------------------------ the official Python client


@pytest.fixture
def core_api(chain: Chain, tmp_path: Path) -> Iterator[client.CoreV1Api]:
    ca = tmp_path / "gateway-ca.pem"
    ca.write_bytes(chain.ca_pem)
    cfg = client.Configuration(host=chain.url)
    cfg.ssl_ca_cert = str(ca)
    cfg.api_key = {"authorization": USER_TOKEN}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    api = client.CoreV1Api(client.ApiClient(cfg))
    yield api
    api.api_client.close()


@pytest.mark.parametrize("subprotocol", [V5, V4])
def test_python_client_v4_and_v5(core_api: client.CoreV1Api, chain: Chain,
                                 subprotocol: str) -> None:
    before = len(chain.fake.execs)
    # _preload_content=False: the preloaded form leaks its TLS socket (ResourceWarning).
    ws = stream(core_api.connect_get_namespaced_pod_exec, "mypod", "default",
                command=["sh", "-c", "read x; echo got=$x; echo oops >&2; exit 7"],
                stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False,
                _headers={"sec-websocket-protocol": subprotocol})
    try:
        assert ws.subprotocol == subprotocol  # client -> gateway
        ws.write_stdin("line\n")
        ws.run_forever(timeout=EXEC_WAIT_S)
        assert not ws.is_open()
        assert ws.read_stdout() == "got=line\n"
        assert ws.read_stderr() == "oops\n"
        assert ws.returncode == 7
    finally:
        ws.close()
        if ws.sock is not None:
            ws.sock.shutdown()  # websocket-client leaves the TLS socket open otherwise
    log = _last_exec(chain, before)
    assert log.subprotocol == V5  # gateway -> apiserver: v5 whatever the client spoke
    assert log.stdin == b"line\n" and log.exit_code == 7
