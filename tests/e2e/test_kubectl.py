"""The real kubectl against the gateway over HTTPS (issue 4, "Done when").

One gateway subprocess per module (``python -m podterm serve`` with the dev
PKI from :func:`podterm.net.certs.generate_dev_pki`, a static token file and
``--ready-file``), the local upstream behind it.  Every test gets its own
kubectl working directory (kubeconfig, ``--cache-dir``, ``HOME``: no
discovery cache leaks between tests or binaries), and its kubeconfig is the
output of ``podterm kubeconfig`` itself.

Each scenario runs with the Cloud SDK dispatcher (``/usr/bin/kubectl``, which
picks its binary from the gateway's ``/version``) and with every versioned
binary from 1.30 to 1.33; a missing binary fails the test with a message
saying what was looked for.  Every kubectl run is bounded (30 s).

The interactive scenario runs kubectl in a tmux pane (a real terminal: raw
mode, SIGWINCH) and reads the screen with ``capture-pane``, polling under a
deadline.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podterm.net.certs import generate_dev_pki
from tests.helpers.kubectl import (
    SUPPORTED_MINORS,
    Kubectl,
    KubectlResult,
    kubectl_binary,
)
from tests.helpers.procs import stop, wait_ready
from tests.helpers.tmux import Tmux, tmux_session

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "alice-" + secrets.token_hex(8)
USER_TOKEN = "bob-" + secrets.token_hex(8)
#: The dispatcher and every versioned kubectl podterm supports (spec §10).
BINARIES = ("dispatcher", *SUPPORTED_MINORS)
READY_TIMEOUT_S = 20.0


def gateway_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                      env.get("PYTHONPATH")]))
    env["SHELL"] = "/bin/sh"  # a plain POSIX shell: no rc files, a predictable prompt
    env.pop("ENV", None)
    for name in list(env):
        if name.startswith("PODTERM_") or name.startswith("KUBECTL_"):
            del env[name]
    return env


@dataclass(frozen=True)
class GatewayProcess:
    """A ``podterm serve`` subprocess over HTTPS."""

    url: str
    ca_path: Path
    log: Path
    pid: int
    pki_dir: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes()


@pytest.fixture(scope="module")
def https_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """``podterm serve`` on 127.0.0.1:0 with TLS; ``alice`` is an admin, ``bob`` is not."""
    workdir = tmp_path_factory.mktemp("gateway")
    # Client certificates too: --client-ca makes them an authentication method.
    pki = generate_dev_pki(workdir / "pki", users=["admin:podterm:admins", "carol:dev"])
    tokens = workdir / "tokens.csv"
    tokens.write_text(f'{ADMIN_TOKEN},alice,u-alice,"podterm:admins"\n'
                      f"{USER_TOKEN},bob,u-bob,dev\n")
    ready = workdir / "ready.json"
    log = workdir / "gateway.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podterm", "serve", "--listen", "127.0.0.1:0",
             "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
             "--client-ca", str(pki.ca_cert), "--token-file", str(tokens),
             "--ready-file", str(ready), "--log-format", "text"],
            cwd=ROOT, env=gateway_env(), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        info = wait_ready(proc, ready, log, READY_TIMEOUT_S)
        assert info["url"].startswith("https://127.0.0.1:")
        yield GatewayProcess(info["url"], pki.ca_cert, log, proc.pid, pki.dir)
    finally:
        stop(proc, 15)


def podterm_kubeconfig(gateway: GatewayProcess, token: str, dest: Path) -> None:
    """Write ``podterm kubeconfig``'s output (the command under test) to ``dest``."""
    result = subprocess.run(
        [sys.executable, "-m", "podterm", "kubeconfig", "--server", gateway.url,
         "--ca", str(gateway.ca_path), "--context-name", "podterm-e2e"],
        env={**gateway_env(), "PODTERM_TOKEN": token}, cwd=ROOT, capture_output=True,
        timeout=30, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()  # https + token: no warning
    dest.write_bytes(result.stdout)
    dest.chmod(0o600)


KubectlFactory = Callable[..., Kubectl]


@pytest.fixture
def kubectl(https_gateway: GatewayProcess, tmp_path: Path) -> KubectlFactory:
    """``kubectl(version, token=...)``: kubectl in its own directory, kubeconfig from podterm.

    A missing binary raises :class:`~tests.helpers.kubectl.KubectlNotFound`
    inside the test, which fails it with the helper's explanation.
    """
    count = 0

    def make(version: str, *, token: str = ADMIN_TOKEN) -> Kubectl:
        nonlocal count
        count += 1
        binary = kubectl_binary(version)
        kc = Kubectl(tmp_path / f"kubectl-{count}", server_url=https_gateway.url,
                     ca_pem=https_gateway.ca_pem, token=token, binary=binary)
        podterm_kubeconfig(https_gateway, token, kc.kubeconfig)  # replaces the helper's
        return kc

    return make


def explain(result: KubectlResult, gateway: GatewayProcess) -> str:
    return f"{result}\n--- gateway log (tail):\n{gateway.log.read_text(errors='replace')[-3000:]}"


# ------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("version", BINARIES)
def test_exec_echo_prints_hi(kubectl: KubectlFactory, https_gateway: GatewayProcess,
                             version: str) -> None:
    result = kubectl(version).run("exec", "mypod", "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), explain(result, https_gateway)


@pytest.mark.parametrize("version", BINARIES)
def test_exec_stdin_round_trips_and_exits_0(kubectl: KubectlFactory,
                                            https_gateway: GatewayProcess,
                                            version: str) -> None:
    # Several of kubectl's 32 KiB stdin messages, then its FF 00 (spec §7.1).
    data = b"".join(b"line %06d %s\n" % (i, secrets.token_hex(16).encode())
                    for i in range(3000))
    result = kubectl(version).run("exec", "-i", "mypod", "--", "cat", input=data)
    assert result.returncode == 0, explain(result, https_gateway)
    assert result.stdout == data


@pytest.mark.parametrize("version", BINARIES)
def test_exec_exit_code_becomes_kubectls(kubectl: KubectlFactory,
                                         https_gateway: GatewayProcess, version: str) -> None:
    result = kubectl(version).run("exec", "mypod", "--", "sh", "-c", "echo out; exit 3")
    assert result.returncode == 3, explain(result, https_gateway)
    assert result.stdout == b"out\n"
    assert "command terminated with exit code 3" in result.err


@pytest.mark.parametrize("version", BINARIES)
def test_a_denied_user_gets_kubectls_forbidden_message(kubectl: KubectlFactory,
                                                       https_gateway: GatewayProcess,
                                                       version: str) -> None:
    result = kubectl(version, token=USER_TOKEN).run("exec", "mypod", "--", "echo", "hi")
    assert result.returncode == 1, explain(result, https_gateway)
    assert result.stdout == b""
    assert ('Error from server (Forbidden): pods "mypod" is forbidden: User "bob" cannot get '
            'resource "pods" in API group "" in the namespace "default"') in result.err, \
        explain(result, https_gateway)


@pytest.mark.parametrize("version", BINARIES)
def test_an_unknown_container_shows_the_400_message(kubectl: KubectlFactory,
                                                    https_gateway: GatewayProcess,
                                                    version: str) -> None:
    result = kubectl(version).run("exec", "mypod", "-c", "nope", "--", "echo", "hi")
    assert result.returncode == 1, explain(result, https_gateway)
    # kubectl ≤ 1.33 does not check -c itself: this is the server's answer to the
    # SPDY retry, the same as to the WebSocket GET (spec §9).
    assert ("Error from server (BadRequest): container nope is not valid for pod mypod"
            in result.err), explain(result, https_gateway)


@pytest.mark.parametrize("version", ["dispatcher", SUPPORTED_MINORS[0]])
def test_client_certificates_authenticate_kubectl(https_gateway: GatewayProcess,
                                                  tmp_path: Path, version: str) -> None:
    pki = https_gateway.pki_dir

    def run(user: str) -> KubectlResult:
        kc = Kubectl(tmp_path / user, server_url=https_gateway.url, ca_pem=https_gateway.ca_pem,
                     client_cert=(pki / f"client-{user}.crt", pki / f"client-{user}.key"),
                     binary=kubectl_binary(version))
        return kc.run("exec", "mypod", "--", "echo", "via-x509")

    admin = run("admin")  # CN=admin, O=podterm:admins; no token in the kubeconfig
    assert (admin.returncode, admin.stdout) == (0, b"via-x509\n"), explain(admin, https_gateway)
    carol = run("carol")
    assert carol.returncode == 1
    assert 'Error from server (Forbidden): pods "mypod" is forbidden: User "carol"' in carol.err


@pytest.mark.parametrize("version", ["dispatcher", SUPPORTED_MINORS[0]])
def test_kubectl_uses_podterms_client_cert_kubeconfig(https_gateway: GatewayProcess,
                                                      tmp_path: Path, version: str) -> None:
    # `podterm kubeconfig --client-cert --client-key` (no token anywhere: gateway_env
    # drops PODTERM_*) is the kubeconfig kubectl runs with, as it was printed.
    pki = https_gateway.pki_dir
    printed = subprocess.run(
        [sys.executable, "-m", "podterm", "kubeconfig", "--server", https_gateway.url,
         "--ca", str(https_gateway.ca_path), "--client-cert", str(pki / "client-admin.crt"),
         "--client-key", str(pki / "client-admin.key")],
        env=gateway_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
        timeout=30, check=False)
    assert (printed.returncode, printed.stderr) == (0, b""), printed.stderr.decode()
    assert b"client-certificate-data" in printed.stdout and b"token" not in printed.stdout
    kc = Kubectl(tmp_path / "kubectl", server_url=https_gateway.url,
                 binary=kubectl_binary(version))
    kc.kubeconfig.write_bytes(printed.stdout)  # replaces the helper's
    result = kc.run("exec", "mypod", "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), explain(result, https_gateway)


def test_attach_runs_the_pods_shell(kubectl: KubectlFactory,
                                    https_gateway: GatewayProcess) -> None:
    result = kubectl("dispatcher").run("attach", "-i", "mypod",
                                       input=b"echo attached-$((6*7))\nexit 3\n")
    assert result.returncode == 0, explain(result, https_gateway)  # attach: no exit code
    assert b"attached-42\n" in result.stdout


def test_kubectl_1_29_works_with_the_websocket_opt_in(kubectl: KubectlFactory,
                                                      https_gateway: GatewayProcess) -> None:
    result = kubectl("1.29").run("exec", "mypod", "--", "echo", "hi",
                                 env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true"})
    assert (result.returncode, result.stdout) == (0, b"hi\n"), explain(result, https_gateway)


@pytest.mark.parametrize(("version", "env"), [("1.28", {}), ("1.29", {}),
                                              ("1.32", {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS":
                                                        "false"})])
def test_a_spdy_only_kubectl_is_told_what_to_do(kubectl: KubectlFactory,
                                                https_gateway: GatewayProcess, version: str,
                                                env: dict[str, str]) -> None:
    result = kubectl(version).run("exec", "mypod", "--", "echo", "hi", env=env)
    assert result.returncode == 1, explain(result, https_gateway)
    assert ("Error from server (BadRequest): podterm supports kubectl exec and attach over "
            "WebSocket only") in result.err
    assert "kubectl >= 1.30" in result.err


# ------------------------------------------------------------- tmux: exec -it


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    with tmux_session(tmp_path, prefix="podterm-kubectl") as t:
        yield t


@pytest.mark.parametrize("version", BINARIES)
def test_exec_it_runs_an_interactive_shell_and_resizes(kubectl: KubectlFactory, tmux: Tmux,
                                                       version: str) -> None:
    kc = kubectl(version)
    env = kc.env()
    argv = ["env", *[f"{k}={v}" for k, v in env.items()],
            *kc.argv("exec", "-it", "mypod", "--", "sh")]
    tmux.wait_for(r"^local\$")
    tmux.send(f"{shlex.join(argv)}; echo kubectl-rc=$?")
    tmux.wait_for(r"^[$#] $")  # the remote shell's prompt
    tmux.send("PS1='remote> '")
    tmux.wait_for(r"^remote> $")
    tmux.send("echo size=$(stty size) tty=$(tty)")
    tmux.wait_for(r"^size=30 100 tty=/dev/pts/\d+")
    tmux.resize(120, 40)
    tmux.send("echo size2=$(stty size)")
    tmux.wait_for(r"^size2=40 120\s*$")
    tmux.send("exit 5")
    tmux.wait_for(r"^kubectl-rc=5\s*$")
