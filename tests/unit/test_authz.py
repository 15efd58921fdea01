"""ztunnel.authz: Istio's L4 AuthorizationPolicy semantics."""

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
)
from ambient_dataplane.matchers import string_matches
from ztunnel.authz import AuthzDecision, ConnectionAttributes, evaluate

SLEEP = SpiffeId("cluster.local", "demo", "sleep")
ADMIN = SpiffeId("cluster.local", "ops", "admin")
FOREIGN = SpiffeId("other.domain", "demo", "sleep")


def attrs(
    identity: SpiffeId | None = SLEEP,
    source_ip: str = "10.0.0.5",
    destination_ip: str = "10.1.0.7",
    port: int = 8080,
) -> ConnectionAttributes:
    return ConnectionAttributes(source_ip, identity, destination_ip, port)


def policy(
    *matches: Match,
    action: AuthorizationAction = AuthorizationAction.ALLOW,
    name: str = "p",
    namespace: str = "demo",
) -> Authorization:
    """A policy with one rule of one clause whose alternatives are ``matches``."""
    return Authorization(
        name=name,
        namespace=namespace,
        scope=AuthorizationScope.NAMESPACE,
        action=action,
        rules=(Rule(clauses=(Clause(matches=matches),)),),
    )


def deny(*matches: Match, name: str = "d") -> Authorization:
    return policy(*matches, action=AuthorizationAction.DENY, name=name)


ALLOW = AuthorizationAction.ALLOW
DENY = AuthorizationAction.DENY

# (id, match, attributes, does the match apply?)
MATCH_CASES = [
    ("empty match matches all", Match(), attrs(), True),
    ("principal exact", Match(principals=("cluster.local/ns/demo/sa/sleep",)), attrs(), True),
    ("principal other", Match(principals=("cluster.local/ns/demo/sa/web",)), attrs(), False),
    ("principal written with scheme does not match",
     Match(principals=("spiffe://cluster.local/ns/demo/sa/sleep",)), attrs(), False),
    ("principal prefix", Match(principals=("cluster.local/ns/demo/*",)), attrs(), True),
    ("principal prefix miss", Match(principals=("cluster.local/ns/ops/*",)), attrs(), False),
    ("principal suffix", Match(principals=("*/sa/sleep",)), attrs(), True),
    ("principal suffix miss", Match(principals=("*/sa/web",)), attrs(), False),
    ("principal suffix other trust domain", Match(principals=("*/ns/demo/sa/sleep",)),
     attrs(FOREIGN), True),
    ("principal exact other trust domain",
     Match(principals=("cluster.local/ns/demo/sa/sleep",)), attrs(FOREIGN), False),
    ("principal any", Match(principals=("*",)), attrs(), True),
    ("principal values are OR'd",
     Match(principals=("cluster.local/ns/x/sa/y", "cluster.local/ns/demo/sa/sleep")),
     attrs(), True),
    ("plaintext has no principal", Match(principals=("*",)), attrs(None), False),
    ("plaintext has no namespace", Match(namespaces=("*",)), attrs(None), False),
    ("not_principals * matches plaintext", Match(not_principals=("*",)), attrs(None), True),
    ("not_principals * excludes mTLS", Match(not_principals=("*",)), attrs(), False),
    ("not_principals other keeps match",
     Match(not_principals=("cluster.local/ns/ops/sa/admin",)), attrs(), True),
    ("not_principals prefix excludes",
     Match(not_principals=("cluster.local/ns/demo/*",)), attrs(), False),
    ("not_namespaces matches plaintext", Match(not_namespaces=("demo",)), attrs(None), True),
    ("namespace exact", Match(namespaces=("demo",)), attrs(), True),
    ("namespace miss", Match(namespaces=("ops",)), attrs(), False),
    ("namespace prefix", Match(namespaces=("de*",)), attrs(), True),
    ("not_namespaces excludes", Match(not_namespaces=("demo",)), attrs(), False),
    ("not_namespaces other", Match(not_namespaces=("ops",)), attrs(), True),
    ("source ip exact", Match(source_ips=("10.0.0.5",)), attrs(), True),
    ("source ip cidr", Match(source_ips=("10.0.0.0/24",)), attrs(), True),
    ("source ip cidr miss", Match(source_ips=("10.0.1.0/24",)), attrs(), False),
    ("source ip non-strict cidr", Match(source_ips=("10.0.0.9/24",)), attrs(), True),
    ("ipv6 cidr never matches ipv4", Match(source_ips=("::/0",)), attrs(), False),
    ("ipv4-mapped source counts as ipv4", Match(source_ips=("10.0.0.0/8",)),
     attrs(source_ip="::ffff:10.0.0.5"), True),
    ("ipv6 source", Match(source_ips=("fd00::/8",)), attrs(source_ip="fd00::1"), True),
    ("invalid entry never matches", Match(source_ips=("not-an-ip", "10.0.0.0/33")),
     attrs(), False),
    ("invalid entry next to valid one", Match(source_ips=("bogus", "10.0.0.5")), attrs(), True),
    ("invalid not_ entry excludes nothing", Match(not_source_ips=("bogus",)), attrs(), True),
    ("invalid connection address matches no ip constraint",
     Match(source_ips=("0.0.0.0/0",)), attrs(source_ip="garbage"), False),
    ("not_source_ips cidr excludes", Match(not_source_ips=("10.0.0.0/8",)), attrs(), False),
    ("destination ip", Match(destination_ips=("10.1.0.0/16",)), attrs(), True),
    ("not_destination_ips", Match(not_destination_ips=("10.1.0.7",)), attrs(), False),
    ("port", Match(destination_ports=(80, 8080)), attrs(), True),
    ("port miss", Match(destination_ports=(80,)), attrs(), False),
    ("not port", Match(not_destination_ports=(8080,)), attrs(), False),
    ("not port other", Match(not_destination_ports=(9090,)), attrs(), True),
    ("fields are AND'd: both hold",
     Match(namespaces=("demo",), destination_ports=(8080,)), attrs(), True),
    ("fields are AND'd: one fails",
     Match(namespaces=("demo",), destination_ports=(9090,)), attrs(), False),
    ("positive and not_ on one field",
     Match(principals=("cluster.local/ns/demo/*",),
           not_principals=("cluster.local/ns/demo/sa/sleep",)), attrs(), False),
]


