"""OIDC / JWT bearer tokens, verified against an issuer's JWKS file.

The rules follow kube-apiserver's ``--oidc-*`` flags, so a token kubectl's
OIDC plugin obtains for the cluster works here unchanged:

* ``iss`` must equal the configured issuer exactly (``--oidc-issuer-url``);
  a JWT from another issuer is *not recognized* (the chain then asks the next
  authenticator, e.g. TokenReview for service-account tokens);
* ``aud`` (a string or a list) must contain one of the configured audiences
  (``--oidc-client-id``);
* ``exp`` is required; ``exp`` and ``nbf`` are checked with a leeway for
  clock skew;
* the user name is the ``username_claim`` (default ``sub``), prefixed as
  ``--oidc-username-prefix`` does: by default ``ISSUER#`` unless the claim is
  ``email`` (then an ``email_verified`` claim, if present, must be true);
  ``"-"`` turns prefixing off;
* groups come from ``groups_claim`` (a string or a list of strings), each
  prefixed with ``groups_prefix``; a missing claim means no groups, unless
  ``groups_required`` (then it is a failure);
* ``required_claims`` must be present with exactly these string values.

Signatures: RS256/RS384/RS512 (RSASSA-PKCS1-v1_5) and ES256/ES384/ES512
(ECDSA, the JWS raw ``r || s`` form), verified with ``cryptography``; only
the algorithms in ``algorithms`` (default RS256 and ES256) are accepted, the
key's type and curve must fit the algorithm (no algorithm confusion), and
``none`` and HMAC are never accepted.

Why our own parser instead of PyJWT: a JWS compact token is three base64url
parts and a signature check, about a hundred lines with ``cryptography``,
which we already depend on; PyJWT would add a dependency whose defaults
(algorithm lists, leeway, audience handling) we would have to override to
match kube-apiserver anyway, and we want our own failure reasons.

The JWKS file (RFC 7517 ``{"keys": [...]}``) is re-read when it changes,
checked at most every ``jwks_check_interval_s``; a broken file keeps the
previous keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from podterm.auth.chain import AuthFailure, Credentials, FailureReason
from podterm.auth.identity import Identity
from podterm.errors import ConfigError

__all__ = ["JsonWebKey", "OidcAuthenticator", "OidcConfig", "OidcStatistics",
           "SUPPORTED_ALGORITHMS", "load_jwks", "parse_jwks", "peek_claims"]

log = logging.getLogger(__name__)

#: alg -> (key type, hash, EC curve name or None, EC coordinate bytes).
_ALGORITHMS: dict[str, tuple[str, type[hashes.HashAlgorithm], str | None, int]] = {
    "RS256": ("RSA", hashes.SHA256, None, 0),
    "RS384": ("RSA", hashes.SHA384, None, 0),
    "RS512": ("RSA", hashes.SHA512, None, 0),
    "ES256": ("EC", hashes.SHA256, "P-256", 32),  # RFC 7518 §3.4
    "ES384": ("EC", hashes.SHA384, "P-384", 48),
    "ES512": ("EC", hashes.SHA512, "P-521", 66),
}
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(_ALGORITHMS)

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}

#: RSA keys below 2048 bits are refused at load (NIST SP 800-131A).
MIN_RSA_BITS = 2048
#: A JWT larger than this is refused before decoding: 16 KiB holds a token
#: with a few hundred groups, and is h11's default header-size cap anyway.
MAX_JWT_CHARS = 16 * 1024
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_MAX_JWKS_BYTES = 1024 * 1024


def _b64decode(part: str) -> bytes:
    if not _B64URL.fullmatch(part):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64int(value: object, what: str) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a base64url string")
    return int.from_bytes(_b64decode(value), "big")


# ---------------------------------------------------------------------------
# JWKS
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JsonWebKey:
    """One usable public key from a JWKS.

    Attributes:
        kid: key id, or ``None``.
        kty: ``"RSA"`` or ``"EC"``.
        alg: the algorithm the JWK pins, or ``None`` (any that fits the type).
        curve: the EC curve name (``"P-256"``, ...) or ``None`` for RSA.
        key: the public key.
    """

    kid: str | None
    kty: str
    alg: str | None
    curve: str | None
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    def fits(self, alg: str) -> bool:
        """True when this key may verify a signature made with ``alg``."""
        kty, _, curve, _ = _ALGORITHMS[alg]
        return self.kty == kty and (self.alg is None or self.alg == alg) and \
            (curve is None or curve == self.curve)


def parse_jwks(text: str | bytes, *, source: str = "<jwks>") -> tuple[JsonWebKey, ...]:
    """Parse a JWKS document into its usable signature-verification keys.

    Keys for encryption (``use: enc``) and of other types (``oct``, ``OKP``)
    are skipped; an RSA key below 2048 bits is an error.

    Raises:
        ConfigError: not a JWKS, a malformed RSA/EC key, or no usable key.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"JWKS {source}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f'JWKS {source}: expected {{"keys": [...]}} (RFC 7517 §5)')
    keys: list[JsonWebKey] = []
    for i, jwk in enumerate(doc["keys"]):
        where = f"JWKS {source}: keys[{i}]"
        if not isinstance(jwk, dict):
            raise ConfigError(f"{where}: not an object")
        kty, kid, alg, use = jwk.get("kty"), jwk.get("kid"), jwk.get("alg"), jwk.get("use")
        if use not in (None, "sig") or kty not in ("RSA", "EC"):
            continue
        if kid is not None and not isinstance(kid, str):
            raise ConfigError(f"{where}: kid must be a string")
        if alg is not None and alg not in _ALGORITHMS:
            continue  # e.g. PS256: not ours to verify; skip like any unknown key
        try:
            if kty == "RSA":
                public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = rsa.RSAPublicNumbers(
                    _b64int(jwk.get("e"), "e"), _b64int(jwk.get("n"), "n")).public_key()
                assert isinstance(public, rsa.RSAPublicKey)
                if public.key_size < MIN_RSA_BITS:
                    raise ConfigError(f"{where} (kid {kid!r}): RSA key of {public.key_size} "
                                      f"bits; at least {MIN_RSA_BITS} are required")
                curve = None
            else:
                curve = jwk.get("crv")
                if curve not in _CURVES:
                    raise ConfigError(f"{where} (kid {kid!r}): unsupported curve {curve!r}; "
                                      f"expected one of {', '.join(_CURVES)}")
                public = ec.EllipticCurvePublicNumbers(
                    _b64int(jwk.get("x"), "x"), _b64int(jwk.get("y"), "y"),
                    _CURVES[curve]).public_key()
        except (ValueError, binascii.Error) as exc:
            raise ConfigError(f"{where} (kid {kid!r}): invalid {kty} key: {exc}") from None
        keys.append(JsonWebKey(kid=kid, kty=kty, alg=alg, curve=curve, key=public))
    if not keys:
        raise ConfigError(f"JWKS {source}: no RSA or EC signature key (kty RSA/EC, "
                          "use sig) in it")
    return tuple(keys)


