"""Building the lab's network from its plan, and removing it again.

- ``build_network`` records the whole plan in ``lab.json`` and runs its steps, recording BEFORE
  each step how many it has begun; when a step fails it undoes what was done and re-raises.
- ``take_down`` asks a running ``lab up`` to stop (SIGTERM), stops every process still inside
  the lab's namespaces (they are ours by construction), then runs the recorded steps' inverses
  in reverse, tolerating what is already gone. The record is removed only once no lab
  namespace is left, so a second ``down`` finishes what a first could not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.layout import read_objects
from ambientctl.embedded.supervisor import DEFAULT_DRAIN_TIMEOUT, POLL_INTERVAL, live_cmdline
from ambientctl.lab.config import rewrite_objects, write_lab_config, write_netns_maps
from ambientctl.lab.errors import LabError, LabPlanError
from ambientctl.lab.netns import CommandRunner, existing_netns, netns_pids, run_command
from ambientctl.lab.plan import DEFAULT_CLUSTER_ID, DEFAULT_LAB_NAME, DEFAULT_SUBNET, plan_lab
from ambientctl.lab.state import LabPaths, LabRecord, read_record, write_record
from ambientctl.lab.steps import is_already_gone, undo_commands

log = structlog.get_logger()


# ---------------------------------------------------------------------------------------------
# up


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
