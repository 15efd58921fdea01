"""The Kubernetes source against the in-test API server stand-in, through the real
``kubernetes`` client: list, watch, resume, 410 relist, backoff, missing CRDs, chunked lists,
thread hygiene, and snapshots reaching the discovery store as Workloads."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from kubernetes import client as kube_client
from structlog.testing import capture_logs

from istiod_lite.__main__ import feed_store
from istiod_lite.discovery import ResourceStore
from istiod_lite.kube import build_api_client
from istiod_lite.sources.kube_watch import BackoffPolicy, WatchedKind
from istiod_lite.sources.kubernetes import KubernetesSource
from istiod_lite.sources.objects import ClusterObjects
from istiod_lite.translate import MeshConfig
from tests.conftest import LoopbackAllocator
from tests.kube.apiserver import FakeKubeApiServer

FAST_BACKOFF = BackoffPolicy(initial=0.05, maximum=0.5, jitter=0.25)
PODS = WatchedKind("v1", "Pod", "pods")
NAMESPACES = WatchedKind("v1", "Namespace", "namespaces")
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@dataclass
class Cluster:
    server: FakeKubeApiServer
    api_client: kube_client.ApiClient


@dataclass
class Running:
    source: KubernetesSource
    first: ClusterObjects
    snapshots: trio.MemoryReceiveChannel[ClusterObjects]

    async def until(
        self, predicate: Callable[[ClusterObjects], bool], timeout: float = 5.0
    ) -> ClusterObjects:
        """The first later snapshot for which ``predicate`` holds."""
        with trio.fail_after(timeout):
            while True:
                snapshot = await self.snapshots.receive()
                if predicate(snapshot):
                    return snapshot


@pytest.fixture
async def cluster(
    nursery: trio.Nursery, loopback: LoopbackAllocator, tmp_path: Path
) -> AsyncIterator[Cluster]:
    server: FakeKubeApiServer = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    api_client = build_api_client(kubeconfig=kubeconfig, context="stand-in")
    yield Cluster(server, api_client)
    api_client.close()


@asynccontextmanager
async def running(api_client: kube_client.ApiClient, **options: Any) -> AsyncIterator[Running]:
    options.setdefault("resync_backoff", FAST_BACKOFF)
    options.setdefault("coalesce_interval", 0.02)
    source = KubernetesSource(api_client, **options)
    send, receive = trio.open_memory_channel[ClusterObjects](math.inf)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            first = await nursery.start(source.run, send)
        assert await receive.receive() is first  # the first snapshot is also the first message
        yield Running(source, first, receive)
        nursery.cancel_scope.cancel()


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
                                                                   "labels": labels}}


def node(name: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}


def pod(name: str, ip: str, *, ns: str = "demo", labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "web"}},
        "spec": {"nodeName": "node-1", "serviceAccountName": "web",
                 "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def requests_to(server: FakeKubeApiServer, path: str, *, watch: bool) -> list[dict[str, str]]:
    """Queries of the LISTs (or WATCHes) of ``path`` the server answered, in order."""
    return [
        request.query for request in server.requests
        if request.method == "GET" and request.path == path
        and (request.query.get("watch") in ("true", "1")) == watch
    ]


def busy_kube_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kube ")]


def non_idle_threads() -> set[threading.Thread]:
    """Threads other than Trio's idle cached workers (which linger ~10 s by design)."""
    return {t for t in threading.enumerate() if not t.name.startswith("Trio thread")}


# -- tests -----------------------------------------------------------------------------------


