"""PROXY protocol v1 and v2 header parser and encoder (sans-IO).

The normative text is HAProxy's ``doc/proxy-protocol.txt`` ("The PROXY
protocol, Versions 1 & 2", revision 2020/03/05); section numbers below are
that document's.  A load balancer in TCP mode (HAProxy ``send-proxy`` /
``send-proxy-v2``, AWS NLB, nginx ``proxy_protocol on``, Envoy) prepends one
header to each connection, before any byte of the client's own stream, saying
who the client was::

    v1 (§2.1), one US-ASCII line of at most 107 bytes including CRLF:
        PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n
        PROXY TCP6 <src> <dst> <sport> <dport>\\r\\n
        PROXY UNKNOWN[ anything]\\r\\n

    v2 (§2.2), binary:
        0                   12      13      14         16
        +-------------------+-------+-------+----------+---------------------------+
        | signature (12)    |ver|cmd|fam|prt| len (BE) | len bytes: addresses, TLVs |
        +-------------------+-------+-------+----------+---------------------------+
        signature = 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A; ver = 2;
        cmd 0 LOCAL / 1 PROXY; fam 0 UNSPEC / 1 INET / 2 INET6 / 3 UNIX;
        prt 0 UNSPEC / 1 STREAM / 2 DGRAM; addresses 12 / 36 / 216 bytes, then TLVs.

Use::

    parser = ProxyHeaderParser()
    result = parser.feed(chunk)        # None: need more bytes
    ...
    result.client                      # (ip, port) to believe, or None (LOCAL, UNKNOWN, UNSPEC)
    result.remaining                   # bytes after the header: the start of the HTTP/TLS stream

Rules this parser enforces (each a :class:`~podterm.errors.ProtocolViolation`,
HTTP 400, WebSocket 1002; the caller closes the connection, §2.1 "Any sequence
which does not exactly match the protocol must be discarded and cause the
receiver to abort the connection"):

* **Fail fast.**  Every byte is checked as it arrives against what a header
  could still be: the first byte of ``GET /`` or of a TLS ClientHello is
  already an error, so a client that talks HTTP straight to a PROXY listener
  is refused at once rather than left waiting for a timeout (§5: the receiver
  must not guess whether a header is present).
* v1: the line ends in CRLF within ``max_v1_bytes`` (§2.1: "If the CRLF
  sequence is not found in the first 107 characters, the receiver should
  declare the line invalid"); a lone CR or LF is an error ("must not tolerate
  a single CR or LF"); fields are separated by exactly one space; IPv4 is
  dotted decimal without leading zeros, IPv6 is colon-hex (the dotted tail
  ``inet_ntop`` writes for mapped addresses is accepted), and the family of
  both addresses matches TCP4/TCP6; ports are 0..65535 without leading zeros.
  ``UNKNOWN`` ignores the rest of its line (§2.1) and overrides nothing.
* v2: version nibble 2 only; command LOCAL or PROXY only; family 0..3 and
  protocol 0..2 only ("must be rejected as invalid by receivers"); the whole
  header (16 + len) within ``max_v2_bytes``, refused as soon as the length
  field arrives; the address block at least as long as its family needs;
  TLVs that fit exactly in what is left; a CRC32C TLV (§2.2.3) must verify.
  ``LOCAL`` (the balancer's own health checks) skips the block whole and
  overrides nothing ("must use the real connection endpoints and discard the
  protocol block including the family").

The parser is one-shot: after it returns a result, the rest of the stream is
the application's, and :meth:`ProxyHeaderParser.feed` raises
:class:`~podterm.errors.LocalProtocolError`.  It never reads a clock: the
caller bounds the wait (§2 suggests "a short timeout ... at least 3 seconds").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum, IntFlag, StrEnum
from types import MappingProxyType

from podterm.errors import LocalProtocolError, ProtocolViolation

__all__ = [
    "V1_PREFIX", "V2_SIGNATURE", "V1_MAX_BYTES", "V2_DEFAULT_MAX_BYTES",
    "Command", "AddressFamily", "TransportProtocol", "TlvType", "SslSubtype", "SslClientFlag",
    "Family", "ProxyResult", "SslTlv", "ProxyHeaderParser",
    "encode_v1", "encode_v2", "parse_ssl_tlv", "crc32c",
]

#: §2.1: "a string identifying the protocol : "PROXY"" followed by "exactly one space".
V1_PREFIX = b"PROXY "
#: §2.2: "a constant 12 bytes block containing the protocol signature".
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: §2.1: the worst case, "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
#: is 107 chars, and "if the CRLF sequence is not found in the first 107 characters,
#: the receiver should declare the line invalid".
V1_MAX_BYTES = 107
#: 16-byte fixed part + 216 (the largest address block, AF_UNIX) + TLVs.  The
#: registered TLVs a balancer sends in practice (ALPN, AUTHORITY = an SNI of at
#: most 255 bytes, UNIQUE_ID of at most 128 bytes (§2.2.5), SSL with version,
#: cipher, algorithms and a client CN, AWS's VPC endpoint id) total well under
#: 1 KiB; 4 KiB leaves room for that four times over while bounding what an
#: unauthenticated peer can make us buffer to one small read.  The wire format
#: itself allows 16 + 65535.
V2_DEFAULT_MAX_BYTES = 4096
_V2_HEADER_BYTES = 16
_V2_ABSOLUTE_MAX = _V2_HEADER_BYTES + 0xFFFF
#: "PROXY UNKNOWN\r\n", the shortest valid v1 line (§2.1, 15 chars).
_V1_MIN_BYTES = 15


class Command(IntEnum):
    """v2 command, the low nibble of byte 13 (§2.2).  v1 headers are always PROXY."""

    LOCAL = 0x0  # "the connection was established on purpose by the proxy without being relayed"
    PROXY = 0x1  # "the connection was established on behalf of another node"


class AddressFamily(IntEnum):
    """v2 address family, the high nibble of byte 14 (§2.2)."""

    UNSPEC = 0x0  # "unknown, unspecified or unsupported protocol"
    INET = 0x1  # "addresses are exactly 4 bytes each in network byte order"
    INET6 = 0x2  # "addresses are exactly 16 bytes each in network byte order"
    UNIX = 0x3  # "addresses are exactly 108 bytes each"


class TransportProtocol(IntEnum):
    """v2 transport protocol, the low nibble of byte 14 (§2.2)."""

    UNSPEC = 0x0
    STREAM = 0x1  # "SOCK_STREAM protocol (eg: TCP or UNIX_STREAM)"
    DGRAM = 0x2  # "SOCK_DGRAM protocol (eg: UDP or UNIX_DGRAM)"


class TlvType(IntEnum):
    """Registered v2 TLV types (§2.2, "The following types have already been registered")."""

    ALPN = 0x01  # §2.2.1 the ALPN protocol, e.g. b"h2"
    AUTHORITY = 0x02  # §2.2.2 host name (TLS SNI), UTF-8
    CRC32C = 0x03  # §2.2.3 CRC32c of the whole header, 4 bytes
    NOOP = 0x04  # §2.2.4 padding, "should be ignored when parsed"
    UNIQUE_ID = 0x05  # §2.2.5 opaque, up to 128 bytes
    SSL = 0x20  # §2.2.6 client flags, verify result, sub-TLVs (parse_ssl_tlv)
    NETNS = 0x30  # §2.2.7 network namespace name, US-ASCII


class SslSubtype(IntEnum):
    """Sub-TLVs inside a :attr:`TlvType.SSL` value (§2.2.6)."""

    VERSION = 0x21  # "US-ASCII string representation of the TLS version"
    CN = 0x22  # client certificate's Common Name, UTF-8
    CIPHER = 0x23  # e.g. "ECDHE-RSA-AES128-GCM-SHA256"
    SIG_ALG = 0x24  # e.g. "RSA-SHA256"
    KEY_ALG = 0x25  # e.g. "RSA2048"


class SslClientFlag(IntFlag):
    """The ``client`` bit field of :attr:`TlvType.SSL` (§2.2.6)."""

    SSL = 0x01  # "the client connected over SSL/TLS"
    CERT_CONN = 0x02  # "the client provided a certificate over the current connection"
    CERT_SESS = 0x04  # "... at least once over the TLS session this connection belongs to"


class Family(StrEnum):
    """What the header says the original connection was (both versions)."""

    TCP4 = "TCP4"  # v1 "TCP4", v2 0x11
    TCP6 = "TCP6"  # v1 "TCP6", v2 0x21
    UDP4 = "UDP4"  # v2 0x12
    UDP6 = "UDP6"  # v2 0x22
    UNIX_STREAM = "UNIX_STREAM"  # v2 0x31
    UNIX_DGRAM = "UNIX_DGRAM"  # v2 0x32
    UNKNOWN = "UNKNOWN"  # v1 "UNKNOWN": use the real connection's parameters (§2.1)
    UNSPEC = "UNSPEC"  # v2 AF_UNSPEC or protocol UNSPEC, and every LOCAL header


_V2_FAMILIES: dict[tuple[AddressFamily, TransportProtocol], tuple[Family, int]] = {
    # (family, protocol) -> (Family, address block bytes), §2.2 "In practice ..."
    (AddressFamily.INET, TransportProtocol.STREAM): (Family.TCP4, 12),
    (AddressFamily.INET, TransportProtocol.DGRAM): (Family.UDP4, 12),
    (AddressFamily.INET6, TransportProtocol.STREAM): (Family.TCP6, 36),
    (AddressFamily.INET6, TransportProtocol.DGRAM): (Family.UDP6, 36),
    (AddressFamily.UNIX, TransportProtocol.STREAM): (Family.UNIX_STREAM, 216),
    (AddressFamily.UNIX, TransportProtocol.DGRAM): (Family.UNIX_DGRAM, 216),
}


@dataclass(frozen=True, slots=True)
class ProxyResult:
    """One parsed PROXY header.

    Attributes:
        version: 1 or 2.
        command: :attr:`Command.PROXY` for relayed connections (every v1
            header), :attr:`Command.LOCAL` for the balancer's own.
        family: see :class:`Family`.
        source: the original client's ``(ip, port)``, ``ip`` in canonical
            ``ipaddress`` form; None when the header carries no IP addresses.
        destination: the address the client connected to, likewise.
        tlvs: v2 TLVs by type (:class:`TlvType` or any other byte), NOOP
            padding dropped; empty for v1, LOCAL and UNSPEC.
        remaining: the bytes that followed the header in what was fed; they
            belong to the application stream (HTTP or TLS) and must be read
            before anything more from the socket.
        header_length: the header's size on the wire.
    """

    version: int
    command: Command
    family: Family
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: Mapping[int, bytes]
    remaining: bytes
    header_length: int

    @property
    def client(self) -> tuple[str, int] | None:
        """The address to use instead of the socket peer's, or None to keep the socket's.

        Only a PROXY command over TCP (TCP4/TCP6) overrides: LOCAL is a health
        check by the balancer itself (§2.2), v1 UNKNOWN and v2 UNSPEC say "use
        the real connection's parameters" (§2.1, §2.2), and UDP or UNIX
        originals cannot describe the TCP client of this connection.
        """
        if self.command is Command.PROXY and self.family in (Family.TCP4, Family.TCP6):
            return self.source
        return None

    def __repr__(self) -> str:
        return (f"<ProxyResult v{self.version} {self.command.name} {self.family} "
                f"{self.source}->{self.destination} tlvs={sorted(self.tlvs)} "
                f"header={self.header_length} remaining={len(self.remaining)}>")


@dataclass(frozen=True, slots=True)
class SslTlv:
    """A parsed :attr:`TlvType.SSL` value (§2.2.6).

    Attributes:
        client: which TLS facts apply.
        verify: 0 when the client presented a certificate and it verified.
        fields: sub-TLVs by :class:`SslSubtype`, raw bytes.
    """

    client: SslClientFlag
    verify: int
    fields: Mapping[int, bytes]


class _State(IntEnum):
    NEED_DATA = 0
    DONE = 1
    ERROR = 2


class ProxyHeaderParser:
    """Incremental parser of one PROXY v1 or v2 header at the start of a connection.

    Args:
        max_v1_bytes: the longest v1 line accepted, CRLF included; 15..107
            (the spec's bound, and its default).
        max_v2_bytes: the largest v2 header accepted, 16-byte fixed part
            included; 52 (a TCP6 header without TLVs) .. 65551.

    Raises:
        ValueError: a limit outside its range.
    """

    __slots__ = ("max_v1_bytes", "max_v2_bytes", "_buf", "_state", "_error")

    def __init__(self, *, max_v1_bytes: int = V1_MAX_BYTES,
                 max_v2_bytes: int = V2_DEFAULT_MAX_BYTES) -> None:
        if not _V1_MIN_BYTES <= max_v1_bytes <= V1_MAX_BYTES:
            raise ValueError(f"max_v1_bytes must be {_V1_MIN_BYTES}..{V1_MAX_BYTES} "
                             f"(proxy-protocol.txt §2.1), got {max_v1_bytes}")
        if not _V2_HEADER_BYTES + 36 <= max_v2_bytes <= _V2_ABSOLUTE_MAX:
            raise ValueError(f"max_v2_bytes must be {_V2_HEADER_BYTES + 36}.."
                             f"{_V2_ABSOLUTE_MAX}, got {max_v2_bytes}")
        self.max_v1_bytes = max_v1_bytes
        self.max_v2_bytes = max_v2_bytes
        self._buf = bytearray()
        self._state = _State.NEED_DATA
        self._error: ProtocolViolation | None = None

    def __repr__(self) -> str:
        return f"<ProxyHeaderParser {self._state.name} buffered={len(self._buf)}>"

    @property
    def done(self) -> bool:
        """True once :meth:`feed` returned a result."""
        return self._state is _State.DONE

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyResult | None:
        """Add bytes from the connection; return the header once it is complete.

        Returns:
            The :class:`ProxyResult` (its ``remaining`` holds every byte fed
            after the header), or None when more bytes are needed.

        Raises:
            ProtocolViolation: the bytes so far cannot be (or are not) a valid
                header.  The parser stays failed: later calls raise the same.
            LocalProtocolError: called again after a result was returned.
        """
        if self._state is _State.DONE:
            raise LocalProtocolError("ProxyHeaderParser.feed() after the header was parsed: "
                                     "the rest of the stream belongs to the application")
        if self._state is _State.ERROR:
            assert self._error is not None
            raise ProtocolViolation(self._error.message)
        self._buf += data
        try:
            result = self._parse()
        except ProtocolViolation as exc:
            self._state = _State.ERROR
            self._error = exc
            self._buf = bytearray()
            raise
        if result is not None:
            self._state = _State.DONE
            self._buf = bytearray()
        return result

    def feed_eof(self) -> None:
        """The peer closed the connection before the header was complete.

        Raises:
            ProtocolViolation: always, unless a result was already returned.
        """
        if self._state is _State.DONE:
            return
        if self._state is _State.ERROR:
            assert self._error is not None
            raise ProtocolViolation(self._error.message)
        got = len(self._buf)
        self._state = _State.ERROR
        self._error = ProtocolViolation(
            f"PROXY header: connection closed after {got} byte(s), before the header was "
            "complete (proxy-protocol.txt §2.2: partial headers are rejected)")
        self._buf = bytearray()
        raise ProtocolViolation(self._error.message)

    # ---------------------------------------------------------------- parsing

    def _parse(self) -> ProxyResult | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] == V2_SIGNATURE[0]:
            return self._parse_v2(buf)
        if buf[0] == V1_PREFIX[0]:
            return self._parse_v1(buf)
        raise _not_a_header(buf)

    def _parse_v1(self, buf: bytearray) -> ProxyResult | None:
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] != V1_PREFIX[:n]:
            raise _not_a_header(buf)
        limit = self.max_v1_bytes
        end = buf.find(b"\r\n", 0, limit)
        scanned = buf[:end] if end >= 0 else buf[:limit]
        # Checks run in the order of the bytes they look at, so the first bad
        # byte decides the error however the stream was chunked.
        _check_v1_protocol_prefix(scanned[:-1] if end < 0 and scanned.endswith(b"\r")
                                  else scanned)
        lf = scanned.find(b"\n")
        cr = scanned.find(b"\r")
        if cr >= 0 and end < 0 and cr == len(scanned) - 1:
            # A CR that is the last byte scanned may still get its LF (or, at the
            # limit, makes the line too long: reported below).  Before the first
            # CRLF every other CR is followed by something else.
            cr = -1
        if lf >= 0 and (cr < 0 or lf < cr):
            raise ProtocolViolation(f"PROXY v1: bare LF at byte {lf}: the line must end in "
                                    "CRLF (proxy-protocol.txt §2.1)")
        if cr >= 0:
            raise ProtocolViolation(f"PROXY v1: CR without LF at byte {cr} (proxy-protocol.txt "
                                    "§2.1: a single CR or LF must not end the line)")
        if end < 0:
            if len(buf) >= limit:
                raise ProtocolViolation(f"PROXY v1: no CRLF in the first {limit} bytes "
                                        "(proxy-protocol.txt §2.1: 107 at most, CRLF included)")
            return None
        line = bytes(buf[len(V1_PREFIX):end])
        remaining = bytes(buf[end + 2:])
        fields = line.split(b" ")
        proto = fields[0]
        if proto == b"UNKNOWN":
            # §2.1: "the receiver must ignore anything presented before the CRLF".
            return ProxyResult(1, Command.PROXY, Family.UNKNOWN, None, None,
                               MappingProxyType({}), remaining, end + 2)
        if proto not in (b"TCP4", b"TCP6"):
            raise ProtocolViolation(f"PROXY v1: protocol {proto!r} is not TCP4, TCP6 or UNKNOWN "
                                    "(proxy-protocol.txt §2.1)")
        family = Family.TCP4 if proto == b"TCP4" else Family.TCP6
        if len(fields) != 5:
            raise ProtocolViolation(
                f"PROXY v1: expected 'PROXY {family} SRC DST SRCPORT DSTPORT' with single "
                f"spaces, got {len(fields) + 1} fields in {bytes(buf[:end])!r}")
        src = _v1_address(fields[1], family, "source")
        dst = _v1_address(fields[2], family, "destination")
        sport = _v1_port(fields[3], "source")
        dport = _v1_port(fields[4], "destination")
        return ProxyResult(1, Command.PROXY, family, (src, sport), (dst, dport),
                           MappingProxyType({}), remaining, end + 2)

    def _parse_v2(self, buf: bytearray) -> ProxyResult | None:
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise _not_a_header(buf)
        if len(buf) <= len(V2_SIGNATURE):
            return None
        ver_cmd = buf[12]
        if ver_cmd >> 4 != 2:
            raise ProtocolViolation(f"PROXY v2: version {ver_cmd >> 4} in byte 13 (0x{ver_cmd:02x}); "
                                    "only 2 is valid (proxy-protocol.txt §2.2)")
        if ver_cmd & 0x0F not in (Command.LOCAL, Command.PROXY):
            raise ProtocolViolation(f"PROXY v2: unassigned command {ver_cmd & 0x0F} in byte 13 "
                                    f"(0x{ver_cmd:02x}); only LOCAL 0 and PROXY 1 are valid")
        command = Command(ver_cmd & 0x0F)
        if len(buf) < 14:
            return None
        fam = buf[13]
        if command is Command.PROXY:
            # For LOCAL "the family ... is ignored" (§2.2), so only PROXY checks it.
            if fam >> 4 > AddressFamily.UNIX:
                raise ProtocolViolation(f"PROXY v2: address family {fam >> 4} in byte 14 "
                                        f"(0x{fam:02x}) is not UNSPEC, INET, INET6 or UNIX")
            if fam & 0x0F > TransportProtocol.DGRAM:
                raise ProtocolViolation(f"PROXY v2: transport protocol {fam & 0x0F} in byte 14 "
                                        f"(0x{fam:02x}) is not UNSPEC, STREAM or DGRAM")
        if len(buf) < _V2_HEADER_BYTES:
            return None
        total = _V2_HEADER_BYTES + int.from_bytes(buf[14:16], "big")
        if total > self.max_v2_bytes:
            raise ProtocolViolation(f"PROXY v2: header of {total} bytes exceeds the limit of "
                                    f"{self.max_v2_bytes}")
        if len(buf) < total:
            return None
        header = bytes(buf[:total])
        remaining = bytes(buf[total:])
        block = header[_V2_HEADER_BYTES:]
        empty: Mapping[int, bytes] = MappingProxyType({})
        if command is Command.LOCAL:
            # §2.2: "must use the real connection endpoints and discard the protocol
            # block including the family"; "Receivers MUST always consider this field
            # to skip the appropriate number of bytes".
            return ProxyResult(2, command, Family.UNSPEC, None, None, empty, remaining, total)
        key = (AddressFamily(fam >> 4), TransportProtocol(fam & 0x0F))
        if key not in _V2_FAMILIES:
            # UNSPEC family or protocol: "The receiver should ignore address
            # information"; without a family the TLVs cannot be located either.
            return ProxyResult(2, command, Family.UNSPEC, None, None, empty, remaining, total)
        family, need = _V2_FAMILIES[key]
        if len(block) < need:
            raise ProtocolViolation(f"PROXY v2: truncated address block: {family} needs {need} "
                                    f"bytes, the header has {len(block)}")
        source: tuple[str, int] | None = None
        destination: tuple[str, int] | None = None
        if key[0] is AddressFamily.INET:
            source = (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big"))
            destination = (str(ipaddress.IPv4Address(block[4:8])),
                           int.from_bytes(block[10:12], "big"))
        elif key[0] is AddressFamily.INET6:
            source = (str(ipaddress.IPv6Address(block[0:16])),
                      int.from_bytes(block[32:34], "big"))
            destination = (str(ipaddress.IPv6Address(block[16:32])),
                           int.from_bytes(block[34:36], "big"))
        tlvs = _parse_tlvs(header, _V2_HEADER_BYTES + need)
        return ProxyResult(2, command, family, source, destination, tlvs, remaining, total)


# -------------------------------------------------------------------- helpers

_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN")
_IPV4 = re.compile(rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
                   rb"(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}")
#: Colon-hex with an optional dotted tail (inet_ntop writes ::ffff:192.0.2.1);
#: ipaddress then checks the structure.  No '%zone': a zone means nothing remotely.
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


def _not_a_header(buf: bytearray) -> ProtocolViolation:
    # Quote up to the first byte that cannot belong to either signature: the
    # same bytes whatever the chunking, so the message does not depend on it.
    expected = V2_SIGNATURE if buf[0] == V2_SIGNATURE[0] else V1_PREFIX
    bad = next((i for i, (a, b) in enumerate(zip(buf, expected, strict=False)) if a != b), 0)
    return ProtocolViolation(
        f"not a PROXY protocol header: the connection starts with {bytes(buf[:bad + 1])!r}, "
        "which is neither 'PROXY ' (v1) nor the v2 signature; this listener requires a PROXY "
        "header (proxy-protocol.txt §5: the receiver must not guess)")


def _check_v1_protocol_prefix(scanned: bytearray) -> None:
    """Fail fast on the protocol token: it must become TCP4, TCP6 or UNKNOWN."""
    token = bytes(scanned[len(V1_PREFIX):len(V1_PREFIX) + 8])
    matched = 0
    for proto in _V1_PROTOCOLS:
        n = 0
        while n < min(len(token), len(proto)) and token[n] == proto[n]:
            n += 1
        if n == len(token) or (n == len(proto) and proto.endswith(b" ")):
            return  # still a prefix of this protocol, or the protocol and its space
        matched = max(matched, n)
    # Quote up to the first byte no protocol allows: the same whatever the chunking.
    raise ProtocolViolation(f"PROXY v1: protocol {token[:matched + 1]!r}... is not TCP4, TCP6 "
                            "or UNKNOWN (proxy-protocol.txt §2.1)")


def _v1_address(raw: bytes, family: Family, which: str) -> str:
    if family is Family.TCP4:
        if _IPV4.fullmatch(raw):
            return raw.decode("ascii")
        raise ProtocolViolation(f"PROXY v1: {which} address {raw!r} is not an IPv4 address in "
                                "dotted decimal without leading zeros (TCP4)")
    if _IPV6_CHARS.fullmatch(raw):
        try:
            return str(ipaddress.IPv6Address(raw.decode("ascii")))
        except ValueError:
            pass
    raise ProtocolViolation(f"PROXY v1: {which} address {raw!r} is not an IPv6 address (TCP6)")


def _v1_port(raw: bytes, which: str) -> int:
    if _PORT.fullmatch(raw):
        port = int(raw)
        if port <= 0xFFFF:
            return port
    raise ProtocolViolation(f"PROXY v1: {which} port {raw!r} is not a decimal 0..65535 "
                            "without leading zeros")


def _parse_tlvs(header: bytes, start: int) -> Mapping[int, bytes]:
    """TLVs from ``header[start:]`` (§2.2 ``struct pp2_tlv``); CRC32C verified.

    A repeated type (other than NOOP padding) is an error: two parsers that kept
    the first and the last copy would disagree about, say, the authority.
    """
    tlvs: dict[int, bytes] = {}
    crc_at: int | None = None
    pos = start
    end = len(header)
    while pos < end:
        if end - pos < 3:
            raise ProtocolViolation(f"PROXY v2: truncated TLV at byte {pos}: {end - pos} byte(s) "
                                    "left, a TLV header needs 3")
        kind = header[pos]
        length = int.from_bytes(header[pos + 1:pos + 3], "big")
        if pos + 3 + length > end:
            raise ProtocolViolation(f"PROXY v2: TLV 0x{kind:02x} at byte {pos} claims {length} "
                                    f"bytes, {end - pos - 3} left in the header")
        value = header[pos + 3:pos + 3 + length]
        if kind != TlvType.NOOP:
            if kind in tlvs:
                raise ProtocolViolation(f"PROXY v2: TLV 0x{kind:02x} appears twice")
            tlvs[kind] = value
        if kind == TlvType.CRC32C:
            if length != 4:
                raise ProtocolViolation(f"PROXY v2: CRC32C TLV of {length} bytes; it is 4")
            crc_at = pos + 3
        pos += 3 + length
    if crc_at is not None:
        # §2.2.3: zero the checksum field, CRC32c the whole header, compare.
        zeroed = header[:crc_at] + b"\x00\x00\x00\x00" + header[crc_at + 4:]
        expected = int.from_bytes(header[crc_at:crc_at + 4], "big")
        if crc32c(zeroed) != expected:
            raise ProtocolViolation("PROXY v2: CRC32C TLV does not match the header "
                                    "(proxy-protocol.txt §2.2.3)")
    return MappingProxyType(tlvs)


def parse_ssl_tlv(value: bytes) -> SslTlv:
    """Parse the value of a :attr:`TlvType.SSL` TLV (§2.2.6 ``struct pp2_tlv_ssl``).

    Raises:
        ProtocolViolation: shorter than 5 bytes, or sub-TLVs that do not fit.
    """
    if len(value) < 5:
        raise ProtocolViolation(f"PROXY v2: SSL TLV of {len(value)} bytes; at least 5 "
                                "(client u8, verify u32)")
    client = SslClientFlag(value[0] & 0x07)
    verify = int.from_bytes(value[1:5], "big")
    fields: dict[int, bytes] = {}
    pos = 5
    while pos < len(value):
        if len(value) - pos < 3:
            raise ProtocolViolation("PROXY v2: truncated sub-TLV in the SSL TLV")
        kind = value[pos]
        length = int.from_bytes(value[pos + 1:pos + 3], "big")
        if pos + 3 + length > len(value):
            raise ProtocolViolation(f"PROXY v2: SSL sub-TLV 0x{kind:02x} claims {length} bytes, "
                                    f"{len(value) - pos - 3} left")
        if kind in fields:
            raise ProtocolViolation(f"PROXY v2: SSL sub-TLV 0x{kind:02x} appears twice")
        fields[kind] = value[pos + 3:pos + 3 + length]
        pos += 3 + length
    return SslTlv(client, verify, MappingProxyType(fields))


def _crc32c_table() -> tuple[int, ...]:
    # CRC-32C (Castagnoli), reflected polynomial 0x82F63B78 (RFC 4960 Appendix B).
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """CRC-32C of ``data`` (RFC 4960 Appendix B; ``crc32c(b"123456789") == 0xE3069283``)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------- encoding

_Address = tuple[str, int]


def _ip_pair(source: _Address, destination: _Address
             ) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | \
        tuple[ipaddress.IPv6Address, ipaddress.IPv6Address]:
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    for port in (source[1], destination[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is not 0..65535")
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return src, dst
    if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
        return src, dst
    raise ValueError(f"source {source[0]} and destination {destination[0]} are of different "
                     "families; a PROXY header carries one")


def encode_v1(source: _Address | None, destination: _Address | None) -> bytes:
    """The v1 line for a TCP connection, as HAProxy ``send-proxy`` writes it.

    ``None`` for both gives ``PROXY UNKNOWN\\r\\n`` (§2.1 short form).

    Raises:
        ValueError: one address missing, mixed families, or a bad port.
    """
    if source is None or destination is None:
        if source is not None or destination is not None:
            raise ValueError("give both addresses, or neither for UNKNOWN")
        return b"PROXY UNKNOWN\r\n"
    src, dst = _ip_pair(source, destination)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: _Address | None, destination: _Address | None, *,
              command: Command = Command.PROXY, tlvs: Iterable[tuple[int, bytes]] = (),
              with_crc32c: bool = False) -> bytes:
    """The v2 header for a TCP connection, as HAProxy ``send-proxy-v2`` writes it.

    Args:
        source, destination: ``(ip, port)``; both None gives family UNSPEC
            (required for LOCAL, §2.2 "When a sender presents a LOCAL
            connection, it should not present any address").
        command: PROXY, or LOCAL for a health check.
        tlvs: ``(type, value)`` pairs, written in order.
        with_crc32c: append a CRC32C TLV over the whole header (§2.2.3).

    Raises:
        ValueError: one address missing, mixed families, LOCAL with addresses,
            a TLV value over 65535 bytes, or a header over 65551 bytes.
    """
    if (source is None) != (destination is None):
        raise ValueError("give both addresses, or neither")
    if command is Command.LOCAL and source is not None:
        raise ValueError("a LOCAL header carries no addresses (proxy-protocol.txt §2.2)")
    if source is None or destination is None:
        fam = 0x00
        block = b""
    else:
        src, dst = _ip_pair(source, destination)
        fam = 0x11 if src.version == 4 else 0x21
        block = (src.packed + dst.packed + source[1].to_bytes(2, "big")
                 + destination[1].to_bytes(2, "big"))
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind} / length {len(value)} out of range")
        block += bytes([kind]) + len(value).to_bytes(2, "big") + value
    crc_at = -1
    if with_crc32c:
        crc_at = _V2_HEADER_BYTES + len(block) + 3
        block += bytes([TlvType.CRC32C]) + b"\x00\x04" + b"\x00\x00\x00\x00"
    if len(block) > 0xFFFF:
        raise ValueError(f"PROXY v2 header body of {len(block)} bytes exceeds 65535")
    header = V2_SIGNATURE + bytes([0x20 | command, fam]) + len(block).to_bytes(2, "big") + block
    if with_crc32c:
        header = header[:crc_at] + crc32c(header).to_bytes(4, "big") + header[crc_at + 4:]
    return header
