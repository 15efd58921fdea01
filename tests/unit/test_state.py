"""ambient_dataplane.state: all-or-nothing apply, indexes, policy scoping, destinations."""

from __future__ import annotations

import json

import pytest

from ambient_api import codec, kinds, l7
from ambient_api.codec import DecodeError
from ambient_api.discovery import DeltaUpdate, ResourceUpdate, versioned_key
from ambient_api.identity import SpiffeId
from ambient_api.model import (
    Authorization,
    AuthorizationAction,
    AuthorizationScope,
    Clause,
    GatewayAddress,
    Match,
    NetworkAddress,
    Node,
    PortMapping,
    Rule,
    Service,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
)
from ambient_dataplane.state import KINDS, ProxyState, ResolveError
from tests.deltas import delta
from ztunnel.authz import ConnectionAttributes, evaluate


def pod(
    name: str,
    ip: str,
    *,
    namespace: str = "demo",
    node: str = "node-1",
    sa: str | None = None,
    services: tuple[str, ...] = (),
    status: WorkloadStatus = WorkloadStatus.HEALTHY,
    protocol: TunnelProtocol = TunnelProtocol.HBONE,
    policies: tuple[str, ...] = (),
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        addresses=(ip,) if ip else (),
        service_account=sa or name,
        node=node,
        services=services,
        status=status,
        tunnel_protocol=protocol,
        authorization_policies=policies,
    )


def svc(name: str, vip: str, *ports: tuple[int, int], namespace: str = "demo") -> Service:
    return Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.cluster.local",
        addresses=(NetworkAddress("", vip),),
        ports=tuple(PortMapping(p, t) for p, t in ports),
    )


def authz(
    name: str,
    namespace: str,
    scope: AuthorizationScope,
    action: AuthorizationAction = AuthorizationAction.DENY,
    *matches: Match,
) -> Authorization:
    return Authorization(name, namespace, scope, action,
                         (Rule((Clause(matches),)),) if matches else ())


WEB_KEY = "demo/web.demo.svc.cluster.local"
WEB = svc("web", "10.96.0.10", (80, 8080))
WEB_1 = pod("web-1", "10.0.0.1", services=(WEB_KEY,), sa="web")
WEB_2 = pod("web-2", "10.0.0.2", services=(WEB_KEY,), sa="web")
SLEEP = pod("sleep", "10.0.0.3", node="node-2")
NODE_1 = Node("node-1", "127.0.10.1")


@pytest.fixture
def state() -> ProxyState:
    proxy_state = ProxyState()
    proxy_state.apply(delta(WEB, WEB_1, WEB_2, SLEEP, NODE_1))
    return proxy_state


def test_apply_indexes_everything(state: ProxyState) -> None:
    assert state.workload_by_address("10.0.0.1") == WEB_1
    assert state.workload_by_address("10.0.0.9") is None
    assert state.workload_by_address("not an ip") is None
    assert state.service_by_address("10.96.0.10") == WEB
    assert state.service_by_address("10.0.0.1") is None
    assert state.endpoints(WEB_KEY) == [WEB_1, WEB_2]
    assert state.endpoints("demo/other") == []
    assert state.node("node-1") == NODE_1
    assert state.node("node-9") is None
    assert state.workload(WEB_1.uid) == WEB_1
    assert state.service(WEB_KEY) == WEB


def test_first_apply_reports_additions() -> None:
    proxy_state = ProxyState()
    change = proxy_state.apply(delta(WEB, WEB_1, NODE_1))
    assert change.workloads.added == {WEB_1.uid}
    assert change.services.added == {WEB_KEY}
    assert change.nodes.added == {"node-1"}
    assert not change.authorizations
    assert change.generation == proxy_state.generation == 1
    assert not change.empty


def test_known_versions_track_updates_and_removals(state: ProxyState) -> None:
    versions = state.known_versions()
    assert versions[versioned_key("workload", WEB_1.uid)] == codec.content_version(WEB_1)
    assert versions[versioned_key("service", WEB_KEY)] == codec.content_version(WEB)
    assert len(versions) == 5
    moved = pod("web-1", "10.0.0.11", services=(WEB_KEY,), sa="web")
    state.apply(delta(moved, removed=(("node", "node-1"),)))
    versions = state.known_versions()
    assert versions[versioned_key("workload", WEB_1.uid)] == codec.content_version(moved)
    assert versioned_key("node", "node-1") not in versions
    # A copy: callers cannot corrupt the state.
    versions.clear()
    assert state.known_versions()


