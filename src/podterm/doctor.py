"""``podterm doctor``: what this installation will run with, and what is wrong.

It checks, without starting the gateway:

* which codec is active (native Cython or the pure-Python twin) and why;
* Python, trio and h11 versions;
* the descriptor limits against what ``max-sessions`` needs;
* that the listen address can be bound, and that plain HTTP is not served
  beyond loopback without a warning;
* that the TLS certificate, key and client CA load (and the key matches);
* the store URL, and that a Redis store answers a TCP connect;
* the upstream: the local shell exists, or the kube-apiserver answers a TCP
  connect (from the kubeconfig, or the in-cluster service variables);
* that the files the configuration names can be read or written.

Every check yields a :class:`Check`; :func:`main` prints them and returns 1
when any failed, 0 otherwise (warnings do not fail).  Probes are TCP connects
bounded by ``probe_timeout_s``; nothing is sent.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from podterm import __version__
from podterm.config import ServeConfig
from podterm.net.hostport import join_host_port

__all__ = ["Status", "Check", "codec_info", "run_checks", "main"]

#: Descriptors a worker needs besides its sessions: listeners, store, log and
#: audit files, the admin server, and a margin for handshakes in flight.
_FD_RESERVE = 1024
_IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class Status(StrEnum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str


def codec_info() -> tuple[str, str]:
    """Return ``(impl, reason)``: ``("native"|"python", why)``, or ``("unavailable", error)``.

    Importing the codec is what decides it (``PODTERM_CODEC``,
    ``PODTERM_NATIVE=require``); an import failure is reported, not raised.
    """
    try:
        codec = importlib.import_module("podterm.protocol.codec")
    except ImportError as exc:
        return "unavailable", str(exc)
    return str(codec.IMPL), str(codec.REASON)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tcp_probe(host: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connect succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _check_versions() -> list[Check]:
    checks = [
        Check("version", Status.INFO, f"podterm {__version__}"),
        Check("python", Status.INFO,
              f"{platform.python_implementation()} {platform.python_version()} "
              f"({sys.executable})"),
    ]
    for dist in ("trio", "h11"):
        found = _version(dist)
        checks.append(Check(dist, Status.INFO, found) if found
                      else Check(dist, Status.FAIL, "not installed"))
    return checks


def _check_codec() -> Check:
    impl, reason = codec_info()
    if impl == "native":
        return Check("codec", Status.OK, f"native: {reason}")
    if impl == "python":
        return Check("codec", Status.WARN, f"python: {reason}")
    return Check("codec", Status.FAIL, f"unavailable: {reason}")


def _check_fds(config: ServeConfig) -> Check:
    try:
        import resource
    except ImportError:
        return Check("fd-limit", Status.INFO, "resource limits not available on this platform")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * config.limits.max_sessions + _FD_RESERVE

    def show(n: int) -> str:
        return "unlimited" if n == resource.RLIM_INFINITY else str(n)

    detail = f"soft {show(soft)}, hard {show(hard)}; max-sessions {config.limits.max_sessions} needs ~{need}"
    if soft == resource.RLIM_INFINITY or soft >= need:
        return Check("fd-limit", Status.OK, detail)
    if hard != resource.RLIM_INFINITY and hard < need:
        return Check("fd-limit", Status.WARN,
                     f"{detail}; raise the hard limit (LimitNOFILE, ulimit -Hn) or lower "
                     "max-sessions")
    return Check("fd-limit", Status.WARN, f"{detail}; raise the soft limit (ulimit -n {need})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_listen(config: ServeConfig) -> list[Check]:
    listen = config.listen
    where = join_host_port(listen.host, listen.port)
    checks: list[Check] = []
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        checks.append(Check("listen", Status.OK,
                            f"{where} can be bound" if listen.port
                            else f"{listen.host}: a free port is picked at start"))
    except OSError as exc:
        checks.append(Check("listen", Status.FAIL, f"{where}: {exc.strerror or exc}"))
    if not config.tls.enabled and not _is_loopback(listen.host):
        checks.append(Check("listen", Status.WARN,
                            f"plain HTTP on {where}: bearer tokens cross the network in clear; "
                            "use --tls-cert/--tls-key or terminate TLS in front"))
    return checks


def _check_tls(config: ServeConfig) -> list[Check]:
    tls = config.tls
    if not tls.enabled:
        return [Check("tls", Status.INFO, "off (plain HTTP)")]
    checks: list[Check] = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)  # type: ignore[arg-type]
        checks.append(Check("tls", Status.OK, f"{tls.cert_file} and {tls.key_file} load and match"))
    except (OSError, ssl.SSLError) as exc:
        checks.append(Check("tls", Status.FAIL, f"{tls.cert_file} / {tls.key_file}: {exc}"))
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
            checks.append(Check("client-ca", Status.OK, f"{tls.client_ca_file} loads"))
        except (OSError, ssl.SSLError) as exc:
            checks.append(Check("client-ca", Status.FAIL, f"{tls.client_ca_file}: {exc}"))
    return checks


def _check_store(config: ServeConfig, timeout_s: float) -> Check:
    url = config.store.url
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return Check("store", Status.INFO, "memory:// (one process; sessions end with it)")
    if parts.scheme == "sqlite":
        directory = Path(parts.path).parent
        if not directory.is_dir():
            return Check("store", Status.FAIL, f"{url}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            return Check("store", Status.FAIL, f"{url}: directory {directory} is not writable")
        return Check("store", Status.OK, f"{url}: directory writable")
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    problem = _tcp_probe(host, port, timeout_s)
    if problem:
        return Check("store", Status.FAIL, f"{url}: TCP connect to {host}:{port} failed: {problem}")
    return Check("store", Status.OK, f"{url}: {host}:{port} accepts TCP connections")


def _kubeconfig_server(path: str, context: str | None) -> str:
    """The apiserver URL of ``context`` (or current-context) in a kubeconfig."""
    yaml: Any = importlib.import_module("yaml")  # PyYAML comes with the kubernetes client
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    name = context or doc.get("current-context")
    if not name:
        raise ValueError("no context given and no current-context set")
    ctx = next((c.get("context", {}) for c in doc.get("contexts") or [] if c.get("name") == name),
               None)
    if ctx is None:
        raise ValueError(f"context {name!r} not found")
    cluster = next((c.get("cluster", {}) for c in doc.get("clusters") or []
                    if c.get("name") == ctx.get("cluster")), None)
    if cluster is None or not cluster.get("server"):
        raise ValueError(f"cluster {ctx.get('cluster')!r} of context {name!r} has no server")
    return str(cluster["server"])


def _check_upstream(config: ServeConfig, env: Mapping[str, str], timeout_s: float) -> list[Check]:
    up = config.upstream
    checks: list[Check] = []
    if up.kind == "local":
        if os.path.isfile(up.shell) and os.access(up.shell, os.X_OK):
            checks.append(Check("upstream", Status.OK, f"local: shell {up.shell} is executable"))
        else:
            checks.append(Check("upstream", Status.FAIL,
                                f"local: shell {up.shell} is not an executable file"))
    elif up.kind == "agent":
        checks.append(Check("upstream", Status.INFO, "agent: agents dial in; nothing to probe"))
    if up.kind != "kube" and up.kubeconfig is None and up.context is None:
        return checks
    # A session may name the kube upstream even when it is not the default; a
    # broken apiserver then only fails the sessions that ask for it.
    bad = Status.FAIL if up.kind == "kube" else Status.WARN
    if up.kubeconfig is not None:
        try:
            server = _kubeconfig_server(up.kubeconfig, up.context)
        except (OSError, ValueError, ImportError) as exc:
            return [*checks, Check("apiserver", bad, f"{up.kubeconfig}: {exc}")]
        except Exception as exc:  # noqa: BLE001 - YAML errors have no common stdlib base
            return [*checks, Check("apiserver", bad,
                                   f"{up.kubeconfig}: not a kubeconfig: {exc}")]
        source = up.kubeconfig
    elif env.get("KUBERNETES_SERVICE_HOST"):
        svc_host = env["KUBERNETES_SERVICE_HOST"]
        svc_port = env.get("KUBERNETES_SERVICE_PORT", "443")
        server = (f"https://[{svc_host}]:{svc_port}" if ":" in svc_host
                  else f"https://{svc_host}:{svc_port}")
        source = "in-cluster"
        if not os.access(_IN_CLUSTER_TOKEN, os.R_OK):
            checks.append(Check("apiserver", bad,
                                f"in-cluster: {_IN_CLUSTER_TOKEN} is not readable"))
    else:
        return [*checks, Check("apiserver", bad,
                               "kube upstream: no --kubeconfig and not in a cluster "
                               "(KUBERNETES_SERVICE_HOST unset)")]
    parts = urlsplit(server)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return [*checks, Check("apiserver", bad, f"{source}: bad server URL {server!r}")]
    problem = _tcp_probe(host, port, timeout_s)
    if problem:
        checks.append(Check("apiserver", bad, f"{source}: {server}: {problem}"))
    else:
        checks.append(Check("apiserver", Status.OK,
                            f"{source}: {server} accepts TCP connections"))
    return checks


def _check_files(config: ServeConfig) -> list[Check]:
    checks: list[Check] = []
    for name, path in (("token-file", config.auth.token_file),
                       ("policy", config.auth.policy_file)):
        if path is None:
            continue
        if os.path.isfile(path) and os.access(path, os.R_OK):
            checks.append(Check(name, Status.OK, f"{path} is readable"))
        else:
            checks.append(Check(name, Status.FAIL, f"{path} is not a readable file"))
    for name, path in (("audit-log", config.audit.log_file), ("ready-file", config.ready_file)):
        if path is None:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if os.access(directory, os.W_OK):
            checks.append(Check(name, Status.OK, f"{path}: directory writable"))
        else:
            checks.append(Check(name, Status.FAIL, f"{path}: directory {directory} not writable"))
    if config.recording.dir is not None:
        rec = config.recording.dir
        if os.path.isdir(rec) and os.access(rec, os.W_OK):
            checks.append(Check("recordings", Status.OK, f"{rec} is a writable directory"))
        else:
            checks.append(Check("recordings", Status.FAIL, f"{rec} is not a writable directory"))
    return checks


def run_checks(config: ServeConfig, env: Mapping[str, str], *,
               probe_timeout_s: float = 2.0) -> list[Check]:
    """Run every check against ``config``; see the module docstring.

    Args:
        config: what ``podterm serve`` would run with.
        env: the process environment (for the in-cluster apiserver address).
        probe_timeout_s: bound on each TCP probe.
    """
    checks = _check_versions()
    checks.append(_check_codec())
    checks.append(_check_fds(config))
    checks += _check_listen(config)
    checks += _check_tls(config)
    checks.append(_check_store(config, probe_timeout_s))
    checks += _check_upstream(config, env, probe_timeout_s)
    checks += _check_files(config)
    checks.append(Check("workers", Status.INFO,
                        f"{config.workers.count} (gc profile {config.workers.gc_profile})"))
    return checks


def main(config: ServeConfig, env: Mapping[str, str], out: IO[str] | None = None) -> int:
    """Print the report; return 1 if any check failed, else 0."""
    stream = out if out is not None else sys.stdout
    checks = run_checks(config, env)
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{check.status.value:<5} {check.name:<{width}}  {check.detail}", file=stream)
    failed = sum(c.status is Status.FAIL for c in checks)
    warned = sum(c.status is Status.WARN for c in checks)
    print(f"{failed} failed, {warned} warnings", file=stream)
    return 1 if failed else 0
