"""The chaos harness's side of a scenario: the sizes of a run, the live mesh a scenario
attacks (istiod_lite + two ztunnels + the backend, started with ``bench.mesh``'s helpers
on 127.76.<n>.0/24), the client processes beside it, and what is read from it (RSS from
/proc, each ztunnel's ``/config_dump``). Every process is stopped on the way out, also on
an error or Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.mesh import (
    HTTP_PORT,
    Addresses,
    Processes,
    issue_files,
    pod_doc,
    route_for,
    rss_bytes,
    start_ambient,
    start_backend,
    start_istiod,
    write_yaml,
)
from bench.workers import HTTP_REQUEST, HttpClient, Route, WorkerError
from istiod_lite.ca import CertificateAuthority

NODES = ("node-1", "node-2")
MB = 2**20


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the full run takes ~5 minutes on 2 cores, --quick ~2, --smoke is
    the test suite's proof that the harness works (its numbers mean nothing)."""

    reset_pairs: int
    flood_seconds: float
    flood_latency_seconds: float
    flood_after_seconds: float
    idle_connections: int
    idle_seconds: float
    idle_tunnels: int
    idle_after_close_seconds: float
    transfer_seconds: float
    drain_timeout_seconds: float
    outage_seconds: float
    new_root_watch_seconds: float
    cert_ttl_seconds: int
    rotation_load_seconds: float
    steady_rate: float = 10.0

    @classmethod
    def for_mode(cls, quick: bool, smoke: bool = False) -> Settings:
        if smoke:
            return cls(reset_pairs=100, flood_seconds=1.5, flood_latency_seconds=0.5,
                       flood_after_seconds=0.5, idle_connections=10, idle_seconds=1.0,
                       idle_tunnels=20, idle_after_close_seconds=1.0, transfer_seconds=2.0,
                       drain_timeout_seconds=0.5, outage_seconds=1.0,
                       new_root_watch_seconds=3.0, cert_ttl_seconds=6,
                       rotation_load_seconds=5.0, steady_rate=5.0)
        if quick:
            return cls(reset_pairs=1000, flood_seconds=6.0, flood_latency_seconds=3.0,
                       flood_after_seconds=10.0, idle_connections=50, idle_seconds=5.0,
                       idle_tunnels=500, idle_after_close_seconds=10.0, transfer_seconds=6.0,
                       drain_timeout_seconds=2.0, outage_seconds=3.0,
                       new_root_watch_seconds=15.0, cert_ttl_seconds=20,
                       rotation_load_seconds=16.0)
        return cls(reset_pairs=3000, flood_seconds=10.0, flood_latency_seconds=5.0,
                   flood_after_seconds=10.0, idle_connections=300, idle_seconds=15.0,
                   idle_tunnels=5000, idle_after_close_seconds=60.0, transfer_seconds=8.0,
                   drain_timeout_seconds=2.0, outage_seconds=5.0, new_root_watch_seconds=30.0,
                   cert_ttl_seconds=120, rotation_load_seconds=90.0)


# -- the mesh under test ----------------------------------------------------------------------


@dataclass
class Mesh:
    """One live mesh: its processes, where they listen, and ways to look at it."""

    procs: Processes
    root: Path
    addresses: Addresses
    pids: dict[str, int]
    _target: dict[str, Any] = field(default_factory=dict)

    def pid(self, node: str) -> int:
        return self.pids[f"ztunnel-{node}"]

    def route(self, port: int = HTTP_PORT) -> dict[str, Any]:
        """Into node-1's ztunnel by SOCKS5 from the client pod, to the server pod's port."""
        return route_for("ambient", self.addresses, port)

    def hbone_target(self) -> dict[str, Any]:
        """For a hostile client: node-2's HBONE listener for the server pod, as the client
        pod's identity (a certificate from the mesh CA through a real CSR)."""
        if not self._target:
            ca = CertificateAuthority.from_plugin_dir(self.root / "istiod-state" / "ca")
            cert, key, bundle = issue_files(ca, self.root / "attacker-pki", "client")
            server = self.addresses.server_pod
            self._target.update(host=server, port=15008, source=self.addresses.client_pod,
                                cert=str(cert), key=str(key), ca=str(bundle),
                                authority=f"{server}:{HTTP_PORT}")
        return self._target

    def probe(self) -> dict[str, Any]:
        """One HTTP exchange through the mesh on a new connection (a new tunnel)."""
        started = time.perf_counter()
        try:
            client = HttpClient(Route.from_json(self.route()).connect(timeout=5.0))
            try:
                client.sock.settimeout(5.0)
                client.exchange(HTTP_REQUEST)
            finally:
                client.close()
        except (OSError, WorkerError) as exc:
            return {"ok": False, "error": repr(exc)}
        return {"ok": True, "ms": (time.perf_counter() - started) * 1e3}

    def config_dump(self, node: str) -> dict[str, Any] | None:
        address = self.addresses.node_1 if node == "node-1" else self.addresses.node_2
        try:
            answer = httpx.get(f"http://{address}:15000/config_dump", timeout=2.0,
                               trust_env=False)
            dump: dict[str, Any] = answer.json()
        except (httpx.HTTPError, ValueError):
            return None
        return dump

    def open_connections(self, node: str) -> float | None:
        """Connections the ztunnel counts as open (its ``istio_tcp_connections_opened``
        minus ``_closed`` over every label set), or None if its metrics do not answer."""
        address = self.addresses.node_1 if node == "node-1" else self.addresses.node_2
        try:
            text = httpx.get(f"http://{address}:15020/metrics", timeout=2.0,
                             trust_env=False).text
        except httpx.HTTPError:
            return None
        totals = {"opened": 0.0, "closed": 0.0}
        for line in text.splitlines():
            for event in totals:
                if line.startswith(f"istio_tcp_connections_{event}_total"):
                    totals[event] += float(line.rsplit(" ", 1)[1])
        return totals["opened"] - totals["closed"]

    def discovery(self) -> dict[str, Any]:
        """Each ztunnel's discovery status (connected, lastError, ...) or None."""
        return {node: (dump or {}).get("discovery") for node in NODES
                for dump in [self.config_dump(node)]}

    def spare_ip(self, last_octet: int) -> str:
        """An address in this mesh's /24 for a pod that does not exist yet."""
        return f"{self.addresses.server_pod.rsplit('.', 1)[0]}.{last_octet}"

    def knows_workload(self, ip: str) -> bool:
        """Both ztunnels have a workload with this address in their config."""
        return all(ip in json.dumps((dump or {}).get("workloads", []))
                   for dump in (self.config_dump(node) for node in NODES))

    def add_probe_pod(self, name: str, ip: str) -> None:
        """A new pod in istiod_lite's config directory: the change a resynced ztunnel sees."""
        write_yaml(self.root / "istiod-config" / f"{name}.yaml",
                   [pod_doc(name, "node-2", ip, "server")])

    def restart(self, name: str, argv: Sequence[str]) -> None:
        """Start ``name`` again with ``argv``; the previous log is kept beside."""
        log = self.procs.log_dir / f"{name}.log"
        if log.exists():
            log.rename(log.with_suffix(f".{time.time():.0f}.log"))
        process = self.procs.start(name, list(argv))
        if name.startswith("ztunnel-"):
            self.pids[name] = process.pid

    def restart_istiod(self, extra_args: Sequence[str] = ()) -> None:
        """istiod_lite again on the same state and config dirs and bootstrap tokens."""
        log = self.procs.log_dir / "istiod.log"
        log.rename(log.with_suffix(f".{time.time():.0f}.log"))
        tokens = yaml.safe_load((self.root / "istiod-tokens.yaml").read_text())
        start_istiod(self.procs, self.root, self.addresses.istiod, tokens,
                     extra_args=extra_args)


