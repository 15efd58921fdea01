"""The benchmark harness (bench/, `make bench`) still runs: its smallest scenario (connection
churn, no mesh vs ambient-lite vs Envoy, real processes) and the waypoint scenario (no L7
proxy vs our waypoint vs Envoy as the waypoint) for a few seconds each, checked for
well-formed results files. No timing is asserted: numbers on a shared CI machine mean
nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.envoyconf import envoy_binary

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.timeout(90),
    pytest.mark.skipif(envoy_binary() is None, reason="envoy binary not found"),
]

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(scenario: str, tmp_path: Path) -> dict[str, Any]:
    """``python -m bench --smoke --only <scenario>``: its results document (it must succeed)."""
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", scenario, "--no-plot",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document: dict[str, Any] = json.loads(output.read_text())
    return document


def test_smallest_scenario_writes_well_formed_results(tmp_path: Path) -> None:
    document = run_smoke("churn", tmp_path)

    assert document["smoke"] is True
    machine = document["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["python"]
    assert machine["envoy"]
    churn = document["results"]["churn"]
    assert set(churn) == {"none", "ambient", "envoy"}
    expected_proxies = {
        "none": set(), "ambient": {"ztunnel-node-1", "ztunnel-node-2"},
        "envoy": {"envoy-client", "envoy-server"},
    }
    for system, runs in churn.items():
        assert len(runs) == 1
        run = runs[0]
        # Every connection made went through the system and came back echoed.
        assert run["connections"] > 0 and run["errors"] == 0, (system, run)
        assert run["per_second"] == pytest.approx(run["connections"] / run["seconds"])
        assert set(run["proxies"]) == expected_proxies[system]
        for usage in run["proxies"].values():
            assert usage["cpu_seconds"] >= 0 and usage["rss_mb"] > 1
    medians = document["summary"]["churn"]
    assert medians["ambient"]["per_second"] == churn["ambient"][0]["per_second"]
    assert set(document["results"]["idle_rss_mb"]) == {
        "ztunnel-node-1", "ztunnel-node-2", "envoy-client", "envoy-server"}


def test_waypoint_scenario_writes_well_formed_results(tmp_path: Path) -> None:
    """Scenario 6: HTTP through node-1's ztunnel to a Service VIP with no L7 proxy, our
    waypoint, or Envoy as the waypoint; every request answered, through the proxy named."""
    document = run_smoke("waypoint", tmp_path)
    results = document["results"]
    ztunnels = {"ztunnel-node-1", "ztunnel-node-2"}
    expected_proxies = {"no_waypoint": ztunnels, "waypoint": ztunnels | {"waypoint"},
                        "envoy": ztunnels | {"envoy-waypoint"}}
    saturation_runs = ("waypoint_saturation_8conn", "waypoint_saturation_16conn")
    for name in (*saturation_runs, "waypoint_500rps"):
        assert set(results[name]) == set(expected_proxies), name
        for system, runs in results[name].items():
            assert len(runs) == 1
            run = runs[0]
            assert run["requests"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"], (system, run)
            assert set(run["proxies"]) == expected_proxies[system]
    for name in saturation_runs:
        for system, runs in results[name].items():
            assert runs[0]["errors"] == 0, (name, system, runs[0]["first_errors"])
            assert runs[0]["rps"] == pytest.approx(runs[0]["requests"] / runs[0]["seconds"])
    # The server pod saw the client's own 8 tunnels without an L7 proxy; through a waypoint
    # it saw that proxy's identity (8 concurrent requests need more than the warm-up's one
    # upstream connection), so the traffic really crossed the L7 proxy.
    saturation = {system: runs[0] for system, runs in results[saturation_runs[0]].items()}
    assert saturation["no_waypoint"]["upstream_tunnels_opened"] == 8
    assert saturation["waypoint"]["upstream_tunnels_opened"] >= 1
    assert saturation["envoy"]["upstream_tunnels_opened"] >= 1
    fixed = document["summary"]["waypoint_500rps"]
    for system in ("waypoint", "envoy"):
        assert fixed[system]["added_p99_ms"] == pytest.approx(
            fixed[system]["p99_ms"] - fixed["no_waypoint"]["p99_ms"])
    assert set(results["waypoint_idle_rss_mb"]) == {"waypoint", "envoy-waypoint"}
