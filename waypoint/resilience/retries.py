"""Envoy's retries: which failed tries ``retry_on`` covers, the fully jittered backoff, the
per-service retry budget and ``RetryState``, the retries of one request (a retry limit
reached is flagged ``URX``). Randomness comes from an injected ``Rand`` in [0, 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

from ambient_api.l7 import RetryPolicy
from waypoint.resilience.permit import Permit

Rand = Callable[[], float]

UPSTREAM_ERROR_KINDS = frozenset({"connect-failure", "reset", "timeout", "protocol"})
"""What ``waypoint.upstream.UpstreamError.kind`` may be. ``timeout`` is a per-try timeout
(the whole-request timeout is never retried); ``protocol`` is a malformed upstream
response, which Envoy sees as a stream reset."""

SUPPORTED_RETRY_CONDITIONS = frozenset(
    {"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "retriable-status-codes"}
)
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_RETRIABLE_4XX = frozenset({409})


@dataclass(frozen=True)
class _RetryConditions:
    on_5xx: bool
    on_gateway_error: bool
    on_reset: bool
    on_connect_failure: bool
    status_codes: frozenset[int]


@functools.lru_cache(maxsize=256)
def _parse_retry_on(retry_on: tuple[str, ...]) -> _RetryConditions:
    names = {condition.strip().lower() for condition in retry_on}
    codes = {int(name) for name in names if name.isdigit()}
    if "retriable-4xx" in names:
        codes |= _RETRIABLE_4XX
    return _RetryConditions(
        on_5xx="5xx" in names,
        on_gateway_error="gateway-error" in names,
        on_reset="reset" in names,
        on_connect_failure="connect-failure" in names,
        # Istio turns numeric retryOn entries into Envoy's retriable_status_codes and adds
        # "retriable-status-codes" itself, so listed codes apply with or without it.
        status_codes=frozenset(codes),
    )


def unsupported_retry_conditions(retry_on: Iterable[str]) -> tuple[str, ...]:
    """The ``retry_on`` entries this waypoint cannot act on (gRPC status conditions,
    ``refused-stream``, typos), for config validation and logging; they match nothing."""
    return tuple(
        condition
        for condition in retry_on
        if condition.strip().lower() not in SUPPORTED_RETRY_CONDITIONS
        and not condition.strip().isdigit()
    )


def is_retriable(policy: RetryPolicy, *, status: int | None, error_kind: str | None) -> bool:
    """Whether one failed try may be retried under ``policy.retry_on`` (Envoy's rules).

    Give exactly one of ``status`` (the upstream answered) or ``error_kind`` (it did not:
    one of ``UPSTREAM_ERROR_KINDS``). ``5xx`` covers every 5xx and every try that got no
    response at all (connect failure, reset, per-try timeout); ``gateway-error`` is
    502/503/504 plus the same no-response cases; ``reset`` is only the no-response cases;
    ``connect-failure`` only connect failures; numeric entries are those statuses."""
    if (status is None) == (error_kind is None):
        raise ValueError("is_retriable needs exactly one of status or error_kind")
    conditions = _parse_retry_on(policy.retry_on)
    if error_kind is not None:
        if error_kind not in UPSTREAM_ERROR_KINDS:
            raise ValueError(
                f"unknown upstream error kind {error_kind!r}; "
                f"expected one of {sorted(UPSTREAM_ERROR_KINDS)}"
            )
        if error_kind == "connect-failure" and conditions.on_connect_failure:
            return True
        return conditions.on_5xx or conditions.on_gateway_error or conditions.on_reset
    assert status is not None
    if conditions.on_5xx and 500 <= status <= 599:
        return True
    if conditions.on_gateway_error and status in _GATEWAY_ERRORS:
        return True
    return status in conditions.status_codes


def backoff_delay(retry_number: int, base: float, maximum: float, rand: Rand) -> float:
    """Envoy's fully jittered exponential backoff before retry ``retry_number`` (1 = the
    first retry): uniform in [0, min(base * 2**(retry_number - 1), maximum)).

    That is the interval of Envoy's current ``JitteredExponentialBackOffStrategy`` (B, 2B,
    4B, ... capped); its older docs quote (2^N - 1)B. ``rand`` returns a float in [0, 1)."""
    if retry_number < 1:
        raise ValueError(f"retry_number must be >= 1, got {retry_number}")
    if base < 0 or maximum < 0:
        raise ValueError(f"backoff base and maximum must be >= 0, got {base} and {maximum}")
    # Cap the exponent: beyond 2**62 every sane base already exceeds any maximum.
    ceiling = min(base * float(2 ** min(retry_number - 1, 62)), maximum)
    return rand() * ceiling


class RetryBudget:
    """Envoy's retry budget for one destination service: retries in flight may not exceed
    max(min_retry_concurrency, budget_percent% of the active requests), so that when the
    service is down retries add a bounded fraction of load instead of multiplying it."""

    def __init__(self, budget_percent: float = 20.0, min_retry_concurrency: int = 3) -> None:
        if not 0.0 <= budget_percent <= 100.0:
            raise ValueError(f"budget_percent must be within 0..100, got {budget_percent}")
        if min_retry_concurrency < 0:
            raise ValueError(f"min_retry_concurrency must be >= 0, got {min_retry_concurrency}")
        self.budget_percent = budget_percent
        self.min_retry_concurrency = min_retry_concurrency
        self._in_flight = 0
        self.overflows = 0

    @property
    def retries_in_flight(self) -> int:
        return self._in_flight

    def limit(self, active_requests: int) -> int:
        """Concurrent retries allowed with ``active_requests`` active (incl. pending)
        requests to the service; Envoy truncates the percentage to an integer."""
        by_percent = int(self.budget_percent * max(active_requests, 0) / 100.0)
        return max(self.min_retry_concurrency, by_percent)

    def try_start_retry(self, active_requests: int) -> Permit | None:
        """A permit for one more retry, or None when the budget is spent. Hold the permit
        from scheduling the retry (its backoff included) until the retried try is done."""
        if self._in_flight >= self.limit(active_requests):
            self.overflows += 1
            return None
        self._in_flight += 1
        return Permit(self._retry_done)

    def retry_done(self, permit: Permit) -> None:
        """Return a retry's slot; the same as ``permit.release()`` (idempotent)."""
        permit.release()

    def _retry_done(self, _permit: Permit) -> None:
        self._in_flight -= 1


