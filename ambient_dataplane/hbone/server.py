"""HBONE server: one task per CONNECT stream, the handler decides the answer.

Drain: given an ``ambient_dataplane.drain.Drain`` (explicitly, or the one of the
ActiveConnections that tracks the serving task), a connection answers its start with
GOAWAY(NO_ERROR): the tunnels already open run to completion, CONNECTs the client sent after it
are refused with REFUSED_STREAM (the client's pool retries them on a new connection), and the
connection closes as soon as it has no tunnel left, so an idle pooled connection ends at once.

Hostile clients (``ConnectionLimits``, besides the session's own bounds): the client's preface
must arrive within ``preface_timeout`` of the handshake (else GOAWAY(PROTOCOL_ERROR)), and a
connection without tunnels for ``idle_timeout`` is drained like above. A CONNECT the client
resets before the handler answered costs little: its handler does not start if the reset came
in the same read, and is cancelled at once otherwise (no upstream connect left running).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import h2.errors
import h2.events
import h2.exceptions
import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_dataplane.drain import Drain, current_drain
from ambient_dataplane.hbone.errors import HboneRejection
from ambient_dataplane.hbone.limits import DEFAULT_LIMITS, ConnectionLimits
from ambient_dataplane.hbone.protocol import (
    DEFAULT_MAX_CONCURRENT_STREAMS,
    REASON_HEADER,
    ConnectRequest,
    parse_connect,
)
from ambient_dataplane.hbone.session import H2Session
from ambient_dataplane.hbone.stream import HboneStream
from ambient_dataplane.tls import (
    PeerIdentityError,
    TlsConnection,
    TlsStream,
    check_trust_domain,
    mutual_handshake,
    peer_identity,
)

log = structlog.get_logger()

_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class ConnectionInfo:
    """What the server knows about the connection a stream arrived on (for policy)."""

    peer_identity: SpiffeId | None = None
    peer_address: tuple[str, int] | None = None
    local_address: tuple[str, int] | None = None


class HboneResponder:
    """The handler's way to answer one CONNECT: exactly one of accept() or reject()."""

    def __init__(self, session: H2Session, stream: HboneStream, connection: ConnectionInfo):
        self._session = session
        self._stream = stream
        self.connection = connection
        self.status: int | None = None

    @property
    def responded(self) -> bool:
        return self.status is not None

    async def accept(self, headers: Sequence[tuple[str, str]] = ()) -> HboneStream:
        """Answer 200 (only after policy and the upstream connect succeeded) -> the tunnel."""
        self._respond(200, [(":status", "200"), *headers], end_stream=False)
        await self._session.flush()
        return self._stream

    async def reject(self, status: int, reason: str = "") -> None:
        """Answer a non-2xx status and end the stream; ``reason`` travels in REASON_HEADER."""
        if not 300 <= status <= 599:
            raise ValueError(f"reject needs a 3xx-5xx status, got {status}")
        headers = [(":status", str(status))]
        if reason:
            headers.append((REASON_HEADER, _header_safe(reason)))
        self._respond(status, headers, end_stream=True)
        self._stream._local_ended = True
        await self._session.flush_quietly()

    def _respond(self, status: int, headers: list[tuple[str, str]], *, end_stream: bool) -> None:
        if self.status is not None:
            raise RuntimeError(f"stream {self._stream.stream_id} was already answered")
        if self._stream.broken_reason is not None:
            raise trio.BrokenResourceError(self._stream.broken_reason)
        self.status = status
        self._stream.answered = True
        self._stream.cancel_when_broken(None)  # the tunnel's own code handles breaks now
        self._session.conn.send_headers(
            self._stream.stream_id,
            [(name.encode(), value.encode()) for name, value in headers],
            end_stream=end_stream,
        )


ConnectHandler = Callable[[ConnectRequest, HboneResponder], Awaitable[None]]