@pytest.mark.parametrize(
    ("match", "connection", "expected"),
    [case[1:] for case in MATCH_CASES],
    ids=[case[0] for case in MATCH_CASES],
)
def test_match_semantics(match: Match, connection: ConnectionAttributes, expected: bool) -> None:
    decision = evaluate([deny(match)], connection)
    assert decision.allowed is not expected
    decision = evaluate([policy(match)], connection)
    assert decision.allowed is expected


DECISION_CASES = [
    ("no policies allow", [], attrs(), True, None),
    ("only a non-matching DENY allows",
     [deny(Match(namespaces=("ops",)))], attrs(), True, None),
    ("matching DENY denies", [deny(Match(namespaces=("demo",)))], attrs(), False, "demo/d"),
    ("DENY wins over a matching ALLOW",
     [policy(Match()), deny(Match(destination_ports=(8080,)))], attrs(), False, "demo/d"),
    ("DENY wins regardless of order",
     [deny(Match(destination_ports=(8080,))), policy(Match())], attrs(), False, "demo/d"),
    ("matching ALLOW allows", [policy(Match(namespaces=("demo",)))], attrs(), True, "demo/p"),
    ("ALLOW that does not match denies",
     [policy(Match(namespaces=("ops",)))], attrs(), False, None),
    ("one of several ALLOWs matches",
     [policy(Match(namespaces=("ops",)), name="a"), policy(Match(), name="b")],
     attrs(), True, "demo/b"),
    ("STRICT peer authentication denies plaintext",
     [deny(Match(not_principals=("*",)), name="converted-peer-authentication-strict")],
     attrs(None), False, "demo/converted-peer-authentication-strict"),
    ("STRICT peer authentication lets mTLS through",
     [deny(Match(not_principals=("*",)), name="converted-peer-authentication-strict")],
     attrs(), True, None),
]


