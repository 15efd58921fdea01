"""Waypoint telemetry: Istio's HTTP series and labels, W3C trace context, span contents and the
access-log line."""

from __future__ import annotations

import dataclasses
import random

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from ambient_api.identity import SpiffeId
from ambient_api.model import NetworkAddress, Service, TunnelProtocol, Workload
from waypoint.telemetry import (
    ENVOY_DEFAULT_BUCKETS,
    REQUEST_LABEL_NAMES,
    RequestLabels,
    TraceContext,
    Tracer,
    WaypointMetrics,
    access_log,
    child_context,
    format_traceparent,
    incoming_context,
    otlp_traces_url,
    parse_traceparent,
    parse_tracestate,
    request_labels,
    span_attributes,
    span_name,
)

SLEEP = Workload(
    uid="Kubernetes//Pod/default/sleep-1",
    name="sleep-1",
    namespace="default",
    addresses=("127.0.20.1",),
    service_account="sleep",
    node="node-1",
    canonical_name="sleep",
    canonical_revision="v1",
    workload_name="sleep",
)
REVIEWS_V2 = Workload(
    uid="Kubernetes//Pod/apps/reviews-v2-1",
    name="reviews-v2-1",
    namespace="apps",
    addresses=("127.0.20.2",),
    service_account="reviews",
    node="node-2",
    cluster_id="east",
    canonical_name="reviews",
    canonical_revision="v2",
    workload_name="reviews-v2",
)
REVIEWS = Service(
    name="reviews",
    namespace="apps",
    hostname="reviews.apps.svc.cluster.local",
    addresses=(NetworkAddress("", "10.0.0.7"),),
)
SLEEP_ID = SpiffeId("cluster.local", "default", "sleep")

ISTIO_HTTP_LABELS = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


# ---------------------------------------------------------------------------- labels


def test_label_names_are_istios_http_set() -> None:
    assert list(REQUEST_LABEL_NAMES) == ISTIO_HTTP_LABELS


def test_labels_of_a_routed_request() -> None:
    labels = request_labels(SLEEP, SLEEP_ID, REVIEWS_V2, REVIEWS, status=200)
    assert labels == RequestLabels(
        reporter="waypoint",
        source_workload="sleep",
        source_canonical_service="sleep",
        source_canonical_revision="v1",
        source_workload_namespace="default",
        source_principal="spiffe://cluster.local/ns/default/sa/sleep",
        source_app="sleep",
        source_version="v1",
        source_cluster="Kubernetes",
        destination_workload="reviews-v2",
        destination_workload_namespace="apps",
        destination_principal="spiffe://cluster.local/ns/apps/sa/reviews",
        destination_app="reviews",
        destination_version="v2",
        destination_service="reviews.apps.svc.cluster.local",
        destination_service_name="reviews",
        destination_service_namespace="apps",
        destination_canonical_service="reviews",
        destination_canonical_revision="v2",
        destination_cluster="east",
        request_protocol="http",
        response_code="200",
        grpc_response_status="",
        response_flags="-",
        connection_security_policy="mutual_tls",
    )


def test_denied_request_has_no_destination_workload_but_keeps_the_service() -> None:
    labels = request_labels(SLEEP, SLEEP_ID, None, REVIEWS, status=403, response_flags="RBAC")
    assert labels.destination_workload == "unknown"
    assert labels.destination_principal == "unknown"
    assert labels.destination_app == "unknown"
    assert labels.destination_service == "reviews.apps.svc.cluster.local"
    assert labels.response_code == "403"
    assert labels.response_flags == "RBAC"


def test_unknown_source_and_grpc() -> None:
    labels = request_labels(
        None, None, REVIEWS_V2, None, status=200, protocol="grpc", grpc_status=14
    )
    assert labels.source_workload == "unknown"
    assert labels.source_principal == "unknown"
    assert labels.request_protocol == "grpc"
    assert labels.grpc_response_status == "14"
    # A pod-IP destination without a Service is named by its address, as ztunnel names it.
    assert labels.destination_service == "127.0.20.2"


def test_destination_outside_the_mesh_has_no_principal() -> None:
    legacy = dataclasses.replace(REVIEWS_V2, tunnel_protocol=TunnelProtocol.NONE)
    labels = request_labels(SLEEP, SLEEP_ID, legacy, REVIEWS, status=200)
    assert labels.destination_principal == "unknown"
    assert labels.destination_workload == "reviews-v2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": 99}, "status"),
        ({"status": 600}, "status"),
        ({"status": -1}, "status"),
        ({"status": 200, "protocol": "tcp"}, "protocol"),
        ({"status": 200, "grpc_status": 17}, "gRPC status"),
    ],
)
def test_bad_label_inputs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        request_labels(SLEEP, SLEEP_ID, REVIEWS_V2, REVIEWS, **kwargs)  # type: ignore[arg-type]


