"""HTTP routing decisions for the waypoint: which routes apply, which rule wins, where the
request goes and what is changed on the way. Pure functions over ``ambient_api.l7``.

Gateway API (HTTPRoute, GAMMA) is the spec; everything random takes a ``rand`` callable
(``random.random``-like, in ``[0, 1)``) so each decision is deterministic under test.

Choices where the spec leaves room (documented here, not elsewhere):

- **Groups, not one merged pool.** Routes whose parents include the addressed Service form
  the service group. As GAMMA says, a route in the Service's namespace is a *producer* route
  (applies to every caller); a route in another namespace is a *consumer* route and applies
  only to callers from its own namespace, which then use *only* their consumer routes. Routes
  attached to the waypoint itself (its ``waypoint_key``) apply only when the service group is
  empty (also to workload-addressed traffic, where there is no service).
- **Hostnames.** GAMMA says meshes SHOULD NOT infer anything from ``hostnames`` of a
  Service-attached route, so they are ignored there. For waypoint-attached routes the waypoint
  acts as a Gateway listener: hostnames (exact or ``*.suffix``; ``*`` for VirtualServices)
  must match the request host (port stripped) or one of the service's names (FQDN,
  ``name.ns.svc``, ``name.ns``, ``name``); only the routes with the most specific matching
  hostname apply, as Envoy virtual hosts (and so Istio) behave.
- **VirtualService vs HTTPRoute.** Within a group, HTTPRoutes shadow VirtualServices. A
  VirtualService's rules are tried in order (first match wins), VirtualServices by age.
- **Precedence** among HTTPRoute matches: Exact path, then PathPrefix (longer first), then
  RegularExpression (longer first; implementation-specific, as Istio ranks it), then method,
  most headers, most query params, oldest route, ``namespace/name``, rule order, match order.
  A match without a path is the spec's default ``PathPrefix /``.
- **Invalid routes** (a broken regex, ReplacePrefixMatch without a PathPrefix match, redirect
  combined with rewrite or backends, ...) are not accepted as a whole, as Gateway API sets
  ``Accepted=False``: ``attached_routes`` skips them; ``route_problems`` says why (a proxy
  logs it once per config change and calls ``attached_accepted_routes`` per request).
- Paths are matched as received (the HTTP layer normalizes, if it does); query parameter
  values are percent-decoded; a repeated query parameter matches on its first value.

Decisions come back as plain data (``Selection``, ``RequestEdits``, ``HeaderEdits``,
``Redirect``, ``FaultDecision``); ``RequestEdits.apply``, ``apply_response_edits`` and
``Redirect.response`` turn them into ``waypoint.http`` requests and responses.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import parse_qsl

from ambient_api.l7 import (
    BackendRef,
    FaultInjection,
    HeaderModifier,
    HttpRoute,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    RequestMirror,
    RouteMatch,
    RouteRule,
    TcpRoute,
    ValueMatch,
    ValueMatchType,
)
from ambient_dataplane.labels import ResponseFlag
from waypoint.http import Headers, HttpRequest, HttpResponse, modify_headers

Random = Callable[[], float]

VIRTUAL_SERVICE_KIND = "VirtualService"
REDIRECT_STATUS_CODES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
NO_ROUTE_STATUS = 404  # Gateway API: no rule matched
NO_BACKEND_STATUS = 500  # Gateway API: no valid backend (none, or all weights zero)

_DEFAULT_PATH = PathMatch(PathMatchType.PATH_PREFIX, "/")
_METHOD_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
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


class InvalidRouteError(ValueError):
    """A route that validation should have rejected reached a decision; answer 500."""


# --------------------------------------------------------------------------- validation


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    """Compiled once per pattern; None when the pattern is not a valid regex."""
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _effective_matches(rule: RouteRule) -> tuple[RouteMatch, ...]:
    """A rule without matches matches every request (Gateway API default)."""
    return rule.matches or (RouteMatch(),)


def _path_of(match: RouteMatch) -> PathMatch:
    return match.path if match.path is not None else _DEFAULT_PATH


def _value_match_problems(where: str, values: tuple[ValueMatch, ...]) -> list[str]:
    problems = []
    for value in values:
        if not value.name:
            problems.append(f"{where}: empty name")
        if value.type is ValueMatchType.REGULAR_EXPRESSION and _compiled(value.value) is None:
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
        if any(_path_of(m).type is not PathMatchType.PATH_PREFIX for m in _effective_matches(rule)):
            problems.append(f"{where}: ReplacePrefixMatch needs PathPrefix matches only")
    return problems


def _rule_problems(index: int, rule: RouteRule) -> list[str]:
    where = f"rule {index}"
    problems: list[str] = []
    for match in _effective_matches(rule):
        path = _path_of(match)
        if path.type in (PathMatchType.EXACT, PathMatchType.PATH_PREFIX):
            if not path.value.startswith("/"):
                problems.append(f"{where}: {path.type} path {path.value!r} must start with '/'")
        elif _compiled(path.value) is None:
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


# --------------------------------------------------------------------------- attachment


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) -> (lower-case host without brackets, port)."""
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        if end == -1:
            return authority.lower(), None
        host, rest = authority[1:end], authority[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    else:
        host, port_text = authority, ""
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) <= 65535 else None
    return host.lower().rstrip("."), port


