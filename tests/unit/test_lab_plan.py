"""The lab's network plan (sans-IO): addresses, names, commands, inverses, YAML rewriting."""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from ambientctl import cli
from ambientctl.embedded.layout import layout_from_objects
from ambientctl.lab.config import rewrite_objects
from ambientctl.lab.errors import LabError, LabPlanError
from ambientctl.lab.execute import resolve_exec_target
from ambientctl.lab.mesh import lab_ztunnel_argv
from ambientctl.lab.netns import in_netns
from ambientctl.lab.plan import IFNAME_MAX, LabPlan, plan_lab
from ambientctl.lab.state import LabPaths, LabRecord
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
    is_already_gone,
    step_from_json,
    undo_commands,
)
from ztunnel.config import config_from_args as ztunnel_config_from_args

Objects = list[tuple[str, Mapping[str, Any]]]


def node(name: str, address: str = "127.0.10.1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "Hostname", "address": name},
                                 {"type": "InternalIP", "address": address}]},
    }  # fmt: skip


def pod(name: str, on: str | None, *, namespace: str = "demo", ip: str | None = None,
        ports: tuple[int, ...] = ()) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "containers": [
            {"name": "c", "image": "x",
             "ports": [{"name": "tcp-echo", "containerPort": p} for p in ports]}
        ]
    }  # fmt: skip
    if on is not None:
        spec["nodeName"] = on
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    if ip is not None:
        obj["status"] = {"podIP": ip, "podIPs": [{"ip": ip}]}
    return obj


def service(name: str, vip: str, namespace: str = "demo") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": [{"port": 9000}]},
    }


def objects(*objs: Mapping[str, Any]) -> Objects:
    return [("cluster.yaml", o) for o in objs]


TWO_NODES = objects(
    node("node-1", "127.0.10.1"),
    node("node-2", "127.0.10.2"),
    pod("client", "node-1", ip="127.0.20.1"),
    pod("server", "node-2", ip="127.0.20.2", ports=(9000,)),
    pod("neighbour", "node-1"),
    service("echo", "127.0.30.1"),
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "headless", "namespace": "demo"},
     "spec": {"clusterIP": "None"}},
)  # fmt: skip


@pytest.fixture
def plan() -> LabPlan:
    return plan_lab(TWO_NODES, name="lab1")


def test_addresses_follow_the_yaml_order(plan: LabPlan) -> None:
    assert [(n.name, n.address, n.pod_cidr, n.gateway) for n in plan.nodes] == [
        ("node-1", "10.244.255.1", "10.244.1.0/24", "10.244.1.1"),
        ("node-2", "10.244.255.2", "10.244.2.0/24", "10.244.2.1"),
    ]
    assert [(p.key, p.node, p.address) for p in plan.pods] == [
        ("demo/client", "node-1", "10.244.1.2"),
        ("demo/server", "node-2", "10.244.2.2"),
        ("demo/neighbour", "node-1", "10.244.1.3"),
    ]
    assert plan.control_address == "10.244.255.254"
    assert plan.service_cidr == "10.244.254.0/24"
    assert plan.service_addresses == {"demo/echo": "10.244.254.1"}  # headless keeps None


def test_another_subnet_is_split_the_same_way() -> None:
    plan = plan_lab(TWO_NODES, name="lab1", subnet="10.10.0.0/20")
    assert [n.address for n in plan.nodes] == ["10.10.15.1", "10.10.15.2"]
    assert plan.control_address == "10.10.15.254"
    assert plan.service_cidr == "10.10.14.0/24"
    assert [p.address for p in plan.pods] == ["10.10.1.2", "10.10.2.2", "10.10.1.3"]
    subnet = ipaddress.ip_network("10.10.0.0/20")
    for step in plan.steps:
        if isinstance(step, AddAddress):
            assert ipaddress.ip_interface(step.cidr).ip in subnet


def _links(plan: LabPlan) -> list[tuple[str, str]]:
    """(namespace, interface) of every link the plan creates."""
    links: list[tuple[str, str]] = []
    for step in plan.steps:
        if isinstance(step, AddBridge):
            links.append((step.netns, step.ifname))
        elif isinstance(step, AddVeth):
            links += [(step.netns, step.ifname), (step.peer_netns, step.peer_ifname)]
    return links


def test_interface_names_are_short_and_unique_per_namespace() -> None:
    many = objects(
        *(node(f"a-very-long-node-name-{i}", f"127.0.10.{i}") for i in range(1, 6)),
        *(pod(f"pod-with-a-rather-long-name-{i}", f"a-very-long-node-name-{i % 5 + 1}")
          for i in range(200)),
    )  # fmt: skip
    plan = plan_lab(many, name="a-long-lab-name-of-32-characters")
    links = _links(plan)
    assert all(len(ifname) <= IFNAME_MAX for _ns, ifname in links)
    assert not [link for link, n in Counter(links).items() if n > 1]
    assert len(links) == 1 + 2 * (1 + 5) + 5 + 2 * 200  # br0, uplinks, cni0s, pod veths


