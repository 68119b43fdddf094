"""A development PKI: ``podterm certs init DIR``.

One call makes everything a first TLS run and the tests need::

    DIR/ca.crt  ca.key                development CA (ECDSA P-256, 10 years)
    DIR/server.crt  server.key        gateway certificate: serverAuth, SAN
                                      localhost, 127.0.0.1, ::1 and --hosts
    DIR/client-USER.crt  .key         client certificates: clientAuth,
                                      subject CN = USER, one O per group

Client subjects follow the Kubernetes convention for X.509 client
authentication (kube-apiserver ``--client-ca-file``): the common name is the
user name and every organization attribute is a group, so the same files work
with kubectl and with :func:`podterm.net.tls.peer_identity`.  Without
``--users`` two clients are made: ``admin`` in ``podterm:admins`` (may do
anything, as the embedded default's token) and ``agent`` in
``podterm:agents`` (may register as a sidecar agent).

The certificates are built to pass strict chain verification (Python 3.13's
default ``VERIFY_X509_STRICT``): the CA has critical basicConstraints and
keyUsage and a subjectKeyIdentifier; every leaf names its issuer's key
(authorityKeyIdentifier), is not a CA, and carries the one extended key usage
it is for, so a server certificate is refused as a client certificate and
the other way round.

Files are written atomically (temporary file in DIR, then rename), so a
running gateway's :class:`~podterm.net.tls.CertReloader` never reads half a
file; private keys are created 0600 and certificates 0644.  Existing files
are never replaced unless ``force`` is given, and nothing is written when any
of them exists.

This is for development and tests only: the CA key sits unencrypted next to
the certificates it signs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import ipaddress
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from podterm.config import DEFAULT_PORT, CertsInitOptions
from podterm.errors import ConfigError

__all__ = [
    "CA_VALIDITY", "LEAF_VALIDITY", "DEFAULT_HOSTS", "DEFAULT_USERS",
    "ADMINS_GROUP", "AGENTS_GROUP",
    "Issued", "ClientPaths", "PKIPaths",
    "parse_user_spec", "create_ca", "issue_server_cert", "issue_client_cert", "load_ca",
    "write_cert", "write_key", "generate_dev_pki", "main",
]

#: 10 years: a development CA outlives the checkouts that trust it; renewing
#: it would mean re-trusting it everywhere.
CA_VALIDITY = dt.timedelta(days=3650)
#: 825 days: the longest server-certificate lifetime Apple platforms accept
#: from a private CA (longer ones fail in Safari/curl on macOS), and long
#: enough that a dev setup does not expire mid-project.
LEAF_VALIDITY = dt.timedelta(days=825)
#: Start validity a little in the past: a VM or container whose clock is a few
#: minutes behind the host must not see "certificate is not yet valid".
_BACKDATE = dt.timedelta(minutes=5)

#: Every server certificate covers the loopback names; --hosts adds to these.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Client certificates made when no --users are given (USER:GROUP,... syntax).
DEFAULT_USERS = ("admin:podterm:admins", "agent:podterm:agents")
#: The same names as podterm.auth.identity (net/ sits below auth/, so no import).
ADMINS_GROUP = "podterm:admins"
AGENTS_GROUP = "podterm:agents"

_ORG = "podterm development"
# User names become file names (client-USER.crt): no '/', no spaces, nothing a
# shell must quote.  Kubernetes user names may hold ':' but USER:GROUP syntax
# splits at the first one, as `podterm policy check` does.
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Groups are free text in Kubernetes; refuse only what cannot be an O value
# usefully (control characters, the ',' separator).
_GROUP = re.compile(r"[^\x00-\x1f\x7f,]{1,64}")
# RFC 1123 host name, optionally a single leading wildcard label.
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:  # never the key
        return f"<Issued {self.cert.subject.rfc4514_string()} serial={self.cert.serial_number:x}>"


@dataclass(frozen=True, slots=True)
class ClientPaths:
    """One client certificate written by :func:`generate_dev_pki`."""

    user: str
    groups: tuple[str, ...]
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class PKIPaths:
    """Where :func:`generate_dev_pki` wrote each file."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: tuple[ClientPaths, ...]
    #: Names and addresses in the server certificate's subjectAltName, in order.
    hosts: tuple[str, ...]

    def client(self, user: str) -> ClientPaths:
        """The client certificate of ``user``; KeyError when none was made."""
        for c in self.clients:
            if c.user == user:
                return c
        raise KeyError(user)

    def files(self) -> tuple[Path, ...]:
        """Every file, CA first, keys after their certificates."""
        out = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        for c in self.clients:
            out += [c.cert, c.key]
        return tuple(out)