def test_update_moves_indexes(state: ProxyState) -> None:
    moved = pod("web-1", "10.0.0.11", services=(), sa="web")
    change = state.apply(delta(moved))
    assert change.workloads.updated == {WEB_1.uid}
    assert not change.workloads.added and not change.workloads.removed
    assert state.workload_by_address("10.0.0.1") is None
    assert state.workload_by_address("10.0.0.11") == moved
    assert state.endpoints(WEB_KEY) == [WEB_2]


def test_resending_identical_content_changes_nothing(state: ProxyState) -> None:
    generation = state.generation
    change = state.apply(delta(WEB_1, WEB))
    assert change.empty
    assert state.generation == generation == change.generation


def test_removals(state: ProxyState) -> None:
    change = state.apply(delta(removed=(("workload", WEB_1.uid), ("service", WEB_KEY))))
    assert change.workloads.removed == {WEB_1.uid}
    assert change.services.removed == {WEB_KEY}
    assert state.workload_by_address("10.0.0.1") is None
    assert state.service_by_address("10.96.0.10") is None
    assert state.endpoints(WEB_KEY) == [WEB_2]
    assert state.workload(WEB_1.uid) is None
    # Removing what is not there is harmless and reports nothing.
    assert state.apply(delta(removed=(("workload", "nope"),))).empty


def test_bad_resource_keeps_the_whole_old_state(state: ProxyState) -> None:
    before = (state.dump(), state.known_versions(), state.generation)
    good = pod("new", "10.0.0.50")
    bad = ResourceUpdate("workload", "Kubernetes//Pod/demo/bad", "v1",
                         {"uid": "Kubernetes//Pod/demo/bad", "name": "bad"})
    upd = delta(good, removed=(("workload", WEB_1.uid),))
    upd = DeltaUpdate(upd.nonce, upd.system_version, upd.resources + (bad,), upd.removed)
    with pytest.raises(DecodeError, match="workload/Kubernetes//Pod/demo/bad"):
        state.apply(upd)
    assert (state.dump(), state.known_versions(), state.generation) == before
    assert state.workload_by_address("10.0.0.50") is None
    assert state.workload_by_address("10.0.0.1") == WEB_1


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (ResourceUpdate("gateway", "x", "v", {}), "gateway/x: unknown resource kind"),
        (ResourceUpdate("node", "n", "v", {"name": "n", "address": "nowhere"}),
         "node/n.address: 'nowhere' is not an IP address"),
        (ResourceUpdate("node", "n", "v", {"name": "other", "address": "127.0.0.1"}),
         "node/n: the resource's key is 'other'"),
        (ResourceUpdate("workload", "w", "v", {**codec.to_jsonable(WEB_1), "uid": "w",
                                               "tunnel_protocol": "QUIC"}),
         "workload/w.tunnel_protocol: 'QUIC' is not one of"),
        (ResourceUpdate("workload", "w", "v", {**codec.to_jsonable(WEB_1), "uid": "w",
                                               "status": ["x"]}),
         "workload/w"),
        (ResourceUpdate("workload", "w", "v", {**codec.to_jsonable(WEB_1), "uid": "w",
                                               "addresses": ["10.0.0.300"]}),
         "'10.0.0.300' is not an IP address"),
        (ResourceUpdate("service", WEB_KEY, "v", {**codec.to_jsonable(WEB),
                                                  "ports": [{"service_port": 0,
                                                             "target_port": 1}]}),
         "service_port 0"),
        (ResourceUpdate("authorization", "demo/a", "v", {"name": "a", "namespace": "demo",
                                                         "scope": "NAMESPACE",
                                                         "action": "AUDIT"}),
         "authorization/demo/a.action"),
    ],
)
def test_decode_errors_name_the_resource(
    state: ProxyState, item: ResourceUpdate, message: str
) -> None:
    before = state.dump()
    with pytest.raises(DecodeError, match=message.replace("(", r"\(")):
        state.apply(DeltaUpdate("n", 1, resources=(item,)))
    assert state.dump() == before


