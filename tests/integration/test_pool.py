"""HbonePool on loopback with real mTLS: sharing, limits, idle close, dead connections."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from ambient_api.identity import SpiffeId
from ambient_dataplane.drain import Drain
from ambient_dataplane.hbone import (
    ConnectRequest,
    HboneClient,
    HboneConnectError,
    HboneResponder,
    HboneStream,
    connect,
    connect_headers,
    serve_hbone,
    serve_hbone_tls,
)
from ambient_dataplane.hbone.pool import HbonePool, PoolKey
from ambient_dataplane.tls import PeerIdentityError
from tests.integration.hbone_helpers import (
    HBONE_PORT,
    TestMesh,
    echo_handler,
    start_hbone_server,
)

pytestmark = pytest.mark.timeout(30)

TEST_ID = SpiffeId("cluster.local", "test", "default")


class Dialer:
    """connect_fn for the pool that counts the connections it makes."""

    def __init__(self, mesh: TestMesh) -> None:
        self.mesh = mesh
        self.calls: list[PoolKey] = []

    async def __call__(self, key: PoolKey, nursery: trio.Nursery) -> HboneClient:
        self.calls.append(key)
        host, port = key.destination_address
        return await connect(
            host, port, self.mesh.client_ctx, key.destination_identity, nursery=nursery,
            local_address=key.source_ip,
        )


@pytest.fixture
def mesh() -> TestMesh:
    return TestMesh.create()


async def _start_pool(nursery: trio.Nursery, dialer: Dialer, **kwargs: float) -> HbonePool:
    pool = HbonePool(dialer, **kwargs)  # type: ignore[arg-type]
    await nursery.start(pool.run)
    return pool


async def test_150_concurrent_streams_use_two_connections(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    server_peers: set[tuple[str, int] | None] = set()
    release = trio.Event()

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        server_peers.add(responder.connection.peer_address)
        tunnel = await responder.accept()
        await release.wait()
        await tunnel.send_eof()

    await start_hbone_server(nursery, host, mesh.server_ctx, handler)
    dialer = Dialer(mesh)
    pool = await _start_pool(nursery, dialer)
    source_ip = loopback.new()
    key = PoolKey(mesh.client_id, mesh.server_id, source_ip, (host, HBONE_PORT))
    opened = 0
    all_open = trio.Event()

    async def one_stream() -> None:
        nonlocal opened
        stream = await pool.open_stream(key, "127.0.0.1:80")
        opened += 1
        if opened == 150:
            all_open.set()
        await release.wait()
        assert await stream.receive_some() == b""
        await stream.aclose()

    async with trio.open_nursery() as streams:
        for _ in range(150):
            streams.start_soon(one_stream)
        with trio.fail_after(10):
            await all_open.wait()
        assert len(dialer.calls) == 2
        assert len(server_peers) == 2
        assert {peer[0] for peer in server_peers if peer} == {source_ip}
        connections = pool.connections(key)
        assert sorted(c.active_streams for c in connections) == [50, 100]
        release.set()
    assert all(c.active_streams == 0 for c in pool.connections(key))
    # Freed slots are reused, no new connection.
    stream = await pool.open_stream(key, "127.0.0.1:80")
    await stream.aclose()
    assert len(dialer.calls) == 2


async def test_idle_connections_are_closed(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    dialer = Dialer(mesh)
    pool = await _start_pool(nursery, dialer, idle_timeout=0.3)
    key = PoolKey(mesh.client_id, mesh.server_id, None, (host, HBONE_PORT))
    stream = await pool.open_stream(key, "127.0.0.1:80")
    client = pool.connections(key)[0]
    await trio.sleep(0.5)  # busy connections are never idle
    assert pool.connections(key) == [client]
    await stream.send_all(b"x")
    assert await stream.receive_some() == b"x"
    await stream.aclose()
    await trio.sleep(0.15)
    assert pool.connections(key) == [client]
    with trio.fail_after(2):
        while pool.connection_count:
            await trio.sleep(0.02)
    assert client.is_closed
    stream = await pool.open_stream(key, "127.0.0.1:80")  # a fresh connection
    await stream.aclose()
    assert len(dialer.calls) == 2


async def test_a_burst_s_surplus_connections_close_before_the_oldest(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    """After a burst, only the key's oldest connection waits the full idle timeout."""
    host = loopback.new()
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    dialer = Dialer(mesh)
    pool = await _start_pool(nursery, dialer, idle_timeout=60.0, surplus_idle_timeout=0.2)
    key = PoolKey(mesh.client_id, mesh.server_id, None, (host, HBONE_PORT))
    streams = [await pool.open_stream(key, "127.0.0.1:80") for _ in range(150)]
    oldest, surplus = pool.connections(key)
    assert (oldest.active_streams, surplus.active_streams) == (100, 50)
    await trio.sleep(0.4)
    assert pool.connections(key) == [oldest, surplus]  # busy connections are never idle
    for stream in streams:
        await stream.aclose()
    with trio.fail_after(5):
        while not surplus.is_closed:
            await trio.sleep(0.02)
    assert pool.connections(key) == [oldest]
    assert not oldest.is_closed
    stream = await pool.open_stream(key, "127.0.0.1:80")  # the warm one serves the next
    await stream.aclose()
    assert len(dialer.calls) == 2


