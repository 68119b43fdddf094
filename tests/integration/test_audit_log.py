"""The audit log on disk: crash loss bound, fail-closed refusal, rotation, fsync, HTTP.

The crash test runs the real batcher and JSON-lines file sink in a child
process, kills it with SIGKILL in the middle of a burst, and checks the
promise of docs/audit.md ("What a crash can lose"):

* every complete line is a valid event, in order, with no gap or duplicate;
* at most one partial line ends the file, and it is a prefix of the next event;
* every event the writer had reported written is in the file;
* events accepted (``emit`` returned) but not in the file <= the buffer capacity
  (at most ``max_batch`` of them in the write in flight, the rest waiting).

The child publishes "accepted" and "written" counters in a shared memory map,
which outlives it: what it had promised is known exactly after the kill.
"""

from __future__ import annotations

import http.server
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from podterm.audit import (
    AuditEvent,
    FanOutSink,
    HttpSink,
    JsonLinesFileSink,
    MemorySink,
    Target,
    make_event,
    open_audit_sink,
)
from podterm.batcher import BufferFull

ROOT = Path(__file__).resolve().parents[2]

CHILD = r'''
import mmap, os, struct, sys
import trio
from podterm.audit import JsonLinesFileSink, Target, make_event

path, counters_path = sys.argv[1], sys.argv[2]
capacity, max_batch, arm_at = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fd = os.open(counters_path, os.O_RDWR)
counters = mmap.mmap(fd, 16)


def event(seq):
    return make_event("session.create", at=1_700_000_000 + seq / 1000, request_id=f"r{seq}",
                      actor_user="burst", actor_groups=("load",), source_addr="127.0.0.1",
                      target=Target(namespace="ns", pod="p", session=f"s-{seq}"),
                      upstream="local", seq=seq)


async def main():
    armed = False

    def after_write():
        nonlocal armed
        written = sink.batcher.statistics().written
        struct.pack_into("<Q", counters, 8, written)
        if not armed and written >= arm_at:
            armed = True
            os.write(1, b"armed\n")

    sink = JsonLinesFileSink(path, fsync="always", capacity=capacity, max_batch=max_batch,
                             after_write=after_write)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        seq = 0
        with trio.move_on_after(60):  # never outlive a test that died
            while True:
                await sink.emit(event(seq))
                seq += 1
                struct.pack_into("<Q", counters, 0, seq)  # accepted: emit returned
        nursery.cancel_scope.cancel()

trio.run(main)
'''


def burst_event(seq: int) -> AuditEvent:
    """The child's event ``seq``, byte for byte."""
    return make_event("session.create", at=1_700_000_000 + seq / 1000, request_id=f"r{seq}",
                      actor_user="burst", actor_groups=("load",), source_addr="127.0.0.1",
                      target=Target(namespace="ns", pod="p", session=f"s-{seq}"),
                      upstream="local", seq=seq)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    return env


def kill_mid_burst(tmp_path: Path, *, capacity: int, max_batch: int,
                   arm_at: int) -> tuple[Path, int, int]:
    """Run the child until it has written ``arm_at`` events, SIGKILL it; (log, accepted, written)."""
    log_path = tmp_path / "audit.log"
    counters_path = tmp_path / "counters"
    counters_path.write_bytes(bytes(16))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log_path), str(counters_path), str(capacity),
         str(max_batch), str(arm_at)], stdout=subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the child never reported its first batches"
        assert proc.stdout.readline() == b"armed\n"
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the burst
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    with counters_path.open("r+b") as f, mmap.mmap(f.fileno(), 16) as mm:
        accepted, written = struct.unpack_from("<QQ", mm, 0)
    return log_path, accepted, written


@pytest.mark.parametrize("capacity, max_batch, arm_at", [
    (256, 64, 300), (1024, 128, 2000), (64, 64, 500)])
