"""The embedded mesh's errors, shared by every module of ``ambientctl.embedded``."""

from __future__ import annotations


class EmbeddedError(Exception):
    """The embedded mesh could not start or is not healthy; the message says what to fix."""


class EmbeddedConfigError(EmbeddedError):
    """The config directory does not describe a mesh we can run."""
