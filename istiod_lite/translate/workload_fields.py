"""What the fields of Pods and Service ports mean to the mesh, read the way Istio reads them.

The L4 translator asks these questions of each object: who owns a pod (its Deployment or
CronJob), whether it is healthy, its locality and canonical name and revision, which ports
its capture must leave alone, and which port and protocol a Service port forwards to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from ambient_api.model import Locality, WorkloadStatus
from istiod_lite.labels import (
    CANONICAL_NAME_LABEL,
    CANONICAL_REVISION_LABEL,
    REGION_LABEL,
    SUBZONE_LABEL,
    ZONE_LABEL,
)
from istiod_lite.translate.common import labels_of, name_of, namespace_of

logger = structlog.get_logger(__name__)

CANONICAL_NAME_LABELS = (CANONICAL_NAME_LABEL, "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = (CANONICAL_REVISION_LABEL, "app.kubernetes.io/version", "version")
# Istio's protocol selection by port name: "<protocol>[-<suffix>]".
KNOWN_PORT_PROTOCOLS = frozenset(
    {"http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "mysql", "redis"}
)
EXCLUDE_INBOUND_ANNOTATION = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUTBOUND_ANNOTATION = "traffic.sidecar.istio.io/excludeOutboundPorts"


def target_port(
    port: Mapping[str, Any], selected_pods: Callable[[], Iterable[Mapping[str, Any]]]
) -> int:
    """The port number a Service port forwards to; a named ``targetPort`` is resolved in the
    selected pods (only then are they looked up)."""
    target = port.get("targetPort")
    if target is None:
        return int(port["port"])
    if isinstance(target, int):
        return target
    if target.isdecimal():
        return int(target)
    for pod in selected_pods():
        for container in (pod.get("spec") or {}).get("containers") or []:
            for container_port in container.get("ports") or []:
                if container_port.get("name") == target:
                    return int(container_port["containerPort"])
    return int(port["port"])


def app_protocol(port: Mapping[str, Any]) -> str:
    if port.get("appProtocol"):
        return str(port["appProtocol"]).lower()
    name = str(port.get("name") or "").lower()
    if name.startswith("grpc-web"):
        return "grpc-web"
    prefix = name.split("-", 1)[0]
    return prefix if prefix in KNOWN_PORT_PROTOCOLS else ""


def locality(labels: Mapping[str, str]) -> Locality:
    return Locality(
        region=labels.get(REGION_LABEL, ""),
        zone=labels.get(ZONE_LABEL, ""),
        subzone=labels.get(SUBZONE_LABEL, ""),
    )


def first_label(labels: Mapping[str, str], keys: Iterable[str]) -> str:
    for key in keys:
        if labels.get(key):
            return labels[key]
    return ""


_GENERATED_SUFFIX = re.compile(r"^(?P<base>.+)-[a-z0-9]{5,10}$")
_CRONJOB_SUFFIX = re.compile(r"^(?P<base>.+)-\d{8,}$")


def port_list_annotation(pod: Mapping[str, Any], annotation: str) -> tuple[int, ...]:
    """Istio's comma-separated port list; entries that are not ports are logged and skipped
    (one bad entry must not cost the pod its other exclusions)."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(annotation)
    if not text:
        return ()
    ports: list[int] = []
    for entry in str(text).split(","):
        entry = entry.strip()
        if entry.isdigit() and 0 < int(entry) < 65536:
            ports.append(int(entry))
        elif entry:
            logger.warning("ignored an invalid port in an annotation", annotation=annotation,
                           value=entry, pod=f"{namespace_of(pod)}/{name_of(pod)}")
    return tuple(sorted(set(ports)))


def workload_owner(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(workload_type, workload_name) as Istio derives them: the Deployment behind a
    ReplicaSet, the CronJob behind a Job, another controller's name, else the pod itself."""
    metadata = pod["metadata"]
    owners = metadata.get("ownerReferences") or []
    controller = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if controller is None:
        return "pod", name_of(pod)
    kind, owner_name = controller["kind"], controller["name"]
    if kind == "ReplicaSet":
        template_hash = labels_of(pod).get("pod-template-hash")
        if template_hash and owner_name.endswith(f"-{template_hash}"):
            return "deployment", owner_name[: -len(template_hash) - 1]
        generated = _GENERATED_SUFFIX.match(owner_name)
        if generated:
            return "deployment", generated["base"]
        return "pod", owner_name
    if kind == "Job":
        cron = _CRONJOB_SUFFIX.match(owner_name)
        if cron:
            return "cronjob", cron["base"]
        return "job", owner_name
    return "pod", owner_name


def pod_status(pod: Mapping[str, Any]) -> WorkloadStatus:
    status = pod.get("status") or {}
    if status.get("phase", "Running") != "Running":
        return WorkloadStatus.UNHEALTHY
    if pod["metadata"].get("deletionTimestamp"):
        return WorkloadStatus.UNHEALTHY
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") == "False":
            return WorkloadStatus.UNHEALTHY
    return WorkloadStatus.HEALTHY
