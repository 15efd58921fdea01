"""The command line as a user meets it (issue 16): real ``python -m ambientctl`` processes.

istioctl and kubectl habits: ``--version``, a wrong flag answered with that subcommand's usage,
istioctl's ztunnel-config kinds and aliases, help that advertises only real flags, shell
completion, and a clear word for a verb that needs a cluster. What needs a running mesh is in
test_wheel_tour.py (README's tour on the installed wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LoopbackAllocator

REPO = Path(__file__).resolve().parents[2]


def ambientctl(
    *argv: str, cwd: Path, program: str = "ambientctl"
) -> subprocess.CompletedProcess[str]:
    """``python -m ambientctl ...``; ``program`` as the kubectl plugin's name when it is
    ``kubectl-ambient`` (what kubectl execs)."""
    code = (
        "import sys; from ambientctl.cli import main; "
        f"sys.exit(main(sys.argv[1:], prog={program!r}))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "KUBECONFIG": str(cwd / "no-kubeconfig")}
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_version_flag(tmp_path: Path) -> None:
    done = ambientctl("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("ambientctl ")
    assert done.stdout == ambientctl("version", cwd=tmp_path).stdout


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["waypoint", "list", "--bogus"], "usage: ambientctl waypoint list"),
        (["ztunnel-config", "workload", "--bogus"], "usage: ambientctl ztunnel-config"),
        (["status", "--bogus"], "usage: ambientctl status"),
    ],
)
def test_a_wrong_flag_shows_the_subcommands_usage(
    tmp_path: Path, argv: list[str], usage: str
) -> None:
    done = ambientctl(*argv, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(usage), done.stderr
    assert "unrecognized arguments: --bogus" in done.stderr


@pytest.mark.parametrize(
    "kind",
    ["workload", "workloads", "w", "service", "svc", "s", "policy", "policies", "pol", "p",
     "certificate", "certs", "cert", "all"],
)  # fmt: skip
def test_istioctls_ztunnel_config_kinds(
    tmp_path: Path, loopback: LoopbackAllocator, kind: str
) -> None:
    """Every kind and alias istioctl accepts parses; nothing listens, so the fetch fails (1)."""
    done = ambientctl("ztunnel-config", kind, "--address", loopback.new(), cwd=tmp_path)
    assert done.returncode == 1 and "cannot reach ztunnel admin" in done.stderr, done.stderr


def test_istioctls_zc_alias(tmp_path: Path, loopback: LoopbackAllocator) -> None:
    done = ambientctl("zc", "all", "--address", loopback.new(), cwd=tmp_path)
    assert done.returncode == 1 and "ambientctl zc: cannot reach ztunnel admin" in done.stderr


def test_a_misspelled_kind_is_a_usage_error(tmp_path: Path) -> None:
    done = ambientctl("ztunnel-config", "policie", cwd=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'policie'" in done.stderr


def test_ztunnel_config_help_advertises_only_its_flags(tmp_path: Path) -> None:
    help_text = ambientctl("ztunnel-config", "--help", cwd=tmp_path).stdout
    assert "-f/--file" not in help_text and "-f DIR" not in help_text
    assert "--state-dir or --address select the embedded mesh" in " ".join(help_text.split())
    assert "all" in help_text and "policy" in help_text


@pytest.mark.parametrize("command", [["enroll", "demo"], ["unenroll", "demo"], ["install"],
                                     ["uninstall"]])  # fmt: skip
def test_a_cluster_only_verb_says_it_needs_a_cluster(tmp_path: Path, command: list[str]) -> None:
    done = ambientctl(*command, cwd=tmp_path)
    assert done.returncode == 2
    assert "this needs a cluster (--kubeconfig" in done.stderr
    assert "kube-config" not in done.stderr


def test_status_and_check_without_a_running_mesh(tmp_path: Path) -> None:
    status = ambientctl("status", cwd=tmp_path)
    assert status.returncode == 1 and "no running embedded mesh" in status.stderr
    check = ambientctl("check", cwd=tmp_path)
    assert check.returncode == 1
    assert check.stdout.splitlines()[1].split()[:2] == ["embedded-mesh", "FAIL"]
    # The plugin name still means the cluster, and says which kubeconfig is missing.
    cluster = ambientctl("status", cwd=tmp_path, program="kubectl-ambient")
    assert cluster.returncode == 1 and "this needs a cluster" not in cluster.stderr


def complete(script: str, words: list[str]) -> list[str]:
    """What bash completes for ``words`` (the last one being typed) with ``script`` loaded."""
    line = " ".join(words)
    program = f"""
{script}
COMP_WORDS=({line})
COMP_CWORD={len(words) - 1}
_ambientctl_complete
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion(tmp_path: Path) -> None:
    script = ambientctl("completion", "bash", cwd=tmp_path).stdout
    assert "complete -o default -F _ambientctl_complete ambientctl kubectl-ambient" in script
    assert complete(script, ["ambientctl", "ztunnel-config", "po"]) == ["policy", "policies", "pol"]
    assert "list" in complete(script, ["ambientctl", "waypoint", "l"])
    assert complete(script, ["ambientctl", "ztunnel-config", "workload", "-o", "j"]) == ["json"]
    assert "--version" in complete(script, ["ambientctl", "--v"])
    assert complete(script, ["ambientctl", "up", "--log-f"]) == ["--log-format"]
    assert complete(script, ["ambientctl", "st"]) == ["status"]


def test_zsh_completion_loads_the_same_script_through_bashcompinit(tmp_path: Path) -> None:
    zsh = ambientctl("completion", "zsh", cwd=tmp_path).stdout
    assert "autoload -U +X bashcompinit && bashcompinit" in zsh
    assert ambientctl("completion", "bash", cwd=tmp_path).stdout in zsh
    if shutil.which("zsh"):
        done = subprocess.run(["zsh", "-c", zsh], capture_output=True, text=True, timeout=30,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
