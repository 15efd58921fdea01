"""One HTTP request through the waypoint, in Istio/Envoy's order:

JWT -> authorization -> rate limit -> route (redirect, fault, rewrite, headers, mirrors) ->
circuit breaker -> endpoint choice (outlier-aware) -> upstream tries with budgeted retries ->
response filters. Each step is a module of its own (``jwt``, ``authz``, ``resilience``,
``routing``); this module only sequences them and turns their verdicts into responses and
Envoy response flags. ``RequestPipeline.handle`` never raises for a request's fault.
The path is normalized first (``paths``): every step sees the one path that is forwarded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from ambient_api import l7
from ambient_api.identity import SpiffeId
from ambient_api.model import Service, Workload, WorkloadStatus
from ambient_dataplane.state import ProxyState, identity_of
from waypoint.authz import RequestAttributes, evaluate
from waypoint.http import HttpRequest, HttpResponse, error_response
from waypoint.jwt import JwtError, JwtResult, JwtValidator
from waypoint.paths import PathNormalization, PathRejected, normalize_target
from waypoint.resilience import (
    CircuitBreaker,
    OutlierDetector,
    RetryBudget,
    RetryState,
    TokenBucket,
    is_outlier_failure,
    wait_dispatched,
)
from waypoint.routing import (
    NoRouteMatched,
    PassThrough,
    Selection,
    apply_response_edits,
    attached_accepted_routes,
    choose_backend,
    fault_decision,
    mirror_targets,
    redirect_for,
    request_edits,
    response_header_edits,
    route_problems,
    route_request,
)
from waypoint.upstream import HttpUpstream, UpstreamError

log = structlog.get_logger("waypoint")

# Envoy's response flags, as dashboards know them.
FLAG_RBAC = "RBAC"
FLAG_RATE_LIMITED = "RL"
FLAG_OVERFLOW = "UO"
FLAG_NO_HEALTHY_UPSTREAM = "UH"
FLAG_CONNECT_FAILURE = "UF"
FLAG_RESET = "UR"
FLAG_TIMEOUT = "UT"
FLAG_RETRY_LIMIT = "URX"
FLAG_NO_ROUTE = "NR"
FLAG_UNAUTHENTICATED = "UAEX"

# Envoy prints the flags of one request in this fixed order (its ResponseFlag enum), not in
# the order they happened: "UT,URX", never "URX,UT". Flags it does not know go last.
_ENVOY_FLAG_ORDER = (
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE",
    "DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF",
    "DO", "DR",
)
_ENVOY_FLAG_RANK = {flag: rank for rank, flag in enumerate(_ENVOY_FLAG_ORDER)}

_MAX_MIRRORS_IN_FLIGHT = 64
# Istio's default retry policy for mesh traffic, used when a route sets none.
DEFAULT_RETRY = l7.RetryPolicy()


@dataclass(frozen=True)
class Target:
    """What the CONNECT addressed: a Service (VIP) or a single Workload (pod IP)."""

    port: int  # the port the client addressed (the service port for a Service)
    service: Service | None = None
    workload: Workload | None = None


@dataclass(frozen=True)
class Caller:
    identity: SpiffeId | None
    ip: str
    workload: Workload | None


@dataclass
class Outcome:
    """What telemetry needs to know about how a request was served."""

    response_flags: list[str] = field(default_factory=list)
    endpoint: Workload | None = None
    backend_service: Service | None = None
    route_name: str | None = None
    upstream_host: str | None = None

    @property
    def flags(self) -> str:
        unique = dict.fromkeys(self.response_flags)
        ordered = sorted(unique, key=lambda f: _ENVOY_FLAG_RANK.get(f, len(_ENVOY_FLAG_ORDER)))
        return ",".join(ordered) or "-"


class ServiceResilience:
    """The per-destination-service state the traffic policy governs."""

    def __init__(self, policy: l7.TrafficPolicy | None) -> None:
        self.breaker = CircuitBreaker(policy.connection_pool if policy else None)
        self.outliers: OutlierDetector | None = None
        self.budget = RetryBudget()
        self.next_endpoint = 0
        self.reconfigure(policy)

    def reconfigure(self, policy: l7.TrafficPolicy | None) -> None:
        self.breaker.reconfigure(policy.connection_pool if policy else None)
        detection = policy.outlier_detection if policy else None
        if detection is None:
            self.outliers = None
        elif self.outliers is None:
            self.outliers = OutlierDetector(detection, trio.current_time)
        else:
            self.outliers.reconfigure(detection)


@dataclass(frozen=True)
class _TargetConfig:
    """The L7 resources that apply to requests for one target, in the state's order."""

    jwt: JwtValidator
    authorizations: tuple[l7.WaypointAuthorization, ...]
    rate_limits: tuple[l7.RateLimit, ...]  # the usable ones
    routes: tuple[l7.HttpRoute, ...]  # accepted routes attached to the service or waypoint


