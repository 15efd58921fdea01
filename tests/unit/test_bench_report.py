"""bench.report's command line: a clear error for a file that is not a results file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report


def test_a_broken_results_file_is_named_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "results.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit) as exited:
        report.main([str(broken)])
    assert exited.value.code == 2
    assert f"{broken}: not a readable results file (JSONDecodeError" in capsys.readouterr().err


def test_a_missing_results_file_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        report.main([str(tmp_path / "absent.json")])
    assert exited.value.code == 2
    assert "FileNotFoundError" in capsys.readouterr().err
