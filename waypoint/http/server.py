"""The waypoint's HTTP server: one connection (a tunnel's inner stream) served as HTTP/1.1
(``server_h1``) or, when the client opens with the prior-knowledge preface, HTTP/2
(``server_h2``).
"""

from __future__ import annotations

import structlog
import trio

from waypoint.http.messages import CLOSE_TIMEOUT, READ_SIZE, HttpHandler, HttpLimits
from waypoint.http.server_h1 import serve_h1
from waypoint.http.server_h2 import serve_h2
from waypoint.http.sniff import H2_PREFACE

log = structlog.get_logger()


async def serve_http(
    stream: trio.abc.HalfCloseableStream,
    handler: HttpHandler,
    limits: HttpLimits = HttpLimits(),  # noqa: B008 - frozen, so sharing it is safe
    *,
    initial_bytes: bytes = b"",
) -> None:
    """Serve HTTP on ``stream`` until the client is done; the stream is closed on return.

    ``initial_bytes`` are bytes already read from ``stream`` (while sniffing), handled as if
    they arrived first. Never raises for anything the client does; handler exceptions become
    500 answers. Cancellation ends the connection (HTTP/2 peers get a GOAWAY).
    """
    try:
        prefix = await _read_preface_window(stream, initial_bytes, limits)
        if prefix is None:
            return
        if prefix.startswith(H2_PREFACE):
            await serve_h2(_PrefixedStream(stream, prefix), handler, limits)
        else:
            await serve_h1(stream, handler, limits, prefix)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("http.connection_broken", error=str(exc) or type(exc).__name__)
    except Exception:
        # Only a bug gets here; it must cost this connection, never the waypoint.
        log.exception("http.connection_failed")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()


async def _read_preface_window(
    stream: trio.abc.ReceiveStream, initial: bytes, limits: HttpLimits
) -> bytes | None:
    """Read until the bytes either are the h2 preface or cannot become it; None on a
    client that leaves (or idles out) before sending anything."""
    buffer = initial
    while len(buffer) < len(H2_PREFACE) and H2_PREFACE.startswith(buffer):
        timeout = limits.header_timeout if buffer else limits.idle_timeout
        with trio.move_on_after(timeout):
            data = bytes(await stream.receive_some(READ_SIZE))
            if not data:
                return buffer or None
            buffer += data
            continue
        return None
    return buffer


class _PrefixedStream(trio.abc.HalfCloseableStream):
    """``stream`` with bytes already read from it put back in front."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
