"""The waypoint's HTTP/2 server on one connection (prior knowledge): the HBONE library's h2
session, composed, so it inherits the windows, frame sizes and flow-controlled streams; each
request is an HboneStream served by a task of its own.

A request's header block is checked by the data-plane library's one RFC 9113 validation
(``validate_request_headers``); a malformed one is answered 400 on its own stream. A header
block that does not complete within the header timeout (``HeaderBlockWatch``) closes the
connection: no other frame can pass it, and its stream is not open yet to be answered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import h2.events
import h2.exceptions
import structlog
import trio

from ambient_dataplane.hbone.errors import MalformedHeaders
from ambient_dataplane.hbone.request_headers import validate_request_headers
from ambient_dataplane.hbone.session import H2Session
from ambient_dataplane.hbone.stream import HboneStream
from waypoint.http.headers import header_values, joined_header
from waypoint.http.messages import (
    READ_SIZE,
    HttpHandler,
    HttpLimits,
    HttpRequest,
    HttpRequestError,
    HttpResponse,
    call_handler,
    declared_content_length,
    error_response,
    handler_headers,
    response_wire_form,
)
from waypoint.http.sniff import H2_PREFACE

log = structlog.get_logger()

_MAX_H2_STREAMS = 100


def request_from_h2_headers(raw: Sequence[tuple[bytes, bytes]]) -> tuple[HttpRequest, int | None]:
    """Validate an HTTP/2 request header block (RFC 9113 8.3) -> (request without body,
    declared content-length). Raises HttpRequestError(400) naming what is wrong."""
    try:
        pseudo, regular = validate_request_headers(raw)
    except MalformedHeaders as malformed:
        raise HttpRequestError(malformed.status_hint, malformed.reason) from None
    regular = [(name, value.strip(" \t")) for name, value in regular]
    method = pseudo.get(":method")
    if not method:
        raise HttpRequestError(400, "missing :method")
    if method == "CONNECT":
        raise HttpRequestError(405, "CONNECT is not supported inside the tunnel")
    target = pseudo.get(":path")
    if not target:
        raise HttpRequestError(400, "missing :path")
    if not (target.startswith("/") or (target == "*" and method == "OPTIONS")):
        raise HttpRequestError(400, f":path {target!r} is not origin-form")
    scheme = pseudo.get(":scheme")
    if not scheme:
        raise HttpRequestError(400, "missing :scheme")
    authority = pseudo.get(":authority") or joined_header(regular, "host") or ""
    declared = declared_content_length(header_values(regular, "content-length"))
    cookies = header_values(regular, "cookie")
    if len(cookies) > 1:  # RFC 9113 8.2.3: crumbs are rejoined with "; " for HTTP/1.1
        regular = [(k, v) for k, v in regular if k != "cookie"] + [("cookie", "; ".join(cookies))]
    request = HttpRequest(
        method=method, target=target, headers=handler_headers(regular), body=b"",
        authority=authority, http_version="2", scheme=scheme,
    )
    return request, declared


class _Http2Connection:
    """One client's HTTP/2 connection: the session does the h2 bookkeeping, each request
    stream (flow-controlled both ways) is served by its own task."""

    def __init__(
        self, transport: trio.abc.HalfCloseableStream, handler: HttpHandler, limits: HttpLimits,
        nursery: trio.Nursery,
    ) -> None:
        self.session = H2Session(
            transport, client_side=False, max_concurrent_streams=_MAX_H2_STREAMS,
            on_request=self._on_request,
        )
        # HPACK refuses (connection error) only far beyond our limit; between the two the
        # request gets a 431 on its own stream.
        self.session.conn.decoder.max_header_list_size = max(2 * limits.max_header_bytes, 65536)
        self._handler = handler
        self._limits = limits
        self._nursery = nursery

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream = self.session.new_stream(event.stream_id)
        headers = [(bytes(name), bytes(value)) for name, value in event.headers or ()]
        # A HEADERS frame with END_STREAM also yields StreamEnded, handled by the session.
        self._nursery.start_soon(self._serve_stream, stream, headers)

    async def _serve_stream(self, stream: HboneStream, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            with trio.CancelScope() as unanswered:
                # A reset before the answer ends the work at once (and counts as premature
                # towards the session's rapid-reset bound until the answer sets ``answered``).
                stream.cancel_when_broken(unanswered)
                await self._answer(stream, headers)
            if unanswered.cancelled_caught:
                log.debug("http.h2_stream_reset_before_answer", stream=stream.stream_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("http.h2_stream_broken", stream=stream.stream_id, error=str(exc))
        finally:
            await stream.aclose()  # RST_STREAM(NO_ERROR) if the request was not read to its end

    async def _answer(self, stream: HboneStream, headers: list[tuple[bytes, bytes]]) -> None:
        """Read the request, run the handler, send its response (or the refusal)."""
        method = "GET"
        try:
            if sum(len(k) + len(v) + 4 for k, v in headers) > self._limits.max_header_bytes:
                raise HttpRequestError(431, "request header block exceeds "
                                       f"{self._limits.max_header_bytes} bytes")
            request, declared = request_from_h2_headers(headers)
            method = request.method
            if declared is not None and declared > self._limits.max_body_bytes:
                raise HttpRequestError(413, f"request body of {declared} bytes exceeds "
                                       f"{self._limits.max_body_bytes}")
            request = dataclasses.replace(request, body=await self._read_body(stream))
            response = await call_handler(self._handler, request)
        except HttpRequestError as refusal:
            log.info("http.request_refused", status=refusal.status, reason=refusal.reason,
                     stream=stream.stream_id)
            response = error_response(refusal.status, refusal.reason)
        await self._send_response(stream, method, response)

    async def _read_body(self, stream: HboneStream) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            with trio.move_on_after(self._limits.idle_timeout):
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    return b"".join(chunks)
                size += len(data)
                if size > self._limits.max_body_bytes:
                    raise HttpRequestError(
                        413, f"request body exceeds {self._limits.max_body_bytes} bytes"
                    )
                chunks.append(data)
                continue
            raise HttpRequestError(408, "request body not received in time")

    async def _send_response(
        self, stream: HboneStream, method: str, response: HttpResponse
    ) -> None:
        headers, body = response_wire_form(response, method)
        block = [(b":status", str(response.status).encode())]
        block += [(name.encode("ascii"), value.encode("latin-1")) for name, value in headers]
        stream.answered = True
        stream.cancel_when_broken(None)  # answered: a reset now is the client's to make
        try:
            self.session.conn.send_headers(stream.stream_id, block)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise trio.BrokenResourceError(f"cannot answer stream: {exc}") from None
        with trio.move_on_after(self._limits.idle_timeout) as scope:
            if body:
                await stream.send_all(body)
            await stream.send_eof()
        if scope.cancelled_caught:
            log.info("http.write_timeout", stream=stream.stream_id)


_FRAME_HEADER_SIZE = 9
_HEADERS, _CONTINUATION = 0x1, 0x9
_END_HEADERS = 0x4


class HeaderBlockWatch:
    """Since when a header block has been arriving on a connection (sans-IO, fed the bytes
    received after the client preface).

    h2 reports a request only once its header block is complete (HEADERS and CONTINUATION
    frames up to END_HEADERS); until then a peer can hold it open, and the whole connection
    with it (no other frame may come in between). Frame boundaries are read off the bytes:
    ``started_at`` is when the first byte of a HEADERS frame arrived, None once the frame
    ending the block (END_HEADERS) arrived whole.
    """

    def __init__(self, on_start: Callable[[], None]) -> None:
        self.started_at: float | None = None
        self._on_start = on_start
        self._header = bytearray()  # a frame header still arriving
        self._payload_left = 0  # payload bytes of the current frame still to come
        self._frame_ends_block = False

    def feed(self, data: bytes) -> None:
        position, size = 0, len(data)
        while position < size:
            if self._payload_left:
                taken = min(self._payload_left, size - position)
                self._payload_left -= taken
                position += taken
                if not self._payload_left and self._frame_ends_block:
                    self.started_at = None
                continue
            needed = _FRAME_HEADER_SIZE - len(self._header)
            self._header += data[position:position + needed]
            position += min(needed, size - position)
            if len(self._header) > 3 and self._header[3] in (_HEADERS, _CONTINUATION):
                self._start()
            if len(self._header) == _FRAME_HEADER_SIZE:
                self._frame_started()

    def _frame_started(self) -> None:
        length = int.from_bytes(self._header[:3], "big")
        is_header_frame = self._header[3] in (_HEADERS, _CONTINUATION)
        self._frame_ends_block = is_header_frame and bool(self._header[4] & _END_HEADERS)
        self._header.clear()
        self._payload_left = length
        if not length and self._frame_ends_block:
            self.started_at = None

    def _start(self) -> None:
        if self.started_at is None:
            self.started_at = trio.current_time()
            self._on_start()


class _WatchedTransport(trio.abc.HalfCloseableStream):
    """The connection's transport, its received bytes shown to a ``HeaderBlockWatch``."""

    def __init__(self, transport: trio.abc.HalfCloseableStream, watch: HeaderBlockWatch) -> None:
        self._transport = transport
        self._watch = watch
        self._preface_left = len(H2_PREFACE)  # the client preface comes before the frames

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = bytes(await self._transport.receive_some(max_bytes))
        frames = data
        if self._preface_left:
            frames = data[self._preface_left:]
            self._preface_left = max(0, self._preface_left - len(data))
        if frames:
            self._watch.feed(frames)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._transport.send_eof()

    async def aclose(self) -> None:
        await self._transport.aclose()


