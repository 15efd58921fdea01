"""The embedded mesh run: istiod, a ztunnel per Node, the waypoints and the sample apps.

``run_embedded`` (``ambientctl up``, the demo) reads the layout, prepares the state directory
and starts, under one ``Supervisor``, the sample apps, istiod (waiting for its root certificate
and port), a ztunnel per Node and a waypoint per waypoint Gateway, then waits until every proxy
answers ``/healthz/ready``. While it runs it follows the config directory's waypoints live:
``ambientctl waypoint apply``/``delete`` starts or stops one within a second.
``EmbeddedMesh`` is the handle the demo and tests drive it through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import trio

from ambient_common.files import write_atomically
from ambientctl.apps import http_get
from ambientctl.embedded.commands import app_argv, istiod_argv, waypoint_argv, ztunnel_argv
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.istiod_log import follow_config_problems, log_size
from ambientctl.embedded.layout import (
    MeshLayout,
    WaypointSpec,
    layout_from_objects,
    load_layout,
    read_objects,
    ztunnel_process_name,
)
from ambientctl.embedded.state_dir import StatePaths, add_bootstrap_tokens, write_bootstrap_tokens
from ambientctl.embedded.supervisor import (
    DEFAULT_DRAIN_TIMEOUT,
    LOG_TAIL_LINES,
    POLL_INTERVAL,
    Supervisor,
    open_supervisor,
    reap_stale_children,
    tail,
)

log = structlog.get_logger()

ISTIOD_LISTEN_HOST = "127.0.9.1"
ISTIOD_LISTEN_PORT = 15012
READINESS_PORT = 15021
DEFAULT_READY_TIMEOUT = 30.0
WAYPOINT_POLL_INTERVAL = 1.0


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
            "config_dir": str(self.config_dir),
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
    said_offset = log_size(paths.istiod_log)  # config problems from this istiod on are echoed
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
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    follow_config_problems, supervisor.log_path("istiod"), said_offset
                )
                await mesh.watch_waypoints()
        finally:
            paths.mesh_file.unlink(missing_ok=True)
