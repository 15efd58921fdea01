"""ztunnel.outbound.plan_outbound: who may call out, where the call really goes, and the
SOCKS5 reply for every refusal -- without sockets."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ambient_api.identity import SpiffeId
from ambient_api.model import (
    GatewayAddress,
    NetworkAddress,
    PortMapping,
    Resource,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ambient_dataplane.labels import ResponseFlag
from ambient_dataplane.state import ProxyState
from tests.deltas import delta
from ztunnel import socks5
from ztunnel.errors import OutboundRefused
from ztunnel.outbound import OutboundPlan, plan_outbound, service_for_hostname

NODE = "node-1"
HTTPBIN_KEY = "demo/httpbin.demo.svc.cluster.local"
LEGACY_SVC_KEY = "demo/legacy.demo.svc.cluster.local"
EMPTY_KEY = "demo/empty.demo.svc.cluster.local"


def pod(
    name: str,
    ip: str,
    *,
    node: str = NODE,
    protocol: TunnelProtocol = TunnelProtocol.HBONE,
    services: tuple[str, ...] = (),
    status: WorkloadStatus = WorkloadStatus.HEALTHY,
    sa: str | None = None,
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/demo/{name}",
        name=name,
        namespace="demo",
        addresses=(ip,),
        service_account=sa or name,
        node=node,
        tunnel_protocol=protocol,
        services=services,
        status=status,
    )


def service(name: str, vip: str, port: int, target_port: int) -> Service:
    return Service(
        name=name,
        namespace="demo",
        hostname=f"{name}.demo.svc.cluster.local",
        addresses=(NetworkAddress("", vip),),
        ports=(PortMapping(port, target_port),),
    )


SLEEP = pod("sleep", "10.0.0.1")
LEGACY_CLIENT = pod("legacy-client", "10.0.0.5", protocol=TunnelProtocol.NONE)
REMOTE_CLIENT = pod("remote-client", "10.0.0.6", node="node-2")
HTTPBIN_V1 = pod("httpbin-v1", "10.0.1.1", node="node-2", services=(HTTPBIN_KEY,), sa="httpbin")
HTTPBIN_V2 = pod("httpbin-v2", "10.0.1.2", node="node-2", services=(HTTPBIN_KEY,), sa="httpbin")
LEGACY_SERVER = pod("legacy-server", "10.0.2.1", node="node-2", services=(LEGACY_SVC_KEY,),
                    protocol=TunnelProtocol.NONE)
SICK = pod("sick", "10.0.3.1", node="node-2", services=(EMPTY_KEY,),
           status=WorkloadStatus.UNHEALTHY)
HTTPBIN = service("httpbin", "10.96.0.1", 8000, 8080)
LEGACY_SVC = service("legacy", "10.96.0.2", 80, 8081)
EMPTY = service("empty", "10.96.0.3", 80, 80)


@pytest.fixture
def state() -> ProxyState:
    proxy_state = ProxyState()
    proxy_state.apply(delta(SLEEP, LEGACY_CLIENT, REMOTE_CLIENT, HTTPBIN_V1, HTTPBIN_V2,
                            LEGACY_SERVER, SICK, HTTPBIN, LEGACY_SVC, EMPTY))
    return proxy_state


def plan(state: ProxyState, host: str, port: int, source_ip: str = "10.0.0.1") -> OutboundPlan:
    return plan_outbound(state, node=NODE, source_ip=source_ip, host=host, port=port)


def refusal(
    state: ProxyState, host: str, port: int, source_ip: str = "10.0.0.1"
) -> OutboundRefused:
    with pytest.raises(OutboundRefused) as caught:
        plan(state, host, port, source_ip)
    return caught.value


# -- who may call ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_ip", "why"),
    [("10.9.9.9", "unknown address"), ("10.0.0.6", "workload of another node"),
     ("10.0.0.5", "local pod outside the mesh (tunnel protocol NONE)"),
     ("not-an-ip", "not an address at all")],
)
def test_source_that_is_not_a_local_mesh_workload_is_refused_with_2(
    state: ProxyState, source_ip: str, why: str
) -> None:
    refused = refusal(state, "10.96.0.1", 8000, source_ip)
    assert refused.reply_code == socks5.CONNECTION_NOT_ALLOWED, why
    assert refused.reason == f"{source_ip} is not a mesh workload on node {NODE}"


@pytest.mark.parametrize("port", [15001, 15006, 15008])
def test_proxy_port_destination_is_refused_with_2(state: ProxyState, port: int) -> None:
    refused = refusal(state, "10.0.1.1", port)
    assert refused.reply_code == socks5.CONNECTION_NOT_ALLOWED
    assert f"port {port} is a proxy port" in refused.reason


# -- where the call goes --------------------------------------------------------------------


def test_service_vip_goes_to_an_endpoint_over_hbone_with_the_target_port(
    state: ProxyState,
) -> None:
    first, second = plan(state, "10.96.0.1", 8000), plan(state, "10.96.0.1", 8000)
    assert first.source == SLEEP
    assert {first.destination.ip, second.destination.ip} == {"10.0.1.1", "10.0.1.2"}
    for chosen in (first, second):
        assert chosen.destination.kind == "service"
        assert chosen.destination.port == 8080
        assert chosen.destination.use_hbone
        assert chosen.destination.service == HTTPBIN
        assert chosen.destination_identity == SpiffeId("cluster.local", "demo", "httpbin")


@pytest.mark.parametrize(
    "host",
    ["httpbin.demo", "httpbin.demo.svc", "httpbin.demo.svc.cluster.local",
     "httpbin.demo.svc.cluster.local.", "HTTPBIN.Demo.SVC.cluster.local"],
)
def test_mesh_hostname_forms_resolve_to_the_service(state: ProxyState, host: str) -> None:
    assert service_for_hostname(state, host) == HTTPBIN
    chosen = plan(state, host, 8000)
    assert chosen.destination.service == HTTPBIN
    assert chosen.destination.use_hbone


@pytest.mark.parametrize(
    "host",
    ["example.com", "httpbin", "nope.demo", "httpbin.other.svc",
     # Starts like a mesh name but is another domain: never the mesh service.
     "httpbin.demo.example.com", "httpbin.demo.svc.evil.example", "httpbin.demo.svc.cluster"],
)
def test_unknown_hostname_is_refused_with_4(state: ProxyState, host: str) -> None:
    refused = refusal(state, host, 8000)
    assert refused.reply_code == socks5.HOST_UNREACHABLE
    assert refused.reason == f"{host} is not a mesh service"
    assert refused.response_flags == ResponseFlag.NO_ROUTE


def test_service_without_a_healthy_endpoint_is_refused_with_4(state: ProxyState) -> None:
    refused = refusal(state, "10.96.0.3", 80)
    assert refused.reply_code == socks5.HOST_UNREACHABLE
    assert refused.reason == f"service {EMPTY_KEY} has no healthy endpoint"
    assert refused.response_flags == ResponseFlag.NO_HEALTHY_UPSTREAM
    # Named by hostname, the same answer.
    assert refusal(state, "empty.demo", 80).reply_code == socks5.HOST_UNREACHABLE


def test_service_port_that_is_not_declared_is_refused_with_4(state: ProxyState) -> None:
    refused = refusal(state, "httpbin.demo", 9999)
    assert refused.reply_code == socks5.HOST_UNREACHABLE
    assert "has no port 9999" in refused.reason


def test_mesh_pod_address_goes_straight_to_it_over_hbone(state: ProxyState) -> None:
    chosen = plan(state, "10.0.1.2", 9000)
    assert chosen.destination.kind == "workload"
    assert chosen.destination.address == ("10.0.1.2", 9000)
    assert chosen.destination.use_hbone
    assert chosen.destination_identity == SpiffeId("cluster.local", "demo", "httpbin")


def test_destination_outside_the_mesh_is_plaintext(state: ProxyState) -> None:
    by_pod = plan(state, "10.0.2.1", 8081)
    assert by_pod.destination.kind == "workload"
    assert not by_pod.destination.use_hbone
    assert by_pod.destination_identity is None
    by_service = plan(state, "legacy.demo.svc", 80)
    assert by_service.destination.kind == "service"
    assert by_service.destination.address == ("10.0.2.1", 8081)
    assert not by_service.destination.use_hbone
    assert by_service.destination_identity is None


def test_address_unknown_to_the_mesh_is_passthrough(state: ProxyState) -> None:
    chosen = plan(state, "192.0.2.7", 443)
    assert chosen.destination.kind == "passthrough"
    assert chosen.destination.address == ("192.0.2.7", 443)
    assert not chosen.destination.use_hbone
    assert chosen.destination_identity is None


# -- through a waypoint -----------------------------------------------------------------------

WAYPOINT_HOST = "waypoint.demo.svc.cluster.local"
WAYPOINT_KEY = f"demo/{WAYPOINT_HOST}"
WAYPOINT = GatewayAddress(WAYPOINT_HOST, hbone_port=15008)
WAYPOINT_SVC = service("waypoint", "10.96.0.9", 15008, 15008)
# A waypoint instance is reached directly on its HBONE port, enrolled or not.
WAYPOINT_POD = pod("waypoint", "10.0.9.1", node="node-3", services=(WAYPOINT_KEY,),
                   protocol=TunnelProtocol.NONE)
API_KEY = "demo/api.demo.svc.cluster.local"
API = replace(service("api", "10.96.0.5", 80, 8080), waypoint=WAYPOINT)
API_POD = replace(pod("api-0", "10.0.5.1", node="node-2", services=(API_KEY,), sa="api"),
                  waypoint=WAYPOINT)


def with_waypoint(state: ProxyState, *resources: Resource) -> ProxyState:
    state.apply(delta(WAYPOINT_SVC, WAYPOINT_POD, API, API_POD, *resources))
    return state


def assert_via_waypoint(chosen: OutboundPlan, authority: str) -> None:
    assert chosen.via_waypoint == WAYPOINT_POD
    assert chosen.hbone_address(15008) == ("10.0.9.1", 15008)
    assert chosen.authority == authority
    assert chosen.use_hbone
    assert chosen.destination_identity == SpiffeId("cluster.local", "demo", "waypoint")
    assert chosen.peer_workload == WAYPOINT_POD


@pytest.mark.parametrize("host", ["10.96.0.5", "api.demo.svc"])
def test_service_with_a_waypoint_goes_to_the_waypoint_with_the_vip_as_authority(
    state: ProxyState, host: str
) -> None:
    chosen = plan(with_waypoint(state), host, 80)
    assert_via_waypoint(chosen, "10.96.0.5:80")  # the VIP and the service port
    assert chosen.destination.kind == "service"
    assert chosen.destination.service == API
    assert chosen.destination.workload is None  # the waypoint picks the endpoint


def test_pod_with_a_waypoint_goes_to_the_waypoint_with_the_pod_as_authority(
    state: ProxyState,
) -> None:
    chosen = plan(with_waypoint(state), "10.0.5.1", 8080)
    assert_via_waypoint(chosen, "10.0.5.1:8080")
    assert chosen.destination.kind == "workload"
    assert chosen.destination.workload == API_POD
    assert chosen.destination.service is None


def test_waypoint_is_used_even_when_the_service_has_no_healthy_endpoint(
    state: ProxyState,
) -> None:
    sick = replace(API_POD, status=WorkloadStatus.UNHEALTHY)
    chosen = plan(with_waypoint(state, sick), "10.96.0.5", 80)
    assert_via_waypoint(chosen, "10.96.0.5:80")


def test_endpoints_waypoint_is_not_used_for_service_traffic(state: ProxyState) -> None:
    api = replace(API, waypoint=None)
    chosen = plan(with_waypoint(state, api), "10.96.0.5", 80)
    assert chosen.via_waypoint is None
    assert chosen.hbone_address(15008) == ("10.0.5.1", 15008)
    assert chosen.authority == "10.0.5.1:8080"
    assert chosen.destination_identity == SpiffeId("cluster.local", "demo", "api")


@pytest.mark.parametrize(
    ("missing", "detail"),
    [((("service", WAYPOINT_KEY),), f"no service {WAYPOINT_HOST}"),
     ((("workload", WAYPOINT_POD.uid),), f"service {WAYPOINT_KEY} has no healthy endpoint")],
)
@pytest.mark.parametrize(("host", "port"), [("10.96.0.5", 80), ("10.0.5.1", 8080)])
def test_unavailable_waypoint_refuses_and_never_bypasses(
    state: ProxyState, missing: tuple[tuple[str, str], ...], detail: str, host: str, port: int
) -> None:
    with_waypoint(state)
    state.apply(delta(removed=missing))
    refused = refusal(state, host, port)
    assert refused.reply_code == socks5.HOST_UNREACHABLE
    assert refused.reason == f"waypoint {WAYPOINT_HOST} is unavailable: {detail}"
    assert refused.response_flags == ResponseFlag.NO_HEALTHY_UPSTREAM == "UH"


def test_unhealthy_waypoint_refuses(state: ProxyState) -> None:
    sick = replace(WAYPOINT_POD, status=WorkloadStatus.UNHEALTHY)
    refused = refusal(with_waypoint(state, sick), "10.96.0.5", 80)
    assert refused.reply_code == socks5.HOST_UNREACHABLE
    assert refused.reason.startswith(f"waypoint {WAYPOINT_HOST} is unavailable")


def test_the_waypoint_itself_is_not_sent_back_to_the_waypoint(state: ProxyState) -> None:
    local_waypoint = replace(WAYPOINT_POD, node=NODE, tunnel_protocol=TunnelProtocol.HBONE)
    chosen = plan(with_waypoint(state, local_waypoint), "10.96.0.5", 80, source_ip="10.0.9.1")
    assert chosen.via_waypoint is None
    assert chosen.destination.workload == API_POD
    assert chosen.authority == "10.0.5.1:8080"
