"""What a waypoint reports about each HTTP request: Istio's ``istio_request*`` series, W3C trace
context (propagated always, a SERVER span exported over OTLP/HTTP when configured) and one
access-log line.

The labels, the trace-context parsing and the span contents are pure functions; the only stateful
pieces are the Prometheus registry and the OpenTelemetry batch processor (its own thread), and the
OpenTelemetry SDK is used nowhere else in the waypoint.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

import structlog
import trio
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from prometheus_client import CollectorRegistry, Counter, Histogram

from ambient_api.identity import SpiffeId
from ambient_api.model import Service, Workload
from ambient_common.metrics import CONTENT_TYPE, LabelledSeries, render_registry
from ambient_dataplane.labels import UNKNOWN, connection_labels

# Shared with ztunnel rather than copied; a candidate for ambient_common (see module report).

__all__ = [
    "CONTENT_TYPE",
    "ENVOY_DEFAULT_BUCKETS",
    "REPORTER",
    "REQUEST_LABEL_NAMES",
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

# Istio >= 1.23 labels what a waypoint observes with its own reporter value; Kiali and the
# dashboards query reporter=~"destination|waypoint".
REPORTER = "waypoint"

# Istio's istio_request* histograms use Envoy's default bucket bounds (Envoy
# HistogramSettingsImpl::defaultBuckets) for durations in ms and for sizes in bytes alike.
ENVOY_DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
    60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip

RequestProtocol = Literal["http", "grpc"]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLabels:
    """Istio's HTTP metric labels; field order is the label order (as Istio's proxies emit)."""

    reporter: str = REPORTER
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "http"
    response_code: str = "0"
    grpc_response_status: str = ""
    response_flags: str = "-"
    connection_security_policy: str = "mutual_tls"

    def values(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


REQUEST_LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestLabels))


def request_labels(
    source: Workload | None,
    source_identity: SpiffeId | None,
    destination: Workload | None,
    destination_service: Service | None,
    *,
    status: int,
    response_flags: str = "-",
    protocol: RequestProtocol = "http",
    grpc_status: int | None = None,
) -> RequestLabels:
    """Labels of one request as the waypoint saw it.

    ``source_identity`` is the HBONE peer's SPIFFE id (the waypoint only accepts mTLS, so the
    connection is always ``mutual_tls``); ``destination`` is the endpoint the request went to,
    None when none was chosen (denied, no route, no healthy endpoint). ``status`` 0 means no
    response was sent (the downstream went away), as Envoy reports it. The workload and service
    fields are the ones ztunnel reports for the same peers, so the L4 and L7 series join.
    """
    if not 0 <= status <= 599 or 0 < status < 100:
        raise ValueError(f"response status must be 0 (no response) or 100..599, not {status}")
    if protocol not in ("http", "grpc"):
        raise ValueError(f"request protocol must be 'http' or 'grpc', not {protocol!r}")
    if grpc_status is not None and not 0 <= grpc_status <= 16:
        raise ValueError(f"gRPC status must be 0..16, not {grpc_status}")
    # The L4 builder knows how Istio names workloads, services and principals; only its reporter
    # differs, and it admits only the L4 ones.
    l4 = connection_labels(
        "destination",
        source,
        source_identity,
        destination,
        destination_service,
        mtls=True,
        response_flags=response_flags,
    )
    return RequestLabels(
        reporter=REPORTER,
        source_workload=l4.source_workload,
        source_canonical_service=l4.source_canonical_service,
        source_canonical_revision=l4.source_canonical_revision,
        source_workload_namespace=l4.source_workload_namespace,
        source_principal=l4.source_principal,
        source_app=l4.source_app,
        source_version=l4.source_version,
        source_cluster=l4.source_cluster,
        destination_workload=l4.destination_workload,
        destination_workload_namespace=l4.destination_workload_namespace,
        destination_principal=l4.destination_principal,
        destination_app=l4.destination_canonical_service,
        destination_version=l4.destination_canonical_revision,
        destination_service=l4.destination_service,
        destination_service_name=l4.destination_service_name,
        destination_service_namespace=l4.destination_service_namespace,
        destination_canonical_service=l4.destination_canonical_service,
        destination_canonical_revision=l4.destination_canonical_revision,
        destination_cluster=l4.destination_cluster,
        request_protocol=protocol,
        response_code=str(status),
        grpc_response_status="" if grpc_status is None else str(grpc_status),
        response_flags=l4.response_flags,
        connection_security_policy=l4.connection_security_policy,
    )


class RequestLabeler:
    """``request_labels`` for the requests of one caller (one tunnel), remembering the last
    answer: the requests of a keep-alive connection mostly reach the same endpoint with the
    same outcome, and comparing (identical objects first) costs less than building the
    labels anew."""

    def __init__(self, source: Workload | None, source_identity: SpiffeId | None) -> None:
        self._source = source
        self._source_identity = source_identity
        self._last: tuple[tuple[object, ...], RequestLabels] | None = None

    def labels(
        self,
        destination: Workload | None,
        destination_service: Service | None,
        *,
        status: int,
        response_flags: str = "-",
        protocol: RequestProtocol = "http",
    ) -> RequestLabels:
        key = (destination, destination_service, status, response_flags, protocol)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        labels = request_labels(
            self._source, self._source_identity, destination, destination_service,
            status=status, response_flags=response_flags, protocol=protocol,
        )
        self._last = (key, labels)
        return labels


class _RequestSeries(NamedTuple):
    requests: Counter
    duration: Histogram
    request_bytes: Histogram
    response_bytes: Histogram


class WaypointMetrics:
    """The ``istio_request*`` series of one waypoint (a registry each, as ztunnel's)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        buckets: tuple[float, ...] = ENVOY_DEFAULT_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # prometheus_client appends "_total" to counter names on exposition.
        self.requests = Counter(
            "istio_requests",
            "Total number of requests handled by the waypoint",
            REQUEST_LABEL_NAMES,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "istio_request_duration_milliseconds",
            "Duration of requests in milliseconds",
            REQUEST_LABEL_NAMES,
            registry=self.registry,
            buckets=buckets,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Size of request bodies in bytes",
            REQUEST_LABEL_NAMES,
            registry=self.registry,
            buckets=buckets,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Size of response bodies in bytes",
            REQUEST_LABEL_NAMES,
            registry=self.registry,
            buckets=buckets,
        )
        # Each label set's four series, looked up once: prometheus_client's labels() call
        # validates and locks every time, and a waypoint sees few distinct label sets.
        self._series: LabelledSeries[RequestLabels, _RequestSeries] = LabelledSeries(
            lambda values: _RequestSeries(
                self.requests.labels(*values), self.request_duration.labels(*values),
                self.request_bytes.labels(*values), self.response_bytes.labels(*values)))

    def record(
        self, labels: RequestLabels, duration_ms: float, request_bytes: int, response_bytes: int
    ) -> None:
        """Count one finished request (or one refused: a 403/429/503 is a request too)."""
        if not math.isfinite(duration_ms) or duration_ms < 0:
            raise ValueError(f"duration must be a finite number >= 0 ms, not {duration_ms}")
        if request_bytes < 0 or response_bytes < 0:
            raise ValueError(
                f"byte counts cannot be negative (request={request_bytes}, "
                f"response={response_bytes})"
            )
        series = self._series.of(labels)
        series.requests.inc()
        series.duration.observe(duration_ms)
        series.request_bytes.observe(request_bytes)
        series.response_bytes.observe(response_bytes)

    def render(self) -> bytes:
        """The Prometheus text exposition for ``/metrics`` (content type ``CONTENT_TYPE``)."""
        return render_registry(self.registry)


# --------------------------------------------------------------------------------------------
# W3C trace context (https://www.w3.org/TR/trace-context/)
# --------------------------------------------------------------------------------------------

_HEX2 = re.compile(r"[0-9a-f]{2}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
_FLAG_SAMPLED = 0x01
# tracestate: at most 32 list members, keys are simple or tenant@system, values printable ASCII
# without ',' and '=' and not ending in a space.
_TRACESTATE_MAX_MEMBERS = 32
_TRACESTATE_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
_TRACESTATE_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_OWS = " \t"


@dataclass(frozen=True)
class TraceContext:
    """One span's identity as W3C propagates it. ``tracestate`` is carried, never interpreted."""

    trace_id: str
    span_id: str
    sampled: bool = True
    tracestate: str = ""

    def __post_init__(self) -> None:
        if not _TRACE_ID.fullmatch(self.trace_id) or self.trace_id == _ZERO_TRACE_ID:
            raise ValueError(
                f"trace id must be 32 lowercase hex digits, not all zero: {self.trace_id!r}"
            )
        if not _SPAN_ID.fullmatch(self.span_id) or self.span_id == _ZERO_SPAN_ID:
            raise ValueError(
                f"span id must be 16 lowercase hex digits, not all zero: {self.span_id!r}"
            )


class RandomBits(Protocol):
    """What ``child_context`` needs from a random source (``random.Random`` has it)."""

    def getrandbits(self, k: int, /) -> int: ...


def parse_traceparent(value: str) -> TraceContext | None:
    """The context in a ``traceparent`` header, or None when the header is not valid W3C.

    Version 00 must be exactly ``00-<32 hex>-<16 hex>-<2 hex>`` in lowercase with non-zero ids.
    A later version (not ``ff``) is read by its version-00 prefix, as the spec asks, provided
    anything after it is separated by ``-``. The result's ``span_id`` is the caller's span.
    """
    value = value.strip(_OWS)
    if len(value) < 55:
        return None
    version = value[0:2]
    if not _HEX2.fullmatch(version) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not _TRACE_ID.fullmatch(trace_id) or trace_id == _ZERO_TRACE_ID:
        return None
    if not _SPAN_ID.fullmatch(parent_id) or parent_id == _ZERO_SPAN_ID:
        return None
    if not _HEX2.fullmatch(flags):
        return None
    return TraceContext(trace_id, parent_id, sampled=bool(int(flags, 16) & _FLAG_SAMPLED))


def parse_tracestate(value: str | None) -> str:
    """``value`` unchanged if it is a well-formed ``tracestate`` list, else "" (dropped).

    The check is of shape only (member count, key and value syntax): vendors' entries are
    forwarded untouched, never reordered or rewritten.
    """
    if not value or not value.strip(_OWS):
        return ""
    members = [m.strip(_OWS) for m in value.split(",")]
    present = [m for m in members if m]
    if len(present) > _TRACESTATE_MAX_MEMBERS:
        return ""
    keys: set[str] = set()
    for member in present:
        key, sep, member_value = member.partition("=")
        if not sep or not _TRACESTATE_KEY.fullmatch(key) or key in keys:
            return ""
        if not _TRACESTATE_VALUE.fullmatch(member_value):
            return ""
        keys.add(key)
    return value


def incoming_context(traceparent: str | None, tracestate: str | None) -> TraceContext | None:
    """The caller's context from both headers; tracestate is ignored without a valid parent,
    as the spec requires."""
    if traceparent is None:
        return None
    parent = parse_traceparent(traceparent)
    if parent is None:
        return None
    return dataclasses.replace(parent, tracestate=parse_tracestate(tracestate))


def _random_hex(rand: RandomBits, bits: int) -> str:
    while True:
        number = rand.getrandbits(bits)
        if number:
            return f"{number:0{bits // 4}x}"


def child_context(parent: TraceContext | None, rand: RandomBits) -> TraceContext:
    """The context of a new span under ``parent``: same trace, sampling and tracestate, new span
    id. Without a parent a new trace starts, sampled (the waypoint records what it sees)."""
    if parent is None:
        return TraceContext(_random_hex(rand, 128), _random_hex(rand, 64), sampled=True)
    return TraceContext(
        parent.trace_id,
        _random_hex(rand, 64),
        sampled=parent.sampled,
        tracestate=parent.tracestate,
    )


def format_traceparent(context: TraceContext) -> str:
    """The version-00 ``traceparent`` value; only the sampled flag is carried forward."""
    flags = _FLAG_SAMPLED if context.sampled else 0
    return f"00-{context.trace_id}-{context.span_id}-{flags:02x}"


# --------------------------------------------------------------------------------------------
# Spans and OTLP export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpan:
    """The waypoint's span for one request: started on arrival, exported when it ends."""

    context: TraceContext
    parent_span_id: str | None
    start_time_ns: int

    def propagation_headers(self) -> list[tuple[str, str]]:
        """Headers to send upstream so the next hop's span is this span's child."""
        headers = [("traceparent", format_traceparent(self.context))]
        if self.context.tracestate:
            headers.append(("tracestate", self.context.tracestate))
        return headers


def span_name(method: str, route_name: str | None, path: str) -> str:
    """``<method> <route or path>``; the path without its query (which can hold secrets)."""
    return f"{method} {route_name or path.partition('?')[0] or '/'}"


def span_attributes(
    *,
    method: str,
    path: str,
    status: int,
    authority: str,
    upstream_cluster: str | None = None,
    response_flags: str = "-",
    source_principal: str | None = None,
    destination_principal: str | None = None,
    route_name: str | None = None,
) -> dict[str, str | int]:
    """OpenTelemetry HTTP semantic-convention attributes plus Istio's proxy tags."""
    host, port = _split_authority(authority)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.path": path.partition("?")[0] or "/",
        "server.address": host,
        "response_flags": response_flags or "-",
        "component": "proxy",
    }
    if port is not None:
        attributes["server.port"] = port
    if status:
        attributes["http.response.status_code"] = status
    if route_name:
        attributes["http.route"] = route_name
    if upstream_cluster:
        attributes["upstream_cluster"] = upstream_cluster
    if source_principal:
        attributes["istio.source_principal"] = source_principal
    if destination_principal:
        attributes["istio.destination_principal"] = destination_principal
    return attributes


def _split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` (host possibly a bracketed IPv6 literal) -> (host, port or None)."""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and (not host.startswith("[") or host.endswith("]")):
        return host.strip("[]"), int(port)
    return authority.strip("[]"), None


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare collector address gets ``/v1/traces``, as the
    OpenTelemetry endpoint convention has it; a URL with a path is used as given."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"OTLP endpoint must be an http:// or https:// URL with a host, not {endpoint!r}"
        )
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1/traces")
    return urlunsplit(parts)


class Tracer:
    """Starts a span per request and, when an OTLP endpoint is set, exports it as a SERVER span
    through OpenTelemetry's batching processor (its own thread, so requests never wait on the
    collector). Without an endpoint only the propagation happens."""

    def __init__(
        self,
        service_name: str,
        otlp_endpoint: str | None,
        *,
        rand: RandomBits | None = None,
        export_timeout_s: float = 10.0,
        schedule_delay_ms: float = 1000.0,
        max_queue_size: int = 2048,
    ) -> None:
        self.service_name = service_name
        self._rand: RandomBits = rand if rand is not None else random.Random()
        self._exporter: _OtlpExport | None = None
        if otlp_endpoint is not None:
            self._exporter = _OtlpExport(
                service_name,
                otlp_traces_url(otlp_endpoint),
                export_timeout_s=export_timeout_s,
                schedule_delay_ms=schedule_delay_ms,
                max_queue_size=max_queue_size,
            )

    @property
    def exporting(self) -> bool:
        return self._exporter is not None

    def start(
        self,
        traceparent: str | None,
        tracestate: str | None = None,
        *,
        start_time_ns: int | None = None,
    ) -> RequestSpan:
        """The span for a request that just arrived with these headers (either may be absent
        or invalid: then a new trace starts)."""
        parent = incoming_context(traceparent, tracestate)
        return RequestSpan(
            context=child_context(parent, self._rand),
            parent_span_id=parent.span_id if parent else None,
            start_time_ns=time.time_ns() if start_time_ns is None else start_time_ns,
        )

    def finish(
        self,
        span: RequestSpan,
        *,
        method: str,
        path: str,
        status: int,
        authority: str,
        route_name: str | None = None,
        upstream_cluster: str | None = None,
        response_flags: str = "-",
        source_principal: str | None = None,
        destination_principal: str | None = None,
        end_time_ns: int | None = None,
    ) -> None:
        """Queue the finished span for export (a no-op without an endpoint or if unsampled)."""
        if self._exporter is None or not span.context.sampled:
            return
        self._exporter.submit(
            span,
            span_name(method, route_name, path),
            span_attributes(
                method=method,
                path=path,
                status=status,
                authority=authority,
                upstream_cluster=upstream_cluster,
                response_flags=response_flags,
                source_principal=source_principal,
                destination_principal=destination_principal,
                route_name=route_name,
            ),
            is_error=status >= 500 or status == 0,
            end_time_ns=time.time_ns() if end_time_ns is None else end_time_ns,
        )

    def force_flush(self, timeout_ms: int = 30_000) -> bool:
        """Export everything queued now; blocks (call from a thread in Trio code)."""
        return self._exporter.force_flush(timeout_ms) if self._exporter else True

    def shutdown(self) -> None:
        """Flush the queue and stop the export thread; blocks until done or timed out."""
        if self._exporter is not None:
            self._exporter.shutdown()

    async def aclose(self) -> None:
        """``shutdown`` without blocking the Trio loop."""
        await trio.to_thread.run_sync(self.shutdown)


class _OtlpExport:
    """All OpenTelemetry SDK use lives here: spans become ``ReadableSpan``s with the ids we
    chose (and already propagated), queued on a ``BatchSpanProcessor`` over OTLP/HTTP."""

    def __init__(
        self,
        service_name: str,
        url: str,
        *,
        export_timeout_s: float,
        schedule_delay_ms: float,
        max_queue_size: int,
    ) -> None:

        # Resource(...) rather than Resource.create(...): the latter reads OTEL_* variables.
        self._resource = Resource({"service.name": service_name})
        self._scope = InstrumentationScope("ambient-lite.waypoint")
        self._processor = BatchSpanProcessor(
            OTLPSpanExporter(
                endpoint=url, timeout=export_timeout_s, compression=Compression.NoCompression
            ),
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_ms,
            export_timeout_millis=export_timeout_s * 1000,
        )

    def submit(
        self,
        span: RequestSpan,
        name: str,
        attributes: Mapping[str, str | int],
        *,
        is_error: bool,
        end_time_ns: int,
    ) -> None:

        trace_id = int(span.context.trace_id, 16)
        flags = TraceFlags(TraceFlags.SAMPLED if span.context.sampled else TraceFlags.DEFAULT)
        state = (
            TraceState.from_header([span.context.tracestate])
            if span.context.tracestate
            else TraceState()
        )
        parent = (
            SpanContext(trace_id, int(span.parent_span_id, 16), True, flags, state)
            if span.parent_span_id
            else None
        )
        self._processor.on_end(
            ReadableSpan(
                name,
                context=SpanContext(trace_id, int(span.context.span_id, 16), False, flags, state),
                parent=parent,
                resource=self._resource,
                attributes=dict(attributes),
                kind=SpanKind.SERVER,
                status=Status(StatusCode.ERROR) if is_error else Status(StatusCode.UNSET),
                start_time=span.start_time_ns,
                end_time=max(end_time_ns, span.start_time_ns),
                instrumentation_scope=self._scope,
            )
        )

    def force_flush(self, timeout_ms: int) -> bool:
        return self._processor.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self._processor.shutdown()


# --------------------------------------------------------------------------------------------
# Access log
# --------------------------------------------------------------------------------------------


def access_log(
    *,
    method: str,
    authority: str,
    path: str,
    protocol: str,
    status: int,
    response_flags: str,
    duration_ms: float,
    request_bytes: int,
    response_bytes: int,
    upstream_host: str | None,
    source_principal: str | None,
    route_name: str | None,
    trace_id: str | None,
) -> None:
    """One line per request, the fields of Envoy's default access log that matter here."""
    structlog.get_logger("waypoint.access").info(
        "request complete",
        method=method,
        authority=authority,
        path=path,
        protocol=protocol,
        status=status,
        response_flags=response_flags or "-",
        duration_ms=round(duration_ms, 1),
        request_bytes=request_bytes,
        response_bytes=response_bytes,
        upstream_host=upstream_host,
        **{"src.identity": source_principal},
        route=route_name,
        trace_id=trace_id,
    )
