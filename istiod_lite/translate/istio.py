"""Istio traffic fields -> the wire model: a VirtualService's matches, header operations,
``rewrite``, ``redirect``, ``fault``, ``retries`` and mirror percentages, and a
DestinationRule's ``connectionPool`` and ``outlierDetection`` (``routes.py`` calls these
for each object). Unsupported fields are logged and ignored; a bad value raises ValueError
naming where it was."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from ambient_api import l7
from istiod_lite.translate import fields, gateway_api

logger = structlog.get_logger(__name__)

VIRTUAL_SERVICE_FIELDS = frozenset({"hosts", "gateways", "http", "exportTo"})
HTTP_ROUTE_FIELDS = frozenset({
    "name", "match", "route", "redirect", "rewrite", "timeout", "retries", "fault", "mirror",
    "mirrorPercentage", "mirror_percent", "mirrors", "headers",
})
_MATCH_FIELDS = frozenset({"name", "uri", "headers", "method", "queryParams"})
_STRING_MATCH = {
    "exact": l7.ValueMatchType.EXACT,
    "prefix": l7.ValueMatchType.PREFIX,
    "regex": l7.ValueMatchType.REGULAR_EXPRESSION,
}


def warn_unsupported(spec: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    for field_name in spec:
        if field_name not in known:
            logger.warning("field not supported; ignored", object=where, field=field_name)


def _string_match(value: Any, where: str) -> tuple[l7.ValueMatchType, str]:
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ValueError(f"{where}: expected one of exact, prefix or regex")
    ((kind, text),) = value.items()
    if kind not in _STRING_MATCH:
        raise ValueError(f"{where}: match kind {kind!r} is not exact, prefix or regex")
    if kind == "regex":
        fields.check_regex(str(text), where)
    return _STRING_MATCH[kind], str(text)


def route_match(match: Mapping[str, Any], where: str) -> l7.RouteMatch:
    warn_unsupported(match, _MATCH_FIELDS, where)
    path = None
    if match.get("uri"):
        kind, value = _string_match(match["uri"], f"{where} uri")
        path = l7.PathMatch(
            {
                l7.ValueMatchType.EXACT: l7.PathMatchType.EXACT,
                l7.ValueMatchType.PREFIX: l7.PathMatchType.PATH_PREFIX,
                l7.ValueMatchType.REGULAR_EXPRESSION: l7.PathMatchType.REGULAR_EXPRESSION,
            }[kind],
            value,
        )
    headers = []
    for name, value_match in (match.get("headers") or {}).items():
        kind, value = _string_match(value_match, f"{where} headers.{name}")
        headers.append(l7.ValueMatch(str(name), value, kind))
    query_params = []
    for name, value_match in (match.get("queryParams") or {}).items():
        kind, value = _string_match(value_match, f"{where} queryParams.{name}")
        if kind is l7.ValueMatchType.PREFIX:
            raise ValueError(f"{where} queryParams.{name}: prefix is not supported (Istio)")
        query_params.append(l7.ValueMatch(str(name), value, kind))
    method = None
    if match.get("method"):
        kind, value = _string_match(match["method"], f"{where} method")
        if kind is not l7.ValueMatchType.EXACT:
            raise ValueError(f"{where} method: only exact is supported")
        method = value.upper()
    return l7.RouteMatch(
        path=path, headers=tuple(headers), query_params=tuple(query_params), method=method
    )


def header_modifier(operations: Mapping[str, Any] | None) -> l7.HeaderModifier | None:
    if not operations:
        return None
    return l7.HeaderModifier(
        set=tuple((str(k), str(v)) for k, v in (operations.get("set") or {}).items()),
        add=tuple((str(k), str(v)) for k, v in (operations.get("add") or {}).items()),
        remove=tuple(str(name) for name in operations.get("remove") or ()),
    )


def url_rewrite(
    rewrite: Mapping[str, Any] | None, matches: tuple[l7.RouteMatch, ...], where: str
) -> l7.UrlRewrite | None:
    """Istio's ``rewrite.uri`` replaces the matched prefix for prefix (or no) path matches
    and the whole path for exact/regex ones, like Envoy's ``prefix_rewrite``."""
    if not rewrite:
        return None
    warn_unsupported(rewrite, frozenset({"uri", "authority"}), f"{where} rewrite")
    path = None
    if rewrite.get("uri"):
        prefix = any(
            m.path is None or m.path.type is l7.PathMatchType.PATH_PREFIX for m in matches
        )
        kind = (l7.PathModifierType.REPLACE_PREFIX_MATCH if prefix
                else l7.PathModifierType.REPLACE_FULL_PATH)
        path = l7.PathModifier(kind, str(rewrite["uri"]))
    authority = rewrite.get("authority")
    return l7.UrlRewrite(hostname=str(authority) if authority else None, path=path)


def request_redirect(redirect: Mapping[str, Any] | None, where: str) -> l7.RequestRedirect | None:
    if not redirect:
        return None
    at = f"{where} redirect"
    warn_unsupported(
        redirect, frozenset({"uri", "authority", "redirectCode", "scheme", "port"}), at
    )
    status = fields.whole(redirect.get("redirectCode", 301), f"{at}.redirectCode")
    if status not in gateway_api.REDIRECT_CODES:
        raise ValueError(f"{at}: redirectCode {status} is not a redirect status")
    uri, authority = redirect.get("uri"), redirect.get("authority")
    port = redirect.get("port")
    return l7.RequestRedirect(
        scheme=redirect.get("scheme"),
        hostname=str(authority) if authority else None,
        path=l7.PathModifier(l7.PathModifierType.REPLACE_FULL_PATH, str(uri)) if uri else None,
        port=fields.port(port, f"{at}.port") if port is not None else None,
        status_code=status,
    )


