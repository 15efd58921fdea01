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
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

import trio

from ambient_api.l7 import ConnectionPool, OutlierDetection, RateLimit, RetryPolicy

Clock = Callable[[], float]
Rand = Callable[[], float]

# Floating-point slack when a clock reading lands exactly on a fill/sweep boundary
# (0.1 + 0.2 is not 0.3): a boundary reached within a nanosecond counts as reached.
_EPSILON = 1e-9

# ---------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------

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


class Permit:
    """One held unit of a limited resource. Releasing it twice is harmless, so a cleanup
    path can always release without knowing whether another one already did."""

    __slots__ = ("_on_release", "_released")

    def __init__(self, on_release: Callable[[Permit], None]) -> None:
        self._on_release = on_release
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._on_release(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


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


# ---------------------------------------------------------------------------------------
# Circuit breaking
# ---------------------------------------------------------------------------------------


class OverflowReason(StrEnum):
    MAX_REQUESTS = "max_requests"
    MAX_PENDING_REQUESTS = "max_pending_requests"


class RequestPermit(Permit):
    """An admitted request. It is *dispatched* when it may use an upstream connection, or
    *pending* (queued, FIFO) until a dispatched request of the same service finishes."""

    __slots__ = ("_dispatched", "_callbacks")

    def __init__(self, on_release: Callable[[Permit], None], *, dispatched: bool) -> None:
        super().__init__(on_release)
        self._dispatched = dispatched
        self._callbacks: list[Callable[[], None]] = []

    @property
    def dispatched(self) -> bool:
        return self._dispatched

    def on_dispatch(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this permit is dispatched (at once if it already is)."""
        if self._dispatched:
            callback()
        elif not self.released:
            self._callbacks.append(callback)

    def _dispatch(self) -> None:
        self._dispatched = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class CircuitBreaker:
    """A destination service's circuit breaker (DestinationRule ``connectionPool``).

    The model, for HTTP/1.1 upstreams where a connection carries one request at a time:
    - ``max_requests`` bounds admitted requests (dispatched + pending);
    - at most ``max_connections`` requests are *dispatched* (each busy on a connection);
      later ones are *pending*, waiting for a dispatched one to finish, as Envoy queues
      requests when its pool may not open another connection;
    - ``max_pending_requests`` bounds that queue.
    A request over a limit is refused: the proxy answers 503 with flag ``UO``. Connections
    themselves are counted through ``connection_opened`` leases so the pool can ask
    ``can_open_connection`` and the admin dump can show them. None means unlimited."""

    def __init__(self, pool: ConnectionPool | None) -> None:
        self._pool = _validated_pool(pool)
        self._dispatched = 0
        self._pending: deque[RequestPermit] = deque()
        self._connections = 0
        self.overflows: dict[str, int] = {reason.value: 0 for reason in OverflowReason}
        self.connection_overflows = 0

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    @property
    def dispatched_requests(self) -> int:
        return self._dispatched

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    @property
    def active_requests(self) -> int:
        """Admitted requests, dispatched plus pending (what sizes the retry budget)."""
        return self._dispatched + len(self._pending)

    @property
    def open_connections(self) -> int:
        return self._connections

    def reconfigure(self, pool: ConnectionPool | None) -> None:
        """Apply a changed connectionPool keeping the counts; a raised limit dispatches
        waiting requests at once."""
        self._pool = _validated_pool(pool)
        self._dispatch_waiting()

    def try_acquire_request(self) -> RequestPermit | None:
        """Admit one request, or None on overflow (see ``overflows`` for which limit).
        Release the permit when the request is done, whatever happened."""
        limits = self._pool
        if limits.max_requests is not None and self.active_requests >= limits.max_requests:
            self.overflows[OverflowReason.MAX_REQUESTS] += 1
            return None
        if self._can_dispatch():
            self._dispatched += 1
            return RequestPermit(self._release_request, dispatched=True)
        if (
            limits.max_pending_requests is not None
            and len(self._pending) >= limits.max_pending_requests
        ):
            self.overflows[OverflowReason.MAX_PENDING_REQUESTS] += 1
            return None
        permit = RequestPermit(self._release_request, dispatched=False)
        self._pending.append(permit)
        return permit

    def release_request(self, permit: Permit) -> None:
        """The same as ``permit.release()``: idempotent, so counts never go negative."""
        permit.release()

    def connection_opened(self) -> Permit:
        """Count an upstream connection; release the returned lease when it closes. Over
        ``max_connections`` the connection is still counted (Envoy lets a chosen host have
        one) and ``connection_overflows`` grows."""
        max_connections = self._pool.max_connections
        if max_connections is not None and self._connections >= max_connections:
            self.connection_overflows += 1
        self._connections += 1
        return Permit(self._connection_closed)

    def connection_closed(self, lease: Permit) -> None:
        """The same as ``lease.release()`` (idempotent)."""
        lease.release()

    def can_open_connection(self) -> bool:
        max_connections = self._pool.max_connections
        return max_connections is None or self._connections < max_connections

    def should_close_connection(self, requests_on_connection: int) -> bool:
        """Whether a connection that has carried ``requests_on_connection`` requests must
        not be reused (``maxRequestsPerConnection``; 1 disables keep-alive, 0 or None is
        unlimited, as in Istio)."""
        limit = self._pool.max_requests_per_connection
        if not limit:
            return False
        return requests_on_connection >= limit

    def snapshot(self) -> dict[str, object]:
        """Counters for the admin config dump."""
        return {
            "max_connections": self._pool.max_connections,
            "max_pending_requests": self._pool.max_pending_requests,
            "max_requests": self._pool.max_requests,
            "max_requests_per_connection": self._pool.max_requests_per_connection,
            "dispatched_requests": self._dispatched,
            "pending_requests": len(self._pending),
            "open_connections": self._connections,
            "overflows": dict(self.overflows),
            "connection_overflows": self.connection_overflows,
        }

    def _can_dispatch(self) -> bool:
        # Pending requests are dispatched as soon as a slot frees (release, reconfigure), so
        # a free slot means an empty queue and a new request cannot jump it.
        max_connections = self._pool.max_connections
        return max_connections is None or self._dispatched < max_connections

    def _release_request(self, permit: Permit) -> None:
        assert isinstance(permit, RequestPermit)
        if permit.dispatched:
            self._dispatched -= 1
            self._dispatch_waiting()
        else:
            self._pending.remove(permit)

    def _dispatch_waiting(self) -> None:
        max_connections = self._pool.max_connections
        while self._pending and (max_connections is None or self._dispatched < max_connections):
            permit = self._pending.popleft()
            self._dispatched += 1
            permit._dispatch()

    def _connection_closed(self, _lease: Permit) -> None:
        self._connections -= 1


def _validated_pool(pool: ConnectionPool | None) -> ConnectionPool:
    pool = pool or ConnectionPool()
    for name in ("max_connections", "max_pending_requests", "max_requests"):
        value = getattr(pool, name)
        if value is not None and value < 1:
            raise ValueError(f"connectionPool {name} must be >= 1 or unset, got {value}")
    per_connection = pool.max_requests_per_connection
    if per_connection is not None and per_connection < 0:
        raise ValueError(
            f"connectionPool max_requests_per_connection must be >= 0, got {per_connection}"
        )
    return pool


async def wait_dispatched(permit: RequestPermit) -> None:
    """Wait until a pending request may use a connection. On cancellation the caller's
    ``permit.release()`` takes it out of the queue."""
    if permit.dispatched:
        return
    if permit.released:
        raise RuntimeError("wait_dispatched on a released request permit")
    ready = trio.Event()
    permit.on_dispatch(ready.set)
    await ready.wait()


# ---------------------------------------------------------------------------------------
# Outlier detection
# ---------------------------------------------------------------------------------------

DEFAULT_MAX_EJECTION_TIME = 300.0  # Envoy's max_ejection_time default (seconds)


def is_outlier_failure(*, status: int | None, error_kind: str | None) -> bool:
    """What counts against an endpoint for consecutive_5xx: a 5xx answer, or a local-origin
    failure (connect failure, reset, timeout, protocol error), which Envoy maps to 5xx
    unless split_external_local_origin_errors is set (Istio leaves it unset)."""
    if error_kind is not None:
        return True
    return status is not None and 500 <= status <= 599


@dataclass
class _EndpointHealth:
    consecutive_failures: int = 0
    backoff: int = 0  # Envoy's ejection time multiplier
    times_ejected: int = 0
    ejected_at: float | None = None
    uneject_at: float | None = None


@dataclass(frozen=True)
class Ejection:
    """An endpoint out of load balancing, for the admin dump."""

    endpoint_uid: str
    ejected_at: float
    until: float
    multiplier: int
    times_ejected: int


class OutlierDetector:
    """Consecutive-5xx outlier detection for one destination service, as Envoy's.

    - ``consecutive_5xx`` failures in a row eject an endpoint (0 disables, as Istio);
    - the ejection lasts ``base_ejection_time`` times a multiplier that grows with each
      ejection and shrinks by one at each sweep the endpoint passes healthy, capped at
      max(300 s, base) (Envoy's max_ejection_time default);
    - sweeps run every ``interval`` from the detector's creation; an ejected endpoint
      returns at the first sweep after its time is served;
    - an endpoint is ejected only while the ejected share is below ``max_ejection_percent``
      (Envoy compares the share *before* this ejection, so one ejection is always possible);
    - ``eligible`` falls back to every endpoint (Envoy's panic mode) when none or, with a
      ``panic_threshold_percent``, too few are left, so the service is never empty.
    Istio's default panic threshold (minHealthPercent) is 0: only an all-ejected set
    panics. The share is counted over the endpoints last given to ``eligible``/``retain``
    plus any recorded ones."""

    def __init__(
        self,
        policy: OutlierDetection,
        clock: Clock,
        *,
        panic_threshold_percent: float = 0.0,
    ) -> None:
        if not 0.0 <= panic_threshold_percent <= 100.0:
            raise ValueError(
                f"panic_threshold_percent must be within 0..100, got {panic_threshold_percent}"
            )
        self._policy = _validated_outlier_policy(policy)
        self._clock = clock
        self._origin = clock()
        self._panic_threshold = panic_threshold_percent
        self._health: dict[str, _EndpointHealth] = {}
        self._members: set[str] = set()
        self.ejections_total = 0
        self.ejections_overflow = 0  # ejections refused by max_ejection_percent

    @property
    def policy(self) -> OutlierDetection:
        return self._policy

    def reconfigure(self, policy: OutlierDetection) -> None:
        """Apply a changed policy; current ejections run their course."""
        self._policy = _validated_outlier_policy(policy)

    def record(self, endpoint_uid: str, *, success: bool) -> None:
        """Count one try's outcome (see ``is_outlier_failure``); may eject the endpoint."""
        self._members.add(endpoint_uid)
        health = self._health.setdefault(endpoint_uid, _EndpointHealth())
        if success:
            health.consecutive_failures = 0
            return
        threshold = self._policy.consecutive_5xx
        if threshold <= 0:
            return
        health.consecutive_failures += 1
        if health.consecutive_failures < threshold:
            return
        # Envoy resets the counter on every detection so the next bout is seen afresh.
        health.consecutive_failures = 0
        now = self._clock()
        if self._ejected_now(health, now):
            return
        if self._ejected_share(now) >= self._policy.max_ejection_percent:
            self.ejections_overflow += 1
            return
        self._eject(health, now)

    def is_ejected(self, endpoint_uid: str) -> bool:
        health = self._health.get(endpoint_uid)
        return health is not None and self._ejected_now(health, self._clock())

    def eligible(self, endpoint_uids: Sequence[str]) -> list[str]:
        """The endpoints load balancing may use, in the given order: the non-ejected ones,
        or all of them when that set is empty or under the panic threshold."""
        self._members = set(endpoint_uids)
        if not endpoint_uids:
            return []
        now = self._clock()
        healthy = [
            uid
            for uid in endpoint_uids
            if (health := self._health.get(uid)) is None or not self._ejected_now(health, now)
        ]
        if not healthy:
            return list(endpoint_uids)
        if 100.0 * len(healthy) / len(endpoint_uids) < self._panic_threshold:
            return list(endpoint_uids)
        return healthy

    def retain(self, endpoint_uids: Iterable[str]) -> None:
        """Forget endpoints that left the service (as Envoy drops their host monitors)."""
        keep = set(endpoint_uids)
        self._members = set(keep)
        for uid in [uid for uid in self._health if uid not in keep]:
            del self._health[uid]

    def ejected(self) -> list[Ejection]:
        """The endpoints ejected now, by uid."""
        now = self._clock()
        return [
            Ejection(
                endpoint_uid=uid,
                ejected_at=health.ejected_at,
                until=health.uneject_at,
                multiplier=health.backoff,
                times_ejected=health.times_ejected,
            )
            for uid, health in sorted(self._health.items())
            if health.ejected_at is not None
            and health.uneject_at is not None
            and self._ejected_now(health, now)
        ]

    def _ejected_now(self, health: _EndpointHealth, now: float) -> bool:
        return health.uneject_at is not None and now < health.uneject_at

    def _ejected_share(self, now: float) -> float:
        members = self._members
        ejected = sum(
            1
            for uid in members
            if (health := self._health.get(uid)) is not None and self._ejected_now(health, now)
        )
        return 100.0 * ejected / len(members)

    def _eject(self, health: _EndpointHealth, now: float) -> None:
        base = self._policy.base_ejection_time
        max_time = max(DEFAULT_MAX_EJECTION_TIME, base)
        if health.uneject_at is not None:
            # Each sweep passed healthy since the last return lowers the multiplier.
            healthy_sweeps = self._sweeps_after_until(health.uneject_at, now)
            health.backoff = max(0, health.backoff - healthy_sweeps)
        if health.backoff * base < max_time + base:
            health.backoff += 1
        duration = min(base * health.backoff, max_time)
        health.times_ejected += 1
        health.ejected_at = now
        health.uneject_at = self._first_sweep_at_or_after(now + duration)
        self.ejections_total += 1

    def _sweep_index(self, t: float) -> float:
        return (t - self._origin) / self._policy.interval

    def _first_sweep_at_or_after(self, t: float) -> float:
        index = math.ceil(self._sweep_index(t) - _EPSILON)
        return self._origin + index * self._policy.interval

    def _sweeps_after_until(self, after: float, until: float) -> int:
        """How many sweeps fall in (after, until]."""
        first = math.floor(self._sweep_index(after) + _EPSILON)
        last = math.floor(self._sweep_index(until) + _EPSILON)
        return max(0, last - first)


def _validated_outlier_policy(policy: OutlierDetection) -> OutlierDetection:
    if policy.interval <= 0:
        raise ValueError(f"outlierDetection interval must be > 0, got {policy.interval}")
    if policy.base_ejection_time < 0:
        raise ValueError(
            f"outlierDetection base_ejection_time must be >= 0, got {policy.base_ejection_time}"
        )
    if not 0 <= policy.max_ejection_percent <= 100:
        raise ValueError(
            "outlierDetection max_ejection_percent must be within 0..100, "
            f"got {policy.max_ejection_percent}"
        )
    return policy


# ---------------------------------------------------------------------------------------
# Local rate limiting
# ---------------------------------------------------------------------------------------


class TokenBucket:
    """Envoy's local rate limit bucket: starts full with ``max_tokens``; every
    ``fill_interval`` (counted from creation) adds ``tokens_per_fill``, never above
    ``max_tokens``. A request that finds it empty is answered 429 with flag ``RL``."""

    def __init__(
        self, max_tokens: int, tokens_per_fill: int, fill_interval: float, clock: Clock
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"rate limit max_tokens must be >= 1, got {max_tokens}")
        if tokens_per_fill < 1:
            raise ValueError(f"rate limit tokens_per_fill must be >= 1, got {tokens_per_fill}")
        if fill_interval <= 0:
            raise ValueError(f"rate limit fill_interval must be > 0, got {fill_interval}")
        self.max_tokens = max_tokens
        self.tokens_per_fill = tokens_per_fill
        self.fill_interval = fill_interval
        self._clock = clock
        self._tokens = max_tokens
        self._last_fill = clock()

    @classmethod
    def from_rate_limit(cls, limit: RateLimit, clock: Clock) -> TokenBucket:
        try:
            return cls(limit.max_tokens, limit.tokens_per_fill, limit.fill_interval, clock)
        except ValueError as error:
            raise ValueError(f"rate limit {limit.key}: {error}") from None

    @property
    def tokens(self) -> int:
        self._refill()
        return self._tokens

    def try_take(self) -> bool:
        """Take one token; False (answer 429) when there is none."""
        self._refill()
        if self._tokens <= 0:
            return False
        self._tokens -= 1
        return True

    def _refill(self) -> None:
        elapsed = self._clock() - self._last_fill
        fills = math.floor(elapsed / self.fill_interval + _EPSILON)
        if fills <= 0:
            return
        self._last_fill += fills * self.fill_interval
        self._tokens = min(self.max_tokens, self._tokens + fills * self.tokens_per_fill)
