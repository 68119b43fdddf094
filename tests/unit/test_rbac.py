"""RBAC: policy parsing, the decision matrix, explain, reload, and ``podterm policy check``.

The policy under test (``POLICY``) is written the way docs/rbac.md tells
operators to write one; each test names the rule it checks.
"""

from __future__ import annotations

import dataclasses
import io
import os
import textwrap
import types
from pathlib import Path

import pytest
import trio
import trio.testing

from podterm.audit.events import AuditEvent
from podterm.auth import check as policy_check
from podterm.auth.identity import Identity
from podterm.auth.rbac import (
    Authorizer,
    Decision,
    Delegate,
    Policy,
    PolicyHolder,
    Target,
)
from podterm.config import PolicyCheckOptions
from podterm.errors import CloseCode, ConfigError, ForbiddenError

POLICY = textwrap.dedent("""\
    version: 1
    roles:
      - name: admin
        rules:
          - verbs: ["*"]
      - name: dev-exec
        rules:
          - verbs: [exec, attach, join]
            namespaces: [dev, "dev-*"]
          - effect: deny
            verbs: ["*"]
            namespaces: [dev-secrets]
      - name: web-only
        rules:
          - verbs: [exec]
            namespaces: [prod]
            pods: ["web-*"]
            containers: [app]
            labels: {app: web, tier: "front*"}
      - name: prod-readonly
        rules:
          - verbs: [exec]
            namespaces: [prod]
            commands:
              allow: ["ls", "ls *", "cat /var/log/*", "ps *"]
              deny: ["* /etc/shadow*"]
      - name: no-prod-rm
        rules:
          - effect: deny
            verbs: [exec]
            namespaces: [prod]
            commands:
              deny: ["rm *", "*/rm *"]
      - name: no-db
        rules:
          - effect: deny
            verbs: [exec, attach]
            labels: {role: "db*"}
      - name: viewer
        rules:
          - verbs: [join, view-recording, list-sessions]
            owner: self
    bindings:
      - name: admins
        role: admin
        groups: ["podterm:admins"]
      - name: devs
        roles: [dev-exec]
        groups: [dev]
      - name: web-team
        roles: [web-only]
        users: [wendy]
      - name: oncall
        roles: [prod-readonly, viewer]
        users: [olga]
        groups: [oncall]
      - name: guard
        roles: [no-prod-rm, no-db]
        groups: [dev, oncall, "podterm:admins"]
    """)


@pytest.fixture
def policy() -> Policy:
    return Policy.from_text(POLICY, source="policy.yaml")


def who(user: str, *groups: str) -> Identity:
    return Identity(user=user, uid=user, groups=groups)


ALICE = who("alice", "dev")
ROOT = who("root", "podterm:admins")
OLGA = who("olga")
WENDY = who("wendy")
NOBODY = who("mallory", "contractors")


# ---------------------------------------------------------------------------
# The decision matrix
# ---------------------------------------------------------------------------

