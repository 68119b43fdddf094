"""REST /api/v1/sessions, authentication, static files and /metrics against a real gateway."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import h11
import pytest
import trio
from tests.helpers.http import exchange

from podterm.config import AuthConfig, LimitsConfig, TLSConfig
from podterm.errors import HandshakeError
from podterm.net.certs import generate_dev_pki
from podterm.net.tls import client_context
from podterm.net.wsconn import connect

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0


async def test_create_get_list_delete(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=True, size={"cols": 100, "rows": 30})
        assert created["id"].startswith("s-")
        assert created["state"] == "running"
        assert created["owner"] == "admin"
        assert created["command"] == ["cat"]
        assert created["size"] == {"cols": 100, "rows": 30}
        assert created["out_offset"] == 0 and created["in_offset"] == 0
        assert created["exit"] is None
        assert created["resume_token"]
        assert created["attach_url"] == f"/api/v1/sessions/{created['id']}/attach"

        got = await gateway.rest("GET", f"/api/v1/sessions/{created['id']}")
        assert got.status == 200
        assert got.json["id"] == created["id"]
        assert "resume_token" not in got.json

        listed = await gateway.rest("GET", "/api/v1/sessions")
        assert listed.status == 200
        assert [s["id"] for s in listed.json["items"]] == [created["id"]]
        everyone = await gateway.rest("GET", "/api/v1/sessions?all=1")
        assert [s["id"] for s in everyone.json["items"]] == [created["id"]]

        deleted = await gateway.rest("DELETE", f"/api/v1/sessions/{created['id']}")
        assert deleted.status == 200
        assert deleted.json["state"] == "closed"
        assert deleted.json["exit"]["reason"] == "killed"

        gone = await gateway.rest("GET", f"/api/v1/sessions/{created['id']}")
        assert gone.status == 410
        assert gone.json["error"]["code"] == "gone"
        missing = await gateway.rest("GET", "/api/v1/sessions/s-000000000000")
        assert missing.status == 404
        assert missing.json["error"]["code"] == "not_found"
        assert len(gateway.registry) == 0


@pytest.mark.parametrize(("body", "field"), [
    ({"size": {"cols": 0, "rows": 24}}, "size.cols"),
    ({"size": {"cols": 80, "rows": 10001}}, "size.rows"),
    ({"command": "sh"}, "command"),
    ({"command": []}, "command"),
    ({"command": ["a"] * 257}, "command"),
    ({"command": ["x" * 70000]}, "command"),
    ({"tty": "yes"}, "tty"),
    ({"env": {"1BAD": "x"}}, "env.1BAD"),
    ({"env": {f"V{i}": "x" for i in range(129)}}, "env"),
    ({"namespace": "Not_A_Label"}, "namespace"),
    ({"pod": "-bad-"}, "pod"),
    ({"upstream": "nowhere"}, "upstream"),
    ({"colour": "blue"}, "colour"),
])
async def test_create_validation_names_the_field(gateway: GatewayUnderTest, body: dict[str, object],
                                                 field: str) -> None:
    with trio.fail_after(WAIT_S):
        answer = await gateway.rest("POST", "/api/v1/sessions", body)
    assert answer.status == 400, answer.body
    assert answer.json["error"]["code"] == "bad_request"
    assert answer.json["error"]["message"].startswith(field + ":")
    assert len(gateway.registry) == 0


async def test_create_rejects_bad_json(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        answer = await gateway.rest("POST", "/api/v1/sessions", raw_body=b"{not json")
    assert answer.status == 400
    assert answer.json["error"]["code"] == "bad_request"


async def test_missing_or_wrong_token_is_401(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        missing = await gateway.rest("GET", "/api/v1/sessions", token=None)
        wrong = await gateway.rest("GET", "/api/v1/sessions", token="not-the-token")
    for answer in (missing, wrong):
        assert answer.status == 401
        assert answer.json["error"]["code"] == "unauthenticated"
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert "not-the-token" not in wrong.body.decode()


async def test_non_admin_is_403(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text('alice-token-123456,alice,1001,"dev,ops"\n'
                      'root-token-1234567,root,0,podterm:admins\n')
    with trio.fail_after(WAIT_S):
        gw = await make_gateway(auth=AuthConfig(token_file=str(tokens)))
        assert gw.admin_token is None  # a token file replaces the generated token
        denied = await gw.rest("POST", "/api/v1/sessions", {"command": ["true"]},
                               token="alice-token-123456")
        assert denied.status == 403
        assert denied.json["error"]["code"] == "forbidden"
        allowed = await gw.rest("GET", "/api/v1/sessions", token="root-token-1234567")
        assert allowed.status == 200


async def test_attach_handshake_needs_token(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        with pytest.raises(HandshakeError) as info:
            await gateway.connect_ws(created["id"], token=None)
        assert info.value.http_status == 401
        with pytest.raises(HandshakeError) as info:
            await gateway.connect_ws("s-ffffffffffff")
        assert info.value.http_status == 404
        with pytest.raises(HandshakeError) as info:
            await gateway.connect_ws(created["id"], mode="rx")
        assert info.value.http_status == 400
        # The browser carrier (bearer.podterm.<b64url>) authenticates too.
        client = await gateway.attach(created["id"], carrier=True)
        hello = await client.wait_hello()
        assert hello.session == created["id"]
        await client.aclose()
        await gateway.rest("DELETE", f"/api/v1/sessions/{created['id']}")
    failures = gateway.gw.counters.snapshot().handshake_failures
    assert failures["unauthenticated"] == 1
    assert failures["not_found"] == 1
    assert failures["bad_request"] == 1


async def test_unknown_path_and_method(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        nowhere = await gateway.rest("GET", "/api/v1/nothing")
        assert nowhere.status == 404
        wrong = await gateway.rest("PUT", "/api/v1/sessions")
        assert wrong.status == 405
        assert "POST" in wrong.headers["allow"]


async def test_static_page(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        index = await gateway.rest("GET", "/", token=None)
        assert index.status == 200
        assert index.headers["content-type"].startswith("text/html")
        assert b"<html" in index.body.lower()
        assert "content-security-policy" in index.headers
        etag = index.headers["etag"]
        again = await gateway.rest("GET", "/", token=None, headers=[("If-None-Match", etag)])
        assert again.status == 304 and again.body == b""
        script = await gateway.rest("GET", "/app.js", token=None)
        assert script.status == 200
        assert script.headers["content-type"].startswith("text/javascript")
        for path in ("/../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd", "/vendor/../../server.py",
                     "/vendor/LICENSE.xterm"):
            answer = await gateway.rest("GET", path, token=None)
            assert answer.status == 404, path


async def test_health_ready_and_metrics(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        assert (await gateway.rest("GET", "/healthz", token=None)).status == 200
        ready = await gateway.rest("GET", "/readyz", token=None)
        assert ready.status == 200
        created = await gateway.create(["cat"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await client.send_stdin(b"ping\n")
        await client.wait_output(b"ping\r\nping\r\n")
        metrics = await gateway.rest("GET", "/metrics", token=None)
        assert metrics.status == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = metrics.body.decode()
        for line in ('podterm_sessions{state="running"} 1',
                     'podterm_attachments{mode="rw"} 1',
                     'podterm_attaches_total{mode="rw"} 1',
                     "podterm_bytes_in_total 5",
                     "# TYPE podterm_event_loop_lag_seconds gauge",
                     "# TYPE podterm_handshake_failures_total counter",
                     "# TYPE podterm_gaps_total counter",
                     "# TYPE podterm_replayed_bytes_total counter",
                     "# TYPE podterm_heartbeat_failures_total counter"):
            assert line in text, line
        assert "podterm_bytes_out_total 0" not in text
        await client.aclose()
        await gateway.rest("DELETE", f"/api/v1/sessions/{created['id']}")


async def test_slow_request_head_is_cut(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(limits=LimitsConfig(handshake_timeout_s=0.3))
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        answer = b""
        while chunk := await stream.receive_some(4096):  # 408, then the gateway hangs up
            answer += chunk
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"Connection: close" in answer


async def test_oversized_body_is_413(gateway: GatewayUnderTest) -> None:
    # The head announces the size; the gateway answers before the body is sent.
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        await stream.send_all(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization: Bearer " + gateway.admin_token.encode() +
                              b"\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 300000\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(4096):
            answer += chunk
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code":"bad_request"' in answer


async def _https(port: int, ctx: ssl.SSLContext, path: str,
                 token: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` over TLS; return (status, body)."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx,
                                                 https_compatible=True)
    headers = [("Host", "127.0.0.1"), ("Connection", "close")]
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    async with stream:
        answer = await exchange(stream, "GET", path, headers=headers)
    return answer.status, answer.body


async def test_tls_token_and_client_certificates(make_gateway: GatewayFactory,
                                                 tmp_path: Path) -> None:
    pki = generate_dev_pki(tmp_path / "pki", users=("root:podterm:admins", "alice:dev"))
    gw = await make_gateway(tls=TLSConfig(cert_file=str(pki.server_cert),
                                          key_file=str(pki.server_key),
                                          client_ca_file=str(pki.ca_cert)))
    assert gw.gw.url.startswith("https://127.0.0.1:")
    anonymous = client_context(pki.ca_cert)
    root, alice = pki.client("root"), pki.client("alice")
    with trio.fail_after(WAIT_S):
        assert (await _https(gw.port, anonymous, "/api/v1/sessions"))[0] == 401
        assert (await _https(gw.port, anonymous, "/api/v1/sessions", gw.admin_token))[0] == 200
        as_root = client_context(pki.ca_cert, root.cert, root.key)
        assert (await _https(gw.port, as_root, "/api/v1/sessions"))[0] == 200
        as_alice = client_context(pki.ca_cert, alice.cert, alice.key)
        status, body = await _https(gw.port, as_alice, "/api/v1/sessions")
        assert status == 403 and b"alice" in body
        assert (await _https(gw.port, anonymous, "/healthz"))[0] == 200
        # WSS attach with the admin token.
        created = json.loads(await _https_post_session(gw.port, anonymous, gw.admin_token))
        ws, _ = await connect(f"wss://127.0.0.1:{gw.port}/api/v1/sessions/{created['id']}"
                              "/attach", subprotocols=["podterm.v1"],
                              headers=[("Authorization", f"Bearer {gw.admin_token}")],
                              ssl_context=anonymous)
        batch = await ws.receive_batch()
        assert batch[0][1].startswith(b'\x06{"type":"hello"')
        await ws.aclose()
        gw.gw.registry.get(created["id"]).kill()


async def _https_post_session(port: int, ctx: ssl.SSLContext, token: str) -> bytes:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx,
                                                 https_compatible=True)
    body = b'{"command": ["cat"]}'
    conn = h11.Connection(h11.CLIENT)
    out = b""
    async with stream:
        await stream.send_all(conn.send(h11.Request(
            method="POST", target="/api/v1/sessions",
            headers=[("Host", "127.0.0.1"), ("Connection", "close"),
                     ("Authorization", f"Bearer {token}"),
                     ("Content-Type", "application/json"),
                     ("Content-Length", str(len(body)))]))
            + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.Response):
                assert event.status_code == 201
            else:
                break
    return out
