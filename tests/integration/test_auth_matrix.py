"""Issue 6's test matrix: every authenticator and every RBAC outcome, on every surface.

Two real gateways (:func:`podterm.gateway.server.serve`, in process) serve the
whole module.  pytest-trio fixtures must be function-scoped, so each gateway
runs in its own trio loop in a thread (:class:`_BackgroundGateway`), started
and drained once; the tests talk to it over loopback TLS from their own
loops.  Both gateways serve HTTPS with a client CA, audit into a
:class:`~podterm.audit.MemorySink` (events are appended before the answer
goes out, so a test reads them as soon as it has its answer) and have the
failed-login limit off (the matrix fails on purpose more often than the 10
failures a source may spend; ``test_gateway_rbac.py`` covers the limit).

``policy`` gateway: all four authenticators at once, configured as
``podterm serve`` configures them (``podterm.auth.providers``): static
tokens (``--token-file`` CSV), client certificates (``--client-ca``), OIDC
(issuer, audience, JWKS file) and TokenReview against the fake apiserver of
``tests/helpers/fake_kubeauth.py`` (through a kubeconfig), and a policy file.
``sar`` gateway: static tokens and a policy that delegates to
SubjectAccessReview, asked of the same fake apiserver.

**Authentication**: authenticators {static_token, client_cert, tokenreview,
oidc} x cases {valid, wrong, expired, missing} x surfaces {rest: ``POST
/api/v1/sessions``, attach: the podterm.v1 WebSocket upgrade}.  A valid
credential gets 201 / a ``hello``, and ``auth.success`` (its ``method``) then
``authz.allow``; any other gets HTTP 401 with the JSON error -- before the
upgrade on attach, as docs/protocol.md §1 says (a close 4401 is only for
failures after an upgrade, which authentication never is) -- and one
``auth.failure`` whose ``reason`` is the message the client got and whose
``failure`` is the stable code (``auth.chain.FailureReason``).  What the
matrix shows about the chain (static tokens, client certificate, OIDC for
its issuer's JWTs, then TokenReview for every other token):

* ``static_token / expired`` is **omitted**: a static token has no lifetime;
  it is valid until it is removed from the file, and a removed token is the
  ``wrong`` case.
* ``static_token / wrong``: no authenticator but TokenReview recognizes an
  unknown token, so the apiserver is asked and the failure is ``tokenreview``
  / ``rejected`` -- the gateway cannot tell a mistyped static token from a
  token the cluster does not know.
* ``client_cert / wrong`` (another CA) and ``client_cert / expired`` (issued
  by the trusted CA, ``not_valid_after`` in the past) never reach HTTP: the
  TLS layer refuses them.  With TLS 1.3 the client's handshake completes
  before the server has checked the certificate; trio does not flush the
  server's alert, so the client sees its first read end in an EOF that
  violates TLS (``trio.BrokenResourceError`` from ``ssl.SSLEOFError``); a
  TLS 1.2 client sees the same from its handshake.  The gateway audits each
  refused handshake as ``auth.failure`` (method ``x509``, failure
  ``bad_certificate``) before it closes the socket, and the certificate's user
  never authenticates.
* ``missing``: no token and no certificate names no authenticator, so the
  four rows share one expectation (``method`` ``none``,
  ``missing_credentials``); they are kept so that each authenticator's row
  is complete.
* ``tokenreview / expired``: the apiserver answers ``authenticated: false``
  with its error; the gateway's code is ``rejected`` (it cannot know why) and
  its message quotes the apiserver's error, which says expired.

**Authorization**: outcomes {allowed, denied_by_default,
denied_by_deny_rule, sar_allowed, sar_denied} x surfaces {rest, attach,
kubectl_exec: the ``/api/v1/namespaces/{ns}/pods/{pod}/exec`` upgrade}, for
the static-token user ``dave``.  Allowed: 201 / ``hello`` / 101 and the
command's Success status on channel 3; denied: 403 before any upgrade (a
podterm JSON error, or a Kubernetes ``Status`` on the kube API), and one
``authz.allow`` / ``authz.deny`` naming the verb, the target, ``via`` and
``rule``: the policy's rule, ``default`` when no rule decided, or the
SubjectAccessReview that did.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import h11
import pytest
import trio
import trustme
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tests.helpers.fake_kubeauth import Answer, FakeApi, running_fake_api, write_kubeconfig
from tests.helpers.http import exchange

from conftest import ProtoClient
from podterm.audit import AuditEvent, MemorySink
from podterm.auth.sar import SAR_PATH
from podterm.auth.tokenreview import TOKENREVIEW_PATH
from podterm.config import (
    AuthConfig,
    ListenConfig,
    RecordingConfig,
    ServeConfig,
    SessionsConfig,
    TLSConfig,
    UpstreamConfig,
)
from podterm.gateway.server import Gateway, GatewayOptions, serve
from podterm.net.certs import (
    generate_dev_pki,
    issue_client_cert,
    load_ca,
    write_cert,
    write_key,
)
from podterm.net.tls import client_context
from podterm.net.wsconn import ConnectionClosed, WebSocketStream
from podterm.protocol.handshake import build_request, check_response
from podterm.protocol.session_proto import SUBPROTOCOL
from podterm.protocol.websocket import Role, WebSocketConnection
from podterm.resilience.ratelimit import RateLimits

pytestmark = pytest.mark.trio

#: Every wait is bounded by this (seconds, real time).
WAIT_S = 10.0

ADMIN = "admin-token-0123456789"  # root, podterm:admins: creates the sessions to attach to
DAVE = "dave-token-0123456789"  # dave, group dev
GATEWAY_TOKEN = "gateway-sa-token"  # the gateway's own credential towards the apiserver
ISSUER = "https://idp.example.com"
AUDIENCE = "podterm"
SA_USER = "system:serviceaccount:ci:deployer"
SA_GROUPS = ("system:serviceaccounts", "system:serviceaccounts:ci", "system:authenticated")
KUBE_ISSUER = "https://kubernetes.default.svc.cluster.local"
TR_WRONG_ERROR = "[invalid bearer token, token lookup failed]"
TR_EXPIRED_ERROR = "[invalid bearer token, service account token has expired]"

POLICY = f"""\
roles:
  - name: admin
    rules:
      - verbs: ["*"]
  - name: dev
    rules:
      - verbs: [exec, attach, join]
        namespaces: [dev]
      - effect: deny
        verbs: ["*"]
        pods: ["secret-*"]
