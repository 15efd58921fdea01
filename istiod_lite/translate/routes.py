"""Gateway API and Istio traffic objects -> the ``l7`` resources waypoints read.

``translate()`` calls ``route_resources``: HTTPRoute, TCPRoute, VirtualService,
DestinationRule and LocalRateLimit, each object translated by ``_RouteTranslator``, which
resolves parents, backends and hosts against the cluster's Services and waypoints; the
per-field conversions are in ``gateway_api.py``, ``istio.py`` and ``fields.py``. Decisions
worth knowing:

* Route parents: a ``parentRef`` defaults to ``group: gateway.networking.k8s.io, kind:
  Gateway`` (Gateway API), except that ``kind: Service`` without a group means the core
  Service (there is no other). Kind Service (group ``""``/``core``) -> the service key; a waypoint
  Gateway -> ``l7.waypoint_key``. A Gateway that is not a waypoint is an ingress's business and
  skipped quietly; missing parents and unknown kinds are skipped with a warning; a route left
  without parents is not translated. ``port`` and ``sectionName`` on a parentRef are ignored:
  a route applies to every port of its parent.
* ``backendRefs``: kind Service only (others are dropped with a warning); ``port`` required
  (Gateway API's rule; the route is rejected otherwise); ``weight`` defaults to 1. A backend
  naming a missing Service is kept (the waypoint answers 500 for its share, as Gateway API
  requires) and logged, as is a rule whose weights are all 0. Cross-namespace backends are
  allowed without a ReferenceGrant (not modelled). Per-backend filters are ignored.
* Durations follow Gateway API/Istio (``10s``, ``500ms``, ``1h2m``); ``0s`` means "no timeout".
  Gateway API ``retry`` -> ``RetryPolicy(attempts, retry_on = connect-failure, reset + codes,
  backoff)`` (Istio also retries connection failures); ``attempts: 0`` disables retries. A rule
  without ``retry`` carries ``None``: the waypoint's default applies.
* Fault injection exists only in Istio's API: users write a ``VirtualService`` for faults, as
  in Istio. A VirtualService's short host names resolve in its namespace (``reviews``,
  ``reviews.other``, ``reviews.other.svc[.<domain>]``); other hosts are skipped with a
  warning. Its routes become ``HttpRoute(source_kind="VirtualService")`` with the resolved
  services as parents. Unsupported fields (subsets, ``corsPolicy``, ``directResponse``,
  ``tcp``/``tls`` routes...) are logged and ignored.
* DestinationRule -> ``TrafficPolicy``: ``connectionPool`` and ``outlierDetection`` only;
  ``subsets`` and other fields are ignored with a warning. ``consecutiveGatewayErrors`` is
  treated as a 5xx count (the smaller of the two given applies).

A broken object is logged with its kind, namespace/name and the reason and skipped; it never
stops translation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from ambient_api import l7
from ambient_api.kinds import KIND_BY_TYPE
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import fields, gateway_api, istio
from istiod_lite.translate.common import (
    CORE_GROUPS,
    GATEWAY_GROUP,
    convert_each,
    created_at,
    name_of,
    namespace_of,
    service_hostname,
    where_of,
)
from istiod_lite.translate.mesh import MeshConfig
from istiod_lite.translate.waypoints import is_waypoint, waypoint_gateway

logger = structlog.get_logger(__name__)

L7Resource = l7.HttpRoute | l7.TcpRoute | l7.TrafficPolicy | l7.RateLimit


def route_resources(objects: ClusterObjects, mesh: MeshConfig) -> list[L7Resource]:
    """Every L7 resource the waypoints need, sorted by kind then key (stable output)."""
    translator = _RouteTranslator(objects, mesh)
    resources: list[L7Resource] = [
        *convert_each(objects.httproutes, translator.http_route),
        *convert_each(objects.virtual_services, translator.virtual_service),
        *convert_each(objects.tcproutes, translator.tcp_route),
        *convert_each(objects.destination_rules, translator.destination_rule),
        *convert_each(objects.local_rate_limits, translator.rate_limit),
    ]
    return sorted(resources, key=lambda r: (KIND_BY_TYPE[type(r)], r.key))


class _RouteTranslator:
    """Translates one snapshot's traffic objects, resolving the Services, waypoints and
    hosts they name against that snapshot."""

    def __init__(self, objects: ClusterObjects, mesh: MeshConfig) -> None:
        self.objects = objects
        self.mesh = mesh

    def service_key(self, name: str, namespace: str) -> str:
        return f"{namespace}/{service_hostname(name, namespace, self.mesh)}"

    def has_service(self, name: str, namespace: str) -> bool:
        return f"{namespace}/{name}" in self.objects.services or (
            f"{namespace}/{name}" in self.objects.gateways
            and is_waypoint(self.objects.gateways[f"{namespace}/{name}"])
        )

    # -- Gateway API ------------------------------------------------------------------

    def parents(self, route: Mapping[str, Any]) -> tuple[str, ...]:
        where = where_of(route)
        parents: list[str] = []
        for ref in (route.get("spec") or {}).get("parentRefs") or []:
            kind = ref.get("kind", "Gateway")
            group = ref.get("group")
            if group is None:  # Gateway API's default; for a Service, users mean the core one
                group = "" if kind == "Service" else GATEWAY_GROUP
            name = str(ref["name"])
            namespace = ref.get("namespace") or namespace_of(route)
            if kind == "Service" and group in CORE_GROUPS:
                if not self.has_service(name, namespace):
                    logger.warning(
                        "route parent Service not found; parent skipped",
                        route=where,
                        parent=f"{namespace}/{name}",
                    )
                    continue
                parents.append(self.service_key(name, namespace))
            elif kind == "Gateway" and group == GATEWAY_GROUP:
                gateway = self.objects.gateways.get(f"{namespace}/{name}")
                if gateway is None:
                    logger.warning(
                        "route parent Gateway not found; parent skipped",
                        route=where,
                        parent=f"{namespace}/{name}",
                    )
                elif is_waypoint(gateway):
                    parents.append(l7.waypoint_key(namespace, name))
                else:
                    logger.debug("route parent is not a waypoint", route=where, parent=name)
            else:
                logger.warning(
                    "route parent kind not supported; parent skipped",
                    route=where,
                    parent=f"{group or 'core'}/{kind} {namespace}/{name}",
                )
        return tuple(dict.fromkeys(parents))

    def http_route(self, route: dict[str, Any]) -> l7.HttpRoute | None:
        where = where_of(route)
        parents = self.parents(route)
        if not parents:
            logger.warning("route has no usable parent; not translated", route=where)
            return None
        spec = route.get("spec") or {}
        raw_rules = spec.get("rules") or [{}]
        rules = tuple(
            self.http_rule(rule, namespace_of(route), f"{where} rules[{i}]")
            for i, rule in enumerate(raw_rules)
        )
        return l7.HttpRoute(
            name=name_of(route),
            namespace=namespace_of(route),
            source_kind="HTTPRoute",
            parents=parents,
            hostnames=tuple(str(h) for h in spec.get("hostnames") or ()),
            rules=rules,
            created=created_at(route),
        )

    def http_rule(self, rule: Mapping[str, Any], namespace: str, where: str) -> l7.RouteRule:
        matches = tuple(
            gateway_api.http_match(match, f"{where} matches[{i}]")
            for i, match in enumerate(rule.get("matches") or [{}])
        )
        backends = self.backend_refs(rule.get("backendRefs") or [], namespace, where)
        request_headers = response_headers = None
        rewrite = redirect = None
        mirrors: list[l7.RequestMirror] = []
        seen: set[str] = set()
        for i, route_filter in enumerate(rule.get("filters") or []):
            kind = str(route_filter.get("type"))
            at = f"{where} filters[{i}] {kind}"
            if kind in seen and kind != "RequestMirror":
                raise ValueError(f"{at}: filter given twice")
            seen.add(kind)
            if kind == "RequestHeaderModifier":
                request_headers = gateway_api.header_modifier(
                    route_filter.get("requestHeaderModifier")
                )
            elif kind == "ResponseHeaderModifier":
                response_headers = gateway_api.header_modifier(
                    route_filter.get("responseHeaderModifier")
                )
            elif kind == "RequestMirror":
                mirror = route_filter.get("requestMirror")
                mirrors.append(self.gateway_mirror(mirror, namespace, at))
            elif kind == "URLRewrite":
                rewrite = gateway_api.url_rewrite(route_filter.get("urlRewrite"), at)
            elif kind == "RequestRedirect":
                redirect = gateway_api.request_redirect(route_filter.get("requestRedirect"), at)
            else:
                logger.warning("route filter type not supported; ignored", rule=where, type=kind)
        if rewrite is not None and redirect is not None:
            raise ValueError(f"{where}: URLRewrite and RequestRedirect cannot be combined")
        if backends and all(backend.weight == 0 for backend in backends):
            logger.warning("every backend of the rule has weight 0; it answers 500", rule=where)
        timeouts = rule.get("timeouts") or {}
        timeout = fields.optional_duration(timeouts.get("request"), f"{where} timeouts.request")
        backend_timeout = fields.optional_duration(
            timeouts.get("backendRequest"), f"{where} timeouts.backendRequest"
        )
        if timeout is not None and backend_timeout is not None and backend_timeout > timeout:
            logger.warning(
                "timeouts.backendRequest is longer than timeouts.request; the request "
                "timeout still bounds every try",
                rule=where,
            )
        return l7.RouteRule(
            matches=matches,
            backends=backends,
            request_headers=request_headers,
            response_headers=response_headers,
            mirrors=tuple(mirrors),
            rewrite=rewrite,
            redirect=redirect,
            retry=gateway_api.retry_policy(rule.get("retry"), where),
            timeout=timeout,
            backend_timeout=backend_timeout,
        )

    def backend_refs(
        self, refs: Iterable[Mapping[str, Any]], namespace: str, where: str
    ) -> tuple[l7.BackendRef, ...]:
        backends: list[l7.BackendRef] = []
        for i, ref in enumerate(refs):
            at = f"{where} backendRefs[{i}]"
            kind, group = ref.get("kind", "Service"), ref.get("group", "")
            if kind != "Service" or group not in CORE_GROUPS:
                logger.warning(
                    "backend kind not supported (Service only); backend dropped",
                    backend=at,
                    kind=f"{group or 'core'}/{kind}",
                )
                continue
            if ref.get("filters"):
                logger.warning("per-backend filters are not supported; ignored", backend=at)
            backends.append(self.service_backend(ref, namespace, at, weight=True))
        return tuple(backends)

    def service_backend(
        self, ref: Mapping[str, Any], namespace: str, where: str, *, weight: bool
    ) -> l7.BackendRef:
        name = str(ref["name"])
        backend_namespace = ref.get("namespace") or namespace
        if ref.get("port") is None:
            raise ValueError(f"{where}: port is required for a Service backend")
        port = fields.port(ref["port"], f"{where} port")
        backend_weight = fields.whole(ref.get("weight", 1), f"{where} weight") if weight else 1
        if not self.has_service(name, backend_namespace):
            logger.warning(
                "backend Service not found; the waypoint answers 500 for its share",
                backend=where,
                service=f"{backend_namespace}/{name}",
            )
        return l7.BackendRef(self.service_key(name, backend_namespace), port, backend_weight)

    def gateway_mirror(
        self, mirror: Mapping[str, Any] | None, namespace: str, where: str
    ) -> l7.RequestMirror:
        if not mirror or not mirror.get("backendRef"):
            raise ValueError(f"{where}: requestMirror.backendRef is required")
        ref = mirror["backendRef"]
        if ref.get("kind", "Service") != "Service" or ref.get("group", "") not in CORE_GROUPS:
            raise ValueError(f"{where}: the mirror backend must be a Service")
        backend = self.service_backend(ref, namespace, where, weight=False)
        percent = 100.0
        if mirror.get("percent") is not None:
            percent = float(mirror["percent"])
        elif mirror.get("fraction") is not None:
            fraction = mirror["fraction"]
            denominator = int(fraction.get("denominator", 100))
            if denominator <= 0:
                raise ValueError(f"{where}: fraction.denominator must be positive")
            percent = 100.0 * int(fraction["numerator"]) / denominator
        if not 0 <= percent <= 100:
            raise ValueError(f"{where}: mirror percentage {percent} is not within 0-100")
        return l7.RequestMirror(backend.service, backend.port, percent)

    def tcp_route(self, route: dict[str, Any]) -> l7.TcpRoute | None:
        where = where_of(route)
        parents = self.parents(route)
        if not parents:
            logger.warning("route has no usable parent; not translated", route=where)
            return None
        rules = (route.get("spec") or {}).get("rules") or []
        if len(rules) > 1:
            logger.warning("TCPRoute with several rules: their backends are merged", route=where)
        backends: list[l7.BackendRef] = []
        for i, rule in enumerate(rules):
            backends += self.backend_refs(
                rule.get("backendRefs") or [], namespace_of(route), f"{where} rules[{i}]"
            )
        if backends and all(backend.weight == 0 for backend in backends):
            logger.warning("every backend of the route has weight 0; it is refused", route=where)
        return l7.TcpRoute(
            name=name_of(route),
            namespace=namespace_of(route),
            parents=parents,
            backends=tuple(backends),
        )

    # -- Istio ------------------------------------------------------------------------

    def resolve_host(self, host: str, namespace: str) -> str | None:
        """An Istio host name -> a service key, or None for hosts outside the cluster's
        services (external names, wildcards)."""
        if "*" in host:
            return None
        parts = host.split(".")
        domain = f"svc.{self.mesh.cluster_domain}"
        if len(parts) == 1:
            return self.service_key(parts[0], namespace)
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
            return self.service_key(parts[0], parts[1])
        if len(parts) > 2 and ".".join(parts[2:]) == domain:
            return self.service_key(parts[0], parts[1])
        return None

    def virtual_service(self, virtual_service: dict[str, Any]) -> l7.HttpRoute | None:
        where = where_of(virtual_service)
        namespace = namespace_of(virtual_service)
        spec = virtual_service.get("spec") or {}
        gateways = spec.get("gateways") or []
        if gateways and "mesh" not in gateways:
            logger.debug("VirtualService is for gateways only; not for waypoints", vs=where)
            return None
        istio.warn_unsupported(spec, istio.VIRTUAL_SERVICE_FIELDS, where)
        parents: list[str] = []
        for host in spec.get("hosts") or []:
            key = self.resolve_host(str(host), namespace)
            if key is None:
                logger.warning(
                    "VirtualService host is not a cluster Service; host skipped",
                    vs=where,
                    host=host,
                )
            else:
                parents.append(key)
        if not parents:
            logger.warning("VirtualService has no usable host; not translated", vs=where)
            return None
        rules = tuple(
            self.istio_http_rule(http, namespace, f"{where} http[{i}]")
            for i, http in enumerate(spec.get("http") or [])
        )
        return l7.HttpRoute(
            name=name_of(virtual_service),
            namespace=namespace,
            source_kind="VirtualService",
            parents=tuple(dict.fromkeys(parents)),
            rules=rules,
            created=created_at(virtual_service),
        )

    def istio_destination(
        self, destination: Mapping[str, Any], namespace: str, where: str
    ) -> tuple[str, int]:
        host = str(destination["host"])
        key = self.resolve_host(host, namespace)
        if key is None:
            raise ValueError(f"{where}: destination host {host!r} is not a cluster Service")
        if destination.get("subset"):
            logger.warning(
                "destination subsets are not supported; the whole service is used",
                route=where,
                subset=destination["subset"],
            )
        service_namespace, _, hostname = key.partition("/")
        if not self.has_service(hostname.split(".")[0], service_namespace):
            logger.warning(
                "destination Service not found; the waypoint answers 500 for its share",
                route=where,
                host=host,
            )
        port_number = (destination.get("port") or {}).get("number")
        if port_number is not None:
            return key, fields.port(port_number, f"{where} port.number")
        service = self.objects.services.get(f"{service_namespace}/{hostname.split('.')[0]}")
        ports = ((service or {}).get("spec") or {}).get("ports") or []
        if len(ports) != 1:
            raise ValueError(
                f"{where}: destination {host!r} needs port.number (its Service does not have "
                "exactly one port)"
            )
        return key, int(ports[0]["port"])

    def istio_http_rule(self, http: Mapping[str, Any], namespace: str, where: str) -> l7.RouteRule:
        istio.warn_unsupported(http, istio.HTTP_ROUTE_FIELDS, where)
        routes = http.get("route") or []
        if routes and http.get("redirect"):
            raise ValueError(f"{where}: route and redirect cannot be combined")
        if not routes and not http.get("redirect"):
            raise ValueError(f"{where}: needs a route or a redirect")
        matches = tuple(
            istio.route_match(match, f"{where} match[{i}]")
            for i, match in enumerate(http.get("match") or [])
        ) or (l7.RouteMatch(),)
        any_weight = any(route.get("weight") is not None for route in routes)
        backends = []
        for i, route in enumerate(routes):
            at = f"{where} route[{i}]"
            key, port = self.istio_destination(route["destination"], namespace, at)
            weight = fields.whole(route.get("weight", 0 if any_weight else 1), f"{at} weight")
            if route.get("headers"):
                logger.warning("per-destination headers are not supported; ignored", route=at)
            backends.append(l7.BackendRef(key, port, weight))
        if backends and all(backend.weight == 0 for backend in backends):
            logger.warning("every destination of the route has weight 0; it answers 500",
                           route=where)
        mirrors = []
        if http.get("mirror"):
            key, port = self.istio_destination(http["mirror"], namespace, f"{where} mirror")
            percent = istio.percentage(http.get("mirrorPercentage"), f"{where} mirrorPercentage")
            mirrors.append(l7.RequestMirror(key, port, percent))
        for i, mirror in enumerate(http.get("mirrors") or []):
            at = f"{where} mirrors[{i}]"
            key, port = self.istio_destination(mirror["destination"], namespace, at)
            mirrors.append(
                l7.RequestMirror(key, port, istio.percentage(mirror.get("percentage"), at))
            )
        headers = http.get("headers") or {}
        return l7.RouteRule(
            matches=matches,
            backends=tuple(backends),
            request_headers=istio.header_modifier(headers.get("request")),
            response_headers=istio.header_modifier(headers.get("response")),
            mirrors=tuple(mirrors),
            rewrite=istio.url_rewrite(http.get("rewrite"), matches, where),
            redirect=istio.request_redirect(http.get("redirect"), where),
            fault=istio.fault_injection(http.get("fault"), where),
            retry=istio.retry_policy(http.get("retries"), where),
            timeout=fields.optional_duration(http.get("timeout"), f"{where} timeout"),
        )

    def destination_rule(self, rule: dict[str, Any]) -> l7.TrafficPolicy | None:
        where = where_of(rule)
        spec = rule.get("spec") or {}
        host = str(spec["host"])
        key = self.resolve_host(host, namespace_of(rule))
        if key is None:
            logger.warning("DestinationRule host is not a cluster Service; not translated",
                           rule=where, host=host)
            return None
        for field_name in ("subsets", "exportTo", "workloadSelector"):
            if spec.get(field_name):
                logger.warning(
                    "DestinationRule field not supported; ignored", rule=where, field=field_name
                )
        policy = spec.get("trafficPolicy") or {}
        for field_name in policy:
            if field_name not in ("connectionPool", "outlierDetection"):
                logger.warning(
                    "DestinationRule traffic policy field not supported; ignored",
                    rule=where,
                    field=f"trafficPolicy.{field_name}",
                )
        pool = istio.connection_pool(policy.get("connectionPool"), where)
        outlier = istio.outlier_detection(policy.get("outlierDetection"), where)
        if pool is None and outlier is None:
            logger.info("DestinationRule has nothing a waypoint applies", rule=where)
            return None
        return l7.TrafficPolicy(
            name=name_of(rule),
            namespace=namespace_of(rule),
            host=key,
            connection_pool=pool,
            outlier_detection=outlier,
        )

    # -- ambient-lite -----------------------------------------------------------------

    def rate_limit(self, limit: dict[str, Any]) -> l7.RateLimit | None:
        where = where_of(limit)
        namespace = namespace_of(limit)
        spec = limit.get("spec") or {}
        targets: list[str] = []
        for ref in spec.get("targetRefs") or []:
            kind, name, group = ref.get("kind"), str(ref["name"]), ref.get("group", "")
            if kind == "Service" and group in CORE_GROUPS:
                if not self.has_service(name, namespace):
                    logger.warning("rate limit target Service not found", policy=where,
                                   target=name)
                targets.append(self.service_key(name, namespace))
            elif kind == "Gateway" and group in (GATEWAY_GROUP, ""):
                if waypoint_gateway(self.objects, namespace, name) is None:
                    logger.warning("rate limit target is not a waypoint Gateway", policy=where,
                                   target=name)
                targets.append(l7.waypoint_key(namespace, name))
            else:
                logger.warning("rate limit target kind not supported; target skipped",
                               policy=where, kind=f"{group or 'core'}/{kind}")
        if not targets:
            logger.warning("rate limit has no usable target; not translated", policy=where)
            return None
        bucket = spec["tokenBucket"]
        return l7.RateLimit(
            name=name_of(limit),
            namespace=namespace,
            targets=tuple(dict.fromkeys(targets)),
            max_tokens=fields.whole(bucket["maxTokens"], "tokenBucket.maxTokens", minimum=1),
            tokens_per_fill=fields.whole(bucket["tokensPerFill"], "tokenBucket.tokensPerFill",
                                   minimum=1),
            fill_interval=fields.duration(bucket["fillInterval"], "tokenBucket.fillInterval"),
        )
