"""Throw :mod:`tests.fuzz.cases` at a live in-process gateway for a fixed time; judge each end.

:func:`fuzz_gateway` starts a gateway (``podterm.gateway.server.serve`` in
this trio run, on 127.0.0.1:0, with a 1 s handshake timeout), opens a
*witness* session that echoes input all along, and runs ``workers``
concurrent workers until ``seconds`` have passed.  Each worker picks a case
kind, generates its bytes from its own ``random.Random(seed, worker)``, and
runs it on a fresh connection:

* ``http``: request bytes in random splits (half-closed sometimes), from
  127.0.1.N so that its wrong tokens spend their own failed-login budget;
* ``podterm``: a real podterm.v1 upgrade (writer or viewer of the worker's
  own ``cat`` session), then frames from :func:`~tests.fuzz.cases.podterm_case`;
* ``k8s``: a real kubectl-style exec upgrade (v5 or v4), then frames from
  :func:`~tests.fuzz.cases.k8s_case`.

The verdicts (any one is a failure, reported with the seed and case id):

* an HTTP answer must be HTTP/1.1 with a status from :data:`ALLOWED_STATUSES`
  (``500`` never: it means a handler raised); no answer is allowed only if
  the gateway closed the connection;
* a WebSocket must end with a close code from :data:`ALLOWED_CLOSE_CODES`
  (``1011`` never) or the echo of the client's own CLOSE, or stay open
  waiting for more input; the gateway must never send a frame the client's
  parser rejects, and never drop the TCP connection without a CLOSE;
* no ``ERROR`` log record from ``podterm`` (an exception that escaped a
  handler is logged there, with its traceback);
* the witness echoes every round within 5 s throughout and once more after
  the fuzz; ``/healthz`` says 200 at the end;
* after shutdown, every audit line parses against the schema and no session
  is left.

Cases still running when the time is up are cancelled without a verdict:
the budget is a deadline, not a sleep.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from podterm.audit import AuditEvent
from podterm.config import (
    AuditConfig,
    LimitsConfig,
    ListenConfig,
    RecordingConfig,
    ServeConfig,
    SessionsConfig,
)
from podterm.errors import HandshakeError
from podterm.gateway.http import ERROR_CODES
from podterm.gateway.server import Gateway, GatewayOptions, serve
from podterm.net.wsconn import ConnectionClosed, WebSocketStream, client_handshake
from podterm.protocol.events import Hello, Stdout
from podterm.protocol.session_proto import SUBPROTOCOL, ClientCodec, encode_ack
from tests.fuzz import cases
from tests.helpers.http import request

__all__ = ["ALLOWED_CLOSE_CODES", "ALLOWED_STATUSES", "FuzzReport", "fuzz_gateway"]

#: docs/protocol.md §2 statuses, the successes, h11's 501 for an unsupported
#: Transfer-Encoding, and 100 Continue.  500 is left out on purpose.
ALLOWED_STATUSES = frozenset(ERROR_CODES) | {100, 101, 200, 201, 204, 501}
#: docs/protocol.md §7, without 1011 (an unexpected condition: a bug here,
#: where the upstream is a local ``cat`` that does not fail).
ALLOWED_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009,
                                 4401, 4403, 4404, 4409, 4410, 4429})

HANDSHAKE_TIMEOUT_S = 1.0
#: An HTTP case may wait for the gateway's 10 s body timeout (HttpLimits).
HTTP_CASE_S = 13.0
#: How long a WebSocket case waits for the gateway's verdict on its frames.
WS_VERDICT_S = 1.5
#: Witness liveness bound per round (not a performance claim).
WITNESS_BOUND_S = 5.0
KINDS = ("http", "http", "podterm", "podterm", "k8s")


@dataclass
class FuzzReport:
    """What a run did and found."""

    seed: int
    seconds: float
    cases: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    witness_rounds: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, case: str, message: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(f"[{case}] {message}")

    def summary(self) -> str:
        top = ", ".join(f"{k} x{v}" for k, v in self.outcomes.most_common(24))
        lines = [f"fuzz seed={self.seed} budget={self.seconds:g}s cases="
                 f"{sum(self.cases.values())} {dict(self.cases)} witness rounds="
                 f"{self.witness_rounds}", f"outcomes: {top}"]
        lines += [f"FAIL {f}" for f in self.failures]
        return "\n".join(lines)


class _Errors(logging.Handler):
    """Collects ERROR records from the ``podterm`` loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            # The innermost exception and where it was raised: enough to find the bug.
            exc: BaseException = record.exc_info[1]
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            where = traceback.extract_tb(exc.__traceback__)[-3:]
            text += f" ({type(exc).__name__}: {exc}) at " + " <- ".join(
                f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where))
        self.records.append(f"{record.name}: {text}")


