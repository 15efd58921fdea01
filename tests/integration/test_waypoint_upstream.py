"""HttpUpstream over a real mini-mesh: an HBONE server (mTLS, the destination ztunnel's role)
splicing to apps on loopback, and an HbonePool dialing it with the waypoint's identity."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from ambient_dataplane.drain import Drain
from ambient_dataplane.hbone import (
    ConnectHandler,
    ConnectRequest,
    HboneClient,
    HboneResponder,
    connect,
)
from ambient_dataplane.hbone.pool import HbonePool, PoolKey
from ambientctl.apps import serve_http_echo
from tests.integration.hbone_helpers import (
    HBONE_PORT,
    TestMesh,
    splice_to_tcp_handler,
    start_hbone_server,
)
from waypoint.http import HttpRequest, HttpResponse, serve_http
from waypoint.upstream import HttpUpstream, UpstreamError

pytestmark = pytest.mark.timeout(30)

ECHO_PORT = 8080
RAW_PORT = 8081
CLOSED_PORT = 8099  # nothing listens there


@dataclass
class Mesh:
    mesh: TestMesh
    host: str  # the destination pod (and its ztunnel's HBONE listener)
    upstream: HttpUpstream
    connects: list[ConnectRequest]


def counting(handler: ConnectHandler, seen: list[ConnectRequest]) -> ConnectHandler:
    async def wrapper(request: ConnectRequest, responder: HboneResponder) -> None:
        seen.append(request)
        await handler(request, responder)

    return wrapper


async def start_mesh(
    nursery: trio.Nursery, loopback, handler: ConnectHandler | None = None,
    drain: Drain | None = None, **options: float,
) -> Mesh:
    mesh = TestMesh.create()
    host = loopback.new()
    connects: list[ConnectRequest] = []
    await start_hbone_server(
        nursery, host, mesh.server_ctx, counting(handler or splice_to_tcp_handler(host), connects),
        drain=drain,
    )
    await nursery.start(serve_http_echo, host, ECHO_PORT, "reviews-v1")

    async def dial(key: PoolKey, connection_nursery: trio.Nursery) -> HboneClient:
        address, port = key.destination_address
        return await connect(address, port, mesh.client_ctx, key.destination_identity,
                             nursery=connection_nursery, local_address=key.source_ip)

    pool = HbonePool(dial)
    await nursery.start(pool.run)
    upstream = HttpUpstream(pool, mesh.client_id, loopback.new(), **options)  # type: ignore
    return Mesh(mesh, host, upstream, connects)


async def start_raw_app(
    nursery: trio.Nursery, host: str, behaviour: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await behaviour(stream)

    await nursery.start(partial(trio.serve_tcp, serve, RAW_PORT, host=host))


async def read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


def request(target: str = "/hello", method: str = "GET", body: bytes = b"") -> HttpRequest:
    return HttpRequest(
        method=method, target=target, body=body, authority="reviews.default.svc:9080",
        headers=(("x-a", "1"), ("connection", "x-hop"), ("x-hop", "dropped"),
                 ("content-length", "999")),
    )


async def send(mesh: Mesh, req: HttpRequest, port: int = ECHO_PORT,
               timeout: float | None = 5.0) -> HttpResponse:
    return await mesh.upstream.send(req, mesh.host, port, mesh.mesh.server_id, timeout=timeout,
                                    extra_headers=[("X-Forwarded-For", "10.0.0.1")])


async def test_send_and_reuse_the_connection(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)
    first = await send(mesh, request())
    assert first.status == 200
    answer = json.loads(first.body)
    assert answer["pod"] == "reviews-v1"
    assert answer["path"] == "/hello"
    assert answer["headers"]["host"] == "reviews.default.svc:9080"
    assert answer["headers"]["x-a"] == "1"
    assert answer["headers"]["x-forwarded-for"] == "10.0.0.1"
    assert "x-hop" not in answer["headers"] and "connection" not in answer["headers"]
    assert first.header("content-type") == "application/json"

    second = await send(mesh, request("/again", "POST", b"x" * 5000))
    assert json.loads(second.body)["body_length"] == 5000
    third = await send(mesh, request("/third"))
    assert third.status == 200
    assert len(mesh.connects) == 1  # one HBONE stream carried all three requests
    assert mesh.upstream.connections_opened == 1
    connect_request = mesh.connects[0]
    assert connect_request.authority == f"{mesh.host}:{ECHO_PORT}"
    assert mesh.upstream.idle_count == 1
    await mesh.upstream.aclose()
    assert mesh.upstream.idle_count == 0


async def test_concurrent_sends_use_separate_connections(
    loopback, nursery: trio.Nursery
) -> None:
    mesh = await start_mesh(nursery, loopback)
    results: list[int] = []

    async def one(index: int) -> None:
        results.append((await send(mesh, request(f"/c/{index}"))).status)

    async with trio.open_nursery() as group:
        for index in range(3):
            group.start_soon(one, index)
    assert results == [200, 200, 200]
    assert len(mesh.connects) == 3
    assert mesh.upstream.idle_count == 3
    # Idle connections are reused afterwards instead of dialing again.
    await send(mesh, request())
    assert len(mesh.connects) == 3


async def test_connect_refused_is_connect_failure(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)
    with pytest.raises(UpstreamError) as caught:
        await send(mesh, request(), port=CLOSED_PORT)
    assert caught.value.kind == "connect-failure"
    assert caught.value.connect_status == 503
    assert "503" in caught.value.reason and f":{CLOSED_PORT}" in caught.value.reason


async def test_no_hbone_listener_is_connect_failure(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)
    nobody = loopback.new()
    with pytest.raises(UpstreamError) as caught:
        await mesh.upstream.send(request(), nobody, ECHO_PORT, mesh.mesh.server_id, timeout=5)
    assert caught.value.kind == "connect-failure"
    assert f"{nobody}:{HBONE_PORT}" in caught.value.reason


async def test_wrong_identity_is_connect_failure(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)
    with pytest.raises(UpstreamError) as caught:
        await mesh.upstream.send(request(), mesh.host, ECHO_PORT, mesh.mesh.client_id,
                                 timeout=5)
    assert caught.value.kind == "connect-failure"
    assert "mTLS" in caught.value.reason


async def test_close_mid_response_is_reset(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)

    async def truncated(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    await start_raw_app(nursery, mesh.host, truncated)
    with pytest.raises(UpstreamError) as caught:
        await send(mesh, request(), port=RAW_PORT)
    assert caught.value.kind == "reset"
    assert mesh.upstream.idle_count == 0


async def test_close_without_answer_is_reset(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)

    async def hang_up(stream: trio.SocketStream) -> None:
        await read_head(stream)

    await start_raw_app(nursery, mesh.host, hang_up)
    with pytest.raises(UpstreamError) as caught:
        await send(mesh, request(), port=RAW_PORT)
    assert caught.value.kind == "reset"
    assert "without responding" in caught.value.reason
    assert len(mesh.connects) == 1  # a fresh connection is not retried


async def test_slow_server_is_timeout(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)

    async def slow(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    await start_raw_app(nursery, mesh.host, slow)
    with pytest.raises(UpstreamError) as caught:
        await send(mesh, request(), port=RAW_PORT, timeout=0.3)
    assert caught.value.kind == "timeout"  # the app never answers: only the timeout ends it
    assert mesh.upstream.idle_count == 0  # the half-done connection is not kept


async def test_malformed_response_is_protocol(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback)

    async def garbage(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"SPDY/9 what\r\n\r\n")
        await trio.sleep(1)

    await start_raw_app(nursery, mesh.host, garbage)
    with pytest.raises(UpstreamError) as caught:
        await send(mesh, request(), port=RAW_PORT)
    assert caught.value.kind == "protocol"


async def test_oversized_response_is_protocol(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback, max_response_body_bytes=1000)

    async def big(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"7d0\r\n" + b"y" * 2000 + b"\r\n0\r\n\r\n")
        await trio.sleep(1)

    await start_raw_app(nursery, mesh.host, big)
    with pytest.raises(UpstreamError) as caught:
        await send(mesh, request(), port=RAW_PORT)
    assert caught.value.kind == "protocol"
    assert "exceeds 1000" in caught.value.reason


async def test_stale_keep_alive_connection_is_retried_once(
    loopback, nursery: trio.Nursery
) -> None:
    """The server answers keep-alive, then closes: the next request finds the connection
    dead before any byte of a response and goes out again on a fresh one."""
    mesh = await start_mesh(nursery, loopback)
    served = 0

    async def one_then_close(stream: trio.SocketStream) -> None:
        nonlocal served
        await read_head(stream)
        served += 1
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    await start_raw_app(nursery, mesh.host, one_then_close)
    assert (await send(mesh, request(), port=RAW_PORT)).body == b"ok"
    assert mesh.upstream.idle_count == 1
    await trio.sleep(0.05)  # let the close travel back through the tunnel
    assert (await send(mesh, request(), port=RAW_PORT)).body == b"ok"
    assert served == 2
    assert len(mesh.connects) == 2


async def test_connection_close_response_is_not_reused(
    loopback, nursery: trio.Nursery
) -> None:
    mesh = await start_mesh(nursery, loopback)

    async def closing(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                              b"Content-Length: 2\r\n\r\nok")

    await start_raw_app(nursery, mesh.host, closing)
    response = await send(mesh, request(), port=RAW_PORT)
    assert response.body == b"ok" and response.header("connection") is None
    assert mesh.upstream.idle_count == 0
    await send(mesh, request(), port=RAW_PORT)
    assert len(mesh.connects) == 2


async def test_idle_connections_expire(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback, idle_timeout=0.1)
    await send(mesh, request())
    await trio.sleep(0.15)
    await send(mesh, request())
    assert mesh.upstream.connections_opened == 2


async def test_run_reaps_idle_connections(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback, idle_timeout=0.1)
    await nursery.start(mesh.upstream.run)
    await send(mesh, request())
    assert mesh.upstream.idle_count == 1
    await trio.sleep(0.3)
    assert mesh.upstream.idle_count == 0


async def test_idle_tunnels_to_a_draining_peer_are_closed_not_reused(
    loopback, nursery: trio.Nursery
) -> None:
    drain = Drain()
    mesh = await start_mesh(nursery, loopback, drain=drain)
    await nursery.start(mesh.upstream.run)
    await send(mesh, request())
    assert mesh.upstream.idle_count == 1
    drain.start()  # the peer sends GOAWAY: our idle keep-alive tunnel must go promptly
    with trio.fail_after(3):
        while mesh.upstream.idle_count:
            await trio.sleep(0.05)


async def test_through_a_waypoint_style_http_server(loopback, nursery: trio.Nursery) -> None:
    """HttpUpstream -> HBONE -> serve_http inside the tunnel: both halves of this package."""
    seen: list[HttpRequest] = []

    async def handler(incoming: HttpRequest) -> HttpResponse:
        seen.append(incoming)
        return HttpResponse(201, (("x-from", "waypoint"),), incoming.body[::-1])

    async def http_in_tunnel(connect_request: ConnectRequest, responder: HboneResponder) -> None:
        await serve_http(await responder.accept(), handler)

    mesh = await start_mesh(nursery, loopback, handler=http_in_tunnel)
    for index in range(3):
        response = await send(mesh, request(f"/w/{index}", "PUT", b"abc"))
        assert (response.status, response.body) == (201, b"cba")
        assert response.header("x-from") == "waypoint"
    head = await send(mesh, request("/h", "HEAD"))
    assert head.status == 201 and head.body == b""
    assert head.header("content-length") == "0"
    assert len(mesh.connects) == 1
    assert [r.target for r in seen] == ["/w/0", "/w/1", "/w/2", "/h"]
    assert seen[0].authority == "reviews.default.svc:9080"
    assert seen[0].header("x-forwarded-for") == "10.0.0.1"
    assert seen[0].header("x-hop") is None
