"""The real client address: socket peer, PROXY header, trusted forwarding headers.

Behind a load balancer the TCP peer is the balancer.  Who the client really
was reaches the gateway in one of two ways, and each is believed only from a
source that is allowed to say it:

1. **PROXY protocol** (L4 balancers: HAProxy ``send-proxy[-v2]``, AWS NLB,
   nginx ``proxy_protocol``), read by :func:`receive_proxy_header` before any
   HTTP or TLS byte.  Honoured only when the listener has ``proxy_protocol``
   on (proxy-protocol.txt §5: "must only rely on a configuration parameter"),
   and, when ``trusted_proxies`` is set, only from a socket peer inside it
   (config.md: an empty list means any peer may send it).  A LOCAL header (the
   balancer's health check), v1 UNKNOWN and v2 UNSPEC keep the socket peer.

2. **X-Forwarded-For** or **Forwarded** (RFC 7239), written by L7 proxies.
   Honoured only when the address found so far (the socket peer, or the PROXY
   header's client) is inside ``trusted_proxies``; an empty list trusts no
   header, so a client can never spoof one by default.  The list is walked
   from the right, the standard algorithm (nginx ``real_ip_recursive on``):
   each trusted hop vouches for the entry to its left; the first address that
   is not trusted is the client.  An entry that is not an address (RFC 7239
   ``unknown`` and obfuscated ``_identifiers``, garbage, a missing ``for=``)
   stops the walk: the client is then the nearest address that could be
   verified.  A malformed header is never an error: it just stops the walk.

   Only **one** of the two headers is read (``ClientAddressPolicy
   .forwarded_header``, X-Forwarded-For by default).  A trusted proxy appends
   to the header it writes and passes the other one through untouched, so the
   other one is wholly the client's to forge; reading both would let a client
   pick whichever lies best.

The result, :class:`ClientAddress`, names where it came from (``via``), for
logs, audit ``source_addr``, per-address limits and ``/metrics``.

:func:`resolve_connection` gives the connection's address (socket + PROXY)
once, at accept; :func:`resolve_request` refines it per HTTP request from the
headers; :func:`resolve_client` does both.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import trio

from podterm.net.hostport import join_host_port
from podterm.protocol.proxy_header import ProxyHeaderParser, ProxyResult

if TYPE_CHECKING:
    from podterm.config import ListenConfig

__all__ = [
    "Via", "ClientAddress", "TrustedProxies", "ForwardedHeader", "ClientAddressPolicy",
    "resolve_connection", "resolve_request", "resolve_client",
    "parse_x_forwarded_for", "parse_forwarded",
    "PrefixedStream", "receive_proxy_header",
]

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: What a header source may be: a Mapping (podterm.gateway.http.Request.headers,
#: repeated fields joined by ", ") or (name, value) pairs (h11's event.headers).
HeaderSource = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]


class Via(StrEnum):
    """Where a :class:`ClientAddress` came from."""

    SOCKET = "socket"  # getpeername(): no proxy, or none believed
    PROXY_PROTOCOL = "proxy-protocol"  # the PROXY header's source address
    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"  # RFC 7239


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """The client's address as the gateway believes it.

    Attributes:
        ip: canonical text (``ipaddress``); IPv4-mapped IPv6 is shown as IPv4,
            so ``10.0.0.1`` means the same client on a dual-stack listener.
        port: the client's port, or None when the source gave none (most
            X-Forwarded-For entries).
        via: where the address came from.
    """

    ip: str
    port: int | None
    via: Via

    def __str__(self) -> str:
        """``ip:port``, ``[v6]:port`` or bare ``ip``: the audit ``source_addr`` form."""
        if self.port is None:
            return self.ip
        return join_host_port(self.ip, self.port)


@functools.lru_cache(maxsize=4096)  # the same few peers (load balancers) connect again and again
def _ip(text: str) -> _IP | None:
    """Parse an address; unwrap IPv4-mapped IPv6; None if it is not one (or has a zone)."""
    if "%" in text:
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """A set of networks whose forwarded-address claims are believed.

    Args:
        cidrs: networks as text (``"10.0.0.0/8"``, ``"fd00::/8"``, a bare
            address means a /32 or /128) or ``ipaddress`` networks; host bits
            are allowed, as config.py's ``_cidrs`` allows them.

    Raises:
        ValueError: an entry that is not a network.
    """

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str | _Network] = ()) -> None:
        networks: list[_Network] = []
        for cidr in cidrs:
            networks.append(cidr if isinstance(cidr, (ipaddress.IPv4Network,
                                                      ipaddress.IPv6Network))
                            else ipaddress.ip_network(cidr, strict=False))
        self.networks: tuple[_Network, ...] = tuple(networks)

    def __contains__(self, ip: object) -> bool:
        addr = _ip(ip) if isinstance(ip, str) else ip
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        # `in` across versions is simply False, so mixed lists need no care.
        return any(addr in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"


class ForwardedHeader(StrEnum):
    """Which forwarding header a deployment's trusted proxies write."""

    NONE = "none"
    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"


