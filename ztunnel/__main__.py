"""``python -m ztunnel``: run one node's ztunnel until SIGINT/SIGTERM, then drain."""

from __future__ import annotations

import sys
from functools import partial

import trio

from ambient_common.logging import configure_logging
from ambient_common.process import run_until_drained
from ztunnel.config import config_from_args
from ztunnel.proxy import Ztunnel


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_format, config.log_level)
    trio.run(run_until_drained, partial(Ztunnel, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
