"""``ambientctl lab up|down|status|exec``: the mesh in a cluster of network namespaces (root).

The plan (which namespaces, links, addresses, routes) is decided by ``ambientctl.lab_plan``;
this module runs it and the mesh's processes:

- ``up`` records the whole plan in ``<state-dir>/lab.json`` and, BEFORE each step, how many
  steps it has begun, so a crash at any point leaves a record of what may exist. It writes a
  copy of the YAML with lab addresses (``<state-dir>/config``) for istiod_lite and each node's
  netns map (``<state-dir>/netns/<node>.json``: pod uid -> netns path, what a CNI plugin tells
  ztunnel), then starts with ``ip netns exec`` the sample apps in their pods' namespaces,
  istiod_lite in the control namespace and one ztunnel per node (``--capture inpod``) in its
  node's namespace, under the embedded mode's ``Supervisor``. Readiness is probed from inside
  the control namespace (``ambientctl.lab_probe``): the host cannot reach lab addresses.
  With ``--no-mesh`` only the network is built and ``up`` returns.
- ``down`` asks a running ``up`` to stop (SIGTERM), stops every process still inside the lab's
  namespaces (they are ours by construction), then runs the recorded steps' inverses in
  reverse, tolerating what is already gone. The record is removed only once no lab namespace
  is left, so a second ``down`` finishes what a first could not.

Nothing here changes the host's namespace: every command names a lab namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import structlog
import trio
import yaml

from ambient_common.files import write_atomically
from ambient_common.flags import duration_seconds
from ambient_common.logging import LOG_FORMATS
from ambient_common.process import cancel_on_signal
from ambientctl.embedded.commands import app_argv, istiod_argv, ztunnel_argv
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.layout import (
    NodeSpec,
    layout_from_objects,
    read_objects,
    ztunnel_process_name,
)
from ambientctl.embedded.mesh import DEFAULT_READY_TIMEOUT, ISTIOD_LISTEN_PORT, READINESS_PORT
from ambientctl.embedded.state_dir import StatePaths, write_bootstrap_tokens
from ambientctl.embedded.supervisor import (
    DEFAULT_DRAIN_TIMEOUT,
    LOG_TAIL_LINES,
    POLL_INTERVAL,
    Supervisor,
    live_cmdline,
    open_supervisor,
    tail,
)
from ambientctl.lab_plan import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_LAB_NAME,
    DEFAULT_SUBNET,
    LabNode,
    LabPlan,
    LabPlanError,
    LabPod,
    is_already_gone,
    netns_path,
    plan_lab,
    rewrite_objects,
    undo_commands,
)
from ambientctl.output import render

log = structlog.get_logger()

DEFAULT_LAB_STATE_DIR = Path("run/lab")
COMMAND_TIMEOUT = 30.0
RECORD_VERSION = 1


class LabError(Exception):
    """The lab could not be built, run or removed; the message says what and what to do."""


# ---------------------------------------------------------------------------------------------
# State directory and record


@dataclass(frozen=True)
class LabPaths:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def config_dir(self) -> Path:
        """The YAML with lab addresses, as istiod_lite reads it."""
        return self.root / "config"

    @property
    def netns_map_dir(self) -> Path:
        return self.root / "netns"

    def netns_map(self, node: str) -> Path:
        return self.netns_map_dir / f"{node}.json"

    @property
    def mesh(self) -> StatePaths:
        """Certificates, tokens, logs and children.json, laid out as the embedded mode's."""
        return StatePaths(self.root / "mesh")


@dataclass
class LabRecord:
    """What ``lab.json`` holds: the plan, how many steps were begun, who runs the lab."""

    plan: LabPlan
    begun: int = 0
    complete: bool = False
    mesh: bool = True
    owner_pid: int | None = None
    owner_cmdline: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "plan": self.plan.to_json(),
            "begun": self.begun,
            "complete": self.complete,
            "mesh": self.mesh,
            "owner_pid": self.owner_pid,
            "owner_cmdline": self.owner_cmdline,
        }

    @classmethod
    def from_json(cls, data: Any, source: Path) -> LabRecord:
        if not isinstance(data, Mapping) or data.get("version") != RECORD_VERSION:
            raise LabError(f"{source} is not a lab record this ambientctl wrote")
        try:
            plan = LabPlan.from_json(data.get("plan"))
        except LabPlanError as exc:
            raise LabError(f"{source}: {exc}") from None
        begun = data.get("begun")
        if not isinstance(begun, int) or not 0 <= begun <= len(plan.steps):
            raise LabError(f"{source}: invalid step count {begun!r}")
        owner = data.get("owner_pid")
        cmdline = data.get("owner_cmdline")
        return cls(
            plan=plan,
            begun=begun,
            complete=bool(data.get("complete")),
            mesh=bool(data.get("mesh", True)),
            owner_pid=owner if isinstance(owner, int) else None,
            owner_cmdline=[str(a) for a in cmdline] if isinstance(cmdline, list) else None,
        )