def test_unknown_removal_kind_and_update_plus_removal_are_rejected(state: ProxyState) -> None:
    with pytest.raises(DecodeError, match="unknown resource kind 'pod'"):
        state.apply(delta(removed=(("pod", "x"),)))
    with pytest.raises(DecodeError, match="both updated and removed"):
        state.apply(delta(WEB_1, removed=(("workload", WEB_1.uid),)))
    assert state.workload(WEB_1.uid) == WEB_1


def test_address_reuse_latest_writer_wins(state: ProxyState) -> None:
    reused = pod("web-1-new", "10.0.0.1")
    state.apply(delta(reused))
    assert state.workload_by_address("10.0.0.1") == reused
    state.apply(delta(removed=(("workload", reused.uid),)))
    assert state.workload_by_address("10.0.0.1") == WEB_1


def test_addresses_are_canonical_and_per_network() -> None:
    proxy_state = ProxyState()
    v6 = pod("v6", "fd00:0:0::1")
    other_net = Service("s", "demo", "s.demo", (NetworkAddress("net-2", "10.96.0.20"),),
                        (PortMapping(80, 80),))
    proxy_state.apply(delta(v6, other_net))
    assert proxy_state.workload_by_address("fd00::1") == v6
    assert proxy_state.service_by_address("10.96.0.20") is None
    assert proxy_state.service_by_address("10.96.0.20", network="net-2") == other_net
    assert proxy_state.service_by_address("::ffff:10.96.0.20", network="net-2") == other_net


def test_local_workloads_and_identities() -> None:
    proxy_state = ProxyState()
    captured_a = pod("a-1", "10.0.1.1", sa="a")
    captured_a2 = pod("a-2", "10.0.1.2", sa="a")
    not_enrolled = pod("legacy", "10.0.1.3", protocol=TunnelProtocol.NONE)
    elsewhere = pod("b", "10.0.1.4", node="node-2")
    proxy_state.apply(delta(captured_a, captured_a2, not_enrolled, elsewhere))
    assert proxy_state.local_workloads("node-1") == [captured_a, captured_a2]
    assert proxy_state.local_workloads("node-1", hbone_only=False) == [
        captured_a, captured_a2, not_enrolled
    ]
    assert proxy_state.local_identities("node-1") == {SpiffeId("cluster.local", "demo", "a")}
    assert proxy_state.local_identities("node-9") == set()
    # Moving a pod to another node moves its identity.
    proxy_state.apply(delta(pod("b", "10.0.1.4", node="node-1")))
    assert SpiffeId("cluster.local", "demo", "b") in proxy_state.local_identities("node-1")
    assert proxy_state.local_workloads("node-2") == []