class _ConfigIndex:
    """One state generation's L7 resources by target: the scans, validation and JWT
    validators done once per config change (and per target on its first request), not per
    request. A target is the addressed service's key (None for a workload) plus the
    waypoint's own key."""

    def __init__(self, state: ProxyState, waypoint_key: str) -> None:
        self.generation = state.generation
        self._waypoint_key = waypoint_key
        self._jwt_policies: list[l7.JwtPolicy] = state.resources("jwtpolicy")
        self._authorizations: list[l7.WaypointAuthorization] = state.resources(
            "waypointauthorization"
        )
        self._rate_limits = [limit for limit in state.resources("ratelimit")
                             if _usable_rate_limit(limit)]
        self._routes: list[l7.HttpRoute] = []  # the accepted ones (Gateway API Accepted)
        for route in state.resources("httproute"):
            if problems := route_problems(route):
                log.warning("route not accepted", route=route.key, problems=list(problems))
            else:
                self._routes.append(route)
        self._validators: dict[tuple[str, ...], JwtValidator] = {}
        self._targets: dict[str | None, _TargetConfig] = {}

    def for_service(self, service_key: str | None) -> _TargetConfig:
        config = self._targets.get(service_key)
        if config is None:
            config = self._targets[service_key] = self._build(service_key)
        return config

    def _build(self, service_key: str | None) -> _TargetConfig:
        keys = {self._waypoint_key} if service_key is None else {self._waypoint_key, service_key}
        jwt_policies = [p for p in self._jwt_policies if not keys.isdisjoint(p.targets)]
        validator_key = tuple(sorted(p.key for p in jwt_policies))
        validator = self._validators.get(validator_key)
        if validator is None:  # one per distinct policy set, so problems are logged once
            validator = self._validators[validator_key] = JwtValidator(jwt_policies)
        return _TargetConfig(
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


class RequestPipeline:
    def __init__(
        self,
        *,
        state: ProxyState,
        waypoint_key: str,
        upstream: HttpUpstream,
        nursery: trio.Nursery,
        rand: random.Random | None = None,
        path_normalization: PathNormalization = PathNormalization.BASE,
    ) -> None:
        self._state = state
        self._path_normalization = path_normalization
        self._waypoint_key = waypoint_key
        self._upstream = upstream
        self._nursery = nursery  # where mirrored requests run, detached from the primary
        self._rand = rand or random.Random()
        self._services: dict[str, ServiceResilience] = {}
        self._buckets: dict[str, tuple[l7.RateLimit, TokenBucket]] = {}
        self._index: _ConfigIndex | None = None
        self._mirrors_in_flight = 0

    # -- configuration -------------------------------------------------------------------

    def config_changed(self) -> None:
        """Re-read policies: rebuild the per-target index (rejected routes and rate limits
        are logged here, once); keep counters and buckets whose configuration is unchanged."""
        self._index = _ConfigIndex(self._state, self._waypoint_key)
        policies = {p.host: p for p in self._state.resources("trafficpolicy")}
        for key, resilience in self._services.items():
            resilience.reconfigure(policies.get(key))
        limits = {limit.key: limit for limit in self._state.resources("ratelimit")}
        self._buckets = {
            key: entry for key, entry in self._buckets.items() if limits.get(key) == entry[0]
        }

    def _resilience(self, service_key: str) -> ServiceResilience:
        resilience = self._services.get(service_key)
        if resilience is None:
            policy = next(
                (p for p in self._state.resources("trafficpolicy") if p.host == service_key),
                None,
            )
            resilience = self._services[service_key] = ServiceResilience(policy)
        return resilience

    def _config_for(self, target: Target) -> _TargetConfig:
        """The index of the current state; rebuilt here too if the state changed without a
        ``config_changed`` call (or before the first)."""
        if self._index is None or self._index.generation != self._state.generation:
            self._index = _ConfigIndex(self._state, self._waypoint_key)
        return self._index.for_service(target.service.key if target.service else None)

    # -- the pipeline --------------------------------------------------------------------

    async def handle(
        self, request: HttpRequest, target: Target, caller: Caller, outcome: Outcome,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> HttpResponse:
        try:  # the one path that is authorized, routed and forwarded
            request = request.replace(
                target=normalize_target(request.target, self._path_normalization))
        except PathRejected as rejection:
            return error_response(400, rejection.reason)
        config = self._config_for(target)
        try:
            jwt = config.jwt.validate(request.headers)
        except JwtError as error:
            outcome.response_flags.append(FLAG_UNAUTHENTICATED)
            response = error_response(401, f"Jwt verification fails: {error.reason}")
            return response.with_headers(
                set=[("www-authenticate", JwtError.www_authenticate(request.authority))]
            )
        if jwt.headers_to_add or jwt.headers_to_remove:
            request = request.with_headers(set=jwt.headers_to_add, remove=jwt.headers_to_remove)
        denial = self._authorize(request, target, caller, jwt, config.authorizations)
        if denial is not None:
            outcome.response_flags.append(FLAG_RBAC)
            return error_response(403, "RBAC: access denied")
        if not self._rate_limit_allows(config.rate_limits):
            outcome.response_flags.append(FLAG_RATE_LIMITED)
            return error_response(429, "local_rate_limited")
        return await self._route(request, target, caller, outcome, extra_headers, config.routes)

    def _authorize(
        self, request: HttpRequest, target: Target, caller: Caller, jwt: JwtResult,
        policies: tuple[l7.WaypointAuthorization, ...],
    ) -> str | None:
        if not policies:
            return None
        decision = evaluate(policies, RequestAttributes(
            source_ip=caller.ip,
            source_identity=caller.identity,
            destination_port=target.port,
            host=request.authority,
            method=request.method,
            path=request.target,
            headers=(*request.headers, ("host", request.authority)),
            request_principal=jwt.principal,
            claims=jwt.claims,
        ))
        for audited in decision.audited:
            log.info("request audited", policy=audited, method=request.method,
                     path=request.path, source=str(caller.identity))
        if decision.allowed:
            return None
        log.info("request denied", reason=decision.reason, method=request.method,
                 path=request.path, source=str(caller.identity))
        return decision.reason

    def _rate_limit_allows(self, limits: tuple[l7.RateLimit, ...]) -> bool:
        """Every limit takes a token (as Envoy's filters each do); all must have one."""
        allowed = True
        for limit in limits:
            entry = self._buckets.get(limit.key)
            if entry is None:
                bucket = TokenBucket.from_rate_limit(limit, trio.current_time)
                entry = self._buckets[limit.key] = (limit, bucket)
            allowed = entry[1].try_take() and allowed
        return allowed

    async def _route(
        self, request: HttpRequest, target: Target, caller: Caller, outcome: Outcome,
        extra_headers: tuple[tuple[str, str], ...], candidates: tuple[l7.HttpRoute, ...],
    ) -> HttpResponse:
        routes = attached_accepted_routes(
            candidates,
            service_key=target.service.key if target.service else None,
            waypoint_key=self._waypoint_key,
            host=request.authority,
            source_namespace=caller.identity.namespace if caller.identity else None,
        )
        decision = route_request(routes, request)
        if isinstance(decision, NoRouteMatched):
            outcome.response_flags.append(FLAG_NO_ROUTE)
            return error_response(decision.status, "no route matched")
        selection: Selection | None = None
        if isinstance(decision, PassThrough):
            backend = self._addressed_backend(target)
            rule: l7.RouteRule | None = None
        else:
            selection, rule = decision, decision.rule
            outcome.route_name = decision.route.key
            redirect = redirect_for(decision, request, listener_port=target.port)
            if redirect is not None:
                return redirect.response()
            fault = fault_decision(rule.fault, self._rand.random)
            if fault.delay is not None:
                outcome.response_flags.append("DI")
                await trio.sleep(fault.delay)
            if fault.abort_status is not None:
                outcome.response_flags.append("FI")
                return error_response(fault.abort_status, "fault filter abort")
            request = request_edits(decision, request).apply(request)
            for mirror in mirror_targets(rule, self._rand.random):
                self._mirror(request, mirror, caller, extra_headers)
            backend = choose_backend(rule, self._rand.random)
        if backend is None:
            outcome.response_flags.append(FLAG_NO_ROUTE)
            return error_response(500, "the route has no backend with a weight above zero")
        response = await self._forward(request, backend, target, rule, outcome, extra_headers)
        if selection is not None:
            response = apply_response_edits(response, response_header_edits(selection))
        return response

    def _addressed_backend(self, target: Target) -> l7.BackendRef | None:
        if target.service is not None:
            return l7.BackendRef(target.service.key, target.port)
        return None  # a workload target is forwarded in _forward without a backend service

    # -- upstream ------------------------------------------------------------------------

    async def _forward(
        self,
        request: HttpRequest,
        backend: l7.BackendRef,
        target: Target,
        rule: l7.RouteRule | None,
        outcome: Outcome,
        extra_headers: tuple[tuple[str, str], ...],
    ) -> HttpResponse:
        service = self._state.service(backend.service)
        if service is None:
            outcome.response_flags.append(FLAG_NO_ROUTE)
            return error_response(500, f"backend service {backend.service} does not exist")
        outcome.backend_service = service
        port = next((p for p in service.ports if p.service_port == backend.port), None)
        if port is None:
            outcome.response_flags.append(FLAG_NO_ROUTE)
            return error_response(500, f"backend service {service.hostname} has no port "
                                       f"{backend.port}")
        target_port = port.target_port or port.service_port
        resilience = self._resilience(service.key)
        permit = resilience.breaker.try_acquire_request()
        if permit is None:
            outcome.response_flags.append(FLAG_OVERFLOW)
            return error_response(503, "upstream connect error or disconnect/reset before "
                                       "headers. reset reason: overflow")
        with permit:
            await wait_dispatched(permit)
            total = rule.timeout if rule and rule.timeout else None
            with trio.move_on_after(total if total else float("inf")) as deadline:
                return await self._tries(request, service, target_port, rule, resilience,
                                         outcome, extra_headers)
            assert deadline.cancelled_caught
            outcome.response_flags.append(FLAG_TIMEOUT)
            return error_response(504, "upstream request timeout")

    def _pick_endpoint(
        self, service: Service, resilience: ServiceResilience, avoid: set[str]
    ) -> Workload | None:
        endpoints = [
            w for w in self._state.endpoints(service.key)
            if w.status is WorkloadStatus.HEALTHY and w.addresses
        ]
        if not endpoints:
            return None
        if resilience.outliers is not None:
            eligible = set(resilience.outliers.eligible([w.uid for w in endpoints]))
            endpoints = [w for w in endpoints if w.uid in eligible]
        fresh = [w for w in endpoints if w.uid not in avoid] or endpoints
        resilience.next_endpoint += 1
        return fresh[resilience.next_endpoint % len(fresh)]

    async def _tries(
        self,
        request: HttpRequest,
        service: Service,
        target_port: int,
        rule: l7.RouteRule | None,
        resilience: ServiceResilience,
        outcome: Outcome,
        extra_headers: tuple[tuple[str, str], ...],
    ) -> HttpResponse:
        policy = rule.retry if rule and rule.retry is not None else DEFAULT_RETRY
        per_try = (rule.backend_timeout if rule else None) or policy.per_try_timeout
        tried: set[str] = set()
        with RetryState(policy, budget=resilience.budget, rand=self._rand.random) as retries:
            while True:
                endpoint = self._pick_endpoint(service, resilience, tried)
                if endpoint is None:
                    outcome.response_flags.append(FLAG_NO_HEALTHY_UPSTREAM)
                    return error_response(503, "no healthy upstream")
                tried.add(endpoint.uid)
                outcome.endpoint = endpoint
                outcome.upstream_host = f"{endpoint.addresses[0]}:{target_port}"
                status: int | None = None
                error: UpstreamError | None = None
                try:
                    response = await self._upstream.send(
                        request, endpoint.addresses[0], target_port, identity_of(endpoint),
                        timeout=per_try, extra_headers=extra_headers,
                        service_host=service.hostname,
                    )
                    status = response.status
                except UpstreamError as exc:
                    error = exc
                    log.info("upstream try failed", endpoint=outcome.upstream_host,
                             kind=exc.kind, reason=exc.reason, attempt=retries.attempt)
                if resilience.outliers is not None:
                    resilience.outliers.record(endpoint.uid, success=not is_outlier_failure(
                        status=status, error_kind=error.kind if error else None))
                decision = retries.decide(
                    status=status, error_kind=error.kind if error else None,
                    active_requests=resilience.breaker.active_requests,
                )
                if decision.retry:
                    await trio.sleep(decision.delay)
                    continue
                if retries.retries_used and decision.outcome.value == "limit-exceeded":
                    outcome.response_flags.append(FLAG_RETRY_LIMIT)
                if error is None:
                    return response
                return _error_for(error, outcome)

    # -- mirroring -----------------------------------------------------------------------

    def _mirror(
        self, request: HttpRequest, mirror: l7.RequestMirror, caller: Caller,
        extra_headers: tuple[tuple[str, str], ...],
    ) -> None:
        """Fire and forget: the copy runs detached, is bounded in number, and its outcome
        never reaches the primary request (Envoy's shadowing)."""
        if self._mirrors_in_flight >= _MAX_MIRRORS_IN_FLIGHT:
            log.warning("mirror dropped: too many in flight", service=mirror.service)
            return
        host, _, port = request.authority.partition(":")
        shadow = request.replace(authority=f"{host}-shadow" + (f":{port}" if port else ""))
        self._mirrors_in_flight += 1
        self._nursery.start_soon(self._send_mirror, shadow, mirror, extra_headers)

    async def _send_mirror(
        self, request: HttpRequest, mirror: l7.RequestMirror,
        extra_headers: tuple[tuple[str, str], ...],
    ) -> None:
        try:
            service = self._state.service(mirror.service)
            if service is None:
                log.info("mirror skipped: no such service", service=mirror.service)
                return
            port = next((p for p in service.ports if p.service_port == mirror.port), None)
            endpoint = self._pick_endpoint(service, self._resilience(service.key), set())
            if port is None or endpoint is None:
                log.info("mirror skipped: no endpoint", service=mirror.service)
                return
            with trio.move_on_after(30):
                await self._upstream.send(
                    request, endpoint.addresses[0], port.target_port or port.service_port,
                    identity_of(endpoint), timeout=10.0, extra_headers=extra_headers,
                    service_host=service.hostname,
                )
        except UpstreamError as error:
            log.info("mirror failed", service=mirror.service, reason=error.reason)
        except Exception:
            log.exception("mirror failed", service=mirror.service)
        finally:
            self._mirrors_in_flight -= 1

    def dump(self) -> dict[str, Any]:
        return {
            key: {
                "circuit_breaker": r.breaker.snapshot(),
                "retry_budget_overflows": r.budget.overflows,
                "ejected": [str(e) for e in r.outliers.ejected()] if r.outliers else [],
            }
            for key, r in sorted(self._services.items())
        }


def _error_for(error: UpstreamError, outcome: Outcome) -> HttpResponse:
    if error.kind == "timeout":
        outcome.response_flags.append(FLAG_TIMEOUT)
        return error_response(504, "upstream request timeout")
    if error.kind == "reset":
        outcome.response_flags.append(FLAG_RESET)
        return error_response(503, f"upstream reset: {error.reason}")
    outcome.response_flags.append(FLAG_CONNECT_FAILURE)
    return error_response(503, f"upstream connect error: {error.reason}")

