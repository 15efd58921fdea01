"""``ambientctl status`` and ``ambientctl check`` on the embedded mesh.

The same questions ``kubectl ambient status|check`` answer on a cluster, asked of the mesh
``ambientctl up`` runs: is istiod up, is every node's ztunnel ready and how soon do its
certificates expire, are the waypoints ready, does istiod read the whole config directory.
The answers come from ``mesh.json`` (what runs where), the processes' readiness and admin
ports, and istiod's log; they are shown in the cluster commands' tables
(``ClusterStatus``, ``CheckResult``) so one habit reads both.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ambientctl.embedded.istiod_log import outstanding_problems
from ambientctl.embedded.state_dir import StatePaths
from ambientctl.kube.status import (
    CheckResult,
    ClusterStatus,
    Verdict,
    expiry_text,
    soonest_expiry,
)
from ambientctl.waypointcmd import probe_ready
from ambientctl.ztunnelconfig import (
    DEFAULT_ADMIN_PORT,
    ZtunnelConfigError,
    fetch_config_dump,
    load_mesh_state,
)

PROBE_TIMEOUT = 2.0
# A certificate closer than this to its end should have been renewed (at half of 24 h).
EXPIRY_WARNING = timedelta(hours=1)

Row = dict[str, Any]
Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def istiod_reachable(address: str) -> tuple[bool, str]:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT):
            return True, f"listening on {address}"
    except OSError as exc:
        return False, f"{address}: {exc.strerror or exc}"


def ztunnel_report(node: str, address: str, now: datetime) -> tuple[Row, datetime | None]:
    """One node's row of ``status`` and its soonest leaf certificate expiry."""
    ready, reason = probe_ready(address)
    row: Row = {"node": node, "pod": f"ztunnel {address}", "ready": str(ready).lower(),
                "age": "", "restarts": "", "cert_expiry": reason}  # fmt: skip
    if not ready:
        return row, None
    try:
        expiry = soonest_expiry(fetch_config_dump(address, DEFAULT_ADMIN_PORT, PROBE_TIMEOUT))
    except ZtunnelConfigError as exc:
        row["cert_expiry"] = f"unknown: {exc}"
        return row, None
    row["cert_expiry"] = expiry_text(expiry, now)
    return row, expiry


def _mesh_map(mesh: Mapping[str, Any], key: str) -> dict[str, str]:
    value = mesh.get(key) or {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def embedded_status(state_dir: Path, now: Clock = _utc_now) -> ClusterStatus:
    """What ``status`` shows; raises ZtunnelConfigError when no mesh runs."""
    mesh = load_mesh_state(state_dir)
    at = now()
    istiod = str(mesh.get("istiod", ""))
    up, detail = istiod_reachable(istiod)
    status = ClusterStatus(
        control_plane=[{"component": "istiod", "ready": "1/1" if up else "0/1", "detail": detail}]
    )
    expiries = []
    for node, address in sorted(_mesh_map(mesh, "nodes").items()):
        row, expiry = ztunnel_report(node, address, at)
        status.ztunnels.append(row)
        if expiry is not None:
            expiries.append((expiry, node))
    if expiries:
        expiry, node = min(expiries)
        status.soonest_certificate_expiry = f"{expiry_text(expiry, at)} on node {node}"
    for key, address in sorted(_mesh_map(mesh, "waypoints").items()):
        namespace, _, name = key.partition("/")
        ready, reason = probe_ready(address)
        status.waypoints.append({"namespace": namespace, "name": name, "address": address,
                                 "programmed": str(ready), "reason": reason})  # fmt: skip
    return status


def embedded_checks(state_dir: Path, now: Clock = _utc_now) -> list[CheckResult]:
    """What ``check`` reports: one result per concern, FAIL when the mesh cannot work."""
    try:
        mesh = load_mesh_state(state_dir)
    except ZtunnelConfigError as exc:
        return [CheckResult("embedded-mesh", Verdict.FAIL, str(exc))]
    results = [
        CheckResult(
            "embedded-mesh",
            Verdict.OK,
            f"`ambientctl up` (pid {mesh.get('pid')}) runs {mesh.get('config_dir', '')}",
        )
    ]
    up, detail = istiod_reachable(str(mesh.get("istiod", "")))
    results.append(CheckResult("istiod", Verdict.OK if up else Verdict.FAIL, detail))
    results.append(check_config(StatePaths(state_dir)))
    results.extend(check_ztunnels(_mesh_map(mesh, "nodes"), now()))
    probes = {key: probe_ready(address) for key, address in _mesh_map(mesh, "waypoints").items()}
    not_ready = [f"{key} not ready: {why}" for key, (ready, why) in sorted(probes.items())
                 if not ready]  # fmt: skip
    results.append(
        CheckResult("waypoints", Verdict.FAIL, "; ".join(not_ready))
        if not_ready
        else CheckResult("waypoints", Verdict.OK, f"{len(probes)} ready")
    )
    return results


def check_config(paths: StatePaths) -> CheckResult:
    problems = outstanding_problems(paths.istiod_log)
    if not problems:
        return CheckResult("config", Verdict.OK, "istiod reads every file of the config directory")
    return CheckResult("config", Verdict.WARN, "; ".join(p.sentence() for p in problems))


def check_ztunnels(nodes: Mapping[str, str], now: datetime) -> list[CheckResult]:
    reports = [ztunnel_report(node, address, now) for node, address in sorted(nodes.items())]
    not_ready = [row for row, _expiry in reports if row["ready"] != "true"]
    results = [
        CheckResult("ztunnels", Verdict.FAIL,
                    "; ".join(f"{r['node']}: {r['cert_expiry']}" for r in not_ready))
        if not_ready
        else CheckResult("ztunnels", Verdict.OK, f"{len(reports)}/{len(nodes)} nodes ready")
    ]  # fmt: skip
    expiries = [(expiry, row["node"]) for row, expiry in reports if expiry is not None]
    if not expiries:
        results.append(CheckResult("certificates", Verdict.WARN, "no workload certificates yet"))
        return results
    expiry, node = min(expiries)
    text = f"soonest expiry {expiry_text(expiry, now)} on node {node}"
    verdict = (
        Verdict.FAIL if expiry <= now
        else Verdict.WARN if expiry - now < EXPIRY_WARNING
        else Verdict.OK
    )  # fmt: skip
    results.append(CheckResult("certificates", verdict, text))
    return results
