"""Audit events: typed records with a stable ``type`` and ``code``, checked when made.

Every authentication, authorization decision, session lifecycle step, policy
reload, admin action and protocol rejection becomes one :class:`AuditEvent`.
``docs/audit.md`` is the normative description of the JSON form; this module
is its source, and a unit test keeps the two in step.

The registry
------------
:data:`REGISTRY` maps each ``type`` (``area.action``) to its :class:`EventKind`:
a stable ``code`` (``PTnnnn``), the outcomes it may have, and the ``details``
keys it must carry.  Codes are never reused or renumbered: a SIEM rule keyed on
``PT2005`` keeps meaning "session ended" across releases.  Ranges:

======  ==============================
PT0xxx  the gateway itself
PT1xxx  authentication, authorization
PT2xxx  sessions and recordings
PT3xxx  policy and administration
PT4xxx  protocol and handshake rejections
======  ==============================

Checking
--------
:func:`make_event` (and the dataclass itself) rejects an unknown type, a
code that does not belong to the type, an outcome the type does not allow,
missing required details, details that are not JSON, and detail keys that
look like secrets (``token``, ``password``, ...): an audit log must never
hold a credential.  These are programming errors, so they raise
:class:`AuditSchemaError` (a ``ValueError``), not a ``PodtermError``.

Serialization
-------------
:meth:`AuditEvent.to_json_line` writes one compact JSON object per line, keys
in a fixed order, pure ASCII (``ensure_ascii``), so a line can never be split
by a multi-byte character or carry a raw newline or terminal escape.
"""

from __future__ import annotations

import json
import math
import re
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "OUTCOMES",
    "AuditEvent",
    "AuditSchemaError",
    "EventKind",
    "REGISTRY",
    "Target",
    "format_time",
    "make_event",
]

#: The ``v`` field of every line.  Bumped only for an incompatible change;
#: adding a type or a details key is compatible.
SCHEMA_VERSION = 1

#: Every outcome a line may carry.  The strings match ``PodtermError.outcome``
#: so an error maps onto an event without a table.
OUTCOMES = ("success", "denied", "rejected", "error")


class AuditSchemaError(ValueError):
    """An audit event that does not match the schema (a bug in the emitting code)."""


@dataclass(frozen=True, slots=True)
class EventKind:
    """One registered event type.

    Attributes:
        type: ``area.action``, e.g. ``session.end``.
        code: stable ``PTnnnn`` code.
        outcomes: the outcomes this type may have; the first is the default.
        required: ``details`` keys every event of this type carries.
        optional: further ``details`` keys documented for this type (others
            are allowed but undocumented).
        description: one line for docs/audit.md.
    """

    type: str
    code: str
    outcomes: tuple[str, ...]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    description: str


def _kind(type_: str, code: str, outcomes: tuple[str, ...], required: tuple[str, ...],
          optional: tuple[str, ...], description: str) -> tuple[str, EventKind]:
    return type_, EventKind(type_, code, outcomes, required, optional, description)


#: The stable type → kind registry.  Append only; never renumber.
REGISTRY: Mapping[str, EventKind] = MappingProxyType(dict([
    _kind("gateway.start", "PT0001", ("success",), ("version",), ("url", "workers"),
          "a gateway process started serving (a start without a stop before it = a crash)"),
    _kind("gateway.stop", "PT0002", ("success", "error"), ("reason",), ("sessions",),
          "a gateway process stopped (drained or failed)"),
    _kind("peer.forward", "PT0100", ("success", "rejected", "error"), ("holder",),
          ("method", "path", "http_status", "reason"),
          "a request for a session another peer holds was forwarded to it (or could not be)"),
    _kind("auth.success", "PT1000", ("success",), ("method",), (),
          "a caller proved an identity (token, x509, tokenreview, oidc, generated-admin)"),
    _kind("auth.failure", "PT1001", ("denied", "rejected"), ("method", "reason"),
          ("close_code", "http_status"),
          "authentication failed (401 / close 4401), or was rate limited (429)"),
    _kind("authz.allow", "PT1100", ("success",), ("verb",), ("rule", "via"),
          "an authorization decision allowed a verb on a target"),
    _kind("authz.deny", "PT1101", ("denied",), ("verb", "reason"), ("rule", "via"),
          "an authorization decision denied a verb on a target (403 / close 4403)"),
    _kind("session.create", "PT2000", ("success", "rejected", "error"), ("upstream",),
          ("command", "tty", "cols", "rows", "reason", "http_status", "recording"),
          "a session was started (or refused: capacity, audit writer, upstream failure)"),
    _kind("session.attach", "PT2001", ("success", "rejected"), ("mode",),
          ("offset", "reason"), "a client attached to a session as its writer"),
    _kind("session.resume", "PT2002", ("success", "rejected"), ("offset",),
          ("gap", "reason"), "a client reattached with its resume token after a drop"),
    _kind("session.join", "PT2003", ("success", "rejected"), ("mode",),
          ("offset", "reason"), "a read-only viewer joined a session"),
    _kind("session.detach", "PT2004", ("success",), ("mode", "reason"),
          ("bytes_in", "bytes_out"), "a client left a session that keeps running"),
    _kind("session.end", "PT2005", ("success", "error"),
          ("reason", "exit_code", "bytes_in", "bytes_out"),
          ("signal", "duration_s", "recording"),
          "a session ended: process exit, kill, grace expiry, idle, max age, shutdown"),
    _kind("session.adopt", "PT2006", ("success",),
          ("previous_holder", "holder", "out_offset", "in_offset"),
          ("agent_out_offset", "upstream", "recording"),
          "a peer took over a session whose gateway died (its agent reconnected here); "
          "output resumes at out_offset, input at in_offset"),
    _kind("recording.failure", "PT2100", ("error",), ("path", "error"), (),
          "a session's recording could not be written; the session is closed (fail closed)"),
    _kind("policy.reload", "PT3000", ("success", "error"), ("file",),
          ("roles", "bindings", "error"), "the RBAC policy file was (re)loaded or rejected"),
    _kind("admin.action", "PT3100", ("success", "denied", "error"), ("action",),
          ("reason",), "an administrative action: kill a session, drain, reload, ..."),
    _kind("protocol.reject", "PT4000", ("rejected",), ("reason",),
          ("close_code", "http_status", "protocol", "path", "origin"),
          "a handshake or protocol violation closed a connection (400 / 1002 / 1007 / 1009; "
          "403 for an Origin not allowed)"),
]))