class TestPolicyScoping:
    GLOBAL = authz("mesh-wide", "istio-system", AuthorizationScope.GLOBAL)
    GLOBAL_ELSEWHERE = authz("odd", "demo", AuthorizationScope.GLOBAL)
    DEMO_NS = authz("ns-wide", "demo", AuthorizationScope.NAMESPACE)
    OPS_NS = authz("ns-wide", "ops", AuthorizationScope.NAMESPACE)
    SELECTOR = authz("web-only", "demo", AuthorizationScope.WORKLOAD_SELECTOR)
    OTHER_SELECTOR = authz("sleep-only", "demo", AuthorizationScope.WORKLOAD_SELECTOR)

    def make(self) -> tuple[ProxyState, Workload, Workload]:
        proxy_state = ProxyState()
        web = pod("web", "10.0.2.1", policies=("demo/web-only", "demo/missing"))
        ops = pod("tool", "10.0.2.2", namespace="ops")
        proxy_state.apply(delta(self.GLOBAL, self.GLOBAL_ELSEWHERE, self.DEMO_NS,
                                 self.OPS_NS, self.SELECTOR, self.OTHER_SELECTOR, web, ops))
        return proxy_state, web, ops

    def test_scoping(self) -> None:
        proxy_state, web, ops = self.make()
        assert proxy_state.policies_for(web) == [self.GLOBAL, self.DEMO_NS, self.SELECTOR]
        assert proxy_state.policies_for(ops) == [self.GLOBAL, self.OPS_NS]

    def test_other_root_namespace(self) -> None:
        proxy_state, web, _ = self.make()
        assert proxy_state.policies_for(web, root_namespace="demo") == [
            self.GLOBAL_ELSEWHERE, self.DEMO_NS, self.SELECTOR
        ]

    def test_removed_policy_stops_applying(self) -> None:
        proxy_state, web, _ = self.make()
        change = proxy_state.apply(delta(removed=(("authorization", "istio-system/mesh-wide"),
                                                   ("authorization", "demo/ns-wide"))))
        assert change.authorizations.removed == {"istio-system/mesh-wide", "demo/ns-wide"}
        assert proxy_state.policies_for(web) == [self.SELECTOR]

    def test_scope_change_reindexes(self) -> None:
        proxy_state, web, ops = self.make()
        now_global = authz("ns-wide", "ops", AuthorizationScope.GLOBAL)
        proxy_state.apply(delta(Authorization("ns-wide", "ops", AuthorizationScope.GLOBAL,
                                               AuthorizationAction.DENY)))
        assert proxy_state.policies_for(ops) == [self.GLOBAL]
        assert proxy_state.policies_for(ops, root_namespace="ops") == [now_global]

    def test_policies_for_feeds_evaluate(self) -> None:
        """The STRICT peer-authentication DENY in the root namespace blocks plaintext to
        every workload, and a selector ALLOW narrows who may reach one workload."""
        proxy_state = ProxyState()
        strict = authz("converted-peer-authentication-default", "istio-system",
                       AuthorizationScope.GLOBAL, AuthorizationAction.DENY,
                       Match(not_principals=("*",)))
        only_sleep = authz("web-only", "demo", AuthorizationScope.WORKLOAD_SELECTOR,
                           AuthorizationAction.ALLOW,
                           Match(principals=("cluster.local/ns/demo/sa/sleep",)))
        web = pod("web", "10.0.2.1", policies=("demo/web-only",))
        other = pod("other", "10.0.2.3")
        proxy_state.apply(delta(strict, only_sleep, web, other))
        sleep = SpiffeId("cluster.local", "demo", "sleep")
        admin = SpiffeId("cluster.local", "ops", "admin")

        def allowed(target: Workload, identity: SpiffeId | None) -> bool:
            connection = ConnectionAttributes("10.0.0.3", identity, target.addresses[0], 80)
            return evaluate(proxy_state.policies_for(target), connection).allowed

        assert allowed(web, sleep)
        assert not allowed(web, admin)
        assert not allowed(web, None)
        assert allowed(other, admin)
        assert not allowed(other, None)


def test_resolve_service_round_robin_and_port_mapping(state: ProxyState) -> None:
    picks = [state.resolve("10.96.0.10", 80) for _ in range(4)]
    assert [d.workload for d in picks] == [WEB_1, WEB_2, WEB_1, WEB_2]
    first = picks[0]
    assert first.kind == "service"
    assert first.address == ("10.0.0.1", 8080)
    assert first.service == WEB
    assert first.use_hbone


def test_resolve_skips_unhealthy_and_addressless(state: ProxyState) -> None:
    sick = pod("web-2", "10.0.0.2", services=(WEB_KEY,), sa="web",
               status=WorkloadStatus.UNHEALTHY)
    no_ip = pod("web-3", "", services=(WEB_KEY,), sa="web")
    state.apply(delta(sick, no_ip))
    assert len(state.endpoints(WEB_KEY)) == 3
    assert {state.resolve("10.96.0.10", 80).workload for _ in range(5)} == {WEB_1}


def test_resolve_errors(state: ProxyState) -> None:
    with pytest.raises(ResolveError, match=f"service {WEB_KEY} has no port 443"):
        state.resolve("10.96.0.10", 443)
    state.apply(delta(removed=(("workload", WEB_1.uid), ("workload", WEB_2.uid))))
    with pytest.raises(ResolveError, match="has no healthy endpoint") as raised:
        state.resolve("10.96.0.10", 80)
    assert raised.value.reason == f"service {WEB_KEY} has no healthy endpoint"
    with pytest.raises(ResolveError, match="not an IP address"):
        state.resolve("web", 80)


def test_resolve_target_port_zero_keeps_service_port() -> None:
    proxy_state = ProxyState()
    service = svc("db", "10.96.0.30", (5432, 0))
    proxy_state.apply(delta(service, pod("db-0", "10.0.3.1",
                                          services=("demo/db.demo.svc.cluster.local",))))
    assert proxy_state.resolve("10.96.0.30", 5432).port == 5432


