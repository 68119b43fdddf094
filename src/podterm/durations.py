"""Durations as people write them: ``90s``, ``10m``, ``1h``, ``1h30m``, ``250ms``.

The grammar is Go's ``time.ParseDuration`` (what kubectl's ``--request-timeout``
and most Kubernetes tooling accept), narrowed and widened a little:

* one or more ``<number><unit>`` terms, no spaces, e.g. ``1h30m``;
* units ``ms``, ``s``, ``m``, ``h``, ``d`` (days: a grace period of a week reads
  better as ``7d`` than ``168h``); each unit at most once, largest first;
* the number may have a fraction: ``1.5h``, ``0.25s``;
* a bare ``0`` means zero; any other number needs a unit, because ``600``
  could mean seconds or milliseconds and a config file should not make a
  reader guess.  Negative durations do not exist.

:func:`parse_duration` returns seconds as a float; :func:`format_duration` is
its inverse for display (help texts, ``podterm doctor``).
"""

from __future__ import annotations

import re

__all__ = ["UNITS", "DURATION_HELP", "parse_duration", "format_duration"]

#: Seconds per unit, largest first (the order terms must appear in).
UNITS: dict[str, float] = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

#: What a valid duration looks like, for error messages.
DURATION_HELP = "a duration such as 90s, 10m, 1h, 1h30m or 250ms (units ms, s, m, h, d)"

# "ms" must be tried before "m" and "s" so that "250ms" is one term, not "250m" + "s".
_TERM = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|d|h|m|s)")
_RANK = {unit: i for i, unit in enumerate(UNITS)}


def parse_duration(text: str) -> float:
    """Parse a duration and return it in seconds.

    Args:
        text: e.g. ``"90s"``, ``"10m"``, ``"1h30m"``, ``"250ms"``, ``"0"``.

    Returns:
        The duration in seconds (``0.25`` for ``"250ms"``).

    Raises:
        ValueError: ``text`` is not a duration; the message says why.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    if text == "0":
        return 0.0
    if not text:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    last_rank = -1
    while pos < len(text):
        match = _TERM.match(text, pos)
        if match is None:
            if text[pos:].replace(".", "", 1).isdigit():
                raise ValueError(f"{text[pos:]!r} has no unit")
            raise ValueError(f"cannot read {text[pos:]!r}")
        number, unit = match.groups()
        rank = _RANK[unit]
        if rank <= last_rank:
            raise ValueError(f"unit {unit!r} out of order or repeated (write the largest first)")
        last_rank = rank
        total += float(number) * UNITS[unit]
        pos = match.end()
    return total


def format_duration(seconds: float) -> str:
    """Format ``seconds`` the way :func:`parse_duration` reads it.

    Whole units are preferred (``600`` → ``"10m"``, ``5400`` → ``"1h30m"``);
    fractions of a second become milliseconds (``0.25`` → ``"250ms"``).
    ``format_duration(0)`` is ``"0s"``.

    Raises:
        ValueError: ``seconds`` is negative.
    """
    if seconds < 0:
        raise ValueError("negative duration")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in UNITS.items():
        unit_ms = round(size * 1000)
        count, millis = divmod(millis, unit_ms)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
