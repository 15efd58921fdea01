"""Scenario 6 of issue 6: HTTP through an L7 proxy — our waypoint vs Envoy as the waypoint.

Topology (all real processes, loopback 127.71.6.0 .. 127.71.9.255): the load generator on
the client pod (node-1) sends 1 KB HTTP/1.1 requests to a Service VIP on port 8000 through
node-1's ztunnel (SOCKS5); the server pod (node-2) runs the 1 KB keep-alive backend. Three
Services select that pod and differ only in their ``istio.io/use-waypoint`` label:

- ``no_waypoint`` (Service ``web``): client -> ztunnel node-1 -> HBONE -> ztunnel node-2 ->
  backend. The baseline: "added" latency is over this path.
- ``waypoint`` (Service ``web-waypoint``): ... ztunnel node-1 -> HBONE -> **our waypoint**
  (``python -m waypoint``, Gateway bench/waypoint) -> HBONE -> ztunnel node-2 -> backend.
- ``envoy`` (Service ``web-envoy``): the same, with **Envoy** as the waypoint of Gateway
  bench/envoy-waypoint (``envoyconf.waypoint_config``: HBONE listener terminating CONNECT ->
  internal listener with an HTTP connection manager -> internal listener originating
  CONNECT over h2 + TLS 1.3 mTLS to node-2's ztunnel; its certificate for
  ns/bench/sa/envoy-waypoint signed through a real CSR by the same CA). The ztunnels treat
  it as they treat ours: istiod_lite names it the Service's waypoint, node-1 dials it and
  checks its SPIFFE id.

Both L7 proxies run one worker (Envoy ``--concurrency 1``, the waypoint one Trio thread),
sit between the same two ztunnels and keep HTTP/1.1 upstream connections alive. Envoy runs
only the router filter (no stats/RBAC/telemetry filters), our waypoint its whole pipeline
(authz, routing, metrics), so Envoy's figures are a lower bound for a production waypoint.

Measured, interleaved per repetition: the rate at saturation (closed loop, 8 and 16
keep-alive connections) and p50/p90/p99 at a fixed open-loop rate (500 rps: a third of our
waypoint's saturation here, so its queueing stays small), with CPU and RSS of the L7 proxy
and both ztunnels, and the tunnels each proxy opened to the server pod (its upstream
connection reuse, from node-2's ztunnel metrics).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from ambient_api.identity import SpiffeId
from bench import envoyconf
from bench.mesh import (
    HTTP_PORT,
    NAMESPACE,
    Addresses,
    Meter,
    Processes,
    issue_files,
    rss_bytes,
    run_worker,
    start_ambient,
    start_backend,
    wait_http_ok,
)
from bench.workers import Route, WorkerError, open_clients
from istiod_lite.ca import CertificateAuthority
from istiod_lite.labels import WAYPOINT_GATEWAY_CLASS

SYSTEMS = ("no_waypoint", "waypoint", "envoy")
ADDRESSES = Addresses(istiod="127.71.6.9", node_1="127.71.6.1", node_2="127.71.6.2",
                      client_pod="127.71.7.1", server_pod="127.71.7.2")
WAYPOINT_ADDRESS = "127.71.8.1"
ENVOY_WAYPOINT_ADDRESS = "127.71.8.2"
# system -> (Service name, its VIP)
SERVICES = {
    "no_waypoint": ("web", "127.71.9.1"),
    "waypoint": ("web-waypoint", "127.71.9.2"),
    "envoy": ("web-envoy", "127.71.9.3"),
}
# system -> its L7 proxy: process name, Gateway name and service account alike
L7_PROXY = {"waypoint": "waypoint", "envoy": "envoy-waypoint"}
# Who node-2's ztunnel sees opening the tunnels to the backend, per system.
UPSTREAM_ACCOUNT = {"no_waypoint": "client", **L7_PROXY}
OPENED = "istio_tcp_connections_opened_total"
FIXED_RPS = 500
# Closed-loop concurrency: 8 and 16 keep-alive client connections.
SATURATION_CONNECTIONS = (8, 16)
RATE_CONNECTIONS = 4


def gateway_doc(name: str, address: str) -> dict[str, Any]:
    """An istio-waypoint Gateway at a fixed loopback address (the embedded mode's
    ``spec.addresses``), as ``istioctl waypoint generate`` writes it."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": WAYPOINT_GATEWAY_CLASS,
                 "addresses": [{"type": "IPAddress", "value": address}],
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }


