"""Piping two half-closeable streams together, carrying EOF (half-close) each way."""

from __future__ import annotations

from typing import NamedTuple

import trio

_CHUNK = 256 * 1024


class SpliceResult(NamedTuple):
    a_to_b: int
    b_to_a: int


class SpliceError(Exception):
    """One side broke mid-splice; the byte counts so far are kept for metrics."""

    def __init__(self, a_to_b: int, b_to_a: int, reason: str) -> None:
        super().__init__(reason)
        self.a_to_b = a_to_b
        self.b_to_a = b_to_a
        self.reason = reason


async def splice(
    a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream
) -> SpliceResult:
    """Copy both ways until both sides sent EOF; each EOF is forwarded with send_eof.

    Does not close either stream (the caller owns them). If either side breaks, the other
    direction is cancelled and SpliceError carries the counts and the reason.
    """
    counts = [0, 0]
    failure: list[str] = []

    async def pump(
        source: trio.abc.HalfCloseableStream,
        sink: trio.abc.HalfCloseableStream,
        index: int,
        cancel_scope: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(_CHUNK):
                await sink.send_all(data)
                counts[index] += len(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            direction = "a->b" if index == 0 else "b->a"
            failure.append(f"{direction}: {exc or type(exc).__name__}")
            cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, 0, nursery.cancel_scope)
        nursery.start_soon(pump, b, a, 1, nursery.cancel_scope)
    if failure:
        raise SpliceError(counts[0], counts[1], failure[0])
    return SpliceResult(counts[0], counts[1])
