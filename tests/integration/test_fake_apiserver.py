"""The fake kube-apiserver is faithful: the real clients, pointed straight at it, work.

Before podterm is put between kubectl and the fake (issue 4), this file shows
the fake itself speaks the wire protocol of spec/k8s-exec-protocol.md to:

- the real kubectl: the Cloud SDK dispatcher and every versioned binary
  1.30-1.33 (a missing binary fails the test, it is never skipped);
- the official Python client (``kubernetes.stream.stream``), over v5 and v4;
- a plain ``websockets`` client for what those two never send (base64
  subprotocols, split resize JSON, fragments, pings, impersonation).

Every subprocess and every wait is bounded (30 s per kubectl run, 10 s per wait).
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import json
import os
import select
import signal
import ssl
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets.sync.client
from kubernetes import client as kclient
from kubernetes.stream import stream
from tests.helpers.fake_apiserver import (
    SUCCESS_STATUS,
    Deny,
    FakeApiServer,
    FakeContainer,
    FakePod,
    FakeUser,
    Mode,
    Subprotocol,
    exit_status,
)
from tests.helpers.kubectl import (
    SUPPORTED_MINORS,
    Kubectl,
    KubectlNotFound,
    kubectl_binary,
)
from tests.helpers.procs import stop
from websockets.exceptions import ConnectionClosed, InvalidStatus

TOKEN = "alice-token"
BOB_TOKEN = "bob-token"
GATEWAY_TOKEN = "gateway-token"
WAIT_S = 10.0
KUBECTLS = ["dispatcher", *SUPPORTED_MINORS]
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _users() -> dict[str, FakeUser]:
    return {TOKEN: FakeUser("alice", ("devs",)), BOB_TOKEN: FakeUser("bob"),
            GATEWAY_TOKEN: FakeUser("podterm-gateway", can_impersonate=True)}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(tokens=_users(), deny=["bob"]) as server:
        yield server


@pytest.fixture(params=KUBECTLS)
def kubectl_bin(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(version label, binary path); a missing binary is a failure with the reason."""
    try:
        return request.param, kubectl_binary(request.param)
    except KubectlNotFound as exc:
        pytest.fail(str(exc))


def kubectl_for(tmp_path: Path, api: FakeApiServer, token: str | None = TOKEN,
                name: str = "kubectl", **kwargs: Any) -> Kubectl:
    return Kubectl(tmp_path / name, server_url=api.url, ca_pem=api.ca_pem, token=token,
                   **kwargs)


def expected_user_agent_version(label: str, minor: str = "32") -> str:
    """The version in the User-Agent of whichever binary actually made the request."""
    # The dispatcher runs kubectl.1.<server minor>, or for 32 its own built-in 1.32.
    return f"/v1.{minor}." if label == "dispatcher" else f"/v{label}."


# ---------------------------------------------------------------------------
# Real kubectl, each binary
# ---------------------------------------------------------------------------


