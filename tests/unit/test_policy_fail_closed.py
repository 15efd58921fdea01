"""Policy translation never widens access (issue 11): HTTP-only attributes at ztunnel as
Istio's ambient translation reads them, bare ``serviceAccounts``, CUSTOM without ext_authz,
and every translation error failing closed. Each effect is checked where it matters: the
translated resources are fed to ztunnel's and the waypoint's own evaluators."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from ambient_api.identity import SpiffeId
from ambient_api.l7 import L7Rule, WaypointAuthorization, WaypointAuthorizationAction
from ambient_api.model import (
    Authorization,
    AuthorizationAction,
    AuthorizationScope,
    Clause,
    Match,
    Rule,
)
from ambient_dataplane.state import ProxyState
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import IncrementalTranslator, MeshConfig, PolicyError, translate
from tests.deltas import delta
from waypoint import authz as waypoint_authz
from ztunnel.authz import AuthzDecision, ConnectionAttributes, evaluate

HTTPBIN_IP = "127.0.20.1"
SLEEP = SpiffeId("cluster.local", "demo", "sleep")
ADMIN = SpiffeId("cluster.local", "ops", "admin")
WAYPOINT = "waypoint:demo/waypoint"
GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def metadata(name: str, namespace: str = "demo") -> dict[str, Any]:
    return {"name": name, "namespace": namespace}


def policy(spec: Any, name: str = "p", namespace: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": metadata(name, namespace), "spec": spec}


def cluster(*policies: dict[str, Any], extra: tuple[dict[str, Any], ...] = ()) -> ClusterObjects:
    """Namespace demo (ambient), a pod httpbin there, a Gateway and ``policies``."""
    return ClusterObjects.from_objects([
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {**metadata("httpbin"), "labels": {"app": "httpbin"}},
         "spec": {"nodeName": "node-1"}, "status": {"podIP": HTTPBIN_IP}},
        # A target for waypoint policies (no gatewayClassName: no waypoint resources).
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": metadata("waypoint")},
        *extra,
        *policies,
    ])


def authorizations(*policies: dict[str, Any]) -> dict[str, Authorization]:
    return {r.key: r for r in translate(cluster(*policies)) if isinstance(r, Authorization)}


def decide(
    *policies: dict[str, Any],
    identity: SpiffeId | None = SLEEP,
    source_ip: str = "10.0.0.5",
    port: int = 8080,
) -> AuthzDecision:
    """ztunnel's decision for a connection to httpbin, after translating ``policies`` and
    feeding the result to a ProxyState, as the inbound proxy would."""
    state = ProxyState()
    state.apply(delta(*translate(cluster(*policies))))
    workload = state.workload_by_address(HTTPBIN_IP)
    assert workload is not None
    attrs = ConnectionAttributes(source_ip, identity, HTTPBIN_IP, port)
    return evaluate(state.policies_for(workload, "istio-system"), attrs)


def waypoint_policies(*policies: dict[str, Any]) -> list[WaypointAuthorization]:
    return [
        r for r in translate(cluster(*policies))
        if isinstance(r, WaypointAuthorization) and WAYPOINT in r.targets
    ]


def waypoint_decide(
    *policies: dict[str, Any], identity: SpiffeId | None = SLEEP, path: str = "/"
) -> waypoint_authz.L7Decision:
    attrs = waypoint_authz.RequestAttributes(
        source_ip="10.0.0.5", source_identity=identity, destination_port=8080,
        host="httpbin", method="GET", path=path,
    )
    return waypoint_authz.evaluate(waypoint_policies(*policies), attrs)


def failing_closed(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "policy not translated as written; failing closed"]


# -- HTTP-only attributes at ztunnel (Istio's authorization.go) ------------------------------

HTTP_ONLY_RULES = [
    {"from": [{"source": {"remoteIpBlocks": ["10.0.0.0/8"]}}]},
    {"from": [{"source": {"notRemoteIpBlocks": ["192.168.0.0/16"]}}]},
    {"from": [{"source": {"requestPrincipals": ["*"]}}]},
    {"from": [{"source": {"notRequestPrincipals": ["iss/bob"]}}]},
    {"to": [{"operation": {"hosts": ["httpbin"]}}]},
    {"to": [{"operation": {"notHosts": ["admin"]}}]},
    {"to": [{"operation": {"methods": ["GET"]}}]},
    {"to": [{"operation": {"notMethods": ["DELETE"]}}]},
    {"to": [{"operation": {"paths": ["/*"]}}]},
    {"to": [{"operation": {"notPaths": ["/admin"]}}]},
    {"when": [{"key": "remote.ip", "values": ["10.0.0.0/8"]}]},
    {"when": [{"key": "request.headers[x-user]", "values": ["alice"]}]},
    {"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]},
    {"when": [{"key": "request.auth.principal", "values": ["iss/alice"]}]},
]


@pytest.mark.parametrize("rule", HTTP_ONLY_RULES)
def test_allow_rule_with_an_http_only_attribute_is_omitted_so_it_denies(rule: Any) -> None:
    """Each of these would match the connection if checked at L4 (remoteIpBlocks against the
    peer's address was how it used to widen); Istio omits the rule, so nothing is allowed."""
    with capture_logs() as logs:
        [authorization] = authorizations(policy({"rules": [rule]})).values()
    assert authorization.rules == ()
    assert not decide(policy({"rules": [rule]})).allowed
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "ALLOW rule needs L7 attributes ztunnel cannot check; rule dropped"
    ]
    assert failing_closed(logs) == []  # Istio's documented behaviour, not an error


