"""HTTP inside an HBONE tunnel: the waypoint's request/response model and its server.

Requests are buffered whole (up to ``HttpLimits``) before the handler sees them, so retries
and mirrors can replay the body. The sans-IO parts (sniffing, header hygiene, HTTP/2 header
validation, response framing) are plain functions; ``serve_http`` is the Trio driver:
HTTP/1.1 via h11 (keep-alive, pipelining, 100-continue) or HTTP/2 via h2 when the client
opens with the prior-knowledge preface. The HTTP/2 side reuses the HBONE library's h2 session
(one writer task, flow-controlled streams), so it inherits its windows and frame sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

import h2.errors
import h2.events
import h2.exceptions
import h11
import structlog
import trio

from ambient_dataplane.hbone.session import H2Session, HboneStream

log = structlog.get_logger()

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

HttpVersion = Literal["1.0", "1.1", "2"]
Headers = tuple[tuple[str, str], ...]
HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]]
HeaderSource = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]
"""Headers to read: a mapping (one value per name) or (name, value) pairs as h11/h2 give them
(``str`` or latin-1 ``bytes``); names compare case-insensitively."""

# RFC 9110 7.6.1: meaningful for one hop only; a proxy re-frames each side itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade"}
)
_READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 1.0
_LINGER_TIME = 1.0
_LINGER_BYTES = 4 * 1024 * 1024
_MAX_H2_STREAMS = 100
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_MAX_METHOD = 20
_MAX_SNIFFED_TARGET = 64 * 1024
_H2_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path"})


# ---------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class HttpLimits:
    """Bounds per connection: request head size, buffered body size, and how long we wait."""

    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 10 * 1024 * 1024
    idle_timeout: float = 300.0  # no request in progress (and per read/write once one is)
    header_timeout: float = 30.0  # from a request's first byte to the end of its head


@dataclass(frozen=True)
class HttpRequest:
    """One buffered request. ``headers`` have lower-case names and exclude the Host header
    (that is ``authority``), hop-by-hop headers and framing (content-length): the server
    re-frames every message it sends."""

    method: str
    target: str  # path + optional ?query, as received (origin-form, or "*")
    headers: Headers
    body: bytes
    authority: str
    http_version: HttpVersion = "1.1"
    scheme: str = "http"

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> list[tuple[str, str]]:
        """Query parameters in order, percent-decoded (``+`` as space, as forms send it)."""
        return urllib.parse.parse_qsl(self.target.partition("?")[2], keep_blank_values=True)

    def header(self, name: str) -> str | None:
        """The header's value, repeated ones joined with ", "; None when absent."""
        return joined_header(self.headers, name)

    def header_values(self, name: str) -> list[str]:
        return header_values(self.headers, name)

    def with_headers(
        self, *, set: HeaderInput = (), add: HeaderInput = (), remove: Iterable[str] = ()
    ) -> HttpRequest:
        """A copy with headers replaced (``set``), appended (``add``) or dropped (``remove``),
        in Gateway API HeaderModifier order: set, add, remove."""
        return dataclasses.replace(
            self, headers=modify_headers(self.headers, set=set, add=add, remove=remove)
        )

    def replace(self, **changes: object) -> HttpRequest:
        """dataclasses.replace: e.g. ``request.replace(target="/v2", authority="b")``."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class HttpResponse:
    """One buffered response; ``response_flags`` is Envoy's flag for telemetry ("-": none)."""

    status: int
    headers: Headers = ()
    body: bytes = b""
    response_flags: str = "-"

    def header(self, name: str) -> str | None:
        return joined_header(self.headers, name)

    def header_values(self, name: str) -> list[str]:
        return header_values(self.headers, name)

    def with_headers(
        self, *, set: HeaderInput = (), add: HeaderInput = (), remove: Iterable[str] = ()
    ) -> HttpResponse:
        return dataclasses.replace(
            self, headers=modify_headers(self.headers, set=set, add=add, remove=remove)
        )

    def replace(self, **changes: object) -> HttpResponse:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def error_response(status: int, message: str = "", flags: str = "-") -> HttpResponse:
    """A small text/plain answer the waypoint generates itself (no upstream involved)."""
    text = message or _phrase(status)
    return HttpResponse(
        status=status,
        headers=(("content-type", "text/plain; charset=utf-8"),),
        body=text.encode("utf-8", "replace") + b"\n",
        response_flags=flags,
    )


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class HttpRequestError(Exception):
    """A request the server answers itself with ``status`` (400, 408, 413, 431, ...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Header helpers (sans-IO)


def joined_header(headers: HeaderSource, name: str) -> str | None:
    values = header_values(headers, name)
    return ", ".join(values) if values else None


def header_values(headers: HeaderSource, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), in order."""
    wanted = name.lower()
    pairs: Iterable[tuple[str | bytes, str | bytes]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    values: list[str] = []
    for raw_name, raw_value in pairs:
        header_name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name
        if header_name.lower() == wanted:
            values.append(
                raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
            )
    return values


def _pairs(headers: HeaderInput) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name.lower(), value) for name, value in items]


