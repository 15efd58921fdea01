"""``ambientctl waypoint generate|apply|list|status|delete``, as istioctl's, on the embedded mesh.

The embedded mesh's "cluster" is its config directory: ``apply`` writes the waypoint
``Gateway`` there as ``waypoint-<ns>.<name>.yaml`` (a namespace has no dot, so the name is
unique), which istiod_lite's file source and ``ambientctl up`` pick up live; ``delete``
removes only such files, never a Gateway someone wrote by hand. ``--enroll-namespace`` sets
``istio.io/use-waypoint`` on the Namespace object in whatever file holds it; that file is
rewritten through PyYAML, which keeps its data and its leading comment block but loses other
comments and the original formatting. ``status`` asks the running mesh (``mesh.json`` in the
state directory) and the waypoint's own readiness and admin endpoints.

An embedded waypoint needs an IP of its own (``spec.addresses``, type IPAddress). Without
``--address``, ``apply`` takes the first address of 127.0.40.1-127.0.40.254 that no object in
the config directory mentions: every string in every object that parses as an IP address
counts as used (node, pod and service addresses, other Gateways' addresses alike).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx
import yaml

from ambient_common.files import write_atomically
from ambientctl.embedded.errors import EmbeddedConfigError
from ambientctl.embedded.layout import (
    config_files,
    load_documents,
    objects_of,
    waypoint_process_name,
)
from ambientctl.embedded.mesh import READINESS_PORT
from ambientctl.embedded.supervisor import live_cmdline
from ambientctl.kube.api import (
    labels_of,
    metadata,
)
from ambientctl.output import render
from ambientctl.ztunnelconfig import (
    DEFAULT_ADMIN_PORT,
    ZtunnelConfigError,
    certificate_rows,
    fetch_config_dump,
    load_mesh_state,
)
from istiod_lite.labels import (
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_GATEWAY_CLASS,
)
from istiod_lite.translate.waypoints import is_waypoint

GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")
DEFAULT_WAYPOINT_NAME = "waypoint"
DEFAULT_NAMESPACE = "default"
DEFAULT_STATE_DIR = Path("run")
ADDRESS_POOL = ipaddress.ip_network("127.0.40.0/24")
CONFIG_FILE_MODE = 0o644
PROBE_TIMEOUT = 2.0
APPLIED_HEADER = (
    "# Written by `ambientctl waypoint apply`; `ambientctl waypoint delete {name} -n {namespace}"
    " -f <this directory>` removes it.\n"
)


class WaypointCommandError(Exception):
    """Something the user can fix; the message says what (exit code 1)."""


class WaypointUsageError(WaypointCommandError):
    """Flags that contradict each other (exit code 2, as argparse's usage errors)."""


# ---------------------------------------------------------------------------------------------
# The Gateway (sans-IO)


def gateway_manifest(
    name: str, namespace: str, waypoint_for: str = "service", address: str | None = None
) -> dict[str, Any]:
    """The waypoint Gateway istioctl generates, plus ``spec.addresses`` for the embedded mode."""
    spec: dict[str, Any] = {
        "gatewayClassName": WAYPOINT_GATEWAY_CLASS,
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    }
    if address is not None:
        spec["addresses"] = [{"type": "IPAddress", "value": address}]
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": {
            "labels": {WAYPOINT_FOR_LABEL: waypoint_for},
            "name": name,
            "namespace": namespace,
        },
        "spec": spec,
    }


def render_manifest(manifest: Mapping[str, Any]) -> str:
    """Keys sorted and lists in block style, as istioctl's (Go) YAML marshalling prints."""
    return yaml.safe_dump(dict(manifest), sort_keys=True, default_flow_style=False)


def applied_file(config_dir: Path, namespace: str, name: str) -> Path:
    return config_dir / f"waypoint-{namespace}.{name}.yaml"


def is_waypoint_gateway(obj: Mapping[str, Any]) -> bool:
    """Any object of a config directory that is a waypoint Gateway."""
    return obj.get("kind") == "Gateway" and is_waypoint(obj)


def _namespace_of(obj: Mapping[str, Any]) -> str:
    return str(metadata(obj).get("namespace") or DEFAULT_NAMESPACE)


def gateway_address(gateway: Mapping[str, Any]) -> str | None:
    spec = gateway.get("spec") or {}
    for address in spec.get("addresses") or () if isinstance(spec, Mapping) else ():
        if isinstance(address, Mapping) and address.get("type", "IPAddress") == "IPAddress":
            return str(address.get("value"))
    return None


def ip_strings(value: Any) -> Iterator[str]:
    """Every string inside ``value`` (nested mappings and lists) that is an IP address."""
    if isinstance(value, Mapping):
        for item in value.values():
            yield from ip_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from ip_strings(item)
    elif isinstance(value, str):
        try:
            yield str(ipaddress.ip_address(value))
        except ValueError:
            return


