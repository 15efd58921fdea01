"""Waypoints and L7 traffic objects -> the wire model (issue 3).

``translate()`` calls ``waypoint_resources`` (each waypoint Gateway's Service and Workload) and
``route_resources`` (HTTPRoute, TCPRoute, VirtualService, DestinationRule and LocalRateLimit
as ``l7`` resources). ``translate.py`` uses ``waypoint_gateway`` and ``waypoint_for`` to decide
which objects really get a waypoint. Decisions worth knowing:

* A waypoint is a Gateway with ``gatewayClassName: istio-waypoint``; a listener
  ``{port: 15008, protocol: HBONE}`` is expected (a warning otherwise, still translated).
* Embedded mode (no pod labelled ``gateway.networking.k8s.io/gateway-name=<name>`` in the
  Gateway's namespace): the Gateway becomes a Service ``<name>.<ns>.svc.<domain>`` on port
  15008 with the Gateway's ``spec.addresses`` (type ``IPAddress`` or no type; else the
  ``status.addresses`` a controller such as ambientctl assigned) and a Workload
  ``<cluster>//Gateway/<ns>/<name>`` at those addresses; without any, nothing (logged).
  If a Kubernetes Service of that name exists, this is the Kubernetes shape instead: nothing
  is emitted, the Service's selected pods are the only endpoints (none: fail closed).
* Kubernetes mode (such pods exist): nothing is emitted here. The pods are the waypoint's
  workloads and the Service istiod's deployment controller creates for them (named like the
  Gateway, selecting ``gateway-name=<name>``) gives them their Service through the normal
  Service path, so there is one Service with one key and real endpoints. A missing Service is
  logged. (A synthetic Service from ``spec.addresses`` would have no endpoints, as the pods
  would not list it.)
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
stops translation (as in ``translate.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog

from ambient_api import l7
from ambient_api.kinds import KIND_BY_TYPE
from ambient_api.model import (
    Locality,
    NetworkAddress,
    PortMapping,
    Resource,
    Service,
    TunnelProtocol,
    Workload,
)
from ambient_common.flags import parse_duration
from istiod_lite.convert import convert_each, labels_of, name_of, namespace_of, service_hostname
from istiod_lite.sources.objects import ClusterObjects

if TYPE_CHECKING:  # translate.py imports this module; no import cycle at run time
    from istiod_lite.translate import MeshConfig

logger = structlog.get_logger(__name__)

WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
SERVICE_ACCOUNT_ANNOTATION = "istio.io/service-account"
NODE_ANNOTATION = "ambient-lite.io/node"
GATEWAY_GROUP = "gateway.networking.k8s.io"
CORE_GROUPS = frozenset({"", "core"})
HBONE_PORT = 15008

WaypointFor = Literal["service", "workload", "all", "none"]
WAYPOINT_FOR_VALUES: frozenset[str] = frozenset({"service", "workload", "all", "none"})

L7Resource = l7.HttpRoute | l7.TcpRoute | l7.TrafficPolicy | l7.RateLimit

T = TypeVar("T")


# -- waypoints -------------------------------------------------------------------------------


def is_waypoint(gateway: Mapping[str, Any]) -> bool:
    return (gateway.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS


def waypoint_gateway(
    objects: ClusterObjects, namespace: str, name: str
) -> dict[str, Any] | None:
    """The waypoint Gateway ``namespace/name``, or None if missing or not a waypoint."""
    gateway = objects.gateways.get(f"{namespace}/{name}")
    if gateway is None or not is_waypoint(gateway):
        return None
    return gateway


def waypoint_for(gateway: Mapping[str, Any]) -> WaypointFor:
    """Which traffic the waypoint takes (``istio.io/waypoint-for``, default ``service``).
    An unknown value reads as ``service``, Istio's default, with a warning."""
    value = labels_of(gateway).get(WAYPOINT_FOR_LABEL, "service")
    if value == "workload":
        return "workload"
    if value == "all":
        return "all"
    if value == "none":
        return "none"
    if value != "service":
        logger.warning(
            "unknown istio.io/waypoint-for value; using service",
            gateway=_where(gateway),
            value=value,
        )
    return "service"


def waypoint_resources(objects: ClusterObjects, mesh: MeshConfig) -> list[Resource]:
    """Each waypoint Gateway's Service and Workload (embedded mode), sorted by key."""
    resources: list[Resource] = []
    for gateway in convert_each(objects.gateways, lambda gw: _waypoint(gw, objects, mesh)):
        resources.extend(gateway)
    return resources


