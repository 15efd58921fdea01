"""Graceful shutdown: counting live connections, and telling the ones that can end
gracefully that a drain began.

A proxy that shuts down stops listening, calls ``ActiveConnections.begin_drain()`` and waits
(up to its drain timeout) in ``wait_idle()``. Plain TCP connections can only be waited for, but
an HBONE server connection can do better: on the drain signal it sends HTTP/2 GOAWAY, lets the
tunnels already on it finish and closes as soon as it has none, so idle pooled connections from
peers end at once instead of holding the shutdown for the whole timeout (Istio/Envoy drain the
same way). See ``ambient_dataplane.hbone.server.serve_hbone``.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import structlog
import trio


class Drain:
    """A one-shot signal: "this proxy is shutting down, finish what you are doing"."""

    def __init__(self) -> None:
        self._started = trio.Event()

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def start(self) -> None:
        self._started.set()

    async def wait(self) -> None:
        """Return once the drain has started (at once if it already has)."""
        await self._started.wait()


# The drain of the ActiveConnections tracking the current task's connection (see track()).
_current_drain: ContextVar[Drain | None] = ContextVar("ztunnel_current_drain", default=None)


def current_drain() -> Drain | None:
    """The drain signal of the connection this task serves, if an ActiveConnections tracks it.

    This lets a connection handler deep inside a listener (serve_hbone in the inbound path)
    watch for the drain without every layer in between passing it along."""
    return _current_drain.get()


class ActiveConnections:
    """Live connections of one proxy, and the drain signal they watch."""

    def __init__(self) -> None:
        self.count = 0
        self.drain = Drain()
        self._aborted = False
        self._abortable: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count a connection for as long as the block runs; code inside it (and tasks it
        starts) sees ``self.drain`` as ``current_drain()``."""
        self.count += 1
        if self.count == 1:
            self._idle = trio.Event()
        token = _current_drain.set(self.drain)
        try:
            yield
        finally:
            _current_drain.reset(token)
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    @property
    def draining(self) -> bool:
        return self.drain.started

    def begin_drain(self) -> None:
        """Shutdown began: connections that can end gracefully start doing so now."""
        self.drain.start()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @contextmanager
    def abortable(self) -> Iterator[trio.CancelScope]:
        """A cancel scope around the part of a connection that moves data, cancelled by
        ``abort()``: its owner then ends the connection with an error both ends see."""
        scope = trio.CancelScope()
        if self._aborted:
            scope.cancel()
        self._abortable.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._abortable.discard(scope)

    def abort(self) -> int:
        """The drain timed out: what still moves data stops now (see ``abortable``); returns
        how many connections were aborted."""
        self._aborted = True
        for scope in self._abortable:
            scope.cancel()
        return len(self._abortable)


async def serve_tracked(
    listeners: list[trio.SocketListener],
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    connections: ActiveConnections,
    handler_nursery: trio.Nursery,
    what: str,
) -> None:
    """Serve ``listeners`` until cancelled: every connection is tracked (so a shutdown can
    drain it), a failing handler costs only its own connection (logged as ``what``), the
    stream is always closed, and the listeners are closed on the way out.

    This is ``trio.serve_listeners`` without its per-connection wrapper: that one closes the
    stream again with ``aclose_forcefully`` (a cancel scope and a Cancelled raised through
    the close) after we closed it, which showed in a short connection's CPU (bench churn).
    """

    async def guarded(stream: trio.SocketStream) -> None:
        with connections.track():
            try:
                await handle(stream)
            except Exception:  # one bad connection never takes the proxy down
                structlog.get_logger().exception(f"{what} connection handler failed")
            finally:
                # Closing a socket needs no wait: a cancelled handler closes it just the same.
                stream.socket.close()

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, handler_nursery, guarded)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


# accept() errors that mean "out of file descriptors or memory for now", as trio's own
# serve_listeners treats them: wait a little and accept again instead of stopping to listen.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY = 0.1


async def _accept_loop(
    listener: trio.SocketListener,
    handler_nursery: trio.Nursery,
    guarded: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            structlog.get_logger().error("accept failed, retrying", error=str(exc),
                                         retry_in=_ACCEPT_RETRY_DELAY)
            await trio.sleep(_ACCEPT_RETRY_DELAY)
        else:
            handler_nursery.start_soon(guarded, stream)
