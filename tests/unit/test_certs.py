"""podterm.net.certs: the development PKI behind ``podterm certs init``."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from podterm.auth.identity import ADMINS_GROUP
from podterm.config import CertsInitOptions
from podterm.errors import ConfigError
from podterm.net import certs
from podterm.net.certs import PKIPaths, generate_dev_pki, parse_user_spec

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def subject_values(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    out = tmp_path_factory.mktemp("pki") / "dev"
    return generate_dev_pki(out, hosts=["gw.example.com", "10.0.0.5", "[fd00::1]", "localhost"],
                            users=["admin:podterm:admins", "agent:podterm:agents",
                                   "alice:dev,ops", "bob"], now=NOW)


# ------------------------------------------------------------------ layout


def test_writes_the_documented_file_names(pki: PKIPaths) -> None:
    names = sorted(p.name for p in pki.dir.iterdir())
    assert names == sorted(["ca.crt", "ca.key", "server.crt", "server.key",
                            "client-admin.crt", "client-admin.key", "client-agent.crt",
                            "client-agent.key", "client-alice.crt", "client-alice.key",
                            "client-bob.crt", "client-bob.key"])
    assert pki.client("alice").cert == pki.dir / "client-alice.crt"
    with pytest.raises(KeyError):
        pki.client("nobody")


def test_keys_are_0600_certificates_0644_directory_0700(pki: PKIPaths) -> None:
    for path in pki.files():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path
    assert stat.S_IMODE(pki.dir.stat().st_mode) == 0o700


def test_every_key_is_p256_and_matches_its_certificate(pki: PKIPaths) -> None:
    pairs = [(pki.ca_cert, pki.ca_key), (pki.server_cert, pki.server_key)]
    pairs += [(c.cert, c.key) for c in pki.clients]
    for cert_path, key_path in pairs:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert key.public_key() == load(cert_path).public_key()
        assert b"BEGIN PRIVATE KEY" in key_path.read_bytes()  # PKCS#8, unencrypted


def test_default_users_are_admin_and_agent(tmp_path: Path) -> None:
    paths = generate_dev_pki(tmp_path / "d")
    got = [(c.user, c.groups) for c in paths.clients]
    assert got == [("admin", (ADMINS_GROUP,)), ("agent", ("podterm:agents",))]
    assert certs.ADMINS_GROUP == ADMINS_GROUP


# ------------------------------------------------------------------ the CA


def test_ca_signs_leaves_only(pki: PKIPaths) -> None:
    ca = load(pki.ca_cert)
    assert ca.subject == ca.issuer
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_validity_periods(pki: PKIPaths) -> None:
    ca = load(pki.ca_cert)
    assert ca.not_valid_before_utc == NOW - dt.timedelta(minutes=5)
    assert ca.not_valid_after_utc == NOW + certs.CA_VALIDITY
    for path in (pki.server_cert, pki.client("alice").cert):
        leaf = load(path)
        assert leaf.not_valid_before_utc == NOW - dt.timedelta(minutes=5)
        assert leaf.not_valid_after_utc == NOW + certs.LEAF_VALIDITY
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


# ------------------------------------------------------------------ server


def test_server_san_has_loopback_and_given_hosts_once(pki: PKIPaths) -> None:
    san = load(pki.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gw.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::1")]
    assert pki.hosts == ("localhost", "127.0.0.1", "::1", "gw.example.com", "10.0.0.5",
                         "fd00::1")


def test_server_cert_is_for_servers_only(pki: PKIPaths) -> None:
    server = load(pki.server_cert)
    assert ekus(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca


def test_server_cert_passes_strict_webpki_verification(pki: PKIPaths) -> None:
    ca, server = load(pki.ca_cert), load(pki.server_cert)
    when = NOW + dt.timedelta(days=1)
    builder = PolicyBuilder().store(Store([ca])).time(when)
    for name in (x509.DNSName("localhost"), x509.DNSName("gw.example.com"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.IPAddress(ipaddress.ip_address("::1"))):
        chain = builder.build_server_verifier(name).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("other.example.com")).verify(server, [])


# ------------------------------------------------------------------ clients


def test_client_subject_is_cn_user_and_one_o_per_group(pki: PKIPaths) -> None:
    alice = load(pki.client("alice").cert)
    assert subject_values(alice, NameOID.COMMON_NAME) == ["alice"]
    assert subject_values(alice, NameOID.ORGANIZATION_NAME) == ["dev", "ops"]
    admin = load(pki.client("admin").cert)
    assert subject_values(admin, NameOID.ORGANIZATION_NAME) == ["podterm:admins"]
    agent = load(pki.client("agent").cert)
    assert subject_values(agent, NameOID.ORGANIZATION_NAME) == ["podterm:agents"]
    bob = load(pki.client("bob").cert)
    assert subject_values(bob, NameOID.ORGANIZATION_NAME) == []
    assert pki.client("alice").groups == ("dev", "ops")


def test_client_certs_are_for_clients_only_and_signed_by_the_ca(pki: PKIPaths) -> None:
    # (cryptography's client verifier wants a SAN, which Kubernetes-style client
    # certificates do not carry; OpenSSL's chain check runs in
    # tests/integration/test_tls.py, where a server cert is refused as a client one.)
    ca = load(pki.ca_cert)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for c in pki.clients:
        cert = load(c.cert)
        assert ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


# ------------------------------------------------------------------ overwriting


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    first = generate_dev_pki(tmp_path)
    before = {p: p.read_bytes() for p in first.files()}
    with pytest.raises(FileExistsError) as info:
        generate_dev_pki(tmp_path)
    assert info.value.filename == str(first.ca_cert)
    assert {p: p.read_bytes() for p in first.files()} == before


def test_one_existing_file_blocks_the_whole_run(tmp_path: Path) -> None:
    (tmp_path / "client-bob.key").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_dev_pki(tmp_path, users=["bob"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-bob.key"]
    assert (tmp_path / "client-bob.key").read_text() == "mine"


def test_force_replaces_everything(tmp_path: Path) -> None:
    first = generate_dev_pki(tmp_path)
    old = {p: load(p).serial_number for p in first.files() if p.suffix == ".crt"}
    (tmp_path / "server.key").chmod(0o644)  # a loosened key is tightened again
    second = generate_dev_pki(tmp_path, force=True)
    for p in second.files():
        if p.suffix == ".crt":
            assert load(p).serial_number != old[p]
        else:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    paths = generate_dev_pki(tmp_path / "a" / "b")
    assert paths.server_cert.exists()


# ------------------------------------------------------------------ input


@pytest.mark.parametrize(("spec", "expected"), [
    ("alice", ("alice", ())),
    ("alice:dev", ("alice", ("dev",))),
    ("alice:dev, podterm:users", ("alice", ("dev", "podterm:users"))),
    ("admin:podterm:admins", ("admin", ("podterm:admins",))),
])
def test_parse_user_spec(spec: str, expected: tuple[str, tuple[str, ...]]) -> None:
    assert parse_user_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", ":dev", "../etc", "a b", "alice:dev,,ops", "alice:dev\x00",
                                  "x" * 65])
def test_parse_user_spec_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_user_spec(spec)


@pytest.mark.parametrize("host", ["exa mple.com", "-bad.example", "a..b", "http://x", ""])
def test_bad_host_is_rejected_before_writing(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="invalid host"):
        generate_dev_pki(tmp_path / "d", hosts=[host])
    assert not (tmp_path / "d").exists()


def test_wildcard_host_is_a_dns_san(tmp_path: Path) -> None:
    paths = generate_dev_pki(tmp_path, hosts=["*.podterm.svc.cluster.local"])
    san = load(paths.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "*.podterm.svc.cluster.local" in san.get_values_for_type(x509.DNSName)


def test_duplicate_user_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than once"):
        generate_dev_pki(tmp_path, users=["bob", "bob:dev"])


def test_load_ca_issues_more_certificates(pki: PKIPaths) -> None:
    ca = certs.load_ca(pki.ca_cert, pki.ca_key)
    carol = certs.issue_client_cert(ca, "carol", ["qa"])
    carol.cert.verify_directly_issued_by(load(pki.ca_cert))
    assert "carol" not in repr(carol.key)
    with pytest.raises(ValueError, match="does not belong"):
        certs.load_ca(pki.ca_cert, pki.server_key)


# ------------------------------------------------------------------ the command


def test_main_prints_files_and_the_serve_flags(tmp_path: Path) -> None:
    out = io.StringIO()
    assert certs.main(CertsInitOptions(dir=str(tmp_path / "pki")), out=out) == 0
    text = out.getvalue()
    for name in ("ca.crt", "ca.key", "server.crt", "client-admin.crt", "client-agent.key"):
        assert name in text
    assert (f"podterm serve --tls-cert {tmp_path}/pki/server.crt --tls-key "
            f"{tmp_path}/pki/server.key --client-ca {tmp_path}/pki/ca.crt") in text
    assert f"--cert {tmp_path}/pki/client-agent.crt" in text


def test_main_refuses_existing_files_with_status_1(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    generate_dev_pki(tmp_path)
    assert certs.main(CertsInitOptions(dir=str(tmp_path)), out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/ca.crt: already exists" in err and "--force" in err


def test_main_takes_hosts_users_force_when_the_options_have_them(tmp_path: Path) -> None:
    generate_dev_pki(tmp_path)
    options = SimpleNamespace(dir=str(tmp_path), hosts=("gw.internal",), users=("carol:qa",),
                              force=True)
    assert certs.main(options, out=io.StringIO()) == 0  # type: ignore[arg-type]
    assert (tmp_path / "client-carol.crt").exists()
    san = load(tmp_path / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "gw.internal" in san.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("hosts", ("bad host",), "--hosts"), ("users", ("../x",), "--users"),
    ("users", ("a", "a"), "--users")])
def test_main_bad_values_are_config_errors_naming_the_flag(
        tmp_path: Path, field: str, value: tuple[str, ...], flag: str) -> None:
    options = SimpleNamespace(dir=str(tmp_path / "d"), hosts=(), users=(), force=False)
    setattr(options, field, value)
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        certs.main(options, out=io.StringIO())  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()
