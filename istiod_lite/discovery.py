"""The versioned resource store behind the discovery stream.

The store holds the full current set of resources, each with a content version
(``codec.content_version``), so that versions mean the same thing across control-plane
restarts. Every subscriber remembers what it was last sent; when it asks for the next update it
gets the diff between that and what is current *now*. Several changes that happen while a
subscriber is busy therefore collapse into one delta, and a slow subscriber never queues
stale intermediate states.

Each subscriber names the kinds it wants (``istiod_lite.api.kinds``): a ztunnel the L4 kinds,
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

from istiod_lite.api import codec, model
from istiod_lite.api.discovery import (
    Ack,
    DeltaUpdate,
    ResourceRemoval,
    ResourceUpdate,
    versioned_key,
)
from istiod_lite.api.kinds import (
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


def compute_delta(
    held: Mapping[str, str], current: Mapping[str, tuple[str, T]]
) -> tuple[list[tuple[str, str, T]], list[str]]:
    """What a client holding ``held`` (key -> version) needs to reach ``current``
    (key -> (version, value)).

    Returns ``(updates, removals)``: updates are ``(key, version, value)`` for every key the
    client lacks or holds at another version; removals are the keys it holds that no longer
    exist. Both are sorted by key so that deltas are deterministic.
    """
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
        for resource in resources:
            stored = self._reuse(resource) or StoredResource.of(resource)
            if stored.key in new:
                log.warning("duplicate resource key, keeping the last one", key=stored.key)
            new[stored.key] = stored
        first = not self._initialized.is_set()
        changed = first or _versions(new) != _versions(self._current)
        if not changed:
            return False
        self._current = new
        self._snapshots.clear()
        self.system_version += 1
        self._initialized.set()
        woken, self._changed = self._changed, trio.Event()
        woken.set()
        log.info(
            "resource set updated",
            system_version=self.system_version,
            resources=len(new),
            subscribers=len(self._subscribers),
        )
        return True

    def _reuse(self, resource: AnyResource) -> StoredResource | None:
        """The stored form of an unchanged resource: comparing frozen dataclasses is far
        cheaper than encoding and hashing them again, and most of a cluster is unchanged by
        any one change."""
        kind = KIND_BY_TYPE.get(type(resource))
        if kind is None:
            return None
        held = self._current.get(versioned_key(kind, resource_key(resource)))
        return held if held is not None and held.resource == resource else None

    def versions(self) -> dict[str, str]:
        """key ("kind/name") -> content version of everything current."""
        return _versions(self._current)

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

    def encode_line(self, update: DeltaUpdate) -> bytes:
        """``update`` as one NDJSON line, reusing each resource's JSON from the store (the
        same bytes as encoding the whole DeltaUpdate, without re-encoding per subscriber)."""
        parts = []
        for item in update.resources:
            stored = self._current.get(versioned_key(item.kind, item.name))
            if stored is not None and stored.version == item.version:
                parts.append(stored.update_json)
            else:  # replaced since the delta was computed: encode this one item
                parts.append(_compact_json(codec.to_jsonable(item)))
        removed = _compact_json(codec.to_jsonable(update.removed))
        head = _compact_json({"nonce": update.nonce, "system_version": update.system_version})
        return (f'{head[:-1]},"resources":[{",".join(parts)}],"removed":{removed}}}\n'
                .encode())

    def _snapshot(self, kinds: frozenset[str]) -> dict[str, tuple[str, StoredResource]]:
        """The current resources of ``kinds``: what a subscriber to them should hold."""
        snapshot = self._snapshots.get(kinds)
        if snapshot is None:
            snapshot = {
                key: (s.version, s) for key, s in self._current.items() if s.kind in kinds
            }
            self._snapshots[kinds] = snapshot
        return snapshot


def _versions(resources: Mapping[str, StoredResource]) -> dict[str, str]:
    return {key: s.version for key, s in resources.items()}


class Subscription:
    """One proxy's view of the store: yields DeltaUpdates, the first bringing everything the
    proxy does not hold at the current version, each later one the changes since the last."""

    def __init__(
        self, store: ResourceStore, status: SubscriberStatus, held: dict[str, str]
    ) -> None:
        self._store = store
        self.status = status
        self._held = held
        self._sent_first = False

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
        if not self._store.initialized:
            return None
        updates, removals = compute_delta(self._held, self._store._snapshot(self.status.kinds))
        if self._sent_first and not updates and not removals:
            return None
        self._sent_first = True
        for key, version, _ in updates:
            self._held[key] = version
        for key in removals:
            del self._held[key]
        update = DeltaUpdate(
            nonce=secrets.token_hex(8),
            system_version=self._store.system_version,
            resources=tuple(
                ResourceUpdate(kind=s.kind, name=s.name, version=version, resource=s.encoded)
                for _key, version, s in updates
            ),
            removed=tuple(ResourceRemoval(*split_versioned_key(key)) for key in removals),
        )
        self._record_sent(update)
        return update

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
