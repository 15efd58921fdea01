"""Counting live connections so a shutdown can drain them instead of resetting them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class ActiveConnections:
    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    @contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        if self.count == 1:
            self._idle = trio.Event()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
