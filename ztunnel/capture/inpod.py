"""In-pod capture: ztunnel serves each local enrolled pod from inside the pod's own network
namespace, as Istio's ztunnel does in its in-pod mode.

The CNI stand-in (the lab, or a node agent) tells us which network namespace each local pod
lives in through a small JSON file ``{"<pod uid>": "<netns path>"}`` (Istio's istio-cni does
the same over a Unix socket); we poll it. For every pod that is both in that file and a local
HBONE workload in the pushed config we bind 15008 (HBONE) and 15006 (plaintext inbound) on
the pod IP and 15001 (captured outbound) on the namespace's wildcard address -- iptables'
REDIRECT of locally generated packets rewrites the destination to 127.0.0.1 -- all inside the
pod's namespace, and then install the pod's redirection rules (``rules.apply``). A pod that
leaves the file, leaves the node or is un-enrolled (tunnel protocol NONE) gets its rules
removed first (its traffic stops being redirected), then its listeners closed; connections
already flowing finish on their own. Rules a previous ztunnel left for a pod that is no longer
enrolled are swept once the config is synced, so un-enrolling leaves no rule behind.

Shutdown keeps the rules. Like Istio, we prefer failing closed to leaking: while no ztunnel
runs, a captured pod's new connections are redirected to ports nobody listens on and are
refused, instead of leaving the pod in plaintext; the next ztunnel binds the listeners again
and re-applies the same rules (``rules.apply`` is idempotent). Removing the mesh from a pod
is the un-enrolment path above (or the lab's ``down``), never a ztunnel exit.

``parse_netns_map``, ``wanted_pods`` and ``reconcile`` are the sans-IO decisions;
``InPodManager`` is the Trio driver.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from ambient_api.model import Workload
from ambient_dataplane.state import canonical_ip, is_hbone
from ztunnel.capture import netns, rules
from ztunnel.inbound import Inbound
from ztunnel.inputs import ProxyInputs
from ztunnel.outbound import Outbound

log = structlog.get_logger()

# After a failed attempt (namespace not ready, address not configured yet...) a pod is tried
# again this much later, not on every poll.
RETRY_DELAY = 2.0


class NetnsMapError(ValueError):
    """The netns map file is not a JSON object of pod uid -> absolute netns path."""


def parse_netns_map(text: str) -> dict[str, Path]:
    """``{"<pod uid>": "<netns path>"}`` -> uid -> Path; NetnsMapError naming the bad entry.

    An empty file is an empty map (the CNI stand-in has not enrolled anything yet).
    """
    if not text.strip():
        return {}
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NetnsMapError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise NetnsMapError(f"expected a JSON object of pod uid -> netns path, "
                            f"got {type(data).__name__}")
    result: dict[str, Path] = {}
    for uid, path in data.items():
        if not uid:
            raise NetnsMapError("a pod uid is empty")
        if not isinstance(path, str) or not path:
            raise NetnsMapError(f"pod {uid!r}: netns path must be a non-empty string, "
                                f"got {path!r}")
        if not path.startswith("/"):
            raise NetnsMapError(f"pod {uid!r}: netns path {path!r} is not absolute")
        result[uid] = Path(path)
    return result


@dataclass(frozen=True, order=True)
class PodTarget:
    """A pod this ztunnel captures: which workload, its address, its namespace."""

    uid: str
    ip: str
    netns: Path
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()


def wanted_pods(
    workloads: Iterable[Workload], *, node: str, netns_map: Mapping[str, Path]
) -> dict[str, PodTarget]:
    """The pods to capture: local HBONE workloads with a known network namespace, by uid.

    A workload with no usable IP cannot have listeners and is skipped (and logged).
    """
    wanted: dict[str, PodTarget] = {}
    for workload in workloads:
        path = netns_map.get(workload.uid)
        if path is None or workload.node != node or not is_hbone(workload):
            continue
        ip = next((a for a in (canonical_ip(x) for x in workload.addresses) if a), None)
        if ip is None:
            log.warning("in-pod: enrolled pod has no IP address, not captured",
                        pod=workload.uid)
            continue
        wanted[workload.uid] = PodTarget(
            workload.uid, ip, path,
            exclude_inbound_ports=workload.capture_exclude_inbound_ports,
            exclude_outbound_ports=workload.capture_exclude_outbound_ports,
        )
    return wanted


@dataclass(frozen=True)
class ReconcilePlan:
    """What to change, in order: ``remove`` (serving, no longer wanted as is: rules off, then
    listeners), ``add`` (listeners, then rules), ``sweep`` (pods in the map that we do not
    serve and have not checked: remove rules a previous ztunnel may have left)."""

    remove: tuple[PodTarget, ...] = ()
    add: tuple[PodTarget, ...] = ()
    sweep: tuple[tuple[str, Path], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.remove or self.add or self.sweep)


def reconcile(
    serving: Mapping[str, PodTarget],
    wanted: Mapping[str, PodTarget],
    netns_map: Mapping[str, Path],
    *,
    known_clean: Set[tuple[str, Path]] = frozenset(),
    retry_later: Set[PodTarget] = frozenset(),
) -> ReconcilePlan:
    """Bring ``serving`` to ``wanted``. A pod whose IP or namespace changed (recreated) is
    removed and added again; ``retry_later`` pods are not added this time."""
    remove = sorted(t for uid, t in serving.items() if wanted.get(uid) != t)
    add = sorted(
        t for uid, t in wanted.items() if serving.get(uid) != t and t not in retry_later
    )
    removing = {t.uid for t in remove}
    sweep = sorted(
        (uid, path) for uid, path in netns_map.items()
        if uid not in wanted and uid not in serving and uid not in removing
        and (uid, path) not in known_clean
    )
    return ReconcilePlan(tuple(remove), tuple(add), tuple(sweep))


@dataclass
class _ServedPod:
    target: PodTarget
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)


class InPodManager:
    """Follows the netns map and the config; captures exactly the pods ``wanted_pods``
    names. One task does every change, so rules and listeners never race."""

    def __init__(
        self,
        inputs: ProxyInputs,
        inbound: Inbound,
        outbound: Outbound,
        *,
        config_synced: trio.Event,
    ) -> None:
        config = inputs.config
        assert config.netns_map is not None, "ZtunnelConfig requires it with capture inpod"
        self._node = config.node
        self._map_path = config.netns_map
        self._state = inputs.state
        self._inbound = inbound
        self._outbound = outbound
        self._config_synced = config_synced
        self._ports = config.ports
        self._poll_interval = config.netns_map_poll_interval
        self._wake = trio.Event()
        self._netns_map: dict[str, Path] = {}
        self._map_stamp: tuple[int, int, int] | None = None
        self._serving: dict[str, _ServedPod] = {}
        self._known_clean: set[tuple[str, Path]] = set()
        self._retry_at: dict[PodTarget, float] = {}
        self._pods_nursery: trio.Nursery | None = None
        self._handler_nursery: trio.Nursery | None = None
        self.reconciled = trio.Event()  # set after each pass; tests and status wait on it

    # -- inputs ---------------------------------------------------------------------------

    def config_changed(self) -> None:
        """Reconcile now rather than at the next poll (called after each applied update)."""
        self._wake.set()

    def _read_map(self) -> None:
        """Reload the map when the file changed; keep the last good one when it is broken
        or missing (a CNI stand-in rewriting it must not un-capture every pod)."""
        try:
            stat = self._map_path.stat()
        except FileNotFoundError:
            if self._map_stamp is not None:
                log.warning("in-pod: netns map disappeared; keeping the last one",
                            path=str(self._map_path))
            self._map_stamp = None
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._map_stamp:
            return
        self._map_stamp = stamp
        try:
            self._netns_map = parse_netns_map(self._map_path.read_text())
        except (OSError, UnicodeDecodeError, NetnsMapError) as exc:
            log.error("in-pod: cannot read the netns map; keeping the last good one",
                      path=str(self._map_path), reason=str(exc))

    # -- the loop -------------------------------------------------------------------------

    async def run(
        self,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled; the pods' connections run in ``handler_nursery`` (they outlive
        the listeners). Nothing is touched before the first config is synced: an empty
        state would look like "no pod is enrolled" and sweep every pod's rules."""
        self._handler_nursery = handler_nursery
        async with trio.open_nursery() as pods:
            self._pods_nursery = pods
            task_status.started()
            await self._config_synced.wait()
            log.info("in-pod capture running", node=self._node, netns_map=str(self._map_path))
            while True:
                self._wake = trio.Event()
                await self.reconcile_once()
                with trio.move_on_after(self._poll_interval):
                    await self._wake.wait()

    async def reconcile_once(self) -> None:
        self._read_map()
        wanted = wanted_pods(self._state.workloads(), node=self._node,
                             netns_map=self._netns_map)
        now = trio.current_time()
        self._retry_at = {t: at for t, at in self._retry_at.items() if at > now}
        plan = reconcile(
            {uid: served.target for uid, served in self._serving.items()}, wanted,
            self._netns_map, known_clean=self._known_clean, retry_later=set(self._retry_at),
        )
        for target in plan.remove:
            if await self._remove(self._serving.pop(target.uid)):
                self._known_clean.add((target.uid, target.netns))
        for uid, path in plan.sweep:
            if await self._sweep(uid, path):
                self._known_clean.add((uid, path))
        for target in plan.add:
            self._known_clean.discard((target.uid, target.netns))
            await self._add(target)
        # Forget pods that left the map, so a uid that comes back is checked again.
        self._known_clean = {
            (uid, path) for uid, path in self._known_clean if self._netns_map.get(uid) == path
        }
        previous, self.reconciled = self.reconciled, trio.Event()
        previous.set()

    async def wait_reconciled(self) -> None:
        """Until the next complete pass (config and map changes made before this call are
        then applied, or being retried)."""
        self.config_changed()
        await self.reconciled.wait()

    # -- one pod --------------------------------------------------------------------------

    async def _add(self, target: PodTarget) -> None:
        assert self._pods_nursery is not None
        try:
            listeners = await self._bind(target)
        except (OSError, netns.NetnsError, ValueError) as exc:
            self._failed(target, "cannot listen in the pod's namespace", exc)
            return
        served = _ServedPod(target)
        self._pods_nursery.start_soon(self._serve_pod, served, *listeners)
        try:
            await rules.apply(target.netns, self._capture_for(target))
        except (rules.RulesError, OSError, ValueError) as exc:
            served.scope.cancel()
            await served.stopped.wait()
            self._failed(target, "cannot install the capture rules", exc)
            return
        self._serving[target.uid] = served
        log.info("in-pod: pod captured", pod=target.uid, pod_ip=target.ip,
                 netns=str(target.netns))

    def _capture_for(self, target: PodTarget) -> rules.PodCapture:
        return rules.PodCapture(
            pod_ip=target.ip,
            outbound_port=self._ports.outbound_capture,
            inbound_plaintext_port=self._ports.inbound_plaintext,
            hbone_port=self._ports.hbone,
            exclude_inbound_ports=target.exclude_inbound_ports,
            exclude_outbound_ports=target.exclude_outbound_ports,
        )

    async def _bind(
        self, target: PodTarget
    ) -> tuple[list[trio.SocketListener], list[trio.SocketListener], list[trio.SocketListener]]:
        """15008 and 15006 on the pod IP, 15001 on the wildcard address (where REDIRECT sends
        the pod's own outbound packets), all inside the pod's namespace."""
        opened: list[trio.SocketListener] = []
        wildcard = "::" if ":" in target.ip else "0.0.0.0"
        try:
            hbone = await netns.open_tcp_listeners_in(target.netns, self._ports.hbone,
                                                      host=target.ip)
            opened += hbone
            plaintext = await netns.open_tcp_listeners_in(
                target.netns, self._ports.inbound_plaintext, host=target.ip)
            opened += plaintext
            outbound = await netns.open_tcp_listeners_in(
                target.netns, self._ports.outbound_capture, host=wildcard)
        except BaseException:
            for listener in opened:
                await trio.aclose_forcefully(listener)
            raise
        return hbone, plaintext, outbound

    async def _serve_pod(
        self,
        served: _ServedPod,
        hbone: list[trio.SocketListener],
        plaintext: list[trio.SocketListener],
        outbound: list[trio.SocketListener],
    ) -> None:
        target, handlers = served.target, self._handler_nursery
        assert handlers is not None, "pods are served only while run() runs"
        try:
            with served.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(self._inbound.serve_listeners,
                                               pod_netns=target.netns),
                                       target.ip, hbone, plaintext, handlers)
                    nursery.start_soon(self._outbound.serve_captured, outbound, target.uid,
                                       target.netns, handlers)
        finally:
            for listener in (*hbone, *plaintext, *outbound):
                await trio.aclose_forcefully(listener)
            served.stopped.set()

    async def _remove(self, served: _ServedPod) -> bool:
        """Rules off first (the pod's traffic is no longer redirected), then listeners; True
        when no rule is left (else a later sweep tries again)."""
        target = served.target
        try:
            clean = await self._remove_rules(target.uid, target.netns)
        finally:
            served.scope.cancel()
            await served.stopped.wait()
        log.info("in-pod: pod released", pod=target.uid, pod_ip=target.ip)
        return clean

    async def _sweep(self, uid: str, path: Path) -> bool:
        """Remove rules left in a pod we do not capture; True when it is known clean."""
        if not os.path.exists(path):
            return True
        try:
            if not await rules.installed(path):
                return True
        except (rules.RulesError, OSError) as exc:
            log.warning("in-pod: cannot check a pod's rules", pod=uid, netns=str(path),
                        reason=str(exc))
            return False
        return await self._remove_rules(uid, path)

    async def _remove_rules(self, uid: str, path: Path) -> bool:
        if not os.path.exists(path):
            return True  # the namespace is gone, and its rules with it
        try:
            await rules.remove(path)
        except (rules.RulesError, OSError) as exc:
            log.error("in-pod: cannot remove a pod's capture rules", pod=uid, netns=str(path),
                      reason=str(exc))
            return False
        log.info("in-pod: capture rules removed", pod=uid, netns=str(path))
        return True

    def _failed(self, target: PodTarget, what: str, exc: BaseException) -> None:
        self._retry_at[target] = trio.current_time() + RETRY_DELAY
        log.error(f"in-pod: {what}; retrying", pod=target.uid, pod_ip=target.ip,
                  netns=str(target.netns), reason=str(exc), retry_in=RETRY_DELAY)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /config_dump: the map as read and the pods captured."""
        return {
            "netns_map": str(self._map_path),
            "pods": {uid: str(path) for uid, path in sorted(self._netns_map.items())},
            "captured": [
                {"uid": s.target.uid, "ip": s.target.ip, "netns": str(s.target.netns)}
                for s in sorted(self._serving.values(), key=lambda s: s.target)
            ],
            "retrying": sorted(t.uid for t in self._retry_at),
        }


__all__ = [
    "RETRY_DELAY",
    "InPodManager",
    "NetnsMapError",
    "PodTarget",
    "ReconcilePlan",
    "parse_netns_map",
    "reconcile",
    "wanted_pods",
]
