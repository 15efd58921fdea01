"""The waypoint's request pipeline against a fake upstream: what its stages answer and how
the per-service resilience state follows configuration changes."""

from __future__ import annotations

from typing import cast

import trio

from ambient_api import l7
from ambient_api.identity import SpiffeId
from ambient_api.model import NetworkAddress, PortMapping, Service, Workload
from ambient_dataplane.state import ProxyState
from tests.deltas import delta
from waypoint.http import HttpRequest, HttpResponse
from waypoint.pipeline import Caller, RequestPipeline, Target
from waypoint.upstream import HttpUpstream

REVIEWS = Service(
    name="reviews", namespace="demo", hostname="reviews.demo.svc.cluster.local",
    addresses=(NetworkAddress("", "10.96.0.9"),), ports=(PortMapping(9080, 9080),),
)
EJECT_AT_FIRST_5XX = l7.TrafficPolicy(
    "reviews", "demo", REVIEWS.key,
    outlier_detection=l7.OutlierDetection(consecutive_5xx=1, max_ejection_percent=100),
)
CALLER = Caller(SpiffeId("cluster.local", "demo", "sleep"), "10.0.0.1", None)


def endpoint(name: str, ip: str) -> Workload:
    return Workload(uid=f"Kubernetes//Pod/demo/{name}", name=name, namespace="demo",
                    addresses=(ip,), service_account="reviews", node="node-1",
                    services=(REVIEWS.key,))


A, B, C = endpoint("a", "10.0.0.11"), endpoint("b", "10.0.0.12"), endpoint("c", "10.0.0.13")


class AlwaysUnavailable:
    """An upstream whose every endpoint answers 503."""

    def __init__(self) -> None:
        self.tried: list[str] = []

    async def send(self, request: HttpRequest, ip: str, port: int, identity: SpiffeId,
                   **_options: object) -> HttpResponse:
        self.tried.append(ip)
        return HttpResponse(503)


def ejected(pipeline: RequestPipeline) -> list[str]:
    """The uids the admin dump shows ejected from reviews."""
    return [uid for uid in (A.uid, B.uid, C.uid)
            if any(uid in entry for entry in pipeline.dump()[REVIEWS.key]["ejected"])]


async def test_outlier_records_of_departed_endpoints_are_dropped(
    nursery: trio.Nursery,
) -> None:
    state = ProxyState()
    state.apply(delta(REVIEWS, A, B, C, EJECT_AT_FIRST_5XX))
    upstream = AlwaysUnavailable()
    pipeline = RequestPipeline(state=state, waypoint_key=l7.waypoint_key("demo", "waypoint"),
                               upstream=cast(HttpUpstream, upstream), nursery=nursery)
    pipeline.config_changed()
    request = HttpRequest("GET", "/", (), b"", "reviews.demo.svc.cluster.local:9080")

    response, outcome = await pipeline.handle(request, Target(9080, service=REVIEWS), CALLER)
    # The first try and Istio's default two retries, each on another endpoint, each ejecting it.
    assert (response.status, outcome.flags) == (503, "URX")
    assert sorted(upstream.tried) == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    assert ejected(pipeline) == [A.uid, B.uid, C.uid]

    state.apply(delta(removed=[("workload", A.uid)]))
    pipeline.config_changed()
    assert ejected(pipeline) == [B.uid, C.uid]  # the kept ones stay ejected

    state.apply(delta(A))  # back under the same uid: a fresh endpoint, not an ejected one
    pipeline.config_changed()
    assert ejected(pipeline) == [B.uid, C.uid]
