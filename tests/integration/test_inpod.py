"""ztunnel's in-pod capture against real network namespaces (root only).

The test builds one "node" namespace and two "pod" namespaces wired to it by veth pairs
(addresses only inside them; the node routes between the pods), runs istiod_lite and one
``--capture inpod`` ztunnel in-process (both on loopback in the test's own namespace, as the
embedded mode does), and talks to the pods with unmodified clients: a plain
``socket.create_connection`` from a thread that entered the client pod's namespace. Nothing
in the host namespace is touched; the namespaces are deleted even when a test fails.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from istiod_lite.__main__ import run_istiod
from istiod_lite.config import IstiodConfig
from tests.integration.netns_helpers import in_netns, ip, netns_unusable, network_namespaces
from ztunnel.capture import netns, rules
from ztunnel.config import ZtunnelConfig
from ztunnel.proxy import Ztunnel

_REASON = netns_unusable("nsenter", "iptables", "iptables-save", "iptables-restore")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

_COUNTER = itertools.count(1)
_TIMEOUT = 10.0
ECHO_PORT = 9000
CLIENT_UID = "Kubernetes//Pod/demo/client"
SERVER_UID = "Kubernetes//Pod/demo/server"
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/demo/sa/server"


@dataclass
class Topology:
    node: str
    client: str
    server: str
    client_ip: str
    server_ip: str

    @property
    def client_path(self) -> Path:
        return netns.netns_path(self.client)

    @property
    def server_path(self) -> Path:
        return netns.netns_path(self.server)


@pytest.fixture
def topology() -> Iterator[Topology]:
    n = next(_COUNTER)
    pid = os.getpid()
    octet = 1 + (pid * 7 + n) % 250
    names = [f"alinpod-{pid}-{n}-{role}" for role in ("node", "client", "server")]
    node, client, server = names
    topo = Topology(node, client, server, f"10.248.{octet}.2", f"10.247.{octet}.2")
    with network_namespaces(names):
        in_netns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for index, (pod, pod_ip) in enumerate(((client, topo.client_ip),
                                               (server, topo.server_ip))):
            gateway = pod_ip.rsplit(".", 1)[0] + ".1"
            node_end, pod_end = f"aln{pid % 10000}{n}{index}", "eth0"
            # Made inside the node namespace, one end moved into the pod: never in the host.
            ip("-n", node, "link", "add", node_end, "type", "veth", "peer", "name", pod_end,
               "netns", pod)
            ip("-n", node, "addr", "add", f"{gateway}/24", "dev", node_end)
            ip("-n", node, "link", "set", node_end, "up")
            ip("-n", pod, "addr", "add", f"{pod_ip}/24", "dev", pod_end)
            ip("-n", pod, "link", "set", pod_end, "up")
            ip("-n", pod, "route", "add", "default", "via", gateway)
        yield topo


def _cluster_yaml(topo: Topology, node_address: str) -> str:
    pods = []
    for name, pod_ip in (("client", topo.client_ip), ("server", topo.server_ip)):
        pods.append(f"""\
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: demo}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  labels: {{app: {name}}}
spec:
  nodeName: node-1
  serviceAccountName: {name}
  containers: [{{name: app, image: example}}]
status:
  phase: Running
  podIP: {pod_ip}
  podIPs: [{{ip: {pod_ip}}}]
  conditions: [{{type: Ready, status: "True"}}]
""")
    return f"""\
apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status:
  addresses: [{{type: InternalIP, address: {node_address}}}]
---
""" + "---\n".join(pods)


def _namespace_yaml(enrolled: bool) -> str:
    label = "\n  labels: {istio.io/dataplane-mode: ambient}" if enrolled else ""
    return f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo{label}\n"


DENY_CLIENT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
"""


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


@dataclass
class Running:
    topo: Topology
    root: Path
    ztunnel: Ztunnel
    netns_map: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def write_map(self, pods: dict[str, Path]) -> None:
        _write(self.netns_map, json.dumps({uid: str(p) for uid, p in pods.items()}))

    async def captured(self) -> set[str]:
        assert self.ztunnel.inpod is not None
        await self.ztunnel.inpod.wait_reconciled()
        return {pod["uid"] for pod in self.ztunnel.inpod.status()["captured"]}

    async def wait_captured(self, wanted: set[str]) -> None:
        with trio.fail_after(_TIMEOUT):
            while await self.captured() != wanted:
                await trio.sleep(0.05)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(trust_env=False) as client:
            address = self.ztunnel.config.node_address
            response = await client.get(f"http://{address}:15020/metrics")
        response.raise_for_status()
        return response.text

    async def wait_policy(self, name: str, present: bool) -> None:
        with trio.fail_after(_TIMEOUT):
            while (name in json.dumps(self.ztunnel.state.dump()["policies"])) != present:
                await trio.sleep(0.05)


async def _serve_echo(topo: Topology, nursery: trio.Nursery) -> None:
    """The server pod's app: a TCP echo bound inside its namespace, knowing nothing of us."""
    listeners = await netns.open_tcp_listeners_in(topo.server_path, ECHO_PORT, topo.server_ip)

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    nursery.start_soon(trio.serve_listeners, echo, listeners)


def _plain_client(path: Path, host: str, port: int, payload: bytes) -> bytes:
    """An unmodified client: the stdlib, in the client pod's namespace, no proxy settings."""
    with netns.entered(path), socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


async def _client(topo: Topology, payload: bytes = b"hello through the mesh") -> bytes:
    return await trio.to_thread.run_sync(
        _plain_client, topo.client_path, topo.server_ip, ECHO_PORT, payload
    )


