"""HTTP inside an HBONE tunnel: the waypoint's request/response model, its server, and the
HTTP/1.1 client codec for upstreams.

- ``messages``: HttpRequest, HttpResponse, HttpLimits, and the rules both servers apply to
  them; ``headers``: header lists (reading, editing, hop-by-hop, what may be sent).
- ``sniff``: is it HTTP at all (HTTP/1.x request line or the HTTP/2 preface)?
- ``server``: ``serve_http``, which hands a connection to ``server_h1`` (h11: keep-alive,
  pipelining, 100-continue) or ``server_h2`` (h2 prior knowledge, on the HBONE library's h2
  session).
- ``client_h1``: the sans-IO HTTP/1.1 codec for the upstream side.

The model and server API is exported here; the upstream codec is imported from its module.
"""

from waypoint.http.headers import (
    HOP_BY_HOP,
    HeaderInput,
    Headers,
    HeaderSource,
    header_values,
    joined_header,
    modify_headers,
    sendable_headers,
    strip_hop_by_hop,
)
from waypoint.http.messages import (
    HttpHandler,
    HttpLimits,
    HttpRequest,
    HttpRequestError,
    HttpResponse,
    HttpVersion,
    error_response,
    response_wire_form,
)
from waypoint.http.server import serve_http
from waypoint.http.server_h2 import request_from_h2_headers
from waypoint.http.sniff import H2_PREFACE, looks_like_http

__all__ = [
    "H2_PREFACE",
    "HOP_BY_HOP",
    "HeaderInput",
    "HeaderSource",
    "Headers",
    "HttpHandler",
    "HttpLimits",
    "HttpRequest",
    "HttpRequestError",
    "HttpResponse",
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
