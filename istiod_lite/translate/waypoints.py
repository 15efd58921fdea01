"""Waypoint Gateways -> the wire model.

``translate()`` calls ``waypoint_resources`` (each waypoint Gateway's Service and Workload);
the L4 translator uses ``waypoint_gateway`` and ``waypoint_for`` to decide which objects
really get a waypoint. Decisions worth knowing:

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

A broken Gateway is logged with the reason and skipped; it never stops translation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import structlog

from ambient_api.model import (
    Locality,
    NetworkAddress,
    PortMapping,
    Resource,
    Service,
    TunnelProtocol,
    Workload,
)
from istiod_lite.labels import (
    GATEWAY_NAME_LABEL,
    REGION_LABEL,
    SERVICE_ACCOUNT_ANNOTATION,
    SUBZONE_LABEL,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_GATEWAY_CLASS,
    ZONE_LABEL,
)
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate.common import (
    annotations_of,
    convert_each,
    labels_of,
    name_of,
    namespace_of,
    service_hostname,
    where_of,
)
from istiod_lite.translate.mesh import MeshConfig

logger = structlog.get_logger(__name__)

# The node an embedded waypoint runs on (ambient-lite's own: it has no pod to say so).
NODE_ANNOTATION = "ambient-lite.io/node"
HBONE_PORT = 15008

WaypointFor = Literal["service", "workload", "all", "none"]


def is_waypoint(gateway: Mapping[str, Any]) -> bool:
    """Whether a Gateway object is a waypoint (its class is ``istio-waypoint``); safe on
    unvalidated YAML (a spec that is not a mapping is no waypoint). ambientctl uses it too."""
    spec = gateway.get("spec")
    return isinstance(spec, Mapping) and spec.get("gatewayClassName") == WAYPOINT_GATEWAY_CLASS


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
            gateway=where_of(gateway),
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
    annotations = annotations_of(gateway)
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
                region=node_labels.get(REGION_LABEL, ""),
                zone=node_labels.get(ZONE_LABEL, ""),
                subzone=node_labels.get(SUBZONE_LABEL, ""),
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
