"""L4 authorization: Istio's AuthorizationPolicy semantics over one connection's attributes.

Sans-IO: the inbound proxy collects ``ConnectionAttributes`` (the peer's verified identity if
the connection came over HBONE, the addresses and the destination port) and the policies that
apply to the destination workload (``ProxyState.policies_for``), and asks ``evaluate``.

Evaluation order (Istio): any matching DENY policy denies; with no ALLOW policy at all the
connection is allowed; otherwise some ALLOW policy must match.

Matching structure (``istiod_lite.api.model``): a policy's rules are OR'd; a rule's clauses
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

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from istiod_lite.api.identity import SpiffeId
from istiod_lite.api.model import (
    Authorization,
    AuthorizationAction,
    Clause,
    Match,
    Rule,
)

_SPIFFE_SCHEME = "spiffe://"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def string_matches(pattern: str, value: str) -> bool:
    """Istio string matching: exact, ``prefix*``, ``*suffix``, or ``*`` (any non-empty)."""
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


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


def strings_match(values: Sequence[str], not_values: Sequence[str], actual: str | None) -> bool:
    if values and (actual is None or not any(string_matches(v, actual) for v in values)):
        return False
    return not (actual is not None and any(string_matches(v, actual) for v in not_values))


def ips_match(values: Sequence[str], not_values: Sequence[str], actual: IpAddress | None) -> bool:
    if values and (actual is None or not any(_ip_in(v, actual) for v in values)):
        return False
    return not (actual is not None and any(_ip_in(v, actual) for v in not_values))


def ports_match(values: Sequence[int], not_values: Sequence[int], actual: int) -> bool:
    if values and actual not in values:
        return False
    return actual not in not_values


def _ip_in(entry: str, address: IpAddress) -> bool:
    network = _parse_network(entry)
    return network is not None and address in network


@lru_cache(maxsize=4096)
def _parse_network(entry: str) -> IpNetwork | None:
    """An address or CIDR from a policy; None (never matches) when it is not valid."""
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def parse_ip(value: str) -> IpAddress | None:
    """The connection's address; IPv4-mapped IPv6 (dual-stack sockets) counts as IPv4.
    Cached: the same few peer and pod addresses come back on every connection."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