def _our_rules(path: Path) -> list[str]:
    saved = subprocess.run(["nsenter", f"--net={path}", "iptables-save"], check=True,
                           capture_output=True, text=True).stdout
    return [line for line in saved.splitlines() if "AMBLITE" in line]


@asynccontextmanager
async def _mesh(topo: Topology, root: Path, loopback: object) -> AsyncIterator[Running]:
    new = loopback.new  # type: ignore[attr-defined]
    istiod_address, node_address = new(), new()
    config_dir = root / "config"
    config_dir.mkdir(parents=True)
    _write(config_dir / "00-namespace.yaml", _namespace_yaml(enrolled=True))
    _write(config_dir / "10-cluster.yaml", _cluster_yaml(topo, node_address))
    token = secrets.token_urlsafe(16)
    (root / "tokens.yaml").write_text(f"node-1: {token}\n")
    netns_map = root / "netns.json"
    async with trio.open_nursery() as nursery:
        istiod = await nursery.start(lambda task_status: run_istiod(IstiodConfig(
            config_dir=config_dir, state_dir=root / "istiod",
            bootstrap_tokens=root / "tokens.yaml", listen_host=istiod_address,
            poll_interval=0.1, log_format="json",
        ), task_status=task_status))
        await _serve_echo(topo, nursery)
        ztunnel = Ztunnel(ZtunnelConfig(
            node="node-1", node_address=node_address, xds_address=(istiod_address, 15012),
            root_cert=root / "istiod" / "root-cert.pem", token=token, connect_timeout=2.0,
            drain_timeout=1.0, log_format="json", capture="inpod", netns_map=netns_map,
            netns_map_poll_interval=0.1,
        ))
        running = Running(topo, root, ztunnel, netns_map)
        running.write_map({CLIENT_UID: topo.client_path, SERVER_UID: topo.server_path})
        await nursery.start(ztunnel.run)
        try:
            await running.wait_captured({CLIENT_UID, SERVER_UID})
            yield running
        finally:
            await ztunnel.shutdown()
            istiod.shutdown()
            nursery.cancel_scope.cancel()


async def test_unmodified_client_is_captured_tunnelled_and_denied_by_policy(
    topology: Topology, tmp_path: Path, loopback: object
) -> None:
    async with _mesh(topology, tmp_path, loopback) as mesh:
        assert _our_rules(topology.client_path) and _our_rules(topology.server_path)
        assert await _client(topology) == b"hello through the mesh"

        text = await mesh.metrics()
        tunnelled = [
            line for line in text.splitlines()
            if line.startswith("istio_tcp_connections_opened_total{")
            and 'connection_security_policy="mutual_tls"' in line
            and f'source_principal="{CLIENT_ID}"' in line
            and f'destination_principal="{SERVER_ID}"' in line
        ]
        # One ztunnel serves both pods: it reports the outbound (source) and inbound
        # (destination) halves of the same tunnel.
        assert {'reporter="source"' in line for line in tunnelled} == {True, False}, text

        _write(mesh.config_dir / "20-deny.yaml", DENY_CLIENT)
        await mesh.wait_policy("deny-client", present=True)
        with pytest.raises(OSError):
            received = await _client(topology)
            # A reset may also surface as an empty answer on some kernels: never an echo.
            if not received:
                raise ConnectionResetError("connection closed without an answer")
        text = await mesh.metrics()
        assert any(
            'response_flags="UAEX"' in line and f'source_principal="{CLIENT_ID}"' in line
            for line in text.splitlines()
            if line.startswith("istio_tcp_connections_opened_total")
        ), text

        (mesh.config_dir / "20-deny.yaml").unlink()
        await mesh.wait_policy("deny-client", present=False)
        assert await _client(topology, b"allowed again") == b"allowed again"


async def test_pods_leaving_and_unenrolling_leave_no_rule_behind(
    topology: Topology, tmp_path: Path, loopback: object
) -> None:
    async with _mesh(topology, tmp_path, loopback) as mesh:
        # Un-enrolling the namespace (tunnel protocol NONE) releases both pods live...
        _write(mesh.config_dir / "00-namespace.yaml", _namespace_yaml(enrolled=False))
        await mesh.wait_captured(set())
        assert _our_rules(topology.client_path) == []
        assert _our_rules(topology.server_path) == []
        # ... and out of the mesh the client reaches the server directly, in plaintext.
        assert await _client(topology, b"plain") == b"plain"

        # Enrolling it again captures the running pods without restarting them.
        _write(mesh.config_dir / "00-namespace.yaml", _namespace_yaml(enrolled=True))
        await mesh.wait_captured({CLIENT_UID, SERVER_UID})
        assert _our_rules(topology.server_path)
        assert await _client(topology, b"meshed") == b"meshed"

        # A pod that leaves the netns map (deleted, as the CNI says) loses its rules.
        mesh.write_map({CLIENT_UID: topology.client_path})
        await mesh.wait_captured({CLIENT_UID})
        assert _our_rules(topology.server_path) == []
        assert _our_rules(topology.client_path)


async def test_shutdown_keeps_the_rules_so_capture_fails_closed(
    topology: Topology, tmp_path: Path, loopback: object
) -> None:
    async with _mesh(topology, tmp_path, loopback) as mesh:
        assert await _client(topology) == b"hello through the mesh"
        await mesh.ztunnel.shutdown()
        # No ztunnel: the rules stay, so the client's connection is refused (its redirect
        # target is gone) rather than sent around the mesh in plaintext.
        assert await rules.installed(topology.client_path)
        with pytest.raises(ConnectionRefusedError):
            await _client(topology)
