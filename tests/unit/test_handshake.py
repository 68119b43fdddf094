"""The HTTP/1.1 upgrade on h11 events and on our parsed heads: every rejection with its
status, accept (as an h11 event and as bytes), client checks."""

from __future__ import annotations

import base64

import h11
import pytest

from podterm.errors import HandshakeError, LocalProtocolError
from podterm.protocol.handshake import (
    KUBE_BEARER_PREFIX,
    PODTERM_BEARER_PREFIX,
    UpgradeRequest,
    accept_bytes,
    accept_key,
    accept_response,
    bearer_subprotocol,
    build_request,
    check_response,
    extract_bearer_subprotocol,
    parse_upgrade,
    reject_response,
)
from podterm.protocol.http_head import RequestHead, parse_request_head

NONCE = bytes(range(16))
KEY = base64.b64encode(NONCE)  # what the Sec-WebSocket-Key header carries

GOOD = [
    ("Host", "gw.example"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY.decode()),
    ("Sec-WebSocket-Version", "13"),
]


def request(headers: list[tuple[str, str]] | None = None, *, method: str = "GET",
            target: str = "/api/v1/sessions/abc/attach?offset=0",
            drop: tuple[str, ...] = (), http_version: str = "1.1") -> h11.Request:
    hs = [(n, v) for n, v in (GOOD if headers is None else headers) if n not in drop]
    return h11.Request(method=method, target=target, headers=hs, http_version=http_version)


def with_header(name: str, value: str) -> list[tuple[str, str]]:
    return [(n, v) for n, v in GOOD if n != name] + [(name, value)]


def rejected(req: h11.Request, **kwargs: object) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        parse_upgrade(req, **kwargs)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------ accept key


def test_accept_key_matches_rfc_6455_example() -> None:
    # RFC 6455 §1.3.
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# ------------------------------------------------------------- parse_upgrade


def test_parse_valid_upgrade() -> None:
    req = request(GOOD + [("Sec-WebSocket-Protocol", "podterm.v1, v5.channel.k8s.io"),
                          ("Sec-WebSocket-Protocol", "v4.channel.k8s.io"),
                          ("Sec-WebSocket-Extensions",
                           "permessage-deflate; client_max_window_bits"),
                          ("Origin", "https://gw.example"),
                          ("Authorization", "Bearer t0k")])
    up = parse_upgrade(req)
    assert up.target == "/api/v1/sessions/abc/attach?offset=0"
    assert up.key == KEY
    assert up.version == "13"
    assert up.subprotocols == ("podterm.v1", "v5.channel.k8s.io", "v4.channel.k8s.io")
    assert up.extensions == ("permessage-deflate; client_max_window_bits",)
    assert up.origin == "https://gw.example"
    assert up.header("authorization") == "Bearer t0k"
    assert up.header("Authorization") == "Bearer t0k"
    assert up.header("x-missing") is None


def test_python_client_protocol_list_without_spaces() -> None:
    up = parse_upgrade(request(with_header("Sec-WebSocket-Protocol",
                                           "v5.channel.k8s.io,v4.channel.k8s.io")))
    assert up.subprotocols == ("v5.channel.k8s.io", "v4.channel.k8s.io")


def test_header_tokens_are_case_insensitive_and_listed() -> None:
    headers = with_header("Connection", "keep-alive, UPGRADE")
    headers = [(n, "WebSocket" if n == "Upgrade" else v) for n, v in headers]
    assert parse_upgrade(request(headers)).subprotocols == ()


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD", "OPTIONS"])
def test_reject_method_not_get_400(method: str) -> None:
    err = rejected(request(method=method))
    assert err.http_status == 400
    assert method in err.message


def test_reject_http_1_0_400() -> None:
    assert rejected(request(http_version="1.0")).http_status == 400


def test_reject_missing_upgrade_400() -> None:
    err = rejected(request(drop=("Upgrade",)))
    assert (err.http_status, err.message) == (400, "missing 'Upgrade: websocket' header")


