"""HTTPRoute, TCPRoute, VirtualService, DestinationRule, LocalRateLimit -> l7 resources."""

from __future__ import annotations

import textwrap
from collections.abc import MutableMapping
from typing import Any

import kubernetes_validate
import pytest
import yaml
from structlog.testing import capture_logs

from ambient_api import l7
from ambient_api.model import Service, Workload
from istiod_lite.sources.objects import ClusterObjects, InvalidObject
from istiod_lite.sources.validation import parse_documents
from istiod_lite.translate import MeshConfig
from istiod_lite.translate.routes import route_resources
from istiod_lite.translate.waypoints import waypoint_resources

# The Istio docs' waypoint (as `istioctl waypoint generate` writes it, plus the address the
# embedded mode needs) and the traffic-shifting task's 90/10 canary for reviews.
CANARY_FIXTURE = """
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
    istio.io/use-waypoint: waypoint
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: service
  name: waypoint
  namespace: default
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
  addresses:
  - type: IPAddress
    value: 127.0.40.1
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: default
  labels: {app: reviews, service: reviews}
spec:
  clusterIP: 127.0.30.10
  ports:
  - port: 9080
    name: http
  selector: {app: reviews}
---
apiVersion: v1
kind: Service
metadata:
  name: reviews-v1
  namespace: default
spec:
  clusterIP: 127.0.30.11
  ports:
  - port: 9080
    name: http
  selector: {app: reviews, version: v1}
---
apiVersion: v1
kind: Service
metadata:
  name: reviews-v2
  namespace: default
spec:
  clusterIP: 127.0.30.12
  ports:
  - port: 9080
    name: http
  selector: {app: reviews, version: v2}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: default
  creationTimestamp: "2024-05-01T10:00:00Z"
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      port: 9080
      weight: 10
"""
REVIEWS = "default/reviews.default.svc.cluster.local"


def objects(*documents: str) -> ClusterObjects:
    text = "\n---\n".join(textwrap.dedent(d) for d in documents)
    parsed = parse_documents(text, "test.yaml")
    assert parsed.warnings == ()
    return ClusterObjects.from_objects(parsed.objects)


def raw(kind: str, spec: Any, name: str = "r", api: str = "gateway.networking.k8s.io/v1",
        **metadata: Any) -> dict[str, Any]:
    """An object that skipped validation, as a buggy source might hand it over."""
    return {"apiVersion": api, "kind": kind,
            "metadata": {"name": name, "namespace": "demo", **metadata}, "spec": spec}


def warnings(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["log_level"] == "warning"]


def svc(name: str, namespace: str = "demo", ports: str = "[{port: 80}]") -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec: {{clusterIP: 10.0.0.{len(name)}, ports: {ports}}}")


WAYPOINT = (
    "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
    "metadata: {name: waypoint, namespace: demo}\n"
    "spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, "
    "protocol: HBONE}]}"
)
BACKENDS = [svc("httpbin"), svc("v1"), svc("v2"), svc("shadow"), WAYPOINT]


