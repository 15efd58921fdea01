"""The embedded mesh: istiod_lite, one ztunnel per node and the sample apps as child processes.

``ambientctl up`` and the demo run a whole mesh on one machine without Kubernetes: the config
directory holds the Kubernetes objects (Nodes give each ztunnel its loopback address, Pods their
IPs and ports, waypoint Gateways their ``spec.addresses``), istiod_lite serves them, and this
module starts and watches the processes: istiod, a ztunnel per Node, a waypoint per waypoint
Gateway (followed live: ``ambientctl waypoint apply``/``delete`` while ``up`` runs starts or
stops it within a second) and the sample apps.

Process rules: every child runs in its own process group (a Ctrl-C in the terminal reaches only
the supervisor, which then drains the children in order instead of having them all die at
once); a child that dies on its own is logged loudly with the tail of its log; shutdown sends
SIGTERM to every child, waits up to a drain timeout, then SIGKILLs what is left. The pids are
recorded in ``children.json`` so that a supervisor killed with SIGKILL leaves nothing behind
after the next ``ambientctl up`` on the same state directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import trio
import yaml

from ambient_common.files import write_atomically
from ambientctl.apps import http_get
from istiod_lite.auth import service_account_principal
from istiod_lite.labels import SERVICE_ACCOUNT_ANNOTATION

log = structlog.get_logger()

ISTIOD_LISTEN_HOST = "127.0.9.1"
ISTIOD_LISTEN_PORT = 15012
READINESS_PORT = 15021
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
WAYPOINT_POLL_INTERVAL = 1.0
WAYPOINT_CLASS = "istio-waypoint"
FAIL_EVERY_ANNOTATION = "ambient-lite.io/fail-every"
LOG_TAIL_LINES = 20


class EmbeddedError(Exception):
    """The embedded mesh could not start or is not healthy; the message says what to fix."""


class EmbeddedConfigError(EmbeddedError):
    """The config directory does not describe a mesh we can run."""


# ---------------------------------------------------------------------------------------------
# What to run, read from the config directory (sans-IO apart from reading the files)


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
    spec = gateway.get("spec") or {}
    if not isinstance(spec, Mapping) or spec.get("gatewayClassName") != WAYPOINT_CLASS:
        return None
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
        documents = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise EmbeddedConfigError(f"{path}: {exc}") from None
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


# ---------------------------------------------------------------------------------------------
# State directory and command lines


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def istiod_dir(self) -> Path:
        return self.root / "istiod"

    @property
    def root_cert(self) -> Path:
        return self.istiod_dir / "root-cert.pem"

    @property
    def bootstrap_tokens(self) -> Path:
        return self.root / "bootstrap-tokens.yaml"

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def mesh_file(self) -> Path:
        return self.root / "mesh.json"

    @property
    def children_file(self) -> Path:
        return self.root / "children.json"

    def token_file(self, principal: str) -> Path:
        """A node's token file, or a ``serviceaccount:<ns>/<sa>``'s as
        ``serviceaccount:<ns>:<sa>`` (no Kubernetes name holds a ``:``, so no clash)."""
        return self.tokens_dir / principal.replace("/", ":")

    def create(self) -> None:
        try:
            for directory in (self.root, self.istiod_dir, self.tokens_dir, self.logs_dir):
                directory.mkdir(parents=True, exist_ok=True)
            self.tokens_dir.chmod(0o700)
        except OSError as exc:
            raise EmbeddedError(
                f"cannot create the state directory {self.root}: {exc.strerror or exc}"
            ) from None


def istiod_argv(config_dir: Path, paths: StatePaths, listen: str) -> list[str]:
    return [
        sys.executable, "-m", "istiod_lite",
        "--config-dir", str(config_dir),
        "--state-dir", str(paths.istiod_dir),
        "--bootstrap-tokens", str(paths.bootstrap_tokens),
        "--listen", listen,
        "--log-format", "json",
    ]  # fmt: skip


def ztunnel_argv(node: NodeSpec, paths: StatePaths, xds_address: str) -> list[str]:
    """The ztunnel command line, in one place so a change of its flags is one edit."""
    return [
        sys.executable, "-m", "ztunnel",
        "--node", node.name,
        "--node-address", node.address,
        "--xds-address", xds_address,
        "--root-cert", str(paths.root_cert),
        "--token-file", str(paths.token_file(node.name)),
        "--log-format", "json",
    ]  # fmt: skip


def waypoint_argv(waypoint: WaypointSpec, paths: StatePaths, xds_address: str) -> list[str]:
    """The waypoint command line, in one place so a change of its flags is one edit."""
    return [
        sys.executable, "-m", "waypoint",
        "--name", waypoint.name,
        "--namespace", waypoint.namespace,
        "--service-account", waypoint.service_account,
        "--address", waypoint.address,
        "--xds-address", xds_address,
        "--root-cert", str(paths.root_cert),
        "--token-file", str(paths.token_file(waypoint.principal)),
        "--log-format", "json",
    ]  # fmt: skip


def app_argv(app: AppSpec) -> list[str]:
    argv = [
        sys.executable, "-m", "ambientctl.apps", app.kind,
        "--address", app.address,
        "--port", str(app.port),
        "--name", app.pod,
        "--log-format", "json",
    ]  # fmt: skip
    if app.kind == "http" and app.fail_every:
        argv += ["--fail-every", str(app.fail_every)]
    return argv


def write_bootstrap_tokens(
    paths: StatePaths, nodes: Sequence[NodeSpec], waypoints: Sequence[WaypointSpec] = ()
) -> dict[str, str]:
    """Fresh tokens per node and per waypoint service account (``serviceaccount:<ns>/<sa>``):
    istiod reads the map, each process only its own file."""
    principals = [node.name for node in nodes] + [w.principal for w in waypoints]
    tokens = {principal: secrets.token_urlsafe(32) for principal in principals}
    _write_tokens(paths, tokens)
    return tokens


def add_bootstrap_tokens(paths: StatePaths, principals: Iterable[str]) -> list[str]:
    """Give the ``principals`` that have none a fresh token, keeping everyone else's (a
    waypoint applied while the mesh runs). Returns the principals added."""
    try:
        tokens = yaml.safe_load(paths.bootstrap_tokens.read_text()) or {}
    except FileNotFoundError:
        tokens = {}
    if not isinstance(tokens, dict):
        raise EmbeddedError(f"{paths.bootstrap_tokens} is not a mapping of name to token")
    added = [p for p in dict.fromkeys(principals) if p not in tokens]
    if added:
        tokens.update({principal: secrets.token_urlsafe(32) for principal in added})
        _write_tokens(paths, tokens)
    return added


def _write_tokens(paths: StatePaths, tokens: Mapping[str, str]) -> None:
    for principal, token in tokens.items():
        write_atomically(paths.token_file(principal), token)
    # The map last: istiod never knows a token whose holder cannot read it yet.
    write_atomically(paths.bootstrap_tokens, yaml.safe_dump(dict(tokens), sort_keys=True))


# ---------------------------------------------------------------------------------------------
# Process supervision


@dataclass(frozen=True)
class ChildExit:
    name: str
    returncode: int
    expected: bool


@dataclass
class _Child:
    name: str
    argv: list[str]
    log_path: Path
    process: trio.Process | None = None
    stopping: bool = False
    exited: trio.Event = field(default_factory=trio.Event)


class Supervisor:
    """Starts named child processes in a nursery and stops them without leaving orphans.

    Use through ``open_supervisor``; children outlive nothing: leaving the context (normally,
    by cancellation or by an error) stops every child.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        logs_dir: Path,
        *,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        pid_file: Path | None = None,
    ) -> None:
        self._nursery = nursery
        self._logs_dir = logs_dir
        self._drain_timeout = drain_timeout
        self._pid_file = pid_file
        self._children: dict[str, _Child] = {}
        self.exits: list[ChildExit] = []

    @property
    def unexpected_exits(self) -> list[ChildExit]:
        return [e for e in self.exits if not e.expected]

    def log_path(self, name: str) -> Path:
        return self._logs_dir / f"{name}.log"

    def process(self, name: str) -> trio.Process:
        child = self._children.get(name)
        if child is None or child.process is None:
            raise KeyError(f"no process named {name!r}")
        return child.process

    def is_running(self, name: str) -> bool:
        child = self._children.get(name)
        return bool(child and child.process and child.process.returncode is None)

    def names(self) -> list[str]:
        return list(self._children)

    async def start(self, name: str, argv: Sequence[str]) -> trio.Process:
        """Start ``argv`` as ``name``; its output goes to ``<logs>/<name>.log``."""
        if self.is_running(name):
            raise EmbeddedError(f"process {name!r} is already running")
        child = _Child(name, list(argv), self.log_path(name))
        self._children[name] = child
        process: trio.Process = await self._nursery.start(self._run_child, child)
        self._record_pids()
        return process

    async def restart(self, name: str) -> trio.Process:
        child = self._children.get(name)
        if child is None:
            raise KeyError(f"no process named {name!r}")
        await self.stop(name)
        return await self.start(name, child.argv)

    async def stop(self, name: str) -> int:
        """SIGTERM, wait up to the drain timeout, SIGKILL; returns the exit code."""
        child = self._children.get(name)
        if child is None or child.process is None:
            raise KeyError(f"no process named {name!r}")
        child.stopping = True
        await self._terminate(child.process, name)
        await child.exited.wait()
        returncode = child.process.returncode
        assert returncode is not None
        return returncode

    async def wait_exit(self, name: str) -> int:
        child = self._children[name]
        await child.exited.wait()
        assert child.process is not None and child.process.returncode is not None
        return child.process.returncode

    async def shutdown(self) -> None:
        """Stop every child at once, so the whole mesh drains within one drain timeout."""
        async with trio.open_nursery() as nursery:
            for name, child in list(self._children.items()):
                if child.process is not None and child.process.returncode is None:
                    nursery.start_soon(self.stop, name)
        self._record_pids()

    async def _run_child(
        self, child: _Child, *, task_status: trio.TaskStatus[trio.Process]
    ) -> None:
        with child.log_path.open("ab") as log_file:
            process = await trio.lowlevel.open_process(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        child.process = process
        log.info("started", process=child.name, pid=process.pid, log=str(child.log_path))
        task_status.started(process)
        try:
            await process.wait()
        except trio.Cancelled:
            child.stopping = True
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._terminate(process, child.name)
                returncode = process.returncode
                assert returncode is not None
                self.exits.append(ChildExit(child.name, returncode, child.stopping))
                if child.stopping:
                    log.info("stopped", process=child.name, returncode=returncode)
                else:
                    log.error(
                        "PROCESS EXITED UNEXPECTEDLY",
                        process=child.name,
                        returncode=returncode,
                        log=str(child.log_path),
                        log_tail=tail(child.log_path, LOG_TAIL_LINES),
                    )
                self._record_pids()
                child.exited.set()

    async def _terminate(self, process: trio.Process, name: str) -> None:
        if process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(self._drain_timeout):
            await process.wait()
            return
        log.warning(
            "did not stop within the drain timeout; killing",
            process=name,
            drain_timeout=self._drain_timeout,
        )
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()

    def _record_pids(self) -> None:
        if self._pid_file is None:
            return
        running = {
            name: {"pid": child.process.pid, "argv": child.argv}
            for name, child in self._children.items()
            if child.process is not None and child.process.returncode is None
        }
        self._pid_file.write_text(json.dumps(running, indent=2) + "\n")


def _signal_group(pid: int, signum: signal.Signals) -> None:
    """Signal the child's process group (its pgid is its pid), reaching its own children too."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signum)


@asynccontextmanager
async def open_supervisor(
    logs_dir: Path,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    pid_file: Path | None = None,
) -> AsyncIterator[Supervisor]:
    logs_dir.mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, logs_dir, drain_timeout=drain_timeout, pid_file=pid_file)
        try:
            yield supervisor
        finally:
            with trio.CancelScope(shield=True):
                await supervisor.shutdown()


async def reap_stale_children(pid_file: Path, timeout: float = 5.0) -> list[int]:
    """Stop children a killed supervisor left behind; only pids whose command line still
    matches what was recorded, so a reused pid is never touched. Returns the pids stopped."""
    try:
        recorded = json.loads(pid_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    stale = [
        entry["pid"]
        for entry in recorded.values()
        if isinstance(entry, dict) and live_cmdline(entry.get("pid")) == entry.get("argv")
    ]
    for pid in stale:
        log.warning("stopping a child left by an earlier supervisor", pid=pid)
        _signal_group(pid, signal.SIGTERM)
    with trio.move_on_after(timeout):
        while any(live_cmdline(pid) is not None for pid in stale):
            await trio.sleep(POLL_INTERVAL)
    for pid in stale:
        if live_cmdline(pid) is not None:
            _signal_group(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return stale


def live_cmdline(pid: Any) -> list[str] | None:
    """The live process's argv, or None when it is gone (or a zombie)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Readiness probes


async def wait_for_port(
    host: str, port: int, timeout: float, *, process: trio.Process | None = None, what: str
) -> None:
    """Poll until ``host:port`` accepts a connection; fail fast if ``process`` exits."""
    last_error = "no attempt"
    with trio.move_on_after(timeout):
        while True:
            if process is not None and process.returncode is not None:
                raise EmbeddedError(
                    f"{what} exited with code {process.returncode} before listening"
                )
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                last_error = str(exc)
            else:
                await stream.aclose()
                return
            await trio.sleep(POLL_INTERVAL)
    raise EmbeddedError(f"{what} is not listening on {host}:{port} after {timeout}s: {last_error}")


async def probe_ready(address: str, port: int = READINESS_PORT) -> tuple[bool, str]:
    """One readiness probe: (ready?, why not)."""
    try:
        stream = await trio.open_tcp_stream(address, port)
    except OSError as exc:
        return False, str(exc)
    try:
        async with stream:
            status, _headers, body = await http_get(stream, address, "/healthz/ready")
    except (OSError, trio.BrokenResourceError) as exc:
        return False, str(exc)
    if status == 200:
        return True, ""
    return False, f"answered {status}: {body[:200].decode(errors='replace').strip()}"


# ---------------------------------------------------------------------------------------------
# The mesh


@dataclass
class EmbeddedMesh:
    """Handle to a running embedded mesh, for ``ambientctl up``, the demo and tests."""

    config_dir: Path
    paths: StatePaths
    layout: MeshLayout
    supervisor: Supervisor
    istiod_host: str = ISTIOD_LISTEN_HOST
    istiod_port: int = ISTIOD_LISTEN_PORT
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    # The waypoint command line; tests of the process lifecycle may substitute one.
    waypoint_command: Callable[[WaypointSpec, StatePaths, str], list[str]] = waypoint_argv

    @property
    def istiod_address(self) -> str:
        return f"{self.istiod_host}:{self.istiod_port}"

    @property
    def nodes(self) -> dict[str, str]:
        return {node.name: node.address for node in self.layout.nodes}

    @property
    def pods(self) -> dict[str, str]:
        return dict(self.layout.pods)

    @property
    def waypoints(self) -> dict[str, str]:
        """``namespace/name`` -> address of each waypoint the mesh runs."""
        return {w.key: w.address for w in self.layout.waypoints}

    async def start_istiod(self) -> None:
        """Start istiod and wait for its root certificate and its port."""
        process = await self.supervisor.start(
            "istiod", istiod_argv(self.config_dir, self.paths, self.istiod_address)
        )
        with trio.move_on_after(self.ready_timeout):
            while not self.paths.root_cert.exists():
                if process.returncode is not None:
                    raise EmbeddedError(
                        f"istiod exited with code {process.returncode} during startup; "
                        f"see {self.supervisor.log_path('istiod')}:\n"
                        + tail(self.supervisor.log_path("istiod"), LOG_TAIL_LINES)
                    )
                await trio.sleep(POLL_INTERVAL)
        if not self.paths.root_cert.exists():
            raise EmbeddedError(
                f"istiod wrote no {self.paths.root_cert} within {self.ready_timeout}s"
            )
        await wait_for_port(
            self.istiod_host, self.istiod_port, self.ready_timeout, process=process, what="istiod"
        )

    async def start_ztunnels(self) -> None:
        for node in self.layout.nodes:
            await self.supervisor.start(
                ztunnel_process_name(node.name),
                ztunnel_argv(node, self.paths, self.istiod_address),
            )

    async def start_waypoints(self) -> None:
        for waypoint in self.layout.waypoints:
            await self._start_waypoint(waypoint)

    async def _start_waypoint(self, waypoint: WaypointSpec) -> None:
        await self.supervisor.start(
            waypoint.process_name, self.waypoint_command(waypoint, self.paths, self.istiod_address)
        )

    async def sync_waypoints(self, wanted: Sequence[WaypointSpec]) -> tuple[list[str], list[str]]:
        """Make the running waypoints those of ``wanted``: start the new ones, stop the ones
        gone, restart the changed ones (address, account). A new service account gets a
        bootstrap token, and istiod, which reads the token file at start, is restarted
        first so that it knows the token. Returns (started, stopped) process names."""
        current = {w.key: w for w in self.layout.waypoints}
        target = {w.key: w for w in wanted}
        gone = [w for key, w in current.items() if target.get(key) != w]
        new = [w for key, w in target.items() if current.get(key) != w]
        if not gone and not new:
            return [], []
        for waypoint in gone:
            if self.supervisor.is_running(waypoint.process_name):
                await self.supervisor.stop(waypoint.process_name)
            log.info("waypoint stopped", waypoint=waypoint.key)
        added = add_bootstrap_tokens(self.paths, [w.principal for w in new])
        if added and self.supervisor.is_running("istiod"):
            log.info("restarting istiod to load new waypoint tokens", principals=added)
            await self.restart_istiod()
        for waypoint in new:
            await self._start_waypoint(waypoint)
            log.info("waypoint started", waypoint=waypoint.key, address=waypoint.address)
        self.layout = replace(self.layout, waypoints=tuple(target.values()))
        self.write_mesh_state()
        return [w.process_name for w in new], [w.process_name for w in gone]

    async def watch_waypoints(self, interval: float = WAYPOINT_POLL_INTERVAL) -> None:
        """Every ``interval``, re-read the config directory's waypoints and follow them; a
        directory that does not parse right now is logged and retried, nothing stopped. Each
        problem is logged once, when it appears."""
        said: set[str] = set(self.layout.warnings)
        while True:
            await trio.sleep(interval)
            layout: MeshLayout | None
            try:
                layout = layout_from_objects(read_objects(self.config_dir))
            except EmbeddedError as exc:
                problems = {f"cannot read waypoints; keeping the running ones: {exc}"}
                layout = None
            else:
                problems = set(layout.warnings)
            for problem in sorted(problems - said):
                log.warning(problem)
            said = problems
            if layout is not None:
                await self.sync_waypoints(layout.waypoints)

    async def start_apps(self) -> None:
        for app in self.layout.apps:
            await self.supervisor.start(app.process_name, app_argv(app))
        for app in self.layout.apps:
            await wait_for_port(
                app.address,
                app.port,
                self.ready_timeout,
                process=self.supervisor.process(app.process_name),
                what=app.process_name,
            )

    def readiness_targets(self) -> dict[str, tuple[str, str]]:
        """What ``wait_ready`` probes: description -> (process name, address)."""
        targets = {
            f"ztunnel of node {node.name}": (ztunnel_process_name(node.name), node.address)
            for node in self.layout.nodes
        }
        targets.update(
            {f"waypoint {w.key}": (w.process_name, w.address) for w in self.layout.waypoints}
        )
        return targets

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Poll every ztunnel's and waypoint's ``/healthz/ready`` until all answer 200."""
        timeout = self.ready_timeout if timeout is None else timeout
        pending = self.readiness_targets()
        reasons: dict[str, str] = {}
        with trio.move_on_after(timeout):
            while pending:
                for what, (process_name, address) in list(pending.items()):
                    if not self.supervisor.is_running(process_name):
                        raise EmbeddedError(
                            f"{what} is not running; see {self.supervisor.log_path(process_name)}"
                        )
                    ready, reasons[what] = await probe_ready(address)
                    if ready:
                        del pending[what]
                if pending:
                    await trio.sleep(POLL_INTERVAL)
            return
        details = "; ".join(f"{w} ({a}): {reasons.get(w, '')}" for w, (_, a) in pending.items())
        raise EmbeddedError(f"not ready after {timeout}s: {details}")

    async def restart_istiod(self) -> None:
        await self.supervisor.stop("istiod")
        await self.start_istiod()

    async def stop_process(self, name: str) -> int:
        return await self.supervisor.stop(name)

    async def restart_process(self, name: str) -> None:
        await self.supervisor.restart(name)

    def mesh_state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "istiod": self.istiod_address,
            "nodes": self.nodes,
            "pods": self.pods,
            "waypoints": self.waypoints,
            "logs": str(self.paths.logs_dir),
        }

    def write_mesh_state(self) -> None:
        write_atomically(
            self.paths.mesh_file, json.dumps(self.mesh_state(), indent=2) + "\n", mode=0o644
        )


async def run_embedded(
    config_dir: Path,
    state_dir: Path,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    istiod_host: str = ISTIOD_LISTEN_HOST,
    task_status: trio.TaskStatus[EmbeddedMesh] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the mesh until cancelled; ``task_status.started(mesh)`` once every ztunnel is ready.

    On cancellation every child is drained (SIGTERM, then SIGKILL after ``drain_timeout``)
    and ``mesh.json`` is removed, so tools stop pointing at a mesh that is gone.
    """
    layout = load_layout(config_dir)
    paths = StatePaths(state_dir)
    paths.create()
    await reap_stale_children(paths.children_file)
    paths.mesh_file.unlink(missing_ok=True)
    write_bootstrap_tokens(paths, layout.nodes, layout.waypoints)
    async with open_supervisor(
        paths.logs_dir, drain_timeout=drain_timeout, pid_file=paths.children_file
    ) as supervisor:
        mesh = EmbeddedMesh(
            config_dir.resolve(),
            paths,
            layout,
            supervisor,
            istiod_host=istiod_host,
            ready_timeout=ready_timeout,
        )
        try:
            await mesh.start_apps()
            await mesh.start_istiod()
            await mesh.start_ztunnels()
            await mesh.start_waypoints()
            await mesh.wait_ready()
            mesh.write_mesh_state()
            log.info(
                "embedded mesh ready",
                istiod=mesh.istiod_address,
                nodes=mesh.nodes,
                waypoints=mesh.waypoints,
            )
            task_status.started(mesh)
            await mesh.watch_waypoints()
        finally:
            paths.mesh_file.unlink(missing_ok=True)
