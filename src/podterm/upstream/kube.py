"""The kube upstream: shells in real pods through kube-apiserver's WebSocket exec.

Spec: ``shared/spec/k8s-exec-protocol.md`` §11 (the client side), with §5
(channel 3 Status), §7 (stdin EOF, endings) and §9 (errors before the upgrade).
The channel framing is :class:`~podterm.protocol.k8s_channel.K8sClientChannel`;
the WebSocket is :mod:`podterm.net.wsconn`; credentials come from
:mod:`podterm.upstream.kubeconfig`.

Opening a stream (:meth:`KubeUpstream.open`)
--------------------------------------------
One ``GET`` upgrade per stream, on a new TLS connection::

    GET /api/v1/namespaces/NS/pods/POD/exec?command=..&container=C&stdin=true&stdout=true
        &stderr=<not tty>&tty=<tty>
    Authorization: <from the credentials, fetched per dial: tokens rotate>
    Impersonate-User / Impersonate-Group   (when options.impersonate; the podterm user)
    Sec-WebSocket-Protocol: v5.channel.k8s.io, v4.channel.k8s.io

- The apiserver picks v5 (>= 1.30) or v4 (older, or its gate off: the
  kubelet's list).  A 101 without one of the two is a failure.
- A non-101 answer is read as a ``Status`` and raised as :class:`KubeApiError`
  with its message unchanged, so the user sees ``pods "x" not found``.
- Exec has no cwd or env parameters.  A spec with ``cwd``/``env`` (a shell
  restored after a lost connection, ``POST /api/v1/sessions`` with ``env``)
  runs through ``/bin/sh -c 'cd -- "$0"; export K=V; exec "$@"'``, so the
  container needs ``/bin/sh`` then; a plain command runs as given.
- ``command=None`` (an interactive shell) runs bash as a login shell when the
  container has it, else ``sh``, through ``/bin/sh``.  That shell reports its
  working directory with OSC 7 on every prompt (bash's ``PROMPT_COMMAND``,
  sh's ``PS1``), which is how the session knows the cwd to restore
  (``options.report_cwd``; a user's rc file that replaces ``PROMPT_COMMAND``
  switches it off for that shell).
- A tty stream sends its initial size on channel 4 right after the upgrade,
  as kubectl does -- unless the spec's size is 0x0: then the first size is
  the first :meth:`KubeStream.resize` (the gateway's kubectl sessions, so the
  apiserver gets exactly the sizes of the user's terminal).

Retries and the circuit breaker
-------------------------------
A dial that fails for a reason that may pass (TCP refused or reset, TLS
handshake cut, a timeout, HTTP 5xx or 429) is retried with exponential
backoff and full jitter (:class:`~podterm.resilience.backoff.Backoff`) for at
most ``options.open_retry_s``.  Every dial and every stream that loses its
connection mid-session reports to one circuit breaker per apiserver
(:class:`ApiserverBreaker`): ``breaker_failures`` failures in a row open it,
and while it is open dials wait for its cooldown (if that ends within the
retry budget) or fail at once with :class:`UpstreamUnavailable`; after the
cooldown one trial dial runs (half-open) and closes it on success.  An
answer such as 401/403/404/400 proves the apiserver is up: it counts as a
success for the breaker and is raised at once, without retrying.  The state
and its transitions are exported by :meth:`KubeUpstream.metric_families`
(``podterm_upstream_breaker_state{apiserver=..} 0 closed / 1 open / 2
half-open`` and ``podterm_upstream_breaker_transitions_total``).

A running stream (:class:`KubeStream`)
--------------------------------------
=====================  ==========================================================
session calls          on the wire
=====================  ==========================================================
``send_stdin``         channel 0, at most 32 KiB per message (§11)
``resize``             channel 4 ``{"Width":W,"Height":H}\\n`` (tty only)
``close_stdin``        tty: the EOF character (Ctrl-D, twice mid-line), as a person
                       would type it; v5 without a tty: ``FF 00``; v4 without a tty:
                       nothing can be sent (§7.2: v4 has no stdin EOF, and closing
                       the WebSocket would lose the exit status), so stdin stays
                       open until the process exits by itself -- a ``cat`` through a
                       v4-only apiserver never sees EOF.  Logged once per stream.
``receive_some``       channels 1 and 2; the empty "ready" message is skipped
``wait_exit``          channel 3, concatenated until the apiserver's Close: Success
                       -> 0, NonZeroExitCode -> its code; any other Failure (e.g.
                       ``InternalError``: the command does not exist) -> exit code
                       1 after ``error: <message>`` written to the output, as
                       kubectl prints it (``failure`` keeps the Status)
``aclose``             Close 1000, then (bounded) wait for the apiserver's TCP FIN
=====================  ==========================================================

**Lost connections.**  When the connection ends without an exit status (TCP
reset or timeout, the apiserver restarting, a Close other than 1000, two
unanswered pings) the stream is *lost*, not exited: ``receive_some``
returns EOF after the output already received, and ``wait_exit`` (and
``send_stdin``) raise :class:`UpstreamLost`.  The session reacts by
restoring the shell (``podterm.session.session``), or ends
``upstream_failed``.  The remote process's fate is the apiserver's: it
normally kills an exec whose client went away, but a kubelet may keep a
process without a tty running; exec cannot reattach to it.

**Keepalive.**  The stream pings the apiserver every ``ping_interval_s``
from the task waiting in ``wait_exit`` (the session's supervisor always
waits there), and sends pending resizes from there too.  PONGs are read by
``receive_some``; while flow control pauses the reader (nobody ACKs the
output), liveness is not judged, because unread PONGs prove nothing.

**Context.**  ``capture_context`` returns the last cwd the shell reported with
OSC 7 (else the cwd it was started in) and the env it was started with;
variables exported inside a remote shell cannot be read from outside.

Identity for impersonation travels in a context variable, set around
``open`` by the session registry: :func:`acting_as`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import random
import re
import shlex
import signal
import ssl
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote, urlencode

import h11
import trio

from podterm import __version__
from podterm.auth.identity import Identity
from podterm.errors import (
    ConfigError,
    HandshakeError,
    LocalProtocolError,
    ProtocolViolation,
    UpstreamError,
)
from podterm.metrics import MetricFamily
from podterm.net.h11client import next_event, read_body
from podterm.net.wsconn import ConnectionClosed, WebSocketStream
from podterm.protocol.events import Stderr, Stdout
from podterm.protocol.handshake import build_request, check_response
from podterm.protocol.k8s_channel import V4_CHANNEL, V5_CHANNEL, K8sClientChannel, K8sStatusError
from podterm.protocol.websocket import DEFAULT_LIMITS, Role, WebSocketConnection, WsLimits
from podterm.resilience.backoff import Backoff
from podterm.resilience.breaker import BreakerState, BreakerStatistics, CircuitBreaker
from podterm.resilience.heartbeat import Heartbeat
from podterm.session.context import Osc7Tracker
from podterm.upstream.base import Context, ExitStatus, OutputChannel, StreamSpec, _check_dimension
from podterm.upstream.kubeconfig import KubeCredentials, load_credentials

__all__ = [
    "ApiserverBreaker",
    "BREAKER_STATE_VALUES",
    "BreakerTransition",
    "KubeApiError",
    "KubeResponse",
    "KubeStream",
    "KubeStreamStatistics",
    "KubeUpstream",
    "KubeUpstreamOptions",
    "KubeUpstreamStatistics",
    "SUBPROTOCOLS_OFFERED",
    "UpstreamLost",
    "UpstreamUnavailable",
    "acting_as",
    "current_identity",
    "exec_argv",
    "exec_target",
]

log = logging.getLogger(__name__)

#: §11: offer v5 first, v4 second; the apiserver's pick decides.
SUBPROTOCOLS_OFFERED: Final = (V5_CHANNEL, V4_CHANNEL)
#: ``podterm_upstream_breaker_state`` values.
BREAKER_STATE_VALUES: Final[Mapping[BreakerState, int]] = MappingProxyType({
    BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2})
#: §11: "keep each message <= 32 KiB of payload" (kubectl's own copy buffer).
MAX_STDIN_MESSAGE: Final = 32 * 1024
#: Largest error body read from a refused upgrade: a Status is < 1 KiB; an
#: HTML page from a proxy in front of the apiserver is cut here.
MAX_ERROR_BODY: Final = 64 * 1024
#: Largest body :meth:`KubeUpstream.get_json` reads (a Pod with many
#: containers is tens of KiB; discovery ``/api/v1`` about 10 KiB).
MAX_JSON_BODY: Final = 4 * 1024 * 1024
#: Bound on a response head (h11's default; a long Warning header fits).
_MAX_HEAD: Final = 64 * 1024
#: How a stream closed by us before its status arrived is reported.
_HUNG_UP: Final = ExitStatus(code=None, signal=int(signal.SIGHUP))
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USER_AGENT: Final = f"podterm/{__version__} (kube upstream)"

# OSC 7 (``ESC ] 7 ; file://HOST/PATH BEL``) from every prompt; see the module docstring.
_BASH_OSC7 = r'printf "\033]7;file://%s\007" "$PWD"'
_DEFAULT_SHELL = (
    "if command -v bash >/dev/null 2>&1; then\n"
    "{bash_setup}"
    "  exec bash -l\n"
    "fi\n"
    "{sh_setup}"
    "exec sh\n"
)
_BASH_SETUP = (f"  PROMPT_COMMAND={shlex.quote(_BASH_OSC7)}"
               "\"${PROMPT_COMMAND:+; $PROMPT_COMMAND}\"\n"
               "  export PROMPT_COMMAND\n")
# dash and busybox ash expand ${PWD} in PS1 at every prompt.
_SH_SETUP = ("PS1=\"$(printf '\\033]7;file://')\"'${PWD}'\"$(printf '\\007')\"'$ '\n"
             "export PS1\n")
_CD = ('cd -- "$0" 2>/dev/null || printf \'podterm: cannot enter %s; staying in %s\\n\' '
       '"$0" "$PWD" >&2\n')


# ------------------------------------------------------------------ errors


class KubeApiError(UpstreamError):
    """The apiserver refused the request with an HTTP error and (usually) a ``Status`` (§9).

    ``message`` is the Status message unchanged (``pods "x" not found``);
    ``reason_name`` its reason (``NotFound``); ``status`` the apiserver's HTTP
    code; ``http_status`` what podterm answers its own client: the same code
    for 400/403/404/409/422, 502 when the apiserver rejected *the gateway's*
    credentials (401: the podterm user is not at fault) or failed itself.
    """

    def __init__(self, status: int, message: str, *, reason: str = "",
                 details: Mapping[str, Any] | None = None, body: bytes = b"") -> None:
        http = status if status in (400, 403, 404, 409, 422) else (
            503 if status in (429, 503) else 502)
        super().__init__(message, http_status=http)
        self.status = status
        self.reason_name = reason or _REASONS.get(status, "InternalError")
        self.details = dict(details or {})
        self.body = body

    @property
    def retryable(self) -> bool:
        """True for answers that may pass: 5xx, 429."""
        return self.status >= 500 or self.status == 429


_REASONS: Final = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                   405: "MethodNotAllowed", 409: "Conflict", 422: "Invalid",
                   429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                   504: "Timeout"}


class UpstreamLost(UpstreamError):
    """The connection to the apiserver ended mid-session without an exit status.

    Distinct from an exit: the shell may well be gone, but the process did not
    end by itself.  The session restores the shell or ends ``upstream_failed``.
    """

    http_status = 502
    reason_name = "ServiceUnavailable"


class UpstreamUnavailable(UpstreamError):
    """The apiserver could not be reached within the retry budget, or its breaker is open."""

    http_status = 503
    reason_name = "ServiceUnavailable"


# ------------------------------------------------------------------ identity


_acting_as: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "podterm_kube_acting_as", default=None)


@contextlib.contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    """Run the enclosed ``open`` on behalf of ``identity`` (for impersonation).

    The session registry wraps every ``Upstream.open`` in this; upstreams that
    do not impersonate ignore it.
    """
    token = _acting_as.set(identity)
    try:
        yield
    finally:
        _acting_as.reset(token)


def current_identity() -> Identity | None:
    """The identity set by the innermost :func:`acting_as`, if any."""
    return _acting_as.get()


# ------------------------------------------------------------------ options


@dataclass(frozen=True, slots=True)
class KubeUpstreamOptions:
    """Knobs of :class:`KubeUpstream`.

    Attributes:
        impersonate: send ``Impersonate-User``/``Impersonate-Group`` with the
            podterm user's name and groups, so the apiserver's RBAC and audit
            see the real user (the gateway's credential needs the
            ``impersonate`` verb on users and groups).
        connect_timeout_s: one dial: TCP, TLS, credential, upgrade.  10 s:
            kubectl's own default dial timeout is 30 s for everything; an
            apiserver that takes 10 s to answer an upgrade is unhealthy.
        open_retry_s: total time one ``open`` spends retrying (the registry
            bounds ``open`` at 30 s; this stays below it).
        backoff_base_s, backoff_cap_s: full-jitter windows between retries.
        breaker_failures: failures in a row that open the breaker (5).
        breaker_cooldown_s: how long an open breaker refuses dials (30 s).
        ping_interval_s, ping_max_missed: keepalive pings (15 s, below common
            LB idle timeouts; the apiserver answers them, §8).
        close_timeout_s: bound on the close handshake.
        report_cwd: make the default interactive shell report its cwd (OSC 7).
        limits: WebSocket frame and message bounds.
    """

    impersonate: bool = False
    connect_timeout_s: float = 10.0
    open_retry_s: float = 20.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 8.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    ping_interval_s: float = 15.0
    ping_max_missed: int = 2
    close_timeout_s: float = 5.0
    report_cwd: bool = True
    limits: WsLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "backoff_base_s", "ping_interval_s",
                     "close_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.open_retry_s < 0 or self.breaker_cooldown_s < 0:
            raise ValueError("open_retry_s and breaker_cooldown_s must be >= 0")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("backoff_cap_s must be >= backoff_base_s")
        if self.breaker_failures < 1 or self.ping_max_missed < 1:
            raise ValueError("breaker_failures and ping_max_missed must be >= 1")


# ------------------------------------------------------------------ the breaker


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change of an apiserver's breaker (``at`` is trio's clock)."""

    at: float
    old: BreakerState
    new: BreakerState


