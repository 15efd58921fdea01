"""ztunnel's side of waypoints, end to end on loopback: the in-process mesh with a waypoint
Workload+Service, and a stand-in waypoint (an HBONE server with the waypoint's identity)
that records each CONNECT and splices it to the real app.

The waypoint is written as a Pod labelled ``gateway.networking.k8s.io/gateway-name`` on a
node without a ztunnel of ours, a Service selecting it, and ``istio.io/use-waypoint`` on the
httpbin Service; a ``Gateway`` of class ``istio-waypoint`` is included too, so the test keeps
working once istiod translates Gateways (real pods stay the waypoint's workloads).

Also: the discovery client names the kinds it wants, and a waypoint-like client asking for
every kind gets the L7 resources into its ProxyState.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio

from ambient_api import kinds, l7
from ambient_api.discovery import DeltaUpdate
from ambient_api.identity import SpiffeId
from ambient_api.model import GatewayAddress
from ambient_dataplane.controlplane import ControlPlaneConnection
from ambient_dataplane.discovery import DiscoveryClient
from ambient_dataplane.hbone import ConnectRequest, HboneResponder, serve_hbone_tls, splice
from ambient_dataplane.state import AppliedChange, ProxyState
from ambient_dataplane.tls import CertifiedKey, server_context
from ambientctl.apps import Socks5ConnectError, http_get
from tests.conftest import LoopbackAllocator
from tests.deltas import resource_update
from tests.integration.control_plane_servers import (
    ScriptedIstiod,
    StreamScript,
    client_ssl_context,
    ndjson,
    start_scripted_istiod,
    workload,
)
from tests.integration.mesh_harness import (
    EXAMPLES,
    HTTP_PORT,
    HTTPBIN_V1,
    HTTPBIN_VIP,
    NODE_1,
    NODE_2,
    SLEEP,
    Mesh,
    fetch_metrics,
    issue_mesh_certificate,
    mesh_ca,
    metric_samples,
    start_mesh,
)
from tests.pki import TestPki
from ztunnel import socks5
from ztunnel.errors import OutboundRefused
from ztunnel.outbound import plan_outbound

pytestmark = pytest.mark.slow

HTTPBIN_KEY = "demo/httpbin.demo.svc.cluster.local"
WAYPOINT_HOST = "waypoint.demo.svc.cluster.local"
WAYPOINT_IDENTITY = SpiffeId("cluster.local", "demo", "waypoint")
SLEEP_IDENTITY = SpiffeId("cluster.local", "demo", "sleep")


def waypoint_yaml(node_ip: str, pod_ip: str, vip: str, *, with_pod: bool = True) -> str:
    pod = f"""---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint
  namespace: demo
  labels:
    gateway.networking.k8s.io/gateway-name: waypoint
spec:
  nodeName: waypoint-node
  serviceAccountName: waypoint
  containers:
    - name: istio-proxy
      image: docker.io/istio/proxyv2:1.24.0
status:
  phase: Running
  podIP: {pod_ip}
  podIPs:
    - ip: {pod_ip}
  conditions:
    - type: Ready
      status: "True"
"""
    return f"""apiVersion: v1
kind: Node
metadata:
  name: waypoint-node
status:
  addresses:
    - type: InternalIP
      address: {node_ip}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: waypoint
  namespace: demo
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: demo
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  addresses:
    - type: IPAddress
      value: {vip}
  listeners:
    - name: mesh
      port: 15008
      protocol: HBONE
---
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: demo
  labels:
    gateway.networking.k8s.io/gateway-name: waypoint
spec:
  selector:
    gateway.networking.k8s.io/gateway-name: waypoint
  clusterIP: {vip}
  clusterIPs:
    - {vip}
  ports:
    - name: mesh
      port: 15008
      targetPort: 15008
      protocol: TCP
{pod if with_pod else ""}"""


def httpbin_with_waypoint() -> str:
    """The demo's httpbin file with ``istio.io/use-waypoint: waypoint`` on its Service."""
    text = (EXAMPLES / "20-httpbin.yaml").read_text()
    service_head = "kind: Service\nmetadata:\n  name: httpbin\n  namespace: demo\n  labels:\n"
    assert text.count(service_head) == 1, "the demo's httpbin Service changed shape"
    return text.replace(service_head, service_head + "    istio.io/use-waypoint: waypoint\n")


