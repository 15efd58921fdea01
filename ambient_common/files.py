"""Writing files that hold secrets or that readers poll: atomically, private from the start."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, content: str, mode: int = 0o600) -> None:
    """Write through a temporary file and rename: a reader (or a crash) never sees half a
    file, and the content never exists with wider permissions than ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
