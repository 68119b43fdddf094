"""A strict, bounded HTTP/1.1 request-head parser (sans-IO, one pass over the bytes).

The gateway reads every request head with :func:`parse_request_head` instead
of building an ``h11.Connection`` per request: the head of a WebSocket upgrade
is all the HTTP such a connection ever speaks, and h11's generality (a state
machine, event objects, header validation on both the head and our own
``101``) was the largest single cost of a handshake (docs/benchmarks.md,
"Handshakes with bearer-token authentication").  h11 still reads request
*bodies* (``podterm.gateway.http``), fed the same head bytes, so what this
parser accepts must be a subset of what h11 accepts, and it refuses with
the status h11 would hint:

===============================================================  ======
condition                                                        status
===============================================================  ======
no end of head (an empty line) within ``max_bytes``              431
a blank line where the request line belongs                     400
request line not ``token SP 1*VCHAR SP HTTP/d.d``                400
an incomplete head whose first byte is a control or space        400
(h11's early "obviously invalid" check: a TLS hello on plain HTTP)
header line not ``token ":" OWS value OWS``, a continuation
line first                                                       400
HTTP/1.1 without ``Host``, or more than one ``Host``             400
``Content-Length`` not digits, over 20 digits, or conflicting    400
``Transfer-Encoding`` other than ``chunked``, or repeated        501
an HTTP major version other than 1 (RFC 9110 §15.6.6)            505
===============================================================  ======

The one deliberate difference from h11: h11 answers 431 only while a head is
still incomplete beyond its bound, so a longer head that arrives in one read
passes; here a head that does not end within ``max_bytes`` is refused
however it arrived.  The parser never looks at a byte past ``max_bytes``.

Obsolete line folding (RFC 9112 §5.2) is unfolded as h11 does; bare ``LF``
line ends are accepted as h11 does (RFC 9112 §2.2 allows it).
"""

from __future__ import annotations

import re
from typing import Final

from podterm.errors import CloseCode, ProtocolViolation

__all__ = ["HeadError", "RequestHead", "find_head_end", "parse_request_head"]

#: The end of a head: an empty line, ``CRLF CRLF`` or bare ``LF LF`` (h11's rule).
_END = re.compile(rb"\n\r?\n")
#: RFC 9110 §5.6.2 token; RFC 9112 §3 request line (h11's ``_abnf``).
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
#: ``field-name ":" OWS field-value OWS``; a value is visible characters and
#: obs-text separated by single runs of SP/HTAB (RFC 9110 §5.5).
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
#: One whole field line, from a line start to its LF (the fast path): each
#: match is one line, so as many matches as LFs means every line is valid.
_FIELD_LINE = re.compile(rb"(?m)^(" + _TOKEN + rb"):[ \t]*"
                         rb"((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*\r?\n")
#: Names the parser looks into; every other field is passed through.
_SPECIAL = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                      b"expect"})
_DIGITS = re.compile(rb"[0-9]+")
#: h11's bound on a Content-Length (``CONTENT_LENGTH_MAX_DIGITS``).
_MAX_LENGTH_DIGITS: Final = 20


