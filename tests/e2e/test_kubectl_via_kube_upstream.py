"""Real kubectl (and the Python client) -> podterm gateway (HTTPS, ``--upstream kube``) ->
fake kube-apiserver -> process.

Issue 4, "Done when": *the same tests pass through the kube upstream against
the fake apiserver, with the fake asserting it received exactly the stdin,
resize and close the user sent.*

Two gateway subprocesses per module (``python -m podterm serve --upstream kube
--kubeconfig F`` with the dev PKI and a static token file), both in front of
one :class:`~tests.helpers.fake_apiserver.FakeApiServer` running in this
process (its own thread), with the gateway's service-account token:

- ``chain``: ``--impersonate`` (the apiserver sees the podterm user) and
  ``--policy`` (alice is an admin, carol may exec, bob may nothing); shell
  restore on (the default).  The fake denies carol ``pods/exec``: the
  gateway lets her in, the apiserver keeps her out.
- ``plain_chain``: no impersonation (the apiserver sees the gateway's
  service account) and ``PODTERM_RESTORE_SHELLS=false``; it is started by
  the tests that show what those two settings change.

kubectl talks only to a gateway, which passes its discovery and pod GET
through to the fake (``gateway.kubeapi.ApiserverBackend`` on
``KubeUpstream.get_json``) and execs there through the kube upstream; the
fake runs the command as a local process and records what it received.

Each kubectl scenario runs with the Cloud SDK dispatcher (``/usr/bin/kubectl``)
and every versioned binary from 1.30 to 1.33; a missing binary fails the
test.  Every kubectl run is bounded (30 s); ``exec -it`` runs in a tmux pane
(``tests.helpers.tmux``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.stream import stream

from podterm.net.certs import generate_dev_pki
from tests.helpers.fake_apiserver import ExecLog, FakeApiServer, FakePod, FakeUser
from tests.helpers.kubectl import SUPPORTED_MINORS, Kubectl, KubectlResult, kubectl_binary
from tests.helpers.kubectl import write_kubeconfig as write_fake_kubeconfig
from tests.helpers.procs import stop, wait_ready
from tests.helpers.tmux import Tmux, tmux_session

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
USER_TOKEN = "alice-" + secrets.token_hex(8)  # podterm:admins
BOB_TOKEN = "bob-" + secrets.token_hex(8)  # no binding: the gateway denies him
CAROL_TOKEN = "carol-" + secrets.token_hex(8)  # may exec; the apiserver denies her
GATEWAY_SA = "system:serviceaccount:podterm:gw"
GATEWAY_SA_TOKEN = "gateway-sa-" + secrets.token_hex(8)
BINARIES = ("dispatcher", *SUPPORTED_MINORS)
V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
READY_TIMEOUT_S = 20.0
EXEC_WAIT_S = 10.0
POLICY = """\
roles:
  - name: admin
    rules:
      - verbs: ["*"]
  - name: shell
    rules:
      - verbs: [exec, attach]
bindings:
  - name: admins
    role: admin
    groups: ["podterm:admins"]
  - name: carol
    role: shell
    users: [carol]