def free_address(used: Iterable[str]) -> str:
    """The first address of ``ADDRESS_POOL`` not in ``used``."""
    taken = set(used)
    for candidate in ADDRESS_POOL.hosts():
        if str(candidate) not in taken:
            return str(candidate)
    raise WaypointCommandError(
        f"every address of {ADDRESS_POOL} is used in the config directory; pass --address"
    )


def users_of(objects: Iterable[Mapping[str, Any]], namespace: str, name: str) -> list[str]:
    """``namespace/x``, ``service/ns/x``, ``pod/ns/x`` labelled to use waypoint
    ``namespace/name`` (their own ``istio.io/use-waypoint`` label, not inherited ones)."""
    users = []
    for obj in objects:
        kind = obj.get("kind")
        if kind not in ("Namespace", "Service", "Pod"):
            continue
        labels = labels_of(obj)
        if labels.get(USE_WAYPOINT_LABEL) != name:
            continue
        own_name = str(metadata(obj).get("name", ""))
        own_namespace = own_name if kind == "Namespace" else _namespace_of(obj)
        if labels.get(USE_WAYPOINT_NAMESPACE_LABEL, own_namespace) != namespace:
            continue
        users.append(
            f"namespace/{own_name}"
            if kind == "Namespace"
            else f"{str(kind).lower()}/{own_namespace}/{own_name}"
        )
    return users


# ---------------------------------------------------------------------------------------------
# The config directory


@dataclass
class ConfigFile:
    path: Path
    documents: list[Any]

    @property
    def objects(self) -> list[Mapping[str, Any]]:
        return objects_of(self.path, self.documents)


def read_config_dir(config_dir: Path) -> list[ConfigFile]:
    try:
        return [ConfigFile(path, load_documents(path)) for path in config_files(config_dir)]
    except EmbeddedConfigError as exc:
        raise WaypointCommandError(str(exc)) from None


def all_objects(files: Iterable[ConfigFile]) -> list[Mapping[str, Any]]:
    try:
        return [obj for f in files for obj in f.objects]
    except EmbeddedConfigError as exc:
        raise WaypointCommandError(str(exc)) from None


def find_object(
    files: Iterable[ConfigFile], kind: str, namespace: str | None, name: str
) -> tuple[ConfigFile, Mapping[str, Any]] | None:
    """The file and object of ``kind`` ``namespace/name`` (``namespace`` None: cluster-scoped)."""
    for config_file in files:
        for obj in config_file.objects:
            if obj.get("kind") != kind or metadata(obj).get("name") != name:
                continue
            if namespace is None or _namespace_of(obj) == namespace:
                return config_file, obj
    return None


def leading_comments(text: str) -> str:
    """The comment block a file starts with (kept when PyYAML rewrites the file)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


def enroll_namespace(files: Sequence[ConfigFile], namespace: str, waypoint: str) -> Path:
    """Label the Namespace object ``istio.io/use-waypoint=<waypoint>`` in the file holding it."""
    found = find_object(files, "Namespace", None, namespace)
    if found is None:
        raise WaypointCommandError(
            f"no Namespace {namespace!r} in the config directory; add one to enroll it"
        )
    config_file, obj = found
    if not isinstance(obj.get("metadata"), dict):
        raise WaypointCommandError(f"{config_file.path}: Namespace {namespace} has no metadata")
    meta: dict[str, Any] = obj["metadata"]
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        labels = meta["labels"] = {}
    labels[USE_WAYPOINT_LABEL] = waypoint
    labels.pop(USE_WAYPOINT_NAMESPACE_LABEL, None)  # the waypoint is in this namespace
    header = leading_comments(config_file.path.read_text())
    body = yaml.safe_dump_all(config_file.documents, sort_keys=False, default_flow_style=False)
    mode = stat.S_IMODE(config_file.path.stat().st_mode)
    write_atomically(config_file.path, header + body, mode=mode)
    return config_file.path


@dataclass(frozen=True)
class Applied:
    path: Path
    address: str
    enrolled: Path | None


def apply_waypoint(
    config_dir: Path,
    name: str,
    namespace: str,
    *,
    waypoint_for: str = "service",
    address: str | None = None,
    enroll: bool = False,
) -> Applied:
    """Write (or update) the waypoint Gateway's file in ``config_dir``."""
    files = read_config_dir(config_dir)
    target = applied_file(config_dir, namespace, name)
    existing = find_object(files, "Gateway", namespace, name)
    if existing is not None and existing[0].path != target:
        raise WaypointCommandError(
            f"Gateway {namespace}/{name} is already defined in {existing[0].path}; edit that "
            "file (apply manages only the files it writes)"
        )
    if existing is None and target.exists():
        raise WaypointCommandError(
            f"{target} exists but holds no Gateway {namespace}/{name}; move it away first"
        )
    own_address = gateway_address(existing[1]) if existing is not None else None
    used: dict[str, str] = {}
    for config_file in files:
        if config_file.path == target:
            continue
        for obj in config_file.objects:
            for ip in ip_strings(obj):
                used.setdefault(ip, f"{obj.get('kind')} {metadata(obj).get('name')}")
    if address is None:
        address = own_address if own_address and own_address not in used else free_address(used)
    elif address in used:
        raise WaypointCommandError(
            f"address {address} is already used by {used[address]} in the config directory"
        )
    manifest = gateway_manifest(name, namespace, waypoint_for, address)
    if existing is not None:
        # Keep what was added by hand since (e.g. istio.io/service-account).
        annotations = metadata(existing[1]).get("annotations")
        if isinstance(annotations, Mapping) and annotations:
            manifest["metadata"]["annotations"] = dict(annotations)
    header = APPLIED_HEADER.format(namespace=namespace, name=name)
    enrolled = None
    # Check before writing anything: a missing Namespace must not leave half an apply.
    if enroll and find_object(files, "Namespace", None, namespace) is None:
        raise WaypointCommandError(
            f"no Namespace {namespace!r} in the config directory; add one to enroll it"
        )
    write_atomically(target, header + render_manifest(manifest), mode=CONFIG_FILE_MODE)
    if enroll:
        enrolled = enroll_namespace(files, namespace, name)
    return Applied(target, address, enrolled)


