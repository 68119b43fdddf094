"""TLS contexts, client-certificate identities and certificate reload.

* :func:`server_context` – the gateway's HTTPS/WSS context: TLS 1.2+, AEAD
  ECDHE suites only, ALPN ``http/1.1``; with a client CA, client certificates
  are *optional* but verified when presented (so browsers and token clients
  still connect, and a presented certificate must chain to the CA and carry
  the clientAuth usage, or the handshake fails).
* :func:`client_context` – for ``podterm`` clients and the agent: the given
  CA (else the system store), hostname checking, optional client certificate.
* :func:`peer_identity` – ``(user, groups)`` from a *verified* client
  certificate: CN = user, every O = a group (the Kubernetes convention).
* :class:`CertReloader` – polls the certificate and key files and loads a
  changed pair into the same, live :class:`ssl.SSLContext`.

Reload without dropping sessions.  An established TLS connection keeps the
certificate it was handshaken with: OpenSSL copies the context's certificate
into each connection at ``SSL_new``, so ``load_cert_chain`` on the live
context affects only handshakes that start afterwards.  The listener keeps
using the same context object; nothing is restarted.

A failed reload keeps the old certificate, which takes care: a failing
``load_cert_chain`` on a live context is *not* atomic (OpenSSL installs the
new certificate, then drops the old key when the new key does not match it,
and the context then fails every handshake with "no shared cipher").  So the
reloader reads both files once, proves the pair loads into a scratch context,
and only then loads the *same bytes* into the live one.  The bytes go through
an anonymous in-memory file (``memfd``) where the platform has one, so
nothing is written to disk (containers often run with a read-only root).

Only the certificate and key are reloaded.  A changed client CA needs a
restart: OpenSSL's trust store can add a CA but never remove one, so an
in-place reload could not take trust away.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio
from cryptography import x509

from podterm.errors import ConfigError
from podterm.metrics import MetricFamily, counter, gauge

__all__ = [
    "ALPN", "TLS12_CIPHERS", "DEFAULT_RELOAD_INTERVAL_S",
    "server_context", "client_context", "peer_identity",
    "CertReloadStatistics", "CertReloader",
]

log = logging.getLogger(__name__)

#: The gateway speaks HTTP/1.1 only (WebSocket upgrades need it, RFC 8441's
#: HTTP/2 WebSockets are not supported); advertising it stops clients that
#: prefer h2 from trying it.
ALPN = ("http/1.1",)
#: TLS 1.2 suites: Mozilla's "intermediate" list without the DHE ones: ECDHE
#: for forward secrecy, AEAD only.  TLS 1.3 suites are all fine and are not
#: affected by this string.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
#: 5 s: a stat of two files costs microseconds, and kubelet itself takes up to
#: a minute to project a renewed Secret, so this adds little to that delay.
DEFAULT_RELOAD_INTERVAL_S = 5.0


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    # Client-initiated TLS 1.2 renegotiation is a CPU-exhaustion vector and
    # nothing we serve needs it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(list(ALPN))


def server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                   client_ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The gateway's server context.

    Args:
        cert_file: PEM certificate chain, leaf first.
        key_file: its PEM private key (unencrypted).
        client_ca_file: PEM CA bundle; when given, clients *may* present a
            certificate, which must then verify against it (an unverifiable
            one fails the handshake).  Clients without one still connect and
            authenticate otherwise (bearer token).

    Raises:
        ConfigError: a file cannot be read or parsed, or the key does not
            match the certificate; the message names the flag and the file.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    try:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load {os.fspath(cert_file)} with "
                          f"{os.fspath(key_file)}: {_reason(exc)}") from exc
    if client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=os.fspath(client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--client-ca: cannot load {os.fspath(client_ca_file)}: "
                              f"{_reason(exc)}") from exc
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: str | os.PathLike[str] | None = None,
                   cert_file: str | os.PathLike[str] | None = None,
                   key_file: str | os.PathLike[str] | None = None,
                   insecure: bool = False) -> ssl.SSLContext:
    """A client context for ``podterm`` commands and the agent.

    Args:
        ca_file: trust only this PEM CA bundle; ``None`` = the system store.
        cert_file: client certificate chain for mutual TLS (PEM).
        key_file: its key; ``None`` = the key is inside ``cert_file``.
        insecure: do not verify the server at all (``--insecure-skip-tls-verify``).

    Raises:
        ConfigError: a file cannot be used, ``key_file`` without ``cert_file``,
            or ``insecure`` together with ``ca_file`` (kubectl refuses it too).
    """
    if insecure and ca_file is not None:
        raise ConfigError("--insecure-skip-tls-verify: cannot be combined with --ca")
    if key_file is not None and cert_file is None:
        raise ConfigError("--key: needs --cert")
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if ca_file is None else os.fspath(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca: cannot load {os.fspath(ca_file or '')}: {_reason(exc)}"
                          ) from exc
    _harden(ctx)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        try:
            ctx.load_cert_chain(os.fspath(cert_file),
                                None if key_file is None else os.fspath(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--cert/--key: cannot load {os.fspath(cert_file)}: "
                              f"{_reason(exc)}") from exc
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'ssl'})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _PeerCertSource(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> Any: ...


def peer_identity(ssl_object: _PeerCertSource | trio.SSLStream[Any]
                  ) -> tuple[str, tuple[str, ...]] | None:
    """``(user, groups)`` from the peer's verified certificate, else ``None``.

    User = the subject's common name, groups = its organization values in
    order (kube-apiserver's x509 authenticator).  ``None`` when the peer sent
    no certificate, when it was not verified (``verify_mode`` ``CERT_NONE``:
    Python then hands out no subject), before the handshake, or when the
    subject has no or several common names (ambiguous: refuse rather than
    guess).

    Args:
        ssl_object: an :class:`ssl.SSLObject`, :class:`ssl.SSLSocket` or a
            handshaken :class:`trio.SSLStream` (which forwards ``getpeercert``).
    """
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, trio.NeedHandshakeError):  # not connected / no handshake yet
        return None
    if not cert:
        return None
    subject = cert.get("subject", ())
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    orgs = [value for rdn in subject for key, value in rdn if key == "organizationName"]
    if len(names) != 1 or not names[0]:
        return None
    return names[0], tuple(o for o in orgs if o)


# ---------------------------------------------------------------------------
# Reload
# ---------------------------------------------------------------------------

# (device, inode, size, mtime ns, ctime ns) per file, or the error's name.
# The inode catches Kubernetes Secret volumes (an atomic symlink swap, new
# files) and rename-into-place writers even within one mtime tick.
_Stamp = tuple[int, int, int, int, int] | str


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError as exc:
        return type(exc).__name__
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@contextlib.contextmanager
def _pem_paths(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths that read back exactly these bytes, for ``load_cert_chain``.

    In-memory files on Linux (nothing touches the disk, works on a read-only
    root); elsewhere a private temporary directory, removed at once.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for data in (cert_pem, key_pem):
                fd = os.memfd_create("podterm-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
    else:  # pragma: no cover - non-Linux
        with tempfile.TemporaryDirectory(prefix="podterm-tls-") as d:  # 0700
            cert_path, key_path = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
            for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            yield cert_path, key_path


def _leaf_facts(cert_pem: bytes) -> tuple[int, float]:
    """(serial, not-after as UNIX seconds) of the first certificate in the PEM."""
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    return leaf.serial_number, leaf.not_valid_after_utc.timestamp()


@dataclass(frozen=True, slots=True)
class CertReloadStatistics:
    """What :class:`CertReloader` has done.

    Attributes:
        checks: polls of the files so far.
        reloads: certificates loaded into the live context after the first.
        failures: reload attempts that failed (the previous pair kept serving).
        serial: serial number of the certificate now served (``None`` when the
            initial file could not be parsed).
        not_after: its expiry as UNIX seconds (for an expiry alert).
        last_error: why the latest attempt failed; ``None`` after a success.
    """

    checks: int
    reloads: int
    failures: int
    serial: int | None
    not_after: float | None
    last_error: str | None

    @property
    def attempts(self) -> int:
        """Reload attempts: successes plus failures."""
        return self.reloads + self.failures


class CertReloader:
    """Reload a changed certificate/key pair into a live server context.

    Run :meth:`run` in a nursery (``await nursery.start(reloader.run)``); it
    stats both files every ``interval_s`` seconds and, when either changed
    (inode, size, mtime or ctime), loads the pair into ``context``, which the
    listener keeps using: new handshakes get the new certificate, connections
    already open keep theirs.  A pair that does not load (a missing file, bad
    PEM, a key that does not match, a half-copied file) is logged and
    counted, and the old certificate keeps serving; the next change is tried
    again.

    Create it right after :func:`server_context` with the same paths: the
    files' state at construction is taken as what the context holds.

    Args:
        context: the live server context (from :func:`server_context`).
        cert_file: certificate chain path, as given to :func:`server_context`.
        key_file: key path.
        interval_s: seconds between polls (> 0).
    """

    __slots__ = ("context", "cert_file", "key_file", "interval_s", "_stamps", "_checks",
                 "_reloads", "_failures", "_serial", "_not_after", "_last_error", "_lot",
                 "_scope")

    def __init__(self, context: ssl.SSLContext, cert_file: str | os.PathLike[str],
                 key_file: str | os.PathLike[str], *,
                 interval_s: float = DEFAULT_RELOAD_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s}: must be > 0")
        self.context = context
        self.cert_file = os.fspath(cert_file)
        self.key_file = os.fspath(key_file)
        self.interval_s = interval_s
        self._stamps = self._current_stamps()
        self._checks = 0
        self._reloads = 0
        self._failures = 0
        self._serial: int | None = None
        self._not_after: float | None = None
        self._last_error: str | None = None
        with contextlib.suppress(OSError, ValueError):
            self._serial, self._not_after = _leaf_facts(Path(self.cert_file).read_bytes())
        self._lot = trio.lowlevel.ParkingLot()
        self._scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        serial = "-" if self._serial is None else f"{self._serial:x}"
        return (f"<CertReloader {self.cert_file} serial={serial} reloads={self._reloads} "
                f"failures={self._failures} every {self.interval_s:g}s>")

    def _current_stamps(self) -> tuple[_Stamp, _Stamp]:
        return _stamp(self.cert_file), _stamp(self.key_file)

    # -------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Poll until :meth:`stop` or cancellation; never raises for a bad file."""
        with trio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            while True:
                await trio.sleep(self.interval_s)
                await self.check()
        self._scope = None

    def stop(self) -> None:
        """End :meth:`run` (idempotent; a no-op when it is not running)."""
        if self._scope is not None:
            self._scope.cancel()

    async def check(self) -> bool | None:
        """Poll once: ``None`` when unchanged, else whether the reload worked.

        Reading and test-loading the files runs in a worker thread; only the
        final load into the live context runs on the event loop's thread,
        where the handshakes that use the context also run.
        """
        stamps = self._note_check()
        if stamps is None:
            return None
        prepared = await trio.to_thread.run_sync(self._prepare)
        return self._finish(stamps, prepared)

    def check_nowait(self) -> bool | None:
        """:meth:`check` without a thread, for callers outside trio (and tests)."""
        stamps = self._note_check()
        if stamps is None:
            return None
        return self._finish(stamps, self._prepare())

    def reload_nowait(self) -> bool:
        """Try a reload now whether or not the files look changed (e.g. on SIGHUP)."""
        return self._finish(self._current_stamps(), self._prepare())

    async def wait_attempts(self, n: int) -> CertReloadStatistics:
        """Wait until at least ``n`` reload attempts (successes + failures) happened."""
        while self._reloads + self._failures < n:
            await self._lot.park()
        return self.statistics()

    def statistics(self) -> CertReloadStatistics:
        """A frozen snapshot of the counters and the served certificate."""
        return CertReloadStatistics(checks=self._checks, reloads=self._reloads,
                                    failures=self._failures, serial=self._serial,
                                    not_after=self._not_after, last_error=self._last_error)

    def metric_families(self) -> list[MetricFamily]:
        """The statistics as Prometheus families for ``/metrics``."""
        stats = self.statistics()
        families = [
            counter("podterm_tls_cert_reloads_total",
                    "TLS certificate reloads after start-up", stats.reloads),
            counter("podterm_tls_cert_reload_failures_total",
                    "TLS certificate reloads that failed (the old certificate kept serving)",
                    stats.failures),
        ]
        if stats.not_after is not None:
            families.append(gauge("podterm_tls_cert_not_after_seconds",
                                  "Expiry of the served TLS certificate, UNIX time",
                                  stats.not_after))
        return families

    # -------------------------------------------------------------- internals

    def _note_check(self) -> tuple[_Stamp, _Stamp] | None:
        # Stamp *before* reading: a file that changes during the read then
        # differs from the recorded stamp at the next poll and is read again.
        self._checks += 1
        stamps = self._current_stamps()
        return None if stamps == self._stamps else stamps

    def _prepare(self) -> tuple[bytes, bytes, int, float] | str:
        """Read the pair and prove it loads: the bytes and leaf facts, or why not."""
        try:
            cert_pem = Path(self.cert_file).read_bytes()
            key_pem = Path(self.key_file).read_bytes()
            with _pem_paths(cert_pem, key_pem) as (cert_path, key_path):
                scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                scratch.load_cert_chain(cert_path, key_path)
            serial, not_after = _leaf_facts(cert_pem)
        except (OSError, ssl.SSLError, ValueError) as exc:
            where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
            return f"{where}{_reason(exc)}"
        return cert_pem, key_pem, serial, not_after

    def _finish(self, stamps: tuple[_Stamp, _Stamp],
                prepared: tuple[bytes, bytes, int, float] | str) -> bool:
        self._stamps = stamps
        ok, error = False, ""
        if isinstance(prepared, str):
            error = prepared
        else:
            cert_pem, key_pem, serial, not_after = prepared
            try:
                with _pem_paths(cert_pem, key_pem) as (cert_path, key_path):
                    self.context.load_cert_chain(cert_path, key_path)
            except (OSError, ssl.SSLError) as exc:  # the scratch load worked: rare
                error = _reason(exc)
            else:
                ok = True
        if ok:
            self._reloads += 1
            self._serial, self._not_after = serial, not_after
            self._last_error = None
            expires = dt.datetime.fromtimestamp(not_after, dt.UTC).isoformat()
            log.info("tls.reload.complete: %s serial=%x not_after=%s", self.cert_file, serial,
                     expires)
        else:
            self._failures += 1
            self._last_error = error
            kept = "none" if self._serial is None else f"{self._serial:x}"
            log.warning("tls.reload.failed: %s, %s: %s; still serving serial %s",
                        self.cert_file, self.key_file, error, kept)
        self._lot.unpark_all()
        return ok