def _waypoint(
    gateway: dict[str, Any], objects: ClusterObjects, mesh: MeshConfig
) -> list[Resource] | None:
    if not is_waypoint(gateway):
        return None
    name, namespace = name_of(gateway), namespace_of(gateway)
    spec = gateway.get("spec") or {}
    if not any(
        int(listener.get("port", 0)) == HBONE_PORT and listener.get("protocol") == "HBONE"
        for listener in spec.get("listeners") or []
    ):
        logger.warning(
            "waypoint Gateway has no listener {port: 15008, protocol: HBONE}; "
            "ztunnels will still send it HBONE on 15008",
            gateway=f"{namespace}/{name}",
        )
    hostname = service_hostname(name, namespace, mesh)
    key = f"{namespace}/{hostname}"
    has_service_object = f"{namespace}/{name}" in objects.services
    if has_service_object:
        # The Kubernetes shape: a Service named after the Gateway selects the waypoint's
        # pods, which are its only endpoints. With no pods (scaled to zero, crashed) the
        # waypoint has no endpoint and ztunnels fail closed; inventing one at the Service's
        # address would send traffic to nowhere.
        return None
    if _waypoint_pods(objects, namespace, name):
        if not has_service_object:
            logger.warning(
                "waypoint has pods but no Service of the same name selecting them; "
                "no ztunnel can reach it",
                gateway=f"{namespace}/{name}",
            )
        return None
    addresses = _ip_addresses(spec) or _ip_addresses(gateway.get("status") or {})
    if not addresses:
        logger.warning(
            "waypoint Gateway has no addresses of type IPAddress (spec or status) and no "
            "pods; nothing can reach it",
            gateway=f"{namespace}/{name}",
        )
        return None
    annotations = _annotations(gateway)
    node_name = annotations.get(NODE_ANNOTATION, "")
    node_labels = labels_of(objects.nodes.get(node_name) or {})
    resources: list[Resource] = [
        Service(
            name=name,
            namespace=namespace,
            hostname=hostname,
            addresses=tuple(NetworkAddress(mesh.network, ip) for ip in addresses),
            ports=(PortMapping(HBONE_PORT, HBONE_PORT, ""),),
        )
    ]
    resources.append(
        Workload(
            uid=f"{mesh.cluster_id}//Gateway/{namespace}/{name}",
            name=name,
            namespace=namespace,
            addresses=addresses,
            service_account=annotations.get(SERVICE_ACCOUNT_ANNOTATION) or name,
            node=node_name,
            trust_domain=mesh.trust_domain,
            network=mesh.network,
            cluster_id=mesh.cluster_id,
            tunnel_protocol=TunnelProtocol.HBONE,
            locality=Locality(
                region=node_labels.get("topology.kubernetes.io/region", ""),
                zone=node_labels.get("topology.kubernetes.io/zone", ""),
                subzone=node_labels.get("topology.istio.io/subzone", ""),
            ),
            canonical_name=name,
            canonical_revision="latest",
            workload_type="gateway",
            workload_name=name,
            services=(key,),
        )
    )
    return resources


