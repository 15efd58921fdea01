"""What ztunnel's entries share, built once per ztunnel (istio/ztunnel's ``ProxyInputs``).

``Inbound``, ``Outbound`` and ``InPodManager`` each take one ``ProxyInputs`` instead of a
dozen keyword arguments: the configuration, the proxy state, telemetry, the certificates and
their TLS contexts, the HBONE pool and the live connections. ``build`` makes the ztunnel's
own parts (telemetry, the pool) and takes the rest from the runtime that owns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ambient_dataplane.drain import ActiveConnections
from ambient_dataplane.hbone.pool import HbonePool
from ambient_dataplane.identity import CertificateManager, TlsContexts
from ambient_dataplane.runtime import ProxyRuntime
from ambient_dataplane.state import ProxyState
from ztunnel.config import ZtunnelConfig
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.sockets import connect_hbone
from ztunnel.telemetry import ConnectionTelemetry


@dataclass(frozen=True)
class ProxyInputs:
    """One ztunnel's shared parts; the runtime owns certs, tls_contexts and connections."""

    config: ZtunnelConfig
    state: ProxyState
    telemetry: ConnectionTelemetry
    certs: CertificateManager
    tls_contexts: TlsContexts
    pool: HbonePool
    connections: ActiveConnections

    @classmethod
    def build(
        cls, config: ZtunnelConfig, state: ProxyState, metrics: ZtunnelMetrics,
        runtime: ProxyRuntime,
    ) -> ProxyInputs:
        """The parts of the ztunnel ``runtime`` serves, with ``metrics`` as its counters."""
        pool = HbonePool(
            partial(connect_hbone, tls_contexts=runtime.tls_contexts,
                    connect_timeout=config.connect_timeout,
                    max_streams=config.max_streams_per_connection),
            max_streams_per_connection=config.max_streams_per_connection,
            idle_timeout=config.pool_idle_timeout,
        )
        return cls(
            config=config, state=state, telemetry=ConnectionTelemetry(metrics, runtime.connections),
            certs=runtime.certs, tls_contexts=runtime.tls_contexts, pool=pool,
            connections=runtime.connections,
        )
