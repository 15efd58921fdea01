"""Which rule of the attached routes a request matches (Gateway API precedence; a
VirtualService's rules in order) and the decision that comes of it: ``route_request`` ->
``Selection`` | ``PassThrough`` | ``NoRouteMatched``. Also the pieces of a route the other
routing modules read the same way: a rule's effective matches, a match's path, compiled
patterns, the routes' age order.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import parse_qsl

from ambient_api.l7 import (
    HttpRoute,
    PathMatch,
    PathMatchType,
    RouteMatch,
    RouteRule,
    ValueMatch,
    ValueMatchType,
)
from ambient_dataplane.labels import ResponseFlag

VIRTUAL_SERVICE_KIND = "VirtualService"
NO_ROUTE_STATUS = 404  # Gateway API: no rule matched

_DEFAULT_PATH = PathMatch(PathMatchType.PATH_PREFIX, "/")
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


class RoutableRequest(Protocol):
    """What routing reads from a request (``waypoint.http.HttpRequest`` provides it)."""

    @property
    def method(self) -> str: ...

    @property
    def target(self) -> str:
        """The request-target as received: path and optional ``?query``."""
        ...

    @property
    def path(self) -> str:
        """The path part of the request target, without the query."""
        ...

    @property
    def authority(self) -> str:
        """Host[:port] the client addressed (``Host`` / ``:authority``)."""
        ...

    @property
    def scheme(self) -> str: ...

    def header(self, name: str) -> str | None:
        """The value of a header by lower-case name, None when absent."""
        ...


@functools.lru_cache(maxsize=4096)
def compiled_pattern(pattern: str) -> re.Pattern[str] | None:
    """Compiled once per pattern; None when the pattern is not a valid regex."""
    try:
        return re.compile(pattern)
    except re.error:
        return None


def effective_matches(rule: RouteRule) -> tuple[RouteMatch, ...]:
    """A rule without matches matches every request (Gateway API default)."""
    return rule.matches or (RouteMatch(),)


def path_of(match: RouteMatch) -> PathMatch:
    return match.path if match.path is not None else _DEFAULT_PATH


def _created(route: HttpRoute) -> datetime:
    """The route's creation time; unknown or unreadable sorts as newest."""
    try:
        created = datetime.fromisoformat(route.created)
    except ValueError:
        return _FAR_FUTURE
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def age_order(route: HttpRoute) -> tuple[datetime, str, str]:
    return (_created(route), f"{route.namespace}/{route.name}", route.source_kind)


@dataclass(frozen=True)
class Selection:
    """The winning route, rule and the one match of that rule that matched."""

    route: HttpRoute
    rule: RouteRule
    rule_index: int
    match: RouteMatch

    @property
    def path_match(self) -> PathMatch:
        return path_of(self.match)


@dataclass(frozen=True)
class PassThrough:
    """No route is attached: forward to the addressed destination as if there were none."""


@dataclass(frozen=True)
class NoRouteMatched:
    """Routes are attached but none matched: GAMMA rejects the request (404, flag NR)."""

    status: int = NO_ROUTE_STATUS
    response_flags: tuple[ResponseFlag, ...] = (ResponseFlag.NO_ROUTE,)


RouteDecision = Selection | PassThrough | NoRouteMatched


def path_prefix_matches(prefix: str, path: str) -> bool:
    """Element-wise prefix: ``/foo`` (or ``/foo/``) matches ``/foo``, ``/foo/``, ``/foo/x``
    but not ``/foobar``."""
    base = prefix.rstrip("/")
    if not base:
        return path.startswith("/")
    return path == base or path.startswith(base + "/")


def path_matches(match: PathMatch, path: str) -> bool:
    if match.type is PathMatchType.EXACT:
        return path == match.value
    if match.type is PathMatchType.PATH_PREFIX:
        return path_prefix_matches(match.value, path)
    pattern = compiled_pattern(match.value)
    return pattern is not None and pattern.fullmatch(path) is not None


