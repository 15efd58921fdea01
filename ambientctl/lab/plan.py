"""The lab's network, planned without touching anything (sans-IO).

``ambientctl lab`` turns the same Kubernetes YAML the embedded mode reads into a small cluster of
network namespaces. This module decides everything: namespace and interface names, addresses,
routes and sysctls, as a list of typed steps (``ambientctl.lab.steps``), each with the command
that undoes it. The driver (``ambientctl.lab.network``) only runs the commands, recording how
far it got so that ``down`` can undo exactly what was done, in reverse, even after a crash.

Topology (subnet ``10.244.0.0/16`` by default, split in /24 blocks)::

    <lab>-wire      bridge br0, no address: the "physical" network joining the nodes
    <lab>-control   eth0 = <bridge block>.254/24; istiod_lite runs here
    <lab>-node-<N>  eth0 = <bridge block>.<i>/24 on br0, bridge cni0 = <block i>.1/24,
                    ip_forward on, rp_filter off, routes to other nodes' pod blocks via them
    <lab>-pod-<ns>.<name>
                    eth0 = <block i>.<2..254>/24 on its node's cni0, default route via .1

The bridge block is the subnet's last /24, Service VIPs come from the one before it, node ``i``
(1-based, YAML order) owns block ``i``. Every link is created directly inside the lab's own
namespaces (``ip -n A link add X type veth peer name Y netns B``), so the host's namespace never
holds a lab link, not even for a moment, and interface names only have to be unique within a
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ambientctl.lab.errors import LabPlanError
from ambientctl.lab.steps import (
    AddAddress,
    AddBridge,
    AddNetns,
    AddRoute,
    AddVeth,
    SetMaster,
    SetSysctl,
    SetUp,
    Step,
    step_from_json,
)
from istiod_lite.translate.waypoints import is_waypoint

DEFAULT_LAB_NAME = "amblite"
DEFAULT_SUBNET = "10.244.0.0/16"
DEFAULT_CLUSTER_ID = "Kubernetes"
IFNAME_MAX = 15  # IFNAMSIZ - 1
NETNS_NAME_MAX = 200  # a file name under /var/run/netns; keep well below NAME_MAX
LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

BRIDGE = "br0"  # in the wire namespace
UPLINK = "eth0"  # a node's or the control namespace's link to the bridge
NODE_BRIDGE = "cni0"  # in each node namespace, joining its pods
POD_LINK = "eth0"  # in each pod namespace
CONTROL_WIRE_LINK = "vcontrol"  # the wire side of the control namespace's link
CONTROL_HOST = 254  # the control namespace's last octet in the bridge block
MAX_PODS_PER_NODE = 253  # .2 .. .254 of a node's /24 (.1 is its cni0)


@dataclass(frozen=True)
class LabNode:
    name: str
    index: int  # 1-based, YAML order
    netns: str
    address: str  # on the bridge: what the Node's InternalIP becomes
    pod_cidr: str
    gateway: str  # its cni0 address, the pods' default route
    wire_ifname: str  # its link's end on the wire bridge


@dataclass(frozen=True)
class LabPod:
    namespace: str
    name: str
    node: str
    netns: str
    address: str
    node_ifname: str  # its link's end in the node namespace

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def uid(self, cluster_id: str = DEFAULT_CLUSTER_ID) -> str:
        """The workload uid istiod_lite gives this pod (``translate``)."""
        return f"{cluster_id}//Pod/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabPlan:
    name: str
    subnet: str
    wire_netns: str
    control_netns: str
    control_address: str
    bridge_prefix: int
    service_cidr: str
    nodes: tuple[LabNode, ...]
    pods: tuple[LabPod, ...]
    service_addresses: Mapping[str, str]  # "namespace/name" -> lab VIP
    steps: tuple[Step, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def netns_names(self) -> list[str]:
        """Every namespace of the lab, in creation order."""
        return [step.netns for step in self.steps if isinstance(step, AddNetns)]

    def node(self, name: str) -> LabNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in lab {self.name}")

    def find_pod(self, reference: str) -> LabPod:
        """A pod by ``namespace/name``, or by bare name when only one pod has it."""
        if "/" in reference:
            matches = [p for p in self.pods if p.key == reference]
        else:
            matches = [p for p in self.pods if p.name == reference]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(p.key for p in self.pods) or "none"
            raise KeyError(f"no pod {reference!r} in lab {self.name} (pods: {known})")
        raise KeyError(
            f"pod name {reference!r} is ambiguous: "
            + ", ".join(p.key for p in matches)
            + "; write namespace/name"
        )

    def netns_map(self, node: str, cluster_id: str = DEFAULT_CLUSTER_ID) -> dict[str, str]:
        """What a node's CNI stand-in tells its ztunnel: pod uid -> netns path, local pods."""
        return {pod.uid(cluster_id): netns_path(pod.netns) for pod in self.pods if pod.node == node}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subnet": self.subnet,
            "wire_netns": self.wire_netns,
            "control_netns": self.control_netns,
            "control_address": self.control_address,
            "bridge_prefix": self.bridge_prefix,
            "service_cidr": self.service_cidr,
            "nodes": [dict(n.__dict__) for n in self.nodes],
            "pods": [dict(p.__dict__) for p in self.pods],
            "service_addresses": dict(self.service_addresses),
            "steps": [s.to_json() for s in self.steps],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: Any) -> LabPlan:
        """The plan back from the state file; ``LabPlanError`` naming what is wrong."""
        if not isinstance(data, Mapping):
            raise LabPlanError("the recorded plan is not a mapping")
        try:
            return cls(
                name=str(data["name"]),
                subnet=str(data["subnet"]),
                wire_netns=str(data["wire_netns"]),
                control_netns=str(data["control_netns"]),
                control_address=str(data["control_address"]),
                bridge_prefix=int(data["bridge_prefix"]),
                service_cidr=str(data["service_cidr"]),
                nodes=tuple(LabNode(**n) for n in data["nodes"]),
                pods=tuple(LabPod(**p) for p in data["pods"]),
                service_addresses=dict(data["service_addresses"]),
                steps=tuple(step_from_json(s) for s in data["steps"]),
                warnings=tuple(data.get("warnings") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LabPlanError):
                raise
            raise LabPlanError(f"the recorded plan is incomplete or damaged: {exc!r}") from None


def netns_path(netns: str) -> str:
    return f"/var/run/netns/{netns}"


def _bounded(name: str) -> str:
    """Very long Kubernetes names would exceed a file name; shorten them with a hash."""
    if len(name) <= NETNS_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[: NETNS_NAME_MAX - 13]}-{digest}"


