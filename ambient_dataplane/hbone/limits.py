"""What one HTTP/2 peer may make us hold or spend, sans-IO: the bounds and their bookkeeping.

A peer that completed mTLS is still not trusted to be kind (issue 11). Each bound follows an
Envoy default where Envoy has one (docs/architecture.md, "Hostile peers", lists them and where
ours differ); crossing one ends the connection with GOAWAY(ENHANCE_YOUR_CALM):

- ``OutboundBacklog``: frames we queued for a peer that does not read (every PING and SETTINGS
  is answered, CVE-2019-9512/9515): unsent control frames and unsent bytes are bounded.
- ``PrematureResets``: streams the peer opens and resets before we answered (rapid reset,
  CVE-2023-44487), counted with Envoy's rule.
- ``CountingConnection``: the h2 connection that counts the control frames it queues, so the
  backlog knows how many are waiting.

The inbound bounds (frames handled per step, empty frames in a row) live in the frame buffer
that sees every received frame (``framebuffer``); the preface and idle timeouts in the server.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import h2.connection
import h2.exceptions
from hyperframe.frame import Frame, PingFrame, RstStreamFrame, SettingsFrame

_MIB = 1024 * 1024

# A sender waits for the socket while more than this is unsent (H2Session.flush) and queues
# at most this much before waiting again, so an honest connection holds about twice this
# plus one DATA frame for a slow reader.
UNSENT_LIMIT = 256 * 1024
# Our DATA frames stay at or below this even when the peer allows more (up to 16 MiB), so no
# single frame comes near max_unsent_bytes.
MAX_DATA_FRAME = _MIB


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds of one HTTP/2 connection; the defaults are safe without any wiring."""

    # Envoy max_outbound_control_frames (1000): PING/SETTINGS ACKs and RST_STREAMs unsent.
    max_unsent_control_frames: int = 1000
    # Envoy bounds all unsent frames (max_outbound_frames, 10000); we bound their bytes, the
    # memory a peer that does not read costs us. Our senders wait above 256 KiB unsent and
    # DATA frames are at most 1 MiB, so a slow but honest reader stays far below this.
    max_unsent_bytes: int = 4 * _MIB
    # Envoy max_consecutive_inbound_frames_with_empty_payload (1): DATA, HEADERS or
    # CONTINUATION frames without payload or END_STREAM have no use but to cost us CPU.
    max_empty_frames_in_a_row: int = 1
    # Envoy overload.premature_reset_total_stream_count (500) and
    # premature_reset_min_stream_lifetime_seconds (1): see PrematureResets.
    premature_reset_stream_count: int = 500
    premature_reset_min_lifetime: float = 1.0
    # Frames handed to h2 before the reader yields to other tasks (Envoy has no default
    # bound, http.max_requests_per_io_cycle is off): a flood of small frames from one peer
    # must not hold the event loop for everyone else.
    frames_per_step: int = 100
    # Server only. Envoy has no preface timeout of its own; a client that finished mTLS
    # gets as long to send its preface as it had for the handshake.
    preface_timeout: float = 10.0
    # Server only: a connection without streams this long is drained (GOAWAY(NO_ERROR)).
    # Envoy's idle_timeout defaults to 1 h; ours is twice the client pool's idle timeout
    # (300 s), so an honest client always closes first.
    idle_timeout: float = 600.0


DEFAULT_LIMITS = ConnectionLimits()


class InboundFlood(h2.exceptions.DenialOfServiceError):
    """The peer sent frames past an inbound bound: h2 answers it with
    GOAWAY(ENHANCE_YOUR_CALM), as it does its own DenialOfServiceError."""

_CONTROL_FRAMES = (PingFrame, SettingsFrame, RstStreamFrame)


class CountingConnection(h2.connection.H2Connection):
    """An H2Connection that counts the control frames (Envoy's: PING, SETTINGS, RST_STREAM)
    it queues for sending, h2's automatic ACKs included.

    ``_prepare_for_sending`` is h2 internals (the one place every outbound frame passes,
    pinned with the other internals in pyproject.toml); the cost is a type check per frame.
    """

    control_frames_queued = 0  # ever, on this connection

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        for frame in frames:
            if isinstance(frame, _CONTROL_FRAMES):
                self.control_frames_queued += 1
        super()._prepare_for_sending(frames)


class OutboundBacklog:
    """The frames handed to the transport that the socket has not taken yet.

    Positions count the transport's bytes from the start of the connection: a batch of
    frames handed over is sent once the socket took everything up to the batch's end. Only
    batches holding control frames are remembered, and only while some bytes are unsent.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self._max_control_frames = limits.max_unsent_control_frames
        self._max_bytes = limits.max_unsent_bytes
        self._batches: collections.deque[tuple[int, int]] = collections.deque()
        self.control_frames = 0

    def record(self, *, sent: int, unsent: int, control_frames: int) -> str | None:
        """After handing bytes over: ``sent`` bytes taken by the socket so far, ``unsent``
        still waiting, ``control_frames`` queued in the batch just handed over. Returns why
        the peer owes us too much, or None."""
        if not unsent:
            if self._batches:
                self._batches.clear()
                self.control_frames = 0
            return None
        batches = self._batches
        while batches and batches[0][0] <= sent:
            self.control_frames -= batches.popleft()[1]
        if control_frames:
            batches.append((sent + unsent, control_frames))
            self.control_frames += control_frames
        if self.control_frames > self._max_control_frames:
            return (f"{self.control_frames} control frames unsent (limit "
                    f"{self._max_control_frames}): the peer does not read")
        if unsent > self._max_bytes:
            return f"{unsent} bytes unsent (limit {self._max_bytes}): the peer does not read"
        return None


class PrematureResets:
    """Envoy's rule against rapid reset: a stream the peer resets before we answered it and
    within ``premature_reset_min_lifetime`` is premature; the connection has too many once
    they are half of the streams that ended, counted from ``premature_reset_stream_count``
    ended streams on (before that, once they are half of that count)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self._stream_count = limits.premature_reset_stream_count
        self.min_lifetime = limits.premature_reset_min_lifetime
        self.ended = 0
        self.premature = 0

    def stream_ended(self) -> None:
        self.ended += 1

    def reset_early(self) -> str | None:
        """Count a premature reset (its stream's end is counted by ``stream_ended``);
        returns why the connection must end, or None."""
        self.premature += 1
        if 2 * self.premature < max(self._stream_count, self.ended):
            return None
        return (f"{self.premature} of {self.ended} streams reset by the peer before an "
                f"answer (limit: half of at least {self._stream_count})")

