"""AuthorizationPolicy rules -> L4 rules (``ambient_api.model.Rule``) for ztunnel.

A rule's ``from``, ``to`` and each ``when`` condition become clauses that must all hold.

**HTTP-only attributes** are those Istio's ambient translation (``authorization.go``:
``httpOperations``, ``httpSources``, ``l4WhenAttributes``) leaves to a waypoint: ``hosts``,
``methods``, ``paths`` (and their ``not`` forms), ``requestPrincipals``, ``remoteIpBlocks``
(and their ``not`` forms), and every ``when`` key except ``source.ip``, ``source.namespace``,
``source.principal``, ``destination.ip`` and ``destination.port`` (so ``remote.ip`` and
``request.*`` are HTTP-only: the remote address is the original client of an HTTP request,
which ztunnel does not know). As in Istio:

* an ALLOW rule using one is dropped: it could never match, so it fails closed;
* in a DENY rule they are left out and the rest of the rule is enforced, so it denies more.
  Where nothing is left of an alternative (``from: [{source: {requestPrincipals: [x]}}]``)
  Istio's ztunnel skips the empty match and the DENY has no effect; here an empty
  alternative matches every connection (``ztunnel.authz``), so such a DENY denies all the
  traffic it selects. We keep that: a DENY written by the user is never silently void.

**Values that cannot be translated** (a port that is not a number, an address that is not an
IP or CIDR, an unknown field, an empty ``source``/``operation``, a condition without values,
a malformed ``serviceAccounts`` entry) are errors: the ALLOW rule is dropped, and in a DENY
rule the field (or the whole alternative or condition) is left out, so it denies more, the
same treatment as an HTTP-only attribute. ``l4_rules`` logs them and collects them as
``PolicyError``.

Principals are kept without the ``spiffe://`` scheme; ``serviceAccounts`` entries become
``<trust domain>/ns/<ns>/sa/<sa>``, a bare ``<sa>`` in the policy's namespace (Istio).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ambient_api.model import AuthorizationAction, Clause, Match, Rule
from istiod_lite.translate import policy_values
from istiod_lite.translate.common import AUTHORIZATION_POLICY, PolicyError, record_policy_error
from istiod_lite.translate.mesh import MeshConfig
from istiod_lite.translate.policy_values import PolicyValueError

HTTP_SOURCE_FIELDS = frozenset(
    {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
)
HTTP_OPERATION_FIELDS = frozenset(
    {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}
)
_SOURCE_FIELDS: dict[str, str] = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "serviceAccounts": "principals",
    "notServiceAccounts": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "source_ips",
    "notIpBlocks": "not_source_ips",
}
_OPERATION_FIELDS: dict[str, str] = {
    "ports": "destination_ports",
    "notPorts": "not_destination_ports",
}
# when key -> (Match field for values, Match field for notValues)
L4_CONDITIONS: dict[str, tuple[str, str]] = {
    "source.ip": ("source_ips", "not_source_ips"),
    "source.namespace": ("namespaces", "not_namespaces"),
    "source.principal": ("principals", "not_principals"),
    "destination.ip": ("destination_ips", "not_destination_ips"),
    "destination.port": ("destination_ports", "not_destination_ports"),
}
_RULE_SECTIONS = frozenset({"from", "to", "when"})

ValueParser = Callable[[Any, str], tuple[Any, ...]]

logger = structlog.get_logger(__name__)


@dataclass(frozen=True)
class L4Rule:
    """One Istio rule as ztunnel gets it, and what could not be carried over."""

    rule: Rule | None  # None: an ALLOW rule that can never match at L4 (dropped)
    http_only: tuple[str, ...]  # the HTTP-only fields it uses
    errors: tuple[tuple[str, str], ...]  # (field, reason) of what cannot be translated


class _RuleReader:
    """Reads one rule, collecting its HTTP-only fields and errors instead of raising, so
    that the caller decides (by action) what to do with the rule."""

    def __init__(self, prefix: str, policy_namespace: str, mesh: MeshConfig) -> None:
        self.prefix = prefix
        self.policy_namespace = policy_namespace
        self.mesh = mesh
        self.http_only: list[str] = []
        self.errors: list[tuple[str, str]] = []

    def error(self, field: str, reason: str) -> None:
        self.errors.append((f"{self.prefix}{field}".rstrip("."), reason))

    def _parser(self, field_name: str, target: str) -> ValueParser:
        if field_name in ("serviceAccounts", "notServiceAccounts"):
            return lambda value, field: policy_values.service_account_principals(
                value, field, self.policy_namespace, self.mesh
            )
        if target.endswith("_ips"):
            return policy_values.addresses
        if target.endswith("_ports"):
            return policy_values.ports
        if target.endswith("principals"):
            return policy_values.principals
        return policy_values.strings

    def match(
        self, entry: Any, field: str, inner: str, fields: Mapping[str, str],
        http_only: frozenset[str],
    ) -> Match:
        """One ``from``/``to`` entry -> a Match of what L4 can check; a field that cannot be
        read is left out (and named), so the Match matches more."""
        body = entry.get(inner) if isinstance(entry, Mapping) else None
        if not isinstance(body, Mapping) or not body:
            self.error(field, f"each entry needs a non-empty {inner} mapping")
            return Match()
        values: dict[str, tuple[Any, ...]] = {}
        for key, raw in body.items():
            at = f"{field}.{inner}.{key}"
            if key in http_only:
                if raw:
                    self.http_only.append(f"{self.prefix}{at}")
                continue
            target = fields.get(key)
            if target is None:
                self.error(at, f"not a {inner} field ztunnel knows")
                continue
            try:
                parsed = self._parser(str(key), target)(raw, f"{self.prefix}{at}")
            except PolicyValueError as exc:
                self.errors.append((f"{self.prefix}{at}", str(exc)))
                continue
            values[target] = values.get(target, ()) + parsed
        return Match(**values)

    def section(
        self, rule: Mapping[str, Any], section: str, inner: str, fields: Mapping[str, str],
        http_only: frozenset[str],
    ) -> Clause | None:
        entries = rule.get(section)
        if not entries:
            return None
        if not isinstance(entries, list):
            self.error(section, "must be a list")
            return None
        return Clause(matches=tuple(
            self.match(entry, f"{section}[{index}]", inner, fields, http_only)
            for index, entry in enumerate(entries)
        ))

    def condition(self, condition: Any, field: str) -> Clause | None:
        if not isinstance(condition, Mapping) or not isinstance(condition.get("key"), str):
            self.error(field, "a condition needs a key")
            return None
        key: str = condition["key"]
        if key not in L4_CONDITIONS:
            self.http_only.append(f"{self.prefix}{field} {key}")
            return None
        raw_values, raw_not_values = condition.get("values"), condition.get("notValues")
        if not raw_values and not raw_not_values:
            self.error(field, f"{key} needs values or notValues")
            return None
        values_field, not_values_field = L4_CONDITIONS[key]
        parse = self._parser("", values_field)
        try:
            match = Match(**{
                values_field: parse(raw_values, f"{self.prefix}{field}.values"),
                not_values_field: parse(raw_not_values, f"{self.prefix}{field}.notValues"),
            })
        except PolicyValueError as exc:
            self.errors.append((f"{self.prefix}{field}", str(exc)))
            return None
        return Clause(matches=(match,))


def l4_rule(
    rule: Any, action: AuthorizationAction, prefix: str, policy_namespace: str,
    mesh: MeshConfig,
) -> L4Rule:
    """One Istio rule -> one Rule (from, to and each when condition are AND'd clauses), or
    None for an ALLOW rule that uses HTTP-only attributes or cannot be translated. ``prefix``
    names the rule in field paths (``rules[0].``)."""
    reader = _RuleReader(prefix, policy_namespace, mesh)
    clauses: list[Clause] = []
    if not isinstance(rule, Mapping):
        reader.error("", "a rule must be a mapping")
        rule = {}
    for section, inner, fields, http_only in (
        ("from", "source", _SOURCE_FIELDS, HTTP_SOURCE_FIELDS),
        ("to", "operation", _OPERATION_FIELDS, HTTP_OPERATION_FIELDS),
    ):
        clause = reader.section(rule, section, inner, fields, http_only)
        if clause is not None:
            clauses.append(clause)
    conditions = rule.get("when") or []
    if not isinstance(conditions, list):
        reader.error("when", "must be a list")
        conditions = []
    for index, condition in enumerate(conditions):
        clause = reader.condition(condition, f"when[{index}]")
        if clause is not None:
            clauses.append(clause)
    for key in rule:
        if key not in _RULE_SECTIONS:
            reader.error(str(key), "not a rule field")
    dropped = action is AuthorizationAction.ALLOW and bool(reader.http_only or reader.errors)
    return L4Rule(
        rule=None if dropped else Rule(clauses=tuple(clauses)),
        http_only=tuple(sorted(set(reader.http_only))),
        errors=tuple(reader.errors),
    )


def l4_rules(
    spec: Mapping[str, Any], action: AuthorizationAction, where: str, policy_namespace: str,
    mesh: MeshConfig, errors: list[PolicyError], *, quiet: bool = False,
) -> list[Rule]:
    """A policy's ``rules`` for ztunnel, each error logged and added to ``errors``. Rules
    that are not a list leave an ALLOW policy with none (it allows nothing) and give any
    other one a rule matching everything. ``quiet`` leaves out the HTTP-only notes (a CUSTOM
    policy's one log line says it all)."""
    policy = f"{AUTHORIZATION_POLICY} {where}"
    allow = action is AuthorizationAction.ALLOW
    raw_rules = spec.get("rules") or []
    if not isinstance(raw_rules, list):
        record_policy_error(errors, policy, "spec.rules", "must be a list",
                            "allows nothing" if allow else "denies everything it selects")
        return [] if allow else [Rule()]
    rules = []
    for index, rule in enumerate(raw_rules):
        converted = l4_rule(rule, action, f"rules[{index}].", policy_namespace, mesh)
        effect = "ALLOW rule dropped" if allow else "left out of the rule (denies more)"
        for field, reason in converted.errors:
            record_policy_error(errors, policy, field, reason, effect)
        if converted.http_only and not quiet:
            fields = list(converted.http_only)
            if allow:
                logger.warning(
                    "ALLOW rule needs L7 attributes ztunnel cannot check; rule dropped",
                    rule=f"{where} rules[{index}]", fields=fields,
                )
            else:
                logger.info(
                    "DENY rule has L7 attributes ztunnel cannot check; they are ignored "
                    "(denies more)",
                    rule=f"{where} rules[{index}]", fields=fields,
                )
        if converted.rule is not None:
            rules.append(converted.rule)
    return rules