class ApiserverBreaker:
    """The circuit breaker of one apiserver, its transitions counted and observable.

    Wraps :class:`~podterm.resilience.breaker.CircuitBreaker` (whose table
    decides); every call notes a state change, so ``/metrics`` can count
    them and tests can wait for them instead of sleeping.
    """

    __slots__ = ("server", "breaker", "transitions", "history", "_lot")

    def __init__(self, server: str, *, failure_threshold: int, cooldown_s: float) -> None:
        self.server = server
        self.breaker = CircuitBreaker(failure_threshold, cooldown_s)
        #: ``(old, new)`` -> how many times.
        self.transitions: Counter[tuple[BreakerState, BreakerState]] = Counter()
        #: The latest transitions, oldest first (bounded).
        self.history: deque[BreakerTransition] = deque(maxlen=256)
        self._lot = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        return f"<ApiserverBreaker {self.server} {self.state.value}>"

    @property
    def state(self) -> BreakerState:
        return self.breaker.state

    @property
    def retry_at(self) -> float | None:
        return self.breaker.retry_at

    def _note(self, old: BreakerState, now: float) -> None:
        new = self.breaker.state
        if new is old:
            return
        self.transitions[(old, new)] += 1
        self.history.append(BreakerTransition(now, old, new))
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "kube.breaker.%s %s (was %s)", new.value, self.server, old.value)
        self._lot.unpark_all()

    def allow(self, now: float) -> bool:
        old = self.breaker.state
        allowed = self.breaker.allow(now)
        self._note(old, now)
        return allowed

    def record_success(self, now: float) -> None:
        old = self.breaker.state
        self.breaker.record_success(now)
        self._note(old, now)

    def record_failure(self, now: float) -> None:
        old = self.breaker.state
        self.breaker.record_failure(now)
        self._note(old, now)

    def statistics(self) -> BreakerStatistics:
        return self.breaker.statistics()

    async def wait_transitions(self, count: int) -> list[BreakerTransition]:
        """Wait until at least ``count`` transitions happened; return the history.

        The caller bounds the wait.
        """
        await trio.lowlevel.checkpoint()
        while sum(self.transitions.values()) < count:
            await self._lot.park()
        return list(self.history)


