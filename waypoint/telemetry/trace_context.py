"""W3C trace context (https://www.w3.org/TR/trace-context/): parsing ``traceparent`` and
``tracestate`` as received, and the context of the waypoint's own span. Pure functions.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Protocol

_HEX2 = re.compile(r"[0-9a-f]{2}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
_FLAG_SAMPLED = 0x01
# tracestate: at most 32 list members, keys are simple or tenant@system, values printable ASCII
# without ',' and '=' and not ending in a space.
_TRACESTATE_MAX_MEMBERS = 32
_TRACESTATE_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
_TRACESTATE_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_OWS = " \t"


@dataclass(frozen=True)
class TraceContext:
    """One span's identity as W3C propagates it. ``tracestate`` is carried, never interpreted."""

    trace_id: str
    span_id: str
    sampled: bool = True
    tracestate: str = ""

    def __post_init__(self) -> None:
        if not _TRACE_ID.fullmatch(self.trace_id) or self.trace_id == _ZERO_TRACE_ID:
            raise ValueError(
                f"trace id must be 32 lowercase hex digits, not all zero: {self.trace_id!r}"
            )
        if not _SPAN_ID.fullmatch(self.span_id) or self.span_id == _ZERO_SPAN_ID:
            raise ValueError(
                f"span id must be 16 lowercase hex digits, not all zero: {self.span_id!r}"
            )


class RandomBits(Protocol):
    """What ``child_context`` needs from a random source (``random.Random`` has it)."""

    def getrandbits(self, k: int, /) -> int: ...


def parse_traceparent(value: str) -> TraceContext | None:
    """The context in a ``traceparent`` header, or None when the header is not valid W3C.

    Version 00 must be exactly ``00-<32 hex>-<16 hex>-<2 hex>`` in lowercase with non-zero ids.
    A later version (not ``ff``) is read by its version-00 prefix, as the spec asks, provided
    anything after it is separated by ``-``. The result's ``span_id`` is the caller's span.
    """
    value = value.strip(_OWS)
    if len(value) < 55:
        return None
    version = value[0:2]
    if not _HEX2.fullmatch(version) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not _TRACE_ID.fullmatch(trace_id) or trace_id == _ZERO_TRACE_ID:
        return None
    if not _SPAN_ID.fullmatch(parent_id) or parent_id == _ZERO_SPAN_ID:
        return None
    if not _HEX2.fullmatch(flags):
        return None
    return TraceContext(trace_id, parent_id, sampled=bool(int(flags, 16) & _FLAG_SAMPLED))


def parse_tracestate(value: str | None) -> str:
    """``value`` unchanged if it is a well-formed ``tracestate`` list, else "" (dropped).

    The check is of shape only (member count, key and value syntax): vendors' entries are
    forwarded untouched, never reordered or rewritten.
    """
    if not value or not value.strip(_OWS):
        return ""
    members = [m.strip(_OWS) for m in value.split(",")]
    present = [m for m in members if m]
    if len(present) > _TRACESTATE_MAX_MEMBERS:
        return ""
    keys: set[str] = set()
    for member in present:
        key, sep, member_value = member.partition("=")
        if not sep or not _TRACESTATE_KEY.fullmatch(key) or key in keys:
            return ""
        if not _TRACESTATE_VALUE.fullmatch(member_value):
            return ""
        keys.add(key)
    return value


def incoming_context(traceparent: str | None, tracestate: str | None) -> TraceContext | None:
    """The caller's context from both headers; tracestate is ignored without a valid parent,
    as the spec requires."""
    if traceparent is None:
        return None
    parent = parse_traceparent(traceparent)
    if parent is None:
        return None
    return dataclasses.replace(parent, tracestate=parse_tracestate(tracestate))


def _random_hex(rand: RandomBits, bits: int) -> str:
    while True:
        number = rand.getrandbits(bits)
        if number:
            return f"{number:0{bits // 4}x}"


def child_context(parent: TraceContext | None, rand: RandomBits) -> TraceContext:
    """The context of a new span under ``parent``: same trace, sampling and tracestate, new span
    id. Without a parent a new trace starts, sampled (the waypoint records what it sees)."""
    if parent is None:
        return TraceContext(_random_hex(rand, 128), _random_hex(rand, 64), sampled=True)
    return TraceContext(
        parent.trace_id,
        _random_hex(rand, 64),
        sampled=parent.sampled,
        tracestate=parent.tracestate,
    )


def format_traceparent(context: TraceContext) -> str:
    """The version-00 ``traceparent`` value; only the sampled flag is carried forward."""
    flags = _FLAG_SAMPLED if context.sampled else 0
    return f"00-{context.trace_id}-{context.span_id}-{flags:02x}"
