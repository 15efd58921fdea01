"""One HTTP request through the waypoint, in Istio/Envoy's order:

JWT -> authorization -> rate limit -> route (redirect, fault, rewrite, headers, mirrors) ->
circuit breaker -> endpoint choice (outlier-aware) -> upstream tries with budgeted retries ->
response filters. Each step's rules are a module of their own (``jwt``, ``authz``,
``resilience``, ``routing``; ``target_config`` says which policies apply); this module only
sequences them. Every stage returns a typed verdict: ``Continue`` (with what later stages
need) or ``Respond`` (the waypoint answers, with its Envoy response flags); the upstream
stage returns ``Forwarded``. Only the driver, ``RequestPipeline.handle``, assembles the
request's ``Outcome`` from them; it never raises for a request's fault. The path is
normalized first (``paths``): every stage sees the one path that is forwarded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
import trio

from ambient_api import l7
from ambient_api.identity import SpiffeId
from ambient_api.model import Service, Workload, WorkloadStatus
from ambient_dataplane.labels import ResponseFlag, format_response_flags
from ambient_dataplane.state import ProxyState, identity_of
from waypoint.authz import RequestAttributes, evaluate
from waypoint.http import HttpRequest, HttpResponse, error_response
from waypoint.jwt import JwtError, JwtResult, JwtValidator
from waypoint.paths import PathNormalization, PathRejected, normalize_target
from waypoint.resilience import (
    CircuitBreaker,
    OutlierDetector,
    RetryBudget,
    RetryOutcome,
    RetryState,
    TokenBucket,
    is_outlier_failure,
    wait_dispatched,
)
from waypoint.routing import (
    NO_BACKEND_STATUS,
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
    route_request,
)
from waypoint.target_config import ConfigIndex, TargetConfig
from waypoint.upstream import HttpUpstream, UpstreamError

log = structlog.get_logger("waypoint")

T = TypeVar("T")

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


@dataclass(frozen=True)
class Outcome:
    """What telemetry needs to know about how a request was served."""

    response_flags: tuple[ResponseFlag, ...] = ()
    endpoint: Workload | None = None
    backend_service: Service | None = None
    route_name: str | None = None
    upstream_host: str | None = None

    @property
    def flags(self) -> str:
        """The ``response_flags`` label: Envoy's order, "-" for none."""
        return format_response_flags(self.response_flags)


@dataclass(frozen=True)
class Continue(Generic[T]):
    """A stage lets the request go on: ``value`` is what it hands the later stages,
    ``flags`` what it noted on the way (an injected delay)."""

    value: T
    flags: tuple[ResponseFlag, ...] = ()


@dataclass(frozen=True)
class Respond:
    """A stage answers the request itself: nothing (more) goes upstream."""

    response: HttpResponse
    flags: tuple[ResponseFlag, ...] = ()

    @classmethod
    def error(cls, status: int, message: str, *flags: ResponseFlag) -> Respond:
        return cls(error_response(status, message), flags)


@dataclass(frozen=True)
class Forwarded:
    """The upstream stage's result: the response to send (the upstream's, or the waypoint's
    own when it could not forward) and where the request went."""

    response: HttpResponse
    flags: tuple[ResponseFlag, ...] = ()
    backend_service: Service | None = None
    endpoint: Workload | None = None
    upstream_host: str | None = None


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