def service_names(service_key: str) -> tuple[str, ...]:
    """The names a caller may use for a service: FQDN and Kubernetes short forms."""
    namespace, _, hostname = service_key.partition("/")
    hostname = hostname.lower()
    names = [hostname]
    name, sep, rest = hostname.partition(f".{namespace}.svc")
    if sep and (rest == "" or rest.startswith(".")):
        names += [f"{name}.{namespace}.svc", f"{name}.{namespace}", name]
    return tuple(dict.fromkeys(names))


def hostname_matches(pattern: str, host: str) -> bool:
    """Gateway API hostname matching: exact, or ``*.suffix`` for one or more labels."""
    pattern = pattern.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def _hostname_specificity(route: HttpRoute, names: Sequence[str]) -> tuple[int, int] | None:
    """(chars of a matching exact hostname, chars of a matching hostname); None: no match."""
    if not route.hostnames:
        return (0, 0)
    best: tuple[int, int] | None = None
    for pattern in route.hostnames:
        if any(hostname_matches(pattern, name) for name in names):
            exact = 0 if pattern.startswith("*") else len(pattern)
            score = (exact, len(pattern))
            best = score if best is None or score > best else best
    return best


def _created(route: HttpRoute) -> datetime:
    """The route's creation time; unknown or unreadable sorts as newest."""
    try:
        created = datetime.fromisoformat(route.created)
    except ValueError:
        return _FAR_FUTURE
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def _age_order(route: HttpRoute) -> tuple[datetime, str, str]:
    return (_created(route), f"{route.namespace}/{route.name}", route.source_kind)


def _prefer_http_routes(routes: list[HttpRoute]) -> list[HttpRoute]:
    http_routes = [r for r in routes if r.source_kind != VIRTUAL_SERVICE_KIND]
    return http_routes or routes


def attached_routes(
    routes: Iterable[HttpRoute],
    *,
    service_key: str | None,
    waypoint_key: str,
    host: str,
    source_namespace: str | None = None,
) -> list[HttpRoute]:
    """The accepted routes that govern a request, oldest first (see the module docstring).

    ``service_key`` is the addressed Service (None for traffic addressed to a workload),
    ``host`` the request's authority, ``source_namespace`` the caller's namespace when known
    (from its SPIFFE identity); consumer routes never apply without it. An empty result means
    no route is attached: forward to the addressed destination unchanged."""
    return attached_accepted_routes(
        [route for route in routes if not route_problems(route)], service_key=service_key,
        waypoint_key=waypoint_key, host=host, source_namespace=source_namespace,
    )


def attached_accepted_routes(
    accepted: Sequence[HttpRoute],
    *,
    service_key: str | None,
    waypoint_key: str,
    host: str,
    source_namespace: str | None = None,
) -> list[HttpRoute]:
    """``attached_routes`` over routes that have no ``route_problems``: the per-request
    part, for a proxy that validates routes once per config change."""
    if service_key is not None:
        service_namespace = service_key.partition("/")[0]
        for_service = [r for r in accepted if service_key in r.parents]
        virtual_services = [r for r in for_service if r.source_kind == VIRTUAL_SERVICE_KIND]
        http_routes = [r for r in for_service if r.source_kind != VIRTUAL_SERVICE_KIND]
        consumer = [r for r in http_routes
                    if r.namespace != service_namespace and r.namespace == source_namespace]
        producer = [r for r in http_routes if r.namespace == service_namespace]
        group = consumer or producer or virtual_services
        if group:
            return sorted(group, key=_age_order)

    request_host, _ = split_authority(host)
    names = [request_host, *(service_names(service_key) if service_key else ())]
    scored: list[tuple[tuple[int, int], HttpRoute]] = []
    for route in accepted:
        if waypoint_key not in route.parents:
            continue
        specificity = _hostname_specificity(route, names)
        if specificity is not None:
            scored.append((specificity, route))
    if not scored:
        return []
    best = max(score for score, _ in scored)
    group = _prefer_http_routes([route for score, route in scored if score == best])
    return sorted(group, key=_age_order)


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Selection:
    """The winning route, rule and the one match of that rule that matched."""

    route: HttpRoute
    rule: RouteRule
    rule_index: int
    match: RouteMatch

    @property
    def path_match(self) -> PathMatch:
        return _path_of(self.match)


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
    pattern = _compiled(match.value)
    return pattern is not None and pattern.fullmatch(path) is not None


