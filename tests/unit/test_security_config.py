"""Config keys of docs/security.md: allowed origins, OIDC, TokenReview, SubjectAccessReview.

Each source (flag, repeated flag, variable, file) reaches the config tree;
invalid values and incomplete combinations are errors that name the
setting; ``auth.providers.configured_auth`` builds exactly what is turned on,
in chain order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from podterm.auth.oidc import OidcAuthenticator
from podterm.auth.providers import configured_auth
from podterm.auth.sar import SubjectAccessReviewer
from podterm.auth.tokenreview import ApiServerClient, TokenReviewAuthenticator
from podterm.cli import build_parser
from podterm.config import AuthConfig, load_serve_config
from podterm.errors import ConfigError

JWKS = ('{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": '
        '"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4", "y": '
        '"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}')


# ------------------------------------------------------------------ origins

def test_allowed_origins_from_repeated_and_comma_separated_flags() -> None:
    args = build_parser().parse_args(["serve", "--allowed-origins", "https://a.example.com,"
                                      "https://*.b.example.com", "--allowed-origins",
                                      "http://localhost:*"])
    assert load_serve_config(args, {}).security.allowed_origins == (
        "https://a.example.com", "https://*.b.example.com", "http://localhost:*")


def test_allowed_origins_from_the_environment_and_the_file(tmp_path: Path) -> None:
    env = {"PODTERM_ALLOWED_ORIGINS": "https://console.example.com"}
    assert load_serve_config({}, env).security.allowed_origins == ("https://console.example.com",)
    path = tmp_path / "serve.toml"
    path.write_text('[security]\nallowed-origins = ["https://x.example", "null"]\n')
    assert load_serve_config({}, {}, path).security.allowed_origins == ("https://x.example",
                                                                        "null")


def test_the_default_is_same_origin_only() -> None:
    assert load_serve_config({}, {}).security.allowed_origins == ()


def test_an_allowed_origin_that_is_not_one_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"PODTERM_ALLOWED_ORIGINS: invalid origin "
                                          r"'console\.example\.com'"):
        load_serve_config({}, {"PODTERM_ALLOWED_ORIGINS": "console.example.com"})


# --------------------------------------------------------------------- OIDC

def test_oidc_settings_reach_the_auth_config(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[auth]\noidc-issuer = "https://login.example"\n'
                    'oidc-audiences = ["podterm", "kubectl"]\noidc-jwks-file = "jwks.json"\n'
                    'oidc-username-claim = "email"\noidc-groups-claim = "groups"\n'
                    'oidc-groups-prefix = "oidc:"\noidc-username-prefix = "-"\n')
    auth = load_serve_config({}, {}, path).auth
    assert (auth.oidc_issuer, auth.oidc_audiences) == ("https://login.example",
                                                       ("podterm", "kubectl"))
    assert auth.oidc_jwks_file == str(tmp_path / "jwks.json")  # relative to the file
    assert (auth.oidc_username_claim, auth.oidc_username_prefix, auth.oidc_groups_claim,
            auth.oidc_groups_prefix) == ("email", "-", "groups", "oidc:")


@pytest.mark.parametrize(("settings", "message"), [
    ({"PODTERM_OIDC_AUDIENCES": "podterm"},
     "PODTERM_OIDC_AUDIENCES is set but --oidc-issuer is not"),
    ({"PODTERM_OIDC_GROUPS_CLAIM": "groups"},
     "PODTERM_OIDC_GROUPS_CLAIM is set but --oidc-issuer is not"),
    ({"PODTERM_OIDC_ISSUER": "https://i", "PODTERM_OIDC_JWKS_FILE": "j.json"},
     "PODTERM_OIDC_ISSUER is set but --oidc-audiences is not"),
    ({"PODTERM_OIDC_ISSUER": "https://i", "PODTERM_OIDC_AUDIENCES": "a"},
     "PODTERM_OIDC_ISSUER is set but --oidc-jwks-file is not"),
    ({"PODTERM_TOKENREVIEW_AUDIENCES": "a"},
     "PODTERM_TOKENREVIEW_AUDIENCES is set but --tokenreview is off"),
    ({"PODTERM_TOKENREVIEW_CACHE_TTL": "1m"},
     "PODTERM_TOKENREVIEW_CACHE_TTL is set but --tokenreview is off"),
])
def test_incomplete_authenticator_settings_are_errors(settings: dict[str, str],
                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_serve_config({}, settings)


def test_tokenreview_and_subjectaccessreview_settings() -> None:
    auth = load_serve_config({"tokenreview": True, "subjectaccessreview": True},
                             {"PODTERM_TOKENREVIEW_AUDIENCES": "podterm,other",
                              "PODTERM_TOKENREVIEW_CACHE_TTL": "30s"}).auth
    assert (auth.tokenreview, auth.subjectaccessreview) == (True, True)
    assert (auth.tokenreview_audiences, auth.tokenreview_cache_ttl_s) == (("podterm", "other"),
                                                                          30.0)


# ----------------------------------------------------------------- providers

def test_nothing_is_built_when_nothing_is_on() -> None:
    built = configured_auth(AuthConfig())
    assert (built.leading, built.trailing, built.subjectaccessreview, built.client) == \
        ((), (), None, None)


def test_oidc_is_built_from_its_jwks_file(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(JWKS)
    built = configured_auth(AuthConfig(oidc_issuer="https://login.example",
                                       oidc_audiences=("podterm",), oidc_jwks_file=str(jwks),
                                       oidc_groups_prefix="oidc:"))
    (oidc,) = built.leading
    assert isinstance(oidc, OidcAuthenticator)
    assert oidc.config.groups_prefix == "oidc:" and built.trailing == ()


def test_a_jwks_file_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jwks"):
        configured_auth(AuthConfig(oidc_issuer="https://login.example",
                                   oidc_audiences=("podterm",),
                                   oidc_jwks_file=str(tmp_path / "missing-jwks.json")))


def test_reviews_share_one_apiserver_client_with_the_given_credentials() -> None:
    asked: list[tuple[str | None, str | None]] = []

    def factory(path: str | None, context: str | None) -> ApiServerClient:
        asked.append((path, context))
        return ApiServerClient("http://127.0.0.1:1", ssl_context=None)

    built = configured_auth(AuthConfig(tokenreview=True, tokenreview_audiences=("podterm",),
                                       tokenreview_cache_ttl_s=30.0, subjectaccessreview=True),
                            kubeconfig="kube.yaml", context="prod", client_factory=factory)
    (review,) = built.trailing
    assert isinstance(review, TokenReviewAuthenticator)
    assert (review.audiences, review.ttl_s) == (("podterm",), 30.0)
    assert isinstance(built.subjectaccessreview, SubjectAccessReviewer)
    assert review.client is built.subjectaccessreview.client is built.client
    assert asked == [("kube.yaml", "prod")]


def test_unloadable_apiserver_credentials_name_the_settings() -> None:
    def factory(path: str | None, context: str | None) -> ApiServerClient:
        raise ConfigError("kubeconfig kube.yaml: no such file")

    with pytest.raises(ConfigError, match=r"--tokenreview and --subjectaccessreview need the "
                                          r"Kubernetes API: kubeconfig kube.yaml"):
        configured_auth(AuthConfig(tokenreview=True, subjectaccessreview=True),
                        client_factory=factory)