async def test_initial_snapshot_has_every_kind_and_watches_from_the_list_version(
    cluster: Cluster,
) -> None:
    server = cluster.server
    server.apply(namespace("demo", **AMBIENT))
    server.apply(node("node-1", "127.0.10.1"))
    server.apply(pod("web-1", "127.0.20.1"))
    server.apply({"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": "web", "namespace": "demo"},
                  "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.10",
                           "ports": [{"port": 80, "targetPort": 8080}]}})
    server.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "web", "namespace": "demo"}})
    server.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"name": "web-abc", "namespace": "demo"},
                  "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.20.1"]}]})
    server.apply({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "deny-all", "namespace": "demo"},
                  "spec": {"action": "DENY", "rules": [{}]}})
    list_version = server.resource_version
    async with running(cluster.api_client) as run:
        first = run.first
        assert first.namespaces["demo"]["metadata"]["labels"] == AMBIENT
        assert first.pods["demo/web-1"]["kind"] == "Pod"  # list items get apiVersion/kind
        assert list(first.nodes) == ["node-1"]
        assert list(first.services) == ["demo/web"]
        assert list(first.service_accounts) == ["demo/web"]
        assert list(first.endpoint_slices) == ["demo/web-abc"]
        assert list(first.authorization_policies) == ["demo/deny-all"]
        with trio.fail_after(5):
            await server.wait_until(lambda: server.watch_count() == 15)
        assert {watch.resource_version for watch in server.watches} == {list_version}
        assert all(watch.allow_bookmarks for watch in server.watches)


async def test_pod_added_relabelled_deleted(cluster: Cluster) -> None:
    server = cluster.server
    server.apply(namespace("demo", **AMBIENT))
    async with running(cluster.api_client, kinds=(NAMESPACES, PODS)) as run:
        assert run.first.pods == {}
        server.apply(pod("web-1", "127.0.20.1"))
        added = await run.until(lambda s: "demo/web-1" in s.pods)
        assert added.pods["demo/web-1"]["status"]["podIP"] == "127.0.20.1"
        server.apply(pod("web-1", "127.0.20.1", labels={"app": "web", "version": "v2"}))
        await run.until(
            lambda s: s.pods["demo/web-1"]["metadata"]["labels"].get("version") == "v2"
        )
        server.delete("pods", "web-1", "demo")
        await run.until(lambda s: s.pods == {})


async def test_namespace_enrolled_and_unenrolled(cluster: Cluster) -> None:
    server = cluster.server
    server.apply(namespace("demo"))
    async with running(cluster.api_client, kinds=(NAMESPACES, PODS)) as run:
        assert not run.first.namespaces["demo"]["metadata"].get("labels")
        server.apply(namespace("demo", **AMBIENT))
        await run.until(lambda s: s.namespaces["demo"]["metadata"].get("labels") == AMBIENT)
        server.apply(namespace("demo"))
        await run.until(lambda s: not s.namespaces["demo"]["metadata"].get("labels"))


async def test_dropped_watch_resumes_from_last_version_without_losing_events(
    cluster: Cluster,
) -> None:
    server = cluster.server
    server.apply(namespace("demo"))
    server.apply(pod("gone-soon", "127.0.20.9"))
    async with running(cluster.api_client, kinds=(NAMESPACES, PODS)) as run:
        with trio.fail_after(5):
            await server.wait_for_watches("pods")
        seen = server.apply(pod("web-1", "127.0.20.1"))
        await run.until(lambda s: "demo/web-1" in s.pods)
        last_seen_version = seen["metadata"]["resourceVersion"]
        server.apply(namespace("unrelated"))  # bumps the global version, not the pods watch

        assert await server.drop_watches() == 2
        # While disconnected: an add, a change and a delete the new watch must replay.
        server.apply(pod("web-2", "127.0.20.2"))
        server.apply(pod("web-1", "127.0.20.1", labels={"app": "web", "version": "v2"}))
        server.delete("pods", "gone-soon", "demo")

        final = await run.until(
            lambda s: sorted(s.pods) == ["demo/web-1", "demo/web-2"]
            and s.pods["demo/web-1"]["metadata"]["labels"].get("version") == "v2"
        )
        assert "unrelated" in final.namespaces
        watches = requests_to(server, "/api/v1/pods", watch=True)
        assert [query["resourceVersion"] for query in watches[1:]] == [last_seen_version]
        assert len(requests_to(server, "/api/v1/pods", watch=False)) == 1  # no relist


