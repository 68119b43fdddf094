"""``podterm policy check USER[:GROUP,...] VERB TARGET [--policy FILE]``.

Explains an authorization decision without a gateway: loads the policy (the
built-in podterm:admins rule without ``--policy``), decides, and prints the
verdict, the rule that decided, and every rule it considered::

    $ podterm policy check alice:dev exec dev-1/web-0 --policy policy.yaml
    allowed: alice (groups: dev) exec dev-1/web-0
    decided by: role dev-exec rule 1 (binding devs)
    policy: policy.yaml (2 roles, 2 bindings)
    rules considered:
      role dev-exec rule 1 (binding devs), line 4: allow: matches
      ...

TARGET is ``NAMESPACE/POD[/CONTAINER]``, ``NAMESPACE`` (namespace-wide
verbs) or ``-`` (none, e.g. ``admin``).  Pod labels, the command of a
non-interactive exec and the session owner come from the options'
``labels`` (``K=V`` strings), ``command`` and ``session_owner`` when the
CLI provides them.

Exit status: 0 allowed, 1 denied, 2 a bad argument or policy file.  The
SubjectAccessReview delegation is never consulted here (it needs the
cluster); a decision it would make is reported as such, with the
``kubectl auth can-i`` command that asks the same question.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from typing import TextIO

from podterm.auth.identity import Identity
from podterm.auth.rbac import VERBS, Decision, Delegate, Policy, Target
from podterm.auth.sar import resource_attributes
from podterm.config import PolicyCheckOptions
from podterm.errors import ConfigError

__all__ = ["check", "main", "parse_labels", "parse_target"]

# DNS-1123 label (namespaces, containers) and subdomain (pods), as Kubernetes.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def parse_target(text: str, *, labels: Mapping[str, str] | None = None,
                 command: tuple[str, ...] | None = None,
                 session_owner: str | None = None) -> Target:
    """``NS/POD[/CONTAINER]``, ``NS`` or ``-`` as a :class:`Target`.

    Raises:
        ConfigError: names that are not valid Kubernetes names.
    """
    allowed = ("NAMESPACE/POD[/CONTAINER], NAMESPACE or '-', with Kubernetes names, "
               "e.g. prod/web-0/app")
    ns = pod = container = None
    if text != "-":
        parts = text.split("/")
        if len(parts) > 3 or not _LABEL.fullmatch(parts[0]) or \
                (len(parts) > 1 and not _SUBDOMAIN.fullmatch(parts[1])) or \
                (len(parts) > 2 and not _LABEL.fullmatch(parts[2])):
            raise ConfigError(f"TARGET: invalid value {text!r}: expected {allowed}")
        ns = parts[0]
        pod = parts[1] if len(parts) > 1 else None
        container = parts[2] if len(parts) > 2 else None
    return Target(namespace=ns, pod=pod, container=container,
                  labels=None if labels is None else tuple(sorted(labels.items())),
                  command=command or None, session_owner=session_owner)


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``K=V`` strings (also comma-separated) as a dict.

    Raises:
        ConfigError: an item without ``=`` or a key given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or not key:
                raise ConfigError(f"--label: invalid value {part!r}: expected KEY=VALUE, "
                                  "e.g. app=web")
            if key in out:
                raise ConfigError(f"--label: label {key!r} given twice")
            out[key] = value
    return out


def check(identity: Identity, verb: str, target: Target, policy_file: str | None
          ) -> tuple[Policy, Decision, tuple[str, ...]]:
    """Load the policy and explain the decision.

    Raises:
        ConfigError: unknown verb, or a policy file that does not load.
    """
    if verb not in VERBS:
        raise ConfigError(f"VERB: invalid value {verb!r}: expected one of {', '.join(VERBS)}")
    policy = Policy.load(policy_file) if policy_file else Policy.builtin()
    decision, trace = policy.explain(identity, verb, target)
    return policy, decision, trace


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def main(options: PolicyCheckOptions, *, out: TextIO | None = None) -> int:
    """Run ``podterm policy check``; 0 allowed, 1 denied.

    Raises:
        ConfigError: a bad argument or policy (the CLI exits 2).
    """
    out = out if out is not None else sys.stdout
    raw_labels = getattr(options, "labels", None)
    labels: dict[str, str] | None
    if raw_labels is None or (not isinstance(raw_labels, Mapping) and not raw_labels):
        labels = None
    elif isinstance(raw_labels, Mapping):
        labels = {str(k): str(v) for k, v in raw_labels.items()}
    else:
        labels = parse_labels(raw_labels)
    command = getattr(options, "command", None)
    command = tuple(command) if command else None
    owner = getattr(options, "session_owner", None)
    target = parse_target(options.target, labels=labels, command=command, session_owner=owner)
    identity = Identity(user=options.user, uid=options.user, groups=tuple(options.groups),
                        method="policy-check")
    policy, decision, trace = check(identity, options.verb, target, options.policy_file)

    groups = ", ".join(identity.groups) or "none"
    out.write(f"{'allowed' if decision.allowed else 'denied'}: {identity.user} "
              f"(groups: {groups}) {options.verb} {target}\n")
    out.write(f"decided by: {decision.rule or 'no rule (default)'}\n")
    if not decision.allowed:
        out.write(f"reason: {decision.reason}\n")
    if policy.builtin_admins:
        out.write("policy: none (built-in: only members of podterm:admins may act)\n")
    else:
        out.write(f"policy: {policy.source} ({_plural(len(policy.roles), 'role')}, "
                  f"{_plural(len(policy.bindings), 'binding')}"
                  f"{', delegates to SubjectAccessReview' if policy.delegate is Delegate.SUBJECT_ACCESS_REVIEW else ''})\n")
    if trace:
        out.write("rules considered:\n")
        for line in trace:
            out.write(f"  {line}\n")
    if policy.uses_labels and target.labels is None:
        out.write("note: the policy selects on pod labels and none were given: allow rules "
                  "with labels do not match, deny rules with labels apply\n")
    if decision.default and policy.delegate is Delegate.SUBJECT_ACCESS_REVIEW:
        attrs = resource_attributes(options.verb, target)
        if attrs is None:
            out.write("note: the gateway would not ask Kubernetes either (SubjectAccessReview "
                      "covers exec, attach and join on a named pod)\n")
        else:
            argv = ["kubectl", "auth", "can-i", "create",
                    f"pods/{attrs['subresource']}", "-n", attrs["namespace"],
                    "--as", identity.user]
            for g in identity.groups:
                argv += ["--as-group", g]
            out.write("note: no rule decides, so the gateway would ask Kubernetes "
                      "(SubjectAccessReview), which this command does not; ask it with:\n"
                      f"  {shlex.join(argv)}\n")
    out.flush()
    return 0 if decision.allowed else 1
