"""Who may import whom: the contracts in pyproject.toml ([tool.importlinter]) hold.

`make lint` runs the same `lint-imports`; this test also proves the contracts can fail (a
package tree that breaks one is reported) and checks what the two leaves import from outside
the project: the wire contract only the standard library, the common helpers no first-party
package.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = frozenset({
    "ambient_api", "ambient_common", "ambient_dataplane",
    "ztunnel", "waypoint", "istiod_lite", "ambientctl",
})


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("lint-imports (import-linter, a test dependency) is not installed")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [executable, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )


def test_the_project_keeps_its_import_contracts() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_proxy_importing_the_control_plane_breaks_a_contract(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in FIRST_PARTY:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "waypoint" / "sneaky.py").write_text("import istiod_lite\nimport ztunnel\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Proxies import neither the control plane nor the CLI BROKEN" in result.stdout
    assert "Proxies import neither each other BROKEN" in result.stdout
    assert "waypoint.sneaky -> istiod_lite" in result.stdout


def _top_level_imports(package: str) -> dict[str, set[str]]:
    """Top-level module names each file of ``package`` imports (relative imports excluded)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_wire_contract_imports_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__", "ambient_api"}
    outside = {
        path: sorted(names - allowed)
        for path, names in _top_level_imports("ambient_api").items()
        if names - allowed
    }
    assert outside == {}


def test_the_common_helpers_import_no_first_party_package() -> None:
    first_party = {
        path: sorted((names & FIRST_PARTY) - {"ambient_common"})
        for path, names in _top_level_imports("ambient_common").items()
        if (names & FIRST_PARTY) - {"ambient_common"}
    }
    assert first_party == {}