def http_route(spec: str, name: str = "r") -> str:
    return ("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
            f"metadata: {{name: {name}, namespace: demo}}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec), "  "))


def key(name: str, namespace: str = "demo") -> str:
    return f"{namespace}/{name}.{namespace}.svc.cluster.local"


def translate_one(
    *documents: str | dict[str, Any],
) -> tuple[list[Any], list[MutableMapping[str, Any]]]:
    texts = [d for d in documents if isinstance(d, str)]
    dicts = [d for d in documents if isinstance(d, dict)]
    cluster = objects(*texts) if texts else ClusterObjects()
    if dicts:
        merged = [*(o for f in ("services", "gateways", "httproutes") for o in
                    getattr(cluster, f).values()), *dicts]
        cluster = ClusterObjects.from_objects(merged)
    with capture_logs() as logs:
        found = route_resources(cluster, MeshConfig())
    return found, logs


# -- the docs' fixture -----------------------------------------------------------------------


def test_docs_waypoint_and_canary_translate_as_expected() -> None:
    cluster = objects(CANARY_FIXTURE)
    with capture_logs() as logs:
        waypoint = waypoint_resources(cluster, MeshConfig())
        routes = route_resources(cluster, MeshConfig())
    assert warnings(logs) == []
    assert [(type(r).__name__, r.name) for r in waypoint] == [
        ("Service", "waypoint"), ("Workload", "waypoint")]
    assert isinstance(waypoint[1], Workload) and isinstance(waypoint[0], Service)
    assert waypoint[1].services == (waypoint[0].key,)
    assert routes == [
        l7.HttpRoute(
            name="reviews",
            namespace="default",
            parents=(REVIEWS,),
            rules=(
                l7.RouteRule(
                    matches=(l7.RouteMatch(path=l7.PathMatch(l7.PathMatchType.PATH_PREFIX, "/")),),
                    backends=(
                        l7.BackendRef("default/reviews-v1.default.svc.cluster.local", 9080, 90),
                        l7.BackendRef("default/reviews-v2.default.svc.cluster.local", 9080, 10),
                    ),
                ),
            ),
            created="2024-05-01T10:00:00Z",
        )
    ]


def test_fixture_core_objects_are_valid_kubernetes() -> None:
    checked = 0
    for document in yaml.safe_load_all(CANARY_FIXTURE):
        if "/" not in document["apiVersion"]:
            kubernetes_validate.validate(document, "1.30.0", strict=True)
            checked += 1
    assert checked == 4


# -- HTTPRoute -------------------------------------------------------------------------------

FULL_ROUTE = """
parentRefs:
- {kind: Service, group: "", name: httpbin}
- {name: waypoint}
hostnames: [httpbin.example]
rules:
- matches:
  - path: {type: Exact, value: /status}
    headers: [{name: x-user, value: alice}, {name: x-v, type: RegularExpression, value: "v[12]"}]
    queryParams: [{name: debug, value: "1"}]
    method: get
  - path: {type: RegularExpression, value: "/items/[0-9]+"}
  backendRefs:
  - {name: v1, port: 8000}
  - {name: v2, namespace: demo, port: 8000, weight: 3}
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier:
      set: [{name: x-a, value: "1"}]
      add: [{name: x-b, value: "2"}]
      remove: [x-c]
  - type: ResponseHeaderModifier
    responseHeaderModifier: {remove: [server]}
  - type: RequestMirror
    requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}
  - type: RequestMirror
    requestMirror: {backendRef: {name: shadow, port: 81}, fraction: {numerator: 1, denominator: 8}}
  - type: URLRewrite
    urlRewrite: {hostname: internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
  timeouts: {request: 1h2m, backendRequest: 500ms}
  retry: {codes: [500, 503], attempts: 3, backoff: 100ms}
- filters:
  - type: RequestRedirect
    requestRedirect:
      scheme: https
      hostname: example.org
      port: 8443
      statusCode: 301
      path: {type: ReplaceFullPath, replaceFullPath: /moved}
"""


def test_http_route_with_every_feature() -> None:
    (route,), logs = translate_one(*BACKENDS, http_route(FULL_ROUTE))
    assert warnings(logs) == []
    assert route.parents == (key("httpbin"), l7.waypoint_key("demo", "waypoint"))
    assert route.hostnames == ("httpbin.example",)
    assert route.key == "demo/HTTPRoute/r"
    first, second = route.rules
    assert first.matches == (
        l7.RouteMatch(
            path=l7.PathMatch(l7.PathMatchType.EXACT, "/status"),
            headers=(l7.ValueMatch("x-user", "alice"),
                     l7.ValueMatch("x-v", "v[12]", l7.ValueMatchType.REGULAR_EXPRESSION)),
            query_params=(l7.ValueMatch("debug", "1"),),
            method="GET",
        ),
        l7.RouteMatch(path=l7.PathMatch(l7.PathMatchType.REGULAR_EXPRESSION, "/items/[0-9]+")),
    )
    assert first.backends == (l7.BackendRef(key("v1"), 8000, 1), l7.BackendRef(key("v2"), 8000, 3))
    assert first.request_headers == l7.HeaderModifier(set=(("x-a", "1"),), add=(("x-b", "2"),),
                                                      remove=("x-c",))
    assert first.response_headers == l7.HeaderModifier(remove=("server",))
    assert first.mirrors == (l7.RequestMirror(key("shadow"), 80, 25.0),
                             l7.RequestMirror(key("shadow"), 81, 12.5))
    assert first.rewrite == l7.UrlRewrite(
        "internal", l7.PathModifier(l7.PathModifierType.REPLACE_PREFIX_MATCH, "/v2"))
    assert (first.timeout, first.backend_timeout) == (3720.0, 0.5)
    assert first.retry == l7.RetryPolicy(
        attempts=3, retry_on=("connect-failure", "reset", "500", "503"), backoff_base=0.1,
        backoff_max=1.0)
    assert second.matches == (l7.RouteMatch(path=l7.PathMatch(l7.PathMatchType.PATH_PREFIX, "/")),)
    assert second.backends == ()
    assert second.redirect == l7.RequestRedirect(
        scheme="https", hostname="example.org", port=8443, status_code=301,
        path=l7.PathModifier(l7.PathModifierType.REPLACE_FULL_PATH, "/moved"))


def test_route_without_rules_gets_gateway_api_default_rule_and_zero_timeouts_mean_none() -> None:
    minimal = http_route("parentRefs: [{kind: Service, name: httpbin}]")
    (route,), _ = translate_one(*BACKENDS, minimal)
    assert route.rules == (l7.RouteRule(matches=(
        l7.RouteMatch(path=l7.PathMatch(l7.PathMatchType.PATH_PREFIX, "/")),)),)
    spec = """
    parentRefs: [{kind: Service, name: httpbin}]
    rules: [{timeouts: {request: 0s, backendRequest: 0ms}, retry: {attempts: 0}}]
    """
    (route,), _ = translate_one(*BACKENDS, http_route(spec))
    assert (route.rules[0].timeout, route.rules[0].backend_timeout) == (None, None)
    assert route.rules[0].retry == l7.RetryPolicy(attempts=0)


def test_parent_refs_to_missing_and_foreign_things() -> None:
    ingress = ("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
               "metadata: {name: ingress, namespace: demo}\nspec: {gatewayClassName: istio}")
    spec = """
    parentRefs:
    - {kind: Service, name: httpbin, port: 80, sectionName: http}
    - {kind: Service, name: ghost}
    - {name: missing-gateway}
    - {name: ingress}
    - {group: networking.istio.io, kind: ServiceEntry, name: ext}
    rules: [{backendRefs: [{name: httpbin, port: 80}]}]
    """
    (route,), logs = translate_one(*BACKENDS, ingress, http_route(spec))
    assert route.parents == (key("httpbin"),)
    assert sorted(w["parent"] for w in warnings(logs)) == [
        "demo/ghost", "demo/missing-gateway", "networking.istio.io/ServiceEntry demo/ext"]


def test_route_without_usable_parents_is_not_translated() -> None:
    found, logs = translate_one(*BACKENDS, http_route("parentRefs: [{kind: Service, name: x}]"))
    assert found == []
    assert warnings(logs)[-1] == {"event": "route has no usable parent; not translated",
                                  "route": "HTTPRoute demo/r", "log_level": "warning"}
    found, _ = translate_one(*BACKENDS, http_route("rules: [{}]"))
    assert found == []


def test_missing_backend_and_zero_weights_are_kept_and_logged() -> None:
    spec = """
    parentRefs: [{kind: Service, name: httpbin}]
    rules:
    - backendRefs: [{name: ghost, port: 80, weight: 0}, {name: v1, port: 80, weight: 0}]
    - backendRefs: [{kind: ServiceImport, group: multicluster.x-k8s.io, name: v1, port: 80},
                    {name: v2, port: 80}]
    """
    (route,), logs = translate_one(*BACKENDS, http_route(spec))
    assert route.rules[0].backends == (l7.BackendRef(key("ghost"), 80, 0),
                                       l7.BackendRef(key("v1"), 80, 0))
    assert route.rules[1].backends == (l7.BackendRef(key("v2"), 80, 1),)
    events = [w["event"] for w in warnings(logs)]
    assert events == [
        "backend Service not found; the waypoint answers 500 for its share",
        "every backend of the rule has weight 0; it answers 500",
        "backend kind not supported (Service only); backend dropped",
    ]


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"backendRefs": [{"name": "v1"}]}, "port is required"),
        ({"backendRefs": [{"name": "v1", "port": 80, "weight": -1}]}, "-1 is not a whole"),
        ({"timeouts": {"request": "ten seconds"}}, "timeouts.request: 'ten seconds' is not a"),
        ({"timeouts": {"backendRequest": "5x"}}, "timeouts.backendRequest"),
        ({"retry": {"backoff": "soon"}}, "retry.backoff"),
        ({"retry": {"codes": [42]}}, "retry.codes"),
        ({"matches": [{"path": {"type": "Glob", "value": "/*"}}]}, "path type 'Glob'"),
        ({"matches": [{"path": {"value": "no-slash"}}]}, "must start with /"),
        ({"matches": [{"path": {"type": "RegularExpression", "value": "("}}]},
         "invalid regular expression"),
        ({"matches": [{"headers": [{"name": "a", "value": "b", "type": "Prefix"}]}]},
         "match type 'Prefix'"),
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "x"}},
                      {"type": "RequestRedirect", "requestRedirect": {}}]},
         "cannot be combined"),
        ({"filters": [{"type": "RequestHeaderModifier"}, {"type": "RequestHeaderModifier"}]},
         "filter given twice"),
        ({"filters": [{"type": "RequestMirror", "requestMirror": {}}]}, "backendRef is required"),
        ({"filters": [{"type": "RequestMirror", "requestMirror": {
            "backendRef": {"name": "shadow", "port": 80}, "percent": 150}}]}, "within 0-100"),
        ({"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}}]},
         "not a redirect status"),
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "Regex"}}}]},
         "path type 'Regex'"),
    ],
)
def test_bad_routes_are_skipped_with_the_reason(rule: dict[str, Any], reason: str) -> None:
    bad = raw("HTTPRoute", {"parentRefs": [{"kind": "Service", "name": "httpbin"}],
                            "rules": [rule]}, name="bad")
    good = raw("HTTPRoute", {"parentRefs": [{"kind": "Service", "name": "httpbin"}]}, name="good")
    found, logs = translate_one(*BACKENDS, bad, good)
    assert [r.name for r in found] == ["good"]
    (warning,) = warnings(logs)
    assert warning["key"] == "demo/bad" and warning["event"] == "object not translated"
    assert reason in warning["reason"]


