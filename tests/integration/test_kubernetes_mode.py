"""istiod_lite in Kubernetes mode, end to end: a Kubernetes API (the in-test stand-in speaking
the real list/watch protocol), istiod_lite watching it, and real ztunnels that authenticate
with ServiceAccount tokens checked by TokenReview — then traffic and live cluster changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ambientctl.apps import Socks5ConnectError, http_get, serve_http_echo, socks5_connect
from istiod_lite.__main__ import RunningIstiod, run_istiod
from istiod_lite.config import IstiodConfig, KubernetesMode
from tests.conftest import LoopbackAllocator
from tests.kube.apiserver import FakeKubeApiServer, TokenReviewAnswer
from ztunnel.config import ZtunnelConfig
from ztunnel.proxy import Ztunnel

pytestmark = pytest.mark.slow

ZTUNNEL_USER = "system:serviceaccount:istio-system:ztunnel"


def namespace(name: str, *, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def node(name: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}


def pod(name: str, ns: str, node_name: str, ip: str, sa: str,
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name},
                     "uid": f"uid-{name}"},
        "spec": {"nodeName": node_name, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "app:1",
                                 "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


class Cluster:
    def __init__(self, api: FakeKubeApiServer, loopback: LoopbackAllocator, root: Path) -> None:
        self.api, self.root = api, root
        self.istiod_address = loopback.new()
        self.nodes = {"node-1": loopback.new(), "node-2": loopback.new()}
        self.ips = {name: loopback.new() for name in ("sleep", "httpbin", "httpbin-2")}
        self.vip = loopback.new()
        self.istiod: RunningIstiod | None = None
        self.ztunnels: dict[str, Ztunnel] = {}

    def seed(self) -> None:
        api = self.api
        api.apply(namespace("istio-system", ambient=False))
        api.apply(namespace("demo", ambient=True))
        for name, address in self.nodes.items():
            api.apply(node(name, address))
            # The ztunnel DaemonSet's pods: TokenReview names them, istiod reads their node.
            stored = api.apply(pod(f"ztunnel-{name}", "istio-system", name, address,
                                   "ztunnel", {"app": "ztunnel"}))
            # A bound token names its pod by name and uid, as the kubelet's projection does.
            api.token_reviews[f"token-{name}"] = TokenReviewAnswer(
                ZTUNNEL_USER, audiences=("istio-ca",), pod_name=f"ztunnel-{name}",
                pod_uid=stored["metadata"]["uid"],
            )
        api.apply(pod("sleep", "demo", "node-1", self.ips["sleep"], "sleep"))
        api.apply(pod("httpbin", "demo", "node-2", self.ips["httpbin"], "httpbin",
                      {"app": "httpbin"}))
        api.apply({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "httpbin", "namespace": "demo"},
            "spec": {"selector": {"app": "httpbin"}, "clusterIP": self.vip,
                     "clusterIPs": [self.vip],
                     "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]},
        })

    async def start(self, nursery: trio.Nursery) -> None:
        kubeconfig = self.api.write_kubeconfig(self.root / "kubeconfig")
        self.istiod = await nursery.start(run_istiod, IstiodConfig(
            state_dir=self.root / "istiod",
            listen_host=self.istiod_address,
            kubernetes=KubernetesMode(kubeconfig=kubeconfig, pod_name="istiod-0"),
            log_format="json",
        ))
        for name, address in self.nodes.items():
            token_file = self.root / f"token-{name}"
            token_file.write_text(f"token-{name}\n")
            ztunnel = Ztunnel(ZtunnelConfig(
                node=name, node_address=address, xds_address=(self.istiod_address, 15012),
                root_cert=self.istiod.root_cert_path, token=f"token-{name}",
                token_file=token_file, connect_timeout=2.0, drain_timeout=1.0,
                log_format="json",
            ))
            await nursery.start(ztunnel.run)
            self.ztunnels[name] = ztunnel

    async def wait_ready(self) -> None:
        with trio.fail_after(20):
            async with httpx.AsyncClient(trust_env=False) as client:
                for address in self.nodes.values():
                    while True:
                        try:
                            url = f"http://{address}:15021/healthz/ready"
                            if (await client.get(url)).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.05)

    async def get_through_mesh(self) -> dict[str, Any]:
        stream = await socks5_connect(self.nodes["node-1"], 15080, self.vip, 8000,
                                      source_address=self.ips["sleep"])
        async with stream:
            status, _headers, body = await http_get(stream, "httpbin", "/get")
        assert status == 200
        return json.loads(body)  # type: ignore[no-any-return]


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def test_ztunnels_authenticated_by_token_review_serve_traffic_and_follow_the_cluster(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    api = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    cluster = Cluster(api, loopback, tmp_path)
    cluster.seed()
    for name in ("httpbin", "httpbin-2"):
        await nursery.start(serve_http_echo, cluster.ips[name], 8000, name)
    await cluster.start(nursery)
    await cluster.wait_ready()

    # Certificates were issued through TokenReview-authenticated node callers, the CA root
    # was stored in a Secret, and traffic flows over mTLS.
    assert (await cluster.get_through_mesh())["pod"] == "httpbin"
    assert api.get("secrets", "istio-ca-secret", "istio-system") is not None
    node_1 = cluster.ztunnels["node-1"]
    wanted = {str(i) for i in node_1.runtime.certs.wanted()}
    assert wanted == {"spiffe://cluster.local/ns/demo/sa/sleep"}

    # A pod added reaches the ztunnels; the Service picks it as a second endpoint.
    api.apply(pod("httpbin-2", "demo", "node-2", cluster.ips["httpbin-2"], "httpbin",
                  {"app": "httpbin"}))
    await wait_until(lambda: node_1.state.workload_by_address(cluster.ips["httpbin-2"]))
    served = {(await cluster.get_through_mesh())["pod"] for _ in range(6)}
    assert served == {"httpbin", "httpbin-2"}

    # Relabelled out of the Service, then deleted: gone from the endpoints and the state.
    relabelled = pod("httpbin-2", "demo", "node-2", cluster.ips["httpbin-2"], "httpbin",
                     {"app": "other"})
    api.apply(relabelled)
    service_key = "demo/httpbin.demo.svc.cluster.local"
    await wait_until(lambda: len(node_1.state.endpoints(service_key)) == 1)
    api.delete("pods", "httpbin-2", "demo")
    await wait_until(lambda: node_1.state.workload_by_address(cluster.ips["httpbin-2"]) is None)

    # The namespace opted out: its pods leave the mesh (no HBONE) everywhere.
    api.apply(namespace("demo", ambient=False))
    await wait_until(lambda: node_1.state.workload_by_address(
        cluster.ips["httpbin"]).tunnel_protocol.value == "NONE")  # type: ignore[union-attr]
    with pytest.raises(Socks5ConnectError):  # sleep is no longer a mesh workload
        await cluster.get_through_mesh()
    api.apply(namespace("demo", ambient=True))
    await wait_until(lambda: node_1.state.workload_by_address(
        cluster.ips["httpbin"]).tunnel_protocol.value == "HBONE")  # type: ignore[union-attr]
    with trio.fail_after(10):
        while True:
            try:
                assert (await cluster.get_through_mesh())["pod"] == "httpbin"
                break
            except Socks5ConnectError:
                await trio.sleep(0.1)  # sleep's certificate is being re-issued

    # The leader published the root for proxies: in istio-system (the ztunnels mount it)
    # and in every enrolled namespace.
    await wait_until(lambda: api.get("configmaps", "istio-ca-root-cert", "demo") is not None)
    published = api.get("configmaps", "istio-ca-root-cert", "istio-system")
    assert published is not None
    assert published["data"]["root-cert.pem"] == cluster.istiod.root_cert_path.read_text()  # type: ignore[union-attr]


async def test_a_watch_dropped_mid_stream_loses_no_event(
    nursery: trio.Nursery, tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    api = await nursery.start(FakeKubeApiServer.serve, loopback.new())
    cluster = Cluster(api, loopback, tmp_path)
    cluster.seed()
    await nursery.start(serve_http_echo, cluster.ips["httpbin"], 8000, "httpbin")
    await cluster.start(nursery)
    await cluster.wait_ready()
    node_1 = cluster.ztunnels["node-1"]
    await api.drop_watches()
    # Changes made while the watches are down reach the ztunnels once they resume.
    api.apply(pod("httpbin-2", "demo", "node-2", cluster.ips["httpbin-2"], "httpbin",
                  {"app": "httpbin"}))
    await wait_until(lambda: node_1.state.workload_by_address(cluster.ips["httpbin-2"]))
    api.compact()  # the next resume is too old: 410 Gone, then a relist
    await api.drop_watches()
    api.delete("pods", "httpbin-2", "demo")
    await wait_until(lambda: node_1.state.workload_by_address(cluster.ips["httpbin-2"]) is None)
