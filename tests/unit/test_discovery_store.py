"""The resource store: delta computation, resume, removals, coalescing, ACK bookkeeping."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from ambient_api import codec, kinds
from ambient_api.discovery import Ack, DeltaUpdate, versioned_key
from ambient_api.l7 import HttpRoute, PathMatch, PathMatchType, RouteMatch, RouteRule
from ambient_api.model import Node, Service, Workload
from istiod_lite.discovery import (
    ResourceStore,
    compute_delta,
    requested_kinds,
    split_versioned_key,
)


def workload(uid: str, address: str = "127.0.20.1", node: str = "node-1") -> Workload:
    return Workload(
        uid=uid,
        name=uid.rsplit("/", 1)[-1],
        namespace="default",
        addresses=(address,),
        service_account="sleep",
        node=node,
    )


def keys(update: DeltaUpdate) -> list[str]:
    return [versioned_key(r.kind, r.name) for r in update.resources]


def removed(update: DeltaUpdate) -> list[str]:
    return [versioned_key(r.kind, r.name) for r in update.removed]


# -- compute_delta (plain function) ------------------------------------------------------------


def test_compute_delta_sends_new_and_changed_and_removes_gone() -> None:
    held = {"workload/a": "v1", "workload/b": "v1", "service/gone": "v9"}
    current = {"workload/a": ("v1", "A"), "workload/b": ("v2", "B"), "node/n": ("v1", "N")}
    updates, removals = compute_delta(held, current)
    assert updates == [("node/n", "v1", "N"), ("workload/b", "v2", "B")]
    assert removals == ["service/gone"]


def test_compute_delta_nothing_when_in_sync() -> None:
    current = {"workload/a": ("v1", "A")}
    assert compute_delta({"workload/a": "v1"}, current) == ([], [])


def test_split_versioned_key_keeps_slashes_in_names() -> None:
    assert split_versioned_key("service/default/echo.default.svc.cluster.local") == (
        "service",
        "default/echo.default.svc.cluster.local",
    )
    with pytest.raises(ValueError, match="kind/name"):
        split_versioned_key("workload")


# -- ResourceStore ---------------------------------------------------------------------------


def test_replace_all_bumps_version_only_on_change() -> None:
    store = ResourceStore()
    assert not store.initialized
    assert store.replace_all([workload("w1")]) is True
    assert store.system_version == 1
    assert store.replace_all([workload("w1")]) is False
    assert store.system_version == 1
    assert store.replace_all([workload("w1", address="127.0.20.9")]) is True
    assert store.system_version == 2
    assert store.versions() == {
        "workload/w1": codec.content_version(workload("w1", address="127.0.20.9"))
    }


def test_first_replace_all_initializes_even_when_empty() -> None:
    store = ResourceStore()
    assert store.replace_all([]) is True
    assert store.initialized
    assert store.system_version == 1


async def test_first_delta_has_everything_for_a_new_client() -> None:
    store = ResourceStore()
    node = Node(name="node-1", address="127.0.10.1")
    store.replace_all([workload("w1"), node])
    with store.subscribe("node-1", {}) as sub:
        update = await sub.next_update()
    assert keys(update) == ["node/node-1", "workload/w1"]
    assert update.removed == ()
    assert update.system_version == 1
    by_kind = {r.kind: r for r in update.resources}
    assert codec.from_jsonable(Node, by_kind["node"].resource) == node
    assert by_kind["workload"].version == codec.content_version(workload("w1"))


async def test_resume_with_matching_versions_gets_an_empty_first_delta() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), workload("w2")])
    held = store.versions()
    with store.subscribe("node-1", held) as sub:
        update = await sub.next_update()
    assert update.resources == ()
    assert update.removed == ()


async def test_resume_gets_only_changes_and_removals() -> None:
    """A client resuming against a restarted store (new object, same content) gets only
    what differs: versions are content hashes."""
    before = ResourceStore()
    before.replace_all([workload("w1"), workload("w2"), workload("w3")])
    held = before.versions()

    restarted = ResourceStore()
    restarted.replace_all([workload("w1"), workload("w2", address="127.0.20.2")])
    with restarted.subscribe("node-1", held) as sub:
        update = await sub.next_update()
    assert keys(update) == ["workload/w2"]
    assert removed(update) == ["workload/w3"]


async def test_later_deltas_carry_only_the_diff() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), workload("w2")])
    with store.subscribe("node-1", {}) as sub:
        await sub.next_update()
        store.replace_all([workload("w1"), workload("w3")])
        update = await sub.next_update()
    assert keys(update) == ["workload/w3"]
    assert removed(update) == ["workload/w2"]
    assert update.system_version == 2


async def test_changes_while_busy_coalesce_into_one_delta() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1")])
    with store.subscribe("node-1", {}) as sub:
        await sub.next_update()
        store.replace_all([workload("w1"), workload("w2")])
        store.replace_all([workload("w1"), workload("w2"), workload("w3")])
        store.replace_all([workload("w2"), workload("w3")])
        update = await sub.next_update()
        assert keys(update) == ["workload/w2", "workload/w3"]
        assert removed(update) == ["workload/w1"]
        assert update.system_version == 4
        # Nothing else is pending.
        assert sub.poll() is None


async def test_change_and_revert_while_busy_sends_nothing() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1")])
    with store.subscribe("node-1", {}) as sub:
        await sub.next_update()
        store.replace_all([workload("w1", address="127.0.20.7")])
        store.replace_all([workload("w1")])
        assert sub.poll() is None


async def test_subscriber_waits_for_a_change_then_wakes() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1")])
    received: list[DeltaUpdate] = []
    with store.subscribe("node-1", {}) as sub:
        await sub.next_update()

        async def follow() -> None:
            received.append(await sub.next_update())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            assert received == []
            store.replace_all([workload("w1")])  # no change: stays asleep
            await trio.testing.wait_all_tasks_blocked()
            assert received == []
            store.replace_all([workload("w1"), workload("w2")])
    assert keys(received[0]) == ["workload/w2"]


async def test_subscriber_waits_until_store_is_initialized() -> None:
    """Serving an empty, never-loaded store would tell a resuming proxy to delete all."""
    store = ResourceStore()
    received: list[DeltaUpdate] = []
    with store.subscribe("node-1", {"workload/w1": "x"}) as sub:

        async def follow() -> None:
            received.append(await sub.next_update())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            assert received == []
            store.replace_all([workload("w1")])
    assert keys(received[0]) == ["workload/w1"]


async def test_nonces_are_unique() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1")])
    nonces = set()
    with store.subscribe("node-1", {}) as a, store.subscribe("node-2", {}) as b:
        for i in range(5):
            nonces.add((await a.next_update()).nonce)
            nonces.add((await b.next_update()).nonce)
            store.replace_all([workload(f"w{i + 2}")])
    assert len(nonces) == 10


def test_subscribe_rejects_malformed_initial_versions() -> None:
    store = ResourceStore()
    with pytest.raises(ValueError, match="kind/name"):
        store.subscribe("node-1", {"nokind": "v1"})
    with pytest.raises(ValueError, match="unknown kind 'pod'"):
        store.subscribe("node-1", {"pod/x": "v1"})


async def test_ack_and_nack_are_recorded_per_subscriber() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), Service(name="s", namespace="default", hostname="s")])
    with store.subscribe("node-1", {}) as sub, store.subscribe("node-2", {}) as other:
        first = await sub.next_update()
        assert [s.node for s in store.subscribers()] == ["node-1", "node-2"]
        assert store.record_ack(Ack(node="node-1", nonce=first.nonce)) is True
        status = sub.status.to_json()
        assert status["last_acked_nonce"] == first.nonce
        assert status["in_sync"] is True

        store.replace_all([workload("w2")])
        second = await sub.next_update()
        assert store.record_ack(Ack(node="node-1", nonce=second.nonce, error="bad")) is True
        status = sub.status.to_json()
        assert status["last_sent_nonce"] == second.nonce
        assert status["last_nack_nonce"] == second.nonce
        assert status["last_nack_error"] == "bad"
        assert status["in_sync"] is False
        # Another node cannot acknowledge node-1's update; unknown nonces are reported.
        assert store.record_ack(Ack(node="node-2", nonce=second.nonce)) is False
        assert store.record_ack(Ack(node="node-1", nonce="unknown")) is False
        assert other.status.last_acked_nonce is None
    assert store.subscribers() == []


# -- kinds -----------------------------------------------------------------------------------


def http_route(name: str, path: str = "/") -> HttpRoute:
    return HttpRoute(
        name=name,
        namespace="default",
        parents=("default/echo.default.svc.cluster.local",),
        rules=(RouteRule(matches=(RouteMatch(path=PathMatch(PathMatchType.PATH_PREFIX, path)),)),),
    )


async def test_ztunnel_subscriber_never_sees_l7_kinds() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), http_route("r1")])
    with store.subscribe("node-1", {}) as sub:
        first = await sub.next_update()
        assert keys(first) == ["workload/w1"]
        # A change to L7 resources only: nothing for a ztunnel.
        store.replace_all([workload("w1"), http_route("r1", "/v2"), http_route("r2")])
        assert sub.poll() is None
        store.replace_all([workload("w2")])
        update = await sub.next_update()
        assert keys(update) == ["workload/w2"]
        assert removed(update) == ["workload/w1"]
    assert sub.status.kinds == kinds.L4_KINDS


async def test_waypoint_subscriber_sees_every_kind_and_its_removals() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), http_route("r1")])
    with store.subscribe("serviceaccount:default/waypoint", {}, kinds.ALL_KINDS) as sub:
        first = await sub.next_update()
        assert keys(first) == ["httproute/default/HTTPRoute/r1", "workload/w1"]
        route = next(r for r in first.resources if r.kind == "httproute")
        assert codec.from_jsonable(HttpRoute, route.resource) == http_route("r1")
        assert sub.status.to_json()["kinds"] == sorted(kinds.ALL_KINDS)
        store.replace_all([workload("w1"), http_route("r2")])
        update = await sub.next_update()
        assert keys(update) == ["httproute/default/HTTPRoute/r2"]
        assert removed(update) == ["httproute/default/HTTPRoute/r1"]


async def test_resume_respects_kinds() -> None:
    """A waypoint resuming with what it held gets only what changed; an L7-only subscriber
    is not told to remove workloads it never asked for."""
    store = ResourceStore()
    store.replace_all([workload("w1"), http_route("r1"), http_route("r2")])
    held = {k: v for k, v in store.versions().items() if k.startswith("httproute/")}
    store.replace_all([workload("w1"), http_route("r1", "/changed")])
    with store.subscribe("waypoint", held, frozenset({"httproute"})) as sub:
        update = await sub.next_update()
    assert keys(update) == ["httproute/default/HTTPRoute/r1"]
    assert removed(update) == ["httproute/default/HTTPRoute/r2"]


def test_subscribe_rejects_unknown_kinds_and_versions_of_unsubscribed_kinds() -> None:
    store = ResourceStore()
    with pytest.raises(ValueError, match="unknown kinds 'bogus', 'pods'"):
        store.subscribe("node-1", {}, frozenset({"workload", "bogus", "pods"}))
    with pytest.raises(ValueError, match="kind 'httproute' is not among the subscribed kinds"):
        store.subscribe("node-1", {"httproute/default/HTTPRoute/r1": "v1"})
    assert store.subscribers() == []


def test_requested_kinds() -> None:
    assert requested_kinds(()) == kinds.L4_KINDS
    assert requested_kinds(["httproute", "workload"]) == frozenset({"httproute", "workload"})
    with pytest.raises(ValueError, match="unknown kinds 'nope'"):
        requested_kinds(["nope", "workload"])


async def test_encoded_line_is_the_update_reusing_each_resources_json() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), workload("w2", address="127.0.20.2")])
    with store.subscribe("node-1", {"workload/w3": "old"}) as sub:
        update = await sub.next_update()
        line = b"".join(sub.line_parts(update))
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line) == codec.to_jsonable(update)
        # A resource replaced after the delta was computed is encoded from the delta itself.
        store.replace_all([workload("w1", address="127.0.20.9"), workload("w2", "127.0.20.2")])
        assert json.loads(b"".join(sub.line_parts(update))) == codec.to_jsonable(update)
        # Only the update the subscription gave last has its delta's JSON at hand.
        later = sub.poll()
        assert later is not None
        with pytest.raises(ValueError, match="the update this subscription gave last"):
            sub.line_parts(update)
        assert json.loads(b"".join(sub.line_parts(later))) == codec.to_jsonable(later)


def test_compute_delta_over_touched_keys_only_compares_those() -> None:
    held = {"workload/a": "v1", "workload/b": "v1", "workload/gone": "v1"}
    current = {"workload/a": ("v2", "A"), "workload/b": ("v2", "B"), "workload/new": ("v1", "N")}
    updates, removals = compute_delta(held, current, touched=["workload/new", "workload/a",
                                                              "workload/gone", "workload/x"])
    assert updates == [("workload/a", "v2", "A"), ("workload/new", "v1", "N")]
    assert removals == ["workload/gone"]


def test_changed_since_unions_the_remembered_changes() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), workload("w2")])
    store.replace_all([workload("w1", address="127.0.20.9"), workload("w2")])
    store.replace_all([workload("w1", address="127.0.20.9")])
    assert store.changed_since(3) == frozenset()
    assert store.changed_since(2) == {"workload/w2"}
    assert store.changed_since(1) == {"workload/w1", "workload/w2"}
    for index in range(70):  # more changes than the store remembers
        store.replace_all([workload(f"x{index}")])
    assert store.changed_since(1) is None
    assert store.changed_since(store.system_version - 1) is not None


def apply(held: dict[str, str], update: DeltaUpdate | None) -> dict[str, str]:
    """What a proxy holding ``held`` holds after ``update`` (which must exist)."""
    assert update is not None
    for item in update.resources:
        held[versioned_key(item.kind, item.name)] = item.version
    for gone in update.removed:
        del held[versioned_key(gone.kind, gone.name)]
    return held


async def test_a_subscriber_following_changes_gets_what_a_full_diff_gives() -> None:
    """Subscribers in sync are diffed over the changed keys only; one that fell behind
    further than the store remembers is diffed against everything. Both end up holding
    exactly the current set."""
    store = ResourceStore()
    store.replace_all([workload(f"w{i}") for i in range(5)])
    with store.subscribe("node-1", {}) as close, store.subscribe("node-2", {}) as behind:
        held_close = apply({}, await close.next_update())
        held_behind = apply({}, await behind.next_update())
        for step in range(80):
            store.replace_all([workload(f"w{i}", address=f"127.0.21.{(i * step) % 200 + 1}")
                               for i in range(step % 7)])
            assert apply(held_close, close.poll()) == store.versions(), step
        assert apply(held_behind, behind.poll()) == store.versions()


async def test_fresh_subscribers_share_one_full_set_encoded_once() -> None:
    store = ResourceStore()
    store.replace_all([workload("w1"), workload("w2"), Node(name="n", address="127.0.10.1")])
    with store.subscribe("node-1", {}) as one, store.subscribe("node-2", {}) as two:
        first, second = await one.next_update(), await two.next_update()
    assert first.resources is second.resources
    assert json.loads(b"".join(one.line_parts(first))) == codec.to_jsonable(first)
    assert json.loads(b"".join(two.line_parts(second))) == codec.to_jsonable(second)
    # One encoding for both: the very same bytes, which the server compresses once.
    assert one.line_parts(first)[1] is two.line_parts(second)[1]
