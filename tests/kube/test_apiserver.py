"""Protocol fidelity of the Kubernetes API stand-in, driven by the real ``kubernetes`` client.

Every client call runs in a worker thread (the client blocks), the stand-in on the Trio loop.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import h11
import pytest
import trio
import urllib3
from kubernetes import client, watch
from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException
from kubernetes.config import new_client_from_config

from tests.conftest import LoopbackAllocator
from tests.kube.apiserver import FakeKubeApiServer, RecordedRequest, TokenReviewAnswer

T = TypeVar("T")


async def in_thread(function: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(function)


def pod(name: str, namespace: str = "default", labels: dict[str, str] | None = None,
        node: str = "node-1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
    }


@pytest.fixture
async def kube(
    loopback: LoopbackAllocator, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[tuple[FakeKubeApiServer, ApiClient]]:
    server: FakeKubeApiServer = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    path = server.write_kubeconfig(tmp_path / "kubeconfig")
    api = new_client_from_config(config_file=str(path))
    yield server, api
    api.close()


def collect_watch(
    core: client.CoreV1Api, *, until_bookmark: bool = False, **kwargs: Any
) -> list[tuple[str, str, str]]:
    """Run a pods watch to its end, or its first BOOKMARK: (type, name, resourceVersion)
    per event."""
    events = []
    watcher = watch.Watch()
    for event in watcher.stream(core.list_namespaced_pod, "default", **kwargs):
        meta = event["raw_object"]["metadata"]
        events.append((event["type"], meta.get("name", ""), meta["resourceVersion"]))
        if until_bookmark and event["type"] == "BOOKMARK":
            watcher.stop()
    return events


async def test_list_then_watch_from_its_resource_version(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.apply(pod("a"))
    listed = await in_thread(lambda: core.list_namespaced_pod("default"))
    assert listed.kind == "PodList"
    assert [p.metadata.name for p in listed.items] == ["a"]
    list_version = listed.metadata.resource_version
    assert list_version == server.resource_version
    server.apply(pod("before-watch"))  # after the list, before the watch: must still arrive

    async with trio.open_nursery() as nursery:
        result: list[list[tuple[str, str, str]]] = []

        async def watch_pods() -> None:
            result.append(await in_thread(lambda: collect_watch(
                core, resource_version=list_version, allow_watch_bookmarks=True,
                until_bookmark=True)))

        nursery.start_soon(watch_pods)
        await server.wait_for_watches("pods")
        server.apply({**pod("a"), "metadata": {**pod("a")["metadata"], "labels": {"v": "2"}}})
        server.delete("pods", "a", "default")
        server.send_bookmarks()
    events = result[0]
    assert [(t, n) for t, n, _ in events] == [
        ("ADDED", "before-watch"), ("MODIFIED", "a"), ("DELETED", "a"), ("BOOKMARK", ""),
    ]
    versions = [int(v) for _, _, v in events]
    assert versions == sorted(versions) and versions[-1] == int(server.resource_version)
    watch_request = server.requests[-1]
    assert watch_request.query["resourceVersion"] == list_version
    assert watch_request.query["watch"] in ("true", "True")


async def test_watch_without_resource_version_starts_with_the_current_state(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.apply(pod("b"))
    server.apply(pod("a"))
    server.apply(pod("elsewhere", namespace="other"))
    async with trio.open_nursery() as nursery:
        result: list[list[tuple[str, str, str]]] = []

        async def watch_pods() -> None:
            result.append(await in_thread(lambda: collect_watch(
                core, allow_watch_bookmarks=True, until_bookmark=True)))

        nursery.start_soon(watch_pods)
        await server.wait_for_watches("pods")
        server.send_bookmarks()
    assert [(t, n) for t, n, _ in result[0]] == [("ADDED", "a"), ("ADDED", "b"), ("BOOKMARK", "")]


async def test_send_initial_events_ends_with_an_annotated_bookmark(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.apply(pod("a"))
    events: list[dict[str, Any]] = []

    def watch_initial() -> None:
        watcher = watch.Watch()
        for event in watcher.stream(core.list_namespaced_pod, "default",
                                    send_initial_events=True, allow_watch_bookmarks=True,
                                    resource_version_match="NotOlderThan"):
            events.append(event["raw_object"])
            if event["type"] == "BOOKMARK":
                watcher.stop()

    await in_thread(watch_initial)
    assert [e["metadata"].get("name") for e in events] == ["a", None]
    assert events[1]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert events[1]["metadata"]["resourceVersion"] == server.resource_version


async def test_watch_from_a_compacted_resource_version_raises_410(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.apply(pod("a"))
    old = server.resource_version
    server.apply(pod("b"))
    server.compact()

    # With timeoutSeconds the client does not retry: the ERROR event becomes ApiException.
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: collect_watch(core, resource_version=old, timeout_seconds=5))
    assert raised.value.status == 410
    assert "Expired" in str(raised.value.reason)

    # Without it the client retries once from the same version, then raises.
    before = len(server.requests)
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: collect_watch(core, resource_version=old))
    assert raised.value.status == 410
    assert [r.query.get("resourceVersion") for r in server.requests[before:]] == [old, old]

    # A watch from the current version is fine.
    # A watch from the current version is fine; timeoutSeconds ends it cleanly.
    current = server.resource_version
    assert await in_thread(
        lambda: collect_watch(core, resource_version=current, timeout_seconds=1)) == []


async def test_label_selector_watch_sees_objects_enter_and_leave(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.apply(pod("p", labels={"app": "web"}))
    start = server.resource_version
    async with trio.open_nursery() as nursery:
        result: list[list[tuple[str, str, str]]] = []

        async def watch_selected() -> None:
            result.append(await in_thread(lambda: collect_watch(
                core, resource_version=start, allow_watch_bookmarks=True, until_bookmark=True,
                label_selector="app in (web,api),tier!=db")))

        nursery.start_soon(watch_selected)
        await server.wait_for_watches("pods")
        server.apply(pod("p", labels={"app": "other"}))  # leaves -> DELETED
        server.apply(pod("p", labels={"app": "api"}))  # enters -> ADDED
        server.apply(pod("p", labels={"app": "api", "tier": "db"}))  # leaves again
        server.apply(pod("q", labels={"app": "web"}))
        server.apply(pod("r", labels={"app": "none"}))
        server.send_bookmarks()
    assert [(t, n) for t, n, _ in result[0]] == [
        ("DELETED", "p"), ("ADDED", "p"), ("DELETED", "p"), ("ADDED", "q"), ("BOOKMARK", ""),
    ]


async def test_list_selectors(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.apply(pod("a", labels={"app": "web"}, node="n1"))
    server.apply(pod("b", labels={"app": "web"}, node="n2"))
    server.apply(pod("c", namespace="other", node="n1"))

    def names(**kwargs: Any) -> list[str]:
        return [p.metadata.name for p in core.list_pod_for_all_namespaces(**kwargs).items]

    assert await in_thread(lambda: names()) == ["a", "b", "c"]
    assert await in_thread(lambda: names(label_selector="app=web")) == ["a", "b"]
    assert await in_thread(lambda: names(label_selector="!app")) == ["c"]
    assert await in_thread(lambda: names(field_selector="spec.nodeName=n1")) == ["a", "c"]
    assert await in_thread(
        lambda: names(field_selector="spec.nodeName=n1,metadata.namespace!=other")) == ["a"]
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: names(field_selector="spec.bogus=1"))
    assert raised.value.status == 400
    assert "field label not supported: spec.bogus" in str(raised.value.body)


async def test_chunked_list_is_a_consistent_snapshot(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    for index in range(5):
        server.apply(pod(f"p{index}"))
    first = await in_thread(lambda: core.list_namespaced_pod("default", limit=2))
    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    assert first.metadata.remaining_item_count == 3
    token = first.metadata._continue
    server.apply(pod("p00"))  # written between pages: not in this list
    server.delete("pods", "p4", "default")
    second = await in_thread(lambda: core.list_namespaced_pod("default", limit=2, _continue=token))
    third = await in_thread(lambda: core.list_namespaced_pod(
        "default", limit=2, _continue=second.metadata._continue))
    assert [p.metadata.name for p in second.items + third.items] == ["p2", "p3", "p4"]
    assert third.metadata._continue is None
    assert first.metadata.resource_version == third.metadata.resource_version

    again = await in_thread(lambda: core.list_namespaced_pod("default", limit=1))
    server.compact()
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: core.list_namespaced_pod(
            "default", limit=1, _continue=again.metadata._continue))
    assert raised.value.status == 410


async def test_dropped_watch_mid_stream_fails_the_read(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    start = server.resource_version
    async with trio.open_nursery() as nursery:
        seen: list[str] = []
        failure: list[BaseException] = []

        def watch_until_dropped() -> None:
            try:
                for event in watch.Watch().stream(core.list_namespaced_pod, "default",
                                                  resource_version=start):
                    seen.append(event["raw_object"]["metadata"]["name"])
            except urllib3.exceptions.ProtocolError as error:
                failure.append(error)

        nursery.start_soon(in_thread, watch_until_dropped)
        await server.wait_for_watches("pods")
        server.apply(pod("a"))
        await server.wait_until(lambda: seen == ["a"])
        assert await server.drop_watches() == 1
    assert len(failure) == 1
    assert server.watch_count() == 0


async def test_graceful_end_resumes_from_the_last_version_without_losing_events(
    kube: Any,
) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    start = server.resource_version
    async with trio.open_nursery() as nursery:
        seen: list[tuple[str, str]] = []
        stopper = watch.Watch()

        def watch_forever() -> None:
            for event in stopper.stream(core.list_namespaced_pod, "default",
                                        resource_version=start):
                seen.append((event["type"], event["raw_object"]["metadata"]["name"]))
                if len(seen) == 3:
                    stopper.stop()

        nursery.start_soon(in_thread, watch_forever)
        await server.wait_for_watches("pods")
        server.apply(pod("a"))
        await server.wait_until(lambda: len(seen) == 1)
        resume_from = server.resource_version
        assert await server.drop_watches(graceful=True) == 1
        server.apply(pod("b"))  # written while no watch is open
        await server.wait_for_watches("pods")
        server.delete("pods", "a", "default")
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a")]
    watch_requests = [r for r in server.requests if r.query.get("watch")]
    assert [r.query["resourceVersion"] for r in watch_requests] == [start, resume_from]


async def test_custom_objects_and_status_subresource(kube: Any) -> None:
    server, api = kube
    custom: Any = client.CustomObjectsApi(api)
    group, version, plural = "gateway.networking.k8s.io", "v1", "gateways"
    gateway = {
        "apiVersion": f"{group}/{version}",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "default"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": []},
        "status": {"ignored": "on create"},
    }
    created = await in_thread(lambda: custom.create_namespaced_custom_object(
        group, version, "default", plural, gateway))
    assert created["metadata"]["generation"] == 1
    assert created["status"] == {}
    status = {"status": {"conditions": [{"type": "Programmed", "status": "True"}]}}
    patched = await in_thread(lambda: custom.patch_namespaced_custom_object_status(
        group, version, "default", plural, "waypoint", status))
    assert patched["status"] == status["status"]
    assert patched["metadata"]["generation"] == 1
    # A spec write keeps the status and bumps the generation.
    spec_patch = {"spec": {"gatewayClassName": "other"}, "status": {"conditions": []}}
    updated = await in_thread(lambda: custom.patch_namespaced_custom_object(
        group, version, "default", plural, "waypoint", spec_patch))
    assert updated["status"] == status["status"]
    assert updated["metadata"]["generation"] == 2
    listed = await in_thread(lambda: custom.list_cluster_custom_object(group, version, plural))
    assert [g["metadata"]["name"] for g in listed["items"]] == ["waypoint"]
    # Strategic merge patch is for built-in types only, as on a real server.
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: custom.patch_namespaced_custom_object(
            group, version, "default", plural, "waypoint", spec_patch,
            _content_type="application/strategic-merge-patch+json"))
    assert raised.value.status == 415


async def test_deployment_create_errors_and_garbage_collection(kube: Any) -> None:
    server, api = kube
    apps: Any = client.AppsV1Api(api)
    core: Any = client.CoreV1Api(api)
    owner = server.apply({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "default"}, "spec": {},
    })
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="wp", owner_references=[client.V1OwnerReference(
            api_version="gateway.networking.k8s.io/v1", kind="Gateway", name="wp",
            uid=owner["metadata"]["uid"], controller=True)]),
        spec=client.V1DeploymentSpec(
            selector=client.V1LabelSelector(match_labels={"app": "wp"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "wp"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="i")]),
            ),
        ),
    )
    created = await in_thread(lambda: apps.create_namespaced_deployment("default", deployment))
    assert created.metadata.uid and created.metadata.generation == 1

    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: apps.create_namespaced_deployment("default", deployment))
    assert raised.value.status == 409 and '"reason":"AlreadyExists"' in str(raised.value.body)
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: apps.create_namespaced_deployment("missing-ns", deployment))
    assert raised.value.status == 404
    assert 'namespaces \\"missing-ns\\" not found' in str(raised.value.body)
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: core.create_namespaced_config_map(
            "default", {"metadata": {}, "data": {}}))
    assert raised.value.status == 422
    assert "metadata.name: Required value" in str(raised.value.body)
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: apps.read_namespaced_deployment("nope", "default"))
    assert raised.value.status == 404

    server.delete("gateways", "wp", "default")
    with trio.fail_after(2):
        await server.wait_until(lambda: server.get("deployments", "wp", "default") is None)


async def test_deleting_a_namespace_empties_it(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    await in_thread(lambda: core.create_namespace({"metadata": {"name": "demo"}}))
    server.apply(pod("a", namespace="demo"))
    await in_thread(lambda: core.delete_namespace("demo"))
    terminating = server.get("namespaces", "demo")
    assert terminating is not None and terminating["status"]["phase"] == "Terminating"
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: core.create_namespaced_config_map(
            "demo", {"metadata": {"name": "late"}}))
    assert raised.value.status == 403
    with trio.fail_after(2):
        await server.wait_until(lambda: server.get("namespaces", "demo") is None)
    assert server.objects("pods", "demo") == []


async def test_lease_replace_with_a_stale_version_conflicts(kube: Any) -> None:
    server, api = kube
    coordination: Any = client.CoordinationV1Api(api)
    lease = client.V1Lease(metadata=client.V1ObjectMeta(name="istiod-leader"),
                           spec=client.V1LeaseSpec(holder_identity="a"))
    created = await in_thread(lambda: coordination.create_namespaced_lease("default", lease))
    created.spec.holder_identity = "b"
    renewed = await in_thread(lambda: coordination.replace_namespaced_lease(
        "istiod-leader", "default", created))
    assert renewed.spec.holder_identity == "b"
    assert int(renewed.metadata.resource_version) > int(created.metadata.resource_version)
    created.spec.holder_identity = "c"  # still carries the old resourceVersion
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: coordination.replace_namespaced_lease(
            "istiod-leader", "default", created))
    assert raised.value.status == 409 and '"reason":"Conflict"' in str(raised.value.body)
    # A write that changes nothing keeps the version (no watch event).
    same = await in_thread(lambda: coordination.replace_namespaced_lease(
        "istiod-leader", "default", renewed))
    assert same.metadata.resource_version == renewed.metadata.resource_version


async def test_token_review(kube: Any) -> None:
    server, api = kube
    auth: Any = client.AuthenticationV1Api(api)
    server.token_reviews["pod-token"] = TokenReviewAnswer(
        username="system:serviceaccount:demo:client", audiences=("istio-ca",),
        pod_name="client-1", pod_uid="uid-1")

    def review(token: str, audiences: list[str] | None) -> Any:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token,
                                                                  audiences=audiences))
        return auth.create_token_review(body).status

    good = await in_thread(lambda: review("pod-token", ["istio-ca"]))
    assert good.authenticated is True
    assert good.user.username == "system:serviceaccount:demo:client"
    assert "system:serviceaccounts:demo" in good.user.groups
    assert good.user.extra["authentication.kubernetes.io/pod-name"] == ["client-1"]
    assert good.audiences == ["istio-ca"]
    wrong_audience = await in_thread(lambda: review("pod-token", ["other"]))
    assert not wrong_audience.authenticated and "audiences" in wrong_audience.error
    default_audience = await in_thread(lambda: review("pod-token", None))
    assert not default_audience.authenticated
    unknown = await in_thread(lambda: review("nobody", ["istio-ca"]))
    assert not unknown.authenticated and unknown.error


async def test_require_token_and_injected_failures(kube: Any, tmp_path: Path) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.require_token = True
    assert (await in_thread(lambda: core.read_namespace("default"))).metadata.name == "default"
    stranger = new_client_from_config(
        config_file=str(server.write_kubeconfig(tmp_path / "other", token="unknown")))
    server.tokens.discard("unknown")
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: client.CoreV1Api(stranger).read_namespace("default"))
    assert raised.value.status == 401
    stranger.close()

    server.fail_next(2, 503, path_contains="/pods")
    for _ in range(2):
        with pytest.raises(ApiException) as raised:
            await in_thread(lambda: core.list_namespaced_pod("default"))
        assert raised.value.status == 503
    await in_thread(lambda: core.read_namespace("default"))
    assert (await in_thread(lambda: core.list_namespaced_pod("default"))).items == []
    assert server.requests[-1] == RecordedRequest("GET", "/api/v1/namespaces/default/pods", {})


async def test_pod_proxy_forwards_to_the_registered_port(
    kube: Any, loopback: LoopbackAllocator, nursery: trio.Nursery
) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    admin_host = loopback.new()

    async def admin(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        target = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif isinstance(event, h11.Request):
                target = event.target
            elif isinstance(event, h11.EndOfMessage):
                break
        body = b'{"path": "' + target + b'"}'
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("content-type", "application/json"), ("content-length", str(len(body)))])))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, admin, 0,
                                                      host=admin_host))
    port = listeners[0].socket.getsockname()[1]
    server.apply(pod("ztunnel-x", namespace="istio-system"))
    server.pod_proxy_targets[("istio-system", "ztunnel-x", 15000)] = (admin_host, port)
    answer = await in_thread(lambda: core.connect_get_namespaced_pod_proxy_with_path(
        "ztunnel-x:15000", "istio-system", "config_dump"))
    assert "/config_dump" in answer
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: core.connect_get_namespaced_pod_proxy_with_path(
            "ztunnel-x:15001", "istio-system", "config_dump"))
    assert raised.value.status == 503


async def raw_request(
    server: FakeKubeApiServer, method: str, target: str, body: bytes = b"",
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 exchange without the client, for inputs the client never sends."""
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", server.host), ("content-type", content_type),
                   ("content-length", str(len(body)))]
        await stream.send_all(conn.send(h11.Request(method=method, target=target,
                                                    headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, answer = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, json.loads(answer)


async def test_bad_input_gets_status_errors_and_the_server_keeps_serving(kube: Any) -> None:
    server, api = kube
    garbage = await trio.open_tcp_stream(server.host, server.port)
    async with garbage:
        await garbage.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        assert (await garbage.receive_some(4096)).startswith(b"HTTP/1.1 400")
    maps = "/api/v1/namespaces/default/configmaps"
    status, body = await raw_request(server, "POST", maps, b"{not json")
    assert (status, body["reason"]) == (400, "BadRequest")
    status, body = await raw_request(server, "POST", maps, b'{"kind": "Secret"}')
    assert status == 400 and "does not match the expected kind" in body["message"]
    status, body = await raw_request(server, "GET", "/apis/nope.example/v1/things")
    assert (status, body["reason"]) == (404, "NotFound")
    status, body = await raw_request(server, "GET", "/apis/authentication.k8s.io/v1/tokenreviews")
    assert status == 405
    status, body = await raw_request(server, "GET", f"{maps}?watch=maybe")
    assert status == 400

    manifest = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\ndata:\n  k: v\n"
    apply_type = "application/apply-patch+yaml"
    status, body = await raw_request(server, "PATCH", f"{maps}/applied", manifest, apply_type)
    assert (status, body["reason"]) == (422, "Invalid")
    status, body = await raw_request(server, "PATCH", f"{maps}/applied?fieldManager=test",
                                     manifest, apply_type)
    assert status == 201 and body["data"] == {"k": "v"}
    status, body = await raw_request(server, "PATCH", f"{maps}/applied", b'{"data": {}}',
                                     "application/json-patch+json")
    assert status == 400
    status, body = await raw_request(
        server, "PATCH", f"{maps}/applied",
        b'[{"op": "test", "path": "/data/k", "value": "other"}]', "application/json-patch+json")
    assert status == 422

    server.apply({"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "labelled", "namespace": "default",
                               "labels": {"drop": "yes"}}})
    status, body = await raw_request(server, "DELETE", f"{maps}?labelSelector=drop%3Dyes")
    assert status == 200 and [i["metadata"]["name"] for i in body["items"]] == ["labelled"]
    assert [m["metadata"]["name"] for m in server.objects("configmaps")] == ["applied"]
    # Still serving the real client after all of that.
    core: Any = client.CoreV1Api(api)
    assert (await in_thread(lambda: core.read_namespace("default"))).metadata.name == "default"


async def test_watch_request_can_fail_and_discovery_is_served(kube: Any) -> None:
    server, api = kube
    core: Any = client.CoreV1Api(api)
    server.fail_next(1, 500, path_contains="/pods")
    with pytest.raises(ApiException) as raised:
        await in_thread(lambda: collect_watch(core, timeout_seconds=1))
    assert raised.value.status == 500
    groups = await in_thread(lambda: client.ApisApi(api).get_api_versions())
    assert "gateway.networking.k8s.io" in [g.name for g in groups.groups]
    resources = await in_thread(lambda: client.CoreV1Api(api).get_api_resources())
    assert {"pods", "pods/status", "namespaces"} <= {r.name for r in resources.resources}


async def test_periodic_bookmarks(loopback: LoopbackAllocator, tmp_path: Path,
                                  nursery: trio.Nursery) -> None:
    server: FakeKubeApiServer = await nursery.start(functools.partial(
        FakeKubeApiServer.serve, loopback.new(), bookmark_interval=0.05))
    api = new_client_from_config(config_file=str(server.write_kubeconfig(tmp_path / "kc")))
    core: Any = client.CoreV1Api(api)
    start = server.resource_version
    events = await in_thread(lambda: collect_watch(
        core, resource_version=start, allow_watch_bookmarks=True, until_bookmark=True))
    assert events == [("BOOKMARK", "", start)]
    api.close()
