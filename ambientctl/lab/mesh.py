"""The mesh inside a built lab: the sample apps, istiod_lite and one ztunnel per node.

``run_lab`` builds the network and starts, with ``ip netns exec`` and under the embedded mode's
``Supervisor``, the sample apps in their pods' namespaces, istiod_lite in the control namespace
and one ztunnel per node (``--capture inpod``) in its node's namespace. Readiness is probed from
inside the control namespace (``ambientctl.lab.probe``): the host cannot reach lab addresses.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio

from ambientctl.embedded.commands import app_argv, istiod_argv, ztunnel_argv
from ambientctl.embedded.layout import (
    NodeSpec,
    layout_from_objects,
    read_objects,
    ztunnel_process_name,
)
from ambientctl.embedded.mesh import DEFAULT_READY_TIMEOUT, ISTIOD_LISTEN_PORT, READINESS_PORT
from ambientctl.embedded.state_dir import write_bootstrap_tokens
from ambientctl.embedded.supervisor import (
    DEFAULT_DRAIN_TIMEOUT,
    LOG_TAIL_LINES,
    POLL_INTERVAL,
    Supervisor,
    open_supervisor,
    tail,
)
from ambientctl.lab.errors import LabError
from ambientctl.lab.netns import in_netns
from ambientctl.lab.network import build_network, take_down
from ambientctl.lab.plan import DEFAULT_LAB_NAME, DEFAULT_SUBNET, LabNode, LabPlan, LabPod
from ambientctl.lab.state import LabPaths

log = structlog.get_logger()


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
            [sys.executable, "-m", "ambientctl.lab.probe", "--timeout", str(self.ready_timeout),
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
