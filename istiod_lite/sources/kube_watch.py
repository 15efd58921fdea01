"""The sans-IO half of the Kubernetes source: which kinds are watched and how to list them
(``WatchedKind``, ``DEFAULT_KINDS``, ``list_function``), how a watch stream's lines read
(``parse_watch_line``), one kind's objects as the watch events change them (``KindStore``,
with ``prepare_object`` slimming and validating each) and the reflectors' retry delays
(``Backoff``). ``kubernetes.py`` drives these with Trio against a real API server.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes import client as kube_client

from istiod_lite.sources.objects import (
    CLUSTER_SCOPED_KINDS,
    KIND_FIELDS,
    object_key,
)
from istiod_lite.sources.validation import validate_object

logger = structlog.get_logger(__name__)

LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


@dataclass(frozen=True)
class WatchedKind:
    """One resource the source lists and watches. ``crd`` kinds are read with
    ``CustomObjectsApi`` and may be absent from a cluster (404)."""

    api_version: str
    kind: str
    plural: str
    crd: bool = False

    def __post_init__(self) -> None:
        if (self.api_version, self.kind) not in KIND_FIELDS:
            raise ValueError(f"{self.api_version} {self.kind} is not a kind ClusterObjects holds")
        if not self.crd and (self.api_version, self.kind) not in _BUILTIN_LISTS:
            raise ValueError(f"{self.api_version} {self.kind} is not built in: mark it crd=True")

    @property
    def field(self) -> str:
        """The ``ClusterObjects`` field holding this kind."""
        return KIND_FIELDS[(self.api_version, self.kind)]

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def resource(self) -> str:
        """``pods`` or ``gateways.gateway.networking.k8s.io``, as kubectl names resources."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


# Built-in kinds -> (typed API class, its list-across-all-namespaces method).
_BUILTIN_LISTS: dict[tuple[str, str], tuple[type[Any], str]] = {
    ("v1", "Namespace"): (kube_client.CoreV1Api, "list_namespace"),
    ("v1", "Pod"): (kube_client.CoreV1Api, "list_pod_for_all_namespaces"),
    ("v1", "Service"): (kube_client.CoreV1Api, "list_service_for_all_namespaces"),
    ("v1", "ServiceAccount"): (
        kube_client.CoreV1Api,
        "list_service_account_for_all_namespaces",
    ),
    ("v1", "Node"): (kube_client.CoreV1Api, "list_node"),
    ("discovery.k8s.io/v1", "EndpointSlice"): (
        kube_client.DiscoveryV1Api,
        "list_endpoint_slice_for_all_namespaces",
    ),
}

