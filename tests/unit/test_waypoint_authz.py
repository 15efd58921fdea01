"""waypoint.authz: Istio's AuthorizationPolicy semantics over HTTP requests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from ambient_api.identity import SpiffeId
from ambient_api.l7 import (
    Condition,
    L7Clause,
    L7Match,
    L7Rule,
    WaypointAuthorization,
    WaypointAuthorizationAction,
)
from waypoint.authz import (
    L7Decision,
    RequestAttributes,
    claim_strings,
    evaluate,
)
from waypoint.http import HeaderSource, header_values
from waypoint.paths import normalize_target

SLEEP = SpiffeId("cluster.local", "demo", "sleep")
ALLOW = WaypointAuthorizationAction.ALLOW
DENY = WaypointAuthorizationAction.DENY
AUDIT = WaypointAuthorizationAction.AUDIT

CLAIMS: dict[str, Any] = {
    "iss": "https://issuer.example",
    "sub": "alice",
    "aud": ["svc-a", "svc-b"],
    "azp": "frontend",
    "groups": ["dev", "ops"],
    "role": "admin",
    "scope": "read write",
    "verified": True,
    "level": 3,
    "org": {"team": "payments", "tags": ["eu", "pci"]},
    "a.b": "literal-dotted",
}


def request(
    *,
    identity: SpiffeId | None = SLEEP,
    source_ip: str = "10.0.0.5",
    port: int = 8080,
    host: str = "httpbin.demo.svc.cluster.local",
    method: str = "GET",
    path: str = "/api/items?page=2",
    headers: HeaderSource = (("x-user", "bob"), ("X-Tag", "a"), ("x-tag", "b")),
    principal: str | None = "https://issuer.example/alice",
    claims: Mapping[str, Any] | None = CLAIMS,
) -> RequestAttributes:
    return RequestAttributes(
        source_ip=source_ip,
        source_identity=identity,
        destination_port=port,
        host=host,
        method=method,
        path=path,
        headers=headers,
        request_principal=principal,
        claims=claims,
    )


ANONYMOUS = request(principal=None, claims=None)
PLAINTEXT = request(identity=None)


def policy(
    *matches: L7Match,
    action: WaypointAuthorizationAction = ALLOW,
    name: str = "p",
    namespace: str = "demo",
) -> WaypointAuthorization:
    """A policy with one rule of one clause whose alternatives are ``matches``."""
    return WaypointAuthorization(
        name=name,
        namespace=namespace,
        action=action,
        targets=("demo/httpbin.demo.svc.cluster.local",),
        rules=(L7Rule(clauses=(L7Clause(matches=matches),)),),
    )


def deny(*matches: L7Match, name: str = "d") -> WaypointAuthorization:
    return policy(*matches, action=DENY, name=name)


def audit(*matches: L7Match, name: str = "a") -> WaypointAuthorization:
    return policy(*matches, action=AUDIT, name=name)


def when(key: str, *values: str, not_values: tuple[str, ...] = ()) -> L7Match:
    return L7Match(conditions=(Condition(key=key, values=values, not_values=not_values),))


# (id, match, request, does the match apply?)
MATCH_CASES: list[tuple[str, L7Match, RequestAttributes, bool]] = [
    ("empty match matches all", L7Match(), request(), True),
    # source identity, as at L4
    ("principal", L7Match(principals=("cluster.local/ns/demo/sa/sleep",)), request(), True),
    ("principal miss", L7Match(principals=("cluster.local/ns/demo/sa/x",)), request(), False),
    ("plaintext has no principal", L7Match(principals=("*",)), PLAINTEXT, False),
    ("not_principals * matches plaintext", L7Match(not_principals=("*",)), PLAINTEXT, True),
    ("not_principals * excludes mTLS", L7Match(not_principals=("*",)), request(), False),
    ("namespace", L7Match(namespaces=("demo",)), request(), True),
    ("not_namespaces", L7Match(not_namespaces=("demo",)), request(), False),
    ("source ip cidr", L7Match(source_ips=("10.0.0.0/24",)), request(), True),
    ("not_source_ips", L7Match(not_source_ips=("10.0.0.5",)), request(), False),
    ("port", L7Match(ports=(8080,)), request(), True),
    ("port miss", L7Match(ports=(80,)), request(), False),
    ("not_ports", L7Match(not_ports=(8080,)), request(), False),
    # request principals
    ("request principal exact",
     L7Match(request_principals=("https://issuer.example/alice",)), request(), True),
    ("request principal other sub",
     L7Match(request_principals=("https://issuer.example/bob",)), request(), False),
    ("request principal issuer prefix",
     L7Match(request_principals=("https://issuer.example/*",)), request(), True),
    ("request principal any", L7Match(request_principals=("*",)), request(), True),
    ("no token never matches request_principals",
     L7Match(request_principals=("*",)), ANONYMOUS, False),
    ("no token matches not_request_principals *",
     L7Match(not_request_principals=("*",)), ANONYMOUS, True),
    ("token excluded by not_request_principals *",
     L7Match(not_request_principals=("*",)), request(), False),
    ("not_request_principals other keeps match",
     L7Match(not_request_principals=("https://issuer.example/bob",)), request(), True),
    # hosts
    ("host exact", L7Match(hosts=("httpbin.demo.svc.cluster.local",)), request(), True),
    ("host case-insensitive",
     L7Match(hosts=("HTTPBIN.demo.svc.cluster.local",)),
     request(host="HttpBin.Demo.svc.cluster.local"), True),
    ("host suffix", L7Match(hosts=("*.demo.svc.cluster.local",)), request(), True),
    ("host prefix", L7Match(hosts=("httpbin.*",)), request(), True),
    ("host miss", L7Match(hosts=("other.demo",)), request(), False),
    ("exact host does not match with a port (Istio)",
     L7Match(hosts=("httpbin.demo",)), request(host="httpbin.demo:8000"), False),
    ("host:* matches any port",
     L7Match(hosts=("httpbin.demo:*",)), request(host="HTTPBIN.demo:8000"), True),
    ("host:port exact", L7Match(hosts=("httpbin.demo:8000",)), request(host="httpbin.demo:8000"),
     True),
    ("not_hosts case-insensitive",
     L7Match(not_hosts=("HTTPBIN.DEMO.SVC.CLUSTER.LOCAL",)), request(), False),
    ("not_hosts other", L7Match(not_hosts=("x.demo",)), request(), True),
    # methods
    ("method", L7Match(methods=("GET", "HEAD")), request(), True),
    ("method is case-sensitive", L7Match(methods=("get",)), request(), False),
    ("method miss", L7Match(methods=("POST",)), request(), False),
    ("not_methods", L7Match(not_methods=("GET",)), request(), False),
    ("not_methods other", L7Match(not_methods=("DELETE",)), request(), True),
    # paths
    ("path exact ignores the query", L7Match(paths=("/api/items",)), request(), True),
    ("path exact miss", L7Match(paths=("/api",)), request(), False),
    ("path prefix", L7Match(paths=("/api/*",)), request(), True),
    ("path suffix", L7Match(paths=("*/items",)), request(), True),
    ("path any", L7Match(paths=("*",)), request(), True),
    ("path with fragment", L7Match(paths=("/api/items",)), request(path="/api/items#x"), True),
    ("path is normalised before matching",
     L7Match(paths=("/admin*",)), request(path=normalize_target("/public/../admin/users")),
     True),
    ("percent-encoded dots are normalised",
     L7Match(paths=("/admin*",)), request(path=normalize_target("/public/%2e%2E/admin")),
     True),
    ("not_paths", L7Match(not_paths=("/api/*",)), request(), False),
    ("not_paths other", L7Match(not_paths=("/admin*",)), request(), True),
    ("path template one segment",
     L7Match(paths=("/api/{*}",)), request(), True),
    ("path template one segment is not two",
     L7Match(paths=("/api/{*}",)), request(path="/api/items/7"), False),
    ("path template many segments",
     L7Match(paths=("/api/{**}",)), request(path="/api/items/7/x"), True),
    ("path template middle segment",
     L7Match(paths=("/api/{*}/7",)), request(path="/api/items/7"), True),
    ("invalid path template never matches",
     L7Match(paths=("/{**}/x",)), request(path="/a/x"), False),
    # header conditions
    ("header value", when("request.headers[x-user]", "bob"), request(), True),
    ("header name case-insensitive", when("request.headers[X-User]", "bob"), request(), True),
    ("header value prefix", when("request.headers[x-user]", "b*"), request(), True),
    ("header value miss", when("request.headers[x-user]", "alice"), request(), False),
    ("repeated header: any value", when("request.headers[x-tag]", "b"), request(), True),
    ("missing header never matches values", when("request.headers[x-none]", "*"), request(),
     False),
    ("missing header is not excluded by not_values",
     when("request.headers[x-none]", not_values=("*",)), request(), True),
    ("header not_values excludes",
     when("request.headers[x-user]", not_values=("bob",)), request(), False),
    ("repeated header: any value excludes",
     when("request.headers[x-tag]", not_values=("a",)), request(), False),
    ("headers as a mapping",
     when("request.headers[x-user]", "carol"), request(headers={"X-User": "carol"}), True),
    ("headers as bytes pairs",
     when("request.headers[x-user]", "dave"), request(headers=[(b"x-user", b"dave")]), True),
    # claim conditions
    ("claim string", when("request.auth.claims[role]", "admin"), request(), True),
    ("claim string miss", when("request.auth.claims[role]", "user"), request(), False),
    ("list claim: any element", when("request.auth.claims[groups]", "ops"), request(), True),
    ("list claim: no element", when("request.auth.claims[groups]", "qa"), request(), False),
    ("list claim not_values: any element excludes",
     when("request.auth.claims[groups]", not_values=("dev",)), request(), False),
    ("nested claim", when("request.auth.claims[org][team]", "payments"), request(), True),
    ("nested list claim", when("request.auth.claims[org][tags]", "pci"), request(), True),
    ("nested claim miss", when("request.auth.claims[org][team]", "risk"), request(), False),
    ("nested claim through a non-object", when("request.auth.claims[role][x]", "*"), request(),
     False),
    ("a dot is part of the claim name (Istio)",
     when("request.auth.claims[a.b]", "literal-dotted"), request(), True),
    ("scope claim is space-delimited", when("request.auth.claims[scope]", "write"), request(),
     True),
    ("boolean claim", when("request.auth.claims[verified]", "true"), request(), True),
    ("number claim", when("request.auth.claims[level]", "3"), request(), True),
    ("object claim matches nothing", when("request.auth.claims[org]", "*"), request(), False),
    ("no token: claim never matches", when("request.auth.claims[role]", "*"), ANONYMOUS, False),
    ("no token: claim not_values keep the match",
     when("request.auth.claims[role]", not_values=("admin",)), ANONYMOUS, True),
    ("claim prefix value", when("request.auth.claims[iss]", "https://*"), request(), True),
    # other condition keys
    ("request.auth.principal", when("request.auth.principal", "*/alice"), request(), True),
    ("request.auth.audiences", when("request.auth.audiences", "svc-b"), request(), True),
    ("request.auth.audiences miss", when("request.auth.audiences", "svc-c"), request(), False),
    ("request.auth.presenter", when("request.auth.presenter", "frontend"), request(), True),
    ("source.ip address", when("source.ip", "10.0.0.5"), request(), True),
    ("source.ip cidr", when("source.ip", "10.0.0.0/8"), request(), True),
    ("source.ip miss", when("source.ip", "10.9.0.0/16"), request(), False),
    ("remote.ip not_values cidr", when("remote.ip", not_values=("10.0.0.0/8",)), request(),
     False),
    ("source.namespace", when("source.namespace", "demo"), request(), True),
    ("source.principal", when("source.principal", "cluster.local/ns/demo/sa/sleep"), request(),
     True),
    ("source.principal plaintext", when("source.principal", "*"), PLAINTEXT, False),
    ("destination.port", when("destination.port", "8080"), request(), True),
    ("conditions are AND'd",
     L7Match(conditions=(Condition("request.auth.claims[role]", ("admin",)),
                         Condition("request.headers[x-user]", ("alice",)))), request(), False),
    # structure
    ("fields are AND'd: all hold",
     L7Match(methods=("GET",), paths=("/api/*",), hosts=("httpbin.*",)), request(), True),
    ("fields are AND'd: one fails",
     L7Match(methods=("GET",), paths=("/admin*",)), request(), False),
    ("positive and not_ on one field",
     L7Match(paths=("/api/*",), not_paths=("/api/items",)), request(), False),
]


@pytest.mark.parametrize(
    ("match", "attrs", "expected"),
    [case[1:] for case in MATCH_CASES],
    ids=[case[0] for case in MATCH_CASES],
)
def test_match_semantics(match: L7Match, attrs: RequestAttributes, expected: bool) -> None:
    assert evaluate([deny(match)], attrs).allowed is not expected
    assert evaluate([policy(match)], attrs).allowed is expected
    assert (evaluate([audit(match)], attrs).audited == ("demo/a",)) is expected


@pytest.mark.parametrize(
    "key",
    ["request.bogus", "request.headers", "request.headers[]", "request.headers[a][b]",
     "request.auth.claims", "request.auth.claims[a]x", "request.auth.claims[[a]]"],
)
def test_unknown_condition_keys_fail_closed(key: str) -> None:
    """An ALLOW cannot be opened, a DENY cannot be dodged, by a key we do not understand."""
    match = when(key, "*")
    assert not evaluate([policy(match)], request()).allowed
    assert not evaluate([deny(match)], request()).allowed
    assert evaluate([audit(match)], request()).audited == ("demo/a",)


DECISION_CASES: list[tuple[str, list[WaypointAuthorization], RequestAttributes, bool,
                           str | None]] = [
    ("no policies allow", [], request(), True, None),
    ("non-matching DENY allows", [deny(L7Match(paths=("/admin*",)))], request(), True, None),
    ("matching DENY denies", [deny(L7Match(paths=("/api/*",)))], request(), False, "demo/d"),
    ("DENY before a matching ALLOW", [policy(L7Match()), deny(L7Match(methods=("GET",)))],
     request(), False, "demo/d"),
    ("DENY regardless of order", [deny(L7Match(methods=("GET",))), policy(L7Match())],
     request(), False, "demo/d"),
    ("matching ALLOW allows", [policy(L7Match(methods=("GET",)))], request(), True, "demo/p"),
    ("non-matching ALLOW denies", [policy(L7Match(methods=("POST",)))], request(), False, None),
    ("one of several ALLOWs", [policy(L7Match(methods=("POST",)), name="x"),
                               policy(L7Match(paths=("/api/*",)), name="y")],
     request(), True, "demo/y"),
    ("AUDIT alone does not enable deny-by-default", [audit(L7Match())], request(), True, None),
    ("AUDIT does not open a closed ALLOW",
     [audit(L7Match()), policy(L7Match(methods=("POST",)))], request(), False, None),
    ("AUDIT does not override a DENY", [audit(L7Match()), deny(L7Match())], request(), False,
     "demo/d"),
    ("JWT required: anonymous denied",
     [deny(L7Match(not_request_principals=("*",)), name="require-jwt")], ANONYMOUS, False,
     "demo/require-jwt"),
    ("JWT required: token passes",
     [deny(L7Match(not_request_principals=("*",)), name="require-jwt")], request(), True, None),
]


@pytest.mark.parametrize(
    ("policies", "attrs", "allowed", "deciding"),
    [case[1:] for case in DECISION_CASES],
    ids=[case[0] for case in DECISION_CASES],
)
def test_decisions(
    policies: list[WaypointAuthorization],
    attrs: RequestAttributes,
    allowed: bool,
    deciding: str | None,
) -> None:
    decision = evaluate(policies, attrs)
    assert decision.allowed is allowed
    assert decision.policy == deciding


def test_reasons_name_the_policy() -> None:
    denied = evaluate([deny(L7Match(paths=("/api/*",)), name="block-api")], request())
    assert denied == L7Decision(False, "denied by DENY policy demo/block-api", "demo/block-api")
    allowed = evaluate([policy(L7Match())], request())
    assert allowed == L7Decision(True, "allowed by ALLOW policy demo/p", "demo/p")
    closed = evaluate([policy(L7Match(methods=("POST",)))], request())
    assert closed == L7Decision(False, "no ALLOW policy matched", None)
    assert evaluate([], request()) == L7Decision(True, "no ALLOW policy applies", None)


def test_all_matching_audits_are_reported_whatever_the_outcome() -> None:
    policies = [
        audit(L7Match(paths=("/api/*",)), name="api"),
        audit(L7Match(paths=("/admin*",)), name="admin"),
        audit(L7Match(methods=("GET",)), name="reads"),
        deny(L7Match(methods=("GET",))),
    ]
    decision = evaluate(policies, request())
    assert not decision.allowed
    assert decision.audited == ("demo/api", "demo/reads")
    assert evaluate(policies[:3], request()).audited == ("demo/api", "demo/reads")


def _with_rules(action: WaypointAuthorizationAction, *rules: L7Rule) -> WaypointAuthorization:
    return WaypointAuthorization("r", "demo", action, ("demo/x",), rules)


def test_policy_without_rules_matches_nothing() -> None:
    assert not evaluate([_with_rules(ALLOW)], request()).allowed
    assert evaluate([_with_rules(DENY)], request()).allowed


def test_rule_without_clauses_and_empty_clause_match_everything() -> None:
    assert not evaluate([_with_rules(DENY, L7Rule())], ANONYMOUS).allowed
    rule = L7Rule(clauses=(L7Clause(), L7Clause(matches=(L7Match(methods=("GET",)),))))
    assert evaluate([_with_rules(ALLOW, rule)], request()).allowed
    assert not evaluate([_with_rules(ALLOW, rule)], request(method="PUT")).allowed


def test_clauses_anded_matches_ored() -> None:
    from_clause = L7Clause(matches=(L7Match(namespaces=("ops",)),
                                    L7Match(request_principals=("*/alice",))))
    to_clause = L7Clause(matches=(L7Match(methods=("GET",), paths=("/api/*",)),
                                  L7Match(methods=("POST",), paths=("/data",))))
    allow = _with_rules(ALLOW, L7Rule(clauses=(from_clause, to_clause)))
    assert evaluate([allow], request()).allowed
    assert evaluate([allow], request(method="POST", path="/data")).allowed
    assert not evaluate([allow], request(method="POST", path="/api/x")).allowed
    assert not evaluate([allow], ANONYMOUS).allowed


def test_generator_of_policies() -> None:
    policies = (p for p in [policy(L7Match(methods=("POST",)), name="x"), policy(L7Match())])
    assert evaluate(policies, request()).policy == "demo/p"


def test_header_values_in_order_any_case() -> None:
    headers: list[tuple[str | bytes, str | bytes]] = [("X-A", "1"), (b"x-a", b"2"), ("x-b", "3")]
    assert header_values(headers, "x-A") == ["1", "2"]
    assert header_values({"Host": "h"}, "host") == ["h"]
    assert header_values({}, "host") == []


def test_claim_strings() -> None:
    assert claim_strings(CLAIMS, ["groups"]) == ["dev", "ops"]
    assert claim_strings(CLAIMS, ["scope"]) == ["read", "write"]
    assert claim_strings(CLAIMS, ["org", "tags"]) == ["eu", "pci"]
    assert claim_strings(CLAIMS, ["missing"]) == []
    assert claim_strings(None, ["role"]) == []