def modify_headers(
    headers: Iterable[tuple[str, str]],
    *,
    set: HeaderInput = (),
    add: HeaderInput = (),
    remove: Iterable[str] = (),
) -> Headers:
    """set (replace every occurrence, at the first one's place), add (append), remove."""
    result = list(headers)
    for name, value in _pairs(set):
        index = next((i for i, (key, _) in enumerate(result) if key == name), None)
        result = [(key, val) for key, val in result if key != name]
        result.insert(len(result) if index is None else index, (name, value))
    result.extend(_pairs(add))
    dropped = frozenset(name.lower() for name in remove)
    return tuple((key, value) for key, value in result if key not in dropped)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop headers, including any the Connection header names."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for key, value in pairs if key.lower() == "connection"
        for token in value.split(",") if token.strip()
    }
    dropped = HOP_BY_HOP | named
    return tuple((key, value) for key, value in pairs if key.lower() not in dropped)


def sendable_headers(headers: Iterable[tuple[str, str]]) -> tuple[Headers, list[str]]:
    """(headers that can go on the wire, names of those dropped): names are lower-cased and
    must be tokens, values latin-1 without control characters, trimmed (the h2 rule)."""
    kept: list[tuple[str, str]] = []
    dropped: list[str] = []
    for raw_name, value in headers:
        name = raw_name.lower()
        value = value.strip(" \t")
        if not _TOKEN.match(name) or _BAD_VALUE_CHARS.search(value) or not _latin1(value):
            dropped.append(name)
        else:
            kept.append((name, value))
    return tuple(kept), dropped


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def response_wire_form(response: HttpResponse, request_method: str) -> tuple[Headers, bytes]:
    """The headers and body to send for ``response`` (without :status / the status line).

    Hop-by-hop headers go, Content-Length is recomputed from the body, and no body is sent
    for HEAD, 1xx, 204 and 304 (HEAD and 304 keep a Content-Length the handler gave, which
    describes the body a GET would have had).
    """
    status = response.status
    given_length = response.header("content-length")
    headers, dropped = sendable_headers(
        (name, value) for name, value in strip_hop_by_hop(response.headers)
        if name.lower() != "content-length"
    )
    if dropped:
        log.warning("http.response_headers_dropped", names=dropped, status=status)
    body = response.body
    if status < 200 or status == 204:
        return headers, b""
    if request_method == "HEAD" or status == 304:
        if given_length is not None and given_length.strip().isdigit():
            headers += (("content-length", given_length.strip()),)
        elif request_method == "HEAD":
            headers += (("content-length", str(len(body))),)
        return headers, b""
    return headers + (("content-length", str(len(body))),), body


