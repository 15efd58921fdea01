"""``kubectl ambient``'s sans-IO parts: the NetworkPolicy/HBONE analysis, the check and status
rules, waypoint status reading, install helpers and the embedded-or-cluster switch."""

from __future__ import annotations

import io
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import urllib3

from ambientctl import cli
from ambientctl.kube.api import (
    AlreadyExists,
    Conflict,
    Kube,
    KubeError,
    LabelChange,
    NotFound,
    api_error,
    api_path,
    connection_problem,
    context_namespace,
)
from ambientctl.kube.cli import ClusterUsageError, choose_mode, is_cluster_program
from ambientctl.kube.install import (
    InstallError,
    ResourceResolver,
    dry_run,
    parse_documents,
    pluralize,
    prepare_replacement,
    render_kustomization,
)
from ambientctl.kube.network_policy import (
    SelectorError,
    find_hbone_blockers,
    port_entry_allows,
    selector_matches,
    validate_selector,
)
from ambientctl.kube.status import (
    CheckResult,
    Verdict,
    ZtunnelReport,
    check_api_server,
    check_exit_code,
    check_istiod,
    check_network_policies,
    check_our_crds,
    check_ztunnels,
    control_plane_rows,
    expiry_text,
    human_duration,
    soonest_expiry,
    ztunnel_rows,
)
from ambientctl.kube.waypoints import (
    condition_rows,
    programmed,
    updated_gateway,
    wait_programmed,
    waypoint_rows,
)
from ambientctl.kube.ztunnel_config import ZtunnelPod, choose_pod, proxy_path
from ambientctl.waypointcmd import gateway_manifest

NOW = datetime(2025, 1, 10, 12, 0, tzinfo=UTC)


def pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec,
            "status": {"phase": "Running"}}  # fmt: skip


def netpol(name: str, selector: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "demo"},
            "spec": {"podSelector": selector or {}, **spec}}  # fmt: skip


APP = pod("httpbin-v1", {"app": "httpbin", "version": "v1"})
SLEEP = pod("sleep", {"app": "sleep"})


