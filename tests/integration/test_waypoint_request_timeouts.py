"""The waypoint's request-head and idle timeouts (issue 11): a peer that starts a request head
and does not finish it is closed once the header timeout passes (HTTP/1.1: answered 408;
HTTP/2: the connection, which a pending header block holds up, goes with GOAWAY); a
connection carrying no request goes after the idle timeout; other connections go on."""

from __future__ import annotations

from functools import partial

import h2.events
import hpack
import pytest
import structlog
import trio
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

from tests.integration.test_waypoint_http import H2Client, parse_responses, read_until_eof
from waypoint.http import HttpLimits, HttpRequest, HttpResponse, serve_http
from waypoint.http.server_h2 import HeaderBlockWatch

PORT = 8080
LIMITS = HttpLimits(header_timeout=0.3, idle_timeout=0.6)
REQUEST_HEAD = [(":method", "GET"), (":scheme", "http"), (":authority", "svc:80"),
                (":path", "/slow")]


async def _handler(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, (), request.path.encode())


async def _serve(nursery: trio.Nursery, host: str) -> None:
    async def on_connection(stream: trio.SocketStream) -> None:
        await serve_http(stream, _handler, LIMITS)

    await nursery.start(partial(trio.serve_tcp, on_connection, PORT, host=host))


def _open_header_block() -> bytes:
    """HEADERS for stream 1 without END_HEADERS: the block awaits a CONTINUATION."""
    frame = HeadersFrame(1, hpack.Encoder().encode(REQUEST_HEAD), flags=["END_STREAM"])
    return frame.serialize()


def _half_a_headers_frame() -> bytes:
    frame = HeadersFrame(1, hpack.Encoder().encode(REQUEST_HEAD),
                         flags=["END_STREAM", "END_HEADERS"]).serialize()
    return frame[:len(frame) // 2]


async def _settle(client: H2Client) -> None:
    """Take the server's SETTINGS and ACK them now: nothing may follow a stalled header
    block on the wire, so the client must have nothing left to say."""
    with trio.fail_after(5):
        while not any(isinstance(event, h2.events.RemoteSettingsChanged)
                      for event in client.conn.receive_data(await client.stream.receive_some())):
            pass
    await client.flush()


async def _h2_request_completes(host: str, path: str) -> bytes:
    client = H2Client(await trio.open_tcp_stream(host, PORT))
    await client.start()
    stream_id = await client.request("GET", path)
    await client.pump_until(client.all_done([stream_id]))
    await client.stream.aclose()
    return client.responses[stream_id]["body"]  # type: ignore[return-value]


@pytest.mark.parametrize("stalled", [_open_header_block, _half_a_headers_frame])
async def test_h2_header_block_that_never_completes_closes_that_connection(
    loopback: object, nursery: trio.Nursery, stalled: object
) -> None:
    host = loopback.new()  # type: ignore[attr-defined]
    await _serve(nursery, host)
    slow = H2Client(await trio.open_tcp_stream(host, PORT))
    await slow.start()
    await _settle(slow)
    with structlog.testing.capture_logs() as logs:
        await slow.stream.send_all(stalled())  # type: ignore[operator]
        # Meanwhile another connection is served as usual.
        assert await _h2_request_completes(host, "/fine") == b"/fine"
        await slow.pump_until(lambda: slow.terminated is not None)
    assert isinstance(slow.terminated, h2.events.ConnectionTerminated)
    assert await read_until_eof(slow.stream) == b""
    assert any(e["event"] == "http.request_head_timeout" for e in logs), logs


async def test_h2_connection_that_sends_no_request_is_closed_when_idle(
    loopback: object, nursery: trio.Nursery
) -> None:
    host = loopback.new()  # type: ignore[attr-defined]
    await _serve(nursery, host)
    quiet = H2Client(await trio.open_tcp_stream(host, PORT))
    await quiet.start()  # the preface and SETTINGS, then nothing
    with structlog.testing.capture_logs() as logs:
        await quiet.pump_until(lambda: quiet.terminated is not None)
    assert quiet.terminated is not None and quiet.terminated.error_code == 0  # GOAWAY
    assert "http.request_head_timeout" not in [e["event"] for e in logs]  # idle, not slow


async def test_h1_partial_head_is_answered_408_and_others_go_on(
    loopback: object, nursery: trio.Nursery
) -> None:
    host = loopback.new()  # type: ignore[attr-defined]
    await _serve(nursery, host)
    slow = await trio.open_tcp_stream(host, PORT)
    await slow.send_all(b"GET /slow HTTP/1.1\r\nHost: svc\r\nX-Partial: ")
    other = await trio.open_tcp_stream(host, PORT)
    await other.send_all(b"GET /fine HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    [fine] = parse_responses(await read_until_eof(other))
    assert fine.status == 200 and fine.body == b"/fine"
    [timed_out] = parse_responses(await read_until_eof(slow))
    assert timed_out.status == 408


async def test_header_block_watch_follows_frame_boundaries() -> None:
    started: list[bool] = []
    watch = HeaderBlockWatch(lambda: started.append(True))
    block = hpack.Encoder().encode(REQUEST_HEAD)
    headers = HeadersFrame(1, block[:5]).serialize()
    continuation = ContinuationFrame(1, block[5:], flags=["END_HEADERS"]).serialize()
    watch.feed(DataFrame(1, b"x" * 100).serialize())  # a body is no request head
    assert watch.started_at is None
    watch.feed(headers[:2])  # not yet known to be a HEADERS frame
    assert watch.started_at is None
    watch.feed(headers[2:])
    assert watch.started_at is not None and started == [True]
    watch.feed(continuation[:-1])
    assert watch.started_at is not None  # the block's last byte is still to come
    watch.feed(continuation[-1:])
    assert watch.started_at is None
    assert started == [True]
