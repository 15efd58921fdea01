"""The memory releaser: one collection and trim once a burst of closes has gone quiet."""

from __future__ import annotations

import structlog
import trio

from ambient_dataplane.memory import MemoryReleaser


async def test_releases_once_after_a_burst_went_quiet_and_again_for_later_closes() -> None:
    releaser = MemoryReleaser(closes_before_release=3, quiet_period=0.05, min_interval=0.2)
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            releaser.closed()
        await trio.sleep(0.15)
        assert not logs  # below the threshold: nothing to give back
        releaser.closed()
        releaser.closed()
        await trio.sleep(0.02)
        assert not logs  # not quiet yet
        with trio.fail_after(2):
            while len(logs) < 1:
                await trio.sleep(0.01)
        releaser.closed()  # a straggler (the burst's connections) after the release
        with trio.fail_after(2):
            while len(logs) < 2:
                await trio.sleep(0.01)
        await trio.sleep(0.3)
    assert [entry["event"] for entry in logs] == ["memory.released"] * 2
    assert all(entry["rss_after_mib"] is not None for entry in logs)
