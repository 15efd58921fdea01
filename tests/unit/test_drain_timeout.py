"""The drain timeout: where its default comes from (Istio's ztunnel environment variables)
and ``ActiveConnections.abort``, which ends what is left when it expires (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from ambient_dataplane.drain import ActiveConnections
from ztunnel.config import config_from_args, drain_timeout_from_environment

REQUIRED = ["--node", "n", "--node-address", "127.0.0.1", "--xds-address", "127.0.0.1:15012"]


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, 5.0),
    ({"TERMINATION_GRACE_PERIOD_SECONDS": "30"}, 25.0),  # above 10 s: 5 s of margin
    ({"TERMINATION_GRACE_PERIOD_SECONDS": "10"}, 9.0),  # up to 10 s: 1 s of margin
    ({"TERMINATION_GRACE_PERIOD_SECONDS": "1"}, 1.0),  # never under 1 s
    ({"CONNECTION_TERMINATION_DEADLINE": "7s"}, 7.0),
    ({"CONNECTION_TERMINATION_DEADLINE": "2m", "TERMINATION_GRACE_PERIOD_SECONDS": "30"}, 120.0),
])
def test_the_default_follows_istios_ztunnel(environ: dict[str, str], expected: float) -> None:
    assert drain_timeout_from_environment(environ) == expected


@pytest.mark.parametrize("environ", [
    {"TERMINATION_GRACE_PERIOD_SECONDS": "soon"},
    {"CONNECTION_TERMINATION_DEADLINE": "forever"},
])
def test_a_bad_variable_is_named(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=next(iter(environ))):
        drain_timeout_from_environment(environ)


def _config_args(tmp_path: Path) -> list[str]:
    root = tmp_path / "root.pem"
    root.write_text("unused")
    return [*REQUIRED, "--root-cert", str(root), "--token", "t"]


def test_the_flag_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERMINATION_GRACE_PERIOD_SECONDS", "30")
    assert config_from_args(_config_args(tmp_path)).drain_timeout == 25.0
    flagged = config_from_args([*_config_args(tmp_path), "--drain-timeout", "3s"])
    assert flagged.drain_timeout == 3.0


def test_a_bad_environment_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TERMINATION_GRACE_PERIOD_SECONDS", "soon")
    with pytest.raises(SystemExit) as exited:
        config_from_args(_config_args(tmp_path))
    assert exited.value.code == 2
    assert "TERMINATION_GRACE_PERIOD_SECONDS='soon'" in capsys.readouterr().err


async def test_abort_cancels_what_moves_data_and_what_starts_after() -> None:
    connections = ActiveConnections()
    ended: list[bool] = []
    carrying = trio.Event()

    async def carry() -> None:
        with connections.abortable() as scope:
            carrying.set()
            await trio.sleep_forever()
        ended.append(scope.cancelled_caught)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(carry)
        await carrying.wait()
        assert connections.abort() == 1
    assert ended == [True]
    with connections.abortable() as late:
        await trio.sleep_forever()
    assert late.cancelled_caught
