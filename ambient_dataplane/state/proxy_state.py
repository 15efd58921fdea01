"""What a ztunnel knows about the mesh: the discovery stream's resources and their indexes.

Sans-IO: ``ProxyState.apply`` takes one ``DeltaUpdate`` from the discovery client and either
applies all of it or none of it (a bad resource raises ``DecodeError``, the client NACKs and
the proxy keeps serving its last good state, as Istio's ztunnel does). Indexes are kept up to
date on every apply so the per-connection lookups (``resolve``, ``policies_for``) are dict
reads, not scans.

Every kind of ``ambient_api.kinds`` is accepted, so a waypoint reuses this state: the L4
kinds (workloads, services, authorizations, nodes) are indexed for the lookups below; the L7
kinds (routes, traffic policies, ...) are stored as they come, under the same all-or-nothing
apply and versioning, and read by type with ``resources_of(l7.HttpRoute)`` (or by kind
name, for generic code like the admin dump, with ``resources(kind)`` / ``resource(kind,
key)``).

Addresses are indexed per network (``(network, ip)``), the way Istio keys its address
lookups; every lookup takes ``network`` (default ``""``, the embedded mode's only network).
When two workloads claim one address (pod IP reuse under churn) the most recently written one
wins, and the other becomes visible again if the winner is removed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ambient_api import codec, kinds
from ambient_api.codec import DecodeError
from ambient_api.discovery import DeltaUpdate, versioned_key
from ambient_api.identity import SpiffeId
from ambient_api.model import (
    Authorization,
    AuthorizationScope,
    GatewayAddress,
    Node,
    Service,
    Workload,
    WorkloadStatus,
)
from ambient_dataplane.state.addresses import address_of, canonical_ip, identity_of, is_hbone
from ambient_dataplane.state.changes import AppliedChange, KindChange
from ambient_dataplane.state.decoding import decode_resource

WORKLOAD = "workload"
SERVICE = "service"
AUTHORIZATION = "authorization"
NODE = "node"
L4_KINDS = (WORKLOAD, SERVICE, AUTHORIZATION, NODE)
# Every kind the state holds: the indexed L4 ones first, then the rest in name order.
KINDS: tuple[str, ...] = L4_KINDS + tuple(sorted(set(kinds.TYPE_BY_KIND) - set(L4_KINDS)))

_AddressKey = tuple[str, str]  # (network, canonical ip)
R = TypeVar("R")


class ResolveError(Exception):
    """A destination in the mesh that cannot be reached; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Destination:
    """Where an outbound connection to ``ip:port`` really goes.

    ``kind`` is ``"service"`` (a Service VIP: ``workload`` is the chosen endpoint and
    ``port`` its target port), ``"workload"`` (a pod address) or ``"passthrough"`` (not in the
    mesh: plain TCP to the original address). ``use_hbone`` says whether to tunnel to the
    workload's ztunnel (``ip:15008``) or connect in plaintext. ``waypoint`` is the service's
    waypoint for a service, the workload's for a pod address (as Istio's ztunnel, a workload's
    waypoint is not used for traffic addressed to one of its services).
    """

    kind: Literal["service", "workload", "passthrough"]
    ip: str
    port: int
    workload: Workload | None = None
    service: Service | None = None
    use_hbone: bool = False
    waypoint: GatewayAddress | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)