def test_reject_upgrade_to_something_else_400() -> None:
    assert rejected(request(with_header("Upgrade", "h2c"))).http_status == 400


def test_reject_missing_connection_upgrade_400() -> None:
    err = rejected(request(with_header("Connection", "keep-alive")))
    assert (err.http_status, err.message) == (400, "missing 'Connection: upgrade' header")


@pytest.mark.parametrize("version", ["8", "12", "14", "13, 8", "thirteen"])
def test_reject_wrong_version_426_with_supported_version(version: str) -> None:
    err = rejected(request(with_header("Sec-WebSocket-Version", version)))
    assert err.http_status == 426
    assert err.headers == [("Sec-WebSocket-Version", "13")]


def test_reject_missing_version_426() -> None:
    err = rejected(request(drop=("Sec-WebSocket-Version",)))
    assert err.http_status == 426
    assert err.headers == [("Sec-WebSocket-Version", "13")]


def test_reject_missing_key_400() -> None:
    assert rejected(request(drop=("Sec-WebSocket-Key",))).http_status == 400


@pytest.mark.parametrize("key", [
    "not base64!",
    base64.b64encode(bytes(15)).decode(),  # 15 bytes
    base64.b64encode(bytes(17)).decode(),  # 17 bytes
    base64.b64encode(bytes(16)).decode().rstrip("="),  # padding missing
    "",
])
def test_reject_bad_key_400(key: str) -> None:
    err = rejected(request(with_header("Sec-WebSocket-Key", key)))
    assert err.http_status == 400
    assert "Sec-WebSocket-Key" in err.message


def test_reject_two_keys_400() -> None:
    assert rejected(request(GOOD + [("Sec-WebSocket-Key", KEY.decode())])).http_status == 400


def test_reject_origin_403_and_check_sees_none_when_absent() -> None:
    seen: list[str | None] = []

    def only_ours(origin: str | None) -> bool:
        seen.append(origin)
        return origin == "https://gw.example"

    err = rejected(request(GOOD + [("Origin", "https://evil.example")]), origin_ok=only_ours)
    assert err.http_status == 403
    assert "evil.example" in err.message
    assert parse_upgrade(request(GOOD + [("Origin", "https://gw.example")]),
                         origin_ok=only_ours).origin == "https://gw.example"
    assert rejected(request(), origin_ok=only_ours).http_status == 403
    assert seen == ["https://evil.example", "https://gw.example", None]


def test_first_failing_check_wins() -> None:
    # Bad version and bad key: the version check comes first (426 tells an old
    # client what to speak).
    headers = with_header("Sec-WebSocket-Version", "8")
    headers = [(n, "bad" if n == "Sec-WebSocket-Key" else v) for n, v in headers]
    assert rejected(request(headers)).http_status == 426


# ----------------------------------------------------------- accept / reject


def _offer(*protocols: str) -> UpgradeRequest:
    headers = GOOD + ([("Sec-WebSocket-Protocol", ", ".join(protocols))] if protocols else [])
    headers += [("Sec-WebSocket-Extensions", "permessage-deflate")]
    return parse_upgrade(request(headers))


def test_accept_response_is_101_with_accept_key() -> None:
    resp = accept_response(_offer(), None)
    assert resp.status_code == 101
    headers = dict(resp.headers)
    assert headers[b"upgrade"] == b"websocket"
    assert headers[b"connection"] == b"Upgrade"
    assert headers[b"sec-websocket-accept"] == accept_key(KEY)
    assert b"sec-websocket-protocol" not in headers


def test_accept_never_echoes_an_extension() -> None:
    up = _offer("podterm.v1")
    assert up.extensions == ("permessage-deflate",)
    resp = accept_response(up, "podterm.v1")
    assert b"sec-websocket-extensions" not in dict(resp.headers)
    with pytest.raises(LocalProtocolError):
        accept_response(up, "podterm.v1", [("Sec-WebSocket-Extensions", "permessage-deflate")])