def test_namespaces_carry_the_lab_name_and_do_not_collide(plan: LabPlan) -> None:
    names = plan.netns_names()
    assert names == [
        "lab1-wire", "lab1-control", "lab1-node-node-1", "lab1-node-node-2",
        "lab1-pod-demo.client", "lab1-pod-demo.server", "lab1-pod-demo.neighbour",
    ]  # fmt: skip
    other = plan_lab(TWO_NODES, name="lab2")
    assert not set(names) & set(other.netns_names())
    # "a-b"/"c" and "a"/"b-c" must not share a namespace name.
    tricky = plan_lab(
        objects(node("n"), pod("c", "n", namespace="a-b"), pod("b-c", "n", namespace="a"))
    )
    assert len(set(tricky.netns_names())) == len(tricky.netns_names())


def _netns_of_command(command: tuple[str, ...]) -> set[str]:
    """The namespaces a command names (``ip -n NS``, ``ip netns add/delete/exec NS``,
    ``... netns PEER``)."""
    named = set()
    for i, word in enumerate(command[:-1]):
        if word in ("-n", "netns") and command[i + 1] not in ("add", "delete", "exec"):
            named.add(command[i + 1])
        if command[i : i + 2] in (("netns", "add"), ("netns", "delete"), ("netns", "exec")):
            named.add(command[i + 2])
    return named


def test_every_command_stays_inside_the_labs_namespaces(plan: LabPlan) -> None:
    """Nothing is created in, or changed in, the host's namespace."""
    lab = set(plan.netns_names())
    for step in plan.steps:
        for command in (step.command(), step.undo()):
            if command is None:
                continue
            assert command[0] == "ip"
            named = _netns_of_command(command)
            assert named, command
            assert named <= lab, command


def test_routes_between_nodes_pods_and_control(plan: LabPlan) -> None:
    routes = {(s.netns, s.destination, s.via) for s in plan.steps if isinstance(s, AddRoute)}
    assert ("lab1-node-node-1", "10.244.2.0/24", "10.244.255.2") in routes
    assert ("lab1-node-node-2", "10.244.1.0/24", "10.244.255.1") in routes
    assert ("lab1-control", "10.244.1.0/24", "10.244.255.1") in routes
    assert ("lab1-control", "10.244.2.0/24", "10.244.255.2") in routes
    assert ("lab1-pod-demo.server", "default", "10.244.2.1") in routes
    assert ("lab1-pod-demo.neighbour", "default", "10.244.1.1") in routes
    assert not [r for r in routes if r[0] == "lab1-node-node-1" and r[1] == "10.244.1.0/24"]


def test_node_sysctls_come_before_its_links(plan: LabPlan) -> None:
    for node_ in plan.nodes:
        indexes = [i for i, s in enumerate(plan.steps) if s.netns == node_.netns
                   or (isinstance(s, AddVeth) and s.peer_netns == node_.netns)]  # fmt: skip
        sysctls = {
            (s.key, s.value): i
            for i, s in enumerate(plan.steps)
            if isinstance(s, SetSysctl) and s.netns == node_.netns
        }
        assert set(sysctls) == {
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        }
        first_link = min(i for i in indexes if isinstance(plan.steps[i], AddVeth | AddBridge))
        assert max(sysctls.values()) < first_link
    # Only node namespaces get sysctls.
    assert {s.netns for s in plan.steps if isinstance(s, SetSysctl)} == {
        n.netns for n in plan.nodes
    }


def test_each_step_has_its_inverse() -> None:
    assert AddNetns("x").undo() == ("ip", "netns", "delete", "x")
    assert AddBridge("x", "br0").undo() == ("ip", "-n", "x", "link", "del", "br0")
    veth = AddVeth("x", "vnode1", "y", "eth0")
    assert veth.command() == (
        "ip", "-n", "x", "link", "add", "vnode1", "type", "veth",
        "peer", "name", "eth0", "netns", "y",
    )  # fmt: skip
    assert veth.undo() == ("ip", "-n", "x", "link", "del", "vnode1")
    assert SetMaster("x", "v", "br0").undo() == ("ip", "-n", "x", "link", "set", "v", "nomaster")
    assert SetUp("x", "v").undo() == ("ip", "-n", "x", "link", "set", "v", "down")
    assert AddAddress("x", "eth0", "10.0.0.1/24").undo() == (
        "ip", "-n", "x", "addr", "del", "10.0.0.1/24", "dev", "eth0",
    )  # fmt: skip
    route = AddRoute("x", "10.1.0.0/24", "10.0.0.2", "eth0")
    assert route.command()[4] == "add" and route.undo()[4] == "del"
    assert route.command()[5:] == route.undo()[5:]
    sysctl: Step = SetSysctl("x", "net.ipv4.ip_forward", "1")
    assert sysctl.undo() is None  # goes with "x"


