"""Authentication chain: static tokens, client certificates, OIDC, TokenReview.

:class:`AuthenticatorChain` asks each authenticator in order whether it
*recognizes* the credentials; the first that does decides, with an identity
or an :class:`AuthFailure` naming the precise reason.  Credentials no
authenticator recognizes fail as ``unknown_token`` (or ``missing_credentials``
when there were none).  The order the gateway uses::

    AuthenticatorChain([StaticTokenAuthenticator(tokens),   # token CSV + admin token
                        X509Authenticator(),                # verified client certificate
                        OidcAuthenticator(oidc_config),     # JWTs whose iss is the issuer
                        TokenReviewAuthenticator(client)])  # anything else: ask the apiserver

What "recognizes" means for each, so that one authenticator never hides
another's token:

========================  ==========================================================
static                    the token's SHA-256 digest is in the table
x509                      no bearer token, and the TLS peer sent a verified certificate
oidc                      a JWT whose unverified ``iss`` is the configured issuer
tokenreview               any bearer token (put it last)
========================  ==========================================================

Failures never carry a secret: no token, no token prefix, no signature.
They say what was wrong (expired, bad signature, wrong audience, ...), which
is what the person holding the token needs, and what the audit event
``auth.failure`` records in ``details.reason`` (:meth:`AuthFailure.to_event`).
"""

from __future__ import annotations

import enum
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from podterm.audit.events import AuditEvent, make_event
from podterm.auth.authn import MAX_TOKEN_CHARS, TokenAuthenticator
from podterm.auth.identity import Identity
from podterm.errors import AuthError, CloseCode

__all__ = [
    "AuthFailure",
    "Authenticator",
    "AuthenticatorChain",
    "ChainStatistics",
    "Credentials",
    "FailureReason",
    "StaticTokenAuthenticator",
    "X509Authenticator",
    "success_event",
]

log = logging.getLogger(__name__)

#: Any whitespace, as ``str.isspace`` defines it (``re``'s ``\s`` on ``str`` is
#: the same Unicode test), found in one C-level scan instead of a generator.
_WHITESPACE = re.compile(r"\s")


class FailureReason(enum.StrEnum):
    """Why authentication failed; the value is the audit ``details.reason``."""

    MISSING = "missing_credentials"  # no bearer token and no client certificate
    UNKNOWN_TOKEN = "unknown_token"  # no authenticator recognizes the token
    MALFORMED = "malformed_token"  # not a JWT / not decodable
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"  # alg none, HS256, or not allowed
    UNKNOWN_KEY = "unknown_signing_key"  # kid not in the JWKS
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"
    INVALID_CLAIM = "invalid_claim"
    REJECTED = "rejected"  # the TokenReview said not authenticated
    UNAVAILABLE = "authenticator_unavailable"  # TokenReview could not be asked (503)


class AuthFailure(AuthError):
    """Authentication failed for a stated reason (401 / close 4401).

    ``authenticator_unavailable`` is 503 / close 1013 instead: the token may
    be fine, the apiserver that would vouch for it did not answer, and the
    client should retry rather than drop its credentials.

    Attributes:
        reason: the :class:`FailureReason`.
        method: which authenticator decided (``"token"``, ``"oidc"``, ...),
            or ``"chain"`` when none recognized the credentials.
    """

    def __init__(self, reason: FailureReason, message: str, *, method: str = "chain") -> None:
        unavailable = reason is FailureReason.UNAVAILABLE
        super().__init__(message,
                         close_code=CloseCode.TRY_AGAIN_LATER if unavailable else None,
                         http_status=503 if unavailable else None)
        self.reason = reason
        self.method = method
        if unavailable:
            self.outcome = "rejected"
            self.reason_name = "ServiceUnavailable"

    def __repr__(self) -> str:
        return f"AuthFailure({self.reason.value}, {self.message!r}, method={self.method!r})"

    def to_event(self, *, request_id: str | None = None, source_addr: str | None = None,
                 at: float | None = None) -> AuditEvent:
        """The ``auth.failure`` audit event (outcome ``denied``; ``rejected`` when unavailable)."""
        return make_event("auth.failure", outcome="rejected" if self.http_status == 503
                          else "denied", at=at, request_id=request_id, source_addr=source_addr,
                          method=self.method, reason=self.reason.value,
                          http_status=self.http_status, close_code=int(self.close_code))


