"""The gateway as kube-apiserver (``podterm.gateway.kubeapi``), over loopback sockets.

A real gateway (the ``make_gateway`` fixture, local upstream, static token
file: ``alice`` is in ``podterm:admins``, ``bob`` is not) and a minimal
Kubernetes exec client written here: the WebSocket framing is
``podterm.net.wsconn``; the channel bytes are built and checked by hand,
against the byte examples of ``shared/spec/k8s-exec-protocol.md`` (section
numbers below refer to it), not with podterm's own channel codec.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
import trio
import yaml
from tests.helpers.fake_apiserver import FakeApiServer, FakeContainer, FakePod, FakeUser
from tests.helpers.http import HttpAnswer, exchange
from tests.helpers.kubectl import write_kubeconfig

from podterm.audit import MemorySink
from podterm.client.kubeconfig import main as kubeconfig_main
from podterm.client.kubeconfig import render_kubeconfig
from podterm.config import (
    AuthConfig,
    KubeconfigOptions,
    LimitsConfig,
    SessionsConfig,
    UpstreamConfig,
)
from podterm.errors import HandshakeError, UpstreamError
from podterm.gateway.kubeapi import KubeStatusError, RefusalMemory
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, client_handshake, connect
from podterm.resilience.heartbeat import Heartbeat
from podterm.session.session import SessionLimits

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0
ADMIN = "alice-token"
USER = "bob-token"
V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V4_B64 = "v4.base64.channel.k8s.io"
SUCCESS = b'{"metadata":{},"status":"Success"}'
UPGRADE_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                   ("Sec-WebSocket-Version", "13"),
                   ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode())]
SPDY_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", "v5.channel.k8s.io"),
                ("X-Stream-Protocol-Version", "v4.channel.k8s.io")]


def exit_status(code: int) -> bytes:
    """§5.1: the NonZeroExitCode Status, byte for byte."""
    return (b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero '
            b'exit code: command terminated with exit code %d","reason":"NonZeroExitCode",'
            b'"details":{"causes":[{"reason":"ExitCode","message":"%d"}]}}' % (code, code))


def exec_path(command: list[str] | None = None, *, pod: str = "mypod", ns: str = "default",
              sub: str = "exec", **params: Any) -> str:
    """``/api/v1/namespaces/NS/pods/POD/exec?command=...&stdout=true...`` (kubectl's shape)."""
    query: list[tuple[str, str]] = [("command", c) for c in command or []]
    for key, value in sorted(params.items()):
        query.append((key, value if isinstance(value, str) else str(value).lower()))
    return f"/api/v1/namespaces/{ns}/pods/{pod}/{sub}?{urlencode(query)}"


class K8s:
    """One exec/attach connection: every server message kept as ``(opcode, bytes)``."""

    def __init__(self, ws: WebSocketStream, subprotocol: str | None) -> None:
        self.ws = ws
        self.subprotocol = subprotocol
        self.messages: list[tuple[int, bytes]] = []
        self.close_code: int | None = None

    def channel(self, n: int) -> bytes:
        """Everything received on channel ``n`` (raw variants)."""
        return b"".join(p[1:] for _, p in self.messages if p[:1] == bytes((n,)))

    async def pump(self) -> bool:
        if self.close_code is not None:
            return False
        try:
            batch = await self.ws.receive_batch()
        except ConnectionClosed as exc:
            self.close_code = exc.code
            await self.ws.aclose()
            return False
        self.messages.extend((op, bytes(p)) for op, p in batch)
        return True

    async def read_until(self, predicate: Any) -> None:
        while not predicate(self):
            if not await self.pump():
                assert predicate(self), f"closed {self.close_code}; got {self.messages}"
                return

    async def wait_closed(self) -> int:
        while await self.pump():
            pass
        assert self.close_code is not None
        return self.close_code

    async def send(self, channel: int, data: bytes) -> None:
        await self.ws.send_binary(data, bytes((channel,)))


async def k8s_connect(gw: GatewayUnderTest, path: str, *, token: str = ADMIN,
                      protocols: tuple[str, ...] = (V5,)) -> K8s:
    ws, chosen = await connect(f"ws://127.0.0.1:{gw.port}{path}", subprotocols=list(protocols),
                               headers=[("Authorization", f"Bearer {token}")])
    return K8s(ws, chosen)


def status_of(answer: Any) -> dict[str, Any]:
    """A pre-upgrade answer's body: a Status with kind/apiVersion/code equal to the HTTP code."""
    assert answer.headers["content-type"] == "application/json", answer.headers
    body: dict[str, Any] = answer.json
    assert body["kind"] == "Status" and body["apiVersion"] == "v1", body
    assert body["status"] == "Failure" and body["code"] == answer.status, body
    return body


@pytest.fixture
async def kgw(make_gateway: GatewayFactory, tmp_path: Path) -> GatewayUnderTest:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},alice,u-alice,"podterm:admins"\n{USER},bob,u-bob,dev\n')
    return await make_gateway(auth=AuthConfig(token_file=str(tokens)))


