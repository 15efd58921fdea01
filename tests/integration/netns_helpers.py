"""Shared pieces for the tests that build real network namespaces (root only): whether they
can run here, and creating throwaway namespaces that are deleted even when a test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# The Debian package providing each tool (`make system-deps` installs them).
PACKAGES = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "iptables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "tcpdump": "tcpdump",
    "nc": "netcat-openbsd",
    "curl": "curl",
}


def netns_unusable(*tools: str, nat_table: bool = False) -> str | None:
    """Why network-namespace tests cannot run here (the skip reason), or None.

    Needs root, ``ip`` and each of ``tools`` on the PATH, and a working ``ip netns add``;
    with ``nat_table``, also iptables' nat table inside a namespace.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (`make system-deps` installs {PACKAGES[tool]})"
    probe = f"alprobe-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` is unusable here: {added.stderr.strip()}"
    try:
        if nat_table:
            nat = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L"],
                                 capture_output=True, text=True)  # fmt: skip
            if nat.returncode != 0:
                return f"iptables' nat table is unusable in a namespace: {nat.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    """``ip ARGS``, raising ``CalledProcessError`` if it fails."""
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def in_netns(ns: str, *argv: str) -> str:
    """The output of ``argv`` run inside namespace ``ns``, raising if it fails."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True
    ).stdout


@contextmanager
def network_namespaces(names: Iterable[str]) -> Iterator[None]:
    """Creates the namespaces, each with ``lo`` up, and deletes those it created on exit."""
    created: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        yield
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