@pytest.mark.parametrize(
    ("policies", "connection", "allowed", "deciding"),
    [case[1:] for case in DECISION_CASES],
    ids=[case[0] for case in DECISION_CASES],
)
def test_decisions(
    policies: list[Authorization],
    connection: ConnectionAttributes,
    allowed: bool,
    deciding: str | None,
) -> None:
    decision = evaluate(policies, connection)
    assert decision.allowed is allowed
    assert decision.policy == deciding


def test_reasons_name_the_policy() -> None:
    assert evaluate([deny(Match())], attrs()) == AuthzDecision(
        False, "denied by DENY policy demo/d", "demo/d"
    )
    allowed = evaluate([policy(Match())], attrs())
    assert allowed == AuthzDecision(True, "allowed by demo/p", "demo/p")
    denied = evaluate([policy(Match(namespaces=("ops",)))], attrs())
    assert denied == AuthzDecision(False, "no ALLOW policy matched", None)
    assert evaluate([], attrs()).allowed


def _with_rules(action: AuthorizationAction, *rules: Rule) -> Authorization:
    return Authorization("r", "demo", AuthorizationScope.NAMESPACE, action, rules)


def test_allow_policy_without_rules_denies_everything() -> None:
    assert not evaluate([_with_rules(ALLOW)], attrs()).allowed
    assert not evaluate([_with_rules(ALLOW)], attrs(None)).allowed


def test_deny_policy_without_rules_denies_nothing() -> None:
    assert evaluate([_with_rules(DENY)], attrs()).allowed


def test_rule_without_clauses_matches_everything() -> None:
    assert evaluate([_with_rules(ALLOW, Rule())], attrs(None)).allowed
    assert not evaluate([_with_rules(DENY, Rule())], attrs()).allowed


def test_empty_clause_matches_everything() -> None:
    rule = Rule(clauses=(Clause(), Clause(matches=(Match(destination_ports=(8080,)),))))
    assert evaluate([_with_rules(ALLOW, rule)], attrs()).allowed
    assert not evaluate([_with_rules(ALLOW, rule)], attrs(port=80)).allowed


def test_clauses_are_anded_matches_ored_rules_ored() -> None:
    from_demo = Clause(matches=(Match(namespaces=("demo",)), Match(namespaces=("ops",))))
    to_8080 = Clause(matches=(Match(destination_ports=(8080,)),))
    rule = Rule(clauses=(from_demo, to_8080))
    allow = _with_rules(ALLOW, rule)
    assert evaluate([allow], attrs()).allowed
    assert evaluate([allow], attrs(ADMIN)).allowed
    assert not evaluate([allow], attrs(port=9090)).allowed
    assert not evaluate([allow], attrs(SpiffeId("cluster.local", "prod", "x"))).allowed
    # A second rule widens the policy (rules are OR'd).
    wider = _with_rules(ALLOW, rule, Rule(clauses=(Clause(matches=(Match(
        destination_ports=(9090,)),)),)))
    assert evaluate([wider], attrs(port=9090)).allowed


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("abc", "abc", True),
        ("abc", "abcd", False),
        ("ab*", "abcd", True),
        ("ab*", "ab", True),
        ("*cd", "abcd", True),
        ("*cd", "abce", False),
        ("*", "x", True),
        ("*", "", False),
        ("", "", True),
    ],
)
def test_string_matches(pattern: str, value: str, expected: bool) -> None:
    assert string_matches(pattern, value) is expected


def test_policies_are_consumed_once() -> None:
    """evaluate takes any iterable, e.g. a generator over the applicable policies."""
    policies = (p for p in [policy(Match(namespaces=("ops",))), policy(Match(), name="b")])
    assert evaluate(policies, attrs()).policy == "demo/b"
