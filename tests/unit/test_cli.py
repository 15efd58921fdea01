"""ambientctl's argument parsing and the ztunnel-config views of a canned config dump."""

from __future__ import annotations

import json
import os
import sys
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambient_api import codec, model
from ambientctl import cli
from ambientctl.bundled import DEFAULT_KUSTOMIZATION, DEMO_CONFIG_DIR
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.ztunnelconfig import (
    KIND_ALIASES,
    ZtunnelConfigError,
    certificate_rows,
    render_view,
    resolve_node_address,
    service_rows,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def canned_dump() -> dict[str, Any]:
    """A dump shaped as ztunnel/admin.py serves it: the wire contract's JSON plus certs."""
    productpage = model.Workload(
        uid="Kubernetes//Pod/bookinfo/productpage-v1",
        name="productpage-v1",
        namespace="bookinfo",
        addresses=("127.0.20.2",),
        service_account="bookinfo-productpage",
        node="node-a",
        waypoint=model.GatewayAddress("waypoint.bookinfo.svc.cluster.local"),
        services=("bookinfo/productpage.bookinfo.svc.cluster.local",),
    )
    sleeper = model.Workload(
        uid="Kubernetes//Pod/default/sleep",
        name="sleep",
        namespace="default",
        addresses=("127.0.20.1",),
        service_account="sleep",
        node="node-a",
        tunnel_protocol=model.TunnelProtocol.NONE,
    )
    sick = model.Workload(
        uid="Kubernetes//Pod/bookinfo/productpage-v2",
        name="productpage-v2",
        namespace="bookinfo",
        addresses=("127.0.20.3",),
        service_account="bookinfo-productpage",
        node="node-b",
        status=model.WorkloadStatus.UNHEALTHY,
        services=("bookinfo/productpage.bookinfo.svc.cluster.local",),
    )
    service = model.Service(
        name="productpage",
        namespace="bookinfo",
        hostname="productpage.bookinfo.svc.cluster.local",
        addresses=(model.NetworkAddress("", "127.0.30.1"),),
        ports=(model.PortMapping(9080, 9080),),
    )
    policy = model.Authorization(
        name="allow-sleep",
        namespace="bookinfo",
        scope=model.AuthorizationScope.WORKLOAD_SELECTOR,
        action=model.AuthorizationAction.ALLOW,
        rules=(model.Rule(),),
    )
    return {
        "workloads": [codec.to_jsonable(w) for w in (productpage, sleeper, sick)],
        "services": [codec.to_jsonable(service)],
        "policies": [codec.to_jsonable(policy)],
        "certificates": [
            {
                "identity": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
                "state": "Available",
                "cert_chain": [
                    {
                        "serial_number": "1a2b",
                        "valid_from": "2025-01-01T00:00:00+00:00",
                        "expiration_time": "2025-01-02T00:00:00+00:00",
                    },
                    {
                        "serial_number": "ff",
                        "valid_from": "2024-01-01T00:00:00Z",
                        "expiration_time": "2034-01-01T00:00:00Z",
                    },
                ],
            }
        ],
    }


# --- argument parsing ----------------------------------------------------------------------


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ztunnel-config", "workloads", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["launch"]) == 2
    assert "invalid choice: 'launch'" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "required" in capsys.readouterr().err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ztunnel-config", "--help"]) == 0
    assert "--admin-port" in capsys.readouterr().out


def test_up_without_a_config_dir_runs_a_copy_of_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No -f: the shipped demo config, copied once into the state dir for the user to edit."""
    seen: list[Path] = []

    async def run_embedded(config_dir: Path, *_args: Any, **_kwargs: Any) -> None:
        seen.append(config_dir)
        raise EmbeddedError("stop here")

    monkeypatch.setattr(cli, "run_embedded", run_embedded)
    state = tmp_path / "state"
    assert cli.main(["up", "--state-dir", str(state)]) == 1
    assert seen == [state / "config"]
    assert sorted(p.name for p in (state / "config").glob("*.yaml")) == sorted(
        p.name for p in DEMO_CONFIG_DIR.glob("*.yaml")
    )
    assert f"config: {state / 'config'}" in capsys.readouterr().out
    (state / "config" / "99-mine.yaml").write_text("# kept\n")
    assert cli.main(["up", "--state-dir", str(state)]) == 1
    assert (state / "config" / "99-mine.yaml").exists()  # an existing copy is the user's


@pytest.mark.parametrize(
    "argv",
    [
        ["ztunnel-config", "workloads", "-o", "xml"],
        ["ztunnel-config", "workloads", "--admin-port", "70000"],
        ["ztunnel-config", "workloads", "--node", "a", "--address", "127.0.0.1"],
        ["ztunnel-config", "pods"],
        ["up", "-f", "x", "--drain-timeout", "-1"],
    ],
)
def test_bad_values_are_usage_errors(argv: list[str]) -> None:
    assert cli.main(argv) == 2


def test_parser_defaults() -> None:
    args = cli.build_parser().parse_args(["ztunnel-config", "workload"])
    assert (args.kind, args.admin_port, args.output, args.state_dir) == (
        "workload",
        15000,
        "table",
        Path("run"),
    )
    assert (KIND_ALIASES["workload"], KIND_ALIASES["policy"]) == ("workloads", "policies")
    args = cli.build_parser().parse_args(["ztunnel-config", "certificates", "-o", "short"])
    assert args.output == "table"


def test_demo_and_install_default_to_the_shipped_files() -> None:
    """Not paths relative to the current directory: they work from any directory."""
    assert cli.build_parser().parse_args(["demo"]).config_dir == DEMO_CONFIG_DIR
    install = cli.build_parser().parse_args(["install"])
    assert install.kustomize == DEFAULT_KUSTOMIZATION and install.kustomize.is_absolute()
    assert (DEFAULT_KUSTOMIZATION / "kustomization.yaml").is_file()
    assert (DEMO_CONFIG_DIR / "01-nodes.yaml").is_file()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.startswith("ambientctl ")


def test_demo_without_the_demo_module_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> types.ModuleType:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    assert cli.main(["demo"]) == 1
    assert "no demo" in capsys.readouterr().err


def test_demo_hands_its_flags_to_run_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("ambientctl.demo")

    def run_demo(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 7

    fake.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ambientctl.demo", fake)
    assert cli.main(["demo", "-f", "manifests/x", "--state-dir", "/tmp/s"]) == 7
    assert calls == [{"config_dir": Path("manifests/x"), "state_dir": Path("/tmp/s")}]


def test_up_reports_a_bad_config_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["up", "-f", str(tmp_path / "missing"), "--state-dir", str(tmp_path / "state")])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


# --- views of the config dump --------------------------------------------------------------


def test_workloads_table() -> None:
    lines = render_view(canned_dump(), "workloads", "table").splitlines()
    assert lines[0].split() == [
        "NAMESPACE",
        "POD",
        "NAME",
        "ADDRESS",
        "NODE",
        "WAYPOINT",
        "PROTOCOL",
    ]
    assert lines[1].split() == [
        "bookinfo",
        "productpage-v1",
        "127.0.20.2",
        "node-a",
        "waypoint.bookinfo.svc.cluster.local",
        "HBONE",
    ]
    assert lines[2].split() == ["default", "sleep", "127.0.20.1", "node-a", "None", "NONE"]


def test_services_count_healthy_endpoints() -> None:
    (row,) = service_rows(canned_dump())
    assert row["service_name"] == "productpage"
    assert row["service_vip"] == "127.0.30.1"
    assert row["endpoints"] == "1/2"
    header = render_view(canned_dump(), "services", "table").splitlines()[0]
    assert header.split() == [
        "NAMESPACE",
        "SERVICE",
        "NAME",
        "SERVICE",
        "VIP",
        "WAYPOINT",
        "ENDPOINTS",
    ]


def test_policies_table() -> None:
    lines = render_view(canned_dump(), "policies", "short").splitlines()
    assert lines[1].split() == ["bookinfo", "allow-sleep", "ALLOW", "WORKLOAD_SELECTOR"]


def test_certificates_one_row_per_chain_link() -> None:
    rows = certificate_rows(canned_dump(), now=NOW)
    assert [(r["type"], r["serial_number"], r["valid_cert"]) for r in rows] == [
        ("Leaf", "1a2b", True),
        ("Root", "ff", True),
    ]
    later = certificate_rows(canned_dump(), now=datetime(2025, 1, 3, tzinfo=UTC))
    assert [r["valid_cert"] for r in later] == [False, True]


def test_certificates_in_istio_camel_case() -> None:
    """ztunnel/identity.py dumps Istio's spelling; both must render the same."""
    dump = {
        "certificates": [
            {
                "identity": "spiffe://cluster.local/ns/a/sa/b",
                "state": "Unavailable: CA unreachable",
                "certChain": [
                    {
                        "serialNumber": "abc",
                        "validFrom": "2025-01-01T00:00:00Z",
                        "expirationTime": "2025-01-02T00:00:00Z",
                    },
                    {"serialNumber": "i1", "validFrom": "x", "expirationTime": "y"},
                    {"serialNumber": "r1"},
                ],
            },
            {"identity": "spiffe://cluster.local/ns/a/sa/c", "state": "Initializing"},
        ]
    }
    rows = certificate_rows(dump, now=NOW)
    assert [(r["type"], r.get("serial_number"), r["valid_cert"]) for r in rows] == [
        ("Leaf", "abc", True),
        ("Intermediate", "i1", False),
        ("Root", "r1", False),
        ("Leaf", None, False),
    ]
    assert rows[0]["not_after"] == "2025-01-02T00:00:00Z"
    table = render_view(dump, "certificates", "table")
    assert "Unavailable: CA unreachable" in table and "Initializing" in table


def test_certificates_header() -> None:
    header = render_view(canned_dump(), "certificates", "table").splitlines()[0]
    assert " ".join(header.split()) == (
        "CERTIFICATE NAME TYPE STATUS VALID CERT SERIAL NUMBER NOT AFTER NOT BEFORE"
    )


def test_json_and_yaml_use_istioctl_field_names_and_values() -> None:
    """Scripts written against `istioctl ztunnel-config ... -o json` read ours unchanged."""
    dump = canned_dump()
    productpage, sleeper, sick = json.loads(render_view(dump, "workload", "json"))
    assert productpage["workloadIps"] == ["127.0.20.2"]
    assert productpage["serviceAccount"] == "bookinfo-productpage"
    assert productpage["uid"] == "Kubernetes//Pod/bookinfo/productpage-v1"
    assert (productpage["protocol"], sleeper["protocol"]) == ("HBONE", "TCP")
    assert (productpage["status"], sick["status"]) == ("Healthy", "Unhealthy")
    assert productpage["waypoint"]["destination"] == "waypoint.bookinfo.svc.cluster.local"
    assert "waypoint" not in sleeper
    assert [key for w in (productpage, sleeper, sick) for key in w if "_" in key] == []
    (service,) = yaml.safe_load(render_view(dump, "services", "yaml"))
    assert (service["vips"], service["ports"]) == (["/127.0.30.1"], {"9080": 9080})
    assert sorted(service["endpoints"]) == [
        "Kubernetes//Pod/bookinfo/productpage-v1",
        "Kubernetes//Pod/bookinfo/productpage-v2",
    ]
    (policy,) = json.loads(render_view(dump, "policy", "json"))
    assert (policy["action"], policy["scope"], policy["rules"]) == (
        "Allow",
        "WorkloadSelector",
        [[]],
    )
    (certificate,) = json.loads(render_view(dump, "certificates", "json"))
    assert certificate["certChain"][0]["serialNumber"] == "1a2b"


def test_policy_rules_json_as_istio_nests_them() -> None:
    policy = model.Authorization(
        name="p",
        namespace="demo",
        scope=model.AuthorizationScope.NAMESPACE,
        action=model.AuthorizationAction.DENY,
        rules=(
            model.Rule(
                clauses=(
                    model.Clause(
                        matches=(
                            model.Match(principals=("cluster.local/ns/demo/sa/sleep", "*")),
                            model.Match(namespaces=("dev-*",), destination_ports=(8000,)),
                        )
                    ),
                )
            ),
        ),
    )
    (out,) = json.loads(render_view({"policies": [codec.to_jsonable(policy)]}, "p", "json"))
    assert (out["action"], out["scope"]) == ("Deny", "Namespace")
    assert out["rules"] == [
        [
            [
                {"principals": [{"Exact": "cluster.local/ns/demo/sa/sleep"}, {"Presence": {}}]},
                {"namespaces": [{"Prefix": "dev-"}], "destinationPorts": [8000]},
            ]
        ]
    ]


def test_all_shows_every_kind_as_istioctl() -> None:
    dump = canned_dump()
    text = render_view(dump, "all", "table")
    titles = [line for line in text.splitlines() if line.startswith("------")]
    assert titles == [
        "------ WORKLOAD INFO ------",
        "------ SERVICE INFO ------",
        "------ POLICY INFO ------",
        "------ SECRET INFO ------",
    ]
    assert "productpage-v1" in text and "allow-sleep" in text and "1a2b" in text
    everything = json.loads(render_view(dump, "all", "json"))
    assert sorted(everything) == ["certificates", "policies", "services", "workloads"]
    assert everything["workloads"][0]["workloadIps"] == ["127.0.20.2"]


def test_namespace_filter() -> None:
    text = render_view(canned_dump(), "workloads", "table", namespace="default")
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["default"]
    raw = json.loads(render_view(canned_dump(), "workloads", "json", namespace="bookinfo"))
    assert {w["name"] for w in raw} == {"productpage-v1", "productpage-v2"}


def test_a_malformed_dump_is_a_clear_error() -> None:
    with pytest.raises(ZtunnelConfigError, match="'workloads' is not a list of objects"):
        render_view({"workloads": {"a": 1}}, "workloads", "table")


def test_empty_dump_renders_just_the_header() -> None:
    assert render_view({}, "workloads", "table").count("\n") == 1


# --- finding a node's ztunnel --------------------------------------------------------------


def write_mesh(state: Path, nodes: dict[str, str], pid: int | None = None) -> None:
    state.mkdir(exist_ok=True)
    data = {"istiod": "127.0.9.1:15012", "nodes": nodes, "pods": {}, "pid": pid or os.getpid()}
    (state / "mesh.json").write_text(json.dumps(data))


def test_node_address_from_mesh_state(tmp_path: Path) -> None:
    write_mesh(tmp_path, {"node-a": "127.0.10.1", "node-b": "127.0.10.2"})
    assert resolve_node_address(tmp_path, "node-b") == "127.0.10.2"
    with pytest.raises(ZtunnelConfigError, match="unknown node 'node-c'; the mesh has: node-a"):
        resolve_node_address(tmp_path, "node-c")
    with pytest.raises(ZtunnelConfigError, match="choose one with --node"):
        resolve_node_address(tmp_path, None)


def test_single_node_needs_no_flag(tmp_path: Path) -> None:
    write_mesh(tmp_path, {"only": "127.0.10.9"})
    assert resolve_node_address(tmp_path, None) == "127.0.10.9"


def test_missing_or_stale_mesh_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["ztunnel-config", "workloads", "--state-dir", str(tmp_path)])
    assert code == 1
    assert "no running embedded mesh" in capsys.readouterr().err
    write_mesh(tmp_path, {"only": "127.0.10.9"}, pid=2**22 + 12345)  # above pid_max
    with pytest.raises(ZtunnelConfigError, match="is stale"):
        resolve_node_address(tmp_path, None)