"""


@dataclass(frozen=True)
class Chain:
    """A running gateway: its URL and CA, its log, and the fake behind it."""

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
def fake() -> Iterator[FakeApiServer]:
    api = FakeApiServer(pods=[FakePod("mypod")],
                        tokens={GATEWAY_SA_TOKEN: FakeUser(GATEWAY_SA, can_impersonate=True)},
                        deny=["carol"], close_wait_s=2.0, kill_grace_s=0.5)
    api.start()
    try:
        yield api
    finally:
        api.stop()


@contextmanager
def _gateway(workdir: Path, fake: FakeApiServer, args: list[str],
             env: dict[str, str]) -> Iterator[Chain]:
    """``podterm serve --upstream kube`` in front of ``fake``, with ``args`` and ``env`` added."""
    kubeconfig = write_fake_kubeconfig(workdir / "upstream.kubeconfig", fake.url,
                                       ca_pem=fake.ca_pem, token=GATEWAY_SA_TOKEN)
    pki = generate_dev_pki(workdir / "pki")
    tokens = workdir / "tokens.csv"
    tokens.write_text(f'{USER_TOKEN},alice,u-alice,"podterm:admins"\n'
                      f"{BOB_TOKEN},bob,u-bob,dev\n"
                      f"{CAROL_TOKEN},carol,u-carol,dev\n")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    ready = workdir / "ready.json"
    log = workdir / "gateway.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podterm", "serve", "--listen", "127.0.0.1:0",
             "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
             "--token-file", str(tokens), "--policy", str(policy), "--ready-file", str(ready),
             "--log-format", "text", "--upstream", "kube", "--kubeconfig", str(kubeconfig),
             *args],
            cwd=ROOT, env={**_env(), **env}, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        info = wait_ready(proc, ready, log, READY_TIMEOUT_S)
        yield Chain(info["url"], pki.ca_cert.read_bytes(), log, fake)
    finally:
        stop(proc, 15)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, fake: FakeApiServer) -> Iterator[Chain]:
    """Impersonating (the flag), with the policy; shell restore at its default (on)."""
    with _gateway(tmp_path_factory.mktemp("kube-chain"), fake, ["--impersonate"], {}) as gw:
        yield gw


@pytest.fixture(scope="module")
def plain_chain(tmp_path_factory: pytest.TempPathFactory,
                fake: FakeApiServer) -> Iterator[Chain]:
    """No impersonation (the default); shell restore off (the variable)."""
    with _gateway(tmp_path_factory.mktemp("kube-plain"), fake, [],
                  {"PODTERM_RESTORE_SHELLS": "false"}) as gw:
        yield gw


KubectlFactory = Callable[[Chain, str], Kubectl]


@pytest.fixture(params=BINARIES)
def kubectl_as(request: pytest.FixtureRequest, tmp_path: Path) -> KubectlFactory:
    """``kubectl_as(chain, token)``: this binary, in its own directory, against ``chain``."""
    binary = kubectl_binary(request.param)  # KubectlNotFound fails the test: never a skip
    count = 0

    def make(gw: Chain, token: str) -> Kubectl:
        nonlocal count
        count += 1
        return Kubectl(tmp_path / f"kubectl-{count}", server_url=gw.url, ca_pem=gw.ca_pem,
                       token=token, binary=binary)

    return make


@pytest.fixture
def kubectl(kubectl_as: KubectlFactory, chain: Chain) -> Kubectl:
    """alice's kubectl against the impersonating chain."""
    return kubectl_as(chain, USER_TOKEN)


def _last_exec_of(chain: Chain, index: int) -> ExecLog:
    """Exec number ``index``, once finished."""
    return chain.fake.wait_exec(index, timeout=EXEC_WAIT_S)


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
    # The gateway's credential, acting as the podterm user (--impersonate).
    assert log.user == GATEWAY_SA
    assert (log.impersonate_user, log.impersonate_groups) == ("alice", ("podterm:admins",))
    assert log.effective_user == "alice"
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


# ------------------------------------------------------------------ exec -it in a terminal


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    with tmux_session(tmp_path, prefix="podterm-kube-chain") as t:
        yield t


def test_exec_it_runs_an_interactive_shell_and_resizes(kubectl: Kubectl, chain: Chain,
                                                       tmux: Tmux) -> None:
    before = len(chain.fake.execs)
    argv = ["env", *[f"{k}={v}" for k, v in kubectl.env().items()],
            *kubectl.argv("exec", "-it", "mypod", "--", "sh")]
    tmux.wait_for(r"^local\$")
    tmux.send(f"{shlex.join(argv)}; echo kubectl-rc=$?")
    tmux.wait_for(r"^[$#] $")  # the remote shell's prompt
    typed = ["PS1='remote> '", "echo size=$(stty size) tty=$(tty)", "echo size2=$(stty size)",
             "exit 5"]
    tmux.send(typed[0])
    tmux.wait_for(r"^remote> $")
    tmux.send(typed[1])
    # The pod's terminal has kubectl's size, so the fake has had it.
    tmux.wait_for(r"^size=30 100 tty=/dev/pts/\d+")
    tmux.resize(120, 40)  # SIGWINCH -> kubectl -> gateway -> kube upstream -> fake
    tmux.send(typed[2])
    tmux.wait_for(r"^size2=40 120\s*$")
    tmux.send(typed[3])
    tmux.wait_for(r"^kubectl-rc=5\s*$")
    log = _last_exec(chain, before)
    assert (log.command, log.tty, log.stdin_requested) == (("sh",), True, True)
    # Exactly the keys typed (Enter is CR on a raw terminal), the terminal's
    # two sizes (width, height), and the close after the shell exited.
    assert log.stdin == "".join(f"{line}\r" for line in typed).encode(), log.stdin
    # Only the sizes the user's terminal had: the gateway opens kubectl's tty
    # sessions on the kube upstream without a size of its own, and kubectl's
    # first resize is the first the apiserver gets.
    assert log.resizes == ((100, 30), (120, 40))
    assert (log.end, log.exit_code) == ("exited", 5)
    assert log.client_close_code == 1000  # the gateway answered the fake's Close
    assert not log.stdin_closed  # a terminal session has no stdin EOF (spec §7.1)


