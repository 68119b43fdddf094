"""The official Python client (``kubernetes`` on PyPI) against the gateway over HTTPS.

``kubernetes.stream.stream(api.connect_get_namespaced_pod_exec, ...)`` makes one
WebSocket upgrade (no discovery, no pod GET; spec §14).  Client ≥ 36 offers
``v5.channel.k8s.io,v4.channel.k8s.io``; a ``sec-websocket-protocol`` entry in
``_headers`` replaces the offer, which is how these tests force v4 (what
clients ≤ 35 offer) and v5 one at a time.  The gateway is the same
``podterm serve`` subprocess as ``test_kubectl.py`` (its module fixture).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.stream import stream

from tests.e2e.test_kubectl import (  # noqa: F401  (https_gateway is a fixture)
    ADMIN_TOKEN,
    USER_TOKEN,
    GatewayProcess,
    https_gateway,
    podterm_kubeconfig,
)

pytestmark = pytest.mark.e2e

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
RUN_TIMEOUT_S = 10


def core_api(gateway: GatewayProcess, token: str = ADMIN_TOKEN) -> client.CoreV1Api:
    """Programmatic configuration, as in spec §14."""
    cfg = client.Configuration(host=gateway.url)
    cfg.ssl_ca_cert = str(gateway.ca_path)
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return client.CoreV1Api(client.ApiClient(cfg))


@pytest.fixture
def api(https_gateway: GatewayProcess) -> Iterator[client.CoreV1Api]:  # noqa: F811
    core = core_api(https_gateway)
    yield core
    core.api_client.close()


def open_exec(api: client.CoreV1Api, command: list[str], *, subprotocol: str | None,
              stdin: bool = False, **kwargs: Any) -> Any:
    """A WSClient (``_preload_content=False``) with the offer forced to ``subprotocol``."""
    headers = {"sec-websocket-protocol": subprotocol} if subprotocol else None
    return stream(api.connect_get_namespaced_pod_exec, "mypod", "default", command=command,
                  stdin=stdin, stdout=True, stderr=True, tty=False, _preload_content=False,
                  _headers=headers, **kwargs)


def run_to_end(ws: Any) -> None:
    ws.run_forever(timeout=RUN_TIMEOUT_S)
    assert not ws.is_open(), f"the exec did not end within {RUN_TIMEOUT_S} s"
    # The client answers the gateway's Close but leaves its socket open; and
    # close() does nothing once it saw the end.  Close the socket for it.
    ws.close()
    ws.sock.shutdown()


#: The client leaves its socket to the garbage collector after a preloaded
#: exec and after a refused handshake (websocket-client's connect() does not
#: close it on error): a ResourceWarning from *its* code, reported as
#: unraisable.  Tests marked with this collect that garbage before they end,
#: so the warning cannot land in a later test.
client_leaks_its_socket = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize("subprotocol", [V5, V4])
def test_echo_and_returncode_0(api: client.CoreV1Api, subprotocol: str) -> None:
    ws = open_exec(api, ["echo", "hi there"], subprotocol=subprotocol)
    assert ws.subprotocol == subprotocol
    run_to_end(ws)
    assert ws.read_stdout() == "hi there\n"
    assert ws.returncode == 0


@pytest.mark.parametrize("subprotocol", [V5, V4])
def test_stdin_stderr_and_a_nonzero_exit_code(api: client.CoreV1Api, subprotocol: str) -> None:
    ws = open_exec(api, ["sh", "-c", "read x; echo got=$x; echo oops >&2; exit 7"],
                   subprotocol=subprotocol, stdin=True)
    ws.write_stdin("line\n")  # a str: sent as a text message (spec §4.1)
    run_to_end(ws)
    assert ws.read_stdout() == "got=line\n"
    assert ws.read_stderr() == "oops\n"
    assert ws.returncode == 7


def test_the_default_offer_gets_v5_and_close_channel_is_stdin_eof(
        api: client.CoreV1Api) -> None:
    ws = open_exec(api, ["cat"], subprotocol=None, stdin=True)
    assert ws.subprotocol == V5  # offered v5,v4: the gateway prefers v5 (spec §3.4)
    ws.write_stdin("some text\n")
    ws.write_stdin(b"and bytes\n")
    ws.close_channel(0)  # FF 00 (spec §7.1): cat sees EOF and exits 0
    run_to_end(ws)
    assert ws.read_stdout() == "some text\nand bytes\n"
    assert ws.returncode == 0


@client_leaks_its_socket
def test_preloaded_exec_with_a_kubeconfig_from_podterm(https_gateway: GatewayProcess,  # noqa: F811
                                                       tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    podterm_kubeconfig(https_gateway, ADMIN_TOKEN, path)
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    with client.ApiClient(cfg) as api_client:
        api = client.CoreV1Api(api_client)
        out = stream(api.connect_get_namespaced_pod_exec, "mypod", "default",
                     command=["sh", "-c", "echo from-kubeconfig"], stderr=True, stdin=False,
                     stdout=True, tty=False)
    assert out == "from-kubeconfig\n"
    gc.collect()  # the client's socket (see client_leaks_its_socket)


@pytest.mark.parametrize(("token", "container", "status", "message"), [
    (ADMIN_TOKEN, "zz", 400, "container zz is not valid for pod mypod"),
    (USER_TOKEN, None, 403, 'pods "mypod" is forbidden: User "bob" cannot create resource '
                            '"pods/exec"'),
])
@client_leaks_its_socket
def test_a_refused_upgrade_raises_with_the_status(https_gateway: GatewayProcess,  # noqa: F811
                                                  token: str, container: str | None,
                                                  status: int, message: str) -> None:
    api = core_api(https_gateway, token)
    kwargs = {"container": container} if container else {}
    with pytest.raises(ApiException) as info:
        stream(api.connect_get_namespaced_pod_exec, "mypod", "default", command=["true"],
               stdin=False, stdout=True, stderr=True, tty=False, **kwargs)
    api.api_client.close()
    # spec §14: status 0 and the handshake answer in the reason, body last.
    reason = str(info.value.reason)
    del info
    gc.collect()  # the client's socket (see client_leaks_its_socket)
    assert f"Handshake status {status}" in reason
    last = reason.rsplit(" -+-+- ", 1)[1]
    body = json.loads(last[last.index("{"):last.rindex("}") + 1])
    assert body["kind"] == "Status" and body["code"] == status
    assert body["message"].startswith(message)
