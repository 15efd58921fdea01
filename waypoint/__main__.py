"""``python -m waypoint``: run one waypoint until SIGINT/SIGTERM, then drain."""

from __future__ import annotations

import sys
from functools import partial

import trio

from ambient_common.logging import configure_logging
from ambient_common.process import run_until_drained
from waypoint.config import config_from_args
from waypoint.proxy import Waypoint


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_format, config.log_level)
    trio.run(run_until_drained, partial(Waypoint, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
