"""Process logging: JSON lines or text, levels per component, secrets redacted.

Code everywhere logs the standard way (STYLE.md §7)::

    log = logging.getLogger(__name__)
    log.info("session.attach.complete", extra={"session": sid, "offset": off})

and :func:`configure`, called once by ``podterm.cli``, decides how that looks:

* ``json``: one object per line, ``{"time", "level", "logger", "message",
  ...extra fields..., "exc"?}``, for log shippers;
* ``text``: ``TIME LEVEL LOGGER: MESSAGE key=value ...`` for people.

Secrets never reach the output.  :class:`RedactSecrets` sits on the handler,
so it sees every record from every logger, and replaces

* the value of any ``extra`` field whose name contains ``token``,
  ``authorization``, ``password``, ``secret`` or ``cookie`` (also inside
  dicts and ``(name, value)`` header lists, as h11 hands them out);
* ``Bearer <credential>`` and ``token=<value>`` inside the message text (the
  web terminal URL carries the admin token in its fragment; it is printed to
  stdout once, never logged).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["REDACTED", "LEVELS", "RedactSecrets", "JsonFormatter", "TextFormatter", "configure"]

REDACTED = "[redacted]"

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_SECRET_WORDS = ("token", "authorization", "password", "secret", "cookie")

# Every attribute a bare LogRecord has; anything else on a record came from extra=.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}

_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
_TOKEN_PARAM = re.compile(r"(?i)([#?&;\s](?:access_|admin_|resume_)?token=)[^&\s#\"',;]+")


def _is_secret_name(name: object) -> bool:
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return isinstance(name, str) and any(word in name.lower() for word in _SECRET_WORDS)


def _redact_value(value: Any) -> Any:
    """Redact secret-named entries inside dicts and header lists, recursively."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if _is_secret_name(k) else _redact_value(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            if isinstance(item, tuple) and len(item) == 2 and _is_secret_name(item[0]):
                items.append((item[0], REDACTED))
            else:
                items.append(_redact_value(item))
        return type(value)(items) if isinstance(value, tuple) else items
    if isinstance(value, str | bytes):
        return _redact_text(value)
    return value


def _redact_text(text: str | bytes) -> str | bytes:
    if isinstance(text, bytes):
        if b"earer" in text or b"oken=" in text:
            return _redact_text(text.decode("latin-1")).encode("latin-1")  # type: ignore[union-attr]
        return text
    if "earer" in text or "oken=" in text:  # cheap pre-check; most messages have neither
        text = _BEARER.sub(r"\1" + REDACTED, text)
        text = _TOKEN_PARAM.sub(r"\1" + REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrite a record so that no credential in it is emitted.

    Attached to handlers (not loggers) so records propagated from any logger
    pass through it.  It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in list(vars(record).items()):
            if name in _STANDARD_ATTRS:
                continue
            record.__dict__[name] = REDACTED if _is_secret_name(name) else _redact_value(value)
        try:
            message = record.getMessage()
        except Exception:  # bad %-args: leave it to the handler's handleError
            return True
        redacted = _redact_text(message)
        if redacted is not message:
            record.msg, record.args = redacted, None
        return True


def _extras(record: logging.LogRecord) -> Iterable[tuple[str, Any]]:
    for name, value in vars(record).items():
        if name not in _STANDARD_ATTRS and not name.startswith("_"):
            yield name, value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exc."""

    _RESERVED = ("time", "level", "logger", "message", "exc", "stack")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in _extras(record):
            # An extra field never overwrites the envelope; it moves aside.
            out[name + "_" if name in self._RESERVED else name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=_json_default, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``2025-01-01T12:00:00.000Z INFO    podterm.gateway: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in _extras(record))
        if fields:
            line = f"{line} {fields}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=_json_default)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


_OURS = "_podterm_handler"


def configure(format: str = "text", level: str = "info", *,
              levels: Iterable[tuple[str, str]] = (), stream: IO[str] | None = None) -> None:
    """Install podterm's handler on the root logger (replacing a previous one).

    Args:
        format: ``"json"`` or ``"text"``.
        level: root level name (``debug`` … ``critical``).
        levels: per-logger overrides, e.g. ``[("podterm.net", "debug")]``.
        stream: where lines go; default ``sys.stderr`` at call time.

    Raises:
        ValueError: unknown format or level (the config layer has already
            validated them; this guards direct callers).
    """
    if format not in ("json", "text"):
        raise ValueError(f"unknown log format {format!r}: expected json or text")
    for name in [level, *(lvl for _, lvl in levels)]:
        if name not in LEVELS:
            raise ValueError(f"unknown log level {name!r}: expected one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    handler.addFilter(RedactSecrets())
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    for name, lvl in levels:
        logging.getLogger(name).setLevel(LEVELS[lvl])