def service_doc(name: str, vip: str, waypoint: str | None) -> dict[str, Any]:
    """An HTTP Service on port 8000 selecting the server pod, through ``waypoint`` if set."""
    labels = {"istio.io/use-waypoint": waypoint} if waypoint else {}
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {"selector": {"app": "server"}, "clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT,
                            "appProtocol": "http"}]},
    }


def mesh_docs() -> list[dict[str, Any]]:
    """The scenario's objects beside the client and server pods: both waypoint Gateways
    (and their accounts) and one Service per system."""
    accounts = [{"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": name, "namespace": NAMESPACE}}
                for name in L7_PROXY.values()]
    return [
        *accounts,
        gateway_doc("waypoint", WAYPOINT_ADDRESS),
        gateway_doc("envoy-waypoint", ENVOY_WAYPOINT_ADDRESS),
        *(service_doc(name, vip, L7_PROXY.get(system))
          for system, (name, vip) in SERVICES.items()),
    ]


def route_for(system: str) -> dict[str, Any]:
    """The client pod's way in: node-1's SOCKS5 port, to the system's Service VIP."""
    return {"kind": "socks", "host": ADDRESSES.node_1, "port": 15080,
            "source": ADDRESSES.client_pod, "dest_host": SERVICES[system][1],
            "dest_port": HTTP_PORT}


def wait_routable(system: str, procs: Processes, timeout: float = 30.0) -> None:
    """Until one request through ``system``'s path gets the backend's answer (the ztunnels
    and the waypoint learn the Services and Gateways from istiod_lite asynchronously)."""
    route = Route.from_json(route_for(system))
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        try:
            for client in open_clients(route, 1):
                client.close()
            return
        except (OSError, WorkerError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system} path not working after {timeout}s: {exc!r}"
                                   ) from exc
            time.sleep(0.2)