def test_undo_runs_in_reverse_and_skips_what_goes_with_a_namespace(plan: LabPlan) -> None:
    undo = undo_commands(plan.steps)
    deletes = [c for c in undo if c[:3] == ("ip", "netns", "delete")]
    assert [c[3] for c in deletes] == list(reversed(plan.netns_names()))
    assert all(c[3:5] == ("link", "del") for c in undo if c not in deletes)
    # One delete per bridge and per veth pair (the peer goes with it), nothing else.
    links = [s for s in plan.steps if isinstance(s, AddVeth | AddBridge)]
    assert len(undo) == len(deletes) + len(links)
    # Each link goes before its namespace does.
    position = {c: i for i, c in enumerate(undo)}
    for step in plan.steps:
        if isinstance(step, AddVeth | AddBridge):
            assert position[step.undo()] < position[AddNetns(step.netns).undo()]


def test_undo_of_a_partial_run_touches_only_what_was_begun(plan: LabPlan) -> None:
    assert undo_commands(plan.steps[:3]) == [
        ("ip", "-n", "lab1-wire", "link", "del", "br0"),
        ("ip", "netns", "delete", "lab1-wire"),
    ]
    assert undo_commands(()) == []
    # Steps in a namespace the undo does not delete are reverted one by one.
    lone = [AddAddress("elsewhere", "eth0", "10.0.0.1/24"), SetUp("elsewhere", "eth0")]
    assert undo_commands(lone) == [lone[1].undo(), lone[0].undo()]


def test_steps_and_plan_survive_the_state_file(plan: LabPlan) -> None:
    data = json.loads(json.dumps(plan.to_json()))
    assert LabPlan.from_json(data) == plan
    assert [step_from_json(s.to_json()) for s in plan.steps] == list(plan.steps)
    with pytest.raises(LabPlanError, match="unknown recorded step 'mount'"):
        step_from_json({"op": "mount", "netns": "x"})
    with pytest.raises(LabPlanError, match="without ifname"):
        step_from_json({"op": "bridge", "netns": "x"})
    with pytest.raises(LabPlanError, match="incomplete or damaged"):
        LabPlan.from_json({"name": "x"})
    record = LabRecord(plan, begun=5, mesh=False)
    assert LabRecord.from_json(record.to_json(), Path("lab.json")) == record
    with pytest.raises(LabError, match="invalid step count"):
        LabRecord.from_json({**record.to_json(), "begun": 10_000}, Path("lab.json"))
    with pytest.raises(LabError, match="not a lab record"):
        LabRecord.from_json({"version": 99}, Path("lab.json"))


