"""waypoint.routing: Gateway API (GAMMA) route attachment, match precedence, backends,
filters, redirects, rewrites, mirrors and faults -- all without sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

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
    RequestRedirect,
    RouteMatch,
    RouteRule,
    UrlRewrite,
    ValueMatch,
    ValueMatchType,
    waypoint_key,
)
from ambient_dataplane.labels import ResponseFlag, format_response_flags
from waypoint.http import HttpRequest, HttpResponse
from waypoint.routing import (
    FaultDecision,
    HeaderEdits,
    InvalidRouteError,
    NoRouteMatched,
    PassThrough,
    RoutableRequest,
    Selection,
    apply_response_edits,
    attached_routes,
    choose_backend,
    fault_decision,
    hostname_matches,
    mirror_targets,
    path_prefix_matches,
    redirect_for,
    replace_prefix,
    request_edits,
    response_header_edits,
    route_problems,
    route_request,
    select,
    service_names,
    split_authority,
)

SVC = "demo/reviews.demo.svc.cluster.local"
SVC_V2 = "demo/reviews-v2.demo.svc.cluster.local"
OTHER_SVC = "demo/ratings.demo.svc.cluster.local"
WAYPOINT = waypoint_key("demo", "waypoint")


def _request(target: str = "/", *, method: str = "GET",
             headers: tuple[tuple[str, str], ...] = (),
             authority: str = "reviews.demo.svc.cluster.local:9080",
             scheme: str = "http") -> HttpRequest:
    return HttpRequest(method=method, target=target, headers=headers, body=b"",
                       authority=authority, scheme=scheme)


def prefix(value: str, **kwargs: object) -> RouteMatch:
    return RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, value), **kwargs)  # type: ignore[arg-type]


def exact(value: str) -> RouteMatch:
    return RouteMatch(path=PathMatch(PathMatchType.EXACT, value))


def regex(value: str) -> RouteMatch:
    return RouteMatch(path=PathMatch(PathMatchType.REGULAR_EXPRESSION, value))


def backend(service: str = SVC, weight: int = 1) -> BackendRef:
    return BackendRef(service=service, port=9080, weight=weight)


def rule(*matches: RouteMatch, **kwargs: object) -> RouteRule:
    kwargs.setdefault("backends", (backend(),))
    return RouteRule(matches=matches or (RouteMatch(),), **kwargs)  # type: ignore[arg-type]


def route(name: str, *rules: RouteRule, namespace: str = "demo", parents: tuple[str, ...] = (SVC,),
          created: str = "2024-01-01T00:00:00Z", **kwargs: object) -> HttpRoute:
    return HttpRoute(name=name, namespace=namespace, parents=parents, rules=rules,
                     created=created, **kwargs)  # type: ignore[arg-type]


def selected(routes: list[HttpRoute], request: RoutableRequest) -> tuple[str, int]:
    selection = select(routes, request)
    assert selection is not None
    return selection.route.name, selection.rule_index


def selection_for(r: HttpRoute, request: RoutableRequest) -> Selection:
    selection = select([r], request)
    assert selection is not None
    return selection


# ------------------------------------------------------------------------- path matching


@pytest.mark.parametrize(
    ("pfx", "path", "expected"),
    [
        ("/foo", "/foo", True),
        ("/foo", "/foo/", True),
        ("/foo", "/foo/bar", True),
        ("/foo", "/foobar", False),
        ("/foo/", "/foo", True),
        ("/foo/", "/foo/bar", True),
        ("/foo/", "/foobar", False),
        ("/", "/", True),
        ("/", "/anything/at/all", True),
        ("/foo/bar", "/foo", False),
    ],
)
def test_path_prefix_matches_whole_segments(pfx: str, path: str, expected: bool) -> None:
    assert path_prefix_matches(pfx, path) is expected


def test_exact_path_is_exact() -> None:
    r = route("r", rule(exact("/abc")))
    assert select([r], _request("/abc")) is not None
    for path in ("/abc/", "/Abc", "/abcd"):
        assert select([r], _request(path)) is None


def test_regex_path_must_match_the_whole_path() -> None:
    r = route("r", rule(regex(r"/api/v[0-9]+/items")))
    assert select([r], _request("/api/v12/items")) is not None
    assert select([r], _request("/api/v12/items/7")) is None
    assert select([r], _request("/x/api/v1/items")) is None


def test_query_string_is_not_part_of_the_path() -> None:
    r = route("r", rule(exact("/search")))
    assert select([r], _request("/search?q=1")) is not None


# ------------------------------------------------------------------------- other matches


def test_header_match_names_are_case_insensitive_values_exact() -> None:
    r = route("r", rule(RouteMatch(headers=(ValueMatch("End-User", "jason"),))))
    assert select([r], _request(headers=(("end-user", "jason"),))) is not None
    assert select([r], _request(headers=(("end-user", "Jason"),))) is None
    assert select([r], _request()) is None


def test_header_regex_and_prefix_matches() -> None:
    r = route("r", rule(RouteMatch(headers=(
        ValueMatch("user-agent", r".*Firefox.*", ValueMatchType.REGULAR_EXPRESSION),
        ValueMatch("x-version", "v2", ValueMatchType.PREFIX),
    ))))
    good = (("user-agent", "Mozilla Firefox/1"), ("x-version", "v2.1"))
    assert select([r], _request(headers=good)) is not None
    assert select([r], _request(headers=(("user-agent", "curl"), ("x-version", "v2")))) is None
    assert select([r], _request(headers=(good[0], ("x-version", "v1")))) is None


def test_only_first_header_match_of_a_name_counts() -> None:
    r = route("r", rule(RouteMatch(headers=(ValueMatch("x-a", "1"), ValueMatch("X-A", "2")))))
    assert select([r], _request(headers=(("x-a", "1"),))) is not None


def test_host_header_match_falls_back_to_authority() -> None:
    # waypoint.http keeps Host out of the header list, as HTTP/2 does with :authority
    r = route("r", rule(RouteMatch(headers=(ValueMatch("host", "reviews:9080"),))))
    assert select([r], _request(authority="reviews:9080")) is not None
    assert select([r], _request(authority="other:9080")) is None


def test_query_param_matches_first_value_decoded() -> None:
    r = route("r", rule(RouteMatch(query_params=(ValueMatch("name", "a b"),))))
    assert select([r], _request("/?name=a%20b&name=x")) is not None
    assert select([r], _request("/?name=x&name=a%20b")) is None
    assert select([r], _request("/?Name=a%20b")) is None  # names are case-sensitive
    rx = route("r", rule(RouteMatch(query_params=(
        ValueMatch("id", r"[0-9]+", ValueMatchType.REGULAR_EXPRESSION),))))
    assert select([rx], _request("/?id=42")) is not None
    assert select([rx], _request("/?id=42a")) is None


def test_method_match() -> None:
    r = route("r", rule(RouteMatch(method="POST")))
    assert select([r], _request(method="POST")) is not None
    assert select([r], _request(method="GET")) is None


def test_any_match_of_a_rule_applies() -> None:
    r = route("r", rule(exact("/a"), exact("/b")))
    assert selected([r], _request("/b")) == ("r", 0)
    assert select([r], _request("/c")) is None


def test_rule_without_matches_matches_everything() -> None:
    r = route("r", RouteRule(matches=(), backends=(backend(),)))
    assert select([r], _request("/whatever", method="DELETE")) is not None


# ------------------------------------------------------------------------- precedence


def test_exact_beats_prefix_beats_regex_regardless_of_order() -> None:
    r = route("r", rule(regex("/a.*")), rule(prefix("/a")), rule(exact("/a/b")))
    assert selected([r], _request("/a/b")) == ("r", 2)
    assert selected([r], _request("/a/c")) == ("r", 1)
    assert selected([r], _request("/ab")) == ("r", 0)


def test_longest_prefix_wins_across_routes() -> None:
    short = route("a-short", rule(prefix("/api")))
    long = route("b-long", rule(prefix("/api/v1")), created="2025-01-01T00:00:00Z")
    assert selected([short, long], _request("/api/v1/x")) == ("b-long", 0)
    assert selected([short, long], _request("/api/v2")) == ("a-short", 0)


def test_method_then_headers_then_query_params() -> None:
    r = route(
        "r",
        rule(prefix("/", query_params=(ValueMatch("a", "1"), ValueMatch("b", "2")))),
        rule(prefix("/", headers=(ValueMatch("x", "1"),))),
        rule(prefix("/", method="GET")),
    )
    everything = _request("/?a=1&b=2", headers=(("x", "1"),))
    assert selected([r], everything) == ("r", 2)  # method wins
    assert selected([r], _request("/?a=1&b=2", method="PUT", headers=(("x", "1"),))) == ("r", 1)
    assert selected([r], _request("/?a=1&b=2", method="PUT")) == ("r", 0)


def test_more_header_matches_win() -> None:
    one = route("one", rule(RouteMatch(headers=(ValueMatch("a", "1"),))))
    two = route("two", rule(RouteMatch(headers=(ValueMatch("a", "1"), ValueMatch("b", "2")))),
                created="2030-01-01T00:00:00Z")
    assert selected([one, two], _request(headers=(("a", "1"), ("b", "2")))) == ("two", 0)
    assert selected([one, two], _request(headers=(("a", "1"),))) == ("one", 0)


def test_ties_go_to_oldest_route_then_name_then_rule_order() -> None:
    newer = route("a-newer", rule(prefix("/x")), created="2024-06-01T00:00:00Z")
    older = route("z-older", rule(prefix("/x")), created="2024-01-01T00:00:00+00:00")
    assert selected([newer, older], _request("/x")) == ("z-older", 0)
    same_a = route("a", rule(prefix("/x")))
    same_b = route("b", rule(prefix("/x")))
    assert selected([same_b, same_a], _request("/x")) == ("a", 0)
    first_rule = route("r", rule(prefix("/x")), rule(prefix("/x")))
    assert selected([first_rule], _request("/x")) == ("r", 0)


def test_unknown_creation_time_sorts_as_newest() -> None:
    unknown = route("a", rule(prefix("/x")), created="")
    known = route("b", rule(prefix("/x")), created="2024-01-01T00:00:00Z")
    assert selected([unknown, known], _request("/x")) == ("b", 0)


def test_virtual_service_rules_are_first_match_in_order() -> None:
    vs = route("vs", rule(prefix("/")), rule(exact("/exact")), source_kind="VirtualService")
    assert selected([vs], _request("/exact")) == ("vs", 0)


def test_http_route_match_beats_virtual_service() -> None:
    vs = route("vs", rule(exact("/a")), source_kind="VirtualService")
    hr = route("hr", rule(prefix("/")))
    assert selected([vs, hr], _request("/a")) == ("hr", 0)


def test_route_request_pass_through_no_match_and_selection() -> None:
    assert route_request([], _request()) == PassThrough()
    r = route("r", rule(exact("/only")))
    decision = route_request([r], _request("/other"))
    assert decision == NoRouteMatched()
    assert isinstance(decision, NoRouteMatched)
    assert (decision.status, format_response_flags(decision.response_flags)) == (404, "NR")
    assert isinstance(route_request([r], _request("/only")), Selection)


# ------------------------------------------------------------------------- attachment


def test_split_authority_and_service_names() -> None:
    assert split_authority("Reviews:9080") == ("reviews", 9080)
    assert split_authority("[fd00::1]:80") == ("fd00::1", 80)
    assert split_authority("fd00::1") == ("fd00::1", None)
    assert split_authority("example.com.") == ("example.com", None)
    assert split_authority("host:notaport") == ("host", None)
    assert service_names(SVC) == (
        "reviews.demo.svc.cluster.local", "reviews.demo.svc", "reviews.demo", "reviews")
    assert service_names("ext/api.example.com") == ("api.example.com",)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("foo.example.com", "FOO.example.com".lower(), True),
        ("Foo.Example.com", "foo.example.com", True),
        ("foo.example.com", "bar.example.com", False),
        ("*", "anything", True),
    ],
)
def test_hostname_matches(pattern: str, host: str, expected: bool) -> None:
    assert hostname_matches(pattern, host) is expected


def test_service_routes_ignore_hostnames_and_other_services() -> None:
    mine = route("mine", rule(), hostnames=("unrelated.example.com",))
    other = route("other", rule(), parents=(OTHER_SVC,))
    got = attached_routes([mine, other], service_key=SVC, waypoint_key=WAYPOINT,
                          host="10.0.0.5:9080")
    assert [r.name for r in got] == ["mine"]


def test_attached_routes_are_ordered_oldest_first() -> None:
    b = route("b", rule(), created="2024-02-01T00:00:00Z")
    a = route("a", rule(), created="2024-03-01T00:00:00Z")
    c = route("c", rule(), created="2024-01-01T00:00:00Z")
    got = attached_routes([b, a, c], service_key=SVC, waypoint_key=WAYPOINT, host="x")
    assert [r.name for r in got] == ["c", "b", "a"]


def test_consumer_routes_apply_only_to_their_namespace_and_shadow_producers() -> None:
    producer = route("producer", rule())
    consumer = route("consumer", rule(), namespace="shop")
    routes = [producer, consumer]
    common = {"service_key": SVC, "waypoint_key": WAYPOINT, "host": "reviews:9080"}
    from_shop = attached_routes(routes, source_namespace="shop", **common)  # type: ignore[arg-type]
    from_elsewhere = attached_routes(routes, source_namespace="web", **common)  # type: ignore[arg-type]
    unknown_caller = attached_routes(routes, **common)  # type: ignore[arg-type]
    assert [r.name for r in from_shop] == ["consumer"]
    assert [r.name for r in from_elsewhere] == ["producer"]
    assert [r.name for r in unknown_caller] == ["producer"]


def test_http_routes_shadow_virtual_services_for_a_service() -> None:
    vs = route("vs", rule(), source_kind="VirtualService", namespace="other")
    hr = route("hr", rule())
    got = attached_routes([vs, hr], service_key=SVC, waypoint_key=WAYPOINT, host="x")
    assert [r.name for r in got] == ["hr"]
    only_vs = attached_routes([vs], service_key=SVC, waypoint_key=WAYPOINT, host="x")
    assert [r.name for r in only_vs] == ["vs"]


def test_waypoint_routes_apply_when_the_service_has_none() -> None:
    everywhere = route("everywhere", rule(), parents=(WAYPOINT,))
    got = attached_routes([everywhere], service_key=SVC, waypoint_key=WAYPOINT, host="x:1")
    assert [r.name for r in got] == ["everywhere"]
    own = route("own", rule())
    got = attached_routes([everywhere, own], service_key=SVC, waypoint_key=WAYPOINT, host="x")
    assert [r.name for r in got] == ["own"]
    # addressed to a workload: only the waypoint's routes can apply
    got = attached_routes([everywhere, own], service_key=None, waypoint_key=WAYPOINT,
                          host="10.0.0.9:8080")
    assert [r.name for r in got] == ["everywhere"]
    other_waypoint = route("other", rule(), parents=(waypoint_key("demo", "other"),))
    assert attached_routes([other_waypoint], service_key=SVC, waypoint_key=WAYPOINT,
                           host="x") == []


def test_waypoint_route_hostnames_match_authority_or_service_names() -> None:
    short = route("short", rule(), parents=(WAYPOINT,), hostnames=("reviews",))
    elsewhere = route("elsewhere", rule(), parents=(WAYPOINT,), hostnames=("ratings",))
    # the caller used a VIP, but the service is "reviews"
    got = attached_routes([short, elsewhere], service_key=SVC, waypoint_key=WAYPOINT,
                          host="10.96.0.7:9080")
    assert [r.name for r in got] == ["short"]
    by_host = attached_routes([elsewhere], service_key=None, waypoint_key=WAYPOINT,
                              host="RATINGS:9080")
    assert [r.name for r in by_host] == ["elsewhere"]


def test_most_specific_waypoint_hostname_wins() -> None:
    wildcard = route("wildcard", rule(), parents=(WAYPOINT,), hostnames=("*.example.com",))
    precise = route("precise", rule(), parents=(WAYPOINT,), hostnames=("api.example.com",))
    catch_all = route("catch-all", rule(), parents=(WAYPOINT,))
    routes = [wildcard, precise, catch_all]

    def names(host: str) -> list[str]:
        got = attached_routes(routes, service_key=None, waypoint_key=WAYPOINT, host=host)
        return [r.name for r in got]

    assert names("api.example.com:80") == ["precise"]
    assert names("web.example.com") == ["wildcard"]
    assert names("other.org") == ["catch-all"]


def test_invalid_routes_are_not_attached_and_say_why() -> None:
    broken = route("broken", rule(regex("(unclosed")))
    assert "invalid path regular expression" in " ".join(route_problems(broken))
    assert attached_routes([broken], service_key=SVC, waypoint_key=WAYPOINT, host="x") == []


@pytest.mark.parametrize(
    ("bad_rule", "reason"),
    [
        (rule(exact("/a"), rewrite=UrlRewrite(path=PathModifier(
            PathModifierType.REPLACE_PREFIX_MATCH, "/b"))), "ReplacePrefixMatch needs PathPrefix"),
        (rule(backends=(), redirect=RequestRedirect(), rewrite=UrlRewrite(hostname="h")),
         "cannot be combined"),
        (rule(redirect=RequestRedirect()), "cannot be used with backendRefs"),
        (rule(backends=(), redirect=RequestRedirect(status_code=200)), "redirect status 200"),
        (rule(backends=(), redirect=RequestRedirect(scheme="ftp")), "scheme 'ftp'"),
        (rule(backends=(backend(weight=-1),)), "negative weight"),
        (rule(RouteMatch(headers=(ValueMatch("x", "[", ValueMatchType.REGULAR_EXPRESSION),))),
         "invalid regular expression"),
        (rule(prefix("api")), "must start with '/'"),
        (rule(RouteMatch(method="GE T")), "invalid method"),
        (rule(mirrors=(RequestMirror(SVC, 9080, percent=150),)), "mirror percent"),
        (rule(fault=FaultInjection(abort_status=700)), "abort status 700"),
    ],
)
def test_route_problems(bad_rule: RouteRule, reason: str) -> None:
    problems = route_problems(route("r", bad_rule))
    assert any(reason in problem for problem in problems), problems


def test_valid_route_has_no_problems() -> None:
    good = route("r", rule(prefix("/api"), rewrite=UrlRewrite(path=PathModifier(
        PathModifierType.REPLACE_PREFIX_MATCH, "/"))),
        rule(backends=(), redirect=RequestRedirect(scheme="https", status_code=301)))
    assert route_problems(good) == ()


# ------------------------------------------------------------------------- backends


def test_weighted_backends_90_10() -> None:
    canary = rule(backends=(backend(SVC, 90), backend(SVC_V2, 10)))
    rng = random.Random(1234)
    counts = Counter(choose_backend(canary, rng.random) for _ in range(10_000))
    share = counts[backend(SVC_V2, 10)] / 10_000
    assert 0.085 <= share <= 0.115, counts
    assert counts[backend(SVC, 90)] + counts[backend(SVC_V2, 10)] == 10_000


def test_zero_weight_backend_is_never_chosen() -> None:
    blue_green = rule(backends=(backend(SVC, 0), backend(SVC_V2, 1)))
    rng = random.Random(7)
    assert {choose_backend(blue_green, rng.random) for _ in range(500)} == {backend(SVC_V2, 1)}


def test_no_backend_when_all_weights_zero_or_none() -> None:
    assert choose_backend(rule(backends=(backend(SVC, 0), backend(SVC_V2, 0))), lambda: 0.5) is None
    assert choose_backend(rule(backends=()), lambda: 0.5) is None


def test_backend_choice_edges_are_deterministic() -> None:
    two = rule(backends=(backend(SVC, 1), backend(SVC_V2, 3)))
    assert choose_backend(two, lambda: 0.0) == backend(SVC, 1)
    assert choose_backend(two, lambda: 0.2499) == backend(SVC, 1)
    assert choose_backend(two, lambda: 0.25) == backend(SVC_V2, 3)
    assert choose_backend(two, lambda: 1.0) == backend(SVC_V2, 3)


def test_mirror_targets_by_percent() -> None:
    always = RequestMirror("demo/shadow.demo.svc.cluster.local", 80)
    half = RequestMirror("demo/half.demo.svc.cluster.local", 80, percent=50)
    never = RequestMirror("demo/never.demo.svc.cluster.local", 80, percent=0)
    r = rule(mirrors=(always, half, never))
    assert mirror_targets(r, lambda: 0.49) == [always, half]
    assert mirror_targets(r, lambda: 0.5) == [always]
    rng = random.Random(99)
    hits = sum(half in mirror_targets(r, rng.random) for _ in range(4000))
    assert 1800 <= hits <= 2200


def test_fault_decision_draws_delay_and_abort_independently() -> None:
    fault = FaultInjection(delay_seconds=0.5, delay_percent=50, abort_status=503,
                           abort_percent=10)
    draws = iter([0.4, 0.05])
    assert fault_decision(fault, lambda: next(draws)) == FaultDecision(0.5, 503)
    draws = iter([0.6, 0.2])
    assert fault_decision(fault, lambda: next(draws)) == FaultDecision(None, None)
    assert fault_decision(None, lambda: 0.0) == FaultDecision()
    decision = fault_decision(FaultInjection(abort_status=418), lambda: 0.99)
    assert decision == FaultDecision(None, 418)
    assert decision.response_flags == (ResponseFlag.FAULT_INJECTED,)
    assert format_response_flags(FaultDecision(1.0, 500).response_flags) == "DI,FI"
    rng = random.Random(5)
    aborted = sum(fault_decision(fault, rng.random).abort_status is not None
                  for _ in range(5000))
    assert 400 <= aborted <= 600


# ------------------------------------------------------------------------- filters


def test_header_edits_set_add_remove_case_insensitive() -> None:
    edits = HeaderEdits.from_modifier(HeaderModifier(
        set=(("X-Set", "new"), ("x-set", "ignored-second")),
        add=(("X-Add", "b,c"), ("x-fresh", "1")),
        remove=("X-Remove", "x-REMOVE"),
    ))
    assert edits == HeaderEdits(set=(("x-set", "new"),), add=(("x-add", "b,c"), ("x-fresh", "1")),
                                remove=("x-remove",))
    headers = (("x-set", "old"), ("other", "keep"), ("x-add", "a"), ("x-remove", "gone"),
               ("x-set", "older"))
    assert edits.apply(headers) == (
        ("x-set", "new"), ("other", "keep"), ("x-add", "a"), ("x-add", "b,c"), ("x-fresh", "1"))
    assert edits.apply((("other", "keep"),)) == (
        ("other", "keep"), ("x-set", "new"), ("x-add", "b,c"), ("x-fresh", "1"))
    assert not HeaderEdits.from_modifier(None)
    assert edits


def test_request_and_response_header_modifiers_from_selection() -> None:
    r = route("r", rule(request_headers=HeaderModifier(set=(("X-Env", "canary"),)),
                        response_headers=HeaderModifier(remove=("Server",))))
    request = _request(headers=(("x-env", "prod"), ("accept", "*/*")))
    selection = selection_for(r, request)
    edits = request_edits(selection, request)
    assert edits.target is None and edits.authority is None
    forwarded = edits.apply(request)
    assert forwarded.headers == (("x-env", "canary"), ("accept", "*/*"))
    assert (forwarded.target, forwarded.authority) == (request.target, request.authority)
    response = HttpResponse(status=200, headers=(("server", "x"), ("a", "b")), body=b"hi")
    edited = apply_response_edits(response, response_header_edits(selection))
    assert edited == HttpResponse(status=200, headers=(("a", "b"),), body=b"hi")
    untouched = route("u", rule())
    assert apply_response_edits(
        response, response_header_edits(selection_for(untouched, request))) is response


def test_header_modifier_setting_host_sets_the_authority() -> None:
    r = route("r", rule(request_headers=HeaderModifier(set=(("Host", "other:80"),))))
    request = _request()
    forwarded = request_edits(selection_for(r, request), request).apply(request)
    assert forwarded.authority == "other:80"
    assert forwarded.header("host") is None


@pytest.mark.parametrize(
    ("path", "pfx", "replacement", "expected"),
    [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/anything/here", "/", "/prefix", "/prefix/anything/here"),
        ("/", "/", "/prefix", "/prefix/"),
        ("/", "/", "/", "/"),
    ],
)
def test_replace_prefix_follows_the_gateway_api_table(
    path: str, pfx: str, replacement: str, expected: str
) -> None:
    assert replace_prefix(path, pfx, replacement) == expected


def test_replace_prefix_refuses_a_path_outside_the_prefix() -> None:
    with pytest.raises(InvalidRouteError):
        replace_prefix("/foobar", "/foo", "/x")


def test_url_rewrite_prefix_keeps_query_and_rewrites_host() -> None:
    r = route("r", rule(prefix("/v1/"), rewrite=UrlRewrite(
        hostname="reviews-v1.internal",
        path=PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/api"))))
    request = _request("/v1/items?page=2&q=a%20b", authority="reviews:9080",
                       headers=(("a", "1"),))
    edits = request_edits(selection_for(r, request), request)
    assert edits.target == "/api/items?page=2&q=a%20b"  # the query goes on undecoded
    assert edits.authority == "reviews-v1.internal"
    forwarded = edits.apply(request)
    assert (forwarded.target, forwarded.authority, forwarded.headers) == (
        "/api/items?page=2&q=a%20b", "reviews-v1.internal", (("a", "1"),))
    assert (forwarded.path, forwarded.method, forwarded.body) == ("/api/items", "GET", b"")


def test_url_rewrite_with_default_match_uses_slash_prefix() -> None:
    r = route("r", rule(rewrite=UrlRewrite(
        path=PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/v2"))))
    request = _request("/items")
    assert request_edits(selection_for(r, request), request).target == "/v2/items"


def test_url_rewrite_full_path() -> None:
    r = route("r", rule(prefix("/old"), rewrite=UrlRewrite(
        path=PathModifier(PathModifierType.REPLACE_FULL_PATH, "/new"))))
    request = _request("/old/deep/path?x=1")
    assert request_edits(selection_for(r, request), request).target == "/new?x=1"


def test_prefix_rewrite_on_a_non_prefix_match_is_an_error_not_a_crash() -> None:
    # route_problems rejects this route; a caller that skipped validation gets a clear error
    bad = route("bad", rule(exact("/a"), rewrite=UrlRewrite(
        path=PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/b"))))
    request = _request("/a")
    with pytest.raises(InvalidRouteError, match="needs a PathPrefix match"):
        request_edits(selection_for(bad, request), request)


# ------------------------------------------------------------------------- redirects


def redirect_route(redirect: RequestRedirect, *matches: RouteMatch) -> HttpRoute:
    return route("redirect", rule(*matches, backends=(), redirect=redirect))


def location(redirect: RequestRedirect, request: HttpRequest, *matches: RouteMatch,
             listener_port: int = 9080) -> tuple[int, str]:
    r = redirect_route(redirect, *matches)
    assert route_problems(r) == ()
    result = redirect_for(selection_for(r, request), request, listener_port=listener_port)
    assert result is not None
    return result.status, result.location


def test_redirect_defaults_keep_request_scheme_host_port_path_and_query() -> None:
    request = _request("/a/b?q=1", authority="reviews:9080")
    assert location(RequestRedirect(), request) == (302, "http://reviews:9080/a/b?q=1")


def test_redirect_scheme_change_uses_the_new_default_port_and_omits_it() -> None:
    request = _request("/login", authority="reviews:9080")
    assert location(RequestRedirect(scheme="https", status_code=301), request) == (
        301, "https://reviews/login")


def test_redirect_explicit_port_and_hostname() -> None:
    request = _request("/", authority="reviews:9080")
    assert location(RequestRedirect(hostname="example.com", port=8443, scheme="https"),
                    request) == (302, "https://example.com:8443/")
    assert location(RequestRedirect(port=80), request) == (302, "http://reviews/")


def test_redirect_omits_default_listener_port() -> None:
    request = _request("/", authority="reviews")
    assert location(RequestRedirect(), request, listener_port=80) == (302, "http://reviews/")


def test_redirect_paths_full_and_prefix() -> None:
    request = _request("/old/page?x=1", authority="reviews:9080")
    full = RequestRedirect(path=PathModifier(PathModifierType.REPLACE_FULL_PATH, "/new"))
    assert location(full, request)[1] == "http://reviews:9080/new?x=1"
    by_prefix = RequestRedirect(path=PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/v2"))
    assert location(by_prefix, request, prefix("/old"))[1] == "http://reviews:9080/v2/page?x=1"


def test_redirect_ipv6_host_is_bracketed() -> None:
    request = _request("/", authority="[fd00::7]:9080")
    assert location(RequestRedirect(), request)[1] == "http://[fd00::7]:9080/"


def test_redirect_response_carries_status_and_location_only() -> None:
    r = redirect_route(RequestRedirect(scheme="https", status_code=308))
    request = _request("/x", authority="reviews:9080")
    result = redirect_for(selection_for(r, request), request, listener_port=9080)
    assert result is not None
    assert result.response() == HttpResponse(
        status=308, headers=(("location", "https://reviews/x"),))


def test_rule_without_redirect_gives_none() -> None:
    r = route("r", rule())
    assert redirect_for(selection_for(r, _request()), _request(), listener_port=80) is None
