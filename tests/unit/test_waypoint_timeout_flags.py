"""The waypoint's request-head and idle timeouts come from flags (issue 11) and reach the
HTTP servers' limits."""

from __future__ import annotations

from pathlib import Path

from tests.pki import TestPki
from tests.unit.test_waypoint_config import base_args
from waypoint.config import config_from_args
from waypoint.http import HttpLimits
from waypoint.proxy import Waypoint


def _root_cert(tmp_path: Path) -> Path:
    path = tmp_path / "root-cert.pem"
    path.write_text(TestPki().root_pem)
    return path


def test_defaults_are_the_http_servers_own(tmp_path: Path) -> None:
    config = config_from_args(base_args(_root_cert(tmp_path), "--token", "t"))
    assert config.request_headers_timeout == HttpLimits().header_timeout == 10.0
    assert config.idle_timeout == HttpLimits().idle_timeout == 300.0


def test_flags_reach_the_waypoints_limits(tmp_path: Path) -> None:
    config = config_from_args(base_args(
        _root_cert(tmp_path), "--token", "t",
        "--request-headers-timeout", "3s", "--idle-timeout", "1m",
    ))
    assert (config.request_headers_timeout, config.idle_timeout) == (3.0, 60.0)
    limits = Waypoint(config).limits
    assert (limits.header_timeout, limits.idle_timeout) == (3.0, 60.0)