class ProxyState:
    """The resources from the discovery stream, their versions and lookup indexes."""

    def __init__(self) -> None:
        self._generation = 0
        # kind -> key -> resource, for every kind; the L4 tables also have the indexes below.
        self._tables: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self._workloads: dict[str, Workload] = self._tables[WORKLOAD]
        self._services: dict[str, Service] = self._tables[SERVICE]
        self._authorizations: dict[str, Authorization] = self._tables[AUTHORIZATION]
        self._nodes: dict[str, Node] = self._tables[NODE]
        # kind -> its resources sorted by key, built on first read after a change of the kind
        # (the waypoint reads ``resources(kind)`` per request).
        self._sorted: dict[str, list[Any]] = {}
        self._versions: dict[str, str] = {}
        # Insertion-ordered "sets" (dict keys) so the latest writer of an address wins.
        self._workload_by_address: dict[_AddressKey, dict[str, None]] = {}
        self._service_by_address: dict[_AddressKey, dict[str, None]] = {}
        self._endpoint_uids: dict[str, set[str]] = {}
        self._workloads_by_node: dict[str, set[str]] = {}
        # Policy keys by the namespace they were written in, one index per scope.
        self._global_policies: dict[str, set[str]] = {}
        self._namespace_policies: dict[str, set[str]] = {}
        self._endpoint_cache: dict[str, list[Workload]] = {}
        self._round_robin: dict[str, int] = {}

    # -- updates -----------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Bumped by every apply that changed a resource or a version (for caches)."""
        return self._generation

    def apply(self, update: DeltaUpdate) -> AppliedChange:
        """Apply one update all-or-nothing; raises DecodeError naming the bad resource."""
        upserts = self._decode_all(update)
        removals = self._check_removals(update, upserts)

        changes: dict[str, tuple[set[str], set[str], set[str]]] = {
            kind: (set(), set(), set()) for kind in KINDS
        }
        versions_changed = False
        for (kind, name), (version, resource) in upserts.items():
            vkey = versioned_key(kind, name)
            if self._versions.get(vkey) != version:
                self._versions[vkey] = version
                versions_changed = True
            previous = self._get(kind, name)
            if previous == resource:
                continue
            added, updated, _ = changes[kind]
            (updated if previous is not None else added).add(name)
            self._put(kind, name, previous, resource)
        for kind, name in removals:
            vkey = versioned_key(kind, name)
            if self._versions.pop(vkey, None) is not None:
                versions_changed = True
            previous = self._get(kind, name)
            if previous is None:
                continue
            changes[kind][2].add(name)
            self._delete(kind, name, previous)

        if versions_changed or any(any(sets) for sets in changes.values()):
            self._generation += 1

        def kind_change(kind: str) -> KindChange:
            added, updated, removed = changes[kind]
            return KindChange(frozenset(added), frozenset(updated), frozenset(removed))

        return AppliedChange(
            generation=self._generation,
            workloads=kind_change(WORKLOAD),
            services=kind_change(SERVICE),
            authorizations=kind_change(AUTHORIZATION),
            nodes=kind_change(NODE),
            by_kind={kind: kind_change(kind) for kind in KINDS if any(changes[kind])},
        )

    def known_versions(self) -> dict[str, str]:
        """``versioned_key(kind, name) -> version`` of everything held, for resuming."""
        return dict(self._versions)

    def _decode_all(self, update: DeltaUpdate) -> dict[tuple[str, str], tuple[str, Any]]:
        decoded: dict[tuple[str, str], tuple[str, Any]] = {}
        for item in update.resources:
            decoded[(item.kind, item.name)] = (item.version, decode_resource(item))
        return decoded

    @staticmethod
    def _check_removals(
        update: DeltaUpdate, upserts: dict[tuple[str, str], tuple[str, Any]]
    ) -> list[tuple[str, str]]:
        removals: list[tuple[str, str]] = []
        for removal in update.removed:
            where = f"{removal.kind}/{removal.name}"
            if removal.kind not in kinds.TYPE_BY_KIND:
                raise DecodeError(f"{where}: unknown resource kind {removal.kind!r}")
            if (removal.kind, removal.name) in upserts:
                raise DecodeError(f"{where}: both updated and removed in one update")
            removals.append((removal.kind, removal.name))
        return removals

    def _get(self, kind: str, name: str) -> Any:
        return self._tables[kind].get(name)

    def _put(self, kind: str, name: str, previous: Any, resource: Any) -> None:
        if previous is not None:
            self._unindex(previous)
        self._tables[kind][name] = resource
        self._sorted.pop(kind, None)
        self._index(resource)

    def _delete(self, kind: str, name: str, previous: Any) -> None:
        self._unindex(previous)
        del self._tables[kind][name]
        self._sorted.pop(kind, None)
        if kind == SERVICE:
            self._round_robin.pop(name, None)

    def _index(self, resource: Any) -> None:
        if isinstance(resource, Workload):
            for key in _workload_address_keys(resource):
                self._workload_by_address.setdefault(key, {})[resource.uid] = None
            for service_key in resource.services:
                self._endpoint_uids.setdefault(service_key, set()).add(resource.uid)
                self._endpoint_cache.pop(service_key, None)
            self._workloads_by_node.setdefault(resource.node, set()).add(resource.uid)
        elif isinstance(resource, Service):
            for key in _service_address_keys(resource):
                self._service_by_address.setdefault(key, {})[resource.key] = None
        elif isinstance(resource, Authorization):
            index = self._policy_index(resource)
            if index is not None:
                index.setdefault(resource.namespace, set()).add(resource.key)

    def _unindex(self, resource: Any) -> None:
        if isinstance(resource, Workload):
            for key in _workload_address_keys(resource):
                _discard(self._workload_by_address, key, resource.uid)
            for service_key in resource.services:
                _discard(self._endpoint_uids, service_key, resource.uid)
                self._endpoint_cache.pop(service_key, None)
            _discard(self._workloads_by_node, resource.node, resource.uid)
        elif isinstance(resource, Service):
            for key in _service_address_keys(resource):
                _discard(self._service_by_address, key, resource.key)
        elif isinstance(resource, Authorization):
            index = self._policy_index(resource)
            if index is not None:
                _discard(index, resource.namespace, resource.key)

    def _policy_index(self, policy: Authorization) -> dict[str, set[str]] | None:
        """Where a policy that is not per-workload is indexed (selector policies are found
        through the workloads that list them)."""
        if policy.scope is AuthorizationScope.GLOBAL:
            return self._global_policies
        if policy.scope is AuthorizationScope.NAMESPACE:
            return self._namespace_policies
        return None

    # -- lookups -----------------------------------------------------------------------

    def workload(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def service(self, key: str) -> Service | None:
        return self._services.get(key)

    def authorization(self, key: str) -> Authorization | None:
        return self._authorizations.get(key)

    def node(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def resources(self, kind: str) -> list[Any]:
        """Every resource of ``kind`` (any kind of ``kinds.TYPE_BY_KIND``), sorted by key;
        KeyError for a kind that does not exist. Sorted once per change of the kind; each
        call returns a new list."""
        ordered = self._sorted.get(kind)
        if ordered is None:
            table = self._table_for_lookup(kind)
            ordered = self._sorted[kind] = [table[key] for key in sorted(table)]
        return list(ordered)

    def resource(self, kind: str, key: str) -> Any | None:
        """One resource of ``kind`` by its discovery key, or None."""
        return self._table_for_lookup(kind).get(key)

    def resources_of(self, resource_type: type[R]) -> list[R]:
        """``resources`` of the kind ``kinds.KIND_BY_TYPE`` gives the type, typed as such:
        ``resources_of(l7.TrafficPolicy) -> list[TrafficPolicy]``. KeyError for a type
        that is no resource kind."""
        return self.resources(_kind_of(resource_type))

    def _table_for_lookup(self, kind: str) -> dict[str, Any]:
        table = self._tables.get(kind)
        if table is None:
            raise KeyError(f"unknown resource kind {kind!r}")
        return table

    def workloads(self) -> list[Workload]:
        return self.resources(WORKLOAD)

    def services(self) -> list[Service]:
        return self.resources(SERVICE)

    def authorizations(self) -> list[Authorization]:
        return self.resources(AUTHORIZATION)

    def nodes(self) -> list[Node]:
        return self.resources(NODE)

    def workload_by_address(self, ip: str, *, network: str = "") -> Workload | None:
        uid = self._lookup_address(self._workload_by_address, ip, network)
        return None if uid is None else self._workloads[uid]

    def service_by_address(self, ip: str, *, network: str = "") -> Service | None:
        key = self._lookup_address(self._service_by_address, ip, network)
        return None if key is None else self._services[key]

    @staticmethod
    def _lookup_address(
        index: dict[_AddressKey, dict[str, None]], ip: str, network: str
    ) -> str | None:
        canonical = canonical_ip(ip)
        if canonical is None:
            return None
        holders = index.get((network, canonical))
        return next(reversed(holders)) if holders else None

    def endpoints(self, service_key: str) -> list[Workload]:
        """Workloads that list ``service_key`` in their ``services``, ordered by uid (a
        stable order makes round-robin deterministic); healthy or not."""
        cached = self._endpoint_cache.get(service_key)
        if cached is None:
            uids = sorted(self._endpoint_uids.get(service_key, ()))
            cached = [self._workloads[uid] for uid in uids]
            self._endpoint_cache[service_key] = cached
        return list(cached)

    def local_workloads(self, node: str, *, hbone_only: bool = True) -> list[Workload]:
        """Workloads scheduled on ``node`` (by uid); by default only those enrolled in the
        mesh (HBONE), which are the ones this node's ztunnel serves."""
        uids = sorted(self._workloads_by_node.get(node, ()))
        workloads = [self._workloads[uid] for uid in uids]
        return [w for w in workloads if is_hbone(w)] if hbone_only else workloads

    def local_identities(self, node: str) -> set[SpiffeId]:
        """Identities of the node's enrolled workloads: the certificates the node needs."""
        return {identity_of(w) for w in self.local_workloads(node, hbone_only=True)}

    def policies_for(
        self, workload: Workload, root_namespace: str = "istio-system"
    ) -> list[Authorization]:
        """Policies that apply to connections to ``workload``: GLOBAL ones from the root
        namespace, NAMESPACE ones of its namespace, and the selector policies it lists.
        Ordered (global, namespace, selector; by key within each), without duplicates."""
        keys: list[str] = []
        keys += sorted(self._global_policies.get(root_namespace, ()))
        keys += sorted(self._namespace_policies.get(workload.namespace, ()))
        keys += sorted(k for k in workload.authorization_policies if k in self._authorizations)
        unique = dict.fromkeys(keys)
        return [self._authorizations[key] for key in unique]

    def resolve(self, ip: str, port: int, *, network: str = "") -> Destination:
        """Where an outbound connection to ``ip:port`` goes; ResolveError if it is a mesh
        service that cannot be served. Picks service endpoints round-robin (healthy ones
        with an address, in ``endpoints`` order)."""
        canonical = canonical_ip(ip)
        if canonical is None:
            raise ResolveError(f"{ip!r} is not an IP address")
        service = self.service_by_address(canonical, network=network)
        if service is not None:
            return self._resolve_service(service, port)
        workload = self.workload_by_address(canonical, network=network)
        if workload is not None:
            return Destination(
                kind="workload",
                ip=canonical,
                port=port,
                workload=workload,
                use_hbone=is_hbone(workload),
                waypoint=workload.waypoint,
            )
        return Destination(kind="passthrough", ip=canonical, port=port)

    def _resolve_service(self, service: Service, port: int) -> Destination:
        mapping = next((p for p in service.ports if p.service_port == port), None)
        if mapping is None:
            raise ResolveError(f"service {service.key} has no port {port}")
        chosen = self._pick_endpoint(service)
        if chosen is None:
            raise ResolveError(f"service {service.key} has no healthy endpoint")
        return Destination(
            kind="service",
            ip=address_of(chosen),
            port=mapping.target_port or mapping.service_port,
            workload=chosen,
            service=service,
            use_hbone=is_hbone(chosen),
            # Only the service's own waypoint: the endpoint's (workload) waypoint is for
            # traffic addressed to the pod, as in Istio's ztunnel.
            waypoint=service.waypoint,
        )

    def _pick_endpoint(self, service: Service) -> Workload | None:
        """The next healthy endpoint with an address, round-robin per service."""
        candidates = [
            w
            for w in self.endpoints(service.key)
            if w.status is WorkloadStatus.HEALTHY and w.addresses
        ]
        if not candidates:
            return None
        turn = self._round_robin.get(service.key, 0)
        self._round_robin[service.key] = turn + 1
        return candidates[turn % len(candidates)]

    def waypoint_workload(self, gateway: GatewayAddress, *, network: str = "") -> Workload:
        """The waypoint instance to send a connection to: a healthy endpoint (round-robin)
        of the Service ``gateway.destination`` names (``<gw>.<ns>.svc.cluster.local``, or
        its VIP), or the workload at that IP. ResolveError saying why when there is none,
        so the caller can fail closed."""
        service = self._waypoint_service(gateway, network)
        if service is None:
            ip = canonical_ip(gateway.destination)
            if ip is None:
                raise ResolveError(f"no service {gateway.destination}")
            workload = self.workload_by_address(ip, network=network)
            if workload is None:
                raise ResolveError(f"no service or workload has address {ip}")
            if workload.status is not WorkloadStatus.HEALTHY:
                raise ResolveError(f"workload {workload.uid} is not healthy")
            return workload
        chosen = self._pick_endpoint(service)
        if chosen is None:
            raise ResolveError(f"service {service.key} has no healthy endpoint")
        return chosen

    def is_waypoint_instance(
        self, workload: Workload, gateway: GatewayAddress, *, network: str = ""
    ) -> bool:
        """Whether ``workload`` is one of the waypoint's instances (whose own traffic must
        not be sent back to the waypoint)."""
        service = self._waypoint_service(gateway, network)
        if service is not None:
            return service.key in workload.services
        ip = canonical_ip(gateway.destination)
        return ip is not None and ip in {canonical_ip(a) for a in workload.addresses}

    def _waypoint_service(self, gateway: GatewayAddress, network: str) -> Service | None:
        ip = canonical_ip(gateway.destination)
        if ip is not None:
            return self.service_by_address(ip, network=network)
        return service_for_hostname(self, gateway.destination)

    # -- admin -------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """A JSON-able view for the admin ``/config_dump``, in stable order."""
        return {
            "generation": self._generation,
            "workloads": self.dump_kind(WORKLOAD),
            "services": self.dump_kind(SERVICE),
            "policies": self.dump_kind(AUTHORIZATION),
            "nodes": self.dump_kind(NODE),
            # L7 kinds only when held (a waypoint's state), so a ztunnel's dump is unchanged.
            **{
                kind: self.dump_kind(kind)
                for kind in KINDS
                if kind not in L4_KINDS and self._tables[kind]
            },
        }

    def dump_kind(self, kind: str) -> list[Any]:
        """One kind's section of ``dump()`` (``"policies"`` is ``dump_kind("authorization")``),
        for an admin endpoint that shows a single section."""
        return [codec.to_jsonable(r) for r in self.resources(kind)]


def _kind_of(resource_type: type) -> str:
    kind = kinds.KIND_BY_TYPE.get(resource_type)
    if kind is None:
        raise KeyError(f"{resource_type.__name__} is not a resource kind")
    return kind


def _workload_address_keys(workload: Workload) -> Iterable[_AddressKey]:
    for address in workload.addresses:
        canonical = canonical_ip(address)
        if canonical is not None:
            yield (workload.network, canonical)


def _service_address_keys(service: Service) -> Iterable[_AddressKey]:
    for network_address in service.addresses:
        canonical = canonical_ip(network_address.address)
        if canonical is not None:
            yield (network_address.network, canonical)


def _discard(index: dict[Any, Any], key: Any, member: str) -> None:
    """Remove ``member`` from the set-like value at ``key``, dropping emptied entries."""
    members = index.get(key)
    if members is None:
        return
    if isinstance(members, set):
        members.discard(member)
    else:
        members.pop(member, None)
    if not members:
        del index[key]


CLUSTER_DOMAIN = "cluster.local"
# What may follow ``name.ns`` in a mesh service name: nothing, ``svc`` or the full domain.
_MESH_NAME_SUFFIXES: tuple[list[str], ...] = ([], ["svc"], ["svc", *CLUSTER_DOMAIN.split(".")])


def service_for_hostname(state: ProxyState, host: str) -> Service | None:
    """A mesh Service named as a client would write it: ``name.ns``, ``name.ns.svc`` or the
    full ``name.ns.svc.cluster.local``. Only mesh names resolve: the proxy is no DNS server."""
    parts = host.lower().rstrip(".").split(".")
    if len(parts) < 2 or parts[2:] not in _MESH_NAME_SUFFIXES:
        return None
    name, namespace = parts[0], parts[1]
    return state.service(f"{namespace}/{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
