"""A fake kube-apiserver for tests: the real exec/attach wire protocol, local processes.

It stands in for a cluster so that "real kubectl -> fake apiserver" and
"real kubectl -> podterm gateway -> fake apiserver -> process" can run end to
end on one machine.  It is an independent peer: the WebSocket layer is the
``websockets`` library's sans-IO :class:`~websockets.server.ServerProtocol`
(the same handshake and framing code its servers use), the Kubernetes
channel framing is written out below, and nothing comes from ``podterm`` --
otherwise tests of podterm's client role would test podterm against itself.
The contract it implements is ``/work/shared/spec/k8s-exec-protocol.md``
(section numbers in comments refer to it).

What it serves (HTTPS on 127.0.0.1, HTTP/1.1, keep-alive):

- ``GET /version`` (minor configurable, default ``"32"``), ``/api``, ``/apis``,
  ``/api/v1`` -- the minimal discovery of §2.2;
- ``GET /api/v1/namespaces/{ns}/pods/{pod}`` from :class:`FakePod` objects;
- ``GET .../pods/{pod}/exec`` and ``/attach`` upgraded to WebSocket with
  ``v5.channel.k8s.io`` / ``v4.channel.k8s.io`` / ``channel.k8s.io`` and the
  base64 variants (§3.4, §4); the command runs as a local process (a PTY when
  ``tty=true``, pipes otherwise); output goes to channels 1/2, the end Status
  to channel 3 exactly as in §5.1, then Close 1000 and a bounded wait for the
  client's Close (§7.3);
- ``POST`` on the same URLs (kubectl's SPDY retry after a refused upgrade)
  gets the same verdict as the GET (§9); SPDY itself is not spoken;
- anything else: a ``NotFound`` Status.

Authentication is by static bearer token (or a TLS client certificate issued
by :meth:`FakeApiServer.issue_client_cert`); authorization is a deny list of
:class:`Deny` rules producing the real ``Forbidden`` message; impersonation
headers are honoured for users allowed to impersonate.

Every HTTP request is logged as a :class:`RequestLog` and every upgraded
exec/attach as an :class:`ExecLog` (what the client sent: subprotocols, query,
headers, every stdin byte, every resize, ``FF 00``, how it closed).  Faults can
be injected: refuse the next N upgrades (:meth:`FakeApiServer.refuse_upgrades`),
drop every live WebSocket's TCP connection (:meth:`FakeApiServer.drop_connections`,
or automatically when stdin carries a marker), delay answers.

Use it from a test (it runs its own asyncio loop in a thread, so it works from
plain, trio or asyncio tests alike; the blocking ``wait_*`` methods can be
called from trio with ``trio.to_thread.run_sync``)::

    with FakeApiServer(pods=[FakePod("mypod")], tokens={"t0k": FakeUser("alice")}) as api:
        api.url, api.ca_path                     # https://127.0.0.1:PORT, CA PEM file
        ...run kubectl...
        log = api.wait_exec(0)                   # the first exec, once finished
        assert log.stdin == b"data\\n" and log.stdin_closed

or as a process (prints one JSON line ``{"url", "port", "ca_path", "pid"}`` on
stdout once listening, writes the same to ``--ready-file`` atomically, runs
until SIGTERM/SIGINT)::

    python -m tests.helpers.fake_apiserver serve --port 0 --ready-file F \\
        [--mode current|legacy] [--minor 32] [--token TOKEN=USER[:GROUP,...]] \\
        [--impersonator TOKEN=USER] [--deny USER] [--pod NAME[:C1,C2]] \\
        [--cert-dir DIR] [--log-file F.jsonl] [--refuse N --refuse-status 503]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import fcntl
import http
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, cast

import trustme
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

# ---------------------------------------------------------------------------
# Wire constants (spec §3.4, §4.2)
# ---------------------------------------------------------------------------


class Subprotocol(StrEnum):
    """The WebSocket subprotocols of exec/attach (spec §3.4)."""

    V5 = "v5.channel.k8s.io"  # v4 + the CLOSE signal FF nn (§4.7)
    V4 = "v4.channel.k8s.io"  # raw framing, JSON Status on channel 3 (§4.6)
    V4_BASE64 = "v4.base64.channel.k8s.io"  # text frames, base64 payload (§4.5)
    V1 = "channel.k8s.io"  # raw framing, error text on channel 3 (§4.4)
    V1_BASE64 = "base64.channel.k8s.io"


#: What a kubelet's WebSocket server accepts; it takes the client's first match (§3.4).
KUBELET_SUBPROTOCOLS = frozenset(
    {Subprotocol.V1, Subprotocol.V1_BASE64, Subprotocol.V4, Subprotocol.V4_BASE64})
BASE64_SUBPROTOCOLS = frozenset({Subprotocol.V1_BASE64, Subprotocol.V4_BASE64})
#: Subprotocols whose channel 3 carries a JSON Status (§5.1); the others carry error text.
JSON_STATUS_SUBPROTOCOLS = frozenset({Subprotocol.V5, Subprotocol.V4, Subprotocol.V4_BASE64})


class Channel(IntEnum):
    """Channel ids: the first byte of every message (§4.2)."""

    STDIN = 0
    STDOUT = 1
    STDERR = 2
    ERROR = 3
    RESIZE = 4
    CLOSE = 255  # v5 only: "FF nn" = channel nn is finished


class Mode(StrEnum):
    """Which kube-apiserver generation to imitate in subprotocol negotiation (§3.4)."""

    #: apiserver >= 1.30: v5 whenever offered, else proxied to the kubelet (its list).
    CURRENT = "current"
    #: apiserver < 1.30 (or gate off): the kubelet's list only; a v5-only offer gets 403.
    LEGACY = "legacy"


#: Close code that delivers the exit status to kubectl (§7.3).
CLOSE_NORMAL = 1000
#: Largest client message accepted; beyond it websockets closes with 1009 (§4.1).
MAX_MESSAGE = 1 << 20
#: kubectl's copy buffer; also our read size from the process (§4.1).
OUTPUT_CHUNK = 32 * 1024
#: Largest request head accepted (request line + headers).
MAX_HEAD = 64 * 1024
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

# ---------------------------------------------------------------------------
# Configuration objects
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeUser:
    """An identity a bearer token (or client certificate) maps to."""

    name: str
    groups: tuple[str, ...] = ()
    #: May send Impersonate-User / Impersonate-Group (like a gateway's service account).
    can_impersonate: bool = False


@dataclass(frozen=True, slots=True)
class FakeContainer:
    """A container of a :class:`FakePod`; its processes are local processes."""

    name: str
    #: ``spec.containers[].tty`` / ``.stdin``: kubectl attach -t checks them (§2.2).
    tty: bool = False
    stdin: bool = False
    #: What ``attach`` runs (a fake has no container main process to attach to).
    attach_command: tuple[str, ...] = ("sh",)
    #: Working directory and extra environment of processes started in it.
    workdir: str | None = None
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FakePod:
    """A pod the fake knows; served as Pod JSON and usable for exec/attach."""

    name: str
    namespace: str = "default"
    containers: tuple[FakeContainer, ...] = (FakeContainer("main"),)
    #: Value of the ``kubectl.kubernetes.io/default-container`` annotation, if any.
    default_container: str | None = None
    #: ``status.phase``; kubectl refuses Succeeded/Failed pods client-side.
    phase: str = "Running"
    #: ``spec.nodeName``; None makes exec fail with "does not have a host assigned" (§9).
    node_name: str | None = "fake-node"

    def container(self, name: str) -> FakeContainer | None:
        return next((c for c in self.containers if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The Pod object, with the kind/apiVersion kubectl requires (§2.2)."""
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                    "uid": f"fake-{self.namespace}-{self.name}"}
        if self.default_container is not None:
            metadata["annotations"] = {DEFAULT_CONTAINER_ANNOTATION: self.default_container}
        spec: dict[str, Any] = {"containers": [
            {"name": c.name, "image": "fake", "tty": c.tty, "stdin": c.stdin}
            for c in self.containers]}
        if self.node_name is not None:
            spec["nodeName"] = self.node_name
        return {"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": spec,
                "status": {"phase": self.phase}}