def test_sigkill_mid_burst_loses_at_most_the_buffer_and_leaves_valid_json_lines(
        tmp_path: Path, capacity: int, max_batch: int, arm_at: int) -> None:
    log_path, accepted, written = kill_mid_burst(tmp_path, capacity=capacity,
                                                 max_batch=max_batch, arm_at=arm_at)
    data = log_path.read_bytes()
    *complete, tail = data.split(b"\n")
    for seq, line in enumerate(complete):  # in order, no gap, no duplicate
        event = AuditEvent.from_json(line)
        assert event.details["seq"] == seq and event.request_id == f"r{seq}"
        assert line + b"\n" == burst_event(seq).to_json_line()
    lines = len(complete)
    # At most one partial line, and it is the start of the next event.
    assert burst_event(lines).to_json_line().startswith(tail)
    assert lines >= written, "an event the writer reported written is missing"
    assert lines <= accepted + 1  # +1: killed between a write and the counter store
    lost = accepted - lines
    print(f"\ncapacity={capacity} max_batch={max_batch}: accepted={accepted} "
          f"written(reported)={written} complete lines={lines} partial={len(tail)} B "
          f"lost={max(lost, 0)} (bound {capacity})")
    assert lost <= capacity, f"lost {lost} accepted events; the bound is {capacity}"

    # A restart terminates the partial line and appends valid events after it.
    async def restart() -> None:
        sink = JsonLinesFileSink(log_path, capacity=16)
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await sink.emit(make_event("gateway.start", at=1_800_000_000, version="test"))
            await sink.wait_flushed()
            nursery.cancel_scope.cancel()
        assert sink.statistics().repaired_lines == (1 if tail else 0)

    trio.run(restart)
    after = log_path.read_bytes().split(b"\n")
    assert after[-1] == b""
    assert after[:lines] == complete
    if tail:
        assert after[lines] == tail  # the partial line, now alone on its line
    assert AuditEvent.from_json(after[-2]).type == "gateway.start"
    assert len(after) == lines + (3 if tail else 2)


