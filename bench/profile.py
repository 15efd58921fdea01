"""Where ztunnel's time goes under bulk load: py-spy samples the running process (no
restart, no instrumentation) while a bulk upload runs; the summary is the top functions
by own (self) samples and by inclusive samples."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def summarise_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Top functions from py-spy's collapsed (``raw``) output: ``frame;frame;... count``."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": name, "percent": round(100 * n / max(total, 1), 1)}
                for name, n in counter.most_common(top)]
    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines vary, files matter."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(file).parts[-2:])})" if file else name


def profile_under_load(pids: dict[str, int], directory: Path, load: Callable[[], Any],
                       seconds: float) -> dict[str, Any]:
    """Sample every process in ``pids`` at once (py-spy, 200 Hz) while ``load`` runs."""
    binary = py_spy()
    if binary is None:
        return {"error": "py-spy not installed (pip install '.[bench]')"}
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    recorders = {}
    for name, pid in pids.items():
        output = directory / f"{name}-profile.txt"
        recorders[name] = (output, subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--duration", str(int(seconds)),
             "--rate", "200", "--format", "raw", "--output", str(output), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    profiles: dict[str, Any] = {}
    for name, (output, recorder) in recorders.items():
        try:
            _, stderr = recorder.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            _, stderr = recorder.communicate()
        if recorder.returncode != 0 or not output.exists():
            profiles[name] = {"error": f"py-spy failed: {stderr[-500:]}"}
        else:
            profiles[name] = summarise_collapsed(output.read_text())
    worker.join(120)
    return profiles
