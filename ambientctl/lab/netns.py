"""The host commands that build, inspect and enter the lab's network namespaces.

Every command names a lab namespace (``ip -n NS ...``, ``ip netns exec NS ...``): nothing here
changes the host's own namespace. ``CommandRunner`` is the seam tests replace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ambientctl.lab.errors import LabError

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


CommandRunner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run one ``ip``/``sysctl`` command, capturing its output."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found (install iproute2)")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"timed out after {COMMAND_TIMEOUT}s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


def existing_netns(run: CommandRunner = run_command) -> set[str]:
    """Names from ``ip netns list`` (lines are ``name`` or ``name (id: N)``)."""
    result = run(["ip", "netns", "list"])
    if result.returncode != 0:
        raise LabError(f"ip netns list failed: {result.stderr.strip()}")
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def netns_pids(netns: str, run: CommandRunner = run_command) -> list[int]:
    result = run(["ip", "netns", "pids", netns])
    if result.returncode != 0:
        return []
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def netns_links(netns: str, run: CommandRunner = run_command) -> list[str]:
    """``name:STATE`` of each interface in the namespace (``ip -br link``)."""
    result = run(["ip", "-n", netns, "-br", "link"])
    if result.returncode != 0:
        return []
    links = []
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) >= 2:
            links.append(f"{words[0].split('@')[0]}:{words[1]}")
    return links


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside a lab namespace; ``ip netns exec`` execs it, so the pid stays."""
    return ["ip", "netns", "exec", netns, *argv]
