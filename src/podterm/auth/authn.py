"""Bearer-token authentication and the interim authorization rule.

Tokens come from two places:

* the static token file in kube-apiserver's ``--token-auth-file`` format, one
  token a line: ``token,user,uid,"group1,group2"`` (the group column is
  optional; it is quoted when it lists more than one group, as CSV does);
* the admin token the gateway generates for the embedded default
  (``secrets.token_urlsafe``), which belongs to ``podterm:admins``.

Only the SHA-256 digest of each token is kept in memory, so a heap dump or a
repr never shows one.  A lookup hashes the presented token and finds it by
digest; the digest found is then compared with :func:`hmac.compare_digest`.
Finding by digest leaks, at most, timing about a *digest* an attacker chose,
which does not help find a token (SHA-256 is preimage resistant), and it keeps
a handshake O(1) however long the token file is.

Until RBAC lands, :func:`authorize` admits only members of ``podterm:admins``
(issue 3); everyone else gets 403.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from podterm.auth.identity import ADMINS_GROUP, Identity
from podterm.errors import AuthError, ConfigError, ForbiddenError

#: Token length of the generated admin token: 32 random bytes (256 bits),
#: url-safe base64 (43 characters), as ``secrets`` recommends for tokens.
ADMIN_TOKEN_BYTES = 32

#: kube-apiserver rejects bearer tokens with whitespace; so do we, and we cap
#: the length so a hostile header cannot make us hash megabytes.
MAX_TOKEN_CHARS = 4096


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def generate_admin_token() -> str:
    """A fresh random admin token (``secrets.token_urlsafe``, 256 bits)."""
    return secrets.token_urlsafe(ADMIN_TOKEN_BYTES)


def parse_token_csv(text: str, *, source: str = "<token file>") -> list[tuple[str, Identity]]:
    """Parse kube-apiserver static token CSV text.

    Each non-blank line is ``token,user,uid[,"group1,group2"]``; lines starting
    with ``#`` are comments (kube-apiserver has none, but they cost nothing and
    people write them).

    Returns:
        ``(token, identity)`` pairs in file order.

    Raises:
        ConfigError: a line has fewer than 3 columns, an empty token or user,
            a token with whitespace, or a token that appears twice; the message
            names the file and line.
    """
    out: list[tuple[str, Identity]] = []
    seen: set[bytes] = set()
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    for row in reader:
        lineno = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()) or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 3:
            raise ConfigError(f"{source}:{lineno}: expected token,user,uid[,\"groups\"], "
                              f"got {len(row)} column(s)")
        token, user, uid = row[0].strip(), row[1].strip(), row[2].strip()
        if not token or not user:
            raise ConfigError(f"{source}:{lineno}: token and user must not be empty")
        if any(c.isspace() for c in token) or len(token) > MAX_TOKEN_CHARS:
            raise ConfigError(f"{source}:{lineno}: a token must be at most {MAX_TOKEN_CHARS} "
                              "characters without whitespace")
        groups: tuple[str, ...] = ()
        if len(row) >= 4 and row[3].strip():
            groups = tuple(g.strip() for g in row[3].split(",") if g.strip())
        digest = _digest(token)
        if digest in seen:
            raise ConfigError(f"{source}:{lineno}: duplicate token")
        seen.add(digest)
        out.append((token, Identity(user=user, uid=uid, groups=groups, method="token")))
    return out


class TokenAuthenticator:
    """Maps bearer tokens to identities, holding only their SHA-256 digests.

    Args:
        entries: ``(token, identity)`` pairs; the tokens are hashed at once.

    Use :meth:`from_file` for a token CSV and :meth:`add_token` for the
    generated admin token.
    """

    __slots__ = ("_by_digest",)

    def __init__(self, entries: Iterable[tuple[str, Identity]] = ()) -> None:
        # digest -> (digest, identity): the stored digest is compared again below.
        self._by_digest: dict[bytes, tuple[bytes, Identity]] = {}
        for token, identity in entries:
            self.add_token(token, identity)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuthenticator:
        """Load a kube-apiserver static token CSV.

        Raises:
            ConfigError: the file cannot be read or a line is malformed.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"token file {str(path)!r}: {exc.strerror or exc}") from exc
        return cls(parse_token_csv(text, source=str(path)))

    def add_token(self, token: str, identity: Identity) -> None:
        """Accept ``token`` as ``identity`` (the digest is stored, not the token)."""
        digest = _digest(token)
        self._by_digest[digest] = (digest, identity)

    def add_admin_token(self, token: str, user: str = "admin") -> Identity:
        """Accept the generated admin token; its identity is in ``podterm:admins``."""
        identity = Identity(user=user, uid=user, groups=(ADMINS_GROUP,), method="generated-admin")
        self.add_token(token, identity)
        return identity

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"<TokenAuthenticator tokens={len(self._by_digest)}>"

    def authenticate(self, token: str | None) -> Identity:
        """Return the identity of ``token``.

        Raises:
            AuthError: no token, or one that is not known.
        """
        if not token:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("invalid bearer token")
        digest = _digest(token)
        entry = self._by_digest.get(digest)
        # Compare again in constant time, so the verdict never rests on how
        # the dict compares keys.
        if entry is None or not hmac.compare_digest(entry[0], digest):
            raise AuthError("invalid bearer token")
        return entry[1]


def bearer_from_headers(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None.

    ``headers`` maps lower-case header names to values.  The scheme is matched
    case-insensitively (RFC 7235 §2.1).
    """
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def authorize(identity: Identity) -> None:
    """The interim rule until RBAC: only ``podterm:admins`` may act.

    Raises:
        ForbiddenError: ``identity`` is not in ``podterm:admins``.
    """
    if not identity.is_admin:
        raise ForbiddenError(f"user {identity.user!r} is not allowed: only members of "
                             f"{ADMINS_GROUP} may use this gateway until RBAC is configured")
