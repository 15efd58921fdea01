"""One place where a proxied connection becomes an access-log line and ``istio_tcp_*`` series.

Inbound and outbound both describe a connection with a ``ConnectionRecord`` and hand it to
``ConnectionTelemetry`` when it opens and when it ends, so the two directions report the same
fields the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_api.model import Service, Workload
from ambient_dataplane.labels import ConnectionLabels, connection_labels
from ztunnel.metrics import ZtunnelMetrics

Direction = Literal["inbound", "outbound"]


@dataclass
class ConnectionRecord:
    direction: Direction
    source_address: str
    destination_address: str
    source_workload: Workload | None = None
    source_identity: SpiffeId | None = None
    destination_workload: Workload | None = None
    destination_identity: SpiffeId | None = None
    destination_service: Service | None = None
    mtls: bool = False
    started_at: float = field(default_factory=trio.current_time)
    labels: ConnectionLabels | None = None  # set by ``ConnectionTelemetry.opened``


class ConnectionTelemetry:
    """Counts connections and writes one structlog access line per connection."""

    def __init__(self, metrics: ZtunnelMetrics) -> None:
        self._metrics = metrics
        self._log = structlog.get_logger("ztunnel.access")

    def _labels(self, record: ConnectionRecord, response_flags: str = "-") -> ConnectionLabels:
        return connection_labels(
            "destination" if record.direction == "inbound" else "source",
            record.source_workload,
            record.source_identity,
            record.destination_workload,
            record.destination_service,
            mtls=record.mtls,
            response_flags=response_flags,
        )

    def opened(self, record: ConnectionRecord) -> None:
        record.labels = self._labels(record)
        self._metrics.connection_opened(record.labels)

    def closed(
        self, record: ConnectionRecord, *, sent: int, received: int, error: str | None = None
    ) -> None:
        """An accepted connection ended. ``sent`` flowed towards the destination."""
        assert record.labels is not None, "closed() without opened()"
        self._metrics.connection_closed(record.labels, sent=sent, received=received)
        if not self._log.is_enabled_for(logging.INFO):
            return  # the access line's fields are not worth building for nobody
        self._log.info(
            "connection complete" if error is None else "connection broken",
            **self._fields(record),
            bytes_sent=sent,
            bytes_recv=received,
            duration_ms=_duration_ms(record),
            error=error,
        )

    def refused(self, record: ConnectionRecord, *, reason: str, response_flags: str) -> None:
        """A connection that never carried data: denied, or no upstream. Counted as opened
        and closed with its response flag, as Istio does, so denials are visible in graphs."""
        labels = self._labels(record, response_flags)
        self._metrics.connection_opened(labels)
        self._metrics.connection_closed(labels)
        self._log.warning(
            "connection refused",
            **self._fields(record),
            response_flags=response_flags,
            reason=reason,
            duration_ms=_duration_ms(record),
        )

    @staticmethod
    def _fields(record: ConnectionRecord) -> dict[str, object]:
        return {
            "direction": record.direction,
            "src.addr": record.source_address,
            "src.workload": record.source_workload.name if record.source_workload else None,
            "src.identity": str(record.source_identity) if record.source_identity else None,
            "dst.addr": record.destination_address,
            "dst.service": (
                record.destination_service.hostname if record.destination_service else None
            ),
            "dst.workload": (
                record.destination_workload.name if record.destination_workload else None
            ),
            "dst.identity": (
                str(record.destination_identity) if record.destination_identity else None
            ),
            "protocol": "HBONE" if record.mtls else "TCP",
        }


def _duration_ms(record: ConnectionRecord) -> float:
    return round((trio.current_time() - record.started_at) * 1000, 1)
