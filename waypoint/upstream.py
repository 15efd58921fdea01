"""The waypoint's upstream client: HTTP/1.1 over pooled HBONE tunnels to chosen endpoints.

Each upstream "connection" is one HBONE CONNECT stream (``:authority = <pod ip>:<port>``) on a
pooled mTLS connection to the endpoint's ztunnel, with the waypoint's own identity as the
source. Idle HTTP/1.1 connections are kept per (tunnel key, authority) and reused; failures
come out as ``UpstreamError`` with the kind retry policies and response flags are based on.

The pool grows to what the concurrency needs and shrinks by idle timeout, like Envoy's: a
connection that finished its exchange stays idle (up to a generous cap per target) rather
than being closed, so a steady load of N concurrent requests keeps N tunnels instead of
opening one per request above a small idle limit. What bounds the number of connections is
the concurrency itself, which the circuit breaker bounds per service (a request is only
dispatched while fewer than ``maxConnections`` are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_dataplane.hbone import (
    HboneConnectError,
    HboneStream,
    connect_headers,
    format_authority,
)
from ambient_dataplane.hbone.pool import HbonePool, PoolKey
from ambient_dataplane.tls import PeerIdentityError
from waypoint.http import HttpRequest, HttpResponse, sendable_headers, strip_hop_by_hop
from waypoint.http.client_h1 import Response, ResponseError, ResponseParser, render_request

log = structlog.get_logger()

UpstreamErrorKind = Literal["connect-failure", "reset", "timeout", "protocol"]

_READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 1.0
# Methods whose requests carry a Content-Length even when empty (some servers insist).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


_REAP_INTERVAL = 0.5
# Idle connections kept per target: Envoy's default circuit-breaker maxConnections, a safety
# cap only (the concurrency, bounded by the circuit breaker, is what sizes the pool).
DEFAULT_MAX_IDLE_PER_TARGET = 1024


class UpstreamError(Exception):
    """The upstream exchange failed; ``kind`` drives retries and response flags.

    ``connect_status`` is the HBONE CONNECT answer (401, 503, ...) when one came back.
    """

    def __init__(
        self, kind: UpstreamErrorKind, reason: str, *, connect_status: int | None = None
    ) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind: UpstreamErrorKind = kind
        self.reason = reason
        self.connect_status = connect_status


class _Target(NamedTuple):
    """What an idle connection can be reused for: the same tunnel key and inner target."""

    key: PoolKey
    authority: str
    service_host: str | None


@dataclass
class _Connection:
    """One HTTP/1.1 client connection inside one HBONE stream; between exchanges it holds
    no parser state (a connection is kept only when nothing followed the last response)."""

    stream: HboneStream
    idle_since: float = 0.0


class _StaleConnection(Exception):
    """A connection failed before any response byte: the request may be sent again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HttpUpstream:
    """Sends buffered requests to endpoints over HBONE, keeping HTTP/1.1 connections alive."""

    def __init__(
        self,
        pool: HbonePool,
        source_identity: SpiffeId,
        source_ip: str,
        *,
        hbone_port: int = 15008,
        max_idle_per_target: int = DEFAULT_MAX_IDLE_PER_TARGET,
        idle_timeout: float = 60.0,
        max_response_header_bytes: int = 64 * 1024,
        max_response_body_bytes: int = 10 * 1024 * 1024,
    ) -> None:
        self._pool = pool
        self._source_identity = source_identity
        self._source_ip = source_ip
        self._hbone_port = hbone_port
        self._max_idle = max_idle_per_target
        self._idle_timeout = idle_timeout
        self._max_header_bytes = max_response_header_bytes
        self._max_body_bytes = max_response_body_bytes
        self._idle: dict[_Target, list[_Connection]] = {}
        self.connections_opened = 0  # for tests, admin and metrics

    @property
    def idle_count(self) -> int:
        return sum(len(connections) for connections in self._idle.values())

    async def send(
        self,
        request: HttpRequest,
        endpoint_ip: str,
        port: int,
        endpoint_identity: SpiffeId,
        *,
        timeout: float | None,
        extra_headers: Sequence[tuple[str, str]] = (),
        service_host: str | None = None,
    ) -> HttpResponse:
        """One try: the request to ``endpoint_ip:port`` (verified as ``endpoint_identity``),
        the whole response back. ``timeout`` bounds everything (connect included); None means
        no bound. ``extra_headers`` are appended to the request's (e.g. x-forwarded-for);
        ``service_host`` travels in the CONNECT's ``forwarded: host=`` for the destination
        ztunnel's telemetry. Raises UpstreamError.

        A reused idle connection that fails before any response byte arrived (the server
        closed it as we picked it: the keep-alive race) is retried once on a fresh one. The
        request may have reached the server in that case, even a non-idempotent one; this
        is the same trade-off HTTP clients commonly make for keep-alive races.
        """
        target = _Target(
            PoolKey(self._source_identity, endpoint_identity, self._source_ip,
                    (endpoint_ip, self._hbone_port)),
            format_authority(endpoint_ip, port),
            service_host,
        )
        # Written out once, before any connection is used: a request that cannot be sent
        # (a rewrite that produced a bad target, say) fails here.
        data = _request_bytes(request, target.authority, extra_headers)
        if timeout is None:
            return await self._send(data, request.method, target)
        with trio.move_on_after(max(timeout, 0.0)):
            return await self._send(data, request.method, target)
        raise UpstreamError("timeout", f"no complete response from {target.authority} "
                            f"within {timeout:g}s")

    async def _send(self, data: bytes, method: str, target: _Target) -> HttpResponse:
        connection = await self._take_idle(target)
        if connection is not None:
            try:
                return await self._exchange(connection, data, method, target)
            except _StaleConnection as stale:
                log.debug("upstream.stale_connection_retried", authority=target.authority,
                          reason=stale.reason)
        connection = await self._open(target)
        try:
            return await self._exchange(connection, data, method, target)
        except _StaleConnection as stale:
            raise UpstreamError("reset", stale.reason) from None

    async def _take_idle(self, target: _Target) -> _Connection | None:
        """The most recently used idle connection (the least likely to be stale)."""
        connections = self._idle.get(target, [])
        found: _Connection | None = None
        expired: list[_Connection] = []
        while connections and found is None:
            connection = connections.pop()
            if self._reusable(connection, trio.current_time()):
                found = connection
            else:
                expired.append(connection)
        if not connections:
            self._idle.pop(target, None)
        for connection in expired:
            await _close(connection, graceful=True)
        return found

    def _release(self, target: _Target, connection: _Connection) -> list[_Connection]:
        """Keep ``connection`` idle; returns the oldest ones over the cap, to be closed."""
        connection.idle_since = trio.current_time()
        connections = self._idle.setdefault(target, [])
        connections.append(connection)
        evicted = connections[:-self._max_idle] if self._max_idle > 0 else list(connections)
        del connections[:len(evicted)]
        if not connections:
            del self._idle[target]
        return evicted

    async def _open(self, target: _Target) -> _Connection:
        key = target.key
        via = f"{key.destination_address[0]}:{key.destination_address[1]}"
        headers = connect_headers(
            target.authority, forwarded_for=self._source_ip, service_host=target.service_host
        )
        try:
            stream = await self._pool.open_stream(key, headers)
        except HboneConnectError as exc:
            if exc.status is None:
                reason = f"HBONE to {via} for {target.authority} failed: {exc.reason}"
            else:
                reason = (f"HBONE CONNECT {target.authority} via {via} answered "
                          f"{exc.status}: {exc.reason}")
            raise UpstreamError("connect-failure", reason, connect_status=exc.status) from None
        except PeerIdentityError as exc:
            raise UpstreamError("connect-failure", f"mTLS with {via}: {exc.reason}") from None
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            detail = str(exc) or type(exc).__name__
            raise UpstreamError("connect-failure", f"connecting to {via}: {detail}") from None
        self.connections_opened += 1
        return _Connection(stream)

    async def _exchange(
        self, connection: _Connection, data: bytes, method: str, target: _Target
    ) -> HttpResponse:
        """Request out, response in; the connection goes back to the idle list only when
        the response was complete, kept alive and followed by nothing (anything else closes
        it)."""
        reusable = completed = False
        parser = ResponseParser(method, max_head_bytes=self._max_header_bytes,
                                max_body_bytes=self._max_body_bytes)
        try:
            try:
                await connection.stream.send_all(data)
                response = await _read_response(connection.stream, parser)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reason = f"connection to {target.authority} broke: {exc or type(exc).__name__}"
                if not parser.received:
                    raise _StaleConnection(reason) from None
                raise UpstreamError("reset", reason) from None
            completed = True
            reusable = response.reusable
            return HttpResponse(response.status, strip_hop_by_hop(response.headers),
                                response.body)
        finally:
            if reusable:
                for old in self._release(target, connection):
                    await _close(old, graceful=True)
            else:  # a finished exchange on a closing connection ends cleanly
                await _close(connection, graceful=completed)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Optional: close idle connections as they expire (otherwise that happens on the
        next send() to the same target); closes them all when cancelled."""
        task_status.started()
        try:
            while True:
                # Often enough that a draining peer (GOAWAY) sees our idle tunnels go promptly.
                await trio.sleep(min(max(self._idle_timeout / 2, 0.01), _REAP_INTERVAL))
                await self._expire_idle()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    def _reusable(self, connection: _Connection, now: float) -> bool:
        """Idle for less than the idle timeout, on an HBONE connection that is not draining
        (its peer sent GOAWAY: a new tunnel goes over a new connection instead)."""
        return (now - connection.idle_since < self._idle_timeout
                and not connection.stream.connection_draining)

    async def _expire_idle(self) -> None:
        now = trio.current_time()
        expired: list[_Connection] = []
        for target, connections in list(self._idle.items()):
            keep: list[_Connection] = []
            for connection in connections:
                (keep if self._reusable(connection, now) else expired).append(connection)
            if keep:
                self._idle[target] = keep
            else:
                del self._idle[target]
        for connection in expired:
            await _close(connection, graceful=True)

    async def aclose(self) -> None:
        """Close every idle connection (ending each tunnel cleanly)."""
        idle = [connection for connections in self._idle.values() for connection in connections]
        self._idle.clear()
        for connection in idle:
            await _close(connection, graceful=True)


async def _close(connection: _Connection, *, graceful: bool) -> None:
    """End a connection's tunnel: half-close first when it is idle (a clean end for the
    server), straight to aclose (RST_STREAM CANCEL) when it is mid-exchange or broken."""
    stream = connection.stream
    with trio.CancelScope(shield=True):
        if graceful:
            with trio.move_on_after(_CLOSE_TIMEOUT), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await stream.send_eof()
        await stream.aclose()


async def _read_response(stream: HboneStream, parser: ResponseParser) -> Response:
    """Feed the parser until the response is complete. A stream that ends before any byte
    came back is stale (``_StaleConnection``: the request may be sent again)."""
    while True:
        try:
            response = parser.response()
        except ResponseError as error:
            if not error.incomplete:
                raise UpstreamError("protocol", f"malformed response: {error.reason}"
                                    ) from None
            if not parser.received:
                raise _StaleConnection("upstream closed the connection without responding"
                                       ) from None
            raise UpstreamError("reset", "upstream closed the connection mid-response"
                                ) from None
        if response is not None:
            return response
        parser.feed(bytes(await stream.receive_some(_READ_SIZE)))


def _request_bytes(
    request: HttpRequest, endpoint_authority: str, extra_headers: Sequence[tuple[str, str]]
) -> bytes:
    """The request on the wire: Host from the request's authority, its own headers minus
    hop-by-hop and framing, the extra headers, and a Content-Length for the body. Raises
    ``protocol`` for a method or target that cannot be written."""
    headers: list[tuple[str, str]] = [("host", request.authority or endpoint_authority)]
    headers += [
        (name.lower(), value) for name, value in strip_hop_by_hop(request.headers)
        if name.lower() not in ("host", "content-length")
    ]
    headers += [(name.lower(), value) for name, value in extra_headers]
    if request.body or request.method in _BODY_METHODS:
        headers.append(("content-length", str(len(request.body))))
    kept, dropped = sendable_headers(headers)
    if dropped:
        log.warning("upstream.request_headers_dropped", names=dropped)
    try:
        return render_request(request.method, request.target, kept, request.body)
    except ValueError as exc:
        raise UpstreamError("protocol", f"request cannot be sent: {exc}") from None


__all__ = ["HttpUpstream", "UpstreamError", "UpstreamErrorKind"]
