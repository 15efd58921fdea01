"""The Trio driver shared by both HBONE ends: one h2 connection over a (TLS) byte stream.

All h2 state changes are synchronous. What h2 queues is handed to the transport at once,
without awaiting (``TlsStream.send_nowait`` encrypts and writes what the socket takes, so a
1 KB request costs no task switch); only what the socket does not take yet waits for the
writer task, and a sender waits for it (backpressure) once more than ``_UNSENT_LIMIT`` bytes
are unsent. The reader never waits for writes itself: if both peers' readers could block on
full TCP buffers, neither would drain the other and the connection would deadlock under bulk
transfer both ways.

Graceful drain (HTTP/2 GOAWAY with NO_ERROR, RFC 9113 section 6.8): the sender keeps serving
the streams up to the last stream id it named and the peer opens new streams on a new
connection. h2 cannot do that: sending or receiving GOAWAY moves its connection state machine
to CLOSED, after which every DATA or WINDOW_UPDATE frame is a protocol error. So a draining
server writes its GOAWAY itself (``encode_goaway``, queued after what h2 had already queued)
and the client takes NO_ERROR GOAWAY frames out of the byte stream before h2 sees them
(``GoawayFilter``); error GOAWAYs still go to h2, which ends the connection. Either side closes
the connection once it is draining and its last stream has ended.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog
import trio
from hyperframe.frame import DataFrame

from ambient_dataplane.hbone import framebuffer
from ambient_dataplane.hbone.protocol import CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW
from ambient_dataplane.tls import TlsStream, describe_tls_error


def _data_frame_repr(frame: DataFrame) -> str:
    return f"DataFrame(stream_id={frame.stream_id}, length={len(frame.data)})"


# h2 (4.x) logs every received frame with ``logger.trace("...", repr(frame))``: the repr is
# built even though nothing prints it, and hyperframe's DATA frame repr copies the payload
# and hex-encodes all of it (up to 1 MiB a frame) to keep 20 characters. Profiling put that
# at 33-57% of a receiving ztunnel's CPU under bulk load (docs/benchmarks.md). A DATA frame
# now describes itself by its length; the repr is only ever for debugging.
DataFrame.__repr__ = _data_frame_repr  # type: ignore[assignment, method-assign]

log = structlog.get_logger()

_READ_SIZE = 256 * 1024
# A sender returns once its bytes are handed to the transport while at most this much of the
# connection's output is still unsent; beyond it, it waits for the socket (backpressure).
_UNSENT_LIMIT = 256 * 1024
_CLOSE_TIMEOUT = 1.0
_DEFAULT_WINDOW = 65535
# A drained server waits this long for the client to close first (ours does as soon as it has
# read the GOAWAY and its last stream ended): closing with the peer's frames still unread
# would turn our close into a TCP reset, which can destroy data the peer has not read yet.
DRAIN_CLOSE_GRACE = 1.0

_FRAME_HEADER_SIZE = 9
_GOAWAY_TYPE = 0x7
_MAX_STREAM_ID = 0x7FFFFFFF


# -- sans-IO: GOAWAY frames outside h2 -------------------------------------------------------


@dataclass(frozen=True)
class GoawayNotice:
    """A GOAWAY frame: streams above ``last_stream_id`` were not processed by the sender."""

    last_stream_id: int
    error_code: int
    debug_data: bytes = b""


def encode_goaway(last_stream_id: int, error_code: int = 0, debug_data: bytes = b"") -> bytes:
    """One GOAWAY frame (type 0x7 on stream 0), as RFC 9113 section 6.8 lays it out."""
    if not 0 <= last_stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"GOAWAY last_stream_id out of range: {last_stream_id}")
    if not 0 <= error_code <= 0xFFFFFFFF:
        raise ValueError(f"GOAWAY error code out of range: {error_code}")
    payload = last_stream_id.to_bytes(4, "big") + error_code.to_bytes(4, "big") + debug_data
    header = len(payload).to_bytes(3, "big") + bytes([_GOAWAY_TYPE, 0]) + bytes(4)
    return header + payload


def decode_goaway_payload(payload: bytes) -> GoawayNotice:
    """The fields of a GOAWAY payload (at least 8 bytes; the reserved bit is ignored)."""
    if len(payload) < 8:
        raise ValueError(f"GOAWAY payload needs 8 bytes, got {len(payload)}")
    return GoawayNotice(
        last_stream_id=int.from_bytes(payload[:4], "big") & _MAX_STREAM_ID,
        error_code=int.from_bytes(payload[4:8], "big"),
        debug_data=bytes(payload[8:]),
    )


class GoawayFilter:
    """Splits the inbound HTTP/2 byte stream at graceful (NO_ERROR) GOAWAY frames.

    ``feed`` returns, in order, the bytes to give h2 and a GoawayNotice where such a frame was
    taken out. Only frame headers are parsed; payloads pass through without being buffered.
    A GOAWAY with an error code, or a malformed one (wrong stream, too short, too long), stays
    in the stream so h2 handles it as it always does (the connection ends). Use it on bytes that
    start at a frame boundary: a client's inbound side (the server sends no preface magic).
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max_frame_size = max_frame_size
        self._header = bytearray()
        self._payload_left = 0  # of the current frame that passes through to h2
        self._goaway: bytearray | None = None  # header + payload of a GOAWAY being collected
        self._goaway_left = 0

    def feed(self, data: bytes | bytearray) -> list[bytes | bytearray | GoawayNotice]:
        if self._goaway is None and not self._header and self._pass_whole(data):
            return [data]
        out: list[bytes | bytearray | GoawayNotice] = []
        run: list[bytes | memoryview] = []  # bytes for h2 since the last notice
        view = memoryview(data)
        position, end = 0, len(data)

        def flush_run() -> None:
            if (all(isinstance(piece, memoryview) for piece in run)
                    and sum(len(piece) for piece in run) == end):
                out.append(data)  # the common case: the whole chunk passes, no copy
            elif run:
                out.append(b"".join(run))
            run.clear()

        while position < end:
            if self._payload_left:
                take = min(self._payload_left, end - position)
                run.append(view[position:position + take])
                position += take
                self._payload_left -= take
            elif self._goaway is not None:
                take = min(self._goaway_left, end - position)
                self._goaway += view[position:position + take]
                position += take
                self._goaway_left -= take
                if not self._goaway_left:
                    frame = bytes(self._goaway)
                    self._goaway = None
                    notice = decode_goaway_payload(frame[_FRAME_HEADER_SIZE:])
                    if notice.error_code == h2.errors.ErrorCodes.NO_ERROR:
                        flush_run()
                        out.append(notice)
                    else:
                        run.append(frame)
            else:
                whole_header_here = not self._header and end - position >= _FRAME_HEADER_SIZE
                take = min(_FRAME_HEADER_SIZE - len(self._header), end - position)
                self._header += view[position:position + take]
                position += take
                if len(self._header) < _FRAME_HEADER_SIZE:
                    break
                header = bytes(self._header)
                self._header.clear()
                length = int.from_bytes(header[:3], "big")
                stream_id = int.from_bytes(header[5:9], "big") & _MAX_STREAM_ID
                if (header[3] == _GOAWAY_TYPE and stream_id == 0
                        and 8 <= length <= self._max_frame_size):
                    self._goaway = bytearray(header)
                    self._goaway_left = length
                else:
                    run.append(view[position - take:position] if whole_header_here else header)
                    self._payload_left = length
        flush_run()
        return out

    def _pass_whole(self, data: bytes | bytearray) -> bool:
        """The fast path for a chunk of whole frame headers without GOAWAY (nearly all of
        them): only the frame lengths are read. False, with nothing changed, when a GOAWAY's
        type byte is seen or a frame header continues in the next chunk: then ``feed`` takes
        the chunk apart."""
        position, end = self._payload_left, len(data)
        while position + _FRAME_HEADER_SIZE <= end:
            if data[position + 3] == _GOAWAY_TYPE:
                return False
            position += _FRAME_HEADER_SIZE + int.from_bytes(data[position:position + 3], "big")
        if position < end:
            return False
        self._payload_left = position - end
        return True