def test_no_response_is_code_zero() -> None:
    assert request_labels(SLEEP, SLEEP_ID, None, REVIEWS, status=0).response_code == "0"


# ---------------------------------------------------------------------------- exposition


def test_exposition_has_istio_names_types_labels_and_buckets() -> None:
    metrics = WaypointMetrics()
    labels = request_labels(SLEEP, SLEEP_ID, REVIEWS_V2, REVIEWS, status=200)
    metrics.record(labels, duration_ms=7.5, request_bytes=0, response_bytes=1234)
    metrics.record(labels, duration_ms=40.0, request_bytes=300, response_bytes=10)
    text = metrics.render().decode()

    assert "_created" not in text
    assert "# TYPE istio_requests_total counter" in text
    for histogram in (
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ):
        assert f"# TYPE {histogram} histogram" in text

    samples = {
        (s.name, s.labels.get("le")): s
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    total = samples[("istio_requests_total", None)]
    assert total.value == 2
    assert total.labels == dict(zip(REQUEST_LABEL_NAMES, labels.values(), strict=True))
    assert total.labels["reporter"] == "waypoint"
    assert total.labels["response_code"] == "200"

    duration_bounds = sorted(
        float(le)
        for (name, le) in samples
        if name == "istio_request_duration_milliseconds_bucket" and le and le != "+Inf"
    )
    assert duration_bounds == [float(b) for b in ENVOY_DEFAULT_BUCKETS]
    assert samples[("istio_request_duration_milliseconds_bucket", "5.0")].value == 0
    assert samples[("istio_request_duration_milliseconds_bucket", "10.0")].value == 1
    assert samples[("istio_request_duration_milliseconds_bucket", "50.0")].value == 2
    assert samples[("istio_request_duration_milliseconds_bucket", "+Inf")].value == 2
    assert samples[("istio_request_duration_milliseconds_sum", None)].value == 47.5
    assert samples[("istio_request_bytes_bucket", "0.5")].value == 1
    assert samples[("istio_request_bytes_sum", None)].value == 300
    assert samples[("istio_response_bytes_bucket", "1000.0")].value == 1
    assert samples[("istio_response_bytes_bucket", "2500.0")].value == 2
    assert samples[("istio_response_bytes_count", None)].value == 2


def test_different_outcomes_are_different_series() -> None:
    metrics = WaypointMetrics()
    ok = request_labels(SLEEP, SLEEP_ID, REVIEWS_V2, REVIEWS, status=200)
    denied = request_labels(SLEEP, SLEEP_ID, None, REVIEWS, status=403, response_flags="RBAC")
    metrics.record(ok, 1, 0, 0)
    metrics.record(denied, 1, 0, 0)
    metrics.record(denied, 1, 0, 0)
    counts = {
        (s.labels["response_code"], s.labels["response_flags"]): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if s.name == "istio_requests_total"
    }
    assert counts == {("200", "-"): 1, ("403", "RBAC"): 2}


def test_each_waypoint_has_its_own_registry() -> None:
    first, second = WaypointMetrics(), WaypointMetrics()
    first.record(request_labels(SLEEP, SLEEP_ID, None, REVIEWS, status=503), 1, 0, 0)
    assert b"istio_requests_total{" in first.render()
    assert b"istio_requests_total{" not in second.render()


@pytest.mark.parametrize(
    ("duration", "request_bytes", "response_bytes"),
    [(-1.0, 0, 0), (float("nan"), 0, 0), (float("inf"), 0, 0), (1.0, -1, 0), (1.0, 0, -5)],
)
def test_bad_measurements_are_refused(
    duration: float, request_bytes: int, response_bytes: int
) -> None:
    metrics = WaypointMetrics()
    labels = request_labels(SLEEP, SLEEP_ID, None, REVIEWS, status=200)
    with pytest.raises(ValueError):
        metrics.record(labels, duration, request_bytes, response_bytes)
    assert b"istio_requests_total{" not in metrics.render()


# ---------------------------------------------------------------------------- traceparent


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE_ID}-{PARENT_ID}-01", TraceContext(TRACE_ID, PARENT_ID, sampled=True)),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", TraceContext(TRACE_ID, PARENT_ID, sampled=False)),
        # Unknown flag bits are ignored; only "sampled" means something.
        (f"00-{TRACE_ID}-{PARENT_ID}-03", TraceContext(TRACE_ID, PARENT_ID, sampled=True)),
        (f"00-{TRACE_ID}-{PARENT_ID}-fe", TraceContext(TRACE_ID, PARENT_ID, sampled=False)),
        # Optional whitespace around a header value is not part of it.
        (f" 00-{TRACE_ID}-{PARENT_ID}-01\t", TraceContext(TRACE_ID, PARENT_ID)),
        # A future version is read by its version-00 prefix.
        (f"01-{TRACE_ID}-{PARENT_ID}-01", TraceContext(TRACE_ID, PARENT_ID)),
        (f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds", TraceContext(TRACE_ID, PARENT_ID)),
    ],
)
def test_valid_traceparent(header: str, expected: TraceContext) -> None:
    assert parse_traceparent(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # forbidden version
        f"0g-{TRACE_ID}-{PARENT_ID}-01",  # version not hex
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE_ID}-{PARENT_ID}-0",  # short flags
        f"00-{TRACE_ID}-{PARENT_ID}-0x",  # flags not hex
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # uppercase is not W3C
        f"00-{TRACE_ID}-{PARENT_ID.upper()}-01",
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",  # short trace id
        f"00-{TRACE_ID}-{PARENT_ID[:-1]}-01",  # short parent id
        f"00-{TRACE_ID}x{PARENT_ID}-01",  # wrong separator
        f"00_{TRACE_ID}-{PARENT_ID}-01",
        f"01-{TRACE_ID}-{PARENT_ID}-01x",  # a future version must continue with '-'
        f"00-{TRACE_ID[:-1]}z-{PARENT_ID}-01",
    ],
)
def test_invalid_traceparent(header: str) -> None:
    assert parse_traceparent(header) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        ("", ""),
        ("  ", ""),
        ("congo=t61rcWkgMzE", "congo=t61rcWkgMzE"),
        ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        # Passed through unchanged, whitespace and empty members included.
        ("rojo=1 , ,congo=2", "rojo=1 , ,congo=2"),
        ("tenant@vendor=x", "tenant@vendor=x"),
        ("Upper=1", ""),  # keys are lowercase
        ("novalue", ""),
        ("a=1,a=2", ""),  # duplicate key
        ("a=has,comma", ""),
        ("a=has=equals", ""),
        ("a=trailing ", "a=trailing "),  # OWS after the member is not part of the value
        ("a=\x7f", ""),
        (",".join(f"k{i}=v" for i in range(33)), ""),  # more than 32 members
        ("k=" + "v" * 257, ""),
    ],
)
def test_tracestate_shape(value: str | None, expected: str) -> None:
    assert parse_tracestate(value) == expected