class _ServerConnection:
    """One client's connection: the session does the h2 bookkeeping, this answers malformed
    CONNECTs itself and runs the handler for each valid one in a task of its own."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        handler: ConnectHandler,
        nursery: trio.Nursery,
        connection: ConnectionInfo,
        max_concurrent_streams: int,
        limits: ConnectionLimits,
    ) -> None:
        self.session = H2Session(
            transport, client_side=False, max_concurrent_streams=max_concurrent_streams,
            on_request=self._on_request, limits=limits,
        )
        self._connection = connection
        self._handler = handler
        self._nursery = nursery

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        session = self.session
        stream_id = event.stream_id
        drained_after = session.goaway_sent_last_stream_id
        if drained_after is not None and stream_id > drained_after:
            # Sent before the client read our GOAWAY: not processed, so it may go elsewhere.
            session.log.debug("hbone.stream_refused_draining", stream=stream_id)
            # The client may have reset it already in the same read (h2 reports that event
            # after this one): then there is nothing left to answer.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                session.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers = [(bytes(name), bytes(value)) for name, value in event.headers or ()]
        try:
            request = parse_connect(headers)
        except HboneRejection as rejection:
            session.log.info(
                "hbone.request_rejected", stream=stream_id, status=rejection.status,
                reason=rejection.reason, peer=str(self._connection.peer_identity),
            )
            with contextlib.suppress(h2.exceptions.StreamClosedError):  # reset already, as above
                session.conn.send_headers(
                    stream_id,
                    [(b":status", str(rejection.status).encode()),
                     (REASON_HEADER.encode(), _header_safe(rejection.reason).encode())],
                    end_stream=True,
                )
                if event.stream_ended is None:
                    session.conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            return
        stream = session.new_stream(stream_id)
        if event.stream_ended is not None:
            stream._on_remote_end()
        self._nursery.start_soon(self._run_handler, request, stream)

    async def _run_handler(self, request: ConnectRequest, stream: HboneStream) -> None:
        session = self.session
        if stream.broken_reason is not None:
            # Reset in the read that opened it (a rapid reset): no handler, no upstream.
            await stream.aclose()
            return
        responder = HboneResponder(session, stream, self._connection)
        try:
            with trio.CancelScope() as unanswered:
                stream.cancel_when_broken(unanswered)  # until the answer (see _respond)
                await self._handler(request, responder)
            if unanswered.cancelled_caught:
                session.log.debug("hbone.stream_reset_before_answer", stream=stream.stream_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.log.debug("hbone.stream_broken", stream=stream.stream_id, error=str(exc))
        except Exception:
            session.log.exception("hbone.handler_failed", stream=stream.stream_id,
                                  authority=request.authority)
        finally:
            if (not responder.responded and stream.broken_reason is None
                    and not session.is_closed):
                with trio.CancelScope(shield=True):
                    await responder.reject(503, "handler gave no answer")
            await stream.aclose()


async def serve_hbone(
    stream: trio.abc.Stream,
    handler: ConnectHandler,
    *,
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    connection: ConnectionInfo | None = None,
    drain: Drain | None = None,
    limits: ConnectionLimits = DEFAULT_LIMITS,
) -> None:
    """Serve HBONE on an established (TLS) stream until the peer goes away, or until a drain
    finished it (GOAWAY, then closed once the last tunnel ended); ``limits`` bound what the
    client may cost (the defaults are Envoy's where it has one).

    ``drain`` defaults to ``current_drain()``: the drain of the ActiveConnections that tracks
    this connection, so listeners need not pass it through. Peer faults (garbage, protocol
    errors, resets) are logged and end at most this connection; handler exceptions end only
    their own stream. The stream is closed on return.
    """
    if drain is None:
        drain = current_drain()
    info = connection or ConnectionInfo()
    async with trio.open_nursery() as nursery:
        session = _ServerConnection(
            stream, handler, nursery, info, max_concurrent_streams, limits
        ).session
        nursery.start_soon(_close_when_silent, session, limits)
        if drain is not None and drain.started:
            # Before the first read: a CONNECT already on the wire is then refused, never run.
            session.begin_drain()
        elif drain is not None:
            nursery.start_soon(_drain_when_told, session, drain)
        try:
            await session.run()
        finally:
            # The connection is gone: tunnels on it cannot carry anything any more.
            nursery.cancel_scope.cancel()
            if session.closed_reason not in (None, "peer closed the connection"):
                session.log.info("hbone.connection_closed", reason=session.closed_reason,
                                 peer=str(info.peer_identity))
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await stream.aclose()


async def _drain_when_told(session: H2Session, drain: Drain) -> None:
    await drain.wait()
    session.begin_drain()


async def _close_when_silent(session: H2Session, limits: ConnectionLimits) -> None:
    """Close a connection whose client never sent its preface; drain one left idle.

    An mTLS handshake proves who the client is, not that it will use what it opened: without
    these, each connection a client opens and forgets holds a socket and its buffers until
    the client leaves. PINGs do not count as use (as in Envoy)."""
    with trio.move_on_after(limits.preface_timeout):
        await session.preface_received.wait()
    if not session.preface_received.is_set():
        if not session.is_closed:
            session.log.info("hbone.preface_timeout", timeout=limits.preface_timeout)
            await session.close(
                h2.errors.ErrorCodes.PROTOCOL_ERROR,
                debug=f"no HTTP/2 preface within {limits.preface_timeout}s",
            )
        return
    while not session.is_closed and not session.draining:
        deadline = session.last_used + limits.idle_timeout
        if trio.current_time() >= deadline:
            if not session.streams:
                session.log.info("hbone.idle_timeout", timeout=limits.idle_timeout)
                session.begin_drain()
                return
            deadline = trio.current_time() + limits.idle_timeout  # busy: look again later
        with trio.move_on_at(deadline):
            await session.closed_event.wait()


async def accept_tls(
    tcp_stream: trio.SocketStream,
    ssl_context: ssl.SSLContext,
    *,
    accepted_trust_domains: Collection[str] | None = None,
    handshake_timeout: float = _HANDSHAKE_TIMEOUT,
) -> tuple[TlsStream, SpiffeId]:
    """Server handshake plus the HBONE checks (ALPN h2, SPIFFE id, trust domain).

    Raises PeerIdentityError with the reason on any failure (the TCP stream is then closed).
    """
    tls = TlsStream(tcp_stream, ssl_context, server_side=True)

    def check_client(connection: TlsConnection) -> SpiffeId:
        identity = peer_identity(connection)
        if accepted_trust_domains is not None:
            check_trust_domain(identity, accepted_trust_domains)
        return identity

    identity = await mutual_handshake(tls, handshake_timeout, check_client, "with a client")
    return tls, identity


async def serve_hbone_tls(
    tcp_stream: trio.SocketStream,
    ssl_context: ssl.SSLContext,
    handler: ConnectHandler,
    *,
    accepted_trust_domains: Collection[str] | None = None,
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    handshake_timeout: float = _HANDSHAKE_TIMEOUT,
    drain: Drain | None = None,
    limits: ConnectionLimits = DEFAULT_LIMITS,
) -> None:
    """A trio.serve_tcp handler: mTLS handshake, identity checks, then serve_hbone (``drain``
    and ``limits`` as there).

    Never raises for anything the peer does; refused handshakes are logged with the reason.
    """
    peer_address = _address(tcp_stream, peer=True)
    local_address = _address(tcp_stream, peer=False)
    try:
        tls, identity = await accept_tls(
            tcp_stream, ssl_context, accepted_trust_domains=accepted_trust_domains,
            handshake_timeout=handshake_timeout,
        )
    except PeerIdentityError as exc:
        log.warning("hbone.handshake_refused", peer=peer_address, local=local_address,
                    reason=exc.reason)
        return
    try:
        await serve_hbone(
            tls, handler, max_concurrent_streams=max_concurrent_streams,
            connection=ConnectionInfo(identity, peer_address, local_address), drain=drain,
            limits=limits,
        )
    except Exception:
        # Only a bug can get here; it must not take the listener (and every peer) down.
        log.exception("hbone.connection_failed", peer=peer_address, local=local_address)


def _address(stream: trio.SocketStream, *, peer: bool) -> tuple[str, int] | None:
    try:
        name = stream.socket.getpeername() if peer else stream.socket.getsockname()
    except OSError:
        return None
    return (str(name[0]), int(name[1]))


def _header_safe(text: str) -> str:
    """Header values must be visible ASCII; reasons are for humans, so degrade gracefully."""
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return cleaned[:256]