def blocked(
    policies: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> dict[str, tuple[str, ...]]:
    return {b.name: b.pods for b in find_hbone_blockers("demo", policies, pods).blocking}


# -- label selectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, True),
        (None, True),
        ({"matchLabels": {"app": "httpbin"}}, True),
        ({"matchLabels": {"app": "sleep"}}, False),
        ({"matchExpressions": [{"key": "version", "operator": "In", "values": ["v1", "v2"]}]},
         True),
        ({"matchExpressions": [{"key": "version", "operator": "NotIn", "values": ["v1"]}]}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, False),
        ({"matchLabels": {"app": "httpbin"},
          "matchExpressions": [{"key": "version", "operator": "In", "values": ["v2"]}]}, False),
    ],
)  # fmt: skip
def test_selector_matches(selector: dict[str, Any] | None, expected: bool) -> None:
    assert selector_matches(selector, {"app": "httpbin", "version": "v1"}) is expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"matchExpressions": [{"key": "a", "operator": "Like", "values": []}]},
         "unknown matchExpressions operator 'Like'"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "malformed matchExpressions"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": "x"}]}, "is not a list"),
        ({"matchLabels": ["a"]}, "matchLabels is not an object"),
        ("app=x", "podSelector is not an object"),
    ],
)  # fmt: skip
def test_selector_errors_name_the_problem(selector: Any, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        validate_selector(selector)


# -- the HBONE port analysis -------------------------------------------------------------------


def test_only_the_app_port_blocks_hbone() -> None:
    policy = netpol("httpbin-8000", {"matchLabels": {"app": "httpbin"}}, policyTypes=["Ingress"],
                    ingress=[{"ports": [{"protocol": "TCP", "port": 8000}]}])  # fmt: skip
    findings = find_hbone_blockers("demo", [policy], [APP, SLEEP])
    assert [(b.name, b.pods, b.default_deny) for b in findings.blocking] == [
        ("httpbin-8000", ("httpbin-v1",), False)
    ]
    assert findings.isolated_pods == 1
    text = findings.blocking[0].describe()
    assert "NetworkPolicy demo/httpbin-8000 allows no TCP 15008 ingress to pods httpbin-v1" in text
    assert "add an ingress rule allowing TCP port 15008" in text


def test_default_deny_blocks_every_selected_pod() -> None:
    policy = netpol("deny-all", policyTypes=["Ingress"])
    findings = find_hbone_blockers("demo", [policy], [APP, SLEEP])
    assert [(b.name, b.pods, b.default_deny) for b in findings.blocking] == [
        ("deny-all", ("httpbin-v1", "sleep"), True)
    ]
    assert "denies all ingress" in findings.blocking[0].describe()


def test_policies_are_additive_a_separate_hbone_allow_fixes_default_deny() -> None:
    deny = netpol("deny-all", policyTypes=["Ingress"])
    allow = netpol("allow-hbone", policyTypes=["Ingress"],
                   ingress=[{"ports": [{"port": 15008, "protocol": "TCP"}]}])  # fmt: skip
    assert blocked([deny, allow], [APP, SLEEP]) == {}


def test_allow_for_some_pods_leaves_the_others_blocked() -> None:
    deny = netpol("deny-all", policyTypes=["Ingress"])
    allow = netpol("allow-hbone-httpbin", {"matchLabels": {"app": "httpbin"}},
                   ingress=[{"ports": [{"port": 15008}]}])  # fmt: skip
    assert blocked([deny, allow], [APP, SLEEP]) == {"deny-all": ("sleep",)}


@pytest.mark.parametrize(
    ("rule", "blocks"),
    [
        ({}, False),  # no ports: every port
        ({"from": [{"podSelector": {}}]}, False),  # peers are not judged
        ({"ports": []}, False),
        ({"ports": [{"port": 15008}]}, False),  # protocol defaults to TCP
        ({"ports": [{"protocol": "TCP"}]}, False),  # no port: every TCP port
        ({"ports": [{"protocol": "UDP", "port": 15008}]}, True),
        ({"ports": [{"protocol": "SCTP"}]}, True),
        ({"ports": [{"port": 15000, "endPort": 15010}]}, False),
        ({"ports": [{"port": 15009, "endPort": 15020}]}, True),
        ({"ports": [{"port": 8000}, {"port": 9000}]}, True),
        ({"ports": [{"port": 8000}, {"port": "15008"}]}, False),
        ({"ports": [{"port": "hbone"}]}, False),  # the pod names 15008 "hbone"
        ({"ports": [{"port": "http"}]}, True),  # "http" is 8000
        ({"ports": [{"port": "missing"}]}, True),
    ],
)
def test_rule_ports(rule: dict[str, Any], blocks: bool) -> None:
    app = pod("app", {"app": "x"}, containers=[{"name": "c", "ports": [
        {"name": "http", "containerPort": 8000}, {"name": "hbone", "containerPort": 15008},
    ]}])  # fmt: skip
    policy = netpol("p", ingress=[rule])
    assert bool(blocked([policy], [app])) is blocks


def test_named_port_must_be_tcp() -> None:
    assert not port_entry_allows({"port": "dns"}, {"dns": (15008, "UDP")})
    assert port_entry_allows({"port": "h"}, {"h": (15008, "TCP")})
    assert not port_entry_allows({"port": 15008, "endPort": "x"}, {})


@pytest.mark.parametrize(
    ("spec", "considered"),
    [
        ({"policyTypes": ["Egress"]}, False),  # egress only: ingress untouched
        ({"egress": [{}]}, True),  # no policyTypes, egress rules: Ingress AND Egress
        ({}, True),  # no policyTypes: Ingress
        ({"policyTypes": ["Ingress", "Egress"]}, True),
    ],
)
def test_policy_types(spec: dict[str, Any], considered: bool) -> None:
    """Without ingress rules a policy that isolates ingress denies it all."""
    findings = find_hbone_blockers("demo", [netpol("p", **spec)], [APP])
    assert bool(findings.blocking) is considered


def test_unselected_pods_are_not_isolated() -> None:
    policy = netpol("db-only", {"matchLabels": {"app": "db"}}, policyTypes=["Ingress"])
    findings = find_hbone_blockers("demo", [policy], [APP, SLEEP])
    assert findings.blocking == [] and findings.isolated_pods == 0


def test_a_policy_we_cannot_read_is_reported_not_fatal() -> None:
    broken = netpol("broken", {"matchExpressions": [{"key": "a", "operator": "Near"}]})
    deny = netpol("deny-all", policyTypes=["Ingress"])
    findings = find_hbone_blockers("demo", [broken, deny], [APP])
    assert [b.name for b in findings.blocking] == ["deny-all"]
    assert findings.errors == ["NetworkPolicy demo/broken: unknown matchExpressions operator "
                               "'Near' for key 'a'"]  # fmt: skip


def test_many_pods_are_summarized() -> None:
    pods = [pod(f"p{i}") for i in range(8)]
    [blocker] = find_hbone_blockers("demo", [netpol("deny")], pods).blocking
    assert "to pods p0, p1, p2, p3, p4 and 3 more" in blocker.describe()


def test_check_network_policies_skips_pods_outside_the_mesh() -> None:
    opted_out = pod("legacy", {"istio.io/dataplane-mode": "none"})
    host = pod("node-agent", hostNetwork=True)
    done = pod("job")
    done["status"]["phase"] = "Succeeded"
    per_namespace = {"demo": ([netpol("deny")], [opted_out, host, done])}
    [result] = check_network_policies(per_namespace)
    assert result.status is Verdict.OK
    per_namespace = {"demo": ([netpol("deny")], [opted_out, APP])}
    [result] = check_network_policies(per_namespace)
    assert result.status is Verdict.FAIL and "httpbin-v1" in result.reason
    assert "legacy" not in result.reason


# -- check rules -------------------------------------------------------------------------------


def node(name: str, unschedulable: bool = False) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"unschedulable": unschedulable}}


