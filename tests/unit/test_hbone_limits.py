"""The bounds on what one HTTP/2 peer may cost us (issue 11), sans-IO and on in-memory
streams: the outbound backlog, Envoy's premature-reset rule, the frame buffer's steps and
empty-frame bound, and the session's reader yielding between steps."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, PingFrame, SettingsFrame

from ambient_dataplane.hbone import framebuffer
from ambient_dataplane.hbone.limits import (
    ConnectionLimits,
    CountingConnection,
    InboundFlood,
    OutboundBacklog,
    PrematureResets,
)
from ambient_dataplane.hbone.session import H2Session

_PREAMBLE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PING = PingFrame(0, opaque_data=b"12345678").serialize()


def test_backlog_forgets_control_frames_once_the_socket_took_them() -> None:
    backlog = OutboundBacklog(ConnectionLimits(max_unsent_control_frames=10))
    assert backlog.record(sent=100, unsent=50, control_frames=6) is None  # batch ends at 150
    assert backlog.record(sent=120, unsent=60, control_frames=4) is None  # ends at 180
    assert backlog.control_frames == 10
    assert backlog.record(sent=150, unsent=30, control_frames=0) is None  # first batch sent
    assert backlog.control_frames == 4
    assert backlog.record(sent=180, unsent=0, control_frames=0) is None  # all sent
    assert backlog.control_frames == 0


def test_backlog_over_its_control_frame_bound_says_why() -> None:
    backlog = OutboundBacklog(ConnectionLimits(max_unsent_control_frames=10))
    assert backlog.record(sent=0, unsent=100, control_frames=10) is None
    reason = backlog.record(sent=0, unsent=117, control_frames=1)
    assert reason is not None and "11 control frames unsent (limit 10)" in reason


def test_backlog_over_its_byte_bound_says_why() -> None:
    backlog = OutboundBacklog(ConnectionLimits(max_unsent_bytes=1000))
    assert backlog.record(sent=0, unsent=1000, control_frames=0) is None
    reason = backlog.record(sent=0, unsent=1001, control_frames=0)
    assert reason is not None and "1001 bytes unsent (limit 1000)" in reason


def test_premature_resets_trip_at_half_of_the_stream_count_before_it_is_reached() -> None:
    resets = PrematureResets(ConnectionLimits(premature_reset_stream_count=500))
    for _ in range(249):
        resets.stream_ended()
        assert resets.reset_early() is None
    resets.stream_ended()
    reason = resets.reset_early()
    assert reason is not None and "250 of 250 streams" in reason


def test_premature_resets_after_the_stream_count_trip_at_half_of_the_ended_streams() -> None:
    resets = PrematureResets(ConnectionLimits(premature_reset_stream_count=10))
    for _ in range(20):  # answered streams that ended normally
        resets.stream_ended()
    for _ in range(19):
        resets.stream_ended()
        assert resets.reset_early() is None
    resets.stream_ended()
    reason = resets.reset_early()  # 20 premature of 40 ended
    assert reason is not None and "20 of 40 streams" in reason


def _server_conn(limits: ConnectionLimits) -> CountingConnection:
    conn = CountingConnection(h2.config.H2Configuration(client_side=False))
    framebuffer.install(conn, limits)
    conn.initiate_connection()
    conn.data_to_send()
    return conn


def test_frame_buffer_hands_h2_a_bounded_step_of_frames() -> None:
    conn = _server_conn(ConnectionLimits(frames_per_step=100))
    buffer = conn.incoming_buffer
    assert isinstance(buffer, framebuffer.FrameBuffer)
    steps = []
    events = conn.receive_data(_PREAMBLE + SettingsFrame(0).serialize() + _PING * 249)
    steps.append(sum(isinstance(event, h2.events.PingReceived) for event in events))
    while buffer.step_ended:
        events = conn.receive_data(b"")
        steps.append(sum(isinstance(event, h2.events.PingReceived) for event in events))
    assert steps == [99, 100, 50]  # the SETTINGS frame took one frame of the first step
    assert conn.control_frames_queued == 1 + 249  # the SETTINGS ACK and the PING ACKs


def test_frame_buffer_ends_the_connection_after_empty_frames_in_a_row() -> None:
    conn = _server_conn(ConnectionLimits(max_empty_frames_in_a_row=1))
    headers = h2.connection.H2Connection()
    headers.initiate_connection()
    headers.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1:80")])
    opening = headers.data_to_send()
    empty = DataFrame(1, data=b"").serialize()
    conn.receive_data(opening + empty + DataFrame(1, data=b"x").serialize() + empty)
    with pytest.raises(InboundFlood, match="2 frames in a row"):
        conn.receive_data(empty)
    goaway = [frame for frame in _frames(conn.data_to_send()) if isinstance(frame, GoAwayFrame)]
    assert [frame.error_code for frame in goaway] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]


def test_empty_frame_with_end_stream_is_a_normal_half_close() -> None:
    conn = _server_conn(ConnectionLimits(max_empty_frames_in_a_row=1))
    client = h2.connection.H2Connection()
    client.initiate_connection()
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "1.2.3.4:80")])
        client.end_stream(stream_id)  # an empty DATA frame with END_STREAM each
    events = conn.receive_data(client.data_to_send())
    assert sum(isinstance(event, h2.events.StreamEnded) for event in events) == 3


def _frames(data: bytes) -> list[Frame]:
    frames = []
    position = 0
    while position + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[position:position + 9]))
        frame.parse_body(memoryview(data[position + 9:position + 9 + length]))
        frames.append(frame)
        position += 9 + length
    return frames


async def test_session_reader_yields_between_steps_of_a_flood() -> None:
    """1000 PINGs in one read: other tasks run between the reader's steps, so they see the
    server's answers appear a step at a time, not all at once."""
    client_side, server_side = trio.testing.memory_stream_pair()
    session = H2Session(server_side, client_side=False, max_concurrent_streams=10,
                        limits=ConnectionLimits(frames_per_step=100))
    seen: set[int] = set()
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        await client_side.send_all(_PREAMBLE + SettingsFrame(0).serialize() + _PING * 1000)
        with trio.fail_after(5):
            while session.conn.control_frames_queued < 1001:
                seen.add(session.conn.control_frames_queued)
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    in_between = {count for count in seen if 1 < count < 1001}
    assert len(in_between) >= 5, sorted(seen)
