"""``kubectl ambient status`` and ``kubectl ambient check``.

Each section is a sans-IO function from the API objects to rows (``*_rows``, ``check_*``), so
the rules are unit-tested on plain dicts; ``gather_status`` / ``run_checks`` only fetch.
``check`` is meant before and after an install: when ``istio-system`` does not exist yet the
mesh is "not installed" and what depends on it is a WARN (expected), not a FAIL; a check the
caller's RBAC forbids is a WARN saying so, never a crash.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ambientctl.kube.api import (
    Kube,
    KubeApiError,
    KubeError,
    api_path,
    labels_of,
    metadata,
    name_of,
)
from ambientctl.kube.network_policy import find_hbone_blockers
from ambientctl.kube.waypoints import gateway_addresses, list_waypoints, programmed
from ambientctl.kube.ztunnel_config import (
    ZTUNNEL_NAMESPACE,
    ZTUNNEL_SELECTOR,
    ZtunnelPod,
    fetch_pod_config_dump,
    pod_ready,
    ztunnel_pod,
)
from ambientctl.output import OutputFormat, render, render_json, render_yaml
from ambientctl.ztunnelconfig import ZtunnelConfigError, certificate_rows, parse_time
from istiod_lite.labels import AMBIENT, DATAPLANE_MODE_LABEL

ISTIO_NAMESPACE = ZTUNNEL_NAMESPACE
ISTIOD_SELECTOR = "app=istiod"
MIN_KUBERNETES = (1, 28)
GATEWAY_API_RESOURCES = (
    ("gateway.networking.k8s.io/v1", "gateways"),
    ("gateway.networking.k8s.io/v1", "httproutes"),
)
OUR_RESOURCES = (
    ("security.istio.io/v1", "authorizationpolicies"),
    ("security.istio.io/v1", "peerauthentications"),
    ("security.istio.io/v1", "requestauthentications"),
    ("networking.istio.io/v1", "virtualservices"),
    ("networking.istio.io/v1", "destinationrules"),
    ("policy.ambient-lite.io/v1alpha1", "localratelimits"),
)
GATEWAY_API_INSTALL = (
    "kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/"
    "v1.2.1/standard-install.yaml"
)

Row = dict[str, Any]


def human_duration(seconds: float) -> str:
    """kubectl's compact ages: ``45s``, ``12m``, ``3h20m``, ``5d``."""
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest and hours < 8 else f"{hours}h"
    return f"{hours // 24}d"


def age(timestamp: Any, now: datetime) -> str:
    created = parse_time(timestamp)
    return human_duration((now - created).total_seconds()) if created else ""


# ---------------------------------------------------------------------------------------------
# status (sans-IO)


def deployment_ready(deployment: Mapping[str, Any]) -> tuple[int, int]:
    """(ready replicas, wanted replicas)."""
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    wanted = spec.get("replicas")
    return int(status.get("readyReplicas") or 0), int(1 if wanted is None else wanted)


def control_plane_rows(
    deployments: Sequence[Mapping[str, Any]], leases: Sequence[Mapping[str, Any]], now: datetime
) -> list[Row]:
    rows: list[Row] = []
    for deployment in deployments:
        ready, wanted = deployment_ready(deployment)
        rows.append(
            {
                "component": f"deployment/{name_of(deployment)}",
                "ready": f"{ready}/{wanted}",
                "detail": "ready" if wanted and ready >= wanted else "not all replicas ready",
            }
        )
    if not deployments:
        rows.append(
            {"component": "istiod", "ready": "0/0", "detail": f"no Deployment {ISTIOD_SELECTOR}"}
        )
    for lease in leases:
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        renewed = age(spec.get("renewTime"), now)
        detail = f"leader {holder}" if holder else "no leader"
        if holder and renewed:
            detail += f" (renewed {renewed} ago)"
        rows.append({"component": f"lease/{name_of(lease)}", "ready": "", "detail": detail})
    return rows