def test_unknown_filter_is_a_warning() -> None:
    spec = """
    parentRefs: [{kind: Service, name: httpbin}]
    rules: [{filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}]}]
    """
    (route,), logs = translate_one(*BACKENDS, http_route(spec))
    assert route.rules[0].request_headers is None
    assert warnings(logs)[0]["type"] == "ExtensionRef"


def test_creation_timestamp_parsed_by_yaml_is_rfc3339() -> None:
    route = http_route("parentRefs: [{kind: Service, name: httpbin}]").replace(
        "namespace: demo}", "namespace: demo, creationTimestamp: 2024-05-01T10:00:00Z}")
    (found,), _ = translate_one(*BACKENDS, route)
    assert found.created == "2024-05-01T10:00:00Z"


# -- TCPRoute --------------------------------------------------------------------------------


def test_tcp_route() -> None:
    route = ("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\n"
             "metadata: {name: db, namespace: demo}\nspec:\n"
             "  parentRefs: [{kind: Service, group: '', name: httpbin}]\n"
             "  rules: [{backendRefs: [{name: v1, port: 5432, weight: 80}, "
             "{name: v2, port: 5432, weight: 20}]}]")
    (found,), logs = translate_one(*BACKENDS, route)
    assert warnings(logs) == []
    assert found == l7.TcpRoute("db", "demo", (key("httpbin"),), (
        l7.BackendRef(key("v1"), 5432, 80), l7.BackendRef(key("v2"), 5432, 20)))
    bad = raw("TCPRoute", {"parentRefs": [{"kind": "Service", "name": "httpbin"}],
                           "rules": [{"backendRefs": [{"name": "v1"}]}]},
              api="gateway.networking.k8s.io/v1alpha2")
    found, logs = translate_one(*BACKENDS, bad)
    assert found == [] and "port is required" in warnings(logs)[0]["reason"]


