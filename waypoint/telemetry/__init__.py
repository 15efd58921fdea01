"""What a waypoint reports about each HTTP request: Istio's ``istio_request*`` series
(``metrics``), W3C trace context (``trace_context``: propagated always) with a SERVER span
exported over OTLP/HTTP when configured (``tracing``), and one access-log line
(``access_log``).

The labels, the trace-context parsing and the span contents are pure functions; the only
stateful pieces are the Prometheus registry and the OpenTelemetry batch processor.
"""

from waypoint.telemetry.access_log import access_log
from waypoint.telemetry.metrics import (
    ENVOY_DEFAULT_BUCKETS,
    REPORTER,
    REQUEST_LABEL_NAMES,
    RequestLabeler,
    RequestLabels,
    RequestProtocol,
    WaypointMetrics,
    request_labels,
)
from waypoint.telemetry.trace_context import (
    TraceContext,
    child_context,
    format_traceparent,
    incoming_context,
    parse_traceparent,
    parse_tracestate,
)
from waypoint.telemetry.tracing import (
    RequestSpan,
    Tracer,
    otlp_traces_url,
    span_attributes,
    span_name,
)

__all__ = [
    "ENVOY_DEFAULT_BUCKETS",
    "REPORTER",
    "REQUEST_LABEL_NAMES",
    "RequestLabeler",
    "RequestLabels",
    "RequestProtocol",
    "RequestSpan",
    "TraceContext",
    "Tracer",
    "WaypointMetrics",
    "access_log",
    "child_context",
    "format_traceparent",
    "incoming_context",
    "otlp_traces_url",
    "parse_traceparent",
    "parse_tracestate",
    "request_labels",
    "span_attributes",
    "span_name",
]
