"""Process lifecycle of the embedded-mesh supervisor: start, crash detection, draining,
SIGKILL after the drain timeout, no orphans; the sample apps as child processes; and, when
istiod_lite and ztunnel are runnable, a whole embedded mesh."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import trio
import yaml

from ambientctl import cli
from ambientctl.apps import http_get
from ambientctl.embedded.errors import EmbeddedError
from ambientctl.embedded.layout import (
    MeshLayout,
    WaypointSpec,
    layout_from_objects,
    load_layout,
    read_objects,
)
from ambientctl.embedded.mesh import EmbeddedMesh, run_embedded
from ambientctl.embedded.state_dir import StatePaths, write_bootstrap_tokens
from ambientctl.embedded.supervisor import live_cmdline, open_supervisor, reap_stale_children
from ambientctl.waypointcmd import apply_waypoint, delete_waypoints
from tests.conftest import LoopbackAllocator

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)",
]
# Starts a grandchild in the same process group and prints its pid.
PARENT_OF_GRANDCHILD = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(p.pid, flush=True); time.sleep(60)",
]


def alive(pid: int) -> bool:
    """Running and not a zombie (a killed grandchild may wait for a reaper a while)."""
    return live_cmdline(pid) is not None


async def wait_for_log(path: Path, text: str, timeout: float = 10) -> str:
    with trio.fail_after(timeout):
        while text not in (content := path.read_text() if path.exists() else ""):
            await trio.sleep(0.02)
    return content


async def test_start_and_clean_shutdown(tmp_path: Path) -> None:
    async with open_supervisor(tmp_path / "logs", drain_timeout=5) as supervisor:
        first = await supervisor.start("one", SLEEPER)
        second = await supervisor.start("two", SLEEPER)
        await wait_for_log(supervisor.log_path("one"), "up")
        assert supervisor.is_running("one") and supervisor.is_running("two")
        pids = [first.pid, second.pid]
    assert not any(alive(pid) for pid in pids)
    assert {(e.name, e.returncode, e.expected) for e in supervisor.exits} == {
        ("one", -signal.SIGTERM, True),
        ("two", -signal.SIGTERM, True),
    }
    assert supervisor.unexpected_exits == []


async def test_a_crash_is_detected_and_logged(tmp_path: Path) -> None:
    crasher = [sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(3)"]
    async with open_supervisor(tmp_path / "logs", drain_timeout=5) as supervisor:
        await supervisor.start("sleeper", SLEEPER)
        await supervisor.start("crasher", crasher)
        assert await supervisor.wait_exit("crasher") == 3
        # The others keep running: one crash does not take the mesh down.
        assert supervisor.is_running("sleeper")
    (crash,) = supervisor.unexpected_exits
    assert (crash.name, crash.returncode) == ("crasher", 3)
    assert "boom" in supervisor.log_path("crasher").read_text()


async def test_sigkill_after_the_drain_timeout(tmp_path: Path) -> None:
    async with open_supervisor(tmp_path / "logs", drain_timeout=0.3) as supervisor:
        process = await supervisor.start("stubborn", STUBBORN)
        await wait_for_log(supervisor.log_path("stubborn"), "ready")
        with trio.fail_after(5):
            assert await supervisor.stop("stubborn") == -signal.SIGKILL
        assert not alive(process.pid)
    assert supervisor.unexpected_exits == []


async def test_cancellation_drains_children_and_their_children(tmp_path: Path) -> None:
    with trio.move_on_after(60) as scope:
        async with open_supervisor(tmp_path / "logs", drain_timeout=0.5) as supervisor:
            parent = await supervisor.start("parent", PARENT_OF_GRANDCHILD)
            await supervisor.start("stubborn", STUBBORN)
            log = await wait_for_log(supervisor.log_path("parent"), "\n")
            grandchild = int(log.split()[0])
            await wait_for_log(supervisor.log_path("stubborn"), "ready")
            assert alive(grandchild)
            scope.cancel()  # as Ctrl-C does in `ambientctl up`
            await trio.sleep_forever()
    assert scope.cancelled_caught
    with trio.fail_after(5):
        while alive(grandchild):
            await trio.sleep(0.02)
    assert not alive(parent.pid)
    assert all(e.expected for e in supervisor.exits)


async def test_stop_and_restart_by_name(tmp_path: Path) -> None:
    pid_file = tmp_path / "children.json"
    async with open_supervisor(tmp_path / "logs", drain_timeout=5, pid_file=pid_file) as sup:
        old = await sup.start("svc", SLEEPER)
        assert json.loads(pid_file.read_text())["svc"]["pid"] == old.pid
        new = await sup.restart("svc")
        assert new.pid != old.pid and not alive(old.pid) and sup.is_running("svc")
        assert json.loads(pid_file.read_text())["svc"]["pid"] == new.pid
        assert await sup.stop("svc") == -signal.SIGTERM
        assert not sup.is_running("svc")
        with pytest.raises(KeyError, match="no process named 'nope'"):
            await sup.stop("nope")
    assert sup.unexpected_exits == []
    assert json.loads(pid_file.read_text()) == {}


async def test_stale_children_of_a_killed_supervisor_are_reaped(tmp_path: Path) -> None:
    orphan = subprocess.Popen(SLEEPER, process_group=0, stdout=subprocess.DEVNULL)
    bystander = subprocess.Popen(SLEEPER, process_group=0, stdout=subprocess.DEVNULL)
    try:
        pid_file = tmp_path / "children.json"
        pid_file.write_text(
            json.dumps(
                {
                    "istiod": {"pid": orphan.pid, "argv": SLEEPER},
                    # A recorded pid whose command line no longer matches: a reused pid.
                    "ztunnel-a": {"pid": bystander.pid, "argv": ["something", "else"]},
                }
            )
        )
        assert await reap_stale_children(pid_file) == [orphan.pid]
        assert orphan.wait(timeout=5) == -signal.SIGTERM
        assert bystander.poll() is None
        assert not pid_file.exists()
    finally:
        for process in (orphan, bystander):
            process.kill()
            process.wait()


async def test_sample_apps_run_as_child_processes(
    tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    node, pod_ip = loopback.new(), loopback.new()
    config = tmp_path / "config"
    config.mkdir()
    docs = [
        {"kind": "Node", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": node}]}},
        {"kind": "Pod", "metadata": {"name": "echo", "namespace": "apps"},
         "spec": {"containers": [{"name": "c", "ports": [
             {"containerPort": 8080, "name": "http"}, {"containerPort": 9000, "name": "tcp"}]}]},
         "status": {"podIP": pod_ip}},
    ]  # fmt: skip
    (config / "mesh.yaml").write_text(yaml.safe_dump_all(docs))
    paths = StatePaths(tmp_path / "state")
    paths.create()
    async with open_supervisor(paths.logs_dir, drain_timeout=5) as supervisor:
        mesh = EmbeddedMesh(config, paths, load_layout(config), supervisor, ready_timeout=15)
        await mesh.start_apps()
        async with await trio.open_tcp_stream(pod_ip, 8080) as stream:
            status, _, body = await http_get(stream, "echo", "/")
        assert status == 200 and json.loads(body)["pod"] == "echo"
        async with await trio.open_tcp_stream(pod_ip, 9000) as stream:
            await stream.send_all(b"hello")
            await stream.send_eof()
            assert await stream.receive_some(100) == b"hello"
            assert await stream.receive_some(100) == b""
        assert sorted(supervisor.names()) == ["app-apps-echo-8080", "app-apps-echo-9000"]
    # The apps exit 0 on SIGTERM: a clean stop, not a kill.
    assert {e.returncode for e in supervisor.exits} == {0}


MESH_PARTS_PRESENT = all(
    importlib.util.find_spec(name) is not None
    for name in ("istiod_lite.__main__", "ztunnel.__main__")
)


@pytest.mark.slow
@pytest.mark.skipif(not MESH_PARTS_PRESENT, reason="istiod_lite or ztunnel has no __main__ yet")
async def test_whole_embedded_mesh(
    tmp_path: Path, loopback: LoopbackAllocator, capsys: pytest.CaptureFixture[str]
) -> None:
    """istiod_lite + one ztunnel + an app: ready, visible in ztunnel-config, drained."""
    node, pod_ip, istiod = loopback.new(), loopback.new(), loopback.new()
    config = tmp_path / "config"
    config.mkdir()
    docs = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "apps", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": node}]}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "echo", "namespace": "apps"}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "echo", "namespace": "apps", "labels": {"app": "echo"}},
         "spec": {"nodeName": "n1", "serviceAccountName": "echo",
                  "containers": [{"name": "echo", "image": "echo",
                                  "ports": [{"containerPort": 8080, "name": "http"}]}]},
         "status": {"podIP": pod_ip, "phase": "Running"}},
    ]  # fmt: skip
    (config / "mesh.yaml").write_text(yaml.safe_dump_all(docs))
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        mesh: EmbeddedMesh = await nursery.start(
            lambda task_status: run_embedded(
                config, state, istiod_host=istiod, ready_timeout=60, task_status=task_status
            )
        )
        mesh_json = json.loads((state / "mesh.json").read_text())
        assert mesh_json["nodes"] == {"n1": node}
        assert mesh_json["pods"] == {"apps/echo": pod_ip}
        argv = ["ztunnel-config", "workloads", "--node", "n1", "--state-dir", str(state)]
        assert await trio.to_thread.run_sync(cli.main, argv) == 0
        assert "echo" in capsys.readouterr().out
        old_istiod = mesh.supervisor.process("istiod").pid
        await mesh.restart_istiod()
        assert mesh.supervisor.process("istiod").pid != old_istiod
        await mesh.wait_ready(30)
        pids = [mesh.supervisor.process(name).pid for name in mesh.supervisor.names()]
        nursery.cancel_scope.cancel()
    assert not (state / "mesh.json").exists()
    assert not any(alive(pid) for pid in pids)
    assert mesh.supervisor.unexpected_exits == []
    assert os.stat(state / "bootstrap-tokens.yaml").st_mode & 0o077 == 0


# -- waypoints -----------------------------------------------------------------------------------
# Until `python -m waypoint` exists these use a stand-in process that serves the waypoint's
# readiness and admin endpoints; they prove the supervisor's handling (start, follow the config
# directory, stop, probe), not the waypoint.

STANDIN_WAYPOINT = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
address, identity = sys.argv[1], sys.argv[2]
DUMP = {"certificates": [{"identity": identity, "state": "Available", "certChain": [
    {"serialNumber": "1f", "validFrom": "2020-01-01T00:00:00Z",
     "expirationTime": "2999-01-01T00:00:00Z"}]}]}
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ready\n" if self.path == "/healthz/ready" else json.dumps(DUMP).encode()
        self.send_response(200 if self.path in ("/healthz/ready", "/config_dump") else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer.allow_reuse_address = True
admin, readiness = (ThreadingHTTPServer((address, port), Handler) for port in (15000, 15021))
threading.Thread(target=admin.serve_forever, daemon=True).start()
print("serving", flush=True)
readiness.serve_forever()
"""