# ----------------------------------------------------------------- the reads


async def test_version_is_public_and_reports_a_minor_of_at_least_30(
        kgw: GatewayUnderTest) -> None:
    answer = await kgw.rest("GET", "/version?timeout=5s", token=None)
    assert answer.status == 200
    version = answer.json
    assert version["major"] == "1" and int(version["minor"]) >= 30  # §2.1 dispatcher
    assert version["gitVersion"].startswith(f"v1.{version['minor']}.")


async def test_discovery_answers_what_kubectl_needs_to_any_authenticated_user(
        kgw: GatewayUnderTest) -> None:
    for token in (ADMIN, USER):  # discovery is not an authorization matter (system:discovery)
        api = await kgw.rest("GET", "/api?timeout=32s", token=token)
        assert api.status == 200 and api.json["kind"] == "APIVersions"
        assert api.json["versions"] == ["v1"]
        assert api.json["serverAddressByClientCIDRs"][0]["serverAddress"] == \
            f"127.0.0.1:{kgw.port}"
        apis = await kgw.rest("GET", "/apis?timeout=32s", token=token)
        assert apis.status == 200  # §2.2: a 404 here breaks kubectl
        assert apis.json == {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        v1 = await kgw.rest("GET", "/api/v1?timeout=32s", token=token)
        assert v1.status == 200 and v1.json["groupVersion"] == "v1"
        pods = {r["name"]: r for r in v1.json["resources"]}
        assert pods["pods"]["namespaced"] is True and pods["pods"]["kind"] == "Pod"
        assert {"pods/exec", "pods/attach"} <= set(pods)


async def test_no_or_a_bad_token_gets_the_apiservers_401_status(kgw: GatewayUnderTest) -> None:
    for token in (None, "not-a-token"):
        for path in ("/api", "/api/v1/namespaces/default/pods/mypod", exec_path(["true"])):
            answer = await kgw.rest("GET", path, token=token)
            assert answer.status == 401
            # §2.3: exactly what kube-apiserver answers.
            assert answer.body == (b'{"kind":"Status","apiVersion":"v1","metadata":{},'
                                   b'"status":"Failure","message":"Unauthorized",'
                                   b'"reason":"Unauthorized","code":401}')


async def test_any_valid_pod_name_is_a_running_local_pod_with_container_main(
        kgw: GatewayUnderTest) -> None:
    answer = await kgw.rest("GET", "/api/v1/namespaces/team-a/pods/web-0.x", token=ADMIN)
    assert answer.status == 200
    pod = answer.json
    assert pod["kind"] == "Pod" and pod["apiVersion"] == "v1"  # §2.2: required by kubectl
    assert pod["metadata"]["name"] == "web-0.x" and pod["metadata"]["namespace"] == "team-a"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["main"]
    assert pod["spec"]["containers"][0]["tty"] is True  # kubectl attach -t asks for a tty
    assert pod["status"]["phase"] == "Running"
    missing = await kgw.rest("GET", "/api/v1/namespaces/default/pods/No_Such", token=ADMIN)
    assert missing.status == 404
    assert status_of(missing) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "No_Such" not found', "reason": "NotFound",
        "details": {"name": "No_Such", "kind": "pods"}, "code": 404}


async def test_a_user_outside_podterm_admins_gets_a_forbidden_status_naming_the_verb(
        kgw: GatewayUnderTest) -> None:
    get = await kgw.rest("GET", "/api/v1/namespaces/default/pods/mypod", token=USER)
    body = status_of(get)
    assert get.status == 403 and body["reason"] == "Forbidden"
    assert body["message"].startswith(
        'pods "mypod" is forbidden: User "bob" cannot get resource "pods" in API group "" '
        'in the namespace "default": ')
    assert body["details"] == {"name": "mypod", "kind": "pods"}
    path = exec_path(["true"], stdout=True)
    for method, headers in (("GET", UPGRADE_HEADERS + [("Sec-WebSocket-Protocol", V5)]),
                            ("POST", SPDY_HEADERS)):
        answer = await kgw.rest(method, path, token=USER, headers=headers)
        assert answer.status == 403, (method, answer.body)
        assert status_of(answer)["message"].startswith(
            'pods "mypod" is forbidden: User "bob" cannot create resource "pods/exec"')


async def test_everything_else_under_api_is_a_not_found_status(kgw: GatewayUnderTest) -> None:
    for path in ("/api/v1/namespaces/default/services/x", "/apis/apps/v1",
                 "/api/v1/namespaces/default/pods"):
        answer = await kgw.rest("GET", path, token=ADMIN)
        assert answer.status == 404 and status_of(answer)["reason"] == "NotFound", path
    delete = await kgw.rest("DELETE", "/api/v1/namespaces/default/pods/mypod", token=ADMIN)
    assert delete.status == 405 and status_of(delete)["reason"] == "MethodNotAllowed"
    # podterm's own REST API keeps its own error body.
    sessions = await kgw.rest("GET", "/api/v1/sessions", token=ADMIN)
    assert sessions.status == 200 and sessions.json == {"items": []}
    wrong = await kgw.rest("PUT", "/api/v1/sessions", token=ADMIN)
    assert wrong.status == 405 and wrong.json["error"]["code"] == "bad_request"