# ------------------------------------------------------------------ requests


def exec_target(spec: StreamSpec, argv: list[str]) -> str:
    """The exec URL path and query for ``spec`` running ``argv`` (§3.1, §11).

    Raises:
        UpstreamError: the spec names no pod.
    """
    if not spec.pod:
        raise UpstreamError("the kube upstream needs a pod to exec into (the spec names none)",
                            http_status=400)
    namespace = spec.namespace or "default"
    query: list[tuple[str, str]] = [("command", arg) for arg in argv]
    if spec.container:
        query.append(("container", spec.container))
    # stdin always: the session may write at any time.  stderr only without a
    # tty (a terminal merges it; kubelet ignores it then, §3.1).
    query += [("stdin", "true"), ("stdout", "true"), ("stderr", "false" if spec.tty else "true"),
              ("tty", "true" if spec.tty else "false")]
    return (f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(spec.pod, safe='')}"
            f"/exec?{urlencode(query, quote_via=quote)}")


def exec_argv(spec: StreamSpec, *, report_cwd: bool = True) -> list[str]:
    """The command to exec for ``spec`` (see the module docstring: cwd, env, default shell).

    Raises:
        UpstreamError: an env name that a POSIX shell cannot export.
    """
    prefix = ""
    if spec.cwd:
        prefix += _CD
    for name, value in spec.env.items():
        if not _IDENT.fullmatch(name):
            raise UpstreamError(f"environment variable {name!r} cannot be set through "
                                "kube exec (not a shell identifier)", http_status=400)
        prefix += f"export {name}={shlex.quote(value)}\n"
    zero = spec.cwd or "sh"  # "$0" of the script: the directory to enter
    if spec.command is None:
        script = prefix + _DEFAULT_SHELL.format(
            bash_setup=_BASH_SETUP if report_cwd else "",
            sh_setup=_SH_SETUP if report_cwd else "")
        return ["/bin/sh", "-c", script, zero]
    if not prefix:
        return list(spec.command)
    return ["/bin/sh", "-c", prefix + 'exec "$@"\n', zero, *spec.command]


@dataclass(frozen=True, slots=True)
class KubeResponse:
    """An apiserver answer to :meth:`KubeUpstream.get_json`."""

    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        """The body as JSON.

        Raises:
            ValueError: not JSON.
        """
        return json.loads(self.body)


def _parse_status(status: int, body: bytes, phrase: str) -> KubeApiError:
    """A non-101 answer as :class:`KubeApiError`; the Status message when there is one (§9)."""
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("kind") == "Status" and isinstance(
            obj.get("message"), str) and obj["message"]:
        details = obj.get("details") if isinstance(obj.get("details"), dict) else None
        reason = obj.get("reason")
        return KubeApiError(status, obj["message"], reason=reason if isinstance(reason, str)
                            else "", details=details, body=body)
    text = body[:500].decode("utf-8", "replace").strip()
    message = f"the apiserver answered HTTP {status} {phrase}".rstrip()
    if text:
        message += f": {text}"
    return KubeApiError(status, message, body=body)