class TestKubectl:
    def test_echo_prints_hi(self, api: FakeApiServer, kubectl_bin: tuple[str, Path],
                            tmp_path: Path) -> None:
        label, binary = kubectl_bin
        result = kubectl_for(tmp_path, api).run("exec", "mypod", "--", "echo", "hi",
                                                binary=binary)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"hi\n", b""), result
        log = api.wait_exec(0, timeout=WAIT_S)
        assert expected_user_agent_version(label) in (log.header("user-agent") or "")
        assert log.offered_subprotocols == (Subprotocol.V5,)
        assert log.subprotocol == Subprotocol.V5
        assert log.query == (("command", "echo"), ("command", "hi"), ("container", "main"),
                             ("stderr", "true"), ("stdout", "true"))
        assert log.header("authorization") == f"Bearer {TOKEN}"
        assert log.user == log.effective_user == "alice"
        assert (log.stdout, log.exit_code, log.status) == (b"hi\n", 0, SUCCESS_STATUS)
        # Our Close 1000 was answered with kubectl's own Close 1000 (§7.3).
        assert (log.end, log.client_close_code) == ("exited", 1000)

    def test_stdin_round_trips_and_ends_with_ff00(self, api: FakeApiServer,
                                                  kubectl_bin: tuple[str, Path],
                                                  tmp_path: Path) -> None:
        _, binary = kubectl_bin
        result = kubectl_for(tmp_path, api).run("exec", "-i", "mypod", "--", "cat",
                                                binary=binary, input=b"data\n")
        assert (result.returncode, result.stdout) == (0, b"data\n"), result
        log = api.wait_exec(0, timeout=WAIT_S)
        assert log.stdin_requested and not log.tty
        assert ("stdin", "true") in log.query
        assert log.stdin == b"data\n"
        assert all(kind == "binary" for kind, _ in log.stdin_messages)
        # Exactly: the bytes, then the v5 CLOSE signal for channel 0 (§7.1).
        assert log.stdin_closed
        assert [e for e in log.events if e[0] != "stdin"] == [("close_signal", 0)]
        assert log.events[-1] == ("close_signal", 0)
        assert (log.exit_code, log.end, log.client_close_code) == (0, "exited", 1000)

    def test_exit_code_3(self, api: FakeApiServer, kubectl_bin: tuple[str, Path],
                         tmp_path: Path) -> None:
        _, binary = kubectl_bin
        result = kubectl_for(tmp_path, api).run("exec", "mypod", "--", "sh", "-c", "exit 3",
                                                binary=binary)
        assert result.returncode == 3, result
        assert result.stderr == b"command terminated with exit code 3\n", result
        log = api.wait_exec(0, timeout=WAIT_S)
        assert log.exit_code == 3
        assert log.status == exit_status(3)
        assert log.status["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}

    def test_denied_user_gets_forbidden(self, api: FakeApiServer,
                                        kubectl_bin: tuple[str, Path], tmp_path: Path) -> None:
        _, binary = kubectl_bin
        result = kubectl_for(tmp_path, api, token=BOB_TOKEN).run(
            "exec", "mypod", "--", "true", binary=binary)
        assert result.returncode == 1, result
        # The SPDY retry's verdict is what kubectl shows (§9): verb "create".
        assert result.err == ('Error from server (Forbidden): pods "mypod" is forbidden: '
                              'User "bob" cannot create resource "pods/exec" in API group "" '
                              'in the namespace "default"\n'), result
        verdicts = [(r.method, r.status) for r in api.requests if r.path.endswith("/exec")]
        assert verdicts == [("GET", 403), ("POST", 403)]
        assert api.execs == []

    def test_unknown_pod_is_not_found(self, api: FakeApiServer,
                                      kubectl_bin: tuple[str, Path], tmp_path: Path) -> None:
        _, binary = kubectl_bin
        result = kubectl_for(tmp_path, api).run("exec", "nope", "--", "true", binary=binary)
        assert result.returncode == 1, result
        assert result.err == 'Error from server (NotFound): pods "nope" not found\n', result

    def test_tty_runs_in_a_pty_and_resizes(self, api: FakeApiServer,
                                           kubectl_bin: tuple[str, Path],
                                           tmp_path: Path) -> None:
        """``kubectl exec -it`` in a real terminal: sizes reach the PTY, SIGWINCH resizes."""
        _, binary = kubectl_bin
        kc = kubectl_for(tmp_path, api)
        script = "read a; stty size; read b; stty size; echo got:$a:$b; exit 7"
        with KubectlInPty(kc, binary, rows=30, cols=100,
                          args=("exec", "-it", "mypod", "--", "sh", "-c", script)) as term:
            log = api.wait_exec(0, until=lambda x: len(x.resizes) >= 1, timeout=WAIT_S)
            assert log.resizes[0] == (100, 30) and log.tty and not log.stderr_requested
            term.write(b"one\r")
            term.read_until(b"30 100")
            term.resize(rows=40, cols=120)  # kubectl gets SIGWINCH, sends the new size
            api.wait_exec(0, until=lambda x: (120, 40) in x.resizes, timeout=WAIT_S)
            term.write(b"two\r")
            term.read_until(b"got:one:two")
            assert term.wait() == 7, term.output
        assert b"40 120" in term.output
        log = api.wait_exec(0, timeout=WAIT_S)
        assert log.stdin == b"one\rtwo\r"
        assert not log.stdin_closed  # with a TTY kubectl never sends FF 00 (§7.1)
        assert (log.exit_code, log.end, log.client_close_code) == (7, "exited", 1000)


@pytest.mark.parametrize("minor", ["30", "31", "33"])
def test_dispatcher_runs_the_binary_matching_version_minor(minor: str, tmp_path: Path) -> None:
    with FakeApiServer(tokens=_users(), minor=minor) as api:
        result = kubectl_for(tmp_path, api).run("exec", "mypod", "--", "echo", "hi")
        assert (result.returncode, result.stdout) == (0, b"hi\n"), result
        version_request = api.requests[0]
        assert version_request.path == "/version"
        assert (version_request.header("user-agent") or "").startswith("kubectl-dispatcher/")
        log = api.wait_exec(0, timeout=WAIT_S)
        assert expected_user_agent_version("dispatcher", minor) in (log.header("user-agent") or "")


def test_kubectl_bad_token_is_unauthorized(api: FakeApiServer, tmp_path: Path) -> None:
    result = kubectl_for(tmp_path, api, token="wrong").run("exec", "mypod", "--", "true")
    assert result.returncode == 1, result
    assert result.err.endswith("error: You must be logged in to the server (the server has "
                               "asked for the client to provide credentials)\n"), result
    assert {r.status for r in api.requests} == {401}


def test_kubectl_unknown_container_is_bad_request(api: FakeApiServer, tmp_path: Path) -> None:
    result = kubectl_for(tmp_path, api).run("exec", "mypod", "-c", "foo", "--", "true")
    assert result.returncode == 1, result
    assert result.err == ("Error from server (BadRequest): container foo is not valid "
                          "for pod mypod\n"), result


def test_kubectl_uses_default_container_annotation(tmp_path: Path) -> None:
    pod = FakePod("multi", containers=(FakeContainer("main"), FakeContainer("side")),
                  default_container="side")
    with FakeApiServer(tokens=_users(), pods=[pod]) as api:
        result = kubectl_for(tmp_path, api).run("exec", "multi", "--", "true")
        assert result.returncode == 0, result
        assert api.wait_exec(0, timeout=WAIT_S).container == "side"


def test_kubectl_attach(tmp_path: Path) -> None:
    pod = FakePod("att", containers=(FakeContainer("main", stdin=True,
                                                   attach_command=("sh",)),))
    with FakeApiServer(tokens=_users(), pods=[pod]) as api:
        result = kubectl_for(tmp_path, api).run("attach", "-i", "att",
                                                input=b"echo attached; exit 5\n")
        # attach carries no exit code: Success when the process ends (§12).
        assert (result.returncode, result.stdout) == (0, b"attached\n"), result
        log = api.wait_exec(0, timeout=WAIT_S)
        assert (log.kind, log.command, log.status) == ("attach", (), SUCCESS_STATUS)
        assert log.stdin_closed


def test_kubectl_client_certificate(api: FakeApiServer, tmp_path: Path) -> None:
    cert = api.issue_client_cert("carol", groups=["ops"])
    result = kubectl_for(tmp_path, api, token=None, client_cert=cert).run(
        "exec", "mypod", "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), result
    log = api.wait_exec(0, timeout=WAIT_S)
    assert log.user == "carol" and log.header("authorization") is None


def test_kubectl_against_legacy_mode_is_refused(tmp_path: Path) -> None:
    """``--mode legacy`` answers a v5-only offer 403 (empty), then the SPDY POST 400 (§3.4, §10)."""
    with FakeApiServer(tokens=_users(), mode=Mode.LEGACY) as api:
        result = kubectl_for(tmp_path, api).run("exec", "mypod", "--", "true")
        assert result.returncode == 1, result
        assert result.err.startswith("Error from server (BadRequest): this fake "
                                     "kube-apiserver speaks exec/attach over WebSocket only"), result
        verdicts = [(r.method, r.status) for r in api.requests if r.path.endswith("/exec")]
        assert verdicts == [("GET", 403), ("POST", 400)]


def test_refused_upgrades_then_recovery(api: FakeApiServer, tmp_path: Path) -> None:
    api.refuse_upgrades(1, 503)
    kc = kubectl_for(tmp_path, api)
    refused = kc.run("exec", "mypod", "--", "echo", "hi")
    assert refused.returncode == 1, refused
    assert refused.err == ("Error from server (ServiceUnavailable): the server is currently "
                           "unable to handle the request\n"), refused
    ok = kc.run("exec", "mypod", "--", "echo", "hi")
    assert (ok.returncode, ok.stdout) == (0, b"hi\n"), ok
    verdicts = [(r.method, r.status) for r in api.requests if r.path.endswith("/exec")]
    assert verdicts == [("GET", 503), ("POST", 503), ("GET", 101)]


def test_drop_connections_mid_session(api: FakeApiServer, tmp_path: Path) -> None:
    kc = kubectl_for(tmp_path, api)
    proc = subprocess.Popen(kc.argv("exec", "-i", "mypod", "--", "cat"), env=kc.env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"before\n")
        proc.stdin.flush()
        api.wait_exec(0, until=lambda x: x.stdout == b"before\n", timeout=WAIT_S)
        assert api.drop_connections() == 1
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1, err
    assert b"1006" in err or b"EOF" in err or b"reset" in err, err
    log = api.wait_exec(0, timeout=WAIT_S)
    assert (log.end, log.status, log.client_close_code) == ("dropped", None, None)


# ---------------------------------------------------------------------------
# The official Python client (spec §14)
# ---------------------------------------------------------------------------


@pytest.fixture(params=[Mode.CURRENT, Mode.LEGACY], ids=["v5", "v4"])
def py_api(request: pytest.FixtureRequest) -> Iterator[tuple[FakeApiServer, kclient.CoreV1Api]]:
    """A fake in each mode and a CoreV1Api for it: v5 is chosen in current mode, v4 in legacy."""
    with FakeApiServer(tokens=_users(), mode=request.param) as server:
        config = kclient.Configuration(host=server.url, ssl_ca_cert=str(server.ca_path),
                                       api_key={"authorization": TOKEN},
                                       api_key_prefix={"authorization": "Bearer"})
        with kclient.ApiClient(config) as api_client:
            yield server, kclient.CoreV1Api(api_client)


def _run_py(core: kclient.CoreV1Api, command: list[str], *, stdin: bytes | None = None,
            pod: str = "mypod") -> tuple[str, str, int | None]:
    # _preload_content=False so the socket can be closed (the preloading path leaks it).
    ws = stream(core.connect_get_namespaced_pod_exec, pod, "default", command=command,
                stdin=stdin is not None, stdout=True, stderr=True, tty=False,
                _preload_content=False, _request_timeout=WAIT_S)
    try:
        if stdin is not None:
            ws.write_stdin(stdin.decode())
            ws.close_channel(0)  # FF 00 with v5; a no-op with v4
        ws.run_forever(timeout=WAIT_S)
        return ws.read_stdout(), ws.read_stderr(), ws.returncode
    finally:
        ws.close()
        # The server closed first, so websocket-client's close() returned early
        # and left the socket open (send_close() already cleared `connected`).
        if ws.sock is not None:
            ws.sock.shutdown()


def _expected_protocol(server: FakeApiServer) -> str:
    return Subprotocol.V5 if server.mode is Mode.CURRENT else Subprotocol.V4


def test_python_client_echo(py_api: tuple[FakeApiServer, kclient.CoreV1Api]) -> None:
    server, core = py_api
    assert _run_py(core, ["sh", "-c", "echo hi; echo err >&2"]) == ("hi\n", "err\n", 0)
    log = server.wait_exec(0, timeout=WAIT_S)
    assert log.offered_subprotocols == (Subprotocol.V5, Subprotocol.V4)
    assert log.subprotocol == _expected_protocol(server)
    assert log.header("authorization") == f"Bearer {TOKEN}"
    # Python >= 36 sends all four flags; no container (the only one is used).
    assert dict(log.query)["stdin"] == "false" and "container" not in dict(log.query)


def test_python_client_stdin(py_api: tuple[FakeApiServer, kclient.CoreV1Api]) -> None:
    server, core = py_api
    # v4 has no stdin EOF (§7.2): read exactly 5 bytes instead of cat.
    assert _run_py(core, ["head", "-c", "5"], stdin=b"data\n") == ("data\n", "", 0)
    log = server.wait_exec(0, timeout=WAIT_S)
    assert log.stdin == b"data\n"
    assert log.stdin_messages == (("text", b"data\n"),)  # a str is written as a text frame
    assert log.stdin_closed is (server.mode is Mode.CURRENT)


def test_python_client_exit_code(py_api: tuple[FakeApiServer, kclient.CoreV1Api]) -> None:
    server, core = py_api
    assert _run_py(core, ["sh", "-c", "exit 3"])[2] == 3
    assert server.wait_exec(0, timeout=WAIT_S).status == exit_status(3)


def test_python_client_not_found(py_api: tuple[FakeApiServer, kclient.CoreV1Api]) -> None:
    _, core = py_api
    with pytest.raises(kclient.ApiException) as info:
        _run_py(core, ["true"], pod="nope")
    assert info.value.status == 0
    assert "Handshake status 404" in str(info.value.reason)
    assert '"reason":"NotFound"' in str(info.value.reason)


# ---------------------------------------------------------------------------
# A plain WebSocket client: what neither kubectl nor the Python client sends
# ---------------------------------------------------------------------------


def _ssl_context(api: FakeApiServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(api.ca_path))


def _ws_connect(api: FakeApiServer, query: str, *, subprotocols: list[str] | None,
                headers: dict[str, str] | None = None, pod: str = "mypod",
                kind: str = "exec", token: str = TOKEN) -> Any:
    url = f"wss://127.0.0.1:{api.port}/api/v1/namespaces/default/pods/{pod}/{kind}?{query}"
    return websockets.sync.client.connect(
        url, ssl=_ssl_context(api), subprotocols=subprotocols,  # type: ignore[arg-type]
        additional_headers={"Authorization": f"Bearer {token}", **(headers or {})},
        compression=None, open_timeout=WAIT_S, close_timeout=WAIT_S)


def _read_all(ws: Any) -> list[bytes | str]:
    messages: list[bytes | str] = []
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            messages.append(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        except ConnectionClosed:
            return messages


def _http_get(api: FakeApiServer, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, context=_ssl_context(api),
                                       timeout=WAIT_S)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        body = response.read()
        assert response.getheader("content-type") == "application/json"
        return response.status, json.loads(body)
    finally:
        conn.close()


def test_discovery_pod_and_errors_over_https(api: FakeApiServer) -> None:
    assert _http_get(api, "/version", token=None)[1]["minor"] == "32"
    assert _http_get(api, "/api")[1]["versions"] == ["v1"]
    assert _http_get(api, "/apis")[1] == {"kind": "APIGroupList", "apiVersion": "v1",
                                          "groups": []}
    resources = {r["name"] for r in _http_get(api, "/api/v1")[1]["resources"]}
    assert {"pods", "pods/exec", "pods/attach"} <= resources
    status, pod = _http_get(api, "/api/v1/namespaces/default/pods/mypod")
    assert (status, pod["kind"], pod["apiVersion"]) == (200, "Pod", "v1")
    assert pod["spec"]["containers"][0]["name"] == "main"
    assert _http_get(api, "/api/v1/namespaces/default/pods/nope") == (404, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "nope" not found', "reason": "NotFound",
        "details": {"name": "nope", "kind": "pods"}, "code": 404})
    assert _http_get(api, "/api", token=None) == (401, {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    status, body = _http_get(api, "/no/such/path")
    assert (status, body["reason"], body["code"]) == (404, "NotFound", 404)
    status, body = _http_get(api, "/api/v1/namespaces/default/pods/mypod/exec?command=true"
                                  "&stdout=true")
    assert (status, body["message"]) == (400, "Upgrade request required")


@pytest.mark.parametrize(("mode", "offered", "chosen"), [
    (Mode.CURRENT, [Subprotocol.V5, Subprotocol.V4], Subprotocol.V5),
    (Mode.CURRENT, [Subprotocol.V4], Subprotocol.V4),
    (Mode.CURRENT, [Subprotocol.V1_BASE64, Subprotocol.V4], Subprotocol.V1_BASE64),
    (Mode.LEGACY, [Subprotocol.V5, Subprotocol.V4], Subprotocol.V4),
    (Mode.LEGACY, [Subprotocol.V5], 403),
    (Mode.CURRENT, ["bogus.k8s.io"], 403),
    (Mode.CURRENT, None, None),  # no subprotocol: accepted as channel.k8s.io (§3.4)
])
def test_subprotocol_negotiation(mode: Mode, offered: list[str] | None,
                                 chosen: str | int | None) -> None:
    with FakeApiServer(tokens=_users(), mode=mode) as api:
        query = "command=sh&command=-c&command=exit+3&stdout=true"
        if chosen == 403:
            with pytest.raises(InvalidStatus) as info:
                _ws_connect(api, query, subprotocols=offered)
            assert (info.value.response.status_code, info.value.response.body) == (403, b"")
            return
        with _ws_connect(api, query, subprotocols=offered) as ws:
            assert ws.subprotocol == chosen
            messages = _read_all(ws)
        log = api.wait_exec(0, timeout=WAIT_S)
        assert log.subprotocol == chosen and log.exit_code == 3
        if chosen in (Subprotocol.V5, Subprotocol.V4):
            assert messages == [b"\x01", b"\x03" + json.dumps(
                exit_status(3), separators=(",", ":")).encode()]
        elif chosen == Subprotocol.V1_BASE64:
            text = base64.b64encode(b"command terminated with exit code 3").decode()
            assert messages == ["1", "3" + text]
        else:  # channel.k8s.io: error text on channel 3 (§4.4)
            assert messages == [b"\x01", b"\x03command terminated with exit code 3"]


def test_base64_stdin_and_output() -> None:
    with FakeApiServer(tokens=_users()) as api:
        with _ws_connect(api, "command=head&command=-c&command=4&stdin=true&stdout=true",
                         subprotocols=[Subprotocol.V4_BASE64]) as ws:
            ws.send("0" + base64.b64encode(b"foo\n").decode())
            messages = _read_all(ws)
        assert messages[:2] == ["1", "1Zm9vCg=="]
        assert messages[2] == "3" + base64.b64encode(b'{"metadata":{},"status":"Success"}').decode()
        assert api.wait_exec(0, timeout=WAIT_S).stdin == b"foo\n"


def test_fragmented_stdin_ping_and_ff00() -> None:
    with FakeApiServer(tokens=_users()) as api:
        with _ws_connect(api, "command=cat&stdin=true&stdout=true&stderr=true",
                         subprotocols=[Subprotocol.V5]) as ws:
            assert ws.recv(timeout=WAIT_S) == b"\x01"
            assert ws.ping(b"p").wait(WAIT_S)  # answered by a Pong
            ws.send([b"\x00da", b"ta\n"])  # one message in two frames
            ws.send(b"\xff\x00")
            messages = _read_all(ws)
        assert messages == [b"\x01data\n", b'\x03{"metadata":{},"status":"Success"}']
        log = api.wait_exec(0, timeout=WAIT_S)
        assert (log.stdin, log.stdin_closed, log.pings) == (b"data\n", True, 1)
        assert log.client_close_code == 1000


def test_resize_stream_case_insensitive_and_split() -> None:
    with FakeApiServer(tokens=_users()) as api:
        with _ws_connect(api, "command=sh&command=-c&command=read+x;stty+size"
                              "&stdin=true&stdout=true&tty=true",
                         subprotocols=[Subprotocol.V5]) as ws:
            # One object split over two messages, lower/upper case keys, a zero size,
            # sent as text frames like a Python client user might (§6).
            ws.send('\x04{"width": 132,')
            ws.send('\x04 "HEIGHT": 43}{"Width":0,"Height":0}')
            api.wait_exec(0, until=lambda x: len(x.resizes) == 2, timeout=WAIT_S)
            ws.send("\x00go\r")
            output = b"".join(m for m in _read_all(ws) if isinstance(m, bytes)
                              and m[:1] == b"\x01")
        assert b"43 132" in output
        log = api.wait_exec(0, timeout=WAIT_S)
        assert log.resizes == ((132, 43), (0, 0))
        assert log.stdin_messages == (("text", b"go\r"),)


def test_multiple_containers_need_a_name() -> None:
    pod = FakePod("multi", containers=(FakeContainer("main"), FakeContainer("sidecar")))
    with FakeApiServer(tokens=_users(), pods=[pod]) as api:
        with pytest.raises(InvalidStatus) as info:
            _ws_connect(api, "command=true&stdout=true", pod="multi",
                        subprotocols=[Subprotocol.V5])
        body = json.loads(info.value.response.body)
        assert (info.value.response.status_code, body["message"]) == (
            400, "a container name must be specified for pod multi, "
                 "choose one of: [main sidecar]")


def test_impersonation_is_recorded_and_authorized() -> None:
    deny = [Deny(user="bob", resource="pods/exec")]
    with FakeApiServer(tokens=_users(), deny=deny) as api:
        query = "command=true&stdout=true"
        with _ws_connect(api, query, subprotocols=[Subprotocol.V5], token=GATEWAY_TOKEN,
                         headers={"Impersonate-User": "carol",
                                  "Impersonate-Group": "devs"}) as ws:
            _read_all(ws)
        log = api.wait_exec(0, timeout=WAIT_S)
        assert (log.user, log.effective_user) == ("podterm-gateway", "carol")
        assert (log.impersonate_user, log.impersonate_groups) == ("carol", ("devs",))
        with pytest.raises(InvalidStatus) as info:
            _ws_connect(api, query, subprotocols=[Subprotocol.V5], token=GATEWAY_TOKEN,
                        headers={"Impersonate-User": "bob"})
        assert json.loads(info.value.response.body)["message"] == (
            'pods "mypod" is forbidden: User "bob" cannot get resource "pods/exec" '
            'in API group "" in the namespace "default"')
        with pytest.raises(InvalidStatus) as info:
            _ws_connect(api, query, subprotocols=[Subprotocol.V5],
                        headers={"Impersonate-User": "carol"})
        assert json.loads(info.value.response.body)["message"] == (
            'users "carol" is forbidden: User "alice" cannot impersonate resource "users" '
            'in API group "" at the cluster scope')


def test_drop_on_stdin_marker_cuts_without_close() -> None:
    with FakeApiServer(tokens=_users(), drop_on_stdin=b"CUT") as api:
        with _ws_connect(api, "command=cat&stdin=true&stdout=true",
                         subprotocols=[Subprotocol.V5]) as ws:
            ws.send(b"\x00hello\n")
            assert ws.recv(timeout=WAIT_S) == b"\x01"
            assert ws.recv(timeout=WAIT_S) == b"\x01hello\n"
            ws.send(b"\x00...CUT")
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=WAIT_S)
            assert info.value.rcvd is None  # no Close frame: the TCP connection died
        log = api.wait_exec(0, timeout=WAIT_S)
        assert (log.end, log.stdin) == ("dropped", b"hello\n...CUT")


def test_upgrade_delay_is_applied() -> None:
    with FakeApiServer(tokens=_users()) as api:
        api.set_delays(upgrade_delay_s=0.3)
        started = time.monotonic()
        with _ws_connect(api, "command=true&stdout=true", subprotocols=[Subprotocol.V5]) as ws:
            assert time.monotonic() - started >= 0.3
            assert _read_all(ws)[-1] == b'\x03{"metadata":{},"status":"Success"}'


# ---------------------------------------------------------------------------
# Run as a process
# ---------------------------------------------------------------------------


def test_serve_subprocess(tmp_path: Path) -> None:
    ready_file, log_file = tmp_path / "ready.json", tmp_path / "execs.jsonl"
    stderr_file = tmp_path / "stderr.log"
    with stderr_file.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.fake_apiserver", "serve", "--port", "0",
             "--ready-file", str(ready_file), "--log-file", str(log_file),
             "--token", f"{TOKEN}=alice:devs", "--pod", "web:app"],
            cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            start_new_session=True)
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 30)
        assert readable, "the fake did not report its port within 30 s"
        ready = json.loads(proc.stdout.readline())
        assert json.loads(ready_file.read_text()) == ready
        kc = Kubectl(tmp_path / "kubectl", server_url=ready["url"],
                     ca_pem=Path(ready["ca_path"]).read_bytes(), token=TOKEN)
        result = kc.run("exec", "web", "--", "echo", "hi")
        assert (result.returncode, result.stdout) == (0, b"hi\n"), result
    finally:
        status = stop(proc, 30, group=True)
    assert status == 0, stderr_file.read_text(errors="replace")
    (entry,) = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert (entry["container"], entry["stdout"], entry["end"]) == ("app", "hi\n", "exited")


