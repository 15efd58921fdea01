"""Successive snapshots of the cluster -> the complete resource set, translating again
only what a change can have changed (``IncrementalTranslator``). Which object becomes which
resource is decided by the translators this module drives: ``l4.py`` (Nodes, Services,
Workloads, Authorizations), ``waypoints.py``, ``routes.py`` and ``security.py``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ambient_api.kinds import AnyResource
from ambient_api.model import Resource, Service, Workload, resource_key
from istiod_lite.sources.objects import CLUSTER_OBJECT_FIELDS, ClusterObjects
from istiod_lite.translate.common import PolicyError, convert_each, convert_one
from istiod_lite.translate.l4 import L4Translator, SelectorPolicy
from istiod_lite.translate.mesh import MeshConfig
from istiod_lite.translate.routes import route_resources
from istiod_lite.translate.security import security_resources
from istiod_lite.translate.waypoints import waypoint_resources


def translate(objects: ClusterObjects, mesh: MeshConfig | None = None) -> list[AnyResource]:
    """Everything the proxies should know, sorted by kind then key (stable output): the L4
    model, the waypoints' Services and Workloads, and the L7 resources waypoints read."""
    return IncrementalTranslator(mesh).translate(objects)


class IncrementalTranslator:
    """Translates successive snapshots of one cluster, as istiod's source loop does.

    Pods change far more often than anything else (every rollout, every scale-up), and at
    10,000 pods translating the whole cluster per change is what bounds how fast a change
    reaches the proxies. Sources hand over the very same dict for an object that did not
    change, so when only pods changed, only the pods that are new or different are
    translated again, plus what reads pods (Services with a named ``targetPort``, embedded
    waypoints); any other change translates everything, since a Service, namespace, node,
    policy or Gateway can change any workload. Either way the result equals
    ``translate(objects)``."""

    def __init__(self, mesh: MeshConfig | None = None) -> None:
        self.mesh = mesh or MeshConfig()
        self._last: _Translation | None = None

    def translate(self, objects: ClusterObjects) -> list[AnyResource]:
        last = self._last
        if last is None or not _same_except_pods(last.objects, objects):
            translation = _Translation.full(objects, self.mesh)
        elif _same_objects(last.objects.pods, objects.pods):
            translation = last
        else:
            translation = last.with_pods(objects)
        self._last = translation  # only once it succeeded: a failure keeps the last good one
        return translation.resources()

    @property
    def policy_errors(self) -> tuple[PolicyError, ...]:
        """The policy parts the last translation could not carry over as written (each made
        its policy fail closed and was logged)."""
        return () if self._last is None else self._last.policy_errors


@dataclass(frozen=True)
class _Translation:
    """One snapshot's results, kept per object so that the next snapshot can reuse them."""

    objects: ClusterObjects
    mesh: MeshConfig
    selector_policies: list[SelectorPolicy]
    nodes: list[Resource]
    authorizations: list[Resource]
    services: dict[str, Service | None]  # Service key -> result (None: left out)
    workloads: dict[str, tuple[dict[str, Any], Workload | None]]  # pod key -> (pod, result)
    waypoints: list[Resource]
    l7: list[AnyResource]
    policy_errors: tuple[PolicyError, ...]

    @classmethod
    def full(cls, objects: ClusterObjects, mesh: MeshConfig) -> _Translation:
        translator = L4Translator(objects, mesh, [])
        # Authorizations first: workloads list the selector-scoped ones that select them.
        authorizations: list[Resource] = [
            *convert_each(objects.authorization_policies, translator.authorization),
            *convert_each(objects.peer_authentications, translator.peer_authentication),
        ]
        waypoint_policy_errors: list[PolicyError] = []
        l7: list[AnyResource] = [
            *route_resources(objects, mesh),
            *security_resources(objects, mesh, errors=waypoint_policy_errors),
        ]
        return cls(
            objects=objects,
            mesh=mesh,
            selector_policies=translator.selector_policies,
            nodes=sorted(convert_each(objects.nodes, translator.node), key=resource_key),
            authorizations=sorted(authorizations, key=resource_key),
            services={
                key: convert_one(key, service, translator.service)
                for key, service in objects.services.items()
            },
            workloads={
                key: (pod, convert_one(key, pod, translator.workload))
                for key, pod in objects.pods.items()
            },
            waypoints=sorted(waypoint_resources(objects, mesh), key=resource_key),
            l7=l7,
            policy_errors=(*translator.policy_errors, *waypoint_policy_errors),
        )

    def with_pods(self, objects: ClusterObjects) -> _Translation:
        """This translation for ``objects``, which differs from ours in pods only."""
        translator = L4Translator(objects, self.mesh, self.selector_policies)
        workloads = {}
        for key, pod in objects.pods.items():
            held = self.workloads.get(key)
            if held is None or held[0] is not pod:
                held = (pod, convert_one(key, pod, translator.workload))
            workloads[key] = held
        services = dict(self.services)
        for key, service in objects.services.items():
            if _reads_pods(service):
                services[key] = convert_one(key, service, translator.service)
        return replace(
            self,
            objects=objects,
            services=services,
            workloads=workloads,
            waypoints=sorted(waypoint_resources(objects, self.mesh), key=resource_key),
        )

    def resources(self) -> list[AnyResource]:
        services = [service for service in self.services.values() if service is not None]
        workloads = [workload for _pod, workload in self.workloads.values() if workload]
        return [
            *self.nodes,
            *sorted(services, key=resource_key),
            *self.authorizations,
            *sorted(workloads, key=resource_key),
            *self.waypoints,
            *self.l7,
        ]


def _same_objects(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two snapshots of one kind hold the very same objects (identity: a source
    passes an unchanged object on as the same dict)."""
    return len(old) == len(new) and all(new.get(key) is obj for key, obj in old.items())


def _same_except_pods(old: ClusterObjects, new: ClusterObjects) -> bool:
    return all(
        _same_objects(getattr(old, name), getattr(new, name))
        for name in CLUSTER_OBJECT_FIELDS
        if name != "pods"
    )


def _reads_pods(service: Mapping[str, Any]) -> bool:
    """A Service whose translation reads its pods: a named ``targetPort`` is looked up in
    the selected pods' container ports."""
    return any(
        isinstance(port.get("targetPort"), str) and not port["targetPort"].isdecimal()
        for port in (service.get("spec") or {}).get("ports") or []
    )
