"""The waypoint's HTTP/2 server on one connection (prior knowledge): the HBONE library's h2
session, composed, so it inherits the windows, frame sizes and flow-controlled streams; each
request is an HboneStream served by a task of its own.

A request's header block is checked by the data-plane library's one RFC 9113 validation
(``validate_request_headers``); a malformed one is answered 400 on its own stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
        method = "GET"
        try:
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
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("http.h2_stream_broken", stream=stream.stream_id, error=str(exc))
        finally:
            await stream.aclose()  # RST_STREAM(NO_ERROR) if the request was not read to its end

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


async def serve_h2(
    transport: trio.abc.HalfCloseableStream, handler: HttpHandler, limits: HttpLimits
) -> None:
    """Run the session until the peer leaves or the connection idles out; on our way out
    (idle, cancellation) the still-running writer sends GOAWAY first."""
    async with trio.open_nursery() as nursery:
        session = _Http2Connection(transport, handler, limits, nursery).session
        # Shielded so that a cancellation cannot kill the writer before the GOAWAY is out;
        # it is cancelled explicitly once close() has run.
        run_scope = trio.CancelScope(shield=True)

        async def run_session() -> None:
            with run_scope:
                await session.run()

        nursery.start_soon(run_session)
        try:
            await _wait_until_idle(session, limits.idle_timeout)
        finally:
            with trio.CancelScope(shield=True):
                await session.close(half_close=True)  # a clean end for the HBONE tunnel
            run_scope.cancel()
            nursery.cancel_scope.cancel()


async def _wait_until_idle(session: H2Session, idle_timeout: float) -> None:
    while not session.is_closed:
        deadline = session.last_used + idle_timeout
        if trio.current_time() >= deadline:
            if not session.streams:
                log.debug("http.h2_idle_close")
                return
            deadline = trio.current_time() + idle_timeout  # busy: look again later
        with trio.move_on_at(deadline):
            await session.closed_event.wait()
