"""L7 authorization: Istio's AuthorizationPolicy semantics over one HTTP request.

Sans-IO: the waypoint collects ``RequestAttributes`` (the tunnel peer's verified identity, the
request line, headers and the JWT result from ``waypoint.jwt``) and the
``WaypointAuthorization`` policies that target the service, and asks ``evaluate``.

Evaluation order (Istio): every matching AUDIT policy is reported (the proxy logs it; audit
never changes the outcome); then any matching DENY policy denies; with no ALLOW policy at all
the request is allowed; otherwise some ALLOW policy must match.

The matching structure and the meaning of absent attributes are ztunnel's (``ztunnel.authz``):
rules OR'd, clauses AND'd (a rule without clauses matches everything), matches OR'd (an empty
clause constrains nothing), fields AND'd, values of one field OR'd, ``not_`` fields exclude.
**An attribute the request does not have never matches a positive field and is never
excluded by a ``not_`` field**: a request without a JWT never matches ``request_principals``
but does match ``not_request_principals: ["*"]``; the same holds for a missing header or
claim in ``conditions``.

Request fields, as Istio compares them:

- ``paths``: the path without query string or fragment, as the waypoint normalized it
  before anything else looked at it (``waypoint.paths``: the one path that is also routed
  and forwarded; it is not normalized a second time here), matched exactly, ``prefix*``,
  ``*suffix`` or ``*``; a pattern with ``{*}`` (one segment) or ``{**}`` (one or more
  segments, last) is a path template.
- ``hosts``: the ``:authority``/``Host`` value compared case-insensitively **as a whole**, as
  Istio does: ``example.com`` does not match ``example.com:8080``; write ``example.com:*``.
- ``methods``: case-sensitive (HTTP methods are upper case).
- ``conditions`` keys: ``request.headers[<name>]`` (every value of a repeated header is
  tried), ``request.auth.claims[<name>]`` with nested claims as ``[a][b]`` (Istio's syntax;
  a ``.`` is part of a claim name), list-valued claims matching if any element matches,
  ``request.auth.principal``, ``request.auth.audiences`` (``aud``), ``request.auth.presenter``
  (``azp``), ``source.ip``/``remote.ip`` (addresses or CIDRs; both are the tunnel peer's
  address, a waypoint knows no other client), ``source.namespace``, ``source.principal``,
  ``destination.port``. A key we do not understand is fail-closed: it makes a DENY or AUDIT
  match and an ALLOW not match (istiod_lite should reject such policies up front).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ambient_api.identity import SpiffeId
from ambient_api.l7 import (
    Condition,
    L7Clause,
    L7Match,
    L7Rule,
    WaypointAuthorization,
    WaypointAuthorizationAction,
)
from ambient_dataplane.matchers import (
    IpAddress,
    ips_match,
    parse_ip,
    ports_match,
    string_matches,
    strings_match,
)
from waypoint.http import HeaderSource, header_values
from waypoint.paths import policy_path

_SPIFFE_SCHEME = "spiffe://"
_CLAIMS_PREFIX = "request.auth.claims"
# remote.ip is the original client (X-Forwarded-For / PROXY); a waypoint only has its peer.
_IP_KEYS = frozenset({"source.ip", "remote.ip"})
_HEADERS_PREFIX = "request.headers"
# Claims Istio (Envoy's normalize_payload_in_metadata) splits on spaces before matching.
SPACE_DELIMITED_CLAIMS = frozenset({"scope", "permission"})


@dataclass(frozen=True)
class RequestAttributes:
    """What policy can see about one HTTP request inside a tunnel."""

    source_ip: str
    source_identity: SpiffeId | None  # the HBONE peer; None for plaintext
    destination_port: int
    host: str  # :authority or Host, as sent
    method: str
    path: str  # the normalized request target (waypoint.paths); query and fragment ignored
    headers: HeaderSource = ()
    request_principal: str | None = None  # "iss/sub" of a validated JWT (waypoint.jwt)
    claims: Mapping[str, Any] | None = None  # that JWT's payload


@dataclass(frozen=True)
class L7Decision:
    allowed: bool
    reason: str  # for the 403 body and the access log; names the deciding policy
    # "namespace/name" of the deciding policy; None when no single policy decided.
    policy: str | None = None
    audited: tuple[str, ...] = field(default=())  # keys of the matching AUDIT policies


def evaluate(
    policies: Iterable[WaypointAuthorization], attrs: RequestAttributes
) -> L7Decision:
    """Decide one request against the policies that target its service or waypoint."""
    subject = _Subject.of(attrs)
    audited: list[str] = []
    denies: list[WaypointAuthorization] = []
    allows: list[WaypointAuthorization] = []
    for policy in policies:
        if policy.action is WaypointAuthorizationAction.AUDIT:
            if _policy_matches(policy, subject, unknown_matches=True):
                audited.append(policy.key)
        elif policy.action is WaypointAuthorizationAction.DENY:
            denies.append(policy)
        else:
            allows.append(policy)
    audit = tuple(audited)
    for policy in denies:
        if _policy_matches(policy, subject, unknown_matches=True):
            return L7Decision(False, f"denied by DENY policy {policy.key}", policy.key, audit)
    if not allows:
        return L7Decision(True, "no ALLOW policy applies", None, audit)
    for policy in allows:
        if _policy_matches(policy, subject, unknown_matches=False):
            return L7Decision(True, f"allowed by ALLOW policy {policy.key}", policy.key, audit)
    return L7Decision(False, "no ALLOW policy matched", None, audit)


@dataclass(frozen=True)
class _Subject:
    """The request in the forms the matchers compare (computed once per evaluation)."""

    principal: str | None  # "td/ns/x/sa/y", Istio's way of writing principals
    namespace: str | None
    source_ip: IpAddress | None
    destination_port: int
    host: str  # lower case
    method: str
    path: str  # normalised, no query
    headers: HeaderSource
    request_principal: str | None
    claims: Mapping[str, Any] | None

    @classmethod
    def of(cls, attrs: RequestAttributes) -> _Subject:
        identity = attrs.source_identity
        return cls(
            principal=None if identity is None else str(identity).removeprefix(_SPIFFE_SCHEME),
            namespace=None if identity is None else identity.namespace,
            source_ip=parse_ip(attrs.source_ip),
            destination_port=attrs.destination_port,
            host=attrs.host.lower(),
            method=attrs.method,
            path=policy_path(attrs.path),
            headers=attrs.headers,
            request_principal=attrs.request_principal or None,
            claims=attrs.claims,
        )


def _policy_matches(
    policy: WaypointAuthorization, subject: _Subject, *, unknown_matches: bool
) -> bool:
    return any(_rule_matches(rule, subject, unknown_matches) for rule in policy.rules)


def _rule_matches(rule: L7Rule, subject: _Subject, unknown_matches: bool) -> bool:
    return all(_clause_matches(clause, subject, unknown_matches) for clause in rule.clauses)


def _clause_matches(clause: L7Clause, subject: _Subject, unknown_matches: bool) -> bool:
    if not clause.matches:
        return True  # an empty clause constrains nothing (see ztunnel.authz)
    return any(_match_matches(match, subject, unknown_matches) for match in clause.matches)


def _match_matches(match: L7Match, subject: _Subject, unknown_matches: bool) -> bool:
    return (
        strings_match(match.principals, match.not_principals, subject.principal)
        and strings_match(match.namespaces, match.not_namespaces, subject.namespace)
        and strings_match(
            match.request_principals, match.not_request_principals, subject.request_principal
        )
        and ips_match(match.source_ips, match.not_source_ips, subject.source_ip)
        and ports_match(match.ports, match.not_ports, subject.destination_port)
        and _hosts_match(match.hosts, match.not_hosts, subject.host)
        and strings_match(match.methods, match.not_methods, subject.method)
        and _paths_match(match.paths, match.not_paths, subject.path)
        and all(_condition_matches(c, subject, unknown_matches) for c in match.conditions)
    )


def _hosts_match(values: Sequence[str], not_values: Sequence[str], host: str) -> bool:
    return strings_match(
        [v.lower() for v in values], [v.lower() for v in not_values], host or None
    )


def _paths_match(values: Sequence[str], not_values: Sequence[str], path: str) -> bool:
    if values and not any(_path_matches(v, path) for v in values):
        return False
    return not any(_path_matches(v, path) for v in not_values)


def _path_matches(pattern: str, path: str) -> bool:
    if "{*}" in pattern or "{**}" in pattern:
        template = _path_template(pattern)
        return template is not None and template.fullmatch(path) is not None
    return string_matches(pattern, path)


@lru_cache(maxsize=1024)
def _path_template(pattern: str) -> re.Pattern[str] | None:
    """Istio/Envoy URI template: ``{*}`` one segment, ``{**}`` one or more (last only).
    An invalid template (``{**}`` not last, mixed with ``*``) never matches."""
    segments = pattern.split("/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        if segment == "{*}":
            parts.append("[^/]+")
        elif segment == "{**}":
            if index != len(segments) - 1:
                return None
            parts.append(".+")
        elif "{" in segment or "}" in segment or "*" in segment:
            return None
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


def _condition_matches(condition: Condition, subject: _Subject, unknown_matches: bool) -> bool:
    if condition.key.strip() in _IP_KEYS:  # addresses or CIDRs, like source_ips
        return ips_match(condition.values, condition.not_values, subject.source_ip)
    actual = _condition_values(condition.key, subject)
    if actual is None:
        return unknown_matches
    return _any_of_match(condition.values, condition.not_values, actual)


def _any_of_match(values: Sequence[str], not_values: Sequence[str], actual: list[str]) -> bool:
    """Like ``strings_match`` for an attribute with several values (repeated header, list
    claim): a positive field needs one value to match, a ``not_`` field excludes if any does;
    no values at all is the absent attribute."""
    if values and not any(string_matches(v, a) for v in values for a in actual):
        return False
    return not any(string_matches(v, a) for v in not_values for a in actual)


def _condition_values(key: str, subject: _Subject) -> list[str] | None:
    """The request's values for a ``when`` key ([] when it has none); None: unknown key."""
    key = key.strip()
    if key.startswith(_HEADERS_PREFIX):
        name = _bracketed_names(key[len(_HEADERS_PREFIX):])
        if name is None or len(name) != 1:
            return None
        return header_values(subject.headers, name[0])
    if key.startswith(_CLAIMS_PREFIX):
        path = _bracketed_names(key[len(_CLAIMS_PREFIX):])
        if path is None:
            return None
        return claim_strings(subject.claims, path)
    match key:
        case "source.namespace":
            return _optional(subject.namespace)
        case "source.principal":
            return _optional(subject.principal)
        case "request.auth.principal":
            return _optional(subject.request_principal)
        case "request.auth.audiences":
            return claim_strings(subject.claims, ["aud"])
        case "request.auth.presenter":
            return claim_strings(subject.claims, ["azp"])
        case "destination.port":
            return [str(subject.destination_port)]
    return None


