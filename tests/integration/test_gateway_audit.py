"""The gateway's audit trail against a real gateway: REST + attach, auth, fail-closed.

Every test reads the events twice: from a :class:`MemorySink` (to wait for an
event without sleeping) and from the JSON-lines file the gateway wrote, parsed
strictly with :meth:`AuditEvent.from_json` (docs/audit.md's schema), so the
file is what is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from podterm.audit import AuditEvent, FanOutSink, JsonLinesFileSink, MemorySink
from podterm.config import AuditConfig, AuthConfig
from podterm.gateway.auditor import Auditor

if TYPE_CHECKING:
    from conftest import GatewayFactory, GatewayUnderTest

pytestmark = pytest.mark.trio

WAIT_S = 10.0


class Trail:
    """A gateway's audit sinks: memory (to wait on) and the file (to check)."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "audit.log"
        self.file = JsonLinesFileSink(self.path)
        self.memory = MemorySink()
        self.sink = FanOutSink([self.file, self.memory])

    async def lines(self) -> list[AuditEvent]:
        """Every event in the file once all emitted so far are written."""
        await self.file.wait_flushed()
        data = self.path.read_bytes()
        assert data.endswith(b"\n")
        return [AuditEvent.from_json(line) for line in data.splitlines()]


def only(events: list[AuditEvent], type_: str, **where: Any) -> AuditEvent:
    """The one event of ``type_`` whose details/target match ``where``."""
    def value(e: AuditEvent, key: str) -> Any:
        if key == "outcome":
            return e.outcome
        return e.details[key] if key in e.details else getattr(e.target, key, None)

    found = [e for e in events if e.type == type_ and all(value(e, k) == v
                                                          for k, v in where.items())]
    assert len(found) == 1, (type_, where, [e.to_dict() for e in events if e.type == type_])
    return found[0]