def ztunnel(name: str, node_name: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "ztunnel"},
                     "creationTimestamp": "2025-01-10T11:00:00Z"},
        "spec": {"nodeName": node_name},
        "status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"restartCount": 2}]},
    }  # fmt: skip


def test_ztunnel_on_every_node() -> None:
    nodes = [node("n1"), node("n2"), node("n3", unschedulable=True)]
    ok = check_ztunnels(nodes, [ztunnel("z1", "n1"), ztunnel("z2", "n2"), ztunnel("z3", "n3")],
                        installed=True)  # fmt: skip
    assert ok.status is Verdict.OK and ok.reason == "ready on all 3 nodes"
    missing = check_ztunnels(nodes, [ztunnel("z1", "n1"), ztunnel("z2", "n2", ready=False)], True)
    assert missing.status is Verdict.FAIL
    assert missing.reason.startswith("no ready ztunnel on 1/3 nodes: n2")
    cordoned = check_ztunnels(nodes, [ztunnel("z1", "n1"), ztunnel("z2", "n2")], True)
    assert cordoned.status is Verdict.WARN and "n3" in cordoned.reason
    assert check_ztunnels(nodes, [], installed=False).status is Verdict.WARN
    assert check_ztunnels([], [], installed=True).reason == "the cluster lists no nodes"


