"""What istiod_lite says about the config directory, read from its JSON log.

istiod_lite is the one that parses the config directory, so its words are the ones to show:
each broken file is logged once as ``source file problem`` (path, reason naming the line,
what it keeps serving) and each fixed one as ``source file loaded``. ``ambientctl up`` echoes
the problems on its console as they appear (``follow_config_problems``); ``ambientctl check``
reports the ones still outstanding (``outstanding_problems``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

log = structlog.get_logger()

PROBLEM_EVENT = "source file problem"
LOADED_EVENT = "source file loaded"
FOLLOW_INTERVAL = 0.25


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    reason: str
    serving: str
    level: str  # "error": the file is unusable; "warning": some objects were skipped

    def sentence(self) -> str:
        return f"{self.path}: {self.reason}; istiod_lite is serving the {self.serving}"


def config_events(lines: Iterable[str]) -> list[tuple[str, ConfigProblem | None]]:
    """``(path, problem)`` per config event of istiod's log lines; None: the file loaded."""
    events: list[tuple[str, ConfigProblem | None]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        event, path = entry.get("event"), str(entry.get("path", ""))
        if event == LOADED_EVENT:
            events.append((path, None))
        elif event == PROBLEM_EVENT:
            problem = ConfigProblem(
                path,
                str(entry.get("reason", "")),
                str(entry.get("serving", "last good objects of this file")),
                str(entry.get("level", "error")),
            )
            events.append((path, problem))
    return events


def outstanding_problems(log_path: Path) -> list[ConfigProblem]:
    """The problems logged for each file since it last loaded cleanly (since istiod started
    logging to ``log_path``), each once."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    since_loaded: dict[str, dict[ConfigProblem, None]] = {}
    for path, problem in config_events(lines):
        if problem is None:
            since_loaded.pop(path, None)
        else:
            since_loaded.setdefault(path, {})[problem] = None
    return [p for problems in since_loaded.values() for p in problems]


def log_size(log_path: Path) -> int:
    """Where the log ends now: ``follow_config_problems`` echoes what comes after."""
    try:
        return log_path.stat().st_size
    except FileNotFoundError:
        return 0


async def follow_config_problems(
    log_path: Path, offset: int, interval: float = FOLLOW_INTERVAL
) -> None:
    """Echo each config problem istiod logs after ``offset``, in istiod's words. Follows the
    file across istiod restarts (the supervisor appends; a shorter file starts over)."""
    pending = b""
    while True:
        await trio.sleep(interval)
        try:
            size = log_path.stat().st_size
            if size < offset:
                offset, pending = 0, b""
            if size == offset:
                continue
            with log_path.open("rb") as f:
                f.seek(offset)
                data = f.read(size - offset)
        except FileNotFoundError:
            continue
        offset += len(data)
        *complete, pending = (pending + data).split(b"\n")
        text = [line.decode(errors="replace") for line in complete]
        for _path, problem in config_events(text):
            if problem is not None:
                say = log.error if problem.level == "error" else log.warning
                say(f"config: {problem.sentence()}", path=problem.path, reason=problem.reason)