class _RetryableDialError(Exception):
    """A dial failed in a way that may pass (network, TLS cut, timeout, 5xx/429)."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause


def _is_cert_error(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


# ------------------------------------------------------------------ the stream


class _Heartbeat(Heartbeat):
    """:class:`Heartbeat` that counts answered PINGs and wakes :meth:`KubeStream.wait_pongs`."""

    __slots__ = ("pongs", "lot")

    def __init__(self, interval_s: float, *, max_missed: int, now: float) -> None:
        super().__init__(interval_s, max_missed=max_missed, now=now)
        self.pongs = 0
        self.lot = trio.lowlevel.ParkingLot()

    def on_pong(self, payload: bytes, now: float) -> bool:
        answered = super().on_pong(payload, now)
        if answered:
            self.pongs += 1
            self.lot.unpark_all()
        return answered


@dataclass(frozen=True, slots=True)
class KubeStreamStatistics:
    """A snapshot of one :class:`KubeStream`."""

    subprotocol: str
    tty: bool
    bytes_stdout: int
    bytes_stderr: int
    bytes_stdin: int
    resizes_sent: int
    pings_sent: int
    pongs: int
    rtt_s: float | None
    exit_status: ExitStatus | None
    lost: str | None
    closed: bool


class KubeStream:
    """One exec in a pod, over one WebSocket to the apiserver (an ``UpstreamStream``).

    The contract is :mod:`podterm.upstream.base`'s; kube specifics, including
    the "lost" condition, are in this module's docstring.  Built by
    :meth:`KubeUpstream.open`.

    Attributes:
        subprotocol: ``v5.channel.k8s.io`` or ``v4.channel.k8s.io``.
        failure: the Failure Status that ended the command without an exit
            code (e.g. the command was not found), if that is how it ended.
    """

    __slots__ = (
        "spec", "tty", "subprotocol", "failure", "_upstream", "_ws", "_channel", "_tracker",
        "_pending", "_out_eof", "_exit", "_lost", "_closed", "_receiving", "_sending",
        "_stdin_closed", "_lot", "_reader_active", "_hb", "_resize", "_controller",
        "_at_line_start", "_bytes_stdout", "_bytes_stderr", "_bytes_stdin", "_resizes_sent",
        "_pings_sent", "_warned_v4_eof",
    )

    def __init__(self, upstream: KubeUpstream, ws: WebSocketStream, spec: StreamSpec) -> None:
        assert ws.subprotocol in SUBPROTOCOLS_OFFERED
        options = upstream.options
        self.spec = spec
        self.tty = spec.tty
        self.subprotocol: str = ws.subprotocol
        self.failure: K8sStatusError | None = None
        self._upstream = upstream
        self._ws = ws
        self._channel = K8sClientChannel(ws.subprotocol)
        self._tracker = Osc7Tracker() if spec.tty else None
        self._pending: deque[tuple[int, bytes]] = deque()  # decoded output not yet returned
        self._out_eof = False  # the connection has ended: nothing more will arrive
        self._exit: ExitStatus | None = None
        self._lost: str | None = None
        self._closed = False
        self._receiving = False
        self._sending = False
        self._stdin_closed = False
        self._lot = trio.lowlevel.ParkingLot()  # exit/lost/closed/resize: wait_exit waiters
        self._reader_active = False  # receive_some is waiting on the socket
        self._hb = _Heartbeat(options.ping_interval_s, max_missed=options.ping_max_missed,
                              now=trio.current_time())
        ws.heartbeat = self._hb  # the reader hands PONGs to it
        self._resize: tuple[int, int] | None = None  # a size not yet sent
        self._controller = False  # a wait_exit waiter is sending pings and resizes
        self._at_line_start = True
        self._bytes_stdout = 0
        self._bytes_stderr = 0
        self._bytes_stdin = 0
        self._resizes_sent = 0
        self._pings_sent = 0
        self._warned_v4_eof = False

    def __repr__(self) -> str:
        state = ("closed" if self._closed else "lost" if self._lost else
                 self._exit.reason if self._exit else "running")
        return (f"<KubeStream {self._target} {self.subprotocol} {state} "
                f"out={self._bytes_stdout} err={self._bytes_stderr} in={self._bytes_stdin}>")

    @property
    def pid(self) -> int | None:
        """Unknown: the process runs in a pod (``echo $$`` there tells)."""
        return None

    @property
    def _target(self) -> str:
        return f"{self.spec.namespace or 'default'}/{self.spec.pod}"

    @property
    def lost(self) -> str | None:
        """Why the connection was lost mid-session, or None."""
        return self._lost

    # -- ending -----------------------------------------------------------------------------

    def _lose(self, reason: str) -> None:
        if self._lost is not None or self._exit is not None or self._closed:
            return
        self._lost = reason
        log.warning("kube.stream.lost %s: %s", self._target, reason)
        self._upstream._stream_lost()
        self._lot.unpark_all()

    def _settle(self) -> None:
        """The apiserver closed normally (or after a status): decide the exit from channel 3."""
        channel = self._channel
        try:
            self._exit = ExitStatus(code=channel.exit_code(), signal=None)
        except K8sStatusError as exc:
            self.failure = exc
            self._exit = ExitStatus(code=1, signal=None)
            self._emit_error(exc.message or exc.reason or "the command failed")
        except ProtocolViolation as exc:
            self._exit = ExitStatus(code=1, signal=None)
            self._emit_error(exc.message)

    def _emit_error(self, message: str) -> None:
        # kubectl prints "error: <message>" and exits 1 (§5.2); the session's
        # client sees the same line in the output.
        if self.tty:
            self._pending.append((OutputChannel.STDOUT, f"\r\nerror: {message}\r\n".encode()))
        else:
            self._pending.append((OutputChannel.STDERR, f"error: {message}\n".encode()))

    def _on_connection_end(self, exc: ConnectionClosed) -> None:
        if self._out_eof:
            return
        self._out_eof = True
        if self._closed or self._lost is not None:
            pass
        elif exc.code == 1000 or self._channel.status_bytes:
            # Close 1000 delivers the status (silence means success, §5.2); a
            # status followed by a cut connection still tells how it ended.
            self._settle()
        else:
            self._lose(f"the connection to the apiserver was lost ({exc})")
        self._lot.unpark_all()

    # -- output -----------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> tuple[int, bytes]:
        """Output from channels 1 and 2: ``(channel, data)``, or ``(EOF, b"")`` at the end.

        Raises:
            trio.BusyResourceError: another task is receiving.
            trio.ClosedResourceError: the stream was closed.
            ValueError: ``max_bytes`` < 1.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving from this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._pending:
                    return self._take(max_bytes)
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._out_eof:
                    return OutputChannel.EOF, b""
                await self._read_once()
        finally:
            self._receiving = False

    def _take(self, max_bytes: int) -> tuple[int, bytes]:
        pending = self._pending
        channel, data = pending.popleft()
        if len(data) > max_bytes:
            pending.appendleft((channel, data[max_bytes:]))
            return channel, data[:max_bytes]
        if pending and pending[0][0] == channel and len(data) < max_bytes:
            # Everything available now, in one read: join what follows on the same channel.
            parts = [data]
            size = len(data)
            while pending and pending[0][0] == channel and size < max_bytes:
                more = pending[0][1]
                room = max_bytes - size
                if len(more) > room:
                    parts.append(more[:room])
                    pending[0] = (channel, more[room:])
                    size = max_bytes
                    break
                parts.append(more)
                size += len(more)
                pending.popleft()
            data = b"".join(parts)
        return channel, data

    async def _read_once(self) -> None:
        ws = self._ws
        self._reader_active = True
        try:
            batch = await ws.receive_batch()
        except ConnectionClosed as exc:
            self._on_connection_end(exc)
            return
        finally:
            self._reader_active = False
        decode = self._channel.receive_message
        for opcode, payload in batch:
            try:
                events = decode(opcode, payload)
            except ProtocolViolation as exc:
                # The apiserver broke the protocol: the connection is unusable
                # and how the command ended is unknown.
                self._accept_events(exc.partial)
                self._lose(f"the apiserver broke the exec protocol: {exc.message}")
                with trio.CancelScope(shield=True):
                    await ws.abort(exc.close_code, exc.message[:100])
                self._out_eof = True
                return
            self._accept_events(events)

    def _accept_events(self, events: list[Any]) -> None:
        for event in events:
            if type(event) is Stdout:
                data = event.data
                self._bytes_stdout += len(data)
                if self._tracker is not None:
                    self._tracker.feed(data)
                self._pending.append((OutputChannel.STDOUT, data))
            elif type(event) is Stderr:
                self._bytes_stderr += len(event.data)
                self._pending.append((OutputChannel.STDERR, event.data))
            # StatusChunk: kept by the channel until the connection ends (§5.2).

    # -- input ------------------------------------------------------------------------------

    def _input_refused(self) -> BaseException:
        if self._closed or self._stdin_closed:
            return trio.ClosedResourceError("stdin was closed")
        if self._lost is not None:
            return UpstreamLost(self._lost)
        return trio.BrokenResourceError("the process no longer reads its input")

    async def send_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on channel 0 (32 KiB per message); waits while the socket is full.

        Raises:
            trio.BusyResourceError: another task is sending.
            trio.ClosedResourceError: stdin or the stream was closed.
            trio.BrokenResourceError: the process has exited.
            UpstreamLost: the connection to the apiserver was lost.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending to this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if (self._closed or self._stdin_closed or self._lost is not None
                    or self._exit is not None or self._out_eof):
                raise self._input_refused()
            view = memoryview(data).cast("B")
            if not view:
                return
            if self.tty:
                self._at_line_start = view[-1] in (0x0A, 0x0D)
            await self._send_messages([self._channel.stdin(view[i:i + MAX_STDIN_MESSAGE])
                                       for i in range(0, len(view), MAX_STDIN_MESSAGE)])
            self._bytes_stdin += len(view)
        finally:
            self._sending = False

    async def _send_messages(self, messages: list[tuple[bytes, Any]]) -> None:
        """Write messages (after a pending resize, so size changes precede later keystrokes)."""
        ws = self._ws
        frames: list[bytes] = []
        size = self._resize
        if not messages and size is None:
            await trio.lowlevel.checkpoint()
            return
        if size is not None:
            self._resize = None
            prefix, payload = self._channel.resize(*size)
            frames.append(ws.conn.send_binary(payload, prefix))
            self._resizes_sent += 1
        try:
            for prefix, payload in messages:
                frames.append(ws.conn.send_binary(payload, prefix))
            await ws.send_raw(b"".join(frames))
        except (ConnectionClosed, LocalProtocolError) as exc:
            # Closed or closing: the reader finds out why (exit or lost).
            raise self._input_refused() from exc

    async def _flush_resize(self) -> bool:
        """Send a pending size now (the WebSocket's write slot orders it with stdin).

        Returns False when the connection cannot take it (the reader finds out why).
        """
        try:
            await self._send_messages([])
        except (trio.BrokenResourceError, trio.ClosedResourceError, UpstreamLost):
            return False
        return True

    async def close_stdin(self) -> None:
        """End of input: Ctrl-D on a tty, ``FF 00`` on v5; v4 without a tty cannot (see above).

        Idempotent.

        Raises:
            trio.BusyResourceError: another task is sending.
            UpstreamLost: the connection to the apiserver was lost.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending to this stream")
        if self._stdin_closed or self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._lost is not None:
            await trio.lowlevel.checkpoint()
            raise UpstreamLost(self._lost)
        if self._exit is not None or self._out_eof:
            self._stdin_closed = True  # nobody is left to see an EOF
            await trio.lowlevel.checkpoint()
            return
        channel = self._channel
        if self.tty:
            eof = b"\x04" if self._at_line_start else b"\x04\x04"
            message = channel.stdin(eof)
        elif channel.supports_stdin_close:
            message = channel.close_stdin()
        else:
            if not self._warned_v4_eof:
                self._warned_v4_eof = True
                log.warning("kube.stream.stdin_eof.unsupported %s: %s has no stdin EOF "
                            "signal; the process keeps its stdin open until it exits",
                            self._target, self.subprotocol)
            self._stdin_closed = True
            await trio.lowlevel.checkpoint()
            return
        self._sending = True
        try:
            await self._send_messages([message])
            self._stdin_closed = True
        finally:
            self._sending = False

    # -- control ----------------------------------------------------------------------------

    def resize(self, cols: int, rows: int) -> None:
        """Queue ``{"Width":cols,"Height":rows}`` for channel 4 (tty only; 0 is not sent).

        Sent by the task in :meth:`wait_exit`, or before the next stdin.

        Raises:
            ValueError: a dimension outside 0..65535.
            trio.ClosedResourceError: the stream was closed.
        """
        _check_dimension("cols", cols)
        _check_dimension("rows", rows)
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if not self.tty or cols == 0 or rows == 0:
            return  # §6: a zero size is dropped by servers anyway
        self._resize = (cols, rows)
        self._lot.unpark_all()

    async def wait_exit(self) -> ExitStatus:
        """How the command ended (from channel 3, once the apiserver closed).

        A waiter also keeps the link alive: it sends the pings and pending
        resizes (one waiter at a time does).

        After :meth:`aclose` it returns the status if one arrived, else a
        hang-up (SIGHUP), lost or not.

        Raises:
            UpstreamLost: the connection was lost before an exit status arrived
                (and the stream is not closed yet).
        """
        await trio.lowlevel.checkpoint()
        while True:
            if self._exit is not None:
                return self._exit
            if self._closed:
                # Closed by us (lost or not): the process was hung up on.
                self._exit = _HUNG_UP
                return self._exit
            if self._lost is not None:
                raise UpstreamLost(self._lost)
            if self._controller:
                await self._lot.park()
                continue
            self._controller = True
            try:
                await self._control_step()
            finally:
                self._controller = False
                self._lot.unpark_all()  # another waiter takes over if we were cancelled

    async def _control_step(self) -> None:
        hb = self._hb
        if self._resize is None:
            with trio.move_on_at(hb.deadline):
                await self._lot.park()
        if self._exit is not None or self._lost is not None or self._closed or self._out_eof:
            return
        ws = self._ws
        interval = self._upstream.options.ping_interval_s
        if self._resize is not None:
            # send_stdin flushes it too; here for a resize with no typing after it.
            with trio.move_on_after(interval):
                if not await self._flush_resize():
                    return
        now = trio.current_time()
        if now < hb.deadline:
            return
        if not self._reader_active:
            # Flow control paused the reader: PONGs sit unread in the socket,
            # so silence proves nothing.  Skip this ping and look again later.
            hb.deadline = now + hb.interval_s
            return
        payload = hb.poll(now)
        if hb.is_dead:
            self._lose(f"no answer from the apiserver to {hb.max_missed} pings sent "
                       f"{hb.interval_s:g} s apart")
            await ws.abort(1011, "no pong")
            return
        if payload is not None:
            with trio.move_on_after(interval):
                try:
                    await ws.ping(payload)
                    self._pings_sent += 1
                except (ConnectionClosed, LocalProtocolError):
                    return  # the reader sees why

    async def wait_pongs(self, count: int) -> None:
        """Wait until ``count`` PINGs were answered (liveness checks, tests); caller bounds it."""
        await trio.lowlevel.checkpoint()
        while self._hb.pongs < count:
            await self._hb.lot.park()

    def capture_context(self) -> Context:
        """The last cwd the shell reported (OSC 7), else its start directory; its start env."""
        tracker = self._tracker
        cwd = tracker.cwd if tracker is not None and tracker.cwd else self.spec.cwd
        return Context(cwd=cwd, env=dict(self.spec.env))

    def statistics(self) -> KubeStreamStatistics:
        return KubeStreamStatistics(
            subprotocol=self.subprotocol, tty=self.tty, bytes_stdout=self._bytes_stdout,
            bytes_stderr=self._bytes_stderr, bytes_stdin=self._bytes_stdin,
            resizes_sent=self._resizes_sent, pings_sent=self._pings_sent,
            pongs=self._hb.pongs, rtt_s=self._hb.rtt_s, exit_status=self._exit, lost=self._lost,
            closed=self._closed)

    async def aclose(self) -> None:
        """Close 1000 and a bounded wait for the apiserver to end the connection.  Idempotent.

        The apiserver then ends the exec (see the module docstring for what
        happens to the remote process).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._lot.unpark_all()
        try:
            # Shielded and bounded inside (close_timeout_s).
            await self._ws.aclose(1000, "")
        except Exception as exc:  # noqa: BLE001 - closing a broken link: nothing to do
            log.debug("kube.stream.close.failed %s: %s", self._target, exc)
        finally:
            self._upstream._stream_closed()
            self._lot.unpark_all()