@pytest.mark.parametrize("wait_for_detection", [False, True])
async def test_dead_connection_is_replaced(
    wait_for_detection: bool, mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    dialer = Dialer(mesh)
    pool = await _start_pool(nursery, dialer)
    key = PoolKey(mesh.client_id, mesh.server_id, None, (host, HBONE_PORT))
    with trio.CancelScope() as first_server:
        async with trio.open_nursery() as servers:
            await start_hbone_server(servers, host, mesh.server_ctx, echo_handler)
            stream = await pool.open_stream(key, "127.0.0.1:80")
            await stream.aclose()
            old = pool.connections(key)[0]
            first_server.cancel()  # the peer goes away, as a restarted pod would
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    if wait_for_detection:
        with trio.fail_after(2):
            while not old.is_closed:
                await trio.sleep(0.01)
    stream = await pool.open_stream(key, "127.0.0.1:80")
    await stream.send_all(b"new")
    assert await stream.receive_some() == b"new"
    assert old.is_closed
    assert old not in pool.connections(key)
    assert len(dialer.calls) == 2


async def test_other_identity_at_same_address_never_shares_a_connection(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    """Pod-IP reuse: the key carries the expected identity, so a new owner of the IP (or an
    impostor) is dialed and verified separately."""
    host = loopback.new()
    await start_hbone_server(nursery, host, mesh.server_ctx, echo_handler)
    dialer = Dialer(mesh)
    pool = await _start_pool(nursery, dialer)
    good = PoolKey(mesh.client_id, mesh.server_id, None, (host, HBONE_PORT))
    stale = PoolKey(mesh.client_id, mesh.pki.identity("server-ns", "previous-owner"), None,
                    (host, HBONE_PORT))
    stream = await pool.open_stream(good, "127.0.0.1:80")
    with pytest.raises(PeerIdentityError, match="previous-owner"):
        await pool.open_stream(stale, "127.0.0.1:80")
    assert pool.connections(stale) == []
    await stream.aclose()


async def test_concurrent_failed_connects_dial_once(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()  # nothing listens here
    dialer = Dialer(mesh)
    pool = await _start_pool(nursery, dialer)
    key = PoolKey(mesh.client_id, mesh.server_id, None, (host, HBONE_PORT))
    failures: list[BaseException] = []

    async def attempt() -> None:
        try:
            await pool.open_stream(key, "127.0.0.1:80")
        except OSError as exc:
            failures.append(exc)

    async with trio.open_nursery() as attempts:
        for _ in range(20):
            attempts.start_soon(attempt)
    assert len(failures) == 20
    assert len(dialer.calls) == 1


async def test_rejections_do_not_drop_the_connection(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()

    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        if request.port == 9:
            await responder.reject(401, "denied")
        else:
            await echo_handler(request, responder)

    await nursery.start(partial(
        trio.serve_tcp,
        partial(serve_hbone_tls, ssl_context=mesh.server_ctx, handler=handler),
        HBONE_PORT, host=host,
    ))
    dialer = Dialer(mesh)
    pool = await _start_pool(nursery, dialer)
    key = PoolKey(mesh.client_id, mesh.server_id, None, (host, HBONE_PORT))
    with pytest.raises(HboneConnectError) as error:
        await pool.open_stream(key, "127.0.0.1:9")
    assert error.value.status == 401
    # outbound's calling convention: a whole connect_headers() block.
    stream = await pool.open_stream(key, connect_headers("127.0.0.1:80", forwarded_for="a:1"))
    await stream.send_all(b"x")
    assert await stream.receive_some() == b"x"
    await stream.aclose()
    assert len(dialer.calls) == 1


# -- graceful drain: GOAWAY from the server -----------------------------------------------------


class HeldStream(trio.abc.Stream):
    """A transport whose received bytes can be held back, so a test decides exactly when the
    server reads what the client sent (a CONNECT racing the server's GOAWAY)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.released = trio.Event()
        self.released.set()
        self.holding = trio.Event()

    def hold(self) -> None:
        self.released = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if not self.released.is_set():
            self.holding.set()
            await self.released.wait()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_connect_racing_goaway_is_retried_on_a_new_connection(
    nursery: trio.Nursery,
) -> None:
    """The server drains while a CONNECT is in flight above its GOAWAY's last stream id: the
    server refuses it unprocessed, and the pool sends it again on a new connection."""
    handled: list[tuple[int, str]] = []
    server_transports: list[HeldStream] = []
    drains: list[Drain] = []
    clients: list[HboneClient] = []

    async def dial(key: PoolKey, connection_nursery: trio.Nursery) -> HboneClient:
        index = len(server_transports)
        client_end, server_end = trio.testing.memory_stream_pair()
        held = HeldStream(server_end)
        drain = Drain()
        server_transports.append(held)
        drains.append(drain)

        async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
            handled.append((index, request.authority))
            await echo_handler(request, responder)

        nursery.start_soon(partial(serve_hbone, held, handler, drain=drain))
        client = HboneClient(client_end)
        await connection_nursery.start(client.run)
        clients.append(client)
        return client

    pool = HbonePool(dial)
    await nursery.start(pool.run)
    key = PoolKey(TEST_ID, TEST_ID, None, ("10.0.0.9", HBONE_PORT))
    busy = await pool.open_stream(key, "10.0.0.1:1")

    server_transports[0].hold()
    racing: list[HboneStream] = []

    async def open_racing() -> None:
        racing.append(await pool.open_stream(key, "10.0.0.1:2"))

    nursery.start_soon(open_racing)
    await server_transports[0].holding.wait()  # the CONNECT reached the server, unread
    drains[0].start()  # GOAWAY naming stream 1 as the last one processed
    with trio.fail_after(5):
        while not racing:
            await trio.sleep(0.01)
    [second] = racing
    await second.send_all(b"second")
    assert await second.receive_some() == b"second"
    assert handled == [(0, "10.0.0.1:1"), (1, "10.0.0.1:2")]
    assert clients[0].is_draining and pool.connections(key) == [clients[0], clients[1]]

    server_transports[0].released.set()  # the server reads the CONNECT now: and refuses it
    await trio.testing.wait_all_tasks_blocked()
    assert handled == [(0, "10.0.0.1:1"), (1, "10.0.0.1:2")]

    await busy.send_all(b"first, still running")  # the draining connection still carries it
    assert await busy.receive_some() == b"first, still running"
    await busy.send_eof()
    assert await busy.receive_some() == b""
    await busy.aclose()
    with trio.fail_after(2):
        await clients[0].wait_closed()
        while clients[0] in pool.connections(key):
            await trio.sleep(0.01)
    assert pool.connections(key) == [clients[1]]
    await second.aclose()


async def test_refusals_are_retried_a_bounded_number_of_times(nursery: trio.Nursery) -> None:
    """A server that refuses every CONNECT (REFUSED_STREAM) costs an error, not a loop."""
    attempts = 0
    handled: list[str] = []

    async def refuse_all(key: PoolKey, connection_nursery: trio.Nursery) -> HboneClient:
        client_end, server_end = trio.testing.memory_stream_pair()
        drain = Drain()
        drain.start()  # every connection drains at once: each CONNECT is refused

        async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
            handled.append(request.authority)  # a drained server must never get here
            await echo_handler(request, responder)

        nonlocal attempts
        attempts += 1
        nursery.start_soon(partial(serve_hbone, server_end, handler, drain=drain))
        client = HboneClient(client_end)
        await connection_nursery.start(client.run)
        return client

    pool = HbonePool(refuse_all)
    await nursery.start(pool.run)
    key = PoolKey(TEST_ID, TEST_ID, None, ("10.0.0.9", HBONE_PORT))
    with pytest.raises(HboneConnectError) as error:
        await pool.open_stream(key, "10.0.0.1:1")
    assert error.value.retryable
    assert 2 <= attempts <= 4
    await trio.testing.wait_all_tasks_blocked()
    assert handled == []
