"""Gateway API route fields -> the wire model: matches, header modifiers, ``URLRewrite``,
``RequestRedirect`` and ``retry``, as ``HTTPRoute`` rules write them (``routes.py`` calls
these for each rule). A bad value raises ValueError naming where it was."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ambient_api import l7
from istiod_lite.translate import fields

_VALUE_TYPES = {
    "Exact": l7.ValueMatchType.EXACT,
    "RegularExpression": l7.ValueMatchType.REGULAR_EXPRESSION,
}
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


def http_match(match: Mapping[str, Any], where: str) -> l7.RouteMatch:
    path = match.get("path") or {}
    path_type = path.get("type", "PathPrefix")
    try:
        path_match_type = l7.PathMatchType(path_type)
    except ValueError:
        raise ValueError(f"{where}: path type {path_type!r} is not Exact, PathPrefix or "
                         "RegularExpression") from None
    value = str(path.get("value", "/"))
    if path_match_type is l7.PathMatchType.REGULAR_EXPRESSION:
        fields.check_regex(value, f"{where} path")
    elif not value.startswith("/"):
        raise ValueError(f"{where}: path {value!r} must start with /")
    method = match.get("method")
    return l7.RouteMatch(
        path=l7.PathMatch(path_match_type, value),
        headers=_value_matches(match.get("headers"), f"{where} headers"),
        query_params=_value_matches(match.get("queryParams"), f"{where} queryParams"),
        method=str(method).upper() if method else None,
    )


def _value_matches(items: Any, where: str) -> tuple[l7.ValueMatch, ...]:
    matches = []
    for item in items or []:
        kind = item.get("type", "Exact")
        if kind not in _VALUE_TYPES:
            raise ValueError(f"{where}: match type {kind!r} is not Exact or RegularExpression")
        value = str(item["value"])
        if _VALUE_TYPES[kind] is l7.ValueMatchType.REGULAR_EXPRESSION:
            fields.check_regex(value, where)
        matches.append(l7.ValueMatch(str(item["name"]), value, _VALUE_TYPES[kind]))
    return tuple(matches)


def header_modifier(modifier: Mapping[str, Any] | None) -> l7.HeaderModifier:
    modifier = modifier or {}
    return l7.HeaderModifier(
        set=tuple((str(h["name"]), str(h["value"])) for h in modifier.get("set") or ()),
        add=tuple((str(h["name"]), str(h["value"])) for h in modifier.get("add") or ()),
        remove=tuple(str(name) for name in modifier.get("remove") or ()),
    )


def _path_modifier(path: Mapping[str, Any] | None, where: str) -> l7.PathModifier | None:
    if not path:
        return None
    kind = path.get("type")
    if kind == "ReplaceFullPath":
        return l7.PathModifier(l7.PathModifierType.REPLACE_FULL_PATH, str(path["replaceFullPath"]))
    if kind == "ReplacePrefixMatch":
        return l7.PathModifier(
            l7.PathModifierType.REPLACE_PREFIX_MATCH, str(path["replacePrefixMatch"])
        )
    raise ValueError(f"{where}: path type {kind!r} is not ReplaceFullPath or ReplacePrefixMatch")


def url_rewrite(rewrite: Mapping[str, Any] | None, where: str) -> l7.UrlRewrite:
    rewrite = rewrite or {}
    hostname = rewrite.get("hostname")
    return l7.UrlRewrite(
        hostname=str(hostname) if hostname else None,
        path=_path_modifier(rewrite.get("path"), where),
    )


def request_redirect(redirect: Mapping[str, Any] | None, where: str) -> l7.RequestRedirect:
    redirect = redirect or {}
    status = fields.whole(redirect.get("statusCode", 302), f"{where} statusCode")
    if status not in REDIRECT_CODES:
        raise ValueError(f"{where}: statusCode {status} is not a redirect status")
    scheme = redirect.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise ValueError(f"{where}: scheme {scheme!r} is not http or https")
    port = redirect.get("port")
    hostname = redirect.get("hostname")
    return l7.RequestRedirect(
        scheme=scheme,
        hostname=str(hostname) if hostname else None,
        path=_path_modifier(redirect.get("path"), where),
        port=fields.port(port, f"{where} port") if port is not None else None,
        status_code=status,
    )


def retry_policy(retry: Mapping[str, Any] | None, where: str) -> l7.RetryPolicy | None:
    if retry is None:
        return None
    default = l7.RetryPolicy()
    codes = tuple(str(fields.whole(code, f"{where} retry.codes", minimum=100)) for code in
                  retry.get("codes") or ())
    backoff = fields.optional_duration(retry.get("backoff"), f"{where} retry.backoff")
    return l7.RetryPolicy(
        attempts=fields.whole(retry.get("attempts", default.attempts), f"{where} retry.attempts"),
        retry_on=("connect-failure", "reset", *codes) if codes else default.retry_on,
        backoff_base=backoff if backoff is not None else default.backoff_base,
        backoff_max=max(10 * backoff, default.backoff_max) if backoff else default.backoff_max,
    )
