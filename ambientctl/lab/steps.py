"""The steps that build a lab's network, each one command with its inverse (sans-IO).

A step is one change inside one of the lab's namespaces (a namespace, a link, an address, a
route, a sysctl), serialised into the lab record so that ``lab down`` can undo exactly what was
begun, in reverse (``undo_commands``), even after a crash.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ambientctl.lab.errors import LabPlanError


@dataclass(frozen=True)
class Step(ABC):
    """One change inside one of the lab's namespaces."""

    op: ClassVar[str] = ""
    netns: str

    def __post_init__(self) -> None:
        empty = [name for name, value in self.__dict__.items() if not value]
        if empty:
            raise LabPlanError(f"{self.op} step in {self.netns!r} without {', '.join(empty)}")

    @abstractmethod
    def command(self) -> tuple[str, ...]: ...

    @abstractmethod
    def undo(self) -> tuple[str, ...] | None:
        """The command reverting this step; None when nothing outside ``netns`` changed and
        the step is reverted by deleting ``netns`` (a sysctl of our own namespace)."""

    @property
    def removes_namespace_content(self) -> bool:
        """False for steps whose undo must run even when the namespace is deleted anyway:
        links (a veth pair spans two namespaces, and a namespace still held by a stray process
        outlives ``ip netns delete``) and namespaces themselves."""
        return True

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"op": self.op}
        data.update(self.__dict__)
        return data

    def describe(self) -> str:
        return " ".join(self.command())


@dataclass(frozen=True)
class AddNetns(Step):
    op: ClassVar[str] = "netns"

    def command(self) -> tuple[str, ...]:
        return ("ip", "netns", "add", self.netns)

    def undo(self) -> tuple[str, ...]:
        return ("ip", "netns", "delete", self.netns)

    @property
    def removes_namespace_content(self) -> bool:
        return False


@dataclass(frozen=True)
class SetSysctl(Step):
    op: ClassVar[str] = "sysctl"
    key: str = ""
    value: str = ""

    def command(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns, "sysctl", "-q", "-w", f"{self.key}={self.value}")

    def undo(self) -> None:
        return None


@dataclass(frozen=True)
class AddBridge(Step):
    op: ClassVar[str] = "bridge"
    ifname: str = ""

    def command(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "link", "add", self.ifname, "type", "bridge")

    def undo(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "link", "del", self.ifname)

    @property
    def removes_namespace_content(self) -> bool:
        return False


@dataclass(frozen=True)
class AddVeth(Step):
    """A veth pair created straight into its two namespaces (never the host's)."""

    op: ClassVar[str] = "veth"
    ifname: str = ""
    peer_netns: str = ""
    peer_ifname: str = ""

    def command(self) -> tuple[str, ...]:
        return (
            "ip", "-n", self.netns, "link", "add", self.ifname, "type", "veth",
            "peer", "name", self.peer_ifname, "netns", self.peer_netns,
        )  # fmt: skip

    def undo(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "link", "del", self.ifname)  # the peer goes with it

    @property
    def removes_namespace_content(self) -> bool:
        return False


@dataclass(frozen=True)
class SetMaster(Step):
    op: ClassVar[str] = "master"
    ifname: str = ""
    master: str = ""

    def command(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "link", "set", self.ifname, "master", self.master)

    def undo(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "link", "set", self.ifname, "nomaster")


@dataclass(frozen=True)
class SetUp(Step):
    op: ClassVar[str] = "up"
    ifname: str = ""

    def command(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "link", "set", self.ifname, "up")

    def undo(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "link", "set", self.ifname, "down")


@dataclass(frozen=True)
class AddAddress(Step):
    op: ClassVar[str] = "addr"
    ifname: str = ""
    cidr: str = ""

    def command(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "addr", "add", self.cidr, "dev", self.ifname)

    def undo(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "addr", "del", self.cidr, "dev", self.ifname)


@dataclass(frozen=True)
class AddRoute(Step):
    op: ClassVar[str] = "route"
    destination: str = ""
    via: str = ""
    ifname: str = ""

    def _route(self) -> tuple[str, ...]:
        return (self.destination, "via", self.via, "dev", self.ifname)

    def command(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "route", "add", *self._route())

    def undo(self) -> tuple[str, ...]:
        return ("ip", "-n", self.netns, "route", "del", *self._route())


STEP_TYPES: dict[str, type[Step]] = {
    cls.op: cls for cls in (AddNetns, SetSysctl, AddBridge, AddVeth, SetMaster, SetUp,
                            AddAddress, AddRoute)
}  # fmt: skip


def step_from_json(data: Any) -> Step:
    """A step back from the state file; a clear error for anything we did not write."""
    if not isinstance(data, Mapping):
        raise LabPlanError(f"a recorded step is not a mapping: {data!r}")
    fields = dict(data)
    op = fields.pop("op", None)
    cls = STEP_TYPES.get(str(op))
    if cls is None:
        raise LabPlanError(f"unknown recorded step {op!r}")
    try:
        return cls(**{k: str(v) for k, v in fields.items()})
    except TypeError as exc:
        raise LabPlanError(f"recorded {op} step {fields!r}: {exc}") from None


def undo_commands(steps: Sequence[Step]) -> list[tuple[str, ...]]:
    """The commands reverting ``steps`` (those that were done), last first.

    Addresses, routes, link states and bridge ports inside a namespace that this same undo
    deletes are skipped: they vanish with it. Links and namespaces are always removed
    explicitly, so that even a namespace kept alive by a stray process loses its links.
    """
    deleted = {step.netns for step in steps if isinstance(step, AddNetns)}
    commands: list[tuple[str, ...]] = []
    for step in reversed(steps):
        inverse = step.undo()
        if inverse is None:
            continue
        if step.removes_namespace_content and step.netns in deleted:
            continue
        commands.append(inverse)
    return commands


# What ``ip`` prints when the thing an undo command removes is already gone.
ALREADY_GONE_MARKERS = (
    "no such file or directory",
    "cannot find device",
    "no such device",
    "no such process",
    "cannot open network namespace",
    "cannot assign requested address",  # ip addr del of an address no longer there
    "does not exist",
)


def is_already_gone(stderr: str) -> bool:
    """Does this failure of an undo command only mean that its target no longer exists?"""
    text = stderr.lower()
    return any(marker in text for marker in ALREADY_GONE_MARKERS)