@dataclass(frozen=True, slots=True)
class ClientAddressPolicy:
    """Whom the gateway believes about client addresses (one per listener).

    Attributes:
        proxy_protocol: the listener requires a PROXY header (``--proxy-protocol``).
        trusted: ``--trusted-proxies``.  For the PROXY header, empty means any
            peer; for forwarding headers, empty means none.
        forwarded_header: the one header the trusted proxies write.
    """

    proxy_protocol: bool = False
    trusted: TrustedProxies = field(default_factory=TrustedProxies)
    forwarded_header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR

    @classmethod
    def from_listen(cls, listen: ListenConfig, *,
                    forwarded_header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR
                    ) -> ClientAddressPolicy:
        """The policy for ``ServeConfig.listen``."""
        return cls(proxy_protocol=listen.proxy_protocol,
                   trusted=TrustedProxies(listen.trusted_proxies),
                   forwarded_header=forwarded_header)


# ------------------------------------------------------------------ resolving


def resolve_connection(peer_addr: tuple[Any, ...], proxy_result: ProxyResult | None, *,
                       policy: ClientAddressPolicy) -> ClientAddress:
    """The connection's client: the PROXY header's source if believed, else the socket peer.

    Args:
        peer_addr: ``getpeername()`` of the accepted socket (``(host, port)``
            or the IPv6 4-tuple).
        proxy_result: what :func:`receive_proxy_header` returned, or None.
        policy: the listener's policy.

    Returns:
        ``via="proxy-protocol"`` when the listener requires the header, the
        header names a TCP client (PROXY command, TCP4/TCP6) and the socket
        peer may send it; ``via="socket"`` otherwise.
    """
    host, port = str(peer_addr[0]), int(peer_addr[1])
    addr = _ip(host.partition("%")[0])
    socket_client = ClientAddress(str(addr) if addr is not None else host, port, Via.SOCKET)
    if not policy.proxy_protocol or proxy_result is None:
        return socket_client
    client = proxy_result.client
    if client is None:
        return socket_client  # LOCAL health check, UNKNOWN, UNSPEC: the real endpoints
    if policy.trusted and socket_client.ip not in policy.trusted:
        return socket_client  # a PROXY header from a peer that may not send one
    proxied = _ip(client[0])
    assert proxied is not None  # the parser only returns valid addresses
    return ClientAddress(str(proxied), client[1], Via.PROXY_PROTOCOL)


def resolve_request(connection: ClientAddress, headers: HeaderSource, *,
                    policy: ClientAddressPolicy) -> ClientAddress:
    """Refine the connection's client with the forwarding header, if it may be believed.

    Walks the configured header from the right while each hop's address is in
    ``policy.trusted`` (see the module docstring).  Never raises on header
    content: a malformed entry stops the walk where it is.
    """
    kind = policy.forwarded_header
    if kind is ForwardedHeader.NONE or not policy.trusted or connection.ip not in policy.trusted:
        return connection
    value = _header_value(headers, kind.value)
    if value is None:
        return connection
    if kind is ForwardedHeader.X_FORWARDED_FOR:
        hops = parse_x_forwarded_for(value)
        via = Via.X_FORWARDED_FOR
    else:
        hops = [_forwarded_for(element) for element in parse_forwarded(value)]
        via = Via.FORWARDED
    found = connection
    for hop in reversed(hops):
        if hop is None:
            break  # not an address: nothing to its left can be verified
        found = ClientAddress(hop[0], hop[1], via)
        if hop[0] not in policy.trusted:
            break
    return found


def resolve_client(peer_addr: tuple[Any, ...], proxy_result: ProxyResult | None,
                   headers: HeaderSource = (), *, policy: ClientAddressPolicy) -> ClientAddress:
    """:func:`resolve_connection` then :func:`resolve_request`."""
    connection = resolve_connection(peer_addr, proxy_result, policy=policy)
    return resolve_request(connection, headers, policy=policy)


