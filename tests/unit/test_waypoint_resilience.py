"""Resilience decisions (retries, budget, circuit breaker, outlier detection, rate limit)
checked against Envoy's rules with fake clocks and seeded randomness."""

from __future__ import annotations

import functools
import random

import pytest
import trio
import trio.testing

from ambient_api.l7 import ConnectionPool, OutlierDetection, RateLimit, RetryPolicy
from waypoint.resilience import (
    CircuitBreaker,
    OutlierDetector,
    RetryBudget,
    RetryOutcome,
    RetryState,
    TokenBucket,
    backoff_delay,
    is_outlier_failure,
    is_retriable,
    unsupported_retry_conditions,
    wait_dispatched,
)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy(*retry_on: str, attempts: int = 2) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, retry_on=retry_on)


# --- retry conditions ------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 501, 502, 503, 504, 599])
def test_5xx_retries_every_5xx(status: int) -> None:
    assert is_retriable(policy("5xx"), status=status, error_kind=None)


@pytest.mark.parametrize("status", [200, 204, 404, 409, 429, 499])
def test_5xx_does_not_retry_other_statuses(status: int) -> None:
    assert not is_retriable(policy("5xx"), status=status, error_kind=None)


@pytest.mark.parametrize("kind", ["connect-failure", "reset", "timeout", "protocol"])
def test_5xx_gateway_error_and_reset_cover_every_no_response(kind: str) -> None:
    for condition in ("5xx", "gateway-error", "reset"):
        assert is_retriable(policy(condition), status=None, error_kind=kind), condition


def test_gateway_error_is_only_502_503_504() -> None:
    gateway = policy("gateway-error")
    assert [s for s in range(500, 600) if is_retriable(gateway, status=s, error_kind=None)] == [
        502,
        503,
        504,
    ]


def test_reset_does_not_retry_statuses() -> None:
    assert not is_retriable(policy("reset"), status=503, error_kind=None)


def test_connect_failure_only_covers_connect_failures() -> None:
    connect = policy("connect-failure")
    assert is_retriable(connect, status=None, error_kind="connect-failure")
    assert not is_retriable(connect, status=None, error_kind="reset")
    assert not is_retriable(connect, status=None, error_kind="timeout")
    assert not is_retriable(connect, status=503, error_kind=None)


def test_numeric_entries_retry_exactly_those_statuses() -> None:
    numeric = policy("503", "429")
    assert is_retriable(numeric, status=503, error_kind=None)
    assert is_retriable(numeric, status=429, error_kind=None)
    assert not is_retriable(numeric, status=502, error_kind=None)
    assert not is_retriable(numeric, status=None, error_kind="reset")


def test_retriable_status_codes_with_codes_and_retriable_4xx() -> None:
    explicit = policy("retriable-status-codes", "418")
    assert is_retriable(explicit, status=418, error_kind=None)
    assert not is_retriable(policy("retriable-status-codes"), status=418, error_kind=None)
    assert is_retriable(policy("retriable-4xx"), status=409, error_kind=None)
    assert not is_retriable(policy("retriable-4xx"), status=400, error_kind=None)


def test_default_policy_is_istios_connect_failure_reset_503() -> None:
    default = RetryPolicy()
    assert is_retriable(default, status=503, error_kind=None)
    assert not is_retriable(default, status=500, error_kind=None)
    assert is_retriable(default, status=None, error_kind="connect-failure")
    assert is_retriable(default, status=None, error_kind="timeout")  # "reset" covers it


def test_conditions_are_case_and_space_insensitive() -> None:
    assert is_retriable(policy(" 5XX "), status=500, error_kind=None)


def test_is_retriable_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        is_retriable(policy("5xx"), status=None, error_kind=None)
    with pytest.raises(ValueError, match="exactly one"):
        is_retriable(policy("5xx"), status=503, error_kind="reset")
    with pytest.raises(ValueError, match="'exploded'"):
        is_retriable(policy("5xx"), status=None, error_kind="exploded")


def test_unsupported_retry_conditions_are_reported() -> None:
    assert unsupported_retry_conditions(
        ["5xx", "503", "refused-stream", "unavailable", "Gateway-Error"]
    ) == ("refused-stream", "unavailable")


