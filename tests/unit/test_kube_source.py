"""The Kubernetes source's sans-IO parts: kinds, backoff, watch lines, the per-kind store, and
the thread-stopping helpers (with a socketpair standing in for a watch connection)."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException
from structlog.testing import capture_logs

from istiod_lite.kube.client import (
    ResponseLines,
    StreamAborted,
    open_response_lines,
    run_blocking,
)
from istiod_lite.sources.kube_watch import (
    DEFAULT_KINDS,
    LAST_APPLIED_ANNOTATION,
    Backoff,
    BackoffPolicy,
    KindStore,
    NotReady,
    ResourceExpired,
    StoreChange,
    WatchedKind,
    WatchFailed,
    list_function,
    parse_watch_line,
    prepare_object,
    slim_object,
)
from istiod_lite.sources.kubernetes import KubernetesSource, error_text
from istiod_lite.sources.objects import ClusterObjects

PODS = WatchedKind("v1", "Pod", "pods")
NAMESPACES = WatchedKind("v1", "Namespace", "namespaces")
SERVICES = WatchedKind("v1", "Service", "services")


def pod(name: str, *, ip: str = "10.0.0.1", node: str = "node-1", **labels: str) -> dict[str, Any]:
    """A pod as a LIST returns it: no apiVersion/kind on the item."""
    return {
        "metadata": {"name": name, "namespace": "demo", "labels": dict(labels),
                     "resourceVersion": "7"},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]},
        "status": {"podIP": ip, "phase": "Running"},
    }


# -- kinds -----------------------------------------------------------------------------------


def test_default_kinds_fill_every_cluster_objects_field() -> None:
    fields = {f.name for f in dataclasses.fields(ClusterObjects)}
    assert sorted(kind.field for kind in DEFAULT_KINDS) == sorted(fields)


def test_watched_kind_rejects_kinds_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="not a kind ClusterObjects holds"):
        WatchedKind("apps/v1", "Deployment", "deployments")
    with pytest.raises(ValueError, match="mark it crd=True"):
        WatchedKind("security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies")


def test_list_function_uses_typed_api_for_builtins_and_custom_objects_for_crds() -> None:
    api_client = kube_client.ApiClient(kube_client.Configuration())
    pods = list_function(api_client, PODS)
    assert pods.__name__ == "list_pod_for_all_namespaces"
    slices = list_function(api_client, WatchedKind("discovery.k8s.io/v1", "EndpointSlice",
                                                   "endpointslices"))
    assert slices.__name__ == "list_endpoint_slice_for_all_namespaces"
    gateways = list_function(api_client, DEFAULT_KINDS[6])
    assert isinstance(gateways, functools.partial)
    assert gateways.func.__name__ == "list_cluster_custom_object"
    assert gateways.args == ("gateway.networking.k8s.io", "v1", "gateways")


def test_duplicate_fields_are_refused() -> None:
    api_client = kube_client.ApiClient(kube_client.Configuration())
    twice = (WatchedKind("security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies",
                         crd=True),
             WatchedKind("security.istio.io/v1beta1", "AuthorizationPolicy",
                         "authorizationpolicies", crd=True))
    with pytest.raises(ValueError, match="authorization_policies"):
        KubernetesSource(api_client, kinds=twice)


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_exponentially_to_the_cap() -> None:
    policy = BackoffPolicy(initial=0.5, maximum=30.0, multiplier=2.0, jitter=0.25)
    assert [policy.delay(n, 0.0) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(10_000, 0.0) == 30.0  # no overflow after a long outage


def test_backoff_jitter_only_shortens_and_never_reaches_zero() -> None:
    policy = BackoffPolicy(initial=1.0, maximum=8.0, jitter=0.25)
    delays = [policy.delay(4, fraction / 100) for fraction in range(100)]
    assert max(delays) == 8.0
    assert min(delays) > 6.0


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"initial": 5, "maximum": 1}, {"multiplier": 0.5}, {"jitter": 1.0}],
)
def test_backoff_policy_rejects_busy_loops_and_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)


def test_backoff_first_free_failure_then_waits_and_reset() -> None:
    backoff = Backoff(BackoffPolicy(initial=1.0, jitter=0.0), random.Random(1))
    assert backoff.next_delay(first_is_free=True) == 0.0
    assert backoff.next_delay(first_is_free=True) == 2.0  # a second 410 in a row waits
    assert backoff.next_delay() == 4.0
    backoff.reset()
    assert backoff.next_delay() == 1.0


# -- watch lines -----------------------------------------------------------------------------


def test_parse_watch_line_events_and_bookmarks() -> None:
    added = parse_watch_line(json.dumps({"type": "ADDED", "object": pod("a")}))
    assert added is not None and added.type == "ADDED" and added.resource_version == "7"
    bookmark = parse_watch_line(
        '{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"42"}}}'
    )
    assert bookmark is not None and bookmark.type == "BOOKMARK"
    assert bookmark.resource_version == "42"
    assert parse_watch_line("") is None
    assert parse_watch_line("  ") is None


def test_parse_watch_line_errors() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version: 1 (5)"}}
    with pytest.raises(ResourceExpired, match="too old resource version"):
        parse_watch_line(json.dumps(gone))
    failure = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}}
    with pytest.raises(WatchFailed, match="code 500.*boom"):
        parse_watch_line(json.dumps(failure))
    with pytest.raises(WatchFailed, match="not JSON"):
        parse_watch_line('{"type": "ADDED", ')
    with pytest.raises(WatchFailed, match="unknown watch event type 'SYNC'"):
        parse_watch_line('{"type": "SYNC", "object": {}}')
    with pytest.raises(WatchFailed, match="no object"):
        parse_watch_line('{"type": "ADDED"}')
    with pytest.raises(WatchFailed, match="not a JSON object"):
        parse_watch_line("[1]")


# -- objects ---------------------------------------------------------------------------------


def test_slim_object_drops_write_only_metadata_without_touching_the_input() -> None:
    raw = pod("a")
    raw["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    raw["metadata"]["annotations"] = {LAST_APPLIED_ANNOTATION: "{...}", "keep": "me"}
    slim = slim_object(raw)
    assert "managedFields" not in slim["metadata"]
    assert slim["metadata"]["annotations"] == {"keep": "me"}
    assert "managedFields" in raw["metadata"]  # the caller's dict is unchanged
    raw["metadata"]["annotations"] = {LAST_APPLIED_ANNOTATION: "{...}"}
    assert "annotations" not in slim_object(raw)["metadata"]


def test_prepare_object_sets_kind_and_validates() -> None:
    obj = prepare_object(PODS, pod("a"))
    assert obj["apiVersion"] == "v1" and obj["kind"] == "Pod"
    with pytest.raises(NotReady):
        prepare_object(PODS, pod("pending", ip=""))
    bad_service = {"metadata": {"name": "web", "namespace": "demo"},
                   "spec": {"ports": [{"port": 70000}]}}
    with pytest.raises(ValueError, match="Service demo/web: spec.ports\\[0\\].port"):
        prepare_object(SERVICES, bad_service)
    with pytest.raises(ValueError, match="expected an object"):
        prepare_object(PODS, ["not", "an", "object"])


def test_cluster_objects_hold_endpoint_slices() -> None:
    endpoint_slice = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": "web-abc", "namespace": "demo"},
                      "addressType": "IPv4", "endpoints": []}
    objects = ClusterObjects.from_objects([endpoint_slice])
    assert list(objects.endpoint_slices) == ["demo/web-abc"]
    assert objects.count() == 1


# -- the per-kind store ----------------------------------------------------------------------


def test_store_replace_reports_added_modified_deleted() -> None:
    store = KindStore(PODS)
    assert store.replace([pod("a"), pod("b")]) == StoreChange(added=("demo/a", "demo/b"))
    assert store.replace([pod("a"), pod("b")]) == StoreChange()  # identical relist: no change
    change = store.replace([pod("a", app="v2"), pod("c")])
    assert change == StoreChange(added=("demo/c",), modified=("demo/a",), deleted=("demo/b",))
    assert sorted(store.objects) == ["demo/a", "demo/c"]


def test_store_skips_invalid_objects_and_logs_each_reason_once() -> None:
    store = KindStore(SERVICES)
    good = {"metadata": {"name": "good", "namespace": "demo"}, "spec": {"ports": [{"port": 80}]}}
    bad = {"metadata": {"name": "bad", "namespace": "demo"}, "spec": {"ports": [{"port": 0}]}}
    with capture_logs() as logs:
        change = store.replace([good, bad])
        store.replace([good, bad])
        store.apply("MODIFIED", bad)
    assert change == StoreChange(added=("demo/good",))
    assert list(store.objects) == ["demo/good"]
    warnings = [entry for entry in logs if entry["event"] == "invalid object skipped"]
    assert len(warnings) == 1
    assert warnings[0]["key"] == "demo/bad" and "spec.ports[0].port" in warnings[0]["reason"]


def test_store_events() -> None:
    store = KindStore(PODS)
    assert store.apply("ADDED", pod("a")) == StoreChange(added=("demo/a",))
    assert store.apply("MODIFIED", pod("a")) == StoreChange()
    assert store.apply("MODIFIED", pod("a", app="x")) == StoreChange(modified=("demo/a",))
    assert store.objects["demo/a"]["metadata"]["labels"] == {"app": "x"}
    # A pod losing its IP (or becoming invalid) is no longer served, not served stale.
    assert store.apply("MODIFIED", pod("a", ip="")) == StoreChange(deleted=("demo/a",))
    assert store.rejected == {"demo/a": "not scheduled or no pod IP yet"}
    assert store.apply("MODIFIED", pod("a")) == StoreChange(added=("demo/a",))
    assert store.rejected == {}
    assert store.apply("DELETED", pod("a")) == StoreChange(deleted=("demo/a",))
    assert store.apply("DELETED", pod("a")) == StoreChange()
    with pytest.raises(ValueError):
        store.apply("BOOKMARK", pod("a"))


def test_cluster_scoped_keys() -> None:
    store = KindStore(NAMESPACES)
    store.apply("ADDED", {"metadata": {"name": "demo", "labels": {"a": "b"}}})
    assert list(store.objects) == ["demo"]
    assert store.apply("DELETED", {"metadata": {"name": "demo"}}) == StoreChange(
        deleted=("demo",)
    )


def test_error_text_is_one_line() -> None:
    status = {"kind": "Status", "code": 404, "reason": "NotFound",
              "message": 'the server could not find the requested resource'}
    error = ApiException(status=404, reason="Not Found")
    error.body = json.dumps(status)
    assert error_text(error) == (
        "HTTP 404 Not Found: the server could not find the requested resource"
    )
    assert error_text(ApiException(status=500, reason="Internal Server Error")) == (
        "HTTP 500 Internal Server Error"
    )


# -- stopping threads ------------------------------------------------------------------------


class SocketResponse:
    """Just enough of a urllib3 streaming response, reading a socket, for ``ResponseLines``."""

    def __init__(self, sock: socket.socket) -> None:
        self.connection = self
        self.sock = sock
        self.closed = 0
        self.released = 0

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        while True:
            data = self.sock.recv(4096)
            if not data:
                return
            yield data

    def close(self) -> None:
        self.closed += 1
        self.sock.close()

    def release_conn(self) -> None:
        self.released += 1


async def test_response_lines_reads_lines_and_abort_wakes_a_blocked_reader() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        response = SocketResponse(ours)
        lines = ResponseLines(response)
        theirs.sendall(b'{"a": 1}\n\n{"b"')
        assert await trio.to_thread.run_sync(lines.next_line) == '{"a": 1}'
        assert await trio.to_thread.run_sync(lines.next_line) == ""
        with trio.move_on_after(0.1):
            # Blocked on the incomplete line: cancellation abandons the thread and aborts.
            await run_blocking(lines.next_line, name="test read", on_abandon=lines.abort)
        deadline = time.monotonic() + 2
        while response.closed == 0 and time.monotonic() < deadline:
            await trio.sleep(0.01)
        assert response.closed == 1 and response.released == 1
        assert not [t for t in threading.enumerate() if t.name == "test read"]
        with pytest.raises(StreamAborted):
            lines.next_line()
        lines.abort()  # idempotent
        assert response.closed == 1


async def test_response_lines_end_of_stream() -> None:
    ours, theirs = socket.socketpair()
    response = SocketResponse(ours)
    lines = ResponseLines(response)
    theirs.sendall(b"last\n")
    theirs.close()
    assert await trio.to_thread.run_sync(lines.next_line) == "last"
    assert await trio.to_thread.run_sync(lines.next_line) is None
    lines.abort()  # nobody reading: closes directly
    assert response.closed == 1


async def test_open_response_lines_cancelled_while_opening_aborts_the_late_response() -> None:
    ours, theirs = socket.socketpair()
    release = threading.Event()
    response = SocketResponse(ours)

    def slow_open() -> SocketResponse:
        release.wait(5)
        return response

    with trio.move_on_after(0.05):
        await open_response_lines(slow_open, name="test open")
    release.set()
    deadline = time.monotonic() + 2
    while response.closed == 0 and time.monotonic() < deadline:
        await trio.sleep(0.01)
    assert response.closed == 1
    theirs.close()