# As manifests/base/ztunnel/daemonset.yaml runs ztunnel: glibc's allocator gives a burst's
# memory back (docs/architecture.md, "Hostile peers").
PRODUCTION_ENV = {"PYTHONMALLOC": "malloc"}


def addresses_for(index: int) -> Addresses:
    """127.76.<index>.0/24 for scenario ``index``: away from the bench's, the tests' and
    the demo's addresses, and from the previous scenario's sockets in TIME-WAIT."""
    prefix = f"127.76.{index}"
    return Addresses(istiod=f"{prefix}.9", node_1=f"{prefix}.1", node_2=f"{prefix}.2",
                     client_pod=f"{prefix}.11", server_pod=f"{prefix}.12",
                     envoy_client=f"{prefix}.21", envoy_server=f"{prefix}.22")


@contextmanager
def running_mesh(root: Path, index: int, *, istiod_args: Sequence[str] = (),
                 ztunnel_args: Sequence[str] = ()) -> Iterator[Mesh]:
    """A fresh mesh and backend for one scenario, every process stopped on the way out."""
    root.mkdir(parents=True)
    procs = Processes(root)
    try:
        addresses = addresses_for(index)
        pids = start_ambient(procs, root, addresses, istiod_args=istiod_args,
                             ztunnel_args=ztunnel_args, ztunnel_env=PRODUCTION_ENV)
        start_backend(procs, addresses)
        yield Mesh(procs, root, addresses, pids)
    finally:
        procs.stop_all()


@contextmanager
def background(role: str, args: dict[str, Any], module: str = "bench.attacks"
               ) -> Iterator[subprocess.Popen[str]]:
    """A client process running beside the orchestrator; killed if still running at exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, role, json.dumps(args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def finish(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Close the process's stdin (its signal to stop), wait, and parse its JSON answer."""
    stdout, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"client process failed: {stderr[-2000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


class RssSampler:
    """The peak RSS of some processes, sampled every 0.2 s in a thread while in use."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: rss_bytes(pid) for name, pid in pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], rss_bytes(pid))
                except (OSError, ValueError):  # the process is gone
                    continue

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def peak_mb(self) -> dict[str, float]:
        return {name: value / MB for name, value in self.peak.items()}


def rss_mb(mesh: Mesh) -> dict[str, float]:
    return {f"ztunnel-{node}": rss_bytes(mesh.pid(node)) / MB for node in NODES}


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.25
             ) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(interval)
    return None




def outcome_counts(outcomes: list[list[Any]], phases: Sequence[tuple[str, float]]
                   ) -> dict[str, Any]:
    """A steady load's timestamped outcomes counted per phase (``phases``: name and wall
    start time, ascending; an outcome belongs to the last phase begun before it ended),
    with the first distinct errors."""
    counts = {name: {"new_ok": 0, "new_failed": 0, "keepalive_ok": 0, "keepalive_failed": 0}
              for name, _ in phases}
    errors: list[str] = []
    for moment, kind, ok, error in outcomes:
        phase = phases[0][0]
        for name, start in phases:
            if moment >= start:
                phase = name
        counts[phase][f"{kind}_{'ok' if ok else 'failed'}"] += 1
        if error and error not in errors and len(errors) < 5:
            errors.append(error)
    return {"per_phase": counts, "first_errors": errors}
