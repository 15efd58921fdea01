"""L7 security objects -> waypoint resources: ``AuthorizationPolicy`` and
``RequestAuthentication`` with ``targetRefs`` become ``WaypointAuthorization`` and
``JwtPolicy`` (``ambient_api.l7``).

Decisions worth knowing (Istio's behaviour unless said otherwise):

* Only policies with ``targetRefs`` (or the singular ``targetRef``) reach waypoints; the L4
  translator (``l4.py``) skips exactly those. A target is a waypoint ``Gateway``
  (group ``gateway.networking.k8s.io``) -> ``waypoint:<ns>/<name>``, or a ``Service`` ->
  ``<ns>/<name>.<ns>.svc.<cluster domain>``; other kinds are skipped with a warning, and a
  target in another namespace than the policy's is refused (Istio requires the same one).
  A target naming an object that does not exist is kept, with a warning: it takes effect when
  the object appears.
* Principals are stored without ``spiffe://`` (as in ``l4.py``); ``serviceAccounts:
  [ns/sa]`` become principals ``<trust domain>/ns/<ns>/sa/<sa>``.
* An ALLOW rule using something a waypoint cannot check (an unknown ``when`` key, an unknown
  source/operation field, a malformed value) is dropped: it can never match, so it fails
  closed. In DENY and AUDIT rules such parts are left out, so the rule matches (denies) more.
  ALLOW with no rules (``spec: {}``) denies everything at its targets. CUSTOM is not supported.
* ``RequestAuthentication`` JWKS come inline (``jwks``) or from an absolute ``file://`` path,
  read at translation time and inlined. Fetching over the network is not supported; such a
  provider, or one whose JWKS is not a JSON object with a ``keys`` list, is left out with a
  warning, so tokens of its issuer are rejected (401) rather than trusted. A policy whose every
  provider was left out is still sent, so that any presented token is rejected.

Broken objects are logged and skipped; translation never fails because of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from ambient_api import l7
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import policy_values
from istiod_lite.translate.common import (
    AUTHORIZATION_POLICY,
    CUSTOM_DENIED,
    GATEWAY_GROUP,
    PolicyError,
    convert_each,
    custom_provider,
    name_of,
    namespace_of,
    service_hostname,
)
from istiod_lite.translate.mesh import MeshConfig
from istiod_lite.translate.policy_values import PolicyValueError

logger = structlog.get_logger(__name__)

SecurityResource = l7.WaypointAuthorization | l7.JwtPolicy
ReadFile = Callable[[str], str]


def read_text_file(path: str) -> str:
    """The default ``read_file``: the file's text (raises OSError)."""
    return Path(path).read_text()


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
        objects.authorization_policies, lambda p: _authorization(p, objects, mesh, found)
    )
    jwt_policies: list[SecurityResource] = convert_each(
        objects.request_authentications, lambda p: _jwt_policy(p, objects, mesh, read_file)
    )
    return authorizations + jwt_policies


# -- shared --------------------------------------------------------------------------------


def _target_refs(spec: Mapping[str, Any]) -> list[Any]:
    refs = spec.get("targetRefs")
    if refs is None and spec.get("targetRef") is not None:
        refs = [spec["targetRef"]]
    if refs is None:
        return []
    if not isinstance(refs, list):
        raise ValueError("spec.targetRefs must be a list")
    return refs


def _targets(
    refs: Iterable[Any], namespace: str, where: str, objects: ClusterObjects, mesh: MeshConfig
) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """``targetRefs`` -> (target keys, (field, reason) of each reference naming nothing we
    can resolve); every unusable reference is logged."""
    targets: list[str] = []
    unresolved: list[tuple[str, str]] = []
    for index, ref in enumerate(refs):
        field = f"targetRefs[{index}]"
        if not isinstance(ref, Mapping) or not ref.get("name") or not ref.get("kind"):
            logger.warning("target reference needs kind and name", policy=where, field=field)
            unresolved.append((field, "needs kind and name"))
            continue
        kind, name = str(ref["kind"]), str(ref["name"])
        group = str(ref.get("group") or "")
        ref_namespace = str(ref.get("namespace") or namespace)
        if ref_namespace != namespace:
            logger.warning(
                "target reference to another namespace; ignored (it must be the policy's)",
                policy=where, field=field, target_namespace=ref_namespace,
            )
            continue
        if kind == "Gateway" and group == GATEWAY_GROUP:
            if f"{namespace}/{name}" not in objects.gateways:
                logger.warning("policy targets a Gateway that does not exist", policy=where,
                               gateway=f"{namespace}/{name}")
            targets.append(l7.waypoint_key(namespace, name))
        elif kind == "Service" and group in ("", "core"):
            if f"{namespace}/{name}" not in objects.services:
                logger.warning("policy targets a Service that does not exist", policy=where,
                               service=f"{namespace}/{name}")
            targets.append(f"{namespace}/{service_hostname(name, namespace, mesh)}")
        else:
            logger.warning(
                "target kind not supported (use a waypoint Gateway or a Service)",
                policy=where, field=field, group=group, kind=kind,
            )
            unresolved.append((field, f"target kind {group or 'core'}/{kind} not supported"))
    return tuple(dict.fromkeys(targets)), unresolved