# ---------------------------------------------------------------------------
# kubectl in a real terminal
# ---------------------------------------------------------------------------


class KubectlInPty:
    """kubectl with a PTY as its controlling terminal, driven like a user at a keyboard."""

    def __init__(self, kc: Kubectl, binary: Path, *, rows: int, cols: int,
                 args: tuple[str, ...]) -> None:
        self.kc, self.binary, self.args = kc, binary, args
        self.rows, self.cols = rows, cols
        self.output = b""
        self.master = -1
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> KubectlInPty:
        self.master, slave = os.openpty()
        self._set_size(slave, self.rows, self.cols)
        try:
            self.proc = subprocess.Popen(
                self.kc.argv(*self.args, binary=self.binary), env=self.kc.env(),
                stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                preexec_fn=_take_controlling_tty)
        finally:
            os.close(slave)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(WAIT_S)
        os.close(self.master)

    @staticmethod
    def _set_size(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def resize(self, *, rows: int, cols: int) -> None:
        # Resizing the terminal makes the kernel send SIGWINCH to kubectl.
        self._set_size(self.master, rows, cols)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read_some(self, deadline: float) -> bool:
        readable, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: kubectl exited and closed the terminal
            return False
        self.output += data
        return bool(data)

    def read_until(self, needle: bytes) -> None:
        deadline = time.monotonic() + WAIT_S
        while needle not in self.output:
            if not self._read_some(deadline):
                raise AssertionError(f"{needle!r} not seen; terminal shows {self.output!r}")

    def wait(self) -> int:
        """Read the terminal until kubectl exits; its exit code."""
        assert self.proc is not None
        deadline = time.monotonic() + WAIT_S
        while self._read_some(deadline):
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))


def _take_controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