def tunnels_opened(metrics: str, service_account: str) -> float:
    """How many tunnels node-2's ztunnel accepted from ns/bench/sa/<service_account>, from
    its Prometheus text (``OPENED`` samples reported by the destination)."""
    principal = f'source_principal="spiffe://cluster.local/ns/{NAMESPACE}/sa/{service_account}"'
    total = 0.0
    for line in metrics.splitlines():
        if (line.startswith(OPENED + "{") and 'reporter="destination"' in line
                and principal in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


class TunnelCounter:
    """Tunnels into the server pod opened during one measurement: the L7 proxy's upstream
    connections (one per HTTP/1.1 connection it keeps), so connection reuse is visible."""

    def __init__(self, system: str) -> None:
        self.account = UPSTREAM_ACCOUNT[system]
        self.before = self._read()

    def _read(self) -> float:
        url = f"http://{ADDRESSES.node_2}:15020/metrics"
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            response = client.get(url)
        response.raise_for_status()
        return tunnels_opened(response.text, self.account)

    def read(self) -> float:
        return self._read() - self.before


def per_request_costs(proxies: dict[str, dict[str, float]], rps: float) -> None:
    for usage in proxies.values():
        usage["vcpu_per_1000_rps"] = usage["vcpu"] * 1000 / rps if rps else 0.0


def measure_saturation(system: str, pids: dict[str, int], seconds: float, *,
                       connections: int) -> dict[str, Any]:
    tunnels, meter = TunnelCounter(system), Meter(pids)
    result = run_worker("closed", {"route": route_for(system), "connections": connections,
                                   "duration": seconds})
    proxies = meter.read()
    per_request_costs(proxies, result["rps"])
    return {**result, "upstream_tunnels_opened": tunnels.read(), "proxies": proxies}


def measure_fixed_rate(system: str, pids: dict[str, int], seconds: float) -> dict[str, Any]:
    tunnels, meter = TunnelCounter(system), Meter(pids)
    result = run_worker("rate", {"route": route_for(system), "rps": FIXED_RPS,
                                 "connections": RATE_CONNECTIONS, "duration": seconds})
    proxies = meter.read()
    rate = result["requests"] / result["seconds"]
    per_request_costs(proxies, rate)
    return {**result, "achieved_rps": rate, "upstream_tunnels_opened": tunnels.read(),
            "proxies": proxies}


def start_waypoint(procs: Processes, root: Path) -> int:
    """Our waypoint for Gateway bench/waypoint as a process, once ready."""
    process = procs.start("waypoint", [
        sys.executable, "-m", "waypoint", "--name", "waypoint", "--namespace", NAMESPACE,
        "--address", WAYPOINT_ADDRESS, "--xds-address", f"{ADDRESSES.istiod}:15012",
        "--root-cert", str(root / "istiod-state" / "root-cert.pem"),
        "--token-file", str(root / "token-waypoint"),
        "--log-format", "json", "--log-level", "warning",
    ])
    wait_http_ok(f"http://{WAYPOINT_ADDRESS}:15021/healthz/ready", procs, 30)
    return process.pid


def envoy_waypoint_config(root: Path) -> envoyconf.Config:
    ca = CertificateAuthority.from_plugin_dir(root / "istiod-state" / "ca")
    cert, key, bundle = issue_files(ca, root / "envoy-pki", "envoy-waypoint")
    return envoyconf.waypoint_config(
        ENVOY_WAYPOINT_ADDRESS, admin_port=15900, cert_path=cert, key_path=key,
        ca_path=bundle, backend_authority=f"{ADDRESSES.server_pod}:{HTTP_PORT}",
        backend_hbone=(ADDRESSES.server_pod, 15008),
        backend_identity=SpiffeId("cluster.local", NAMESPACE, "server"),
    )


async def run_waypoint(repetitions: int, seconds: float, root: Path,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """The whole scenario on its own mesh; results per system, every repetition."""
    root.mkdir(parents=True)
    procs = Processes(root)
    try:
        ztunnels = start_ambient(procs, root, ADDRESSES, extra_docs=mesh_docs(),
                                 waypoint_accounts=["waypoint"])
        start_backend(procs, ADDRESSES)
        waypoint_pid = start_waypoint(procs, root)
        directory = root / "envoy-waypoint"
        directory.mkdir()
        async with envoyconf.run_envoy(
            envoy_waypoint_config(root), directory, admin=(ENVOY_WAYPOINT_ADDRESS, 15900),
            wait_for=[(ENVOY_WAYPOINT_ADDRESS, 15008)],
        ) as envoy:
            pids = {"no_waypoint": dict(ztunnels),
                    "waypoint": {**ztunnels, "waypoint": waypoint_pid},
                    "envoy": {**ztunnels, "envoy-waypoint": envoy.process.pid}}
            idle = {"waypoint": rss_bytes(waypoint_pid) / 2**20,
                    "envoy-waypoint": rss_bytes(envoy.process.pid) / 2**20}
            for system in SYSTEMS:
                wait_routable(system, procs)
            plan: list[tuple[str, Callable[[str, dict[str, int], float], dict[str, Any]]]] = [
                (f"waypoint_saturation_{n}conn", partial(measure_saturation, connections=n))
                for n in SATURATION_CONNECTIONS
            ]
            plan.append((f"waypoint_{FIXED_RPS}rps", measure_fixed_rate))
            results: dict[str, Any] = {name: {system: [] for system in SYSTEMS}
                                       for name, _ in plan}
            for repetition in range(repetitions):
                for name, measure in plan:
                    for system in SYSTEMS:  # interleaved: drift hits every system alike
                        procs.check_alive()
                        log(f"rep {repetition + 1}/{repetitions} {name} {system}")
                        results[name][system].append(measure(system, pids[system], seconds))
            procs.check_alive()
            results["waypoint_idle_rss_mb"] = idle
    finally:
        procs.stop_all()
    return results
