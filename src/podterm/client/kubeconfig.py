"""``podterm kubeconfig``: print a kubeconfig that points kubectl at the gateway.

The output is one cluster, one user and one context, all named
``--context-name`` (default ``podterm``), set as the current context, ready to
merge into an existing configuration::

    podterm kubeconfig --server https://gw:7780 --ca ca.crt > podterm.kubeconfig
    KUBECONFIG=~/.kube/config:podterm.kubeconfig kubectl config view --flatten > merged
    kubectl --kubeconfig podterm.kubeconfig exec mypod -- echo hi

* cluster: ``server`` is the gateway URL; ``certificate-authority-data`` is
  the ``--ca`` file embedded (so the file stands alone), or
  ``insecure-skip-tls-verify: true`` with ``--insecure-skip-tls-verify``; with
  neither, kubectl verifies against the system's roots;
* user: ``token`` is the bearer token (``--token`` / ``PODTERM_TOKEN``);
* context: that cluster and user, namespace ``default``.

kubectl sends credentials only to an ``https://`` server (spec
``k8s-exec-protocol.md`` §2.3): for an ``http://`` URL the kubeconfig is still
printed, with a warning on stderr.

The YAML is written by hand: every scalar is a JSON string (JSON strings are
YAML double-quoted scalars), so no value can change the document's shape.
Exit status: 0 printed, 2 for unusable options (the message names them).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import TextIO
from urllib.parse import urlsplit

from podterm.config import KubeconfigOptions

__all__ = ["main", "render_kubeconfig"]

_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


class _Unusable(Exception):
    """An option that cannot make a working kubeconfig; the message says which and why."""


def _q(value: str) -> str:
    """A YAML scalar that is exactly ``value`` (a JSON string is a double-quoted YAML scalar)."""
    return json.dumps(value, ensure_ascii=False)


def _server_url(server: str) -> str:
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Unusable(f"--server: {server!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise _Unusable(f"--server: {server!r} must not have a query or fragment")
    return server.rstrip("/")


def _ca_data(ca_file: str) -> str:
    try:
        with open(ca_file, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise _Unusable(f"--ca: cannot read {ca_file!r}: {exc.strerror or exc}") from exc
    if _PEM_MARKER not in pem:
        raise _Unusable(f"--ca: {ca_file!r} holds no PEM certificate")
    return base64.b64encode(pem).decode("ascii")


def render_kubeconfig(options: KubeconfigOptions) -> tuple[str, list[str]]:
    """The kubeconfig YAML for ``options`` and the warnings to show with it.

    Raises:
        ValueError: an option cannot make a working kubeconfig (bad URL,
            unreadable CA, ``--ca`` together with ``--insecure-skip-tls-verify``).
    """
    try:
        server = _server_url(options.server)
        if options.ca_file and options.insecure:
            raise _Unusable("--ca and --insecure-skip-tls-verify exclude each other "
                            "(kubectl refuses a kubeconfig with both)")
        ca = _ca_data(options.ca_file) if options.ca_file else None
    except _Unusable as exc:
        raise ValueError(str(exc)) from None
    warnings: list[str] = []
    if server.startswith("http://"):
        warnings.append(f"{server} is plain HTTP: kubectl sends no token to it (it sends "
                        "credentials only over TLS); serve the gateway with --tls-cert/"
                        "--tls-key and use its https:// URL")
    if not options.token:
        warnings.append("no token given (--token or PODTERM_TOKEN): the user entry is "
                        "empty; add a token or a client certificate to it")
    name = _q(options.context_name)
    lines = [
        f"# kubeconfig for the podterm gateway at {server}",
        "apiVersion: v1",
        "kind: Config",
        "preferences: {}",
        "clusters:",
        f"- name: {name}",
        "  cluster:",
        f"    server: {_q(server)}",
    ]
    if ca is not None:
        lines.append(f"    certificate-authority-data: {_q(ca)}")
    if options.insecure:
        lines.append("    insecure-skip-tls-verify: true")
    lines += ["users:", f"- name: {name}"]
    if options.token:
        lines += ["  user:", f"    token: {_q(options.token)}"]
    else:
        lines.append("  user: {}")
    lines += [
        "contexts:",
        f"- name: {name}",
        "  context:",
        f"    cluster: {name}",
        f"    user: {name}",
        f"    namespace: {_q('default')}",
        f"current-context: {name}",
    ]
    return "\n".join(lines) + "\n", warnings


def main(options: KubeconfigOptions, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """``podterm kubeconfig``: print the kubeconfig on stdout, warnings on stderr."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        text, warnings = render_kubeconfig(options)
    except ValueError as exc:
        print(f"podterm kubeconfig: {exc}", file=err)
        return 2
    for warning in warnings:
        print(f"podterm kubeconfig: warning: {warning}", file=err)
    out.write(text)
    out.flush()
    return 0
