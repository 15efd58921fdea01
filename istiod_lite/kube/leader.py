"""Leader election over a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection``.

Two istiod_lite replicas may run. Everything that only *reads* the cluster or answers proxies
(the Kubernetes source, discovery, the CA) runs on every replica; only the writers whose
writes would fight each other — the waypoint controller and the root-certificate ConfigMap
publisher — run under ``LeaderElector.run``, on the one replica holding the Lease.

The rules are client-go's: a candidate takes the Lease when nobody holds it or when the
holder's record has not changed for ``lease_duration`` seconds *as observed on the
candidate's own monotonic clock* (so clock skew between replicas does not matter); writes use
the Lease's ``resourceVersion`` so two candidates cannot both win; the leader renews every
``retry_period`` and gives up leadership when it has not renewed for ``renew_deadline``
(before anyone else may take over, since ``renew_deadline < lease_duration``). The decision is
the sans-IO ``plan_lease_update``; ``LeaderElector`` is the Trio driver.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
import trio

from istiod_lite.kube.client import JsonApi, KubeApiError

logger = structlog.get_logger()

LEASE_API = "/apis/coordination.k8s.io/v1"


# -- the sans-IO decision ------------------------------------------------------------------


def format_micro_time(moment: datetime) -> str:
    """Kubernetes ``MicroTime`` (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseObservation:
    """What a candidate last saw of the Lease and when, on its own monotonic clock."""

    spec: dict[str, Any]
    resource_version: str
    observed_at: float


def plan_lease_update(
    observed: LeaseObservation | None,
    *,
    identity: str,
    lease_duration: float,
    now_monotonic: float,
    now_wall: datetime,
) -> dict[str, Any] | None:
    """The Lease ``spec`` to write to take or keep the lease, or None when another holder's
    lease is still valid. ``observed`` None means no Lease exists yet.

    A holder's lease counts as expired ``lease_duration`` after this candidate last saw the
    record change (client-go's rule), not after its ``renewTime``: wall clocks may differ."""
    stamp = format_micro_time(now_wall)
    if observed is None:
        return _record(identity, lease_duration, acquire=stamp, renew=stamp, transitions=0)
    spec = observed.spec
    holder = str(spec.get("holderIdentity") or "")
    transitions = int(spec.get("leaseTransitions") or 0)
    if holder == identity:
        return _record(
            identity,
            lease_duration,
            acquire=str(spec.get("acquireTime") or stamp),
            renew=stamp,
            transitions=transitions,
        )
    held_for = float(spec.get("leaseDurationSeconds") or lease_duration)
    if holder and now_monotonic < observed.observed_at + held_for:
        return None
    return _record(
        identity, lease_duration, acquire=stamp, renew=stamp, transitions=transitions + 1
    )


def _record(
    identity: str, lease_duration: float, *, acquire: str, renew: str, transitions: int
) -> dict[str, Any]:
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": max(1, round(lease_duration)),
        "acquireTime": acquire,
        "renewTime": renew,
        "leaseTransitions": transitions,
    }


# -- the Trio driver -----------------------------------------------------------------------


