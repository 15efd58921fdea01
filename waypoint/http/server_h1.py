"""The waypoint's HTTP/1.x server on one connection, driven by h11: keep-alive, pipelining
(requests strictly in order), 100-continue, and a refusal (4xx) answered before closing.
"""

from __future__ import annotations

import contextlib
import math
import urllib.parse
from collections.abc import Iterable

import h11
import structlog
import trio

from waypoint.http.headers import header_values, joined_header
from waypoint.http.messages import (
    CLOSE_TIMEOUT,
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

_LINGER_TIME = 1.0
_LINGER_BYTES = 4 * 1024 * 1024


async def serve_h1(
    stream: trio.abc.HalfCloseableStream, handler: HttpHandler, limits: HttpLimits,
    initial_bytes: bytes,
) -> None:
    """Serve requests until the client is done (``initial_bytes``: read while sniffing)."""
    await _Http1Server(stream, handler, limits, initial_bytes).run()


def _head_size(method: str, target: str, headers: Iterable[tuple[str, str]]) -> int:
    """Bytes of a request head as HTTP/1.1 writes it."""
    return len(method) + len(target) + 12 + sum(len(k) + len(v) + 4 for k, v in headers)


class _ClientGone(Exception):
    """The client closed its side before a request was complete: nothing to answer."""


class _Http1Server:
    """One HTTP/1.x connection: requests strictly in order (h11 parses pipelined ones after
    the previous response), each body buffered before the handler runs."""

    def __init__(
        self, stream: trio.abc.HalfCloseableStream, handler: HttpHandler, limits: HttpLimits,
        initial: bytes,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._limits = limits
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        if initial:
            self._conn.receive_data(initial)

    async def run(self) -> None:
        linger = False
        try:
            while True:
                try:
                    request = await self._next_request()
                except HttpRequestError as refusal:
                    log.info("http.request_refused", status=refusal.status, reason=refusal.reason)
                    await self._send_refusal(refusal)
                    linger = True
                    return
                except _ClientGone:
                    return
                if request is None:
                    return
                response = await call_handler(self._handler, request)
                if not await self._send_response(request.method, response):
                    return
                if h11.MUST_CLOSE in (self._conn.our_state, self._conn.their_state):
                    return
                self._conn.start_next_cycle()
        finally:
            await self._finish(linger)

    async def _receive(self, deadline: float) -> bool:
        """Feed h11 one read; False when the deadline passed first."""
        with trio.move_on_at(deadline):
            self._conn.receive_data(bytes(await self._stream.receive_some(READ_SIZE)))
            return True
        return False

    async def _next_request(self) -> HttpRequest | None:
        """The next complete request; None when the client ends (or idles out) between
        requests. Raises HttpRequestError for requests answered without the handler."""
        idle_deadline = trio.current_time() + self._limits.idle_timeout
        head_deadline = math.inf
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpRequestError(exc.error_status_hint, str(exc)) from None
            if event is h11.NEED_DATA:
                started = bool(self._conn.trailing_data[0])
                if started and head_deadline == math.inf:
                    head_deadline = trio.current_time() + self._limits.header_timeout
                if not await self._receive(head_deadline if started else idle_deadline):
                    if started:
                        raise HttpRequestError(408, "request head not received in time")
                    return None
                continue
            if isinstance(event, h11.Request):
                return await self._complete_request(event)
            return None  # ConnectionClosed (or PAUSED): the client is done

    async def _complete_request(self, event: h11.Request) -> HttpRequest:
        method = event.method.decode("ascii")
        raw_target = event.target.decode("ascii")
        raw_headers = [(name.decode("ascii"), value.decode("latin-1"))
                       for name, value in event.headers]
        if _head_size(method, raw_target, raw_headers) > self._limits.max_header_bytes:
            raise HttpRequestError(431, "request header block exceeds "
                                   f"{self._limits.max_header_bytes} bytes")
        if method == "CONNECT":
            raise HttpRequestError(405, "CONNECT is not supported inside the tunnel")
        authority = joined_header(raw_headers, "host") or ""
        target = raw_target
        if "://" in raw_target and not raw_target.startswith("/"):
            parts = urllib.parse.urlsplit(raw_target)  # absolute-form (RFC 9112 3.2.2)
            authority = parts.netloc or authority
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        declared = declared_content_length(header_values(raw_headers, "content-length"))
        if declared is not None and declared > self._limits.max_body_bytes:
            raise HttpRequestError(413, f"request body of {declared} bytes exceeds "
                                   f"{self._limits.max_body_bytes}")
        body = await self._read_body()
        return HttpRequest(
            method=method, target=target, headers=handler_headers(raw_headers), body=body,
            authority=authority,
            http_version="1.0" if event.http_version == b"1.0" else "1.1",
        )

    async def _read_body(self) -> bytes:
        if self._conn.client_is_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[])
            await self._send(self._conn.send(continue_))
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpRequestError(exc.error_status_hint, str(exc)) from None
            if event is h11.NEED_DATA:
                deadline = trio.current_time() + self._limits.idle_timeout
                if not await self._receive(deadline):
                    raise HttpRequestError(408, "request body not received in time")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._limits.max_body_bytes:
                    raise HttpRequestError(
                        413, f"request body exceeds {self._limits.max_body_bytes} bytes"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _ClientGone()

    async def _send(self, data: bytes | None) -> bool:
        """Write with the idle timeout as a bound; False when the client stopped reading."""
        if not data:
            return True
        with trio.move_on_after(self._limits.idle_timeout):
            await self._stream.send_all(data)
            return True
        log.info("http.write_timeout")
        return False

    async def _send_response(self, method: str, response: HttpResponse) -> bool:
        headers, body = response_wire_form(response, method)
        head = h11.Response(
            status_code=response.status,
            headers=[(name.encode("ascii"), value.encode("latin-1")) for name, value in headers],
        )
        data = self._conn.send(head) or b""
        if body:
            data += self._conn.send(h11.Data(data=body)) or b""
        data += self._conn.send(h11.EndOfMessage()) or b""
        return await self._send(data)

    async def _send_refusal(self, refusal: HttpRequestError) -> None:
        """Answer with the refusal's status and close, if a response can still be sent."""
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = error_response(refusal.status, refusal.reason)
        headers, body = response_wire_form(response, "GET")
        head = h11.Response(
            status_code=refusal.status,
            headers=[(k.encode("ascii"), v.encode("latin-1")) for k, v in headers]
            + [(b"connection", b"close")],
        )
        try:
            data = (self._conn.send(head) or b"") + (self._conn.send(h11.Data(data=body)) or b"")
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            log.debug("http.refusal_not_sendable", error=str(exc))
            return
        await self._send(data)

    async def _finish(self, linger: bool) -> None:
        """Half-close; after a refusal, read (and drop) what the client still sends for a
        moment so that closing with unread data does not reset the answer away."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await self._stream.send_eof()
            if linger:
                drained = 0
                with trio.move_on_after(_LINGER_TIME), contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    while drained < _LINGER_BYTES:
                        data = await self._stream.receive_some(READ_SIZE)
                        if not data:
                            break
                        drained += len(data)
