"""The lab's errors: each message says what is wrong and what to do."""

from __future__ import annotations


class LabPlanError(ValueError):
    """The YAML or the flags do not describe a lab we can build; the message says what."""


class LabError(Exception):
    """The lab could not be built, run or removed; the message says what and what to do."""