# --- backoff ---------------------------------------------------------------------------


def test_backoff_bounds_double_and_cap() -> None:
    upper = lambda: 0.999999  # noqa: E731 - the largest value rand may return
    assert backoff_delay(1, 0.025, 0.25, upper) == pytest.approx(0.025, rel=1e-5)
    assert backoff_delay(2, 0.025, 0.25, upper) == pytest.approx(0.05, rel=1e-5)
    assert backoff_delay(3, 0.025, 0.25, upper) == pytest.approx(0.1, rel=1e-5)
    assert backoff_delay(4, 0.025, 0.25, upper) == pytest.approx(0.2, rel=1e-5)
    assert backoff_delay(5, 0.025, 0.25, upper) == pytest.approx(0.25, rel=1e-5)
    assert backoff_delay(500, 0.025, 0.25, upper) == pytest.approx(0.25, rel=1e-5)
    assert backoff_delay(3, 0.025, 0.25, lambda: 0.0) == 0.0


def test_backoff_is_fully_jittered_within_bounds() -> None:
    rng = random.Random(42)
    for retry_number in range(1, 8):
        ceiling = min(0.025 * 2 ** (retry_number - 1), 0.25)
        samples = [backoff_delay(retry_number, 0.025, 0.25, rng.random) for _ in range(500)]
        assert all(0.0 <= s < ceiling for s in samples)
        # Fully jittered: the samples spread over the whole interval, not around its top.
        assert min(samples) < ceiling * 0.1
        assert max(samples) > ceiling * 0.9


def test_backoff_is_reproducible_with_a_seed() -> None:
    first = [backoff_delay(n, 0.025, 0.25, random.Random(7).random) for n in range(1, 5)]
    second = [backoff_delay(n, 0.025, 0.25, random.Random(7).random) for n in range(1, 5)]
    assert first == second


def test_backoff_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="retry_number"):
        backoff_delay(0, 0.025, 0.25, random.random)
    with pytest.raises(ValueError, match="base and maximum"):
        backoff_delay(1, -1.0, 0.25, random.random)


# --- retry budget ----------------------------------------------------------------------


def test_budget_limit_arithmetic() -> None:
    budget = RetryBudget()  # 20 %, at least 3
    assert budget.limit(0) == 3
    assert budget.limit(10) == 3  # 20 % of 10 is 2 < 3
    assert budget.limit(15) == 3
    assert budget.limit(20) == 4
    assert budget.limit(24) == 4  # 4.8 truncates, as Envoy's integer resource limit
    assert budget.limit(100) == 20
    assert RetryBudget(budget_percent=50.0, min_retry_concurrency=0).limit(5) == 2
    assert RetryBudget(budget_percent=0.0, min_retry_concurrency=0).limit(1000) == 0


def test_budget_bounds_retries_in_flight() -> None:
    budget = RetryBudget(budget_percent=20.0, min_retry_concurrency=3)
    permits = [budget.try_start_retry(100) for _ in range(20)]
    assert all(permits)
    assert budget.try_start_retry(100) is None
    assert budget.overflows == 1
    # Fewer active requests shrink the allowance to the minimum.
    assert budget.try_start_retry(10) is None
    first = permits[0]
    assert first is not None
    budget.retry_done(first)
    assert budget.retries_in_flight == 19
    assert budget.try_start_retry(100) is not None


def test_budget_release_is_idempotent() -> None:
    budget = RetryBudget(min_retry_concurrency=1)
    permit = budget.try_start_retry(0)
    assert permit is not None
    permit.release()
    permit.release()
    budget.retry_done(permit)
    assert budget.retries_in_flight == 0
    again = budget.try_start_retry(0)
    assert again is not None
    with again:
        assert budget.retries_in_flight == 1
        assert not again.released
    assert budget.retries_in_flight == 0


def test_budget_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="budget_percent"):
        RetryBudget(budget_percent=150.0)
    with pytest.raises(ValueError, match="min_retry_concurrency"):
        RetryBudget(min_retry_concurrency=-1)