@dataclass
class StandInWaypoint:
    """Records who called with which authority and splices to the app on ``upstream_ip``
    (a real waypoint would pick an endpoint and tunnel to it; the point here is ztunnel)."""

    upstream_ip: str
    calls: list[tuple[str, SpiffeId | None]] = field(default_factory=list)

    async def handle(self, request: ConnectRequest, responder: HboneResponder) -> None:
        self.calls.append((request.authority, responder.connection.peer_identity))
        try:
            upstream = await trio.open_tcp_stream(self.upstream_ip, request.port)
        except OSError as exc:
            await responder.reject(503, f"upstream connect failed: {exc}")
            return
        async with upstream:
            tunnel = await responder.accept()
            await splice(tunnel, upstream)


async def start_stand_in(
    nursery: trio.Nursery, mesh: Mesh, address: str, stand_in: StandInWaypoint
) -> trio.CancelScope:
    """Serve HBONE on ``address:15008`` with the waypoint's mesh certificate; the returned
    scope stops the listener and every connection on it."""
    issued = issue_mesh_certificate(mesh, "demo", "waypoint")
    context = server_context(CertifiedKey.from_pem(issued.chain_pem, issued.key_pem),
                             mesh_ca(mesh).trust_bundle)
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        with scope:
            handler = partial(serve_hbone_tls, ssl_context=context, handler=stand_in.handle,
                              accepted_trust_domains=frozenset({"cluster.local"}))
            await trio.serve_tcp(handler, 15008, host=address, task_status=task_status)

    await nursery.start(run)
    return scope


async def wait_for_waypoint_config(mesh: Mesh, pod_ip: str, timeout: float = 10.0) -> None:
    """Until node-1's ztunnel holds the httpbin Service's waypoint and the waypoint pod."""
    state = mesh.ztunnels["node-1"].state
    with trio.fail_after(timeout):
        while True:
            httpbin = state.service(HTTPBIN_KEY)
            waypoint_pod = state.workload_by_address(pod_ip)
            if (httpbin is not None and httpbin.waypoint == GatewayAddress(WAYPOINT_HOST)
                    and waypoint_pod is not None):
                return
            await trio.sleep(0.05)


def opened_inbound(text: str) -> float:
    return sum(metric_samples(text, "istio_tcp_connections_opened_total",
                              reporter="destination"))


