"""ambient_dataplane.runtime: the lifecycle both proxies share, driven by a stand-in role
over real sockets (its admin, metrics and readiness servers; no istiod: discovery retries)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

from ambient_dataplane.runtime import ProxyRuntime, RuntimeSettings
from ambient_dataplane.state import ProxyState
from tests.conftest import LoopbackAllocator
from tests.pki import TestPki
from ztunnel.config import Ports


class StandInRole:
    """Records what the runtime asks of it; ``hold_connection`` keeps one tracked
    connection open in the connections nursery until cancelled."""

    def __init__(self, *, hold_connection: bool = False) -> None:
        self.events: list[str] = []
        self.runtime: ProxyRuntime | None = None
        self._hold_connection = hold_connection

    async def start_connections(self, connections: trio.Nursery) -> None:
        self.events.append("connections")
        if self._hold_connection:
            connections.start_soon(self._connection)

    async def _connection(self) -> None:
        assert self.runtime is not None
        with self.runtime.connections.track():
            try:
                await trio.sleep_forever()
            finally:
                self.events.append("connection cut")

    async def start_listeners(self, services: trio.Nursery, connections: trio.Nursery) -> None:
        self.events.append("listeners")

    def dump_sections(self) -> Mapping[str, Callable[[], Any]]:
        return {"role": lambda: {"answer": 42}}

    def render_metrics(self) -> bytes:
        return b"stand_in_total 1.0\n"

    async def drained(self) -> None:
        self.events.append("drained")


def _runtime(tmp_path: Path, address: str, *, drain_timeout: float) -> ProxyRuntime:
    root_cert = tmp_path / "root-cert.pem"
    root_cert.write_text(TestPki().root_pem)
    settings = RuntimeSettings(
        name="stand-in", xds_address=(address, 15012), root_cert=root_cert, token="t",
        token_file=None, discovery_node="node-x", address=address, ports=Ports(),
        drain_timeout=drain_timeout, log_level="info", log_fields={"node": "node-x"},
    )
    return ProxyRuntime(settings, ProxyState(), lambda _change: None)


async def test_runtime_serves_the_role_and_drains_on_shutdown(
    tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    runtime = _runtime(tmp_path, address, drain_timeout=5.0)
    role = StandInRole()
    role.runtime = runtime
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run, role)
            assert role.events == ["connections", "listeners"]
            async with httpx.AsyncClient(trust_env=False) as client:
                dump = (await client.get(f"http://{address}:15000/config_dump")).json()
                assert list(dump) == ["role", "certificates", "discovery"]
                assert dump["role"] == {"answer": 42}
                metrics = await client.get(f"http://{address}:15020/metrics")
                assert metrics.text == "stand_in_total 1.0\n"
                ready = await client.get(f"http://{address}:15021/healthz/ready")
                assert ready.status_code == 503
                assert "config not yet received" in ready.text
            with trio.fail_after(5):
                await runtime.shutdown()
    assert role.events == ["connections", "listeners", "drained"]
    events = [e["event"] for e in logs]
    assert events.index("stand-in started") < events.index("draining")
    assert events.index("draining") < events.index("stand-in stopped")
    assert not any("drain timeout" in event for event in events)
    assert next(e for e in logs if e["event"] == "stand-in stopped")["node"] == "node-x"


async def test_drain_timeout_cuts_the_connections_left_after_the_role_drained(
    tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    runtime = _runtime(tmp_path, loopback.new(), drain_timeout=0.2)
    role = StandInRole(hold_connection=True)
    role.runtime = runtime
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run, role)
            await trio.sleep(0)
            assert runtime.connections.count == 1
            with trio.fail_after(5):
                await runtime.shutdown()
    assert role.events == ["connections", "listeners", "drained", "connection cut"]
    [warning] = [e for e in logs if e["event"] == "drain timeout: closing remaining connections"]
    assert warning["connections"] == 1
