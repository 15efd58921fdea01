"""README's tour as a user runs it: from the wheel, installed outside the repository (issue 16).

The wheel is built from a copy of the checkout and installed with ``pip install --target``;
every program runs as its console script from a directory outside the repository, with only
that install on ``PYTHONPATH`` (it precedes the development venv's editable finder). The tour
is read from README.md itself, so the README and what works cannot drift apart; its demo
addresses are moved to fresh loopback ones and istiod to its own (``--istiod-host``), so the
test never meets a running demo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LoopbackAllocator
from tests.integration.mesh_harness import moved_demo_addresses, rewrite_demo_addresses

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from: the checkout minus what is not the package's.
NOT_SHIPPED = {".git", ".venv", "run", ".build", "build", "dist", "tests", "bench", "fuzz"}
PROGRAMS = ("ambientctl", "kubectl-ambient", "istiod_lite", "ztunnel", "waypoint")
COMMAND_TIMEOUT = 30.0
READY_TIMEOUT = 90.0

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the README tour uses curl")


@dataclass(frozen=True)
class Installed:
    target: Path  # pip install --target
    home: Path  # the user's working directory, outside the repository

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KUBECONFIG")}
        env["PYTHONPATH"] = str(self.target)
        env["PATH"] = f"{self.target / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["KUBECONFIG"] = str(self.home / "no-kubeconfig")
        return env

    def run(self, command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """One shell command line, as the user types it."""
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=cwd or self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )


def _not_shipped(directory: str, names: list[str]) -> set[str]:
    top = Path(directory).resolve() == REPO
    return {n for n in names if (top and n in NOT_SHIPPED) or n == "__pycache__"
            or n.endswith((".egg-info", "_cache"))}  # fmt: skip


def _run_ok(argv: list[str]) -> str:
    """Run ``argv``; its output."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    source, wheels, target, home = (work / n for n in ("source", "wheels", "site", "home"))
    shutil.copytree(REPO, source, symlinks=True, ignore=_not_shipped)
    home.mkdir()
    pip = [sys.executable, "-m", "pip"]
    log = _run_ok([*pip, "wheel", "--verbose", "--no-deps", "-w", str(wheels), str(source)])
    # The license is an SPDX string (no deprecation warning) and the scratch dir is not
    # ./build (setup.cfg), which `python -m build` would take for its own package.
    assert "deprecat" not in log.lower() and "license" in log.lower()
    assert not (source / "build").exists()
    _run_ok([*pip, "install", "--quiet", "--no-deps", "--target", str(target),
             *map(str, wheels.iterdir())])  # fmt: skip
    return Installed(target, home)


def test_every_program_has_its_console_script(installed: Installed) -> None:
    for program in PROGRAMS:
        done = installed.run(f"{program} --help")
        assert done.returncode == 0, (program, done.stderr)
        assert "usage:" in done.stdout
    done = installed.run("ambientctl --version")
    assert done.returncode == 0 and done.stdout.startswith("ambientctl 0.1.0 ")
    module = installed.run("python -c 'import ambientctl; print(ambientctl.__file__)'")
    assert Path(module.stdout.strip()).is_relative_to(installed.target), "the wheel runs"
    demo = shipped_demo(installed)
    assert demo.is_relative_to(installed.target) and (demo / "51-reviews.yaml").is_file()
    assert (installed.target / "ambient_lite-0.1.0.dist-info/licenses/LICENSE").is_file()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kustomize rendering needs kubectl")
def test_install_dry_run_defaults_to_the_shipped_manifests(installed: Installed) -> None:
    done = installed.run("kubectl-ambient install --dry-run")
    assert done.returncode == 0, done.stderr
    assert "DaemonSet" in done.stdout and "ztunnel" in done.stdout


def readme_tour() -> tuple[list[str], list[str]]:
    """The tour's two ``sh`` blocks: starting the mesh, and what to try in a second terminal,
    each as command lines (continuations joined)."""
    readme = (REPO / "README.md").read_text()
    tour = readme[readme.index("To play with it yourself") :]
    blocks = re.findall(r"```sh\n(.*?)```", tour, flags=re.S)[:2]

    def commands(block: str) -> list[str]:
        lines = block.replace("\\\n", " ").splitlines()
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]

    return commands(blocks[0]), commands(blocks[1])


