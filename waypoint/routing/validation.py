"""Route validation: why a route cannot be accepted (Gateway API ``Accepted=False``), checked
once per route (``route_problems`` is cached) so requests only meet accepted routes.
"""

from __future__ import annotations

import functools
import re

from ambient_api.l7 import (
    HttpRoute,
    PathMatchType,
    PathModifier,
    PathModifierType,
    RouteRule,
    ValueMatch,
    ValueMatchType,
)
from waypoint.routing.matching import compiled_pattern, effective_matches, path_of

REDIRECT_STATUS_CODES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
_METHOD_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _value_match_problems(where: str, values: tuple[ValueMatch, ...]) -> list[str]:
    problems = []
    for value in values:
        if not value.name:
            problems.append(f"{where}: empty name")
        is_regex = value.type is ValueMatchType.REGULAR_EXPRESSION
        if is_regex and compiled_pattern(value.value) is None:
            problems.append(f"{where} {value.name!r}: invalid regular expression {value.value!r}")
    return problems


def _path_modifier_problems(where: str, modifier: PathModifier, rule: RouteRule) -> list[str]:
    problems = []
    if modifier.type is PathModifierType.REPLACE_FULL_PATH:
        if not modifier.value.startswith("/"):
            problems.append(f"{where}: ReplaceFullPath {modifier.value!r} must start with '/'")
    elif modifier.type is PathModifierType.REPLACE_PREFIX_MATCH:
        if modifier.value and not modifier.value.startswith("/"):
            problems.append(f"{where}: ReplacePrefixMatch {modifier.value!r} must start with '/'")
        if any(path_of(m).type is not PathMatchType.PATH_PREFIX for m in effective_matches(rule)):
            problems.append(f"{where}: ReplacePrefixMatch needs PathPrefix matches only")
    return problems


def _rule_problems(index: int, rule: RouteRule) -> list[str]:
    where = f"rule {index}"
    problems: list[str] = []
    for match in effective_matches(rule):
        path = path_of(match)
        if path.type in (PathMatchType.EXACT, PathMatchType.PATH_PREFIX):
            if not path.value.startswith("/"):
                problems.append(f"{where}: {path.type} path {path.value!r} must start with '/'")
        elif compiled_pattern(path.value) is None:
            problems.append(f"{where}: invalid path regular expression {path.value!r}")
        problems += _value_match_problems(f"{where} header", match.headers)
        problems += _value_match_problems(f"{where} query parameter", match.query_params)
        if match.method is not None and not _METHOD_TOKEN.fullmatch(match.method):
            problems.append(f"{where}: invalid method {match.method!r}")
    for backend in rule.backends:
        if backend.weight < 0:
            problems.append(f"{where}: backend {backend.service} has negative weight")
        if not 1 <= backend.port <= 65535:
            problems.append(f"{where}: backend {backend.service} port {backend.port} out of range")
    for mirror in rule.mirrors:
        if not 0 <= mirror.percent <= 100:
            problems.append(f"{where}: mirror percent {mirror.percent} outside 0..100")
    if rule.redirect is not None:
        redirect = rule.redirect
        if rule.rewrite is not None:
            problems.append(f"{where}: RequestRedirect and URLRewrite cannot be combined")
        if rule.backends:
            problems.append(f"{where}: RequestRedirect cannot be used with backendRefs")
        if redirect.status_code not in REDIRECT_STATUS_CODES:
            problems.append(f"{where}: redirect status {redirect.status_code} not one of "
                            f"{sorted(REDIRECT_STATUS_CODES)}")
        if redirect.scheme is not None and redirect.scheme not in DEFAULT_PORTS:
            problems.append(f"{where}: redirect scheme {redirect.scheme!r} not http or https")
        if redirect.port is not None and not 1 <= redirect.port <= 65535:
            problems.append(f"{where}: redirect port {redirect.port} out of range")
        if redirect.path is not None:
            problems += _path_modifier_problems(f"{where} redirect", redirect.path, rule)
    if rule.rewrite is not None and rule.rewrite.path is not None:
        problems += _path_modifier_problems(f"{where} rewrite", rule.rewrite.path, rule)
    fault = rule.fault
    if fault is not None:
        if fault.delay_seconds is not None and fault.delay_seconds < 0:
            problems.append(f"{where}: negative fault delay {fault.delay_seconds}")
        if fault.abort_status is not None and not 200 <= fault.abort_status <= 599:
            problems.append(f"{where}: fault abort status {fault.abort_status} outside 200..599")
        for name, percent in (("delay", fault.delay_percent), ("abort", fault.abort_percent)):
            if not 0 <= percent <= 100:
                problems.append(f"{where}: fault {name} percent {percent} outside 0..100")
    return problems


@functools.lru_cache(maxsize=1024)
def route_problems(route: HttpRoute) -> tuple[str, ...]:
    """Why a route cannot be accepted (empty: it is fine). Log these on config change."""
    problems: list[str] = []
    for index, rule in enumerate(route.rules):
        problems += _rule_problems(index, rule)
    return tuple(problems)
