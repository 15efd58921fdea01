"""The waypoint controller and leader election against the Kubernetes API stand-in, driven by
the real ``kubernetes`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from istiod_lite.kube.client import build_api_client
from istiod_lite.kube.leader import LeaderElector
from istiod_lite.kube.waypoints import WaypointController
from tests.conftest import LoopbackAllocator
from tests.kube.apiserver import FakeKubeApiServer

IMAGE = "ghcr.io/example/ambient-lite:test"


@pytest.fixture
async def server(loopback: LoopbackAllocator, nursery: trio.Nursery) -> FakeKubeApiServer:
    started: FakeKubeApiServer = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    started.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    started.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}})
    return started


@pytest.fixture
def api_client(server: FakeKubeApiServer, tmp_path: Path) -> Any:
    client = build_api_client(kubeconfig=server.write_kubeconfig(tmp_path / "kubeconfig"))
    yield client
    client.close()


@pytest.fixture
async def controller(api_client: Any, nursery: trio.Nursery) -> AsyncIterator[WaypointController]:
    running = WaypointController(api_client, image=IMAGE, resync_period=60)
    await nursery.start(running.run)
    yield running


def gateway(
    name: str = "waypoint", listeners: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": listeners if listeners is not None
            else [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def condition(server: FakeKubeApiServer, kind: str, name: str = "waypoint") -> dict[str, Any]:
    found = server.get("gateways", name, "shop") or {}
    for cond in (found.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return {}


async def until(server: FakeKubeApiServer, predicate: Callable[[], bool], timeout: float = 5.0
                ) -> None:
    with trio.fail_after(timeout):
        await server.wait_until(predicate)


async def test_gateway_gets_its_objects_status_and_address(
    server: FakeKubeApiServer, controller: WaypointController
) -> None:
    created = server.apply(gateway())
    uid = created["metadata"]["uid"]
    await until(server, lambda: all(server.get(kind, "waypoint", "shop") is not None
                                    for kind in ("serviceaccounts", "deployments", "services")))
    for kind in ("serviceaccounts", "deployments", "services"):
        obj = server.get(kind, "waypoint", "shop")
        assert obj is not None
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "Gateway", "waypoint", uid, True)
    deployment = server.get("deployments", "waypoint", "shop")
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE

    await until(server, lambda: condition(server, "Programmed").get("status") == "False")
    assert condition(server, "Accepted")["status"] == "True"
    assert condition(server, "Programmed")["reason"] in ("Pending", "AddressNotAssigned")

    # What the API server and the Deployment controller would do: an IP, then a ready pod.
    service = server.get("services", "waypoint", "shop")
    assert service is not None
    service["spec"]["clusterIP"] = "10.96.0.42"
    server.apply(service)
    await until(server, lambda: condition(server, "Programmed").get("reason") == "Pending")
    assert condition(server, "Programmed")["status"] == "False"
    deployment = server.get("deployments", "waypoint", "shop")
    assert deployment is not None
    deployment["status"] = {"replicas": 1, "readyReplicas": 1}
    server.apply(deployment)
    await until(server, lambda: condition(server, "Programmed").get("status") == "True")
    found = server.get("gateways", "waypoint", "shop")
    assert found is not None
    assert found["status"]["addresses"] == [{"type": "IPAddress", "value": "10.96.0.42"}]

    # Status is written only when it changes: nothing more happens on a no-op resync.
    writes_before = [r for r in server.requests if r.method == "PUT" and "/status" in r.path]
    controller.enqueue("shop/waypoint")
    await trio.sleep(0.3)
    writes_after = [r for r in server.requests if r.method == "PUT" and "/status" in r.path]
    assert writes_after == writes_before


async def test_drift_is_repaired(server: FakeKubeApiServer, controller: WaypointController) -> None:
    server.apply(gateway())
    await until(server, lambda: server.get("deployments", "waypoint", "shop") is not None)
    deployment = server.get("deployments", "waypoint", "shop")
    assert deployment is not None
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    deployment["spec"]["replicas"] = 3  # not ours: an autoscaler's, kept
    server.apply(deployment)

    def repaired() -> bool:
        current = server.get("deployments", "waypoint", "shop") or {}
        return current["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE

    await until(server, repaired)
    current = server.get("deployments", "waypoint", "shop")
    assert current is not None and current["spec"]["replicas"] == 3


async def test_objects_it_does_not_own_are_left_alone(
    server: FakeKubeApiServer, controller: WaypointController
) -> None:
    foreign = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "waypoint", "namespace": "shop", "labels": {"app": "x"}},
               "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]}}
    server.apply(foreign)
    server.apply(gateway())
    await until(server, lambda: condition(server, "Programmed").get("reason") == "NoResources")
    service = server.get("services", "waypoint", "shop")
    assert service is not None
    assert service["spec"]["selector"] == {"app": "x"}
    assert "ownerReferences" not in service["metadata"]


async def test_a_bad_gateway_is_not_accepted(
    server: FakeKubeApiServer, controller: WaypointController
) -> None:
    server.apply(gateway(listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}]))
    await until(server, lambda: condition(server, "Accepted").get("status") == "False")
    assert condition(server, "Accepted")["reason"] == "ListenersNotValid"
    assert condition(server, "Programmed")["status"] == "False"
    assert server.get("deployments", "waypoint", "shop") is None


async def test_deleting_the_gateway_removes_its_objects_for_good(
    server: FakeKubeApiServer, controller: WaypointController
) -> None:
    server.apply(gateway())
    await until(server, lambda: server.get("services", "waypoint", "shop") is not None
                and server.get("deployments", "waypoint", "shop") is not None)
    server.delete("gateways", "waypoint", "shop")
    await until(server, lambda: all(server.get(kind, "waypoint", "shop") is None
                                    for kind in ("serviceaccounts", "deployments", "services")))
    # Another look at the Gateway (as a resync or a late event would) must not recreate.
    reconciles = controller.reconciles
    controller.enqueue("shop/waypoint")
    with trio.fail_after(5):
        while controller.reconciles == reconciles:
            await trio.sleep(0.02)
    await trio.sleep(0.1)
    for kind in ("serviceaccounts", "deployments", "services"):
        assert server.get(kind, "waypoint", "shop") is None


async def test_watch_relists_after_410_and_keeps_reconciling(
    server: FakeKubeApiServer, controller: WaypointController
) -> None:
    server.compact()
    await server.drop_watches()
    server.apply(gateway(name="late"))
    await until(server, lambda: server.get("deployments", "late", "shop") is not None)


# -- leader election ----------------------------------------------------------------------


async def test_one_leader_and_a_takeover_when_it_stops_renewing(
    server: FakeKubeApiServer, api_client: Any, nursery: trio.Nursery
) -> None:
    def elector(identity: str) -> LeaderElector:
        return LeaderElector(api_client, identity=identity, release_on_cancel=False,
                             lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)

    first, second = elector("istiod-a"), elector("istiod-b")
    leading: list[str] = []

    def work(name: str) -> Callable[[], Any]:
        async def lead() -> None:
            leading.append(name)
            await trio.sleep_forever()
        return lead

    first_scope = trio.CancelScope()

    async def run_first() -> None:
        with first_scope:
            await first.run(work("a"))

    nursery.start_soon(run_first)
    await until(server, lambda: leading == ["a"])
    await nursery.start(second.run, work("b"))
    await trio.sleep(1.5)  # longer than the lease: renewals keep it with a
    assert leading == ["a"] and first.is_leader and not second.is_leader
    lease = server.get("leases", "istiod-lite-leader", "istio-system")
    assert lease is not None and lease["spec"]["holderIdentity"] == "istiod-a"

    first_scope.cancel()  # a crashes: no release, no more renewals
    with trio.fail_after(5):
        while not second.is_leader:
            await trio.sleep(0.05)
    assert leading == ["a", "b"]
    lease = server.get("leases", "istiod-lite-leader", "istio-system")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "istiod-b"
    assert lease["spec"]["leaseTransitions"] == 1


async def test_a_released_lease_is_taken_over_at_once(
    server: FakeKubeApiServer, api_client: Any, nursery: trio.Nursery
) -> None:
    def elector(identity: str) -> LeaderElector:
        return LeaderElector(api_client, identity=identity, lease_duration=30.0,
                             renew_deadline=20.0, retry_period=0.1)

    first, second = elector("istiod-a"), elector("istiod-b")
    first_scope = trio.CancelScope()
    cancelled = trio.Event()

    async def lead_until_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def run_first() -> None:
        with first_scope:
            await first.run(lead_until_cancelled)

    nursery.start_soon(run_first)
    with trio.fail_after(5):
        while not first.is_leader:
            await trio.sleep(0.02)
    await nursery.start(second.run, trio.sleep_forever)
    first_scope.cancel()
    with trio.fail_after(3):  # far less than the 30 s lease: the lease was handed back
        await cancelled.wait()
        while not second.is_leader:
            await trio.sleep(0.02)


async def test_leadership_is_lost_when_renewals_fail(
    server: FakeKubeApiServer, api_client: Any, nursery: trio.Nursery
) -> None:
    elector = LeaderElector(api_client, identity="istiod-a", lease_duration=2.0,
                            renew_deadline=0.5, retry_period=0.1)
    stopped = trio.Event()

    async def lead() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    await nursery.start(elector.run, lead)
    with trio.fail_after(5):
        while not elector.is_leader:
            await trio.sleep(0.02)
    server.fail_next(1000, 500, path_contains="/leases")
    with trio.fail_after(3):
        await stopped.wait()
    assert not elector.is_leader
