"""protocol.handshake.OriginPolicy: which browser pages may open a WebSocket (RFC 6455 §10.2).

One rule per test: no Origin passes, the gateway's own origin passes (Host
with and without a port, over TLS and behind a TLS-terminating balancer),
listed origins and globs pass, everything else is refused with 403.
"""

from __future__ import annotations

import pytest

from podterm.protocol.handshake import OriginPolicy, OriginRefused, normalize_origin

SAME_ORIGIN = OriginPolicy()


def test_no_origin_is_not_a_browser_and_passes() -> None:
    assert SAME_ORIGIN.allows(None, "gw.example.com", tls=True)


@pytest.mark.parametrize(("origin", "host", "tls"), [
    ("http://127.0.0.1:7780", "127.0.0.1:7780", False),
    ("https://gw.example.com", "gw.example.com", True),
    ("https://gw.example.com", "gw.example.com:443", True),
    ("HTTPS://GW.Example.COM:443", "gw.example.com", True),
    ("https://gw.example.com.", "gw.example.com", True),
    ("http://[::1]:7780", "[::1]:7780", False),
    # A TLS-terminating balancer: the browser's page is https, the request reaches us plain.
    ("https://gw.example.com", "gw.example.com", False),
])
def test_the_gateways_own_origin_passes(origin: str, host: str, tls: bool) -> None:
    assert SAME_ORIGIN.allows(origin, host, tls=tls)


@pytest.mark.parametrize(("origin", "host", "tls"), [
    ("https://evil.example", "gw.example.com", True),
    ("https://gw.example.com.evil.example", "gw.example.com", True),
    ("https://gw.example.com:8443", "gw.example.com", True),
    ("https://gw.example.com", "gw.example.com:8443", True),
    ("http://[::1]:7780", "[::1]:7781", False),
    ("http://gw.example.com", "gw.example.com", True),  # a plain page cannot be our TLS origin
    ("null", "gw.example.com", False),
    ("https://gw.example.com/path", "gw.example.com", False),
    ("https://user@gw.example.com", "gw.example.com", False),
    ("https://gw.example.com, https://gw.example.com", "gw.example.com", False),  # two headers
    ("https://gw.example.com", None, False),
])
def test_any_other_origin_is_refused(origin: str, host: str | None, tls: bool) -> None:
    assert not SAME_ORIGIN.allows(origin, host, tls=tls)


def test_a_refusal_is_403_and_names_the_origin() -> None:
    with pytest.raises(OriginRefused) as info:
        SAME_ORIGIN.check("https://evil.example", "gw", tls=False)
    assert info.value.http_status == 403
    assert info.value.origin == "https://evil.example"
    assert "'https://evil.example'" in info.value.message
    assert "--allowed-origins" in info.value.message


LISTED = OriginPolicy(["https://console.corp:8443", "https://*.example.com",
                       "http://localhost:*", "https://Portal.Example.org:443"])


@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://console.corp:8443", True),
    ("https://console.corp", False),
    ("https://a.example.com", True),
    ("https://a.b.example.com", True),
    ("https://example.com", False),  # *. needs a label
    ("https://a.example.com:8443", False),  # the glob does not reach into the port
    ("http://a.example.com", False),  # nor change the scheme
    ("https://aexample.com", False),
    ("http://localhost:3000", True),
    ("http://localhost", False),
    ("https://portal.example.org", True),  # default port and case normalized
    ("null", False),
])
def test_listed_origins_and_globs(origin: str, allowed: bool) -> None:
    assert LISTED.allows(origin, "gw.internal", tls=True) is allowed


def test_star_allows_every_origin_and_null_only_null() -> None:
    assert OriginPolicy(["*"]).allows("https://anything.example", "gw", tls=True)
    assert OriginPolicy(["*"]).allows("null", "gw", tls=True)
    assert OriginPolicy(["null"]).allows("null", "gw", tls=True)
    assert not OriginPolicy(["null"]).allows("https://anything.example", "gw", tls=True)


@pytest.mark.parametrize("pattern", ["example.com", "https://a/b", "https://a:*x", "",
                                     "https://a:70000", "https://a?b"])
def test_a_bad_pattern_is_refused_at_construction(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid origin pattern"):
        OriginPolicy([pattern])


def test_normalize_origin() -> None:
    assert normalize_origin("HTTPS://Example.com:443") == "https://example.com"
    assert normalize_origin("http://example.com:8080") == "http://example.com:8080"
    assert normalize_origin("http://a:99999") is None
    assert normalize_origin("http://a/b") is None
    assert normalize_origin("https://" + "a" * 600) is None
