"""A proxy process's life: run until SIGINT/SIGTERM (or its own shutdown request), then drain."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Protocol

import structlog
import trio


class Drainable(Protocol):
    def request_shutdown(self) -> None: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


async def _drain_on_signal(proxy: Drainable) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            structlog.get_logger().info("shutdown requested", signal=signal.Signals(signum).name)
            proxy.request_shutdown()


async def run_until_drained(make_proxy: Callable[[], Drainable]) -> None:
    """Build the proxy inside the Trio run and serve until a signal or its own
    ``/quitquitquit`` asks for a drain, and the drain is over."""
    proxy = make_proxy()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_on_signal, proxy)
        await proxy.run()
        nursery.cancel_scope.cancel()


async def cancel_on_signal(scope: trio.CancelScope, message: str) -> None:
    """Cancel ``scope`` at the first SIGINT/SIGTERM, logging ``message`` (a foreground
    command's "Ctrl-C drains and exits")."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            structlog.get_logger().info(message, signal=signal.Signals(signum).name)
            scope.cancel()
            return