@pytest.mark.parametrize(
    ("version", "verdict", "text"),
    [
        ({"major": "1", "minor": "31", "gitVersion": "v1.31.0"}, Verdict.OK, "Kubernetes v1.31.0"),
        ({"major": "1", "minor": "30+", "gitVersion": "v1.30.4-eks"}, Verdict.OK, "v1.30.4-eks"),
        ({"major": "1", "minor": "26", "gitVersion": "v1.26.1"}, Verdict.FAIL, "older than 1.28"),
        ({"gitVersion": "v1.29.2"}, Verdict.OK, "v1.29.2"),
        ({"gitVersion": "weird"}, Verdict.WARN, "unparsable"),
        (None, Verdict.WARN, "version unknown (403 Forbidden)"),
    ],
)
def test_api_server_version(version: dict[str, str] | None, verdict: Verdict, text: str) -> None:
    result = check_api_server("https://k8s:6443", version, "403 Forbidden")
    assert result.status is verdict and text in result.reason


def test_crds_missing_before_install_only_warn() -> None:
    assert check_our_crds(["localratelimits.policy.ambient-lite.io"], False).status is Verdict.WARN
    assert check_our_crds(["localratelimits.policy.ambient-lite.io"], True).status is Verdict.FAIL
    assert check_our_crds([], True).status is Verdict.OK


def test_istiod_ready_replicas() -> None:
    def deployment(ready: int, wanted: int) -> dict[str, Any]:
        return {"metadata": {"name": "istiod"}, "spec": {"replicas": wanted},
                "status": {"readyReplicas": ready}}  # fmt: skip

    assert check_istiod([deployment(2, 2)], True) == CheckResult(
        "istiod", Verdict.OK, "istiod 2/2 ready"
    )
    assert check_istiod([deployment(0, 2)], True).status is Verdict.FAIL
    assert check_istiod([], installed=True).status is Verdict.FAIL
    assert check_istiod([], installed=False).status is Verdict.WARN


def test_exit_code_fails_only_on_fail() -> None:
    ok, warn = CheckResult("a", Verdict.OK, ""), CheckResult("b", Verdict.WARN, "")
    assert check_exit_code([ok, warn]) == 0
    assert check_exit_code([CheckResult("a", Verdict.FAIL, "")]) == 1


# -- status ------------------------------------------------------------------------------------


def test_human_duration() -> None:
    assert [human_duration(s) for s in (5, 119, 600, 3 * 3600 + 1200, 30 * 3600, 5 * 86400)] == [
        "5s", "119s", "10m", "3h20m", "30h", "5d",
    ]  # fmt: skip


def test_control_plane_rows_show_replicas_and_lease_holder() -> None:
    deployment = {"metadata": {"name": "istiod"}, "spec": {"replicas": 2},
                  "status": {"readyReplicas": 1}}  # fmt: skip
    lease = {
        "metadata": {"name": "istiod-lite-leader"},
        "spec": {"holderIdentity": "istiod-abc", "renewTime": "2025-01-10T11:59:50Z"},
    }
    rows = control_plane_rows([deployment], [lease], NOW)
    assert rows == [
        {"component": "deployment/istiod", "ready": "1/2", "detail": "not all replicas ready"},
        {"component": "lease/istiod-lite-leader", "ready": "",
         "detail": "leader istiod-abc (renewed 10s ago)"},
    ]  # fmt: skip
    assert control_plane_rows([], [], NOW)[0]["detail"] == "no Deployment app=istiod"


def test_ztunnel_rows_per_node_with_missing_ones() -> None:
    z1 = ZtunnelPod("ztunnel-a", "n1", "Running", True, "2025-01-10T11:00:00Z", 2)
    rows = ztunnel_rows([node("n1"), node("n2")], [ZtunnelReport(z1, NOW + timedelta(hours=20))],
                        NOW)  # fmt: skip
    assert rows[0] == {"node": "n1", "pod": "ztunnel-a", "ready": "true", "age": "1h",
                       "restarts": 2, "cert_expiry": "2025-01-11T08:00:00Z (in 20h)"}  # fmt: skip
    assert rows[1]["node"] == "n2" and rows[1]["ready"] == "missing"


