"""The wire contract: what istiod_lite tells every proxy about the mesh.

Shaped after Istio's workload discovery (Workload, Service, Authorization) so that a user who
reads ztunnel's config dump recognises every field. These are plain frozen dataclasses with a
JSON codec (see ``codec.py``); this module imports nothing heavier than the standard library,
so proxies can depend on it without pulling in the control plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class TunnelProtocol(StrEnum):
    NONE = "NONE"
    HBONE = "HBONE"


class WorkloadStatus(StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class AuthorizationScope(StrEnum):
    GLOBAL = "GLOBAL"
    NAMESPACE = "NAMESPACE"
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"


class AuthorizationAction(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class LoadBalancingMode(StrEnum):
    STRICT = "STRICT"
    FAILOVER = "FAILOVER"


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True)
class GatewayAddress:
    """Where a waypoint (or east-west gateway) is reached: a Service host or an IP."""

    destination: str
    hbone_port: int = 15008


@dataclass(frozen=True)
class PortMapping:
    service_port: int
    target_port: int
    app_protocol: str = ""


@dataclass(frozen=True)
class NetworkAddress:
    network: str
    address: str


@dataclass(frozen=True)
class LoadBalancing:
    routing_preference: tuple[str, ...] = ()
    mode: LoadBalancingMode = LoadBalancingMode.FAILOVER


@dataclass(frozen=True)
class Workload:
    """One pod (or VM) as the data plane sees it. Keyed by ``uid``."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[str, ...]
    service_account: str
    node: str
    trust_domain: str = "cluster.local"
    network: str = ""
    cluster_id: str = "Kubernetes"
    tunnel_protocol: TunnelProtocol = TunnelProtocol.HBONE
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    locality: Locality = field(default_factory=Locality)
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: str = "pod"
    workload_name: str = ""
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    # "namespace/hostname" keys of the Services that select this workload.
    services: tuple[str, ...] = ()
    # "namespace/name" keys of the Authorization resources that apply to this workload
    # (selector-scoped ones only; NAMESPACE and GLOBAL scope are found by the proxy).
    authorization_policies: tuple[str, ...] = ()
    # Ports transparent capture leaves alone (Istio's pod annotations
    # traffic.sidecar.istio.io/excludeInboundPorts / excludeOutboundPorts, which istio-cni
    # reads from the pod; our node agent is ztunnel, so they travel with the workload).
    capture_exclude_inbound_ports: tuple[int, ...] = ()
    capture_exclude_outbound_ports: tuple[int, ...] = ()

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service. Keyed by ``namespace/hostname``; endpoints are the workloads
    whose ``services`` list this key."""

    name: str
    namespace: str
    hostname: str
    addresses: tuple[NetworkAddress, ...] = ()
    ports: tuple[PortMapping, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancing: LoadBalancing | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True)
class Match:
    """One alternative inside a clause. Values of one field are OR'd, fields are AND'd.

    String matches follow Istio: exact, ``prefix*``, ``*suffix`` or ``*`` (present).
    Principals are written as Istio users write them, without the scheme
    (``cluster.local/ns/demo/sa/sleep``) and compared with the peer's SPIFFE id minus it.
    IP matches are addresses or CIDRs. An empty tuple means "field not constrained".
    """

    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    source_ips: tuple[str, ...] = ()
    not_source_ips: tuple[str, ...] = ()
    destination_ips: tuple[str, ...] = ()
    not_destination_ips: tuple[str, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class Clause:
    """Matches are OR'd."""

    matches: tuple[Match, ...] = ()


@dataclass(frozen=True)
class Rule:
    """Clauses are AND'd. A rule with no clauses matches everything."""

    clauses: tuple[Clause, ...] = ()


@dataclass(frozen=True)
class Authorization:
    """An L4 authorization policy. Keyed by ``namespace/name``. Rules are OR'd; a policy
    with no rules matches nothing for DENY and nothing for ALLOW (as Istio's ``{}`` spec
    without rules denies all when ALLOW)."""

    name: str
    namespace: str
    scope: AuthorizationScope
    action: AuthorizationAction
    rules: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Node:
    """A node of the mesh: in the embedded mode it tells which loopback address the node's
    ztunnel owns. Keyed by ``name``."""

    name: str
    address: str
    cluster_id: str = "Kubernetes"
    locality: Locality = field(default_factory=Locality)


Resource = Workload | Service | Authorization | Node

KIND_BY_TYPE: dict[type, str] = {
    Workload: "workload",
    Service: "service",
    Authorization: "authorization",
    Node: "node",
}
TYPE_BY_KIND: dict[str, type] = {kind: cls for cls, kind in KIND_BY_TYPE.items()}


def resource_key(resource: Resource) -> str:
    """The name under which a resource travels on the discovery stream."""
    if isinstance(resource, Workload):
        return resource.uid
    if isinstance(resource, Service | Authorization):
        return resource.key
    return resource.name