def node_netns(lab: str, node: str) -> str:
    return _bounded(f"{lab}-node-{node}")


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    # A namespace name is a DNS label (no dot), so "<ns>.<pod>" cannot collide.
    return _bounded(f"{lab}-pod-{namespace}.{pod}")


def _block(network: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Network:
    base = int(network.network_address) + index * 256
    return ipaddress.IPv4Network((base, 24))


def _host(block: ipaddress.IPv4Network, host: int) -> str:
    return str(block.network_address + host)


def check_lab_name(name: str) -> str:
    if not LAB_NAME.match(name):
        raise LabPlanError(
            f"lab name {name!r} must be 1-32 lower-case letters, digits or '-', starting and "
            "ending with a letter or digit"
        )
    return name


def _subnet(text: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise LabPlanError(f"lab subnet {text!r}: {exc}") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise LabPlanError(f"lab subnet {text!r} must be IPv4")
    if network.prefixlen > 22:
        raise LabPlanError(
            f"lab subnet {text!r} is too small: it needs at least four /24 blocks (/22 or wider)"
        )
    if network.is_loopback or network.is_multicast or network.is_link_local:
        raise LabPlanError(f"lab subnet {text!r} must be an ordinary (private) range")
    return network


@dataclass(frozen=True)
class _PodSource:
    namespace: str
    name: str
    node: str


def _read_topology(
    objects: Iterable[tuple[str, Mapping[str, Any]]],
) -> tuple[list[str], list[_PodSource], list[str], list[str]]:
    """Node names, pods (with their node), Service keys with a cluster IP, warnings."""
    nodes: list[str] = []
    pods: list[_PodSource] = []
    services: list[str] = []
    warnings: list[str] = []
    seen_pods: set[str] = set()
    for source, obj in objects:
        kind = obj.get("kind")
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if kind not in ("Node", "Pod", "Service", "Gateway"):
            continue
        if not isinstance(name, str) or not name:
            raise LabPlanError(f"{source}: {kind} without metadata.name")
        namespace = str(metadata.get("namespace") or "default")
        if kind == "Node":
            if name in nodes:
                raise LabPlanError(f"{source}: Node {name} is defined twice")
            nodes.append(name)
        elif kind == "Pod":
            key = f"{namespace}/{name}"
            if key in seen_pods:
                raise LabPlanError(f"{source}: Pod {key} is defined twice")
            seen_pods.add(key)
            node = (obj.get("spec") or {}).get("nodeName")
            if not isinstance(node, str) or not node:
                raise LabPlanError(
                    f"{source}: Pod {key} has no spec.nodeName; the lab puts each pod on the "
                    "node named there"
                )
            pods.append(_PodSource(namespace, name, node))
        elif kind == "Service":
            cluster_ip = (obj.get("spec") or {}).get("clusterIP")
            if cluster_ip and str(cluster_ip) != "None":
                services.append(f"{namespace}/{name}")
        elif kind == "Gateway" and is_waypoint(obj):
            warnings.append(f"{source}: waypoint Gateway {namespace}/{name} is not run in the lab")
    for pod in pods:
        if pod.node not in nodes:
            raise LabPlanError(
                f"Pod {pod.namespace}/{pod.name} is on node {pod.node!r}, which no Node object "
                f"defines (nodes: {', '.join(nodes) or 'none'})"
            )
    return nodes, pods, services, warnings


def plan_lab(
    objects: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    name: str = DEFAULT_LAB_NAME,
    subnet: str = DEFAULT_SUBNET,
) -> LabPlan:
    """The lab for ``(source, object)`` pairs as ``embedded.layout.read_objects`` returns them."""
    check_lab_name(name)
    network = _subnet(subnet)
    node_names, pod_sources, service_keys, warnings = _read_topology(objects)
    if not node_names:
        raise LabPlanError("the YAML defines no Node; a lab needs at least one")
    blocks = network.num_addresses // 256
    bridge_block = _block(network, blocks - 1)
    service_block = _block(network, blocks - 2)
    if len(node_names) > blocks - 3:
        raise LabPlanError(
            f"{len(node_names)} nodes do not fit in {subnet}: it has room for {blocks - 3}"
        )
    if len(node_names) >= CONTROL_HOST:
        raise LabPlanError(f"at most {CONTROL_HOST - 1} nodes fit on the lab's bridge")
    if len(service_keys) > 254:
        raise LabPlanError(f"{len(service_keys)} Services do not fit in {service_block} (254)")

    wire = _bounded(f"{name}-wire")
    control = _bounded(f"{name}-control")
    nodes = tuple(
        LabNode(
            name=node,
            index=i,
            netns=node_netns(name, node),
            address=_host(bridge_block, i),
            pod_cidr=str(_block(network, i)),
            gateway=_host(_block(network, i), 1),
            wire_ifname=f"vnode{i}",
        )
        for i, node in enumerate(node_names, start=1)
    )
    by_name = {node.name: node for node in nodes}
    per_node: dict[str, int] = {}
    pods: list[LabPod] = []
    for i, source in enumerate(pod_sources, start=1):
        node = by_name[source.node]
        slot = per_node.get(node.name, 0) + 1
        if slot > MAX_PODS_PER_NODE:
            raise LabPlanError(f"node {node.name} has more than {MAX_PODS_PER_NODE} pods")
        per_node[node.name] = slot
        pods.append(
            LabPod(
                namespace=source.namespace,
                name=source.name,
                node=node.name,
                netns=pod_netns(name, source.namespace, source.name),
                address=_host(ipaddress.IPv4Network(node.pod_cidr), slot + 1),
                node_ifname=f"vpod{i}",
            )
        )
    all_netns = [wire, control, *(n.netns for n in nodes), *(p.netns for p in pods)]
    if len(set(all_netns)) != len(all_netns):
        raise LabPlanError("two lab objects map to the same namespace name; rename one")
    plan = LabPlan(
        name=name,
        subnet=str(network),
        wire_netns=wire,
        control_netns=control,
        control_address=_host(bridge_block, CONTROL_HOST),
        bridge_prefix=24,
        service_cidr=str(service_block),
        nodes=nodes,
        pods=tuple(pods),
        service_addresses={
            key: _host(service_block, i) for i, key in enumerate(service_keys, start=1)
        },
        warnings=tuple(warnings),
    )
    steps = tuple(_steps(plan))
    for step in steps:
        for ifname in (getattr(step, "ifname", ""), getattr(step, "peer_ifname", "")):
            if len(ifname) > IFNAME_MAX:
                raise LabPlanError(f"interface name {ifname!r} is longer than {IFNAME_MAX}")
    return replace(plan, steps=steps)


def _steps(plan: LabPlan) -> list[Step]:
    prefix = plan.bridge_prefix
    wire = plan.wire_netns
    control = plan.control_netns
    steps: list[Step] = [
        AddNetns(wire),
        AddBridge(wire, BRIDGE),
        SetUp(wire, BRIDGE),
        AddNetns(control),
        SetUp(control, "lo"),
        AddVeth(wire, CONTROL_WIRE_LINK, control, UPLINK),
        SetMaster(wire, CONTROL_WIRE_LINK, BRIDGE),
        SetUp(wire, CONTROL_WIRE_LINK),
        AddAddress(control, UPLINK, f"{plan.control_address}/{prefix}"),
        SetUp(control, UPLINK),
    ]
    steps += [AddRoute(control, n.pod_cidr, n.address, UPLINK) for n in plan.nodes]
    for node in plan.nodes:
        cni_prefix = ipaddress.IPv4Network(node.pod_cidr).prefixlen
        steps += [
            AddNetns(node.netns),
            # Before any link exists, so that every interface inherits rp_filter=0.
            SetSysctl(node.netns, "net.ipv4.ip_forward", "1"),
            SetSysctl(node.netns, "net.ipv4.conf.all.rp_filter", "0"),
            SetSysctl(node.netns, "net.ipv4.conf.default.rp_filter", "0"),
            SetUp(node.netns, "lo"),
            AddVeth(wire, node.wire_ifname, node.netns, UPLINK),
            SetMaster(wire, node.wire_ifname, BRIDGE),
            SetUp(wire, node.wire_ifname),
            AddAddress(node.netns, UPLINK, f"{node.address}/{prefix}"),
            SetUp(node.netns, UPLINK),
            AddBridge(node.netns, NODE_BRIDGE),
            AddAddress(node.netns, NODE_BRIDGE, f"{node.gateway}/{cni_prefix}"),
            SetUp(node.netns, NODE_BRIDGE),
        ]
        steps += [
            AddRoute(node.netns, other.pod_cidr, other.address, UPLINK)
            for other in plan.nodes
            if other is not node
        ]
    for pod in plan.pods:
        node = plan.node(pod.node)
        cni_prefix = ipaddress.IPv4Network(node.pod_cidr).prefixlen
        steps += [
            AddNetns(pod.netns),
            SetUp(pod.netns, "lo"),
            AddVeth(node.netns, pod.node_ifname, pod.netns, POD_LINK),
            SetMaster(node.netns, pod.node_ifname, NODE_BRIDGE),
            SetUp(node.netns, pod.node_ifname),
            AddAddress(pod.netns, POD_LINK, f"{pod.address}/{cni_prefix}"),
            SetUp(pod.netns, POD_LINK),
            AddRoute(pod.netns, "default", node.gateway, POD_LINK),
        ]
    return steps