# ------------------------------------------------------------------ Forbidden


def test_a_user_the_gateway_denies_gets_kubectls_forbidden_message(
        kubectl_as: KubectlFactory, chain: Chain) -> None:
    # bob authenticates, but the policy binds him to nothing: the gateway's
    # RBAC refuses kubectl's first request for the pod; nothing reaches the fake.
    before_execs, before_requests = len(chain.fake.execs), len(chain.fake.requests)
    result = kubectl_as(chain, BOB_TOKEN).run("exec", "mypod", "--", "echo", "hi")
    assert result.returncode == 1, _check(result, chain)
    assert result.stdout == b""
    assert result.stderr == (
        b'Error from server (Forbidden): pods "mypod" is forbidden: User "bob" cannot get '
        b'resource "pods" in API group "" in the namespace "default": user \'bob\' may not '
        b"exec default/mypod: no rule allows it (denied by default)\n"), _check(result, chain)
    assert len(chain.fake.execs) == before_execs
    assert not [r for r in chain.fake.requests[before_requests:] if "/pods/" in r.path]


def test_a_user_the_apiserver_denies_gets_its_forbidden_message(
        kubectl_as: KubectlFactory, chain: Chain) -> None:
    # carol may exec by the gateway's policy; the gateway impersonates her, and
    # the apiserver's RBAC refuses her pods/exec.  The gateway dials the
    # apiserver before it answers kubectl's upgrade, so the refusal is a
    # refused upgrade with the apiserver's code and Status, and kubectl's SPDY
    # retry gets the same: kubectl's normal "Error from server (Forbidden)",
    # the apiserver's message word for word (spec §9).
    before_execs, before = len(chain.fake.execs), len(chain.fake.requests)
    result = kubectl_as(chain, CAROL_TOKEN).run("exec", "mypod", "--", "echo", "hi")
    assert result.returncode == 1, _check(result, chain)
    assert result.stdout == b""
    assert result.stderr == (
        b'Error from server (Forbidden): pods "mypod" is forbidden: User "carol" cannot get '
        b'resource "pods/exec" in API group "" in the namespace "default"\n'), \
        _check(result, chain)
    assert len(chain.fake.execs) == before_execs  # nothing ran in the pod
    # One dial (kubectl's GET); its SPDY retry was answered with that refusal.
    upgrades = [r for r in chain.fake.requests[before:] if r.path.endswith("/exec")]
    assert [r.status for r in upgrades] == [403], upgrades
    assert upgrades[0].header("impersonate-user") == "carol"


def test_a_pod_gone_before_the_exec_gets_the_apiservers_not_found(
        kubectl: Kubectl, chain: Chain) -> None:
    # kubectl's GET finds the pod; by the time of its exec the apiserver says
    # it is gone (the fake answers the next exec upgrade with a 404).
    before_execs, before = len(chain.fake.execs), len(chain.fake.requests)
    chain.fake.refuse_upgrades(1, 404, 'pods "mypod" not found')
    result = kubectl.run("exec", "mypod", "--", "echo", "hi")
    assert result.returncode == 1, _check(result, chain)
    assert result.stdout == b""
    assert result.stderr == b'Error from server (NotFound): pods "mypod" not found\n', \
        _check(result, chain)
    assert len(chain.fake.execs) == before_execs
    requests = chain.fake.requests[before:]
    pod_gets = [r.status for r in requests if r.path == "/api/v1/namespaces/default/pods/mypod"]
    assert pod_gets and set(pod_gets) == {200}  # kubectl's GET, and the gateway's own
    assert [r.status for r in requests if r.path.endswith("/exec")] == [404]


# ------------------------------------------------------------------ the official Python client


@contextmanager
def _core_api(gw: Chain, token: str, workdir: Path) -> Iterator[client.CoreV1Api]:
    ca = workdir / "gateway-ca.pem"
    ca.write_bytes(gw.ca_pem)
    cfg = client.Configuration(host=gw.url)
    cfg.ssl_ca_cert = str(ca)
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    api = client.CoreV1Api(client.ApiClient(cfg))
    try:
        yield api
    finally:
        api.api_client.close()


@pytest.fixture
def core_api(chain: Chain, tmp_path: Path) -> Iterator[client.CoreV1Api]:
    with _core_api(chain, USER_TOKEN, tmp_path) as api:
        yield api


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


