"""The one rule every translator follows: a broken object is logged and skipped, never fatal."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

logger = structlog.get_logger("istiod_lite.translate")


def convert_each(
    objects: Mapping[str, dict[str, Any]], convert: Callable[[dict[str, Any]], T | None]
) -> list[T]:
    """``convert`` each object in key order; None results and broken objects are left out,
    the latter with a warning naming the object and the reason."""
    converted: list[T] = []
    for key in sorted(objects):
        obj = objects[key]
        try:
            result = convert(obj)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.warning(
                "object not translated",
                kind=obj.get("kind") if isinstance(obj, dict) else None,
                key=key,
                reason=f"{type(exc).__name__}: {exc}",
            )
            continue
        if result is not None:
            converted.append(result)
    return converted
