"""GOAWAY frames outside h2, sans-IO: the frame codec and the filter for graceful drain.

Graceful drain (HTTP/2 GOAWAY with NO_ERROR, RFC 9113 section 6.8): the sender keeps serving
the streams up to the last stream id it named and the peer opens new streams on a new
connection. h2 cannot do that: sending or receiving GOAWAY moves its connection state machine
to CLOSED, after which every DATA or WINDOW_UPDATE frame is a protocol error. So a draining
server writes its GOAWAY itself (``encode_goaway``, queued after what h2 had already queued)
and the client takes NO_ERROR GOAWAY frames out of the byte stream before h2 sees them
(``GoawayFilter``); error GOAWAYs still go to h2, which ends the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.errors

from ambient_dataplane.hbone.errors import HboneProtocolError
from ambient_dataplane.hbone.protocol import MAX_FRAME_SIZE

_FRAME_HEADER_SIZE = 9
_GOAWAY_TYPE = 0x7
_MAX_STREAM_ID = 0x7FFFFFFF


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
    """The fields of a GOAWAY payload (at least 8 bytes, else HboneProtocolError; the
    reserved bit is ignored)."""
    if len(payload) < 8:
        raise HboneProtocolError(f"GOAWAY payload needs 8 bytes, got {len(payload)}")
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