@pytest.mark.parametrize(
    ("objs", "kwargs", "message"),
    [
        (objects(node("n"), pod("p", None)), {}, "Pod demo/p has no spec.nodeName"),
        (objects(node("n"), pod("p", "m")), {}, "on node 'm', which no Node object defines"),
        (objects(service("s", "127.0.30.1")), {}, "defines no Node"),
        (objects(node("n"), node("n")), {}, "Node n is defined twice"),
        (objects(node("n"), pod("p", "n"), pod("p", "n")), {}, "Pod demo/p is defined twice"),
        (objects(node("n")), {"subnet": "fd00::/64"}, "must be IPv4"),
        (objects(node("n")), {"subnet": "10.0.0.0/24"}, "too small"),
        (objects(node("n")), {"subnet": "10.0.0.1/16"}, "host bits set"),
        (objects(node("n")), {"subnet": "127.0.0.0/16"}, "ordinary"),
        (objects(node("a"), node("b")), {"subnet": "10.0.0.0/22"}, "do not fit"),
        (objects(node("n")), {"name": "Bad_Name"}, "lab name 'Bad_Name'"),
        (objects(node("n")), {"name": "x" * 33}, "lab name"),
    ],
)
def test_what_cannot_be_built_is_refused_clearly(
    objs: Objects, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(LabPlanError, match=message):
        plan_lab(objs, **kwargs)


def test_the_yaml_gets_lab_addresses(plan: LabPlan) -> None:
    rewritten = dict((o["metadata"]["name"], o) for _s, o in rewrite_objects(TWO_NODES, plan))
    assert rewritten["node-1"]["status"]["addresses"] == [
        {"type": "InternalIP", "address": "10.244.255.1"},
        {"type": "Hostname", "address": "node-1"},
    ]
    assert rewritten["client"]["status"]["podIP"] == "10.244.1.2"
    assert rewritten["client"]["status"]["podIPs"] == [{"ip": "10.244.1.2"}]
    # A pod without an address gets one.
    assert rewritten["neighbour"]["status"] == {
        "podIP": "10.244.1.3", "podIPs": [{"ip": "10.244.1.3"}], "phase": "Running",
    }  # fmt: skip
    assert rewritten["echo"]["spec"]["clusterIP"] == "10.244.254.1"
    assert rewritten["echo"]["spec"]["clusterIPs"] == ["10.244.254.1"]
    assert rewritten["headless"]["spec"] == {"clusterIP": "None"}
    # The originals are untouched.
    assert TWO_NODES[2][1]["status"]["podIP"] == "127.0.20.1"
    # The embedded mode's layout reader sees the lab addresses (the apps listen on them).
    layout = layout_from_objects(rewrite_objects(TWO_NODES, plan))
    assert [(a.pod, a.address, a.port) for a in layout.apps] == [("server", "10.244.2.2", 9000)]
    assert dict(layout.pods) == {
        "demo/client": "10.244.1.2", "demo/server": "10.244.2.2", "demo/neighbour": "10.244.1.3",
    }  # fmt: skip


def test_netns_map_lists_each_nodes_own_pods(plan: LabPlan) -> None:
    assert plan.netns_map("node-1") == {
        "Kubernetes//Pod/demo/client": "/var/run/netns/lab1-pod-demo.client",
        "Kubernetes//Pod/demo/neighbour": "/var/run/netns/lab1-pod-demo.neighbour",
    }
    assert plan.netns_map("node-2", "other") == {
        "other//Pod/demo/server": "/var/run/netns/lab1-pod-demo.server"
    }


def test_pods_and_exec_targets_are_found_by_name(plan: LabPlan) -> None:
    assert plan.find_pod("server").address == "10.244.2.2"
    assert plan.find_pod("demo/server").address == "10.244.2.2"
    with pytest.raises(KeyError, match="no pod 'ghost'"):
        plan.find_pod("ghost")
    twins = plan_lab(objects(node("n"), pod("p", "n"), pod("p", "n", namespace="other")))
    with pytest.raises(KeyError, match="ambiguous"):
        twins.find_pod("p")
    assert resolve_exec_target(plan, "client") == "lab1-pod-demo.client"
    assert resolve_exec_target(plan, "node:node-2") == "lab1-node-node-2"
    assert resolve_exec_target(plan, ":control") == "lab1-control"
    assert resolve_exec_target(plan, ":wire") == "lab1-wire"
    with pytest.raises(LabError, match="no node 'node-9'"):
        resolve_exec_target(plan, "node:node-9")


def test_waypoint_gateways_are_reported_as_not_run() -> None:
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }
    plan = plan_lab(objects(node("n"), gateway))
    assert plan.warnings == ("cluster.yaml: waypoint Gateway demo/waypoint is not run in the lab",)


def test_the_ztunnel_command_line_is_one_ztunnel_accepts(plan: LabPlan, tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    paths.mesh.create()
    paths.mesh.token_file("node-2").write_text("t" * 32)
    paths.mesh.root_cert.write_text("not read when parsing flags")
    argv = lab_ztunnel_argv(plan.nodes[1], paths, "10.244.255.254:15012")
    assert argv[:4] == ["ip", "netns", "exec", "lab1-node-node-2"]
    config = ztunnel_config_from_args(argv[7:])  # after "<python> -m ztunnel"
    assert config.node == "node-2"
    assert config.capture == "inpod"
    assert config.netns_map == paths.netns_map("node-2").resolve()
    assert in_netns("ns", ["true"]) == ["ip", "netns", "exec", "ns", "true"]


@pytest.mark.parametrize(
    ("stderr", "gone"),
    [
        ('Cannot remove namespace file "/run/netns/x": No such file or directory', True),
        ('Cannot find device "vnode1"', True),
        ('Cannot open network namespace "x": No such file or directory', True),
        ("RTNETLINK answers: Cannot assign requested address", True),
        ("RTNETLINK answers: No such process", True),
        ("RTNETLINK answers: Device or resource busy", False),
        ("RTNETLINK answers: Operation not permitted", False),
    ],
)
def test_already_gone_is_told_apart_from_real_failures(stderr: str, gone: bool) -> None:
    assert is_already_gone(stderr) is gone


def test_cli_parses_exec_and_refuses_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli.build_parser().parse_args(["lab", "exec", "demo/client", "--", "nc", "-v", "x"])
    assert isinstance(args, argparse.Namespace)
    assert args.target == "demo/client"
    assert args.cmd[-3:] == ["nc", "-v", "x"]
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli.main(["lab", "status"]) == 1
    assert "needs root" in capsys.readouterr().err


def test_step_base_class_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        Step("x")  # type: ignore[abstract]
