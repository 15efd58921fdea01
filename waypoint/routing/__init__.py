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

The modules, in the order a request meets them: ``validation`` (which routes are accepted),
``attachment`` (which accepted routes govern the request), ``matching`` (which rule wins),
``backends`` (where it goes: backend, mirrors, faults), ``filters`` (what is changed on the
way: headers, rewrites, redirects).
"""

from waypoint.routing.attachment import (
    attached_accepted_routes,
    attached_routes,
    hostname_matches,
    service_names,
    split_authority,
)
from waypoint.routing.backends import (
    NO_BACKEND_STATUS,
    FaultDecision,
    choose_backend,
    fault_decision,
    mirror_targets,
)
from waypoint.routing.filters import (
    HeaderEdits,
    InvalidRouteError,
    Redirect,
    RequestEdits,
    apply_response_edits,
    redirect_for,
    replace_prefix,
    request_edits,
    response_header_edits,
)
from waypoint.routing.matching import (
    NoRouteMatched,
    PassThrough,
    RoutableRequest,
    RouteDecision,
    Selection,
    path_prefix_matches,
    route_request,
    select,
)
from waypoint.routing.validation import route_problems

__all__ = [
    "FaultDecision",
    "HeaderEdits",
    "InvalidRouteError",
    "NO_BACKEND_STATUS",
    "NoRouteMatched",
    "PassThrough",
    "Redirect",
    "RequestEdits",
    "RoutableRequest",
    "RouteDecision",
    "Selection",
    "apply_response_edits",
    "attached_accepted_routes",
    "attached_routes",
    "choose_backend",
    "fault_decision",
    "hostname_matches",
    "mirror_targets",
    "path_prefix_matches",
    "redirect_for",
    "replace_prefix",
    "request_edits",
    "response_header_edits",
    "route_problems",
    "route_request",
    "select",
    "service_names",
    "split_authority",
]
