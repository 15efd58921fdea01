"""What the demo's acts share: the running mesh as its own endpoints show it, and the report.

``DemoMesh`` reads the ztunnels' (and the waypoint's) admin, metrics and access-log output,
never the demo's own bookkeeping, so every check is the mesh's own evidence. ``DemoReport``
prints each act's sections and tables and collects the checks that did not hold. Both the L4
acts (``ambientctl.demo``) and the waypoint act (``ambientctl.demo_waypoint``) use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.layout import ztunnel_process_name
from ambientctl.embedded.mesh import EmbeddedMesh
from ambientctl.output import render_table
from ztunnel.config import Ports

# ztunnel's (and, for admin and metrics, the waypoint's) ports.
PORTS = Ports()


@dataclass
class DemoReport:
    out: TextIO
    failures: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.out.write(f"\n== {title}\n")

    def line(self, text: str) -> None:
        self.out.write(f"{text}\n")

    def table(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        self.out.write(render_table(rows, columns) + "\n")

    def check(self, ok: bool, what: str) -> None:
        self.line(f"  [{'ok' if ok else 'FAILED'}] {what}")
        if not ok:
            self.failures.append(what)


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    ip: str
    node: str
    node_address: str


class DemoMesh:
    """What the demo needs to know of the running mesh, read from its own endpoints."""

    def __init__(self, mesh: EmbeddedMesh) -> None:
        self.mesh = mesh
        self.http = httpx.AsyncClient(trust_env=False, timeout=5.0)
        self.waypoint_address = next(iter(mesh.waypoints.values()), "")
        self.node_of: dict[str, str] = {}

    async def learn_nodes(self) -> None:
        """Which node each workload runs on, as the ztunnels know it."""
        for node in self.mesh.nodes:
            for workload in (await self.config_dump(node))["workloads"]:
                if workload["node"]:
                    self.node_of[workload["name"]] = workload["node"]

    async def config_dump(self, node: str) -> dict[str, Any]:
        url = f"http://{self.mesh.nodes[node]}:{PORTS.admin}/config_dump"
        response = await self.http.get(url)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def pod(self, namespace: str, name: str) -> Pod:
        for node in self.mesh.nodes:
            for workload in (await self.config_dump(node))["workloads"]:
                if workload["namespace"] == namespace and workload["name"] == name:
                    return Pod(
                        name,
                        namespace,
                        workload["addresses"][0],
                        workload["node"],
                        self.mesh.nodes[workload["node"]],
                    )
        raise EmbeddedError(f"the mesh has no pod {namespace}/{name}; is this the demo topology?")

    async def metrics(self, node: str) -> list[tuple[str, dict[str, str], float]]:
        """The samples of ``node``'s ztunnel."""
        return await self.scrape(self.mesh.nodes[node])

    async def scrape(self, address: str) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of every sample a proxy's metrics port serves."""
        response = await self.http.get(f"http://{address}:{PORTS.metrics}/metrics")
        response.raise_for_status()
        return [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        ]

    def access_log(self, node: str, event: str) -> list[dict[str, Any]]:
        path = self.mesh.supervisor.log_path(ztunnel_process_name(node))
        entries = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                entries.append(entry)
        return entries
