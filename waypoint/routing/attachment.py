"""Route attachment: which routes govern a request for a service (GAMMA's producer and
consumer routes, VirtualServices) or for the waypoint itself (as a Gateway listener, by
hostname). See the ``waypoint.routing`` docstring for the choices made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ambient_api.l7 import (
    HttpRoute,
)
from waypoint.routing.matching import VIRTUAL_SERVICE_KIND, age_order
from waypoint.routing.validation import route_problems


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) -> (lower-case host without brackets, port)."""
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        if end == -1:
            return authority.lower(), None
        host, rest = authority[1:end], authority[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    else:
        host, port_text = authority, ""
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) <= 65535 else None
    return host.lower().rstrip("."), port


def service_names(service_key: str) -> tuple[str, ...]:
    """The names a caller may use for a service: FQDN and Kubernetes short forms."""
    namespace, _, hostname = service_key.partition("/")
    hostname = hostname.lower()
    names = [hostname]
    name, sep, rest = hostname.partition(f".{namespace}.svc")
    if sep and (rest == "" or rest.startswith(".")):
        names += [f"{name}.{namespace}.svc", f"{name}.{namespace}", name]
    return tuple(dict.fromkeys(names))


def hostname_matches(pattern: str, host: str) -> bool:
    """Gateway API hostname matching: exact, or ``*.suffix`` for one or more labels."""
    pattern = pattern.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def _hostname_specificity(route: HttpRoute, names: Sequence[str]) -> tuple[int, int] | None:
    """(chars of a matching exact hostname, chars of a matching hostname); None: no match."""
    if not route.hostnames:
        return (0, 0)
    best: tuple[int, int] | None = None
    for pattern in route.hostnames:
        if any(hostname_matches(pattern, name) for name in names):
            exact = 0 if pattern.startswith("*") else len(pattern)
            score = (exact, len(pattern))
            best = score if best is None or score > best else best
    return best


def _prefer_http_routes(routes: list[HttpRoute]) -> list[HttpRoute]:
    http_routes = [r for r in routes if r.source_kind != VIRTUAL_SERVICE_KIND]
    return http_routes or routes


def attached_routes(
    routes: Iterable[HttpRoute],
    *,
    service_key: str | None,
    waypoint_key: str,
    host: str,
    source_namespace: str | None = None,
) -> list[HttpRoute]:
    """The accepted routes that govern a request, oldest first (see the module docstring).

    ``service_key`` is the addressed Service (None for traffic addressed to a workload),
    ``host`` the request's authority, ``source_namespace`` the caller's namespace when known
    (from its SPIFFE identity); consumer routes never apply without it. An empty result means
    no route is attached: forward to the addressed destination unchanged."""
    return attached_accepted_routes(
        [route for route in routes if not route_problems(route)], service_key=service_key,
        waypoint_key=waypoint_key, host=host, source_namespace=source_namespace,
    )


def attached_accepted_routes(
    accepted: Sequence[HttpRoute],
    *,
    service_key: str | None,
    waypoint_key: str,
    host: str,
    source_namespace: str | None = None,
) -> list[HttpRoute]:
    """``attached_routes`` over routes that have no ``route_problems``: the per-request
    part, for a proxy that validates routes once per config change."""
    if service_key is not None:
        service_namespace = service_key.partition("/")[0]
        for_service = [r for r in accepted if service_key in r.parents]
        virtual_services = [r for r in for_service if r.source_kind == VIRTUAL_SERVICE_KIND]
        http_routes = [r for r in for_service if r.source_kind != VIRTUAL_SERVICE_KIND]
        consumer = [r for r in http_routes
                    if r.namespace != service_namespace and r.namespace == source_namespace]
        producer = [r for r in http_routes if r.namespace == service_namespace]
        group = consumer or producer or virtual_services
        if group:
            return sorted(group, key=age_order)

    request_host, _ = split_authority(host)
    names = [request_host, *(service_names(service_key) if service_key else ())]
    scored: list[tuple[tuple[int, int], HttpRoute]] = []
    for route in accepted:
        if waypoint_key not in route.parents:
            continue
        specificity = _hostname_specificity(route, names)
        if specificity is not None:
            scored.append((specificity, route))
    if not scored:
        return []
    best = max(score for score, _ in scored)
    group = _prefer_http_routes([route for score, route in scored if score == best])
    return sorted(group, key=age_order)