def write_record(paths: LabPaths, record: LabRecord) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    write_atomically(paths.state_file, json.dumps(record.to_json(), indent=1) + "\n", 0o644)


def read_record(paths: LabPaths) -> LabRecord | None:
    """The recorded lab, None when there is none."""
    try:
        text = paths.state_file.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabError(f"{paths.state_file} is damaged ({exc}); remove the lab's namespaces "
                       "by hand (`ip netns list`) and then the file") from None  # fmt: skip
    return LabRecord.from_json(data, paths.state_file)


def require_record(paths: LabPaths) -> LabRecord:
    record = read_record(paths)
    if record is None:
        raise LabError(f"no lab is recorded in {paths.root} (`ambientctl lab up` first)")
    return record


# ---------------------------------------------------------------------------------------------
# Running commands


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


CommandRunner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run one ``ip``/``sysctl`` command, capturing its output."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found (install iproute2)")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"timed out after {COMMAND_TIMEOUT}s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


def existing_netns(run: CommandRunner = run_command) -> set[str]:
    """Names from ``ip netns list`` (lines are ``name`` or ``name (id: N)``)."""
    result = run(["ip", "netns", "list"])
    if result.returncode != 0:
        raise LabError(f"ip netns list failed: {result.stderr.strip()}")
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def netns_pids(netns: str, run: CommandRunner = run_command) -> list[int]:
    result = run(["ip", "netns", "pids", netns])
    if result.returncode != 0:
        return []
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def netns_links(netns: str, run: CommandRunner = run_command) -> list[str]:
    """``name:STATE`` of each interface in the namespace (``ip -br link``)."""
    result = run(["ip", "-n", netns, "-br", "link"])
    if result.returncode != 0:
        return []
    links = []
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) >= 2:
            links.append(f"{words[0].split('@')[0]}:{words[1]}")
    return links


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside a lab namespace; ``ip netns exec`` execs it, so the pid stays."""
    return ["ip", "netns", "exec", netns, *argv]


# ---------------------------------------------------------------------------------------------
# up: the network


def apply_plan(record: LabRecord, paths: LabPaths, *, run: CommandRunner = run_command) -> None:
    """Run the plan's steps from ``record.begun`` on, recording each BEFORE it runs."""
    steps = record.plan.steps
    for index in range(record.begun, len(steps)):
        record.begun = index + 1
        write_record(paths, record)
        step = steps[index]
        result = run(step.command())
        if result.returncode != 0:
            raise LabError(
                f"step {index + 1}/{len(steps)} `{step.describe()}` failed: "
                f"{result.stderr.strip() or f'exit code {result.returncode}'}"
            )
    record.complete = True
    write_record(paths, record)


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


def build_network(
    config_dir: Path,
    paths: LabPaths,
    *,
    name: str = DEFAULT_LAB_NAME,
    subnet: str = DEFAULT_SUBNET,
    mesh: bool = True,
    record_owner: bool = False,
    cluster_id: str = DEFAULT_CLUSTER_ID,
    run: CommandRunner = run_command,
) -> LabRecord:
    """Plan and build the lab's network; on failure undo what was done and re-raise.

    ``record_owner``: this process keeps running the lab (``lab up`` with the mesh), so a
    ``lab down`` elsewhere should ask it to stop rather than pull the lab from under it."""
    existing = read_record(paths)
    if existing is not None:
        raise LabError(
            f"lab {existing.plan.name!r} is already recorded in {paths.root}; "
            f"run `ambientctl lab down --state-dir {paths.root}` first"
        )
    try:
        objects = read_objects(config_dir)
        plan = plan_lab(objects, name=name, subnet=subnet)
    except (EmbeddedError, LabPlanError) as exc:
        raise LabError(str(exc)) from None
    taken = sorted(set(plan.netns_names()) & existing_netns(run))
    if taken:
        raise LabError(
            f"network namespace(s) {', '.join(taken)} already exist: another lab named "
            f"{name!r}? Choose another --name, or run `ambientctl lab down` on its state dir"
        )
    for warning in plan.warnings:
        log.warning(warning)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_lab_config(paths, config_dir, rewrite_objects(objects, plan))
    write_netns_maps(paths, plan, cluster_id)
    owner = os.getpid() if record_owner else None
    record = LabRecord(
        plan, mesh=mesh, owner_pid=owner, owner_cmdline=live_cmdline(owner) if owner else None
    )
    try:
        apply_plan(record, paths, run=run)
    except BaseException:
        try:
            take_down(paths, kill_owner=False, run=run)
        except Exception as cleanup_error:  # the original error matters more
            log.error("cleanup after a failed lab up did not finish; run `ambientctl lab down`",
                      error=str(cleanup_error))  # fmt: skip
        raise
    return record