# ------------------------------------------------------ refusals before the upgrade

REFUSALS = [
    # (path, HTTP code, reason, message)
    (exec_path(["true"], container="nope", stdout=True), 400, "BadRequest",
     "container nope is not valid for pod mypod"),
    (exec_path(["true"], pod="Bad_Name", container="main", stdout=True), 404, "NotFound",
     'pods "Bad_Name" not found'),
    (exec_path([], container="main", stdout=True), 400, "BadRequest",
     "you must specify at least one command for the container (the command query parameter)"),
    (exec_path(["true"], stdout="maybe"), 400, "BadRequest",
     """invalid value for parameter "stdout": 'maybe' is not a boolean"""),
    (exec_path(["true"], stdout=False, stderr=False), 400, "BadRequest",
     "you must specify at least 1 of stdin, stdout, stderr"),
]


@pytest.mark.parametrize(("path", "code", "reason", "message"), REFUSALS)
async def test_the_spdy_retry_gets_the_same_verdict_as_the_websocket_get(
        kgw: GatewayUnderTest, path: str, code: int, reason: str, message: str) -> None:
    get = await kgw.rest("GET", path, token=ADMIN,
                         headers=UPGRADE_HEADERS + [("Sec-WebSocket-Protocol", V5)])
    post = await kgw.rest("POST", path, token=ADMIN, headers=SPDY_HEADERS)
    for answer in (get, post):  # §9 fallback trap: kubectl shows the POST's answer
        assert answer.status == code, answer.body
        body = status_of(answer)
        assert (body["reason"], body["message"]) == (reason, message)


async def test_a_spdy_post_that_would_have_been_allowed_gets_upgrade_advice(
        kgw: GatewayUnderTest) -> None:
    post = await kgw.rest("POST", exec_path(["true"], container="main", stdout=True),
                          token=ADMIN, headers=SPDY_HEADERS)
    assert post.status == 400
    message = status_of(post)["message"]
    assert "kubectl >= 1.30" in message and "KUBECTL_REMOTE_COMMAND_WEBSOCKETS=true" in message
    assert len(kgw.registry) == 0  # nothing was started


async def test_a_get_without_upgrade_or_without_a_known_subprotocol_is_refused(
        kgw: GatewayUnderTest) -> None:
    plain = await kgw.rest("GET", exec_path(["true"], stdout=True), token=ADMIN)
    assert plain.status == 400 and status_of(plain)["message"] == "Upgrade request required"
    with pytest.raises(HandshakeError) as info:
        await k8s_connect(kgw, exec_path(["true"], stdout=True), protocols=("v3.channel.k8s.io",))
    assert info.value.http_status == 400
    assert "v5.channel.k8s.io, v4.channel.k8s.io" in info.value.message


# ------------------------------------------------------------------ exec


async def test_the_kube_bearer_subprotocol_authenticates_and_is_never_echoed(
        kgw: GatewayUnderTest) -> None:
    carrier = "base64url.bearer.authorization.k8s.io." + \
        base64.urlsafe_b64encode(ADMIN.encode()).decode().rstrip("=")
    with trio.fail_after(WAIT_S):
        ws, chosen = await connect(f"ws://127.0.0.1:{kgw.port}" + exec_path(["echo", "ok"],
                                                                           stdout=True),
                                   subprotocols=[carrier, V5])  # no Authorization header
        k = K8s(ws, chosen)
        assert chosen == V5
        assert await k.wait_closed() == 1000
    assert k.channel(1) == b"ok\n"


async def test_exec_v5_sends_ready_output_one_status_and_close_1000(
        kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["echo", "hi there"], container="main",
                                             stderr=True, stdout=True))
        assert k.subprotocol == V5
        session = await _running_session(kgw, k)
        assert await k.wait_closed() == 1000
        await session.wait_closed()  # right after the Close handshake, not after a grace
    assert all(op == 2 for op, _ in k.messages)  # binary only (§4.1)
    assert k.messages[0] == (2, b"\x01")  # the empty "ready" message on stdout (§1)
    assert k.channel(1) == b"hi there\n"
    assert k.channel(2) == b""
    assert [p for _, p in k.messages if p[:1] == b"\x03"] == [b"\x03" + SUCCESS]  # exactly one
    assert k.messages[-1] == (2, b"\x03" + SUCCESS)
    assert not [p for _, p in k.messages if p[:1] == b"\xff"]  # never FF nn (§7.4)
    counters = kgw.gw.counters.snapshot()
    assert counters.sessions_created == 1 and counters.attaches["rw"] == 1
    assert counters.sessions_ended == {"exited": 1}


