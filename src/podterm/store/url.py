"""``open_store(url)``: a session store from a ``store.url`` setting.

==========================================================  =========================
URL                                                         backend
==========================================================  =========================
``memory://``                                               :class:`MemoryStore`
``sqlite:///ABSOLUTE/PATH[?busy_timeout_s=5&poll_interval_s=0.25]``   :class:`SqliteStore`
``redis://[USER:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]``      :class:`RedisStore`
``rediss://...`` (TLS; ``?ca_file=PEM`` for a private CA)   :class:`RedisStore`
==========================================================  =========================

Redis options: ``prefix`` (key prefix, default ``podterm:``),
``connect_timeout_s``, ``op_timeout_s``, ``backoff_base_s``, ``backoff_cap_s``,
``keepalive_s``.  An unknown option, a bad number or a malformed URL raises
:class:`~podterm.errors.ConfigError` naming the setting, the URL (password
hidden) and what is allowed.
"""

from __future__ import annotations

import math
import ssl
import time
from urllib.parse import parse_qsl, unquote, urlsplit

from podterm.errors import ConfigError

from .base import Clock, SessionStore
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SqliteStore

__all__ = ["open_store", "redact_url"]

_ALLOWED = ("memory://, sqlite:///ABSOLUTE/PATH or "
            "redis[s]://[USER:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]")
_SQLITE_OPTIONS = ("busy_timeout_s", "poll_interval_s")
_REDIS_FLOAT_OPTIONS = ("connect_timeout_s", "op_timeout_s", "backoff_base_s", "backoff_cap_s",
                        "keepalive_s")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:***@{host}").geturl()
    except ValueError:
        return "<unparseable URL>"


def _bad(url: str, problem: str) -> ConfigError:
    return ConfigError(f"store.url {redact_url(url)!r}: {problem}; expected {_ALLOWED}")


def _options(url: str, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad(url, f"malformed query {query!r}") from None
    for key, value in pairs:
        if key not in allowed:
            raise _bad(url, f"unknown option {key!r} (allowed: {', '.join(allowed) or 'none'})")
        options[key] = value
    return options


def _seconds(url: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise _bad(url, f"option {key}={value!r} must be a positive number of seconds")
    return number


def open_store(url: str, *, clock: Clock = time.time,
               ssl_context: ssl.SSLContext | None = None) -> SessionStore:
    """The store ``url`` names, not yet running (start it with ``nursery.start(store.run)``).

    Args:
        url: see the module docstring.
        clock: wall-clock seconds (tests inject a fake).
        ssl_context: for ``rediss://``, overrides the default (system CAs, or
            ``?ca_file=``); ignored for other schemes.

    Raises:
        ConfigError: unknown scheme, malformed URL, unknown or bad option.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path.strip("/") or parts.query:
            raise _bad(url, "memory:// takes no host, path or options")
        return MemoryStore(clock=clock)
    if scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/") or parts.path.rstrip("/") == "":
            raise _bad(url, "sqlite needs an absolute file path: sqlite:///var/lib/podterm/store.db")
        options = _options(url, parts.query, _SQLITE_OPTIONS)
        seconds = {k: _seconds(url, k, v) for k, v in options.items()}
        return SqliteStore(unquote(parts.path), clock=clock,
                           busy_timeout_s=seconds.get("busy_timeout_s", 5.0),
                           poll_interval_s=seconds.get("poll_interval_s", 0.25))
    if scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise _bad(url, "redis needs a host")
        db_text = parts.path.strip("/")
        if db_text and not db_text.isdigit():
            raise _bad(url, f"database {db_text!r} must be a number")
        allowed = ("prefix", *_REDIS_FLOAT_OPTIONS) + (("ca_file",) if scheme == "rediss" else ())
        options = _options(url, parts.query, allowed)
        seconds = {k: _seconds(url, k, v) for k, v in options.items() if k in _REDIS_FLOAT_OPTIONS}
        prefix = options.get("prefix", "podterm:")
        if not prefix:
            raise _bad(url, "option prefix must not be empty")
        context: ssl.SSLContext | None = None
        if scheme == "rediss":
            context = ssl_context
            if context is None:
                try:
                    context = ssl.create_default_context(cafile=options.get("ca_file"))
                except (OSError, ssl.SSLError) as exc:
                    raise _bad(url, f"cannot load ca_file: {exc}") from None
        return RedisStore(
            parts.hostname, port or 6379, db=int(db_text or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            ssl_context=context, prefix=prefix, clock=clock,
            connect_timeout_s=seconds.get("connect_timeout_s", 2.0),
            op_timeout_s=seconds.get("op_timeout_s", 2.0),
            backoff_base_s=seconds.get("backoff_base_s", 0.1),
            backoff_cap_s=seconds.get("backoff_cap_s", 2.0),
            keepalive_s=seconds.get("keepalive_s", 5.0))
    raise _bad(url, f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme")
