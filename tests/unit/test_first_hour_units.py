"""Pieces behind issue 16's fixes: the demo's Prometheus excerpt and istiod's config problems."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from structlog.testing import capture_logs

from ambientctl.demo import exposition_line
from ambientctl.embedded.istiod_log import (
    LOADED_EVENT,
    PROBLEM_EVENT,
    follow_config_problems,
    outstanding_problems,
)


def test_the_excerpt_is_prometheus_text_not_python_repr() -> None:
    labels = {"reporter": "destination", "source_workload": "sleep", "unused": "x",
              "destination_service": 'odd"name'}  # fmt: skip
    assert exposition_line("istio_tcp_sent_bytes_total", labels, 1024.0) == (
        'istio_tcp_sent_bytes_total{reporter="destination",source_workload="sleep",'
        'destination_service="odd\\"name"} 1024'
    )
    assert exposition_line("x", {}, 1048576.0) == "x{} 1048576"
    assert exposition_line("x", {}, 0.25) == "x{} 0.25"


def _log(path: Path, *entries: dict[str, str]) -> None:
    with path.open("a") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")


def test_outstanding_problems_end_when_the_file_loads(tmp_path: Path) -> None:
    log = tmp_path / "istiod.log"
    assert outstanding_problems(log) == []
    broken = {"event": PROBLEM_EVENT, "path": "a.yaml", "level": "error",
              "reason": "YAML syntax error at line 2", "serving": "last good objects of this file"}
    _log(log, {"event": "unrelated"}, broken, broken)
    (problem,) = outstanding_problems(log)
    assert problem.sentence() == (
        "a.yaml: YAML syntax error at line 2; istiod_lite is serving the last good objects of "
        "this file"
    )
    _log(log, {"event": LOADED_EVENT, "path": "a.yaml"})
    assert outstanding_problems(log) == []


async def test_follow_echoes_only_what_is_logged_after_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "istiod.log"
    _log(log, {"event": PROBLEM_EVENT, "path": "old.yaml", "reason": "old", "level": "error"})
    with capture_logs() as echoed:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_config_problems, log, log.stat().st_size, 0.01)
            _log(log, {"event": PROBLEM_EVENT, "path": "new.yaml", "reason": "bad",
                       "level": "error", "serving": "last good objects of this file"})  # fmt: skip
            with trio.fail_after(5):
                while not echoed:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert [(e["log_level"], e["event"]) for e in echoed] == [
        ("error",
         "config: new.yaml: bad; istiod_lite is serving the last good objects of this file")
    ]
