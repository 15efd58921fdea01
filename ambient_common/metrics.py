"""Prometheus exposition as Istio's proxies do it, shared by ztunnel and the waypoint."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _WithoutCreatedSeries:
    """A view of a registry without the ``*_created`` series prometheus_client adds to
    counters and histograms: Istio does not expose them, and dashboards do not expect them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def render_registry(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` without ``*_created`` series."""
    return generate_latest(_WithoutCreatedSeries(registry))  # type: ignore[arg-type]
