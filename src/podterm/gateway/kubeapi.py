"""The gateway as kube-apiserver for kubectl: version, discovery, the pod, exec and attach.

Spec: ``shared/spec/k8s-exec-protocol.md`` (section numbers below refer to it).
A kubeconfig whose cluster is the gateway makes an unmodified ``kubectl exec``
(1.30+; 1.29 with ``KUBECTL_REMOTE_COMMAND_WEBSOCKETS=true``) and the official
Python client work, authenticated, authorized and run as podterm sessions.

What is served
--------------

=====================================================  =============================================
request                                                answer
=====================================================  =============================================
``GET /version`` (public)                              ``{"major":"1","minor":"32",...}``: a minor
                                                       >= 30, or the Cloud SDK dispatcher would pick
                                                       a kubectl that cannot speak WebSocket (§2.1)
``GET /api``, ``/apis``, ``/api/v1``                   minimal discovery (§2.2); any authenticated
                                                       user (kube-apiserver's ``system:discovery``)
``GET /api/v1/namespaces/{ns}/pods/{pod}``             the Pod, with ``kind``/``apiVersion`` (§2.2)
``GET|POST .../pods/{pod}/exec`` and ``/attach``       WebSocket upgrade (GET); the SPDY retry (POST)
                                                       gets the GET's verdict, or 400 with advice
anything else under ``/api``, ``/apis``                404 ``NotFound`` Status
=====================================================  =============================================

Every failure is a Kubernetes ``Status`` with ``kind``, ``apiVersion`` and
``code`` (§9) -- 401 and 403 from the router included (``render_error``) --
and never a stack trace: a bug answers 500 ``InternalError``.

Where answers come from: a :class:`KubeBackend`.  :class:`LocalBackend`
synthesizes everything for the ``local`` upstream; :class:`ApiserverBackend`
passes ``/api``, ``/apis``, ``/api/v1`` and the pod GET through to the real
apiserver of the ``kube`` upstream (as the caller, when it impersonates), and
its ``/version`` only when the minor is at least 30.

The pods of the local upstream
------------------------------
Every syntactically valid pod name (a DNS-1123 subdomain) in every valid
namespace (a DNS-1123 label) names *this machine*: the pod exists, is
``Running``, and has one container, ``main`` (``stdin`` and ``tty`` true, so
``kubectl attach -it`` asks for a terminal).  ``exec`` runs the command there
through the local upstream; ``attach`` starts an interactive login shell (the
local upstream has no long-running main process to attach to).  Any other
pod name is ``404 NotFound``; any other container is ``400`` ``container X is
not valid for pod P``.

The pods of agents
------------------
A pod whose sidecar agent is connected to this gateway (``podterm agent``,
docs/agent.md) is served by the agent upstream, whatever the default
upstream is: its exec and attach run as agent sessions (so they survive this
gateway, like any agent session; kubectl itself cannot resume, see below).
With the local backend its pod GET is synthesized with the agent's
containers (``main`` when it reports none).  A pod whose agent is connected
to *another* peer is forwarded there before it gets here
(gateway/peers.py, docs/ha.md).

The exec/attach upgrade
-----------------------
Checks, in this order, the same for the GET and for kubectl's SPDY ``POST``
retry (§9 "fallback trap": kubectl shows only the second answer): 401/403
(router), 400 bad query parameters, then (POST only) the upstream's refusal
of the same user's GET of the same URL, if one is remembered; 404 pod, 400
container, 503 draining; then a POST gets 400 with upgrade advice (§10), a
GET without upgrade 400 ``Upgrade request required``, a GET offering no
supported subprotocol 400.
The subprotocol is chosen by :func:`~podterm.protocol.k8s_channel.negotiate`
(v5 > v4 > v4.base64 > channel > base64).

The command runs as a :class:`~podterm.session.session.Session` in the
registry (owned by the caller, counted, audited and recorded like any other).
On the ``kube`` upstream (:data:`OPEN_BEFORE_UPGRADE`) it starts *before* the
101, within ``open_timeout_s``: a refusal by the apiserver (403 for an
impersonated user, 404 for a pod gone since kubectl's GET, 400, an apiserver
the gateway cannot reach: 503, no answer in time: 504 ``Timeout``) is then a
refused upgrade with the apiserver's code and Status, which kubectl prints
as ``Error from server (Forbidden): ...``, and the refusal is remembered
(:class:`RefusalMemory`) for kubectl's SPDY retry.  Such a tty session opens
its upstream without a terminal size: kubectl's first resize is the first
the apiserver gets.  On the ``local`` upstream the session starts after the
101 (with an 80x24 PTY until kubectl's size arrives); a failure to start is
then a Failure Status on channel 3.  Either way :func:`k8s_relay` attaches
to it as its writer:

* the empty "ready" message on the lowest requested output channel;
* stdin from text or binary messages; resize from channel 4; v5 ``FF 00``
  closes the process's input (:meth:`Session.close_input`); exec without
  stdin (and without a tty) starts with its input closed;
* output on channel 1, and 2 when ``tty=false``; output is acknowledged to
  the session as soon as the socket took it (TCP is the flow control);
* at the end: the rest of the output, exactly one Status on channel 3
  (``Success`` or ``NonZeroExitCode``), Close 1000, and a bounded wait for
  the client's Close (§7.3);
* a session the gateway ends itself (``podterm kill``, a timer, the drain
  deadline, an upstream failure, a bug) ends with a Failure Status whose
  message says so, then Close 1000: kubectl prints ``error: <message>``;
* kubectl's PINGs are answered by the reader at once; the gateway PINGs too
  (every ``heartbeat_interval_s``), for idle middleboxes and to find dead
  links; server CLOSE signals (``FF nn``) are never sent (§7.4).

kubectl cannot resume: when its connection goes before the session ended,
the session is killed (reason ``client_gone``).  During a drain kubectl
sessions keep running until the drain deadline (drain waits for them).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, urlsplit

import trio

from podterm.auth.identity import Identity
from podterm.errors import (
    CloseCode,
    HandshakeError,
    PodtermError,
    ProtocolViolation,
    UpstreamError,
)
from podterm.gateway.http import Request, Response, Upgraded
from podterm.gateway.router import Call, Route
from podterm.metrics import GatewayCounters
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, accept_on
from podterm.protocol.events import Resize, Stdin, StdinClose
from podterm.protocol.handshake import extract_bearer_subprotocol, parse_upgrade
from podterm.protocol.k8s_channel import (
    OP_BINARY,
    SUBPROTOCOLS,
    K8sServerChannel,
    OutMessage,
    negotiate,
    status_json,
)
from podterm.protocol.websocket import WsLimits
from podterm.resilience.heartbeat import Heartbeat
from podterm.session.attachment import Attachment, Mode
from podterm.session.registry import SessionRegistry
from podterm.session.session import Session
from podterm.store.base import PodIdentity
from podterm.upstream.agent import AgentInfo, AgentUpstream
from podterm.upstream.base import StreamSpec

__all__ = [
    "ApiserverBackend",
    "ApiserverReader",
    "DEFAULT_VERSION",
    "ExecOptions",
    "KubeApi",
    "KubeBackend",
    "KubeStatusError",
    "LocalBackend",
    "OPEN_BEFORE_UPGRADE",
    "PodInfo",
    "RefusalMemory",
    "SPDY_MESSAGE",
    "k8s_relay",
    "parse_exec_options",
    "status_response",
]

log = logging.getLogger(__name__)

#: ``GET /version``.  The minor must be >= 30: the Cloud SDK dispatcher runs
#: the bundled ``kubectl.1.<minor>`` and kubectl <= 1.29 speaks only SPDY by
#: default (§2.1, §10).  32 is also the dispatcher's own default binary.
DEFAULT_VERSION: Final[Mapping[str, str]] = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.0-podterm", "gitCommit": "",
    "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "gc",
    "platform": "linux/amd64",
}

#: §10: what a client that only speaks SPDY is told (kubectl prints it as
#: ``Error from server (BadRequest): ...``).
SPDY_MESSAGE: Final = (
    "podterm supports kubectl exec and attach over WebSocket only, and this client "
    "speaks SPDY: use kubectl >= 1.30, or set KUBECTL_REMOTE_COMMAND_WEBSOCKETS=true "
    "with kubectl 1.29 (and do not set it to false)")

#: Largest output payload per message: kubectl's own copy buffer (§4.1) and
#: what the real servers write per read.
MAX_OUTPUT_MESSAGE_BYTES: Final = 32 * 1024
#: Output bytes put in one socket write at most (p99 over throughput).
MAX_BATCH_BYTES: Final = 256 * 1024
#: Upstreams whose sessions start before kubectl's upgrade is answered, so that
#: their refusals reach kubectl as refused upgrades (§9).  Not ``local``: it
#: refuses nothing a pod check would not have caught, and its PTY needs a size.
OPEN_BEFORE_UPGRADE: Final = frozenset({"kube"})
#: Command bounds, as the REST API's (``podterm.gateway.api``).
MAX_COMMAND_ARGS: Final = 256
MAX_COMMAND_BYTES: Final = 64 * 1024

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SEGMENT = r"[^/]+"
_POD_PATH = (rf"/api/v1/namespaces/(?P<namespace>{_SEGMENT})/pods/(?P<pod>{_SEGMENT})")
_CONNECT_PATH = _POD_PATH + r"/(?P<subresource>exec|attach)"
#: Every path under /api and /apis except podterm's own /api/v1/sessions API.
_KUBE_ANY_PATH = r"/apis(/.*)?|/api(?!/v1/sessions(/|$))(/.*)?"
_ALL_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: Go's strconv.ParseBool, which the apiserver uses for these parameters (§3.1).
_TRUE: Final = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "false", "FALSE", "False"})
_BOOL_PARAMS: Final = ("stdin", "stdout", "stderr", "tty")

_JSON: Final = "application/json"
_NO_STORE: Final = (("Cache-Control", "no-store"),)


# ---------------------------------------------------------------- Status answers


class KubeStatusError(PodtermError):
    """A request refused with a Kubernetes ``Status`` (§9).

    Attributes:
        reason: the Status ``reason`` (``NotFound``, ``BadRequest``, ...).
        details: StatusDetails fields (``name``, ``kind``, ``causes``), or None.
    """

    def __init__(self, http_status: int, reason: str, message: str,
                 details: Mapping[str, Any] | None = None, *,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message, http_status=http_status)
        self.reason_name = reason
        self.reason = reason
        self.details = details
        #: Extra response headers (``Retry-After`` of a 429); ``render_error`` adds them.
        self.headers = list(headers)

    @classmethod
    def of(cls, exc: PodtermError) -> KubeStatusError:
        """``exc`` as the Status a kube-apiserver would answer with (§9).

        The code is ``exc.http_status`` (what podterm answers for it: an
        apiserver's 400/403/404 unchanged, 502 when it rejected the gateway's
        own credentials); the reason, message and details are ``exc``'s.  A
        reason of ``Unauthorized`` is kept only with code 401: kubectl reads
        that reason as "log in again" (``IsUnauthorized``) and hides the
        message, which is wrong when the apiserver refused the *gateway*.
        """
        if isinstance(exc, KubeStatusError):
            return exc.copy()
        code = exc.http_status if 400 <= exc.http_status <= 599 else 500
        reason = getattr(exc, "reason_name", "") or "InternalError"
        if reason == "Unauthorized" and code != 401:
            reason = "InternalError"
        details = getattr(exc, "details", None)
        headers = getattr(exc, "headers", None) or ()
        return cls(code, reason, exc.message or reason,
                   details if isinstance(details, Mapping) and details else None,
                   headers=[(str(k), str(v)) for k, v in headers])

    def copy(self) -> KubeStatusError:
        """A new exception with the same answer (one exception object is raised once)."""
        return KubeStatusError(self.http_status, self.reason, self.message, self.details,
                               headers=self.headers)


def status_response(code: int, reason: str, message: str,
                    details: Mapping[str, Any] | None = None, *,
                    headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """An HTTP answer whose body is a Status with kind/apiVersion/code (§9)."""
    return Response(code, status_json(code, reason, message, details), _JSON,
                    headers + _NO_STORE)


def _json_response(obj: Mapping[str, Any]) -> Response:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(200, body, _JSON, _NO_STORE)


def _not_found(namespace: str, pod: str) -> KubeStatusError:
    return KubeStatusError(404, "NotFound", f'pods "{pod}" not found',
                           {"name": pod, "kind": "pods"})


def _bad_request(message: str) -> KubeStatusError:
    return KubeStatusError(400, "BadRequest", message)


class RefusalMemory:
    """Upstream refusals of recent exec/attach upgrades, for kubectl's SPDY retry (§9).

    kubectl >= 1.30 retries a refused WebSocket upgrade as a SPDY ``POST`` of
    the same URL, on a new connection, and shows the user only that second
    answer.  The gateway's own checks give the POST the GET's verdict by
    running again; an apiserver's refusal cannot be asked for again without
    running the command if it would now be allowed, so the GET's answer is
    remembered here, per user and request target, and handed to the matching
    POST once.

    Bounded: entries expire after ``ttl_s`` (kubectl retries within
    milliseconds; 30 s covers a loaded machine) and at most ``max_entries``
    are kept (the oldest go first).  Per process: a POST that reaches
    another worker or replica finds nothing and gets the SPDY advice.

    Args:
        ttl_s: how long a refusal waits for its retry.
        max_entries: how many refusals are kept at most.
    """

    __slots__ = ("ttl_s", "max_entries", "_entries")

    def __init__(self, *, ttl_s: float = 30.0, max_entries: int = 1024) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        # Insertion order is expiry order: every entry lives ttl_s.
        self._entries: dict[tuple[str, str], tuple[float, KubeStatusError]] = {}

    def __repr__(self) -> str:
        return f"<RefusalMemory entries={len(self._entries)} ttl={self.ttl_s:g}s>"

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (expires, _) = next(iter(entries.items()))
            if expires > now and len(entries) <= self.max_entries:
                return
            del entries[key]

    def remember(self, user: str, target: str, refusal: KubeStatusError, now: float) -> None:
        """Keep ``refusal`` of ``user``'s upgrade of ``target`` (path and query) for its retry."""
        key = (user, target)
        self._entries.pop(key, None)  # re-inserted last: its expiry is the latest
        self._entries[key] = (now + self.ttl_s, refusal)
        self._expire(now)

    def recall(self, user: str, target: str, now: float) -> KubeStatusError | None:
        """The refusal remembered for ``user`` and ``target`` (forgotten now), or None."""
        self._expire(now)
        entry = self._entries.pop((user, target), None)
        return entry[1].copy() if entry is not None else None


