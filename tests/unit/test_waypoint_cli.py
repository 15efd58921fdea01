"""``ambientctl waypoint generate|apply|list|status|delete`` on a copy of examples/demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ambientctl import cli
from ambientctl.embedded.layout import WaypointSpec, load_documents, load_layout, objects_of
from ambientctl.waypointcmd import (
    WaypointCommandError,
    apply_waypoint,
    free_address,
    ip_strings,
    is_waypoint,
    read_config_dir,
    waypoint_rows,
)

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"

# What `istioctl waypoint generate --for service -n demo` prints.
ISTIOCTL_GENERATE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: service
  name: waypoint
  namespace: demo
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"""


def waypoint_files(directory: Path) -> list[Path]:
    return sorted(
        path for path in directory.rglob("*.yaml")
        if any(is_waypoint(obj) for obj in objects_of(path, load_documents(path)))
    )  # fmt: skip


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A copy of the demo without its own waypoint files, so the tests start from no waypoint
    whatever the demo grows (the demo as shipped has its own test below)."""
    target = tmp_path / "demo"
    shutil.copytree(DEMO, target)
    for path in waypoint_files(target):
        path.unlink()
    return target


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["waypoint", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def documents(path: Path) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- generate ----------------------------------------------------------------------------------


def test_generate_prints_what_istioctl_prints(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "generate", "-n", "demo")
    assert code == 0
    assert out == ISTIOCTL_GENERATE


@pytest.mark.parametrize("waypoint_for", ["service", "workload", "all", "none"])
def test_generate_with_options(capsys: pytest.CaptureFixture[str], waypoint_for: str) -> None:
    code, out, _ = run(
        capsys, "generate", "reviews-wp", "-n", "bookinfo", "--for", waypoint_for,
        "--address", "127.0.40.9",
    )  # fmt: skip
    assert code == 0
    assert yaml.safe_load(out) == {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": "reviews-wp",
            "namespace": "bookinfo",
            "labels": {"istio.io/waypoint-for": waypoint_for},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "addresses": [{"type": "IPAddress", "value": "127.0.40.9"}],
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def test_generate_accepts_istioctls_name_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "generate", "--name", "wp")
    assert code == 0
    assert yaml.safe_load(out)["metadata"] == {
        "name": "wp", "namespace": "default", "labels": {"istio.io/waypoint-for": "service"}
    }  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--for", "everything"], "invalid choice: 'everything'"),
        (["generate", "Bad_Name"], "'Bad_Name' is not a valid object name"),
        (["generate", "-n", "Demo"], "'Demo' is not a valid namespace name"),
        (["generate", "--address", "127.0.40"], "'127.0.40' is not an IP address"),
        (["generate", "a", "--name", "b"], "two names given: 'a' and --name 'b'"),
        (["apply", "-n", "demo"], "the following arguments are required: -f/--file"),
        (["delete", "-f", "x"], "the following arguments are required: NAME"),
        (["status", "--address", "127.0.40.1"], "--address needs the waypoint's NAME"),
        (["list", "-f", "x", "-o", "xml"], "unknown output format 'xml'"),
        ([], "required: ACTION"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


# -- apply -------------------------------------------------------------------------------------


def test_apply_writes_a_gateway_the_mesh_starts(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "apply", "-n", "demo", "-f", str(demo))
    assert code == 0
    path = demo / "waypoint-demo.waypoint.yaml"
    assert f"waypoint demo/waypoint applied at 127.0.40.1 ({path})" in out
    assert path.read_text().startswith("# Written by `ambientctl waypoint apply`")
    (gateway,) = documents(path)
    code, generated, _ = run(capsys, "generate", "-n", "demo", "--address", "127.0.40.1")
    assert gateway == yaml.safe_load(generated)
    assert path.stat().st_mode & 0o777 == 0o644
    # The embedded supervisor reads it as a waypoint to run.
    assert load_layout(demo).waypoints == (
        WaypointSpec("demo", "waypoint", "127.0.40.1", "waypoint"),
    )


def test_addresses_are_allocated_past_everything_in_use(demo: Path) -> None:
    (demo / "extra.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "squatter", "namespace": "demo"},
                        "status": {"podIP": "127.0.40.1"}})
    )  # fmt: skip
    first = apply_waypoint(demo, "one", "demo")
    second = apply_waypoint(demo, "two", "legacy")
    assert (first.address, second.address) == ("127.0.40.2", "127.0.40.3")
    # Re-applying keeps the waypoint's address and updates what it is for.
    again = apply_waypoint(demo, "one", "demo", waypoint_for="all")
    assert again.address == "127.0.40.2"
    (gateway,) = documents(again.path)
    assert gateway["metadata"]["labels"] == {"istio.io/waypoint-for": "all"}  # type: ignore[index]


def test_free_address_and_ip_strings() -> None:
    assert sorted(ip_strings({"a": ["127.0.0.1", {"b": "not-an-ip"}], "c": 7, "d": "::1"})) == [
        "127.0.0.1", "::1"
    ]  # fmt: skip
    assert free_address([]) == "127.0.40.1"
    assert free_address(["127.0.40.1", "127.0.40.3"]) == "127.0.40.2"
    with pytest.raises(WaypointCommandError, match="every address of 127.0.40.0/24 is used"):
        free_address(f"127.0.40.{i}" for i in range(1, 255))


def test_apply_refuses_an_address_in_use(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "apply", "-n", "demo", "--address", "127.0.20.3", "-f", str(demo))
    assert code == 1
    assert "address 127.0.20.3 is already used by Pod httpbin-v1" in err
    assert not (demo / "waypoint-demo.waypoint.yaml").exists()


def test_apply_refuses_a_gateway_written_by_hand(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hand = demo / "50-mine.yaml"
    hand.write_text(ISTIOCTL_GENERATE)
    code, _, err = run(capsys, "apply", "-n", "demo", "-f", str(demo))
    assert code == 1
    assert f"Gateway demo/waypoint is already defined in {hand}; edit that file" in err


def test_enroll_namespace_edits_the_namespace_in_place(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespaces = demo / "00-namespaces.yaml"
    header = [line for line in namespaces.read_text().splitlines() if line.startswith("#")]
    code, out, _ = run(capsys, "apply", "-n", "demo", "--enroll-namespace", "-f", str(demo))
    assert code == 0
    assert f'namespace demo labeled with "istio.io/use-waypoint: waypoint" ({namespaces})' in out
    text = namespaces.read_text()
    assert text.splitlines()[: len(header)] == header  # the leading comments survive
    demo_ns, legacy_ns = documents(namespaces)
    assert demo_ns["metadata"] == {  # type: ignore[comparison-overlap]
        "name": "demo",
        "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"},
    }
    assert legacy_ns == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy"}}


def test_enroll_a_namespace_in_a_list_file(demo: Path) -> None:
    (demo / "60-list.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "List",
        "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}],
    }))  # fmt: skip
    applied = apply_waypoint(demo, "shop-wp", "shop", enroll=True)
    assert applied.enrolled == demo / "60-list.yaml"
    (listing,) = documents(demo / "60-list.yaml")
    assert listing["items"][0]["metadata"]["labels"] == {  # type: ignore[index]
        "istio.io/use-waypoint": "shop-wp"
    }


def test_enrolling_a_missing_namespace_writes_nothing(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "apply", "-n", "nowhere", "--enroll-namespace", "-f", str(demo))
    assert code == 1
    assert "no Namespace 'nowhere' in the config directory" in err
    assert not list(demo.glob("waypoint-*"))


def test_apply_to_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "apply", "-f", str(tmp_path / "nope"))
    assert code == 1
    assert "does not exist" in err


def test_the_demo_as_shipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's own waypoints are hand-written: apply and delete leave them alone, and a new
    waypoint gets an address none of them uses."""
    shipped = waypoint_files(DEMO)
    if not shipped:
        pytest.skip("the demo has no waypoint of its own")
    demo = tmp_path / "demo"
    shutil.copytree(DEMO, demo)
    rows = waypoint_rows(read_config_dir(demo), None, demo)
    first = rows[0]
    code, _, err = run(capsys, "delete", first["name"], "-n", first["namespace"], "-f", str(demo))
    assert code == 1 and "which `ambientctl waypoint apply` did not write" in err
    code, _, err = run(capsys, "apply", first["name"], "-n", first["namespace"], "-f", str(demo))
    assert code == 1 and "is already defined in" in err
    applied = apply_waypoint(demo, "extra", "legacy")
    assert applied.address not in {r["address"] for r in rows}
    assert {w.key for w in load_layout(demo).waypoints} == {
        *(f"{r['namespace']}/{r['name']}" for r in rows),
        "legacy/extra",
    }