@pytest.mark.parametrize("rule", HTTP_ONLY_RULES)
def test_deny_rule_enforces_what_is_left_of_it(rule: Any) -> None:
    """The HTTP-only part is left out: the rest (here nothing) is enforced, denying more."""
    spec = {"action": "DENY", "rules": [rule]}
    assert not decide(policy(spec)).allowed
    assert not decide(policy(spec), identity=None, source_ip="192.168.3.3").allowed


def test_deny_with_remote_ip_blocks_keeps_its_l4_part() -> None:
    spec = {"action": "DENY", "rules": [{"from": [{"source": {
        "namespaces": ["ops"], "remoteIpBlocks": ["10.9.0.0/16"]}}]}]}
    [authorization] = authorizations(policy(spec)).values()
    assert authorization.rules == (Rule(clauses=(Clause(matches=(Match(namespaces=("ops",)),)),)),)
    assert not decide(policy(spec), identity=ADMIN).allowed  # from any address
    assert decide(policy(spec), identity=SLEEP).allowed


# -- serviceAccounts ---------------------------------------------------------------------------


def test_bare_service_accounts_are_the_policy_namespace() -> None:
    spec = {"rules": [{"from": [{"source": {"serviceAccounts": ["sleep", "ops/admin"]}}]}]}
    [authorization] = authorizations(policy(spec)).values()
    assert authorization.rules[0].clauses[0].matches == (
        Match(principals=("cluster.local/ns/demo/sa/sleep", "cluster.local/ns/ops/sa/admin")),
    )
    assert decide(policy(spec), identity=SLEEP).allowed
    assert decide(policy(spec), identity=ADMIN).allowed
    assert not decide(policy(spec), identity=SpiffeId("cluster.local", "other", "sleep")).allowed


def test_bare_not_service_accounts() -> None:
    spec = {"rules": [{"from": [{"source": {"notServiceAccounts": ["sleep"]}}]}]}
    assert not decide(policy(spec), identity=SLEEP).allowed
    assert decide(policy(spec), identity=ADMIN).allowed


def test_bare_service_accounts_at_the_waypoint() -> None:
    spec = {"targetRefs": [GATEWAY_REF],
            "rules": [{"from": [{"source": {"serviceAccounts": ["sleep"]}}]}]}
    assert waypoint_decide(policy(spec), identity=SLEEP).allowed
    assert not waypoint_decide(policy(spec), identity=ADMIN).allowed


