"""What the lab's mesh reads: the YAML with lab addresses and each node's netns map.

``lab up`` writes a copy of the YAML for istiod_lite (``<state-dir>/config``), in which every
address is the lab's, and each node's netns map (``<state-dir>/netns/<node>.json``: pod uid ->
netns path, what a CNI plugin tells ztunnel).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ambient_common.files import write_atomically
from ambientctl.lab.plan import LabPlan
from ambientctl.lab.state import LabPaths


def rewrite_objects(
    objects: Iterable[tuple[str, Mapping[str, Any]]], plan: LabPlan
) -> list[tuple[str, dict[str, Any]]]:
    """Copies of the objects with lab addresses: each Node's InternalIP becomes its bridge
    address, each Pod's ``status.podIP``/``podIPs`` its lab address (a Pod without one gets it
    too, and ``phase: Running``), each Service's cluster IP a lab VIP (a loopback VIP would
    never leave a pod's namespace). Everything else is unchanged."""
    nodes = {n.name: n for n in plan.nodes}
    pods = {p.key: p for p in plan.pods}
    rewritten: list[tuple[str, dict[str, Any]]] = []
    for source, original in objects:
        obj: dict[str, Any] = copy.deepcopy(dict(original))
        kind = obj.get("kind")
        metadata = obj.get("metadata") or {}
        key = f"{metadata.get('namespace') or 'default'}/{metadata.get('name')}"
        if kind == "Node" and metadata.get("name") in nodes:
            address = nodes[metadata["name"]].address
            status = obj.setdefault("status", {})
            others = [
                a
                for a in status.get("addresses") or ()
                if not (isinstance(a, Mapping) and a.get("type") == "InternalIP")
            ]
            status["addresses"] = [{"type": "InternalIP", "address": address}, *others]
        elif kind == "Pod" and key in pods:
            status = obj.setdefault("status", {})
            status["podIP"] = pods[key].address
            status["podIPs"] = [{"ip": pods[key].address}]
            status.setdefault("phase", "Running")
        elif kind == "Service" and key in plan.service_addresses:
            spec = obj.setdefault("spec", {})
            spec["clusterIP"] = plan.service_addresses[key]
            spec["clusterIPs"] = [plan.service_addresses[key]]
        rewritten.append((source, obj))
    return rewritten


def write_lab_config(
    paths: LabPaths, config_dir: Path, objects: Sequence[tuple[str, Mapping[str, Any]]]
) -> None:
    """The rewritten YAML, one file per source file at the same relative path."""
    shutil.rmtree(paths.config_dir, ignore_errors=True)
    by_file: dict[str, list[Mapping[str, Any]]] = {}
    for source, obj in objects:
        by_file.setdefault(source, []).append(obj)
    for source, docs in by_file.items():
        try:
            relative = Path(source).resolve().relative_to(config_dir.resolve())
        except ValueError:
            relative = Path(Path(source).name)
        target = paths.config_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            "# Written by `ambientctl lab up` from "
            + source
            + " with lab addresses.\n"
            + yaml.safe_dump_all(docs, sort_keys=False)
        )


def write_netns_maps(paths: LabPaths, plan: LabPlan, cluster_id: str) -> None:
    paths.netns_map_dir.mkdir(parents=True, exist_ok=True)
    for node in plan.nodes:
        write_atomically(
            paths.netns_map(node.name),
            json.dumps(plan.netns_map(node.name, cluster_id), indent=2) + "\n",
            0o644,
        )
