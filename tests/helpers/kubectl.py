"""Run the real kubectl binaries in tests, isolated per test.

The machines carry the Google Cloud SDK's kubectl: ``/usr/bin/kubectl`` is a
*dispatcher* (``Client Version: v1.32.4-dispatcher``) that first asks the
server's ``GET /version`` and then runs the bundled ``kubectl.1.<minor>`` next
to it (spec §2.1); the versioned binaries ``kubectl.1.27`` ... ``kubectl.1.33``
can also be run directly.

- :func:`kubectl_dispatcher` / :func:`kubectl_binary` find them, or raise
  :class:`KubectlNotFound` with a message saying what was looked for and what
  exists (tests must fail on a missing binary, never skip silently).
- :func:`write_kubeconfig` writes a kubeconfig for a server URL + CA + token
  (or client certificate).
- :class:`Kubectl` runs kubectl with its own kubeconfig, ``--cache-dir``,
  ``HOME`` and a minimal environment, so nothing leaks between tests or from
  the user's ``~/.kube``; every run is bounded (the whole process group is
  killed on timeout).

Example::

    kc = Kubectl(tmp_path, server_url=api.url, ca_pem=api.ca_pem, token="test-token")
    result = kc.run("exec", "mypod", "--", "echo", "hi", binary=kubectl_binary("1.31"))
    assert result.returncode == 0 and result.stdout == b"hi\\n"
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Where the Cloud SDK keeps kubectl when ``kubectl`` is not on PATH.
_FALLBACK_DIRS = (Path("/usr/lib/google-cloud-sdk/bin"), Path("/usr/bin"), Path("/usr/local/bin"))
#: The versions podterm supports end to end (WebSocket exec by default, spec §10).
SUPPORTED_MINORS = ("1.30", "1.31", "1.32", "1.33")
#: Default bound on one kubectl run (seconds).
DEFAULT_TIMEOUT_S = 30.0


class KubectlNotFound(RuntimeError):
    """A kubectl binary the test needs is not installed."""


class KubectlTimeout(AssertionError):
    """A kubectl run exceeded its bound; carries what it printed so far."""

    def __init__(self, argv: Sequence[str], timeout: float, stdout: bytes, stderr: bytes) -> None:
        super().__init__(f"kubectl did not finish within {timeout} s: {' '.join(argv)}\n"
                         f"stdout: {stdout[-2000:]!r}\nstderr: {stderr[-2000:]!r}")
        self.stdout, self.stderr = stdout, stderr


def _search_dirs() -> list[Path]:
    dirs: list[Path] = []
    found = shutil.which("kubectl")
    if found:
        dirs.append(Path(found).resolve().parent)  # /usr/bin/kubectl -> the SDK's bin
        dirs.append(Path(found).parent)
    dirs += _FALLBACK_DIRS
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def kubectl_versions() -> dict[str, Path]:
    """Every versioned kubectl found (``{"1.30": Path(".../kubectl.1.30"), ...}``), sorted."""
    found: dict[str, Path] = {}
    for d in _search_dirs():
        if not d.is_dir():
            continue
        for p in d.glob("kubectl.1.*"):
            m = re.fullmatch(r"kubectl\.(1\.\d+)", p.name)
            if m and os.access(p, os.X_OK):
                found.setdefault(m.group(1), p)
    return dict(sorted(found.items(), key=lambda kv: int(kv[0].split(".")[1])))


def kubectl_dispatcher() -> Path:
    """The ``kubectl`` on PATH (on these machines the Cloud SDK dispatcher), resolved."""
    found = shutil.which("kubectl")
    if found is None:
        for d in _FALLBACK_DIRS:
            if os.access(d / "kubectl", os.X_OK):
                return (d / "kubectl").resolve()
        raise KubectlNotFound("kubectl is not installed: not on PATH "
                              f"({os.environ.get('PATH', '')}) nor in "
                              f"{', '.join(map(str, _FALLBACK_DIRS))}")
    return Path(found).resolve()


def kubectl_binary(version: str) -> Path:
    """The versioned kubectl for ``version`` (``"1.31"``), or ``"dispatcher"`` for the dispatcher."""
    if version == "dispatcher":
        return kubectl_dispatcher()
    versions = kubectl_versions()
    if version not in versions:
        raise KubectlNotFound(
            f"kubectl.{version} is not installed (looked in "
            f"{', '.join(map(str, _search_dirs()))}; found: "
            f"{', '.join(f'kubectl.{v}' for v in versions) or 'none'}). It ships with the "
            "Google Cloud SDK package google-cloud-cli (or kubectl.1.N from "
            "https://dl.k8s.io/release/v1.N.0/bin/linux/amd64/kubectl placed beside it).")
    return versions[version]


def write_kubeconfig(path: Path, server_url: str, *, ca_pem: bytes | None = None,
                     token: str | None = None, client_cert: tuple[Path, Path] | None = None,
                     namespace: str = "default", insecure: bool = False,
                     context: str = "fake") -> Path:
    """Write a one-context kubeconfig (JSON, which is YAML) and return its path.

    ``client_cert`` is ``(cert_pem_path, key_pem_path)``.  The CA and client
    credentials are embedded (``*-data``), so the file stands alone.
    """
    cluster: dict[str, object] = {"server": server_url}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    user: dict[str, object] = {}
    if token is not None:
        user["token"] = token
    if client_cert is not None:
        cert, key = client_cert
        user["client-certificate-data"] = base64.b64encode(Path(cert).read_bytes()).decode()
        user["client-key-data"] = base64.b64encode(Path(key).read_bytes()).decode()
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": context, "cluster": cluster}],
        "users": [{"name": f"{context}-user", "user": user}],
        "contexts": [{"name": context, "context": {"cluster": context,
                                                   "user": f"{context}-user",
                                                   "namespace": namespace}}],
        "current-context": context,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)  # kubectl warns about group/world-readable kubeconfigs
    return path


@dataclass(frozen=True, slots=True)
class KubectlResult:
    """What one kubectl run did."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\n-> exit {self.returncode}\n"
                f"stdout: {self.out[-2000:]!r}\nstderr: {self.err[-2000:]!r}")


