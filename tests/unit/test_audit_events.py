"""Audit events: the stable type/code registry, checks at emit time, the JSON line schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podterm.audit import (
    OUTCOMES,
    REGISTRY,
    AuditEvent,
    AuditSchemaError,
    Target,
    format_time,
    make_event,
)

ROOT = Path(__file__).resolve().parents[2]

#: The published codes.  Changing one breaks every SIEM rule keyed on it:
#: this list only ever grows (docs/audit.md, "Stability").
STABLE_CODES = {
    "gateway.start": "PT0001",
    "gateway.stop": "PT0002",
    "auth.success": "PT1000",
    "auth.failure": "PT1001",
    "authz.allow": "PT1100",
    "authz.deny": "PT1101",
    "session.create": "PT2000",
    "session.attach": "PT2001",
    "session.resume": "PT2002",
    "session.join": "PT2003",
    "session.detach": "PT2004",
    "session.end": "PT2005",
    "recording.failure": "PT2100",
    "policy.reload": "PT3000",
    "admin.action": "PT3100",
    "protocol.reject": "PT4000",
}

KEY_ORDER = ["v", "time", "type", "code", "outcome", "request_id", "actor", "source_addr",
             "target", "details"]


def end_event(**overrides: object) -> AuditEvent:
    args: dict[str, object] = dict(
        at=1700000000.25, request_id="req-1", actor_user="alice", actor_groups=("dev", "ops"),
        source_addr="10.0.0.7", target=Target(namespace="prod", pod="web-0", container="app",
                                               session="s-0123456789ab"),
        reason="exited", exit_code=3, bytes_in=12, bytes_out=3456, duration_s=1.5)
    args.update(overrides)
    return make_event("session.end", **args)  # type: ignore[arg-type]


def test_registered_codes_never_change() -> None:
    assert {t: k.code for t, k in REGISTRY.items() if t in STABLE_CODES} == STABLE_CODES
    assert set(STABLE_CODES) <= set(REGISTRY)


def test_registry_codes_are_unique_and_well_formed() -> None:
    codes = [k.code for k in REGISTRY.values()]
    assert len(codes) == len(set(codes))
    for kind in REGISTRY.values():
        assert re.fullmatch(r"PT\d{4}", kind.code)
        assert re.fullmatch(r"[a-z]+(\.[a-z_]+)+", kind.type)
        assert kind.outcomes and set(kind.outcomes) <= set(OUTCOMES)


def test_registry_covers_every_event_the_issue_asks_for() -> None:
    needed = {"auth.success", "auth.failure", "authz.allow", "authz.deny", "session.create",
              "session.attach", "session.resume", "session.join", "session.detach",
              "session.end", "policy.reload", "admin.action", "protocol.reject"}
    assert needed <= set(REGISTRY)
    assert {"exit_code", "bytes_in", "bytes_out"} <= set(REGISTRY["session.end"].required)


def test_make_event_fills_in_the_code_and_the_default_outcome() -> None:
    event = end_event()
    assert (event.type, event.code, event.outcome) == ("session.end", "PT2005", "success")
    assert event.time == "2023-11-14T22:13:20.250000Z"
    denied = make_event("authz.deny", at=0, verb="exec", reason="no rule allows it")
    assert (denied.code, denied.outcome) == ("PT1101", "denied")


def test_json_line_has_the_fixed_key_order_and_exact_form() -> None:
    line = end_event().to_json_line()
    assert line == (
        b'{"v":1,"time":"2023-11-14T22:13:20.250000Z","type":"session.end","code":"PT2005",'
        b'"outcome":"success","request_id":"req-1","actor":{"user":"alice","groups":["dev",'
        b'"ops"]},"source_addr":"10.0.0.7","target":{"namespace":"prod","pod":"web-0",'
        b'"container":"app","session":"s-0123456789ab"},"details":{"bytes_in":12,'
        b'"bytes_out":3456,"duration_s":1.5,"exit_code":3,"reason":"exited"}}\n')
    assert list(json.loads(line)) == KEY_ORDER


def test_unknown_fields_are_null_not_missing() -> None:
    obj = json.loads(make_event("protocol.reject", at=0, reason="bad upgrade").to_json_line())
    assert list(obj) == KEY_ORDER
    assert obj["actor"] == {"user": None, "groups": []}
    assert obj["target"] == {"namespace": None, "pod": None, "container": None,
                             "session": None}
    assert obj["request_id"] is None and obj["source_addr"] is None


def test_hostile_strings_stay_on_one_ascii_line() -> None:
    nasty = "eve\n{\"type\":\"auth.success\"}\x1b[2J\u2028日本"
    line = make_event("auth.failure", at=0, actor_user=nasty, method="token",
                      reason=nasty).to_json_line()
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert line.isascii() and b"\x1b" not in line
    assert AuditEvent.from_json(line).actor_user == nasty


def test_round_trip_through_json() -> None:
    event = end_event()
    assert AuditEvent.from_json(event.to_json_line()) == event


def test_unknown_type_is_an_error_at_emit_time() -> None:
    with pytest.raises(AuditSchemaError, match="unknown audit event type 'session.explode'"):
        make_event("session.explode", at=0)
    with pytest.raises(AuditSchemaError, match="unknown"):
        AuditEvent(type="nope.nope", code="PT9999", outcome="success",
                   time=format_time(0))


def test_a_code_that_is_not_the_types_is_refused() -> None:
    with pytest.raises(AuditSchemaError, match="PT2005"):
        AuditEvent(type="session.end", code="PT2004", outcome="success", time=format_time(0),
                   details=MappingProxyType({"reason": "x", "exit_code": 0, "bytes_in": 0,
                                             "bytes_out": 0}))


def test_an_outcome_the_type_cannot_have_is_refused() -> None:
    with pytest.raises(AuditSchemaError, match="outcome 'success'"):
        make_event("authz.deny", at=0, outcome="success", verb="exec", reason="x")
    with pytest.raises(AuditSchemaError, match="outcome"):
        make_event("auth.success", at=0, outcome="maybe", method="token")


def test_missing_required_details_are_named() -> None:
    with pytest.raises(AuditSchemaError, match="exit_code"):
        make_event("session.end", at=0, reason="exited", bytes_in=0, bytes_out=0)


@pytest.mark.parametrize("key", ["token", "bearer_token", "password", "client_secret",
                                 "Authorization", "api_key"])
def test_details_that_look_like_credentials_are_refused(key: str) -> None:
    with pytest.raises(AuditSchemaError, match="credential"):
        make_event("auth.failure", at=0, method="token", reason="bad", **{key: "s3cr3t"})


@pytest.mark.parametrize("value", [{1, 2}, float("nan"), float("inf"), b"bytes", object()])
def test_details_must_be_json(value: object) -> None:
    with pytest.raises(AuditSchemaError):
        make_event("admin.action", at=0, action="kill", extra=value)


def test_bad_field_types_are_refused() -> None:
    with pytest.raises(AuditSchemaError, match="actor_groups"):
        AuditEvent(type="admin.action", code="PT3100", outcome="success", time=format_time(0),
                   actor_groups=["list", "not", "tuple"],  # type: ignore[arg-type]
                   details=MappingProxyType({"action": "drain"}))
    with pytest.raises(AuditSchemaError, match="time"):
        AuditEvent(type="admin.action", code="PT3100", outcome="success",
                   time="yesterday", details=MappingProxyType({"action": "drain"}))
    with pytest.raises(AuditSchemaError, match="target.pod"):
        make_event("admin.action", at=0, action="kill",
                   target=Target(pod=7))  # type: ignore[arg-type]


def test_events_are_immutable_even_when_built_from_a_dict() -> None:
    details = {"action": "kill"}
    event = AuditEvent(type="admin.action", code="PT3100", outcome="success",
                       time=format_time(0), details=details)
    details["action"] = "changed"
    assert event.details["action"] == "kill"
    with pytest.raises(TypeError):
        event.details["action"] = "x"  # type: ignore[index]


@pytest.mark.parametrize("line, problem", [
    (b"not json", "not a JSON line"),
    (b"[1,2]", "object"),
    (b'{"time":"x","v":1}', "keys"),
])
def test_from_json_is_strict(line: bytes, problem: str) -> None:
    with pytest.raises(AuditSchemaError, match=problem):
        AuditEvent.from_json(line)


def test_from_json_refuses_reordered_keys() -> None:
    obj = json.loads(end_event().to_json_line())
    reordered = {k: obj[k] for k in reversed(KEY_ORDER)}
    with pytest.raises(AuditSchemaError, match="keys"):
        AuditEvent.from_json(json.dumps(reordered))


@pytest.mark.parametrize("epoch, text", [
    (0, "1970-01-01T00:00:00.000000Z"),
    (1700000000.123456, "2023-11-14T22:13:20.123456Z"),
    (1.9999996, "1970-01-01T00:00:02.000000Z"),  # rounding carries into the second
])
def test_format_time(epoch: float, text: str) -> None:
    assert format_time(epoch) == text


def test_docs_list_every_type_with_its_code() -> None:
    doc = (ROOT / "docs" / "audit.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| `(PT\d{4})` \|", doc, re.MULTILINE))
    assert rows == {t: k.code for t, k in REGISTRY.items()}
    for kind in REGISTRY.values():
        section = doc.split(f"| `{kind.type}` |", 1)[1].split("\n", 1)[0]
        for key in kind.required:
            assert f"`{key}`" in section, (kind.type, key)


@given(user=st.text(), reason=st.text(), n=st.integers(-2**53, 2**53),
       extra=st.dictionaries(st.text(alphabet="abcdefghij", min_size=1), st.text()))
def test_any_text_round_trips_on_one_line(user: str, reason: str, n: int,
                                          extra: dict[str, str]) -> None:
    event = make_event("auth.failure", at=1.5, actor_user=user, method="token",
                       reason=reason, attempt=n, extra=extra)
    line = event.to_json_line()
    assert line.count(b"\n") == 1 and line.isascii()
    back = AuditEvent.from_json(line)
    assert back.actor_user == user and back.details["reason"] == reason
    assert back.details["extra"] == extra and back.details["attempt"] == n
