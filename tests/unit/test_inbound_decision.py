"""ztunnel.inbound.decide_inbound: every answer an inbound CONNECT can get, without sockets.

The state is built the way the proxy builds it, through ``ProxyState.apply`` of a
``DeltaUpdate``, so the decision is tested against real indexes and policy scoping.
"""

from __future__ import annotations

import pytest

from ambient_api.identity import SpiffeId
from ambient_api.model import (
    Authorization,
    AuthorizationAction,
    AuthorizationScope,
    Clause,
    Match,
    Rule,
    TunnelProtocol,
    Workload,
)
from ambient_dataplane.hbone import HboneRejection
from ambient_dataplane.state import ProxyState
from tests.deltas import delta
from ztunnel.errors import InboundRefused
from ztunnel.inbound import LOOP_GUARD_PORTS, InboundTarget, decide_inbound

ROOT_NAMESPACE = "istio-system"
NODE = "node-1"
SLEEP_ID = SpiffeId("cluster.local", "demo", "sleep")
NOTSLEEP_ID = SpiffeId("cluster.local", "demo", "notsleep")


def pod(
    name: str,
    ip: str,
    *,
    node: str = NODE,
    protocol: TunnelProtocol = TunnelProtocol.HBONE,
    policies: tuple[str, ...] = (),
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/demo/{name}",
        name=name,
        namespace="demo",
        addresses=(ip,),
        service_account=name,
        node=node,
        tunnel_protocol=protocol,
        authorization_policies=policies,
    )


def policy(name: str, action: AuthorizationAction, match: Match) -> Authorization:
    return Authorization(name, "demo", AuthorizationScope.WORKLOAD_SELECTOR, action,
                         (Rule((Clause((match,)),)),))


ALLOW_SLEEP = policy("allow-sleep", AuthorizationAction.ALLOW,
                     Match(principals=("cluster.local/ns/demo/sa/sleep",)))
# Evaluated before any ALLOW: sleep is allowed in general but never to port 9999.
DENY_PORT = policy("deny-9999", AuthorizationAction.DENY, Match(destination_ports=(9999,)))

WEB = pod("web", "10.0.0.1", policies=("demo/allow-sleep", "demo/deny-9999"))
OPEN = pod("open", "10.0.0.2")  # no policy at all
LEGACY = pod("legacy", "10.0.0.5", protocol=TunnelProtocol.NONE)
REMOTE = pod("remote", "10.0.0.3", node="node-2")


@pytest.fixture
def state() -> ProxyState:
    proxy_state = ProxyState()
    proxy_state.apply(delta(WEB, OPEN, LEGACY, REMOTE, ALLOW_SLEEP, DENY_PORT))
    return proxy_state


def decide(
    state: ProxyState,
    target_ip: str,
    target_port: int = 8000,
    *,
    listener_ip: str | None = None,
    identity: SpiffeId | None = SLEEP_ID,
    source_ip: str = "10.0.0.3",
) -> InboundTarget:
    return decide_inbound(
        state, node=NODE, listener_ip=listener_ip or target_ip, target_ip=target_ip,
        target_port=target_port, source_ip=source_ip, source_identity=identity,
        root_namespace=ROOT_NAMESPACE,
    )


def rejection(state: ProxyState, *args: object, **kwargs: object) -> HboneRejection:
    with pytest.raises(HboneRejection) as caught:
        decide(state, *args, **kwargs)  # type: ignore[arg-type]
    return caught.value


def test_allowed_caller_gets_the_target(state: ProxyState) -> None:
    target = decide(state, "10.0.0.1", 8000)
    assert target.workload == WEB
    assert target.port == 8000
    assert target.policy_reason == "allowed by demo/allow-sleep"


def test_workload_without_policies_admits_anyone_even_plaintext(state: ProxyState) -> None:
    target = decide(state, "10.0.0.2", 80, identity=None)
    assert target.workload == OPEN
    assert target.policy_reason == "no ALLOW policy applies"


def test_ipv4_mapped_target_is_the_same_workload(state: ProxyState) -> None:
    target = decide(state, "::ffff:10.0.0.1", listener_ip="10.0.0.1")
    assert target.workload == WEB


