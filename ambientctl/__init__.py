"""ambientctl: the command line of ambient-lite (embedded mesh, demo, ztunnel-config)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed distribution's version; "unknown" when run from an uninstalled tree."""
    try:
        return version("ambient-lite")
    except PackageNotFoundError:
        return "unknown"
