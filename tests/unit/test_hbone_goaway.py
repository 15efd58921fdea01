"""GOAWAY outside h2 (sans-IO): the frame codec and the filter that keeps a graceful GOAWAY
from closing h2's connection state while the streams it lets finish are still running."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from ambient_dataplane.hbone.errors import HboneProtocolError
from ambient_dataplane.hbone.goaway import (
    GoawayFilter,
    GoawayNotice,
    decode_goaway_payload,
    encode_goaway,
)


def frame(frame_type: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([frame_type, flags])
            + stream_id.to_bytes(4, "big") + payload)


SETTINGS = frame(0x4, 0, b"")
DATA_1 = frame(0x0, 1, b"a" * 1000)
DATA_3 = frame(0x0, 3, b"b" * 70)
GOAWAY = encode_goaway(5, 0, b"draining")


def feed_in_chunks(stream: bytes, sizes: list[int]) -> list[bytes | GoawayNotice]:
    """Feed ``stream`` split at ``sizes`` and merge adjacent byte pieces."""
    goaway_filter = GoawayFilter()
    merged: list[bytes | GoawayNotice] = []
    position = 0
    for size in [*sizes, len(stream)]:
        chunk, position = stream[position:position + size], position + size
        for piece in goaway_filter.feed(chunk):
            previous = merged[-1] if merged else None
            if isinstance(piece, GoawayNotice):
                merged.append(piece)
            elif isinstance(previous, bytes):
                merged[-1] = previous + bytes(piece)
            else:
                merged.append(bytes(piece))
        if position >= len(stream):
            break
    return [piece for piece in merged if piece != b""]


def test_encode_then_decode_round_trips() -> None:
    encoded = encode_goaway(2**31 - 1, 0, b"bye")
    assert encoded[:9] == (11).to_bytes(3, "big") + b"\x07\x00" + bytes(4)
    assert decode_goaway_payload(encoded[9:]) == GoawayNotice(2**31 - 1, 0, b"bye")


def test_decode_ignores_the_reserved_bit_and_rejects_short_payloads() -> None:
    assert decode_goaway_payload(b"\x80\x00\x00\x07" + bytes(4)).last_stream_id == 7
    with pytest.raises(HboneProtocolError, match="8 bytes") as short:
        decode_goaway_payload(b"\x00\x00\x00")
    assert short.value.status_hint == 400


@pytest.mark.parametrize("last_stream_id", [-1, 2**31])
def test_encode_rejects_out_of_range_stream_ids(last_stream_id: int) -> None:
    with pytest.raises(ValueError, match="last_stream_id"):
        encode_goaway(last_stream_id)


@pytest.mark.parametrize("seed", range(20))
def test_graceful_goaway_is_taken_out_at_any_chunking(seed: int) -> None:
    stream = SETTINGS + DATA_1 + GOAWAY + DATA_3
    rand = random.Random(seed)
    sizes = [rand.randint(1, 40) for _ in range(len(stream))] if seed else [1] * len(stream)
    pieces = feed_in_chunks(stream, sizes)
    assert pieces == [SETTINGS + DATA_1, GoawayNotice(5, 0, b"draining"), DATA_3]


def test_error_goaway_and_malformed_ones_stay_for_h2() -> None:
    error = encode_goaway(3, 0x2, b"internal")  # INTERNAL_ERROR: h2 must end the connection
    on_a_stream = frame(0x7, 1, bytes(8))  # GOAWAY must be on stream 0: h2's protocol error
    too_short = frame(0x7, 0, bytes(4))
    stream = DATA_1 + error + on_a_stream + too_short
    assert feed_in_chunks(stream, [7, 500, 600]) == [stream]


def test_a_chunk_without_goaway_passes_as_the_same_object() -> None:
    chunk = SETTINGS + DATA_1
    assert GoawayFilter().feed(chunk)[0] is chunk


def test_payload_longer_than_a_chunk_is_not_buffered() -> None:
    goaway_filter = GoawayFilter()
    big = frame(0x0, 1, b"x" * 100_000)
    assert goaway_filter.feed(big[:50_000]) == [big[:50_000]]
    assert goaway_filter.feed(big[50_000:]) == [big[50_000:]]


def _h2_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, validate_inbound_headers=False)
    )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    client.receive_data(server.data_to_send())
    return client, server


def test_filtered_goaway_lets_h2_keep_serving_the_running_stream() -> None:
    """Why the filter exists: after a GOAWAY reaches it, h2 refuses the stream's next DATA."""
    client, server = _h2_pair()
    server.send_data(1, b"before")
    wire = server.data_to_send() + encode_goaway(1, 0, b"draining")
    server.send_data(1, b"after", end_stream=True)
    wire += server.data_to_send()

    events: list[h2.events.Event] = []
    notices = []
    for piece in GoawayFilter().feed(wire):
        if isinstance(piece, GoawayNotice):
            notices.append(piece)
        else:
            events += client.receive_data(piece)
    assert notices == [GoawayNotice(1, 0, b"draining")]
    received = [e.data for e in events if isinstance(e, h2.events.DataReceived)]
    assert received == [b"before", b"after"]
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    client.send_data(1, b"reply")  # the client can still send on it, too

    unfiltered, server = _h2_pair()
    unfiltered.receive_data(encode_goaway(1, 0))
    with pytest.raises(h2.exceptions.ProtocolError):
        unfiltered.send_data(1, b"reply")