# ---------------------------------------------------------------------------------------------
# down


@dataclass
class DownReport:
    name: str | None = None
    stopped_pids: list[int] = field(default_factory=list)
    undone: int = 0
    problems: list[str] = field(default_factory=list)
    by_owner: bool = False


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the processes are gone (zombies count as gone); returns the survivors."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if live_cmdline(pid) is not None]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        alive = [pid for pid in alive if live_cmdline(pid) is not None]
    return alive


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def stop_owner(record: LabRecord, timeout: float) -> bool:
    """Ask a running ``lab up`` to stop its processes and remove its lab; True if it was
    running. Only a pid whose command line still matches the record is signalled."""
    pid = record.owner_pid
    if pid is None or pid == os.getpid() or record.owner_cmdline is None:
        return False
    if live_cmdline(pid) != record.owner_cmdline:
        return False
    log.info("asking the running `lab up` to stop", pid=pid)
    _signal(pid, signal.SIGTERM)
    if _wait_gone([pid], timeout):
        log.warning("`lab up` did not stop in time; killing it", pid=pid)
        _signal(pid, signal.SIGKILL)
        _wait_gone([pid], 2.0)
    return True


def stop_netns_processes(
    netns_names: Iterable[str], timeout: float, run: CommandRunner = run_command
) -> list[int]:
    """SIGTERM every process inside the lab's namespaces, SIGKILL what is left after
    ``timeout``. Anything in a namespace the lab made is the lab's (apps, ztunnels, istiod,
    whatever `lab exec` started); a process left in one would keep it alive."""
    present = existing_netns(run)
    pids = sorted(
        {pid for ns in netns_names if ns in present for pid in netns_pids(ns, run)} - {os.getpid()}
    )
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    for pid in _wait_gone(pids, timeout):
        log.warning("process in a lab namespace ignored SIGTERM; killing it", pid=pid)
        _signal(pid, signal.SIGKILL)
    _wait_gone(pids, 2.0)
    return pids


def take_down(
    paths: LabPaths,
    *,
    timeout: float = DEFAULT_DRAIN_TIMEOUT,
    kill_owner: bool = True,
    run: CommandRunner = run_command,
) -> DownReport:
    """Remove the recorded lab; idempotent. Raises ``LabError`` naming what is left."""
    record = read_record(paths)
    if record is None:
        return DownReport()
    report = DownReport(name=record.plan.name)
    if kill_owner and stop_owner(record, timeout + 5.0):
        record = read_record(paths)
        if record is None:
            report.by_owner = True
            return report
    plan = record.plan
    report.stopped_pids = stop_netns_processes(plan.netns_names(), timeout, run)
    for command in undo_commands(plan.steps[: record.begun]):
        result = run(command)
        if result.returncode == 0:
            report.undone += 1
        elif not is_already_gone(result.stderr):
            report.problems.append(f"`{' '.join(command)}`: {result.stderr.strip()}")
    left = sorted(set(plan.netns_names()) & existing_netns(run))
    if left:
        raise LabError(
            f"lab {plan.name}: namespace(s) {', '.join(left)} could not be removed ("
            + ("; ".join(report.problems) or "still in use")
            + f"); the record in {paths.state_file} is kept: run `ambientctl lab down` again"
        )
    for problem in report.problems:
        log.warning("lab down: an undo step failed, but its namespace is gone", problem=problem)
    shutil.rmtree(paths.netns_map_dir, ignore_errors=True)
    paths.mesh.children_file.unlink(missing_ok=True)
    paths.state_file.unlink(missing_ok=True)
    return report


