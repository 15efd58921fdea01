"""Resilience decisions for the waypoint, as Envoy makes them (sans-IO).

Everything here is plain state driven by the proxy: retry conditions and jittered backoff,
a per-service retry budget, the circuit breaker of a DestinationRule's ``connectionPool``,
outlier detection of its ``outlierDetection`` and the local rate limit token bucket. Time
comes from an injected ``Clock`` (monotonic seconds) and randomness from an injected
``Callable[[], float]`` in [0, 1), so every rule is testable with fakes. The one async
helper, ``wait_dispatched``, lets a Trio driver wait for a queued request's turn.

Responses the proxy answers itself (Envoy's response flags): a circuit breaker overflow is
503 ``UO``, an empty token bucket is 429 ``RL``, a retry limit reached may be flagged
``URX``.

One module per mechanism: ``retries`` (conditions, backoff, budget, per-request state),
``circuit_breaker``, ``outlier_detection``, ``rate_limit``; ``permit`` and ``clock`` are
what they share.
"""

from waypoint.resilience.circuit_breaker import (
    CircuitBreaker,
    OverflowReason,
    RequestPermit,
    wait_dispatched,
)
from waypoint.resilience.clock import Clock
from waypoint.resilience.outlier_detection import (
    DEFAULT_MAX_EJECTION_TIME,
    Ejection,
    OutlierDetector,
    is_outlier_failure,
)
from waypoint.resilience.permit import Permit
from waypoint.resilience.rate_limit import TokenBucket
from waypoint.resilience.retries import (
    SUPPORTED_RETRY_CONDITIONS,
    UPSTREAM_ERROR_KINDS,
    Rand,
    RetryBudget,
    RetryDecision,
    RetryOutcome,
    RetryState,
    backoff_delay,
    is_retriable,
    unsupported_retry_conditions,
)

__all__ = [
    "CircuitBreaker",
    "Clock",
    "DEFAULT_MAX_EJECTION_TIME",
    "Ejection",
    "OutlierDetector",
    "OverflowReason",
    "Permit",
    "Rand",
    "RequestPermit",
    "RetryBudget",
    "RetryDecision",
    "RetryOutcome",
    "RetryState",
    "SUPPORTED_RETRY_CONDITIONS",
    "TokenBucket",
    "UPSTREAM_ERROR_KINDS",
    "backoff_delay",
    "is_outlier_failure",
    "is_retriable",
    "unsupported_retry_conditions",
    "wait_dispatched",
]
