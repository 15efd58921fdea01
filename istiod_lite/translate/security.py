"""L7 security objects -> waypoint resources: ``AuthorizationPolicy`` with ``targetRefs``
becomes ``WaypointAuthorization`` (here) and ``RequestAuthentication`` ``JwtPolicy``
(``jwt_policies.py``); ``security_resources`` gives both.

Decisions worth knowing (Istio's behaviour unless said otherwise):

* Only policies with ``targetRefs`` (or the singular ``targetRef``) reach waypoints; the L4
  translator (``l4.py``) skips exactly those. Targets are resolved in ``targets.py``.
* Principals are stored without ``spiffe://`` (as in ``l4.py``); ``serviceAccounts``
  entries (``ns/sa``, or a bare ``sa`` in the policy's namespace) become principals
  ``<trust domain>/ns/<ns>/sa/<sa>`` (``policy_values.py``).
* An ALLOW rule using something a waypoint cannot check (an unknown ``when`` key, an unknown
  source/operation field, a malformed value, an empty ``source``) is dropped: it can never
  match, so it fails closed. In DENY and AUDIT rules such parts are left out, so the rule
  matches (denies) more; an unreadable ``from``/``to`` entry becomes an alternative matching
  every request, since dropping it would narrow the rule. ALLOW with no rules (``spec: {}``)
  denies everything at its targets.
* **No translation error widens access**: ``rules`` that are not a list leave an ALLOW
  policy without rules and give a DENY one a rule matching every request; an unknown action
  denies every request at the targets; a target reference that cannot be resolved makes the
  policy cover every Gateway and Service of its namespace, an ALLOW one with no rules (its
  rules would widen the ALLOW policies of targets it did not name); a translation that fails
  unexpectedly denies every request there. Each error is logged (``policy not translated as
  written; failing closed``) and collected as a ``PolicyError``.
* ``action: CUSTOM`` without a usable ext_authz provider (istiod_lite has none yet) becomes
  a DENY of what its rules match, as Istio's builder does for a provider it cannot use
  ("will generate deny configs"); logged once per policy (``CUSTOM needs an ext_authz
  provider; denying``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import structlog

from ambient_api import l7
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import policy_values
from istiod_lite.translate.common import (
    AUTHORIZATION_POLICY,
    CUSTOM_DENIED,
    PolicyError,
    convert_each,
    custom_provider,
    name_of,
    namespace_of,
    record_policy_error,
)
from istiod_lite.translate.jwt_policies import ReadFile, jwt_policy, read_text_file
from istiod_lite.translate.mesh import MeshConfig
from istiod_lite.translate.policy_values import PolicyValueError
from istiod_lite.translate.targets import namespace_targets, resolve_targets, target_refs

logger = structlog.get_logger(__name__)

SecurityResource = l7.WaypointAuthorization | l7.JwtPolicy
_ACTIONS = frozenset(action.value for action in l7.WaypointAuthorizationAction)


def security_resources(
    objects: ClusterObjects,
    mesh: MeshConfig,
    read_file: ReadFile = read_text_file,
    *,
    errors: list[PolicyError] | None = None,
) -> list[SecurityResource]:
    """Every waypoint authorization and JWT policy, sorted by kind then key (stable output).
    ``read_file`` reads a ``jwksUri: file://`` path (injected so tests need no files); the
    AuthorizationPolicy parts that could not be translated are appended to ``errors``."""
    found = errors if errors is not None else []
    authorizations: list[SecurityResource] = convert_each(
        objects.authorization_policies,
        lambda p: _authorization_or_deny(p, objects, mesh, found),
    )
    jwt_policies: list[SecurityResource] = convert_each(
        objects.request_authentications, lambda p: jwt_policy(p, objects, mesh, read_file)
    )
    return authorizations + jwt_policies


# -- AuthorizationPolicy ---------------------------------------------------------------------


def _authorization_or_deny(
    policy: dict[str, Any], objects: ClusterObjects, mesh: MeshConfig,
    errors: list[PolicyError],
) -> l7.WaypointAuthorization | None:
    """``_authorization``, or, should it fail unexpectedly, a policy denying every request
    to whatever the policy could have targeted: it must not just vanish."""
    try:
        return _authorization(policy, objects, mesh, errors)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        name, namespace = name_of(policy), namespace_of(policy)
        record_policy_error(errors, f"{AUTHORIZATION_POLICY} {namespace}/{name}", "spec",
                            f"{type(exc).__name__}: {exc}",
                            "denies every request to every Gateway and Service of its "
                            "namespace")
        targets = tuple(namespace_targets(namespace, objects, mesh))
        if not targets:
            return None
        return l7.WaypointAuthorization(name=name, namespace=namespace,
                                        action=l7.WaypointAuthorizationAction.DENY,
                                        targets=targets, rules=(l7.L7Rule(),))


def _authorization(
    policy: dict[str, Any], objects: ClusterObjects, mesh: MeshConfig,
    errors: list[PolicyError],
) -> l7.WaypointAuthorization | None:
    name, namespace = name_of(policy), namespace_of(policy)
    where = f"{namespace}/{name}"
    policy_name = f"{AUTHORIZATION_POLICY} {where}"
    spec = policy.get("spec") or {}
    if not isinstance(spec, Mapping):
        return None  # no targetRefs to read: l4.py makes it deny its namespace
    unresolved: list[tuple[str, str]] = []
    try:
        refs = target_refs(spec)
    except ValueError:
        refs = []
        unresolved.append(("spec.targetRefs", "must be a list"))
    if not refs and not unresolved:
        return None  # an L4 policy: l4.py's
    if spec.get("selector"):
        logger.warning("policy has both selector and targetRefs; the selector is ignored",
                       policy=where)
    action_name = spec.get("action", "ALLOW")
    rules: list[l7.L7Rule] = []
    if action_name == "CUSTOM":
        logger.warning(CUSTOM_DENIED, policy=where, provider=custom_provider(spec))
        action = l7.WaypointAuthorizationAction.DENY
    elif isinstance(action_name, str) and action_name in _ACTIONS:
        action = l7.WaypointAuthorizationAction(action_name)
    else:
        record_policy_error(errors, policy_name, "spec.action",
                            f"{action_name!r} is not ALLOW, DENY, AUDIT or CUSTOM",
                            "denies every request at its targets")
        action = l7.WaypointAuthorizationAction.DENY
        rules.append(l7.L7Rule())
    targets, unresolved_refs = resolve_targets(refs, namespace, where, objects, mesh)
    unresolved += unresolved_refs
    for field, reason in unresolved:
        # Which target was meant is unknown: cover every one the policy could have named.
        record_policy_error(errors, policy_name, field, reason,
                            "applies to every Gateway and Service of its namespace (an ALLOW "
                            "policy allowing nothing)")
    if unresolved:
        targets = tuple(dict.fromkeys((*targets, *namespace_targets(namespace, objects, mesh))))
    if not targets:
        logger.warning("policy has no usable target; ignored", policy=where)
        return None
    # An ALLOW policy's rules at targets it did not name would widen their ALLOW policies.
    allows_nothing = bool(unresolved) and action is l7.WaypointAuthorizationAction.ALLOW
    if not rules and not allows_nothing:
        rules = _rules(spec, action, where, policy_name, namespace, mesh, errors)
    return l7.WaypointAuthorization(
        name=name, namespace=namespace, action=action, targets=targets, rules=tuple(rules)
    )


def _rules(
    spec: Mapping[str, Any], action: l7.WaypointAuthorizationAction, where: str,
    policy_name: str, namespace: str, mesh: MeshConfig, errors: list[PolicyError],
) -> list[l7.L7Rule]:
    raw_rules = spec.get("rules") or []
    if not isinstance(raw_rules, list):
        # Skipping the policy would open an ALLOW policy's targets: fail closed instead.
        allow = action is l7.WaypointAuthorizationAction.ALLOW
        fallback = "no rule (denies all)" if allow else "one rule matching every request"
        logger.warning(f"spec.rules must be a list; the policy gets {fallback}", policy=where)
        errors.append(PolicyError(policy_name, "spec.rules", "must be a list"))
        return [] if allow else [l7.L7Rule()]
    rules = []
    for index, rule in enumerate(raw_rules):
        converted, problems = convert_rule(
            rule, action, f"{where} rules[{index}]", namespace, mesh
        )
        errors += [PolicyError(policy_name, f"rules[{index}]", p) for p in problems]
        if converted is not None:
            rules.append(converted)
    return rules


# source / operation field -> the L7Match field it fills
_SOURCE_FIELDS: dict[str, str] = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "source_ips",
    "notIpBlocks": "not_source_ips",
    "remoteIpBlocks": "source_ips",
    "notRemoteIpBlocks": "not_source_ips",
    "serviceAccounts": "principals",
    "notServiceAccounts": "not_principals",
}
_OPERATION_FIELDS: dict[str, str] = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
# when key -> (L7Match field for values, for notValues)
_WHEN_FIELDS: dict[str, tuple[str, str]] = {
    "source.ip": ("source_ips", "not_source_ips"),
    "remote.ip": ("source_ips", "not_source_ips"),
    "source.namespace": ("namespaces", "not_namespaces"),
    "source.principal": ("principals", "not_principals"),
    "request.auth.principal": ("request_principals", "not_request_principals"),
    "destination.port": ("ports", "not_ports"),
}
_CONDITION_KEY = re.compile(
    r"^(request\.headers\[[^\[\]]+\]|request\.auth\.claims(\[[^\[\]]+\])+"
    r"|request\.auth\.audiences|request\.auth\.presenter)$"
)


def _convert_values(
    target_field: str, raw: Any, field: str, namespace: str, mesh: MeshConfig,
    *, service_accounts: bool,
) -> tuple[Any, ...]:
    if service_accounts:
        return policy_values.service_account_principals(raw, field, namespace, mesh)
    if target_field in ("ports", "not_ports"):
        return policy_values.ports(raw, field)
    if target_field in ("source_ips", "not_source_ips"):
        return policy_values.addresses(raw, field)
    if target_field in ("principals", "not_principals"):
        return policy_values.principals(raw, field)
    return policy_values.strings(raw, field)


def _match(
    entry: Mapping[str, Any],
    fields: Mapping[str, str],
    prefix: str,
    namespace: str,
    mesh: MeshConfig,
    problems: list[str],
) -> l7.L7Match:
    """One source or operation -> an L7Match; unusable fields are named in ``problems``."""
    values: dict[str, tuple[Any, ...]] = {}
    if entry.get("ipBlocks") and entry.get("remoteIpBlocks") and prefix == "from.source":
        # Both must hold, but a match can only OR the values of one field.
        problems.append(f"{prefix}: ipBlocks together with remoteIpBlocks")
        entry = {k: v for k, v in entry.items() if k not in ("ipBlocks", "remoteIpBlocks")}
    for key, raw in entry.items():
        field = f"{prefix}.{key}"
        target = fields.get(key)
        if target is None:
            problems.append(f"{field}: not supported")
            continue
        try:
            converted = _convert_values(
                target, raw, field, namespace, mesh,
                service_accounts=key in ("serviceAccounts", "notServiceAccounts"),
            )
        except PolicyValueError as exc:
            problems.append(str(exc))
            continue
        values[target] = values.get(target, ()) + converted
    return l7.L7Match(**values)


def _when_clause(condition: Any, index: int, namespace: str, mesh: MeshConfig) -> l7.L7Clause:
    field = f"when[{index}]"
    if not isinstance(condition, Mapping) or not isinstance(condition.get("key"), str):
        raise PolicyValueError(f"{field}: a condition needs a key")
    key: str = condition["key"]
    raw_values, raw_not_values = condition.get("values"), condition.get("notValues")
    if not raw_values and not raw_not_values:
        raise PolicyValueError(f"{field} {key}: needs values or notValues")
    if key in _WHEN_FIELDS:
        values_field, not_values_field = _WHEN_FIELDS[key]
        fields = {
            values_field: _convert_values(
                values_field, raw_values, f"{field}.values", namespace, mesh,
                service_accounts=False,
            ),
            not_values_field: _convert_values(
                not_values_field, raw_not_values, f"{field}.notValues", namespace, mesh,
                service_accounts=False,
            ),
        }
        return l7.L7Clause(matches=(l7.L7Match(**fields),))
    if _CONDITION_KEY.match(key):
        condition_match = l7.Condition(
            key=key,
            values=policy_values.strings(raw_values, f"{field}.values"),
            not_values=policy_values.strings(raw_not_values, f"{field}.notValues"),
        )
        return l7.L7Clause(matches=(l7.L7Match(conditions=(condition_match,)),))
    raise PolicyValueError(f"{field}: condition key {key!r} not supported")


def convert_rule(
    rule: Any, action: l7.WaypointAuthorizationAction, where: str, namespace: str,
    mesh: MeshConfig,
) -> tuple[l7.L7Rule | None, list[str]]:
    """One Istio rule -> an L7Rule (``from``, ``to`` and each ``when`` condition are AND'd
    clauses), or None for an ALLOW rule with parts the waypoint cannot check (fail closed);
    other actions keep the rule without those parts, so it matches more. Also returns those
    parts (logged here). ``namespace`` is the policy's, for bare ``serviceAccounts``."""
    problems: list[str] = []
    clauses: list[l7.L7Clause] = []
    if not isinstance(rule, Mapping):
        problems.append("a rule must be a mapping")
        rule = {}
    for section, inner, fields in (
        ("from", "source", _SOURCE_FIELDS),
        ("to", "operation", _OPERATION_FIELDS),
    ):
        entries = rule.get(section)
        if not entries:
            continue
        if not isinstance(entries, list):
            problems.append(f"{section} must be a list")
            continue
        matches = []
        for entry in entries:
            body = entry.get(inner) if isinstance(entry, Mapping) else None
            if not isinstance(body, Mapping) or not body:
                # Left out of a DENY it must match more, not less: an empty alternative.
                problems.append(f"{section}: each entry needs a non-empty {inner} mapping")
                matches.append(l7.L7Match())
                continue
            matches.append(
                _match(body, fields, f"{section}.{inner}", namespace, mesh, problems)
            )
        clauses.append(l7.L7Clause(matches=tuple(matches)))
    conditions = rule.get("when") or []
    if not isinstance(conditions, list):
        problems.append("when must be a list")
        conditions = []
    for index, condition in enumerate(conditions):
        try:
            clauses.append(_when_clause(condition, index, namespace, mesh))
        except PolicyValueError as exc:
            problems.append(str(exc))
    unknown = sorted(str(key) for key in rule if key not in ("from", "to", "when"))
    problems += [f"{key}: not a rule field" for key in unknown]
    if problems:
        if action is l7.WaypointAuthorizationAction.ALLOW:
            logger.warning(
                "ALLOW rule uses something the waypoint cannot check; rule dropped",
                rule=where, problems=problems,
            )
            return None, problems
        logger.warning(
            f"{action.value} rule uses something the waypoint cannot check; "
            "those parts are left out (it matches more)",
            rule=where, problems=problems,
        )
    return l7.L7Rule(clauses=tuple(clauses)), problems
