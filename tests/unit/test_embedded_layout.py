"""What the embedded mesh runs, read from a config directory; tokens; command lines."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from ambientctl.embedded import (
    AppSpec,
    EmbeddedConfigError,
    NodeSpec,
    StatePaths,
    app_kind_for_port,
    istiod_argv,
    load_layout,
    write_bootstrap_tokens,
    ztunnel_argv,
)

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