# ------------------------------------------------------------------ clients


async def _rest(port: int, token: str, method: str, path: str, body: Any = None
                ) -> tuple[int, Any]:
    answer = await request(port, method, path, token=token, body=body)
    return answer.status, json.loads(answer.body or b"null")


async def _new_session(gw: Gateway, token: str) -> str:
    status, body = await _rest(gw.port, token, "POST", "/api/v1/sessions",
                               {"command": ["cat"], "tty": False})
    if status != 201:
        raise AssertionError(f"could not create a session: {status} {body}")
    return str(body["id"])


class _Witness:
    """A legitimate podterm.v1 writer that echoes through ``cat``, byte-exactly."""

    def __init__(self, ws: WebSocketStream) -> None:
        self.ws = ws
        self.codec = ClientCodec()
        self.sent = bytearray()
        self.output = bytearray()
        self.hello = False

    async def round(self, number: int) -> None:
        line = f"witness round {number}\n".encode()
        self.sent += line
        prefix, payload = self.codec.stdin(line)
        await self.ws.send_binary(payload, prefix)
        with trio.fail_after(WITNESS_BOUND_S):
            while len(self.output) < len(self.sent):
                for opcode, message in await self.ws.receive_batch():
                    for event in self.codec.receive_message(opcode, message):
                        if isinstance(event, Hello):
                            self.hello = True
                        elif isinstance(event, Stdout):
                            self.output += event.data
                ack_prefix, ack = encode_ack(len(self.output))
                await self.ws.send_binary(ack, ack_prefix)
        if bytes(self.output) != bytes(self.sent):
            raise AssertionError(f"witness output differs: {bytes(self.output)[-80:]!r}")


# -------------------------------------------------------------------- cases


async def _send_in_chunks(stream: trio.abc.Stream, data: bytes, cuts: tuple[int, ...]) -> bool:
    """Write ``data`` split at ``cuts``; False when the gateway closed on us meanwhile."""
    start = 0
    for end in [*cuts, len(data)]:
        if end <= start:
            continue
        try:
            await stream.send_all(data[start:end])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        start = end
    return True


async def _http_case(gw: Gateway, token: str, session_id: str, rng: random.Random,
                     report: FuzzReport, case: str, source: str) -> None:
    data = cases.http_request(rng, cases.Target(gw.port, token, session_id))
    received = b""
    ended = False
    async with await trio.open_tcp_stream("127.0.0.1", gw.port,
                                          local_address=source) as stream:
        await _send_in_chunks(stream, data, cases.splits(rng, len(data)))
        if rng.random() < 0.3:
            try:
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        with trio.move_on_after(HTTP_CASE_S):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    ended = True  # RST: the gateway closed with our bytes unread
                    break
                if not chunk:
                    ended = True
                    break
                received += chunk
                if b"\r\n\r\n" in received:
                    # A whole head arrived; a kept-alive or upgraded connection
                    # would stay open, so give the rest a moment and stop.
                    with trio.move_on_after(0.2):
                        try:
                            while chunk := await stream.receive_some(65536):
                                received += chunk
                        except trio.BrokenResourceError:
                            pass
                    ended = True
                    break
    if not received:
        report.outcomes["http closed"] += 1
        if not ended:
            report.fail(case, f"no answer and not closed within {HTTP_CASE_S:g}s; "
                        f"request {data[:300]!r}")
        return
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", received)
    if match is None:
        report.fail(case, f"answer is not HTTP/1.1: {received[:120]!r}; request {data[:300]!r}")
        return
    status = int(match.group(1))
    report.outcomes[f"http {status}"] += 1
    if status not in ALLOWED_STATUSES:
        report.fail(case, f"HTTP {status}: {received[:300]!r}; request {data[:300]!r}")


