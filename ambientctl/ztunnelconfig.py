"""``ambientctl ztunnel-config``: read a ztunnel's ``/config_dump`` and show it like istioctl.

The config dump (served by ``ztunnel/admin.py`` on the node's admin port 15000) is a JSON
object ``{"workloads": [...], "services": [...], "policies": [...], "certificates": [...]}``
whose workloads/services/policies are ``ambient_api.codec.to_jsonable`` of the wire
contract and whose certificates are ``{"identity", "state", "certChain": [{"serialNumber",
"validFrom", "expirationTime"}]}`` (Istio's spelling; snake_case is accepted too). Each
kind's field access lives in one small ``*_rows`` function so a change of the dump format is
a change in one place; ``-o json|yaml`` is istioctl's JSON (``ambientctl.ztunnel_json``).
The kinds are istioctl's, with its aliases, plus ``all``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from ambientctl.output import OutputFormat, parse_output_format, render, render_json, render_yaml
from ambientctl.ztunnel_json import kind_json

DEFAULT_ADMIN_PORT = 15000
CONFIG_DUMP_PATH = "/config_dump"
MESH_STATE_FILE = "mesh.json"

Row = dict[str, Any]


class ZtunnelConfigError(Exception):
    """Something the user can fix: a wrong node name, an unreachable ztunnel, a bad dump."""


# ---------------------------------------------------------------------------------------------
# Finding the ztunnel


def load_mesh_state(state_dir: Path) -> dict[str, Any]:
    """The running embedded mesh's ``mesh.json`` (written by ``ambientctl up``)."""
    path = state_dir / MESH_STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZtunnelConfigError(
            f"no running embedded mesh: {path} does not exist (start one with `ambientctl up`, "
            "or name its state directory with --state-dir; a cluster: --kubeconfig)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ZtunnelConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        raise ZtunnelConfigError(f"{path} has no 'nodes' object; is it from `ambientctl up`?")
    pid = data.get("pid")
    if isinstance(pid, int) and not _process_alive(pid):
        raise ZtunnelConfigError(
            f"{path} is stale: the `ambientctl up` that wrote it (pid {pid}) is gone"
        )
    return data


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_node_address(state_dir: Path, node: str | None) -> str:
    """The address of ``node``'s ztunnel; with no node given, the mesh's only node."""
    nodes: dict[str, str] = load_mesh_state(state_dir)["nodes"]
    if node is None:
        if len(nodes) == 1:
            return next(iter(nodes.values()))
        names = ", ".join(sorted(nodes)) or "none"
        raise ZtunnelConfigError(f"the mesh has several nodes; choose one with --node ({names})")
    try:
        return nodes[node]
    except KeyError:
        names = ", ".join(sorted(nodes)) or "none"
        raise ZtunnelConfigError(f"unknown node {node!r}; the mesh has: {names}") from None


def fetch_config_dump(
    address: str, admin_port: int = DEFAULT_ADMIN_PORT, timeout: float = 5.0
) -> dict[str, Any]:
    """GET the dump. ``trust_env=False``: no proxy from the environment may sit in between."""
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:{admin_port}{CONFIG_DUMP_PATH}"
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        raise ZtunnelConfigError(f"cannot reach ztunnel admin at {url}: {exc}") from None
    if response.status_code != 200:
        raise ZtunnelConfigError(
            f"{url} answered {response.status_code}: {response.text.strip()[:200]}"
        )
    try:
        dump = response.json()
    except ValueError as exc:
        raise ZtunnelConfigError(f"{url} did not return JSON: {exc}") from None
    if not isinstance(dump, dict):
        raise ZtunnelConfigError(f"{url} returned {type(dump).__name__}, expected an object")
    return dump


# ---------------------------------------------------------------------------------------------
# One function per kind: dump entries -> table rows


def _waypoint_text(waypoint: Mapping[str, Any] | None) -> str:
    if not waypoint:
        return "None"
    return str(waypoint.get("destination") or "None")


def workload_rows(dump: Mapping[str, Any]) -> list[Row]:
    return [
        {
            "namespace": w.get("namespace", ""),
            "pod_name": w.get("name", ""),
            "address": ",".join(w.get("addresses") or ()),
            "node": w.get("node", ""),
            "waypoint": _waypoint_text(w.get("waypoint")),
            "protocol": w.get("tunnel_protocol", ""),
            "service_account": w.get("service_account", ""),
            "status": w.get("status", ""),
        }
        for w in _entries(dump, "workloads")
    ]


def service_rows(dump: Mapping[str, Any]) -> list[Row]:
    """ENDPOINTS is ``healthy/total`` over the workloads that list the service, as istioctl."""
    workloads = _entries(dump, "workloads")
    rows = []
    for s in _entries(dump, "services"):
        key = f"{s.get('namespace', '')}/{s.get('hostname', '')}"
        members = [w for w in workloads if key in (w.get("services") or ())]
        healthy = sum(1 for w in members if w.get("status", "HEALTHY") == "HEALTHY")
        rows.append(
            {
                "namespace": s.get("namespace", ""),
                "service_name": s.get("name", ""),
                "service_vip": ",".join(a.get("address", "") for a in s.get("addresses") or ()),
                "waypoint": _waypoint_text(s.get("waypoint")),
                "endpoints": f"{healthy}/{len(members)}",
                "hostname": s.get("hostname", ""),
            }
        )
    return rows


def policy_rows(dump: Mapping[str, Any]) -> list[Row]:
    return [
        {
            "namespace": p.get("namespace", ""),
            "policy_name": p.get("name", ""),
            "action": p.get("action", ""),
            "scope": p.get("scope", ""),
            "rules": len(p.get("rules") or ()),
        }
        for p in _entries(dump, "policies")
    ]


def certificate_rows(dump: Mapping[str, Any], now: datetime | None = None) -> list[Row]:
    """One row per certificate of each chain: Leaf first, Root last, as istioctl lists them.

    Accepts Istio's camelCase (``certChain``, ``serialNumber``, ``validFrom``,
    ``expirationTime``, which ztunnel/identity.py emits) and the snake_case spelling.
    """
    now = now or datetime.now(UTC)
    rows = []
    for cert in _entries(dump, "certificates"):
        chain = _field(cert, "cert_chain", "certChain") or ()
        for index, link in enumerate(chain):
            valid_from = _field(link, "valid_from", "validFrom") or ""
            expiration = _field(link, "expiration_time", "expirationTime") or ""
            not_before, not_after = parse_time(valid_from), parse_time(expiration)
            rows.append(
                {
                    "certificate_name": cert.get("identity", ""),
                    "type": _chain_position(index, len(chain)),
                    "status": cert.get("state", ""),
                    "valid_cert": bool(not_before and not_after and not_before <= now <= not_after),
                    "serial_number": _field(link, "serial_number", "serialNumber") or "",
                    "not_after": expiration,
                    "not_before": valid_from,
                }
            )
        if not chain:
            rows.append(
                {
                    "certificate_name": cert.get("identity", ""),
                    "type": "Leaf",
                    "status": cert.get("state", ""),
                    "valid_cert": False,
                }
            )
    return rows


def _field(entry: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``entry`` (a field's spellings across versions)."""
    for name in names:
        if name in entry:
            return entry[name]
    return None


def _chain_position(index: int, length: int) -> str:
    if index == 0:
        return "Leaf"
    return "Root" if index == length - 1 else "Intermediate"


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time from a config dump (UTC if it names no zone); None if unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _entries(dump: Mapping[str, Any], kind: str) -> list[Mapping[str, Any]]:
    entries = dump.get(kind) or []
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ZtunnelConfigError(f"config dump: {kind!r} is not a list of objects")
    return entries


# ---------------------------------------------------------------------------------------------
# Views


@dataclass(frozen=True)
class View:
    dump_key: str
    rows: Callable[[Mapping[str, Any]], list[Row]]
    columns: tuple[str, ...]
    wide_columns: tuple[str, ...] = ()


VIEWS: dict[str, View] = {
    "workloads": View(
        "workloads",
        workload_rows,
        ("namespace", "pod_name", "address", "node", "waypoint", "protocol"),
        ("service_account", "status"),
    ),
    "services": View(
        "services",
        service_rows,
        ("namespace", "service_name", "service_vip", "waypoint", "endpoints"),
        ("hostname",),
    ),
    "policies": View(
        "policies", policy_rows, ("namespace", "policy_name", "action", "scope"), ("rules",)
    ),
    "certificates": View(
        "certificates",
        certificate_rows,
        (
            "certificate_name",
            "type",
            "status",
            "valid_cert",
            "serial_number",
            "not_after",
            "not_before",
        ),
    ),
}


ALL = "all"
# istioctl's section titles of ``ztunnel-config all``.
ALL_SECTIONS = {
    "workloads": "WORKLOAD INFO",
    "services": "SERVICE INFO",
    "policies": "POLICY INFO",
    "certificates": "SECRET INFO",
}
# Every spelling istioctl accepts for a kind (its name and aliases), and ours (the plural).
KIND_ALIASES: dict[str, str] = {
    **{name: "workloads" for name in ("workload", "workloads", "w")},
    **{name: "services" for name in ("service", "services", "s", "svc")},
    **{name: "policies" for name in ("policy", "policies", "p", "pol")},
    **{name: "certificates" for name in ("certificate", "certificates", "certs", "cert")},
    ALL: ALL,
}


def render_view(
    dump: Mapping[str, Any],
    kind: str,
    fmt: OutputFormat | str,
    *,
    namespace: str | None = None,
) -> str:
    """Render one kind of the dump (any of ``KIND_ALIASES``): a table of its rows, or its
    entries in istioctl's JSON/YAML. ``all``: every kind, as ``istioctl ztunnel-config all``."""
    try:
        kind = KIND_ALIASES[kind]
    except KeyError:
        known = ", ".join(KIND_ALIASES)
        raise ZtunnelConfigError(f"unknown kind {kind!r}; expected one of {known}") from None
    fmt = fmt if isinstance(fmt, OutputFormat) else parse_output_format(fmt)
    if kind != ALL:
        rows, structured = _view_of(dump, kind, namespace)
        view = VIEWS[kind]
        return render(rows, view.columns, fmt, wide_columns=view.wide_columns,
                      structured=structured)  # fmt: skip
    if fmt in (OutputFormat.JSON, OutputFormat.YAML):
        everything = {k: _view_of(dump, k, namespace)[1] for k in ALL_SECTIONS}
        return render_json(everything) if fmt is OutputFormat.JSON else render_yaml(everything)
    sections = []
    for key, title in ALL_SECTIONS.items():
        view = VIEWS[key]
        rows, _structured = _view_of(dump, key, namespace)
        table = render(rows, view.columns, fmt, wide_columns=view.wide_columns)
        sections.append(f"\n------ {title} ------\n\n{table}")
    return "".join(sections)


def _view_of(
    dump: Mapping[str, Any], kind: str, namespace: str | None
) -> tuple[list[Row], list[Any]]:
    """One kind's table rows and its istioctl JSON entries, of ``namespace`` if given."""
    view = VIEWS[kind]
    rows = view.rows(dump)
    raw: Sequence[Mapping[str, Any]] = _entries(dump, view.dump_key)
    if namespace is not None:
        rows = [r for r in rows if r.get("namespace", namespace) == namespace]
        raw = [e for e in raw if e.get("namespace", namespace) == namespace]
    return rows, kind_json(view.dump_key, raw, dump)
