"""HttpUpstream's connection pool under concurrency: it keeps as many keep-alive connections as
the concurrency needed and reuses them for the next burst, instead of closing those above a
small idle limit (which made every request beyond it pay a new HBONE CONNECT)."""

from __future__ import annotations

import pytest
import trio

from tests.integration.test_waypoint_upstream import (
    RAW_PORT,
    Mesh,
    read_head,
    request,
    send,
    start_mesh,
    start_raw_app,
)
from waypoint.upstream import UpstreamError

pytestmark = pytest.mark.timeout(30)

BURST = 20  # well above the 8 idle connections the pool used to keep


class Barrier:
    """Holds every request of a burst until all ``size`` have arrived, so they are truly
    concurrent (each needs a connection of its own) whatever the scheduling."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.arrived = 0
        self.release = trio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        release = self.release
        if self.arrived % self.size == 0:
            release.set()
            self.release = trio.Event()
        await release.wait()


async def keep_alive_app(barrier: Barrier, stream: trio.SocketStream) -> None:
    """Answers each request (bodyless GETs) once its burst is complete, keeping the
    connection open for the next one."""
    while await read_head(stream):
        await barrier.wait()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


async def burst(mesh: Mesh) -> list[int]:
    statuses: list[int] = []

    async def one(index: int) -> None:
        statuses.append((await send(mesh, request(f"/b/{index}"), port=RAW_PORT)).status)

    async with trio.open_nursery() as group:
        for index in range(BURST):
            group.start_soon(one, index)
    return statuses


async def test_a_burst_above_eight_reuses_its_connections_for_the_next_burst(
    loopback, nursery: trio.Nursery
) -> None:
    mesh = await start_mesh(nursery, loopback)
    barrier = Barrier(BURST)

    async def app(stream: trio.SocketStream) -> None:
        await keep_alive_app(barrier, stream)

    await start_raw_app(nursery, mesh.host, app)
    assert await burst(mesh) == [200] * BURST
    assert mesh.upstream.connections_opened == BURST
    assert mesh.upstream.idle_count == BURST  # all kept: the concurrency needed them
    assert await burst(mesh) == [200] * BURST
    assert mesh.upstream.connections_opened == BURST  # the second burst opened none
    assert len(mesh.connects) == BURST


async def test_the_idle_cap_still_bounds_what_is_kept(loopback, nursery: trio.Nursery) -> None:
    mesh = await start_mesh(nursery, loopback, max_idle_per_target=5)
    barrier = Barrier(BURST)

    async def app(stream: trio.SocketStream) -> None:
        await keep_alive_app(barrier, stream)

    await start_raw_app(nursery, mesh.host, app)
    assert await burst(mesh) == [200] * BURST
    assert mesh.upstream.idle_count == 5
    assert await burst(mesh) == [200] * BURST
    assert mesh.upstream.connections_opened == BURST + BURST - 5


async def test_an_unwritable_request_fails_before_any_connection(
    loopback, nursery: trio.Nursery
) -> None:
    mesh = await start_mesh(nursery, loopback)
    with pytest.raises(UpstreamError) as caught:
        await send(mesh, request("/a b"))
    assert caught.value.kind == "protocol"
    assert mesh.upstream.connections_opened == 0


async def test_bytes_after_the_response_keep_the_connection_out_of_the_pool(
    loopback, nursery: trio.Nursery
) -> None:
    mesh = await start_mesh(nursery, loopback)

    async def app(stream: trio.SocketStream) -> None:
        while await read_head(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokJUNK")

    await start_raw_app(nursery, mesh.host, app)
    response = await send(mesh, request(), port=RAW_PORT)
    assert response.status == 200 and response.body == b"ok"
    assert mesh.upstream.idle_count == 0
    await send(mesh, request(), port=RAW_PORT)
    assert mesh.upstream.connections_opened == 2
