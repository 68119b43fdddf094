"""SIGKILL the gateway during a burst of sessions: the audit log is intact up to the bound.

A real ``python -m podterm serve --audit-log FILE`` subprocess takes a burst
of ``POST /api/v1/sessions`` from concurrent clients.  Every 201 a client
receives means three audit events were *accepted* before the answer left
(``auth.success``, ``authz.allow``, ``session.create``, all with the request
id the answer carries in ``X-Request-Id``).  Mid-burst the gateway is killed
with SIGKILL, and the file must be what docs/audit.md ("What a crash can
lose") promises:

* every complete line is a valid event (strict schema), the first is
  ``gateway.start``, and no ``gateway.stop`` follows (a crash);
* at most one partial line ends the file, and it is the start of an event;
* no event is written twice;
* of the events the clients observed as accepted, at most
  ``audit.buffer-records`` are missing.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from podterm.audit import AuditEvent
from tests.e2e.test_resume_e2e import running_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.trio]

#: The documented loss bound under test: audit.buffer-records (its minimum).
BUFFER_RECORDS = 64
#: Answers observed before the kill: a burst well past the buffer's size.
KILL_AFTER = 200
CLIENTS = 16
WAIT_S = 60.0
#: What each 201 proves was accepted.
PER_REQUEST = ("auth.success", "authz.allow", "session.create")


async def post_session(host: str, port: int, token: str) -> tuple[int, str | None, Any]:
    """One ``POST /api/v1/sessions`` on a fresh connection: status, request id, body."""
    body = json.dumps({"command": ["true"], "tty": False}).encode()
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(conn.send(h11.Request(method="POST", target="/api/v1/sessions",
                                                    headers=[
            ("Host", f"{host}:{port}"), ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Connection", "close")])) + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage()))
        status, request_id, chunks = 0, None, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                request_id = dict(event.headers).get(b"x-request-id", b"").decode() or None
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    return status, request_id, json.loads(b"".join(chunks) or b"null")


async def test_sigkill_mid_burst_leaves_valid_json_lines_within_the_loss_bound(
        tmp_path: Path) -> None:
    audit_log = tmp_path / "audit.log"
    config = tmp_path / "serve.toml"
    # No per-user cap (one admin creates every session), no grace (nobody
    # attaches: each session ends at once, so the burst is create + end).
    config.write_text(f"[limits]\nmax-sessions-per-user = 0\n"
                      f"[audit]\nbuffer-records = {BUFFER_RECORDS}\n")
    observed: list[str] = []  # request ids of 201 answers, i.e. accepted events
    failures: list[str] = []
    enough = trio.Event()
    async with running_gateway(tmp_path, "--config", str(config), "--audit-log",
                               str(audit_log), "--recordings", str(tmp_path / "rec"),
                               "--grace", "0s") as gw:

        async def client() -> None:
            while not enough.is_set():
                try:
                    status, request_id, body = await post_session(gw.host, gw.port, gw.token)
                except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError):
                    return  # the gateway is gone
                if status != 201:
                    failures.append(f"{status} {body}")
                    return
                assert request_id is not None and request_id.startswith("r-")
                observed.append(request_id)
                if len(observed) >= KILL_AFTER:
                    enough.set()

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                for _ in range(CLIENTS):
                    nursery.start_soon(client)
                await enough.wait()
                # Mid-burst: the other clients' requests are in flight right now.
                os.kill(gw.pid, signal.SIGKILL)
        log_text = gw.log_text()
    assert not failures, (failures[:5], log_text[-2000:])

    data = audit_log.read_bytes()
    *complete, tail = data.split(b"\n")
    events = [AuditEvent.from_json(line) for line in complete]  # strict: raises if bad
    assert tail == b"" or (tail.startswith(b'{"v":1,') and b"\n" not in tail), tail[-200:]
    assert events[0].type == "gateway.start"
    assert not [e for e in events if e.type == "gateway.stop"]  # killed, not stopped
    keys = [e.to_json_line() for e in events]
    assert len(keys) == len(set(keys)), "an event was written twice"

    written: dict[str, set[str]] = {}
    for event in events:
        if event.request_id is not None and event.type in PER_REQUEST:
            written.setdefault(event.request_id, set()).add(event.type)
    accepted = len(observed) * len(PER_REQUEST)
    found = sum(len(written.get(rid, set())) for rid in observed)
    missing = accepted - found
    print(f"accepted {accepted} events in {len(observed)} answers; {found} in the file, "
          f"{missing} missing (bound {BUFFER_RECORDS}); {len(events)} lines, "
          f"partial tail {len(tail)} bytes")
    assert 0 <= missing <= BUFFER_RECORDS
    # Events are written in the order they were accepted: whatever is missing
    # is the newest, never a hole in the middle.
    seen = [rid for rid in observed if written.get(rid) == set(PER_REQUEST)]
    assert len(seen) >= len(observed) - BUFFER_RECORDS