@pytest.mark.trio
async def test_a_partial_last_line_from_a_crash_is_terminated_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    whole = burst_event(0).to_json_line()
    partial = burst_event(1).to_json_line()[:40]
    path.write_bytes(whole + partial)
    sink = JsonLinesFileSink(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.emit(burst_event(2))
        await sink.wait_flushed()
        nursery.cancel_scope.cancel()
    assert path.read_bytes() == whole + partial + b"\n" + burst_event(2).to_json_line()
    assert sink.statistics().repaired_lines == 1


@pytest.mark.trio
async def test_fail_closed_sink_with_a_blocked_writer_refuses_new_sessions(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = JsonLinesFileSink(path, capacity=8, high_water=4, max_batch=8, policy="fail-closed")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        # Block the writer the way a hung disk does: it cannot get to its file.
        await sink.batcher.limiter.acquire()
        for i in range(3):
            sink.check_accepting()  # "may I start a session?" - yes
            await sink.emit(make_event("session.create", at=i, upstream="local"))
        await trio.testing.wait_all_tasks_blocked()
        sink.check_accepting()
        await sink.emit(make_event("session.create", at=3, upstream="local"))
        assert not sink.is_accepting()
        with pytest.raises(BufferFull) as info:  # the gateway answers 503 with this
            sink.check_accepting()
        assert info.value.http_status == 503
        assert "refusing new sessions" in info.value.message
        # Running sessions still end audited: headroom up to the capacity.
        await sink.emit(make_event("session.end", at=4, reason="exited", exit_code=0,
                                   bytes_in=0, bytes_out=0))
        sink.batcher.limiter.release()
        await sink.wait_flushed()
        assert sink.is_accepting()
        nursery.cancel_scope.cancel()
    types = [AuditEvent.from_json(line).type for line in path.read_bytes().splitlines()]
    assert types == ["session.create"] * 4 + ["session.end"]
    stats = sink.statistics()
    assert stats.batcher is not None and stats.batcher.refused == 1


@pytest.mark.trio
async def test_a_failing_disk_refuses_new_sessions_then_recovers_without_loss(
        tmp_path: Path) -> None:
    path = tmp_path / "not-yet" / "audit.log"  # the directory is missing: every open fails
    sink = JsonLinesFileSink(path, capacity=100, policy="fail-closed")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await sink.emit(make_event("auth.failure", at=0, method="token", reason="bad"))
        with trio.fail_after(5):
            while not sink.statistics().batcher.write_failures:  # type: ignore[union-attr]
                await trio.sleep(0.01)
        with pytest.raises(BufferFull, match="failing"):
            sink.check_accepting()
        path.parent.mkdir()  # the operator fixes it; the retry succeeds
        await sink.emit(make_event("auth.success", at=1, method="token"))
        with trio.fail_after(10):
            await sink.wait_flushed()
        sink.check_accepting()
        nursery.cancel_scope.cancel()
    types = [AuditEvent.from_json(line).type for line in path.read_bytes().splitlines()]
    assert types == ["auth.failure", "auth.success"]
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.trio
async def test_size_based_rotation_keeps_n_files_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    line_len = len(make_event("admin.action", at=0, action="a00").to_json_line())
    sink = JsonLinesFileSink(path, max_bytes=3 * line_len, keep=2, fsync="never")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(10):
            await sink.emit(make_event("admin.action", at=i, action=f"a{i:02d}"))
            await sink.wait_flushed()  # one batch per event: rotation at each boundary
        nursery.cancel_scope.cancel()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]

    def actions(p: Path) -> list[str]:
        return [AuditEvent.from_json(x).details["action"] for x in p.read_bytes().splitlines()]

    # 10 events, 3 per file: a00-a02 rotated out of keep=2; then oldest .2, .1, live.
    assert actions(tmp_path / "audit.log.2") == ["a03", "a04", "a05"]
    assert actions(tmp_path / "audit.log.1") == ["a06", "a07", "a08"]
    assert actions(path) == ["a09"]
    assert all(os.path.getsize(tmp_path / f) <= 3 * line_len for f in files)
    assert sink.statistics().rotations == 3


@pytest.mark.trio
async def test_fsync_policies(tmp_path: Path) -> None:
    always = JsonLinesFileSink(tmp_path / "a.log", fsync="always")
    interval = JsonLinesFileSink(tmp_path / "i.log", fsync="interval", fsync_interval_s=0.01)
    never = JsonLinesFileSink(tmp_path / "n.log", fsync="never")
    async with trio.open_nursery() as nursery:
        await nursery.start(FanOutSink([always, interval, never]).run)
        for i in range(3):
            event = make_event("admin.action", at=i, action="drain")
            for sink in (always, interval, never):
                await sink.emit(event)
                await sink.wait_flushed()
        assert always.statistics().fsyncs == 3
        assert never.statistics().fsyncs == 0
        with trio.fail_after(5):
            while interval.statistics().fsyncs == 0:  # the interval timer's fsync
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert never.statistics().fsyncs == 1  # at close


@pytest.mark.trio
async def test_fan_out_emits_to_every_sink_and_nowait_is_all_or_nothing(
        tmp_path: Path) -> None:
    memory = MemorySink(max_events=2)
    file_sink = JsonLinesFileSink(tmp_path / "audit.log")
    fan = FanOutSink([file_sink, memory])
    async with trio.open_nursery() as nursery:
        await nursery.start(fan.run)
        fan.emit_nowait(make_event("auth.success", at=0, method="x509"))
        await fan.emit(make_event("authz.allow", at=1, verb="exec", rule="devs"))
        assert not fan.has_room()
        with pytest.raises(BufferFull):
            fan.emit_nowait(make_event("authz.deny", at=2, verb="exec", reason="no"))
        await fan.wait_flushed()
        nursery.cancel_scope.cancel()
    lines = (tmp_path / "audit.log").read_bytes().splitlines()
    assert [AuditEvent.from_json(x).type for x in lines] == ["auth.success", "authz.allow"]
    assert [e.type for e in memory.events] == ["auth.success", "authz.allow"]
    stats = fan.statistics()
    assert [c.kind for c in stats.children] == ["file", "memory"]


def test_open_audit_sink_builds_what_the_config_asks(tmp_path: Path) -> None:
    file_only = open_audit_sink(str(tmp_path / "a.log"), full_policy="fail-closed",
                                buffer_records=128)
    assert isinstance(file_only, JsonLinesFileSink)
    assert file_only.batcher.capacity == 128 and file_only.batcher.policy.value == "fail-closed"
    off = open_audit_sink(None)
    assert isinstance(off, FanOutSink) and off.sinks == ()
    both = open_audit_sink(str(tmp_path / "a.log"), http_url="http://127.0.0.1:9/x")
    assert isinstance(both, FanOutSink) and len(both.sinks) == 2


@contextmanager
def collector(fail_first: int) -> Iterator[tuple[str, list[bytes]]]:
    """A loopback HTTP collector that answers 500 to the first ``fail_first`` POSTs."""
    bodies: list[bytes] = []
    state = {"left": fail_first}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if state["left"] > 0 or self.headers["Content-Type"] != "application/x-ndjson":
                state["left"] -= 1
                self.send_response(500)
            else:
                bodies.append(body)
                self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/audit", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.trio
async def test_http_sink_posts_batches_and_retries_a_failing_collector() -> None:
    with collector(fail_first=2) as (url, bodies):
        sink = HttpSink(url, timeout_s=5, attempts=3, flush_interval_s=0.05)
        events = [make_event("session.attach", at=i, mode="rw") for i in range(5)]
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            for event in events:
                await sink.emit(event)
            with trio.fail_after(20):
                await sink.wait_flushed()
            nursery.cancel_scope.cancel()
    posted = [AuditEvent.from_json(line) for body in bodies for line in body.splitlines()]
    assert posted == events
    assert json.loads(bodies[0].splitlines()[0])["type"] == "session.attach"
    assert sink.statistics().batcher.write_failures == 0  # type: ignore[union-attr]
    # The two 500s were retried inside one attempt; all five went out.
    assert sink.posts >= 1
