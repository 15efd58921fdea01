"""Graceful HBONE drain on shutdown: GOAWAY, idle pooled connections close at once, busy
tunnels finish (half-close included), and the shutdown does not wait for the drain timeout."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from ambient_dataplane.drain import ActiveConnections
from ambient_dataplane.hbone import (
    HboneClient,
    HboneConnectError,
    connect,
    open_hbone_client,
    serve_hbone_tls,
)
from ambient_dataplane.hbone.pool import HbonePool, PoolKey
from tests.integration.hbone_helpers import HBONE_PORT, TestMesh, echo_handler
from tests.integration.mesh_harness import ECHO_PORT, HTTPBIN_V1, SLEEP, Mesh, start_mesh
from ztunnel.config import ZtunnelConfig

pytestmark = pytest.mark.timeout(30)


class Dialer:
    def __init__(self, mesh: TestMesh) -> None:
        self.mesh = mesh
        self.calls = 0

    async def __call__(self, key: PoolKey, nursery: trio.Nursery) -> HboneClient:
        self.calls += 1
        host, port = key.destination_address
        return await connect(host, port, self.mesh.client_ctx, key.destination_identity,
                             nursery=nursery, local_address=key.source_ip)


async def _start_server(
    listener_nursery: trio.Nursery, handler_nursery: trio.Nursery, host: str,
    mesh: TestMesh, connections: ActiveConnections,
) -> None:
    """An HBONE listener whose connections are tracked (and so drained) as ztunnel's are,
    and run in ``handler_nursery`` so that they outlive the listener."""

    async def serve(tcp: trio.SocketStream) -> None:
        with connections.track():
            await serve_hbone_tls(tcp, mesh.server_ctx, echo_handler)

    await listener_nursery.start(partial(
        trio.serve_tcp, serve, HBONE_PORT, host=host, handler_nursery=handler_nursery,
    ))


async def _echo(stream: trio.abc.Stream, payload: bytes) -> None:
    received = bytearray()

    async def read() -> None:
        while len(received) < len(payload):
            chunk = await stream.receive_some()
            assert chunk, "the tunnel ended while data was expected"
            received.extend(chunk)

    async with trio.open_nursery() as both:
        both.start_soon(read)
        await stream.send_all(payload)
    assert received == payload


def closed_by_server(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The server logs how it closed a connection unless the peer closed it: a drained
    connection closed by the server means its DRAIN_CLOSE_GRACE ran out (the client did not
    close on the GOAWAY)."""
    return [e for e in logs if e["event"] == "hbone.connection_closed"]


async def test_drain_closes_idle_connection_at_once_and_lets_busy_tunnel_finish(
    loopback, nursery: trio.Nursery
) -> None:
    mesh = TestMesh.create()
    host = loopback.new()
    old_connections = ActiveConnections()
    dialer = Dialer(mesh)
    pool = HbonePool(dialer)
    await nursery.start(pool.run)
    idle_key = PoolKey(mesh.client_id, mesh.server_id, loopback.new(), (host, HBONE_PORT))
    busy_key = PoolKey(mesh.client_id, mesh.server_id, loopback.new(), (host, HBONE_PORT))

    with trio.CancelScope() as old_listener:
        async with trio.open_nursery() as listeners:
            await _start_server(listeners, nursery, host, mesh, old_connections)
            idle_stream = await pool.open_stream(idle_key, "127.0.0.1:80")
            await _echo(idle_stream, b"ping")
            await idle_stream.aclose()
            tunnel = await pool.open_stream(busy_key, "127.0.0.1:80")
            await _echo(tunnel, b"before the drain")
            [idle_client] = pool.connections(idle_key)
            [busy_client] = pool.connections(busy_key)
            assert old_connections.count == 2
            old_listener.cancel()  # shutdown: stop listening, then drain

    with capture_logs() as logs:
        old_connections.begin_drain()
        with trio.fail_after(10):
            await idle_client.wait_closed()
            while old_connections.count != 1:
                await trio.sleep(0.01)
    assert not closed_by_server(logs), logs  # the client closed it on reading the GOAWAY
    assert pool.connections(idle_key) == []
    assert busy_client.is_draining and not busy_client.is_closed

    # A new server instance takes the address; new streams go to it while the old tunnel runs.
    new_connections = ActiveConnections()
    await _start_server(nursery, nursery, host, mesh, new_connections)
    fresh = await pool.open_stream(busy_key, "127.0.0.1:80")
    assert dialer.calls == 3
    assert new_connections.count == 1
    await _echo(fresh, b"to the new instance")
    assert [c for c in pool.connections(busy_key) if c is not busy_client] != []

    # The old tunnel keeps flowing both ways, half-close included.
    await _echo(tunnel, b"x" * 3_000_000)
    assert not busy_client.is_closed and busy_client.active_streams == 1
    await tunnel.send_eof()
    assert await tunnel.receive_some() == b""  # the server's EOF after ours
    with capture_logs() as logs:
        await tunnel.aclose()
        with trio.fail_after(10):
            await busy_client.wait_closed()
            await old_connections.wait_idle()
    assert not closed_by_server(logs), logs  # its last stream ended, then the client closed
    assert busy_client not in pool.connections(busy_key)
    await _echo(fresh, b"still fine")
    await fresh.aclose()


