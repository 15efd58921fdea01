"""The one RFC 9113 request header validation, shared by the HBONE server (CONNECTs) and the
waypoint's HTTP/2 server: what it accepts, and the header each refusal names."""

from __future__ import annotations

import pytest

from ambient_dataplane.hbone import MalformedHeaders, validate_request_headers
from ambient_dataplane.hbone.request_headers import REQUEST_PSEUDO_HEADERS

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
GET = [(":method", "GET"), (":scheme", "http"), (":path", "/")]


def encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def test_a_valid_block_is_split_into_pseudo_and_regular_headers() -> None:
    block = validate_request_headers(encode(
        [*GET, (":authority", "svc:80"), ("te", "trailers"), ("x-h", "v"), ("x-h", "w"),
         ("trailer", "x-checksum"), ("x-latin", "caf\xe9")]
    ))
    assert block.pseudo == {":method": "GET", ":scheme": "http", ":path": "/",
                            ":authority": "svc:80"}
    assert block.regular == [("te", "trailers"), ("x-h", "v"), ("x-h", "w"),
                             ("trailer", "x-checksum"), ("x-latin", "caf\xe9")]


def test_extra_pseudo_headers_are_known_only_when_the_server_says_so() -> None:
    extended = encode([*CONNECT, (":protocol", "websocket")])
    with pytest.raises(MalformedHeaders, match="unknown request pseudo-header :protocol"):
        validate_request_headers(extended)
    block = validate_request_headers(
        extended, pseudo_headers=REQUEST_PSEUDO_HEADERS | {":protocol"}
    )
    assert block.pseudo[":protocol"] == "websocket"


@pytest.mark.parametrize(
    ("headers", "header", "fragment"),
    [
        ([(":method", "CONNECT"), ("x", "y"), (":authority", "10.0.0.1:80")], ":authority",
         "after regular headers"),
        ([*GET, ("x", "1"), (":path", "/")], ":path", "after regular headers"),
        ([*CONNECT, (":status", "200")], ":status", "unknown request pseudo-header"),
        ([(":method", "CONNECT"), *CONNECT], ":method", "duplicate pseudo-header"),
        ([*GET, (":path", "/")], ":path", "duplicate pseudo-header"),
        ([*CONNECT, ("X-Upper", "1")], "X-Upper", "is not a lower-case token"),
        ([*GET, ("Upper", "1")], "Upper", "is not a lower-case token"),
        ([*GET, ("a b", "1")], "a b", "is not a lower-case token"),
        ([*GET, ("x-h\n", "1")], "x-h\n", "is not a lower-case token"),
        ([*GET, ("caf\xe9", "1")], "caf\xe9", "is not a lower-case token"),
        ([*GET, ("", "1")], "", "empty header name"),
        ([*GET, ("x-h", "a\r\nb")], "x-h", "has a control character"),
        ([*GET, ("x-h", "a\x00")], "x-h", "has a control character"),
        ([(":method", "GET"), (":path", "/\x01"), (":scheme", "http")], ":path",
         "has a control character"),
        ([*CONNECT, ("connection", "close")], "connection", "connection-specific"),
        ([*GET, ("keep-alive", "5")], "keep-alive", "connection-specific"),
        ([*GET, ("proxy-connection", "x")], "proxy-connection", "connection-specific"),
        ([*GET, ("transfer-encoding", "chunked")], "transfer-encoding", "connection-specific"),
        ([*GET, ("upgrade", "h2c")], "upgrade", "connection-specific"),
        ([*CONNECT, ("te", "gzip")], "te", "connection-specific"),
        ([*GET, ("te", "trailers, gzip")], "te", "connection-specific"),
    ],
)
def test_malformed_blocks_name_the_header(
    headers: list[tuple[str, str]], header: str, fragment: str
) -> None:
    with pytest.raises(MalformedHeaders) as caught:
        validate_request_headers(encode(headers))
    error = caught.value
    assert (error.header, error.status, error.status_hint) == (header, 400, 400)
    assert fragment in error.reason
