"""The benchmark harness (bench/, `make bench`) still runs: its smallest scenario (connection
churn, no mesh vs ambient-lite vs Envoy, real processes) for about two seconds, checked for a
well-formed results file. No timing is asserted: numbers on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.envoyconf import envoy_binary

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.timeout(90),
    pytest.mark.skipif(envoy_binary() is None, reason="envoy binary not found"),
]

ROOT = Path(__file__).resolve().parents[2]


def test_smallest_scenario_writes_well_formed_results(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "churn", "--no-plot",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(output.read_text())

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
