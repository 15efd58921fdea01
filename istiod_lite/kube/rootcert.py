"""Publishing the mesh root: ConfigMap ``istio-ca-root-cert`` (key ``root-cert.pem``).

Proxies and tools in a namespace read the root they verify istiod and peers with from this
ConfigMap, as with Istio. Istio writes it into *every* namespace; we write it only into the
namespaces enrolled in the mesh (``istio.io/dataplane-mode=ambient``, or whatever
``namespace_filter`` says), as issue 4 asks: nothing outside the mesh needs it. A namespace
that leaves the mesh keeps its ConfigMap (a pod still running there may read it); it is just
no longer repaired.

``reconcile(namespaces)`` is called with the source's namespaces whenever they change;
``run()`` re-runs it periodically so that a ConfigMap someone edited or deleted is put back.
Each pass is one LIST (across namespaces, by name) plus a write per ConfigMap that is missing
or wrong. The plan is the pure ``plan_root_configmaps``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
import trio
from kubernetes import client as k8s

from istiod_lite.kube.client import KubeApiError, call_json
from istiod_lite.labels import AMBIENT, DATAPLANE_MODE_LABEL

log = structlog.get_logger()

ROOT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
# Istio labels the ConfigMaps it manages this way.
CONFIG_LABELS = {"istio.io/config": "true"}
DEFAULT_RESYNC_INTERVAL = 30.0
MERGE_PATCH = "application/merge-patch+json"

NamespaceFilter = Callable[[Mapping[str, Any]], bool]


def is_enrolled(namespace: Mapping[str, Any]) -> bool:
    """A namespace in the ambient mesh: labelled ``istio.io/dataplane-mode=ambient``."""
    labels = (namespace.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(DATAPLANE_MODE_LABEL) == AMBIENT)


def wanted_namespaces(
    namespaces: Mapping[str, Mapping[str, Any]], namespace_filter: NamespaceFilter
) -> frozenset[str]:
    """Names of the namespaces that get the root: those the filter accepts, except namespaces
    being deleted (the API server refuses new objects there)."""
    wanted: set[str] = set()
    for key, namespace in namespaces.items():
        if (namespace.get("status") or {}).get("phase") == "Terminating":
            continue
        if namespace_filter(namespace):
            wanted.add(str((namespace.get("metadata") or {}).get("name") or key))
    return frozenset(wanted)


@dataclass(frozen=True)
class ConfigMapAction:
    """Create the ConfigMap in ``namespace``, or patch the one there back to the root."""

    kind: Literal["create", "patch"]
    namespace: str


def configmap_is_current(configmap: Mapping[str, Any], root_pem: str) -> bool:
    """The ConfigMap holds exactly this root and Istio's labels."""
    data = configmap.get("data") or {}
    labels = (configmap.get("metadata") or {}).get("labels") or {}
    return data.get(ROOT_CERT_KEY) == root_pem and all(
        labels.get(key) == value for key, value in CONFIG_LABELS.items()
    )


def plan_root_configmaps(
    wanted: Iterable[str], existing: Mapping[str, Mapping[str, Any]], root_pem: str
) -> list[ConfigMapAction]:
    """What to write so that every wanted namespace has the current root; ``existing`` maps a
    namespace to its ``istio-ca-root-cert`` ConfigMap. Sorted, so passes are deterministic."""
    actions: list[ConfigMapAction] = []
    for namespace in sorted(wanted):
        configmap = existing.get(namespace)
        if configmap is None:
            actions.append(ConfigMapAction("create", namespace))
        elif not configmap_is_current(configmap, root_pem):
            actions.append(ConfigMapAction("patch", namespace))
    return actions