class HeadError(ProtocolViolation):
    """The request head is not acceptable HTTP/1.1; answer ``http_status`` and close."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message, CloseCode.PROTOCOL_ERROR, http_status=http_status)


class RequestHead:
    """A parsed request line and header block.

    The attributes are those of ``h11.Request``, with the same types and
    meanings, so code written against h11's event reads this too.

    Attributes:
        method: as sent (case-sensitive), e.g. ``b"GET"``.
        target: the request target as sent, e.g. ``b"/api/v1/sessions?x=1"``.
        http_version: ``b"1.1"`` or ``b"1.0"``.
        headers: ``(lower-case name, value)`` pairs in order; values without
            surrounding whitespace; ``Content-Length`` once, normalized;
            ``Transfer-Encoding`` lower-cased (h11's normalization).
        size: the head's length in bytes, its final empty line included.
        has_body: whether the request announces a body (``Content-Length``
            other than 0, or ``Transfer-Encoding``).
        expects_continue: an HTTP/1.1 ``Expect: 100-continue``.
        keep_alive: neither HTTP/1.0 nor ``Connection: close`` (h11's rule).
    """

    __slots__ = ("method", "target", "http_version", "headers", "size", "has_body",
                 "expects_continue", "keep_alive")

    def __init__(self, method: bytes, target: bytes, http_version: bytes,
                 headers: list[tuple[bytes, bytes]], size: int, *, has_body: bool = False,
                 expects_continue: bool = False, keep_alive: bool = True) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.size = size
        self.has_body = has_body
        self.expects_continue = expects_continue
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return (f"<RequestHead {self.method.decode('latin-1')} "
                f"{self.target[:80].decode('latin-1')!r} HTTP/{self.http_version.decode()} "
                f"headers={len(self.headers)} size={self.size}>")


def _find_end(data: bytes | bytearray, max_bytes: int, start: int) -> re.Match[bytes] | None:
    if data[:1] == b"\n" or (max_bytes > 1 and data[:2] == b"\r\n"):
        raise HeadError("no request line received")
    match = _END.search(data, max(0, start - 2), max_bytes)
    if match is not None:
        return match
    if data and data[0] < 0x21:
        raise HeadError("illegal request line")
    if len(data) >= max_bytes:
        raise HeadError(f"request head larger than {max_bytes} bytes", 431)
    return None


def find_head_end(data: bytes | bytearray, max_bytes: int, start: int = 0) -> int:
    """Where the head in ``data`` ends (the offset after its empty line), or -1.

    Args:
        data: the bytes received so far, the head first.
        max_bytes: the bound: no byte at or past it is looked at.
        start: where to resume the search (bytes before it were searched already;
            the search backs up 2 bytes for a terminator split across reads).

    Raises:
        HeadError: 400 when the bytes cannot start a request line (see the
            module table); 431 when ``max_bytes`` bytes hold no end of head.
    """
    match = _find_end(data, max_bytes, start)
    return -1 if match is None else match.end()


def parse_request_head(data: bytes | bytearray, max_bytes: int,
                       start: int = 0) -> RequestHead | None:
    """Parse the request head at the start of ``data``.

    Args:
        data: the bytes received so far.
        max_bytes: the most the head may take, its final empty line included.
        start: as :func:`find_head_end` (an optimization for repeated calls).

    Returns:
        The head (``size`` says where the next bytes begin), or None when
        ``data`` does not hold a whole head yet and may still grow.

    Raises:
        HeadError: with the status of the module table; nothing else.
    """
    end_match = _find_end(data, max_bytes, start)
    if end_match is None:
        return None
    end = end_match.end()
    head = bytes(data[:end])
    # The request line, then the field block: every field line with its LF,
    # up to (not including) the empty line.
    line_end = head.index(b"\n")
    first = head[:line_end - 1] if head[line_end - 1:line_end] == b"\r" else head[:line_end]
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        raise HeadError(f"illegal request line: {_shown(first)}")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise HeadError(f"HTTP/{major.decode()}.{minor.decode()} is not supported: "
                        "this server speaks HTTP/1.1", 505)
    version = major + b"." + minor
    block = head[line_end + 1:end_match.start() + 1]
    # The common case in one C call: every line of the block is a field
    # line (no folding, nothing malformed), which one findall checks and splits.
    fields: list[tuple[bytes, bytes]] = _FIELD_LINE.findall(block)
    if len(fields) != block.count(b"\n"):
        fields = _fields_slowly(block)
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    length: bytes | None = None
    chunked = False
    connection_close = False
    expect_continue = False
    for raw_name, value in fields:
        name = raw_name.lower()
        if name in _SPECIAL:
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                values = {v.strip() for v in value.split(b",")}
                if len(values) != 1:
                    raise HeadError("conflicting Content-Length headers")
                value = values.pop()
                if _DIGITS.fullmatch(value) is None or len(value) > _MAX_LENGTH_DIGITS:
                    raise HeadError("bad Content-Length")
                if length is not None:
                    if length != value:
                        raise HeadError("conflicting Content-Length headers")
                    continue  # h11 keeps the first of equal lines
                length = value
            elif name == b"transfer-encoding":
                if chunked:
                    raise HeadError("multiple Transfer-Encoding headers", 501)
                value = value.lower()
                if value != b"chunked":
                    raise HeadError("Only Transfer-Encoding: chunked is supported", 501)
                chunked = True
            elif name == b"connection":
                connection_close = connection_close or _has_token(value, b"close")
            else:  # expect
                expect_continue = expect_continue or _has_token(value, b"100-continue")
        headers.append((name, value))
    if hosts > 1:
        raise HeadError("Found multiple Host: headers")
    if hosts == 0 and version == b"1.1":
        raise HeadError("Missing mandatory Host: header")
    old = version < b"1.1"
    return RequestHead(method, target, version, headers, end,
                       has_body=chunked or (length is not None and int(length) > 0),
                       expects_continue=expect_continue and not old,
                       keep_alive=not (old or connection_close))


def _fields_slowly(block: bytes) -> list[tuple[bytes, bytes]]:
    """The field lines of ``block`` one at a time: obs-fold, and the error for a bad line."""
    lines = block.split(b"\n")
    del lines[-1]  # after the last LF
    out: list[tuple[bytes, bytes]] = []
    index = 0
    count = len(lines)
    while index < count:
        line = lines[index]
        index += 1
        if line[-1:] == b"\r":
            line = line[:-1]
        # obs-fold: continuation lines join the field before them (RFC 9112 §5.2).
        while index < count and lines[index][:1] in (b" ", b"\t"):
            more = lines[index]
            if more[-1:] == b"\r":
                more = more[:-1]
            line = line + b" " + more.lstrip(b" \t")
            index += 1
        if line[:1] in (b" ", b"\t"):
            raise HeadError("continuation line at start of headers")
        field = _FIELD.fullmatch(line)
        if field is None:
            raise HeadError(f"illegal header line: {_shown(line)}")
        out.append((field.group(1), field.group(2)))
    return out


def _has_token(value: bytes, token: bytes) -> bool:
    """Whether the comma-separated ``value`` lists ``token`` (case-insensitive)."""
    return any(part.strip().lower() == token for part in value.split(b","))


def _shown(line: bytes) -> str:
    """A line for an error message: cut, and safe to print."""
    text = line[:100].decode("latin-1")
    return repr(text + ("..." if len(line) > 100 else ""))
