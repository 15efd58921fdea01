"""HBONE: HTTP/2 CONNECT over mutual TLS, the tunnel between ztunnels and waypoints.

Sans-IO rules: ``protocol`` (CONNECT requests), ``request_headers`` (RFC 9113 header blocks,
also the waypoint's HTTP/2), ``goaway`` (graceful drain around h2), ``errors`` (one hierarchy
with status hints), ``limits`` (what one peer may cost us). Trio drivers: ``session`` (one h2
connection, composed by its owners), ``stream`` (one HTTP/2 stream as a trio stream),
``client``/``server`` (the two HBONE ends), ``splice`` (a tunnel piped to a socket), ``pool``
(client connections by peer). Everything public but the pool is re-exported here.
"""

from ambient_dataplane.hbone.client import (
    HboneClient,
    connect,
    connect_tls,
    open_hbone_client,
)
from ambient_dataplane.hbone.errors import (
    HboneConnectError,
    HboneError,
    HboneProtocolError,
    HboneRejection,
    MalformedHeaders,
)
from ambient_dataplane.hbone.limits import DEFAULT_LIMITS, ConnectionLimits
from ambient_dataplane.hbone.protocol import (
    CONNECTION_WINDOW,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    REASON_HEADER,
    STREAM_WINDOW,
    ConnectRequest,
    connect_headers,
    format_authority,
    new_traceparent,
    parse_authority,
    parse_baggage,
    parse_connect,
)
from ambient_dataplane.hbone.request_headers import RequestHeaderBlock, validate_request_headers
from ambient_dataplane.hbone.server import (
    ConnectHandler,
    ConnectionInfo,
    HboneResponder,
    accept_tls,
    serve_hbone,
    serve_hbone_tls,
)
from ambient_dataplane.hbone.splice import SpliceError, SpliceResult, splice
from ambient_dataplane.hbone.stream import HboneStream

__all__ = [
    "CONNECTION_WINDOW",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_CONCURRENT_STREAMS",
    "MAX_FRAME_SIZE",
    "REASON_HEADER",
    "STREAM_WINDOW",
    "ConnectHandler",
    "ConnectRequest",
    "ConnectionInfo",
    "ConnectionLimits",
    "HboneClient",
    "HboneConnectError",
    "HboneError",
    "HboneProtocolError",
    "HboneRejection",
    "HboneResponder",
    "HboneStream",
    "MalformedHeaders",
    "RequestHeaderBlock",
    "SpliceError",
    "SpliceResult",
    "accept_tls",
    "connect",
    "connect_headers",
    "connect_tls",
    "format_authority",
    "new_traceparent",
    "open_hbone_client",
    "parse_authority",
    "parse_baggage",
    "parse_connect",
    "serve_hbone",
    "serve_hbone_tls",
    "splice",
    "validate_request_headers",
]