async def test_exec_keeps_stderr_apart_and_reports_the_exit_code(kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["sh", "-c", "echo out; echo err >&2; exit 3"],
                                             container="main", stderr=True, stdout=True))
        assert await k.wait_closed() == 1000
    assert k.channel(1) == b"out\n" and k.channel(2) == b"err\n"
    assert [p for _, p in k.messages if p[:1] == b"\x03"] == [b"\x03" + exit_status(3)]


async def test_stdin_from_binary_and_text_messages_then_v5_close_gives_eof(
        kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["cat"], container="main", stdin=True,
                                             stdout=True, stderr=True))
        await k.send(0, b"binary\n")
        await k.ws.send_text("\x00text\n")  # the Python client writes str as text (§4.1)
        await k.read_until(lambda c: c.channel(1) == b"binary\ntext\n")
        await k.send(0xFF, b"\x00")  # §7.1: stdin EOF; cat exits 0
        assert await k.wait_closed() == 1000
    assert k.messages[-1] == (2, b"\x03" + SUCCESS)


async def test_exec_without_stdin_starts_with_its_input_at_eof(kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["sh", "-c", "cat; echo cat-done"],
                                             container="main", stdout=True, stderr=True))
        assert await k.wait_closed() == 1000
    assert k.channel(1) == b"cat-done\n" and k.messages[-1] == (2, b"\x03" + SUCCESS)


async def test_tty_exec_applies_resizes_and_has_no_stderr(kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        # kubectl -it asks for stdin, stdout and tty only (§3.1).
        k = await k8s_connect(kgw, exec_path(["sh", "-c", "read x; stty size; exit 4"],
                                             container="main", stdin=True, stdout=True,
                                             tty=True))
        await k.send(4, b'{"Width":100,"Height":30}\n')  # kubectl's bytes (§4.3)
        await k.send(4, b'{"width": 0, "height": 9}{"WIDTH":132,')  # dropped; half a value
        await k.send(4, b' "Height":43}')  # completes it: stream-of-JSON (§6)
        await k.send(0, b"go\r")
        assert await k.wait_closed() == 1000
    assert k.messages[0] == (2, b"\x01")
    assert b"43 132" in k.channel(1)
    assert k.channel(2) == b""
    assert k.messages[-1] == (2, b"\x03" + exit_status(4))


@pytest.mark.parametrize("subprotocol", [V4, V4_B64])
async def test_v4_and_base64_variants(kgw: GatewayUnderTest, subprotocol: str) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["sh", "-c", "read x; echo got $x; exit 2"],
                                             stdin=True, stdout=True, stderr=True),
                              protocols=(subprotocol,))
        assert k.subprotocol == subprotocol
        if subprotocol == V4:
            await k.send(0, b"line\n")
        else:
            await k.ws.send_text("0" + base64.b64encode(b"line\n").decode())  # §4.5
        assert await k.wait_closed() == 1000
    if subprotocol == V4:
        assert k.messages[0] == (2, b"\x01")
        assert k.channel(1) == b"got line\n"
        assert k.messages[-1] == (2, b"\x03" + exit_status(2))
    else:
        assert all(op == 1 for op, _ in k.messages)  # text messages
        assert k.messages[0] == (1, b"1")  # empty stdout: "ready"
        stdout = b"".join(base64.b64decode(p[1:]) for _, p in k.messages if p[:1] == b"1")
        assert stdout == b"got line\n"
        assert k.messages[-1] == (1, b"3" + base64.b64encode(exit_status(2)))


async def test_attach_starts_a_login_shell_and_ends_with_success(
        kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(None, sub="attach", container="main", stdin=True,
                                             stdout=True, stderr=True))
        await k.send(0, b"echo attached-$((6*7))\nexit 3\n")
        assert await k.wait_closed() == 1000
    assert b"attached-42" in k.channel(1)
    assert k.messages[-1] == (2, b"\x03" + SUCCESS)  # §12: attach carries no exit code


# ------------------------------------------------- sessions the gateway ends itself


async def _running_session(gw: GatewayUnderTest, k: K8s) -> Any:
    """The session behind ``k``: it exists once the "ready" message came (sent after its start)."""
    await k.read_until(lambda c: c.messages)
    (session,) = gw.registry.sessions()
    return session


async def test_a_session_killed_through_the_api_ends_with_a_failure_status_and_1000(
        kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["sleep", "60"], stdout=True, stderr=True))
        session = await _running_session(kgw, k)
        assert session.owner == "alice" and session.spec.pod == "mypod"
        assert session.spec.container == "main"
        killed = await kgw.rest("DELETE", f"/api/v1/sessions/{session.id}", token=ADMIN)
        assert killed.status == 200
        assert await k.wait_closed() == 1000  # 1000, or kubectl would not show the message
    (status,) = [json.loads(p[1:]) for _, p in k.messages if p[:1] == b"\x03"]
    assert status["status"] == "Failure" and status["reason"] == "Gone"
    assert "killed" in status["message"] and session.id in status["message"]


