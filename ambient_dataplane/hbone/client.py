"""HBONE client: CONNECT streams multiplexed on one mTLS HTTP/2 connection.

When the server drains (GOAWAY with NO_ERROR) the client keeps its processed streams running,
opens no new ones (``is_draining``; open_stream raises a ``retryable`` HboneConnectError, as it
does for streams the server refused), and closes the connection once its last stream ended.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import h2.exceptions
import trio
from hpack import Encoder, NeverIndexedHeaderTuple

from ambient_api.identity import SpiffeId
from ambient_dataplane.hbone.errors import HboneConnectError
from ambient_dataplane.hbone.protocol import (
    DEFAULT_MAX_CONCURRENT_STREAMS,
    REASON_HEADER,
    UNIQUE_PER_CONNECTION_HEADERS,
    reason_phrase,
)
from ambient_dataplane.hbone.session import H2Session
from ambient_dataplane.hbone.stream import HboneStream
from ambient_dataplane.tls import TlsStream, mutual_handshake, verify_peer

_CONNECT_TIMEOUT = 10.0

# Opens the TCP connection to (host, port) for connect_tls: how a caller makes the socket
# somewhere else than in the current network namespace (ztunnel's in-pod mode dials from
# inside the source pod's namespace, with its bypass mark).
SocketOpener = Callable[[str, int], Awaitable[trio.SocketStream]]


class PlainLiteralEncoder(Encoder):
    """HPACK without Huffman coding: string literals go out as they are (valid HPACK, RFC
    7541 section 5.2; decoders must accept both).

    hpack's Huffman coder is pure Python and h2 always asks for it. A CONNECT's literals are
    the few headers unique to one tunnel (forwarded, traceparent: ~80 bytes) plus, once per
    connection, the ones that then stay indexed; Huffman saves ~20-30 bytes of them but costs
    an encode here and a decode on the peer per string, a visible share of a short tunnel's
    CPU on both ends (bench ``churn``)."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class HboneClient:
    """One HTTP/2 connection to a peer's 15008; run() must be running for streams to work."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        max_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        peer_identity: SpiffeId | None = None,
    ) -> None:
        self._session = H2Session(transport, client_side=True, max_concurrent_streams=max_streams)
        self._session.conn.encoder = PlainLiteralEncoder()
        self.max_streams = max_streams
        self.peer_identity = peer_identity
        self._started = False

    @property
    def is_closed(self) -> bool:
        return self._session.is_closed

    @property
    def closed_reason(self) -> str | None:
        return self._session.closed_reason

    @property
    def active_streams(self) -> int:
        return len(self._session.streams)

    @property
    def is_draining(self) -> bool:
        """The server sent GOAWAY: streams in progress continue, new ones go elsewhere."""
        return self._session.draining

    @property
    def available_streams(self) -> int:
        """New streams this connection can take now (our cap and the server's setting)."""
        if self.is_closed or self.is_draining:
            return 0
        limit = min(self.max_streams, self._session.conn.remote_settings.max_concurrent_streams)
        return max(0, limit - self.active_streams)

    @property
    def last_used(self) -> float:
        """trio.current_time() of the last stream opened or finished."""
        return self._session.last_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the preface and read until the connection ends (returns, never raises)."""
        if self._started:
            raise RuntimeError("HboneClient.run was already started")
        self._started = True
        await self._session.run(task_status=task_status)

    async def wait_closed(self) -> None:
        """Return once the connection has ended (for whoever owns the reader task)."""
        await self._session.closed_event.wait()

    async def open_stream(
        self, target: str | Sequence[tuple[str, str]], headers: Sequence[tuple[str, str]] = ()
    ) -> HboneStream:
        """CONNECT: ``target`` is the authority (``ip:port``) with regular ``headers`` sent
        along, or a whole connect_headers() block whose :authority is used."""
        authority, headers = request_target(target, headers)
        if not self._started:
            raise RuntimeError("HboneClient.run is not running")
        session = self._session
        if session.is_closed:
            raise HboneConnectError(None, f"connection closed: {session.closed_reason}")
        if session.draining:
            raise HboneConnectError(None, "connection is draining (GOAWAY)", retryable=True)
        if self.available_streams <= 0:
            raise HboneConnectError(None, "connection has no free stream slots")
        block = [(b":method", b"CONNECT"), (b":authority", authority.encode()),
                 *(_encoded_header(k, v) for k, v in headers if not k.startswith(":"))]
        stream_id = session.conn.get_next_available_stream_id()
        try:
            session.conn.send_headers(stream_id, block)
        except h2.exceptions.ProtocolError as exc:
            raise HboneConnectError(None, f"cannot open stream: {exc}") from exc
        stream = session.new_stream(stream_id)
        try:
            await session.flush()
            response = await stream.receive_response_headers()
        except BaseException as exc:
            await stream.aclose()
            if isinstance(exc, trio.BrokenResourceError):
                raise HboneConnectError(None, str(exc), retryable=stream.refused) from exc
            raise
        status = _status(response)
        if status == 200:
            return stream
        await stream.aclose()
        if status is None:
            raise HboneConnectError(
                None, stream.broken_reason or session.closed_reason or "no response",
                retryable=stream.refused,
            )
        reason = _header(response, REASON_HEADER.encode())
        raise HboneConnectError(status, reason or reason_phrase(status))

    async def aclose(self) -> None:
        """GOAWAY and close; streams still open on it break."""
        await self._session.close()


def _encoded_header(name: str, value: str) -> tuple[bytes, bytes]:
    """A header as h2 sends it; one unique to this connection stays out of the HPACK
    dynamic table: adding it would cost hpack work on both ends and evict the entries that
    do repeat (the authority, baggage), for a value never sent again."""
    if name in UNIQUE_PER_CONNECTION_HEADERS:
        return NeverIndexedHeaderTuple(name.encode(), value.encode())
    return name.encode(), value.encode()


def request_target(
    target: str | Sequence[tuple[str, str]], headers: Sequence[tuple[str, str]] = ()
) -> tuple[str, Sequence[tuple[str, str]]]:
    """(authority, headers) from either calling convention of open_stream."""
    if isinstance(target, str):
        return target, headers
    authority = next((value for name, value in target if name == ":authority"), None)
    if not authority:
        raise ValueError("CONNECT header block has no :authority")
    return authority, [*target, *headers]


def _status(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    value = _header(headers, b":status")
    return int(value) if value is not None and value.isdigit() else None


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def connect_tls(
    address: str,
    port: int,
    ssl_context: ssl.SSLContext,
    expected_identity: SpiffeId,
    *,
    connect_timeout: float = _CONNECT_TIMEOUT,
    local_address: str | None = None,
    open_socket: SocketOpener | None = None,
) -> TlsStream:
    """TCP + TLS to a peer's HBONE port, checking ALPN h2 and the server's SPIFFE id.

    Raises OSError when the TCP connect fails and PeerIdentityError (with the reason) when
    the handshake or the identity check fails. ``local_address`` binds the source IP (the
    client pod's own address in the embedded mode); ``open_socket``, when given, makes the
    TCP connection instead (and then binds whatever it likes).
    """
    with trio.fail_after(connect_timeout):
        if open_socket is not None:
            tcp = await open_socket(address, port)
        else:
            tcp = await trio.open_tcp_stream(address, port, local_address=local_address)
    tls = TlsStream(tcp, ssl_context, server_side=False)
    await mutual_handshake(
        tls, connect_timeout, lambda c: verify_peer(c, expected_identity),
        f"with {address}:{port}",
    )
    return tls


async def connect(
    address: str,
    port: int,
    ssl_context: ssl.SSLContext,
    expected_identity: SpiffeId,
    *,
    nursery: trio.Nursery,
    max_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
    local_address: str | None = None,
    connect_timeout: float = _CONNECT_TIMEOUT,
    open_socket: SocketOpener | None = None,
) -> HboneClient:
    """connect_tls, then an HboneClient whose reader task runs in ``nursery``."""
    tls = await connect_tls(
        address, port, ssl_context, expected_identity, local_address=local_address,
        connect_timeout=connect_timeout, open_socket=open_socket,
    )
    client = HboneClient(tls, max_streams=max_streams, peer_identity=expected_identity)
    await nursery.start(client.run)
    return client


@asynccontextmanager
async def open_hbone_client(
    address: str,
    port: int,
    ssl_context: ssl.SSLContext,
    expected_identity: SpiffeId,
    *,
    max_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
) -> AsyncIterator[HboneClient]:
    """``async with open_hbone_client(...) as client:`` -- closed (GOAWAY) on exit.

    Exceptions from the body come out as themselves, not wrapped in an ExceptionGroup (the
    client's reader task never raises, so the body is the only possible source).
    """
    try:
        async with trio.open_nursery() as nursery:
            client = await connect(
                address, port, ssl_context, expected_identity, nursery=nursery,
                max_streams=max_streams,
            )
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
