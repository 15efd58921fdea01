"""What the translators share: the one rule they all follow (a broken object is logged and
skipped, never fatal; a broken *policy* is translated so that it fails closed and is
recorded as a ``PolicyError``), Kubernetes label-selector matching and the few accessors of a
Kubernetes object's metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeVar

import structlog

from istiod_lite.translate.mesh import MeshConfig

T = TypeVar("T")

GATEWAY_GROUP = "gateway.networking.k8s.io"
# How a route or policy may name the core API group (Services).
CORE_GROUPS = frozenset({"", "core"})

logger = structlog.get_logger("istiod_lite.translate")


@dataclass(frozen=True)
class PolicyError:
    """A policy part that could not be translated as written; the translator already
    logged it and made the policy fail closed. istiod counts these (``/metrics``)."""

    policy: str  # "<kind> <namespace>/<name>"
    field: str  # e.g. "rules[0].from[1].source.ipBlocks"
    reason: str


def record_policy_error(
    errors: list[PolicyError], policy: str, field: str, reason: str, effect: str
) -> None:
    """Log a policy part that cannot be translated (and ``effect``: how the policy fails
    closed instead) and add it to ``errors``."""
    logger.warning("policy not translated as written; failing closed",
                   policy=policy, field=field, reason=reason, effect=effect)
    errors.append(PolicyError(policy, field, reason))


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


def annotations_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def where_of(obj: Mapping[str, Any]) -> str:
    """``<kind> <namespace>/<name>``: how log lines and errors name an object."""
    return f"{obj.get('kind', 'object')} {namespace_of(obj)}/{name_of(obj)}"


def created_at(obj: Mapping[str, Any]) -> str:
    """``metadata.creationTimestamp`` as RFC 3339 (YAML may have parsed it as a datetime)."""
    value = obj["metadata"].get("creationTimestamp")
    if value is None:
        return ""
    if isinstance(value, datetime):
        text = value.isoformat()
        return text.replace("+00:00", "Z") if value.tzinfo else f"{text}Z"
    if isinstance(value, date):
        return f"{value.isoformat()}T00:00:00Z"
    return str(value)


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics: ``matchLabels`` and ``matchExpressions`` (In,
    NotIn, Exists, DoesNotExist) all have to hold; an empty selector matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key = expression["key"]
        operator = expression["operator"]
        values = expression.get("values") or []
        if operator == "In":
            if key not in labels or labels[key] not in values:
                return False
        elif operator == "NotIn":
            if key in labels and labels[key] in values:
                return False
        elif operator == "Exists":
            if key not in labels:
                return False
        elif operator == "DoesNotExist":
            if key in labels:
                return False
        else:
            raise ValueError(f"unknown label selector operator {operator!r}")
    return True



_SELECTOR_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


def check_selector(selector: Any) -> None:
    """Raise ValueError naming what is wrong unless ``selector`` is a LabelSelector that
    ``selector_matches`` can apply to any labels (checked up front, so that a broken policy
    selector fails the policy, not every workload it is matched against)."""
    if selector is None:
        return
    if not isinstance(selector, Mapping):
        raise ValueError("selector must be a mapping")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError("selector.matchLabels must map strings to strings")
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise ValueError("selector.matchExpressions must be a list")
    for index, expression in enumerate(expressions):
        where = f"selector.matchExpressions[{index}]"
        if not isinstance(expression, Mapping) or not isinstance(expression.get("key"), str):
            raise ValueError(f"{where} needs a key")
        operator = expression.get("operator")
        if not isinstance(operator, str) or operator not in _SELECTOR_OPERATORS:
            raise ValueError(f"{where}: unknown label selector operator {operator!r}")
        values = expression.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}.values must be a list of strings")


AUTHORIZATION_POLICY = "AuthorizationPolicy"
# Logged once per CUSTOM policy by each translator that meets it (it fails closed).
CUSTOM_DENIED = "CUSTOM needs an ext_authz provider; denying"


def custom_provider(spec: Mapping[str, Any]) -> str | None:
    """The ext_authz provider a CUSTOM policy names (for the log line)."""
    provider = spec.get("provider")
    return str(provider.get("name")) if isinstance(provider, Mapping) else None
