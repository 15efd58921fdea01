"""ambient_dataplane.hbone.framebuffer against h2's own FrameBuffer: same frames, same errors.

The buffer relies on h2 internals (pyproject.toml pins the tested h2 range); the first tests
fail loudly when a new h2 or hyperframe changes them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import pytest
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from ambient_dataplane.hbone import framebuffer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX = 16384


def _data(stream_id: int, payload: bytes, *, pad: int | None = None, end: bool = False) -> bytes:
    frame = DataFrame(stream_id, payload)
    if pad is not None:
        frame.flags.add("PADDED")
        frame.pad_length = pad
    if end:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def _headers_in_pieces(stream_id: int, block: bytes, pieces: int) -> bytes:
    size = -(-len(block) // pieces)
    parts = [block[i:i + size] for i in range(0, len(block), size)]
    first = HeadersFrame(stream_id, parts[0])
    frames: list[Frame] = [first]
    for part in parts[1:]:
        frames.append(ContinuationFrame(stream_id, part))
    frames[-1].flags.add("END_HEADERS")
    return b"".join(frame.serialize() for frame in frames)


def _mixed_stream() -> bytes:
    """Every frame kind a ztunnel meets, padded and not, headers split by CONTINUATION."""
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    settings = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20})
    frames = [
        settings.serialize(),
        _headers_in_pieces(1, bytes(range(256)) * 3, 3),
        _data(1, b"x" * 5000),
        _data(1, b"padded", pad=20),
        _data(1, b"", pad=0),
        _data(1, bytes(range(256)) * 64, end=True),  # exactly MAX
        ping.serialize(),
        WindowUpdateFrame(0, window_increment=1000).serialize(),
        b"\x00\x00\x07\xee\x00\x00\x00\x00\x03ignored",  # an unknown frame type
        _headers_in_pieces(3, b"h" * 40, 1),
        _data(3, b"y" * 100),
        RstStreamFrame(3, error_code=8).serialize(),
        GoAwayFrame(0, last_stream_id=3, error_code=0, additional_data=b"bye").serialize(),
    ]
    return b"".join(frames)


def _describe(frame: Frame) -> tuple[object, ...]:
    extra: object = None
    if isinstance(frame, DataFrame):
        extra = (frame.pad_length, frame.flow_controlled_length)
    return (type(frame).__name__, frame.stream_id, sorted(frame.flags), frame.serialize(), extra)


def _chunks(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    out, position = [], 0
    for size in sizes:
        if position >= len(data):
            break
        out.append(data[position:position + size])
        position += size
    if position < len(data):
        out.append(data[position:])
    return out


def _frames_of(
    buffer: h2.frame_buffer.FrameBuffer, chunks: list[bytes]
) -> list[tuple[object, ...]]:
    buffer.max_frame_size = MAX
    seen = []
    for chunk in chunks:
        buffer.add_data(chunk)
        seen.extend(_describe(frame) for frame in buffer)
    return seen


def _both(server: bool, chunks: list[bytes]) -> tuple[list[object], list[object]]:
    ours = _frames_of(framebuffer.FrameBuffer(server=server), chunks)
    theirs = _frames_of(h2.frame_buffer.FrameBuffer(server=server), chunks)
    return ours, theirs


def test_h2_internals_the_buffer_uses_are_still_there() -> None:
    # If this fails, h2 changed what framebuffer.FrameBuffer builds on: check the new h2's
    # frame_buffer.py and connection.receive_data before widening the pin in pyproject.toml.
    base = h2.frame_buffer.FrameBuffer(server=True)
    for name in ("_update_header_buffer", "_validate_frame_length"):
        assert callable(getattr(base, name)), name
    assert base._preamble_len == len(PREFACE)
    assert isinstance(base._data, bytearray)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    assert isinstance(conn.incoming_buffer, h2.frame_buffer.FrameBuffer)
    framebuffer.install(conn)
    conn.max_inbound_frame_size = 12345
    conn.receive_data(PREFACE + SettingsFrame(0).serialize())
    assert isinstance(conn.incoming_buffer, framebuffer.FrameBuffer)
    assert conn.incoming_buffer.max_frame_size == 12345  # h2 still sets it on each receive


@pytest.mark.parametrize("server", [True, False])
@pytest.mark.parametrize(
    "split",
    [lambda n: [n], lambda n: [1] * n, lambda n: [9] * n, lambda n: [7, 4, 20000, 3] * n,
     lambda n: [5000, 16393, 10] * n],
    ids=["whole", "bytewise", "nines", "mixed", "frame-sized"],
)
def test_same_frames_as_h2_however_the_bytes_are_split(
    server: bool, split: Callable[[int], list[int]]
) -> None:
    data = (PREFACE if server else b"") + _mixed_stream()
    ours, theirs = _both(server, _chunks(data, split(len(data))))
    assert len(theirs) == 13  # the CONTINUATIONs are folded into their HEADERS
    assert ours == theirs


def test_same_frames_as_h2_on_random_splits() -> None:
    rng = random.Random(6)
    data = PREFACE + _mixed_stream()
    for _ in range(50):
        ours, theirs = _both(True, _chunks(data, [rng.randint(1, 3000) for _ in data]))
        assert ours == theirs


def test_frames_are_safe_from_a_caller_reusing_its_buffer() -> None:
    buffer = framebuffer.FrameBuffer()
    buffer.max_frame_size = MAX
    received = bytearray(_data(1, b"first") + _data(1, b"second"))
    buffer.add_data(received)
    received[:] = b"\xff" * len(received)  # a caller reusing its buffer changes nothing
    frames = list(buffer)
    assert [frame.data for frame in frames] == [b"first", b"second"]


@pytest.mark.parametrize(
    ("server", "chunks", "error"),
    [
        (True, [b"PRI * HTTP/1.1\r\n"], h2.exceptions.ProtocolError),
        (False, [_data(1, b"z" * (MAX + 1))], h2.exceptions.FrameTooLargeError),
        (False, [HeadersFrame(1, b"abc").serialize() + _data(1, b"x")],
         h2.exceptions.ProtocolError),
        (False, [HeadersFrame(1, b"abc").serialize() + ContinuationFrame(3, b"d").serialize()],
         h2.exceptions.ProtocolError),
        (False, [b"\x00\x00\x01\x00\x08\x00\x00\x00\x01" + b"\x07"], InvalidPaddingError),
        (False, [b"\x00\x00\x00\x00\x08\x00\x00\x00\x01"], h2.exceptions.FrameDataMissingError),
        (False, [b"\x00\x00\x03\x06\x00\x00\x00\x00\x00abc"], h2.exceptions.FrameDataMissingError),
    ],
    ids=["preamble", "too-large", "no-continuation", "continuation-stream", "padding",
         "padded-empty", "short-ping"],
)
def test_same_errors_as_h2(server: bool, chunks: list[bytes], error: type[Exception]) -> None:
    for buffer in (framebuffer.FrameBuffer(server=server), h2.frame_buffer.FrameBuffer(server)):
        with pytest.raises(error):
            _frames_of(buffer, chunks)


def test_an_overlong_frame_fails_on_its_header_without_waiting_for_its_body() -> None:
    buffer = framebuffer.FrameBuffer()
    buffer.max_frame_size = MAX
    buffer.add_data(_data(1, b"z" * (MAX + 1))[:9])
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        next(buffer)


def _connection_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    framebuffer.install(server)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                            (":authority", "a")])
    server.receive_data(client.data_to_send())
    return client, server


def test_padded_data_counts_its_padding_for_flow_control() -> None:
    client, server = _connection_pair()
    for _ in range(4):  # past half the 65535 window: h2 then returns what was acknowledged
        client.send_data(1, b"a" * 10000, pad_length=99)
    events = server.receive_data(client.data_to_send())
    received = [event for event in events if isinstance(event, h2.events.DataReceived)]
    assert [(event.data, event.flow_controlled_length) for event in received] == [
        (b"a" * 10000, 10100)] * 4
    assert server.inbound_flow_control_window == 65535 - 40400
    for event in received:
        server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    updates = [event for event in client.receive_data(server.data_to_send())
               if isinstance(event, h2.events.WindowUpdated)]
    assert {(event.stream_id, event.delta) for event in updates} == {(0, 40400), (1, 40400)}


def test_bad_padding_is_a_connection_protocol_error_as_before() -> None:
    client, server = _connection_pair()
    with pytest.raises(h2.exceptions.ProtocolError, match="padding"):
        server.receive_data(b"\x00\x00\x02\x00\x08\x00\x00\x00\x01" + b"\x05a")
    goaway = server.data_to_send()
    events = client.receive_data(goaway)
    assert [event.error_code for event in events
            if isinstance(event, h2.events.ConnectionTerminated)] == [
        h2.errors.ErrorCodes.PROTOCOL_ERROR]


def test_an_idle_buffer_holds_no_received_chunk() -> None:
    buffer = framebuffer.FrameBuffer()
    buffer.max_frame_size = MAX
    first, second = _data(1, b"a" * 100), _data(1, b"b" * 100)
    chunks = [first[:50], first[50:] + second[:5], second[5:], _data(1, b"whole")]
    for chunk in chunks:
        buffer.add_data(chunk)
        list(buffer)
    assert all(buffer._view.obj is not chunk for chunk in chunks)
    assert not buffer._pending
