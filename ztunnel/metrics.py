"""ztunnel's Prometheus metrics under Istio's names and labels, so Kiali and existing dashboards
work unchanged.

Each ztunnel has its own ``CollectorRegistry`` (several ztunnels share one process in tests and
in the embedded mode). Labels are computed once per connection by the pure function
``ambient_dataplane.labels.connection_labels``; inbound and outbound report through
``ztunnel.telemetry``, which calls ``connection_opened`` / ``connection_closed`` and, for
connections still open, ``bytes_transferred`` (its periodic flush).
"""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter

from ambient_common.metrics import LabelledSeries, render_registry
from ambient_dataplane.labels import LABEL_NAMES, ConnectionLabels


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
