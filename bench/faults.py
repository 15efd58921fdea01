"""The chaos harness's process faults (scenarios 5-8): istiod_lite killed or given a new
root CA, node-2's ztunnel terminated under load, certificates that rotate during load.

Each scenario measures a steady load (``bench.attacks`` ``steady``: new tunnels at a fixed
rate plus a few keep-alive connections) or long transfers through the mesh while the fault
happens, and reads the ztunnels' ``/config_dump`` to see when they recovered.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.chaosmesh import (
    NODES,
    Mesh,
    Settings,
    background,
    finish,
    outcome_counts,
    running_mesh,
    wait_for,
)
from bench.mesh import ECHO_PORT, wait_http_ok

KEEPALIVE_CONNECTIONS = 4
RESYNC_TIMEOUT = 60.0


def steady_load(mesh: Mesh, settings: Settings) -> dict[str, Any]:
    return {"route": mesh.route(), "rate": settings.steady_rate, "interval": 0.1,
            "keepalive": KEEPALIVE_CONNECTIONS, "max_seconds": 600.0}


def propagation_seconds(mesh: Mesh, name: str, last_octet: int,
                        timeout: float = RESYNC_TIMEOUT) -> float | None:
    """A new pod file -> both ztunnels have it (None: not within ``timeout``): the control
    plane working end to end."""
    ip = mesh.spare_ip(last_octet)
    mesh.add_probe_pod(name, ip)
    return wait_for(lambda: mesh.knows_workload(ip), timeout)


def istiod_kill(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    """kill -9 istiod_lite under load, restart it after ``outage_seconds``: what failed,
    and when the ztunnels had the control plane back (a new pod reached both)."""
    with running_mesh(root, index) as mesh, background(
            "steady", steady_load(mesh, settings)) as load:
        normal = propagation_seconds(mesh, "probe-before", 13)
        started = time.time()
        time.sleep(2.0)
        istiod = mesh.procs.children["istiod"]
        killed = time.time()
        istiod.kill()
        istiod.wait()
        time.sleep(settings.outage_seconds)
        during_outage = {"discovery": mesh.discovery(), "probe": mesh.probe()}
        restarted = time.time()
        mesh.restart_istiod()
        resync = propagation_seconds(mesh, "probe-after", 14)
        resynced = time.time()
        time.sleep(2.0)
        outcomes = finish(load, 30)["outcomes"]
    return {
        "outage_seconds": settings.outage_seconds,
        "new_pod_propagation_before_kill_s": normal,
        "resync_after_restart_s": resync,
        "during_outage": during_outage,
        "requests": outcome_counts(outcomes, [
            ("before", started), ("outage", killed), ("istiod_restarting", restarted),
            ("resynced", resynced)]),
    }


def ztunnel_sigterm(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    """Long echo transfers through node-2's ztunnel, then SIGTERM it with a short drain
    timeout: how each transfer ended as its client saw it."""
    drain = settings.drain_timeout_seconds
    interval = 0.05
    args: dict[str, Any] = {
        "route": None, "count": 4, "chunks": int(settings.transfer_seconds / interval),
        "chunk_bytes": 16384, "interval": interval, "read_timeout": drain + 10,
    }
    with running_mesh(root, index, ztunnel_args=["--drain-timeout", f"{drain:g}s"]) as mesh:
        args["route"] = mesh.route(ECHO_PORT)
        with background("transfers", args) as transfers:
            time.sleep(settings.transfer_seconds / 4)
            ztunnel = mesh.procs.children["ztunnel-node-2"]
            signalled = time.time()
            ztunnel.send_signal(signal.SIGTERM)
            try:
                exit_code: int | None = ztunnel.wait(drain + 15)
            except subprocess.TimeoutExpired:
                exit_code = None
            exited_after = time.time() - signalled
            ends = finish(transfers, settings.transfer_seconds + drain + 30)["transfers"]
    for end in ends:
        if "ended_at" in end:
            end["ended_after_sigterm_s"] = end.pop("ended_at") - signalled
    return {
        "drain_timeout_seconds": drain, "transfer_seconds": settings.transfer_seconds,
        "ztunnel_exit_code": exit_code, "ztunnel_exited_after_s": exited_after,
        "outcomes": dict(Counter(end["outcome"] for end in ends)), "transfers": ends,
    }


def istiod_new_root(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    """istiod_lite restarted with a new root CA (its state dir wiped; the new
    root-cert.pem lands where the ztunnels' --root-cert points): do the ztunnels find the
    control plane again by themselves, and after a restart?"""
    with running_mesh(root, index) as mesh, background(
            "steady", steady_load(mesh, settings)) as load:
        started = time.time()
        time.sleep(2.0)
        state = root / "istiod-state"
        old_root = (state / "root-cert.pem").read_text()
        istiod = mesh.procs.children["istiod"]
        istiod.terminate()
        istiod.wait(10)
        shutil.rmtree(state)
        changed = time.time()
        mesh.restart_istiod()
        new_root = (state / "root-cert.pem").read_text()
        recovered = propagation_seconds(mesh, "probe-new-root", 13,
                                        settings.new_root_watch_seconds)
        without_restart = {"recovered_s": recovered, "discovery": mesh.discovery(),
                           "probe": mesh.probe()}
        restarted = time.time()
        for node in NODES:
            name = f"ztunnel-{node}"
            ztunnel = mesh.procs.children[name]
            argv = [str(arg) for arg in ztunnel.args]  # type: ignore[union-attr]
            ztunnel.terminate()
            ztunnel.wait(15)
            mesh.restart(name, argv)
        for address in (mesh.addresses.node_1, mesh.addresses.node_2):
            wait_http_ok(f"http://{address}:15021/healthz/ready", mesh.procs, 30)
        after_restart = {"ready_s": time.time() - restarted,
                         "new_pod_seen_s": propagation_seconds(mesh, "probe-restarted", 14),
                         "probe": mesh.probe()}
        ready = time.time()
        time.sleep(2.0)
        outcomes = finish(load, 30)["outcomes"]
    return {
        "root_changed": old_root != new_root,
        "watched_seconds": settings.new_root_watch_seconds,
        "without_ztunnel_restart": without_restart, "after_ztunnel_restart": after_restart,
        "requests": outcome_counts(outcomes, [
            ("before", started), ("new_root", changed), ("ztunnels_restarting", restarted),
            ("after_restart", ready)]),
    }


def cert_rotation(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    """istiod_lite issuing ``cert_ttl_seconds`` certificates (renewed at half-life) under a
    steady load for ``rotation_load_seconds``: failed requests, rotations seen (distinct
    leaf serial numbers per ztunnel and identity, minus one)."""
    ttl = settings.cert_ttl_seconds
    serials: dict[str, set[str]] = {}
    with running_mesh(root, index, istiod_args=["--cert-ttl", f"{ttl}s"]) as mesh, background(
            "steady", steady_load(mesh, settings)) as load:
        started = time.time()
        while time.time() - started < settings.rotation_load_seconds:
            for node in NODES:
                for cert in (mesh.config_dump(node) or {}).get("certificates", []):
                    if cert.get("certChain"):
                        serials.setdefault(f"{node} {cert['identity']}", set()).add(
                            cert["certChain"][0]["serialNumber"])
            time.sleep(1.0)
        outcomes = finish(load, 30)["outcomes"]
    return {
        "cert_ttl_seconds": ttl, "load_seconds": settings.rotation_load_seconds,
        "rotations": {key: len(seen) - 1 for key, seen in sorted(serials.items())},
        "requests": outcome_counts(outcomes, [("load", started)]),
    }