async def test_the_drain_deadline_ends_kubectl_sessions_with_a_failure_status(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},alice,u-alice,"podterm:admins"\n')
    gw = await make_gateway(auth=AuthConfig(token_file=str(tokens)),
                            sessions=SessionsConfig(drain_timeout_s=0.3))
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(gw, exec_path(["sleep", "60"], stdout=True, stderr=True))
        await _running_session(gw, k)
        gw.gw.shutdown("test drain")
        assert await k.wait_closed() == 1000
        await gw.finished.wait()
    (status,) = [json.loads(p[1:]) for _, p in k.messages if p[:1] == b"\x03"]
    assert status["reason"] == "ServiceUnavailable" and status["code"] == 503
    assert "shutting down" in status["message"]


async def test_a_client_that_goes_away_ends_its_session(kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["sleep", "60"], stdin=True, stdout=True,
                                             stderr=True))
        session = await _running_session(kgw, k)
        await trio.aclose_forcefully(k.ws.stream)  # kubectl killed: no Close
        await session.wait_closed()
    assert kgw.gw.counters.snapshot().sessions_ended == {"client_gone": 1}


async def test_a_protocol_violation_closes_with_its_code_and_ends_the_session(
        kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["sleep", "60"], stdin=True, stdout=True))
        session = await _running_session(kgw, k)
        await k.send(0xFF, b"\x00\x00")  # a CLOSE signal must be 2 bytes (§4.7)
        assert await k.wait_closed() == 1002
        await session.wait_closed()


# -------------------------------------------------------------------- keepalive


