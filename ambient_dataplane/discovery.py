"""Follows istiod_lite's workload-discovery stream: resume, ACK/NACK, reconnect with backoff.

Like Istio's delta xDS client: every (re)connection sends the versions the proxy already
holds (``initial_resource_versions``), so istiod sends only what changed while the proxy was
away. Each update is applied to ``ProxyState``; a good one is ACKed, a bad one (``DecodeError``)
is NACKed with the reason and the last good state keeps being served. When the stream breaks
the state is left untouched and the client reconnects, backing off from 1 s doubling to 30 s;
the backoff is reset once a stream has delivered an update.

Readiness: ``run`` reports ``task_status.started()`` immediately (so the proxy can bring up its
admin and readiness ports while istiod is unreachable); ``synced`` is set once the first
update was applied and never cleared, since a proxy serving its last good config stays ready.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import httpx
import structlog
import trio

from ambient_api import codec
from ambient_api import kinds as resource_kinds
from ambient_api.discovery import (
    ACK_PATH,
    DISCOVERY_PATH,
    Ack,
    DeltaUpdate,
    DiscoveryRequest,
)
from ambient_dataplane.controlplane import (
    ControlPlaneConnection,
    describe_transport_error,
    error_text,
)
from ambient_dataplane.identity import next_backoff

log = structlog.get_logger()

DEFAULT_BACKOFF_INITIAL = 1.0
DEFAULT_BACKOFF_CAP = 30.0

ChangeT = TypeVar("ChangeT")
ChangeT_co = TypeVar("ChangeT_co", covariant=True)


class DiscoveryState(Protocol[ChangeT_co]):
    """What the client needs from ``ambient_dataplane.state.ProxyState``."""

    def apply(self, update: DeltaUpdate) -> ChangeT_co:
        """Apply atomically or raise ``codec.DecodeError`` leaving the state untouched."""
        ...

    def known_versions(self) -> dict[str, str]:
        ...


class StreamError(Exception):
    """The discovery stream could not be opened or broke; the client reconnects."""


@dataclass(frozen=True)
class ParsedLine:
    """One NDJSON line of the stream: an update, or why it is not one (and its nonce, if
    the line carried one, so it can still be NACKed)."""

    update: DeltaUpdate | None
    error: str | None = None
    nonce: str | None = None


def parse_stream_line(line: str) -> ParsedLine | None:
    """Sans-IO: decode one line of the stream; blank lines (keep-alives) give None."""
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError as exc:
        return ParsedLine(None, f"update is not JSON: {exc}")
    nonce = data.get("nonce") if isinstance(data, dict) else None
    try:
        return ParsedLine(codec.from_jsonable(DeltaUpdate, data))
    except codec.DecodeError as exc:
        return ParsedLine(None, str(exc), nonce if isinstance(nonce, str) else None)


class DiscoveryClient(Generic[ChangeT]):
    """One proxy's subscription to istiod_lite. ``on_change`` runs after every applied
    update (may be sync or async), e.g. to refresh the wanted certificates. ``kinds`` are
    the resource kinds asked for, always named explicitly on the request: a ztunnel wants
    ``kinds.L4_KINDS`` (the default), a waypoint ``kinds.ALL_KINDS``."""

    def __init__(
        self,
        connection: ControlPlaneConnection,
        node: str,
        state: DiscoveryState[ChangeT],
        on_change: Callable[[ChangeT], Awaitable[None] | None] | None = None,
        *,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        kinds: Iterable[str] = resource_kinds.L4_KINDS,
    ) -> None:
        self.kinds = _checked_kinds(kinds)
        self._connection = connection
        self.node = node
        self._state = state
        self._on_change = on_change
        self._backoff_initial = backoff_initial
        self._backoff_cap = backoff_cap
        self.connected = False
        self.last_update_at: float | None = None  # trio.current_time() of the last apply
        self.last_error: str | None = None  # why the last stream ended or the last NACK
        self.updates_applied = 0
        self.updates_rejected = 0
        self.synced = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the stream until cancelled, reconnecting with backoff."""
        task_status.started()
        backoff: float | None = None
        while True:
            healthy = False
            try:
                healthy = await self._follow_stream()
                reason = "stream closed by istiod"
            except StreamError as exc:
                reason = str(exc)
            except httpx.TransportError as exc:
                reason = describe_transport_error(exc)
            finally:
                was_connected = self.connected
                self.connected = False
            self.last_error = reason
            backoff = next_backoff(None if healthy else backoff,
                                   initial=self._backoff_initial, cap=self._backoff_cap)
            log.warning(
                "discovery stream disconnected" if was_connected else "discovery connect failed",
                node=self.node,
                reason=reason,
                retry_in=backoff,
                serving_last_good_config=self.synced.is_set(),
            )
            await trio.sleep(backoff)

    async def _follow_stream(self) -> bool:
        """One stream's life; returns whether it delivered at least one update."""
        request = DiscoveryRequest(
            node=self.node,
            initial_resource_versions=dict(self._state.known_versions()),
            kinds=self.kinds,
        )
        delivered = False
        async with self._connection.stream_json(DISCOVERY_PATH, request) as response:
            if response.status_code != 200:
                body = await response.aread()
                raise StreamError(f"HTTP {response.status_code}: {error_text(body)}")
            self.connected = True
            log.info(
                "discovery stream connected",
                node=self.node,
                resuming_with=len(request.initial_resource_versions),
            )
            async for line in response.aiter_lines():
                parsed = parse_stream_line(line)
                if parsed is None:
                    continue
                delivered = True
                await self._handle(parsed)
        return delivered

    async def _handle(self, parsed: ParsedLine) -> None:
        if parsed.update is None:
            self._rejected(parsed.error or "undecodable update", parsed.nonce)
            if parsed.nonce is not None:
                await self._ack(parsed.nonce, parsed.error)
            return
        update = parsed.update
        try:
            change = self._state.apply(update)
        except codec.DecodeError as exc:
            self._rejected(str(exc), update.nonce)
            await self._ack(update.nonce, str(exc))
            return
        except Exception as exc:
            # A bug in applying must not take the proxy down: keep the last good state.
            log.exception("applying discovery update failed", node=self.node, nonce=update.nonce)
            reason = f"internal error applying update: {type(exc).__name__}: {exc}"
            self._rejected(reason, update.nonce)
            await self._ack(update.nonce, reason)
            return
        self.updates_applied += 1
        self.last_update_at = trio.current_time()
        log.info(
            "discovery update applied",
            node=self.node,
            nonce=update.nonce,
            system_version=update.system_version,
            resources=len(update.resources),
            removed=len(update.removed),
        )
        self.synced.set()
        # React before ACKing, so an ACK means the proxy acts on the update.
        if self._on_change is not None:
            try:
                result = self._on_change(change)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("discovery on_change callback failed", node=self.node)
        await self._ack(update.nonce, None)

    def _rejected(self, reason: str, nonce: str | None = None) -> None:
        self.updates_rejected += 1
        self.last_error = reason
        log.warning("discovery update rejected (NACK)", node=self.node, nonce=nonce, error=reason)

    async def _ack(self, nonce: str, error: str | None) -> None:
        """ACK/NACK on the shared connection; a failure here is logged, not fatal: the
        stream's next update (or a reconnection with resume) supersedes it."""
        try:
            response = await self._connection.post_json(
                ACK_PATH, Ack(node=self.node, nonce=nonce, error=error)
            )
        except httpx.TransportError as exc:
            log.warning(
                "discovery ack failed",
                node=self.node,
                nonce=nonce,
                error=describe_transport_error(exc),
            )
            return
        if response.status_code >= 300:
            log.warning(
                "discovery ack refused",
                node=self.node,
                nonce=nonce,
                status=response.status_code,
                error=error_text(response.content),
            )

    def status(self) -> dict[str, Any]:
        """For the config dump / readiness: how the subscription is doing."""
        return {
            "kinds": list(self.kinds),
            "connected": self.connected,
            "synced": self.synced.is_set(),
            "updatesApplied": self.updates_applied,
            "updatesRejected": self.updates_rejected,
            "lastError": self.last_error,
        }


def _checked_kinds(wanted: Iterable[str]) -> tuple[str, ...]:
    """The kinds to ask for, sorted (a stable request); ValueError naming an unknown one."""
    if isinstance(wanted, str):
        raise TypeError("kinds must be a collection of kind names, not one string")
    chosen = tuple(sorted(set(wanted)))
    unknown = [kind for kind in chosen if kind not in resource_kinds.TYPE_BY_KIND]
    if unknown:
        known = ", ".join(sorted(resource_kinds.TYPE_BY_KIND))
        raise ValueError(f"unknown resource kind(s) {', '.join(unknown)}; known: {known}")
    if not chosen:
        raise ValueError("kinds must name at least one resource kind")
    return chosen
