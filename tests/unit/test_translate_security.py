"""AuthorizationPolicy / RequestAuthentication with targetRefs -> waypoint resources."""

from __future__ import annotations

import json
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from ambient_api.l7 import (
    Condition,
    JwtPolicy,
    JwtProvider,
    L7Clause,
    L7Match,
    L7Rule,
    WaypointAuthorization,
    WaypointAuthorizationAction,
)
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import MeshConfig, PolicyError, translate
from istiod_lite.translate.jwt_policies import jwks_problem
from istiod_lite.translate.security import security_resources

MESH = MeshConfig()
WAYPOINT = "waypoint:demo/waypoint"
ECHO = "demo/echo.demo.svc.cluster.local"
JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "BB", "kid": "k1"}]})
GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
SERVICE_REF = {"kind": "Service", "group": "", "name": "echo"}


def authorization_policy(spec: dict[str, Any], name: str = "policy") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    }


def request_authentication(spec: dict[str, Any], name: str = "jwt") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    }


def cluster(*objects: dict[str, Any]) -> ClusterObjects:
    """A waypoint Gateway demo/waypoint, a Service demo/echo and the given policies."""

    def of_kind(kind: str) -> dict[str, dict[str, Any]]:
        return {f"demo/{o['metadata']['name']}": o for o in objects if o["kind"] == kind}

    return ClusterObjects(
        gateways={"demo/waypoint": {"metadata": {"name": "waypoint", "namespace": "demo"}}},
        services={"demo/echo": {"metadata": {"name": "echo", "namespace": "demo"}}},
        authorization_policies=of_kind("AuthorizationPolicy"),
        request_authentications=of_kind("RequestAuthentication"),
    )


def no_files(path: str) -> str:
    raise AssertionError(f"unexpected read of {path}")


def translated(*objects: dict[str, Any], read_file: Any = no_files) -> list[Any]:
    return security_resources(cluster(*objects), MESH, read_file)


def one_authorization(spec: dict[str, Any]) -> WaypointAuthorization:
    [result] = translated(authorization_policy(spec))
    assert isinstance(result, WaypointAuthorization)
    return result


def warnings(logs: Sequence[MutableMapping[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs if entry["log_level"] == "warning"]


# -- AuthorizationPolicy ---------------------------------------------------------------------


def test_full_policy_to_waypoint_and_service() -> None:
    spec = {
        "targetRefs": [GATEWAY_REF, SERVICE_REF],
        "action": "ALLOW",
        "rules": [
            {
                "from": [
                    {"source": {"principals": ["spiffe://cluster.local/ns/demo/sa/sleep"],
                                "serviceAccounts": ["other/curl"]}},
                    {"source": {"namespaces": ["ops"], "notIpBlocks": ["10.0.0.0/8"],
                                "requestPrincipals": ["issuer/alice"]}},
                ],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"],
                                      "ports": ["8080"], "notHosts": ["admin.example"]}}],
                "when": [
                    {"key": "request.headers[x-user]", "values": ["alice"]},
                    {"key": "request.auth.claims[groups]", "notValues": ["guests"]},
                    {"key": "destination.port", "values": ["9090"]},
                    {"key": "source.principal", "values": ["spiffe://td/ns/a/sa/b"]},
                ],
            }
        ],
    }
    policy = one_authorization(spec)
    assert policy.key == "demo/policy"
    assert policy.action is WaypointAuthorizationAction.ALLOW
    assert policy.targets == (WAYPOINT, ECHO)
    [rule] = policy.rules
    assert rule.clauses == (
        L7Clause(matches=(
            L7Match(principals=("cluster.local/ns/demo/sa/sleep",
                                "cluster.local/ns/other/sa/curl")),
            L7Match(namespaces=("ops",), not_source_ips=("10.0.0.0/8",),
                    request_principals=("issuer/alice",)),
        )),
        L7Clause(matches=(
            L7Match(methods=("GET",), paths=("/api/*",), ports=(8080,),
                    not_hosts=("admin.example",)),
        )),
        L7Clause(matches=(L7Match(conditions=(Condition("request.headers[x-user]",
                                                        values=("alice",)),)),)),
        L7Clause(matches=(L7Match(conditions=(Condition("request.auth.claims[groups]",
                                                        not_values=("guests",)),)),)),
        L7Clause(matches=(L7Match(ports=(9090,)),)),
        L7Clause(matches=(L7Match(principals=("td/ns/a/sa/b",)),)),
    )