def soonest_expiry(dump: Mapping[str, Any]) -> datetime | None:
    """The earliest ``notAfter`` among the workload (leaf) certificates of a config dump."""
    expiries = [
        parse_time(row.get("not_after")) for row in certificate_rows(dump) if row["type"] == "Leaf"
    ]
    known = [e for e in expiries if e is not None]
    return min(known) if known else None


def expiry_text(expiry: datetime | None, now: datetime) -> str:
    if expiry is None:
        return "no certificates"
    when = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    left = (expiry - now).total_seconds()
    return f"{when} (expired)" if left <= 0 else f"{when} (in {human_duration(left)})"


@dataclass(frozen=True)
class ZtunnelReport:
    pod: ZtunnelPod
    expiry: datetime | None = None
    error: str = ""


def ztunnel_rows(
    nodes: Sequence[Mapping[str, Any]], reports: Sequence[ZtunnelReport], now: datetime
) -> list[Row]:
    """One row per node (a node without a ztunnel shows ``missing``), then any ztunnel pod on
    a node the node list lacks."""
    by_node: dict[str, list[ZtunnelReport]] = {}
    for report in reports:
        by_node.setdefault(report.pod.node, []).append(report)
    rows: list[Row] = []
    names = [name_of(n) for n in nodes]
    for node in [*names, *sorted(set(by_node) - set(names))]:
        if node not in by_node:
            rows.append({"node": node, "pod": "", "ready": "missing", "age": "",
                         "restarts": "", "cert_expiry": ""})  # fmt: skip
        for report in by_node.get(node, ()):
            pod = report.pod
            rows.append(
                {
                    "node": node,
                    "pod": pod.name,
                    "ready": "true" if pod.ready else f"false ({pod.phase})",
                    "age": age(pod.created, now),
                    "restarts": pod.restarts,
                    "cert_expiry": report.error or expiry_text(report.expiry, now),
                }
            )
    return rows


def waypoint_status_rows(gateways: Sequence[Mapping[str, Any]]) -> list[Row]:
    rows = []
    for gateway in gateways:
        status, reason = programmed(gateway)
        rows.append(
            {
                "namespace": str(metadata(gateway).get("namespace", "")),
                "name": name_of(gateway),
                "programmed": status,
                "address": gateway_addresses(gateway),
                "reason": reason,
            }
        )
    return sorted(rows, key=lambda r: (r["namespace"], r["name"]))


@dataclass
class ClusterStatus:
    control_plane: list[Row] = field(default_factory=list)
    ztunnels: list[Row] = field(default_factory=list)
    waypoints: list[Row] = field(default_factory=list)
    soonest_certificate_expiry: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "controlPlane": self.control_plane,
            "ztunnels": self.ztunnels,
            "soonestCertificateExpiry": self.soonest_certificate_expiry,
            "waypoints": self.waypoints,
        }

    def render(self, fmt: OutputFormat | str) -> str:
        fmt = OutputFormat(fmt)
        if fmt is OutputFormat.JSON:
            return render_json(self.as_dict())
        if fmt is OutputFormat.YAML:
            return render_yaml(self.as_dict())
        parts = [
            "CONTROL PLANE\n" + render(self.control_plane, ("component", "ready", "detail"), fmt),
            "ZTUNNELS\n"
            + (
                render(
                    self.ztunnels,
                    ("node", "pod", "ready", "age", "cert_expiry"),
                    fmt,
                    wide_columns=("restarts",),
                )  # fmt: skip
                if self.ztunnels
                else "no nodes\n"
            ),
        ]
        if self.soonest_certificate_expiry:
            parts[-1] += f"soonest certificate expiry: {self.soonest_certificate_expiry}\n"
        parts.append(
            "WAYPOINTS\n"
            + (
                render(
                    self.waypoints,
                    ("namespace", "name", "programmed", "address"),
                    fmt,
                    wide_columns=("reason",),
                )  # fmt: skip
                if self.waypoints
                else "no waypoints\n"
            )
        )
        return "\n".join(parts)


