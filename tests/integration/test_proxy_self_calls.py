"""A pod cannot reach its node proxy's own ports through the proxy (issue 11): SOCKS5 to the
node's admin (``/quitquitquit``), metrics, readiness or SOCKS5 port, on the node address or on
loopback, is refused with "connection not allowed" and logged with the reason, and the proxy
keeps running. istiod stays reachable as any service."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import trio

from ambientctl.apps import Socks5ConnectError
from tests.integration.mesh_harness import NODE_1, SLEEP, start_mesh
from ztunnel import socks5

pytestmark = pytest.mark.slow


async def test_socks5_refuses_the_node_proxys_own_ports_and_allows_istiod(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    node_address = mesh.addr(NODE_1)
    targets = [(node_address, port) for port in (15000, 15020, 15021, 15080)]
    targets += [("127.0.0.1", 15000), ("0.0.0.0", 15000)]
    with structlog.testing.capture_logs() as logs:
        for host, port in targets:
            with pytest.raises(Socks5ConnectError) as refused:
                await mesh.connect(SLEEP, host, port)
            assert refused.value.reply_code == socks5.CONNECTION_NOT_ALLOWED, (host, port)
        # istiod is an ordinary destination (passthrough here: it is outside the mesh).
        stream = await mesh.connect(SLEEP, mesh.istiod_address, 15012)
        await stream.aclose()
    reasons = [e["reason"] for e in logs if e["event"] == "connection refused"]
    assert f"{node_address}:15000 is the node proxy's own port and cannot be a target" in reasons
    assert len(reasons) == len(targets)
    assert not mesh.ztunnels["node-1"].stopped.is_set()
    await mesh.wait_ready()