def test_tracestate_is_dropped_without_a_valid_parent() -> None:
    assert incoming_context(None, "congo=1") is None
    assert incoming_context("bogus", "congo=1") is None
    parent = incoming_context(f"00-{TRACE_ID}-{PARENT_ID}-01", "congo=1")
    assert parent == TraceContext(TRACE_ID, PARENT_ID, tracestate="congo=1")
    assert incoming_context(f"00-{TRACE_ID}-{PARENT_ID}-01", "BAD") == TraceContext(
        TRACE_ID, PARENT_ID
    )


def test_trace_context_refuses_bad_ids() -> None:
    with pytest.raises(ValueError, match="trace id"):
        TraceContext("0" * 32, PARENT_ID)
    with pytest.raises(ValueError, match="span id"):
        TraceContext(TRACE_ID, "xyz")


# ---------------------------------------------------------------------------- child contexts


class _ScriptedBits:
    """Returns the given numbers in order, to reach the all-zero retry deterministically."""

    def __init__(self, *numbers: int) -> None:
        self._numbers = list(numbers)

    def getrandbits(self, k: int, /) -> int:
        return self._numbers.pop(0)


def test_child_keeps_trace_sampling_and_state_with_a_new_span() -> None:
    parent = TraceContext(TRACE_ID, PARENT_ID, sampled=False, tracestate="congo=1")
    child = child_context(parent, random.Random(7))
    assert child.trace_id == TRACE_ID
    assert child.span_id != PARENT_ID
    assert child.sampled is False
    assert child.tracestate == "congo=1"


def test_without_parent_a_sampled_trace_starts() -> None:
    rand = random.Random(1)
    first, second = child_context(None, rand), child_context(None, rand)
    assert first.sampled and first.tracestate == ""
    assert first.trace_id != second.trace_id
    assert parse_traceparent(format_traceparent(first)) == first


def test_zero_ids_are_never_generated() -> None:
    child = child_context(None, _ScriptedBits(0, 0x1234, 0, 0xAB))
    assert child.trace_id == f"{0x1234:032x}"
    assert child.span_id == f"{0xAB:016x}"


def test_format_carries_only_the_sampled_flag() -> None:
    assert format_traceparent(TraceContext(TRACE_ID, PARENT_ID)) == f"00-{TRACE_ID}-{PARENT_ID}-01"
    assert (
        format_traceparent(TraceContext(TRACE_ID, PARENT_ID, sampled=False))
        == f"00-{TRACE_ID}-{PARENT_ID}-00"
    )
    parsed = parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-ff")
    assert parsed is not None
    assert format_traceparent(parsed).endswith("-01")


