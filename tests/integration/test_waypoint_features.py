"""The waypoint's L7 features end to end, each added live as Istio users write it and proved
through the real path: sleep -> ztunnel (node-1) -> HBONE -> waypoint -> HBONE -> ztunnel ->
app. Timeouts, Gateway API's error statuses, redirects and rewrites, header filters, circuit
breaking, outlier detection, TCPRoute splits and trace propagation to an OTLP collector.

Every test ends with a normal request through the waypoint: a feature's failure responses
must never cost the waypoint its health.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import trio
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from ambientctl.apps import http_request
from tests.conftest import LoopbackAllocator
from tests.integration.mesh_harness import (
    BOOKINFO_PORT,
    NODE_2,
    REVIEWS_VIP,
    SLEEP,
    Mesh,
    config_dump,
    fetch_metrics,
    fetch_waypoint_metrics,
    metric_samples,
    start_mesh,
    start_pod_apps,
    start_waypoint_with,
    wait_for_config,
)
from tests.integration.test_waypoint_tracing import OTLP_PORT, running_collector

pytestmark = pytest.mark.slow

Response = tuple[int, dict[str, str], bytes]
REVIEWS_PARENT = """
  parentRefs:
    - group: ""
      kind: Service
      name: reviews
      port: 9080
"""
_REQUESTS_TOTAL = re.compile(r"^istio_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


async def call(
    mesh: Mesh, vip: str, host: str, path: str, headers: tuple[tuple[str, str], ...] = (),
) -> Response:
    """One request from sleep on its own connection (SOCKS5 via node-1's ztunnel)."""
    stream = await mesh.connect(SLEEP, vip, BOOKINFO_PORT)
    async with stream:
        return await http_request(stream, "GET", host, path, headers=headers)


def waypoint_address(mesh: Mesh) -> str:
    assert mesh.waypoint is not None, "no waypoint started"
    return mesh.waypoint.config.address


async def assert_still_serving(mesh: Mesh) -> None:
    status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/reviews/1")
    assert status == 200, body
    assert json.loads(body)["pod"] in ("reviews-v1", "reviews-v2")


async def waypoint_outcomes(mesh: Mesh, service_name: str) -> Counter[tuple[str, str]]:
    """(response_code, response_flags) -> requests, from the waypoint's istio_requests_total
    for one destination service."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in (await fetch_waypoint_metrics(mesh)).splitlines():
        found = _REQUESTS_TOTAL.match(line)
        if found is None:
            continue
        labels = dict(_LABEL.findall(found["labels"]))
        if labels.get("destination_service_name") == service_name:
            key = (labels["response_code"], labels["response_flags"])
            counts[key] += int(float(found["value"]))
    return counts


def new_service(name: str, vip: str, selector: str, *, port_lines: str = "") -> str:
    """A Service that uses the demo waypoint."""
    ports = port_lines or """
    - name: http
      port: 9080
      targetPort: 9080
      appProtocol: http"""
    return f"""
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: demo
  labels:
    istio.io/use-waypoint: waypoint
spec:
  clusterIP: {vip}
  clusterIPs: [{vip}]
  selector: {selector}
  ports:{ports}
"""


def new_pod(
    name: str, ip: str, labels: str, *, port_name: str, port: int,
    service_account: str, annotations: str = "{}",
) -> str:
    """A Running pod on node-2 whose app the test starts itself (``start_pod_apps``)."""
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels: {labels}
  annotations: {annotations}
spec:
  nodeName: node-2
  serviceAccountName: {service_account}
  containers:
    - name: app
      image: docker.io/kennethreitz/httpbin:latest
      ports:
        - name: {port_name}
          containerPort: {port}
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions:
    - type: Ready
      status: "True"
"""


# -- 1. timeouts ------------------------------------------------------------------------------


async def test_request_and_per_try_timeouts(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    # /slow/<s> and /per-try/<s> reach the echo as /delay/<s> (it answers after <s> seconds).
    mesh.write_config_file("60-timeouts.yaml", f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews-timeouts
  namespace: demo
spec:{REVIEWS_PARENT}
  rules:
    - matches:
        - path: {{type: PathPrefix, value: /slow}}
      filters:
        - type: URLRewrite
          urlRewrite:
            path: {{type: ReplacePrefixMatch, replacePrefixMatch: /delay}}
      timeouts:
        request: 200ms
      backendRefs:
        - name: reviews-v1
          port: 9080
    - matches:
        - path: {{type: PathPrefix, value: /per-try}}
      filters:
        - type: URLRewrite
          urlRewrite:
            path: {{type: ReplacePrefixMatch, replacePrefixMatch: /delay}}
      timeouts:
        request: 5s
        backendRequest: 200ms
      retry:
        attempts: 1
        backoff: 10ms
      backendRefs:
        - name: reviews-v1
          port: 9080
""")
    await wait_for_config(mesh, l7={"httproute": ["reviews-timeouts"]})

    # The waypoint's own timeout answers (its body and, below, its UT flag), not the app.
    status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/slow/1")
    assert status == 504 and b"upstream request timeout" in body
    # The rewritten path is what the app gets: a fast one passes within the same timeout.
    status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/slow/0")
    assert status == 200 and json.loads(body)["path"] == "/delay/0"

    # Per try: the first try times out after 200 ms, the one retry as well, then 504 (the
    # UT,URX outcome below: timed out and out of retries).
    status, _headers, _body = await call(mesh, REVIEWS_VIP, "reviews", "/per-try/1")
    assert status == 504

    outcomes = await waypoint_outcomes(mesh, "reviews-v1")
    timed_out = {flags: n for (code, flags), n in outcomes.items() if code == "504"}
    assert sum(timed_out.values()) == 2, outcomes
    # The request timeout is UT; the per-try timeouts used up the retry as well (Envoy's
    # order: UT before URX).
    assert timed_out == {"UT": 1, "UT,URX": 1}, outcomes
    assert outcomes[("200", "-")] == 1, outcomes
    await assert_still_serving(mesh)


# -- 2. Gateway API's error statuses ---------------------------------------------------------


async def test_zero_weights_missing_backend_and_no_route(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    exact_vip = loopback.new()
    mesh.write_config_file("60-broken.yaml", f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews-broken
  namespace: demo
spec:{REVIEWS_PARENT}
  rules:
    - matches:
        - path: {{type: PathPrefix, value: /zero}}
      backendRefs:
        - {{name: reviews-v1, port: 9080, weight: 0}}
        - {{name: reviews-v2, port: 9080, weight: 0}}
    - matches:
        - path: {{type: PathPrefix, value: /missing}}
      backendRefs:
        - {{name: no-such-service, port: 9080}}
---
{new_service("exact-only", exact_vip, "{app: reviews}")}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: exact-only
  namespace: demo
spec:
  parentRefs:
    - {{group: "", kind: Service, name: exact-only, port: 9080}}
  rules:
    - matches:
        - path: {{type: Exact, value: /only}}
      backendRefs:
        - {{name: reviews-v1, port: 9080}}
""")
    await wait_for_config(
        mesh, l7={"httproute": ["reviews-broken", "exact-only"]}, services=["exact-only"])

    status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/zero")
    assert status == 500 and b"weight above zero" in body
    status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/missing/1")
    assert status == 500 and b"does not exist" in body

    status, _headers, body = await call(mesh, exact_vip, "exact-only", "/only")
    assert status == 200 and json.loads(body)["pod"] == "reviews-v1"
    for path in ("/only/more", "/other", "/"):
        status, _headers, body = await call(mesh, exact_vip, "exact-only", path)
        assert status == 404 and b"no route matched" in body, path
    assert (await waypoint_outcomes(mesh, "exact-only"))[("404", "NR")] == 3
    await assert_still_serving(mesh)


# -- 3 and 4. redirects, rewrites and header filters -------------------------------------------


async def test_redirect_rewrite_and_header_filters(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    mesh.write_config_file("60-filters.yaml", f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews-filters
  namespace: demo
spec:{REVIEWS_PARENT}
  rules:
    - matches:
        - path: {{type: PathPrefix, value: /old}}
      filters:
        - type: RequestRedirect
          requestRedirect:
            hostname: ratings.example.com
            path: {{type: ReplaceFullPath, replaceFullPath: /new}}
            statusCode: 301
    - matches:
        - path: {{type: PathPrefix, value: /v2}}
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: reviews.internal
            path: {{type: ReplacePrefixMatch, replacePrefixMatch: /api}}
      backendRefs:
        - {{name: reviews-v2, port: 9080}}
    - matches:
        - path: {{type: PathPrefix, value: /headers}}
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{{name: x-set, value: by-waypoint}}]
            add: [{{name: x-add, value: added}}]
            remove: [x-remove]
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{{name: content-type, value: application/json; charset=utf-8}}]
            add: [{{name: x-response-add, value: added}}]
            remove: [server]
      backendRefs:
        - {{name: reviews-v1, port: 9080}}
""")
    await wait_for_config(mesh, l7={"httproute": ["reviews-filters"]})

    status, headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/old/page?q=1")
    assert status == 301, body
    assert headers["location"] == "http://ratings.example.com:9080/new?q=1"

    status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/v2/items?q=1")
    seen = json.loads(body)
    assert status == 200 and seen["pod"] == "reviews-v2"
    assert seen["path"] == "/api/items?q=1"
    assert seen["headers"]["host"] == "reviews.internal"
    # /v2 is a path prefix by segment: /v2x is not rewritten (and goes the default way).
    status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/v2x")
    assert status == 200 and json.loads(body)["path"] == "/v2x"

    status, headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/headers", (
        ("x-set", "from-client"), ("x-add", "from-client"), ("x-remove", "secret"),
    ))
    assert status == 200
    seen_headers = json.loads(body)["headers"]
    assert seen_headers["x-set"] == "by-waypoint"
    assert seen_headers["x-add"] == "from-client, added"
    assert "x-remove" not in seen_headers
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-response-add"] == "added"
    assert "server" not in headers
    # Without the filter the app's own headers come through untouched.
    _status, headers, _body = await call(mesh, REVIEWS_VIP, "reviews", "/plain")
    assert headers["server"] == "ambient-lite-echo" and "x-response-add" not in headers
    await assert_still_serving(mesh)


# -- 5. circuit breaking ---------------------------------------------------------------------


async def test_circuit_breaker_overflows_with_uo_and_recovers(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    vip = loopback.new()
    mesh.write_config_file("60-limited.yaml", f"""
{new_service("reviews-limited", vip, "{app: reviews, version: v1}")}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews-limited
  namespace: demo
spec:
  host: reviews-limited.demo.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        http2MaxRequests: 1
""")
    await wait_for_config(
        mesh, l7={"trafficpolicy": ["reviews-limited"]}, services=["reviews-limited"])

    results: list[Response] = []

    async def slow_call() -> None:
        results.append(await call(mesh, vip, "reviews-limited", "/delay/1"))

    async with trio.open_nursery() as burst:
        for _ in range(5):
            burst.start_soon(slow_call)
    statuses = Counter(status for status, _headers, _body in results)
    assert statuses == Counter({200: 1, 503: 4}), statuses
    assert all(b"overflow" in body for status, _h, body in results if status == 503)
    outcomes = await waypoint_outcomes(mesh, "reviews-limited")
    assert outcomes == Counter({("200", "-"): 1, ("503", "UO"): 4}), outcomes
    breaker = (await config_dump(waypoint_address(mesh)))["resilience"][
        "demo/reviews-limited.demo.svc.cluster.local"]["circuit_breaker"]
    assert breaker["overflows"]["max_requests"] == 4
    assert breaker["dispatched_requests"] == 0 and breaker["pending_requests"] == 0

    # The burst is over: requests one after another pass again.
    for _ in range(3):
        status, _headers, _body = await call(mesh, vip, "reviews-limited", "/after")
        assert status == 200
    await assert_still_serving(mesh)


# -- 6. outlier detection --------------------------------------------------------------------


async def test_outlier_detection_ejects_the_failing_endpoint(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    vip, good_ip, bad_ip = loopback.new(), loopback.new(), loopback.new()
    pods = "\n---\n".join([
        new_pod("flaky-good", good_ip, "{app: flaky}", port_name="http", port=9080,
                service_account="bookinfo-ratings"),
        new_pod("flaky-bad", bad_ip, "{app: flaky}", port_name="http", port=9080,
                service_account="bookinfo-ratings",
                annotations='{ambient-lite.io/fail-every: "1"}'),  # every request is a 503
    ])
    layout = await start_pod_apps(mesh, nursery, pods)
    assert {(a.pod, a.fail_every) for a in layout.apps} == {("flaky-good", 0), ("flaky-bad", 1)}
    mesh.write_config_file("60-flaky.yaml", f"""
{pods}
---
{new_service("flaky", vip, "{app: flaky}")}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: flaky
  namespace: demo
spec:
  parentRefs:
    - {{group: "", kind: Service, name: flaky, port: 9080}}
  rules:
    - retry:
        attempts: 0
      backendRefs:
        - {{name: flaky, port: 9080}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: flaky
  namespace: demo
spec:
  host: flaky
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 30s
      maxEjectionPercent: 100
""")
    await wait_for_config(
        mesh, l7={"httproute": ["flaky"], "trafficpolicy": ["flaky"]}, services=["flaky"],
        workloads=["flaky-good", "flaky-bad"], listening=[good_ip, bad_ip],
    )

    # Round robin over both: the bad pod fails twice in the first four requests (no retry
    # hides it), is ejected, and from then on only the good one answers.
    first = [await call(mesh, vip, "flaky", f"/first/{i}") for i in range(4)]
    assert Counter(status for status, _h, _b in first) == Counter({200: 2, 503: 2})
    assert {json.loads(body)["pod"] for status, _h, body in first if status == 503} == {
        "flaky-bad"}
    later = [await call(mesh, vip, "flaky", f"/later/{i}") for i in range(10)]
    assert [status for status, _h, _b in later] == [200] * 10
    assert {json.loads(body)["pod"] for _s, _h, body in later} == {"flaky-good"}

    [ejection] = (await config_dump(waypoint_address(mesh)))["resilience"][
        "demo/flaky.demo.svc.cluster.local"]["ejected"]
    assert "Pod/demo/flaky-bad" in ejection
    await assert_still_serving(mesh)


# -- 7. TCP through the waypoint --------------------------------------------------------------


async def echo_round_trip(mesh: Mesh, vip: str, port: int, payload: bytes) -> bytes:
    """Send ``payload`` then half-close while reading; what came back before the echo's EOF."""
    stream = await mesh.connect(SLEEP, vip, port)
    received = bytearray()
    async with stream:

        async def send_then_eof() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        with trio.fail_after(10):
            async with trio.open_nursery() as both_ways:
                both_ways.start_soon(send_then_eof)
                while chunk := await stream.receive_some(65536):
                    received += chunk
    return bytes(received)


async def test_tcp_route_splits_connections_between_backends(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    vip, vip_a, vip_b, ip_a, ip_b, vip_zero, vip_missing = (loopback.new() for _ in range(7))
    pods = "\n---\n".join(
        new_pod(f"tcp-echo-{v}", ip, f"{{app: tcp-echo, version: {v}}}", port_name="tcp-echo",
                port=9000, service_account="bookinfo-reviews")
        for v, ip in (("a", ip_a), ("b", ip_b))
    )
    layout = await start_pod_apps(mesh, nursery, pods)
    assert {a.kind for a in layout.apps} == {"tcp"}
    tcp_port = """
    - name: tcp-echo
      port: 9000
      targetPort: 9000
      appProtocol: tcp"""
    mesh.write_config_file("60-tcp.yaml", f"""
{pods}
---
{new_service("tcp-echo", vip, "{app: tcp-echo}", port_lines=tcp_port)}
---
{new_service("tcp-echo-a", vip_a, "{app: tcp-echo, version: a}", port_lines=tcp_port)}
---
{new_service("tcp-echo-b", vip_b, "{app: tcp-echo, version: b}", port_lines=tcp_port)}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-echo-split
  namespace: demo
spec:
  parentRefs:
    - {{group: "", kind: Service, name: tcp-echo, port: 9000}}
  rules:
    - backendRefs:
        - {{name: tcp-echo-a, port: 9000, weight: 50}}
        - {{name: tcp-echo-b, port: 9000, weight: 50}}
---
{new_service("tcp-zero", vip_zero, "{app: tcp-echo}", port_lines=tcp_port)}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-zero
  namespace: demo
spec:
  parentRefs:
    - {{group: "", kind: Service, name: tcp-zero, port: 9000}}
  rules:
    - backendRefs:
        - {{name: tcp-echo-a, port: 9000, weight: 0}}
---
{new_service("tcp-missing", vip_missing, "{app: tcp-echo}", port_lines=tcp_port)}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-missing
  namespace: demo
spec:
  parentRefs:
    - {{group: "", kind: Service, name: tcp-missing, port: 9000}}
  rules:
    - backendRefs:
        - {{name: no-such-service, port: 9000}}
""")
    await wait_for_config(
        mesh, l7={"tcproute": ["tcp-echo-split", "tcp-zero", "tcp-missing"]},
        services=["tcp-echo", "tcp-echo-a", "tcp-echo-b", "tcp-zero", "tcp-missing"],
        workloads=["tcp-echo-a", "tcp-echo-b"], listening=[ip_a, ip_b],
    )

    connections = 20
    for i in range(connections):
        # Larger than the socket buffers: the echo streams back while we still send.
        payload = bytes([i]) * 300_000 + b"end"
        assert await echo_round_trip(mesh, vip, 9000, payload) == payload

    def opened(metrics: str, pod: str) -> float:
        return sum(metric_samples(
            metrics, "istio_tcp_connections_opened_total", reporter="destination",
            destination_workload=pod,
            source_principal="spiffe://cluster.local/ns/demo/sa/waypoint",
        ))

    # Each connection ends at the destination ztunnel after the echo's EOF; wait for its count.
    with trio.fail_after(5):
        while True:
            metrics = await fetch_metrics(mesh, NODE_2)
            per_backend = {pod: opened(metrics, pod) for pod in ("tcp-echo-a", "tcp-echo-b")}
            if sum(per_backend.values()) >= connections:
                break
            await trio.sleep(0.05)
    assert sum(per_backend.values()) == connections, per_backend
    # 50/50 over 20 connections: one backend getting none has probability 2 * 2**-20.
    assert all(count >= 1 for count in per_backend.values()), per_backend

    # Gateway API: a backend of weight 0 takes no connection, and a missing backend's share is
    # refused; neither falls back to the parent Service's own pods (which would echo).
    for refused_vip in (vip_zero, vip_missing):
        answer = b""
        try:  # refused: an EOF, or a reset that fails the send (inside the nursery's group)
            answer = await echo_round_trip(mesh, refused_vip, 9000, b"anyone there?")
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        assert answer == b"", refused_vip
    metrics = await fetch_metrics(mesh, NODE_2)
    assert sum(opened(metrics, pod) for pod in ("tcp-echo-a", "tcp-echo-b")) == connections
    await assert_still_serving(mesh)


# -- 8. tracing ------------------------------------------------------------------------------


async def test_trace_context_reaches_the_app_and_the_collector(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback)
    collector_host = loopback.new()
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with running_collector(collector_host) as collector:
        waypoint = await start_waypoint_with(
            mesh, nursery, otlp_endpoint=f"http://{collector_host}:{OTLP_PORT}")
        status, _headers, body = await call(mesh, REVIEWS_VIP, "reviews", "/traced", (
            ("traceparent", f"00-{trace_id}-{parent_id}-01"), ("tracestate", "vendor=1"),
        ))
        assert status == 200
        seen = json.loads(body)["headers"]
        version, seen_trace, seen_parent, seen_flags = seen["traceparent"].split("-")
        assert (version, seen_trace, seen_flags) == ("00", trace_id, "01")
        assert seen_parent != parent_id and re.fullmatch("[0-9a-f]{16}", seen_parent)
        assert seen["tracestate"] == "vendor=1"

        assert await trio.to_thread.run_sync(waypoint.tracer.force_flush, 5000)
        with trio.fail_after(5):
            await collector.received.wait()
        [(resource, span)] = [
            (resource, span) for resource, span in collector.spans()
            if span.trace_id.hex() == trace_id
        ]
    assert resource["service.name"] == "waypoint.demo"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.parent_span_id.hex() == parent_id
    # The app's parent is the waypoint's span: one trace, joined hop by hop.
    assert span.span_id.hex() == seen_parent
    await assert_still_serving(mesh)
