"""What a matched rule changes on the way: header modifiers, URL rewrites and redirects, as
plain edits (``HeaderEdits``, ``RequestEdits``, ``Redirect``) applied to ``waypoint.http``
requests and responses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from ambient_api.l7 import (
    HeaderModifier,
    PathMatchType,
    PathModifier,
    PathModifierType,
)
from waypoint.http import Headers, HttpRequest, HttpResponse, modify_headers
from waypoint.routing.attachment import split_authority
from waypoint.routing.matching import (
    RoutableRequest,
    Selection,
    path_prefix_matches,
    raw_query,
)
from waypoint.routing.validation import DEFAULT_PORTS


class InvalidRouteError(ValueError):
    """A route that validation should have rejected reached a decision; answer 500."""


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
            target = _target(new_path, raw_query(request))
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
    location = f"{scheme}://{host}{port_part}{_target(path, raw_query(request))}"
    return Redirect(status=redirect.status_code, location=location)


def apply_response_edits(response: HttpResponse, edits: HeaderEdits) -> HttpResponse:
    """The response with the rule's ResponseHeaderModifier applied."""
    if not edits:
        return response
    return dataclasses.replace(response, headers=edits.apply(response.headers))