def _value_matches(match: ValueMatch, value: str | None) -> bool:
    if value is None:
        return False
    if match.type is ValueMatchType.EXACT:
        return value == match.value
    if match.type is ValueMatchType.PREFIX:
        return value.startswith(match.value)
    pattern = compiled_pattern(match.value)
    return pattern is not None and pattern.fullmatch(value) is not None


def _first_by_name(values: tuple[ValueMatch, ...], *, fold_case: bool) -> list[ValueMatch]:
    """Gateway API: of entries with equivalent names only the first counts."""
    seen: set[str] = set()
    kept = []
    for value in values:
        key = value.name.lower() if fold_case else value.name
        if key not in seen:
            seen.add(key)
            kept.append(value)
    return kept


def _request_header(request: RoutableRequest, name: str) -> str | None:
    value = request.header(name)
    if value is None and name == "host":
        return request.authority  # HTTP/2 carries it as :authority
    return value


def first_query_values(query: str) -> dict[str, str]:
    """Decoded query parameters, the first value of each name."""
    values: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        values.setdefault(name, value)
    return values


def _match_applies(
    match: RouteMatch, request: RoutableRequest, query: Callable[[], dict[str, str]]
) -> bool:
    if match.method is not None and request.method != match.method:
        return False
    if not path_matches(path_of(match), request.path):
        return False
    for header in _first_by_name(match.headers, fold_case=True):
        if not _value_matches(header, _request_header(request, header.name.lower())):
            return False
    if match.query_params:
        params = query()
        for param in _first_by_name(match.query_params, fold_case=False):
            if not _value_matches(param, params.get(param.name)):
                return False
    return True


_PATH_RANK = {PathMatchType.EXACT: 0, PathMatchType.PATH_PREFIX: 1,
              PathMatchType.REGULAR_EXPRESSION: 2}


def match_precedence(match: RouteMatch) -> tuple[int, int, int, int, int]:
    """Sort key, smaller first: the Gateway API order of conflicting matches."""
    path = path_of(match)
    return (
        _PATH_RANK[path.type],
        -len(path.value),
        0 if match.method is not None else 1,
        -len(_first_by_name(match.headers, fold_case=True)),
        -len(_first_by_name(match.query_params, fold_case=False)),
    )


def select(routes: Sequence[HttpRoute], request: RoutableRequest) -> Selection | None:
    """The winning match among ``routes`` (as ``attached_routes`` returns them), or None.

    HTTPRoutes compete by match precedence; VirtualServices (only when no HTTPRoute is
    given) are tried in order, their rules in order, first match winning."""
    query_cache: dict[str, str] | None = None

    def query() -> dict[str, str]:
        nonlocal query_cache
        if query_cache is None:
            query_cache = first_query_values(raw_query(request))
        return query_cache

    best: Selection | None = None
    best_key: tuple[object, ...] | None = None
    for route in sorted((r for r in routes if r.source_kind != VIRTUAL_SERVICE_KIND),
                        key=age_order):
        for rule_index, rule in enumerate(route.rules):
            for match in effective_matches(rule):
                key = match_precedence(match)
                if best_key is not None and key >= best_key:
                    continue  # an earlier (older / first-listed) candidate already wins ties
                if _match_applies(match, request, query):
                    best, best_key = Selection(route, rule, rule_index, match), key
    if best is not None:
        return best
    for route in routes:
        if route.source_kind != VIRTUAL_SERVICE_KIND:
            continue
        for rule_index, rule in enumerate(route.rules):
            for match in effective_matches(rule):
                if _match_applies(match, request, query):
                    return Selection(route, rule, rule_index, match)
    return None


def route_request(routes: Sequence[HttpRoute], request: RoutableRequest) -> RouteDecision:
    """Pass through when nothing is attached; else the selection, or a 404 (NR)."""
    if not routes:
        return PassThrough()
    selection = select(routes, request)
    return selection if selection is not None else NoRouteMatched()


def raw_query(request: RoutableRequest) -> str:
    return request.target.partition("?")[2]
