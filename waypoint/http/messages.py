"""The waypoint's HTTP messages: a buffered request and response, and the rules both servers
apply to them (what the handler sees of a request's headers, its declared body length, how a
response is framed on the wire, a handler's failure as a 500).

Requests are buffered whole (up to ``HttpLimits``) before the handler sees them, so retries
and mirrors can replay the body; the servers re-frame every message they send.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from ambient_dataplane.hbone.protocol import reason_phrase
from waypoint.http.headers import (
    HeaderInput,
    Headers,
    header_values,
    joined_header,
    modify_headers,
    sendable_headers,
    strip_hop_by_hop,
)

log = structlog.get_logger()

HttpVersion = Literal["1.0", "1.1", "2"]
# Both servers read this much at a time and give a closing connection this long to finish.
READ_SIZE = 64 * 1024
CLOSE_TIMEOUT = 1.0


@dataclass(frozen=True)
class HttpLimits:
    """Bounds per connection: request head size, buffered body size, and how long we wait.

    ``header_timeout`` is Envoy's request_headers_timeout, which Envoy (and Istio's waypoint)
    leave disabled: a server holding partial heads forever is a slowloris target, so ours is
    10 s. ``idle_timeout`` (Envoy's idle_timeout, 1 h there) is 5 min here.
    """

    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 10 * 1024 * 1024
    idle_timeout: float = 300.0  # no request in progress (and per read/write once one is)
    header_timeout: float = 10.0  # from a request's first byte to the end of its head


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
    text = message or reason_phrase(status)
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


def handler_headers(raw: Iterable[tuple[str, str]]) -> Headers:
    """What a handler sees of received headers: no hop-by-hop, framing, Host or answered
    ``expect: 100-continue``."""
    return tuple(
        (name, value) for name, value in strip_hop_by_hop(raw)
        if name not in ("host", "content-length")
        and not (name == "expect" and value.strip().lower() == "100-continue")
    )


def declared_content_length(values: Sequence[str]) -> int | None:
    """The body length a request's Content-Length values declare (repeats must agree); None
    without one. Raises HttpRequestError(400)."""
    distinct = {value.strip() for value in values}
    if not distinct:
        return None
    if len(distinct) > 1:
        raise HttpRequestError(400, "conflicting content-length headers")
    text = distinct.pop()
    if not text.isdigit():
        raise HttpRequestError(400, f"invalid content-length {text!r}")
    return int(text)


async def call_handler(handler: HttpHandler, request: HttpRequest) -> HttpResponse:
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
