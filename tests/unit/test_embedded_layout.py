"""What the embedded mesh runs, read from a config directory; tokens; command lines."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from ambientctl.apps import build_parser as apps_parser
from ambientctl.embedded.commands import app_argv, istiod_argv, waypoint_argv, ztunnel_argv
from ambientctl.embedded.errors import EmbeddedConfigError
from ambientctl.embedded.layout import (
    AppSpec,
    NodeSpec,
    WaypointSpec,
    app_kind_for_port,
    load_layout,
)
from ambientctl.embedded.state_dir import StatePaths, add_bootstrap_tokens, write_bootstrap_tokens
from istiod_lite.auth import load_bootstrap_tokens
from waypoint.config import config_from_args as waypoint_config_from_args

NODE_A = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node-a"},
    "status": {"addresses": [{"type": "Hostname", "address": "a"},
                             {"type": "InternalIP", "address": "127.0.10.1"}]},
}  # fmt: skip
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "echo", "namespace": "apps"},
    "spec": {
        "nodeName": "node-a",
        "containers": [
            {
                "name": "echo",
                "ports": [
                    {"containerPort": 8080, "name": "http"},
                    {"containerPort": 9000, "name": "tcp-echo"},
                    {"containerPort": 5353, "protocol": "UDP"},
                ],
            },
            {"name": "sidecarless-helper"},
        ],
    },
    "status": {"podIP": "127.0.20.7"},
}


def write(dir_: Path, name: str, *docs: object) -> None:
    (dir_ / name).write_text(yaml.safe_dump_all(docs))


def test_layout_from_a_config_dir(tmp_path: Path) -> None:
    write(tmp_path, "nodes.yaml", NODE_A)
    sub = tmp_path / "apps"
    sub.mkdir()
    write(sub, "pod.yml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}},
          POD)  # fmt: skip
    (tmp_path / "README.md").write_text("not yaml: [")
    layout = load_layout(tmp_path)
    assert layout.nodes == (NodeSpec("node-a", "127.0.10.1"),)
    assert layout.pods == {"apps/echo": "127.0.20.7"}
    assert layout.apps == (
        AppSpec("apps", "echo", "127.0.20.7", 8080, "http"),
        AppSpec("apps", "echo", "127.0.20.7", 9000, "tcp"),
    )
    assert layout.apps[1].process_name == "app-apps-echo-9000"


def test_kind_list_is_unpacked(tmp_path: Path) -> None:
    write(tmp_path, "all.yaml", {"apiVersion": "v1", "kind": "List", "items": [NODE_A, POD]})
    layout = load_layout(tmp_path)
    assert [n.name for n in layout.nodes] == ["node-a"]
    assert len(layout.apps) == 2


def test_port_kinds() -> None:
    assert app_kind_for_port({"containerPort": 80}) == "http"
    assert app_kind_for_port({"containerPort": 80, "name": "TCP-raw"}) == "tcp"
    assert app_kind_for_port({"containerPort": 53, "protocol": "UDP"}) is None


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ([POD], "defines no Node"),
        ([{**NODE_A, "status": {}}], "Node node-a has no status.addresses entry of type Internal"),
        ([NODE_A, NODE_A], "Node node-a is defined twice"),
        ([NODE_A, {**NODE_A, "metadata": {"name": "node-b"}}], "share the address 127.0.10.1"),
        ([{"kind": "Node", "metadata": {}}], "Node without metadata.name"),
        ([NODE_A, {**POD, "spec": {"containers": [{"ports": [{"containerPort": "x"}]}]}}],
         "Pod apps/echo has an invalid containerPort 'x'"),
        (["just a string"], "a document is not a mapping"),
    ],
)  # fmt: skip
def test_config_errors_name_the_problem(tmp_path: Path, docs: list[object], message: str) -> None:
    write(tmp_path, "bad.yaml", *docs)
    with pytest.raises(EmbeddedConfigError, match=message):
        load_layout(tmp_path)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("kind: Node\n  metadata: [\n")
    with pytest.raises(EmbeddedConfigError, match="broken.yaml"):
        load_layout(tmp_path)


def test_missing_config_dir(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedConfigError, match="does not exist"):
        load_layout(tmp_path / "nope")


def test_pod_without_ip_runs_no_app(tmp_path: Path) -> None:
    write(tmp_path, "x.yaml", NODE_A, {**POD, "status": {}})
    layout = load_layout(tmp_path)
    assert layout.apps == () and layout.pods == {}


def test_bootstrap_tokens_are_private_and_distinct(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state")
    paths.create()
    nodes = [NodeSpec("a", "127.0.10.1"), NodeSpec("b", "127.0.10.2")]
    tokens = write_bootstrap_tokens(paths, nodes)
    assert yaml.safe_load(paths.bootstrap_tokens.read_text()) == tokens
    assert tokens["a"] != tokens["b"] and len(tokens["a"]) >= 32
    assert paths.token_file("b").read_text() == tokens["b"]
    for path in (paths.bootstrap_tokens, paths.token_file("a"), paths.token_file("b")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = write_bootstrap_tokens(paths, nodes)
    assert again["a"] != tokens["a"]
    assert stat.S_IMODE(paths.bootstrap_tokens.stat().st_mode) == 0o600


def test_command_lines(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    zt = ztunnel_argv(NodeSpec("node-a", "127.0.10.1"), paths, "127.0.9.1:15012")
    assert zt[1:3] == ["-m", "ztunnel"]
    flags = dict(zip(zt[3::2], zt[4::2], strict=True))
    assert flags == {
        "--node": "node-a",
        "--node-address": "127.0.10.1",
        "--xds-address": "127.0.9.1:15012",
        "--root-cert": str(tmp_path / "istiod" / "root-cert.pem"),
        "--token-file": str(tmp_path / "tokens" / "node-a"),
        "--log-format": "json",
    }
    ist = istiod_argv(Path("/cfg"), paths, "127.0.9.1:15012")
    assert ist[1:3] == ["-m", "istiod_lite"]
    assert dict(zip(ist[3::2], ist[4::2], strict=True))["--bootstrap-tokens"] == str(
        tmp_path / "bootstrap-tokens.yaml"
    )


# -- waypoints and fail-every ------------------------------------------------------------------

WAYPOINT_GATEWAY: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "apps",
                 "labels": {"istio.io/waypoint-for": "service"}},
    "spec": {"gatewayClassName": "istio-waypoint",
             "addresses": [{"type": "Hostname", "value": "wp.example"},
                           {"type": "IPAddress", "value": "127.0.40.1"}],
             "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
}  # fmt: skip


def gateway(**changes: dict[str, Any]) -> dict[str, Any]:
    """WAYPOINT_GATEWAY with top-level metadata/spec entries replaced."""
    metadata = {**WAYPOINT_GATEWAY["metadata"], **changes.pop("metadata", {})}
    spec = {**WAYPOINT_GATEWAY["spec"], **changes.pop("spec", {})}
    return {**WAYPOINT_GATEWAY, "metadata": metadata, "spec": spec}


def test_waypoint_gateways_become_waypoint_processes(tmp_path: Path) -> None:
    ingress = gateway(metadata={"name": "ingress"}, spec={"gatewayClassName": "istio"})
    annotated = gateway(
        metadata={"name": "reviews", "annotations": {"istio.io/service-account": "reviews-sa"}},
        spec={"addresses": [{"value": "127.0.40.2"}]},  # no type: an IPAddress
    )
    write(tmp_path, "x.yaml", NODE_A, POD, WAYPOINT_GATEWAY, ingress, annotated)
    layout = load_layout(tmp_path)
    assert layout.waypoints == (
        WaypointSpec("apps", "waypoint", "127.0.40.1", "waypoint"),
        WaypointSpec("apps", "reviews", "127.0.40.2", "reviews-sa"),
    )
    assert layout.waypoints[1].principal == "serviceaccount:apps/reviews-sa"
    assert layout.waypoints[0].process_name == "waypoint-apps.waypoint"


def test_a_waypoint_without_an_ip_is_skipped_with_a_warning(tmp_path: Path) -> None:
    write(tmp_path, "x.yaml", NODE_A, gateway(spec={"addresses": [{"type": "Hostname",
                                                                   "value": "wp"}]}))  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        layout = load_layout(tmp_path)
    assert layout.waypoints == ()
    assert any("no spec.addresses entry of type IPAddress" in e["event"] for e in logs)


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ([NODE_A, gateway(spec={"addresses": [{"value": "127.0.10.1"}]})],
         "Gateway apps/waypoint and Node node-a share the address 127.0.10.1"),
        ([NODE_A, POD, gateway(spec={"addresses": [{"value": "127.0.20.7"}]})],
         "Gateway apps/waypoint and Pod apps/echo share the address 127.0.20.7"),
        ([NODE_A, WAYPOINT_GATEWAY, gateway(metadata={"name": "b"})],
         "Gateway apps/b and Gateway apps/waypoint share the address 127.0.40.1"),
        ([NODE_A, WAYPOINT_GATEWAY, WAYPOINT_GATEWAY], "Gateway apps/waypoint is defined twice"),
        ([NODE_A, gateway(spec={"addresses": [{"value": "127.0.40"}]})],
         "Gateway apps/waypoint has an invalid IPAddress '127.0.40'"),
        ([NODE_A, {**POD, "metadata": {**POD["metadata"],  # type: ignore[dict-item]
                                       "annotations": {"ambient-lite.io/fail-every": "often"}}}],
         "Pod apps/echo annotation ambient-lite.io/fail-every='often' is not a whole number"),
    ],
)  # fmt: skip
def test_waypoint_config_errors(tmp_path: Path, docs: list[object], message: str) -> None:
    write(tmp_path, "bad.yaml", *docs)
    with pytest.raises(EmbeddedConfigError, match=message):
        load_layout(tmp_path)


def test_fail_every_reaches_the_http_echo_only(tmp_path: Path) -> None:
    flaky = {**POD, "metadata": {**POD["metadata"],  # type: ignore[dict-item]
                                 "annotations": {"ambient-lite.io/fail-every": "3"}}}  # fmt: skip
    write(tmp_path, "x.yaml", NODE_A, flaky)
    http, tcp = load_layout(tmp_path).apps
    assert (http.fail_every, tcp.fail_every) == (3, 3)
    assert app_argv(http)[-2:] == ["--fail-every", "3"]
    assert "--fail-every" not in app_argv(tcp)
    assert "--fail-every" not in app_argv(AppSpec("apps", "echo", "127.0.20.7", 80, "http"))
    # The app's own parser takes what we pass.
    assert apps_parser().parse_args(app_argv(http)[3:]).fail_every == 3


def test_waypoint_command_line_is_what_the_waypoint_parses(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    paths.create()
    waypoint = WaypointSpec("apps", "reviews", "127.0.40.2", "reviews-sa")
    write_bootstrap_tokens(paths, [NodeSpec("node-a", "127.0.10.1")], [waypoint])
    paths.root_cert.write_text("-----BEGIN CERTIFICATE-----\n")
    argv = waypoint_argv(waypoint, paths, "127.0.9.1:15012")
    assert argv[1:3] == ["-m", "waypoint"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--token-file"] == str(tmp_path / "tokens" / "serviceaccount:apps:reviews-sa")
    config = waypoint_config_from_args(argv[3:])
    assert (config.name, config.namespace, config.address) == ("reviews", "apps", "127.0.40.2")
    assert config.spiffe_uri == "spiffe://cluster.local/ns/apps/sa/reviews-sa"
    assert config.xds_address == ("127.0.9.1", 15012)
    assert config.log_format == "json"
    tokens = yaml.safe_load(paths.bootstrap_tokens.read_text())
    assert config.token == tokens["serviceaccount:apps/reviews-sa"]


def test_waypoint_tokens_are_in_the_format_istiod_reads(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    paths.create()
    waypoints = [WaypointSpec("apps", "a", "127.0.40.1", "shared"),
                 WaypointSpec("apps", "b", "127.0.40.2", "shared")]  # fmt: skip
    tokens = write_bootstrap_tokens(paths, [NodeSpec("node-a", "127.0.10.1")], waypoints)
    assert set(tokens) == {"node-a", "serviceaccount:apps/shared"}  # one identity, one token
    by_token = load_bootstrap_tokens(paths.bootstrap_tokens)
    assert by_token[tokens["serviceaccount:apps/shared"]] == "serviceaccount:apps/shared"
    assert stat.S_IMODE(paths.token_file("serviceaccount:apps/shared").stat().st_mode) == 0o600


def test_adding_tokens_keeps_the_existing_ones(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    paths.create()
    before = write_bootstrap_tokens(paths, [NodeSpec("node-a", "127.0.10.1")])
    added = add_bootstrap_tokens(paths, ["serviceaccount:apps/wp", "node-a"])
    assert added == ["serviceaccount:apps/wp"]
    after = yaml.safe_load(paths.bootstrap_tokens.read_text())
    assert after["node-a"] == before["node-a"]
    assert paths.token_file("serviceaccount:apps/wp").read_text() == after["serviceaccount:apps/wp"]
    assert add_bootstrap_tokens(paths, ["serviceaccount:apps/wp"]) == []
    assert yaml.safe_load(paths.bootstrap_tokens.read_text()) == after
