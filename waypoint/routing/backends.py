"""Where a matched request goes: the weighted backend choice, the mirrors it is copied to and
the faults injected into it. Everything random takes a ``rand`` callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ambient_api.l7 import (
    BackendRef,
    FaultInjection,
    RequestMirror,
    RouteRule,
    TcpRoute,
)
from ambient_dataplane.labels import ResponseFlag

Random = Callable[[], float]

NO_BACKEND_STATUS = 500  # Gateway API: no valid backend (none, or all weights zero)


def choose_backend(rule: RouteRule | TcpRoute, rand: Random) -> BackendRef | None:
    """Weighted random choice among the rule's (or TCPRoute's) backends; None when there is
    none to choose (weight 0 takes no traffic: the proxy answers 500 or refuses)."""
    weighted = [backend for backend in rule.backends if backend.weight > 0]
    total = sum(backend.weight for backend in weighted)
    if total <= 0:
        return None
    point = rand() * total
    cumulative = 0
    for backend in weighted:
        cumulative += backend.weight
        if point < cumulative:
            return backend
    return weighted[-1]  # rand() returned 1.0 or float rounding: the last one


def mirror_targets(rule: RouteRule, rand: Random) -> list[RequestMirror]:
    """The mirrors this request is copied to, each drawn independently by its percent."""
    return [mirror for mirror in rule.mirrors if _percent_hit(mirror.percent, rand)]


@dataclass(frozen=True)
class FaultDecision:
    delay: float | None = None  # seconds to wait before going on
    abort_status: int | None = None  # answer this status instead of forwarding

    @property
    def response_flags(self) -> tuple[ResponseFlag, ...]:
        """DI for a delay, FI for an abort."""
        flags = (ResponseFlag.DELAY_INJECTED,) * (self.delay is not None)
        return flags + (ResponseFlag.FAULT_INJECTED,) * (self.abort_status is not None)


def _percent_hit(percent: float, rand: Random) -> bool:
    """True for ``percent`` % of draws; 0 and 100 decide without drawing."""
    if percent >= 100:
        return True
    return percent > 0 and rand() * 100 < percent


def fault_decision(fault: FaultInjection | None, rand: Random) -> FaultDecision:
    """Delay and abort drawn independently (Istio): a request may get both, delay first."""
    if fault is None:
        return FaultDecision()
    delay = None
    if fault.delay_seconds is not None and _percent_hit(fault.delay_percent, rand):
        delay = fault.delay_seconds
    abort = None
    if fault.abort_status is not None and _percent_hit(fault.abort_percent, rand):
        abort = fault.abort_status
    return FaultDecision(delay=delay, abort_status=abort)
