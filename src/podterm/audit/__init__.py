"""Audit events and where they go (docs/audit.md is the schema)."""

from podterm.audit.events import (
    OUTCOMES,
    REGISTRY,
    SCHEMA_VERSION,
    AuditEvent,
    AuditSchemaError,
    EventKind,
    Target,
    format_time,
    make_event,
)
from podterm.audit.sinks import (
    AuditSink,
    FanOutSink,
    FsyncPolicy,
    HttpSink,
    JsonLinesFileSink,
    MemorySink,
    SinkStatistics,
    open_audit_sink,
)

__all__ = [
    "OUTCOMES", "REGISTRY", "SCHEMA_VERSION", "AuditEvent", "AuditSchemaError", "EventKind",
    "Target", "format_time", "make_event",
    "AuditSink", "FanOutSink", "FsyncPolicy", "HttpSink", "JsonLinesFileSink", "MemorySink",
    "SinkStatistics", "open_audit_sink",
]
