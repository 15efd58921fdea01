"""Sans-IO parts of the waypoint's HTTP engine: sniffing, the request model, header hygiene,
HTTP/2 request validation and response framing."""

from __future__ import annotations

import pytest

from waypoint.http import (
    H2_PREFACE,
    HttpRequest,
    HttpRequestError,
    HttpResponse,
    error_response,
    looks_like_http,
    modify_headers,
    request_from_h2_headers,
    response_wire_form,
    sendable_headers,
    strip_hop_by_hop,
)


@pytest.mark.parametrize(
    "prefix",
    [
        b"GET / HTTP/1.1\r\n",
        b"POST /api?x=1 HTTP/1.0\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\n",
        b"M-SEARCH * HTTP/1.1\r\n",
        H2_PREFACE,
        H2_PREFACE + b"\x00\x00\x00\x04",
    ],
)
def test_looks_like_http_true(prefix: bytes) -> None:
    assert looks_like_http(prefix) is True


@pytest.mark.parametrize(
    "prefix",
    [b"", b"G", b"GET", b"GET ", b"GET /index", b"GET / ", b"GET / HTTP/1", b"GET / HTTP/1.1",
     b"GET / HTTP/1.1\r", b"PRI * HTTP/2.0\r\n", b"P"],
)
def test_looks_like_http_needs_more(prefix: bytes) -> None:
    assert looks_like_http(prefix) is None


@pytest.mark.parametrize(
    "prefix",
    [
        b"\x16\x03\x01\x02\x00",  # TLS ClientHello
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"get / HTTP/1.1\r\n",  # methods are case-sensitive
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/2.0\r\n",
        b"GET / FTP/1.1\r\n",
        b"GET /\x01 HTTP/1.1\r\n",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n",
        b"GET / HTTP/1.1x",
        b"\x00\x00\x12\x04",
    ],
)
def test_looks_like_http_false(prefix: bytes) -> None:
    assert looks_like_http(prefix) is False


def _request(**changes: object) -> HttpRequest:
    base = HttpRequest(
        method="GET", target="/a/b?x=1&y=hello%20world&z=&x=2", body=b"",
        headers=(("accept", "text/html"), ("x-tag", "one"), ("x-tag", "two")),
        authority="reviews.default.svc.cluster.local:9080",
    )
    return base.replace(**changes)


def test_request_path_query_and_headers() -> None:
    request = _request()
    assert request.path == "/a/b"
    assert request.query == [("x", "1"), ("y", "hello world"), ("z", ""), ("x", "2")]
    assert request.header("X-Tag") == "one, two"
    assert request.header_values("x-tag") == ["one", "two"]
    assert request.header("missing") is None
    assert _request(target="/plain").query == []
    assert _request(target="/plain").path == "/plain"


def test_request_updates_are_immutable() -> None:
    request = _request()
    changed = request.with_headers(
        set={"X-Tag": "three"}, add=[("x-new", "1")], remove=["accept"]
    )
    assert changed.headers == (("x-tag", "three"), ("x-new", "1"))
    assert request.header("x-tag") == "one, two"  # the original is untouched
    moved = request.replace(target="/v2/b", authority="other:80")
    assert (moved.path, moved.authority, moved.method) == ("/v2/b", "other:80", "GET")
    response = HttpResponse(200, (("server", "app"),), b"ok")
    assert response.with_headers(add={"x-b": "1"}).header("x-b") == "1"
    assert response.header("server") == "app"


def test_modify_headers_set_keeps_position_and_appends_when_new() -> None:
    headers = (("a", "1"), ("b", "2"), ("a", "3"))
    assert modify_headers(headers, set=[("a", "9")]) == (("a", "9"), ("b", "2"))
    assert modify_headers(headers, set=[("c", "4")]) == (*headers, ("c", "4"))


def test_strip_hop_by_hop_includes_connection_named_headers() -> None:
    headers = (
        ("connection", "keep-alive, X-Private"), ("keep-alive", "timeout=5"),
        ("transfer-encoding", "chunked"), ("te", "trailers"), ("upgrade", "websocket"),
        ("proxy-connection", "keep-alive"), ("trailer", "x"), ("x-private", "secret"),
        ("x-kept", "yes"),
    )
    assert strip_hop_by_hop(headers) == (("x-kept", "yes"),)