# (identity, verb, target, allowed, rule that decided or None)
MATRIX = [
    # allowed by a rule; globs on namespaces
    (ALICE, "exec", Target("dev", "api-0", labels={}), True, "role dev-exec rule 1 (binding devs)"),
    (ALICE, "attach", Target("dev-7", "api-0", labels={}), True, "role dev-exec rule 1 (binding devs)"),
    # denied by default: no rule covers the namespace / the verb
    (ALICE, "exec", Target("staging", "api-0", labels={}), False, None),
    (ALICE, "view-recording", Target("dev", "api-0"), False, None),
    (NOBODY, "exec", Target("dev", "api-0"), False, None),
    # a deny rule wins over an allow rule of the same role (dev-* allows dev-secrets)
    (ALICE, "exec", Target("dev-secrets", "vault-0", labels={}), False,
     "role dev-exec rule 2 (binding devs)"),
    # `*` verbs: admin can do everything...
    (ROOT, "admin", Target(), True, "role admin rule 1 (binding admins)"),
    (ROOT, "view-recording", Target("any", "thing"), True,
     "role admin rule 1 (binding admins)"),
    # ...except what a deny rule bound to its group forbids (deny wins across roles)
    (ROOT, "exec", Target("prod", "x", labels={"role": "db-primary"}), False,
     "role no-db rule 1 (binding guard)"),
    (ROOT, "exec", Target("prod", "x", labels={}, command=("rm", "-rf", "/")), False,
     "role no-prod-rm rule 1 (binding guard)"),
    (ROOT, "exec", Target("prod", "x", labels={}, command=("/bin/rm", "-rf", "/")), False,
     "role no-prod-rm rule 1 (binding guard)"),
    (ROOT, "exec", Target("prod", "x", labels={}, command=("ls",)), True,
     "role admin rule 1 (binding admins)"),
    # pod and container globs and label selectors (equality and globs); users bind directly
    (WENDY, "exec", Target("prod", "web-1", "app", labels={"app": "web", "tier": "frontend"}),
     True, "role web-only rule 1 (binding web-team)"),
    (WENDY, "exec", Target("prod", "web-1", "sidecar", labels={"app": "web", "tier": "front"}),
     False, None),
    (WENDY, "exec", Target("prod", "api-1", "app", labels={"app": "web", "tier": "front"}),
     False, None),
    (WENDY, "exec", Target("prod", "web-1", "app", labels={"app": "web2", "tier": "front"}),
     False, None),
    (WENDY, "exec", Target("prod", "web-1", "app", labels={"app": "web"}), False, None),
    # unknown labels never satisfy an allow rule's selector...
    (WENDY, "exec", Target("prod", "web-1", "app"), False, None),
    # ...and always satisfy a deny rule's (fail closed)
    (ALICE, "exec", Target("dev", "api-0", labels=None), False,
     "role no-db rule 1 (binding guard)"),
    (ALICE, "exec", Target("dev", "api-0", labels={"role": "cache"}), True,
     "role dev-exec rule 1 (binding devs)"),
    # command allow patterns: only those commands, never an interactive shell
    (OLGA, "exec", Target("prod", "web-1", labels={}, command=("ls",)), True,
     "role prod-readonly rule 1 (binding oncall)"),
    (OLGA, "exec", Target("prod", "web-1", labels={}, command=("ls", "-la", "/srv")), True,
     "role prod-readonly rule 1 (binding oncall)"),
    (OLGA, "exec", Target("prod", "web-1", labels={}, command=("cat", "/var/log/app.log")),
     True,
     "role prod-readonly rule 1 (binding oncall)"),
    (OLGA, "exec", Target("prod", "web-1", command=("cat", "/etc/passwd")), False, None),
    (OLGA, "exec", Target("prod", "web-1"), False, None),
    # a command matching an allow rule's deny pattern is denied (and that deny wins)
    (OLGA, "exec", Target("prod", "web-1", command=("ls", "/etc/shadow")), False,
     "role prod-readonly rule 1 (binding oncall)"),
    # users vs groups: olga by name and the group oncall get the same roles
    (who("oscar", "oncall"), "exec", Target("prod", "x", labels={}, command=("ps", "aux")),
     True,
     "role prod-readonly rule 1 (binding oncall)"),
    (who("olga2", "on-call"), "exec", Target("prod", "x", command=("ps", "aux")), False, None),
    # owner: self
    (OLGA, "join", Target("prod", "x", session_owner="olga"), True,
     "role viewer rule 1 (binding oncall)"),
    (OLGA, "join", Target("prod", "x", session_owner="alice"), False, None),
    (OLGA, "join", Target("prod", "x"), False, None),
]


@pytest.mark.parametrize(("identity", "verb", "target", "allowed", "rule"), MATRIX,
                         ids=[f"{m[0].user}-{m[1]}-{m[2]}-{'allow' if m[3] else 'deny'}"
                              for m in MATRIX])