# --- retry state -----------------------------------------------------------------------


def test_retry_state_allows_attempts_retries_after_the_first_try() -> None:
    state = RetryState(policy("5xx", attempts=2), rand=random.Random(1).random)
    assert state.attempt == 1
    first = state.decide(status=503)
    assert first.retry and first.outcome is RetryOutcome.RETRY
    assert 0.0 <= first.delay < 0.025
    assert state.attempt == 2
    second = state.decide(error_kind="reset")
    assert second.retry
    assert 0.0 <= second.delay < 0.05
    third = state.decide(status=503)
    assert not third.retry
    assert third.outcome is RetryOutcome.LIMIT_EXCEEDED
    assert state.retries_used == 2


def test_retry_state_stops_on_success_and_non_retriable_failure() -> None:
    state = RetryState(policy("gateway-error"), rand=random.random)
    assert state.decide(status=200).outcome is RetryOutcome.NOT_RETRIABLE
    assert state.decide(status=500).outcome is RetryOutcome.NOT_RETRIABLE
    assert state.retries_used == 0


def test_retry_state_without_policy_or_with_zero_attempts_never_retries() -> None:
    assert RetryState(None, rand=random.random).decide(status=503).outcome is (
        RetryOutcome.NO_POLICY
    )
    zero = RetryState(policy("5xx", attempts=0), rand=random.random)
    assert zero.decide(status=503).outcome is RetryOutcome.LIMIT_EXCEEDED
    with pytest.raises(ValueError, match="attempts"):
        RetryState(policy("5xx", attempts=-1), rand=random.random)


def test_retry_state_holds_a_budget_permit_until_the_retry_completes() -> None:
    budget = RetryBudget(budget_percent=0.0, min_retry_concurrency=1)
    with RetryState(policy("5xx", attempts=3), budget=budget, rand=random.random) as state:
        assert state.decide(status=503, active_requests=1).retry
        assert budget.retries_in_flight == 1
        # Another request cannot retry while this one's retry is in flight.
        other = RetryState(policy("5xx"), budget=budget, rand=random.random)
        assert other.decide(status=503).outcome is RetryOutcome.BUDGET_EXHAUSTED
        assert other.retries_used == 0
        # The retry completed (failing again): its slot is released, a new one taken.
        assert state.decide(status=503, active_requests=1).retry
        assert budget.retries_in_flight == 1
        assert state.decide(status=200).outcome is RetryOutcome.NOT_RETRIABLE
        assert budget.retries_in_flight == 0
        assert state.decide(status=503).retry
    # Leaving the block (e.g. the request was cancelled mid-backoff) gives the slot back.
    assert budget.retries_in_flight == 0
    state.close()
    assert budget.retries_in_flight == 0


def test_retries_cannot_multiply_an_outage() -> None:
    """100 concurrent requests against a dead service: at most 20 % retry at once."""
    budget = RetryBudget()
    retry = policy("5xx", attempts=5)
    states = [RetryState(retry, budget=budget, rand=random.random) for _ in range(100)]
    decisions = [state.decide(status=503, active_requests=100) for state in states]
    assert sum(d.retry for d in decisions) == 20
    assert sum(d.outcome is RetryOutcome.BUDGET_EXHAUSTED for d in decisions) == 80


# --- circuit breaker -------------------------------------------------------------------


def test_unlimited_breaker_admits_everything() -> None:
    breaker = CircuitBreaker(None)
    permits = [breaker.try_acquire_request() for _ in range(5000)]
    assert all(p is not None and p.dispatched for p in permits)
    assert breaker.active_requests == 5000


def test_max_requests_bounds_concurrency() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_requests=2))
    first, second = breaker.try_acquire_request(), breaker.try_acquire_request()
    assert first is not None and second is not None
    assert breaker.try_acquire_request() is None
    assert breaker.overflows["max_requests"] == 1
    first.release()
    assert breaker.try_acquire_request() is not None


