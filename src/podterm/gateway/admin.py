"""``/healthz``, ``/readyz`` and ``/metrics``.

* ``/healthz`` — 200 while the process serves requests at all (liveness).
* ``/readyz`` — 200 while the gateway takes new sessions; 503 ``unavailable``
  once it drains, so a load balancer or Kubernetes stops sending new clients
  before the attached ones are told to move (readiness); 503 too while a
  SQLite or Redis session store is unreachable (new sessions are refused
  then; attached ones carry on).
* ``/metrics`` — Prometheus text, rendered from ``statistics()`` snapshots and
  the counters only (STYLE.md §7): sessions by state, attachments, attaches,
  resumes, bytes each way, replayed bytes, gaps, heartbeat failures,
  handshake failures by reason, event-loop lag, ring memory, open descriptors.

All three are public (no token): probes and scrapers do not carry one, and
nothing here says more than counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from podterm.gateway.http import Response, error_response, json_response
from podterm.gateway.router import Call, Route
from podterm.metrics import (
    CONTENT_TYPE,
    GatewayCounters,
    LoopLagProbe,
    MetricFamily,
    counter,
    gauge,
    labelled,
    render,
)
from podterm.protocol import codec
from podterm.session.registry import SessionRegistry

__all__ = ["AdminApi", "metric_families"]


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return -1


def metric_families(registry: SessionRegistry, counters: GatewayCounters,
                    lag: LoopLagProbe | None, *, draining: bool) -> list[MetricFamily]:
    """Every metric the gateway exports, from snapshots."""
    reg = registry.statistics()
    c = counters.snapshot()
    fams = [
        labelled("podterm_sessions", "gauge", "Live sessions by state.", "state",
                 dict(reg.sessions)),
        labelled("podterm_attachments", "gauge", "Attached clients by mode.", "mode",
                 {"rw": reg.writers, "ro": reg.viewers}),
        counter("podterm_sessions_created_total", "Sessions created.", c.sessions_created),
        labelled("podterm_sessions_ended_total", "counter", "Sessions ended, by reason.",
                 "reason", dict(c.sessions_ended)),
        labelled("podterm_attaches_total", "counter", "Attaches accepted, by mode.", "mode",
                 dict(c.attaches)),
        counter("podterm_resumes_total", "Attaches that presented a valid resume token.",
                c.resumes),
        counter("podterm_takeovers_total",
                "Writers replaced by a resuming connection (old one closed 4409).", c.takeovers),
        counter("podterm_bytes_in_total", "STDIN bytes accepted from clients.", c.bytes_in),
        counter("podterm_bytes_out_total", "Output bytes sent to clients, replays included.",
                c.bytes_out),
        counter("podterm_replayed_bytes_total", "Output bytes replayed after an attach.",
                c.replayed_bytes),
        counter("podterm_gaps_total", "gap messages sent.", c.gaps),
        counter("podterm_gap_bytes_total", "Output bytes reported lost by gaps.", c.gap_bytes),
        counter("podterm_heartbeat_failures_total",
                "Links declared dead (missed pongs or a stalled write).", c.heartbeat_failures),
        labelled("podterm_handshake_failures_total", "counter",
                 "Refused WebSocket attaches, by reason.", "reason",
                 dict(c.handshake_failures)),
        counter("podterm_http_requests_total", "HTTP requests answered.", c.http_requests),
        labelled("podterm_http_errors_total", "counter", "HTTP error answers, by code.", "code",
                 dict(c.http_errors)),
        gauge("podterm_ring_bytes", "Output ring memory allocated over all sessions.",
              reg.ring_bytes_allocated),
        gauge("podterm_input_buffered_bytes", "Accepted input not yet written to upstreams.",
              reg.input_buffered_bytes),
        gauge("podterm_draining", "1 while the gateway drains.", 1 if draining else 0),
        gauge("podterm_open_fds", "Open file descriptors of this process.", _open_fds()),
        labelled("podterm_codec_info", "gauge", "The active frame codec (value 1).", "impl",
                 {codec.IMPL: 1}),
    ]
    if lag is not None:
        st = lag.statistics()
        fams.append(gauge("podterm_event_loop_lag_seconds",
                          "How late the latest loop-lag probe woke.", st.last_s))
        fams.append(gauge("podterm_event_loop_lag_max_seconds",
                          "The worst loop lag seen since start.", st.max_s))
    return fams


class AdminApi:
    """The health, readiness and metrics endpoints.

    Args:
        registry: for session statistics.
        counters: the gateway's counters.
        lag: the event-loop lag probe, if one runs.
        is_draining: asked on every ``/readyz``.
        unready: asked on every ``/readyz`` after ``is_draining``: why new
            sessions cannot be taken right now (the store is down), or None.
    """

    __slots__ = ("registry", "counters", "lag", "is_draining", "unready")

    def __init__(self, registry: SessionRegistry, counters: GatewayCounters,
                 lag: LoopLagProbe | None, is_draining: Callable[[], bool],
                 unready: Callable[[], str | None] = lambda: None) -> None:
        self.registry = registry
        self.counters = counters
        self.lag = lag
        self.is_draining = is_draining
        self.unready = unready

    def __repr__(self) -> str:
        return f"<AdminApi draining={self.is_draining()}>"

    def routes(self) -> list[Route]:
        """``/healthz``, ``/readyz``, ``/metrics`` — all public."""
        return [
            Route.make("GET", r"/healthz", self.healthz, public=True),
            Route.make("GET", r"/readyz", self.readyz, public=True),
            Route.make("GET", r"/metrics", self.metrics, public=True),
        ]

    async def healthz(self, call: Call) -> Response:
        return json_response(200, {"status": "ok"}, headers=(("Cache-Control", "no-store"),))

    async def readyz(self, call: Call) -> Response:
        if self.is_draining():
            return error_response(503, "draining: not taking new sessions",
                                  headers=(("Cache-Control", "no-store"),))
        reason = self.unready()
        if reason is not None:
            return error_response(503, reason, headers=(("Cache-Control", "no-store"),))
        return json_response(200, {"status": "ready"}, headers=(("Cache-Control", "no-store"),))

    async def metrics(self, call: Call) -> Response:
        text = render(metric_families(self.registry, self.counters, self.lag,
                                      draining=self.is_draining()))
        return Response(200, text.encode("utf-8"), CONTENT_TYPE,
                        (("Cache-Control", "no-store"),))
