"""HBONE: HTTP/2 CONNECT over mutual TLS, the tunnel between ztunnels and waypoints.

``protocol`` holds the sans-IO rules; ``server``/``client`` are thin Trio drivers over h2;
``splice`` pipes a tunnel to a socket. Everything public is re-exported here.
"""

from ambient_dataplane.hbone.client import (
    HboneClient,
    HboneConnectError,
    connect,
    connect_tls,
    open_hbone_client,
)
from ambient_dataplane.hbone.protocol import (
    CONNECTION_WINDOW,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    REASON_HEADER,
    STREAM_WINDOW,
    ConnectRequest,
    HboneRejection,
    connect_headers,
    format_authority,
    new_traceparent,
    parse_authority,
    parse_baggage,
    parse_connect,
)
from ambient_dataplane.hbone.server import (
    ConnectHandler,
    ConnectionInfo,
    HboneResponder,
    accept_tls,
    serve_hbone,
    serve_hbone_tls,
)
from ambient_dataplane.hbone.session import HboneStream
from ambient_dataplane.hbone.splice import SpliceError, SpliceResult, splice

__all__ = [
    "CONNECTION_WINDOW",
    "DEFAULT_MAX_CONCURRENT_STREAMS",
    "MAX_FRAME_SIZE",
    "REASON_HEADER",
    "STREAM_WINDOW",
    "ConnectHandler",
    "ConnectRequest",
    "ConnectionInfo",
    "HboneClient",
    "HboneConnectError",
    "HboneRejection",
    "HboneResponder",
    "HboneStream",
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
]