def test_istio_circuit_breaking_task_shape() -> None:
    """maxConnections 1 + http1MaxPendingRequests 1: two concurrent requests pass (one
    waiting), the third overflows."""
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, max_pending_requests=1))
    running = breaker.try_acquire_request()
    waiting = breaker.try_acquire_request()
    assert running is not None and running.dispatched
    assert waiting is not None and not waiting.dispatched
    assert breaker.pending_requests == 1
    assert breaker.try_acquire_request() is None
    assert breaker.overflows["max_pending_requests"] == 1
    dispatched: list[str] = []
    waiting.on_dispatch(lambda: dispatched.append("waiting"))
    running.release()
    assert dispatched == ["waiting"] and waiting.dispatched
    assert breaker.pending_requests == 0 and breaker.dispatched_requests == 1
    waiting.release()
    assert breaker.active_requests == 0


def test_pending_requests_are_dispatched_in_order() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1))
    running = breaker.try_acquire_request()
    queued = [breaker.try_acquire_request() for _ in range(3)]
    order: list[int] = []
    for index, permit in enumerate(queued):
        assert permit is not None
        permit.on_dispatch(functools.partial(order.append, index))
    assert running is not None
    running.release()
    assert order == [0]
    first, second = queued[0], queued[1]
    assert first is not None and second is not None
    first.release()
    second.release()
    assert order == [0, 1, 2]


def test_max_requests_counts_pending_requests_too() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, max_requests=2))
    assert breaker.try_acquire_request() is not None
    assert breaker.try_acquire_request() is not None  # pending
    assert breaker.try_acquire_request() is None
    assert breaker.overflows["max_requests"] == 1


def test_raising_the_limit_dispatches_waiting_requests() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=2))
    a, b = breaker.try_acquire_request(), breaker.try_acquire_request()
    c = breaker.try_acquire_request()
    assert a is not None and b is not None and c is not None and not c.dispatched
    # Relaxing the limit dispatches waiting requests at once.
    breaker.reconfigure(ConnectionPool(max_connections=3))
    assert c.dispatched
    assert breaker.pool.max_connections == 3


def test_release_is_idempotent_so_counters_never_go_negative() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, max_pending_requests=5))
    running = breaker.try_acquire_request()
    waiting = breaker.try_acquire_request()
    assert running is not None and waiting is not None
    waiting.release()  # a cancelled request leaves the queue
    waiting.release()
    breaker.release_request(waiting)
    assert breaker.pending_requests == 0
    running.release()
    running.release()
    breaker.release_request(running)
    assert breaker.active_requests == 0 and breaker.dispatched_requests == 0
    calls: list[str] = []
    waiting.on_dispatch(lambda: calls.append("late"))  # released: never dispatched
    assert calls == []
    lease = breaker.connection_opened()
    breaker.connection_closed(lease)
    lease.release()
    assert breaker.open_connections == 0


def test_connection_accounting_and_overflow() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=2))
    first = breaker.connection_opened()
    assert breaker.can_open_connection()
    breaker.connection_opened()
    assert not breaker.can_open_connection()
    breaker.connection_opened()  # a chosen host still gets one, counted as overflow
    assert breaker.open_connections == 3 and breaker.connection_overflows == 1
    first.release()
    assert breaker.open_connections == 2
    snapshot = breaker.snapshot()
    assert snapshot["open_connections"] == 2 and snapshot["connection_overflows"] == 1


def test_max_requests_per_connection() -> None:
    assert CircuitBreaker(ConnectionPool(max_requests_per_connection=1)).should_close_connection(1)
    three = CircuitBreaker(ConnectionPool(max_requests_per_connection=3))
    assert not three.should_close_connection(2)
    assert three.should_close_connection(3)
    assert not CircuitBreaker(None).should_close_connection(10_000)
    unlimited = CircuitBreaker(ConnectionPool(max_requests_per_connection=0))
    assert not unlimited.should_close_connection(10_000)


def test_breaker_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        CircuitBreaker(ConnectionPool(max_connections=0))
    with pytest.raises(ValueError, match="max_requests_per_connection"):
        CircuitBreaker(ConnectionPool(max_requests_per_connection=-1))


