"""The authenticators and the external authorizer a gateway's config asks for.

``podterm serve`` always has static tokens and client certificates
(``podterm.auth.chain``).  Three more are turned on by settings
(``docs/cli.md``, ``docs/security.md``):

* ``--oidc-issuer`` (with ``--oidc-audiences`` and ``--oidc-jwks-file``):
  an :class:`~podterm.auth.oidc.OidcAuthenticator`, placed after the static
  tokens and certificates;
* ``--tokenreview``: a :class:`~podterm.auth.tokenreview.TokenReviewAuthenticator`,
  placed last, because it recognizes every bearer token;
* ``--subjectaccessreview``: a :class:`~podterm.auth.sar.SubjectAccessReviewer`
  for policies that say ``delegate: subjectaccessreview``.

TokenReview and SubjectAccessReview share one
:class:`~podterm.auth.tokenreview.ApiServerClient`, whose credentials come
from ``--kubeconfig``/``--context`` when given, else from the pod's service
account (in-cluster), else from the default kubeconfig -- the same loaders
the kube upstream uses.

Error handling: every problem is found at start-up and raised as a
:class:`~podterm.errors.ConfigError` naming the setting (a JWKS file that
does not load, a kubeconfig that does not): a gateway never runs with an
authenticator silently missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from podterm.auth.chain import Authenticator
from podterm.auth.oidc import OidcAuthenticator, OidcConfig
from podterm.auth.sar import SubjectAccessReviewer
from podterm.auth.tokenreview import ApiServerClient, TokenReviewAuthenticator
from podterm.config import AuthConfig
from podterm.errors import ConfigError

__all__ = ["ConfiguredAuth", "configured_auth"]

#: Builds the apiserver client from (kubeconfig path or None, context or None).
ClientFactory = Callable[[str | None, str | None], ApiServerClient]


def _client_from_kubeconfig(path: str | None, context: str | None) -> ApiServerClient:
    return ApiServerClient.from_kubeconfig(path, context=context)


@dataclass(frozen=True, slots=True)
class ConfiguredAuth:
    """What :func:`configured_auth` built; each part None when its setting is off.

    Attributes:
        oidc: goes after static tokens and client certificates in the chain.
        tokenreview: goes last in the chain.
        subjectaccessreview: the policy's external authorizer.
        client: the apiserver client the two reviews share; close it with
            :meth:`aclose` when the gateway stops.
    """

    oidc: OidcAuthenticator | None = None
    tokenreview: TokenReviewAuthenticator | None = None
    subjectaccessreview: SubjectAccessReviewer | None = None
    client: ApiServerClient | None = None

    @property
    def leading(self) -> tuple[Authenticator, ...]:
        """Chain members that only recognize their own tokens (OIDC)."""
        return (self.oidc,) if self.oidc is not None else ()

    @property
    def trailing(self) -> tuple[Authenticator, ...]:
        """Chain members that recognize every token, so they go last (TokenReview)."""
        return (self.tokenreview,) if self.tokenreview is not None else ()

    async def aclose(self) -> None:
        """Close the apiserver client's idle connections."""
        if self.client is not None:
            await self.client.aclose()


def configured_auth(auth: AuthConfig, *, kubeconfig: str | None = None,
                    context: str | None = None,
                    client_factory: ClientFactory = _client_from_kubeconfig) -> ConfiguredAuth:
    """Build the authenticators and the external authorizer ``auth`` turns on.

    Args:
        auth: the ``[auth]`` settings.
        kubeconfig, context: the apiserver credentials for TokenReview and
            SubjectAccessReview (``--kubeconfig``, ``--context``); None =
            in-cluster, then the default kubeconfig.
        client_factory: builds the apiserver client (tests inject one).

    Raises:
        ConfigError: the OIDC settings are incomplete or the JWKS file does
            not load; the apiserver credentials cannot be loaded.
    """
    oidc: OidcAuthenticator | None = None
    if auth.oidc_issuer is not None:
        if auth.oidc_jwks_file is None:
            raise ConfigError("--oidc-issuer needs --oidc-jwks-file")
        oidc = OidcAuthenticator(OidcConfig(
            issuer=auth.oidc_issuer, jwks_file=auth.oidc_jwks_file,
            audiences=auth.oidc_audiences, username_claim=auth.oidc_username_claim,
            username_prefix=auth.oidc_username_prefix, groups_claim=auth.oidc_groups_claim,
            groups_prefix=auth.oidc_groups_prefix))
    client: ApiServerClient | None = None
    if auth.tokenreview or auth.subjectaccessreview:
        try:
            client = client_factory(kubeconfig, context)
        except ConfigError as exc:
            wanted = [name for name, on in (("--tokenreview", auth.tokenreview),
                                            ("--subjectaccessreview", auth.subjectaccessreview))
                      if on]
            raise ConfigError(f"{' and '.join(wanted)} {'need' if len(wanted) > 1 else 'needs'} "
                              f"the Kubernetes API: {exc.message}") from None
    tokenreview = (TokenReviewAuthenticator(client, audiences=auth.tokenreview_audiences,
                                            ttl_s=auth.tokenreview_cache_ttl_s)
                   if auth.tokenreview and client is not None else None)
    sar = (SubjectAccessReviewer(client)
           if auth.subjectaccessreview and client is not None else None)
    return ConfiguredAuth(oidc=oidc, tokenreview=tokenreview, subjectaccessreview=sar,
                          client=client)
