"""What the embedded mesh runs, read from its config directory (sans-IO apart from the files).

The config directory holds Kubernetes objects, as istiod_lite reads them: Nodes give each
ztunnel its loopback address (``status.addresses`` of type InternalIP), Pods their IPs and the
sample apps their ports, waypoint Gateways (``gatewayClassName: istio-waypoint``) their
``spec.addresses``. ``layout_from_objects`` turns ``(source, object)`` pairs into a
``MeshLayout``; every error names the file it comes from.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from ambientctl.embedded.errors import EmbeddedConfigError
from istiod_lite.auth import service_account_principal
from istiod_lite.labels import SERVICE_ACCOUNT_ANNOTATION
from istiod_lite.sources.validation import yaml_error_reason
from istiod_lite.translate.waypoints import is_waypoint

log = structlog.get_logger()

FAIL_EVERY_ANNOTATION = "ambient-lite.io/fail-every"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: str


@dataclass(frozen=True)
class AppSpec:
    """One sample app process: a pod's container port."""

    namespace: str
    pod: str
    address: str
    port: int
    kind: str  # "http" | "tcp"
    fail_every: int = 0  # http echo: answer 503 to every N-th request (0: never)

    @property
    def process_name(self) -> str:
        return f"app-{self.namespace}-{self.pod}-{self.port}"


def ztunnel_process_name(node: str) -> str:
    return f"ztunnel-{node}"


def waypoint_process_name(namespace: str, name: str) -> str:
    """``waypoint-<ns>.<name>``: a namespace (a DNS label) has no dot, so this is unique."""
    return f"waypoint-{namespace}.{name}"


@dataclass(frozen=True)
class WaypointSpec:
    """One waypoint process: a ``gatewayClassName: istio-waypoint`` Gateway with an IP."""

    namespace: str
    name: str
    address: str
    service_account: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def process_name(self) -> str:
        return waypoint_process_name(self.namespace, self.name)

    @property
    def principal(self) -> str:
        """Its name in the bootstrap token file and on its discovery stream."""
        return service_account_principal(self.namespace, self.service_account)


@dataclass(frozen=True)
class MeshLayout:
    nodes: tuple[NodeSpec, ...]
    apps: tuple[AppSpec, ...]
    pods: Mapping[str, str]  # "namespace/name" -> pod IP
    waypoints: tuple[WaypointSpec, ...] = ()
    # What was skipped and why ("<file>: ..."); logged by whoever reads the layout, so the
    # waypoint watcher can say each once rather than every second.
    warnings: tuple[str, ...] = ()


def app_kind_for_port(port: Mapping[str, Any]) -> str | None:
    """Ports named ``tcp*`` run the TCP echo, other TCP ports the HTTP echo, UDP nothing."""
    if str(port.get("protocol", "TCP")).upper() != "TCP":
        return None
    return "tcp" if str(port.get("name", "")).lower().startswith("tcp") else "http"


def waypoint_from_gateway(
    source: str, gateway: Mapping[str, Any], warnings: list[str]
) -> WaypointSpec | None:
    """The waypoint a Gateway asks for, None for a Gateway that is not an ``istio-waypoint``
    or has no ``spec.addresses`` entry of type IPAddress (added to ``warnings``: nothing could
    reach it)."""
    if not is_waypoint(gateway):
        return None
    spec = gateway["spec"]
    metadata = gateway.get("metadata") or {}
    name = metadata["name"]
    namespace = metadata.get("namespace") or "default"
    addresses = [
        a.get("value")
        for a in spec.get("addresses") or ()
        if isinstance(a, Mapping) and a.get("type", "IPAddress") == "IPAddress"
    ]
    if not addresses:
        warnings.append(
            f"{source}: waypoint Gateway {namespace}/{name} has no spec.addresses entry of type "
            "IPAddress; not starting it (`ambientctl waypoint apply` assigns one)"
        )
        return None
    try:
        address = str(ipaddress.ip_address(str(addresses[0])))
    except ValueError:
        raise EmbeddedConfigError(
            f"{source}: Gateway {namespace}/{name} has an invalid IPAddress {addresses[0]!r}"
        ) from None
    annotations = metadata.get("annotations") or {}
    account = annotations.get(SERVICE_ACCOUNT_ANNOTATION) or name
    return WaypointSpec(namespace, name, address, str(account))


def _fail_every(source: str, pod: str, metadata: Mapping[str, Any]) -> int:
    value = (metadata.get("annotations") or {}).get(FAIL_EVERY_ANNOTATION)
    if value is None:
        return 0
    text = str(value).strip()
    if not text.isdigit():
        raise EmbeddedConfigError(
            f"{source}: Pod {pod} annotation {FAIL_EVERY_ANNOTATION}={value!r} is not a "
            "whole number (N: answer 503 to every N-th request)"
        )
    return int(text)


