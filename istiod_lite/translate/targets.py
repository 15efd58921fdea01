"""``targetRefs`` of the policies waypoints enforce (AuthorizationPolicy,
RequestAuthentication) -> the target keys of ``ambient_api.l7``: a waypoint ``Gateway``
(group ``gateway.networking.k8s.io``) -> ``waypoint:<ns>/<name>``, a ``Service`` ->
``<ns>/<name>.<ns>.svc.<cluster domain>``. A reference to another namespace is ignored
(Istio requires the policy's own); one that cannot be resolved (malformed, another kind) is
reported, for the caller to fail closed with ``namespace_targets``. A target naming an
object that does not exist is kept, with a warning: it takes effect when the object
appears."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from ambient_api import l7
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate.common import GATEWAY_GROUP, name_of, namespace_of, service_hostname
from istiod_lite.translate.mesh import MeshConfig

logger = structlog.get_logger(__name__)


def target_refs(spec: Mapping[str, Any]) -> list[Any]:
    """``targetRefs``, or the singular ``targetRef`` as a list; ValueError if not a list."""
    refs = spec.get("targetRefs")
    if refs is None and spec.get("targetRef") is not None:
        refs = [spec["targetRef"]]
    if refs is None:
        return []
    if not isinstance(refs, list):
        raise ValueError("spec.targetRefs must be a list")
    return refs


def resolve_targets(
    refs: Iterable[Any], namespace: str, where: str, objects: ClusterObjects, mesh: MeshConfig
) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """``targetRefs`` -> (target keys, (field, reason) of each reference naming nothing we
    can resolve); every unusable reference is logged."""
    targets: list[str] = []
    unresolved: list[tuple[str, str]] = []
    for index, ref in enumerate(refs):
        field = f"targetRefs[{index}]"
        if not isinstance(ref, Mapping) or not ref.get("name") or not ref.get("kind"):
            logger.warning("target reference needs kind and name", policy=where, field=field)
            unresolved.append((field, "needs kind and name"))
            continue
        kind, name = str(ref["kind"]), str(ref["name"])
        group = str(ref.get("group") or "")
        ref_namespace = str(ref.get("namespace") or namespace)
        if ref_namespace != namespace:
            logger.warning(
                "target reference to another namespace; ignored (it must be the policy's)",
                policy=where, field=field, target_namespace=ref_namespace,
            )
            continue
        if kind == "Gateway" and group == GATEWAY_GROUP:
            if f"{namespace}/{name}" not in objects.gateways:
                logger.warning("policy targets a Gateway that does not exist", policy=where,
                               gateway=f"{namespace}/{name}")
            targets.append(l7.waypoint_key(namespace, name))
        elif kind == "Service" and group in ("", "core"):
            if f"{namespace}/{name}" not in objects.services:
                logger.warning("policy targets a Service that does not exist", policy=where,
                               service=f"{namespace}/{name}")
            targets.append(f"{namespace}/{service_hostname(name, namespace, mesh)}")
        else:
            logger.warning(
                "target kind not supported (use a waypoint Gateway or a Service)",
                policy=where, field=field, group=group, kind=kind,
            )
            unresolved.append((field, f"target kind {group or 'core'}/{kind} not supported"))
    return tuple(dict.fromkeys(targets)), unresolved


def namespace_targets(namespace: str, objects: ClusterObjects, mesh: MeshConfig) -> list[str]:
    """Everything a policy of ``namespace`` could target: its Gateways and Services."""
    gateways = [
        l7.waypoint_key(namespace_of(g), name_of(g))
        for g in objects.gateways.values()
        if namespace_of(g) == namespace
    ]
    services = [
        f"{namespace}/{service_hostname(name_of(s), namespace, mesh)}"
        for s in objects.services.values()
        if namespace_of(s) == namespace
    ]
    return sorted(gateways) + sorted(services)
