"""A Kubernetes API server stand-in for tests: the real HTTP list/watch protocol, in-process.

No API server can run on the build machine, so tests drive the real ``kubernetes`` Python
client (in worker threads) against this. It is a plain-HTTP HTTP/1.1 server (trio + h11,
keep-alive, chunked watch streams) on a loopback address, holding everything in memory.

Start it and point a client at it::

    server = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    server.write_kubeconfig(tmp_path / "kubeconfig")   # token "admin-token", context "stand-in"
    api = kubernetes.config.new_client_from_config(config_file=str(tmp_path / "kubeconfig"))

Options go through ``functools.partial(FakeKubeApiServer.serve, host, require_token=True)`` or
``server = FakeKubeApiServer(host, ...); await nursery.start(server.run)``.

What it implements, as a real API server does it:

- Resources (``tests.kube.resources.RESOURCES``): core v1 namespaces, nodes, pods, services,
  serviceaccounts, secrets, configmaps, endpoints, events; discovery.k8s.io/v1 endpointslices;
  apps/v1 deployments, daemonsets; policy/v1 poddisruptionbudgets; networking.k8s.io/v1
  networkpolicies; coordination.k8s.io/v1 leases; rbac.authorization.k8s.io/v1 (cluster)roles
  and (cluster)rolebindings; apiextensions.k8s.io/v1 customresourcedefinitions;
  gateway.networking.k8s.io v1 gateways, httproutes and v1alpha2 tcproutes; security.istio.io/v1
  authorizationpolicies, peerauthentications, requestauthentications; networking.istio.io/v1
  virtualservices, destinationrules; policy.ambient-lite.io/v1alpha1 localratelimits;
  authentication.k8s.io/v1 tokenreviews (create only). Paths as Kubernetes, including lists
  across all namespaces, plus discovery (``/api``, ``/apis``, ``/api/v1``, ``/apis/{g}/{v}``),
  ``/version`` and ``/healthz``/``/readyz``/``/livez``.
- One global resourceVersion counter; objects get uid, creationTimestamp, resourceVersion and
  generation (bumped when anything outside metadata/status changes). A write that changes
  nothing keeps the resourceVersion and sends no event.
- LIST: ``{kind: <Kind>List, apiVersion, metadata: {resourceVersion}, items}``; ``limit`` +
  ``continue`` serve consistent pages from a snapshot (``metadata.continue``,
  ``remainingItemCount``; an expired token, e.g. after ``compact()``, is 410 Expired);
  ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``k``, ``!k``); ``fieldSelector``
  (``metadata.name``, ``metadata.namespace``; pods ``spec.nodeName``, ``status.phase`` ... ).
- WATCH (``watch=true``/``1``): newline-delimited JSON events in a chunked response. Without
  ``resourceVersion`` or with ``"0"``: synthetic ADDED events for the current objects first.
  From a resourceVersion: every change after it, replayed from a bounded per-resource history;
  one older than the history (``history_limit`` changes per resource, or before ``compact()``)
  gets HTTP 200 with a single ``ERROR`` event carrying a ``Status`` 410 ``Expired`` and the
  stream ends, exactly as the watch cache answers (so ``kubernetes.watch.Watch`` retries once
  and then raises ``ApiException(status=410)``). Selectors apply to watches with the real
  semantics: an object that stops matching arrives as DELETED, one that starts as ADDED.
  ``allowWatchBookmarks=true``: BOOKMARK events (``{kind, apiVersion, metadata:
  {resourceVersion}}``) on ``send_bookmarks()`` and every ``bookmark_interval`` seconds if set;
  ``sendInitialEvents=true`` ends its initial ADDED events with a bookmark annotated
  ``k8s.io/initial-events-end: "true"``. ``timeoutSeconds`` ends the stream cleanly.
- Writes: POST (201; 409 AlreadyExists; 422 Invalid for a missing or non-RFC-1123 name;
  ``generateName``; 404 when the namespace does not exist, 403 when it is terminating), PUT
  (409 Conflict on a stale ``metadata.resourceVersion``; none means unconditional), PATCH with
  merge patch, JSON patch (all RFC 6902 ops), server-side apply (``apply-patch+yaml``, needs
  ``fieldManager``; merged like a merge patch, creates if absent) and strategic merge patch
  (built-in types only; custom resources answer 415 as real ones do), DELETE (returns the
  object; DeleteOptions preconditions; ``finalizers`` defer removal until they are cleared;
  ``propagationPolicy=Orphan``), deletecollection, and ``/status``: status writes change only
  ``.status``, while other client writes to a type with a status subresource keep the stored
  status (a create starts from an empty one: pods ``Pending``, namespaces ``Active``).
- Garbage collection: shortly (``gc_delay``) after a delete, dependents whose
  ``ownerReferences`` name the deleted uid are deleted (cascading), or lose that reference if
  another owner lives. Deleting a Namespace marks it Terminating, then empties and removes it.
- TokenReview from ``server.token_reviews[token] = TokenReviewAnswer(...)``: audiences are
  intersected with ``spec.audiences`` (or the API server's own, ``api_audiences``, when none);
  no intersection or an unknown token is ``authenticated`` absent plus ``error``. Bound-token
  ``user.extra`` carries ``authentication.kubernetes.io/pod-name`` / ``pod-uid`` (and node).
- Authentication: with ``require_token`` a missing or unknown bearer token is 401; accepted
  tokens are ``tokens`` (the kubeconfig's) and every TokenReview token. No authorization.
- Pod proxy: ``/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/{path}`` is forwarded over
  HTTP/1.1 to ``pod_proxy_targets[(ns, name, port)] = (host, port)``.
- Errors are ``Status`` objects with Kubernetes' codes, reasons and messages.

Test hooks (call them from the Trio thread): ``apply(obj)`` (create or replace, status as
given, no namespace check), ``delete(resource, name, namespace)``, ``get(...)``,
``objects(resource, namespace)``, ``compact()``, ``await drop_watches()`` (abrupt: the
connection closes mid-chunk, so the client's read fails with urllib3's ``ProtocolError``, as
when an API server dies; ``graceful=True`` ends the streams cleanly instead, as on an API
server's shutdown/timeout, and ``Watch.stream`` then re-watches from its last
resourceVersion by itself), ``send_bookmarks()``, ``requests`` (``RecordedRequest(method,
path, query)``), ``fail_next(n, status, path_contains=)``, ``watches`` / ``watch_count()`` /
``await wait_for_watches()``, ``await wait_until(predicate)``, ``resource_version``.

What it does not do: authorization (RBAC objects are stored, not enforced), admission and
schema validation (objects are stored as sent beyond the metadata checks above), defaulting
of spec fields, strategic-merge semantics (lists are replaced, not merged by key),
managedFields, ``resourceVersionMatch=Exact`` lists of old states (lists always show the
current state), ``dryRun``, protobuf, HTTP/2, TLS, subresources other than status and the pod
proxy, and a GC for objects whose owners never existed (only deletes trigger it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import structlog
import trio

from tests.kube.resources import (
    RESOURCES,
    ResourceType,
    UnknownResource,
    resource_for_object,
    resource_named,
    resources_in,
    served_group_versions,
)
from tests.kube.selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)
from tests.kube.store import ApiError, Change, Json, ObjectStore, bad_request, not_found

__all__ = [
    "RESOURCES",
    "ApiError",
    "FakeKubeApiServer",
    "RecordedRequest",
    "ResourceType",
    "TokenReviewAnswer",
    "WatchInfo",
]

log = structlog.get_logger()

MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass(frozen=True)
class TokenReviewAnswer:
    """What TokenReview says about one token. ``groups`` defaults to what Kubernetes gives a
    ServiceAccount (``system:serviceaccounts``, ``...:<ns>``, ``system:authenticated``)."""

    username: str
    audiences: tuple[str, ...] = (DEFAULT_API_AUDIENCE,)
    uid: str = ""
    groups: tuple[str, ...] | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None
    node_uid: str | None = None
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def user_info(self) -> Json:
        groups = self.groups
        if groups is None:
            groups = ("system:authenticated",)
            parts = self.username.split(":")
            if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
                groups = ("system:serviceaccounts", f"system:serviceaccounts:{parts[2]}", *groups)
        extra: dict[str, list[str]] = {k: list(v) for k, v in self.extra.items()}
        for key, value in (
            ("pod-name", self.pod_name),
            ("pod-uid", self.pod_uid),
            ("node-name", self.node_name),
            ("node-uid", self.node_uid),
        ):
            if value is not None:
                extra[f"authentication.kubernetes.io/{key}"] = [value]
        uid = self.uid or hashlib.sha256(self.username.encode()).hexdigest()[:32]
        user: Json = {"username": self.username, "uid": uid, "groups": list(groups)}
        if extra:
            user["extra"] = extra
        return user


class RecordedRequest(NamedTuple):
    """One request as served: decoded path, query with the first value of each key."""

    method: str
    path: str
    query: dict[str, str]


@dataclass(frozen=True)
class WatchInfo:
    """An open watch, for tests asserting where a client resumed."""

    resource: str
    namespace: str | None
    resource_version: str | None
    label_selector: str
    field_selector: str
    allow_bookmarks: bool


@dataclass
class _WatchPlan:
    resource: ResourceType
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    start: str | None
    bookmarks: bool
    send_initial_events: bool
    timeout: float | None
    info: WatchInfo

    def matches(self, obj: Json | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace and self.resource.namespaced and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)


@dataclass
class _OpenWatch:
    plan: _WatchPlan
    queue: deque[Change] = field(default_factory=deque)
    wakeup: trio.Event = field(default_factory=trio.Event)
    bookmark_requested: bool = False
    end: str | None = None  # None, "graceful" or "abrupt"
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: trio.Event = field(default_factory=trio.Event)


@dataclass
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Failure:
    remaining: int
    status: int
    path_contains: str | None


class _CloseConnection(Exception):
    """End this connection now, without finishing the response (an abrupt drop)."""


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_reply(status: int, obj: Any) -> _Reply:
    return _Reply(status, _json_bytes(obj))


def _parse_bool(query: Mapping[str, str], name: str) -> bool:
    """Go's strconv.ParseBool, as the API server parses boolean query parameters."""
    value = query.get(name)
    if value is None or value == "":
        return False
    if value in ("1", "t", "T", "true", "True", "TRUE"):
        return True
    if value in ("0", "f", "F", "false", "False", "FALSE"):
        return False
    raise bad_request(f"invalid boolean for query parameter {name}: {value!r}")