class Follower:
    """A background reader of one stream's lines (the ``up`` process's stdout)."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def shipped_demo(installed: Installed) -> Path:
    done = installed.run("python -c 'import ambientctl.bundled as b; print(b.DEMO_CONFIG_DIR)'")
    return Path(done.stdout.strip())


def test_readme_tour(installed: Installed, loopback: LoopbackAllocator, tmp_path: Path) -> None:
    start, second_terminal = readme_tour()
    assert [line.split("#")[0].strip() for line in start] == ["ambientctl up"]
    home = tmp_path / "home"
    shipped = shipped_demo(installed)
    addresses = moved_demo_addresses(shipped, loopback.new)
    # The copy `ambientctl up` makes in ./run/config on first use, made here with the moved
    # addresses (up keeps an existing copy).
    config = home / "run" / "config"
    shutil.copytree(shipped, config)
    for path in config.glob("*.yaml"):
        path.write_text(rewrite_demo_addresses(path.read_text(), addresses))

    stderr_path = home / "up.stderr"
    with stderr_path.open("w") as stderr:
        up = subprocess.Popen(
            ["ambientctl", "up", "--istiod-host", loopback.new()],
            cwd=home,
            env=installed.env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        stdout = Follower(up.stdout)
        wait_until(lambda: any(line.startswith("mesh ready") for line in stdout.lines)
                   or up.poll() is not None, READY_TIMEOUT, "the mesh")  # fmt: skip
        assert up.poll() is None, stderr_path.read_text()[-3000:]
        assert stdout.lines[0].startswith(f"config: {Path('run/config')}")

        for line in second_terminal:
            done = installed.run(rewrite_demo_addresses(line, addresses), cwd=home)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            assert done.stdout.strip(), line

        the_mesh_reports_itself(installed, home)
        broken_config_is_reported(installed, home, config, stderr_path)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def the_mesh_reports_itself(installed: Installed, home: Path) -> None:
    """What the tour's commands print, in the cluster commands' and istioctl's shapes."""
    status = installed.run("ambientctl status", cwd=home).stdout
    assert [line for line in status.splitlines() if line.startswith("istiod")][0].split()[1] == (
        "1/1"
    )
    for node in ("node-1", "node-2"):
        (row,) = [line for line in status.splitlines() if line.startswith(node)]
        assert row.split()[3] == "true" and "(in " in row, row  # ready, cert expiry ahead
    assert "demo waypoint True" in " ".join(status.split())
    check = installed.run("ambientctl check -o json", cwd=home)
    assert check.returncode == 0
    assert {r["check"]: r["status"] for r in json.loads(check.stdout)} == {
        "embedded-mesh": "OK", "istiod": "OK", "config": "OK", "ztunnels": "OK",
        "certificates": "OK", "waypoints": "OK",
    }  # fmt: skip
    dump = installed.run("ambientctl ztunnel-config workload --node node-1 -o json", cwd=home)
    workloads = json.loads(dump.stdout)
    assert {w["name"] for w in workloads} >= {"sleep", "httpbin-v1"}
    assert all("workloadIps" in w and "serviceAccount" in w for w in workloads)
    listing = installed.run("ambientctl waypoint list -A", cwd=home)
    assert listing.returncode == 0 and "waypoint" in listing.stdout.splitlines()[1]


def broken_config_is_reported(
    installed: Installed, home: Path, config: Path, stderr_path: Path
) -> None:
    """A key that lost its ':' shows on up's console at its line, in istiod_lite's words, and
    in ``check`` until it is fixed."""
    reviews = config / "51-reviews.yaml"
    good = reviews.read_text()
    lines = good.splitlines(keepends=True)
    typo = next(i for i, line in enumerate(lines) if line.startswith("  name: "))
    lines[typo] = lines[typo].replace("name: ", "name ", 1)
    reviews.write_text("".join(lines))
    expected = f"{reviews}: YAML syntax error at line {typo + 1}, column 3"

    def console() -> list[str]:
        return [line for line in stderr_path.read_text().splitlines() if str(reviews) in line]

    wait_until(lambda: any("istiod_lite is serving the last good" in line for line in console()),
               15, "istiod's message on up's console")  # fmt: skip
    assert all(expected in line for line in console()), console()
    assert not any("\\n" in line for line in console()), "one line, no YAML dump"
    check = installed.run("ambientctl check", cwd=home)
    (row,) = [line for line in check.stdout.splitlines() if line.startswith("config ")]
    assert "WARN" in row and expected in row

    reviews.write_text(good)
    wait_until(lambda: "istiod reads every file" in installed.run(
        "ambientctl check", cwd=home).stdout, 15, "the fixed file to load")  # fmt: skip
