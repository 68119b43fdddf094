"""podterm.net.tls over real loopback TLS: contexts, client identities, reload.

Each test starts a small trio TLS echo server on 127.0.0.1:0 with
:func:`server_context`.  After the handshake it greets with the client's
identity (``user=alice groups=dev,ops`` or ``anonymous``) and then echoes.
Every wait is bounded by ``WAIT_S``; nothing sleeps to dodge a race.
"""

from __future__ import annotations

import logging
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509

from podterm.errors import ConfigError
from podterm.net import certs
from podterm.net.certs import PKIPaths, generate_dev_pki
from podterm.net.tls import (
    CertReloader,
    client_context,
    peer_identity,
    server_context,
)

WAIT_S = 10.0
USERS = ("admin:podterm:admins", "agent:podterm:agents", "alice:dev,ops")


@pytest.fixture
def pki(tmp_path: Path) -> PKIPaths:
    return generate_dev_pki(tmp_path / "pki", users=USERS)


@dataclass
class EchoServer:
    port: int
    identities: list[tuple[str, tuple[str, ...]] | None] = field(default_factory=list)
    #: Why handshakes failed on the server side (the ssl error under trio's).
    errors: list[BaseException] = field(default_factory=list)
    handshakes: int = 0
    failed: trio.Event = field(default_factory=trio.Event)


@pytest.fixture
async def serve_tls(nursery: trio.Nursery) -> AsyncIterator[Any]:
    async def start(ctx: ssl.SSLContext) -> EchoServer:
        tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listeners = [trio.SSLListener(lst, ctx, https_compatible=True) for lst in tcp]
        server = EchoServer(port=tcp[0].socket.getsockname()[1])

        async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
            try:
                with trio.fail_after(WAIT_S):
                    await stream.do_handshake()
                server.handshakes += 1
                ident = peer_identity(stream)
                server.identities.append(ident)
                greeting = ("anonymous" if ident is None
                            else f"user={ident[0]} groups={','.join(ident[1])}")
                await stream.send_all(greeting.encode() + b"\n")
                async for chunk in stream:
                    await stream.send_all(chunk)
            except trio.BrokenResourceError as exc:
                server.errors.append(exc.__cause__ or exc)
                server.failed.set()
            finally:
                await trio.aclose_forcefully(stream)

        await nursery.start(trio.serve_listeners, handle, listeners)
        return server

    yield start


async def connect(port: int, ctx: ssl.SSLContext,
                  hostname: str = "127.0.0.1") -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=hostname, https_compatible=True)
    try:
        with trio.fail_after(WAIT_S):
            await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def read_line(stream: trio.SSLStream[trio.SocketStream]) -> bytes:
    buf = b""
    with trio.fail_after(WAIT_S):
        while b"\n" not in buf and len(buf) < 4096:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            buf += chunk
    return buf


async def echo(stream: trio.SSLStream[trio.SocketStream], data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    with trio.fail_after(WAIT_S):
        while len(got) < len(data):
            chunk = await stream.receive_some(4096)
            assert chunk, "server closed"
            got += chunk
    return got


def server_serial(stream: trio.SSLStream[trio.SocketStream]) -> int:
    return x509.load_der_x509_certificate(stream.getpeercert(binary_form=True)).serial_number


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# ---------------------------------------------------------------------------
# Contexts and verification
# ---------------------------------------------------------------------------


@pytest.mark.trio
@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
async def test_client_verifies_server_against_the_dev_ca(pki: PKIPaths, serve_tls: Any,
                                                         hostname: str) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key))
    ctx = client_context(ca_file=pki.ca_cert)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; our certs pass it
    stream = await connect(server.port, ctx, hostname)
    async with stream:
        assert stream.version() == "TLSv1.3"
        assert stream.selected_alpn_protocol() == "http/1.1"
        assert await read_line(stream) == b"anonymous\n"
        assert await echo(stream, b"ping") == b"ping"
        assert server_serial(stream) == serial_of(pki.server_cert)


@pytest.mark.trio
async def test_tls12_uses_an_ecdhe_aead_suite(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key))
    ctx = client_context(ca_file=pki.ca_cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with await connect(server.port, ctx) as stream:
        name, version, _ = stream.cipher()
        assert version == "TLSv1.2"
        assert name.startswith("ECDHE-ECDSA-") and ("GCM" in name or "CHACHA20" in name)


@pytest.mark.trio
async def test_client_without_the_ca_fails_verification(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key))
    with pytest.raises(trio.BrokenResourceError) as info:
        await connect(server.port, client_context())  # system trust store only
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(info.value.__cause__)
    assert server.identities == []