def test_singular_target_ref_and_deny_audit_actions() -> None:
    deny = one_authorization({"targetRef": GATEWAY_REF, "action": "DENY",
                              "rules": [{"to": [{"operation": {"notPaths": ["/ok"]}}]}]})
    assert deny.action is WaypointAuthorizationAction.DENY
    assert deny.targets == (WAYPOINT,)
    assert deny.rules == (L7Rule(clauses=(L7Clause(matches=(L7Match(not_paths=("/ok",)),)),)),)
    audit = one_authorization({"targetRefs": [SERVICE_REF], "action": "AUDIT", "rules": [{}]})
    assert audit.action is WaypointAuthorizationAction.AUDIT
    assert audit.rules == (L7Rule(),)


def test_empty_allow_policy_denies_everything() -> None:
    policy = one_authorization({"targetRefs": [GATEWAY_REF]})
    assert policy.action is WaypointAuthorizationAction.ALLOW
    assert policy.rules == ()


def test_policies_without_target_refs_are_left_to_ztunnel() -> None:
    with capture_logs() as logs:
        assert translated(authorization_policy({"action": "DENY", "rules": [{}]})) == []
    assert warnings(logs) == []


def test_target_refs_policies_are_not_l4_authorizations() -> None:
    objects = cluster(authorization_policy({"targetRefs": [GATEWAY_REF], "rules": [{}]}))
    assert [r for r in translate(objects, MESH) if type(r).__name__ == "Authorization"] == []


def test_custom_action_denies_what_its_rules_match() -> None:
    """No ext_authz provider can be used: like Istio's builder for a bad provider, the
    policy denies the requests it would have sent to one."""
    rules = [{"to": [{"operation": {"paths": ["/admin*"]}}]}]
    with capture_logs() as logs:
        policy = one_authorization({"targetRefs": [GATEWAY_REF], "action": "CUSTOM",
                                    "provider": {"name": "opa"}, "rules": rules})
    assert policy.action is WaypointAuthorizationAction.DENY
    assert policy.rules == (
        L7Rule(clauses=(L7Clause(matches=(L7Match(paths=("/admin*",)),)),)),
    )
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "CUSTOM needs an ext_authz provider; denying"
    assert (warning["policy"], warning["provider"]) == ("demo/policy", "opa")


def test_unresolvable_targets_fail_closed_over_the_namespace() -> None:
    """Which target was meant is unknown, so the policy covers every one it could name."""
    refs = [
        {"kind": "Gateway", "name": "waypoint"},  # no group: not a Gateway API Gateway
        {"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext"},
        {"kind": "Service"},
        "not-a-ref",
    ]
    errors: list[PolicyError] = []
    with capture_logs() as logs:
        [policy] = security_resources(
            cluster(authorization_policy({"targetRefs": refs})), MESH, no_files, errors=errors
        )
    assert isinstance(policy, WaypointAuthorization)
    assert policy.targets == (WAYPOINT, ECHO)
    assert policy.rules == ()  # ALLOW without rules: denies all there
    events = warnings(logs)
    assert events.count("target kind not supported (use a waypoint Gateway or a Service)") == 2
    assert events.count("target reference needs kind and name") == 2
    assert events[-1] == "policy not translated as written; failing closed"
    assert [e.field for e in errors] == [
        "targetRefs[0]", "targetRefs[1]", "targetRefs[2]", "targetRefs[3]"
    ]


def test_targets_in_another_namespace_are_ignored_as_istio_does() -> None:
    ref = {"kind": "Service", "name": "echo", "namespace": "elsewhere"}
    with capture_logs() as logs:
        assert translated(authorization_policy({"targetRefs": [ref]})) == []
    assert warnings(logs) == [
        "target reference to another namespace; ignored (it must be the policy's)",
        "policy has no usable target; ignored",
    ]


def test_missing_target_objects_are_kept_with_a_warning() -> None:
    refs = [{**GATEWAY_REF, "name": "absent"}, {**SERVICE_REF, "name": "gone"}]
    with capture_logs() as logs:
        policy = one_authorization({"targetRefs": refs})
    assert policy.targets == ("waypoint:demo/absent", "demo/gone.demo.svc.cluster.local")
    assert "policy targets a Gateway that does not exist" in warnings(logs)
    assert "policy targets a Service that does not exist" in warnings(logs)


def test_unknown_when_key_drops_allow_rule_but_keeps_deny_rule_without_it() -> None:
    rule = {
        "to": [{"operation": {"methods": ["POST"]}}],
        "when": [{"key": "connection.sni", "values": ["x"]}],
    }
    with capture_logs() as logs:
        allow = one_authorization({"targetRefs": [GATEWAY_REF], "rules": [rule, {}]})
    assert allow.rules == (L7Rule(),)  # only the second, unconditional rule survives
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["rule"] == "demo/policy rules[0]"
    assert "when[0]: condition key 'connection.sni' not supported" in warning["problems"]

    deny = one_authorization({"targetRefs": [GATEWAY_REF], "action": "DENY", "rules": [rule]})
    assert deny.rules == (
        L7Rule(clauses=(L7Clause(matches=(L7Match(methods=("POST",)),)),)),
    )