async def _ws_case(gw: Gateway, token: str, kind: str, session_id: str, rng: random.Random,
                   report: FuzzReport, case: str) -> bool:
    """One WebSocket case; returns False when the worker's session is gone."""
    if kind == "podterm":
        writer = rng.random() < 0.6
        path = f"/api/v1/sessions/{session_id}/attach?mode={'rw' if writer else 'ro'}"
        protocols = [SUBPROTOCOL]
        wscase = cases.podterm_case(rng, writer=writer)
    else:
        tty = rng.choice(["true", "false"])
        path = ("/api/v1/namespaces/default/pods/local/exec?command=cat&stdin=true"
                f"&stdout=true&stderr=true&tty={tty}")
        protocols = [rng.choice(["v5.channel.k8s.io", "v4.channel.k8s.io"])]
        wscase = cases.k8s_case(rng)
    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
    code: int | None = None
    try:  # the stream is closed on every path, cancellation at the deadline included
        try:
            ws, _ = await client_handshake(stream, f"127.0.0.1:{gw.port}", path, protocols,
                                           [("Authorization", f"Bearer {token}")])
        except HandshakeError as exc:
            report.outcomes[f"{kind} handshake {exc.http_status}"] += 1
            if exc.http_status not in ALLOWED_STATUSES:
                report.fail(case, f"{kind} upgrade answered {exc.http_status}: {exc.message}")
            return exc.http_status not in (404, 410)
        await _send_in_chunks(stream, wscase.wire, wscase.chunks)
        with trio.move_on_after(WS_VERDICT_S):
            try:
                while True:
                    await ws.receive_batch()
            except ConnectionClosed as exc:
                code = exc.code
        if code is None:
            with trio.move_on_after(1.0):
                await ws.aclose(1000)
    finally:
        await trio.aclose_forcefully(stream)
    if code is None:
        report.outcomes[f"{kind} open"] += 1
        return True
    report.outcomes[f"{kind} {code}"] += 1
    theirs = ws.conn.close_received
    if theirs is None and code != 1006:
        report.fail(case, f"{kind}: the gateway sent a frame the client rejects ({code}); "
                    f"wire {wscase.wire[:200]!r}")
    elif theirs is None:
        report.fail(case, f"{kind}: the gateway dropped the connection without a CLOSE; "
                    f"wire {wscase.wire[:200]!r}")
    elif code not in ALLOWED_CLOSE_CODES and code != wscase.close_code:
        report.fail(case, f"{kind}: closed with {code} {ws.conn.close_received!r}; "
                    f"wire {wscase.wire[:200]!r}")
    return code not in (4404, 4410)


# ----------------------------------------------------------------------- run


async def _worker(gw: Gateway, token: str, index: int, seed: int, report: FuzzReport) -> None:
    rng = random.Random(f"{seed}/{index}")
    session_id = await _new_session(gw, token)
    number = 0
    while True:
        number += 1
        kind = rng.choice(KINDS)
        case = f"seed {seed} worker {index} case {number} ({kind})"
        report.cases[kind] += 1
        alive = True
        try:
            if kind == "http":
                with trio.fail_after(HTTP_CASE_S + 5):
                    # From an address of its own: its bad tokens spend that
                    # address's failed-login budget (429s are part of the
                    # surface), not the one the WebSocket cases log in from.
                    await _http_case(gw, token, session_id, rng, report, case,
                                     f"127.0.1.{index + 1}")
            else:
                with trio.fail_after(WS_VERDICT_S + 10):
                    alive = await _ws_case(gw, token, kind, session_id, rng, report, case)
        except trio.TooSlowError:
            report.fail(case, "the case did not end in time: the gateway neither answered "
                        "nor closed")
        if not alive:
            session_id = await _new_session(gw, token)