@pytest.mark.trio
async def test_wrong_host_name_fails_verification(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key))
    with pytest.raises(trio.BrokenResourceError) as info:
        await connect(server.port, client_context(ca_file=pki.ca_cert), "gw.example.com")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


@pytest.mark.trio
async def test_insecure_client_skips_verification(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key))
    async with await connect(server.port, client_context(insecure=True)) as stream:
        assert await read_line(stream) == b"anonymous\n"


def _tls11_client(ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    # Let the *client* offer TLS 1.0/1.1 (OpenSSL 3 refuses them at the
    # default security level), so that any refusal is the server's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


@pytest.mark.trio
async def test_tls11_is_refused_by_the_server(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key))
    with pytest.raises(trio.BrokenResourceError) as info:
        await connect(server.port, _tls11_client(pki.ca_cert))
    assert isinstance(info.value.__cause__, ssl.SSLError)
    with trio.fail_after(WAIT_S):
        await server.failed.wait()
    cause = server.errors[0]
    assert isinstance(cause, ssl.SSLError) and cause.reason == "UNSUPPORTED_PROTOCOL"
    # Control: the same client allowed TLS 1.2 gets through.
    ctx = _tls11_client(pki.ca_cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with await connect(server.port, ctx) as stream:
        assert stream.version() == "TLSv1.2"


# ---------------------------------------------------------------------------
# Client certificates
# ---------------------------------------------------------------------------


@pytest.mark.trio
@pytest.mark.parametrize(("user", "groups"), [("alice", ("dev", "ops")),
                                              ("admin", ("podterm:admins",)),
                                              ("agent", ("podterm:agents",))])
async def test_client_cert_cn_and_o_become_the_identity(
        pki: PKIPaths, serve_tls: Any, user: str, groups: tuple[str, ...]) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key, pki.ca_cert))
    c = pki.client(user)
    ctx = client_context(ca_file=pki.ca_cert, cert_file=c.cert, key_file=c.key)
    async with await connect(server.port, ctx) as stream:
        assert await read_line(stream) == f"user={user} groups={','.join(groups)}\n".encode()
    assert server.identities == [(user, groups)]


@pytest.mark.trio
async def test_client_cert_is_optional(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key, pki.ca_cert))
    async with await connect(server.port, client_context(ca_file=pki.ca_cert)) as stream:
        assert await read_line(stream) == b"anonymous\n"
    assert server.identities == [None]


@pytest.mark.trio
async def test_without_client_ca_no_identity_is_taken(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key))
    c = pki.client("admin")
    ctx = client_context(ca_file=pki.ca_cert, cert_file=c.cert, key_file=c.key)
    async with await connect(server.port, ctx) as stream:
        assert await read_line(stream) == b"anonymous\n"


async def _refused_client_cert(server: EchoServer, ctx: ssl.SSLContext) -> BaseException:
    """Connect with a client certificate the server must refuse; the server's reason."""
    # TLS 1.3: the client finishes its handshake before the server has checked
    # the client certificate, so the refusal arrives as an alert on first read.
    # (trio's SSLStream does not flush the alert of a failed handshake, so
    # the client sees a plain EOF or a broken stream, never the greeting.)
    try:
        stream = await connect(server.port, ctx)
        async with stream:
            got = await read_line(stream)
    except trio.BrokenResourceError:
        got = b""
    assert got == b""
    with trio.fail_after(WAIT_S):
        await server.failed.wait()
    assert server.identities == []
    return server.errors[0]


@pytest.mark.trio
async def test_client_cert_from_another_ca_is_refused(pki: PKIPaths, serve_tls: Any,
                                                      tmp_path: Path) -> None:
    other = generate_dev_pki(tmp_path / "other", users=["mallory:podterm:admins"])
    server = await serve_tls(server_context(pki.server_cert, pki.server_key, pki.ca_cert))
    m = other.client("mallory")
    cause = await _refused_client_cert(
        server, client_context(ca_file=pki.ca_cert, cert_file=m.cert, key_file=m.key))
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert cause.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY


