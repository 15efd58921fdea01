"""Child processes started by name and stopped without leaving orphans.

Process rules: every child runs in its own process group (a Ctrl-C in the terminal reaches only
the supervisor, which then drains the children in order instead of having them all die at
once); a child that dies on its own is logged loudly with the tail of its log; shutdown sends
SIGTERM to every child, waits up to a drain timeout, then SIGKILLs what is left. The pids are
recorded in a pid file (``children.json``) so that a supervisor killed with SIGKILL leaves
nothing behind after the next start on the same state directory (``reap_stale_children``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from ambientctl.embedded.errors import EmbeddedError

log = structlog.get_logger()

DEFAULT_DRAIN_TIMEOUT = 10.0
POLL_INTERVAL = 0.1
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class ChildExit:
    name: str
    returncode: int
    expected: bool


@dataclass
class _Child:
    name: str
    argv: list[str]
    log_path: Path
    process: trio.Process | None = None
    stopping: bool = False
    exited: trio.Event = field(default_factory=trio.Event)


class Supervisor:
    """Starts named child processes in a nursery and stops them without leaving orphans.

    Use through ``open_supervisor``; children outlive nothing: leaving the context (normally,
    by cancellation or by an error) stops every child.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        logs_dir: Path,
        *,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        pid_file: Path | None = None,
    ) -> None:
        self._nursery = nursery
        self._logs_dir = logs_dir
        self._drain_timeout = drain_timeout
        self._pid_file = pid_file
        self._children: dict[str, _Child] = {}
        self.exits: list[ChildExit] = []

    @property
    def unexpected_exits(self) -> list[ChildExit]:
        return [e for e in self.exits if not e.expected]

    def log_path(self, name: str) -> Path:
        return self._logs_dir / f"{name}.log"

    def process(self, name: str) -> trio.Process:
        child = self._children.get(name)
        if child is None or child.process is None:
            raise KeyError(f"no process named {name!r}")
        return child.process

    def is_running(self, name: str) -> bool:
        child = self._children.get(name)
        return bool(child and child.process and child.process.returncode is None)

    def names(self) -> list[str]:
        return list(self._children)

    async def start(self, name: str, argv: Sequence[str]) -> trio.Process:
        """Start ``argv`` as ``name``; its output goes to ``<logs>/<name>.log``."""
        if self.is_running(name):
            raise EmbeddedError(f"process {name!r} is already running")
        child = _Child(name, list(argv), self.log_path(name))
        self._children[name] = child
        process: trio.Process = await self._nursery.start(self._run_child, child)
        self._record_pids()
        return process

    async def restart(self, name: str) -> trio.Process:
        child = self._children.get(name)
        if child is None:
            raise KeyError(f"no process named {name!r}")
        await self.stop(name)
        return await self.start(name, child.argv)

    async def stop(self, name: str) -> int:
        """SIGTERM, wait up to the drain timeout, SIGKILL; returns the exit code."""
        child = self._children.get(name)
        if child is None or child.process is None:
            raise KeyError(f"no process named {name!r}")
        child.stopping = True
        await self._terminate(child.process, name)
        await child.exited.wait()
        returncode = child.process.returncode
        assert returncode is not None
        return returncode

    async def wait_exit(self, name: str) -> int:
        child = self._children[name]
        await child.exited.wait()
        assert child.process is not None and child.process.returncode is not None
        return child.process.returncode

    async def shutdown(self) -> None:
        """Stop every child at once, so the whole mesh drains within one drain timeout."""
        async with trio.open_nursery() as nursery:
            for name, child in list(self._children.items()):
                if child.process is not None and child.process.returncode is None:
                    nursery.start_soon(self.stop, name)
        self._record_pids()

    async def _run_child(
        self, child: _Child, *, task_status: trio.TaskStatus[trio.Process]
    ) -> None:
        with child.log_path.open("ab") as log_file:
            process = await trio.lowlevel.open_process(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        child.process = process
        log.info("started", process=child.name, pid=process.pid, log=str(child.log_path))
        task_status.started(process)
        try:
            await process.wait()
        except trio.Cancelled:
            child.stopping = True
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._terminate(process, child.name)
                returncode = process.returncode
                assert returncode is not None
                self.exits.append(ChildExit(child.name, returncode, child.stopping))
                if child.stopping:
                    log.info("stopped", process=child.name, returncode=returncode)
                else:
                    log.error(
                        "PROCESS EXITED UNEXPECTEDLY",
                        process=child.name,
                        returncode=returncode,
                        log=str(child.log_path),
                        log_tail=tail(child.log_path, LOG_TAIL_LINES),
                    )
                self._record_pids()
                child.exited.set()

    async def _terminate(self, process: trio.Process, name: str) -> None:
        if process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(self._drain_timeout):
            await process.wait()
            return
        log.warning(
            "did not stop within the drain timeout; killing",
            process=name,
            drain_timeout=self._drain_timeout,
        )
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()

    def _record_pids(self) -> None:
        if self._pid_file is None:
            return
        running = {
            name: {"pid": child.process.pid, "argv": child.argv}
            for name, child in self._children.items()
            if child.process is not None and child.process.returncode is None
        }
        self._pid_file.write_text(json.dumps(running, indent=2) + "\n")


def _signal_group(pid: int, signum: signal.Signals) -> None:
    """Signal the child's process group (its pgid is its pid), reaching its own children too."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signum)


@asynccontextmanager
async def open_supervisor(
    logs_dir: Path,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    pid_file: Path | None = None,
) -> AsyncIterator[Supervisor]:
    logs_dir.mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, logs_dir, drain_timeout=drain_timeout, pid_file=pid_file)
        try:
            yield supervisor
        finally:
            with trio.CancelScope(shield=True):
                await supervisor.shutdown()


async def reap_stale_children(pid_file: Path, timeout: float = 5.0) -> list[int]:
    """Stop children a killed supervisor left behind; only pids whose command line still
    matches what was recorded, so a reused pid is never touched. Returns the pids stopped."""
    try:
        recorded = json.loads(pid_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    stale = [
        entry["pid"]
        for entry in recorded.values()
        if isinstance(entry, dict) and live_cmdline(entry.get("pid")) == entry.get("argv")
    ]
    for pid in stale:
        log.warning("stopping a child left by an earlier supervisor", pid=pid)
        _signal_group(pid, signal.SIGTERM)
    with trio.move_on_after(timeout):
        while any(live_cmdline(pid) is not None for pid in stale):
            await trio.sleep(POLL_INTERVAL)
    for pid in stale:
        if live_cmdline(pid) is not None:
            _signal_group(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return stale


def live_cmdline(pid: Any) -> list[str] | None:
    """The live process's argv, or None when it is gone (or a zombie)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