def test_accept_echoes_exactly_the_chosen_subprotocol() -> None:
    resp = accept_response(_offer("podterm.v1", "v5.channel.k8s.io"), "v5.channel.k8s.io",
                           [("Set-Cookie", "a=b")])
    assert [v for n, v in resp.headers if n == b"sec-websocket-protocol"] == [b"v5.channel.k8s.io"]
    assert (b"set-cookie", b"a=b") in list(resp.headers)


def test_accept_refuses_a_subprotocol_not_offered() -> None:
    with pytest.raises(LocalProtocolError):
        accept_response(_offer("podterm.v1"), "v4.channel.k8s.io")


def test_accept_refuses_to_echo_a_bearer_token() -> None:
    carrier = bearer_subprotocol("secret")
    with pytest.raises(LocalProtocolError):
        accept_response(_offer("podterm.v1", carrier), carrier)


def test_reject_response_426_carries_version_header() -> None:
    err = rejected(request(with_header("Sec-WebSocket-Version", "8")))
    resp, body = reject_response(err)
    assert resp.status_code == 426
    assert resp.reason == b"Upgrade Required"
    headers = dict(resp.headers)
    assert headers[b"sec-websocket-version"] == b"13"
    assert headers[b"connection"] == b"close"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert body == (err.message + "\n").encode()


def test_reject_response_custom_body() -> None:
    resp, body = reject_response(HandshakeError("nope", 403), body=b'{"kind":"Status"}',
                                 content_type="application/json")
    assert (resp.status_code, body) == (403, b'{"kind":"Status"}')
    assert dict(resp.headers)[b"content-type"] == b"application/json"


def test_server_side_over_h11_bytes() -> None:
    """Raw request bytes → h11 → parse → accept → bytes a client h11 checks."""
    client = h11.Connection(h11.CLIENT)
    req = build_request("gw:8080", "/x", subprotocols=["podterm.v1"], key=NONCE)
    wire = (client.send(req) or b"") + (client.send(h11.EndOfMessage()) or b"")
    srv = h11.Connection(h11.SERVER)
    srv.receive_data(wire)
    got = srv.next_event()
    assert isinstance(got, h11.Request)
    up = parse_upgrade(got)
    assert srv.next_event() == h11.EndOfMessage()
    assert srv.next_event() is h11.PAUSED
    out = srv.send(accept_response(up, "podterm.v1"))
    assert out is not None and out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    client.receive_data(out + b"\x81\x02hi")  # a first frame right behind the 101
    resp = client.next_event()
    assert isinstance(resp, h11.InformationalResponse)
    assert check_response(resp, NONCE, ["podterm.v1"]) == "podterm.v1"
    assert client.trailing_data == (b"\x81\x02hi", False)
    assert srv.our_state is h11.SWITCHED_PROTOCOL


# ------------------------------------------------------------------ client side


def test_build_request_headers() -> None:
    req = build_request("gw:8080", "/api?x=1", subprotocols=["a", "b"],
                        extra_headers=[("Authorization", "Bearer t")], key=NONCE)
    headers = dict(req.headers)
    assert req.method == b"GET" and req.target == b"/api?x=1"
    assert headers[b"host"] == b"gw:8080"
    assert headers[b"sec-websocket-key"] == KEY
    assert headers[b"sec-websocket-version"] == b"13"
    assert headers[b"sec-websocket-protocol"] == b"a, b"
    assert headers[b"authorization"] == b"Bearer t"
    assert b"sec-websocket-extensions" not in headers


def test_build_request_wants_16_random_bytes() -> None:
    with pytest.raises(ValueError):
        build_request("h", "/", key=KEY)  # the base64 form, 24 bytes


def _response(status: int = 101, **extra: str) -> h11.InformationalResponse | h11.Response:
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Accept", accept_key(KEY).decode())]
    headers += [(n.replace("_", "-"), v) for n, v in extra.items()]
    if status == 101:
        return h11.InformationalResponse(status_code=101, headers=headers)
    return h11.Response(status_code=status, headers=[("Content-Length", "0")])


