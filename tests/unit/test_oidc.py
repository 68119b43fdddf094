"""OIDC/JWT verification against a JWKS file, and the authenticator chain.

Tokens are made here with ``cryptography`` directly (an encoder independent
of the code under test): RSA and EC keys generated per module, a JWKS file
written to a temporary directory, a fixed clock.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from podterm.audit.events import AuditEvent
from podterm.auth.authn import TokenAuthenticator
from podterm.auth.chain import (
    AuthenticatorChain,
    AuthFailure,
    Credentials,
    FailureReason,
    StaticTokenAuthenticator,
    X509Authenticator,
    success_event,
)
from podterm.auth.identity import Identity
from podterm.auth.oidc import OidcAuthenticator, OidcConfig, parse_jwks
from podterm.errors import AuthError, CloseCode, ConfigError

ISSUER = "https://idp.example.com"
AUDIENCE = "podterm"
NOW = 1_750_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64int(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class Keys:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self, *, rsa_kid: str = "r1") -> dict[str, Any]:
        rn = self.rsa.public_key().public_numbers()
        en = self.ec.public_key().public_numbers()
        return {"keys": [
            {"kty": "RSA", "kid": rsa_kid, "use": "sig", "alg": "RS256",
             "n": b64int(rn.n), "e": b64int(rn.e)},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "x": b64int(en.x).rjust(43, "A"),
             "y": b64int(en.y).rjust(43, "A")},
            {"kty": "oct", "kid": "hmac", "k": b64(b"secret")},  # skipped
        ]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def sign(keys: Keys, claims: dict[str, Any], *, alg: str = "RS256", kid: str | None = "r1",
         key: Any = None, header: dict[str, Any] | None = None) -> str:
    head = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {}), **(header or {})}
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
    data = signing_input.encode("ascii")
    if alg == "RS256":
        sig = (key or keys.rsa).sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        r, s = decode_dss_signature((key or keys.ec).sign(data, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = b""
    return f"{signing_input}.{b64(sig)}"


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-123",
                            "email": "alice@example.com", "groups": ["dev", "ops"],
                            "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def jwks_file(tmp_path: Path, keys: Keys) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(keys.jwks()))
    return path


@pytest.fixture
def make_auth(jwks_file: Path) -> Callable[..., OidcAuthenticator]:
    def make(**over: Any) -> OidcAuthenticator:
        cfg = dict(issuer=ISSUER, jwks_file=str(jwks_file), audiences=(AUDIENCE,),
                   groups_claim="groups")
        cfg.update(over)
        return OidcAuthenticator(OidcConfig(**cfg), clock=lambda: NOW)  # type: ignore[arg-type]
    return make


def failure(auth: OidcAuthenticator, token: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as info:
        auth.verify(token)
    assert info.value.method == "oidc"
    assert info.value.http_status == 401 and info.value.close_code == CloseCode.UNAUTHENTICATED
    return info.value


# ---------------------------------------------------------------------------
# Valid tokens
# ---------------------------------------------------------------------------


def test_valid_rs256_token(keys: Keys, make_auth: Callable[..., OidcAuthenticator]) -> None:
    identity = make_auth().verify(sign(keys, claims()))
    assert identity == Identity(user=f"{ISSUER}#u-123", uid="u-123", groups=("dev", "ops"),
                                method="oidc")


def test_valid_es256_token(keys: Keys, make_auth: Callable[..., OidcAuthenticator]) -> None:
    identity = make_auth().verify(sign(keys, claims(), alg="ES256", kid="e1"))
    assert identity.user == f"{ISSUER}#u-123"


def test_token_without_kid_tries_every_fitting_key(
        keys: Keys, make_auth: Callable[..., OidcAuthenticator]) -> None:
    assert make_auth().verify(sign(keys, claims(), kid=None)).uid == "u-123"
    assert make_auth().verify(sign(keys, claims(), alg="ES256", kid=None)).uid == "u-123"


def test_audience_list_and_leeway(keys: Keys, make_auth: Callable[..., OidcAuthenticator]
                                  ) -> None:
    auth = make_auth(leeway_s=60.0)
    assert auth.verify(sign(keys, claims(aud=["other", AUDIENCE]))).uid == "u-123"
    # expired 59 s ago, and valid in 59 s: both inside the 60 s leeway
    assert auth.verify(sign(keys, claims(exp=NOW - 59))).uid == "u-123"
    assert auth.verify(sign(keys, claims(nbf=NOW + 59))).uid == "u-123"


def test_username_claim_and_prefixes(keys: Keys, make_auth: Callable[..., OidcAuthenticator]
                                     ) -> None:
    token = sign(keys, claims())
    assert make_auth(username_claim="email").verify(token).user == "alice@example.com"
    assert make_auth(username_prefix="oidc:").verify(token).user == "oidc:u-123"
    assert make_auth(username_prefix="-").verify(token).user == "u-123"
    assert make_auth(groups_prefix="oidc:").verify(token).groups == ("oidc:dev", "oidc:ops")
    assert make_auth(groups_claim=None).verify(token).groups == ()
    assert make_auth().verify(sign(keys, claims(groups="solo"))).groups == ("solo",)


def test_missing_groups_claim_means_no_groups_unless_required(
        keys: Keys, make_auth: Callable[..., OidcAuthenticator]) -> None:
    token = sign(keys, claims(groups=None))
    assert make_auth().verify(token).groups == ()
    exc = failure(make_auth(groups_required=True), token)
    assert exc.reason is FailureReason.MISSING_CLAIM
    assert exc.message == "OIDC token rejected: groups claim 'groups' is missing"


# ---------------------------------------------------------------------------
# Invalid tokens: one reason each
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "make_token", "reason", "message"), [
    ("wrong signature", lambda k: sign(k, claims(), key=k.other_rsa),
     FailureReason.BAD_SIGNATURE, "signature does not verify with the issuer's keys"),
    ("tampered payload",
     lambda k: ".".join([sign(k, claims()).split(".")[0],
                         b64(json.dumps(claims(sub="root")).encode()),
                         sign(k, claims()).split(".")[2]]),
     FailureReason.BAD_SIGNATURE, "signature does not verify with the issuer's keys"),
    ("expired", lambda k: sign(k, claims(exp=NOW - 3600)),
     FailureReason.EXPIRED, "expired 60m ago"),
    ("not yet valid", lambda k: sign(k, claims(nbf=NOW + 600)),
     FailureReason.NOT_YET_VALID, "not valid for another 10m"),
    ("wrong issuer", lambda k: sign(k, claims(iss="https://evil.example.com")),
     FailureReason.WRONG_ISSUER,
     "issuer 'https://evil.example.com' is not the configured 'https://idp.example.com'"),
    ("wrong audience", lambda k: sign(k, claims(aud=["kubernetes", "grafana"])),
     FailureReason.WRONG_AUDIENCE,
     "audience kubernetes, grafana is not accepted (expected podterm)"),
    ("no audience", lambda k: sign(k, claims(aud=None)),
     FailureReason.WRONG_AUDIENCE, "the token has no audience (aud)"),
    ("no exp", lambda k: sign(k, claims(exp=None)),
     FailureReason.MISSING_CLAIM, "claim 'exp' is required"),
    ("exp not a number", lambda k: sign(k, claims(exp="tomorrow")),
     FailureReason.INVALID_CLAIM, "claim 'exp' is not a number"),
    ("alg none", lambda k: sign(k, claims(), alg="none"),
     FailureReason.UNSUPPORTED_ALGORITHM,
     "alg 'none' is not accepted (accepted: RS256, ES256)"),
    ("alg HS256", lambda k: sign(k, claims(), alg="HS256", kid="hmac"),
     FailureReason.UNSUPPORTED_ALGORITHM,
     "alg 'HS256' is not accepted (accepted: RS256, ES256)"),
    ("alg confusion: ES256 header, RSA key id", lambda k: sign(k, claims(), alg="ES256",
                                                               kid="r1"),
     FailureReason.UNKNOWN_KEY, "no key for kid 'r1' in the issuer's JWKS"),
    ("unknown kid", lambda k: sign(k, claims(), kid="r2"),
     FailureReason.UNKNOWN_KEY, "no key for kid 'r2' in the issuer's JWKS"),
    ("crit header", lambda k: sign(k, claims(), header={"crit": ["b64"]}),
     FailureReason.MALFORMED, "critical header extensions are not supported"),
    ("not a JWT", lambda k: "abc.def",
     FailureReason.MALFORMED, "not a JWT (expected header.payload.signature)"),
    ("garbage parts", lambda k: "a.b!.c",
     FailureReason.MALFORMED, "a part is not base64url JSON"),
    ("no subject", lambda k: sign(k, claims(sub=None)),
     FailureReason.MISSING_CLAIM, "user name claim 'sub' is missing"),
    ("groups not strings", lambda k: sign(k, claims(groups=[1, 2])),
     FailureReason.INVALID_CLAIM, "groups claim 'groups' is not a string or list of strings"),
], ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_invalid_token(keys: Keys, make_auth: Callable[..., OidcAuthenticator], name: str,
                       make_token: Callable[[Keys], str], reason: FailureReason,
                       message: str) -> None:
    auth = make_auth()
    exc = failure(auth, make_token(keys))
    assert exc.reason is reason
    assert exc.message == f"OIDC token rejected: {message}"
    assert auth.statistics().failures == {reason.value: 1}


def test_es256_signature_of_wrong_length_is_bad(keys: Keys,
                                                make_auth: Callable[..., OidcAuthenticator]
                                                ) -> None:
    token = sign(keys, claims(), alg="ES256", kid="e1")
    head, body, sig = token.split(".")
    exc = failure(make_auth(), f"{head}.{body}.{sig[:-4]}")
    assert exc.reason is FailureReason.BAD_SIGNATURE


def test_email_claim_requires_email_verified(keys: Keys,
                                             make_auth: Callable[..., OidcAuthenticator]) -> None:
    auth = make_auth(username_claim="email")
    assert auth.verify(sign(keys, claims(email_verified=True))).user == "alice@example.com"
    exc = failure(auth, sign(keys, claims(email_verified=False)))
    assert exc.reason is FailureReason.INVALID_CLAIM


def test_required_claims(keys: Keys, make_auth: Callable[..., OidcAuthenticator]) -> None:
    auth = make_auth(required_claims=(("hd", "example.com"),))
    assert auth.verify(sign(keys, claims(hd="example.com"))).uid == "u-123"
    assert failure(auth, sign(keys, claims(hd="evil.com"))).reason is \
        FailureReason.INVALID_CLAIM
    assert failure(auth, sign(keys, claims())).reason is FailureReason.MISSING_CLAIM


def test_algorithms_can_be_narrowed(keys: Keys, make_auth: Callable[..., OidcAuthenticator]
                                    ) -> None:
    exc = failure(make_auth(algorithms=("RS256",)), sign(keys, claims(), alg="ES256", kid="e1"))
    assert exc.reason is FailureReason.UNSUPPORTED_ALGORITHM


def test_failure_messages_never_contain_the_token(keys: Keys,
                                                  make_auth: Callable[..., OidcAuthenticator]
                                                  ) -> None:
    token = sign(keys, claims(exp=NOW - 3600))
    exc = failure(make_auth(), token)
    event = exc.to_event(at=NOW)
    for part in token.split("."):
        assert part not in exc.message and part not in event.to_json_line().decode()


# ---------------------------------------------------------------------------
# JWKS file
# ---------------------------------------------------------------------------


def test_jwks_reload_on_change_keeps_old_keys_when_broken(
        tmp_path: Path, keys: Keys, jwks_file: Path) -> None:
    now = [NOW]
    auth = OidcAuthenticator(OidcConfig(issuer=ISSUER, jwks_file=str(jwks_file),
                                        audiences=(AUDIENCE,), jwks_check_interval_s=10),
                             clock=lambda: now[0])
    rotated = sign(keys, claims(exp=NOW + 3600), kid="r2")
    assert failure(auth, rotated).reason is FailureReason.UNKNOWN_KEY

    tmp = tmp_path / "jwks.tmp"
    tmp.write_text(json.dumps(keys.jwks(rsa_kid="r2")))
    os.replace(tmp, jwks_file)
    assert failure(auth, rotated).reason is FailureReason.UNKNOWN_KEY  # not re-checked yet
    now[0] += 10
    assert auth.verify(rotated).uid == "u-123"
    assert auth.statistics().jwks_reloads == 1

    tmp.write_text("{not json")
    os.replace(tmp, jwks_file)
    now[0] += 10
    assert auth.verify(rotated).uid == "u-123"  # the old keys still verify
    stats = auth.statistics()
    assert stats.jwks_failures == 1 and stats.keys == 2
    assert stats.jwks_last_error is not None and "not JSON" in stats.jwks_last_error


@pytest.mark.parametrize(("doc", "message"), [
    ("[]", 'expected {"keys": [...]}'),
    ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no RSA or EC signature key"),
    ('{"keys": [{"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}]}',
     "unsupported curve 'secp256k1'"),
    ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}]}', "invalid EC key"),
    ('{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', "invalid RSA key"),
])
def test_jwks_errors(doc: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        parse_jwks(doc, source="j.json")


def test_jwks_refuses_small_rsa_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    n = small.public_numbers()
    doc = {"keys": [{"kty": "RSA", "kid": "old", "n": b64int(n.n), "e": b64int(n.e)}]}
    with pytest.raises(ConfigError, match="RSA key of 1024 bits; at least 2048 are required"):
        parse_jwks(json.dumps(doc))


def test_jwks_skips_encryption_keys(keys: Keys) -> None:
    doc = keys.jwks()
    doc["keys"][0]["use"] = "enc"
    parsed = parse_jwks(json.dumps(doc))
    assert [k.kid for k in parsed] == ["e1"]


def test_oidc_config_validation(jwks_file: Path) -> None:
    with pytest.raises(ConfigError, match="give at least one"):
        OidcConfig(issuer=ISSUER, jwks_file=str(jwks_file), audiences=())
    with pytest.raises(ConfigError, match="invalid value HS256"):
        OidcConfig(issuer=ISSUER, jwks_file=str(jwks_file), audiences=("a",),
                   algorithms=("HS256",))


# ---------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------

STATIC_TOKEN = "static-token-of-alice-0123456789"


@pytest.fixture
def chain(keys: Keys, make_auth: Callable[..., OidcAuthenticator]) -> AuthenticatorChain:
    tokens = TokenAuthenticator()
    tokens.add_token(STATIC_TOKEN, Identity(user="alice", uid="1", groups=("dev",)))
    return AuthenticatorChain([StaticTokenAuthenticator(tokens), X509Authenticator(),
                               make_auth()])


@pytest.mark.trio
async def test_chain_valid_credentials_of_each_kind(chain: AuthenticatorChain, keys: Keys
                                                    ) -> None:
    assert (await chain.authenticate(Credentials(token=STATIC_TOKEN))).method == "token"
    cert = await chain.authenticate(Credentials(peer=("bob", ("ops",))))
    assert cert == Identity(user="bob", uid="bob", groups=("ops",), method="x509")
    oidc = await chain.authenticate(Credentials(token=sign(keys, claims())))
    assert oidc.method == "oidc" and oidc.user == f"{ISSUER}#u-123"
    # a bearer token wins over the client certificate
    both = await chain.authenticate(Credentials(token=STATIC_TOKEN, peer=("bob", ())))
    assert both.user == "alice"
    assert chain.statistics().successes == {"token": 2, "x509": 1, "oidc": 1}


@pytest.mark.parametrize(("credentials", "reason", "method", "message"), [
    (Credentials(), FailureReason.MISSING, "chain",
     "missing credentials: send 'Authorization: Bearer <token>' or a client certificate"),
    (Credentials(token="wrong-token"), FailureReason.UNKNOWN_TOKEN, "chain",
     "invalid bearer token: unknown token"),
    (Credentials(token="has space"), FailureReason.MALFORMED, "chain",
     "invalid bearer token: empty, too long, or containing whitespace"),
    (Credentials(token="x" * 70_000), FailureReason.MALFORMED, "chain",
     "invalid bearer token: empty, too long, or containing whitespace"),
], ids=["missing", "wrong", "whitespace", "huge"])
@pytest.mark.trio
async def test_chain_failures_are_401_with_audit_event(
        chain: AuthenticatorChain, credentials: Credentials, reason: FailureReason,
        method: str, message: str) -> None:
    with pytest.raises(AuthFailure) as info:
        await chain.authenticate(credentials)
    exc = info.value
    assert isinstance(exc, AuthError)
    assert (exc.reason, exc.method, exc.message) == (reason, method, message)
    assert (exc.http_status, exc.close_code) == (401, 4401)
    event = exc.to_event(request_id="r1", source_addr="192.0.2.7", at=NOW)
    assert (event.type, event.code, event.outcome) == ("auth.failure", "PT1001", "denied")
    assert event.details == {"method": method, "reason": reason.value, "http_status": 401,
                             "close_code": 4401}
    assert AuditEvent.from_json(event.to_json_line()) == event


@pytest.mark.trio
async def test_chain_expired_oidc_token_says_expired(chain: AuthenticatorChain, keys: Keys
                                                     ) -> None:
    with pytest.raises(AuthFailure) as info:
        await chain.authenticate(Credentials(token=sign(keys, claims(exp=NOW - 7200))))
    assert info.value.reason is FailureReason.EXPIRED
    assert info.value.message == "OIDC token rejected: expired 2h ago"
    assert chain.statistics().failures == {"oidc:expired": 1}


@pytest.mark.trio
async def test_chain_jwt_from_other_issuer_is_not_oidcs(chain: AuthenticatorChain,
                                                        keys: Keys) -> None:
    # e.g. a service-account token: OIDC does not claim it; with no TokenReview
    # in the chain nobody does.
    other = sign(keys, claims(iss="https://kubernetes.default.svc"))
    with pytest.raises(AuthFailure) as info:
        await chain.authenticate(Credentials(token=other))
    assert info.value.reason is FailureReason.UNKNOWN_TOKEN


def test_success_event_and_credentials_repr() -> None:
    identity = Identity(user="alice", uid="1", groups=("dev",), method="oidc")
    event = success_event(identity, source_addr="192.0.2.7", at=NOW)
    assert (event.type, event.outcome, event.details["method"]) == ("auth.success", "success",
                                                                     "oidc")
    assert event.actor_user == "alice" and event.actor_groups == ("dev",)
    assert STATIC_TOKEN not in repr(Credentials(token=STATIC_TOKEN))