bindings:
  - name: admins
    role: admin
    groups: ["podterm:admins"]
  - name: devs
    role: dev
    groups: [dev]
    users: ["{SA_USER}"]
"""
ALLOW_RULE = "role dev rule 1 (binding devs)"
DENY_RULE = "role dev rule 2 (binding devs)"
#: Only admins have a rule: everything dave asks is put to Kubernetes.
SAR_POLICY = """\
delegate: subjectaccessreview
roles:
  - name: admin
    rules:
      - verbs: ["*"]
bindings:
  - name: admins
    role: admin
    groups: ["podterm:admins"]
"""
#: The fake apiserver's RBAC: pods/exec and pods/attach in namespace dev only.
SAR_NAMESPACE = "dev"


# ------------------------------------------------------------ credentials


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwt(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = key.sign(f"{head}.{body}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(signature)}"


def _jwks(key: rsa.RSAPrivateKey) -> str:
    numbers = key.public_key().public_numbers()

    def b64int(n: int) -> str:
        return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    return json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
                                 "n": b64int(numbers.n), "e": b64int(numbers.e)}]})


def _oidc_claims(**over: Any) -> dict[str, Any]:
    now = time.time()
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-42", "groups": ["dev"],
            "iat": now - 10, "nbf": now - 10, "exp": now + 600, **over}


def _sa_token(*, exp: float) -> str:
    """A service-account-shaped JWT (another issuer: OIDC leaves it to TokenReview)."""
    claims = {"iss": KUBE_ISSUER, "sub": SA_USER, "aud": [AUDIENCE], "exp": exp}
    head = _b64(json.dumps({"alg": "RS256", "kid": "sa"}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}.{_b64(b'signed by the cluster')}"


@dataclasses.dataclass(frozen=True)
class Credential:
    """What a client presents: a bearer token and/or a TLS client context."""

    token: str | None
    tls: ssl.SSLContext
    #: The client certificate and key in ``tls``, and its CN.
    cert: tuple[Path, Path] | None = None
    cert_user: str | None = None


@dataclasses.dataclass(frozen=True)
class Expect:
    """The gateway's verdict on a credential.

    Attributes:
        method: ``details.method`` of the audit event.
        user: the authenticated user (valid credentials), else None.
        failure: ``details.failure`` of ``auth.failure`` (a 401), else None.
        message: part of the 401 message (and of ``details.reason``).
        tls_refused: refused by the TLS handshake: no HTTP, no audit event.
    """

    method: str
    user: str | None = None
    failure: str | None = None
    message: str = ""
    tls_refused: bool = False


MISSING = Expect("none", failure="missing_credentials", message="missing bearer token")
TLS_REFUSED = Expect("x509", tls_refused=True)
EXPECT: dict[tuple[str, str], Expect] = {
    ("static_token", "valid"): Expect("token", user="dave"),
    ("static_token", "wrong"): Expect("tokenreview", failure="rejected",
                                      message="the Kubernetes API did not authenticate the "
                                              f"token: {TR_WRONG_ERROR}"),
    # ("static_token", "expired"): omitted, see the module docstring.
    ("static_token", "missing"): MISSING,
    ("client_cert", "valid"): Expect("x509", user="carol"),
    ("client_cert", "wrong"): TLS_REFUSED,
    ("client_cert", "expired"): TLS_REFUSED,
    ("client_cert", "missing"): MISSING,
    ("tokenreview", "valid"): Expect("tokenreview", user=SA_USER),
    ("tokenreview", "wrong"): Expect("tokenreview", failure="rejected",
                                     message="the Kubernetes API did not authenticate the "
                                             f"token: {TR_WRONG_ERROR}"),
    ("tokenreview", "expired"): Expect("tokenreview", failure="rejected",
                                       message="the Kubernetes API did not authenticate the "
                                               f"token: {TR_EXPIRED_ERROR}"),
    ("tokenreview", "missing"): MISSING,
    ("oidc", "valid"): Expect("oidc", user=f"{ISSUER}#u-42"),
    ("oidc", "wrong"): Expect("oidc", failure="bad_signature", message="signature"),
    ("oidc", "expired"): Expect("oidc", failure="expired", message="expired"),
    ("oidc", "missing"): MISSING,
}


@dataclasses.dataclass(frozen=True)
class Credentials:
    """Every credential of the matrix, and the files the gateways need."""

    by_case: dict[tuple[str, str], Credential]
    plain_tls: ssl.SSLContext  # trusts the gateway, presents no certificate
    tokens_file: Path
    jwks_file: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    tr_tokens: dict[str, str]  # TokenReview token -> "valid" / "expired"


def _credentials(root: Path) -> Credentials:
    pki = generate_dev_pki(root / "pki", users=("carol:dev",))
    # A stranger's CA, with a certificate claiming the admin group.
    other = generate_dev_pki(root / "other-pki", users=("mallory:podterm:admins",))
    # Issued by the trusted CA 900 days ago: its 825 days ran out 75 days ago.
    ca = load_ca(pki.ca_cert, pki.ca_key)
    old = issue_client_cert(ca, "olga", ("dev",),
                            now=dt.datetime.now(dt.UTC) - dt.timedelta(days=900))
    assert old.cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    write_key(root / "olga.key", old.key)
    write_cert(root / "olga.crt", old.cert)

    def tls(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        return client_context(pki.ca_cert, cert, key)

    plain = tls()
    carol, mallory = pki.client("carol"), other.client("mallory")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = root / "jwks.json"
    jwks.write_text(_jwks(key))
    tokens = root / "tokens.csv"
    tokens.write_text(f'{ADMIN},root,u-root,"podterm:admins"\n{DAVE},dave,u-dave,dev\n')
    sa_valid = _sa_token(exp=time.time() + 3600)
    sa_expired = _sa_token(exp=time.time() - 3600)
    by_case = {
        ("static_token", "valid"): Credential(DAVE, plain),
        ("static_token", "wrong"): Credential("dave-token-0123456788", plain),
        ("client_cert", "valid"): Credential(None, tls(carol.cert, carol.key),
                                             (carol.cert, carol.key), "carol"),
        ("client_cert", "wrong"): Credential(None, tls(mallory.cert, mallory.key),
                                             (mallory.cert, mallory.key), "mallory"),
        ("client_cert", "expired"): Credential(None, tls(root / "olga.crt", root / "olga.key"),
                                               (root / "olga.crt", root / "olga.key"), "olga"),
        ("tokenreview", "valid"): Credential(sa_valid, plain),
        ("tokenreview", "wrong"): Credential("sa-token-nobody-issued", plain),
        ("tokenreview", "expired"): Credential(sa_expired, plain),
        ("oidc", "valid"): Credential(_jwt(key, _oidc_claims()), plain),
        ("oidc", "wrong"): Credential(_jwt(stranger, _oidc_claims()), plain),
        ("oidc", "expired"): Credential(_jwt(key, _oidc_claims(exp=time.time() - 3600)), plain),
    }
    for authenticator in ("static_token", "client_cert", "tokenreview", "oidc"):
        by_case[(authenticator, "missing")] = Credential(None, plain)
    assert by_case.keys() == EXPECT.keys()
    return Credentials(by_case, plain, tokens, jwks, pki.server_cert, pki.server_key,
                       pki.ca_cert, {sa_valid: "valid", sa_expired: "expired"})


def _kube_answers(tr_tokens: dict[str, str]) -> Callable[[str, Any], Answer]:
    """The fake apiserver: TokenReview by token, SubjectAccessReview by namespace."""

    def respond(path: str, body: Any) -> Answer:
        if path == TOKENREVIEW_PATH:
            verdict = tr_tokens.get(body["spec"]["token"])
            status: dict[str, Any] = {"authenticated": verdict == "valid"}
            if verdict == "valid":
                status["user"] = {"username": SA_USER, "uid": "u-sa", "groups": list(SA_GROUPS)}
                status["audiences"] = body["spec"].get("audiences") or []
            else:
                status["error"] = TR_EXPIRED_ERROR if verdict == "expired" else TR_WRONG_ERROR
            return 201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                         "status": status}
        if path == SAR_PATH:
            attributes = body["spec"]["resourceAttributes"]
            allowed = attributes["namespace"] == SAR_NAMESPACE
            return 201, {"apiVersion": "authorization.k8s.io/v1",
                         "kind": "SubjectAccessReview",
                         "status": {"allowed": allowed, "reason": 'RBAC: allowed by RoleBinding '
                                    '"dev/devs"' if allowed else ""}}
        return 404, {"kind": "Status", "code": 404}

    return respond


# ------------------------------------------------------------------ gateways


class _BackgroundGateway:
    """:func:`serve` in its own trio loop in a thread, for a whole module.

    ``with`` it: entering starts the gateway and returns it once it listens;
    leaving drains it (bounded), re-raises whatever ended its loop, and
    checks that no session was left behind.
    """

    def __init__(self, config: ServeConfig, options: GatewayOptions, name: str) -> None:
        self.config = config
        self.options = options
        self.name = name
        self.gw: Gateway | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"gateway-{name}", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to the test thread in __exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.gw = await nursery.start(functools.partial(serve, self.config,
                                                            options=self.options))
            self._ready.set()

    def __enter__(self) -> Gateway:
        self._thread.start()
        if not self._ready.wait(WAIT_S) or self.gw is None:
            self._stop()
            raise AssertionError(f"gateway {self.name} did not start: {self._error!r}")
        return self.gw

    def _stop(self) -> None:
        if self.gw is not None and self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self.gw.shutdown, "test over", trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(WAIT_S)

    def __exit__(self, *exc_info: object) -> None:
        self._stop()
        assert not self._thread.is_alive(), f"gateway {self.name} did not drain in {WAIT_S} s"
        if self._error is not None:
            raise self._error
        assert self.gw is not None
        assert len(self.gw.registry) == 0, f"sessions left: {self.gw.registry.sessions()}"


@dataclasses.dataclass(frozen=True)
class Served:
    port: int
    memory: MemorySink


@dataclasses.dataclass(frozen=True)
class Matrix:
    policy: Served  # all four authenticators, a policy of rules
    sar: Served  # static tokens, a policy that delegates to SubjectAccessReview
    creds: Credentials
    api: FakeApi


def _serve_config(root: Path, creds: Credentials, auth: AuthConfig,
                  kubeconfig: Path) -> ServeConfig:
    return ServeConfig(
        listen=ListenConfig(host="127.0.0.1", port=0),
        sessions=SessionsConfig(drain_timeout_s=5.0),
        tls=TLSConfig(cert_file=str(creds.server_cert), key_file=str(creds.server_key),
                      client_ca_file=str(creds.client_ca)),
        # Only the apiserver credentials: sessions still run locally.
        upstream=UpstreamConfig(kubeconfig=str(kubeconfig)),
        recording=RecordingConfig(dir=str(root / "rec")),
        auth=auth)


#: The failed-login budget off: the matrix fails on purpose, from one address.
NO_RATE_LIMITS = RateLimits(connect_per_source=None, connect_per_user=None,
                            session_create_per_source=None, session_create_per_user=None,
                            auth_failures_per_source=None)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    root = tmp_path_factory.mktemp("auth-matrix")
    creds = _credentials(root)
    (root / "policy.yaml").write_text(POLICY)
    (root / "sar-policy.yaml").write_text(SAR_POLICY)
    with running_fake_api(trustme.CA(), root) as api:
        api.respond = _kube_answers(creds.tr_tokens)
        kubeconfig = write_kubeconfig(api, root / "kubeconfig.json", token=GATEWAY_TOKEN)
        policy_memory, sar_memory = MemorySink(), MemorySink()
        policy_config = _serve_config(root / "policy", creds, AuthConfig(
            token_file=str(creds.tokens_file), policy_file=str(root / "policy.yaml"),
            oidc_issuer=ISSUER, oidc_audiences=(AUDIENCE,), oidc_jwks_file=str(creds.jwks_file),
            oidc_groups_claim="groups", tokenreview=True, tokenreview_audiences=(AUDIENCE,)),
            kubeconfig)
        sar_config = _serve_config(root / "sar", creds, AuthConfig(
            token_file=str(creds.tokens_file), policy_file=str(root / "sar-policy.yaml"),
            subjectaccessreview=True), kubeconfig)
        with _BackgroundGateway(policy_config, GatewayOptions(
                audit_sink=policy_memory, rate_limits=NO_RATE_LIMITS), "policy") as policy, \
                _BackgroundGateway(sar_config, GatewayOptions(
                    audit_sink=sar_memory, rate_limits=NO_RATE_LIMITS), "sar") as sar:
            yield Matrix(Served(policy.port, policy_memory), Served(sar.port, sar_memory),
                         creds, api)


# ------------------------------------------------------------------ clients


@dataclasses.dataclass
class Reply:
    """An HTTP answer; ``ws`` is the WebSocket when it was a 101.

    ``source`` is the client's address as the gateway sees it (the audit
    ``source_addr``): it ties the audit events to the request even where the
    answer has no ``X-Request-Id`` (the kube API's 101).
    """

    status: int
    headers: dict[str, str]
    source: str
    body: bytes = b""
    ws: WebSocketStream | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    async def aclose(self) -> None:
        if self.ws is not None:
            await trio.aclose_forcefully(self.ws.stream)


def _mask_key() -> bytes:
    return os.urandom(4)


async def _request(port: int, tls: ssl.SSLContext, method: str, target: str, *,
                   token: str | None, body: Any = None,
                   upgrade: Sequence[str] = ()) -> Reply:
    """One request on a fresh TLS connection; a WebSocket upgrade when ``upgrade`` is set."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=tls,
                                                 https_compatible=True)
    source = f"127.0.0.1:{stream.transport_stream.socket.getsockname()[1]}"
    auth = [("Authorization", f"Bearer {token}")] if token is not None else []
    if upgrade:
        return await _upgrade(stream, source, f"127.0.0.1:{port}", target, auth, upgrade)
    headers = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *auth]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    try:
        answer = await exchange(stream, method, target, headers=headers,
                                body=None if body is None else json.dumps(body).encode())
    finally:
        await trio.aclose_forcefully(stream)
    return Reply(answer.status, answer.headers, source, answer.body)