def test_decision_matrix(policy: Policy, identity: Identity, verb: str, target: Target,
                         allowed: bool, rule: str | None) -> None:
    decision = policy.decide(identity, verb, target)
    assert decision.allowed is allowed, decision
    assert decision.rule == rule, decision
    assert decision.default is (rule is None)
    # explain() reaches the same decision as decide() (which short-circuits)
    explained, trace = policy.explain(identity, verb, target)
    assert explained == decision
    assert trace


def test_denial_says_which_rule_and_why(policy: Policy) -> None:
    d = policy.decide(OLGA, "exec", Target("prod", "web-1", command=("ls", "/etc/shadow")))
    assert d.reason == ("denied by role prod-readonly rule 1 (binding oncall): command "
                        "'ls /etc/shadow' matches a deny pattern (* /etc/shadow*)")
    d = policy.decide(ALICE, "exec", Target("staging", "x", labels={}))
    assert d.reason == "no rule allows it (denied by default)"
    d = policy.decide(ALICE, "exec", Target("staging", "x"))
    assert d.reason == ("denied by role no-db rule 1 (binding guard): label selector on "
                        "unknown labels (fail closed)")


def test_explain_lists_every_rule_considered(policy: Policy) -> None:
    decision, trace = policy.explain(WENDY, "exec", Target("prod", "web-1", "sidecar",
                                                           labels={"app": "web"}))
    assert not decision.allowed
    assert trace == ("role web-only rule 1 (binding web-team), line 15: no match: container "
                     "'sidecar' does not match app",)
    _, trace = policy.explain(NOBODY, "exec", Target("dev", "x"))
    assert trace == ("no binding names user 'mallory' or its groups (contractors)",)


def test_denied_decision_maps_to_403_and_authz_deny_event(policy: Policy) -> None:
    target = Target("dev-secrets", "vault-0", labels={}, session="s1")
    decision = policy.decide(ALICE, "exec", target)
    with pytest.raises(ForbiddenError) as info:
        decision.check(ALICE, "exec", target)
    assert info.value.http_status == 403
    assert info.value.close_code == CloseCode.FORBIDDEN and int(info.value.close_code) == 4403
    assert "may not exec dev-secrets/vault-0" in info.value.message
    event = decision.to_event(ALICE, "exec", target, request_id="r1", source_addr="10.0.0.1",
                              at=1_700_000_000.0)
    assert (event.type, event.code, event.outcome) == ("authz.deny", "PT1101", "denied")
    assert event.details["rule"] == "role dev-exec rule 2 (binding devs)"
    assert event.details["verb"] == "exec" and event.details["via"] == "policy"
    assert event.actor_user == "alice" and event.target.session == "s1"
    assert AuditEvent.from_json(event.to_json_line()) == event


def test_allowed_decision_maps_to_authz_allow_event(policy: Policy) -> None:
    target = Target("dev", "x", labels={})
    decision = policy.decide(ALICE, "exec", target)
    decision.check(ALICE, "exec", target)  # no raise
    event = decision.to_event(ALICE, "exec", target, at=1_700_000_000.0)
    assert (event.type, event.code, event.outcome) == ("authz.allow", "PT1100", "success")
    assert event.details == {"verb": "exec", "via": "policy",
                             "rule": "role dev-exec rule 1 (binding devs)"}


def test_no_policy_allows_only_podterm_admins() -> None:
    builtin = Policy.builtin()
    allowed = builtin.decide(ROOT, "exec", Target("kube-system", "etcd-0"))
    assert allowed.allowed and allowed.default and allowed.via == "builtin"
    assert allowed.rule == "built-in: group podterm:admins"
    denied = builtin.decide(ALICE, "list-sessions", Target())
    assert not denied.allowed and denied.default and denied.rule is None
    assert "only members of podterm:admins" in denied.reason


def test_unknown_verb_is_a_programming_error(policy: Policy) -> None:
    with pytest.raises(ValueError, match="unknown verb 'shell'"):
        policy.decide(ALICE, "shell", Target())