async def test_wait_dispatched_wakes_when_a_connection_frees() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1))
    running = breaker.try_acquire_request()
    waiting = breaker.try_acquire_request()
    assert running is not None and waiting is not None
    woke = trio.Event()

    async def waiter() -> None:
        await wait_dispatched(waiting)
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        running.release()
        await woke.wait()
    await wait_dispatched(waiting)  # already dispatched: returns at once
    waiting.release()
    assert breaker.active_requests == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1))
    running = breaker.try_acquire_request()
    waiting = breaker.try_acquire_request()
    assert running is not None and waiting is not None
    with trio.move_on_after(0.01):
        with waiting:
            await wait_dispatched(waiting)
    assert breaker.pending_requests == 0
    running.release()
    assert breaker.active_requests == 0
    with pytest.raises(RuntimeError, match="released"):
        await wait_dispatched(waiting)


# --- outlier detection -----------------------------------------------------------------

ENDPOINTS = [f"ep{i}" for i in range(10)]


def detector(clock: FakeClock, **settings: float) -> OutlierDetector:
    values: dict[str, float] = {
        "consecutive_5xx": 3,
        "interval": 10.0,
        "base_ejection_time": 30.0,
        "max_ejection_percent": 100,
    }
    values.update(settings)
    outlier = OutlierDetection(
        consecutive_5xx=int(values["consecutive_5xx"]),
        interval=values["interval"],
        base_ejection_time=values["base_ejection_time"],
        max_ejection_percent=int(values["max_ejection_percent"]),
    )
    return OutlierDetector(outlier, clock)


def fail(det: OutlierDetector, uid: str, times: int) -> None:
    for _ in range(times):
        det.record(uid, success=False)


def test_consecutive_failures_eject() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.eligible(ENDPOINTS)
    fail(det, "ep1", 2)
    assert not det.is_ejected("ep1")
    det.record("ep1", success=False)
    assert det.is_ejected("ep1")
    assert "ep1" not in det.eligible(ENDPOINTS)
    assert det.ejections_total == 1


def test_a_success_resets_the_count() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.eligible(ENDPOINTS)
    fail(det, "ep1", 2)
    det.record("ep1", success=True)
    fail(det, "ep1", 2)
    assert not det.is_ejected("ep1")


def test_ejection_expires_at_the_first_sweep_after_its_time() -> None:
    clock = FakeClock(0.0)  # sweeps at 0, 10, 20, ...
    det = detector(clock)
    det.eligible(ENDPOINTS)
    clock.advance(3.0)
    fail(det, "ep1", 3)  # ejected at 3 for 30 s: served at 33, returned at the 40 s sweep
    clock.now = 39.999
    assert det.is_ejected("ep1")
    clock.now = 40.0
    assert not det.is_ejected("ep1")
    assert det.eligible(ENDPOINTS) == ENDPOINTS


def test_ejection_time_grows_with_repeated_ejections() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.eligible(ENDPOINTS)
    fail(det, "ep1", 3)  # at 0: 30 s
    assert det.ejected()[0].until == 30.0
    clock.now = 30.0
    assert not det.is_ejected("ep1")
    fail(det, "ep1", 3)  # again before the next sweep: 2 x 30 s
    [second] = det.ejected()
    assert (second.multiplier, second.until, second.times_ejected) == (2, 90.0, 2)
    clock.now = 90.0
    fail(det, "ep1", 3)  # 3 x 30 s
    assert det.ejected()[0].until == 180.0
    clock.now = 179.0
    assert det.is_ejected("ep1")
    clock.now = 180.0
    assert not det.is_ejected("ep1")


def test_healthy_sweeps_shrink_the_multiplier() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.eligible(ENDPOINTS)
    fail(det, "ep1", 3)
    clock.now = 30.0
    fail(det, "ep1", 3)  # multiplier 2, back at 90
    clock.now = 110.0  # sweeps at 100 and 110 passed healthy: 2 - 2 = 0, then +1
    fail(det, "ep1", 3)
    [ejection] = det.ejected()
    assert ejection.multiplier == 1 and ejection.until == 140.0