class _Wakeup:
    """One event, re-armed: the watchdog sleeps until a deadline or until something moves
    one (a header block began, the session ended)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait_until(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._event.wait()
        self._event = trio.Event()


async def serve_h2(
    transport: trio.abc.HalfCloseableStream, handler: HttpHandler, limits: HttpLimits
) -> None:
    """Run the session until the peer leaves, the connection idles out or a request head
    takes too long; on our way out (also on cancellation) the still-running writer sends
    GOAWAY first."""
    wakeup = _Wakeup()
    heads = HeaderBlockWatch(wakeup.set)
    async with trio.open_nursery() as nursery:
        session = _Http2Connection(
            _WatchedTransport(transport, heads), handler, limits, nursery
        ).session
        # Shielded so that a cancellation cannot kill the writer before the GOAWAY is out;
        # it is cancelled explicitly once close() has run.
        run_scope = trio.CancelScope(shield=True)

        async def run_session() -> None:
            with run_scope:
                await session.run()

        async def wake_when_closed() -> None:
            await session.closed_event.wait()
            wakeup.set()

        nursery.start_soon(run_session)
        nursery.start_soon(wake_when_closed)
        try:
            await _watch(session, heads, limits, wakeup)
        finally:
            with trio.CancelScope(shield=True):
                await session.close(half_close=True)  # a clean end for the HBONE tunnel
            run_scope.cancel()
            nursery.cancel_scope.cancel()


async def _watch(
    session: H2Session, heads: HeaderBlockWatch, limits: HttpLimits, wakeup: _Wakeup
) -> None:
    """Return when the connection should close: a header block arriving for longer than the
    header timeout, or no stream for the idle timeout (or the session ended)."""
    while not session.is_closed:
        now = trio.current_time()
        if heads.started_at is not None:
            deadline = heads.started_at + limits.header_timeout
            if now >= deadline:
                log.info("http.request_head_timeout", timeout=limits.header_timeout)
                return
        else:
            deadline = session.last_used + limits.idle_timeout
            if now >= deadline:
                if not session.streams:
                    log.debug("http.h2_idle_close")
                    return
                deadline = now + limits.idle_timeout  # busy: look again later
        await wakeup.wait_until(deadline)
