"""The systems under test, each a set of real processes on loopback: ambient-lite (istiod_lite
and two ztunnels, ``python -m``), an Envoy HBONE pair with certificates from the same CA,
and the backends. Also the per-process CPU/RSS readers (/proc) and the load-generator
runner."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from ambient_api.identity import SpiffeId
from ambient_common.files import write_atomically
from ambient_dataplane.identity import new_key_and_csr
from bench import envoyconf
from istiod_lite.ca import CertificateAuthority
from istiod_lite.csr import check_csr

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NAMESPACE = "bench"
SINK_PORT, HTTP_PORT, ECHO_PORT = 9000, 8000, 7000


@dataclass(frozen=True)
class Addresses:
    """Loopback addresses for one run (127.71.x.y: away from the tests' and the demo's)."""

    istiod: str = "127.71.0.9"
    node_1: str = "127.71.0.1"
    node_2: str = "127.71.0.2"
    client_pod: str = "127.71.1.1"
    server_pod: str = "127.71.1.2"
    envoy_client: str = "127.71.2.1"
    envoy_server: str = "127.71.2.2"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def run_worker(role: str, args: dict[str, Any], timeout: float = 120.0,
               module: str = "bench.workers") -> dict[str, Any]:
    """One load-generator process (``python -m <module> <role> '<json>'``, the chaos
    harness's hostile clients are ``bench.attacks``); its JSON answer (its CPU is not the
    proxies')."""
    done = subprocess.run(
        [sys.executable, "-m", module, role, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{role} worker failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class Meter:
    """CPU seconds and RSS of the proxy processes around one measurement."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.wall = time.perf_counter()

    def read(self) -> dict[str, dict[str, float]]:
        wall = time.perf_counter() - self.wall
        return {
            name: {"cpu_seconds": cpu_seconds(pid) - self.cpu[name],
                   "vcpu": (cpu_seconds(pid) - self.cpu[name]) / wall,
                   "rss_mb": rss_bytes(pid) / 2**20}
            for name, pid in self.pids.items()
        }


def _doc(kind: str, name: str, namespace: str | None = None, **rest: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": kind, "metadata": metadata, **rest}


def node_doc(name: str, address: str) -> dict[str, Any]:
    return _doc("Node", name, status={"addresses": [{"type": "InternalIP", "address": address}]})


def pod_doc(name: str, node: str, ip: str, service_account: str,
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    pod = _doc(
        "Pod", name, NAMESPACE,
        spec={"nodeName": node, "serviceAccountName": service_account,
              "containers": [{"name": "app", "image": "bench"}]},
        status={"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]},
    )
    pod["metadata"]["labels"] = labels or {"app": name}
    return pod


def namespace_doc() -> dict[str, Any]:
    doc = _doc("Namespace", NAMESPACE)
    doc["metadata"]["labels"] = {"istio.io/dataplane-mode": "ambient"}
    return doc


def write_yaml(path: Path, docs: list[dict[str, Any]]) -> None:
    """Atomically: istiod_lite's file source polls the directory and must never read half."""
    write_atomically(path, yaml.safe_dump_all(docs, sort_keys=False), mode=0o644)


class Processes:
    """Children started with Popen, logs to files, always terminated then killed."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        kwargs.setdefault("stdout", log)
        process = subprocess.Popen(argv, stderr=log, **kwargs)
        self.children[name] = process
        return process

    def check_alive(self) -> None:
        for name, process in self.children.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see "
                                   f"{self.log_dir / (name + '.log')}")

    def stop_all(self) -> None:
        for process in self.children.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 5
        for process in self.children.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_istiod(procs: Processes, root: Path, listen: str, tokens: dict[str, str],
                 poll_interval: str = "500ms", name: str = "istiod",
                 timeout: float = 30.0, extra_args: Sequence[str] = ()) -> Path:
    """istiod_lite as a process; returns its state dir once root-cert.pem exists (written
    before the config is loaded; the caller waits for readiness its own way).
    ``extra_args`` are more istiod_lite flags (e.g. ``--cert-ttl``)."""
    state = root / f"{name}-state"
    write_atomically(root / f"{name}-tokens.yaml", yaml.safe_dump(tokens))
    procs.start(name, [
        sys.executable, "-m", "istiod_lite", "--config-dir", str(root / f"{name}-config"),
        "--state-dir", str(state), "--bootstrap-tokens", str(root / f"{name}-tokens.yaml"),
        "--listen", f"{listen}:15012", "--log-format", "json", "--log-level", "warning",
        "--poll-interval", poll_interval, *extra_args,
    ])
    deadline = time.monotonic() + timeout
    while not (state / "root-cert.pem").exists():
        procs.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} wrote no root-cert.pem within {timeout}s")
        time.sleep(0.05)
    return state


def wait_http_ok(url: str, procs: Processes, timeout: float, verify: Any = False) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=verify, trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            procs.check_alive()
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def service_account_principal(service_account: str) -> str:
    """istiod_lite's bootstrap-token principal for a waypoint running as bench/<account>."""
    return f"serviceaccount:{NAMESPACE}/{service_account}"


def start_ambient(procs: Processes, root: Path, addresses: Addresses, *,
                  extra_docs: Sequence[dict[str, Any]] = (),
                  waypoint_accounts: Sequence[str] = (), istiod_args: Sequence[str] = (),
                  ztunnel_args: Sequence[str] = (),
                  ztunnel_env: Mapping[str, str] | None = None) -> dict[str, int]:
    """istiod_lite + ztunnel on node-1 (client pod) and node-2 (server pod); returns the
    ztunnels' pids once both are ready. ``extra_docs`` join the mesh's objects; each of
    ``waypoint_accounts`` gets a bootstrap token in ``root/token-<account>`` for a
    waypoint process running as that service account. ``istiod_args`` and ``ztunnel_args``
    are more flags for those processes (the chaos harness's TTLs and drain timeouts), and
    ``ztunnel_env`` more environment for the ztunnels (the chaos harness runs them as the
    DaemonSet does, with ``PYTHONMALLOC=malloc``)."""
    config = root / "istiod-config"
    config.mkdir(parents=True)
    write_yaml(config / "mesh.yaml", [
        namespace_doc(),
        node_doc("node-1", addresses.node_1), node_doc("node-2", addresses.node_2),
        _doc("ServiceAccount", "client", NAMESPACE), _doc("ServiceAccount", "server", NAMESPACE),
        pod_doc("client", "node-1", addresses.client_pod, "client"),
        pod_doc("server", "node-2", addresses.server_pod, "server"),
        *extra_docs,
    ])
    principals = {"node-1": "node-1", "node-2": "node-2"}
    principals.update({account: service_account_principal(account)
                       for account in waypoint_accounts})
    tokens = {principal: secrets.token_urlsafe(24) for principal in principals.values()}
    for name, principal in principals.items():
        write_atomically(root / f"token-{name}", tokens[principal])
    state = start_istiod(procs, root, addresses.istiod, tokens, extra_args=istiod_args)
    pids = {}
    for node, address in (("node-1", addresses.node_1), ("node-2", addresses.node_2)):
        process = procs.start(f"ztunnel-{node}", [
            sys.executable, "-m", "ztunnel", "--node", node, "--node-address", address,
            "--xds-address", f"{addresses.istiod}:15012",
            "--root-cert", str(state / "root-cert.pem"), "--token-file",
            str(root / f"token-{node}"), "--log-format", "json", "--log-level", "warning",
            *ztunnel_args,
        ], env={**os.environ, **ztunnel_env} if ztunnel_env else None)
        pids[f"ztunnel-{node}"] = process.pid
    for address in (addresses.node_1, addresses.node_2):
        wait_http_ok(f"http://{address}:15021/healthz/ready", procs, 30)
    return pids


def start_backend(procs: Processes, addresses: Addresses) -> None:
    """The sink, 1 KB HTTP and echo servers on the server pod's address, once listening."""
    backend = procs.start("backend", [
        sys.executable, "-m", "bench.workers", "backend", json.dumps({
            "host": addresses.server_pod, "sink_port": SINK_PORT, "http_port": HTTP_PORT,
            "echo_port": ECHO_PORT})], stdout=subprocess.PIPE)
    assert backend.stdout is not None
    if not backend.stdout.readline():
        raise RuntimeError(f"backend did not start; see {procs.log_dir / 'backend.log'}")


def issue_files(ca: CertificateAuthority, directory: Path, service_account: str
                ) -> tuple[Path, Path, Path]:
    """A workload certificate for ns/bench/sa/<service_account> through a real CSR."""
    identity = SpiffeId("cluster.local", NAMESPACE, service_account)
    key_pem, csr_pem = new_key_and_csr(identity)
    chain = ca.sign_csr(check_csr(csr_pem))
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, bundle = (directory / f"{service_account}.{suffix}.pem"
                         for suffix in ("cert", "key", "ca"))
    cert.write_text("".join(chain[:-1]) if len(chain) > 1 else chain[0])
    write_atomically(key, key_pem)
    bundle.write_text("".join(ca.trust_bundle))
    return cert, key, bundle


def envoy_configs(root: Path, addresses: Addresses) -> tuple[envoyconf.Config, envoyconf.Config]:
    """The Envoy pair doing the ztunnels' job: client listeners (one per backend port,
    tcp_proxy tunnelling CONNECT <server pod>:<port>) -> mTLS h2 -> server HBONE listener ->
    ORIGINAL_DST from :authority. Same CA and identities as the ztunnels'."""
    ca = CertificateAuthority.from_plugin_dir(root / "istiod-state" / "ca")
    pem = root / "envoy-pki"
    client_files = issue_files(ca, pem, "client")
    server_files = issue_files(ca, pem, "server")
    server = envoyconf.bootstrap(
        addresses.envoy_server, 15900,
        listeners=[envoyconf.hbone_server_listener(
            "hbone", addresses.envoy_server, 15008, cert_path=server_files[0],
            key_path=server_files[1], ca_path=server_files[2],
        )],
        clusters=[envoyconf.original_dst_cluster()],
    )
    client = envoyconf.bootstrap(
        addresses.envoy_client, 15900,
        listeners=[
            envoyconf.hbone_client_listener(
                f"to_{port}", addresses.envoy_client, port,
                target_authority=f"{addresses.server_pod}:{port}", hbone_cluster="hbone",
            )
            for port in (SINK_PORT, HTTP_PORT, ECHO_PORT)
        ],
        clusters=[envoyconf.hbone_upstream_cluster(
            "hbone", addresses.envoy_server, 15008, cert_path=client_files[0],
            key_path=client_files[1], ca_path=client_files[2],
            server_identity=SpiffeId("cluster.local", NAMESPACE, "server"),
        )],
    )
    return client, server


def route_for(system: str, addresses: Addresses, port: int) -> dict[str, Any]:
    """How the load generator reaches backend ``port`` on the server pod through ``system``."""
    if system == "none":
        return {"kind": "direct", "host": addresses.server_pod, "port": port,
                "source": addresses.client_pod}
    if system == "envoy":
        return {"kind": "direct", "host": addresses.envoy_client, "port": port,
                "source": addresses.client_pod}
    if system == "ambient":
        return {"kind": "socks", "host": addresses.node_1, "port": 15080,
                "source": addresses.client_pod, "dest_host": addresses.server_pod,
                "dest_port": port}
    raise ValueError(f"unknown system {system!r}")