# ------------------------------------------------------------------- pods & backend


@dataclass(frozen=True, slots=True)
class PodInfo:
    """A pod as the exec endpoint needs it.

    Attributes:
        namespace, name: the pod.
        containers: container names, in spec order (kubectl's default is the first).
        default_container: the ``kubectl.kubernetes.io/default-container``
            annotation, if set.
        object: the Pod JSON served on ``GET .../pods/{pod}`` (with
            ``kind``/``apiVersion``).
    """

    namespace: str
    name: str
    containers: tuple[str, ...]
    default_container: str | None
    object: Mapping[str, Any]

    def resolve_container(self, requested: str | None) -> str:
        """The container an exec/attach runs in (§2.2, §9).

        Raises:
            KubeStatusError: 400 for an unknown container, or for none given
                while the pod has several.
        """
        if requested:
            if requested not in self.containers:
                raise _bad_request(f"container {requested} is not valid for pod {self.name}")
            return requested
        if self.default_container and self.default_container in self.containers:
            return self.default_container
        if len(self.containers) == 1:
            return self.containers[0]
        if not self.containers:
            raise _bad_request(f"pod {self.name} has no containers")
        raise _bad_request(f"a container name must be specified for pod {self.name}, "
                           f"choose one of: [{' '.join(self.containers)}]")


