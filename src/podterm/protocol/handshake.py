"""The HTTP/1.1 WebSocket upgrade (RFC 6455 §4) on parsed request heads (sans-IO).

Nothing here reads or writes a socket: the server side turns an
``h11.Request`` or a :class:`~podterm.protocol.http_head.RequestHead` into an
:class:`UpgradeRequest` (or a :class:`HandshakeError` that says which HTTP
status to answer with) and builds the ``101`` (as an h11 event, or as bytes
with :func:`accept_bytes`) or the rejection; the client side builds the
``h11.Request`` and checks the answer.
``podterm.net.wsconn`` drives these over a trio stream.

Server rules, checked in this order (the first failure wins):

=====================================================  ======
condition                                              status
=====================================================  ======
method is not GET (§4.1, item 2)                       400
HTTP version below 1.1 (§4.1, item 1)                  400
no ``Upgrade: websocket`` (§4.2.1, item 3)             400
no ``upgrade`` token in ``Connection`` (item 4)        400
``Sec-WebSocket-Version`` missing or not 13 (item 6)   426 + ``Sec-WebSocket-Version: 13``
``Sec-WebSocket-Key`` missing, repeated, or not the
base64 of 16 bytes (item 5)                            400
``Origin`` refused by the caller's check (§10.2)       403
=====================================================  ======

Extensions: none is ever accepted.  A client offering permessage-deflate gets
a 101 without ``Sec-WebSocket-Extensions``, which RFC 6455 §9.1 defines as
"no extension in use"; every client then speaks plain frames.

Origin (§10.2, cross-site WebSocket hijacking): browsers send the page's
``Origin`` on every upgrade and let any page open a WebSocket to any host,
with the user's ambient credentials (cookies, a client certificate).
:class:`OriginPolicy` is the gateway's check: no ``Origin`` (kubectl, the
CLI, agents) passes, the gateway's own origin passes, a listed origin or
glob passes, and anything else is :class:`OriginRefused` (403).

Subprotocols: the server echoes exactly one offered subprotocol, or none.
The bearer-token carriers (``bearer.podterm.<b64url>`` and kube-apiserver's
``base64url.bearer.authorization.k8s.io.<b64url>``) are credentials, not
protocols: :func:`extract_bearer_subprotocol` takes them out of the offer, and
:func:`accept_response` refuses to echo one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11

from podterm.errors import HandshakeError, LocalProtocolError
from podterm.protocol.http_head import RequestHead

__all__ = [
    "BEARER_PREFIXES",
    "PODTERM_BEARER_PREFIX",
    "KUBE_BEARER_PREFIX",
    "OriginPolicy",
    "OriginRefused",
    "UpgradeRequest",
    "accept_bytes",
    "accept_key",
    "accept_response",
    "bearer_subprotocol",
    "build_request",
    "check_response",
    "extract_bearer_subprotocol",
    "normalize_origin",
    "parse_upgrade",
    "reject_response",
]

#: RFC 6455 §1.3: the GUID appended to the key before hashing.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: The only version RFC 6455 defines (§4.1: "MUST be 13").
WEBSOCKET_VERSION = "13"

#: podterm's bearer carrier (spec/podterm-protocol.md, "Transport").
PODTERM_BEARER_PREFIX = "bearer.podterm."
#: kube-apiserver's (``k8s.io/apiserver/pkg/authentication/request/websocket``).
KUBE_BEARER_PREFIX = "base64url.bearer.authorization.k8s.io."
BEARER_PREFIXES = (PODTERM_BEARER_PREFIX, KUBE_BEARER_PREFIX)

Header = tuple[bytes, bytes]
HeaderLike = tuple[bytes | str, bytes | str]


def _as_bytes(headers: Iterable[HeaderLike]) -> list[Header]:
    return [(n.encode("latin-1") if isinstance(n, str) else n,
             v.encode("latin-1") if isinstance(v, str) else v) for n, v in headers]


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` value (§4.2.2, item 5.4)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def _tokens(headers: Iterable[Header], name: bytes) -> list[str]:
    """Comma-separated tokens of every ``name`` header line, trimmed, in order.

    A header may be split over several lines (RFC 9110 §5.3); the Python
    kubernetes client sends ``v5.channel.k8s.io,v4.channel.k8s.io`` with no space.
    """
    return _split_tokens(_values(headers, name))


def _split_tokens(values: Iterable[bytes]) -> list[str]:
    out: list[str] = []
    for value in values:
        for part in value.split(b","):
            token = part.strip()
            if token:
                out.append(token.decode("latin-1"))
    return out


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request, as the server saw it.

    Attributes:
        target: the request target, e.g. ``/api/v1/sessions/x/attach?offset=0``.
        key: the ``Sec-WebSocket-Key`` value (base64 text, as sent).
        version: the ``Sec-WebSocket-Version`` (always ``"13"`` here).
        subprotocols: offered subprotocols, in the client's order of preference.
        origin: the ``Origin`` header, or None (non-browser clients send none).
        extensions: offered extensions (``Sec-WebSocket-Extensions`` items,
            parameters included); informational only: none is accepted.
        headers: every request header as h11 gives them (lower-case names).
    """

    target: str
    key: bytes
    version: str
    subprotocols: tuple[str, ...]
    origin: str | None
    extensions: tuple[str, ...]
    headers: tuple[Header, ...]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), lines joined by ``", "``; None if absent."""
        values = _values(self.headers, name.lower().encode("ascii"))
        return b", ".join(values).decode("latin-1") if values else None


def parse_upgrade(request: h11.Request | RequestHead, *,
                  origin_ok: Callable[[str | None], bool] | None = None) -> UpgradeRequest:
    """Validate a WebSocket upgrade request (server side).

    Args:
        request: the request head (h11's event, or ours).
        origin_ok: called with the ``Origin`` header (or None); False refuses
            the upgrade with 403.  None accepts every origin: kubectl and the
            Python client need no Origin check, browsers do (§10.2).

    Raises:
        HandshakeError: with ``http_status`` 400, 426 (and the
            ``Sec-WebSocket-Version: 13`` header to send) or 403; the message
            names what was wrong.
    """
    # One pass over the headers (each item access of h11's Headers sequence
    # is a method call); every rule below then looks names up in ``lines``.
    headers = tuple(request.headers)
    lines: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        found = lines.get(name)
        if found is None:
            lines[name] = [value]
        else:
            found.append(value)
    if request.method != b"GET":
        raise HandshakeError(
            f"a WebSocket upgrade must be a GET, not {request.method.decode('latin-1')}", 400)
    if request.http_version < b"1.1":
        raise HandshakeError(
            f"a WebSocket upgrade needs HTTP/1.1, not HTTP/{request.http_version.decode()}", 400)
    # Each rule tries the value every client sends first, then the general
    # token split (lists, several lines, any case).
    if not _lists(lines.get(b"upgrade"), b"websocket"):
        raise HandshakeError("missing 'Upgrade: websocket' header", 400)
    if not _lists(lines.get(b"connection"), b"upgrade"):
        raise HandshakeError("missing 'Connection: upgrade' header", 400)
    raw_versions = lines.get(b"sec-websocket-version")
    versions = ([WEBSOCKET_VERSION] if raw_versions == [b"13"]
                else _split_tokens(raw_versions or ()))
    if versions != [WEBSOCKET_VERSION]:
        got = ", ".join(versions) if versions else "none"
        # §4.2.2: "the server MUST ... send ... a |Sec-WebSocket-Version| header
        # field indicating the version(s) the server is capable of understanding."
        raise HandshakeError(f"unsupported Sec-WebSocket-Version {got}: this server speaks 13",
                             426, headers=[("Sec-WebSocket-Version", WEBSOCKET_VERSION)])
    keys = lines.get(b"sec-websocket-key", [])
    if len(keys) != 1:
        raise HandshakeError("expected exactly one Sec-WebSocket-Key header, got "
                             f"{len(keys)}", 400)
    key = keys[0].strip()
    try:
        nonce = binascii.a2b_base64(key, strict_mode=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeError("Sec-WebSocket-Key must be the base64 encoding of 16 bytes", 400)
    origins = lines.get(b"origin")
    origin = origins[0].decode("latin-1") if origins else None
    if origin_ok is not None and not origin_ok(origin):
        raise HandshakeError(f"origin {origin!r} is not allowed", 403)
    return UpgradeRequest(
        target=request.target.decode("latin-1"),
        key=key,
        version=WEBSOCKET_VERSION,
        subprotocols=tuple(_split_tokens(lines.get(b"sec-websocket-protocol", ()))),
        origin=origin,
        extensions=tuple(_split_tokens(lines.get(b"sec-websocket-extensions", ()))),
        headers=headers,
    )


def _lists(values: list[bytes] | None, token: bytes) -> bool:
    """Whether the header lines ``values`` list ``token`` (lower-case), in any case."""
    if not values:
        return False
    if len(values) == 1 and values[0].lower() == token:
        return True
    return any(part.strip().lower() == token for value in values for part in value.split(b","))


def _is_bearer(protocol: str) -> bool:
    return protocol.startswith(BEARER_PREFIXES)


def accept_response(upgrade: UpgradeRequest, subprotocol: str | None,
                    extra_headers: Iterable[HeaderLike] = ()) -> h11.InformationalResponse:
    """The ``101 Switching Protocols`` answer.

    Args:
        upgrade: the parsed request.
        subprotocol: one of ``upgrade.subprotocols`` to echo, or None.
        extra_headers: more response headers (e.g. ``Set-Cookie``).

    Raises:
        LocalProtocolError: ``subprotocol`` was not offered, is a bearer token,
            or ``extra_headers`` tries to accept an extension (we implement none).
    """
    headers: list[HeaderLike] = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", accept_key(upgrade.key)),
    ]
    if subprotocol is not None:
        if subprotocol not in upgrade.subprotocols:
            raise LocalProtocolError(f"subprotocol {subprotocol!r} was not offered")
        if _is_bearer(subprotocol):
            raise LocalProtocolError("a bearer-token subprotocol must never be echoed")
        headers.append((b"Sec-WebSocket-Protocol", subprotocol.encode("latin-1")))
    for name, value in extra_headers:
        lname = name.lower() if isinstance(name, str) else name.decode("latin-1").lower()
        if lname in ("sec-websocket-extensions", "sec-websocket-protocol",
                     "sec-websocket-accept", "upgrade", "connection"):
            raise LocalProtocolError(f"extra header {lname!r} is set by the handshake itself")
        headers.append((name, value))
    return h11.InformationalResponse(status_code=101, headers=_as_bytes(headers),
                                     reason=b"Switching Protocols")


#: The handshake's own headers: :func:`accept_bytes` refuses them as extras.
_RESERVED = frozenset({"sec-websocket-extensions", "sec-websocket-protocol",
                       "sec-websocket-accept", "upgrade", "connection"})
#: Header names and values :func:`accept_bytes` writes: a token, and no CR, LF or NUL.
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_HEADER_VALUE = re.compile(r"[^\r\n\x00]*")


def accept_bytes(upgrade: UpgradeRequest, subprotocol: str | None,
                 extra_headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The ``101 Switching Protocols`` answer as bytes: :func:`accept_response`
    without building (and validating) an h11 event, for the gateway's hot path.

    Byte for byte what h11 writes for :func:`accept_response`'s event.

    Raises:
        LocalProtocolError: as :func:`accept_response`, or a header name or
            value that would break the head.
    """
    out = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Accept: ", accept_key(upgrade.key), b"\r\n"]
    if subprotocol is not None:
        if subprotocol not in upgrade.subprotocols:
            raise LocalProtocolError(f"subprotocol {subprotocol!r} was not offered")
        if _is_bearer(subprotocol):
            raise LocalProtocolError("a bearer-token subprotocol must never be echoed")
        out += (b"Sec-WebSocket-Protocol: ", subprotocol.encode("latin-1"), b"\r\n")
    for name, value in extra_headers:
        if name.lower() in _RESERVED:
            raise LocalProtocolError(f"extra header {name.lower()!r} is set by the handshake "
                                     "itself")
        if _HEADER_NAME.fullmatch(name) is None or _HEADER_VALUE.fullmatch(value) is None:
            raise LocalProtocolError(f"illegal header {name!r}: {value!r}")
        out += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def reject_response(err: HandshakeError, *, body: bytes | None = None,
                    content_type: str = "text/plain; charset=utf-8") -> tuple[h11.Response, bytes]:
    """The HTTP answer to a refused upgrade, and its body.

    The body defaults to the error's message and a newline; pass ``body`` (and
    ``content_type``) for a Kubernetes ``Status`` JSON on the kube endpoints.
    The response says ``Connection: close``: a refused upgrade ends the connection.
    """
    if body is None:
        body = (err.message + "\n").encode("utf-8")
    headers: list[HeaderLike] = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    headers.extend(err.headers)
    return h11.Response(status_code=err.http_status, headers=_as_bytes(headers),
                        reason=_phrase(err.http_status)), body


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


# ----------------------------------------------------------------- client side


def build_request(host: str, target: str, *, subprotocols: Sequence[str] = (),
                  extra_headers: Iterable[HeaderLike] = (), key: bytes) -> h11.Request:
    """The client's upgrade request.

    Args:
        host: the ``Host`` header (``host`` or ``host:port``).
        target: path and query, e.g. ``/api/v1/sessions``.
        subprotocols: offered, in order of preference.
        extra_headers: e.g. ``Authorization``, ``Origin``.
        key: 16 random bytes (the nonce; randomness is the caller's); the
            header carries their base64 (§4.1, item 7).

    Raises:
        ValueError: ``key`` is not 16 bytes.
    """
    if len(key) != 16:
        raise ValueError("key must be 16 random bytes (RFC 6455 §4.1)")
    headers: list[HeaderLike] = [
        (b"Host", host.encode("idna") if not host.isascii() else host.encode("ascii")),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", base64.b64encode(key)),
        (b"Sec-WebSocket-Version", WEBSOCKET_VERSION.encode("ascii")),
    ]
    if subprotocols:
        headers.append((b"Sec-WebSocket-Protocol", ", ".join(subprotocols).encode("latin-1")))
    headers.extend(extra_headers)
    return h11.Request(method=b"GET", target=target.encode("latin-1"),
                       headers=_as_bytes(headers))


def check_response(response: h11.InformationalResponse | h11.Response, key: bytes,
                   offered: Sequence[str]) -> str | None:
    """Check the server's answer (client side); return the chosen subprotocol or None.

    Args:
        response: what h11 parsed.
        key: the 16 bytes given to :func:`build_request`.
        offered: the subprotocols offered.

    Raises:
        HandshakeError: not a 101 (``http_status`` is the server's status), a
            missing ``Upgrade``/``Connection``, a wrong ``Sec-WebSocket-Accept``,
            a subprotocol we did not offer (or several), or any extension (we
            offer none, so §4.1 says the client MUST fail).
    """
    status = response.status_code
    if status != 101:
        raise HandshakeError(f"server answered HTTP {status} instead of 101", status)
    headers = response.headers
    if "websocket" not in (t.lower() for t in _tokens(headers, b"upgrade")):
        raise HandshakeError("101 response without 'Upgrade: websocket'", 101)
    if "upgrade" not in (t.lower() for t in _tokens(headers, b"connection")):
        raise HandshakeError("101 response without 'Connection: upgrade'", 101)
    accepts = _values(headers, b"sec-websocket-accept")
    if accepts != [accept_key(base64.b64encode(key))]:
        raise HandshakeError("wrong or missing Sec-WebSocket-Accept", 101)
    extensions = _tokens(headers, b"sec-websocket-extensions")
    if extensions:
        raise HandshakeError(f"server accepted extension {extensions[0]!r}, which was not offered",
                             101)
    chosen = _tokens(headers, b"sec-websocket-protocol")
    if not chosen:
        return None
    if len(chosen) > 1 or chosen[0] not in offered:
        raise HandshakeError(f"server chose subprotocol {', '.join(chosen)!r}, which was not "
                             "offered", 101)
    return chosen[0]


# -------------------------------------------------------------- bearer tokens


def bearer_subprotocol(token: str, prefix: str = PODTERM_BEARER_PREFIX) -> str:
    """The subprotocol that carries ``token``: ``prefix`` + unpadded base64url.

    Unpadded, because ``=`` is not a token character (RFC 9110 §5.6.2) and a
    subprotocol must be a token (RFC 6455 §4.1).  Browsers cannot set an
    ``Authorization`` header on a WebSocket; they offer this next to the real
    subprotocol (``podterm.v1``), which the server echoes, as browsers fail a
    handshake that offered subprotocols and got none back.
    """
    return prefix + base64.urlsafe_b64encode(token.encode("utf-8")).rstrip(b"=").decode("ascii")


def extract_bearer_subprotocol(offered: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split a bearer-token carrier out of the offered subprotocols.

    Recognizes ``bearer.podterm.<base64url(token)>`` and kube-apiserver's
    ``base64url.bearer.authorization.k8s.io.<base64url(token)>``, padded or not.

    Returns:
        ``(token, remaining)``: the decoded token (None if none was offered)
        and the other subprotocols in their order.  The server chooses among
        ``remaining`` only; the carrier is never echoed.

    Raises:
        HandshakeError: 400 if two carriers are offered or one does not decode
            to base64url of UTF-8 text.
    """
    token: str | None = None
    remaining: list[str] = []
    for protocol in offered:
        if not _is_bearer(protocol):
            remaining.append(protocol)
            continue
        if token is not None:
            raise HandshakeError("more than one bearer-token subprotocol offered", 400)
        prefix = next(p for p in BEARER_PREFIXES if protocol.startswith(p))
        encoded = protocol[len(prefix):]
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            if base64.urlsafe_b64encode(raw).rstrip(b"=") != encoded.rstrip("=").encode("ascii"):
                raise ValueError("not canonical base64url")
            token = raw.decode("utf-8")
        except (binascii.Error, ValueError) as exc:  # UnicodeError is a ValueError
            raise HandshakeError("bearer-token subprotocol is not base64url of a UTF-8 token",
                                 400) from exc
        if not token:
            raise HandshakeError("bearer-token subprotocol carries an empty token", 400)
    return token, remaining


# -------------------------------------------------------------------- Origin

#: RFC 6454 §4: a scheme's default port is left out of its serialized origin.
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
#: ``scheme://host[:port]`` as browsers serialize an origin (RFC 6454 §6.2):
#: lower-case, ASCII (IDNs in punycode), never a path, user or query.
_ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
                     r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?")
#: A pattern: the same, with ``*`` allowed in the host and the port.
_PATTERN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
                      r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._*-]+)(?::(?P<port>[0-9]{1,5}|\*))?")
#: ``Host`` header: ``host[:port]`` (RFC 9110 §7.2), IPv6 in brackets.
_HOST = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?")
#: Origins longer than this are refused unread (and cut in messages): no real
#: origin comes close (a 253-character host name, a scheme and a port).
MAX_ORIGIN_CHARS = 512


def _host_key(host: str) -> str:
    """A host for comparison: a fully qualified name's trailing dot does not count."""
    return host[:-1] if host.endswith(".") and not host.startswith("[") else host


def normalize_origin(origin: str) -> str | None:
    """``origin`` serialized as RFC 6454 does, or None when it is not one.

    Lower-cased, and the scheme's default port dropped
    (``HTTPS://Example.com:443`` → ``https://example.com``).  ``null`` (a
    sandboxed frame, a ``file:`` page), anything with a path, user
    information, a query or a port above 65535 is not an origin here.
    """
    if len(origin) > MAX_ORIGIN_CHARS:
        return None
    match = _ORIGIN.fullmatch(origin.strip().lower())
    if match is None:
        return None
    scheme, host, port = match.group("scheme", "host", "port")
    if port is not None:
        number = int(port)
        if number > 65535:
            return None
        if number == _DEFAULT_PORTS.get(scheme):
            port = None
        else:
            port = str(number)
    return f"{scheme}://{_host_key(host)}" + (f":{port}" if port is not None else "")


class OriginRefused(HandshakeError):
    """An upgrade from a browser page whose origin may not open a WebSocket here (403).

    Attributes:
        origin: the ``Origin`` header as sent (cut to :data:`MAX_ORIGIN_CHARS`),
            for the audit event.
    """

    def __init__(self, message: str, origin: str) -> None:
        super().__init__(message, 403)
        self.origin = origin[:MAX_ORIGIN_CHARS]


class OriginPolicy:
    """Which browser origins may open a WebSocket to the gateway.

    An upgrade is allowed when:

    1. it has no ``Origin`` header: not a browser (kubectl, the podterm CLI,
       agents), which cannot be made to connect by a foreign page anyway;
    2. its origin is the gateway's own: same host and port as the request's
       ``Host`` header (a ``Host`` without a port matches the origin
       scheme's default port).  Over TLS the origin must be ``https``; over
       plain HTTP it may be either, because a TLS-terminating balancer in
       front turns the browser's ``https`` page into a plain request;
    3. its origin matches one of ``patterns``: an exact origin
       (``https://console.example.com``, ``http://localhost:3000``) or a
       glob where ``*`` stands for any run of characters inside the host or
       the port, never across ``://`` or ``:`` (``https://*.example.com``,
       ``http://localhost:*``); ``*`` alone allows every origin, ``null``
       allows the ``null`` origin of sandboxed frames and local files.

    Args:
        patterns: allowed origins besides the gateway's own (none by default).

    Raises:
        ValueError: a pattern that is not ``*``, ``null``, or
            ``scheme://host[:port]`` (with ``*`` globs); the message names it.
    """

    __slots__ = ("patterns", "_any", "_null", "_exact", "_globs")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        self._any = False
        self._null = False
        exact: set[str] = set()
        globs: list[re.Pattern[str]] = []
        for pattern in self.patterns:
            text = pattern.strip().lower()
            if text == "*":
                self._any = True
                continue
            if text == "null":
                self._null = True
                continue
            match = _PATTERN.fullmatch(text)
            if match is None or len(text) > MAX_ORIGIN_CHARS:
                raise ValueError(f"invalid origin pattern {pattern!r}: expected "
                                 "scheme://host[:port] (e.g. https://console.example.com, "
                                 "https://*.example.com, http://localhost:*), '*' or 'null'")
            scheme, host, port = match.group("scheme", "host", "port")
            if port is not None and port != "*":
                if int(port) > 65535:
                    raise ValueError(f"invalid origin pattern {pattern!r}: port above 65535")
                port = None if int(port) == _DEFAULT_PORTS.get(scheme) else str(int(port))
            host = _host_key(host)
            if "*" not in host and port != "*":
                exact.add(f"{scheme}://{host}" + (f":{port}" if port is not None else ""))
                continue
            # '*' matches inside the host (letters, digits, '.', '-', '_') or
            # inside the port (digits): never ':' or '/', so a glob cannot
            # reach past the part it was written in.
            host_re = "[a-z0-9._-]*".join(re.escape(part) for part in host.split("*"))
            port_re = "" if port is None else (":[0-9]+" if port == "*" else re.escape(f":{port}"))
            globs.append(re.compile(re.escape(f"{scheme}://") + host_re + port_re))
        self._exact = frozenset(exact)
        self._globs = tuple(globs)

    def __repr__(self) -> str:
        return f"<OriginPolicy same-origin + {list(self.patterns)!r}>"

    @staticmethod
    def is_same_origin(origin: str, host: str | None, *, tls: bool) -> bool:
        """True when ``origin`` is the origin the request was sent to (rule 2 above)."""
        normalized = normalize_origin(origin)
        if normalized is None or host is None:
            return False
        head = _HOST.fullmatch(host.strip().lower())
        if head is None:
            return False
        parts = _ORIGIN.fullmatch(normalized)
        assert parts is not None  # normalize_origin's output is an origin
        scheme, origin_host, origin_port = parts.group("scheme", "host", "port")
        if scheme not in (("https", "wss") if tls else ("http", "https", "ws", "wss")):
            return False
        if origin_host != _host_key(head.group("host")):
            return False
        wanted = head.group("port")
        if wanted is None:
            # No port in Host: the browser used the scheme's default port,
            # which normalize_origin has left out.
            return origin_port is None
        effective = int(origin_port) if origin_port else _DEFAULT_PORTS.get(scheme)
        return effective == int(wanted)

    def allows(self, origin: str | None, host: str | None, *, tls: bool) -> bool:
        """Whether an upgrade with this ``Origin`` (None: absent) and ``Host`` may proceed."""
        if origin is None or self._any:
            return True
        if origin.strip().lower() == "null":
            return self._null
        if self.is_same_origin(origin, host, tls=tls):
            return True
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        return normalized in self._exact or any(g.fullmatch(normalized) for g in self._globs)

    def check(self, origin: str | None, host: str | None, *, tls: bool) -> None:
        """Raise :class:`OriginRefused` (403) unless :meth:`allows`."""
        if self.allows(origin, host, tls=tls):
            return
        assert origin is not None
        shown = origin[:100] + ("..." if len(origin) > 100 else "")
        listed = ("only the gateway's own origin may" if not self.patterns else
                  "only the gateway's own origin and the allowed origins may")
        raise OriginRefused(f"origin {shown!r} may not open a WebSocket here: {listed} "
                            "(see --allowed-origins)", origin)
