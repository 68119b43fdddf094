"""Authentication and authorization: who is asking, and may they."""

from podterm.auth.authn import (
    TokenAuthenticator,
    authorize,
    bearer_from_headers,
    generate_admin_token,
    parse_token_csv,
)
from podterm.auth.identity import ADMINS_GROUP, Identity

__all__ = ["ADMINS_GROUP", "Identity", "TokenAuthenticator", "authorize", "bearer_from_headers",
           "generate_admin_token", "parse_token_csv"]