_TYPE = re.compile(r"[a-z]+(\.[a-z_]+)+")
_CODE = re.compile(r"PT\d{4}")
# Detail keys that would put a credential into the log, matched as whole words of
# the underscore-separated key ("bearer_token" and "password" are refused).  Name a
# detail for what it says about the credential ("method", "reason"), not after it.
_SECRET_WORDS = frozenset({"token", "tokens", "password", "passwd", "secret", "authorization",
                           "cookie", "credential", "credentials", "key", "bearer"})

_JSON = Any  # a JSON value: str, int, float, bool, None, list, dict


def format_time(epoch: float) -> str:
    """RFC 3339 UTC with microseconds: ``2025-11-25T15:27:03.123456Z``."""
    seconds = math.floor(epoch)
    micros = round((epoch - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)) + f".{micros:06d}Z"


_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@dataclass(frozen=True, slots=True)
class Target:
    """What the action was aimed at; any part may be unknown (None)."""

    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    session: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """The JSON object, keys in schema order."""
        return {"namespace": self.namespace, "pod": self.pod, "container": self.container,
                "session": self.session}


_NO_TARGET = Target()


def _check_json(value: _JSON, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditSchemaError(f"{where}: {value!r} is not a finite number")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditSchemaError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}")
        return
    raise AuditSchemaError(f"{where}: {type(value).__name__} is not JSON")