def test_uses_labels_tells_the_gateway_to_look_labels_up(policy: Policy) -> None:
    assert policy.uses_labels
    assert not Policy.from_text("roles: [{name: a, rules: [{verbs: [exec]}]}]").uses_labels


def test_target_normalizes_labels_and_command() -> None:
    t = Target("ns", "p", labels={"b": "2", "a": "1"}, command=["ls", "-l"])  # type: ignore[arg-type]
    assert t.labels == (("a", "1"), ("b", "2"))
    assert t.command == ("ls", "-l")
    assert hash(t) == hash(Target("ns", "p", labels={"a": "1", "b": "2"}, command=("ls", "-l")))
    assert str(t) == "ns/p command 'ls -l'"


# ---------------------------------------------------------------------------
# Policy-file errors: file, line, key, value
# ---------------------------------------------------------------------------

BAD_POLICIES = [
    ("roles:\n  - name: a\n    rules:\n      - verbs: [exce]\n",
     "policy p.yaml:4: role 'a' rule 1: key 'verbs': invalid value 'exce': expected one of "
     "exec, attach, join, view-recording, list-sessions, admin, or \"*\""),
    ("roles:\n  - name: a\n    rules:\n      - verbs: [exec]\n        namespace: [x]\n",
     "policy p.yaml:5: role 'a' rule 1: unknown key 'namespace': allowed keys are effect, "
     "verbs, namespaces, pods, containers, labels, commands, owner"),
    ("roles:\n  - name: a\n    rules:\n      - verbs: [exec]\n        pods: [*]\n",
     "policy p.yaml:5:17: not valid YAML: expected alphabetic or numeric character, but found "
     "']' (quote globs that start with '*', e.g. \"*\" or \"*-prod\")"),
    ("roles:\n  - name: a\n    rules:\n      - verbs: exec\n",
     "policy p.yaml:4: role 'a' rule 1: key 'verbs': expected a list, got the string 'exec' "
     "(write [exec])"),
    ("roles:\n  - name: a\n    rules:\n      - effect: maybe\n        verbs: [exec]\n",
     "policy p.yaml:4: role 'a' rule 1: key 'effect': invalid value 'maybe': expected allow "
     "or deny"),
    ("roles:\n  - name: a\n    rules:\n      - verbs: [exec, attach]\n"
     "        commands: {allow: [ls]}\n",
     "policy p.yaml:4: role 'a' rule 1: key 'verbs': a rule with 'commands' may list only the "
     "verb exec (commands exist only for exec), got exec, attach; put other verbs in a "
     "separate rule"),
    ("roles:\n  - name: a\n    rules:\n      - effect: deny\n        verbs: [exec]\n"
     "        commands: {allow: [ls]}\n",
     "policy p.yaml:6: role 'a' rule 1: key 'commands': key 'allow' on a deny rule: a deny "
     "rule takes only 'deny' patterns"),
    ("roles:\n  - name: a\n    rules:\n      - verbs: [exec]\n  - name: a\n"
     "    rules:\n      - verbs: [exec]\n",
     "policy p.yaml:5: role 2: key 'name': role 'a' defined twice (first at line 2)"),
    ("bindings:\n  - name: b\n    role: ghost\n    users: [x]\n",
     "policy p.yaml:3: binding 'b': key 'role': unknown role 'ghost' (roles: none defined)"),
    ("roles: [{name: a, rules: [{verbs: [exec]}]}]\nbindings:\n  - name: b\n    role: a\n",
     "policy p.yaml:3: binding 'b': give 'users', 'groups' or both: a binding with no "
     "subjects applies to nobody"),
    ("roles: [{name: a, rules: [{verbs: [exec], labels: {app: [web]}}]}]\n",
     "policy p.yaml:1: role 'a' rule 1: key 'labels': label 'app': expected a string, got a "
     "list"),
    ("delegate: webhook\n",
     "policy p.yaml:1: key 'delegate': invalid value 'webhook': expected subjectaccessreview "
     "or none"),
    ("version: 2\n", "policy p.yaml:1: key 'version': invalid value '2': this podterm reads "
     "version 1"),
    ("roles: [{name: a, rules: [{verbs: [exec]}]}]\nroles: []\n",
     "policy p.yaml:2: key 'roles' given twice"),
    ("", "policy p.yaml: the file is empty; give roles and bindings (docs/rbac.md)"),
    ("- a\n", "policy p.yaml:1: expected a mapping with keys version, delegate, roles, "
     "bindings, got a list"),
]