def _namespace_targets(namespace: str, objects: ClusterObjects, mesh: MeshConfig) -> list[str]:
    """Everything a policy of ``namespace`` could target: its Gateways and Services."""
    gateways = [
        l7.waypoint_key(namespace_of(g), name_of(g))
        for g in objects.gateways.values()
        if namespace_of(g) == namespace
    ]
    services = [
        f"{namespace}/{service_hostname(name_of(s), namespace, mesh)}"
        for s in objects.services.values()
        if namespace_of(s) == namespace
    ]
    return sorted(gateways) + sorted(services)


# -- AuthorizationPolicy ---------------------------------------------------------------------


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
        refs = _target_refs(spec)
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
    elif action_name in {a.value for a in l7.WaypointAuthorizationAction}:
        action = l7.WaypointAuthorizationAction(action_name)
    else:
        reason = f"{action_name!r} is not ALLOW, DENY, AUDIT or CUSTOM"
        logger.warning("policy not translated as written; failing closed", policy=policy_name,
                       field="spec.action", reason=reason,
                       effect="denies every request at its targets")
        errors.append(PolicyError(policy_name, "spec.action", reason))
        action = l7.WaypointAuthorizationAction.DENY
        rules.append(l7.L7Rule())
    targets, unresolved_refs = _targets(refs, namespace, where, objects, mesh)
    unresolved += unresolved_refs
    if unresolved:
        # Which targets were meant is unknown: cover every one the policy could have named.
        logger.warning(
            "policy not translated as written; failing closed", policy=policy_name,
            field=", ".join(field for field, _ in unresolved),
            reason="; ".join(reason for _, reason in unresolved),
            effect="applies to every Gateway and Service of its namespace (an ALLOW policy "
            "allowing nothing)",
        )
        errors += [PolicyError(policy_name, f, r) for f, r in unresolved]
        targets = tuple(dict.fromkeys((*targets, *_namespace_targets(namespace, objects, mesh))))
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


# -- RequestAuthentication -------------------------------------------------------------------


def _jwt_policy(
    policy: dict[str, Any], objects: ClusterObjects, mesh: MeshConfig, read_file: ReadFile
) -> l7.JwtPolicy | None:
    name, namespace = name_of(policy), namespace_of(policy)
    where = f"{namespace}/{name}"
    spec = policy.get("spec") or {}
    refs = _target_refs(spec)
    if not refs:
        if spec.get("selector"):
            logger.warning(
                "RequestAuthentication with a selector is not supported in ambient mode "
                "(Istio: use targetRefs to a waypoint or Service); ignored",
                policy=where,
            )
        else:
            logger.warning(
                "RequestAuthentication without targetRefs applies to no waypoint; ignored "
                "(Istio: use targetRefs to a waypoint or Service)",
                policy=where,
            )
        return None
    targets, _unresolved = _targets(refs, namespace, where, objects, mesh)
    if not targets:
        logger.warning("policy has no usable target; ignored", policy=where)
        return None
    rules = spec.get("jwtRules") or []
    if not isinstance(rules, list):
        logger.warning("spec.jwtRules must be a list; no provider, so every token is rejected",
                       policy=where)
        return l7.JwtPolicy(name=name, namespace=namespace, targets=targets, providers=())
    if not rules:
        logger.info("RequestAuthentication has no jwtRules; nothing to enforce", policy=where)
        return None
    providers = []
    for index, rule in enumerate(rules):
        provider = jwt_provider(rule, f"{where} jwtRules[{index}]", read_file)
        if provider is not None:
            providers.append(provider)
    return l7.JwtPolicy(
        name=name, namespace=namespace, targets=targets, providers=tuple(providers)
    )