# -- list --------------------------------------------------------------------------------------


def test_list_shows_waypoints_and_their_users(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "list", "-n", "demo", "-f", str(demo))
    assert (code, out) == (0, "No waypoints found in namespace demo.\n")
    apply_waypoint(demo, "wp-a", "demo", enroll=True)
    apply_waypoint(demo, "legacy-wp", "legacy", waypoint_for="workload", address="127.0.41.7")
    # A Service in another namespace that names the legacy waypoint explicitly.
    (demo / "70-svc.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": "demo",
                     "labels": {"istio.io/use-waypoint": "legacy-wp",
                                "istio.io/use-waypoint-namespace": "legacy"}},
    }))  # fmt: skip
    code, out, _ = run(capsys, "list", "-A", "-f", str(demo))
    assert code == 0
    assert out.splitlines() == [
        "NAMESPACE NAME      FOR      ADDRESS    USED BY",
        "demo      wp-a      service  127.0.40.1 namespace/demo",
        "legacy    legacy-wp workload 127.0.41.7 service/demo/api",
    ]
    code, out, _ = run(capsys, "list", "-n", "legacy", "-o", "json", "-f", str(demo))
    assert json.loads(out) == [
        {"namespace": "legacy", "name": "legacy-wp", "for": "workload", "address": "127.0.41.7",
         "used_by": ["service/demo/api"], "file": "waypoint-legacy.legacy-wp.yaml"},
    ]  # fmt: skip