async def test_client_pings_are_answered_while_the_command_runs(kgw: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(kgw, exec_path(["sh", "-c", "read x; echo $x"], stdin=True,
                                             stdout=True))
        hb = Heartbeat(5.0, now=0.0)
        k.ws.heartbeat = hb
        payload = hb.poll(5.0)
        assert payload is not None
        await k.ws.ping(payload)  # kubectl pings every 5 s (§8)
        await k.send(0, b"after-ping\n")
        await k.read_until(lambda c: b"after-ping" in c.channel(1))
        assert hb.rtt_s is not None, "no pong to the client's ping"
        assert await k.wait_closed() == 1000


async def test_the_gateway_pings_and_drops_a_client_that_never_answers(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},alice,u-alice,"podterm:admins"\n')
    gw = await make_gateway(auth=AuthConfig(token_file=str(tokens)),
                            session_limits=SessionLimits(heartbeat_interval_s=0.2,
                                                         heartbeat_max_missed=2))
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        ws, _ = await client_handshake(stream, f"127.0.0.1:{gw.port}",
                                       exec_path(["sleep", "60"], stdout=True), [V5],
                                       [("Authorization", f"Bearer {ADMIN}")])
        # Read raw frames (server frames are unmasked) and never answer: no PONG.
        raw = bytearray()
        pings = 0
        session = None
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            raw += data
            while len(raw) >= 2 and len(raw) >= 2 + (raw[1] & 0x7F):
                opcode, size = raw[0] & 0x0F, raw[1] & 0x7F
                assert size < 126
                if opcode == 0x9:
                    pings += 1
                if opcode == 0x2 and session is None:  # "ready": the session runs
                    (session,) = gw.registry.sessions()
                if opcode == 0x8:
                    assert struct.unpack("!H", raw[2:4])[0] == 1011
                del raw[:2 + size]
        assert session is not None
        await session.wait_closed()
        await trio.aclose_forcefully(stream)
    assert pings >= 2
    counters = gw.gw.counters.snapshot()
    assert counters.heartbeat_failures == 1 and counters.sessions_ended == {"client_gone": 1}


async def test_a_client_that_answers_pings_keeps_its_session(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},alice,u-alice,"podterm:admins"\n')
    gw = await make_gateway(auth=AuthConfig(token_file=str(tokens)),
                            session_limits=SessionLimits(heartbeat_interval_s=0.1,
                                                         heartbeat_max_missed=2))
    with trio.fail_after(WAIT_S):
        # 1 s is ten ping intervals; wsconn answers each PING while it reads.
        k = await k8s_connect(gw, exec_path(["sh", "-c", "sleep 1; echo done"], stdout=True))
        assert await k.wait_closed() == 1000
    assert k.channel(1) == b"done\n" and k.messages[-1] == (2, b"\x03" + SUCCESS)
    assert gw.gw.counters.snapshot().heartbeat_failures == 0


# ----------------------------------------------------------------- kubeconfig


async def test_kubeconfig_is_yaml_with_the_ca_embedded_and_one_context(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    ca.write_bytes(pem)
    text, warnings = render_kubeconfig(KubeconfigOptions(
        server="https://gw.example:7780/", token='t0k"en:#', ca_file=str(ca),
        context_name="prod-gw"))
    assert warnings == []
    doc = yaml.safe_load(text)
    assert doc["current-context"] == "prod-gw"
    assert doc["clusters"] == [{"name": "prod-gw", "cluster": {
        "server": "https://gw.example:7780",
        "certificate-authority-data": base64.b64encode(pem).decode()}}]
    assert doc["users"] == [{"name": "prod-gw", "user": {"token": 't0k"en:#'}}]
    assert doc["contexts"] == [{"name": "prod-gw", "context": {
        "cluster": "prod-gw", "user": "prod-gw", "namespace": "default"}}]


async def test_kubeconfig_warns_about_plain_http_and_refuses_unusable_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kubeconfig_main(KubeconfigOptions(server="http://127.0.0.1:7780", token="t",
                                             insecure=True)) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["clusters"][0]["cluster"]["insecure-skip-tls-verify"] is True
    assert "kubectl sends no token" in err
    not_pem = tmp_path / "x.crt"
    not_pem.write_text("hello")
    for options, needle in ((KubeconfigOptions(server="ftp://x"), "--server"),
                            (KubeconfigOptions(ca_file=str(not_pem)), "no PEM certificate"),
                            (KubeconfigOptions(ca_file=os.devnull + "x"), "cannot read"),
                            (KubeconfigOptions(ca_file=str(not_pem), insecure=True),
                             "exclude each other")):
        assert kubeconfig_main(options) == 2
        out, err = capsys.readouterr()
        assert out == "" and needle in err


# ------------------------------------------------- the kube upstream's apiserver


@pytest.fixture
def fake_apiserver() -> Iterator[FakeApiServer]:
    pods = [FakePod("web", containers=(FakeContainer("app"), FakeContainer("sidecar")),
                    default_container="app")]
    with FakeApiServer(pods=pods, tokens={"gw-token": FakeUser("podterm-gateway")},
                       minor="31") as api:
        yield api


async def test_with_the_kube_upstream_the_reads_come_from_its_apiserver(
        make_gateway: GatewayFactory, tmp_path: Path, fake_apiserver: FakeApiServer) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},alice,u-alice,"podterm:admins"\n')
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake_apiserver.url,
                                  ca_pem=fake_apiserver.ca_pem, token="gw-token")
    gw = await make_gateway(auth=AuthConfig(token_file=str(tokens)),
                            upstream=UpstreamConfig(kind="kube", kubeconfig=str(kubeconfig)))
    with trio.fail_after(WAIT_S):
        version = await gw.rest("GET", "/version", token=None)
        assert version.json["minor"] == "31"  # the apiserver's own (>= 30: passed through)
        v1 = await gw.rest("GET", "/api/v1", token=ADMIN)
        assert v1.status == 200 and v1.json["groupVersion"] == "v1"
        api = await gw.rest("GET", "/api", token=ADMIN)
        assert api.json["serverAddressByClientCIDRs"][0]["serverAddress"] == \
            f"127.0.0.1:{gw.port}"  # the gateway, not the apiserver behind it
        pod = await gw.rest("GET", "/api/v1/namespaces/default/pods/web", token=ADMIN)
        assert pod.status == 200
        assert [c["name"] for c in pod.json["spec"]["containers"]] == ["app", "sidecar"]
        missing = await gw.rest("GET", "/api/v1/namespaces/default/pods/nope", token=ADMIN)
        assert missing.status == 404
        assert status_of(missing)["message"] == 'pods "nope" not found'
        # The real pod's containers decide, before any upgrade (and for the SPDY retry).
        bad = await gw.rest("POST", exec_path(["true"], pod="web", container="main",
                                              stdout=True), token=ADMIN, headers=SPDY_HEADERS)
        assert bad.status == 400
        assert status_of(bad)["message"] == "container main is not valid for pod web"
        # And exec runs in the apiserver's pod, through the kube upstream.
        k = await k8s_connect(gw, exec_path(["sh", "-c", "echo via-kube; exit 6"], pod="web",
                                            stdout=True, stderr=True))
        assert await k.wait_closed() == 1000
    assert b"via-kube\n" in k.channel(1)
    assert k.messages[-1] == (2, b"\x03" + exit_status(6))
    (log,) = fake_apiserver.execs
    assert log.container == "app"  # the default container, from the pod's annotation


async def test_an_apiserver_older_than_1_30_is_reported_as_1_32(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    with FakeApiServer(tokens={"gw-token": FakeUser("podterm-gateway")}, minor="29") as api:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, ca_pem=api.ca_pem,
                                      token="gw-token")
        gw = await make_gateway(upstream=UpstreamConfig(kind="kube",
                                                        kubeconfig=str(kubeconfig)))
        version = await gw.rest("GET", "/version", token=None)
    # §2.1: the dispatcher would run kubectl 1.29, which speaks only SPDY by default.
    assert int(version.json["minor"]) >= 30


# ------------------------------------- the apiserver's refusals are refused upgrades


async def _kube_gateway(make_gateway: GatewayFactory, tmp_path: Path, api: FakeApiServer,
                        **config: Any) -> GatewayUnderTest:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},alice,u-alice,"podterm:admins"\n')
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, ca_pem=api.ca_pem,
                                  token="gw-token")
    return await make_gateway(auth=AuthConfig(token_file=str(tokens)),
                              upstream=UpstreamConfig(kind="kube", kubeconfig=str(kubeconfig)),
                              **config)


