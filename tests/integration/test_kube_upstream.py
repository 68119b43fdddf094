"""The kube upstream against the fake kube-apiserver, through a real gateway (issue 4).

The chain under test::

    podterm.v1 client (REST + attach)  ─┐
    k8s exec client (v5, as kubectl)   ─┴─ gateway ── kube upstream ══wss══ FakeApiServer ── process

The fake (``tests/helpers/fake_apiserver.py``) is an independent peer: the
``websockets`` library's framing, its own channel code, real local processes.
It records every exec -- the subprotocol, query, headers, *every* stdin byte,
every resize, ``FF 00``, pings, how it ended -- and the tests assert that
it received exactly what the user sent.  Its kubeconfig (URL, CA, token) is
written the way a user's would be and loaded with the official client's
loader.

Waits are event-driven (the fake's ``wait_exec`` in a thread, output
predicates, the breaker's ``wait_transitions``); every one is bounded.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from tests.helpers.fake_apiserver import ExecLog, FakeApiServer, FakePod, FakeUser
from tests.helpers.kubectl import write_kubeconfig

from conftest import GatewayUnderTest, ProtoClient
from podterm.auth.identity import Identity
from podterm.config import AuthConfig, ListenConfig, ServeConfig, SessionsConfig, UpstreamConfig
from podterm.errors import ConfigError
from podterm.gateway.server import Gateway, GatewayOptions, serve
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, connect
from podterm.resilience.breaker import BreakerState
from podterm.session.session import SessionLimits
from podterm.upstream.base import OutputChannel, StreamSpec
from podterm.upstream.kube import (
    KubeApiError,
    KubeStream,
    KubeUpstream,
    KubeUpstreamOptions,
    UpstreamLost,
    UpstreamUnavailable,
    acting_as,
    exec_argv,
    exec_target,
)
from podterm.upstream.kubeconfig import load_credentials, load_incluster, load_kubeconfig
from podterm.upstream.local import LocalUpstream

pytestmark = pytest.mark.trio

WAIT_S = 10.0
GW_TOKEN = "gw-sa-token"  # the gateway's credential at the fake apiserver
ALICE = "alice-token"  # a podterm user (token file), in podterm:admins
V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
OSC7 = r'printf "\033]7;file://%s\007" "$PWD"'


# ------------------------------------------------------------------ fixtures


def _fake(mode: str = "current") -> FakeApiServer:
    return FakeApiServer(
        pods=[FakePod("mypod")], mode=mode,
        tokens={GW_TOKEN: FakeUser("podterm-gateway", can_impersonate=True),
                "plain-token": FakeUser("plain")},
        close_wait_s=2.0, exit_grace_s=1.0, kill_grace_s=0.5)


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with _fake() as api:
        yield api


@pytest.fixture
def legacy_fake() -> Iterator[FakeApiServer]:
    """An apiserver before 1.30: the kubelet's subprotocols only (v4, no v5)."""
    with _fake("legacy") as api:
        yield api


def kubeconfig_for(api: FakeApiServer, path: Path, *, token: str = GW_TOKEN,
                   **kwargs: Any) -> Path:
    return write_kubeconfig(path, api.url, ca_pem=api.ca_pem, token=token, **kwargs)


def kube_upstream(api: FakeApiServer, tmp_path: Path, **options: Any) -> KubeUpstream:
    creds = load_kubeconfig(kubeconfig_for(api, tmp_path / "gw.kubeconfig"))
    return KubeUpstream(creds, KubeUpstreamOptions(**options), rng=lambda: 0.5)


GatewayStarter = Callable[..., Awaitable[GatewayUnderTest]]


