"""Giving memory back to the system once a burst of connections has ended.

CPython frees most objects by reference counting, but a finished tunnel or connection leaves
reference cycles (its trio tasks and coroutines, cancelled frames and their tracebacks, a
session and its streams) that only the cyclic collector frees. The collector runs when
allocations pass its thresholds, so a proxy that goes quiet after a burst keeps that garbage,
and the pymalloc arenas under it, for as long as it stays quiet: measured with 5000 idle
tunnels through two ztunnels, RSS went 58 -> 140 MiB and stayed there once their connections
had closed too; one full collection and glibc's ``malloc_trim(0)`` brought it to 105-120
MiB, and to 62-65 MiB under ``PYTHONMALLOC=malloc``, where the trim reaches pages instead of
pymalloc's arenas (docs/architecture.md, "Hostile peers"). ``malloc_trim`` alone frees
almost nothing: the garbage is still there.

So every stream and connection that ends tells ``RELEASER``; after ``closes_before_release``
of them, once none ended for ``quiet_period`` (the burst is over, the collection cannot slow
it) and at most once per ``min_interval``, it runs one full collection and ``malloc_trim``
(and again while more keep ending). A full collection costs ~30 ms per 500,000 live
objects, which is why it waits for quiet and is rate-limited.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import trio

log = structlog.get_logger()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
    return trim


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MemoryReleaser:
    """Collects and trims once after a burst of closes (see the module docstring)."""

    def __init__(
        self,
        *,
        closes_before_release: int = 100,
        quiet_period: float = 5.0,
        min_interval: float = 30.0,
    ) -> None:
        self._closes_before_release = closes_before_release
        self._quiet_period = quiet_period
        self._min_interval = min_interval
        self._closes = 0
        self._last_close = 0.0  # time.monotonic(): trio's clock differs between runs
        self._last_release = float("-inf")
        self._scheduled = False
        self._trim = _malloc_trim()

    def closed(self) -> None:
        """A stream or connection ended (call from trio; costs a counter and a clock read)."""
        self._closes += 1
        self._last_close = time.monotonic()
        if self._closes >= self._closes_before_release and not self._scheduled:
            self._scheduled = True
            trio.lowlevel.spawn_system_task(self._release_when_quiet)

    async def _release_when_quiet(self) -> None:
        """Release once quiet; again (a min_interval later) if more closed meanwhile, such
        as the connections a burst's tunnels ran on, which often end a little later."""
        try:
            while self._closes or time.monotonic() < self._last_release + self._min_interval:
                due = max(self._last_close + self._quiet_period,
                          self._last_release + self._min_interval)
                now = time.monotonic()
                if now < due:
                    await trio.sleep(due - now)
                elif self._closes:
                    self.release()
        finally:
            self._scheduled = False

    def release(self) -> None:
        """One full collection and malloc_trim, now."""
        self._closes = 0
        self._last_release = time.monotonic()
        before = _rss_mib()
        collected = gc.collect()
        if self._trim is not None:
            self._trim(0)
        log.info("memory.released", collected=collected, rss_before_mib=before,
                 rss_after_mib=_rss_mib())


RELEASER = MemoryReleaser()
