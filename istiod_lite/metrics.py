"""istiod_lite's own Prometheus metrics, served at ``GET /metrics`` (``server.py``).

One gauge so far: how many policy parts the configuration being served could not translate
as written. Each made its policy fail closed (``istiod_lite.translate``), so traffic is
denied that the author may have meant to allow; an alert on ``> 0`` finds them. A gauge, not
a counter: every change re-translates the same broken policies, and what matters is whether
any are being served now. The log says which (``feed_store``).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Gauge

from ambient_common.metrics import render_registry
from istiod_lite.translate import PolicyError


class IstiodMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.policy_translation_errors = Gauge(
            "istiod_lite_policy_translation_errors",
            "Policy parts the served configuration could not translate as written; "
            "each made its policy fail closed",
            registry=self.registry,
        )

    def record_translation(self, errors: Sequence[PolicyError]) -> None:
        self.policy_translation_errors.set(len(errors))

    def render(self) -> bytes:
        return render_registry(self.registry)