@pytest.mark.parametrize(("text", "message"), BAD_POLICIES,
                         ids=[f"bad{i}" for i in range(len(BAD_POLICIES))])
def test_policy_errors_name_file_line_key_and_value(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_text(text, source="p.yaml")
    assert info.value.message == message


def test_load_errors_for_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy .*nope\.yaml: No such file or directory"):
        Policy.load(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"roles: [{name: caf\xe9, rules: [{verbs: [exec]}]}]\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 \(byte 18\)"):
        Policy.load(bad)


def test_label_values_are_strings_as_written() -> None:
    p = Policy.from_text("roles: [{name: a, rules: [{verbs: [exec], labels: {v: 2, on: true}}]}]"
                         "\nbindings: [{name: b, role: a, users: [u]}]\n")
    assert p.decide(who("u"), "exec", Target("n", "p", labels={"v": "2", "on": "true"})).allowed


def test_delegate_is_parsed(policy: Policy) -> None:
    assert policy.delegate is Delegate.NONE
    assert Policy.from_text("delegate: subjectaccessreview\n").delegate is \
        Delegate.SUBJECT_ACCESS_REVIEW


# ---------------------------------------------------------------------------
# Authorizer: delegation order
# ---------------------------------------------------------------------------


class FakeExternal:
    def __init__(self, answer: Decision | None) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str, Target]] = []

    async def review(self, identity: Identity, verb: str, target: Target) -> Decision | None:
        self.asked.append((identity.user, verb, target))
        return self.answer


DELEGATING = POLICY.replace("version: 1\n", "version: 1\ndelegate: subjectaccessreview\n")


@pytest.mark.trio
async def test_authorizer_asks_external_only_when_no_rule_decides() -> None:
    yes = Decision(True, "allowed by Kubernetes RBAC", rule="sar", via="subjectaccessreview")
    external = FakeExternal(yes)
    authz = Authorizer(Policy.from_text(DELEGATING), external=external)
    # a rule allows: not asked
    assert (await authz.decide(ALICE, "exec", Target("dev", "x", labels={}))).rule == \
        "role dev-exec rule 1 (binding devs)"
    # a deny rule denies: not asked (deny wins over delegation too)
    assert not (await authz.decide(ALICE, "exec", Target("dev-secrets", "x", labels={}))).allowed
    assert external.asked == []
    # no rule decides: asked, and its answer stands
    assert await authz.decide(ALICE, "exec", Target("staging", "x", labels={})) == yes
    assert external.asked == [("alice", "exec", Target("staging", "x", labels={}))]


@pytest.mark.trio
async def test_authorizer_without_delegation_never_asks() -> None:
    external = FakeExternal(Decision(True, "yes"))
    authz = Authorizer(Policy.from_text(POLICY), external=external)
    assert not (await authz.decide(ALICE, "exec", Target("staging", "x"))).allowed
    assert external.asked == []


@pytest.mark.trio
async def test_authorizer_delegating_without_external_denies_and_says_why() -> None:
    authz = Authorizer(Policy.from_text(DELEGATING))
    d = await authz.decide(ALICE, "exec", Target("staging", "x", labels={}))
    assert not d.allowed and "SubjectAccessReview, which is not configured" in d.reason


@pytest.mark.trio
async def test_authorizer_external_no_opinion_keeps_default_denial() -> None:
    authz = Authorizer(Policy.from_text(DELEGATING), external=FakeExternal(None))
    d = await authz.decide(ALICE, "admin", Target())
    assert not d.allowed and d.default


