"""The L7 policy that governs one request target, worked out once per state generation.

A target is what a CONNECT addressed: a service (its key) or a workload (None), and the
waypoint itself. ``ConfigIndex`` scans the state's JWT policies, authorizations, rate limits
and routes once per config change, logs the ones it cannot use (once), and hands the
pipeline each target's share as a ``TargetConfig`` on its first request.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from ambient_api import l7
from ambient_dataplane.state import ProxyState
from waypoint.jwt import JwtValidator
from waypoint.resilience import TokenBucket
from waypoint.routing import route_problems

log = structlog.get_logger("waypoint")


@dataclass(frozen=True)
class TargetConfig:
    """The L7 resources that apply to requests for one target, in the state's order."""

    jwt: JwtValidator
    authorizations: tuple[l7.WaypointAuthorization, ...]
    rate_limits: tuple[l7.RateLimit, ...]  # the usable ones
    routes: tuple[l7.HttpRoute, ...]  # accepted routes attached to the service or waypoint


class ConfigIndex:
    """One state generation's L7 resources by target: the scans, validation and JWT
    validators done once per config change (and per target on its first request), not per
    request. A target is the addressed service's key (None for a workload) plus the
    waypoint's own key."""

    def __init__(self, state: ProxyState, waypoint_key: str) -> None:
        self.generation = state.generation
        self._waypoint_key = waypoint_key
        self._jwt_policies = state.resources_of(l7.JwtPolicy)
        self._authorizations = state.resources_of(l7.WaypointAuthorization)
        self._rate_limits = [limit for limit in state.resources_of(l7.RateLimit)
                             if _usable_rate_limit(limit)]
        self._routes: list[l7.HttpRoute] = []  # the accepted ones (Gateway API Accepted)
        for route in state.resources_of(l7.HttpRoute):
            if problems := route_problems(route):
                log.warning("route not accepted", route=route.key, problems=list(problems))
            else:
                self._routes.append(route)
        self._validators: dict[tuple[str, ...], JwtValidator] = {}
        self._targets: dict[str | None, TargetConfig] = {}

    def for_service(self, service_key: str | None) -> TargetConfig:
        config = self._targets.get(service_key)
        if config is None:
            config = self._targets[service_key] = self._build(service_key)
        return config

    def _build(self, service_key: str | None) -> TargetConfig:
        keys = {self._waypoint_key} if service_key is None else {self._waypoint_key, service_key}
        jwt_policies = [p for p in self._jwt_policies if not keys.isdisjoint(p.targets)]
        validator_key = tuple(sorted(p.key for p in jwt_policies))
        validator = self._validators.get(validator_key)
        if validator is None:  # one per distinct policy set, so problems are logged once
            validator = self._validators[validator_key] = JwtValidator(jwt_policies)
        return TargetConfig(
            jwt=validator,
            authorizations=tuple(
                p for p in self._authorizations if not keys.isdisjoint(p.targets)
            ),
            rate_limits=tuple(
                limit for limit in self._rate_limits if not keys.isdisjoint(limit.targets)
            ),
            routes=tuple(route for route in self._routes if not keys.isdisjoint(route.parents)),
        )


def _usable_rate_limit(limit: l7.RateLimit) -> bool:
    try:
        TokenBucket.from_rate_limit(limit, lambda: 0.0)  # validates; the bucket is made later
    except ValueError as error:
        log.warning("rate limit ignored", reason=str(error))
        return False
    return True