class KubeBackend(Protocol):
    """Where kubectl's reads are answered: synthesized (local) or passed through (kube)."""

    async def version(self) -> Mapping[str, Any]:
        """The ``/version`` object; its minor must be >= 30 (§2.1)."""
        ...

    async def discovery(self, path: str, server_address: str) -> Mapping[str, Any] | None:
        """The answer to ``/api``, ``/apis`` or ``/api/v1``; None for another path (404)."""
        ...

    async def get_pod(self, namespace: str, name: str, identity: Identity) -> PodInfo | None:
        """The pod, or None when it does not exist (404)."""
        ...


class LocalBackend:
    """Synthesized answers for the local upstream (see "The pods of the local upstream").

    Args:
        containers: the container names every pod has (the first is the default).
        version: the ``/version`` object.
    """

    __slots__ = ("containers", "_version", "_created")

    def __init__(self, containers: Sequence[str] = ("main",),
                 version: Mapping[str, str] = DEFAULT_VERSION) -> None:
        if not containers:
            raise ValueError("a local pod needs at least one container")
        self.containers = tuple(containers)
        self._version = dict(version)
        # Every local pod "started" with the gateway (kubectl get pod shows an AGE).
        self._created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def __repr__(self) -> str:
        return f"<LocalBackend containers={','.join(self.containers)}>"

    async def version(self) -> Mapping[str, Any]:
        return self._version

    async def discovery(self, path: str, server_address: str) -> Mapping[str, Any] | None:
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                    "serverAddress": server_address}]}
        if path == "/apis":
            # Required even when empty: a 404 makes kubectl fail (§2.2).
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if path == "/api/v1":
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
                    "resources": [
                        {"name": "pods", "singularName": "pod", "namespaced": True,
                         "kind": "Pod", "verbs": ["get"], "shortNames": ["po"]},
                        {"name": "pods/attach", "singularName": "", "namespaced": True,
                         "kind": "PodAttachOptions", "verbs": ["create", "get"]},
                        {"name": "pods/exec", "singularName": "", "namespaced": True,
                         "kind": "PodExecOptions", "verbs": ["create", "get"]},
                    ]}
        return None

    async def get_pod(self, namespace: str, name: str, identity: Identity) -> PodInfo | None:
        return self.synthesize(namespace, name)

    def synthesize(self, namespace: str, name: str, containers: Sequence[str] = (),
                   upstream: str = "local") -> PodInfo | None:
        """A Running pod with ``containers`` (default: this backend's), or None for a bad name."""
        if not _LABEL.fullmatch(namespace) or not _SUBDOMAIN.fullmatch(name):
            return None  # such a pod cannot exist
        names = tuple(containers) or self.containers
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"podterm-{upstream}:{namespace}/{name}"))
        obj = {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                         "creationTimestamp": self._created,
                         "labels": {"app.kubernetes.io/managed-by": "podterm"},
                         "annotations": {"kubectl.kubernetes.io/default-container":
                                         names[0],
                                         "podterm.dev/upstream": upstream}},
            "spec": {"containers": [{"name": c, "image": "podterm/local", "stdin": True,
                                     "tty": True} for c in names]},
            "status": {"phase": "Running",
                       "containerStatuses": [{"name": c, "ready": True, "restartCount": 0,
                                              "image": "podterm/local", "imageID": "",
                                              "started": True,
                                              "state": {"running": {}}}
                                             for c in names]},
        }
        return PodInfo(namespace, name, names, names[0], obj)