def standin_waypoint(waypoint: WaypointSpec, _paths: StatePaths, _xds: str) -> list[str]:
    identity = f"spiffe://cluster.local/ns/{waypoint.namespace}/sa/{waypoint.service_account}"
    return [sys.executable, "-c", STANDIN_WAYPOINT, waypoint.address, identity]


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


async def test_waypoints_applied_while_the_mesh_runs_are_started_and_stopped(
    tmp_path: Path, loopback: LoopbackAllocator, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "ns.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}})
    )
    paths = StatePaths(tmp_path / "state")
    paths.create()
    first, second = loopback.new(), loopback.new()
    async with open_supervisor(
        paths.logs_dir, drain_timeout=5, pid_file=paths.children_file
    ) as supervisor:
        mesh = EmbeddedMesh(
            config, paths, load_layout_without_nodes(config), supervisor, ready_timeout=15,
            waypoint_command=standin_waypoint,
        )  # fmt: skip
        mesh.write_mesh_state()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mesh.watch_waypoints, 0.05)
            apply_waypoint(config, "wp", "apps", address=first, enroll=True)
            await wait_until(lambda: supervisor.is_running("waypoint-apps.wp"))
            assert json.loads(paths.mesh_file.read_text())["waypoints"] == {"apps/wp": first}
            tokens = yaml.safe_load(paths.bootstrap_tokens.read_text())
            assert set(tokens) == {"serviceaccount:apps/wp"}
            await mesh.wait_ready(10)

            argv = ["waypoint", "status", "wp", "-n", "apps", "--state-dir", str(paths.root)]
            capsys.readouterr()
            assert await trio.to_thread.run_sync(cli.main, argv) == 0
            lines = capsys.readouterr().out.splitlines()  # structlog may log here too
            start = next(i for i, line in enumerate(lines) if line.startswith("NAMESPACE"))
            header, row = lines[start : start + 2]
            assert header.split()[:5] == ["NAMESPACE", "NAME", "ADDRESS", "PROCESS", "READY"]
            identity = "spiffe://cluster.local/ns/apps/sa/wp"
            assert row.split()[:7] == [
                "apps",
                "wp",
                first,
                "running",
                "true",
                identity,
                "Available",
            ]

            # A changed address restarts the waypoint on the new one.
            old_pid = supervisor.process("waypoint-apps.wp").pid
            apply_waypoint(config, "wp", "apps", address=second)
            await wait_until(
                lambda: (
                    supervisor.is_running("waypoint-apps.wp")
                    and supervisor.process("waypoint-apps.wp").pid != old_pid
                )
            )
            await mesh.wait_ready(10)
            assert mesh.waypoints == {"apps/wp": second}

            delete_waypoints(config, ["wp"], "apps")
            await wait_until(lambda: not supervisor.is_running("waypoint-apps.wp"))
            await wait_until(lambda: mesh.waypoints == {})
            assert json.loads(paths.mesh_file.read_text())["waypoints"] == {}
            nursery.cancel_scope.cancel()
    assert supervisor.unexpected_exits == []
    assert [e.name for e in supervisor.exits] == ["waypoint-apps.wp"] * 2


