"""The waypoint end to end: sleep -> ztunnel -> HBONE -> waypoint -> HBONE -> ztunnel -> app,
with the demo topology's L7 configuration (examples/demo/5x-*.yaml), all in-process and real.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import jwt as pyjwt
import pytest
import trio

from ambientctl.apps import http_request
from tests.integration.mesh_harness import (
    BOOKINFO_PORT,
    DETAILS_VIP,
    EXAMPLES,
    NODE_1,
    RATINGS_VIP,
    REVIEWS_VIP,
    SLEEP,
    WAYPOINT,
    Mesh,
    fetch_metrics,
    metric_samples,
    start_mesh,
)

pytestmark = pytest.mark.slow

SIGNING_KEY = (EXAMPLES / "jwt" / "demo-signing-key.pem").read_text()
ISSUER = "https://auth.demo.ambient-lite.example"


class Client:
    """One keep-alive HTTP connection from sleep to a service through the mesh."""

    def __init__(self, mesh: Mesh, vip: str, host: str) -> None:
        self.mesh, self.vip, self.host = mesh, vip, host
        self.stream: trio.SocketStream | None = None

    async def request(
        self, path: str, headers: tuple[tuple[str, str], ...] = (), method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        if self.stream is None:
            self.stream = await self.mesh.connect(SLEEP, self.vip, BOOKINFO_PORT)
        status, response_headers, body = await http_request(
            self.stream, method, self.host, path, headers=headers
        )
        if response_headers.get("connection", "").lower() == "close":
            await self.aclose()
        return status, response_headers, body

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


def token(**claims: object) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "aud": "details", "iat": now, "exp": now + 600}
    payload.update(claims)
    return pyjwt.encode(payload, SIGNING_KEY, algorithm="RS256", headers={"kid": "demo-2026"})


async def test_canary_split_ab_header_and_response_filter(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    client = Client(mesh, REVIEWS_VIP, "reviews")
    served: Counter[str] = Counter()
    for _ in range(400):
        status, headers, body = await client.request("/reviews/1")
        assert status == 200
        assert headers.get("x-served-through") == "waypoint"
        served[json.loads(body)["pod"]] += 1
    assert set(served) == {"reviews-v1", "reviews-v2"}
    # 90/10 over 400 draws: v2 expected 40, standard deviation 6; these bounds are > 3 sigma.
    assert 18 <= served["reviews-v2"] <= 65, served
    # A/B: testers always get v2.
    for _ in range(20):
        _status, _headers, body = await client.request("/reviews/1", (("x-user", "tester"),))
        assert json.loads(body)["pod"] == "reviews-v2"
    await client.aclose()
    metrics = (await _get(f"http://{mesh.addr(WAYPOINT)}:15020/metrics")).text
    assert sum(metric_samples(
        metrics, "istio_requests_total", reporter="waypoint", response_code="200",
        destination_workload="reviews-v1",
        source_principal="spiffe://cluster.local/ns/demo/sa/sleep",
    )) == served["reviews-v1"]


async def test_l7_deny_and_mirror(nursery: trio.Nursery, tmp_path: Path, loopback: object) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    client = Client(mesh, REVIEWS_VIP, "reviews")
    status, _headers, body = await client.request("/admin/users")
    assert status == 403 and b"RBAC: access denied" in body
    assert (await client.request("/administrator"))[0] == 200  # /admin/* is a path prefix
    status, _headers, body = await client.request("/mirror/me")
    assert status == 200 and json.loads(body)["pod"] == "reviews-v1"
    # The copy reached the shadow pod on node-1 (its ztunnel counted the connection).
    with trio.fail_after(5):
        while not metric_samples(
            await fetch_metrics(mesh, NODE_1), "istio_tcp_connections_opened_total",
            reporter="destination", destination_workload="reviews-shadow",
        ):
            await trio.sleep(0.05)
    metrics = (await _get(f"http://{mesh.addr(WAYPOINT)}:15020/metrics")).text
    assert metric_samples(metrics, "istio_requests_total", response_code="403",
                          response_flags="RBAC") == [1.0]
    await client.aclose()


async def test_retry_hides_a_flaky_backend(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    client = Client(mesh, RATINGS_VIP, "ratings")
    without = Counter([(await client.request("/no-retry"))[0] for _ in range(20)])
    assert without == Counter({200: 10, 503: 10})  # the pod fails every second request
    with_retry = Counter([(await client.request("/ratings/1"))[0] for _ in range(20)])
    assert with_retry == Counter({200: 20})
    await client.aclose()


async def test_fault_injection_jwt_and_rate_limit(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    client = Client(mesh, DETAILS_VIP, "details")
    assert (await client.request("/delay"))[0] == 200
    assert (await client.request("/abort"))[0] == 418
    # The waypoint itself delayed the first and answered the second (Envoy's DI and FI flags).
    metrics = (await _get(f"http://{mesh.addr(WAYPOINT)}:15020/metrics")).text
    assert metric_samples(metrics, "istio_requests_total", response_code="200",
                          response_flags="DI") == [1.0]
    assert metric_samples(metrics, "istio_requests_total", response_code="418",
                          response_flags="FI") == [1.0]
    # JWT: no token on /secure is denied by policy; a good token passes; bad ones are 401.
    assert (await client.request("/secure"))[0] == 403
    good = (("authorization", f"Bearer {token()}"),)
    assert (await client.request("/secure", good))[0] == 200
    expired = (("authorization", f"Bearer {token(exp=int(time.time()) - 3600)}"),)
    status, headers, _ = await client.request("/secure", expired)
    assert status == 401 and "invalid_token" in headers.get("www-authenticate", "")
    forged = token()[:-6] + "AAAAAA"
    assert (await client.request("/secure", (("authorization", f"Bearer {forged}"),)))[0] == 401
    wrong_audience = (("authorization", f"Bearer {token(aud='reviews')}"),)
    assert (await client.request("/secure", wrong_audience))[0] == 401
    # Rate limit: 20 tokens, 10/s; a burst of 40 sees some 429s.
    burst = Counter([(await client.request("/details/1"))[0] for _ in range(40)])
    assert burst[429] >= 5 and burst[200] >= 10, burst
    await client.aclose()


async def test_waypoint_refuses_traffic_it_does_not_own_and_bad_http(
    nursery: trio.Nursery, tmp_path: Path, loopback: object
) -> None:
    mesh = await start_mesh(nursery, tmp_path, loopback, with_waypoint=True)
    # Malformed HTTP inside the tunnel: 400, and the waypoint keeps serving.
    stream = await mesh.connect(SLEEP, REVIEWS_VIP, BOOKINFO_PORT)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        with trio.fail_after(5):
            answer = await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 400")
    client = Client(mesh, REVIEWS_VIP, "reviews")
    assert (await client.request("/ok"))[0] == 200
    await client.aclose()
    dump = (await _get(f"http://{mesh.addr(WAYPOINT)}:15000/config_dump")).json()
    assert dump["certificates"][0]["identity"] == "spiffe://cluster.local/ns/demo/sa/waypoint"
    assert {r["name"] for r in dump["l7"]["httproute"]} >= {"reviews", "ratings"}


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(url)
