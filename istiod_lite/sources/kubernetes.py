"""A Kubernetes API server as the cluster: the source istiod_lite uses when it runs in one.

Same contract as ``FileSource``: ``run`` sends ``ClusterObjects`` snapshots, the first once
every watched kind has been listed, then one after each effective change. Bursts are
coalesced (a snapshot at most every ``coalesce_interval``) and nothing is sent when nothing
that is served changed (a BOOKMARK, a relist finding the same objects).

Each kind has a reflector, as client-go's: LIST (in pages of ``page_size``), then WATCH from
the list's resourceVersion with bookmarks and a server-side timeout, resuming a dropped or
ended stream from the last resourceVersion seen, so no event is missed across a reconnect.
410 Gone (an ERROR event or an HTTP 410) means the server no longer has our resourceVersion:
relist and replace that kind's objects at once (objects that vanished are deleted). Other
errors back off exponentially with jitter up to ``resync_backoff.maximum``; the first relist
after a 410 is immediate, every later failure without progress waits, so nothing busy-loops.
A CRD that is not installed (404 on LIST) is logged once and retried every
``missing_kind_retry`` seconds while the other kinds keep working.

Objects are validated with ``objects.validate_object``; an invalid one is logged (once per
reason) and not served, the rest of its kind is. A pod that is not scheduled or has no IP yet
is not an error, just not served yet. Stored objects drop ``metadata.managedFields`` and the
``kubectl.kubernetes.io/last-applied-configuration`` annotation (they often outweigh the
object), so memory stays proportional to what is watched.

EndpointSlices are served in ``ClusterObjects.endpoint_slices``; translation does not read
them yet (Workloads and Service endpoints still come from Pods and Service selectors).

The ``kubernetes`` client is synchronous: every call runs in a worker thread through
``istiod_lite.kube.run_blocking``; cancelling ``run`` aborts the open watch sockets so no
thread outlives the source by more than the time a LIST takes.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog
import trio
import urllib3.exceptions
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from istiod_lite.kube.client import StreamAborted, open_response_lines, run_blocking
from istiod_lite.sources.objects import (
    CLUSTER_SCOPED_KINDS,
    KIND_FIELDS,
    ClusterObjects,
    object_key,
    validate_object,
)

logger = structlog.get_logger(__name__)

LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"
# A watch that ends cleanly sooner than this without delivering anything counts as a failure
# (a proxy closing streams at once must not make us reconnect in a tight loop).
MIN_HEALTHY_WATCH_SECONDS = 1.0
# Added to the watch's server-side timeout for the client's socket read timeout: a half-open
# connection (the server gone without a FIN) then ends the watch instead of hanging forever.
WATCH_READ_SLACK_SECONDS = 30.0


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


# -- the reflector (the Trio driver of one kind) ---------------------------------------------


def error_text(error: BaseException) -> str:
    """A one-line reason: ``str(ApiException)`` is a multi-line dump of headers and body."""
    if isinstance(error, ApiException):
        message = ""
        try:
            body = json.loads(error.body) if error.body else None
        except (TypeError, ValueError):
            body = None
        if isinstance(body, dict):
            message = str(body.get("message") or "")
        return f"HTTP {error.status} {error.reason or ''}".rstrip() + (
            f": {message}" if message else ""
        )
    return str(error) or type(error).__name__


# What a broken connection or server looks like; anything else is logged with a traceback.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ApiException,
    urllib3.exceptions.HTTPError,
    OSError,
    WatchFailed,
    StreamAborted,
)


@dataclass(frozen=True)
class ReflectorSettings:
    page_size: int = 500
    watch_timeout: float = 300.0
    missing_kind_retry: float = 60.0
    # (connect, read) seconds for LIST pages and for opening a watch.
    request_timeout: tuple[float, float] = (10.0, 60.0)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


class Reflector:
    """LIST then WATCH one kind forever into a ``KindStore``, calling ``on_change`` after
    each effective change. ``synced`` is set after the first LIST (or when the kind turns out
    not to be served, so a missing CRD does not hold up the start)."""

    def __init__(
        self,
        kind: WatchedKind,
        list_fn: Callable[..., Any],
        *,
        on_change: Callable[[], None],
        settings: ReflectorSettings,
        rng: random.Random,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.kind = kind
        self.store = KindStore(kind)
        self.synced = trio.Event()
        self.resource_version: str | None = None
        self.missing = False
        self._list_fn = list_fn
        self._on_change = on_change
        self._settings = settings
        self._rng = rng
        self._limiter = limiter
        self._backoff = Backoff(settings.backoff, rng)
        self._log = logger.bind(resource=kind.resource)

    async def run(self) -> NoReturn:
        listed_before = False
        while True:
            try:
                await self._list(relist=listed_before)
            except ApiException as error:
                if error.status == 404 and self.kind.crd:
                    self._kind_missing()
                    await trio.sleep(self._settings.missing_kind_retry)
                    continue
                await self._failed("list failed", error, first_is_free=error.status == 410)
                continue
            except TRANSIENT_ERRORS as error:
                await self._failed("list failed", error)
                continue
            except ResourceExpired as error:
                await self._failed("list expired", error, first_is_free=True)
                continue
            except Exception as error:
                self._log.exception("list failed unexpectedly")
                await self._failed("list failed", error)
                continue
            listed_before = True
            await self._watch_until_expired()

    def _kind_missing(self) -> None:
        if not self.missing:
            self._log.warning(
                "kind not served by the API server (CRD not installed?); retrying slowly",
                retry_seconds=self._settings.missing_kind_retry,
            )
            self.missing = True
        self.resource_version = None
        change = self.store.replace(())
        if change:
            self._on_change()
        self.synced.set()

    async def _failed(
        self, what: str, error: BaseException, *, first_is_free: bool = False
    ) -> None:
        delay = self._backoff.next_delay(first_is_free=first_is_free)
        self._log.warning(
            what,
            error=error_text(error),
            failures=self._backoff.failures,
            retry_in=round(delay, 3),
        )
        await trio.sleep(delay)

    async def _list(self, *, relist: bool) -> None:
        items: list[Any] = []
        token: str | None = None
        version: Any = None
        while True:
            page = await run_blocking(
                functools.partial(self._list_page, token),
                name=f"kube list {self.kind.resource}",
                limiter=self._limiter,
            )
            page_items = page.get("items")
            if page_items is not None and not isinstance(page_items, list):
                raise WatchFailed("LIST answer's items is not a list")
            items.extend(page_items or ())
            metadata = page.get("metadata")
            metadata = metadata if isinstance(metadata, dict) else {}
            version = metadata.get("resourceVersion") or version
            token = metadata.get("continue") or None
            if token is None:
                break
        if not isinstance(version, str) or not version:
            raise WatchFailed("LIST answer has no metadata.resourceVersion")
        change = self.store.replace(items)
        self.resource_version = version
        if self.missing:
            self._log.info("kind is served now")
            self.missing = False
        if relist or change.deleted:
            self._log.info(
                "relisted" if relist else "listed",
                resource_version=version,
                objects=len(self.store.objects),
                added=len(change.added),
                modified=len(change.modified),
                deleted=len(change.deleted),
            )
        else:
            self._log.debug("listed", resource_version=version, objects=len(self.store.objects))
        if change:
            self._on_change()
        self.synced.set()

    def _list_page(self, token: str | None) -> dict[str, Any]:
        """One LIST page (blocking; runs in a worker thread)."""
        kwargs: dict[str, Any] = {
            "limit": self._settings.page_size,
            "_preload_content": False,
            "_request_timeout": self._settings.request_timeout,
        }
        if token is not None:
            kwargs["_continue"] = token
        response = self._list_fn(**kwargs)
        try:
            data = response.data
        finally:
            response.release_conn()
        try:
            body = json.loads(data)
        except ValueError as error:
            raise WatchFailed(f"LIST answer is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise WatchFailed("LIST answer is not a JSON object")
        return body

    async def _watch_until_expired(self) -> None:
        """Watch, resuming from the last resourceVersion after every end or error, until the
        server says that version is gone (then the caller relists)."""
        while True:
            started = trio.current_time()
            try:
                delivered = await self._watch_once()
            except ResourceExpired as error:
                delay = self._backoff.next_delay(first_is_free=True)
                self._log.info(
                    "watch expired, relisting",
                    reason=str(error),
                    resource_version=self.resource_version,
                    retry_in=round(delay, 3),
                )
                await trio.sleep(delay)
                return
            except ApiException as error:
                if error.status == 410 or (error.status == 404 and self.kind.crd):
                    # Gone, or the CRD was removed: the list decides what is served now.
                    delay = self._backoff.next_delay(first_is_free=True)
                    self._log.info("watch refused, relisting", error=error_text(error))
                    await trio.sleep(delay)
                    return
                await self._failed("watch failed", error)
            except TRANSIENT_ERRORS as error:
                await self._failed("watch failed", error)
            except Exception as error:
                self._log.exception("watch failed unexpectedly")
                await self._failed("watch failed", error)
            else:
                lasted = trio.current_time() - started
                if not delivered and lasted < MIN_HEALTHY_WATCH_SECONDS:
                    await self._failed(
                        "watch ended at once", WatchFailed("the stream closed immediately")
                    )

    async def _watch_once(self) -> bool:
        """One watch request from ``resource_version`` until the stream ends; True if it
        delivered any event (which also resets the backoff)."""
        timeout = self._settings.watch_timeout * (1.0 + self._rng.random())
        connect_timeout = self._settings.request_timeout[0]
        open_watch = functools.partial(
            self._list_fn,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, int(timeout)),
            _preload_content=False,
            _request_timeout=(connect_timeout, timeout + WATCH_READ_SLACK_SECONDS),
        )
        name = f"kube watch {self.kind.resource}"
        lines = await open_response_lines(open_watch, name=name, limiter=self._limiter)
        delivered = False
        try:
            while True:
                line = await run_blocking(
                    lines.next_line, name=name, limiter=self._limiter, on_abandon=lines.abort
                )
                if line is None:
                    return delivered
                event = parse_watch_line(line)
                if event is None:
                    continue
                if not delivered:
                    delivered = True
                    self._backoff.reset()
                self._apply(event)
        finally:
            lines.abort()

    def _apply(self, event: WatchEvent) -> None:
        if event.type != "BOOKMARK":
            change = self.store.apply(event.type, event.object)
            if change:
                self._on_change()
        if event.resource_version is not None:
            self.resource_version = event.resource_version


# -- the source ------------------------------------------------------------------------------


class KubernetesSource:
    """Serves the watched kinds of a Kubernetes API server as ``ClusterObjects`` (see the
    module docstring). One ``run`` per instance."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        *,
        kinds: Sequence[WatchedKind] = DEFAULT_KINDS,
        resync_backoff: BackoffPolicy = BackoffPolicy(),  # noqa: B008 (frozen, immutable)
        coalesce_interval: float = 0.05,
        page_size: int = 500,
        watch_timeout: float = 300.0,
        missing_kind_retry: float = 60.0,
        request_timeout: tuple[float, float] = (10.0, 60.0),
        rng: random.Random | None = None,
    ) -> None:
        fields = [kind.field for kind in kinds]
        duplicates = sorted({name for name in fields if fields.count(name) > 1})
        if duplicates:
            raise ValueError(f"two watched kinds fill the same field: {', '.join(duplicates)}")
        if page_size < 1 or watch_timeout < 1 or coalesce_interval < 0:
            raise ValueError("page_size and watch_timeout must be >= 1, coalesce_interval >= 0")
        if not math.isfinite(missing_kind_retry) or missing_kind_retry <= 0:
            raise ValueError("missing_kind_retry must be a positive number of seconds")
        self.coalesce_interval = coalesce_interval
        settings = ReflectorSettings(
            page_size=page_size,
            watch_timeout=watch_timeout,
            missing_kind_retry=missing_kind_retry,
            request_timeout=request_timeout,
            backoff=resync_backoff,
        )
        rng = rng or random.Random()
        # One thread per kind for its watch plus one for a list or an abandoned call; own
        # limiter so the watches never starve (or are starved by) other to_thread users.
        self._limiter = trio.CapacityLimiter(2 * len(kinds) + 2)
        self._generation = 0
        self._dirty: set[str] = set()
        self._changed = trio.Event()
        self.reflectors = [
            Reflector(
                kind,
                list_function(api_client, kind),
                on_change=functools.partial(self._note_change, kind.field),
                settings=settings,
                rng=rng,
                limiter=self._limiter,
            )
            for kind in kinds
        ]

    def snapshot(self) -> ClusterObjects:
        """What is served now (objects of kinds not watched are empty)."""
        return ClusterObjects(
            **{
                reflector.kind.field: dict(sorted(reflector.store.objects.items()))
                for reflector in self.reflectors
            }
        )

    def _note_change(self, field_name: str) -> None:
        self._generation += 1
        self._dirty.add(field_name)
        self._changed.set()

    async def run(
        self,
        send_channel: trio.MemorySendChannel[ClusterObjects],
        *,
        task_status: trio.TaskStatus[ClusterObjects] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch forever. ``nursery.start`` returns the first snapshot (taken once every kind
        has been listed), which is also the first message on the channel."""
        async with trio.open_nursery() as nursery:
            for reflector in self.reflectors:
                nursery.start_soon(reflector.run, name=f"reflector {reflector.kind.resource}")
            for reflector in self.reflectors:
                await reflector.synced.wait()
            last_sent = self.snapshot()
            self._dirty.clear()
            sent_generation = self._generation
            logger.info("kubernetes source synced", objects=last_sent.count())
            task_status.started(last_sent)
            await send_channel.send(last_sent)
            while True:
                while self._generation == sent_generation:
                    self._changed = trio.Event()
                    await self._changed.wait()
                # Let a burst (a relist, a rollout) settle into one snapshot.
                await trio.sleep(self.coalesce_interval)
                sent_generation = self._generation
                dirty, self._dirty = self._dirty, set()
                snapshot = self.snapshot()
                if all(getattr(snapshot, name) == getattr(last_sent, name) for name in dirty):
                    continue  # changed and changed back within the window
                last_sent = snapshot
                logger.debug("kubernetes source changed", objects=snapshot.count())
                await send_channel.send(snapshot)
