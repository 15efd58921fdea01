"""``ambientctl lab status``: the recorded lab against what exists now."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ambientctl.embedded.supervisor import live_cmdline
from ambientctl.lab.netns import CommandRunner, existing_netns, netns_links, netns_pids, run_command
from ambientctl.lab.state import LabPaths, require_record
from ambientctl.output import render


def lab_status(paths: LabPaths, run: CommandRunner = run_command) -> dict[str, Any]:
    """Namespaces (present? links, process count), pods with addresses, processes alive."""
    record = require_record(paths)
    plan = record.plan
    present = existing_netns(run)
    roles = {plan.wire_netns: "wire", plan.control_netns: "control"}
    roles.update({n.netns: f"node {n.name}" for n in plan.nodes})
    roles.update({p.netns: f"pod {p.key}" for p in plan.pods})
    namespaces = [
        {
            "netns": ns,
            "role": roles.get(ns, ""),
            "present": ns in present,
            "links": netns_links(ns, run) if ns in present else [],
            "processes": len(netns_pids(ns, run)) if ns in present else 0,
        }
        for ns in plan.netns_names()
    ]
    try:
        children = json.loads(paths.mesh.children_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        children = {}
    processes = []
    for process_name, entry in sorted(children.items()):
        pid = entry.get("pid") if isinstance(entry, dict) else None
        argv = entry.get("argv") if isinstance(entry, dict) else None
        live = live_cmdline(pid)
        alive = live is not None and isinstance(argv, list) and live in (argv, argv[4:])
        processes.append({"name": process_name, "pid": pid, "alive": alive})
    return {
        "lab": plan.name,
        "subnet": plan.subnet,
        "complete": record.complete,
        "steps": f"{record.begun}/{len(plan.steps)}",
        "control": {"netns": plan.control_netns, "address": plan.control_address},
        "nodes": [
            {"node": n.name, "address": n.address, "pod_cidr": n.pod_cidr, "netns": n.netns}
            for n in plan.nodes
        ],
        "pods": [
            {"pod": p.key, "node": p.node, "ip": p.address, "netns": p.netns} for p in plan.pods
        ],
        "namespaces": namespaces,
        "processes": processes,
    }


def render_status(status: Mapping[str, Any], fmt: str) -> str:
    if fmt in ("json", "yaml"):
        return render([], [], fmt, structured=dict(status))
    state = "built" if status["complete"] else f"INCOMPLETE ({status['steps']} steps begun)"
    parts = [
        f"lab {status['lab']} ({status['subnet']}): {state}; istiod_lite at "
        f"{status['control']['address']} in {status['control']['netns']}\n",
        render(status["nodes"], ["node", "address", "pod_cidr", "netns"], fmt),
        render(status["pods"], ["pod", "node", "ip", "netns"], fmt),
        render(status["namespaces"], ["netns", "role", "present", "processes"], fmt,
               wide_columns=["links"]),
    ]  # fmt: skip
    if status["processes"]:
        parts.append(render(status["processes"], ["name", "pid", "alive"], fmt))
    return "\n".join(part.rstrip("\n") + "\n" for part in parts)