@pytest.fixture
async def start_gateway(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[GatewayStarter]:
    """Start a gateway whose default upstream is the given KubeUpstream; drained at the end."""
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{ALICE},alice,u-alice,"podterm:admins,devs"\n')
    started: list[GatewayUnderTest] = []

    async def start(upstream: KubeUpstream, *,
                    session_limits: SessionLimits | None = None) -> GatewayUnderTest:
        config = ServeConfig(listen=ListenConfig(host="127.0.0.1", port=0),
                             sessions=SessionsConfig(drain_timeout_s=5.0),
                             auth=AuthConfig(token_file=str(tokens)),
                             upstream=UpstreamConfig(kind="kube"))
        options = GatewayOptions(upstreams={"local": LocalUpstream(), "kube": upstream},
                                 session_limits=session_limits, lag_probe_interval_s=0)
        holder: list[GatewayUnderTest] = []

        async def run(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve(config, options=options, task_status=task_status)
            finally:
                if holder:
                    holder[0].finished.set()

        gw = await nursery.start(run)
        handle = GatewayUnderTest(gw)
        handle.admin_token = ALICE  # rest() and attach() default to it
        holder.append(handle)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if not handle.finished.is_set():
            handle.gw.shutdown("test over")
            with trio.fail_after(WAIT_S):
                await handle.finished.wait()
        assert len(handle.gw.registry) == 0, handle.gw.registry.sessions()


async def wait_exec(api: FakeApiServer, index: int,
                    until: Callable[[ExecLog], bool] | None = None) -> ExecLog:
    """The fake's exec ``index`` once ``until`` holds (default: finished), from trio."""
    return await trio.to_thread.run_sync(
        functools.partial(api.wait_exec, index, until=until, timeout=WAIT_S))


async def create(gw: GatewayUnderTest, command: list[str] | None, **fields: Any
                 ) -> dict[str, Any]:
    answer = await gw.rest("POST", "/api/v1/sessions",
                           {"command": command, "pod": "mypod", **fields})
    assert answer.status == 201, answer.body
    return answer.json  # type: ignore[no-any-return]


async def run_to_exit(gw: GatewayUnderTest, command: list[str], **fields: Any) -> ProtoClient:
    created = await create(gw, command, tty=False, **fields)
    client = await gw.attach(created["id"])
    await client.wait_for(lambda c: c.exit is not None)
    await client.wait_closed()
    return client


# ------------------------------------------------------------------ podterm sessions


async def test_echo_hi_runs_in_the_pod_over_v5(fake: FakeApiServer, tmp_path: Path,
                                               start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        client = await run_to_exit(gw, ["echo", "hi"])
        assert bytes(client.output) == b"hi\n"
        assert client.exit is not None and client.exit.code == 0
        log = await wait_exec(fake, 0)
        assert log.subprotocol == V5 and log.offered_subprotocols == (V5, V4)
        assert log.command == ("echo", "hi") and log.container == "main"
        assert dict(log.query) | {"command": "hi"} == {
            "command": "hi", "stdin": "true", "stdout": "true", "stderr": "true",
            "tty": "false"}
        assert log.header("authorization") == f"Bearer {GW_TOKEN}"
        assert log.impersonate_user is None  # impersonation is off by default
        assert log.stdin == b"" and log.resizes == () and not log.stdin_closed
        assert log.end == "exited" and log.client_close_code == 1000


async def test_exit_code_and_stderr_come_back(fake: FakeApiServer, tmp_path: Path,
                                              start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        client = await run_to_exit(gw, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert client.exit is not None and client.exit.code == 3
        assert client.exit.reason == "exited"
        assert b"out\n" in client.output and b"err\n" in client.output
        assert (await wait_exec(fake, 0)).exit_code == 3


async def test_a_failure_status_becomes_an_error_line_and_exit_1(
        fake: FakeApiServer, tmp_path: Path, start_gateway: GatewayStarter) -> None:
    # The command does not exist: the runtime answers with an InternalError
    # Status, not an exit code (§5.1).  kubectl prints "error: <message>", exit 1.
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        client = await run_to_exit(gw, ["no-such-command-here"])
        assert client.exit is not None and client.exit.code == 1
        assert bytes(client.output).startswith(b"error: Internal error occurred: ")
        assert b'"no-such-command-here"' in client.output
        assert (await wait_exec(fake, 0)).end == "start_failed"


async def test_stdin_reaches_the_pod_exactly(fake: FakeApiServer, tmp_path: Path,
                                             start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        created = await create(gw, ["sh", "-c", "read a; read b; echo \"got $a+$b\""], tty=False)
        client = await gw.attach(created["id"])
        await client.wait_hello()
        await client.send_stdin(b"one\n")
        await client.send_stdin(b"two\n")
        await client.wait_for(lambda c: c.exit is not None)
        assert bytes(client.output) == b"got one+two\n"
        await client.wait_closed()
        log = await wait_exec(fake, 0)
        assert log.stdin == b"one\ntwo\n"
        assert all(kind == "binary" for kind, _ in log.stdin_messages)


async def test_resize_reaches_the_pod(fake: FakeApiServer, tmp_path: Path,
                                      start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        created = await create(gw, ["sh"], tty=True, size={"cols": 90, "rows": 20})
        client = await gw.attach(created["id"])
        await client.wait_hello()
        await client.send_resize(132, 43)
        # Resizes travel on channel 4 before later keystrokes (the order the user made them).
        await client.send_stdin(b"stty size\r")
        await client.wait_output(b"43 132")
        await client.send_stdin(b"exit 5\r")
        await client.wait_for(lambda c: c.exit is not None)
        assert client.exit is not None and client.exit.code == 5
        await client.wait_closed()
        log = await wait_exec(fake, 0)
        assert log.tty and dict(log.query)["tty"] == "true" and dict(log.query)["stderr"] == "false"
        assert log.resizes == ((90, 20), (132, 43))  # the create's size, then the resize
        assert log.stdin == b"stty size\rexit 5\r"


async def test_impersonation_sends_the_podterm_user(fake: FakeApiServer, tmp_path: Path,
                                                    start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path, impersonate=True))
        client = await run_to_exit(gw, ["true"])
        assert client.exit is not None and client.exit.code == 0
        log = await wait_exec(fake, 0)
        assert log.user == "podterm-gateway"  # the credential
        assert log.impersonate_user == "alice" and log.effective_user == "alice"
        assert log.impersonate_groups == ("podterm:admins", "devs")


async def test_apiserver_refusals_reach_the_user_verbatim(fake: FakeApiServer, tmp_path: Path,
                                                          start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        missing = await gw.rest("POST", "/api/v1/sessions", {"command": ["true"], "pod": "nope"})
        assert missing.status == 404
        assert missing.json["error"]["message"] == 'pods "nope" not found'
        # A credential that may not impersonate: the apiserver's 403, word for word.
        plain = load_kubeconfig(kubeconfig_for(fake, tmp_path / "plain", token="plain-token"))
        upstream = KubeUpstream(plain, KubeUpstreamOptions(impersonate=True))
        with acting_as(Identity("alice", groups=("devs",))):
            with pytest.raises(KubeApiError) as info:
                await upstream.open(StreamSpec(command=("true",), tty=False, pod="mypod"))
        assert info.value.status == 403 and info.value.http_status == 403
        assert info.value.message == ('users "alice" is forbidden: User "plain" cannot '
                                      'impersonate resource "users" in API group "" at the '
                                      'cluster scope')
        # Refusals prove the apiserver is up: no retry, and the breaker stays closed.
        assert upstream.breaker.state is BreakerState.CLOSED
        assert upstream.statistics().dials == 1
        # A bad gateway credential is not the podterm user's fault: 502, and it says whose.
        bad = KubeUpstream(load_kubeconfig(kubeconfig_for(fake, tmp_path / "bad",
                                                          token="wrong")))
        with pytest.raises(KubeApiError) as info:
            await bad.open(StreamSpec(command=("true",), tty=False, pod="mypod"))
        assert info.value.status == 401 and info.value.http_status == 502
        assert info.value.message.startswith("Unauthorized: the apiserver rejected the "
                                             "gateway's credentials (kubeconfig ")


async def test_v4_fallback_on_an_apiserver_without_v5(legacy_fake: FakeApiServer,
                                                      tmp_path: Path,
                                                      start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        upstream = kube_upstream(legacy_fake, tmp_path)
        gw = await start_gateway(upstream)
        client = await run_to_exit(gw, ["sh", "-c", "echo hi; exit 3"])
        assert bytes(client.output) == b"hi\n"
        assert client.exit is not None and client.exit.code == 3
        log = await wait_exec(legacy_fake, 0)
        assert log.offered_subprotocols == (V5, V4) and log.subprotocol == V4
        assert upstream.statistics().subprotocols == {V4: 1}


async def test_v4_cannot_signal_stdin_eof(legacy_fake: FakeApiServer, tmp_path: Path) -> None:
    # §7.2: v4 has no EOF.  close_stdin sends nothing; the process keeps its stdin.
    with trio.fail_after(WAIT_S):
        upstream = kube_upstream(legacy_fake, tmp_path)
        stream = await upstream.open(StreamSpec(command=("sh", "-c", "read x; echo got $x"),
                                                tty=False, pod="mypod"))
        assert isinstance(stream, KubeStream) and stream.subprotocol == V4
        await stream.send_stdin(b"line\n")
        await stream.close_stdin()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_stdin(b"more")
        assert (await stream.receive_some()) == (OutputChannel.STDOUT, b"got line\n")
        # The exit status is read by the reader (the session's output pump reads to EOF).
        assert (await stream.receive_some()) == (OutputChannel.EOF, b"")
        assert (await stream.wait_exit()).code == 0
        await stream.aclose()
        log = await wait_exec(legacy_fake, 0)
        assert log.stdin == b"line\n" and not log.stdin_closed
        assert not any(kind == "close_signal" for kind, _ in log.events)


async def test_pings_keep_the_apiserver_link_alive(fake: FakeApiServer, tmp_path: Path) -> None:
    with trio.fail_after(WAIT_S):
        upstream = kube_upstream(fake, tmp_path, ping_interval_s=0.05)
        stream = await upstream.open(StreamSpec(command=("cat",), tty=False, pod="mypod"))
        async with trio.open_nursery() as nursery:
            exited = trio.Event()

            async def supervise() -> None:
                assert (await stream.wait_exit()).code == 0  # the waiter sends the pings
                exited.set()

            nursery.start_soon(supervise)
            async def read_to_eof() -> None:
                while (await stream.receive_some())[0] != OutputChannel.EOF:
                    pass

            # Reading: the PONGs are seen, so liveness holds.
            nursery.start_soon(read_to_eof)
            await stream.wait_pongs(3)
            await stream.send_stdin(b"x")  # the fake notifies its waiters on stdin
            log = await wait_exec(fake, 0, until=lambda log: log.stdin == b"x")
            assert log.pings >= 3
            await stream.close_stdin()
            await exited.wait()
        stats = stream.statistics()
        assert stats.pings_sent >= 3 and stats.rtt_s is not None
        await stream.aclose()


async def test_client_certificate_credentials(fake: FakeApiServer, tmp_path: Path) -> None:
    cert = fake.issue_client_cert("cert-user", groups=("system:masters",))
    kubeconfig = write_kubeconfig(tmp_path / "cert.kubeconfig", fake.url, ca_pem=fake.ca_pem,
                                  client_cert=cert)
    with trio.fail_after(WAIT_S):
        upstream = KubeUpstream(load_kubeconfig(kubeconfig))
        stream = await upstream.open(StreamSpec(command=("true",), tty=False, pod="mypod"))
        assert (await stream.receive_some()) == (OutputChannel.EOF, b"")
        assert (await stream.wait_exit()).code == 0
        await stream.aclose()
        log = await wait_exec(fake, 0)
        assert log.user == "cert-user" and log.header("authorization") is None


async def test_in_cluster_token_is_reread_on_every_dial(fake: FakeApiServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(fake.ca_pem)
    (sa / "token").write_text(GW_TOKEN)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
    upstream = KubeUpstream(load_incluster(str(sa)))
    with trio.fail_after(WAIT_S):
        for i, (token, user) in enumerate([(GW_TOKEN, "podterm-gateway"),
                                           ("rotated-token", "rotated")]):
            fake.add_token(token, FakeUser(user))
            (sa / "token").write_text(token + "\n")  # kubelet rewrites the projected token
            stream = await upstream.open(StreamSpec(command=("true",), tty=False, pod="mypod"))
            assert (await stream.receive_some()) == (OutputChannel.EOF, b"")
            assert (await stream.wait_exit()).code == 0
            await stream.aclose()
            assert (await wait_exec(fake, i)).user == user


async def test_get_json_passes_reads_through(fake: FakeApiServer, tmp_path: Path) -> None:
    # For the kubectl API (gateway.kubeapi): discovery and the pod from the real apiserver.
    with trio.fail_after(WAIT_S):
        upstream = kube_upstream(fake, tmp_path, impersonate=True)
        pod = await upstream.get_json("/api/v1/namespaces/default/pods/mypod",
                                      identity=Identity("alice", groups=("devs",)))
        assert pod.status == 200 and pod.json()["kind"] == "Pod"
        assert pod.content_type.startswith("application/json")
        missing = await upstream.get_json("/api/v1/namespaces/default/pods/nope",
                                          identity=Identity("alice"))
        assert missing.status == 404 and missing.json()["message"] == 'pods "nope" not found'
        version = await upstream.get_json("/version")  # as the gateway itself
        assert version.json()["minor"] == "32"
        assert fake.requests[-1].header("impersonate-user") is None
        request = fake.requests[0]
        assert request.path == "/api/v1/namespaces/default/pods/mypod"
        assert request.header("impersonate-user") == "alice"
        assert request.header("impersonate-group") == "devs"


# ------------------------------------------------------------------ kubectl's API, v5 FF 00


class K8sExec:
    """A minimal exec client (kubectl's shape: v5, binary messages), bytes checked by hand."""

    def __init__(self, ws: WebSocketStream) -> None:
        self.ws = ws
        self.messages: list[bytes] = []
        self.close_code: int | None = None

    def channel(self, n: int) -> bytes:
        return b"".join(m[1:] for m in self.messages if m[:1] == bytes((n,)))

    async def run_to_close(self) -> None:
        while True:
            try:
                batch = await self.ws.receive_batch()
            except ConnectionClosed as exc:
                self.close_code = exc.code
                await self.ws.aclose()
                return
            self.messages += [bytes(p) for _, p in batch]


async def test_kubectl_style_exec_with_stdin_eof_through_the_kube_upstream(
        fake: FakeApiServer, tmp_path: Path, start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        path = ("/api/v1/namespaces/default/pods/mypod/exec?command=sh&command=-c"
                "&command=cat%3B+exit+3&container=main&stderr=true&stdin=true&stdout=true")
        ws, chosen = await connect(f"ws://127.0.0.1:{gw.port}{path}", subprotocols=[V5],
                                   headers=[("Authorization", f"Bearer {ALICE}")])
        assert chosen == V5
        client = K8sExec(ws)
        await ws.send_binary(b"data\n", b"\x00")
        await ws.send_binary(b"\x00", b"\xff")  # FF 00: stdin EOF (§7.1)
        await client.run_to_close()
        assert client.channel(1) == b"data\n"
        status = json.loads(client.channel(3))
        assert status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
        assert client.close_code == 1000
        log = await wait_exec(fake, 0)
        assert log.stdin == b"data\n" and log.stdin_closed  # exactly the bytes, then FF 00
        assert [kind for kind, _ in log.events] == ["stdin", "close_signal"]


# ------------------------------------------------------------------ lost, breaker, restore


def _osc7(path: str) -> bytes:
    return b"\x1b]7;file://" + path.encode() + b"\x07"


async def test_lost_connection_opens_the_breaker_and_the_shell_is_restored_in_its_cwd(
        fake: FakeApiServer, tmp_path: Path, start_gateway: GatewayStarter) -> None:
    workdir = tmp_path / "some dir"
    workdir.mkdir()
    upstream = kube_upstream(fake, tmp_path, breaker_failures=3, breaker_cooldown_s=0.3,
                             backoff_base_s=0.01, backoff_cap_s=0.02, open_retry_s=5.0)
    with trio.fail_after(WAIT_S * 2):
        gw = await start_gateway(upstream)
        # An interactive shell that reports its cwd with OSC 7 at every prompt.
        created = await create(gw, ["bash", "--norc", "--noprofile", "-i"], tty=True,
                               env={"PROMPT_COMMAND": OSC7, "PS1": "$ "})
        client = await gw.attach(created["id"])
        await client.wait_hello()
        await client.send_stdin(f"cd '{workdir}'\r".encode())
        await client.wait_output(_osc7(str(workdir)))
        first = client.offset

        # The apiserver connection dies; the next two upgrades are refused.
        fake.refuse_upgrades(2, 503)
        assert await trio.to_thread.run_sync(fake.drop_connections) == 1
        await client.wait_output(b"[podterm] the connection to the pod was lost; press a key "
                                 b"to start a new shell in " + str(workdir).encode())
        session = gw.registry.get(created["id"])
        assert session.lost is not None and session.state.value == "running"

        # The user types: lost (failure 1) + two 503s (failures 2, 3) open the
        # breaker; after the cooldown one trial (half-open) succeeds and closes it.
        await client.send_stdin(b"pwd\r")
        history = await upstream.breaker.wait_transitions(3)
        assert [(t.old, t.new) for t in history] == [
            (BreakerState.CLOSED, BreakerState.OPEN),
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED)]
        assert history[1].at - history[0].at >= 0.3  # the cooldown was honoured
        notice = (f"shell restarted in {workdir} after the connection to the pod was lost")
        await client.wait_output(b"[podterm] " + notice.encode())
        await client.wait_output(f"{workdir}\r\n".encode())  # pwd, in the new shell
        assert session.restores == 1 and session.lost is None

        log_old = await wait_exec(fake, 0)
        assert log_old.end == "dropped"
        assert log_old.stdin == f"cd '{workdir}'\r".encode()
        log_new = await wait_exec(fake, 1, until=lambda log: b"pwd" in log.stdin)
        assert log_new.stdin == b"pwd\r"  # the input that triggered the restore, once
        assert log_new.command[:2] == ("/bin/sh", "-c") and str(workdir) in log_new.command
        assert log_new.resizes == ((80, 24),)

        # /metrics: the breaker is closed again, and its transitions were counted.
        metrics = (await gw.rest("GET", "/metrics", token=None)).body.decode()
        server = upstream.server
        assert f'podterm_upstream_breaker_state{{apiserver="{server}"}} 0' in metrics
        for old, new in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
            assert (f'podterm_upstream_breaker_transitions_total{{apiserver="{server}",'
                    f'from="{old}",to="{new}"}} 1') in metrics
        assert f'podterm_upstream_streams_lost_total{{apiserver="{server}"}} 1' in metrics

        # A client that resumes later is told in hello.notices.
        await client.cut()
        again = await gw.attach(created["id"], offset=first,
                                resume_token=client.hello.resume_token if client.hello else None)
        hello = await again.wait_hello()
        assert hello.notices == (notice,)
        await again.send_stdin(b"exit\r")
        await again.wait_for(lambda c: c.exit is not None)
        assert again.exit is not None and again.exit.code == 0
        await again.wait_closed()


async def test_restore_on_attach_after_the_loss(fake: FakeApiServer, tmp_path: Path,
                                                start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        # The default interactive shell (command null) reports its cwd by itself.
        created = await create(gw, None, tty=True)
        client = await gw.attach(created["id"])
        await client.wait_hello()
        await client.send_stdin(f"cd {tmp_path}\r".encode())
        await client.wait_output(_osc7(str(tmp_path)))
        await client.cut()  # nobody attached
        await trio.to_thread.run_sync(fake.drop_connections)
        session = gw.registry.get(created["id"])
        await session._wait_status(lambda: session.lost is not None)  # noqa: SLF001
        again = await gw.attach(created["id"], offset=client.offset,
                                resume_token=client.hello.resume_token if client.hello else None)
        hello = await again.wait_hello()
        assert hello.notices == (f"the connection to the pod was lost; a new shell starts "
                                 f"in {tmp_path} now",)
        await again.wait_output(f"shell restarted in {tmp_path}".encode())
        await again.send_stdin(b"pwd; exit 4\r")
        await again.wait_for(lambda c: c.exit is not None)
        assert again.exit is not None and again.exit.code == 4
        assert f"{tmp_path}\r\n".encode() in again.output
        await again.wait_closed()


async def test_a_failed_restore_says_why_and_the_next_key_retries(
        fake: FakeApiServer, tmp_path: Path, start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path))
        created = await create(gw, ["sh"], tty=True)
        client = await gw.attach(created["id"])
        await client.wait_hello()
        await wait_exec(fake, 0, until=lambda log: log.pid is not None)
        fake.remove_pod("mypod")  # the pod is gone for now (rescheduled)
        await trio.to_thread.run_sync(fake.drop_connections)
        await client.wait_output(b"press a key to start a new shell")
        await client.send_stdin(b"echo lost\r")
        await client.wait_output(b'[podterm] could not start a new shell: pods "mypod" not '
                                 b"found; press a key to try again")
        fake.add_pod(FakePod("mypod"))
        await client.send_stdin(b"echo back\r")
        await client.wait_output(b"shell restarted")
        await client.send_stdin(b"exit 6\r")
        await client.wait_for(lambda c: c.exit is not None)
        assert client.exit is not None and client.exit.code == 6
        await client.wait_closed()
        log = await wait_exec(fake, 1)
        assert log.stdin == b"echo back\rexit 6\r"  # the failed attempt's input was dropped


async def test_restore_can_be_switched_off(fake: FakeApiServer, tmp_path: Path,
                                           start_gateway: GatewayStarter) -> None:
    with trio.fail_after(WAIT_S):
        gw = await start_gateway(kube_upstream(fake, tmp_path),
                                 session_limits=SessionLimits(restore_upstreams=frozenset()))
        created = await create(gw, ["sh"], tty=True)
        client = await gw.attach(created["id"])
        await client.wait_hello()
        await trio.to_thread.run_sync(
            functools.partial(fake.wait_exec, 0, until=lambda log: log.pid is not None))
        await trio.to_thread.run_sync(fake.drop_connections)
        # Lost, not exited: the session ends upstream_failed (4410), never "exited 0".
        assert await client.wait_closed() == 4410
        assert client.exit is not None and client.exit.reason == "upstream_failed"


async def test_a_lost_stream_is_not_an_exit(fake: FakeApiServer, tmp_path: Path) -> None:
    with trio.fail_after(WAIT_S):
        upstream = kube_upstream(fake, tmp_path)
        stream = await upstream.open(StreamSpec(command=("sh", "-c", "echo ready; cat"),
                                                tty=False, pod="mypod"))
        assert await stream.receive_some() == (OutputChannel.STDOUT, b"ready\n")
        await trio.to_thread.run_sync(fake.drop_connections)
        assert await stream.receive_some() == (OutputChannel.EOF, b"")  # output is over...
        with pytest.raises(UpstreamLost):
            await stream.wait_exit()  # ...but the process did not exit
        with pytest.raises(UpstreamLost):
            await stream.send_stdin(b"x")
        assert upstream.statistics().streams_lost == 1
        assert upstream.breaker.statistics().consecutive_failures == 1
        await stream.aclose()
        assert upstream.statistics().streams_open == 0


async def test_breaker_open_fails_fast_when_the_cooldown_outlasts_the_budget(
        fake: FakeApiServer, tmp_path: Path) -> None:
    upstream = kube_upstream(fake, tmp_path, breaker_failures=2, breaker_cooldown_s=60.0,
                             backoff_base_s=0.01, backoff_cap_s=0.01, open_retry_s=1.0)
    spec = StreamSpec(command=("true",), tty=False, pod="mypod")
    with trio.fail_after(WAIT_S):
        fake.refuse_upgrades(2, 503)
        with pytest.raises(UpstreamUnavailable, match="circuit breaker open after 2 failures"):
            await upstream.open(spec)
        assert upstream.breaker.state is BreakerState.OPEN
        dials = upstream.statistics().dials
        with pytest.raises(UpstreamUnavailable):
            await upstream.open(spec)  # refused at once: no dial while open
        assert upstream.statistics().dials == dials
        assert len(fake.execs) == 0


# ------------------------------------------------------------------ the config path


async def test_serve_builds_the_kube_upstream_from_the_config(
        fake: FakeApiServer, tmp_path: Path, nursery: trio.Nursery) -> None:
    kubeconfig = kubeconfig_for(fake, tmp_path / "kubeconfig")
    config = ServeConfig(listen=ListenConfig(host="127.0.0.1", port=0),
                         sessions=SessionsConfig(drain_timeout_s=5.0),
                         upstream=UpstreamConfig(kind="kube", kubeconfig=str(kubeconfig)))
    with trio.fail_after(WAIT_S):
        gw: Gateway = await nursery.start(functools.partial(
            serve, config, options=GatewayOptions(lag_probe_interval_s=0)))
        assert isinstance(gw.registry.upstreams["kube"], KubeUpstream)
        assert gw.registry.default_upstream == "kube"
        handle = GatewayUnderTest(gw)
        client = await run_to_exit(handle, ["echo", "via config"])
        assert bytes(client.output) == b"via config\n"
        metrics = (await handle.rest("GET", "/metrics", token=None)).body.decode()
        assert f'podterm_upstream_breaker_state{{apiserver="{fake.url}"}} 0' in metrics
        assert "podterm_sessions{" in metrics  # the admin families are still there
        gw.shutdown("test over")


# ------------------------------------------------------------------ pure parts


async def test_exec_url_and_argv_shapes() -> None:
    spec = StreamSpec(command=("echo", "a b&c"), tty=True, namespace="ns-1", pod="p",
                      container="c")
    assert exec_target(spec, list(spec.command or ())) == (
        "/api/v1/namespaces/ns-1/pods/p/exec?command=echo&command=a%20b%26c&container=c"
        "&stdin=true&stdout=true&stderr=false&tty=true")
    assert exec_argv(spec) == ["echo", "a b&c"]
    restored = StreamSpec(command=("bash",), cwd="/tmp/x y", env={"A": "it's"}, pod="p")
    argv = exec_argv(restored)
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3:] == ["/tmp/x y", "bash"]
    assert "export A='it'\"'\"'s'" in argv[2]
    with pytest.raises(Exception, match="not a shell identifier"):
        exec_argv(StreamSpec(command=("true",), env={"A-B": "1"}, pod="p"))


async def test_kubeconfig_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot load kubeconfig {tmp_path / 'missing'}"):
        load_kubeconfig(tmp_path / "missing")
    kubeconfig = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:1", token="t",
                                  ca_pem=b"not a certificate")
    with pytest.raises(ConfigError, match="cluster CA"):
        load_kubeconfig(kubeconfig)
    with pytest.raises(ConfigError, match="needs --kubeconfig"):
        load_credentials(None, "some-context")
