"""A new mesh root after an istiod restart (issue 11): istiod_lite comes back with another CA
and rewrites root-cert.pem; the ztunnels re-read it (their control-plane TLS follows), renew
their certificates at once and trust the CA's new bundle, so HBONE between them works again
without restarting them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import structlog
import trio

from ambientctl.apps import Socks5ConnectError, http_get
from tests.integration.mesh_harness import HTTP_PORT, HTTPBIN_VIP, SLEEP, Mesh, start_mesh

pytestmark = pytest.mark.slow


async def _pod_answering(mesh: Mesh) -> str:
    stream = await mesh.connect(SLEEP, HTTPBIN_VIP, HTTP_PORT)
    async with stream:
        status, _headers, body = await http_get(stream, "httpbin", "/get")
    assert status == 200
    return str(json.loads(body)["pod"])


async def test_ztunnels_follow_a_new_root_after_an_istiod_restart(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    assert await _pod_answering(mesh) in ("httpbin-v1", "httpbin-v2")
    root_file = tmp_path / "istiod" / "root-cert.pem"
    old_root = root_file.read_text()

    with structlog.testing.capture_logs() as logs:
        await mesh.stop_istiod()
        shutil.rmtree(tmp_path / "istiod" / "ca")  # the next istiod makes a new CA
        await mesh.start_istiod(nursery)
        new_root = root_file.read_text()
        assert new_root != old_root
        with trio.fail_after(60):
            while True:
                ztunnels = mesh.ztunnels.values()
                if all(z.runtime.certs.trust_bundle == [new_root] for z in ztunnels):
                    try:
                        await _pod_answering(mesh)
                        break
                    except (Socks5ConnectError, OSError, trio.BrokenResourceError):
                        pass
                await trio.sleep(0.2)
        await mesh.wait_ready()

    events = [e["event"] for e in logs]
    assert events.count("root certificate reloaded") >= len(mesh.ztunnels)
    assert "certificates renewing" in events
    for ztunnel in mesh.ztunnels.values():
        for entry in ztunnel.runtime.certs.dump():
            assert entry["state"] == "Available", entry