@pytest.mark.trio
async def test_server_cert_is_refused_as_a_client_cert(pki: PKIPaths, serve_tls: Any) -> None:
    server = await serve_tls(server_context(pki.server_cert, pki.server_key, pki.ca_cert))
    ctx = client_context(ca_file=pki.ca_cert, cert_file=pki.server_cert,
                         key_file=pki.server_key)
    cause = await _refused_client_cert(server, ctx)
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert cause.verify_code == 26  # X509_V_ERR_INVALID_PURPOSE: serverAuth only


class _FakePeer:
    def __init__(self, cert: Any) -> None:
        self.cert = cert

    def getpeercert(self, binary_form: bool = False) -> Any:
        if isinstance(self.cert, BaseException):
            raise self.cert
        return self.cert


@pytest.mark.parametrize(("cert", "expected"), [
    (None, None),  # no certificate
    ({}, None),  # not verified (CERT_NONE)
    (ValueError("not connected"), None),
    ({"subject": ((("organizationName", "dev"),),)}, None),  # no CN
    ({"subject": ((("commonName", "a"),), (("commonName", "b"),))}, None),  # ambiguous
    ({"subject": ((("organizationName", "g1"),), (("commonName", "bob"),),
                  (("organizationName", "g2"),))}, ("bob", ("g1", "g2"))),
])
def test_peer_identity_only_from_one_cn(cert: Any, expected: Any) -> None:
    assert peer_identity(_FakePeer(cert)) == expected


# ---------------------------------------------------------------------------
# Errors at start-up
# ---------------------------------------------------------------------------


