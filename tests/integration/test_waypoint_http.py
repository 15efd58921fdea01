"""serve_http over real loopback TCP: HTTP/1.1 keep-alive, pipelining, bodies, refusals,
timeouts, handler failures, and HTTP/2 prior knowledge driven by the h2 library."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import h2.config
import h2.connection
import h2.errors
import h2.events
import h11
import pytest
import trio

from waypoint.http import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    looks_like_http,
    serve_http,
)

pytestmark = pytest.mark.timeout(20)

PORT = 8080


@dataclass
class Server:
    host: str
    port: int
    seen: list[HttpRequest] = field(default_factory=list)
    connections: int = 0


async def echo(server: Server, request: HttpRequest) -> HttpResponse:
    """Says what it saw; ``/slow`` answers late (to show pipelined answers keep order)."""
    server.seen.append(request)
    if request.path == "/slow":
        await trio.sleep(0.05)
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    body = json.dumps({
        "method": request.method, "target": request.target, "authority": request.authority,
        "version": request.http_version, "body": request.body.decode("latin-1"),
        "headers": [list(pair) for pair in request.headers],
    }).encode()
    return HttpResponse(
        200,
        (("content-type", "application/json"), ("connection", "x-secret"), ("x-secret", "1"),
         ("transfer-encoding", "chunked"), ("content-length", "1"), ("x-served", "yes")),
        body,
    )


async def start_server(
    nursery: trio.Nursery,
    host: str,
    limits: HttpLimits = HttpLimits(),  # noqa: B008
    handler: Callable[[Server, HttpRequest], object] = echo,
) -> Server:
    server = Server(host, PORT)

    async def on_connection(stream: trio.SocketStream) -> None:
        server.connections += 1
        await serve_http(stream, partial(handler, server), limits)  # type: ignore[arg-type]

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))
    return server


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    with trio.fail_after(5):
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks)


@dataclass
class Parsed:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[Parsed]:
    """Split a byte stream of Content-Length-framed responses (what serve_http writes)."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        responses.append(Parsed(int(status_line.split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


