"""Istio's connection-level metric labels, computed from what a proxy knows about both ends.

ztunnel labels its ``istio_tcp_*`` series with them and the waypoint derives the
``istio_requests_*`` source/destination labels from the same function, so a Kiali graph joins
the two reporters' series on identical values. ``ResponseFlag`` is the one set of Envoy
response flags both proxies report, ``format_response_flags`` the one way to turn a request's
flags into the ``response_flags`` label value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from ambient_api.identity import SpiffeId
from ambient_api.model import Service, TunnelProtocol, Workload

UNKNOWN = "unknown"

Reporter = Literal["source", "destination"]

NO_RESPONSE_FLAGS = "-"


class ResponseFlag(StrEnum):
    """Envoy's response flags, as dashboards written for Istio query them (the ones the
    proxies set). Declared in the order of Envoy's own ``ResponseFlag`` enum, which is the
    order Envoy prints the flags of one request in, whatever order they happened in."""

    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_TIMEOUT = "UT"
    UPSTREAM_RESET = "UR"
    UPSTREAM_CONNECT_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"  # a circuit breaker refused the request
    NO_ROUTE = "NR"
    DELAY_INJECTED = "DI"
    FAULT_INJECTED = "FI"
    RATE_LIMITED = "RL"
    UNAUTHORIZED = "UAEX"  # denied: a bad JWT, or L4 policy (Istio reports its denials so)
    RETRY_LIMIT_EXCEEDED = "URX"
    # Not Envoy's (its RBAC filter sets none); Istio's waypoint dashboards know it. Last, as
    # a flag Envoy does not know would be.
    RBAC_DENIED = "RBAC"


def format_response_flags(flags: Iterable[ResponseFlag]) -> str:
    """The ``response_flags`` label of one request: each flag once, comma-joined in Envoy's
    order ("UT,URX", never "URX,UT"); "-" for none."""
    present = set(flags)
    return ",".join(flag.value for flag in ResponseFlag if flag in present) or NO_RESPONSE_FLAGS


@dataclass(frozen=True)
class ConnectionLabels:
    """Istio's TCP metric labels; field order is the label order."""

    reporter: str
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = NO_RESPONSE_FLAGS
    connection_security_policy: str = UNKNOWN

    def values(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ConnectionLabels))


def _or_unknown(value: str) -> str:
    return value or UNKNOWN


def _workload_name(workload: Workload) -> str:
    """Istio reports the owning workload (Deployment) name, falling back to the pod name."""
    return workload.workload_name or workload.name


def _canonical_service(workload: Workload) -> str:
    return workload.canonical_name or _workload_name(workload)


def _canonical_revision(workload: Workload) -> str:
    return workload.canonical_revision or "latest"


def connection_labels(
    reporter: Reporter,
    source: Workload | None,
    source_identity: SpiffeId | None,
    destination: Workload | None,
    destination_service: Service | None,
    *,
    mtls: bool,
    response_flags: str = NO_RESPONSE_FLAGS,
) -> ConnectionLabels:
    """Build the labels of one connection from what the proxy knows about both ends.

    ``source_identity`` is the peer's authenticated SPIFFE id (inbound over HBONE) or the
    local workload's (outbound); without mTLS nobody's principal is known.
    """
    if reporter not in ("source", "destination"):
        raise ValueError(f"reporter must be 'source' or 'destination', not {reporter!r}")
    destination_principal = UNKNOWN
    if mtls and destination is not None and destination.tunnel_protocol is TunnelProtocol.HBONE:
        destination_principal = destination.spiffe_id
    return ConnectionLabels(
        reporter=reporter,
        source_workload=_workload_name(source) if source else UNKNOWN,
        source_canonical_service=_canonical_service(source) if source else UNKNOWN,
        source_canonical_revision=_canonical_revision(source) if source else UNKNOWN,
        source_workload_namespace=source.namespace if source else UNKNOWN,
        source_principal=str(source_identity) if source_identity and mtls else UNKNOWN,
        source_app=_canonical_service(source) if source else UNKNOWN,
        source_version=_canonical_revision(source) if source else UNKNOWN,
        source_cluster=_or_unknown(source.cluster_id) if source else UNKNOWN,
        destination_workload=_workload_name(destination) if destination else UNKNOWN,
        destination_workload_namespace=destination.namespace if destination else UNKNOWN,
        destination_principal=destination_principal,
        destination_service=(
            destination_service.hostname
            if destination_service
            else (destination.addresses[0] if destination and destination.addresses else UNKNOWN)
        ),
        destination_service_name=destination_service.name if destination_service else UNKNOWN,
        destination_service_namespace=(
            destination_service.namespace if destination_service else UNKNOWN
        ),
        destination_canonical_service=_canonical_service(destination) if destination else UNKNOWN,
        destination_canonical_revision=(
            _canonical_revision(destination) if destination else UNKNOWN
        ),
        destination_cluster=_or_unknown(destination.cluster_id) if destination else UNKNOWN,
        request_protocol="tcp",
        response_flags=response_flags or NO_RESPONSE_FLAGS,
        connection_security_policy="mutual_tls" if mtls else UNKNOWN,
    )