def load_jwks(path: str | os.PathLike[str]) -> tuple[JsonWebKey, ...]:
    """Read and parse a JWKS file.

    Raises:
        ConfigError: unreadable, too large, or not a usable JWKS.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(_MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"JWKS {name}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_JWKS_BYTES:
        raise ConfigError(f"JWKS {name}: larger than {_MAX_JWKS_BYTES} bytes")
    return parse_jwks(data, source=name)


# ---------------------------------------------------------------------------
# Config and authenticator
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OidcConfig:
    """What a token must be to be accepted (kube-apiserver's ``--oidc-*`` in brackets).

    Attributes:
        issuer: the ``iss`` value, exactly [``--oidc-issuer-url``].
        jwks_file: the issuer's JWKS, as a file (fetch it with your deploy
            tooling; the gateway never calls out to the issuer).
        audiences: accepted ``aud`` values [``--oidc-client-id``]; at least one.
        username_claim: [``--oidc-username-claim``], default ``sub``.
        username_prefix: [``--oidc-username-prefix``]; ``None``: ``ISSUER#``
            unless the claim is ``email``; ``"-"``: no prefix.
        groups_claim: [``--oidc-groups-claim``]; ``None``: no groups.
        groups_prefix: [``--oidc-groups-prefix``].
        groups_required: a token without the groups claim fails
            (``missing_claim``) instead of having no groups.
        required_claims: ``(claim, value)`` pairs [``--oidc-required-claim``].
        algorithms: accepted ``alg`` values [``--oidc-signing-algs``].
        leeway_s: clock skew allowed on ``exp`` and ``nbf``.  60 s: NTP keeps
            servers within milliseconds, a laptop's IdP plugin may be off by
            seconds; go-oidc allows 5 min on ``nbf``, which is generous.
        jwks_check_interval_s: how often the JWKS file is checked for changes.
    """

    issuer: str
    jwks_file: str
    audiences: tuple[str, ...]
    username_claim: str = "sub"
    username_prefix: str | None = None
    groups_claim: str | None = None
    groups_prefix: str = ""
    groups_required: bool = False
    required_claims: tuple[tuple[str, str], ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: float = 60.0
    jwks_check_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ConfigError("oidc issuer: must not be empty")
        if not self.audiences or not all(self.audiences):
            raise ConfigError("oidc audiences: give at least one (the client id)")
        bad = [a for a in self.algorithms if a not in _ALGORITHMS]
        if bad or not self.algorithms:
            raise ConfigError(f"oidc algorithms: invalid value {', '.join(bad) or '(none)'}: "
                              f"expected some of {', '.join(SUPPORTED_ALGORITHMS)}")
        if not (math.isfinite(self.leeway_s) and 0 <= self.leeway_s <= 600):
            raise ConfigError(f"oidc leeway: invalid value {self.leeway_s}: expected 0..600 s")

    @property
    def effective_username_prefix(self) -> str:
        """The prefix actually applied (kube-apiserver's defaulting)."""
        if self.username_prefix == "-":
            return ""
        if self.username_prefix is not None:
            return self.username_prefix
        return "" if self.username_claim == "email" else f"{self.issuer}#"


@dataclass(frozen=True, slots=True)
class OidcStatistics:
    """Counters of one :class:`OidcAuthenticator`."""

    verified: int
    failures: MappingProxyType[str, int]
    keys: int
    jwks_reloads: int
    jwks_failures: int
    jwks_last_error: str | None


def _fail(reason: FailureReason, message: str) -> AuthFailure:
    return AuthFailure(reason, f"OIDC token rejected: {message}", method="oidc")


def _stamp(path: str) -> tuple[int, int, int, int] | str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return type(exc).__name__
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class OidcAuthenticator:
    """Verifies JWTs of one issuer (see the module docstring for the rules).

    Args:
        config: the :class:`OidcConfig`.
        clock: wall-clock seconds since the epoch (tests inject one).
        keys: use these keys instead of reading ``config.jwks_file`` (tests).

    Raises:
        ConfigError: the JWKS file cannot be loaded at construction.
    """

    __slots__ = ("config", "clock", "_keys", "_stamp", "_checked_at", "_verified",
                 "_failures", "_jwks_reloads", "_jwks_failures", "_jwks_error", "_static")

    def __init__(self, config: OidcConfig, *, clock: Callable[[], float] = time.time,
                 keys: Sequence[JsonWebKey] | None = None) -> None:
        self.config = config
        self.clock = clock
        self._static = keys is not None
        self._stamp = _stamp(config.jwks_file) if keys is None else "static"
        self._keys: tuple[JsonWebKey, ...] = tuple(keys) if keys is not None else \
            load_jwks(config.jwks_file)
        self._checked_at = clock()
        self._verified = 0
        self._failures: Counter[str] = Counter()
        self._jwks_reloads = self._jwks_failures = 0
        self._jwks_error: str | None = None

    @property
    def name(self) -> str:
        return "oidc"

    def __repr__(self) -> str:
        return f"<OidcAuthenticator {self.config.issuer} keys={len(self._keys)}>"

    # ----------------------------------------------------------- keys

    def refresh_keys_nowait(self, *, force: bool = False) -> bool | None:
        """Re-read the JWKS file if it changed: ``None`` unchanged, else success.

        A file that fails to load keeps the previous keys (logged, counted).
        """
        if self._static:
            return None
        stamp = _stamp(self.config.jwks_file)
        if stamp == self._stamp and not force:
            return None
        self._stamp = stamp
        try:
            self._keys = load_jwks(self.config.jwks_file)
        except ConfigError as exc:
            self._jwks_failures += 1
            self._jwks_error = exc.message
            log.warning("oidc.jwks.reload.failed: %s; keeping %d previous keys", exc.message,
                        len(self._keys))
            return False
        self._jwks_reloads += 1
        self._jwks_error = None
        log.info("oidc.jwks.reload.complete: %s keys=%d", self.config.jwks_file,
                 len(self._keys))
        return True

    def _maybe_refresh(self, now: float) -> None:
        if now - self._checked_at >= self.config.jwks_check_interval_s or now < self._checked_at:
            self._checked_at = now
            self.refresh_keys_nowait()

    # ----------------------------------------------------------- verify

    @staticmethod
    def peek_issuer(token: str) -> str | None:
        """The unverified ``iss`` of a JWT-shaped token, else ``None`` (cheap, never raises)."""
        claims = peek_claims(token)
        iss = claims.get("iss") if claims is not None else None
        return iss if isinstance(iss, str) else None

    async def authenticate(self, credentials: Credentials) -> Identity | None:
        """Chain member: ``None`` unless the token is a JWT from our issuer."""
        token = credentials.token
        if not token or self.peek_issuer(token) != self.config.issuer:
            return None
        return self.verify(token)

    def verify(self, token: str, *, now: float | None = None) -> Identity:
        """Verify ``token`` and map it to an identity.

        Raises:
            AuthFailure: with the first problem found, checked in this order:
                malformed, wrong issuer, algorithm, key, signature, expiry,
                not-yet-valid, audience, required claims, user name, groups.
        """
        if now is None:
            now = self.clock()
        try:
            identity = self._verify(token, now)
        except AuthFailure as exc:
            self._failures[exc.reason.value] += 1
            raise
        self._verified += 1
        return identity

    def _verify(self, token: str, now: float) -> Identity:
        cfg = self.config
        if len(token) > MAX_JWT_CHARS:
            raise _fail(FailureReason.MALFORMED, f"longer than {MAX_JWT_CHARS} characters")
        parts = token.split(".")
        if len(parts) != 3:
            raise _fail(FailureReason.MALFORMED, "not a JWT (expected header.payload.signature)")
        try:
            header = json.loads(_b64decode(parts[0]))
            claims = json.loads(_b64decode(parts[1]))
            signature = _b64decode(parts[2])
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
            raise _fail(FailureReason.MALFORMED, "a part is not base64url JSON") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _fail(FailureReason.MALFORMED, "header and payload must be JSON objects")
        iss = claims.get("iss")
        if iss != cfg.issuer:
            raise _fail(FailureReason.WRONG_ISSUER,
                        f"issuer {iss!r} is not the configured {cfg.issuer!r}")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise _fail(FailureReason.UNSUPPORTED_ALGORITHM,
                        f"alg {alg!r} is not accepted (accepted: {', '.join(cfg.algorithms)})")
        if "crit" in header:  # RFC 7515 §4.1.11: we understand no extension
            raise _fail(FailureReason.MALFORMED, "critical header extensions are not supported")
        self._maybe_refresh(now)
        self._check_signature(header, alg, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)
        self._check_times(claims, now)
        self._check_audience(claims)
        for claim, value in cfg.required_claims:
            if claim not in claims:
                raise _fail(FailureReason.MISSING_CLAIM, f"required claim {claim!r} is missing")
            if claims[claim] != value:
                raise _fail(FailureReason.INVALID_CLAIM,
                            f"required claim {claim!r} does not have the required value")
        return self._identity(claims)

    def _check_signature(self, header: Mapping[str, Any], alg: str, signed: bytes,
                         signature: bytes) -> None:
        kid = header.get("kid")
        candidates = [k for k in self._keys if k.fits(alg)]
        if kid is not None:
            candidates = [k for k in candidates if k.kid == kid]
        if not candidates:
            which = f"kid {kid!r}" if kid is not None else f"no kid, alg {alg}"
            raise _fail(FailureReason.UNKNOWN_KEY, f"no key for {which} in the issuer's JWKS")
        _, hash_type, _, size = _ALGORITHMS[alg]
        for jwk in candidates:
            try:
                if isinstance(jwk.key, rsa.RSAPublicKey):
                    jwk.key.verify(signature, signed, padding.PKCS1v15(), hash_type())
                else:
                    if len(signature) != 2 * size:  # RFC 7518 §3.4: R || S, fixed width
                        raise InvalidSignature
                    der = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                               int.from_bytes(signature[size:], "big"))
                    jwk.key.verify(der, signed, ec.ECDSA(hash_type()))
            except InvalidSignature:
                continue
            return
        raise _fail(FailureReason.BAD_SIGNATURE, "signature does not verify with the issuer's "
                                                 "keys")

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        leeway = self.config.leeway_s
        exp = claims.get("exp")
        if exp is None:
            raise _fail(FailureReason.MISSING_CLAIM, "claim 'exp' is required")
        if not _is_number(exp):
            raise _fail(FailureReason.INVALID_CLAIM, "claim 'exp' is not a number")
        if now > exp + leeway:
            raise _fail(FailureReason.EXPIRED, f"expired {_ago(now - exp)} ago")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise _fail(FailureReason.INVALID_CLAIM, "claim 'nbf' is not a number")
            if now + leeway < nbf:
                raise _fail(FailureReason.NOT_YET_VALID, f"not valid for another "
                                                         f"{_ago(nbf - now)}")

    def _check_audience(self, claims: Mapping[str, Any]) -> None:
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
        if not auds or not all(isinstance(a, str) for a in auds):
            raise _fail(FailureReason.WRONG_AUDIENCE, "the token has no audience (aud)")
        if not set(auds) & set(self.config.audiences):
            raise _fail(FailureReason.WRONG_AUDIENCE,
                        f"audience {', '.join(auds)} is not accepted (expected "
                        f"{', '.join(self.config.audiences)})")

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        cfg = self.config
        name = claims.get(cfg.username_claim)
        if name is None:
            raise _fail(FailureReason.MISSING_CLAIM,
                        f"user name claim {cfg.username_claim!r} is missing")
        if not isinstance(name, str) or not name:
            raise _fail(FailureReason.INVALID_CLAIM,
                        f"user name claim {cfg.username_claim!r} is not a non-empty string")
        if cfg.username_claim == "email" and claims.get("email_verified", True) is not True:
            raise _fail(FailureReason.INVALID_CLAIM, "email_verified is not true")
        groups: tuple[str, ...] = ()
        if cfg.groups_claim is not None:
            raw = claims.get(cfg.groups_claim)
            if raw is None:
                if cfg.groups_required:
                    raise _fail(FailureReason.MISSING_CLAIM,
                                f"groups claim {cfg.groups_claim!r} is missing")
            elif isinstance(raw, str):
                groups = (raw,)
            elif isinstance(raw, list) and all(isinstance(g, str) for g in raw):
                groups = tuple(raw)
            else:
                raise _fail(FailureReason.INVALID_CLAIM, f"groups claim {cfg.groups_claim!r} "
                                                         "is not a string or list of strings")
        sub = claims.get("sub")
        user = cfg.effective_username_prefix + name
        return Identity(user=user, uid=sub if isinstance(sub, str) and sub else user,
                        groups=tuple(cfg.groups_prefix + g for g in groups if g),
                        method="oidc")

    def statistics(self) -> OidcStatistics:
        """A frozen snapshot."""
        return OidcStatistics(verified=self._verified,
                              failures=MappingProxyType(dict(self._failures)),
                              keys=len(self._keys), jwks_reloads=self._jwks_reloads,
                              jwks_failures=self._jwks_failures,
                              jwks_last_error=self._jwks_error)


def peek_claims(token: str) -> dict[str, Any] | None:
    """The *unverified* claims of a JWT-shaped token, else ``None`` (never raises).

    Only for routing and cache lifetimes (which issuer, when it expires);
    never for a decision.
    """
    if len(token) > MAX_JWT_CHARS or token.count(".") != 2:
        return None
    try:
        claims = json.loads(_b64decode(token.split(".")[1]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