# ---------------------------------------------------------------------------------------------
# up: the processes


def lab_ztunnel_argv(node: LabNode, paths: LabPaths, xds_address: str) -> list[str]:
    """A node's ztunnel, in its node namespace, capturing its pods in-pod: the one place to
    adjust when ztunnel's capture flags change."""
    argv = ztunnel_argv(NodeSpec(node.name, node.address), paths.mesh, xds_address)
    argv += ["--capture", "inpod", "--netns-map", str(paths.netns_map(node.name).resolve())]
    return in_netns(node.netns, argv)


@dataclass
class Lab:
    """A built lab, for ``lab up`` and tests: its plan, paths and (with the mesh) processes."""

    paths: LabPaths
    plan: LabPlan
    supervisor: Supervisor | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT

    @property
    def istiod_address(self) -> str:
        return f"{self.plan.control_address}:{ISTIOD_LISTEN_PORT}"

    def pod(self, reference: str) -> LabPod:
        return self.plan.find_pod(reference)

    def exec_argv(self, reference: str, argv: Sequence[str]) -> list[str]:
        """``argv`` inside a pod's namespace (``[ns/]name``)."""
        return in_netns(self.pod(reference).netns, argv)

    def _supervisor(self) -> Supervisor:
        if self.supervisor is None:
            raise LabError("this lab runs no processes (--no-mesh)")
        return self.supervisor

    async def probe(self, targets: Sequence[str], watched: Sequence[str], what: str) -> None:
        """Probe ``targets`` from the control namespace until all answer; fail fast with the
        log's tail when one of the ``watched`` processes exits meanwhile."""
        supervisor = self._supervisor()
        argv = in_netns(
            self.plan.control_netns,
            [sys.executable, "-m", "ambientctl.lab_probe", "--timeout", str(self.ready_timeout),
             *targets],
        )  # fmt: skip

        async def watch() -> None:
            while True:
                for name in watched:
                    if not supervisor.is_running(name):
                        path = supervisor.log_path(name)
                        raise LabError(
                            f"{name} exited while waiting for {what}; see {path}:\n"
                            + tail(path, LOG_TAIL_LINES)
                        )
                await trio.sleep(POLL_INTERVAL)

        result: subprocess.CompletedProcess[bytes] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                            check=False)  # fmt: skip
            nursery.cancel_scope.cancel()
        assert result is not None
        if result.returncode != 0:
            raise LabError(
                f"{what} not ready after {self.ready_timeout}s: "
                + result.stderr.decode(errors="replace").strip()
            )

    async def start_apps(self) -> None:
        supervisor = self._supervisor()
        layout = layout_from_objects(read_objects(self.paths.config_dir))
        for app in layout.apps:
            netns = self.pod(f"{app.namespace}/{app.pod}").netns
            await supervisor.start(app.process_name, in_netns(netns, app_argv(app)))
        if layout.apps:
            await self.probe(
                [f"tcp://{a.address}:{a.port}" for a in layout.apps],
                [a.process_name for a in layout.apps],
                "the sample apps",
            )

    async def start_istiod(self) -> None:
        supervisor = self._supervisor()
        mesh = self.paths.mesh
        argv = istiod_argv(self.paths.config_dir.resolve(), mesh, self.istiod_address)
        process = await supervisor.start("istiod", in_netns(self.plan.control_netns, argv))
        with trio.move_on_after(self.ready_timeout):
            while not mesh.root_cert.exists() and process.returncode is None:
                await trio.sleep(POLL_INTERVAL)
        if not mesh.root_cert.exists():
            raise LabError(
                f"istiod wrote no {mesh.root_cert} within {self.ready_timeout}s; see "
                f"{supervisor.log_path('istiod')}:\n"
                + tail(supervisor.log_path("istiod"), LOG_TAIL_LINES)
            )
        await self.probe([f"tcp://{self.istiod_address}"], ["istiod"], "istiod")

    async def start_ztunnels(self) -> None:
        supervisor = self._supervisor()
        for node in self.plan.nodes:
            await supervisor.start(
                ztunnel_process_name(node.name),
                lab_ztunnel_argv(node, self.paths, self.istiod_address),
            )
        await self.probe(
            [f"http://{n.address}:{READINESS_PORT}/healthz/ready" for n in self.plan.nodes],
            [ztunnel_process_name(n.name) for n in self.plan.nodes],
            "the ztunnels",
        )

    async def start_mesh(self) -> None:
        """Apps first (probed before any capture exists), then istiod, then ztunnels."""
        self.paths.mesh.create()
        write_bootstrap_tokens(
            self.paths.mesh, [NodeSpec(n.name, n.address) for n in self.plan.nodes]
        )
        await self.start_apps()
        await self.start_istiod()
        await self.start_ztunnels()


