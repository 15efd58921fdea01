"""The wire contract for waypoints: L7 routing, traffic policy and L7 security.

istiod_lite translates what users write (Gateway API ``HTTPRoute``/``TCPRoute``, Istio's
``VirtualService`` subset, ``DestinationRule``, ``AuthorizationPolicy`` with ``targetRefs``,
``RequestAuthentication``, and our ``LocalRateLimit``) into these resources. Only waypoints
subscribe to them. Like ``model.py`` this is a leaf: standard library only.

Targets and parents are keys: a Service is ``"<ns>/<hostname>"`` (``model.Service.key``), a
waypoint is ``"waypoint:<ns>/<gateway-name>"`` (``waypoint_key``). Durations are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


def waypoint_key(namespace: str, name: str) -> str:
    return f"waypoint:{namespace}/{name}"


class PathMatchType(StrEnum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"
    REGULAR_EXPRESSION = "RegularExpression"


class ValueMatchType(StrEnum):
    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"
    PREFIX = "Prefix"  # VirtualService only (Gateway API has none for headers)


@dataclass(frozen=True)
class PathMatch:
    type: PathMatchType
    value: str


@dataclass(frozen=True)
class ValueMatch:
    """A header or query-parameter match. Header names compare case-insensitively."""

    name: str
    value: str
    type: ValueMatchType = ValueMatchType.EXACT


@dataclass(frozen=True)
class RouteMatch:
    """All given conditions must hold (Gateway API). An empty match matches every request."""

    path: PathMatch | None = None
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class BackendRef:
    service: str  # service key "<ns>/<hostname>"
    port: int
    weight: int = 1


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestMirror:
    service: str
    port: int
    percent: float = 100.0


class PathModifierType(StrEnum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"


@dataclass(frozen=True)
class PathModifier:
    type: PathModifierType
    value: str


@dataclass(frozen=True)
class UrlRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class RequestRedirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True)
class FaultInjection:
    """Istio's ``fault``: delay and/or abort a percentage of requests."""

    delay_seconds: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` is the number of retries after the first try (Istio's meaning).
    ``retry_on`` holds Envoy/Istio conditions ("5xx", "gateway-error", "connect-failure",
    "reset", "retriable-status-codes") and/or status codes as strings ("503")."""

    attempts: int = 2
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ("connect-failure", "reset", "503")
    backoff_base: float = 0.025
    backoff_max: float = 0.25


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    mirrors: tuple[RequestMirror, ...] = ()
    rewrite: UrlRewrite | None = None
    redirect: RequestRedirect | None = None
    fault: FaultInjection | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = None  # the whole request, retries included
    backend_timeout: float | None = None  # each try


@dataclass(frozen=True)
class HttpRoute:
    """An ``HTTPRoute`` (or a ``VirtualService``'s http routes). Keyed by ``key``.

    ``parents`` are the services (or waypoints) it attaches to; ``hostnames`` narrow it
    further (empty: any). Rules are tried in order; within a rule, any match may apply."""

    name: str
    namespace: str
    source_kind: str = "HTTPRoute"  # or "VirtualService"
    parents: tuple[str, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    created: str = ""  # RFC 3339 creationTimestamp: Gateway API orders conflicting routes by age

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.source_kind}/{self.name}"


@dataclass(frozen=True)
class TcpRoute:
    name: str
    namespace: str
    parents: tuple[str, ...] = ()
    backends: tuple[BackendRef, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ConnectionPool:
    """DestinationRule ``connectionPool``; None means unlimited (Envoy's defaults are 1024)."""

    max_connections: int | None = None  # tcp.maxConnections
    max_pending_requests: int | None = None  # http.http1MaxPendingRequests
    max_requests: int | None = None  # http.http2MaxRequests: concurrent requests
    max_requests_per_connection: int | None = None  # http.maxRequestsPerConnection


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True)
class TrafficPolicy:
    """A ``DestinationRule``'s traffic policy for one service (``host``: a service key)."""

    name: str
    namespace: str
    host: str
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RateLimit:
    """A local token bucket (Envoy's local_ratelimit: max_tokens, tokens_per_fill,
    fill_interval) on the requests to its targets, answered 429 when empty."""

    name: str
    namespace: str
    targets: tuple[str, ...]
    max_tokens: int
    tokens_per_fill: int
    fill_interval: float

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class WaypointAuthorizationAction(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True)
class L7Match:
    """An ``AuthorizationPolicy`` source/operation/condition alternative as a waypoint sees
    it: the L4 fields of ``model.Match`` plus request attributes. Same semantics: values of a
    field OR'd, fields AND'd, ``not_`` forms exclude. ``conditions`` are ``when`` keys such
    as ``request.headers[x-user]`` or ``request.auth.claims[groups]``."""

    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    source_ips: tuple[str, ...] = ()
    not_source_ips: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class L7Clause:
    """Matches are OR'd."""

    matches: tuple[L7Match, ...] = ()


@dataclass(frozen=True)
class L7Rule:
    """Clauses are AND'd; a rule without clauses matches every request."""

    clauses: tuple[L7Clause, ...] = ()


@dataclass(frozen=True)
class WaypointAuthorization:
    """An ``AuthorizationPolicy`` with ``targetRefs`` (to a waypoint Gateway or a Service)."""

    name: str
    namespace: str
    action: WaypointAuthorizationAction
    targets: tuple[str, ...]
    rules: tuple[L7Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class JwtProvider:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""  # a JWKS document (JSON); istiod_lite inlines jwksUri file:// contents
    from_headers: tuple[tuple[str, str], ...] = (("authorization", "Bearer "),)
    forward_original_token: bool = False
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)


@dataclass(frozen=True)
class JwtPolicy:
    """A ``RequestAuthentication`` with ``targetRefs``: requests carrying a token must carry
    a valid one (401 otherwise); requests without one pass unauthenticated (Istio)."""

    name: str
    namespace: str
    targets: tuple[str, ...]
    providers: tuple[JwtProvider, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
