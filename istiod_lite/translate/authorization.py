"""AuthorizationPolicy rules -> L4 rules (``ambient_api.model.Rule``) for ztunnel.

A rule's ``from``, ``to`` and each ``when`` condition become clauses that must all hold. What
only L7 can see (request principals, hosts, methods, paths, L7 ``when`` keys) cannot be
checked by ztunnel: an ALLOW rule needing it is dropped (it could never match, so it fails
closed); in a DENY rule it is ignored, so the rule denies more. Principals are kept without
the ``spiffe://`` scheme, and ``serviceAccounts: [ns/sa]`` become
``<trust domain>/ns/<ns>/sa/<sa>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from ambient_api.model import AuthorizationAction, Clause, Match, Rule
from istiod_lite.translate.mesh import MeshConfig

logger = structlog.get_logger(__name__)

_L7_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals")
_L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
# when-condition key -> (Match field for values, Match field for notValues)
_L4_CONDITIONS = {
    "source.ip": ("source_ips", "not_source_ips"),
    "remote.ip": ("source_ips", "not_source_ips"),
    "source.namespace": ("namespaces", "not_namespaces"),
    "source.principal": ("principals", "not_principals"),
    "destination.ip": ("destination_ips", "not_destination_ips"),
    "destination.port": ("destination_ports", "not_destination_ports"),
}


def _principal(value: str) -> str:
    return value.removeprefix("spiffe://")


def _service_account_principal(value: str, mesh: MeshConfig) -> str:
    namespace, _, account = value.partition("/")
    if not account:
        raise ValueError(f"serviceAccounts entry {value!r} is not namespace/name")
    return f"{mesh.trust_domain}/ns/{namespace}/sa/{account}"


def _values(mapping: Mapping[str, Any], key: str) -> list[str]:
    return list(mapping.get(key) or ())


def _source_match(source: Mapping[str, Any], mesh: MeshConfig) -> tuple[Match, list[str]]:
    """One ``from`` entry -> a Match, plus the names of the fields L4 cannot check."""
    unenforceable = [f"from.source.{f}" for f in _L7_SOURCE_FIELDS if source.get(f)]
    known = {
        "principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
        "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts",
        "notServiceAccounts", *_L7_SOURCE_FIELDS,
    }
    unenforceable += [f"from.source.{f}" for f in source if f not in known]
    if source.get("ipBlocks") and source.get("remoteIpBlocks"):
        # Both must hold, but a Match can only OR the values of one field.
        unenforceable.append("from.source.ipBlocks together with remoteIpBlocks")
    principals = [_principal(p) for p in source.get("principals") or []]
    principals += [_service_account_principal(s, mesh) for s in source.get("serviceAccounts") or []]
    not_principals = [_principal(p) for p in source.get("notPrincipals") or []]
    not_principals += [
        _service_account_principal(s, mesh) for s in source.get("notServiceAccounts") or []
    ]
    match = Match(
        principals=tuple(principals),
        not_principals=tuple(not_principals),
        namespaces=tuple(source.get("namespaces") or ()),
        not_namespaces=tuple(source.get("notNamespaces") or ()),
        source_ips=tuple(_values(source, "ipBlocks") + _values(source, "remoteIpBlocks")),
        not_source_ips=tuple(
            _values(source, "notIpBlocks") + _values(source, "notRemoteIpBlocks")
        ),
    )
    return match, unenforceable


def _operation_match(operation: Mapping[str, Any]) -> tuple[Match, list[str]]:
    unenforceable = [
        f"to.operation.{f}"
        for f in operation
        if f not in ("ports", "notPorts") and operation.get(f)
    ]
    match = Match(
        destination_ports=tuple(int(p) for p in operation.get("ports") or ()),
        not_destination_ports=tuple(int(p) for p in operation.get("notPorts") or ()),
    )
    return match, unenforceable


def _condition_clause(condition: Mapping[str, Any]) -> Clause | None:
    key = condition["key"]
    if key not in _L4_CONDITIONS:
        return None
    values_field, not_values_field = _L4_CONDITIONS[key]
    convert: Callable[[str], Any] = str
    if key == "destination.port":
        convert = int
    elif key == "source.principal":
        convert = _principal
    fields = {
        values_field: tuple(convert(v) for v in condition.get("values") or ()),
        not_values_field: tuple(convert(v) for v in condition.get("notValues") or ()),
    }
    return Clause(matches=(Match(**fields),))


def l4_rule(
    rule: Mapping[str, Any], action: AuthorizationAction, where: str, mesh: MeshConfig
) -> Rule | None:
    """One Istio rule -> one Rule (from, to and each when condition are AND'd clauses), or
    None when an ALLOW rule needs attributes only L7 can see."""
    clauses: list[Clause] = []
    unenforceable: list[str] = []
    if rule.get("from"):
        matches = []
        for entry in rule["from"]:
            match, missing = _source_match(entry.get("source") or {}, mesh)
            matches.append(match)
            unenforceable += missing
        clauses.append(Clause(matches=tuple(matches)))
    if rule.get("to"):
        matches = []
        for entry in rule["to"]:
            match, missing = _operation_match(entry.get("operation") or {})
            matches.append(match)
            unenforceable += missing
        clauses.append(Clause(matches=tuple(matches)))
    for condition in rule.get("when") or []:
        clause = _condition_clause(condition)
        if clause is None:
            unenforceable.append(f"when {condition['key']}")
        else:
            clauses.append(clause)
    if unenforceable:
        fields = sorted(set(unenforceable))
        if action is AuthorizationAction.ALLOW:
            logger.warning(
                "ALLOW rule needs L7 attributes ztunnel cannot check; rule dropped",
                rule=where,
                fields=fields,
            )
            return None
        logger.info(
            "DENY rule has L7 attributes ztunnel cannot check; they are ignored (denies more)",
            rule=where,
            fields=fields,
        )
    return Rule(clauses=tuple(clauses))