async def test_a_session_over_rest_and_attach_is_audited_from_create_to_end(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    trail = Trail(tmp_path)
    gateway = await make_gateway(options={"audit_sink": trail.sink})
    with trio.fail_after(WAIT_S):
        answer = await gateway.rest("POST", "/api/v1/sessions",
                                    {"command": ["cat"], "size": {"cols": 90, "rows": 20}})
        assert answer.status == 201
        create_rid = answer.headers["x-request-id"]
        assert create_rid.startswith("r-")
        sid = answer.json["id"]

        writer = await gateway.attach(sid)
        hello = await writer.wait_hello()
        await writer.send_stdin(b"hello\n")
        await writer.wait_output(b"hello\r\nhello\r\n")
        await writer.send_detach()
        await writer.wait_closed()
        await trail.memory.wait_for("session.detach")

        again = await gateway.attach(sid, offset=writer.offset, resume_token=hello.resume_token)
        await again.wait_hello()
        viewer = await gateway.attach(sid, mode="ro")
        await viewer.wait_hello()
        await again.send_stdin(b"\x04")  # cat sees EOF and exits 0
        assert await again.wait_closed() == 1000
        assert again.exit is not None and again.exit.code == 0
        await viewer.wait_closed()
        await trail.memory.wait_for("session.end")

        events = await trail.lines()
    assert [e.to_json_line() for e in events] == [e.to_json_line() for e in trail.memory.events]
    assert events[0].type == "gateway.start"
    assert events[0].details["url"] == gateway.url

    # The create request: authenticated, authorized, created; one request id.
    auth = [e for e in events if e.request_id == create_rid]
    assert [e.type for e in auth] == ["auth.success", "authz.allow", "session.create",
                                      "session.end"]
    for event in auth:
        assert event.actor_user == "admin" and event.actor_groups == ("podterm:admins",)
        assert event.source_addr is not None and event.source_addr.startswith("127.0.0.1:")
    assert auth[0].details["method"] == "generated-admin"
    assert auth[1].details["verb"] == "exec"
    create = auth[2]
    assert create.outcome == "success"
    assert create.target.to_dict() == {"namespace": "default", "pod": "local",
                                       "container": None, "session": sid}
    assert create.details["upstream"] == "local"
    assert create.details["command"] == ["cat"]
    assert (create.details["tty"], create.details["cols"], create.details["rows"]) == \
        (True, 90, 20)
    assert create.details["recording"].endswith(f"{sid}.cast")

    attach = only(events, "session.attach", session=sid)
    assert attach.details["mode"] == "rw" and attach.details["offset"] == 0
    assert attach.request_id not in (None, create_rid)
    detach = only(events, "session.detach", session=sid, mode="rw")
    assert detach.details["reason"] == "detached"
    assert detach.request_id == attach.request_id  # the same connection
    resume = only(events, "session.resume", session=sid)
    assert resume.details == {"offset": writer.offset, "gap": 0}
    join = only(events, "session.join", session=sid)
    assert join.details["mode"] == "ro"

    end = only(events, "session.end", session=sid)
    assert end.outcome == "success"
    assert end.details["reason"] == "exited"
    assert end.details["exit_code"] == 0 and end.details["signal"] is None
    assert end.details["bytes_in"] == len(b"hello\n\x04")
    assert end.details["bytes_out"] >= len(b"hello\r\nhello\r\n")
    assert end.details["duration_s"] >= 0
    assert end.details["recording"] == create.details["recording"]
    # Raised by the session itself: attributed to the request that created it.
    assert end.request_id == create_rid and end.actor_user == "admin"

    order = [e.type for e in events if e.target.session == sid]
    assert order.index("session.create") < order.index("session.attach") < \
        order.index("session.detach") < order.index("session.resume") < \
        order.index("session.join") < order.index("session.end")
    assert "session.detach" not in order[order.index("session.end"):]  # ended, not left


async def test_kill_is_an_admin_action_and_the_end_names_the_signal(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    trail = Trail(tmp_path)
    gateway = await make_gateway(options={"audit_sink": trail.sink})
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["sleep", "60"], tty=False)
        killed = await gateway.rest("DELETE", f"/api/v1/sessions/{created['id']}")
        assert killed.status == 200
        events = await trail.lines()
    kill = only(events, "admin.action", action="kill")
    assert kill.request_id == killed.headers["x-request-id"]
    assert kill.target.session == created["id"] and kill.outcome == "success"
    end = only(events, "session.end", session=created["id"])
    assert end.details["reason"] == "killed"
    assert end.details["exit_code"] is None and end.details["signal"] is not None
    assert end.details["signal"].startswith("SIG")
    assert events.index(end) < events.index(kill)


async def test_authentication_failures_are_audited_with_reason_and_source(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text('dev-token-0123456789,dave,1001,"dev"\n')
    trail = Trail(tmp_path)
    gateway = await make_gateway(auth=AuthConfig(token_file=str(tokens),
                                                 admin_token="admin-token-0123456789"),
                                 options={"audit_sink": trail.sink})
    with trio.fail_after(WAIT_S):
        missing = await gateway.rest("GET", "/api/v1/sessions", token=None)
        wrong = await gateway.rest("GET", "/api/v1/sessions", token="not-a-token")
        denied = await gateway.rest("POST", "/api/v1/sessions", {"command": ["true"]},
                                    token="dev-token-0123456789")
        events = await trail.lines()
    assert (missing.status, wrong.status, denied.status) == (401, 401, 403)

    none = [e for e in events if e.request_id == missing.headers["x-request-id"]]
    assert [e.type for e in none] == ["auth.failure"]
    assert none[0].outcome == "denied"
    assert none[0].details["method"] == "none"
    assert "missing bearer token" in none[0].details["reason"]
    assert none[0].details["failure"] == "missing_credentials"
    assert none[0].details["http_status"] == 401
    assert none[0].actor_user is None
    assert none[0].source_addr is not None and none[0].source_addr.startswith("127.0.0.1:")

    bad = [e for e in events if e.request_id == wrong.headers["x-request-id"]]
    assert [e.type for e in bad] == ["auth.failure"]
    assert bad[0].details["method"] == "token"
    assert bad[0].details["reason"] == "invalid bearer token"
    assert bad[0].details["failure"] == "unknown_token"
    assert "not-a-token" not in bad[0].to_json_line().decode()  # never the credential

    dave = [e for e in events if e.request_id == denied.headers["x-request-id"]]
    assert [e.type for e in dave] == ["auth.success", "authz.deny"]
    assert dave[1].outcome == "denied"
    assert (dave[1].actor_user, dave[1].actor_groups) == ("dave", ("dev",))
    assert dave[1].details["verb"] == "exec"
    assert "podterm:admins" in dave[1].details["reason"]
    assert not [e for e in events if e.type == "session.create"]


async def test_protocol_violations_are_audited_with_their_close_code(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    trail = Trail(tmp_path)
    gateway = await make_gateway(options={"audit_sink": trail.sink})
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        viewer = await gateway.attach(created["id"], mode="ro")
        await viewer.wait_hello()
        await viewer.send_stdin(b"a viewer may not type")
        assert await viewer.wait_closed() == 1008
        bad_offset = await gateway.rest("GET", f"/api/v1/sessions/{created['id']}/attach"
                                        "?offset=x", headers=[("Connection", "upgrade"),
                                                              ("Upgrade", "websocket")])
        assert bad_offset.status == 400
        await trail.memory.wait_for("protocol.reject", 2)
        events = await trail.lines()
    rejects = [e for e in events if e.type == "protocol.reject"]
    assert rejects[0].details["close_code"] == 1008
    assert rejects[0].details["protocol"] == "podterm.v1"
    assert "read-only" in rejects[0].details["reason"]
    assert rejects[0].target.session == created["id"]
    assert rejects[1].details["http_status"] == 400
    assert rejects[1].request_id == bad_offset.headers["x-request-id"]


async def test_fail_closed_refuses_new_sessions_while_the_audit_writer_is_blocked(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    gateway = await make_gateway(audit=AuditConfig(log_file=str(path),
                                                   full_policy="fail-closed",
                                                   buffer_records=64))
    sink = gateway.gw.audit
    assert isinstance(sink, JsonLinesFileSink)
    with trio.fail_after(WAIT_S):
        running = await gateway.create(["cat"])
        client = await gateway.attach(running["id"])
        await client.wait_hello()
        await client.send_stdin(b"one\n")
        await client.wait_output(b"one\r\none\r\n")

        # The disk hangs: the writer cannot get at its file.
        await sink.batcher.limiter.acquire()
        try:
            for _ in range(64):  # every request adds events; stop at the high-water mark
                if not gateway.gw.auditor.is_accepting():
                    break
                assert (await gateway.rest("GET", "/api/v1/sessions")).status == 200
            assert not gateway.gw.auditor.is_accepting()
            ready = await gateway.rest("GET", "/readyz")
            assert ready.status == 503
            assert "audit writer cannot keep up" in ready.json["error"]["message"]
            refused = await gateway.rest("POST", "/api/v1/sessions", {"command": ["cat"]})
            assert refused.status == 503
            message = refused.json["error"]["message"]
            assert "audit writer cannot keep up" in message
            assert "refusing new sessions" in message
            # The running session carries on (its events would use the headroom).
            await client.send_stdin(b"two\n")
            await client.wait_output(b"two\r\ntwo\r\n")
        finally:
            sink.batcher.limiter.release()
        await sink.wait_flushed()
        assert gateway.gw.auditor.is_accepting()
        assert (await gateway.rest("GET", "/readyz")).status == 200
        again = await gateway.create(["true"])
        await client.send_detach()
        await client.wait_closed()
        await sink.wait_flushed()
    events = [AuditEvent.from_json(line) for line in path.read_bytes().splitlines()]
    rejected = only(events, "session.create", outcome="rejected")
    assert rejected.request_id == refused.headers["x-request-id"]
    assert rejected.details["http_status"] == 503
    assert "refusing new sessions" in rejected.details["reason"]
    created = [e.target.session for e in events if e.type == "session.create"
               and e.outcome == "success"]
    assert created == [running["id"], again["id"]]
    assert sink.statistics().batcher.lost == 0  # type: ignore[union-attr]


async def test_metrics_show_the_audit_and_recording_writers(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        await gateway.create(["true"])
        answer = await gateway.rest("GET", "/metrics", token=None)
    text = answer.body.decode()
    assert 'podterm_writer_submitted_total{writer="audit"}' in text
    assert 'podterm_writer_capacity{writer="recording"} 16777216' in text
    assert 'podterm_writer_accepting{writer="audit"} 1' in text
    assert 'podterm_recordings_total{outcome="created"}' in text


async def test_events_from_synchronous_code_wait_in_order_when_the_buffer_is_full(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = JsonLinesFileSink(path, capacity=4, max_batch=4)
    auditor = Auditor(sink, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(auditor.run)
        await sink.batcher.limiter.acquire()  # the disk hangs
        for i in range(10):  # an attach, a detach, a session's end: none may block
            auditor.emit_nowait("admin.action", action=f"a{i}")
        emitted = trio.Event()

        async def emit_after() -> None:
            await auditor.emit("admin.action", action="after")  # waits behind them
            emitted.set()

        nursery.start_soon(emit_after)
        await trio.testing.wait_all_tasks_blocked()
        assert not emitted.is_set()
        assert sink.batcher.statistics().buffered_records == 4  # the rest wait in order
        sink.batcher.limiter.release()
        with trio.fail_after(WAIT_S):
            await emitted.wait()
            await auditor.aclose()
    actions = [AuditEvent.from_json(line).details["action"]
               for line in path.read_bytes().splitlines()]
    assert actions == [f"a{i}" for i in range(10)] + ["after"]
    assert auditor.dropped == 0