# -- translation errors fail closed at ztunnel ------------------------------------------------

BROKEN_ALLOW_RULES = [
    {"to": [{"operation": {"ports": ["http"]}}]},
    {"to": [{"operation": {"notPorts": ["99999"]}}]},
    {"from": [{"source": {"notIpBlocks": ["10.0.0.0/33"]}}]},  # would exclude nothing
    {"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]},
    {"from": [{"source": {"bogus": ["x"]}}]},
    {"from": [{"source": {}}]},  # Istio's ztunnel skips an empty match
    {"from": ["not-an-entry"]},
    {"from": "not-a-list"},
    {"when": [{"key": "source.namespace"}]},  # no values: would constrain nothing
    {"when": [{"key": "destination.ip", "notValues": ["not-an-ip"]}]},
    {"when": ["not-a-condition"]},
    {"unknown": 1, 2: "mixed keys"},
    "not-a-rule",
]


@pytest.mark.parametrize("rule", BROKEN_ALLOW_RULES)
def test_a_broken_allow_rule_is_dropped_and_logged(rule: Any) -> None:
    with capture_logs() as logs:
        [authorization] = authorizations(policy({"rules": [rule]})).values()
    assert authorization.action is AuthorizationAction.ALLOW
    assert authorization.rules == ()
    assert not decide(policy({"rules": [rule]})).allowed
    errors = failing_closed(logs)
    assert errors
    for error in errors:
        assert error["policy"] == "AuthorizationPolicy demo/p"
        assert error["field"].startswith("rules[0]")
        assert error["reason"]
        assert error["effect"] == "ALLOW rule dropped"


@pytest.mark.parametrize("rule", BROKEN_ALLOW_RULES)
def test_a_broken_deny_rule_denies_more(rule: Any) -> None:
    spec = {"action": "DENY", "rules": [rule]}
    assert not decide(policy(spec)).allowed
    assert not decide(policy(spec), identity=ADMIN, port=9090).allowed


def test_a_broken_alternative_of_a_deny_rule_matches_everything() -> None:
    """Dropping it would narrow the clause (deny less): it is kept as an empty match."""
    spec = {"action": "DENY", "rules": [{"from": [
        {"source": {"namespaces": ["ops"]}}, {"source": {"ipBlocks": ["nonsense"]}}]}]}
    assert not decide(policy(spec), identity=SLEEP).allowed


def test_other_allow_policies_still_allow_what_they_allow() -> None:
    """A failed ALLOW policy allows nothing itself; Istio's "some ALLOW must match" stands."""
    broken = policy({"rules": "oops"}, name="broken")
    good = policy({"rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}]}, name="good")
    assert decide(broken, good, identity=ADMIN).allowed
    assert not decide(broken, good, identity=SLEEP).allowed


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"rules": {"from": []}}, "spec.rules"),
        ({"selector": {"matchExpressions": [{"key": "app", "operator": "Near"}]},
          "rules": [{}]}, "spec.selector"),
        ({"selector": {"matchLabels": {"app": ["httpbin"]}}, "rules": [{}]}, "spec.selector"),
        ({"selector": "app=httpbin", "rules": [{}]}, "spec.selector"),
    ],
)
def test_a_broken_allow_policy_denies_what_it_covers(spec: Any, field: str) -> None:
    with capture_logs() as logs:
        [authorization] = authorizations(policy(spec)).values()
    [error] = failing_closed(logs)
    assert error["field"] == field
    assert authorization.action is AuthorizationAction.ALLOW
    assert authorization.rules == ()
    assert not decide(policy(spec)).allowed


