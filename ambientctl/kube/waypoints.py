"""``kubectl ambient waypoint apply|list|status|delete`` against a cluster.

The Gateway is istioctl's (``waypointcmd.gateway_manifest`` without ``spec.addresses``: on a
cluster the waypoint controller gives the waypoint a Deployment and a Service, and writes the
address into ``status.addresses``). ``apply`` creates it or updates our fields of the live
object (the ``istio.io/waypoint-for`` label and the spec) keeping everything else, so a second
apply with another ``--for`` is an update, not an error. ``--wait`` polls the Gateway's
``Programmed`` condition, which the controller sets once the waypoint's pods are ready.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ambientctl.kube.api import (
    Kube,
    KubeError,
    NotFound,
    api_path,
    condition,
    conditions_of,
    labels_of,
    metadata,
    name_of,
    namespace_of,
)
from ambientctl.waypointcmd import GATEWAY_API_VERSION, gateway_manifest
from istiod_lite.labels import USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_FOR_LABEL
from istiod_lite.translate.waypoints import is_waypoint

GATEWAYS = "gateways"
PROGRAMMED = "Programmed"
WAIT_POLL_INTERVAL = 0.5

Row = dict[str, Any]


def gateway_path(namespace: str | None, name: str | None = None) -> str:
    return api_path(GATEWAY_API_VERSION, GATEWAYS, namespace, name)


@dataclass(frozen=True)
class AppliedWaypoint:
    namespace: str
    name: str
    created: bool
    enrolled: bool


def updated_gateway(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """``live`` with our fields taken from ``wanted``: its waypoint-for label and spec. Other
    labels, annotations and the resourceVersion (for an optimistic replace) stay."""
    result = dict(live)
    meta = dict(metadata(live))
    meta["labels"] = {**labels_of(live), **labels_of(wanted)}
    result["metadata"] = meta
    result["spec"] = {**(live.get("spec") or {}), **(wanted.get("spec") or {})}
    result.pop("status", None)
    return result


def apply_waypoint(
    kube: Kube, name: str, namespace: str, *, waypoint_for: str, enroll: bool
) -> AppliedWaypoint:
    """Create or update the waypoint Gateway; optionally point the namespace at it.

    The namespace is checked first so a typo leaves nothing half-applied."""
    ns_path = api_path("v1", "namespaces", name=namespace)
    if kube.get_optional(ns_path) is None:
        raise KubeError(f"namespace {namespace!r} does not exist")
    wanted = gateway_manifest(name, namespace, waypoint_for)
    path = gateway_path(namespace, name)
    live = kube.get_optional(path)
    if live is None:
        kube.create(gateway_path(namespace), wanted)
    else:
        if not is_waypoint(live):
            raise KubeError(
                f"Gateway {namespace}/{name} exists with gatewayClassName "
                f"{(live.get('spec') or {}).get('gatewayClassName')!r}; it is not a waypoint"
            )
        kube.replace(path, updated_gateway(live, wanted))
    if enroll:
        # The waypoint is in this namespace: no use-waypoint-namespace (null removes it).
        labels = {USE_WAYPOINT_LABEL: name, USE_WAYPOINT_NAMESPACE_LABEL: None}
        kube.merge_patch(ns_path, {"metadata": {"labels": labels}})
    return AppliedWaypoint(namespace, name, created=live is None, enrolled=enroll)


def programmed(gateway: Mapping[str, Any]) -> tuple[str, str]:
    """(status, reason) of the Programmed condition; ``Unknown`` before the controller wrote
    any status. A condition about an older generation does not count as current."""
    cond = condition(gateway, PROGRAMMED)
    if cond is None:
        return "Unknown", "no status from the waypoint controller yet"
    generation = metadata(gateway).get("generation")
    observed = cond.get("observedGeneration")
    if generation is not None and observed is not None and int(observed) < int(generation):
        return "Unknown", f"status is for generation {observed}, the Gateway is at {generation}"
    reason = str(cond.get("reason") or "")
    message = str(cond.get("message") or "")
    return str(cond.get("status") or "Unknown"), f"{reason}: {message}" if message else reason


def wait_programmed(
    kube: Kube,
    namespace: str,
    name: str,
    *,
    timeout: float,
    progress: TextIO,
    poll_interval: float = WAIT_POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll until the Gateway is Programmed=True; a progress line each time its state changes."""
    deadline = clock() + timeout
    last: tuple[str, str] | None = None
    while True:
        gateway = kube.get_optional(gateway_path(namespace, name))
        if gateway is None:
            raise KubeError(f"waypoint {namespace}/{name} was deleted while waiting for it")
        state = programmed(gateway)
        if state[0] == "True":
            progress.write(f"waypoint {namespace}/{name} is programmed\n")
            return
        if state != last:
            progress.write(
                f"waiting for waypoint {namespace}/{name}: {PROGRAMMED}={state[0]} ({state[1]})\n"
            )
            progress.flush()
            last = state
        if clock() >= deadline:
            raise KubeError(
                f"waypoint {namespace}/{name} not programmed after {timeout:g}s: "
                f"{PROGRAMMED}={state[0]} ({state[1]})"
            )
        sleep(min(poll_interval, max(0.0, deadline - clock())))