def _optional(value: str | None) -> list[str]:
    return [] if value is None else [value]


def _bracketed_names(text: str) -> list[str] | None:
    """``[a]`` -> ["a"], ``[a][b]`` -> ["a", "b"] (Istio's nested claim syntax); None when the
    text is not a non-empty sequence of bracketed non-empty names."""
    names = re.findall(r"\[([^\[\]]+)\]", text)
    if not names or "".join(f"[{n}]" for n in names) != text:
        return None
    return names


def claim_strings(claims: Mapping[str, Any] | None, path: Sequence[str]) -> list[str]:
    """The string values of the claim at ``path`` (nested objects), for matching.

    A string is one value (``scope``/``permission`` also split on spaces, as Istio does); a
    list contributes its string elements; booleans and numbers their JSON text; objects and
    missing claims nothing."""
    value: Any = claims
    for name in path:
        if not isinstance(value, Mapping) or name not in value:
            return []
        value = value[name]
    items = value if isinstance(value, list) else [value]
    strings: list[str] = []
    for item in items:
        if isinstance(item, str):
            if path[-1] in SPACE_DELIMITED_CLAIMS and len(path) == 1:
                strings.extend(item.split())
            else:
                strings.append(item)
        elif isinstance(item, bool):
            strings.append("true" if item else "false")
        elif isinstance(item, int | float):
            strings.append(str(item))
    return strings
