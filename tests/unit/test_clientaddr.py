"""Whom the gateway believes about the client's address (podterm.net.clientaddr).

One rule per test.  Addresses: 10.0.0.0/8 and fd00::/8 are the trusted
proxies; 203.0.113.0/24, 198.51.100.0/24 and 2001:db8::/32 are clients
(RFC 5737 / RFC 3849 documentation ranges).  The trio part (PrefixedStream,
receive_proxy_header) runs over memory streams; no sockets here.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio.testing

from podterm.config import ListenConfig
from podterm.errors import ProtocolViolation
from podterm.net.clientaddr import (
    ClientAddress,
    ClientAddressPolicy,
    ForwardedHeader,
    PrefixedStream,
    TrustedProxies,
    Via,
    parse_forwarded,
    parse_x_forwarded_for,
    receive_proxy_header,
    resolve_client,
    resolve_connection,
    resolve_request,
)
from podterm.protocol.proxy_header import (
    Command,
    ProxyHeaderParser,
    ProxyResult,
    encode_v1,
    encode_v2,
)

TRUSTED = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
LB = ("10.0.0.5", 40000)  # the balancer / ingress, as the socket peer
CLIENT = ("203.0.113.7", 51234)
XFF = ForwardedHeader.X_FORWARDED_FOR
FWD = ForwardedHeader.FORWARDED


def policy(*, proxy_protocol: bool = False, trusted: TrustedProxies = TRUSTED,
           header: ForwardedHeader = XFF) -> ClientAddressPolicy:
    return ClientAddressPolicy(proxy_protocol=proxy_protocol, trusted=trusted,
                               forwarded_header=header)


def proxied(source: tuple[str, int] = CLIENT, *, version: int = 2) -> ProxyResult:
    header = (encode_v2(source, ("10.0.0.1", 443)) if version == 2
              else encode_v1(source, ("10.0.0.1", 443)))
    result = ProxyHeaderParser().feed(header)
    assert result is not None
    return result


def xff(value: str) -> dict[str, str]:
    return {"x-forwarded-for": value}


# ---------------------------------------------------------------- ClientAddress


def test_client_address_text_forms() -> None:
    assert str(ClientAddress("203.0.113.7", 5, Via.SOCKET)) == "203.0.113.7:5"
    assert str(ClientAddress("2001:db8::1", 5, Via.SOCKET)) == "[2001:db8::1]:5"
    assert str(ClientAddress("2001:db8::1", None, Via.X_FORWARDED_FOR)) == "2001:db8::1"


# ---------------------------------------------------------------- TrustedProxies


def test_trusted_proxies_match_v4_and_v6_networks() -> None:
    assert "10.1.2.3" in TRUSTED
    assert "fd12::1" in TRUSTED
    assert "11.0.0.1" not in TRUSTED
    assert "2001:db8::1" not in TRUSTED


def test_trusted_proxies_accept_bare_addresses_and_host_bits() -> None:
    trusted = TrustedProxies(["192.0.2.9", "10.1.2.3/8", ipaddress.ip_network("fd00::/8")])
    assert "192.0.2.9" in trusted and "192.0.2.10" not in trusted
    assert "10.200.0.1" in trusted


def test_trusted_proxies_see_ipv4_mapped_ipv6_as_ipv4() -> None:
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    assert "::ffff:10.0.0.5" in TRUSTED
    assert ipaddress.ip_address("::ffff:10.0.0.5") in TRUSTED


def test_trusted_proxies_do_not_contain_non_addresses() -> None:
    assert "unknown" not in TRUSTED
    assert "fe80::1%eth0" not in TrustedProxies(["fe80::/10"])
    assert 42 not in TRUSTED


def test_trusted_proxies_reject_a_bad_cidr() -> None:
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/33"])


def test_empty_trusted_proxies_is_falsy() -> None:
    assert not TrustedProxies()
    assert TRUSTED


def test_policy_from_listen_config() -> None:
    listen = ListenConfig(proxy_protocol=True, trusted_proxies=("10.0.0.0/8",))
    made = ClientAddressPolicy.from_listen(listen)
    assert made.proxy_protocol is True
    assert made.trusted == TrustedProxies(["10.0.0.0/8"])
    assert made.forwarded_header is XFF


# ---------------------------------------------------------------- socket and PROXY


def test_socket_peer_without_any_proxy() -> None:
    assert resolve_client(CLIENT, None, {}, policy=policy()) == \
        ClientAddress("203.0.113.7", 51234, Via.SOCKET)


def test_socket_peer_ipv6_four_tuple_and_zone() -> None:
    got = resolve_client(("fe80::1%eth0", 1, 0, 2), None, policy=policy())
    assert got == ClientAddress("fe80::1", 1, Via.SOCKET)


def test_socket_peer_ipv4_mapped_is_shown_as_ipv4() -> None:
    got = resolve_client(("::ffff:203.0.113.7", 9, 0, 0), None, policy=policy())
    assert got == ClientAddress("203.0.113.7", 9, Via.SOCKET)


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_gives_the_client_when_the_listener_requires_it(version: int) -> None:
    got = resolve_client(LB, proxied(version=version), policy=policy(proxy_protocol=True))
    assert got == ClientAddress("203.0.113.7", 51234, Via.PROXY_PROTOCOL)


def test_proxy_header_is_ignored_when_the_listener_does_not_require_it() -> None:
    got = resolve_client(LB, proxied(), policy=policy(proxy_protocol=False))
    assert got == ClientAddress("10.0.0.5", 40000, Via.SOCKET)


def test_proxy_header_from_any_peer_when_no_trusted_proxies_are_set() -> None:
    # config.md: --trusted-proxies defaults to "any peer" for PROXY headers.
    got = resolve_client(("198.51.100.1", 1), proxied(),
                         policy=policy(proxy_protocol=True, trusted=TrustedProxies()))
    assert got.via is Via.PROXY_PROTOCOL and got.ip == "203.0.113.7"


def test_proxy_header_from_an_untrusted_peer_is_ignored() -> None:
    got = resolve_client(("198.51.100.1", 1), proxied(), policy=policy(proxy_protocol=True))
    assert got == ClientAddress("198.51.100.1", 1, Via.SOCKET)


def test_proxy_local_health_check_keeps_the_socket_peer() -> None:
    local = ProxyHeaderParser().feed(encode_v2(None, None, command=Command.LOCAL))
    got = resolve_client(LB, local, policy=policy(proxy_protocol=True))
    assert got == ClientAddress("10.0.0.5", 40000, Via.SOCKET)


def test_proxy_v1_unknown_keeps_the_socket_peer() -> None:
    unknown = ProxyHeaderParser().feed(b"PROXY UNKNOWN\r\n")
    got = resolve_client(LB, unknown, policy=policy(proxy_protocol=True))
    assert got.via is Via.SOCKET


def test_proxy_v2_unspec_keeps_the_socket_peer() -> None:
    unspec = ProxyHeaderParser().feed(encode_v2(None, None))
    got = resolve_client(LB, unspec, policy=policy(proxy_protocol=True))
    assert got.via is Via.SOCKET


def test_proxy_header_ipv6_client() -> None:
    result = ProxyHeaderParser().feed(encode_v2(("2001:db8::7", 5), ("fd00::1", 443)))
    got = resolve_client(("fd00::9", 1, 0, 0), result, policy=policy(proxy_protocol=True))
    assert got == ClientAddress("2001:db8::7", 5, Via.PROXY_PROTOCOL)


def test_proxy_header_ipv4_mapped_client_is_shown_as_ipv4() -> None:
    result = ProxyHeaderParser().feed(b"PROXY TCP6 ::ffff:203.0.113.7 ::1 5 443\r\n")
    got = resolve_client(LB, result, policy=policy(proxy_protocol=True))
    assert got == ClientAddress("203.0.113.7", 5, Via.PROXY_PROTOCOL)


def test_resolve_connection_then_request_equals_resolve_client() -> None:
    pol = policy(proxy_protocol=True)
    conn = resolve_connection(LB, proxied(("10.9.9.9", 1)), policy=pol)
    headers = xff("203.0.113.1")
    assert resolve_request(conn, headers, policy=pol) == \
        resolve_client(LB, proxied(("10.9.9.9", 1)), headers, policy=pol)


# ---------------------------------------------------------------- X-Forwarded-For


def test_xff_from_a_trusted_peer_names_the_client() -> None:
    got = resolve_client(LB, None, xff("203.0.113.7"), policy=policy())
    assert got == ClientAddress("203.0.113.7", None, Via.X_FORWARDED_FOR)


def test_spoofed_xff_from_an_untrusted_peer_is_ignored() -> None:
    got = resolve_client(CLIENT, None, xff("10.0.0.1, 198.51.100.66"), policy=policy())
    assert got == ClientAddress("203.0.113.7", 51234, Via.SOCKET)


def test_xff_is_ignored_when_no_trusted_proxies_are_set() -> None:
    got = resolve_client(LB, None, xff("203.0.113.7"), policy=policy(trusted=TrustedProxies()))
    assert got.via is Via.SOCKET and got.ip == "10.0.0.5"


def test_xff_walk_stops_at_the_first_untrusted_hop_from_the_right() -> None:
    # The client forged "198.51.100.66, 10.0.0.1"; the ingress appended the
    # client's real address; the socket peer is the ingress.
    got = resolve_client(LB, None, xff("198.51.100.66, 10.0.0.1, 203.0.113.7"), policy=policy())
    assert got == ClientAddress("203.0.113.7", None, Via.X_FORWARDED_FOR)


def test_xff_walk_passes_trusted_hops() -> None:
    got = resolve_client(LB, None, xff("203.0.113.7, 10.0.0.2, 10.0.0.3"), policy=policy())
    assert got.ip == "203.0.113.7"


def test_xff_all_hops_trusted_gives_the_leftmost() -> None:
    got = resolve_client(LB, None, xff("10.0.0.2, 10.0.0.3"), policy=policy())
    assert got == ClientAddress("10.0.0.2", None, Via.X_FORWARDED_FOR)


def test_xff_repeated_header_fields_are_one_list() -> None:
    headers = [(b"X-Forwarded-For", b"198.51.100.66"), (b"Host", b"x"),
               (b"x-forwarded-for", b"203.0.113.7, 10.0.0.2")]
    got = resolve_client(LB, None, headers, policy=policy())
    assert got.ip == "203.0.113.7"


def test_xff_header_name_is_case_insensitive() -> None:
    got = resolve_client(LB, None, {"X-Forwarded-For": "203.0.113.7"}, policy=policy())
    assert got.ip == "203.0.113.7"


def test_xff_ipv6_forms() -> None:
    peer = ("fd00::9", 1, 0, 0)
    for value, want in [("2001:db8::1", ("2001:db8::1", None)),
                        ("[2001:db8::1]", ("2001:db8::1", None)),
                        ("[2001:db8::1]:8443", ("2001:db8::1", 8443)),
                        ("2001:DB8:0:0::1", ("2001:db8::1", None))]:
        got = resolve_client(peer, None, xff(value), policy=policy())
        assert (got.ip, got.port, got.via) == (*want, Via.X_FORWARDED_FOR), value


def test_xff_ipv4_with_port() -> None:
    got = resolve_client(LB, None, xff("203.0.113.7:6000"), policy=policy())
    assert (got.ip, got.port) == ("203.0.113.7", 6000)


def test_xff_trusted_ipv4_mapped_hop_is_walked() -> None:
    got = resolve_client(LB, None, xff("203.0.113.7, ::ffff:10.0.0.3"), policy=policy())
    assert got.ip == "203.0.113.7"


@pytest.mark.parametrize("bad", ["garbage", "unknown", "1.2.3.4.5", "[2001:db8::1",
                                 "203.0.113.7:99999", "fe80::1%eth0", "[1.2.3.4]:80",
                                 "2001:db8::1]:80", "_hidden", "300.1.1.1"])
def test_xff_malformed_rightmost_entry_stops_at_the_peer(bad: str) -> None:
    got = resolve_client(LB, None, xff(f"203.0.113.7, {bad}"), policy=policy())
    assert got == ClientAddress("10.0.0.5", 40000, Via.SOCKET)


def test_xff_malformed_entry_left_of_a_trusted_hop_stops_at_that_hop() -> None:
    got = resolve_client(LB, None, xff("203.0.113.7, bogus, 10.0.0.3"), policy=policy())
    assert got == ClientAddress("10.0.0.3", None, Via.X_FORWARDED_FOR)


def test_xff_empty_elements_are_skipped() -> None:
    got = resolve_client(LB, None, xff(" , 203.0.113.7 ,, "), policy=policy())
    assert got.ip == "203.0.113.7"


def test_xff_empty_value_keeps_the_peer() -> None:
    got = resolve_client(LB, None, xff(""), policy=policy())
    assert got.via is Via.SOCKET


def test_parse_x_forwarded_for_shapes() -> None:
    assert parse_x_forwarded_for("203.0.113.7, [2001:db8::1]:1, x") == \
        [("203.0.113.7", None), ("2001:db8::1", 1), None]


# ------------------------------------------------------- PROXY then forwarding


def test_xff_behind_proxy_protocol_is_ignored_when_the_proxied_client_is_untrusted() -> None:
    # L4 balancer (PROXY) straight from the internet: the client's own XFF is a lie.
    got = resolve_client(LB, proxied(CLIENT), xff("198.51.100.66"),
                         policy=policy(proxy_protocol=True))
    assert got == ClientAddress("203.0.113.7", 51234, Via.PROXY_PROTOCOL)


def test_xff_behind_proxy_protocol_is_walked_when_the_proxied_peer_is_trusted() -> None:
    # client -> L7 ingress 10.0.0.8 (writes XFF) -> L4 balancer (PROXY) -> gateway.
    got = resolve_client(LB, proxied(("10.0.0.8", 3333)), xff("203.0.113.7"),
                         policy=policy(proxy_protocol=True))
    assert got == ClientAddress("203.0.113.7", None, Via.X_FORWARDED_FOR)


# ------------------------------------------------------------------- Forwarded


def fwd(value: str) -> dict[str, str]:
    return {"forwarded": value}


def test_forwarded_rfc7239_examples() -> None:
    # RFC 7239 §4 and §7.1 examples.
    got = resolve_client(LB, None, fwd('for="_gazonk"'), policy=policy(header=FWD))
    assert got.via is Via.SOCKET
    got = resolve_client(LB, None, fwd('For="[2001:db8:cafe::17]:4711"'), policy=policy(header=FWD))
    assert got == ClientAddress("2001:db8:cafe::17", 4711, Via.FORWARDED)
    got = resolve_client(LB, None, fwd("for=192.0.2.60;proto=http;by=203.0.113.43"),
                         policy=policy(header=FWD))
    assert got == ClientAddress("192.0.2.60", None, Via.FORWARDED)
    got = resolve_client(LB, None, fwd("for=192.0.2.43, for=198.51.100.17"),
                         policy=policy(header=FWD))
    assert got.ip == "198.51.100.17"


def test_forwarded_walk_passes_trusted_hops() -> None:
    value = 'for=198.51.100.66, for=203.0.113.7;proto=https, for="10.0.0.3:80"'
    got = resolve_client(LB, None, fwd(value), policy=policy(header=FWD))
    assert got.ip == "203.0.113.7"


def test_forwarded_from_an_untrusted_peer_is_ignored() -> None:
    got = resolve_client(CLIENT, None, fwd("for=10.0.0.1"), policy=policy(header=FWD))
    assert got.via is Via.SOCKET


@pytest.mark.parametrize("node", ["_hidden", "unknown", "UNKNOWN", '"_a.b-c"'])
def test_forwarded_obfuscated_or_unknown_identifier_stops_at_the_nearest_trusted_hop(
        node: str) -> None:
    # RFC 7239 §6.2/§6.3: no address to check or to report.
    got = resolve_client(LB, None, fwd(f"for=203.0.113.7, for={node}, for=10.0.0.3"),
                         policy=policy(header=FWD))
    assert got == ClientAddress("10.0.0.3", None, Via.FORWARDED)


def test_forwarded_obfuscated_port_keeps_the_address() -> None:
    got = resolve_client(LB, None, fwd('for="203.0.113.7:_p0rt"'), policy=policy(header=FWD))
    assert got == ClientAddress("203.0.113.7", None, Via.FORWARDED)


@pytest.mark.parametrize("value", [
    "for=203.0.113.7;for=198.51.100.1",  # a parameter twice in one element
    "for",  # no '='
    'for="203.0.113.7',  # quote left open
    "for=2001:db8::1",  # IPv6 must be quoted and bracketed
    'for="2001:db8::1"',  # ... and bracketed
    'for="[2001:db8::1"',
    'for="[2001:db8::1]x"',
    "for=203.0.113.7:99999",
    "by=10.0.0.1",  # no for=
    "f@r=203.0.113.7",
    "for=[::1]",  # brackets are not token characters
])
def test_forwarded_malformed_rightmost_element_stops_at_the_peer(value: str) -> None:
    got = resolve_client(LB, None, fwd(f"for=203.0.113.9, {value}"), policy=policy(header=FWD))
    assert got == ClientAddress("10.0.0.5", 40000, Via.SOCKET)


def test_forwarded_open_quote_swallows_what_follows_it() -> None:
    assert parse_forwarded('for=1.2.3.4, for="x, for=5.6.7.8') == [{"for": "1.2.3.4"}, None]


def test_forwarded_quoted_pairs_and_commas_inside_quotes() -> None:
    assert parse_forwarded(r'for="a\"b,c";by=x, for=y') == [{"for": 'a"b,c', "by": "x"},
                                                             {"for": "y"}]


def test_forwarded_empty_elements_are_skipped() -> None:
    assert parse_forwarded(" , for=y ,") == [{"for": "y"}]


def test_only_the_configured_header_is_read() -> None:
    # The trusted proxy writes X-Forwarded-For; a Forwarded header is the client's own.
    headers = {"forwarded": "for=198.51.100.66", "x-forwarded-for": "203.0.113.7"}
    assert resolve_client(LB, None, headers, policy=policy(header=XFF)).ip == "203.0.113.7"
    assert resolve_client(LB, None, headers, policy=policy(header=FWD)).ip == "198.51.100.66"
    assert resolve_client(LB, None, headers,
                          policy=policy(header=ForwardedHeader.NONE)).via is Via.SOCKET


# --------------------------------------------------------- trio: reading the header


async def _pair_with(data: bytes, *, eof: bool = False) -> trio.abc.HalfCloseableStream:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(data)
    if eof:
        await client.send_eof()
    return server


@pytest.mark.trio
async def test_receive_proxy_header_returns_the_bytes_after_it_first() -> None:
    server = await _pair_with(encode_v1(CLIENT, ("10.0.0.1", 443)) + b"GET / HTTP/1.1\r\n",
                              eof=True)
    with trio.fail_after(5):
        result, stream = await receive_proxy_header(server)
        assert result.client == CLIENT
        assert isinstance(stream, PrefixedStream)
        got = b""
        while chunk := await stream.receive_some(4):
            assert len(chunk) <= 4
            got += chunk
    assert got == b"GET / HTTP/1.1\r\n"


@pytest.mark.trio
async def test_receive_proxy_header_in_pieces() -> None:
    header = encode_v2(CLIENT, ("10.0.0.1", 443))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        async def send() -> None:
            for i in range(len(header)):
                await client.send_all(header[i:i + 1])
                await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send)
        with trio.fail_after(5):
            result, stream = await receive_proxy_header(server)
    assert result.client == CLIENT
    assert stream is server  # nothing was read past the header


@pytest.mark.trio
async def test_receive_proxy_header_fails_fast_on_http(autojump_clock: trio.testing.MockClock
                                                       ) -> None:
    # The client never closes: a parser that waited would hit the deadline.
    server = await _pair_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(ProtocolViolation, match="not a PROXY"):
        await receive_proxy_header(server)
    assert trio.current_time() == start


@pytest.mark.trio
async def test_receive_proxy_header_eof_mid_header() -> None:
    server = await _pair_with(b"PROXY TCP4 1.2", eof=True)
    with trio.fail_after(5), pytest.raises(ProtocolViolation, match="connection closed"):
        await receive_proxy_header(server)


@pytest.mark.trio
async def test_prefixed_stream_forwards_everything_else() -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"abc")
    with trio.fail_after(5):
        assert await stream.receive_some() == b"abc"
        await client.send_all(b"de")
        assert await stream.receive_some(10) == b"de"
        await stream.send_all(b"xyz")
        assert await client.receive_some(10) == b"xyz"
        await stream.wait_send_all_might_not_block()
        await stream.send_eof()
        assert await client.receive_some(10) == b""
        await stream.aclose()
    assert stream.socket is None  # memory streams have none


@pytest.mark.trio
async def test_prefixed_stream_rejects_a_zero_read() -> None:
    stream = PrefixedStream(trio.testing.memory_stream_pair()[1], b"abc")
    with pytest.raises(ValueError):
        await stream.receive_some(0)