# ------------------------------------------------------------------ the upstream


@dataclass(frozen=True, slots=True)
class KubeUpstreamStatistics:
    """A snapshot of one :class:`KubeUpstream`."""

    server: str
    breaker: BreakerStatistics
    transitions: Mapping[str, int]
    dials: int
    dial_failures: int
    streams_opened: int
    streams_open: int
    streams_lost: int
    subprotocols: Mapping[str, int]


class KubeUpstream:
    """Runs streams as exec sessions in pods, through one kube-apiserver.

    Args:
        credentials: server, TLS and ``Authorization`` (see
            :mod:`podterm.upstream.kubeconfig`).
        options: retries, breaker, keepalive, impersonation.
        rng: randomness for the backoff jitter (a seeded one in tests).

    Build it from the config with :meth:`from_config`.
    """

    def __init__(self, credentials: KubeCredentials,
                 options: KubeUpstreamOptions | None = None, *,
                 rng: Callable[[], float] = random.random) -> None:
        self.credentials = credentials
        self.options = options or KubeUpstreamOptions()
        self._rng = rng
        self.breaker = ApiserverBreaker(credentials.server,
                                        failure_threshold=self.options.breaker_failures,
                                        cooldown_s=self.options.breaker_cooldown_s)
        self._dials = 0
        self._dial_failures = 0
        self._opened = 0
        self._open = 0
        self._lost = 0
        self._subprotocols: Counter[str] = Counter()

    @classmethod
    def from_config(cls, kubeconfig: str | None, context: str | None,
                    options: KubeUpstreamOptions | None = None) -> KubeUpstream:
        """From ``config.upstream``: a kubeconfig (and context), else in-cluster.

        Raises:
            ConfigError: the credentials cannot be loaded.
        """
        return cls(load_credentials(kubeconfig, context), options)

    def __repr__(self) -> str:
        return (f"<KubeUpstream {self.credentials.server} {self.breaker.state.value} "
                f"open={self._open} opened={self._opened}>")

    @property
    def server(self) -> str:
        return self.credentials.server

    def _stream_closed(self) -> None:
        self._open -= 1

    def _stream_lost(self) -> None:
        self._lost += 1
        # A connection that dies mid-session is the apiserver (or the path to
        # it) failing: it counts against the breaker like a failed dial.
        self.breaker.record_failure(trio.current_time())

    # -- dialing ----------------------------------------------------------------------------

    async def _headers(self, *, accept_json: bool = False,
                       anonymous_ok: bool = False) -> list[tuple[str, str]]:
        creds = self.credentials
        headers: list[tuple[str, str]] = [("User-Agent", _USER_AGENT)]
        try:
            authorization = await creds.authorization_async()
        except ConfigError as exc:
            raise UpstreamError(exc.message) from exc
        if authorization:
            headers.append(("Authorization", authorization))
        if accept_json:
            headers.append(("Accept", "application/json"))
        identity = current_identity()
        if self.options.impersonate and identity is None and not anonymous_ok:
            # Never fall back to the gateway's own (broader) identity for an exec.
            raise UpstreamError("impersonation is on but the stream was opened on behalf "
                                "of nobody (no acting_as identity)", http_status=500)
        if self.options.impersonate and identity is not None:
            headers.append(("Impersonate-User", identity.user))
            headers.extend(("Impersonate-Group", group) for group in identity.groups)
        return headers

    async def _connect(self) -> trio.abc.Stream:
        """TCP (+ TLS) to the apiserver; the caller bounds it."""
        creds = self.credentials
        tcp = await trio.open_tcp_stream(creds.host, creds.port)
        if not creds.secure:
            return tcp
        assert creds.ssl_context is not None
        stream = trio.SSLStream(tcp, creds.ssl_context, server_hostname=creds.server_hostname,
                                https_compatible=True)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    def _host_header(self) -> str:
        creds = self.credentials
        host = creds.host
        shown = f"[{host}]" if ":" in host else host
        default = 443 if creds.secure else 80
        return shown if creds.port == default else f"{shown}:{creds.port}"

    async def _dial_once(self, target: str) -> WebSocketStream:
        """One upgrade attempt.

        Raises:
            _RetryableDialError: the attempt failed in a way that may pass.
            KubeApiError: the apiserver refused for good (4xx).
            UpstreamError: anything else that will not pass by retrying.
        """
        headers = await self._headers()
        try:
            stream = await self._connect()
        except OSError as exc:
            raise _RetryableDialError(f"cannot connect to {self.server}: "
                                      f"{exc.strerror or exc}", exc) from exc
        except trio.BrokenResourceError as exc:
            if _is_cert_error(exc):
                raise UpstreamError(f"TLS verification of {self.server} failed: "
                                    f"{exc.__cause__ or exc}") from exc
            raise _RetryableDialError(f"TLS handshake with {self.server} failed: "
                                      f"{exc.__cause__ or exc}", exc) from exc
        try:
            nonce = os.urandom(16)
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
            request = build_request(self._host_header(), self.credentials.base_path + target,
                                    subprotocols=SUBPROTOCOLS_OFFERED, extra_headers=headers,
                                    key=nonce)
            try:
                await stream.send_all((conn.send(request) or b"")
                                      + (conn.send(h11.EndOfMessage()) or b""))
                event = await next_event(stream, conn)
                while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                    event = await next_event(stream, conn)
                if isinstance(event, h11.Response):
                    body = await read_body(stream, conn, limit=MAX_ERROR_BODY, truncate=True, eof_ends=True)
                    error = _parse_status(event.status_code, body,
                                          event.reason.decode("latin-1", "replace"))
                    if error.status == 401:
                        # Not the podterm user's fault: say whose credential failed.
                        error = KubeApiError(401, f"{error.message}: the apiserver rejected the "
                                             f"gateway's credentials ({self.credentials.source})",
                                             reason=error.reason_name, body=body)
                    if error.retryable:
                        raise _RetryableDialError(error.message, error)
                    raise error
                if not isinstance(event, h11.InformationalResponse):
                    raise _RetryableDialError(f"{self.server} closed the connection during "
                                              "the upgrade")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _RetryableDialError(f"connection to {self.server} lost during the "
                                          "upgrade", exc) from exc
            except h11.ProtocolError as exc:
                raise UpstreamError(f"{self.server} sent a malformed HTTP answer: {exc}"
                                    ) from exc
            try:
                chosen = check_response(event, nonce, SUBPROTOCOLS_OFFERED)
            except HandshakeError as exc:
                raise UpstreamError(f"{self.server} answered the exec upgrade wrongly: "
                                    f"{exc.message}") from exc
            if chosen not in SUBPROTOCOLS_OFFERED:
                # §11: a 101 with a subprotocol not offered (or none, which
                # means channel.k8s.io) is a failure.
                raise UpstreamError(f"{self.server} chose WebSocket subprotocol {chosen!r}; "
                                    f"podterm offered {', '.join(SUBPROTOCOLS_OFFERED)}")
            trailing, _ = conn.trailing_data
            ws_conn = WebSocketConnection(Role.CLIENT, limits=self.options.limits,
                                          mask_key_source=lambda: os.urandom(4))
            return WebSocketStream(stream, ws_conn, close_timeout_s=self.options.close_timeout_s,
                                   initial=bytes(trailing), subprotocol=chosen)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def _with_retries(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Run ``attempt`` behind the breaker, retrying what may pass (see the module docstring)."""
        options = self.options
        breaker = self.breaker
        backoff = Backoff(options.backoff_base_s, options.backoff_cap_s, rng=self._rng)
        deadline = trio.current_time() + options.open_retry_s
        last: str | None = None
        while True:
            now = trio.current_time()
            if not breaker.allow(now):
                wake = breaker.retry_at
                if wake is None:  # half-open, another caller's trial is out
                    wake = now + backoff.window_s
                if wake > deadline:
                    raise UpstreamUnavailable(
                        f"the apiserver {self.server} is unavailable (circuit breaker "
                        f"{breaker.state.value} after {breaker.statistics().consecutive_failures}"
                        f" failures{'; last: ' + last if last else ''}); {what} not retried")
                await trio.sleep_until(wake)
                continue
            self._dials += 1
            try:
                with trio.fail_after(options.connect_timeout_s):
                    result = await attempt()
            except trio.TooSlowError:
                last = f"no answer within {options.connect_timeout_s:g} s"
            except _RetryableDialError as exc:
                last = exc.message
            except KubeApiError:
                breaker.record_success(trio.current_time())  # the apiserver answered
                raise
            except UpstreamError:
                self._dial_failures += 1
                breaker.record_failure(trio.current_time())
                raise
            else:
                breaker.record_success(trio.current_time())
                return result
            self._dial_failures += 1
            breaker.record_failure(trio.current_time())
            delay = next(backoff)
            log.info("kube.dial.retry %s: %s; next attempt in %.2f s", self.server, last, delay)
            if trio.current_time() + delay > deadline:
                raise UpstreamUnavailable(f"cannot reach the apiserver {self.server}: {last}")
            await trio.sleep(delay)

    # -- the Upstream protocol -------------------------------------------------------------

    async def open(self, spec: StreamSpec) -> KubeStream:
        """Exec ``spec`` in its pod and return the stream (retrying what may pass).

        The identity set with :func:`acting_as` is impersonated when
        ``options.impersonate``.

        Raises:
            KubeApiError: the apiserver refused (``pods "x" not found``, forbidden, ...).
            UpstreamUnavailable: not reachable within ``open_retry_s``, or the
                breaker is open.
            UpstreamError: TLS verification failed, a protocol error, a bad spec.
        """
        argv = exec_argv(spec, report_cwd=self.options.report_cwd)
        target = exec_target(spec, argv)
        ws: WebSocketStream = await self._with_retries(
            f"exec in {spec.namespace or 'default'}/{spec.pod}",
            lambda: self._dial_once(target))
        try:
            stream = KubeStream(self, ws, spec)
            self._opened += 1
            self._open += 1
            self._subprotocols[stream.subprotocol] += 1
            if spec.tty and spec.cols and spec.rows:
                # kubectl sends the size right after the upgrade (§6); 0x0: no size yet.
                stream.resize(spec.cols, spec.rows)
                with trio.move_on_after(self.options.connect_timeout_s):
                    await stream._flush_resize()
        except BaseException:
            with trio.CancelScope(shield=True):
                await ws.abort(1001, "")
            raise
        log.info("kube.stream.open.complete %s/%s %s via %s", spec.namespace or "default",
                 spec.pod, stream.subprotocol, self.server)
        # The stream is the caller's now: yield, but do not raise Cancelled over it.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def get_json(self, path: str, *, identity: Identity | None = None) -> KubeResponse:
        """``GET path`` on the apiserver (discovery, ``/version``, a pod): for the kubectl API.

        One request on its own connection, behind the breaker, without retries
        (kubectl retries discovery itself).  ``identity`` (default: the
        :func:`acting_as` one) is impersonated when ``options.impersonate``;
        with none the request is the gateway's own (discovery, ``/version``).

        Returns:
            The answer, whatever its status (a 404 is an answer, not an error).

        Raises:
            UpstreamUnavailable: the breaker is open, or the apiserver did not answer.
            UpstreamError: TLS verification failed, a malformed answer.
        """
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if identity is None:
            return await self._get_once(path)
        with acting_as(identity):
            return await self._get_once(path)

    async def _get_once(self, path: str) -> KubeResponse:
        async def attempt() -> KubeResponse:
            headers = await self._headers(accept_json=True, anonymous_ok=True)
            try:
                stream = await self._connect()
            except OSError as exc:
                raise _RetryableDialError(f"cannot connect to {self.server}: "
                                          f"{exc.strerror or exc}", exc) from exc
            except trio.BrokenResourceError as exc:
                if _is_cert_error(exc):
                    raise UpstreamError(f"TLS verification of {self.server} failed: "
                                        f"{exc.__cause__ or exc}") from exc
                raise _RetryableDialError(f"TLS handshake with {self.server} failed", exc
                                          ) from exc
            async with stream:
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
                request = h11.Request(method="GET", target=self.credentials.base_path + path,
                                      headers=[("Host", self._host_header()),
                                               ("Connection", "close"), *headers])
                try:
                    await stream.send_all((conn.send(request) or b"")
                                          + (conn.send(h11.EndOfMessage()) or b""))
                    event = await next_event(stream, conn)
                    while isinstance(event, h11.InformationalResponse):
                        event = await next_event(stream, conn)
                    if not isinstance(event, h11.Response):
                        raise _RetryableDialError(f"{self.server} closed the connection")
                    body = await read_body(stream, conn, limit=MAX_JSON_BODY, truncate=True, eof_ends=True)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _RetryableDialError(f"connection to {self.server} lost", exc) from exc
                except h11.ProtocolError as exc:
                    raise UpstreamError(f"{self.server} sent a malformed HTTP answer: {exc}"
                                        ) from exc
                content_type = next((v.decode("latin-1") for k, v in event.headers
                                     if k == b"content-type"), "")
                response = KubeResponse(event.status_code, body, content_type)
                if event.status_code >= 500:
                    # An answer, but the apiserver failing: the breaker counts it.
                    self.breaker.record_failure(trio.current_time())
                    self._dial_failures += 1
                return response

        now = trio.current_time()
        if not self.breaker.allow(now):
            raise UpstreamUnavailable(f"the apiserver {self.server} is unavailable (circuit "
                                      f"breaker {self.breaker.state.value})")
        self._dials += 1
        try:
            with trio.fail_after(self.options.connect_timeout_s):
                response = await attempt()
        except (trio.TooSlowError, _RetryableDialError) as exc:
            self._dial_failures += 1
            self.breaker.record_failure(trio.current_time())
            raise UpstreamUnavailable(f"cannot reach the apiserver {self.server}: "
                                      f"{getattr(exc, 'message', None) or 'timed out'}") from exc
        except UpstreamError:
            self._dial_failures += 1
            self.breaker.record_failure(trio.current_time())
            raise
        if response.status < 500:
            self.breaker.record_success(trio.current_time())
        return response

    # -- observability ---------------------------------------------------------------------

    def statistics(self) -> KubeUpstreamStatistics:
        """A frozen snapshot: breaker, dials, streams."""
        transitions = {f"{old.value}->{new.value}": n
                       for (old, new), n in sorted(self.breaker.transitions.items(),
                                                   key=lambda kv: (kv[0][0].value,
                                                                   kv[0][1].value))}
        return KubeUpstreamStatistics(
            server=self.server, breaker=self.breaker.statistics(),
            transitions=MappingProxyType(transitions), dials=self._dials,
            dial_failures=self._dial_failures, streams_opened=self._opened,
            streams_open=self._open, streams_lost=self._lost,
            subprotocols=MappingProxyType(dict(self._subprotocols)))

    def metric_families(self) -> list[MetricFamily]:
        """Prometheus families for ``/metrics`` (rendered by :func:`podterm.metrics.render`)."""
        server = {"apiserver": self.server}
        breaker = self.breaker
        legal = ((BreakerState.CLOSED, BreakerState.OPEN),
                 (BreakerState.OPEN, BreakerState.HALF_OPEN),
                 (BreakerState.HALF_OPEN, BreakerState.CLOSED),
                 (BreakerState.HALF_OPEN, BreakerState.OPEN))
        transitions = tuple(
            (MappingProxyType({**server, "from": old.value, "to": new.value}),
             float(breaker.transitions.get((old, new), 0)))
            for old, new in legal)
        one = MappingProxyType(server)
        return [
            MetricFamily("podterm_upstream_breaker_state", "gauge",
                         "Circuit breaker of the kube upstream's apiserver: 0 closed, 1 open, "
                         "2 half-open.", ((one, BREAKER_STATE_VALUES[breaker.state]),)),
            MetricFamily("podterm_upstream_breaker_transitions_total", "counter",
                         "Circuit breaker state changes, by from and to state.", transitions),
            MetricFamily("podterm_upstream_dials_total", "counter",
                         "Connections made to the apiserver (exec upgrades and reads).",
                         ((one, self._dials),)),
            MetricFamily("podterm_upstream_dial_failures_total", "counter",
                         "Connections to the apiserver that failed (retried or not).",
                         ((one, self._dial_failures),)),
            MetricFamily("podterm_upstream_streams_lost_total", "counter",
                         "Exec streams whose apiserver connection was lost mid-session.",
                         ((one, self._lost),)),
            MetricFamily("podterm_upstream_streams_open", "gauge",
                         "Exec streams open through the apiserver.", ((one, self._open),)),
        ]
