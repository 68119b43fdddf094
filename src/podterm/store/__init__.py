"""The session store: one interface (:class:`SessionStore`), three backends, picked by URL."""

from .base import (
    AgentLease,
    EventKind,
    PodIdentity,
    SessionRecord,
    SessionStore,
    StoreError,
    StoreEvent,
    StoreStatistics,
    StoreUnavailable,
    hash_resume_token,
    running,
)
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SqliteStore
from .url import open_store, redact_url

__all__ = [
    "AgentLease",
    "EventKind",
    "MemoryStore",
    "PodIdentity",
    "RedisStore",
    "SessionRecord",
    "SessionStore",
    "SqliteStore",
    "StoreError",
    "StoreEvent",
    "StoreStatistics",
    "StoreUnavailable",
    "hash_resume_token",
    "open_store",
    "redact_url",
    "running",
]