@pytest.mark.trio
async def test_authorizer_default_is_builtin() -> None:
    authz = Authorizer()
    assert (await authz.decide(ROOT, "admin", Target())).allowed
    assert not authz.decide_nowait(ALICE, "admin", Target()).allowed


# ---------------------------------------------------------------------------
# Reload
# ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    # Rename into place, as editors and ConfigMap updates do: a new inode.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_holder_reload_keeps_old_policy_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    events: list[AuditEvent] = []
    holder = PolicyHolder(path, on_event=events.append)
    assert [e.outcome for e in events] == ["success"]
    assert holder.check_nowait() is None  # unchanged
    assert holder.decide(ALICE, "exec", Target("dev", "x", labels={})).allowed

    _write(path, POLICY + "  - name: broken\n    role: ghost\n    users: [x]\n")
    assert holder.check_nowait() is False
    stats = holder.statistics()
    assert (stats.reloads, stats.failures) == (0, 1)
    assert stats.last_error is not None and "unknown role 'ghost'" in stats.last_error
    # the old policy is still in force
    assert holder.decide(ALICE, "exec", Target("dev", "x", labels={})).allowed
    assert events[-1].outcome == "error" and events[-1].type == "policy.reload"
    assert "ghost" in events[-1].details["error"]
    assert holder.check_nowait() is None  # the same broken file is not retried every poll

    _write(path, POLICY.replace("namespaces: [dev, \"dev-*\"]", "namespaces: [dev]"))
    assert holder.check_nowait() is True
    assert not holder.decide(ALICE, "exec", Target("dev-7", "x", labels={})).allowed
    stats = holder.statistics()
    assert (stats.reloads, stats.failures, stats.last_error) == (1, 1, None)
    assert events[-1].outcome == "success" and events[-1].details["roles"] == 7

    families = {f.name: f for f in holder.metric_families()}
    assert families["podterm_policy_reloads_total"].samples[0][1] == 1
    assert families["podterm_policy_reload_failures_total"].samples[0][1] == 1
    assert families["podterm_policy_rules"].samples[0][1] == 8

    path.unlink()  # a deleted file is a failed reload, not an empty policy
    assert holder.check_nowait() is False
    assert holder.decide(ALICE, "exec", Target("dev", "x", labels={})).allowed


def test_holder_refuses_to_start_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("roles: nope\n")
    with pytest.raises(ConfigError, match=r"policy .*policy\.yaml:1: key 'roles': expected a "
                                          r"list of roles"):
        PolicyHolder(path)


def test_holder_without_file_is_builtin() -> None:
    holder = PolicyHolder(None)
    assert holder.policy.builtin_admins
    assert holder.check_nowait() is None and holder.reload_nowait() is True