DEFAULT_KINDS: tuple[WatchedKind, ...] = (
    WatchedKind("v1", "Namespace", "namespaces"),
    WatchedKind("v1", "Pod", "pods"),
    WatchedKind("v1", "Service", "services"),
    WatchedKind("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    WatchedKind("v1", "ServiceAccount", "serviceaccounts"),
    WatchedKind("v1", "Node", "nodes"),
    WatchedKind("gateway.networking.k8s.io/v1", "Gateway", "gateways", crd=True),
    WatchedKind("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes", crd=True),
    WatchedKind("gateway.networking.k8s.io/v1alpha2", "TCPRoute", "tcproutes", crd=True),
    WatchedKind(
        "security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies", crd=True
    ),
    WatchedKind("security.istio.io/v1", "PeerAuthentication", "peerauthentications", crd=True),
    WatchedKind(
        "security.istio.io/v1", "RequestAuthentication", "requestauthentications", crd=True
    ),
    WatchedKind("networking.istio.io/v1", "VirtualService", "virtualservices", crd=True),
    WatchedKind("networking.istio.io/v1", "DestinationRule", "destinationrules", crd=True),
    WatchedKind(
        "policy.ambient-lite.io/v1alpha1", "LocalRateLimit", "localratelimits", crd=True
    ),
)


def list_function(api_client: kube_client.ApiClient, kind: WatchedKind) -> Callable[..., Any]:
    """The client method that lists (and, with ``watch=True``, watches) ``kind`` across all
    namespaces; it takes the usual ``limit``, ``_continue``, ``resource_version``... keywords."""
    if kind.crd:
        api = kube_client.CustomObjectsApi(api_client)
        return functools.partial(
            api.list_cluster_custom_object, kind.group, kind.version, kind.plural
        )
    api_class, method = _BUILTIN_LISTS[(kind.api_version, kind.kind)]
    return getattr(api_class(api_client), method)  # type: ignore[no-any-return]


# -- backoff ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff: ``initial * multiplier**(n-1)`` capped at ``maximum``, each delay
    shortened by up to ``jitter`` (a fraction) so that many clients do not retry in step."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("backoff jitter must be in [0, 1)")

    def delay(self, failures: int, random_fraction: float) -> float:
        """The wait after the ``failures``-th consecutive failure (1-based); ``random_fraction``
        in [0, 1) picks the jitter."""
        exponent = min(max(failures - 1, 0), 64)  # large enough to reach any cap, no overflow
        base = min(self.maximum, self.initial * self.multiplier**exponent)
        return base * (1.0 - self.jitter * random_fraction)


class Backoff:
    """Consecutive-failure counter over a ``BackoffPolicy``."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self.failures = 0

    def next_delay(self, *, first_is_free: bool = False) -> float:
        """Record a failure and return how long to wait; with ``first_is_free`` the first
        failure after a success waits nothing (a relist after one 410)."""
        self.failures += 1
        if first_is_free and self.failures == 1:
            return 0.0
        return self.policy.delay(self.failures, self._rng.random())

    def reset(self) -> None:
        self.failures = 0


# -- watch events ----------------------------------------------------------------------------


class ResourceExpired(Exception):
    """410 Gone: the server no longer has the resourceVersion we asked for; relist."""


class WatchFailed(Exception):
    """The server sent something unusable (an ERROR event, a broken line, a bad list)."""


WATCH_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK"})


@dataclass(frozen=True)
class WatchEvent:
    type: str
    object: dict[str, Any]

    @property
    def resource_version(self) -> str | None:
        metadata = self.object.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        return version if isinstance(version, str) and version else None


def parse_watch_line(line: str) -> WatchEvent | None:
    """One line of a watch stream: None for a blank line (a keep-alive); raises
    ``ResourceExpired`` for an ERROR event with code 410, ``WatchFailed`` for any other ERROR
    event or a line that is not an event."""
    if not line.strip():
        return None
    try:
        document = json.loads(line)
    except json.JSONDecodeError as error:
        raise WatchFailed(f"watch line is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise WatchFailed("watch line is not a JSON object")
    event_type = document.get("type")
    obj = document.get("object")
    if not isinstance(obj, dict):
        raise WatchFailed(f"watch event {event_type!r} has no object")
    if event_type == "ERROR":
        code = obj.get("code")
        message = obj.get("message") or obj.get("reason") or "no message"
        if code == 410:
            raise ResourceExpired(f"watch expired: {message}")
        raise WatchFailed(f"watch ERROR event (code {code}): {message}")
    if event_type not in WATCH_EVENT_TYPES:
        raise WatchFailed(f"unknown watch event type {event_type!r}")
    return WatchEvent(event_type, obj)


# -- one kind's objects (sans-IO) ------------------------------------------------------------


@dataclass(frozen=True)
class StoreChange:
    """What a LIST or an event did to a kind's served objects (keys)."""

    added: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted)


class NotReady(ValueError):
    """An object that is valid but cannot be served yet (a pod without node or IP)."""


def slim_object(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without what only API clients that write the object need: managedFields and
    kubectl's last-applied annotation."""
    obj = dict(raw)
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        metadata = dict(metadata)
        metadata.pop("managedFields", None)
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict) and LAST_APPLIED_ANNOTATION in annotations:
            annotations = dict(annotations)
            del annotations[LAST_APPLIED_ANNOTATION]
            if annotations:
                metadata["annotations"] = annotations
            else:
                del metadata["annotations"]
        obj["metadata"] = metadata
    return obj


