"""One proxy's lifecycle, the same for ztunnel and the waypoint.

Lifetimes, outermost first: the control-plane connection (one HTTP/2 client to istiod_lite
for discovery and CSRs); the *connections* nursery (live tunnels, the HBONE pool and what
else must outlast the listeners, so a shutdown can drain them); the *services* nursery
(certificates, the admin, metrics and readiness servers, the proxy's listeners, discovery).
Shutdown cancels the services (the listeners close), begins the drain (HBONE connections
send GOAWAY and end with their last tunnel), waits up to the drain timeout for the live
connections to finish, then aborts the ones left (``ActiveConnections.abort``: each ends with
an error both of its ends see) and cancels the rest.

Composition, not inheritance: a proxy builds a ``ProxyRuntime`` from its ``RuntimeSettings``
(the runtime builds the parts every proxy has: ``certs``, ``tls_contexts``, ``discovery``,
``connections``) and hands ``run`` its ``ProxyRole``: what it starts in each nursery, its
own ``/config_dump`` sections and its metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from ambient_api import kinds
from ambient_dataplane.admin import (
    StructlogLevelControl,
    admin_routes,
    metrics_routes,
    readiness_problem,
    readiness_routes,
    serve_admin,
)
from ambient_dataplane.controlplane import CaClient, ControlPlaneConnection, RootCertificate
from ambient_dataplane.discovery import DiscoveryClient
from ambient_dataplane.drain import ActiveConnections
from ambient_dataplane.identity import CertificateManager, TlsContexts
from ambient_dataplane.state import AppliedChange, ProxyState

log = structlog.get_logger()

# After the drain timeout, how long the aborted connections may take to send their resets.
ABORT_GRACE = 1.0


class ServingPorts(Protocol):
    """Where the admin (15000), metrics (15020) and readiness (15021) servers listen."""

    @property
    def admin(self) -> int: ...

    @property
    def metrics(self) -> int: ...

    @property
    def readiness(self) -> int: ...


@dataclass(frozen=True)
class RuntimeSettings:
    """What the shared lifecycle needs from a proxy's configuration."""

    name: str  # "ztunnel", "waypoint": the first word of its "started"/"stopped" lines
    xds_address: tuple[str, int]
    root_cert: Path
    token: str
    token_file: Path | None
    discovery_node: str  # who the proxy is to discovery (a node, a waypoint's principal)
    address: str  # where the admin, metrics and readiness servers bind
    ports: ServingPorts
    drain_timeout: float
    log_level: str
    discovery_kinds: Collection[str] = kinds.L4_KINDS
    requested_cert_ttl: int | None = None
    log_fields: Mapping[str, object] = field(default_factory=dict)  # on started and stopped


class ProxyRole(Protocol):
    """What a proxy adds to the shared lifecycle."""

    async def start_connections(self, connections: trio.Nursery) -> None:
        """Start what must outlast the listeners (the HBONE pool, flushers) in
        ``connections``; runs before any listener exists."""

    async def start_listeners(self, services: trio.Nursery, connections: trio.Nursery) -> None:
        """Start the proxy's listeners in ``services``; the connections they accept run in
        ``connections``, so closing the listeners does not cut them."""

    def dump_sections(self) -> Mapping[str, Callable[[], Any]]:
        """The proxy's own ``/config_dump`` sections (certificates and discovery are added)."""

    def render_metrics(self) -> bytes:
        """The Prometheus text of ``/metrics``."""

    async def drained(self) -> None:
        """The connections finished (or the drain timed out) and are about to be cancelled:
        release what must be flushed first."""


class ProxyRuntime:
    """The control-plane connection, certificates, discovery and drain of one proxy."""

    def __init__(
        self,
        settings: RuntimeSettings,
        state: ProxyState,
        on_change: Callable[[AppliedChange], None],
    ) -> None:
        self.settings = settings
        host, port = settings.xds_address
        roots = RootCertificate(settings.root_cert)
        self.control_plane = ControlPlaneConnection(
            f"https://{host}:{port}", settings.token, roots, token_file=settings.token_file,
        )
        self.certs = CertificateManager(
            CaClient(self.control_plane),
            requested_ttl=settings.requested_cert_ttl,
            bootstrap_trust_bundle=roots.pems,
        )
        # A new root (istiod restarted with another CA): leaves of the old one must go.
        self.control_plane.on_roots_changed(
            lambda _roots: self.certs.renew_all("the root certificate changed")
        )
        self.tls_contexts = TlsContexts(self.certs)
        self.discovery = DiscoveryClient(
            self.control_plane, settings.discovery_node, state, on_change,
            kinds=settings.discovery_kinds,
        )
        self.connections = ActiveConnections()
        self.stopped = trio.Event()
        self._shutdown = trio.Event()
        self._log_levels = StructlogLevelControl(settings.log_level)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def shutdown(self) -> None:
        """Ask for a graceful shutdown and wait until it is complete."""
        self.request_shutdown()
        await self.stopped.wait()

    def readiness_problem(self) -> str | None:
        """Why the proxy is not ready (first config, a certificate per local identity)."""
        return readiness_problem(self.discovery.synced.is_set(), self.certs.missing())

    async def run(
        self, role: ProxyRole, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until a shutdown was requested and the drain is over; ``stopped`` is set
        however it ends."""
        try:
            async with self.control_plane:
                await self._serve(role, task_status)
        finally:
            self.stopped.set()

    async def _serve(self, role: ProxyRole, task_status: trio.TaskStatus[None]) -> None:
        settings = self.settings
        async with trio.open_nursery() as connections:
            await role.start_connections(connections)
            async with trio.open_nursery() as services:
                await services.start(self.certs.run)
                await services.start(self._serve_admin, role)
                await role.start_listeners(services, connections)
                await services.start(self.discovery.run)
                log.info(f"{settings.name} started", **settings.log_fields)
                task_status.started()
                await self._shutdown.wait()
                log.info("draining", connections=self.connections.count,
                         timeout=settings.drain_timeout)
                services.cancel_scope.cancel()
            # Listeners are closed: HBONE connections send GOAWAY and end with their last
            # tunnel, so idle pooled connections from peers do not hold the shutdown.
            self.connections.begin_drain()
            with trio.move_on_after(settings.drain_timeout) as drain:
                await self.connections.wait_idle()
            if drain.cancelled_caught:
                log.warning("drain timeout: closing remaining connections",
                            connections=self.connections.count)
                # Ended abortively (RST_STREAM to HBONE peers, TCP RST to apps) while the
                # HBONE sessions still run to carry the resets: a clean end would pass a
                # truncated transfer off as a complete one.
                if self.connections.abort():
                    with trio.move_on_after(ABORT_GRACE):
                        await self.connections.wait_idle()
            await role.drained()
            connections.cancel_scope.cancel()
        log.info(f"{settings.name} stopped", **settings.log_fields)

    async def _serve_admin(
        self, role: ProxyRole, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        address, ports = self.settings.address, self.settings.ports
        sections = {
            **role.dump_sections(),
            "certificates": self.certs.dump,
            "discovery": self.discovery.status,
        }
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_admin, address, ports.admin, admin_routes(
                sections, self._log_levels, self.request_shutdown,
            ))
            await nursery.start(serve_admin, address, ports.metrics,
                                metrics_routes(role.render_metrics))
            await nursery.start(serve_admin, address, ports.readiness,
                                readiness_routes(self.readiness_problem))
            task_status.started()
