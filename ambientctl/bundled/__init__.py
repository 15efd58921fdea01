"""The files ambientctl ships: the demo's config and the kustomize manifests.

``examples`` and ``manifests`` here are symlinks to the repository's ``examples/`` and
``manifests/``; building the wheel copies what they point at (pyproject.toml's package data),
so a checkout and an installed wheel find the same files at the same place, and the defaults
of ``ambientctl demo``, ``ambientctl up`` and ``kubectl ambient install`` work from any
directory.
"""

from __future__ import annotations

from pathlib import Path

# Resolved: in a checkout the repository's own directories (what messages should name, and
# kustomize refuses files reached through a symlink out of its root).
BUNDLED = Path(__file__).resolve().parent
DEMO_CONFIG_DIR = (BUNDLED / "examples").resolve() / "demo"
MANIFESTS_DIR = (BUNDLED / "manifests").resolve()
DEFAULT_KUSTOMIZATION = MANIFESTS_DIR / "base"
