"""The web terminal's files (``gateway/web/``), served from memory.

Every file under the directory is read once, at start-up, into a table keyed
by its URL path (``/`` is ``index.html``; the page uses relative URLs such as
``vendor/xterm.js``, so each file is served at its own path).  A request can
only ever get a file that is in that table: there is no path joining at
request time, so ``..``, ``%2e%2e``, symlinks out of the tree and absolute
paths cannot reach anything else.

Caching: every answer has a strong ``ETag`` (SHA-256 of the content) and
honours ``If-None-Match`` with 304.  ``index.html`` is ``no-cache`` (always
revalidated, so a new gateway's page is picked up at once); the rest may be
cached for an hour, then revalidated.  HTML is sent with a Content Security
Policy that allows only this origin (the page needs inline styles for
xterm.js and ``ws:``/``wss:`` for its WebSocket).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from podterm.gateway.http import Request, Response, error_response

__all__ = ["StaticFile", "StaticFiles", "WEB_DIR"]

log = logging.getLogger(__name__)

#: Where the page lives in the installed package.
WEB_DIR = Path(__file__).with_name("web")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}

#: Files larger than this are not served (the page is ~0.5 MiB in all; a stray
#: large file in the directory must not be pinned in memory).
MAX_FILE_BYTES = 8 * 1024 * 1024

_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self' ws: wss:; "
        "frame-ancestors 'none'; base-uri 'self'; form-action 'self'")


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file's bytes and headers, computed once."""

    body: bytes
    content_type: str
    etag: str
    cache_control: str


class StaticFiles:
    """Serves a directory's files from memory (see the module docstring).

    Args:
        root: the directory; missing means no page (every path is 404, and a
            warning says how to build it).
    """

    __slots__ = ("root", "_files")

    def __init__(self, root: Path = WEB_DIR) -> None:
        self.root = root
        self._files: dict[str, StaticFile] = {}
        self._load()

    def __repr__(self) -> str:
        return f"<StaticFiles {self.root} files={len(self._files)}>"

    def __len__(self) -> int:
        return len(self._files)

    def _load(self) -> None:
        root = self.root
        if not root.is_dir():
            log.warning("web.static.missing: %s does not exist; the web terminal is off", root)
            return
        real_root = root.resolve()
        for dirpath, dirnames, filenames in os.walk(real_root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath, name)
                suffix = path.suffix.lower()
                ctype = _TYPES.get(suffix)
                if ctype is None:
                    continue  # LICENSE files and the like: not part of the page
                resolved = path.resolve()
                if not resolved.is_relative_to(real_root):
                    continue  # a symlink out of the tree
                try:
                    if resolved.stat().st_size > MAX_FILE_BYTES:
                        continue
                    body = resolved.read_bytes()
                except OSError as exc:
                    log.warning("web.static.unreadable: %s: %s", path, exc)
                    continue
                rel = path.relative_to(real_root).as_posix()
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                cache = "no-cache" if suffix == ".html" else "public, max-age=3600"
                self._files["/" + rel] = StaticFile(body, ctype, etag, cache)
        if "/index.html" in self._files:
            self._files["/"] = self._files["/index.html"]
        else:
            log.warning("web.static.missing: %s has no index.html; the web terminal is off", root)

    def has(self, path: str) -> bool:
        """True when ``path`` (a URL path) names a served file."""
        return path in self._files

    def serve(self, request: Request) -> Response:
        """Answer a GET or HEAD for one file (404 when it is not served)."""
        item = self._files.get(request.path)
        if item is None:
            return error_response(404, f"no such page {request.path!r}")
        headers: list[tuple[str, str]] = [
            ("ETag", item.etag),
            ("Cache-Control", item.cache_control),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ]
        if item.content_type.startswith("text/html"):
            headers += [("Content-Security-Policy", _CSP), ("X-Frame-Options", "DENY")]
        inm = request.headers.get("if-none-match")
        if inm is not None and (inm.strip() == "*" or item.etag in
                                (t.strip().removeprefix("W/") for t in inm.split(","))):
            return Response(304, b"", item.content_type, tuple(headers))
        return Response(200, item.body, item.content_type, tuple(headers))