def prepare_object(kind: WatchedKind, raw: Any) -> dict[str, Any]:
    """The object as served: slimmed, with ``apiVersion``/``kind`` set (list items of
    built-in kinds carry neither) and validated. Raises ``NotReady`` or ``ValueError``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{kind.kind}: expected an object, got {type(raw).__name__}")
    obj = slim_object(raw)
    obj["apiVersion"] = kind.api_version
    obj["kind"] = kind.kind
    if kind.kind == "Pod":
        spec, status = obj.get("spec"), obj.get("status")
        node = spec.get("nodeName") if isinstance(spec, dict) else None
        pod_ip = status.get("podIP") if isinstance(status, dict) else None
        if not node or not pod_ip:
            raise NotReady("not scheduled or no pod IP yet")
    return validate_object(obj)


def raw_key(kind: WatchedKind, raw: Any) -> str:
    """``namespace/name`` (``name`` if cluster-scoped) of an object that may be invalid."""
    found = raw.get("metadata") if isinstance(raw, dict) else None
    metadata: dict[str, Any] = found if isinstance(found, dict) else {}
    name = str(metadata.get("name") or "?")
    if kind.kind in CLUSTER_SCOPED_KINDS:
        return name
    return f"{metadata.get('namespace') or 'default'}/{name}"


class KindStore:
    """The served objects of one kind, keyed ``namespace/name``, as a LIST and the watch
    events after it leave them. Invalid objects are logged once per reason and not served."""

    def __init__(self, kind: WatchedKind) -> None:
        self.kind = kind
        self.objects: dict[str, dict[str, Any]] = {}
        # key -> why it is not served, so the same problem is logged once, not per event.
        self.rejected: dict[str, str] = {}

    def replace(self, items: Iterable[Any]) -> StoreChange:
        """A LIST's items become the whole store (atomically: nothing is half-listed)."""
        fresh: dict[str, dict[str, Any]] = {}
        rejected: dict[str, str] = {}
        for raw in items:
            key, obj, reason = self._admit(raw)
            if obj is None:
                rejected[key] = reason
            else:
                fresh[key] = obj
        added = tuple(sorted(key for key in fresh if key not in self.objects))
        modified = tuple(
            sorted(key for key in fresh if key in self.objects and fresh[key] != self.objects[key])
        )
        deleted = tuple(sorted(key for key in self.objects if key not in fresh))
        self.objects = fresh
        self.rejected = rejected
        return StoreChange(added, modified, deleted)

    def apply(self, event_type: str, raw: Any) -> StoreChange:
        """An ADDED, MODIFIED or DELETED event."""
        if event_type == "DELETED":
            key = raw_key(self.kind, raw)
            self.rejected.pop(key, None)
            if self.objects.pop(key, None) is None:
                return StoreChange()
            return StoreChange(deleted=(key,))
        if event_type not in ("ADDED", "MODIFIED"):
            raise ValueError(f"not an object event: {event_type!r}")
        key, obj, reason = self._admit(raw)
        if obj is None:
            self.rejected[key] = reason
            # Not served any more: an object that stopped being valid is not served stale.
            if self.objects.pop(key, None) is None:
                return StoreChange()
            return StoreChange(deleted=(key,))
        self.rejected.pop(key, None)
        previous = self.objects.get(key)
        self.objects[key] = obj
        if previous is None:
            return StoreChange(added=(key,))
        if previous == obj:
            return StoreChange()
        return StoreChange(modified=(key,))

    def _admit(self, raw: Any) -> tuple[str, dict[str, Any] | None, str]:
        """(key, the object to serve or None, why not); logs a new reason once."""
        try:
            obj = prepare_object(self.kind, raw)
        except ValueError as error:
            key = raw_key(self.kind, raw)
            reason = str(error)
            if self.rejected.get(key) != reason:
                if isinstance(error, NotReady):
                    logger.debug("not serving yet", kind=self.kind.kind, key=key, reason=reason)
                else:
                    logger.warning(
                        "invalid object skipped", kind=self.kind.kind, key=key, reason=reason
                    )
            return key, None, reason
        return object_key(obj), obj, ""
