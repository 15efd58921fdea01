"""What the translators share: the one rule they all follow (a broken object is logged and
skipped, never fatal) and the few accessors of a Kubernetes object's metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

if TYPE_CHECKING:  # translate.py imports the translators, which import this module
    from istiod_lite.translate import MeshConfig

T = TypeVar("T")

logger = structlog.get_logger("istiod_lite.translate")


def convert_each(
    objects: Mapping[str, dict[str, Any]], convert: Callable[[dict[str, Any]], T | None]
) -> list[T]:
    """``convert`` each object in key order; None results and broken objects are left out,
    the latter with a warning naming the object and the reason."""
    converted: list[T] = []
    for key in sorted(objects):
        result = convert_one(key, objects[key], convert)
        if result is not None:
            converted.append(result)
    return converted


def convert_one(
    key: str, obj: dict[str, Any], convert: Callable[[dict[str, Any]], T | None]
) -> T | None:
    """``convert(obj)``, or None with a warning naming the object and the reason if it is
    broken."""
    try:
        return convert(obj)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.warning(
            "object not translated",
            kind=obj.get("kind") if isinstance(obj, dict) else None,
            key=key,
            reason=f"{type(exc).__name__}: {exc}",
        )
        return None


def name_of(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def namespace_of(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"].get("namespace", "default"))


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def service_hostname(name: str, namespace: str, mesh: MeshConfig) -> str:
    return f"{name}.{namespace}.svc.{mesh.cluster_domain}"
