"""The stand-in's object store: what etcd plus the API server's registry do (sans-IO).

One global resourceVersion counter; every write makes a new immutable object dict (so list
snapshots and watch history can share them) and appends a ``Change`` to a bounded per-resource
history that watches replay from. Errors are ``ApiError``\\s carrying the Kubernetes ``Status``
the server sends. No I/O and no Trio here: the HTTP driver in ``apiserver.py`` wakes watchers
and runs the background work (garbage collection, namespace termination) this store queues.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import itertools
import json
import re
import secrets
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from tests.kube.patches import PatchError, json_patch, merge_patch
from tests.kube.resources import ResourceType, resource_named
from tests.kube.selectors import FieldSelector, LabelSelector

ChangeType = Literal["ADDED", "MODIFIED", "DELETED"]
Json = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE_PATCH, STRATEGIC_MERGE_PATCH, JSON_PATCH, APPLY_PATCH)

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's name generator alphabet

CONTINUE_EXPIRED_MESSAGE = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted "
    "between the time the first chunk was returned and now may show up in the list."
)


class ApiError(Exception):
    """An error answered as a Kubernetes ``Status`` object."""

    def __init__(
        self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> Json:
        body: Json = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(resource: ResourceType, name: str) -> Json:
    details: Json = {"name": name, "kind": resource.plural}
    if resource.group:
        details["group"] = resource.group
    return details


def not_found(resource: ResourceType, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{resource.qualified_name} "{name}" not found', _details(resource, name)
    )


def conflict(resource: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.qualified_name} "{name}": the object has '
        "been modified; please apply your changes to the latest version and try again",
        _details(resource, name),
    )


def invalid(resource: ResourceType, name: str, field_path: str, problem: str) -> ApiError:
    return ApiError(
        422,
        "Invalid",
        f'{resource.kind} "{name}" is invalid: {field_path}: {problem}',
        {
            "name": name,
            "group": resource.group,
            "kind": resource.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": problem, "field": field_path}],
        },
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def now_timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Change:
    """One write, as watches replay it: ``old`` is the state before (None for ADDED), ``new``
    the state after (for DELETED: the last state, carrying the deletion's resourceVersion)."""

    resource_version: int
    type: ChangeType
    old: Json | None
    new: Json


@dataclass
class _ListSnapshot:
    plural: str
    resource_version: int
    items: list[Json]


@dataclass
class PendingWork:
    """Background work a delete queued: dependents to collect, namespaces to empty."""

    deleted_uids: list[str] = field(default_factory=list)
    terminating_namespaces: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.deleted_uids or self.terminating_namespaces)


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _without_volatile(obj: Mapping[str, Any]) -> Json:
    """The object minus what a write itself changes, to detect no-op writes."""
    trimmed = copy.deepcopy(dict(obj))
    meta = trimmed.get("metadata") or {}
    meta.pop("resourceVersion", None)
    meta.pop("generation", None)
    return trimmed


