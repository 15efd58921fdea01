"""One HBONE stream (a CONNECT tunnel, or a waypoint's HTTP/2 request) as a trio stream.

The session's reader feeds it (``_on_*``, never waiting); its owner's task sends and receives
through the trio stream interface. Received bytes count as consumed for flow control once the
owner took them, so a slow consumer holds the peer back instead of filling our memory.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import h2.errors
import h2.exceptions
import trio

from ambient_dataplane.hbone.limits import MAX_DATA_FRAME, UNSENT_LIMIT

if TYPE_CHECKING:
    from ambient_dataplane.hbone.session import H2Session

# Writes what its sink takes now without waiting and says how much that was (0 when full).
DirectWrite = Callable[[bytes], int]


class HboneStream(trio.abc.HalfCloseableStream):
    """One HTTP/2 stream, mostly a CONNECT tunnel: DATA frames both ways, END_STREAM as
    half-close."""

    def __init__(self, session: H2Session, stream_id: int, *, opened_at: float) -> None:
        self._session = session
        self.stream_id = stream_id
        self.opened_at = opened_at  # trio.current_time()
        # Our response head went out (a server's stream): a reset after it is no rapid reset.
        self.answered = False
        self._break_scope: trio.CancelScope | None = None
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
    def broken_reason(self) -> str | None:
        """Why the stream broke (reset, refused, connection gone); None while it works."""
        return self._broken

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
                self._session.acknowledge(self.stream_id, taken)
                if taken == len(data):
                    return
                data = data[taken:]
        if data:
            self._inbound.append(data)
        self._signal()

    def _on_response(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.response_headers = headers
        self._signal()

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        if self._local_ended:
            self._session.release(self)
        self._signal()

    def _on_broken(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        if self._break_scope is not None:
            self._break_scope.cancel()
        self._session.release(self)
        self._signal()

    def cancel_when_broken(self, scope: trio.CancelScope | None) -> None:
        """Cancel ``scope`` as soon as the stream breaks (at once if it has), until called
        with None: a server stops working on a request the peer reset before the answer."""
        self._break_scope = scope
        if scope is not None and self._broken is not None:
            scope.cancel()

    # -- a client's request ------------------------------------------------------------------
    async def receive_response_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """The response head to the request this stream carries (a client's CONNECT); empty
        when the stream broke first (``broken_reason`` says why)."""
        while not self.response_headers and self._broken is None:
            await self._inbound_changed.wait()
        return self.response_headers

    # -- trio stream interface ---------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send as DATA frames, waiting for WINDOW_UPDATEs when flow control says so."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this HBONE stream")
        self._sending = True
        try:
            self._check_sendable()
            session = self._session
            if session.unsent > UNSENT_LIMIT:
                await session.flush()  # others filled the transport: wait before adding
            view = memoryview(data).cast("B")
            conn = session.conn
            queued = 0  # since the last flush
            while view:
                self._check_sendable()
                try:
                    window = conn.local_flow_control_window(self.stream_id)
                except h2.exceptions.StreamClosedError:
                    self._on_broken("stream closed by peer")
                    raise trio.BrokenResourceError(self._broken) from None
                size = min(window, conn.max_outbound_frame_size, MAX_DATA_FRAME, len(view))
                if size <= 0:
                    opened = session.window_event()
                    await session.flush()
                    queued = 0
                    await opened.wait()
                    continue
                conn.send_data(self.stream_id, bytes(view[:size]))
                view = view[size:]
                queued += size
                if queued >= UNSENT_LIMIT and view:
                    await session.flush()  # a large write waits for the socket as it goes
                    queued = 0
            await session.flush()
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
            self._session.acknowledge(self.stream_id, len(chunk))
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
                self._session.acknowledge(self.stream_id, taken_total)
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
            session.acknowledge(self.stream_id, unread)
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
