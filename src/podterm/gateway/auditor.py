"""The gateway's audit trail and session recordings, wired to requests and sessions.

One :class:`Auditor` per gateway holds the audit sink (``open_audit_sink``)
and the recording writer (``RecordingWriter``, or None when recording is off)
and turns what happens in the gateway into the events of ``docs/audit.md``:

* the router calls :meth:`Auditor.enter_request`, then
  :meth:`~Auditor.access_granted` or :meth:`~Auditor.access_refused`
  (``auth.success`` / ``auth.failure``, ``authz.allow`` / ``authz.deny``);
* the session registry calls the :class:`~podterm.session.registry.RegistryHooks`
  methods: :meth:`~Auditor.check_accepting` before a session is created (a
  ``fail-closed`` writer that is behind refuses it with 503),
  :meth:`~Auditor.starting` once the Session exists (opens its recorder,
  ``session.create``), :meth:`~Auditor.refused` when creation failed;
* each session calls the :class:`~podterm.session.session.SessionObserver`
  methods (``session.attach``/``resume``/``join``/``detach``/``end``);
* a recording that cannot be written kills its session
  (``recording.failure``, then ``session.end`` with ``recording_failed``).

Request context
---------------
Every event carries the request id, the source address and the actor.  The
router stores them in a context variable (:func:`request_context`) for the
task serving the connection, so events raised synchronously deep in a
session (an attach, a detach) are attributed to the connection that caused
them without threading a parameter through every call.  Events a session
raises on its own (its end, a recording failure) carry the context of the
request that created it.

Never dropped, never blocking where it cannot
---------------------------------------------
Async paths ``await`` the sink's ``emit`` (backpressure under a full buffer).
Synchronous paths (an attach, a detach, a session's end, a recording
failure) call :meth:`Auditor.emit_nowait`: the event goes into the buffer at
once, or, when the buffer is full, into an ordered spill queue drained by one
task that waits for room, so nothing is dropped and the order is kept.  Only
an event raised after the sink has shut down cannot be written; it is logged
at ERROR with its JSON line and counted (``dropped``), never silently lost.

Audit off
---------
With no audit log and no HTTP sink (``open_audit_sink`` returns a fan-out of
nothing), no event is built at all (:attr:`Auditor.enabled` is False): a
handshake then pays for no event it would discard.  Any configured sink, a
fan-out holding one included, turns every event back on.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal as _signal
import time
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from podterm import __version__
from podterm.audit.events import AuditEvent, Target, make_event
from podterm.audit.sinks import AuditSink, FanOutSink, SinkStatistics
from podterm.auth.identity import Identity
from podterm.batcher import BatcherStatistics, BufferFull
from podterm.errors import ConfigError, PodtermError
from podterm.metrics import MetricFamily, labelled
from podterm.recording.recorder import Recorder, RecordingFailed
from podterm.recording.writer import RecordingWriter
from podterm.session.attachment import Attachment, Mode
from podterm.store.base import SessionRecord
from podterm.upstream.base import StreamSpec

if TYPE_CHECKING:
    from podterm.session.session import Session

__all__ = ["Auditor", "RequestContext", "request_context", "source_of", "verb_of"]

log = logging.getLogger(__name__)

#: Bound on emitting ``gateway.stop`` and on draining the spill queue at shutdown.
CLOSE_TIMEOUT_S = 5.0

#: Ends that are failures of the gateway's own machinery, not of the user's process.
_ERROR_ENDS = frozenset({"upstream_failed", "recording_failed", "internal_error"})

_SESSION_PATH = re.compile(r"/api/v1/sessions/(?P<id>[a-z0-9-]{3,64})(?P<sub>/attach)?/?")
_POD_PATH = re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)(?:/(?P<sub>[a-z]+))?/?")


class _RequestLike(Protocol):
    """What the auditor reads of :class:`podterm.gateway.http.Request`."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    peer: str
    identity: Identity | None


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asked, from where, in which request: the common fields of every event."""

    request_id: str | None = None
    source_addr: str | None = None
    user: str | None = None
    groups: tuple[str, ...] = ()

    def with_identity(self, identity: Identity | None) -> RequestContext:
        if identity is None:
            return self
        return replace(self, user=identity.user, groups=tuple(identity.groups))


_NO_CONTEXT = RequestContext()
_CURRENT: ContextVar[RequestContext] = ContextVar("podterm_audit_request", default=_NO_CONTEXT)


def request_context() -> RequestContext:
    """The context of the request the current task serves (empty outside one)."""
    return _CURRENT.get()


def source_of(request: _RequestLike) -> str | None:
    """The client's address as the gateway believes it.

    ``request.client`` (PROXY protocol / trusted X-Forwarded-For) when the
    HTTP layer resolved one, else the TCP peer.
    """
    client = getattr(request, "client", None)
    if client is not None:
        return str(client)
    return request.peer if request.peer and request.peer != "?" else None


def verb_of(request: _RequestLike) -> str:
    """The RBAC verb (docs/audit.md) a request exercises, from its method and path."""
    path, method = request.path, request.method
    if path.rstrip("/") == "/api/v1/sessions":
        return "exec" if method == "POST" else "list-sessions"
    match = _SESSION_PATH.fullmatch(path)
    if match is not None:
        if match.group("sub"):
            return "join" if request.query.get("mode") == "ro" else "attach"
        return "admin" if method == "DELETE" else "list-sessions"
    match = _POD_PATH.fullmatch(path)
    if match is not None:
        return "attach" if match.group("sub") == "attach" else "exec"
    return "admin"


def target_of(request: _RequestLike) -> Target | None:
    """The target a request names in its path, if any."""
    match = _SESSION_PATH.fullmatch(request.path)
    if match is not None:
        return Target(session=match.group("id"))
    match = _POD_PATH.fullmatch(request.path)
    if match is not None:
        return Target(namespace=match.group("ns"), pod=match.group("pod"),
                      container=request.query.get("container") or None)
    return None


def _offered_method(request: _RequestLike) -> str:
    """How the failed caller tried to authenticate (never the credential itself)."""
    if "authorization" in request.headers or \
            "bearer.podterm." in request.headers.get("sec-websocket-protocol", ""):
        return "token"
    return "none"


def _spec_target(spec: StreamSpec, session_id: str | None = None) -> Target:
    return Target(namespace=spec.namespace or None, pod=spec.pod or None,
                  container=spec.container or None, session=session_id)


def _wants_events(sink: AuditSink) -> bool:
    """False only for a fan-out of nothing (at any depth): audit is off."""
    if isinstance(sink, FanOutSink):
        return any(_wants_events(child) for child in sink.sinks)
    return True


def _signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True, slots=True)
class _SessionRecord:
    """What the auditor remembers of a live session (for the events it raises itself)."""

    context: RequestContext
    target: Target
    recording: str | None
    #: Wall-clock start of an adopted session (its record's), for ``duration_s``.
    created_at: float | None = None


class Auditor:
    """Emits the gateway's audit events and records its sessions (see the module docstring).

    Args:
        sink: where audit events go (``open_audit_sink``); started by :meth:`run`.
        recordings: the recording writer, or None when recording is off.
        shell: the local upstream's shell, for a recording's ``env.SHELL``.
    """

    def __init__(self, sink: AuditSink, recordings: RecordingWriter | None, *,
                 shell: str = "/bin/sh") -> None:
        self.sink = sink  # sets enabled
        self.recordings = recordings
        self.shell = shell
        #: Events that could not be written at all (raised after the sink shut down).
        self.dropped = 0
        self._sessions: dict[str, _SessionRecord] = {}
        self._spill: deque[AuditEvent] = deque()
        self._spilling = False
        self._spill_lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._started_emitted = False
        self._ended_by_shutdown = 0  # gateway.stop's "sessions"

    @property
    def sink(self) -> AuditSink:
        """Where events go; setting it re-decides :attr:`enabled`."""
        return self._sink

    @sink.setter
    def sink(self, sink: AuditSink) -> None:
        self._sink = sink
        #: False when no sink takes events (audit off): events are not even built.
        self.enabled = _wants_events(sink)

    def __repr__(self) -> str:
        return (f"<Auditor sink={self.sink.name} recordings="
                f"{self.recordings.directory if self.recordings else 'off'} "
                f"spilled={len(self._spill)}>")

    # ----------------------------------------------------------- lifecycle

    async def preflight(self) -> None:
        """Before serving: the recordings directory and the audit file must be usable.

        Raises:
            ConfigError: either cannot be created or written, with what to do.
        """
        recordings = self.recordings
        if recordings is not None:
            directory = recordings.directory

            def make() -> None:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                if not os.access(directory, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied (not writable)")

            try:
                await trio.to_thread.run_sync(make)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the recordings directory {str(directory)!r}: "
                    f"{exc.strerror or exc}; set --recordings DIR to a writable directory, "
                    "or --recordings off") from exc
            log.info("recording.start: every session is recorded into %s (input %s)",
                     directory, "too" if recordings.record_input else "not recorded")
        else:
            log.info("recording.off: sessions are not recorded")
        sinks = getattr(self.sink, "sinks", (self.sink,))  # a fan-out's children
        for sink in sinks:
            path = getattr(sink, "path", None)
            if not isinstance(path, Path):
                continue

            def touch(path: Path = path) -> None:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                 0o600))

            try:
                await trio.to_thread.run_sync(touch)
            except OSError as exc:
                raise ConfigError(f"cannot write the audit log {str(path)!r}: "
                                  f"{exc.strerror or exc}; fix --audit-log") from exc

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the audit sink and the recording writer until :meth:`aclose`.

        Started *outside* the gateway's root nursery, so both outlive the
        sessions: every session's end event and its last output are written.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sink.run)
            if self.recordings is not None:
                await nursery.start(self.recordings.run)
            self._nursery = nursery
            task_status.started()
        self._nursery = None

    def gateway_started(self, url: str, workers: int = 1) -> None:
        """``gateway.start``: the listeners are up.

        (``gateway.stop``, from :meth:`aclose`, counts in ``sessions`` the
        sessions the shutdown ended.)
        """
        self._started_emitted = True
        self.emit_nowait("gateway.start", context=_NO_CONTEXT, version=__version__, url=url,
                         workers=workers)

    async def aclose(self, reason: str = "drained", *, failed: bool = False) -> None:
        """Stop: finish every recording, write ``gateway.stop``, flush and close the sink.

        Bounded (each writer flushes under its own shielded bound); safe to
        call under cancellation.
        """
        with trio.CancelScope(shield=True):
            if self.recordings is not None:
                await self.recordings.aclose()  # failures it reports are audited below
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                if self._started_emitted:
                    await self.emit("gateway.stop", outcome="error" if failed else "success",
                                    context=_NO_CONTEXT, reason=reason,
                                    sessions=self._ended_by_shutdown)
                while self._spill:
                    await self._spill_lot.park()
            await self.sink.aclose()
        if self._nursery is not None:
            # Both writers have flushed and stopped; a sink whose run() does not
            # return on aclose() (MemorySink) must not hold the gateway up.
            self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ emitting

    def _make(self, type_: str, *, outcome: str | None, context: RequestContext | None,
              target: Target | None, details: Mapping[str, Any]) -> AuditEvent:
        ctx = context if context is not None else _CURRENT.get()
        return make_event(type_, outcome=outcome, request_id=ctx.request_id,
                          actor_user=ctx.user, actor_groups=ctx.groups,
                          source_addr=ctx.source_addr, target=target, **details)

    async def emit(self, type_: str, *, outcome: str | None = None,
                   context: RequestContext | None = None, target: Target | None = None,
                   **details: Any) -> None:
        """Build and emit an event; waits while the buffer is full (backpressure).

        ``context`` defaults to the current request's (:func:`request_context`).
        """
        if not self.enabled:
            return
        event = self._make(type_, outcome=outcome, context=context, target=target,
                           details=details)
        while self._spill:  # older events first
            await self._spill_lot.park()
        try:
            await self.sink.emit(event)
        except trio.ClosedResourceError:
            self._drop(event)

    def emit_nowait(self, type_: str, *, outcome: str | None = None,
                    context: RequestContext | None = None, target: Target | None = None,
                    **details: Any) -> None:
        """Build and emit an event without blocking; a full buffer spills it, in order."""
        if not self.enabled:
            return
        self._submit_nowait(self._make(type_, outcome=outcome, context=context, target=target,
                                       details=details))

    def submit_nowait(self, event: AuditEvent) -> None:
        """Emit an event built elsewhere (e.g. ``policy.reload``) without blocking, in order."""
        if self.enabled:
            self._submit_nowait(event)

    def _submit_nowait(self, event: AuditEvent) -> None:
        if not self._spill:
            try:
                self.sink.emit_nowait(event)
                return
            except BufferFull:
                pass  # spill it: a task waits for room
            except trio.ClosedResourceError:
                self._drop(event)
                return
        nursery = self._nursery
        if nursery is None:
            self._drop(event)
            return
        self._spill.append(event)
        if not self._spilling:
            self._spilling = True
            nursery.start_soon(self._drain_spill)

    async def _drain_spill(self) -> None:
        """The one task that writes spilled events, oldest first, waiting for room."""
        try:
            while self._spill:
                event = self._spill[0]
                try:
                    await self.sink.emit(event)
                except trio.ClosedResourceError:
                    self._drop(event)
                self._spill.popleft()
        finally:
            for event in self._spill:  # cancelled: a last try each, never silent
                try:
                    self.sink.emit_nowait(event)
                except (BufferFull, trio.ClosedResourceError):
                    self._drop(event)
            self._spill.clear()
            self._spilling = False
            self._spill_lot.unpark_all()

    def _drop(self, event: AuditEvent) -> None:
        self.dropped += 1
        log.error("audit.emit.failed: the audit sink is closed; event not written: %s",
                  event.to_json_line().decode("ascii").rstrip())

    # ------------------------------------------------------- requests, auth

    def enter_request(self, request: _RequestLike) -> RequestContext:
        """Start a request's context (its id and source address); returns it.

        Audit off: nothing reads the context, so none is made.
        """
        if not self.enabled:
            return _NO_CONTEXT
        ctx = RequestContext(request_id=getattr(request, "request_id", None) or None,
                             source_addr=source_of(request))
        _CURRENT.set(ctx)
        return ctx

    async def access_granted(self, request: _RequestLike, *, authorized: bool) -> None:
        """``auth.success`` (and ``authz.allow`` when the route was authorized)."""
        if not self.enabled:
            return
        identity = request.identity
        assert identity is not None
        ctx = _CURRENT.get().with_identity(identity)
        _CURRENT.set(ctx)
        await self.emit("auth.success", context=ctx, method=identity.method)
        if authorized:
            await self.emit("authz.allow", context=ctx, target=target_of(request),
                            verb=verb_of(request), rule="default: group podterm:admins",
                            via="policy")

    async def access_refused(self, request: _RequestLike, exc: PodtermError) -> None:
        """``auth.failure`` (401, 429, 503), or ``auth.success`` + ``authz.deny`` (403).

        The failure's ``reason`` is what the client was answered with;
        ``failure`` adds the authenticator's stable code when it gives one
        (``auth.chain.FailureReason``: ``missing_credentials``, ``expired``,
        ...), for rules that match on it.  Never the credential.
        """
        if not self.enabled:
            return
        identity = request.identity
        ctx = _CURRENT.get()
        if identity is None:
            code = getattr(exc, "reason", None)
            method = getattr(exc, "method", None)
            if not isinstance(method, str) or method == "chain":
                method = _offered_method(request)  # no authenticator took it
            await self.emit("auth.failure", context=ctx,
                            outcome="denied" if exc.outcome == "denied" else "rejected",
                            target=target_of(request), method=method,
                            reason=exc.message or type(exc).__name__,
                            failure=str(code) if isinstance(code, str) and code else None,
                            http_status=exc.http_status)
            return
        ctx = ctx.with_identity(identity)
        _CURRENT.set(ctx)
        await self.emit("auth.success", context=ctx, method=identity.method)
        await self.emit("authz.deny", context=ctx, target=target_of(request),
                        verb=verb_of(request), reason=exc.message or type(exc).__name__,
                        rule="default: group podterm:admins", via="policy")

    async def protocol_rejected(self, request: _RequestLike | None, reason: str, *,
                                http_status: int | None = None, close_code: int | None = None,
                                protocol: str | None = None) -> None:
        """``protocol.reject``: a handshake or protocol violation closed a connection."""
        await self.emit("protocol.reject", outcome="rejected",
                        target=target_of(request) if request is not None else None,
                        reason=reason, http_status=http_status, close_code=close_code,
                        protocol=protocol, path=request.path if request is not None else None)

    def protocol_rejected_nowait(self, reason: str, *, close_code: int | None = None,
                                 http_status: int | None = None, protocol: str | None = None,
                                 path: str | None = None, target: Target | None = None,
                                 context: RequestContext | None = None) -> None:
        """:meth:`protocol_rejected` from synchronous code (a relay's receiver, the HTTP layer)."""
        self.emit_nowait("protocol.reject", outcome="rejected", context=context, target=target,
                         reason=reason, http_status=http_status, close_code=close_code,
                         protocol=protocol, path=path)

    # ------------------------------------------------- registry hooks: create

    def is_accepting(self) -> bool:
        """May new sessions start (both writers keep up, or the policy is ``block``)?"""
        if not self.sink.is_accepting():
            return False
        return self.recordings is None or self.recordings.is_accepting()

    def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` says no (a ``fail-closed`` writer is behind or failing), or None.

        Built from statistics, so a probe does not count as a refused session.
        """
        if self.is_accepting():
            return None
        sink_stats, rec_stats = self.statistics()
        stats: list[BatcherStatistics] = []

        def walk(s: SinkStatistics) -> None:
            if s.batcher is not None:
                stats.append(s.batcher)
            for child in s.children:
                walk(child)

        walk(sink_stats)
        if rec_stats is not None:
            stats.append(rec_stats.batcher)
        for b in stats:
            if not b.accepting:
                why = f"; the writer is failing: {b.last_error}" if b.failing else ""
                return (f"the {b.name} writer cannot keep up ({b.buffered_weight}/{b.capacity} "
                        f"buffered, high-water mark {b.high_water}){why}: not taking new "
                        "sessions")
        return "the audit writer is not accepting new sessions"

    def check_accepting(self) -> None:
        """Raise :class:`~podterm.batcher.BufferFull` (503) when a new session must be refused."""
        self.sink.check_accepting()
        if self.recordings is not None:
            self.recordings.check_accepting()

    async def starting(self, session: Session, owner: Identity) -> None:
        """The Session exists and has not run yet: open its recorder.

        ``session.create`` follows in :meth:`started`, once it is registered.

        Raises:
            ValueError, trio.ClosedResourceError: the recording could not
                start (no recorder is left open).
        """
        ctx = _CURRENT.get()
        if ctx.user is None:
            ctx = ctx.with_identity(owner)
        spec = session.spec
        path: str | None = None
        recordings = self.recordings
        if recordings is not None:
            shell = self.shell if session.upstream_kind == "local" else "/bin/sh"
            env = {"SHELL": spec.env.get("SHELL") or shell,
                   "TERM": spec.env.get("TERM") or "xterm-256color"}
            recorder = await recordings.open_recorder(
                session.id, session.cols, session.rows, env=env,
                title=f"{session.owner}@{spec.namespace or 'default'}/{spec.pod or 'local'}",
                command=shlex.join(spec.command) if spec.command is not None else None)
            path = str(recorder.path) if recorder.path is not None else None
            recorder.on_failure(lambda rec, exc: self._recording_failed(session, rec, exc))
            session.recorder = recorder
        self._sessions[session.id] = _SessionRecord(ctx, _spec_target(spec, session.id), path)

    async def adopting(self, session: Session, record: SessionRecord, *, previous_holder: str,
                       out_offset: int, in_offset: int, agent_out_offset: int) -> None:
        """A session another gateway ran is taken over here and has not run yet.

        Opens the next part of its recording (``<id>.partN.cast``, starting
        with a marker at ``out_offset``; recording/writer.py) and emits
        ``session.adopt``.  Its later events (attach, resume, detach, end) are
        this gateway's, as for any session; they carry the owner as actor
        (there is no request behind an adoption).

        Raises:
            ValueError, trio.ClosedResourceError: the recording could not
                start (nothing is left open); the adoption is given up and the
                shell stays with its agent.
        """
        ctx = RequestContext(user=record.owner)
        spec = session.spec
        path: str | None = None
        recordings = self.recordings
        if recordings is not None:
            env = {"SHELL": spec.env.get("SHELL") or "/bin/sh",
                   "TERM": spec.env.get("TERM") or "xterm-256color"}
            recorder = await recordings.open_continuation(
                session.id, session.cols, session.rows, resumed_at=out_offset,
                note=f"adopted from {previous_holder or 'an unknown gateway'}",
                env=env, title=f"{session.owner}@{spec.namespace or 'default'}/"
                               f"{spec.pod or 'local'}",
                command=shlex.join(spec.command) if spec.command is not None else None)
            path = str(recorder.path) if recorder.path is not None else None
            recorder.on_failure(lambda rec, exc: self._recording_failed(session, rec, exc))
            session.recorder = recorder
        target = _spec_target(spec, session.id)
        self._sessions[session.id] = _SessionRecord(ctx, target, path,
                                                    created_at=record.created_at or None)
        await self.emit("session.adopt", context=ctx, target=target,
                        previous_holder=previous_holder or None, holder=record.holder,
                        out_offset=out_offset, in_offset=in_offset,
                        agent_out_offset=agent_out_offset, upstream=session.upstream_kind,
                        recording=path)

    async def abandoned(self, session: Session) -> None:
        """Undo :meth:`starting`: the session will never run (its recording is closed)."""
        self._sessions.pop(session.id, None)
        recorder, session.recorder = session.recorder, None
        if recorder is not None:
            with trio.CancelScope(shield=True):
                await recorder.aclose()  # bounded itself
        else:
            await trio.lowlevel.checkpoint()

    def started(self, session: Session) -> None:
        """``session.create``: registered, about to run (never blocks: no cancel window)."""
        record = self._sessions.get(session.id)
        spec = session.spec
        self.emit_nowait("session.create",
                         context=record.context if record is not None else None,
                         target=self._target(session), upstream=session.upstream_kind,
                         command=list(spec.command) if spec.command is not None else None,
                         tty=spec.tty, cols=session.cols, rows=session.rows,
                         recording=record.recording if record is not None else None)

    async def refused(self, owner: Identity, spec: StreamSpec, upstream: str,
                      exc: PodtermError) -> None:
        """``session.create`` refused: capacity, rate limit, audit writer, upstream failure."""
        ctx = _CURRENT.get()
        if ctx.user is None:
            ctx = ctx.with_identity(owner)
        outcome = exc.outcome if exc.outcome in ("rejected", "error") else "rejected"
        await self.emit("session.create", outcome=outcome, context=ctx,
                        target=_spec_target(spec), upstream=upstream,
                        command=list(spec.command) if spec.command is not None else None,
                        tty=spec.tty, reason=exc.message or type(exc).__name__,
                        http_status=exc.http_status)

    def _recording_failed(self, session: Session, recorder: Recorder,
                          error: RecordingFailed) -> None:
        """A recorder's file cannot be written: close the session (fail closed) and say why."""
        session.kill("recording_failed")
        record = self._sessions.get(session.id)
        cause = error.__cause__ or error
        self.emit_nowait("recording.failure", outcome="error",
                         context=record.context if record else _NO_CONTEXT,
                         target=record.target if record else Target(session=session.id),
                         path=str(recorder.path) if recorder.path else None,
                         error=f"{type(cause).__name__}: {cause}")

    # ---------------------------------------------------- session observer

    def _target(self, session: Session) -> Target:
        record = self._sessions.get(session.id)
        return record.target if record is not None else _spec_target(session.spec, session.id)

    def attached(self, session: Session, att: Attachment, *, resumed: bool, gap: int) -> None:
        """``session.attach`` (writer), ``session.resume`` (writer with its token after a
        drop) or ``session.join`` (viewer)."""
        if not self.enabled:
            return
        offset = att.sent
        if att.mode is Mode.RO:
            self.emit_nowait("session.join", target=self._target(session), mode="ro",
                             offset=offset)
        elif resumed:
            self.emit_nowait("session.resume", target=self._target(session), offset=offset,
                             gap=gap)
        else:
            self.emit_nowait("session.attach", target=self._target(session), mode="rw",
                             offset=offset)

    def attach_refused(self, session_id: str, mode: Mode, offset: int, *, resuming: bool,
                       exc: PodtermError, session: Session | None = None) -> None:
        """An attach, resume or join was refused (conflict, gone, bad offset, unknown)."""
        target = self._target(session) if session is not None else Target(session=session_id)
        reason = exc.message or type(exc).__name__
        if mode is Mode.RO:
            self.emit_nowait("session.join", outcome="rejected", target=target, mode="ro",
                             offset=offset, reason=reason)
        elif resuming:
            self.emit_nowait("session.resume", outcome="rejected", target=target,
                             offset=offset, reason=reason)
        else:
            self.emit_nowait("session.attach", outcome="rejected", target=target, mode="rw",
                             offset=offset, reason=reason)

    def detached(self, session: Session, att: Attachment) -> None:
        """``session.detach``: a client left a session that keeps running."""
        if not self.enabled:
            return
        if att.close is not None:
            reason = att.close[1] or f"closed {att.close[0]}"
        else:
            reason = "connection lost" if att.gone else "connection closed"
        self.emit_nowait("session.detach", target=self._target(session), mode=att.mode.value,
                         reason=reason)

    def ended(self, session: Session) -> None:
        """``session.end``, with exit code or signal, bytes each way and duration."""
        record = self._sessions.pop(session.id, None)
        status = session.exit_status
        reason = session.exit_reason
        if reason == "shutdown":
            self._ended_by_shutdown += 1
        signal = _signal_name(status.signal) if status is not None and \
            status.signal is not None else None
        self.emit_nowait(
            "session.end", outcome="error" if reason in _ERROR_ENDS else "success",
            context=record.context if record is not None else _NO_CONTEXT,
            target=record.target if record is not None else _spec_target(session.spec,
                                                                          session.id),
            reason=reason, exit_code=status.code if status is not None else None,
            signal=signal, bytes_in=session.in_written, bytes_out=session.out_offset,
            duration_s=round(max(0.0, time.time() - record.created_at
                                 if record is not None and record.created_at is not None
                                 else trio.current_time() - session.created_mono), 3),
            recording=record.recording if record is not None else None)

    # --------------------------------------------------------------- admin

    async def admin_action(self, action: str, *, reason: str | None = None,
                           target: Target | None = None, outcome: str = "success",
                           context: RequestContext | None = None) -> None:
        """``admin.action``: kill a session, drain, ..."""
        await self.emit("admin.action", outcome=outcome, context=context, target=target,
                        action=action, reason=reason)

    # ------------------------------------------------------------- metrics

    def statistics(self) -> tuple[SinkStatistics, Any]:
        """The sink's and the recording writer's snapshots (the writer's is None when off)."""
        return (self.sink.statistics(),
                self.recordings.statistics() if self.recordings is not None else None)

    def metric_families(self) -> list[MetricFamily]:
        """Audit and recording writer metrics for ``/metrics`` (one label: ``writer``)."""
        sink_stats, rec_stats = self.statistics()
        batchers: list[BatcherStatistics] = []

        def walk(stats: SinkStatistics) -> None:
            if stats.batcher is not None:
                batchers.append(stats.batcher)
            for child in stats.children:
                walk(child)

        walk(sink_stats)
        if rec_stats is not None:
            batchers.append(rec_stats.batcher)

        def fam(name: str, kind: str, help_: str, field: str) -> MetricFamily:
            return labelled(name, kind, help_, "writer",
                            {b.name: int(getattr(b, field)) for b in batchers})

        fams = [
            fam("podterm_writer_capacity", "gauge",
                "Buffer bound of an audit/recording writer (records, or bytes for recordings).",
                "capacity"),
            fam("podterm_writer_buffered", "gauge",
                "Weight buffered and not yet written (records, or bytes for recordings).",
                "buffered_weight"),
            fam("podterm_writer_buffered_records", "gauge",
                "Records buffered and not yet written, the write in flight included.",
                "buffered_records"),
            fam("podterm_writer_submitted_total", "counter", "Records accepted.", "submitted"),
            fam("podterm_writer_written_total", "counter", "Records written.", "written"),
            fam("podterm_writer_batches_total", "counter", "Successful batch writes.",
                "batches"),
            fam("podterm_writer_blocked_waits_total", "counter",
                "Emits that had to wait for room (backpressure).", "blocked_waits"),
            fam("podterm_writer_refused_total", "counter",
                "Records or new sessions refused by a full or fail-closed writer.", "refused"),
            fam("podterm_writer_write_failures_total", "counter",
                "Failed write attempts (each retried).", "write_failures"),
            fam("podterm_writer_lost_total", "counter",
                "Records not written at shutdown (logged at ERROR).", "lost"),
            fam("podterm_writer_failing", "gauge", "1 while the last write failed.", "failing"),
            fam("podterm_writer_accepting", "gauge",
                "1 while the writer admits new sessions.", "accepting"),
        ]
        fams.append(labelled("podterm_audit_dropped_total", "counter",
                             "Audit events raised after the sink shut down (logged at ERROR).",
                             "writer", {"audit": self.dropped}))
        if rec_stats is not None:
            fams.append(labelled("podterm_recordings", "gauge",
                                 "Recordings by state.", "state",
                                 {"active": rec_stats.recorders,
                                  "files_open": rec_stats.files_open}))
            fams.append(labelled("podterm_recordings_total", "counter",
                                 "Recording files by outcome.", "outcome",
                                 {"created": rec_stats.files_created,
                                  "finished": rec_stats.files_finished,
                                  "failed": rec_stats.failures}))
        return fams