def test_an_allow_policy_with_a_broken_selector_never_allows_more_elsewhere() -> None:
    """Spread over the namespace its ``rules: [{}]`` would allow everything to workloads
    that another ALLOW policy restricts: it covers the namespace with no rules instead."""
    broken = policy({"selector": {"matchLabels": "x"}, "rules": [{}]}, name="broken")
    restrictive = policy({"rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}]},
                         name="only-ops")
    [scope] = {a.scope for a in authorizations(broken).values()}
    assert scope is AuthorizationScope.NAMESPACE
    assert not decide(broken, restrictive, identity=SLEEP).allowed
    assert decide(broken, restrictive, identity=ADMIN).allowed


def test_a_deny_policy_with_a_broken_selector_covers_its_namespace() -> None:
    spec = {"action": "DENY", "selector": {"matchExpressions": [{"operator": "In"}]},
            "rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}]}
    assert not decide(policy(spec), identity=ADMIN).allowed
    assert decide(policy(spec), identity=SLEEP).allowed


def test_a_broken_selector_in_the_root_namespace_covers_the_mesh() -> None:
    spec = {"action": "DENY", "selector": {"matchLabels": "x"}, "rules": [{}]}
    [authorization] = authorizations(policy(spec, namespace="istio-system")).values()
    assert authorization.scope is AuthorizationScope.GLOBAL
    assert not decide(policy(spec, namespace="istio-system")).allowed


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"action": "DENY", "rules": "oops"}, "spec.rules"),
        ({"action": "REJECT", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]},
         "spec.action"),
        ("not-a-spec", "spec"),
    ],
)
def test_what_cannot_be_read_as_a_deny_denies_everything_it_covers(
    spec: Any, field: str
) -> None:
    with capture_logs() as logs:
        [authorization] = authorizations(policy(spec)).values()
    assert [e["field"] for e in failing_closed(logs)] == [field]
    assert authorization.action is AuthorizationAction.DENY
    assert authorization.rules == (Rule(),)
    assert not decide(policy(spec), identity=ADMIN, port=9090).allowed


def test_a_strict_peer_authentication_with_a_broken_selector_covers_its_namespace() -> None:
    peer_authentication = {
        "apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
        "metadata": metadata("strict"),
        "spec": {"selector": {"matchLabels": {"app": 7}}, "mtls": {"mode": "STRICT"}},
    }
    state = ProxyState()
    state.apply(delta(*translate(cluster(extra=(peer_authentication,)))))
    workload = state.workload_by_address(HTTPBIN_IP)
    assert workload is not None
    plaintext = ConnectionAttributes("10.0.0.5", None, HTTPBIN_IP, 8080)
    assert not evaluate(state.policies_for(workload), plaintext).allowed


# -- CUSTOM ------------------------------------------------------------------------------------


def test_custom_at_ztunnel_denies_what_its_rules_match() -> None:
    spec = {"action": "CUSTOM", "provider": {"name": "opa"},
            "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}
    with capture_logs() as logs:
        [authorization] = authorizations(policy(spec)).values()
    assert authorization.action is AuthorizationAction.DENY
    assert not decide(policy(spec), port=8080).allowed
    assert decide(policy(spec), port=9090).allowed
    [line] = [e for e in logs if e["log_level"] == "warning"]
    assert line["event"] == "CUSTOM needs an ext_authz provider; denying"
    assert (line["policy"], line["provider"]) == ("demo/p", "opa")


def test_custom_with_http_rules_at_ztunnel_denies_all_it_selects_logged_once() -> None:
    spec = {"action": "CUSTOM", "selector": {"matchLabels": {"app": "httpbin"}},
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]},
                      {"to": [{"operation": {"methods": ["POST"]}}]}]}
    with capture_logs() as logs:
        authorizations(policy(spec))
    assert [e["event"] for e in logs] == ["CUSTOM needs an ext_authz provider; denying"]
    assert not decide(policy(spec)).allowed


def test_custom_at_the_waypoint_denies_what_its_rules_match() -> None:
    spec = {"targetRefs": [GATEWAY_REF], "action": "CUSTOM",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}
    assert not waypoint_decide(policy(spec), path="/admin/users").allowed
    assert waypoint_decide(policy(spec), path="/public").allowed