def _spec_part(obj: Mapping[str, Any]) -> Json:
    """Everything but metadata and status: a change here bumps metadata.generation."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


class ObjectStore:
    """All objects of all served resources, the resourceVersion counter and the history."""

    def __init__(self, *, history_limit: int = 1000, snapshot_limit: int = 64) -> None:
        self.resource_version = 0
        self._objects: dict[str, dict[tuple[str, str], Json]] = {}
        self._history: dict[str, deque[Change]] = {}
        self._evicted_up_to: dict[str, int] = {}
        self._compacted_at = 0
        self._history_limit = history_limit
        self._snapshots: OrderedDict[str, _ListSnapshot] = OrderedDict()
        self._snapshot_limit = snapshot_limit
        self._snapshot_ids = itertools.count(1)
        self.pending = PendingWork()
        # Called synchronously with (plural, change) after every write: how open watches
        # get their events (as the watch cache fans out), independent of the history.
        self.listeners: list[Callable[[str, Change], None]] = []

    # ---- reads -------------------------------------------------------------------------

    def find(self, resource: ResourceType, namespace: str | None, name: str) -> Json | None:
        """The stored object (do not mutate it) or None."""
        ns = (namespace or "") if resource.namespaced else ""
        return self._objects.get(resource.plural, {}).get((ns, name))

    def get(self, resource: ResourceType, namespace: str | None, name: str) -> Json:
        found = self.find(resource, namespace, name)
        if found is None:
            raise not_found(resource, name)
        return found

    def select(
        self,
        resource: ResourceType,
        namespace: str | None,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
    ) -> list[Json]:
        """Matching objects in etcd key order (namespace, name)."""
        labels = labels or LabelSelector()
        fields = fields or FieldSelector()
        found = [
            obj
            for (ns, _), obj in self._objects.get(resource.plural, {}).items()
            if (not namespace or not resource.namespaced or ns == namespace)
            and labels.matches((obj.get("metadata") or {}).get("labels"))
            and fields.matches(obj)
        ]
        return sorted(found, key=_key)

    def list_chunk(
        self,
        resource: ResourceType,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        *,
        limit: int | None,
        continue_token: str | None,
    ) -> tuple[list[Json], int, str | None, int | None]:
        """One page of a list: (items, list resourceVersion, continue token, remaining)."""
        if continue_token:
            snapshot, offset = self._resume(resource, continue_token)
        else:
            items = self.select(resource, namespace, labels, fields)
            if not limit or limit >= len(items):
                return items, self.resource_version, None, None
            snapshot = _ListSnapshot(resource.plural, self.resource_version, items)
            offset = 0
        end = offset + limit if limit else len(snapshot.items)
        page = snapshot.items[offset:end]
        if end >= len(snapshot.items):
            return page, snapshot.resource_version, None, None
        snapshot_id = self._keep_snapshot(snapshot)
        token = base64.urlsafe_b64encode(
            json.dumps(
                {"rv": snapshot.resource_version, "snapshot": snapshot_id, "offset": end}
            ).encode()
        ).decode()
        return page, snapshot.resource_version, token, len(snapshot.items) - end

    def _keep_snapshot(self, snapshot: _ListSnapshot) -> str:
        for existing_id, existing in self._snapshots.items():
            if existing is snapshot:
                return existing_id
        snapshot_id = str(next(self._snapshot_ids))
        self._snapshots[snapshot_id] = snapshot
        while len(self._snapshots) > self._snapshot_limit:
            self._snapshots.popitem(last=False)
        return snapshot_id

    def _resume(self, resource: ResourceType, token: str) -> tuple[_ListSnapshot, int]:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
            snapshot_id, offset = str(decoded["snapshot"]), int(decoded["offset"])
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise bad_request(f"continue key is not valid: {error}") from None
        snapshot = self._snapshots.get(snapshot_id)
        if snapshot is None:
            raise expired(CONTINUE_EXPIRED_MESSAGE)
        if snapshot.plural != resource.plural:
            raise bad_request("continue key is not valid: it belongs to another resource")
        return snapshot, offset

    def history_floor(self, plural: str) -> int:
        """Watches may start from any resourceVersion >= this; older ones get 410."""
        return max(self._compacted_at, self._evicted_up_to.get(plural, 0))

    def changes_after(self, plural: str, resource_version: int) -> list[Change]:
        """The retained changes of one resource after ``resource_version``; raises 410
        Expired when changes after it may have been dropped."""
        floor = self.history_floor(plural)
        if resource_version < floor:
            raise expired(f"too old resource version: {resource_version} ({floor})")
        return [c for c in self._history.get(plural, ()) if c.resource_version > resource_version]

    def compact(self) -> None:
        """Forget all history and list snapshots, as an etcd compaction does."""
        self._compacted_at = self.resource_version
        self._history.clear()
        self._snapshots.clear()

    # ---- writes ------------------------------------------------------------------------

    def _record(self, resource: ResourceType, change_type: ChangeType, old: Json | None,
                new: Json) -> None:
        change = Change(self.resource_version, change_type, old, new)
        history = self._history.setdefault(resource.plural, deque())
        history.append(change)
        for listener in list(self.listeners):
            listener(resource.plural, change)
        while len(history) > self._history_limit:
            dropped = history.popleft()
            self._evicted_up_to[resource.plural] = dropped.resource_version

    def _store(self, resource: ResourceType, old: Json | None, new: Json) -> Json:
        self.resource_version += 1
        new["metadata"]["resourceVersion"] = str(self.resource_version)
        self._objects.setdefault(resource.plural, {})[_key(new)] = new
        self._record(resource, "MODIFIED" if old is not None else "ADDED", old, new)
        return new

    def _remove(self, resource: ResourceType, old: Json) -> Json:
        self.resource_version += 1
        final = copy.deepcopy(old)
        final["metadata"]["resourceVersion"] = str(self.resource_version)
        del self._objects[resource.plural][_key(old)]
        self._record(resource, "DELETED", old, final)
        uid = old["metadata"].get("uid")
        if uid:
            self.pending.deleted_uids.append(uid)
        return final

    def _normalize(self, resource: ResourceType, namespace: str | None, body: Any) -> Json:
        """Check and default an incoming object as the API server's decoding does."""
        if not isinstance(body, dict):
            raise bad_request(f"the body of a {resource.kind} must be a JSON object")
        obj = copy.deepcopy(body)
        api_version = obj.setdefault("apiVersion", resource.api_version)
        kind = obj.setdefault("kind", resource.kind)
        if api_version != resource.api_version:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({resource.api_version})"
            )
        if kind != resource.kind:
            raise bad_request(
                f"the kind in the data ({kind}) does not match the expected kind "
                f"({resource.kind})"
            )
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if resource.namespaced:
            body_ns = meta.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace or body_ns or "default"
        else:
            meta.pop("namespace", None)
        for map_name in ("labels", "annotations"):
            values = meta.get(map_name)
            if values is None:
                meta.pop(map_name, None)
            elif not isinstance(values, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in values.items()
            ):
                raise invalid(
                    resource, str(meta.get("name", "")), f"metadata.{map_name}",
                    "Invalid value: must be a map of strings to strings",
                )
        return obj

    def _check_name(self, resource: ResourceType, obj: Json) -> None:
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            meta["name"] = f"{meta['generateName']}{suffix}"
        name = meta.get("name")
        if not name:
            raise invalid(
                resource, "", "metadata.name",
                "Required value: name or generateName is required",
            )
        if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise invalid(
                resource, str(name), "metadata.name",
                f"Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of lower "
                "case alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character",
            )

    def _check_namespace_open(self, resource: ResourceType, obj: Json) -> None:
        if not resource.namespaced:
            return
        ns_name = obj["metadata"]["namespace"]
        namespace = self.find(resource_named("namespaces"), None, ns_name)
        if namespace is None:
            raise not_found(resource_named("namespaces"), ns_name)
        if namespace["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{resource.qualified_name} "{obj["metadata"]["name"]}" is forbidden: unable to '
                f"create new content in namespace {ns_name} because it is being terminated",
                _details(resource, obj["metadata"]["name"]),
            )

    @staticmethod
    def _initial_status(resource: ResourceType) -> Json:
        """The status a create through the API starts with (given status is dropped)."""
        if resource.plural == "namespaces":
            return {"phase": "Active"}
        if resource.plural == "pods":
            return {"phase": "Pending"}
        return {}

    def create(
        self, resource: ResourceType, namespace: str | None, body: Any, *, from_client: bool = True
    ) -> Json:
        """POST: 409 AlreadyExists, 404 for a missing namespace (client writes only), the
        status reset for types with a status subresource (client writes only)."""
        obj = self._normalize(resource, namespace, body)
        self._check_name(resource, obj)
        meta = obj["metadata"]
        if from_client:
            self._check_namespace_open(resource, obj)
            if resource.has_status:
                obj["status"] = self._initial_status(resource)
        elif resource.plural == "namespaces":
            obj.setdefault("status", {"phase": "Active"})
        if self.find(resource, meta.get("namespace"), meta["name"]) is not None:
            raise ApiError(
                409, "AlreadyExists", f'{resource.qualified_name} "{meta["name"]}" already exists',
                _details(resource, meta["name"]),
            )
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_timestamp()
        meta["generation"] = 1
        for volatile in ("resourceVersion", "deletionTimestamp"):
            meta.pop(volatile, None)
        return self._store(resource, None, obj)

    def update(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        from_client: bool = True,
    ) -> Json:
        """PUT (and the end of every PATCH): 404, 409 Conflict on a stale resourceVersion,
        ``/status`` changes only .status, other writes keep .status for types that have the
        subresource. A write that changes nothing keeps the resourceVersion (no event)."""
        old = self.get(resource, namespace, name)
        obj = self._normalize(resource, namespace or old["metadata"].get("namespace"), body)
        meta = obj["metadata"]
        if meta.get("name", name) != name:
            raise bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the "
                f"URL ({name})"
            )
        meta["name"] = name
        wanted_version = meta.get("resourceVersion")
        if from_client and wanted_version and wanted_version != old["metadata"]["resourceVersion"]:
            raise conflict(resource, name)
        wanted_uid = meta.get("uid")
        if from_client and wanted_uid and wanted_uid != old["metadata"]["uid"]:
            raise ApiError(
                409, "Conflict",
                f'Operation cannot be fulfilled on {resource.qualified_name} "{name}": '
                f"Precondition failed: UID in precondition: {wanted_uid}, UID in object meta: "
                f"{old['metadata']['uid']}",
                _details(resource, name),
            )
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
        else:
            new = obj
            if from_client and resource.has_status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            for kept in ("uid", "creationTimestamp", "deletionTimestamp", "generation"):
                if kept in old["metadata"]:
                    meta[kept] = old["metadata"][kept]
                else:
                    meta.pop(kept, None)
            if _spec_part(new) != _spec_part(old):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if _without_volatile(new) == _without_volatile(old):
            return old
        stored = self._store(resource, old, new)
        if stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get(
            "finalizers"
        ) and resource.plural != "namespaces":
            return self._remove(resource, stored)
        return stored

    def patch(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        content_type: str,
        raw_body: bytes,
        *,
        subresource: str | None = None,
        field_manager: str | None = None,
    ) -> tuple[Json, bool]:
        """PATCH with one of the four patch types; returns (object, created) — only a
        server-side apply patch may create."""
        if content_type not in PATCH_TYPES:
            raise ApiError(
                415, "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(PATCH_TYPES)}",
            )
        if content_type == STRATEGIC_MERGE_PATCH and resource.custom:
            raise ApiError(
                415, "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                f"include: {JSON_PATCH}, {MERGE_PATCH}, {APPLY_PATCH}",
            )
        try:
            if content_type == APPLY_PATCH:
                patch_body = yaml.safe_load(raw_body.decode())
            else:
                patch_body = json.loads(raw_body)
        except (ValueError, yaml.YAMLError) as error:
            raise bad_request(f"error decoding patch: {error}") from None
        if content_type == APPLY_PATCH:
            if not field_manager:
                raise invalid(
                    resource, name, "fieldManager",
                    "Required value: is required for apply patch",
                )
            if self.find(resource, namespace, name) is None and subresource is None:
                if not isinstance(patch_body, dict):
                    raise bad_request("an apply patch must be an object")
                patch_body.setdefault("metadata", {}).setdefault("name", name)
                return self.create(resource, namespace, patch_body), True
        old = self.get(resource, namespace, name)
        if content_type == JSON_PATCH and not isinstance(patch_body, list):
            raise bad_request(
                "json: cannot unmarshal object into Go value of type jsonpatch.Patch "
                "(a JSON patch must be a list of operations)"
            )
        try:
            if content_type == JSON_PATCH:
                patched = json_patch(old, patch_body)
            else:
                if not isinstance(patch_body, dict):
                    raise bad_request("a merge patch must be a JSON object")
                patched = merge_patch(old, patch_body)
        except PatchError as error:
            raise ApiError(422, "Invalid", f"the patch could not be applied: {error}") from None
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patched object is not a JSON object")
        meta = patched.setdefault("metadata", {})
        # A resourceVersion in the patch is a precondition; otherwise the patch applies to the
        # current object unconditionally.
        if not isinstance(meta, dict):
            raise ApiError(422, "Invalid", "metadata must be an object")
        meta.setdefault("resourceVersion", old["metadata"]["resourceVersion"])
        if subresource is None and resource.has_status:
            patched["status"] = copy.deepcopy(old.get("status"))
            if patched["status"] is None:
                del patched["status"]
        return self.update(resource, namespace, name, patched, subresource=subresource), False

    def delete(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        preconditions: Mapping[str, Any] | None = None,
        propagation_policy: str | None = None,
    ) -> Json:
        """DELETE: returns the deleted object. Finalizers defer the removal (deletionTimestamp
        set); a namespace goes Terminating and is emptied in the background; dependents are
        garbage-collected in the background unless ``propagationPolicy=Orphan``."""
        old = self.get(resource, namespace, name)
        meta = old["metadata"]
        if preconditions:
            if preconditions.get("uid") and preconditions["uid"] != meta.get("uid"):
                raise ApiError(
                    409, "Conflict",
                    f'Operation cannot be fulfilled on {resource.qualified_name} "{name}": '
                    f"Precondition failed: UID in precondition: {preconditions['uid']}, UID in "
                    f"object meta: {meta.get('uid')}",
                    _details(resource, name),
                )
            wanted = preconditions.get("resourceVersion")
            if wanted and wanted != meta.get("resourceVersion"):
                raise conflict(resource, name)
        if meta.get("deletionTimestamp"):
            return old
        if resource.plural == "namespaces" or meta.get("finalizers"):
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_timestamp()
            if resource.plural == "namespaces":
                new.setdefault("status", {})["phase"] = "Terminating"
                self.pending.terminating_namespaces.append(name)
            return self._store(resource, old, new)
        final = self._remove(resource, old)
        if propagation_policy == "Orphan" and meta.get("uid"):
            self.pending.deleted_uids.remove(meta["uid"])
        return final

    def take_pending(self) -> PendingWork:
        work, self.pending = self.pending, PendingWork()
        return work

    def collect_dependents(self, deleted_uids: Iterable[str]) -> int:
        """The garbage collector's pass for owners that were deleted: a dependent all of
        whose owners are gone is deleted (which queues its own dependents); one that keeps a
        live owner loses the dead ownerReference. Returns how many objects changed."""
        dead = set(deleted_uids)
        live_uids = {
            obj["metadata"].get("uid")
            for objects in self._objects.values()
            for obj in objects.values()
        }
        changed = 0
        for plural, objects in list(self._objects.items()):
            resource = resource_named(plural)
            for obj in list(objects.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") in dead for ref in refs):
                    continue
                remaining = [ref for ref in refs if ref.get("uid") not in dead]
                namespace, name = _key(obj)
                if any(ref.get("uid") in live_uids for ref in remaining):
                    new = copy.deepcopy(obj)
                    new["metadata"]["ownerReferences"] = remaining
                    self._store(resource, obj, new)
                elif not obj["metadata"].get("deletionTimestamp"):
                    self.delete(resource, namespace, name)
                changed += 1
        return changed

    def finish_namespace(self, name: str) -> None:
        """Empty a Terminating namespace, then remove it (its contents' dependents are
        queued for collection like any delete)."""
        for plural in list(self._objects):
            resource = resource_named(plural)
            if not resource.namespaced:
                continue
            for obj in list(self._objects[plural].values()):
                if _key(obj)[0] == name:
                    self._remove(resource, obj)
        namespace = self.find(resource_named("namespaces"), None, name)
        if namespace is not None:
            self._remove(resource_named("namespaces"), namespace)

    def apply(self, body: Json, resource: ResourceType) -> Json:
        """The test hook's create-or-replace: status as given, no namespace check, no
        resourceVersion precondition."""
        obj = self._normalize(resource, None, body)
        self._check_name(resource, obj)
        meta = obj["metadata"]
        if self.find(resource, meta.get("namespace"), meta["name"]) is None:
            return self.create(resource, meta.get("namespace"), obj, from_client=False)
        meta.pop("resourceVersion", None)
        return self.update(resource, meta.get("namespace"), meta["name"], obj, from_client=False)
