"""h2's receive path made cheaper: a frame buffer that copies DATA payloads once instead of
three times, and a DATA frame repr that does not hex-encode the payload.

h2's own FrameBuffer (4.x) appends every received chunk to a bytearray and slices each frame
out of it before hyperframe's DATA parser copies the payload once more (``tobytes``): three
copies of every byte a ztunnel receives. This buffer keeps the received chunks as they are and
cuts frames out of them with memoryviews, so the payload is copied once, by hyperframe (plus a
join for a frame that spans chunks). Handing DATA payloads on as views (no copy at all) made no
measurable difference and would put memoryviews into every stream's consumers, so it is not
done.

It is installed as ``H2Connection.incoming_buffer`` (``install``) and uses h2 internals: the
preamble check, frame length validation and CONTINUATION assembly of h2's FrameBuffer, which
it subclasses. pyproject.toml pins h2 to the tested range; tests/unit/test_hbone_framebuffer.py
checks those internals and compares every frame with h2's own buffer.

h2 (4.x) also logs every received frame with ``logger.trace("...", repr(frame))``: the repr is
built even though nothing prints it, and hyperframe's DATA frame repr copies the payload and
hex-encodes all of it (up to 1 MiB a frame) to keep 20 characters. Profiling put that at 33-57%
of a receiving ztunnel's CPU under bulk load (docs/benchmarks.md). So, once this module is
imported (the session imports it), a DATA frame describes itself by its length; the repr is
only ever for debugging.

Being the one place that sees every received frame before h2 does, the buffer also enforces
two inbound bounds (``limits``): it hands h2 at most ``frames_per_step`` frames per
``receive_data`` call (``step_ended`` then says frames may wait: the session yields to other
tasks and calls ``receive_data(b"")`` for the next step), and it ends the connection
(``InboundFlood``, which h2 answers with GOAWAY(ENHANCE_YOUR_CALM)) after more than
``max_empty_frames_in_a_row`` DATA, HEADERS or CONTINUATION frames in a row without payload
or END_STREAM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.connection
import h2.exceptions
import h2.frame_buffer
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, HeadersFrame

from ambient_dataplane.hbone.limits import DEFAULT_LIMITS, ConnectionLimits, InboundFlood

if TYPE_CHECKING:
    from h2._typing import Buffer  # what h2's add_data takes

_HEADER_SIZE = 9
_EMPTY = memoryview(b"")
_PAYLOAD_FRAMES = frozenset({DataFrame, HeadersFrame, ContinuationFrame})


class FrameBuffer(h2.frame_buffer.FrameBuffer):
    """Same iterator contract and errors as h2's, over received chunks kept as they are.

    ``_view`` is the unparsed rest of the newest chunk (``bytes``, never modified, so views of
    it stay valid); ``_pending`` holds the start of a frame that continues in a later chunk.
    """

    def __init__(self, server: bool = False, limits: ConnectionLimits = DEFAULT_LIMITS) -> None:
        super().__init__(server=server)
        self._view = _EMPTY
        self._pending: list[memoryview] = []
        self._pending_size = 0
        self._pending_frame_size = 0  # once its header is in
        self._frames_per_step = limits.frames_per_step
        self._frames_left = limits.frames_per_step
        self.step_ended = False  # the last step used its whole budget: frames may wait
        self._max_empty_in_a_row = limits.max_empty_frames_in_a_row
        self._empty_in_a_row = 0

    def add_data(self, data: Buffer) -> None:
        """Buffer ``data`` and start a new step (b"": only the step, for what is buffered)."""
        self._frames_left = self._frames_per_step
        self.step_ended = False
        if not data:
            return
        if self._preamble_len:
            # h2's check of the client preface; what follows it lands in h2's bytearray.
            super().add_data(data)
            data = bytes(self._data)
            self._data.clear()
        elif not isinstance(data, bytes):
            data = bytes(data)  # views must not see the caller change or reuse its buffer
        if self._view:
            self._pending.append(self._view)
            self._pending_size += len(self._view)
        self._view = memoryview(data)

    def __next__(self) -> Frame:
        while True:
            if not self._frames_left:
                self.step_ended = True
                raise StopIteration
            self._frames_left -= 1
            frame = self._update_header_buffer(self._next_frame())
            if frame is not None:
                return frame

    def _next_frame(self) -> Frame:
        """The next whole frame, parsed; StopIteration when it has not fully arrived."""
        raw = self._take_pending() if self._pending else self._take_from_view()
        try:
            frame, _ = Frame.parse_frame_header(raw[:_HEADER_SIZE])
        except (InvalidDataError, InvalidFrameError) as err:
            raise h2.exceptions.ProtocolError(
                f"Received frame with invalid header: {err!s}"
            ) from err
        body = raw[_HEADER_SIZE:]
        try:
            frame.parse_body(body)  # a DATA frame copies its payload here, once
        except InvalidDataError as err:
            raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from err
        except InvalidFrameError as err:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from err
        if frame.__class__ in _PAYLOAD_FRAMES:
            if frame.data or "END_STREAM" in frame.flags:  # type: ignore[attr-defined]
                self._empty_in_a_row = 0
            else:
                self._empty_in_a_row += 1
                if self._empty_in_a_row > self._max_empty_in_a_row:
                    raise InboundFlood(
                        f"{self._empty_in_a_row} frames in a row without payload "
                        f"(limit {self._max_empty_in_a_row})"
                    )
        return frame

    def _frame_size(self, header: memoryview) -> int:
        """Header plus body, validated before the body is waited for (h2 buffers it first)."""
        length = int.from_bytes(header[:3], "big")
        self._validate_frame_length(length)
        return _HEADER_SIZE + length

    def _take_from_view(self) -> memoryview:
        view = self._view
        if len(view) < _HEADER_SIZE:
            raise StopIteration
        size = self._frame_size(view[:_HEADER_SIZE])
        if len(view) < size:
            raise StopIteration
        self._view = view[size:] if size < len(view) else _EMPTY  # no idle hold on the chunk
        return view[:size]

    def _take_pending(self) -> memoryview:
        """A frame started in an earlier chunk, joined with its end from the newest one."""
        available = self._pending_size + len(self._view)
        if not self._pending_frame_size:
            if available < _HEADER_SIZE:
                raise StopIteration
            # Fewer than 9 pieces can make up the header: the join stays small.
            header = b"".join(piece[:_HEADER_SIZE] for piece in (*self._pending, self._view))
            self._pending_frame_size = self._frame_size(memoryview(header))
        size = self._pending_frame_size
        if available < size:
            raise StopIteration  # known size: a frame trickling in costs no rescan per chunk
        rest = size - self._pending_size
        raw = memoryview(b"".join([*self._pending, self._view[:rest]]))
        self._view = self._view[rest:] if rest < len(self._view) else _EMPTY
        self._pending.clear()
        self._pending_size = self._pending_frame_size = 0
        return raw


def install(
    conn: h2.connection.H2Connection, limits: ConnectionLimits = DEFAULT_LIMITS
) -> FrameBuffer:
    """Use FrameBuffer for ``conn``'s received bytes (call before any are received)."""
    buffer = FrameBuffer(server=not conn.config.client_side, limits=limits)
    conn.incoming_buffer = buffer
    return buffer


def _data_frame_repr(frame: DataFrame) -> str:
    return f"DataFrame(stream_id={frame.stream_id}, length={len(frame.data)})"


DataFrame.__repr__ = _data_frame_repr  # type: ignore[assignment, method-assign]
