"""Sans-IO HBONE request rules: parse_connect and connect_headers."""

from __future__ import annotations

import ipaddress
import re

import pytest

from ambient_dataplane.hbone.errors import HboneRejection, MalformedHeaders
from ambient_dataplane.hbone.protocol import (
    ConnectRequest,
    connect_headers,
    format_authority,
    parse_baggage,
    parse_connect,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers]


def connect(authority: str, *extra: tuple[str, str]) -> ConnectRequest:
    return parse_connect(encode([(":method", "CONNECT"), (":authority", authority), *extra]))


def rejected(headers: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> HboneRejection:
    raw = encode(headers) if headers and isinstance(headers[0][0], str) else headers
    with pytest.raises(HboneRejection) as error:
        parse_connect(raw)  # type: ignore[arg-type]
    return error.value


def test_ipv4_and_ipv6_targets() -> None:
    request = connect("10.1.2.3:8080")
    assert request.host == ipaddress.IPv4Address("10.1.2.3")
    assert request.port == 8080
    assert request.authority == "10.1.2.3:8080"
    request = connect("[fd00::1]:443")
    assert request.host == ipaddress.IPv6Address("fd00::1")
    assert request.port == 443


def test_metadata_headers_are_parsed() -> None:
    request = connect(
        "10.0.0.1:80",
        ("forwarded", 'for="10.0.0.9:5555";host=reviews.default.svc.cluster.local'),
        ("baggage", "k8s.namespace.name=default,service.name=re%20views;prop=1,junk"),
        ("traceparent", TRACEPARENT),
        ("x-extra", "kept"),
    )
    assert request.forwarded_for == "10.0.0.9:5555"
    assert request.forwarded_host == "reviews.default.svc.cluster.local"
    assert request.baggage == {"k8s.namespace.name": "default", "service.name": "re views"}
    assert request.traceparent == TRACEPARENT
    assert ("x-extra", "kept") in request.headers


def test_missing_metadata_is_none() -> None:
    request = connect("10.0.0.1:80")
    assert (request.forwarded_for, request.traceparent, request.baggage) == (None, None, {})


def test_invalid_traceparent_is_ignored_not_rejected() -> None:
    assert connect("10.0.0.1:80", ("traceparent", "garbage")).traceparent is None


@pytest.mark.parametrize(
    ("authority", "reason"),
    [
        ("10.0.0.1", "expected ip:port"),
        ("reviews.default.svc:80", "not an IP"),
        ("10.0.0.1:0", "invalid port"),
        ("10.0.0.1:65536", "invalid port"),
        ("10.0.0.1:+80", "invalid port"),
        ("10.0.0.1: 80", "invalid port"),
        ("10.0.0.1:", "invalid port"),
        ("fd00::1:80", "IPv6 needs brackets"),
        ("[fd00::1]", "expected [ipv6]:port"),
        ("[10.0.0.1]:80", "brackets need IPv6"),
        ("[fe80::1%eth0]:80", "zone id"),
        ("010.0.0.1:80", "not an IP"),
    ],
)
def test_bad_authority_is_400(authority: str, reason: str) -> None:
    error = rejected([(":method", "CONNECT"), (":authority", authority)])
    assert error.status == 400
    assert reason in error.reason


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(":method", "GET"), (":authority", "10.0.0.1:80"), (":scheme", "https"),
          (":path", "/")], "is not CONNECT"),
        ([(":authority", "10.0.0.1:80")], "missing :method"),
        ([(":method", "CONNECT")], "missing :authority"),
        ([(":method", "CONNECT"), (":authority", "")], "missing :authority"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")],
         "must not carry :scheme or :path"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":scheme", "https")],
         "must not carry :scheme or :path"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":protocol", "websocket"),
          (":scheme", "https"), (":path", "/")], "extended CONNECT"),
    ],
)
def test_malformed_requests_are_400(headers: list[tuple[str, str]], reason: str) -> None:
    error = rejected(headers)
    assert error.status == 400
    assert reason in error.reason


@pytest.mark.parametrize(
    ("header", "value", "reason"),
    [("X-Upper", "1", "lower-case token"), ("te", "gzip", "connection-specific")],
)
def test_a_malformed_header_block_is_a_400_naming_the_header(
    header: str, value: str, reason: str
) -> None:
    """The RFC 9113 rules themselves: tests/unit/test_hbone_request_headers.py."""
    error = rejected([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (header, value)])
    assert isinstance(error, MalformedHeaders)
    assert (error.status, error.header) == (400, header)
    assert reason in error.reason


def test_non_ascii_is_400() -> None:
    error = rejected([(b":method", b"CONNECT"), (b":authority", "10.0.0.1:8\xe9".encode())])
    assert (error.status, error.reason) == (400, "header name or value is not ASCII")


def test_te_trailers_is_allowed() -> None:
    assert connect("10.0.0.1:80", ("te", "trailers")).port == 80


def test_connect_headers_round_trip() -> None:
    headers = connect_headers(
        "10.0.0.1:9080",
        forwarded_for="10.0.0.9:40000",
        service_host="reviews.default.svc.cluster.local",
        baggage={"k8s.cluster.name": "Kubernetes", "service.version": "v1,beta"},
        traceparent=TRACEPARENT,
    )
    assert headers[:2] == [(":method", "CONNECT"), (":authority", "10.0.0.1:9080")]
    values = dict(headers)
    assert values["forwarded"] == 'for="10.0.0.9:40000";host=reviews.default.svc.cluster.local'
    assert values["traceparent"] == TRACEPARENT
    request = parse_connect(encode(headers))
    assert request.forwarded_for == "10.0.0.9:40000"
    assert request.baggage == {"k8s.cluster.name": "Kubernetes", "service.version": "v1,beta"}
    assert request.traceparent == TRACEPARENT


def test_connect_headers_creates_a_traceparent_when_missing_or_invalid() -> None:
    created = [dict(connect_headers("10.0.0.1:80", forwarded_for=None, traceparent=given))
               for given in (None, "not-a-traceparent", None)]
    for values in created:
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", values["traceparent"])
        assert "forwarded" not in values
        assert "baggage" not in values
    assert created[0]["traceparent"] != created[2]["traceparent"]


def test_ipv6_forwarded_and_authority_formatting() -> None:
    assert format_authority("fd00::1", 80) == "[fd00::1]:80"
    assert format_authority(ipaddress.IPv4Address("10.0.0.1"), 80) == "10.0.0.1:80"
    headers = connect_headers("[fd00::1]:80", forwarded_for="[fd00::9]:5000")
    assert parse_connect(encode(headers)).forwarded_for == "[fd00::9]:5000"


def test_parse_baggage_is_lenient() -> None:
    assert parse_baggage("") == {}
    assert parse_baggage(" a = 1 , =x, b=2;p=q, c") == {"a": "1", "b": "2"}