async def test_expired_version_relists_and_replaces_the_store(cluster: Cluster) -> None:
    server = cluster.server
    server.apply(namespace("demo"))
    server.apply(pod("old", "127.0.20.1"))
    server.apply(pod("kept", "127.0.20.2"))
    async with running(cluster.api_client, kinds=(NAMESPACES, PODS)) as run:
        with trio.fail_after(5):
            await server.wait_for_watches("pods")
        await server.drop_watches()
        # Changes while disconnected, then the history is compacted away: resuming gets 410.
        server.delete("pods", "old", "demo")
        server.apply(pod("new", "127.0.20.3"))
        server.compact()

        relisted = await run.until(lambda s: sorted(s.pods) == ["demo/kept", "demo/new"])
        assert relisted.pods["demo/new"]["status"]["podIP"] == "127.0.20.3"
        lists = requests_to(server, "/api/v1/pods", watch=False)
        assert len(lists) == 2
        watches = requests_to(server, "/api/v1/pods", watch=True)
        assert len(watches) == 3  # first, refused with 410, from the relist's version
        assert watches[2]["resourceVersion"] == server.resource_version  # the relist's


async def test_server_errors_back_off_then_recover(cluster: Cluster) -> None:
    server = cluster.server
    server.apply(namespace("demo"))
    server.fail_next(3, 500, path_contains="/api/v1/pods")
    with capture_logs() as logs:
        async with running(cluster.api_client, kinds=(NAMESPACES, PODS)) as run:
            assert len(requests_to(server, "/api/v1/pods", watch=False)) == 4
            assert run.first.pods == {}
            listed = pod_retries(logs)

            web_0 = server.apply(pod("web-0", "127.0.20.10"))  # a delivered event resets it
            await run.until(lambda s: "demo/web-0" in s.pods)
            server.fail_next(3, 503, path_contains="/api/v1/pods")
            await server.drop_watches()
            server.apply(pod("web-1", "127.0.20.1"))
            await run.until(lambda s: "demo/web-1" in s.pods)
            rewatched = pod_retries(logs)[len(listed):]
            watches = requests_to(server, "/api/v1/pods", watch=True)
            assert len(watches) == 5  # the first, three refused, the one that worked
            resumed_from = {query["resourceVersion"] for query in watches[1:]}
            assert resumed_from == {web_0["metadata"]["resourceVersion"]}
            assert len(requests_to(server, "/api/v1/pods", watch=False)) == 4  # no relist
    # Three failed LISTs, then (the backoff reset by a delivered event) the dropped watch and
    # three refused ones: each retry waited the policy's growing, jittered delay.
    assert [failures for failures, _delay in listed] == [1, 2, 3]
    assert [failures for failures, _delay in rewatched] == [1, 2, 3, 4]
    # FAST_BACKOFF: 0.05 s doubling, capped at 0.5 s, up to 25% shorter (jitter).
    for failures, delay in listed + rewatched:
        longest = min(0.5, 0.05 * 2 ** (failures - 1))
        assert round(0.75 * longest, 3) <= delay <= longest, (failures, delay)