async def _upgrade(stream: trio.SSLStream[trio.SocketStream], source: str, host: str,
                   target: str, auth: list[tuple[str, str]], offered: Sequence[str]) -> Reply:
    """A WebSocket upgrade; on 101 the reply holds the WebSocket (with what followed the head)."""
    key = os.urandom(16)
    conn = h11.Connection(h11.CLIENT)
    request = build_request(host, target, subprotocols=offered, extra_headers=auth, key=key)
    upgraded = False
    try:
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        reply = Reply(0, {}, source)
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                chosen = check_response(event, key, offered)
                trailing, _ = conn.trailing_data  # the server may speak first (hello)
                ws = WebSocketStream(stream, WebSocketConnection(Role.CLIENT,
                                                                 mask_key_source=_mask_key),
                                     initial=bytes(trailing), subprotocol=chosen)
                upgraded = True
                return Reply(101, _headers(event), source, ws=ws)
            elif isinstance(event, h11.Response):
                reply = Reply(event.status_code, _headers(event), source)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            else:  # EndOfMessage, ConnectionClosed
                reply.body = b"".join(chunks)
                return reply
    finally:
        if not upgraded:
            await trio.aclose_forcefully(stream)


def _headers(event: h11.Response | h11.InformationalResponse) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in event.headers}