@dataclass
class ReconcileResult:
    """What one pass did, by namespace."""

    created: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class RootCertPublisher:
    """Keeps ``istio-ca-root-cert`` current in every namespace ``namespace_filter`` accepts."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        root_pems: Sequence[str],
        *,
        namespace_filter: NamespaceFilter = is_enrolled,
        resync_interval: float = DEFAULT_RESYNC_INTERVAL,
    ) -> None:
        if not root_pems:
            raise ValueError("at least one root certificate is required")
        if resync_interval <= 0:
            raise ValueError("resync_interval must be positive")
        self.root_pem = "".join(pem if pem.endswith("\n") else pem + "\n" for pem in root_pems)
        self.namespace_filter = namespace_filter
        self.resync_interval = resync_interval
        self._core = k8s.CoreV1Api(api_client)
        self._wanted: frozenset[str] | None = None
        self._lock = trio.Lock()

    async def reconcile(
        self, namespaces: Mapping[str, Mapping[str, Any]] | None = None
    ) -> ReconcileResult:
        """Bring the ConfigMaps in line with ``namespaces`` (Namespace objects by name, as
        ``ClusterObjects.namespaces``), or with the last namespaces given when None. Never
        raises for API errors: they are logged, reported in the result and retried on the
        next pass."""
        if namespaces is not None:
            self._wanted = wanted_namespaces(namespaces, self.namespace_filter)
        async with self._lock:
            return await self._reconcile_once()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-reconcile every ``resync_interval`` seconds (once namespaces are known), which
        repairs ConfigMaps changed or deleted behind our back."""
        task_status.started()
        while True:
            await trio.sleep(self.resync_interval)
            if self._wanted is not None:
                await self.reconcile()

    async def _reconcile_once(self) -> ReconcileResult:
        result = ReconcileResult()
        wanted = self._wanted
        if wanted is None:
            return result
        try:
            listing = await call_json(
                self._core.list_config_map_for_all_namespaces,
                field_selector=f"metadata.name={ROOT_CONFIGMAP}",
            )
        except KubeApiError as error:
            log.warning("cannot list root ConfigMaps", error=str(error))
            result.failed = {namespace: str(error) for namespace in sorted(wanted)}
            return result
        existing: dict[str, dict[str, Any]] = {}
        for item in listing.get("items") or []:
            metadata = item.get("metadata") or {}
            if metadata.get("name") == ROOT_CONFIGMAP and metadata.get("namespace"):
                existing[metadata["namespace"]] = item
        actions = plan_root_configmaps(wanted, existing, self.root_pem)
        acted = {action.namespace for action in actions}
        result.unchanged = sorted(wanted - acted)
        for action in actions:
            try:
                if action.kind == "create":
                    kind = await self._create(action.namespace)
                else:
                    kind = await self._patch(action.namespace)
            except KubeApiError as error:
                log.warning(
                    "cannot publish the root ConfigMap", namespace=action.namespace,
                    error=str(error),
                )
                result.failed[action.namespace] = str(error)
                continue
            (result.created if kind == "create" else result.patched).append(action.namespace)
            log.info("root ConfigMap published", namespace=action.namespace, action=kind)
        return result

    def _body(self, namespace: str) -> k8s.V1ConfigMap:
        return k8s.V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=k8s.V1ObjectMeta(
                name=ROOT_CONFIGMAP, namespace=namespace, labels=dict(CONFIG_LABELS)
            ),
            data={ROOT_CERT_KEY: self.root_pem},
        )

    async def _post(self, namespace: str) -> None:
        await call_json(self._core.create_namespaced_config_map, namespace, self._body(namespace))

    async def _create(self, namespace: str) -> str:
        """Create; if someone created it since our LIST, patch theirs instead."""
        try:
            await self._post(namespace)
        except KubeApiError as error:
            if error.status != 409:
                raise
            await self._patch(namespace)
            return "patch"
        return "create"

    async def _patch(self, namespace: str) -> str:
        """Merge-patch the root and labels in (other keys are left alone); if it was deleted
        since our LIST, create it."""
        patch = {
            "metadata": {"labels": dict(CONFIG_LABELS)},
            "data": {ROOT_CERT_KEY: self.root_pem},
        }
        try:
            await call_json(
                self._core.patch_namespaced_config_map, ROOT_CONFIGMAP, namespace, patch,
                _content_type=MERGE_PATCH,
            )
        except KubeApiError as error:
            if error.status != 404:
                raise
            await self._post(namespace)
            return "create"
        return "patch"
