"""Field parsers the L7 translators share: durations, whole numbers, ports and regular
expressions as Gateway API and Istio write them. Each raises ValueError naming ``where``
the bad value was, which ``convert_each`` logs as the reason an object was skipped."""

from __future__ import annotations

import re
from typing import Any

from ambient_common.flags import parse_duration

_ZERO_DURATION = re.compile(r"(0+(\.0+)?(ms|s|m|h))+|0+")


def duration(value: Any, where: str) -> float:
    """A positive duration in seconds (``10s``, ``500ms``, ``1h2m``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: {value!r} is not a duration")
    try:
        return parse_duration(str(value)).total_seconds()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def optional_duration(value: Any, where: str) -> float | None:
    """None when absent or zero (Gateway API's and Istio's "disabled")."""
    if value is None or (isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip())):
        return None
    return duration(value, where)


def whole(value: Any, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {value!r} is not a whole number >= {minimum}")
    return value


def port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{where}: {value!r} is not a port number (1-65535)")
    return value


def check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regular expression {pattern!r}: {exc}") from None