def layout_from_objects(objects: Iterable[tuple[str, Mapping[str, Any]]]) -> MeshLayout:
    """Nodes, pods, app processes and waypoints from ``(source, object)`` pairs; errors name
    the source."""
    nodes: dict[str, NodeSpec] = {}
    apps: list[AppSpec] = []
    pods: dict[str, str] = {}
    waypoints: dict[str, WaypointSpec] = {}
    warnings: list[str] = []
    for source, obj in objects:
        kind = obj.get("kind")
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if kind not in ("Node", "Pod", "Gateway"):
            continue
        if not isinstance(name, str) or not name:
            raise EmbeddedConfigError(f"{source}: {kind} without metadata.name")
        if kind == "Gateway":
            waypoint = waypoint_from_gateway(source, obj, warnings)
            if waypoint is not None:
                if waypoint.key in waypoints:
                    raise EmbeddedConfigError(f"{source}: Gateway {waypoint.key} is defined twice")
                waypoints[waypoint.key] = waypoint
            continue
        status = obj.get("status") or {}
        if kind == "Node":
            addresses = [
                a.get("address")
                for a in status.get("addresses") or ()
                if isinstance(a, Mapping) and a.get("type") == "InternalIP"
            ]
            if not addresses or not isinstance(addresses[0], str):
                raise EmbeddedConfigError(
                    f"{source}: Node {name} has no status.addresses entry of type InternalIP"
                )
            if name in nodes:
                raise EmbeddedConfigError(f"{source}: Node {name} is defined twice")
            nodes[name] = NodeSpec(name, addresses[0])
            continue
        namespace = metadata.get("namespace") or "default"
        pod_ip = status.get("podIP")
        if not isinstance(pod_ip, str) or not pod_ip:
            warnings.append(
                f"{source}: Pod {namespace}/{name} has no status.podIP; not starting its apps"
            )
            continue
        pods[f"{namespace}/{name}"] = pod_ip
        fail_every = _fail_every(source, f"{namespace}/{name}", metadata)
        for container in (obj.get("spec") or {}).get("containers") or ():
            for port in container.get("ports") or ():
                app_kind = app_kind_for_port(port)
                number = port.get("containerPort")
                if app_kind is None:
                    continue
                if not isinstance(number, int) or not 0 < number < 65536:
                    raise EmbeddedConfigError(
                        f"{source}: Pod {namespace}/{name} has an invalid containerPort {number!r}"
                    )
                apps.append(AppSpec(namespace, name, pod_ip, number, app_kind, fail_every))
    seen: dict[str, str] = {}
    for node in nodes.values():
        if node.address in seen:
            raise EmbeddedConfigError(
                f"Nodes {seen[node.address]} and {node.name} share the address {node.address}"
            )
        seen[node.address] = node.name
    # A waypoint binds 15000/15020/15021 (as a node's ztunnel) and 15008 (as the ztunnel does
    # on each pod IP) on its address: it must be nobody else's.
    taken = {address: f"Node {name}" for address, name in seen.items()}
    taken.update({ip: f"Pod {pod}" for pod, ip in pods.items()})
    for waypoint in waypoints.values():
        if waypoint.address in taken:
            raise EmbeddedConfigError(
                f"Gateway {waypoint.key} and {taken[waypoint.address]} share the address "
                f"{waypoint.address}"
            )
        taken[waypoint.address] = f"Gateway {waypoint.key}"
    return MeshLayout(
        tuple(nodes.values()), tuple(apps), pods, tuple(waypoints.values()), tuple(warnings)
    )


def config_files(config_dir: Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` below ``config_dir``, sorted, as istiod_lite reads them."""
    if not config_dir.is_dir():
        raise EmbeddedConfigError(f"config directory {config_dir} does not exist")
    return sorted(p for p in config_dir.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_documents(path: Path) -> list[Any]:
    """The YAML documents of one file (empty ones dropped); errors name the file."""
    try:
        text = path.read_text()
        documents = list(yaml.safe_load_all(text))
    except OSError as exc:
        raise EmbeddedConfigError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise EmbeddedConfigError(f"{path}: {yaml_error_reason(exc, text)}") from None
    return [d for d in documents if d is not None]


def objects_of(path: Path, documents: Iterable[Any]) -> list[Mapping[str, Any]]:
    """The objects of a file's documents, ``kind: List`` unpacked."""
    objects: list[Mapping[str, Any]] = []
    for document in documents:
        if not isinstance(document, Mapping):
            raise EmbeddedConfigError(f"{path}: a document is not a mapping")
        items = document.get("items") if document.get("kind") == "List" else [document]
        objects.extend(item for item in items or () if isinstance(item, Mapping))
    return objects


def read_objects(config_dir: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """``(file, object)`` for every object below ``config_dir``."""
    return [
        (str(path), obj)
        for path in config_files(config_dir)
        for obj in objects_of(path, load_documents(path))
    ]


def load_layout(config_dir: Path) -> MeshLayout:
    """Read every ``*.yaml``/``*.yml`` below ``config_dir`` (``kind: List`` is unpacked)."""
    layout = layout_from_objects(read_objects(config_dir))
    for warning in layout.warnings:
        log.warning(warning)
    if not layout.nodes:
        raise EmbeddedConfigError(f"{config_dir} defines no Node; a mesh needs at least one")
    return layout