# -- delete ------------------------------------------------------------------------------------


def test_delete_removes_what_apply_wrote(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    applied = apply_waypoint(demo, "waypoint", "demo", enroll=True)
    code, out, _ = run(capsys, "delete", "waypoint", "-n", "demo", "-f", str(demo))
    assert code == 0
    assert f"waypoint demo/waypoint deleted ({applied.path})" in out
    assert "note: still labelled istio.io/use-waypoint=waypoint: namespace/demo" in out
    assert not applied.path.exists()
    assert load_layout(demo).waypoints == ()
    code, _, err = run(capsys, "delete", "waypoint", "-n", "demo", "-f", str(demo))
    assert code == 1
    assert "no waypoint Gateway demo/waypoint in" in err


def test_delete_refuses_a_hand_written_gateway(
    demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hand = demo / "50-mine.yaml"
    hand.write_text(ISTIOCTL_GENERATE)
    applied = apply_waypoint(demo, "other", "demo")
    code, _, err = run(capsys, "delete", "other", "waypoint", "-n", "demo", "-f", str(demo))
    assert code == 1
    assert f"Gateway demo/waypoint is in {hand}, which `ambientctl waypoint apply` did not" in err
    # All or nothing: the deletable one is still there too.
    assert hand.exists() and applied.path.exists()


# -- status ------------------------------------------------------------------------------------


def test_status_without_a_running_mesh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "-n", "demo", "--state-dir", str(tmp_path))
    assert code == 1
    assert "no running embedded mesh" in err


def test_status_of_a_waypoint_the_mesh_does_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mesh.json").write_text(json.dumps({
        "nodes": {"n1": "127.0.10.1"}, "waypoints": {"demo/waypoint": "127.0.40.1"},
    }))  # fmt: skip
    code, _, err = run(capsys, "status", "other", "-n", "demo", "--state-dir", str(tmp_path))
    assert code == 1
    assert "the running mesh has no waypoint demo/other (it has: demo/waypoint)" in err