# -- VirtualService --------------------------------------------------------------------------

VIRTUAL_SERVICE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: demo}
spec:
  hosts: [httpbin, v1.demo, v2.demo.svc.cluster.local, api.example.com]
  http:
  - match:
    - uri: {prefix: /api}
      headers: {end-user: {exact: jason}, x-v: {regex: "v[0-9]"}, x-p: {prefix: ab}}
      method: {exact: post}
      queryParams: {debug: {exact: "1"}}
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 50}}
      abort: {httpStatus: 500, percentage: {value: 10.5}}
    route:
    - destination: {host: v1, port: {number: 9080}}
      weight: 75
    - destination: {host: v2.demo.svc.cluster.local, port: {number: 9080}}
      weight: 25
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error, connect-failure,503"}
    timeout: 10s
    mirror: {host: shadow}
    mirrorPercentage: {value: 5}
    rewrite: {uri: /v1/api, authority: internal}
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {remove: [server]}
  - redirect: {uri: /new, authority: example.org}
"""


def test_virtual_service_subset() -> None:
    (route,), logs = translate_one(*BACKENDS, VIRTUAL_SERVICE)
    assert [w["host"] for w in warnings(logs)] == ["api.example.com"]
    assert route.source_kind == "VirtualService"
    assert route.key == "demo/VirtualService/ratings"
    assert route.parents == (key("httpbin"), key("v1"), key("v2"))
    first, second = route.rules
    assert first.matches == (l7.RouteMatch(
        path=l7.PathMatch(l7.PathMatchType.PATH_PREFIX, "/api"),
        headers=(l7.ValueMatch("end-user", "jason"),
                 l7.ValueMatch("x-v", "v[0-9]", l7.ValueMatchType.REGULAR_EXPRESSION),
                 l7.ValueMatch("x-p", "ab", l7.ValueMatchType.PREFIX)),
        query_params=(l7.ValueMatch("debug", "1"),),
        method="POST"),)
    assert first.backends == (l7.BackendRef(key("v1"), 9080, 75),
                              l7.BackendRef(key("v2"), 9080, 25))
    assert first.fault == l7.FaultInjection(delay_seconds=7.0, delay_percent=50.0,
                                            abort_status=500, abort_percent=10.5)
    assert first.retry == l7.RetryPolicy(attempts=3, per_try_timeout=2.0,
                                         retry_on=("gateway-error", "connect-failure", "503"))
    assert first.timeout == 10.0
    assert first.mirrors == (l7.RequestMirror(key("shadow"), 80, 5.0),)  # the one Service port
    assert first.rewrite == l7.UrlRewrite(
        "internal", l7.PathModifier(l7.PathModifierType.REPLACE_PREFIX_MATCH, "/v1/api"))
    assert first.request_headers == l7.HeaderModifier(set=(("x-a", "1"),), add=(("x-b", "2"),),
                                                      remove=("x-c",))
    assert first.response_headers == l7.HeaderModifier(remove=("server",))
    assert second.matches == (l7.RouteMatch(),)
    assert second.redirect == l7.RequestRedirect(
        hostname="example.org", status_code=301,
        path=l7.PathModifier(l7.PathModifierType.REPLACE_FULL_PATH, "/new"))


def vs(http: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return raw("VirtualService", {"hosts": ["httpbin"], "http": http, **spec}, name="vs",
               api="networking.istio.io/v1beta1")


def test_virtual_service_defaults_and_warnings() -> None:
    exact_rewrite = {
        "match": [{"uri": {"exact": "/a"}, "sourceLabels": {"app": "x"}}],
        "route": [{"destination": {"host": "v1", "subset": "canary"}},
                  {"destination": {"host": "v2"}}],
        "rewrite": {"uri": "/b"},
        "corsPolicy": {},
        "retries": {"attempts": 0},
    }
    (route,), logs = translate_one(*BACKENDS, vs([exact_rewrite], exportTo=["."], tcp=[{}]))
    rule = route.rules[0]
    assert rule.backends == (l7.BackendRef(key("v1"), 80, 1), l7.BackendRef(key("v2"), 80, 1))
    assert rule.rewrite == l7.UrlRewrite(
        None, l7.PathModifier(l7.PathModifierType.REPLACE_FULL_PATH, "/b"))
    assert rule.retry == l7.RetryPolicy(attempts=0)
    fields = sorted(str(w.get("field") or w.get("subset")) for w in warnings(logs))
    assert fields == ["canary", "corsPolicy", "sourceLabels", "tcp"]


def test_virtual_service_for_gateways_only_is_not_for_waypoints() -> None:
    found, logs = translate_one(*BACKENDS, vs([{"route": [{"destination": {"host": "v1"}}]}],
                                              gateways=["istio-system/ingress"]))
    assert found == [] and warnings(logs) == []


@pytest.mark.parametrize(
    ("http", "reason"),
    [
        ({}, "needs a route or a redirect"),
        ({"route": [{"destination": {"host": "v1"}}], "redirect": {"uri": "/x"}},
         "cannot be combined"),
        ({"route": [{"destination": {"host": "nowhere.example.com"}}]}, "not a cluster Service"),
        ({"route": [{"destination": {"host": "two-ports"}}]}, "needs port.number"),
        ({"route": [{"destination": {"host": "v1"}}], "timeout": "forever"}, "timeout"),
        ({"route": [{"destination": {"host": "v1"}}], "fault": {"delay": {"percentage":
                                                                          {"value": 5}}}},
         "fixedDelay is required"),
        ({"route": [{"destination": {"host": "v1"}}], "fault": {"abort": {"grpcStatus": "X"}}},
         "httpStatus is required"),
        ({"route": [{"destination": {"host": "v1"}}], "fault": {"abort": {"httpStatus": 500,
                                                                          "percentage":
                                                                          {"value": 101}}}},
         "not within 0-100"),
        ({"route": [{"destination": {"host": "v1"}}], "match": [{"uri": {"glob": "/x"}}]},
         "match kind 'glob'"),
        ({"route": [{"destination": {"host": "v1"}}], "match": [{"method": {"prefix": "P"}}]},
         "only exact"),
        ({"redirect": {"uri": "/x", "redirectCode": 200}}, "not a redirect status"),
        ({"route": [{"destination": {"host": "v1"}}],
          "retries": {"attempts": 2, "perTryTimeout": "x"}}, "perTryTimeout"),
    ],
)
def test_bad_virtual_services_are_skipped(http: dict[str, Any], reason: str) -> None:
    found, logs = translate_one(*BACKENDS, svc("two-ports", ports="[{port: 80}, {port: 81}]"),
                                vs([http]))
    assert found == []
    assert reason in [w for w in warnings(logs) if w["event"] == "object not translated"][0][
        "reason"]


def test_virtual_service_without_cluster_hosts_is_skipped() -> None:
    found, logs = translate_one(*BACKENDS, vs([{"route": [{"destination": {"host": "v1"}}]}],
                                              hosts=["*.example.com"]))
    assert found == []
    assert warnings(logs)[-1]["event"] == "VirtualService has no usable host; not translated"


# -- DestinationRule -------------------------------------------------------------------------

DESTINATION_RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: demo}
spec:
  host: httpbin.demo.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 30ms}
      http: {http1MaxPendingRequests: 2, http2MaxRequests: 3, maxRequestsPerConnection: 4}
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 3
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
    loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
"""