async def _session(served: Served, tls: ssl.SSLContext, token: str | None, ns: str,
                   pod: str) -> str:
    """A running ``cat`` session in ``ns/pod``, created with these credentials; its id.

    Someone else's session is 404 to anyone but an admin (``registry.get_for``),
    after authentication and authorization: an attach that should get past
    them attaches to a session of its own; one that should not, to an admin's.
    """
    reply = await _request(served.port, tls, "POST", "/api/v1/sessions", token=token,
                           body={"command": ["cat"], "namespace": ns, "pod": pod})
    assert reply.status == 201, reply.body
    session_id: str = reply.json["id"]
    return session_id


async def _kill(served: Served, tls: ssl.SSLContext, session_id: str) -> None:
    reply = await _request(served.port, tls, "DELETE", f"/api/v1/sessions/{session_id}",
                           token=ADMIN)
    # 410: it ended on its own (``true``) before the DELETE.
    assert reply.status in (200, 410), reply.body


def _attach_target(session_id: str) -> str:
    return f"/api/v1/sessions/{session_id}/attach?offset=0&mode=rw"


def _exec_target(ns: str, pod: str) -> str:
    query = urlencode([("command", "true"), ("stdout", "true")])
    return f"/api/v1/namespaces/{ns}/pods/{pod}/exec?{query}"