class Kubectl:
    """kubectl pointed at one server, with everything it writes kept under ``workdir``.

    ``workdir`` receives ``kubeconfig``, ``cache/`` (``--cache-dir``) and
    ``home/`` (``HOME``).  The environment is minimal (``PATH``, ``HOME``,
    ``KUBECONFIG``, ``LANG``) so no ``KUBECTL_*`` variable of the caller leaks
    in; pass ``env=`` to add some.
    """

    def __init__(self, workdir: Path, *, server_url: str, ca_pem: bytes | None = None,
                 token: str | None = None, client_cert: tuple[Path, Path] | None = None,
                 namespace: str = "default", binary: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.home = self.workdir / "home"
        self.cache_dir = self.workdir / "cache"
        self.home.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", server_url,
                                           ca_pem=ca_pem, token=token, client_cert=client_cert,
                                           namespace=namespace)
        self.binary = binary or kubectl_dispatcher()

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment kubectl runs with (for callers that start it themselves)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
               "KUBECONFIG": str(self.kubeconfig), "LANG": "C.UTF-8"}
        env.update(extra or {})
        return env

    def argv(self, *args: str, binary: Path | None = None) -> list[str]:
        """The full command line for ``kubectl ARGS`` (global flags first)."""
        return [str(binary or self.binary), "--kubeconfig", str(self.kubeconfig),
                "--cache-dir", str(self.cache_dir), *args]

    def run(self, *args: str, binary: Path | None = None, input: bytes | None = None,
            timeout: float = DEFAULT_TIMEOUT_S, env: Mapping[str, str] | None = None,
            ) -> KubectlResult:
        """Run kubectl to completion (stdin ``input``, else /dev/null), bounded by ``timeout``.

        Raises :class:`KubectlTimeout` after killing kubectl's whole process
        group (the dispatcher runs the versioned binary as a child).
        """
        argv = self.argv(*args, binary=binary)
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env(env),
            cwd=self.workdir, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            raise KubectlTimeout(argv, timeout, stdout, stderr) from None
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                proc.wait()
        return KubectlResult(tuple(argv), proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
