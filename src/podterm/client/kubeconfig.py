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
* user: ``token`` is the bearer token (``--token`` / ``PODTERM_TOKEN``), or
  ``client-certificate-data`` and ``client-key-data`` are the ``--client-cert``
  and ``--client-key`` files embedded as they are (base64, as kubectl's
  ``config set-credentials --embed-certs`` does).  The two are exclusive;
  the pair is checked before anything is printed: both readable PEM, the key
  unencrypted and the certificate's own (an expired certificate is printed
  with a warning: the gateway will refuse it);
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
import datetime as dt
import json
import sys
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

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


@dataclass(frozen=True, slots=True)
class _ClientCert:
    """A checked ``--client-cert``/``--client-key`` pair: the files' bytes as read."""

    cert_pem: bytes
    key_pem: bytes
    subject: str
    not_after: dt.datetime


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _Unusable(f"{flag}: cannot read {path!r}: {exc.strerror or exc}") from exc


def _client_cert(cert_file: str | None, key_file: str | None) -> _ClientCert | None:
    """Read and check the pair: both given, both PEM, the key the certificate's own."""
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        given, missing = (("--client-cert", "--client-key") if cert_file
                          else ("--client-key", "--client-cert"))
        raise _Unusable(f"{given} needs {missing}: a client certificate is used with its key")
    cert_pem = _read("--client-cert", cert_file)
    key_pem = _read("--client-key", key_file)
    try:
        # The first certificate is the client's; any after it are intermediates,
        # which kubectl sends along (as it does from client-certificate-data).
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise _Unusable(f"--client-cert: {cert_file!r} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        # kubectl has no way to ask for a passphrase: it needs the key in clear.
        raise _Unusable(f"--client-key: {key_file!r} is encrypted; kubectl needs an "
                        "unencrypted key (openssl pkey -in KEY -out KEY.plain)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise _Unusable(f"--client-key: {key_file!r} holds no PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise _Unusable(f"--client-cert and --client-key do not match: {key_file!r} is not "
                        f"the key of {cert_file!r} ({subject})")
    return _ClientCert(cert_pem, key_pem, subject, cert.not_valid_after_utc)


def render_kubeconfig(options: KubeconfigOptions, *,
                      now: dt.datetime | None = None) -> tuple[str, list[str]]:
    """The kubeconfig YAML for ``options`` and the warnings to show with it.

    Args:
        options: what to put in it.
        now: the time an expiring client certificate is judged at (tests);
            default the current UTC time.

    Raises:
        ValueError: an option cannot make a working kubeconfig (bad URL,
            unreadable CA, ``--ca`` together with ``--insecure-skip-tls-verify``,
            a token together with a client certificate, a client certificate
            without its key, unreadable, not PEM, encrypted or mismatched).
    """
    try:
        server = _server_url(options.server)
        if options.ca_file and options.insecure:
            raise _Unusable("--ca and --insecure-skip-tls-verify exclude each other "
                            "(kubectl refuses a kubeconfig with both)")
        if options.token and (options.client_cert_file or options.client_key_file):
            raise _Unusable("a token (--token, PODTERM_TOKEN or the client config file) and "
                            "--client-cert exclude each other: the user entry holds one "
                            "credential; unset the token or drop --client-cert/--client-key")
        ca = _ca_data(options.ca_file) if options.ca_file else None
        client_cert = _client_cert(options.client_cert_file, options.client_key_file)
    except _Unusable as exc:
        raise ValueError(str(exc)) from None
    warnings: list[str] = []
    if server.startswith("http://"):
        sends = "no token" if options.token else "no credentials"
        warnings.append(f"{server} is plain HTTP: kubectl sends {sends} to it (it sends "
                        "credentials only over TLS); serve the gateway with --tls-cert/"
                        "--tls-key and use its https:// URL")
    if client_cert is not None:
        now = now or dt.datetime.now(dt.UTC)
        if client_cert.not_after < now:
            warnings.append(f"the client certificate ({client_cert.subject}) expired on "
                            f"{client_cert.not_after:%Y-%m-%d %H:%M:%S} UTC: the gateway will "
                            "refuse it")
    elif not options.token:
        warnings.append("no token given (--token or PODTERM_TOKEN): the user entry is "
                        "empty; add a token or a client certificate to it (--client-cert "
                        "and --client-key)")
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
    if client_cert is not None:
        lines += ["  user:",
                  "    client-certificate-data: "
                  f"{_q(base64.b64encode(client_cert.cert_pem).decode('ascii'))}",
                  "    client-key-data: "
                  f"{_q(base64.b64encode(client_cert.key_pem).decode('ascii'))}"]
    elif options.token:
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
