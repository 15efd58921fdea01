"""The sample apps and their clients on loopback: HTTP echo, TCP echo with half-close, SOCKS5."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from ambientctl.apps import (
    EchoBehaviour,
    HttpClientError,
    Socks5ConnectError,
    Socks5ProtocolError,
    http_get,
    http_request,
    serve_http_echo,
    serve_tcp_echo,
    socks5_connect,
    socks5_connect_request,
)
from tests.conftest import LoopbackAllocator


async def test_http_echo_answers_with_pod_and_request(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address, client = loopback.new(), loopback.new()
    port = await nursery.start(serve_http_echo, address, 8080, "productpage-v1")
    assert port == 8080
    async with await trio.open_tcp_stream(address, port, local_address=client) as stream:
        status, headers, body = await http_get(stream, "productpage", "/api?x=1")
        assert status == 200
        assert headers["content-type"] == "application/json"
        answer = json.loads(body)
        assert answer["pod"] == "productpage-v1"
        assert answer["method"] == "GET"
        assert answer["path"] == "/api?x=1"
        assert answer["headers"]["host"] == "productpage"
        assert answer["peer"].startswith(f"{client}:")
        assert "body_length" not in answer

        # Keep-alive: the same connection serves a second request, a POST with a body.
        status, _, body = await http_request(
            stream, "POST", "productpage", "/upload", headers=[("x-a", "1")], body=b"x" * 70000
        )
        answer = json.loads(body)
        assert (status, answer["method"], answer["body_length"]) == (200, "POST", 70000)
        assert answer["headers"]["x-a"] == "1"


async def test_http_echo_refuses_garbage_and_keeps_serving(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    port = await nursery.start(serve_http_echo, address, 8080, "p")
    async with await trio.open_tcp_stream(address, port) as bad:
        await bad.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := await bad.receive_some(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 ")
    async with await trio.open_tcp_stream(address, port) as good:
        status, _, _ = await http_get(good, "p", "/")
        assert status == 200


async def test_http_client_reports_a_closed_connection(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.aclose()

    await nursery.start(partial(trio.serve_tcp, hang_up, 8080, host=address))
    async with await trio.open_tcp_stream(address, 8080) as stream:
        with pytest.raises(HttpClientError, match="connection closed"):
            await http_get(stream, "x", "/")


async def test_tcp_echo_carries_half_close(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    port = await nursery.start(serve_tcp_echo, address, 9000)
    async with await trio.open_tcp_stream(address, port) as stream:
        payload = bytes(range(256)) * 1000
        async with trio.open_nursery() as inner:

            async def send_then_eof() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            inner.start_soon(send_then_eof)
            received = bytearray()
            while chunk := await stream.receive_some(65536):
                received += chunk
        # Everything came back and the echo sent its own EOF after it (the loop ended).
        assert bytes(received) == payload


# --- SOCKS5 ------------------------------------------------------------------------------


def fake_socks5_server(
    reply_code: int, seen: list[tuple[str, bytes]]
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A minimal SOCKS5 server: records (peer ip, request) and answers ``reply_code``;
    on success it then echoes, so the test sees that no byte was lost after the reply."""

    async def handler(stream: trio.SocketStream) -> None:
        greeting = await stream.receive_some(3)
        assert greeting == b"\x05\x01\x00"
        await stream.send_all(b"\x05\x00")
        request = await stream.receive_some(262)
        seen.append((stream.socket.getpeername()[0], bytes(request)))
        bound = b"\x01" + bytes([127, 0, 0, 1]) + struct.pack("!H", 15080)
        await stream.send_all(
            bytes([5, reply_code, 0]) + bound + (b"early" if not reply_code else b"")
        )
        if reply_code:
            await stream.aclose()
            return
        while data := await stream.receive_some(4096):
            await stream.send_all(data)

    return handler


