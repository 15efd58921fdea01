"""``kubectl ambient`` against the API stand-in (tests/kube/apiserver.py), through the real
``kubernetes`` client: enroll, waypoints (the test plays the waypoint controller by writing
the Gateway's status), ztunnel-config and status through the pod proxy to a real in-test mesh's
ztunnel admin ports, check (NetworkPolicies blocking 15008) and install/uninstall."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from ambientctl import cli
from tests.conftest import LoopbackAllocator
from tests.integration.mesh_harness import NODE_1, NODE_2, start_mesh
from tests.kube.apiserver import FakeKubeApiServer

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


class Cli:
    """Runs ``kubectl ambient`` (in a worker thread: it blocks) against the stand-in."""

    def __init__(self, kubeconfig: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.kubeconfig = kubeconfig
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await trio.to_thread.run_sync(
            partial(cli.main, [*argv, "--kubeconfig", str(self.kubeconfig)],
                    prog="kubectl-ambient")
        )  # fmt: skip
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture
async def apiserver(nursery: trio.Nursery, loopback: LoopbackAllocator) -> FakeKubeApiServer:
    server: FakeKubeApiServer = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    return server


@pytest.fixture
def kubectl_ambient(
    apiserver: FakeKubeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    yield Cli(apiserver.write_kubeconfig(tmp_path / "kubeconfig"), capsys)


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}  # fmt: skip


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {}}


def pod(ns: str, name: str, labels: dict[str, str], node_name: str = "node-1",
        ready: bool = True) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node_name,
                 "containers": [{"name": "app", "image": "app", "ports": [
                     {"name": "http", "containerPort": 8000}]}]},
        "status": {"phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


def ztunnel_pod(node_name: str) -> dict[str, Any]:
    return pod("istio-system", f"ztunnel-{node_name}", {"app": "ztunnel"}, node_name)


def istiod(ready: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "istiod", "namespace": "istio-system", "labels": {"app": "istiod"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "istiod"}},
                 "template": {"metadata": {"labels": {"app": "istiod"}}, "spec": {"containers": [
                     {"name": "discovery", "image": "ambient-lite"}]}}},
        "status": {"readyReplicas": ready, "replicas": 1},
    }  # fmt: skip


def labels(server: FakeKubeApiServer, resource: str, name: str, ns: str | None = None) -> Any:
    found = server.get(resource, name, ns)
    assert found is not None
    return found["metadata"].get("labels") or {}


# -- enroll / unenroll -------------------------------------------------------------------------


async def test_enroll_and_unenroll(apiserver: FakeKubeApiServer, kubectl_ambient: Cli) -> None:
    apiserver.apply(namespace("demo", {"team": "a"}))
    assert await kubectl_ambient("enroll", "demo") == (
        0, "namespace demo: labeled istio.io/dataplane-mode=ambient\n", ""
    )  # fmt: skip
    assert labels(apiserver, "namespaces", "demo") == {**AMBIENT, "team": "a"}
    code, out, _ = await kubectl_ambient("enroll", "demo")
    assert code == 0
    assert out == "namespace demo unchanged (already istio.io/dataplane-mode=ambient)\n"
    assert [r.method for r in apiserver.requests if r.path.endswith("/namespaces/demo")] == [
        "GET", "PATCH", "GET",
    ]  # fmt: skip

    code, out, _ = await kubectl_ambient("unenroll", "demo")
    assert (code, out) == (0, "namespace demo: removed label istio.io/dataplane-mode=ambient\n")
    assert labels(apiserver, "namespaces", "demo") == {"team": "a"}

    code, _, err = await kubectl_ambient("enroll", "nope")
    assert code == 1
    assert err == "kubectl ambient enroll: namespace 'nope' does not exist\n"

    # kubectl's --context, before or after the command.
    code, out, _ = await kubectl_ambient("--context", "stand-in", "enroll", "demo")
    assert (code, out) == (0, "namespace demo: labeled istio.io/dataplane-mode=ambient\n")
    code, _, err = await kubectl_ambient("unenroll", "demo", "--context", "elsewhere")
    assert code == 1 and "kubectl ambient unenroll: kubeconfig:" in err and "elsewhere" in err
    assert labels(apiserver, "namespaces", "demo") == {**AMBIENT, "team": "a"}


# -- waypoints ---------------------------------------------------------------------------------


def with_status(gateway: dict[str, Any], programmed: str, reason: str) -> dict[str, Any]:
    """What the waypoint controller writes."""
    generation = gateway["metadata"]["generation"]
    gateway = dict(gateway)
    gateway["status"] = {
        "addresses": [{"type": "IPAddress", "value": "10.96.0.20"}] if programmed == "True" else [],
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
             "observedGeneration": generation, "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Programmed", "status": programmed, "reason": reason,
             "message": "" if programmed == "True" else "waiting for the waypoint Deployment",
             "observedGeneration": generation, "lastTransitionTime": "2025-01-01T00:00:00Z"},
        ],
    }  # fmt: skip
    return gateway


async def test_waypoint_apply_list_status_delete(
    apiserver: FakeKubeApiServer, kubectl_ambient: Cli
) -> None:
    apiserver.apply(namespace("demo", AMBIENT))
    code, out, _ = await kubectl_ambient("waypoint", "apply", "-n", "demo", "--enroll-namespace")
    assert code == 0
    assert out == (
        "waypoint demo/waypoint created\n"
        'namespace demo labeled with "istio.io/use-waypoint: waypoint"\n'
    )
    gateway = apiserver.get("gateways", "waypoint", "demo")
    assert gateway is not None
    assert gateway["spec"] == {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    }
    assert gateway["metadata"]["labels"] == {"istio.io/waypoint-for": "service"}
    assert labels(apiserver, "namespaces", "demo")["istio.io/use-waypoint"] == "waypoint"

    code, out, _ = await kubectl_ambient("waypoint", "list", "-n", "demo")
    assert code == 0
    assert out.splitlines() == [
        "NAME     NAMESPACE FOR     PROGRAMMED ADDRESS",
        "waypoint demo      service Unknown",
    ]
    code, out, _ = await kubectl_ambient("waypoint", "status", "-n", "demo")
    assert code == 1 and "NoStatus" in out

    apiserver.apply(with_status(gateway, "True", "Programmed"))
    code, out, _ = await kubectl_ambient("waypoint", "list", "-A")
    assert out.splitlines()[1].split() == ["waypoint", "demo", "service", "True", "10.96.0.20"]
    code, out, _ = await kubectl_ambient("waypoint", "status", "waypoint", "-n", "demo")
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["NAMESPACE", "NAME", "CONDITION", "STATUS", "REASON"],
        ["demo", "waypoint", "Accepted", "True", "Accepted"],
        ["demo", "waypoint", "Programmed", "True", "Programmed"],
    ]
    code, out, _ = await kubectl_ambient("waypoint", "list", "-n", "demo", "-o", "json")
    [listed] = json.loads(out)
    assert listed["status"]["addresses"] == [{"type": "IPAddress", "value": "10.96.0.20"}]

    # A second apply updates the live Gateway (the spec changes; what others added stays).
    live = apiserver.get("gateways", "waypoint", "demo")
    assert live is not None
    live["metadata"]["annotations"] = {"owner": "team-a"}
    apiserver.apply(live)
    code, out, _ = await kubectl_ambient("waypoint", "apply", "-n", "demo", "--for", "all")
    assert (code, out) == (0, "waypoint demo/waypoint updated\n")
    updated = apiserver.get("gateways", "waypoint", "demo")
    assert updated is not None
    assert updated["metadata"]["labels"]["istio.io/waypoint-for"] == "all"
    assert updated["metadata"]["annotations"] == {"owner": "team-a"}

    code, out, _ = await kubectl_ambient("waypoint", "delete", "waypoint", "-n", "demo")
    assert code == 0
    assert out == (
        "waypoint demo/waypoint deleted\n"
        "note: still labeled istio.io/use-waypoint=waypoint: namespace/demo\n"
    )
    assert apiserver.get("gateways", "waypoint", "demo") is None
    code, _, err = await kubectl_ambient("waypoint", "delete", "waypoint", "-n", "demo")
    assert code == 1 and "no waypoint Gateway demo/waypoint" in err


async def test_waypoint_apply_wait(apiserver: FakeKubeApiServer, kubectl_ambient: Cli) -> None:
    apiserver.apply(namespace("demo"))

    async def controller() -> None:
        """Programmed=False first, then True, as the controller reports a rollout."""
        await apiserver.wait_until(lambda: apiserver.get("gateways", "east", "demo") is not None)
        gateway = apiserver.get("gateways", "east", "demo")
        assert gateway is not None
        apiserver.apply(with_status(gateway, "False", "Pending"))
        await trio.sleep(0.6)
        apiserver.apply(with_status(gateway, "True", "Programmed"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(controller)
        code, out, err = await kubectl_ambient("waypoint", "apply", "east", "-n", "demo",
                                               "--wait", "--timeout", "10s")  # fmt: skip
    assert code == 0
    assert out == "waypoint demo/east created\n"
    assert "waiting for waypoint demo/east: Programmed=" in err
    assert err.splitlines()[-1] == "waypoint demo/east is programmed"

    code, _, err = await kubectl_ambient("waypoint", "apply", "west", "-n", "demo", "--wait",
                                         "--timeout", "1s")  # fmt: skip
    assert code == 1
    assert "waypoint demo/west not programmed after 1s: Programmed=Unknown" in err

    code, _, err = await kubectl_ambient("waypoint", "apply", "-n", "elsewhere")
    assert code == 1 and "namespace 'elsewhere' does not exist" in err
    assert apiserver.get("gateways", "waypoint", "elsewhere") is None


# -- ztunnel-config and status through the pod proxy -------------------------------------------


async def test_ztunnel_config_and_status_through_the_pod_proxy(
    nursery: trio.Nursery,
    loopback: LoopbackAllocator,
    tmp_path: Path,
    apiserver: FakeKubeApiServer,
    kubectl_ambient: Cli,
) -> None:
    mesh = await start_mesh(nursery, tmp_path / "mesh", loopback)
    apiserver.apply(namespace("istio-system"))
    for name, demo_address in (("node-1", NODE_1), ("node-2", NODE_2)):
        apiserver.apply(node(name))
        apiserver.apply(ztunnel_pod(name))
        apiserver.pod_proxy_targets[("istio-system", f"ztunnel-{name}", 15000)] = (
            mesh.addr(demo_address), 15000,
        )  # fmt: skip
    apiserver.apply(node("node-3"))  # no ztunnel there
    apiserver.apply(istiod(ready=1))
    apiserver.apply({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": "istiod-lite", "namespace": "istio-system"},
                     "spec": {"holderIdentity": "istiod-7f9c"}})  # fmt: skip

    code, out, err = await kubectl_ambient("ztunnel-config", "workloads", "--node", "node-1")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["NAMESPACE", "POD", "NAME"]
    assert "httpbin-v1" in out and "sleep" in out
    proxied = [r.path for r in apiserver.requests if "/proxy/" in r.path]
    assert proxied == [
        "/api/v1/namespaces/istio-system/pods/ztunnel-node-1:15000/proxy/config_dump"
    ]

    code, out, _ = await kubectl_ambient("ztunnel-config", "certificates", "--pod",
                                         "ztunnel-node-2", "-o", "json")  # fmt: skip
    assert code == 0
    identities = {c["identity"] for c in json.loads(out)}
    assert identities and all(i.startswith("spiffe://cluster.local/ns/") for i in identities)

    code, _, err = await kubectl_ambient("ztunnel-config", "workloads", "--node", "node-3")
    assert code == 1 and "no ztunnel pod on node 'node-3'" in err

    code, out, err = await kubectl_ambient("status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:4] == [
        "CONTROL PLANE",
        "COMPONENT         READY DETAIL",
        "deployment/istiod 1/1   ready",
        "lease/istiod-lite       leader istiod-7f9c",
    ]
    node_lines = {line.split()[0]: line for line in lines if line.startswith("node-")}
    assert "ztunnel-node-1 true" in node_lines["node-1"] and "(in 59m)" in node_lines["node-1"]
    assert node_lines["node-3"].split()[1] == "missing"
    assert any(line.startswith("soonest certificate expiry: ") for line in lines)
    assert lines[-1] == "no waypoints"

    code, out, _ = await kubectl_ambient("status", "-o", "json")
    status = json.loads(out)
    assert [z["node"] for z in status["ztunnels"]] == ["node-1", "node-2", "node-3"]


# -- check -------------------------------------------------------------------------------------


async def test_check_finds_a_networkpolicy_blocking_hbone(
    apiserver: FakeKubeApiServer, kubectl_ambient: Cli
) -> None:
    apiserver.apply(namespace("istio-system"))
    apiserver.apply(istiod(ready=1))
    for name in ("node-1", "node-2"):
        apiserver.apply(node(name))
        apiserver.apply(ztunnel_pod(name))
    apiserver.apply(namespace("demo", AMBIENT))
    apiserver.apply(pod("demo", "httpbin-v1", {"app": "httpbin"}))
    apiserver.apply(pod("demo", "sleep", {"app": "sleep"}))
    apiserver.apply({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "httpbin-only-8000", "namespace": "demo"},
        "spec": {"podSelector": {"matchLabels": {"app": "httpbin"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"ports": [{"protocol": "TCP", "port": 8000}]}]},
    })  # fmt: skip

    code, out, _ = await kubectl_ambient("check")
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["kubernetes-api"].split()[1] == "OK" and "v1.31.0" in rows["kubernetes-api"]
    assert rows["network-policy"].split()[1] == "FAIL"
    assert "NetworkPolicy demo/httpbin-only-8000 allows no TCP 15008 ingress to pods " \
           "httpbin-v1" in rows["network-policy"]  # fmt: skip
    assert "add an ingress rule allowing TCP port 15008" in rows["network-policy"]
    assert all(rows[c].split()[1] == "OK" for c in (
        "gateway-api-crds", "ambient-lite-crds", "istio-system", "istiod", "ztunnel",
        "enrolled-namespaces"))  # fmt: skip

    apiserver.apply({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-hbone", "namespace": "demo"},
        "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 15008}]}]},
    })  # fmt: skip
    code, out, _ = await kubectl_ambient("check", "-o", "json")
    assert code == 0
    results = {r["check"]: r for r in json.loads(out)}
    assert results["network-policy"]["status"] == "OK"
    assert "none blocks TCP 15008" in results["network-policy"]["reason"]


async def test_check_before_install(apiserver: FakeKubeApiServer, kubectl_ambient: Cli) -> None:
    apiserver.apply(node("node-1"))
    code, out, _ = await kubectl_ambient("check", "-o", "json")
    statuses = {r["check"]: r["status"] for r in json.loads(out)}
    assert code == 0  # nothing installed yet is a WARN, not a FAIL
    assert statuses["istio-system"] == statuses["istiod"] == statuses["ztunnel"] == "WARN"
    assert statuses["enrolled-namespaces"] == "WARN"


async def test_check_when_the_api_server_is_unreachable(
    loopback: LoopbackAllocator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = FakeKubeApiServer(loopback.new())
    dead.port = 1  # nothing listens there
    unreachable = Cli(dead.write_kubeconfig(tmp_path / "kubeconfig"), capsys)
    code, out, _ = await unreachable("check")
    assert code == 1
    assert out.splitlines()[1].split()[:2] == ["kubernetes-api", "FAIL"]
    assert "cannot reach the API server" in out


# -- install / uninstall -----------------------------------------------------------------------


def tiny_kustomization(directory: Path) -> Path:
    directory.mkdir()
    (directory / "kustomization.yaml").write_text(
        "namespace: istio-system\n"
        "resources: [namespace.yaml, crd.yaml, serviceaccount.yaml, service.yaml]\n"
    )
    (directory / "namespace.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n"
    )
    (directory / "crd.yaml").write_text(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
        "metadata: {name: localratelimits.policy.ambient-lite.io}\n"
        "spec:\n  group: policy.ambient-lite.io\n  scope: Namespaced\n"
        "  names: {kind: LocalRateLimit, plural: localratelimits, singular: localratelimit}\n"
        "  versions:\n  - name: v1alpha1\n    served: true\n    storage: true\n"
        "    schema:\n"
        "      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}\n"
    )
    (directory / "serviceaccount.yaml").write_text(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: istiod}\n"
    )
    (directory / "service.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: istiod}\n"
        "spec:\n  selector: {app: istiod}\n  ports: [{name: grpc-xds, port: 15012}]\n"
    )
    return directory


async def test_install_and_uninstall(
    apiserver: FakeKubeApiServer, kubectl_ambient: Cli, tmp_path: Path
) -> None:
    manifests = tiny_kustomization(tmp_path / "base")
    code, out, _ = await kubectl_ambient("install", "--dry-run", "-k", str(manifests))
    assert code == 0
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["Namespace", "istio-system", "would", "apply"],
        ["CustomResourceDefinition", "localratelimits.policy.ambient-lite.io", "would", "apply"],
        ["ServiceAccount", "istio-system", "istiod", "would", "apply"],
        ["Service", "istio-system", "istiod", "would", "apply"],
    ]
    assert apiserver.get("namespaces", "istio-system") is None
    code, out, _ = await kubectl_ambient("install", "--dry-run", "-k", str(manifests), "-o", "yaml")
    assert "kind: CustomResourceDefinition" in out

    code, out, err = await kubectl_ambient("install", "-k", str(manifests))
    assert code == 0, err
    assert out.splitlines() == [
        "Namespace istio-system created",
        "CustomResourceDefinition localratelimits.policy.ambient-lite.io created",
        "ServiceAccount istio-system/istiod created",
        "Service istio-system/istiod created",
        f"applied 4 objects from {manifests}",
    ]
    assert apiserver.get("serviceaccounts", "istiod", "istio-system") is not None

    # The API server allocates a cluster IP; a re-install must keep it (it is immutable).
    service = apiserver.get("services", "istiod", "istio-system")
    assert service is not None
    service["spec"]["clusterIP"] = "10.96.0.10"
    apiserver.apply(service)
    code, out, _ = await kubectl_ambient("install", "-k", str(manifests))
    assert code == 0
    assert out.splitlines()[:4] == [
        "Namespace istio-system unchanged",
        "CustomResourceDefinition localratelimits.policy.ambient-lite.io unchanged",
        "ServiceAccount istio-system/istiod unchanged",
        "Service istio-system/istiod unchanged",  # the allocated clusterIP was kept
    ]
    reinstalled = apiserver.get("services", "istiod", "istio-system")
    assert reinstalled is not None and reinstalled["spec"]["clusterIP"] == "10.96.0.10"
    (manifests / "serviceaccount.yaml").write_text(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: istiod, labels: {v: '2'}}\n"
    )
    code, out, _ = await kubectl_ambient("install", "-k", str(manifests))
    assert out.splitlines()[2] == "ServiceAccount istio-system/istiod configured"
    assert labels(apiserver, "serviceaccounts", "istiod", "istio-system") == {"v": "2"}

    code, out, _ = await kubectl_ambient("uninstall", "-k", str(manifests))
    assert code == 0
    assert out.splitlines() == [
        "Service istio-system/istiod deleted",
        "ServiceAccount istio-system/istiod deleted",
        "CustomResourceDefinition localratelimits.policy.ambient-lite.io kept",
        "Namespace istio-system deleted",
        "deleted 3 objects; kept 1 CustomResourceDefinitions (--purge deletes them)",
    ]
    assert apiserver.get("services", "istiod", "istio-system") is None
    assert apiserver.get("customresourcedefinitions", "localratelimits.policy.ambient-lite.io")

    await apiserver.wait_until(lambda: apiserver.get("namespaces", "istio-system") is None)
    code, out, _ = await kubectl_ambient("uninstall", "-k", str(manifests), "--purge")
    assert code == 0
    assert out.splitlines()[0] == "Service istio-system/istiod not found"
    assert "CustomResourceDefinition localratelimits.policy.ambient-lite.io deleted" in out