# ------------------------------------------------- --impersonate and --restore-shells at work


def test_impersonation_is_what_lets_the_apiserver_judge_the_user(
        kubectl_as: KubectlFactory, chain: Chain, plain_chain: Chain) -> None:
    # The same user, the same command: with --impersonate the apiserver sees
    # carol and refuses her (above); without it, the gateway's own account.
    before = len(plain_chain.fake.execs)
    result = kubectl_as(plain_chain, CAROL_TOKEN).run("exec", "mypod", "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), _check(result, plain_chain)
    log = _last_exec(plain_chain, before)
    assert (log.user, log.effective_user) == (GATEWAY_SA, GATEWAY_SA)
    assert log.impersonate_user is None and log.impersonate_groups == ()
    assert log.header("impersonate-user") is None
    # And with it (alice may exec in the pod, so the exec runs, as alice).
    before = len(chain.fake.execs)
    result = kubectl_as(chain, USER_TOKEN).run("exec", "mypod", "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), _check(result, chain)
    assert _last_exec(chain, before).header("impersonate-user") == "alice"


def _read_until(ws: Any, needle: str, *, timeout: float = EXEC_WAIT_S) -> str:
    """Pump the Python client until ``needle`` has shown on stdout; what was read."""
    deadline = time.monotonic() + timeout
    seen = ""
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not ws.is_open():
            pytest.fail(f"{needle!r} not read within {timeout} s (open={ws.is_open()}); "
                        f"read: {seen!r}", pytrace=False)
        seen += ws.read_stdout(timeout=min(remaining, 1.0))
    return seen


@contextmanager
def _tty_shell(gw: Chain, workdir: Path) -> Iterator[Any]:
    """alice's ``sh`` with a terminal through ``gw``, by the Python client (v5)."""
    with _core_api(gw, USER_TOKEN, workdir) as api:
        ws = stream(api.connect_get_namespaced_pod_exec, "mypod", "default", command=["sh"],
                    stdin=True, stdout=True, stderr=False, tty=True, _preload_content=False)
        try:
            yield ws
        finally:
            ws.close()
            if ws.sock is not None:
                ws.sock.shutdown()


def test_a_lost_shell_is_restored_with_restore_shells_on(chain: Chain,
                                                         tmp_path: Path) -> None:
    before = len(chain.fake.execs)
    with _tty_shell(chain, tmp_path) as ws:
        chain.fake.wait_exec(before, until=lambda log: log.pid is not None,
                             timeout=EXEC_WAIT_S)
        ws.write_stdin("echo one-$((1+1))\r")
        _read_until(ws, "one-2")
        assert chain.fake.drop_connections() == 1  # the apiserver link dies, not kubectl's
        _read_until(ws, "[podterm] the connection to the pod was lost; press a key to start "
                        "a new shell")
        ws.write_stdin("echo back-$((6*7))\r")
        _read_until(ws, "back-42")
        ws.write_stdin("exit 4\r")
        ws.run_forever(timeout=EXEC_WAIT_S)
        assert not ws.is_open()
        assert ws.returncode == 4
    old = _last_exec_of(chain, before)
    assert old.end == "dropped" and old.stdin == b"echo one-$((1+1))\r"
    new = chain.fake.wait_exec(before + 1, timeout=EXEC_WAIT_S)
    # The key that started the new shell, once, then the rest.
    assert new.stdin == b"echo back-$((6*7))\rexit 4\r" and new.exit_code == 4


def test_a_lost_shell_ends_the_session_with_restore_shells_off(plain_chain: Chain,
                                                               tmp_path: Path) -> None:
    before = len(plain_chain.fake.execs)
    with _tty_shell(plain_chain, tmp_path) as ws:
        plain_chain.fake.wait_exec(before, until=lambda log: log.pid is not None,
                                   timeout=EXEC_WAIT_S)
        ws.write_stdin("echo one-$((1+1))\r")
        _read_until(ws, "one-2")
        assert plain_chain.fake.drop_connections() == 1
        ws.run_forever(timeout=EXEC_WAIT_S)  # the gateway ends it: Failure Status, Close 1000
        assert not ws.is_open()
        status = json.loads(ws.read_channel(3))
        assert (status["status"], status["reason"]) == ("Failure", "InternalError"), status
        assert re.fullmatch(r"the session's upstream failed; see the podterm gateway's log "
                            r"\(session s-[0-9a-f]+\)", status["message"]), status
    assert _last_exec_of(plain_chain, before).end == "dropped"
    assert len(plain_chain.fake.execs) == before + 1  # no new shell
