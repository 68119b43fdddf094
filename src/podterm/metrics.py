"""Counters, the event-loop lag probe, and Prometheus text rendering.

Two kinds of numbers feed ``/metrics``:

* *counters* that only ever grow (bytes relayed, attaches, gaps...).  They live
  in one :class:`GatewayCounters` object that the registry, the sessions and
  the attach handler increment directly: a plain ``int`` attribute add on the
  hot path, once per batch, never a lock or a call per message;
* *gauges* read from the ``statistics()`` snapshots of stateful components
  (sessions by state, attachments).

``/metrics`` never reaches into internals: it takes snapshots
(:meth:`GatewayCounters.snapshot`, ``registry.statistics()``,
:meth:`LoopLagProbe.statistics`) and renders :class:`MetricFamily` values with
:func:`render`, in the Prometheus text exposition format 0.0.4.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import trio

__all__ = [
    "CONTENT_TYPE",
    "GatewayCounters",
    "CountersSnapshot",
    "LoopLagProbe",
    "LoopLagStatistics",
    "MetricFamily",
    "histogram",
    "render",
]

#: The Prometheus text format's media type (exposition format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One metric: name, type, help text and its samples.

    Attributes:
        name: e.g. ``podterm_sessions``; counters end in ``_total``.
        kind: ``"counter"``, ``"gauge"`` or ``"histogram"``.
        help: one line saying what is counted.
        samples: ``(labels, value)`` pairs; ``labels`` may be empty.
        suffixes: per sample, appended to ``name`` (a histogram's ``_bucket``,
            ``_sum``, ``_count``); empty: every sample is named ``name``.
    """

    name: str
    kind: str
    help: str
    samples: tuple[tuple[Mapping[str, str], float], ...]
    suffixes: tuple[str, ...] = ()


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[MetricFamily]) -> str:
    """Render families in the Prometheus text format (one ``# HELP``/``# TYPE`` each)."""
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for i, (labels, value) in enumerate(fam.samples):
            name = fam.name + fam.suffixes[i] if fam.suffixes else fam.name
            if labels:
                body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
                lines.append(f"{name}{{{body}}} {_format_value(value)}")
            else:
                lines.append(f"{name} {_format_value(value)}")
    lines.append("")
    return "\n".join(lines)


_NO_LABELS: Mapping[str, str] = MappingProxyType({})


def counter(name: str, help: str, value: float) -> MetricFamily:
    """A counter family with a single unlabelled sample."""
    return MetricFamily(name, "counter", help, ((_NO_LABELS, value),))


def gauge(name: str, help: str, value: float) -> MetricFamily:
    """A gauge family with a single unlabelled sample."""
    return MetricFamily(name, "gauge", help, ((_NO_LABELS, value),))


def labelled(name: str, kind: str, help: str, label: str,
             values: Mapping[str, float]) -> MetricFamily:
    """A family with one label, one sample per value of it."""
    return MetricFamily(name, kind, help,
                        tuple((MappingProxyType({label: k}), v) for k, v in sorted(values.items())))


def histogram(name: str, help: str, label: str, bounds: Sequence[float],
              series: Mapping[str, tuple[Sequence[int], float]]) -> MetricFamily:
    """A histogram family with one label: per value of it, ``(cumulative, sum)``.

    ``cumulative`` holds the count at or below each of ``bounds``, then the
    total (the ``+Inf`` bucket, which is also ``_count``).
    """
    samples: list[tuple[Mapping[str, str], float]] = []
    suffixes: list[str] = []
    les = [_format_value(float(b)) for b in bounds] + ["+Inf"]
    for key, (cumulative, total) in sorted(series.items()):
        if len(cumulative) != len(les):
            raise ValueError(f"{name}{{{label}={key!r}}}: {len(cumulative)} counts for "
                             f"{len(les)} buckets")
        for le, n in zip(les, cumulative, strict=True):
            samples.append((MappingProxyType({label: key, "le": le}), n))
            suffixes.append("_bucket")
        samples.append((MappingProxyType({label: key}), total))
        suffixes.append("_sum")
        samples.append((MappingProxyType({label: key}), cumulative[-1]))
        suffixes.append("_count")
    return MetricFamily(name, "histogram", help, tuple(samples), tuple(suffixes))


@dataclass(frozen=True, slots=True)
class CountersSnapshot:
    """A frozen copy of :class:`GatewayCounters` (see there for meanings)."""

    sessions_created: int
    sessions_ended: Mapping[str, int]
    attaches: Mapping[str, int]
    resumes: int
    takeovers: int
    bytes_in: int
    bytes_out: int
    replayed_bytes: int
    gaps: int
    gap_bytes: int
    heartbeat_failures: int
    handshake_failures: Mapping[str, int]
    http_requests: int
    http_errors: Mapping[str, int] = field(default_factory=dict)


