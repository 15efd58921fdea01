"""Prometheus exposition as Istio's proxies do it, shared by ztunnel and the waypoint."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Labels(Hashable, Protocol):
    """A frozen label set: its values in the metrics' label order."""

    def values(self) -> list[str]: ...


L = TypeVar("L", bound=Labels)
S = TypeVar("S")


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


class LabelledSeries(Generic[L, S]):
    """Each label set's children of a group of metrics, looked up in prometheus_client once:
    its ``labels()`` (validation, string conversion, a lock) per call and metric was a visible
    share of a short connection's or request's CPU. ``build(label values)`` makes one label
    set's children; the cache holds exactly the label sets the registry holds anyway."""

    def __init__(self, build: Callable[[list[str]], S]) -> None:
        self._build = build
        self._children: dict[L, S] = {}

    def of(self, labels: L) -> S:
        children = self._children.get(labels)
        if children is None:
            children = self._children[labels] = self._build(labels.values())
        return children
