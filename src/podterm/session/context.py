"""A shell's context (cwd, env): learn it from output, restore it after a restart.

When a container restarts the shell is gone but its context is in the store;
the session starts a new shell in the same directory with the same variables
(ARCHITECTURE.md, "Sessions: how they survive").  Two sources of the cwd:

- the upstream's ``capture_context()`` (the local upstream reads
  ``/proc/<pid>/cwd``; remote upstreams may not know it);
- OSC 7, ``ESC ] 7 ; file://HOST/PATH (BEL | ESC \\)``, which many shells and
  prompts emit on every directory change (fish, zsh with vte.sh, bash with
  ``PROMPT_COMMAND``).  :class:`Osc7Tracker` watches the output stream for it.

Pure: no I/O.  :class:`Osc7Tracker` takes output chunks split anywhere.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import unquote_to_bytes, urlsplit

from ..protocol._types import Buffer
from ..upstream.base import Context, StreamSpec

__all__ = ["Osc7Tracker", "merge_context", "parse_osc7", "restore_spec"]

_INTRO = b"\x1b]7;"  # OSC (ESC ]) followed by the Ps parameter 7 and ';'
_BEL = b"\x07"  # xterm: BEL terminates an OSC
_ESC = b"\x1b"  # ECMA-48: ST is ESC \ (any ESC ends the string)

# PATH_MAX on Linux is 4096; a percent-encoded path can be three times longer.
_DEFAULT_MAX_URI_BYTES = 3 * 4096 + 256


def parse_osc7(payload: bytes) -> tuple[str, str] | None:
    """Parse an OSC 7 payload ``file://HOST/PATH`` into ``(host, path)``.

    The path is percent-decoded and decoded as UTF-8 (undecodable bytes are
    kept with ``surrogateescape``, as ``os.fsdecode`` does).  Returns ``None``
    for anything that is not an absolute ``file:`` URI.
    """
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = urlsplit(text)
    if parts.scheme != "file" or not parts.path.startswith("/"):
        return None
    path = unquote_to_bytes(parts.path).decode("utf-8", "surrogateescape")
    return parts.netloc, path


class Osc7Tracker:
    """Watches terminal output for OSC 7 and remembers the last directory reported.

    Feed it every output chunk (splits anywhere are fine).  The common case, a
    chunk without ``ESC ] 7 ;``, costs one ``bytes.find``.

    Args:
        max_uri_bytes: an OSC 7 longer than this is ignored (bounded memory
            against a program that prints an endless escape sequence).
    """

    __slots__ = ("_collecting", "_max", "_skipping", "_tail", "cwd", "host", "updates")

    def __init__(self, max_uri_bytes: int = _DEFAULT_MAX_URI_BYTES) -> None:
        self._max = max_uri_bytes
        self._collecting: bytearray | None = None  # inside an OSC 7: the URI so far
        self._skipping = False  # inside an OSC 7 that grew too long: drop it to its end
        self._tail = b""  # a proper prefix of _INTRO that ended the previous chunk
        self.cwd: str | None = None
        self.host: str | None = None
        self.updates = 0

    def __repr__(self) -> str:
        return f"<Osc7Tracker cwd={self.cwd!r} host={self.host!r} updates={self.updates}>"

    def feed(self, data: Buffer) -> None:
        """Scan one output chunk."""
        chunk = data if isinstance(data, bytes) else bytes(data)
        pos = 0
        if self._tail:
            need = len(_INTRO) - len(self._tail)
            joined = self._tail + chunk[:need]
            self._tail = b""
            if joined == _INTRO:
                self._collecting = bytearray()
                pos = need
            elif len(chunk) < need and _INTRO.startswith(joined):
                self._tail = joined  # still only a prefix: a tiny chunk
                return
        while True:
            if self._collecting is not None or self._skipping:
                pos = self._collect(chunk, pos)
                if pos < 0:
                    return  # the URI continues in the next chunk
            start = chunk.find(_INTRO, pos)
            if start < 0:
                self._tail = _partial_intro_suffix(chunk, pos)
                return
            self._collecting = bytearray()
            pos = start + len(_INTRO)

    def _collect(self, chunk: bytes, pos: int) -> int:
        """Take URI bytes from ``chunk[pos:]``.

        Returns the position after the terminator, or -1 when the chunk ended first.
        """
        ends = [i for i in (chunk.find(_BEL, pos), chunk.find(_ESC, pos)) if i >= 0]
        end = min(ends) if ends else len(chunk)
        if self._collecting is not None:
            if len(self._collecting) + (end - pos) > self._max:
                # Too long to be a path: ignore this sequence up to its terminator.
                self._collecting = None
                self._skipping = True
            else:
                self._collecting += chunk[pos:end]
        if not ends:
            return -1
        collected, self._collecting, self._skipping = self._collecting, None, False
        if collected is not None:
            parsed = parse_osc7(bytes(collected))
            if parsed is not None:
                self.host, self.cwd = parsed
                self.updates += 1
        return end + 1


def _partial_intro_suffix(chunk: bytes, pos: int) -> bytes:
    """The longest proper prefix of ``_INTRO`` that ``chunk[pos:]`` ends with."""
    for size in range(min(len(_INTRO) - 1, len(chunk) - pos), 0, -1):
        if chunk.endswith(_INTRO[:size]):
            return _INTRO[:size]
    return b""


def merge_context(captured: Context, tracker: Osc7Tracker | None) -> Context:
    """Combine the upstream's view with what OSC 7 reported.

    The upstream's cwd wins when it has one (``/proc`` is the truth for a local
    shell, while OSC 7 may come from a nested ``ssh`` on another host); OSC 7
    fills in where the upstream cannot see the shell.
    """
    if captured.cwd is not None or tracker is None or tracker.cwd is None:
        return captured
    return Context(cwd=tracker.cwd, env=captured.env)


def restore_spec(spec: StreamSpec, context: Context) -> StreamSpec:
    """The spec for a new shell that continues ``context``.

    The saved directory replaces the spec's; saved variables apply under the
    spec's own (an explicit request wins over a remembered value).
    """
    env = {**context.env, **spec.env}
    return dataclasses.replace(spec, cwd=context.cwd or spec.cwd, env=env)