def test_soonest_expiry_reads_leaf_certificates() -> None:
    def cert(identity: str, leaf_expiry: str) -> dict[str, Any]:
        return {"identity": identity, "state": "Available", "certChain": [
            {"serialNumber": "1", "validFrom": "2025-01-10T00:00:00Z",
             "expirationTime": leaf_expiry},
            {"serialNumber": "2", "validFrom": "2024-01-01T00:00:00Z",
             "expirationTime": "2025-01-10T13:00:00Z"},  # a root's expiry is not the soonest
        ]}  # fmt: skip

    dump = {"certificates": [cert("spiffe://a", "2025-01-11T00:00:00Z"),
                             cert("spiffe://b", "2025-01-10T20:00:00Z")]}  # fmt: skip
    soonest = soonest_expiry(dump)
    assert soonest == datetime(2025, 1, 10, 20, 0, tzinfo=UTC)
    assert expiry_text(soonest, NOW) == "2025-01-10T20:00:00Z (in 8h)"
    assert expiry_text(NOW - timedelta(seconds=1), NOW).endswith("(expired)")
    assert soonest_expiry({"certificates": []}) is None


# -- waypoints ---------------------------------------------------------------------------------


def gateway(conditions: list[dict[str, Any]] | None = None, generation: int = 1) -> dict[str, Any]:
    gw = gateway_manifest("waypoint", "demo", "all")
    gw["metadata"]["generation"] = generation
    if conditions is not None:
        gw["status"] = {"conditions": conditions, "addresses": [{"value": "10.0.0.7"}]}
    return gw


def test_programmed_reads_the_condition_and_its_generation() -> None:
    assert programmed(gateway())[0] == "Unknown"
    ready = [{"type": "Programmed", "status": "True", "reason": "Programmed",
              "observedGeneration": 1}]  # fmt: skip
    assert programmed(gateway(ready)) == ("True", "Programmed")
    status, reason = programmed(gateway(ready, generation=2))
    assert status == "Unknown" and "generation 1" in reason
    pending = [{"type": "Programmed", "status": "False", "reason": "Pending",
                "message": "deployment not ready"}]  # fmt: skip
    assert programmed(gateway(pending)) == ("False", "Pending: deployment not ready")


def test_waypoint_rows_and_condition_rows() -> None:
    ready = [{"type": "Accepted", "status": "True", "reason": "Accepted"},
             {"type": "Programmed", "status": "True", "reason": "Programmed"}]  # fmt: skip
    other = {"kind": "Gateway", "metadata": {"name": "ingress", "namespace": "demo"},
             "spec": {"gatewayClassName": "istio"}}  # fmt: skip
    assert waypoint_rows([gateway(ready), other]) == [
        {"name": "waypoint", "namespace": "demo", "for": "all", "programmed": "True",
         "address": ["10.0.0.7"]},
    ]  # fmt: skip
    assert [r["condition"] for r in condition_rows(gateway(ready))] == ["Accepted", "Programmed"]
    assert condition_rows(gateway())[0]["reason"] == "NoStatus"


def test_updated_gateway_keeps_what_others_added() -> None:
    live = gateway([{"type": "Programmed", "status": "True"}])
    live["metadata"]["annotations"] = {"note": "keep"}
    live["metadata"]["labels"]["team"] = "a"
    live["metadata"]["resourceVersion"] = "42"
    wanted = gateway_manifest("waypoint", "demo", "workload")
    updated = updated_gateway(live, wanted)
    assert updated["metadata"]["labels"] == {"istio.io/waypoint-for": "workload", "team": "a"}
    assert updated["metadata"]["annotations"] == {"note": "keep"}
    assert updated["metadata"]["resourceVersion"] == "42"
    assert "status" not in updated and "addresses" not in updated["spec"]