def _pod_info(obj: Any, namespace: str, name: str) -> PodInfo:
    """A PodInfo from a Pod object (an apiserver's answer)."""
    if not isinstance(obj, dict) or obj.get("kind") != "Pod":
        raise KubeStatusError(502, "InternalError",
                              f"the apiserver's answer for pod {name} is not a Pod")
    def field(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = parent.get(key)
        return value if isinstance(value, dict) else {}

    containers = tuple(c["name"] for c in field(obj, "spec").get("containers") or ()
                       if isinstance(c, dict) and isinstance(c.get("name"), str))
    annotations = field(field(obj, "metadata"), "annotations")
    default = annotations.get("kubectl.kubernetes.io/default-container")
    return PodInfo(namespace, name, containers, default if isinstance(default, str) else None,
                   obj)


class ApiserverResponse(Protocol):
    """What :class:`ApiserverReader` answers (``KubeUpstream.get_json``'s ``KubeResponse``)."""

    @property
    def status(self) -> int: ...

    @property
    def body(self) -> bytes: ...

    def json(self) -> Any: ...


class ApiserverReader(Protocol):
    """GETs against the real apiserver: ``podterm.upstream.kube.KubeUpstream`` is one."""

    async def get_json(self, path: str, *,
                       identity: Identity | None = None) -> ApiserverResponse: ...


def _minor(version: Mapping[str, Any]) -> int:
    digits = re.match(r"\d+", str(version.get("minor", "")))  # GKE says "32+"
    return int(digits.group()) if digits else 0


class ApiserverBackend:
    """Pass kubectl's reads through to the apiserver of the kube upstream.

    * ``/version``: the apiserver's, unless its minor is below 30 or it cannot
      be read; then :data:`DEFAULT_VERSION` (§2.1: the dispatcher must pick a
      WebSocket kubectl).
    * ``/api``, ``/apis``, ``/api/v1``: the apiserver's answers, with
      ``serverAddressByClientCIDRs`` pointing at the gateway.
    * the pod: GET as the caller (impersonated when the upstream does), so a
      404, a 403 of the apiserver's RBAC, and the real containers come through.

    An answer that is not 200 is re-raised as its Status; an unreachable
    apiserver is 503 ``ServiceUnavailable``.
    """

    __slots__ = ("reader",)

    def __init__(self, reader: ApiserverReader) -> None:
        self.reader = reader

    def __repr__(self) -> str:
        return f"<ApiserverBackend {self.reader!r}>"

    async def _get(self, path: str, identity: Identity | None) -> Any:
        try:
            response = await self.reader.get_json(path, identity=identity)
        except UpstreamError as exc:
            raise KubeStatusError(503, "ServiceUnavailable", exc.message) from exc
        if response.status == 200:
            try:
                return response.json()
            except ValueError:
                raise KubeStatusError(502, "InternalError",
                                      f"the apiserver's answer to {path} is not JSON") from None
        try:
            status = response.json()
        except ValueError:
            status = None
        if isinstance(status, dict) and status.get("kind") == "Status":
            raise KubeStatusError(response.status, str(status.get("reason") or "InternalError"),
                                  str(status.get("message") or ""),
                                  status.get("details") if isinstance(status.get("details"),
                                                                      dict) else None)
        raise KubeStatusError(response.status if 400 <= response.status <= 599 else 502,
                              "InternalError",
                              f"the apiserver answered {path} with HTTP {response.status}")

    async def version(self) -> Mapping[str, Any]:
        try:
            version = await self._get("/version", None)
        except KubeStatusError as exc:
            log.warning("kubeapi.version.failed: %s; reporting %s", exc.message,
                        DEFAULT_VERSION["gitVersion"])
            return DEFAULT_VERSION
        if not isinstance(version, dict) or _minor(version) < 30:
            return DEFAULT_VERSION  # the dispatcher would pick a SPDY-only kubectl
        return version

    async def discovery(self, path: str, server_address: str) -> Mapping[str, Any] | None:
        if path not in ("/api", "/apis", "/api/v1"):
            return None
        answer = await self._get(path, None)
        if not isinstance(answer, dict):
            raise KubeStatusError(502, "InternalError",
                                  f"the apiserver's answer to {path} is not an object")
        if path == "/api":
            answer = {**answer, "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}
        return answer

    async def get_pod(self, namespace: str, name: str, identity: Identity) -> PodInfo | None:
        if not _LABEL.fullmatch(namespace) or not _SUBDOMAIN.fullmatch(name):
            return None
        try:
            obj = await self._get(f"/api/v1/namespaces/{namespace}/pods/{name}", identity)
        except KubeStatusError as exc:
            if exc.http_status == 404:
                return None
            raise
        return _pod_info(obj, namespace, name)


# --------------------------------------------------------------- query parameters


@dataclass(frozen=True, slots=True)
class ExecOptions:
    """The decoded query of an exec/attach request (§3.1).

    ``stderr`` is already False when ``tty`` is True (a terminal merges it).
    """

    subresource: str
    command: tuple[str, ...]
    container: str | None
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


def _parse_bool(name: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _bad_request(f'invalid value for parameter "{name}": {value!r} is not a boolean')


def parse_exec_options(target: str, subresource: str) -> ExecOptions:
    """Decode ``command`` (repeated), ``container``, ``stdin``/``stdout``/``stderr``/``tty``.

    Booleans are Go ``strconv.ParseBool`` values (kubectl sends ``true``,
    Python 35 ``True``/``False``); absent means false.  Other parameters are
    ignored.

    Raises:
        KubeStatusError: 400 for a bad boolean, an exec without a command, a
            command beyond the bounds, or no stream requested.
    """
    query = urlsplit(target).query
    command: list[str] = []
    flags = dict.fromkeys(_BOOL_PARAMS, False)
    container: str | None = None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "command":
            command.append(value)
        elif key in flags:
            flags[key] = _parse_bool(key, value)
        elif key == "container":
            container = value or None
    if subresource == "exec":
        if not command:
            raise _bad_request("you must specify at least one command for the container "
                               "(the command query parameter)")
        if len(command) > MAX_COMMAND_ARGS:
            raise _bad_request(f"command: at most {MAX_COMMAND_ARGS} arguments")
        if any("\x00" in arg for arg in command):
            raise _bad_request("command: arguments must not contain NUL")
        if sum(len(a.encode("utf-8", "surrogatepass")) for a in command) > MAX_COMMAND_BYTES:
            raise _bad_request(f"command: at most {MAX_COMMAND_BYTES} bytes in total")
    else:
        command = []  # attach runs the container's main process
    tty = flags["tty"]
    stderr = flags["stderr"] and not tty  # kubelet NewOptions: a tty has no stderr
    if not (flags["stdin"] or flags["stdout"] or stderr):
        raise _bad_request("you must specify at least 1 of stdin, stdout, stderr")
    return ExecOptions(subresource=subresource, command=tuple(command), container=container,
                       stdin=flags["stdin"], stdout=flags["stdout"], stderr=stderr, tty=tty)


# -------------------------------------------------------------------- the API


def _verb(method: str, subresource: str | None) -> str:
    if subresource:
        return "create"  # podterm treats exec/attach as a write, whatever the method (§3.2)
    return {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update",
            "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())


_POD_PATH_RE = re.compile(_POD_PATH + r"(?:/(?P<subresource>[^/]+))?")


def render_error(exc: PodtermError, request: Request) -> Response:
    """Any error on a Kubernetes route as a Status (the router's ``render_error`` hook).

    401 is kube-apiserver's exact ``Unauthorized`` (§2.3); 403 on a pod path
    is phrased like its RBAC denial, with podterm's reason appended, so
    kubectl prints ``Error from server (Forbidden): pods "p" is forbidden: ...``.
    """
    headers: tuple[tuple[str, str], ...] = tuple(
        (str(k), str(v)) for k, v in getattr(exc, "headers", None) or ())
    if isinstance(exc, KubeStatusError):
        return status_response(exc.http_status, exc.reason, exc.message, exc.details,
                               headers=headers)
    status = exc.http_status if 400 <= exc.http_status <= 599 else 500
    if status == 401:
        return status_response(401, "Unauthorized", "Unauthorized", headers=headers)
    if status == 403:
        identity = request.identity
        user = identity.user if identity is not None else "system:anonymous"
        match = _POD_PATH_RE.fullmatch(request.path)
        if match is not None:
            pod, namespace, sub = match["pod"], match["namespace"], match["subresource"]
            resource = f"pods/{sub}" if sub else "pods"
            message = (f'pods "{pod}" is forbidden: User "{user}" cannot '
                       f'{_verb(request.method, sub)} resource "{resource}" in API group "" '
                       f'in the namespace "{namespace}"')
            if exc.message:
                message += f": {exc.message}"
            return status_response(403, "Forbidden", message, {"name": pod, "kind": "pods"},
                                   headers=headers)
        message = (f'forbidden: User "{user}" cannot {_verb(request.method, None)} path '
                   f'"{request.path}"' + (f": {exc.message}" if exc.message else ""))
        return status_response(403, "Forbidden", message, headers=headers)
    reason = getattr(exc, "reason_name", "") or "InternalError"
    if status == 400 and reason == "InternalError":
        reason = "BadRequest"
    return status_response(status, reason, exc.message or reason, headers=headers)


def _server_address(request: Request) -> str:
    host = request.headers.get("host", "")
    return host if host and len(host) <= 255 else "127.0.0.1"


class KubeApi:
    """The Kubernetes API routes; :meth:`routes` lists them for the router.

    Args:
        registry: where exec/attach sessions are created.
        counters: the gateway's counters.
        backend: where version, discovery and pods come from.
        upstream: the upstream kind sessions run on (None: the registry's default).
        ws_limits: frame and message bounds for the WebSocket (the spec asks
            for a message bound such as 1 MiB, 1009 beyond).
        open_timeout_s: bound on starting a session before the 101 (upstreams
            in :data:`OPEN_BEFORE_UPGRADE`); the gateway passes its handshake
            timeout.  Past it kubectl gets 504 ``Timeout``.
        agents: the agent upstream: a pod whose agent it knows runs there
            (see "The pods of agents").  None: never.
    """

    __slots__ = ("registry", "counters", "backend", "upstream", "ws_limits", "open_timeout_s",
                 "refusals", "agents")

    def __init__(self, registry: SessionRegistry, counters: GatewayCounters, *,
                 backend: KubeBackend | None = None, upstream: str | None = None,
                 ws_limits: WsLimits | None = None, open_timeout_s: float = 10.0,
                 agents: AgentUpstream | None = None) -> None:
        if not open_timeout_s > 0:
            raise ValueError(f"open_timeout_s must be > 0, got {open_timeout_s}")
        self.registry = registry
        self.counters = counters
        self.backend: KubeBackend = backend if backend is not None else LocalBackend()
        self.upstream = upstream
        self.ws_limits = ws_limits or WsLimits()
        self.open_timeout_s = open_timeout_s
        #: The upstream's refusals of recent upgrades, for kubectl's SPDY retry.
        self.refusals = RefusalMemory()
        self.agents = agents

    def __repr__(self) -> str:
        return f"<KubeApi {self.backend!r} upstream={self.upstream or 'default'}>"

    def routes(self) -> list[Route]:
        """The Kubernetes routes, most specific first; the last catches the rest of /api(s)."""
        err = render_error
        return [
            Route.make("GET", r"/version/?", self.version, public=True, render_error=err),
            Route.make("GET", r"/api/?|/apis/?|/api/v1/?", self.discovery, authorize=False,
                       render_error=err),
            Route.make(_ALL_METHODS, _CONNECT_PATH, self.connect, websocket=True,
                       render_error=err),
            Route.make(_ALL_METHODS, _POD_PATH, self.pod, render_error=err),
            Route.make(_ALL_METHODS, _KUBE_ANY_PATH, self.not_found, authorize=False,
                       render_error=err),
        ]

    # -------------------------------------------------------------- reads

    async def version(self, call: Call) -> Response:
        """``GET /version`` (public, as kube-apiserver's ``system:public-info-viewer``)."""
        return _json_response(await self.backend.version())

    async def discovery(self, call: Call) -> Response:
        """``GET /api``, ``/apis``, ``/api/v1``."""
        path = call.request.path.rstrip("/") or "/"
        answer = await self.backend.discovery(path, _server_address(call.request))
        if answer is None:
            raise _page_not_found()
        return _json_response(answer)

    async def pod(self, call: Call) -> Response:
        """``GET /api/v1/namespaces/{ns}/pods/{pod}``."""
        request = call.request
        if request.method not in ("GET", "HEAD"):
            raise _method_not_allowed(request.method)
        info = await self._get_pod(call)
        return _json_response(info.object)

    async def not_found(self, call: Call) -> Response:
        """Anything else under /api or /apis."""
        raise _page_not_found()

    def _agent_of(self, namespace: str, name: str) -> AgentInfo | None:
        """The agent this gateway holds for the pod (connected or briefly away), or None."""
        agents = self.agents
        if agents is None:
            return None
        try:
            pod = PodIdentity(namespace, name)
        except ValueError:
            return None
        if not agents.knows(pod):
            return None
        for info, _ in agents.tunnel_states():
            if info.pod == pod:
                return info
        return None

    def _upstream_for(self, namespace: str, name: str) -> str | None:
        """The upstream kind a pod's exec/attach runs on (None: the registry's default)."""
        if self._agent_of(namespace, name) is not None:
            return "agent"
        return self.upstream

    async def _get_pod(self, call: Call) -> PodInfo:
        request = call.request
        assert request.identity is not None  # the router authenticated
        namespace, name = call.params["namespace"], call.params["pod"]
        agent = self._agent_of(namespace, name)
        backend = self.backend
        if agent is not None and isinstance(backend, LocalBackend):
            info = backend.synthesize(namespace, name, agent.containers, upstream="agent")
        else:
            info = await backend.get_pod(namespace, name, request.identity)
        if info is None:
            raise _not_found(namespace, name)
        return info

    # ------------------------------------------------------------ exec, attach

    async def connect(self, call: Call) -> Response | Upgraded:
        """``GET``/``POST .../pods/{pod}/exec|attach`` (see the module docstring for the order)."""
        request = call.request
        identity = request.identity
        assert identity is not None  # the router authenticated and authorized
        if request.method not in ("GET", "HEAD", "POST"):
            raise _method_not_allowed(request.method)
        options = parse_exec_options(request.target, call.params["subresource"])
        if request.method == "POST":
            # kubectl's SPDY retry of an upgrade its upstream refused: the same answer.
            refusal = self.refusals.recall(identity.user, request.target, trio.current_time())
            if refusal is not None:
                raise refusal
        info = await self._get_pod(call)
        container = info.resolve_container(options.container)
        if self.registry.draining:
            raise KubeStatusError(503, "ServiceUnavailable",
                                  "the podterm gateway is draining: retry in a moment "
                                  "(through the load balancer)")
        if request.method == "POST":
            # kubectl's SPDY retry of a WebSocket upgrade that would have succeeded.
            raise _bad_request(SPDY_MESSAGE)
        if not request.is_upgrade or request.method != "GET":
            raise _bad_request("Upgrade request required")
        upgrade = parse_upgrade(request.h11_request)  # HandshakeError: 400/426 as a Status
        _, offered = extract_bearer_subprotocol(upgrade.subprotocols)
        chosen = negotiate(offered)
        if chosen is None:
            got = ", ".join(offered) or "none"
            raise _bad_request(f"no supported WebSocket subprotocol offered (got: {got}); "
                               f"podterm speaks {', '.join(SUBPROTOCOLS)}")
        upstream = self._upstream_for(info.namespace, info.name)
        kind = upstream or self.registry.default_upstream
        opens_first = kind in OPEN_BEFORE_UPGRADE
        spec = StreamSpec(command=options.command or None, tty=options.tty,
                          namespace=info.namespace, pod=info.name, container=container)
        if opens_first:
            # No size of our own where the upstream can go without one:
            # kubectl's arrives right after the 101 (§6).
            spec = replace(spec, cols=0, rows=0)
        session: Session | None = None
        if opens_first:
            session = await self._open_before_upgrade(identity, spec, options, request.target,
                                                      upstream)
        limits = self.registry.limits
        try:
            # The request id ties kubectl's exec to its audit events (docs/audit.md).
            headers = [("X-Request-Id", request.request_id)] if request.request_id else []
            ws = await accept_on(call.stream, call.conn, upgrade, chosen, extra_headers=headers,
                                 limits=self.ws_limits, close_timeout_s=limits.close_timeout_s)
        except HandshakeError:
            if session is not None:
                session.kill("client_gone")
            return Upgraded(None)  # accept_on answered and closed the stream
        except BaseException:
            if session is not None:
                session.kill("shutdown" if self.registry.draining else "internal_error")
            raise
        return Upgraded(functools.partial(self._serve, ws, identity, spec, options, session,
                                          upstream))

    async def _open_before_upgrade(self, identity: Identity, spec: StreamSpec,
                                   options: ExecOptions, target: str,
                                   upstream: str | None) -> Session:
        """Start the session while kubectl still waits for its 101.

        So a refusal of the upstream (the apiserver's 403 for an impersonated
        user, 404 for a pod that vanished after kubectl's GET, 400 for a bad
        container, a gateway that cannot reach it) is a refused upgrade with
        the upstream's code and Status, which kubectl prints as ``Error from
        server (Forbidden): ...`` after its SPDY retry (§9) -- remembered in
        :attr:`refusals` for that retry.

        Raises:
            KubeStatusError: the refusal; 504 ``Timeout`` past ``open_timeout_s``.
        """
        now = trio.current_time()
        where = f"{spec.namespace}/{spec.pod}"
        refusal: KubeStatusError | None = None
        with trio.move_on_after(self.open_timeout_s):
            try:
                return await self.registry.create(identity, spec, upstream)
            except PodtermError as exc:
                refusal = KubeStatusError.of(exc)
        if refusal is None:  # the deadline passed
            refusal = KubeStatusError(
                504, "Timeout", f"the podterm gateway could not start the {options.subresource} "
                                f"in pod {where} within {self.open_timeout_s:g} s: its upstream "
                                "did not answer in time")
        log.info("kubeapi.%s.refused %s user=%s: %d %s", options.subresource, where,
                 identity.user, refusal.http_status, refusal.message)
        # The copy is raised: the remembered one holds no traceback (and no frames).
        self.refusals.remember(identity.user, target, refusal, now)
        raise refusal.copy()

    async def _serve(self, ws: WebSocketStream, identity: Identity, spec: StreamSpec,
                     options: ExecOptions, session: Session | None,
                     upstream: str | None) -> None:
        """Start the session (unless it was, before the 101), then relay; the stream is
        closed before this returns."""
        assert ws.subprotocol is not None
        channel = K8sServerChannel(ws.subprotocol, stdin=options.stdin, tty=options.tty)
        if session is not None:
            await self._relay(ws, identity, spec, options, channel, session)
            return
        try:
            session = await self.registry.create(identity, spec, upstream)
        except PodtermError as exc:
            log.info("kubeapi.exec.failed %s/%s: %s", spec.namespace, spec.pod, exc.message)
            reason = getattr(exc, "reason_name", "") or "InternalError"
            status = channel.status_failure(exc.message or reason, reason, exc.http_status)
            await _end_with(ws, channel, status)
            return
        except BaseException as exc:
            # A bug, or the drain deadline while the upstream starts: still a
            # Status and Close 1000, so kubectl says what happened (§7.3).
            if isinstance(exc, Exception):
                log.exception("kubeapi.exec.failed %s/%s", spec.namespace, spec.pod)
            kind, code, message = _ENDINGS["shutdown" if self.registry.draining
                                          else "internal_error"]
            with trio.CancelScope(shield=True):
                await _end_with(ws, channel, channel.status_failure(message, kind, code))
            if isinstance(exc, Exception):
                return
            raise
        await self._relay(ws, identity, spec, options, channel, session)

    async def _relay(self, ws: WebSocketStream, identity: Identity, spec: StreamSpec,
                     options: ExecOptions, channel: K8sServerChannel, session: Session) -> None:
        if not options.stdin and not options.tty:
            # No stdin requested: the process reads EOF (a tty keeps its
            # terminal open, as a kubelet does).
            session.close_input()
        log.info("kubeapi.%s.started %s %s/%s container=%s user=%s subprotocol=%s",
                 options.subresource, session.id, spec.namespace, spec.pod, spec.container,
                 identity.user, ws.subprotocol)
        await k8s_relay(ws, session, channel, options, counters=self.counters,
                        is_draining=lambda: self.registry.draining)


def _page_not_found() -> KubeStatusError:
    return KubeStatusError(404, "NotFound", "the server could not find the requested resource",
                           {"causes": [{"reason": "UnexpectedServerResponse",
                                        "message": "404 page not found"}]})


def _method_not_allowed(method: str) -> KubeStatusError:
    return KubeStatusError(405, "MethodNotAllowed",
                           f"the server does not allow this method on the requested resource "
                           f"({method})")


# ------------------------------------------------------------------ the relay


def _frame(ws: WebSocketStream, channel: K8sServerChannel, message: OutMessage) -> bytes:
    """One server message: binary for the raw variants, text for base64 (§4.1, §4.5)."""
    prefix, payload = message
    if channel.opcode == OP_BINARY:
        return ws.conn.send_binary(payload, prefix)
    return ws.conn.send_text((prefix + bytes(payload)).decode("ascii"))


async def _end_with(ws: WebSocketStream, channel: K8sServerChannel,
                    status: OutMessage | None) -> None:
    """Send ``status`` on channel 3 (if any), Close 1000, wait (bounded) for the peer's Close."""
    if status is not None:
        with trio.move_on_after(ws.close_timeout_s):
            try:
                await ws.send_raw(_frame(ws, channel, status))
            except (ConnectionClosed, PodtermError):
                pass  # the client is gone, or closed first: nothing to tell it
    await ws.aclose(CloseCode.NORMAL, "")


#: How a session ended by the gateway is reported on channel 3: reason, code, message.
_ENDINGS: Final[Mapping[str, tuple[str, int, str]]] = {
    "killed": ("Gone", 410, "the session was killed through the podterm API"),
    "grace": ("Gone", 410, "the session ended: no client was attached for its grace period"),
    "idle": ("Timeout", 504, "the session ended: it was idle for longer than the gateway allows"),
    "max_age": ("Timeout", 504, "the session ended: it reached the gateway's maximum age"),
    "shutdown": ("ServiceUnavailable", 503,
                 "the podterm gateway is shutting down: the session was ended"),
    "upstream_failed": ("InternalError", 500, "the session's upstream failed; see the "
                        "podterm gateway's log"),
    "internal_error": ("InternalError", 500, "internal error in the podterm gateway; see its log"),
}


class _Link:
    """The two tasks of one kubectl connection: receiver and sender."""

    __slots__ = ("ws", "session", "channel", "options", "counters", "att", "hb",
                 "is_draining", "rx_scope", "rx_done", "violation", "ended")

    def __init__(self, ws: WebSocketStream, session: Session, channel: K8sServerChannel,
                 options: ExecOptions, att: Attachment, counters: GatewayCounters,
                 is_draining: Callable[[], bool]) -> None:
        self.ws = ws
        self.session = session
        self.channel = channel
        self.options = options
        self.att = att
        self.counters = counters
        self.is_draining = is_draining
        limits = session.limits
        self.hb = Heartbeat(limits.heartbeat_interval_s, max_missed=limits.heartbeat_max_missed,
                            now=trio.current_time())
        ws.heartbeat = self.hb  # the reader hands PONGs to it
        self.rx_scope = trio.CancelScope()
        self.rx_done = trio.Event()
        self.violation: ProtocolViolation | None = None
        #: True once the connection was closed by us on purpose (status sent or not).
        self.ended = False

    # -------------------------------------------------------------- receiver

    async def receive_loop(self) -> None:
        try:
            with self.rx_scope:
                await self._receive()
        finally:
            self.rx_done.set()

    async def _receive(self) -> None:
        ws, att = self.ws, self.att
        decode = self.channel.receive_message
        try:
            while True:
                batch = await ws.receive_batch()
                for opcode, payload in batch:
                    try:
                        events: list[Any] = list(decode(opcode, payload))
                    except ProtocolViolation as exc:
                        for event in exc.partial:
                            await self._apply(event)
                        self.violation = exc
                        att.wake()
                        return
                    for event in events:
                        await self._apply(event)
        except ConnectionClosed:
            att.mark_gone()

    async def _apply(self, event: Any) -> None:
        session = self.session
        if type(event) is Stdin:
            await session.write_input(self.att, event.data)
        elif type(event) is Resize:
            session.resize(event.cols, event.rows)
        elif type(event) is StdinClose:
            session.close_input()

    # ---------------------------------------------------------------- sender

    async def send_loop(self) -> None:
        ws, att, session, hb = self.ws, self.att, self.session, self.hb
        counters = self.counters
        limits = session.limits
        # A write that cannot finish in two heartbeat intervals is a dead peer.
        stall_s = limits.heartbeat_interval_s * limits.heartbeat_max_missed
        ready = self.channel.ready_message(stdout=self.options.stdout,
                                           stderr=self.options.stderr)
        parts: list[bytes] = [_frame(ws, self.channel, ready)]
        while True:
            if att.gone:
                return
            if ws.conn.close_sent is not None:  # the receiver is sending the CLOSE (a
                await self.rx_done.wait()  # violation, the peer's CLOSE): nothing more to send
                return
            if att.notices:
                att.notices.clear()  # podterm.v1 notices (hello, drain) mean nothing here
            sent_before = att.sent
            self._collect_output(parts)
            now = trio.current_time()
            if now >= hb.deadline:
                ping = hb.poll(now)
                if hb.is_dead:
                    counters.heartbeat_failures += 1
                    log.info("kubeapi.link.dead %s: no pong to %d pings", session.id,
                             hb.max_missed)
                    await ws.abort(CloseCode.INTERNAL_ERROR, "heartbeat lost")
                    att.mark_gone()
                    return
                if ping is not None:
                    parts.append(ws.conn.send_ping(ping))
            if parts:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                parts = []
                with trio.move_on_after(stall_s) as stalled:
                    try:
                        await ws.send_raw(data)
                    except ConnectionClosed:
                        att.mark_gone()
                        return
                if stalled.cancelled_caught:
                    counters.heartbeat_failures += 1
                    log.info("kubeapi.link.dead %s: peer stopped reading", session.id)
                    await ws.abort(CloseCode.INTERNAL_ERROR, "peer stopped reading")
                    att.mark_gone()
                    return
                if att.sent > sent_before:
                    counters.bytes_out += att.sent - sent_before
                    # The socket took it: credit for the session's output pump.
                    session.ack_output(att, att.sent)
                continue
            if self.violation is not None:
                exc = self.violation
                await self._close_quietly(int(exc.close_code), exc.message[:100])
                return
            if att.sent >= session.ring.end:
                over, status = self._final_status()
                if over:
                    att.exit_sent = True  # the end goes out on this link (as EXIT does)
                    await self._finish(status)
                    return
            with trio.move_on_at(hb.deadline):
                await att.wait_woken()

    def _final_status(self) -> tuple[bool, OutMessage | None]:
        """``(True, channel-3 message or None)`` once the session is over; ``(False, None)``
        while it runs."""
        session, channel = self.session, self.channel
        if session.writer is not self.att:
            return True, channel.status_failure("another client took over this session",
                                                "Conflict", 409)
        if session.exited_by_itself:
            status = session.exit_status
            if self.options.subresource == "attach" or status is None:
                return True, channel.status_success()  # §12: attach carries no exit code
            return True, channel.status_exit_code(min(max(status.exit_code, 0), 255))
        if session.is_closed:
            reason = session.end_reason or "killed"
            kind, code, message = _ENDINGS.get(
                reason, ("InternalError", 500, f"the session was ended by the podterm gateway "
                                               f"({reason})"))
            return True, channel.status_failure(f"{message} (session {session.id})", kind, code)
        return False, None

    def _collect_output(self, parts: list[bytes]) -> None:
        """Append channel 1/2 messages for the output not yet sent (unrequested streams skipped)."""
        att, session, channel, ws = self.att, self.session, self.channel, self.ws
        ring = session.ring
        sent = att.sent
        stop = min(ring.end, sent + MAX_BATCH_BYTES)
        if stop <= sent:
            return
        want_out, want_err = self.options.stdout, self.options.stderr
        for start, finish, ch in session.channel_runs(sent, stop):
            is_err = ch == 2
            if (is_err and not want_err) or (not is_err and not want_out):
                continue  # not requested: the bytes go nowhere, as with a kubelet
            encode = channel.stderr if is_err else channel.stdout
            pos = start
            while pos < finish:
                chunk = ring.read_from(pos, min(MAX_OUTPUT_MESSAGE_BYTES, finish - pos))
                assert isinstance(chunk, bytes) and chunk
                parts.append(_frame(ws, channel, encode(chunk)))
                pos += len(chunk)
        att.sent = stop

    async def _stop_receiver(self) -> None:
        # The close handshake reads the peer's CLOSE itself: exactly one task reads.
        self.rx_scope.cancel()
        with trio.move_on_after(self.ws.close_timeout_s):
            await self.rx_done.wait()

    async def _finish(self, status: OutMessage | None) -> None:
        """§7.3: status on channel 3, Close 1000, bounded wait for the client's Close."""
        self.ended = True
        await self._stop_receiver()
        await _end_with(self.ws, self.channel, status)

    async def _close_quietly(self, code: int, reason: str) -> None:
        self.ended = True
        await self._stop_receiver()
        await self.ws.aclose(code, reason)

    async def end_by_gateway(self) -> None:
        """The relay is being torn down (drain deadline, a bug): say so, then Close 1000."""
        if self.ended or self.att.gone or self.ws.closed is not None:
            return
        if self.is_draining():
            kind, code, message = _ENDINGS["shutdown"]
        else:
            kind, code, message = _ENDINGS["internal_error"]
        status = self.channel.status_failure(f"{message} (session {self.session.id})", kind,
                                             code)
        await self._finish(status)


async def k8s_relay(ws: WebSocketStream, session: Session, channel: K8sServerChannel,
                    options: ExecOptions, *, counters: GatewayCounters,
                    is_draining: Callable[[], bool] = lambda: False) -> None:
    """Attach ``ws`` (a kubectl or Python-client exec/attach) to ``session`` until it ends.

    Resource handling: ``ws`` is closed before this returns; the attachment is
    removed from the session; the session ends too -- normally once its exit
    status was sent, otherwise it is killed (``client_gone``): nobody can
    resume a kubectl session.  Cancellation (the gateway's drain deadline)
    sends a Failure Status and Close 1000 first, shielded and bounded.
    """
    try:
        att = session.attach(Mode.RW, 0, None)
    except PodtermError as exc:  # it ended in the meantime (killed): nobody else can use it
        session.kill("internal_error")
        reason = getattr(exc, "reason_name", "") or "InternalError"
        await _end_with(ws, channel, channel.status_failure(exc.message, reason,
                                                            exc.http_status))
        return
    GatewayCounters.bump(counters.attaches, Mode.RW.value)
    link = _Link(ws, session, channel, options, att, counters, is_draining)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.receive_loop)
            await link.send_loop()
            nursery.cancel_scope.cancel()
    except Exception:
        log.exception("kubeapi.relay.failed %s", session.id)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await link.end_by_gateway()
            except Exception:
                log.exception("kubeapi.relay.close_failed %s", session.id)
            session.detach(att)
            if session.exited_by_itself:
                session.exit_delivered(att)  # the session may end now
            elif link.violation is not None:
                session.kill("protocol_error")
            elif att.gone:
                session.kill("client_gone")
            else:
                session.kill("shutdown" if is_draining() else "internal_error")
            await ws.abort(CloseCode.GOING_AWAY, "")
            log.info("kubeapi.%s.complete %s gone=%s", options.subresource, session.id,
                     att.gone)
