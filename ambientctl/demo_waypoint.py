"""The demo's waypoint act: L7 traffic management and policy, shown and checked.

Every request goes sleep -> node-1's ztunnel -> HBONE -> the waypoint (its own process and
identity) -> HBONE -> the destination's ztunnel -> the app. The configuration is Istio's and
Gateway API's YAML in ``examples/demo/5x-*.yaml``, unchanged.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jwt as pyjwt
import trio

from ambientctl.apps import HttpClientError, Socks5ConnectError, http_request, socks5_connect
from ambientctl.demo_mesh import DemoMesh, DemoReport, Pod
from ztunnel.config import Ports

PORT = 9080
CANARY_REQUESTS = 1000
ISSUER = "https://auth.demo.ambient-lite.example"


class ServiceClient:
    """One keep-alive HTTP connection from a pod to a service, reopened when closed."""

    def __init__(self, pod: Pod, host: str) -> None:
        self.pod, self.host = pod, host
        self.stream: trio.SocketStream | None = None

    async def get(
        self, path: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> tuple[int, dict[str, str], bytes]:
        if self.stream is None:
            self.stream = await socks5_connect(self.pod.node_address, Ports.socks5, self.host, PORT,
                                               source_address=self.pod.ip)
        try:
            status, response_headers, body = await http_request(
                self.stream, "GET", self.host, path, headers=headers)
        except (HttpClientError, OSError):
            await self.aclose()
            raise
        if response_headers.get("connection", "").lower() == "close":
            await self.aclose()
        return status, response_headers, body

    async def status(self, path: str, headers: tuple[tuple[str, str], ...] = ()) -> int:
        return (await self.get(path, headers))[0]

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None


def demo_token(config_dir: Path, **claims: Any) -> str:
    key = (config_dir / "jwt" / "demo-signing-key.pem").read_text()
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "aud": "details", "iat": now, "exp": now + 600}
    payload.update(claims)
    return pyjwt.encode(payload, key, algorithm="RS256", headers={"kid": "demo-2026"})


async def act_canary(report: DemoReport, sleep: Pod) -> None:
    report.section(f"8. waypoint: a 90/10 canary of reviews over {CANARY_REQUESTS} requests, "
                   "and an A/B rule for testers")
    client = ServiceClient(sleep, "reviews.demo.svc.cluster.local")
    served: Counter[str] = Counter()
    errors = 0
    for _ in range(CANARY_REQUESTS):
        try:
            status, _headers, body = await client.get("/reviews/1")
        except (HttpClientError, OSError, Socks5ConnectError):
            errors += 1
            continue
        served[json.loads(body)["pod"] if status == 200 else f"HTTP {status}"] += 1
    testers: Counter[str] = Counter()
    for _ in range(20):
        _status, _headers, body = await client.get("/reviews/1", (("x-user", "tester"),))
        testers[json.loads(body)["pod"]] += 1
    await client.aclose()
    total = sum(served.values())
    report.table([{"served_by": k, "requests": v, "share": f"{100 * v / max(total, 1):.1f}%"}
                  for k, v in sorted(served.items())], ["served_by", "requests", "share"])
    v2_share = served["reviews-v2"] / max(total, 1)
    report.check(errors == 0 and total == CANARY_REQUESTS
                 and set(served) == {"reviews-v1", "reviews-v2"},
                 f"all {CANARY_REQUESTS} requests answered 200 by v1 or v2")
    report.check(0.06 <= v2_share <= 0.14, f"v2 got {100 * v2_share:.1f}% (configured 10%)")
    report.check(testers == Counter({"reviews-v2": 20}),
                 "20 requests with x-user: tester all went to v2")


async def act_retry(report: DemoReport, sleep: Pod) -> None:
    report.section("9. waypoint: ratings-v1 fails every second request; a retry hides it")
    client = ServiceClient(sleep, "ratings.demo.svc.cluster.local")
    without = Counter([await client.status("/no-retry") for _ in range(20)])
    with_retry = Counter([await client.status("/ratings/1") for _ in range(20)])
    await client.aclose()
    report.table([
        {"route": "/no-retry (retry.attempts: 0)", "answers": dict(without)},
        {"route": "/ratings/1 (retry on 503, 3 attempts)", "answers": dict(with_retry)},
    ], ["route", "answers"])
    report.check(without[503] > 0, f"without a retry clients see {without[503]} failures of 20")
    report.check(with_retry == Counter({200: 20}), "with the retry every request succeeds")


async def act_faults_and_policy(
    report: DemoReport, sleep: Pod, config_dir: Path
) -> None:
    report.section("10. waypoint: fault injection (VirtualService), an L7 deny, JWT")
    details = ServiceClient(sleep, "details.demo.svc.cluster.local")
    reviews = ServiceClient(sleep, "reviews.demo.svc.cluster.local")
    started = trio.current_time()
    delayed = await details.status("/delay")
    delay = trio.current_time() - started
    aborted = await details.status("/abort")
    admin = await reviews.status("/admin/users")
    no_token = await details.status("/secure")
    good = await details.status(
        "/secure", (("authorization", f"Bearer {demo_token(config_dir)}"),))
    forged = await details.status(
        "/secure", (("authorization", f"Bearer {demo_token(config_dir)[:-6]}AAAAAA"),))
    expired = await details.status(
        "/secure", (("authorization",
                     f"Bearer {demo_token(config_dir, exp=int(time.time()) - 60)}"),))
    rows = [
        {"request": "GET details/delay", "status": delayed, "note": f"took {delay:.2f}s"},
        {"request": "GET details/abort", "status": aborted, "note": "fault abort 418"},
        {"request": "GET reviews/admin/users", "status": admin,
         "note": "AuthorizationPolicy reviews-no-admin (DENY)"},
        {"request": "GET details/secure, no token", "status": no_token,
         "note": "DENY unless a request principal"},
        {"request": "GET details/secure, valid JWT", "status": good, "note": "iss/sub alice"},
        {"request": "GET details/secure, forged JWT", "status": forged, "note": "bad signature"},
        {"request": "GET details/secure, expired JWT", "status": expired, "note": "exp passed"},
    ]
    report.table(rows, ["request", "status", "note"])
    report.check(delayed == 200 and delay >= 0.5, "the delay fault held the request 0.5 s")
    report.check(aborted == 418, "the abort fault answered 418")
    report.check(admin == 403, "the L7 policy denied /admin with 403")
    report.check((no_token, good, forged, expired) == (403, 200, 401, 401),
                 "JWT: no token 403, valid 200, forged 401, expired 401")
    await details.aclose()
    await reviews.aclose()


async def act_mirror_and_rate_limit(demo: DemoMesh, report: DemoReport, sleep: Pod) -> None:
    report.section("11. waypoint: a mirrored request, and a local rate limit")
    reviews = ServiceClient(sleep, "reviews.demo.svc.cluster.local")
    _status, _headers, body = await reviews.get("/mirror/me")
    primary = json.loads(body)["pod"]
    await reviews.aclose()

    async def shadow_count() -> float:
        samples = [v for n, labels, v in await demo.metrics(_node_of(demo, "reviews-shadow"))
                   if n == "istio_tcp_connections_opened_total"
                   and labels.get("destination_workload") == "reviews-shadow"
                   and labels.get("reporter") == "destination"]
        return sum(samples)

    seen = 0.0
    with trio.move_on_after(5):
        while (seen := await shadow_count()) == 0:
            await trio.sleep(0.1)
    details = ServiceClient(sleep, "details.demo.svc.cluster.local")
    burst = Counter([await details.status("/details/1") for _ in range(40)])
    await details.aclose()
    report.table([
        {"what": "GET reviews/mirror/me", "result": f"answered by {primary}; the shadow "
                                                     f"received {seen:g} copy"},
        {"what": "40 requests to details at once", "result": dict(burst)},
    ], ["what", "result"])
    report.check(primary == "reviews-v1" and seen >= 1,
                 "the primary answered and the shadow service saw the mirrored request")
    report.check(burst[429] > 0 and burst[200] > 0,
                 "the token bucket let a burst through, then answered 429")


async def act_waypoint_metrics(demo: DemoMesh, report: DemoReport) -> None:
    report.section("12. the waypoint's istio_requests_total (reporter=waypoint)")
    rows: Counter[tuple[str, str, str]] = Counter()
    for name, labels, value in await demo.scrape(demo.waypoint_address):
        if name == "istio_requests_total" and value > 0:
            key = (labels.get("destination_workload", ""), labels.get("response_code", ""),
                   labels.get("response_flags", ""))
            rows[key] += int(value)
    report.table([{"destination_workload": w, "response_code": c, "flags": f, "requests": n}
                  for (w, c, f), n in sorted(rows.items())],
                 ["destination_workload", "response_code", "flags", "requests"])
    report.check(any(c == "403" and f == "RBAC" for (_w, c, f) in rows),
                 "the L7 denial is counted with the RBAC flag")


def _node_of(demo: DemoMesh, workload: str) -> str:
    return demo.node_of.get(workload, next(iter(demo.mesh.nodes)))


async def run_waypoint_act(demo: DemoMesh, report: DemoReport, sleep: Pod,
                           config_dir: Path) -> None:
    if not demo.waypoint_address:
        report.section("waypoint act skipped: the topology declares no waypoint")
        return
    await act_canary(report, sleep)
    await act_retry(report, sleep)
    await act_faults_and_policy(report, sleep, config_dir)
    await act_mirror_and_rate_limit(demo, report, sleep)
    await act_waypoint_metrics(demo, report)