def _parse_int(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise bad_request(f"invalid integer for query parameter {name}: {value!r}") from None
    if number < 0:
        raise bad_request(f"query parameter {name} must not be negative: {value!r}")
    return number


def _parse_resource_version(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(
            400, "BadRequest", f'resourceVersion: Invalid value: "{value}": must be an integer'
        ) from None


class FakeKubeApiServer:
    """The stand-in; see the module docstring for what it serves."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        require_token: bool = False,
        tokens: Iterable[str] = ("admin-token",),
        history_limit: int = 1000,
        gc_delay: float = 0.02,
        bookmark_interval: float | None = None,
        initial_namespaces: Iterable[str] = (
            "default",
            "kube-system",
            "kube-public",
            "kube-node-lease",
        ),
        api_audiences: tuple[str, ...] = (DEFAULT_API_AUDIENCE,),
    ) -> None:
        self.host = host
        self.port = 0
        self.require_token = require_token
        self.tokens: set[str] = set(tokens)
        self.token_reviews: dict[str, TokenReviewAnswer] = {}
        self.pod_proxy_targets: dict[tuple[str, str, int], tuple[str, int]] = {}
        self.api_audiences = api_audiences
        self.requests: list[RecordedRequest] = []
        self.gc_delay = gc_delay
        self.bookmark_interval = bookmark_interval
        self.store = ObjectStore(history_limit=history_limit)
        self.store.listeners.append(self._fan_out)
        self._watches: list[_OpenWatch] = []
        self._failures: list[_Failure] = []
        self._activity = trio.Event()
        self._nursery: trio.Nursery | None = None
        for name in initial_namespaces:
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # ---- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def serve(
        cls,
        host: str = "127.0.0.1",
        *,
        task_status: trio.TaskStatus[FakeKubeApiServer] = trio.TASK_STATUS_IGNORED,
        **options: Any,
    ) -> None:
        """``server = await nursery.start(FakeKubeApiServer.serve, host)``."""
        await cls(host, **options).run(task_status=task_status)

    async def run(
        self, *, task_status: trio.TaskStatus[FakeKubeApiServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host`` (an OS-chosen port) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started(self)
                await trio.serve_listeners(self._serve_connection, listeners,
                                           handler_nursery=nursery)
            finally:
                self._nursery = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(
        self, path: str | Path, token: str = "admin-token", context: str = "stand-in"
    ) -> Path:
        """A kubeconfig for this server whose user presents ``token`` (which becomes an
        accepted token). JSON, which kubeconfig loaders read as YAML."""
        self.tokens.add(token)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": context, "user": context, "namespace": "default"},
                }
            ],
            "current-context": context,
        }
        target = Path(path)
        target.write_text(json.dumps(config, indent=2))
        return target

    # ---- test hooks --------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self.store.resource_version)

    def apply(self, obj: Mapping[str, Any]) -> Json:
        """Create or replace ``obj`` (found by apiVersion/kind) as a test fixture would: the
        status is taken as given and the namespace need not exist. Emits watch events."""
        body = dict(obj)
        resource = resource_for_object(body)
        stored = self.store.apply(body, resource)
        self._after_write()
        return json.loads(_json_bytes(stored))

    def delete(self, resource: str, name: str, namespace: str | None = None) -> Json:
        """Delete as a client would (GC and namespace termination included); raises
        ``ApiError`` (404) when absent."""
        deleted = self.store.delete(resource_named(resource), namespace, name)
        self._after_write()
        return json.loads(_json_bytes(deleted))

    def get(self, resource: str, name: str, namespace: str | None = None) -> Json | None:
        """A copy of the stored object, or None."""
        found = self.store.find(resource_named(resource), namespace, name)
        return None if found is None else json.loads(_json_bytes(found))

    def objects(self, resource: str, namespace: str | None = None) -> list[Json]:
        """Copies of the stored objects of one resource, in (namespace, name) order."""
        return json.loads(_json_bytes(self.store.select(resource_named(resource), namespace)))

    def compact(self) -> None:
        """Drop the watch history and list snapshots: a watch from any older
        resourceVersion gets 410, and so does an outstanding continue token. Open watches
        keep running, as they do across an etcd compaction."""
        self.store.compact()

    def send_bookmarks(self) -> None:
        """Every open watch that allowed bookmarks gets one at the current resourceVersion
        (after any events still queued for it)."""
        for watch in self._watches:
            watch.bookmark_requested = True
            watch.wakeup.set()

    async def drop_watches(self, *, graceful: bool = False) -> int:
        """End every open watch stream and wait until they are gone; returns how many.
        Abrupt (default): the TCP connection closes mid-stream without the terminating
        chunk. Graceful: queued events are flushed, then the response ends cleanly."""
        watches = list(self._watches)
        for watch in watches:
            watch.end = "graceful" if graceful else "abrupt"
            if graceful:
                watch.wakeup.set()
            else:
                watch.scope.cancel()
        for watch in watches:
            await watch.closed.wait()
        return len(watches)

    def fail_next(self, count: int, status: int = 500, *, path_contains: str | None = None
                  ) -> None:
        """The next ``count`` requests (whose path contains ``path_contains``, if given)
        are answered with ``status`` and a Status body (429 adds ``Retry-After: 1``)."""
        if count < 1 or not 400 <= status <= 599:
            raise ValueError(f"fail_next needs count >= 1 and an error status, got {count}, "
                             f"{status}")
        self._failures.append(_Failure(count, status, path_contains))

    @property
    def watches(self) -> list[WatchInfo]:
        return [watch.plan.info for watch in self._watches]

    def watch_count(self, resource: str | None = None) -> int:
        plural = resource_named(resource).plural if resource else None
        return sum(1 for w in self._watches if plural is None or w.plan.resource.plural == plural)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked after every request, write and watch
        start or end, and every 10 ms (for predicates on state a client thread changes).
        Wrap in ``trio.fail_after``."""
        while not predicate():
            with trio.move_on_after(0.01):
                await self._activity.wait()

    async def wait_for_watches(self, resource: str, count: int = 1) -> None:
        """Until at least ``count`` watches of ``resource`` are open (their initial events
        and replay have been computed, so later writes reach them)."""
        await self.wait_until(lambda: self.watch_count(resource) >= count)

    # ---- internals: state ---------------------------------------------------------------

    def _poke(self) -> None:
        self._activity.set()
        self._activity = trio.Event()

    def _fan_out(self, plural: str, change: Change) -> None:
        for watch in self._watches:
            if watch.plan.resource.plural == plural:
                watch.queue.append(change)
                watch.wakeup.set()

    def _after_write(self) -> None:
        work = self.store.take_pending()
        if work:
            if self._nursery is not None:
                self._nursery.start_soon(self._background_cleanup, work)
            else:
                for namespace in work.terminating_namespaces:
                    self.store.finish_namespace(namespace)
                self.store.collect_dependents(work.deleted_uids)
                self._after_write()
        self._poke()

    async def _background_cleanup(self, work: Any) -> None:
        """What the namespace controller and the garbage collector do, a moment later."""
        await trio.sleep(self.gc_delay)
        for namespace in work.terminating_namespaces:
            self.store.finish_namespace(namespace)
        self.store.collect_dependents(work.deleted_uids)
        self._after_write()

    # ---- internals: HTTP ---------------------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                await self._handle(conn, stream, request)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _CloseConnection):
            pass
        except h11.ProtocolError as error:
            log.info("kube stand-in: bad HTTP from a client", error=str(error))
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(Exception):
                    reply = _json_reply(400, ApiError(400, "BadRequest", str(error)).status())
                    await self._send_reply(conn, stream, reply)
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> _Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body.extend(event.data)
                if len(body) > MAX_BODY_BYTES:
                    error = ApiError(413, "RequestEntityTooLarge", "the request body is too large")
                    await self._send_reply(conn, stream, _json_reply(413, error.status()))
                    raise _CloseConnection()
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = {
                    name.decode("latin-1").lower(): value.decode("latin-1")
                    for name, value in head.headers
                }
                return _Request(
                    head.method.decode("ascii"), head.target.decode("latin-1"), headers,
                    bytes(body),
                )

    async def _send_reply(self, conn: h11.Connection, stream: trio.SocketStream,
                          reply: _Reply) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("cache-control", "no-cache, private"),
            *reply.headers,
        ]
        await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=reply.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _handle(self, conn: h11.Connection, stream: trio.SocketStream,
                      request: _Request) -> None:
        split = urlsplit(request.target)
        path = unquote(split.path)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.requests.append(RecordedRequest(request.method, path, query))
        self._poke()
        try:
            outcome = await self._dispatch(request, path, split.query, query)
        except ApiError as error:
            outcome = _json_reply(error.code, error.status())
        except (SelectorError, UnknownResource) as error:
            outcome = _json_reply(400, bad_request(str(error)).status())
        except Exception as error:  # a bug here must cost one request, not the server
            log.exception("kube stand-in: request failed", method=request.method, path=path)
            outcome = _json_reply(
                500, ApiError(500, "InternalError", f"stand-in error: {error!r}").status()
            )
        if isinstance(outcome, _WatchPlan):
            await self._stream_watch(conn, stream, outcome)
        else:
            await self._send_reply(conn, stream, outcome)

    def _check_failures(self, path: str) -> _Reply | None:
        for failure in self._failures:
            if failure.path_contains is None or failure.path_contains in path:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                reason = _REASONS.get(failure.status, "InternalError")
                error = ApiError(failure.status, reason, f"injected failure ({failure.status})")
                headers = [("retry-after", "1")] if failure.status == 429 else []
                return _Reply(failure.status, _json_bytes(error.status()), headers=headers)
        return None

    def _check_token(self, headers: Mapping[str, str]) -> None:
        if not self.require_token:
            return
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or (
            token not in self.tokens and token not in self.token_reviews
        ):
            raise ApiError(401, "Unauthorized", "Unauthorized")

    async def _dispatch(
        self, request: _Request, path: str, raw_query: str, query: dict[str, str]
    ) -> _Reply | _WatchPlan:
        self._check_token(request.headers)
        failure = self._check_failures(path)
        if failure is not None:
            return failure
        method = request.method
        parts = [p for p in path.split("/") if p]
        if path in ("/healthz", "/readyz", "/livez"):
            return _Reply(200, b"ok", "text/plain")
        if path == "/version":
            return _json_reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0",
                                     "platform": "linux/amd64"})
        if parts == ["api"]:
            return _json_reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                     "serverAddressByClientCIDRs": [
                                         {"clientCIDR": "0.0.0.0/0",
                                          "serverAddress": f"{self.host}:{self.port}"}]})
        if parts == ["apis"]:
            return _json_reply(200, self._group_list())
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise self._no_such_path()
        served = resources_in(group, version)
        if not served:
            raise self._no_such_path()
        if not rest:
            return _json_reply(200, self._resource_list(group, version, served))
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] in served and (
            served[rest[2]].namespaced
        ):
            namespace, rest = rest[1], rest[2:]
        resource = served.get(rest[0])
        if resource is None or len(rest) > 3 and not (
            resource.plural == "pods" and rest[2] == "proxy"
        ):
            raise self._no_such_path()
        name = rest[1] if len(rest) >= 2 else None
        subresource = rest[2] if len(rest) >= 3 else None
        if subresource == "proxy" and name is not None and namespace is not None:
            return await self._proxy(request, namespace, name, "/" + "/".join(rest[3:]),
                                     raw_query)
        if subresource not in (None, "status") or (
            subresource == "status" and not resource.has_status
        ):
            raise self._no_such_path()
        if resource.plural == "tokenreviews":
            if method != "POST" or name is not None:
                raise self._not_allowed(method, path)
            return self._token_review(request.body)
        return self._resource_request(request, resource, namespace, name, subresource, query)

    @staticmethod
    def _no_such_path() -> ApiError:
        return ApiError(404, "NotFound", "the server could not find the requested resource",
                        {})

    @staticmethod
    def _not_allowed(method: str, path: str) -> ApiError:
        return ApiError(405, "MethodNotAllowed",
                        f"the server does not allow this method on the requested resource "
                        f"({method} {path})")

    def _group_list(self) -> Json:
        groups: dict[str, list[str]] = {}
        for group, version in served_group_versions():
            if group:
                groups.setdefault(group, []).append(version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": group,
                    "versions": [{"groupVersion": f"{group}/{v}", "version": v}
                                 for v in versions],
                    "preferredVersion": {"groupVersion": f"{group}/{versions[0]}",
                                         "version": versions[0]},
                }
                for group, versions in groups.items()
            ],
        }

    @staticmethod
    def _resource_list(group: str, version: str, served: Mapping[str, ResourceType]) -> Json:
        resources: list[Json] = []
        for resource in served.values():
            resources.append({"name": resource.plural, "singularName": resource.kind.lower(),
                              "namespaced": resource.namespaced, "kind": resource.kind,
                              "verbs": list(resource.verbs)})
            if resource.has_status:
                resources.append({"name": f"{resource.plural}/status", "singularName": "",
                                  "namespaced": resource.namespaced, "kind": resource.kind,
                                  "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

    def _decode_body(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError as error:
            raise bad_request(f"the request body is not valid JSON: {error}") from None

    def _resource_request(
        self,
        request: _Request,
        resource: ResourceType,
        namespace: str | None,
        name: str | None,
        subresource: str | None,
        query: dict[str, str],
    ) -> _Reply | _WatchPlan:
        method = request.method
        if namespace is not None and not resource.namespaced:
            raise self._no_such_path()
        if name is None:
            if method == "GET":
                if _parse_bool(query, "watch"):
                    return self._watch_plan(resource, namespace, query)
                return self._list(resource, namespace, query)
            if method == "POST":
                if resource.namespaced and namespace is None:
                    raise self._not_allowed(method, resource.collection_path())
                created = self.store.create(resource, namespace, self._decode_body(request.body))
                self._after_write()
                return _json_reply(201, created)
            if method == "DELETE":
                return self._delete_collection(resource, namespace, query)
            raise self._not_allowed(method, resource.collection_path(namespace))
        if resource.namespaced and namespace is None:
            raise self._no_such_path()
        if method == "GET":
            return _json_reply(200, self.store.get(resource, namespace, name))
        if method == "PUT":
            updated = self.store.update(resource, namespace, name,
                                        self._decode_body(request.body), subresource=subresource)
            self._after_write()
            return _json_reply(200, updated)
        if method == "PATCH":
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            patched, patch_created = self.store.patch(
                resource, namespace, name, content_type, request.body,
                subresource=subresource, field_manager=query.get("fieldManager"),
            )
            self._after_write()
            return _json_reply(201 if patch_created else 200, patched)
        if method == "DELETE" and subresource is None:
            options = self._decode_body(request.body) if request.body.strip() else {}
            if not isinstance(options, dict):
                raise bad_request("DeleteOptions must be a JSON object")
            preconditions = options.get("preconditions") or {}
            policy = options.get("propagationPolicy") or query.get("propagationPolicy")
            deleted = self.store.delete(resource, namespace, name, preconditions, policy)
            self._after_write()
            return _json_reply(200, deleted)
        raise self._not_allowed(method, resource.collection_path(namespace))

    def _selectors(self, resource: ResourceType, query: Mapping[str, str]
                   ) -> tuple[LabelSelector, FieldSelector]:
        return (parse_label_selector(query.get("labelSelector")),
                parse_field_selector(query.get("fieldSelector"), resource.plural))

    def _list(self, resource: ResourceType, namespace: str | None, query: dict[str, str]
              ) -> _Reply:
        labels, fields = self._selectors(resource, query)
        continue_token = query.get("continue") or None
        if continue_token and query.get("resourceVersion"):
            raise bad_request("specifying resource version is not allowed when using continue")
        _parse_resource_version(query.get("resourceVersion"))
        items, list_version, next_token, remaining = self.store.list_chunk(
            resource, namespace, labels, fields, limit=_parse_int(query, "limit"),
            continue_token=continue_token,
        )
        metadata: Json = {"resourceVersion": str(list_version)}
        if next_token:
            metadata["continue"] = next_token
            metadata["remainingItemCount"] = remaining
        return _json_reply(200, {"kind": f"{resource.kind}List",
                                 "apiVersion": resource.api_version,
                                 "metadata": metadata, "items": items})

    def _delete_collection(self, resource: ResourceType, namespace: str | None,
                           query: dict[str, str]) -> _Reply:
        if resource.namespaced and namespace is None:
            raise self._not_allowed("DELETE", resource.collection_path())
        labels, fields = self._selectors(resource, query)
        deleted = []
        for obj in self.store.select(resource, namespace, labels, fields):
            meta = obj["metadata"]
            deleted.append(self.store.delete(resource, meta.get("namespace"), meta["name"]))
        self._after_write()
        return _json_reply(200, {"kind": f"{resource.kind}List",
                                 "apiVersion": resource.api_version,
                                 "metadata": {"resourceVersion": self.resource_version},
                                 "items": deleted})

    # ---- watches -----------------------------------------------------------------------

    def _watch_plan(self, resource: ResourceType, namespace: str | None,
                    query: dict[str, str]) -> _WatchPlan:
        labels, fields = self._selectors(resource, query)
        start = query.get("resourceVersion") or None
        _parse_resource_version(start)
        bookmarks = _parse_bool(query, "allowWatchBookmarks")
        send_initial = _parse_bool(query, "sendInitialEvents")
        if send_initial and query.get("resourceVersionMatch") != "NotOlderThan":
            raise ApiError(422, "Invalid", "resourceVersionMatch: Forbidden: sendInitialEvents "
                           "requires setting resourceVersionMatch to NotOlderThan")
        if send_initial and not bookmarks:
            raise ApiError(422, "Invalid", "allowWatchBookmarks: Required value: "
                           "allowWatchBookmarks must be true if sendInitialEvents = true")
        timeout = _parse_int(query, "timeoutSeconds")
        info = WatchInfo(resource.plural, namespace, start, query.get("labelSelector", ""),
                         query.get("fieldSelector", ""), bookmarks)
        return _WatchPlan(resource, namespace, labels, fields, start, bookmarks, send_initial,
                          float(timeout) if timeout else None, info)

    def _begin_watch(self, plan: _WatchPlan) -> tuple[list[tuple[str, Json]], _OpenWatch]:
        """Synchronously (no await): the events to send first, and the registered watch
        that receives every later change."""
        first: list[tuple[str, Json]] = []
        start = _parse_resource_version(plan.start)
        if start is None or start == 0 or plan.send_initial_events:
            for obj in self.store.select(plan.resource, plan.namespace, plan.labels,
                                         plan.fields):
                first.append(("ADDED", obj))
            if plan.send_initial_events:
                first.append(("BOOKMARK", self._bookmark(plan, {INITIAL_EVENTS_END: "true"})))
        else:
            try:
                changes = self.store.changes_after(plan.resource.plural, start)
            except ApiError as error:
                first.append(("ERROR", error.status()))
                changes = []
            for change in changes:
                event = self._event_for(plan, change)
                if event is not None:
                    first.append(event)
        watch = _OpenWatch(plan)
        if not first or first[-1][0] != "ERROR":
            self._watches.append(watch)
        return first, watch

    def _bookmark(self, plan: _WatchPlan, annotations: Mapping[str, str] | None = None
                  ) -> Json:
        metadata: Json = {"resourceVersion": self.resource_version}
        if annotations:
            metadata["annotations"] = dict(annotations)
        return {"kind": plan.resource.kind, "apiVersion": plan.resource.api_version,
                "metadata": metadata}

    @staticmethod
    def _event_for(plan: _WatchPlan, change: Change) -> tuple[str, Json] | None:
        """The event one change means for one watch, with the watch cache's selector rules."""
        was, now = plan.matches(change.old), plan.matches(change.new)
        if change.type == "DELETED":
            return ("DELETED", change.new) if was else None
        if was and now:
            return ("MODIFIED", change.new)
        if now:
            return ("ADDED", change.new)
        if was:
            return ("DELETED", change.new)
        return None

    async def _stream_watch(self, conn: h11.Connection, stream: trio.SocketStream,
                            plan: _WatchPlan) -> None:
        first, watch = self._begin_watch(plan)
        self._poke()
        client_gone = False
        try:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/json"),
                ("transfer-encoding", "chunked"),
                ("cache-control", "no-cache, private"),
            ])))

            async def send_event(event_type: str, obj: Json) -> None:
                line = _json_bytes({"type": event_type, "object": obj}) + b"\n"
                await stream.send_all(conn.send(h11.Data(data=line)))

            async def notice_disconnect(scope: trio.CancelScope) -> None:
                nonlocal client_gone
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        client_gone = True
                        scope.cancel()
                        return
                    conn.receive_data(data)  # a pipelined request: h11 keeps it

            try:
                with watch.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(notice_disconnect, nursery.cancel_scope)
                        with trio.move_on_after(plan.timeout if plan.timeout else math.inf):
                            for event_type, obj in first:
                                await send_event(event_type, obj)
                            if watch in self._watches:
                                await self._pump(watch, send_event)
                        nursery.cancel_scope.cancel()
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                client_gone = True
            if watch.end == "abrupt" or client_gone:
                raise _CloseConnection()
            await stream.send_all(conn.send(h11.EndOfMessage()))
        finally:
            with contextlib.suppress(ValueError):
                self._watches.remove(watch)
            watch.closed.set()
            self._poke()

    async def _pump(self, watch: _OpenWatch,
                    send_event: Callable[[str, Json], Any]) -> None:
        plan = watch.plan
        while True:
            while watch.queue:
                event = self._event_for(plan, watch.queue.popleft())
                if event is not None:
                    await send_event(*event)
            if watch.end is not None:
                return
            if watch.bookmark_requested:
                watch.bookmark_requested = False
                if plan.bookmarks:
                    await send_event("BOOKMARK", self._bookmark(plan))
                continue
            watch.wakeup = trio.Event()
            interval = self.bookmark_interval if self.bookmark_interval else math.inf
            with trio.move_on_after(interval) as waiting:
                await watch.wakeup.wait()
            if waiting.cancelled_caught:
                watch.bookmark_requested = True

    # ---- TokenReview and the pod proxy ---------------------------------------------------

    def _token_review(self, body: bytes) -> _Reply:
        review = self._decode_body(body)
        spec = review.get("spec") if isinstance(review, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("token"), str) or not spec[
            "token"
        ]:
            raise ApiError(422, "Invalid",
                           'TokenReview.authentication.k8s.io "" is invalid: spec.token: '
                           "Required value")
        requested = [str(a) for a in spec.get("audiences") or []]
        targets = requested or list(self.api_audiences)
        answer = self.token_reviews.get(spec["token"])
        status: Json
        if answer is None:
            status = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        else:
            common = [a for a in targets if a in answer.audiences]
            if common:
                status = {"authenticated": True, "user": answer.user_info(), "audiences": common}
            else:
                status = {"user": {}, "error": "[invalid bearer token, token audiences "
                          f"{json.dumps(list(answer.audiences))} is invalid for the target "
                          f"audiences {json.dumps(targets)}]"}
        return _json_reply(201, {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        })

    async def _proxy(self, request: _Request, namespace: str, name_port: str, path: str,
                     raw_query: str) -> _Reply:
        """Forward to a registered pod port, as the API server's pod proxy does."""
        pods = resource_named("pods")
        name, _, port_text = name_port.partition(":")
        pod = self.store.find(pods, namespace, name)
        if not port_text:
            port_text = "80"
            for container in ((pod or {}).get("spec") or {}).get("containers") or []:
                ports = container.get("ports") or []
                if ports:
                    port_text = str(ports[0].get("containerPort", 80))
                    break
        try:
            port = int(port_text)
        except ValueError:
            raise bad_request(f"invalid port {port_text!r} in pod proxy path") from None
        target = self.pod_proxy_targets.get((namespace, name, port))
        if target is None:
            if pod is None:
                raise not_found(pods, name)
            raise ApiError(503, "ServiceUnavailable",
                           f"error trying to reach service: no proxy target for pod "
                           f"{namespace}/{name} port {port}")
        upstream_target = path + (f"?{raw_query}" if raw_query else "")
        try:
            with trio.fail_after(10):
                return await _forward(request, target, upstream_target)
        except (OSError, trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as err:
            raise ApiError(503, "ServiceUnavailable",
                           f"error trying to reach service: {err!r}") from None


async def _forward(request: _Request, target: tuple[str, int], upstream_target: str) -> _Reply:
    """One HTTP/1.1 exchange with the pod's port."""
    host, port = target
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        headers = [("host", f"{host}:{port}"), ("connection", "close"),
                   ("content-length", str(len(request.body)))]
        for header in ("accept", "content-type"):
            if header in request.headers:
                headers.append((header, request.headers[header]))
        await stream.send_all(client.send(h11.Request(method=request.method,
                                                      target=upstream_target, headers=headers)))
        await stream.send_all(client.send(h11.Data(data=request.body)))
        await stream.send_all(client.send(h11.EndOfMessage()))
        status = 502
        content_type = "text/plain"
        body = bytearray()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                for header_name, value in event.headers:
                    if header_name.lower() == b"content-type":
                        content_type = value.decode("latin-1")
            elif isinstance(event, h11.Data):
                body.extend(event.data)
                if len(body) > MAX_BODY_BYTES:
                    raise trio.BrokenResourceError("the pod's answer is too large")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return _Reply(status, bytes(body), content_type)

