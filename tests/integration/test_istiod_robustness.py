"""One misbehaving client must cost one connection, never the control plane: each test makes
a real istiod_lite (TLS + HTTP/2 via hypercorn) face a bad client, then checks that a normal
httpx HTTP/2 client is still served."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from structlog.testing import capture_logs

from ambient_api.discovery import CERTIFICATE_PATH
from istiod_lite.__main__ import RunningIstiod
from istiod_lite.server import IstiodApp
from tests.integration.test_istiod_server import (  # noqa: F401  (fixtures used by name)
    client_for,
    istiod,
    istiod_config,
)

RawConnection = tuple[trio.SSLStream[trio.SocketStream], h2.connection.H2Connection]


def address_of(running: RunningIstiod) -> tuple[str, int]:
    url = urlsplit(running.url)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


async def assert_still_serving(running: RunningIstiod) -> None:
    """A fresh, well-behaved HTTP/2 client gets /ready."""
    async with client_for(running) as client:
        with trio.fail_after(5):
            response = await client.get("/ready")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200, response.text
    assert response.json()["ready"] is True


async def open_tls(running: RunningIstiod) -> trio.SSLStream[trio.SocketStream]:
    """TLS to istiod trusting its published root-cert.pem, offering only ALPN h2."""
    host, port = address_of(running)
    context = ssl.create_default_context(cafile=str(running.root_cert_path))
    context.set_alpn_protocols(["h2"])
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, context, server_hostname=host)
    with trio.fail_after(5):
        await stream.do_handshake()
    assert stream.selected_alpn_protocol() == "h2"
    return stream


async def open_h2(running: RunningIstiod, *, validate_headers: bool = True) -> RawConnection:
    stream = await open_tls(running)
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate_headers,
            normalize_outbound_headers=validate_headers,
        )
    )
    connection.initiate_connection()
    await stream.send_all(connection.data_to_send())
    return stream, connection


def request_headers(
    running: RunningIstiod, method: str, path: bytes, token: str | None = None
) -> list[tuple[bytes, bytes]]:
    host, port = address_of(running)
    headers = [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", f"{host}:{port}".encode()),
        (b":path", path),
    ]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return headers


async def read_response(raw: RawConnection, stream_id: int) -> int:
    """The status of ``stream_id``'s response, once the server has ended that stream."""
    stream, connection = raw
    status: int | None = None
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some(65536)
            assert data, "istiod closed the connection before answering"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    assert status is not None
                    await stream.send_all(connection.data_to_send())
                    return status
            await stream.send_all(connection.data_to_send())


async def send_data_after_answer(raw: RawConnection, stream_id: int) -> None:
    """Keep sending request body on a stream the server has already answered and closed on its
    side (the trigger of hypercorn 0.18's KeyError), until the server hangs up."""
    stream, connection = raw
    for _ in range(10):
        try:
            connection.send_data(stream_id, b'{"csr": "late"}')
            await stream.send_all(connection.data_to_send())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            break
        await trio.sleep(0.02)
    await stream.aclose()


async def read_until_hang_up(stream: trio.abc.ReceiveStream) -> None:
    """Drain whatever istiod still sends until it closes the connection (a FIN, a TLS EOF
    without close_notify or a reset all count)."""
    with trio.fail_after(5):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass


@pytest.fixture
def answers_before_reading_body(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Turn off the app's read-the-whole-body-first workaround, so that it answers while the
    client is still sending, as any ASGI endpoint may: the server itself must survive that."""

    async def no_body(self: IstiodApp, scope: MutableMapping[str, Any], receive: Any) -> bytes:
        return b""

    monkeypatch.setattr(IstiodApp, "_read_body", no_body)
    yield


def failure_logs(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"].startswith("connection failed")]


@pytest.mark.parametrize(
    ("method", "path", "token", "expected_status"),
    [
        ("POST", CERTIFICATE_PATH.encode(), "not-a-valid-token-0123456789", 401),
        ("GET", b"/ready", None, 200),
    ],
)
async def test_data_on_an_answered_stream_ends_only_that_connection(
    istiod: RunningIstiod,  # noqa: F811
    answers_before_reading_body: None,
    method: str,
    path: bytes,
    token: str | None,
    expected_status: int,
) -> None:
    raw = await open_h2(istiod)
    client_host, client_port = raw[0].transport_stream.socket.getsockname()[:2]
    stream_id = raw[1].get_next_available_stream_id()
    raw[1].send_headers(stream_id, request_headers(istiod, method, path, token))
    await raw[0].send_all(raw[1].data_to_send())
    with capture_logs() as logs:
        assert await read_response(raw, stream_id) == expected_status
        await send_data_after_answer(raw, stream_id)
        await assert_still_serving(istiod)
    [failure] = failure_logs(logs)
    assert failure["error_type"] == "KeyError"
    assert failure["peer"] == f"{client_host}:{client_port}"


async def test_data_after_a_complete_request_is_answered(istiod: RunningIstiod) -> None:  # noqa: F811
    """With the app's workaround in place: wrong token, whole body, 401, then more DATA."""
    raw = await open_h2(istiod)
    stream, connection = raw
    stream_id = connection.get_next_available_stream_id()
    headers = request_headers(istiod, "POST", CERTIFICATE_PATH.encode(), "wrong-token-0123456789")
    connection.send_headers(stream_id, headers)
    connection.send_data(stream_id, b"{}", end_stream=True)
    await stream.send_all(connection.data_to_send())
    assert await read_response(raw, stream_id) == 401
    # h2 will not send DATA after END_STREAM, so put the frame on the wire by hand.
    late_data = b"\x00\x00\x02\x00\x00" + stream_id.to_bytes(4, "big") + b"{}"
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(late_data)
    await stream.aclose()
    await assert_still_serving(istiod)


async def test_non_ascii_path_ends_only_that_connection(istiod: RunningIstiod) -> None:  # noqa: F811
    """Hypercorn decodes ``:path`` as ASCII without catching the error."""
    raw = await open_h2(istiod, validate_headers=False)
    stream, connection = raw
    stream_id = connection.get_next_available_stream_id()
    headers = request_headers(istiod, "GET", b"/\xff\xfe")
    connection.send_headers(stream_id, headers, end_stream=True)
    with capture_logs() as logs:
        await stream.send_all(connection.data_to_send())
        await read_until_hang_up(stream)
        await assert_still_serving(istiod)
    [failure] = failure_logs(logs)
    assert failure["error_type"] == "UnicodeDecodeError"
    await stream.aclose()


async def test_garbage_after_the_tls_handshake(istiod: RunningIstiod) -> None:  # noqa: F811
    stream = await open_tls(istiod)
    with contextlib.suppress(trio.BrokenResourceError):  # istiod may have hung up already
        await stream.send_all(b"\x00\xff GARBAGE that is not an HTTP/2 preface \r\n\r\n" * 20)
    await read_until_hang_up(stream)
    await stream.aclose()
    await assert_still_serving(istiod)


async def test_plain_text_on_the_tls_port(istiod: RunningIstiod) -> None:  # noqa: F811
    tcp = await trio.open_tcp_stream(*address_of(istiod))
    await tcp.send_all(b"GET /ready HTTP/1.1\r\nHost: istiod\r\n\r\n")
    await read_until_hang_up(tcp)
    await tcp.aclose()
    await assert_still_serving(istiod)


async def test_clients_that_disconnect_at_once(istiod: RunningIstiod) -> None:  # noqa: F811
    tcp = await trio.open_tcp_stream(*address_of(istiod))
    await tcp.aclose()
    tls = await open_tls(istiod)
    await tls.aclose()
    await assert_still_serving(istiod)