async def _ask_upgrade(gw: GatewayUnderTest, path: str) -> HttpAnswer:
    """kubectl's WebSocket GET; a 101 comes back as such (no body), not as a hang."""
    async with await trio.open_tcp_stream("127.0.0.1", gw.port) as stream:
        return await exchange(stream, "GET", path, headers=[
            ("Host", f"127.0.0.1:{gw.port}"), ("Authorization", f"Bearer {ADMIN}"),
            *UPGRADE_HEADERS, ("Sec-WebSocket-Protocol", V5)])


async def _get_then_spdy_retry(gw: GatewayUnderTest, path: str) -> list[Any]:
    """kubectl's two attempts (§9): the WebSocket GET, then the SPDY POST of the same URL."""
    get = await _ask_upgrade(gw, path)
    post = await gw.rest("POST", path, token=ADMIN, headers=SPDY_HEADERS)
    return [get, post]


async def test_the_apiservers_rbac_refusal_is_a_refused_upgrade_for_the_get_and_its_retry(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    pods = [FakePod("web", containers=(FakeContainer("app"),))]
    with FakeApiServer(pods=pods, tokens={"gw-token": FakeUser("podterm-gateway")},
                       deny=["podterm-gateway"]) as api:
        gw = await _kube_gateway(make_gateway, tmp_path, api)
        path = exec_path(["echo", "hi"], pod="web", container="app", stderr=True, stdout=True)
        with trio.fail_after(WAIT_S):
            answers = await _get_then_spdy_retry(gw, path)
            # The retry was answered once: a later SPDY POST is just a SPDY client.
            later = await gw.rest("POST", path, token=ADMIN, headers=SPDY_HEADERS)
        requests = api.requests
        execs = api.execs
    for answer in answers:  # no 101: the apiserver's code and Status, word for word
        assert answer.status == 403, answer.body
        body = status_of(answer)
        assert body["reason"] == "Forbidden"
        assert body["message"] == ('pods "web" is forbidden: User "podterm-gateway" cannot get '
                                   'resource "pods/exec" in API group "" in the namespace '
                                   '"default"')
        assert body["details"] == {"name": "web", "kind": "pods"}
    assert later.status == 400 and "KUBECTL_REMOTE_COMMAND_WEBSOCKETS" in status_of(later)[
        "message"]
    # The apiserver was asked once (the GET's dial); the POST was answered from memory.
    assert [r.status for r in requests if r.path.endswith("/exec")] == [403]
    assert execs == [] and len(gw.registry) == 0


# (status injected by the fake for the exec upgrade only) -> (code, reason, message) answered
APISERVER_REFUSALS = [
    # A pod that vanished between kubectl's GET of it and the upgrade.
    ((404, 'pods "web" not found'), (404, "NotFound", 'pods "web" not found')),
    ((400, "pod web does not have a host assigned"),
     (400, "BadRequest", "pod web does not have a host assigned")),
    # The apiserver refused the *gateway's* credential: not the user's fault,
    # and never "Unauthorized" (kubectl would tell the user to log in again).
    ((401, "Unauthorized"), (502, "InternalError", "Unauthorized: the apiserver rejected "
                                                   "the gateway's credentials")),
]


@pytest.mark.parametrize(("injected", "expected"), APISERVER_REFUSALS)
async def test_an_apiserver_refusal_of_the_exec_reaches_kubectl_before_any_101(
        make_gateway: GatewayFactory, tmp_path: Path, fake_apiserver: FakeApiServer,
        injected: tuple[int, str], expected: tuple[int, str, str]) -> None:
    gw = await _kube_gateway(make_gateway, tmp_path, fake_apiserver)
    fake_apiserver.refuse_upgrades(1, *injected)
    path = exec_path(["true"], pod="web", stdout=True)
    with trio.fail_after(WAIT_S):
        pod = await gw.rest("GET", "/api/v1/namespaces/default/pods/web", token=ADMIN)
        answers = await _get_then_spdy_retry(gw, path)
    assert pod.status == 200  # kubectl's GET of the pod found it
    code, reason, message = expected
    for answer in answers:
        assert answer.status == code, answer.body
        body = status_of(answer)
        assert body["reason"] == reason and body["message"].startswith(message), body
    assert fake_apiserver.execs == [] and len(gw.registry) == 0


async def test_an_apiserver_that_does_not_answer_the_upgrade_in_time_is_a_504(
        make_gateway: GatewayFactory, tmp_path: Path, fake_apiserver: FakeApiServer) -> None:
    # The bound is the gateway's handshake timeout; the fake holds its 101 longer.
    gw = await _kube_gateway(make_gateway, tmp_path, fake_apiserver,
                             limits=LimitsConfig(handshake_timeout_s=1.0))
    fake_apiserver.set_delays(upgrade_delay_s=3.0)
    path = exec_path(["true"], pod="web", stdout=True)
    with trio.fail_after(WAIT_S):
        start = trio.current_time()
        answers = await _get_then_spdy_retry(gw, path)
        elapsed = trio.current_time() - start
    assert elapsed < 2.9  # answered at the gateway's deadline, not the apiserver's 101
    for answer in answers:
        assert answer.status == 504, answer.body
        body = status_of(answer)
        assert body["reason"] == "Timeout"
        assert body["message"] == ("the podterm gateway could not start the exec in pod "
                                   "default/web within 1 s: its upstream did not answer in time")
    assert len(gw.registry) == 0


@pytest.mark.parametrize("first", [(100, 30), (80, 24)])
async def test_a_kube_tty_session_sends_the_apiserver_only_the_clients_sizes(
        make_gateway: GatewayFactory, tmp_path: Path, fake_apiserver: FakeApiServer,
        first: tuple[int, int]) -> None:
    # The upstream is opened without a size of the gateway's; the client's
    # first size is the terminal's first, even when it is 80x24 (the size a
    # session reports before it knows one).
    gw = await _kube_gateway(make_gateway, tmp_path, fake_apiserver)
    with trio.fail_after(WAIT_S):
        k = await k8s_connect(gw, exec_path(["cat"], pod="web", stdin=True, stdout=True,
                                            tty=True))
        await k.send(4, b'{"Width":%d,"Height":%d}\n' % first)
        # (The kube upstream sends the latest pending size: one at a time here.)
        await trio.to_thread.run_sync(lambda: fake_apiserver.wait_exec(
            0, until=lambda log: bool(log.resizes), timeout=WAIT_S))
        await k.send(4, b'{"Width":120,"Height":40}\n')
        await k.send(0, b"\x04")  # Ctrl-D: cat reads EOF from its terminal
        assert await k.wait_closed() == 1000
        log = await trio.to_thread.run_sync(lambda: fake_apiserver.wait_exec(0, timeout=WAIT_S))
    assert log.tty and log.exit_code == 0
    assert log.resizes == (first, (120, 40))


# ------------------------------------------------------------------ RefusalMemory


def _refusal(message: str) -> KubeStatusError:
    return KubeStatusError(403, "Forbidden", message, {"name": "p", "kind": "pods"})


async def test_a_remembered_refusal_is_handed_out_once_for_its_user_and_target() -> None:
    memory = RefusalMemory(ttl_s=30.0)
    memory.remember("alice", "/x?command=a", _refusal("no"), now=0.0)
    assert memory.recall("bob", "/x?command=a", now=1.0) is None  # another user
    assert memory.recall("alice", "/x?command=b", now=1.0) is None  # another command
    got = memory.recall("alice", "/x?command=a", now=1.0)
    assert got is not None
    assert (got.http_status, got.reason, got.message, got.details) == (
        403, "Forbidden", "no", {"name": "p", "kind": "pods"})
    assert memory.recall("alice", "/x?command=a", now=1.0) is None  # once
    assert len(memory) == 0


async def test_refusals_expire_and_the_memory_is_bounded() -> None:
    memory = RefusalMemory(ttl_s=10.0, max_entries=2)
    memory.remember("alice", "/a", _refusal("a"), now=0.0)
    assert memory.recall("alice", "/a", now=10.0) is None  # expired
    for n, target in enumerate(("/1", "/2", "/3")):
        memory.remember("alice", target, _refusal(target), now=float(n))
    assert len(memory) == 2
    assert memory.recall("alice", "/1", now=3.0) is None  # the oldest went first
    third = memory.recall("alice", "/3", now=3.0)
    assert third is not None and third.message == "/3"


async def test_a_refusal_that_is_not_a_kube_status_keeps_its_code_and_headers() -> None:
    class Throttled(UpstreamError):
        http_status = 429
        reason_name = "TooManyRequests"

    exc = Throttled("slow down")
    exc.headers = [("Retry-After", "3")]  # type: ignore[attr-defined]
    status = KubeStatusError.of(exc)
    assert (status.http_status, status.reason, status.message, status.headers) == (
        429, "TooManyRequests", "slow down", [("Retry-After", "3")])
    with pytest.raises(ValueError):
        RefusalMemory(ttl_s=0)


async def test_the_exec_upgrade_answer_carries_the_request_id_of_its_audit_events(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ADMIN},alice,u-alice,"podterm:admins"\n')
    memory = MemorySink()
    gw = await make_gateway(auth=AuthConfig(token_file=str(tokens)),
                            options={"audit_sink": memory})
    headers = [("Host", f"127.0.0.1:{gw.port}"), ("Authorization", f"Bearer {ADMIN}"),
               ("Connection", "Upgrade"), ("Upgrade", "websocket"),
               ("Sec-WebSocket-Version", "13"),
               ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode()),
               ("Sec-WebSocket-Protocol", V5)]
    with trio.fail_after(WAIT_S):
        async with await trio.open_tcp_stream("127.0.0.1", gw.port) as stream:
            answer = await exchange(stream, "GET", exec_path(["true"], stdout=True),
                                    headers=headers)
            assert answer.status == 101
        created = await memory.wait_for("session.create")
    request_id = answer.headers.get("x-request-id")
    assert request_id and created[0].request_id == request_id