@dataclass(frozen=True, slots=True)
class Deny:
    """An RBAC denial: ``user`` (or any member of ``group``) may not do ``verbs`` on ``resource``.

    ``resource`` is ``pods``, ``pods/exec``, ``pods/attach`` or ``*``.  The verb
    is ``get`` for GET (the WebSocket upgrade) and ``create`` for POST (kubectl's
    SPDY retry), as the real apiserver derives it (§3.2).
    """

    user: str | None = None
    group: str | None = None
    resource: str = "*"
    verbs: frozenset[str] = frozenset({"get", "create"})
    namespace: str | None = None

    def matches(self, user: str, groups: Sequence[str], verb: str, resource: str,
                namespace: str) -> bool:
        if self.user is not None and self.user != user:
            return False
        if self.group is not None and self.group not in groups:
            return False
        if self.namespace is not None and self.namespace != namespace:
            return False
        return verb in self.verbs and self.resource in ("*", resource)


# ---------------------------------------------------------------------------
# Logs (what the fake received), frozen snapshots safe to hand to any thread
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestLog:
    """One HTTP request as received, and the status code answered (101 for an upgrade)."""

    index: int
    method: str
    path: str
    #: Decoded query parameters in order (repeated keys repeated).
    query: tuple[tuple[str, str], ...]
    #: Headers in order, names lower-cased.
    headers: tuple[tuple[str, str], ...]
    #: The authenticated user (None: anonymous or rejected).
    user: str | None
    status: int

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True, slots=True)
class ExecLog:
    """One upgraded exec/attach session: what the client sent and how it ended.

    ``end`` says what ended the session: ``running`` (not yet), ``exited``
    (the process ended; the fake sent the Status and Close 1000),
    ``start_failed`` (the command could not start; an InternalError Status was
    sent), ``client_closed`` (the client sent a Close first), ``client_eof``
    (the client's TCP connection ended without a Close), ``protocol_error``,
    ``dropped`` (fault injection) or ``server_stopped``.
    """

    index: int
    request_index: int
    kind: str  # "exec" | "attach"
    namespace: str
    pod: str
    #: The container the command ran in (the query's, or the pod's only one).
    container: str
    command: tuple[str, ...]
    #: Decoded query parameters in order, exactly as received.
    query: tuple[tuple[str, str], ...]
    stdin_requested: bool
    stdout_requested: bool
    stderr_requested: bool
    tty: bool
    #: Upgrade request headers in order, names lower-cased.
    headers: tuple[tuple[str, str], ...]
    #: The token/certificate identity, and the identity after impersonation.
    user: str
    effective_user: str
    impersonate_user: str | None
    impersonate_groups: tuple[str, ...]
    offered_subprotocols: tuple[str, ...]
    subprotocol: str | None
    #: Every byte received on channel 0, in order.
    stdin: bytes
    #: Each channel-0 message: ("text" | "binary", payload without the channel byte).
    stdin_messages: tuple[tuple[str, bytes], ...]
    #: Each decoded channel-4 size, in order: (width, height) -- zero sizes included.
    resizes: tuple[tuple[int, int], ...]
    #: True once a v5 ``FF 00`` (stdin EOF) arrived.
    stdin_closed: bool
    #: Everything in arrival order: ("stdin", bytes), ("resize", (w, h)),
    #: ("close_signal", channel), ("unknown", (channel, bytes)), ("bad_message", str).
    events: tuple[tuple[str, Any], ...]
    pings: int
    #: Output sent to the client on channels 1 and 2.
    stdout: bytes
    stderr: bytes
    pid: int | None
    exit_code: int | None
    #: The Status sent on channel 3 (v4/v5), or {"text": ...} for v1 errors; None if none.
    status: dict[str, Any] | None
    end: str
    #: The client's Close frame, if one arrived (before or after ours).
    client_close_code: int | None
    client_close_reason: str | None
    finished: bool

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; bytes become text (backslash-escaped) plus exact base64."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                out[f.name] = value.decode("utf-8", "backslashreplace")
                out[f.name + "_b64"] = base64.b64encode(value).decode()
            elif f.name == "stdin_messages":
                out[f.name] = [[k, base64.b64encode(v).decode()] for k, v in value]
            elif f.name == "events":
                out[f.name] = [[k, base64.b64encode(v).decode() if isinstance(v, bytes) else
                                (repr(v) if isinstance(v, tuple) and any(
                                    isinstance(x, bytes) for x in v) else v)]
                               for k, v in value]
            else:
                out[f.name] = value
        return out


# ---------------------------------------------------------------------------
# Status objects (§5.1, §9)
# ---------------------------------------------------------------------------


def api_status(code: int, reason: str, message: str,
               details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A pre-upgrade error: a Status **with** kind/apiVersion and code (§9)."""
    status: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Failure", "message": message, "reason": reason}
    if details is not None:
        status["details"] = dict(details)
    status["code"] = code
    return status


SUCCESS_STATUS: dict[str, Any] = {"metadata": {}, "status": "Success"}


def exit_status(exit_code: int) -> dict[str, Any]:
    """The channel-3 Status for a process's exit code, exactly as §5.1 (no kind/apiVersion)."""
    if exit_code == 0:
        return dict(SUCCESS_STATUS)
    return {"metadata": {}, "status": "Failure",
            "message": "command terminated with non-zero exit code: "
                       f"command terminated with exit code {exit_code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]}}


def internal_error_status(text: str) -> dict[str, Any]:
    """The channel-3 Status for a failure after the upgrade (§5.1)."""
    return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {text}",
            "reason": "InternalError", "details": {"causes": [{"message": text}]}, "code": 500}


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_STATUS_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                   409: "Conflict", 429: "TooManyRequests", 500: "InternalError",
                   503: "ServiceUnavailable", 504: "Timeout"}