def test_resolve_workload_and_passthrough(state: ProxyState) -> None:
    legacy = pod("legacy", "10.0.0.40", protocol=TunnelProtocol.NONE)
    state.apply(delta(legacy))
    direct = state.resolve("10.0.0.1", 8080)
    assert (direct.kind, direct.workload, direct.address, direct.use_hbone) == (
        "workload", WEB_1, ("10.0.0.1", 8080), True)
    assert direct.service is None
    plain = state.resolve("10.0.0.40", 80)
    assert (plain.kind, plain.workload, plain.use_hbone) == ("workload", legacy, False)
    outside = state.resolve("192.0.2.7", 443)
    assert (outside.kind, outside.workload, outside.service, outside.use_hbone) == (
        "passthrough", None, None, False)
    assert outside.address == ("192.0.2.7", 443)


def test_resolve_to_plaintext_endpoint_and_waypoint() -> None:
    proxy_state = ProxyState()
    waypoint = GatewayAddress("waypoint.demo.svc.cluster.local")
    service = Service("api", "demo", "api.demo", (NetworkAddress("", "10.96.0.40"),),
                      (PortMapping(80, 8080),), waypoint=waypoint)
    endpoint = pod("api-0", "10.0.4.1", services=("demo/api.demo",),
                   protocol=TunnelProtocol.NONE)
    proxy_state.apply(delta(service, endpoint))
    destination = proxy_state.resolve("10.96.0.40", 80)
    assert not destination.use_hbone
    assert destination.waypoint == waypoint


def test_round_robin_is_per_service() -> None:
    proxy_state = ProxyState()
    a = svc("a", "10.96.1.1", (80, 80))
    b = svc("b", "10.96.1.2", (80, 80))
    keys = ("demo/a.demo.svc.cluster.local", "demo/b.demo.svc.cluster.local")
    one, two = pod("x-1", "10.0.5.1", services=keys), pod("x-2", "10.0.5.2", services=keys)
    proxy_state.apply(delta(a, b, one, two))
    assert proxy_state.resolve("10.96.1.1", 80).workload == one
    assert proxy_state.resolve("10.96.1.2", 80).workload == one
    assert proxy_state.resolve("10.96.1.1", 80).workload == two


def test_dump_is_json_and_stable(state: ProxyState) -> None:
    dump = state.dump()
    assert json.loads(json.dumps(dump)) == dump
    assert [w["name"] for w in dump["workloads"]] == ["sleep", "web-1", "web-2"]
    assert dump["services"][0]["hostname"] == "web.demo.svc.cluster.local"
    assert dump["policies"] == []
    assert dump["nodes"] == [{"name": "node-1", "address": "127.0.10.1",
                              "cluster_id": "Kubernetes",
                              "locality": {"region": "", "zone": "", "subzone": ""}}]
    assert dump["generation"] == state.generation


# -- every kind of the discovery stream (the waypoint reuses this state) -------------------

ROUTE_B = l7.HttpRoute("b-route", "demo", parents=(WEB_KEY,),
                       rules=(l7.RouteRule(backends=(l7.BackendRef(WEB_KEY, 80),)),))
ROUTE_A = l7.HttpRoute("a-route", "demo", parents=(WEB_KEY,))
TCP_ROUTE = l7.TcpRoute("tcp", "demo", parents=(WEB_KEY,))
TRAFFIC = l7.TrafficPolicy("web", "demo", WEB_KEY,
                           connection_pool=l7.ConnectionPool(max_connections=3))
LIMIT = l7.RateLimit("web", "demo", (WEB_KEY,), max_tokens=5, tokens_per_fill=1,
                     fill_interval=1.0)
L7_AUTHZ = l7.WaypointAuthorization(
    "web", "demo", l7.WaypointAuthorizationAction.ALLOW, (WEB_KEY,),
    (l7.L7Rule((l7.L7Clause((l7.L7Match(methods=("GET",)),)),)),))
JWT = l7.JwtPolicy("web", "demo", (WEB_KEY,), (l7.JwtProvider("https://issuer"),))
L7_RESOURCES = (ROUTE_B, ROUTE_A, TCP_ROUTE, TRAFFIC, LIMIT, L7_AUTHZ, JWT)