def load_layout_without_nodes(config: Path) -> MeshLayout:
    return layout_from_objects(read_objects(config))


async def test_wait_ready_names_a_waypoint_that_died(
    tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    paths = StatePaths(tmp_path / "state")
    paths.create()
    waypoint = WaypointSpec("apps", "wp", loopback.new(), "wp")
    layout = MeshLayout((), (), {}, (waypoint,))
    async with open_supervisor(paths.logs_dir, drain_timeout=5) as supervisor:
        mesh = EmbeddedMesh(
            tmp_path, paths, layout, supervisor,
            waypoint_command=lambda *_: [sys.executable, "-c", "raise SystemExit(4)"],
        )  # fmt: skip
        await mesh.start_waypoints()
        assert await supervisor.wait_exit("waypoint-apps.wp") == 4
        with pytest.raises(EmbeddedError, match="waypoint apps/wp is not running; see .*"):
            await mesh.wait_ready(5)


def test_status_probes_a_waypoint_by_address(
    tmp_path: Path, loopback: LoopbackAllocator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens there: not ready, exit 1, the reason shown with -o wide."""
    address = loopback.new()
    argv = ["waypoint", "status", "wp", "-n", "apps", "--address", address, "-o", "json"]
    assert cli.main(argv) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["address"], row["process"], row["ready"]) == (address, "unknown", False)
    assert f"http://{address}:15021/healthz/ready" in row["reason"]


@pytest.mark.slow
@pytest.mark.skipif(not MESH_PARTS_PRESENT, reason="istiod_lite has no __main__ yet")
async def test_a_new_waypoint_identity_restarts_istiod_with_its_token(
    tmp_path: Path, loopback: LoopbackAllocator
) -> None:
    """istiod reads the bootstrap tokens at start: a waypoint with a new service account gets
    a token and istiod is restarted before the waypoint starts; a known one changes nothing."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "ns.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}})
    )
    paths = StatePaths(tmp_path / "state")
    paths.create()
    layout = load_layout_without_nodes(config)
    write_bootstrap_tokens(paths, layout.nodes, layout.waypoints)
    async with open_supervisor(paths.logs_dir, drain_timeout=5) as supervisor:
        mesh = EmbeddedMesh(
            config.resolve(), paths, layout, supervisor, istiod_host=loopback.new(),
            ready_timeout=30, waypoint_command=standin_waypoint,
        )  # fmt: skip
        await mesh.start_istiod()
        first_istiod = supervisor.process("istiod").pid
        waypoint = WaypointSpec("apps", "wp", loopback.new(), "wp")
        started, stopped = await mesh.sync_waypoints([waypoint])
        assert (started, stopped) == (["waypoint-apps.wp"], [])
        assert supervisor.process("istiod").pid != first_istiod
        assert "serviceaccount:apps/wp" in yaml.safe_load(paths.bootstrap_tokens.read_text())
        second_istiod = supervisor.process("istiod").pid
        moved = WaypointSpec("apps", "wp", loopback.new(), "wp")
        assert await mesh.sync_waypoints([moved]) == (["waypoint-apps.wp"], ["waypoint-apps.wp"])
        assert supervisor.process("istiod").pid == second_istiod  # same identity: no restart
        await mesh.wait_ready(10)
    assert supervisor.unexpected_exits == []


async def test_the_waypoint_watcher_reports_each_problem_once(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "wp", "namespace": "apps"},
               "spec": {"gatewayClassName": "istio-waypoint"}}  # fmt: skip
    (config / "wp.yaml").write_text(yaml.safe_dump(gateway))
    paths = StatePaths(tmp_path / "state")
    paths.create()
    async with open_supervisor(paths.logs_dir, drain_timeout=5) as supervisor:
        mesh = EmbeddedMesh(config, paths, MeshLayout((), (), {}), supervisor)
        with structlog.testing.capture_logs() as logs, trio.move_on_after(0.3):
            await mesh.watch_waypoints(0.02)
        (config / "broken.yaml").write_text("kind: [\n")
        with structlog.testing.capture_logs() as later, trio.move_on_after(0.3):
            await mesh.watch_waypoints(0.02)
    assert [e["event"] for e in logs] == [
        f"{config / 'wp.yaml'}: waypoint Gateway apps/wp has no spec.addresses entry of type "
        "IPAddress; not starting it (`ambientctl waypoint apply` assigns one)"
    ]
    (problem,) = [e["event"] for e in later]
    assert problem.startswith("cannot read waypoints; keeping the running ones: ")
    assert "broken.yaml" in problem
    assert supervisor.names() == []
