"""ztunnel.outbound.OwnEndpoints: a pod never reaches its node proxy's own ports through the
proxy (issue 11): the admin server (and its ``/quitquitquit``), metrics, readiness, SOCKS5 and
the capture ports, on the node address and on loopback; other destinations stay reachable."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient_api.model import NetworkAddress, PortMapping, Service
from ambient_dataplane.state import ProxyState
from tests.deltas import delta
from tests.unit.test_outbound_plan import HTTPBIN_V1, SLEEP, pod
from ztunnel import socks5
from ztunnel.config import ZtunnelConfig
from ztunnel.errors import OutboundRefused
from ztunnel.outbound import OwnEndpoints, plan_outbound

NODE = "node-1"
NODE_ADDRESS = "10.1.0.1"
OWN = OwnEndpoints.of(ZtunnelConfig(
    node=NODE, node_address=NODE_ADDRESS, xds_address=("10.96.0.10", 15012),
    root_cert=Path("/unused"), token="unused",
))
# A Service whose endpoint is the node's own admin port (an endpoint nobody should pick).
SNEAKY = Service(
    name="sneaky", namespace="demo", hostname="sneaky.demo.svc.cluster.local",
    addresses=(NetworkAddress("", "10.96.0.66"),), ports=(PortMapping(80, 15000),),
)
SNEAKY_BACKEND = pod("sneaky", NODE_ADDRESS, node="node-2",
                     services=("demo/sneaky.demo.svc.cluster.local",))


@pytest.fixture
def state() -> ProxyState:
    proxy_state = ProxyState()
    proxy_state.apply(delta(SLEEP, HTTPBIN_V1, SNEAKY_BACKEND, SNEAKY))
    return proxy_state


def refusal(state: ProxyState, host: str, port: int) -> OutboundRefused:
    with pytest.raises(OutboundRefused) as caught:
        plan_outbound(state, node=NODE, source_ip="10.0.0.1", host=host, port=port, own=OWN)
    return caught.value


@pytest.mark.parametrize("port", [15000, 15020, 15021, 15080, 15001, 15006, 15008])
@pytest.mark.parametrize("host", [NODE_ADDRESS, "127.0.0.1", "127.9.9.9", "::1", "0.0.0.0",
                                  "::ffff:127.0.0.1"])
def test_the_node_proxys_own_ports_are_refused_with_2(
    state: ProxyState, host: str, port: int
) -> None:
    refused = refusal(state, host, port)
    assert refused.reply_code == socks5.CONNECTION_NOT_ALLOWED
    assert "proxy" in refused.reason and str(port) in refused.reason


def test_the_refusal_names_the_endpoint(state: ProxyState) -> None:
    refused = refusal(state, NODE_ADDRESS, 15000)
    assert refused.reason == (
        f"{NODE_ADDRESS}:15000 is the node proxy's own port and cannot be a target"
    )


def test_an_endpoint_that_resolves_to_the_proxy_is_refused(state: ProxyState) -> None:
    refused = refusal(state, "sneaky.demo.svc.cluster.local", 80)
    assert refused.reply_code == socks5.CONNECTION_NOT_ALLOWED
    assert f"{NODE_ADDRESS}:15000" in refused.reason


@pytest.mark.parametrize(("host", "port"), [
    (NODE_ADDRESS, 8080),  # another port on the node: not the proxy's
    ("10.1.0.2", 15000),  # another node's admin port: an ordinary destination
    ("192.0.2.7", 15012),  # istiod, reached as any service is (as in Istio)
])
def test_other_destinations_stay_reachable(state: ProxyState, host: str, port: int) -> None:
    plan = plan_outbound(state, node=NODE, source_ip="10.0.0.1", host=host, port=port, own=OWN)
    assert plan.destination.address == (host, port)


def test_without_own_endpoints_only_the_loop_guard_ports_are_refused(state: ProxyState) -> None:
    plan = plan_outbound(state, node=NODE, source_ip="10.0.0.1", host="127.0.0.1", port=15000)
    assert plan.destination.address == ("127.0.0.1", 15000)
    with pytest.raises(OutboundRefused, match="port 15008 is a proxy port"):
        plan_outbound(state, node=NODE, source_ip="10.0.0.1", host="127.0.0.1", port=15008)
