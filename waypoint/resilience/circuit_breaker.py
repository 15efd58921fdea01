"""The circuit breaker of a DestinationRule's ``connectionPool`` (an overflow is answered 503
``UO``), and ``wait_dispatched``, the one async helper: a Trio driver waits there for a
queued request's turn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import StrEnum

import trio

from ambient_api.l7 import ConnectionPool
from waypoint.resilience.permit import Permit


class OverflowReason(StrEnum):
    MAX_REQUESTS = "max_requests"
    MAX_PENDING_REQUESTS = "max_pending_requests"


class RequestPermit(Permit):
    """An admitted request. It is *dispatched* when it may use an upstream connection, or
    *pending* (queued, FIFO) until a dispatched request of the same service finishes."""

    __slots__ = ("_dispatched", "_callbacks")

    def __init__(self, on_release: Callable[[Permit], None], *, dispatched: bool) -> None:
        super().__init__(on_release)
        self._dispatched = dispatched
        self._callbacks: list[Callable[[], None]] = []

    @property
    def dispatched(self) -> bool:
        return self._dispatched

    def on_dispatch(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this permit is dispatched (at once if it already is)."""
        if self._dispatched:
            callback()
        elif not self.released:
            self._callbacks.append(callback)

    def _dispatch(self) -> None:
        self._dispatched = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class CircuitBreaker:
    """A destination service's circuit breaker (DestinationRule ``connectionPool``).

    The model, for HTTP/1.1 upstreams where a connection carries one request at a time:
    - ``max_requests`` bounds admitted requests (dispatched + pending);
    - at most ``max_connections`` requests are *dispatched* (each busy on a connection);
      later ones are *pending*, waiting for a dispatched one to finish, as Envoy queues
      requests when its pool may not open another connection;
    - ``max_pending_requests`` bounds that queue.
    A request over a limit is refused: the proxy answers 503 with flag ``UO``. Connections
    themselves are counted through ``connection_opened`` leases so the pool can ask
    ``can_open_connection`` and the admin dump can show them. None means unlimited."""

    def __init__(self, pool: ConnectionPool | None) -> None:
        self._pool = _validated_pool(pool)
        self._dispatched = 0
        self._pending: deque[RequestPermit] = deque()
        self._connections = 0
        self.overflows: dict[str, int] = {reason.value: 0 for reason in OverflowReason}
        self.connection_overflows = 0

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    @property
    def dispatched_requests(self) -> int:
        return self._dispatched

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    @property
    def active_requests(self) -> int:
        """Admitted requests, dispatched plus pending (what sizes the retry budget)."""
        return self._dispatched + len(self._pending)

    @property
    def open_connections(self) -> int:
        return self._connections

    def reconfigure(self, pool: ConnectionPool | None) -> None:
        """Apply a changed connectionPool keeping the counts; a raised limit dispatches
        waiting requests at once."""
        self._pool = _validated_pool(pool)
        self._dispatch_waiting()

    def try_acquire_request(self) -> RequestPermit | None:
        """Admit one request, or None on overflow (see ``overflows`` for which limit).
        Release the permit when the request is done, whatever happened."""
        limits = self._pool
        if limits.max_requests is not None and self.active_requests >= limits.max_requests:
            self.overflows[OverflowReason.MAX_REQUESTS] += 1
            return None
        if self._can_dispatch():
            self._dispatched += 1
            return RequestPermit(self._release_request, dispatched=True)
        if (
            limits.max_pending_requests is not None
            and len(self._pending) >= limits.max_pending_requests
        ):
            self.overflows[OverflowReason.MAX_PENDING_REQUESTS] += 1
            return None
        permit = RequestPermit(self._release_request, dispatched=False)
        self._pending.append(permit)
        return permit

    def release_request(self, permit: Permit) -> None:
        """The same as ``permit.release()``: idempotent, so counts never go negative."""
        permit.release()

    def connection_opened(self) -> Permit:
        """Count an upstream connection; release the returned lease when it closes. Over
        ``max_connections`` the connection is still counted (Envoy lets a chosen host have
        one) and ``connection_overflows`` grows."""
        max_connections = self._pool.max_connections
        if max_connections is not None and self._connections >= max_connections:
            self.connection_overflows += 1
        self._connections += 1
        return Permit(self._connection_closed)

    def connection_closed(self, lease: Permit) -> None:
        """The same as ``lease.release()`` (idempotent)."""
        lease.release()

    def can_open_connection(self) -> bool:
        max_connections = self._pool.max_connections
        return max_connections is None or self._connections < max_connections

    def should_close_connection(self, requests_on_connection: int) -> bool:
        """Whether a connection that has carried ``requests_on_connection`` requests must
        not be reused (``maxRequestsPerConnection``; 1 disables keep-alive, 0 or None is
        unlimited, as in Istio)."""
        limit = self._pool.max_requests_per_connection
        if not limit:
            return False
        return requests_on_connection >= limit

    def snapshot(self) -> dict[str, object]:
        """Counters for the admin config dump."""
        return {
            "max_connections": self._pool.max_connections,
            "max_pending_requests": self._pool.max_pending_requests,
            "max_requests": self._pool.max_requests,
            "max_requests_per_connection": self._pool.max_requests_per_connection,
            "dispatched_requests": self._dispatched,
            "pending_requests": len(self._pending),
            "open_connections": self._connections,
            "overflows": dict(self.overflows),
            "connection_overflows": self.connection_overflows,
        }

    def _can_dispatch(self) -> bool:
        # Pending requests are dispatched as soon as a slot frees (release, reconfigure), so
        # a free slot means an empty queue and a new request cannot jump it.
        max_connections = self._pool.max_connections
        return max_connections is None or self._dispatched < max_connections

    def _release_request(self, permit: Permit) -> None:
        assert isinstance(permit, RequestPermit)
        if permit.dispatched:
            self._dispatched -= 1
            self._dispatch_waiting()
        else:
            self._pending.remove(permit)

    def _dispatch_waiting(self) -> None:
        max_connections = self._pool.max_connections
        while self._pending and (max_connections is None or self._dispatched < max_connections):
            permit = self._pending.popleft()
            self._dispatched += 1
            permit._dispatch()

    def _connection_closed(self, _lease: Permit) -> None:
        self._connections -= 1


def _validated_pool(pool: ConnectionPool | None) -> ConnectionPool:
    pool = pool or ConnectionPool()
    for name in ("max_connections", "max_pending_requests", "max_requests"):
        value = getattr(pool, name)
        if value is not None and value < 1:
            raise ValueError(f"connectionPool {name} must be >= 1 or unset, got {value}")
    per_connection = pool.max_requests_per_connection
    if per_connection is not None and per_connection < 0:
        raise ValueError(
            f"connectionPool max_requests_per_connection must be >= 0, got {per_connection}"
        )
    return pool


async def wait_dispatched(permit: RequestPermit) -> None:
    """Wait until a pending request may use a connection. On cancellation the caller's
    ``permit.release()`` takes it out of the queue."""
    if permit.dispatched:
        return
    if permit.released:
        raise RuntimeError("wait_dispatched on a released request permit")
    ready = trio.Event()
    permit.on_dispatch(ready.set)
    await ready.wait()