def delete_waypoints(
    config_dir: Path, names: Sequence[str], namespace: str
) -> list[tuple[str, Path, list[str]]]:
    """Remove the files ``apply`` wrote for ``namespace/<name>``, all or none (every name is
    checked first). Returns (name, file, who still labels itself to use it) per name."""
    files = read_config_dir(config_dir)
    targets = []
    for name in names:
        found = find_object(files, "Gateway", namespace, name)
        if found is None or not is_waypoint_gateway(found[1]):
            raise WaypointCommandError(f"no waypoint Gateway {namespace}/{name} in {config_dir}")
        config_file, _ = found
        target = applied_file(config_dir, namespace, name)
        if config_file.path != target or len(config_file.objects) != 1:
            raise WaypointCommandError(
                f"Gateway {namespace}/{name} is in {config_file.path}, which `ambientctl "
                "waypoint apply` did not write; remove it from that file yourself"
            )
        targets.append((name, target))
    remaining = all_objects(f for f in files if f.path not in {t for _, t in targets})
    for _, target in targets:
        target.unlink()
    return [(name, target, users_of(remaining, namespace, name)) for name, target in targets]


def waypoint_rows(
    files: Sequence[ConfigFile], namespace: str | None, config_dir: Path
) -> list[dict[str, Any]]:
    objects = all_objects(files)
    rows = []
    for config_file in files:
        for obj in config_file.objects:
            if not is_waypoint_gateway(obj):
                continue
            ns = _namespace_of(obj)
            if namespace is not None and ns != namespace:
                continue
            name = str(metadata(obj).get("name", ""))
            rows.append(
                {
                    "namespace": ns,
                    "name": name,
                    "for": labels_of(obj).get(WAYPOINT_FOR_LABEL, "service"),
                    "address": gateway_address(obj) or "",
                    "used_by": users_of(objects, ns, name),
                    "file": str(config_file.path.relative_to(config_dir)),
                }
            )
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


# ---------------------------------------------------------------------------------------------
# Status of a running waypoint


def probe_ready(address: str, port: int = READINESS_PORT) -> tuple[bool, str]:
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:{port}/healthz/ready"
    try:
        with httpx.Client(trust_env=False, timeout=PROBE_TIMEOUT) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        return False, f"{url}: {exc or type(exc).__name__}"
    if response.status_code == 200:
        return True, ""
    return False, f"{url} answered {response.status_code}: {response.text.strip()[:200]}"


