"""Serve an ASGI app with hypercorn's trio worker, one failing connection at a time.

Why this exists: ``hypercorn.trio.serve`` (hypercorn 0.18) runs every connection's
``TCPServer`` in a single handler nursery, so an exception escaping one connection cancels
every other connection and ends the whole server. Hypercorn has such bugs on input a client
controls, e.g. DATA for an HTTP/2 stream it already answered (``KeyError`` in
``H2Protocol._handle_events``) or a non-ASCII ``:path`` (``UnicodeDecodeError`` in
``HTTPStream.handle``). For a control plane, one bad client must cost one connection.

``serve_isolated`` is hypercorn's ``worker_serve`` (hypercorn/trio/run.py) with one change:
each connection's ``TCPServer`` (which does the TLS handshake and ALPN selection itself) runs
inside a handler that logs an escaping exception with the peer address and closes only that
connection. Lifespan, ``shutdown_trigger``, ``max_requests`` and the graceful shutdown
(``graceful_timeout``) behave as in hypercorn. QUIC (``quic_bind``) is not served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from random import randint
from typing import Literal

import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, Framework, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

log = structlog.get_logger()

AnyListener = trio.SSLListener[trio.SocketStream] | trio.SocketListener
AnyStream = trio.SSLStream[trio.SocketStream] | trio.SocketStream


def peer_address(stream: AnyStream) -> str:
    """``host:port`` of the client, or ``unknown`` once its socket is already gone."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        host, port, *_ = transport.socket.getpeername()
    except (OSError, ValueError):
        return "unknown"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _leaf_exceptions(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaf_exceptions(inner)]
    return [error]


async def serve_connection(
    app: AppWrapper,
    config: Config,
    context: WorkerContext,
    state: ConnectionState,
    stream: AnyStream,
) -> None:
    """Run hypercorn's TCPServer for one accepted connection; whatever it raises ends this
    connection only (logged), never the listener or the other connections."""
    peer = peer_address(stream)
    try:
        await TCPServer(app, config, context, state, stream)  # type: ignore[arg-type]
    except* Exception as group:
        leaves = _leaf_exceptions(group)
        log.error(
            "connection failed inside hypercorn; closed that connection only",
            peer=peer,
            error_type=", ".join(type(leaf).__name__ for leaf in leaves),
            error="; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves),
            exc_info=True,
        )
    finally:
        # TCPServer closes the stream on its normal paths; make sure of it on the others.
        await trio.aclose_forcefully(stream)


async def _open_listeners(config: Config) -> tuple[list[AnyListener], list[str]]:
    """Bind ``config.bind`` (TLS when a certificate is configured, as hypercorn does) and
    ``insecure_bind``; returns the listeners and their URLs."""
    if config.quic_bind:
        raise ValueError("serve_isolated does not serve QUIC; leave config.quic_bind empty")
    sockets = config.create_sockets()
    listeners: list[AnyListener] = []
    binds: list[str] = []
    ssl_context = config.create_ssl_context()
    for sock in sockets.secure_sockets:
        sock.listen(config.backlog)
        listeners.append(
            trio.SSLListener(
                trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                ssl_context,  # type: ignore[arg-type]  # secure sockets exist only with TLS
                https_compatible=True,
            )
        )
        binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    return listeners, binds


async def serve_isolated(
    app: Framework,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    mode: Literal["asgi", "wsgi"] | None = None,
) -> None:
    """Drop-in for ``hypercorn.trio.serve``: serve until ``shutdown_trigger`` returns, then
    let open connections finish for up to ``config.graceful_timeout``. ``task_status`` gets
    the bound URLs (``https://host:port``)."""
    config.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, config.wsgi_max_body_size, mode)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as connection_nursery:
            listeners, binds = await _open_listeners(config)
            for url in binds:
                await config.log.info(f"Running on {url}")
            handler = partial(
                serve_connection,
                wrapped,
                config,
                context,
                ConnectionState(lifespan_state.copy()),
            )
            task_status.started(binds)
            try:
                async with trio.open_nursery() as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            handler,
                            listeners,
                            handler_nursery=connection_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except* ShutdownError:
                pass
            finally:
                await context.terminated.set()
                connection_nursery.cancel_scope.deadline = (
                    trio.current_time() + config.graceful_timeout
                )

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
