"""``kubectl ambient ztunnel-config``: a ztunnel pod's ``/config_dump`` through the API server.

The API server's pod proxy (``/api/v1/namespaces/istio-system/pods/<pod>:15000/proxy/...``)
reaches each ztunnel's admin port without a port-forward or any network path from the user's
machine to the nodes; it needs only ``get`` on ``pods/proxy``. The dump is then rendered by
``ambientctl.ztunnelconfig`` exactly as in the embedded mode.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ambientctl.kube.api import (
    Kube,
    KubeApiError,
    KubeError,
    NotFound,
    api_path,
    labels_of,
    name_of,
)
from ambientctl.ztunnelconfig import CONFIG_DUMP_PATH, DEFAULT_ADMIN_PORT

ZTUNNEL_NAMESPACE = "istio-system"
ZTUNNEL_SELECTOR = "app=ztunnel"


@dataclass(frozen=True)
class ZtunnelPod:
    name: str
    node: str
    phase: str
    ready: bool
    created: str  # metadata.creationTimestamp
    restarts: int


def ztunnel_pod(pod: Mapping[str, Any]) -> ZtunnelPod:
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    return ZtunnelPod(
        name=name_of(pod),
        node=str(spec.get("nodeName") or ""),
        phase=str(status.get("phase") or "Unknown"),
        ready=pod_ready(pod),
        created=str((pod.get("metadata") or {}).get("creationTimestamp") or ""),
        restarts=sum(
            int(c.get("restartCount") or 0)
            for c in status.get("containerStatuses") or ()
            if isinstance(c, Mapping)
        ),
    )


def pod_ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def list_ztunnel_pods(kube: Kube, node: str | None = None) -> list[ZtunnelPod]:
    """The ztunnel pods (label ``app=ztunnel`` in istio-system), by node name."""
    pods = kube.list(
        api_path("v1", "pods", ZTUNNEL_NAMESPACE),
        label_selector=ZTUNNEL_SELECTOR,
        field_selector=f"spec.nodeName={node}" if node else None,
    )
    return sorted((ztunnel_pod(p) for p in pods), key=lambda p: (p.node, p.name))


def choose_pod(pods: Sequence[ZtunnelPod], *, node: str | None = None) -> ZtunnelPod:
    """The pod to ask: the one on ``node``; with no node, the first running one (workloads,
    services and policies are the same on every ztunnel; certificates are per node, so ask
    with --node for those)."""
    if not pods:
        where = f" on node {node!r}" if node else ""
        raise KubeError(
            f"no ztunnel pod{where} (label {ZTUNNEL_SELECTOR} in namespace {ZTUNNEL_NAMESPACE}); "
            "is ambient-lite installed (`kubectl ambient install`)?"
        )
    running = [p for p in pods if p.phase == "Running"]
    return (running or list(pods))[0]


def find_ztunnel(kube: Kube, *, node: str | None = None, pod: str | None = None) -> ZtunnelPod:
    if pod is not None:
        found = kube.get_optional(api_path("v1", "pods", ZTUNNEL_NAMESPACE, pod))
        if found is None:
            raise KubeError(f"no pod {pod!r} in namespace {ZTUNNEL_NAMESPACE}")
        if labels_of(found).get("app") != "ztunnel":
            raise KubeError(f"pod {ZTUNNEL_NAMESPACE}/{pod} is not a ztunnel ({ZTUNNEL_SELECTOR})")
        return ztunnel_pod(found)
    return choose_pod(list_ztunnel_pods(kube, node), node=node)


def proxy_path(pod: str, port: int, path: str, namespace: str = ZTUNNEL_NAMESPACE) -> str:
    """The API server's proxy path to ``path`` on ``pod:port``."""
    return f"{api_path('v1', 'pods', namespace, pod)}:{port}/proxy/{path.lstrip('/')}"


def fetch_pod_config_dump(
    kube: Kube, pod: str, admin_port: int = DEFAULT_ADMIN_PORT
) -> dict[str, Any]:
    """GET the ztunnel's ``/config_dump`` through the pod proxy."""
    path = proxy_path(pod, admin_port, CONFIG_DUMP_PATH)
    try:
        data = kube.request_raw("GET", path)
    except NotFound as exc:
        raise KubeError(f"ztunnel pod {pod}: {exc.message or 'not found'}") from None
    except KubeApiError as exc:  # the path is ours, not news to the user: just the answer
        raise KubeError(
            f"cannot read ztunnel {pod}'s config dump: {exc.status} {exc.reason}: {exc.message}"
        ) from None
    except KubeError as exc:
        raise KubeError(f"cannot read ztunnel {pod}'s config dump: {exc}") from None
    try:
        dump = json.loads(data)
    except ValueError as exc:
        raise KubeError(f"ztunnel {pod}'s config dump is not JSON: {exc}") from None
    if not isinstance(dump, dict):
        raise KubeError(f"ztunnel {pod}'s config dump is a {type(dump).__name__}, not an object")
    return dump
