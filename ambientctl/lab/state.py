"""The lab's state directory and its record, ``lab.json``.

The record holds the whole plan, how many of its steps were begun (written BEFORE each step
runs, so a crash at any point leaves a record of what may exist) and which ``lab up`` process
runs the lab, so that a ``lab down`` elsewhere can ask it to stop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambient_common.files import write_atomically
from ambientctl.embedded.state_dir import StatePaths
from ambientctl.lab.errors import LabError, LabPlanError
from ambientctl.lab.plan import LabPlan

RECORD_VERSION = 1


@dataclass(frozen=True)
class LabPaths:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def config_dir(self) -> Path:
        """The YAML with lab addresses, as istiod_lite reads it."""
        return self.root / "config"

    @property
    def netns_map_dir(self) -> Path:
        return self.root / "netns"

    def netns_map(self, node: str) -> Path:
        return self.netns_map_dir / f"{node}.json"

    @property
    def mesh(self) -> StatePaths:
        """Certificates, tokens, logs and children.json, laid out as the embedded mode's."""
        return StatePaths(self.root / "mesh")


@dataclass
class LabRecord:
    """What ``lab.json`` holds: the plan, how many steps were begun, who runs the lab."""

    plan: LabPlan
    begun: int = 0
    complete: bool = False
    mesh: bool = True
    owner_pid: int | None = None
    owner_cmdline: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "plan": self.plan.to_json(),
            "begun": self.begun,
            "complete": self.complete,
            "mesh": self.mesh,
            "owner_pid": self.owner_pid,
            "owner_cmdline": self.owner_cmdline,
        }

    @classmethod
    def from_json(cls, data: Any, source: Path) -> LabRecord:
        if not isinstance(data, Mapping) or data.get("version") != RECORD_VERSION:
            raise LabError(f"{source} is not a lab record this ambientctl wrote")
        try:
            plan = LabPlan.from_json(data.get("plan"))
        except LabPlanError as exc:
            raise LabError(f"{source}: {exc}") from None
        begun = data.get("begun")
        if not isinstance(begun, int) or not 0 <= begun <= len(plan.steps):
            raise LabError(f"{source}: invalid step count {begun!r}")
        owner = data.get("owner_pid")
        cmdline = data.get("owner_cmdline")
        return cls(
            plan=plan,
            begun=begun,
            complete=bool(data.get("complete")),
            mesh=bool(data.get("mesh", True)),
            owner_pid=owner if isinstance(owner, int) else None,
            owner_cmdline=[str(a) for a in cmdline] if isinstance(cmdline, list) else None,
        )


def write_record(paths: LabPaths, record: LabRecord) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    write_atomically(paths.state_file, json.dumps(record.to_json(), indent=1) + "\n", 0o644)


def read_record(paths: LabPaths) -> LabRecord | None:
    """The recorded lab, None when there is none."""
    try:
        text = paths.state_file.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabError(f"{paths.state_file} is damaged ({exc}); remove the lab's namespaces "
                       "by hand (`ip netns list`) and then the file") from None  # fmt: skip
    return LabRecord.from_json(data, paths.state_file)


def require_record(paths: LabPaths) -> LabRecord:
    record = read_record(paths)
    if record is None:
        raise LabError(f"no lab is recorded in {paths.root} (`ambientctl lab up` first)")
    return record
