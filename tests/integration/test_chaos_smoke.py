"""The reliability harness (bench/chaos.py, `make chaos`) still runs: its cheapest scenario
(connections that finish mTLS and then send nothing, against a live mesh of real processes)
for a second, checked for a well-formed results file. No figure is asserted: a defence is
judged by a real run, not by the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def test_cheapest_scenario_writes_well_formed_results(tmp_path: Path) -> None:
    output = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--smoke", "--only", "idle-handshake",
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=50, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(output.read_text())

    assert document["smoke"] is True and document["failed"] == []
    assert document["machine"]["cores"] >= 1 and document["machine"]["python"]
    assert set(document["results"]) == {"idle-handshake"}
    result = document["results"]["idle-handshake"]
    attack = result["attack"]
    # Every connection finished its handshake with a real certificate from the mesh CA, and
    # was counted at each of the three checks.
    assert attack["opened"] == document["settings"]["idle_connections"]
    assert attack["open_failures"] == 0
    assert len(attack["still_open"]) == 3
    assert all(0 <= count <= attack["opened"] for count in attack["still_open"].values())
    assert result["rss_mb"]["peak"] >= result["rss_mb"]["before"] > 1
    assert result["probe_after"]["ok"] is True
