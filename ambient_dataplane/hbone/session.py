"""The Trio driver of one h2 connection over a (TLS) byte stream, shared by every HTTP/2 end
in the mesh: the HBONE client and server, and the waypoint's HTTP/2 server.

The session does the h2 bookkeeping common to all of them (flow control, streams, resets,
GOAWAY, drain) and leaves the meaning of a request to its owner, the way an h11 Connection
leaves it to its caller: a server passes ``on_request``, called from the reader for each
request header block, and opens the request's stream with ``new_stream``. A client needs no
callback: the response head to its CONNECT lands on the stream it opened.

All h2 state changes are synchronous. What h2 queues is handed to the transport at once,
without awaiting (``TlsStream.send_nowait`` encrypts and writes what the socket takes, so a
1 KB request costs no task switch); only what the socket does not take yet waits for the
writer task, and a sender waits for it (backpressure) once more than ``UNSENT_LIMIT`` bytes
are unsent. The reader never waits for writes itself: if both peers' readers could block on
full TCP buffers, neither would drain the other and the connection would deadlock under bulk
transfer both ways.

Graceful drain goes around h2 (``goaway``); either side closes the connection once it is
draining and its last stream has ended.

A hostile peer is held to ``limits`` (``ConnectionLimits``): the reader hands h2 a bounded
number of frames per step and yields between steps, what we queued for a peer that does not
read is bounded (``OutboundBacklog``), and so are the streams it resets before an answer
(``PrematureResets``); a peer past a bound gets GOAWAY(ENHANCE_YOUR_CALM) and loses the
connection (log event ``hbone.enhance_your_calm``), after one bounded try to deliver that
GOAWAY. The module is one concept, the driver of one HTTP/2 connection, which is why it is
as long as it is; its parts (streams, GOAWAY, bounds) are modules of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog
import trio

from ambient_dataplane import memory
from ambient_dataplane.hbone import framebuffer
from ambient_dataplane.hbone.goaway import GoawayFilter, GoawayNotice, encode_goaway
from ambient_dataplane.hbone.limits import (
    DEFAULT_LIMITS,
    UNSENT_LIMIT,
    ConnectionLimits,
    CountingConnection,
    InboundFlood,
    OutboundBacklog,
    PrematureResets,
)
from ambient_dataplane.hbone.protocol import CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW
from ambient_dataplane.hbone.stream import HboneStream
from ambient_dataplane.tls import TlsStream, describe_tls_error

log = structlog.get_logger()

_READ_SIZE = 256 * 1024
_CLOSE_TIMEOUT = 1.0
_GOAWAY_DEBUG_SIZE = 256
_DEFAULT_WINDOW = 65535
# A drained server waits this long for the client to close first (ours does as soon as it has
# read the GOAWAY and its last stream ended): closing with the peer's frames still unread
# would turn our close into a TCP reset, which can destroy data the peer has not read yet.
DRAIN_CLOSE_GRACE = 1.0

# Called by the reader for each request header block a server receives (never for a client).
RequestReceiver = Callable[[h2.events.RequestReceived], None]


class _Sender(Protocol):
    """Where a session's outbound bytes go: handed over without awaiting, sent by ``flush``."""

    @property
    def pending(self) -> int: ...

    @property
    def bytes_sent(self) -> int: ...

    def send_nowait(self, data: bytes) -> None: ...

    async def flush(self) -> None: ...


