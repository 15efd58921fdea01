"""``ambientctl lab`` for real (root only): namespaces, links, routes, connectivity, and that
``down`` leaves nothing behind, also after a crash in the middle of ``up``."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from ambientctl import cli
from ambientctl.embedded.layout import read_objects
from ambientctl.lab.errors import LabError
from ambientctl.lab.mesh import run_lab
from ambientctl.lab.netns import CommandResult, existing_netns, run_command
from ambientctl.lab.network import apply_plan, build_network, take_down
from ambientctl.lab.plan import plan_lab
from ambientctl.lab.state import LabPaths, LabRecord, read_record
from tests.integration.netns_helpers import netns_unusable

REASON = netns_unusable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 127.0.10.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 127.0.10.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {nodeName: node-1, containers: [{name: c, image: curl}]}
status: {podIP: 127.0.20.1}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: demo}
spec:
  nodeName: node-2
  containers: [{name: s, image: echo, ports: [{name: tcp-echo, containerPort: 9000}]}]
status: {podIP: 127.0.20.2}
---
apiVersion: v1
kind: Pod
metadata: {name: neighbour, namespace: demo}
spec: {nodeName: node-1, containers: [{name: n, image: curl}]}
"""

# A TCP echo naming the peer it saw, so the test also sees that no NAT is involved.
ECHO_SERVER = textwrap.dedent("""\
    import socket, sys
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((sys.argv[1], 9000))
    listener.listen()
    while True:
        conn, peer = listener.accept()
        with conn:
            conn.sendall(b"from " + peer[0].encode() + b": " + conn.recv(100))
""")
ECHO_CLIENT = textwrap.dedent("""\
    import socket, sys, time
    deadline = time.monotonic() + 5
    while True:
        try:
            conn = socket.create_connection((sys.argv[1], 9000), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn.sendall(b"hello")
    print(conn.recv(100).decode())
""")

_COUNTER = itertools.count()


@pytest.fixture
def lab_name() -> str:
    return f"lt{os.getpid() % 100000}x{next(_COUNTER)}{secrets.token_hex(2)}"


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "yaml"
    directory.mkdir()
    (directory / "cluster.yaml").write_text(CLUSTER)
    return directory


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "lab"
    yield directory
    # Whatever a failing test left, the lab's own down removes.
    if (directory / "lab.json").exists():
        take_down(LabPaths(directory), timeout=1.0)


def host_links() -> list[str]:
    result = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return sorted(line.split(":")[1].strip() for line in result.stdout.splitlines())


def host_routes() -> str:
    return subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout


def lab_netns(name: str) -> set[str]:
    return {ns for ns in existing_netns() if ns.startswith(f"{name}-")}


def ambientctl(*argv: str) -> int:
    return cli.main(list(argv))


def lab_exec(state_dir: Path, pod: str, command: Sequence[str]) -> int:
    return ambientctl("lab", "exec", "--state-dir", str(state_dir), pod, "--", *command)