def test_sendable_headers_drops_what_cannot_be_written() -> None:
    kept, dropped = sendable_headers(
        [("ok", " padded "), ("bad name", "v"), ("x-crlf", "a\r\nInjected: 1"),
         ("x-uni", "caf\u00e9"), ("x-emoji", "\U0001f600"), ("X-Upper", "v")]
    )
    assert kept == (("ok", "padded"), ("x-uni", "caf\u00e9"), ("x-upper", "v"))
    assert dropped == ["bad name", "x-crlf", "x-emoji"]


def test_error_response() -> None:
    response = error_response(503, "no healthy upstream", "UH")
    assert response.status == 503
    assert response.body == b"no healthy upstream\n"
    assert response.header("content-type") == "text/plain; charset=utf-8"
    assert response.response_flags == "UH"
    assert error_response(404).body == b"Not Found\n"


def test_response_wire_form_reframes_the_body() -> None:
    response = HttpResponse(
        200, (("content-length", "999"), ("transfer-encoding", "chunked"), ("x-a", "1")), b"hi"
    )
    headers, body = response_wire_form(response, "GET")
    assert headers == (("x-a", "1"), ("content-length", "2"))
    assert body == b"hi"


def test_response_wire_form_no_body_cases() -> None:
    head = HttpResponse(200, (("content-length", "1234"),), b"")
    assert response_wire_form(head, "HEAD") == ((("content-length", "1234"),), b"")
    # A generated answer to HEAD describes the body it would have had.
    generated = error_response(404)
    headers, body = response_wire_form(generated, "HEAD")
    assert ("content-length", str(len(generated.body))) in headers and body == b""
    assert response_wire_form(HttpResponse(204, (("content-length", "5"),), b"xxxxx"), "GET") \
        == ((), b"")
    assert response_wire_form(HttpResponse(304, (("etag", '"1"'),), b"x"), "GET") \
        == ((("etag", '"1"'),), b"")


def _h2(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def test_request_from_h2_headers_maps_pseudo_headers() -> None:
    request, declared = request_from_h2_headers(_h2(
        (":method", "POST"), (":scheme", "https"), (":authority", "svc:80"),
        (":path", "/p?q=1"), ("content-length", "3"), ("cookie", "a=1"), ("cookie", "b=2"),
        ("te", "trailers"), ("x-h", "v"),
    ))
    assert (request.method, request.target, request.authority) == ("POST", "/p?q=1", "svc:80")
    assert (request.scheme, request.http_version, declared) == ("https", "2", 3)
    assert request.headers == (("x-h", "v"), ("cookie", "a=1; b=2"))


def test_request_from_h2_headers_falls_back_to_host() -> None:
    request, _ = request_from_h2_headers(_h2(
        (":method", "GET"), (":scheme", "http"), (":path", "/"), ("host", "h:1"),
    ))
    assert request.authority == "h:1"
    assert request.headers == ()


@pytest.mark.parametrize(
    ("pairs", "status", "fragment"),
    [
        ([(":scheme", "http"), (":path", "/")], 400, "missing :method"),
        ([(":method", "GET"), (":scheme", "http")], 400, "missing :path"),
        ([(":method", "GET"), (":path", "/")], 400, "missing :scheme"),
        # The RFC 9113 block rules (tests/unit/test_hbone_request_headers.py), as 400s:
        ([(":method", "GET"), (":scheme", "http"), (":path", "/"), ("Upper", "1")], 400,
         "lower-case"),
        ([(":method", "GET"), (":scheme", "http"), (":path", "/"), ("connection", "close")],
         400, "connection-specific"),
        ([(":method", "GET"), (":scheme", "http"), (":path", "relative")], 400, "origin-form"),
        ([(":method", "POST"), (":scheme", "http"), (":path", "/"), ("content-length", "x")],
         400, "invalid content-length"),
        ([(":method", "CONNECT"), (":authority", "a:1")], 405, "CONNECT"),
    ],
)
def test_request_from_h2_headers_rejects(
    pairs: list[tuple[str, str]], status: int, fragment: str
) -> None:
    with pytest.raises(HttpRequestError) as caught:
        request_from_h2_headers(_h2(*pairs))
    assert caught.value.status == status
    assert fragment in caught.value.reason
