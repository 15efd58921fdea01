"""The Kubernetes objects istiod_lite reads, as plain dicts: the kinds it reads, a snapshot of
the cluster (``ClusterObjects``) and how objects are keyed and named.

Every source (the file source, the Kubernetes API source) produces the same
``ClusterObjects`` so that translation does not care where objects came from. Objects stay
plain dicts in the shape users write them (``metadata``, ``spec``, ``status``): translation
reads them like Istio reads the API server's objects, and the admin tools can show them back
unchanged. ``validation.py`` checks each object before it gets here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class SourceError:
    """A problem with one input file, as reported to the user (and in ``LoadResult``)."""

    path: str
    reason: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class InvalidObject(ValueError):
    """A document cannot be used; ``reason`` says which document and what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# (apiVersion, kind) -> ClusterObjects field. Core kinds first, then Istio, then Gateway API.
KIND_FIELDS: dict[tuple[str, str], str] = {
    ("v1", "Namespace"): "namespaces",
    ("v1", "Pod"): "pods",
    ("v1", "Service"): "services",
    ("discovery.k8s.io/v1", "EndpointSlice"): "endpoint_slices",
    ("v1", "ServiceAccount"): "service_accounts",
    ("v1", "Node"): "nodes",
    ("security.istio.io/v1", "AuthorizationPolicy"): "authorization_policies",
    ("security.istio.io/v1beta1", "AuthorizationPolicy"): "authorization_policies",
    ("security.istio.io/v1", "PeerAuthentication"): "peer_authentications",
    ("security.istio.io/v1beta1", "PeerAuthentication"): "peer_authentications",
    ("security.istio.io/v1", "RequestAuthentication"): "request_authentications",
    ("security.istio.io/v1beta1", "RequestAuthentication"): "request_authentications",
    ("networking.istio.io/v1", "VirtualService"): "virtual_services",
    ("networking.istio.io/v1beta1", "VirtualService"): "virtual_services",
    ("networking.istio.io/v1alpha3", "VirtualService"): "virtual_services",
    ("networking.istio.io/v1", "DestinationRule"): "destination_rules",
    ("networking.istio.io/v1beta1", "DestinationRule"): "destination_rules",
    ("networking.istio.io/v1alpha3", "DestinationRule"): "destination_rules",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateways",
    ("gateway.networking.k8s.io/v1beta1", "Gateway"): "gateways",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    ("gateway.networking.k8s.io/v1beta1", "HTTPRoute"): "httproutes",
    ("gateway.networking.k8s.io/v1alpha2", "TCPRoute"): "tcproutes",
    ("policy.ambient-lite.io/v1alpha1", "LocalRateLimit"): "local_rate_limits",
}
CLUSTER_SCOPED_KINDS = frozenset({"Namespace", "Node"})


@dataclass(frozen=True)
class ClusterObjects:
    """A snapshot of the cluster: validated objects by kind, keyed ``namespace/name``
    (``name`` for the cluster-scoped Namespace and Node)."""

    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Stored by the Kubernetes source (issue 4) for the endpoints of selector-less Services;
    # translation does not read them yet.
    endpoint_slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    service_accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    authorization_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    peer_authentications: dict[str, dict[str, Any]] = field(default_factory=dict)
    request_authentications: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Waypoints and what they enforce (issue 3): shapes validated here, meaning checked by
    # ``translate.routes`` (which logs and skips what it cannot use).
    virtual_services: dict[str, dict[str, Any]] = field(default_factory=dict)
    destination_rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateways: dict[str, dict[str, Any]] = field(default_factory=dict)
    httproutes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tcproutes: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_rate_limits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_objects(cls, objects: Iterable[dict[str, Any]]) -> ClusterObjects:
        """Group already validated objects by kind; a later object with the same key wins.
        The objects are shared, not copied: successive snapshots hold the very same dict for
        an unchanged object, which is how translation tells what a change touched (so
        nothing may mutate an object once it is in a snapshot)."""
        by_field: dict[str, dict[str, dict[str, Any]]] = {
            name: {} for name in CLUSTER_OBJECT_FIELDS
        }
        for obj in objects:
            by_field[field_for(obj)][object_key(obj)] = obj
        return cls(**by_field)

    def count(self) -> int:
        return sum(len(getattr(self, name)) for name in CLUSTER_OBJECT_FIELDS)


CLUSTER_OBJECT_FIELDS = tuple(dict.fromkeys(KIND_FIELDS.values()))


def field_for(obj: Mapping[str, Any]) -> str:
    """The ``ClusterObjects`` field holding ``obj`` (which must be of a known kind)."""
    return KIND_FIELDS[(obj["apiVersion"], obj["kind"])]


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name``, or ``name`` for cluster-scoped kinds."""
    metadata = obj["metadata"]
    if obj["kind"] in CLUSTER_SCOPED_KINDS:
        return str(metadata["name"])
    return f"{metadata.get('namespace', 'default')}/{metadata['name']}"


def describe(obj: Mapping[str, Any]) -> str:
    """``Pod demo/sleep``: how an object is named in messages."""
    return f"{obj['kind']} {object_key(obj)}"
