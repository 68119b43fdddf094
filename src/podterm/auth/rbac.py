"""RBAC: a policy file of roles and bindings, and the decision it makes.

A policy (YAML, docs/rbac.md is the normative description) has *roles*, each
a list of *rules*, and *bindings* that give roles to users and groups::

    delegate: subjectaccessreview      # optional: ask Kubernetes when no rule decides
    roles:
      - name: dev-exec
        rules:
          - verbs: [exec, attach, join]
            namespaces: ["dev-*"]
            labels: {app: "web*"}
          - effect: deny
            verbs: ["*"]
            namespaces: [kube-system]
    bindings:
      - name: devs
        roles: [dev-exec]
        groups: [dev]

How a decision is made (:meth:`Policy.decide`)
----------------------------------------------
1. The bindings that name the caller's user or one of its groups, in file
   order, give the roles that apply; every rule of those roles is checked.
2. A rule *matches* when its verbs include the verb (``*`` = every verb) and
   each of its selectors matches the target: namespace, pod and container
   globs, label selectors (equality or globs, all must hold), ``owner: self``
   (the caller owns the session), and for ``exec`` with ``commands`` the
   joined argv.
3. **Deny wins**: a matching deny rule (or a command matching a ``deny``
   pattern of a matching allow rule) denies, whatever any other rule says.
   Otherwise a matching allow rule allows.  Otherwise the answer is *no
   opinion*, which is a denial by default -- or, with ``delegate:
   subjectaccessreview``, a question to the Kubernetes API
   (:class:`Authorizer` with :class:`podterm.auth.sar.SubjectAccessReviewer`).

Fail-closed details, each chosen so that missing facts never widen access:

* A selector that is set never matches an unknown (``None``) target field,
  except the glob ``*``.
* Labels the gateway did not look up (``Target.labels is None``) never
  satisfy an *allow* rule's label selector, and always satisfy a *deny*
  rule's (the deny applies).  :attr:`Policy.uses_labels` tells the gateway
  whether looking labels up is needed at all.
* A rule with ``commands`` may list only the verb ``exec``, and never grants
  an interactive session (``Target.command is None``): a shell runs anything.

Without a policy file (:meth:`Policy.builtin`), the group ``podterm:admins``
may do anything and everyone else nothing, as before RBAC existed.

:class:`PolicyHolder` re-reads the file when it changes (a poll, like
:class:`podterm.net.tls.CertReloader`) and keeps the previous policy when the
new file is broken; :class:`Authorizer` adds the optional delegation.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio
import yaml  # type: ignore[import-untyped, unused-ignore]  # PyYAML, via kubernetes

from podterm.audit.events import AuditEvent, make_event
from podterm.audit.events import Target as AuditTarget
from podterm.auth.identity import ADMINS_GROUP, Identity
from podterm.errors import ConfigError, ForbiddenError
from podterm.metrics import MetricFamily, counter, gauge

__all__ = [
    "DEFAULT_RELOAD_INTERVAL_S",
    "Authorizer",
    "Decision",
    "Delegate",
    "Effect",
    "ExternalAuthorizer",
    "Policy",
    "PolicyHolder",
    "PolicyStatistics",
    "Target",
    "VERBS",
    "Verb",
]

log = logging.getLogger(__name__)

#: Seconds between polls of the policy file.  2 s: an operator who saves the
#: file sees it applied "at once", and a stat() every 2 s costs nothing.
DEFAULT_RELOAD_INTERVAL_S = 2.0

#: A policy file larger than this is refused: 1 MiB is ~20,000 rules, far
#: beyond a hand-written policy, and bounds what a YAML bomb can allocate.
MAX_POLICY_BYTES = 1024 * 1024


class Verb(enum.StrEnum):
    """What a caller wants to do (docs/rbac.md, "Verbs")."""

    EXEC = "exec"  # start a session (a shell or a command) in a pod
    ATTACH = "attach"  # reattach to a session as its writer
    JOIN = "join"  # watch a session read-only
    VIEW_RECORDING = "view-recording"  # read a session's asciicast recording
    LIST_SESSIONS = "list-sessions"  # see sessions in the list
    ADMIN = "admin"  # kill others' sessions, drain, reload


#: Every verb a rule may name, and ``*`` (all of them).
VERBS: tuple[str, ...] = tuple(v.value for v in Verb)
_ANY = "*"


class Effect(enum.StrEnum):
    """What a matching rule does."""

    ALLOW = "allow"
    DENY = "deny"


class Delegate(enum.StrEnum):
    """Who answers when no rule decides."""

    NONE = "none"  # nobody: deny by default
    SUBJECT_ACCESS_REVIEW = "subjectaccessreview"  # the Kubernetes API (podterm.auth.sar)


# ---------------------------------------------------------------------------
# Target and Decision
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """What a verb is aimed at; any part may be unknown (``None``).

    Attributes:
        namespace, pod, container: the pod's coordinates.
        labels: the pod's labels as sorted ``(key, value)`` pairs; ``None``
            when the gateway did not look them up (see the module docstring:
            unknown labels never allow and always deny).  A mapping is
            accepted and normalized.
        command: the argv of a non-interactive exec; ``None`` for an
            interactive session (a shell) and for verbs other than exec.
        session_owner: the user who owns the session (attach, join,
            view-recording); rules with ``owner: self`` compare it to the caller.
        session: the session id, carried into audit events (no rule matches on it).
    """

    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    # A mapping is accepted for convenience; it is stored as sorted pairs, so
    # targets hash and compare by value.
    labels: Mapping[str, str] | tuple[tuple[str, str], ...] | None = None
    command: tuple[str, ...] | None = None
    session_owner: str | None = None
    session: str | None = None

    def __post_init__(self) -> None:
        labels = self.labels
        if isinstance(labels, Mapping):
            object.__setattr__(self, "labels",
                               tuple(sorted((str(k), str(v)) for k, v in labels.items())))
        elif labels is not None:
            object.__setattr__(self, "labels", tuple(sorted((k, v) for k, v in labels)))
        if self.command is not None and not isinstance(self.command, tuple):
            object.__setattr__(self, "command", tuple(self.command))

    @property
    def label_map(self) -> dict[str, str] | None:
        """The labels as a dict (``None`` when unknown)."""
        return None if self.labels is None else dict(self.labels)

    def __str__(self) -> str:
        parts = [self.namespace or "*", self.pod or "*"]
        if self.container:
            parts.append(self.container)
        text = "/".join(parts) if (self.namespace or self.pod) else "-"
        if self.session:
            text += f" session {self.session}"
        if self.command is not None:
            text += f" command {' '.join(self.command)!r}"
        return text

    def to_audit(self) -> AuditTarget:
        """The audit schema's target (namespace, pod, container, session)."""
        return AuditTarget(namespace=self.namespace, pod=self.pod, container=self.container,
                           session=self.session)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "may IDENTITY do VERB to TARGET".

    Attributes:
        allowed: the verdict.
        reason: one sentence a person can act on.
        rule: which rule decided, e.g. ``"role dev-exec rule 2 (binding devs)"``;
            ``None`` when no rule did.
        default: True when no rule the operator wrote decided: the default
            denial, or the built-in podterm:admins rule without a policy file.
        via: ``"policy"``, ``"builtin"`` or ``"subjectaccessreview"``.
    """

    allowed: bool
    reason: str
    rule: str | None = None
    default: bool = False
    via: str = "policy"

    def to_event(self, identity: Identity, verb: str, target: Target, *,
                 request_id: str | None = None, source_addr: str | None = None,
                 at: float | None = None) -> AuditEvent:
        """The ``authz.allow`` / ``authz.deny`` audit event for this decision."""
        details: dict[str, str] = {"verb": str(verb), "via": self.via}
        if self.rule is not None:
            details["rule"] = self.rule
        if not self.allowed:
            details["reason"] = self.reason
        return make_event("authz.allow" if self.allowed else "authz.deny", at=at,
                          request_id=request_id, actor_user=identity.user,
                          actor_groups=identity.groups, source_addr=source_addr,
                          target=target.to_audit(), **details)

    def to_error(self, identity: Identity, verb: str, target: Target) -> ForbiddenError:
        """The 403 / close 4403 error for a denial."""
        return ForbiddenError(f"user {identity.user!r} may not {verb} {target}: {self.reason}")

    def check(self, identity: Identity, verb: str, target: Target) -> None:
        """Raise :meth:`to_error` unless allowed."""
        if not self.allowed:
            raise self.to_error(identity, verb, target)


# ---------------------------------------------------------------------------
# Compiled rules
# ---------------------------------------------------------------------------


class _Globs:
    """A set of fnmatch-style globs (``*``, ``?``, ``[...]``), case-sensitive.

    ``None`` patterns (the key was not given) match everything, unknown
    values included; so does a pattern list containing ``*``.
    """

    __slots__ = ("patterns", "_regex", "_any")

    def __init__(self, patterns: Sequence[str] | None) -> None:
        self.patterns = tuple(patterns) if patterns is not None else None
        self._any = self.patterns is None or _ANY in self.patterns
        self._regex = None if self._any else re.compile(
            "|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns or ()))

    def matches(self, value: str | None) -> bool:
        if self._any:
            return True
        if value is None or self._regex is None:
            return False
        return self._regex.match(value) is not None

    def __str__(self) -> str:
        return ", ".join(self.patterns or ("*",))


@dataclass(frozen=True, slots=True)
class _Rule:
    effect: Effect
    verbs: frozenset[str]  # may contain "*"
    namespaces: _Globs
    pods: _Globs
    containers: _Globs
    labels: tuple[tuple[str, _Globs], ...] | None
    commands_allow: _Globs | None
    commands_deny: _Globs | None
    owner_self: bool
    line: int

    def evaluate(self, identity: Identity, verb: str, target: Target
                 ) -> tuple[Effect | None, str]:
        """``(effect, why)`` when the rule applies, ``(None, why not)`` when not."""
        if _ANY not in self.verbs and verb not in self.verbs:
            return None, f"verb {verb!r} not in {', '.join(sorted(self.verbs))}"
        for what, globs, value in (("namespace", self.namespaces, target.namespace),
                                   ("pod", self.pods, target.pod),
                                   ("container", self.containers, target.container)):
            if not globs.matches(value):
                shown = "unknown" if value is None else repr(value)
                return None, f"{what} {shown} does not match {globs}"
        if self.owner_self and (target.session_owner is None
                                or target.session_owner != identity.user):
            owner = target.session_owner or "unknown"
            return None, f"owner: self, but the session belongs to {owner}"
        if self.labels is not None:
            if target.labels is None:
                if self.effect is Effect.DENY:  # fail closed: unknown labels deny
                    return Effect.DENY, "label selector on unknown labels (fail closed)"
                return None, "label selector, but the pod's labels are unknown"
            have = target.label_map or {}
            for key, globs in self.labels:
                if key not in have:
                    return None, f"label {key!r} is missing"
                if not globs.matches(have[key]):
                    return None, f"label {key}={have[key]!r} does not match {globs}"
        if self.commands_allow is None and self.commands_deny is None:
            return self.effect, "matches"
        # Rules with commands name only the verb exec (checked at load).
        if target.command is None:
            return None, "rule is for commands; an interactive session is not one"
        joined = " ".join(target.command)
        if self.commands_deny is not None and self.commands_deny.matches(joined):
            return Effect.DENY, f"command {joined!r} matches a deny pattern ({self.commands_deny})"
        if self.effect is Effect.DENY:
            return None, f"command {joined!r} matches no deny pattern"
        if self.commands_allow is not None and not self.commands_allow.matches(joined):
            return None, f"command {joined!r} matches no allow pattern ({self.commands_allow})"
        return Effect.ALLOW, f"command {joined!r} allowed"

    @property
    def can_deny(self) -> bool:
        return self.effect is Effect.DENY or self.commands_deny is not None


@dataclass(frozen=True, slots=True)
class _Role:
    name: str
    rules: tuple[_Rule, ...]
    line: int


@dataclass(frozen=True, slots=True)
class _Binding:
    name: str
    roles: tuple[str, ...]
    users: frozenset[str]
    groups: frozenset[str]
    index: int


# ---------------------------------------------------------------------------
# Parsing with line numbers
# ---------------------------------------------------------------------------

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._:@-]{0,251}[A-Za-z0-9])?")
_LABEL_KEY = re.compile(r"([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")

_TOP_KEYS = ("version", "delegate", "roles", "bindings")
_ROLE_KEYS = ("name", "rules")
_RULE_KEYS = ("effect", "verbs", "namespaces", "pods", "containers", "labels", "commands",
              "owner")
_COMMAND_KEYS = ("allow", "deny")
_BINDING_KEYS = ("name", "roles", "role", "users", "groups")


class _Parser:
    """Walks the YAML node tree so every error can name file, line, key and value."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, node: yaml.Node | None, where: str, message: str) -> ConfigError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        prefix = f"{where}: " if where else ""
        return ConfigError(f"policy {self.source}{line}: {prefix}{message}")

    def mapping(self, node: yaml.Node, where: str, allowed: Sequence[str]
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, where, f"expected a mapping with keys {', '.join(allowed)}, "
                                          f"got {_kind(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, where, "keys must be plain strings")
            key = str(key_node.value)
            if key not in allowed:
                raise self.error(key_node, where, f"unknown key {key!r}: allowed keys are "
                                                  f"{', '.join(allowed)}")
            if key in out:
                raise self.error(key_node, where, f"key {key!r} given twice")
            out[key] = (key_node, value_node)
        return out

    def string(self, node: yaml.Node, where: str) -> str:
        # The scalar's text as written: `version: 2` in a label is the string "2",
        # as Kubernetes label values always are.
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG:
            raise self.error(node, where, f"expected a string, got {_kind(node)}")
        return str(node.value)

    def strings(self, node: yaml.Node, where: str, *, non_empty: bool = True) -> list[str]:
        if isinstance(node, yaml.ScalarNode) and node.tag != _NULL_TAG:
            raise self.error(node, where, f"expected a list, got the string {node.value!r} "
                                          f"(write [{node.value}])")
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, where, f"expected a list of strings, got {_kind(node)}")
        values = [self.string(item, where) for item in node.value]
        if non_empty and not values:
            raise self.error(node, where, "must not be empty")
        for item, value in zip(node.value, values, strict=True):
            if not value:
                raise self.error(item, where, "empty string")
        return values


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL_TAG:
        return "nothing (null)"
    return f"the value {node.value!r}"