def percentage(value: Mapping[str, Any] | None, where: str, default: float = 100.0) -> float:
    if value is None:
        return default
    percent = float(value.get("value", default))
    if not 0 <= percent <= 100:
        raise ValueError(f"{where}: {percent} is not within 0-100")
    return percent


def _fault_percent(fault: Mapping[str, Any], where: str) -> float:
    if fault.get("percentage") is not None:
        return percentage(fault["percentage"], f"{where}.percentage")
    if fault.get("percent") is not None:  # Istio's deprecated integer form
        return percentage({"value": fault["percent"]}, f"{where}.percent")
    return 100.0


def fault_injection(fault: Mapping[str, Any] | None, where: str) -> l7.FaultInjection | None:
    if not fault:
        return None
    delay = fault.get("delay") or {}
    abort = fault.get("abort") or {}
    delay_seconds = None
    if delay:
        if delay.get("fixedDelay") is None:
            raise ValueError(f"{where} fault.delay: fixedDelay is required")
        delay_seconds = fields.duration(delay["fixedDelay"], f"{where} fault.delay.fixedDelay")
    abort_status = None
    if abort:
        if abort.get("httpStatus") is None:
            raise ValueError(f"{where} fault.abort: httpStatus is required (grpcStatus and "
                             "http2Error are not supported)")
        abort_status = fields.whole(abort["httpStatus"], f"{where} fault.abort.httpStatus",
                              minimum=200)
        if abort_status > 599:
            raise ValueError(f"{where} fault.abort: httpStatus {abort_status} is not an "
                             "HTTP status")
    if delay_seconds is None and abort_status is None:
        return None
    return l7.FaultInjection(
        delay_seconds=delay_seconds,
        delay_percent=_fault_percent(delay, f"{where} fault.delay") if delay else 100.0,
        abort_status=abort_status,
        abort_percent=_fault_percent(abort, f"{where} fault.abort") if abort else 100.0,
    )


def retry_policy(retries: Mapping[str, Any] | None, where: str) -> l7.RetryPolicy | None:
    if retries is None:
        return None
    default = l7.RetryPolicy()
    retry_on = tuple(
        condition.strip()
        for condition in str(retries.get("retryOn") or "").split(",")
        if condition.strip()
    )
    return l7.RetryPolicy(
        attempts=fields.whole(retries.get("attempts", 0), f"{where} retries.attempts"),
        per_try_timeout=fields.optional_duration(
            retries.get("perTryTimeout"), f"{where} retries.perTryTimeout"
        ),
        retry_on=retry_on or default.retry_on,
    )


def connection_pool(pool: Mapping[str, Any] | None, where: str) -> l7.ConnectionPool | None:
    if not pool:
        return None
    tcp, http = pool.get("tcp") or {}, pool.get("http") or {}
    for name in tcp:
        if name != "maxConnections":
            logger.warning("connectionPool field not supported; ignored", rule=where,
                           field=f"tcp.{name}")
    http_fields = {"http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection"}
    for name in http:
        if name not in http_fields:
            logger.warning("connectionPool field not supported; ignored", rule=where,
                           field=f"http.{name}")

    def limit(section: Mapping[str, Any], name: str) -> int | None:
        value = section.get(name)
        # Istio: 0 on maxRequestsPerConnection means unlimited.
        if value is None or (name == "maxRequestsPerConnection" and value == 0):
            return None
        return fields.whole(value, f"connectionPool {name}", minimum=1)

    return l7.ConnectionPool(
        max_connections=limit(tcp, "maxConnections"),
        max_pending_requests=limit(http, "http1MaxPendingRequests"),
        max_requests=limit(http, "http2MaxRequests"),
        max_requests_per_connection=limit(http, "maxRequestsPerConnection"),
    )


def outlier_detection(
    detection: Mapping[str, Any] | None, where: str
) -> l7.OutlierDetection | None:
    if not detection:
        return None
    known = {"consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
             "baseEjectionTime", "maxEjectionPercent"}
    for name in detection:
        if name not in known:
            logger.warning("outlierDetection field not supported; ignored", rule=where,
                           field=name)
    default = l7.OutlierDetection()
    counts = [
        fields.whole(detection[name], f"outlierDetection.{name}")
        for name in ("consecutive5xxErrors", "consecutiveGatewayErrors")
        if detection.get(name) is not None
    ]
    consecutive = min(counts) if counts else default.consecutive_5xx
    if consecutive == 0:
        logger.info("outlier detection disabled (0 consecutive errors)", rule=where)
        return None
    interval = fields.optional_duration(detection.get("interval"), "outlierDetection.interval")
    ejection = fields.optional_duration(
        detection.get("baseEjectionTime"), "outlierDetection.baseEjectionTime"
    )
    percent = fields.whole(
        detection.get("maxEjectionPercent", default.max_ejection_percent),
        "outlierDetection.maxEjectionPercent",
    )
    if percent > 100:
        raise ValueError(f"outlierDetection.maxEjectionPercent {percent} is above 100")
    return l7.OutlierDetection(
        consecutive_5xx=consecutive,
        interval=interval or default.interval,
        base_ejection_time=ejection or default.base_ejection_time,
        max_ejection_percent=percent,
    )
