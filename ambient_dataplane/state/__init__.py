"""What a proxy knows about the mesh: the discovery stream's resources, validated and
indexed (``proxy_state.ProxyState``), what each update changed (``changes``), how a resource
is decoded (``decoding``) and how workloads' addresses and identities are read
(``addresses``)."""

from ambient_dataplane.state.addresses import address_of, canonical_ip, identity_of, is_hbone
from ambient_dataplane.state.changes import AppliedChange, KindChange
from ambient_dataplane.state.proxy_state import (
    AUTHORIZATION,
    CLUSTER_DOMAIN,
    KINDS,
    L4_KINDS,
    NODE,
    SERVICE,
    WORKLOAD,
    Destination,
    ProxyState,
    ResolveError,
    service_for_hostname,
)

__all__ = [
    "AUTHORIZATION",
    "CLUSTER_DOMAIN",
    "KINDS",
    "L4_KINDS",
    "NODE",
    "SERVICE",
    "WORKLOAD",
    "AppliedChange",
    "Destination",
    "KindChange",
    "ProxyState",
    "ResolveError",
    "address_of",
    "canonical_ip",
    "identity_of",
    "is_hbone",
    "service_for_hostname",
]
