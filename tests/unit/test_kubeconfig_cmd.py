"""``podterm kubeconfig`` with a client certificate instead of a token (issue 4, item 2).

The pair is embedded as kubectl's ``config set-credentials --embed-certs``
does (the files' bytes, base64), and checked first: both given, readable,
PEM, the key unencrypted and the certificate's own.  Certificates come from
the dev PKI (``podterm.net.certs``, ECDSA) and, for a second key type, an RSA
pair made here.  No sockets: kubectl using such a kubeconfig against the
gateway is ``tests/e2e/test_kubectl.py::test_kubectl_uses_podterms_client_cert_kubeconfig``.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from podterm import cli
from podterm.client.kubeconfig import render_kubeconfig
from podterm.config import KubeconfigOptions
from podterm.net.certs import PKIPaths, generate_dev_pki

SERVER = "https://gw.example:7780"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    return generate_dev_pki(tmp_path_factory.mktemp("pki"), users=["alice:dev,ops", "bob"])


def run(capsys: pytest.CaptureFixture[str], *argv: str,
        env: dict[str, str] | None = None) -> tuple[int, str, str]:
    status = cli.main(["kubeconfig", "--server", SERVER, *argv], env=env or {})
    out, err = capsys.readouterr()
    return status, out, err


def user_entry(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    (user,) = doc["users"]
    entry: dict[str, Any] = user["user"]
    return entry


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def rsa_pair(tmp_path: Path, *, days: int = 30,
             now: dt.datetime | None = None) -> tuple[Path, Path]:
    """A self-signed RSA client certificate (CN=rsa-user) and its key, as PEM files."""
    now = now or dt.datetime.now(dt.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-user")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "rsa.crt", tmp_path / "rsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# ------------------------------------------------------------------ what is printed


def test_the_pair_is_embedded_as_kubectl_embeds_it(pki: PKIPaths,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    alice = pki.client("alice")
    status, out, err = run(capsys, "--ca", str(pki.ca_cert), "--client-cert", str(alice.cert),
                           "--client-key", str(alice.key))
    assert (status, err) == (0, "")
    # Exactly the files' bytes, and no token beside them.
    assert user_entry(out) == {"client-certificate-data": b64(alice.cert),
                               "client-key-data": b64(alice.key)}
    doc = yaml.safe_load(out)
    assert doc["clusters"][0]["cluster"] == {
        "server": SERVER, "certificate-authority-data": b64(pki.ca_cert)}
    assert doc["current-context"] == "podterm"


def test_an_rsa_pair_and_a_certificate_chain_work_too(
        pki: PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = rsa_pair(tmp_path)
    text, warnings = render_kubeconfig(KubeconfigOptions(
        server=SERVER, client_cert_file=str(cert), client_key_file=str(key)))
    assert warnings == []
    assert user_entry(text)["client-key-data"] == b64(key)
    # Client certificate first, then its issuer: the first one is matched, the
    # whole file is embedded (kubectl sends the chain).
    chain = tmp_path / "chain.crt"
    bob = pki.client("bob")
    chain.write_bytes(bob.cert.read_bytes() + pki.ca_cert.read_bytes())
    status, out, err = run(capsys, "--client-cert", str(chain), "--client-key", str(bob.key))
    assert (status, err) == (0, "")
    assert user_entry(out)["client-certificate-data"] == b64(chain)


def test_without_token_or_certificate_the_warning_names_both_ways(
        capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys)
    assert status == 0 and user_entry(out) == {}
    assert "no token given" in err and "--client-cert and --client-key" in err


def test_an_expired_certificate_is_printed_with_a_warning(pki: PKIPaths) -> None:
    alice = pki.client("alice")
    options = KubeconfigOptions(server=SERVER, client_cert_file=str(alice.cert),
                                client_key_file=str(alice.key))
    assert render_kubeconfig(options)[1] == []
    text, warnings = render_kubeconfig(options, now=dt.datetime(2999, 1, 1, tzinfo=dt.UTC))
    assert "client-certificate-data" in user_entry(text)
    (warning,) = warnings
    assert warning.startswith("the client certificate (CN=alice,") and "expired on" in warning


def test_over_plain_http_the_warning_says_no_credentials_are_sent(pki: PKIPaths) -> None:
    alice = pki.client("alice")
    _, warnings = render_kubeconfig(KubeconfigOptions(
        server="http://127.0.0.1:7780", client_cert_file=str(alice.cert),
        client_key_file=str(alice.key)))
    (warning,) = warnings
    assert "kubectl sends no credentials to it" in warning


# ------------------------------------------------------------------ what is refused


def refused(capsys: pytest.CaptureFixture[str], *argv: str,
            env: dict[str, str] | None = None) -> str:
    """Run; assert exit 2, nothing printed, one line on stderr; return that line."""
    status, out, err = run(capsys, *argv, env=env)
    assert (status, out) == (2, ""), err
    assert err.count("\n") == 1 and err.startswith("podterm kubeconfig: "), err
    return err


@pytest.mark.parametrize("which", ["cert", "key"])
def test_half_a_pair_is_refused(pki: PKIPaths, capsys: pytest.CaptureFixture[str],
                                which: str) -> None:
    alice = pki.client("alice")
    if which == "cert":
        err = refused(capsys, "--client-cert", str(alice.cert))
        assert "--client-cert needs --client-key" in err
    else:
        err = refused(capsys, "--client-key", str(alice.key))
        assert "--client-key needs --client-cert" in err


def test_a_token_and_a_certificate_exclude_each_other(
        pki: PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice = pki.client("alice")
    pair = ("--client-cert", str(alice.cert), "--client-key", str(alice.key))
    for argv, env in ((("--token", "t0ken", *pair), None),
                      (pair, {"PODTERM_TOKEN": "t0ken"})):
        err = refused(capsys, *argv, env=env)
        assert "exclude each other" in err and "--client-cert" in err
        assert "t0ken" not in err  # never echo a secret


def test_unreadable_files_are_named(pki: PKIPaths, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    alice = pki.client("alice")
    missing = tmp_path / "missing.crt"
    err = refused(capsys, "--client-cert", str(missing), "--client-key", str(alice.key))
    assert f"--client-cert: cannot read '{missing}': No such file or directory" in err
    err = refused(capsys, "--client-cert", str(alice.cert), "--client-key", str(tmp_path))
    assert f"--client-key: cannot read '{tmp_path}': Is a directory" in err


def test_files_that_are_not_pem_are_named(pki: PKIPaths, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    alice = pki.client("alice")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a PEM file\n")
    err = refused(capsys, "--client-cert", str(junk), "--client-key", str(alice.key))
    assert f"--client-cert: '{junk}' holds no PEM certificate" in err
    # A certificate where the key should be, and the other way round.
    err = refused(capsys, "--client-cert", str(alice.cert), "--client-key", str(alice.cert))
    assert f"--client-key: '{alice.cert}' holds no PEM private key" in err
    err = refused(capsys, "--client-cert", str(alice.key), "--client-key", str(alice.key))
    assert f"--client-cert: '{alice.key}' holds no PEM certificate" in err


def test_an_encrypted_key_is_refused_with_the_way_out(
        pki: PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice = pki.client("alice")
    key = serialization.load_pem_private_key(alice.key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    err = refused(capsys, "--client-cert", str(alice.cert), "--client-key", str(encrypted))
    assert f"--client-key: '{encrypted}' is encrypted" in err and "openssl pkey" in err


def test_a_key_of_another_certificate_is_refused(
        pki: PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = pki.client("alice"), pki.client("bob")
    err = refused(capsys, "--client-cert", str(alice.cert), "--client-key", str(bob.key))
    assert (f"--client-cert and --client-key do not match: '{bob.key}' is not the key of "
            f"'{alice.cert}' (CN=alice,") in err
    # Same for a different key type: an RSA key against an ECDSA certificate.
    _, rsa_key = rsa_pair(tmp_path)
    err = refused(capsys, "--client-cert", str(alice.cert), "--client-key", str(rsa_key))
    assert "do not match" in err


def test_the_options_reach_the_command(pki: PKIPaths,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[KubeconfigOptions] = []

    def call(command: str, options: KubeconfigOptions) -> int:
        assert command == "kubeconfig"
        seen.append(options)
        return 0

    monkeypatch.setattr(cli, "_call", call)
    assert cli.main(["kubeconfig", "--client-cert", "c.pem", "--client-key", "k.pem",
                     "--context-name", "x509"], env={}) == 0
    (options,) = seen
    assert (options.client_cert_file, options.client_key_file, options.token,
            options.context_name) == ("c.pem", "k.pem", None, "x509")
