"""Credentials for the kube upstream: the apiserver URL, TLS, and a fresh ``Authorization``.

Loaded with the official ``kubernetes`` client's loaders, so every credential
kind it understands works here too:

- **in-cluster** (:func:`load_incluster`): the service account's projected
  token and CA under ``/var/run/secrets/kubernetes.io/serviceaccount`` and
  ``KUBERNETES_SERVICE_HOST``/``_PORT`` (``kubernetes.config.load_incluster_config``);
- **a kubeconfig** (:func:`load_kubeconfig`, optionally a named context):
  tokens, basic auth, client certificates (files or ``*-data``), exec
  plugins (``users[].user.exec``), auth providers, ``insecure-skip-tls-verify``
  and ``tls-server-name`` (``kubernetes.config.load_kube_config``).

What the upstream gets is a :class:`KubeCredentials`:

- ``server``: ``https://host:port`` (a path prefix, as behind some proxies,
  is kept);
- ``ssl_context``: verifies the apiserver against the cluster CA (the system
  store when the kubeconfig names none), TLS 1.2+, ALPN ``http/1.1`` (exec
  is an HTTP/1.1 upgrade), with the client certificate when there is one;
- :meth:`KubeCredentials.authorization`: the ``Authorization`` header value
  for the *next* dial.  Called once per dial, so credentials that rotate are
  picked up without a restart: the service-account token file is re-read
  every time (kubelet rewrites the projected token long before it expires),
  and for kubeconfigs the client library's refresh hook runs (it re-runs an
  exec plugin or refreshes an auth provider once the cached credential
  expired).  It may block (a file read, an exec plugin), so call it through
  :meth:`KubeCredentials.authorization_async`, which runs it in a worker
  thread, one at a time.

Not supported (the loaders accept them, the dialer ignores them): ``proxy-url``
(the upstream dials the apiserver directly), and a kubeconfig ``tokenFile`` is
read once at load time by the client library (the in-cluster token is the
rotating case that matters and is re-read).

Errors: a file that cannot be read, a missing context, a bad CA... raise
:class:`~podterm.errors.ConfigError` naming the source, at load time.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

from podterm.errors import ConfigError

__all__ = [
    "KubeCredentials",
    "SERVICE_ACCOUNT_DIR",
    "load_credentials",
    "load_incluster",
    "load_kubeconfig",
]

log = logging.getLogger(__name__)

#: Where kubelet projects the service account (kubernetes.config.incluster_config).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: ALPN for the apiserver: the WebSocket upgrade is HTTP/1.1 (RFC 6455 §4.1).
_ALPN = ["http/1.1"]


@dataclass(frozen=True, slots=True)
class KubeCredentials:
    """How to reach and authenticate to one kube-apiserver.

    Attributes:
        server: the base URL, ``https://host:port`` (``http://`` only for tests).
        ssl_context: verifies the server (None for ``http://``).
        server_hostname: the name TLS checks the certificate against (the
            kubeconfig's ``tls-server-name``, else the URL's host).
        source: where the credentials came from, for logs and errors
            (``"in-cluster"``, ``"kubeconfig /path (context c)"``).
        get_authorization: returns the ``Authorization`` value for the next
            dial, or None (a client certificate only).  May block.
    """

    server: str
    ssl_context: ssl.SSLContext | None
    server_hostname: str
    source: str
    get_authorization: Callable[[], str | None] = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1),
                                           repr=False, compare=False)

    @property
    def host(self) -> str:
        """The host to connect to."""
        return urlsplit(self.server).hostname or ""

    @property
    def port(self) -> int:
        """The TCP port (443 for https without one)."""
        parts = urlsplit(self.server)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def secure(self) -> bool:
        return urlsplit(self.server).scheme == "https"

    @property
    def base_path(self) -> str:
        """A path prefix of the server URL (usually empty)."""
        return urlsplit(self.server).path.rstrip("/")

    def authorization(self) -> str | None:
        """The ``Authorization`` header value for the next request (blocking; thread-safe).

        Raises:
            ConfigError: the credential could not be produced (an exec
                plugin failed, the token file vanished).
        """
        with self._lock:  # the client library's refresh hook mutates shared state
            try:
                return self.get_authorization()
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin's failure, whatever its type
                raise ConfigError(f"{self.source}: cannot get a credential for the "
                                  f"apiserver: {exc}") from exc

    async def authorization_async(self) -> str | None:
        """:meth:`authorization` in a worker thread (it may run an exec plugin)."""
        return await trio.to_thread.run_sync(self.authorization, limiter=self._limiter)


def _ssl_context(*, ca_file: str | None, cert_file: str | None, key_file: str | None,
                 verify: bool, source: str) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{source}: cannot load the cluster CA {ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(_ALPN)
    if not verify:
        # The kubeconfig says insecure-skip-tls-verify: honoured (kubectl does
        # too), loudly.
        log.warning("kube.credentials.insecure %s: the apiserver's certificate is NOT "
                    "verified (insecure-skip-tls-verify)", source)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{source}: cannot load the client certificate {cert_file}: "
                              f"{exc}") from exc
    return ctx


def _from_configuration(cfg: Any, source: str,
                        get_authorization: Callable[[], str | None]) -> KubeCredentials:
    """Turn a loaded ``kubernetes.client.Configuration`` into :class:`KubeCredentials`."""
    server = str(cfg.host or "").rstrip("/")
    parts = urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{source}: the cluster server {server!r} is not an https:// URL")
    ctx: ssl.SSLContext | None = None
    if parts.scheme == "https":
        ctx = _ssl_context(ca_file=cfg.ssl_ca_cert or None, cert_file=cfg.cert_file or None,
                           key_file=cfg.key_file or None, verify=bool(cfg.verify_ssl),
                           source=source)
    else:
        log.warning("kube.credentials.plaintext %s: the apiserver is reached over plain "
                    "http://; credentials travel unencrypted", source)
    hostname = getattr(cfg, "tls_server_name", None) or parts.hostname
    return KubeCredentials(server=server, ssl_context=ctx, server_hostname=hostname,
                           source=source, get_authorization=get_authorization)


def _library_authorization(cfg: Any) -> Callable[[], str | None]:
    def authorization() -> str | None:
        # get_api_key_with_prefix runs the refresh hook first (exec plugins,
        # expiring tokens), then returns "Bearer ..." / "Basic ..." as loaded.
        value = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        return str(value).strip() if value else None

    return authorization


def load_kubeconfig(path: str | os.PathLike[str] | None, context: str | None = None
                    ) -> KubeCredentials:
    """Credentials from a kubeconfig file (``None``: ``~/.kube/config``), optionally a context.

    Raises:
        ConfigError: the file, the context or a credential in it cannot be used.
    """
    from kubernetes import client, config  # noqa: PLC0415 - heavy import, only when used
    from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415

    file = os.fspath(path) if path is not None else os.path.expanduser("~/.kube/config")
    source = f"kubeconfig {file}" + (f" (context {context})" if context else "")
    cfg = client.Configuration()
    try:
        # persist_config=False: never write refreshed tokens back into the user's file.
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=file, context=context, client_configuration=cfg, persist_config=False)
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--kubeconfig: cannot load {source}: {exc}") from exc
    return _from_configuration(cfg, source, _library_authorization(cfg))


def load_incluster(service_account_dir: str = SERVICE_ACCOUNT_DIR) -> KubeCredentials:
    """Credentials of the pod's service account (the gateway runs in the cluster).

    The token file is re-read on every :meth:`KubeCredentials.authorization`
    call: projected tokens rotate (kubelet refreshes them at 80% of their
    lifetime), and a read of a small file per dial costs nothing next to a
    TLS handshake.

    Raises:
        ConfigError: not in a cluster (no ``KUBERNETES_SERVICE_HOST``), or the
            token or CA file is missing or empty.
    """
    from kubernetes import client  # noqa: PLC0415
    from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415
    from kubernetes.config.incluster_config import InClusterConfigLoader  # noqa: PLC0415

    token_file = os.path.join(service_account_dir, "token")
    ca_file = os.path.join(service_account_dir, "ca.crt")
    cfg = client.Configuration()
    try:
        loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=token_file, cert_filename=ca_file, try_refresh_token=False)
        loader.load_and_set(cfg)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as exc:
        raise ConfigError("--kubeconfig not given and no in-cluster service account: "
                          f"{exc}") from exc

    def authorization() -> str | None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"in-cluster: cannot read the service account token "
                              f"{token_file}: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"in-cluster: the service account token {token_file} is empty")
        return f"Bearer {token}"

    return _from_configuration(cfg, "in-cluster", authorization)


def load_credentials(kubeconfig: str | os.PathLike[str] | None = None,
                     context: str | None = None) -> KubeCredentials:
    """``config.upstream``'s choice: a kubeconfig when one is named, else in-cluster.

    Raises:
        ConfigError: see :func:`load_kubeconfig` and :func:`load_incluster`.
    """
    if kubeconfig is not None:
        return load_kubeconfig(kubeconfig, context)
    if context is not None:
        raise ConfigError("--context needs --kubeconfig (in-cluster config has no contexts)")
    return load_incluster()