def _header_value(headers: HeaderSource, name: str) -> str | None:
    """Every field named ``name`` (case-insensitive) joined by ", " (RFC 9110 §5.3)."""
    items: Iterable[tuple[str | bytes, str | bytes]]
    items = headers.items() if isinstance(headers, Mapping) else headers
    values: list[str] = []
    for key, value in items:
        key_text = key.decode("latin-1") if isinstance(key, bytes) else key
        if key_text.lower() == name:
            values.append(value.decode("latin-1") if isinstance(value, bytes) else value)
    return ", ".join(values) if values else None


# ------------------------------------------------------------ header parsing

_Hop = tuple[str, int | None]
_PORT = re.compile(r"[0-9]{1,5}")
_V4_PORT = re.compile(r"([0-9.]+):([0-9]{1,5})")
_BRACKETED = re.compile(r"\[([^\]]*)\](?::([0-9]{1,5}))?")


def _hop(host: str, port_text: str | None, *, version: int | None) -> _Hop | None:
    """``(canonical ip, port or None)``, or None if ``host`` is not an IP of ``version``."""
    if "%" in host:
        return None  # a zone index means nothing outside the host that wrote it
    try:
        raw = ipaddress.ip_address(host)
    except ValueError:
        return None
    if version is not None and raw.version != version:
        return None
    port: int | None = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or int(port_text) > 0xFFFF:
            return None
        port = int(port_text)
    addr = _ip(host)
    assert addr is not None
    return str(addr), port


def parse_x_forwarded_for(value: str) -> list[_Hop | None]:
    """Entries of an X-Forwarded-For value, leftmost (the claimed client) first.

    Each entry is ``(ip, port or None)``, or None when it is not an address
    (``unknown``, a name, garbage).  Accepted forms: ``192.0.2.1``,
    ``192.0.2.1:8080``, ``2001:db8::1``, ``[2001:db8::1]``,
    ``[2001:db8::1]:8080``.  Empty list elements are skipped (RFC 9110 §5.6.1).
    """
    hops: list[_Hop | None] = []
    for raw in value.split(","):
        item = raw.strip(" \t")
        if not item:
            continue
        if item.startswith("["):
            m = _BRACKETED.fullmatch(item)
            hops.append(_hop(m.group(1), m.group(2), version=6) if m else None)
        elif item.count(":") == 1:
            m = _V4_PORT.fullmatch(item)
            hops.append(_hop(m.group(1), m.group(2), version=4) if m else None)
        else:
            hops.append(_hop(item, None, version=None))
    return hops


#: RFC 7230 §3.2.6 tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: RFC 7239 §6.3 obfnode / §6.4 obfport: "_" 1*( ALPHA / DIGIT / "." / "_" / "-").
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._\-]+")


def _split_top(text: str, sep: str) -> tuple[list[str], bool]:
    """Split at ``sep`` outside quoted-strings; True if a quote was left open."""
    parts: list[str] = []
    start = 0
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1  # quoted-pair: the next character is literal
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts, quoted


def _unquote(value: str) -> str | None:
    """A token, or a quoted-string's content; None if it is neither."""
    if _TOKEN.fullmatch(value):
        return value
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        out: list[str] = []
        i = 1
        while i < len(value) - 1:
            ch = value[i]
            if ch == "\\":
                if i + 1 >= len(value) - 1:
                    return None
                i += 1
                ch = value[i]
            elif ch == '"':
                return None
            out.append(ch)
            i += 1
        return "".join(out)
    return None


def parse_forwarded(value: str) -> list[Mapping[str, str] | None]:
    """Elements of a ``Forwarded`` value (RFC 7239 §4), leftmost first.

    Each element is a mapping of lower-cased parameter names to unquoted
    values, or None when it is malformed: a pair that is not
    ``token=token|quoted-string``, a parameter given twice ("MUST NOT occur
    more than once per forwarded-element"), or a quote left open (which
    swallows everything to its right, so it is the last element).  Empty
    elements are skipped.
    """
    elements: list[Mapping[str, str] | None] = []
    raw_elements, open_quote = _split_top(value, ",")
    for index, raw in enumerate(raw_elements):
        if not raw.strip(" \t"):
            continue
        if open_quote and index == len(raw_elements) - 1:
            elements.append(None)
            continue
        elements.append(_forwarded_element(raw))
    return elements