def test_ejection_time_is_capped() -> None:
    clock = FakeClock(0.0)
    det = detector(clock, interval=1.0, base_ejection_time=100.0)
    det.eligible(ENDPOINTS)
    untils, multipliers = [], []
    for _ in range(6):
        fail(det, "ep1", 3)
        [ejection] = det.ejected()
        untils.append(ejection.until - clock.now)
        multipliers.append(ejection.multiplier)
        clock.now = ejection.until
    assert untils == [100.0, 200.0, 300.0, 300.0, 300.0, 300.0]
    # Envoy stops growing the multiplier once it passes the cap, so recovery stays quick.
    assert multipliers == [1, 2, 3, 4, 4, 4]


def test_max_ejection_percent_refuses_the_new_ejection() -> None:
    clock = FakeClock(0.0)
    det = detector(clock, max_ejection_percent=20)
    det.eligible(ENDPOINTS)  # 10 endpoints
    fail(det, "ep0", 3)  # 0 % ejected < 20: ejected
    fail(det, "ep1", 3)  # 10 % < 20: ejected
    fail(det, "ep2", 3)  # 20 % is not below 20: refused
    assert [e.endpoint_uid for e in det.ejected()] == ["ep0", "ep1"]
    assert det.ejections_overflow == 1
    assert not det.is_ejected("ep2")
    # Once ep0 returns there is room again.
    clock.now = 30.0
    fail(det, "ep2", 3)
    assert det.is_ejected("ep2")


def test_envoy_always_allows_one_ejection() -> None:
    """Envoy compares the share before ejecting, so even 10 % of 3 hosts ejects one."""
    clock = FakeClock(0.0)
    det = detector(clock, max_ejection_percent=10)
    det.eligible(["a", "b", "c"])
    fail(det, "a", 3)
    fail(det, "b", 3)
    assert det.is_ejected("a") and not det.is_ejected("b")
    zero = detector(clock, max_ejection_percent=0)
    zero.eligible(["a", "b", "c"])
    fail(zero, "a", 3)
    assert not zero.is_ejected("a")


def test_never_all_ejected_single_endpoint_panics_to_it() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    assert det.eligible([]) == []
    det.eligible(["only"])
    fail(det, "only", 3)
    assert det.is_ejected("only")
    assert det.eligible(["only"]) == ["only"]


def test_never_empty_even_with_every_endpoint_ejected() -> None:
    clock = FakeClock(0.0)
    det = detector(clock, max_ejection_percent=100)
    det.eligible(ENDPOINTS)
    for uid in ENDPOINTS:
        fail(det, uid, 3)
    assert len(det.ejected()) == 10
    assert det.eligible(ENDPOINTS) == ENDPOINTS


def test_panic_threshold_uses_every_endpoint_when_too_few_are_healthy() -> None:
    clock = FakeClock(0.0)
    outlier = OutlierDetection(consecutive_5xx=1, max_ejection_percent=100)
    det = OutlierDetector(outlier, clock, panic_threshold_percent=50.0)
    endpoints = ["a", "b", "c", "d"]
    det.eligible(endpoints)
    det.record("a", success=False)
    det.record("b", success=False)
    assert det.eligible(endpoints) == ["c", "d"]  # 50 % healthy is not below 50
    det.record("c", success=False)
    assert det.eligible(endpoints) == endpoints  # 25 % < 50: panic


def test_consecutive_5xx_zero_disables_detection() -> None:
    clock = FakeClock(0.0)
    det = OutlierDetector(OutlierDetection(consecutive_5xx=0), clock)
    fail(det, "a", 100)
    assert not det.is_ejected("a")


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.eligible(ENDPOINTS)
    fail(det, "ep1", 3)
    clock.now = 5.0
    fail(det, "ep1", 6)  # in-flight requests failing after the ejection
    [ejection] = det.ejected()
    assert (ejection.times_ejected, ejection.until) == (1, 30.0)


def test_each_detection_starts_a_fresh_count() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.eligible(ENDPOINTS)
    fail(det, "ep1", 3)
    clock.now = 30.0
    assert not det.is_ejected("ep1")
    fail(det, "ep1", 2)  # a new bout needs the full three again
    assert not det.is_ejected("ep1")
    det.record("ep1", success=False)
    assert det.is_ejected("ep1")


