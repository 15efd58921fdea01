"""One concept per module: a source file stays under ~600 lines unless its docstring says why.

A newcomer should find any concern in one place and read a module in one sitting; a longer
module is allowed only when it is one concept, and its module docstring says so (the words
"one concept"), so the exception is a decision someone wrote down.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def _source_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [REPO / name for name in listed if not name.startswith("tests/")]


def test_long_modules_say_why_they_are_one_concept() -> None:
    files = _source_files()
    assert len(files) > 100  # the listing worked
    unexplained = {}
    for path in files:
        text = path.read_text()
        lines = text.count("\n")
        if lines <= MAX_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if "one concept" not in " ".join(docstring.split()):
            unexplained[str(path.relative_to(REPO))] = lines
    assert unexplained == {}, f"over {MAX_LINES} lines without saying why: {unexplained}"
