"""``connect_tcp``: the proxies' direct connection to an address literal (inbound to the
app, outbound to a destination outside the mesh)."""

from __future__ import annotations

import socket

import pytest
import trio

from tests.conftest import LoopbackAllocator
from ztunnel.sockets import connect_tcp


async def test_connects_to_a_literal_address_with_nodelay(loopback: LoopbackAllocator) -> None:
    address = loopback.new()
    (listener,) = await trio.open_tcp_listeners(0, host=address)
    port = listener.socket.getsockname()[1]
    async with listener:
        stream = await connect_tcp(address, port)
        async with stream:
            accepted = await listener.accept()
            async with accepted:
                assert stream.socket.getpeername() == (address, port)
                assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                await stream.send_all(b"ping")
                assert await accepted.receive_some(4) == b"ping"


async def test_refused_connection_raises_oserror(loopback: LoopbackAllocator) -> None:
    address = loopback.new()
    probe = socket.socket()
    probe.bind((address, 0))
    port = probe.getsockname()[1]
    probe.close()  # bound once, never listening: the connect is refused
    with pytest.raises(OSError):
        await connect_tcp(address, port)