def test_retain_forgets_departed_endpoints() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.eligible(["a", "b"])
    fail(det, "a", 3)
    det.retain(["b"])
    assert not det.is_ejected("a")
    assert det.ejected() == []


def test_reconfigure_and_bad_policies() -> None:
    clock = FakeClock(0.0)
    det = detector(clock)
    det.reconfigure(OutlierDetection(consecutive_5xx=1))
    det.record("a", success=False)
    assert det.is_ejected("a")
    with pytest.raises(ValueError, match="interval"):
        OutlierDetector(OutlierDetection(interval=0.0), clock)
    with pytest.raises(ValueError, match="max_ejection_percent"):
        OutlierDetector(OutlierDetection(max_ejection_percent=101), clock)
    with pytest.raises(ValueError, match="base_ejection_time"):
        OutlierDetector(OutlierDetection(base_ejection_time=-1.0), clock)
    with pytest.raises(ValueError, match="panic_threshold_percent"):
        OutlierDetector(OutlierDetection(), clock, panic_threshold_percent=-1.0)


def test_what_counts_as_an_outlier_failure() -> None:
    assert is_outlier_failure(status=500, error_kind=None)
    assert is_outlier_failure(status=503, error_kind=None)
    assert is_outlier_failure(status=None, error_kind="connect-failure")
    assert is_outlier_failure(status=None, error_kind="reset")
    assert not is_outlier_failure(status=404, error_kind=None)
    assert not is_outlier_failure(status=200, error_kind=None)


# --- token bucket ----------------------------------------------------------------------


def test_bucket_starts_full_and_empties() -> None:
    clock = FakeClock()
    bucket = TokenBucket(max_tokens=3, tokens_per_fill=1, fill_interval=1.0, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_exactly_at_interval_boundaries() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(max_tokens=2, tokens_per_fill=1, fill_interval=0.1, clock=clock)
    assert bucket.try_take() and bucket.try_take() and not bucket.try_take()
    clock.now = 0.0999
    assert not bucket.try_take()
    clock.now = 0.1
    assert bucket.try_take()
    assert not bucket.try_take()
    clock.now = 0.3  # 0.1 + 0.2 in floating point; two more fills
    assert bucket.tokens == 2
    # Fills are counted from creation, not from the last take.
    clock.now = 0.35
    assert bucket.try_take() and bucket.try_take() and not bucket.try_take()
    clock.now = 0.4
    assert bucket.tokens == 1


def test_bucket_fills_on_its_own_schedule_not_when_observed() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(max_tokens=4, tokens_per_fill=1, fill_interval=1.0, clock=clock)
    for _ in range(4):
        assert bucket.try_take()
    clock.now = 1.5  # one fill (at 1.0), seen half an interval late
    assert bucket.tokens == 1
    clock.now = 2.0  # the next fill is due at 2.0, not at 2.5
    assert bucket.tokens == 2


def test_bucket_never_exceeds_max_tokens() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(max_tokens=5, tokens_per_fill=3, fill_interval=1.0, clock=clock)
    for _ in range(5):
        assert bucket.try_take()
    clock.advance(1.0)
    assert bucket.tokens == 3
    clock.advance(1.0)
    assert bucket.tokens == 5  # 6 capped
    clock.advance(1000.0)
    assert bucket.tokens == 5


def test_bucket_from_rate_limit_and_validation() -> None:
    clock = FakeClock()
    limit = RateLimit("rl", "default", ("default/svc",), 10, 10, 60.0)
    bucket = TokenBucket.from_rate_limit(limit, clock)
    assert bucket.tokens == 10
    bad = RateLimit("rl", "default", ("default/svc",), 0, 10, 60.0)
    with pytest.raises(ValueError, match="default/rl: rate limit max_tokens"):
        TokenBucket.from_rate_limit(bad, clock)
    with pytest.raises(ValueError, match="fill_interval"):
        TokenBucket(1, 1, 0.0, clock)
    with pytest.raises(ValueError, match="tokens_per_fill"):
        TokenBucket(1, 0, 1.0, clock)