@pytest.mark.trio
async def test_holder_polls_in_a_trio_task(tmp_path: Path, autojump_clock: trio.testing.MockClock
                                           ) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    holder = PolicyHolder(path, interval_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(holder.run)
        _write(path, "roles: [")
        stats = await holder.wait_attempts(1)
        assert (stats.reloads, stats.failures) == (0, 1)
        _write(path, POLICY.replace("- name: viewer", "- name: viewers")
               .replace("[prod-readonly, viewer]", "[prod-readonly, viewers]"))
        stats = await holder.wait_attempts(2)
        assert (stats.reloads, stats.failures) == (1, 1)
        assert "viewers" in holder.policy.roles
        holder.stop()


# ---------------------------------------------------------------------------
# podterm policy check
# ---------------------------------------------------------------------------


def run_check(tmp_path: Path, subject: tuple[str, tuple[str, ...]], verb: str, target: str,
              **extra: object) -> tuple[int, str]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    options = PolicyCheckOptions(user=subject[0], groups=subject[1], verb=verb, target=target,
                                 policy_file=str(path))
    names = {f.name for f in dataclasses.fields(options)}
    if set(extra) <= names:
        options = dataclasses.replace(options, **extra)  # type: ignore[arg-type]
    else:
        # labels / command / session_owner: fields the CLI is to add to
        # PolicyCheckOptions; until it does, a stand-in carries them.
        options = types.SimpleNamespace(  # type: ignore[assignment]
            **{n: getattr(options, n) for n in names}, **extra)
    out = io.StringIO()
    return policy_check.main(options, out=out), out.getvalue()


def test_policy_check_allowed_exits_0_and_names_the_rule(tmp_path: Path) -> None:
    code, out = run_check(tmp_path, ("alice", ("dev",)), "exec", "dev/api-0",
                          labels=("role=cache",))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "allowed: alice (groups: dev) exec dev/api-0"
    assert lines[1] == "decided by: role dev-exec rule 1 (binding devs)"
    assert "rules considered:" in lines
    assert "  role dev-exec rule 1 (binding devs), line 8: allow: matches" in lines


def test_policy_check_denied_exits_1_with_reason(tmp_path: Path) -> None:
    code, out = run_check(tmp_path, ("alice", ("dev",)), "exec", "dev-secrets/vault-0",
                          labels=("role=cache",))
    assert code == 1
    assert out.splitlines()[:3] == [
        "denied: alice (groups: dev) exec dev-secrets/vault-0",
        "decided by: role dev-exec rule 2 (binding devs)",
        "reason: denied by role dev-exec rule 2 (binding devs)",
    ]


def test_policy_check_command_and_owner(tmp_path: Path) -> None:
    code, out = run_check(tmp_path, ("olga", ()), "exec", "prod/web-1",
                          command=("cat", "/etc/passwd"), labels=("app=web",))
    assert code == 1 and "command 'cat /etc/passwd' matches no allow pattern" in out
    code, _ = run_check(tmp_path, ("olga", ()), "join", "prod/web-1", session_owner="olga")
    assert code == 0


def test_policy_check_without_policy_uses_builtin() -> None:
    out = io.StringIO()
    code = policy_check.main(PolicyCheckOptions(user="root", groups=("podterm:admins",),
                                                verb="admin", target="-"), out=out)
    assert code == 0
    assert "policy: none (built-in: only members of podterm:admins may act)" in out.getvalue()
    code = policy_check.main(PolicyCheckOptions(user="alice", groups=(), verb="admin",
                                                target="-"), out=io.StringIO())
    assert code == 1


def test_policy_check_delegating_policy_suggests_kubectl(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(DELEGATING)
    out = io.StringIO()
    code = policy_check.main(PolicyCheckOptions(user="bob", groups=("qa",), verb="attach",
                                                target="staging/web-0", policy_file=str(path)),
                             out=out)
    assert code == 1
    assert ("  kubectl auth can-i create pods/attach -n staging --as bob --as-group qa"
            in out.getvalue().splitlines())


@pytest.mark.parametrize(("verb", "target", "message"), [
    ("shell", "a/b", "VERB: invalid value 'shell': expected one of exec, attach, join"),
    ("exec", "A/b", "TARGET: invalid value 'A/b'"),
    ("exec", "a/b/c/d", "TARGET: invalid value 'a/b/c/d'"),
])
def test_policy_check_bad_arguments_are_config_errors(verb: str, target: str,
                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        policy_check.main(PolicyCheckOptions(user="a", groups=(), verb=verb, target=target),
                          out=io.StringIO())


def test_policy_check_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    from podterm.cli import main as cli_main

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    assert cli_main(["policy", "check", "root:podterm:admins", "admin", "-",
                     "--policy", str(path)], env={}) == 0
    assert capsys.readouterr().out.startswith("allowed: root (groups: podterm:admins) admin -")
    assert cli_main(["policy", "check", "alice:dev", "exec", "staging/x",
                     "--policy", str(path)], env={}) == 1
    path.write_text("roles: [")
    assert cli_main(["policy", "check", "alice", "exec", "a/b", "--policy", str(path)],
                    env={}) == 2
    assert "not valid YAML" in capsys.readouterr().err