def test_destination_rule() -> None:
    (policy,), logs = translate_one(*BACKENDS, DESTINATION_RULE)
    assert policy == l7.TrafficPolicy(
        name="httpbin", namespace="demo", host=key("httpbin"),
        connection_pool=l7.ConnectionPool(1, 2, 3, 4),
        outlier_detection=l7.OutlierDetection(consecutive_5xx=3, interval=1.0,
                                              base_ejection_time=180.0, max_ejection_percent=100),
    )
    assert sorted(str(w["field"]) for w in warnings(logs)) == [
        "subsets", "tcp.connectTimeout", "trafficPolicy.loadBalancer"]


def test_destination_rule_defaults_and_bad_input() -> None:
    def rule(host: str, policy: dict[str, Any], name: str = "dr") -> dict[str, Any]:
        return raw("DestinationRule", {"host": host, "trafficPolicy": policy}, name=name,
                   api="networking.istio.io/v1alpha3")

    found, logs = translate_one(
        *BACKENDS,
        rule("httpbin", {"outlierDetection": {"consecutiveGatewayErrors": 2}}, "a"),
        rule("v1", {"outlierDetection": {"consecutive5xxErrors": 0}}, "b"),
        rule("api.example.com", {"connectionPool": {"tcp": {"maxConnections": 1}}}, "c"),
        rule("v2", {"outlierDetection": {"interval": "often"}}, "d"),
        rule("v2", {"connectionPool": {"http": {"http2MaxRequests": 0}}}, "e"),
    )
    assert found == [l7.TrafficPolicy("a", "demo", key("httpbin"), None,
                                      l7.OutlierDetection(consecutive_5xx=2))]
    reasons = [str(w.get("reason") or w.get("host")) for w in warnings(logs)]
    assert reasons[0] == "api.example.com"
    assert "outlierDetection.interval" in reasons[1]
    assert "http2MaxRequests" in reasons[2]


