"""HBONE connection pool: CONNECT streams multiplexed on few mTLS connections per peer.

One pool key is (source identity, destination identity, source IP, destination address): a
connection is only ever reused for the same pair of identities and the same addresses, so a pod
IP reused by another workload (another identity) never inherits a stale connection, and a
connection that died is dropped instead of being handed out again.

Idle connections close after ``idle_timeout`` (Istio: 5 min), except that only a key's
oldest connection waits that long: the others a burst opened close after
``surplus_idle_timeout``, so the memory of a burst (thousands of tunnels over tens of
connections) goes back soon while one warm connection per peer stays.

A connection whose server drains (GOAWAY) takes no new streams: the pool dials a new one for
the next request, lets the streams on the old one finish, and forgets it when it closes (it
closes itself after its last stream). A CONNECT the server did not process (it raced the GOAWAY,
or was refused) is sent again on another connection instead of failing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_dataplane.hbone import DEFAULT_MAX_CONCURRENT_STREAMS, HboneClient, HboneConnectError
from ambient_dataplane.hbone.stream import HboneStream

log = structlog.get_logger()

# Times one open_stream sends a CONNECT again after the server did not process it; bounded so
# a server that refuses everything costs an error, not a loop.
_MAX_UNPROCESSED_RETRIES = 3


class PoolKey(NamedTuple):
    source_identity: SpiffeId
    destination_identity: SpiffeId
    source_ip: str | None  # bound as the local address when set
    destination_address: tuple[str, int]
    # In-pod capture: the source pod's network namespace, where the connection is dialled.
    # Part of the key so two pods never share a connection, even a pod recreated with the
    # same IP in a new namespace (Istio pools per source workload). None: the current one.
    source_netns: str | None = None


# Opens a connection for ``key`` whose reader task runs in the given nursery: TCP from
# key.source_ip to key.destination_address (from inside key.source_netns when set), TLS with
# key.source_identity's certificate, verifying the server is key.destination_identity --
# i.e. ambient_dataplane.hbone.connect(...).
ConnectFn = Callable[[PoolKey, trio.Nursery], Awaitable[HboneClient]]


class _PendingConnect:
    """One connection attempt per key; concurrent openers wait for it instead of dialing."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class HbonePool:
    """Hands out HboneStreams, opening connections only when the existing ones are full."""

    def __init__(
        self,
        connect_fn: ConnectFn,
        *,
        max_streams_per_connection: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        idle_timeout: float = 300.0,
        surplus_idle_timeout: float = 15.0,
    ) -> None:
        self._connect_fn = connect_fn
        self.max_streams_per_connection = max_streams_per_connection
        self.idle_timeout = idle_timeout
        self.surplus_idle_timeout = min(surplus_idle_timeout, idle_timeout)
        self._clients: dict[PoolKey, list[HboneClient]] = {}
        self._pending: dict[PoolKey, _PendingConnect] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the pool's connections; cancelling it closes them all."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def connections(self, key: PoolKey) -> list[HboneClient]:
        """The live connections for ``key`` (for tests, admin and metrics)."""
        return [client for client in self._clients.get(key, []) if not client.is_closed]

    def live_keys(self) -> list[PoolKey]:
        """The keys that have live connections (draining ones included until they close)."""
        return [key for key in list(self._clients) if self.connections(key)]

    @property
    def connection_count(self) -> int:
        return sum(len(self.connections(key)) for key in list(self._clients))

    async def open_stream(
        self, key: PoolKey, target: str | Sequence[tuple[str, str]],
        headers: Sequence[tuple[str, str]] = (),
    ) -> HboneStream:
        """A CONNECT stream over a pooled connection for ``key``; ``target`` is the authority
        or a whole connect_headers() block (see HboneClient.open_stream).

        Raises HboneConnectError for a non-200 answer, PeerIdentityError or OSError when a new
        connection cannot be established.
        """
        unprocessed = 0
        while True:
            client = self._pick(key)
            fresh = client is None
            if client is None:
                client = await self._connect(key)
                if client is None:
                    continue  # another task's connection appeared; pick again
            try:
                return await client.open_stream(target, headers)
            except HboneConnectError as exc:
                if exc.retryable and unprocessed < _MAX_UNPROCESSED_RETRIES:
                    # Draining (GOAWAY) or refused: the server did nothing with it. _pick skips
                    # a draining connection, so this goes to another one.
                    unprocessed += 1
                    log.debug("hbone_pool.retry_unprocessed", key=_describe(key),
                              reason=exc.reason, draining=client.is_draining)
                    continue
                if exc.status is not None or not client.is_closed:
                    raise
                self._drop(key, client)
                if fresh:
                    raise  # a connection we just made died at once: do not dial in a loop
                log.debug("hbone_pool.connection_died", key=_describe(key), reason=exc.reason)

    def _pick(self, key: PoolKey) -> HboneClient | None:
        clients = self._clients.get(key)
        if not clients:
            return None
        for client in list(clients):
            if client.is_closed:
                self._drop(key, client)
            elif client.is_draining:
                continue  # its streams finish; it closes itself after the last one
            elif (client.available_streams > 0
                  and client.active_streams < self.max_streams_per_connection):
                return client
        return None

    async def _connect(self, key: PoolKey) -> HboneClient | None:
        """Dial a new connection, or wait for the one in progress and return None."""
        pending = self._pending.get(key)
        if pending is not None:
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return None
        if self._nursery is None:
            raise RuntimeError("HbonePool.run is not running")
        pending = self._pending[key] = _PendingConnect()
        try:
            client: HboneClient = await self._nursery.start(self._connection, key)
            self._clients.setdefault(key, []).append(client)
            log.debug("hbone_pool.connected", key=_describe(key),
                      connections=len(self._clients[key]))
            return client
        except Exception as exc:
            pending.error = exc  # waiters fail the same way instead of dialing again
            raise
        finally:
            del self._pending[key]
            pending.done.set()

    async def _connection(
        self, key: PoolKey, *, task_status: trio.TaskStatus[HboneClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Lives as long as one pooled connection: its reader task, its idle timer, and the
        removal from the pool when it ends."""
        client: HboneClient | None = None
        try:
            async with trio.open_nursery() as nursery:
                client = await self._connect_fn(key, nursery)
                nursery.start_soon(self._close_when_idle, key, client)
                task_status.started(client)
                await client.wait_closed()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # connect_fn's own error, as the caller expects it
                raise group.exceptions[0] from None
            raise
        finally:
            if client is not None:
                self._drop(key, client)
                with trio.CancelScope(shield=True):
                    await client.aclose()

    async def _close_when_idle(self, key: PoolKey, client: HboneClient) -> None:
        while not client.is_closed:
            timeout = self._idle_timeout_of(key, client)
            deadline = client.last_used + timeout
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
            elif client.active_streams:
                await trio.sleep(timeout)  # busy: last_used moves when streams end
            else:
                log.debug("hbone_pool.idle_close", key=_describe(key))
                self._drop(key, client)
                await client.aclose()
                return

    def _idle_timeout_of(self, key: PoolKey, client: HboneClient) -> float:
        """The full idle timeout for the key's oldest connection, the surplus one for the
        rest (re-read on every wake-up: when the oldest goes, the next one inherits it)."""
        clients = self._clients.get(key)
        return self.idle_timeout if not clients or clients[0] is client else (
            self.surplus_idle_timeout
        )

    def _drop(self, key: PoolKey, client: HboneClient) -> None:
        clients = self._clients.get(key)
        if clients and client in clients:
            clients.remove(client)
            if not clients:
                del self._clients[key]


def _describe(key: PoolKey) -> str:
    host, port = key.destination_address
    return f"{key.source_identity} -> {key.destination_identity} at {host}:{port}"