@pytest.mark.parametrize(
    "rule",
    [
        {"from": [{"source": {"bogusField": ["x"]}}]},
        {"to": [{"operation": {"ports": ["http"]}}]},
        {"from": [{"source": {"serviceAccounts": ["demo/"]}}]},
        {"from": [{"source": {"notIpBlocks": ["10.0.0.0/33"]}}]},
        {"from": [{"source": {}}]},
        {"from": [{"source": {"ipBlocks": ["1.2.3.4"], "remoteIpBlocks": ["5.6.7.8"]}}]},
        {"when": [{"key": "request.headers[x-a]"}]},  # neither values nor notValues
        {"when": [{"key": "request.headers[]", "values": ["a"]}]},
        {"when": [{"key": "destination.ip", "values": ["10.0.0.1"]}]},
        {"when": "not-a-list"},
        {"from": [{"notsource": {}}]},
        {"unknown": 1},
        "not-a-rule",
    ],
)
def test_malformed_or_uncheckable_allow_rules_fail_closed(rule: Any) -> None:
    with capture_logs() as logs:
        policy = one_authorization({"targetRefs": [GATEWAY_REF], "rules": [rule]})
    assert policy.rules == ()
    assert warnings(logs) == ["ALLOW rule uses something the waypoint cannot check; rule dropped"]


def test_rules_that_are_not_a_list_fail_closed() -> None:
    with capture_logs() as logs:
        allow = one_authorization({"targetRefs": [GATEWAY_REF], "rules": {"from": []}})
        deny = one_authorization({"targetRefs": [GATEWAY_REF], "action": "DENY",
                                  "rules": "oops"})
    assert allow.rules == ()  # denies all
    assert deny.rules == (L7Rule(),)  # denies all
    assert warnings(logs) == [
        "spec.rules must be a list; the policy gets no rule (denies all)",
        "spec.rules must be a list; the policy gets one rule matching every request",
    ]


def test_condition_keys_the_waypoint_understands() -> None:
    keys = ["request.auth.claims[realm][roles]", "request.auth.audiences",
            "request.auth.presenter", "request.headers[User-Agent]"]
    policy = one_authorization({
        "targetRefs": [GATEWAY_REF],
        "rules": [{"when": [{"key": key, "values": ["v"]} for key in keys]}],
    })
    [rule] = policy.rules
    assert [c.matches[0].conditions[0].key for c in rule.clauses] == keys
    request_principal = one_authorization({
        "targetRefs": [GATEWAY_REF],
        "rules": [{"when": [{"key": "request.auth.principal", "notValues": ["iss/bob"]},
                            {"key": "remote.ip", "values": ["127.0.0.0/8"]},
                            {"key": "source.namespace", "values": ["demo"]}]}],
    })
    assert request_principal.rules[0].clauses == (
        L7Clause(matches=(L7Match(not_request_principals=("iss/bob",)),)),
        L7Clause(matches=(L7Match(source_ips=("127.0.0.0/8",)),)),
        L7Clause(matches=(L7Match(namespaces=("demo",)),)),
    )


def test_broken_policy_never_stops_the_others() -> None:
    broken = authorization_policy({"targetRefs": "waypoint"}, name="broken")
    good = authorization_policy({"targetRefs": [GATEWAY_REF]}, name="good")
    with capture_logs() as logs:
        result = translated(broken, good)
    assert [r.key for r in result] == ["demo/broken", "demo/good"]
    assert result[0].targets == (WAYPOINT, ECHO)  # fails closed over its namespace
    assert "policy not translated as written; failing closed" in warnings(logs)


# -- RequestAuthentication -------------------------------------------------------------------


def test_request_authentication_with_inline_and_file_jwks() -> None:
    spec = {
        "targetRefs": [GATEWAY_REF],
        "jwtRules": [
            {"issuer": "https://issuer.example", "audiences": ["echo"], "jwks": JWKS,
             "fromHeaders": [{"name": "X-Token", "prefix": "Token "}],
             "forwardOriginalToken": True,
             "outputClaimToHeaders": [{"header": "X-Sub", "claim": "sub"}]},
            {"issuer": "file-issuer", "jwksUri": "file:///etc/jwks.json"},
        ],
    }
    reads: list[str] = []

    def read_file(path: str) -> str:
        reads.append(path)
        return JWKS

    [policy] = translated(request_authentication(spec), read_file=read_file)
    assert reads == ["/etc/jwks.json"]
    assert policy == JwtPolicy(
        name="jwt",
        namespace="demo",
        targets=(WAYPOINT,),
        providers=(
            JwtProvider(
                issuer="https://issuer.example",
                audiences=("echo",),
                jwks=JWKS,
                from_headers=(("x-token", "Token "),),
                forward_original_token=True,
                output_claim_to_headers=(("x-sub", "sub"),),
            ),
            JwtProvider(issuer="file-issuer", jwks=JWKS),
        ),
    )
    assert policy.providers[1].from_headers == (("authorization", "Bearer "),)