# -- LocalRateLimit --------------------------------------------------------------------------

RATE_LIMIT = """
apiVersion: policy.ambient-lite.io/v1alpha1
kind: LocalRateLimit
metadata: {name: rl, namespace: demo}
spec:
  targetRefs:
  - {kind: Service, group: "", name: httpbin}
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  tokenBucket: {maxTokens: 10, tokensPerFill: 5, fillInterval: 1s}
"""


def test_local_rate_limit() -> None:
    (limit,), logs = translate_one(*BACKENDS, RATE_LIMIT)
    assert warnings(logs) == []
    assert limit == l7.RateLimit("rl", "demo", (key("httpbin"), "waypoint:demo/waypoint"),
                                 10, 5, 1.0)
    (limit,), logs = translate_one(svc("httpbin"), RATE_LIMIT)
    assert [w["target"] for w in warnings(logs)] == ["waypoint"]  # no such waypoint: logged


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tokenBucket: {maxTokens: 1, tokensPerFill: 1, fillInterval: 1s}", "targetRefs must"),
        ("targetRefs: [{kind: Pod, name: x}]\ntokenBucket: {maxTokens: 1, tokensPerFill: 1, "
         "fillInterval: 1s}", "kind 'Pod' is not Service or Gateway"),
        ("targetRefs: [{kind: Service, name: x}]", "spec.tokenBucket is missing"),
        ("targetRefs: [{kind: Service, name: x}]\ntokenBucket: {maxTokens: 0, tokensPerFill: 1, "
         "fillInterval: 1s}", "maxTokens: 0 is not a whole number >= 1"),
        ("targetRefs: [{kind: Service, name: x}]\ntokenBucket: {maxTokens: 1, tokensPerFill: 1, "
         "fillInterval: soon}", "fillInterval: 'soon' is not a duration"),
    ],
)
def test_invalid_rate_limits_are_rejected(spec: str, message: str) -> None:
    document = RATE_LIMIT.split("spec:")[0] + "spec:\n" + textwrap.indent(spec, "  ")
    with pytest.raises(InvalidObject) as raised:
        parse_documents(document, "rl.yaml")
    assert message in str(raised.value) and "LocalRateLimit demo/rl" in str(raised.value)


