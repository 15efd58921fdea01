"""The waypoint controller: each ``istio-waypoint`` Gateway gets a ServiceAccount, a Deployment
running our waypoint and a Service selecting its pods, and a status saying whether it works.

As Istio's deployment controller: the objects carry an ``ownerReference`` to the Gateway
(``controller: true``), so the API's garbage collector removes them with the Gateway, and the
label ``gateway.istio.io/managed: istio.io-mesh-controller``. An object of the same name that
this Gateway does not own is never touched (the Gateway's ``Programmed`` condition says so).
The pods are labelled ``gateway.networking.k8s.io/gateway-name=<name>`` (how
``translate.waypoints`` finds a waypoint's workloads) and ``istio.io/dataplane-mode: none`` (so a
ztunnel does not capture the waypoint's own traffic a second time).

``desired_objects``, ``gateway_status`` and ``needs_update`` are sans-IO; ``WaypointController``
is the Trio driver (watch, reconcile, write status). Only the elected leader runs it
(``istiod_lite.kube.leader``).

The waypoint container is started with the image's ENTRYPOINT (which must be ``python -m``,
one image for all programs) and ``args`` beginning with the program, ``waypoint``.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Mapping
from datetime import UTC, datetime
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
from istiod_lite.labels import (
    CANONICAL_NAME_LABEL,
    CANONICAL_REVISION_LABEL,
    DATAPLANE_MODE_LABEL,
    GATEWAY_NAME_LABEL,
)
from istiod_lite.translate.waypoints import HBONE_PORT, is_waypoint

logger = structlog.get_logger()

GATEWAY_CLASS_LABEL = "gateway.networking.k8s.io/gateway-class-name"
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
GATEWAYS_PATH = "/apis/gateway.networking.k8s.io/v1"

ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_DIR = "/var/run/secrets/istio"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_AUDIENCE = "istio-ca"
TOKEN_EXPIRATION_SECONDS = 43200

STATUS_PORT = 15021
ADMIN_PORT = 15000
METRICS_PORT = 15020
DEFAULT_ISTIOD_ADDRESS = "istiod.istio-system.svc:15012"
DEFAULT_RESOURCES: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "128Mi"},
                                     "limits": {"memory": "512Mi"}}

# A Service name is a DNS-1035 label; a Gateway name (a DNS subdomain) may not be one.
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


class InvalidWaypoint(ValueError):
    """The Gateway cannot be deployed as a waypoint; the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # a Gateway API condition reason
        self.message = message


