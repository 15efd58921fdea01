"""TlsStream (ambient_dataplane.tls): the HBONE data path's TLS over real loopback sockets."""

from __future__ import annotations

import os

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from ambient_dataplane.drain import Drain
from ambient_dataplane.hbone import accept_tls, connect_tls, serve_hbone_tls
from ambient_dataplane.tls import TlsStream
from tests.integration.hbone_helpers import HBONE_PORT, TestMesh, echo_handler

_RECORD = 16384  # the most plaintext one TLS record carries


async def _pair(nursery: trio.Nursery, host: str) -> tuple[TlsStream, TlsStream]:
    """(client, server) TlsStreams with the mesh's mTLS handshake done."""
    mesh = TestMesh.create()
    listeners = await trio.open_tcp_listeners(HBONE_PORT, host=host)
    accepted: trio.MemorySendChannel[TlsStream]
    accepted, receiving = trio.open_memory_channel[TlsStream](1)

    async def accept_one() -> None:
        tcp = await listeners[0].accept()
        tls, _identity = await accept_tls(tcp, mesh.server_ctx)
        await accepted.send(tls)
        await listeners[0].aclose()

    nursery.start_soon(accept_one)
    client = await connect_tls(host, HBONE_PORT, mesh.client_ctx, mesh.server_id)
    return client, await receiving.receive()


async def _receive_exactly(stream: TlsStream, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = await stream.receive_some()
        assert data, "EOF before all data arrived"
        chunks += data
    return bytes(chunks)


async def test_both_ways_at_once_arrive_intact(loopback, nursery: trio.Nursery) -> None:
    client, server = await _pair(nursery, loopback.new())
    up, down = os.urandom(3 * 2**20), os.urandom(2 * 2**20)
    received: dict[str, bytes] = {}

    async def collect(name: str, stream: TlsStream, size: int) -> None:
        received[name] = await _receive_exactly(stream, size)

    async with trio.open_nursery() as inner:
        inner.start_soon(client.send_all, up)
        inner.start_soon(server.send_all, down)
        inner.start_soon(collect, "server", server, len(up))
        inner.start_soon(collect, "client", client, len(down))
    assert received == {"server": up, "client": down}


async def test_one_receive_returns_every_record_already_read(
    loopback, nursery: trio.Nursery
) -> None:
    client, server = await _pair(nursery, loopback.new())
    await client.send_all(b"a" * (8 * _RECORD))
    await trio.sleep(0.2)  # everything is in the server's socket by now
    first = await server.receive_some()
    assert len(first) > _RECORD  # trio.SSLStream hands out one record per call
    assert first + await _receive_exactly(server, 8 * _RECORD - len(first)) == b"a" * 8 * _RECORD


async def test_send_nowait_keeps_what_the_socket_refuses_until_flush(
    loopback, nursery: trio.Nursery
) -> None:
    client, server = await _pair(nursery, loopback.new())
    payload = os.urandom(32 * 2**20)  # more than loopback socket buffers hold
    client.send_nowait(payload)
    assert client.pending > 0  # the server reads nothing yet
    async with trio.open_nursery() as inner:
        inner.start_soon(client.flush)
        assert await _receive_exactly(server, len(payload)) == payload
    assert client.pending == 0


async def test_close_notify_is_eof_and_abort_is_broken(loopback, nursery: trio.Nursery) -> None:
    client, server = await _pair(nursery, loopback.new())
    await client.send_all(b"last words")
    await client.aclose()
    assert await _receive_exactly(server, 10) == b"last words"
    assert await server.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"more")

    client, server = await _pair(nursery, loopback.new())
    server.abort()
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()


async def test_cancelled_receive_loses_nothing_and_concurrent_receive_is_refused(
    loopback, nursery: trio.Nursery
) -> None:
    client, server = await _pair(nursery, loopback.new())
    with trio.move_on_after(0.05):
        await server.receive_some()
    async with trio.open_nursery() as inner:
        inner.start_soon(server.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some()
        await client.send_all(b"x")
    await client.send_all(b"hello")
    assert await _receive_exactly(server, 5) == b"hello"


@pytest.mark.parametrize("draining", [False, True])
async def test_request_and_its_reset_in_one_read_cost_only_that_stream(
    draining: bool, loopback, nursery: trio.Nursery
) -> None:
    """A CONNECT the server answers at once (400, or REFUSED_STREAM while draining) and the
    client's RST_STREAM for it can arrive in one read; h2 then reports the reset after the
    request, and answering the closed stream must not end the connection as an error."""
    mesh = TestMesh.create()
    host = loopback.new()
    drain = Drain()
    if draining:
        drain.start()
    listeners = await trio.open_tcp_listeners(HBONE_PORT, host=host)
    served = trio.Event()

    async def serve_one() -> None:
        tcp = await listeners[0].accept()
        await serve_hbone_tls(tcp, mesh.server_ctx, echo_handler, drain=drain)
        served.set()

    nursery.start_soon(serve_one)
    tls = await connect_tls(host, HBONE_PORT, mesh.client_ctx, mesh.server_id)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "not-an-ip:80")])
    conn.reset_stream(1)
    ping = b"stillup!"
    conn.ping(ping)
    with capture_logs() as logs, trio.fail_after(5):
        await tls.send_all(conn.data_to_send())
        if draining:  # the server sends GOAWAY and closes once the client went quiet
            while await tls.receive_some():
                pass
            await served.wait()
        else:
            while not any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == ping
                          for e in conn.receive_data(await tls.receive_some())):
                pass
    await tls.aclose()
    assert not [e for e in logs if e["event"] in ("hbone.internal_error",
                                                  "hbone.connection_failed")], logs
