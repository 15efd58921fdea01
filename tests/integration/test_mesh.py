"""The L4 mesh end to end on loopback: istiod_lite + two ztunnels + sample apps, in-process."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import trio

from ambientctl.apps import Socks5ConnectError, http_get
from tests.integration.mesh_harness import (
    ECHO_PORT,
    ECHO_VIP,
    HTTP_PORT,
    HTTPBIN_V1,
    HTTPBIN_VIP,
    LEGACY,
    NODE_1,
    NODE_2,
    NOTSLEEP,
    SLEEP,
    Mesh,
    fetch_metrics,
    metric_samples,
    start_mesh,
)
from ztunnel import socks5
from ztunnel.proxyproto import build_v1_header

pytestmark = pytest.mark.slow


async def _get(mesh: Mesh, source: str, host: str = HTTPBIN_VIP) -> dict[str, object]:
    stream = await mesh.connect(source, host, HTTP_PORT)
    async with stream:
        status, _headers, body = await http_get(stream, "httpbin", "/get")
    assert status == 200
    return json.loads(body)


async def _echo_roundtrip(mesh: Mesh, source: str, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read the echo until the server's EOF."""
    stream = await mesh.connect(source, ECHO_VIP, ECHO_PORT)
    received = bytearray()

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with stream, trio.open_nursery() as nursery:
        # Read while sending: an echo fills every buffer on the way back otherwise.
        nursery.start_soon(send)
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


async def _metrics(mesh: Mesh, demo_node: str) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{mesh.addr(demo_node)}:15020/metrics")
    return response.text


async def _config_dump(mesh: Mesh, demo_node: str) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{mesh.addr(demo_node)}:15000/config_dump")
    return response.json()  # type: ignore[no-any-return]


