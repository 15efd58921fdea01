"""ztunnel.proxyproto: PROXY protocol v1/v2 header parsing (the embedded mode's 15006)."""

from __future__ import annotations

import pytest

from ztunnel.proxyproto import (
    MAX_HEADER_LENGTH,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_v1_header,
    build_v2_header,
    parse_proxy_header,
)

V1 = b"PROXY TCP4 127.0.20.5 127.0.20.9 41234 8080\r\n"
V1_HEADER = ProxyHeader(("127.0.20.5", 41234), ("127.0.20.9", 8080), 1)


def v2(command: int, family_transport: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family_transport]) + \
        len(block).to_bytes(2, "big") + block


def test_v1_tcp4_with_payload_after() -> None:
    assert parse_proxy_header(V1 + b"GET / HTTP/1.1\r\n") == (len(V1), V1_HEADER)


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 fd00::1 fd00:0::2 1 65535\r\n"
    assert parse_proxy_header(line) == (
        len(line), ProxyHeader(("fd00::1", 1), ("fd00::2", 65535), 1))


def test_v1_unknown_has_no_addresses() -> None:
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parse_proxy_header(line) == (len(line), ProxyHeader(None, None, 1))
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, ProxyHeader(None, None, 1))


def test_every_prefix_of_a_header_needs_more() -> None:
    for header in (V1, build_v2_header(("10.0.0.1", 1), ("10.0.0.2", 2))):
        for cut in range(len(header)):
            assert parse_proxy_header(header[:cut]) is None, cut
        assert parse_proxy_header(header) == (len(header), parse_proxy_header(header)[1])  # type: ignore[index]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),
        (b"PROXI ", "must start with 'PROXY '"),
        (b"PROXY TCP5 1.1.1.1 2.2.2.2 1 2\r\n", "'TCP5' is not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.1.1.1 2.2.2.2 1\r\n", "does not have the form"),
        (b"PROXY TCP4 1.1.1.1  2.2.2.2 1 2\r\n", "does not have the form"),
        (b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2 \r\n", "does not have the form"),
        (b"PROXY TCP4 fd00::1 2.2.2.2 1 2\r\n", "source address 'fd00::1' is not IPv4"),
        (b"PROXY TCP6 fd00::1 2.2.2.2 1 2\r\n", "destination address '2.2.2.2' is not IPv6"),
        (b"PROXY TCP4 1.1.1 2.2.2.2 1 2\r\n", "source address '1.1.1' is not an IP"),
        (b"PROXY TCP4 1.1.1.1 2.2.2.2 1 65536\r\n", "destination port 65536 is out of range"),
        (b"PROXY TCP4 1.1.1.1 2.2.2.2 01 2\r\n", "source port '01' is not a decimal"),
        (b"PROXY TCP4 1.1.1.1 2.2.2.2 -1 2\r\n", "source port '-1'"),
        (b"PROXY TCP4 1.1.1.1 2.2.2.2 1 \xd9\xa3\r\n", "not ASCII"),
        (b"PROXY\r\n", "must start with 'PROXY '"),
        (b"PROXY TCP4 1.1.1.1\n2.2.2.2", "without CR before LF"),
        (b"PROXY " + b"A" * 200, f"no CRLF within {V1_MAX_LENGTH} bytes"),
    ],
)
def test_v1_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(data)


def test_v1_longest_legal_header() -> None:
    full = b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    longest = b"PROXY UNKNOWN " + full + b" " + full + b" 65535 65535\r\n"
    assert len(longest) == V1_MAX_LENGTH
    assert parse_proxy_header(longest) == (V1_MAX_LENGTH, ProxyHeader(None, None, 1))
    tcp6 = b"PROXY TCP6 " + full + b" " + full + b" 65535 65535\r\n"
    assert parse_proxy_header(tcp6) == (
        len(tcp6), ProxyHeader(("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                               ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), 1))
    with pytest.raises(ProxyProtocolError, match="no CRLF"):
        parse_proxy_header(longest[:-2] + b"x\r\n")


def test_v2_ipv4_with_tlvs_and_payload() -> None:
    block = bytes([127, 0, 20, 5, 127, 0, 20, 9]) + (41234).to_bytes(2, "big") + \
        (8080).to_bytes(2, "big")
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP, ignored
    header = v2(1, 0x11, block + tlv)
    assert parse_proxy_header(header + b"payload") == (
        len(header), ProxyHeader(("127.0.20.5", 41234), ("127.0.20.9", 8080), 2))


def test_v2_ipv6() -> None:
    header = build_v2_header(("fd00::1", 5), ("fd00::2", 15006))
    assert parse_proxy_header(header) == (
        len(header), ProxyHeader(("fd00::1", 5), ("fd00::2", 15006), 2))


def test_v2_local_and_unspec_and_unix_have_no_addresses() -> None:
    assert parse_proxy_header(v2(0, 0x00, b"")) == (16, ProxyHeader(None, None, 2))
    assert parse_proxy_header(v2(1, 0x00, b"xyz")) == (19, ProxyHeader(None, None, 2))
    assert parse_proxy_header(v2(1, 0x31, bytes(216))) == (232, ProxyHeader(None, None, 2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (V2_SIGNATURE[:5] + b"X", "do not match the PROXY protocol v2 signature"),
        (V2_SIGNATURE + b"\x11\x11\x00\x00", "version 1, expected 2"),
        (V2_SIGNATURE + b"\x22\x11\x00\x00", "unknown command 0x2"),
        (v2(1, 0x41, bytes(12)), "unknown address family 0x4"),
        (v2(1, 0x12, bytes(12)), "transport 0x2 is not STREAM"),
        (v2(1, 0x11, bytes(11)), "address block is 11 bytes, family 0x1 needs 12"),
        (v2(1, 0x21, bytes(12)), "address block is 12 bytes, family 0x2 needs 36"),
    ],
)
def test_v2_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(data)


def test_v2_header_length_is_bounded() -> None:
    fixed = V2_SIGNATURE + b"\x21\x11\xff\xff"
    assert parse_proxy_header(fixed + bytes(100)) is None
    complete = fixed + bytes(0xFFFF)
    assert len(complete) == MAX_HEADER_LENGTH
    parsed = parse_proxy_header(complete + b"more")
    assert parsed is not None and parsed[0] == MAX_HEADER_LENGTH


def test_builders_round_trip() -> None:
    source, destination = ("127.0.20.5", 40000), ("127.0.20.9", 9080)
    for build, version in ((build_v1_header, 1), (build_v2_header, 2)):
        header = build(source, destination)
        assert parse_proxy_header(header) == (len(header),
                                              ProxyHeader(source, destination, version))
        with pytest.raises(ValueError, match="both be IPv4 or both IPv6"):
            build(source, ("::1", 1))