def test_pods_on_two_nodes_talk_and_down_leaves_nothing(
    config_dir: Path, state_dir: Path, lab_name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    links_before, routes_before = host_links(), host_routes()
    assert ambientctl("lab", "up", "--no-mesh", "-f", str(config_dir),
                      "--state-dir", str(state_dir), "--name", lab_name) == 0  # fmt: skip
    assert "demo/server=10.244.2.2" in capfd.readouterr().out
    assert lab_netns(lab_name) == {
        f"{lab_name}-wire", f"{lab_name}-control", f"{lab_name}-node-node-1",
        f"{lab_name}-node-node-2", f"{lab_name}-pod-demo.client",
        f"{lab_name}-pod-demo.server", f"{lab_name}-pod-demo.neighbour",
    }  # fmt: skip
    # The host's namespace got no link, address or route.
    assert host_links() == links_before
    assert host_routes() == routes_before

    # istiod_lite reads a copy of the YAML with the lab's addresses.
    rewritten = (state_dir / "config" / "cluster.yaml").read_text()
    assert "10.244.2.2" in rewritten and "127.0.20.2" not in rewritten
    netns_map = json.loads((state_dir / "netns" / "node-1.json").read_text())
    assert netns_map == {
        "Kubernetes//Pod/demo/client": f"/var/run/netns/{lab_name}-pod-demo.client",
        "Kubernetes//Pod/demo/neighbour": f"/var/run/netns/{lab_name}-pod-demo.neighbour",
    }

    assert ambientctl("lab", "status", "--state-dir", str(state_dir), "-o", "json") == 0
    status = json.loads(capfd.readouterr().out)
    assert {p["pod"]: p["ip"] for p in status["pods"]} == {
        "demo/client": "10.244.1.2", "demo/server": "10.244.2.2", "demo/neighbour": "10.244.1.3",
    }  # fmt: skip
    assert all(ns["present"] for ns in status["namespaces"])
    server_links = next(n for n in status["namespaces"] if n["role"] == "pod demo/server")
    assert "eth0:UP" in server_links["links"]

    server = subprocess.Popen(
        [sys.executable, "-m", "ambientctl", "lab", "exec", "--state-dir", str(state_dir),
         "demo/server", "--", sys.executable, "-c", ECHO_SERVER, "10.244.2.2"],
    )  # fmt: skip
    try:
        # Across nodes (pod -> node -> bridge -> node -> pod), source address preserved.
        assert lab_exec(state_dir, "client", [sys.executable, "-c", ECHO_CLIENT, "10.244.2.2"]) == 0
        assert capfd.readouterr().out == "from 10.244.1.2: hello\n"
        # From the other pod of node-1.
        neighbour_client = [sys.executable, "-c", ECHO_CLIENT, "10.244.2.2"]
        assert lab_exec(state_dir, "neighbour", neighbour_client) == 0
        assert capfd.readouterr().out == "from 10.244.1.3: hello\n"
        # The exit code of the command comes back.
        assert lab_exec(state_dir, "demo/neighbour", ["sh", "-c", "exit 7"]) == 7
        # An unknown pod is named.
        assert lab_exec(state_dir, "ghost", ["true"]) == 1
        assert "no pod 'ghost'" in capfd.readouterr().err

        assert ambientctl("lab", "down", "--state-dir", str(state_dir), "--timeout", "2") == 0
        # down stopped the server (a process inside a lab namespace).
        assert server.wait(timeout=5) != 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert f"lab {lab_name} removed" in capfd.readouterr().out
    assert lab_netns(lab_name) == set()
    assert host_links() == links_before
    assert host_routes() == routes_before
    assert not (state_dir / "lab.json").exists()
    assert ambientctl("lab", "down", "--state-dir", str(state_dir)) == 0
    assert "nothing to do" in capfd.readouterr().out


class SimulatedCrash(BaseException):
    """Stands for SIGKILL in the middle of `lab up`: nothing after it runs, no cleanup."""


def test_down_after_a_crash_in_the_middle_of_up(
    config_dir: Path, state_dir: Path, lab_name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    links_before = host_links()
    plan = plan_lab(read_objects(config_dir), name=lab_name)
    paths = LabPaths(state_dir)
    calls = itertools.count(1)
    crash_at = len(plan.steps) * 2 // 3  # inside the pods' steps

    def crashing(argv: Sequence[str]) -> CommandResult:
        if next(calls) == crash_at:
            raise SimulatedCrash
        return run_command(argv)

    with pytest.raises(SimulatedCrash):
        apply_plan(LabRecord(plan, mesh=False), paths, run=crashing)
    recorded = read_record(paths)
    assert recorded is not None and recorded.begun == crash_at and not recorded.complete
    assert len(lab_netns(lab_name)) >= 4
    # Somebody already removed one namespace by hand: down copes.
    subprocess.run(["ip", "netns", "delete", f"{lab_name}-node-node-2"], check=True)

    assert ambientctl("lab", "down", "--state-dir", str(state_dir)) == 0
    assert lab_netns(lab_name) == set()
    assert host_links() == links_before
    assert not paths.state_file.exists()


def test_a_second_down_finishes_what_the_first_could_not(
    config_dir: Path, state_dir: Path, lab_name: str
) -> None:
    paths = LabPaths(state_dir)
    build_network(config_dir, paths, name=lab_name, mesh=False)
    wire = f"{lab_name}-wire"

    def refusing_wire(argv: Sequence[str]) -> CommandResult:
        if list(argv) == ["ip", "netns", "delete", wire]:
            return CommandResult(1, "", "Device or resource busy")
        return run_command(argv)

    with pytest.raises(LabError, match=f"{wire} could not be removed .*busy.*down` again"):
        take_down(paths, timeout=1.0, run=refusing_wire)
    assert lab_netns(lab_name) == {wire}
    assert paths.state_file.exists()
    report = take_down(paths, timeout=1.0)
    assert report.name == lab_name
    assert lab_netns(lab_name) == set()
    assert not paths.state_file.exists()


def test_a_failing_up_removes_what_it_made_and_refuses_clashes(
    config_dir: Path, state_dir: Path, lab_name: str, tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    paths = LabPaths(state_dir)
    calls = itertools.count(1)

    def failing(argv: Sequence[str]) -> CommandResult:
        if next(calls) == 20:
            return CommandResult(2, "", "RTNETLINK answers: Operation not permitted")
        return run_command(argv)

    with pytest.raises(LabError, match="step 19/.* failed: RTNETLINK answers: Operation not"):
        build_network(config_dir, paths, name=lab_name, mesh=False, run=failing)
    assert lab_netns(lab_name) == set()
    assert read_record(paths) is None

    up = ["lab", "up", "--no-mesh", "-f", str(config_dir), "--name", lab_name]
    assert ambientctl(*up, "--state-dir", str(state_dir)) == 0
    capfd.readouterr()
    # The same state directory already holds a lab.
    assert ambientctl(*up, "--state-dir", str(state_dir)) == 1
    assert "already recorded" in capfd.readouterr().err
    # Another state directory, same name: the namespaces exist; nothing is touched.
    assert ambientctl(*up, "--state-dir", str(tmp_path / "other")) == 1
    assert "already exist" in capfd.readouterr().err
    assert len(lab_netns(lab_name)) == 7
    assert ambientctl("lab", "down", "--state-dir", str(state_dir)) == 0
    assert lab_netns(lab_name) == set()


async def _access_log_entry(log: Path, direction: str) -> dict[str, Any]:
    """The first access-log line of ``direction`` (written when the connection closes)."""
    with trio.fail_after(5):
        while True:
            for line in log.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and entry.get("direction") == direction:
                    return entry
            await trio.sleep(0.05)


def _ztunnel_has_inpod() -> bool:
    from ztunnel.config import build_parser

    return "--capture" in build_parser().format_help()


@pytest.mark.slow
@pytest.mark.skipif(not _ztunnel_has_inpod(), reason="ztunnel has no --capture inpod yet")
async def test_the_mesh_runs_in_the_lab(config_dir: Path, state_dir: Path, lab_name: str) -> None:
    """istiod_lite, two ztunnels and the echo app come up inside the namespaces; an unmodified
    client in a pod gets through the mesh; leaving removes the whole lab."""
    links_before = host_links()
    async with trio.open_nursery() as nursery:
        lab = await nursery.start(
            lambda task_status: run_lab(
                config_dir, state_dir, name=lab_name, ready_timeout=20.0, drain_timeout=2.0,
                task_status=task_status,
            )
        )  # fmt: skip
        assert lab.supervisor is not None
        assert lab.supervisor.is_running("ztunnel-node-1")
        assert lab.supervisor.is_running("app-demo-server-9000")
        client = await trio.run_process(
            lab.exec_argv("client", [sys.executable, "-c", "import socket; c = socket."
                                     "create_connection(('10.244.2.2', 9000), 5); c.sendall(b'hi');"
                                     " c.shutdown(socket.SHUT_WR); print(c.recv(100))"]),
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr.decode()
        assert b"hi" in client.stdout
        # The client knew nothing of the mesh, yet its connection went over HBONE (mTLS).
        inbound = await _access_log_entry(lab.supervisor.log_path("ztunnel-node-2"), "inbound")
        assert inbound["protocol"] == "HBONE"
        assert inbound["src.identity"] == "spiffe://cluster.local/ns/demo/sa/default"
        assert inbound["src.addr"].startswith("10.244.1.2:")
        nursery.cancel_scope.cancel()
    assert lab_netns(lab_name) == set()
    assert host_links() == links_before
    assert not (state_dir / "lab.json").exists()
