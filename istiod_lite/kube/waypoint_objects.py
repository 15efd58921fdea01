"""What the waypoint controller wants to exist for an ``istio-waypoint`` Gateway, sans-IO:
a ServiceAccount, a Deployment running our waypoint and a Service selecting its pods
(``desired_objects``), whether an existing object needs writing (``needs_update``,
``updated_object``) and the Gateway's status (``gateway_status``).

As Istio's deployment controller: the objects carry an ``ownerReference`` to the Gateway
(``controller: true``), so the API's garbage collector removes them with the Gateway, and the
label ``gateway.istio.io/managed: istio.io-mesh-controller``. An object of the same name that
this Gateway does not own is never touched (the Gateway's ``Programmed`` condition says so).
The pods are labelled ``gateway.networking.k8s.io/gateway-name=<name>`` (how
``translate.waypoints`` finds a waypoint's workloads) and ``istio.io/dataplane-mode: none`` (so a
ztunnel does not capture the waypoint's own traffic a second time).

The waypoint container is started with the image's ENTRYPOINT (which must be ``python -m``,
one image for all programs) and ``args`` beginning with the program, ``waypoint``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from istiod_lite.labels import (
    CANONICAL_NAME_LABEL,
    CANONICAL_REVISION_LABEL,
    DATAPLANE_MODE_LABEL,
    GATEWAY_NAME_LABEL,
)
from istiod_lite.translate.waypoints import HBONE_PORT, is_waypoint

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


def metadata_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def gateway_key(gateway: Mapping[str, Any]) -> str:
    meta = metadata_of(gateway)
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
    meta = metadata_of(gateway)
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
    meta = metadata_of(gateway)
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
    uid = metadata_of(gateway).get("uid")
    return any(
        ref.get("controller") and ref.get("kind") == "Gateway" and ref.get("uid") == uid
        for ref in metadata_of(obj).get("ownerReferences") or []
    )


def controlling_gateway(obj: Mapping[str, Any]) -> str | None:
    """The name of the Gateway controlling ``obj``, if any (whatever its uid)."""
    for ref in metadata_of(obj).get("ownerReferences") or []:
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
    meta = metadata_of(gateway)
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
            # glibc's allocator: memory after a burst goes back (see the ztunnel DaemonSet).
            {"name": "PYTHONMALLOC", "value": "malloc"},
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
    meta = metadata_of(gateway)
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


def stale_for(obj: Mapping[str, Any], gateway: Mapping[str, Any]) -> bool:
    """``obj`` was made by us for an earlier Gateway with this name (another uid)."""
    return (
        controlling_gateway(obj) == metadata_of(gateway).get("name")
        and (metadata_of(obj).get("labels") or {}).get(MANAGED_LABEL) == MANAGED_VALUE
        and not is_owned_by(obj, gateway)
    )


def status_changed(gateway: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return json.dumps(gateway.get("status") or {}, sort_keys=True) != json.dumps(
        dict(status), sort_keys=True
    )