async def test_allowed_client_reaches_both_endpoints_over_mtls(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    pods = {str((await _get(mesh, SLEEP))["pod"]) for _ in range(6)}
    assert pods == {"httpbin-v1", "httpbin-v2"}

    text = await _metrics(mesh, NODE_2)
    opened = [
        line for line in text.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'reporter="destination"' in line
        and 'source_principal="spiffe://cluster.local/ns/demo/sa/sleep"' in line
        and 'connection_security_policy="mutual_tls"' in line
        # The destination learns the Service the caller addressed (forwarded: ...;host=).
        and 'destination_service="httpbin.demo.svc.cluster.local"' in line
        and 'destination_service_name="httpbin"' in line
    ]
    assert opened, text
    assert sum(float(line.rsplit(" ", 1)[1]) for line in opened) >= 6


async def test_policy_denies_other_service_account(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    with pytest.raises(Socks5ConnectError) as refused:
        await mesh.connect(NOTSLEEP, HTTPBIN_VIP, HTTP_PORT)
    assert refused.value.reply_code == socks5.CONNECTION_NOT_ALLOWED
    # The allowed client still works after the refusal.
    assert (await _get(mesh, SLEEP))["pod"] in ("httpbin-v1", "httpbin-v2")
    text = await _metrics(mesh, NODE_2)
    assert any(
        'response_flags="UAEX"' in line and "sa/notsleep" in line
        for line in text.splitlines() if line.startswith("istio_tcp_connections_opened_total")
    ), text


async def test_half_close_and_bulk_data_cross_the_tunnel(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    payload = bytes(range(256)) * 40_000  # ~10 MB, well past the HTTP/2 windows
    assert await _echo_roundtrip(mesh, SLEEP, payload) == payload


_SLEEP_PRINCIPAL = "spiffe://cluster.local/ns/demo/sa/sleep"


async def _tcp_totals(mesh: Mesh, node: str, reporter: str) -> tuple[float, float, float]:
    """(sent bytes, received bytes, closed connections) of sleep's connections, as ``node``'s
    ztunnel reports them."""
    text = await fetch_metrics(mesh, node)
    labels = {"reporter": reporter, "source_principal": _SLEEP_PRINCIPAL}
    sent, received, closed = (sum(metric_samples(text, name, **labels)) for name in (
        "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
        "istio_tcp_connections_closed_total"))
    return sent, received, closed


async def test_byte_counters_move_while_the_connection_is_open(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    """As Istio's ztunnel, bytes show in the metrics of both ends while a long-lived
    connection still carries them; at the close the totals are exactly what flowed."""
    mesh = await start_mesh(nursery, tmp_path, loopback)
    ends = ((NODE_1, "source"), (NODE_2, "destination"))
    before = {node: await _tcp_totals(mesh, node, reporter) for node, reporter in ends}
    payload = bytes(range(256)) * 400  # 100 KiB, echoed back
    stream = await mesh.connect(SLEEP, ECHO_VIP, ECHO_PORT)
    async with stream:
        await stream.send_all(payload)
        echoed = bytearray()
        while len(echoed) < len(payload):
            echoed += await stream.receive_some(65536)
        assert echoed == payload
        with trio.fail_after(10):  # a few flush intervals
            for node, reporter in ends:
                sent, received, closed = before[node]
                while (await _tcp_totals(mesh, node, reporter)) != (
                        sent + len(payload), received + len(payload), closed):
                    await trio.sleep(0.1)
        await stream.send_eof()
        assert await stream.receive_some(1) == b""
    with trio.fail_after(10):
        for node, reporter in ends:
            sent, received, closed = before[node]
            while (totals := await _tcp_totals(mesh, node, reporter))[2] == closed:
                await trio.sleep(0.1)
            # Flushed live and at the close, every byte is counted once.
            assert totals == (sent + len(payload), received + len(payload), closed + 1)


async def test_live_file_edit_reaches_ztunnels(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    with pytest.raises(Socks5ConnectError):
        await mesh.connect(NOTSLEEP, HTTPBIN_VIP, HTTP_PORT)
    # Allow notsleep too: the edit must reach node-2's ztunnel without a restart.
    policy = (mesh.config_dir / "40-policies.yaml").read_text()
    mesh.write_config_file(
        "40-policies.yaml",
        policy.replace(
            "- cluster.local/ns/demo/sa/sleep",
            "- cluster.local/ns/demo/sa/sleep\n              - cluster.local/ns/demo/sa/notsleep",
        ),
    )
    with trio.fail_after(10):
        while True:
            try:
                await _get(mesh, NOTSLEEP)
                break
            except Socks5ConnectError:
                await trio.sleep(0.1)
    # A broken file is reported and the last good state keeps being served.
    mesh.write_config_file("40-policies.yaml", "kind: [unclosed\n")
    await trio.sleep(0.5)
    await _get(mesh, NOTSLEEP)
    await _get(mesh, SLEEP)


async def test_strict_peer_authentication_refuses_plaintext(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    target = mesh.addr(HTTPBIN_V1)
    # The legacy pod is outside the mesh: it can only speak plaintext to 15006.
    stream = await trio.open_tcp_stream(target, 15006, local_address=mesh.addr(LEGACY))
    async with stream:
        await stream.send_all(
            build_v1_header((mesh.addr(LEGACY), 40000), (target, HTTP_PORT))
            + b"GET /get HTTP/1.1\r\nhost: httpbin\r\n\r\n"
        )
        with trio.fail_after(5):
            assert await stream.receive_some(1024) == b""  # closed, nothing served


async def test_certificates_rotate_mid_traffic(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, cert_ttl=timedelta(seconds=4))
    certs = mesh.ztunnels["node-1"].runtime.certs
    identity = next(iter(certs.wanted()))
    first = certs.current(identity)
    assert first is not None
    stream = await mesh.connect(SLEEP, ECHO_VIP, ECHO_PORT)
    async with stream:
        # Keep one connection busy across at least one rotation (renewal at half-life).
        with trio.fail_after(15):
            while (cert := certs.current(identity)) is None or cert.serial == first.serial:
                await stream.send_all(b"ping")
                assert await stream.receive_some(4) == b"ping"
                await trio.sleep(0.1)
        await stream.send_all(b"still here")
        received = b""
        while len(received) < 10:
            received += await stream.receive_some(10)
        assert received == b"still here"
    # New connections use the new certificate, and keep working past the old one's expiry.
    await trio.sleep(2.5)
    assert (await _get(mesh, SLEEP))["pod"] in ("httpbin-v1", "httpbin-v2")
    dump = await _config_dump(mesh, NODE_1)
    assert all(c["state"] == "Available" for c in dump["certificates"])  # type: ignore[union-attr, index]


async def test_istiod_restart_keeps_traffic_and_resumes_config(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    stream = await mesh.connect(SLEEP, ECHO_VIP, ECHO_PORT)
    async with stream:
        await mesh.stop_istiod()
        # Flowing connections are untouched and new ones still work from the last good config.
        await stream.send_all(b"during outage")
        received = b""
        while len(received) < 13:
            received += await stream.receive_some(64)
        assert received == b"during outage"
        assert (await _get(mesh, SLEEP))["pod"] in ("httpbin-v1", "httpbin-v2")

        await mesh.start_istiod(nursery)
        # A change made after the restart still reaches the ztunnels (the stream resumed).
        mesh.write_config_file(
            "40-policies.yaml",
            (mesh.config_dir / "40-policies.yaml").read_text().replace(
                "sa/sleep", "sa/notsleep"
            ),
        )
        with trio.fail_after(15):
            while True:
                try:
                    await _get(mesh, NOTSLEEP)
                    break
                except Socks5ConnectError:
                    await trio.sleep(0.2)
        with pytest.raises(Socks5ConnectError):
            await mesh.connect(SLEEP, HTTPBIN_VIP, HTTP_PORT)
        await stream.send_all(b"after")
        received = b""
        while len(received) < 5:
            received += await stream.receive_some(64)
        assert received == b"after"


async def test_config_dump_lists_workloads_and_certificates(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    dump = await _config_dump(mesh, NODE_1)
    names = {w["name"] for w in dump["workloads"]}  # type: ignore[union-attr, index]
    assert {"sleep", "notsleep", "httpbin-v1", "httpbin-v2", "legacy-client"} <= names
    legacy = next(w for w in dump["workloads"] if w["name"] == "legacy-client")  # type: ignore[union-attr]
    assert legacy["tunnel_protocol"] == "NONE"
    identities = {c["identity"] for c in dump["certificates"]}  # type: ignore[union-attr, index]
    # Exactly the service accounts with a pod on node-1 (node authorization).
    assert identities == {
        "spiffe://cluster.local/ns/demo/sa/sleep",
        "spiffe://cluster.local/ns/demo/sa/notsleep",
        "spiffe://cluster.local/ns/demo/sa/bookinfo-reviews",
        "spiffe://cluster.local/ns/demo/sa/bookinfo-details",
    }
