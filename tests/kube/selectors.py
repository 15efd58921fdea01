"""Label and field selectors as the API server parses them (sans-IO).

Label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k`` and
``!k``, comma-joined (all must hold). ``!=`` and ``notin`` also match objects without the label,
as in Kubernetes. Field selectors: ``field=v``, ``field==v``, ``field!=v`` over the fields each
resource supports (``metadata.name`` and ``metadata.namespace`` everywhere, a few more for pods
and secrets); anything else is rejected as ``field label not supported``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

LabelOperator = Literal["=", "!=", "in", "notin", "exists", "!"]

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_SET_TERM = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQUALITY_TERM = re.compile(r"^(?P<key>[^\s!=(),]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")

FIELDS_BY_RESOURCE: dict[str, frozenset[str]] = {
    "pods": frozenset(
        {
            "spec.nodeName",
            "spec.serviceAccountName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
    "secrets": frozenset({"type"}),
    "events": frozenset(
        {"involvedObject.kind", "involvedObject.name", "involvedObject.namespace", "reason"}
    ),
    "nodes": frozenset({"spec.unschedulable"}),
}
_COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


class SelectorError(ValueError):
    """A selector the API server would answer with 400 BadRequest."""


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: LabelOperator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # "!=" and "notin"


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(r.matches(labels or {}) for r in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unbalanced ')' in selector {text!r}")
        if char == "," and depth == 0:
            terms.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SelectorError(f"unbalanced '(' in selector {text!r}")
    terms.append("".join(current).strip())
    return terms


def _check_key(key: str, selector: str) -> str:
    if not _KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise SelectorError(f"invalid label key {key!r} in selector {selector!r}")
    return key


def _check_value(value: str, selector: str) -> str:
    if not _VALUE.match(value) or len(value) > 63:
        raise SelectorError(f"invalid label value {value!r} in selector {selector!r}")
    return value


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse a ``labelSelector`` query value; empty means everything."""
    if not text or not text.strip():
        return LabelSelector()
    requirements: list[LabelRequirement] = []
    for term in _split_terms(text):
        if not term:
            raise SelectorError(f"empty term in label selector {text!r}")
        if term.startswith("!"):
            requirements.append(LabelRequirement(_check_key(term[1:].strip(), text), "!"))
            continue
        set_match = _SET_TERM.match(term)
        if set_match:
            values = [v.strip() for v in set_match["values"].split(",")]
            if set_match["op"] == "in" and values == [""]:
                raise SelectorError(f"'in' needs at least one value in selector {text!r}")
            requirements.append(
                LabelRequirement(
                    _check_key(set_match["key"], text),
                    "in" if set_match["op"] == "in" else "notin",
                    frozenset(_check_value(v, text) for v in values),
                )
            )
            continue
        equality = _EQUALITY_TERM.match(term)
        if equality:
            requirements.append(
                LabelRequirement(
                    _check_key(equality["key"], text),
                    "!=" if equality["op"] == "!=" else "=",
                    frozenset({_check_value(equality["value"], text)}),
                )
            )
            continue
        requirements.append(LabelRequirement(_check_key(term, text), "exists"))
    return LabelSelector(tuple(requirements))


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    equal: bool
    value: str


@dataclass(frozen=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, r.field) == r.value) == r.equal for r in self.requirements)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """A dotted field as the selector compares it: absent fields are the empty string,
    booleans ``true``/``false``."""
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def parse_field_selector(text: str | None, plural: str) -> FieldSelector:
    """Parse a ``fieldSelector`` for one resource; an unsupported field is rejected."""
    if not text or not text.strip():
        return FieldSelector()
    allowed = _COMMON_FIELDS | FIELDS_BY_RESOURCE.get(plural, frozenset())
    requirements: list[FieldRequirement] = []
    for term in text.split(","):
        term = term.strip()
        for operator in ("!=", "==", "="):
            if operator in term:
                field, value = (part.strip() for part in term.split(operator, 1))
                break
        else:
            raise SelectorError(f"invalid field selector term {term!r}: expected field=value")
        if field not in allowed:
            raise SelectorError(f"field label not supported: {field}")
        requirements.append(FieldRequirement(field, operator != "!=", value))
    return FieldSelector(tuple(requirements))