class RetryOutcome(StrEnum):
    RETRY = "retry"
    NOT_RETRIABLE = "not-retriable"  # success, or a failure retry_on does not cover
    NO_POLICY = "no-policy"
    LIMIT_EXCEEDED = "limit-exceeded"  # attempts used up: Envoy's URX
    BUDGET_EXHAUSTED = "budget-exhausted"  # Envoy's upstream_rq_retry_overflow


@dataclass(frozen=True)
class RetryDecision:
    outcome: RetryOutcome
    delay: float = 0.0  # seconds to wait before the retry

    @property
    def retry(self) -> bool:
        return self.outcome is RetryOutcome.RETRY


class RetryState:
    """The retries of one request. After every try (successful or not) call ``decide``;
    on ``retry`` sleep ``delay`` and try again. The state holds the budget permit of the
    retry in progress and returns it at the next ``decide`` or at ``close`` (use it as a
    context manager so a cancelled request gives its slot back).

    ``policy.attempts`` is the number of retries after the first try (Istio's meaning);
    a None policy never retries (the caller chooses whether a route without one gets
    Istio's default, ``RetryPolicy()``)."""

    def __init__(
        self,
        policy: RetryPolicy | None,
        *,
        budget: RetryBudget | None = None,
        rand: Rand,
    ) -> None:
        if policy is not None and policy.attempts < 0:
            raise ValueError(f"retry attempts must be >= 0, got {policy.attempts}")
        self._policy = policy
        self._budget = budget
        self._rand = rand
        self._retries_used = 0
        self._permit: Permit | None = None

    @property
    def policy(self) -> RetryPolicy | None:
        return self._policy

    @property
    def retries_used(self) -> int:
        return self._retries_used

    @property
    def attempt(self) -> int:
        """The 1-based number of the try in progress (1 = the first, not a retry)."""
        return self._retries_used + 1

    @property
    def per_try_timeout(self) -> float | None:
        return None if self._policy is None else self._policy.per_try_timeout

    def decide(
        self,
        *,
        status: int | None = None,
        error_kind: str | None = None,
        active_requests: int = 0,
    ) -> RetryDecision:
        """Whether to retry after a try that ended with ``status`` or ``error_kind``.
        ``active_requests`` (the service's active plus pending requests) sizes the budget."""
        self._release_permit()  # the previous retry, if any, has now completed
        policy = self._policy
        if policy is None:
            return RetryDecision(RetryOutcome.NO_POLICY)
        if not is_retriable(policy, status=status, error_kind=error_kind):
            return RetryDecision(RetryOutcome.NOT_RETRIABLE)
        if self._retries_used >= policy.attempts:
            return RetryDecision(RetryOutcome.LIMIT_EXCEEDED)
        if self._budget is not None:
            permit = self._budget.try_start_retry(active_requests)
            if permit is None:
                return RetryDecision(RetryOutcome.BUDGET_EXHAUSTED)
            self._permit = permit
        self._retries_used += 1
        delay = backoff_delay(
            self._retries_used, policy.backoff_base, policy.backoff_max, self._rand
        )
        return RetryDecision(RetryOutcome.RETRY, delay)

    def close(self) -> None:
        """Give back a held budget permit; idempotent."""
        self._release_permit()

    def _release_permit(self) -> None:
        if self._permit is not None:
            self._permit.release()
            self._permit = None

    def __enter__(self) -> RetryState:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
