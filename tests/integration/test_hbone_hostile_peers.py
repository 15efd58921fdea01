"""HBONE against hostile peers (issue 11): each test plays an attacker that completed mTLS,
with raw HTTP/2 frames over trio's TLS, against a real HBONE server on loopback, and proves the
defence by what the attacker receives (GOAWAY and its code, the connection's end) and by the
server's log events; a well-behaved client on another connection is still answered."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from functools import partial
from typing import Any

import h2.errors
import pytest
import structlog
import trio
from hpack import Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from ambient_dataplane.hbone import (
    ConnectHandler,
    ConnectRequest,
    HboneResponder,
    open_hbone_client,
    serve_hbone_tls,
)
from ambient_dataplane.hbone.limits import DEFAULT_LIMITS, ConnectionLimits
from tests.integration.hbone_helpers import HBONE_PORT, TestMesh, echo_handler

pytestmark = pytest.mark.timeout(60)

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


@pytest.fixture
def mesh() -> TestMesh:
    return TestMesh.create()


async def _start_server(
    nursery: trio.Nursery, host: str, mesh: TestMesh, handler: ConnectHandler = echo_handler,
    limits: ConnectionLimits = DEFAULT_LIMITS,
) -> None:
    await nursery.start(partial(
        trio.serve_tcp,
        partial(serve_hbone_tls, ssl_context=mesh.server_ctx, handler=handler,
                accepted_trust_domains=frozenset({"cluster.local"}), limits=limits),
        HBONE_PORT, host=host,
    ))


async def _attacker(
    host: str, mesh: TestMesh, *, receive_buffer: int | None = None
) -> trio.SSLStream[trio.SocketStream]:
    """A client that completed mTLS and will send whatever the test writes."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect((host, HBONE_PORT))
    tls = trio.SSLStream(trio.SocketStream(sock), mesh.client_ctx, server_side=False)
    await tls.do_handshake()
    return tls


def _parse_frames(data: bytes) -> Iterator[Frame]:
    position = 0
    while position + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[position:position + 9]))
        if position + 9 + length > len(data):
            return
        frame.parse_body(memoryview(data[position + 9:position + 9 + length]))
        yield frame
        position += 9 + length


async def _frames_until_closed(tls: trio.SSLStream[trio.SocketStream]) -> list[Frame]:
    """Everything the server sends until it closes the connection."""
    received = bytearray()
    with trio.fail_after(10):
        try:
            while data := await tls.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass  # a reset after the server's last frames
    return list(_parse_frames(bytes(received)))


async def _logged(logs: list[dict[str, Any]], event: str) -> dict[str, Any]:
    """The first log entry of ``event``, waiting for it (the server logs in its own task)."""
    with trio.fail_after(5):
        while not any(entry["event"] == event for entry in logs):
            await trio.sleep(0.01)
    return next(entry for entry in logs if entry["event"] == event)


def _goaway_codes(frames: list[Frame]) -> list[int]:
    return [frame.error_code for frame in frames if isinstance(frame, GoAwayFrame)]


def _connect_headers(stream_id: int, encoder: Encoder) -> bytes:
    block = encoder.encode([(":method", "CONNECT"), (":authority", "127.0.0.1:80")])
    return HeadersFrame(stream_id, data=block, flags=["END_HEADERS"]).serialize()


async def _normal_client_is_answered(host: str, mesh: TestMesh) -> None:
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:80")
        await tunnel.send_all(b"still served")
        assert await tunnel.receive_some() == b"still served"
        await tunnel.aclose()