def test_check_response_accepts_and_returns_subprotocol() -> None:
    assert check_response(_response(), NONCE, []) is None
    assert check_response(_response(Sec_WebSocket_Protocol="b"), NONCE, ["a", "b"]) == "b"


@pytest.mark.parametrize("status", [200, 400, 401, 403, 426, 500])
def test_check_response_not_101_keeps_status(status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        check_response(_response(status), NONCE, [])
    assert info.value.http_status == status


def test_check_response_wrong_accept() -> None:
    resp = h11.InformationalResponse(status_code=101, headers=[
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(b"x" * 24).decode())])
    with pytest.raises(HandshakeError, match="Sec-WebSocket-Accept"):
        check_response(resp, NONCE, [])


def test_check_response_missing_upgrade() -> None:
    resp = h11.InformationalResponse(status_code=101, headers=[
        ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(KEY).decode())])
    with pytest.raises(HandshakeError, match="Upgrade"):
        check_response(resp, NONCE, [])


def test_check_response_subprotocol_not_offered() -> None:
    with pytest.raises(HandshakeError, match="not offered"):
        check_response(_response(Sec_WebSocket_Protocol="c"), NONCE, ["a", "b"])
    with pytest.raises(HandshakeError, match="not offered"):
        check_response(_response(Sec_WebSocket_Protocol="a, b"), NONCE, ["a", "b"])


def test_check_response_extension_not_offered() -> None:
    with pytest.raises(HandshakeError, match="permessage-deflate"):
        check_response(_response(Sec_WebSocket_Extensions="permessage-deflate"), NONCE, [])


# ---------------------------------------------------------------- bearer token


def test_extract_podterm_bearer() -> None:
    offered = ["podterm.v1", bearer_subprotocol("s3cr3t.tok-en"), "other"]
    assert offered[1].startswith(PODTERM_BEARER_PREFIX) and "=" not in offered[1]
    assert extract_bearer_subprotocol(offered) == ("s3cr3t.tok-en", ["podterm.v1", "other"])


def test_extract_kube_bearer() -> None:
    carrier = KUBE_BEARER_PREFIX + base64.urlsafe_b64encode(b"eyJhbGciOi.x_y").decode().rstrip("=")
    assert extract_bearer_subprotocol(["v5.channel.k8s.io", carrier]) == (
        "eyJhbGciOi.x_y", ["v5.channel.k8s.io"])


def test_extract_padded_bearer() -> None:
    carrier = PODTERM_BEARER_PREFIX + base64.urlsafe_b64encode(b"ab").decode()
    assert carrier.endswith("=")
    assert extract_bearer_subprotocol([carrier]) == ("ab", [])


def test_extract_no_bearer() -> None:
    assert extract_bearer_subprotocol(["podterm.v1"]) == (None, ["podterm.v1"])
    assert extract_bearer_subprotocol([]) == (None, [])


@pytest.mark.parametrize("offered", [
    [bearer_subprotocol("a"), bearer_subprotocol("b")],
    [PODTERM_BEARER_PREFIX + "!!!"],
    [PODTERM_BEARER_PREFIX + "a"],  # 1 char is never valid base64
    [PODTERM_BEARER_PREFIX + base64.urlsafe_b64encode(b"\xff\xfe").decode()],  # not UTF-8
    [PODTERM_BEARER_PREFIX],  # empty token
])
def test_extract_malformed_bearer_400(offered: list[str]) -> None:
    with pytest.raises(HandshakeError) as info:
        extract_bearer_subprotocol(offered)
    assert info.value.http_status == 400


# ------------------------------------------------ our head parser, 101 as bytes


