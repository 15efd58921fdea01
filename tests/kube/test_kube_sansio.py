"""The stand-in's sans-IO parts: selectors, patches and the store's write rules."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kube.patches import PatchError, json_patch, merge_patch
from tests.kube.resources import resource_named
from tests.kube.selectors import SelectorError, parse_field_selector, parse_label_selector
from tests.kube.store import MERGE_PATCH, ApiError, ObjectStore


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("app=web", {"app": "web"}, True),
        ("app==web", {"app": "api"}, False),
        ("app!=web", {}, True),
        ("app!=web", {"app": "web"}, False),
        ("app in (web, api)", {"app": "api"}, True),
        ("app notin (web)", {}, True),
        ("app notin (web)", {"app": "web"}, False),
        ("app", {"app": ""}, True),
        ("!app", {"app": "x"}, False),
        ("istio.io/dataplane-mode=ambient,!istio.io/use-waypoint",
         {"istio.io/dataplane-mode": "ambient"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_label_selector(selector).matches(labels) is expected


@pytest.mark.parametrize("selector", ["app in (web", "a=b=c", "app in ()", "-bad=x", "a,,b"])
def test_bad_label_selectors_are_rejected(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_field_selectors() -> None:
    obj = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}}
    assert parse_field_selector("spec.nodeName=n1,metadata.name==p", "pods").matches(obj)
    assert not parse_field_selector("metadata.namespace!=ns", "pods").matches(obj)
    with pytest.raises(SelectorError, match="field label not supported: spec.nodeName"):
        parse_field_selector("spec.nodeName=n1", "services")


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": {"b": 1, "c": 2}, "list": [1, 2]}
    assert merge_patch(target, {"a": {"b": None, "d": 3}, "list": [3]}) == {
        "a": {"c": 2, "d": 3}, "list": [3],
    }
    assert target == {"a": {"b": 1, "c": 2}, "list": [1, 2]}  # not mutated


def test_json_patch_operations_and_failures() -> None:
    doc = {"metadata": {"labels": {"a/b": "1"}}, "items": [1, 2]}
    patched = json_patch(doc, [
        {"op": "test", "path": "/metadata/labels/a~1b", "value": "1"},
        {"op": "add", "path": "/items/-", "value": 3},
        {"op": "replace", "path": "/items/0", "value": 0},
        {"op": "move", "from": "/metadata/labels/a~1b", "path": "/moved"},
        {"op": "copy", "from": "/moved", "path": "/copied"},
        {"op": "remove", "path": "/items/1"},
    ])
    assert patched == {"metadata": {"labels": {}}, "items": [0, 3], "moved": "1", "copied": "1"}
    for bad in (
        [{"op": "test", "path": "/items/0", "value": 9}],
        [{"op": "remove", "path": "/missing"}],
        [{"op": "replace", "path": "/items/5", "value": 1}],
        [{"op": "frobnicate", "path": "/items"}],
    ):
        with pytest.raises(PatchError):
            json_patch(doc, bad)


def test_store_writes_versions_history_and_expiry() -> None:
    store = ObjectStore(history_limit=2)
    pods, namespaces = resource_named("pods"), resource_named("Namespace")
    store.create(namespaces, None, {"metadata": {"name": "ns"}})
    created = store.create(pods, "ns", {"metadata": {"name": "p"}, "spec": {"x": 1},
                                        "status": {"podIP": "1.2.3.4"}})
    assert created["status"] == {"phase": "Pending"}  # a client create cannot set status
    assert created["metadata"]["generation"] == 1
    patched, _ = store.patch(pods, "ns", "p", MERGE_PATCH, b'{"metadata":{"labels":{"a":"b"}}}')
    assert patched["metadata"]["generation"] == 1  # metadata only
    respec, _ = store.patch(pods, "ns", "p", MERGE_PATCH, b'{"spec":{"x":2}}')
    assert respec["metadata"]["generation"] == 2
    stale = dict(created, spec={"x": 3})
    with pytest.raises(ApiError) as raised:
        store.update(pods, "ns", "p", stale)
    assert raised.value.code == 409
    # history_limit=2: only the last two pod changes remain; older watches get 410.
    created_version = int(created["metadata"]["resourceVersion"])
    with pytest.raises(ApiError) as raised:
        store.changes_after("pods", created_version - 1)
    assert raised.value.code == 410
    assert [c.type for c in store.changes_after("pods", created_version)] == [
        "MODIFIED", "MODIFIED",
    ]


def test_finalizers_defer_deletion_until_cleared() -> None:
    store = ObjectStore()
    maps = resource_named("configmaps")
    store.apply({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "c", "namespace": "ns", "finalizers": ["x/y"]}}, maps)
    pending = store.delete(maps, "ns", "c")
    assert pending["metadata"]["deletionTimestamp"]
    assert store.find(maps, "ns", "c") is not None
    store.patch(maps, "ns", "c", MERGE_PATCH, b'{"metadata":{"finalizers":null}}')
    assert store.find(maps, "ns", "c") is None
    assert [c.type for c in store.changes_after("configmaps", 0)] == [
        "ADDED", "MODIFIED", "MODIFIED", "DELETED",
    ]


def test_garbage_collection_deletes_orphans_and_keeps_co_owned_dependents() -> None:
    store = ObjectStore()
    maps = resource_named("configmaps")
    owner = store.apply({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "owner", "namespace": "ns"}}, maps)
    other = store.apply({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "other", "namespace": "ns"}}, maps)

    def owned(name: str, *owners: dict[str, Any]) -> None:
        refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x",
                 "uid": o["metadata"]["uid"]} for o in owners]
        store.apply({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": name, "namespace": "ns", "ownerReferences": refs}},
                    maps)

    owned("only-owner", owner)
    owned("co-owned", owner, other)
    store.take_pending()
    store.delete(maps, "ns", "owner")
    work = store.take_pending()
    assert work.deleted_uids == [owner["metadata"]["uid"]]
    assert store.collect_dependents(work.deleted_uids) == 2
    assert store.find(maps, "ns", "only-owner") is None
    co_owned = store.find(maps, "ns", "co-owned")
    assert co_owned is not None
    assert [r["uid"] for r in co_owned["metadata"]["ownerReferences"]] == [
        other["metadata"]["uid"]
    ]