class RequestPipeline:
    """The waypoint's HTTP handling for every tunnel: the stages in order, and what they keep
    across requests (per-service resilience, rate-limit buckets, the per-target policy)."""

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
        self._index: ConfigIndex | None = None
        self._mirrors_in_flight = 0

    # -- configuration -------------------------------------------------------------------

    def config_changed(self) -> None:
        """Re-read policies: rebuild the per-target index (rejected routes and rate limits
        are logged here, once); keep counters and buckets whose configuration is unchanged,
        and outlier records only of endpoints still in their service."""
        self._index = ConfigIndex(self._state, self._waypoint_key)
        policies = {p.host: p for p in self._state.resources_of(l7.TrafficPolicy)}
        for key, resilience in self._services.items():
            resilience.reconfigure(policies.get(key))
            if resilience.outliers is not None:
                resilience.outliers.retain(w.uid for w in self._candidates(key))
        limits = {limit.key: limit for limit in self._state.resources_of(l7.RateLimit)}
        self._buckets = {
            key: entry for key, entry in self._buckets.items() if limits.get(key) == entry[0]
        }

    def _resilience(self, service_key: str) -> ServiceResilience:
        resilience = self._services.get(service_key)
        if resilience is None:
            policy = next(
                (p for p in self._state.resources_of(l7.TrafficPolicy) if p.host == service_key),
                None,
            )
            resilience = self._services[service_key] = ServiceResilience(policy)
        return resilience

    def _config_for(self, target: Target) -> TargetConfig:
        """The index of the current state; rebuilt here too if the state changed without a
        ``config_changed`` call (or before the first)."""
        if self._index is None or self._index.generation != self._state.generation:
            self._index = ConfigIndex(self._state, self._waypoint_key)
        return self._index.for_service(target.service.key if target.service else None)

    # -- the pipeline --------------------------------------------------------------------

    async def handle(
        self, request: HttpRequest, target: Target, caller: Caller,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> tuple[HttpResponse, Outcome]:
        """Run the stages in order until one answers; the response and how it was served."""
        try:  # the one path that is authorized, routed and forwarded
            request = request.replace(
                target=normalize_target(request.target, self._path_normalization))
        except PathRejected as rejection:
            return error_response(400, rejection.reason), Outcome()
        config = self._config_for(target)
        authenticated = self._authenticate(request, config.jwt)
        if isinstance(authenticated, Respond):
            return authenticated.response, Outcome(authenticated.flags)
        request, jwt = authenticated.value
        admitted = self._authorize(request, target, caller, jwt, config.authorizations)
        if isinstance(admitted, Continue):
            admitted = self._rate_limit(config.rate_limits)
        if isinstance(admitted, Respond):
            return admitted.response, Outcome(admitted.flags)
        routed = self._route(request, target, caller, config.routes)
        if isinstance(routed, Respond):
            return routed.response, Outcome(routed.flags)
        if routed.value is None:  # no route attached: to what the client addressed
            backend = self._addressed_backend(target)
            if isinstance(backend, Respond):
                return backend.response, Outcome(backend.flags)
            forwarded = await self._forward(request, backend.value, None, extra_headers)
            return forwarded.response, _outcome(forwarded)
        return await self._follow_route(routed.value, request, target, caller, extra_headers)

    async def _follow_route(
        self, selection: Selection, request: HttpRequest, target: Target, caller: Caller,
        extra_headers: tuple[tuple[str, str], ...],
    ) -> tuple[HttpResponse, Outcome]:
        """The selected rule's redirect, faults, rewrites, mirrors and backend, then the
        upstream and the rule's response header edits."""
        route_name, rule = selection.route.key, selection.rule
        redirect = redirect_for(selection, request, listener_port=target.port)
        if redirect is not None:
            return redirect.response(), Outcome(route_name=route_name)
        faulted = await self._inject_fault(rule.fault)
        if isinstance(faulted, Respond):
            return faulted.response, Outcome(faulted.flags, route_name=route_name)
        request = request_edits(selection, request).apply(request)
        for mirror in mirror_targets(rule, self._rand.random):
            self._mirror(request, mirror, caller, extra_headers)
        backend = self._weighted_backend(rule)
        if isinstance(backend, Respond):
            flags = (*faulted.flags, *backend.flags)
            return backend.response, Outcome(flags, route_name=route_name)
        forwarded = await self._forward(request, backend.value, rule, extra_headers)
        response = apply_response_edits(forwarded.response, response_header_edits(selection))
        return response, _outcome(forwarded, faulted.flags, route_name=route_name)

    # -- the stages ----------------------------------------------------------------------

    def _authenticate(
        self, request: HttpRequest, validator: JwtValidator
    ) -> Continue[tuple[HttpRequest, JwtResult]] | Respond:
        """JWT: a bad token is answered 401 (UAEX); a good one's header edits are made."""
        try:
            jwt = validator.validate(request.headers)
        except JwtError as error:
            response = error_response(401, f"Jwt verification fails: {error.reason}")
            return Respond(
                response.with_headers(
                    set=[("www-authenticate", JwtError.www_authenticate(request.authority))]
                ),
                (ResponseFlag.UNAUTHORIZED,),
            )
        if jwt.headers_to_add or jwt.headers_to_remove:
            request = request.with_headers(set=jwt.headers_to_add, remove=jwt.headers_to_remove)
        return Continue((request, jwt))

    def _authorize(
        self, request: HttpRequest, target: Target, caller: Caller, jwt: JwtResult,
        policies: tuple[l7.WaypointAuthorization, ...],
    ) -> Continue[None] | Respond:
        """Authorization policies: a denial is answered 403 (RBAC)."""
        if not policies:
            return Continue(None)
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
            return Continue(None)
        log.info("request denied", reason=decision.reason, method=request.method,
                 path=request.path, source=str(caller.identity))
        return Respond.error(403, "RBAC: access denied", ResponseFlag.RBAC_DENIED)

    def _rate_limit(self, limits: tuple[l7.RateLimit, ...]) -> Continue[None] | Respond:
        """Local rate limits: every limit takes a token (as Envoy's filters each do); all
        must have one, else 429 (RL)."""
        allowed = True
        for limit in limits:
            entry = self._buckets.get(limit.key)
            if entry is None:
                bucket = TokenBucket.from_rate_limit(limit, trio.current_time)
                entry = self._buckets[limit.key] = (limit, bucket)
            allowed = entry[1].try_take() and allowed
        if allowed:
            return Continue(None)
        return Respond.error(429, "local_rate_limited", ResponseFlag.RATE_LIMITED)

    def _route(
        self, request: HttpRequest, target: Target, caller: Caller,
        candidates: tuple[l7.HttpRoute, ...],
    ) -> Continue[Selection | None] | Respond:
        """Routing: the winning rule of the attached routes (None: no route is attached);
        attached routes that all miss are answered 404 (NR)."""
        routes = attached_accepted_routes(
            candidates,
            service_key=target.service.key if target.service else None,
            waypoint_key=self._waypoint_key,
            host=request.authority,
            source_namespace=caller.identity.namespace if caller.identity else None,
        )
        decision = route_request(routes, request)
        if isinstance(decision, NoRouteMatched):
            return Respond.error(decision.status, "no route matched", *decision.response_flags)
        return Continue(None if isinstance(decision, PassThrough) else decision)

    async def _inject_fault(self, fault: l7.FaultInjection | None) -> Continue[None] | Respond:
        """Fault injection: a delay (DI) goes on after waiting, an abort (FI) is answered."""
        decision = fault_decision(fault, self._rand.random)
        if decision.delay is not None:
            await trio.sleep(decision.delay)
        if decision.abort_status is not None:
            return Respond.error(decision.abort_status, "fault filter abort",
                                 *decision.response_flags)
        return Continue(None, decision.response_flags)

    def _weighted_backend(self, rule: l7.RouteRule) -> Continue[l7.BackendRef] | Respond:
        return _backend_or_no_route(choose_backend(rule, self._rand.random))

    def _addressed_backend(self, target: Target) -> Continue[l7.BackendRef] | Respond:
        """A Service target's own port; a workload target has no backend service to
        forward to, so without a route it is answered as a route without backends."""
        if target.service is not None:
            return Continue(l7.BackendRef(target.service.key, target.port))
        return _backend_or_no_route(None)

    # -- upstream ------------------------------------------------------------------------

    async def _forward(
        self,
        request: HttpRequest,
        backend: l7.BackendRef,
        rule: l7.RouteRule | None,
        extra_headers: tuple[tuple[str, str], ...],
    ) -> Forwarded:
        """The backend service's circuit breaker, then the tries under the route's timeout."""
        service = self._state.service(backend.service)
        if service is None:
            return Forwarded(
                error_response(500, f"backend service {backend.service} does not exist"),
                (ResponseFlag.NO_ROUTE,),
            )
        port = next((p for p in service.ports if p.service_port == backend.port), None)
        if port is None:
            return Forwarded(
                error_response(500, f"backend service {service.hostname} has no port "
                                    f"{backend.port}"),
                (ResponseFlag.NO_ROUTE,), backend_service=service,
            )
        resilience = self._resilience(service.key)
        permit = resilience.breaker.try_acquire_request()
        if permit is None:
            return Forwarded(
                error_response(503, "upstream connect error or disconnect/reset before "
                                    "headers. reset reason: overflow"),
                (ResponseFlag.UPSTREAM_OVERFLOW,), backend_service=service,
            )
        with permit:
            await wait_dispatched(permit)
            return await self._tries(request, service, port.target_port or port.service_port,
                                     rule, resilience, extra_headers)

    def _candidates(self, service_key: str) -> list[Workload]:
        """The endpoints load balancing may choose from, before outlier ejection."""
        return [
            w for w in self._state.endpoints(service_key)
            if w.status is WorkloadStatus.HEALTHY and w.addresses
        ]

    def _pick_endpoint(
        self, service: Service, resilience: ServiceResilience, avoid: set[str]
    ) -> Workload | None:
        endpoints = self._candidates(service.key)
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
        extra_headers: tuple[tuple[str, str], ...],
    ) -> Forwarded:
        """Tries with budgeted retries, all within the route's timeout (504, UT, reporting
        the endpoint of the try it cut short)."""
        policy = rule.retry if rule and rule.retry is not None else DEFAULT_RETRY
        per_try = (rule.backend_timeout if rule else None) or policy.per_try_timeout
        total = rule.timeout if rule and rule.timeout else None
        tried: set[str] = set()
        endpoint: Workload | None = None
        upstream_host: str | None = None
        with trio.move_on_after(total if total else float("inf")) as deadline:
            with RetryState(policy, budget=resilience.budget, rand=self._rand.random) as retries:
                while True:
                    picked = self._pick_endpoint(service, resilience, tried)
                    if picked is None:  # reported with the endpoint of the last try, if any
                        return Forwarded(error_response(503, "no healthy upstream"),
                                         (ResponseFlag.NO_HEALTHY_UPSTREAM,), service,
                                         endpoint, upstream_host)
                    endpoint = picked
                    tried.add(endpoint.uid)
                    upstream_host = f"{endpoint.addresses[0]}:{target_port}"
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
                        log.info("upstream try failed", endpoint=upstream_host,
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
                    failure = _upstream_failure(error) if error is not None else None
                    flags = failure.flags if failure else ()
                    if retries.retries_used and decision.outcome is RetryOutcome.LIMIT_EXCEEDED:
                        flags = (*flags, ResponseFlag.RETRY_LIMIT_EXCEEDED)
                    return Forwarded(failure.response if failure else response, flags,
                                     service, endpoint, upstream_host)
        assert deadline.cancelled_caught
        return Forwarded(error_response(504, "upstream request timeout"),
                         (ResponseFlag.UPSTREAM_TIMEOUT,), service, endpoint, upstream_host)

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


def _outcome(
    forwarded: Forwarded, earlier_flags: tuple[ResponseFlag, ...] = (),
    route_name: str | None = None,
) -> Outcome:
    return Outcome(
        response_flags=(*earlier_flags, *forwarded.flags),
        endpoint=forwarded.endpoint,
        backend_service=forwarded.backend_service,
        route_name=route_name,
        upstream_host=forwarded.upstream_host,
    )


def _backend_or_no_route(backend: l7.BackendRef | None) -> Continue[l7.BackendRef] | Respond:
    if backend is None:
        return Respond.error(NO_BACKEND_STATUS, "the route has no backend with a weight above zero",
                             ResponseFlag.NO_ROUTE)
    return Continue(backend)


def _upstream_failure(error: UpstreamError) -> Respond:
    """The waypoint's answer when the last try got no response."""
    if error.kind == "timeout":
        return Respond.error(504, "upstream request timeout", ResponseFlag.UPSTREAM_TIMEOUT)
    if error.kind == "reset":
        return Respond.error(503, f"upstream reset: {error.reason}", ResponseFlag.UPSTREAM_RESET)
    return Respond.error(503, f"upstream connect error: {error.reason}",
                         ResponseFlag.UPSTREAM_CONNECT_FAILURE)