def _forwarded_element(raw: str) -> Mapping[str, str] | None:
    """One element's pairs, or None when any pair is malformed or repeated."""
    params: dict[str, str] = {}
    pairs, _ = _split_top(raw, ";")
    for pair in pairs:
        pair = pair.strip(" \t")
        if not pair:
            continue
        name, eq, raw_value = pair.partition("=")
        unquoted = _unquote(raw_value) if eq else None
        if not _TOKEN.fullmatch(name) or unquoted is None or name.lower() in params:
            return None
        params[name.lower()] = unquoted
    return params


def _forwarded_for(element: Mapping[str, str] | None) -> _Hop | None:
    """The ``for=`` node of an element (RFC 7239 §6) as a hop, or None if not an address."""
    if element is None or "for" not in element:
        return None
    node = element["for"]
    if node.startswith("["):
        end = node.find("]")
        if end < 0:
            return None
        host, rest = node[1:end], node[end + 1:]
        version = 6
    else:
        host, sep, port_part = node.partition(":")
        rest = sep + port_part
        version = 4
    if host.lower() == "unknown" or _OBFUSCATED.fullmatch(host):
        return None  # §6.2 unknown, §6.3 obfuscated: no address to check or report
    port_text: str | None = None
    if rest:
        if not rest.startswith(":"):
            return None
        port_text = rest[1:]
        if _OBFUSCATED.fullmatch(port_text):
            port_text = None  # §6.4 obfuscated port: the address still stands
    return _hop(host, port_text, version=version)


# ---------------------------------------------------------------- trio side

#: One read covers the largest default v2 header (4 KiB) with the first bytes
#: of the client's stream; whatever follows the header is handed back intact.
_READ_BYTES = 8192


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream that returns ``prefix`` before reading from ``inner``.

    The bytes a PROXY header read took past the header belong to the HTTP or
    TLS stream; this puts them back in front.  Wrap it in ``trio.SSLStream``
    for TLS listeners.  ``socket`` (and ``setsockopt``/``getsockopt``) reach
    the inner socket, so code that looks up the peer keeps working.
    """

    def __init__(self, inner: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = memoryview(prefix)
        self._receiving = False

    def __repr__(self) -> str:
        return f"<PrefixedStream prefix={len(self._prefix)} inner={self.inner!r}>"

    @property
    def pending(self) -> int:
        """Bytes of the prefix not returned yet (0: reads go straight to ``inner``)."""
        return len(self._prefix)

    @property
    def socket(self) -> Any:
        """The inner stream's socket (``trio.SocketStream.socket``), or None."""
        return getattr(self.inner, "socket", None)

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.inner.setsockopt(level, option, value)  # type: ignore[attr-defined]

    def getsockopt(self, level: int, option: int, buffersize: int = 0) -> int | bytes:
        result: int | bytes = self.inner.getsockopt(  # type: ignore[attr-defined]
            level, option, buffersize)
        return result

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if not self._prefix:
            return bytes(await self.inner.receive_some(max_bytes))
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
        finally:
            self._receiving = False
        n = len(self._prefix) if max_bytes is None else max_bytes
        if n < 1:
            raise ValueError("max_bytes must be >= 1")
        chunk = bytes(self._prefix[:n])
        self._prefix = self._prefix[n:]
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        self._prefix = memoryview(b"")
        await self.inner.aclose()


async def receive_proxy_header(stream: trio.abc.HalfCloseableStream,
                               parser: ProxyHeaderParser | None = None
                               ) -> tuple[ProxyResult, trio.abc.HalfCloseableStream]:
    """Read the PROXY header at the start of ``stream``.

    Takes no timeout: the caller bounds it (``trio.fail_after`` from accept;
    proxy-protocol.txt §2 suggests "at least 3 seconds").  Reads as the
    parser allows, so a client that does not speak PROXY fails on its first
    bytes rather than at the deadline.

    Returns:
        The header, and the stream to read the application from: ``stream``
        itself, or a :class:`PrefixedStream` holding the bytes read past the
        header.

    Raises:
        ProtocolViolation: not a valid header, or EOF before its end.  The
            stream is left open; the caller closes it.
        trio.BrokenResourceError, trio.ClosedResourceError: from the stream.
    """
    parser = parser or ProxyHeaderParser()
    while True:
        data = await stream.receive_some(_READ_BYTES)
        if not data:
            parser.feed_eof()  # raises
        result = parser.feed(data)
        if result is not None:
            if result.remaining:
                return result, PrefixedStream(stream, result.remaining)
            return result, stream