def jwt_provider(rule: Any, where: str, read_file: ReadFile) -> l7.JwtProvider | None:
    """One ``jwtRules`` entry -> a JwtProvider, or None (logged) when it cannot be used."""
    if not isinstance(rule, Mapping):
        logger.warning("jwtRules entry is not a mapping; provider skipped", rule=where)
        return None
    issuer = rule.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        logger.warning("jwtRules entry has no issuer; provider skipped", rule=where)
        return None
    jwks = _jwks(rule, where, read_file)
    if jwks is None:
        return None
    for unsupported in ("fromParams", "fromCookies", "outputPayloadToHeader"):
        if rule.get(unsupported):
            logger.warning(f"jwtRules {unsupported} is not supported; ignored", rule=where)
    try:
        audiences = policy_values.strings(rule.get("audiences"), "audiences")
        from_headers = _from_headers(rule.get("fromHeaders"))
        claim_headers = _claim_headers(rule.get("outputClaimToHeaders"))
    except PolicyValueError as exc:
        logger.warning("jwtRules entry is malformed; provider skipped", rule=where,
                       reason=str(exc))
        return None
    extraction: dict[str, Any] = {} if from_headers is None else {"from_headers": from_headers}
    return l7.JwtProvider(
        issuer=issuer,
        audiences=audiences,
        jwks=jwks,
        forward_original_token=bool(rule.get("forwardOriginalToken", False)),
        output_claim_to_headers=claim_headers,
        **extraction,
    )


def _jwks(rule: Mapping[str, Any], where: str, read_file: ReadFile) -> str | None:
    """The provider's JWKS document, validated, or None (logged) when unusable."""
    inline, uri = rule.get("jwks"), rule.get("jwksUri")
    if inline:
        if not isinstance(inline, str):
            logger.warning("jwks must be a string holding a JWKS document; provider skipped",
                           rule=where)
            return None
        source, text = "jwks", inline
    elif uri:
        uri = str(uri)
        if uri.startswith(("http://", "https://")):
            logger.warning(
                "fetching JWKS over the network is not supported; provider skipped "
                "(inline the keys with jwks, or use a file:// jwksUri)",
                rule=where, jwks_uri=uri,
            )
            return None
        if not uri.startswith("file://"):
            logger.warning("jwksUri scheme not supported (use file://); provider skipped",
                           rule=where, jwks_uri=uri)
            return None
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            logger.warning("jwksUri file:// path must be absolute; provider skipped",
                           rule=where, jwks_uri=uri)
            return None
        try:
            text = read_file(path)
        except OSError as exc:
            logger.warning("cannot read jwksUri; provider skipped", rule=where, path=path,
                           reason=exc.strerror or str(exc))
            return None
        source = uri
    else:
        logger.warning(
            "jwtRules entry has neither jwks nor jwksUri (OIDC discovery over the network is "
            "not supported); provider skipped",
            rule=where,
        )
        return None
    problem = jwks_problem(text)
    if problem is not None:
        logger.warning("invalid JWKS; provider skipped", rule=where, source=source,
                       reason=problem)
        return None
    return text


def jwks_problem(text: str) -> str | None:
    """Why ``text`` is not a usable JWKS document (a JSON object with a ``keys`` list of
    objects), or None when it is."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return 'not a JWKS: expected a JSON object with a "keys" list'
    if not all(isinstance(key, dict) for key in document["keys"]):
        return 'not a JWKS: every entry of "keys" must be a JSON object'
    return None


def _from_headers(value: Any) -> tuple[tuple[str, str], ...] | None:
    if not value:
        return None
    if not isinstance(value, list):
        raise PolicyValueError("fromHeaders must be a list")
    headers = []
    for entry in value:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise PolicyValueError("each fromHeaders entry needs a name")
        headers.append((entry["name"].lower(), str(entry.get("prefix") or "")))
    return tuple(headers)


def _claim_headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        raise PolicyValueError("outputClaimToHeaders must be a list")
    pairs = []
    for entry in value:
        if (
            not isinstance(entry, Mapping)
            or not isinstance(entry.get("header"), str)
            or not isinstance(entry.get("claim"), str)
        ):
            raise PolicyValueError("each outputClaimToHeaders entry needs a header and a claim")
        pairs.append((entry["header"].lower(), entry["claim"]))
    return tuple(pairs)