# -- sans-IO: what should exist -------------------------------------------------------------


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def gateway_key(gateway: Mapping[str, Any]) -> str:
    meta = _metadata(gateway)
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def hbone_listener(gateway: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for listener in (gateway.get("spec") or {}).get("listeners") or []:
        if not isinstance(listener, Mapping):
            continue
        if str(listener.get("port")) == str(HBONE_PORT) and listener.get("protocol") == "HBONE":
            return listener
    return None


def check_waypoint(gateway: Mapping[str, Any]) -> None:
    """Raise ``InvalidWaypoint`` for an ``istio-waypoint`` Gateway we cannot deploy."""
    meta = _metadata(gateway)
    name = str(meta.get("name") or "")
    if not name or not meta.get("namespace") or not meta.get("uid"):
        raise InvalidWaypoint("Invalid", "the Gateway has no name, namespace or uid")
    if not _DNS_1035_LABEL.fullmatch(name):
        raise InvalidWaypoint(
            "Invalid",
            f"waypoint name {name!r} cannot name a Service (lower-case letters, digits and "
            "'-', starting with a letter, at most 63)",
        )
    if hbone_listener(gateway) is None:
        raise InvalidWaypoint(
            "ListenersNotValid",
            f"a waypoint needs a listener {{port: {HBONE_PORT}, protocol: HBONE}}",
        )


def owner_reference(gateway: Mapping[str, Any]) -> dict[str, Any]:
    meta = _metadata(gateway)
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_owned_by(obj: Mapping[str, Any], gateway: Mapping[str, Any]) -> bool:
    """True when ``obj`` names ``gateway`` (by uid) as its controlling owner."""
    uid = _metadata(gateway).get("uid")
    return any(
        ref.get("controller") and ref.get("kind") == "Gateway" and ref.get("uid") == uid
        for ref in _metadata(obj).get("ownerReferences") or []
    )


def controlling_gateway(obj: Mapping[str, Any]) -> str | None:
    """The name of the Gateway controlling ``obj``, if any (whatever its uid)."""
    for ref in _metadata(obj).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Gateway":
            return str(ref.get("name"))
    return None


def desired_objects(
    gateway: Mapping[str, Any],
    *,
    image: str,
    istiod_address: str = DEFAULT_ISTIOD_ADDRESS,
    trust_domain: str = "cluster.local",
    cluster_id: str = "Kubernetes",
    root_namespace: str = "istio-system",
    image_pull_policy: str = "IfNotPresent",
    resources: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The ServiceAccount, Deployment and Service of a waypoint Gateway, in that order.

    ``istiod_address`` is HOST:PORT: the waypoint dials it by name and checks istiod's serving
    certificate against that name (its DNS SAN ``istiod.istio-system.svc``)."""
    if not is_waypoint(gateway):
        raise InvalidWaypoint("Invalid", "not an istio-waypoint Gateway")
    check_waypoint(gateway)
    meta = _metadata(gateway)
    name, namespace = str(meta["name"]), str(meta["namespace"])
    owner = [owner_reference(gateway)]
    class_name = str((gateway.get("spec") or {}).get("gatewayClassName"))
    labels = {GATEWAY_NAME_LABEL: name, GATEWAY_CLASS_LABEL: class_name,
              MANAGED_LABEL: MANAGED_VALUE}

    def object_meta() -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "labels": dict(labels),
                "ownerReferences": copy.deepcopy(owner)}

    service_account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": object_meta()}
    pod_labels = {
        **labels,
        DATAPLANE_MODE_LABEL: "none",
        "sidecar.istio.io/inject": "false",
        CANONICAL_NAME_LABEL: name,
        CANONICAL_REVISION_LABEL: "latest",
    }
    args = [
        "waypoint",
        "--name", name,
        "--namespace", namespace,
        "--service-account", name,
        "--address", "$(POD_IP)",
        "--xds-address", istiod_address,
        "--root-cert", f"{ROOT_CERT_DIR}/root-cert.pem",
        "--token-file", f"{TOKEN_DIR}/istio-token",
        "--trust-domain", trust_domain,
        "--cluster-id", cluster_id,
        "--root-namespace", root_namespace,
        "--log-format", "json",
    ]  # fmt: skip
    container = {
        "name": "waypoint",
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "args": args,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "ports": [
            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT, "scheme": "HTTP"},
            "periodSeconds": 5,
            "failureThreshold": 4,
            "timeoutSeconds": 1,
        },
        "resources": copy.deepcopy(dict(resources or DEFAULT_RESOURCES)),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "istiod-ca-cert", "mountPath": ROOT_CERT_DIR, "readOnly": True},
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(),
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": name,
                    # The waypoint talks to istiod with its audience-bound token, never to
                    # the API server: no API token in the pod.
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {"name": "istiod-ca-cert",
                         "configMap": {"name": ROOT_CERT_CONFIGMAP}},
                        {"name": "istio-token", "projected": {"sources": [
                            {"serviceAccountToken": {
                                "audience": TOKEN_AUDIENCE,
                                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                                "path": "istio-token",
                            }},
                        ]}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory"}},
                    ],
                },
            },
        },
    }
    listener_name = str(hbone_listener(gateway).get("name") or "mesh")  # type: ignore[union-attr]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {"name": "status-port", "port": STATUS_PORT, "protocol": "TCP",
                 "appProtocol": "tcp"},
                {"name": _port_name(listener_name), "port": HBONE_PORT, "protocol": "TCP",
                 "appProtocol": "hbone"},
            ],
        },
    }
    return [service_account, deployment, service]


def _port_name(listener_name: str) -> str:
    """A listener name (up to 253, dots allowed) as a Service port name (a DNS label)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", listener_name.lower()).strip("-")[:15].strip("-")
    return cleaned or "mesh"


def needs_update(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """True when a field we set differs in ``existing``. Fields only the server or others
    set (defaults, ``clusterIP``, ``replicas`` from an autoscaler) are not drift."""
    return not _contains(existing.get("metadata") or {}, _owned_metadata(desired)) or any(
        not _contains(existing.get(field), desired[field])
        for field in desired
        if field not in ("metadata", "apiVersion", "kind", "status")
    )


def _owned_metadata(desired: Mapping[str, Any]) -> dict[str, Any]:
    meta = desired.get("metadata") or {}
    return {key: meta[key] for key in ("labels", "annotations", "ownerReferences") if key in meta}


def _contains(actual: Any, wanted: Any) -> bool:
    """``wanted`` is a sub-tree of ``actual``: dict keys may be extra in ``actual``; lists
    must have the same length, element by element."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and _contains(actual[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(_contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    return bool(actual == wanted)


def updated_object(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """``existing`` with our fields put back (dicts merged, lists ours), keeping its
    ``resourceVersion`` for optimistic concurrency and what the server assigned."""
    merged = _merge(copy.deepcopy(dict(existing)), desired)
    merged.pop("status", None)
    return merged


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


# -- sans-IO: the Gateway's status ----------------------------------------------------------


def _now_text(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def gateway_status(
    gateway: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    service: Mapping[str, Any] | None,
    *,
    conflict: str | None = None,
    cluster_domain: str = "cluster.local",
    now: datetime | None = None,
) -> dict[str, Any]:
    """The Gateway's ``status`` (``addresses`` and the ``Accepted``/``Programmed``
    conditions), keeping any other status fields and conditions, and each condition's
    ``lastTransitionTime`` while its status does not change.

    ``deployment``/``service`` are the current objects (None: not there yet); ``conflict``
    names an object of ours that exists but is not owned by this Gateway."""
    meta = _metadata(gateway)
    generation = int(meta.get("generation") or 0)
    name, namespace = meta.get("name", ""), meta.get("namespace", "")
    addresses: list[dict[str, str]] = []
    try:
        check_waypoint(gateway)
    except InvalidWaypoint as invalid:
        accepted = ("False", invalid.reason, invalid.message)
        programmed = ("False", "Invalid", "the Gateway is not accepted: " + invalid.message)
    else:
        accepted = ("True", "Accepted", "Resource accepted")
        cluster_ips = _cluster_ips(service) if service is not None else []
        ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
        if conflict:
            programmed = ("False", "NoResources", conflict)
        elif deployment is None or service is None:
            programmed = ("False", "Pending", "waiting for the waypoint's Deployment and "
                          "Service to be created")
        elif not cluster_ips:
            programmed = ("False", "AddressNotAssigned",
                          f"Service {namespace}/{name} has no cluster IP yet")
        elif ready < 1:
            programmed = ("False", "Pending",
                          f"Deployment {namespace}/{name} has no ready replicas yet")
        else:
            programmed = ("True", "Programmed",
                          f"Resource programmed, assigned to service(s) "
                          f"{name}.{namespace}.svc.{cluster_domain}:{HBONE_PORT}")
        if service is not None:
            addresses = [{"type": "IPAddress", "value": ip} for ip in cluster_ips]
    old_status = dict(gateway.get("status") or {})
    old_conditions = {c.get("type"): c for c in old_status.get("conditions") or []
                      if isinstance(c, Mapping)}
    ours = {
        "Accepted": accepted,
        "Programmed": programmed,
    }
    conditions: list[dict[str, Any]] = [
        dict(c) for kind, c in old_conditions.items() if kind not in ours
    ]
    for kind, (status, reason, message) in ours.items():
        previous = old_conditions.get(kind) or {}
        transition = (previous.get("lastTransitionTime")
                      if previous.get("status") == status and previous.get("lastTransitionTime")
                      else _now_text(now))
        conditions.append({
            "type": kind, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": transition,
        })
    conditions.sort(key=lambda c: str(c.get("type")))
    new_status = {**old_status, "conditions": conditions}
    if addresses:
        new_status["addresses"] = addresses
    else:
        new_status.pop("addresses", None)
    return new_status


def _cluster_ips(service: Mapping[str, Any]) -> list[str]:
    spec = service.get("spec") or {}
    ips = [str(ip) for ip in spec.get("clusterIPs") or [] if ip and ip != "None"]
    first = spec.get("clusterIP")
    if first and first != "None" and first not in ips:
        ips.insert(0, str(first))
    return ips


def _stale_for(obj: Mapping[str, Any], gateway: Mapping[str, Any]) -> bool:
    """``obj`` was made by us for an earlier Gateway with this name (another uid)."""
    return (
        controlling_gateway(obj) == _metadata(gateway).get("name")
        and (_metadata(obj).get("labels") or {}).get(MANAGED_LABEL) == MANAGED_VALUE
        and not is_owned_by(obj, gateway)
    )


def status_changed(gateway: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return json.dumps(gateway.get("status") or {}, sort_keys=True) != json.dumps(
        dict(status), sort_keys=True
    )


# -- the Trio driver ------------------------------------------------------------------------

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
        meta = _metadata(obj)
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
                resource_version = str(_metadata(obj).get("resourceVersion") or resource_version)
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
            if not _stale_for(existing, gateway):
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
        meta = _metadata(gateway)
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
            if (_metadata(obj).get("labels") or {}).get(MANAGED_LABEL) != MANAGED_VALUE:
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