def test_every_kind_is_known_to_the_state() -> None:
    assert set(KINDS) == set(kinds.TYPE_BY_KIND)


def test_l7_kinds_are_stored_versioned_and_listed_by_key(state: ProxyState) -> None:
    change = state.apply(delta(*L7_RESOURCES))
    assert change.of("httproute").added == {ROUTE_A.key, ROUTE_B.key}
    assert change.of("jwtpolicy").added == {JWT.key}
    assert not change.of("workload") and not change.workloads and not change.empty
    assert state.resources("httproute") == [ROUTE_A, ROUTE_B]  # "demo/HTTPRoute/a-route" first
    assert state.resources("tcproute") == [TCP_ROUTE]
    assert state.resources("trafficpolicy") == [TRAFFIC]
    assert state.resources("ratelimit") == [LIMIT]
    assert state.resources("waypointauthorization") == [L7_AUTHZ]
    assert state.resources("jwtpolicy") == [JWT]
    assert state.resource("httproute", ROUTE_B.key) == ROUTE_B
    assert state.resource("httproute", "demo/HTTPRoute/nope") is None
    # The L4 kinds read through the same accessors.
    assert state.resources("workload") == state.workloads()
    assert state.resource("service", WEB_KEY) == WEB
    versions = state.known_versions()
    assert versions[versioned_key("ratelimit", LIMIT.key)] == codec.content_version(LIMIT)
    assert len(versions) == 5 + len(L7_RESOURCES)
    with pytest.raises(KeyError, match="unknown resource kind 'gateway'"):
        state.resources("gateway")


def test_l7_kinds_are_read_by_type(state: ProxyState) -> None:
    state.apply(delta(*L7_RESOURCES))
    routes: list[l7.HttpRoute] = state.resources_of(l7.HttpRoute)  # mypy sees the type
    assert routes == state.resources("httproute") == [ROUTE_A, ROUTE_B]
    assert state.resources_of(l7.TcpRoute) == [TCP_ROUTE]
    assert state.resources_of(l7.TrafficPolicy) == [TRAFFIC]
    assert state.resources_of(l7.RateLimit) == [LIMIT]
    assert state.resources_of(l7.WaypointAuthorization) == [L7_AUTHZ]
    assert state.resources_of(l7.JwtPolicy) == [JWT]
    assert state.resources_of(Workload) == state.workloads()
    with pytest.raises(KeyError, match="RouteRule is not a resource kind"):
        state.resources_of(l7.RouteRule)


def test_l7_changes_removals_and_dump(state: ProxyState) -> None:
    assert "httproute" not in state.dump()  # a ztunnel's dump shows only what it holds
    state.apply(delta(*L7_RESOURCES))
    generation = state.generation
    assert state.apply(delta(ROUTE_A)).empty  # identical content
    assert state.generation == generation
    changed = l7.HttpRoute("a-route", "demo", hostnames=("web.example",))
    change = state.apply(delta(changed, removed=(("tcproute", TCP_ROUTE.key),)))
    assert change.of("httproute").updated == {ROUTE_A.key}
    assert change.of("tcproute").removed == {TCP_ROUTE.key}
    assert state.resources("httproute") == [changed, ROUTE_B]
    assert state.resources("tcproute") == []
    assert versioned_key("tcproute", TCP_ROUTE.key) not in state.known_versions()
    dump = state.dump()
    assert json.loads(json.dumps(dump)) == dump
    assert [r["name"] for r in dump["httproute"]] == ["a-route", "b-route"]
    assert "tcproute" not in dump


def test_bad_l7_resource_rejects_the_whole_update(state: ProxyState) -> None:
    before = (state.dump(), state.known_versions(), state.generation)
    good = delta(ROUTE_A, pod("new", "10.0.0.50"))
    bad = ResourceUpdate("ratelimit", "demo/broken", "v1",
                         {"name": "broken", "namespace": "demo", "targets": [WEB_KEY]})
    with pytest.raises(DecodeError, match="ratelimit/demo/broken: missing required field"):
        state.apply(DeltaUpdate("n", 1, resources=good.resources + (bad,)))
    assert (state.dump(), state.known_versions(), state.generation) == before
    assert state.resources("httproute") == []
    misnamed = ResourceUpdate("httproute", "demo/other", "v1", codec.to_jsonable(ROUTE_A))
    with pytest.raises(DecodeError, match="httproute/demo/other: the resource's key is "
                                          "'demo/HTTPRoute/a-route'"):
        state.apply(DeltaUpdate("n", 2, resources=(misnamed,)))


