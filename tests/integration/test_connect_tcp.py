"""``connect_tcp``: the proxies' direct connection to an address literal (inbound to the
app, outbound to a destination outside the mesh), and ``connect_upstream``'s typed error."""

from __future__ import annotations

import socket

import pytest
import trio

from ambient_dataplane.labels import ResponseFlag
from tests.conftest import LoopbackAllocator
from ztunnel import socks5
from ztunnel.errors import UpstreamConnectError
from ztunnel.sockets import connect_tcp, connect_upstream


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


def _closed_port(address: str) -> int:
    probe = socket.socket()
    probe.bind((address, 0))
    port: int = probe.getsockname()[1]
    probe.close()  # bound once, never listening: a connect is refused
    return port


async def test_refused_connection_raises_oserror(loopback: LoopbackAllocator) -> None:
    address = loopback.new()
    with pytest.raises(OSError):
        await connect_tcp(address, _closed_port(address))


async def test_refused_upstream_says_what_each_side_is_answered(
    loopback: LoopbackAllocator,
) -> None:
    address = loopback.new()
    port = _closed_port(address)
    with pytest.raises(UpstreamConnectError) as refused:
        await connect_upstream(address, port, timeout=5)
    error = refused.value
    assert error.reason.startswith(f"connect to {address}:{port} failed: ")
    assert error.reason.endswith("Connection refused")
    assert error.status_hint == 503  # the inbound CONNECT's answer
    assert error.reply_code == socks5.CONNECTION_REFUSED  # the SOCKS5 client's
    assert error.response_flags == ResponseFlag.UPSTREAM_CONNECT_FAILURE