# -- the Trio driver -------------------------------------------------------------------------


class _Sender(Protocol):
    """Where a session's outbound bytes go: handed over without awaiting, sent by ``flush``."""

    @property
    def pending(self) -> int: ...

    def send_nowait(self, data: bytes) -> None: ...

    async def flush(self) -> None: ...


class _QueuedSender:
    """For transports that cannot write without awaiting (in-memory streams, trio.SSLStream):
    bytes queue here and the session's writer task sends them, coalesced, with send_all."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._queue = bytearray()
        self._in_flight = 0

    @property
    def pending(self) -> int:
        return len(self._queue) + self._in_flight

    def send_nowait(self, data: bytes) -> None:
        self._queue += data

    async def flush(self) -> None:
        while self._queue:
            data = bytes(self._queue)
            self._queue.clear()
            self._in_flight = len(data)
            try:
                await self._stream.send_all(data)
            finally:
                self._in_flight = 0


class H2Session:
    """Owns the h2 state machine, the transport and the streams multiplexed on it.

    Draining: ``begin_drain()`` sends GOAWAY(NO_ERROR); a received NO_ERROR GOAWAY refuses our
    streams the peer did not process. Either way the session is then ``draining``: no new
    streams, the open ones run to completion, and the connection closes when the last ends.
    """

    def __init__(
        self, transport: trio.abc.Stream, *, client_side: bool, max_concurrent_streams: int
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            # The server validates requests itself (protocol.parse_connect) so that a malformed
            # request costs one stream, not the whole connection.
            validate_inbound_headers=client_side,
        )
        self.conn = h2.connection.H2Connection(config=config)
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
        framebuffer.install(self.conn)  # one copy of each received frame, not three
        self.client_side = client_side
        self.transport = transport
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
        self._log = log.bind(side="client" if client_side else "server")
        self._goaway_filter = GoawayFilter() if client_side else None
        self.goaway_sent_last_stream_id: int | None = None
        self.goaway_received: GoawayNotice | None = None
        self._drain_requested = False
        self._drain_started = trio.Event()
        self._drain_reason = ""
        self._streams_changed = trio.Event()
        self._run_scope: trio.CancelScope | None = None
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
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await self.transport.aclose()

    def request_write(self) -> None:
        """Hand everything h2 has queued to the transport now (never waits); the writer task
        sends what the socket does not take at once."""
        self._send_now(self.conn.data_to_send())

    def _send_now(self, data: bytes) -> None:
        if self.is_closed:
            return
        if data:
            try:
                self._sender.send_nowait(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.mark_closed(f"transport failed while sending: {describe_tls_error(exc)}")
                return
        if self._sender.pending:
            self._write_wanted.set()

    async def flush(self, limit: int = _UNSENT_LIMIT) -> None:
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
        self._log.debug("hbone.drain_started", last_stream_id=last, streams=len(self.streams))
        self._start_draining("drained: GOAWAY sent and the last stream ended")

    def _on_goaway(self, notice: GoawayNotice) -> None:
        """The peer drains: our streams above its last stream id were not processed (they
        break as ``refused``, so a pool may retry them); the others run to completion."""
        last = notice.last_stream_id
        if self.goaway_received is not None:  # a later GOAWAY may only lower it
            last = min(last, self.goaway_received.last_stream_id)
        self.goaway_received = GoawayNotice(last, notice.error_code, notice.debug_data)
        self._log.debug("hbone.goaway_received", last_stream_id=last, streams=len(self.streams),
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

    def release(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.last_used = trio.current_time()
            self._signal_streams_changed()

    def _signal_streams_changed(self) -> None:
        self._streams_changed.set()
        self._streams_changed = trio.Event()

    async def close(self, error_code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY (if still possible) and close the transport."""
        if not self.is_closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                # After a drain GOAWAY the last stream id must not grow (RFC 9113 6.8).
                self.conn.close_connection(
                    error_code=error_code, last_stream_id=self.goaway_sent_last_stream_id
                )
            await self.flush_quietly()
            self.mark_closed("closed locally")
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
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
        """Give h2 bytes (or act on a GOAWAY kept from it); False if that ended the session."""
        try:
            events = [] if isinstance(piece, GoawayNotice) else self.conn.receive_data(piece)
        except h2.exceptions.ProtocolError as exc:
            self._log.warning("hbone.protocol_error", error=str(exc) or type(exc).__name__)
            await self.flush_quietly()  # h2 queued a GOAWAY naming the error
            self.mark_closed(f"protocol error: {exc or type(exc).__name__}")
            return False
        try:
            if isinstance(piece, GoawayNotice):
                self._on_goaway(piece)
            for event in events:
                self.handle_event(event)
        except Exception as exc:
            # A bug of ours must cost this connection only, never the listener.
            self._log.exception("hbone.internal_error")
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
            await self.flush_quietly()
            self.mark_closed(f"internal error: {exc!r}")
            return False
        return True

    def handle_event(self, event: h2.events.Event) -> None:
        """Dispatch the events common to both sides; subclasses add request/response events."""
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            flow_length = event.flow_controlled_length or 0
            if stream is None or stream._closed:
                self._acknowledge(event.stream_id, flow_length)
            else:
                padding = flow_length - len(event.data or b"")
                if padding:
                    self._acknowledge(event.stream_id, padding)
                stream._on_data(event.data or b"")
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
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake_window_waiters()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # A GOAWAY that reached h2 (an error one, or any on the server side): h2 cannot
            # keep using a connection after it, so in-flight streams end too.
            if event.error_code not in (None, h2.errors.ErrorCodes.NO_ERROR):
                self._log.warning(
                    "hbone.goaway_received",
                    error=_code_name(event.error_code),
                    debug=(event.additional_data or b"").decode("latin-1"),
                )
            self.mark_closed(f"peer sent GOAWAY ({_code_name(event.error_code)})")

    def _acknowledge(self, stream_id: int, length: int) -> None:
        if length and not self.is_closed:
            self.conn.acknowledge_received_data(length, stream_id)