def _value_matches(match: ValueMatch, value: str | None) -> bool:
    if value is None:
        return False
    if match.type is ValueMatchType.EXACT:
        return value == match.value
    if match.type is ValueMatchType.PREFIX:
        return value.startswith(match.value)
    pattern = _compiled(match.value)
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
    if not path_matches(_path_of(match), request.path):
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
    path = _path_of(match)
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
            query_cache = first_query_values(_raw_query(request))
        return query_cache

    best: Selection | None = None
    best_key: tuple[object, ...] | None = None
    for route in sorted((r for r in routes if r.source_kind != VIRTUAL_SERVICE_KIND),
                        key=_age_order):
        for rule_index, rule in enumerate(route.rules):
            for match in _effective_matches(rule):
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
            for match in _effective_matches(rule):
                if _match_applies(match, request, query):
                    return Selection(route, rule, rule_index, match)
    return None


def route_request(routes: Sequence[HttpRoute], request: RoutableRequest) -> RouteDecision:
    """Pass through when nothing is attached; else the selection, or a 404 (NR)."""
    if not routes:
        return PassThrough()
    selection = select(routes, request)
    return selection if selection is not None else NoRouteMatched()


# --------------------------------------------------------------------------- backends


def choose_backend(rule: RouteRule | TcpRoute, rand: Random) -> BackendRef | None:
    """Weighted random choice among the rule's (or TCPRoute's) backends; None when there is
    none to choose (weight 0 takes no traffic: the proxy answers 500 or refuses)."""
    weighted = [backend for backend in rule.backends if backend.weight > 0]
    total = sum(backend.weight for backend in weighted)
    if total <= 0:
        return None
    point = rand() * total
    cumulative = 0
    for backend in weighted:
        cumulative += backend.weight
        if point < cumulative:
            return backend
    return weighted[-1]  # rand() returned 1.0 or float rounding: the last one


def mirror_targets(rule: RouteRule, rand: Random) -> list[RequestMirror]:
    """The mirrors this request is copied to, each drawn independently by its percent."""
    return [mirror for mirror in rule.mirrors if _percent_hit(mirror.percent, rand)]


@dataclass(frozen=True)
class FaultDecision:
    delay: float | None = None  # seconds to wait before going on
    abort_status: int | None = None  # answer this status instead of forwarding

    @property
    def response_flags(self) -> tuple[ResponseFlag, ...]:
        """DI for a delay, FI for an abort."""
        flags = (ResponseFlag.DELAY_INJECTED,) * (self.delay is not None)
        return flags + (ResponseFlag.FAULT_INJECTED,) * (self.abort_status is not None)


def _percent_hit(percent: float, rand: Random) -> bool:
    """True for ``percent`` % of draws; 0 and 100 decide without drawing."""
    if percent >= 100:
        return True
    return percent > 0 and rand() * 100 < percent


def fault_decision(fault: FaultInjection | None, rand: Random) -> FaultDecision:
    """Delay and abort drawn independently (Istio): a request may get both, delay first."""
    if fault is None:
        return FaultDecision()
    delay = None
    if fault.delay_seconds is not None and _percent_hit(fault.delay_percent, rand):
        delay = fault.delay_seconds
    abort = None
    if fault.abort_status is not None and _percent_hit(fault.abort_percent, rand):
        abort = fault.abort_status
    return FaultDecision(delay=delay, abort_status=abort)


# --------------------------------------------------------------------------- filters

