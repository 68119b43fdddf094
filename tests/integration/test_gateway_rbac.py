"""Authentication chain, RBAC policy and failed-login limits, wired into a real gateway.

Issue 6's Done-when matrix as far as the gateway wires it: static tokens
(valid, wrong, missing), client certificates (trusted, untrusted), and the
RBAC outcomes (allowed by a rule, denied by default, denied by a deny rule
that overrides an allow) for REST create, attach and a kubectl-style exec
upgrade, each with its status and its audit event; then a flood of failed
logins from one source gets 429 while another source still works.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import h11
import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tests.helpers.http import exchange

from podterm.audit import AuditEvent, MemorySink
from podterm.auth.oidc import OidcAuthenticator, OidcConfig
from podterm.config import AuthConfig, ListenConfig, TLSConfig
from podterm.errors import HandshakeError
from podterm.net.certs import generate_dev_pki
from podterm.net.clientaddr import ClientAddressPolicy
from podterm.net.tls import client_context
from podterm.net.wsconn import connect

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0
ADMIN = "admin-token-0123456789"
DAVE = "dave-token-0123456789"  # group dev
EVE = "eve-token-0123456789"  # no group any binding names

POLICY = """\
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
"""
ALLOW_RULE = "role dev rule 1 (binding devs)"
DENY_RULE = "role dev rule 2 (binding devs)"
UPGRADE_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                   ("Sec-WebSocket-Version", "13"),
                   ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                   ("Sec-WebSocket-Protocol", "v5.channel.k8s.io")]


def _files(tmp_path: Path) -> tuple[str, str]:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},root,u-root,"podterm:admins"\n{DAVE},dave,u-dave,dev\n'
                      f"{EVE},eve,u-eve,\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return str(tokens), str(policy)


async def _gateway(make_gateway: GatewayFactory, tmp_path: Path, **fields: Any
                   ) -> tuple[GatewayUnderTest, MemorySink]:
    tokens, policy = _files(tmp_path)
    memory = MemorySink()
    gw = await make_gateway(auth=AuthConfig(token_file=tokens, policy_file=policy),
                            options={"audit_sink": memory}, **fields)
    return gw, memory


def _of(memory: MemorySink, request_id: str) -> list[AuditEvent]:
    return [e for e in memory.events if e.request_id == request_id]


def _exec_path(command: list[str], *, ns: str, pod: str) -> str:
    query = [("command", c) for c in command] + [("stdout", "true")]
    return f"/api/v1/namespaces/{ns}/pods/{pod}/exec?{urlencode(query)}"


async def _kill_all(gw: GatewayUnderTest) -> None:
    for session in list(gw.registry.sessions()):
        answer = await gw.rest("DELETE", f"/api/v1/sessions/{session.id}", token=ADMIN)
        # 410: it ended on its own between the listing and the DELETE.
        assert answer.status in (200, 410), answer.body


# ------------------------------------------------------------ authentication

async def test_static_tokens_valid_wrong_and_missing(make_gateway: GatewayFactory,
                                                     tmp_path: Path) -> None:
    gw, memory = await _gateway(make_gateway, tmp_path)
    with trio.fail_after(WAIT_S):
        ok = await gw.rest("GET", "/api/v1/sessions", token=ADMIN)
        wrong = await gw.rest("GET", "/api/v1/sessions", token="not-a-token")
        missing = await gw.rest("GET", "/api/v1/sessions", token=None)
    assert (ok.status, wrong.status, missing.status) == (200, 401, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert [e.type for e in _of(memory, ok.headers["x-request-id"])] == \
        ["auth.success", "authz.allow"]
    bad = _of(memory, wrong.headers["x-request-id"])
    assert [e.type for e in bad] == ["auth.failure"]
    assert bad[0].details["reason"] == "invalid bearer token"
    assert json.loads(wrong.body)["error"]["message"] == "invalid bearer token"
    assert "not-a-token" not in bad[0].to_json_line().decode()
    none = _of(memory, missing.headers["x-request-id"])
    assert [e.type for e in none] == ["auth.failure"]
    assert none[0].details["reason"].startswith("missing bearer token")


async def _https(port: int, ctx: ssl.SSLContext, method: str, path: str,
                 body: Any = None) -> tuple[int, bytes]:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx,
                                                 https_compatible=True)
    headers = [("Host", "127.0.0.1"), ("Connection", "close")]
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers.append(("Content-Type", "application/json"))
    async with stream:
        answer = await exchange(stream, method, path, headers=headers, body=data)
    return answer.status, answer.body


async def test_client_certificates_trusted_and_untrusted(make_gateway: GatewayFactory,
                                                         tmp_path: Path) -> None:
    pki = generate_dev_pki(tmp_path / "pki", users=("carol:dev",))
    other = generate_dev_pki(tmp_path / "other", users=("mallory:podterm:admins",))
    gw, memory = await _gateway(make_gateway, tmp_path, tls=TLSConfig(
        cert_file=str(pki.server_cert), key_file=str(pki.server_key),
        client_ca_file=str(pki.ca_cert)))
    carol, mallory = pki.client("carol"), other.client("mallory")
    with trio.fail_after(WAIT_S):
        as_carol = client_context(pki.ca_cert, carol.cert, carol.key)
        status, body = await _https(gw.port, as_carol, "POST", "/api/v1/sessions",
                                    {"command": ["true"], "namespace": "dev", "pod": "web"})
        assert status == 201, body
        status, body = await _https(gw.port, as_carol, "POST", "/api/v1/sessions",
                                    {"command": ["true"], "namespace": "prod", "pod": "web"})
        assert status == 403, body
        as_mallory = client_context(pki.ca_cert, mallory.cert, mallory.key)
        # TLS 1.3: the refusal of the certificate arrives on the first read, as
        # an alert or a bare EOF (trio does not flush a failed handshake's alert).
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError, h11.RemoteProtocolError)):
            await _https(gw.port, as_mallory, "GET", "/api/v1/sessions")
    success = [e for e in memory.events if e.type == "auth.success"]
    assert {e.details["method"] for e in success} == {"x509"}
    assert {e.actor_user for e in success} == {"carol"}
    assert not [e for e in memory.events if e.actor_user == "mallory"]
    for session in list(gw.registry.sessions()):
        session.kill()


# ------------------------------------------------------------------- RBAC

async def test_rest_create_allowed_denied_by_default_and_by_a_deny_rule(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw, memory = await _gateway(make_gateway, tmp_path)
    cases = [  # token, namespace, pod, status, audit type, rule
        (DAVE, "dev", "web", 201, "authz.allow", ALLOW_RULE),
        (DAVE, "prod", "web", 403, "authz.deny", None),
        (EVE, "dev", "web", 403, "authz.deny", None),
        (DAVE, "dev", "secret-db", 403, "authz.deny", DENY_RULE),
    ]
    with trio.fail_after(WAIT_S):
        for token, ns, pod, status, type_, rule in cases:
            answer = await gw.rest("POST", "/api/v1/sessions",
                                   {"command": ["true"], "namespace": ns, "pod": pod},
                                   token=token)
            assert answer.status == status, (ns, pod, answer.body)
            events = _of(memory, answer.headers["x-request-id"])
            authz = [e for e in events if e.type.startswith("authz.")]
            assert [e.type for e in authz] == [type_]
            assert authz[0].details["verb"] == "exec"
            assert authz[0].target is not None and authz[0].target.namespace == ns
            if rule is None:
                assert "rule" not in authz[0].details or \
                    authz[0].details["rule"] == "default"
                assert "denied by default" in authz[0].details["reason"]
            else:
                assert authz[0].details["rule"] == rule
            if status == 403:
                message = json.loads(answer.body)["error"]["message"]
                assert message.startswith("user ") and "may not exec" in message
                if rule is not None:
                    assert rule in message
        await _kill_all(gw)


async def test_attach_allowed_denied_by_default_and_by_a_deny_rule(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw, memory = await _gateway(make_gateway, tmp_path)
    with trio.fail_after(WAIT_S):
        mine = await gw.rest("POST", "/api/v1/sessions",
                             {"command": ["cat"], "namespace": "dev", "pod": "web"}, token=DAVE)
        assert mine.status == 201, mine.body
        secret = await gw.rest("POST", "/api/v1/sessions",
                               {"command": ["cat"], "namespace": "dev", "pod": "secret-db"},
                               token=ADMIN)
        assert secret.status == 201, secret.body
        ws = await gw.connect_ws(mine.json["id"], token=DAVE)  # allowed by rule 1
        await ws.aclose()
        with pytest.raises(HandshakeError) as info:  # eve: no binding
            await gw.connect_ws(mine.json["id"], token=EVE)
        assert info.value.http_status == 403
        with pytest.raises(HandshakeError) as info:  # rule 2 overrides rule 1
            await gw.connect_ws(secret.json["id"], token=DAVE)
        assert info.value.http_status == 403
        await _kill_all(gw)
    attach = [e for e in memory.events if e.type.startswith("authz.")
              and e.details["verb"] == "attach"]
    assert [(e.type, e.actor_user, e.details.get("rule")) for e in attach] == [
        ("authz.allow", "dave", ALLOW_RULE), ("authz.deny", "eve", "default"),
        ("authz.deny", "dave", DENY_RULE)]
    assert attach[0].target is not None and attach[0].target.session == mine.json["id"]


async def test_kubectl_exec_allowed_denied_by_default_and_by_a_deny_rule(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw, memory = await _gateway(make_gateway, tmp_path)
    with trio.fail_after(WAIT_S):
        ws, chosen = await connect(
            f"ws://127.0.0.1:{gw.port}" + _exec_path(["echo", "ok"], ns="dev", pod="web"),
            subprotocols=["v5.channel.k8s.io"], headers=[("Authorization", f"Bearer {DAVE}")])
        assert chosen == "v5.channel.k8s.io"
        await ws.aclose()
        for ns, pod, rule in (("prod", "web", None), ("dev", "secret-db", DENY_RULE)):
            answer = await gw.rest("GET", _exec_path(["ls"], ns=ns, pod=pod), token=DAVE,
                                   headers=UPGRADE_HEADERS)
            assert answer.status == 403, answer.body
            status = answer.json
            assert (status["kind"], status["reason"], status["code"]) == \
                ("Status", "Forbidden", 403)
            assert status["message"].startswith(
                f'pods "{pod}" is forbidden: User "dave" cannot create resource "pods/exec"')
            if rule is not None:
                assert rule in status["message"]
        await _kill_all(gw)
    execs = [e for e in memory.events if e.type.startswith("authz.")
             and e.target is not None and e.target.pod in ("web", "secret-db")]
    assert [(e.type, e.target.namespace if e.target else None) for e in execs] == [
        ("authz.allow", "dev"), ("authz.deny", "prod"), ("authz.deny", "dev")]
    assert execs[2].details["rule"] == DENY_RULE


# ------------------------------------------------------------ rate limits

async def test_a_flood_of_failed_logins_gets_429_while_another_source_works(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw, memory = await _gateway(make_gateway, tmp_path)
    # Behind a trusted balancer (127.0.0.1), X-Forwarded-For names the source.
    gw.gw.client_policy = ClientAddressPolicy.from_listen(ListenConfig(
        host="127.0.0.1", port=0, trusted_proxies=("127.0.0.1",)))
    flood = [("X-Forwarded-For", "192.0.2.7")]
    with trio.fail_after(WAIT_S):
        statuses = [(await gw.rest("GET", "/api/v1/sessions", token=f"guess-{i}",
                                   headers=flood)).status for i in range(12)]
        # The budget is 10 failures (RateLimits.auth_failures_per_source).
        assert statuses == [401] * 10 + [429] * 2
        # Even the right token is refused from there: no oracle for guessing.
        limited = await gw.rest("GET", "/api/v1/sessions", token=ADMIN, headers=flood)
        assert limited.status == 429
        assert int(limited.headers["retry-after"]) >= 1
        other = await gw.rest("GET", "/api/v1/sessions", token=ADMIN,
                              headers=[("X-Forwarded-For", "198.51.100.9")])
        assert other.status == 200
    refused = _of(memory, limited.headers["x-request-id"])
    assert [(e.type, e.outcome) for e in refused] == [("auth.failure", "rejected")]
    assert refused[0].source_addr is not None and refused[0].source_addr.startswith("192.0.2.7")


# ------------------------------------------------------------------ reload

async def test_a_changed_policy_file_applies_and_is_audited(make_gateway: GatewayFactory,
                                                            tmp_path: Path) -> None:
    gw, memory = await _gateway(make_gateway, tmp_path)
    body = {"command": ["true"], "namespace": "prod", "pod": "web"}
    with trio.fail_after(WAIT_S):
        assert (await gw.rest("POST", "/api/v1/sessions", body, token=DAVE)).status == 403
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.replace("namespaces: [dev]", "namespaces: [dev, prod]")
                          + "# a longer file: the reload sees a new size\n")
        assert await gw.gw.policy.check() is True
        assert (await gw.rest("POST", "/api/v1/sessions", body, token=DAVE)).status == 201
        policy.write_text("roles: [")  # broken: the previous policy stays in force
        assert await gw.gw.policy.check() is False
        assert (await gw.rest("POST", "/api/v1/sessions", body, token=DAVE)).status == 201
        await _kill_all(gw)
    reloads = [e for e in memory.events if e.type == "policy.reload"]
    assert [e.outcome for e in reloads] == ["success", "success", "error"]
    assert reloads[0].details["file"] == str(policy)


# -------------------------------------------------------------------- OIDC

ISSUER = "https://idp.example.com"
AUDIENCE = "podterm"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64int(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def _jwt(key: rsa.RSAPrivateKey, **over: Any) -> str:
    now = time.time()
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-42", "groups": ["dev"],
              "iat": now - 10, "nbf": now - 10, "exp": now + 300, **over}
    head = {"alg": "RS256", "typ": "JWT", "kid": "r1"}
    signing_input = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(sig)}"


async def test_oidc_valid_expired_and_wrong_signature(make_gateway: GatewayFactory,
                                                      tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "r1", "use": "sig",
                                          "alg": "RS256", "n": _b64int(numbers.n),
                                          "e": _b64int(numbers.e)}]}))
    oidc = OidcAuthenticator(OidcConfig(issuer=ISSUER, jwks_file=str(jwks),
                                        audiences=(AUDIENCE,), groups_claim="groups"))
    tokens, policy = _files(tmp_path)
    memory = MemorySink()
    gw = await make_gateway(auth=AuthConfig(token_file=tokens, policy_file=policy),
                            options={"audit_sink": memory, "authenticators": (oidc,)})
    body = {"command": ["true"], "namespace": "dev", "pod": "web"}
    with trio.fail_after(WAIT_S):
        valid = await gw.rest("POST", "/api/v1/sessions", body, token=_jwt(key))
        expired = await gw.rest("POST", "/api/v1/sessions", body,
                                token=_jwt(key, exp=time.time() - 3600))
        forged = await gw.rest("POST", "/api/v1/sessions", body, token=_jwt(other))
        await _kill_all(gw)
    assert (valid.status, expired.status, forged.status) == (201, 401, 401), valid.body
    ok = [e for e in _of(memory, valid.headers["x-request-id"])
          if e.type.startswith("auth")]  # auth.*, authz.*; session.* follow
    assert [e.type for e in ok] == ["auth.success", "authz.allow"]
    assert ok[0].details["method"] == "oidc" and ok[1].details["rule"] == ALLOW_RULE
    assert ok[0].actor_user == f"{ISSUER}#u-42" and ok[0].actor_groups == ("dev",)
    for answer, words in ((expired, "expired"), (forged, "signature")):
        failed = _of(memory, answer.headers["x-request-id"])
        assert [e.type for e in failed] == ["auth.failure"]
        assert words in failed[0].details["reason"]
        assert words in json.loads(answer.body)["error"]["message"]