@pytest.mark.parametrize(
    ("rule", "event"),
    [
        ({"issuer": "i", "jwksUri": "https://issuer.example/jwks"},
         "fetching JWKS over the network is not supported; provider skipped "
         "(inline the keys with jwks, or use a file:// jwksUri)"),
        ({"issuer": "i", "jwksUri": "file://relative/jwks.json"},
         "jwksUri file:// path must be absolute; provider skipped"),
        ({"issuer": "i", "jwksUri": "file:///missing.json"},
         "cannot read jwksUri; provider skipped"),
        ({"issuer": "i", "jwks": "{not json"}, "invalid JWKS; provider skipped"),
        ({"issuer": "i", "jwks": '{"keys": "nope"}'}, "invalid JWKS; provider skipped"),
        ({"issuer": "i"}, "jwtRules entry has neither jwks nor jwksUri (OIDC discovery over the "
                          "network is not supported); provider skipped"),
        ({"jwks": JWKS}, "jwtRules entry has no issuer; provider skipped"),
        ({"issuer": "i", "jwks": JWKS, "fromHeaders": [{"prefix": "x"}]},
         "jwtRules entry is malformed; provider skipped"),
    ],
)
def test_unusable_jwt_providers_are_skipped_but_the_policy_stays(
    rule: dict[str, Any], event: str
) -> None:
    def read_file(path: str) -> str:
        raise FileNotFoundError(2, "No such file or directory", path)

    spec = {"targetRefs": [SERVICE_REF],
            "jwtRules": [rule, {"issuer": "good", "jwks": JWKS}]}
    with capture_logs() as logs:
        [policy] = translated(request_authentication(spec, name="named-policy"),
                              read_file=read_file)
    assert [p.issuer for p in policy.providers] == ["good"]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == event
    assert warning["rule"] == "demo/named-policy jwtRules[0]"


def test_policy_whose_every_provider_is_unusable_still_rejects_tokens() -> None:
    spec = {"targetRefs": [GATEWAY_REF], "jwtRules": [{"issuer": "i", "jwks": "[]"}]}
    [policy] = translated(request_authentication(spec))
    assert isinstance(policy, JwtPolicy)
    assert policy.providers == ()


def test_jwt_rules_that_are_not_a_list_reject_every_token() -> None:
    spec = {"targetRefs": [GATEWAY_REF], "jwtRules": {"issuer": "i", "jwks": JWKS}}
    with capture_logs() as logs:
        [policy] = translated(request_authentication(spec))
    assert isinstance(policy, JwtPolicy)
    assert policy.providers == ()
    assert warnings(logs) == [
        "spec.jwtRules must be a list; no provider, so every token is rejected"
    ]


def test_sidecar_style_request_authentication_is_not_supported() -> None:
    selector = request_authentication(
        {"selector": {"matchLabels": {"app": "echo"}},
         "jwtRules": [{"issuer": "i", "jwks": JWKS}]})
    with capture_logs() as logs:
        assert translated(selector) == []
    [event] = warnings(logs)
    assert "not supported in ambient mode" in event
    assert "targetRefs" in event
    with capture_logs() as logs:
        assert translated(request_authentication({"jwtRules": []}, name="bare")) == []
    assert "applies to no waypoint" in warnings(logs)[0]


def test_output_is_sorted_authorizations_then_jwt() -> None:
    objects = [
        request_authentication({"targetRefs": [GATEWAY_REF],
                                "jwtRules": [{"issuer": "i", "jwks": JWKS}]}, name="a"),
        authorization_policy({"targetRefs": [GATEWAY_REF]}, name="z"),
        authorization_policy({"targetRefs": [GATEWAY_REF]}, name="b"),
    ]
    result = translated(*objects)
    assert [(type(r).__name__, r.key) for r in result] == [
        ("WaypointAuthorization", "demo/b"),
        ("WaypointAuthorization", "demo/z"),
        ("JwtPolicy", "demo/a"),
    ]


def test_jwks_problem() -> None:
    assert jwks_problem(JWKS) is None
    assert jwks_problem('{"keys": []}') is None
    assert jwks_problem("nope") is not None and "not valid JSON" in str(jwks_problem("nope"))
    assert jwks_problem('{"keys": [1]}') == (
        'not a JWKS: every entry of "keys" must be a JSON object'
    )

