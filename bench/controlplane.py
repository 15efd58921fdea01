"""Control-plane scenario: istiod_lite (a real process) serving N pods on 100 nodes and M
services to S simulated subscribers (bench/subscribers.py, in two processes): time to full
sync, time from a pod change (a new pod file) to every subscriber having it, and istiod's
memory. The file source polls every 20 ms here; that poll bounds the propagation figure."""

from __future__ import annotations

import json
import queue
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ambient_common.files import write_atomically
from bench.mesh import (
    Processes,
    _doc,
    namespace_doc,
    node_doc,
    pod_doc,
    rss_bytes,
    start_istiod,
    wait_http_ok,
    write_yaml,
)
from bench.workers import percentile

ISTIOD = "127.71.5.9"
SYNC_TIMEOUT = 150.0  # seconds for every subscriber's first (full) update
PROBE_TIMEOUT = 60.0  # seconds for one change to reach every synced subscriber
NODES = 100


def cluster_documents(pods: int, services: int) -> list[dict[str, Any]]:
    """``pods`` pods spread over 100 nodes, ``services`` services selecting them evenly."""
    docs: list[dict[str, Any]] = [namespace_doc(), _doc("ServiceAccount", "app", "bench")]
    docs += [node_doc(f"node-{n}", f"127.72.0.{n + 1}") for n in range(NODES)]
    for index in range(pods):
        ip = f"127.73.{index // 250}.{index % 250 + 1}"
        docs.append(pod_doc(f"pod-{index}", f"node-{index % NODES}", ip, "app",
                            {"app": f"svc-{index % services}"}))
    for index in range(services):
        vip = f"127.74.{index // 250}.{index % 250 + 1}"
        docs.append(_doc("Service", f"svc-{index}", "bench", spec={
            "selector": {"app": f"svc-{index}"}, "clusterIP": vip, "clusterIPs": [vip],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}))
    return docs


def run_control_plane(root: Path, *, pods: int, services: int, subscribers: int,
                      probes: int) -> dict[str, Any]:
    config = root / "istiod-config"
    config.mkdir(parents=True)
    write_yaml(config / "cluster.yaml", cluster_documents(pods, services))
    tokens = {f"node-{n}": secrets.token_urlsafe(24) for n in range(NODES)}
    procs = Processes(root)
    try:
        loading = time.time()
        state = start_istiod(procs, root, ISTIOD, tokens, poll_interval="20ms")
        istiod_pid = procs.children["istiod"].pid
        wait_http_ok(f"https://{ISTIOD}:15012/ready", procs, 120,
                     verify=str(state / "root-cert.pem"))
        ready_seconds = time.time() - loading
        rss_ready = rss_bytes(istiod_pid)
        nodes = [(f"node-{n % NODES}", tokens[f"node-{n % NODES}"]) for n in range(subscribers)]
        halves = [nodes[: len(nodes) // 2], nodes[len(nodes) // 2:]]
        started = time.time()
        workers = []
        for index, half in enumerate(h for h in halves if h):
            args_file = root / f"subscribers-{index}.json"  # tokens stay out of argv
            write_atomically(args_file, json.dumps({
                "url": f"https://{ISTIOD}:15012", "root_cert": str(state / "root-cert.pem"),
                "nodes": half, "max_seconds": SYNC_TIMEOUT + probes * PROBE_TIMEOUT}))
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "bench.subscribers", str(args_file)],
                stdout=subprocess.PIPE, text=True))
        events: list[dict[str, Any]] = []
        try:
            synced = _collect(workers, events, lambda e: "synced" in e, subscribers,
                              SYNC_TIMEOUT)
            if not synced:
                raise RuntimeError("no subscriber received its first update")
            last_synced = max(e["at"] for e in synced)
            full_sync_from_spawn = last_synced - started
            # From the first subscriber process starting to connect (after its imports).
            connecting = min((e["started"] for e in events if "started" in e), default=started)
            full_sync = last_synced - connecting
            rss_synced = rss_bytes(istiod_pid)
            # Each process decodes one full update once all its subscribers synced; wait for
            # that to be over so that it does not slow the probes' deliveries.
            decoded = _collect(workers, events, lambda e: "decoded" in e, len(workers),
                               SYNC_TIMEOUT)
            per_probe: list[float] = []
            timed_out_probes = 0
            deliveries: list[float] = []
            for probe in range(probes):
                name = f"bench-probe-{probe}"
                written = time.time()
                write_yaml(config / f"{name}.yaml", [pod_doc(
                    name, f"node-{probe % NODES}", f"127.75.0.{probe + 1}", "app")])
                seen = _collect(workers, events, lambda e, n=name: e.get("probe") == n,
                                len(synced), PROBE_TIMEOUT)
                delays = [e["at"] - written for e in seen]
                deliveries += delays
                if len(seen) < len(synced):
                    timed_out_probes += 1
                    per_probe.append(PROBE_TIMEOUT)
                elif delays:
                    per_probe.append(max(delays))
            deliveries.sort()
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
        errors = [e for e in events if "error" in e]
        return {
            "pods": pods, "services": services, "subscribers": subscribers,
            "subscribers_synced": len(synced), "sync_timeout_seconds": SYNC_TIMEOUT,
            "probes_timed_out": timed_out_probes, "error_samples": [e["error"] for e in errors[:3]],
            "istiod_ready_seconds": ready_seconds, "full_sync_seconds": full_sync,
            "full_sync_from_process_spawn_seconds": full_sync_from_spawn,
            "first_update_resources": decoded[0]["resources"] if decoded else None,
            "first_update_bytes": synced[0]["bytes"],
            "propagation_all_subscribers_ms": {
                "p50": statistics.median(per_probe) * 1e3,
                "p99": percentile(sorted(per_probe), 99) * 1e3, "samples": len(per_probe)},
            "propagation_per_delivery_ms": {
                "p50": percentile(deliveries, 50) * 1e3, "p99": percentile(deliveries, 99) * 1e3},
            "istiod_rss_mb": {"ready": rss_ready / 2**20, "synced": rss_synced / 2**20,
                              "end": rss_bytes(istiod_pid) / 2**20},
            "poll_interval_ms": 20, "errors": len(errors),
        }
    finally:
        procs.stop_all()


def _collect(workers: list[subprocess.Popen[str]], events: list[dict[str, Any]],
             wanted: Any, count: int, timeout: float) -> list[dict[str, Any]]:
    """Take subscriber events (read by one thread per worker into a queue) until ``count``
    match ``wanted`` or ``timeout`` passes (fewer are returned); all are kept in ``events``."""
    feed = _feeds.get(id(workers))
    if feed is None:
        feed = _feeds[id(workers)] = queue.Queue()
        for worker in workers:
            threading.Thread(target=_pump, args=(worker, feed), daemon=True).start()
    matched = [e for e in events if wanted(e)]
    deadline = time.monotonic() + timeout
    while len(matched) < count:
        remaining = deadline - time.monotonic()
        try:
            event = feed.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            break  # the caller reports how many got there
        events.append(event)
        if wanted(event):
            matched.append(event)
    return matched


_feeds: dict[int, queue.Queue[dict[str, Any]]] = {}


def _pump(worker: subprocess.Popen[str], feed: queue.Queue[dict[str, Any]]) -> None:
    assert worker.stdout is not None
    for line in worker.stdout:
        if line.strip():
            feed.put(json.loads(line))
