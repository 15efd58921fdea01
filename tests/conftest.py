"""Shared fixtures: unique loopback addresses so tests never collide on the standard ports."""

from __future__ import annotations

import itertools
import os

import pytest


class LoopbackAllocator:
    """Hands out fresh 127.x.y.z addresses; x is derived from the pid so that two test
    processes on one machine (a developer's run beside CI) do not meet."""

    def __init__(self) -> None:
        self._base = 100 + os.getpid() % 100
        self._counter = itertools.count(1)

    def new(self) -> str:
        n = next(self._counter)
        return f"127.{self._base}.{(n // 250) % 250}.{n % 250 + 1}"


_ALLOCATOR = LoopbackAllocator()


@pytest.fixture
def loopback() -> LoopbackAllocator:
    return _ALLOCATOR
