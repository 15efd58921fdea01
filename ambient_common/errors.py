"""Turning Trio's nested exception groups into the plain reasons a user needs to read."""

from __future__ import annotations

from collections.abc import Iterator


def leaf_exceptions(error: BaseException) -> Iterator[BaseException]:
    """The real exceptions inside (possibly nested) exception groups, in order."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaf_exceptions(inner)
    else:
        yield error


def describe(error: BaseException) -> str:
    """'reason; reason' for a group, str(error) for anything else."""
    return "; ".join(str(leaf) or type(leaf).__name__ for leaf in leaf_exceptions(error))