class _QueuedSender:
    """For transports that cannot write without awaiting (in-memory streams, trio.SSLStream):
    bytes queue here and the session's writer task sends them, coalesced, with send_all."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._queue = bytearray()
        self._in_flight = 0
        self._bytes_sent = 0

    @property
    def pending(self) -> int:
        return len(self._queue) + self._in_flight

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    def send_nowait(self, data: bytes) -> None:
        self._queue += data

    async def flush(self) -> None:
        while self._queue:
            data = bytes(self._queue)
            self._queue.clear()
            self._in_flight = len(data)
            try:
                await self._stream.send_all(data)
                self._bytes_sent += len(data)
            finally:
                self._in_flight = 0


class H2Session:
    """Owns the h2 state machine, the transport and the streams multiplexed on it.

    ``on_request`` (a server's) is called from the reader for each request header block; it
    must not wait: it opens the stream (``new_stream``) and starts a task to serve it, or
    refuses the request on the spot.

    Draining: ``begin_drain()`` sends GOAWAY(NO_ERROR); a received NO_ERROR GOAWAY refuses our
    streams the peer did not process. Either way the session is then ``draining``: no new
    streams, the open ones run to completion, and the connection closes when the last ends.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        max_concurrent_streams: int,
        on_request: RequestReceiver | None = None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            # A server validates requests itself (request_headers) so that a malformed request
            # costs one stream, not the whole connection.
            validate_inbound_headers=client_side,
        )
        self.conn = CountingConnection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.max_inbound_frame_size = MAX_FRAME_SIZE
        # One copy of each received frame, not three; and the inbound limits.
        self._incoming = framebuffer.install(self.conn, limits)
        self._backlog = OutboundBacklog(limits)
        self._control_frames_handed = 0  # of conn.control_frames_queued
        self._resets = PrematureResets(limits)
        self.preface_received = trio.Event()  # the peer's first SETTINGS arrived
        self.client_side = client_side
        self.transport = transport
        self._on_request = on_request
        self._sender: _Sender = (
            transport if isinstance(transport, TlsStream) else _QueuedSender(transport)
        )
        self.streams: dict[int, HboneStream] = {}
        self.closed_reason: str | None = None
        self.closed_event = trio.Event()
        self.last_used = trio.current_time()
        self._window_opened = trio.Event()
        self._write_wanted = trio.Event()
        self._write_progress = trio.Event()  # set each time the writer emptied the transport
        self.log = log.bind(side="client" if client_side else "server")
        self._goaway_filter = GoawayFilter() if client_side else None
        self.goaway_sent_last_stream_id: int | None = None
        self.goaway_received: GoawayNotice | None = None
        self._drain_requested = False
        self._drain_started = trio.Event()
        self._drain_reason = ""
        self._streams_changed = trio.Event()
        self._run_scope: trio.CancelScope | None = None
        self._calm_goaway_queued = False
        self.running = trio.Event()  # set once the preface is queued

    @property
    def is_closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def draining(self) -> bool:
        """GOAWAY went one way or the other: no new streams on this connection."""
        return self._drain_started.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Preface, then read and write until the connection ends; never raises for peer
        faults. The transport is closed on return."""
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._close_when_drained)
                self.conn.initiate_connection()
                self.conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
                self.request_write()
                self.running.set()
                if self._drain_requested:
                    self.begin_drain()
                task_status.started()
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            if not self.is_closed:
                self.mark_closed("session cancelled")
            await self._close_transport()
            memory.RELEASER.closed()

    def request_write(self) -> None:
        """Hand everything h2 has queued to the transport now (never waits); the writer task
        sends what the socket does not take at once."""
        self._send_now(self.conn.data_to_send())

    def _send_now(self, data: bytes) -> None:
        if self.is_closed:
            return
        sender = self._sender
        if data:
            try:
                sender.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.mark_closed(f"transport failed while sending: {describe_tls_error(exc)}")
                return
        unsent = sender.pending
        if unsent:
            self._write_wanted.set()
        queued = self.conn.control_frames_queued
        overflow = self._backlog.record(
            sent=sender.bytes_sent, unsent=unsent,
            control_frames=queued - self._control_frames_handed,
        )
        self._control_frames_handed = queued
        if overflow is not None:
            self._enhance_your_calm(overflow)

    @property
    def unsent(self) -> int:
        """Bytes handed to the transport that the socket has not taken yet."""
        return self._sender.pending

    def _enhance_your_calm(self, reason: str) -> None:
        """The peer crossed a limit: GOAWAY(ENHANCE_YOUR_CALM), handed to the transport
        without waiting (a peer that does not read must not hold us), and the connection
        ends now."""
        if self.is_closed:
            return
        self.log.warning("hbone.enhance_your_calm", reason=reason,
                         streams=len(self.streams))
        self.mark_closed(f"enhance your calm: {reason}")
        self._calm_goaway_queued = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(
                error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                additional_data=reason.encode()[:_GOAWAY_DEBUG_SIZE],
                last_stream_id=self.goaway_sent_last_stream_id,
            )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._sender.send_nowait(self.conn.data_to_send())
        if self._run_scope is not None:
            self._run_scope.cancel()

    async def flush(self, limit: int = UNSENT_LIMIT) -> None:
        """Hand h2's bytes to the transport and wait while more than ``limit`` bytes of the
        connection's output are unsent (backpressure); raises BrokenResourceError once the
        connection is gone."""
        self.request_write()
        while not self.is_closed and self._sender.pending > limit:
            await self._write_progress.wait()
        if self.is_closed:
            raise trio.BrokenResourceError(self.closed_reason)

    async def flush_quietly(self) -> None:
        """Best-effort complete flush for cleanup paths (RST_STREAM, GOAWAY): bounded and
        shielded."""
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_CLOSE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError),
        ):
            await self.flush(limit=0)

    async def _write_loop(self) -> None:
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            try:
                await self._sender.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.mark_closed(f"transport failed while sending: {describe_tls_error(exc)}")
                return
            self._write_progress.set()
            self._write_progress = trio.Event()

    def _send_raw(self, frame: bytes) -> None:
        """Send a frame h2 must not know about, after everything h2 has queued so far."""
        self.request_write()
        self._send_now(frame)

    # -- graceful drain ------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Send GOAWAY(NO_ERROR) naming the highest stream we received: those keep running,
        later ones are refused (REFUSED_STREAM, safe for the peer to retry elsewhere), and the
        connection closes once the last stream ends. Idempotent; before run() it waits for the
        preface."""
        if self.is_closed or self.goaway_sent_last_stream_id is not None:
            return
        if not self.running.is_set():
            self._drain_requested = True
            return
        last = self.conn.highest_inbound_stream_id
        self.goaway_sent_last_stream_id = last
        self._send_raw(encode_goaway(last, h2.errors.ErrorCodes.NO_ERROR, b"draining"))
        self.log.debug("hbone.drain_started", last_stream_id=last, streams=len(self.streams))
        self._start_draining("drained: GOAWAY sent and the last stream ended")

    def _on_goaway(self, notice: GoawayNotice) -> None:
        """The peer drains: our streams above its last stream id were not processed (they
        break as ``refused``, so a pool may retry them); the others run to completion."""
        last = notice.last_stream_id
        if self.goaway_received is not None:  # a later GOAWAY may only lower it
            last = min(last, self.goaway_received.last_stream_id)
        self.goaway_received = GoawayNotice(last, notice.error_code, notice.debug_data)
        self.log.debug("hbone.goaway_received", last_stream_id=last, streams=len(self.streams),
                        debug=notice.debug_data.decode("latin-1"))
        for stream in list(self.streams.values()):
            if stream.stream_id > last and self._locally_initiated(stream.stream_id):
                stream.refused = True
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
                stream._on_broken(
                    f"refused: the peer is draining (GOAWAY after stream {last}) and did not "
                    "process this stream"
                )
        self._start_draining("drained: the peer sent GOAWAY and the last stream ended")

    def _locally_initiated(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.client_side

    def _start_draining(self, reason: str) -> None:
        if not self._drain_started.is_set():
            self._drain_reason = reason
            self._drain_started.set()

    async def _close_when_drained(self) -> None:
        """Once draining, close the connection when its last stream has ended."""
        await self._drain_started.wait()
        while self.streams and not self.is_closed:
            await self._streams_changed.wait()
        if self.is_closed:
            return
        await self.flush_quietly()  # the GOAWAY and the streams' last frames
        if not self.client_side:
            with trio.move_on_after(DRAIN_CLOSE_GRACE):
                await self.closed_event.wait()  # the client closes first (see DRAIN_CLOSE_GRACE)
            if self.is_closed:
                return
        self.mark_closed(self._drain_reason)
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await self.transport.aclose()  # wakes the reader, which then returns
        if self._run_scope is not None:
            self._run_scope.cancel()  # in case this transport's close does not wake it

    def window_event(self) -> trio.Event:
        """Set when the peer next opens flow-control windows (or the session dies)."""
        return self._window_opened

    def _wake_window_waiters(self) -> None:
        self._window_opened.set()
        self._window_opened = trio.Event()

    def mark_closed(self, reason: str) -> None:
        """The connection is gone: every stream on it is broken from now on."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self.closed_event.set()
        for stream in list(self.streams.values()):
            stream._on_broken(f"connection closed: {reason}")
        self.streams.clear()
        self._wake_window_waiters()
        self._write_progress.set()
        self._signal_streams_changed()

    def new_stream(self, stream_id: int) -> HboneStream:
        """The stream for ``stream_id``, registered: a request the server received (from
        ``on_request``), or a request the client has just sent the headers of."""
        self.last_used = trio.current_time()
        stream = HboneStream(self, stream_id, opened_at=self.last_used)
        self.streams[stream_id] = stream
        return stream

    def release(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.last_used = trio.current_time()
            if not self._locally_initiated(stream.stream_id):
                self._resets.stream_ended()
            if not self.streams:
                # h2 drops its closed streams only when it next counts the open ones (a new
                # stream does): count now, or an idle pooled connection keeps every h2
                # stream object of its last burst (and the allocator arenas under them).
                _ = self.conn.open_inbound_streams
            memory.RELEASER.closed()
            self._signal_streams_changed()

    def _signal_streams_changed(self) -> None:
        self._streams_changed.set()
        self._streams_changed = trio.Event()

    async def close(
        self,
        error_code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR,
        *,
        half_close: bool = False,
        debug: str = "",
    ) -> None:
        """Send GOAWAY (if still possible; ``debug`` is its debug data, and the close reason)
        and close the transport.

        ``half_close``: end our direction of the transport (send_eof) after the GOAWAY, for a
        transport that is itself a tunnel (a waypoint's HTTP/2 inside HBONE): its clean end.
        """
        if not self.is_closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                # After a drain GOAWAY the last stream id must not grow (RFC 9113 6.8).
                self.conn.close_connection(
                    error_code=error_code, additional_data=debug.encode() or None,
                    last_stream_id=self.goaway_sent_last_stream_id,
                )
            await self.flush_quietly()
            if half_close and isinstance(self.transport, trio.abc.HalfCloseableStream):
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(_CLOSE_TIMEOUT),
                    contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
                    ),
                ):
                    await self.transport.send_eof()
            self.mark_closed(f"closed locally: {debug}" if debug else "closed locally")
        await self._close_transport()

    async def _close_transport(self) -> None:
        """Close the transport, bounded; after ENHANCE_YOUR_CALM a queueing transport still
        holds that GOAWAY, so it gets one bounded try to send it first."""
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            if self._calm_goaway_queued:
                self._calm_goaway_queued = False
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         trio.BusyResourceError), trio.move_on_after(0.5):
                    await self._sender.flush()
            await self.transport.aclose()

    async def _read_loop(self) -> None:
        while not self.is_closed:
            try:
                data = await self.transport.receive_some(_READ_SIZE)
            except trio.ClosedResourceError:
                self.mark_closed("closed locally")
                return
            except trio.BrokenResourceError as exc:
                if (self.goaway_sent_last_stream_id is not None
                        and isinstance(exc.__cause__, ConnectionResetError)):
                    # We asked it to go: a peer closing with our last frames still unread
                    # resets the connection, but it did what it was told.
                    self.mark_closed("peer closed the connection")
                else:
                    self.mark_closed(f"transport broken: {describe_tls_error(exc)}")
                return
            if not data:
                self.mark_closed("peer closed the connection")
                return
            pieces = self._goaway_filter.feed(data) if self._goaway_filter else [data]
            for piece in pieces:
                if not await self._receive(piece):
                    return
            self.request_write()

    async def _receive(self, piece: bytes | bytearray | GoawayNotice) -> bool:
        """Give h2 bytes (or act on a GOAWAY kept from it); False if that ended the session.

        h2 gets the frames in steps of ``frames_per_step``; between steps the reader hands
        the answers so far to the transport and yields, so one peer's flood of small frames
        cannot hold every other connection's task."""
        if isinstance(piece, GoawayNotice):
            return await self._handle_events([], piece)
        data: bytes | bytearray = piece
        while True:
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                if isinstance(exc, InboundFlood):
                    self.log.warning("hbone.enhance_your_calm", reason=str(exc),
                                     streams=len(self.streams))
                    reason = f"enhance your calm: {exc}"
                else:
                    self.log.warning("hbone.protocol_error", error=str(exc) or type(exc).__name__)
                    reason = f"protocol error: {exc or type(exc).__name__}"
                await self.flush_quietly()  # h2 queued a GOAWAY naming the error
                self.mark_closed(reason)
                return False
            if not await self._handle_events(events, None):
                return False
            if not self._incoming.step_ended:
                return True
            self.request_write()
            await trio.lowlevel.checkpoint()
            if self.is_closed:
                return False
            data = b""

    async def _handle_events(
        self, events: list[h2.events.Event], goaway: GoawayNotice | None
    ) -> bool:
        """Act on one step's events; False if that ended the session."""
        try:
            if goaway is not None:
                self._on_goaway(goaway)
            for event in events:
                self._handle_event(event)
                if self.is_closed:
                    return False
        except Exception as exc:
            # A bug of ours must cost this connection only, never the listener.
            self.log.exception("hbone.internal_error")
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
            await self.flush_quietly()
            self.mark_closed(f"internal error: {exc!r}")
            return False
        return True

    def _handle_event(self, event: h2.events.Event) -> None:
        """Act on one h2 event (the frequent ones first): stream bookkeeping here, what a
        request means by ``on_request``."""
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            flow_length = event.flow_controlled_length or 0
            if stream is None or stream._closed:
                self.acknowledge(event.stream_id, flow_length)
            else:
                padding = flow_length - len(event.data or b"")
                if padding:
                    self.acknowledge(event.stream_id, padding)
                stream._on_data(event.data or b"")
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake_window_waiters()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.preface_received.set()
            self._wake_window_waiters()
        elif isinstance(event, h2.events.RequestReceived):
            if self._on_request is not None:
                self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_response([(bytes(k), bytes(v)) for k, v in event.headers or ()])
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_remote_end()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                # REFUSED_STREAM promises the peer did no work on it: safe to retry elsewhere.
                if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    stream.refused = True
                stream._on_broken(f"stream reset by peer ({_code_name(event.error_code)})")
                self._wake_window_waiters()
                if (not stream.answered and not self._locally_initiated(stream.stream_id)
                        and trio.current_time() - stream.opened_at
                        <= self._resets.min_lifetime):
                    too_many = self._resets.reset_early()
                    if too_many is not None:
                        self._enhance_your_calm(too_many)
        elif isinstance(event, h2.events.ConnectionTerminated):
            # A GOAWAY that reached h2 (an error one, or any on the server side): h2 cannot
            # keep using a connection after it, so in-flight streams end too.
            if event.error_code not in (None, h2.errors.ErrorCodes.NO_ERROR):
                self.log.warning(
                    "hbone.goaway_received",
                    error=_code_name(event.error_code),
                    debug=(event.additional_data or b"").decode("latin-1"),
                )
            self.mark_closed(f"peer sent GOAWAY ({_code_name(event.error_code)})")

    def acknowledge(self, stream_id: int, length: int) -> None:
        """``length`` received bytes of the stream are consumed: h2 may open the windows."""
        if length and not self.is_closed:
            self.conn.acknowledge_received_data(length, stream_id)


def _code_name(code: object) -> str:
    if isinstance(code, h2.errors.ErrorCodes):
        return code.name
    return str(code)