def _h11_bytes(event: h11.Request | h11.InformationalResponse) -> bytes:
    """``event`` as h11 writes it (client side for a request, server side for a 101)."""
    if isinstance(event, h11.Request):  # by hand: h11 writes only HTTP/1.1
        return (event.method + b" " + event.target + b" HTTP/" + event.http_version + b"\r\n"
                + b"".join(n + b": " + v + b"\r\n" for n, v in event.headers.raw_items()))
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\n")
    server.next_event()
    server.next_event()
    return server.send(event) or b""


def _outcome(req: h11.Request | RequestHead) -> object:
    try:
        up = parse_upgrade(req)
    except HandshakeError as exc:
        return ("refused", exc.http_status, exc.message, exc.headers)
    return (up.target, up.key, up.version, up.subprotocols, up.origin, up.extensions,
            tuple((n, bytes(v)) for n, v in up.headers))


@pytest.mark.parametrize("req", [
    request(),
    request(method="POST"),
    request(http_version="1.0"),
    request(drop=("Upgrade",)),
    request([*GOOD[:1], ("Upgrade", "h2c, WebSocket"), *GOOD[2:]]),
    request(drop=("Connection",)),
    request([*GOOD[:2], ("Connection", "keep-alive, Upgrade"), *GOOD[3:]]),
    request(drop=("Sec-WebSocket-Version",)),
    request([*GOOD[:4], ("Sec-WebSocket-Version", "8, 13")]),
    request([*GOOD[:4], ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Version", "13")]),
    request(drop=("Sec-WebSocket-Key",)),
    request([*GOOD, ("Sec-WebSocket-Key", KEY.decode())]),
    request([*GOOD[:3], ("Sec-WebSocket-Key", "dG9vIHNob3J0"), *GOOD[4:]]),
    request([*GOOD[:3], ("Sec-WebSocket-Key", KEY.decode() + "x"), *GOOD[4:]]),
    request([*GOOD, ("Sec-WebSocket-Protocol", "podterm.v1,  v5.channel.k8s.io"),
             ("Sec-WebSocket-Protocol", "x"), ("Origin", "https://a.example"),
             ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]),
], ids=lambda r: " ".join(f"{n.decode()}={v.decode()}" for n, v in r.headers)[:60] or "-")
def test_parse_upgrade_reads_our_head_as_h11_event(req: h11.Request) -> None:
    head = parse_request_head(_h11_bytes(req) + b"\r\n", 16384)
    assert head is not None
    assert _outcome(head) == _outcome(req)


@pytest.mark.parametrize(("subprotocol", "extra"), [
    (None, []),
    ("podterm.v1", [("X-Request-Id", "r-0123456789abcdef")]),
    ("v5.channel.k8s.io", [("Set-Cookie", "a=b; Path=/"), ("X-Other", "")]),
])
def test_accept_bytes_is_what_h11_writes(subprotocol: str | None,
                                         extra: list[tuple[str, str]]) -> None:
    up = parse_upgrade(request([*GOOD, ("Sec-WebSocket-Protocol",
                                        "podterm.v1, v5.channel.k8s.io")]))
    assert accept_bytes(up, subprotocol, extra) == _h11_bytes(
        accept_response(up, subprotocol, extra))


@pytest.mark.parametrize(("subprotocol", "extra"), [
    ("not-offered", []),
    (PODTERM_BEARER_PREFIX + "dG9rZW4", []),
    (None, [("Sec-WebSocket-Extensions", "permessage-deflate")]),
    (None, [("connection", "close")]),
    (None, [("X-Evil", "a\r\nSet-Cookie: b")]),
    (None, [("Bad Name", "x")]),
])
def test_accept_bytes_refuses_what_would_break_the_handshake(
        subprotocol: str | None, extra: list[tuple[str, str]]) -> None:
    up = parse_upgrade(request([*GOOD, ("Sec-WebSocket-Protocol",
                                        "podterm.v1, " + PODTERM_BEARER_PREFIX + "dG9rZW4")]))
    with pytest.raises(LocalProtocolError):
        accept_bytes(up, subprotocol, extra)
