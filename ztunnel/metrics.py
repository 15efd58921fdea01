"""ztunnel's Prometheus metrics under Istio's names and labels, so Kiali and existing
dashboards work unchanged.

Each ztunnel has its own ``CollectorRegistry`` (several ztunnels share one process in tests
and in the embedded mode). Labels are computed once per connection by the pure function
``connection_labels``; inbound and outbound report through ``ztunnel.telemetry``, which
calls ``connection_opened`` / ``connection_closed`` (``bytes_transferred`` reports bytes
of a connection still open).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple

from prometheus_client import CollectorRegistry, Counter

from ambient_common.metrics import LabelledSeries, render_registry
from istiod_lite.api.identity import SpiffeId
from istiod_lite.api.model import Service, TunnelProtocol, Workload

UNKNOWN = "unknown"

Reporter = Literal["source", "destination"]


@dataclass(frozen=True)
class ConnectionLabels:
    """Istio's TCP metric labels; field order is the label order."""

    reporter: str
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
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = UNKNOWN

    def values(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ConnectionLabels))


def _or_unknown(value: str) -> str:
    return value or UNKNOWN


def _workload_name(workload: Workload) -> str:
    """Istio reports the owning workload (Deployment) name, falling back to the pod name."""
    return workload.workload_name or workload.name


def _canonical_service(workload: Workload) -> str:
    return workload.canonical_name or _workload_name(workload)


def _canonical_revision(workload: Workload) -> str:
    return workload.canonical_revision or "latest"


def connection_labels(
    reporter: Reporter,
    source: Workload | None,
    source_identity: SpiffeId | None,
    destination: Workload | None,
    destination_service: Service | None,
    *,
    mtls: bool,
    response_flags: str = "-",
) -> ConnectionLabels:
    """Build the labels of one connection from what the proxy knows about both ends.

    ``source_identity`` is the peer's authenticated SPIFFE id (inbound over HBONE) or the
    local workload's (outbound); without mTLS nobody's principal is known.
    """
    if reporter not in ("source", "destination"):
        raise ValueError(f"reporter must be 'source' or 'destination', not {reporter!r}")
    destination_principal = UNKNOWN
    if mtls and destination is not None and destination.tunnel_protocol is TunnelProtocol.HBONE:
        destination_principal = destination.spiffe_id
    return ConnectionLabels(
        reporter=reporter,
        source_workload=_workload_name(source) if source else UNKNOWN,
        source_canonical_service=_canonical_service(source) if source else UNKNOWN,
        source_canonical_revision=_canonical_revision(source) if source else UNKNOWN,
        source_workload_namespace=source.namespace if source else UNKNOWN,
        source_principal=str(source_identity) if source_identity and mtls else UNKNOWN,
        source_app=_canonical_service(source) if source else UNKNOWN,
        source_version=_canonical_revision(source) if source else UNKNOWN,
        source_cluster=_or_unknown(source.cluster_id) if source else UNKNOWN,
        destination_workload=_workload_name(destination) if destination else UNKNOWN,
        destination_workload_namespace=destination.namespace if destination else UNKNOWN,
        destination_principal=destination_principal,
        destination_service=(
            destination_service.hostname
            if destination_service
            else (destination.addresses[0] if destination and destination.addresses else UNKNOWN)
        ),
        destination_service_name=destination_service.name if destination_service else UNKNOWN,
        destination_service_namespace=(
            destination_service.namespace if destination_service else UNKNOWN
        ),
        destination_canonical_service=_canonical_service(destination) if destination else UNKNOWN,
        destination_canonical_revision=(
            _canonical_revision(destination) if destination else UNKNOWN
        ),
        destination_cluster=_or_unknown(destination.cluster_id) if destination else UNKNOWN,
        request_protocol="tcp",
        response_flags=response_flags or "-",
        connection_security_policy="mutual_tls" if mtls else UNKNOWN,
    )


class _Series(NamedTuple):
    """One label set's children of the four ``istio_tcp_*`` counters."""

    opened: Counter
    closed: Counter
    sent: Counter
    received: Counter


class ZtunnelMetrics:
    """The ``istio_tcp_*`` counters of one ztunnel."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # prometheus_client appends "_total" to counter names on exposition.
        self.connections_opened = Counter(
            "istio_tcp_connections_opened",
            "Total number of TCP connections opened",
            LABEL_NAMES,
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "istio_tcp_connections_closed",
            "Total number of TCP connections closed",
            LABEL_NAMES,
            registry=self.registry,
        )
        self.sent_bytes = Counter(
            "istio_tcp_sent_bytes",
            "Total number of bytes sent during a TCP connection (towards the destination)",
            LABEL_NAMES,
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "istio_tcp_received_bytes",
            "Total number of bytes received during a TCP connection (from the destination)",
            LABEL_NAMES,
            registry=self.registry,
        )
        self._series: LabelledSeries[ConnectionLabels, _Series] = LabelledSeries(
            lambda values: _Series(*(counter.labels(*values) for counter in (
                self.connections_opened, self.connections_closed,
                self.sent_bytes, self.received_bytes))))

    def connection_opened(self, labels: ConnectionLabels) -> None:
        """Count the open; the connection's other series start at 0 so rates work at once."""
        self._series.of(labels).opened.inc()

    def bytes_transferred(self, labels: ConnectionLabels, sent: int = 0, received: int = 0) -> None:
        """Report bytes as they flow, so long-lived connections show up before they close."""
        if sent < 0 or received < 0:
            raise ValueError(f"byte counts cannot be negative (sent={sent}, received={received})")
        series = self._series.of(labels)
        if sent:
            series.sent.inc(sent)
        if received:
            series.received.inc(received)

    def connection_closed(self, labels: ConnectionLabels, sent: int = 0, received: int = 0) -> None:
        """Count the close, plus any bytes not yet reported with ``bytes_transferred``."""
        self.bytes_transferred(labels, sent, received)
        self._series.of(labels).closed.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition for ``/metrics``."""
        return render_registry(self.registry)