def _check_detail_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise AuditSchemaError(f"details key {key!r}: must be a non-empty string")
    if _SECRET_WORDS.intersection(key.lower().split("_")):
        raise AuditSchemaError(f"details key {key!r} looks like a credential; audit "
                               "events never carry secrets (describe it instead, e.g. 'method')")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit record.  Build it with :func:`make_event`; checked on construction.

    Attributes:
        type: a :data:`REGISTRY` key.
        code: that type's code.
        outcome: one of the type's outcomes.
        time: RFC 3339 UTC, microseconds (:func:`format_time`).
        request_id: the gateway's id for the request or connection, if any.
        actor_user: who acted (None before authentication succeeded).
        actor_groups: their groups.
        source_addr: client address after PROXY protocol / trusted X-Forwarded-For.
        target: what was acted on.
        details: type-specific facts (see the registry); JSON values only.

    Raises:
        AuditSchemaError: anything that does not match the schema.
    """

    type: str
    code: str
    outcome: str
    time: str
    request_id: str | None = None
    actor_user: str | None = None
    actor_groups: tuple[str, ...] = ()
    source_addr: str | None = None
    target: Target = _NO_TARGET
    details: Mapping[str, _JSON] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        kind = REGISTRY.get(self.type)
        if kind is None:
            raise AuditSchemaError(f"unknown audit event type {self.type!r} (known: "
                                   f"{', '.join(REGISTRY)}); add it to the registry and "
                                   "docs/audit.md first")
        if self.code != kind.code:
            raise AuditSchemaError(f"{self.type}: code {self.code!r} is not the type's "
                                   f"registered code {kind.code}")
        if self.outcome not in kind.outcomes:
            raise AuditSchemaError(f"{self.type}: outcome {self.outcome!r} not in "
                                   f"{kind.outcomes}")
        if not isinstance(self.time, str) or not _TIME.fullmatch(self.time):
            raise AuditSchemaError(f"{self.type}: time {self.time!r} is not RFC 3339 UTC "
                                   "with microseconds (use format_time)")
        for name in ("request_id", "actor_user", "source_addr"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise AuditSchemaError(f"{self.type}: {name} must be a string or None")
        if not isinstance(self.actor_groups, tuple) or not all(
                isinstance(g, str) for g in self.actor_groups):
            raise AuditSchemaError(f"{self.type}: actor_groups must be a tuple of strings")
        if not isinstance(self.target, Target):
            raise AuditSchemaError(f"{self.type}: target must be a Target")
        for name, value in self.target.to_dict().items():
            if value is not None and not isinstance(value, str):
                raise AuditSchemaError(f"{self.type}: target.{name} must be a string or None")
        if not isinstance(self.details, Mapping):
            raise AuditSchemaError(f"{self.type}: details must be a mapping")
        for key in self.details:
            _check_detail_key(key)
        missing = [k for k in kind.required if k not in self.details]
        if missing:
            raise AuditSchemaError(f"{self.type}: details lack {', '.join(missing)} "
                                   f"(required: {', '.join(kind.required)})")
        _check_json(dict(self.details), f"{self.type}: details")
        if not isinstance(self.details, MappingProxyType):
            # Freeze a caller's dict so the event stays immutable after the checks.
            object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def to_dict(self) -> dict[str, _JSON]:
        """The JSON object, keys in schema order (docs/audit.md)."""
        return {
            "v": SCHEMA_VERSION,
            "time": self.time,
            "type": self.type,
            "code": self.code,
            "outcome": self.outcome,
            "request_id": self.request_id,
            "actor": {"user": self.actor_user, "groups": list(self.actor_groups)},
            "source_addr": self.source_addr,
            "target": self.target.to_dict(),
            "details": {k: self.details[k] for k in sorted(self.details)},
        }

    def to_json_line(self) -> bytes:
        """One compact, ASCII-only JSON line ending in ``\\n``."""
        return (json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True,
                           allow_nan=False) + "\n").encode("ascii")

    @classmethod
    def from_json(cls, line: str | bytes) -> AuditEvent:
        """Parse one line back into an event, checking the schema strictly.

        Raises:
            AuditSchemaError: not JSON, keys missing, extra or out of order,
                wrong types, or an event that fails the registry checks.
        """
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AuditSchemaError(f"not a JSON line: {exc}") from exc
        if not isinstance(obj, dict):
            raise AuditSchemaError("an audit line is a JSON object")
        keys = list(obj)
        expected = ["v", "time", "type", "code", "outcome", "request_id", "actor",
                    "source_addr", "target", "details"]
        if keys != expected:
            raise AuditSchemaError(f"keys {keys} are not the schema's {expected}")
        if obj["v"] != SCHEMA_VERSION:
            raise AuditSchemaError(f"schema version {obj['v']!r} is not {SCHEMA_VERSION}")
        actor, target = obj["actor"], obj["target"]
        if not isinstance(actor, dict) or list(actor) != ["user", "groups"] or \
                not isinstance(actor["groups"], list):
            raise AuditSchemaError(f"actor {actor!r} is not {{user, groups}}")
        if not isinstance(target, dict) or list(target) != ["namespace", "pod", "container",
                                                            "session"]:
            raise AuditSchemaError(f"target {target!r} is not {{namespace, pod, container, "
                                   "session}")
        if not isinstance(obj["details"], dict):
            raise AuditSchemaError("details is not an object")
        return cls(type=obj["type"], code=obj["code"], outcome=obj["outcome"],
                   time=obj["time"], request_id=obj["request_id"], actor_user=actor["user"],
                   actor_groups=tuple(actor["groups"]), source_addr=obj["source_addr"],
                   target=Target(**target), details=obj["details"])


def make_event(type: str, *, outcome: str | None = None, at: float | None = None,
               request_id: str | None = None, actor_user: str | None = None,
               actor_groups: tuple[str, ...] | list[str] = (), source_addr: str | None = None,
               target: Target | None = None, **details: _JSON) -> AuditEvent:
    """Build and check an event; the type's code and default outcome are filled in.

    Args:
        type: a :data:`REGISTRY` key, e.g. ``"session.end"``.
        outcome: default: the type's first outcome.
        at: wall-clock time in seconds since the epoch; default now.  Tests
            pass it, so their lines are reproducible.
        request_id, actor_user, actor_groups, source_addr, target: see
            :class:`AuditEvent`.
        **details: the type's details (see the registry / docs/audit.md).

    Raises:
        AuditSchemaError: unknown type, bad outcome, missing or unsafe details.
    """
    kind = REGISTRY.get(type)
    if kind is None:
        raise AuditSchemaError(f"unknown audit event type {type!r} (known: "
                               f"{', '.join(REGISTRY)})")
    return AuditEvent(
        type=type, code=kind.code, outcome=outcome if outcome is not None else kind.outcomes[0],
        time=format_time(_time.time() if at is None else at), request_id=request_id,
        actor_user=actor_user, actor_groups=tuple(actor_groups), source_addr=source_addr,
        target=target if target is not None else _NO_TARGET,
        details=MappingProxyType(details))


# Self-check at import: the registry itself must follow the rules it enforces.
for _k in REGISTRY.values():
    assert _TYPE.fullmatch(_k.type) and _CODE.fullmatch(_k.code), _k
    assert _k.outcomes and all(o in OUTCOMES for o in _k.outcomes), _k
assert len({k.code for k in REGISTRY.values()}) == len(REGISTRY), "duplicate audit code"