def test_server_context_names_the_files_on_error(pki: PKIPaths, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--tls-cert/--tls-key: .*KEY_VALUES_MISMATCH"):
        server_context(pki.server_cert, pki.ca_key)
    with pytest.raises(ConfigError, match=r"^--tls-cert/--tls-key: .*missing.crt"):
        server_context(tmp_path / "missing.crt", pki.server_key)
    with pytest.raises(ConfigError, match=r"^--client-ca: "):
        server_context(pki.server_cert, pki.server_key, tmp_path / "missing-ca.crt")


def test_client_context_refuses_contradictions(pki: PKIPaths) -> None:
    with pytest.raises(ConfigError, match="--insecure-skip-tls-verify"):
        client_context(ca_file=pki.ca_cert, insecure=True)
    with pytest.raises(ConfigError, match="--key: needs --cert"):
        client_context(key_file=pki.ca_key)


# ---------------------------------------------------------------------------
# Reload
# ---------------------------------------------------------------------------


def replace_server_cert(pki: PKIPaths, *, key: bool = True) -> int:
    """Issue a new server certificate from the same CA and write it (and, with
    ``key``, its key first) in place, atomically; return its serial."""
    ca = certs.load_ca(pki.ca_cert, pki.ca_key)
    new = certs.issue_server_cert(ca)
    if key:
        certs.write_key(pki.server_key, new.key, overwrite=True)
    certs.write_cert(pki.server_cert, new.cert, overwrite=True)
    return new.cert.serial_number


async def wait_reloads(reloader: CertReloader, n: int) -> None:
    """Wait (bounded) until ``n`` reloads succeeded; failures in between are allowed
    (a poll may land between the key and the certificate being written)."""
    with trio.fail_after(WAIT_S):
        while (stats := reloader.statistics()).reloads < n:
            await reloader.wait_attempts(stats.attempts + 1)


@pytest.mark.trio
async def test_reload_serves_the_new_cert_and_keeps_open_connections(
        pki: PKIPaths, serve_tls: Any, nursery: trio.Nursery,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="podterm.net.tls")
    ctx = server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    reloader = CertReloader(ctx, pki.server_cert, pki.server_key, interval_s=0.01)
    await nursery.start(reloader.run)
    server = await serve_tls(ctx)
    a = pki.client("alice")
    client = client_context(ca_file=pki.ca_cert, cert_file=a.cert, key_file=a.key)
    old_serial = serial_of(pki.server_cert)
    assert reloader.statistics().serial == old_serial

    before = await connect(server.port, client)
    async with before:
        assert await read_line(before) == b"user=alice groups=dev,ops\n"
        assert await echo(before, b"one") == b"one"

        new_serial = replace_server_cert(pki)
        await wait_reloads(reloader, 1)

        after = await connect(server.port, client)
        async with after:
            assert server_serial(after) == new_serial != old_serial
            assert await read_line(after) == b"user=alice groups=dev,ops\n"
            assert await echo(after, b"two") == b"two"
        # The connection from before the swap is untouched.
        assert await echo(before, b"three" * 1000) == b"three" * 1000
        assert server_serial(before) == old_serial

    stats = reloader.statistics()
    assert stats.reloads == 1 and stats.serial == new_serial and stats.last_error is None
    assert any("tls.reload.complete" in r.getMessage() for r in caplog.records)


@pytest.mark.trio
async def test_failed_reload_keeps_the_old_cert(pki: PKIPaths, serve_tls: Any,
                                                nursery: trio.Nursery,
                                                caplog: pytest.LogCaptureFixture) -> None:
    ctx = server_context(pki.server_cert, pki.server_key)
    reloader = CertReloader(ctx, pki.server_cert, pki.server_key, interval_s=0.01)
    await nursery.start(reloader.run)
    server = await serve_tls(ctx)
    client = client_context(ca_file=pki.ca_cert)
    old_serial = serial_of(pki.server_cert)

    # A new certificate whose key never arrives: loading it into a live
    # context would leave that context unable to handshake at all.
    replace_server_cert(pki, key=False)
    with trio.fail_after(WAIT_S):
        stats = await reloader.wait_attempts(1)
    assert stats.reloads == 0 and stats.failures == 1
    assert "KEY_VALUES_MISMATCH" in (stats.last_error or "")
    assert stats.serial == old_serial
    async with await connect(server.port, client) as stream:
        assert server_serial(stream) == old_serial
        assert await read_line(stream) == b"anonymous\n"
    assert any(r.levelno == logging.WARNING and "tls.reload.failed" in r.getMessage()
               for r in caplog.records)

    # Garbage is refused the same way; a good pair afterwards is picked up.
    failures = reloader.statistics().failures
    pki.server_cert.write_text("not a certificate\n")
    with trio.fail_after(WAIT_S):
        await reloader.wait_attempts(failures + 1)
    async with await connect(server.port, client) as stream:
        assert server_serial(stream) == old_serial
    new_serial = replace_server_cert(pki)
    await wait_reloads(reloader, 1)
    async with await connect(server.port, client) as stream:
        assert server_serial(stream) == new_serial
    assert reloader.statistics().last_error is None


@pytest.mark.trio
async def test_missing_files_are_a_failed_reload(pki: PKIPaths) -> None:
    ctx = server_context(pki.server_cert, pki.server_key)
    reloader = CertReloader(ctx, pki.server_cert, pki.server_key, interval_s=1)
    pki.server_key.unlink()
    assert reloader.check_nowait() is False
    assert "server.key" in (reloader.statistics().last_error or "")
    assert reloader.check_nowait() is None  # unchanged since: not retried every poll


@pytest.mark.trio
async def test_reloader_polls_on_its_interval(pki: PKIPaths, nursery: trio.Nursery,
                                              autojump_clock: trio.testing.MockClock) -> None:
    ctx = server_context(pki.server_cert, pki.server_key)
    reloader = CertReloader(ctx, pki.server_cert, pki.server_key, interval_s=30)
    await nursery.start(reloader.run)
    await trio.sleep(95)
    stats = reloader.statistics()
    assert stats.checks == 3 and stats.attempts == 0  # unchanged files: no reload

    new_serial = replace_server_cert(pki)
    start = trio.current_time()
    stats = await reloader.wait_attempts(1)
    assert 0 < trio.current_time() - start <= 30  # at the next poll (t=120 s)
    assert stats.reloads == 1 and stats.serial == new_serial

    reloader.stop()
    checks = reloader.statistics().checks
    await trio.sleep(300)
    assert reloader.statistics().checks == checks


def test_metric_families_and_repr(pki: PKIPaths) -> None:
    ctx = server_context(pki.server_cert, pki.server_key)
    reloader = CertReloader(ctx, pki.server_cert, pki.server_key)
    names = [f.name for f in reloader.metric_families()]
    assert names == ["podterm_tls_cert_reloads_total", "podterm_tls_cert_reload_failures_total",
                     "podterm_tls_cert_not_after_seconds"]
    expiry = x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).not_valid_after_utc
    assert reloader.statistics().not_after == expiry.timestamp()
    assert f"serial={serial_of(pki.server_cert):x}" in repr(reloader)
    with pytest.raises(ValueError):
        CertReloader(ctx, pki.server_cert, pki.server_key, interval_s=0)