class LeaderElector:
    """Runs a coroutine only while this replica holds the Lease ``namespace/lease_name``."""

    def __init__(
        self,
        api_client: Any,
        *,
        lease_name: str = "istiod-lite-leader",
        namespace: str = "istio-system",
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        release_on_cancel: bool = True,
        api: JsonApi | None = None,
    ) -> None:
        if not identity:
            raise ValueError("leader election needs a non-empty identity (the pod name)")
        if not 0 < retry_period < renew_deadline < lease_duration:
            raise ValueError(
                "leader election needs 0 < retry_period < renew_deadline < lease_duration, "
                f"got {retry_period}, {renew_deadline}, {lease_duration}"
            )
        self.api = api or JsonApi(api_client, request_timeout=min(retry_period * 2, renew_deadline))
        self.lease_name = lease_name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_cancel = release_on_cancel
        self.is_leader = False
        self.transitions = 0  # how often this elector became leader
        self._observed: LeaseObservation | None = None
        self._rand = random.Random()

    @property
    def _path(self) -> str:
        return f"{LEASE_API}/namespaces/{self.namespace}/leases"

    async def run(
        self,
        on_started_leading: Callable[[], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Campaign forever: acquire, run ``on_started_leading()`` while renewing, cancel it
        when leadership is lost, campaign again. ``task_status`` is reported at once (being a
        candidate does not wait for winning). Cancelling ``run`` releases the Lease if held."""
        task_status.started()
        while True:
            await self._acquire()
            self.is_leader = True
            self.transitions += 1
            logger.info("leader election: became leader", lease=self.lease_name,
                        identity=self.identity)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._lead, on_started_leading, nursery.cancel_scope)
                    await self._renew_until_lost()
                    self.is_leader = False  # before the work is cancelled: no leader now
                    nursery.cancel_scope.cancel()
            finally:
                self.is_leader = False
                if self.release_on_cancel:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.retry_period):
                        await self._release()
            logger.warning("leader election: lost leadership", lease=self.lease_name,
                           identity=self.identity)

    async def _lead(
        self, on_started_leading: Callable[[], Awaitable[object]], scope: trio.CancelScope
    ) -> None:
        try:
            await on_started_leading()
        finally:
            # The leader's work ended on its own (or failed): nothing left to lead for.
            scope.cancel()

    async def _acquire(self) -> None:
        while not await self._try_acquire_or_renew():
            await trio.sleep(self.retry_period * (1 + 0.2 * self._rand.random()))

    async def _renew_until_lost(self) -> None:
        last_renewed = trio.current_time()
        while True:
            await trio.sleep(self.retry_period)
            with trio.move_on_after(max(0.0, last_renewed + self.renew_deadline
                                        - trio.current_time())):
                while not await self._try_acquire_or_renew():
                    await trio.sleep(self.retry_period / 2)
                last_renewed = trio.current_time()
                continue
            return

    async def _try_acquire_or_renew(self) -> bool:
        """One attempt; True when this elector holds the Lease afterwards."""
        try:
            current = await self.api.request("GET", f"{self._path}/{self.lease_name}")
        except KubeApiError as exc:
            if exc.status != 404:
                logger.warning("leader election: cannot read the lease", error=str(exc))
                return False
            current = None
        now = trio.current_time()
        if current is not None:
            spec = current.get("spec") or {}
            version = str((current.get("metadata") or {}).get("resourceVersion", ""))
            if self._observed is None or self._observed.spec != spec:
                self._observed = LeaseObservation(spec, version, now)
            else:
                self._observed = LeaseObservation(spec, version, self._observed.observed_at)
        wanted = plan_lease_update(
            self._observed if current is not None else None,
            identity=self.identity,
            lease_duration=self.lease_duration,
            now_monotonic=now,
            now_wall=datetime.now(UTC),
        )
        if wanted is None:
            return False
        metadata: dict[str, Any] = {"name": self.lease_name, "namespace": self.namespace}
        try:
            if current is None:
                written = await self.api.request(
                    "POST",
                    self._path,
                    body={"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                          "metadata": metadata, "spec": wanted},
                )
            else:
                updated = dict(current)
                updated["spec"] = wanted
                written = await self.api.request(
                    "PUT", f"{self._path}/{self.lease_name}", body=updated
                )
        except KubeApiError as exc:
            if exc.status != 409:
                logger.warning("leader election: cannot write the lease", error=str(exc))
            return False
        self._observed = LeaseObservation(
            written.get("spec") or wanted,
            str((written.get("metadata") or {}).get("resourceVersion", "")),
            trio.current_time(),
        )
        return True

    async def _release(self) -> None:
        """Hand the Lease back so another replica need not wait for it to expire."""
        try:
            current = await self.api.request("GET", f"{self._path}/{self.lease_name}")
            spec = current.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            released = dict(current)
            released["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1,
                                "renewTime": format_micro_time(datetime.now(UTC))}
            await self.api.request("PUT", f"{self._path}/{self.lease_name}", body=released)
            logger.info("leader election: released the lease", lease=self.lease_name)
        except KubeApiError as exc:
            logger.warning("leader election: cannot release the lease", error=str(exc))