async def run_lab(
    config_dir: Path,
    state_dir: Path,
    *,
    name: str = DEFAULT_LAB_NAME,
    subnet: str = DEFAULT_SUBNET,
    mesh: bool = True,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    record_owner: bool = False,
    task_status: trio.TaskStatus[Lab] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Build the lab; ``task_status.started(lab)`` once it (and its mesh) is ready.

    With ``mesh`` it then runs until cancelled, and on the way out stops the processes and
    removes the whole lab. Without, it returns at once and the network stays until
    ``take_down`` (``ambientctl lab down``).
    """
    paths = LabPaths(state_dir)
    # build_network undoes its own partial work when it fails; from here on the lab is ours.
    record = await trio.to_thread.run_sync(
        partial(
            build_network,
            config_dir,
            paths,
            name=name,
            subnet=subnet,
            mesh=mesh,
            record_owner=record_owner and mesh,
        )
    )
    lab = Lab(paths, record.plan, ready_timeout=ready_timeout)
    keep = False
    try:
        if not mesh:
            task_status.started(lab)
            keep = True
            return
        async with open_supervisor(
            paths.mesh.logs_dir, drain_timeout=drain_timeout, pid_file=paths.mesh.children_file
        ) as supervisor:
            lab.supervisor = supervisor
            await lab.start_mesh()
            log.info("lab ready", lab=name, nodes={n.name: n.address for n in lab.plan.nodes})
            task_status.started(lab)
            await trio.sleep_forever()
    finally:
        if not keep:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(
                    partial(take_down, paths, timeout=drain_timeout, kill_owner=False)
                )


# ---------------------------------------------------------------------------------------------
# status and exec


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


def resolve_exec_target(plan: LabPlan, target: str) -> str:
    """The namespace for ``[ns/]pod``, ``node:NAME``, ``:control`` or ``:wire``."""
    if target == ":control":
        return plan.control_netns
    if target == ":wire":
        return plan.wire_netns
    if target.startswith("node:"):
        try:
            return plan.node(target.removeprefix("node:")).netns
        except KeyError as exc:
            raise LabError(str(exc.args[0])) from None
    try:
        return plan.find_pod(target).netns
    except KeyError as exc:
        raise LabError(str(exc.args[0])) from None


def lab_exec(paths: LabPaths, target: str, argv: Sequence[str]) -> int:
    """Run ``argv`` in the target's namespace with our stdio; its exit code (128+N for a
    signal, as a shell reports it)."""
    if not argv:
        raise LabError("no command given: ambientctl lab exec POD -- CMD [ARG...]")
    netns = resolve_exec_target(require_record(paths).plan, target)
    if not Path(netns_path(netns)).exists():
        raise LabError(f"namespace {netns} does not exist (is the lab up?)")
    try:
        returncode = subprocess.call(in_netns(netns, argv))
    except KeyboardInterrupt:
        return 130
    return 128 - returncode if returncode < 0 else returncode


# ---------------------------------------------------------------------------------------------
# Command line (wired into ambientctl.cli)


def add_lab_parser(sub: Any) -> None:
    lab = sub.add_parser(
        "lab",
        help="a small cluster of network namespaces running the mesh (root only)",
        description="Build a cluster from Kubernetes YAML: a network namespace per node and "
        "per pod, nodes joined by a bridge, istiod_lite, one ztunnel per node (in-pod capture) "
        "and the sample apps inside. Needs root.",
    )
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def state_dir(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_LAB_STATE_DIR,
            metavar="DIR",
            help=f"lab record, rewritten YAML, certs, logs (default ./{DEFAULT_LAB_STATE_DIR})",
        )

    up = lab_sub.add_parser("up", help="build the lab and run the mesh in it (Ctrl-C removes it)")
    up.add_argument(
        "-f",
        "--file",
        dest="config_dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory of Kubernetes YAML (Nodes, Pods with spec.nodeName, ...)",
    )
    up.add_argument(
        "--name",
        default=DEFAULT_LAB_NAME,
        help=f"prefix of the lab's namespaces (default {DEFAULT_LAB_NAME})",
    )
    up.add_argument(
        "--subnet",
        default=DEFAULT_SUBNET,
        help=f"addresses used inside the lab (default {DEFAULT_SUBNET})",
    )
    up.add_argument(
        "--no-mesh",
        action="store_true",
        help="only build the network and return (no istiod, ztunnel or apps)",
    )
    up.add_argument("--ready-timeout", type=duration_seconds, default=DEFAULT_READY_TIMEOUT,
                    metavar="DURATION")  # fmt: skip
    up.add_argument("--drain-timeout", type=duration_seconds, default=DEFAULT_DRAIN_TIMEOUT,
                    metavar="DURATION")  # fmt: skip
    up.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    state_dir(up)

    down = lab_sub.add_parser("down", help="stop the lab's processes, remove everything it made")
    down.add_argument("--timeout", type=duration_seconds, default=DEFAULT_DRAIN_TIMEOUT,
                      metavar="DURATION",
                      help="how long processes may take to stop before SIGKILL")  # fmt: skip
    state_dir(down)

    status = lab_sub.add_parser("status", help="namespaces, links, processes, pods")
    status.add_argument("-o", "--output", default="table",
                        choices=["table", "wide", "json", "yaml"])  # fmt: skip
    state_dir(status)

    exec_ = lab_sub.add_parser(
        "exec",
        help="run a command inside a pod's namespace",
        description="Run CMD in the network namespace of POD ([namespace/]name), of a node "
        "(node:NAME), of the control plane (:control) or of the bridge (:wire).",
    )
    exec_.add_argument("target", metavar="POD")
    exec_.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    state_dir(exec_)


def run_lab_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``ambientctl lab ...``: 0 on success, 1 with a message on failure."""
    action = args.lab_command
    if os.geteuid() != 0:
        err.write(f"ambientctl lab {action}: needs root (it creates network namespaces); "
                  "run it with sudo\n")  # fmt: skip
        return 1
    paths = LabPaths(args.state_dir)
    try:
        if action == "up":
            return _cmd_up(args, paths, out, err)
        if action == "down":
            report = take_down(paths, timeout=args.timeout)
            if report.name is None:
                out.write(f"no lab recorded in {paths.root}; nothing to do\n")
            elif report.by_owner:
                out.write(f"lab {report.name} removed by its `lab up`\n")
            else:
                out.write(f"lab {report.name} removed ({report.undone} undo steps, "
                          f"{len(report.stopped_pids)} processes stopped)\n")  # fmt: skip
            return 0
        if action == "status":
            out.write(render_status(lab_status(paths), args.output))
            return 0
        command = list(args.cmd)
        if command[:1] == ["--"]:
            command = command[1:]
        return lab_exec(paths, args.target, command)
    except LabError as exc:
        err.write(f"ambientctl lab {action}: {exc}\n")
        return 1