def gather_status(
    kube: Kube, *, admin_port: int = 15000, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> ClusterStatus:
    """Fetch everything ``status`` shows; each ztunnel's dump through the pod proxy."""
    at = now()
    deployments = kube.list(
        api_path("apps/v1", "deployments", ISTIO_NAMESPACE), label_selector=ISTIOD_SELECTOR
    )
    leases = kube.list(api_path("coordination.k8s.io/v1", "leases", ISTIO_NAMESPACE))
    nodes = kube.list(api_path("v1", "nodes"))
    pods = kube.list(api_path("v1", "pods", ZTUNNEL_NAMESPACE), label_selector=ZTUNNEL_SELECTOR)
    reports = []
    for pod in sorted((ztunnel_pod(p) for p in pods), key=lambda p: (p.node, p.name)):
        if pod.phase != "Running":
            reports.append(ZtunnelReport(pod, error=f"pod is {pod.phase}"))
            continue
        try:
            expiry = soonest_expiry(fetch_pod_config_dump(kube, pod.name, admin_port))
        except (KubeError, ZtunnelConfigError) as exc:
            reports.append(ZtunnelReport(pod, error=f"unknown: {exc}"))
            continue
        reports.append(ZtunnelReport(pod, expiry))
    status = ClusterStatus(
        control_plane=control_plane_rows(deployments, leases, at),
        ztunnels=ztunnel_rows(nodes, reports, at),
        waypoints=waypoint_status_rows(list_waypoints(kube, None)),
    )
    expiries = [(r.expiry, r.pod.node) for r in reports if r.expiry is not None]
    if expiries:
        expiry, node = min(expiries)
        status.soonest_certificate_expiry = f"{expiry_text(expiry, at)} on node {node}"
    return status


# ---------------------------------------------------------------------------------------------
# check (sans-IO rules)


class Verdict(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Verdict
    reason: str

    def row(self) -> Row:
        return {"check": self.check, "status": self.status.value, "reason": self.reason}


def parse_version(info: Mapping[str, Any]) -> tuple[int, int] | None:
    """(major, minor) of a ``/version`` answer; minor may read ``30+`` on managed clusters."""
    try:
        major = int(re.sub(r"\D", "", str(info.get("major", ""))))
        minor = int(re.sub(r"\D", "", str(info.get("minor", ""))))
    except ValueError:
        match = re.match(r"v?(\d+)\.(\d+)", str(info.get("gitVersion", "")))
        return (int(match.group(1)), int(match.group(2))) if match else None
    return major, minor


def check_api_server(host: str, version: Mapping[str, Any] | None, error: str) -> CheckResult:
    name = "kubernetes-api"
    if version is None:
        return CheckResult(name, Verdict.WARN, f"reachable at {host}; version unknown ({error})")
    parsed = parse_version(version)
    text = str(version.get("gitVersion") or (f"v{parsed[0]}.{parsed[1]}" if parsed else "?"))
    if parsed is None:
        return CheckResult(name, Verdict.WARN, f"reachable at {host}; unparsable version {text}")
    if parsed < MIN_KUBERNETES:
        minimum = ".".join(map(str, MIN_KUBERNETES))
        return CheckResult(
            name, Verdict.FAIL, f"Kubernetes {text} at {host} is older than {minimum}"
        )
    return CheckResult(name, Verdict.OK, f"reachable at {host}, Kubernetes {text}")


def check_gateway_api(missing: Sequence[str]) -> CheckResult:
    name = "gateway-api-crds"
    if missing:
        return CheckResult(
            name,
            Verdict.FAIL,
            f"not served: {', '.join(missing)}; waypoints need the Gateway API CRDs; "
            f"fix: {GATEWAY_API_INSTALL}",
        )
    return CheckResult(name, Verdict.OK, "gateways and httproutes (v1) are served")


def check_our_crds(missing: Sequence[str], installed: bool) -> CheckResult:
    name = "ambient-lite-crds"
    if not missing:
        return CheckResult(name, Verdict.OK, f"all {len(OUR_RESOURCES)} policy kinds are served")
    text = ", ".join(missing)
    if not installed:
        return CheckResult(
            name, Verdict.WARN, f"not installed yet ({text}); `kubectl ambient install` adds them"
        )
    return CheckResult(name, Verdict.FAIL, f"not served: {text}; rerun `kubectl ambient install`")


def check_istio_namespace(namespace: Mapping[str, Any] | None) -> CheckResult:
    if namespace is None:
        return CheckResult(
            "istio-system",
            Verdict.WARN,
            f"namespace {ISTIO_NAMESPACE} does not exist: ambient-lite is not installed "
            "(`kubectl ambient install`)",
        )
    return CheckResult("istio-system", Verdict.OK, f"namespace {ISTIO_NAMESPACE} exists")


def check_istiod(deployments: Sequence[Mapping[str, Any]], installed: bool) -> CheckResult:
    if not deployments:
        verdict = Verdict.FAIL if installed else Verdict.WARN
        return CheckResult(
            "istiod", verdict, f"no istiod Deployment ({ISTIOD_SELECTOR}) in {ISTIO_NAMESPACE}"
        )
    problems: list[str] = []
    good: list[str] = []
    for deployment in deployments:
        ready, wanted = deployment_ready(deployment)
        text = f"{name_of(deployment)} {ready}/{wanted} ready"
        (good if ready >= 1 else problems).append(text)
    if problems:
        return CheckResult("istiod", Verdict.FAIL, "; ".join(problems + good))
    return CheckResult("istiod", Verdict.OK, "; ".join(good))


def check_ztunnels(
    nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], installed: bool
) -> CheckResult:
    """A ready ztunnel on every node; a node marked unschedulable only warns."""
    ready_nodes = {str((p.get("spec") or {}).get("nodeName") or "") for p in pods if pod_ready(p)}
    missing: list[str] = []
    cordoned: list[str] = []
    for node in nodes:
        if name_of(node) in ready_nodes:
            continue
        (cordoned if (node.get("spec") or {}).get("unschedulable") else missing).append(
            name_of(node)
        )
    total = len(nodes)
    if not installed and not pods:
        return CheckResult("ztunnel", Verdict.WARN, "not installed: no ztunnel pods")
    if not nodes:
        return CheckResult("ztunnel", Verdict.WARN, "the cluster lists no nodes")
    if missing:
        return CheckResult(
            "ztunnel",
            Verdict.FAIL,
            f"no ready ztunnel on {len(missing)}/{total} nodes: {', '.join(sorted(missing))}; "
            "pods there are outside the mesh",
        )
    if cordoned:
        return CheckResult(
            "ztunnel",
            Verdict.WARN,
            f"no ready ztunnel on unschedulable node(s) {', '.join(sorted(cordoned))}",
        )
    return CheckResult("ztunnel", Verdict.OK, f"ready on all {total} nodes")


def check_enrolled(namespaces: Sequence[str]) -> CheckResult:
    if not namespaces:
        return CheckResult(
            "enrolled-namespaces",
            Verdict.WARN,
            f"no namespace has {DATAPLANE_MODE_LABEL}={AMBIENT}; `kubectl ambient enroll NS`",
        )
    return CheckResult("enrolled-namespaces", Verdict.OK, ", ".join(sorted(namespaces)))


def meshed_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods the mesh serves: running, not host-network, not opted out with dataplane-mode=none."""
    return [
        p
        for p in pods
        if labels_of(p).get(DATAPLANE_MODE_LABEL) != "none"
        and not (p.get("spec") or {}).get("hostNetwork")
        and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]


def check_network_policies(
    per_namespace: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
) -> list[CheckResult]:
    """``per_namespace``: enrolled namespace -> (its NetworkPolicies, its pods). One FAIL per
    policy blocking HBONE, WARN per policy we could not evaluate, else one OK."""
    results: list[CheckResult] = []
    policies = isolated = 0
    for namespace, (netpols, pods) in sorted(per_namespace.items()):
        policies += len(netpols)
        findings = find_hbone_blockers(namespace, netpols, meshed_pods(pods))
        isolated += findings.isolated_pods
        results.extend(
            CheckResult("network-policy", Verdict.FAIL, b.describe()) for b in findings.blocking
        )
        results.extend(CheckResult("network-policy", Verdict.WARN, e) for e in findings.errors)
    if not results:
        reason = (
            f"{policies} NetworkPolicies in enrolled namespaces; none blocks TCP 15008"
            f" ({isolated} pods isolated for ingress)"
        )
        results.append(CheckResult("network-policy", Verdict.OK, reason))
    return results


# ---------------------------------------------------------------------------------------------
# check (fetching)


def run_checks(kube: Kube) -> list[CheckResult]:
    """Every check in order; stops after the first if the API server cannot be reached."""
    try:
        version: dict[str, Any] | None = kube.get("/version")
        version_error = ""
    except KubeApiError as exc:  # reachable, but /version is refused or missing
        version, version_error = None, f"{exc.status} {exc.reason}"
    except KubeError as exc:
        return [CheckResult("kubernetes-api", Verdict.FAIL, str(exc))]
    results = [check_api_server(kube.host, version, version_error)]

    def guarded(name: str, check: Callable[[], list[CheckResult]]) -> None:
        try:
            results.extend(check())
        except KubeError as exc:
            results.append(CheckResult(name, Verdict.WARN, f"cannot check: {exc}"))

    def missing(resources: Sequence[tuple[str, str]]) -> list[str]:
        return [f"{plural}.{gv.split('/')[0]}" for gv, plural in resources
                if not kube.served(gv, plural)]  # fmt: skip

    guarded("gateway-api-crds", lambda: [check_gateway_api(missing(GATEWAY_API_RESOURCES))])
    istio_ns = kube.get_optional(api_path("v1", "namespaces", name=ISTIO_NAMESPACE))
    installed = istio_ns is not None
    guarded("ambient-lite-crds", lambda: [check_our_crds(missing(OUR_RESOURCES), installed)])
    results.append(check_istio_namespace(istio_ns))
    guarded(
        "istiod",
        lambda: [
            check_istiod(
                kube.list(
                    api_path("apps/v1", "deployments", ISTIO_NAMESPACE),
                    label_selector=ISTIOD_SELECTOR,
                ),
                installed,
            )
        ],
    )
    guarded(
        "ztunnel",
        lambda: [
            check_ztunnels(
                kube.list(api_path("v1", "nodes")),
                kube.list(
                    api_path("v1", "pods", ZTUNNEL_NAMESPACE), label_selector=ZTUNNEL_SELECTOR
                ),
                installed,
            )
        ],
    )
    enrolled: list[str] = []

    def enrolled_check() -> list[CheckResult]:
        selector = f"{DATAPLANE_MODE_LABEL}={AMBIENT}"
        enrolled.extend(name_of(ns) for ns in kube.list(api_path("v1", "namespaces"),
                                                         label_selector=selector))  # fmt: skip
        return [check_enrolled(enrolled)]

    guarded("enrolled-namespaces", enrolled_check)

    def netpol_check() -> list[CheckResult]:
        per_namespace = {
            ns: (
                kube.list(api_path("networking.k8s.io/v1", "networkpolicies", ns)),
                kube.list(api_path("v1", "pods", ns)),
            )
            for ns in enrolled
        }
        return check_network_policies(per_namespace)

    guarded("network-policy", netpol_check)
    return results


def check_exit_code(results: Sequence[CheckResult]) -> int:
    return 1 if any(r.status is Verdict.FAIL for r in results) else 0