@pytest.mark.parametrize("target", ["web.demo.svc.cluster.local", "", "10.0.0", "1.2.3.4.5"])
def test_target_that_is_not_an_ip_is_400(state: ProxyState, target: str) -> None:
    refused = rejection(state, target, listener_ip="10.0.0.1")
    assert refused.status == 400
    assert "is not an IP address" in refused.reason


def test_unknown_address_is_400(state: ProxyState) -> None:
    refused = rejection(state, "10.9.9.9")
    assert (refused.status, refused.reason) == (400, "10.9.9.9 is not a workload on node node-1")


def test_workload_of_another_node_is_400(state: ProxyState) -> None:
    refused = rejection(state, "10.0.0.3")
    assert refused.status == 400
    assert "not a workload on node node-1" in refused.reason


def test_local_workload_served_by_another_listener_is_400(state: ProxyState) -> None:
    refused = rejection(state, "10.0.0.2", listener_ip="10.0.0.1")
    assert refused.status == 400
    assert refused.reason == "10.0.0.2 is not the workload served at 10.0.0.1"


@pytest.mark.parametrize("port", sorted(LOOP_GUARD_PORTS))
def test_proxy_ports_are_400_loop_guard(state: ProxyState, port: int) -> None:
    refused = rejection(state, "10.0.0.1", port)
    assert refused.status == 400
    assert f"port {port} is a proxy port" in refused.reason


def test_loop_guard_covers_the_three_proxy_ports() -> None:
    assert frozenset({15001, 15006, 15008}) == LOOP_GUARD_PORTS


def test_workload_outside_the_mesh_is_503(state: ProxyState) -> None:
    refused = rejection(state, "10.0.0.5")
    assert refused.status == 503
    assert refused.reason == "workload demo/legacy is not in the mesh"


def test_identity_the_allow_policy_does_not_name_is_401(state: ProxyState) -> None:
    refused = rejection(state, "10.0.0.1", identity=NOTSLEEP_ID)
    assert (refused.status, refused.reason) == (401, "no ALLOW policy matched")


def test_plaintext_caller_under_an_allow_policy_is_401(state: ProxyState) -> None:
    assert rejection(state, "10.0.0.1", identity=None).status == 401


def test_deny_wins_before_allow(state: ProxyState) -> None:
    refused = rejection(state, "10.0.0.1", 9999, identity=SLEEP_ID)
    assert (refused.status, refused.reason) == (401, "denied by DENY policy demo/deny-9999")


def test_namespace_wide_deny_applies_to_every_workload(state: ProxyState) -> None:
    strict = Authorization(
        "converted-peer-authentication-default", "demo", AuthorizationScope.NAMESPACE,
        AuthorizationAction.DENY, (Rule((Clause((Match(not_principals=("*",)),)),)),),
    )
    state.apply(delta(strict))
    refused = rejection(state, "10.0.0.2", identity=None)
    assert refused.status == 401
    assert "converted-peer-authentication-default" in refused.reason
    assert decide(state, "10.0.0.2", identity=NOTSLEEP_ID).workload == OPEN


def test_checks_run_in_order_ours_then_port_then_mesh_then_policy(state: ProxyState) -> None:
    """A request that is wrong in several ways is told the most basic thing first."""
    # Remote workload on a proxy port: "not ours" wins over the loop guard.
    assert "not a workload on node" in rejection(state, "10.0.0.3", 15008).reason
    # Legacy pod on a proxy port: the loop guard wins over "not in the mesh".
    assert rejection(state, "10.0.0.5", 15006).status == 400
    # Out-of-mesh pod and a denied caller: 503 before policy is looked at.
    assert rejection(state, "10.0.0.5", identity=None).status == 503


def test_a_rejection_is_answered_with_its_status_and_reported_uaex_only_for_policy() -> None:
    denied = InboundRefused.from_rejection(HboneRejection(401, "no ALLOW policy matched"))
    assert (denied.status_hint, denied.response_flags, denied.reason) == (
        401, "UAEX", "no ALLOW policy matched")
    not_ours = InboundRefused.from_rejection(HboneRejection(400, "not a workload here"))
    assert (not_ours.status_hint, not_ours.response_flags) == (400, "-")