class FakeGateways:
    """Answers get_optional with the next of a scripted list of Gateway states."""

    def __init__(self, states: list[dict[str, Any] | None]) -> None:
        self.states = states

    def get_optional(self, path: str) -> dict[str, Any] | None:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def test_wait_programmed_reports_progress_and_succeeds() -> None:
    pending = gateway([{"type": "Programmed", "status": "False", "reason": "Pending"}])
    ready = gateway([{"type": "Programmed", "status": "True", "reason": "Programmed"}])
    kube = cast(Kube, FakeGateways([gateway(), pending, pending, ready]))
    clock = [0.0]
    progress = io.StringIO()

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    wait_programmed(kube, "demo", "waypoint", timeout=10, progress=progress,
                    clock=lambda: clock[0], sleep=sleep)  # fmt: skip
    lines = progress.getvalue().splitlines()
    assert lines == [
        "waiting for waypoint demo/waypoint: Programmed=Unknown (no status from the waypoint "
        "controller yet)",
        "waiting for waypoint demo/waypoint: Programmed=False (Pending)",
        "waypoint demo/waypoint is programmed",
    ]


def test_wait_programmed_times_out_with_the_last_reason() -> None:
    pending = gateway([{"type": "Programmed", "status": "False", "reason": "NoPods"}])
    clock = [0.0]
    with pytest.raises(KubeError, match=r"not programmed after 3s: Programmed=False \(NoPods\)"):
        wait_programmed(cast(Kube, FakeGateways([pending])), "demo", "waypoint", timeout=3,
                        progress=io.StringIO(), clock=lambda: clock[0],
                        sleep=lambda s: clock.__setitem__(0, clock[0] + s))  # fmt: skip
    assert clock[0] == 3


# -- ztunnel pods ------------------------------------------------------------------------------


def test_proxy_path_and_pod_choice() -> None:
    assert proxy_path("ztunnel-x", 15000, "/config_dump") == (
        "/api/v1/namespaces/istio-system/pods/ztunnel-x:15000/proxy/config_dump"
    )
    pending = ZtunnelPod("z0", "n0", "Pending", False, "", 0)
    running = ZtunnelPod("z1", "n1", "Running", True, "", 0)
    assert choose_pod([pending, running]) == running
    with pytest.raises(KubeError, match="no ztunnel pod on node 'n9'"):
        choose_pod([], node="n9")


# -- the client layer --------------------------------------------------------------------------


def test_api_path() -> None:
    assert api_path("v1", "namespaces", name="demo") == "/api/v1/namespaces/demo"
    assert api_path("apps/v1", "deployments", "istio-system") == (
        "/apis/apps/v1/namespaces/istio-system/deployments"
    )
    assert api_path("gateway.networking.k8s.io/v1", "gateways", "d", "w", "status") == (
        "/apis/gateway.networking.k8s.io/v1/namespaces/d/gateways/w/status"
    )


def test_api_errors_are_typed_with_the_status_message() -> None:
    body = b'{"kind":"Status","reason":"NotFound","message":"namespaces \\"x\\" not found"}'
    error = api_error("GET", "/api/v1/namespaces/x", 404, body)
    assert isinstance(error, NotFound)
    assert str(error) == 'GET /api/v1/namespaces/x: 404 NotFound: namespaces "x" not found'
    assert isinstance(api_error("POST", "/p", 409, b'{"kind":"Status","reason":"AlreadyExists"}'),
                      AlreadyExists)  # fmt: skip
    assert isinstance(api_error("PUT", "/p", 409, b'{"kind":"Status","reason":"Conflict"}'),
                      Conflict)  # fmt: skip
    assert api_error("GET", "/p", 403, b"forbidden").reason == "Forbidden"


def test_context_namespace() -> None:
    contexts = [{"name": "a", "context": {"namespace": "team-a"}}, {"name": "b", "context": {}}]
    assert context_namespace(contexts, "a") == "team-a"
    assert context_namespace(contexts, "b") == "default"
    assert context_namespace(contexts, None) == "default"


