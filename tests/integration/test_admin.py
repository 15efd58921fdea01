"""The admin (15000), metrics (15020) and readiness (15021) servers over real sockets."""

from __future__ import annotations

import json

import httpx
import structlog
import trio

from ambient_api.identity import SpiffeId
from ambient_dataplane.admin import (
    AdminRequest,
    AdminResponse,
    StructlogLevelControl,
    admin_routes,
    dispatch,
    handle,
    metrics_routes,
    readiness_problem,
    readiness_routes,
    serve_admin,
)
from ambient_dataplane.labels import connection_labels
from tests.conftest import LoopbackAllocator
from ztunnel.metrics import ZtunnelMetrics

SLEEP_ID = SpiffeId("cluster.local", "default", "sleep")


def test_dispatch_answers_404_and_405() -> None:
    routes = admin_routes({}, StructlogLevelControl(), lambda: None)
    missing = dispatch(routes, "GET", "/nope")
    assert isinstance(missing, AdminResponse) and missing.status == 404
    assert b"/config_dump" in missing.body
    wrong = dispatch(routes, "GET", "/quitquitquit")
    assert isinstance(wrong, AdminResponse) and wrong.status == 405
    assert ("allow", "POST") in wrong.headers
    assert not isinstance(dispatch(routes, "post", "/logging"), AdminResponse)


def test_readiness_problem() -> None:
    assert readiness_problem(True, []) is None
    assert readiness_problem(False, []) == "config not yet received from istiod"
    assert readiness_problem(True, [SLEEP_ID]) == (
        "no certificate yet for spiffe://cluster.local/ns/default/sa/sleep"
    )


async def test_admin_endpoints(nursery: trio.Nursery, loopback: LoopbackAllocator) -> None:
    address = loopback.new()
    quit_requested = trio.Event()
    levels = StructlogLevelControl("info")
    saved_wrapper = structlog.get_config()["wrapper_class"]
    sections = {
        "workloads": lambda: [{"uid": "w1"}],
        "services": lambda: [],
        "policies": lambda: [],
        "certificates": lambda: [{"identity": str(SLEEP_ID), "state": "Available"}],
    }
    await nursery.start(serve_admin, address, 15000, admin_routes(sections, levels,
                                                                  quit_requested.set))
    try:
        async with httpx.AsyncClient(base_url=f"http://{address}:15000") as client:
            dump = await client.get("/config_dump")
            assert dump.status_code == 200
            assert dump.headers["content-type"] == "application/json"
            assert json.loads(dump.content) == {name: s() for name, s in sections.items()}

            assert (await client.get("/logging")).text == "current log level is info\n"
            changed = await client.post("/logging", params={"level": "debug"})
            assert changed.status_code == 200 and changed.text == "current log level is debug\n"
            assert (await client.get("/logging")).text == "current log level is debug\n"
            bad = await client.post("/logging", params={"level": "loud"})
            assert bad.status_code == 400 and "unknown log level 'loud'" in bad.text
            assert (await client.post("/logging")).status_code == 400

            assert (await client.get("/quitquitquit")).status_code == 405
            assert not quit_requested.is_set()
            assert (await client.post("/quitquitquit")).status_code == 200
            with trio.fail_after(5):  # requested once the answer is out, so just after it
                await quit_requested.wait()

            assert (await client.get("/stats")).status_code == 404
            too_big = await client.post("/logging", content=b"x" * 100_000)
            assert too_big.status_code == 413
    finally:
        structlog.configure(wrapper_class=saved_wrapper)


async def test_failing_section_is_a_500_not_a_crash(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()

    def broken() -> object:
        raise RuntimeError("state is busy")

    routes = admin_routes({"workloads": broken}, StructlogLevelControl(), lambda: None)
    await nursery.start(serve_admin, address, 15000, routes)
    async with httpx.AsyncClient(base_url=f"http://{address}:15000") as client:
        failed = await client.get("/config_dump")
        assert failed.status_code == 500 and "state is busy" in failed.text
        assert (await client.get("/logging")).status_code == 200  # still serving


async def test_metrics_endpoint(nursery: trio.Nursery, loopback: LoopbackAllocator) -> None:
    address = loopback.new()
    metrics = ZtunnelMetrics()
    metrics.connection_opened(connection_labels("source", None, None, None, None, mtls=False))
    await nursery.start(serve_admin, address, 15020, metrics_routes(metrics.render))
    async with httpx.AsyncClient(base_url=f"http://{address}:15020") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'istio_tcp_connections_opened_total{' in response.text


async def test_readiness_follows_sync_and_certificates(
    nursery: trio.Nursery, loopback: LoopbackAllocator
) -> None:
    address = loopback.new()
    synced = trio.Event()
    missing: list[SpiffeId] = [SLEEP_ID]
    routes = readiness_routes(lambda: readiness_problem(synced.is_set(), missing))
    await nursery.start(serve_admin, address, 15021, routes)
    async with httpx.AsyncClient(base_url=f"http://{address}:15021") as client:
        first = await client.get("/healthz/ready")
        assert first.status_code == 503
        assert "config not yet received" in first.text and str(SLEEP_ID) in first.text
        synced.set()
        second = await client.get("/healthz/ready")
        assert second.status_code == 503 and "config" not in second.text
        missing.clear()
        ready = await client.get("/healthz/ready")
        assert ready.status_code == 200 and ready.text == "ready\n"


async def test_handlers_get_query_and_body() -> None:
    seen: list[AdminRequest] = []

    def record(request: AdminRequest) -> AdminResponse:
        seen.append(request)
        return AdminResponse.text(200, "ok")

    response = await handle({"/x": {"POST": record}},
                            AdminRequest("POST", "/x", {"a": ["1", "2"]}, b"body"))
    assert response.status == 200 and seen[0].query_value("a") == "2"
    assert seen[0].body == b"body"


async def test_mutating_admin_actions_answer_only_local_callers() -> None:
    """A peer in the cluster (the pod proxy, another pod) may read /config_dump but neither
    change the log level nor shut the proxy down."""
    from ambient_dataplane.admin import AdminRequest, StructlogLevelControl, admin_routes, handle

    quits: list[bool] = []
    routes = admin_routes({"workloads": list}, StructlogLevelControl("info"),
                          lambda: quits.append(True))
    remote = AdminRequest("POST", "/quitquitquit", {}, client_ip="10.244.1.7")
    assert (await handle(routes, remote)).status == 403
    remote_level = AdminRequest("POST", "/logging", {"level": ["debug"]}, client_ip="10.244.1.7")
    assert (await handle(routes, remote_level)).status == 403
    dump = AdminRequest("GET", "/config_dump", {}, client_ip="10.244.1.7")
    assert (await handle(routes, dump)).status == 200
    assert quits == []
    local = AdminRequest("POST", "/quitquitquit", {}, client_ip="127.0.0.1")
    answer = await handle(routes, local)
    assert answer.status == 200
    assert quits == []  # the shutdown waits for the answer to be written
    assert answer.after_sent is not None
    answer.after_sent()
    assert quits == [True]
