"""The waypoint's spans reach a real OTLP/HTTP endpoint: a small collector on loopback (trio +
h11) decodes what OpenTelemetry's exporter posts, so ids, parentage and attributes are checked
as a tracing backend would see them."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import LoopbackAllocator
from waypoint.telemetry import Tracer

OTLP_PORT = 4318
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@dataclass
class FakeCollector:
    """Accepts POST /v1/traces (protobuf) and keeps every decoded request."""

    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    received: trio.Event = field(default_factory=trio.Event)

    def spans(self) -> list[tuple[dict[str, object], Span]]:
        """(resource attributes, span) for every span received."""
        found: list[tuple[dict[str, object], Span]] = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope_spans.spans)
        return found

    async def handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data and connection.their_state is h11.IDLE:
                        return
                    connection.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            assert request is not None
            self.paths.append(request.target.decode())
            content_type = dict(request.headers).get(b"content-type")
            if request.method != b"POST" or content_type != b"application/x-protobuf":
                status, payload = 415, b""
            else:
                export = ExportTraceServiceRequest()
                export.ParseFromString(bytes(body))
                self.requests.append(export)
                self.received.set()
                status, payload = 200, ExportTraceServiceResponse().SerializeToString()
            reply = [
                h11.Response(
                    status_code=status,
                    headers=[
                        ("content-type", "application/x-protobuf"),
                        ("content-length", str(len(payload))),
                    ],
                ),
                h11.Data(data=payload),
                h11.EndOfMessage(),
            ]
            await stream.send_all(b"".join(connection.send(e) or b"" for e in reply))
            if connection.our_state is h11.MUST_CLOSE:
                return
            connection.start_next_cycle()


def _attributes(key_values: Iterable[KeyValue]) -> dict[str, object]:
    decoded: dict[str, object] = {}
    for kv in key_values:
        kind = kv.value.WhichOneof("value")
        assert kind is not None, f"attribute {kv.key} has no value"
        decoded[kv.key] = getattr(kv.value, kind)
    return decoded


@asynccontextmanager
async def running_collector(host: str) -> AsyncIterator[FakeCollector]:
    collector = FakeCollector()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_tcp, collector.handle, OTLP_PORT, host=host))
        yield collector
        nursery.cancel_scope.cancel()


async def test_server_span_joins_the_callers_trace(loopback: LoopbackAllocator) -> None:
    host = loopback.new()
    async with running_collector(host) as collector:
        tracer = Tracer(
            "reviews-waypoint.apps",
            f"http://{host}:{OTLP_PORT}",
            rand=random.Random(11),
            export_timeout_s=5,
        )
        assert tracer.exporting
        span = tracer.start(
            f"00-{TRACE_ID}-{PARENT_ID}-01", "congo=t61rcWkgMzE", start_time_ns=1_000_000_000
        )
        tracer.finish(
            span,
            method="GET",
            path="/reviews/1?user=x",
            status=503,
            authority="reviews.apps.svc.cluster.local:9080",
            route_name="reviews-canary",
            upstream_cluster="inbound-vip|9080|http|reviews.apps.svc.cluster.local",
            response_flags="UF",
            source_principal="spiffe://cluster.local/ns/default/sa/sleep",
            destination_principal="spiffe://cluster.local/ns/apps/sa/reviews",
            end_time_ns=1_025_000_000,
        )
        # An unsampled request is propagated but never exported.
        quiet = tracer.start(f"00-{'1' * 32}-{PARENT_ID}-00")
        tracer.finish(quiet, method="GET", path="/", status=200, authority="reviews:9080")
        with trio.fail_after(10):
            await tracer.aclose()

    assert collector.paths == ["/v1/traces"]
    [(resource, exported)] = collector.spans()
    assert resource["service.name"] == "reviews-waypoint.apps"
    assert exported.trace_id.hex() == TRACE_ID
    assert exported.parent_span_id.hex() == PARENT_ID
    assert exported.span_id.hex() == span.context.span_id
    assert dict(span.propagation_headers())["traceparent"] == (
        f"00-{TRACE_ID}-{exported.span_id.hex()}-01"
    )
    assert exported.trace_state == "congo=t61rcWkgMzE"
    assert exported.name == "GET reviews-canary"
    assert exported.kind == Span.SPAN_KIND_SERVER
    assert exported.start_time_unix_nano == 1_000_000_000
    assert exported.end_time_unix_nano == 1_025_000_000
    assert exported.status.code == exported.status.STATUS_CODE_ERROR
    assert _attributes(exported.attributes) == {
        "http.request.method": "GET",
        "url.path": "/reviews/1",
        "http.response.status_code": 503,
        "server.address": "reviews.apps.svc.cluster.local",
        "server.port": 9080,
        "http.route": "reviews-canary",
        "upstream_cluster": "inbound-vip|9080|http|reviews.apps.svc.cluster.local",
        "response_flags": "UF",
        "istio.source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "istio.destination_principal": "spiffe://cluster.local/ns/apps/sa/reviews",
        "component": "proxy",
    }


async def test_root_span_without_incoming_context(loopback: LoopbackAllocator) -> None:
    host = loopback.new()
    async with running_collector(host) as collector:
        tracer = Tracer("w", f"http://{host}:{OTLP_PORT}/v1/traces", export_timeout_s=5)
        span = tracer.start(None)
        tracer.finish(span, method="POST", path="/orders", status=201, authority="orders:80")
        ok = await trio.to_thread.run_sync(tracer.force_flush, 5000)
        assert ok
        with trio.fail_after(5):
            await collector.received.wait()
        await tracer.aclose()

    [(_, exported)] = collector.spans()
    assert exported.trace_id.hex() == span.context.trace_id
    assert exported.parent_span_id == b""
    assert exported.name == "POST /orders"
    assert exported.status.code == exported.status.STATUS_CODE_UNSET


async def test_unreachable_collector_does_not_hang_or_raise(loopback: LoopbackAllocator) -> None:
    # Nothing listens on this address: export fails, is logged by the SDK, and shutdown ends
    # within the export timeout rather than stalling the waypoint's exit.
    tracer = Tracer("w", f"http://{loopback.new()}:{OTLP_PORT}", export_timeout_s=0.5)
    span = tracer.start(None)
    tracer.finish(span, method="GET", path="/", status=200, authority="a:80")
    with trio.fail_after(5):
        await tracer.aclose()
