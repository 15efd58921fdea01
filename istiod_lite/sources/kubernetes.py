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

Objects are validated with ``validation.validate_object``; an invalid one is logged (once per
reason) and not served, the rest of its kind is. A pod that is not scheduled or has no IP yet
is not an error, just not served yet. Stored objects drop ``metadata.managedFields`` and the
``kubectl.kubernetes.io/last-applied-configuration`` annotation (they often outweigh the
object), so memory stays proportional to what is watched.

EndpointSlices are served in ``ClusterObjects.endpoint_slices``; translation does not read
them yet (Workloads and Service endpoints still come from Pods and Service selectors).

The ``kubernetes`` client is synchronous: every call runs in a worker thread through
``istiod_lite.kube.run_blocking``; cancelling ``run`` aborts the open watch sockets so no
thread outlives the source by more than the time a LIST takes. This module is the Trio
driver (``Reflector`` per kind, ``KubernetesSource`` over them); what they decide without IO
(watched kinds, watch events, one kind's store, backoff) is in ``kube_watch.py``.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog
import trio
import urllib3.exceptions
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from istiod_lite.kube.client import StreamAborted, open_response_lines, run_blocking
from istiod_lite.sources.kube_watch import (
    DEFAULT_KINDS,
    Backoff,
    BackoffPolicy,
    KindStore,
    ResourceExpired,
    WatchedKind,
    WatchEvent,
    WatchFailed,
    list_function,
    parse_watch_line,
)
from istiod_lite.sources.objects import (
    ClusterObjects,
)

logger = structlog.get_logger(__name__)

# A watch that ends cleanly sooner than this without delivering anything counts as a failure
# (a proxy closing streams at once must not make us reconnect in a tight loop).
MIN_HEALTHY_WATCH_SECONDS = 1.0
# Added to the watch's server-side timeout for the client's socket read timeout: a half-open
# connection (the server gone without a FIN) then ends the watch instead of hanging forever.
WATCH_READ_SLACK_SECONDS = 30.0


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
