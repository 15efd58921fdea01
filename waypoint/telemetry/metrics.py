"""Istio's ``istio_request*`` series as a waypoint reports them: the request labels (derived
from the same function as ztunnel's connection labels, so L4 and L7 series join) and the
Prometheus registry that counts each request.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram

from ambient_api.identity import SpiffeId
from ambient_api.model import Service, Workload
from ambient_common.metrics import LabelledSeries, render_registry
from ambient_dataplane.labels import UNKNOWN, connection_labels

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
        """The Prometheus text exposition for ``/metrics``
        (``ambient_common.metrics.CONTENT_TYPE``)."""
        return render_registry(self.registry)
