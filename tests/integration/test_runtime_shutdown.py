"""How a proxy's runtime ends (issue 11): ``/quitquitquit`` answers its caller before the
services (the admin server among them) are cancelled."""

from __future__ import annotations

from pathlib import Path

import httpx
import structlog
import trio

from tests.conftest import LoopbackAllocator
from tests.integration.test_runtime import StandInRole, _runtime


async def test_quitquitquit_answers_before_the_proxy_stops(
    tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    runtime = _runtime(tmp_path, address, drain_timeout=1.0)
    role = StandInRole()
    role.runtime = runtime
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run, role)
            async with httpx.AsyncClient(trust_env=False) as client:
                answer = await client.post(f"http://{address}:15000/quitquitquit")
            assert answer.status_code == 200
            assert answer.text == "OK\n"
            with trio.fail_after(5):
                await runtime.stopped.wait()
    events = [e["event"] for e in logs]
    assert events.index("graceful shutdown requested via /quitquitquit") < events.index(
        "draining") < events.index("stand-in stopped")