def _events(memory: MemorySink, reply: Reply) -> list[AuditEvent]:
    """The request's authentication and authorization events, in order."""
    events = [e for e in list(memory.events) if e.source_addr == reply.source
              and e.type.startswith(("auth.", "authz."))]
    # One request, one id: the one the answer names, when it names one.
    assert len({e.request_id for e in events}) == 1, events
    if "x-request-id" in reply.headers:
        assert events[0].request_id == reply.headers["x-request-id"]
    return events


async def _expect_hello(reply: Reply, session_id: str) -> None:
    assert reply.status == 101 and reply.ws is not None, reply.body
    client = ProtoClient(reply.ws)
    try:
        hello = await client.wait_hello()
        assert (hello.session, hello.mode) == (session_id, "rw")
    finally:
        await client.aclose()


async def _expect_exec_success(reply: Reply) -> None:
    """A kubectl exec upgrade: the command's Status on channel 3, then the close."""
    assert reply.status == 101 and reply.ws is not None, reply.body
    assert reply.ws.subprotocol == "v5.channel.k8s.io"
    statuses: list[Any] = []
    try:
        while True:
            for _opcode, payload in await reply.ws.receive_batch():
                if payload[:1] == b"\x03":
                    statuses.append(json.loads(bytes(payload[1:])))
    except ConnectionClosed as closed:
        assert closed.code == 1000, closed
    finally:
        await reply.ws.aclose()
    assert [s.get("status") for s in statuses] == ["Success"], statuses


