"""A node's ztunnel: wires config stream, certificates, listeners and admin together.

Lifetimes, outermost first: the control-plane connection; the *connections* nursery (live
tunnels and the HBONE pool, which must outlast the listeners so a shutdown can drain them);
the *services* nursery (listeners, discovery, certificates, admin servers). Shutdown cancels
the services, waits up to ``drain_timeout`` for connections to finish, then cancels the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from ambient_dataplane.admin import (
    StructlogLevelControl,
    admin_routes,
    metrics_routes,
    readiness_problem,
    readiness_routes,
    serve_admin,
)
from ambient_dataplane.controlplane import CaClient, ControlPlaneConnection, control_plane_context
from ambient_dataplane.discovery import DiscoveryClient
from ambient_dataplane.drain import ActiveConnections
from ambient_dataplane.hbone import HboneClient, connect
from ambient_dataplane.hbone.pool import HbonePool, PoolKey
from ambient_dataplane.identity import CertificateManager, TlsContexts
from ambient_dataplane.state import (
    AUTHORIZATION,
    NODE,
    SERVICE,
    WORKLOAD,
    AppliedChange,
    ProxyState,
)
from ztunnel.capture import netns
from ztunnel.capture.inpod import InPodManager
from ztunnel.capture.rules import BYPASS_MARK
from ztunnel.config import ZtunnelConfig
from ztunnel.inbound import Inbound
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.outbound import Outbound
from ztunnel.telemetry import ConnectionTelemetry

log = structlog.get_logger()

_CERTIFICATE_WAIT = 5.0


class Ztunnel:
    def __init__(self, config: ZtunnelConfig) -> None:
        self.config = config
        self.state = ProxyState()
        self.metrics = ZtunnelMetrics()
        self.connections = ActiveConnections()
        self._shutdown = trio.Event()
        self._listener_scopes: dict[str, trio.CancelScope] = {}
        self._listener_nursery: trio.Nursery | None = None
        self._handler_nursery: trio.Nursery | None = None
        self.inpod: InPodManager | None = None
        self._log_levels = StructlogLevelControl(config.log_level)
        self.stopped = trio.Event()

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def shutdown(self) -> None:
        """Ask for a graceful shutdown and wait until it is complete."""
        self.request_shutdown()
        await self.stopped.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        host, port = config.xds_address
        base_url = f"https://{host}:{port}"
        try:
            async with ControlPlaneConnection(
                base_url, config.token, control_plane_context(config.root_cert),
                token_file=config.token_file,
            ) as control_plane:
                await self._run(control_plane, task_status)
        finally:
            self.stopped.set()

    async def _run(
        self, control_plane: ControlPlaneConnection, task_status: trio.TaskStatus[None]
    ) -> None:
        config = self.config
        bootstrap_bundle = [config.root_cert.read_text()]
        self.certs = CertificateManager(
            CaClient(control_plane),
            requested_ttl=int(config.requested_cert_ttl) if config.requested_cert_ttl else None,
            bootstrap_trust_bundle=bootstrap_bundle,
        )
        self.tls_contexts = TlsContexts(self.certs)
        telemetry = ConnectionTelemetry(self.metrics)
        self.xds = DiscoveryClient(control_plane, config.node, self.state, self._on_change)

        async with trio.open_nursery() as connections:
            self._handler_nursery = connections
            self.pool = HbonePool(
                self._connect_hbone,
                max_streams_per_connection=config.max_streams_per_connection,
                idle_timeout=config.pool_idle_timeout,
            )
            await connections.start(self.pool.run)
            self.inbound = Inbound(
                node=config.node, root_namespace=config.root_namespace,
                hbone_port=config.ports.hbone, plaintext_port=config.ports.inbound_plaintext,
                connect_timeout=config.connect_timeout, state=self.state,
                server_context=self.tls_contexts.server,
                accepted_trust_domains=lambda: {config.trust_domain},
                telemetry=telemetry, connections=self.connections,
            )
            self.outbound = Outbound(
                node=config.node,
                connect_timeout=config.connect_timeout, certificate_timeout=_CERTIFICATE_WAIT,
                hbone_port=config.ports.hbone, state=self.state, certs=self.certs,
                pool=self.pool, telemetry=telemetry, connections=self.connections,
            )
            if config.capture == "inpod":
                assert config.netns_map is not None
                self.inpod = InPodManager(
                    node=config.node, netns_map_path=config.netns_map, state=self.state,
                    inbound=self.inbound, outbound=self.outbound, handler_nursery=connections,
                    config_synced=self.xds.synced, ports=config.ports,
                    poll_interval=config.netns_map_poll_interval,
                )
            async with trio.open_nursery() as services:
                await services.start(self.certs.run)
                self._listener_nursery = services
                await services.start(self._serve_admin)
                await services.start(
                    self.outbound.serve_socks5, config.node_address, config.ports.socks5,
                    connections,
                )
                if self.inpod is not None:
                    # Cancelled with the services at shutdown: listeners close, rules stay
                    # (fail closed until the next ztunnel takes over; see capture/inpod.py).
                    await services.start(self.inpod.run)
                await services.start(self.xds.run)
                log.info("ztunnel started", node=config.node, address=config.node_address,
                         capture=config.capture)
                task_status.started()
                await self._shutdown.wait()
                log.info("draining", connections=self.connections.count,
                         timeout=config.drain_timeout)
                services.cancel_scope.cancel()
            # Listeners are closed: HBONE connections send GOAWAY and end with their last
            # tunnel, so idle pooled connections from peers do not hold the shutdown.
            self.connections.begin_drain()
            with trio.move_on_after(config.drain_timeout) as drain:
                await self.connections.wait_idle()
            if drain.cancelled_caught:
                log.warning("drain timeout: closing remaining connections",
                            connections=self.connections.count)
            connections.cancel_scope.cancel()
        log.info("ztunnel stopped", node=config.node)

    async def _serve_admin(self, *, task_status: trio.TaskStatus[None]) -> None:
        config = self.config
        address = config.node_address
        dump_sections: dict[str, Callable[[], Any]] = {
            "workloads": partial(self.state.dump_kind, WORKLOAD),
            "services": partial(self.state.dump_kind, SERVICE),
            "policies": partial(self.state.dump_kind, AUTHORIZATION),
            "nodes": partial(self.state.dump_kind, NODE),
            "certificates": self.certs.dump,
            "discovery": self.xds.status,
        }
        if self.inpod is not None:
            dump_sections["capture"] = self.inpod.status
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_admin, address, config.ports.admin, admin_routes(
                dump_sections,
                self._log_levels,
                self.request_shutdown,
            ))
            await nursery.start(serve_admin, address, config.ports.metrics,
                                metrics_routes(self.metrics.render))
            await nursery.start(serve_admin, address, config.ports.readiness,
                                readiness_routes(self._readiness_problem))
            task_status.started()

    def _readiness_problem(self) -> str | None:
        return readiness_problem(self.xds.synced.is_set(), self.certs.missing())

    # -- reacting to config ---------------------------------------------------------------

    def _on_change(self, change: AppliedChange) -> None:
        node = self.config.node
        self.certs.set_wanted(self.state.local_identities(node))
        if self.inpod is not None:
            # In-pod capture binds inside the pods' namespaces, never here.
            self.inpod.config_changed()
            return
        wanted = {
            address for workload in self.state.local_workloads(node)  # enrolled (HBONE) only
            for address in workload.addresses
        }
        for address in set(self._listener_scopes) - wanted:
            self._listener_scopes.pop(address).cancel()
            log.info("inbound listener closed", workload_ip=address)
        for address in sorted(wanted - set(self._listener_scopes)):
            scope = trio.CancelScope()
            self._listener_scopes[address] = scope
            assert self._listener_nursery is not None
            self._listener_nursery.start_soon(self._serve_workload, address, scope)

    async def _serve_workload(self, address: str, scope: trio.CancelScope) -> None:
        assert self._handler_nursery is not None
        with scope:
            try:
                await self.inbound.serve_workload(address, self._handler_nursery)
            except OSError as exc:
                log.error("cannot listen for workload", workload_ip=address,
                          reason=exc.strerror or str(exc))
                if self._listener_scopes.get(address) is scope:
                    del self._listener_scopes[address]

    # -- outbound HBONE connections -------------------------------------------------------

    async def _connect_hbone(self, key: PoolKey, nursery: trio.Nursery) -> HboneClient:
        context = self.tls_contexts.client(key.source_identity)
        if context is None:
            raise OSError(f"no certificate for {key.source_identity}")
        ip, port = key.destination_address
        open_socket = None
        if key.source_netns is not None:
            # Captured pod: dial from inside its namespace, marked so its rules let it pass.
            open_socket = partial(
                netns.connect_in, Path(key.source_netns), local_address=key.source_ip,
                mark=BYPASS_MARK, timeout=self.config.connect_timeout,
            )
        return await connect(
            ip, port, context, key.destination_identity, nursery=nursery,
            max_streams=self.config.max_streams_per_connection,
            local_address=key.source_ip, connect_timeout=self.config.connect_timeout,
            open_socket=open_socket,
        )