def _ip_addresses(section: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``addresses`` of a Gateway spec (requested) or status (assigned) that are IPs."""
    return tuple(
        str(address["value"])
        for address in section.get("addresses") or []
        if address.get("type", "IPAddress") == "IPAddress"
    )


def _waypoint_pods(objects: ClusterObjects, namespace: str, name: str) -> bool:
    return any(
        namespace_of(pod) == namespace and labels_of(pod).get(GATEWAY_NAME_LABEL) == name
        for pod in objects.pods.values()
    )


# -- routes and traffic objects --------------------------------------------------------------


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
        where = _where(route)
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
        where = _where(route)
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
            created=_created(route),
        )

    def http_rule(self, rule: Mapping[str, Any], namespace: str, where: str) -> l7.RouteRule:
        matches = tuple(
            _http_match(match, f"{where} matches[{i}]")
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
                request_headers = _gateway_header_modifier(
                    route_filter.get("requestHeaderModifier")
                )
            elif kind == "ResponseHeaderModifier":
                response_headers = _gateway_header_modifier(
                    route_filter.get("responseHeaderModifier")
                )
            elif kind == "RequestMirror":
                mirror = route_filter.get("requestMirror")
                mirrors.append(self.gateway_mirror(mirror, namespace, at))
            elif kind == "URLRewrite":
                rewrite = _url_rewrite(route_filter.get("urlRewrite"), at)
            elif kind == "RequestRedirect":
                redirect = _request_redirect(route_filter.get("requestRedirect"), at)
            else:
                logger.warning("route filter type not supported; ignored", rule=where, type=kind)
        if rewrite is not None and redirect is not None:
            raise ValueError(f"{where}: URLRewrite and RequestRedirect cannot be combined")
        if backends and all(backend.weight == 0 for backend in backends):
            logger.warning("every backend of the rule has weight 0; it answers 500", rule=where)
        timeouts = rule.get("timeouts") or {}
        timeout = _optional_duration(timeouts.get("request"), f"{where} timeouts.request")
        backend_timeout = _optional_duration(
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
            retry=_gateway_retry(rule.get("retry"), where),
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
        port = _port(ref["port"], f"{where} port")
        backend_weight = _whole(ref.get("weight", 1), f"{where} weight") if weight else 1
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
        where = _where(route)
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
        where = _where(virtual_service)
        namespace = namespace_of(virtual_service)
        spec = virtual_service.get("spec") or {}
        gateways = spec.get("gateways") or []
        if gateways and "mesh" not in gateways:
            logger.debug("VirtualService is for gateways only; not for waypoints", vs=where)
            return None
        _warn_unsupported(spec, _VS_FIELDS, where)
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
            created=_created(virtual_service),
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
            return key, _port(port_number, f"{where} port.number")
        service = self.objects.services.get(f"{service_namespace}/{hostname.split('.')[0]}")
        ports = ((service or {}).get("spec") or {}).get("ports") or []
        if len(ports) != 1:
            raise ValueError(
                f"{where}: destination {host!r} needs port.number (its Service does not have "
                "exactly one port)"
            )
        return key, int(ports[0]["port"])

    def istio_http_rule(self, http: Mapping[str, Any], namespace: str, where: str) -> l7.RouteRule:
        _warn_unsupported(http, _VS_HTTP_FIELDS, where)
        routes = http.get("route") or []
        if routes and http.get("redirect"):
            raise ValueError(f"{where}: route and redirect cannot be combined")
        if not routes and not http.get("redirect"):
            raise ValueError(f"{where}: needs a route or a redirect")
        matches = tuple(
            _istio_match(match, f"{where} match[{i}]")
            for i, match in enumerate(http.get("match") or [])
        ) or (l7.RouteMatch(),)
        any_weight = any(route.get("weight") is not None for route in routes)
        backends = []
        for i, route in enumerate(routes):
            at = f"{where} route[{i}]"
            key, port = self.istio_destination(route["destination"], namespace, at)
            weight = _whole(route.get("weight", 0 if any_weight else 1), f"{at} weight")
            if route.get("headers"):
                logger.warning("per-destination headers are not supported; ignored", route=at)
            backends.append(l7.BackendRef(key, port, weight))
        if backends and all(backend.weight == 0 for backend in backends):
            logger.warning("every destination of the route has weight 0; it answers 500",
                           route=where)
        mirrors = []
        if http.get("mirror"):
            key, port = self.istio_destination(http["mirror"], namespace, f"{where} mirror")
            percent = _percentage(http.get("mirrorPercentage"), f"{where} mirrorPercentage")
            mirrors.append(l7.RequestMirror(key, port, percent))
        for i, mirror in enumerate(http.get("mirrors") or []):
            at = f"{where} mirrors[{i}]"
            key, port = self.istio_destination(mirror["destination"], namespace, at)
            mirrors.append(
                l7.RequestMirror(key, port, _percentage(mirror.get("percentage"), at))
            )
        headers = http.get("headers") or {}
        return l7.RouteRule(
            matches=matches,
            backends=tuple(backends),
            request_headers=_istio_header_modifier(headers.get("request")),
            response_headers=_istio_header_modifier(headers.get("response")),
            mirrors=tuple(mirrors),
            rewrite=_istio_rewrite(http.get("rewrite"), matches, where),
            redirect=_istio_redirect(http.get("redirect"), where),
            fault=_istio_fault(http.get("fault"), where),
            retry=_istio_retries(http.get("retries"), where),
            timeout=_optional_duration(http.get("timeout"), f"{where} timeout"),
        )

    def destination_rule(self, rule: dict[str, Any]) -> l7.TrafficPolicy | None:
        where = _where(rule)
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
        pool = _connection_pool(policy.get("connectionPool"), where)
        outlier = _outlier_detection(policy.get("outlierDetection"), where)
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
        where = _where(limit)
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
            max_tokens=_whole(bucket["maxTokens"], "tokenBucket.maxTokens", minimum=1),
            tokens_per_fill=_whole(bucket["tokensPerFill"], "tokenBucket.tokensPerFill",
                                   minimum=1),
            fill_interval=_duration(bucket["fillInterval"], "tokenBucket.fillInterval"),
        )


# -- Gateway API pieces ----------------------------------------------------------------------

_GATEWAY_VALUE_TYPES = {
    "Exact": l7.ValueMatchType.EXACT,
    "RegularExpression": l7.ValueMatchType.REGULAR_EXPRESSION,
}
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


def _http_match(match: Mapping[str, Any], where: str) -> l7.RouteMatch:
    path = match.get("path") or {}
    path_type = path.get("type", "PathPrefix")
    try:
        path_match_type = l7.PathMatchType(path_type)
    except ValueError:
        raise ValueError(f"{where}: path type {path_type!r} is not Exact, PathPrefix or "
                         "RegularExpression") from None
    value = str(path.get("value", "/"))
    if path_match_type is l7.PathMatchType.REGULAR_EXPRESSION:
        _regex(value, f"{where} path")
    elif not value.startswith("/"):
        raise ValueError(f"{where}: path {value!r} must start with /")
    method = match.get("method")
    return l7.RouteMatch(
        path=l7.PathMatch(path_match_type, value),
        headers=_gateway_value_matches(match.get("headers"), f"{where} headers"),
        query_params=_gateway_value_matches(match.get("queryParams"), f"{where} queryParams"),
        method=str(method).upper() if method else None,
    )


def _gateway_value_matches(items: Any, where: str) -> tuple[l7.ValueMatch, ...]:
    matches = []
    for item in items or []:
        kind = item.get("type", "Exact")
        if kind not in _GATEWAY_VALUE_TYPES:
            raise ValueError(f"{where}: match type {kind!r} is not Exact or RegularExpression")
        value = str(item["value"])
        if _GATEWAY_VALUE_TYPES[kind] is l7.ValueMatchType.REGULAR_EXPRESSION:
            _regex(value, where)
        matches.append(l7.ValueMatch(str(item["name"]), value, _GATEWAY_VALUE_TYPES[kind]))
    return tuple(matches)


def _gateway_header_modifier(modifier: Mapping[str, Any] | None) -> l7.HeaderModifier:
    modifier = modifier or {}
    return l7.HeaderModifier(
        set=tuple((str(h["name"]), str(h["value"])) for h in modifier.get("set") or ()),
        add=tuple((str(h["name"]), str(h["value"])) for h in modifier.get("add") or ()),
        remove=tuple(str(name) for name in modifier.get("remove") or ()),
    )


def _path_modifier(path: Mapping[str, Any] | None, where: str) -> l7.PathModifier | None:
    if not path:
        return None
    kind = path.get("type")
    if kind == "ReplaceFullPath":
        return l7.PathModifier(l7.PathModifierType.REPLACE_FULL_PATH, str(path["replaceFullPath"]))
    if kind == "ReplacePrefixMatch":
        return l7.PathModifier(
            l7.PathModifierType.REPLACE_PREFIX_MATCH, str(path["replacePrefixMatch"])
        )
    raise ValueError(f"{where}: path type {kind!r} is not ReplaceFullPath or ReplacePrefixMatch")


def _url_rewrite(rewrite: Mapping[str, Any] | None, where: str) -> l7.UrlRewrite:
    rewrite = rewrite or {}
    hostname = rewrite.get("hostname")
    return l7.UrlRewrite(
        hostname=str(hostname) if hostname else None,
        path=_path_modifier(rewrite.get("path"), where),
    )


def _request_redirect(redirect: Mapping[str, Any] | None, where: str) -> l7.RequestRedirect:
    redirect = redirect or {}
    status = _whole(redirect.get("statusCode", 302), f"{where} statusCode")
    if status not in REDIRECT_CODES:
        raise ValueError(f"{where}: statusCode {status} is not a redirect status")
    scheme = redirect.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise ValueError(f"{where}: scheme {scheme!r} is not http or https")
    port = redirect.get("port")
    hostname = redirect.get("hostname")
    return l7.RequestRedirect(
        scheme=scheme,
        hostname=str(hostname) if hostname else None,
        path=_path_modifier(redirect.get("path"), where),
        port=_port(port, f"{where} port") if port is not None else None,
        status_code=status,
    )


def _gateway_retry(retry: Mapping[str, Any] | None, where: str) -> l7.RetryPolicy | None:
    if retry is None:
        return None
    default = l7.RetryPolicy()
    codes = tuple(str(_whole(code, f"{where} retry.codes", minimum=100)) for code in
                  retry.get("codes") or ())
    backoff = _optional_duration(retry.get("backoff"), f"{where} retry.backoff")
    return l7.RetryPolicy(
        attempts=_whole(retry.get("attempts", default.attempts), f"{where} retry.attempts"),
        retry_on=("connect-failure", "reset", *codes) if codes else default.retry_on,
        backoff_base=backoff if backoff is not None else default.backoff_base,
        backoff_max=max(10 * backoff, default.backoff_max) if backoff else default.backoff_max,
    )


# -- Istio pieces ----------------------------------------------------------------------------

_VS_FIELDS = frozenset({"hosts", "gateways", "http", "exportTo"})
_VS_HTTP_FIELDS = frozenset({
    "name", "match", "route", "redirect", "rewrite", "timeout", "retries", "fault", "mirror",
    "mirrorPercentage", "mirror_percent", "mirrors", "headers",
})
_VS_MATCH_FIELDS = frozenset({"name", "uri", "headers", "method", "queryParams"})
_ISTIO_STRING_MATCH = {
    "exact": l7.ValueMatchType.EXACT,
    "prefix": l7.ValueMatchType.PREFIX,
    "regex": l7.ValueMatchType.REGULAR_EXPRESSION,
}


def _warn_unsupported(spec: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for field_name in spec:
        if field_name not in known:
            logger.warning("field not supported; ignored", object=where, field=field_name)


def _istio_string_match(value: Any, where: str) -> tuple[l7.ValueMatchType, str]:
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ValueError(f"{where}: expected one of exact, prefix or regex")
    ((kind, text),) = value.items()
    if kind not in _ISTIO_STRING_MATCH:
        raise ValueError(f"{where}: match kind {kind!r} is not exact, prefix or regex")
    if kind == "regex":
        _regex(str(text), where)
    return _ISTIO_STRING_MATCH[kind], str(text)


def _istio_match(match: Mapping[str, Any], where: str) -> l7.RouteMatch:
    _warn_unsupported(match, _VS_MATCH_FIELDS, where)
    path = None
    if match.get("uri"):
        kind, value = _istio_string_match(match["uri"], f"{where} uri")
        path = l7.PathMatch(
            {
                l7.ValueMatchType.EXACT: l7.PathMatchType.EXACT,
                l7.ValueMatchType.PREFIX: l7.PathMatchType.PATH_PREFIX,
                l7.ValueMatchType.REGULAR_EXPRESSION: l7.PathMatchType.REGULAR_EXPRESSION,
            }[kind],
            value,
        )
    headers = []
    for name, value_match in (match.get("headers") or {}).items():
        kind, value = _istio_string_match(value_match, f"{where} headers.{name}")
        headers.append(l7.ValueMatch(str(name), value, kind))
    query_params = []
    for name, value_match in (match.get("queryParams") or {}).items():
        kind, value = _istio_string_match(value_match, f"{where} queryParams.{name}")
        if kind is l7.ValueMatchType.PREFIX:
            raise ValueError(f"{where} queryParams.{name}: prefix is not supported (Istio)")
        query_params.append(l7.ValueMatch(str(name), value, kind))
    method = None
    if match.get("method"):
        kind, value = _istio_string_match(match["method"], f"{where} method")
        if kind is not l7.ValueMatchType.EXACT:
            raise ValueError(f"{where} method: only exact is supported")
        method = value.upper()
    return l7.RouteMatch(
        path=path, headers=tuple(headers), query_params=tuple(query_params), method=method
    )


def _istio_header_modifier(operations: Mapping[str, Any] | None) -> l7.HeaderModifier | None:
    if not operations:
        return None
    return l7.HeaderModifier(
        set=tuple((str(k), str(v)) for k, v in (operations.get("set") or {}).items()),
        add=tuple((str(k), str(v)) for k, v in (operations.get("add") or {}).items()),
        remove=tuple(str(name) for name in operations.get("remove") or ()),
    )


def _istio_rewrite(
    rewrite: Mapping[str, Any] | None, matches: tuple[l7.RouteMatch, ...], where: str
) -> l7.UrlRewrite | None:
    """Istio's ``rewrite.uri`` replaces the matched prefix for prefix (or no) path matches
    and the whole path for exact/regex ones, like Envoy's ``prefix_rewrite``."""
    if not rewrite:
        return None
    _warn_unsupported(rewrite, frozenset({"uri", "authority"}), f"{where} rewrite")
    path = None
    if rewrite.get("uri"):
        prefix = any(
            m.path is None or m.path.type is l7.PathMatchType.PATH_PREFIX for m in matches
        )
        kind = (l7.PathModifierType.REPLACE_PREFIX_MATCH if prefix
                else l7.PathModifierType.REPLACE_FULL_PATH)
        path = l7.PathModifier(kind, str(rewrite["uri"]))
    authority = rewrite.get("authority")
    return l7.UrlRewrite(hostname=str(authority) if authority else None, path=path)


def _istio_redirect(redirect: Mapping[str, Any] | None, where: str) -> l7.RequestRedirect | None:
    if not redirect:
        return None
    at = f"{where} redirect"
    _warn_unsupported(
        redirect, frozenset({"uri", "authority", "redirectCode", "scheme", "port"}), at
    )
    status = _whole(redirect.get("redirectCode", 301), f"{at}.redirectCode")
    if status not in REDIRECT_CODES:
        raise ValueError(f"{at}: redirectCode {status} is not a redirect status")
    uri, authority = redirect.get("uri"), redirect.get("authority")
    port = redirect.get("port")
    return l7.RequestRedirect(
        scheme=redirect.get("scheme"),
        hostname=str(authority) if authority else None,
        path=l7.PathModifier(l7.PathModifierType.REPLACE_FULL_PATH, str(uri)) if uri else None,
        port=_port(port, f"{at}.port") if port is not None else None,
        status_code=status,
    )


def _percentage(value: Mapping[str, Any] | None, where: str, default: float = 100.0) -> float:
    if value is None:
        return default
    percent = float(value.get("value", default))
    if not 0 <= percent <= 100:
        raise ValueError(f"{where}: {percent} is not within 0-100")
    return percent


def _fault_percent(fault: Mapping[str, Any], where: str) -> float:
    if fault.get("percentage") is not None:
        return _percentage(fault["percentage"], f"{where}.percentage")
    if fault.get("percent") is not None:  # Istio's deprecated integer form
        return _percentage({"value": fault["percent"]}, f"{where}.percent")
    return 100.0


def _istio_fault(fault: Mapping[str, Any] | None, where: str) -> l7.FaultInjection | None:
    if not fault:
        return None
    delay = fault.get("delay") or {}
    abort = fault.get("abort") or {}
    delay_seconds = None
    if delay:
        if delay.get("fixedDelay") is None:
            raise ValueError(f"{where} fault.delay: fixedDelay is required")
        delay_seconds = _duration(delay["fixedDelay"], f"{where} fault.delay.fixedDelay")
    abort_status = None
    if abort:
        if abort.get("httpStatus") is None:
            raise ValueError(f"{where} fault.abort: httpStatus is required (grpcStatus and "
                             "http2Error are not supported)")
        abort_status = _whole(abort["httpStatus"], f"{where} fault.abort.httpStatus",
                              minimum=200)
        if abort_status > 599:
            raise ValueError(f"{where} fault.abort: httpStatus {abort_status} is not an "
                             "HTTP status")
    if delay_seconds is None and abort_status is None:
        return None
    return l7.FaultInjection(
        delay_seconds=delay_seconds,
        delay_percent=_fault_percent(delay, f"{where} fault.delay") if delay else 100.0,
        abort_status=abort_status,
        abort_percent=_fault_percent(abort, f"{where} fault.abort") if abort else 100.0,
    )


def _istio_retries(retries: Mapping[str, Any] | None, where: str) -> l7.RetryPolicy | None:
    if retries is None:
        return None
    default = l7.RetryPolicy()
    retry_on = tuple(
        condition.strip()
        for condition in str(retries.get("retryOn") or "").split(",")
        if condition.strip()
    )
    return l7.RetryPolicy(
        attempts=_whole(retries.get("attempts", 0), f"{where} retries.attempts"),
        per_try_timeout=_optional_duration(
            retries.get("perTryTimeout"), f"{where} retries.perTryTimeout"
        ),
        retry_on=retry_on or default.retry_on,
    )


def _connection_pool(pool: Mapping[str, Any] | None, where: str) -> l7.ConnectionPool | None:
    if not pool:
        return None
    tcp, http = pool.get("tcp") or {}, pool.get("http") or {}
    for name in tcp:
        if name != "maxConnections":
            logger.warning("connectionPool field not supported; ignored", rule=where,
                           field=f"tcp.{name}")
    http_fields = {"http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection"}
    for name in http:
        if name not in http_fields:
            logger.warning("connectionPool field not supported; ignored", rule=where,
                           field=f"http.{name}")

    def limit(section: Mapping[str, Any], name: str) -> int | None:
        value = section.get(name)
        # Istio: 0 on maxRequestsPerConnection means unlimited.
        if value is None or (name == "maxRequestsPerConnection" and value == 0):
            return None
        return _whole(value, f"connectionPool {name}", minimum=1)

    return l7.ConnectionPool(
        max_connections=limit(tcp, "maxConnections"),
        max_pending_requests=limit(http, "http1MaxPendingRequests"),
        max_requests=limit(http, "http2MaxRequests"),
        max_requests_per_connection=limit(http, "maxRequestsPerConnection"),
    )


def _outlier_detection(
    detection: Mapping[str, Any] | None, where: str
) -> l7.OutlierDetection | None:
    if not detection:
        return None
    known = {"consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
             "baseEjectionTime", "maxEjectionPercent"}
    for name in detection:
        if name not in known:
            logger.warning("outlierDetection field not supported; ignored", rule=where,
                           field=name)
    default = l7.OutlierDetection()
    counts = [
        _whole(detection[name], f"outlierDetection.{name}")
        for name in ("consecutive5xxErrors", "consecutiveGatewayErrors")
        if detection.get(name) is not None
    ]
    consecutive = min(counts) if counts else default.consecutive_5xx
    if consecutive == 0:
        logger.info("outlier detection disabled (0 consecutive errors)", rule=where)
        return None
    interval = _optional_duration(detection.get("interval"), "outlierDetection.interval")
    ejection = _optional_duration(
        detection.get("baseEjectionTime"), "outlierDetection.baseEjectionTime"
    )
    percent = _whole(
        detection.get("maxEjectionPercent", default.max_ejection_percent),
        "outlierDetection.maxEjectionPercent",
    )
    if percent > 100:
        raise ValueError(f"outlierDetection.maxEjectionPercent {percent} is above 100")
    return l7.OutlierDetection(
        consecutive_5xx=consecutive,
        interval=interval or default.interval,
        base_ejection_time=ejection or default.base_ejection_time,
        max_ejection_percent=percent,
    )


# -- small helpers ---------------------------------------------------------------------------

_ZERO_DURATION = re.compile(r"(0+(\.0+)?(ms|s|m|h))+|0+")


def _duration(value: Any, where: str) -> float:
    """A positive duration in seconds (``10s``, ``500ms``, ``1h2m``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: {value!r} is not a duration")
    try:
        return parse_duration(str(value)).total_seconds()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _optional_duration(value: Any, where: str) -> float | None:
    """None when absent or zero (Gateway API's and Istio's "disabled")."""
    if value is None or (isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip())):
        return None
    return _duration(value, where)


def _whole(value: Any, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {value!r} is not a whole number >= {minimum}")
    return value


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{where}: {value!r} is not a port number (1-65535)")
    return value


def _regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regular expression {pattern!r}: {exc}") from None


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _where(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', 'object')} {namespace_of(obj)}/{name_of(obj)}"


def _created(obj: Mapping[str, Any]) -> str:
    """``metadata.creationTimestamp`` as RFC 3339 (YAML may have parsed it as a datetime)."""
    value = obj["metadata"].get("creationTimestamp")
    if value is None:
        return ""
    if isinstance(value, datetime):
        text = value.isoformat()
        return text.replace("+00:00", "Z") if value.tzinfo else f"{text}Z"
    if isinstance(value, date):
        return f"{value.isoformat()}T00:00:00Z"
    return str(value)