# ------------------------------------------------------------ authentication

SURFACES = ("rest", "attach")
AUTHN_CASES = [pytest.param(authenticator, case, surface, id=f"{authenticator}-{case}-{surface}")
               for (authenticator, case) in EXPECT for surface in SURFACES]


@pytest.mark.parametrize(("authenticator", "case", "surface"), AUTHN_CASES)
async def test_authenticator(matrix: Matrix, authenticator: str, case: str,
                             surface: str) -> None:
    credential = matrix.creds.by_case[(authenticator, case)]
    expect = EXPECT[(authenticator, case)]
    gw = matrix.policy
    admin_tls = matrix.creds.plain_tls
    with trio.fail_after(WAIT_S):
        if expect.tls_refused:
            await _assert_tls_refused(matrix, credential, surface)
            return
        session_id = None
        if surface == "rest":
            reply = await _request(gw.port, credential.tls, "POST", "/api/v1/sessions",
                                   token=credential.token,
                                   body={"command": ["true"], "namespace": "dev", "pod": "web"})
        else:
            session_id = await (
                _session(gw, credential.tls, credential.token, "dev", "web")
                if expect.user is not None else _session(gw, admin_tls, ADMIN, "dev", "web"))
            reply = await _request(gw.port, credential.tls, "GET", _attach_target(session_id),
                                   token=credential.token, upgrade=[SUBPROTOCOL])
        try:
            events = _events(gw.memory, reply)
            if expect.user is None:
                _assert_unauthenticated(reply, events, expect, credential)
            elif surface == "rest":
                assert reply.status == 201, reply.body
                assert reply.json["owner"] == expect.user
                session_id = reply.json["id"]
            else:
                assert session_id is not None
                await _expect_hello(reply, session_id)
        finally:
            await reply.aclose()
        if session_id is not None:
            await _kill(gw, admin_tls, session_id)
    if expect.user is not None:
        assert [(e.type, e.actor_user) for e in events] == [
            ("auth.success", expect.user), ("authz.allow", expect.user)]
        assert events[0].details["method"] == expect.method
        verb = "exec" if surface == "rest" else "attach"
        assert (events[1].details["verb"], events[1].details["rule"]) == (verb, ALLOW_RULE)
    if expect.method == "tokenreview":
        # Asked by this request, or by the other surface's within the cache's TTL.
        asked = [b["spec"] for b in matrix.api.bodies(TOKENREVIEW_PATH)]
        assert {"token": credential.token, "audiences": [AUDIENCE]} in asked


