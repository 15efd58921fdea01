"""The versioned resource store behind the discovery stream.

The store holds the full current set of resources, each with a content version
(``codec.content_version``), so that versions mean the same thing across control-plane
restarts. Every subscriber remembers what it was last sent; when it asks for the next update it
gets the diff between that and what is current *now*. Several changes that happen while a
subscriber is busy therefore collapse into one delta, and a slow subscriber never queues
stale intermediate states.

Each subscriber names the kinds it wants (``ambient_api.kinds``): a ztunnel the L4 kinds,
a waypoint all of them. It is sent, and told to remove, resources of those kinds only, so a
change to an L7 resource never sends a ztunnel an update.

The diff itself is the plain function :func:`compute_delta`; the Trio part is only "wait until
the store changes".
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from types import TracebackType
from typing import Any, TypeVar

import structlog
import trio

from ambient_api import codec, model
from ambient_api.discovery import (
    Ack,
    DeltaUpdate,
    ResourceRemoval,
    ResourceUpdate,
    versioned_key,
)
from ambient_api.kinds import (
    ALL_KINDS,
    KIND_BY_TYPE,
    L4_KINDS,
    TYPE_BY_KIND,
    AnyResource,
    resource_key,
)

log = structlog.get_logger()

T = TypeVar("T")

# How many recently sent nonces a subscriber remembers, to attribute late ACKs.
_REMEMBERED_NONCES = 32
# How many recent changes the store remembers the keys of: a subscriber that fell further
# behind is diffed against the whole set instead.
_REMEMBERED_CHANGES = 64


def compute_delta(
    held: Mapping[str, str],
    current: Mapping[str, tuple[str, T]],
    touched: Iterable[str] | None = None,
) -> tuple[list[tuple[str, str, T]], list[str]]:
    """What a client holding ``held`` (key -> version) needs to reach ``current``
    (key -> (version, value)).

    Returns ``(updates, removals)``: updates are ``(key, version, value)`` for every key the
    client lacks or holds at another version; removals are the keys it holds that no longer
    exist. Both are sorted by key so that deltas are deterministic. ``touched``, when known,
    are the only keys that can differ (the changes since the client was last in sync): then
    only they are compared, instead of the whole set.
    """
    if touched is not None:
        updates = []
        removals = []
        for key in sorted(set(touched)):
            entry = current.get(key)
            if entry is None:
                if key in held:
                    removals.append(key)
            elif held.get(key) != entry[0]:
                updates.append((key, entry[0], entry[1]))
        return updates, removals
    updates = [
        (key, version, value)
        for key, (version, value) in sorted(current.items())
        if held.get(key) != version
    ]
    removals = sorted(key for key in held if key not in current)
    return updates, removals


def split_versioned_key(key: str) -> tuple[str, str]:
    """Inverse of ``versioned_key``: kinds never contain ``/``, names may."""
    kind, sep, name = key.partition("/")
    if not sep or not kind or not name:
        raise ValueError(f"resource key {key!r} is not of the form kind/name")
    return kind, name


def check_kinds(names: Iterable[str]) -> frozenset[str]:
    """The kinds named, or ValueError naming the unknown ones (and the known ones)."""
    requested = frozenset(names)
    unknown = requested - ALL_KINDS
    if unknown:
        raise ValueError(
            f"unknown kinds {', '.join(repr(k) for k in sorted(unknown))} "
            f"(known: {', '.join(sorted(ALL_KINDS))})"
        )
    return requested


def requested_kinds(names: Iterable[str]) -> frozenset[str]:
    """``DiscoveryRequest.kinds`` -> the kinds to send: none named means the L4 kinds a
    ztunnel needs. Raises ValueError naming unknown kinds."""
    requested = check_kinds(names)
    return requested or L4_KINDS


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class StoredResource:
    """A resource as it travels: kind, key, content version and its JSON form (encoded once,
    shared by every subscriber)."""

    kind: str
    name: str
    version: str
    resource: AnyResource
    encoded: dict[str, Any]
    # The ResourceUpdate of this version as JSON text: serialized once per change and shared
    # by every subscriber's delta (per-subscriber encoding dominated istiod's CPU at scale).
    update_json: str = ""

    @property
    def key(self) -> str:
        return versioned_key(self.kind, self.name)

    @classmethod
    def of(cls, resource: AnyResource) -> StoredResource:
        try:
            kind = KIND_BY_TYPE[type(resource)]
        except KeyError:
            raise TypeError(f"{type(resource).__name__} is not a discovery resource") from None
        encoded = codec.to_jsonable(resource)
        name, version = resource_key(resource), codec.content_version(resource)
        return cls(
            kind=kind,
            name=name,
            version=version,
            resource=resource,
            encoded=encoded,
            update_json=_compact_json(
                {"kind": kind, "name": name, "version": version, "resource": encoded}
            ),
        )


@dataclass
class SubscriberStatus:
    """What ``/debug/syncz`` shows about one open discovery stream."""

    id: int
    node: str
    connected_at: datetime
    kinds: frozenset[str] = L4_KINDS
    updates_sent: int = 0
    last_sent_nonce: str | None = None
    last_sent_system_version: int | None = None
    last_sent_at: datetime | None = None
    last_acked_nonce: str | None = None
    last_acked_at: datetime | None = None
    last_nack_nonce: str | None = None
    last_nack_error: str | None = None
    last_nack_at: datetime | None = None
    recent_nonces: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def to_json(self) -> dict[str, Any]:
        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {
            "id": self.id,
            "node": self.node,
            "kinds": sorted(self.kinds),
            "connected_at": iso(self.connected_at),
            "updates_sent": self.updates_sent,
            "last_sent_nonce": self.last_sent_nonce,
            "last_sent_system_version": self.last_sent_system_version,
            "last_sent_at": iso(self.last_sent_at),
            "last_acked_nonce": self.last_acked_nonce,
            "last_acked_at": iso(self.last_acked_at),
            "last_nack_nonce": self.last_nack_nonce,
            "last_nack_error": self.last_nack_error,
            "last_nack_at": iso(self.last_nack_at),
            "in_sync": self.last_sent_nonce is not None
            and self.last_acked_nonce == self.last_sent_nonce,
        }


def _now() -> datetime:
    return datetime.now(UTC)


class ResourceStore:
    """The full current resource set, a change counter and the open subscriptions."""

    def __init__(self) -> None:
        self._current: dict[str, StoredResource] = {}
        self.system_version = 0
        self._changed = trio.Event()
        self._initialized = trio.Event()
        self._subscriber_ids = count(1)
        self._subscribers: dict[int, SubscriberStatus] = {}
        # kinds -> the current resources of those kinds, built once per change and shared by
        # every subscriber asking for the same kinds.
        self._snapshots: dict[frozenset[str], dict[str, tuple[str, StoredResource]]] = {}
        # system version -> the keys that changed or went away in that change.
        self._changes: OrderedDict[int, frozenset[str]] = OrderedDict()
        # (version the subscriber holds or None for nothing, kinds) -> the delta to the
        # current version: every proxy in sync (or starting from nothing) gets the same one,
        # computed and encoded once per change however many proxies there are.
        self._shared_deltas: dict[tuple[int | None, frozenset[str]], _Delta] = {}

    # -- the resource set ----------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """False until the first ``replace_all``: before that the store knows nothing, and
        serving it would tell resuming proxies to delete everything they hold."""
        return self._initialized.is_set()

    async def wait_initialized(self) -> None:
        await self._initialized.wait()

    def replace_all(self, resources: Iterable[AnyResource]) -> bool:
        """Make ``resources`` the complete current set. Returns whether anything changed;
        only then is ``system_version`` bumped and are subscribers woken."""
        new: dict[str, StoredResource] = {}
        touched: set[str] = set()
        for resource in resources:
            stored = self._reuse(resource)
            if stored is None:
                stored = StoredResource.of(resource)
                held = self._current.get(stored.key)
                if held is None or held.version != stored.version:
                    touched.add(stored.key)
            if stored.key in new:
                log.warning("duplicate resource key, keeping the last one", key=stored.key)
            new[stored.key] = stored
        touched.update(key for key in self._current if key not in new)
        first = not self._initialized.is_set()
        if not first and not touched:
            return False
        self._current = new
        self._snapshots.clear()
        self._shared_deltas.clear()
        self.system_version += 1
        self._changes[self.system_version] = frozenset(touched)
        while len(self._changes) > _REMEMBERED_CHANGES:
            self._changes.popitem(last=False)
        self._initialized.set()
        woken, self._changed = self._changed, trio.Event()
        woken.set()
        log.info(
            "resource set updated",
            system_version=self.system_version,
            resources=len(new),
            changed=len(touched),
            subscribers=len(self._subscribers),
        )
        return True

    def changed_since(self, version: int) -> frozenset[str] | None:
        """The keys changed or removed after ``version``, or None if the store no longer
        remembers that far back."""
        if version == self.system_version:
            return frozenset()
        if version + 1 not in self._changes:
            return None
        return frozenset().union(
            *(self._changes[v] for v in range(version + 1, self.system_version + 1))
        )

    def _reuse(self, resource: AnyResource) -> StoredResource | None:
        """The stored form of an unchanged resource: comparing frozen dataclasses is far
        cheaper than encoding and hashing them again, and most of a cluster is unchanged by
        any one change."""
        kind = KIND_BY_TYPE.get(type(resource))
        if kind is None:
            return None
        held = self._current.get(versioned_key(kind, resource_key(resource)))
        if held is None:
            return None
        # The translator hands unchanged resources over as the very same objects.
        return held if held.resource is resource or held.resource == resource else None

    def versions(self) -> dict[str, str]:
        """key ("kind/name") -> content version of everything current."""
        return {key: s.version for key, s in self._current.items()}

    def get(self, kind: str, name: str) -> AnyResource | None:
        stored = self._current.get(versioned_key(kind, name))
        return stored.resource if stored else None

    def resources(self, kind: str | None = None) -> list[AnyResource]:
        return [s.resource for s in self._current.values() if kind is None or s.kind == kind]

    def workloads(self) -> list[model.Workload]:
        return [
            s.resource for s in self._current.values() if isinstance(s.resource, model.Workload)
        ]

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(
        self,
        node: str,
        initial_versions: Mapping[str, str],
        kinds: frozenset[str] = L4_KINDS,
    ) -> Subscription:
        """Open a subscription for a proxy on ``node`` that already holds
        ``initial_versions`` and wants resources of ``kinds`` only (a ztunnel: the L4 kinds;
        a waypoint: all). Use it as a context manager so it is unregistered when the stream
        ends. Raises ValueError naming an unknown kind, or a key of ``initial_versions`` that
        is malformed or of a kind not subscribed to."""
        kinds = check_kinds(kinds)
        for key in initial_versions:
            kind, _name = split_versioned_key(key)
            if kind not in TYPE_BY_KIND:
                known = ", ".join(sorted(TYPE_BY_KIND))
                raise ValueError(f"resource key {key!r}: unknown kind {kind!r} (known: {known})")
            if kind not in kinds:
                raise ValueError(
                    f"resource key {key!r}: kind {kind!r} is not among the subscribed kinds "
                    f"({', '.join(sorted(kinds))})"
                )
        status = SubscriberStatus(
            id=next(self._subscriber_ids), node=node, connected_at=_now(), kinds=kinds
        )
        self._subscribers[status.id] = status
        return Subscription(self, status, dict(initial_versions))

    def _unsubscribe(self, status: SubscriberStatus) -> None:
        self._subscribers.pop(status.id, None)

    def subscribers(self) -> list[SubscriberStatus]:
        return list(self._subscribers.values())

    def record_ack(self, ack: Ack) -> bool:
        """Attribute an ACK/NACK to the stream(s) of ``ack.node`` that sent ``ack.nonce``.
        Returns False when no open stream sent that nonce (e.g. it reconnected since)."""
        matched = False
        for status in self._subscribers.values():
            if status.node != ack.node or ack.nonce not in status.recent_nonces:
                continue
            matched = True
            if ack.error is None:
                status.last_acked_nonce = ack.nonce
                status.last_acked_at = _now()
            else:
                status.last_nack_nonce = ack.nonce
                status.last_nack_error = ack.error
                status.last_nack_at = _now()
        return matched

    def _delta(
        self, held: Mapping[str, str], kinds: frozenset[str], touched: frozenset[str] | None
    ) -> _Delta:
        if touched is None:
            current = self._snapshot(kinds)
        else:  # only the touched keys can differ: no need for the whole snapshot
            current = {}
            for key in touched:
                stored = self._current.get(key)
                if stored is not None and stored.kind in kinds:
                    current[key] = (stored.version, stored)
        updates, removals = compute_delta(held, current, touched)
        delta = _Delta(
            resources=tuple(_resource_update(s) for _key, _version, s in updates),
            removed=tuple(ResourceRemoval(*split_versioned_key(key)) for key in removals),
            changed=tuple((key, version) for key, version, _ in updates),
            removed_keys=tuple(removals),
            json=",".join(s.update_json for _key, _version, s in updates).encode(),
        )
        return delta

    def _shared_delta(
        self,
        since: int | None,
        held: Mapping[str, str],
        kinds: frozenset[str],
        touched: frozenset[str] | None,
    ) -> _Delta:
        """The delta of a subscriber of ``kinds`` holding exactly what the store held at
        version ``since`` (None: nothing), computed once per change."""
        delta = self._shared_deltas.get((since, kinds))
        if delta is None:
            delta = self._delta(held, kinds, touched)
            self._shared_deltas[(since, kinds)] = delta
        return delta

    def _snapshot(self, kinds: frozenset[str]) -> dict[str, tuple[str, StoredResource]]:
        """The current resources of ``kinds``: what a subscriber to them should hold."""
        snapshot = self._snapshots.get(kinds)
        if snapshot is None:
            snapshot = {
                key: (s.version, s) for key, s in self._current.items() if s.kind in kinds
            }
            self._snapshots[kinds] = snapshot
        return snapshot


def _resource_update(stored: StoredResource) -> ResourceUpdate:
    return ResourceUpdate(
        kind=stored.kind, name=stored.name, version=stored.version, resource=stored.encoded
    )


@dataclass(frozen=True)
class _Delta:
    """What a subscriber is sent: the wire form, the (key, version) changes to what it holds
    and the resources' JSON."""

    resources: tuple[ResourceUpdate, ...]
    removed: tuple[ResourceRemoval, ...]
    changed: tuple[tuple[str, str], ...]
    removed_keys: tuple[str, ...]
    json: bytes