# Writes what its sink takes now without waiting and says how much that was (0 when full).
DirectWrite = Callable[[bytes], int]


def _code_name(code: object) -> str:
    if isinstance(code, h2.errors.ErrorCodes):
        return code.name
    return str(code)


class HboneStream(trio.abc.HalfCloseableStream):
    """One CONNECT tunnel: DATA frames both ways, END_STREAM as half-close."""

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self.response_headers: Sequence[tuple[bytes, bytes]] = ()
        self._inbound: collections.deque[bytes] = collections.deque()
        self._inbound_changed = trio.Event()
        self._remote_ended = False
        self._local_ended = False
        self._broken: str | None = None
        self._closed = False
        self._sending = False
        self._receiving = False
        self._direct_write: DirectWrite | None = None  # set while deliver_to runs
        # The peer did no work on this stream (REFUSED_STREAM, or above its GOAWAY's last
        # stream id): opening it again elsewhere is safe.
        self.refused = False

    @property
    def connection_draining(self) -> bool:
        """The connection under this tunnel drains (GOAWAY): finish the work in progress and
        do not keep the tunnel for reuse (an idle keep-alive tunnel would hold the drain)."""
        return self._session.draining

    # -- events from the session -------------------------------------------------------------
    def _signal(self) -> None:
        self._inbound_changed.set()
        self._inbound_changed = trio.Event()

    def _on_data(self, data: bytes) -> None:
        if data and self._direct_write is not None and not self._inbound:
            # deliver_to runs and nothing is queued before this: write it from here, so the
            # delivering task is not woken for a DATA frame the sink takes at once.
            try:
                taken = self._direct_write(data)
            except (OSError, trio.ClosedResourceError):
                taken = 0  # queued: the delivering task meets the error when it writes
            if taken:
                self._session._acknowledge(self.stream_id, taken)
                if taken == len(data):
                    return
                data = data[taken:]
        if data:
            self._inbound.append(data)
        self._signal()

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        if self._local_ended:
            self._session.release(self)
        self._signal()

    def _on_broken(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        self._session.release(self)
        self._signal()

    # -- trio stream interface ---------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send as DATA frames, waiting for WINDOW_UPDATEs when flow control says so."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this HBONE stream")
        self._sending = True
        try:
            self._check_sendable()
            view = memoryview(data).cast("B")
            conn = self._session.conn
            while view:
                self._check_sendable()
                try:
                    window = conn.local_flow_control_window(self.stream_id)
                except h2.exceptions.StreamClosedError:
                    self._on_broken("stream closed by peer")
                    raise trio.BrokenResourceError(self._broken) from None
                size = min(window, conn.max_outbound_frame_size, len(view))
                if size <= 0:
                    opened = self._session.window_event()
                    await self._session.flush()
                    await opened.wait()
                    continue
                conn.send_data(self.stream_id, bytes(view[:size]))
                view = view[size:]
            await self._session.flush()
        finally:
            self._sending = False

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("HBONE stream was closed")
        if self._local_ended:
            raise trio.ClosedResourceError("send_eof was already called on this HBONE stream")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    async def wait_send_all_might_not_block(self) -> None:
        while not self._closed and self._broken is None:
            try:
                if self._session.conn.local_flow_control_window(self.stream_id) > 0:
                    break
            except h2.exceptions.StreamClosedError:
                break
            await self._session.window_event().wait()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """END_STREAM: the peer's receive_some returns b"" while we can still receive."""
        if self._closed:
            raise trio.ClosedResourceError("HBONE stream was closed")
        if self._local_ended:
            await trio.lowlevel.checkpoint()
            return
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        self._local_ended = True
        try:
            self._session.conn.end_stream(self.stream_id)
        except h2.exceptions.StreamClosedError:
            self._on_broken("stream closed by peer")
            raise trio.BrokenResourceError(self._broken) from None
        if self._remote_ended:
            self._session.release(self)
        await self._session.flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Received data, b"" after END_STREAM; consumed bytes are returned to the window."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this HBONE stream")
        self._receiving = True
        try:
            waited = False  # a wait already was this call's checkpoint
            while not self._inbound:
                if self._closed:
                    raise trio.ClosedResourceError("HBONE stream was closed")
                if self._remote_ended:
                    await trio.lowlevel.checkpoint()
                    return b""
                if self._broken is not None:
                    raise trio.BrokenResourceError(self._broken)
                await self._inbound_changed.wait()
                waited = True
            if self._closed:
                raise trio.ClosedResourceError("HBONE stream was closed")
            chunk = self._inbound.popleft()
            if max_bytes is not None and len(chunk) > max_bytes:
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
                self._inbound.appendleft(chunk[max_bytes:])
                chunk = chunk[:max_bytes]
            self._session._acknowledge(self.stream_id, len(chunk))
            self._session.request_write()  # WINDOW_UPDATE, if h2 decided one is due
            if not waited:
                await trio.lowlevel.checkpoint()
            return chunk
        finally:
            self._receiving = False

    async def deliver_to(
        self, write: DirectWrite, wait_writable: Callable[[], Awaitable[None]]
    ) -> None:
        """Pass everything received to ``write`` until END_STREAM (then return).

        Meant for a sink that can be written without waiting (a socket): while this runs,
        the session's reader itself writes each DATA frame that has nothing queued before
        it, so a request costs no wake-up of this task; this task writes only what ``write``
        did not take, after ``wait_writable``. Bytes count as consumed (flow control) once
        ``write`` took them. ``write`` may raise (OSError, ClosedResourceError): that comes
        out of here. Otherwise the errors of receive_some.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this HBONE stream")
        self._receiving = True
        self._direct_write = write
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("HBONE stream was closed")
                if self._inbound:
                    if not self._write_queued(write):
                        await wait_writable()
                    continue
                if self._remote_ended:
                    await trio.lowlevel.checkpoint()
                    return
                if self._broken is not None:
                    raise trio.BrokenResourceError(self._broken)
                await self._inbound_changed.wait()
        finally:
            self._direct_write = None
            self._receiving = False

    def _write_queued(self, write: DirectWrite) -> bool:
        """Write queued chunks in order while ``write`` takes them whole; True once none is
        left."""
        taken_total = 0
        try:
            while self._inbound:
                chunk = self._inbound[0]
                taken = write(chunk)
                taken_total += taken
                if taken < len(chunk):
                    self._inbound[0] = chunk[taken:]
                    return False
                self._inbound.popleft()
            return True
        finally:
            if taken_total:
                self._session._acknowledge(self.stream_id, taken_total)
                self._session.request_write()  # WINDOW_UPDATE, if h2 decided one is due

    async def aclose(self) -> None:
        """Release the stream; RST_STREAM unless both directions finished cleanly."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        unread = sum(len(chunk) for chunk in self._inbound)
        self._inbound.clear()
        session = self._session
        if self._broken is None and not session.is_closed:
            session._acknowledge(self.stream_id, unread)
            if not (self._local_ended and self._remote_ended):
                code = (
                    h2.errors.ErrorCodes.NO_ERROR if self._local_ended
                    else h2.errors.ErrorCodes.CANCEL
                )
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    session.conn.reset_stream(self.stream_id, error_code=code)
        session.release(self)
        self._signal()
        await session.flush_quietly()