def test_label_change_describes_what_happened() -> None:
    label = "istio.io/dataplane-mode"
    assert LabelChange("demo", label, None, "ambient").describe() == (
        "namespace demo: labeled istio.io/dataplane-mode=ambient"
    )
    assert LabelChange("demo", label, "ambient", None).describe() == (
        "namespace demo: removed label istio.io/dataplane-mode=ambient"
    )
    assert "unchanged (already istio.io/dataplane-mode=ambient)" in LabelChange(
        "demo", label, "ambient", "ambient").describe()  # fmt: skip
    assert "unchanged (already no istio.io/dataplane-mode)" in LabelChange(
        "demo", label, None, None).describe()  # fmt: skip


# -- install -----------------------------------------------------------------------------------


def test_pluralize() -> None:
    assert [pluralize(k) for k in ("Gateway", "NetworkPolicy", "Ingress", "Gateway", "Proxy")] == [
        "gateways", "networkpolicies", "ingresses", "gateways", "proxies",
    ]  # fmt: skip


def test_resolver_without_discovery_uses_the_table() -> None:
    resolver = ResourceResolver(None)
    assert resolver.resolve({"apiVersion": "v1", "kind": "Namespace"}) == ("namespaces", False)
    assert resolver.resolve({"apiVersion": "x.io/v1", "kind": "Widget",
                             "metadata": {"namespace": "a"}}) == ("widgets", True)  # fmt: skip
    ref, path = resolver.ref({"apiVersion": "apps/v1", "kind": "DaemonSet",
                              "metadata": {"name": "ztunnel"}}, "istio-system")  # fmt: skip
    assert str(ref) == "DaemonSet istio-system/ztunnel"
    assert path == "/apis/apps/v1/namespaces/istio-system/daemonsets"


def test_prepare_replacement_keeps_the_cluster_ip() -> None:
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "istiod"},
           "spec": {"ports": [{"port": 15012}]}}  # fmt: skip
    live = {"metadata": {"resourceVersion": "9"},
            "spec": {"clusterIP": "10.0.0.5", "clusterIPs": ["10.0.0.5"]}}  # fmt: skip
    replacement = prepare_replacement(doc, live)
    assert replacement["metadata"]["resourceVersion"] == "9"
    assert replacement["spec"]["clusterIP"] == "10.0.0.5"
    assert "clusterIP" not in doc["spec"]  # type: ignore[operator]


def test_parse_documents_rejects_what_cannot_be_applied() -> None:
    with pytest.raises(InstallError, match="document 2 has no kind/apiVersion"):
        parse_documents("kind: A\napiVersion: v1\nmetadata: {name: a}\n---\nfoo: 1\n", source="t")
    with pytest.raises(InstallError, match="ConfigMap document 1 has no name"):
        parse_documents("kind: ConfigMap\napiVersion: v1\nmetadata: {}\n", source="t")
    with pytest.raises(InstallError, match="not YAML"):
        parse_documents("a: [\n", source="t")


def write_kustomization(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        "namespace: istio-system\nresources:\n- namespace.yaml\n- config.yaml\n"
    )
    (directory / "namespace.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n"
    )
    (directory / "config.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: mesh\ndata:\n  a: b\n"
    )
    return directory


def test_render_kustomization_with_kubectl(tmp_path: Path) -> None:
    documents = render_kustomization(write_kustomization(tmp_path / "k"))
    outcomes = dry_run(documents, "default")
    assert [str(o.ref) for o in outcomes] == [
        "Namespace istio-system",
        "ConfigMap istio-system/mesh",
    ]
    with pytest.raises(InstallError, match="has no kustomization.yaml"):
        render_kustomization(tmp_path)


