"""The Trio driver shared by both HBONE ends: one h2 connection over a (TLS) byte stream.

All h2 state changes are synchronous. A single writer task moves everything h2 has queued to
the transport in one ``send_all`` per wake-up, so writes from many streams coalesce. The reader
never writes itself: if both peers' readers could block on full TCP buffers, neither would
drain the other and the connection would deadlock under bulk transfer both ways.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import structlog
import trio

from ztunnel.hbone.protocol import CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW
from ztunnel.tls import describe_tls_error

log = structlog.get_logger()

_READ_SIZE = 256 * 1024
_CLOSE_TIMEOUT = 1.0
_DEFAULT_WINDOW = 65535


class H2Session:
    """Owns the h2 state machine, the transport and the streams multiplexed on it."""

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
        self.transport = transport
        self.streams: dict[int, HboneStream] = {}
        self.closed_reason: str | None = None
        self.closed_event = trio.Event()
        self.last_used = trio.current_time()
        self._window_opened = trio.Event()
        self._write_wanted = trio.Event()
        self._write_requests = 0  # flush() calls so far
        self._writes_done = 0  # flush() calls whose bytes reached the transport
        self._write_progress = trio.Event()
        self._log = log.bind(side="client" if client_side else "server")

    @property
    def is_closed(self) -> bool:
        return self.closed_reason is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Preface, then read and write until the connection ends; never raises for peer
        faults. The transport is closed on return."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                self.conn.initiate_connection()
                self.conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
                self.request_write()
                task_status.started()
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            if not self.is_closed:
                self.mark_closed("session cancelled")
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await self.transport.aclose()

    def request_write(self) -> int:
        """Wake the writer; returns a ticket that flush() can wait for."""
        self._write_requests += 1
        self._write_wanted.set()
        return self._write_requests

    async def flush(self) -> None:
        """Wait until everything h2 has queued so far reached the transport (backpressure)."""
        ticket = self.request_write()
        while self._writes_done < ticket:
            if self.is_closed:
                raise trio.BrokenResourceError(self.closed_reason)
            await self._write_progress.wait()

    async def flush_quietly(self) -> None:
        """Best-effort flush for cleanup paths (RST_STREAM, GOAWAY): bounded and shielded."""
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_CLOSE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError),
        ):
            await self.flush()

    async def _write_loop(self) -> None:
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            ticket = self._write_requests
            data = self.conn.data_to_send()
            if data:
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.mark_closed(f"transport failed while sending: {describe_tls_error(exc)}")
                    return
            self._writes_done = ticket
            self._write_progress.set()
            self._write_progress = trio.Event()

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

    def release(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.last_used = trio.current_time()

    async def close(self, error_code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY (if still possible) and close the transport."""
        if not self.is_closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code=error_code)
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
                self.mark_closed(f"transport broken: {describe_tls_error(exc)}")
                return
            if not data:
                self.mark_closed("peer closed the connection")
                return
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._log.warning("hbone.protocol_error", error=str(exc) or type(exc).__name__)
                await self.flush_quietly()  # h2 queued a GOAWAY naming the error
                self.mark_closed(f"protocol error: {exc or type(exc).__name__}")
                return
            try:
                for event in events:
                    self.handle_event(event)
            except Exception as exc:
                # A bug of ours must cost this connection only, never the listener.
                self._log.exception("hbone.internal_error")
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.close_connection(error_code=h2.errors.ErrorCodes.INTERNAL_ERROR)
                await self.flush_quietly()
                self.mark_closed(f"internal error: {exc!r}")
                return
            self.request_write()

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
                stream._on_broken(f"stream reset by peer ({_code_name(event.error_code)})")
                self._wake_window_waiters()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake_window_waiters()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 cannot keep using a connection after GOAWAY, so in-flight streams end too.
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

    # -- events from the session -------------------------------------------------------------
    def _signal(self) -> None:
        self._inbound_changed.set()
        self._inbound_changed = trio.Event()

    def _on_data(self, data: bytes) -> None:
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
            while not self._inbound:
                if self._closed:
                    raise trio.ClosedResourceError("HBONE stream was closed")
                if self._remote_ended:
                    await trio.lowlevel.checkpoint()
                    return b""
                if self._broken is not None:
                    raise trio.BrokenResourceError(self._broken)
                await self._inbound_changed.wait()
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
            await trio.lowlevel.checkpoint()
            return chunk
        finally:
            self._receiving = False

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