def process_state(state_dir: Path, namespace: str, name: str) -> str:
    """``running`` / ``not running`` from the supervisor's ``children.json``."""
    try:
        children = json.loads((state_dir / "children.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown"
    entry = (
        children.get(waypoint_process_name(namespace, name)) if isinstance(children, dict) else None
    )
    if isinstance(entry, dict) and live_cmdline(entry.get("pid")) == entry.get("argv"):
        return "running"
    return "not running"


def status_row(namespace: str, name: str, address: str, process: str) -> dict[str, Any]:
    ready, reason = probe_ready(address)
    row: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "address": address,
        "process": process,
        "ready": ready,
        "certificate": "",
        "expires": "",
        "reason": reason,
    }
    try:
        dump = fetch_config_dump(address, DEFAULT_ADMIN_PORT, timeout=PROBE_TIMEOUT)
        leaves = [r for r in certificate_rows(dump) if r["type"] == "Leaf"]
    except ZtunnelConfigError as exc:
        row["reason"] = row["reason"] or str(exc)
        return row
    if leaves:
        row["certificate"] = f"{leaves[0]['certificate_name']} {leaves[0]['status']}".strip()
        row["expires"] = leaves[0].get("not_after", "")
    else:
        row["certificate"] = "none"
    return row


def waypoint_status(
    state_dir: Path, namespace: str | None, name: str | None, address: str | None
) -> list[dict[str, Any]]:
    if address is not None:
        if name is None:
            raise WaypointUsageError("--address needs the waypoint's NAME")
        return [status_row(namespace or DEFAULT_NAMESPACE, name, address, "unknown")]
    try:
        mesh = load_mesh_state(state_dir)
    except ZtunnelConfigError as exc:
        raise WaypointCommandError(str(exc)) from None
    running = mesh.get("waypoints") or {}
    if not isinstance(running, dict):
        raise WaypointCommandError(f"{state_dir / 'mesh.json'}: 'waypoints' is not an object")
    selected = {
        key: str(ip)
        for key, ip in running.items()
        if (namespace is None or key.split("/", 1)[0] == namespace)
        and (name is None or key.split("/", 1)[-1] == name)
    }
    if not selected:
        wanted = f"{namespace or '*'}/{name or '*'}"
        known = ", ".join(sorted(running)) or "none"
        raise WaypointCommandError(f"the running mesh has no waypoint {wanted} (it has: {known})")
    rows = []
    for key, ip in sorted(selected.items()):
        ns, _, gw = key.partition("/")
        rows.append(status_row(ns, gw, ip, process_state(state_dir, ns, gw)))
    return rows


# ---------------------------------------------------------------------------------------------
# Command line


def waypoint_name(args: argparse.Namespace, default: str | None) -> str | None:
    """NAME or --name (they must agree when both are given), else ``default``."""
    if args.name is not None and args.name_flag is not None and args.name != args.name_flag:
        raise WaypointUsageError(
            f"two names given: {args.name!r} and --name {args.name_flag!r}; give one"
        )
    return args.name or args.name_flag or default


def run_waypoint_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the parsed ``ambientctl waypoint`` action; raises WaypointCommandError (exit 1)."""
    action = args.waypoint_command
    namespace = args.namespace or DEFAULT_NAMESPACE
    if action == "generate":
        name = waypoint_name(args, DEFAULT_WAYPOINT_NAME)
        assert name is not None
        out.write(render_manifest(gateway_manifest(name, namespace, args.waypoint_for,
                                                   args.address)))  # fmt: skip
        return 0
    if action == "apply":
        name = waypoint_name(args, DEFAULT_WAYPOINT_NAME)
        assert name is not None
        applied = apply_waypoint(
            args.config_dir,
            name,
            namespace,
            waypoint_for=args.waypoint_for,
            address=args.address,
            enroll=args.enroll_namespace,
        )
        out.write(f"waypoint {namespace}/{name} applied at {applied.address} ({applied.path})\n")
        if applied.enrolled is not None:
            out.write(
                f'namespace {namespace} labeled with "{USE_WAYPOINT_LABEL}: {name}" '
                f"({applied.enrolled})\n"
            )
        return 0
    if action == "list":
        selected = None if args.all_namespaces else namespace
        rows = waypoint_rows(read_config_dir(args.config_dir), selected, args.config_dir)
        if not rows and args.output == "table":
            where = "any namespace" if selected is None else f"namespace {selected}"
            out.write(f"No waypoints found in {where}.\n")
            return 0
        out.write(
            render(rows, ("namespace", "name", "for", "address", "used_by"), args.output,
                   wide_columns=("file",))
        )  # fmt: skip
        return 0
    if action == "status":
        name = waypoint_name(args, None)
        selected = None if args.all_namespaces else namespace
        rows = waypoint_status(args.state_dir, selected, name, args.address)
        out.write(
            render(rows, ("namespace", "name", "address", "process", "ready", "certificate",
                          "expires"), args.output, wide_columns=("reason",))
        )  # fmt: skip
        return 0 if all(r["ready"] for r in rows) else 1
    if action == "delete":
        for name, path, users in delete_waypoints(args.config_dir, args.names, namespace):
            out.write(f"waypoint {namespace}/{name} deleted ({path})\n")
            if users:
                out.write(f"note: still labelled {USE_WAYPOINT_LABEL}={name}: {', '.join(users)}\n")
        return 0
    raise WaypointCommandError(f"unknown waypoint action {action!r}")
