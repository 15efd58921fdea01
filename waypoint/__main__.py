"""``python -m waypoint``: run one waypoint until SIGINT/SIGTERM, then drain."""

from __future__ import annotations

import signal
import sys

import structlog
import trio

from ambient_common.logging import configure_logging
from waypoint.config import WaypointConfig, config_from_args
from waypoint.proxy import Waypoint


async def _drain_on_signal(waypoint: Waypoint) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            structlog.get_logger().info("shutdown requested", signal=signal.Signals(signum).name)
            waypoint.request_shutdown()


async def _run(config: WaypointConfig) -> None:
    """Run until a signal or ``/quitquitquit`` asks for a drain, and the drain is over."""
    waypoint = Waypoint(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_on_signal, waypoint)
        await waypoint.run()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_format, config.log_level)
    trio.run(_run, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