async def test_service_traffic_goes_through_the_waypoint_and_fails_closed(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    node_ip, pod_ip, vip = loopback.new(), loopback.new(), loopback.new()
    stand_in = StandInWaypoint(upstream_ip=mesh.addr(HTTPBIN_V1))
    stop_stand_in = await start_stand_in(nursery, mesh, pod_ip, stand_in)
    mesh.write_config_file("50-waypoint.yaml", waypoint_yaml(node_ip, pod_ip, vip))
    mesh.write_config_file("20-httpbin.yaml", httpbin_with_waypoint())
    await wait_for_waypoint_config(mesh, pod_ip)
    inbound_before = opened_inbound(await fetch_metrics(mesh, NODE_2))

    stream = await mesh.connect(SLEEP, HTTPBIN_VIP, HTTP_PORT)
    async with stream:
        status, _headers, body = await http_get(stream, "httpbin", "/get")
    assert status == 200
    assert json.loads(body)["pod"] == "httpbin-v1"
    # The VIP and service port, not an endpoint; the caller authenticated as sleep.
    assert stand_in.calls == [(f"{mesh.addr(HTTPBIN_VIP)}:{HTTP_PORT}", SLEEP_IDENTITY)]
    # Nothing went to httpbin's ztunnel directly.
    assert opened_inbound(await fetch_metrics(mesh, NODE_2)) == inbound_before
    source_metrics = await fetch_metrics(mesh, NODE_1)
    assert metric_samples(
        source_metrics, "istio_tcp_connections_opened_total", reporter="source",
        destination_workload="waypoint",
        destination_principal=str(WAYPOINT_IDENTITY),
        destination_service="httpbin.demo.svc.cluster.local",
    ) == [1.0]

    # The waypoint goes away, its Workload stays: the dial fails and the client is refused.
    stop_stand_in.cancel()
    with pytest.raises(Socks5ConnectError) as caught:
        await mesh.connect(SLEEP, HTTPBIN_VIP, HTTP_PORT)
    assert caught.value.reply_code == socks5.HOST_UNREACHABLE
    assert len(stand_in.calls) == 1

    # The waypoint's pod is gone too: unresolvable, refused before any dial (fail closed).
    mesh.write_config_file("50-waypoint.yaml",
                           waypoint_yaml(node_ip, pod_ip, vip, with_pod=False))
    state = mesh.ztunnels["node-1"].state
    with trio.fail_after(10):
        while state.workload_by_address(pod_ip) is not None:
            await trio.sleep(0.05)
    with pytest.raises(OutboundRefused) as refused:
        plan_outbound(state, node="node-1", source_ip=mesh.addr(SLEEP),
                      host=mesh.addr(HTTPBIN_VIP), port=HTTP_PORT)
    assert refused.value.reason == (f"waypoint {WAYPOINT_HOST} is unavailable: "
                                    f"service demo/{WAYPOINT_HOST} has no healthy endpoint")
    with pytest.raises(Socks5ConnectError) as caught:
        await mesh.connect(SLEEP, HTTPBIN_VIP, HTTP_PORT)
    assert caught.value.reply_code == socks5.HOST_UNREACHABLE
    assert opened_inbound(await fetch_metrics(mesh, NODE_2)) == inbound_before
    refused_samples = metric_samples(
        await fetch_metrics(mesh, NODE_1), "istio_tcp_connections_opened_total",
        reporter="source", source_workload="sleep", response_flags="UH",
    )
    assert refused_samples == [1.0]


# -- the discovery request names its kinds ---------------------------------------------------


def test_discovery_client_rejects_unknown_or_no_kinds() -> None:
    connection = ControlPlaneConnection("https://127.0.0.1:1", "t", client_ssl_context(TestPki()))
    state = ProxyState()
    with pytest.raises(ValueError, match="unknown resource kind\\(s\\) gateway"):
        DiscoveryClient(connection, "n", state, kinds=["workload", "gateway"])
    with pytest.raises(ValueError, match="at least one"):
        DiscoveryClient(connection, "n", state, kinds=[])
    with pytest.raises(TypeError):
        DiscoveryClient(connection, "n", state, kinds="workload")


async def test_discovery_request_names_kinds_and_all_kinds_reach_the_state(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    pki = TestPki()
    route = l7.HttpRoute("r", "demo", parents=(HTTPBIN_KEY,))
    sleep = workload("sleep", "node-1", address="127.0.20.1")
    fake = ScriptedIstiod([
        StreamScript(lines=[ndjson(DeltaUpdate("n1", 1, resources=(resource_update(sleep),)))]),
        StreamScript(lines=[ndjson(DeltaUpdate("n2", 2, resources=(
            resource_update(sleep), resource_update(route))))]),
    ])
    url = await start_scripted_istiod(nursery, tmp_path, loopback.new(), pki, fake)
    async with ControlPlaneConnection(url, "token", client_ssl_context(pki)) as connection:
        ztunnel_state = ProxyState()
        ztunnel_client: DiscoveryClient[AppliedChange] = DiscoveryClient(
            connection, "node-1", ztunnel_state)
        waypoint_state = ProxyState()
        changes: list[AppliedChange] = []
        waypoint_client = DiscoveryClient(connection, "waypoint", waypoint_state,
                                          changes.append, kinds=kinds.ALL_KINDS)
        await nursery.start(ztunnel_client.run)
        with trio.fail_after(5):
            await ztunnel_client.synced.wait()
        await nursery.start(waypoint_client.run)
        with trio.fail_after(5):
            await waypoint_client.synced.wait()
            await fake.wait_for_acks(2)
        assert [r.node for r in fake.requests] == ["node-1", "waypoint"]
        assert set(fake.requests[0].kinds) == kinds.L4_KINDS
        assert fake.requests[1].kinds == tuple(sorted(kinds.ALL_KINDS))
        assert waypoint_state.resources_of(l7.HttpRoute) == [route]
        assert changes[0].of("httproute").added == {route.key}
        assert waypoint_client.status()["kinds"] == sorted(kinds.ALL_KINDS)
        assert all(a.error is None for a in fake.acks)