class GatewayCounters:
    """Monotonic counters shared by the gateway's components.

    Incremented in place (``counters.bytes_out += n``): one attribute add per
    batch on the hot path.  Read them only through :meth:`snapshot`.

    Attributes:
        sessions_created: sessions created.
        sessions_ended: sessions ended, by reason (``exited``, ``killed``,
            ``grace``, ``idle``, ``max_age``, ``upstream_failed``, ``shutdown``).
        attaches: attaches accepted, by mode (``rw``/``ro``).
        resumes: attaches that presented a valid resume token.
        takeovers: writers replaced by a resuming connection (old one closed 4409).
        bytes_in: STDIN bytes accepted from clients (after de-duplication).
        bytes_out: STDOUT/STDERR bytes sent to clients, replays included.
        replayed_bytes: the part of ``bytes_out`` sent again after a (re)attach.
        gaps: ``gap`` messages sent (resume below the ring, or a lagging viewer).
        gap_bytes: output bytes those gaps reported lost.
        heartbeat_failures: links declared dead after missed PONGs.
        handshake_failures: refused upgrades, by reason (``unauthenticated``,
            ``forbidden``, ``not_found``, ``bad_request``, ...).
        http_requests: HTTP requests answered (upgrades included).
        http_errors: error answers by code (``not_found``, ``internal``, ...).
    """

    __slots__ = ("sessions_created", "sessions_ended", "attaches", "resumes", "takeovers",
                 "bytes_in", "bytes_out", "replayed_bytes", "gaps", "gap_bytes",
                 "heartbeat_failures", "handshake_failures", "http_requests", "http_errors")

    def __init__(self) -> None:
        self.sessions_created = 0
        self.sessions_ended: dict[str, int] = {}
        self.attaches: dict[str, int] = {"rw": 0, "ro": 0}
        self.resumes = 0
        self.takeovers = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.replayed_bytes = 0
        self.gaps = 0
        self.gap_bytes = 0
        self.heartbeat_failures = 0
        self.handshake_failures: dict[str, int] = {}
        self.http_requests = 0
        self.http_errors: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"<GatewayCounters sessions={self.sessions_created} in={self.bytes_in} "
                f"out={self.bytes_out}>")

    @staticmethod
    def bump(table: dict[str, int], key: str, n: int = 1) -> None:
        """Add ``n`` to ``table[key]`` (for the labelled counters)."""
        table[key] = table.get(key, 0) + n

    def snapshot(self) -> CountersSnapshot:
        """A frozen copy, safe to render while the counters keep moving."""
        return CountersSnapshot(
            sessions_created=self.sessions_created,
            sessions_ended=MappingProxyType(dict(self.sessions_ended)),
            attaches=MappingProxyType(dict(self.attaches)),
            resumes=self.resumes,
            takeovers=self.takeovers,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            replayed_bytes=self.replayed_bytes,
            gaps=self.gaps,
            gap_bytes=self.gap_bytes,
            heartbeat_failures=self.heartbeat_failures,
            handshake_failures=MappingProxyType(dict(self.handshake_failures)),
            http_requests=self.http_requests,
            http_errors=MappingProxyType(dict(self.http_errors)),
        )


@dataclass(frozen=True, slots=True)
class LoopLagStatistics:
    """Event-loop lag: how late a timer fired, in seconds.

    Attributes:
        last_s: lag of the latest probe.
        max_s: the worst lag seen since start.
        samples: probes taken.
    """

    last_s: float
    max_s: float
    samples: int


class LoopLagProbe:
    """Measures event-loop lag: sleep ``interval_s`` and see how late we wake.

    A loop that spends long stretches without yielding (a big synchronous
    parse, a GC pause, a blocking call) wakes every sleeper late; this number
    is the first sign of it.  Run :meth:`run` in a nursery; it never returns.

    Args:
        interval_s: seconds between probes (0.5 s: fine enough to see a
            hiccup, cheap enough to ignore).
    """

    __slots__ = ("interval_s", "_last", "_max", "_samples")

    def __init__(self, interval_s: float = 0.5) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s}: must be > 0")
        self.interval_s = interval_s
        self._last = 0.0
        self._max = 0.0
        self._samples = 0

    def __repr__(self) -> str:
        return f"<LoopLagProbe last={self._last * 1e3:.2f}ms max={self._max * 1e3:.2f}ms>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe forever (until cancelled)."""
        task_status.started()
        while True:
            expected = trio.current_time() + self.interval_s
            await trio.sleep_until(expected)
            lag = max(0.0, trio.current_time() - expected)
            self._last = lag
            self._max = max(self._max, lag)
            self._samples += 1

    def statistics(self) -> LoopLagStatistics:
        """A frozen snapshot of the lag measured so far."""
        return LoopLagStatistics(last_s=self._last, max_s=self._max, samples=self._samples)
