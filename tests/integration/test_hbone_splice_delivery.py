"""The tunnel -> socket direction of splice: the session's reader writes DATA to the socket
itself (HboneStream.deliver_to); what the socket does not take waits, in order, under flow
control; a broken socket costs only its own tunnel."""

from __future__ import annotations

import hashlib
import socket
import struct
from functools import partial

import pytest
import trio

from ambient_dataplane.hbone import (
    ConnectRequest,
    HboneResponder,
    SpliceError,
    SpliceResult,
    open_hbone_client,
    splice,
)
from tests.integration.hbone_helpers import (
    HBONE_PORT,
    TestMesh,
    receive_all,
    start_hbone_server,
    start_tcp_echo,
)

pytestmark = pytest.mark.timeout(30)

_APP_PORT = 8080


@pytest.fixture
def mesh() -> TestMesh:
    return TestMesh.create()


def _splicing_handler(app_host: str, outcomes: list[SpliceResult | SpliceError]):
    async def handler(request: ConnectRequest, responder: HboneResponder) -> None:
        upstream = await trio.open_tcp_stream(app_host, request.port)
        async with upstream:
            tunnel = await responder.accept()
            try:
                outcomes.append(await splice(tunnel, upstream))
            except SpliceError as exc:
                outcomes.append(exc)

    return handler


async def _slow_digest_app(started: trio.Event, stream: trio.SocketStream) -> None:
    """Reads nothing until told (the socket and the stream window fill up), then answers the
    SHA-256 of everything up to EOF."""
    async with stream:
        await started.wait()
        digest = hashlib.sha256()
        while data := await stream.receive_some(65536):
            digest.update(data)
        await stream.send_all(digest.digest())
        await stream.send_eof()


async def test_backlogged_socket_gets_every_byte_in_order(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host, app = loopback.new(), loopback.new()
    release = trio.Event()
    await nursery.start(partial(trio.serve_tcp, partial(_slow_digest_app, release), _APP_PORT,
                                host=app))
    outcomes: list[SpliceResult | SpliceError] = []
    await start_hbone_server(nursery, host, mesh.server_ctx, _splicing_handler(app, outcomes))
    # Many writes of changing sizes (many DATA frames), more than the 4 MiB stream window.
    pieces = [struct.pack(">I", n) * (1 + n % 3000) for n in range(6000)]
    payload = b"".join(pieces)
    assert len(payload) > 4 * 1024 * 1024
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream(f"{app}:{_APP_PORT}")

        async def send() -> None:
            for piece in pieces:
                await tunnel.send_all(piece)
            await tunnel.send_eof()

        async with trio.open_nursery() as senders:
            senders.start_soon(send)
            await trio.sleep(0.3)  # let the socket and the window fill while the app waits
            release.set()
        assert await receive_all(tunnel) == hashlib.sha256(payload).digest()
        await tunnel.aclose()
    assert len(outcomes) == 1
    outcome = outcomes[0]
    assert isinstance(outcome, SpliceResult)
    assert outcome == SpliceResult(len(payload), 32)


async def _resetting_app(stream: trio.SocketStream) -> None:
    """Reads a little, then closes with a TCP reset."""
    await stream.receive_some(1024)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def test_reset_socket_breaks_its_tunnel_only(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host, app = loopback.new(), loopback.new()
    await nursery.start(partial(trio.serve_tcp, _resetting_app, _APP_PORT, host=app))
    await start_tcp_echo(nursery, app, _APP_PORT + 1)
    outcomes: list[SpliceResult | SpliceError] = []
    await start_hbone_server(nursery, host, mesh.server_ctx, _splicing_handler(app, outcomes))
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        doomed = await client.open_stream(f"{app}:{_APP_PORT}")
        with pytest.raises(trio.BrokenResourceError):
            while True:  # until the server resets the tunnel whose socket broke
                await doomed.send_all(b"x" * 16384)
                await trio.sleep(0.001)
        await doomed.aclose()
        assert len(outcomes) == 1 and isinstance(outcomes[0], SpliceError)
        # The connection (and its reader, which writes to sockets directly) still serves.
        echo = await client.open_stream(f"{app}:{_APP_PORT + 1}")
        await echo.send_all(b"still here")
        await echo.send_eof()
        assert await receive_all(echo) == b"still here"
