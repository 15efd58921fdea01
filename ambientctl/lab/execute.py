"""``ambientctl lab exec``: a command run inside one of the lab's namespaces."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from ambientctl.lab.errors import LabError
from ambientctl.lab.netns import in_netns
from ambientctl.lab.plan import LabPlan, netns_path
from ambientctl.lab.state import LabPaths, require_record


def resolve_exec_target(plan: LabPlan, target: str) -> str:
    """The namespace for ``[ns/]pod``, ``node:NAME``, ``:control`` or ``:wire``."""
    if target == ":control":
        return plan.control_netns
    if target == ":wire":
        return plan.wire_netns
    if target.startswith("node:"):
        try:
            return plan.node(target.removeprefix("node:")).netns
        except KeyError as exc:
            raise LabError(str(exc.args[0])) from None
    try:
        return plan.find_pod(target).netns
    except KeyError as exc:
        raise LabError(str(exc.args[0])) from None


def lab_exec(paths: LabPaths, target: str, argv: Sequence[str]) -> int:
    """Run ``argv`` in the target's namespace with our stdio; its exit code (128+N for a
    signal, as a shell reports it)."""
    if not argv:
        raise LabError("no command given: ambientctl lab exec POD -- CMD [ARG...]")
    netns = resolve_exec_target(require_record(paths).plan, target)
    if not Path(netns_path(netns)).exists():
        raise LabError(f"namespace {netns} does not exist (is the lab up?)")
    try:
        returncode = subprocess.call(in_netns(netns, argv))
    except KeyboardInterrupt:
        return 130
    return 128 - returncode if returncode < 0 else returncode
