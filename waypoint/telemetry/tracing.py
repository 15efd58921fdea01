"""The waypoint's SERVER span per request: its name and attributes (pure) and the ``Tracer``
that starts it and, when an OTLP endpoint is configured, exports it through OpenTelemetry's
batch processor (its own thread, so requests never wait on the collector). The OpenTelemetry
SDK is used nowhere else in the waypoint.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import trio
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from waypoint.telemetry.trace_context import (
    RandomBits,
    TraceContext,
    child_context,
    format_traceparent,
    incoming_context,
)


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