# -- waypoints -------------------------------------------------------------------------------

WAYPOINT_HOST = "waypoint.demo.svc.cluster.local"
WAYPOINT_KEY = f"demo/{WAYPOINT_HOST}"
WAYPOINT_SVC = svc("waypoint", "10.96.0.99", (15008, 15008))
WAYPOINT_1 = pod("waypoint-1", "10.0.9.1", services=(WAYPOINT_KEY,), sa="waypoint")
WAYPOINT_2 = pod("waypoint-2", "10.0.9.2", services=(WAYPOINT_KEY,), sa="waypoint")


def test_waypoint_workload_round_robins_healthy_instances() -> None:
    proxy_state = ProxyState()
    sick = pod("waypoint-0", "10.0.9.0", services=(WAYPOINT_KEY,), sa="waypoint",
               status=WorkloadStatus.UNHEALTHY)
    proxy_state.apply(delta(WAYPOINT_SVC, sick, WAYPOINT_1, WAYPOINT_2))
    gateway = GatewayAddress(WAYPOINT_HOST)
    chosen = [proxy_state.waypoint_workload(gateway) for _ in range(3)]
    assert chosen == [WAYPOINT_1, WAYPOINT_2, WAYPOINT_1]
    # The short mesh name and the VIP name the same service.
    assert proxy_state.waypoint_workload(GatewayAddress("waypoint.demo")) in (WAYPOINT_1,
                                                                             WAYPOINT_2)
    assert proxy_state.waypoint_workload(GatewayAddress("10.96.0.99")) in (WAYPOINT_1,
                                                                          WAYPOINT_2)
    # A waypoint given as a workload address.
    assert proxy_state.waypoint_workload(GatewayAddress("10.0.9.2")) == WAYPOINT_2
    assert proxy_state.is_waypoint_instance(WAYPOINT_1, gateway)
    assert proxy_state.is_waypoint_instance(WAYPOINT_2, GatewayAddress("10.0.9.2"))
    assert not proxy_state.is_waypoint_instance(WAYPOINT_1, GatewayAddress("10.0.9.2"))


@pytest.mark.parametrize(
    ("destination", "reason"),
    [("missing.demo.svc.cluster.local", "no service missing.demo.svc.cluster.local"),
     ("example.com", "no service example.com"),
     (WAYPOINT_HOST, f"service {WAYPOINT_KEY} has no healthy endpoint"),
     ("10.0.9.9", "no service or workload has address 10.0.9.9"),
     ("10.0.9.3", "workload Kubernetes//Pod/demo/waypoint-3 is not healthy")],
)
def test_unresolvable_waypoint_says_why(destination: str, reason: str) -> None:
    proxy_state = ProxyState()
    sick = pod("waypoint-3", "10.0.9.3", services=(WAYPOINT_KEY,), sa="waypoint",
               status=WorkloadStatus.UNHEALTHY)
    proxy_state.apply(delta(WAYPOINT_SVC, sick))
    with pytest.raises(ResolveError) as caught:
        proxy_state.waypoint_workload(GatewayAddress(destination))
    assert caught.value.reason == reason


def test_endpoint_waypoint_is_not_the_service_waypoint() -> None:
    """Workload waypoints are for pod-addressed traffic only (as Istio's ztunnel)."""
    proxy_state = ProxyState()
    gateway = GatewayAddress(WAYPOINT_HOST)
    endpoint = Workload(uid="Kubernetes//Pod/demo/api-0", name="api-0", namespace="demo",
                        addresses=("10.0.4.1",), service_account="api", node="node-1",
                        services=("demo/api.demo.svc.cluster.local",), waypoint=gateway)
    proxy_state.apply(delta(svc("api", "10.96.0.41", (80, 8080)), endpoint))
    assert proxy_state.resolve("10.96.0.41", 80).waypoint is None
    assert proxy_state.resolve("10.0.4.1", 8080).waypoint == gateway