async def h11_exchange(
    stream: trio.SocketStream, conn: h11.Connection, method: str, target: str,
    headers: list[tuple[str, str]] | None = None, body: bytes = b"",
) -> Parsed:
    all_headers = [("host", "svc.local:80"), *(headers or [])]
    if body:
        all_headers.append(("content-length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    status, response_headers, chunks = 0, {}, []
    with trio.fail_after(5):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event}")
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    return Parsed(status, response_headers, b"".join(chunks))


async def test_keep_alive_three_sequential_requests(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    conn = h11.Connection(h11.CLIENT)
    for index in range(3):
        response = await h11_exchange(stream, conn, "GET", f"/item/{index}?q={index}")
        assert response.status == 200
        assert response.json()["target"] == f"/item/{index}?q={index}"
        assert response.json()["authority"] == "svc.local:80"
    assert server.connections == 1
    # Hop-by-hop headers from the handler (and those its Connection names) were stripped and
    # the body re-framed with the right length.
    assert "x-secret" not in response.headers
    assert "transfer-encoding" not in response.headers
    assert response.headers["content-length"] == str(len(response.body))
    assert response.headers["x-served"] == "yes"
    await stream.aclose()


async def test_pipelined_requests_answered_in_order(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    await stream.send_all(
        b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /fast HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    responses = parse_responses(await read_until_eof(stream))
    assert [r.json()["target"] for r in responses] == ["/slow", "/fast"]
    assert responses[1].headers["connection"] == "close"


async def test_chunked_request_body(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    await stream.send_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-End: 2\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/upload",
                          headers=[("host", "a"), ("transfer-encoding", "chunked")]))
    conn.send(h11.EndOfMessage())
    with trio.fail_after(5):
        while not isinstance(event := conn.next_event(), h11.Data):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
    seen = server.seen[0]
    assert seen.body == b"hello world"
    assert seen.headers == (("x-end", "2"),)  # hop-by-hop and Host are not the handler's
    await stream.aclose()


async def test_connection_close_and_http10(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    await stream.send_all(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    [response] = parse_responses(await read_until_eof(stream))
    assert response.status == 200 and response.headers["connection"] == "close"

    old = await trio.open_tcp_stream(server.host, PORT)
    await old.send_all(b"GET /old HTTP/1.0\r\n\r\n")
    [response] = parse_responses(await read_until_eof(old))
    assert response.status == 200
    assert response.json()["version"] == "1.0"
    assert response.json()["authority"] == ""


async def test_expect_100_continue(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    await stream.send_all(
        b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    with trio.fail_after(5):
        interim = await stream.receive_some(65536)
    assert interim.startswith(b"HTTP/1.1 100 ")
    await stream.send_all(b"data")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="PUT", target="/x",
                          headers=[("host", "a"), ("content-length", "4")]))
    with trio.fail_after(5):
        while not isinstance(event := conn.next_event(), h11.Response):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
    assert event.status_code == 200
    assert server.seen[0].body == b"data"
    assert server.seen[0].header("expect") is None
    await stream.aclose()


async def test_absolute_form_target(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    await stream.send_all(b"GET http://other:9/p?q=1 HTTP/1.1\r\nHost: a\r\n"
                          b"Connection: close\r\n\r\n")
    [response] = parse_responses(await read_until_eof(stream))
    assert (response.json()["target"], response.json()["authority"]) == ("/p?q=1", "other:9")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 2000 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n", 413),
    ],
)
async def test_refusals_answer_and_close(
    loopback, nursery: trio.Nursery, request_bytes: bytes, status: int
) -> None:
    limits = HttpLimits(max_header_bytes=1024, max_body_bytes=1000)
    server = await start_server(nursery, loopback.new(), limits)
    stream = await trio.open_tcp_stream(server.host, PORT)
    await stream.send_all(request_bytes)
    [response] = parse_responses(await read_until_eof(stream))  # and the server closed
    assert response.status == status
    assert response.headers["connection"] == "close"
    assert response.headers["content-type"].startswith("text/plain")
    assert server.seen == []


async def test_oversized_head_in_many_writes_is_431(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new(), HttpLimits(max_header_bytes=1024))
    stream = await trio.open_tcp_stream(server.host, PORT)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
    for _ in range(10):
        await stream.send_all(b"X-Pad: " + b"y" * 200 + b"\r\n")
    [response] = parse_responses(await read_until_eof(stream))
    assert response.status == 431


async def test_handler_exception_is_500_and_server_keeps_serving(
    loopback, nursery: trio.Nursery
) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    conn = h11.Connection(h11.CLIENT)
    assert (await h11_exchange(stream, conn, "GET", "/boom")).status == 500
    # The same connection goes on, and so do new ones.
    assert (await h11_exchange(stream, conn, "GET", "/after")).status == 200
    other = await trio.open_tcp_stream(server.host, PORT)
    assert (await h11_exchange(other, h11.Connection(h11.CLIENT), "GET", "/x")).status == 200


async def test_head_request_gets_no_body(loopback, nursery: trio.Nursery) -> None:
    server = await start_server(nursery, loopback.new())
    stream = await trio.open_tcp_stream(server.host, PORT)
    conn = h11.Connection(h11.CLIENT)
    response = await h11_exchange(stream, conn, "HEAD", "/h")
    assert response.status == 200 and response.body == b""
    assert int(response.headers["content-length"]) > 0
    assert (await h11_exchange(stream, conn, "GET", "/next")).status == 200


async def test_idle_and_header_timeouts_close(loopback, nursery: trio.Nursery) -> None:
    limits = HttpLimits(idle_timeout=0.2, header_timeout=0.2)
    server = await start_server(nursery, loopback.new(), limits)
    idle = await trio.open_tcp_stream(server.host, PORT)
    assert await read_until_eof(idle) == b""  # closed without a word
    slow = await trio.open_tcp_stream(server.host, PORT)
    await slow.send_all(b"GET / HTTP/1.1\r\nHo")
    [response] = parse_responses(await read_until_eof(slow))
    assert response.status == 408


async def test_initial_bytes_from_sniffing(loopback, nursery: trio.Nursery) -> None:
    host = loopback.new()
    seen: list[HttpRequest] = []

    async def handler(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse(200, (), b"sniffed")

    async def on_connection(stream: trio.SocketStream) -> None:
        prefix = b""
        while (verdict := looks_like_http(prefix)) is None:
            prefix += await stream.receive_some(3)  # tiny reads: sniffing sees partial lines
        assert verdict is True
        await serve_http(stream, handler, initial_bytes=prefix)

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))
    stream = await trio.open_tcp_stream(host, PORT)
    await stream.send_all(b"GET /sniff HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    [response] = parse_responses(await read_until_eof(stream))
    assert response.body == b"sniffed"
    assert seen[0].target == "/sniff"


# ---------------------------------------------------------------------------------------------
# HTTP/2 prior knowledge


class H2Client:
    """A small h2 client over TCP for driving the server's HTTP/2 side."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.responses: dict[int, dict[str, object]] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.resets: list[int] = []

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def request(
        self, method: str, path: str, headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes = b"", *, end: bool = True,
    ) -> int:
        """Open a stream (chunking the body by the peer's frame size; it must fit in the
        initial window); ``end=False`` leaves the request open."""
        stream_id = self.conn.get_next_available_stream_id()
        block = [(":method", method), (":scheme", "http"), (":authority", "svc:80"),
                 (":path", path), *headers]
        self.conn.send_headers(stream_id, block, end_stream=end and not body)
        size = self.conn.max_outbound_frame_size
        for start in range(0, len(body), size):
            last = start + size >= len(body)
            self.conn.send_data(stream_id, body[start:start + size], end_stream=end and last)
        await self.flush()
        self.responses[stream_id] = {"headers": {}, "body": b"", "done": False}
        return stream_id

    async def pump_until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not done():
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                for event in self.conn.receive_data(data):
                    self._on(event)
                await self.flush()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.responses[event.stream_id]["headers"] = {
                bytes(k).decode(): bytes(v).decode() for k, v in event.headers
            }
        elif isinstance(event, h2.events.DataReceived):
            entry = self.responses[event.stream_id]
            entry["body"] = entry["body"] + event.data  # type: ignore[operator]
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id]["done"] = True
        elif isinstance(event, h2.events.StreamReset):
            self.resets.append(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    def all_done(self, ids: list[int]) -> Callable[[], bool]:
        return lambda: all(self.responses[i]["done"] for i in ids)


async def test_h2_prior_knowledge_concurrent_streams(loopback, nursery: trio.Nursery) -> None:
    host = loopback.new()
    arrived: list[str] = []
    all_arrived = trio.Event()

    async def handler(request: HttpRequest) -> HttpResponse:
        arrived.append(request.path)
        if len(arrived) == 3:
            all_arrived.set()
        await all_arrived.wait()  # only possible if the three are handled concurrently
        body = f"{request.method} {request.target} {request.authority} {len(request.body)}"
        return HttpResponse(200, (("X-Mixed-Case", "v"), ("connection", "close")),
                            body.encode() * 1000)

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http(stream, handler)

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))
    client = H2Client(await trio.open_tcp_stream(host, PORT))
    await client.start()
    ids = [
        await client.request("GET", "/one"),
        await client.request("POST", "/two?x=1", body=b"x" * 60_000),
        await client.request("GET", "/three"),
    ]
    await client.pump_until(client.all_done(ids))
    assert sorted(arrived) == ["/one", "/three", "/two"]
    first, second, _ = (client.responses[i] for i in ids)
    assert first["headers"][":status"] == "200"  # type: ignore[index]
    assert first["headers"]["x-mixed-case"] == "v"  # type: ignore[index]
    assert "connection" not in first["headers"]  # type: ignore[operator]
    assert second["body"] == b"POST /two?x=1 svc:80 60000" * 1000
    assert first["headers"]["content-length"] == str(len(first["body"]))  # type: ignore


async def test_h2_refusals_cost_one_stream(loopback, nursery: trio.Nursery) -> None:
    host = loopback.new()
    limits = HttpLimits(max_header_bytes=2048, max_body_bytes=1000)

    async def handler(request: HttpRequest) -> HttpResponse:
        if request.path == "/boom":
            raise ValueError("bug")
        return HttpResponse(200, (), b"fine")

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http(stream, handler, limits)

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))
    client = H2Client(await trio.open_tcp_stream(host, PORT))
    await client.start()
    big_header = await client.request("GET", "/h", [("x-big", "y" * 3000)])
    big_body = await client.request("POST", "/b", body=b"z" * 5000)
    declared = await client.request("POST", "/d", [("content-length", "999999")], end=False)
    boom = await client.request("GET", "/boom")
    fine = await client.request("GET", "/ok")
    ids = [big_header, big_body, declared, boom, fine]
    await client.pump_until(client.all_done(ids))
    statuses = [client.responses[i]["headers"][":status"] for i in ids]  # type: ignore[index]
    assert statuses == ["431", "413", "413", "500", "200"]
    assert client.responses[fine]["body"] == b"fine"
    assert client.terminated is None


async def test_h2_idle_close_sends_goaway(loopback, nursery: trio.Nursery) -> None:
    host = loopback.new()

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse(204)

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http(stream, handler, HttpLimits(idle_timeout=0.2))

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))
    client = H2Client(await trio.open_tcp_stream(host, PORT))
    await client.start()
    stream_id = await client.request("HEAD", "/")
    await client.pump_until(client.all_done([stream_id]))
    assert client.responses[stream_id]["headers"][":status"] == "204"  # type: ignore[index]
    await client.pump_until(lambda: client.terminated is not None)
    assert client.terminated is not None
    assert client.terminated.error_code == 0


async def test_h2_reset_before_the_answer_cancels_the_handler(
    loopback, nursery: trio.Nursery
) -> None:
    """A client's RST_STREAM ends the work for that request at once; other streams go on."""
    host = loopback.new()
    started, cancelled = trio.Event(), trio.Event()

    async def handler(request: HttpRequest) -> HttpResponse:
        if request.path == "/ok":
            return HttpResponse(200, (), b"fine")
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http(stream, handler)

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))
    client = H2Client(await trio.open_tcp_stream(host, PORT))
    await client.start()
    slow = await client.request("GET", "/slow")
    with trio.fail_after(5):
        await started.wait()
    client.conn.reset_stream(slow)
    await client.flush()
    with trio.fail_after(5):
        await cancelled.wait()
    fine = await client.request("GET", "/ok")
    await client.pump_until(client.all_done([fine]))
    assert client.responses[fine]["body"] == b"fine"
    assert client.terminated is None


async def test_h2_rapid_reset_gets_enhance_your_calm(loopback, nursery: trio.Nursery) -> None:
    """CVE-2023-44487 against the waypoint: requests reset before their answer count as
    premature, and past the session's bound the connection is told ENHANCE_YOUR_CALM."""
    host = loopback.new()
    handled: list[str] = []

    async def handler(request: HttpRequest) -> HttpResponse:
        handled.append(request.path)
        await trio.sleep(10)
        return HttpResponse(200)

    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http(stream, handler)

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))
    client = H2Client(await trio.open_tcp_stream(host, PORT))
    await client.start()

    async def read_what_arrived() -> bool:
        """Take in what the server sent so far; False once the connection is gone."""
        with trio.move_on_after(0.05):
            data = await client.stream.receive_some(65536)
            if not data:
                return False
            for event in client.conn.receive_data(data):
                client._on(event)
        return True

    with trio.fail_after(15):
        for batch in range(30):  # bounded: 1500 pairs, far past Envoy's 500-stream rule
            for _ in range(50):
                stream_id = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream_id, [
                    (":method", "GET"), (":scheme", "http"), (":authority", "svc:80"),
                    (":path", f"/x{batch}"),
                ], end_stream=True)
                client.conn.reset_stream(stream_id)
            try:
                await client.flush()
                alive = await read_what_arrived()
            except trio.BrokenResourceError:
                alive = False
            if client.terminated is not None or not alive:
                break
    assert client.terminated is not None
    assert client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