def _request_headers(raw: Iterable[tuple[str, str]]) -> Headers:
    """What a handler sees of received headers: no hop-by-hop, framing, Host or answered
    ``expect: 100-continue``."""
    return tuple(
        (name, value) for name, value in strip_hop_by_hop(raw)
        if name not in ("host", "content-length")
        and not (name == "expect" and value.strip().lower() == "100-continue")
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


# ---------------------------------------------------------------------------------------------
# Sniffing (sans-IO)


def looks_like_http(prefix: bytes) -> bool | None:
    """True: an HTTP/1.x request line or the HTTP/2 preface; False: certainly not;
    None: a prefix of either, more bytes needed."""
    if prefix.startswith(H2_PREFACE):
        return True
    if not prefix or H2_PREFACE.startswith(prefix):
        return None
    method_end = 0
    while method_end < len(prefix) and prefix[method_end] in _METHOD_CHARS:
        method_end += 1
    if method_end == 0 or method_end > _MAX_METHOD:
        return False
    if method_end == len(prefix):
        return None
    if prefix[method_end] != 0x20:
        return False
    target_start = method_end + 1
    target_end = target_start
    while target_end < len(prefix) and 0x21 <= prefix[target_end] <= 0x7E:
        target_end += 1
    if target_end - target_start > _MAX_SNIFFED_TARGET:
        return False
    if target_end == len(prefix):
        return None
    if target_end == target_start or prefix[target_end] != 0x20:
        return False
    rest = prefix[target_end + 1:]
    for ending in (b"HTTP/1.0\r\n", b"HTTP/1.1\r\n", b"HTTP/1.0\n", b"HTTP/1.1\n"):
        if rest.startswith(ending):
            return True
        if ending.startswith(rest):
            return None
    return False


# ---------------------------------------------------------------------------------------------
# HTTP/2 request heads (sans-IO)


def request_from_h2_headers(raw: Sequence[tuple[bytes, bytes]]) -> tuple[HttpRequest, int | None]:
    """Validate an HTTP/2 request header block (RFC 9113 8.3) -> (request without body,
    declared content-length). Raises HttpRequestError(400) naming what is wrong."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in raw:
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise HttpRequestError(400, "header name is not ASCII") from None
        value = raw_value.decode("latin-1")
        if not name:
            raise HttpRequestError(400, "empty header name")
        if name.startswith(":"):
            if regular:
                raise HttpRequestError(400, f"pseudo-header {name} after regular headers")
            if name not in _H2_PSEUDO:
                raise HttpRequestError(400, f"unknown request pseudo-header {name}")
            if name in pseudo:
                raise HttpRequestError(400, f"duplicate pseudo-header {name}")
            pseudo[name] = value
            continue
        if not _TOKEN.match(name):
            raise HttpRequestError(400, f"header name {name!r} is not a lower-case token")
        if _BAD_VALUE_CHARS.search(value):
            raise HttpRequestError(400, f"header {name!r} has a control character")
        if name in HOP_BY_HOP and not (name == "te" and value.strip() == "trailers"):
            raise HttpRequestError(400, f"connection-specific header {name!r} in HTTP/2")
        regular.append((name, value.strip(" \t")))

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
    declared = _content_length(header_values(regular, "content-length"))
    cookies = header_values(regular, "cookie")
    if len(cookies) > 1:  # RFC 9113 8.2.3: crumbs are rejoined with "; " for HTTP/1.1
        regular = [(k, v) for k, v in regular if k != "cookie"] + [("cookie", "; ".join(cookies))]
    request = HttpRequest(
        method=method, target=target, headers=_request_headers(regular), body=b"",
        authority=authority, http_version="2", scheme=scheme,
    )
    return request, declared


def _content_length(values: Sequence[str]) -> int | None:
    distinct = {value.strip() for value in values}
    if not distinct:
        return None
    if len(distinct) > 1:
        raise HttpRequestError(400, "conflicting content-length headers")
    text = distinct.pop()
    if not text.isdigit():
        raise HttpRequestError(400, f"invalid content-length {text!r}")
    return int(text)


def _head_size(method: str, target: str, headers: Iterable[tuple[str, str]]) -> int:
    """Bytes of a request head as HTTP/1.1 would write it (also used to bound HTTP/2)."""
    return len(method) + len(target) + 12 + sum(len(k) + len(v) + 4 for k, v in headers)


# ---------------------------------------------------------------------------------------------
# The server


async def serve_http(
    stream: trio.abc.HalfCloseableStream,
    handler: HttpHandler,
    limits: HttpLimits = HttpLimits(),  # noqa: B008 - frozen, so sharing it is safe
    *,
    initial_bytes: bytes = b"",
) -> None:
    """Serve HTTP on ``stream`` until the client is done; the stream is closed on return.

    ``initial_bytes`` are bytes already read from ``stream`` (while sniffing), handled as if
    they arrived first. Never raises for anything the client does; handler exceptions become
    500 answers. Cancellation ends the connection (HTTP/2 peers get a GOAWAY).
    """
    try:
        prefix = await _read_preface_window(stream, initial_bytes, limits)
        if prefix is None:
            return
        if prefix.startswith(H2_PREFACE):
            await _serve_h2(_PrefixedStream(stream, prefix), handler, limits)
        else:
            await _Http1Server(stream, handler, limits, prefix).run()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("http.connection_broken", error=str(exc) or type(exc).__name__)
    except Exception:
        # Only a bug gets here; it must cost this connection, never the waypoint.
        log.exception("http.connection_failed")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await stream.aclose()


async def _read_preface_window(
    stream: trio.abc.ReceiveStream, initial: bytes, limits: HttpLimits
) -> bytes | None:
    """Read until the bytes either are the h2 preface or cannot become it; None on a
    client that leaves (or idles out) before sending anything."""
    buffer = initial
    while len(buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(buffer):
        timeout = limits.header_timeout if buffer else limits.idle_timeout
        with trio.move_on_after(timeout):
            data = bytes(await stream.receive_some(_READ_SIZE))
            if not data:
                return buffer or None
            buffer += data
            continue
        return None
    return buffer


class _PrefixedStream(trio.abc.HalfCloseableStream):
    """``stream`` with bytes already read from it put back in front."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _call_handler(handler: HttpHandler, request: HttpRequest) -> HttpResponse:
    """The handler's answer; its bugs become a logged 500 for this request only."""
    try:
        response = await handler(request)
    except Exception:
        log.exception("http.handler_failed", method=request.method, path=request.path,
                      authority=request.authority)
        return error_response(500, "internal error")
    if not 200 <= response.status <= 999:
        log.warning("http.handler_bad_status", status=response.status, path=request.path)
        return error_response(502, f"invalid response status {response.status}")
    return response


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
                response = await _call_handler(self._handler, request)
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
            self._conn.receive_data(bytes(await self._stream.receive_some(_READ_SIZE)))
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
        declared = _content_length(header_values(raw_headers, "content-length"))
        if declared is not None and declared > self._limits.max_body_bytes:
            raise HttpRequestError(413, f"request body of {declared} bytes exceeds "
                                   f"{self._limits.max_body_bytes}")
        body = await self._read_body()
        return HttpRequest(
            method=method, target=target, headers=_request_headers(raw_headers), body=body,
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
            with trio.move_on_after(_CLOSE_TIMEOUT), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await self._stream.send_eof()
            if linger:
                drained = 0
                with trio.move_on_after(_LINGER_TIME), contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    while drained < _LINGER_BYTES:
                        data = await self._stream.receive_some(_READ_SIZE)
                        if not data:
                            break
                        drained += len(data)


# ---------------------------------------------------------------------------------------------
# HTTP/2


class _Http2Session(H2Session):
    """The HBONE h2 session as an HTTP/2 server: each request stream an HboneStream (so
    bodies are flow-controlled both ways) served by its own task."""

    def __init__(
        self, transport: trio.abc.HalfCloseableStream, handler: HttpHandler, limits: HttpLimits,
        nursery: trio.Nursery,
    ) -> None:
        super().__init__(transport, client_side=False, max_concurrent_streams=_MAX_H2_STREAMS)
        # HPACK refuses (connection error) only far beyond our limit; between the two the
        # request gets a 431 on its own stream.
        self.conn.decoder.max_header_list_size = max(2 * limits.max_header_bytes, 65536)
        self._handler = handler
        self._limits = limits
        self._nursery = nursery
        self._transport = transport

    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            stream = HboneStream(self, event.stream_id)
            self.streams[event.stream_id] = stream
            self.last_used = trio.current_time()
            headers = [(bytes(name), bytes(value)) for name, value in event.headers or ()]
            # A HEADERS frame with END_STREAM also yields StreamEnded, handled by the base.
            self._nursery.start_soon(self._serve_stream, stream, headers)
        else:
            super().handle_event(event)

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
                response = await _call_handler(self._handler, request)
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
                data = await stream.receive_some(_READ_SIZE)
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
            self.conn.send_headers(stream.stream_id, block)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise trio.BrokenResourceError(f"cannot answer stream: {exc}") from None
        with trio.move_on_after(self._limits.idle_timeout) as scope:
            if body:
                await stream.send_all(body)
            await stream.send_eof()
        if scope.cancelled_caught:
            log.info("http.write_timeout", stream=stream.stream_id)

    async def close(self, error_code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """GOAWAY, then half-close the tunnel before closing it (a clean end for HBONE)."""
        if not self.is_closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code=error_code)
            await self.flush_quietly()
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT), \
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                        trio.BusyResourceError):
                await self._transport.send_eof()
            self.mark_closed("closed locally")
        await super().close(error_code)


async def _serve_h2(
    transport: trio.abc.HalfCloseableStream, handler: HttpHandler, limits: HttpLimits
) -> None:
    """Run the session until the peer leaves or the connection idles out; on our way out
    (idle, cancellation) the still-running writer sends GOAWAY first."""
    async with trio.open_nursery() as nursery:
        session = _Http2Session(transport, handler, limits, nursery)
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
                await session.close()
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


__all__ = [
    "H2_PREFACE",
    "HOP_BY_HOP",
    "HttpHandler",
    "HttpLimits",
    "HttpRequest",
    "HttpRequestError",
    "HttpResponse",
    "HeaderSource",
    "HttpVersion",
    "error_response",
    "header_values",
    "joined_header",
    "looks_like_http",
    "modify_headers",
    "request_from_h2_headers",
    "response_wire_form",
    "sendable_headers",
    "serve_http",
    "strip_hop_by_hop",
]
