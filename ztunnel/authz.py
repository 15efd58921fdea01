"""L4 authorization: Istio's AuthorizationPolicy semantics over one connection's attributes.

Sans-IO: the inbound proxy collects ``ConnectionAttributes`` (the peer's verified identity if
the connection came over HBONE, the addresses and the destination port) and the policies that
apply to the destination workload (``ProxyState.policies_for``), and asks ``evaluate``.

Evaluation order (Istio): any matching DENY policy denies; with no ALLOW policy at all the
connection is allowed; otherwise some ALLOW policy must match.

Matching structure (``ambient_api.model``): a policy's rules are OR'd; a rule's clauses
are AND'd (a rule without clauses matches everything, as Istio's ``rules: [{}]``); a clause's
matches are OR'd. **An empty clause (no matches) matches everything**: Istio never emits an
empty ``from``/``to`` list, and an absent section constrains nothing, so "no alternatives
listed" is read as "not constrained", like an empty field in a ``Match``. Within a match,
fields are AND'd, values of one field OR'd; a ``not_`` field fails the match when the value
matches any of its entries.

A connection without identity (plaintext, from outside the mesh) has no principal and no
namespace: ``principals``/``namespaces`` never match it and ``not_principals`` /
``not_namespaces`` never exclude it, so ``not_principals: ["*"]`` matches exactly the
unauthenticated connections (what a STRICT PeerAuthentication becomes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ambient_api.identity import SpiffeId
from ambient_api.model import (
    Authorization,
    AuthorizationAction,
    Clause,
    Match,
    Rule,
)
from ambient_dataplane.matchers import IpAddress, ips_match, parse_ip, ports_match, strings_match

_SPIFFE_SCHEME = "spiffe://"


@dataclass(frozen=True)
class ConnectionAttributes:
    """What policy can see about one L4 connection."""

    source_ip: str
    source_identity: SpiffeId | None
    destination_ip: str
    destination_port: int


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    reason: str
    # "namespace/name" of the deciding policy; None when no single policy decided.
    policy: str | None = None


_NO_POLICY = AuthzDecision(True, "no ALLOW policy applies", None)


def evaluate(policies: Iterable[Authorization], attrs: ConnectionAttributes) -> AuthzDecision:
    """Decide one connection against the policies that apply to its destination."""
    policies = tuple(policies)
    if not policies:
        return _NO_POLICY  # nothing to match: the attributes need not even be parsed
    subject = _Subject.of(attrs)
    allow_policies: list[Authorization] = []
    for policy in policies:
        if policy.action is AuthorizationAction.DENY:
            if _policy_matches(policy, subject):
                return AuthzDecision(False, f"denied by DENY policy {policy.key}", policy.key)
        else:
            allow_policies.append(policy)
    if not allow_policies:
        return _NO_POLICY
    for policy in allow_policies:
        if _policy_matches(policy, subject):
            return AuthzDecision(True, f"allowed by {policy.key}", policy.key)
    return AuthzDecision(False, "no ALLOW policy matched", None)


@dataclass(frozen=True)
class _Subject:
    """The attributes in the forms the matchers compare (parsed once per evaluation)."""

    principal: str | None  # "td/ns/x/sa/y", Istio's way of writing principals
    namespace: str | None
    source_ip: IpAddress | None
    destination_ip: IpAddress | None
    destination_port: int

    @classmethod
    def of(cls, attrs: ConnectionAttributes) -> _Subject:
        identity = attrs.source_identity
        principal = None if identity is None else str(identity).removeprefix(_SPIFFE_SCHEME)
        return cls(
            principal=principal,
            namespace=None if identity is None else identity.namespace,
            source_ip=parse_ip(attrs.source_ip),
            destination_ip=parse_ip(attrs.destination_ip),
            destination_port=attrs.destination_port,
        )


def _policy_matches(policy: Authorization, subject: _Subject) -> bool:
    return any(_rule_matches(rule, subject) for rule in policy.rules)


def _rule_matches(rule: Rule, subject: _Subject) -> bool:
    return all(_clause_matches(clause, subject) for clause in rule.clauses)


def _clause_matches(clause: Clause, subject: _Subject) -> bool:
    if not clause.matches:
        return True  # see the module docstring: an empty clause constrains nothing
    return any(_match_matches(match, subject) for match in clause.matches)


def _match_matches(match: Match, subject: _Subject) -> bool:
    return (
        strings_match(match.principals, match.not_principals, subject.principal)
        and strings_match(match.namespaces, match.not_namespaces, subject.namespace)
        and ips_match(match.source_ips, match.not_source_ips, subject.source_ip)
        and ips_match(match.destination_ips, match.not_destination_ips, subject.destination_ip)
        and ports_match(
            match.destination_ports, match.not_destination_ports, subject.destination_port
        )
    )
