"""OIDC, TokenReview and SubjectAccessReview turned on by ``podterm serve --config FILE``.

Each test writes a TOML config, starts ``python -m podterm serve --config
FILE`` as a subprocess (the path a deployment takes: file → config tree →
authenticators), and proves the authenticator works end to end by the
gateway's answers and its audit log:

* OIDC: a JWT signed by a key listed in the JWKS file authenticates (the
  claims name the user and groups, the policy binds the group); an expired
  one and one for another audience are refused with 401;
* TokenReview: the fake apiserver vouches for one token and not another
  (200 / 401), and it is asked with the configured audience and the
  gateway's own kubeconfig credential;
* SubjectAccessReview: a policy that delegates gets Kubernetes' verdict
  (201 for the allowed namespace, 403 for the other).

The fake apiserver is the standard library's HTTPS server on 127.0.0.1 in a
thread, with a ``trustme`` CA; the gateway finds it through a kubeconfig.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tests.helpers.fake_kubeauth import FakeApi, running_fake_api, write_kubeconfig
from tests.helpers.http import request as http_request
from tests.helpers.procs import astop, await_ready

from podterm.audit import AuditEvent

pytestmark = pytest.mark.trio

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0
ISSUER = "https://issuer.example.test"
AUDIENCE = "podterm"
GATEWAY_CREDENTIAL = "gateway-sa-token"  # what the gateway shows the apiserver


# ------------------------------------------------------------------ gateway


@dataclass
class Served:
    port: int
    audit_log: Path
    log: Path

    def events(self) -> list[AuditEvent]:
        return [AuditEvent.from_json(line) for line in
                self.audit_log.read_text().splitlines() if line]


@asynccontextmanager
async def serve_with(tmp_path: Path, config: str) -> AsyncIterator[Served]:
    """``podterm serve --config serve.toml`` on 127.0.0.1:0; SIGTERM (bounded) at the end."""
    (tmp_path / "serve.toml").write_text(config)
    ready, log = tmp_path / "ready.json", tmp_path / "gateway.log"
    audit_log = tmp_path / "audit.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podterm", "serve", "--config", str(tmp_path / "serve.toml"),
             "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--audit-log",
             str(audit_log), "--recordings", "off"],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        info = await await_ready(proc, ready, log, WAIT_S)
        yield Served(int(info["url"].rsplit(":", 1)[1]), audit_log, log)
    finally:
        await astop(proc, 10)


async def request(port: int, method: str, path: str, token: str,
                  body: Any = None) -> tuple[int, Any]:
    answer = await http_request(port, method, path, token=token, body=body)
    return answer.status, json.loads(answer.body or b"null")


def auth_events(served: Served) -> list[AuditEvent]:
    return [e for e in served.events() if e.type in ("auth.success", "auth.failure")]


# --------------------------------------------------------------------- OIDC


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwt(key: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str = "k1") -> str:
    header = _b64(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signed = f"{header}.{payload}".encode("ascii")
    return f"{header}.{payload}.{_b64(key.sign(signed, padding.PKCS1v15(), hashes.SHA256()))}"


def _jwks(key: rsa.RSAPrivateKey, kid: str = "k1") -> str:
    numbers = key.public_key().public_numbers()

    def b64int(n: int) -> str:
        return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    return json.dumps({"keys": [{"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                                 "n": b64int(numbers.n), "e": b64int(numbers.e)}]})


async def test_oidc_tokens_authenticate_through_the_config_file(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "jwks.json").write_text(_jwks(key))
    (tmp_path / "policy.yaml").write_text(
        "roles:\n  - name: dev\n    rules:\n      - verbs: [list-sessions]\n"
        "bindings:\n  - name: devs\n    role: dev\n    groups: [\"oidc:devs\"]\n")
    config = f"""\
[auth]
policy = "policy.yaml"
oidc-issuer = "{ISSUER}"
oidc-audiences = ["{AUDIENCE}"]
oidc-jwks-file = "jwks.json"
oidc-username-claim = "email"
oidc-groups-claim = "groups"
oidc-groups-prefix = "oidc:"
"""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-1", "email": "alice@example.test",
              "groups": ["devs"], "iat": now, "exp": now + 600}
    valid = _jwt(key, claims)
    expired = _jwt(key, {**claims, "iat": now - 7200, "exp": now - 3600})
    other_audience = _jwt(key, {**claims, "aud": "someone-else"})
    async with serve_with(tmp_path, config) as served:
        with trio.fail_after(WAIT_S):
            assert (await request(served.port, "GET", "/api/v1/sessions", valid))[0] == 200
            for token in (expired, other_audience):
                status, body = await request(served.port, "GET", "/api/v1/sessions", token)
                assert status == 401, body
                assert body["error"]["code"] == "unauthenticated"
    events = auth_events(served)
    assert [(e.type, e.details["method"]) for e in events] == [
        ("auth.success", "oidc"), ("auth.failure", "oidc"), ("auth.failure", "oidc")]
    assert (events[0].actor_user, events[0].actor_groups) == ("alice@example.test",
                                                              ("oidc:devs",))
    assert [e.details.get("failure") for e in events[1:]] == ["expired", "wrong_audience"]


# ------------------------------------------------- TokenReview, SubjectAccessReview


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[FakeApi]:
    """The fake apiserver (TokenReview, SubjectAccessReview), and a kubeconfig for it
    in ``tmp_path/kubeconfig.yaml`` with the gateway's own credential."""
    with running_fake_api(trustme.CA(), tmp_path) as api:
        write_kubeconfig(api, tmp_path / "kubeconfig.yaml", token=GATEWAY_CREDENTIAL)
        yield api


TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
SARS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
SA_TOKEN = "sa-token-vouched-for"
SA_USER = "system:serviceaccount:dev:ci"
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:dev", "system:authenticated"]


def _token_review(path: str, body: Any) -> tuple[int, Any]:
    if path.endswith("/tokenreviews"):
        ok = body["spec"]["token"] == SA_TOKEN
        status: dict[str, Any] = {"authenticated": ok}
        if ok:
            status |= {"user": {"username": SA_USER, "uid": "u-ci", "groups": SA_GROUPS},
                       "audiences": body["spec"].get("audiences") or []}
        return 201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                     "status": status}
    if path.endswith("/subjectaccessreviews"):
        allowed = body["spec"]["resourceAttributes"]["namespace"] == "dev"
        return 201, {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                     "status": {"allowed": allowed,
                                "reason": "RBAC: allowed by RoleBinding ci/dev" if allowed
                                else ""}}
    return 404, {"kind": "Status", "code": 404}


async def test_tokenreview_through_the_config_file(tmp_path: Path, fake_api: FakeApi) -> None:
    fake_api.respond = _token_review
    (tmp_path / "policy.yaml").write_text(
        "roles:\n  - name: ci\n    rules:\n      - verbs: [list-sessions]\n"
        "bindings:\n  - name: ci\n    role: ci\n    users: [\"" + SA_USER + "\"]\n")
    config = f"""\
kubeconfig = "kubeconfig.yaml"
[auth]
policy = "policy.yaml"
tokenreview = true
tokenreview-audiences = ["{AUDIENCE}"]
tokenreview-cache-ttl = "30s"
"""
    async with serve_with(tmp_path, config) as served:
        with trio.fail_after(WAIT_S):
            assert (await request(served.port, "GET", "/api/v1/sessions", SA_TOKEN))[0] == 200
            status, body = await request(served.port, "GET", "/api/v1/sessions", "not-vouched")
            assert status == 401, body
    reviews = fake_api.bodies(TOKENREVIEWS)
    assert [r["spec"]["audiences"] for r in reviews] == [[AUDIENCE], [AUDIENCE]]
    assert {r.headers["authorization"] for r in fake_api.requests} == \
        {f"Bearer {GATEWAY_CREDENTIAL}"}
    events = auth_events(served)
    assert [(e.type, e.details["method"]) for e in events] == [
        ("auth.success", "tokenreview"), ("auth.failure", "tokenreview")]
    assert (events[0].actor_user, list(events[0].actor_groups)) == (SA_USER, SA_GROUPS)


async def test_subjectaccessreview_through_the_config_file(tmp_path: Path,
                                                          fake_api: FakeApi) -> None:
    fake_api.respond = _token_review
    (tmp_path / "tokens.csv").write_text(f'{SA_TOKEN},{SA_USER},u-ci,"ci"\n')
    # No rule grants exec: only Kubernetes can say yes.
    (tmp_path / "policy.yaml").write_text("delegate: subjectaccessreview\nroles: []\n"
                                          "bindings: []\n")
    config = """\
kubeconfig = "kubeconfig.yaml"
token-file = "tokens.csv"
[auth]
policy = "policy.yaml"
subjectaccessreview = true
"""
    async with serve_with(tmp_path, config) as served:
        with trio.fail_after(WAIT_S):
            allowed = await request(served.port, "POST", "/api/v1/sessions", SA_TOKEN,
                                    {"command": ["true"], "namespace": "dev", "pod": "web"})
            assert allowed[0] == 201, allowed
            denied = await request(served.port, "POST", "/api/v1/sessions", SA_TOKEN,
                                   {"command": ["true"], "namespace": "prod", "pod": "web"})
            assert denied[0] == 403, denied
    asked = [b["spec"] for b in fake_api.bodies(SARS)]
    assert [(s["user"], s["resourceAttributes"]["namespace"],
             s["resourceAttributes"]["subresource"]) for s in asked] == [
        (SA_USER, "dev", "exec"), (SA_USER, "prod", "exec")]
    decisions = [e for e in served.events() if e.type.startswith("authz.")]
    assert [(e.type, e.details.get("via")) for e in decisions] == [
        ("authz.allow", "subjectaccessreview"), ("authz.deny", "subjectaccessreview")]