async def test_socks5_connect_from_a_source_address(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    proxy, pod = loopback.new(), loopback.new()
    seen: list[tuple[str, bytes]] = []
    await nursery.start(partial(trio.serve_tcp, fake_socks5_server(0, seen), 15080, host=proxy))
    stream = await socks5_connect(proxy, 15080, "127.0.20.5", 8080, source_address=pod)
    async with stream:
        # Bytes the server sent right after its reply belong to the caller, not the handshake.
        assert await stream.receive_some(5) == b"early"
        await stream.send_all(b"ping")
        assert await stream.receive_some(4) == b"ping"
    assert seen == [(pod, socks5_connect_request("127.0.20.5", 8080))]
    assert seen[0][1] == b"\x05\x01\x00\x01" + bytes([127, 0, 20, 5]) + struct.pack("!H", 8080)


async def test_socks5_refusal_is_a_clear_error(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    proxy, pod = loopback.new(), loopback.new()
    await nursery.start(partial(trio.serve_tcp, fake_socks5_server(2, []), 15080, host=proxy))
    with pytest.raises(Socks5ConnectError) as info:
        await socks5_connect(proxy, 15080, "productpage.bookinfo", 9080, source_address=pod)
    assert info.value.reply_code == 2
    assert "not allowed by ruleset" in str(info.value)


async def test_socks5_against_a_non_socks_server(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    port = await nursery.start(serve_http_echo, address, 15080, "p")
    with pytest.raises(Socks5ProtocolError):
        await socks5_connect(address, port, "127.0.0.1", 80, source_address=loopback.new())


def test_socks5_request_encodings() -> None:
    assert socks5_connect_request("::1", 443)[3] == 4
    named = socks5_connect_request("productpage.bookinfo", 9080)
    assert named[3:5] == b"\x03\x14" and named[5:25] == b"productpage.bookinfo"
    with pytest.raises(ValueError, match="port 0 is out of range"):
        socks5_connect_request("127.0.0.1", 0)


# --- as its own process ------------------------------------------------------------------


async def test_app_process_serves_and_stops_cleanly_on_sigterm(
    loopback: LoopbackAllocator,
) -> None:
    address = loopback.new()
    argv = [sys.executable, "-m", "ambientctl.apps", "http", "--address", address,
            "--port", "8080", "--name", "proc-pod", "--log-format", "json"]  # fmt: skip
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream(address, 8080)
                    break
                except OSError:
                    await trio.sleep(0.05)
        async with stream:
            _, _, body = await http_get(stream, address, "/")
        assert json.loads(body)["pod"] == "proc-pod"
        process.terminate()
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()


def test_app_process_reports_a_port_in_use(loopback: LoopbackAllocator) -> None:
    import socket

    address = loopback.new()
    with socket.socket() as taken:
        taken.bind((address, 8080))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "ambientctl.apps", "tcp", "--address", address,
             "--port", "8080", "--log-format", "json"],
            capture_output=True, timeout=20, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert b"cannot listen" in result.stderr


async def test_http_echo_status_path_and_flaky_mode(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    port = await nursery.start(partial(serve_http_echo, fail_every=2), address, 0, "flaky")
    statuses = []
    for path in ("/a", "/b", "/c", "/d", "/status/418"):
        async with await trio.open_tcp_stream(address, port) as stream:
            status, _headers, _body = await http_get(stream, "flaky", path)
            statuses.append(status)
    assert statuses == [200, 503, 200, 503, 418]


async def test_http_echo_delay_path_answers_late_and_refuses_bad_numbers(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    port = await nursery.start(serve_http_echo, address, 0, "slow")
    async with await trio.open_tcp_stream(address, port) as stream:
        status, _headers, body = await http_get(stream, "slow", "/delay/0.3?x=1")
        assert (status, json.loads(body)["path"]) == (200, "/delay/0.3?x=1")
        assert EchoBehaviour.delay_for("/delay/0.3?x=1") == 0.3  # what it waited before
        # Bad numbers are a 400, on the same keep-alive connection.
        for bad in ("/delay/abc", "/delay/-1", "/delay/nan", "/delay/inf", "/delay/"):
            assert (await http_get(stream, "slow", bad))[0] == 400, bad
    assert EchoBehaviour.delay_for("/delay/99") == EchoBehaviour.MAX_DELAY == 10.0
    assert EchoBehaviour.delay_for("/delay/1.5/more") == 1.5
    assert EchoBehaviour.delay_for("/delayed/1") == 0.0
