"""A node's ztunnel: the shared proxy runtime plus ztunnel's own entries.

``ProxyRuntime`` (ambient_dataplane.runtime) owns the lifecycle: control-plane connection,
certificates, discovery, admin servers, drain. ``Ztunnel`` is the ``ProxyRole`` it runs: the
HBONE pool and the byte-counter flush in the *connections* nursery; SOCKS5 and, per local
workload, the inbound listeners (or in-pod capture) in the *services* nursery; the
reaction to each config change (certificates wanted, listeners opened and closed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import structlog
import trio

from ambient_dataplane.runtime import ProxyRuntime, RuntimeSettings
from ambient_dataplane.state import (
    AUTHORIZATION,
    NODE,
    SERVICE,
    WORKLOAD,
    AppliedChange,
    ProxyState,
)
from ztunnel.capture.inpod import InPodManager
from ztunnel.config import ZtunnelConfig
from ztunnel.inbound import Inbound
from ztunnel.inputs import ProxyInputs
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.outbound import Outbound

log = structlog.get_logger()


def runtime_settings(config: ZtunnelConfig) -> RuntimeSettings:
    """What the shared lifecycle needs of a ztunnel's configuration."""
    return RuntimeSettings(
        name="ztunnel",
        xds_address=config.xds_address,
        root_cert=config.root_cert,
        token=config.token,
        token_file=config.token_file,
        discovery_node=config.node,
        address=config.node_address,
        ports=config.ports,
        drain_timeout=config.drain_timeout,
        log_level=config.log_level,
        requested_cert_ttl=int(config.requested_cert_ttl) if config.requested_cert_ttl else None,
        log_fields={"node": config.node, "address": config.node_address,
                    "capture": config.capture},
    )


class Ztunnel:
    """One node's ztunnel; every part is built here, once, and served by ``run``."""

    def __init__(self, config: ZtunnelConfig) -> None:
        self.config = config
        self.state = ProxyState()
        self.metrics = ZtunnelMetrics()
        self.runtime = ProxyRuntime(runtime_settings(config), self.state, self._on_change)
        self.inputs = ProxyInputs.build(config, self.state, self.metrics, self.runtime)
        self.inbound = Inbound(self.inputs)
        self.outbound = Outbound(self.inputs)
        self.inpod = (
            InPodManager(self.inputs, self.inbound, self.outbound,
                         config_synced=self.runtime.discovery.synced)
            if config.capture == "inpod" else None
        )
        self._listener_scopes: dict[str, trio.CancelScope] = {}
        self._listener_nursery: trio.Nursery | None = None
        self._handler_nursery: trio.Nursery | None = None

    @property
    def stopped(self) -> trio.Event:
        return self.runtime.stopped

    def request_shutdown(self) -> None:
        self.runtime.request_shutdown()

    async def shutdown(self) -> None:
        """Ask for a graceful shutdown and wait until it is complete."""
        await self.runtime.shutdown()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.runtime.run(self, task_status=task_status)

    # -- the runtime's ProxyRole ------------------------------------------------------------

    async def start_connections(self, connections: trio.Nursery) -> None:
        await connections.start(self.inputs.pool.run)
        await connections.start(self.inputs.telemetry.run)

    async def start_listeners(self, services: trio.Nursery, connections: trio.Nursery) -> None:
        self._listener_nursery, self._handler_nursery = services, connections
        config = self.config
        await services.start(self.outbound.serve_socks5, config.node_address,
                             config.ports.socks5, connections)
        if self.inpod is not None:
            # Cancelled with the services at shutdown: listeners close, rules stay
            # (fail closed until the next ztunnel takes over; see capture/inpod.py).
            await services.start(self.inpod.run, connections)

    def dump_sections(self) -> Mapping[str, Callable[[], Any]]:
        sections: dict[str, Callable[[], Any]] = {
            "workloads": partial(self.state.dump_kind, WORKLOAD),
            "services": partial(self.state.dump_kind, SERVICE),
            "policies": partial(self.state.dump_kind, AUTHORIZATION),
            "nodes": partial(self.state.dump_kind, NODE),
        }
        if self.inpod is not None:
            sections["capture"] = self.inpod.status
        return sections

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def drained(self) -> None:
        """ztunnel has nothing to release before the remaining connections are cut."""

    # -- reacting to config ---------------------------------------------------------------

    def _on_change(self, change: AppliedChange) -> None:
        node = self.config.node
        self.inputs.certs.set_wanted(self.state.local_identities(node))
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