async def fuzz_gateway(seconds: float, *, seed: int, workers: int = 6,
                       work_dir: Path | None = None) -> FuzzReport:
    """Run the fuzz for ``seconds`` against a fresh gateway; see the module docstring."""
    report = FuzzReport(seed, seconds)
    errors = _Errors()
    podterm_log = logging.getLogger("podterm")
    with tempfile.TemporaryDirectory(prefix="podterm-fuzz-") as tmp:
        where = Path(work_dir or tmp)
        config = ServeConfig(
            listen=ListenConfig(host="127.0.0.1", port=0),
            limits=LimitsConfig(handshake_timeout_s=HANDSHAKE_TIMEOUT_S),
            sessions=SessionsConfig(grace_s=2.0, drain_timeout_s=3.0),
            audit=AuditConfig(log_file=str(where / "audit.log")),
            recording=RecordingConfig(dir=str(where / "recordings")))
        finished = trio.Event()
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
                          ) -> None:
                try:
                    await serve(config, options=GatewayOptions(lag_probe_interval_s=0),
                                task_status=task_status)
                finally:
                    finished.set()

            gw: Gateway = await nursery.start(functools.partial(run))
            token = gw.admin_token
            assert token is not None
            podterm_log.addHandler(errors)
            try:
                await _exercise(gw, token, seconds, seed, workers, report)
            finally:
                podterm_log.removeHandler(errors)
                gw.shutdown("fuzz over")
                with trio.fail_after(15):
                    await finished.wait()
        for record in errors.records:
            report.fail("log", record)
        if len(gw.registry):
            report.fail("end", f"sessions left after shutdown: {gw.registry.sessions()}")
        audit = (where / "audit.log").read_bytes().splitlines()
        for number, line in enumerate(audit, 1):
            try:
                AuditEvent.from_json(line)
            except ValueError as exc:
                report.fail("audit", f"line {number}: {exc}")
        report.outcomes["audit lines"] = len(audit)
    return report


async def _exercise(gw: Gateway, token: str, seconds: float, seed: int, workers: int,
                    report: FuzzReport) -> None:
    witness_id = await _new_session(gw, token)
    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
    try:
        ws, _ = await client_handshake(stream, f"127.0.0.1:{gw.port}",
                                       f"/api/v1/sessions/{witness_id}/attach?mode=rw",
                                       [SUBPROTOCOL], [("Authorization", f"Bearer {token}")])
        await _with_witness(gw, token, _Witness(ws), seconds, seed, workers, report)
    finally:
        await trio.aclose_forcefully(stream)


async def _with_witness(gw: Gateway, token: str, witness: _Witness, seconds: float, seed: int,
                        workers: int, report: FuzzReport) -> None:
    await witness.round(0)
    deadline = trio.current_time() + seconds
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def keep_echoing() -> None:
            # Stopped by the event between rounds, never cancelled inside one:
            # a frame cut in half would be the harness's fault, not the gateway's.
            while not stop.is_set():
                try:
                    await witness.round(report.witness_rounds + 1)
                except (trio.TooSlowError, ConnectionClosed, AssertionError) as exc:
                    report.fail("witness", f"round {report.witness_rounds + 1}: {exc!r}")
                    return
                report.witness_rounds += 1
                with trio.move_on_after(0.25):  # a typist's pace
                    await stop.wait()

        nursery.start_soon(keep_echoing)
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as pool:
                for index in range(workers):
                    pool.start_soon(_worker, gw, token, index, seed, report)
        stop.set()
    try:
        await witness.round(report.witness_rounds + 1)
        report.witness_rounds += 1
    except (trio.TooSlowError, ConnectionClosed, AssertionError) as exc:
        report.fail("witness", f"after the fuzz: {exc!r}")
    with trio.fail_after(WITNESS_BOUND_S):
        status, _ = await _rest(gw.port, token, "GET", "/healthz")
    if status != 200:
        report.fail("end", f"/healthz answered {status} after the fuzz")
    with trio.move_on_after(2):
        await witness.ws.aclose()
