"""The waypoint controller's Trio driver: watches Gateways and the objects it made for them,
and reconciles each Gateway's objects and status towards what ``waypoint_objects`` says
should exist. Only the elected leader runs it (``istiod_lite.kube.leader``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import structlog
import trio

from istiod_lite.kube.client import (
    JsonApi,
    KubeApiError,
    StreamAborted,
    open_response_lines,
    run_blocking,
)
from istiod_lite.kube.waypoint_objects import (
    DEFAULT_ISTIOD_ADDRESS,
    GATEWAYS_PATH,
    MANAGED_LABEL,
    MANAGED_VALUE,
    InvalidWaypoint,
    controlling_gateway,
    desired_objects,
    gateway_key,
    gateway_status,
    is_owned_by,
    metadata_of,
    needs_update,
    stale_for,
    status_changed,
    updated_object,
)
from istiod_lite.labels import (
    GATEWAY_NAME_LABEL,
)
from istiod_lite.translate.waypoints import is_waypoint

logger = structlog.get_logger()

_KINDS: dict[str, str] = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Service": "/api/v1/namespaces/{ns}/services",
}
_WATCHED: dict[str, str] = {
    "Gateway": f"{GATEWAYS_PATH}/gateways",
    "Deployment": "/apis/apps/v1/deployments",
    "Service": "/api/v1/services",
}


class WaypointController:
    """Keeps every ``istio-waypoint`` Gateway's objects and status in sync (leader only).

    Level-triggered: watch events only say *which* Gateway to look at; a reconcile reads the
    Gateway and its objects fresh from the API and writes what differs, so a lost event or a
    conflict (409) costs only a retry. Watches follow the list/watch rules: list, watch from
    the list's resourceVersion, resume from the last seen one, relist on 410, back off on
    errors; every ``resync_period`` all Gateways are reconciled again."""

    def __init__(
        self,
        api_client: Any,
        *,
        image: str,
        istiod_address: str = DEFAULT_ISTIOD_ADDRESS,
        trust_domain: str = "cluster.local",
        cluster_id: str = "Kubernetes",
        root_namespace: str = "istio-system",
        cluster_domain: str = "cluster.local",
        resync_period: float = 300.0,
        watch_timeout: int = 300,
        max_backoff: float = 30.0,
        api: JsonApi | None = None,
    ) -> None:
        self.api = api or JsonApi(api_client)
        self.image = image
        self.istiod_address = istiod_address
        self.trust_domain = trust_domain
        self.cluster_id = cluster_id
        self.root_namespace = root_namespace
        self.cluster_domain = cluster_domain
        self.resync_period = resync_period
        self.watch_timeout = watch_timeout
        self.max_backoff = max_backoff
        self.reconciles = 0
        self._pending: set[str] = set()
        self._wakeup = trio.Event()
        self._known: set[str] = set()
        self._failures: dict[str, int] = {}
        self._rand = random.Random()

    def enqueue(self, key: str) -> None:
        self._pending.add(key)
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch and reconcile until cancelled; ``task_status`` after every watch listed."""
        async with trio.open_nursery() as nursery:
            for kind in _WATCHED:
                await nursery.start(self._watch, kind)
            nursery.start_soon(self._resync)
            task_status.started()
            await self._work()

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._pending:
                key = min(self._pending)
                self._pending.discard(key)
                try:
                    await self.reconcile(key)
                except KubeApiError as exc:
                    # 409: someone wrote first; 404: the Gateway went away mid-reconcile (the
                    # next pass removes what it left). Both are expected: retry soon, quietly.
                    # Anything else: retry with a growing delay. Never a busy loop.
                    failures = self._failures.get(key, 0) + 1
                    self._failures[key] = failures
                    first_delay = 0.02 if exc.status in (404, 409) else 0.5
                    if exc.status not in (404, 409):
                        logger.warning("waypoint reconcile failed; retrying", gateway=key,
                                       error=str(exc), attempt=failures)
                    delay = min(self.max_backoff, first_delay * 2 ** min(failures - 1, 10))
                    await trio.sleep(delay * (0.5 + self._rand.random() / 2))
                    self.enqueue(key)
                else:
                    self._failures.pop(key, None)

    async def _resync(self) -> None:
        while True:
            await trio.sleep(self.resync_period)
            for key in sorted(self._known):
                self.enqueue(key)

    # -- watching

    def _keys_for(self, kind: str, obj: Mapping[str, Any]) -> list[str]:
        meta = metadata_of(obj)
        namespace = str(meta.get("namespace", ""))
        if kind == "Gateway":
            key = gateway_key(obj)
            return [key] if is_waypoint(obj) or key in self._known else []
        owner = controlling_gateway(obj) or (meta.get("labels") or {}).get(GATEWAY_NAME_LABEL)
        return [f"{namespace}/{owner}"] if owner else []

    async def _watch(
        self, kind: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        path = _WATCHED[kind]
        managed = f"{MANAGED_LABEL}={MANAGED_VALUE}"
        selector = {} if kind == "Gateway" else {"labelSelector": managed}
        failures = 0
        resource_version: str | None = None
        started = False
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._list(kind, path, selector)
                    if not started:
                        started = True
                        task_status.started()
                resource_version = await self._follow(kind, path, selector, resource_version)
                failures = 0
            except KubeApiError as exc:
                if exc.status == 410:
                    logger.info("watch expired; relisting", kind=kind)
                    resource_version = None
                    continue
                failures += 1
                delay = min(self.max_backoff, 0.2 * 2 ** min(failures, 10))
                logger.warning("watch failed; backing off", kind=kind, error=str(exc),
                               delay=delay)
                await trio.sleep(delay * (0.5 + self._rand.random() / 2))

    async def _list(self, kind: str, path: str, selector: Mapping[str, str]) -> str:
        query = {**selector, "limit": "500"}
        while True:
            page = await self.api.request("GET", path, query=query)
            for item in page.get("items") or []:
                for key in self._keys_for(kind, item):
                    if kind == "Gateway":
                        self._known.add(key)
                    self.enqueue(key)
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                return str(meta.get("resourceVersion", ""))
            query = {**selector, "limit": "500", "continue": str(meta["continue"])}

    async def _follow(
        self, kind: str, path: str, selector: Mapping[str, str], resource_version: str
    ) -> str:
        """One watch request; returns the resourceVersion to resume from."""
        query = {**selector, "watch": "true", "resourceVersion": resource_version,
                 "allowWatchBookmarks": "true", "timeoutSeconds": str(self.watch_timeout)}
        lines = await open_response_lines(
            lambda: self.api.open_watch(path, query, self.watch_timeout + 10),
            name=f"kube watch {kind}",
        )
        try:
            while True:
                line = await run_blocking(lines.next_line, name=f"kube watch {kind}",
                                          on_abandon=lines.abort)
                if line is None:
                    return resource_version
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    logger.warning("watch: undecodable event", kind=kind)
                    continue
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    raise KubeApiError(f"watch {path}", int(obj.get("code") or 500),
                                       str(obj.get("reason") or ""), str(obj.get("message") or ""))
                resource_version = str(metadata_of(obj).get("resourceVersion") or resource_version)
                if event.get("type") == "BOOKMARK":
                    continue
                for key in self._keys_for(kind, obj):
                    if kind == "Gateway":
                        if event.get("type") == "DELETED":
                            self._known.discard(key)
                        else:
                            self._known.add(key)
                    self.enqueue(key)
        except StreamAborted:
            return resource_version
        except Exception as exc:
            if isinstance(exc, KubeApiError):
                raise
            raise KubeApiError(f"watch {path}", None, type(exc).__name__, str(exc)) from exc
        finally:
            lines.abort()

    # -- reconciling

    async def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.api.request("GET", path)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def reconcile(self, key: str) -> None:
        """Bring the Gateway ``namespace/name``'s objects and status in line."""
        self.reconciles += 1
        namespace, _, name = key.partition("/")
        gateway = await self._get(f"{GATEWAYS_PATH}/namespaces/{namespace}/gateways/{name}")
        if gateway is None or not is_waypoint(gateway):
            await self._collect_orphans(namespace, name, gateway)
            return
        try:
            wanted = desired_objects(
                gateway, image=self.image, istiod_address=self.istiod_address,
                trust_domain=self.trust_domain, cluster_id=self.cluster_id,
                root_namespace=self.root_namespace,
            )
        except InvalidWaypoint as invalid:
            logger.warning("waypoint Gateway not accepted", gateway=key, reason=invalid.message)
            await self._write_status(gateway, None, None, None)
            return
        current: dict[str, dict[str, Any] | None] = {}
        conflicts: list[str] = []
        for desired in wanted:
            kind = desired["kind"]
            obj = await self._ensure(gateway, desired)
            if obj is not None and not is_owned_by(obj, gateway):
                conflicts.append(f"{kind} {namespace}/{name} exists and is not owned by this "
                                 "Gateway; delete or rename it")
                obj = None
            current[kind] = obj
        await self._write_status(gateway, current.get("Deployment"), current.get("Service"),
                                 "; ".join(conflicts) or None)

    async def _ensure(
        self, gateway: Mapping[str, Any], desired: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Create or repair one object; returns it as the API has it now."""
        meta = desired["metadata"]
        collection = _KINDS[desired["kind"]].format(ns=meta["namespace"])
        existing = await self._get(f"{collection}/{meta['name']}")
        if existing is None:
            logger.info("creating waypoint object", kind=desired["kind"],
                        gateway=gateway_key(gateway))
            return await self.api.request("POST", collection, body=desired)
        if not is_owned_by(existing, gateway):
            if not stale_for(existing, gateway):
                return existing
            # Ours, left from an earlier Gateway of the same name (the garbage collector
            # has not got to it yet): replace it rather than report a conflict.
            logger.info("replacing a waypoint object of a deleted Gateway",
                        kind=desired["kind"], gateway=gateway_key(gateway))
            try:
                await self.api.request("DELETE", f"{collection}/{meta['name']}")
            except KubeApiError as exc:
                if exc.status != 404:
                    raise
            return await self.api.request("POST", collection, body=desired)
        if not needs_update(existing, desired):
            return existing
        logger.info("repairing drifted waypoint object", kind=desired["kind"],
                    gateway=gateway_key(gateway))
        return await self.api.request(
            "PUT", f"{collection}/{meta['name']}", body=updated_object(existing, desired)
        )

    async def _write_status(
        self,
        gateway: Mapping[str, Any],
        deployment: Mapping[str, Any] | None,
        service: Mapping[str, Any] | None,
        conflict: str | None,
    ) -> None:
        status = gateway_status(gateway, deployment, service, conflict=conflict,
                                cluster_domain=self.cluster_domain)
        if not status_changed(gateway, status):
            return
        meta = metadata_of(gateway)
        body = {**gateway, "status": status}
        await self.api.request(
            "PUT",
            f"{GATEWAYS_PATH}/namespaces/{meta['namespace']}/gateways/{meta['name']}/status",
            body=body,
        )

    async def _collect_orphans(
        self, namespace: str, name: str, gateway: Mapping[str, Any] | None
    ) -> None:
        """Delete objects we made for a Gateway ``name`` that no longer exists (or is no
        longer a waypoint) — what the garbage collector does too, but also for an object a
        reconcile created while the Gateway was being deleted."""
        for kind, collection_template in _KINDS.items():
            collection = collection_template.format(ns=namespace)
            obj = await self._get(f"{collection}/{name}")
            if obj is None or controlling_gateway(obj) != name:
                continue
            if (metadata_of(obj).get("labels") or {}).get(MANAGED_LABEL) != MANAGED_VALUE:
                continue
            if gateway is not None and is_waypoint(gateway) and is_owned_by(obj, gateway):
                continue
            logger.info("deleting orphaned waypoint object", kind=kind,
                        gateway=f"{namespace}/{name}")
            try:
                await self.api.request("DELETE", f"{collection}/{name}")
            except KubeApiError as exc:
                if exc.status != 404:
                    raise
