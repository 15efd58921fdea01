"""The upstream HTTP/1.1 codec: requests written as h11 would, responses framed per RFC 9112
(checked against h11 on valid input, fed whole and byte by byte), strict on bad input."""

from __future__ import annotations

import h11
import pytest

from waypoint.http.client_h1 import Response, ResponseError, ResponseParser, render_request

LIMITS = {"max_head_bytes": 1024, "max_body_bytes": 100}


def parse(data: bytes, method: str = "GET", *, eof: bool = False, bytewise: bool = False,
          **limits: int) -> Response | None:
    parser = ResponseParser(method, **{**LIMITS, **limits})
    pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    result = None
    for piece in pieces:
        parser.feed(piece)
        result = parser.response()
    if eof:
        parser.feed(b"")
        result = parser.response()
    return result


def h11_parse(data: bytes, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(data)
    status, headers, body = 0, [], b""
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = [(n.decode(), v.decode("latin-1")) for n, v in event.headers]
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body


def test_a_request_is_written_as_h11_writes_it() -> None:
    headers = [("host", "reviews:9080"), ("x-a", "1"), ("content-length", "3")]
    data = render_request("POST", "/a?b=c", headers, b"abc")
    assert data == (b"POST /a?b=c HTTP/1.1\r\nhost: reviews:9080\r\nx-a: 1\r\n"
                    b"content-length: 3\r\n\r\nabc")
    connection = h11.Connection(h11.CLIENT)
    expected = connection.send(h11.Request(method="POST", target="/a?b=c", headers=headers))
    assert data == expected + connection.send(h11.Data(data=b"abc"))


@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/a b"), ("GET", ""), ("GET", "/caf\u00e9"), ("GE T", "/"), ("", "/"),
    ("GET", "/\r\nx: y"),
])
def test_a_bad_method_or_target_is_refused(method: str, target: str) -> None:
    with pytest.raises(ValueError):
        render_request(method, target, [("host", "x")], b"")


VALID = [
    ("GET", b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A:  spaced  \r\n\r\n"
            b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: t\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\nx: y\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n"),
    ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"),
    ("GET", b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok"),  # bare LF, as h11 accepts
    ("GET", b"HTTP/1.1 200\r\ncontent-length: 0\r\nEmpty:\r\n\r\n"),
]


@pytest.mark.parametrize(("method", "data"), VALID)
@pytest.mark.parametrize("bytewise", [False, True])
def test_valid_responses_read_as_h11_reads_them(method: str, data: bytes, bytewise: bool) -> None:
    response = parse(data, method, bytewise=bytewise)
    assert response is not None
    assert (response.status, response.headers, response.body) == h11_parse(data, method)
    assert response.reusable


def test_an_unframed_body_runs_to_the_end_of_the_stream() -> None:
    data = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    assert parse(data) is None
    response = parse(data, eof=True)
    assert response is not None and response.body == b"all of it"
    assert not response.reusable


@pytest.mark.parametrize("data", [
    b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",  # bytes after the response
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",  # both framings
])
def test_responses_that_end_the_connection(data: bytes) -> None:
    response = parse(data)
    assert response is not None and response.status == 200 and response.body == b"ok"
    assert not response.reusable


def test_obsolete_line_folding_is_joined() -> None:
    response = parse(b"HTTP/1.1 200 OK\r\nx-a: one\r\n  two\r\ncontent-length: 0\r\n\r\n")
    assert response is not None and ("x-a", "one two") in response.headers


@pytest.mark.parametrize(("data", "message"), [
    (b"SPDY/9 what\r\n\r\n", "status line"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", "101"),
    (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nx: a\x00b\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\n x: folded first\r\n\r\n", "continuation"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "transfer coding"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokX\r\n", "CRLF"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 101\r\n\r\n", "exceeds 100"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n65\r\n" + b"y" * 101, "exceeds 100"),
    (b"HTTP/1.1 200 OK\r\n" + b"x: " + b"y" * 1100 + b"\r\n\r\n", "head exceeds 1024"),
])
def test_bad_responses_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ResponseError) as caught:
        parse(data, bytewise=True)
    assert message in caught.value.reason
    assert not caught.value.incomplete


def test_an_unframed_body_over_the_limit_is_refused() -> None:
    with pytest.raises(ResponseError, match="exceeds 100"):
        parse(b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 101)


@pytest.mark.parametrize("data", [
    b"", b"HTTP/1.1 200 OK\r\ncontent-", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n",
])
def test_a_stream_ending_mid_response_is_incomplete(data: bytes) -> None:
    parser = ResponseParser("GET", **LIMITS)
    if data:
        parser.feed(data)
        assert parser.response() is None
    parser.feed(b"")
    with pytest.raises(ResponseError) as caught:
        parser.response()
    assert caught.value.incomplete
    assert parser.received == bool(data)