def _first_per_name(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    kept: dict[str, str] = {}
    for name, value in pairs:
        kept.setdefault(name.lower(), value)
    return tuple(kept.items())


@dataclass(frozen=True)
class HeaderEdits:
    """A header modifier with lower-case names: set replaces, add appends, remove drops.

    Applied in that order (a valid filter names each header in one action only)."""

    set: Headers = ()
    add: Headers = ()
    remove: tuple[str, ...] = ()

    @classmethod
    def from_modifier(cls, modifier: HeaderModifier | None) -> HeaderEdits:
        if modifier is None:
            return cls()
        return cls(
            set=_first_per_name(modifier.set),
            add=_first_per_name(modifier.add),
            remove=tuple(dict.fromkeys(name.lower() for name in modifier.remove)),
        )

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def apply(self, headers: Iterable[tuple[str, str]]) -> Headers:
        """The edited header list (lower-case names, as ``waypoint.http`` keeps them);
        ``add`` appends a field line, which HTTP treats as joining with a comma."""
        return modify_headers(headers, set=self.set, add=self.add, remove=self.remove)


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch: swap the matched path elements, keep the rest.

    Trailing slashes of ``prefix`` and ``replacement`` are ignored; the result is never
    empty ("/foo" with prefix "/foo" and replacement "" is "/")."""
    base = prefix.rstrip("/")
    if not path_prefix_matches(prefix, path):
        raise InvalidRouteError(f"path {path!r} does not start with the prefix {prefix!r}")
    rest = path[len(base):]
    result = replacement.rstrip("/") + rest
    if not result.startswith("/"):
        result = "/" + result
    return result


def _modified_path(modifier: PathModifier, selection: Selection, path: str) -> str:
    if modifier.type is PathModifierType.REPLACE_FULL_PATH:
        return modifier.value
    matched = selection.path_match
    if matched.type is not PathMatchType.PATH_PREFIX:
        raise InvalidRouteError(
            f"route {selection.route.key} rule {selection.rule_index}: ReplacePrefixMatch "
            f"needs a PathPrefix match, not {matched.type}")
    return replace_prefix(path, matched.value, modifier.value)


def _raw_query(request: RoutableRequest) -> str:
    return request.target.partition("?")[2]


def _target(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


@dataclass(frozen=True)
class RequestEdits:
    """What to change on a request before forwarding it.

    ``target``: the new request-target (path and the original query), None to keep it;
    ``authority``: the new Host/``:authority``, None to keep it."""

    target: str | None = None
    authority: str | None = None
    headers: HeaderEdits = field(default_factory=HeaderEdits)

    def apply(self, request: HttpRequest) -> HttpRequest:
        """The request to forward. ``HttpRequest`` keeps Host as ``authority``, so a header
        modifier that sets ``host`` sets the authority (a URLRewrite hostname still wins)."""
        set_host = dict(self.headers.set).get("host")
        headers = HeaderEdits(
            set=tuple((name, value) for name, value in self.headers.set if name != "host"),
            add=tuple((name, value) for name, value in self.headers.add if name != "host"),
            remove=self.headers.remove,
        )
        return dataclasses.replace(
            request,
            target=self.target if self.target is not None else request.target,
            authority=self.authority or set_host or request.authority,
            headers=headers.apply(request.headers),
        )


def request_edits(selection: Selection, request: RoutableRequest) -> RequestEdits:
    """The URLRewrite and RequestHeaderModifier of the selected rule, as plain edits."""
    rule = selection.rule
    target = authority = None
    if rule.rewrite is not None:
        if rule.rewrite.path is not None:
            new_path = _modified_path(rule.rewrite.path, selection, request.path)
            target = _target(new_path, _raw_query(request))
        authority = rule.rewrite.hostname
    return RequestEdits(target=target, authority=authority,
                        headers=HeaderEdits.from_modifier(rule.request_headers))


def response_header_edits(selection: Selection) -> HeaderEdits:
    """The ResponseHeaderModifier of the selected rule (empty edits when none)."""
    return HeaderEdits.from_modifier(selection.rule.response_headers)


@dataclass(frozen=True)
class Redirect:
    """Answer the request with ``status`` and ``Location: location``, forwarding nothing."""

    status: int
    location: str

    def response(self) -> HttpResponse:
        """The redirect as the waypoint answers it: no body, just the Location."""
        return HttpResponse(status=self.status, headers=(("location", self.location),))


def redirect_for(
    selection: Selection, request: RoutableRequest, *, listener_port: int
) -> Redirect | None:
    """The redirect the selected rule asks for, None when it asks for none.

    ``listener_port`` is the port the request was addressed to (the Gateway listener port in
    Gateway API terms, here the service port). The Location leaves the port out when it is the
    scheme's default; a scheme change without a port uses the new scheme's default port."""
    redirect = selection.rule.redirect
    if redirect is None:
        return None
    scheme = redirect.scheme or request.scheme or "http"
    request_host, _ = split_authority(request.authority or request.header("host") or "")
    host = redirect.hostname or request_host
    if redirect.port is not None:
        port = redirect.port
    elif redirect.scheme is not None:
        port = DEFAULT_PORTS.get(redirect.scheme, listener_port)
    else:
        port = listener_port
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    port_part = "" if DEFAULT_PORTS.get(scheme) == port else f":{port}"
    path = request.path
    if redirect.path is not None:
        path = _modified_path(redirect.path, selection, path)
    location = f"{scheme}://{host}{port_part}{_target(path, _raw_query(request))}"
    return Redirect(status=redirect.status_code, location=location)


def apply_response_edits(response: HttpResponse, edits: HeaderEdits) -> HttpResponse:
    """The response with the rule's ResponseHeaderModifier applied."""
    if not edits:
        return response
    return dataclasses.replace(response, headers=edits.apply(response.headers))