# ---------------------------------------------------------------------------
# Parsing the command's values
# ---------------------------------------------------------------------------


def parse_user_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"alice:dev,podterm:users"`` → ``("alice", ("dev", "podterm:users"))``.

    The user ends at the first ``:``; the groups after it are split at ``,``
    (the syntax of ``podterm policy check``).

    Raises:
        ValueError: an empty or unusable user or group name.
    """
    user, _, rest = spec.strip().partition(":")
    groups = tuple(g.strip() for g in rest.split(",")) if rest else ()
    if not _USER.fullmatch(user):
        raise ValueError(f"invalid user {user!r} in {spec!r}: expected letters, digits, "
                         "'.', '_', '@', '-' (at most 64), then optionally ':' and "
                         "comma-separated groups, e.g. alice:dev,podterm:users")
    for g in groups:
        if not _GROUP.fullmatch(g):
            raise ValueError(f"invalid group {g!r} in {spec!r}: expected 1 to 64 characters, "
                             "no control characters")
    return user, groups


def _san_entries(hosts: Iterable[str]) -> tuple[list[str], list[x509.GeneralName]]:
    """Defaults + ``hosts``, deduplicated in order, as (texts, SAN entries)."""
    seen: list[str] = []
    names: list[x509.GeneralName] = []
    for raw in (*DEFAULT_HOSTS, *hosts):
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):  # [::1] as in URLs
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not _DNS.fullmatch(host) or len(host) > 253:
                raise ValueError(f"invalid host {raw!r}: expected an IP address or a DNS "
                                 "name such as gateway.example.com") from None
            text = host.rstrip(".").lower()
            entry: x509.GeneralName = x509.DNSName(text)
        else:
            text = str(ip)
            entry = x509.IPAddress(ip)
        if text not in seen:
            seen.append(text)
            names.append(entry)
    return seen, names


# ---------------------------------------------------------------------------
# Building certificates
# ---------------------------------------------------------------------------


def _now(now: dt.datetime | None) -> dt.datetime:
    return dt.datetime.now(dt.UTC) if now is None else now


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: every TLS stack and every browser supports it, signatures are
    # small and fast (ARCHITECTURE: handshake rate matters on mass reconnect).
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(*, now: dt.datetime | None = None) -> Issued:
    """A new self-signed development CA, valid :data:`CA_VALIDITY` from ``now``."""
    now = _now(now)
    key = _new_key()
    serial = x509.random_serial_number()
    # The serial in the name tells two developers' CAs apart in a trust store.
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, f"podterm development CA {serial:x}"[:32]),
    ])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(public).serial_number(serial)
        .not_valid_before(now - _BACKDATE).not_valid_after(now + CA_VALIDITY)
        # path_length=0: it signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(ca: Issued, subject: x509.Name, usage: x509.ObjectIdentifier,
          san: list[x509.GeneralName] | None, now: dt.datetime | None) -> Issued:
    now = _now(now)
    key = _new_key()
    public = key.public_key()
    not_after = min(now + LEAF_VALIDITY, ca.cert.not_valid_after_utc)  # never outlive the CA
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca.cert.subject)
        .public_key(public).serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDSA with ECDHE: the key only signs the handshake.
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server_cert(ca: Issued, hosts: Iterable[str] = (), *,
                      now: dt.datetime | None = None) -> Issued:
    """A serverAuth certificate for the loopback names plus ``hosts``.

    Each host is an IP address (SAN iPAddress) or a DNS name (SAN dNSName;
    ``*.example.com`` allowed); ``[::1]`` brackets are accepted.

    Raises:
        ValueError: a host is neither.
    """
    texts, san = _san_entries(hosts)
    # Verifiers read only the SAN; the CN is for people reading the cert.
    extra = [t for t in texts if t not in DEFAULT_HOSTS]
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, (extra[0] if extra else "localhost")[:64]),
    ])
    return _leaf(ca, subject, ExtendedKeyUsageOID.SERVER_AUTH, san, now)


def issue_client_cert(ca: Issued, user: str, groups: Sequence[str] = (), *,
                      now: dt.datetime | None = None) -> Issued:
    """A clientAuth certificate with subject CN = ``user``, one O per group.

    Raises:
        ValueError: ``user`` or a group is not usable (see :func:`parse_user_spec`).
    """
    parse_user_spec(f"{user}:{','.join(groups)}" if groups else user)  # validate only
    # O before CN, as kubeadm and `openssl req -subj /O=g/CN=u` write them.
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
    return _leaf(ca, x509.Name(attrs), ExtendedKeyUsageOID.CLIENT_AUTH, None, now)


def load_ca(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> Issued:
    """Read a CA written by :func:`generate_dev_pki` (to issue more certificates).

    Raises:
        OSError: a file cannot be read.
        ValueError: not PEM, not ECDSA, or the key does not match the certificate.
    """
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_file}: not an ECDSA private key")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{key_file} does not belong to {cert_file}")
    return Issued(cert, key)


# ---------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``data`` to a temporary file in ``path``'s directory, then move it in.

    Readers (a gateway reloading its certificate) see the old file or the new
    one, never half of either.  The temporary file is created 0600 by
    mkstemp, so a key is never readable by others, not even for a moment.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic and refuses an existing name (EEXIST)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_cert(path: str | os.PathLike[str], cert: x509.Certificate, *,
               overwrite: bool = False) -> None:
    """Write ``cert`` as PEM, mode 0644.  FileExistsError unless ``overwrite``."""
    _write_atomic(Path(path), cert.public_bytes(serialization.Encoding.PEM), 0o644,
                  overwrite=overwrite)


def write_key(path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey, *,
              overwrite: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600.  FileExistsError unless ``overwrite``."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    _write_atomic(Path(path), data, 0o600, overwrite=overwrite)


def generate_dev_pki(dir: str | os.PathLike[str], hosts: Iterable[str] = (),
                     users: Iterable[str] = (), *, force: bool = False,
                     now: dt.datetime | None = None) -> PKIPaths:
    """Create a development CA, a server certificate and client certificates in ``dir``.

    Args:
        dir: output directory; created (0700) with its parents when missing.
        hosts: extra server names or addresses besides :data:`DEFAULT_HOSTS`.
        users: ``USER[:GROUP,...]`` specs (:func:`parse_user_spec`); empty means
            :data:`DEFAULT_USERS`.
        force: replace existing files; otherwise any existing target file
            stops the call before anything is written.
        now: the issuing time (tests); default the current UTC time.

    Returns:
        Where each file went.

    Raises:
        ValueError: a bad host or user spec, or a user given twice.
        FileExistsError: a target file exists and ``force`` is false; its
            ``filename`` is the first such file.
        OSError: the directory or a file cannot be written.
    """
    out = Path(dir)
    specs = [parse_user_spec(u) for u in (tuple(users) or DEFAULT_USERS)]
    names = [u for u, _ in specs]
    dupes = sorted({u for u in names if names.count(u) > 1})
    if dupes:
        raise ValueError(f"user {dupes[0]!r} given more than once")
    texts, _ = _san_entries(hosts)  # validate before touching the disk

    clients = tuple(ClientPaths(u, g, out / f"client-{u}.crt", out / f"client-{u}.key")
                    for u, g in specs)
    paths = PKIPaths(dir=out, ca_cert=out / "ca.crt", ca_key=out / "ca.key",
                     server_cert=out / "server.crt", server_key=out / "server.key",
                     clients=clients, hosts=tuple(texts))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not force:
        existing = [p for p in paths.files() if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise FileExistsError(errno.EEXIST, f"already exists{more}; --force replaces",
                                  str(existing[0]))

    ca = create_ca(now=now)
    server = issue_server_cert(ca, hosts, now=now)
    issued = [issue_client_cert(ca, u, g, now=now) for u, g in specs]
    # Keys before certificates: a reloader that sees a new certificate
    # finds its key already in place.
    write_key(paths.ca_key, ca.key, overwrite=force)
    write_cert(paths.ca_cert, ca.cert, overwrite=force)
    write_key(paths.server_key, server.key, overwrite=force)
    write_cert(paths.server_cert, server.cert, overwrite=force)
    for c, pair in zip(clients, issued, strict=True):
        write_key(c.key, pair.key, overwrite=force)
        write_cert(c.cert, pair.cert, overwrite=force)
    return paths


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def _summary(paths: PKIPaths, out: TextIO) -> None:
    q = shlex.quote
    d = paths.dir
    ca_cert = paths.ca_cert.read_bytes()
    until = x509.load_pem_x509_certificate(ca_cert).not_valid_after_utc.date()
    rows = [
        ("ca.crt", f"development CA certificate (valid until {until}); trust it in clients"),
        ("ca.key", "CA private key (0600): keep it private; it signs everything here"),
        ("server.crt, server.key", f"gateway certificate for {', '.join(paths.hosts)}"),
    ]
    for c in paths.clients:
        groups = ", ".join(c.groups) if c.groups else "no groups"
        rows.append((f"{c.cert.name}, {c.key.name}", f"client {c.user} ({groups})"))
    width = max(len(name) for name, _ in rows)
    print(f"Wrote a development PKI to {d} (for development and tests only):", file=out)
    for name, what in rows:
        print(f"  {name.ljust(width)}  {what}", file=out)

    url = f"https://127.0.0.1:{DEFAULT_PORT}"
    print("\nNext steps:", file=out)
    print("  # serve HTTPS/WSS and accept these client certificates (CN = user, O = groups)",
          file=out)
    print(f"  podterm serve --tls-cert {q(str(paths.server_cert))} "
          f"--tls-key {q(str(paths.server_key))} --client-ca {q(str(paths.ca_cert))}", file=out)
    print(f"  # clients trust the CA (with the token serve prints, or a client certificate)"
          f"\n  podterm sessions --server {url} --ca {q(str(paths.ca_cert))}", file=out)
    if paths.clients:
        c = next((c for c in paths.clients if ADMINS_GROUP in c.groups), paths.clients[0])
        print(f"  curl --cacert {q(str(paths.ca_cert))} --cert {q(str(c.cert))} "
              f"--key {q(str(c.key))} {url}/api/v1/sessions", file=out)
    agent = next((c for c in paths.clients if AGENTS_GROUP in c.groups), None)
    if agent is not None:
        print(f"  # a sidecar agent with mutual TLS\n  podterm agent --gateway {url} "
              f"--ca {q(str(paths.ca_cert))} --cert {q(str(agent.cert))} "
              f"--key {q(str(agent.key))} --namespace default --pod dev", file=out)


def main(options: CertsInitOptions, *, out: TextIO | None = None) -> int:
    """Run ``podterm certs init``: write the PKI, print what was written and how to use it.

    ``hosts``, ``users`` and ``force`` are read from ``options`` when it has them.

    Returns:
        0 when written; 1 when a file exists (without ``force``) or cannot be written.

    Raises:
        ConfigError: a bad ``--hosts`` or ``--users`` value (exit status 2).
    """
    stream = sys.stdout if out is None else out
    hosts: tuple[str, ...] = tuple(getattr(options, "hosts", ()) or ())
    users: tuple[str, ...] = tuple(getattr(options, "users", ()) or ())
    force = bool(getattr(options, "force", False))
    # Usage errors first, each naming its flag, before anything touches the disk.
    try:
        _san_entries(hosts)
    except ValueError as exc:
        raise ConfigError(f"--hosts: {exc}") from exc
    try:
        for spec in users:
            parse_user_spec(spec)
    except ValueError as exc:
        raise ConfigError(f"--users: {exc}") from exc
    try:
        paths = generate_dev_pki(options.dir, hosts, users, force=force)
    except FileExistsError as exc:
        print(f"podterm certs init: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a user given twice
        raise ConfigError(f"--users: {exc}") from exc
    _summary(paths, stream)
    return 0