class Subscription:
    """One proxy's view of the store: yields DeltaUpdates, the first bringing everything the
    proxy does not hold at the current version, each later one the changes since the last."""

    def __init__(
        self, store: ResourceStore, status: SubscriberStatus, held: dict[str, str]
    ) -> None:
        self._store = store
        self.status = status
        self._held = held
        # The store version ``_held`` was brought to (None: what the proxy said it holds).
        self._synced: int | None = None
        self._sent_first = False
        # The last update sent and the delta it came from, whose JSON ``line_parts`` reuses.
        self._sent: tuple[DeltaUpdate, _Delta] | None = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._store._unsubscribe(self.status)

    def __aiter__(self) -> AsyncIterator[DeltaUpdate]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[DeltaUpdate]:
        while True:
            yield await self.next_update()

    def poll(self) -> DeltaUpdate | None:
        """The pending delta if there is one, without waiting (the first one is always
        pending once the store is initialized, even if empty: it tells the proxy it is in
        sync)."""
        store = self._store
        if not store.initialized:
            return None
        kinds = self.status.kinds
        if not self._held:  # starting from nothing: the full set, shared
            delta = store._shared_delta(None, self._held, kinds, None)
        else:
            touched = None if self._synced is None else store.changed_since(self._synced)
            if touched is None:  # resuming, or fell behind: diffed against everything
                delta = store._delta(self._held, kinds, None)
            else:  # in sync with an earlier version: the shared delta from there
                delta = store._shared_delta(self._synced, self._held, kinds, touched)
        self._synced = store.system_version
        if self._sent_first and not delta.resources and not delta.removed:
            return None
        self._sent_first = True
        self._held.update(delta.changed)
        for key in delta.removed_keys:
            del self._held[key]
        update = DeltaUpdate(
            nonce=secrets.token_hex(8),
            system_version=store.system_version,
            resources=delta.resources,
            removed=delta.removed,
        )
        self._record_sent(update)
        self._sent = (update, delta)
        return update

    def line_parts(self, update: DeltaUpdate) -> tuple[bytes, bytes, bytes]:
        """``update`` (the last one this subscription gave) as its NDJSON line (the same
        bytes as encoding the DeltaUpdate) in three parts: what precedes the resources, the
        resources and what follows them. The resources part is the JSON the store encoded
        once for the delta: for a shared delta, the same bytes object for every subscriber
        given it, so it can be compressed once too."""
        if self._sent is None or self._sent[0] is not update:
            raise ValueError("line_parts takes the update this subscription gave last")
        head = _compact_json({"nonce": update.nonce, "system_version": update.system_version})
        removed = _compact_json(codec.to_jsonable(update.removed))
        return (
            f'{head[:-1]},"resources":['.encode(),
            self._sent[1].json,
            f'],"removed":{removed}}}\n'.encode(),
        )

    async def next_update(self) -> DeltaUpdate:
        """Wait until there is something to send and return it (coalescing every change made
        since the previous call)."""
        await self._store.wait_initialized()
        while True:
            # Take the event before diffing: a change after this point sets this very event.
            changed = self._store._changed
            update = self.poll()
            if update is not None:
                return update
            await changed.wait()

    def _record_sent(self, update: DeltaUpdate) -> None:
        status = self.status
        status.updates_sent += 1
        status.last_sent_nonce = update.nonce
        status.last_sent_system_version = update.system_version
        status.last_sent_at = _now()
        status.recent_nonces[update.nonce] = update.system_version
        while len(status.recent_nonces) > _REMEMBERED_NONCES:
            status.recent_nonces.popitem(last=False)