def _cmd_up(args: argparse.Namespace, paths: LabPaths, out: TextIO, err: TextIO) -> int:
    from ambient_common.logging import configure_logging

    configure_logging(args.log_format)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_signal, nursery.cancel_scope, "removing the lab")
            lab: Lab = await nursery.start(
                partial(
                    run_lab,
                    args.config_dir,
                    paths.root,
                    name=args.name,
                    subnet=args.subnet,
                    mesh=not args.no_mesh,
                    ready_timeout=args.ready_timeout,
                    drain_timeout=args.drain_timeout,
                    record_owner=True,
                )
            )
            plan = lab.plan
            out.write(
                f"lab {plan.name} up: istiod_lite {lab.istiod_address}; nodes "
                + ", ".join(f"{n.name}={n.address}" for n in plan.nodes)
                + "; pods "
                + ", ".join(f"{p.key}={p.address}" for p in plan.pods)
                + "\n"
            )
            if args.no_mesh:
                out.write(f"network only; `ambientctl lab down --state-dir {paths.root}` "
                          "removes it\n")  # fmt: skip
                nursery.cancel_scope.cancel()
            else:
                out.write(f"logs in {paths.mesh.logs_dir}. Ctrl-C removes the lab.\n")
            out.flush()

    exit_code = 0
    try:
        trio.run(main)
    except* (LabError, EmbeddedError) as group:
        for exc in group.exceptions:
            err.write(f"ambientctl lab up: {exc}\n")
        exit_code = 1
    return exit_code