# ---------------------------------------------------------------------------- tracer, spans


def test_tracer_without_endpoint_still_propagates() -> None:
    tracer = Tracer("reviews-waypoint", None, rand=random.Random(3))
    assert not tracer.exporting
    span = tracer.start(f"00-{TRACE_ID}-{PARENT_ID}-01", "congo=1", start_time_ns=5)
    assert span.parent_span_id == PARENT_ID
    assert span.context.trace_id == TRACE_ID
    assert span.start_time_ns == 5
    headers = dict(span.propagation_headers())
    assert headers == {
        "traceparent": f"00-{TRACE_ID}-{span.context.span_id}-01",
        "tracestate": "congo=1",
    }
    # Finishing without an exporter does nothing, and shutting down is harmless.
    tracer.finish(span, method="GET", path="/", status=200, authority="reviews:9080")
    assert tracer.force_flush() is True
    tracer.shutdown()


def test_tracer_starts_a_root_span_for_a_bad_header() -> None:
    span = Tracer("w", None).start("00-nonsense", "congo=1")
    assert span.parent_span_id is None
    assert span.context.sampled
    assert [name for name, _ in span.propagation_headers()] == ["traceparent"]


def test_span_name_uses_route_else_path_without_query() -> None:
    assert span_name("GET", "reviews-route", "/reviews/1?x=y") == "GET reviews-route"
    assert span_name("POST", None, "/reviews/1?token=secret") == "POST /reviews/1"
    assert span_name("GET", None, "") == "GET /"


def test_span_attributes() -> None:
    attributes = span_attributes(
        method="GET",
        path="/reviews/1?x=1",
        status=503,
        authority="reviews.apps.svc.cluster.local:9080",
        upstream_cluster="inbound-vip|9080|http|reviews.apps.svc.cluster.local",
        response_flags="UF",
        source_principal="spiffe://cluster.local/ns/default/sa/sleep",
        destination_principal="spiffe://cluster.local/ns/apps/sa/reviews",
        route_name="reviews",
    )
    assert attributes == {
        "http.request.method": "GET",
        "url.path": "/reviews/1",
        "http.response.status_code": 503,
        "server.address": "reviews.apps.svc.cluster.local",
        "server.port": 9080,
        "http.route": "reviews",
        "upstream_cluster": "inbound-vip|9080|http|reviews.apps.svc.cluster.local",
        "response_flags": "UF",
        "istio.source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "istio.destination_principal": "spiffe://cluster.local/ns/apps/sa/reviews",
        "component": "proxy",
    }


@pytest.mark.parametrize(
    ("authority", "address", "port"),
    [
        ("10.0.0.7", "10.0.0.7", None),
        ("[fd00::7]:80", "fd00::7", 80),
        ("[fd00::7]", "fd00::7", None),
    ],
)
def test_span_server_address(authority: str, address: str, port: int | None) -> None:
    attributes = span_attributes(method="GET", path="/", status=0, authority=authority)
    assert attributes["server.address"] == address
    assert attributes.get("server.port") == port
    assert "http.response.status_code" not in attributes  # no response was sent


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
        ("https://collector:4318/custom/traces", "https://collector:4318/custom/traces"),
    ],
)
def test_otlp_url(endpoint: str, url: str) -> None:
    assert otlp_traces_url(endpoint) == url


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4318", "grpc://collector:4317", "http://"])
def test_bad_otlp_endpoint_is_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="OTLP endpoint"):
        Tracer("w", endpoint)


# ---------------------------------------------------------------------------- access log


def test_access_log_line() -> None:
    with structlog.testing.capture_logs() as logs:
        access_log(
            method="GET",
            authority="reviews:9080",
            path="/reviews/1",
            protocol="HTTP/1.1",
            status=200,
            response_flags="",
            duration_ms=12.345,
            request_bytes=0,
            response_bytes=512,
            upstream_host="127.0.20.2:9080",
            source_principal="spiffe://cluster.local/ns/default/sa/sleep",
            route_name="reviews",
            trace_id=TRACE_ID,
        )
    assert logs == [
        {
            "event": "request complete",
            "log_level": "info",
            "method": "GET",
            "authority": "reviews:9080",
            "path": "/reviews/1",
            "protocol": "HTTP/1.1",
            "status": 200,
            "response_flags": "-",
            "duration_ms": 12.3,
            "request_bytes": 0,
            "response_bytes": 512,
            "upstream_host": "127.0.20.2:9080",
            "src.identity": "spiffe://cluster.local/ns/default/sa/sleep",
            "route": "reviews",
            "trace_id": TRACE_ID,
        }
    ]