def success_event(identity: Identity, *, request_id: str | None = None,
                  source_addr: str | None = None, at: float | None = None) -> AuditEvent:
    """The ``auth.success`` audit event for ``identity``."""
    return make_event("auth.success", at=at, request_id=request_id, actor_user=identity.user,
                      actor_groups=identity.groups, source_addr=source_addr,
                      method=identity.method)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented.

    Attributes:
        token: the bearer token (``Authorization`` header or the WebSocket
            subprotocol carrier), or ``None``.
        peer: ``(user, groups)`` from a *verified* TLS client certificate
            (:func:`podterm.net.tls.peer_identity`), or ``None``.
    """

    token: str | None = None
    peer: tuple[str, tuple[str, ...]] | None = None

    def __repr__(self) -> str:  # never show the token
        token = "-" if self.token is None else f"<{len(self.token)} chars>"
        return f"Credentials(token={token}, peer={self.peer!r})"


class Authenticator(Protocol):
    """One way of proving who you are.

    ``authenticate`` returns ``None`` when it does not recognize the
    credentials (the chain asks the next one), an :class:`Identity` when
    they are valid, and raises :class:`AuthFailure` when it recognizes them
    as its own but they are not valid.
    """

    @property
    def name(self) -> str:
        """The method name (``Identity.method``, audit ``details.method``)."""
        ...

    async def authenticate(self, credentials: Credentials) -> Identity | None:
        ...


class StaticTokenAuthenticator:
    """The kube-apiserver token CSV and the generated admin token, as a chain member."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: TokenAuthenticator) -> None:
        self.tokens = tokens

    @property
    def name(self) -> str:
        return "token"

    def __repr__(self) -> str:
        return f"<StaticTokenAuthenticator {self.tokens!r}>"

    async def authenticate(self, credentials: Credentials) -> Identity | None:
        if not credentials.token or len(credentials.token) > MAX_TOKEN_CHARS:
            return None
        try:
            return self.tokens.authenticate(credentials.token)
        except AuthError:  # not in the table: someone else's token, perhaps
            return None


class X509Authenticator:
    """A verified client certificate: CN = user, O = groups (kube-apiserver's rule).

    Only when no bearer token was sent: an explicit token says who the caller
    means to be (kubectl through a mutual-TLS load balancer sends both).
    """

    __slots__ = ()

    @property
    def name(self) -> str:
        return "x509"

    def __repr__(self) -> str:
        return "<X509Authenticator>"

    async def authenticate(self, credentials: Credentials) -> Identity | None:
        if credentials.token is not None or credentials.peer is None:
            return None
        user, groups = credentials.peer
        return Identity(user=user, uid=user, groups=tuple(groups), method="x509")


@dataclass(frozen=True, slots=True)
class ChainStatistics:
    """Outcomes so far: successes by method, failures by ``method:reason``."""

    successes: MappingProxyType[str, int]
    failures: MappingProxyType[str, int]


class AuthenticatorChain:
    """First authenticator that recognizes the credentials decides.

    Args:
        authenticators: in order; see the module docstring for the usual one.
    """

    __slots__ = ("authenticators", "_successes", "_failures")

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)
        self._successes: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<AuthenticatorChain {', '.join(a.name for a in self.authenticators)}>"

    async def authenticate(self, credentials: Credentials) -> Identity:
        """The caller's identity.

        Raises:
            AuthFailure: missing or unrecognized credentials, or the
                authenticator that recognized them refused them (its reason).
        """
        try:
            identity = await self._authenticate(credentials)
        except AuthFailure as exc:
            self._failures[f"{exc.method}:{exc.reason.value}"] += 1
            raise
        self._successes[identity.method] += 1
        return identity

    async def _authenticate(self, credentials: Credentials) -> Identity:
        if credentials.token is not None and (
                not credentials.token or len(credentials.token) > MAX_TOKEN_CHARS * 4
                or _WHITESPACE.search(credentials.token) is not None):
            # 16 KiB: a JWT with a long groups claim fits; h11 caps headers there too.
            raise AuthFailure(FailureReason.MALFORMED, "invalid bearer token: empty, too long, "
                                                       "or containing whitespace")
        for authenticator in self.authenticators:
            identity = await authenticator.authenticate(credentials)
            if identity is not None:
                return identity
        if credentials.token is None:
            raise AuthFailure(FailureReason.MISSING, "missing credentials: send "
                              "'Authorization: Bearer <token>' or a client certificate")
        raise AuthFailure(FailureReason.UNKNOWN_TOKEN, "invalid bearer token: unknown token")

    def statistics(self) -> ChainStatistics:
        """A frozen snapshot of the counters."""
        return ChainStatistics(MappingProxyType(dict(self._successes)),
                               MappingProxyType(dict(self._failures)))
