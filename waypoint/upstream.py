"""The waypoint's upstream client: HTTP/1.1 over pooled HBONE tunnels to chosen endpoints.

Each upstream "connection" is one HBONE CONNECT stream (``:authority = <pod ip>:<port>``) on a
pooled mTLS connection to the endpoint's ztunnel, with the waypoint's own identity as the
source. Idle HTTP/1.1 connections are kept per (tunnel key, authority) and reused; failures
come out as ``UpstreamError`` with the kind retry policies and response flags are based on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import h11
import structlog
import trio

from istiod_lite.api.identity import SpiffeId
from waypoint.http import HttpRequest, HttpResponse, sendable_headers, strip_hop_by_hop
from ztunnel.hbone import HboneConnectError, HboneStream, connect_headers, format_authority
from ztunnel.pool import HbonePool, PoolKey
from ztunnel.tls import PeerIdentityError

log = structlog.get_logger()

UpstreamErrorKind = Literal["connect-failure", "reset", "timeout", "protocol"]

_READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 1.0
# Methods whose requests carry a Content-Length even when empty (some servers insist).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


_REAP_INTERVAL = 0.5


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
    """One HTTP/1.1 client connection inside one HBONE stream."""

    stream: HboneStream
    protocol: h11.Connection
    idle_since: float = 0.0
    exchanges: int = 0


class _StaleConnection(Exception):
    """A connection failed before any response byte: the request may be sent again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Progress:
    received: bool = False
    chunks: list[bytes] = field(default_factory=list)


class HttpUpstream:
    """Sends buffered requests to endpoints over HBONE, keeping HTTP/1.1 connections alive."""

    def __init__(
        self,
        pool: HbonePool,
        source_identity: SpiffeId,
        source_ip: str,
        *,
        hbone_port: int = 15008,
        max_idle_per_endpoint: int = 8,
        idle_timeout: float = 60.0,
        max_response_header_bytes: int = 64 * 1024,
        max_response_body_bytes: int = 10 * 1024 * 1024,
    ) -> None:
        self._pool = pool
        self._source_identity = source_identity
        self._source_ip = source_ip
        self._hbone_port = hbone_port
        self._max_idle = max_idle_per_endpoint
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
        events = _request_events(request, target.authority, extra_headers)
        with trio.move_on_after(math.inf if timeout is None else max(timeout, 0.0)):
            return await self._send(events, request.method, target)
        raise UpstreamError("timeout", f"no complete response from {target.authority} "
                            f"within {timeout:g}s")

    async def _send(
        self, events: list[h11.Event], method: str, target: _Target
    ) -> HttpResponse:
        connection = await self._take_idle(target)
        if connection is not None:
            try:
                return await self._exchange(connection, events, method, target)
            except _StaleConnection as stale:
                log.debug("upstream.stale_connection_retried", authority=target.authority,
                          reason=stale.reason)
        connection = await self._open(target)
        try:
            return await self._exchange(connection, events, method, target)
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

    async def _release(self, target: _Target, connection: _Connection) -> None:
        connection.idle_since = trio.current_time()
        connections = self._idle.setdefault(target, [])
        connections.append(connection)
        evicted = connections[:-self._max_idle] if self._max_idle > 0 else list(connections)
        del connections[:len(evicted)]
        if not connections:
            del self._idle[target]
        for old in evicted:
            await _close(old, graceful=True)

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
        return _Connection(
            stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_header_bytes)
        )

    async def _exchange(
        self, connection: _Connection, events: list[h11.Event], method: str, target: _Target
    ) -> HttpResponse:
        """Request out, response in; the connection goes back to the idle list only when
        both sides finished the exchange cleanly (anything else closes it)."""
        reusable = completed = False
        progress = _Progress()
        protocol = connection.protocol
        try:
            data = b"".join(protocol.send(event) or b"" for event in events)
            connection.exchanges += 1
            try:
                await connection.stream.send_all(data)
                response = await self._read_response(connection, method, progress)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reason = f"connection to {target.authority} broke: {exc or type(exc).__name__}"
                if not progress.received:
                    raise _StaleConnection(reason) from None
                raise UpstreamError("reset", reason) from None
            completed = True
            reusable = protocol.our_state is h11.DONE and protocol.their_state is h11.DONE
            return response
        finally:
            with trio.CancelScope(shield=True):
                if reusable:
                    protocol.start_next_cycle()
                    await self._release(target, connection)
                else:  # a finished exchange on a closing connection ends cleanly
                    await _close(connection, graceful=completed)

    async def _read_response(
        self, connection: _Connection, method: str, progress: _Progress
    ) -> HttpResponse:
        protocol = connection.protocol
        head: h11.Response | None = None
        size = 0
        eof = False
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                if eof:  # h11 saw the end of the stream inside a message
                    raise self._ended_early(progress) from None
                raise UpstreamError("protocol", f"malformed response: {exc}") from None
            if event is h11.NEED_DATA:
                data = bytes(await connection.stream.receive_some(_READ_SIZE))
                if data:
                    progress.received = True
                else:
                    eof = True
                protocol.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue, 103 Early Hints: not forwarded
            elif isinstance(event, h11.Response):
                head = event
                declared = _declared_length(event)
                if declared is not None and declared > self._max_body_bytes and method != "HEAD":
                    raise UpstreamError("protocol", f"response body of {declared} bytes exceeds "
                                        f"{self._max_body_bytes}")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_body_bytes:
                    raise UpstreamError("protocol", "response body exceeds "
                                        f"{self._max_body_bytes} bytes")
                progress.chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None  # h11 orders Response before EndOfMessage
                headers = strip_hop_by_hop(
                    (name.decode("ascii"), value.decode("latin-1")) for name, value in head.headers
                )
                return HttpResponse(head.status_code, headers, b"".join(progress.chunks))
            else:  # ConnectionClosed
                raise self._ended_early(progress)

    @staticmethod
    def _ended_early(progress: _Progress) -> Exception:
        if not progress.received:
            return _StaleConnection("upstream closed the connection without responding")
        return UpstreamError("reset", "upstream closed the connection mid-response")

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
            keep = [c for c in connections if self._reusable(c, now)]
            expired += [c for c in connections if c not in keep]
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


def _request_events(
    request: HttpRequest, endpoint_authority: str, extra_headers: Sequence[tuple[str, str]]
) -> list[h11.Event]:
    """The request as h11 events: Host from the request's authority, its own headers minus
    hop-by-hop and framing, the extra headers, and a Content-Length for the body. Checked
    against a scratch h11 connection, so a request that cannot be written (a rewrite that
    produced a bad target, say) fails here as ``protocol`` before any connection is used."""
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
        events: list[h11.Event] = [h11.Request(
            method=request.method.encode("ascii"),
            target=request.target.encode("ascii"),
            headers=[(name.encode("ascii"), value.encode("latin-1")) for name, value in kept],
        )]
        if request.body:
            events.append(h11.Data(data=request.body))
        events.append(h11.EndOfMessage())
        scratch = h11.Connection(h11.CLIENT)
        for event in events:
            scratch.send(event)
    except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
        raise UpstreamError("protocol", f"request cannot be sent: {exc}") from None
    return events


def _declared_length(response: h11.Response) -> int | None:
    for name, value in response.headers:
        if name == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


__all__ = ["HttpUpstream", "UpstreamError", "UpstreamErrorKind"]