def gateway_addresses(gateway: Mapping[str, Any]) -> list[str]:
    status = gateway.get("status") or {}
    return [
        str(a.get("value"))
        for a in status.get("addresses") or ()
        if isinstance(a, Mapping) and a.get("value")
    ]


def waypoint_rows(gateways: Sequence[Mapping[str, Any]]) -> list[Row]:
    """NAME, NAMESPACE, FOR, PROGRAMMED, ADDRESS per waypoint Gateway, sorted."""
    rows = []
    for gateway in gateways:
        if not is_waypoint(gateway):
            continue
        status, _ = programmed(gateway)
        rows.append(
            {
                "name": name_of(gateway),
                "namespace": namespace_of(gateway),
                "for": labels_of(gateway).get(WAYPOINT_FOR_LABEL, "service"),
                "programmed": status,
                "address": gateway_addresses(gateway),
            }
        )
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


def list_waypoints(kube: Kube, namespace: str | None) -> list[dict[str, Any]]:
    """Waypoint Gateways of ``namespace`` (None: every namespace)."""
    return [g for g in kube.list(gateway_path(namespace)) if is_waypoint(g)]


def condition_rows(gateway: Mapping[str, Any]) -> list[Row]:
    """One row per status condition (Accepted, Programmed...), with reason and message."""
    base = {"namespace": namespace_of(gateway), "name": name_of(gateway)}
    conditions = conditions_of(gateway)
    if not conditions:
        return [
            {
                **base,
                "condition": PROGRAMMED,
                "status": "Unknown",
                "reason": "NoStatus",
                "message": "the waypoint controller has not written a status yet",
            }
        ]
    return [
        {
            **base,
            "condition": str(c.get("type", "")),
            "status": str(c.get("status", "")),
            "reason": str(c.get("reason", "")),
            "message": str(c.get("message", "")),
            "last_transition": str(c.get("lastTransitionTime", "")),
        }
        for c in conditions
    ]


def waypoint_status(
    kube: Kube, namespace: str | None, name: str | None
) -> tuple[list[Row], list[dict[str, Any]]]:
    """Condition rows of one waypoint (``name``) or of all in ``namespace``."""
    if name is not None:
        assert namespace is not None
        gateway = kube.get_optional(gateway_path(namespace, name))
        if gateway is None or not is_waypoint(gateway):
            raise KubeError(f"no waypoint Gateway {namespace}/{name}")
        gateways = [gateway]
    else:
        gateways = sorted(
            list_waypoints(kube, namespace), key=lambda g: (namespace_of(g), name_of(g))
        )
        if not gateways:
            where = "any namespace" if namespace is None else f"namespace {namespace}"
            raise KubeError(f"no waypoint Gateway in {where}")
    return [row for g in gateways for row in condition_rows(g)], gateways


def delete_waypoint(kube: Kube, namespace: str, name: str) -> list[str]:
    """Delete the Gateway; returns who is still labelled to use it (namespaces, services)."""
    path = gateway_path(namespace, name)
    gateway = kube.get_optional(path)
    if gateway is None or not is_waypoint(gateway):
        raise KubeError(f"no waypoint Gateway {namespace}/{name}")
    try:
        kube.delete(path)
    except NotFound:
        raise KubeError(f"no waypoint Gateway {namespace}/{name}") from None
    users = []
    selector = f"{USE_WAYPOINT_LABEL}={name}"
    for ns in kube.list(api_path("v1", "namespaces"), label_selector=selector):
        if labels_of(ns).get(USE_WAYPOINT_NAMESPACE_LABEL, name_of(ns)) == namespace:
            users.append(f"namespace/{name_of(ns)}")
    for svc in kube.list(api_path("v1", "services", namespace), label_selector=selector):
        if labels_of(svc).get(USE_WAYPOINT_NAMESPACE_LABEL, namespace) == namespace:
            users.append(f"service/{namespace}/{name_of(svc)}")
    return users
