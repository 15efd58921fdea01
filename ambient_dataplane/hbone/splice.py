"""Piping two half-closeable streams together, carrying EOF (half-close) each way."""

from __future__ import annotations

import socket
from typing import NamedTuple

import trio

from ambient_dataplane.hbone.stream import HboneStream
from ambient_dataplane.tls import read_socket, write_nowait

_CHUNK = 256 * 1024


class SpliceResult(NamedTuple):
    a_to_b: int
    b_to_a: int


class SpliceProgress:
    """The bytes a splice copied so far each way, updated in place as they flow: a reader
    (ztunnel's periodic metrics flush) sees them while the splice runs, for no more than the
    integer additions the splice does anyway."""

    __slots__ = ("copied",)

    def __init__(self) -> None:
        self.copied = [0, 0]  # a->b, b->a

    @property
    def a_to_b(self) -> int:
        return self.copied[0]

    @property
    def b_to_a(self) -> int:
        return self.copied[1]


class SpliceError(Exception):
    """One side broke mid-splice; the byte counts so far are kept for metrics."""

    def __init__(self, a_to_b: int, b_to_a: int, reason: str) -> None:
        super().__init__(reason)
        self.a_to_b = a_to_b
        self.b_to_a = b_to_a
        self.reason = reason


class SocketSide:
    """A trio.SocketStream read and written through its file descriptor.

    The splice (and, before it, the SOCKS5 handshake) is the only reader and writer of its
    sockets, so trio's per-call conflict checks and the extra scheduler round trip in every
    send are pure cost per request: this
    writes at once and reads after waiting for readability only. EOF still goes through the
    stream (``send_eof``); a socket closed by its owner raises ClosedResourceError.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._drained = False  # the last read left the socket empty

    def _fd(self) -> int:
        fd = self._stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("socket was closed")
        return fd

    async def receive_some(self, max_bytes: int) -> bytes:
        data = await read_socket(self._fd(), max_bytes, wait_first=self._drained)
        self._drained = len(data) < max_bytes
        return data

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        return write_nowait(self._fd(), data)

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self._fd())

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self.write_nowait(view):]
            if view:
                await self.wait_writable()

    async def send_eof(self) -> None:
        """FIN, as SocketStream.send_eof but without its checkpoint: the pump that calls
        this returns right after."""
        sock = self._stream.socket
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("socket was closed")
        if not sock.did_shutdown_SHUT_WR:
            sock.shutdown(socket.SHUT_WR)


_Side = trio.abc.HalfCloseableStream | SocketSide


def _side(stream: trio.abc.HalfCloseableStream) -> _Side:
    return SocketSide(stream) if isinstance(stream, trio.SocketStream) else stream


async def splice(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    progress: SpliceProgress | None = None,
) -> SpliceResult:
    """Copy both ways until both sides sent EOF; each EOF is forwarded with send_eof.

    Does not close either stream (the caller owns them). If either side breaks, the other
    direction is cancelled and SpliceError carries the counts and the reason. A fresh
    ``progress``, if given, is where the counts are kept: a watcher reads them mid-splice.
    """
    counts = (progress if progress is not None else SpliceProgress()).copied
    failure: list[str] = []

    async def pump(source: _Side, sink: _Side, index: int, cancel_scope: trio.CancelScope) -> None:
        try:
            if isinstance(source, HboneStream) and isinstance(sink, SocketSide):
                # The session's reader writes to the socket itself: no wake-up per request.
                def write(data: bytes) -> int:
                    taken = sink.write_nowait(data)
                    counts[index] += taken
                    return taken

                await source.deliver_to(write, sink.wait_writable)
            else:
                while data := await source.receive_some(_CHUNK):
                    await sink.send_all(data)
                    counts[index] += len(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            direction = "a->b" if index == 0 else "b->a"
            failure.append(f"{direction}: {exc or type(exc).__name__}")
            cancel_scope.cancel()

    side_a, side_b = _side(a), _side(b)
    async with trio.open_nursery() as nursery:
        # One direction runs in this task: a short connection spawns one task, not two.
        nursery.start_soon(pump, side_b, side_a, 1, nursery.cancel_scope)
        await pump(side_a, side_b, 0, nursery.cancel_scope)
    if failure:
        raise SpliceError(counts[0], counts[1], failure[0])
    return SpliceResult(counts[0], counts[1])
