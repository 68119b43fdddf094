"""REST ``/api/v1/sessions``: create, list, get, delete (docs/protocol.md §2).

Validation follows §2 exactly and names the offending field in a
``400 bad_request``: ``size.cols``/``size.rows`` 1..10000; ``command`` null or
a non-empty list of at most 256 strings, 64 KiB in total; ``env`` at most 128
entries named ``[A-Za-z_][A-Za-z0-9_]*`` with string values; ``namespace`` a
DNS-1123 label; ``pod`` a DNS-1123 subdomain (what Kubernetes allows for pod
names; every label is one); ``container`` a DNS-1123 label or empty;
``upstream`` one of the enabled kinds.  Unknown fields are refused too, so a
typo never silently does nothing.

Who sees what: ``GET /api/v1/sessions`` lists the caller's own sessions;
``?all=1`` lists everyone's, for admins.  Someone else's session is ``404``
unless the caller is an admin.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from podterm.audit.events import Target
from podterm.auth.identity import Identity
from podterm.errors import BadRequestError, ForbiddenError
from podterm.gateway.http import Response, json_response
from podterm.gateway.router import Call, Route
from podterm.session.registry import SessionRegistry
from podterm.session.session import Session, SessionState, wall_iso
from podterm.store.base import SessionRecord, SessionStore, StoreUnavailable
from podterm.upstream.base import StreamSpec

if TYPE_CHECKING:
    from podterm.gateway.auditor import Auditor

__all__ = ["SessionsApi", "session_json", "validate_create"]

MAX_COMMAND_ARGS = 256
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_ENTRIES = 128
MAX_TERMINAL = 10000

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_FIELDS = frozenset({"command", "tty", "size", "namespace", "pod", "container", "upstream",
                     "env"})

#: The session id in a path: docs/protocol.md §2 ``[a-z0-9-]``, 3..64 characters.
SESSION_ID = r"(?P<id>[a-z0-9-]{3,64})"


def _bad(field: str, message: str) -> BadRequestError:
    return BadRequestError(f"{field}: {message}", http_status=400)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_create(body: Any, *, upstreams: frozenset[str],
                    default_upstream: str) -> tuple[StreamSpec, str]:
    """Check a ``POST /api/v1/sessions`` body; return the stream spec and upstream kind.

    Raises:
        BadRequestError: 400 naming the first field that is wrong.
    """
    if not isinstance(body, dict):
        raise _bad("body", "expected a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise _bad(unknown[0], f"unknown field; allowed: {', '.join(sorted(_FIELDS))}")
    command = body.get("command")
    if command is not None:
        if not isinstance(command, list) or not command:
            raise _bad("command", "expected a non-empty list of strings, or null for a shell")
        if len(command) > MAX_COMMAND_ARGS:
            raise _bad("command", f"at most {MAX_COMMAND_ARGS} arguments")
        if not all(isinstance(a, str) for a in command):
            raise _bad("command", "every argument must be a string")
        if any("\x00" in a for a in command):
            raise _bad("command", "arguments must not contain NUL")
        if sum(len(a.encode("utf-8", "surrogatepass")) for a in command) > MAX_COMMAND_BYTES:
            raise _bad("command", f"at most {MAX_COMMAND_BYTES} bytes in total")
    tty = body.get("tty", True)
    if not isinstance(tty, bool):
        raise _bad("tty", "expected true or false")
    size = body.get("size", {"cols": 80, "rows": 24})
    if not isinstance(size, dict) or set(size) - {"cols", "rows"}:
        raise _bad("size", 'expected {"cols": N, "rows": N}')
    cols, rows = size.get("cols", 80), size.get("rows", 24)
    for name, value in (("size.cols", cols), ("size.rows", rows)):
        if not _is_int(value) or not 1 <= value <= MAX_TERMINAL:
            raise _bad(name, f"expected an integer in 1..{MAX_TERMINAL}, got {value!r}")
    env = body.get("env", {})
    if env is None:
        env = {}
    if not isinstance(env, dict):
        raise _bad("env", "expected an object of NAME: value strings")
    if len(env) > MAX_ENV_ENTRIES:
        raise _bad("env", f"at most {MAX_ENV_ENTRIES} entries")
    for key, value in env.items():
        if not _ENV_NAME.fullmatch(key):
            raise _bad(f"env.{key}", "names must match [A-Za-z_][A-Za-z0-9_]*")
        if not isinstance(value, str) or "\x00" in value:
            raise _bad(f"env.{key}", "values must be strings without NUL")
    namespace = body.get("namespace", "default")
    if namespace is None:
        namespace = "default"
    if not isinstance(namespace, str) or not _LABEL.fullmatch(namespace):
        raise _bad("namespace", "expected a DNS-1123 label (lower-case letters, digits, '-')")
    pod = body.get("pod", "local")
    if pod is None:
        pod = "local"
    if not isinstance(pod, str) or not _SUBDOMAIN.fullmatch(pod):
        raise _bad("pod", "expected a Kubernetes pod name (DNS-1123)")
    container = body.get("container", "")
    if container is None:
        container = ""
    if not isinstance(container, str) or (container and not _LABEL.fullmatch(container)):
        raise _bad("container", "expected a DNS-1123 label or empty")
    upstream = body.get("upstream") or default_upstream
    if not isinstance(upstream, str) or upstream not in upstreams:
        raise _bad("upstream", f"expected one of {', '.join(sorted(upstreams))}, got {upstream!r}")
    spec = StreamSpec(command=tuple(command) if command is not None else None, tty=tty,
                      cols=cols, rows=rows, env=env, namespace=namespace, pod=pod,
                      container=container)
    return spec, upstream


def _session_object(*, id: str, owner: str, state: str, upstream: str, namespace: str | None,
                    pod: str | None, container: str | None, command: Sequence[str] | None,
                    tty: bool, cols: int, rows: int, created_at: str, out_offset: int,
                    in_offset: int) -> dict[str, Any]:
    """The fields of the §2 session object that a live session and a store record share."""
    return {
        "id": id,
        "owner": owner,
        "state": state,
        "upstream": upstream,
        "namespace": namespace or "default",
        "pod": pod or "local",
        "container": container or "",
        "command": list(command) if command is not None else None,
        "tty": tty,
        "size": {"cols": cols, "rows": rows},
        "created_at": created_at,
        "out_offset": out_offset,
        "in_offset": in_offset,
    }


def session_json(session: Session) -> dict[str, Any]:
    """The §2 session object."""
    spec = session.spec
    state = session.state
    exit_obj: dict[str, Any] | None = None
    status = session.exit_status
    if state in (SessionState.EXITED, SessionState.CLOSED):
        exit_obj = {"code": status.code if status else None,
                    "signal": status.signal if status else None,
                    "reason": session.exit_reason}
    body = _session_object(
        id=session.id, owner=session.owner, state=state.value, upstream=session.upstream_kind,
        namespace=spec.namespace, pod=spec.pod, container=spec.container, command=spec.command,
        tty=spec.tty, cols=session.cols, rows=session.rows, created_at=session.created_at,
        out_offset=session.out_offset, in_offset=session.in_offset)
    body["writers"] = 1 if session.writer is not None else 0
    body["viewers"] = len(session.viewers)
    body["exit"] = exit_obj
    return body


def record_json(record: SessionRecord) -> dict[str, Any]:
    """The §2 session object of a session another worker or replica runs (from the store)."""
    body = _session_object(
        id=record.id, owner=record.owner, state=record.state, upstream=record.upstream_kind,
        namespace=record.namespace, pod=record.pod, container=record.container,
        command=record.command, tty=record.tty, cols=record.cols, rows=record.rows,
        created_at=wall_iso(record.created_at), out_offset=record.out_offset,
        in_offset=record.in_offset)
    body["holder"] = record.holder
    return body


def _attach_path(session_id: str) -> str:
    return f"/api/v1/sessions/{session_id}/attach"


class SessionsApi:
    """The REST handlers; :meth:`routes` lists them for the router.

    ``auditor`` (optional) writes the ``admin.action`` of a DELETE (the
    session events themselves come from the registry and the session).
    ``store`` (optional, a store peers share): the list also shows the
    sessions other workers and replicas run, from their records.
    """

    __slots__ = ("registry", "auditor", "store")

    def __init__(self, registry: SessionRegistry, *, auditor: Auditor | None = None,
                 store: SessionStore | None = None) -> None:
        self.registry = registry
        self.auditor = auditor
        self.store = store

    def __repr__(self) -> str:
        return f"<SessionsApi {self.registry!r}>"

    def routes(self) -> list[Route]:
        """The endpoints of docs/protocol.md §2 (the attach upgrade is routed elsewhere)."""
        return [
            Route.make("POST", r"/api/v1/sessions/?", self.create),
            Route.make("GET", r"/api/v1/sessions/?", self.list),
            Route.make("GET", rf"/api/v1/sessions/{SESSION_ID}", self.get),
            Route.make("DELETE", rf"/api/v1/sessions/{SESSION_ID}", self.delete),
        ]

    @staticmethod
    def _identity(call: Call) -> Identity:
        identity = call.request.identity
        assert identity is not None  # the router authenticated
        return identity

    async def create(self, call: Call) -> Response:
        """``POST /api/v1/sessions`` → 201 with the session, ``resume_token`` and ``attach_url``."""
        registry = self.registry
        spec, upstream = validate_create(call.request.json(),
                                         upstreams=frozenset(registry.upstreams),
                                         default_upstream=registry.default_upstream)
        session = await registry.create(self._identity(call), spec, upstream)
        body = session_json(session)
        body["resume_token"] = session.resume_token
        body["attach_url"] = _attach_path(session.id)
        return json_response(201, body, headers=(("Location", f"/api/v1/sessions/{session.id}"),
                                                 ("Cache-Control", "no-store")))

    async def list(self, call: Call) -> Response:
        """``GET /api/v1/sessions[?all=1]``."""
        identity = self._identity(call)
        all_users = call.request.query.get("all", "") in ("1", "true", "yes")
        if all_users and not identity.is_admin:
            raise ForbiddenError("?all=1 is for admins")
        owner = None if all_users else identity.user
        items = [session_json(s) for s in self.registry.sessions(owner)]
        body: dict[str, Any] = {"items": items}
        if self.store is not None:
            local = {item["id"] for item in items}
            try:
                records = await self.store.list_sessions(owner)
            except StoreUnavailable:
                body["incomplete"] = True  # only this process's sessions: the store is down
            else:
                items.extend(record_json(r) for r in records
                             if r.id not in local and r.state != SessionState.CLOSED.value)
                items.sort(key=lambda item: (item["created_at"], item["id"]))
        return json_response(200, body, headers=(("Cache-Control", "no-store"),))

    async def get(self, call: Call) -> Response:
        """``GET /api/v1/sessions/{id}``."""
        session = self.registry.get_for(call.params["id"], self._identity(call))
        return json_response(200, session_json(session), headers=(("Cache-Control", "no-store"),))

    async def delete(self, call: Call) -> Response:
        """``DELETE /api/v1/sessions/{id}``: kill it, answer with the session (now closed)."""
        session = self.registry.get_for(call.params["id"], self._identity(call))
        await self.registry.kill(session, "killed")
        if self.auditor is not None:
            spec = session.spec
            await self.auditor.admin_action(
                "kill", reason=f"DELETE /api/v1/sessions/{session.id}",
                target=Target(namespace=spec.namespace or None, pod=spec.pod or None,
                              container=spec.container or None, session=session.id),
                outcome="success" if session.is_closed else "error")
        return json_response(200, session_json(session), headers=(("Cache-Control", "no-store"),))