async def test_rapid_reset_gets_enhance_your_calm_and_starts_no_handler(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    started: list[ConnectRequest] = []
    cancelled: list[ConnectRequest] = []

    async def slow_upstream_handler(request: ConnectRequest, responder: HboneResponder) -> None:
        started.append(request)
        try:
            await trio.sleep(0.5)  # where ztunnel connects upstream
        except trio.Cancelled:
            cancelled.append(request)
            raise
        await echo_handler(request, responder)

    await _start_server(nursery, host, mesh, slow_upstream_handler)
    encoder = Encoder()
    attack = bytearray(_PREFACE)
    for stream_id in range(1, 6001, 2):  # 3000 CONNECT + RST_STREAM pairs
        attack += _connect_headers(stream_id, encoder)
        attack += RstStreamFrame(stream_id, error_code=h2.errors.ErrorCodes.CANCEL).serialize()
    with structlog.testing.capture_logs() as logs:
        tls = await _attacker(host, mesh)
        with contextlib.suppress(trio.BrokenResourceError):  # the server may close first
            await tls.send_all(bytes(attack))
        frames = await _frames_until_closed(tls)
    assert _goaway_codes(frames) == [_CALM]
    # A reset in the read (and step) that opened its stream starts no handler; one that
    # arrives later (a pair split by a read or step boundary) cancels its handler at once.
    assert len(started) < 10
    assert cancelled == started
    calm = [entry for entry in logs if entry["event"] == "hbone.enhance_your_calm"]
    assert calm and "reset by the peer before an answer" in calm[0]["reason"]
    started.clear()
    await _normal_client_is_answered(host, mesh)
    assert len(started) == 1




async def test_ping_flood_from_a_peer_that_never_reads_is_cut_off(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    await _start_server(nursery, host, mesh)
    pings = PingFrame(0, opaque_data=b"12345678").serialize() * 4096
    with structlog.testing.capture_logs() as logs:
        tls = await _attacker(host, mesh, receive_buffer=4096)
        with pytest.raises(trio.BrokenResourceError):  # the server hung up on the flood
            await tls.send_all(_PREFACE)
            for _ in range(2000):  # 140 MiB of PINGs at most: a bound, not the expectation
                await tls.send_all(pings)
        closed = await _logged(logs, "hbone.connection_closed")
    calm = [entry for entry in logs if entry["event"] == "hbone.enhance_your_calm"]
    assert calm and "control frames unsent" in calm[0]["reason"], calm
    assert "enhance your calm" in closed["reason"]
    await _normal_client_is_answered(host, mesh)


async def test_ping_flood_does_not_starve_other_connections(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    """The flooding peer reads its ACKs (no bound is crossed): the server still answers a
    normal client while the flood is being processed, because the reader yields between
    steps of ``frames_per_step`` frames."""
    host = loopback.new()
    await _start_server(nursery, host, mesh)
    batches = 40
    pings = PingFrame(0, opaque_data=b"12345678").serialize() * 4096
    acks = 0
    answered_after_acks: list[int] = []
    tls = await _attacker(host, mesh)
    all_acked = trio.Event()

    async def read_acks() -> None:
        nonlocal acks
        received = b""
        while acks < batches * 4096:
            received += await tls.receive_some(65536)
            frames = list(_parse_frames(received))
            acks += sum(1 for frame in frames if isinstance(frame, PingFrame))
            received = received[sum(9 + frame.body_len for frame in frames):]
        all_acked.set()

    async def normal_client() -> None:
        await _normal_client_is_answered(host, mesh)
        answered_after_acks.append(acks)

    async with trio.open_nursery() as flood:
        flood.start_soon(read_acks)
        await tls.send_all(_PREFACE + pings)
        flood.start_soon(normal_client)
        for _ in range(batches - 1):
            await tls.send_all(pings)
        with trio.fail_after(30):
            await all_acked.wait()
    assert answered_after_acks and answered_after_acks[0] < batches * 4096


async def test_empty_data_frames_get_enhance_your_calm(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    await _start_server(nursery, host, mesh)
    tls = await _attacker(host, mesh)
    empty = DataFrame(1, data=b"").serialize()
    with structlog.testing.capture_logs() as logs:
        await tls.send_all(_PREFACE + _connect_headers(1, Encoder()) + empty + empty)
        frames = await _frames_until_closed(tls)
    assert _goaway_codes(frames) == [_CALM]
    calm = [entry for entry in logs if entry["event"] == "hbone.enhance_your_calm"]
    assert calm and "without payload" in calm[0]["reason"]
    await _normal_client_is_answered(host, mesh)


async def test_client_without_preface_is_closed_with_goaway(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    await _start_server(nursery, host, mesh, limits=ConnectionLimits(preface_timeout=0.3))
    with structlog.testing.capture_logs() as logs:
        tls = await _attacker(host, mesh)  # mTLS done, then silence
        frames = await _frames_until_closed(tls)
    assert isinstance(frames[0], SettingsFrame)  # the session had started: our preface
    assert _goaway_codes(frames) == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    timeouts = [entry["timeout"] for entry in logs if entry["event"] == "hbone.preface_timeout"]
    assert timeouts == [0.3]
    await _normal_client_is_answered(host, mesh)


async def test_idle_connection_is_drained_but_an_open_tunnel_is_not(
    mesh: TestMesh, loopback, nursery: trio.Nursery
) -> None:
    host = loopback.new()
    await _start_server(nursery, host, mesh, limits=ConnectionLimits(idle_timeout=0.3))
    with structlog.testing.capture_logs() as logs:
        tls = await _attacker(host, mesh)
        await tls.send_all(_PREFACE)  # a valid start, then nothing
        frames = await _frames_until_closed(tls)
    assert _goaway_codes(frames) == [h2.errors.ErrorCodes.NO_ERROR]
    assert any(entry["event"] == "hbone.idle_timeout" for entry in logs)
    # A tunnel that stays open (silent) longer than the idle timeout keeps its connection.
    async with open_hbone_client(host, HBONE_PORT, mesh.client_ctx, mesh.server_id) as client:
        tunnel = await client.open_stream("127.0.0.1:80")
        await trio.sleep(0.6)
        assert not client.is_draining
        await tunnel.send_all(b"after a pause")
        assert await tunnel.receive_some() == b"after a pause"
        await tunnel.aclose()