def _assert_unauthenticated(reply: Reply, events: list[AuditEvent], expect: Expect,
                            credential: Credential) -> None:
    """401 before any upgrade, its JSON error, and the one ``auth.failure`` that says why."""
    assert reply.status == 401, reply.body
    assert reply.headers["www-authenticate"].startswith("Bearer")
    error = reply.json["error"]
    assert error["code"] == "unauthenticated"
    assert expect.message in error["message"]
    assert [e.type for e in events] == ["auth.failure"]
    details = events[0].details
    assert (details["method"], details["failure"], details["http_status"]) == \
        (expect.method, expect.failure, 401)
    assert details["reason"] == error["message"]
    assert events[0].outcome == "denied" and events[0].actor_user is None
    if credential.token is not None:  # never the credential itself
        assert credential.token not in events[0].to_json_line().decode()


def _source_of(stream: trio.SSLStream[trio.SocketStream]) -> str:
    """How the gateway names this client: ``ip:port`` of its socket."""
    host, port = stream.transport_stream.socket.getsockname()[:2]
    return f"{host}:{port}"


async def _assert_tls_refused(matrix: Matrix, credential: Credential, surface: str) -> None:
    """A certificate the TLS layer refuses: no HTTP answer, and its user never authenticated."""
    assert credential.cert is not None
    request = ("POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Content-Length: 0\r\n\r\n" if surface == "rest" else
               f"GET {_attach_target('s-000000000000')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n").encode()
    # TLS 1.3 (the default): the client finished its handshake before the
    # server checked the certificate; it sends its request, and its first read
    # meets the refusal: an EOF that violates TLS (the gateway's alert is not
    # flushed), or a reset when the request was still unread as it closed.
    sources: set[str] = set()
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", matrix.policy.port,
                                                 ssl_context=credential.tls,
                                                 https_compatible=False)
    sources.add(_source_of(stream))
    try:
        await stream.do_handshake()
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.send_all(request)
            data = await stream.receive_some(65536)
            raise AssertionError(f"the gateway answered a refused certificate: {data[:200]!r}")
        assert isinstance(info.value.__cause__, ssl.SSLError | ConnectionResetError), \
            repr(info.value.__cause__)
    finally:
        await trio.aclose_forcefully(stream)
    # TLS 1.2: the server checks the certificate before its Finished, so the
    # client's handshake itself fails.
    legacy = client_context(matrix.creds.client_ca, *credential.cert)
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", matrix.policy.port,
                                                 ssl_context=legacy, https_compatible=False)
    sources.add(_source_of(stream))
    try:
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLError), repr(info.value.__cause__)
    finally:
        await trio.aclose_forcefully(stream)
    # Each refusal is audited before the gateway closes the socket (so before
    # the client saw it): auth.failure, method x509, from these two sources.
    refused = [e for e in list(matrix.policy.memory.events)
               if e.type == "auth.failure" and e.details.get("method") == "x509"
               and e.source_addr in sources]
    assert len(refused) == 2, refused
    for event in refused:
        assert event.outcome == "rejected" and event.details["failure"] == "bad_certificate"
        assert event.details["reason"].startswith("client certificate refused in the TLS "
                                                  "handshake: ")
    # And certainly never authenticated.
    assert credential.cert_user is not None
    assert not [e for e in list(matrix.policy.memory.events)
                if e.actor_user == credential.cert_user]