def test_render_kustomization_failure_says_why(tmp_path: Path) -> None:
    def failing(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "Error: missing resource x.yaml")

    with pytest.raises(InstallError, match="failed: Error: missing resource x.yaml"):
        render_kustomization(write_kustomization(tmp_path / "k"), run=failing)


def test_install_dry_run_needs_no_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = write_kustomization(tmp_path / "k")
    code = cli.main(["install", "--dry-run", "-k", str(directory),
                     "--kubeconfig", str(tmp_path / "none")], prog="kubectl-ambient")  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines() == [
        "KIND      NAMESPACE    NAME         ACTION",
        "Namespace              istio-system would apply",
        "ConfigMap istio-system mesh         would apply",
    ]


# -- the embedded-or-cluster switch ------------------------------------------------------------


def test_choose_mode() -> None:
    assert choose_mode(["-f"], [], cluster_default=True) == "embedded"
    assert choose_mode([], ["--context"], cluster_default=False) == "cluster"
    assert choose_mode([], [], cluster_default=True) == "cluster"
    assert choose_mode([], [], cluster_default=False) == "embedded"
    with pytest.raises(ClusterUsageError, match="cannot be combined"):
        choose_mode(["--state-dir"], ["--pod"], cluster_default=True)


def test_program_name() -> None:
    assert is_cluster_program("/usr/local/bin/kubectl-ambient")
    assert not is_cluster_program("/work/.venv/bin/ambientctl")


def run_cli(capsys: pytest.CaptureFixture[str], prog: str, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv), prog=prog)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_embedded_flags_win_even_as_the_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "kubectl-ambient", "ztunnel-config", "workloads",
                           "--state-dir", str(tmp_path))  # fmt: skip
    assert code == 1 and "no running embedded mesh" in err


def test_plugin_defaults_to_the_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "kubeconfig"
    code, _, err = run_cli(capsys, "kubectl-ambient", "ztunnel-config", "workloads",
                           "--kubeconfig", str(missing))  # fmt: skip
    assert code == 1 and f"kubeconfig {missing} does not exist" in err
    code, _, err = run_cli(capsys, "kubectl-ambient", "--kubeconfig", str(missing),
                           "waypoint", "list")  # fmt: skip
    assert code == 1 and "does not exist" in err and err.startswith("kubectl ambient waypoint")


def test_mixing_modes_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "ambientctl", "waypoint", "list", "-f", str(tmp_path),
                           "--context", "prod")  # fmt: skip
    assert code == 2 and "cannot be combined" in err
    code, _, err = run_cli(capsys, "ambientctl", "ztunnel-config", "workloads", "--pod", "z",
                           "--address", "127.0.0.1")  # fmt: skip
    assert code == 2 and "not allowed with argument" in err


def test_help_documents_the_switch(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["waypoint", "apply", "--help"], ["ztunnel-config", "--help"]):
        code, out, _ = run_cli(capsys, "kubectl-ambient", *argv)
        assert code == 0
        assert "select the embedded mesh" in " ".join(out.split())


def test_a_cluster_flag_before_the_command_still_conflicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "kubectl-ambient", "--kubeconfig", str(tmp_path / "k"),
                           "waypoint", "list", "-f", str(tmp_path))  # fmt: skip
    assert code == 2 and "-f/--file (embedded mesh) and --kubeconfig (cluster)" in err


class FakeConnection:
    def __str__(self) -> str:
        return "HTTPConnection(host='127.0.0.1', port=1)"


def test_connection_problem_is_short() -> None:
    refused = urllib3.exceptions.NewConnectionError(
        FakeConnection(),  # type: ignore[arg-type]
        "Failed to establish a new connection: [Errno 111] Connection refused",
    )
    wrapped = urllib3.exceptions.MaxRetryError(None, "/version", refused)  # type: ignore[arg-type]
    assert connection_problem(wrapped) == (
        "Failed to establish a new connection: [Errno 111] Connection refused"
    )
