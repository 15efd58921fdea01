"""One place where a proxied connection becomes an access-log line and ``istio_tcp_*`` series.

Inbound and outbound both describe a connection with a ``ConnectionRecord`` and hand it to
``ConnectionTelemetry``, which carries it (``carry``: the splice) or reports its refusal, so
the two directions report the same fields the same way.

Bytes show while a connection lives, as in Istio's ztunnel: the splice keeps plain integer
counts (``SpliceProgress``) and one task per ztunnel (``run``) adds what every open
connection moved since the last pass to the byte counters each ``flush_interval``; the rest
is added when the connection ends, so the totals stay exact and nothing is counted twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_api.model import Service, Workload
from ambient_dataplane.drain import ActiveConnections
from ambient_dataplane.hbone import SpliceError, splice
from ambient_dataplane.hbone.splice import SpliceProgress
from ambient_dataplane.labels import NO_RESPONSE_FLAGS, ConnectionLabels, connection_labels
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.sockets import reset_on_close

Direction = Literal["inbound", "outbound"]

DEFAULT_FLUSH_INTERVAL = 1.0  # seconds between two reports of open connections' bytes
# The access line's error for a connection still open when the drain timed out.
ABORTED = "aborted: the drain timeout expired"


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


class _LiveBytes:
    """An open connection's byte counts, and how much of them the counters already show."""

    __slots__ = ("labels", "progress", "already_sent", "reported_sent", "reported_received")

    def __init__(self, labels: ConnectionLabels, already_sent: int) -> None:
        self.labels = labels
        self.progress = SpliceProgress()
        self.already_sent = already_sent
        self.reported_sent = 0
        self.reported_received = 0

    @property
    def sent(self) -> int:
        return self.already_sent + self.progress.a_to_b

    @property
    def received(self) -> int:
        return self.progress.b_to_a

    def unreported(self) -> tuple[int, int]:
        """The bytes moved since the last call (sent, received), now counted as reported."""
        sent, received = self.sent, self.received
        delta = (sent - self.reported_sent, received - self.reported_received)
        self.reported_sent, self.reported_received = sent, received
        return delta


class ConnectionTelemetry:
    """Counts connections and their bytes, and writes one structlog access line per
    connection."""

    def __init__(
        self,
        metrics: ZtunnelMetrics,
        connections: ActiveConnections,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self._metrics = metrics
        self._connections = connections
        self._flush_interval = flush_interval
        self._live: set[_LiveBytes] = set()
        self._log = structlog.get_logger("ztunnel.access")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report open connections' bytes every flush interval until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self._flush_interval)
            self.flush()

    def flush(self) -> None:
        """Add what each open connection moved since the last flush to the byte counters."""
        for live in self._live:
            sent, received = live.unreported()
            if sent or received:
                self._metrics.bytes_transferred(live.labels, sent, received)

    def _labels(
        self, record: ConnectionRecord, response_flags: str = NO_RESPONSE_FLAGS
    ) -> ConnectionLabels:
        return connection_labels(
            "destination" if record.direction == "inbound" else "source",
            record.source_workload,
            record.source_identity,
            record.destination_workload,
            record.destination_service,
            mtls=record.mtls,
            response_flags=response_flags,
        )

    async def carry(
        self,
        record: ConnectionRecord,
        downstream: trio.abc.HalfCloseableStream,
        upstream: trio.abc.HalfCloseableStream,
        *,
        already_sent: int = 0,
    ) -> None:
        """Splice an accepted connection (``downstream``: the side that opened it) until both
        sides are done, and report it: opened now, its bytes while they flow, closed with the
        access line at the end. ``already_sent``: bytes forwarded upstream before (early
        data); "sent" is always towards the destination.

        A connection that broke on one side, or that the drain timeout aborted, must not look
        complete on the other: its TCP sides are then reset when their owners close them
        (an HBONE side resets its stream itself when closed before both ends finished)."""
        live = _LiveBytes(self._labels(record), already_sent)
        self._metrics.connection_opened(live.labels)
        self._live.add(live)
        error: str | None = None
        try:
            with self._connections.abortable() as abort:
                await splice(downstream, upstream, live.progress)
            if abort.cancelled_caught:
                error = ABORTED
        except SpliceError as exc:
            error = exc.reason
        finally:
            self._live.discard(live)
        if error is not None:
            for side in (downstream, upstream):
                if isinstance(side, trio.SocketStream):
                    reset_on_close(side)
        sent, received = live.unreported()
        self._metrics.connection_closed(live.labels, sent=sent, received=received)
        if not self._log.is_enabled_for(logging.INFO):
            return  # the access line's fields are not worth building for nobody
        self._log.info(
            "connection complete" if error is None else "connection broken",
            **self._fields(record),
            bytes_sent=live.sent,
            bytes_recv=live.received,
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
