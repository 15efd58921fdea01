"""A directory of Kubernetes YAML as the cluster: the embedded mode's source of truth.

The directory is polled (no inotify: it works the same on every OS and on ConfigMap mounts).
Each ``*.yaml``/``*.yml`` file below it (recursively; hidden files and directories such as a
ConfigMap mount's ``..data`` are skipped, their visible symlinks are read instead) is parsed
on its own, so one broken file never takes the others' objects away: a file that stops
parsing keeps serving its last good objects until it is fixed or removed. Removing a file
removes its objects.

Change detection is cheap: ``(mtime_ns, size, inode)`` first, then a content hash, so
touching a file or rewriting it unchanged sends nothing. File timestamps are coarse (a few
milliseconds on Linux), so, like git's "racily clean" check, a file modified within the last
second is hashed again on every poll until its timestamp is old enough to be trusted.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from istiod_lite.sources.objects import (
    CLUSTER_OBJECT_FIELDS,
    ClusterObjects,
    InvalidObject,
    SourceError,
    describe,
    field_for,
    object_key,
)
from istiod_lite.sources.validation import parse_documents

logger = structlog.get_logger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
_RACY_WINDOW_NS = 1_000_000_000
_UNTRUSTED_STAT = (-1, -1, -1)


@dataclass(frozen=True)
class LoadResult:
    """The objects now served and every current problem (broken files, skipped documents,
    duplicates); an error here does not mean the objects are empty."""

    objects: ClusterObjects
    errors: list[SourceError]


@dataclass
class _FileState:
    stat_key: tuple[int, int, int]
    digest: str
    # The objects last parsed successfully from this file (empty if it never parsed), each
    # with its (ClusterObjects field, key): worked out once per parse, not once per merge.
    good_objects: tuple[tuple[str, str, dict[str, Any]], ...] = ()
    # Errors of the current content: the parse error, or warnings about skipped documents.
    problems: tuple[SourceError, ...] = ()


class FileSource:
    """Serves the Kubernetes objects found in ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, poll_interval: float = 0.5) -> None:
        self.directory = Path(directory)
        self.poll_interval = poll_interval
        self._files: dict[Path, _FileState] = {}
        self._lock = threading.Lock()
        self._missing_directory_reported = False
        self._merged: tuple[ClusterObjects, list[SourceError]] | None = None

    def load(self) -> LoadResult:
        """Read the directory now (blocking) and return what would be served."""
        return self._scan()

    async def run(
        self,
        send_channel: trio.MemorySendChannel[ClusterObjects],
        *,
        task_status: trio.TaskStatus[ClusterObjects] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll forever. ``nursery.start`` returns the first snapshot, which is also the first
        message on the channel; after that a snapshot is sent only when the served objects
        really changed (a broken edit, a touch or an identical rewrite sends nothing)."""
        outcome = await trio.to_thread.run_sync(self._scan)
        last_sent = outcome.objects
        task_status.started(last_sent)
        await send_channel.send(last_sent)
        while True:
            await trio.sleep(self.poll_interval)
            outcome = await trio.to_thread.run_sync(self._scan)
            # Compared with what was sent, not with the previous scan: a load() in between
            # may have consumed the file change.
            if outcome.objects is not last_sent and outcome.objects != last_sent:
                last_sent = outcome.objects
                logger.info(
                    "file source changed",
                    directory=str(self.directory),
                    objects=last_sent.count(),
                )
                await send_channel.send(last_sent)

    # -- the blocking part, run in a worker thread ------------------------------------------

    def _scan(self) -> LoadResult:
        with self._lock:
            changed = self._refresh_files()
            if changed or self._merged is None:
                self._merged = self._merge()
            objects, duplicates = self._merged
            errors = [
                problem for path in sorted(self._files) for problem in self._files[path].problems
            ]
            errors.extend(duplicates)
            if changed:
                for duplicate in duplicates:
                    logger.warning(
                        "duplicate object", path=duplicate.path, reason=duplicate.reason
                    )
            if not self.directory.is_dir():
                errors.insert(0, SourceError(str(self.directory), "directory does not exist"))
            return LoadResult(objects, errors)

    def _refresh_files(self) -> bool:
        """Update per-file state from disk; True if any file was added, changed or removed."""
        if not self.directory.is_dir():
            if not self._missing_directory_reported:
                logger.error("source directory does not exist", directory=str(self.directory))
                self._missing_directory_reported = True
        else:
            self._missing_directory_reported = False
        present = set(self._yaml_files()) if self.directory.is_dir() else set()
        changed = False
        for path in sorted(set(self._files) - present):
            logger.info("source file removed", path=str(path))
            del self._files[path]
            changed = True
        for path in sorted(present):
            try:
                changed |= self._refresh_file(path)
            except FileNotFoundError:  # removed between listing and reading
                if self._files.pop(path, None) is not None:
                    changed = True
        return changed

    def _yaml_files(self) -> Iterator[Path]:
        for root, dirs, files in os.walk(self.directory, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and name.endswith(YAML_SUFFIXES):
                    yield Path(root) / name

    def _refresh_file(self, path: Path) -> bool:
        stat = path.stat()
        stat_key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        state = self._files.get(path)
        if state is not None and state.stat_key == stat_key:
            return False
        if stat.st_mtime_ns >= time.time_ns() - _RACY_WINDOW_NS:
            # Another write within the same timestamp tick would leave the stat unchanged:
            # remember a key no file has so that the next poll hashes the content again.
            stat_key = _UNTRUSTED_STAT
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if state is not None and state.digest == digest:
            state.stat_key = stat_key
            return False

        previous = state.good_objects if state is not None else ()
        new_state = _FileState(stat_key, digest, previous)
        try:
            text = data.decode("utf-8")
            parsed = parse_documents(text, str(path))
        except UnicodeDecodeError as exc:
            new_state.problems = (SourceError(str(path), f"not UTF-8 text: {exc.reason}"),)
        except InvalidObject as exc:
            new_state.problems = (SourceError(str(path), exc.reason),)
        else:
            new_state.good_objects = tuple(
                (field_for(obj), object_key(obj), obj) for obj in parsed.objects
            )
            new_state.problems = parsed.warnings
        for problem in new_state.problems:
            log = logger.warning if problem.severity == "warning" else logger.error
            log(
                "source file problem",
                path=problem.path,
                reason=problem.reason,
                serving="last good objects of this file"
                if problem.severity == "error"
                else "the file's other objects",
            )
        if not new_state.problems:
            logger.info("source file loaded", path=str(path), objects=len(new_state.good_objects))
        self._files[path] = new_state
        return True

    def _merge(self) -> tuple[ClusterObjects, list[SourceError]]:
        """All files' good objects; on a duplicate the later file (sorted path order) wins."""
        by_field: dict[str, dict[str, dict[str, Any]]] = {
            name: {} for name in CLUSTER_OBJECT_FIELDS
        }
        origin: dict[tuple[str, str], Path] = {}
        duplicates: list[SourceError] = []
        for path in sorted(self._files):
            for field_name, key, obj in self._files[path].good_objects:
                objects = by_field[field_name]
                if key in objects:
                    earlier = origin[(field_name, key)]
                    where = "earlier in this file" if earlier == path else f"in {earlier}"
                    duplicates.append(
                        SourceError(
                            str(path),
                            f"{describe(obj)} is also defined {where}; this definition wins",
                        )
                    )
                origin[(field_name, key)] = path
                objects[key] = obj
        return ClusterObjects(**by_field), duplicates
