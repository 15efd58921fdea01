"""The resource types the stand-in serves, and their URL shapes (sans-IO).

Kept apart from the server so tests and the store agree on one table: group, version, plural,
kind, scope, and whether the type has a ``/status`` subresource (which decides whether ordinary
writes may change ``.status``, as on a real API server).
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    """One served resource (a REST collection)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_status: bool = True
    # Custom resources (CRDs) reject strategic merge patch with 415, as real servers do.
    custom: bool = False
    verbs: tuple[str, ...] = ALL_VERBS

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified_name(self) -> str:
        """``pods`` or ``leases.coordination.k8s.io``: how real error messages name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_version_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def collection_path(self, namespace: str | None = None) -> str:
        if self.namespaced and namespace:
            return f"{self.group_version_path}/namespaces/{namespace}/{self.plural}"
        return f"{self.group_version_path}/{self.plural}"


def _core(plural: str, kind: str, namespaced: bool = True, status: bool = False) -> ResourceType:
    return ResourceType("", "v1", plural, kind, namespaced, has_status=status)


RESOURCES: tuple[ResourceType, ...] = (
    _core("namespaces", "Namespace", namespaced=False, status=True),
    _core("nodes", "Node", namespaced=False, status=True),
    _core("pods", "Pod", status=True),
    _core("services", "Service", status=True),
    _core("serviceaccounts", "ServiceAccount"),
    _core("secrets", "Secret"),
    _core("configmaps", "ConfigMap"),
    _core("endpoints", "Endpoints"),
    _core("events", "Event"),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, False),
    ResourceType("apps", "v1", "deployments", "Deployment", True),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", True),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, False),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True, False),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True, False),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, False),
    ResourceType(
        "rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False, False
    ),
    ResourceType(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
        False,
    ),
    ResourceType("gateway.networking.k8s.io", "v1", "gateways", "Gateway", True, custom=True),
    ResourceType("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", True, custom=True),
    ResourceType(
        "gateway.networking.k8s.io", "v1alpha2", "tcproutes", "TCPRoute", True, custom=True
    ),
    ResourceType(
        "security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", True,
        custom=True,
    ),
    ResourceType(
        "security.istio.io", "v1", "peerauthentications", "PeerAuthentication", True, custom=True
    ),
    ResourceType(
        "security.istio.io", "v1", "requestauthentications", "RequestAuthentication", True,
        custom=True,
    ),
    ResourceType(
        "networking.istio.io", "v1", "virtualservices", "VirtualService", True, custom=True
    ),
    ResourceType(
        "networking.istio.io", "v1", "destinationrules", "DestinationRule", True, custom=True
    ),
    ResourceType(
        "policy.ambient-lite.io", "v1alpha1", "localratelimits", "LocalRateLimit", True,
        custom=True,
    ),
    ResourceType(
        "authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, False,
        verbs=("create",),
    ),
)

_BY_PLURAL: dict[str, ResourceType] = {r.plural: r for r in RESOURCES}
_BY_API_VERSION_KIND: dict[tuple[str, str], ResourceType] = {
    (r.api_version, r.kind): r for r in RESOURCES
}
_BY_GROUP_VERSION: dict[tuple[str, str], dict[str, ResourceType]] = {}
for _resource in RESOURCES:
    _BY_GROUP_VERSION.setdefault((_resource.group, _resource.version), {})[_resource.plural] = (
        _resource
    )


class UnknownResource(KeyError):
    """A plural, kind or group/version the stand-in does not serve."""

    def __str__(self) -> str:
        return str(self.args[0])


def resource_named(name: str) -> ResourceType:
    """A resource by plural (``pods``), qualified plural (``leases.coordination.k8s.io``) or
    kind (``Pod``); for the test hooks, where typing a group would only be noise."""
    plural = name.split(".", 1)[0]
    if plural in _BY_PLURAL:
        return _BY_PLURAL[plural]
    for resource in RESOURCES:
        if resource.kind == name:
            return resource
    raise UnknownResource(f"the stand-in serves no resource named {name!r}")


def resource_for_object(obj: dict[str, object]) -> ResourceType:
    """The resource an object belongs to, from its ``apiVersion`` and ``kind``."""
    key = (str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    if key not in _BY_API_VERSION_KIND:
        raise UnknownResource(f"the stand-in serves no apiVersion={key[0]!r} kind={key[1]!r}")
    return _BY_API_VERSION_KIND[key]


def resources_in(group: str, version: str) -> dict[str, ResourceType]:
    """The plurals served under one group/version (empty when none)."""
    return _BY_GROUP_VERSION.get((group, version), {})


def served_group_versions() -> list[tuple[str, str]]:
    return list(_BY_GROUP_VERSION)
