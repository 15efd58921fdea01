"""Consecutive-5xx outlier detection of a DestinationRule's ``outlierDetection``, as Envoy
ejects and returns endpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ambient_api.l7 import OutlierDetection
from waypoint.resilience.clock import BOUNDARY_SLACK, Clock

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
        index = math.ceil(self._sweep_index(t) - BOUNDARY_SLACK)
        return self._origin + index * self._policy.interval

    def _sweeps_after_until(self, after: float, until: float) -> int:
        """How many sweeps fall in (after, until]."""
        first = math.floor(self._sweep_index(after) + BOUNDARY_SLACK)
        last = math.floor(self._sweep_index(until) + BOUNDARY_SLACK)
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