def _parse_globs(p: _Parser, node: yaml.Node, where: str) -> _Globs:
    patterns = p.strings(node, where)
    for item, pattern in zip(node.value, patterns, strict=True):
        if any(c.isspace() for c in pattern):
            raise p.error(item, where, f"invalid value {pattern!r}: names have no whitespace")
    return _Globs(patterns)


def _parse_rule(p: _Parser, node: yaml.Node, where: str) -> _Rule:
    keys = p.mapping(node, where, _RULE_KEYS)
    effect = Effect.ALLOW
    if "effect" in keys:
        text = p.string(keys["effect"][1], f"{where}: key 'effect'")
        try:
            effect = Effect(text)
        except ValueError:
            raise p.error(keys["effect"][1], f"{where}: key 'effect'",
                          f"invalid value {text!r}: expected allow or deny") from None
    if "verbs" not in keys:
        raise p.error(node, where, f"key 'verbs' is required (one or more of "
                                   f"{', '.join(VERBS)}, or \"*\")")
    verbs_node = keys["verbs"][1]
    verbs = p.strings(verbs_node, f"{where}: key 'verbs'")
    for item, verb in zip(verbs_node.value, verbs, strict=True):
        if verb != _ANY and verb not in VERBS:
            raise p.error(item, f"{where}: key 'verbs'",
                          f"invalid value {verb!r}: expected one of {', '.join(VERBS)}, or \"*\"")
    selectors = {name: _parse_globs(p, keys[name][1], f"{where}: key {name!r}")
                 if name in keys else _Globs(None)
                 for name in ("namespaces", "pods", "containers")}
    labels: tuple[tuple[str, _Globs], ...] | None = None
    if "labels" in keys:
        label_node = keys["labels"][1]
        lwhere = f"{where}: key 'labels'"
        if not isinstance(label_node, yaml.MappingNode) or not label_node.value:
            raise p.error(label_node, lwhere, "expected a mapping of label keys to values or "
                                              f"globs, e.g. {{app: web, tier: \"front*\"}}, "
                                              f"got {_kind(label_node)}")
        pairs: list[tuple[str, _Globs]] = []
        for key_node, value_node in label_node.value:
            key = p.string(key_node, lwhere)
            if not _LABEL_KEY.fullmatch(key):
                raise p.error(key_node, lwhere, f"invalid label key {key!r}: expected "
                                                "[prefix/]name as in Kubernetes")
            if any(k == key for k, _ in pairs):
                raise p.error(key_node, lwhere, f"label {key!r} given twice")
            value = p.string(value_node, f"{lwhere}: label {key!r}")
            pairs.append((key, _Globs([value])))
        labels = tuple(pairs)
    commands_allow = commands_deny = None
    if "commands" in keys:
        cnode = keys["commands"][1]
        cwhere = f"{where}: key 'commands'"
        ckeys = p.mapping(cnode, cwhere, _COMMAND_KEYS)
        if not ckeys:
            raise p.error(cnode, cwhere, "give 'allow', 'deny' or both")
        if set(verbs) != {Verb.EXEC.value}:
            raise p.error(verbs_node, f"{where}: key 'verbs'",
                          f"a rule with 'commands' may list only the verb exec (commands "
                          f"exist only for exec), got {', '.join(verbs)}; put other verbs in "
                          "a separate rule")
        if effect is Effect.DENY and "allow" in ckeys:
            raise p.error(ckeys["allow"][0], cwhere,
                          "key 'allow' on a deny rule: a deny rule takes only 'deny' patterns")
        # Commands are globs over the argv joined with single spaces: spaces are fine.
        if "allow" in ckeys:
            commands_allow = _Globs(p.strings(ckeys["allow"][1], f"{cwhere}: key 'allow'"))
        if "deny" in ckeys:
            commands_deny = _Globs(p.strings(ckeys["deny"][1], f"{cwhere}: key 'deny'"))
    owner_self = False
    if "owner" in keys:
        owner = p.string(keys["owner"][1], f"{where}: key 'owner'")
        if owner not in ("self", "any"):
            raise p.error(keys["owner"][1], f"{where}: key 'owner'",
                          f"invalid value {owner!r}: expected self or any")
        owner_self = owner == "self"
    return _Rule(effect=effect, verbs=frozenset(verbs), namespaces=selectors["namespaces"],
                 pods=selectors["pods"], containers=selectors["containers"], labels=labels,
                 commands_allow=commands_allow, commands_deny=commands_deny,
                 owner_self=owner_self, line=node.start_mark.line + 1)


