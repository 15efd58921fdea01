"""The command line of each child of the embedded mesh: istiod, ztunnel, waypoint, sample app.

``ambientctl lab`` runs the same ones, prefixed with ``ip netns exec``, inside its namespaces."""

from __future__ import annotations

import sys
from pathlib import Path

from ambientctl.embedded.layout import AppSpec, NodeSpec, WaypointSpec
from ambientctl.embedded.state_dir import StatePaths


def istiod_argv(config_dir: Path, paths: StatePaths, listen: str) -> list[str]:
    return [
        sys.executable, "-m", "istiod_lite",
        "--config-dir", str(config_dir),
        "--state-dir", str(paths.istiod_dir),
        "--bootstrap-tokens", str(paths.bootstrap_tokens),
        "--listen", listen,
        "--log-format", "json",
    ]  # fmt: skip


def ztunnel_argv(node: NodeSpec, paths: StatePaths, xds_address: str) -> list[str]:
    """The ztunnel command line, in one place so a change of its flags is one edit."""
    return [
        sys.executable, "-m", "ztunnel",
        "--node", node.name,
        "--node-address", node.address,
        "--xds-address", xds_address,
        "--root-cert", str(paths.root_cert),
        "--token-file", str(paths.token_file(node.name)),
        "--log-format", "json",
    ]  # fmt: skip


def waypoint_argv(waypoint: WaypointSpec, paths: StatePaths, xds_address: str) -> list[str]:
    """The waypoint command line, in one place so a change of its flags is one edit."""
    return [
        sys.executable, "-m", "waypoint",
        "--name", waypoint.name,
        "--namespace", waypoint.namespace,
        "--service-account", waypoint.service_account,
        "--address", waypoint.address,
        "--xds-address", xds_address,
        "--root-cert", str(paths.root_cert),
        "--token-file", str(paths.token_file(waypoint.principal)),
        "--log-format", "json",
    ]  # fmt: skip


def app_argv(app: AppSpec) -> list[str]:
    argv = [
        sys.executable, "-m", "ambientctl.apps", app.kind,
        "--address", app.address,
        "--port", str(app.port),
        "--name", app.pod,
        "--log-format", "json",
    ]  # fmt: skip
    if app.kind == "http" and app.fail_every:
        argv += ["--fail-every", str(app.fail_every)]
    return argv
