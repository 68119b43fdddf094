"""PROXY protocol v1/v2 parser (podterm.protocol.proxy_header) against proxy-protocol.txt.

Expected bytes are written out by hand from the spec's layouts, never built
with the module's own encoder, so a shared misreading cannot pass.  One rule
per test; the hypothesis section feeds every header in every split and feeds
garbage, which may only raise ProtocolViolation.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from podterm.errors import LocalProtocolError, ProtocolViolation
from podterm.protocol.proxy_header import (
    V2_SIGNATURE,
    Command,
    Family,
    ProxyHeaderParser,
    ProxyResult,
    SslClientFlag,
    SslSubtype,
    TlvType,
    crc32c,
    encode_v1,
    encode_v2,
    parse_ssl_tlv,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # §2.2, byte for byte
HTTP = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def parse(data: bytes, **limits: int) -> ProxyResult | None:
    return ProxyHeaderParser(**limits).feed(data)


def parse_ok(data: bytes, **limits: int) -> ProxyResult:
    result = parse(data, **limits)
    assert result is not None
    return result


def violation(data: bytes, **limits: int) -> str:
    with pytest.raises(ProtocolViolation) as info:
        ProxyHeaderParser(**limits).feed(data)
    assert info.value.http_status == 400
    return info.value.message


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


TCP4_BODY = ip4("192.168.0.1") + ip4("192.168.0.11") + struct.pack("!HH", 56324, 443)
TCP6_BODY = ip6("2001:db8::1") + ip6("2001:db8::2") + struct.pack("!HH", 4711, 443)


# ---------------------------------------------------------------------- v1 (§2.1)


def test_v1_spec_example_before_an_http_request() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    result = parse_ok(line + HTTP)
    assert result.version == 1
    assert result.command is Command.PROXY
    assert result.family is Family.TCP4
    assert result.source == ("192.168.0.1", 56324)
    assert result.destination == ("192.168.0.11", 443)
    assert result.client == ("192.168.0.1", 56324)
    assert result.remaining == HTTP
    assert result.header_length == len(line)
    assert result.tlvs == {}


def test_v1_longest_tcp4_line_is_56_bytes() -> None:
    line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56
    assert parse_ok(line).source == ("255.255.255.255", 65535)


def test_v1_longest_tcp6_line_is_104_bytes() -> None:
    addr = ":".join(["ffff"] * 8).encode()
    line = b"PROXY TCP6 " + addr + b" " + addr + b" 65535 65535\r\n"
    assert len(line) == 104
    result = parse_ok(line)
    assert result.family is Family.TCP6
    assert result.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


def test_v1_tcp6_addresses_are_canonicalised() -> None:
    result = parse_ok(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n")
    assert result.source == ("2001:db8::1", 1)
    assert result.destination == ("::1", 2)


def test_v1_tcp6_accepts_the_dotted_tail_inet_ntop_writes_for_mapped_addresses() -> None:
    result = parse_ok(b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:192.0.2.2 1 2\r\n")
    assert result.source == ("::ffff:c000:201", 1)


def test_v1_ports_zero_and_max() -> None:
    assert parse_ok(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n").source == ("1.2.3.4", 0)


def test_v1_unknown_short_form_overrides_nothing() -> None:
    result = parse_ok(b"PROXY UNKNOWN\r\n" + HTTP)
    assert result.family is Family.UNKNOWN
    assert result.source is None and result.client is None
    assert result.remaining == HTTP
    assert result.header_length == 15


def test_v1_unknown_ignores_the_rest_of_its_line() -> None:
    # §2.1: "the receiver must ignore anything presented before the CRLF".
    result = parse_ok(b"PROXY UNKNOWN whatever \x01 is here\r\nrest")
    assert result.family is Family.UNKNOWN
    assert result.client is None
    assert result.remaining == b"rest"


def test_v1_unknown_worst_case_107_bytes_accepted() -> None:
    addr = ":".join(["ffff"] * 8).encode()
    line = b"PROXY UNKNOWN " + addr + b" " + addr + b" 65535 65535\r\n"
    assert len(line) == 107
    assert parse_ok(line).family is Family.UNKNOWN


def test_reject_v1_line_longer_than_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    assert "no CRLF in the first 107 bytes" in violation(line)


def test_reject_v1_without_crlf_at_107_bytes_without_waiting_for_more() -> None:
    prefix = b"PROXY UNKNOWN " + b"x" * 93
    assert len(prefix) == 107
    assert ProxyHeaderParser().feed(prefix[:106]) is None
    assert "no CRLF" in violation(prefix[:107])


def test_v1_line_limit_is_configurable_down() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    assert parse_ok(line, max_v1_bytes=len(line)).source == ("1.2.3.4", 1)
    assert "no CRLF in the first" in violation(line, max_v1_bytes=len(line) - 1)


@pytest.mark.parametrize("limit", [14, 108])
def test_v1_limit_outside_the_spec_is_a_value_error(limit: int) -> None:
    with pytest.raises(ValueError, match="max_v1_bytes"):
        ProxyHeaderParser(max_v1_bytes=limit)


def test_reject_v1_bare_lf() -> None:
    assert "bare LF" in violation(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")


def test_reject_v1_cr_without_lf() -> None:
    assert "CR without LF" in violation(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX")


def test_v1_cr_at_the_end_of_a_chunk_waits_for_its_lf() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    result = parser.feed(b"\nGET")
    assert result is not None and result.remaining == b"GET"


@pytest.mark.parametrize("line", [
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY TC\r\n",
    b"PROXY \r\n",
])
def test_reject_v1_unknown_protocol(line: bytes) -> None:
    assert "is not TCP4, TCP6 or UNKNOWN" in violation(line)


def test_reject_v1_bad_protocol_as_soon_as_it_diverges() -> None:
    # No CRLF yet: the token alone already cannot become TCP4/TCP6/UNKNOWN.
    assert "is not TCP4, TCP6 or UNKNOWN" in violation(b"PROXY UDP4")


def test_reject_v1_missing_prefix_space() -> None:
    assert "not a PROXY protocol header" in violation(b"PROXYTCP4")


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    b"PROXY TCP4\r\n",
])
def test_reject_v1_wrong_field_count_or_spacing(line: bytes) -> None:
    assert "expected 'PROXY TCP4 SRC DST SRCPORT DSTPORT'" in violation(line)


@pytest.mark.parametrize("addr", [b"01.2.3.4", b"1.2.3.256", b"1.2.3", b"1.2.3.4.5",
                                  b"::1", b"a.b.c.d", b"1.2.3.4/8", b"\xd9\xa1.2.3.4"])
def test_reject_v1_bad_ipv4_address(addr: bytes) -> None:
    message = violation(b"PROXY TCP4 " + addr + b" 5.6.7.8 1 2\r\n")
    assert "source address" in message and "IPv4" in message


@pytest.mark.parametrize("addr", [b"1.2.3.4", b"fe80::1%eth0", b"2001:db8::g", b":::",
                                  b"1:2:3:4:5:6:7:8:9"])
def test_reject_v1_bad_ipv6_address(addr: bytes) -> None:
    message = violation(b"PROXY TCP6 ::1 " + addr + b" 1 2\r\n")
    assert "destination address" in message and "IPv6" in message


@pytest.mark.parametrize("port", [b"65536", b"01", b"-1", b"+1", b"1e3", b"", b"99999999"])
def test_reject_v1_bad_port(port: bytes) -> None:
    assert "port" in violation(b"PROXY TCP4 1.2.3.4 5.6.7.8 " + port + b" 2\r\n")


# ---------------------------------------------------------------------- v2 (§2.2)


def test_v2_tcp4_layout() -> None:
    header = v2(0x21, 0x11, TCP4_BODY)
    result = parse_ok(header + HTTP)
    assert result.version == 2
    assert result.command is Command.PROXY
    assert result.family is Family.TCP4
    assert result.source == ("192.168.0.1", 56324)
    assert result.destination == ("192.168.0.11", 443)
    assert result.client == ("192.168.0.1", 56324)
    assert result.remaining == HTTP
    assert result.header_length == 16 + 12


def test_v2_tcp6_layout() -> None:
    result = parse_ok(v2(0x21, 0x21, TCP6_BODY))
    assert result.family is Family.TCP6
    assert result.source == ("2001:db8::1", 4711)
    assert result.destination == ("2001:db8::2", 443)
    assert result.header_length == 16 + 36


def test_v2_udp_is_parsed_but_overrides_nothing() -> None:
    result = parse_ok(v2(0x21, 0x12, TCP4_BODY))
    assert result.family is Family.UDP4
    assert result.source == ("192.168.0.1", 56324)
    assert result.client is None


def test_v2_unix_block_is_skipped_and_its_tlvs_read() -> None:
    body = b"/run/a.sock".ljust(108, b"\x00") + b"/run/b.sock".ljust(108, b"\x00")
    result = parse_ok(v2(0x21, 0x31, body + tlv(TlvType.AUTHORITY, b"example.com")))
    assert result.family is Family.UNIX_STREAM
    assert result.source is None and result.client is None
    assert result.tlvs == {TlvType.AUTHORITY: b"example.com"}


def test_v2_local_keeps_the_real_endpoints() -> None:
    result = parse_ok(v2(0x20, 0x00, b"") + HTTP)
    assert result.command is Command.LOCAL
    assert result.family is Family.UNSPEC
    assert result.client is None
    assert result.remaining == HTTP


def test_v2_local_skips_a_nonzero_block_whatever_its_family() -> None:
    # §2.2: "Receivers MUST always consider this field to skip the appropriate
    # number of bytes and must not assume zero is presented for LOCAL".
    result = parse_ok(v2(0x20, 0xFF, b"\x01" * 40) + b"after")
    assert result.command is Command.LOCAL
    assert result.source is None and result.tlvs == {}
    assert result.remaining == b"after"


@pytest.mark.parametrize("fam", [0x00, 0x01, 0x10])
def test_v2_proxy_with_unspec_family_or_protocol_overrides_nothing(fam: int) -> None:
    result = parse_ok(v2(0x21, fam, TCP4_BODY) + b"x")
    assert result.family is Family.UNSPEC
    assert result.client is None
    assert result.remaining == b"x"


@pytest.mark.parametrize("ver_cmd", [0x11, 0x31, 0xF1, 0x01])
def test_reject_v2_bad_version_at_byte_13(ver_cmd: int) -> None:
    assert "version" in violation(SIG + bytes([ver_cmd]))


@pytest.mark.parametrize("ver_cmd", [0x22, 0x2F])
def test_reject_v2_unassigned_command_at_byte_13(ver_cmd: int) -> None:
    assert "unassigned command" in violation(SIG + bytes([ver_cmd]))


@pytest.mark.parametrize("fam", [0x41, 0xF1])
def test_reject_v2_bad_address_family_at_byte_14(fam: int) -> None:
    assert "address family" in violation(SIG + bytes([0x21, fam]))


@pytest.mark.parametrize("fam", [0x13, 0x1F])
def test_reject_v2_bad_transport_protocol_at_byte_14(fam: int) -> None:
    assert "transport protocol" in violation(SIG + bytes([0x21, fam]))


def test_reject_v2_length_over_the_limit_as_soon_as_it_is_read() -> None:
    head = SIG + b"\x21\x11" + struct.pack("!H", 4096 - 16 + 1)
    assert "4097 bytes exceeds the limit of 4096" in violation(head)


def test_v2_exactly_at_the_limit_is_accepted() -> None:
    body = TCP4_BODY + tlv(0xE0, b"a" * (4096 - 16 - 12 - 3))
    assert parse_ok(v2(0x21, 0x11, body)).tlvs[0xE0] == b"a" * (4096 - 31)


def test_v2_limit_is_configurable() -> None:
    header = v2(0x21, 0x21, TCP6_BODY)
    assert parse_ok(header, max_v2_bytes=52).source == ("2001:db8::1", 4711)
    with pytest.raises(ValueError, match="max_v2_bytes"):
        ProxyHeaderParser(max_v2_bytes=51)
    with pytest.raises(ValueError, match="max_v2_bytes"):
        ProxyHeaderParser(max_v2_bytes=16 + 65536)


@pytest.mark.parametrize(("fam", "body", "need"), [
    (0x11, TCP4_BODY[:11], 12), (0x21, TCP6_BODY[:35], 36), (0x31, b"\x00" * 215, 216),
    (0x11, b"", 12),
])
def test_reject_v2_truncated_address_block(fam: int, body: bytes, need: int) -> None:
    message = violation(v2(0x21, fam, body))
    assert "truncated address block" in message and f"needs {need} bytes" in message


def test_v2_tlvs_by_type_with_noop_padding_dropped() -> None:
    tlvs = (tlv(TlvType.ALPN, b"h2") + tlv(TlvType.NOOP, b"\x00\x00") +
            tlv(TlvType.AUTHORITY, b"podterm.example") + tlv(TlvType.NOOP, b"") +
            tlv(TlvType.UNIQUE_ID, b"\x01" * 128) + tlv(0xEA, b"\x01vpce-0123"))
    result = parse_ok(v2(0x21, 0x11, TCP4_BODY + tlvs))
    assert dict(result.tlvs) == {TlvType.ALPN: b"h2", TlvType.AUTHORITY: b"podterm.example",
                                 TlvType.UNIQUE_ID: b"\x01" * 128, 0xEA: b"\x01vpce-0123"}


def test_v2_tlvs_are_read_only() -> None:
    result = parse_ok(v2(0x21, 0x11, TCP4_BODY + tlv(TlvType.ALPN, b"h2")))
    with pytest.raises(TypeError):
        result.tlvs[1] = b"x"  # type: ignore[index]


def test_reject_v2_duplicate_tlv() -> None:
    body = TCP4_BODY + tlv(TlvType.AUTHORITY, b"a") + tlv(TlvType.AUTHORITY, b"b")
    assert "TLV 0x02 appears twice" in violation(v2(0x21, 0x11, body))


@pytest.mark.parametrize("tail", [b"\x01", b"\x01\x00"])
def test_reject_v2_truncated_tlv_header(tail: bytes) -> None:
    assert "truncated TLV" in violation(v2(0x21, 0x11, TCP4_BODY + tail))


def test_reject_v2_tlv_longer_than_the_header() -> None:
    body = TCP4_BODY + b"\x02\x00\x05abc"
    assert "claims 5 bytes, 3 left" in violation(v2(0x21, 0x11, body))


def test_crc32c_check_value() -> None:
    # RFC 3720 §B.4 / the usual CRC catalogue check value for CRC-32C.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def _with_crc(body_before_crc: bytes) -> bytes:
    header = v2(0x21, 0x11, body_before_crc + tlv(TlvType.CRC32C, b"\x00" * 4))
    return header[:-4] + struct.pack("!I", crc32c(header))


def test_v2_valid_crc32c_is_accepted() -> None:
    header = _with_crc(TCP4_BODY + tlv(TlvType.ALPN, b"h2"))
    result = parse_ok(header)
    assert result.tlvs[TlvType.CRC32C] == header[-4:]


def test_reject_v2_crc32c_mismatch() -> None:
    header = bytearray(_with_crc(TCP4_BODY))
    header[16] ^= 0x01  # the source address changed in flight
    assert "CRC32C TLV does not match" in violation(bytes(header))


def test_reject_v2_crc32c_of_wrong_length() -> None:
    assert "CRC32C TLV of 2 bytes" in violation(v2(0x21, 0x11, TCP4_BODY + tlv(3, b"\x00\x00")))


def test_ssl_tlv_and_its_sub_tlvs() -> None:
    value = (bytes([0x07]) + struct.pack("!I", 0) + tlv(SslSubtype.VERSION, b"TLSv1.3") +
             tlv(SslSubtype.CN, b"alice") + tlv(SslSubtype.CIPHER, b"TLS_AES_128_GCM_SHA256"))
    result = parse_ok(v2(0x21, 0x11, TCP4_BODY + tlv(TlvType.SSL, value)))
    ssl = parse_ssl_tlv(result.tlvs[TlvType.SSL])
    assert ssl.client == SslClientFlag.SSL | SslClientFlag.CERT_CONN | SslClientFlag.CERT_SESS
    assert ssl.verify == 0
    assert ssl.fields == {SslSubtype.VERSION: b"TLSv1.3", SslSubtype.CN: b"alice",
                          SslSubtype.CIPHER: b"TLS_AES_128_GCM_SHA256"}


@pytest.mark.parametrize("value", [b"\x01\x00\x00\x00", b"\x01\x00\x00\x00\x00\x21\x00\x09TLS",
                                   b"\x01\x00\x00\x00\x00\x21\x00"])
def test_reject_malformed_ssl_tlv(value: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="SSL"):
        parse_ssl_tlv(value)


# ---------------------------------------------------------------- fail fast (§5)


@pytest.mark.parametrize("first", [b"G", b"\x16", b"S", b"\x00", b"\r\n\r\n\x00\r\nQUIX"])
def test_reject_a_stream_that_is_not_a_proxy_header_on_its_first_bad_byte(first: bytes) -> None:
    # A browser or curl talking straight to a PROXY listener: HTTP, a TLS
    # ClientHello (0x16), SSH... is refused at once, not after a timeout.
    assert "not a PROXY protocol header" in violation(first)


def test_http_request_fails_on_its_first_byte_fed_alone() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProtocolViolation):
        parser.feed(b"G")


def test_every_prefix_of_a_valid_header_needs_more() -> None:
    for header in (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
                   v2(0x21, 0x11, TCP4_BODY + tlv(1, b"h2"))):
        for n in range(len(header)):
            assert ProxyHeaderParser().feed(header[:n]) is None, n


# ---------------------------------------------------------------- parser state


def test_feed_after_the_result_is_a_local_error() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    assert parser.done
    with pytest.raises(LocalProtocolError):
        parser.feed(b"more")


def test_parser_stays_failed() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProtocolViolation) as first:
        parser.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolViolation) as second:
        parser.feed(b"PROXY UNKNOWN\r\n")
    assert second.value == first.value


def test_eof_mid_header_is_a_violation() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(SIG[:5]) is None
    with pytest.raises(ProtocolViolation, match="connection closed after 5 byte"):
        parser.feed_eof()


def test_eof_before_any_byte_is_a_violation() -> None:
    with pytest.raises(ProtocolViolation, match="after 0 byte"):
        ProxyHeaderParser().feed_eof()


def test_eof_after_the_result_is_fine() -> None:
    parser = ProxyHeaderParser()
    parser.feed(b"PROXY UNKNOWN\r\n")
    parser.feed_eof()


def test_empty_feed_needs_more() -> None:
    assert ProxyHeaderParser().feed(b"") is None


# ---------------------------------------------------------------------- encoders


def test_encode_v1_matches_the_spec_example() -> None:
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_encode_v1_tcp6_and_unknown() -> None:
    assert encode_v1(("2001:db8::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_encode_v2_tcp4_matches_the_layout() -> None:
    assert encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == v2(0x21, 0x11, TCP4_BODY)


def test_encode_v2_local() -> None:
    assert encode_v2(None, None, command=Command.LOCAL) == SIG + b"\x20\x00\x00\x00"


def test_encode_v2_crc32c_round_trips() -> None:
    header = encode_v2(("2001:db8::1", 4711), ("2001:db8::2", 443),
                       tlvs=[(TlvType.ALPN, b"h2")], with_crc32c=True)
    result = parse_ok(header)
    assert result.tlvs[TlvType.ALPN] == b"h2" and TlvType.CRC32C in result.tlvs


@pytest.mark.parametrize(("src", "dst"), [
    (("1.2.3.4", 1), ("::1", 2)), (("1.2.3.4", 1), None), (("1.2.3.4", 70000), ("1.2.3.4", 1)),
])
def test_encoders_refuse_inconsistent_addresses(src: tuple[str, int],
                                                dst: tuple[str, int] | None) -> None:
    with pytest.raises(ValueError):
        encode_v1(src, dst)
    with pytest.raises(ValueError):
        encode_v2(src, dst)


def test_encode_v2_local_with_addresses_is_refused() -> None:
    with pytest.raises(ValueError, match="LOCAL"):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), command=Command.LOCAL)


def test_v2_signature_constant_matches_the_spec() -> None:
    assert V2_SIGNATURE == SIG


# ---------------------------------------------------------------------- hypothesis

ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.sampled_from([1, 2, 5, 0x30, 0xE0, 0xEA]),
                               st.binary(max_size=40)),
                     max_size=4, unique_by=lambda t: t[0])


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local"]))
    addrs = draw(st.sampled_from([ipv4s, ipv6s]))
    src, dst = (draw(addrs), draw(ports)), (draw(addrs), draw(ports))
    if kind == "v1":
        return encode_v1(src, dst)
    if kind == "v1-unknown":
        return encode_v1(None, None)
    if kind == "v2-local":
        return encode_v2(None, None, command=Command.LOCAL)
    return encode_v2(src, dst, tlvs=draw(tlv_lists), with_crc32c=draw(st.booleans()))


def _feed_in_chunks(data: bytes, cuts: list[int]) -> tuple[ProxyResult | None, bytes]:
    """Feed ``data`` split at ``cuts``; return the result and the bytes not yet fed."""
    parser = ProxyHeaderParser()
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        result = parser.feed(data[start:end])
        if result is not None:
            return result, data[end:]
    return None, b""


@settings(max_examples=250, deadline=None)
@given(header=valid_headers(), trailing=st.binary(max_size=64), data=st.data())
def test_every_split_of_a_valid_header_parses_identically(header: bytes, trailing: bytes,
                                                          data: st.DataObject) -> None:
    whole = parse_ok(header + trailing)
    assert whole.remaining == trailing
    assert whole.header_length == len(header)
    stream = header + trailing
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    split, unfed = _feed_in_chunks(stream, cuts)
    assert split is not None
    assert split.remaining + unfed == trailing
    assert (split.version, split.command, split.family, split.source, split.destination,
            dict(split.tlvs), split.header_length) == \
        (whole.version, whole.command, whole.family, whole.source, whole.destination,
         dict(whole.tlvs), whole.header_length)
    # Byte at a time: the header completes exactly at its last byte.
    parser = ProxyHeaderParser()
    for i in range(len(header) - 1):
        assert parser.feed(header[i:i + 1]) is None
    last = parser.feed(header[-1:])
    assert last is not None and last.remaining == b""


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, and valid headers mutated: truncated, flipped, spliced."""
    kind = draw(st.sampled_from(["random", "mutated", "prefixed"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    base = draw(valid_headers()) + draw(st.binary(max_size=20))
    if kind == "prefixed":
        prefix = draw(st.sampled_from([SIG, SIG + b"\x21", b"PROXY ", b"PROXY TCP4 "]))
        return prefix + draw(st.binary(max_size=200))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif op == "delete" and len(data) > 1:
            del data[i]
        else:
            data[i:i] = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                       st.sampled_from([b"\r", b"\n", b" ", b"\r\n", b"0",
                                                        b"\r\r\n", b":", b"."])))
    return bytes(data)


def _outcome(data: bytes, cuts: list[int]) -> tuple[str, object]:
    try:
        result, unfed = _feed_in_chunks(data, cuts)
    except ProtocolViolation as exc:
        return "error", exc.message
    if result is None:
        return "need-more", None
    return "ok", (result.version, result.command, result.family, result.source,
                  result.destination, dict(result.tlvs), result.remaining + unfed)


@settings(max_examples=500, deadline=None)
@given(data=garbage(), cuts=st.lists(st.integers(0, 320), max_size=10))
# Cases earlier versions got wrong: messages that quoted however much had
# arrived, and a CR/LF check that ran before the protocol check.
@example(data=b"ROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", cuts=[1])
@example(data=b"PROXY \x00\x00", cuts=[7])
@example(data=b"PROXY T\r\r\n", cuts=[8])
@example(data=b"PROXY T\rY", cuts=[8])
@example(data=b"PROXY TCP6 74:ff9b:1:68c0:9edb:cea3:cf99:1000 1000:\r0\n:: 0 0\r\n", cuts=[53])
@example(data=b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", cuts=[107])
def test_garbage_raises_only_protocol_violation_and_splits_do_not_matter(
        data: bytes, cuts: list[int]) -> None:
    # Anything else escaping (IndexError, ValueError, UnicodeDecodeError...)
    # fails this test.  And the verdict, down to the message, is the same
    # whether the bytes come at once or in pieces.
    whole = _outcome(data, [])
    split = _outcome(data, [c for c in cuts if c <= len(data)])
    assert split == whole


@settings(max_examples=150, deadline=None)
@given(data=garbage())
def test_garbage_then_eof_is_a_result_or_a_violation(data: bytes) -> None:
    parser = ProxyHeaderParser()
    try:
        if parser.feed(data) is None:
            parser.feed_eof()
            pytest.fail("feed_eof() returned on an incomplete header")
    except ProtocolViolation:
        pass