async def test_connection_arriving_after_drain_began_is_drained_at_once(
    loopback, nursery: trio.Nursery
) -> None:
    """A connection accepted just before the listener closed still ends promptly, and a
    CONNECT sent on it is refused as retryable (the pool then goes elsewhere)."""
    mesh = TestMesh.create()
    host = loopback.new()
    connections = ActiveConnections()
    connections.begin_drain()
    await _start_server(nursery, nursery, host, mesh, connections)
    with capture_logs() as logs, trio.fail_after(10):
        async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
            with pytest.raises(HboneConnectError) as refused:
                await client.open_stream("127.0.0.1:80")
            assert refused.value.retryable
            await client.wait_closed()
        await connections.wait_idle()
    assert not closed_by_server(logs), logs  # the client closed on the GOAWAY


# -- a node's ztunnel shutting down under a live connection -----------------------------------


async def _read_echo(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    received = bytearray()
    while len(received) < count:
        chunk = await stream.receive_some(65536)
        assert chunk, "connection ended early"
        received += chunk
    return bytes(received)


@pytest.mark.slow
async def test_ztunnel_shutdown_drains_instead_of_waiting_for_the_timeout(
    nursery: trio.Nursery, tmp_path: Path, loopback: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_config = Mesh.ztunnel_config

    def long_drain(self: Mesh, node: str, node_address: str) -> ZtunnelConfig:
        config = build_config(self, node, node_address)
        return dataclasses.replace(config, drain_timeout=10.0) if node == "node-2" else config

    monkeypatch.setattr(Mesh, "ztunnel_config", long_drain)
    mesh = await start_mesh(nursery, tmp_path, loopback)
    node_1, node_2 = mesh.ztunnels["node-1"], mesh.ztunnels["node-2"]
    assert node_2.config.drain_timeout == 10.0
    httpbin_ip = mesh.addr(HTTPBIN_V1)

    def pooled_to_httpbin() -> list[PoolKey]:
        return [k for k in node_1.inputs.pool.live_keys() if k.destination_address[0] == httpbin_ip]

    stream = await mesh.connect(SLEEP, HTTPBIN_V1, ECHO_PORT)
    async with stream:
        await stream.send_all(b"hello")
        assert await _read_echo(stream, 5) == b"hello"
        assert len(pooled_to_httpbin()) == 1

        node_2.request_shutdown()
        with trio.fail_after(5):  # node-2 stopped listening and sent GOAWAY
            while not all(c.is_draining for k in pooled_to_httpbin()
                          for c in node_1.inputs.pool.connections(k)):
                await trio.sleep(0.02)
        # (i) the flowing connection keeps working through the drain, both ways.
        for round_number in range(3):
            payload = f"round {round_number} ".encode() * 2000
            await stream.send_all(payload)
            assert await _read_echo(stream, len(payload)) == payload
        assert not node_2.stopped.is_set()
        await stream.send_eof()
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b""  # half-close carried end to end

    # (ii) the shutdown completes because that connection ended, not at the drain timeout
    # (which the ztunnel logs when it gives up waiting).
    with capture_logs() as shutdown_logs, trio.fail_after(2 * node_2.config.drain_timeout):
        await node_2.stopped.wait()
    assert not [e for e in shutdown_logs if "drain timeout" in str(e["event"])], shutdown_logs
    # (iii) node-1 forgot its connection to node-2's pod.
    with trio.fail_after(2):
        while pooled_to_httpbin():
            await trio.sleep(0.02)