def parse_go_bool(value: str) -> bool:
    """Decode a query boolean like Go's ``strconv.ParseBool`` (§3.1); ValueError otherwise."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(value)


def negotiate(offered: Sequence[str], mode: Mode) -> tuple[bool, str | None]:
    """Pick the subprotocol a real cluster would (§3.4): (accepted, chosen-or-None).

    No subprotocol offered is accepted as ``channel.k8s.io`` with none echoed.
    """
    if mode is Mode.CURRENT and Subprotocol.V5 in offered:
        return True, Subprotocol.V5.value
    if not offered:
        return True, None
    for proto in offered:
        if proto in KUBELET_SUBPROTOCOLS:
            return True, proto
    return False, None


# ---------------------------------------------------------------------------
# HTTP/1.1 request heads (hand-parsed: the SPDY POST must be answered too, and
# websockets' own parser accepts GET only)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _HttpRequest:
    method: str
    target: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]  # original case

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def query_all(self, key: str) -> list[str]:
        return [v for k, v in self.query if k == key]

    def query_one(self, key: str) -> str | None:
        return next((v for k, v in self.query if k == key), None)

    def lower_headers(self) -> tuple[tuple[str, str], ...]:
        return tuple((k.lower(), v) for k, v in self.headers)

    def is_websocket_upgrade(self) -> bool:
        upgrade = (self.header("upgrade") or "").lower()
        connection = [t.strip().lower() for t in (self.header("connection") or "").split(",")]
        return upgrade == "websocket" and "upgrade" in connection


def _parse_head(head: bytes) -> _HttpRequest:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"bad request line {lines[0]!r}")
    method, target, _version = parts
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line!r}")
        headers.append((name, value.strip()))
    split = urllib.parse.urlsplit(target)
    query = tuple(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
    return _HttpRequest(method, target, urllib.parse.unquote(split.path), query, tuple(headers))


def _http_response(status: int, body: bytes = b"", *, content_type: str | None = "application/json",
                   close: bool = False, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}"]
    if content_type is not None and body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True, slots=True)
class _Answer:
    """An HTTP answer that is not an upgrade."""

    status: int
    body: bytes
    close: bool = False
    content_type: str | None = "application/json"

    @classmethod
    def status_json(cls, code: int, message: str, *, reason: str | None = None,
                    details: Mapping[str, Any] | None = None, close: bool = False) -> _Answer:
        reason = reason or _STATUS_REASONS.get(code, "Unknown")
        return cls(code, _compact(api_status(code, reason, message, details)), close)


@dataclass(frozen=True, slots=True)
class _ExecPlan:
    """An exec/attach request that passed every check: what to run and for whom."""

    kind: str
    pod: FakePod
    container: FakeContainer
    command: tuple[str, ...]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    user: FakeUser
    effective_user: str
    impersonate_user: str | None
    impersonate_groups: tuple[str, ...]


# ---------------------------------------------------------------------------
# Channel-4 decoding (§6): a stream of JSON objects, keys matched case-insensitively
# ---------------------------------------------------------------------------


class _ResizeDecoder:
    def __init__(self) -> None:
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """Every complete size in the stream so far; an incomplete tail waits for more."""
        self._buf += data.decode("utf-8", "replace")
        sizes: list[tuple[int, int]] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return sizes
            try:
                obj, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                self._buf = text[-4096:]  # maybe split mid-object: wait (bounded)
                return sizes
            self._buf = text[end:]
            if isinstance(obj, dict):
                keys = {k.lower(): v for k, v in obj.items() if isinstance(k, str)}
                w, h = keys.get("width", 0), keys.get("height", 0)
                if type(w) is int and type(h) is int:
                    sizes.append((w, h))


def _take_controlling_tty() -> None:
    # Runs in the child after setsid(): make the PTY slave (fd 0) its controlling
    # terminal, so shells get job control and SIGWINCH like in a real container.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _exit_code(returncode: int) -> int:
    """A killed process reports 128 + signal, as container runtimes do."""
    return returncode if returncode >= 0 else 128 - returncode


# ---------------------------------------------------------------------------
# One upgraded exec/attach session
# ---------------------------------------------------------------------------


class _ExecSession:
    """Drives one WebSocket: process I/O, channel framing, recording, the ending (§7.3)."""

    def __init__(self, server: FakeApiServer, plan: _ExecPlan, req: _HttpRequest,
                 request_index: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, offered: tuple[str, ...],
                 chosen: str | None) -> None:
        self.server = server
        self.plan = plan
        self.req = req
        self.request_index = request_index
        self.reader = reader
        self.writer = writer
        self.offered = offered
        self.subprotocol = chosen
        self.loop = asyncio.get_running_loop()
        # The choice was made (and a refusal answered) before the handshake.
        self.proto = ServerProtocol(select_subprotocol=lambda _proto, _offered: cast(Any, chosen),
                                    max_size=MAX_MESSAGE)
        self.base64 = chosen in BASE64_SUBPROTOCOLS
        self.v5 = chosen == Subprotocol.V5
        self.conn_done = asyncio.Event()
        self.exited = asyncio.Event()
        self.outputs_eof = asyncio.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pty_master: int | None = None
        self.stdin_fd: int | None = None
        self.outputs: dict[int, Channel] = {}
        self.stdin_buf = bytearray()
        self.stdin_close_pending = False
        self.writer_registered = False
        self.resize = _ResizeDecoder()
        self.fragment: tuple[Opcode, bytearray] | None = None
        self.start_error: str | None = None
        self.index = -1
        # recorded state: mutated on the loop thread under server._cond
        self.r_stdin = bytearray()
        self.r_stdin_messages: list[tuple[str, bytes]] = []
        self.r_resizes: list[tuple[int, int]] = []
        self.r_stdin_closed = False
        self.r_events: list[tuple[str, Any]] = []
        self.r_pings = 0
        self.r_stdout = bytearray()
        self.r_stderr = bytearray()
        self.r_exit_code: int | None = None
        self.r_status: dict[str, Any] | None = None
        self.r_end = "running"
        self.r_close_code: int | None = None
        self.r_close_reason: str | None = None
        self.r_finished = False

    # -- recording ------------------------------------------------------

    def snapshot(self) -> ExecLog:
        p = self.plan
        return ExecLog(
            index=self.index, request_index=self.request_index, kind=p.kind,
            namespace=p.pod.namespace, pod=p.pod.name, container=p.container.name,
            command=p.command, query=self.req.query, stdin_requested=p.stdin,
            stdout_requested=p.stdout, stderr_requested=p.stderr, tty=p.tty,
            headers=self.req.lower_headers(), user=p.user.name,
            effective_user=p.effective_user, impersonate_user=p.impersonate_user,
            impersonate_groups=p.impersonate_groups, offered_subprotocols=self.offered,
            subprotocol=self.subprotocol, stdin=bytes(self.r_stdin),
            stdin_messages=tuple(self.r_stdin_messages), resizes=tuple(self.r_resizes),
            stdin_closed=self.r_stdin_closed, events=tuple(self.r_events), pings=self.r_pings,
            stdout=bytes(self.r_stdout), stderr=bytes(self.r_stderr),
            pid=self.proc.pid if self.proc else None, exit_code=self.r_exit_code,
            status=self.r_status, end=self.r_end, client_close_code=self.r_close_code,
            client_close_reason=self.r_close_reason, finished=self.r_finished)

    def _set_end(self, end: str) -> None:
        with self.server._cond:
            if self.r_end == "running":
                self.r_end = end
            self.server._cond.notify_all()

    # -- main -----------------------------------------------------------

    async def run(self, head: bytes) -> int:
        """Complete the handshake and run the session; returns the HTTP status answered."""
        self.proto.receive_data(head)
        events = self.proto.events_received()
        if not events or not isinstance(events[0], Request):
            self.proto.send_response(self.proto.reject(400, "bad WebSocket handshake\n"))
            self._flush()
            return 400
        response = self.proto.accept(events[0])
        self.proto.send_response(response)
        if response.status_code != 101:
            self._flush()
            return response.status_code
        self.server._register_session(self)
        reader_task: asyncio.Task[None] | None = None
        try:
            self._flush()
            started = self._spawn()
            if started:
                self._send_ready()
            reader_task = asyncio.create_task(self._read_loop())
            if started:
                await self._wait_first(self._process_done(), self.conn_done.wait())
            if not self.conn_done.is_set():
                # The process ended (or never started): output is flushed; now the
                # Status, Close 1000, and a bounded wait for the client's Close (§7.3).
                self._send_final_status()
                self._set_end("exited" if started else "start_failed")
                if self.proto.state is State.OPEN:
                    self.proto.send_close(CLOSE_NORMAL)
                    self._flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.conn_done.wait(), self.server.close_wait_s)
        finally:
            if reader_task is not None:
                reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader_task
            await self._stop_process()
            self._close_fds()
            with self.server._cond:
                if self.r_end == "running":
                    self.r_end = "server_stopped"
                self.r_finished = True
                self.server._cond.notify_all()
            self.server._session_finished(self)
        return 101

    @staticmethod
    async def _wait_first(*aws: Any) -> None:
        tasks = [asyncio.ensure_future(a) for a in aws]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _process_done(self) -> None:
        """The process exited and its output reached EOF (bounded after the exit)."""
        await self.exited.wait()
        try:
            await asyncio.wait_for(self.outputs_eof.wait(), self.server.exit_grace_s)
        except TimeoutError:
            # A background child still holds the output open: stop reading, so no
            # output follows the Status.
            for fd in list(self.outputs):
                self._drain_output(fd, self.outputs[fd])
                self._stop_output(fd)

    # -- the WebSocket side ---------------------------------------------

    def _flush(self) -> None:
        for chunk in self.proto.data_to_send():
            if chunk and not self.writer.is_closing():
                self.writer.write(chunk)

    def _send_channel(self, channel: int, data: bytes) -> None:
        if self.proto.state is not State.OPEN:
            return
        if self.base64:
            self.proto.send_text(str(channel).encode() + base64.b64encode(data))
        else:
            self.proto.send_binary(bytes([channel]) + data)
        self._flush()

    def _send_ready(self) -> None:
        # An empty message on the lowest requested output channel says "streams
        # ready" (§1, §11).
        channel = (Channel.STDOUT if self.plan.stdout
                   else Channel.STDERR if self.plan.stderr else Channel.ERROR)
        self._send_channel(channel, b"")

    def _send_final_status(self) -> None:
        if self.start_error is not None:
            status: dict[str, Any] | None = internal_error_status(self.start_error)
            text = self.start_error
        elif self.plan.kind == "attach":
            # attach carries no exit code: Success when the process ended (§12).
            status, text = dict(SUCCESS_STATUS), None
        else:
            code = self.r_exit_code if self.r_exit_code is not None else 0
            status = exit_status(code)
            text = None if code == 0 else f"command terminated with exit code {code}"
        if self.subprotocol in JSON_STATUS_SUBPROTOCOLS:
            assert status is not None
            self._send_channel(Channel.ERROR, _compact(status))
            recorded: dict[str, Any] | None = status
        elif text is not None:
            # v1: plain error text on failure, nothing on success (§4.4).
            self._send_channel(Channel.ERROR, text.encode())
            recorded = {"text": text}
        else:
            recorded = None
        with self.server._cond:
            self.r_status = recorded
            self.server._cond.notify_all()

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError, OSError):
                    data = b""
                if not data:
                    self.proto.receive_eof()
                    self._flush()
                    self._set_end("client_eof")
                    return
                self.proto.receive_data(data)
                for frame in self.proto.events_received():
                    self._on_frame(frame)
                self._flush()
                if self.proto.parser_exc is not None:
                    self._record("bad_message", f"websocket: {self.proto.parser_exc}")
                    self._set_end("protocol_error")
                    return
                if self.proto.close_rcvd is not None or self.proto.state is State.CLOSED:
                    self._set_end("client_closed")
                    return
        finally:
            self.conn_done.set()

    def _on_frame(self, frame: Any) -> None:
        op = frame.opcode
        if op in (Opcode.TEXT, Opcode.BINARY):
            if frame.fin:
                self._on_message(op, bytes(frame.data))
            else:
                self.fragment = (op, bytearray(frame.data))
        elif op is Opcode.CONT and self.fragment is not None:
            self.fragment[1].extend(frame.data)
            if frame.fin:
                first_op, payload = self.fragment
                self.fragment = None
                self._on_message(first_op, bytes(payload))
        elif op is Opcode.PING:
            with self.server._cond:
                self.r_pings += 1  # websockets has queued the Pong already
        elif op is Opcode.CLOSE:
            close = self.proto.close_rcvd
            with self.server._cond:
                self.r_close_code = close.code if close is not None else None
                self.r_close_reason = close.reason if close is not None else None
                self.server._cond.notify_all()

    def _record(self, kind: str, value: Any) -> None:
        with self.server._cond:
            self.r_events.append((kind, value))
            self.server._cond.notify_all()

    def _on_message(self, op: Opcode, payload: bytes) -> None:
        kind = "text" if op is Opcode.TEXT else "binary"
        if self.base64:
            if not payload or not (0x30 <= payload[0] <= 0x39):
                self._record("bad_message", f"base64 message {payload[:16]!r}")
                return
            channel = payload[0] - 0x30
            try:
                data = base64.b64decode(payload[1:], validate=True)
            except binascii.Error:
                self._record("bad_message", f"invalid base64 {payload[:16]!r}")
                return
        else:
            if not payload:
                return  # an empty message is ignored (§4.1)
            channel, data = payload[0], payload[1:]
        if channel == Channel.CLOSE and self.v5:
            self._on_close_signal(data)
        elif channel == Channel.STDIN:
            self._on_stdin(kind, data)
        elif channel == Channel.RESIZE:
            for size in self.resize.feed(data):
                self._on_resize(size)
        else:
            self._record("unknown", (channel, data))

    def _on_close_signal(self, data: bytes) -> None:
        if len(data) != 1 or data[0] > Channel.RESIZE:
            # Malformed, or naming no channel: the real server ends the connection (§4.7).
            self._record("bad_message", f"CLOSE signal {data!r}")
            self._set_end("protocol_error")
            self.proto.fail(1002, "invalid CLOSE signal")
            self._flush()
            self.conn_done.set()
            return
        with self.server._cond:
            self.r_events.append(("close_signal", data[0]))
            if data[0] == Channel.STDIN:
                self.r_stdin_closed = True
            self.server._cond.notify_all()
        if data[0] == Channel.STDIN and self.pty_master is None:
            # Close the process's stdin once what is queued is written.  With a
            # TTY there is no separate stdin to close (kubectl never sends it then).
            self.stdin_close_pending = True
            self._pump_stdin()

    def _on_stdin(self, kind: str, data: bytes) -> None:
        with self.server._cond:
            self.r_stdin += data
            self.r_stdin_messages.append((kind, data))
            self.r_events.append(("stdin", data))
            marker = self.server._drop_on_stdin
            hit = marker is not None and marker in self.r_stdin[-(len(data) + len(marker)):]
            self.server._cond.notify_all()
        if hit:
            self.drop(rst=True)
            return
        if self.stdin_fd is not None and self.plan.stdin and not self.stdin_close_pending:
            self.stdin_buf += data
            self._pump_stdin()

    def _on_resize(self, size: tuple[int, int]) -> None:
        with self.server._cond:
            self.r_resizes.append(size)
            self.r_events.append(("resize", size))
            self.server._cond.notify_all()
        width, height = size
        if self.pty_master is not None and 0 < width < 65536 and 0 < height < 65536:
            # The kernel sends SIGWINCH to the terminal's foreground process group.
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.pty_master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", height, width, 0, 0))

    def drop(self, *, rst: bool) -> bool:
        """Fault injection: cut the TCP connection now, without a Close. False if already over."""
        if self.conn_done.is_set():
            return False
        self._set_end("dropped")
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        if rst and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        self.conn_done.set()
        return True

    # -- the process side -----------------------------------------------

    def _spawn(self) -> bool:
        plan = self.plan
        argv = list(plan.command) if plan.kind == "exec" else list(plan.container.attach_command)
        env = dict(os.environ)
        env.update(dict(plan.container.env))
        if plan.tty:
            env.setdefault("TERM", "xterm")
        cwd = plan.container.workdir
        child_fds: list[int] = []
        try:
            if plan.tty:
                master, slave = os.openpty()
                child_fds.append(slave)
                self.pty_master = master
                self.proc = subprocess.Popen(
                    argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                    start_new_session=True, preexec_fn=_take_controlling_tty)
                os.set_blocking(master, False)
                self.stdin_fd = master
                # Read the terminal even if stdout was not requested, so the process
                # never blocks on a full terminal buffer.
                self.outputs[master] = Channel.STDOUT
            else:
                fds: dict[str, int] = {}
                ours: dict[int, Channel] = {}
                if plan.stdin:
                    r, w = os.pipe()
                    child_fds.append(r)
                    fds["stdin"] = r
                    self.stdin_fd = w
                    os.set_blocking(w, False)
                for name, requested, channel in (("stdout", plan.stdout, Channel.STDOUT),
                                                 ("stderr", plan.stderr, Channel.STDERR)):
                    if requested:
                        r, w = os.pipe()
                        child_fds.append(w)
                        fds[name] = w
                        os.set_blocking(r, False)
                        ours[r] = channel
                self.outputs.update(ours)
                self.proc = subprocess.Popen(
                    argv, stdin=fds.get("stdin", subprocess.DEVNULL),
                    stdout=fds.get("stdout", subprocess.DEVNULL),
                    stderr=fds.get("stderr", subprocess.DEVNULL),
                    cwd=cwd, env=env, start_new_session=True)
        except OSError as exc:
            name = argv[0] if argv else ""
            self.start_error = ("error executing command in container: failed to exec in "
                                f"container: exec: \"{name}\": {exc.strerror or exc}")
            self._close_fds()
            return False
        finally:
            for fd in child_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd, channel in self.outputs.items():
            self.loop.add_reader(fd, self._on_output, fd, channel)
        if not self.outputs:
            self.outputs_eof.set()
        self._watch_exit()
        return True

    def _watch_exit(self) -> None:
        proc = self.proc
        assert proc is not None
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            def wait_in_thread() -> None:
                rc = proc.wait()
                with contextlib.suppress(RuntimeError):  # loop already closed
                    self.loop.call_soon_threadsafe(self._on_exit, rc)
            threading.Thread(target=wait_in_thread, name="fake-apiserver-wait",
                             daemon=True).start()
            return

        def on_pidfd() -> None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            self._on_exit(proc.wait())
        self.loop.add_reader(pidfd, on_pidfd)

    def _on_exit(self, returncode: int) -> None:
        with self.server._cond:
            self.r_exit_code = _exit_code(returncode)
            self.server._cond.notify_all()
        self.exited.set()

    def _on_output(self, fd: int, channel: Channel) -> None:
        try:
            data = os.read(fd, OUTPUT_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: every PTY slave fd is closed
        if not data:
            self._stop_output(fd)
            return
        self._emit_output(channel, data)

    def _drain_output(self, fd: int, channel: Channel) -> None:
        for _ in range(64):  # bounded: whatever is already buffered
            try:
                data = os.read(fd, OUTPUT_CHUNK)
            except OSError:
                return
            if not data:
                return
            self._emit_output(channel, data)

    def _emit_output(self, channel: Channel, data: bytes) -> None:
        requested = self.plan.stdout if channel == Channel.STDOUT else self.plan.stderr
        if not requested or self.conn_done.is_set():
            return  # not asked for, or nobody left to send it to
        with self.server._cond:
            (self.r_stdout if channel == Channel.STDOUT else self.r_stderr).extend(data)
            self.server._cond.notify_all()
        self._send_channel(channel, data)

    def _stop_output(self, fd: int) -> None:
        if fd in self.outputs:
            self.loop.remove_reader(fd)
            del self.outputs[fd]
            if fd != self.pty_master:
                os.close(fd)
        if not self.outputs:
            self.outputs_eof.set()

    def _pump_stdin(self) -> None:
        fd = self.stdin_fd
        if fd is None:
            return
        while self.stdin_buf:
            try:
                n = os.write(fd, self.stdin_buf)
            except BlockingIOError:
                if not self.writer_registered:
                    self.loop.add_writer(fd, self._pump_stdin)
                    self.writer_registered = True
                return
            except OSError:  # EPIPE: the process closed its stdin; EIO: PTY gone
                self.stdin_buf.clear()
                break
            del self.stdin_buf[:n]
        if self.writer_registered:
            self.loop.remove_writer(fd)
            self.writer_registered = False
        if self.stdin_close_pending and fd != self.pty_master:
            os.close(fd)
            self.stdin_fd = None

    async def _stop_process(self) -> None:
        """Close stdin, give the process a moment, then kill its process group."""
        proc = self.proc
        if self.stdin_fd is not None and self.stdin_fd != self.pty_master:
            if self.writer_registered:
                self.loop.remove_writer(self.stdin_fd)
                self.writer_registered = False
            os.close(self.stdin_fd)
            self.stdin_fd = None
        if proc is None:
            return
        if (proc.returncode is None and not self.exited.is_set()
                and self.r_end != "server_stopped"):
            if self.pty_master is not None:
                # Closing the terminal hangs the session up, as a dropped connection would.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGHUP)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exited.wait(), self.server.kill_grace_s)
        # Kill what is left of the process group (the process, or its background children).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), 5.0)

    def _close_fds(self) -> None:
        for fd in list(self.outputs):
            self._stop_output(fd)
        if self.writer_registered and self.stdin_fd is not None:
            self.loop.remove_writer(self.stdin_fd)
            self.writer_registered = False
        if self.stdin_fd is not None and self.stdin_fd != self.pty_master:
            os.close(self.stdin_fd)
        self.stdin_fd = None
        if self.pty_master is not None:
            os.close(self.pty_master)
            self.pty_master = None


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class FakeApiServer:
    """A fake kube-apiserver on 127.0.0.1 over HTTPS, in a background thread.

    Args:
        pods: the pods it knows (default: ``FakePod("mypod")`` in ``default``
            with one container ``main``).
        tokens: bearer token -> :class:`FakeUser` (default ``{"test-token":
            FakeUser("tester")}``).
        deny: RBAC denials (:class:`Deny`); a denied request gets 403 with the
            real message.  A plain string denies that user ``pods/exec`` and
            ``pods/attach`` (it may still read the pod).
        mode: :class:`Mode` (``"current"``: v5+v4, ``"legacy"``: v4 and older only).
        minor: the minor version ``/version`` reports (the kubectl dispatcher
            picks ``kubectl.1.<minor>`` by it).
        host, port: where to listen (port 0: any free port; see :attr:`port`).
        ca: a ``trustme.CA`` to issue the server certificate (default: a new one).
        response_delay_s: delay before every non-upgrade answer (fault injection).
        upgrade_delay_s: delay before every 101 (fault injection).
        drop_on_stdin: when a session's stdin contains these bytes, drop its TCP
            connection (RST) at once (fault injection).
        close_wait_s: how long to wait for the client's Close after ours (§7.3).
        exit_grace_s: after the process exits, how long to wait for its output EOF.
        kill_grace_s: after the client leaves, how long before the process is killed.
        on_exec_finished: called on the server thread with each finished :class:`ExecLog`.
        check_errors: make :meth:`stop` raise if a handler crashed.

    Start with :meth:`start` (or ``with``); it returns once listening.  Stop with
    :meth:`stop`: live sessions are cut, their processes killed.
    """

    def __init__(self, *, pods: Iterable[FakePod] | None = None,
                 tokens: Mapping[str, FakeUser] | None = None,
                 deny: Iterable[Deny | str] = (), mode: Mode | str = Mode.CURRENT,
                 minor: str = "32", host: str = "127.0.0.1", port: int = 0,
                 ca: trustme.CA | None = None, response_delay_s: float = 0.0,
                 upgrade_delay_s: float = 0.0, drop_on_stdin: bytes | None = None,
                 close_wait_s: float = 5.0, exit_grace_s: float = 2.0,
                 kill_grace_s: float = 1.0,
                 on_exec_finished: Callable[[ExecLog], None] | None = None,
                 check_errors: bool = True) -> None:
        self.host = host
        self._want_port = port
        self.mode = Mode(mode)
        self.minor = minor
        self.close_wait_s = close_wait_s
        self.exit_grace_s = exit_grace_s
        self.kill_grace_s = kill_grace_s
        self.check_errors = check_errors
        self._on_exec_finished = on_exec_finished
        self._cond = threading.Condition()
        self._pods: dict[tuple[str, str], FakePod] = {}
        for pod in pods if pods is not None else [FakePod("mypod")]:
            self._pods[(pod.namespace, pod.name)] = pod
        self._tokens = dict(tokens if tokens is not None else {"test-token": FakeUser("tester")})
        self._deny: list[Deny] = []
        for rule in deny:
            if isinstance(rule, str):
                # "may look at pods but not get into them": the usual RBAC denial, so
                # kubectl gets as far as the upgrade and prints the exec message (§9).
                self._deny += [Deny(user=rule, resource="pods/exec"),
                               Deny(user=rule, resource="pods/attach")]
            else:
                self._deny.append(rule)
        self._response_delay_s = response_delay_s
        self._upgrade_delay_s = upgrade_delay_s
        self._drop_on_stdin = drop_on_stdin
        self._refusals: list[tuple[int, str | None]] = []
        self._last_refusal: dict[str, _Answer] = {}
        self._requests: list[RequestLog] = []
        self._sessions: list[_ExecSession] = []
        self._errors: list[str] = []
        self.loop_messages: list[str] = []
        self.ca = ca or trustme.CA()
        self._dir = tempfile.TemporaryDirectory(prefix="fake-apiserver-")
        self.ca_path = Path(self._dir.name) / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def start(self) -> FakeApiServer:
        """Start listening; returns once :attr:`port` is bound (or raises)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._thread_main, name="fake-apiserver",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fake apiserver did not start within 30 s")
        if self._startup_error is not None:
            raise RuntimeError("fake apiserver failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        """Cut live sessions, kill their processes, stop the thread; raise on handler errors."""
        if self._thread is None:
            return
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        self._thread.join(30)
        alive = self._thread.is_alive()
        self._thread = None
        self._dir.cleanup()
        if alive:
            raise RuntimeError("fake apiserver thread did not stop within 30 s")
        if self.check_errors and self._errors:
            raise AssertionError("fake apiserver handler errors:\n" + "\n".join(self._errors))

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(self._on_loop_exception)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()/stop()
            if not self._ready.is_set():
                self._startup_error = exc
            else:
                self._errors.append("".join(traceback.format_exception(exc)))
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
        # asyncio reports TLS teardown noise from clients that vanish here; keep
        # it for debugging instead of printing it.
        self.loop_messages.append(f"{context.get('message')}: {context.get('exception')!r}")

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        # Client certificates are optional: a token is the usual credential.
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        # TLS 1.2 at most: with TLS 1.3 a client's request that arrives with its
        # Finished is, now and then, left unread by asyncio's SSL protocol until
        # more bytes come, and a client waiting for the answer never sends any:
        # the hang seen in CI (here, 1 of 48 runs of test_fake_apiserver.py under
        # load; with TLS 1.2, 0 of 80).  In TLS 1.2 the server's Finished is the
        # last handshake flight, so no request can arrive with the client's.
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        server = await asyncio.start_server(
            self._on_connection, self.host, self._want_port, ssl=ctx, limit=MAX_HEAD,
            ssl_handshake_timeout=10.0, ssl_shutdown_timeout=2.0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            for session in self._live_sessions():
                session._set_end("server_stopped")
                session.drop(rst=False)
            for writer in list(self._writers):
                writer.transport.abort()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=15)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    # -- runtime control (thread-safe) ----------------------------------

    def add_pod(self, pod: FakePod) -> None:
        with self._cond:
            self._pods[(pod.namespace, pod.name)] = pod

    def remove_pod(self, name: str, namespace: str = "default") -> None:
        with self._cond:
            self._pods.pop((namespace, name), None)

    def add_token(self, token: str, user: FakeUser) -> None:
        with self._cond:
            self._tokens[token] = user

    def refuse_upgrades(self, n: int, status: int = 503, message: str | None = None) -> None:
        """Answer the next ``n`` valid exec/attach upgrades with ``status`` and a Status body.

        kubectl's SPDY retry of a refused upgrade gets the same answer (§9).
        """
        with self._cond:
            self._refusals.extend([(status, message)] * n)

    def set_delays(self, *, response_delay_s: float | None = None,
                   upgrade_delay_s: float | None = None) -> None:
        with self._cond:
            if response_delay_s is not None:
                self._response_delay_s = response_delay_s
            if upgrade_delay_s is not None:
                self._upgrade_delay_s = upgrade_delay_s

    def set_drop_on_stdin(self, marker: bytes | None) -> None:
        with self._cond:
            self._drop_on_stdin = marker

    def drop_connections(self, *, rst: bool = True, timeout: float = 10.0) -> int:
        """Cut the TCP connection of every live exec/attach now (no Close frame).

        The processes are then stopped as for a vanished client.  Returns how
        many sessions were cut.
        """
        loop = self._loop
        assert loop is not None, "not started"

        async def drop_all() -> int:
            return sum(1 for s in self._live_sessions() if s.drop(rst=rst))

        return asyncio.run_coroutine_threadsafe(drop_all(), loop).result(timeout)

    def issue_client_cert(self, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate (CN=user, O=groups) the fake accepts; (cert, key) PEM paths."""
        cert = self.ca.issue_cert(f"{user}.client.fake", common_name=user,
                                  organization_name=",".join(groups) or None)
        base = Path(self._dir.name) / f"client-{user}"
        cert_path, key_path = base.with_suffix(".crt"), base.with_suffix(".key")
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    # -- logs (thread-safe) ---------------------------------------------

    @property
    def requests(self) -> list[RequestLog]:
        with self._cond:
            return list(self._requests)

    @property
    def execs(self) -> list[ExecLog]:
        with self._cond:
            return [s.snapshot() for s in self._sessions]

    @property
    def errors(self) -> list[str]:
        with self._cond:
            return list(self._errors)

    def wait_exec(self, index: int = 0, *, until: Callable[[ExecLog], bool] | None = None,
                  timeout: float = 10.0) -> ExecLog:
        """Block until exec/attach number ``index`` exists and ``until(log)`` holds.

        The default condition is "finished".  Raises TimeoutError with the last
        state otherwise.  From trio: ``await trio.to_thread.run_sync(api.wait_exec)``.
        """
        cond = until or (lambda log: log.finished)
        last: list[ExecLog | None] = [None]

        def ready() -> bool:
            if len(self._sessions) <= index:
                return False
            snap = last[0] = self._sessions[index].snapshot()
            return cond(snap)

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise TimeoutError(f"exec #{index} not ready after {timeout} s: {last[0]}")
            assert last[0] is not None
            return last[0]

    def wait_request(self, predicate: Callable[[RequestLog], bool], *,
                     timeout: float = 10.0) -> RequestLog:
        """Block until a logged request satisfies ``predicate``; return it."""
        found: list[RequestLog] = []

        def ready() -> bool:
            found[:] = [r for r in self._requests if predicate(r)][:1]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise TimeoutError(f"no matching request after {timeout} s: {self._requests}")
            return found[0]

    # -- internals ------------------------------------------------------

    def _live_sessions(self) -> list[_ExecSession]:
        with self._cond:
            return [s for s in self._sessions if not s.r_finished]

    def _register_session(self, session: _ExecSession) -> None:
        with self._cond:
            session.index = len(self._sessions)
            self._sessions.append(session)
            self._cond.notify_all()

    def _session_finished(self, session: _ExecSession) -> None:
        if self._on_exec_finished is not None:
            try:
                self._on_exec_finished(session.snapshot())
            except Exception:  # noqa: BLE001 - a test callback must not kill the server
                self._errors.append(traceback.format_exc())

    def _log_request(self, req: _HttpRequest, user: str | None, status: int) -> int:
        with self._cond:
            index = len(self._requests)
            self._requests.append(RequestLog(index, req.method, req.path, req.query,
                                             req.lower_headers(), user, status))
            self._cond.notify_all()
            return index

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve_connection(reader, writer)
        except Exception:  # noqa: BLE001 - recorded, raised by stop()
            self._errors.append(traceback.format_exc())
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 3)
            except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
                writer.transport.abort()
            self._tasks.discard(task)

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        peercert = writer.get_extra_info("peercert")
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                    ssl.SSLError, OSError):
                return
            try:
                req = _parse_head(head)
                length = int(req.header("content-length") or "0")
            except ValueError as exc:
                writer.write(_http_response(400, _compact(api_status(
                    400, "BadRequest", f"malformed request: {exc}")), close=True))
                return
            if req.header("transfer-encoding") or length > MAX_MESSAGE:
                writer.write(_http_response(400, _compact(api_status(
                    400, "BadRequest", "request body not supported")), close=True))
                return
            if length:
                try:
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
                    return
            if not await self._dispatch(req, head, peercert, reader, writer):
                return

    async def _dispatch(self, req: _HttpRequest, head: bytes, peercert: Any,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        user, answer = self._authenticate(req, peercert)
        plan: _ExecPlan | None = None
        if answer is None:
            answer, plan = self._route(req, user)
        if plan is None:
            assert answer is not None
            with self._cond:
                delay = self._response_delay_s
            if delay:
                await asyncio.sleep(delay)
            close = answer.close or (req.header("connection") or "").lower() == "close"
            # Logged before the answer leaves: a client that got it may read the log.
            self._log_request(req, user.name if user else None, answer.status)
            writer.write(_http_response(answer.status, answer.body, close=close,
                                        content_type=answer.content_type))
            return not close
        return await self._upgrade(req, head, plan, reader, writer)

    async def _upgrade(self, req: _HttpRequest, head: bytes, plan: _ExecPlan,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        offered = tuple(p.strip() for line in req.header_all("sec-websocket-protocol")
                        for p in line.split(",") if p.strip())
        accepted, chosen = negotiate(offered, self.mode)
        if not accepted:
            # A kubelet answers 403 with an empty body (§3.4).
            self._log_request(req, plan.user.name, 403)
            writer.write(_http_response(403, b"", close=True))
            return False
        with self._cond:
            delay = self._upgrade_delay_s
        if delay:
            await asyncio.sleep(delay)
        session = _ExecSession(self, plan, req, -1, reader, writer, offered, chosen)
        # Log the request first so the ExecLog can point at it; fix the status after.
        index = self._log_request(req, plan.user.name, 101)
        session.request_index = index
        status = await session.run(head)
        if status != 101:
            with self._cond:
                self._requests[index] = dataclasses.replace(self._requests[index], status=status)
        return False

    # -- authentication, authorization, routing -------------------------

    def _authenticate(self, req: _HttpRequest,
                      peercert: Any) -> tuple[FakeUser | None, _Answer | None]:
        auth = req.header("authorization")
        unauthorized = _Answer.status_json(401, "Unauthorized")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            with self._cond:
                user = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            return (user, None) if user is not None else (None, unauthorized)
        if peercert:
            subject = dict(x[0] for x in peercert.get("subject", ()))
            name = subject.get("commonName")
            if name:
                groups = tuple(g for g in subject.get("organizationName", "").split(",") if g)
                return FakeUser(name, groups), None
        if req.path == "/version" and req.method == "GET":
            return None, None  # public, like system:public-info-viewer
        return None, unauthorized

    def _forbidden(self, user: str, verb: str, resource: str, name: str,
                   namespace: str) -> _Answer:
        group_resource, _, _sub = resource.partition("/")
        message = (f'{group_resource} "{name}" is forbidden: User "{user}" cannot {verb} '
                   f'resource "{resource}" in API group "" in the namespace "{namespace}"')
        return _Answer.status_json(403, message, details={"name": name, "kind": group_resource})

    def _route(self, req: _HttpRequest,
               user: FakeUser | None) -> tuple[_Answer | None, _ExecPlan | None]:
        path = req.path.rstrip("/") or "/"
        parts = path.strip("/").split("/")
        not_found = _Answer.status_json(404, "the server could not find the requested resource",
                                        details={})
        if req.method == "GET" and path == "/version":
            return _Answer(200, _compact({
                "major": "1", "minor": self.minor, "gitVersion": f"v1.{self.minor}.0",
                "gitCommit": "fake", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.23.0", "compiler": "gc", "platform": "linux/amd64"})), None
        if req.method == "GET" and path == "/api":
            return _Answer(200, _compact({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                "serverAddress": f"{self.host}:{self.port}"}]})), None
        if req.method == "GET" and path == "/apis":
            return _Answer(200, _compact({"kind": "APIGroupList", "apiVersion": "v1",
                                          "groups": []})), None
        if req.method == "GET" and path == "/api/v1":
            return _Answer(200, _compact(_API_V1_RESOURCES)), None
        if (len(parts) in (6, 7) and parts[:3] == ["api", "v1", "namespaces"]
                and parts[4] == "pods"):
            assert user is not None
            namespace, name = parts[3], parts[5]
            if len(parts) == 6:
                if req.method != "GET":
                    return _Answer.status_json(405, "the server does not allow this method "
                                                    "on the requested resource",
                                               reason="MethodNotAllowed"), None
                denied = self._authorize(user, user.groups, "get", "pods", name, namespace)
                if denied is not None:
                    return denied, None
                with self._cond:
                    pod = self._pods.get((namespace, name))
                if pod is None:
                    return _pod_not_found(name), None
                return _Answer(200, _compact(pod.to_json())), None
            if parts[6] in ("exec", "attach") and req.method in ("GET", "POST"):
                return self._exec_verdict(req, user, namespace, name, parts[6])
        return not_found, None

    def _authorize(self, user: FakeUser, groups: Sequence[str], verb: str, resource: str,
                   name: str, namespace: str, as_user: str | None = None) -> _Answer | None:
        who = as_user or user.name
        with self._cond:
            deny = list(self._deny)
        for rule in deny:
            if rule.matches(who, groups, verb, resource, namespace):
                return self._forbidden(who, verb, resource, name, namespace)
        return None

    def _exec_verdict(self, req: _HttpRequest, user: FakeUser, namespace: str, name: str,
                      kind: str) -> tuple[_Answer | None, _ExecPlan | None]:
        resource = f"pods/{kind}"
        verb = "get" if req.method == "GET" else "create"
        # Impersonation: the request is then authorized as the impersonated user.
        imp_user = req.header("impersonate-user")
        imp_groups = tuple(req.header_all("impersonate-group"))
        effective, groups = user.name, user.groups
        if imp_user is not None or imp_groups:
            if not user.can_impersonate:
                target = imp_user or (imp_groups[0] if imp_groups else "")
                kind_name = "users" if imp_user is not None else "groups"
                return _Answer.status_json(
                    403, f'{kind_name} "{target}" is forbidden: User "{user.name}" cannot '
                         f'impersonate resource "{kind_name}" in API group "" at the cluster scope',
                    details={"name": target, "kind": kind_name}), None
            effective = imp_user or user.name
            groups = imp_groups + ("system:authenticated",)
        denied = self._authorize(user, groups, verb, resource, name, namespace, as_user=effective)
        if denied is not None:
            return denied, None
        with self._cond:
            pod = self._pods.get((namespace, name))
        if pod is None:
            return _pod_not_found(name), None
        container_name = req.query_one("container")
        if not container_name:
            if len(pod.containers) == 1:
                container_name = pod.containers[0].name
            elif not pod.containers:
                return _Answer.status_json(
                    400, f"a container name must be specified for pod {name}"), None
            else:
                names = " ".join(c.name for c in pod.containers)
                return _Answer.status_json(
                    400, f"a container name must be specified for pod {name}, "
                         f"choose one of: [{names}]"), None
        container = pod.container(container_name)
        if container is None:
            return _Answer.status_json(
                400, f"container {container_name} is not valid for pod {name}"), None
        if pod.node_name is None:
            return _Answer.status_json(400, f"pod {name} does not have a host assigned"), None
        if req.method == "POST":
            # kubectl's SPDY retry: repeat what the GET got, else say SPDY is not spoken.
            with self._cond:
                replay = self._last_refusal.pop(req.target, None)
            if replay is not None:
                return replay, None
            return _Answer.status_json(
                400, "this fake kube-apiserver speaks exec/attach over WebSocket only "
                     "(no SPDY/3.1): use kubectl >= 1.30, or set "
                     "KUBECTL_REMOTE_COMMAND_WEBSOCKETS=true with kubectl 1.29",
                close=True), None
        if not req.is_websocket_upgrade():
            return _Answer.status_json(400, "Upgrade request required"), None
        flags: dict[str, bool] = {}
        for key in ("stdin", "stdout", "stderr", "tty"):
            raw = req.query_one(key)
            try:
                flags[key] = parse_go_bool(raw) if raw is not None else False
            except ValueError:
                return _Answer.status_json(
                    400, f"invalid value for {key}: {raw!r}", close=True), None
        if flags["tty"]:
            flags["stderr"] = False  # a terminal merges stderr into stdout (§3.1)
        if not (flags["stdin"] or flags["stdout"] or flags["stderr"]):
            return _Answer.status_json(
                400, "you must specify at least 1 of stdin, stdout, stderr", close=True), None
        command = tuple(req.query_all("command"))
        if kind == "exec" and not command:
            return _Answer.status_json(
                400, "you must specify at least one command for the container",
                close=True), None
        with self._cond:
            refusal = self._refusals.pop(0) if self._refusals else None
        if refusal is not None:
            code, message = refusal
            answer = _Answer.status_json(
                code, message or ("the server is currently unable to handle the request"
                                  if code == 503 else f"fake apiserver: injected HTTP {code}"),
                close=True)
            with self._cond:
                self._last_refusal[req.target] = answer
            return answer, None
        return None, _ExecPlan(kind, pod, container, command, flags["stdin"], flags["stdout"],
                               flags["stderr"], flags["tty"], user, effective,
                               imp_user, imp_groups)


def _pod_not_found(name: str) -> _Answer:
    return _Answer.status_json(404, f'pods "{name}" not found',
                               details={"name": name, "kind": "pods"})


_API_V1_RESOURCES: dict[str, Any] = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                   "watch"], "shortNames": ["po"], "categories": ["all"]},
        {"name": "pods/attach", "singularName": "", "namespaced": True, "kind": "PodAttachOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/portforward", "singularName": "", "namespaced": True,
         "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
        {"name": "namespaces", "singularName": "namespace", "namespaced": False,
         "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]},
    ],
}


# ---------------------------------------------------------------------------
# Command line: run as a process
# ---------------------------------------------------------------------------


def _parse_user_spec(spec: str, *, impersonator: bool = False) -> tuple[str, FakeUser]:
    token, sep, rest = spec.partition("=")
    if not sep or not token or not rest:
        raise argparse.ArgumentTypeError(f"expected TOKEN=USER[:GROUP,...], got {spec!r}")
    name, _, groups = rest.partition(":")
    return token, FakeUser(name, tuple(g for g in groups.split(",") if g),
                           can_impersonate=impersonator)


def _parse_pod_spec(spec: str, namespace: str) -> FakePod:
    name, _, containers = spec.partition(":")
    names = [c for c in containers.split(",") if c] or ["main"]
    return FakePod(name, namespace, tuple(FakeContainer(c) for c in names))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.fake_apiserver",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the fake until SIGTERM/SIGINT")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--ready-file", type=Path, help="write {url,port,ca_path,pid} here")
    serve.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.CURRENT.value)
    serve.add_argument("--minor", default="32", help="minor version on /version")
    serve.add_argument("--token", action="append", default=[], metavar="TOKEN=USER[:G1,G2]")
    serve.add_argument("--impersonator", action="append", default=[],
                       metavar="TOKEN=USER[:G1,G2]", help="a token allowed to impersonate")
    serve.add_argument("--deny", action="append", default=[], metavar="USER",
                       help="deny USER pods/exec and pods/attach")
    serve.add_argument("--pod", action="append", default=[], metavar="NAME[:C1,C2]")
    serve.add_argument("--namespace", default="default", help="namespace of --pod pods")
    serve.add_argument("--cert-dir", type=Path, help="also write ca.pem here")
    serve.add_argument("--log-file", type=Path, help="append each finished exec as JSON")
    serve.add_argument("--refuse", type=int, default=0, help="refuse the first N upgrades")
    serve.add_argument("--refuse-status", type=int, default=503)
    args = parser.parse_args(argv)

    tokens = dict(_parse_user_spec(s) for s in args.token) or {"test-token": FakeUser("tester")}
    tokens.update(_parse_user_spec(s, impersonator=True) for s in args.impersonator)
    pods = [_parse_pod_spec(p, args.namespace) for p in args.pod] or None
    log_lock = threading.Lock()

    def log_exec(log: ExecLog) -> None:
        if args.log_file is not None:
            with log_lock, args.log_file.open("a") as f:
                f.write(json.dumps(log.to_json()) + "\n")

    api = FakeApiServer(pods=pods, tokens=tokens, deny=args.deny, mode=args.mode,
                        minor=args.minor, host=args.host, port=args.port,
                        on_exec_finished=log_exec, check_errors=False)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    api.start()
    if args.refuse:
        api.refuse_upgrades(args.refuse, args.refuse_status)
    ca_path = api.ca_path
    if args.cert_dir is not None:
        args.cert_dir.mkdir(parents=True, exist_ok=True)
        ca_path = args.cert_dir / "ca.pem"
        ca_path.write_bytes(api.ca_pem)
    ready = {"url": api.url, "port": api.port, "ca_path": str(ca_path), "pid": os.getpid()}
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(json.dumps(ready))
        os.replace(tmp, args.ready_file)  # atomic: a reader never sees half a file
    print(json.dumps(ready), flush=True)
    try:
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        api.stop()
        for err in api.errors:
            print(err, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
