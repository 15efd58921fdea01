"""Every resource kind on the discovery stream, L4 (``model``) and L7 (``l7``), by name."""

from __future__ import annotations

from ambient_api import l7, model

AnyResource = (
    model.Resource
    | l7.HttpRoute
    | l7.TcpRoute
    | l7.TrafficPolicy
    | l7.RateLimit
    | l7.WaypointAuthorization
    | l7.JwtPolicy
)

KIND_BY_TYPE: dict[type, str] = {
    **model.KIND_BY_TYPE,
    l7.HttpRoute: "httproute",
    l7.TcpRoute: "tcproute",
    l7.TrafficPolicy: "trafficpolicy",
    l7.RateLimit: "ratelimit",
    l7.WaypointAuthorization: "waypointauthorization",
    l7.JwtPolicy: "jwtpolicy",
}
TYPE_BY_KIND: dict[str, type] = {kind: cls for cls, kind in KIND_BY_TYPE.items()}

# What a ztunnel needs; a subscriber that names no kinds gets these.
L4_KINDS: frozenset[str] = frozenset(model.KIND_BY_TYPE.values())
ALL_KINDS: frozenset[str] = frozenset(KIND_BY_TYPE.values())


def resource_key(resource: AnyResource) -> str:
    """The name under which a resource travels on the discovery stream."""
    if isinstance(resource, model.Workload | model.Service | model.Authorization | model.Node):
        return model.resource_key(resource)
    return resource.key