def pod_retries(logs: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(failures, retry_in) of every retry the pods reflector logged, in order."""
    return [(e["failures"], e["retry_in"]) for e in logs
            if e.get("resource") == "pods" and "failures" in e and "retry_in" in e]


async def test_missing_crd_is_logged_once_retried_and_others_keep_working(
    cluster: Cluster,
) -> None:
    server = cluster.server
    server.apply(namespace("demo"))
    not_installed = WatchedKind("networking.istio.io/v1beta1", "VirtualService",
                                "virtualservices", crd=True)
    path = "/apis/networking.istio.io/v1beta1/virtualservices"
    with capture_logs() as logs:
        async with running(
            cluster.api_client, kinds=(NAMESPACES, PODS, not_installed), missing_kind_retry=0.05
        ) as run:
            assert run.first.virtual_services == {}
            server.apply(pod("web-1", "127.0.20.1"))
            await run.until(lambda s: "demo/web-1" in s.pods)
            with trio.fail_after(5):
                await server.wait_until(lambda: len(requests_to(server, path, watch=False)) >= 3)
    missing = [entry for entry in logs if "CRD not installed" in entry["event"]]
    assert len(missing) == 1
    assert missing[0]["resource"] == "virtualservices.networking.istio.io"


async def test_chunked_initial_list(cluster: Cluster) -> None:
    server = cluster.server
    server.apply(namespace("demo"))
    for index in range(120):
        server.apply(pod(f"web-{index:03}", f"127.0.21.{index + 1}"))
    list_version = server.resource_version
    async with running(cluster.api_client, kinds=(NAMESPACES, PODS), page_size=50) as run:
        assert len(run.first.pods) == 120
        lists = requests_to(server, "/api/v1/pods", watch=False)
        assert [query.get("limit") for query in lists] == ["50", "50", "50"]
        assert "continue" not in lists[0] and all("continue" in query for query in lists[1:])
        with trio.fail_after(5):
            await server.wait_for_watches("pods")
        watches = requests_to(server, "/api/v1/pods", watch=True)
        assert watches[0]["resourceVersion"] == list_version


async def test_bursts_are_coalesced_and_bookmarks_send_nothing(cluster: Cluster) -> None:
    server = cluster.server
    server.apply(namespace("demo"))
    async with running(cluster.api_client, kinds=(NAMESPACES, PODS),
                       coalesce_interval=0.1) as run:
        with trio.fail_after(5):
            await server.wait_for_watches("pods")
        for index in range(30):
            server.apply(pod(f"web-{index}", f"127.0.22.{index + 1}"))
            await trio.sleep(0)
        received: list[int] = []

        def all_pods(snapshot: ClusterObjects) -> bool:
            received.append(len(snapshot.pods))
            return len(snapshot.pods) == 30

        await run.until(all_pods)
        assert len(received) <= 4, received  # 30 events, a handful of snapshots
        # A bookmark moves the resume version only: no snapshot.
        server.send_bookmarks()
        with trio.move_on_after(0.3):
            extra = await run.snapshots.receive()
            pytest.fail(f"unexpected snapshot with {extra.count()} objects")
        bookmarked = server.resource_version
        await server.drop_watches()
        with trio.fail_after(5):
            await server.wait_for_watches("pods")
        pods_watch = [w for w in server.watches if w.resource == "pods"]
        assert pods_watch[0].resource_version == bookmarked  # resumed from the bookmark


async def test_cancelled_source_stops_its_threads(cluster: Cluster) -> None:
    before = non_idle_threads()
    async with running(cluster.api_client) as run:
        assert run.first.namespaces
        with trio.fail_after(5):
            await cluster.server.wait_until(lambda: cluster.server.watch_count() == 15)
        deadline = time.monotonic() + 5
        while len(busy_kube_threads()) < 15 and time.monotonic() < deadline:
            await trio.sleep(0.01)
        assert len(busy_kube_threads()) == 15  # one blocked read per watch
    deadline = time.monotonic() + 2
    while busy_kube_threads() and time.monotonic() < deadline:
        await trio.sleep(0.01)
    assert busy_kube_threads() == []
    # No thread the source started outlives it (threads other tests left may end meanwhile:
    # compare by identity, not by count).
    assert non_idle_threads() - before == set()
    with trio.fail_after(5):
        await cluster.server.wait_until(lambda: cluster.server.watch_count() == 0)


async def test_snapshots_become_workloads_in_the_discovery_store(cluster: Cluster) -> None:
    server = cluster.server
    server.apply(namespace("demo", **AMBIENT))
    server.apply(node("node-1", "127.0.10.1"))
    store = ResourceStore()
    source = KubernetesSource(cluster.api_client, resync_backoff=FAST_BACKOFF,
                              coalesce_interval=0.02)
    send, receive = trio.open_memory_channel[ClusterObjects](1)

    async def workloads_become(names: list[str]) -> None:
        with trio.fail_after(5):
            while sorted(w.name for w in store.workloads()) != names:
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed_store, receive, store, MeshConfig())
        await nursery.start(source.run, send)
        await store.wait_initialized()
        assert store.workloads() == []
        server.apply(pod("web-1", "127.0.20.1"))
        await workloads_become(["web-1"])
        (workload,) = store.workloads()
        assert workload.addresses == ("127.0.20.1",)
        assert workload.node == "node-1" and workload.namespace == "demo"
        server.delete("pods", "web-1", "demo")
        await workloads_become([])
        nursery.cancel_scope.cancel()