# -- parsing and ordering --------------------------------------------------------------------


def test_new_kinds_are_read_into_their_fields() -> None:
    request_authentication = (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: demo}\nspec:\n"
        "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n"
        "  jwtRules: [{issuer: https://issuer.example, audiences: [a], "
        "fromHeaders: [{name: x-jwt, prefix: 'Bearer '}], forwardOriginalToken: true}]"
    )
    tcp = ("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\n"
           "metadata: {name: t, namespace: demo}\nspec: {}")
    cluster = objects(VIRTUAL_SERVICE, DESTINATION_RULE, RATE_LIMIT, request_authentication, tcp)
    assert list(cluster.virtual_services) == ["demo/ratings"]
    assert list(cluster.destination_rules) == ["demo/httpbin"]
    assert list(cluster.local_rate_limits) == ["demo/rl"]
    assert list(cluster.request_authentications) == ["demo/jwt"]
    assert list(cluster.tcproutes) == ["demo/t"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
         "metadata: {name: j, namespace: demo}\nspec: {jwtRules: [{audiences: [a]}]}",
         "spec.jwtRules[0].issuer must be a non-empty string"),
        ("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
         "metadata: {name: j, namespace: demo}\nspec: {targetRefs: [{name: w}]}",
         "spec.targetRefs[0].kind must be a non-empty string"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
         "metadata: {name: d, namespace: demo}\nspec: {}", "spec.host must be"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
         "metadata: {name: v, namespace: demo}\nspec: {http: [{route: [{weight: 1}]}]}",
         "spec.http[0].route[0].destination.host must be"),
        (http_route("parentRefs: [{kind: Service}]"), "spec.parentRefs[0].name must be"),
        (http_route("rules: [{backendRefs: [{name: a, port: 80, weight: -1}]}]"),
         "spec.rules[0].backendRefs[0].weight: -1 is not a whole number >= 0"),
        (http_route("rules: [{backendRefs: [{name: a, port: 70000}]}]"),
         "spec.rules[0].backendRefs[0].port: 70000 is not a port number"),
        (http_route("rules: [{timeouts: {request: 10}}]"),
         "spec.rules[0].timeouts.request must be a string"),
    ],
)
def test_malformed_shapes_are_file_errors(document: str, message: str) -> None:
    with pytest.raises(InvalidObject) as raised:
        parse_documents(document, "f.yaml")
    assert message in str(raised.value)


def test_route_resources_are_sorted_by_kind_then_key() -> None:
    found, _ = translate_one(*BACKENDS, RATE_LIMIT, DESTINATION_RULE, VIRTUAL_SERVICE,
                             http_route("parentRefs: [{kind: Service, name: httpbin}]", "z"),
                             http_route("parentRefs: [{kind: Service, name: httpbin}]", "a"))
    assert [(type(r).__name__, r.key) for r in found] == [
        ("HttpRoute", "demo/HTTPRoute/a"),
        ("HttpRoute", "demo/HTTPRoute/z"),
        ("HttpRoute", "demo/VirtualService/ratings"),
        ("RateLimit", "demo/rl"),
        ("TrafficPolicy", "demo/httpbin"),
    ]


def test_virtual_service_destination_to_a_missing_service_is_kept_and_logged() -> None:
    (route,), logs = translate_one(
        *BACKENDS, vs([{"route": [{"destination": {"host": "ghost", "port": {"number": 80}}}]}])
    )
    assert route.rules[0].backends == (l7.BackendRef(key("ghost"), 80, 1),)
    assert [w["host"] for w in warnings(logs)] == ["ghost"]
