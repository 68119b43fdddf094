"""A small HTTPS fake of the Kubernetes API's TokenReview and SubjectAccessReview.

The standard library's HTTP/1.1 server (keep-alive, as a real apiserver) in a
thread on 127.0.0.1 with a ``trustme`` certificate.  It records every request
(path, lower-cased headers, JSON body) and answers each ``POST`` from
:attr:`FakeApi.respond`, a function of the path and the JSON body that the
test sets.  The code under test speaks to it as it would to a kube-apiserver
(``podterm.auth.tokenreview.ApiServerClient``), directly or through a
kubeconfig (:func:`write_kubeconfig`).

It is a thread, not a trio task, so one instance serves a module of trio
tests (each of which runs its own event loop)::

    with running_fake_api(trustme.CA(), tmp_dir) as api:
        api.respond = lambda path, body: (201, {...})
        ...
        api.bodies("/apis/authentication.k8s.io/v1/tokenreviews")
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme

__all__ = ["Answer", "FakeApi", "Recorded", "running_fake_api", "write_kubeconfig"]

#: A stalled connection, a held answer, the shutdown: each bounded by this (s).
WAIT_S = 10.0

#: ``(HTTP status, JSON body)``.
Answer = tuple[int, Any]


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


def _not_found(path: str, body: Any) -> Answer:
    return 404, {"kind": "Status", "code": 404}


@dataclass
class FakeApi:
    """The running fake: where it is, what it was asked, how it answers."""

    url: str
    ca_path: Path
    requests: list[Recorded] = field(default_factory=list)
    respond: Callable[[str, Any], Answer] = _not_found
    #: When set, answers wait for it (bounded): lets a test hold requests in flight.
    gate: threading.Event | None = None
    arrived: threading.Event = field(default_factory=threading.Event)
    connections: int = 0
    server_errors: int = 0

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies of the requests to ``path``, in order."""
        return [r.body for r in self.requests if r.path == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real apiserver
    timeout = WAIT_S  # a connection that stalls (handshake or request) ends its thread
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.api.connections += 1

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        api = self.server.api
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        api.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()},
                                     body))
        api.arrived.set()
        if api.gate is not None:
            api.gate.wait(WAIT_S)
        status, answer = api.respond(self.path, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    api: FakeApi

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout test, a gateway closing its idle
        # keep-alive connections at exit) leaves a broken pipe here; count it
        # instead of printing a traceback.
        self.api.server_errors += 1


@contextmanager
def running_fake_api(ca: trustme.CA, directory: Path) -> Iterator[FakeApi]:
    """Serve on 127.0.0.1:0 with a certificate of ``ca`` (its PEM goes to ``directory``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    server = _Server(("127.0.0.1", 0), _Handler)
    # The handshake runs in the connection's thread (on its first read), not in
    # the accept loop, so one stalled client cannot block the server or its shutdown.
    server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                    do_handshake_on_connect=False)
    ca_path = directory / "apiserver-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    api = FakeApi(url=f"https://127.0.0.1:{server.server_address[1]}", ca_path=ca_path)
    server.api = api
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True, name="fake-kubeauth")
    thread.start()
    try:
        yield api
    finally:
        if api.gate is not None:
            api.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(WAIT_S)


def write_kubeconfig(api: FakeApi, path: Path, *, token: str) -> Path:
    """A kubeconfig (JSON, which is YAML) for ``api``, authenticating with ``token``."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {
            "server": api.url, "certificate-authority": str(api.ca_path)}}],
        "users": [{"name": "gateway", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "gateway"}}],
    }))
    return path
