"""The drain timeout ends the connections left with an error both ends see (issue 11): a
ztunnel shutting down resets what it still carries (RST_STREAM towards the peer ztunnel, TCP
RST towards the apps), on the client's node and on the server's, so neither app can take a
truncated transfer for a complete one."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import trio

from tests.integration.mesh_harness import HTTPBIN_V1, SLEEP, Mesh, start_mesh
from ztunnel.telemetry import ABORTED

pytestmark = pytest.mark.slow

PORT = 9100
CHUNK = b"x" * 1000


async def _how_it_ends(stream: trio.abc.ReceiveStream) -> str:
    """Read until the peer ends the stream: "eof" (a clean FIN) or "reset"."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        return "reset"
    return "eof"


async def _transfer_cut_by_shutdown(mesh: Mesh, nursery: trio.Nursery, node: str) -> list[str]:
    """A long transfer from httpbin-v1 (node-2) to sleep (node-1), cut by ``node``'s
    shutdown; returns how it ended for [the server app, the client app]."""
    server_end: list[str] = []
    connected = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        connected.set()
        async with trio.open_nursery() as inner:
            async def keep_sending() -> None:
                try:
                    while True:
                        await stream.send_all(CHUNK)
                        await trio.sleep(0.05)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            inner.start_soon(keep_sending)
            server_end.append(await _how_it_ends(stream))
            inner.cancel_scope.cancel()

    listeners = await trio.open_tcp_listeners(PORT, host=mesh.addr(HTTPBIN_V1))
    nursery.start_soon(trio.serve_listeners, serve, listeners)
    client = await mesh.connect(SLEEP, HTTPBIN_V1, PORT)
    assert await client.receive_some(65536)  # bytes flow: the transfer is under way
    await connected.wait()
    nursery.start_soon(mesh.ztunnels[node].shutdown)
    with trio.fail_after(15):
        client_end = await _how_it_ends(client)
        while not server_end:
            await trio.sleep(0.05)
    await client.aclose()
    with trio.fail_after(15):
        await mesh.ztunnels[node].stopped.wait()
    return [server_end[0], client_end]


@pytest.mark.parametrize("node", ["node-1", "node-2"])
async def test_drain_timeout_resets_both_apps(
    nursery: trio.Nursery, tmp_path: Path, loopback: object, node: str
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    with structlog.testing.capture_logs() as logs:
        ends = await _transfer_cut_by_shutdown(mesh, nursery, node)
    assert ends == ["reset", "reset"]
    assert any(e["event"] == "drain timeout: closing remaining connections" for e in logs)
    broken = [e for e in logs if e["event"] == "connection broken"]
    assert any(e["error"] == ABORTED for e in broken), broken  # the node shutting down
    # ...and its peer ztunnel learned it from an HBONE stream reset, not a lost connection.
    assert any("stream reset by peer (CANCEL)" in e["error"] for e in broken), broken