# ------------------------------------------------------------------- RBAC


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One RBAC outcome: where dave asks, and what decides.

    ``rule`` and ``reason`` may hold ``{sub}``: ``exec`` or ``attach``, the
    pods subresource Kubernetes is asked about.
    """

    gateway: str  # "policy" or "sar"
    namespace: str
    pod: str
    allowed: bool
    via: str
    rule: str
    reason: str = ""


OUTCOMES = {
    "allowed": Outcome("policy", "dev", "web", True, "policy", ALLOW_RULE),
    "denied_by_default": Outcome("policy", "prod", "web", False, "policy", "default",
                                 "denied by default"),
    "denied_by_deny_rule": Outcome("policy", "dev", "secret-db", False, "policy", DENY_RULE,
                                   f"denied by {DENY_RULE}"),
    "sar_allowed": Outcome("sar", "dev", "web", True, "subjectaccessreview",
                           "subjectaccessreview: create pods/{sub} in namespace dev"),
    "sar_denied": Outcome("sar", "prod", "web", False, "subjectaccessreview", "default",
                          "Kubernetes RBAC does not allow create pods/{sub} in namespace prod"),
}
RBAC_SURFACES = ("rest", "attach", "kubectl_exec")
RBAC_CASES = [pytest.param(outcome, surface, id=f"{outcome}-{surface}")
              for outcome in OUTCOMES for surface in RBAC_SURFACES]


@pytest.mark.parametrize(("outcome", "surface"), RBAC_CASES)
async def test_rbac_outcome(matrix: Matrix, outcome: str, surface: str) -> None:
    expect = OUTCOMES[outcome]
    gw = matrix.policy if expect.gateway == "policy" else matrix.sar
    tls = matrix.creds.plain_tls
    ns, pod = expect.namespace, expect.pod
    verb = sub = "attach" if surface == "attach" else "exec"
    rule, reason = expect.rule.format(sub=sub), expect.reason.format(sub=sub)
    session_id = None
    with trio.fail_after(WAIT_S):
        if surface == "rest":
            reply = await _request(gw.port, tls, "POST", "/api/v1/sessions", token=DAVE,
                                   body={"command": ["true"], "namespace": ns, "pod": pod})
        elif surface == "attach":
            session_id = await _session(gw, tls, DAVE if expect.allowed else ADMIN, ns, pod)
            reply = await _request(gw.port, tls, "GET", _attach_target(session_id), token=DAVE,
                                   upgrade=[SUBPROTOCOL])
        else:
            reply = await _request(gw.port, tls, "GET", _exec_target(ns, pod), token=DAVE,
                                   upgrade=["v5.channel.k8s.io"])
        try:
            events = _events(gw.memory, reply)
            if not expect.allowed:
                _assert_forbidden(reply, surface, verb, pod, reason)
            elif surface == "rest":
                assert reply.status == 201, reply.body
                session_id = reply.json["id"]
            elif surface == "attach":
                assert session_id is not None
                await _expect_hello(reply, session_id)
            else:
                await _expect_exec_success(reply)
        finally:
            await reply.aclose()
        if session_id is not None:
            await _kill(gw, tls, session_id)
    assert [(e.type, e.actor_user) for e in events] == [
        ("auth.success", "dave"),
        ("authz.allow" if expect.allowed else "authz.deny", "dave")]
    decision = events[1]
    assert (decision.details["verb"], decision.details["via"], decision.details["rule"]) == \
        (verb, expect.via, rule)
    assert decision.outcome == ("success" if expect.allowed else "denied")
    assert decision.target is not None
    assert (decision.target.namespace, decision.target.pod) == (ns, pod)
    if surface == "attach":
        assert decision.target.session == session_id
    if not expect.allowed:
        assert reason in decision.details["reason"]
    if expect.via == "subjectaccessreview":
        # Asked by this request, or by an identical earlier one within the cache's TTL.
        asked = [(b["spec"]["user"], b["spec"]["resourceAttributes"]["namespace"],
                  b["spec"]["resourceAttributes"]["name"],
                  b["spec"]["resourceAttributes"]["subresource"])
                 for b in matrix.api.bodies(SAR_PATH)]
        assert ("dave", ns, pod, sub) in asked


def _assert_forbidden(reply: Reply, surface: str, verb: str, pod: str, reason: str) -> None:
    """403 before any upgrade: a Kubernetes Status on the kube API, else the JSON error."""
    assert reply.status == 403, reply.body
    if surface == "kubectl_exec":
        status = reply.json
        assert (status["kind"], status["status"], status["reason"], status["code"]) == \
            ("Status", "Failure", "Forbidden", 403)
        assert status["message"].startswith(
            f'pods "{pod}" is forbidden: User "dave" cannot create resource "pods/exec"')
        message = status["message"]
    else:
        error = reply.json["error"]
        assert error["code"] == "forbidden"
        assert error["message"].startswith(f"user 'dave' may not {verb} ")
        message = error["message"]
    assert reason in message