# -- translation errors fail closed at the waypoint --------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"action": "REJECT", "rules": [{}]},
        {"action": "DENY", "rules": "oops"},
        {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["ops"]}},
                                               "not-an-entry"]}]},
        {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["ops"]}},
                                               {"source": {}}]}]},
        {"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/33"]}}]}]},
        {"rules": [{"from": [{"source": {"serviceAccounts": ["demo/"]}}]}]},
        {"rules": [{"unknown": 1, 2: "mixed keys"}]},
        {"rules": "oops"},
    ],
)
def test_waypoint_policy_errors_deny(spec: dict[str, Any]) -> None:
    translator = IncrementalTranslator(MeshConfig())
    translator.translate(cluster(policy({"targetRefs": [GATEWAY_REF], **spec})))
    errors = list(translator.policy_errors)
    assert errors and all(e.policy == "AuthorizationPolicy demo/p" for e in errors)
    assert not waypoint_decide(policy({"targetRefs": [GATEWAY_REF], **spec})).allowed


def test_waypoint_policy_with_unreadable_target_refs_covers_the_namespace() -> None:
    spec = {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}], "rules": [{}],
            "action": "DENY"}
    [found] = waypoint_policies(policy(spec))
    assert found.action is WaypointAuthorizationAction.DENY
    assert not waypoint_decide(policy(spec)).allowed


def test_waypoint_allow_policy_with_unreadable_target_refs_allows_nothing() -> None:
    broken = policy({"targetRefs": [{"kind": "Gateway"}], "rules": [{}]}, name="broken")
    restrictive = policy({"targetRefs": [GATEWAY_REF], "rules": [
        {"from": [{"source": {"namespaces": ["ops"]}}]}]}, name="only-ops")
    [found, _] = waypoint_policies(broken, restrictive)
    assert (found.key, found.rules) == ("demo/broken", ())
    assert not waypoint_decide(broken, restrictive, identity=SLEEP).allowed
    assert waypoint_decide(broken, restrictive, identity=ADMIN).allowed


# -- counting ----------------------------------------------------------------------------------


def test_the_translator_keeps_the_errors_of_the_resources_it_serves() -> None:
    translator = IncrementalTranslator(MeshConfig())
    broken = cluster(
        policy({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, name="l4"),
        policy({"targetRefs": "waypoint"}, name="l7"),
        policy({"action": "CUSTOM", "rules": [{}]}, name="custom"),  # not an error
    )
    translator.translate(broken)
    assert translator.policy_errors == (
        PolicyError("AuthorizationPolicy demo/l4", "rules[0].to[0].operation.ports",
                    "rules[0].to[0].operation.ports: 'http' is not a port number (0-65535)"),
        PolicyError("AuthorizationPolicy demo/l7", "spec.targetRefs", "must be a list"),
    )
    # A change of pods only reuses the policies' translation, and their errors.
    more_pods = ClusterObjects(**{**vars(broken), "pods": {}})
    translator.translate(more_pods)
    assert len(translator.policy_errors) == 2
    translator.translate(cluster())
    assert translator.policy_errors == ()


# -- a translation that fails unexpectedly ----------------------------------------------------


def test_an_unexpected_failure_at_ztunnel_denies_the_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("a bug")

    monkeypatch.setattr("istiod_lite.translate.l4.l4_rules", broken)
    spec = {"selector": {"matchLabels": {"app": "httpbin"}}, "rules": [{}]}
    with capture_logs() as logs:
        [authorization] = authorizations(policy(spec)).values()
    assert (authorization.action, authorization.scope) == (
        AuthorizationAction.DENY, AuthorizationScope.NAMESPACE
    )
    assert [e["reason"] for e in failing_closed(logs)] == ["TypeError: a bug"]
    assert not decide(policy(spec)).allowed


def test_an_unexpected_failure_at_the_waypoint_denies_every_request_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr("istiod_lite.translate.security._rules", broken)
    spec = {"targetRefs": [GATEWAY_REF], "rules": [{}]}
    [found] = waypoint_policies(policy(spec))
    assert (found.action, found.rules) == (WaypointAuthorizationAction.DENY, (L7Rule(),))
    assert not waypoint_decide(policy(spec)).allowed