def _parse_policy(text: str, source: str) -> Policy:
    p = _Parser(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        hint = ""
        if "alias" in str(exc.problem) or "expected alphabetic" in str(exc.problem):
            hint = " (quote globs that start with '*', e.g. \"*\" or \"*-prod\")"
        raise ConfigError(f"policy {source}{line}: not valid YAML: {exc.problem}{hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy {source}: not valid YAML: {exc}") from None
    if root is None:
        raise ConfigError(f"policy {source}: the file is empty; give roles and bindings "
                          "(docs/rbac.md)")
    top = p.mapping(root, "", _TOP_KEYS)
    if "version" in top:
        version = p.string(top["version"][1], "key 'version'")
        if version != "1":
            raise p.error(top["version"][1], "key 'version'",
                          f"invalid value {version!r}: this podterm reads version 1")
    delegate = Delegate.NONE
    if "delegate" in top:
        text_ = p.string(top["delegate"][1], "key 'delegate'")
        try:
            delegate = Delegate(text_)
        except ValueError:
            raise p.error(top["delegate"][1], "key 'delegate'",
                          f"invalid value {text_!r}: expected subjectaccessreview or none"
                          ) from None
    roles: dict[str, _Role] = {}
    if "roles" in top:
        roles_node = top["roles"][1]
        if not isinstance(roles_node, yaml.SequenceNode):
            raise p.error(roles_node, "key 'roles'", f"expected a list of roles, "
                                                     f"got {_kind(roles_node)}")
        for i, role_node in enumerate(roles_node.value, 1):
            keys = p.mapping(role_node, f"role {i}", _ROLE_KEYS)
            if "name" not in keys:
                raise p.error(role_node, f"role {i}", "key 'name' is required")
            name = p.string(keys["name"][1], f"role {i}: key 'name'")
            if not _NAME.fullmatch(name):
                raise p.error(keys["name"][1], f"role {i}: key 'name'",
                              f"invalid value {name!r}: letters, digits, '.', '_', ':', '@', "
                              "'-'; at most 253")
            if name in roles:
                raise p.error(keys["name"][1], f"role {i}: key 'name'",
                              f"role {name!r} defined twice (first at line {roles[name].line})")
            where = f"role {name!r}"
            if "rules" not in keys:
                raise p.error(role_node, where, "key 'rules' is required")
            rules_node = keys["rules"][1]
            if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
                raise p.error(rules_node, f"{where}: key 'rules'",
                              f"expected a non-empty list of rules, got {_kind(rules_node)}")
            rules = tuple(_parse_rule(p, r, f"{where} rule {j}")
                          for j, r in enumerate(rules_node.value, 1))
            roles[name] = _Role(name, rules, role_node.start_mark.line + 1)
    bindings: list[_Binding] = []
    if "bindings" in top:
        bnode = top["bindings"][1]
        if not isinstance(bnode, yaml.SequenceNode):
            raise p.error(bnode, "key 'bindings'", f"expected a list of bindings, "
                                                   f"got {_kind(bnode)}")
        names: set[str] = set()
        for i, node in enumerate(bnode.value, 1):
            keys = p.mapping(node, f"binding {i}", _BINDING_KEYS)
            name = p.string(keys["name"][1], f"binding {i}: key 'name'") if "name" in keys \
                else f"#{i}"
            if name in names:
                raise p.error(keys["name"][1], f"binding {i}: key 'name'",
                              f"binding {name!r} defined twice")
            names.add(name)
            where = f"binding {name!r}"
            if ("role" in keys) == ("roles" in keys):
                raise p.error(node, where, "give exactly one of 'role' (a name) or 'roles' "
                                           "(a list of names)")
            if "role" in keys:
                role_nodes = [keys["role"][1]]
                role_names = [p.string(keys["role"][1], f"{where}: key 'role'")]
            else:
                role_nodes = list(keys["roles"][1].value) if isinstance(
                    keys["roles"][1], yaml.SequenceNode) else []
                role_names = p.strings(keys["roles"][1], f"{where}: key 'roles'")
            for rn, role_name in zip(role_nodes, role_names, strict=True):
                if role_name not in roles:
                    known = ", ".join(roles) or "none defined"
                    raise p.error(rn, f"{where}: key 'role{'s' if 'roles' in keys else ''}'",
                                  f"unknown role {role_name!r} (roles: {known})")
            users = p.strings(keys["users"][1], f"{where}: key 'users'") if "users" in keys \
                else []
            groups = p.strings(keys["groups"][1], f"{where}: key 'groups'") \
                if "groups" in keys else []
            if not users and not groups:
                raise p.error(node, where, "give 'users', 'groups' or both: a binding with "
                                           "no subjects applies to nobody")
            bindings.append(_Binding(name, tuple(role_names), frozenset(users),
                                     frozenset(groups), i - 1))
    return Policy(roles=roles, bindings=tuple(bindings), delegate=delegate, source=source)


# ---------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------


class Policy:
    """A parsed policy: immutable, and cheap to ask.

    Build it with :meth:`load`, :meth:`from_text` or :meth:`builtin`.
    """

    __slots__ = ("roles", "bindings", "delegate", "source", "builtin_admins", "_by_user",
                 "_by_group", "_has_denies", "uses_labels")

    def __init__(self, *, roles: Mapping[str, _Role], bindings: Sequence[_Binding],
                 delegate: Delegate = Delegate.NONE, source: str = "<policy>",
                 builtin_admins: bool = False) -> None:
        self.roles = dict(roles)
        self.bindings = tuple(bindings)
        self.delegate = delegate
        self.source = source
        self.builtin_admins = builtin_admins
        self._by_user: dict[str, list[_Binding]] = {}
        self._by_group: dict[str, list[_Binding]] = {}
        for b in self.bindings:
            for user in b.users:
                self._by_user.setdefault(user, []).append(b)
            for group in b.groups:
                self._by_group.setdefault(group, []).append(b)
        rules = [r for role in self.roles.values() for r in role.rules]
        self._has_denies = any(r.can_deny for r in rules)
        #: True when some rule selects on labels: the gateway must then look up
        #: the pod's labels before asking (unknown labels never allow).
        self.uses_labels = any(r.labels is not None for r in rules)

    @classmethod
    def builtin(cls) -> Policy:
        """The policy without a file: group ``podterm:admins`` may do anything."""
        return cls(roles={}, bindings=(), source="<built-in>", builtin_admins=True)

    @classmethod
    def from_text(cls, text: str, *, source: str = "<policy>") -> Policy:
        """Parse policy YAML.

        Raises:
            ConfigError: the YAML or the policy in it is invalid; the message
                names ``source``, the line, the key and the value.
        """
        return _parse_policy(text, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and parse a policy file.

        Raises:
            ConfigError: the file cannot be read, is too large, is not UTF-8,
                or is not a valid policy.
        """
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"policy {name}: {exc.strerror or exc}") from exc
        if len(data) > MAX_POLICY_BYTES:
            raise ConfigError(f"policy {name}: larger than {MAX_POLICY_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"policy {name}: not UTF-8 (byte {exc.start})") from None
        return _parse_policy(text, name)

    def __repr__(self) -> str:
        return (f"<Policy {self.source} roles={len(self.roles)} bindings={len(self.bindings)} "
                f"delegate={self.delegate.value}>")

    def _bindings_for(self, identity: Identity) -> list[_Binding]:
        found: dict[int, _Binding] = {}
        for b in self._by_user.get(identity.user, ()):
            found[b.index] = b
        for group in identity.groups:
            for b in self._by_group.get(group, ()):
                found[b.index] = b
        return [found[i] for i in sorted(found)]

    def decide(self, identity: Identity, verb: Verb | str, target: Target) -> Decision:
        """Decide from this policy alone (no delegation; see :class:`Authorizer`).

        Raises:
            ValueError: ``verb`` is not one of :data:`VERBS`.
        """
        return self._evaluate(identity, _check_verb(verb), target, None)

    def explain(self, identity: Identity, verb: Verb | str, target: Target
                ) -> tuple[Decision, tuple[str, ...]]:
        """:meth:`decide`, plus one line per rule considered and what it said."""
        trace: list[str] = []
        decision = self._evaluate(identity, _check_verb(verb), target, trace)
        return decision, tuple(trace)

    def _evaluate(self, identity: Identity, verb: str, target: Target,
                  trace: list[str] | None) -> Decision:
        if self.builtin_admins:
            if ADMINS_GROUP in identity.groups:
                if trace is not None:
                    trace.append(f"built-in rule: group {ADMINS_GROUP} may do anything")
                return Decision(True, f"no policy configured: members of {ADMINS_GROUP} may "
                                      "do anything", rule=f"built-in: group {ADMINS_GROUP}",
                                default=True, via="builtin")
            if trace is not None:
                trace.append(f"built-in rule: not in group {ADMINS_GROUP}")
            return Decision(False, f"no policy configured: only members of {ADMINS_GROUP} "
                                   "may act", default=True, via="builtin")
        allow: tuple[str, str] | None = None
        deny: tuple[str, str] | None = None
        bindings = self._bindings_for(identity)
        if trace is not None and not bindings:
            trace.append(f"no binding names user {identity.user!r} or its groups "
                         f"({', '.join(identity.groups) or 'none'})")
        for binding in bindings:
            for role_name in binding.roles:
                role = self.roles[role_name]
                for i, rule in enumerate(role.rules, 1):
                    label = f"role {role.name} rule {i} (binding {binding.name})"
                    effect, why = rule.evaluate(identity, verb, target)
                    if trace is not None:
                        verdict = "no match" if effect is None else effect.value
                        trace.append(f"{label}, line {rule.line}: {verdict}: {why}")
                    if effect is Effect.DENY and deny is None:
                        deny = (label, why)
                        if trace is None:
                            return _deny(deny)
                    elif effect is Effect.ALLOW and allow is None:
                        allow = (label, why)
                        if trace is None and not self._has_denies:
                            return _allow(allow)
        if deny is not None:
            return _deny(deny)
        if allow is not None:
            return _allow(allow)
        if self.delegate is Delegate.SUBJECT_ACCESS_REVIEW:
            reason = "no rule allows it, and no SubjectAccessReview was made"
        else:
            reason = "no rule allows it (denied by default)"
        return Decision(False, reason, default=True)


def _allow(found: tuple[str, str]) -> Decision:
    return Decision(True, f"allowed by {found[0]}", rule=found[0])


def _deny(found: tuple[str, str]) -> Decision:
    label, why = found
    # A plain deny rule needs no "why"; a command or fail-closed label match does.
    reason = f"denied by {label}" if why == "matches" else f"denied by {label}: {why}"
    return Decision(False, reason, rule=label)


def _check_verb(verb: Verb | str) -> str:
    text = str(verb)
    if text not in VERBS:
        raise ValueError(f"unknown verb {text!r}: expected one of {', '.join(VERBS)}")
    return text


# ---------------------------------------------------------------------------
# Reload
# ---------------------------------------------------------------------------

_Stamp = tuple[int, int, int, int, int] | str


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError as exc:
        return type(exc).__name__
    # The inode catches Kubernetes ConfigMap volumes (an atomic symlink swap).
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class PolicyStatistics:
    """What a :class:`PolicyHolder` has done.

    Attributes:
        source: the policy file (``"<built-in>"`` without one).
        checks: polls of the file.
        reloads: policies loaded after the first.
        failures: reloads refused (the previous policy stayed in force).
        roles, bindings: the policy in force.
        last_error: why the latest reload failed; ``None`` after a success.
    """

    source: str
    checks: int
    reloads: int
    failures: int
    roles: int
    bindings: int
    last_error: str | None

    @property
    def attempts(self) -> int:
        """Reload attempts: successes plus failures."""
        return self.reloads + self.failures


class PolicyHolder:
    """The policy in force, reloaded when its file changes.

    ``PolicyHolder(None)`` holds :meth:`Policy.builtin` and never reloads.
    With a path, the file is loaded at once (a bad file at start-up raises
    :class:`ConfigError`: the gateway must not start on a policy it cannot
    read); afterwards :meth:`run` polls it every ``interval_s`` and a file
    that does not load is logged, counted and reported, while the previous
    policy stays in force.

    Args:
        path: the policy file, or ``None``.
        interval_s: seconds between polls (> 0).
        on_event: called with a ``policy.reload`` audit event after every
            reload attempt (and the initial load).

    Raises:
        ConfigError: the initial load failed.
    """

    __slots__ = ("path", "interval_s", "on_event", "_policy", "_stamp", "_checks", "_reloads",
                 "_failures", "_last_error", "_lot", "_scope")

    def __init__(self, path: str | os.PathLike[str] | None, *,
                 interval_s: float = DEFAULT_RELOAD_INTERVAL_S,
                 on_event: Callable[[AuditEvent], None] | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s}: must be > 0")
        self.path = None if path is None else os.fspath(path)
        self.interval_s = interval_s
        self.on_event = on_event
        self._checks = self._reloads = self._failures = 0
        self._last_error: str | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._scope: trio.CancelScope | None = None
        if self.path is None:
            self._stamp: _Stamp = "none"
            self._policy = Policy.builtin()
        else:
            # Stamp before reading: a write during the read shows up at the next poll.
            self._stamp = _stamp(self.path)
            self._policy = Policy.load(self.path)
            self._emit(True, None)

    def __repr__(self) -> str:
        return (f"<PolicyHolder {self._policy.source} reloads={self._reloads} "
                f"failures={self._failures}>")

    @property
    def policy(self) -> Policy:
        """The policy in force now."""
        return self._policy

    def decide(self, identity: Identity, verb: Verb | str, target: Target) -> Decision:
        """:meth:`Policy.decide` on the policy in force."""
        return self._policy.decide(identity, verb, target)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Poll until :meth:`stop` or cancellation; never raises for a bad file."""
        with trio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            if self.path is None:
                await trio.sleep_forever()
            while True:
                await trio.sleep(self.interval_s)
                await self.check()
        self._scope = None

    def stop(self) -> None:
        """End :meth:`run` (idempotent)."""
        if self._scope is not None:
            self._scope.cancel()

    async def check(self) -> bool | None:
        """Poll once: ``None`` when unchanged, else whether the reload worked.

        The file is read and parsed in a worker thread (a big policy must not
        stall handshakes); the swap happens on the event loop's thread.
        """
        stamp = self._note_check()
        if stamp is None or self.path is None:
            return None
        result = await trio.to_thread.run_sync(_try_load, self.path)
        return self._finish(stamp, result)

    def check_nowait(self) -> bool | None:
        """:meth:`check` without a thread (tests, callers outside trio)."""
        stamp = self._note_check()
        if stamp is None or self.path is None:
            return None
        return self._finish(stamp, _try_load(self.path))

    def reload_nowait(self) -> bool:
        """Reload now whether or not the file looks changed (SIGHUP, admin API)."""
        if self.path is None:
            return True
        return self._finish(_stamp(self.path), _try_load(self.path))

    async def wait_attempts(self, n: int) -> PolicyStatistics:
        """Wait until at least ``n`` reload attempts happened."""
        while self._reloads + self._failures < n:
            await self._lot.park()
        return self.statistics()

    def statistics(self) -> PolicyStatistics:
        """A frozen snapshot."""
        return PolicyStatistics(source=self._policy.source, checks=self._checks,
                                reloads=self._reloads, failures=self._failures,
                                roles=len(self._policy.roles),
                                bindings=len(self._policy.bindings), last_error=self._last_error)

    def metric_families(self) -> list[MetricFamily]:
        """The statistics as Prometheus families for ``/metrics``."""
        stats = self.statistics()
        return [
            counter("podterm_policy_reloads_total",
                    "RBAC policy reloads after start-up", stats.reloads),
            counter("podterm_policy_reload_failures_total",
                    "RBAC policy reloads refused (the previous policy stayed in force)",
                    stats.failures),
            gauge("podterm_policy_rules", "Rules in the RBAC policy in force",
                  sum(len(r.rules) for r in self._policy.roles.values())),
        ]

    def _note_check(self) -> _Stamp | None:
        self._checks += 1
        if self.path is None:
            return None
        stamp = _stamp(self.path)
        return None if stamp == self._stamp else stamp

    def _finish(self, stamp: _Stamp, result: Policy | ConfigError) -> bool:
        self._stamp = stamp
        if isinstance(result, Policy):
            self._policy = result
            self._reloads += 1
            self._last_error = None
            log.info("policy.reload.complete: %s roles=%d bindings=%d", result.source,
                     len(result.roles), len(result.bindings))
            ok, error = True, None
        else:
            self._failures += 1
            error = self._last_error = result.message or str(result)
            log.warning("policy.reload.failed: %s; the previous policy stays in force", error)
            ok = False
        self._emit(ok, error)
        self._lot.unpark_all()
        return ok

    def _emit(self, ok: bool, error: str | None) -> None:
        if self.on_event is None:
            return
        extra: dict[str, Any] = {} if error is None else {"error": error}
        self.on_event(make_event("policy.reload", outcome="success" if ok else "error",
                                 file=self.path or "<built-in>",
                                 roles=len(self._policy.roles),
                                 bindings=len(self._policy.bindings), **extra))


def _try_load(path: str) -> Policy | ConfigError:
    try:
        return Policy.load(path)
    except ConfigError as exc:
        return exc


# ---------------------------------------------------------------------------
# Authorizer: policy plus optional delegation
# ---------------------------------------------------------------------------


class ExternalAuthorizer(Protocol):
    """Asked when the policy has no opinion and delegates (``podterm.auth.sar``)."""

    async def review(self, identity: Identity, verb: str, target: Target) -> Decision | None:
        """A decision, or ``None`` for no opinion (e.g. a verb it cannot map)."""
        ...


class Authorizer:
    """The gateway's one question: may this identity do this verb to this target.

    Order: the policy's explicit denials and grants first; when no rule
    decides and the policy says ``delegate: subjectaccessreview``, the
    ``external`` authorizer; then the default denial.

    Args:
        policy: a :class:`PolicyHolder` (reloading), a fixed :class:`Policy`,
            or ``None`` for the built-in rule.
        external: the SubjectAccessReview client, used only when the policy
            delegates.  A policy that delegates without one denies by default
            (and :meth:`decide` says so in the reason).
    """

    __slots__ = ("_holder", "_fixed", "external")

    def __init__(self, policy: PolicyHolder | Policy | None = None, *,
                 external: ExternalAuthorizer | None = None) -> None:
        if isinstance(policy, PolicyHolder):
            self._holder: PolicyHolder | None = policy
            fixed = None
        else:
            self._holder = None
            fixed = policy if policy is not None else Policy.builtin()
        self._fixed: Policy | None = fixed
        self.external = external

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        if self._holder is not None:
            return self._holder.policy
        assert self._fixed is not None
        return self._fixed

    def decide_nowait(self, identity: Identity, verb: Verb | str, target: Target) -> Decision:
        """The policy's decision without delegation (never blocks)."""
        return self.policy.decide(identity, verb, target)

    async def decide(self, identity: Identity, verb: Verb | str, target: Target) -> Decision:
        """The full decision, delegating when the policy says so.

        Raises:
            ValueError: unknown verb.
        """
        policy = self.policy
        decision = policy.decide(identity, verb, target)
        if not decision.default or policy.delegate is not Delegate.SUBJECT_ACCESS_REVIEW:
            return decision
        if self.external is None:
            return Decision(False, "no rule allows it, and the policy delegates to "
                                   "SubjectAccessReview, which is not configured", default=True)
        delegated = await self.external.review(identity, str(verb), target)
        return decision if delegated is None else delegated

