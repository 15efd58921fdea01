"""``python -m bench.chaos [--quick|--smoke] [--only NAME ...] [--output FILE]``: the
reliability harness (issue 11, ``make chaos``; never part of ``make test``).

Each scenario starts its own live mesh (``bench.chaosmesh``), attacks it or injects a
fault, and records what the mesh did: figures, not pass/fail, so the next hardening change
can be judged by them. Hostile clients (1-3) and loads run as processes of their own
(``bench.attacks``, ``bench.workers``); the process faults (5-8) are in ``bench.faults``.
Results go to ``bench/results/chaos-<timestamp>.json``; docs/reliability.md reads them.
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import faults
from bench.chaosmesh import (
    NODES,
    RssSampler,
    Settings,
    background,
    finish,
    rss_mb,
    running_mesh,
)
from bench.mesh import ECHO_PORT, Meter, run_worker
from bench.run import RESULTS_DIR, machine_facts

# -- 1-4: hostile clients and idle load -------------------------------------------------------


def rapid_reset(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    with running_mesh(root, index) as mesh:
        before = mesh.probe()
        rss_before = rss_mb(mesh)["ztunnel-node-2"]
        meter = Meter({"ztunnel-node-2": mesh.pid("node-2")})
        attack = run_worker("rapid_reset", {
            "target": mesh.hbone_target(), "count": settings.reset_pairs,
            "max_seconds": 60.0, "settle_seconds": 2.0}, module="bench.attacks")
        usage = meter.read()["ztunnel-node-2"]
        mesh.procs.check_alive()
        return {"attack": attack, "destination_ztunnel": {**usage, "rss_before_mb": rss_before},
                "probe_before": before, "probe_after": mesh.probe()}


def control_flood(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    with running_mesh(root, index) as mesh:
        latency = {"route": mesh.route(), "connections": 1,
                   "duration": settings.flood_latency_seconds}
        before = run_worker("closed", latency)
        rss_before = rss_mb(mesh)
        meter = Meter({"ztunnel-node-2": mesh.pid("node-2")})
        with RssSampler({"ztunnel-node-2": mesh.pid("node-2")}) as sampler, background(
                "control_flood", {"target": mesh.hbone_target(),
                                  "seconds": settings.flood_seconds,
                                  "max_frames": 50_000_000}) as flood:
            time.sleep(min(1.0, settings.flood_seconds / 4))
            during = run_worker("closed", latency)
            attack = finish(flood, settings.flood_seconds + 30)
        usage = meter.read()["ztunnel-node-2"]
        at_end = rss_mb(mesh)
        time.sleep(settings.flood_after_seconds)
        mesh.procs.check_alive()
        return {
            "attack": attack, "destination_ztunnel": usage,
            "rss_mb": {"before": rss_before["ztunnel-node-2"],
                       "peak_during": sampler.peak_mb()["ztunnel-node-2"],
                       "at_end": at_end["ztunnel-node-2"],
                       f"after_{settings.flood_after_seconds:g}s":
                           rss_mb(mesh)["ztunnel-node-2"]},
            "latency_before": before, "latency_during": during, "probe_after": mesh.probe(),
        }


def idle_handshake(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    with running_mesh(root, index) as mesh:
        seconds = settings.idle_seconds
        rss_before = rss_mb(mesh)
        with RssSampler({"ztunnel-node-2": mesh.pid("node-2")}) as sampler:
            attack = run_worker("idle_handshake", {
                "target": mesh.hbone_target(), "count": settings.idle_connections,
                "check_at": [seconds / 3, 2 * seconds / 3, seconds]},
                timeout=seconds + 120, module="bench.attacks")
        return {"attack": attack, "seconds": seconds,
                "rss_mb": {"before": rss_before["ztunnel-node-2"],
                           "peak": sampler.peak_mb()["ztunnel-node-2"]},
                "probe_after": mesh.probe()}


def idle_tunnels(settings: Settings, root: Path, index: int) -> dict[str, Any]:
    with running_mesh(root, index) as mesh:
        pids = {f"ztunnel-{node}": mesh.pid(node) for node in NODES}
        before = rss_mb(mesh)
        args = {"route": mesh.route(ECHO_PORT), "count": settings.idle_tunnels}
        with RssSampler(pids) as sampler, background("idle", args, "bench.workers") as idle:
            assert idle.stdout is not None
            ready, _, _ = select.select([idle.stdout], [], [], 300.0)
            line = idle.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"idle worker failed: {finish(idle, 10)}")
            opened = json.loads(line)["open"]
            time.sleep(1.0)
            held = rss_mb(mesh)
            held_open = {f"ztunnel-{node}": mesh.open_connections(node) for node in NODES}
            assert idle.stdin is not None
            idle.stdin.close()
            idle.wait(60)
        closed_at = time.monotonic()
        after: list[dict[str, float]] = []
        while (elapsed := time.monotonic() - closed_at) < settings.idle_after_close_seconds:
            time.sleep(min(1.0, settings.idle_after_close_seconds - elapsed))
            after.append({"seconds": time.monotonic() - closed_at, **rss_mb(mesh)})
        still_open = {f"ztunnel-{node}": mesh.open_connections(node) for node in NODES}
        return {"tunnels": opened, "proxies": {
            name: {"rss_before_mb": before[name], "rss_held_mb": held[name],
                   "rss_peak_mb": sampler.peak_mb()[name],
                   "rss_after_close_mb": after[-1][name],
                   "kb_per_tunnel": (held[name] - before[name]) * 1024 / max(opened, 1),
                   "kept_after_close_mb": after[-1][name] - before[name],
                   "connections_open_while_held": held_open[name],
                   "connections_still_open_after_close": still_open[name]}
            for name in pids}, "after_close_series": after}


# In the brief's numbering (issue 11); also the order they run in.
SCENARIOS: dict[str, Callable[[Settings, Path, int], dict[str, Any]]] = {
    "rapid-reset": rapid_reset,
    "control-flood": control_flood,
    "idle-handshake": idle_handshake,
    "idle-tunnels": idle_tunnels,
    "istiod-kill": faults.istiod_kill,
    "ztunnel-sigterm": faults.ztunnel_sigterm,
    "cert-rotation": faults.cert_rotation,
    "istiod-new-root": faults.istiod_new_root,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (~2 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: proves the harness works (tests)")
    parser.add_argument("--only", action="append", choices=list(SCENARIOS),
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--output", type=Path, default=None, help="results JSON path")
    args = parser.parse_args(argv)
    settings = Settings.for_mode(args.quick, args.smoke)
    only = set(args.only or SCENARIOS)
    started = time.time()

    def log(message: str) -> None:
        print(f"[chaos {time.time() - started:6.1f}s] {message}", flush=True)

    root = Path(tempfile.mkdtemp(prefix="ambient-chaos-"))
    results: dict[str, Any] = {}
    failed: list[str] = []
    try:
        for index, (name, scenario) in enumerate(SCENARIOS.items(), start=1):
            if name not in only:
                continue
            log(f"{name}")
            began = time.monotonic()
            try:
                results[name] = scenario(settings, root / name, index)
            except Exception as exc:  # a scenario that breaks is a finding; the rest run
                log(f"{name} failed: {exc!r}; logs in {root / name}")
                results[name] = {"error": repr(exc)}
                failed.append(name)
            results[name]["scenario_seconds"] = time.monotonic() - began
    except BaseException:  # Ctrl-C: the scenario's processes are stopped already
        print(f"chaos: interrupted; process logs kept in {root}", file=sys.stderr)
        raise
    document = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "quick": args.quick, "smoke": args.smoke, "settings": asdict(settings),
        "machine": machine_facts(), "duration_seconds": time.time() - started,
        "failed": failed, "results": results,
    }
    mode = ".smoke" if args.smoke else ".quick" if args.quick else ""
    output = args.output or RESULTS_DIR / (
        "chaos-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + mode + ".json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    log(f"wrote {output}")
    if failed:
        print(f"chaos: {', '.join(failed)} failed; process logs kept in {root}",
              file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
